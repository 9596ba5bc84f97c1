//! Durable intake: every accepted SET is written to the store *before* its source acknowledges it
//! (RFC 8935 202, RFC 8936 ack), deduplicated by (`iss`, `jti`), and marked pending until the next stage
//! reports it processed. On start-up the pending signals are replayed.
//!
//! All writes go through one writer thread that commits many requests per transaction (group commit):
//! a push waits for one fsync shared with its neighbours instead of paying for its own. Dedupe happens
//! inside the write transaction, so two concurrent deliveries of one `jti` record it exactly once.
//!
//! Tables (prefix `intake_`): `sets` seq → record JSON; `jti` "iss\0jti" → seq; `pending` seq → ();
//! `meta` "next_seq" → u64; `stream_state` "verify_state/<stream>" → expected verification state.

use std::sync::Arc;

use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::signal::Signal;

const SETS: TableDefinition<u64, &[u8]> = TableDefinition::new("intake_sets");
const JTI: TableDefinition<&str, u64> = TableDefinition::new("intake_jti");
const PENDING: TableDefinition<u64, ()> = TableDefinition::new("intake_pending");
const META: TableDefinition<&str, u64> = TableDefinition::new("intake_meta");
const STREAM_STATE: TableDefinition<&str, &str> = TableDefinition::new("intake_stream_state");

/// Why intake could not record or read.
#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error("storage error: {0}")]
    Storage(Box<redb::Error>),
    #[error("the intake commit failed: {0}")]
    Commit(String),
    #[error("stored record {seq} is unreadable: {reason}")]
    Corrupt { seq: u64, reason: String },
    #[error("the intake writer has stopped")]
    WriterGone,
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
#[derive(Debug, Serialize, Deserialize)]
struct StoredSet {
    signal: Signal,
    token: String,
}

enum Command {
    Record {
        signal: Box<Signal>,
        token: String,
        reply: oneshot::Sender<Result<RecordOutcome, String>>,
    },
    Processed(Vec<u64>),
}

/// The intake writer thread.
pub struct IntakeWriter(std::thread::JoinHandle<()>);

impl IntakeWriter {
    /// Waits until the writer has drained its queue and stopped (all `Intake` handles dropped).
    pub fn join(self) {
        if self.0.join().is_err() {
            tracing::error!("intake writer thread panicked");
        }
    }
}

/// Handle to durable intake. Cheap to clone.
#[derive(Clone)]
pub struct Intake {
    db: Arc<Database>,
    tx: mpsc::Sender<Command>,
}

impl Intake {
    /// Starts the writer thread. `max_batch` bounds how many requests share one commit. The writer
    /// stops once every `Intake` clone is dropped; [`IntakeWriter::join`] waits for that, after which
    /// the database file is released.
    pub fn open(
        db: Arc<Database>,
        max_batch: usize,
    ) -> Result<(Intake, IntakeWriter), IntakeError> {
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

        let (tx, rx) = mpsc::channel(max_batch.max(1) * 4);
        let writer_db = db.clone();
        let handle = std::thread::Builder::new()
            .name("vigil-intake-writer".into())
            .spawn(move || writer_loop(writer_db, rx, max_batch.max(1)))
            .map_err(|e| storage(redb::Error::Io(e)))?;
        Ok((Intake { db, tx }, IntakeWriter(handle)))
    }

    /// Records `signal` (with its raw `token`) durably. Returns once the commit is on disk.
    pub async fn record(&self, signal: Signal, token: &str) -> Result<RecordOutcome, IntakeError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Record {
                signal: Box::new(signal),
                token: token.to_owned(),
                reply,
            })
            .await
            .map_err(|_| IntakeError::WriterGone)?;
        match rx.await {
            Ok(Ok(outcome)) => Ok(outcome),
            Ok(Err(reason)) => Err(IntakeError::Commit(reason)),
            Err(_) => Err(IntakeError::WriterGone),
        }
    }

    /// Marks signals processed by the next stage: they will not be replayed.
    pub async fn mark_processed(&self, seqs: Vec<u64>) -> Result<(), IntakeError> {
        if seqs.is_empty() {
            return Ok(());
        }
        self.tx
            .send(Command::Processed(seqs))
            .await
            .map_err(|_| IntakeError::WriterGone)
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
            let stored: StoredSet =
                serde_json::from_slice(bytes.value()).map_err(|e| IntakeError::Corrupt {
                    seq,
                    reason: e.to_string(),
                })?;
            out.push(stored.signal);
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
        let stored: StoredSet =
            serde_json::from_slice(bytes.value()).map_err(|e| IntakeError::Corrupt {
                seq,
                reason: e.to_string(),
            })?;
        Ok(Some((stored.signal, stored.token)))
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

    /// Remembers the `state` Vigil sent in its last verification request on `stream` (SSF §8.1.4.2).
    pub fn expect_verification_state(&self, stream: &str, state: &str) -> Result<(), IntakeError> {
        let txn = self.db.begin_write().map_err(storage)?;
        {
            let mut t = txn.open_table(STREAM_STATE).map_err(storage)?;
            t.insert(verify_key(stream).as_str(), state)
                .map_err(storage)?;
        }
        txn.commit().map_err(storage)
    }

    /// The `state` of the last verification Vigil requested on `stream`, if any.
    pub fn expected_verification_state(&self, stream: &str) -> Result<Option<String>, IntakeError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let t = txn.open_table(STREAM_STATE).map_err(storage)?;
        Ok(t.get(verify_key(stream).as_str())
            .map_err(storage)?
            .map(|v| v.value().to_owned()))
    }
}

fn jti_key(iss: &str, jti: &str) -> String {
    format!("{iss}\0{jti}")
}

fn verify_key(stream: &str) -> String {
    format!("verify_state/{stream}")
}

fn writer_loop(db: Arc<Database>, mut rx: mpsc::Receiver<Command>, max_batch: usize) {
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(cmd) => batch.push(cmd),
                Err(_) => break,
            }
        }
        let size = batch.len();
        let started = std::time::Instant::now();
        match write_batch(&db, &batch) {
            Ok(outcomes) => {
                metrics::histogram!("vigil_intake_commit_seconds")
                    .record(started.elapsed().as_secs_f64());
                metrics::histogram!("vigil_intake_batch_size").record(size as f64);
                let mut outcomes = outcomes.into_iter();
                for cmd in batch {
                    if let Command::Record { reply, .. } = cmd {
                        let outcome = outcomes
                            .next()
                            .ok_or_else(|| "writer lost an outcome".to_owned());
                        let _ = reply.send(outcome);
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, size, "intake commit failed; nothing in this batch is acknowledged");
                let reason = e.to_string();
                for cmd in batch {
                    if let Command::Record { reply, .. } = cmd {
                        let _ = reply.send(Err(reason.clone()));
                    }
                }
            }
        }
    }
}

/// Writes one batch in one transaction. Returns the outcomes of the `Record` commands, in order.
fn write_batch(db: &Database, batch: &[Command]) -> Result<Vec<RecordOutcome>, IntakeError> {
    let txn = db.begin_write().map_err(storage)?;
    let mut outcomes = Vec::new();
    {
        let mut sets = txn.open_table(SETS).map_err(storage)?;
        let mut jtis = txn.open_table(JTI).map_err(storage)?;
        let mut pending = txn.open_table(PENDING).map_err(storage)?;
        let mut meta = txn.open_table(META).map_err(storage)?;
        let mut next_seq = meta
            .get("next_seq")
            .map_err(storage)?
            .map(|v| v.value())
            .unwrap_or(1);
        for cmd in batch {
            match cmd {
                Command::Record { signal, token, .. } => {
                    let key = jti_key(&signal.iss, &signal.jti);
                    if let Some(seq) = jtis.get(key.as_str()).map_err(storage)? {
                        outcomes.push(RecordOutcome::Duplicate(seq.value()));
                        continue;
                    }
                    let seq = next_seq;
                    next_seq += 1;
                    let mut signal = (**signal).clone();
                    signal.seq = seq;
                    let stored = StoredSet {
                        signal,
                        token: token.clone(),
                    };
                    let bytes = serde_json::to_vec(&stored).map_err(|e| IntakeError::Corrupt {
                        seq,
                        reason: e.to_string(),
                    })?;
                    sets.insert(seq, bytes.as_slice()).map_err(storage)?;
                    jtis.insert(key.as_str(), seq).map_err(storage)?;
                    pending.insert(seq, ()).map_err(storage)?;
                    outcomes.push(RecordOutcome::Recorded(seq));
                }
                Command::Processed(seqs) => {
                    for seq in seqs {
                        pending.remove(*seq).map_err(storage)?;
                    }
                }
            }
        }
        meta.insert("next_seq", next_seq).map_err(storage)?;
    }
    txn.commit().map_err(storage)?;
    Ok(outcomes)
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
        }
    }

    #[tokio::test]
    async fn records_once_per_jti_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (intake, writer) =
                Intake::open(crate::store::open(dir.path()).unwrap(), 8).unwrap();
            assert_eq!(
                intake.record(signal("a"), "tok").await.unwrap(),
                RecordOutcome::Recorded(1)
            );
            assert_eq!(
                intake.record(signal("b"), "tok").await.unwrap(),
                RecordOutcome::Recorded(2)
            );
            assert_eq!(
                intake.record(signal("a"), "tok").await.unwrap(),
                RecordOutcome::Duplicate(1)
            );
            intake.mark_processed(vec![1]).await.unwrap();
            // A later record goes through the same writer, so the mark is committed by then.
            assert_eq!(
                intake.record(signal("c"), "tok").await.unwrap(),
                RecordOutcome::Recorded(3)
            );
            intake.expect_verification_state("s", "xyz").unwrap();
            drop(intake);
            writer.join();
        }
        let (intake, _writer) = Intake::open(crate::store::open(dir.path()).unwrap(), 8).unwrap();
        assert_eq!(
            intake.record(signal("a"), "tok").await.unwrap(),
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
            intake.expected_verification_state("s").unwrap().as_deref(),
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
        let (intake, _writer) = Intake::open(crate::store::open(dir.path()).unwrap(), 64).unwrap();
        let mut tasks = Vec::new();
        for _ in 0..32 {
            let intake = intake.clone();
            tasks.push(tokio::spawn(async move {
                intake.record(signal("same"), "tok").await.unwrap()
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
