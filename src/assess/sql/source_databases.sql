-- Every database of the source a migration would copy (templates are
-- recreated by initdb, not copied), with what creating it here needs.
-- to_jsonb(d) reads columns that only newer versions have (datlocprovider,
-- daticulocale) as NULL on older ones.
SELECT d.datname,
       pg_catalog.pg_encoding_to_char(d.encoding) AS encoding,
       d.datcollate,
       d.datctype,
       coalesce(pg_catalog.to_jsonb(d) ->> 'datlocprovider', 'c') AS locale_provider,
       pg_catalog.to_jsonb(d) ->> 'daticulocale' AS icu_locale,
       pg_catalog.has_database_privilege(d.oid, 'CONNECT') AS can_connect,
       pg_catalog.pg_has_role(d.datdba, 'USAGE') AS owned,
       CASE WHEN pg_catalog.has_database_privilege(d.oid, 'CONNECT')
              OR pg_catalog.pg_has_role('pg_read_all_stats', 'USAGE')
            THEN pg_catalog.pg_database_size(d.oid) END AS size_bytes
  FROM pg_catalog.pg_database d
 WHERE d.datallowconn AND NOT d.datistemplate
 ORDER BY d.datname
