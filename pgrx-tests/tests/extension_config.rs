//! End to end: rows an extension marks as its configuration (`pg_extension_config_dump`) are
//! migrated as pg_dump would: pg_cron's jobs arrive, replacing what CREATE EXTENSION put here.

use cloudmig_e2e::migration::{self, wait_phase as wait};
use cloudmig_e2e::ClusterBuilder;

#[test]
fn pg_cron_jobs_are_migrated_with_their_extension() {
    let source = ClusterBuilder::source("extconfig-src")
        .conf("shared_preload_libraries = 'pg_cron'")
        .conf("cron.database_name = 'app'")
        .init_sql("CREATE DATABASE app")
        .start();
    source.execute(
        "app",
        "CREATE EXTENSION pg_cron;
         SELECT cron.schedule('nightly-vacuum', '0 3 * * *', 'VACUUM');
         SELECT cron.schedule('hourly-report', '0 * * * *', $$SELECT 'report'$$);
         SELECT cron.unschedule('hourly-report');
         SELECT cron.schedule('weekly', '0 4 * * 0', 'ANALYZE');",
    );
    let dest = ClusterBuilder::destination("extconfig-dst")
        .conf("shared_preload_libraries = 'cloudmig, pg_cron'")
        .conf("cron.database_name = 'app'")
        .start();
    let task = migration::start_task(&dest, &source, "{}");
    wait(&dest, task, "incremental");

    let jobs =
        "SELECT string_agg(format('%s %s %s %s', jobid, jobname, schedule, command), E'\\n' \
                ORDER BY jobid) FROM cron.job";
    let on_source: String = source.query_scalar("app", jobs);
    let here: String = dest.query_scalar("app", jobs);
    assert_eq!(here, on_source);
    // The job id sequence went along: a job scheduled here gets the next id.
    let next: i64 = dest.query_scalar(
        "app",
        "SELECT cron.schedule('after', '0 5 * * *', 'VACUUM')",
    );
    let last: i64 = source.query_scalar("app", "SELECT max(jobid) FROM cron.job");
    assert!(
        next > last,
        "job id {next} reuses one of the source's (up to {last})"
    );
}
