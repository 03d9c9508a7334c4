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

pgrx::extension_sql!(
    r#"
REVOKE ALL ON FUNCTION cloudmig.assess(text, jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION cloudmig.assess(text, jsonb) TO cloudmig_admin;
REVOKE ALL ON FUNCTION cloudmig.status() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION cloudmig.status() TO cloudmig_admin;

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
