//! What waits for enforcement points has a bound. Push delivery dead-letters a SET it could not
//! deliver within `delivery.dead_letter_after_secs`; poll and SSE streams have no deliverer that
//! would notice, and a paused stream holds its SETs — so a receiver that never comes back grew its
//! outbox forever. A sweep, every `delivery.outbox_sweep_secs`, on the streams delivered here:
//! - a poll or SSE stream with SETs waiting that nobody read for `unread_pause_after_secs` is
//!   paused, and a stream-updated SET (SSF §8.1.5) queued to tell its receiver when it comes back;
//! - every stream's SETs older than `dead_letter_after_secs`, and the oldest beyond
//!   `max_outbox_per_stream`, move to the dead letters (operators list and replay them);
//! - dead letters older than `dead_letter_retention_secs`, and the oldest beyond
//!   `max_dead_letters`, are dropped.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::emit;
use super::streams::{StreamError, StreamStore, PUSH};
use super::Identity;
use crate::config::DeliveryConfig;
use crate::events::StreamStatus;

/// The bounds, from `[delivery]`.
#[derive(Debug, Clone)]
pub struct Bounds {
    pub dead_letter_after_ms: i64,
    pub max_outbox: usize,
    pub unread_pause_after_ms: i64,
    pub dead_letter_retention_ms: i64,
    pub max_dead_letters: usize,
    pub sweep_every: Duration,
}

fn ms(secs: u64) -> i64 {
    i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX)
}

impl From<&DeliveryConfig> for Bounds {
    fn from(c: &DeliveryConfig) -> Bounds {
        Bounds {
            dead_letter_after_ms: ms(c.dead_letter_after_secs),
            max_outbox: c.max_outbox_per_stream,
            unread_pause_after_ms: ms(c.unread_pause_after_secs),
            dead_letter_retention_ms: ms(c.dead_letter_retention_secs),
            max_dead_letters: c.max_dead_letters,
            sweep_every: Duration::from_secs(c.outbox_sweep_secs.max(1)),
        }
    }
}

/// What one sweep did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    pub paused: usize,
    pub dead_lettered: usize,
    pub dropped_dead_letters: usize,
}

/// One sweep (see the module documentation).
pub async fn sweep(
    streams: &StreamStore,
    identity: &Identity,
    bounds: &Bounds,
) -> Result<Swept, StreamError> {
    let now = streams.clock().now_ms();
    let mut swept = Swept::default();
    for stream in streams.live() {
        let id = stream.stream_id.clone();
        if !streams.delivers(&id) {
            continue;
        }
        let (overflow, len) = streams.overflow(
            &id,
            now.saturating_sub(bounds.dead_letter_after_ms),
            bounds.max_outbox,
        )?;
        let unread_for = now.saturating_sub(streams.last_read_ms(&id));
        if stream.delivery.method != PUSH
            && stream.status == StreamStatus::Enabled
            && len > overflow.len()
            && unread_for >= bounds.unread_pause_after_ms
        {
            let mut paused = stream.clone();
            paused.status = StreamStatus::Paused;
            paused.status_reason = Some(format!(
                "paused by Vigil: no poll or SSE read for {} s with SETs waiting",
                unread_for / 1000
            ));
            let updated = emit::stream_updated(identity, &paused).map_err(StreamError::Storage)?;
            streams.put(paused).await?;
            streams
                .enqueue(vec![(id.clone(), updated)], Vec::new())
                .await?;
            metrics::counter!(crate::telemetry::STREAMS_PAUSED_UNREAD).increment(1);
            tracing::warn!(stream = %id, owner = %stream.owner, "stream paused: nobody reads it");
            swept.paused += 1;
        }
        for (key, outgoing) in overflow {
            let why =
                if outgoing.waiting_since_ms() < now.saturating_sub(bounds.dead_letter_after_ms) {
                    "not read or delivered within delivery.dead_letter_after_secs"
                } else {
                    "the stream's outbox is over delivery.max_outbox_per_stream"
                };
            streams.dead_letter(&id, &key, outgoing, why.into()).await?;
            metrics::counter!(crate::telemetry::OUTBOX_DEAD_LETTERED).increment(1);
            swept.dead_lettered += 1;
        }
    }
    swept.dropped_dead_letters = streams
        .prune_dead_letters(
            now.saturating_sub(bounds.dead_letter_retention_ms),
            bounds.max_dead_letters,
        )
        .await?;
    metrics::counter!(crate::telemetry::DEAD_LETTERS_DROPPED)
        .increment(swept.dropped_dead_letters as u64);
    Ok(swept)
}

/// Sweeps every `bounds.sweep_every` until shutdown (paced by the monotonic clock; the ages it
/// compares come from the injected one).
pub async fn run(
    streams: Arc<StreamStore>,
    identity: Arc<Identity>,
    bounds: Bounds,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(bounds.sweep_every) => {}
            _ = shutdown.changed() => return,
        }
        if let Err(e) = sweep(&streams, &identity, &bounds).await {
            tracing::warn!(error = %e, "outbox sweep failed; retried at the next");
        }
    }
}
