//! The broker link: no connection, a connection between sessions, or a publishing session
//! running on the I/O thread; and when the next connection attempt may be made.
//!
//! However a connection ends (refused, cut, closed by the broker after a message it would not
//! take), the next attempt waits for the back-off: it starts short (250 ms, with jitter) and
//! doubles up to `outbox.reconnect_backoff_max`, and only a connection that proved itself (a
//! confirm came back, or it stayed up a while) starts it over. So nothing can make the worker
//! reconnect in a loop.

use crate::signals;
use pg_outbox_core::outcome::{Command, Outcome, Report, SessionEnd};
use pg_outbox_core::publisher::{Publisher, PublisherConfig};
use pg_outbox_core::retry::Backoff;
use rand::Rng;
use std::time::{Duration, Instant};
use tokio::runtime::Runtime;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::task::JoinHandle;

const BACKOFF_BASE: Duration = Duration::from_millis(250);
/// A connection up this long without trouble has proved itself.
const HEALTHY_AFTER: Duration = Duration::from_secs(30);
/// Longest wait for more outcomes once one has arrived.
const COALESCE: Duration = Duration::from_millis(5);

/// When the next connection attempt may be made. Pure.
#[derive(Debug)]
pub struct Reconnect {
    backoff: Backoff,
    next_attempt: Instant,
    up_since: Option<Instant>,
    proven: bool,
}

impl Reconnect {
    pub fn new(max: Duration, now: Instant) -> Reconnect {
        Reconnect {
            backoff: Backoff::new(BACKOFF_BASE, max),
            next_attempt: now,
            up_since: None,
            proven: false,
        }
    }

    pub fn may_connect(&self, now: Instant) -> bool {
        now >= self.next_attempt
    }

    pub fn next_attempt(&self) -> Instant {
        self.next_attempt
    }

    /// An attempt to connect failed.
    pub fn failed(&mut self, now: Instant, rng: &mut impl Rng) {
        self.up_since = None;
        self.next_attempt = now + self.backoff.next_delay(rng);
    }

    pub fn connected(&mut self, now: Instant) {
        self.up_since = Some(now);
        self.proven = false;
    }

    /// The broker confirmed a message: the connection works.
    pub fn confirmed(&mut self) {
        self.proven = true;
    }

    /// The connection ended.
    pub fn lost(&mut self, now: Instant, rng: &mut impl Rng) {
        let healthy = self.proven || self.up_since.is_some_and(|t| now.duration_since(t) >= HEALTHY_AFTER);
        if healthy {
            self.backoff.reset();
        }
        self.failed(now, rng);
    }

    pub fn set_max(&mut self, max: Duration) {
        self.backoff.set_max(max);
    }

    /// Our own decision (new settings, a new table): connect again at once.
    pub fn restart(&mut self, max: Duration, now: Instant) {
        *self = Reconnect::new(max, now);
    }
}

enum State {
    Down,
    Idle(Box<Publisher>),
    Running(Running),
}

struct Running {
    feed: UnboundedSender<Command>,
    reports: UnboundedReceiver<Report>,
    task: JoinHandle<(Publisher, SessionEnd)>,
}

/// What [`Link::ensure_session`] found.
pub enum Status {
    /// A session runs; `Some` when it connected just now.
    Running(Option<Connected>),
    /// No session: why, when that is news (else waiting for the back-off).
    Down(Option<String>),
}

pub struct Connected {
    pub frame_max: u32,
    pub declare_warning: Option<String>,
}

pub struct Link<'rt> {
    runtime: &'rt Runtime,
    state: State,
    pub reconnect: Reconnect,
}

impl<'rt> Link<'rt> {
    pub fn new(runtime: &'rt Runtime, backoff_max: Duration) -> Self {
        Link { runtime, state: State::Down, reconnect: Reconnect::new(backoff_max, Instant::now()) }
    }

    pub fn is_running(&self) -> bool {
        matches!(self.state, State::Running(_))
    }

    /// Outcomes that arrived, without waiting.
    pub fn reports(&mut self) -> Vec<Report> {
        let mut got = Vec::new();
        if let State::Running(running) = &mut self.state {
            while let Ok(r) = running.reports.try_recv() {
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
        let State::Running(running) = &mut self.state else { return Vec::new() };
        let reports = &mut running.reports;
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

    /// Notices a session that ended: its last outcomes, and how it ended. The connection is
    /// kept for the next session when it still works.
    pub fn ended_session(&mut self, rng: &mut impl Rng) -> Option<(Vec<Report>, SessionEnd)> {
        if !matches!(&self.state, State::Running(r) if r.task.is_finished()) {
            return None;
        }
        let State::Running(Running { mut reports, task, .. }) =
            std::mem::replace(&mut self.state, State::Down)
        else {
            return None;
        };
        let ended = self.runtime.block_on(task);
        let mut last = Vec::new();
        while let Ok(r) = reports.try_recv() {
            last.push(r);
        }
        self.note_confirms(&last);
        let end = match ended {
            Ok((mut publisher, end)) => {
                if publisher.is_connected() && !matches!(end, SessionEnd::ConnectionLost(_)) {
                    self.state = State::Idle(Box::new(publisher));
                } else {
                    self.reconnect.lost(Instant::now(), rng);
                }
                end
            }
            Err(e) => {
                self.reconnect.lost(Instant::now(), rng);
                SessionEnd::ConnectionLost(pg_outbox_core::outcome::Lost::network(format!(
                    "the publishing session failed: {e}"
                )))
            }
        };
        Some((last, end))
    }

    /// Connects when needed and the back-off allows, and starts a session.
    pub fn ensure_session(&mut self, config: Option<&PublisherConfig>, rng: &mut impl Rng) -> Status {
        let mut lost = None;
        match std::mem::replace(&mut self.state, State::Down) {
            State::Running(running) => {
                self.state = State::Running(running);
                return Status::Running(None);
            }
            State::Idle(mut publisher) => {
                if publisher.is_connected() {
                    self.state = self.start(*publisher);
                    return Status::Running(None);
                }
                drop(publisher);
                self.reconnect.lost(Instant::now(), rng);
                lost = Some("lost the broker connection".to_string());
            }
            State::Down => {}
        }
        let Some(config) = config else { return Status::Down(Some("outbox.amqp_url is not set".into())) };
        if !self.reconnect.may_connect(Instant::now()) {
            return Status::Down(lost);
        }
        match self.connect(config.clone()) {
            None => Status::Down(lost),
            Some(Err(e)) => {
                self.reconnect.failed(Instant::now(), rng);
                Status::Down(Some(e))
            }
            Some(Ok(publisher)) => {
                self.reconnect.connected(Instant::now());
                let connected = Connected {
                    frame_max: publisher.frame_max(),
                    declare_warning: publisher.declare_warning.clone(),
                };
                self.state = self.start(publisher);
                Status::Running(Some(connected))
            }
        }
    }

    /// `None` when asked to stop while connecting.
    fn connect(&self, config: PublisherConfig) -> Option<Result<Publisher, String>> {
        let connected = self.runtime.block_on(async {
            tokio::select! {
                result = Publisher::connect(config) => Some(result),
                _ = signals::stop_requested_async() => None,
            }
        })?;
        Some(connected.map_err(|e| e.to_string()))
    }

    fn start(&self, mut publisher: Publisher) -> State {
        let (feed, mut feed_rx) = unbounded_channel();
        let (reports_tx, reports) = unbounded_channel();
        let task = self.runtime.spawn(async move {
            let end = publisher.run_session(&mut feed_rx, &reports_tx).await;
            (publisher, end)
        });
        State::Running(Running { feed, reports, task })
    }

    /// Hands a command to the session. If the session has just ended the command is lost;
    /// the rows it carried are then read again.
    pub fn send(&self, command: Command) {
        if let State::Running(running) = &self.state {
            let _ = running.feed.send(command);
        }
    }

    /// Ends the session without waiting for it (its rows belong to a table that is gone);
    /// connects again at once.
    pub fn abandon_session(&mut self, backoff_max: Duration) {
        match std::mem::replace(&mut self.state, State::Down) {
            // Stopped, not detached: nothing of it may be published from now on. Its publisher
            // (and connection) is dropped with it.
            State::Running(running) => running.task.abort(),
            other => self.state = other,
        }
        self.reconnect.restart(backoff_max, Instant::now());
    }

    /// Lets what is in flight be confirmed (for at most `grace`), closes the connection,
    /// and returns the last outcomes.
    pub fn close(&mut self, grace: Duration) -> Vec<Report> {
        let mut last = Vec::new();
        match std::mem::replace(&mut self.state, State::Down) {
            State::Running(Running { feed, mut reports, mut task }) => {
                drop(feed);
                let finished = self.runtime.block_on(tokio::time::timeout(grace, &mut task));
                while let Ok(r) = reports.try_recv() {
                    last.push(r);
                }
                match finished {
                    Ok(Ok((publisher, _))) => self.runtime.block_on(publisher.close()),
                    // Still running after its grace: stopped, so that nothing of it is
                    // published on the old connection after the worker moved on.
                    Err(_) => task.abort(),
                    Ok(Err(_)) => {}
                }
            }
            State::Idle(publisher) => self.runtime.block_on(publisher.close()),
            State::Down => {}
        }
        last
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn a_connection_that_keeps_failing_backs_off_however_it_ends() {
        let mut rng = StdRng::seed_from_u64(7);
        let t0 = Instant::now();
        let mut r = Reconnect::new(Duration::from_secs(30), t0);
        assert!(r.may_connect(t0));
        // Connected, then closed by the broker at once, again and again (a message it refuses):
        // the waits grow, never shorter than the back-off's first step.
        let mut now = t0;
        let mut waits = Vec::new();
        for _ in 0..8 {
            r.connected(now);
            r.lost(now + Duration::from_millis(5), &mut rng);
            let wait = r.next_attempt().duration_since(now + Duration::from_millis(5));
            assert!(wait >= BACKOFF_BASE / 2, "{wait:?}");
            waits.push(wait);
            now = r.next_attempt();
        }
        assert!(waits[7] >= Duration::from_secs(15), "{waits:?}");
        // Connection attempts that fail grow the same back-off.
        r.failed(now, &mut rng);
        assert!(r.next_attempt().duration_since(now) >= Duration::from_secs(15));
    }

    #[test]
    fn a_proven_connection_starts_the_back_off_over() {
        let mut rng = StdRng::seed_from_u64(8);
        let t0 = Instant::now();
        let mut r = Reconnect::new(Duration::from_secs(30), t0);
        for _ in 0..6 {
            r.failed(t0, &mut rng);
        }
        r.connected(t0);
        r.confirmed();
        r.lost(t0, &mut rng);
        assert!(r.next_attempt().duration_since(t0) <= BACKOFF_BASE, "short again after a confirm");
        assert!(!r.may_connect(t0), "but never at once");
        r.connected(t0);
        r.lost(t0 + HEALTHY_AFTER, &mut rng);
        assert!(
            r.next_attempt().duration_since(t0 + HEALTHY_AFTER) <= BACKOFF_BASE,
            "or after a long healthy spell"
        );
        r.restart(Duration::from_secs(30), t0);
        assert!(r.may_connect(t0));
    }
}
