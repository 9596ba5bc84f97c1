//! Per-stream liveness: when each inbound stream last delivered an event and last answered a
//! verification, and what its transmitter says its status is. Fed by the receiver (every accepted
//! SET, verification and stream-updated events) and by the stream managers; read by the API,
//! `vigil streams status` and `/metrics`.
//!
//! A stream whose transmitter has not answered a verification request within its SLA
//! (`manage.verification_sla_secs`, 5 minutes by default, as openid/sharedsignals#339 proposes)
//! is **unhealthy**: counted from the oldest request still unanswered — requests keep coming every
//! `verify_interval_secs`, and each must not restart the clock — until a verification event with a
//! state Vigil asked for arrives. Shown in `/metrics` (`vigil_ssf_stream_healthy`), `/readyz` and
//! `vigil streams list`, with an alert log when it turns and one when it recovers.

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
    /// The oldest verification request not answered yet (none: every request answered).
    pub verification_pending_since_ms: Option<i64>,
    /// How long a request may stay unanswered before the stream is unhealthy (set by the
    /// manager that asks; none for a stream Vigil does not verify).
    pub verification_sla_ms: Option<i64>,
    /// Whether the transmitter answers verification within the SLA (as of the read).
    pub healthy: bool,
    /// How long the oldest unanswered request has waited past the SLA, when it has.
    pub verification_overdue_ms: Option<i64>,
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

    /// `stream`'s liveness, its health assessed as of now.
    pub fn get(&self, stream: &str) -> Option<Live> {
        let now = self.clock.now_ms();
        self.streams.get(stream).map(|l| l.assessed(now))
    }

    /// Every stream's liveness, by name, health assessed as of now.
    pub fn all(&self) -> Vec<(String, Live)> {
        let now = self.clock.now_ms();
        let mut all: Vec<(String, Live)> = self
            .streams
            .iter()
            .map(|e| (e.key().clone(), e.value().assessed(now)))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// A verification request with a fresh state was sent on `stream`, whose answer is due
    /// within `sla`.
    pub fn verification_requested(&self, stream: &str, sla: std::time::Duration) {
        let now = self.clock.now_ms();
        self.update(stream, |l| {
            l.verification_requested_ms = Some(now);
            l.verification_pending_since_ms.get_or_insert(now);
            l.verification_sla_ms = Some(i64::try_from(sla.as_millis()).unwrap_or(i64::MAX));
        });
    }

    /// Assesses every stream's health now: sets `vigil_ssf_stream_healthy` and logs each turn
    /// (an alert when a stream turns unhealthy). Called before `/metrics` and `/readyz` answer
    /// and by each stream's manager when its SLA runs out, so the gauge and the alert do not wait
    /// for the next event. Returns when the next stream turns unhealthy if nothing arrives.
    pub fn assess(&self) -> Option<i64> {
        let now = self.clock.now_ms();
        let mut next = None::<i64>;
        for mut entry in self.streams.iter_mut() {
            let assessed = entry.assessed(now);
            if let (true, Some(since), Some(sla)) = (
                assessed.healthy,
                assessed.verification_pending_since_ms,
                assessed.verification_sla_ms,
            ) {
                let due = since.saturating_add(sla);
                next = Some(next.map_or(due, |n| n.min(due)));
            }
            if assessed.healthy != entry.healthy {
                if assessed.healthy {
                    tracing::info!(stream = %entry.key(), "inbound SSF stream answers verification again: healthy");
                } else {
                    tracing::warn!(alert = true, stream = %entry.key(),
                        pending_since_ms = assessed.verification_pending_since_ms,
                        "inbound SSF stream unhealthy: no verification answered within its SLA");
                }
                entry.healthy = assessed.healthy;
            }
            metrics::gauge!(crate::telemetry::SSF_STREAM_HEALTHY, "stream" => entry.key().clone())
                .set(if assessed.healthy { 1.0 } else { 0.0 });
        }
        next
    }

    pub fn update(&self, stream: &str, f: impl FnOnce(&mut Live)) {
        let mut entry = self
            .streams
            .entry(stream.to_owned())
            .or_insert_with(|| Live {
                status: "unknown".into(),
                healthy: true,
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
            l.verification_pending_since_ms = None;
            l.error = None;
        });
        self.assess();
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

impl Live {
    /// This liveness with its health as of `now_ms`: unhealthy once the oldest unanswered
    /// verification request has waited longer than the SLA.
    fn assessed(&self, now_ms: i64) -> Live {
        let overdue = match (self.verification_pending_since_ms, self.verification_sla_ms) {
            (Some(since), Some(sla)) => {
                let waited = now_ms.saturating_sub(since);
                (waited > sla).then(|| waited - sla)
            }
            _ => None,
        };
        Live {
            healthy: overdue.is_none(),
            verification_overdue_ms: overdue,
            ..self.clone()
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

    /// Unhealthy once the oldest unanswered request is older than the SLA — a request every
    /// interval does not restart the clock — and healthy again on an answer.
    #[test]
    fn a_stream_turns_unhealthy_after_its_verification_sla_and_back() {
        let clock = Clock::manual(1_000_000);
        let liveness = Liveness::with_clock(clock.clone());
        let sla = Duration::from_secs(300);
        liveness.verification_requested("s", sla);
        assert_eq!(liveness.assess(), Some(1_300_000));
        assert!(liveness.get("s").unwrap().healthy);
        for _ in 0..5 {
            clock.advance(Duration::from_secs(60));
            liveness.verification_requested("s", sla);
        }
        clock.advance(Duration::from_secs(1));
        let live = liveness.get("s").unwrap();
        assert!(!live.healthy, "{live:?}");
        assert_eq!(live.verification_overdue_ms, Some(1_000));
        assert_eq!(live.verification_pending_since_ms, Some(1_000_000));
        assert_eq!(liveness.assess(), None);
        liveness.verified("s");
        let live = liveness.get("s").unwrap();
        assert!(live.healthy && live.verification_pending_since_ms.is_none());
        // A stream never asked is healthy.
        liveness.saw_event("t");
        assert!(liveness.get("t").unwrap().healthy);
    }
}
