//! SSF 1.0 §8 stream management for enforcement points, and the per-stream outbox of SETs awaiting
//! delivery.
//!
//! Every enforcement point authenticates with its own bearer token and sees and changes only its own
//! streams. A stream's push `authorization_header` is stored but never echoed back. Streams and the
//! outbox persist in the store (`tx_streams`, `tx_outbox`); a SET enters the outbox durably before any
//! delivery attempt and leaves it only when acknowledged (RFC 8936 `ack`).
//!
//! In cluster mode ([`StreamStore::share`]) the configurations and the outbox are shared through
//! the cluster's topics ([`SharedStreams`]): a management call publishes its change and answers once
//! this instance has read it back, so every instance knows every stream; a SET is appended to its
//! stream's partition of the outbox topic, and only the instance owning that partition holds the
//! stream's outbox locally (its rows keyed by the record's offset, so order and SSE event ids are
//! the same after a handover) and delivers it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use futures_util::future::BoxFuture;

use redb::{Database, ReadableTable, TableDefinition, TableHandle};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tokio::sync::Notify;

use crate::clock::Clock;
use crate::events::{EventKind, StreamStatus};
use crate::parts::in_parts;
use crate::store::{BatchWriter, WriteError};

const STREAMS: TableDefinition<&str, &[u8]> = TableDefinition::new("tx_streams");
const OUTBOX: TableDefinition<&str, &[u8]> = TableDefinition::new("tx_outbox");
const DEAD: TableDefinition<&str, &[u8]> = TableDefinition::new("tx_dead_letters");
/// `stream \0 subject JSON` → nothing: a stream's subjects (SSF §8.1.3), one row each, so adding
/// one is one small write instead of a rewrite of the stream record.
const SUBJECTS: TableDefinition<&str, &[u8]> = TableDefinition::new("tx_stream_subjects");
/// `seq_reserved` → the highest outbox sequence number that may have been shown to a receiver.
const SEQ: TableDefinition<&str, u64> = TableDefinition::new("tx_outbox_seq");
const SEQ_RESERVED: &str = "seq_reserved";
/// Outbox sequence numbers reserved on disk at a time. A queued SET is readable (an SSE event
/// id) before its own commit, and an emptied outbox leaves no row to count from: without the
/// reservation a restart would number new SETs again from below ids receivers hold, and an SSE
/// client resuming with `Last-Event-ID` would acknowledge — delete — SETs it never saw. One
/// commit per block keeps the reservation off the data path; a restart skips at most a block.
const SEQ_BLOCK: u64 = 1 << 20;

/// Push (RFC 8935) and poll (RFC 8936) delivery method URNs (SSF §6.1).
pub const PUSH: &str = "urn:ietf:rfc:8935";
pub const POLL: &str = "urn:ietf:rfc:8936";

/// The event types Vigil emits (SSF `events_supported`).
pub fn events_supported() -> Vec<String> {
    [
        EventKind::SessionRevoked,
        EventKind::AssuranceLevelChange,
        EventKind::TokenClaimsChange,
    ]
    .iter()
    .map(|k| k.uri())
    .collect()
}

/// Delivery settings of a stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    pub method: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_url: Option<String>,
    /// Sent by the receiver for push; stored and used, never echoed (see `Stream::config_json`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization_header: Option<String>,
}

/// A stream (SSF §8.1.1) with Vigil's bookkeeping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stream {
    pub stream_id: String,
    /// The enforcement point that owns it.
    pub owner: String,
    pub iss: String,
    pub aud: String,
    pub delivery: Delivery,
    #[serde(default)]
    pub events_requested: Vec<String>,
    #[serde(default)]
    pub description: Option<String>,
    pub status: StreamStatus,
    #[serde(default)]
    pub status_reason: Option<String>,
    /// Subjects of records written before they had a table of their own (`tx_stream_subjects`);
    /// moved there at start-up, never written again.
    #[serde(default, skip_serializing)]
    pub subjects: Vec<Value>,
    pub min_verification_interval: u64,
    #[serde(default)]
    pub last_verification_at: Option<f64>,
}

impl Stream {
    /// `events_delivered`: supported ∩ requested (all supported when nothing was requested).
    pub fn events_delivered(&self) -> Vec<String> {
        let supported = events_supported();
        if self.events_requested.is_empty() {
            return supported;
        }
        supported
            .into_iter()
            .filter(|e| self.events_requested.contains(e))
            .collect()
    }

    /// The stream configuration as SSF §8.1.1 spells it (no secret).
    pub fn config_json(&self) -> Value {
        let mut v = json!({
            "stream_id": self.stream_id,
            "iss": self.iss,
            "aud": self.aud,
            "delivery": {"method": self.delivery.method, "endpoint_url": self.delivery.endpoint_url},
            "events_supported": events_supported(),
            "events_requested": self.events_requested,
            "events_delivered": self.events_delivered(),
            "min_verification_interval": self.min_verification_interval,
        });
        if let Some(d) = &self.description {
            v["description"] = json!(d);
        }
        v
    }
}

/// An outstanding SET.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outgoing {
    pub jti: String,
    pub set: String,
    /// Milliseconds since the epoch when it was queued (for delivery latency).
    pub queued_at_ms: i64,
    /// When an operator last put it back from the dead letters. Its time to be delivered runs
    /// from then: counted from `queued_at_ms`, a SET that died of age went straight back to the
    /// dead letters at the next sweep (or push attempt) after its replay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replayed_at_ms: Option<i64>,
}

impl Outgoing {
    /// Since when it has been waiting to be delivered: its queueing, or its latest replay.
    pub fn waiting_since_ms(&self) -> i64 {
        self.replayed_at_ms.unwrap_or(self.queued_at_ms)
    }
}

/// Why a stream operation failed; mapped to SSF §8 status codes by the HTTP layer.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("no such stream")]
    NotFound,
    #[error("{0}")]
    Invalid(String),
    #[error("verification requested faster than min_verification_interval")]
    TooSoon,
    #[error("storage: {0}")]
    Storage(String),
    #[error("the stream lists as many subjects as it may ({0})")]
    TooManySubjects(usize),
}

impl From<WriteError> for StreamError {
    fn from(e: WriteError) -> Self {
        StreamError::Storage(e.to_string())
    }
}

/// Cluster mode: where the streams' configurations and outboxes are shared (the cluster's
/// streams and outbox topics).
pub trait SharedStreams: Send + Sync {
    /// Appends configuration records ([`stream_record_key`], [`subject_record_key`]; `None`
    /// deletes) and returns once this instance has read them back, so the answer to the call that
    /// made them already reflects them.
    fn configure(&self, records: Vec<ConfigRecord>) -> BoxFuture<'static, Result<(), String>>;
    /// Appends outbox records, each on its stream's partition; returns once the brokers have them.
    fn queue(&self, records: Vec<OutboxRecord>) -> BoxFuture<'static, Result<(), String>>;
    /// Whether this instance delivers `stream`'s SETs (it owns the stream's partition).
    fn delivers(&self, stream: &str) -> bool;
}

/// A change to one SET of a stream's outbox, as the outbox topic holds it (key
/// [`outbox_record_key`]; no entry: delivered).
#[derive(Debug, Clone)]
pub struct OutboxRecord {
    pub stream: String,
    pub jti: String,
    pub entry: Option<OutboxEntry>,
}

/// A SET waiting for delivery, or given up on.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum OutboxEntry {
    Pending { outgoing: Outgoing },
    Dead { letter: DeadLetter },
}

/// A record of the outbox topic as its reader hands it over: the record's offset orders it.
#[derive(Debug, Clone)]
pub struct ReadOutbox {
    pub offset: i64,
    pub key: String,
    pub entry: Option<OutboxEntry>,
}

/// What a record of the outbox topic does to the local row it names.
enum OutboxWrite {
    /// Queued for delivery (the SET).
    Pending(Vec<u8>),
    /// Moved to the dead letters (the letter).
    Dead(Vec<u8>),
    /// Delivered: gone.
    Delivered,
}

/// A record of the cluster's streams topic: its key and value (`None` deletes).
pub type ConfigRecord = (String, Option<Vec<u8>>);

/// The configuration topic's key of a stream's record.
pub fn stream_record_key(id: &str) -> String {
    format!("stream\x1f{id}")
}

/// The configuration topic's key of one of a stream's subjects.
pub fn subject_record_key(stream: &str, subject: &Value) -> String {
    format!("subject\x1f{}", subject_key(stream, subject))
}

/// The outbox topic's key of a SET.
pub fn outbox_record_key(stream: &str, jti: &str) -> String {
    format!("{stream}\x1f{jti}")
}

/// The stream an outbox topic key names.
pub fn stream_of_record(key: &str) -> &str {
    key.split_once('\x1f').map_or(key, |(stream, _)| stream)
}

/// Streams and their outboxes.
pub struct StreamStore {
    db: Arc<Database>,
    writer: BatchWriter,
    streams: RwLock<HashMap<String, Stream>>,
    next_seq: AtomicU64,
    /// Every sequence number up to this one is reserved on disk (`tx_outbox_seq`): a SET numbered
    /// above it is shown to no receiver before a new reservation is written.
    seq_reserved: AtomicU64,
    /// Held from numbering SETs to staging them, so SETs are numbered, written and become
    /// readable in one order: an SSE reader that has sent `n` never finds a later SET below `n`.
    enqueue_order: tokio::sync::Mutex<()>,
    notifiers: dashmap::DashMap<String, Arc<Notify>>,
    /// Woken whenever any stream gets SETs (the push deliverer waits on it).
    any: Arc<Notify>,
    /// Subjects per stream (rows of `tx_stream_subjects`), for the cap.
    subject_counts: dashmap::DashMap<String, usize>,
    /// Ages in the outbox and dead letters' times are read from it.
    clock: Clock,
    /// Cluster mode: the shared topics.
    shared: OnceLock<Arc<dyn SharedStreams>>,
    /// Cluster mode: the local outbox key of each pending SET read from the outbox topic, by its
    /// topic key (a later record of the key is its delivery or dead letter).
    outbox_index: Mutex<HashMap<String, String>>,
    /// When each stream's outbox was last read here (poll, SSE), ms: a poll or SSE stream nobody
    /// reads is paused (`transmitter/outbox_bounds.rs`).
    last_read: Mutex<HashMap<String, i64>>,
    /// Single node: SETs queued whose outbox commit is still being written, by outbox key. Every
    /// reader of the outbox sees them, so a decision reaches enforcement points after its own
    /// commit, not after a second one. A crash before the outbox commit loses nothing: the
    /// decision's hand-off row is still in the store, and queues the same SETs (same `jti`s)
    /// again at the next start.
    staged: Mutex<BTreeMap<String, Outgoing>>,
    /// Outbox rows taken (delivered, acknowledged) whose delete is still being written: every
    /// reader skips them, so a deliverer goes on to the next SET without waiting for that commit.
    /// A crash before it delivers them again, with the same `jti`s (a duplicate to the receiver).
    removing: Arc<Mutex<HashSet<String>>>,
}

/// A SET that could not be delivered, kept for operators to inspect and replay.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeadLetter {
    pub stream_id: String,
    pub outgoing: Outgoing,
    pub error: String,
    pub dead_at_ms: i64,
}

/// What pruning and listing read of a [`DeadLetter`] row: serde skips the SET without copying it.
#[derive(Deserialize)]
struct DeadLetterHead {
    stream_id: String,
    dead_at_ms: i64,
    outgoing: JtiOnly,
}

impl DeadLetterHead {
    /// Whether this letter sits after `after` in the listing's order (`None`: from the start).
    fn after(&self, after: Option<&DeadLetterPosition>) -> bool {
        after.is_none_or(|a| {
            (
                self.dead_at_ms,
                self.stream_id.as_str(),
                self.outgoing.jti.as_str(),
            ) > (a.dead_at_ms, a.stream_id.as_str(), a.jti.as_str())
        })
    }
}

/// Where a dead letter sits in the listing's order — when it died, then its stream and `jti` —
/// the same on every instance, so a cluster's pages merge and go on from one cursor. Ordered by
/// its fields, in that order.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DeadLetterPosition {
    pub dead_at_ms: i64,
    pub stream_id: String,
    pub jti: String,
}

/// Longest cursor [`DeadLetterPosition::from_cursor`] reads: a stream id and a `jti` are short.
const MAX_CURSOR: usize = 2048;

impl DeadLetterPosition {
    /// The position of a listed letter.
    pub fn of(letter: &DeadLetter) -> Self {
        DeadLetterPosition {
            dead_at_ms: letter.dead_at_ms,
            stream_id: letter.stream_id.clone(),
            jti: letter.outgoing.jti.clone(),
        }
    }

    /// The opaque `next` cursor of a listing (base64url of the position's JSON).
    pub fn to_cursor(&self) -> String {
        use base64::Engine as _;
        let json =
            serde_json::to_vec(&(self.dead_at_ms, &self.stream_id, &self.jti)).unwrap_or_default();
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
    }

    /// The position a cursor [`to_cursor`](Self::to_cursor) wrote; `None` for anything else.
    pub fn from_cursor(cursor: &str) -> Option<Self> {
        use base64::Engine as _;
        if cursor.len() > MAX_CURSOR {
            return None;
        }
        let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(cursor)
            .ok()?;
        let (dead_at_ms, stream_id, jti): (i64, String, String) =
            serde_json::from_slice(&json).ok()?;
        Some(DeadLetterPosition {
            dead_at_ms,
            stream_id,
            jti,
        })
    }
}

/// One page of the dead-letter listing.
#[derive(Debug)]
pub struct DeadLetterPage {
    /// Oldest first, after the asked position.
    pub letters: Vec<DeadLetter>,
    /// How many the listing's stream (or every stream) holds, whatever the position.
    pub total: usize,
    /// Whether more follow the last one listed.
    pub more: bool,
}

/// What a replay did (also its answer, `POST /v1/deadletters/replay`, and another instance's).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replayed {
    /// Put back into their streams' outboxes.
    pub replayed: usize,
    /// Left where they are: their stream was deleted or is disabled (it holds nothing, SSF
    /// §8.1.2), so nothing would ever deliver them; they go with the dead letters' age.
    #[serde(default)]
    pub skipped: usize,
    /// Left where they are for now: their stream's outbox is at `delivery.max_outbox_per_stream`
    /// (put back, the next sweep would move them, or the stream's oldest, to the dead letters
    /// again). A replay once its receiver has read puts them back.
    #[serde(default)]
    pub deferred: usize,
}

/// The dead letters a replay is to put back ([`StreamStore::dead_letters_to_replay`]).
pub struct ToReplay {
    keys: Vec<String>,
    skipped: usize,
    deferred: usize,
}

/// SETs queued by [`StreamStore::start_enqueue`] whose commit may still be in flight.
#[must_use = "the SETs stay staged until `committed` is awaited"]
pub struct Enqueued {
    written: Option<crate::store::PendingWrite<()>>,
    /// Their outbox keys, staged for the deliverers until the commit ends.
    staged: Vec<String>,
    sets: usize,
}

impl Enqueued {
    /// Waits for the commit. Committed: the rows are in the table. Failed: the decisions stay in
    /// the hand-off and their SETs are queued again (same `jti`s) by the caller's retry or the
    /// next start.
    pub async fn committed(self, store: &StreamStore) -> Result<(), StreamError> {
        let Some(written) = self.written else {
            // Nothing queued, or written before `start_enqueue` returned.
            metrics::counter!(crate::telemetry::SETS_EMITTED).increment(self.sets as u64);
            return Ok(());
        };
        let written = written.wait().await;
        store.unstage(&self.staged);
        written?;
        metrics::counter!(crate::telemetry::SETS_EMITTED).increment(self.sets as u64);
        Ok(())
    }
}

/// Dead letters replayed per transaction: a replay of `delivery.max_dead_letters` holds a
/// chunk's SETs in memory at a time, and the writer's other work waits for a chunk, not for all.
const REPLAY_CHUNK: usize = 256;

#[derive(Deserialize)]
struct JtiOnly {
    jti: String,
}

fn storage<E: Into<redb::Error>>(e: E) -> StreamError {
    StreamError::Storage(e.into().to_string())
}

fn outbox_key(stream: &str, seq: u64) -> String {
    format!("{stream}\0{seq:020}")
}

fn subject_key(stream: &str, subject: &Value) -> String {
    // serde_json's maps are sorted, so equal subjects serialize alike.
    format!("{stream}\0{subject}")
}

/// Moves the subjects kept inside stream records by earlier releases into `tx_stream_subjects`,
/// and rewrites those records without them, in one transaction.
fn migrate_subjects(db: &Database) -> Result<(), StreamError> {
    let txn = db.begin_write().map_err(storage)?;
    {
        let mut streams = txn.open_table(STREAMS).map_err(storage)?;
        let mut subjects = txn.open_table(SUBJECTS).map_err(storage)?;
        let mut rewrite = Vec::new();
        for entry in streams.iter().map_err(storage)? {
            let (k, v) = entry.map_err(storage)?;
            if let Ok(s) = serde_json::from_slice::<Stream>(v.value()) {
                if !s.subjects.is_empty() {
                    rewrite.push((k.value().to_owned(), s));
                }
            }
        }
        for (key, mut stream) in rewrite {
            for subject in std::mem::take(&mut stream.subjects) {
                subjects
                    .insert(
                        subject_key(&stream.stream_id, &subject).as_str(),
                        [].as_slice(),
                    )
                    .map_err(storage)?;
            }
            let bytes =
                serde_json::to_vec(&stream).map_err(|e| StreamError::Storage(e.to_string()))?;
            streams
                .insert(key.as_str(), bytes.as_slice())
                .map_err(storage)?;
        }
    }
    txn.commit().map_err(storage)
}

/// Writes the outbox's sequence reservation, in the transaction of the rows numbered past the
/// previous one ([`StreamStore::number`]).
fn reserve_in(txn: &redb::WriteTransaction, through: Option<u64>) -> Result<(), WriteError> {
    if let Some(through) = through {
        txn.open_table(SEQ)
            .map_err(WriteError::storage)?
            .insert(SEQ_RESERVED, through)
            .map_err(WriteError::storage)?;
    }
    Ok(())
}

/// The sequence number of an outbox key.
pub fn seq_of(key: &str) -> u64 {
    key.rsplit('\0')
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

impl StreamStore {
    pub fn open(
        db: Arc<Database>,
        writer: BatchWriter,
        clock: Clock,
    ) -> Result<StreamStore, StreamError> {
        let txn = db.begin_write().map_err(storage)?;
        {
            txn.open_table(STREAMS).map_err(storage)?;
            txn.open_table(OUTBOX).map_err(storage)?;
            txn.open_table(DEAD).map_err(storage)?;
            txn.open_table(SUBJECTS).map_err(storage)?;
            txn.open_table(SEQ).map_err(storage)?;
        }
        txn.commit().map_err(storage)?;
        migrate_subjects(&db)?;
        let txn = db.begin_read().map_err(storage)?;
        let mut streams = HashMap::new();
        for entry in txn
            .open_table(STREAMS)
            .map_err(storage)?
            .iter()
            .map_err(storage)?
        {
            let (_, v) = entry.map_err(storage)?;
            if let Ok(s) = serde_json::from_slice::<Stream>(v.value()) {
                streams.insert(s.stream_id.clone(), s);
            }
        }
        // The numbers left in the tables count too: releases before the reservation wrote none.
        let mut max_seq = 0;
        for table in [OUTBOX, DEAD] {
            for entry in txn
                .open_table(table)
                .map_err(storage)?
                .iter()
                .map_err(storage)?
            {
                let (k, _) = entry.map_err(storage)?;
                max_seq = max_seq.max(seq_of(k.value()));
            }
        }
        if let Some(reserved) = txn
            .open_table(SEQ)
            .map_err(storage)?
            .get(SEQ_RESERVED)
            .map_err(storage)?
        {
            max_seq = max_seq.max(reserved.value());
        }
        let subject_counts = dashmap::DashMap::new();
        for entry in txn
            .open_table(SUBJECTS)
            .map_err(storage)?
            .iter()
            .map_err(storage)?
        {
            let (k, _) = entry.map_err(storage)?;
            if let Some((stream, _)) = k.value().split_once('\0') {
                *subject_counts.entry(stream.to_owned()).or_insert(0) += 1;
            }
        }
        Ok(StreamStore {
            db,
            writer,
            streams: RwLock::new(streams),
            next_seq: AtomicU64::new(max_seq.saturating_add(1)),
            // Nothing above what an earlier run may have shown is reserved yet: the first SETs
            // queued write the next reservation.
            seq_reserved: AtomicU64::new(max_seq),
            enqueue_order: tokio::sync::Mutex::new(()),
            notifiers: dashmap::DashMap::new(),
            any: Arc::new(Notify::new()),
            subject_counts,
            clock,
            shared: OnceLock::new(),
            outbox_index: Mutex::new(HashMap::new()),
            last_read: Mutex::new(HashMap::new()),
            staged: Mutex::new(BTreeMap::new()),
            removing: Arc::new(Mutex::new(HashSet::new())),
        })
    }

    /// Cluster mode from now on: what the local tables held (an earlier run's, stale since) is
    /// dropped; the configurations are read back from the streams topic and the outboxes of the
    /// streams this instance delivers from the outbox topic.
    pub async fn share(&self, shared: Arc<dyn SharedStreams>) -> Result<(), StreamError> {
        self.writer
            .write(|txn| {
                for table in [STREAMS, SUBJECTS, OUTBOX, DEAD] {
                    txn.delete_table(table).map_err(WriteError::storage)?;
                    txn.open_table(table).map_err(WriteError::storage)?;
                }
                Ok(())
            })
            .await?;
        if let Ok(mut g) = self.streams.write() {
            g.clear();
        }
        self.subject_counts.clear();
        self.index().clear();
        self.shared
            .set(shared)
            .map_err(|_| StreamError::Storage("the streams are shared already".into()))
    }

    fn index(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        match self.outbox_index.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Whether this instance delivers `stream`'s SETs: always on a single node; in cluster mode
    /// when it owns the stream's partition.
    pub fn delivers(&self, stream: &str) -> bool {
        self.shared.get().is_none_or(|s| s.delivers(stream))
    }

    /// Publishes outbox changes without waiting: a delivery or dead letter not yet in the topic
    /// when this instance stops means the SET is delivered again by the next owner (same `jti`).
    fn publish_outbox(&self, records: Vec<OutboxRecord>) {
        let Some(shared) = self.shared.get() else {
            return;
        };
        if records.is_empty() {
            return;
        }
        let queued = shared.queue(records);
        tokio::spawn(async move {
            if let Err(e) = queued.await {
                tracing::warn!(error = %e, "an outbox change was not published; the next owner may deliver those SETs again");
            }
        });
    }

    /// Cluster mode: takes up a record of the streams topic (its configurations).
    pub async fn apply_config(&self, key: &str, value: Option<&[u8]>) -> Result<(), StreamError> {
        if let Some(id) = key.strip_prefix("stream\x1f") {
            let stream = match value.map(serde_json::from_slice::<Stream>) {
                Some(Ok(s)) if s.stream_id == id => Some(s),
                Some(_) => {
                    return Err(StreamError::Invalid(format!(
                        "unreadable stream record {id}"
                    )))
                }
                None => None,
            };
            let (id, row) = (id.to_owned(), value.map(<[u8]>::to_vec));
            let key = id.clone();
            self.writer
                .write(move |txn| {
                    let mut t = txn.open_table(STREAMS).map_err(WriteError::storage)?;
                    match &row {
                        Some(bytes) => t.insert(key.as_str(), bytes.as_slice()),
                        None => t.remove(key.as_str()),
                    }
                    .map_err(WriteError::storage)?;
                    Ok(())
                })
                .await?;
            let live = stream
                .as_ref()
                .is_some_and(|s| s.status != StreamStatus::Disabled);
            if let Ok(mut g) = self.streams.write() {
                match stream {
                    Some(s) => g.insert(id.clone(), s),
                    None => g.remove(&id),
                };
            }
            // A deleted or disabled stream holds nothing (SSF §8.1.2); its deliverer drops it.
            if !live && self.delivers(&id) {
                self.drop_outbox(&id).await?;
            }
            self.notify(&id);
        } else if let Some(subject) = key.strip_prefix("subject\x1f") {
            let Some((stream, _)) = subject.split_once('\0') else {
                return Err(StreamError::Invalid("unreadable subject record".into()));
            };
            let present = self.has_row(SUBJECTS, subject)?;
            match (value.is_some(), present) {
                (true, false) => {
                    let row = subject.to_owned();
                    self.writer
                        .write(move |txn| {
                            txn.open_table(SUBJECTS)
                                .map_err(WriteError::storage)?
                                .insert(row.as_str(), [].as_slice())
                                .map_err(WriteError::storage)?;
                            Ok(())
                        })
                        .await?;
                    *self.subject_counts.entry(stream.to_owned()).or_insert(0) += 1;
                }
                (false, true) => {
                    self.remove_rows(SUBJECTS, vec![subject.to_owned()]).await?;
                    if let Some(mut c) = self.subject_counts.get_mut(stream) {
                        *c = c.saturating_sub(1);
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Cluster mode: takes up records of the outbox topic, in offset order, in one write: a
    /// pending SET enters its stream's outbox under its offset, a dead letter or delivery
    /// replaces it.
    pub async fn apply_outbox(&self, records: Vec<ReadOutbox>) -> Result<(), StreamError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut writes: Vec<(String, OutboxWrite)> = Vec::new();
        let mut touched = HashSet::new();
        {
            let mut index = self.index();
            for r in records {
                let stream = stream_of_record(&r.key).to_owned();
                // Sequence numbers start at 1 (an SSE `Last-Event-ID` of 0 acknowledges nothing).
                let offset = u64::try_from(r.offset).unwrap_or(0).saturating_add(1);
                match r.entry {
                    Some(OutboxEntry::Pending { outgoing }) => {
                        let local = outbox_key(&stream, offset);
                        let bytes = serde_json::to_vec(&outgoing)
                            .map_err(|e| StreamError::Storage(e.to_string()))?;
                        index.insert(r.key, local.clone());
                        writes.push((local, OutboxWrite::Pending(bytes)));
                    }
                    Some(OutboxEntry::Dead { letter }) => {
                        let local = index
                            .remove(&r.key)
                            .unwrap_or_else(|| outbox_key(&stream, offset));
                        let bytes = serde_json::to_vec(&letter)
                            .map_err(|e| StreamError::Storage(e.to_string()))?;
                        writes.push((local, OutboxWrite::Dead(bytes)));
                    }
                    None => {
                        if let Some(local) = index.remove(&r.key) {
                            writes.push((local, OutboxWrite::Delivered));
                        }
                    }
                }
                touched.insert(stream);
            }
        }
        self.writer
            .write(move |txn| {
                let mut outbox = txn.open_table(OUTBOX).map_err(WriteError::storage)?;
                let mut dead = txn.open_table(DEAD).map_err(WriteError::storage)?;
                for (key, write) in &writes {
                    let key = key.as_str();
                    match write {
                        OutboxWrite::Pending(bytes) => {
                            outbox.insert(key, bytes.as_slice()).map(drop)
                        }
                        OutboxWrite::Dead(bytes) => outbox
                            .remove(key)
                            .and_then(|_| dead.insert(key, bytes.as_slice()))
                            .map(drop),
                        OutboxWrite::Delivered => outbox.remove(key).map(drop),
                    }
                    .map_err(WriteError::storage)?;
                }
                Ok(())
            })
            .await?;
        for stream in touched {
            self.notify(&stream);
        }
        Ok(())
    }

    /// Cluster mode: forgets the outboxes and dead letters of the streams `gone` selects (their
    /// partitions moved to another instance, or are about to be read back).
    pub async fn release_outbox(
        &self,
        gone: &(dyn Fn(&str) -> bool + Sync),
    ) -> Result<usize, StreamError> {
        let mut rows: Vec<(bool, String)> = Vec::new();
        {
            let txn = self.db.begin_read().map_err(storage)?;
            for (dead, table) in [(false, OUTBOX), (true, DEAD)] {
                let t = txn.open_table(table).map_err(storage)?;
                for entry in t.iter().map_err(storage)? {
                    let (k, _) = entry.map_err(storage)?;
                    let key = k.value();
                    if gone(key.split('\0').next().unwrap_or_default()) {
                        rows.push((dead, key.to_owned()));
                    }
                }
            }
        }
        self.index().retain(|key, _| !gone(stream_of_record(key)));
        let n = rows.len();
        if n > 0 {
            self.writer
                .write(move |txn| {
                    let mut outbox = txn.open_table(OUTBOX).map_err(WriteError::storage)?;
                    let mut dead = txn.open_table(DEAD).map_err(WriteError::storage)?;
                    for (is_dead, key) in &rows {
                        if *is_dead {
                            dead.remove(key.as_str())
                        } else {
                            outbox.remove(key.as_str())
                        }
                        .map_err(WriteError::storage)?;
                    }
                    Ok(())
                })
                .await?;
        }
        Ok(n)
    }

    /// Adds a subject to a stream (idempotent), refusing one more than `max`.
    pub async fn add_subject(
        &self,
        stream: &str,
        subject: &Value,
        max: usize,
    ) -> Result<(), StreamError> {
        let key = subject_key(stream, subject);
        if self.has_row(SUBJECTS, &key)? {
            return Ok(());
        }
        let count = self.subject_counts.get(stream).map_or(0, |c| *c);
        if count >= max {
            return Err(StreamError::TooManySubjects(max));
        }
        if let Some(shared) = self.shared.get() {
            return configure(
                shared,
                vec![(subject_record_key(stream, subject), Some(b"1".to_vec()))],
            )
            .await;
        }
        self.writer
            .write(move |txn| {
                txn.open_table(SUBJECTS)
                    .map_err(WriteError::storage)?
                    .insert(key.as_str(), [].as_slice())
                    .map_err(WriteError::storage)?;
                Ok(())
            })
            .await?;
        *self.subject_counts.entry(stream.to_owned()).or_insert(0) += 1;
        Ok(())
    }

    /// Removes a subject from a stream (nothing if it was not there).
    pub async fn remove_subject(&self, stream: &str, subject: &Value) -> Result<(), StreamError> {
        let key = subject_key(stream, subject);
        if !self.has_row(SUBJECTS, &key)? {
            return Ok(());
        }
        if let Some(shared) = self.shared.get() {
            return configure(shared, vec![(subject_record_key(stream, subject), None)]).await;
        }
        self.remove_rows(SUBJECTS, vec![key]).await?;
        if let Some(mut c) = self.subject_counts.get_mut(stream) {
            *c = c.saturating_sub(1);
        }
        Ok(())
    }

    /// A stream's subjects, in key order.
    pub fn subjects(&self, stream: &str) -> Result<Vec<Value>, StreamError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let t = txn.open_table(SUBJECTS).map_err(storage)?;
        let prefix = format!("{stream}\0");
        let mut out = Vec::new();
        for entry in t.range(prefix.as_str()..).map_err(storage)? {
            let (k, _) = entry.map_err(storage)?;
            let Some(json) = k.value().strip_prefix(prefix.as_str()) else {
                break;
            };
            if let Ok(v) = serde_json::from_str(json) {
                out.push(v);
            }
        }
        Ok(out)
    }

    fn has_row(
        &self,
        table: TableDefinition<'static, &'static str, &'static [u8]>,
        key: &str,
    ) -> Result<bool, StreamError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let t = txn.open_table(table).map_err(storage)?;
        Ok(t.get(key).map_err(storage)?.is_some())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Stream>> {
        match self.streams.read() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// The stream `id` if `owner` owns it.
    pub fn get(&self, owner: &str, id: &str) -> Result<Stream, StreamError> {
        self.read()
            .get(id)
            .filter(|s| s.owner == owner)
            .cloned()
            .ok_or(StreamError::NotFound)
    }

    pub fn list(&self, owner: &str) -> Vec<Stream> {
        let mut v: Vec<Stream> = self
            .read()
            .values()
            .filter(|s| s.owner == owner)
            .cloned()
            .collect();
        v.sort_by(|a, b| a.stream_id.cmp(&b.stream_id));
        v
    }

    /// Every stream that is not disabled.
    pub fn live(&self) -> Vec<Stream> {
        self.read()
            .values()
            .filter(|s| s.status != StreamStatus::Disabled)
            .cloned()
            .collect()
    }

    /// Creates or replaces a stream, durably.
    pub async fn put(&self, stream: Stream) -> Result<(), StreamError> {
        let bytes = serde_json::to_vec(&stream).map_err(|e| StreamError::Storage(e.to_string()))?;
        if let Some(shared) = self.shared.get() {
            return configure(
                shared,
                vec![(stream_record_key(&stream.stream_id), Some(bytes))],
            )
            .await;
        }
        let id = stream.stream_id.clone();
        self.writer
            .write(move |txn| {
                txn.open_table(STREAMS)
                    .map_err(WriteError::storage)?
                    .insert(id.as_str(), bytes.as_slice())
                    .map_err(WriteError::storage)?;
                Ok(())
            })
            .await?;
        if let Ok(mut g) = self.streams.write() {
            g.insert(stream.stream_id.clone(), stream);
        }
        Ok(())
    }

    /// Removes rows of one table in a single durable write.
    async fn remove_rows(
        &self,
        table: TableDefinition<'static, &'static str, &'static [u8]>,
        keys: Vec<String>,
    ) -> Result<(), StreamError> {
        if keys.is_empty() {
            return Ok(());
        }
        if table.name() == OUTBOX.name() {
            self.unstage(&keys);
        }
        self.writer
            .write(move |txn| {
                let mut t = txn.open_table(table).map_err(WriteError::storage)?;
                for k in &keys {
                    t.remove(k.as_str()).map_err(WriteError::storage)?;
                }
                Ok(())
            })
            .await?;
        Ok(())
    }

    /// Deletes a stream and its outbox.
    pub async fn delete(&self, owner: &str, id: &str) -> Result<(), StreamError> {
        self.get(owner, id)?;
        if let Some(shared) = self.shared.get() {
            // Its deliverer drops the outbox when it reads the deletion.
            let mut records: Vec<ConfigRecord> = self
                .subjects(id)?
                .iter()
                .map(|v| (subject_record_key(id, v), None))
                .collect();
            records.push((stream_record_key(id), None));
            return configure(shared, records).await;
        }
        self.drop_outbox(id).await?;
        let subjects = self
            .subjects(id)?
            .iter()
            .map(|v| subject_key(id, v))
            .collect();
        self.remove_rows(SUBJECTS, subjects).await?;
        self.subject_counts.remove(id);
        self.remove_rows(STREAMS, vec![id.to_owned()]).await?;
        if let Ok(mut g) = self.streams.write() {
            g.remove(id);
        }
        self.notify(id);
        Ok(())
    }

    /// Drops every outstanding SET of a stream (a disabled stream holds nothing, SSF §8.1.2).
    pub async fn drop_outbox(&self, id: &str) -> Result<(), StreamError> {
        let rows = self.outstanding(id, usize::MAX)?.0;
        let records = rows
            .iter()
            .map(|(_, o)| OutboxRecord {
                stream: id.to_owned(),
                jti: o.jti.clone(),
                entry: None,
            })
            .collect();
        self.forget_indexed(id, &rows);
        self.remove_rows(OUTBOX, rows.into_iter().map(|(k, _)| k).collect())
            .await?;
        self.publish_outbox(records);
        Ok(())
    }

    /// Cluster mode: forgets the index entries of rows leaving the outbox.
    fn forget_indexed(&self, stream: &str, rows: &[(String, Outgoing)]) {
        if self.shared.get().is_some() {
            let mut index = self.index();
            for (_, o) in rows {
                index.remove(&outbox_record_key(stream, &o.jti));
            }
        }
    }

    /// Queues SETs durably: `(stream_id, Outgoing)` pairs, in order. `handed_over` are the hand-off
    /// marks ([`crate::engine::HandoffMark`]) of the decisions these SETs come from: they are
    /// marked taken over in the same transaction. Resolves once that is on disk.
    pub async fn enqueue(
        &self,
        items: Vec<(String, Outgoing)>,
        handed_over: Vec<crate::engine::HandoffMark>,
    ) -> Result<(), StreamError> {
        self.start_enqueue(items, handed_over)
            .await?
            .committed(self)
            .await
    }

    /// [`StreamStore::enqueue`] up to the moment its write is queued — after which the SETs are
    /// in order with everything queued later and their deliverers have them — leaving the wait
    /// for the commit to [`Enqueued::committed`]: a caller can queue the next SETs meanwhile, so
    /// queueing is not held to one commit at a time.
    pub async fn start_enqueue(
        &self,
        items: Vec<(String, Outgoing)>,
        handed_over: Vec<crate::engine::HandoffMark>,
    ) -> Result<Enqueued, StreamError> {
        let sets = items.len();
        if items.is_empty() && handed_over.is_empty() {
            return Ok(Enqueued {
                written: None,
                staged: Vec::new(),
                sets,
            });
        }
        if let Some(shared) = self.shared.get() {
            // The SETs go to their streams' deliverers through the outbox topic; only the hand-off
            // is this instance's to mark.
            let records = items
                .into_iter()
                .map(|(stream, out)| OutboxRecord {
                    stream,
                    jti: out.jti.clone(),
                    entry: Some(OutboxEntry::Pending { outgoing: out }),
                })
                .collect();
            shared.queue(records).await.map_err(StreamError::Storage)?;
            let written = self
                .writer
                .queue(move |txn| crate::engine::handoff_done_in(txn, &handed_over))
                .await?;
            return Ok(Enqueued {
                written: Some(written),
                staged: Vec::new(),
                sets,
            });
        }
        let _order = self.enqueue_order.lock().await;
        let (first, reserve) = self.number(items.len());
        let mut rows = Vec::with_capacity(items.len());
        for (seq, (stream, out)) in (first..).zip(&items) {
            let bytes = serde_json::to_vec(out).map_err(|e| StreamError::Storage(e.to_string()))?;
            rows.push((outbox_key(stream, seq), bytes));
        }
        let keys: Vec<String> = rows.iter().map(|(k, _)| k.clone()).collect();
        // Queued before the SETs are staged: whatever a deliverer then does with a staged SET
        // (delivered, dead-lettered) is queued after this insert, and the writer commits in order.
        let written = self
            .writer
            .queue(move |txn| {
                let mut t = txn.open_table(OUTBOX).map_err(WriteError::storage)?;
                for (k, v) in &rows {
                    t.insert(k.as_str(), v.as_slice())
                        .map_err(WriteError::storage)?;
                }
                reserve_in(txn, reserve)?;
                crate::engine::handoff_done_in(txn, &handed_over)
            })
            .await?;
        let written = match reserve {
            // Numbered past the reservation: readable once the new one is on disk, with the rows.
            Some(through) => {
                written.wait().await?;
                self.seq_reserved.fetch_max(through, Ordering::SeqCst);
                None
            }
            None => {
                self.staged().extend(
                    keys.iter()
                        .cloned()
                        .zip(items.iter().map(|(_, o)| o.clone())),
                );
                Some(written)
            }
        };
        for (stream, _) in &items {
            self.notify(stream);
        }
        Ok(Enqueued {
            staged: if written.is_some() { keys } else { Vec::new() },
            written,
            sets,
        })
    }

    /// Draws `n` sequence numbers — call with `enqueue_order` held — and says the reservation
    /// to write with them ([`reserve_in`]) when they go past the one on disk: then nothing
    /// numbered with them may be read before that write commits.
    fn number(&self, n: usize) -> (u64, Option<u64>) {
        let Some(n) = u64::try_from(n).ok().filter(|n| *n > 0) else {
            return (self.next_seq.load(Ordering::SeqCst), None);
        };
        let first = self.next_seq.fetch_add(n, Ordering::SeqCst);
        let last = first.saturating_add(n - 1);
        let reserve = (last > self.seq_reserved.load(Ordering::SeqCst))
            .then(|| last.saturating_add(SEQ_BLOCK));
        (first, reserve)
    }

    fn staged(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Outgoing>> {
        self.staged
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn removing(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.removing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Removes outbox rows a receiver took, without waiting for the commit: readers skip them
    /// from now on, the delete is queued behind everything written before (their inserts too),
    /// and they are forgotten as "being removed" once it is on disk.
    async fn take_rows(&self, keys: Vec<String>) -> Result<(), StreamError> {
        if keys.is_empty() {
            return Ok(());
        }
        self.unstage(&keys);
        self.removing().extend(keys.iter().cloned());
        let done = keys.clone();
        let queued = self
            .writer
            .queue(move |txn| {
                let mut t = txn.open_table(OUTBOX).map_err(WriteError::storage)?;
                for k in &done {
                    t.remove(k.as_str()).map_err(WriteError::storage)?;
                }
                Ok(())
            })
            .await;
        let removing = self.removing.clone();
        let forget = move || {
            let mut r = removing
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for k in &keys {
                r.remove(k);
            }
        };
        match queued {
            Err(e) => {
                forget();
                Err(e.into())
            }
            Ok(pending) => {
                tokio::spawn(async move {
                    if let Err(e) = pending.wait().await {
                        tracing::warn!(error = %e, "a delivered SET's removal was not written; it is delivered again (same jti)");
                    }
                    forget();
                });
                Ok(())
            }
        }
    }

    fn unstage(&self, keys: &[String]) {
        let mut staged = self.staged();
        if staged.is_empty() {
            return;
        }
        for k in keys {
            staged.remove(k);
        }
    }

    /// Staged SETs with keys in `range` that `keep` selects, at most `max`, oldest first.
    fn staged_in(
        &self,
        range: (std::ops::Bound<&str>, std::ops::Bound<&str>),
        max: usize,
        keep: impl Fn(&Outgoing) -> bool,
    ) -> Vec<(String, Outgoing)> {
        let staged = self.staged();
        if staged.is_empty() {
            return Vec::new();
        }
        staged
            .range::<str, _>(range)
            .filter(|(_, o)| keep(o))
            .take(max)
            .map(|(k, o)| (k.clone(), o.clone()))
            .collect()
    }

    /// Up to `max` outstanding SETs of a stream, oldest first, and whether more remain.
    #[allow(clippy::type_complexity)]
    pub fn outstanding(
        &self,
        id: &str,
        max: usize,
    ) -> Result<(Vec<(String, Outgoing)>, bool), StreamError> {
        self.outstanding_after(id, 0, max)
    }

    /// How many SETs a stream has outstanding, counted up to `cap`, and whether there are more.
    /// Only keys are read (nothing decoded), and — unlike a read for its receiver — the stream's
    /// last read stays as it was: an operator's look at the delivery state would otherwise keep
    /// a stream nobody reads from being paused.
    pub fn outstanding_count(&self, id: &str, cap: usize) -> Result<(usize, bool), StreamError> {
        use std::ops::Bound::{Excluded, Included};
        let (start, end) = (outbox_key(id, 0), format!("{id}\u{1}"));
        let range = (Included(start.as_str()), Excluded(end.as_str()));
        let want = cap.saturating_add(1);
        // Staged rows not yet committed count too; one both staged and committed counts once.
        let mut keys: HashSet<String> = self
            .staged()
            .range::<str, _>(range)
            .take(want)
            .map(|(k, _)| k.clone())
            .collect();
        let removing = self.removing();
        let txn = self.db.begin_read().map_err(storage)?;
        let t = txn.open_table(OUTBOX).map_err(storage)?;
        let mut committed = 0;
        for entry in t.range::<&str>(range).map_err(storage)? {
            if committed >= want {
                break;
            }
            let (k, _) = entry.map_err(storage)?;
            if !removing.contains(k.value()) {
                committed += 1;
                keys.insert(k.value().to_owned());
            }
        }
        Ok((keys.len().min(cap), keys.len() > cap))
    }

    /// Like [`StreamStore::outstanding`], for SETs with a sequence number above `after`.
    #[allow(clippy::type_complexity)]
    pub fn outstanding_after(
        &self,
        id: &str,
        after: u64,
        max: usize,
    ) -> Result<(Vec<(String, Outgoing)>, bool), StreamError> {
        self.last_read
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id.to_owned(), self.clock.now_ms());
        use std::ops::Bound::{Excluded, Included};
        let start = outbox_key(id, after.saturating_add(1));
        let end = format!("{id}\u{1}");
        // The first `max + 1` are enough to know the first `max` and whether more remain.
        let rows = self.read_outbox(
            (Included(start.as_str()), Excluded(end.as_str())),
            max.saturating_add(1),
            |_| true,
        )?;
        let more = rows.len() > max;
        Ok((rows.into_iter().take(max).collect(), more))
    }

    /// The outbox's SETs with keys in `range` that `keep` selects, the first `want` of them by
    /// key: committed rows and staged ones merged (a row committed but not yet unstaged is in
    /// both), rows being removed skipped.
    fn read_outbox(
        &self,
        range: (std::ops::Bound<&str>, std::ops::Bound<&str>),
        want: usize,
        keep: impl Fn(&Outgoing) -> bool,
    ) -> Result<BTreeMap<String, Outgoing>, StreamError> {
        let mut merged: BTreeMap<String, Outgoing> =
            self.staged_in(range, want, &keep).into_iter().collect();
        // Held while the table is read (no await here): a delete being queued waits a moment.
        let removing = self.removing();
        let txn = self.db.begin_read().map_err(storage)?;
        let t = txn.open_table(OUTBOX).map_err(storage)?;
        let mut found = 0;
        for entry in t.range::<&str>(range).map_err(storage)? {
            if found >= want {
                break;
            }
            let (k, v) = entry.map_err(storage)?;
            if removing.contains(k.value()) {
                continue;
            }
            if let Ok(o) = serde_json::from_slice::<Outgoing>(v.value()) {
                if keep(&o) {
                    found += 1;
                    merged.insert(k.value().to_owned(), o);
                }
            }
        }
        while merged.len() > want {
            merged.pop_last();
        }
        Ok(merged)
    }

    /// Removes acknowledged (or rejected) SETs of a stream by `jti`.
    /// `method` labels the delivery metrics (`poll`, `sse`). The outbox is read oldest first and
    /// only until every `jti` is found: what a receiver acknowledges is what it was last given,
    /// the oldest outstanding SETs, so an acknowledgement does not read the whole outbox.
    pub async fn acknowledge(
        &self,
        id: &str,
        jtis: &[String],
        method: &'static str,
    ) -> Result<usize, StreamError> {
        if jtis.is_empty() {
            return Ok(0);
        }
        let wanted: HashSet<&str> = jtis.iter().map(String::as_str).collect();
        let found = self.scan(id, u64::MAX, wanted.len(), |o| {
            wanted.contains(o.jti.as_str())
        })?;
        self.remove_delivered(found, method).await
    }

    /// Removes every SET of a stream up to and including sequence `through` (SSE `Last-Event-ID`),
    /// reading only those.
    pub async fn acknowledge_through(&self, id: &str, through: u64) -> Result<usize, StreamError> {
        let found = self.scan(id, through, usize::MAX, |_| true)?;
        self.remove_delivered(found, "sse").await
    }

    /// The outstanding SETs of a stream with a sequence number up to `through` that `keep`
    /// selects, oldest first, stopping once `want` are found.
    fn scan(
        &self,
        id: &str,
        through: u64,
        want: usize,
        keep: impl Fn(&Outgoing) -> bool,
    ) -> Result<Vec<(String, Outgoing)>, StreamError> {
        use std::ops::Bound::Included;
        let (start, end) = (outbox_key(id, 0), outbox_key(id, through));
        let rows = self.read_outbox(
            (Included(start.as_str()), Included(end.as_str())),
            want,
            keep,
        )?;
        Ok(rows.into_iter().collect())
    }

    /// Removes SETs their receiver took, counting them (and, for poll, their delivery time).
    async fn remove_delivered(
        &self,
        rows: Vec<(String, Outgoing)>,
        method: &'static str,
    ) -> Result<usize, StreamError> {
        let now = self.clock.now_ms();
        if let Some((key, _)) = rows.first() {
            let stream = key.split('\0').next().unwrap_or_default().to_owned();
            self.forget_indexed(&stream, &rows);
            self.publish_outbox(
                rows.iter()
                    .map(|(_, o)| OutboxRecord {
                        stream: stream.clone(),
                        jti: o.jti.clone(),
                        entry: None,
                    })
                    .collect(),
            );
        }
        let keys: Vec<String> = rows
            .into_iter()
            .map(|(k, o)| {
                if method == "poll" {
                    metrics::histogram!(crate::telemetry::DECISION_DELIVERED_SECONDS, "method" => method)
                        .record((now - o.queued_at_ms).max(0) as f64 / 1000.0);
                }
                k
            })
            .collect();
        let n = keys.len();
        self.take_rows(keys).await?;
        metrics::counter!(crate::telemetry::SETS_DELIVERED, "method" => method).increment(n as u64);
        Ok(n)
    }

    /// The clock the outbox's ages are read from.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// The notifier woken when a stream gets SETs (long polls wait on it).
    pub fn notifier(&self, id: &str) -> Arc<Notify> {
        self.notifiers.entry(id.to_owned()).or_default().clone()
    }

    fn notify(&self, id: &str) {
        if let Some(n) = self.notifiers.get(id) {
            n.notify_waiters();
        }
        self.any.notify_one();
    }

    /// Woken when any stream gets SETs.
    pub fn any_notifier(&self) -> Arc<Notify> {
        self.any.clone()
    }

    /// Removes one delivered SET (push: the receiver answered 202).
    pub async fn delivered(&self, key: &str, outgoing: &Outgoing) -> Result<(), StreamError> {
        let queued_at_ms = outgoing.queued_at_ms;
        self.take_rows(vec![key.to_owned()]).await?;
        let stream = key.split('\0').next().unwrap_or_default();
        let row = [(key.to_owned(), outgoing.clone())];
        self.forget_indexed(stream, &row);
        self.publish_outbox(vec![OutboxRecord {
            stream: stream.to_owned(),
            jti: outgoing.jti.clone(),
            entry: None,
        }]);
        metrics::counter!(crate::telemetry::SETS_DELIVERED, "method" => "push").increment(1);
        metrics::histogram!(crate::telemetry::DECISION_DELIVERED_SECONDS, "method" => "push")
            .record((self.clock.now_ms() - queued_at_ms).max(0) as f64 / 1000.0);
        Ok(())
    }

    /// Moves a SET from the outbox to the dead letters, in one transaction.
    pub async fn dead_letter(
        &self,
        stream_id: &str,
        key: &str,
        outgoing: Outgoing,
        error: String,
    ) -> Result<(), StreamError> {
        let letter = DeadLetter {
            stream_id: stream_id.to_owned(),
            outgoing,
            error,
            dead_at_ms: self.clock.now_ms(),
        };
        let bytes = serde_json::to_vec(&letter).map_err(|e| StreamError::Storage(e.to_string()))?;
        // Its index entry stays: this instance reads the record back and files it under the same key.
        self.publish_outbox(vec![OutboxRecord {
            stream: stream_id.to_owned(),
            jti: letter.outgoing.jti.clone(),
            entry: Some(OutboxEntry::Dead {
                letter: letter.clone(),
            }),
        }]);
        let key = key.to_owned();
        self.unstage(std::slice::from_ref(&key));
        self.writer
            .write(move |txn| {
                txn.open_table(OUTBOX)
                    .map_err(WriteError::storage)?
                    .remove(key.as_str())
                    .map_err(WriteError::storage)?;
                txn.open_table(DEAD)
                    .map_err(WriteError::storage)?
                    .insert(key.as_str(), bytes.as_slice())
                    .map_err(WriteError::storage)?;
                Ok(())
            })
            .await?;
        // Labelled by the owner's configured name: stream ids are chosen at runtime.
        let owner = self
            .read()
            .get(stream_id)
            .map_or_else(|| "unknown".to_owned(), |s| s.owner.clone());
        metrics::counter!(crate::telemetry::SETS_DEAD_LETTERED, "enforcement_point" => owner)
            .increment(1);
        Ok(())
    }

    /// Every dead letter, in key order.
    #[cfg(test)]
    pub fn dead_letters(&self) -> Result<Vec<(String, DeadLetter)>, StreamError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let t = txn.open_table(DEAD).map_err(storage)?;
        let mut out = Vec::new();
        for entry in t.iter().map_err(storage)? {
            let (k, v) = entry.map_err(storage)?;
            if let Ok(d) = serde_json::from_slice::<DeadLetter>(v.value()) {
                out.push((k.value().to_owned(), d));
            }
        }
        Ok(out)
    }

    /// When `id`'s outbox was last read here; the first time it is asked, now (a stream is not
    /// taken for unread before it had a chance to be read since the start).
    pub fn last_read_ms(&self, id: &str) -> i64 {
        *self
            .last_read
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(id.to_owned())
            .or_insert_with(|| self.clock.now_ms())
    }

    /// Of `id`'s outbox, oldest first: the SETs waiting since before `queued_before_ms` (queued,
    /// or replayed from the dead letters, then), and the oldest beyond the newest `max` — what
    /// may no longer wait — with the outbox's length.
    #[allow(clippy::type_complexity)]
    pub fn overflow(
        &self,
        id: &str,
        queued_before_ms: i64,
        max: usize,
    ) -> Result<(Vec<(String, Outgoing)>, usize), StreamError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let t = txn.open_table(OUTBOX).map_err(storage)?;
        let (start, end) = (outbox_key(id, 0), format!("{id}\u{1}"));
        let len = t
            .range(start.as_str()..end.as_str())
            .map_err(storage)?
            .count();
        let excess = len.saturating_sub(max);
        let mut out = Vec::new();
        for (i, entry) in t
            .range(start.as_str()..end.as_str())
            .map_err(storage)?
            .enumerate()
        {
            let (k, v) = entry.map_err(storage)?;
            let Ok(o) = serde_json::from_slice::<Outgoing>(v.value()) else {
                continue;
            };
            let young = o.waiting_since_ms() >= queued_before_ms;
            // Oldest first: once one queued since is young enough and within the cap, so are the
            // rest. A replayed SET waits from its replay; one an earlier release put back under
            // its old key, young, says nothing about the SETs after it.
            if i >= excess && young && o.replayed_at_ms.is_none() {
                break;
            }
            if i >= excess && young {
                continue;
            }
            out.push((k.value().to_owned(), o));
        }
        Ok((out, len))
    }

    /// Drops dead letters older than `dead_before_ms`, then, past `max`, the oldest of the
    /// enforcement points holding the most ([`crate::fair::over_cap`]): one whose streams nobody
    /// reads turns its whole backlog into dead letters, and with one bound for all it aged out
    /// every other enforcement point's. Returns how many went. In cluster mode each goes from the
    /// outbox topic too. Reads only each row's head (stream, time, `jti`), not its SET.
    pub async fn prune_dead_letters(
        &self,
        dead_before_ms: i64,
        max: usize,
    ) -> Result<usize, StreamError> {
        let heads = self.dead_letter_heads()?;
        let (old, young): (Vec<_>, Vec<_>) = heads
            .into_iter()
            .partition(|(_, h)| h.as_ref().is_none_or(|h| h.dead_at_ms < dead_before_ms));
        let over = {
            let streams = self.read();
            // A deleted stream's letters are nobody's: they share one party.
            let parties: Vec<&str> = young
                .iter()
                .map(|(_, h)| {
                    h.as_ref()
                        .and_then(|h| streams.get(&h.stream_id))
                        .map_or("", |s| s.owner.as_str())
                })
                .collect();
            crate::fair::over_cap(&parties, max)
        };
        let mut young = young.into_iter().map(Some).collect::<Vec<_>>();
        let gone: Vec<(String, Option<DeadLetterHead>)> = old
            .into_iter()
            .chain(over.into_iter().filter_map(|i| young.get_mut(i)?.take()))
            .collect();
        if gone.is_empty() {
            return Ok(0);
        }
        self.publish_outbox(
            gone.iter()
                .filter_map(|(_, h)| h.as_ref())
                .map(|h| OutboxRecord {
                    stream: h.stream_id.clone(),
                    jti: h.outgoing.jti.clone(),
                    entry: None,
                })
                .collect(),
        );
        let n = gone.len();
        self.remove_rows(DEAD, gone.into_iter().map(|(k, _)| k).collect())
            .await?;
        Ok(n)
    }

    /// Up to `limit` dead letters after `after` (from the oldest when `None`), of `stream` alone
    /// when given: the listing reads every row's head, but copies out only the SETs it returns
    /// (all of them were hundreds of megabytes at `delivery.max_dead_letters`).
    pub fn dead_letter_page(
        &self,
        stream: Option<&str>,
        after: Option<&DeadLetterPosition>,
        limit: usize,
    ) -> Result<DeadLetterPage, StreamError> {
        let heads = self.dead_letter_heads()?;
        let matching: Vec<(&String, &DeadLetterHead)> = heads
            .iter()
            .filter_map(|(k, h)| Some((k, h.as_ref()?)))
            .filter(|(_, h)| stream.is_none_or(|s| h.stream_id == s))
            .collect();
        let total = matching.len();
        let mut following = matching.into_iter().filter(|(_, h)| h.after(after));
        let txn = self.db.begin_read().map_err(storage)?;
        let t = txn.open_table(DEAD).map_err(storage)?;
        let mut letters = Vec::with_capacity(limit.min(total));
        for (key, _) in following.by_ref().take(limit) {
            if let Some(v) = t.get(key.as_str()).map_err(storage)? {
                if let Ok(d) = serde_json::from_slice::<DeadLetter>(v.value()) {
                    letters.push(d);
                }
            }
        }
        Ok(DeadLetterPage {
            letters,
            total,
            more: following.next().is_some(),
        })
    }

    /// How many dead letters each stream has (read from the rows' heads).
    pub fn dead_letter_counts(&self) -> Result<HashMap<String, usize>, StreamError> {
        let mut counts = HashMap::new();
        for (_, head) in self.dead_letter_heads()? {
            if let Some(h) = head {
                *counts.entry(h.stream_id).or_default() += 1;
            }
        }
        Ok(counts)
    }

    /// Every dead letter's key and head, oldest first (`None`: a row that does not decode,
    /// pruned first).
    fn dead_letter_heads(&self) -> Result<Vec<(String, Option<DeadLetterHead>)>, StreamError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let t = txn.open_table(DEAD).map_err(storage)?;
        let mut out = Vec::new();
        for entry in t.iter().map_err(storage)? {
            let (k, v) = entry.map_err(storage)?;
            let head = serde_json::from_slice::<DeadLetterHead>(v.value()).ok();
            out.push((k.value().to_owned(), head));
        }
        // The listing's order (time, stream, `jti`); a row that does not decode first.
        fn order(h: &Option<DeadLetterHead>) -> (i64, &str, &str) {
            h.as_ref().map_or((i64::MIN, "", ""), |h| {
                (h.dead_at_ms, h.stream_id.as_str(), h.outgoing.jti.as_str())
            })
        }
        out.sort_by(|(ka, ha), (kb, hb)| order(ha).cmp(&order(hb)).then_with(|| ka.cmp(kb)));
        Ok(out)
    }

    /// Which dead letters of `stream` (of every stream when `None`) a replay puts back: a letter
    /// whose stream was deleted or is disabled stays (skipped) — put back, it would sit in an
    /// outbox nothing reads or removes — and a stream gets back only as many, oldest first, as
    /// its outbox has room for under `max_outbox` (the rest are deferred). Reads every row's
    /// head (up to `delivery.max_dead_letters`): call it off the runtime's threads.
    pub fn dead_letters_to_replay(
        &self,
        stream: Option<&str>,
        max_outbox: usize,
    ) -> Result<ToReplay, StreamError> {
        let heads: Vec<(String, DeadLetterHead)> = self
            .dead_letter_heads()?
            .into_iter()
            .filter_map(|(key, head)| Some((key, head?)))
            .filter(|(_, head)| stream.is_none_or(|s| s == head.stream_id))
            .collect();
        // Each stream's room, counted before the streams' lock is taken.
        let mut room: HashMap<&str, usize> = HashMap::new();
        for (_, head) in &heads {
            if !room.contains_key(head.stream_id.as_str()) {
                let (waiting, _) = self.outstanding_count(&head.stream_id, max_outbox)?;
                room.insert(&head.stream_id, max_outbox.saturating_sub(waiting));
            }
        }
        let streams = self.read();
        let mut chosen = ToReplay {
            keys: Vec::new(),
            skipped: 0,
            deferred: 0,
        };
        for (key, head) in &heads {
            match streams.get(&head.stream_id) {
                Some(s) if s.status != StreamStatus::Disabled => {
                    match room.get_mut(head.stream_id.as_str()) {
                        Some(left) if *left > 0 => {
                            *left -= 1;
                            chosen.keys.push(key.clone());
                        }
                        _ => chosen.deferred += 1,
                    }
                }
                _ => chosen.skipped += 1,
            }
        }
        Ok(chosen)
    }

    /// Puts the chosen dead letters back at the end of their streams' outboxes, in their order,
    /// [`REPLAY_CHUNK`] to a transaction.
    pub async fn replay_dead_letters(&self, chosen: ToReplay) -> Result<Replayed, StreamError> {
        let mut done = Replayed {
            replayed: 0,
            skipped: chosen.skipped,
            deferred: chosen.deferred,
        };
        for chunk in in_parts(chosen.keys, REPLAY_CHUNK) {
            done.replayed += self.replay_chunk(chunk).await?;
        }
        Ok(done)
    }

    /// Puts the dead letters under `keys` back (those still there) and says how many.
    async fn replay_chunk(&self, keys: Vec<String>) -> Result<usize, StreamError> {
        let now = self.clock.now_ms();
        if let Some(shared) = self.shared.get() {
            // Back into the topic as pending, at its end; this instance's follower queues them
            // again when it reads them (as would the next owner).
            let letters: Vec<(String, DeadLetter)> = {
                let txn = self.db.begin_read().map_err(storage)?;
                let t = txn.open_table(DEAD).map_err(storage)?;
                let mut letters = Vec::with_capacity(keys.len());
                for k in keys {
                    let Some(v) = t.get(k.as_str()).map_err(storage)? else {
                        continue;
                    };
                    if let Ok(d) = serde_json::from_slice::<DeadLetter>(v.value()) {
                        letters.push((k, d));
                    }
                }
                letters
            };
            let n = letters.len();
            let (keys, records): (Vec<String>, Vec<OutboxRecord>) = letters
                .into_iter()
                .map(|(k, mut d)| {
                    d.outgoing.replayed_at_ms = Some(now);
                    let record = OutboxRecord {
                        stream: d.stream_id,
                        jti: d.outgoing.jti.clone(),
                        entry: Some(OutboxEntry::Pending {
                            outgoing: d.outgoing,
                        }),
                    };
                    (k, record)
                })
                .unzip();
            shared.queue(records).await.map_err(StreamError::Storage)?;
            self.remove_rows(DEAD, keys).await?;
            return Ok(n);
        }
        // Back at the end of its stream's outbox under a new number, as in cluster mode: an SSE
        // receiver has read past its old one, and would never be sent it — or, resuming with
        // `Last-Event-ID`, would acknowledge it unseen. Numbered in order with what is queued,
        // and readable once written (the write is awaited before anyone is notified).
        let _order = self.enqueue_order.lock().await;
        let (first, reserve) = self.number(keys.len());
        // Taken from the table inside the write: a letter pruned since the heads were read is
        // not put back.
        let (n, streams): (usize, HashSet<String>) = self
            .writer
            .write(move |txn| {
                let mut dead = txn.open_table(DEAD).map_err(WriteError::storage)?;
                let mut outbox = txn.open_table(OUTBOX).map_err(WriteError::storage)?;
                let (mut n, mut streams) = (0, HashSet::new());
                for (seq, k) in (first..).zip(&keys) {
                    let letter = match dead.get(k.as_str()).map_err(WriteError::storage)? {
                        Some(v) => serde_json::from_slice::<DeadLetter>(v.value()).ok(),
                        None => None,
                    };
                    let Some(mut d) = letter else { continue };
                    d.outgoing.replayed_at_ms = Some(now);
                    let bytes = serde_json::to_vec(&d.outgoing)
                        .map_err(|e| WriteError::Storage(e.to_string()))?;
                    dead.remove(k.as_str()).map_err(WriteError::storage)?;
                    outbox
                        .insert(outbox_key(&d.stream_id, seq).as_str(), bytes.as_slice())
                        .map_err(WriteError::storage)?;
                    streams.insert(d.stream_id);
                    n += 1;
                }
                reserve_in(txn, reserve)?;
                Ok((n, streams))
            })
            .await?;
        if let Some(through) = reserve {
            self.seq_reserved.fetch_max(through, Ordering::SeqCst);
        }
        for s in &streams {
            self.notify(s);
        }
        Ok(n)
    }
}

/// Publishes configuration records and maps a failure to a storage error.
async fn configure(
    shared: &Arc<dyn SharedStreams>,
    records: Vec<ConfigRecord>,
) -> Result<(), StreamError> {
    shared
        .configure(records)
        .await
        .map_err(StreamError::Storage)
}

/// Builds a stream from a create request (SSF §8.1.1.1): poll is assumed when `delivery` is absent.
pub fn new_stream(
    body: &Map<String, Value>,
    owner: &str,
    iss: &str,
    aud: &str,
    poll_base: &str,
) -> Result<Stream, StreamError> {
    let id = format!("{:032x}", rand::random::<u128>());
    let delivery = parse_delivery(body.get("delivery"), poll_base, &id)?;
    Ok(Stream {
        stream_id: id,
        owner: owner.to_owned(),
        iss: iss.to_owned(),
        aud: aud.to_owned(),
        delivery,
        events_requested: string_list(body.get("events_requested"))?,
        description: body
            .get("description")
            .and_then(Value::as_str)
            .map(str::to_owned),
        status: StreamStatus::Enabled,
        status_reason: None,
        subjects: Vec::new(),
        min_verification_interval: 15,
        last_verification_at: None,
    })
}

pub fn parse_delivery(
    v: Option<&Value>,
    poll_base: &str,
    id: &str,
) -> Result<Delivery, StreamError> {
    let poll = || Delivery {
        method: POLL.to_owned(),
        endpoint_url: Some(format!("{poll_base}/ssf/poll/{id}")),
        authorization_header: None,
    };
    let Some(v) = v else { return Ok(poll()) };
    let method = v.get("method").and_then(Value::as_str).unwrap_or_default();
    match method {
        POLL => Ok(poll()),
        PUSH => {
            let url = v
                .get("endpoint_url")
                .and_then(Value::as_str)
                .filter(|u| reqwest::Url::parse(u).is_ok())
                .ok_or_else(|| {
                    StreamError::Invalid("push delivery needs a valid `endpoint_url`".into())
                })?;
            Ok(Delivery {
                method: PUSH.to_owned(),
                endpoint_url: Some(url.to_owned()),
                authorization_header: v
                    .get("authorization_header")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
            })
        }
        other => Err(StreamError::Invalid(format!(
            "unsupported delivery method `{other}`"
        ))),
    }
}

pub fn string_list(v: Option<&Value>) -> Result<Vec<String>, StreamError> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                StreamError::Invalid("`events_requested` must be an array of strings".into())
            }),
        Some(_) => Err(StreamError::Invalid(
            "`events_requested` must be an array of strings".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    #[tokio::test]
    async fn subjects_are_rows_of_their_own_and_old_records_move_there() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::store::open(dir.path()).unwrap();
        // A record as an earlier release wrote it: subjects inside.
        let mut legacy = new_stream(&Map::new(), "gw", "https://vigil", "gw", "http://v").unwrap();
        let mut record = serde_json::to_value(&legacy).unwrap();
        record["subjects"] = json!([{"format": "email", "email": "a@example.com"}]);
        let txn = db.begin_write().unwrap();
        txn.open_table(STREAMS)
            .unwrap()
            .insert(
                legacy.stream_id.as_str(),
                serde_json::to_vec(&record).unwrap().as_slice(),
            )
            .unwrap();
        txn.commit().unwrap();

        let (writer, thread) = crate::store::BatchWriter::start(db.clone(), "state", 16).unwrap();
        let store = StreamStore::open(db.clone(), writer, Clock::system()).unwrap();
        let id = legacy.stream_id.clone();
        assert_eq!(
            store.subjects(&id).unwrap(),
            vec![json!({"format": "email", "email": "a@example.com"})]
        );
        assert!(store.get("gw", &id).unwrap().subjects.is_empty());
        let b = json!({"email": "b@example.com", "format": "email"});
        store.add_subject(&id, &b, 2).await.unwrap();
        store.add_subject(&id, &b, 2).await.unwrap(); // idempotent, not counted twice
        let c = json!({"format": "email", "email": "c@example.com"});
        assert!(matches!(
            store.add_subject(&id, &c, 2).await,
            Err(StreamError::TooManySubjects(2))
        ));
        store.remove_subject(&id, &b).await.unwrap();
        store.add_subject(&id, &c, 2).await.unwrap();
        assert_eq!(store.subjects(&id).unwrap().len(), 2);
        // The record itself never carries them again.
        legacy.subjects.clear();
        store.put(legacy).await.unwrap();
        store.delete("gw", &id).await.unwrap();
        assert!(store.subjects(&id).unwrap().is_empty());
        drop(store);
        drop(db);
        tokio::task::spawn_blocking(move || thread.join())
            .await
            .unwrap();
    }

    /// A store on a manual clock with one stream per owner (each owner is its stream's
    /// enforcement point), and the streams' ids in the owners' order.
    async fn store_with_streams(
        owners: &[&str],
    ) -> (tempfile::TempDir, StreamStore, Clock, Vec<String>) {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::store::open(dir.path()).unwrap();
        let (writer, _thread) = crate::store::BatchWriter::start(db.clone(), "state", 16).unwrap();
        let clock = Clock::manual(1_000_000);
        let store = StreamStore::open(db, writer, clock.clone()).unwrap();
        let mut ids = Vec::new();
        for owner in owners {
            let s = new_stream(&Map::new(), owner, "https://vigil", owner, "http://v").unwrap();
            ids.push(s.stream_id.clone());
            store.put(s).await.unwrap();
        }
        (dir, store, clock, ids)
    }

    /// The listing pages through every dead letter in order from cursor to cursor, one stream's
    /// alone when asked; a replay puts back, in chunks, only letters a stream can still deliver —
    /// not a deleted or disabled stream's — in the stream's order.
    #[tokio::test]
    async fn dead_letters_page_by_cursor_and_replay_only_into_streams_that_deliver() {
        let (_dir, store, clock, ids) = store_with_streams(&["live", "off", "gone"]).await;
        let (live, off, gone) = (ids[0].clone(), ids[1].clone(), ids[2].clone());
        // More than two replay chunks for the live stream; letters die in pairs at one instant,
        // so the order within an instant (stream, then `jti`) counts too.
        let (all, mut offs, mut gones) = (2 * REPLAY_CHUNK + 88, 0, 0);
        let mut n = 0u64;
        for i in 0..all {
            let stream = match i % 100 {
                7 => {
                    offs += 1;
                    &off
                }
                9 => {
                    gones += 1;
                    &gone
                }
                _ => &live,
            };
            n += 1;
            let outgoing = Outgoing {
                jti: format!("{n:05}"),
                set: format!("set-{n}"),
                queued_at_ms: 1,
                replayed_at_ms: None,
            };
            if i % 2 == 0 {
                clock.advance(Duration::from_millis(10));
            }
            store
                .dead_letter(stream, &outbox_key(stream, n), outgoing, "test".into())
                .await
                .unwrap();
        }
        let mut disabled = store.get("off", &off).unwrap();
        disabled.status = StreamStatus::Disabled;
        store.put(disabled).await.unwrap();
        store.delete("gone", &gone).await.unwrap();

        // Paged by cursor: every letter once, in (time, stream, jti) order.
        let mut seen = Vec::new();
        let mut after: Option<DeadLetterPosition> = None;
        loop {
            let cursor = after.as_ref().map(DeadLetterPosition::to_cursor);
            let at = cursor
                .as_deref()
                .map(|c| DeadLetterPosition::from_cursor(c).unwrap());
            let page = store.dead_letter_page(None, at.as_ref(), 97).unwrap();
            assert_eq!(page.total, all);
            seen.extend(page.letters.iter().map(DeadLetterPosition::of));
            assert_eq!(page.more, seen.len() < all, "{} seen", seen.len());
            if !page.more {
                break;
            }
            after = seen.last().cloned();
        }
        assert_eq!(seen.len(), all);
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "ordered, no repeats");
        let page = store.dead_letter_page(Some(&off), None, 1000).unwrap();
        assert_eq!(
            (page.letters.len(), page.total, page.more),
            (offs, offs, false)
        );
        assert!(page.letters.iter().all(|d| d.stream_id == off));
        assert_eq!(DeadLetterPosition::from_cursor("not a cursor"), None);

        // One stream's replay: the disabled stream's letters stay.
        let replay =
            |stream: Option<&str>| store.dead_letters_to_replay(stream, usize::MAX).unwrap();
        let done = store.replay_dead_letters(replay(Some(&off))).await.unwrap();
        assert_eq!(
            done,
            Replayed {
                replayed: 0,
                skipped: offs,
                deferred: 0,
            }
        );
        // All: the live stream's go back, in their order; the others stay.
        let done = store.replay_dead_letters(replay(None)).await.unwrap();
        let lives = all - offs - gones;
        assert_eq!(
            done,
            Replayed {
                replayed: lives,
                skipped: offs + gones,
                deferred: 0,
            }
        );
        let (queued, _) = store.outstanding(&live, usize::MAX).unwrap();
        assert_eq!(queued.len(), lives);
        assert!(queued.windows(2).all(|w| w[0].1.jti < w[1].1.jti));
        assert!(queued
            .iter()
            .all(|(_, o)| o.set == format!("set-{}", o.jti.trim_start_matches('0'))));
        let left = store.dead_letter_page(None, None, 1000).unwrap();
        assert_eq!(left.total, offs + gones);
        assert!(left.letters.iter().all(|d| d.stream_id != live));
        assert_eq!(
            store
                .replay_dead_letters(replay(None))
                .await
                .unwrap()
                .replayed,
            0
        );
    }

    /// A replay stays within the outbox's bound and gives what it puts back a new wait: a stream
    /// gets back only as many dead letters, oldest first, as its outbox has room for (the rest
    /// are deferred), and a SET put back is not "too old" for the sweep because it was queued
    /// long ago. A restart never hands a new SET a dead letter's number, and a replayed SET
    /// goes to the outbox's end under a new one, where a receiver that read past its old
    /// number (SSE) finds it.
    #[tokio::test]
    async fn a_replay_fills_an_outbox_to_its_bound_and_its_sets_wait_from_the_replay() {
        let (_dir, store, clock, ids) = store_with_streams(&["ep"]).await;
        let id = ids[0].clone();
        let out = |jti: &str, at: i64| Outgoing {
            jti: jti.into(),
            set: format!("token-{jti}"),
            queued_at_ms: at,
            replayed_at_ms: None,
        };
        let first = clock.now_ms();
        let items = ["a", "b", "c", "d", "e"]
            .iter()
            .map(|j| (id.clone(), out(j, first)))
            .collect();
        store.enqueue(items, vec![]).await.unwrap();
        for (key, outgoing) in store.outstanding(&id, usize::MAX).unwrap().0 {
            store
                .dead_letter(&id, &key, outgoing, "too old".into())
                .await
                .unwrap();
        }
        assert!(store.outstanding(&id, usize::MAX).unwrap().0.is_empty());

        // Restarted with every SET a dead letter: new SETs are numbered after them.
        let store =
            StreamStore::open(store.db.clone(), store.writer.clone(), clock.clone()).unwrap();
        let items = ["f", "g"]
            .iter()
            .map(|j| (id.clone(), out(j, first)))
            .collect();
        store.enqueue(items, vec![]).await.unwrap();
        let keys = |store: &StreamStore| -> Vec<(u64, String)> {
            let (rows, _) = store.outstanding(&id, usize::MAX).unwrap();
            rows.into_iter().map(|(k, o)| (seq_of(&k), o.jti)).collect()
        };
        assert!(
            keys(&store).iter().all(|(seq, _)| *seq > 5),
            "{:?}",
            keys(&store)
        );

        // Two hours on, into an outbox bounded at four: room for the two oldest.
        clock.advance(Duration::from_secs(7200));
        let now = clock.now_ms();
        let chosen = store.dead_letters_to_replay(None, 4).unwrap();
        let done = store.replay_dead_letters(chosen).await.unwrap();
        assert_eq!(
            done,
            Replayed {
                replayed: 2,
                skipped: 0,
                deferred: 3,
            }
        );
        let before: Vec<(u64, String)> = keys(&store);
        let jtis: Vec<String> = keys(&store).into_iter().map(|(_, j)| j).collect();
        assert_eq!(
            jtis,
            ["f", "g", "a", "b"],
            "back at the end, under new numbers"
        );
        // An SSE receiver that had read everything queued before gets them.
        let read_through = before[1].0;
        let (after, _) = store.outstanding_after(&id, read_through, 10).unwrap();
        let after: Vec<&str> = after.iter().map(|(_, o)| o.jti.as_str()).collect();
        assert_eq!(after, ["a", "b"]);
        let (rows, _) = store.outstanding(&id, usize::MAX).unwrap();
        assert_eq!(rows[2].1.replayed_at_ms, Some(now));
        assert_eq!(
            rows[2].1.queued_at_ms, first,
            "latency still counts from the queueing"
        );

        // Waiting an hour at most: the two queued two hours ago go, the two replayed stay.
        let (overflow, len) = store.overflow(&id, now - 3_600_000, 4).unwrap();
        let over: Vec<&str> = overflow.iter().map(|(_, o)| o.jti.as_str()).collect();
        assert_eq!((over, len), (vec!["f", "g"], 4));
        // Full: a replay now defers every letter.
        let chosen = store.dead_letters_to_replay(Some(&id), 4).unwrap();
        assert_eq!(
            store.replay_dead_letters(chosen).await.unwrap(),
            Replayed {
                replayed: 0,
                skipped: 0,
                deferred: 3,
            }
        );
    }

    /// Past `max_dead_letters`, the enforcement point holding the most dead letters loses its
    /// own oldest: one whose backlog all went to the dead letters does not age out another's.
    /// Age goes first, for everyone; a deleted stream's letters form one party of their own.
    #[tokio::test]
    async fn dead_letters_past_the_bound_are_the_noisiest_enforcement_points_oldest() {
        let (_dir, store, clock, ids) = store_with_streams(&["quiet", "noisy", "gone"]).await;
        let (quiet, noisy, gone) = (&ids[0], &ids[1], &ids[2]);
        let mut n = 0;
        let mut letter = |stream: &str| {
            n += 1;
            let (key, jti) = (outbox_key(stream, n), format!("{stream}-{n}"));
            let outgoing = Outgoing {
                jti,
                set: "token".into(),
                queued_at_ms: 1,
                replayed_at_ms: None,
            };
            (stream.to_owned(), key, outgoing)
        };
        // The quiet one's two letters are the oldest; then the noisy one's seventeen, the
        // deleted stream's three (6, 13, 20) between them.
        let mut all = vec![letter(quiet), letter(quiet)];
        for i in 0..20 {
            all.push(letter(if i % 7 == 3 { gone } else { noisy }));
        }
        for (stream, key, outgoing) in all {
            clock.advance(Duration::from_millis(10));
            store
                .dead_letter(&stream, &key, outgoing, "test".into())
                .await
                .unwrap();
        }
        store.delete("gone", gone).await.unwrap();
        let held = |store: &StreamStore| {
            let mut by: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for (_, d) in store.dead_letters().unwrap() {
                by.entry(d.stream_id).or_default().push(d.outgoing.jti);
            }
            by
        };
        // A bound of 8: quiet keeps its 2, the deleted stream its 3, noisy its newest 3.
        assert_eq!(store.prune_dead_letters(0, 8).await.unwrap(), 14);
        let by = held(&store);
        assert_eq!(by[quiet], vec![format!("{quiet}-1"), format!("{quiet}-2")]);
        assert_eq!(by[gone].len(), 3);
        assert_eq!(
            by[noisy],
            [19, 21, 22].map(|n| format!("{noisy}-{n}")).to_vec()
        );
        // Age still goes first, for everyone: only the two newest are young.
        let cutoff = clock.now_ms() - 15;
        assert_eq!(store.prune_dead_letters(cutoff, 8).await.unwrap(), 6);
        let by = held(&store);
        assert_eq!(by.keys().collect::<Vec<_>>(), vec![noisy]);
        assert_eq!(by[noisy], [21, 22].map(|n| format!("{noisy}-{n}")).to_vec());
    }

    /// Acknowledging by `jti` removes exactly those SETs, wherever they are in the outbox; through
    /// a sequence number, every SET up to it and none after; another stream's are untouched.
    #[tokio::test]
    async fn acknowledgements_remove_exactly_what_they_name() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::store::open(dir.path()).unwrap();
        let (writer, _thread) = crate::store::BatchWriter::start(db.clone(), "state", 16).unwrap();
        let store = StreamStore::open(db.clone(), writer, Clock::system()).unwrap();
        let out = |jti: &str| Outgoing {
            jti: jti.into(),
            set: format!("token-{jti}"),
            queued_at_ms: 1,
            replayed_at_ms: None,
        };
        let items = ["a", "b", "c", "d", "e"]
            .iter()
            .map(|j| ("s1".to_owned(), out(j)))
            .chain(std::iter::once(("s2".to_owned(), out("z"))))
            .collect();
        store.enqueue(items, vec![]).await.unwrap();
        let jtis = |id: &str| -> Vec<String> {
            store
                .outstanding(id, usize::MAX)
                .unwrap()
                .0
                .into_iter()
                .map(|(_, o)| o.jti)
                .collect()
        };
        let acked = store
            .acknowledge("s1", &["d".into(), "b".into(), "nope".into()], "poll")
            .await
            .unwrap();
        assert_eq!(acked, 2);
        assert_eq!(jtis("s1"), ["a", "c", "e"]);
        let c_seq = store
            .outstanding("s1", usize::MAX)
            .unwrap()
            .0
            .iter()
            .find(|(_, o)| o.jti == "c")
            .map(|(k, _)| seq_of(k))
            .unwrap();
        assert_eq!(store.acknowledge_through("s1", c_seq).await.unwrap(), 2);
        assert_eq!(jtis("s1"), ["e"]);
        assert_eq!(jtis("s2"), ["z"]);
    }

    /// A restart never numbers a SET at or below an SSE event id a receiver may hold, even once
    /// the outbox was emptied (nothing left to count from): a client resuming with that
    /// `Last-Event-ID` would otherwise acknowledge — delete — new SETs it never saw. Numbers
    /// within a reservation are not written for each SET.
    #[tokio::test]
    async fn a_restart_never_numbers_a_set_below_an_id_a_receiver_holds() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::store::open(dir.path()).unwrap();
        let (writer, _thread) = crate::store::BatchWriter::start(db.clone(), "state", 16).unwrap();
        let out = |jti: &str| Outgoing {
            jti: jti.into(),
            set: format!("token-{jti}"),
            queued_at_ms: 1,
            replayed_at_ms: None,
        };
        let seqs = |store: &StreamStore| -> Vec<(u64, String)> {
            let (rows, _) = store.outstanding("s1", usize::MAX).unwrap();
            rows.into_iter().map(|(k, o)| (seq_of(&k), o.jti)).collect()
        };
        let reserved = |db: &Database| {
            let txn = db.begin_read().unwrap();
            let t = txn.open_table(SEQ).unwrap();
            t.get(SEQ_RESERVED).unwrap().map(|v| v.value())
        };
        let store = StreamStore::open(db.clone(), writer.clone(), Clock::system()).unwrap();
        for batch in [["a", "b"], ["c", "d"]] {
            let items = batch.iter().map(|j| ("s1".to_owned(), out(j))).collect();
            store.enqueue(items, vec![]).await.unwrap();
        }
        let shown = seqs(&store);
        assert_eq!(shown.len(), 4);
        let last_shown = shown[3].0;
        // One reservation, written by the first SETs, covers the later ones.
        assert_eq!(reserved(&db), Some(shown[0].0 + SEQ_BLOCK + 1));
        // The SSE client acknowledges everything it was shown; the outbox is empty.
        assert_eq!(
            store.acknowledge_through("s1", last_shown).await.unwrap(),
            4
        );
        assert!(seqs(&store).is_empty());
        // Once a later write is on disk, the deletes queued before it are too.
        writer.write(|_| Ok(())).await.unwrap();
        drop(store);

        let store = StreamStore::open(db.clone(), writer.clone(), Clock::system()).unwrap();
        store
            .enqueue(vec![("s1".to_owned(), out("e"))], vec![])
            .await
            .unwrap();
        let after = seqs(&store);
        assert_eq!(after.len(), 1);
        assert!(after[0].0 > last_shown, "{after:?} after {last_shown}");
        // Resuming with the last id it holds removes nothing new and shows the new SET.
        assert_eq!(
            store.acknowledge_through("s1", last_shown).await.unwrap(),
            0
        );
        let (next, _) = store.outstanding_after("s1", last_shown, 10).unwrap();
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].1.jti, "e");
    }

    /// SETs are readable the moment they are queued, before their outbox commit is on disk; what
    /// a deliverer does with one meanwhile (acknowledged, dead-lettered) is written after the
    /// insert, so it stays done once the insert commits.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queued_sets_are_delivered_before_their_commit_and_stay_delivered() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::store::open(dir.path()).unwrap();
        let (writer, _thread) = crate::store::BatchWriter::start(db.clone(), "state", 16).unwrap();
        let store =
            Arc::new(StreamStore::open(db.clone(), writer.clone(), Clock::system()).unwrap());
        let out = |jti: &str| Outgoing {
            jti: jti.into(),
            set: format!("token-{jti}"),
            queued_at_ms: 1,
            replayed_at_ms: None,
        };
        // A run's first SETs are readable once their commit, which writes the sequence
        // reservation, is on disk; the ones below are numbered within it.
        store
            .enqueue(vec![("s0".to_owned(), out("first"))], vec![])
            .await
            .unwrap();
        // Hold the writer: a write that waits until released.
        let (release, held) = std::sync::mpsc::channel::<()>();
        let blocker = tokio::spawn({
            let writer = writer.clone();
            async move {
                writer
                    .write(move |_| {
                        held.recv().ok();
                        Ok(())
                    })
                    .await
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let items = ["a", "b", "c"]
            .iter()
            .map(|j| ("s1".to_owned(), out(j)))
            .collect();
        let queued = tokio::spawn({
            let store = store.clone();
            async move { store.enqueue(items, vec![]).await }
        });
        let jtis = |store: &StreamStore| -> Vec<String> {
            let (rows, _) = store.outstanding("s1", usize::MAX).unwrap();
            rows.into_iter().map(|(_, o)| o.jti).collect()
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while jtis(&store).len() < 3 {
            assert!(
                std::time::Instant::now() < deadline,
                "staged SETs never readable"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(!queued.is_finished(), "the outbox commit is held");
        let (first_two, more) = store.outstanding("s1", 2).unwrap();
        assert_eq!(first_two.len(), 2);
        assert!(more);
        // Acknowledged while the insert is still waiting for the writer.
        let ack = tokio::spawn({
            let store = store.clone();
            async move { store.acknowledge("s1", &["b".into()], "poll").await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(jtis(&store), ["a", "c"]);
        release.send(()).unwrap();
        blocker.await.unwrap().unwrap();
        queued.await.unwrap().unwrap();
        assert_eq!(ack.await.unwrap().unwrap(), 1);
        assert_eq!(
            jtis(&store),
            ["a", "c"],
            "b stays acknowledged once committed"
        );

        // And from the table alone, as a restart reads it (once a later write is on disk, the
        // acknowledgement's delete, queued before it, is too).
        writer.write(|_| Ok(())).await.unwrap();
        drop(store);
        let reopened = StreamStore::open(db, writer, Clock::system()).unwrap();
        assert_eq!(jtis(&reopened), ["a", "c"]);
    }
}
