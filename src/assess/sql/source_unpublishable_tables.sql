-- Tables a non-superuser account cannot add to a publication: publishing a
-- table needs the privileges of its owner.
SELECT pg_catalog.format('%I.%I (owner %s)', n.nspname, c.relname,
                         pg_catalog.pg_get_userbyid(c.relowner)) AS name
  FROM pg_catalog.pg_class c
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind = 'r'
   AND c.relpersistence = 'p'
   AND n.nspname NOT IN ('pg_catalog', 'information_schema')
   AND n.nspname !~ '^pg_(toast|temp_|toast_temp_)'
   AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
                    WHERE d.classid = 'pg_catalog.pg_class'::regclass
                      AND d.objid = c.oid AND d.deptype = 'e')
   AND NOT pg_catalog.pg_has_role(c.relowner, 'USAGE')
 ORDER BY 1
