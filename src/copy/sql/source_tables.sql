-- The tables whose rows a migration copies from one source database: every
-- ordinary table (partitions included; a partitioned parent holds no rows)
-- that no extension owns, logged or unlogged, and the tables extensions mark
-- as configuration (pg_extension_config_dump: cron.job, user rows of
-- spatial_ref_sys), as pg_dump does; largest first. Sizes include TOAST, so
-- large values weigh in the plan and the progress. `columns` (a JSON array)
-- names the columns each table's COPY reads, in order (stored generated
-- columns left out: the destination computes them), read here for every
-- table at once rather than by each COPY, a round trip per table.
SELECT n.nspname AS schema_name,
       c.relname AS table_name,
       pg_catalog.pg_table_size(c.oid) AS bytes_total,
       greatest(c.reltuples, 0)::bigint AS rows_estimated,
       EXISTS (SELECT 1 FROM pg_catalog.pg_extension e
                WHERE c.oid = ANY (e.extconfig)) AS extension_config,
       (SELECT coalesce(pg_catalog.json_agg(a.attname ORDER BY a.attnum), '[]')
          FROM pg_catalog.pg_attribute a
         WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
           AND a.attgenerated = '')::text AS columns
  FROM pg_catalog.pg_class c
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind = 'r'
   AND c.relpersistence IN ('p', 'u')
   AND n.nspname NOT IN ('pg_catalog', 'information_schema')
   AND n.nspname !~ '^pg_(toast|temp_|toast_temp_)'
   AND (NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
                     WHERE d.classid = 'pg_catalog.pg_class'::regclass
                       AND d.objid = c.oid AND d.deptype = 'e')
        OR EXISTS (SELECT 1 FROM pg_catalog.pg_extension e
                    WHERE c.oid = ANY (e.extconfig)))
 ORDER BY 3 DESC, 1, 2
