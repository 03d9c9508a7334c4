-- compare::database_properties: one line per fact about each non-template database, sorted.
-- Columns that only some server versions have are read through to_jsonb so that one query
-- serves them all (datlocprovider 15+, daticulocale 15-16, datlocale 17+, daticurules 16+).
-- A NULL ACL means the default one: it is spelled out (acldefault), and ACL items are sorted,
-- so that GRANTs replayed in another order still compare equal.
SELECT line FROM (
    SELECT format('database %I: owner=%I encoding=%s collate=%s ctype=%s provider=%s '
                  'locale=%s icu_rules=%s allow_connections=%s connection_limit=%s '
                  'tablespace=%I acl=%s comment=%L',
                  d.datname, pg_get_userbyid(d.datdba), pg_encoding_to_char(d.encoding),
                  d.datcollate, d.datctype,
                  coalesce(to_jsonb(d) ->> 'datlocprovider', '-'),
                  coalesce(to_jsonb(d) ->> 'datlocale', to_jsonb(d) ->> 'daticulocale', '-'),
                  coalesce(to_jsonb(d) ->> 'daticurules', '-'),
                  d.datallowconn::text, d.datconnlimit, t.spcname,
                  (SELECT string_agg(a::text, ',' ORDER BY a::text)
                     FROM unnest(coalesce(d.datacl, acldefault('d', d.datdba))) a),
                  shobj_description(d.oid, 'pg_database')) AS line
      FROM pg_database d
      JOIN pg_tablespace t ON t.oid = d.dattablespace
     WHERE NOT d.datistemplate
    UNION ALL
    -- ALTER DATABASE ... SET (role-specific ones are in compare::roles).
    SELECT format('database %I setting: %s', d.datname, c)
      FROM pg_db_role_setting s
      JOIN pg_database d ON d.oid = s.setdatabase
     CROSS JOIN LATERAL unnest(s.setconfig) c
     WHERE s.setrole = 0 AND NOT d.datistemplate
) facts
ORDER BY line
