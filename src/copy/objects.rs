//! What is not table rows: sequences, large objects, materialized views.
//! Each reads the source through a connection already inside the copy's
//! snapshot and writes here through SPI, in the caller's transaction.

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
}

/// Sequences read per query (one UNION ALL of this many sequences).
const SEQUENCES_PER_QUERY: usize = 500;

/// Sets every sequence here to its state at the snapshot (`last_value` and
/// `is_called`, as `setval` takes them); returns how many.
pub fn copy_sequences(source: &mut Connection) -> Result<usize, ObjectsError> {
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
            let name = row.try_get("name")?.unwrap_or_default();
            let value = row.try_get("last_value")?.unwrap_or("1");
            let is_called = row.get("is_called") == Some("true");
            run_utf8(&format!(
                "SELECT pg_catalog.setval({}::regclass, {}::bigint, {is_called})",
                quote_literal(name),
                quote_literal(value)
            ))?;
        }
    }
    Ok(names.len())
}

/// Copies every large object with its owner and privileges; returns how many.
pub fn copy_large_objects(source: &mut Connection) -> Result<usize, ObjectsError> {
    let objects = source.simple_query(
        "SELECT m.oid::text AS oid, pg_catalog.pg_get_userbyid(m.lomowner) AS owner, \
                m.lomacl::text AS acl, \
                pg_catalog.obj_description(m.oid, 'pg_largeobject') AS comment \
           FROM pg_catalog.pg_largeobject_metadata m ORDER BY m.oid",
    )?;
    for object in &objects {
        let oid = object.try_get("oid")?.unwrap_or_default().to_string();
        let data = source
            .simple_query(&format!(
                "SELECT pg_catalog.lo_get({}) AS data",
                quote_literal(&oid)
            ))?
            .into_iter()
            .next()
            .and_then(|row| row.get("data").map(str::to_string))
            .unwrap_or_default();
        // Idempotent: a resumed task may have copied it before.
        run_utf8(&format!(
            "SELECT pg_catalog.lo_unlink(oid) FROM pg_catalog.pg_largeobject_metadata WHERE oid = {}::oid",
            quote_literal(&oid)
        ))?;
        run_utf8(&format!(
            "SELECT pg_catalog.lo_from_bytea({}::oid, {}::bytea)",
            quote_literal(&oid),
            quote_literal(&data)
        ))?;
        if let Some(owner) = object.get("owner") {
            run_utf8(&format!(
                "ALTER LARGE OBJECT {oid} OWNER TO {}",
                crate::source::quote_ident(owner)
            ))?;
        }
        for grant in large_object_grants(&oid, object.get("acl").unwrap_or("")) {
            run_utf8(&grant)?;
        }
        if let Some(comment) = object.get("comment") {
            run_utf8(&format!(
                "COMMENT ON LARGE OBJECT {oid} IS {}",
                quote_literal(comment)
            ))?;
        }
    }
    Ok(objects.len())
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
/// Refreshes every materialized view populated at the snapshot, each as
/// its owner here (or as `caller`, who started the task, when that owner is
/// a superuser and the caller is not: see `schema::execute`). PostgreSQL
/// runs the view's query as the owner already (matview.c); the session user
/// is the owner too, so nothing in it sees the superuser driving the copy.
pub fn refresh_materialized_views(
    source: &mut Connection,
    caller: pgrx::pg_sys::Oid,
) -> Result<usize, ObjectsError> {
    let views = source.simple_query(
        "SELECT pg_catalog.format('%I.%I', schemaname, matviewname) AS name \
           FROM pg_catalog.pg_matviews WHERE ispopulated ORDER BY 1",
    )?;
    for view in &views {
        let name = view.try_get("name")?.unwrap_or_default();
        let owner = pgrx::Spi::get_one_with_args::<pgrx::pg_sys::Oid>(
            "SELECT relowner FROM pg_catalog.pg_class WHERE oid = $1::pg_catalog.regclass",
            &[name.into()],
        )?
        .unwrap_or(caller);
        crate::schema::execute::as_owner_for(owner, caller, || {
            run_utf8(&format!("REFRESH MATERIALIZED VIEW {name}"))
        })?;
    }
    Ok(views.len())
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
