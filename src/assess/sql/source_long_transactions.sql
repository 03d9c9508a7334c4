-- Transactions open longer than the threshold ($1 seconds, inlined by the
-- caller as an integer). Creating a logical slot waits for every transaction
-- that holds an xid to end.
SELECT pg_catalog.format('pid %s (%s on %s, open %s)', a.pid,
                         coalesce(a.usename::text, '?'), coalesce(a.datname::text, '?'),
                         pg_catalog.date_trunc('second', pg_catalog.now() - a.xact_start)) AS name
  FROM pg_catalog.pg_stat_activity a
 WHERE a.xact_start < pg_catalog.now() - pg_catalog.make_interval(secs => %THRESHOLD%)
   AND a.pid <> pg_catalog.pg_backend_pid()
 ORDER BY a.xact_start
