//! Extra RabbitMQ nodes joined to the machine's broker (`rabbit@localhost`) to form a cluster
//! for a test, and taken out of it again on drop, so that the machine's node is alone again.
//! Each runs beside the machine's node as the `rabbitmq` user (whose Erlang cookie it shares),
//! with its own node name, AMQP and distribution ports and data directory, and no plugins.
//!
//! The directory `pg_outbox_cluster_node_<pid>_<port>` and the node name
//! `pgo_cl_<pid>_<port>@localhost` (`<port>` is its AMQP port) carry the test process' pid, so that `script/test` can stop
//! and forget the nodes of a test process that died.

use crate::cluster::free_port;
use std::fs;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The machine's node, the one the extra nodes join.
pub const MACHINE_NODE: &str = "rabbit@localhost";

/// How long any one `rabbitmqctl` or `rabbitmq-server` call may take before it is killed.
const COMMAND_TIMEOUT: &str = "120";

/// How long a node may take to start, join or serve again.
const STARTUP: Duration = Duration::from_secs(120);

pub struct ClusterNode {
    name: String,
    dir: PathBuf,
    port: u16,
    dist_port: u16,
}

/// Runs `program` (a RabbitMQ command) as the `rabbitmq` user, with `env`, killed after
/// [`COMMAND_TIMEOUT`] seconds.
fn rabbitmq_command(program: &str, env: &[(&str, String)]) -> Command {
    let mut c = Command::new("timeout");
    c.args([COMMAND_TIMEOUT, "runuser", "-u", "rabbitmq", "--", program])
        .env("HOME", "/var/lib/rabbitmq")
        .stdin(Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

/// `rabbitmqctl -n <node> <args>`.
fn ctl(node: &str, args: &[&str]) -> Output {
    rabbitmq_command("rabbitmqctl", &[]).args(["-n", node]).args(args).output().expect("run rabbitmqctl")
}

fn ok(out: &Output) -> bool {
    out.status.success()
}

fn describe(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// The machine node's view of the cluster: (members, running members).
pub fn cluster_members() -> (Vec<String>, Vec<String>) {
    try_cluster_members().expect("rabbitmqctl cluster_status")
}

fn try_cluster_members() -> Result<(Vec<String>, Vec<String>), String> {
    let out = ctl(MACHINE_NODE, &["cluster_status", "--formatter", "json"]);
    if !ok(&out) {
        return Err(describe(&out));
    }
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
    let names = |key: &str| -> Vec<String> {
        status[key].as_array().into_iter().flatten().filter_map(|n| n.as_str().map(String::from)).collect()
    };
    let mut members = names("disk_nodes");
    members.extend(names("ram_nodes"));
    Ok((members, names("running_nodes")))
}

impl ClusterNode {
    /// Starts one extra node and joins it to the machine's node; returns once the machine's
    /// node lists it as running.
    pub fn join() -> ClusterNode {
        ClusterNode::join_many(1).0.pop().unwrap()
    }

    /// Starts `n` extra nodes (in parallel) and joins them all to the machine's node.
    pub fn join_many(n: usize) -> ClusterNodes {
        let started = Instant::now();
        // Booting a node is the slow part (several seconds): all at once.
        let nodes = in_parallel(n, ClusterNode::start);
        let booted = started.elapsed();
        // One join at a time: each changes the cluster's membership.
        for node in &nodes {
            node.expect_ctl(&["stop_app"]);
            node.expect_ctl(&["reset"]);
            node.expect_ctl(&["join_cluster", MACHINE_NODE]);
        }
        // Starting the application again (syncing with the cluster) is slow too: all at once.
        std::thread::scope(|s| {
            let handles: Vec<_> = nodes.iter().map(|node| s.spawn(move || node.start_app())).collect();
            for h in handles {
                if let Err(panic) = h.join() {
                    std::panic::resume_unwind(panic);
                }
            }
        });
        wait_for(STARTUP, "the machine's node to list the new nodes as running", || {
            let (_, running) = cluster_members();
            nodes.iter().all(|node| running.contains(&node.name))
        });
        println!(
            "{n} RabbitMQ node(s) joined {MACHINE_NODE} in {:.1?} (booted in {booted:.1?}): {}",
            started.elapsed(),
            nodes
                .iter()
                .map(|node| format!("{} on port {}", node.name, node.port))
                .collect::<Vec<_>>()
                .join(", ")
        );
        ClusterNodes(nodes)
    }

    /// Boots the node (not clustered yet) and waits until it serves AMQP.
    fn start() -> ClusterNode {
        let port = free_port();
        let id = format!("{}_{port}", std::process::id());
        let dir = std::env::temp_dir().join(format!("pg_outbox_cluster_node_{id}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let node = ClusterNode { name: format!("pgo_cl_{id}@localhost"), dir, port, dist_port: free_port() };
        fs::write(
            node.dir.join("rabbitmq.conf"),
            format!("listeners.tcp.default = 127.0.0.1:{}\nloopback_users = none\n", node.port),
        )
        .unwrap();
        fs::write(node.dir.join("enabled_plugins"), "[].\n").unwrap();
        let chown = Command::new("chown").arg("-R").arg("rabbitmq:rabbitmq").arg(&node.dir).status();
        assert!(chown.map(|s| s.success()).unwrap_or(false), "chown {}", node.dir.display());
        // The script itself, not Debian's wrapper of it, which would write the node's output
        // over the machine node's startup log.
        let script = "/usr/lib/rabbitmq/bin/rabbitmq-server";
        let server = if std::path::Path::new(script).exists() { script } else { "rabbitmq-server" };
        let out = rabbitmq_command(server, &node.env())
            .arg("-detached")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        assert!(out.map(|s| s.success()).unwrap_or(false), "could not start RabbitMQ node {}", node.name);
        node.wait_serving();
        node
    }

    /// Where this node's settings, data and logs are.
    fn env(&self) -> Vec<(&'static str, String)> {
        let path = |p: &str| self.dir.join(p).display().to_string();
        vec![
            ("RABBITMQ_NODENAME", self.name.clone()),
            ("RABBITMQ_NODE_PORT", self.port.to_string()),
            ("RABBITMQ_DIST_PORT", self.dist_port.to_string()),
            ("RABBITMQ_CONFIG_FILE", path("rabbitmq")),
            ("RABBITMQ_MNESIA_BASE", path("mnesia")),
            ("RABBITMQ_LOG_BASE", path("log")),
            ("RABBITMQ_ENABLED_PLUGINS_FILE", path("enabled_plugins")),
            ("RABBITMQ_PID_FILE", path("node.pid")),
        ]
    }

    fn expect_ctl(&self, args: &[&str]) {
        let out = ctl(&self.name, args);
        assert!(
            ok(&out),
            "rabbitmqctl -n {} {args:?}: {}\nlogs in {}",
            self.name,
            describe(&out),
            self.dir.display()
        );
    }

    /// Waits until the node accepts connections on its AMQP port and says it has started.
    fn wait_serving(&self) {
        wait_for(
            STARTUP,
            &format!("RabbitMQ node {} to serve AMQP (logs in {})", self.name, self.dir.display()),
            || TcpStream::connect(("127.0.0.1", self.port)).is_ok(),
        );
        self.expect_ctl(&["await_startup"]);
    }

    /// The node's plain AMQP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `pgo_cl_<pid>_<port>@localhost`.
    pub fn node_name(&self) -> &str {
        &self.name
    }

    /// An AMQP URL of this node (guest, vhost `/`), unquoted.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2F", self.port)
    }

    /// Resident memory of the node's Erlang VM, in MB (0 if it is not running).
    pub fn resident_mb(&self) -> u64 {
        let pid = fs::read_to_string(self.dir.join("node.pid")).unwrap_or_default();
        let status = fs::read_to_string(format!("/proc/{}/status", pid.trim())).unwrap_or_default();
        let kb = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
        kb.unwrap_or(0) / 1024
    }

    /// Whether the machine's stream coordinator lists this node among its members.
    pub fn in_stream_coordinator(&self) -> bool {
        let out = ctl(MACHINE_NODE, &["eval", "ra:members({rabbit_stream_coordinator, node()}, 5000)."]);
        ok(&out) && describe(&out).contains(&self.name)
    }

    /// Stops the RabbitMQ application: the node stays a member of the cluster but serves
    /// nothing; the connections to it are closed.
    pub fn stop_app(&self) {
        self.expect_ctl(&["stop_app"]);
    }

    /// Starts the application again and waits until the node serves AMQP.
    pub fn start_app(&self) {
        self.expect_ctl(&["start_app"]);
        self.wait_serving();
    }
}

impl Drop for ClusterNode {
    fn drop(&mut self) {
        // The machine's stream coordinator (a Raft cluster over every node) may have taken this
        // node in: take it out while every member still runs, and stop the node's application
        // at once (a running node would be taken in again). Stopped first, it would leave the
        // machine's node a minority of the coordinator, unable to change its membership, and
        // refusing every new stream.
        let leave = format!(
            "ra:remove_member({{rabbit_stream_coordinator, node()}}, {{rabbit_stream_coordinator, '{0}'}}), \
             rpc:call('{0}', rabbit, stop, []).",
            self.name
        );
        let _ = ctl(MACHINE_NODE, &["eval", &leave]);
        // Leave the cluster (reset wipes the node's data and tells the others), then stop; with
        // the pid file, `stop` returns once the node's VM has exited.
        let _ = ctl(&self.name, &["stop_app"]);
        let _ = ctl(&self.name, &["reset"]);
        let _ = ctl(&self.name, &["stop", &self.dir.join("node.pid").display().to_string()]);
        // A node that could not leave (it died, say) is still a member: the machine's node
        // forgets it, or it would wait for it at its own next start.
        let member = try_cluster_members().map(|(members, _)| members.contains(&self.name));
        if member.unwrap_or(true) {
            let out = ctl(MACHINE_NODE, &["forget_cluster_node", &self.name]);
            if !ok(&out) {
                eprintln!("could not make {MACHINE_NODE} forget {}: {}", self.name, describe(&out));
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
        repair_stream_coordinator();
    }
}

/// How many times [`repair_stream_coordinator`] had to take members out of the coordinator or
/// start it over, in this process.
pub static COORDINATOR_REPAIRS: AtomicUsize = AtomicUsize::new(0);

/// `tests/rabbitmq/stream-coordinator-repair.erl` (read it for why): if the machine's node is
/// alone, its stream coordinator's other members are removed, or the coordinator starts over.
/// Says so when it did; never panics (it runs in `Drop`).
pub fn repair_stream_coordinator() {
    let expression = concat!(env!("CARGO_MANIFEST_DIR"), "/rabbitmq/stream-coordinator-repair.erl");
    let Ok(file) = fs::File::open(expression) else { return };
    let Ok(out) =
        rabbitmq_command("rabbitmqctl", &[]).args(["-n", MACHINE_NODE, "eval"]).stdin(file).output()
    else {
        return;
    };
    let said = describe(&out);
    let repaired = said.contains("repaired") || said.contains("removed");
    if repaired {
        COORDINATOR_REPAIRS.fetch_add(1, Ordering::Relaxed);
    }
    if !ok(&out) || repaired {
        eprintln!("{MACHINE_NODE}'s stream coordinator: {}", said.trim());
    }
}

/// Nodes joined together by [`ClusterNode::join_many`]; they leave the cluster together when
/// dropped.
pub struct ClusterNodes(Vec<ClusterNode>);

impl std::ops::Deref for ClusterNodes {
    type Target = [ClusterNode];
    fn deref(&self) -> &[ClusterNode] {
        &self.0
    }
}

impl Drop for ClusterNodes {
    fn drop(&mut self) {
        // One at a time: the stream coordinator takes one membership change at a time, and
        // each needs a majority of its members running.
        for node in self.0.drain(..) {
            drop(node);
        }
    }
}

/// Runs `job` `n` times, each in a thread of its own; returns the results, or, if one panicked,
/// drops the others' results (nodes stop) and panics the same way.
fn in_parallel<T: Send>(n: usize, job: fn() -> T) -> Vec<T> {
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..n).map(|_| s.spawn(job)).collect();
        handles.into_iter().map(|h| h.join()).collect()
    });
    let mut done = Vec::new();
    let mut failure = None;
    for r in results {
        match r {
            Ok(v) => done.push(v),
            Err(panic) => failure = failure.or(Some(panic)),
        }
    }
    if let Some(panic) = failure {
        drop(done);
        std::panic::resume_unwind(panic);
    }
    done
}

fn wait_for(within: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "timed out after {within:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}
