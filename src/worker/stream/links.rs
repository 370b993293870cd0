//! A lane's link: starting it (tagged reports), what it reports, closing it when idle.

use super::super::state::Worker;
use super::lane::{self, Lane, LaneState, Sent};
use super::{CONNECT_TIMEOUT, MAX_LANES};
use pg_outbox_core::stream::{self, LinkConfig, Report, StreamLink};
use pgrx::pg_sys;
use std::time::Instant;
use tokio::sync::mpsc::unbounded_channel;

/// Reports of the links, in the order they came.
pub(super) fn take_reports(w: &mut Worker<'_>, now: Instant) {
    let mut reports = std::mem::take(&mut w.streams.waiting);
    while let Ok(r) = w.streams.reports.try_recv() {
        reports.push(r);
    }
    // SAFETY: reads the clock.
    let settled_at = unsafe { pg_sys::GetCurrentTimestamp() };
    for (stream, link, report) in reports {
        let Some(lane) =
            w.streams.lanes.get_mut(&stream).filter(|l| l.link_number == link && l.link.is_some())
        else {
            continue;
        };
        match report {
            Report::Ready { sequence } => {
                lane.reconnect.connected(now);
                lane.state = LaneState::Recovering(sequence);
                if lane.last_error.take().is_some() {
                    pgrx::log!("pg_outbox: publishing to stream \"{stream}\" again");
                }
            }
            Report::Confirmed(ids) => {
                lane.reconnect.confirmed();
                for id in ids {
                    if let Some(Sent { row_id, mut meter }) = lane.in_flight.remove(&id) {
                        meter.settled_at = settled_at;
                        w.streams.outcomes.confirmed.push(row_id);
                        w.streams.outcomes.confirmed_meters.push(meter);
                    }
                }
            }
            Report::Ended { reason, refused } => {
                let reason = w.settings.scrub(&reason);
                lane.ended(now, &mut w.rng);
                let kind = if refused { "stream refused" } else { "stream connection" };
                if lane.last_error.as_deref() != Some(reason.as_str()) {
                    pgrx::warning!("pg_outbox: publishing to stream \"{stream}\" stopped, retrying with back-off: {reason}");
                    lane.last_error = Some(reason.clone());
                }
                w.status.failed_attempt(kind, &reason, &lane.exchange);
            }
        }
    }
}

/// Starts a lane for each stream that has events and none (within `MAX_LANES`), and
/// reconnects lanes that are down once their back-off allows.
pub(super) fn start_lanes(w: &mut Worker<'_>, url: &stream::StreamUrl, found: Vec<String>, now: Instant) {
    for exchange in found {
        let Some(name) = stream::stream_of(&exchange) else { continue };
        if let Some(lane) = w.streams.lanes.get_mut(name) {
            lane.busy_at = now;
            continue;
        }
        if w.streams.lanes.len() >= MAX_LANES {
            continue;
        }
        let lane = Lane::new(&exchange, name, w.settings.reconnect_backoff_max, now);
        w.streams.lanes.insert(name.to_string(), lane);
    }
    let database = w.streams.database.clone().unwrap_or_default();
    for lane in w.streams.lanes.values_mut() {
        if lane.link.is_some() || !matches!(lane.state, LaneState::Down) || !lane.reconnect.may_connect(now) {
            continue;
        }
        if let Err(reason) = stream::check_stream_name(&lane.stream) {
            pgrx::warning!("pg_outbox: cannot publish to stream \"{}\": {reason}", lane.stream);
            lane.reconnect.failed(now, &mut w.rng);
            continue;
        }
        let config = LinkConfig {
            url: url.clone(),
            stream: lane.stream.clone(),
            producer: stream::producer_name(&database, &lane.stream),
            connect_timeout: CONNECT_TIMEOUT,
            confirm_timeout: w.settings.confirm_timeout,
            max_frame_bytes: 0,
        };
        w.streams.links_started += 1;
        let number = w.streams.links_started;
        // The link's reports, tagged with its stream and number.
        let (tx, mut rx) = unbounded_channel::<(String, Report)>();
        let (all, stream) = (w.streams.reports_tx.clone(), lane.stream.clone());
        w.streams.runtime.spawn(async move {
            while let Some((_, report)) = rx.recv().await {
                if all.send((stream.clone(), number, report)).is_err() {
                    break;
                }
            }
        });
        lane.link_number = number;
        lane.link = Some(StreamLink::start(w.streams.runtime.handle(), config, tx));
        lane.state = LaneState::Connecting;
    }
}

/// Lanes with nothing to do for a while close their connection; a lane down with nothing to
/// do goes away.
pub(super) fn close_idle(w: &mut Worker<'_>, now: Instant) {
    let runtime = w.streams.runtime;
    w.streams.lanes.retain(|_, lane| {
        lane.close_if_idle(now, runtime);
        // A lane that failed stays, with its back-off; one closed for idleness may go.
        let idle = now.duration_since(lane.busy_at) >= lane::IDLE_CLOSE;
        !(lane.link.is_none() && lane.last_error.is_none() && idle)
    });
}
