//! pg_outbox: a transactional outbox inside PostgreSQL. `outbox.publish` writes an event in
//! the caller's transaction; a background worker publishes committed events to RabbitMQ and
//! removes them once the broker confirms. See README.md.
//!
//! Modules: `api` (the write path), `gucs` (settings), `shmem` (shared status), `wakeup`
//! (commit-time wake-up), `launcher` and `worker` (background processes), `store` (the
//! worker's SQL), `signals` (signals, waits, I/O threads), `status` (SQL status functions).
//! Everything that needs no Postgres lives in the `pg_outbox_core` crate.

mod api;
mod gucs;
mod launcher;
mod shmem;
mod signals;
mod status;
mod store;
mod wakeup;
mod worker;

use pgrx::prelude::*;

pgrx::pg_module_magic!();

pgrx::extension_sql_file!("../sql/schema.sql", name = "schema", bootstrap);
pgrx::extension_sql_file!(
    "../sql/api.sql",
    name = "api",
    requires = ["schema", status::worker_status, status::worker_available, status::wake_worker_at_commit]
);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    gucs::init();
    wakeup::init();
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        shmem::init();
        launcher::register();
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
