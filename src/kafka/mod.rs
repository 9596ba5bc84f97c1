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
pub use dead_letter::{stored_dead_letters, ProducerLogs, StoredDeadLetter};
pub use health::{KafkaHealth, KafkaView};
pub use restores::{Claim, PartitionHooks};
pub use source::{FeedMessage, SignalRecord};

use rdkafka::config::RDKafkaLogLevel;

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
