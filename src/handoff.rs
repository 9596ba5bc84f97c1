//! The consumer end of the intake channel. It takes each durably recorded signal and hands it to the
//! next stage's [`SignalSink`]; the signal is marked processed (so it is not replayed) only once that
//! stage has durably applied it. Signals that were pending at start-up are replayed first.

use std::future::Future;

use tokio::sync::mpsc;

use crate::intake::Intake;
use crate::signal::Signal;

/// How a sink took a signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    /// Done: the hand-off marks it processed now.
    Processed,
    /// Taken over: the sink marks it processed itself, once its own state is committed.
    Deferred,
}

/// The stage after intake. Returning an error leaves the signal pending (replayed on restart).
pub trait SignalSink: Send + 'static {
    fn apply(&mut self, signal: Signal) -> impl Future<Output = Result<Ack, String>> + Send;
}

/// A sink that only logs each signal: one structured line with its stream, type, subject and time.
pub struct LogSink;

impl SignalSink for LogSink {
    async fn apply(&mut self, s: Signal) -> Result<Ack, String> {
        tracing::info!(
            seq = s.seq, stream = %s.source.stream(), event = %s.event_uri, subject = %s.subject,
            jti = %s.jti, event_time = s.event_time, "signal accepted"
        );
        Ok(Ack::Processed)
    }
}

/// The evaluation engine as the next stage: it marks signals processed after its own commit.
pub struct EngineSink(pub std::sync::Arc<crate::engine::Engine>);

impl SignalSink for EngineSink {
    async fn apply(&mut self, s: Signal) -> Result<Ack, String> {
        // Verification and stream-updated events are about the stream, not a subject's access.
        if s.event.kind().is_some_and(|k| k.is_framework()) {
            tracing::info!(stream = %s.source.stream(), event = %s.event_uri, jti = %s.jti, "framework event");
            return Ok(Ack::Processed);
        }
        self.0.apply_signal(s).await.map_err(|e| e.to_string())?;
        Ok(Ack::Deferred)
    }
}

/// Runs until the channel closes: replays `pending`, then consumes `rx`.
pub async fn run<S: SignalSink>(
    mut sink: S,
    intake: Intake,
    pending: Vec<Signal>,
    mut rx: mpsc::Receiver<Signal>,
    clock: crate::clock::Clock,
) {
    if !pending.is_empty() {
        tracing::info!(
            count = pending.len(),
            "replaying signals recorded but not processed"
        );
        metrics::counter!(crate::telemetry::SIGNALS_REPLAYED).increment(pending.len() as u64);
    }
    for signal in pending {
        handle(&mut sink, &intake, &clock, signal).await;
    }
    while let Some(signal) = rx.recv().await {
        handle(&mut sink, &intake, &clock, signal).await;
    }
}

async fn handle<S: SignalSink>(
    sink: &mut S,
    intake: &Intake,
    clock: &crate::clock::Clock,
    signal: Signal,
) {
    let (seq, received_at_ms) = (signal.seq, signal.received_at_ms);
    let stream = signal.source.stream().to_owned();
    match sink.apply(signal).await {
        Ok(ack) => {
            if ack == Ack::Processed {
                if let Err(e) = intake.mark_processed(vec![seq]).await {
                    tracing::error!(seq, error = %e, "could not mark signal processed");
                }
            }
            let elapsed_ms = (clock.now_ms() - received_at_ms).max(0);
            metrics::histogram!(crate::telemetry::SIGNAL_HANDLING_SECONDS, "stream" => stream)
                .record(elapsed_ms as f64 / 1000.0);
        }
        Err(e) => {
            tracing::error!(seq, error = %e, "next stage failed; signal stays pending");
        }
    }
}
