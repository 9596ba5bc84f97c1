//! Per-stream liveness: when each inbound stream last delivered an event and last answered a
//! verification, and what its transmitter says its status is. Fed by the receiver (every accepted
//! SET, verification and stream-updated events) and by the stream managers; read by the API,
//! `vigil streams status` and `/metrics`.

use dashmap::DashMap;
use serde::Serialize;

use crate::clock::Clock;

/// One stream's liveness.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Live {
    pub transmitter: String,
    pub stream_id: Option<String>,
    pub delivery: Option<String>,
    /// `enabled`, `paused`, `disabled` as the transmitter last said, or `unknown`.
    pub status: String,
    pub reason: Option<String>,
    pub events_delivered: Vec<String>,
    pub last_event_ms: Option<i64>,
    pub last_verified_ms: Option<i64>,
    pub verification_requested_ms: Option<i64>,
    /// The last management or poll problem, cleared by the next success.
    pub error: Option<String>,
}

/// Liveness of every inbound stream, by stream name.
#[derive(Default)]
pub struct Liveness {
    streams: DashMap<String, Live>,
    /// What "now" is for the times recorded.
    clock: Clock,
}

impl Liveness {
    /// Liveness whose times come from `clock` (a test's manual one).
    pub fn with_clock(clock: Clock) -> Liveness {
        Liveness {
            streams: DashMap::new(),
            clock,
        }
    }

    /// The clock the times recorded are read from.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    pub fn get(&self, stream: &str) -> Option<Live> {
        self.streams.get(stream).map(|l| l.clone())
    }

    pub fn all(&self) -> Vec<(String, Live)> {
        let mut all: Vec<(String, Live)> = self
            .streams
            .iter()
            .map(|e| (e.key().clone(), e.value().clone()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    pub fn update(&self, stream: &str, f: impl FnOnce(&mut Live)) {
        let mut entry = self
            .streams
            .entry(stream.to_owned())
            .or_insert_with(|| Live {
                status: "unknown".into(),
                ..Live::default()
            });
        f(&mut entry);
        let live = entry.clone();
        drop(entry);
        export(stream, &live);
    }

    /// An accepted SET arrived on `stream`. On every SET's path, so it touches only its own field
    /// and gauge (no copy of the entry).
    pub fn saw_event(&self, stream: &str) {
        let now = self.clock.now_ms();
        match self.streams.get_mut(stream) {
            Some(mut live) => live.last_event_ms = Some(now),
            None => return self.update(stream, |l| l.last_event_ms = Some(now)),
        }
        metrics::gauge!(crate::telemetry::SSF_STREAM_LAST_EVENT_TIMESTAMP_SECONDS, "stream" => stream.to_owned())
            .set(now as f64 / 1000.0);
    }

    /// A verification event with the state Vigil asked for arrived.
    pub fn verified(&self, stream: &str) {
        self.update(stream, |l| {
            l.last_verified_ms = Some(self.clock.now_ms());
            l.error = None;
        });
    }

    /// The transmitter changed the stream's status (stream-updated event or a status read).
    pub fn status(&self, stream: &str, status: &str, reason: Option<&str>) {
        let before = self.get(stream).map(|l| l.status);
        self.update(stream, |l| {
            l.status = status.to_owned();
            l.reason = reason.map(str::to_owned);
        });
        if before.as_deref() != Some(status) && status != "enabled" {
            tracing::warn!(
                alert = true,
                stream,
                status,
                reason = reason.unwrap_or(""),
                "inbound SSF stream is no longer enabled: its events stop until it is re-enabled"
            );
        } else if before.as_deref() != Some(status) {
            tracing::info!(stream, status, "inbound SSF stream status");
        }
    }
}

fn export(stream: &str, live: &Live) {
    let label = stream.to_owned();
    if let Some(t) = live.last_event_ms {
        metrics::gauge!(crate::telemetry::SSF_STREAM_LAST_EVENT_TIMESTAMP_SECONDS, "stream" => label.clone())
            .set(t as f64 / 1000.0);
    }
    if let Some(t) = live.last_verified_ms {
        metrics::gauge!(crate::telemetry::SSF_STREAM_LAST_VERIFIED_TIMESTAMP_SECONDS, "stream" => label.clone())
            .set(t as f64 / 1000.0);
    }
    metrics::gauge!(crate::telemetry::SSF_STREAM_ENABLED, "stream" => label)
        .set(if live.status == "enabled" { 1.0 } else { 0.0 });
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// The times a stream is seen alive are the clock's: a test moves it instead of waiting.
    #[test]
    fn events_and_verifications_are_stamped_by_the_clock() {
        let clock = Clock::manual(1_000_000);
        let liveness = Liveness::with_clock(clock.clone());
        liveness.saw_event("s");
        clock.advance(Duration::from_secs(90));
        liveness.verified("s");
        liveness.saw_event("s");
        let live = liveness.get("s").unwrap();
        assert_eq!(live.last_verified_ms, Some(1_090_000));
        assert_eq!(live.last_event_ms, Some(1_090_000));
        assert_eq!(live.status, "unknown");
    }
}
