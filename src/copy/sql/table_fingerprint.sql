-- Row count and, when asked, an order-independent checksum of one table
-- (%TABLE% and %CHECKSUMS% are filled in by the caller). Both sides run it
-- with TimeZone UTC and DateStyle ISO so the text forms agree.
SELECT count(*)::text AS rows,
       CASE WHEN %CHECKSUMS%
            THEN coalesce(pg_catalog.md5(pg_catalog.string_agg(pg_catalog.md5(t::text), '' ORDER BY pg_catalog.md5(t::text))), '')
            ELSE '' END AS checksum
  FROM ONLY %TABLE% t
