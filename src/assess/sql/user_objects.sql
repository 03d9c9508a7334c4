-- Objects a user created in the current database: everything in a
-- non-system schema that no extension owns (an index counts as its table's),
-- plus the schemas themselves but "public" and cloudmig's own. Returns how
-- many there are and the first few by name.
WITH objects AS (
    SELECT format('%s %I.%I',
                  CASE c.relkind WHEN 'r' THEN 'table' WHEN 'p' THEN 'table'
                                 WHEN 'v' THEN 'view' WHEN 'm' THEN 'materialized view'
                                 WHEN 'S' THEN 'sequence' WHEN 'f' THEN 'foreign table'
                                 WHEN 'i' THEN 'index' WHEN 'I' THEN 'index'
                                 ELSE 'relation' END,
                  n.nspname, c.relname) AS label
      FROM pg_catalog.pg_class c
      JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
       AND n.nspname !~ '^pg_(toast|temp_|toast_temp_)'
       AND c.relkind <> 'c'
       AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
                        WHERE d.classid = 'pg_catalog.pg_class'::regclass
                          AND d.objid = coalesce((SELECT i.indrelid FROM pg_catalog.pg_index i
                                                   WHERE i.indexrelid = c.oid), c.oid)
                          AND d.deptype = 'e')
    UNION ALL
    SELECT format('function %I.%I', n.nspname, p.proname)
      FROM pg_catalog.pg_proc p
      JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
     WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
       AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
                        WHERE d.classid = 'pg_catalog.pg_proc'::regclass
                          AND d.objid = p.oid AND d.deptype = 'e')
    UNION ALL
    SELECT format('type %I.%I', n.nspname, t.typname)
      FROM pg_catalog.pg_type t
      JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace
     WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
       AND n.nspname !~ '^pg_(toast|temp_|toast_temp_)'
       AND t.typtype IN ('e', 'd', 'r', 'm')
       AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
                        WHERE d.classid = 'pg_catalog.pg_type'::regclass
                          AND d.objid = t.oid AND d.deptype = 'e')
    UNION ALL
    SELECT format('schema %I', n.nspname)
      FROM pg_catalog.pg_namespace n
     WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'public')
       AND n.nspname !~ '^pg_(toast|temp_|toast_temp_)'
       AND n.oid NOT IN (SELECT e.extnamespace FROM pg_catalog.pg_extension e
                          WHERE e.extname = 'cloudmig')
       AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
                        WHERE d.classid = 'pg_catalog.pg_namespace'::regclass
                          AND d.objid = n.oid AND d.deptype = 'e')
)
SELECT (SELECT count(*) FROM objects)::bigint AS object_count,
       (SELECT coalesce(string_agg(label, ', ' ORDER BY label), '')
          FROM (SELECT label FROM objects ORDER BY label LIMIT 10) first_ten) AS sample
