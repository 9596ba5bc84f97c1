//! The engine's tables in the embedded store: contexts, grants and the alias index, each a JSON value
//! under its key. Written by the shards inside their batch transactions; read once at start-up.
//!
//! A principal's context and grants are rows of one table, side by side under its key
//! (`engine_principal_rows`, [`context_key`] and [`grant_key`]). A revocation writes its grant
//! and the context it was decided on, and side by side they share a B-tree leaf: one page
//! written instead of two at random places of two tables. The state store is bound by the bytes
//! it writes when every Kafka message revokes a grant (benches/RESULTS.md), and each random row
//! costs a 4 KiB leaf and its branch pages; a principal's grants revoked together share leaves
//! too.
//!
//! A context's session revocations (up to 128, one per revoked session filter) are rows of their
//! own (`engine_session_revocations`, `context key \0 filter key` → the stamped filter), not part
//! of the context's JSON: a principal whose sessions are revoked one by one would otherwise rewrite
//! its whole revocation map with each signal — under load that was most of the shards' CPU
//! (JSON encoding) and of the bytes written to disk.

use std::collections::HashMap;
use std::ops::Bound;
use std::sync::Arc;

use redb::{Database, ReadableTable, TableDefinition, WriteTransaction};

use serde::{Deserialize, Serialize};

use super::changelog::{ChangeRecord, Row, Table};
use super::handed::HandoffMark;
use crate::compact_map::CompactMap;
use crate::context::{AccountState, AssuranceFact, PrincipalContext, RiskFact, Stamped};
use crate::decision::Decision;
use crate::grant::{Grant, GrantId};
use crate::parts::in_parts;
use crate::store::WriteError;

/// Every principal's context (under [`context_key`]) and grants (under [`grant_key`]).
const PRINCIPAL_ROWS: TableDefinition<&str, &[u8]> = TableDefinition::new("engine_principal_rows");
/// Contexts by key and grants by id, as releases before `engine_principal_rows` stored them:
/// moved there at the first start ([`move_legacy_rows`]).
const LEGACY_CONTEXTS: TableDefinition<&str, &[u8]> = TableDefinition::new("engine_contexts");
const LEGACY_GRANTS: TableDefinition<&str, &[u8]> = TableDefinition::new("engine_grants");
const ALIASES: TableDefinition<&str, &str> = TableDefinition::new("engine_aliases");
/// One session revocation of a context: `context key \0 filter key` → stamped filter JSON.
const SESSION_REVOCATIONS: TableDefinition<&str, &[u8]> =
    TableDefinition::new("engine_session_revocations");
/// Decisions committed but not yet taken over by delivery ([`handoff_key`] → `{decision, grant}`).
const HANDOFF: TableDefinition<&str, &[u8]> = TableDefinition::new("engine_handoff");

/// A principal's context's key in `engine_principal_rows`: the principal key and `\0`. It sorts
/// right before the principal's grants and after every shorter key, and no principal key holds
/// a control character ([`crate::subject::has_control`]), so no other principal's rows fall
/// between.
fn context_key(principal: &str) -> String {
    format!("{principal}\0")
}

/// A grant's key in `engine_principal_rows`: its principal's [`context_key`], then its id
/// (never empty).
fn grant_key(principal: &str, id: &str) -> String {
    format!("{principal}\0{id}")
}

/// What a key of `engine_principal_rows` names.
#[derive(Debug, PartialEq, Eq)]
enum PrincipalRow<'a> {
    Context(&'a str),
    Grant { principal: &'a str, id: &'a str },
}

impl<'a> PrincipalRow<'a> {
    fn parse(key: &'a str) -> Option<PrincipalRow<'a>> {
        let (principal, id) = key.split_once('\0')?;
        Some(if id.is_empty() {
            PrincipalRow::Context(principal)
        } else {
            PrincipalRow::Grant { principal, id }
        })
    }

    fn principal(&self) -> &'a str {
        match self {
            PrincipalRow::Context(p) | PrincipalRow::Grant { principal: p, .. } => p,
        }
    }
}

/// Everything the engine persisted.
#[derive(Default)]
pub struct Loaded {
    pub contexts: Vec<PrincipalContext>,
    pub grants: Vec<Grant>,
    pub aliases: Vec<(String, String)>,
    /// Decisions delivery has not taken over (read back with a partition, cluster mode).
    pub handoff: Vec<(Decision, Arc<Grant>)>,
}

/// A stamped session revocation filter, as a context holds it.
type SessionRevocation = Stamped<std::collections::BTreeMap<String, String>>;

impl Loaded {
    /// Puts session revocation rows (`context key \0 filter key` → stamped filter) into their
    /// contexts (a context with only revocations is created).
    fn attach_revocations(&mut self, rows: Vec<(String, SessionRevocation)>) {
        let mut by_key: std::collections::HashMap<String, usize> = self
            .contexts
            .iter()
            .enumerate()
            .map(|(i, c)| (c.key.clone(), i))
            .collect();
        for (key, stamped) in rows {
            let Some((context, filter)) = key.split_once('\0') else {
                tracing::error!(key, "unreadable session revocation key skipped");
                continue;
            };
            let i = *by_key.entry(context.to_owned()).or_insert_with(|| {
                self.contexts.push(PrincipalContext::new(context));
                self.contexts.len() - 1
            });
            self.contexts[i]
                .session_revocations
                .insert(filter.to_owned(), stamped);
        }
    }
}

/// Creates the tables if needed and reads them all.
pub fn load(db: &Arc<Database>) -> Result<Loaded, WriteError> {
    let txn = db.begin_write().map_err(WriteError::storage)?;
    {
        txn.open_table(PRINCIPAL_ROWS)
            .map_err(WriteError::storage)?;
        txn.open_table(ALIASES).map_err(WriteError::storage)?;
        txn.open_table(HANDOFF).map_err(WriteError::storage)?;
        txn.open_table(SESSION_REVOCATIONS)
            .map_err(WriteError::storage)?;
        super::journal::create(&txn)?;
    }
    txn.commit().map_err(WriteError::storage)?;
    move_legacy_rows(db)?;
    super::journal::fold_all(db)?;
    rekey_handoff(db)?;

    let txn = db.begin_read().map_err(WriteError::storage)?;
    let mut out = Loaded::default();
    // Contexts stored before revocations had rows of their own carry them in their JSON.
    let mut inline_revocations = Vec::new();
    for entry in txn
        .open_table(PRINCIPAL_ROWS)
        .map_err(WriteError::storage)?
        .iter()
        .map_err(WriteError::storage)?
    {
        let (k, v) = entry.map_err(WriteError::storage)?;
        let read = match PrincipalRow::parse(k.value()) {
            Some(PrincipalRow::Context(_)) => serde_json::from_slice::<PrincipalContext>(v.value())
                .map(|ctx| {
                    if !ctx.session_revocations.is_empty() {
                        inline_revocations.push(out.contexts.len());
                    }
                    out.contexts.push(ctx);
                }),
            Some(PrincipalRow::Grant { .. }) => {
                serde_json::from_slice::<Grant>(v.value()).map(|g| out.grants.push(g))
            }
            None => {
                tracing::error!(key = %k.value(), "principal row under a key of no known form skipped");
                continue;
            }
        };
        if let Err(e) = read {
            tracing::error!(key = %k.value(), error = %e, "unreadable principal row skipped");
        }
    }
    let mut revocations = Vec::new();
    each_json_row(
        &txn,
        SESSION_REVOCATIONS,
        "session revocation",
        |key, stamped| revocations.push((key.to_owned(), stamped)),
    )?;
    out.attach_revocations(revocations);
    for entry in txn
        .open_table(ALIASES)
        .map_err(WriteError::storage)?
        .iter()
        .map_err(WriteError::storage)?
    {
        let (k, v) = entry.map_err(WriteError::storage)?;
        out.aliases
            .push((k.value().to_owned(), v.value().to_owned()));
    }
    drop(txn);
    if !inline_revocations.is_empty() {
        move_inline_revocations(db, &out.contexts, &inline_revocations)?;
    }
    Ok(out)
}

/// Calls `f` with the key and value of every row of a JSON-valued table; a value that does not
/// decode is logged (as `what`) and skipped, so one bad row does not stop the start-up.
fn each_json_row<T: serde::de::DeserializeOwned>(
    txn: &redb::ReadTransaction,
    table: TableDefinition<&str, &[u8]>,
    what: &str,
    mut f: impl FnMut(&str, T),
) -> Result<(), WriteError> {
    for entry in txn
        .open_table(table)
        .map_err(WriteError::storage)?
        .iter()
        .map_err(WriteError::storage)?
    {
        let (k, v) = entry.map_err(WriteError::storage)?;
        match serde_json::from_slice(v.value()) {
            Ok(value) => f(k.value(), value),
            Err(e) => tracing::error!(key = %k.value(), error = %e, "unreadable {what} skipped"),
        }
    }
    Ok(())
}

/// Writes every session revocation of `contexts[i]` (for each `i` in `which`) as its own row and
/// rewrites the context without them — once, at the first start after the layout changed.
fn move_inline_revocations(
    db: &Arc<Database>,
    contexts: &[PrincipalContext],
    which: &[usize],
) -> Result<(), WriteError> {
    let txn = db.begin_write().map_err(WriteError::storage)?;
    {
        let mut rows = txn
            .open_table(SESSION_REVOCATIONS)
            .map_err(WriteError::storage)?;
        let mut stored = txn
            .open_table(PRINCIPAL_ROWS)
            .map_err(WriteError::storage)?;
        for ctx in which.iter().filter_map(|&i| contexts.get(i)) {
            for row in revocation_rows(ctx, ctx.session_revocations.keys())? {
                if let (k, Some(v)) = row {
                    rows.insert(k.as_str(), v.as_slice())
                        .map_err(WriteError::storage)?;
                }
            }
            stored
                .insert(
                    context_key(&ctx.key).as_str(),
                    encode_context(ctx)?.as_slice(),
                )
                .map_err(WriteError::storage)?;
        }
    }
    txn.commit().map_err(WriteError::storage)?;
    tracing::info!(
        contexts = which.len(),
        "session revocations moved to rows of their own"
    );
    Ok(())
}

/// Rows [`move_legacy_rows`] moves per transaction: a store of a million grants moves in steps
/// of a few megabytes, each atomic, so a crash midway leaves every row in one table or the other.
const LEGACY_MOVE_CHUNK: usize = 10_000;

/// Moves the rows of the tables earlier releases kept contexts and grants in (by context key,
/// by grant id) to `engine_principal_rows`, then drops those tables — once, at the first start
/// after the layout changed. A grant whose JSON names no principal cannot be placed: it is
/// logged and dropped, as a start-up load would skip it.
fn move_legacy_rows(db: &Arc<Database>) -> Result<(), WriteError> {
    #[derive(Deserialize)]
    struct Principal<'a> {
        #[serde(borrow)]
        principal: std::borrow::Cow<'a, str>,
    }
    let exists = |table| match db
        .begin_read()
        .map_err(WriteError::storage)?
        .open_table(table)
    {
        Ok(_) => Ok(true),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(false),
        Err(e) => Err(WriteError::storage(e)),
    };
    if !exists(LEGACY_CONTEXTS)? && !exists(LEGACY_GRANTS)? {
        return Ok(());
    }
    let mut moved = 0usize;
    loop {
        let txn = db.begin_write().map_err(WriteError::storage)?;
        let left = {
            let mut rows = txn
                .open_table(PRINCIPAL_ROWS)
                .map_err(WriteError::storage)?;
            let mut left = 0;
            for (table, contexts) in [(LEGACY_CONTEXTS, true), (LEGACY_GRANTS, false)] {
                let mut legacy = txn.open_table(table).map_err(WriteError::storage)?;
                let mut chunk = Vec::new();
                for entry in legacy
                    .iter()
                    .map_err(WriteError::storage)?
                    .take(LEGACY_MOVE_CHUNK)
                {
                    let (k, v) = entry.map_err(WriteError::storage)?;
                    chunk.push((k.value().to_owned(), v.value().to_vec()));
                }
                for (key, bytes) in &chunk {
                    let new_key = if contexts {
                        Some(context_key(key))
                    } else {
                        serde_json::from_slice::<Principal<'_>>(bytes)
                            .ok()
                            .map(|g| grant_key(&g.principal, key))
                    };
                    match new_key {
                        Some(new_key) => {
                            rows.insert(new_key.as_str(), bytes.as_slice())
                                .map_err(WriteError::storage)?;
                        }
                        None => tracing::error!(key, "unreadable grant row dropped"),
                    }
                    legacy.remove(key.as_str()).map_err(WriteError::storage)?;
                }
                moved += chunk.len();
                left += chunk.len();
            }
            left
        };
        if left == 0 {
            txn.delete_table(LEGACY_CONTEXTS)
                .map_err(WriteError::storage)?;
            txn.delete_table(LEGACY_GRANTS)
                .map_err(WriteError::storage)?;
        }
        txn.commit().map_err(WriteError::storage)?;
        if left == 0 {
            break;
        }
    }
    tracing::info!(
        rows = moved,
        "contexts and grants moved to rows side by side per principal"
    );
    Ok(())
}

/// A session revocation row to write (`Some` value) or delete (`None`).
pub type RevocationRow = (String, Option<Vec<u8>>);

/// The rows for the session revocations `filters` of `ctx`: the stamped filter where `ctx` holds
/// it, `None` (delete the row) where it no longer does.
pub fn revocation_rows<'a>(
    ctx: &PrincipalContext,
    filters: impl IntoIterator<Item = &'a String>,
) -> Result<Vec<RevocationRow>, WriteError> {
    filters
        .into_iter()
        .map(|filter| {
            let key = format!("{}\0{filter}", ctx.key);
            match ctx.session_revocations.get(filter) {
                Some(stamped) => serde_json::to_vec(stamped)
                    .map(|v| (key, Some(v)))
                    .map_err(|e| WriteError::Storage(e.to_string())),
                None => Ok((key, None)),
            }
        })
        .collect()
}

/// A context as stored: every persisted fact but the session revocations (rows of their own).
/// Keep in step with [`PrincipalContext`]; a test compares the two.
#[derive(Serialize)]
struct StoredContext<'a> {
    key: &'a str,
    version: u64,
    account: &'a Option<Stamped<AccountState>>,
    credential_changes: &'a CompactMap<String, Stamped<String>>,
    credential_compromises: &'a CompactMap<String, Stamped<()>>,
    credential_change_required: &'a Option<Stamped<()>>,
    risk: &'a CompactMap<String, Stamped<RiskFact>>,
    device_compliance: &'a CompactMap<String, Stamped<crate::events::ComplianceStatus>>,
    assurance: &'a CompactMap<String, Stamped<AssuranceFact>>,
    claims: &'a CompactMap<String, CompactMap<String, Stamped<serde_json::Value>>>,
    lifecycle: &'a CompactMap<String, Stamped<serde_json::Value>>,
    attributes: &'a CompactMap<String, Stamped<serde_json::Value>>,
}

/// A context's stored JSON (without its session revocations).
fn encode_context(c: &PrincipalContext) -> Result<Vec<u8>, WriteError> {
    serde_json::to_vec(&StoredContext {
        key: &c.key,
        version: c.version,
        account: &c.account,
        credential_changes: &c.credential_changes,
        credential_compromises: &c.credential_compromises,
        credential_change_required: &c.credential_change_required,
        risk: &c.risk,
        device_compliance: &c.device_compliance,
        assurance: &c.assurance,
        claims: &c.claims,
        lifecycle: &c.lifecycle,
        attributes: &c.attributes,
    })
    .map_err(|e| WriteError::Storage(e.to_string()))
}

/// The writes of one shard batch.
#[derive(Default)]
pub struct Changes {
    /// Contexts of a checkpoint: written in the bulk lane, in chunks.
    pub contexts: Vec<Arc<PrincipalContext>>,
    /// Contexts a decision of this batch was made on (or whose signal made another shard
    /// re-evaluate): written with the decisions, so a replayed signal finds itself already applied
    /// and re-makes nothing.
    pub decided_contexts: Vec<Arc<PrincipalContext>>,
    /// Contexts forgotten (past their retention, no grant refers to them).
    pub deleted_contexts: Vec<String>,
    /// Session revocation rows to write (`Some`) or delete (`None`), encoded by the shard from
    /// its contexts' state when the batch is committed ([`revocation_rows`]).
    pub revocations: Vec<RevocationRow>,
    pub grants: Vec<Arc<Grant>>,
    /// Deleted grants, each with its principal (the changelog partition it is deleted from).
    pub deleted_grants: Vec<(GrantId, String)>,
    pub aliases: Vec<(String, String)>,
    /// Links forgotten with their principal (alias, principal): each is deleted from the store
    /// only while it still names that principal (another shard may have linked it anew).
    pub deleted_aliases: Vec<(String, String)>,
    /// Decisions delivery must take over (revoke, step-up, restrict), with their grants and
    /// the decision's JSON where the batch serialized it already (for the audit log; `None`
    /// is serialized here).
    pub handoff: Vec<ToDeliver>,
}

/// A decision for delivery, its grant, and the decision's JSON if the batch made it already.
pub type ToDeliver = (Decision, Arc<Grant>, Option<Arc<[u8]>>);

#[derive(Serialize, Deserialize)]
struct Handoff {
    decision: Decision,
    grant: Grant,
}

/// A zstd frame's first bytes: a stored hand-off row that starts with them is packed
/// ([`pack_zstd`]); one that starts with `{` is JSON, as earlier releases stored it.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// No hand-off row unpacks larger: a grant and a decision are a few kilobytes; a frame that
/// claims more is corrupt, never an allocation.
const MAX_HANDOFF_JSON: usize = 4 << 20;

/// A hand-off row's JSON as the store keeps it: zstd at its fastest level. Rows are written
/// with their decision and deleted when delivery takes it over, so each costs the state writer
/// its bytes twice; packed they are 45 % of the JSON (≈ 585 of 1 300 bytes), and a revoked
/// grant's writes 22 % fewer (benches/RESULTS.md). The changelog keeps the JSON. Journal rows
/// are packed by it too ([`super::journal`]).
pub(super) fn pack_zstd(json: &[u8]) -> Result<Vec<u8>, WriteError> {
    thread_local! {
        static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    COMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        let compressor = match &mut *cell {
            Some(c) => c,
            None => cell.insert(
                zstd::bulk::Compressor::new(1).map_err(|e| WriteError::Storage(e.to_string()))?,
            ),
        };
        compressor
            .compress(json)
            .map_err(|e| WriteError::Storage(e.to_string()))
    })
}

/// A stored hand-off row's JSON: unpacked if [`pack_zstd`] packed it; `None` if it does not
/// unpack.
fn unpack_handoff(stored: &[u8]) -> Option<std::borrow::Cow<'_, [u8]>> {
    if stored.starts_with(&ZSTD_MAGIC) {
        zstd::bulk::decompress(stored, MAX_HANDOFF_JSON)
            .ok()
            .map(std::borrow::Cow::Owned)
    } else {
        Some(std::borrow::Cow::Borrowed(stored))
    }
}

/// A stored hand-off row, packed or JSON.
fn read_handoff(stored: &[u8]) -> Result<Handoff, String> {
    let json = unpack_handoff(stored).ok_or("a packed hand-off row does not unpack")?;
    serde_json::from_slice(&json).map_err(|e| e.to_string())
}

/// A [`Handoff`] row's JSON as serde writes it, borrowing: what [`Changes::encode`] splices from
/// its decision's JSON and its grant's.
#[cfg(test)]
#[derive(Serialize)]
struct HandoffRef<'a> {
    decision: &'a Decision,
    grant: &'a Grant,
}

/// A hand-off row's key: the decision's time (milliseconds, fixed-width hex) before its id, so
/// rows are appended at the table's end and taken over near it. Keyed by the decision id alone
/// (a hash), every revocation inserted its row into a random page of the table and delivery
/// deleted it from another: two page copies per decision for the store's one writer thread,
/// where now a batch's rows share the last pages.
pub fn handoff_key(decision: &Decision) -> String {
    let ms = if decision.time.is_finite() && decision.time > 0.0 {
        (decision.time * 1000.0) as u64
    } else {
        0
    };
    format!("{ms:016x}/{}", decision.id)
}

/// Rows stored under another key than [`handoff_key`] (by an earlier release: the decision id)
/// are moved to theirs, so delivery's taking them over deletes them.
fn rekey_handoff(db: &Arc<Database>) -> Result<(), WriteError> {
    let txn = db.begin_write().map_err(WriteError::storage)?;
    let moved = {
        let mut t = txn.open_table(HANDOFF).map_err(WriteError::storage)?;
        let mut stale = Vec::new();
        for entry in t.iter().map_err(WriteError::storage)? {
            let (k, v) = entry.map_err(WriteError::storage)?;
            if let Ok(h) = read_handoff(v.value()) {
                let key = handoff_key(&h.decision);
                if key != k.value() {
                    stale.push((k.value().to_owned(), key, v.value().to_vec()));
                }
            }
        }
        for (old, new, bytes) in &stale {
            t.remove(old.as_str()).map_err(WriteError::storage)?;
            t.insert(new.as_str(), bytes.as_slice())
                .map_err(WriteError::storage)?;
        }
        stale.len()
    };
    txn.commit().map_err(WriteError::storage)?;
    if moved > 0 {
        tracing::info!(rows = moved, "hand-off rows moved to time-ordered keys");
    }
    Ok(())
}

/// The decisions committed but not yet taken over by delivery, oldest first (start-up replay).
pub fn pending_handoff(db: &Arc<Database>) -> Result<Vec<(Decision, Arc<Grant>)>, WriteError> {
    let txn = db.begin_read().map_err(WriteError::storage)?;
    let t = txn.open_table(HANDOFF).map_err(WriteError::storage)?;
    let mut out = Vec::new();
    for entry in t.iter().map_err(WriteError::storage)? {
        let (_, v) = entry.map_err(WriteError::storage)?;
        if let Ok(h) = read_handoff(v.value()) {
            out.push((h.decision, Arc::new(h.grant)));
        }
    }
    out.sort_by(|a, b| a.0.time.total_cmp(&b.0.time));
    Ok(out)
}

/// Marks decisions taken over by delivery, inside delivery's own transaction (so its outbox
/// write and this mark commit together): a hand-off in a row of its own is deleted; one in a
/// journal row is marked taken there ([`super::journal::mark_taken`]), or deleted from its own row
/// if a fold round already moved it out of a journal row it deleted.
pub fn handoff_done_in(txn: &WriteTransaction, marks: &[HandoffMark]) -> Result<(), WriteError> {
    let mut rows = Vec::new();
    let mut journaled = Vec::new();
    for mark in marks {
        match mark.journaled {
            Some(place) => journaled.push((place, mark.key.as_str())),
            None => rows.push(mark.key.as_str()),
        }
    }
    rows.extend(super::journal::mark_taken(txn, &mut journaled)?);
    if !rows.is_empty() {
        let mut t = txn.open_table(HANDOFF).map_err(WriteError::storage)?;
        for key in rows {
            t.remove(key).map_err(WriteError::storage)?;
        }
    }
    Ok(())
}

/// Stores hand-offs (key, JSON) in rows of their own: those a journal row held that delivery
/// had not taken over when the row was deleted ([`super::journal`]).
pub(super) fn store_handoffs(
    txn: &WriteTransaction,
    handoffs: &[(String, Vec<u8>)],
) -> Result<(), WriteError> {
    if handoffs.is_empty() {
        return Ok(());
    }
    let mut t = txn.open_table(HANDOFF).map_err(WriteError::storage)?;
    for (key, json) in handoffs {
        t.insert(key.as_str(), pack_zstd(json)?.as_slice())
            .map_err(WriteError::storage)?;
    }
    Ok(())
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.contexts.is_empty()
            && self.decided_contexts.is_empty()
            && self.deleted_contexts.is_empty()
            && self.revocations.is_empty()
            && self.grants.is_empty()
            && self.deleted_grants.is_empty()
            && self.aliases.is_empty()
            && self.deleted_aliases.is_empty()
            && self.handoff.is_empty()
    }
}

/// A batch's writes, serialized: built on the shard's thread so the store's single writer thread
/// only inserts bytes (it is shared by every writer in the process and is the throughput ceiling).
#[derive(Default)]
pub struct Encoded {
    contexts: Vec<ContextRow>,
    decided_contexts: Vec<ContextRow>,
    deleted_contexts: Vec<String>,
    revocations: Vec<RevocationRow>,
    grants: Vec<GrantRow>,
    deleted_grants: Vec<(GrantId, String)>,
    aliases: Vec<(String, String)>,
    deleted_aliases: Vec<(String, String)>,
    handoff: Vec<HandoffRow>,
    /// The journal row ([`super::journal`]) holding the batch's grants and decided contexts,
    /// with its (shard, sequence) key, in place of their rows.
    journal: Option<((u32, u64), Vec<u8>)>,
}

/// A hand-off row: its key here ([`handoff_key`]), the decision id (its key in the changelog),
/// the grant's principal (its changelog partition), its JSON (the changelog's value, and a
/// journal row's), and that JSON packed for a row of its own ([`Encoded::pack_handoff`]).
struct HandoffRow {
    key: String,
    id: String,
    principal: String,
    bytes: Vec<u8>,
    stored: Option<Vec<u8>>,
}

/// A grant's id, principal and stored JSON.
pub(super) type GrantRow = (String, String, Vec<u8>);

/// Room made for a grant's JSON before it is written (a session grant's is ≈ 1 KiB): grown by
/// doubling from serde's default, its bytes were copied four times.
const GRANT_JSON_CAPACITY: usize = 1536;

impl Changes {
    /// Serializes the batch. A context or grant changed several times in the batch is written once,
    /// in its last state.
    pub fn encode(self) -> Result<Encoded, WriteError> {
        fn last_per_key<T, R>(
            items: &[Arc<T>],
            key: impl Fn(&T) -> &str,
            mut encode: impl FnMut(&T) -> Result<R, WriteError>,
        ) -> Result<Vec<(String, R)>, WriteError> {
            let mut seen = std::collections::HashSet::new();
            let mut out = Vec::new();
            for item in items.iter().rev() {
                if seen.insert(key(item)) {
                    out.push((key(item).to_owned(), encode(item)?));
                }
            }
            Ok(out)
        }
        // A grant handed to delivery is written in the same state, and serialized once: its
        // hand-off's JSON is spliced from its decision's and its own.
        let mut grant_json: HashMap<*const Grant, Arc<[u8]>> = HashMap::new();
        let mut json = |g: &Grant| -> Result<Arc<[u8]>, WriteError> {
            let at: *const Grant = g;
            if let Some(bytes) = grant_json.get(&at) {
                return Ok(bytes.clone());
            }
            let mut bytes = Vec::with_capacity(GRANT_JSON_CAPACITY);
            serde_json::to_writer(&mut bytes, g).map_err(|e| WriteError::Storage(e.to_string()))?;
            let bytes: Arc<[u8]> = bytes.into();
            grant_json.insert(at, bytes.clone());
            Ok(bytes)
        };
        // Borrowed, so every grant keyed in `grant_json` lives until the hand-offs are encoded.
        let grants: Vec<GrantRow> = last_per_key(
            &self.grants,
            |g| &g.id[..],
            |g| Ok((g.principal.to_string(), json(g)?.to_vec())),
        )?
        .into_iter()
        .map(|(id, (principal, bytes))| (id, principal, bytes))
        .collect();
        let handoff = self
            .handoff
            .iter()
            .map(|(d, g, decision_json)| {
                let grant = json(g)?;
                let mut bytes = Vec::with_capacity(grant.len() + GRANT_JSON_CAPACITY);
                bytes.extend_from_slice(b"{\"decision\":");
                match decision_json {
                    Some(decision) => bytes.extend_from_slice(decision),
                    None => serde_json::to_writer(&mut bytes, d)
                        .map_err(|e| WriteError::Storage(e.to_string()))?,
                }
                bytes.extend_from_slice(b",\"grant\":");
                bytes.extend_from_slice(&grant);
                bytes.push(b'}');
                Ok(HandoffRow {
                    key: handoff_key(d),
                    id: d.id.clone(),
                    principal: g.principal.to_string(),
                    stored: None,
                    bytes,
                })
            })
            .collect::<Result<_, WriteError>>()?;
        let contexts = |items: Vec<Arc<PrincipalContext>>| -> Result<Vec<ContextRow>, WriteError> {
            last_per_key(
                &items,
                |c| c.key.as_str(),
                |c| Ok((c.version, encode_context(c)?)),
            )
            .map(|rows| rows.into_iter().map(|(k, (v, b))| (k, v, b)).collect())
        };
        Ok(Encoded {
            contexts: contexts(self.contexts)?,
            decided_contexts: contexts(self.decided_contexts)?,
            deleted_contexts: self.deleted_contexts,
            revocations: self.revocations,
            grants,
            deleted_grants: self.deleted_grants,
            aliases: self.aliases,
            deleted_aliases: self.deleted_aliases,
            handoff,
            journal: None,
        })
    }
}

impl Encoded {
    /// Rows folded from the journal at start-up, written at their places: contexts only over
    /// older versions of themselves.
    pub(super) fn folded(
        contexts: Vec<ContextRow>,
        grants: Vec<GrantRow>,
        deleted_grants: Vec<(GrantId, String)>,
    ) -> Encoded {
        Encoded {
            contexts,
            grants,
            deleted_grants,
            ..Encoded::default()
        }
    }

    /// Adds rows folded from the journal (a fold round's, kept from the batch that journaled
    /// them) to be written at their places, as [`Encoded::folded`] does.
    pub(super) fn add_folded(
        &mut self,
        contexts: Vec<ContextRow>,
        grants: Vec<GrantRow>,
        deleted_grants: Vec<(GrantId, String)>,
    ) {
        self.contexts.extend(contexts);
        self.grants.extend(grants);
        self.deleted_grants.extend(deleted_grants);
    }

    /// Moves the decided contexts, the grants and deleted grants `journaled` picks (by principal
    /// and id), and every hand-off (in order: a hand-off's index in the row is its index here)
    /// into one journal row under `slot` ([`super::journal`]); the others stay to be written at
    /// their places. Returns the keys moved, each with its row as journaled (for the fold round
    /// that writes it at its place), or `None` if there was nothing to move (no row).
    pub(super) fn journal(
        &mut self,
        slot: (u32, u64),
        journaled: impl Fn(&str, &str) -> bool,
    ) -> Result<Option<Vec<(super::journal::FoldKey, super::journal::Journaled)>>, WriteError> {
        let (grants, direct): (Vec<GrantRow>, Vec<GrantRow>) = std::mem::take(&mut self.grants)
            .into_iter()
            .partition(|(id, principal, _)| journaled(principal, id));
        self.grants = direct;
        let (deleted, direct): (Vec<_>, Vec<_>) = std::mem::take(&mut self.deleted_grants)
            .into_iter()
            .partition(|(id, principal)| journaled(principal, id));
        self.deleted_grants = direct;
        let contexts = std::mem::take(&mut self.decided_contexts);
        let handoffs: Vec<(String, Vec<u8>)> = std::mem::take(&mut self.handoff)
            .into_iter()
            .map(|row| (row.key, row.bytes))
            .collect();
        if contexts.is_empty() && grants.is_empty() && deleted.is_empty() && handoffs.is_empty() {
            return Ok(None);
        }
        self.journal = Some((
            slot,
            super::journal::pack(&contexts, &grants, &deleted, &handoffs)?,
        ));
        use super::journal::Journaled;
        let keys = contexts
            .into_iter()
            .map(|(key, version, bytes)| ((key, None), Journaled::Context { version, bytes }))
            .chain(grants.into_iter().map(|(id, principal, bytes)| {
                (
                    (principal, Some(GrantId::from(id))),
                    Journaled::Grant(bytes),
                )
            }))
            .chain(
                deleted
                    .into_iter()
                    .map(|(id, principal)| ((principal, Some(id)), Journaled::Deleted)),
            )
            .collect();
        Ok(Some(keys))
    }

    /// Packs the hand-off rows for rows of their own, on the shard's thread rather than the
    /// writer's (cluster mode: they are not journaled).
    pub(super) fn pack_handoff(&mut self) -> Result<(), WriteError> {
        for row in &mut self.handoff {
            if row.stored.is_none() {
                row.stored = Some(pack_zstd(&row.bytes)?);
            }
        }
        Ok(())
    }

    /// Takes the checkpoint's part (contexts and session revocations) out of the batch, in
    /// chunks of at most `chunk` rows each: they are written in the store's bulk lane, so a large
    /// checkpoint does not hold up the grants and decisions left here. Forgotten contexts go
    /// there too, after them: bulk writes keep their order, so an earlier checkpoint's chunk
    /// still in flight cannot write a context back after its deletion.
    pub fn split_bulk(&mut self, chunk: usize) -> Vec<Encoded> {
        let contexts =
            in_parts(std::mem::take(&mut self.contexts), chunk).map(|contexts| Encoded {
                contexts,
                ..Encoded::default()
            });
        let revocations =
            in_parts(std::mem::take(&mut self.revocations), chunk).map(|revocations| Encoded {
                revocations,
                ..Encoded::default()
            });
        let deleted =
            in_parts(std::mem::take(&mut self.deleted_contexts), chunk).map(|deleted_contexts| {
                Encoded {
                    deleted_contexts,
                    ..Encoded::default()
                }
            });
        contexts.chain(revocations).chain(deleted).collect()
    }

    /// Whether the batch deletes rows (forgotten contexts, session revocations no longer held):
    /// such a bulk chunk commits alone ([`crate::store::Merge::Alone`]).
    pub fn deletes(&self) -> bool {
        !self.deleted_contexts.is_empty()
            || !self.deleted_grants.is_empty()
            || !self.deleted_aliases.is_empty()
            || self.revocations.iter().any(|(_, row)| row.is_none())
    }

    pub fn is_empty(&self) -> bool {
        self.contexts.is_empty()
            && self.decided_contexts.is_empty()
            && self.deleted_contexts.is_empty()
            && self.revocations.is_empty()
            && self.grants.is_empty()
            && self.deleted_grants.is_empty()
            && self.aliases.is_empty()
            && self.deleted_aliases.is_empty()
            && self.handoff.is_empty()
            && self.journal.is_none()
    }
}

impl Encoded {
    /// The batch's rows as changelog records, in the order they are written (cluster mode).
    pub fn records(&self) -> Vec<ChangeRecord> {
        let mut out = Vec::new();
        for (key, _, bytes) in self.contexts.iter().chain(&self.decided_contexts) {
            out.push(ChangeRecord {
                owner: key.clone(),
                key: Row::new(Table::Context, key.as_str()).record_key(),
                value: Some(bytes.clone()),
            });
        }
        for key in &self.deleted_contexts {
            out.push(ChangeRecord {
                owner: key.clone(),
                key: Row::new(Table::Context, key.as_str()).record_key(),
                value: None,
            });
        }
        for (key, value) in &self.revocations {
            let context = key.split_once('\0').map_or(key.as_str(), |(c, _)| c);
            out.push(ChangeRecord {
                owner: context.to_owned(),
                key: Row::new(Table::SessionRevocation, key.as_str()).record_key(),
                value: value.clone(),
            });
        }
        for (id, principal, bytes) in &self.grants {
            out.push(ChangeRecord {
                owner: principal.clone(),
                key: Row::new(Table::Grant, id.as_str()).record_key(),
                value: Some(bytes.clone()),
            });
        }
        for (id, principal) in &self.deleted_grants {
            out.push(ChangeRecord {
                owner: principal.clone(),
                key: Row::new(Table::Grant, &**id).record_key(),
                value: None,
            });
        }
        for (alias, principal) in &self.aliases {
            out.push(ChangeRecord {
                owner: principal.clone(),
                key: Row::new(Table::Alias, alias.as_str()).record_key(),
                value: Some(principal.as_bytes().to_vec()),
            });
        }
        for (alias, principal) in &self.deleted_aliases {
            out.push(ChangeRecord {
                owner: principal.clone(),
                key: Row::new(Table::Alias, alias.as_str()).record_key(),
                value: None,
            });
        }
        for row in &self.handoff {
            out.push(ChangeRecord {
                owner: row.principal.clone(),
                key: Row::new(Table::Handoff, row.id.as_str()).record_key(),
                value: Some(row.bytes.clone()),
            });
        }
        out
    }
}

/// Where a chunked [`forget_chunk`] goes on: the table (in [`FORGET_ORDER`]) and the last key
/// visited in it.
#[derive(Debug, Clone, Default)]
pub struct ForgetCursor {
    table: usize,
    after: Option<String>,
}

/// The tables [`forget_chunk`] walks, in order.
const FORGET_ORDER: [&str; 4] = ["principals", "session_revocations", "aliases", "handoff"];

/// Deletes the rows of the principals `released` names, visiting at most `limit` rows from
/// `cursor`: one short write, so the store's writer is never held for long and the file does not
/// grow as one write deleting half a large store makes it (copy-on-write keeps every page that
/// write touched until it commits). Returns the rows deleted and where to go on (`None`: done).
pub fn forget_chunk(
    txn: &WriteTransaction,
    released: &dyn Fn(&str) -> bool,
    cursor: ForgetCursor,
    limit: usize,
) -> Result<(usize, Option<ForgetCursor>), WriteError> {
    #[derive(Deserialize)]
    struct Principal<'a> {
        #[serde(borrow)]
        principal: std::borrow::Cow<'a, str>,
    }
    #[derive(Deserialize)]
    struct HandoffGrant<'a> {
        #[serde(borrow)]
        grant: Principal<'a>,
    }
    let after = cursor.after.as_deref();
    let (deleted, last, visited) = match FORGET_ORDER.get(cursor.table) {
        None => return Ok((0, None)),
        Some(&"principals") => forget_in(txn, PRINCIPAL_ROWS, after, limit, |key, _| {
            PrincipalRow::parse(key).is_some_and(|row| released(row.principal()))
        })?,
        Some(&"session_revocations") => {
            forget_in(txn, SESSION_REVOCATIONS, after, limit, |key, _| {
                released(key.split_once('\0').map_or(key, |(c, _)| c))
            })?
        }
        Some(&"aliases") => {
            let mut table = txn.open_table(ALIASES).map_err(WriteError::storage)?;
            let (gone, last, visited) = {
                let range = match after {
                    Some(a) => table.range::<&str>((Bound::Excluded(a), Bound::Unbounded)),
                    None => table.range::<&str>(..),
                }
                .map_err(WriteError::storage)?;
                let mut gone = Vec::new();
                let mut last = None;
                let mut visited = 0;
                for entry in range.take(limit) {
                    let (k, v) = entry.map_err(WriteError::storage)?;
                    visited += 1;
                    if released(v.value()) {
                        gone.push(k.value().to_owned());
                    }
                    last = Some(k.value().to_owned());
                }
                (gone, last, visited)
            };
            for key in &gone {
                table.remove(key.as_str()).map_err(WriteError::storage)?;
            }
            (gone.len(), last, visited)
        }
        Some(_) => forget_in(txn, HANDOFF, after, limit, |_, stored| {
            unpack_handoff(stored).is_some_and(|json| {
                serde_json::from_slice::<HandoffGrant<'_>>(&json)
                    .is_ok_and(|h| released(&h.grant.principal))
            })
        })?,
    };
    // A table visited to its end (fewer rows than the limit) moves the cursor to the next one.
    let next = match last {
        Some(key) if visited == limit => ForgetCursor {
            table: cursor.table,
            after: Some(key),
        },
        _ => ForgetCursor {
            table: cursor.table + 1,
            after: None,
        },
    };
    Ok((deleted, (next.table < FORGET_ORDER.len()).then_some(next)))
}

/// [`forget_chunk`] in one table of JSON rows: visits at most `limit` rows after `after`, deletes
/// those `gone` says; returns the rows deleted, the last key visited and how many were visited.
fn forget_in(
    txn: &WriteTransaction,
    table: TableDefinition<&str, &[u8]>,
    after: Option<&str>,
    limit: usize,
    gone: impl Fn(&str, &[u8]) -> bool,
) -> Result<(usize, Option<String>, usize), WriteError> {
    let mut table = txn.open_table(table).map_err(WriteError::storage)?;
    let mut doomed = Vec::new();
    let mut last = None;
    let mut visited = 0;
    {
        let range = match after {
            Some(a) => table.range::<&str>((Bound::Excluded(a), Bound::Unbounded)),
            None => table.range::<&str>(..),
        }
        .map_err(WriteError::storage)?;
        for entry in range.take(limit) {
            let (k, v) = entry.map_err(WriteError::storage)?;
            visited += 1;
            if gone(k.value(), v.value()) {
                doomed.push(k.value().to_owned());
            }
            last = Some(k.value().to_owned());
        }
    }
    for key in &doomed {
        table.remove(key.as_str()).map_err(WriteError::storage)?;
    }
    Ok((doomed.len(), last, visited))
}

/// Writes rows read back from the changelog (their latest values) and decodes them as a start-up
/// load would; a row that does not decode is logged and skipped, as at load.
pub fn adopt(txn: &WriteTransaction, rows: &[(Row, Vec<u8>)]) -> Result<Loaded, WriteError> {
    let mut out = Loaded::default();
    let mut revocations = Vec::new();
    // Each table opened once: opening one per row cost more than the rows' writes.
    let mut principal_rows = txn
        .open_table(PRINCIPAL_ROWS)
        .map_err(WriteError::storage)?;
    let mut revocation_rows = txn
        .open_table(SESSION_REVOCATIONS)
        .map_err(WriteError::storage)?;
    let mut aliases = txn.open_table(ALIASES).map_err(WriteError::storage)?;
    let mut handoff = txn.open_table(HANDOFF).map_err(WriteError::storage)?;
    for (row, bytes) in rows {
        let key = row.key.as_str();
        let stored = match row.table {
            Table::Context => serde_json::from_slice::<PrincipalContext>(bytes)
                .map(|c| out.contexts.push(c))
                .map(|()| {
                    principal_rows
                        .insert(context_key(key).as_str(), bytes.as_slice())
                        .map(drop)
                }),
            Table::SessionRevocation => serde_json::from_slice(bytes)
                .map(|stamped| revocations.push((row.key.clone(), stamped)))
                .map(|()| revocation_rows.insert(key, bytes.as_slice()).map(drop)),
            // Keyed here by principal and id (the changelog keys it by id).
            Table::Grant => serde_json::from_slice::<Grant>(bytes).map(|g| {
                let stored = principal_rows
                    .insert(grant_key(&g.principal, key).as_str(), bytes.as_slice())
                    .map(drop);
                out.grants.push(g);
                stored
            }),
            Table::Alias => {
                let principal = String::from_utf8_lossy(bytes).into_owned();
                let stored = aliases.insert(key, principal.as_str()).map(drop);
                out.aliases.push((row.key.clone(), principal));
                Ok(stored)
            }
            // Keyed here by time (the changelog keys it by decision id). The changelog's value
            // is the row's JSON, kept as such: the store reads JSON rows as well as packed ones.
            Table::Handoff => serde_json::from_slice::<Handoff>(bytes).map(|h| {
                let stored = handoff
                    .insert(handoff_key(&h.decision).as_str(), bytes.as_slice())
                    .map(drop);
                out.handoff.push((h.decision, Arc::new(h.grant)));
                stored
            }),
        };
        match stored {
            Ok(written) => written.map_err(WriteError::storage)?,
            Err(e) => {
                tracing::error!(key = %row.key, error = %e, "unreadable changelog row skipped")
            }
        }
    }
    out.attach_revocations(revocations);
    out.handoff.sort_by(|a, b| a.0.time.total_cmp(&b.0.time));
    Ok(out)
}

/// A context's key, version and stored JSON.
pub(super) type ContextRow = (String, u64, Vec<u8>);

/// The version of a stored context, `None` if the row is unreadable.
fn stored_version(bytes: &[u8]) -> Option<u64> {
    #[derive(Deserialize)]
    struct Version {
        version: u64,
    }
    serde_json::from_slice::<Version>(bytes)
        .ok()
        .map(|v| v.version)
}

/// Whether context rows may be older than what the store holds when they commit.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Rows {
    /// A checkpoint's chunk (bulk lane): it may commit after a later batch wrote a newer version
    /// of one of its contexts with a decision (ordinary lane), and must not take it back.
    MayBeOlder,
    /// Contexts written with a batch's decisions (ordinary lane): nothing newer can have
    /// committed before them. A context is written only by the shard that owns it; its ordinary
    /// writes commit in batch order; a later batch's bulk chunk is queued after them and only
    /// ever deferred, never moved ahead. So the store's writer need not read the stored row —
    /// that look-up was 5 % of all samples when every Kafka message revokes, on the thread that
    /// bounds the rate (benches/RESULTS.md).
    Newest,
}

/// Writes context rows; rows that [`Rows::MayBeOlder`] each unless the store holds the same or a
/// later version of it.
fn write_contexts(
    txn: &WriteTransaction,
    rows: &[ContextRow],
    kind: Rows,
) -> Result<(), WriteError> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut t = txn
        .open_table(PRINCIPAL_ROWS)
        .map_err(WriteError::storage)?;
    for (key, version, bytes) in rows {
        let key = context_key(key);
        let newer_stored = kind == Rows::MayBeOlder
            && t.get(key.as_str())
                .map_err(WriteError::storage)?
                .and_then(|old| stored_version(old.value()))
                .is_some_and(|stored| stored >= *version);
        if !newer_stored {
            t.insert(key.as_str(), bytes.as_slice())
                .map_err(WriteError::storage)?;
        }
    }
    Ok(())
}

/// Writes an encoded batch inside `txn`.
pub fn write(txn: &WriteTransaction, changes: &Encoded) -> Result<(), WriteError> {
    if let Some((slot, packed)) = &changes.journal {
        super::journal::append(txn, *slot, packed)?;
    }
    write_contexts(txn, &changes.contexts, Rows::MayBeOlder)?;
    write_contexts(txn, &changes.decided_contexts, Rows::Newest)?;
    if !changes.deleted_contexts.is_empty() {
        let mut t = txn
            .open_table(PRINCIPAL_ROWS)
            .map_err(WriteError::storage)?;
        for key in &changes.deleted_contexts {
            t.remove(context_key(key).as_str())
                .map_err(WriteError::storage)?;
        }
    }
    if !changes.revocations.is_empty() {
        let mut t = txn
            .open_table(SESSION_REVOCATIONS)
            .map_err(WriteError::storage)?;
        for (k, v) in &changes.revocations {
            match v {
                Some(v) => t.insert(k.as_str(), v.as_slice()).map(drop),
                None => t.remove(k.as_str()).map(drop),
            }
            .map_err(WriteError::storage)?;
        }
    }
    if !changes.grants.is_empty() || !changes.deleted_grants.is_empty() {
        let mut t = txn
            .open_table(PRINCIPAL_ROWS)
            .map_err(WriteError::storage)?;
        for (id, principal, bytes) in &changes.grants {
            t.insert(grant_key(principal, id).as_str(), bytes.as_slice())
                .map_err(WriteError::storage)?;
        }
        for (id, principal) in &changes.deleted_grants {
            t.remove(grant_key(principal, id).as_str())
                .map_err(WriteError::storage)?;
        }
    }
    if !changes.handoff.is_empty() {
        let mut t = txn.open_table(HANDOFF).map_err(WriteError::storage)?;
        for row in &changes.handoff {
            let packed;
            let stored = match &row.stored {
                Some(stored) => stored,
                None => {
                    packed = pack_zstd(&row.bytes)?;
                    &packed
                }
            };
            t.insert(row.key.as_str(), stored.as_slice())
                .map_err(WriteError::storage)?;
        }
    }
    if !changes.aliases.is_empty() {
        let mut t = txn.open_table(ALIASES).map_err(WriteError::storage)?;
        for (k, v) in &changes.aliases {
            t.insert(k.as_str(), v.as_str())
                .map_err(WriteError::storage)?;
        }
    }
    if !changes.deleted_aliases.is_empty() {
        let mut t = txn.open_table(ALIASES).map_err(WriteError::storage)?;
        for (alias, principal) in &changes.deleted_aliases {
            let still_ours = t
                .get(alias.as_str())
                .map_err(WriteError::storage)?
                .is_some_and(|stored| stored.value() == principal.as_str());
            if still_ours {
                t.remove(alias.as_str()).map_err(WriteError::storage)?;
            }
        }
    }
    Ok(())
}

/// The version of `principal`'s stored context row, if there is one.
#[cfg(test)]
pub fn stored_context_version(db: &Database, principal: &str) -> Option<u64> {
    let txn = db.begin_read().unwrap();
    let t = txn.open_table(PRINCIPAL_ROWS).unwrap();
    let row = t.get(context_key(principal).as_str()).unwrap()?;
    stored_version(row.value())
}

/// The status of grant `id` as stored at its place (not in the journal), if it is there.
#[cfg(test)]
pub fn stored_grant_status(db: &Database, id: &str) -> Option<crate::grant::GrantStatus> {
    stored_grant_at_place(db, id).map(|g| g.status)
}

/// Grant `id` as stored at its place (not in the journal), if it is there.
#[cfg(test)]
pub fn stored_grant_at_place(db: &Database, id: &str) -> Option<Grant> {
    let txn = db.begin_read().unwrap();
    let t = txn.open_table(PRINCIPAL_ROWS).unwrap();
    for entry in t.iter().unwrap() {
        let (k, v) = entry.unwrap();
        if let Some(PrincipalRow::Grant { id: stored, .. }) = PrincipalRow::parse(k.value()) {
            if stored == id {
                return Some(serde_json::from_slice::<Grant>(v.value()).unwrap());
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grant::Registrant;

    fn revoked(filter: &str, time: f64) -> Stamped<std::collections::BTreeMap<String, String>> {
        Stamped {
            value: [("session".to_owned(), filter.to_owned())].into(),
            time,
            source: "push:t".into(),
            seq: time as u64,
            ttl: None,
            party: Registrant::NONE,
        }
    }

    /// A checkpoint splits into chunks in order, each holding only its own rows: what a chunk
    /// allocates is its own size, not the rest of the checkpoint's (which made a 100 000-context
    /// checkpoint cost gigabytes of memory and as many bytes copied). Forgotten contexts come
    /// last, so no chunk before them writes one back.
    #[test]
    fn a_checkpoint_splits_in_order_into_chunks_of_their_own_size() {
        let mut encoded = Encoded {
            contexts: (0..1000u64)
                .map(|i| (format!("k{i}"), i, vec![0u8; 8]))
                .collect(),
            revocations: (0..10)
                .map(|i| (format!("k{i}\0s"), Some(vec![1u8])))
                .collect(),
            grants: vec![("g".into(), "k0".into(), vec![2u8])],
            deleted_contexts: vec!["k5".into()],
            ..Encoded::default()
        };
        let bulk = encoded.split_bulk(64);
        // What is not the checkpoint's stays in the batch.
        assert_eq!(encoded.grants.len(), 1);
        assert!(encoded.contexts.is_empty() && encoded.revocations.is_empty());
        assert!(encoded.deleted_contexts.is_empty());
        assert_eq!(bulk.len(), 1000usize.div_ceil(64) + 2);
        let versions: Vec<u64> = bulk
            .iter()
            .flat_map(|c| c.contexts.iter().map(|(_, v, _)| *v))
            .collect();
        assert_eq!(versions, (0..1000).collect::<Vec<_>>());
        for c in &bulk {
            assert!(c.contexts.len() <= 64 && c.contexts.capacity() <= 64);
            assert!(c.revocations.capacity() <= 64);
        }
        assert_eq!(bulk[bulk.len() - 2].revocations.len(), 10);
        assert_eq!(
            bulk.last().map(|c| c.deleted_contexts.clone()),
            Some(vec!["k5".to_owned()])
        );
    }

    /// A forgotten context (retention) is deleted from the store and, in cluster mode, from the
    /// state topic: its change record is a tombstone on the context's own partition, so the
    /// partition's next owner does not restore it.
    #[test]
    fn a_forgotten_context_is_a_tombstone_in_the_changelog_and_gone_from_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::store::open(dir.path()).unwrap();
        load(&db).unwrap();
        let ctx = Arc::new(PrincipalContext::new("email:gone@example.com"));
        let stored = Changes {
            decided_contexts: vec![ctx.clone()],
            ..Changes::default()
        }
        .encode()
        .unwrap();
        let txn = db.begin_write().unwrap();
        write(&txn, &stored).unwrap();
        txn.commit().unwrap();
        assert_eq!(load(&db).unwrap().contexts.len(), 1);

        let forgotten = Changes {
            deleted_contexts: vec![ctx.key.clone()],
            ..Changes::default()
        }
        .encode()
        .unwrap();
        assert_eq!(
            forgotten.records(),
            [ChangeRecord {
                owner: ctx.key.clone(),
                key: Row::new(Table::Context, ctx.key.as_str()).record_key(),
                value: None,
            }]
        );
        let txn = db.begin_write().unwrap();
        write(&txn, &forgotten).unwrap();
        txn.commit().unwrap();
        assert!(load(&db).unwrap().contexts.is_empty());
    }

    /// A forgotten link is a tombstone on its principal's partition in the changelog, and is
    /// deleted from the store only while it still names that principal: another shard may have
    /// linked the identifier anew to another principal before the deletion was written.
    #[test]
    fn a_forgotten_link_is_a_tombstone_and_spares_a_newer_link() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::store::open(dir.path()).unwrap();
        load(&db).unwrap();
        let commit = |changes: Changes| {
            let encoded = changes.encode().unwrap();
            let txn = db.begin_write().unwrap();
            write(&txn, &encoded).unwrap();
            txn.commit().unwrap();
            encoded
        };
        let link = |alias: &str, principal: &str| (alias.to_owned(), principal.to_owned());
        commit(Changes {
            aliases: vec![
                link("email:a@example.com", "email:a@example.com"),
                link("phone_number:+1555", "email:a@example.com"),
                link("opaque:x", "opaque:other"),
            ],
            ..Changes::default()
        });
        let forgotten = commit(Changes {
            deleted_aliases: vec![
                link("email:a@example.com", "email:a@example.com"),
                link("phone_number:+1555", "email:a@example.com"),
                // Linked to another principal since: stays.
                link("opaque:x", "email:a@example.com"),
            ],
            ..Changes::default()
        });
        assert_eq!(
            forgotten.records()[0],
            ChangeRecord {
                owner: "email:a@example.com".into(),
                key: Row::new(Table::Alias, "email:a@example.com").record_key(),
                value: None,
            }
        );
        assert!(forgotten.records().iter().all(|r| r.value.is_none()));
        assert_eq!(
            load(&db).unwrap().aliases,
            [link("opaque:x", "opaque:other")]
        );
    }

    fn stored_grant(id: &str, principal: &str) -> Grant {
        serde_json::from_value::<crate::grant::GrantRequest>(serde_json::json!({
            "id": id, "kind": "session", "subject": {"format": "opaque", "id": principal},
            "issued_at": 1, "expires_at": 2,
        }))
        .unwrap()
        .into_grant(principal.to_owned(), 1.0)
        .unwrap()
    }

    fn principal_row_keys(db: &Database) -> Vec<String> {
        let txn = db.begin_read().unwrap();
        let t = txn.open_table(PRINCIPAL_ROWS).unwrap();
        t.iter()
            .unwrap()
            .map(|e| e.unwrap().0.value().to_owned())
            .collect()
    }

    /// A principal's context and grants are neighbours in one table, in that order, with no
    /// other principal's rows between — not even one whose key extends theirs — so a decision's
    /// grant and context rows share a leaf. Deletions and retention find them by the same keys.
    #[test]
    fn a_principals_rows_sit_side_by_side() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::store::open(dir.path()).unwrap();
        load(&db).unwrap();
        let commit = |changes: Changes| {
            let txn = db.begin_write().unwrap();
            write(&txn, &changes.encode().unwrap()).unwrap();
            txn.commit().unwrap();
        };
        let grants = [("g2", "p"), ("g1", "p"), ("g3", "p.x"), ("a", "p.x")];
        commit(Changes {
            decided_contexts: vec![
                Arc::new(PrincipalContext::new("p.x")),
                Arc::new(PrincipalContext::new("p")),
            ],
            grants: grants
                .iter()
                .map(|(id, p)| Arc::new(stored_grant(id, p)))
                .collect(),
            ..Changes::default()
        });
        assert_eq!(
            principal_row_keys(&db),
            ["p\0", "p\0g1", "p\0g2", "p.x\0", "p.x\0a", "p.x\0g3"]
        );
        let loaded = load(&db).unwrap();
        assert_eq!(loaded.contexts.len(), 2);
        let mut ids: Vec<_> = loaded.grants.iter().map(|g| g.id.to_string()).collect();
        ids.sort();
        assert_eq!(ids, ["a", "g1", "g2", "g3"]);
        assert!(loaded
            .grants
            .iter()
            .all(|g| grants.contains(&(&*g.id, &*g.principal))));

        commit(Changes {
            deleted_grants: vec![("g1".into(), "p".into())],
            deleted_contexts: vec!["p.x".into()],
            ..Changes::default()
        });
        assert_eq!(
            principal_row_keys(&db),
            ["p\0", "p\0g2", "p.x\0a", "p.x\0g3"]
        );
        // Retention forgets a principal's rows and only its.
        let txn = db.begin_write().unwrap();
        let (deleted, _) =
            forget_chunk(&txn, &|p| p == "p.x", ForgetCursor::default(), 100).unwrap();
        txn.commit().unwrap();
        assert_eq!(deleted, 2);
        assert_eq!(principal_row_keys(&db), ["p\0", "p\0g2"]);
        assert_eq!(
            PrincipalRow::parse("p\0g2"),
            Some(PrincipalRow::Grant {
                principal: "p",
                id: "g2"
            })
        );
        assert_eq!(PrincipalRow::parse("p\0"), Some(PrincipalRow::Context("p")));
        assert_eq!(PrincipalRow::parse("p"), None);
    }

    /// Hand-off rows are stored packed, and read back whether packed or JSON (an earlier
    /// release's, or a changelog's); one that does not unpack is skipped, not a failed start,
    /// and retention still finds a packed row's principal.
    #[test]
    fn hand_off_rows_are_packed_and_read_back_either_way() {
        use crate::decision::{testing::decision, DecisionEffect};
        let dir = tempfile::tempdir().unwrap();
        let db = crate::store::open(dir.path()).unwrap();
        load(&db).unwrap();
        let mut first = decision(DecisionEffect::Revoke, 1_000.0);
        first.id = "d1".into();
        let mut second = decision(DecisionEffect::Revoke, 2_000.0);
        second.id = "d2".into();
        let grant = Arc::new(stored_grant("g", "email:u@example.com"));
        let encoded = Changes {
            handoff: vec![(first.clone(), grant.clone(), None)],
            ..Changes::default()
        }
        .encode()
        .unwrap();
        let json = encoded.handoff[0].bytes.clone();
        // Spliced from the decision's JSON and the grant's: what serde writes for the two.
        let whole = serde_json::to_vec(&HandoffRef {
            decision: &first,
            grant: &grant,
        })
        .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&json),
            String::from_utf8_lossy(&whole)
        );
        // The same with the decision's JSON the batch made for the audit log.
        let given = Changes {
            handoff: vec![(
                first.clone(),
                grant.clone(),
                Some(serde_json::to_vec(&first).unwrap().into()),
            )],
            ..Changes::default()
        }
        .encode()
        .unwrap();
        assert_eq!(given.handoff[0].bytes, json);
        // The changelog gets the JSON.
        assert_eq!(encoded.records()[0].value.as_deref(), Some(json.as_slice()));
        let txn = db.begin_write().unwrap();
        write(&txn, &encoded).unwrap();
        {
            let mut t = txn.open_table(HANDOFF).unwrap();
            // An earlier release's row: JSON.
            let earlier = serde_json::to_vec(&HandoffRef {
                decision: &second,
                grant: &grant,
            })
            .unwrap();
            t.insert(handoff_key(&second).as_str(), earlier.as_slice())
                .unwrap();
            // A packed row cut short: skipped.
            let mut cut = pack_zstd(&earlier).unwrap();
            cut.truncate(cut.len() / 2);
            t.insert("0000000000000000/cut", cut.as_slice()).unwrap();
        }
        txn.commit().unwrap();

        let txn = db.begin_read().unwrap();
        let stored = txn
            .open_table(HANDOFF)
            .unwrap()
            .get(handoff_key(&first).as_str())
            .unwrap()
            .unwrap()
            .value()
            .to_vec();
        drop(txn);
        assert!(stored.starts_with(&ZSTD_MAGIC));
        assert!(
            stored.len() < json.len(),
            "{} of {}",
            stored.len(),
            json.len()
        );

        let pending = pending_handoff(&db).unwrap();
        let ids: Vec<&str> = pending.iter().map(|(d, _)| d.id.as_str()).collect();
        assert_eq!(ids, ["d1", "d2"]);
        assert_eq!(pending[0].1.id, grant.id);
        // Reopened, the store loads as before.
        load(&db).unwrap();
        assert_eq!(pending_handoff(&db).unwrap().len(), 2);

        // Retention reads the principal of packed and JSON rows alike.
        let mut cursor = Some(ForgetCursor::default());
        let mut deleted = 0;
        while let Some(c) = cursor {
            let txn = db.begin_write().unwrap();
            let (n, next) = forget_chunk(&txn, &|p| p == "email:u@example.com", c, 100).unwrap();
            txn.commit().unwrap();
            deleted += n;
            cursor = next;
        }
        assert_eq!(
            deleted, 2,
            "both rows of the principal; the unreadable one stays"
        );
        assert!(pending_handoff(&db).unwrap().is_empty());
    }

    /// A store written by an earlier release (contexts by key, grants by id, in tables of their
    /// own) is moved to the principals' rows at the first start, whole, and the old tables are
    /// dropped; a grant row that names no principal is dropped, as a load skipped it.
    #[test]
    fn rows_of_the_earlier_layout_are_moved_once() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::store::open(dir.path()).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut contexts = txn.open_table(LEGACY_CONTEXTS).unwrap();
            let mut grants = txn.open_table(LEGACY_GRANTS).unwrap();
            for i in 0..(LEGACY_MOVE_CHUNK + 5) {
                let key = format!("u{i:05}");
                let ctx = serde_json::to_vec(&PrincipalContext::new(&key)).unwrap();
                contexts.insert(key.as_str(), ctx.as_slice()).unwrap();
            }
            let g = serde_json::to_vec(&stored_grant("g1", "u00001")).unwrap();
            grants.insert("g1", g.as_slice()).unwrap();
            grants.insert("bad", b"{not json".as_slice()).unwrap();
        }
        txn.commit().unwrap();

        let loaded = load(&db).unwrap();
        assert_eq!(loaded.contexts.len(), LEGACY_MOVE_CHUNK + 5);
        assert_eq!(loaded.grants.len(), 1);
        assert_eq!(&*loaded.grants[0].principal, "u00001");
        let keys = principal_row_keys(&db);
        assert_eq!(keys.len(), LEGACY_MOVE_CHUNK + 6);
        assert_eq!(keys[..3], ["u00000\0", "u00001\0", "u00001\0g1"]);
        let txn = db.begin_read().unwrap();
        for legacy in [LEGACY_CONTEXTS, LEGACY_GRANTS] {
            assert!(matches!(
                txn.open_table(legacy),
                Err(redb::TableError::TableDoesNotExist(_))
            ));
        }
        drop(txn);
        // Nothing left to move: the next start loads the same.
        let again = load(&db).unwrap();
        assert_eq!(again.contexts.len(), LEGACY_MOVE_CHUNK + 5);
        assert_eq!(again.grants.len(), 1);
    }

    /// Every persisted field of a context but its session revocations is in the stored JSON: a
    /// field added to `PrincipalContext` and not to `StoredContext` fails here.
    #[test]
    fn the_stored_context_holds_every_field_but_the_session_revocations() {
        let ctx = PrincipalContext::new("k");
        let full = serde_json::to_value(&ctx).unwrap();
        let stored: serde_json::Value =
            serde_json::from_slice(&encode_context(&ctx).unwrap()).unwrap();
        let mut expected: Vec<_> = full.as_object().unwrap().keys().cloned().collect();
        expected.retain(|k| k != "session_revocations");
        let got: Vec<_> = stored.as_object().unwrap().keys().cloned().collect();
        assert_eq!(got, expected);
    }

    /// A checkpoint's chunk that commits after a decision's batch wrote a newer version of one of
    /// its contexts leaves the newer version in place; a newer version still replaces an older.
    #[test]
    fn an_older_context_version_never_replaces_a_newer_one() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::store::open(dir.path()).unwrap();
        load(&db).unwrap();
        let version = |v: u64, fact: &str| {
            let mut c = PrincipalContext::new("k");
            c.version = v;
            c.lifecycle.insert(
                "fact".into(),
                Stamped {
                    value: serde_json::json!(fact),
                    time: v as f64,
                    source: "t".into(),
                    seq: v,
                    ttl: None,
                    party: Registrant::NONE,
                },
            );
            Arc::new(c)
        };
        let commit = |changes: Changes| {
            let txn = db.begin_write().unwrap();
            write(&txn, &changes.encode().unwrap()).unwrap();
            txn.commit().unwrap();
        };
        let stored = || load(&db).unwrap().contexts.pop().unwrap();
        commit(Changes {
            decided_contexts: vec![version(5, "decided")],
            ..Changes::default()
        });
        commit(Changes {
            contexts: vec![version(3, "checkpointed earlier")],
            ..Changes::default()
        });
        assert_eq!(stored().version, 5);
        commit(Changes {
            contexts: vec![version(6, "checkpointed later")],
            ..Changes::default()
        });
        assert_eq!(stored(), *version(6, "checkpointed later"));
    }

    /// Revocations written and deleted as rows load back into their context; a context stored
    /// with its revocations inline (the earlier layout) keeps them, moved to rows at load.
    #[test]
    fn session_revocations_round_trip_as_rows_and_inline_ones_are_moved() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::store::open(dir.path()).unwrap();
        load(&db).unwrap();
        let mut a = PrincipalContext::new("a");
        a.version = 7;
        a.credential_change_required = Some(revoked("x", 3.0)).map(|s| Stamped {
            value: (),
            time: s.time,
            source: s.source,
            seq: s.seq,
            ttl: None,
            party: Registrant::NONE,
        });
        a.session_revocations
            .insert("s1".into(), revoked("s1", 1.0));
        a.session_revocations
            .insert("s2".into(), revoked("s2", 2.0));
        let changes = Changes {
            revocations: revocation_rows(&a, a.session_revocations.keys()).unwrap(),
            contexts: vec![Arc::new(a.clone())],
            ..Changes::default()
        };
        let txn = db.begin_write().unwrap();
        write(&txn, &changes.encode().unwrap()).unwrap();
        txn.commit().unwrap();
        // s1 evicted: its row is deleted.
        a.session_revocations.remove("s1");
        let changes = Changes {
            revocations: revocation_rows(&a, [&"s1".to_owned()]).unwrap(),
            ..Changes::default()
        };
        // An earlier release's context, its revocation inline.
        let mut b = PrincipalContext::new("b");
        b.session_revocations
            .insert("s9".into(), revoked("s9", 9.0));
        let txn = db.begin_write().unwrap();
        write(&txn, &changes.encode().unwrap()).unwrap();
        txn.open_table(LEGACY_CONTEXTS)
            .unwrap()
            .insert("b", serde_json::to_vec(&b).unwrap().as_slice())
            .unwrap();
        txn.commit().unwrap();

        let by_key = |loaded: Loaded| -> std::collections::HashMap<String, PrincipalContext> {
            loaded
                .contexts
                .into_iter()
                .map(|c| (c.key.clone(), c))
                .collect()
        };
        let loaded = by_key(load(&db).unwrap());
        assert_eq!(loaded["a"], a, "every fact and the revocation rows");
        assert_eq!(loaded["b"], b);
        let txn = db.begin_read().unwrap();
        let stored_b = txn
            .open_table(PRINCIPAL_ROWS)
            .unwrap()
            .get("b\0")
            .unwrap()
            .unwrap()
            .value()
            .to_vec();
        let stored_b: serde_json::Value = serde_json::from_slice(&stored_b).unwrap();
        assert!(
            stored_b.get("session_revocations").is_none(),
            "moved out: {stored_b}"
        );
        assert!(txn
            .open_table(SESSION_REVOCATIONS)
            .unwrap()
            .get("b\0s9")
            .unwrap()
            .is_some());
        drop(txn);
        // And again after the move.
        assert_eq!(
            by_key(load(&db).unwrap())["b"].session_revocations,
            b.session_revocations
        );
    }
}
