-- cloudmig catalog, part 3: what DDL on the source did to a running task.
--
-- DDL is not replicated. When the source's shape of a table outruns the
-- local one, the apply of that database pauses (kind 'apply_paused': one row
-- per paused database, removed when the apply continues by itself after the
-- DBA ran the DDL here). A table the task's table-list publication does not
-- carry (created on the source after the publication, with a non-superuser
-- migration account) is recorded once as 'not_published': its rows are not
-- migrated, and the row stays as the record of it.

CREATE TABLE cloudmig.schema_drift (
    task_id     bigint      NOT NULL REFERENCES cloudmig.task (id) ON DELETE CASCADE,
    datname     text        NOT NULL,
    relation    text        NOT NULL,  -- schema.table on the source
    kind        text        NOT NULL CHECK (kind IN ('apply_paused', 'not_published')),
    detail      text        NOT NULL,  -- what differs
    hint        text        NOT NULL,  -- what to do (for a pause: the DDL to run here)
    waiting_lsn pg_lsn,                -- commit LSN of the source transaction that waits
    since       timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    PRIMARY KEY (task_id, datname, relation, kind)
);
COMMENT ON TABLE cloudmig.schema_drift IS 'source tables whose DDL the migration waits for, or does not carry';

SELECT pg_catalog.pg_extension_config_dump('cloudmig.schema_drift', '');
REVOKE ALL ON cloudmig.schema_drift FROM PUBLIC;
GRANT SELECT ON cloudmig.schema_drift TO cloudmig_admin;
