//! The broker link: no connection, or a group of `outbox.publishers` publishing sessions
//! running on the I/O thread, each on its own connection to the same node.
//!
//! - Which publisher publishes a message is fixed by its aggregate
//!   ([`OutboxMessage::publisher`]): an aggregate's events all go through one session, so its
//!   order and the one-unconfirmed-per-aggregate rule hold there. Commands are split
//!   accordingly ([`Link::send`]).
//! - A session that ends while its connection still works (the broker closed its channel) is
//!   started again alone; a lost connection takes the whole group down, and the next attempt
//!   starts at the next node of `outbox.amqp_url`, after the back-off ([`Reconnect`]).
//! - One connection attempt tries the nodes in turn, from the one it starts at, until one
//!   takes all the publishers.
//!
//! [`OutboxMessage::publisher`]: pg_outbox_core::message::OutboxMessage::publisher

use super::reconnect::Reconnect;
use super::settings::Settings;
use crate::signals;
use pg_outbox_core::message::publisher_for;
use pg_outbox_core::outcome::{Command, Outcome, Report, SessionEnd};
use pg_outbox_core::publisher::{Publisher, PublisherConfig};
use rand::Rng;
use std::time::{Duration, Instant};
use tokio::runtime::Runtime;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::task::JoinHandle;

/// Longest wait for more outcomes once one has arrived.
const COALESCE: Duration = Duration::from_millis(5);

struct Session {
    feed: UnboundedSender<Command>,
    task: JoinHandle<(Publisher, SessionEnd)>,
}

/// The running sessions, one per publisher, all connected to `node`.
struct Group {
    node: usize,
    sessions: Vec<Option<Session>>,
    reports: UnboundedReceiver<Report>,
    reports_tx: UnboundedSender<Report>,
}

/// What [`Link::ensure_session`] found.
pub enum Status {
    /// The sessions run; `Some` when they connected just now.
    Running(Option<Connected>),
    /// No session: why, when that is news (else waiting for the back-off).
    Down(Option<String>),
}

pub struct Connected {
    /// The node, as it may be shown (no password).
    pub node: String,
    pub frame_max: u32,
    pub declare_warning: Option<String>,
}

/// Which sessions ended, as [`Link::ended_sessions`] found them.
pub struct Ended {
    /// Their last outcomes (and any other that had arrived).
    pub reports: Vec<Report>,
    /// The publishers whose sessions ended (all of them when the group went down).
    pub publishers: Vec<usize>,
    /// Why the group went down, if it did.
    pub lost: Option<String>,
}

pub struct Link<'rt> {
    runtime: &'rt Runtime,
    group: Option<Group>,
    pub reconnect: Reconnect,
    /// The node the next connection attempt starts at.
    next_node: usize,
}

impl<'rt> Link<'rt> {
    pub fn new(runtime: &'rt Runtime, backoff_max: Duration) -> Self {
        Link { runtime, group: None, reconnect: Reconnect::new(backoff_max, Instant::now()), next_node: 0 }
    }

    pub fn is_running(&self) -> bool {
        self.group.is_some()
    }

    /// Publishers of the running group (messages are split among this many).
    pub fn publishers(&self) -> usize {
        self.group.as_ref().map_or(1, |g| g.sessions.len())
    }

    /// Outcomes that arrived, without waiting.
    pub fn reports(&mut self) -> Vec<Report> {
        let mut got = Vec::new();
        if let Some(group) = &mut self.group {
            while let Ok(r) = group.reports.try_recv() {
                got.push(r);
            }
        }
        self.note_confirms(&got);
        got
    }

    /// Waits up to `timeout` for outcomes without stopping the I/O thread. Once one has
    /// arrived, it gathers up to `enough` (for at most `COALESCE`), so that each transaction
    /// records many outcomes rather than one.
    pub fn wait_for_reports(&mut self, timeout: Duration, enough: usize) -> Vec<Report> {
        let Some(group) = &mut self.group else { return Vec::new() };
        let reports = &mut group.reports;
        let got = self.runtime.block_on(async {
            let mut got = Vec::new();
            match tokio::time::timeout(timeout, reports.recv()).await {
                Ok(Some(first)) => got.push(first),
                _ => return got,
            }
            let until = tokio::time::Instant::now() + COALESCE;
            while got.len() < enough {
                match tokio::time::timeout_at(until, reports.recv()).await {
                    Ok(Some(r)) => got.push(r),
                    _ => break,
                }
            }
            got
        });
        self.note_confirms(&got);
        got
    }

    fn note_confirms(&mut self, reports: &[Report]) {
        if reports.iter().any(|r| r.outcome == Outcome::Confirmed) {
            self.reconnect.confirmed();
        }
    }

    /// Notices sessions that ended: a session whose connection still works is started again
    /// at once; a lost connection ends the group (the next attempt starts at the next node).
    pub fn ended_sessions(&mut self, rng: &mut impl Rng) -> Option<Ended> {
        let group = self.group.as_mut()?;
        let finished: Vec<usize> = (0..group.sessions.len())
            .filter(|i| group.sessions[*i].as_ref().is_some_and(|s| s.task.is_finished()))
            .collect();
        if finished.is_empty() {
            return None;
        }
        let mut lost = None;
        for &i in &finished {
            let Some(Session { task, .. }) = group.sessions[i].take() else { continue };
            match self.runtime.block_on(task) {
                Ok((mut publisher, end)) => {
                    if let SessionEnd::ConnectionLost(l) = end {
                        lost.get_or_insert(l.reason);
                    } else if !publisher.is_connected() {
                        lost.get_or_insert_with(|| "lost the broker connection".into());
                    } else if lost.is_none() {
                        group.sessions[i] = Some(start(self.runtime, publisher, group.reports_tx.clone()));
                    }
                }
                Err(e) => {
                    lost.get_or_insert_with(|| format!("the publishing session failed: {e}"));
                }
            }
        }
        let mut reports = Vec::new();
        let publishers = if lost.is_some() {
            let mut group = self.group.take()?;
            self.next_node = group.node + 1;
            let all = (0..group.sessions.len()).collect();
            for session in group.sessions.drain(..).flatten() {
                // Stopped, not detached: nothing of it is published once the worker moved on.
                session.task.abort();
            }
            // After the aborts: every outcome that was sent counts.
            while let Ok(r) = group.reports.try_recv() {
                reports.push(r);
            }
            self.reconnect.lost(Instant::now(), rng);
            all
        } else {
            while let Ok(r) = group.reports.try_recv() {
                reports.push(r);
            }
            finished
        };
        self.note_confirms(&reports);
        Some(Ended { reports, publishers, lost })
    }

    /// Connects when needed and the back-off allows, and starts the sessions.
    pub fn ensure_session(&mut self, settings: &Settings, rng: &mut impl Rng) -> Status {
        if self.group.is_some() {
            return Status::Running(None);
        }
        let Some(config) = &settings.publisher else {
            return Status::Down(Some("outbox.amqp_url is not set".into()));
        };
        if !self.reconnect.may_connect(Instant::now()) {
            return Status::Down(None);
        }
        let nodes = settings.nodes.len().max(1);
        let mut errors = Vec::new();
        for k in 0..nodes {
            let node = (self.next_node + k) % nodes;
            let mut config = config.clone();
            if let Some(url) = settings.nodes.get(node) {
                config.url = url.clone();
            }
            match self.connect_all(&config, settings.publishers) {
                None => return Status::Down(None),
                Some(Err(e)) => errors.push(e),
                Some(Ok(publishers)) => {
                    self.reconnect.connected(Instant::now());
                    self.next_node = node;
                    let connected = Connected {
                        node: config.url.to_string(),
                        frame_max: publishers.iter().map(Publisher::frame_max).min().unwrap_or(0),
                        declare_warning: publishers.first().and_then(|p| p.declare_warning.clone()),
                    };
                    let (reports_tx, reports) = unbounded_channel();
                    let sessions = publishers
                        .into_iter()
                        .map(|p| Some(start(self.runtime, p, reports_tx.clone())))
                        .collect();
                    self.group = Some(Group { node, sessions, reports, reports_tx });
                    return Status::Running(Some(connected));
                }
            }
        }
        self.reconnect.failed(Instant::now(), rng);
        Status::Down(Some(errors.join("; ")))
    }

    /// `count` publishers to `config.url`, or why not; `None` when asked to stop meanwhile.
    fn connect_all(&self, config: &PublisherConfig, count: usize) -> Option<Result<Vec<Publisher>, String>> {
        let mut publishers = Vec::with_capacity(count);
        for i in 0..count {
            let mut config = config.clone();
            if count > 1 {
                config.connection_name =
                    format!("{}, publisher {} of {count}", config.connection_name, i + 1);
            }
            let connected = self.runtime.block_on(async {
                tokio::select! {
                    result = Publisher::connect(config) => Some(result),
                    _ = stop_or_leave() => None,
                }
            });
            let failed = match connected {
                Some(Ok(p)) => {
                    publishers.push(p);
                    continue;
                }
                Some(Err(e)) => Some(Err(e.to_string())),
                None => None,
            };
            for p in publishers {
                self.runtime.block_on(p.close());
            }
            return failed;
        }
        Some(Ok(publishers))
    }

    /// Hands a command to the sessions, each message to its aggregate's publisher. If a
    /// session has just ended its part is lost; the rows it carried are then read again.
    pub fn send(&self, command: Command) {
        let Some(group) = &self.group else { return };
        let n = group.sessions.len();
        let feed = |i: usize, command: Command| {
            if let Some(Some(session)) = group.sessions.get(i) {
                let _ = session.feed.send(command);
            }
        };
        if n == 1 {
            return feed(0, command);
        }
        match command {
            Command::Publish(handed) => {
                let mut parts: Vec<Vec<_>> = (0..n).map(|_| Vec::new()).collect();
                for h in handed {
                    parts[h.message.publisher(n)].push(h);
                }
                for (i, part) in parts.into_iter().enumerate().filter(|(_, p)| !p.is_empty()) {
                    feed(i, Command::Publish(part));
                }
            }
            Command::Release(keys) => {
                let mut parts: Vec<Vec<_>> = (0..n).map(|_| Vec::new()).collect();
                for key in keys {
                    parts[publisher_for(&key.0, &key.1, n)].push(key);
                }
                for (i, part) in parts.into_iter().enumerate().filter(|(_, p)| !p.is_empty()) {
                    feed(i, Command::Release(part));
                }
            }
        }
    }

    /// Ends the sessions without waiting for them (their rows belong to a table that is
    /// gone, or a round panicked). The next connection waits for the back-off like after any
    /// lost connection (short when this one had proved itself), so that nothing in the
    /// database can make the worker reconnect in a loop.
    pub fn abandon_session(&mut self, rng: &mut impl Rng) {
        if let Some(group) = self.group.take() {
            for session in group.sessions.into_iter().flatten() {
                // Stopped, not detached: nothing of it may be published from now on. Its
                // publisher (and connection) is dropped with it.
                session.task.abort();
            }
            self.reconnect.lost(Instant::now(), rng);
        }
    }

    /// Our own decision (new settings, a new table): connect again at once, from the first node.
    pub fn restart(&mut self, backoff_max: Duration) {
        self.reconnect.restart(backoff_max, Instant::now());
        self.next_node = 0;
    }

    /// Lets what is in flight be confirmed (for at most `grace` in all), closes the
    /// connections, and returns the last outcomes.
    pub fn close(&mut self, grace: Duration) -> Vec<Report> {
        let Some(mut group) = self.group.take() else { return Vec::new() };
        let sessions: Vec<Session> = group.sessions.drain(..).flatten().collect();
        let (feeds, tasks): (Vec<_>, Vec<_>) = sessions.into_iter().map(|s| (s.feed, s.task)).unzip();
        drop(feeds);
        let until = tokio::time::Instant::now() + grace;
        let mut last = Vec::new();
        for mut task in tasks {
            match self.runtime.block_on(tokio::time::timeout_at(until, &mut task)) {
                Ok(Ok((publisher, _))) => self.runtime.block_on(publisher.close()),
                // Still running after its grace: stopped, so that nothing of it is
                // published on the old connection after the worker moved on.
                Err(_) => task.abort(),
                Ok(Err(_)) => {}
            }
        }
        while let Ok(r) = group.reports.try_recv() {
            last.push(r);
        }
        last
    }
}

/// Resolves once the worker must stop, or leave its database (a command needs it alone):
/// connecting to nodes that do not answer can take longer than such a command waits.
async fn stop_or_leave() {
    // SAFETY: reads this process' database.
    let database = unsafe { pgrx::pg_sys::MyDatabaseId };
    loop {
        // Polled inside `block_on` on the main thread, the only one that may do either.
        if signals::stop_requested() || crate::database::wanted_alone(database) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn start(runtime: &Runtime, mut publisher: Publisher, reports_tx: UnboundedSender<Report>) -> Session {
    let (feed, mut feed_rx) = unbounded_channel();
    let task = runtime.spawn(async move {
        let end = publisher.run_session(&mut feed_rx, &reports_tx).await;
        (publisher, end)
    });
    Session { feed, task }
}
