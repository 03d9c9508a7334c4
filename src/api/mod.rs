//! The SQL surface: every `#[pg_extern]` lives here, thin. Each function
//! validates its input, calls the parts below, and maps their errors to
//! SQLSTATEs (see [`error`]).
//!
//! Who may call: the extension script revokes EXECUTE from PUBLIC and grants
//! it to `cloudmig_admin` (superusers can always call).

pub mod assess;
pub mod error;
pub mod secrecy;
pub mod status;
pub mod switchover;
pub mod tasks;

pgrx::extension_sql!(
    r#"
REVOKE ALL ON FUNCTION cloudmig.assess(text, jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION cloudmig.assess(text, jsonb) TO cloudmig_admin;
REVOKE ALL ON FUNCTION cloudmig.status() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION cloudmig.status() TO cloudmig_admin;

REVOKE ALL ON FUNCTION cloudmig.start(bigint, jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION cloudmig.start(bigint, jsonb) TO cloudmig_admin;
REVOKE ALL ON FUNCTION cloudmig.cancel(bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION cloudmig.cancel(bigint) TO cloudmig_admin;
REVOKE ALL ON FUNCTION cloudmig.resume(bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION cloudmig.resume(bigint) TO cloudmig_admin;
REVOKE ALL ON FUNCTION cloudmig.skip(bigint, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION cloudmig.skip(bigint, text) TO cloudmig_admin;
REVOKE ALL ON FUNCTION cloudmig.set_source_password(bigint, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION cloudmig.set_source_password(bigint, text) TO cloudmig_admin;
REVOKE ALL ON FUNCTION cloudmig.wait(bigint, text, interval) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION cloudmig.wait(bigint, text, interval) TO cloudmig_admin;
REVOKE ALL ON FUNCTION cloudmig.switchover(bigint, jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION cloudmig.switchover(bigint, jsonb) TO cloudmig_admin;
REVOKE ALL ON FUNCTION cloudmig.verify(bigint, boolean) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION cloudmig.verify(bigint, boolean) TO cloudmig_admin;
REVOKE ALL ON FUNCTION cloudmig.apply_status() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION cloudmig.apply_status() TO cloudmig_admin;

CREATE VIEW cloudmig.apply_progress AS SELECT * FROM cloudmig.apply_status();
COMMENT ON VIEW cloudmig.apply_progress IS 'per database of the running task: received, applied and flushed LSNs, lag';
REVOKE ALL ON cloudmig.apply_progress FROM PUBLIC;
GRANT SELECT ON cloudmig.apply_progress TO cloudmig_admin;

REVOKE ALL ON FUNCTION cloudmig.live_copies() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION cloudmig.live_copies() TO cloudmig_admin;

CREATE VIEW cloudmig.table_progress AS
SELECT t.task_id, t.datname AS database, t.schema_name, t.table_name, t.state,
       coalesce(l.rows_copied, t.rows_copied) AS rows_copied,
       coalesce(l.bytes_copied, t.bytes_copied) AS bytes_copied,
       t.rows_estimated, t.bytes_total, t.sync_lsn, t.started_at, t.finished_at,
       t.indexes_started_at, t.indexes_finished_at,
       extract(epoch FROM t.indexes_finished_at - t.indexes_started_at)::float8 AS index_seconds
  FROM cloudmig.table_copy t
  LEFT JOIN cloudmig.live_copies() l
         ON l.task_id = t.task_id AND l.datname = t.datname
        AND l.schema_name = t.schema_name AND l.table_name = t.table_name
        AND t.state = 'copying';
COMMENT ON VIEW cloudmig.table_progress IS 'per table: copy state, rows and bytes copied (live while copying), time its own indexes took';

CREATE VIEW cloudmig.tasks AS
WITH per_table AS (
    SELECT task_id,
           count(*) AS tables_total,
           count(*) FILTER (WHERE state IN ('copied', 'indexed')) AS tables_done,
           sum(coalesce(rows_copied, 0)) AS rows_copied,
           sum(coalesce(bytes_copied, 0)) AS bytes_copied,
           sum(bytes_total) AS bytes_total,
           -- Size already copied: whole tables done, plus the share of the
           -- ones in flight by rows (bytes on the wire and on disk differ).
           -- (by rows when the source had statistics, else by bytes sent).
           sum(CASE WHEN state IN ('copied', 'indexed') THEN bytes_total
                    WHEN state = 'copying' AND rows_estimated > 0
                    THEN bytes_total * least(coalesce(rows_copied, 0)::numeric / rows_estimated, 0.99)
                    WHEN state = 'copying' AND bytes_total > 0
                    THEN bytes_total * least(coalesce(bytes_copied, 0)::numeric / bytes_total, 0.99)
                    ELSE 0 END) AS bytes_done,
           -- The copy ends when the last table is copied (later phases do
           -- not dilute the rate).
           CASE WHEN bool_and(state IN ('copied', 'indexed')) THEN max(finished_at) END AS copy_finished_at
      FROM cloudmig.table_progress
     GROUP BY task_id
), per_database AS (
    SELECT task_id, count(*) AS databases_total,
           count(*) FILTER (WHERE state = 'post_data_applied') AS databases_done
      FROM cloudmig.task_database
     GROUP BY task_id
)
SELECT k.id AS task_id, k.assessment_id, k.source, k.phase, k.phase_since,
       d.databases_total, d.databases_done,
       coalesce(p.tables_total, 0) AS tables_total, coalesce(p.tables_done, 0) AS tables_done,
       coalesce(p.rows_copied, 0) AS rows_copied, coalesce(p.bytes_copied, 0) AS bytes_copied,
       coalesce(p.bytes_total, 0) AS bytes_total,
       CASE WHEN k.phase = 'copy_complete' THEN 100.0
            WHEN coalesce(p.bytes_total, 0) = 0 THEN 0.0
            ELSE round(100.0 * p.bytes_done / p.bytes_total, 1) END AS percent,
       CASE WHEN k.copy_started_at IS NOT NULL
            THEN round(coalesce(p.bytes_copied, 0) / greatest(extract(epoch FROM
                       coalesce(p.copy_finished_at, pg_catalog.clock_timestamp()) - k.copy_started_at), 0.001))::bigint
       END AS copy_rate_bytes_per_second,
       CASE WHEN k.phase IN ('full_copy') AND p.bytes_done > 0 AND p.bytes_total > p.bytes_done
            THEN (pg_catalog.clock_timestamp() - k.copy_started_at)
                 * ((p.bytes_total - p.bytes_done) / p.bytes_done)::float8
       END AS eta,
       k.created_at, coalesce(k.finished_at, pg_catalog.clock_timestamp()) - k.created_at AS elapsed,
       a.lag_bytes, a.lag_seconds, a.transactions_applied,
       k.last_error, k.last_error_hint, k.last_error_at, k.worker_starts,
       k.failed_in, k.last_error_lsn, k.skip_lsn,
       k.outage_since, k.outage_attempts, k.outage_cause, k.outage_gives_up_at
  FROM cloudmig.task k
  LEFT JOIN per_table p ON p.task_id = k.id
  LEFT JOIN per_database d ON d.task_id = k.id
  LEFT JOIN (SELECT task_id, max(lag_bytes) AS lag_bytes, max(lag_seconds) AS lag_seconds,
                    sum(transactions)::bigint AS transactions_applied
               FROM cloudmig.apply_status() GROUP BY task_id) a ON a.task_id = k.id;
COMMENT ON VIEW cloudmig.tasks IS 'one row per migration task: phase, progress, rate, ETA, last error';

REVOKE ALL ON cloudmig.tasks, cloudmig.table_progress FROM PUBLIC;
GRANT SELECT ON cloudmig.tasks, cloudmig.table_progress TO cloudmig_admin;

CREATE VIEW cloudmig.instance_status AS SELECT * FROM cloudmig.status();
COMMENT ON VIEW cloudmig.instance_status IS 'what cloudmig is doing on this instance right now';
REVOKE ALL ON cloudmig.instance_status FROM PUBLIC;
GRANT SELECT ON cloudmig.instance_status TO cloudmig_admin;

CREATE VIEW cloudmig.assessment_report AS
SELECT a.id AS assessment_id, a.passed, c.ordinal, c.name, c.status, c.detail, c.fix
  FROM cloudmig.assessments a
  JOIN cloudmig.assessment_checks c ON c.assessment_id = a.id;
COMMENT ON VIEW cloudmig.assessment_report IS 'every check of every assessment, ready to filter by assessment_id';
REVOKE ALL ON cloudmig.assessment_report FROM PUBLIC;
GRANT SELECT ON cloudmig.assessment_report TO cloudmig_admin;
"#,
    name = "grants_and_views",
    finalize
);

/// The SQL surface inside one (rolled-back) transaction: argument validation,
/// grants, and the status view. Anything that needs a source server or a
/// worker is tested end to end in `pgrx-tests/`.
#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn the_instance_is_idle_without_an_assessment() {
        let state = Spi::get_one::<String>("SELECT state FROM cloudmig.instance_status");
        assert_eq!(state, Ok(Some("idle".to_string())));
    }

    #[pg_test(error = "invalid source connection string: invalid connection option \"bogus\"")]
    fn an_unknown_conninfo_key_is_refused() {
        let _ = Spi::get_one::<i64>("SELECT cloudmig.assess('host=x bogus=1')");
    }

    #[pg_test(error = "invalid options: options must be a JSON object")]
    fn options_must_be_an_object() {
        let _ = Spi::get_one::<i64>("SELECT cloudmig.assess('host=x', '[]')");
    }

    #[pg_test(
        error = "invalid options: unknown field `copy_worker`, expected `copy_workers` or `disk_headroom_percent`"
    )]
    fn a_typo_in_options_is_named() {
        let _ = Spi::get_one::<i64>("SELECT cloudmig.assess('host=x', '{\"copy_worker\": 2}')");
    }

    #[pg_test]
    fn public_cannot_execute_or_read() {
        for (object, privilege) in [
            (
                "cloudmig.assess(text, jsonb)",
                "has_function_privilege('public', 'cloudmig.assess(text, jsonb)', 'EXECUTE')",
            ),
            (
                "cloudmig.source_secret",
                "has_table_privilege('cloudmig_admin', 'cloudmig.source_secret', 'SELECT')",
            ),
            (
                "cloudmig.assessments",
                "has_table_privilege('cloudmig_admin', 'cloudmig.assessments', 'INSERT')",
            ),
        ] {
            let allowed = Spi::get_one::<bool>(&format!("SELECT {privilege}"));
            assert_eq!(allowed, Ok(Some(false)), "{object}");
        }
        let admin_reads = Spi::get_one::<bool>(
            "SELECT has_table_privilege('cloudmig_admin', 'cloudmig.assessment_report', 'SELECT') \
                AND has_function_privilege('cloudmig_admin', 'cloudmig.assess(text, jsonb)', 'EXECUTE')",
        );
        assert_eq!(admin_reads, Ok(Some(true)));
    }

    #[pg_test]
    fn the_secrets_table_is_left_out_of_dumps() {
        let dumped = Spi::get_one::<bool>(
            "SELECT 'cloudmig.source_secret'::regclass = ANY (extconfig) \
               FROM pg_extension WHERE extname = 'cloudmig'",
        );
        assert_eq!(dumped, Ok(Some(false)));
    }
}
