//! A throwaway Postgres cluster with pg_outbox preloaded: initdb'd by an unprivileged user
//! (initdb refuses root) on a free port, in a directory of its own, stopped and removed on
//! drop. Tests can restart it, crash it and read its log.

use postgres::{Client, NoTls};
use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The directory of Postgres' programs: `pg_config --bindir` of `$PG_CONFIG`, or of the
/// `pg_config` on the PATH. `script/test` sets `PG_CONFIG` to the Postgres it built for.
pub fn pg_bin() -> &'static Path {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| crate::install::PgDirs::of(&crate::install::pg_config()).bin)
}
/// The database the worker serves in test clusters.
pub const DB: &str = "app";

pub struct Cluster {
    pub dir: PathBuf,
    pub port: u16,
    /// The directory of the Postgres programs this cluster runs: [`pg_bin`], unless made with
    /// [`Cluster::init_with_bin`] (a private installation, say).
    pub bin: PathBuf,
    keep: bool,
    /// Environment of the server process (beyond the harness' own, which has no Rust
    /// backtrace variables).
    server_env: Vec<(String, String)>,
}

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// Runs a Postgres binary, as `postgres` when we are root.
pub fn pg_command(bin: &str) -> Command {
    pg_command_in(pg_bin(), bin)
}

/// [`pg_command`] for the program `bin` of the installation whose programs are in `bin_dir`.
pub fn pg_command_in(bin_dir: &Path, bin: &str) -> Command {
    let path = bin_dir.join(bin);
    let mut c = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(&path);
        c
    } else {
        Command::new(path)
    };
    // A server started from `cargo test` would inherit it, and pgrx then adds a Rust
    // backtrace to the detail of every error that passes through the extension.
    c.env_remove("RUST_BACKTRACE").env_remove("RUST_LIB_BACKTRACE");
    c
}

fn run(mut c: Command) -> Output {
    let out = c.output().expect("run a postgres binary");
    assert!(
        out.status.success(),
        "{c:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A free port and an empty directory for a cluster on it, owned by the server's user. The
/// directory name ends with our pid, so that a later run can tell leftovers from live ones.
fn new_dir() -> (u16, PathBuf) {
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("pg_outbox_test_{port}_{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    if is_root() {
        run({
            let mut c = Command::new("chown");
            c.args(["postgres:postgres", dir.to_str().unwrap()]);
            c
        });
    }
    (port, dir)
}

/// `outbox.amqp_url` (as written in postgresql.conf) of the running RabbitMQ.
pub const BROKER_URL: &str = "'amqp://guest:guest@127.0.0.1:5672/%2F'";

/// An `outbox.amqp_url` where nothing listens; connection attempts fail fast.
pub fn unreachable_broker_url() -> String {
    format!("'amqp://guest:guest@127.0.0.1:{}/%2F?connection_timeout=500'", free_port())
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Retries a test can wait for: `max_attempts` attempts, 200 ms apart at first.
pub fn quick_retries(max_attempts: &'static str) -> [(&'static str, &'static str); 3] {
    [
        ("outbox.max_attempts", max_attempts),
        ("outbox.retry_backoff_base", "'200ms'"),
        ("outbox.retry_backoff_max", "'500ms'"),
    ]
}

/// Publishers per worker in this run's clusters (`OUTBOX_TEST_PUBLISHERS`, default 1). With
/// more than one, only each aggregate's events keep their order; events without an aggregate
/// may arrive in any order.
pub fn test_publishers() -> usize {
    std::env::var("OUTBOX_TEST_PUBLISHERS").ok().and_then(|v| v.parse().ok()).unwrap_or(1)
}

/// Settings every test cluster gets; a test adds or overrides with its own.
pub fn base_settings(port: u16, dir: &Path) -> Vec<(String, String)> {
    [
        ("port", port.to_string()),
        ("listen_addresses", "'127.0.0.1'".into()),
        ("unix_socket_directories", format!("'{}'", dir.display())),
        ("shared_preload_libraries", "'pg_outbox'".into()),
        ("outbox.database", format!("'{DB}'")),
        ("outbox.amqp_url", BROKER_URL.into()),
        ("outbox.poll_interval", "'1s'".into()),
        ("max_prepared_transactions", "10".into()),
        ("max_connections", "50".into()),
        ("shared_buffers", "'64MB'".into()),
        ("fsync", "on".into()),
        ("log_line_prefix", "'%m [%p] %b '".into()),
        // `OUTBOX_TEST_PUBLISHERS=4` runs a suite with that many publishers per worker.
        ("outbox.publishers", test_publishers().to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

impl Cluster {
    /// initdb, configure with `settings` (over [`base_settings`]), start, create database
    /// `app` and the extension in it.
    pub fn start(settings: &[(&str, &str)]) -> Cluster {
        Cluster::start_with_database(settings, "")
    }

    /// [`Cluster::start`], creating database `app` with `options` (`ENCODING 'LATIN1' ...`).
    pub fn start_with_database(settings: &[(&str, &str)], options: &str) -> Cluster {
        let cluster = Cluster::init(settings);
        cluster.start_server();
        cluster.admin().batch_execute(&format!("CREATE DATABASE {DB} {options}")).unwrap();
        cluster.client().batch_execute("CREATE EXTENSION pg_outbox").unwrap();
        cluster
    }

    /// Sets a variable in the server's environment from its next start on.
    pub fn set_server_env(&mut self, name: &str, value: &str) {
        self.server_env.push((name.to_string(), value.to_string()));
    }

    /// initdb and configure, without starting.
    pub fn init(settings: &[(&str, &str)]) -> Cluster {
        Cluster::init_with_bin(pg_bin(), settings)
    }

    /// [`Cluster::init`] with the Postgres whose programs are in `bin` (which must stay there
    /// until the cluster is dropped): the cluster runs from there from then on.
    pub fn init_with_bin(bin: &Path, settings: &[(&str, &str)]) -> Cluster {
        Cluster::init_with(bin, &[], settings)
    }

    /// [`Cluster::init_with_bin`], passing `initdb_args` to initdb too (`--data-checksums`).
    pub fn init_with(bin: &Path, initdb_args: &[&str], settings: &[(&str, &str)]) -> Cluster {
        let (port, dir) = new_dir();
        let data = dir.join("data");
        run({
            let mut c = pg_command_in(bin, "initdb");
            c.args(initdb_args);
            c.args([
                "-D",
                data.to_str().unwrap(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
            ]);
            c
        });
        let cluster = Cluster {
            dir,
            port,
            bin: bin.to_path_buf(),
            keep: std::env::var_os("OUTBOX_KEEP_CLUSTERS").is_some(),
            server_env: Vec::new(),
        };
        let mut all = base_settings(port, &cluster.dir);
        for (k, v) in settings {
            all.retain(|(key, _)| key != k);
            all.push((k.to_string(), v.to_string()));
        }
        let conf: String = all.iter().map(|(k, v)| format!("{k} = {v}\n")).collect();
        let path = data.join("postgresql.conf");
        let mut text = fs::read_to_string(&path).unwrap();
        text.push_str("\n# pg_outbox tests\n");
        text.push_str(&conf);
        fs::write(&path, text).unwrap();
        cluster
    }

    /// A hot standby of `primary`, made with pg_basebackup, with `settings` of its own.
    pub fn standby_of(primary: &Cluster, settings: &[(&str, &str)]) -> Cluster {
        let (port, dir) = new_dir();
        let data = dir.join("data");
        run({
            let mut c = primary.command("pg_basebackup");
            c.args(["-h", "127.0.0.1", "-p", &primary.port.to_string(), "-U", "postgres"]);
            c.args(["-D", data.to_str().unwrap(), "-R", "-X", "stream", "--no-sync", "--checkpoint=fast"]);
            c
        });
        let cluster =
            Cluster { dir, port, bin: primary.bin.clone(), keep: primary.keep, server_env: Vec::new() };
        let mut text = String::from("\n# standby\n");
        text.push_str(&format!("port = {port}\nunix_socket_directories = '{}'\n", cluster.dir.display()));
        for (k, v) in settings {
            text.push_str(&format!("{k} = {v}\n"));
        }
        let path = data.join("postgresql.conf");
        let mut conf = fs::read_to_string(&path).unwrap();
        conf.push_str(&text);
        fs::write(&path, conf).unwrap();
        cluster.start_server();
        cluster
    }

    /// Runs the program `bin` of this cluster's Postgres installation (see [`pg_command`]).
    pub fn command(&self, bin: &str) -> Command {
        pg_command_in(&self.bin, bin)
    }

    pub fn promote(&self) {
        run({
            let mut c = self.command("pg_ctl");
            c.args(["-D", self.data().to_str().unwrap(), "-w", "promote"]);
            c
        });
    }

    /// Lines of the server log that contain `text`.
    pub fn log_count(&self, text: &str) -> usize {
        self.log().lines().filter(|l| l.contains(text)).count()
    }

    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    pub fn start_server(&self) {
        run({
            let mut c = self.command("pg_ctl");
            for (k, v) in &self.server_env {
                c.env(k, v);
            }
            c.args([
                "-D",
                self.data().to_str().unwrap(),
                "-l",
                self.log_path().to_str().unwrap(),
                "-w",
                "-t",
                "60",
                "start",
            ]);
            c
        });
    }

    /// Fast shutdown.
    pub fn stop(&self) {
        self.pg_ctl_stop("fast");
    }

    /// Simulates a crash: immediate shutdown, no checkpoint; recovery runs at next start.
    pub fn crash(&self) {
        self.pg_ctl_stop("immediate");
    }

    fn pg_ctl_stop(&self, mode: &str) {
        let mut c = self.command("pg_ctl");
        c.args(["-D", self.data().to_str().unwrap(), "-m", mode, "-w", "-t", "60", "stop"]);
        let _ = c.output();
    }

    pub fn restart(&self) {
        self.stop();
        self.start_server();
    }

    /// Appends settings to postgresql.conf, without telling the server (stopped, say).
    pub fn reconfigure_file(&self, settings: &[(&str, &str)]) {
        let path = self.data().join("postgresql.conf");
        let mut text = fs::read_to_string(&path).unwrap();
        for (k, v) in settings {
            text.push_str(&format!("{k} = {v}\n"));
        }
        fs::write(&path, text).unwrap();
    }

    /// Appends settings to postgresql.conf and reloads.
    pub fn reconfigure(&self, settings: &[(&str, &str)]) {
        self.reconfigure_file(settings);
        self.admin().batch_execute("SELECT pg_reload_conf()").unwrap();
    }

    pub fn connect(&self, db: &str) -> Client {
        self.connect_as(db, "postgres")
    }

    pub fn connect_as(&self, db: &str, user: &str) -> Client {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match Client::connect(
                &format!("host=127.0.0.1 port={} user={user} dbname={db}", self.port),
                NoTls,
            ) {
                Ok(c) => return c,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => panic!("connect to test cluster: {e}"),
            }
        }
    }

    /// A connection to the served database.
    pub fn client(&self) -> Client {
        self.connect(DB)
    }

    pub fn admin(&self) -> Client {
        self.connect("postgres")
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Pid of the worker, once it is running.
    pub fn worker_pid(&self) -> Option<i32> {
        self.worker_pid_in(DB)
    }

    /// Pid of the worker, asked in database `db`.
    pub fn worker_pid_in(&self, db: &str) -> Option<i32> {
        self.connect(db)
            .query_opt("SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_outbox worker'", &[])
            .ok()
            .flatten()
            .map(|r| r.get(0))
    }

    pub fn broker_connected(&self) -> bool {
        self.client()
            .query_one("SELECT coalesce(broker_connected, false) FROM outbox.stats", &[])
            .unwrap()
            .get(0)
    }

    /// Points the worker at a broker that is not there, and waits until it has let go.
    pub fn cut_off_broker(&self) {
        self.reconfigure(&[("outbox.amqp_url", &unreachable_broker_url())]);
        wait_until(Duration::from_secs(60), "the worker to disconnect", || {
            (!self.broker_connected()).then_some(())
        });
    }

    /// Points the worker at the running RabbitMQ again.
    pub fn reconnect_broker(&self) {
        self.reconfigure(&[("outbox.amqp_url", BROKER_URL)]);
    }

    pub fn wait_for_worker(&self) -> i32 {
        wait_until(Duration::from_secs(60), "the worker to start", || self.worker_pid())
    }

    /// Rows awaiting publication.
    pub fn pending(&self) -> i64 {
        self.client().query_one("SELECT count(*) FROM outbox.messages", &[]).unwrap().get(0)
    }

    pub fn wait_drained(&self, within: Duration) {
        wait_until(within, "the outbox to drain", || (self.pending() == 0).then_some(()));
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.pg_ctl_stop("immediate");
        if !self.keep && !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("test cluster kept in {}", self.dir.display());
        }
    }
}

/// Polls `f` until it returns `Some`, or panics after `within`.
pub fn wait_until<T>(within: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {within:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
