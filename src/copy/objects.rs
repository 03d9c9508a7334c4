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
/// Bytes of a large object read (and written here) at a time.
const LARGE_OBJECT_CHUNK: i64 = 16 * 1024 * 1024;

/// One object read on the source, to be recreated here. The switchover reads
/// them through the sessions it opened before its fence (which refuses new
/// ones) and hands them to a database worker as JSON lines.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceObject {
    /// A sequence's state, as `setval` takes it (`name` quoted and qualified).
    Sequence {
        name: String,
        last_value: String,
        is_called: bool,
    },
    /// Every large object follows: those here now go (one removed on the
    /// source since an earlier copy, too).
    LargeObjectsFollow,
    /// A large object, created empty with its owner, privileges and comment;
    /// its data follows in [`SourceObject::LargeObjectChunk`]s.
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
    /// A materialized view populated on the source.
    MaterializedView { schema: String, name: String },
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

/// Reads every large object with its owner, privileges and comment, one at
/// a time, calling `each` per object.
pub fn read_large_objects(
    source: &mut Connection,
    each: &mut dyn FnMut(SourceObject) -> Result<(), ObjectsError>,
) -> Result<usize, ObjectsError> {
    let objects = source.simple_query(
        "SELECT m.oid::text AS oid, pg_catalog.pg_get_userbyid(m.lomowner) AS owner, \
                m.lomacl::text AS acl, \
                pg_catalog.obj_description(m.oid, 'pg_largeobject') AS comment \
           FROM pg_catalog.pg_largeobject_metadata m ORDER BY m.oid",
    )?;
    each(SourceObject::LargeObjectsFollow)?;
    for object in &objects {
        let oid = object.try_get("oid")?.unwrap_or_default().to_string();
        each(SourceObject::LargeObject {
            oid: oid.clone(),
            owner: object.get("owner").map(str::to_string),
            acl: object.get("acl").unwrap_or("").to_string(),
            comment: object.get("comment").map(str::to_string),
        })?;
        // In chunks: one value of a whole object could pass the 1 GB limit
        // of a text value (in hex, twice its size), and would sit in memory.
        let mut offset: i64 = 0;
        loop {
            let data = source
                .simple_query(&format!(
                    "SELECT pg_catalog.lo_get({}, {offset}, {LARGE_OBJECT_CHUNK}) AS data",
                    quote_literal(&oid)
                ))?
                .into_iter()
                .next()
                .and_then(|row| row.get("data").map(str::to_string))
                .unwrap_or_default();
            // bytea text in hex: "\x" and two digits a byte.
            let bytes = data.len().saturating_sub(2) as i64 / 2;
            if bytes > 0 {
                each(SourceObject::LargeObjectChunk {
                    oid: oid.clone(),
                    offset,
                    data,
                })?;
            }
            if bytes < LARGE_OBJECT_CHUNK {
                break;
            }
            offset += bytes;
        }
    }
    Ok(objects.len())
}

/// Reads the materialized views that are populated on the source.
pub fn read_materialized_views(
    source: &mut Connection,
    each: &mut dyn FnMut(SourceObject) -> Result<(), ObjectsError>,
) -> Result<usize, ObjectsError> {
    let views = source.simple_query(
        "SELECT schemaname::text AS schema, matviewname::text AS name \
           FROM pg_catalog.pg_matviews WHERE ispopulated ORDER BY 1, 2",
    )?;
    for view in &views {
        each(SourceObject::MaterializedView {
            schema: view.try_get("schema")?.unwrap_or_default().to_string(),
            name: view.try_get("name")?.unwrap_or_default().to_string(),
        })?;
    }
    Ok(views.len())
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
        } => {
            // The oid goes into statements unquoted: it must be a number.
            let oid = large_object_oid(oid)?;
            run_utf8(&format!("SELECT pg_catalog.lo_create({oid})"))?;
            if let Some(owner) = owner {
                run_utf8(&format!(
                    "ALTER LARGE OBJECT {oid} OWNER TO {}",
                    crate::source::quote_ident(owner)
                ))?;
            }
            for grant in large_object_grants(&oid.to_string(), acl) {
                run_utf8(&grant)?;
            }
            if let Some(comment) = comment {
                run_utf8(&format!(
                    "COMMENT ON LARGE OBJECT {oid} IS {}",
                    quote_literal(comment)
                ))?;
            }
        }
        SourceObject::LargeObjectsFollow => {
            run_utf8("SELECT pg_catalog.lo_unlink(oid) FROM pg_catalog.pg_largeobject_metadata")?
        }
        SourceObject::LargeObjectChunk { oid, offset, data } => run_utf8(&format!(
            "SELECT pg_catalog.lo_put({}, {offset}, {}::bytea)",
            large_object_oid(oid)?,
            quote_literal(data)
        ))?,
        // Quoted here: a name is text from the source, never SQL. PostgreSQL
        // runs the view's query as the owner already (matview.c); the session
        // user is the owner too, so nothing in it sees the superuser driving it.
        SourceObject::MaterializedView { schema, name } => {
            let qualified = format!(
                "{}.{}",
                crate::source::quote_ident(schema),
                crate::source::quote_ident(name)
            );
            let owner = pgrx::Spi::get_one_with_args::<pgrx::pg_sys::Oid>(
                "SELECT relowner FROM pg_catalog.pg_class WHERE oid = $1::pg_catalog.regclass",
                &[qualified.as_str().into()],
            )?
            .unwrap_or(caller);
            crate::schema::execute::as_owner_for(owner, caller, || {
                run_utf8(&format!("REFRESH MATERIALIZED VIEW {qualified}"))
            })?
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

/// Copies every large object with its owner and privileges; returns how many.
pub fn copy_large_objects(source: &mut Connection) -> Result<usize, ObjectsError> {
    read_large_objects(source, &mut |object| {
        apply(&object, pgrx::pg_sys::InvalidOid)
    })
}

/// GRANT statements recreating a large object's ACL (`{grantee=rw/grantor,...}`).
pub fn large_object_grants(oid: &str, acl: &str) -> Vec<String> {
    let inner = acl.trim().trim_start_matches('{').trim_end_matches('}');
    let mut grants = Vec::new();
    for item in split_acl_items(inner) {
        let Some((grantee, rest)) = item.rsplit_once('=').map(|(g, r)| (g.to_string(), r)) else {
            continue;
        };
        let privileges = rest.split('/').next().unwrap_or("");
        let grantee = grantee.trim_matches('"').replace("\"\"", "\"");
        let target = if grantee.is_empty() {
            "PUBLIC".to_string()
        } else {
            crate::source::quote_ident(&grantee)
        };
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

/// Refreshes here every materialized view that is populated on the source.
/// Each as its owner here (or as `caller`, who started the task, when that
/// owner is a superuser and the caller is not: see `schema::execute`).
pub fn refresh_materialized_views(
    source: &mut Connection,
    caller: pgrx::pg_sys::Oid,
) -> Result<usize, ObjectsError> {
    read_materialized_views(source, &mut |object| apply(&object, caller))
}

#[cfg(test)]
mod tests {
    use super::*;

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
