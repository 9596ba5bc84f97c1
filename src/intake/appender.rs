//! The intake log's one writer: a thread that takes appends and processed marks off a channel,
//! dedupes each append against the log and the batch it is in, writes the batch and syncs it once
//! (group commit), and only then answers, and hands the batch's new signals on to the next stage
//! (those appended with [`super::Intake::record_and_hand_on`]). It also prunes: after every batch, and every
//! [`PRUNE_EVERY`] when the channel is idle.

use std::collections::HashMap;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::log::{Batch, Encoded, Log, Pruned, Sync};
use super::{HandOn, LogError, RecordOutcome, SeqCounter};
use crate::clock::Clock;
use crate::signal::Signal;

/// How often the log is pruned (the windows are minutes to days: a few seconds late is nothing).
pub const PRUNE_EVERY: Duration = Duration::from_secs(5);

/// A record moved in from an earlier release's tables, with its own sequence number.
pub struct Moved {
    pub seq: u64,
    pub encoded: Encoded,
    pub pending: bool,
}

/// A record to append, answered once it is on disk.
pub struct Append {
    pub encoded: Encoded,
    /// The signal to hand on to the next stage if it is newly recorded.
    pub hand_on: Option<(Signal, HandOn)>,
    pub reply: oneshot::Sender<Result<RecordOutcome, LogError>>,
}

/// Work for the appender.
pub enum Command {
    /// Boxed: a signal is large, and a queue of marks should not be sized for it.
    Append(Box<Append>),
    Processed(Vec<u64>, Option<oneshot::Sender<Result<(), LogError>>>),
    /// Records moved from an earlier release, in sequence order; those the log already holds (a
    /// move interrupted by a crash) are skipped. Answers how many were appended.
    Move(Vec<Moved>, std::sync::mpsc::Sender<Result<u64, LogError>>),
    Prune(oneshot::Sender<Result<Pruned, LogError>>),
}

/// The appender's settings.
pub struct Settings {
    pub max_batch: usize,
    pub retention_ms: i64,
    pub max_bytes: u64,
}

/// An append waiting for its batch's commit.
enum Waiting {
    New(u64, oneshot::Sender<Result<RecordOutcome, LogError>>),
    /// A second copy of a record new in the same batch.
    Copy(u64, oneshot::Sender<Result<RecordOutcome, LogError>>),
}

/// The appender thread's loop; ends when every sender is gone and the channel is drained.
pub fn run(
    log: Arc<Log>,
    seqs: Arc<SeqCounter>,
    rx: Receiver<Command>,
    settings: Settings,
    clock: Clock,
) {
    loop {
        let first = match rx.recv_timeout(PRUNE_EVERY) {
            Ok(c) => c,
            Err(RecvTimeoutError::Timeout) => {
                prune(&log, &settings, &clock);
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => {
                // Deferred marks made durable, so a clean restart replays nothing processed, and
                // the zeros ahead cut off.
                if let Err(e) = log.seal() {
                    tracing::warn!(error = %e, "intake log not synced at shutdown; processed signals may be replayed");
                }
                break;
            }
        };
        let mut commands = vec![first];
        while commands.len() < settings.max_batch {
            match rx.try_recv() {
                Ok(c) => commands.push(c),
                Err(_) => break,
            }
        }
        let mut appends = Vec::new();
        let mut marks = Vec::new();
        // What was taken before a move or a pruning is written first: commands keep their order.
        let flush = |appends: &mut Vec<_>, marks: &mut Vec<_>| {
            write_batch(
                &log,
                &seqs,
                &settings,
                std::mem::take(appends),
                std::mem::take(marks),
            )
        };
        for command in commands {
            match command {
                Command::Append(a) => appends.push(*a),
                Command::Processed(seqs, reply) => marks.push((seqs, reply)),
                Command::Move(records, reply) => {
                    flush(&mut appends, &mut marks);
                    let _ = reply.send(move_in(&log, records));
                }
                Command::Prune(reply) => {
                    flush(&mut appends, &mut marks);
                    let _ = reply.send(Ok(prune(&log, &settings, &clock)));
                }
            }
        }
        write_batch(&log, &seqs, &settings, appends, marks);
        // Cheap when nothing is due: the oldest segment is looked at and kept.
        prune(&log, &settings, &clock);
    }
}

#[allow(clippy::type_complexity)]
fn write_batch(
    log: &Log,
    seqs: &SeqCounter,
    settings: &Settings,
    appends: Vec<Append>,
    marks: Vec<(Vec<u64>, Option<oneshot::Sender<Result<(), LogError>>>)>,
) {
    if appends.is_empty() && marks.is_empty() {
        return;
    }
    let started = Instant::now();
    // Dedupe: against the log, then within the batch.
    let mut new: Vec<Encoded> = Vec::new();
    // What each new record hands on, by its index in `new`.
    let mut hand_on: Vec<Option<(Signal, HandOn)>> = Vec::new();
    let mut waiting = Vec::new();
    let mut in_batch: HashMap<String, usize> = HashMap::new();
    for append in appends {
        let Append {
            encoded,
            hand_on: next,
            reply,
        } = append;
        if encoded.packed.len() > super::log::MAX_RECORD {
            let _ = reply.send(Err(LogError::Io(format!(
                "a record of {} bytes is larger than the log takes",
                encoded.packed.len()
            ))));
            continue;
        }
        if let Some(&i) = in_batch.get(&encoded.key) {
            waiting.push(Waiting::Copy(i as u64, reply));
            continue;
        }
        match log.lookup(&encoded.key, encoded.hash) {
            Ok(Some(seq)) => {
                let _ = reply.send(Ok(RecordOutcome::Duplicate(seq)));
            }
            Ok(None) => {
                in_batch.insert(encoded.key.clone(), new.len());
                waiting.push(Waiting::New(new.len() as u64, reply));
                new.push(encoded);
                hand_on.push(next);
            }
            Err(e) => {
                let _ = reply.send(Err(LogError::Io(e.to_string())));
            }
        }
    }
    let mut refused: Option<LogError> = None;
    if !new.is_empty() && log.bytes() > settings.max_bytes {
        // Make room from what is processed; with nothing to drop, refuse until there is.
        let _ = log.prune(i64::MIN, 0, settings.max_bytes);
        if log.bytes() > settings.max_bytes {
            refused = Some(LogError::Full);
        }
    }
    let first = match (&refused, new.len() as u64) {
        (None, n) if n > 0 => match seqs.reserve_blocking(n) {
            Ok(first) => Some(first),
            Err(e) => {
                refused = Some(LogError::Io(format!("reserving sequence numbers: {e}")));
                None
            }
        },
        _ => None,
    };
    let mut batch = Batch::default();
    let mut assigned = Vec::with_capacity(new.len());
    if let Some(first) = first {
        for (i, e) in new.into_iter().enumerate() {
            let seq = first + i as u64;
            batch.push_set(seq, e.received_at_ms, &e.packed, e.hash, e.key);
            assigned.push(seq);
        }
    }
    let all_marks: Vec<u64> = marks.iter().flat_map(|(s, _)| s.iter().copied()).collect();
    batch.push_processed(&log.pending_among(&all_marks));
    let size = assigned.len() + marks.len();
    // A batch of detached marks only waits for nobody: a mark lost in a crash replays a signal
    // whose effect is already committed, which changes nothing. The next synced batch (or a roll,
    // or the shutdown) makes it durable.
    let sync = if assigned.is_empty() && marks.iter().all(|(_, reply)| reply.is_none()) {
        Sync::Deferred
    } else {
        Sync::Now
    };
    let outcome = log.commit(batch, sync);
    match &outcome {
        Ok(()) => {
            metrics::histogram!(crate::telemetry::STORE_COMMIT_SECONDS, "store" => "intake")
                .record(started.elapsed().as_secs_f64());
            metrics::histogram!(crate::telemetry::STORE_BATCH_SIZE, "store" => "intake")
                .record(size as f64);
        }
        Err(e) => {
            tracing::error!(error = %e, size, "intake log append failed; nothing in this batch was acknowledged")
        }
    }
    for w in waiting {
        let (i, reply, copy) = match w {
            Waiting::New(i, r) => (i, r, false),
            Waiting::Copy(i, r) => (i, r, true),
        };
        let answer = match (&refused, &outcome, assigned.get(i as usize)) {
            (Some(e), _, _) => Err(e.clone()),
            (None, Err(e), _) => Err(e.clone()),
            (None, Ok(()), Some(&seq)) if copy => Ok(RecordOutcome::Duplicate(seq)),
            (None, Ok(()), Some(&seq)) => Ok(RecordOutcome::Recorded(seq)),
            (None, Ok(()), None) => Err(LogError::Failed("no sequence number".into())),
        };
        let _ = reply.send(answer);
    }
    for (_, reply) in marks {
        if let Some(reply) = reply {
            let _ = reply.send(outcome.clone());
        }
    }
    publish_size(log);
    if refused.is_none() && outcome.is_ok() {
        hand_on_recorded(hand_on, &assigned);
    }
}

/// Hands the batch's newly recorded signals on, each group of one next stage as one message,
/// after the answers went out. Waits while a next stage is full (intake's backpressure); one
/// that is gone leaves its signals pending, replayed at the next start.
fn hand_on_recorded(hand_on: Vec<Option<(Signal, HandOn)>>, assigned: &[u64]) {
    let mut group: Vec<Signal> = Vec::new();
    let mut to: Option<HandOn> = None;
    for (next, &seq) in hand_on.into_iter().zip(assigned) {
        let Some((mut signal, next)) = next else {
            continue;
        };
        signal.seq = seq;
        if to.as_ref().is_some_and(|t| !t.same_channel(&next)) {
            send_group(to.take(), std::mem::take(&mut group));
        }
        to.get_or_insert(next);
        group.push(signal);
    }
    send_group(to, group);
}

fn send_group(to: Option<HandOn>, group: Vec<Signal>) {
    let (Some(to), false) = (to, group.is_empty()) else {
        return;
    };
    let n = group.len();
    if to.send_blocking(group).is_err() {
        tracing::warn!(
            signals = n,
            "next stage stopped; signals stay pending for replay"
        );
    }
}

/// Appends records moved from an earlier release, keeping their sequence numbers.
fn move_in(log: &Log, records: Vec<Moved>) -> Result<u64, LogError> {
    let last = log.last_seq();
    let mut batch = Batch::default();
    let mut moved = 0;
    let mut processed = Vec::new();
    for m in records {
        if last.is_some_and(|l| m.seq <= l) {
            continue;
        }
        batch.push_set(
            m.seq,
            m.encoded.received_at_ms,
            &m.encoded.packed,
            m.encoded.hash,
            m.encoded.key,
        );
        if !m.pending {
            processed.push(m.seq);
        }
        moved += 1;
    }
    // The processed ones' marks go in the same batch, after their records.
    batch.push_processed(&processed);
    log.commit(batch, Sync::Now)?;
    publish_size(log);
    Ok(moved)
}

fn prune(log: &Log, settings: &Settings, clock: &Clock) -> Pruned {
    match log.prune(clock.now_ms(), settings.retention_ms, settings.max_bytes) {
        Ok(p) => {
            if p.segments > 0 {
                metrics::counter!(crate::telemetry::INTAKE_SEGMENTS_PRUNED, "reason" => "retention")
                    .increment(p.segments - p.early);
                metrics::counter!(crate::telemetry::INTAKE_SEGMENTS_PRUNED, "reason" => "size")
                    .increment(p.early);
                tracing::debug!(
                    segments = p.segments,
                    sets = p.sets,
                    bytes = p.bytes,
                    "intake log pruned"
                );
            }
            publish_size(log);
            p
        }
        Err(e) => {
            tracing::error!(error = %e, "intake log pruning failed");
            Pruned::default()
        }
    }
}

/// The log's size gauges.
pub fn publish_size(log: &Log) {
    let (sets, bytes, segments) = log.size();
    metrics::gauge!(crate::telemetry::INTAKE_LOG_SETS).set(sets as f64);
    metrics::gauge!(crate::telemetry::INTAKE_LOG_BYTES).set(bytes as f64);
    metrics::gauge!(crate::telemetry::INTAKE_LOG_SEGMENTS).set(segments as f64);
    metrics::gauge!(crate::telemetry::INTAKE_PENDING).set(log.pending_count() as f64);
}
