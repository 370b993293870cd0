//! A TCP proxy between the worker and RabbitMQ that a test can cut: every open connection is
//! dropped at once, and new ones can be refused for a while (a network partition).

use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

pub struct Proxy {
    pub port: u16,
    refusing: Arc<AtomicBool>,
    stalled: Arc<AtomicBool>,
    /// While non-zero, each connection is cut once the client has sent this many bytes.
    cut_after: Arc<AtomicU64>,
    open: Arc<Mutex<Vec<TcpStream>>>,
    /// Connections accepted (and forwarded) so far.
    pub accepted: Arc<AtomicU64>,
    /// Connections closed at once because the proxy was refusing.
    pub refused: Arc<AtomicU64>,
}

impl Proxy {
    pub fn start(upstream_port: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let refusing = Arc::new(AtomicBool::new(false));
        let stalled = Arc::new(AtomicBool::new(false));
        let cut_after = Arc::new(AtomicU64::new(0));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(AtomicU64::new(0));
        let refused = Arc::new(AtomicU64::new(0));
        let (r, o, a, st, rf, ca) = (
            refusing.clone(),
            open.clone(),
            accepted.clone(),
            stalled.clone(),
            refused.clone(),
            cut_after.clone(),
        );
        thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if r.load(Ordering::SeqCst) {
                    rf.fetch_add(1, Ordering::SeqCst);
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream_port)) else { continue };
                a.fetch_add(1, Ordering::SeqCst);
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                {
                    let mut open = o.lock().unwrap();
                    open.push(client.try_clone().unwrap());
                    open.push(server.try_clone().unwrap());
                }
                pipe(client.try_clone().unwrap(), server.try_clone().unwrap(), None, Some(ca.clone()));
                // Only the broker's answers stall: publishes go through, confirms do not.
                pipe(server, client, Some(st.clone()), None);
            }
        });
        Proxy { port, refusing, stalled, cut_after, open, accepted, refused }
    }

    /// Drops every open connection.
    pub fn cut(&self) {
        for s in self.open.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// While refusing, new connections are closed at once.
    pub fn refuse(&self, on: bool) {
        self.refusing.store(on, Ordering::SeqCst);
    }

    /// While stalled, nothing the broker sends reaches the client (no confirms, no
    /// heartbeats), though the connection stays open: a hung broker.
    pub fn stall(&self, on: bool) {
        self.stalled.store(on, Ordering::SeqCst);
    }

    /// While `Some(n)`, every connection is cut as soon as the client has sent more than `n`
    /// bytes on it: past the AMQP handshake, at the first publish (a broker that drops every
    /// connection that publishes).
    pub fn cut_after(&self, bytes: Option<u64>) {
        self.cut_after.store(bytes.unwrap_or(0), Ordering::SeqCst);
    }

    pub fn url(&self) -> String {
        format!("'amqp://guest:guest@127.0.0.1:{}/%2F?heartbeat=5&connection_timeout=2000'", self.port)
    }
}

fn pipe(
    mut from: TcpStream,
    mut to: TcpStream,
    stalled: Option<Arc<AtomicBool>>,
    cut_after: Option<Arc<AtomicU64>>,
) {
    use std::io::{Read, Write};
    thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        let mut sent = 0u64;
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            sent += n as u64;
            let limit = cut_after.as_ref().map_or(0, |c| c.load(Ordering::SeqCst));
            if limit > 0 && sent > limit {
                break;
            }
            while stalled.as_ref().is_some_and(|s| s.load(Ordering::SeqCst)) {
                thread::sleep(Duration::from_millis(10));
            }
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Both);
        let _ = from.shutdown(std::net::Shutdown::Both);
    });
}

/// Sleeps; a readable name for fault scripts.
pub fn pause(ms: u64) {
    thread::sleep(Duration::from_millis(ms));
}
