//! The risk-system side of the Kafka source, for the `vigil-risk` simulator, the benchmark and tests:
//! risk messages in Vigil's native format and in a foreign "fraud engine" format (with the mapping an
//! operator would write for it), traffic patterns, a producer, and librdkafka's in-process mock
//! cluster (a real Kafka-protocol broker on loopback) for running without a Kafka installation.
//!
//! Like the transmitter helpers, this builds messages independently of [`crate::risk_feed`], so a
//! test that publishes here and reads in [`crate::kafka`] checks the documented format end to end.

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DefaultProducerContext, FutureProducer, FutureRecord};
use serde_json::{json, Value};

use crate::risk_feed::Mapping;

/// One risk observation about a user (by email).
#[derive(Debug, Clone, PartialEq)]
pub struct RiskMessage {
    pub email: String,
    /// 0–100.
    pub score: f64,
    /// Seconds since the epoch.
    pub event_time: f64,
    pub id: String,
    pub reason: String,
}

impl RiskMessage {
    /// Vigil's native format (documented in `risk_feed`).
    pub fn native(&self) -> Value {
        json!({
            "subject": {"format": "email", "email": self.email},
            "score": self.score,
            "source": "risk-sim",
            "event_time": self.event_time,
            "id": self.id,
            "reason": self.reason,
            "attributes": {"simulated": true},
        })
    }

    /// A foreign format, read through [`fraud_engine_mapping`]: nested subject, a band instead of a
    /// level, RFC 3339 time in milliseconds precision, a numeric id.
    pub fn foreign(&self) -> Value {
        let band = match self.score {
            s if s >= 75.0 => "critical",
            s if s >= 40.0 => "elevated",
            _ => "normal",
        };
        json!({
            "eventId": self.id,
            "user": {"mail": self.email},
            "assessment": {"band": band, "probability": self.score / 100.0},
            "ts": rfc3339(self.event_time),
            "why": self.reason,
            "geo": {"cc": "DE"},
        })
    }

    /// The Kafka message key: the subject, so one subject's messages stay in one partition.
    pub fn key(&self) -> &str {
        &self.email
    }
}

/// The mapping an operator configures for [`RiskMessage::foreign`] on `topic`.
pub fn fraud_engine_mapping(topic: &str) -> Mapping {
    Mapping {
        topic: topic.to_owned(),
        subject: "/user/mail".into(),
        subject_format: Some("email".into()),
        level: Some("/assessment/band".into()),
        time: Some("/ts".into()),
        id: Some("/eventId".into()),
        reason: Some("/why".into()),
        source: Some("fraud-engine".into()),
        level_values: [
            ("critical".to_owned(), "HIGH".to_owned()),
            ("elevated".to_owned(), "MEDIUM".to_owned()),
            ("normal".to_owned(), "LOW".to_owned()),
        ]
        .into(),
        attributes: [("country".to_owned(), "/geo/cc".to_owned())].into(),
        ..Mapping::default()
    }
}

/// A traffic shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Pattern {
    /// Random users, low scores mostly, at an even rate.
    Steady,
    /// Like steady, but every tenth second of traffic arrives at once.
    Bursts,
    /// One user's risk climbing from LOW through MEDIUM to HIGH.
    Climb,
    /// Message `n` names user `n` (modulo the users) with a HIGH score: with a grant per user
    /// and no more messages than users, every message revokes a grant.
    Revoking,
}

/// The `n`-th message of `pattern` over `users` users (`user-<i>@example.com`), at `now`.
pub fn message(pattern: Pattern, n: u64, users: u64, now: f64) -> RiskMessage {
    let users = users.max(1);
    let (email, score, reason) = match pattern {
        Pattern::Steady | Pattern::Bursts => {
            // A deterministic spread: most scores low, one in twenty high.
            let user = (n.wrapping_mul(2_654_435_761)) % users;
            let score = if n % 20 == 19 { 90.0 } else { (n % 35) as f64 };
            (format!("user-{user}@example.com"), score, "anomaly score")
        }
        Pattern::Climb => {
            let score = (10.0 + 20.0 * n as f64).min(95.0);
            ("user-0@example.com".to_owned(), score, "impossible travel")
        }
        Pattern::Revoking => (
            format!("user-{}@example.com", n % users),
            95.0,
            "credential stuffing",
        ),
    };
    RiskMessage {
        email,
        score,
        event_time: now,
        id: format!("risk-sim-{n}-{}", (now * 1000.0) as i64),
        reason: reason.to_owned(),
    }
}

/// Why publishing failed.
#[derive(Debug, thiserror::Error)]
#[error("kafka: {0}")]
pub struct PublishError(#[from] rdkafka::error::KafkaError);

/// A producer of risk messages.
pub struct Publisher {
    producer: FutureProducer,
}

impl Publisher {
    pub fn new(brokers: &str) -> Result<Publisher, PublishError> {
        let producer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("message.timeout.ms", "10000")
            .set("linger.ms", "5")
            .create()?;
        Ok(Publisher { producer })
    }

    /// Publishes one message and waits for the broker's acknowledgement. Returns (partition,
    /// offset).
    pub async fn publish(
        &self,
        topic: &str,
        key: Option<&str>,
        payload: &[u8],
    ) -> Result<(i32, i64), PublishError> {
        let mut record: FutureRecord<'_, str, [u8]> = FutureRecord::to(topic).payload(payload);
        if let Some(key) = key {
            record = record.key(key);
        }
        match self.producer.send(record, Duration::from_secs(10)).await {
            Ok(d) => Ok((d.partition, d.offset)),
            Err((e, _)) => Err(PublishError(e)),
        }
    }

    /// Publishes a tombstone (a message with a key and no value) and waits for it.
    pub async fn publish_tombstone(
        &self,
        topic: &str,
        key: &str,
    ) -> Result<(i32, i64), PublishError> {
        let record: FutureRecord<'_, str, [u8]> = FutureRecord::to(topic).key(key);
        match self.producer.send(record, Duration::from_secs(10)).await {
            Ok(d) => Ok((d.partition, d.offset)),
            Err((e, _)) => Err(PublishError(e)),
        }
    }

    /// Publishes many messages concurrently and waits for all acknowledgements.
    pub async fn publish_all(
        &self,
        topic: &str,
        messages: &[(Option<String>, Vec<u8>)],
    ) -> Result<(), PublishError> {
        let sends = messages
            .iter()
            .map(|(key, payload)| self.publish(topic, key.as_deref(), payload));
        for result in futures_util::future::join_all(sends).await {
            result?;
        }
        Ok(())
    }
}

/// An in-process Kafka-protocol broker on loopback with `topics` created (name, partitions).
/// It lives as long as the returned value.
pub fn mock_cluster(
    topics: &[(&str, i32)],
) -> Result<MockCluster<'static, DefaultProducerContext>, PublishError> {
    let cluster = MockCluster::new(1)?;
    for (topic, partitions) in topics {
        cluster.create_topic(topic, *partitions, 1)?;
    }
    Ok(cluster)
}

/// RFC 3339 UTC with milliseconds.
fn rfc3339(secs: f64) -> String {
    let ms = (secs * 1000.0).round() as i64;
    let (days, rem) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{Event, RiskLevel};
    use crate::risk_feed::{from_mapped, from_native, Origin};

    #[test]
    fn both_formats_read_back_as_the_same_level_and_time() {
        let origin = Origin {
            topic: "t",
            partition: 0,
            offset: 0,
            now: 0.0,
            received_at_ms: 0,
        };
        for n in 0..8 {
            let m = message(Pattern::Climb, n, 1, 1_700_000_000.25);
            let native = from_native(origin, m.native().to_string().as_bytes()).unwrap();
            let foreign = from_mapped(
                &fraud_engine_mapping("t"),
                origin,
                m.foreign().to_string().as_bytes(),
            )
            .unwrap();
            assert_eq!(native.event_time, 1_700_000_000.25);
            assert_eq!(foreign.event_time, 1_700_000_000.25);
            let level = |s: &crate::signal::Signal| match &s.event {
                Event::RiskLevelChange(r) => r.current_level.clone(),
                other => panic!("{other:?}"),
            };
            assert_eq!(level(&native), level(&foreign), "message {n}");
        }
        let last = message(Pattern::Climb, 7, 1, 0.0);
        let s = from_native(origin, last.native().to_string().as_bytes()).unwrap();
        assert!(
            matches!(&s.event, Event::RiskLevelChange(r) if r.current_level == RiskLevel::High)
        );
        assert_eq!(rfc3339(0.0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400.5), "2000-02-29T00:00:00.500Z");
    }
}
