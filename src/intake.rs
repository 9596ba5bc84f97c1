//! Durable intake: every accepted SET is written to the store *before* its source acknowledges it
//! (RFC 8935 202, RFC 8936 ack), deduplicated by (`iss`, `jti`), and marked pending until the next stage
//! reports it processed. On start-up the pending signals are replayed.
//!
//! Intake has its own database file (`<data_dir>/intake.redb`) and its own [`BatchWriter`] (group
//! commit): a push waits for one fsync shared with its neighbours, and never behind the engine's or
//! delivery's commits in the state store — under load those held acknowledgements for tens of
//! milliseconds. Dedupe happens inside the write transaction, so two concurrent deliveries of one
//! `jti` record it exactly once.
//!
//! The engine marks a signal processed *after* its own commit in the state store made the signal's
//! effect durable ([`Intake::mark_processed_detached`]). The two commits are not atomic: a crash
//! between them replays a signal already applied, which changes nothing (an equal fact is not an
//! update, a revoked grant stays revoked), so nothing is lost and nothing is applied twice in effect.
//!
//! Tables (prefix `intake_`): `sets` seq → record JSON; `jti` "iss\0jti" → seq; `pending` seq → ();
//! `meta` "next_seq" → u64; `stream_state` `"verify_state/<stream>"` → expected verification state.

use std::path::Path;
use std::sync::Arc;

use redb::{
    Database, ReadableTable, ReadableTableMetadata, TableDefinition, TableHandle, WriteTransaction,
};
use serde::{Deserialize, Serialize};

use crate::signal::Signal;
use crate::store::{BatchWriter, BatchWriterThread, StoreError, WriteError};

/// Intake's database file in the data directory.
pub const FILE: &str = "intake.redb";
/// Intake appends, reads its `jti` index inside each write, and reads records back only at
/// start-up: a small page cache is enough (the OS page cache holds the file anyway).
const CACHE_BYTES: usize = 8 << 20;

const SETS: TableDefinition<u64, &[u8]> = TableDefinition::new("intake_sets");
const JTI: TableDefinition<&str, u64> = TableDefinition::new("intake_jti");
const PENDING: TableDefinition<u64, ()> = TableDefinition::new("intake_pending");
const META: TableDefinition<&str, u64> = TableDefinition::new("intake_meta");
const STREAM_STATE: TableDefinition<&str, &str> = TableDefinition::new("intake_stream_state");

/// Why intake could not record or read.
#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error(transparent)]
    Open(#[from] StoreError),
    #[error("cannot start the intake writer: {0}")]
    Thread(std::io::Error),
    #[error("storage error: {0}")]
    Storage(Box<redb::Error>),
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error("stored record {seq} is unreadable: {reason}")]
    Corrupt { seq: u64, reason: String },
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

/// What is stored per accepted SET: the normalized signal and the raw token (kept for audit).
#[derive(Debug, Deserialize)]
struct StoredSet {
    signal: Signal,
    token: String,
}

/// [`StoredSet`]'s serialized form, borrowed.
#[derive(Serialize)]
struct StoredSetRef<'a> {
    signal: &'a Signal,
    token: &'a str,
}

/// Handle to durable intake. Cheap to clone.
#[derive(Clone)]
pub struct Intake {
    db: Arc<Database>,
    writer: BatchWriter,
    /// Sequence numbers reserved durably (in `meta`) and not yet handed out, for sources that are
    /// not recorded here: a block per commit, so those sources cost no commit per batch.
    reserved: Arc<std::sync::Mutex<std::ops::Range<u64>>>,
}

/// How many sequence numbers one reservation commit sets aside.
const SEQ_BLOCK: u64 = 1 << 20;

impl Intake {
    /// Opens intake's own database, `<data_dir>/intake.redb`, and starts its writer thread, which
    /// batches up to `max_batch` writes per commit. Join the thread after the last handle is gone.
    pub fn open_dir(
        data_dir: &Path,
        max_batch: usize,
    ) -> Result<(Intake, BatchWriterThread), IntakeError> {
        let db = crate::store::open_file(data_dir, FILE, CACHE_BYTES)?;
        let (writer, thread) =
            BatchWriter::start(db.clone(), "intake", max_batch).map_err(IntakeError::Thread)?;
        Ok((Intake::open(db, writer)?, thread))
    }

    /// Creates intake's tables if needed. Writes go through `writer` (group commit).
    pub fn open(db: Arc<Database>, writer: BatchWriter) -> Result<Intake, IntakeError> {
        // Create the tables up front so readers never see them missing.
        let txn = db.begin_write().map_err(storage)?;
        {
            txn.open_table(SETS).map_err(storage)?;
            txn.open_table(JTI).map_err(storage)?;
            txn.open_table(PENDING).map_err(storage)?;
            txn.open_table(META).map_err(storage)?;
            txn.open_table(STREAM_STATE).map_err(storage)?;
        }
        txn.commit().map_err(storage)?;
        Ok(Intake {
            db,
            writer,
            reserved: Arc::new(std::sync::Mutex::new(0..0)),
        })
    }

    /// Records `signal` (with its raw `token`) durably. Returns once the commit is on disk. The
    /// `(iss, jti)` check runs inside the write transaction, so concurrent duplicates record once.
    pub async fn record(&self, signal: &Signal, token: &str) -> Result<RecordOutcome, IntakeError> {
        let encoded = encode(signal, token)?;
        let outcome = self
            .writer
            .write(move |txn| record_in(txn, &encoded))
            .await?;
        Ok(outcome)
    }

    /// Hands out `n` sequence numbers for signals that are not recorded here (their source, a Kafka
    /// partition, is their replay log) and returns the first. Sequence numbers order signals with
    /// equal event times, so every source draws them from the same counter; numbers are reserved
    /// durably in blocks, so none is ever handed out twice, even across a crash. Blocking: for the
    /// Kafka consumer thread (a commit only when a block runs out).
    pub fn reserve_seqs_blocking(&self, n: u64) -> Result<u64, IntakeError> {
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

    /// Marks signals processed by the next stage: they will not be replayed.
    pub async fn mark_processed(&self, seqs: Vec<u64>) -> Result<(), IntakeError> {
        if seqs.is_empty() {
            return Ok(());
        }
        self.writer
            .write(move |txn| mark_processed_in(txn, &seqs))
            .await?;
        Ok(())
    }

    /// Queues "processed" marks for `seqs` without waiting for their commit: for the engine's shard
    /// threads, which call it once their own commit made the signals' effects durable. A mark lost
    /// to a crash or a failed commit only replays a signal whose effect is already stored.
    pub fn mark_processed_detached(&self, seqs: Vec<u64>) {
        if seqs.is_empty() {
            return;
        }
        if let Err(e) = self
            .writer
            .submit_blocking(move |txn| mark_processed_in(txn, &seqs))
        {
            tracing::warn!(error = %e, "processed marks not queued; the signals will be replayed");
        }
    }

    /// Moves intake's tables out of the state store `state`, where releases before intake had its
    /// own file kept them, into intake's file: every recorded SET, its `jti`, whether it is still
    /// pending, the sequence counter and verification states — nothing acknowledged is lost by the
    /// upgrade. Copies first, then drops the old tables; a crash in between copies the same rows
    /// again at the next start. Returns how many SETs were moved. Call before serving.
    pub fn adopt_legacy_tables(&self, state: &Database) -> Result<u64, IntakeError> {
        let legacy = state.begin_read().map_err(storage)?;
        let has_tables = legacy
            .list_tables()
            .map_err(storage)?
            .any(|t| t.name() == META.name());
        if !has_tables {
            return Ok(0);
        }
        let txn = self.db.begin_write().map_err(storage)?;
        let moved = copy_table(&legacy, &txn, SETS)?;
        copy_table(&legacy, &txn, JTI)?;
        copy_table(&legacy, &txn, PENDING)?;
        copy_table(&legacy, &txn, STREAM_STATE)?;
        {
            // The counter only moves forward: never hand out a number either file used.
            let old_next = legacy
                .open_table(META)
                .map_err(storage)?
                .get("next_seq")
                .map_err(storage)?
                .map_or(1, |v| v.value());
            let mut meta = txn.open_table(META).map_err(storage)?;
            let next = meta
                .get("next_seq")
                .map_err(storage)?
                .map_or(1, |v| v.value());
            meta.insert("next_seq", next.max(old_next))
                .map_err(storage)?;
        }
        txn.commit().map_err(storage)?;
        drop(legacy);
        let txn = state.begin_write().map_err(storage)?;
        txn.delete_table(SETS).map_err(storage)?;
        txn.delete_table(PENDING).map_err(storage)?;
        txn.delete_table(JTI).map_err(storage)?;
        txn.delete_table(STREAM_STATE).map_err(storage)?;
        txn.delete_table(META).map_err(storage)?;
        txn.commit().map_err(storage)?;
        tracing::info!(
            sets = moved,
            "intake tables moved from the state store to {FILE}"
        );
        Ok(moved)
    }

    /// The signals recorded but not yet processed, in sequence order (start-up replay).
    pub fn pending(&self) -> Result<Vec<Signal>, IntakeError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let pending = txn.open_table(PENDING).map_err(storage)?;
        let sets = txn.open_table(SETS).map_err(storage)?;
        let mut out = Vec::new();
        for entry in pending.iter().map_err(storage)? {
            let (seq, _) = entry.map_err(storage)?;
            let seq = seq.value();
            let Some(bytes) = sets.get(seq).map_err(storage)? else {
                return Err(IntakeError::Corrupt {
                    seq,
                    reason: "pending but not stored".into(),
                });
            };
            out.push(decode(seq, bytes.value())?.signal);
        }
        Ok(out)
    }

    /// The signal recorded under `seq`, with its raw token.
    pub fn get(&self, seq: u64) -> Result<Option<(Signal, String)>, IntakeError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let sets = txn.open_table(SETS).map_err(storage)?;
        let Some(bytes) = sets.get(seq).map_err(storage)? else {
            return Ok(None);
        };
        let stored = decode(seq, bytes.value())?;
        Ok(Some((stored.signal, stored.token)))
    }

    /// Hands every signal received at or after `since_ms` (milliseconds since the epoch) to
    /// `each`, in sequence order, until it answers `false`. Sequence numbers are drawn as signals
    /// are recorded, so receipt times rise with them and the first is found by bisection; a
    /// signal received before `since_ms` among the later ones (recorded a moment out of order)
    /// is skipped.
    pub fn for_each_since(
        &self,
        since_ms: i64,
        mut each: impl FnMut(Signal) -> bool,
    ) -> Result<(), IntakeError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let sets = txn.open_table(SETS).map_err(storage)?;
        let first_at_or_after = |seq: u64| -> Result<Option<(u64, Signal)>, IntakeError> {
            match sets.range(seq..).map_err(storage)?.next() {
                None => Ok(None),
                Some(entry) => {
                    let (k, v) = entry.map_err(storage)?;
                    let seq = k.value();
                    Ok(Some((seq, decode_signal(seq, v.value())?)))
                }
            }
        };
        let (mut lo, mut hi) = match (
            sets.first().map_err(storage)?,
            sets.last().map_err(storage)?,
        ) {
            (Some(first), Some(last)) => (first.0.value(), last.0.value().saturating_add(1)),
            _ => return Ok(()),
        };
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match first_at_or_after(mid)? {
                Some((seq, signal)) if signal.received_at_ms < since_ms => lo = seq + 1,
                _ => hi = mid,
            }
        }
        for entry in sets.range(lo..).map_err(storage)? {
            let (k, v) = entry.map_err(storage)?;
            let signal = decode_signal(k.value(), v.value())?;
            if signal.received_at_ms >= since_ms && !each(signal) {
                break;
            }
        }
        Ok(())
    }

    /// Up to `limit` signals recorded after sequence number `after`, newest first (the console's
    /// live feed: `after` is the newest it has).
    pub fn newest(&self, after: u64, limit: usize) -> Result<Vec<Signal>, IntakeError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let sets = txn.open_table(SETS).map_err(storage)?;
        let mut out = Vec::new();
        for entry in sets
            .range(after.saturating_add(1)..)
            .map_err(storage)?
            .rev()
            .take(limit)
        {
            let (k, v) = entry.map_err(storage)?;
            out.push(decode_signal(k.value(), v.value())?);
        }
        Ok(out)
    }

    /// The oldest sequence number recorded.
    pub fn first_seq(&self) -> Result<Option<u64>, IntakeError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let sets = txn.open_table(SETS).map_err(storage)?;
        let first = sets.first().map_err(storage)?.map(|(k, _)| k.value());
        Ok(first)
    }

    /// How many recorded signals are not yet processed (for tests, benchmarks and diagnostics).
    pub fn pending_count(&self) -> Result<u64, IntakeError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let pending = txn.open_table(PENDING).map_err(storage)?;
        pending.len().map_err(storage)
    }

    /// How many accepted SETs are stored (for tests and diagnostics).
    pub fn stored_count(&self) -> Result<u64, IntakeError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let sets = txn.open_table(SETS).map_err(storage)?;
        sets.len().map_err(storage)
    }

    /// The sequence number under which (`iss`, `jti`) was recorded, if it was.
    pub fn lookup_jti(&self, iss: &str, jti: &str) -> Result<Option<u64>, IntakeError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let table = txn.open_table(JTI).map_err(storage)?;
        Ok(table
            .get(jti_key(iss, jti).as_str())
            .map_err(storage)?
            .map(|v| v.value()))
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

/// Copies every row of `table` from `from` into the same table in `to`; returns how many.
fn copy_table<K: redb::Key + 'static, V: redb::Value + 'static>(
    from: &redb::ReadTransaction,
    to: &WriteTransaction,
    table: TableDefinition<K, V>,
) -> Result<u64, IntakeError> {
    let old = from.open_table(table).map_err(storage)?;
    let mut new = to.open_table(table).map_err(storage)?;
    let mut copied = 0;
    for row in old.iter().map_err(storage)? {
        let (k, v) = row.map_err(storage)?;
        new.insert(k.value(), v.value()).map_err(storage)?;
        copied += 1;
    }
    Ok(copied)
}

/// Removes `seqs` from the pending set inside a caller's transaction, so a later stage can commit
/// its own state and "processed" atomically.
pub fn mark_processed_in(txn: &WriteTransaction, seqs: &[u64]) -> Result<(), WriteError> {
    let mut pending = txn.open_table(PENDING).map_err(WriteError::storage)?;
    for seq in seqs {
        pending.remove(*seq).map_err(WriteError::storage)?;
    }
    Ok(())
}

/// A signal ready to record: its dedupe key and its stored form, serialized by the caller's thread
/// (the store's writer thread is shared by every writer and only inserts).
struct Encoded {
    jti_key: String,
    bytes: Vec<u8>,
}

/// Serializes a signal for storage. Its `seq` is the row's key: whatever the signal carries is
/// replaced by it when read back.
fn encode(signal: &Signal, token: &str) -> Result<Encoded, IntakeError> {
    let jti_key = jti_key(&signal.iss, &signal.jti);
    let bytes = serde_json::to_vec(&StoredSetRef { signal, token })
        .map_err(|e| IntakeError::Write(WriteError::Storage(e.to_string())))?;
    Ok(Encoded { jti_key, bytes })
}

fn record_in(txn: &WriteTransaction, e: &Encoded) -> Result<RecordOutcome, WriteError> {
    let mut jtis = txn.open_table(JTI).map_err(WriteError::storage)?;
    if let Some(seq) = jtis.get(e.jti_key.as_str()).map_err(WriteError::storage)? {
        return Ok(RecordOutcome::Duplicate(seq.value()));
    }
    let mut meta = txn.open_table(META).map_err(WriteError::storage)?;
    let seq = meta
        .get("next_seq")
        .map_err(WriteError::storage)?
        .map(|v| v.value())
        .unwrap_or(1);
    meta.insert("next_seq", seq + 1)
        .map_err(WriteError::storage)?;
    txn.open_table(SETS)
        .map_err(WriteError::storage)?
        .insert(seq, e.bytes.as_slice())
        .map_err(WriteError::storage)?;
    jtis.insert(e.jti_key.as_str(), seq)
        .map_err(WriteError::storage)?;
    txn.open_table(PENDING)
        .map_err(WriteError::storage)?
        .insert(seq, ())
        .map_err(WriteError::storage)?;
    Ok(RecordOutcome::Recorded(seq))
}

fn decode(seq: u64, bytes: &[u8]) -> Result<StoredSet, IntakeError> {
    let mut stored: StoredSet =
        serde_json::from_slice(bytes).map_err(|e| IntakeError::Corrupt {
            seq,
            reason: e.to_string(),
        })?;
    stored.signal.seq = seq;
    Ok(stored)
}

/// A stored record's signal alone (its raw token is skipped, not copied).
fn decode_signal(seq: u64, bytes: &[u8]) -> Result<Signal, IntakeError> {
    #[derive(Deserialize)]
    struct SignalOnly {
        signal: Signal,
    }
    let mut stored: SignalOnly =
        serde_json::from_slice(bytes).map_err(|e| IntakeError::Corrupt {
            seq,
            reason: e.to_string(),
        })?;
    stored.signal.seq = seq;
    Ok(stored.signal)
}

fn jti_key(iss: &str, jti: &str) -> String {
    format!("{iss}\0{jti}")
}

fn verify_key(stream: &str) -> String {
    format!("verify_state/{stream}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{Event, SessionRevoked};
    use crate::signal::SignalSource;
    use crate::subject::SubjectId;

    fn signal(jti: &str) -> Signal {
        Signal {
            seq: 0,
            source: SignalSource::SsfPush {
                transmitter: "t".into(),
                stream: "s".into(),
            },
            iss: "https://idp.example.com/".into(),
            jti: jti.into(),
            txn: None,
            event_uri: "https://schemas.openid.net/secevent/caep/event-type/session-revoked".into(),
            event: Event::SessionRevoked(SessionRevoked::default()),
            subject: SubjectId::Opaque { id: "u1".into() },
            event_time: 1.0,
            iat: 1.0,
            received_at_ms: 1,
            attributes: Default::default(),
            ttl_secs: None,
        }
    }

    #[tokio::test]
    async fn records_once_per_jti_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = crate::store::open(dir.path()).unwrap();
            let (w, writer) = BatchWriter::start(db.clone(), "intake", 8).unwrap();
            let intake = Intake::open(db, w).unwrap();
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
            // A later record goes through the same writer, so the mark is committed by then.
            assert_eq!(
                intake.record(&signal("c"), "tok").await.unwrap(),
                RecordOutcome::Recorded(3)
            );
            intake.expect_verification_state("s", "xyz").await.unwrap();
            drop(intake);
            writer.join();
        }
        let db = crate::store::open(dir.path()).unwrap();
        let intake =
            Intake::open(db.clone(), BatchWriter::start(db, "intake", 8).unwrap().0).unwrap();
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
    }

    #[tokio::test]
    async fn concurrent_duplicates_record_exactly_once() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::store::open(dir.path()).unwrap();
        let intake =
            Intake::open(db.clone(), BatchWriter::start(db, "intake", 64).unwrap().0).unwrap();
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
}
