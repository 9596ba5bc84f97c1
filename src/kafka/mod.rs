//! The Kafka risk-signal source: a consumer group on the configured topics whose messages become
//! [`Signal`](crate::signal::Signal)s (through [`crate::risk_feed`]) for the same engine as SETs.
//!
//! **The partition is the replay log.** Unlike a pushed SET (which is acknowledged with a 202 and
//! must therefore be recorded in intake first), a Kafka message is acknowledged by committing its
//! offset, and until then the broker keeps it. So nothing is recorded per message; per batch:
//! 1. each message is normalized; one that cannot be (bad JSON, no subject, unmappable) is published
//!    to the dead-letter topic with its error in headers (kept in the store if that publish fails);
//! 2. the signals get sequence numbers (drawn from intake's counter, so equal event times order
//!    across sources) and go to the engine's shards, one message per shard;
//! 3. each shard applies them in memory at once (decisions and grant changes are committed with its
//!    next batch as always) and writes the changed contexts at its next checkpoint (every 200 ms),
//!    then answers the batch;
//! 4. only then are the offsets committed, in batch order. A crash anywhere before 4 redelivers the
//!    batch, and re-applying a signal changes nothing (a fact with the same event time and value is
//!    not an update): at-least-once delivery, at-most-once effect.
//!
//! Batches are pipelined (the next is gathered while the engine commits the last); a failed batch
//! rewinds its partitions so it is delivered again rather than skipped. A rebalance that takes
//! partitions away first finishes every batch in flight and commits synchronously (from
//! librdkafka's rebalance callback), so the next owner starts where this one stopped.
//!
//! The consumer runs on its own blocking thread (librdkafka's API is blocking, and so are the waits
//! for the engine); it stops when Vigil shuts down, finishing its batches first.

mod consumer;
mod dead_letter;
mod health;
mod restores;
mod source;

pub use consumer::{KafkaError, KafkaSource, SignalForward, SourceFormat};
pub use dead_letter::{
    note_stored_dead_letters, stored_dead_letters, ProducerLogs, StoredDeadLetter,
    MAX_STORED_PAYLOAD,
};
pub use health::{KafkaHealth, KafkaView};
pub use restores::{Claim, PartitionHooks};
pub use source::{FeedMessage, SignalRecord};

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};

/// How long a request to a broker may go unanswered before librdkafka gives up on its
/// connection and makes a new one. Its default, a minute, let a fetch sent just before the brokers
/// went away and never answered (the connection outlived the outage) hold a partition's signals
/// back for most of a minute after the brokers were back — a revocation that late. Ten seconds is
/// still far above any broker's answer time (a fetch waits `fetch.wait.max.ms` at most, and that
/// is added to this).
const SOCKET_TIMEOUT_MS: &str = "10000";

/// The settings every Kafka client of Vigil's starts from: the brokers, Vigil's defaults, then
/// the operator's pass-through `properties`, which win.
pub fn client_config<'a>(
    brokers: &str,
    properties: impl Iterator<Item = (String, &'a str)>,
) -> ClientConfig {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", brokers.trim())
        .set("socket.timeout.ms", SOCKET_TIMEOUT_MS);
    for (name, value) in properties {
        client.set(name, value);
    }
    client
}

/// librdkafka's own log lines, into tracing (target `librdkafka`).
fn log_librdkafka(level: RDKafkaLogLevel, fac: &str, message: &str) {
    use RDKafkaLogLevel::*;
    match level {
        Emerg | Alert | Critical | Error => tracing::error!(target: "librdkafka", fac, "{message}"),
        Warning => tracing::warn!(target: "librdkafka", fac, "{message}"),
        Notice | Info => tracing::info!(target: "librdkafka", fac, "{message}"),
        Debug => tracing::debug!(target: "librdkafka", fac, "{message}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_give_up_on_an_unanswered_request_in_seconds_unless_the_operator_says_otherwise() {
        let client = client_config(" b1:9092,b2:9092 ", std::iter::empty());
        assert_eq!(client.get("bootstrap.servers"), Some("b1:9092,b2:9092"));
        assert_eq!(client.get("socket.timeout.ms"), Some(SOCKET_TIMEOUT_MS));
        let operator = [("socket.timeout.ms".to_owned(), "30000")];
        let client = client_config("b1:9092", operator.into_iter());
        assert_eq!(client.get("socket.timeout.ms"), Some("30000"));
    }
}
