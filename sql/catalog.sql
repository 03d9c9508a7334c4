-- cloudmig catalog: the durable state of assessments (and, later, tasks).
--
-- Invariants:
--  * source secrets (the full conninfo, password included) live only in
--    cloudmig.source_secret, which nobody but the extension owner can read;
--    every other table and view holds the masked conninfo. A secret is kept
--    only while an assessment may still be started or its task needs it.
--  * an assessment row and all its checks are written in the transaction of
--    the cloudmig.assess() call that ran them: a reader never sees half of one.

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'cloudmig_admin') THEN
        CREATE ROLE cloudmig_admin NOLOGIN;
    END IF;
END
$$;
COMMENT ON ROLE cloudmig_admin IS 'members may assess, start, watch and switch over cloudmig migrations';

GRANT USAGE ON SCHEMA cloudmig TO cloudmig_admin;

CREATE TABLE cloudmig.assessments (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source          text        NOT NULL,  -- conninfo with the password masked
    options         jsonb       NOT NULL DEFAULT '{}',
    requested_by    name        NOT NULL DEFAULT session_user,
    started_at      timestamptz NOT NULL,
    finished_at     timestamptz NOT NULL,
    passed          boolean     NOT NULL,
    checks_passed   integer     NOT NULL,
    checks_warned   integer     NOT NULL,
    checks_failed   integer     NOT NULL,
    source_version  text,                  -- server_version of the source, when it answered
    source_system_identifier text,         -- from IDENTIFY_SYSTEM, to recognise the source again
    source_databases text[],               -- the databases a migration would copy
    source_size_bytes bigint               -- sum of their sizes
);
COMMENT ON TABLE cloudmig.assessments IS 'one row per cloudmig.assess() call';

CREATE TABLE cloudmig.assessment_checks (
    assessment_id   bigint  NOT NULL REFERENCES cloudmig.assessments (id) ON DELETE CASCADE,
    ordinal         integer NOT NULL,
    name            text    NOT NULL,
    status          text    NOT NULL CHECK (status IN ('pass', 'warn', 'fail')),
    detail          text    NOT NULL,
    fix             text,
    PRIMARY KEY (assessment_id, ordinal),
    UNIQUE (assessment_id, name)
);
COMMENT ON TABLE cloudmig.assessment_checks IS 'each check of an assessment: its verdict, what it saw and how to fix it';

-- Only the owner (the superuser who created the extension) can read or write
-- this. cloudmig.assess() writes it as the owner, on behalf of its caller.
-- A row lives only while something may still need the password: until the
-- assessment is started or cloudmig.secret_retention has passed (the
-- launcher removes it), then (task_id set, see tasks.sql) until its task is
-- completed or cancelled.
CREATE TABLE cloudmig.source_secret (
    assessment_id   bigint PRIMARY KEY REFERENCES cloudmig.assessments (id) ON DELETE CASCADE,
    conninfo        text   NOT NULL,
    stored_at       timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp()
);
COMMENT ON TABLE cloudmig.source_secret IS 'full source conninfo (password included); readable by the extension owner only';
REVOKE ALL ON cloudmig.source_secret FROM PUBLIC;

-- pg_dump of the control database carries the assessments, never the secrets:
-- a dump file must not hold a source password.
SELECT pg_catalog.pg_extension_config_dump('cloudmig.assessments', '');
SELECT pg_catalog.pg_extension_config_dump('cloudmig.assessment_checks', '');

-- Callers only read: rows are written by cloudmig.assess() as the extension
-- owner, so an admin cannot forge a passed assessment by hand.
REVOKE ALL ON cloudmig.assessments, cloudmig.assessment_checks FROM PUBLIC;
GRANT SELECT ON cloudmig.assessments, cloudmig.assessment_checks TO cloudmig_admin;
