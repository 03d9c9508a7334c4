//! What is not table rows: sequences, large objects, materialized views.
//! Each is read on the source (through a connection inside the copy's
//! snapshot, or the switchover's fenced session) as a [`SourceObject`] and
//! recreated here through SPI, in the caller's transaction.

use super::SOURCE_SEQUENCES_SQL;
use crate::schema::execute::run_utf8;
use crate::source::{quote_literal, Connection, SourceError};

/// Why copying such objects failed.
#[derive(Debug, thiserror::Error)]
pub enum ObjectsError {
    #[error("{0}")]
    Source(#[from] SourceError),
    #[error("{0}")]
    Local(#[from] pgrx::spi::Error),
    #[error("unexpected value from the source: {0}")]
    Invalid(String),
    #[error("{0}")]
    File(String),
}

/// Sequences read per query (one UNION ALL of this many sequences).
const SEQUENCES_PER_QUERY: usize = 500;
/// Bytes of a large object compared by one digest, and moved when they differ.
const LARGE_OBJECT_CHUNK: i64 = 1024 * 1024;
/// Differing chunks moved in one read (and one write here) at most.
const CHUNKS_PER_READ: i64 = 16;

/// One object read on the source, to be recreated here. The switchover reads
/// them through the sessions it opened before its fence (which refuses new
/// ones) and hands them to a database worker as JSON lines. Large objects
/// come as a delta against what is here already (see [`large_object_delta`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceObject {
    /// A sequence's state, as `setval` takes it (`name` quoted and qualified).
    Sequence {
        name: String,
        last_value: String,
        is_called: bool,
    },
    /// A large object with its owner, privileges and comment: created empty
    /// when it is not here yet, else given that owner, those privileges and
    /// that comment. Its data follows in [`SourceObject::LargeObjectChunk`]s.
    LargeObject {
        oid: String,
        owner: Option<String>,
        acl: String,
        comment: Option<String>,
    },
    /// `data` (bytea text) of large object `oid`, written at `offset`.
    LargeObjectChunk {
        oid: String,
        offset: i64,
        data: String,
    },
    /// Large object `oid` is shorter on the source: cut it to `length` bytes.
    LargeObjectTruncate { oid: String, length: i64 },
    /// Large object `oid` is gone from the source.
    LargeObjectUnlink { oid: String },
    /// A materialized view: populated on the source, it gets the rows of
    /// the file `rows` (its COPY text there); else unpopulated here too.
    MaterializedView {
        schema: String,
        name: String,
        populated: bool,
        rows: Option<String>,
    },
}

/// What a REFRESH of a materialized view on the source changes: a plain
/// one gives it a new relfilenode, a concurrent one counts its DML in the
/// statistics (which a backend sends at the latest when it exits, and the
/// fence ends every session), WITH NO DATA unpopulates it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MaterializedViewState {
    pub schema: String,
    pub name: String,
    pub populated: bool,
    pub filenode: String,
    pub changes: String,
}

/// The source's materialized views and their [`MaterializedViewState`].
pub fn materialized_view_states(
    source: &mut Connection,
) -> Result<Vec<MaterializedViewState>, ObjectsError> {
    source
        .simple_query(
            "SELECT n.nspname::text AS schema, c.relname::text AS name, \
                    c.relispopulated::text AS populated, c.relfilenode::text AS filenode, \
                    coalesce(s.n_tup_ins + s.n_tup_upd + s.n_tup_del, 0)::text AS changes \
               FROM pg_catalog.pg_class c \
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
               LEFT JOIN pg_catalog.pg_stat_all_tables s ON s.relid = c.oid \
              WHERE c.relkind = 'm' ORDER BY 1, 2",
        )?
        .iter()
        .map(|row| {
            Ok(MaterializedViewState {
                schema: row.try_get("schema")?.unwrap_or_default().to_string(),
                name: row.try_get("name")?.unwrap_or_default().to_string(),
                populated: row.get("populated") == Some("true"),
                filenode: row.get("filenode").unwrap_or_default().to_string(),
                changes: row.get("changes").unwrap_or_default().to_string(),
            })
        })
        .collect()
}

/// A large object as one side has it: its metadata, its size and a digest
/// (md5, hex) per [`LARGE_OBJECT_CHUNK`] bytes of its data.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct LargeObjectState {
    pub oid: u32,
    pub owner: Option<String>,
    /// `lomacl` as text, empty when NULL (the owner's default privileges).
    pub acl: String,
    pub comment: Option<String>,
    pub size: i64,
    /// None: not computed (nothing to compare with); every chunk is moved.
    pub digests: Option<Vec<String>>,
}

/// A pass over the large objects: the source's as copied here, and what
/// changed.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct LargeObjectPass {
    pub objects: Vec<LargeObjectState>,
    pub counts: LargeObjectCounts,
}

/// What a pass over the large objects changed here.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LargeObjectCounts {
    /// Large objects on the source.
    pub objects: usize,
    pub created: usize,
    pub removed: usize,
    /// Existing ones whose owner, privileges or comment changed.
    pub metadata: usize,
    /// Existing ones whose data changed (size or bytes).
    pub data: usize,
    /// Bytes read from the source and written here.
    pub bytes: i64,
}

impl LargeObjectCounts {
    /// Objects created, removed or changed.
    pub fn changed(&self) -> usize {
        self.created + self.removed + self.metadata + self.data
    }

    /// Nothing differed.
    pub fn is_empty(&self) -> bool {
        self.changed() == 0
    }

    /// Adds another database's counts.
    pub fn add(&mut self, other: &Self) {
        self.objects += other.objects;
        self.created += other.created;
        self.removed += other.removed;
        self.metadata += other.metadata;
        self.data += other.data;
        self.bytes += other.bytes;
    }
}

impl std::fmt::Display for LargeObjectCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} large object(s): {} created, {} removed, {} with new owner/privileges/comment, \
             {} with new data ({} bytes copied)",
            self.objects, self.created, self.removed, self.metadata, self.data, self.bytes
        )
    }
}

/// The large objects with their metadata and size, and with `digests`, a
/// md5 per chunk of their data, computed where the data is (only digests
/// cross the network). Runs on the source and here alike: it needs SELECT on
/// each object (as `lo_get` does), never `pg_largeobject` itself, which is a
/// superuser's. `lo_open`'s descriptors close with the transaction.
fn large_objects_sql(digests: bool) -> String {
    let digests = if digests {
        format!(
            "(SELECT pg_catalog.string_agg(pg_catalog.md5(pg_catalog.lo_get(m.oid, o, {LARGE_OBJECT_CHUNK})), \
                                          ',' ORDER BY o) \
                FROM pg_catalog.generate_series(0::bigint, s.size - 1, {LARGE_OBJECT_CHUNK}) o)"
        )
    } else {
        "NULL::text".to_string()
    };
    format!(
        "SELECT m.oid::text AS oid, pg_catalog.pg_get_userbyid(m.lomowner)::text AS owner, \
                coalesce(m.lomacl::text, '') AS acl, \
                pg_catalog.obj_description(m.oid, 'pg_largeobject') AS comment, \
                s.size::text AS size, {digests} AS digests \
           FROM pg_catalog.pg_largeobject_metadata m \
          CROSS JOIN LATERAL (SELECT pg_catalog.lo_lseek64(pg_catalog.lo_open(m.oid, 262144), 0, 2) \
                                     AS size) s \
          ORDER BY m.oid"
    )
}

fn large_object_state(
    oid: Option<&str>,
    owner: Option<String>,
    acl: Option<String>,
    comment: Option<String>,
    size: Option<&str>,
    digests: Option<&str>,
    with_digests: bool,
) -> Result<LargeObjectState, ObjectsError> {
    let size = size.unwrap_or("0");
    Ok(LargeObjectState {
        oid: large_object_oid(oid.unwrap_or(""))?,
        owner,
        acl: acl.unwrap_or_default(),
        comment,
        size: size
            .parse()
            .map_err(|_| ObjectsError::Invalid(format!("large object size {size:?}")))?,
        digests: with_digests.then(|| {
            digests
                .filter(|d| !d.is_empty())
                .map(|d| d.split(',').map(str::to_string).collect())
                .unwrap_or_default()
        }),
    })
}

/// The source's large objects (see [`large_objects_sql`]).
pub fn source_large_objects(
    source: &mut Connection,
    digests: bool,
) -> Result<Vec<LargeObjectState>, ObjectsError> {
    source
        .simple_query(&large_objects_sql(digests))?
        .iter()
        .map(|row| {
            large_object_state(
                row.try_get("oid")?,
                row.get("owner").map(str::to_string),
                row.get("acl").map(str::to_string),
                row.get("comment").map(str::to_string),
                row.get("size"),
                row.get("digests"),
                digests,
            )
        })
        .collect()
}

/// This database's large objects (see [`large_objects_sql`]), through SPI.
pub fn local_large_objects(digests: bool) -> Result<Vec<LargeObjectState>, ObjectsError> {
    let rows = pgrx::Spi::connect_mut(|client| {
        client
            .update(&large_objects_sql(digests), None, &[])?
            .map(|row| {
                Ok((
                    row.get::<String>(1)?,
                    row.get::<String>(2)?,
                    row.get::<String>(3)?,
                    row.get::<String>(4)?,
                    row.get::<String>(5)?,
                    row.get::<String>(6)?,
                ))
            })
            .collect::<Result<Vec<_>, pgrx::spi::Error>>()
    })?;
    rows.into_iter()
        .map(|(oid, owner, acl, comment, size, found)| {
            large_object_state(
                oid.as_deref(),
                owner,
                acl,
                comment,
                size.as_deref(),
                found.as_deref(),
                digests,
            )
        })
        .collect()
}

/// What makes the large objects here (`known`) those of the source
/// (`source`): unlinks, creations, metadata, truncations and the chunks whose
/// digests differ, read through `fetch(oid, offset, length)` (bytea text),
/// consecutive ones together. A chunk without a digest on either side counts
/// as differing.
pub fn large_object_delta(
    source: &[LargeObjectState],
    known: &[LargeObjectState],
    fetch: &mut dyn FnMut(u32, i64, i64) -> Result<String, ObjectsError>,
    each: &mut dyn FnMut(SourceObject) -> Result<(), ObjectsError>,
) -> Result<LargeObjectCounts, ObjectsError> {
    let mut counts = LargeObjectCounts {
        objects: source.len(),
        ..LargeObjectCounts::default()
    };
    let by_oid: std::collections::HashMap<u32, &LargeObjectState> =
        known.iter().map(|state| (state.oid, state)).collect();
    let on_source: std::collections::HashSet<u32> = source.iter().map(|s| s.oid).collect();
    for gone in known.iter().filter(|k| !on_source.contains(&k.oid)) {
        counts.removed += 1;
        each(SourceObject::LargeObjectUnlink {
            oid: gone.oid.to_string(),
        })?;
    }
    for object in source {
        let oid = object.oid.to_string();
        let here = by_oid.get(&object.oid).copied();
        let metadata_differs = match here {
            None => {
                counts.created += 1;
                true
            }
            Some(here) => {
                let differs = (&here.owner, &here.acl, &here.comment)
                    != (&object.owner, &object.acl, &object.comment);
                counts.metadata += usize::from(differs);
                differs
            }
        };
        if metadata_differs {
            each(SourceObject::LargeObject {
                oid: oid.clone(),
                owner: object.owner.clone(),
                acl: object.acl.clone(),
                comment: object.comment.clone(),
            })?;
        }
        let chunks = (object.size + LARGE_OBJECT_CHUNK - 1) / LARGE_OBJECT_CHUNK;
        let differs = |index: i64| -> bool {
            let Some(here) = here else {
                return true;
            };
            let digest = |state: &LargeObjectState| {
                state
                    .digests
                    .as_ref()
                    .and_then(|d| d.get(index as usize).cloned())
            };
            match (digest(object), digest(here)) {
                (Some(theirs), Some(ours)) => theirs != ours,
                _ => true,
            }
        };
        let mut data_changed = false;
        if let Some(here) = here {
            if here.size > object.size {
                data_changed = true;
                each(SourceObject::LargeObjectTruncate {
                    oid: oid.clone(),
                    length: object.size,
                })?;
            }
        }
        let mut index = 0;
        while index < chunks {
            if !differs(index) {
                index += 1;
                continue;
            }
            let first = index;
            while index < chunks && index - first < CHUNKS_PER_READ && differs(index) {
                index += 1;
            }
            let offset = first * LARGE_OBJECT_CHUNK;
            let data = fetch(object.oid, offset, (index - first) * LARGE_OBJECT_CHUNK)?;
            // bytea text in hex: "\x" and two digits a byte.
            counts.bytes += data.len().saturating_sub(2) as i64 / 2;
            data_changed = true;
            each(SourceObject::LargeObjectChunk {
                oid: oid.clone(),
                offset,
                data,
            })?;
        }
        if data_changed && here.is_some() {
            counts.data += 1;
        }
    }
    Ok(counts)
}

/// Reads `length` bytes of large object `oid` from `offset` on the source,
/// as bytea text. In chunks of a few megabytes: one value of a whole object
/// could pass the 1 GB limit of a text value (in hex, twice its size), and
/// would sit in memory.
pub fn read_large_object(
    source: &mut Connection,
    oid: u32,
    offset: i64,
    length: i64,
) -> Result<String, ObjectsError> {
    Ok(source
        .simple_query(&format!(
            "SELECT pg_catalog.lo_get({oid}, {offset}, {length}) AS data"
        ))?
        .into_iter()
        .next()
        .and_then(|row| row.get("data").map(str::to_string))
        .unwrap_or_default())
}

/// Reads every sequence's state, calling `each` per sequence.
pub fn read_sequences(
    source: &mut Connection,
    each: &mut dyn FnMut(SourceObject) -> Result<(), ObjectsError>,
) -> Result<usize, ObjectsError> {
    let names: Vec<String> = source
        .simple_query(SOURCE_SEQUENCES_SQL)?
        .iter()
        .filter_map(|row| row.get("name").map(str::to_string))
        .collect();
    for chunk in names.chunks(SEQUENCES_PER_QUERY) {
        let query = chunk
            .iter()
            .map(|name| {
                format!(
                    "SELECT {} AS name, last_value::text AS last_value, is_called::text AS is_called FROM {name}",
                    quote_literal(name)
                )
            })
            .collect::<Vec<_>>()
            .join(" UNION ALL ");
        for row in source.simple_query(&query)? {
            each(SourceObject::Sequence {
                name: row.try_get("name")?.unwrap_or_default().to_string(),
                last_value: row.try_get("last_value")?.unwrap_or("1").to_string(),
                is_called: row.get("is_called") == Some("true"),
            })?;
        }
    }
    Ok(names.len())
}

/// The COPY statement reading materialized view `schema.name`'s rows on
/// the source.
pub fn materialized_view_copy(schema: &str, name: &str) -> String {
    format!(
        "COPY (SELECT * FROM {}.{}) TO STDOUT",
        crate::source::quote_ident(schema),
        crate::source::quote_ident(name)
    )
}

/// Makes materialized view `schema.name` unpopulated here (no query runs).
fn unpopulate(qualified: &str, caller: pgrx::pg_sys::Oid) -> Result<(), ObjectsError> {
    let (owner, populated_here) = pgrx::Spi::connect(|client| {
        let mut rows = client.select(
            "SELECT relowner, relispopulated FROM pg_catalog.pg_class \
              WHERE oid = $1::pg_catalog.regclass",
            None,
            &[qualified.into()],
        )?;
        match rows.next() {
            Some(row) => Ok::<_, pgrx::spi::Error>((
                row.get::<pgrx::pg_sys::Oid>(1)?,
                row.get::<bool>(2)?.unwrap_or(false),
            )),
            None => Ok((None, false)),
        }
    })?;
    if !populated_here {
        return Ok(());
    }
    crate::schema::execute::as_owner_for(owner.unwrap_or(caller), caller, || {
        run_utf8(&format!(
            "REFRESH MATERIALIZED VIEW {qualified} WITH NO DATA"
        ))
    })?;
    Ok(())
}

/// Gives every materialized view here (or those of `only`, as (schema,
/// name)) the source session's contents (see [`super::matview`]); one
/// unpopulated there becomes unpopulated here. Returns how many were copied.
///
/// A source lost mid-COPY surfaces as an ERROR of the local COPY, which
/// unwinds past this function to the caller's transaction: the source's own
/// error is left in `lost`, which the caller reads after that transaction
/// ends, so an outage is retried as one.
pub fn copy_materialized_views(
    source: &mut Connection,
    caller: pgrx::pg_sys::Oid,
    only: Option<&[(String, String)]>,
    lost: &std::cell::RefCell<Option<SourceError>>,
) -> Result<usize, ObjectsError> {
    let views = source.simple_query(
        "SELECT schemaname::text AS schema, matviewname::text AS name, \
                ispopulated::text AS populated \
           FROM pg_catalog.pg_matviews ORDER BY 1, 2",
    )?;
    let mut copied = 0;
    for view in &views {
        let schema = view.try_get("schema")?.unwrap_or_default();
        let name = view.try_get("name")?.unwrap_or_default();
        if only.is_some_and(|only| {
            !only
                .iter()
                .any(|(s, n)| s.as_str() == schema && n.as_str() == name)
        }) {
            continue;
        }
        let qualified = format!(
            "{}.{}",
            crate::source::quote_ident(schema),
            crate::source::quote_ident(name)
        );
        if view.get("populated") != Some("true") {
            unpopulate(&qualified, caller)?;
            continue;
        }
        let mut copy = source.copy_out(&materialized_view_copy(schema, name))?;
        let mut next = || {
            copy.next_chunk().map_err(|e| {
                let text = e.to_string();
                *lost.borrow_mut() = Some(e);
                text
            })
        };
        super::matview::install(&qualified, caller, &mut next)?;
        copied += 1;
    }
    Ok(copied)
}

/// Gives materialized view `qualified` here the rows of the COPY text file
/// `path`.
fn install_from_file(
    qualified: &str,
    path: &str,
    caller: pgrx::pg_sys::Oid,
) -> Result<(), ObjectsError> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)
        .map_err(|e| ObjectsError::File(format!("could not read {path}: {e}")))?;
    let mut next = || {
        let mut buffer = vec![0u8; 1024 * 1024];
        let read = file
            .read(&mut buffer)
            .map_err(|e| format!("could not read {path}: {e}"))?;
        buffer.truncate(read);
        Ok((read > 0).then(|| bytes::Bytes::from(buffer)))
    };
    super::matview::install(qualified, caller, &mut next)?;
    Ok(())
}

/// Recreates one object here, through SPI in the caller's transaction.
/// `caller` started the task: see [`refresh_materialized_views`].
pub fn apply(object: &SourceObject, caller: pgrx::pg_sys::Oid) -> Result<(), ObjectsError> {
    match object {
        SourceObject::Sequence {
            name,
            last_value,
            is_called,
        } => run_utf8(&format!(
            "SELECT pg_catalog.setval({}::regclass, {}::bigint, {is_called})",
            quote_literal(name),
            quote_literal(last_value)
        ))?,
        SourceObject::LargeObject {
            oid,
            owner,
            acl,
            comment,
        } => set_large_object(
            large_object_oid(oid)?,
            owner.as_deref(),
            acl,
            comment.as_deref(),
        )?,
        SourceObject::LargeObjectTruncate { oid, length } => {
            let oid = large_object_oid(oid)?;
            // lo_truncate works on a descriptor: INV_WRITE (0x20000), closed
            // with the transaction.
            run_utf8(&format!(
                "SELECT pg_catalog.lo_truncate64(pg_catalog.lo_open({oid}, 131072), {length})"
            ))?
        }
        SourceObject::LargeObjectUnlink { oid } => run_utf8(&format!(
            "SELECT pg_catalog.lo_unlink({})",
            large_object_oid(oid)?
        ))?,
        SourceObject::LargeObjectChunk { oid, offset, data } => run_utf8(&format!(
            "SELECT pg_catalog.lo_put({}, {offset}, {}::bytea)",
            large_object_oid(oid)?,
            quote_literal(data)
        ))?,
        // Quoted here: a name is text from the source, never SQL. PostgreSQL
        // runs the view's query as the owner already (matview.c); the session
        // user is the owner too, so nothing in it sees the superuser driving it.
        SourceObject::MaterializedView {
            schema,
            name,
            populated,
            rows,
        } => {
            // Quoted here: a name is text from the source, never SQL.
            let qualified = format!(
                "{}.{}",
                crate::source::quote_ident(schema),
                crate::source::quote_ident(name)
            );
            match (populated, rows) {
                (true, Some(path)) => install_from_file(&qualified, path, caller)?,
                (true, None) => {
                    return Err(ObjectsError::Invalid(format!(
                        "no rows for materialized view {qualified}"
                    )))
                }
                (false, _) => unpopulate(&qualified, caller)?,
            }
        }
    }
    Ok(())
}

/// A large object's oid as the source sent it, checked to be one.
fn large_object_oid(text: &str) -> Result<u32, ObjectsError> {
    text.parse()
        .map_err(|_| ObjectsError::Invalid(format!("large object oid {text:?}")))
}

/// Sets every sequence here to its state on the source session (`last_value`
/// and `is_called`, as `setval` takes them); returns how many.
pub fn copy_sequences(source: &mut Connection) -> Result<usize, ObjectsError> {
    read_sequences(source, &mut |object| {
        apply(&object, pgrx::pg_sys::InvalidOid)
    })
}

/// Makes the large objects here those of the source session, moving only
/// what differs (see [`large_object_delta`]), in the caller's transaction.
/// Returns the source's objects as they are here now (with digests when
/// `keep`, for a later pass to compare with) and what changed.
pub fn copy_large_objects(
    source: &mut Connection,
    keep: bool,
) -> Result<(Vec<LargeObjectState>, LargeObjectCounts), ObjectsError> {
    let known = local_large_objects(true)?;
    // Nothing here to compare with: the source's digests would only cost
    // reading every object twice there.
    let theirs = source_large_objects(source, keep || !known.is_empty())?;
    let counts = large_object_delta(
        &theirs,
        &known,
        &mut |oid, offset, length| read_large_object(source, oid, offset, length),
        &mut |object| apply(&object, pgrx::pg_sys::InvalidOid),
    )?;
    Ok((theirs, counts))
}

/// Creates large object `oid` here unless it exists, then gives it the
/// source's owner, privileges and comment.
fn set_large_object(
    oid: u32,
    owner: Option<&str>,
    acl: &str,
    comment: Option<&str>,
) -> Result<(), ObjectsError> {
    let exists = pgrx::Spi::get_one::<bool>(&format!(
        "SELECT EXISTS (SELECT FROM pg_catalog.pg_largeobject_metadata WHERE oid = {oid})"
    ))?
    .unwrap_or(false);
    if !exists {
        run_utf8(&format!("SELECT pg_catalog.lo_create({oid})"))?;
    }
    if let Some(owner) = owner {
        run_utf8(&format!(
            "ALTER LARGE OBJECT {oid} OWNER TO {}",
            crate::source::quote_ident(owner)
        ))?;
    }
    // As here after the owner change (it rewrites the owner's entries).
    let current = pgrx::Spi::get_one::<String>(&format!(
        "SELECT coalesce(lomacl::text, '') FROM pg_catalog.pg_largeobject_metadata WHERE oid = {oid}"
    ))?
    .unwrap_or_default();
    if current != acl {
        for (target, _) in acl_grantees(&current) {
            run_utf8(&format!("REVOKE ALL ON LARGE OBJECT {oid} FROM {target}"))?;
        }
        for grant in large_object_grants(&oid.to_string(), acl) {
            run_utf8(&grant)?;
        }
        if acl.is_empty() && !current.is_empty() {
            // Revoked down to an empty list, which would leave the owner
            // nothing; NULL is the owner's default privileges, as on the
            // source. No grantee is left to depend on.
            run_utf8(&format!(
                "UPDATE pg_catalog.pg_largeobject_metadata SET lomacl = NULL WHERE oid = {oid}"
            ))?;
        }
    }
    if comment.is_some() || exists {
        run_utf8(&format!(
            "COMMENT ON LARGE OBJECT {oid} IS {}",
            comment.map(quote_literal).unwrap_or_else(|| "NULL".into())
        ))?;
    }
    Ok(())
}

/// The grantees of a large object's ACL (`{grantee=rw/grantor,...}`), as
/// GRANT and REVOKE name them.
fn acl_grantees(acl: &str) -> Vec<(String, String)> {
    let inner = acl.trim().trim_start_matches('{').trim_end_matches('}');
    split_acl_items(inner)
        .into_iter()
        .filter_map(|item| {
            let (grantee, rest) = item.rsplit_once('=')?;
            let privileges = rest.split('/').next().unwrap_or("").to_string();
            let grantee = grantee.trim_matches('"').replace("\"\"", "\"");
            let target = if grantee.is_empty() {
                "PUBLIC".to_string()
            } else {
                crate::source::quote_ident(&grantee)
            };
            Some((target, privileges))
        })
        .collect()
}

/// GRANT statements recreating a large object's ACL (`{grantee=rw/grantor,...}`).
pub fn large_object_grants(oid: &str, acl: &str) -> Vec<String> {
    let mut grants = Vec::new();
    for (target, privileges) in acl_grantees(acl) {
        for (letter, privilege) in [('r', "SELECT"), ('w', "UPDATE")] {
            if privileges.contains(letter) {
                grants.push(format!(
                    "GRANT {privilege} ON LARGE OBJECT {oid} TO {target}"
                ));
            }
        }
    }
    grants
}

/// Splits aclitem[] text at commas outside double quotes.
fn split_acl_items(text: &str) -> Vec<String> {
    let mut items = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    for c in text.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                current.push(c);
            }
            ',' if !quoted => items.push(std::mem::take(&mut current)),
            _ => current.push(c),
        }
    }
    if !current.is_empty() {
        items.push(current);
    }
    items
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(oid: u32, size: i64, digests: &[&str]) -> LargeObjectState {
        LargeObjectState {
            oid,
            owner: Some("alice".into()),
            acl: String::new(),
            comment: None,
            size,
            digests: Some(digests.iter().map(|d| d.to_string()).collect()),
        }
    }

    #[test]
    fn a_delta_moves_only_what_differs() {
        const MB: i64 = LARGE_OBJECT_CHUNK;
        let known = vec![
            state(1, 3 * MB, &["a", "b", "c"]),
            state(2, 2 * MB + 5, &["d", "e", "f"]),
            state(3, 10, &["g"]),
            state(4, 10, &["h"]),
        ];
        let mut source = vec![
            // The middle megabyte changed.
            state(1, 3 * MB, &["a", "B", "c"]),
            // Cut to one megabyte.
            state(2, MB, &["d"]),
            // Unchanged data, new comment.
            state(3, 10, &["g"]),
            // 4 is gone; 5 is new.
            state(5, MB + 1, &["i", "j"]),
        ];
        source[2].comment = Some("new".into());
        let mut reads = Vec::new();
        let mut objects = Vec::new();
        let counts = large_object_delta(
            &source,
            &known,
            &mut |oid, offset, length| {
                reads.push((oid, offset, length));
                Ok("\\x00".to_string())
            },
            &mut |object| {
                objects.push(object);
                Ok(())
            },
        )
        .expect("delta");
        assert_eq!(reads, vec![(1, MB, MB), (5, 0, 2 * MB)]);
        assert_eq!(
            (counts.created, counts.removed, counts.metadata, counts.data),
            (1, 1, 1, 2)
        );
        assert!(objects.contains(&SourceObject::LargeObjectUnlink { oid: "4".into() }));
        assert!(objects.contains(&SourceObject::LargeObjectTruncate {
            oid: "2".into(),
            length: MB
        }));
        // Nothing differs: nothing moves.
        let none = large_object_delta(
            &source,
            &source,
            &mut |_, _, _| unreachable!(),
            &mut |_| unreachable!(),
        )
        .expect("delta");
        assert!(none.is_empty());
    }

    #[test]
    fn large_object_acls_become_grants() {
        let grants = large_object_grants(
            "42",
            "{postgres=rw/postgres,alice=r/postgres,=w/postgres,\"Bob, Jr\"=r/postgres}",
        );
        assert_eq!(
            grants,
            vec![
                "GRANT SELECT ON LARGE OBJECT 42 TO \"postgres\"",
                "GRANT UPDATE ON LARGE OBJECT 42 TO \"postgres\"",
                "GRANT SELECT ON LARGE OBJECT 42 TO \"alice\"",
                "GRANT UPDATE ON LARGE OBJECT 42 TO PUBLIC",
                "GRANT SELECT ON LARGE OBJECT 42 TO \"Bob, Jr\"",
            ]
        );
        assert!(large_object_grants("1", "").is_empty());
    }
}
