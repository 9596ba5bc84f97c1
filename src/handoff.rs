//! The consumer end of the intake channel. It takes each durably recorded signal, hands it to the
//! next stage's [`SignalSink`], and only then marks it processed so it is not replayed. Signals that
//! were pending at start-up are replayed first.

use std::future::Future;

use tokio::sync::mpsc;

use crate::intake::Intake;
use crate::signal::{now_ms, Signal};

/// The stage after intake. Returning an error leaves the signal pending (replayed on restart).
pub trait SignalSink: Send + 'static {
    fn apply(&mut self, signal: &Signal) -> impl Future<Output = Result<(), String>> + Send;
}

/// Until the evaluator exists, the next stage records the signal in the log: each accepted SET is
/// visible as one structured line with its stream, type, subject and event time.
pub struct LogSink;

impl SignalSink for LogSink {
    async fn apply(&mut self, s: &Signal) -> Result<(), String> {
        tracing::info!(
            seq = s.seq, stream = %s.source.stream(), event = %s.event_uri, subject = %s.subject,
            jti = %s.jti, event_time = s.event_time, "signal accepted"
        );
        Ok(())
    }
}

/// Runs until the channel closes: replays `pending`, then consumes `rx`.
pub async fn run<S: SignalSink>(
    mut sink: S,
    intake: Intake,
    pending: Vec<Signal>,
    mut rx: mpsc::Receiver<Signal>,
) {
    if !pending.is_empty() {
        tracing::info!(
            count = pending.len(),
            "replaying signals recorded but not processed"
        );
        metrics::counter!("vigil_signals_replayed_total").increment(pending.len() as u64);
    }
    for signal in pending {
        handle(&mut sink, &intake, signal).await;
    }
    while let Some(signal) = rx.recv().await {
        handle(&mut sink, &intake, signal).await;
    }
}

async fn handle<S: SignalSink>(sink: &mut S, intake: &Intake, signal: Signal) {
    match sink.apply(&signal).await {
        Ok(()) => {
            if let Err(e) = intake.mark_processed(vec![signal.seq]).await {
                tracing::error!(seq = signal.seq, error = %e, "could not mark signal processed");
            }
            let elapsed_ms = (now_ms() - signal.received_at_ms).max(0);
            metrics::histogram!("vigil_signal_handling_seconds", "stream" => signal.source.stream().to_owned())
                .record(elapsed_ms as f64 / 1000.0);
        }
        Err(e) => {
            tracing::error!(seq = signal.seq, error = %e, "next stage failed; signal stays pending");
        }
    }
}
