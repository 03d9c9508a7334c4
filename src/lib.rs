//! cloudmig: move a whole PostgreSQL instance into this one, driven from SQL.
//!
//! This file only wires the parts together: the module magic, `_PG_init`
//! (refuse to load outside `shared_preload_libraries`, register the GUCs and
//! the shared memory), and the hand-written catalog SQL. Each part lives in
//! its own folder:
//!
//! | module     | owns                                                             |
//! |------------|------------------------------------------------------------------|
//! | `api`      | the SQL functions, thin: validate, call below, map errors        |
//! | `assess`   | the feasibility checks: facts gathered, then judged              |
//! | `catalog`  | typed access to cloudmig's own tables; the task phase machine    |
//! | `apply`    | the source's changes applied through the executor, per table     |
//! | `copy`     | table data, sequences, large objects: source to local tables     |
//! | `owner`    | source-defined code runs with its table owner's rights           |
//! | `schema`   | pg_dump/pg_dumpall: running them, applying their output here     |
//! | `source`   | the wire client for the source server (plain Rust, no pgrx)      |
//! | `worker`   | background workers and the shared memory they report through     |
//! | `guc`      | every setting, with its documentation                            |

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;

pub mod api;
pub mod apply;
pub mod assess;
pub mod catalog;
pub mod copy;
pub mod guc;
pub mod owner;
pub mod schema;
pub mod source;
pub mod worker;

::pgrx::pg_module_magic!();

pgrx::extension_sql_file!("../sql/catalog.sql", name = "catalog", bootstrap);
pgrx::extension_sql_file!("../sql/tasks.sql", name = "tasks", requires = ["catalog"]);
pgrx::extension_sql_file!("../sql/ddl.sql", name = "ddl", requires = ["tasks"]);

/// Called when the library is loaded. cloudmig keeps live state in shared
/// memory and (for resumable migrations) a launcher worker, both of which can
/// only be set up while the postmaster preloads the library.
#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    // SAFETY: read-only access to a postmaster global during library load.
    let preloading = unsafe { pg_sys::process_shared_preload_libraries_in_progress };
    if !preloading {
        ErrorReport::new(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "cloudmig must be loaded via shared_preload_libraries",
            function_name!(),
        )
        .set_hint(
            "Add cloudmig to shared_preload_libraries in postgresql.conf and restart the server.",
        )
        .report(PgLogLevel::ERROR);
    }
    guc::register();
    worker::shared::init();
    worker::launcher::register();
}

/// Hooks for `cargo pgrx test`: its throwaway cluster must preload us, as a
/// real destination does.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec!["shared_preload_libraries = 'cloudmig'"]
    }
}
