//! The engine's journal: what a batch's ordinary write must make durable before its decisions go
//! out — the grants it changed or deleted and the contexts its decisions were made on — appended
//! as one packed row per batch (`engine_journal`), instead of rows at their places in
//! `engine_principal_rows`.
//!
//! Why: at its place, each such row is a random leaf of a B-tree and its branch pages, all
//! rewritten by the commit. When every Kafka message revokes a grant that was ≈ 8 KiB written
//! per signal in 4 KiB pages at random offsets, which this machine kind's disk takes at about a
//! fifth of its sequential rate, and the state store's one writer was the limit
//! (benches/RESULTS.md). Appended, a batch's rows are a few hundred bytes a signal at the end of
//! one table.
//!
//! The rows reach their places by a fold ([`Fold`]): each shard notes the keys it journaled, with
//! the newest change of each as journaled while they fit a budget ([`Journaled`]); a round
//! (every `engine.journal_fold_interval_ms`, or sooner once `engine.journal_fold_rows` keys
//! wait) writes those changes — or the present state of a key whose change was not kept — in
//! key order, a part per batch in the store's bulk lane —
//! keys journaled over a whole interval share leaves, and a key changed many times is written
//! once — and once all of it is stored, deletes the shard's journal rows up to where the round
//! began. At start-up the whole journal is folded, in the order it was written, before the
//! tables are read ([`fold_all`]).
//!
//! A round that reads the present state may find a later batch's change than the journal rows
//! it replaces; a crash before that batch's own row is stored leaves the later state at its place
//! and older rows in the journal, which the start-up fold lays over it. So a context is folded
//! only over an older version of itself, and grants — which have no version — are written in
//! one place only while rows of them are in the journal: the ordinary lane writes none, and the
//! bulk lane commits a batch's chunks only after its ordinary write (`crate::store`).
//!
//! The batch's hand-offs — its decisions for delivery, each with its grant — are in the row too.
//! In rows of their own (`engine_handoff`), each was packed alone, inserted and, milliseconds
//! later when delivery took it over, deleted: a sixth of the process's time when every signal
//! revokes a grant (benches/RESULTS.md). Delivery marks a journaled hand-off taken over with a
//! bit per hand-off in `engine_journal_handoffs_taken`, under the row's key. When a round deletes
//! rows (no sooner than [`HANDOFF_GRACE_MS`] after it began), or the start-up fold empties the
//! journal, a hand-off not marked is moved to a row of its own; a mark that finds its journal row
//! gone deletes that row instead.
//!
//! Single node only. In cluster mode the changelog is the log, rows go to their places as before,
//! and a partition's release deletes its principals' rows, which a journal row would bring back.

use std::collections::{btree_map, BTreeMap, HashSet};
use std::sync::Arc;

use redb::{ReadableTable, TableDefinition, WriteTransaction};

use super::handed::JournalPlace;
use super::persist::{self, Changes, ContextRow, Encoded, GrantRow};
use super::shard::Shard;
use crate::grant::GrantId;
use crate::store::{Merge, PendingWrite, WriteError};

/// Journal rows by (shard, sequence): the sequence is global to the process and orders rows
/// across shards at the start-up fold; the shard lets each delete its own up to a point.
const JOURNAL: TableDefinition<(u32, u64), &[u8]> = TableDefinition::new("engine_journal");

/// Largest journal row unpacked: a batch is at most a few thousand rows of a few kilobytes; a
/// frame that claims more is corrupt, never an allocation.
const MAX_ROW: usize = 256 << 20;

/// One change a journal row holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Change {
    Context {
        principal: String,
        version: u64,
        bytes: Vec<u8>,
    },
    Grant {
        principal: String,
        id: String,
        bytes: Vec<u8>,
    },
    GrantDeleted {
        principal: String,
        id: String,
    },
    /// A decision for delivery: its hand-off key and JSON, as a row of its own would hold them
    /// (`engine_handoff`).
    Handoff {
        key: String,
        bytes: Vec<u8>,
    },
}

const CONTEXT: u8 = 0;
const GRANT: u8 = 1;
const GRANT_DELETED: u8 = 2;
const HANDOFF: u8 = 3;

/// A journal row's first byte when the count of its hand-offs follows (4 bytes, little-endian)
/// before the zstd frame: read without unpacking the frame, when its rows are deleted. A row
/// that starts with zstd's magic number instead (the first release's) holds none.
const WITH_HANDOFFS: u8 = 1;

/// Hand-offs marked taken over by delivery, by the (shard, sequence) of the journal row holding
/// them: a bit per hand-off, in the order of the row's. Deleted with the row.
const TAKEN: TableDefinition<(u32, u64), &[u8]> =
    TableDefinition::new("engine_journal_handoffs_taken");

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    // A row longer than 4 GiB cannot be in a batch (see `MAX_ROW`).
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// Packs a batch's journaled rows: a kind byte, then length-prefixed fields, all zstd-packed at
/// the fastest level, behind the count of hand-offs ([`WITH_HANDOFFS`]).
pub(super) fn pack(
    contexts: &[ContextRow],
    grants: &[GrantRow],
    deleted: &[(GrantId, String)],
    handoffs: &[(String, Vec<u8>)],
) -> Result<Vec<u8>, WriteError> {
    let size = contexts
        .iter()
        .map(|(p, _, b)| p.len() + b.len() + 17)
        .sum::<usize>()
        + grants
            .iter()
            .map(|(i, p, b)| i.len() + p.len() + b.len() + 13)
            .sum::<usize>()
        + deleted
            .iter()
            .map(|(i, p)| i.len() + p.len() + 9)
            .sum::<usize>()
        + handoffs
            .iter()
            .map(|(k, b)| k.len() + b.len() + 9)
            .sum::<usize>();
    let mut raw = Vec::with_capacity(size);
    for (principal, version, bytes) in contexts {
        raw.push(CONTEXT);
        put_bytes(&mut raw, principal.as_bytes());
        raw.extend_from_slice(&version.to_le_bytes());
        put_bytes(&mut raw, bytes);
    }
    for (id, principal, bytes) in grants {
        raw.push(GRANT);
        put_bytes(&mut raw, principal.as_bytes());
        put_bytes(&mut raw, id.as_bytes());
        put_bytes(&mut raw, bytes);
    }
    for (id, principal) in deleted {
        raw.push(GRANT_DELETED);
        put_bytes(&mut raw, principal.as_bytes());
        put_bytes(&mut raw, id.as_bytes());
    }
    for (key, bytes) in handoffs {
        raw.push(HANDOFF);
        put_bytes(&mut raw, key.as_bytes());
        put_bytes(&mut raw, bytes);
    }
    let frame = persist::pack_zstd(&raw)?;
    let mut out = Vec::with_capacity(frame.len() + 5);
    out.push(WITH_HANDOFFS);
    // A batch holds far fewer than 2³² decisions.
    out.extend_from_slice(&(handoffs.len() as u32).to_le_bytes());
    out.extend_from_slice(&frame);
    Ok(out)
}

/// A stored row's count of hand-offs and its zstd frame.
fn split_row(stored: &[u8]) -> Result<(u32, &[u8]), String> {
    match stored.split_first() {
        Some((&WITH_HANDOFFS, rest)) if rest.len() >= 4 => {
            let (count, frame) = rest.split_at(4);
            Ok((
                u32::from_le_bytes([count[0], count[1], count[2], count[3]]),
                frame,
            ))
        }
        Some((0x28, _)) => Ok((0, stored)),
        _ => Err("a journal row of an unknown form".to_owned()),
    }
}

/// A reader of [`pack`]'s fields.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("a journal row ends inside a field".into());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let len = self.take(4)?;
        let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
        self.take(len)
    }

    fn text(&mut self) -> Result<String, String> {
        std::str::from_utf8(self.bytes()?)
            .map(str::to_owned)
            .map_err(|_| "a journal row's key is not UTF-8".to_owned())
    }

    fn u64(&mut self) -> Result<u64, String> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
}

/// The changes of a packed journal row, in the order they were packed.
pub(super) fn unpack(stored: &[u8]) -> Result<Vec<Change>, String> {
    let (_, frame) = split_row(stored)?;
    let raw = zstd::bulk::decompress(frame, MAX_ROW).map_err(|e| e.to_string())?;
    let mut fields = Fields(&raw);
    let mut out = Vec::new();
    while let Ok(kind) = fields.take(1) {
        out.push(match kind[0] {
            CONTEXT => Change::Context {
                principal: fields.text()?,
                version: fields.u64()?,
                bytes: fields.bytes()?.to_vec(),
            },
            GRANT => Change::Grant {
                principal: fields.text()?,
                id: fields.text()?,
                bytes: fields.bytes()?.to_vec(),
            },
            GRANT_DELETED => Change::GrantDeleted {
                principal: fields.text()?,
                id: fields.text()?,
            },
            HANDOFF => Change::Handoff {
                key: fields.text()?,
                bytes: fields.bytes()?.to_vec(),
            },
            other => {
                return Err(format!(
                    "a journal row holds a change of unknown kind {other}"
                ))
            }
        });
    }
    Ok(out)
}

/// Appends a packed row inside `txn`.
pub(super) fn append(
    txn: &WriteTransaction,
    slot: (u32, u64),
    packed: &[u8],
) -> Result<(), WriteError> {
    txn.open_table(JOURNAL)
        .map_err(WriteError::storage)?
        .insert(slot, packed)
        .map_err(WriteError::storage)?;
    Ok(())
}

/// Deletes `shard`'s journal rows up to sequence `through`: a fold round stored their keys'
/// present state. Hand-offs delivery has not taken over yet are moved to rows of their own
/// first (delivery is behind, or failing: normally it takes a decision over within milliseconds
/// of its commit, long before a round ends).
pub(super) fn delete_through(
    txn: &WriteTransaction,
    shard: u32,
    through: u64,
) -> Result<(), WriteError> {
    let range = (shard, 0)..=(shard, through);
    let moved = {
        let journal = txn.open_table(JOURNAL).map_err(WriteError::storage)?;
        let taken = txn.open_table(TAKEN).map_err(WriteError::storage)?;
        let mut moved = Vec::new();
        for entry in journal.range(range.clone()).map_err(WriteError::storage)? {
            let (slot, row) = entry.map_err(WriteError::storage)?;
            let slot = slot.value();
            let bits = taken.get(slot).map_err(WriteError::storage)?;
            let bits = bits.as_ref().map_or(&[][..], |b| b.value());
            match untaken(row.value(), bits) {
                Ok(handoffs) => moved.extend(handoffs),
                Err(e) => {
                    tracing::error!(shard, seq = slot.1, error = %e, "unreadable journal row dropped")
                }
            }
        }
        moved
    };
    if !moved.is_empty() {
        metrics::counter!(crate::telemetry::ENGINE_JOURNAL_HANDOFFS_MOVED)
            .increment(moved.len() as u64);
        tracing::warn!(
            shard,
            decisions = moved.len(),
            "decisions not yet taken over by delivery when their journal rows were folded; kept in rows of their own"
        );
    }
    persist::store_handoffs(txn, &moved)?;
    txn.open_table(JOURNAL)
        .map_err(WriteError::storage)?
        .retain_in(range.clone(), |_, _| false)
        .map_err(WriteError::storage)?;
    txn.open_table(TAKEN)
        .map_err(WriteError::storage)?
        .retain_in(range, |_, _| false)
        .map_err(WriteError::storage)
}

/// The hand-offs (key, JSON) of a stored row that `bits` does not mark taken over; nothing to
/// unpack when every one is marked.
fn untaken(stored: &[u8], bits: &[u8]) -> Result<Vec<(String, Vec<u8>)>, String> {
    let (count, _) = split_row(stored)?;
    if (0..count).all(|i| is_set(bits, i)) {
        return Ok(Vec::new());
    }
    let mut index = 0;
    let mut out = Vec::new();
    for change in unpack(stored)? {
        if let Change::Handoff { key, bytes } = change {
            if !is_set(bits, index) {
                out.push((key, bytes));
            }
            index += 1;
        }
    }
    Ok(out)
}

fn is_set(bits: &[u8], index: u32) -> bool {
    bits.get((index / 8) as usize)
        .is_some_and(|b| b & (1 << (index % 8)) != 0)
}

/// Marks hand-offs in journal rows taken over by delivery, in delivery's transaction. Returns
/// the keys of those whose row is gone — a fold round deleted it and moved them to rows of their
/// own, which the caller deletes.
pub(super) fn mark_taken<'k>(
    txn: &WriteTransaction,
    places: &mut [(JournalPlace, &'k str)],
) -> Result<Vec<&'k str>, WriteError> {
    if places.is_empty() {
        return Ok(Vec::new());
    }
    places.sort_unstable_by_key(|(place, _)| *place);
    let journal = txn.open_table(JOURNAL).map_err(WriteError::storage)?;
    let mut taken = txn.open_table(TAKEN).map_err(WriteError::storage)?;
    let mut moved = Vec::new();
    for group in places.chunk_by(|a, b| a.0.slot == b.0.slot) {
        let slot = group[0].0.slot;
        if journal.get(slot).map_err(WriteError::storage)?.is_none() {
            moved.extend(group.iter().map(|(_, key)| *key));
            continue;
        }
        let mut bits = taken
            .get(slot)
            .map_err(WriteError::storage)?
            .map(|b| b.value().to_vec())
            .unwrap_or_default();
        for (place, _) in group {
            let byte = (place.index / 8) as usize;
            if bits.len() <= byte {
                bits.resize(byte + 1, 0);
            }
            bits[byte] |= 1 << (place.index % 8);
        }
        taken
            .insert(slot, bits.as_slice())
            .map_err(WriteError::storage)?;
    }
    Ok(moved)
}

/// Creates the tables if they are missing.
pub(super) fn create(txn: &WriteTransaction) -> Result<(), WriteError> {
    txn.open_table(JOURNAL).map_err(WriteError::storage)?;
    txn.open_table(TAKEN).map_err(WriteError::storage)?;
    Ok(())
}

/// Folds the whole journal into the tables, in the order it was written, and empties it — one
/// transaction, at start-up before the tables are read, so what was journaled is read as if it
/// had been written at its place; hand-offs not taken over go to rows of their own, for
/// delivery to take over after the start. Returns how many changes it folded. A row that does
/// not unpack is logged and dropped: its batch's signals were never acknowledged unless a later
/// write stored their state (the checkpoint that covers them follows it).
pub(super) fn fold_all(db: &redb::Database) -> Result<usize, WriteError> {
    let txn = db.begin_write().map_err(WriteError::storage)?;
    let mut latest = Latest::default();
    let mut folded = 0;
    let mut handoffs = Vec::new();
    {
        let table = txn.open_table(JOURNAL).map_err(WriteError::storage)?;
        let taken = txn.open_table(TAKEN).map_err(WriteError::storage)?;
        // Keys first, in sequence order; then one row unpacked at a time, so what is held is
        // the last change per key, not every change the journal holds.
        let mut slots = Vec::new();
        for entry in table.iter().map_err(WriteError::storage)? {
            slots.push(entry.map_err(WriteError::storage)?.0.value());
        }
        if slots.is_empty() {
            return Ok(0);
        }
        slots.sort_by_key(|(_, seq)| *seq);
        for (shard, seq) in slots {
            let Some(row) = table.get((shard, seq)).map_err(WriteError::storage)? else {
                continue;
            };
            let bits = taken.get((shard, seq)).map_err(WriteError::storage)?;
            let bits = bits.as_ref().map_or(&[][..], |b| b.value());
            match unpack(row.value()) {
                Ok(changes) => {
                    folded += changes.len();
                    let mut index = 0;
                    for change in changes {
                        match change {
                            Change::Handoff { key, bytes } => {
                                if !is_set(bits, index) {
                                    handoffs.push((key, bytes));
                                }
                                index += 1;
                            }
                            change => latest.note(change),
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(shard, seq, error = %e, "unreadable journal row dropped")
                }
            }
        }
    }
    super::persist::write(&txn, &latest.into_encoded())?;
    super::persist::store_handoffs(&txn, &handoffs)?;
    for table in [JOURNAL, TAKEN] {
        txn.open_table(table)
            .map_err(WriteError::storage)?
            .retain(|_, _| false)
            .map_err(WriteError::storage)?;
    }
    txn.commit().map_err(WriteError::storage)?;
    metrics::counter!(crate::telemetry::ENGINE_JOURNAL_HANDOFFS_MOVED)
        .increment(handoffs.len() as u64);
    tracing::info!(
        changes = folded,
        handoffs = handoffs.len(),
        "journal folded at start-up"
    );
    Ok(folded)
}

/// The last change per row key, for [`fold_all`].
#[derive(Default)]
struct Latest {
    contexts: BTreeMap<String, (u64, Vec<u8>)>,
    grants: BTreeMap<(String, String), Option<Vec<u8>>>,
}

impl Latest {
    fn note(&mut self, change: Change) {
        match change {
            Change::Context {
                principal,
                version,
                bytes,
            } => {
                let newer = self
                    .contexts
                    .get(&principal)
                    .is_none_or(|(held, _)| *held <= version);
                if newer {
                    self.contexts.insert(principal, (version, bytes));
                }
            }
            Change::Grant {
                principal,
                id,
                bytes,
            } => {
                self.grants.insert((principal, id), Some(bytes));
            }
            Change::GrantDeleted { principal, id } => {
                self.grants.insert((principal, id), None);
            }
            // Not a row at its place: [`fold_all`] keeps those delivery has not taken over.
            Change::Handoff { .. } => {}
        }
    }

    /// The changes as rows written at their places: contexts only over older versions.
    fn into_encoded(self) -> Encoded {
        let mut grants = Vec::new();
        let mut deleted = Vec::new();
        for ((principal, id), bytes) in self.grants {
            match bytes {
                Some(bytes) => grants.push((id, principal, bytes)),
                None => deleted.push((GrantId::from(id), principal)),
            }
        }
        Encoded::folded(
            self.contexts
                .into_iter()
                .map(|(k, (v, b))| (k, v, b))
                .collect(),
            grants,
            deleted,
        )
    }
}

/// A key journaled by a shard: a principal's context (`None`) or one of its grants. Ordered as
/// `engine_principal_rows` orders their rows, so a round's parts go through the table in order.
pub(super) type FoldKey = (String, Option<GrantId>);

/// A key's newest journaled change, as its row at its place holds it. The fold keeps it with the
/// key, within a budget (`engine.journal_fold_cache_bytes`), and the round that writes the key
/// at its place takes these bytes: encoding the present state again there was half of what a
/// revoking signal spent encoding (benches/RESULTS.md). Writing the newest journaled change of a
/// key is what the start-up fold does with the rows the round replaces; a key whose change did
/// not fit is written from its present state, as before.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Journaled {
    Context { version: u64, bytes: Vec<u8> },
    Grant(Vec<u8>),
    Deleted,
}

impl Journaled {
    /// What keeping it costs, counted against the budget.
    fn size(&self) -> usize {
        match self {
            Journaled::Context { bytes, .. } | Journaled::Grant(bytes) => bytes.capacity(),
            Journaled::Deleted => 0,
        }
    }
}

/// What a kept change costs; nothing if none is kept.
fn size_of(change: &Option<Journaled>) -> usize {
    change.as_ref().map_or(0, Journaled::size)
}

/// A held key and the change kept for it (`None`: it did not fit, or it is held again after a
/// failed round, and the round writes the present state).
pub(super) type FoldEntry = (FoldKey, Option<Journaled>);

/// A shard's side of the journal: the keys it journaled and the round folding them.
pub(super) struct Fold {
    /// Keys journaled since the round in flight (or the last) began, each with its newest
    /// journaled change if it is kept.
    journaled: BTreeMap<FoldKey, Option<Journaled>>,
    /// Bytes of the changes kept ([`Journaled::size`]), here and in the round.
    kept: usize,
    /// At most this many are kept.
    budget: usize,
    /// `vigil_engine_journal_kept_bytes` of this shard, set after each step.
    kept_gauge: metrics::Gauge,
    round: Option<Round>,
    /// When the last round began, by the injected clock (ms).
    last_round_ms: i64,
    /// The sequence of this shard's last journal row.
    last_seq: Option<u64>,
    /// Whether rows were journaled since the last round began: rows holding only hand-offs
    /// note no key, and a round deletes them too.
    rows_waiting: bool,
    /// Keys noted since the last step: a part takes twice as many at least, so a round
    /// in flight drains faster than the journal grows.
    noted: usize,
    /// `vigil_engine_journal_keys` of this shard, set after each step.
    gauge: metrics::Gauge,
    /// How many of the keys held (journaled, and the round's) name each grant id: every grant
    /// a batch writes is looked up, and by id a look-up borrows where a key would be built.
    grants: std::collections::HashMap<GrantId, u32>,
}

/// A fold round: its keys in order, how far it has gone, and its chunks in flight.
struct Round {
    keys: Vec<FoldEntry>,
    next: usize,
    /// The shard's journal rows up to this sequence are deleted once the round is stored.
    through: u64,
    writes: Vec<Result<PendingWrite<()>, WriteError>>,
    failed: Option<String>,
    /// The deletion of the journal rows the round replaced, once every part is stored: the
    /// round holds its keys until it is, or a change written at its place might commit before
    /// it.
    deleting: Option<Result<PendingWrite<()>, WriteError>>,
}

/// What a shard's next fold step is, for it to carry out ([`Fold::next_step`]).
pub(super) enum Step {
    None,
    /// Write these keys (in order) at their places in the bulk lane: the change kept for each,
    /// or its present state.
    Part(Vec<FoldEntry>),
    /// Every part is stored: delete the journal rows up to this sequence.
    Done(u64),
    /// The deletion is stored: the round is over.
    Stored,
    /// A part or the deletion failed: the round ends, its keys wait for the next (which
    /// deletes the rows this one left).
    Failed,
}

impl Fold {
    /// A shard's fold, keeping at most `budget` bytes of journaled changes for its rounds.
    pub(super) fn new(shard: usize, now_ms: i64, budget: usize) -> Fold {
        Fold {
            gauge: metrics::gauge!(crate::telemetry::ENGINE_JOURNAL_KEYS, "shard" => shard.to_string()),
            kept_gauge: metrics::gauge!(crate::telemetry::ENGINE_JOURNAL_KEPT_BYTES, "shard" => shard.to_string()),
            journaled: BTreeMap::new(),
            kept: 0,
            budget,
            round: None,
            last_round_ms: now_ms,
            last_seq: None,
            rows_waiting: false,
            noted: 0,
            grants: std::collections::HashMap::new(),
        }
    }

    /// Holds `key` among the journaled keys (counting its grant id if it is new there), with
    /// `change` — its newest — kept if it fits the budget. A change held for the key before is
    /// older, and dropped.
    fn hold(&mut self, key: FoldKey, change: Option<Journaled>) {
        let held = match self.journaled.entry(key) {
            btree_map::Entry::Occupied(held) => {
                let held = held.into_mut();
                self.kept = self.kept.saturating_sub(size_of(held));
                held
            }
            btree_map::Entry::Vacant(new) => {
                if let Some(id) = &new.key().1 {
                    *self.grants.entry(id.clone()).or_default() += 1;
                }
                new.insert(None)
            }
        };
        let size = size_of(&change);
        *held = change.filter(|_| self.kept.saturating_add(size) <= self.budget);
        self.kept = self.kept.saturating_add(size_of(held));
    }

    /// Stops counting a held key of grant `id` (a round's, once it is over).
    fn release_grant(&mut self, id: &GrantId) {
        if let Some(n) = self.grants.get_mut(id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.grants.remove(id);
            }
        }
    }

    /// Notes a batch's journal row: its sequence and the keys it holds, each with its change.
    pub(super) fn note(&mut self, seq: u64, keys: Vec<(FoldKey, Journaled)>) {
        self.last_seq = Some(seq);
        self.rows_waiting = true;
        self.noted = self.noted.saturating_add(keys.len());
        for (key, change) in keys {
            self.hold(key, Some(change));
        }
    }

    /// Bytes of journaled changes kept for the rounds.
    pub(super) fn kept_bytes(&self) -> usize {
        self.kept
    }

    /// Keys waiting for a round, and those of the round in flight.
    pub(super) fn len(&self) -> usize {
        self.journaled.len() + self.round.as_ref().map_or(0, |r| r.keys.len())
    }

    /// Whether a journal row may still hold `key`: until the deletion of its round's rows is
    /// stored.
    fn holds(&self, key: &FoldKey) -> bool {
        self.journaled.contains_key(key)
            || self
                .round
                .as_ref()
                .is_some_and(|r| r.keys.binary_search_by(|(k, _)| k.cmp(key)).is_ok())
    }

    /// Whether a journal row may still hold `principal`'s context: retention must not forget it
    /// then, or the start-up fold would bring it back.
    pub(super) fn holds_context(&self, principal: &str) -> bool {
        self.holds(&(principal.to_owned(), None))
    }

    /// Whether a journal row may still hold grant `id` (under any principal: journaling more
    /// than needed is always safe): a change of it is then journaled too, or a journal row
    /// would be laid over it at the next start.
    pub(super) fn holds_grant(&self, id: &str) -> bool {
        self.grants.contains_key(id)
    }

    /// Whether a round is in flight and the keys waiting behind it are more than twice the
    /// bound: the shard then holds back the sources' backlogs, as it does for a lagging
    /// checkpoint, until the store catches up.
    pub(super) fn lags(&self, rows: usize) -> bool {
        self.round.is_some() && self.journaled.len() > rows.saturating_mul(2)
    }

    /// Whether a round or a part of one is due: a round in flight with keys left, or none in
    /// flight and keys waiting for longer than `interval_ms` or more than `rows` of them.
    pub(super) fn due(&self, now_ms: i64, interval_ms: i64, rows: usize) -> bool {
        match &self.round {
            Some(r) => r.next < r.keys.len(),
            None => {
                self.rows_waiting
                    && (self.journaled.len() >= rows
                        || now_ms.saturating_sub(self.last_round_ms) >= interval_ms)
            }
        }
    }

    /// The next step: a new round's first part (when one is due), a part of the round in flight
    /// (`part` keys, or twice those noted since the last step if more), or — its parts all
    /// stored — the deletion that ends it. A round whose part failed ends without deleting: its
    /// keys are journaled again, for the next.
    ///
    /// The deletion waits until `grace_ms` after the round began: its last rows' hand-offs were
    /// handed to delivery moments before, and a hand-off not yet marked taken over when its row
    /// is deleted is moved to a row of its own — the path for a delivery that is behind, not for
    /// one signing the last batch's SETs.
    pub(super) fn next_step(
        &mut self,
        now_ms: i64,
        interval_ms: i64,
        rows: usize,
        part: usize,
        grace_ms: i64,
    ) -> Step {
        let part = part.max(std::mem::take(&mut self.noted).saturating_mul(2));
        if self.round.is_none() {
            if !self.due(now_ms, interval_ms, rows) {
                return Step::None;
            }
            let Some(through) = self.last_seq else {
                return Step::None;
            };
            self.last_round_ms = now_ms;
            self.rows_waiting = false;
            self.round = Some(Round {
                keys: std::mem::take(&mut self.journaled).into_iter().collect(),
                next: 0,
                through,
                writes: Vec::new(),
                failed: None,
                deleting: None,
            });
        }
        let Some(round) = &mut self.round else {
            return Step::None;
        };
        if round.next < round.keys.len() {
            let end = round.keys.len().min(round.next.saturating_add(part.max(1)));
            let keys: Vec<FoldEntry> = round.keys[round.next..end]
                .iter_mut()
                .map(|(key, change)| (key.clone(), change.take()))
                .collect();
            round.next = end;
            let taken: usize = keys.iter().map(|(_, change)| size_of(change)).sum();
            self.kept = self.kept.saturating_sub(taken);
            return Step::Part(keys);
        }
        if !crate::store::settle_writes(&mut round.writes, &mut round.failed, false) {
            return Step::None;
        }
        if round.failed.is_none() {
            match &mut round.deleting {
                None if now_ms < self.last_round_ms.saturating_add(grace_ms) => return Step::None,
                None => return Step::Done(round.through),
                Some(Ok(pending)) => match pending.try_take() {
                    None => return Step::None,
                    Some(Ok(())) => {}
                    Some(Err(e)) => round.failed = Some(e.to_string()),
                },
                Some(Err(e)) => round.failed = Some(e.to_string()),
            }
        }
        let Some(round) = self.round.take() else {
            return Step::None;
        };
        // The round's keys leave it: stored, or back among the journaled (a key journaled
        // again meanwhile is held there once).
        for (key, change) in &round.keys {
            if let Some(id) = &key.1 {
                self.release_grant(id);
            }
            // Every part was taken before the round ends; kept only for the count's sake.
            self.kept = self.kept.saturating_sub(size_of(change));
        }
        match round.failed {
            None => Step::Stored,
            Some(e) => {
                tracing::error!(error = %e, "journal fold failed; its keys wait for the next round");
                self.rows_waiting = true;
                for (key, _) in round.keys {
                    // A key journaled again since keeps its newer change.
                    if !self.journaled.contains_key(&key) {
                        self.hold(key, None);
                    }
                }
                Step::Failed
            }
        }
    }

    /// Keeps the deletion that ends the round ([`Step::Done`]).
    pub(super) fn deleting(&mut self, write: Result<PendingWrite<()>, WriteError>) {
        if let Some(round) = &mut self.round {
            round.deleting = Some(write);
        }
    }

    /// Keeps a part's write, settled by a later [`Fold::next_step`].
    pub(super) fn written(&mut self, write: Result<PendingWrite<()>, WriteError>) {
        if let Some(round) = &mut self.round {
            round.writes.push(write);
        }
    }

    /// How long until a round is due by the interval (`Duration::MAX` with nothing journaled).
    pub(super) fn until_due(&self, now_ms: i64, interval_ms: i64) -> std::time::Duration {
        if !self.rows_waiting {
            return std::time::Duration::MAX;
        }
        let left = self
            .last_round_ms
            .saturating_add(interval_ms)
            .saturating_sub(now_ms);
        std::time::Duration::from_millis(u64::try_from(left).unwrap_or(0))
    }

    /// Whether the round in flight has parts not yet written.
    pub(super) fn parts_left(&self) -> bool {
        self.round.as_ref().is_some_and(|r| r.next < r.keys.len())
    }

    /// Whether a round is in flight (an idle shard looks again soon).
    pub(super) fn in_flight(&self) -> bool {
        self.round.is_some()
    }
}

/// The grants whose status `decisions` changed: journaled, with the keys already held by the
/// fold ([`Shard::journal`]).
pub(super) fn status_changed(decisions: &[crate::decision::Decision]) -> HashSet<String> {
    decisions
        .iter()
        .filter(|d| !d.shadow && d.status != d.previous_status)
        .map(|d| d.grant_id.clone())
        .collect()
}

/// How long after a round began its journal rows may be deleted ([`Fold::next_step`]): delivery
/// marks a hand-off taken over once its SETs are signed and queued, tens of milliseconds after
/// its commit under load.
const HANDOFF_GRACE_MS: i64 = 1_000;

/// Fewest keys a batch takes of a fold round: encoding them adds about a millisecond to it.
const FOLD_PART: usize = 256;

/// Keys per fold transaction, each a commit of its own ([`Merge::Alone`]): a chunk's rows are a
/// few hundred random leaves at most, a few milliseconds of writing, and a decision's commit
/// waits no longer than that behind one. Merged eight at a time, as checkpoint chunks are once
/// behind, they held decisions' commits for up to a quarter of a second (benches/RESULTS.md).
const FOLD_CHUNK: usize = 256;

impl Shard {
    /// Moves into a journal row the batch's decided contexts, the grants whose status changed
    /// (`changed`; `None` in cluster mode, where rows go to their places), every grant change
    /// of a key the fold holds, and the hand-offs. Other grant changes — registrations,
    /// expiries — are written at their places, as the fold would write them anyway: a
    /// registration burst journaled cost the journal row and the fold's encoding and writing all
    /// over again, in whatever came next (benches/RESULTS.md). A key held by the fold is
    /// journaled whatever the change, so that its rows stay in order: the start-up fold lays
    /// journal rows over what is at their places. Returns the row's (shard, sequence) if one
    /// holds the hand-offs.
    pub(super) fn journal(
        &mut self,
        urgent: &mut Encoded,
        changed: Option<HashSet<String>>,
    ) -> Result<Option<(u32, u64)>, WriteError> {
        let Some(changed) = changed else {
            urgent.pack_handoff()?;
            return Ok(None);
        };
        let seq = self
            .shared
            .journal_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let fold = &self.fold;
        // A shard id is far below 2³².
        let slot = (self.id as u32, seq);
        let Some(keys) = urgent.journal(slot, |_principal, id| {
            changed.contains(id) || fold.holds_grant(id)
        })?
        else {
            return Ok(None);
        };
        self.fold.note(seq, keys);
        Ok(Some(slot))
    }

    /// Takes the fold's next step, if one is due: a part of a round into the bulk lane, or the
    /// deletion of the journal rows a stored round replaced.
    pub(super) fn fold_step(&mut self) {
        let settings = &self.shared.settings;
        let now = settings.clock.now_ms();
        let interval = interval_ms(settings.journal_fold_interval);
        match self.fold.next_step(
            now,
            interval,
            settings.journal_fold_rows,
            FOLD_PART,
            HANDOFF_GRACE_MS,
        ) {
            Step::None => {}
            Step::Part(keys) => {
                for chunk in crate::parts::in_parts(keys, FOLD_CHUNK) {
                    let mut present = Changes::default();
                    let (mut contexts, mut grants, mut deleted) =
                        (Vec::new(), Vec::new(), Vec::new());
                    for ((principal, id), change) in chunk {
                        match (id, change) {
                            (None, Some(Journaled::Context { version, bytes })) => {
                                contexts.push((principal, version, bytes));
                            }
                            (Some(id), Some(Journaled::Grant(bytes))) => {
                                grants.push((id.to_string(), principal, bytes));
                            }
                            (Some(id), Some(Journaled::Deleted)) => deleted.push((id, principal)),
                            (None, _) => present
                                .contexts
                                .extend(self.shared.contexts.get(&principal).map(|c| c.clone())),
                            (Some(id), _) => {
                                match present_grant(&self.shared.grants, &principal, &id) {
                                    Some(grant) => present.grants.push(grant),
                                    None => present.deleted_grants.push((id, principal)),
                                }
                            }
                        }
                    }
                    let kept = contexts.len() + grants.len() + deleted.len();
                    metrics::counter!(crate::telemetry::ENGINE_JOURNAL_FOLDED, "from" => "journal")
                        .increment(kept as u64);
                    metrics::counter!(crate::telemetry::ENGINE_JOURNAL_FOLDED, "from" => "present")
                        .increment(
                            (present.contexts.len()
                                + present.grants.len()
                                + present.deleted_grants.len()) as u64,
                        );
                    let write = present.encode().and_then(|mut part| {
                        part.add_folded(contexts, grants, deleted);
                        self.shared
                            .writer
                            .submit_bulk_blocking(Merge::Alone, move |txn| {
                                persist::write(txn, &part)
                            })
                    });
                    self.fold.written(write);
                }
            }
            Step::Done(through) => {
                let shard = self.id as u32;
                let deleting = self
                    .shared
                    .writer
                    .submit_bulk_blocking(Merge::Alone, move |txn| {
                        delete_through(txn, shard, through)
                    });
                self.fold.deleting(deleting);
            }
            Step::Stored => {
                metrics::counter!(crate::telemetry::ENGINE_JOURNAL_FOLDS, "outcome" => "stored")
                    .increment(1);
            }
            Step::Failed => {
                metrics::counter!(crate::telemetry::ENGINE_JOURNAL_FOLDS, "outcome" => "failed")
                    .increment(1);
            }
        }
        self.fold.gauge.set(self.fold.len() as f64);
        self.fold.kept_gauge.set(self.fold.kept_bytes() as f64);
    }

    /// Whether a part of a fold round is waiting to be written.
    pub(super) fn fold_part_due(&self) -> bool {
        self.fold.parts_left()
    }

    /// How long an idle shard may wait before a fold round is due.
    pub(super) fn until_fold(&self) -> std::time::Duration {
        let settings = &self.shared.settings;
        self.fold.until_due(
            settings.clock.now_ms(),
            interval_ms(settings.journal_fold_interval),
        )
    }
}

fn interval_ms(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A present grant as a fold writes it, or `None` if it is gone (or moved to another
/// principal: its row under this one is deleted).
pub(super) fn present_grant(
    grants: &dashmap::DashMap<GrantId, Arc<crate::grant::Grant>>,
    principal: &str,
    id: &GrantId,
) -> Option<Arc<crate::grant::Grant>> {
    grants
        .get(id)
        .map(|g| g.clone())
        .filter(|g| &*g.principal == principal)
}

/// How many rows the journal holds.
#[cfg(test)]
pub(super) fn rows(db: &redb::Database) -> u64 {
    use redb::ReadableTableMetadata;
    let txn = db.begin_read().unwrap();
    match txn.open_table(JOURNAL) {
        Ok(t) => t.len().unwrap(),
        Err(redb::TableError::TableDoesNotExist(_)) => 0,
        Err(e) => panic!("{e}"),
    }
}

/// The newest version of `principal`'s context the journal holds.
#[cfg(test)]
pub(super) fn context_version(db: &redb::Database, principal: &str) -> Option<u64> {
    let txn = db.begin_read().unwrap();
    let t = txn.open_table(JOURNAL).unwrap();
    let mut newest = None;
    for entry in t.iter().unwrap() {
        let (_, v) = entry.unwrap();
        for change in unpack(v.value()).unwrap() {
            if let Change::Context {
                principal: p,
                version,
                ..
            } = change
            {
                if p == principal {
                    newest = newest.max(Some(version));
                }
            }
        }
    }
    newest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_packed_row_unpacks_to_its_changes_in_order() {
        let packed = pack(
            &[("alice".into(), 7, b"{\"ctx\":1}".to_vec())],
            &[("g1".into(), "alice".into(), b"{\"grant\":1}".to_vec())],
            &[(GrantId::from("g0"), "bob".to_owned())],
            &[("0001/d1".into(), b"{\"decision\":1}".to_vec())],
        )
        .unwrap();
        assert_eq!(split_row(&packed).unwrap().0, 1, "its count of hand-offs");
        assert_eq!(
            unpack(&packed).unwrap(),
            vec![
                Change::Context {
                    principal: "alice".into(),
                    version: 7,
                    bytes: b"{\"ctx\":1}".to_vec()
                },
                Change::Grant {
                    principal: "alice".into(),
                    id: "g1".into(),
                    bytes: b"{\"grant\":1}".to_vec()
                },
                Change::GrantDeleted {
                    principal: "bob".into(),
                    id: "g0".into()
                },
                Change::Handoff {
                    key: "0001/d1".into(),
                    bytes: b"{\"decision\":1}".to_vec()
                },
            ]
        );
        // Cut short, it is refused rather than misread.
        let raw = zstd::bulk::decompress(&packed[5..], MAX_ROW).unwrap();
        let cut = zstd::bulk::compress(&raw[..raw.len() - 3], 1).unwrap();
        assert!(unpack(&cut).is_err());
        assert!(unpack(b"not zstd").is_err());
        // The first release's rows: a bare frame, no hand-offs.
        let mut first = Vec::new();
        first.push(CONTEXT);
        put_bytes(&mut first, b"alice");
        first.extend_from_slice(&3u64.to_le_bytes());
        put_bytes(&mut first, b"{}");
        let first = zstd::bulk::compress(&first, 1).unwrap();
        assert_eq!(split_row(&first).unwrap().0, 0);
        assert_eq!(unpack(&first).unwrap().len(), 1);
    }

    /// The start-up fold applies rows in sequence order, not in key order: a shard's later
    /// row sorts before another shard's earlier one in the table.
    #[test]
    fn the_start_up_fold_lays_rows_in_the_order_they_were_written_and_empties_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::store::open(dir.path()).unwrap();
        persist::load(&db).unwrap();
        let grant = |status: &str| {
            let g = serde_json::from_value::<crate::grant::GrantRequest>(serde_json::json!({
                "id": "g", "kind": "session", "subject": {"format": "opaque", "id": "alice"},
                "issued_at": 1, "expires_at": 2,
            }))
            .unwrap()
            .into_grant("alice".to_owned(), 1.0)
            .unwrap();
            let mut g = serde_json::to_value(g).unwrap();
            g["status"] = status.into();
            serde_json::to_vec(&g).unwrap()
        };
        let txn = db.begin_write().unwrap();
        let row = |status: &str| {
            pack(
                &[],
                &[("g".into(), "alice".into(), grant(status))],
                &[],
                &[],
            )
            .unwrap()
        };
        append(&txn, (1, 3), &row("active")).unwrap();
        append(&txn, (0, 7), &row("revoked")).unwrap();
        txn.commit().unwrap();
        assert_eq!(fold_all(&db).unwrap(), 2);
        assert_eq!(rows(&db), 0);
        assert_eq!(
            persist::stored_grant_status(&db, "g"),
            Some(crate::grant::GrantStatus::Revoked)
        );
        assert_eq!(fold_all(&db).unwrap(), 0, "nothing left to fold");
    }

    #[test]
    fn the_last_change_of_a_key_is_folded_and_a_context_only_over_an_older_version() {
        let mut latest = Latest::default();
        let grant = |id: &str, v: &str| Change::Grant {
            principal: "alice".into(),
            id: id.into(),
            bytes: v.as_bytes().to_vec(),
        };
        let context = |version: u64| Change::Context {
            principal: "alice".into(),
            version,
            bytes: format!("v{version}").into_bytes(),
        };
        for change in [
            grant("g1", "active"),
            grant("g1", "revoked"),
            grant("g2", "active"),
            Change::GrantDeleted {
                principal: "alice".into(),
                id: "g2".into(),
            },
            context(5),
            context(3),
        ] {
            latest.note(change);
        }
        assert_eq!(
            latest.grants.get(&("alice".into(), "g1".into())),
            Some(&Some(b"revoked".to_vec()))
        );
        assert_eq!(
            latest.grants.get(&("alice".into(), "g2".into())),
            Some(&None)
        );
        assert_eq!(latest.contexts.get("alice").map(|(v, _)| *v), Some(5));
    }

    /// Each key with a change as a batch journals it: a context at version 1, or a grant.
    fn changes(keys: Vec<FoldKey>) -> Vec<(FoldKey, Journaled)> {
        keys.into_iter()
            .map(|key| {
                let change = match key.1 {
                    None => Journaled::Context {
                        version: 1,
                        bytes: b"context".to_vec(),
                    },
                    Some(_) => Journaled::Grant(b"grant".to_vec()),
                };
                (key, change)
            })
            .collect()
    }

    /// A round takes the newest change journaled for each key, as far as the budget kept them:
    /// a key journaled again drops its older change, one that does not fit is taken without
    /// (its present state is written), and a failed round's keys come back without theirs
    /// unless journaled again meanwhile.
    #[test]
    fn a_round_takes_the_changes_kept_within_the_budget() {
        let grant = |bytes: &[u8]| Journaled::Grant(bytes.to_vec());
        let key = |p: &str, g: &str| (p.to_owned(), Some(GrantId::from(g)));
        let mut fold = Fold::new(0, 0, 20);
        fold.note(
            1,
            vec![
                (key("a", "g1"), grant(&[1; 8])),
                (key("b", "g2"), grant(&[2; 8])),
            ],
        );
        assert_eq!(fold.kept_bytes(), 16);
        // A newer change of g1 replaces the older; g3's does not fit.
        fold.note(
            2,
            vec![
                (key("a", "g1"), grant(&[3; 4])),
                (key("c", "g3"), grant(&[4; 9])),
            ],
        );
        assert_eq!(fold.kept_bytes(), 12);
        // A deletion costs nothing and replaces g2's change.
        fold.note(3, vec![(key("b", "g2"), Journaled::Deleted)]);
        assert_eq!(fold.kept_bytes(), 4);
        let Step::Part(part) = fold.next_step(0, 1000, 1, 8, 0) else {
            panic!("a part is due");
        };
        assert_eq!(
            part,
            vec![
                (key("a", "g1"), Some(grant(&[3; 4]))),
                (key("b", "g2"), Some(Journaled::Deleted)),
                (key("c", "g3"), None),
            ]
        );
        assert_eq!(fold.kept_bytes(), 0, "taken by the part");
        // g1 journaled again while the round is in flight, then the round fails.
        fold.note(4, vec![(key("a", "g1"), grant(&[5; 6]))]);
        fold.written(Err(WriteError::Storage("disk full".into())));
        assert!(matches!(fold.next_step(1, 1000, 1, 8, 0), Step::Failed));
        let Step::Part(again) = fold.next_step(2, 1000, 1, 8, 0) else {
            panic!("the next round");
        };
        assert_eq!(
            again,
            vec![
                (key("a", "g1"), Some(grant(&[5; 6]))),
                (key("b", "g2"), None),
                (key("c", "g3"), None),
            ]
        );
        assert_eq!(fold.kept_bytes(), 0);
    }

    #[test]
    fn a_round_takes_its_keys_in_order_and_ends_with_the_deletion_after_the_grace_once_stored() {
        let mut fold = Fold::new(0, 0, 1 << 20);
        assert!(matches!(fold.next_step(0, 1000, 4, 2, 0), Step::None));
        fold.note(
            3,
            changes(vec![
                ("bob".to_owned(), None),
                ("alice".to_owned(), Some(GrantId::from("g"))),
                ("alice".to_owned(), None),
            ]),
        );
        // Not yet due: fewer keys than the bound, within the interval.
        assert!(matches!(fold.next_step(500, 1000, 4, 2, 0), Step::None));
        assert!(fold.holds_context("bob"));
        let Step::Part(first) = fold.next_step(1000, 1000, 4, 2, 0) else {
            panic!("a part is due");
        };
        assert_eq!(
            first,
            vec![
                (
                    ("alice".to_owned(), None),
                    Some(Journaled::Context {
                        version: 1,
                        bytes: b"context".to_vec()
                    })
                ),
                (
                    ("alice".to_owned(), Some(GrantId::from("g"))),
                    Some(Journaled::Grant(b"grant".to_vec()))
                )
            ]
        );
        // A key journaled while the round is in flight waits for the next.
        fold.note(4, changes(vec![("carol".to_owned(), None)]));
        let Step::Part(second) = fold.next_step(1001, 1000, 4, 2, 0) else {
            panic!("the round's last part");
        };
        assert_eq!(
            second.into_iter().map(|(key, _)| key).collect::<Vec<_>>(),
            vec![("bob".to_owned(), None)]
        );
        assert!(fold.holds_context("bob"), "until the round is stored");
        // Its rows are deleted only once the hand-offs' grace since the round began is over:
        // delivery may still be marking the last rows' hand-offs.
        assert!(matches!(fold.next_step(1002, 1000, 4, 2, 50), Step::None));
        assert!(matches!(fold.next_step(1049, 1000, 4, 2, 50), Step::None));
        assert!(matches!(
            fold.next_step(1050, 1000, 4, 2, 50),
            Step::Done(3)
        ));
        // Its keys are held until the deletion of the rows it replaced is stored.
        let (deletion, commit) = PendingWrite::ended(None);
        fold.deleting(Ok(deletion));
        assert!(matches!(fold.next_step(1051, 1000, 4, 2, 0), Step::None));
        assert!(fold.holds_context("bob"));
        assert!(fold.holds_grant("g"));
        commit.unwrap().send(Ok(())).unwrap();
        assert!(matches!(fold.next_step(1052, 1000, 4, 2, 0), Step::Stored));
        assert!(!fold.holds_context("bob"));
        assert!(!fold.holds_grant("g"));
        assert!(fold.holds_context("carol"));
        assert_eq!(fold.len(), 1);
    }

    /// A grant journaled again while its round is in flight stays held once that round is over,
    /// until the next one is.
    #[test]
    fn a_grant_journaled_again_during_its_round_stays_held_after_it() {
        let mut fold = Fold::new(0, 0, 1 << 20);
        let g = || changes(vec![("alice".to_owned(), Some(GrantId::from("g")))]);
        let stored = |fold: &mut Fold, at: i64| {
            assert!(matches!(fold.next_step(at, 1000, 1, 8, 0), Step::Part(_)));
            let Step::Done(_) = fold.next_step(at + 1, 1000, 1, 8, 0) else {
                panic!("the round's deletion is due");
            };
            fold.deleting(Ok(PendingWrite::ended(Some(Ok(()))).0));
            assert!(matches!(
                fold.next_step(at + 2, 1000, 1, 8, 0),
                Step::Stored
            ));
        };
        fold.note(1, g());
        assert!(matches!(fold.next_step(0, 1000, 1, 8, 0), Step::Part(_)));
        fold.note(2, g());
        let Step::Done(1) = fold.next_step(1, 1000, 1, 8, 0) else {
            panic!("the first round's deletion is due");
        };
        fold.deleting(Ok(PendingWrite::ended(Some(Ok(()))).0));
        assert!(matches!(
            fold.next_step(2, 1000, usize::MAX, 8, 0),
            Step::Stored
        ));
        assert!(fold.holds_grant("g"), "its second row is in the journal");
        stored(&mut fold, 3);
        assert!(!fold.holds_grant("g"));
    }

    #[test]
    fn a_round_whose_deletion_failed_leaves_its_keys_held() {
        let mut fold = Fold::new(0, 0, 1 << 20);
        fold.note(
            1,
            changes(vec![("alice".to_owned(), Some(GrantId::from("g")))]),
        );
        assert!(matches!(fold.next_step(0, 1000, 1, 8, 0), Step::Part(_)));
        assert!(matches!(fold.next_step(1, 1000, 1, 8, 0), Step::Done(1)));
        let (deletion, _) = PendingWrite::ended(Some(Err(WriteError::Storage("disk full".into()))));
        fold.deleting(Ok(deletion));
        assert!(matches!(fold.next_step(2, 1000, 1, 8, 0), Step::Failed));
        assert!(
            fold.holds_grant("g"),
            "its rows may still be in the journal"
        );
    }

    #[test]
    fn a_round_whose_part_failed_leaves_its_keys_for_the_next() {
        let mut fold = Fold::new(0, 0, 1 << 20);
        fold.note(1, changes(vec![("alice".to_owned(), None)]));
        assert!(matches!(fold.next_step(0, 1000, 1, 8, 0), Step::Part(_)));
        fold.written(Err(WriteError::Storage("disk full".into())));
        assert!(matches!(fold.next_step(1, 1000, 1, 8, 0), Step::Failed));
        assert!(fold.holds_context("alice"));
        assert!(!fold.in_flight());
        // The next round takes it again.
        assert!(matches!(fold.next_step(2, 1000, 1, 8, 0), Step::Part(_)));
    }

    /// Hand-offs journaled with their batch: one marked taken over by delivery is gone after
    /// the row is deleted; one not taken over is moved to a row of its own, by a round's
    /// deletion or by the start-up fold, and a mark arriving after that deletes its row.
    #[test]
    fn hand_offs_not_taken_over_outlive_their_journal_row_and_a_late_mark_deletes_them() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::store::open(dir.path()).unwrap();
        persist::load(&db).unwrap();
        let handoffs = |n: u64| -> Vec<(String, Vec<u8>)> {
            (0..n)
                .map(|i| {
                    (
                        format!("{i:016x}/d{i}"),
                        format!("{{\"d\":{i}}}").into_bytes(),
                    )
                })
                .collect()
        };
        let own_rows = |db: &redb::Database| -> Vec<String> {
            let txn = db.begin_read().unwrap();
            let t = txn
                .open_table(TableDefinition::<&str, &[u8]>::new("engine_handoff"))
                .unwrap();
            t.iter()
                .unwrap()
                .map(|e| e.unwrap().0.value().to_owned())
                .collect()
        };
        let place = |slot, index| JournalPlace { slot, index };
        // Shard 0's rows 1 and 2 (ten hand-offs each), shard 1's row 3.
        let txn = db.begin_write().unwrap();
        for slot in [(0, 1), (0, 2), (1, 3)] {
            append(&txn, slot, &pack(&[], &[], &[], &handoffs(10)).unwrap()).unwrap();
        }
        txn.commit().unwrap();
        // Delivery takes over all of row 1 and all of row 2 but its 9th.
        let txn = db.begin_write().unwrap();
        let keys = handoffs(10);
        let mut marks: Vec<(JournalPlace, &str)> = (0..10)
            .map(|i| (place((0, 1), i), keys[i as usize].0.as_str()))
            .chain(
                (0..10)
                    .filter(|i| *i != 8)
                    .map(|i| (place((0, 2), i), keys[i as usize].0.as_str())),
            )
            .collect();
        assert!(
            mark_taken(&txn, &mut marks).unwrap().is_empty(),
            "rows present"
        );
        txn.commit().unwrap();
        // A round deletes shard 0's rows: only the 9th of row 2 is kept, in a row of its own.
        let txn = db.begin_write().unwrap();
        delete_through(&txn, 0, 2).unwrap();
        txn.commit().unwrap();
        assert_eq!(own_rows(&db), vec![keys[8].0.clone()]);
        assert_eq!(rows(&db), 1, "shard 1's row is not this round's");
        {
            let txn = db.begin_read().unwrap();
            let taken = txn.open_table(TAKEN).unwrap();
            assert_eq!(
                taken.iter().unwrap().count(),
                0,
                "marks deleted with their rows"
            );
        }
        assert_eq!(
            persist::pending_handoff(&db).unwrap().len(),
            0,
            "not a hand-off's JSON: skipped as unreadable, as any such row"
        );
        // Delivery's mark comes after the deletion: it deletes the row of its own. Shard 1's
        // row has its 1st taken over with it.
        let mark = |slot, index: u32| crate::engine::HandoffMark {
            key: keys[index as usize].0.clone(),
            journaled: Some(place(slot, index)),
        };
        let txn = db.begin_write().unwrap();
        persist::handoff_done_in(&txn, &[mark((1, 3), 0), mark((0, 2), 8)]).unwrap();
        txn.commit().unwrap();
        assert!(own_rows(&db).is_empty());
        // The start-up fold keeps the other nine of shard 1's row.
        fold_all(&db).unwrap();
        assert_eq!(rows(&db), 0);
        assert_eq!(
            own_rows(&db),
            keys[1..].iter().map(|(k, _)| k.clone()).collect::<Vec<_>>()
        );
        let txn = db.begin_read().unwrap();
        assert_eq!(txn.open_table(TAKEN).unwrap().iter().unwrap().count(), 0);
    }
}
