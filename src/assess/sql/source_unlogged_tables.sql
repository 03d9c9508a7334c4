-- Unlogged tables: their changes never reach the WAL, so logical decoding
-- cannot replay them after the initial copy.
SELECT pg_catalog.format('%I.%I', n.nspname, c.relname) AS name
  FROM pg_catalog.pg_class c
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind IN ('r', 'p')
   AND c.relpersistence = 'u'
 ORDER BY 1
