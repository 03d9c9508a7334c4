-- Tables whose UPDATE and DELETE the source refuses once they are in a
-- publication: no usable replica identity (no primary key under the default
-- identity, identity NOTHING, or an identity index that is gone).
-- Partitioned parents hold no rows; their partitions are listed instead.
SELECT pg_catalog.format('%I.%I', n.nspname, c.relname) AS name
  FROM pg_catalog.pg_class c
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind = 'r'
   AND c.relpersistence = 'p'
   AND n.nspname NOT IN ('pg_catalog', 'information_schema')
   AND n.nspname !~ '^pg_(toast|temp_|toast_temp_)'
   AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
                    WHERE d.classid = 'pg_catalog.pg_class'::regclass
                      AND d.objid = c.oid AND d.deptype = 'e')
   AND (c.relreplident = 'n'
        OR (c.relreplident = 'd' AND NOT EXISTS (
                SELECT 1 FROM pg_catalog.pg_index i
                 WHERE i.indrelid = c.oid AND i.indisprimary))
        OR (c.relreplident = 'i' AND NOT EXISTS (
                SELECT 1 FROM pg_catalog.pg_index i
                 WHERE i.indrelid = c.oid AND i.indisreplident)))
 ORDER BY 1
