//! The consumer end of the intake channel. It takes each durably recorded signal and hands it to the
//! next stage's [`SignalSink`]; the signal is marked processed (so it is not replayed) only once that
//! stage has durably applied it. Signals that were pending at start-up are replayed first.

use std::future::Future;

use crate::intake::{HandOnReceiver, Intake};
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

    /// Several signals, in order; one answer each. By default one at a time.
    fn apply_group(
        &mut self,
        signals: Vec<Signal>,
    ) -> impl Future<Output = Vec<Result<Ack, String>>> + Send {
        async move {
            let mut out = Vec::with_capacity(signals.len());
            for s in signals {
                out.push(self.apply(s).await);
            }
            out
        }
    }
}

/// Most signals handed on at once: what one group commit of the intake log acknowledged
/// arrives together, and goes to each shard as one message.
const GROUP: usize = 64;

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

    async fn apply_group(&mut self, signals: Vec<Signal>) -> Vec<Result<Ack, String>> {
        let mut out = Vec::with_capacity(signals.len());
        let mut to_engine = Vec::with_capacity(signals.len());
        for s in signals {
            if s.event.kind().is_some_and(|k| k.is_framework()) {
                tracing::info!(stream = %s.source.stream(), event = %s.event_uri, jti = %s.jti, "framework event");
                out.push(Some(Ok(Ack::Processed)));
            } else {
                out.push(None);
                to_engine.push(s);
            }
        }
        let taken = match self.0.apply_signals(to_engine).await {
            Ok(()) => Ok(Ack::Deferred),
            Err(e) => Err(e.to_string()),
        };
        out.into_iter()
            .map(|answer| answer.unwrap_or_else(|| taken.clone()))
            .collect()
    }
}

/// Runs until the channel closes: replays `pending`, then consumes `rx` — the groups intake's
/// writer hands on ([`crate::intake::Intake::record_and_hand_on`]), each time taking what is
/// waiting (up to about [`GROUP`] signals) together.
pub async fn run<S: SignalSink>(
    mut sink: S,
    intake: Intake,
    pending: Vec<Signal>,
    mut rx: HandOnReceiver,
    clock: crate::clock::Clock,
) {
    if !pending.is_empty() {
        tracing::info!(
            count = pending.len(),
            "replaying signals recorded but not processed"
        );
        metrics::counter!(crate::telemetry::SIGNALS_REPLAYED).increment(pending.len() as u64);
    }
    for group in crate::parts::in_parts(pending, GROUP) {
        handle(&mut sink, &intake, &clock, group).await;
    }
    while let Some(mut group) = rx.recv().await {
        while group.len() < GROUP {
            match rx.try_recv() {
                Some(more) => group.extend(more),
                None => break,
            }
        }
        handle(&mut sink, &intake, &clock, group).await;
    }
}

async fn handle<S: SignalSink>(
    sink: &mut S,
    intake: &Intake,
    clock: &crate::clock::Clock,
    group: Vec<Signal>,
) {
    let about: Vec<(u64, i64, String)> = group
        .iter()
        .map(|s| (s.seq, s.received_at_ms, s.source.stream().to_owned()))
        .collect();
    let answers = sink.apply_group(group).await;
    let mut processed = Vec::new();
    for ((seq, received_at_ms, stream), answer) in about.into_iter().zip(answers) {
        match answer {
            Ok(ack) => {
                if ack == Ack::Processed {
                    processed.push(seq);
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
    // Detached: intake's writer may itself be waiting for room in this task's channel. A mark
    // lost to a crash replays a signal already handled (a framework event, logged again).
    intake.mark_processed_detached(processed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::session_revoked as signal;

    /// Answers every signal as processed and notes the groups it was handed.
    struct Groups(std::sync::Arc<std::sync::Mutex<Vec<Vec<String>>>>);

    impl SignalSink for Groups {
        async fn apply(&mut self, s: Signal) -> Result<Ack, String> {
            self.0.lock().unwrap().push(vec![s.jti]);
            Ok(Ack::Processed)
        }

        async fn apply_group(&mut self, signals: Vec<Signal>) -> Vec<Result<Ack, String>> {
            let jtis = signals.iter().map(|s| s.jti.clone()).collect();
            self.0.lock().unwrap().push(jtis);
            signals.iter().map(|_| Ok(Ack::Processed)).collect()
        }
    }

    /// What waits in the channel is handed on together, in order, at most `GROUP` at a time;
    /// replayed signals too; every signal the sink processed is marked so in intake.
    #[tokio::test]
    async fn waiting_signals_are_handed_on_together_and_marked_processed() {
        let dir = tempfile::tempdir().unwrap();
        let (intake, _threads) = Intake::open_dir(dir.path(), 8).unwrap();
        let mut recorded = Vec::new();
        for i in 0..(GROUP + 6) {
            let mut s = signal(&format!("j{i}"));
            match intake.record(&s, "tok").await.unwrap() {
                crate::intake::RecordOutcome::Recorded(seq) => s.seq = seq,
                other => panic!("{other:?}"),
            }
            recorded.push(s);
        }
        assert_eq!(intake.pending_count().unwrap(), (GROUP + 6) as u64);
        // Three were pending at start-up; the rest wait in the channel, which then closes.
        let pending = recorded.drain(..3).collect();
        let (tx, rx) = crate::intake::hand_on_channel(1024);
        for s in recorded {
            tx.send_blocking(vec![s]).unwrap();
        }
        drop(tx);
        let groups = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        run(
            Groups(groups.clone()),
            intake.clone(),
            pending,
            rx,
            crate::clock::Clock::manual(1_000),
        )
        .await;
        let groups = groups.lock().unwrap().clone();
        let sizes: Vec<usize> = groups.iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![3, GROUP, 3]);
        let order: Vec<String> = groups.into_iter().flatten().collect();
        let expected: Vec<String> = (0..GROUP + 6).map(|i| format!("j{i}")).collect();
        assert_eq!(order, expected);
        // The marks are queued behind nothing else: a pruning after them sees them written.
        intake.prune().await.unwrap();
        assert_eq!(intake.pending_count().unwrap(), 0);
    }
}
