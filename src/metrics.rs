//! SQL functions behind `outbox.metrics` (sql/metrics.sql): the samples the worker keeps in
//! shared memory, and the view's rows in Prometheus' text format. Reading them costs the same
//! whatever the outbox holds: nothing here scans a table.

use crate::{gucs, shmem};
use pg_outbox_core::metrics::{exposition, ExchangeTotals, Histogram, Metrics, Sample};
use pgrx::prelude::*;

/// One row of `outbox.worker_metrics()`: name, type, help, exchange, le, value.
type Row = (String, String, String, Option<String>, Option<String>, f64);
/// A counter kept per exchange: its name, help, and where it is in the totals.
type PerExchange = (&'static str, &'static str, fn(&ExchangeTotals) -> u64);

fn row(name: &str, kind: &str, help: &str, exchange: Option<&str>, le: Option<&str>, value: f64) -> Row {
    (name.into(), kind.into(), help.into(), exchange.map(Into::into), le.map(Into::into), value)
}

fn histogram(rows: &mut Vec<Row>, name: &str, help: &str, h: &Histogram) {
    for (le, count) in h.cumulative() {
        rows.push(row(&format!("{name}_bucket"), "histogram", help, None, Some(&le), count as f64));
    }
    rows.push(row(&format!("{name}_sum"), "histogram", help, None, None, h.sum_seconds()));
    rows.push(row(&format!("{name}_count"), "histogram", help, None, None, h.count() as f64));
}

/// The samples of the worker of database `status`, grouped by family.
fn samples(status: &shmem::WorkerStatus, default_exchange: &str) -> Vec<Row> {
    let m: &Metrics = &status.metrics;
    let mut rows = Vec::new();
    let up = status.pid > 0;
    rows.push(row(
        "outbox_worker_up",
        "gauge",
        "1 while the worker of this database runs.",
        None,
        None,
        f64::from(u8::from(up)),
    ));
    rows.push(row(
        "outbox_broker_connected",
        "gauge",
        "1 while the worker is connected to the broker.",
        None,
        None,
        f64::from(u8::from(up && status.broker_connected)),
    ));
    let per_exchange: [PerExchange; 3] = [
        ("outbox_published_total", "Events the broker confirmed, since the server started.", |e| e.published),
        (
            "outbox_failed_attempts_total",
            "Failed attempts to publish an event (each retried or dead-lettered).",
            |e| e.failed_attempts,
        ),
        ("outbox_dead_lettered_total", "Events moved to outbox.dead_letters.", |e| e.dead_lettered),
    ];
    for (name, help, value) in per_exchange {
        let mut any = false;
        for e in m.exchanges() {
            any = true;
            rows.push(row(name, "counter", help, Some(e.name()), None, value(e) as f64));
        }
        if !any {
            rows.push(row(name, "counter", help, Some(default_exchange), None, 0.0));
        }
    }
    rows.push(row(
        "outbox_broker_connections_total",
        "counter",
        "Connections to the broker the worker opened.",
        None,
        None,
        m.connections as f64,
    ));
    let reconnects = m.connections.saturating_sub(1);
    rows.push(row(
        "outbox_reconnects_total",
        "counter",
        "Connections to the broker opened after the first one since the server started.",
        None,
        None,
        reconnects as f64,
    ));
    rows.push(row(
        "outbox_broker_connect_failures_total",
        "counter",
        "Attempts to connect to the broker that failed.",
        None,
        None,
        m.connect_failures as f64,
    ));
    rows.push(row(
        "outbox_in_flight",
        "gauge",
        "Events handed to publishers and not yet confirmed.",
        None,
        None,
        m.in_flight as f64,
    ));
    rows.push(row(
        "outbox_retrying",
        "gauge",
        "Events waiting for a retry, as the worker last counted.",
        None,
        None,
        m.retrying as f64,
    ));
    histogram(
        &mut rows,
        "outbox_commit_to_confirm_seconds",
        "From an event's commit to the broker's confirm.",
        &m.commit_to_confirm,
    );
    histogram(
        &mut rows,
        "outbox_wait_seconds",
        "From an event's commit until the worker hands it to a publisher.",
        &m.wait,
    );
    rows
}

/// The worker's samples for the caller's database (shared memory only); `outbox.metrics`
/// adds the database's own gauges.
#[pg_extern(volatile, parallel_safe)]
#[allow(clippy::type_complexity)]
fn worker_metrics() -> TableIterator<
    'static,
    (
        name!(name, String),
        name!(type, String),
        name!(help, String),
        name!(exchange, Option<String>),
        name!(le, Option<String>),
        name!(value, f64),
    ),
> {
    let status = shmem::status().unwrap_or_default();
    TableIterator::new(samples(&status, &gucs::exchange()))
}

/// Events waiting for a retry, as the worker of the caller's database last counted them: what
/// `outbox.stats` shows everyone (the other samples are for monitoring roles).
#[pg_extern(volatile, parallel_safe)]
fn worker_retrying() -> i64 {
    shmem::status().map(|s| s.metrics.retrying).unwrap_or_default()
}

/// `outbox.metrics` in the Prometheus text exposition format (version 0.0.4), for a scraper
/// that runs SQL or a file collector.
#[pg_extern(volatile)]
fn metrics_text() -> String {
    let rows: Vec<Sample> = Spi::connect(|c| {
        let table = c.select(
            "SELECT name, type, help, database, exchange, le, value FROM outbox.metrics",
            None,
            &[],
        )?;
        let mut rows = Vec::new();
        for r in table {
            let mut labels = Vec::new();
            for (ordinal, label) in [(4, "database"), (5, "exchange"), (6, "le")] {
                if let Some(v) = r.get::<String>(ordinal)? {
                    labels.push((label.to_string(), v));
                }
            }
            rows.push(Sample {
                name: r.get::<String>(1)?.unwrap_or_default(),
                kind: r.get::<String>(2)?.unwrap_or_default(),
                help: r.get::<String>(3)?.unwrap_or_default(),
                labels,
                value: r.get::<f64>(7)?.unwrap_or(f64::NAN),
            });
        }
        Ok::<_, pgrx::spi::SpiError>(rows)
    })
    .unwrap_or_else(|e| error!("pg_outbox could not read outbox.metrics: {e}"));
    exposition(&rows)
}
