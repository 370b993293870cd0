//! pg_outbox: a transactional outbox inside PostgreSQL. `outbox.publish` writes an event in
//! the caller's transaction; a background worker publishes committed events to RabbitMQ and
//! removes them once the broker confirms. See README.md.
//!
//! Modules: `api` (the write path) with `aggregate_lock` and `encoding`; `gucs` (settings);
//! `shmem` (shared status); `commit_times` (for the latency metrics); `wake` (commit-time wake-up), `durability` (no event before its
//! transaction is durable) and `xact` (the transaction callback and utility hook every backend
//! gets); `launcher` and `worker` (background processes);
//! `signals` (signals, waits, I/O threads); `status` (SQL status functions). Everything that
//! needs no Postgres lives in the `pg_outbox_core` crate.

mod aggregate_lock;
mod api;
mod capture;
mod commit_times;
mod database;
mod durability;
mod encoding;
mod gucs;
mod launcher;
mod metrics;
mod shmem;
mod signals;
mod status;
mod wake;
mod worker;
mod xact;

use pgrx::prelude::*;

pgrx::pg_module_magic!();

pgrx::extension_sql_file!("../sql/schema.sql", name = "schema", bootstrap);
pgrx::extension_sql_file!(
    "../sql/api.sql",
    name = "api",
    requires = [
        "schema",
        status::worker_status,
        status::worker_available,
        status::wake_worker_at_commit,
        metrics::worker_retrying
    ]
);
pgrx::extension_sql_file!(
    "../sql/metrics.sql",
    name = "metrics",
    requires = ["api", metrics::metrics_text, metrics::worker_metrics]
);
pgrx::extension_sql_file!("../sql/capture.sql", name = "capture", requires = ["api"]);
pgrx::extension_sql_file!("../sql/inbox.sql", name = "inbox", requires = ["api"]);
pgrx::extension_sql_file!("../sql/stream.sql", name = "stream", requires = ["inbox", "capture", "metrics"]);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    gucs::init();
    xact::init();
    // SAFETY: a flag Postgres sets while it loads shared_preload_libraries.
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        shmem::init();
        wake::init_shared_memory();
        durability::init_shared_memory();
        commit_times::init_shared_memory();
        // pg_upgrade starts both the old and the new server in binary-upgrade mode: nothing
        // may publish from (or write to) a cluster being upgraded. Events wait in the outbox
        // table, which pg_upgrade carries over, for the first normal start.
        // SAFETY: a flag Postgres sets from the command line before loading libraries.
        if !unsafe { pg_sys::IsBinaryUpgrade } {
            launcher::register();
        }
    }
}

#[cfg(any(test, feature = "pg_test"))]
mod tests;

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![]
    }
}
