//! One consumed message, owned (so a batch outlives librdkafka's borrowed buffers), and the
//! decision of how it becomes a signal: through its topic's mapping, or the native format.

use std::collections::HashMap;

use crate::risk_feed::{self, FeedError, Mapping, Origin};
use crate::signal::Signal;

/// Batches smaller than this are normalized on the calling thread: a thread costs more than it saves.
const PARALLEL_MIN: usize = 512;

/// A message taken from a partition.
#[derive(Debug, Clone)]
pub struct FeedMessage {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    /// The broker's or producer's timestamp (ms): the event time of a message that names none.
    pub timestamp_ms: Option<i64>,
}

/// Turns messages into signals by topic.
#[derive(Debug, Clone, Default)]
pub struct Normalizer {
    mappings: HashMap<String, Mapping>,
    max_future_skew_secs: u64,
    /// Receipt times, and the event-time window's anchor when a message's timestamp is not sane.
    clock: crate::clock::Clock,
    /// Cluster mode's signals topic, whose records are [`SignalRecord`]s.
    signals_topic: Option<String>,
}

/// A record of cluster mode's signals topic: a signal validated and normalized by the instance
/// that received it (its receipt time, clamped event time and all), with the SET it came in (empty
/// for a risk-feed message re-keyed onto the topic).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SignalRecord {
    pub signal: Signal,
    pub token: String,
}

impl SignalRecord {
    /// The sequence number of the signal at `offset` of its partition: its offset, counted from
    /// 1 (0 means "not from a log"). A partition is one principal's only log, so its offsets
    /// order that principal's signals wherever they are applied — by an owner, by the next owner
    /// after a handover, or by a replay reading the partition back.
    pub fn seq_at(offset: i64) -> u64 {
        u64::try_from(offset).map_or(0, |o| o.saturating_add(1))
    }
}

impl Normalizer {
    pub fn new(
        mappings: &[Mapping],
        max_future_skew_secs: u64,
        clock: crate::clock::Clock,
    ) -> Normalizer {
        Normalizer {
            mappings: mappings
                .iter()
                .map(|m| (m.topic.clone(), m.clone()))
                .collect(),
            max_future_skew_secs,
            clock,
            signals_topic: None,
        }
    }

    /// Reads `topic`'s records as [`SignalRecord`]s (cluster mode's signals topic).
    pub fn with_signals_topic(mut self, topic: Option<String>) -> Normalizer {
        self.signals_topic = topic;
        self
    }

    /// The clock receipt times are read from.
    pub fn clock(&self) -> &crate::clock::Clock {
        &self.clock
    }

    /// The signals a batch carries, in the batch's order, normalized on `workers` threads (JSON
    /// parsing and mapping are most of the consumer thread's work, and that thread is the one
    /// serial step between the broker and the engine's shards).
    pub fn signals(&self, batch: &[FeedMessage], workers: usize) -> Vec<Result<Signal, FeedError>> {
        let serial =
            |chunk: &[FeedMessage]| chunk.iter().map(|m| self.signal(m)).collect::<Vec<_>>();
        if workers < 2 || batch.len() < PARALLEL_MIN {
            return serial(batch);
        }
        let size = batch.len().div_ceil(workers);
        std::thread::scope(|scope| {
            let mut chunks = batch.chunks(size);
            let first = chunks.next().unwrap_or_default();
            let others: Vec<_> = chunks
                .map(|chunk| (chunk.len(), scope.spawn(move || serial(chunk))))
                .collect();
            let mut out = serial(first);
            for (len, handle) in others {
                match handle.join() {
                    Ok(signals) => out.extend(signals),
                    Err(_) => out.extend((0..len).map(|_| Err(FeedError::Internal))),
                }
            }
            out
        })
    }

    /// Whether `topic` is cluster mode's signals topic (its records are validated signals).
    pub fn is_signals_topic(&self, topic: &str) -> bool {
        self.signals_topic.as_deref() == Some(topic)
    }

    /// The signal `msg` carries, or why it carries none.
    pub fn signal(&self, msg: &FeedMessage) -> Result<Signal, FeedError> {
        let payload = msg
            .payload
            .as_deref()
            .ok_or_else(|| FeedError::NotJson("the message has no value".into()))?;
        if self.is_signals_topic(&msg.topic) {
            // Validated, normalized and clamped where it was received; taken as it is.
            let record: SignalRecord =
                serde_json::from_slice(payload).map_err(|e| FeedError::NotJson(e.to_string()))?;
            return Ok(record.signal);
        }
        let wall = self.clock.now_ms();
        let skew_ms = (self.max_future_skew_secs as i64).saturating_mul(1000);
        // The message's timestamp anchors the event-time window (stable when the message is
        // delivered again after a crash), unless it is itself beyond the window.
        let anchor = msg
            .timestamp_ms
            .filter(|t| *t > 0 && *t <= wall.saturating_add(skew_ms))
            .unwrap_or(wall);
        let now = anchor as f64 / 1000.0;
        let origin = Origin {
            topic: &msg.topic,
            partition: msg.partition,
            offset: msg.offset,
            now,
            received_at_ms: wall,
        };
        let mut signal = match self.mappings.get(&msg.topic) {
            Some(mapping) => risk_feed::from_mapped(mapping, origin, payload),
            None => risk_feed::from_native(origin, payload),
        }?;
        signal.clamp_future_event_time(now, self.max_future_skew_secs);
        Ok(signal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(topic: &str, payload: &[u8], ts: Option<i64>) -> FeedMessage {
        FeedMessage {
            topic: topic.into(),
            partition: 1,
            offset: 7,
            key: None,
            payload: Some(payload.to_vec()),
            timestamp_ms: ts,
        }
    }

    #[test]
    fn topics_with_a_mapping_use_it_others_are_native() {
        let n = Normalizer::new(
            &[Mapping {
                topic: "fraud".into(),
                subject: "/user".into(),
                score: Some("/p".into()),
                ..Mapping::default()
            }],
            300,
            crate::clock::Clock::manual(1_700_000_000_000),
        );
        let mapped = n
            .signal(&msg("fraud", br#"{"user": "u1", "p": 99}"#, Some(5_000)))
            .unwrap();
        assert_eq!(mapped.event_time, 5.0, "the message timestamp stands in");
        assert_eq!(mapped.jti, "offset:1/7");
        assert_eq!(mapped.iss, "kafka:fraud");
        assert!(n
            .signal(&msg("risk", br#"{"user": "u1", "p": 99}"#, None))
            .is_err());
        let native = n
            .signal(&msg("risk", br#"{"subject": "u1", "level": "LOW"}"#, None))
            .unwrap();
        assert!(native.event_time > 1.6e9, "no timestamp: now");
        // A score dated in the year 3000 is taken as the message's time, as is a message whose
        // own timestamp is beyond the window (then: now).
        let future = n
            .signal(&msg(
                "risk",
                br#"{"subject": "u1", "level": "LOW", "event_time": 32503680000}"#,
                Some(5_000),
            ))
            .unwrap();
        assert_eq!(future.event_time, 5.0);
        let stamped_future = n
            .signal(&msg(
                "risk",
                br#"{"subject": "u1", "level": "LOW"}"#,
                Some(32_503_680_000_000),
            ))
            .unwrap();
        assert!(stamped_future.event_time < 32_503_680_000.0);
        assert!(stamped_future.event_time > 1.6e9);
        let tombstone = FeedMessage {
            payload: None,
            ..msg("risk", b"", None)
        };
        assert!(matches!(n.signal(&tombstone), Err(FeedError::NotJson(_))));
    }
}
