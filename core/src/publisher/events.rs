//! What amqprs tells us through its callbacks. The callbacks run on amqprs' own tasks; they
//! only forward an [`Event`] to the session loop, which decides what it means.

use amqprs::callbacks::{ChannelCallback, ConnectionCallback};
use amqprs::channel::Channel;
use amqprs::connection::Connection;
use amqprs::{Ack, BasicProperties, Cancel, Close, CloseChannel, Nack, Return};
use async_trait::async_trait;
use tokio::sync::mpsc::UnboundedSender;

#[derive(Debug)]
pub(super) enum Event {
    Ack {
        tag: u64,
        multiple: bool,
    },
    Nack {
        tag: u64,
        multiple: bool,
    },
    Returned {
        message_id: Option<String>,
        code: u16,
        text: String,
    },
    /// Code 0: the channel went away without the broker saying why.
    ChannelClosed {
        code: u16,
        text: String,
    },
    /// Code 0: not closed by the broker (a network failure, a missed heartbeat).
    ConnectionClosed {
        code: u16,
        text: String,
    },
}

/// Forwards every callback of a channel or a connection to one session loop.
pub(super) struct Forward(pub(super) UnboundedSender<Event>);

#[async_trait]
impl ChannelCallback for Forward {
    async fn close(&mut self, _: &Channel, close: CloseChannel) -> Result<(), amqprs::error::Error> {
        let _ =
            self.0.send(Event::ChannelClosed { code: close.reply_code(), text: close.reply_text().clone() });
        Ok(())
    }
    async fn cancel(&mut self, _: &Channel, _: Cancel) -> Result<(), amqprs::error::Error> {
        Ok(())
    }
    async fn flow(&mut self, _: &Channel, _active: bool) -> Result<bool, amqprs::error::Error> {
        Ok(true)
    }
    async fn publish_ack(&mut self, _: &Channel, ack: Ack) {
        let _ = self.0.send(Event::Ack { tag: ack.delivery_tag(), multiple: ack.mutiple() });
    }
    async fn publish_nack(&mut self, _: &Channel, nack: Nack) {
        let _ = self.0.send(Event::Nack { tag: nack.delivery_tag(), multiple: nack.multiple() });
    }
    async fn publish_return(&mut self, _: &Channel, ret: Return, props: BasicProperties, _: Vec<u8>) {
        let _ = self.0.send(Event::Returned {
            message_id: props.message_id().cloned(),
            code: ret.reply_code(),
            text: ret.reply_text().clone(),
        });
    }
}

#[async_trait]
impl ConnectionCallback for Forward {
    async fn close(&mut self, _: &Connection, close: Close) -> Result<(), amqprs::error::Error> {
        let _ = self.0.send(Event::ConnectionClosed {
            code: close.reply_code(),
            text: format!("closed by the broker: {} {}", close.reply_code(), close.reply_text()),
        });
        Ok(())
    }
    // amqprs does not announce the connection.blocked capability, so RabbitMQ never sends
    // these; a resource alarm shows as missing confirms (a timeout) instead.
    async fn blocked(&mut self, _: &Connection, _reason: String) {}
    async fn unblocked(&mut self, _: &Connection) {}
    async fn secret_updated(&mut self, _: &Connection) {}
}
