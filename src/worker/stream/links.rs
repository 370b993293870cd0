//! A lane's link: starting it (tagged reports), what it reports, closing it when idle.

use super::super::state::Worker;
use super::lane::{Lane, LaneState, Sent};
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

/// The lanes follow the streams that have events waiting (`found`): a lane goes away once its
/// stream has none and its link is closed; a new stream gets a lane (up to `MAX_LANES`); a lane
/// that is down reconnects once its back-off allows, if its stream has events; a lane with
/// nothing to do for `IDLE_CLOSE` closes its connection.
pub(super) fn follow_streams(w: &mut Worker<'_>, url: &stream::StreamUrl, found: Vec<String>, now: Instant) {
    let wanted: Vec<&str> = found.iter().filter_map(|e| stream::stream_of(e)).collect();
    let runtime = w.streams.runtime;
    w.streams.lanes.retain(|name, lane| {
        if wanted.contains(&name.as_str()) {
            lane.busy_at = now;
        }
        lane.close_if_idle(now, runtime);
        lane.link.is_some() || !lane.in_flight.is_empty() || wanted.contains(&name.as_str())
    });
    for exchange in &found {
        let Some(name) = stream::stream_of(exchange) else { continue };
        if !w.streams.lanes.contains_key(name) && w.streams.lanes.len() < MAX_LANES {
            let lane = Lane::new(exchange, name, w.settings.reconnect_backoff_max, now);
            w.streams.lanes.insert(name.to_string(), lane);
        }
    }
    let database = w.streams.database.clone().unwrap_or_default();
    for lane in w.streams.lanes.values_mut() {
        let due = matches!(lane.state, LaneState::Down) && lane.reconnect.may_connect(now);
        if lane.link.is_some() || !due || !wanted.contains(&lane.stream.as_str()) {
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
        lane.busy_at = now;
    }
}
