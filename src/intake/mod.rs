//! Durable intake: every accepted SET is written to disk *before* its source acknowledges it
//! (RFC 8935 202, RFC 8936 ack), deduplicated by (`iss`, `jti`), and pending until the next stage
//! reports it processed. On start-up the pending signals are replayed.
//!
//! The records are a log of segment files (`<data_dir>/intake/`, [`log`]) with one writer thread
//! ([`appender`]): group commit, one `fdatasync` per batch, dedupe inside the writer so two
//! concurrent deliveries of one `jti` record it exactly once. The dedupe index, the sequence index
//! and the pending set are in memory, rebuilt from the retained segments at start-up. A segment
//! is dropped once every record in it is processed and its newest is older than
//! `intake.retention_secs` (the dedupe window), or earlier while the log is over
//! `intake.max_bytes`.
//!
//! The engine marks a signal processed *after* its own commit in the state store made the signal's
//! effect durable ([`Intake::mark_processed_detached`]). The two writes are not atomic: a crash
//! between them replays a signal already applied, which changes nothing (an equal fact is not an
//! update, a revoked grant stays revoked), so nothing is lost and nothing is applied twice in effect.
//!
//! Beside the log, `<data_dir>/intake.redb` keeps what is small and rewritten: the sequence
//! counter (`meta` "next_seq", reserved in blocks) and verification states (`stream_state`
//! `"verify_state/<stream>"`). Earlier releases kept the records in redb tables — in the state
//! store, later in `intake.redb` — and both are moved into the log at start-up.

mod appender;
mod hand_on;
pub mod log;

use std::path::Path;
use std::sync::Arc;

use redb::{Database, ReadableTable, TableDefinition, TableHandle};
use serde::{Deserialize, Serialize};

use crate::clock::Clock;
use crate::config::IntakeConfig;
use crate::signal::Signal;
use crate::store::{BatchWriter, BatchWriterThread, StoreError, WriteError};
use appender::{Command, Moved};
pub use hand_on::{channel as hand_on_channel, HandOn, HandOnReceiver};
pub use log::Pruned;
use log::{Encoded, Log};

/// Intake's database file in the data directory (sequence counter, verification states).
pub const FILE: &str = "intake.redb";
/// The intake log's directory in the data directory.
pub const LOG_DIR: &str = "intake";
/// The redb file is small and rarely written: a small page cache is enough.
const CACHE_BYTES: usize = 4 << 20;

const META: TableDefinition<&str, u64> = TableDefinition::new("intake_meta");
const STREAM_STATE: TableDefinition<&str, &str> = TableDefinition::new("intake_stream_state");
/// Earlier releases' record tables, read only to move them into the log.
const LEGACY_SETS: TableDefinition<u64, &[u8]> = TableDefinition::new("intake_sets");
const LEGACY_JTI: TableDefinition<&str, u64> = TableDefinition::new("intake_jti");
const LEGACY_PENDING: TableDefinition<u64, ()> = TableDefinition::new("intake_pending");
/// Records moved per appender command.
const MOVE_CHUNK: usize = 1024;

/// Why intake could not record or read.
#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error(transparent)]
    Open(#[from] StoreError),
    #[error("cannot start an intake thread: {0}")]
    Thread(std::io::Error),
    #[error("storage error: {0}")]
    Storage(Box<redb::Error>),
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("stored record {seq} is unreadable: {reason}")]
    Corrupt { seq: u64, reason: String },
}

impl IntakeError {
    /// Whether the record was refused for want of room (the log at `intake.max_bytes` with
    /// nothing processed to drop): the sender should come back later, not give up.
    pub fn is_full(&self) -> bool {
        matches!(self, IntakeError::Log(LogError::Full))
    }
}

/// Why the intake log could not append (cloned to every caller of a failed batch).
#[derive(Debug, Clone, thiserror::Error)]
pub enum LogError {
    #[error("intake log: {0}")]
    Io(String),
    #[error("intake log refuses writes: {0}")]
    Failed(String),
    #[error("intake log is full (intake.max_bytes) and nothing in it is processed yet")]
    Full,
    #[error("the intake writer has stopped")]
    Gone,
}

fn storage<E: Into<redb::Error>>(e: E) -> IntakeError {
    IntakeError::Storage(Box::new(e.into()))
}

/// The result of recording one SET.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordOutcome {
    /// Newly recorded with this sequence number.
    Recorded(u64),
    /// This (`iss`, `jti`) was recorded before, as this sequence number; nothing was written.
    Duplicate(u64),
}

/// The sequence counter every source draws from, reserved durably in blocks (`meta`
/// "next_seq"), so no number is handed out twice, even across a crash.
pub struct SeqCounter {
    writer: BatchWriter,
    reserved: std::sync::Mutex<std::ops::Range<u64>>,
}

/// How many sequence numbers one reservation commit sets aside.
const SEQ_BLOCK: u64 = 1 << 20;

impl SeqCounter {
    /// The first of `n` fresh sequence numbers. Blocking (a commit only when a block runs out).
    pub fn reserve_blocking(&self, n: u64) -> Result<u64, IntakeError> {
        let mut reserved = self
            .reserved
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if reserved.end - reserved.start < n {
            let size = n.max(SEQ_BLOCK);
            let first = self.writer.write_blocking(move |txn| {
                let mut meta = txn.open_table(META).map_err(WriteError::storage)?;
                let first = meta
                    .get("next_seq")
                    .map_err(WriteError::storage)?
                    .map(|v| v.value())
                    .unwrap_or(1);
                meta.insert("next_seq", first + size)
                    .map_err(WriteError::storage)?;
                Ok(first)
            })?;
            *reserved = first..first + size;
        }
        let first = reserved.start;
        reserved.start += n;
        Ok(first)
    }
}

/// Intake's threads: the log's appender and the writer of `intake.redb`.
pub struct IntakeThreads {
    appender: std::thread::JoinHandle<()>,
    meta: BatchWriterThread,
}

impl IntakeThreads {
    /// Waits until every [`Intake`] handle is gone and both threads drained their work.
    pub fn join(self) {
        if self.appender.join().is_err() {
            tracing::error!("intake appender thread panicked");
        }
        self.meta.join();
    }
}

/// How a SET was stored by earlier releases (and how [`Intake::get`] answers).
#[derive(Debug, Deserialize)]
struct StoredSet {
    signal: Signal,
    token: String,
}

/// Handle to durable intake. Cheap to clone.
#[derive(Clone)]
pub struct Intake {
    db: Arc<Database>,
    writer: BatchWriter,
    seqs: Arc<SeqCounter>,
    log: Arc<Log>,
    tx: std::sync::mpsc::Sender<Command>,
}

impl Intake {
    /// [`Intake::open_with`] with the default retention and sizes, batching up to `max_batch`
    /// records per commit, on the system clock (tests, benchmarks).
    pub fn open_dir(
        data_dir: &Path,
        max_batch: usize,
    ) -> Result<(Intake, IntakeThreads), IntakeError> {
        let config = IntakeConfig {
            max_batch,
            ..IntakeConfig::default()
        };
        Intake::open_with(data_dir, &config, Clock::system())
    }

    /// Opens intake in `data_dir` — `intake.redb` and the log in `intake/` — moves records an
    /// earlier release kept in `intake.redb`'s tables into the log, and starts the threads. Join
    /// them after the last handle is gone. `clock` dates the retention window.
    pub fn open_with(
        data_dir: &Path,
        config: &IntakeConfig,
        clock: Clock,
    ) -> Result<(Intake, IntakeThreads), IntakeError> {
        let db = crate::store::open_file(data_dir, FILE, CACHE_BYTES)?;
        let txn = db.begin_write().map_err(storage)?;
        {
            txn.open_table(META).map_err(storage)?;
            txn.open_table(STREAM_STATE).map_err(storage)?;
        }
        txn.commit().map_err(storage)?;
        let opened = Log::open(&data_dir.join(LOG_DIR), config.segment_bytes)?;
        if opened.truncated > 0 {
            tracing::warn!(
                bytes = opened.truncated,
                "a torn record (never acknowledged) was cut off the end of the intake log"
            );
        }
        let log = Arc::new(opened.log);
        // The counter goes on past every number the log holds, even if `intake.redb` was lost.
        if let Some(last) = log.last_seq() {
            let txn = db.begin_write().map_err(storage)?;
            {
                let mut meta = txn.open_table(META).map_err(storage)?;
                let next = meta
                    .get("next_seq")
                    .map_err(storage)?
                    .map_or(1, |v| v.value());
                if next <= last {
                    meta.insert("next_seq", last + 1).map_err(storage)?;
                }
            }
            txn.commit().map_err(storage)?;
        }
        let (writer, meta_thread) =
            BatchWriter::start(db.clone(), "intake_meta", 16).map_err(IntakeError::Thread)?;
        let seqs = Arc::new(SeqCounter {
            writer: writer.clone(),
            reserved: std::sync::Mutex::new(0..0),
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let settings = appender::Settings {
            max_batch: config.max_batch.max(1),
            retention_ms: i64::try_from(config.retention_secs.saturating_mul(1000))
                .unwrap_or(i64::MAX),
            max_bytes: config.max_bytes,
        };
        let appender = {
            let (log, seqs) = (log.clone(), seqs.clone());
            std::thread::Builder::new()
                .name("vigil-intake-log".into())
                .spawn(move || appender::run(log, seqs, rx, settings, clock))
                .map_err(IntakeError::Thread)?
        };
        appender::publish_size(&log);
        let intake = Intake {
            db: db.clone(),
            writer,
            seqs,
            log,
            tx,
        };
        let threads = IntakeThreads {
            appender,
            meta: meta_thread,
        };
        intake.move_tables(&db, false)?;
        Ok((intake, threads))
    }

    /// Records `signal` (with its raw `token`) durably. Returns once the record is on disk. The
    /// `(iss, jti)` check runs in the writer, so concurrent duplicates record once.
    pub async fn record(&self, signal: &Signal, token: &str) -> Result<RecordOutcome, IntakeError> {
        let encoded = self.encode(signal, token)?;
        self.append(encoded, None).await
    }

    /// [`Intake::record`], and a newly recorded `signal` (with its sequence number) is handed on
    /// to `next` by the log's writer, together with the rest of its group commit, once it is on
    /// disk. `next` is bounded: while the next stage is behind, the writer waits for room, and so
    /// does every append after it — intake's backpressure.
    ///
    /// Why the writer and not the caller after the answer: a SET then crosses one task less on
    /// its way to the engine, and the next stage wakes once per group commit instead of once per
    /// SET. The answer does not wait for the hand-on; a hand-on to a stage that is gone leaves
    /// the signal pending, replayed at the next start.
    pub async fn record_and_hand_on(
        &self,
        signal: Signal,
        token: &str,
        next: &HandOn,
    ) -> Result<RecordOutcome, IntakeError> {
        let encoded = self.encode(&signal, token)?;
        self.append(encoded, Some((signal, next.clone()))).await
    }

    async fn append(
        &self,
        encoded: Encoded,
        hand_on: Option<(Signal, HandOn)>,
    ) -> Result<RecordOutcome, IntakeError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.tx
            .send(Command::Append(Box::new(appender::Append {
                encoded,
                hand_on,
                reply,
            })))
            .map_err(|_| LogError::Gone)?;
        Ok(answer.await.map_err(|_| LogError::Gone)??)
    }

    fn encode(&self, signal: &Signal, token: &str) -> Result<Encoded, IntakeError> {
        let key = log::jti_key(&signal.iss, &signal.jti);
        let signal_json = serde_json::to_vec(signal).map_err(|e| IntakeError::Corrupt {
            seq: signal.seq,
            reason: e.to_string(),
        })?;
        Ok(Encoded {
            hash: self.log.hash(&key),
            key,
            received_at_ms: signal.received_at_ms,
            packed: log::pack(&signal_json, token),
        })
    }

    /// Hands out `n` sequence numbers for signals that are not recorded here (their source, a Kafka
    /// partition, is their replay log) and returns the first. Sequence numbers order signals with
    /// equal event times, so every source draws them from the same counter. Blocking: for the
    /// Kafka consumer thread (a commit only when a block runs out).
    pub fn reserve_seqs_blocking(&self, n: u64) -> Result<u64, IntakeError> {
        self.seqs.reserve_blocking(n)
    }

    /// Marks signals processed by the next stage: they will not be replayed. Resolves once the
    /// marks are on disk.
    pub async fn mark_processed(&self, seqs: Vec<u64>) -> Result<(), IntakeError> {
        if seqs.is_empty() {
            return Ok(());
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.tx
            .send(Command::Processed(seqs, Some(reply)))
            .map_err(|_| LogError::Gone)?;
        Ok(answer.await.map_err(|_| LogError::Gone)??)
    }

    /// Queues "processed" marks for `seqs` without waiting for them: for the engine's shard
    /// threads, which call it once their own commit made the signals' effects durable. A mark lost
    /// to a crash or a failed write only replays a signal whose effect is already stored.
    pub fn mark_processed_detached(&self, seqs: Vec<u64>) {
        if seqs.is_empty() {
            return;
        }
        if self.tx.send(Command::Processed(seqs, None)).is_err() {
            tracing::warn!("processed marks not queued; the signals will be replayed");
        }
    }

    /// Drops what the retention window and size cap let go now (it also happens on its own every
    /// few seconds).
    pub async fn prune(&self) -> Result<Pruned, IntakeError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.tx
            .send(Command::Prune(reply))
            .map_err(|_| LogError::Gone)?;
        Ok(answer.await.map_err(|_| LogError::Gone)??)
    }

    /// Retained records, the log's bytes on disk and its segments.
    pub fn log_size(&self) -> (u64, u64, u64) {
        self.log.size()
    }

    /// Moves the intake tables an earlier release kept in the state store `state` into the log
    /// and `intake.redb`: every recorded SET with its sequence number, whether it is still pending,
    /// the sequence counter and verification states — nothing acknowledged is lost by the upgrade.
    /// Returns how many SETs were moved. Call before serving.
    pub fn adopt_legacy_tables(&self, state: &Database) -> Result<u64, IntakeError> {
        self.move_tables(state, true)
    }

    /// Moves `from`'s record tables into the log (appended first, so a crash in between moves the
    /// same records again at the next start — the log skips those it has), then drops them. With
    /// `whole`, `from` is the state store: the counter and verification states move too.
    fn move_tables(&self, from: &Database, whole: bool) -> Result<u64, IntakeError> {
        let has_records = from
            .begin_read()
            .map_err(storage)?
            .list_tables()
            .map_err(storage)?
            .any(|t| t.name() == LEGACY_SETS.name());
        if !has_records {
            return Ok(0);
        }
        let mut moved = 0;
        {
            let legacy = from.begin_read().map_err(storage)?;
            let sets = legacy.open_table(LEGACY_SETS).map_err(storage)?;
            let pending = legacy.open_table(LEGACY_PENDING).map_err(storage)?;
            let mut chunk = Vec::with_capacity(MOVE_CHUNK);
            for row in sets.iter().map_err(storage)? {
                let (k, v) = row.map_err(storage)?;
                let seq = k.value();
                let stored: StoredSet =
                    serde_json::from_slice(v.value()).map_err(|e| IntakeError::Corrupt {
                        seq,
                        reason: e.to_string(),
                    })?;
                let is_pending = pending.get(seq).map_err(storage)?.is_some();
                let mut signal = stored.signal;
                signal.seq = seq;
                chunk.push(Moved {
                    seq,
                    encoded: self.encode(&signal, &stored.token)?,
                    pending: is_pending,
                });
                if chunk.len() == MOVE_CHUNK {
                    moved += self.send_moved(std::mem::take(&mut chunk))?;
                }
            }
            moved += self.send_moved(chunk)?;
            if whole {
                let old_next = legacy
                    .open_table(META)
                    .map_err(storage)?
                    .get("next_seq")
                    .map_err(storage)?
                    .map_or(1, |v| v.value());
                let old_states = legacy.open_table(STREAM_STATE).map_err(storage)?;
                let txn = self.db.begin_write().map_err(storage)?;
                {
                    let mut states = txn.open_table(STREAM_STATE).map_err(storage)?;
                    for row in old_states.iter().map_err(storage)? {
                        let (k, v) = row.map_err(storage)?;
                        states.insert(k.value(), v.value()).map_err(storage)?;
                    }
                    // The counter only moves forward: never hand out a number either file used.
                    let mut meta = txn.open_table(META).map_err(storage)?;
                    let next = meta
                        .get("next_seq")
                        .map_err(storage)?
                        .map_or(1, |v| v.value());
                    meta.insert("next_seq", next.max(old_next))
                        .map_err(storage)?;
                }
                txn.commit().map_err(storage)?;
            }
        }
        let txn = from.begin_write().map_err(storage)?;
        txn.delete_table(LEGACY_SETS).map_err(storage)?;
        txn.delete_table(LEGACY_PENDING).map_err(storage)?;
        txn.delete_table(LEGACY_JTI).map_err(storage)?;
        if whole {
            txn.delete_table(STREAM_STATE).map_err(storage)?;
            txn.delete_table(META).map_err(storage)?;
        }
        txn.commit().map_err(storage)?;
        tracing::info!(sets = moved, "intake records moved into the intake log");
        Ok(moved)
    }

    fn send_moved(&self, chunk: Vec<Moved>) -> Result<u64, IntakeError> {
        if chunk.is_empty() {
            return Ok(0);
        }
        let (reply, answer) = std::sync::mpsc::channel();
        self.tx
            .send(Command::Move(chunk, reply))
            .map_err(|_| LogError::Gone)?;
        Ok(answer.recv().map_err(|_| LogError::Gone)??)
    }

    /// The signals recorded but not yet processed, in sequence order (start-up replay).
    pub fn pending(&self) -> Result<Vec<Signal>, IntakeError> {
        let mut out = Vec::new();
        for seq in self.log.pending() {
            let Some(frame) = self.log.read_set(seq)? else {
                return Err(IntakeError::Corrupt {
                    seq,
                    reason: "pending but not stored".into(),
                });
            };
            out.push(decode_signal(seq, &frame.signal)?);
        }
        Ok(out)
    }

    /// The signal recorded under `seq`, with its raw token.
    pub fn get(&self, seq: u64) -> Result<Option<(Signal, String)>, IntakeError> {
        let Some(frame) = self.log.read_set(seq)? else {
            return Ok(None);
        };
        let signal = decode_signal(seq, &frame.signal)?;
        let token = String::from_utf8(frame.token).map_err(|e| IntakeError::Corrupt {
            seq,
            reason: e.to_string(),
        })?;
        Ok(Some((signal, token)))
    }

    /// Hands every retained signal received at or after `since_ms` (milliseconds since the epoch)
    /// to `each`, in sequence order, until it answers `false`. The scan starts at the first
    /// segment holding a record that recent; a signal received before `since_ms` among the later
    /// ones (recorded a moment out of order) is skipped.
    pub fn for_each_since(
        &self,
        since_ms: i64,
        mut each: impl FnMut(Signal) -> bool,
    ) -> Result<(), IntakeError> {
        let Some(from) = self.log.first_seq_of_window(since_ms) else {
            return Ok(());
        };
        self.log.scan(from, |frame| {
            if frame.received_at_ms < since_ms {
                return Ok(true);
            }
            Ok(each(decode_signal(frame.seq, &frame.signal)?))
        })
    }

    /// Up to `limit` signals recorded after sequence number `after`, newest first (the console's
    /// live feed: `after` is the newest it has).
    pub fn newest(&self, after: u64, limit: usize) -> Result<Vec<Signal>, IntakeError> {
        let mut out = Vec::new();
        for seq in self.log.newest_seqs(after, limit) {
            // A record pruned in the meantime is simply not listed.
            if let Some(frame) = self.log.read_set(seq)? {
                out.push(decode_signal(seq, &frame.signal)?);
            }
        }
        Ok(out)
    }

    /// The oldest sequence number retained.
    pub fn first_seq(&self) -> Result<Option<u64>, IntakeError> {
        Ok(self.log.first_seq())
    }

    /// How many recorded signals are not yet processed (for tests, benchmarks and diagnostics).
    pub fn pending_count(&self) -> Result<u64, IntakeError> {
        Ok(self.log.pending_count())
    }

    /// How many accepted SETs are retained (for tests and diagnostics).
    pub fn stored_count(&self) -> Result<u64, IntakeError> {
        Ok(self.log.size().0)
    }

    /// The sequence number under which (`iss`, `jti`) was recorded, if it is retained.
    pub fn lookup_jti(&self, iss: &str, jti: &str) -> Result<Option<u64>, IntakeError> {
        let key = log::jti_key(iss, jti);
        self.log.lookup(&key, self.log.hash(&key))
    }

    /// Remembers the `state` Vigil sent in a verification request on `stream` (SSF §8.1.4.2),
    /// with the [`VERIFICATION_STATES_KEPT`] - 1 requested before it (a late answer to one of
    /// those is told apart from a forged one).
    pub async fn expect_verification_state(
        &self,
        stream: &str,
        state: &str,
    ) -> Result<(), IntakeError> {
        let (key, state) = (verify_key(stream), state.to_owned());
        self.writer
            .write(move |txn| {
                let mut t = txn.open_table(STREAM_STATE).map_err(WriteError::storage)?;
                let before = t
                    .get(key.as_str())
                    .map_err(WriteError::storage)?
                    .map(|v| v.value().to_owned())
                    .unwrap_or_default();
                let kept: Vec<&str> = std::iter::once(state.as_str())
                    .chain(before.split(' ').filter(|s| !s.is_empty() && *s != state))
                    .take(VERIFICATION_STATES_KEPT)
                    .collect();
                t.insert(key.as_str(), kept.join(" ").as_str())
                    .map_err(WriteError::storage)?;
                Ok(())
            })
            .await?;
        Ok(())
    }

    /// The `state`s of the last verifications Vigil requested on `stream`, newest first.
    pub fn expected_verification_states(&self, stream: &str) -> Result<Vec<String>, IntakeError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let t = txn.open_table(STREAM_STATE).map_err(storage)?;
        Ok(t.get(verify_key(stream).as_str())
            .map_err(storage)?
            .map(|v| v.value().split(' ').map(str::to_owned).collect())
            .unwrap_or_default())
    }
}

/// Verification states remembered per stream: the last request's and the three before it.
pub const VERIFICATION_STATES_KEPT: usize = 4;

/// A stored record's signal, numbered by its record.
fn decode_signal(seq: u64, bytes: &[u8]) -> Result<Signal, IntakeError> {
    let mut signal: Signal = serde_json::from_slice(bytes).map_err(|e| IntakeError::Corrupt {
        seq,
        reason: e.to_string(),
    })?;
    signal.seq = seq;
    Ok(signal)
}

fn verify_key(stream: &str) -> String {
    format!("verify_state/{stream}")
}

/// Earlier releases' record tables, for tests of the upgrade: writes `signal` with `token` as
/// those releases did, into `db` (pending unless `processed`).
#[doc(hidden)]
pub fn write_legacy_record(
    db: &Database,
    seq: u64,
    signal: &Signal,
    token: &str,
    processed: bool,
) -> Result<(), IntakeError> {
    #[derive(Serialize)]
    struct Legacy<'a> {
        signal: &'a Signal,
        token: &'a str,
    }
    let bytes =
        serde_json::to_vec(&Legacy { signal, token }).map_err(|e| IntakeError::Corrupt {
            seq,
            reason: e.to_string(),
        })?;
    let txn = db.begin_write().map_err(storage)?;
    {
        txn.open_table(LEGACY_SETS)
            .map_err(storage)?
            .insert(seq, bytes.as_slice())
            .map_err(storage)?;
        txn.open_table(LEGACY_JTI)
            .map_err(storage)?
            .insert(log::jti_key(&signal.iss, &signal.jti).as_str(), seq)
            .map_err(storage)?;
        let mut pending = txn.open_table(LEGACY_PENDING).map_err(storage)?;
        if !processed {
            pending.insert(seq, ()).map_err(storage)?;
        }
        let mut meta = txn.open_table(META).map_err(storage)?;
        let next = meta
            .get("next_seq")
            .map_err(storage)?
            .map_or(1, |v| v.value());
        meta.insert("next_seq", next.max(seq + 1))
            .map_err(storage)?;
        txn.open_table(STREAM_STATE).map_err(storage)?;
    }
    txn.commit().map_err(storage)?;
    Ok(())
}

/// Writes a verification state as earlier releases did (tests of the upgrade).
#[doc(hidden)]
pub fn write_legacy_verification_state(
    db: &Database,
    stream: &str,
    state: &str,
) -> Result<(), IntakeError> {
    let txn = db.begin_write().map_err(storage)?;
    txn.open_table(STREAM_STATE)
        .map_err(storage)?
        .insert(verify_key(stream).as_str(), state)
        .map_err(storage)?;
    txn.commit().map_err(storage)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::session_revoked as signal;

    /// `n` characters that do not compress (a token-sized record of known size).
    fn noise(n: usize, seed: u64) -> String {
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                char::from(b'A' + ((x >> 33) % 26) as u8)
            })
            .collect()
    }

    fn config(segment_bytes: u64, retention_secs: u64) -> IntakeConfig {
        IntakeConfig {
            max_batch: 16,
            segment_bytes,
            retention_secs,
            max_bytes: 1 << 30,
            ..IntakeConfig::default()
        }
    }

    /// What the writer hands on: each newly recorded signal once, with its sequence number, in
    /// its group commit's order; a duplicate not at all. A next stage that is full holds the
    /// writer (backpressure) without losing anything; one that is gone leaves the signal pending.
    #[tokio::test]
    async fn newly_recorded_signals_are_handed_on_once_with_their_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let (intake, _threads) = Intake::open_dir(dir.path(), 64).unwrap();
        // Room for one signal.
        let (next, mut handed) = hand_on_channel(1);
        let record = |jti: &'static str| {
            let (intake, next) = (intake.clone(), next.clone());
            tokio::spawn(async move {
                intake
                    .record_and_hand_on(signal(jti), "tok", &next)
                    .await
                    .unwrap()
            })
        };
        assert_eq!(record("a").await.unwrap(), RecordOutcome::Recorded(1));
        // Answered, and then the writer waits to hand it on until "a" is taken.
        assert_eq!(record("b").await.unwrap(), RecordOutcome::Recorded(2));
        let duplicate = record("a");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(!duplicate.is_finished(), "the writer waits for room");
        let mut got = Vec::new();
        let mut take = |group: Vec<Signal>| got.extend(group.into_iter().map(|s| (s.seq, s.jti)));
        take(handed.recv().await.unwrap());
        assert_eq!(duplicate.await.unwrap(), RecordOutcome::Duplicate(1));
        assert_eq!(record("c").await.unwrap(), RecordOutcome::Recorded(3));
        take(handed.recv().await.unwrap());
        take(handed.recv().await.unwrap());
        assert_eq!(
            got,
            vec![(1, "a".to_owned()), (2, "b".into()), (3, "c".into())]
        );
        assert!(
            handed.try_recv().is_none(),
            "the duplicate is not handed on"
        );
        // A next stage that is gone: recorded and answered, left pending for replay.
        drop(handed);
        assert_eq!(
            intake
                .record_and_hand_on(signal("d"), "tok", &next)
                .await
                .unwrap(),
            RecordOutcome::Recorded(4)
        );
        let pending: Vec<u64> = intake.pending().unwrap().iter().map(|s| s.seq).collect();
        assert_eq!(pending, vec![1, 2, 3, 4]);
    }

    #[tokio::test]
    async fn records_once_per_jti_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (intake, threads) = Intake::open_dir(dir.path(), 8).unwrap();
            assert_eq!(
                intake.record(&signal("a"), "tok").await.unwrap(),
                RecordOutcome::Recorded(1)
            );
            assert_eq!(
                intake.record(&signal("b"), "tok").await.unwrap(),
                RecordOutcome::Recorded(2)
            );
            assert_eq!(
                intake.record(&signal("a"), "tok").await.unwrap(),
                RecordOutcome::Duplicate(1)
            );
            intake.mark_processed(vec![1]).await.unwrap();
            assert_eq!(
                intake.record(&signal("c"), "tok").await.unwrap(),
                RecordOutcome::Recorded(3)
            );
            intake.expect_verification_state("s", "xyz").await.unwrap();
            drop(intake);
            threads.join();
        }
        let (intake, _threads) = Intake::open_dir(dir.path(), 8).unwrap();
        assert_eq!(
            intake.record(&signal("a"), "tok").await.unwrap(),
            RecordOutcome::Duplicate(1)
        );
        let pending: Vec<_> = intake
            .pending()
            .unwrap()
            .into_iter()
            .map(|s| (s.seq, s.jti))
            .collect();
        assert_eq!(pending, vec![(2, "b".to_owned()), (3, "c".to_owned())]);
        assert_eq!(intake.stored_count().unwrap(), 3);
        assert_eq!(
            intake
                .expected_verification_states("s")
                .unwrap()
                .first()
                .map(String::as_str),
            Some("xyz")
        );
        assert_eq!(
            intake.lookup_jti("https://idp.example.com/", "b").unwrap(),
            Some(2)
        );
        // The counter goes on past a restart (a fresh block: numbers are never reused).
        match intake.record(&signal("d"), "tok").await.unwrap() {
            RecordOutcome::Recorded(seq) => assert!(seq > 3),
            other => panic!("{other:?}"),
        }
        let (got, token) = intake.get(2).unwrap().unwrap();
        assert_eq!((got.jti.as_str(), token.as_str()), ("b", "tok"));
    }

    #[tokio::test]
    async fn concurrent_duplicates_record_exactly_once() {
        let dir = tempfile::tempdir().unwrap();
        let (intake, _threads) = Intake::open_dir(dir.path(), 64).unwrap();
        let mut tasks = Vec::new();
        for _ in 0..32 {
            let intake = intake.clone();
            tasks.push(tokio::spawn(async move {
                intake.record(&signal("same"), "tok").await.unwrap()
            }));
        }
        let mut recorded = 0;
        for t in tasks {
            if let RecordOutcome::Recorded(_) = t.await.unwrap() {
                recorded += 1;
            }
        }
        assert_eq!(recorded, 1);
        assert_eq!(intake.stored_count().unwrap(), 1);
    }

    /// Segments roll at their size; a processed segment goes once its newest record is older than
    /// the window — never the newest, never one with a pending record — and the dedupe window
    /// goes with it. Disk is what the retained segments hold.
    #[tokio::test]
    async fn processed_segments_are_dropped_after_the_window_and_pending_ones_never() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Clock::manual(1_000_000);
        let (intake, threads) =
            Intake::open_with(dir.path(), &config(4096, 60), clock.clone()).unwrap();
        let mut seqs = Vec::new();
        for i in 0..40 {
            let mut s = signal(&format!("jti-{i}"));
            s.received_at_ms = clock.now_ms();
            match intake.record(&s, &noise(300, i)).await.unwrap() {
                RecordOutcome::Recorded(seq) => seqs.push(seq),
                other => panic!("{other:?}"),
            }
        }
        let (sets, bytes, segments) = intake.log_size();
        assert_eq!(sets, 40);
        assert!(segments >= 4, "{segments} segments");
        let on_disk: u64 = std::fs::read_dir(dir.path().join(LOG_DIR))
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert_eq!(bytes, on_disk);
        // Inside the window nothing goes, processed or not.
        intake.mark_processed(seqs[..30].to_vec()).await.unwrap();
        assert_eq!(intake.prune().await.unwrap().segments, 0);
        assert_eq!(intake.log_size().2, segments);
        // Past it, the processed prefix goes; the segment with jti-30 (pending) and after stay.
        // (The appender also prunes after each batch: what this call drops may already be gone.)
        clock.advance(std::time::Duration::from_secs(61));
        intake.prune().await.unwrap();
        assert!(intake.log_size().2 < segments);
        let first = intake.first_seq().unwrap().unwrap();
        assert!(
            first <= seqs[30] && first > seqs[0],
            "first retained {first}"
        );
        assert_eq!(intake.pending_count().unwrap(), 10);
        assert_eq!(intake.pending().unwrap().len(), 10);
        // A pruned record's jti is out of the dedupe window; a retained one's is not.
        assert_eq!(
            intake
                .lookup_jti("https://idp.example.com/", "jti-0")
                .unwrap(),
            None
        );
        assert_eq!(
            intake
                .lookup_jti("https://idp.example.com/", "jti-39")
                .unwrap(),
            Some(seqs[39])
        );
        // All processed: everything but the newest segment goes.
        intake.mark_processed(seqs[30..].to_vec()).await.unwrap();
        intake.prune().await.unwrap();
        assert_eq!(intake.log_size().2, 1);
        // Reopened, the log holds what was retained and nothing is pending.
        drop(intake);
        threads.join();
        let (intake, _threads) =
            Intake::open_with(dir.path(), &config(4096, 60), clock.clone()).unwrap();
        assert_eq!(intake.pending_count().unwrap(), 0);
        assert_eq!(intake.log_size().2, 1);
    }

    /// Over `max_bytes`, processed segments go before their window ends; with none processed,
    /// new records are refused (the caller answers 503) rather than anything acknowledged dropped.
    #[tokio::test]
    async fn over_the_size_cap_processed_segments_go_early_and_then_writes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = IntakeConfig {
            max_bytes: 8192,
            ..config(4096, 3600)
        };
        let (intake, _threads) = Intake::open_with(dir.path(), &cfg, Clock::manual(0)).unwrap();
        let mut seqs = Vec::new();
        let mut refused = 0;
        for i in 0..60 {
            match intake
                .record(&signal(&format!("j{i}")), &"t".repeat(300))
                .await
            {
                Ok(RecordOutcome::Recorded(seq)) => seqs.push(seq),
                Ok(other) => panic!("{other:?}"),
                Err(e) if e.is_full() => refused += 1,
                Err(e) => panic!("{e}"),
            }
        }
        assert!(refused > 0, "the cap refused nothing");
        // Processed, the oldest segments go though the hour-long window has not passed.
        intake.mark_processed(seqs.clone()).await.unwrap();
        intake.prune().await.unwrap();
        assert!(intake.log_size().1 <= 8192);
        assert!(intake.first_seq().unwrap() > seqs.first().copied());
        assert!(matches!(
            intake.record(&signal("after"), "t").await,
            Ok(RecordOutcome::Recorded(_))
        ));
    }

    /// Detached processed marks are written without a sync of their own: the next SET's group
    /// commit covers them, a roll syncs them before the next segment, and so does a clean
    /// shutdown — so a restart replays nothing processed. Awaited marks and SETs sync at once.
    #[tokio::test]
    async fn detached_marks_wait_for_the_next_sync_and_never_cross_a_segment_unsynced() {
        async fn processed(intake: &Intake, pending: u64) {
            for _ in 0..500 {
                if intake.pending_count().unwrap() == pending {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
            panic!("marks not applied");
        }
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(4096, 3600);
        {
            let (intake, threads) = Intake::open_with(dir.path(), &cfg, Clock::manual(0)).unwrap();
            let log = intake.log.clone();
            let start = log.syncs();
            let mut seqs = Vec::new();
            for jti in ["a", "b"] {
                match intake.record(&signal(jti), "t").await.unwrap() {
                    RecordOutcome::Recorded(seq) => seqs.push(seq),
                    other => panic!("{other:?}"),
                }
            }
            assert_eq!(log.syncs(), start + 2, "each acknowledged SET is synced");

            intake.mark_processed_detached(vec![seqs[0]]);
            processed(&intake, 1).await;
            assert_eq!(
                log.syncs(),
                start + 2,
                "a detached mark waits for the next sync"
            );
            intake.mark_processed(vec![seqs[1]]).await.unwrap();
            assert_eq!(log.syncs(), start + 3, "an awaited mark is synced at once");

            // A detached mark, then a record that does not fit the segment: the mark is synced
            // in the old segment before the new one is written.
            let c = match intake.record(&signal("c"), "t").await.unwrap() {
                RecordOutcome::Recorded(seq) => seq,
                other => panic!("{other:?}"),
            };
            intake.mark_processed_detached(vec![c]);
            processed(&intake, 0).await;
            let before_roll = log.syncs();
            let segments = intake.log_size().2;
            intake.record(&signal("d"), &noise(8000, 1)).await.unwrap();
            assert_eq!(intake.log_size().2, segments + 1, "no roll happened");
            assert_eq!(
                log.syncs(),
                before_roll + 2,
                "the roll synced the mark first"
            );

            // The last thing written is a detached mark; the shutdown syncs it.
            let d = intake
                .lookup_jti("https://idp.example.com/", "d")
                .unwrap()
                .unwrap();
            intake.mark_processed_detached(vec![d]);
            processed(&intake, 0).await;
            let before_shutdown = log.syncs();
            drop(intake);
            threads.join();
            assert_eq!(
                log.syncs(),
                before_shutdown + 1,
                "the shutdown synced the mark"
            );
        }
        let (intake, _threads) = Intake::open_with(dir.path(), &cfg, Clock::manual(0)).unwrap();
        assert!(intake.pending().unwrap().is_empty(), "every mark was kept");
        assert_eq!(intake.stored_count().unwrap(), 4);
    }

    /// A record a frame could not hold is refused before it is acknowledged, and nothing is
    /// written; the log goes on taking others.
    #[tokio::test]
    async fn a_record_too_large_for_a_frame_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (intake, _threads) = Intake::open_dir(dir.path(), 8).unwrap();
        let huge = noise(30 << 20, 7);
        assert!(intake.record(&signal("huge"), &huge).await.is_err());
        assert_eq!(intake.stored_count().unwrap(), 0);
        assert_eq!(
            intake
                .lookup_jti("https://idp.example.com/", "huge")
                .unwrap(),
            None
        );
        assert!(matches!(
            intake.record(&signal("small"), "tok").await,
            Ok(RecordOutcome::Recorded(_))
        ));
    }

    /// A crash mid-append leaves a torn frame at the end of the newest segment: it was never
    /// acknowledged, so it is cut off and everything before it is read back.
    #[tokio::test]
    async fn a_torn_tail_is_cut_off_at_start_up() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (intake, threads) = Intake::open_dir(dir.path(), 8).unwrap();
            intake.record(&signal("kept"), "tok").await.unwrap();
            drop(intake);
            threads.join();
        }
        let segment = std::fs::read_dir(dir.path().join(LOG_DIR))
            .unwrap()
            .map(|e| e.unwrap().path())
            .max()
            .unwrap();
        let len = std::fs::metadata(&segment).unwrap().len();
        {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(&segment)
                .unwrap();
            f.write_all(&[200, 0, 0, 0, 1, 2, 3, 4, 1, 9, 9]).unwrap();
        }
        let (intake, _threads) = Intake::open_dir(dir.path(), 8).unwrap();
        assert_eq!(std::fs::metadata(&segment).unwrap().len(), len);
        assert_eq!(intake.stored_count().unwrap(), 1);
        assert_eq!(
            intake
                .lookup_jti("https://idp.example.com/", "kept")
                .unwrap(),
            Some(1)
        );
        assert!(matches!(
            intake.record(&signal("next"), "tok").await,
            Ok(RecordOutcome::Recorded(_))
        ));
    }

    /// The last release kept records in `intake.redb`'s tables: they move into the log with their
    /// numbers and pending state, and their `jti`s stay duplicates.
    #[tokio::test]
    async fn records_in_the_last_releases_tables_move_into_the_log() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = crate::store::open_file(dir.path(), FILE, CACHE_BYTES).unwrap();
            write_legacy_record(&db, 7, &signal("old-a"), "raw-a", true).unwrap();
            write_legacy_record(&db, 9, &signal("old-b"), "raw-b", false).unwrap();
        }
        let (intake, _threads) = Intake::open_dir(dir.path(), 8).unwrap();
        assert_eq!(intake.stored_count().unwrap(), 2);
        let pending: Vec<u64> = intake.pending().unwrap().iter().map(|s| s.seq).collect();
        assert_eq!(pending, [9]);
        assert_eq!(intake.get(7).unwrap().unwrap().1, "raw-a");
        assert_eq!(
            intake.record(&signal("old-a"), "x").await.unwrap(),
            RecordOutcome::Duplicate(7)
        );
        match intake.record(&signal("new"), "x").await.unwrap() {
            RecordOutcome::Recorded(seq) => assert!(seq >= 10),
            other => panic!("{other:?}"),
        }
    }
}
