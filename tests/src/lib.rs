//! Test harness for pg_outbox: real Postgres clusters with the extension preloaded, the real
//! RabbitMQ, a consumer that records what arrived, and ways to break each of them.

pub mod broker;
pub mod cluster;
pub mod cluster_node;
pub mod install;
pub mod load;
pub mod proxy;
pub mod stream;
pub mod tls_node;

pub use broker::{dedup, unique, Broker, BrokerOutage, Consumer, Delivery};
pub use cluster::{
    quick_retries, test_publishers, unreachable_broker_url, wait_until, Cluster, BROKER_URL, DB,
};
pub use load::{verify, Load, LoadSpec, Verdict};
pub use proxy::Proxy;
pub use stream::{
    producer_name, stream_exchange, stream_publishers, wait_for_stream_port, OwnStream, STREAM_PORT,
    STREAM_URL,
};
pub use tls_node::{Certificates, TlsNode};

/// The repository's root directory.
pub fn repo() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

/// One of the repository's scripts (`script/package`, ...), run from its root. What `cargo
/// test` tells a test about its own crate is removed from the environment: it would reach the
/// cargo inside the script, and build scripts that watch those names (ring's) would rerun, a
/// rebuild of the TLS stack there and again at the next build outside.
pub fn repo_script(name: &str) -> std::process::Command {
    let mut script = std::process::Command::new(repo().join("script").join(name));
    script.current_dir(repo());
    for (var, _) in std::env::vars_os() {
        let var = var.to_string_lossy();
        let per_crate = ["CARGO_PKG_", "CARGO_MANIFEST_", "CARGO_CRATE_NAME", "CARGO_BIN_NAME"];
        let per_run = ["CARGO_PRIMARY_PACKAGE", "CARGO_TARGET_TMPDIR", "OUT_DIR"];
        if per_crate.iter().any(|p| var.starts_with(p)) || per_run.contains(&var.as_ref()) {
            script.env_remove(var.as_ref());
        }
    }
    script
}

/// Serializes tests that stop the shared broker or load the machine, so they do not disturb
/// each other. Poisoning is ignored: one failed test must not fail the rest.
pub fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}
