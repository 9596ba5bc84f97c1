//! RFC 8935 push delivery to enforcement points' push streams.
//!
//! Each enabled push stream has a worker task of its own that drains its outbox in order, one
//! SET at a time, so per-stream (and so per-subject) order holds and a stream that cannot deliver
//! — an endpoint that never answers, answers `429` with an absurd `Retry-After`, or was refused by
//! the destination policy — holds up only itself. The streams of one enforcement point share a
//! budget of `limits.push_concurrency_per_enforcement_point` attempts in flight, so one point with
//! many streams at a dead endpoint cannot use more than its share of connections either. A worker
//! that ends unexpectedly (a panic) is counted and started again by the dispatcher; a single
//! party's input can never stop delivery for the others.
//!
//! `202` removes the SET. A `400` is parsed by its RFC 8935 error code; the SET is dead-lettered
//! (the receiver says it will never accept it). `429`/`503` wait for `Retry-After` (delta-seconds
//! or HTTP-date, saturated to `max_backoff`); other failures (5xx, timeouts, refused connections)
//! back off exponentially with jitter. A SET still undelivered `dead_letter_after` after it was
//! queued is dead-lettered; operators list and replay dead letters through the API. Paused
//! streams hold their SETs; nothing is lost.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use serde_json::Value;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use super::streams::{Stream, StreamStore, PUSH};
use crate::events::StreamStatus;
use crate::outbound::{self, Destinations};
use crate::set::ErrorCode;

/// Delivery timing and budgets.
#[derive(Debug, Clone)]
pub struct PushSettings {
    pub timeout: Duration,
    pub initial_backoff: Duration,
    /// Also the ceiling of any `Retry-After` an enforcement point asks for.
    pub max_backoff: Duration,
    pub dead_letter_after: Duration,
    /// Attempts in flight at once to one enforcement point, across its streams.
    pub per_endpoint_concurrency: usize,
    /// Where push endpoints may point.
    pub destinations: Destinations,
    /// Cap on an error body read from an enforcement point.
    pub max_error_body: usize,
    /// Retry waits and a SET's age in the outbox are measured on it.
    pub clock: crate::clock::Clock,
}

/// The outcome of one push attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// Acknowledged: the SET leaves the outbox.
    Delivered,
    /// Refused for good: the SET is dead-lettered with this reason.
    Rejected(String),
    /// Try again, after `after` when the enforcement point said (already saturated).
    Retry {
        after: Option<Duration>,
        why: String,
    },
}

/// Runs until `shutdown` fires: starts a worker for every enabled push stream that has none,
/// and starts again any that ended unexpectedly.
pub async fn run(
    streams: Arc<StreamStore>,
    client: reqwest::Client,
    settings: PushSettings,
    mut shutdown: watch::Receiver<bool>,
) {
    let settings = Arc::new(settings);
    let any = streams.any_notifier();
    let mut workers = Workers::default();
    // Keyed by enforcement point name: configured, so bounded.
    let mut budgets: HashMap<String, Arc<Semaphore>> = HashMap::new();
    loop {
        let woken = any.notified();
        reap(&mut workers.0);
        for stream in streams.live() {
            if stream.delivery.method != PUSH
                || stream.status != StreamStatus::Enabled
                || workers.0.contains_key(&stream.stream_id)
                || !streams.delivers(&stream.stream_id)
            {
                continue;
            }
            let budget = budgets
                .entry(stream.owner.clone())
                .or_insert_with(|| Arc::new(Semaphore::new(settings.per_endpoint_concurrency)))
                .clone();
            let worker = Worker {
                streams: streams.clone(),
                client: client.clone(),
                settings: settings.clone(),
                stream_id: stream.stream_id.clone(),
                owner: stream.owner.clone(),
                budget,
            };
            workers.0.insert(
                stream.stream_id.clone(),
                tokio::spawn(worker.run(shutdown.clone())),
            );
        }
        tokio::select! {
            _ = woken => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.changed() => break,
        }
    }
    for (_, w) in workers.0.drain() {
        let _ = w.await;
    }
}

/// The workers by stream id. Dropped with the dispatcher (a panic included), they are aborted:
/// the dispatcher started again must not find a second worker draining the same outbox.
#[derive(Default)]
struct Workers(HashMap<String, JoinHandle<()>>);

impl Drop for Workers {
    fn drop(&mut self) {
        for (_, w) in self.0.drain() {
            w.abort();
        }
    }
}

/// Removes finished workers; one that panicked is counted (the next pass starts it again).
fn reap(workers: &mut HashMap<String, JoinHandle<()>>) {
    let finished: Vec<String> = workers
        .iter()
        .filter(|(_, h)| h.is_finished())
        .map(|(id, _)| id.clone())
        .collect();
    for id in finished {
        let Some(handle) = workers.remove(&id) else {
            continue;
        };
        if let Some(Err(e)) = handle.now_or_never() {
            if e.is_panic() {
                metrics::counter!(crate::telemetry::TASK_RESTARTS, "task" => "push_delivery")
                    .increment(1);
                tracing::error!(stream = %id, "push delivery worker panicked; starting it again");
            }
        }
    }
}

/// One push stream's delivery.
struct Worker {
    streams: Arc<StreamStore>,
    client: reqwest::Client,
    settings: Arc<PushSettings>,
    stream_id: String,
    owner: String,
    budget: Arc<Semaphore>,
}

/// The wait before retry number `failures`: `initial_backoff` doubled per failure, capped at
/// `max_backoff`, plus `jitter`. No arithmetic can overflow, however many failures.
fn backoff(s: &PushSettings, failures: u32, jitter: Duration) -> Duration {
    s.initial_backoff
        .saturating_mul(1u32 << failures.min(16))
        .min(s.max_backoff)
        .saturating_add(jitter)
}

impl Worker {
    /// Delivers until the stream is gone, no longer an enabled push stream, or `shutdown`.
    async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let notifier = self.streams.notifier(&self.stream_id);
        let mut failures: u32 = 0;
        loop {
            let notified = notifier.notified();
            tokio::pin!(notified);
            // Registered before the outbox is read, so a SET queued meanwhile wakes us.
            notified.as_mut().enable();
            let Ok(stream) = self.streams.get(&self.owner, &self.stream_id) else {
                return;
            };
            // In cluster mode a stream's SETs are pushed by the instance owning its partition only.
            if stream.delivery.method != PUSH
                || stream.status != StreamStatus::Enabled
                || !self.streams.delivers(&self.stream_id)
            {
                return;
            }
            // Shutdown cancels an attempt in flight (or one waiting for its turn): the SET stays
            // in the outbox and goes out after the restart; the receiver drops the duplicate jti.
            let drained = tokio::select! {
                r = self.drain(&stream) => r,
                _ = shutdown.changed() => return,
            };
            let wait = match drained {
                Ok(()) => {
                    failures = 0;
                    tokio::select! {
                        _ = notified => {}
                        // Re-read the stream now and then: its status or endpoint may change.
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = shutdown.changed() => return,
                    }
                    continue;
                }
                Err((after, why)) => {
                    failures = failures.saturating_add(1);
                    let wait = after.unwrap_or_else(|| self.backoff(failures));
                    metrics::counter!(crate::telemetry::SETS_RETRIED,
                        "enforcement_point" => self.owner.clone())
                    .increment(1);
                    tracing::warn!(stream = %self.stream_id, enforcement_point = %self.owner,
                        failures, wait_ms = wait.as_millis() as u64, %why,
                        "push delivery failed; will retry");
                    wait
                }
            };
            tokio::select! {
                _ = self.settings.clock.sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Exponential backoff with up to 100 ms of jitter, capped at `max_backoff`.
    fn backoff(&self, failures: u32) -> Duration {
        let jitter = Duration::from_millis(rand::random::<u64>() % 100);
        backoff(&self.settings, failures, jitter)
    }

    /// Delivers the outbox in order until it is empty or an attempt fails.
    async fn drain(&self, stream: &Stream) -> Result<(), (Option<Duration>, String)> {
        let Some(url) = &stream.delivery.endpoint_url else {
            return Ok(());
        };
        let s = &self.settings;
        loop {
            let (batch, _) = self
                .streams
                .outstanding(&stream.stream_id, 32)
                .map_err(|e| (None, e.to_string()))?;
            if batch.is_empty() {
                return Ok(());
            }
            for (key, out) in batch {
                let age = Duration::from_millis(
                    s.clock
                        .now_ms()
                        .saturating_sub(out.waiting_since_ms())
                        .max(0) as u64,
                );
                let result = {
                    let _turn = self
                        .budget
                        .acquire()
                        .await
                        .map_err(|e| (None, e.to_string()))?;
                    self.attempt(url, stream, &out.set).await
                };
                match result {
                    Attempt::Delivered => {
                        self.streams
                            .delivered(&key, &out)
                            .await
                            .map_err(|e| (None, e.to_string()))?;
                    }
                    Attempt::Rejected(why) => {
                        tracing::error!(stream = %stream.stream_id, jti = %out.jti, %why,
                            "receiver rejected the SET; dead-lettered");
                        self.streams
                            .dead_letter(&stream.stream_id, &key, out, why)
                            .await
                            .map_err(|e| (None, e.to_string()))?;
                    }
                    Attempt::Retry { why, .. } if age >= s.dead_letter_after => {
                        let why = format!("undelivered after {}s: {why}", age.as_secs());
                        self.streams
                            .dead_letter(&stream.stream_id, &key, out, why)
                            .await
                            .map_err(|e| (None, e.to_string()))?;
                    }
                    Attempt::Retry { after, why } => return Err((after, why)),
                }
            }
        }
    }

    async fn attempt(&self, url: &str, stream: &Stream, set: &str) -> Attempt {
        let outcome = |o: &'static str| {
            metrics::counter!(crate::telemetry::PUSH_ATTEMPTS, "enforcement_point" => self.owner.clone(), "outcome" => o)
                .increment(1);
        };
        let s = &self.settings;
        // Checked at every attempt, not only when the stream was created: a stream stored by an
        // earlier release, or a policy tightened since, must not be called.
        if let Err(e) = s.destinations.check_url(url) {
            outcome("refused");
            return Attempt::Retry {
                after: Some(s.max_backoff),
                why: format!("push endpoint refused: {e}"),
            };
        }
        let mut req = self
            .client
            .post(url)
            .timeout(s.timeout)
            .header("Content-Type", "application/secevent+jwt")
            .header("Accept", "application/json")
            .body(set.to_owned());
        if let Some(auth) = &stream.delivery.authorization_header {
            req = req.header("Authorization", auth);
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                outcome("retry");
                return Attempt::Retry {
                    after: None,
                    why: outbound::excerpt(&e.to_string()),
                };
            }
        };
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        // Only a 400's body says anything (its RFC 8935 code), and it is read capped.
        let body = if status == 400 {
            outbound::read_capped(resp, s.max_error_body).await.ok()
        } else {
            None
        };
        let attempt = classify(
            status,
            &headers,
            body.as_deref(),
            s.max_backoff,
            s.clock.system_time(),
        );
        outcome(match &attempt {
            Attempt::Delivered => "delivered",
            Attempt::Rejected(_) => "rejected",
            Attempt::Retry { .. } => "retry",
        });
        attempt
    }
}

/// What an enforcement point's answer to a push means. Everything in it is the enforcement
/// point's choice, so nothing here trusts it: `Retry-After` is saturated to `max_backoff`, only
/// RFC 8935's codes become metric labels, and only a short printable excerpt of the description
/// reaches logs and dead letters. Pure, so the `peer_responses` fuzz target drives it.
pub fn classify(
    status: u16,
    headers: &reqwest::header::HeaderMap,
    body: Option<&[u8]>,
    max_backoff: Duration,
    now: std::time::SystemTime,
) -> Attempt {
    let retry_after = outbound::retry_after(headers, max_backoff, now);
    match status {
        202 | 200 | 204 => Attempt::Delivered,
        400 => {
            let body: Value = body
                .and_then(|b| serde_json::from_slice(b).ok())
                .unwrap_or(Value::Null);
            let raw = body.get("err").and_then(Value::as_str).unwrap_or("");
            let err = ErrorCode::parse(raw).map_or("other", ErrorCode::as_str);
            metrics::counter!(crate::telemetry::PUSH_REJECTIONS, "err" => err).increment(1);
            let desc = outbound::excerpt(
                body.get("description")
                    .and_then(Value::as_str)
                    .unwrap_or(""),
            );
            // RFC 8935 §4: access_denied may be transient; every other code is final.
            if err == "access_denied" {
                Attempt::Retry {
                    after: retry_after,
                    why: format!("400 {err}: {desc}"),
                }
            } else {
                Attempt::Rejected(format!("400 {err}: {desc}"))
            }
        }
        429 | 503 => Attempt::Retry {
            after: retry_after,
            why: format!("HTTP {status}"),
        },
        other => Attempt::Retry {
            after: None,
            why: format!("HTTP {other}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The retry schedule, without waiting for it: doubling from `initial_backoff`, capped at
    /// `max_backoff`, and no overflow after any number of failures.
    #[test]
    fn retries_back_off_exponentially_up_to_the_cap() {
        let s = PushSettings {
            timeout: Duration::from_secs(5),
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(60),
            dead_letter_after: Duration::from_secs(3600),
            per_endpoint_concurrency: 4,
            destinations: Destinations {
                allow_loopback: false,
            },
            max_error_body: 1024,
            clock: crate::clock::Clock::system(),
        };
        let none = Duration::ZERO;
        let waits: Vec<u64> = (1..=9)
            .map(|f| backoff(&s, f, none).as_millis() as u64)
            .collect();
        assert_eq!(
            waits,
            [1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 60_000, 60_000, 60_000]
        );
        assert_eq!(backoff(&s, u32::MAX, none), Duration::from_secs(60));
        assert_eq!(
            backoff(&s, 3, Duration::from_millis(99)),
            Duration::from_millis(4_099)
        );
    }
}
