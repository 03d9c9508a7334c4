-- cloudmig catalog, part 2: migration tasks and their durable progress.
--
-- Phases of a task (cloudmig.task.phase):
--
--   created -> roles -> schema -> full_copy -> post_data -> copy_complete
--     -> catchup -> incremental -> switching_over -> completed
--   any of these --error--> failed (error kept, and the phase it failed in;
--     cloudmig.resume or cloudmig.skip continue from there, cancel cleans up)
--   switching_over --timeout or error--> incremental (the source is writable again)
--   any phase but completed/cancelled --cloudmig.cancel--> cancelled
--
-- A phase change is one transaction that also writes an event. Only one task
-- may be active (not completed or cancelled) at a time: a failed task keeps
-- its replication slots on the source until it is cancelled.

CREATE TABLE cloudmig.task (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    assessment_id   bigint      NOT NULL REFERENCES cloudmig.assessments (id),
    source          text        NOT NULL,  -- conninfo with the password masked
    options         jsonb       NOT NULL DEFAULT '{}',
    phase           text        NOT NULL DEFAULT 'created'
                    CHECK (phase IN ('created', 'roles', 'schema', 'full_copy', 'post_data',
                                     'copy_complete', 'catchup', 'incremental', 'switching_over',
                                     'completed', 'failed', 'cancelled')),
    phase_since     timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    requested_by    name        NOT NULL DEFAULT session_user,
    -- The role that called cloudmig.start() (current_user, not the session
    -- user): the migration never gives roles more than this one could.
    started_by      oid,
    created_at      timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    copy_started_at timestamptz,
    finished_at     timestamptz,
    worker_starts   integer     NOT NULL DEFAULT 0,  -- how often a task worker (re)started it
    last_error      text,
    last_error_hint text,
    last_error_at   timestamptz,
    -- The phase a failed task stopped in: cloudmig.resume() continues there.
    failed_in       text,
    -- Commit LSN (on the source) of the transaction the apply failed on, so
    -- cloudmig.skip() can be given it.
    last_error_lsn  pg_lsn,
    -- The one source transaction (by commit LSN) the apply skips
    -- (cloudmig.skip); cleared once it was skipped.
    skip_lsn        pg_lsn,
    -- The source outage the task is riding out right now (NULL: none): when
    -- it began, the retries so far, why, and when the task gives up on it
    -- (each outage gets cloudmig.source_retry_timeout of its own).
    outage_since    timestamptz,
    outage_attempts integer NOT NULL DEFAULT 0,
    outage_cause    text,
    outage_gives_up_at timestamptz
);
COMMENT ON TABLE cloudmig.task IS 'one row per migration started with cloudmig.start()';
CREATE UNIQUE INDEX task_one_active ON cloudmig.task ((true))
    WHERE phase NOT IN ('completed', 'cancelled');

-- One row per source database the task copies.
CREATE TABLE cloudmig.task_database (
    task_id         bigint  NOT NULL REFERENCES cloudmig.task (id) ON DELETE CASCADE,
    ordinal         integer NOT NULL,
    datname         text    NOT NULL,
    state           text    NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'created', 'schema_applied', 'copied',
                                     'post_data_applied')),
    size_bytes      bigint,
    slot_name       text    NOT NULL,       -- permanent logical slot on the source
    consistent_lsn  pg_lsn,                 -- where that slot's changes start
    PRIMARY KEY (task_id, datname),
    UNIQUE (task_id, ordinal)
);

-- One row per table (and materialized view) to copy.
--   pending -> copying -> copied -> indexed
-- A table's own indexes and constraints are built right after its rows are
-- in (indexes_started_at .. indexes_finished_at); a table still 'copied' when
-- a task resumes gets them then.
-- sync_lsn is the LSN of the snapshot the table's rows were copied at: the
-- apply of changes skips, for this table, transactions committed at or
-- before it (as PostgreSQL's own tablesync does).
CREATE TABLE cloudmig.table_copy (
    task_id         bigint NOT NULL REFERENCES cloudmig.task (id) ON DELETE CASCADE,
    datname         text   NOT NULL,
    schema_name     text   NOT NULL,
    table_name      text   NOT NULL,
    state           text   NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'copying', 'copied', 'indexed')),
    bytes_total     bigint NOT NULL DEFAULT 0,   -- size on the source when planned
    rows_estimated  bigint NOT NULL DEFAULT 0,   -- reltuples on the source when planned
    -- An extension's configuration table (pg_extension_config_dump): CREATE
    -- EXTENSION filled it here with its defaults, which the source's rows
    -- replace (the source holds them too), so its copy always empties it first.
    extension_config boolean NOT NULL DEFAULT false,
    rows_copied     bigint,
    bytes_copied    bigint,
    sync_lsn        pg_lsn,
    started_at      timestamptz,
    finished_at     timestamptz,
    indexes_started_at  timestamptz,
    indexes_finished_at timestamptz,
    PRIMARY KEY (task_id, datname, schema_name, table_name)
);

-- The secret of a started assessment belongs to its task from then on, and
-- is removed in the transaction that completes or cancels the task.
ALTER TABLE cloudmig.source_secret
    ADD COLUMN task_id bigint UNIQUE REFERENCES cloudmig.task (id) ON DELETE CASCADE;

CREATE TABLE cloudmig.events (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_id     bigint      NOT NULL REFERENCES cloudmig.task (id) ON DELETE CASCADE,
    at          timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    datname     text,
    kind        text        NOT NULL CHECK (kind IN ('phase', 'info', 'warning', 'error')),
    message     text        NOT NULL
);
COMMENT ON TABLE cloudmig.events IS 'append-only log of what happened to each task, for humans and alerts';
CREATE INDEX events_task_at ON cloudmig.events (task_id, at);

SELECT pg_catalog.pg_extension_config_dump('cloudmig.task', '');
SELECT pg_catalog.pg_extension_config_dump('cloudmig.task_database', '');
SELECT pg_catalog.pg_extension_config_dump('cloudmig.table_copy', '');
SELECT pg_catalog.pg_extension_config_dump('cloudmig.events', '');

REVOKE ALL ON cloudmig.task, cloudmig.task_database, cloudmig.table_copy, cloudmig.events FROM PUBLIC;
GRANT SELECT ON cloudmig.task, cloudmig.task_database, cloudmig.table_copy, cloudmig.events
    TO cloudmig_admin;
