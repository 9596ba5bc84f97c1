//! The engine's tables in the embedded store: contexts, grants and the alias index, each a JSON value
//! under its key. Written by the shards inside their batch transactions; read once at start-up.

use std::sync::Arc;

use redb::{Database, ReadableTable, TableDefinition, WriteTransaction};

use serde::{Deserialize, Serialize};

use crate::context::PrincipalContext;
use crate::decision::Decision;
use crate::grant::{Grant, GrantId};
use crate::store::WriteError;

const CONTEXTS: TableDefinition<&str, &[u8]> = TableDefinition::new("engine_contexts");
const GRANTS: TableDefinition<&str, &[u8]> = TableDefinition::new("engine_grants");
const ALIASES: TableDefinition<&str, &str> = TableDefinition::new("engine_aliases");
/// Decisions committed but not yet taken over by delivery (decision id → `{decision, grant}`).
const HANDOFF: TableDefinition<&str, &[u8]> = TableDefinition::new("engine_handoff");

/// Everything the engine persisted.
#[derive(Default)]
pub struct Loaded {
    pub contexts: Vec<PrincipalContext>,
    pub grants: Vec<Grant>,
    pub aliases: Vec<(String, String)>,
}

/// Creates the tables if needed and reads them all.
pub fn load(db: &Arc<Database>) -> Result<Loaded, WriteError> {
    let txn = db.begin_write().map_err(WriteError::storage)?;
    {
        txn.open_table(CONTEXTS).map_err(WriteError::storage)?;
        txn.open_table(GRANTS).map_err(WriteError::storage)?;
        txn.open_table(ALIASES).map_err(WriteError::storage)?;
        txn.open_table(HANDOFF).map_err(WriteError::storage)?;
    }
    txn.commit().map_err(WriteError::storage)?;

    let txn = db.begin_read().map_err(WriteError::storage)?;
    let mut out = Loaded::default();
    for entry in txn
        .open_table(CONTEXTS)
        .map_err(WriteError::storage)?
        .iter()
        .map_err(WriteError::storage)?
    {
        let (k, v) = entry.map_err(WriteError::storage)?;
        match serde_json::from_slice(v.value()) {
            Ok(ctx) => out.contexts.push(ctx),
            Err(e) => tracing::error!(key = %k.value(), error = %e, "unreadable context skipped"),
        }
    }
    for entry in txn
        .open_table(GRANTS)
        .map_err(WriteError::storage)?
        .iter()
        .map_err(WriteError::storage)?
    {
        let (k, v) = entry.map_err(WriteError::storage)?;
        match serde_json::from_slice(v.value()) {
            Ok(g) => out.grants.push(g),
            Err(e) => tracing::error!(key = %k.value(), error = %e, "unreadable grant skipped"),
        }
    }
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
    Ok(out)
}

/// The writes of one shard batch.
#[derive(Default)]
pub struct Changes {
    pub contexts: Vec<Arc<PrincipalContext>>,
    pub grants: Vec<Arc<Grant>>,
    pub deleted_grants: Vec<GrantId>,
    pub aliases: Vec<(String, String)>,
    /// Decisions delivery must take over (revoke, step-up, restrict), with their grants.
    pub handoff: Vec<(Decision, Arc<Grant>)>,
}

#[derive(Serialize, Deserialize)]
struct Handoff {
    decision: Decision,
    grant: Grant,
}

/// The decisions committed but not yet taken over by delivery, oldest first (start-up replay).
pub fn pending_handoff(db: &Arc<Database>) -> Result<Vec<(Decision, Arc<Grant>)>, WriteError> {
    let txn = db.begin_read().map_err(WriteError::storage)?;
    let t = txn.open_table(HANDOFF).map_err(WriteError::storage)?;
    let mut out = Vec::new();
    for entry in t.iter().map_err(WriteError::storage)? {
        let (_, v) = entry.map_err(WriteError::storage)?;
        if let Ok(h) = serde_json::from_slice::<Handoff>(v.value()) {
            out.push((h.decision, Arc::new(h.grant)));
        }
    }
    out.sort_by(|a, b| a.0.time.total_cmp(&b.0.time));
    Ok(out)
}

/// Marks decisions taken over by delivery, inside delivery's own transaction (so its outbox write and
/// this mark commit together).
pub fn handoff_done_in(txn: &WriteTransaction, ids: &[String]) -> Result<(), WriteError> {
    let mut t = txn.open_table(HANDOFF).map_err(WriteError::storage)?;
    for id in ids {
        t.remove(id.as_str()).map_err(WriteError::storage)?;
    }
    Ok(())
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.contexts.is_empty()
            && self.grants.is_empty()
            && self.deleted_grants.is_empty()
            && self.aliases.is_empty()
            && self.handoff.is_empty()
    }
}

/// A batch's writes, serialized: built on the shard's thread so the store's single writer thread
/// only inserts bytes (it is shared by every writer in the process and is the throughput ceiling).
#[derive(Default)]
pub struct Encoded {
    contexts: Vec<(String, Vec<u8>)>,
    grants: Vec<(String, Vec<u8>)>,
    deleted_grants: Vec<GrantId>,
    aliases: Vec<(String, String)>,
    handoff: Vec<(String, Vec<u8>)>,
}

impl Changes {
    /// Serializes the batch. A context or grant changed several times in the batch is written once,
    /// in its last state.
    pub fn encode(self) -> Result<Encoded, WriteError> {
        fn last_per_key<T: Serialize>(
            items: Vec<Arc<T>>,
            key: impl Fn(&T) -> &str,
        ) -> Result<Vec<(String, Vec<u8>)>, WriteError> {
            let mut seen = std::collections::HashSet::new();
            let mut out = Vec::new();
            for item in items.iter().rev() {
                if seen.insert(key(item)) {
                    let bytes = serde_json::to_vec(&**item)
                        .map_err(|e| WriteError::Storage(e.to_string()))?;
                    out.push((key(item).to_owned(), bytes));
                }
            }
            Ok(out)
        }
        let handoff = self
            .handoff
            .iter()
            .map(|(d, g)| {
                serde_json::to_vec(&serde_json::json!({"decision": d, "grant": &**g}))
                    .map(|bytes| (d.id.clone(), bytes))
                    .map_err(|e| WriteError::Storage(e.to_string()))
            })
            .collect::<Result<_, _>>()?;
        Ok(Encoded {
            contexts: last_per_key(self.contexts, |c| c.key.as_str())?,
            grants: last_per_key(self.grants, |g| &g.id[..])?,
            deleted_grants: self.deleted_grants,
            aliases: self.aliases,
            handoff,
        })
    }
}

/// Writes an encoded batch inside `txn`.
pub fn write(txn: &WriteTransaction, changes: &Encoded) -> Result<(), WriteError> {
    let insert_all = |table: TableDefinition<&str, &[u8]>, rows: &[(String, Vec<u8>)]| {
        if rows.is_empty() {
            return Ok(());
        }
        let mut t = txn.open_table(table).map_err(WriteError::storage)?;
        for (k, v) in rows {
            t.insert(k.as_str(), v.as_slice())
                .map_err(WriteError::storage)?;
        }
        Ok::<(), WriteError>(())
    };
    insert_all(CONTEXTS, &changes.contexts)?;
    insert_all(GRANTS, &changes.grants)?;
    if !changes.deleted_grants.is_empty() {
        let mut t = txn.open_table(GRANTS).map_err(WriteError::storage)?;
        for id in &changes.deleted_grants {
            t.remove(&**id).map_err(WriteError::storage)?;
        }
    }
    insert_all(HANDOFF, &changes.handoff)?;
    if !changes.aliases.is_empty() {
        let mut t = txn.open_table(ALIASES).map_err(WriteError::storage)?;
        for (k, v) in &changes.aliases {
            t.insert(k.as_str(), v.as_str())
                .map_err(WriteError::storage)?;
        }
    }
    Ok(())
}
