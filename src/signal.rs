//! The normalized signal: one fact about one subject, whatever its source. Every source (SSF push,
//! SSF poll, Kafka) produces these; every later stage consumes only these.

use serde::{Deserialize, Serialize};

use crate::events::Event;
use crate::grant::Registrant;
use crate::set::ValidatedSet;
use crate::subject::SubjectId;

/// Where a signal came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SignalSource {
    /// RFC 8935 push to `/ssf/push/{stream}` by the named transmitter.
    SsfPush { transmitter: String, stream: String },
    /// A risk feed message (Kafka): the topic it came from and the risk system it names.
    RiskFeed { topic: String, source: String },
}

impl SignalSource {
    /// A bounded label for metrics and logs.
    pub fn stream(&self) -> &str {
        match self {
            SignalSource::SsfPush { stream, .. } => stream,
            SignalSource::RiskFeed { topic, .. } => topic,
        }
    }

    /// The configured party behind the signal: its transmitter, or its risk feed's topic — names
    /// from the configuration, never the `source` a Kafka message names itself. Session grants
    /// count against it, and facts are bounded fairly between parties by it.
    pub fn party(&self) -> Registrant {
        match self {
            SignalSource::SsfPush { transmitter, .. } => Registrant::transmitter(transmitter),
            SignalSource::RiskFeed { topic, .. } => Registrant::risk_feed(topic),
        }
    }

    /// The source as facts record it (`ssf:<transmitter>`): facts from different sources are kept
    /// side by side (e.g. risk per source).
    pub fn label(&self) -> String {
        match self {
            SignalSource::SsfPush { transmitter, .. } => format!("ssf:{transmitter}"),
            SignalSource::RiskFeed { source, .. } => format!("feed:{source}"),
        }
    }
}

/// A normalized signal, as recorded by durable intake and handed to the next stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Signal {
    /// Intake sequence number, assigned when the signal is durably recorded (0 before).
    pub seq: u64,
    pub source: SignalSource,
    pub iss: String,
    pub jti: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub txn: Option<String>,
    /// The event-type URI as the transmitter sent it.
    pub event_uri: String,
    pub event: Event,
    pub subject: SubjectId,
    /// When the event happened (seconds): `event_timestamp`, else `toe`, else `iat`.
    pub event_time: f64,
    /// When the SET was issued (seconds).
    pub iat: f64,
    /// When Vigil received it (milliseconds since the epoch, wall clock).
    pub received_at_ms: i64,
    /// Free-form attributes (risk feeds), folded into the context's `attributes`.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub attributes: serde_json::Map<String, serde_json::Value>,
    /// How long the facts of this signal count (risk feeds' per-message TTL), in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
}

impl Signal {
    /// Normalizes a validated SET.
    pub fn from_set(set: ValidatedSet, source: SignalSource, received_at_ms: i64) -> Signal {
        Signal {
            seq: 0,
            event_time: set.event_time(),
            source,
            iss: set.iss,
            jti: set.jti,
            txn: set.txn,
            event_uri: set.event_uri,
            event: set.event,
            subject: set.subject,
            iat: set.iat,
            received_at_ms,
            attributes: serde_json::Map::new(),
            ttl_secs: None,
        }
    }
}

impl Signal {
    /// The short event-type name policies use in `on:` (`session-revoked`), `risk-signal` for risk
    /// feed messages, or `unknown`.
    pub fn event_type_name(&self) -> &'static str {
        match self.source {
            SignalSource::RiskFeed { .. } => "risk-signal",
            SignalSource::SsfPush { .. } => self.event.metric_label(),
        }
    }
}

impl Signal {
    /// The event-time sanity window: an event time more than `max_future_skew_secs` ahead of
    /// `anchor_secs` (the time Vigil received the signal) is taken as `anchor_secs`. Facts are
    /// ordered by event time, so without it one validly signed signal dated in the year 3000
    /// would pin its fact for good: no later real signal could ever be newer. Returns whether
    /// the time was clamped (logged and counted in `vigil_event_times_clamped_total`).
    pub fn clamp_future_event_time(&mut self, anchor_secs: f64, max_future_skew_secs: u64) -> bool {
        let limit = anchor_secs + max_future_skew_secs as f64;
        if self.event_time.is_finite() && self.event_time <= limit {
            return false;
        }
        let source = match self.source {
            SignalSource::SsfPush { .. } => "ssf",
            SignalSource::RiskFeed { .. } => "risk_feed",
        };
        metrics::counter!(crate::telemetry::EVENT_TIMES_CLAMPED, "source" => source).increment(1);
        tracing::warn!(source, iss = %crate::outbound::excerpt(&self.iss),
            jti = %crate::outbound::excerpt(&self.jti), claimed = self.event_time,
            received = anchor_secs,
            "event time beyond the allowed clock skew; taken as the time of receipt");
        self.event_time = anchor_secs;
        true
    }
}

/// Milliseconds since the Unix epoch, the system's wall clock. Vigil itself reads time through its
/// injected [`crate::clock::Clock`] (whose system clock this is); the simulators, the CLI and the
/// tests, which are other parties, read it here.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
