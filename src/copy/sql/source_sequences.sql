-- Every sequence of a source database with its state at the snapshot of the
-- calling transaction (last_value and is_called, as setval takes them).
SELECT pg_catalog.format('%I.%I', s.schemaname, s.sequencename) AS name,
       s.last_value::text AS last_value,
       (s.last_value IS NOT NULL)::text AS is_called,
       s.start_value::text AS start_value
  FROM pg_catalog.pg_sequences s
 WHERE s.schemaname NOT IN ('pg_catalog', 'information_schema')
 ORDER BY 1
