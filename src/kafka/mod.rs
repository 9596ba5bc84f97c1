//! The Kafka risk-signal source: a consumer group on the configured topics whose messages become
//! [`Signal`]s (through [`crate::risk_feed`]) in the same durable intake and engine as SETs.
//!
//! Delivery semantics, in order, per batch of messages:
//! 1. each message is normalized; one that cannot be (bad JSON, no subject, unmappable) is published
//!    to the dead-letter topic with its error in headers (kept in the store if that publish fails);
//! 2. the batch's signals are recorded in intake in one transaction (dedupe by `iss` = `kafka:<topic>`
//!    and `jti` = the message id or its partition/offset, so a redelivery records nothing new);
//! 3. recorded signals go to the engine through the same hand-off as SETs (replayed after a crash);
//! 4. only then are the offsets committed. A crash anywhere before 4 redelivers the batch, which
//!    step 2 absorbs: at-least-once delivery, exactly-once effect.
//!
//! A rebalance that takes partitions away first runs the batch in flight through all four steps
//! (from librdkafka's rebalance callback), so the next owner starts where this one stopped.
//!
//! The consumer runs on its own blocking thread (librdkafka's API is blocking, and so is the store's
//! group commit from a plain thread); it stops when Vigil shuts down, finishing its batch first.

mod consumer;
mod dead_letter;
mod source;

pub use consumer::{KafkaError, KafkaSource};
pub use dead_letter::{stored_dead_letters, StoredDeadLetter};
pub use source::FeedMessage;

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
