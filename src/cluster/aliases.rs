//! The cluster's alias table: which principal each registered identifier (email, `iss_sub`,
//! phone, session, device, token …) names. An owner that links identifiers to a principal writes
//! them to `<name>.aliases` with its state ([`super::StateLog`]); every instance reads the whole
//! topic into its engine, so whichever instance receives a signal naming any of a principal's
//! identifiers routes it to that principal's partition — its owner.
//!
//! Two registrations that race on the same new identifier each link it on their owner; the topic
//! orders the two links, and the last one wins on every instance (a compacted topic keeps exactly
//! that one, so an instance that starts later reads the same answer). A link the owner forgot
//! with its principal (context retention) is a tombstone: every instance drops it, and a
//! compacted topic drops it too.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use tokio::sync::watch;

use super::{topics, ClusterError};
use crate::config::ClusterConfig;
use crate::engine::Engine;

/// How long start-up waits for the alias table to be read up to its end.
const CATCH_UP: Duration = Duration::from_secs(30);

/// Starts reading the alias topic into `engine` (a thread, until `shutdown`); returns once what
/// the topic held at the start is read (or after 30 s, with a warning), so signals this
/// instance takes from then on are routed by the whole table.
pub async fn follow(
    config: &ClusterConfig,
    topic: &str,
    instance: &str,
    engine: Arc<Engine>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), ClusterError> {
    let consumer = topics::whole_topic_reader(config, topic, instance)?;
    let end = consumer
        .fetch_watermarks(topic, 0, Duration::from_secs(10))
        .map_err(|e| ClusterError::Brokers(format!("{topic}: {e}")))?
        .1;
    let (caught_up, wait) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("vigil-aliases".into())
        .spawn(move || read(&consumer, &engine, end, caught_up, &shutdown))
        .map_err(|e| ClusterError::Brokers(e.to_string()))?;
    if tokio::time::timeout(CATCH_UP, wait).await.is_err() {
        tracing::warn!(%topic, "the alias table was not read to its end in time; signals naming an identifier not yet read may reach the wrong instance until it is");
    }
    Ok(())
}

/// Reads links into `engine`; says `caught_up` once it has read the records before `end`.
fn read(
    consumer: &BaseConsumer,
    engine: &Engine,
    end: i64,
    caught_up: tokio::sync::oneshot::Sender<()>,
    shutdown: &watch::Receiver<bool>,
) {
    let mut caught_up = Some(caught_up);
    if end <= 0 {
        if let Some(tx) = caught_up.take() {
            let _ = tx.send(());
        }
    }
    topics::read_until(consumer, shutdown, "the alias topic", |message| {
        let key = message.key().and_then(|k| std::str::from_utf8(k).ok());
        let principal = message.payload().and_then(|p| std::str::from_utf8(p).ok());
        match (key, principal) {
            (Some(alias), Some(principal)) if !principal.is_empty() => {
                engine.learn_alias(alias, principal);
            }
            // A tombstone: the owner forgot the link with its principal (context retention).
            (Some(alias), None) if message.payload().is_none() => engine.unlearn_alias(alias),
            _ => tracing::warn!(
                offset = message.offset(),
                "an unreadable record on the alias topic"
            ),
        }
        if message.offset() + 1 >= end {
            if let Some(tx) = caught_up.take() {
                let _ = tx.send(());
            }
        }
    });
}
