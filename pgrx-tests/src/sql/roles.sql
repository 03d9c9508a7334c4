-- compare::roles: one line per fact about each role that is neither a system role (pg_*) nor
-- one of cloudmig's own (the EXTENSION_ROLES placeholder, replaced before the query runs),
-- sorted.
-- Passwords are left to compare::role_passwords. Run in a compare::stable_client (UTC).
WITH normal AS (
    SELECT r.*
      FROM pg_roles r
     WHERE r.rolname !~ '^pg_' AND r.rolname <> ALL ($EXTENSION_ROLES)
)
SELECT line FROM (
    SELECT format('role %I: %s', r.rolname, concat_ws(' ',
               CASE WHEN r.rolsuper THEN 'SUPERUSER' ELSE 'NOSUPERUSER' END,
               CASE WHEN r.rolinherit THEN 'INHERIT' ELSE 'NOINHERIT' END,
               CASE WHEN r.rolcreaterole THEN 'CREATEROLE' ELSE 'NOCREATEROLE' END,
               CASE WHEN r.rolcreatedb THEN 'CREATEDB' ELSE 'NOCREATEDB' END,
               CASE WHEN r.rolcanlogin THEN 'LOGIN' ELSE 'NOLOGIN' END,
               CASE WHEN r.rolreplication THEN 'REPLICATION' ELSE 'NOREPLICATION' END,
               CASE WHEN r.rolbypassrls THEN 'BYPASSRLS' ELSE 'NOBYPASSRLS' END,
               'CONNECTION LIMIT ' || r.rolconnlimit,
               'VALID UNTIL ' || coalesce(r.rolvaliduntil::text, 'NULL'))) AS line
      FROM normal r
    UNION ALL
    SELECT format('role %I comment: %L', r.rolname, shobj_description(r.oid, 'pg_authid'))
      FROM normal r
     WHERE shobj_description(r.oid, 'pg_authid') IS NOT NULL
    UNION ALL
    -- Memberships of a normal role, in any role but cloudmig's (system roles included:
    -- pg_monitor, pg_read_all_stats, ...).
    SELECT format('member %I of %I admin=%s grantor=%s', m.rolname, g.rolname, a.admin_option::text,
                  coalesce(quote_ident(gr.rolname), '<none>'))
      FROM pg_auth_members a
      JOIN normal m ON m.oid = a.member
      JOIN pg_roles g ON g.oid = a.roleid
      LEFT JOIN pg_roles gr ON gr.oid = a.grantor
     WHERE g.rolname <> ALL ($EXTENSION_ROLES)
    UNION ALL
    -- ALTER ROLE ... [IN DATABASE ...] SET, each setting on its own line (their order in
    -- setconfig is the order they were first set in, which means nothing).
    SELECT format('setting of %I in %s: %s', r.rolname,
                  coalesce(quote_ident(d.datname), 'every database'), c)
      FROM pg_db_role_setting s
      JOIN normal r ON r.oid = s.setrole
      LEFT JOIN pg_database d ON d.oid = s.setdatabase
     CROSS JOIN LATERAL unnest(s.setconfig) c
) facts
ORDER BY line
