//! A second RabbitMQ node with a TLS listener, started for a test and stopped on drop, beside
//! the machine's own broker (which it does not touch): its own node name, ports and data
//! directory, run as the `rabbitmq` user (whose Erlang cookie it shares). Its certificates are
//! made with openssl when it starts: a CA, a server certificate for the name `localhost` only
//! (so that `127.0.0.1` is the wrong name), a client certificate, and a second CA that signed
//! nothing.

use crate::cluster::free_port;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The PEM files a test configures the worker with.
pub struct Certificates {
    pub dir: PathBuf,
    /// The CA that signed the server and client certificates.
    pub ca: PathBuf,
    /// A CA that signed nothing here.
    pub other_ca: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("run openssl");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl Certificates {
    /// Makes the certificates in `dir` (created), readable by every user: the broker runs as
    /// `rabbitmq`, Postgres as `postgres`. Keys are throwaway.
    pub fn make(dir: &Path) -> Certificates {
        fs::create_dir_all(dir).unwrap();
        for ca in ["ca", "other-ca"] {
            openssl(
                dir,
                &[
                    "req",
                    "-x509",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-days",
                    "2",
                    "-keyout",
                    &format!("{ca}.key"),
                    "-out",
                    &format!("{ca}.pem"),
                    "-subj",
                    &format!("/CN=pg_outbox test {ca}"),
                ],
            );
        }
        for (name, usage, san) in
            [("server", "serverAuth", "subjectAltName=DNS:localhost\n"), ("client", "clientAuth", "")]
        {
            fs::write(
                dir.join(format!("{name}.ext")),
                format!("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage={usage}\n{san}"),
            )
            .unwrap();
            openssl(
                dir,
                &[
                    "req",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-keyout",
                    &format!("{name}.key"),
                    "-out",
                    &format!("{name}.csr"),
                    "-subj",
                    &format!("/CN=pg_outbox test {name}"),
                ],
            );
            openssl(
                dir,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &format!("{name}.csr"),
                    "-CA",
                    "ca.pem",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-days",
                    "2",
                    "-extfile",
                    &format!("{name}.ext"),
                    "-out",
                    &format!("{name}.pem"),
                ],
            );
        }
        let _ = Command::new("chmod").args(["-R", "a+rX", dir.to_str().unwrap()]).status();
        let certs = Certificates {
            dir: dir.to_path_buf(),
            ca: dir.join("ca.pem"),
            other_ca: dir.join("other-ca.pem"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
        };
        // The client's key as Postgres wants key files: the server's user's, for it alone.
        let key = certs.client_key.to_str().unwrap();
        let _ = Command::new("chown").args(["postgres", key]).status();
        let _ = Command::new("chmod").args(["600", key]).status();
        certs
    }
}

pub struct TlsNode {
    pub name: String,
    dir: PathBuf,
    /// Plain AMQP on 127.0.0.1, for the test's own consumer.
    pub amqp_port: u16,
    /// AMQP over TLS.
    pub tls_port: u16,
    pub certs: Certificates,
}

impl TlsNode {
    /// Starts the node; with `require_client_certificate`, a client must present a certificate
    /// signed by the CA (mutual TLS).
    pub fn start(require_client_certificate: bool) -> TlsNode {
        let id = format!("{}_{}", std::process::id(), free_port());
        let dir = std::env::temp_dir().join(format!("pg_outbox_tls_node_{id}"));
        let _ = fs::remove_dir_all(&dir);
        let certs = Certificates::make(&dir.join("certs"));
        let (amqp_port, tls_port, dist_port) = (free_port(), free_port(), free_port());
        fs::write(
            dir.join("rabbitmq.conf"),
            format!(
                "listeners.tcp.default = 127.0.0.1:{amqp_port}\n\
                 listeners.ssl.default = 127.0.0.1:{tls_port}\n\
                 ssl_options.cacertfile = {ca}\n\
                 ssl_options.certfile = {d}/server.pem\n\
                 ssl_options.keyfile = {d}/server.key\n\
                 ssl_options.verify = verify_peer\n\
                 ssl_options.fail_if_no_peer_cert = {require_client_certificate}\n\
                 loopback_users = none\n",
                ca = certs.ca.display(),
                d = certs.dir.display(),
            ),
        )
        .unwrap();
        fs::write(dir.join("enabled_plugins"), "[].\n").unwrap();
        // The node writes its data and logs under `dir`; the certificates stay as made (the
        // ones the broker reads are readable by everyone).
        let _ = Command::new("chown")
            .arg("rabbitmq:rabbitmq")
            .args([&dir, &dir.join("rabbitmq.conf"), &dir.join("enabled_plugins")])
            .status();
        let node = TlsNode { name: format!("pgo_tls_{id}@localhost"), dir, amqp_port, tls_port, certs };
        let started = node
            .command("rabbitmq-server")
            .arg("-detached")
            .env("RABBITMQ_DIST_PORT", dist_port.to_string())
            .status();
        assert!(started.map(|s| s.success()).unwrap_or(false), "could not start RabbitMQ node {}", node.name);
        let deadline = Instant::now() + Duration::from_secs(120);
        while std::net::TcpStream::connect(("127.0.0.1", node.amqp_port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "RabbitMQ node {} did not start; see {}",
                node.name,
                node.dir.display()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = node.command("rabbitmqctl").args(["-n", &node.name, "await_startup"]).status();
        node
    }

    /// A RabbitMQ command as the `rabbitmq` user, in this node's environment.
    fn command(&self, program: &str) -> Command {
        let mut c = Command::new("runuser");
        c.args(["-u", "rabbitmq", "--", program])
            .env("HOME", "/var/lib/rabbitmq")
            .env("RABBITMQ_NODENAME", &self.name)
            .env("RABBITMQ_NODE_PORT", self.amqp_port.to_string())
            .env("RABBITMQ_CONFIG_FILE", self.dir.join("rabbitmq"))
            .env("RABBITMQ_MNESIA_BASE", self.dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", self.dir.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", self.dir.join("enabled_plugins"))
            .env("RABBITMQ_PID_FILE", self.dir.join("node.pid"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        c
    }
}

impl Drop for TlsNode {
    fn drop(&mut self) {
        // With the pid file, `stop` returns once the node's VM has exited.
        let pid_file = self.dir.join("node.pid");
        let _ = self.command("rabbitmqctl").args(["-n", &self.name, "stop"]).arg(&pid_file).status();
        let _ = fs::remove_dir_all(&self.dir);
    }
}
