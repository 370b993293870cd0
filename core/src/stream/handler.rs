//! What the stream client tells a link, what a link tells its caller, and the link's hold on
//! its connection.
//!
//! The client calls its handler from tasks of its own, one spawned per frame, so two confirms
//! may arrive in either order, and a confirm may come after the connection was found closed.
//! The handler only forwards an [`Event`]; the link's loop decides what it means.

use super::link::Report;
use super::url::StreamUrl;
use rabbitmq_stream_client::types::MessageResult;
use rabbitmq_stream_client::{Client, RabbitMQStreamResult};
use rabbitmq_stream_protocol::ResponseKind;
use std::future::{ready, Ready};
use std::time::Duration;
use tokio::sync::mpsc::UnboundedSender;
use tokio::time::timeout;

#[derive(Debug, PartialEq)]
pub(super) enum Event {
    /// The broker stored these publishing ids (or dropped them as duplicates).
    Confirmed(Vec<u64>),
    /// The broker refused a message: the link is over.
    Refused { publishing_id: u64, code: String },
    /// The connection is lost, or the broker changed the stream under it: the link is over.
    Lost(String),
}

/// The client's handler for a link: forwards what concerns the link to its loop. (The
/// client's handler trait is not exported; it is implemented for such closures.)
pub(super) fn forward(
    events: UnboundedSender<Event>,
) -> impl FnOnce(MessageResult) -> Ready<RabbitMQStreamResult<()>> + Clone + Send + Sync + 'static {
    move |item| {
        if let Some(event) = event_of(item) {
            // The loop is gone when the link has ended: nothing left to tell.
            let _ = events.send(event);
        }
        ready(Ok(()))
    }
}

fn event_of(item: MessageResult) -> Option<Event> {
    Some(match item {
        Some(Ok(response)) => match response.kind() {
            ResponseKind::PublishConfirm(confirm) => Event::Confirmed(confirm.publishing_ids),
            ResponseKind::PublishError(error) => {
                let first = error.publishing_errors.first()?;
                Event::Refused { publishing_id: first.publishing_id, code: format!("{:?}", first.error_code) }
            }
            // Sent when the stream is deleted or its leader moves; its publishers go with it.
            ResponseKind::MetadataUpdate(update) => Event::Lost(format!("the stream changed ({update:?})")),
            _ => return None,
        },
        Some(Err(e)) => Event::Lost(format!("connection failed: {e}")),
        None => Event::Lost("the connection was closed".into()),
    })
}

/// The reason of a link that was aborted or dropped.
pub(super) const STOPPED: &str = "the link was stopped";

/// Sends a link's reports; the last is always one `Ended`, sent when the task is dropped if
/// not before.
pub(super) struct Reporter {
    stream: String,
    url: StreamUrl,
    reports: UnboundedSender<(String, Report)>,
    ended: bool,
}

impl Reporter {
    pub(super) fn new(
        stream: String,
        url: StreamUrl,
        reports: UnboundedSender<(String, Report)>,
    ) -> Reporter {
        Reporter { stream, url, reports, ended: false }
    }

    pub(super) fn send(&self, report: Report) {
        if !self.ended {
            let _ = self.reports.send((self.stream.clone(), report));
        }
    }

    pub(super) fn end(&mut self, end: End) {
        self.send(Report::Ended { reason: self.url.scrub(&end.reason), refused: end.refused });
        self.ended = true;
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.end(End::lost(STOPPED));
    }
}

/// Why a link ended.
pub(super) struct End {
    reason: String,
    refused: bool,
}

impl End {
    pub(super) fn lost(reason: impl Into<String>) -> End {
        End { reason: reason.into(), refused: false }
    }
    pub(super) fn refused(reason: impl Into<String>) -> End {
        End { reason: reason.into(), refused: true }
    }
}

/// How long closing a connection that is being dropped may take.
const DROP_CLOSE_WITHIN: Duration = Duration::from_secs(2);

/// A link's client. The client's own tasks keep its socket open after the last `Client` is
/// dropped (its reader holds a clone, its heartbeat task writes on), so dropping this closes
/// the connection, on a task of its own, unless [`Connection::close`] already did.
pub(super) struct Connection {
    pub(super) client: Client,
    runtime: tokio::runtime::Handle,
    closed: bool,
}

impl Connection {
    pub(super) fn new(client: Client) -> Connection {
        Connection { client, runtime: tokio::runtime::Handle::current(), closed: false }
    }

    /// Deletes the publisher (when `publisher` is set) and closes the connection, within
    /// `within` in all.
    pub(super) async fn close(&mut self, publisher: Option<u8>, within: Duration) {
        self.closed = true;
        let client = &self.client;
        let _ = timeout(within, async {
            if let Some(id) = publisher {
                let _ = client.delete_publisher(id).await;
            }
            let _ = client.close().await;
        })
        .await;
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if !self.closed {
            let client = self.client.clone();
            self.runtime.spawn(async move {
                let _ = timeout(DROP_CLOSE_WITHIN, client.close()).await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rabbitmq_stream_client::error::ClientError;
    use rabbitmq_stream_protocol::codec::{Decoder, Encoder};
    use rabbitmq_stream_protocol::commands::publish_confirm::PublishConfirm;
    use rabbitmq_stream_protocol::commands::publish_error::PublishErrorResponse;
    use rabbitmq_stream_protocol::types::PublishingError;
    use rabbitmq_stream_protocol::{Response, ResponseCode};

    /// A frame as the broker sends it: length, key, version, then the command.
    fn response(key: u16, command: impl Encoder) -> Response {
        let mut body = Vec::new();
        command.encode(&mut body).unwrap();
        let mut frame = ((body.len() + 4) as u32).to_be_bytes().to_vec();
        frame.extend(key.to_be_bytes());
        frame.extend(1u16.to_be_bytes());
        frame.extend(body);
        Response::decode(&frame).unwrap().1
    }

    #[test]
    fn confirms_errors_and_closes_become_events() {
        let confirm = response(3, PublishConfirm::new(1, vec![4, 5, 99]));
        assert_eq!(event_of(Some(Ok(confirm))), Some(Event::Confirmed(vec![4, 5, 99])));
        let errors = vec![PublishingError::new(7, ResponseCode::PublisherDoesNotExist)];
        let error = response(4, PublishErrorResponse::new(1, errors));
        assert_eq!(
            event_of(Some(Ok(error))),
            Some(Event::Refused { publishing_id: 7, code: "PublisherDoesNotExist".into() })
        );
        assert_eq!(event_of(Some(Ok(response(4, PublishErrorResponse::new(1, vec![]))))), None);
        assert!(matches!(event_of(None), Some(Event::Lost(_))));
        assert!(matches!(event_of(Some(Err(ClientError::ConnectionClosed))), Some(Event::Lost(_))));
    }

    #[test]
    fn a_link_ends_once_last_and_without_its_password() {
        let url = StreamUrl::parse("rabbitmq-stream://u:hunter2@h").unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut reporter = Reporter::new("s".into(), url.clone(), tx.clone());
        reporter.send(Report::Ready { sequence: 3 });
        reporter.end(End::refused("no hunter2 here"));
        reporter.send(Report::Confirmed(vec![4]));
        drop(reporter);
        drop(Reporter::new("t".into(), url, tx));
        let mut got = Vec::new();
        while let Ok(r) = rx.try_recv() {
            got.push(r);
        }
        let ended = |stream: &str, reason: &str, refused| {
            (stream.to_string(), Report::Ended { reason: reason.into(), refused })
        };
        assert_eq!(
            got,
            [
                ("s".to_string(), Report::Ready { sequence: 3 }),
                ended("s", "no ******** here", true),
                ended("t", STOPPED, false)
            ]
        );
    }
}
