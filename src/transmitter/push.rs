//! RFC 8935 push delivery to enforcement points' push streams.
//!
//! Each enabled push stream is drained in outbox order, one SET at a time, so per-stream (and so
//! per-subject) order holds. `202` removes the SET. A `400` is parsed and logged by its RFC 8935 error
//! code; the SET is dead-lettered (the receiver says it will never accept it). `429`/`503` wait for
//! `Retry-After`; other failures (5xx, timeouts, refused connections) back off exponentially with
//! jitter. A SET still undelivered `dead_letter_after` after it was queued is dead-lettered; operators
//! list and replay dead letters through the API. Paused streams hold their SETs; nothing is lost.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;

use super::streams::{Stream, StreamStore, PUSH};
use crate::events::StreamStatus;

/// Delivery timing.
#[derive(Debug, Clone)]
pub struct PushSettings {
    pub timeout: Duration,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub dead_letter_after: Duration,
}

struct Backoff {
    failures: u32,
    until: Instant,
}

enum Attempt {
    Delivered,
    Rejected(String),
    Retry {
        after: Option<Duration>,
        why: String,
    },
}

/// Runs until `shutdown` fires.
pub async fn run(
    streams: Arc<StreamStore>,
    client: reqwest::Client,
    settings: PushSettings,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let any = streams.any_notifier();
    let mut backoff: HashMap<String, Backoff> = HashMap::new();
    loop {
        let woken = any.notified();
        let now = Instant::now();
        for stream in streams.live() {
            if stream.delivery.method != PUSH || stream.status != StreamStatus::Enabled {
                continue;
            }
            if backoff
                .get(&stream.stream_id)
                .is_some_and(|b| b.until > now)
            {
                continue;
            }
            match drain(&streams, &client, &settings, &stream).await {
                Ok(()) => {
                    backoff.remove(&stream.stream_id);
                }
                Err((after, why)) => {
                    let b = backoff.entry(stream.stream_id.clone()).or_insert(Backoff {
                        failures: 0,
                        until: now,
                    });
                    b.failures += 1;
                    let exp = settings
                        .initial_backoff
                        .saturating_mul(1 << b.failures.min(16));
                    let jitter = Duration::from_millis(rand::random::<u64>() % 100);
                    let wait = after.unwrap_or(exp.min(settings.max_backoff) + jitter);
                    b.until = Instant::now() + wait;
                    metrics::counter!("vigil_sets_retried_total", "stream" => stream.stream_id.clone()).increment(1);
                    tracing::warn!(stream = %stream.stream_id, failures = b.failures, wait_ms = wait.as_millis() as u64, %why, "push delivery failed; will retry");
                }
            }
        }
        let next = backoff.values().map(|b| b.until).min();
        let sleep_until = next.unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
        tokio::select! {
            _ = woken => {}
            _ = tokio::time::sleep_until(sleep_until) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Delivers a stream's outbox in order until it is empty or an attempt fails.
async fn drain(
    streams: &StreamStore,
    client: &reqwest::Client,
    settings: &PushSettings,
    stream: &Stream,
) -> Result<(), (Option<Duration>, String)> {
    let Some(url) = &stream.delivery.endpoint_url else {
        return Ok(());
    };
    loop {
        let (batch, _) = streams
            .outstanding(&stream.stream_id, 32)
            .map_err(|e| (None, e.to_string()))?;
        if batch.is_empty() {
            return Ok(());
        }
        for (key, out) in batch {
            let age =
                Duration::from_millis((crate::signal::now_ms() - out.queued_at_ms).max(0) as u64);
            match attempt(client, settings, url, stream, &out.set).await {
                Attempt::Delivered => {
                    streams
                        .delivered(&key, out.queued_at_ms)
                        .await
                        .map_err(|e| (None, e.to_string()))?;
                }
                Attempt::Rejected(why) => {
                    tracing::error!(stream = %stream.stream_id, jti = %out.jti, %why, "receiver rejected the SET; dead-lettered");
                    streams
                        .dead_letter(&stream.stream_id, &key, out, why)
                        .await
                        .map_err(|e| (None, e.to_string()))?;
                }
                Attempt::Retry { why, .. } if age >= settings.dead_letter_after => {
                    let why = format!("undelivered after {}s: {why}", age.as_secs());
                    streams
                        .dead_letter(&stream.stream_id, &key, out, why)
                        .await
                        .map_err(|e| (None, e.to_string()))?;
                }
                Attempt::Retry { after, why } => return Err((after, why)),
            }
        }
    }
}

async fn attempt(
    client: &reqwest::Client,
    settings: &PushSettings,
    url: &str,
    stream: &Stream,
    set: &str,
) -> Attempt {
    let mut req = client
        .post(url)
        .timeout(settings.timeout)
        .header("Content-Type", "application/secevent+jwt")
        .header("Accept", "application/json")
        .body(set.to_owned());
    if let Some(auth) = &stream.delivery.authorization_header {
        req = req.header("Authorization", auth);
    }
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) => {
            return Attempt::Retry {
                after: None,
                why: e.to_string(),
            }
        }
    };
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    match status {
        202 | 200 | 204 => Attempt::Delivered,
        400 => {
            let body: Value = resp.json().await.unwrap_or(Value::Null);
            let err = body.get("err").and_then(Value::as_str).unwrap_or("unknown");
            metrics::counter!("vigil_push_rejections_total", "err" => err.to_owned()).increment(1);
            let desc = body
                .get("description")
                .and_then(Value::as_str)
                .unwrap_or("");
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
