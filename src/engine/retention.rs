//! Context retention: the context of a subject no grant refers to is forgotten once its newest
//! fact is older than [`EngineSettings::context_retention`](super::EngineSettings) (by event
//! time). Without it every subject a transmitter ever named would stay in memory and on disk for
//! good — a risk feed scoring every account of an organisation fills both with subjects that
//! never hold a grant here. A subject that has a grant keeps its context as long as it has one,
//! whatever the age of its facts: what its grants are evaluated on never disappears under them.
//!
//! A thread of its own looks through the contexts every
//! [`context_scan_interval`](super::EngineSettings) and sends the keys it finds due to the shards
//! that own them ([`Msg::Forget`]), which look again — a grant registered or a signal applied
//! meanwhile keeps the context — and delete them with their next commit (in cluster mode the
//! changelog gets the tombstone). The scan costs the shards nothing until a context is due, and
//! no shard's inbox waits behind a walk over a million contexts.

use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;

use super::commit::Pending;
use super::shard::Shard;
use super::{member_index, obo_index, principal_index, Msg, Shared};
use crate::context::PrincipalContext;
use crate::parts::in_parts;
use crate::principal::GRANT_MEMBERS;

/// Keys per [`Msg::Forget`]: one shard batch's worth of deletions at most.
const FORGET_CHUNK: usize = 256;

/// Whether a grant refers to the context `key`: as its principal, one of its members (every member
/// is indexed), or the user an agent acts for.
fn referenced(shared: &Shared, key: &str) -> bool {
    shared.index.contains_key(principal_index(key).as_str())
        || shared.index.contains_key(obo_index(key).as_str())
        || GRANT_MEMBERS
            .iter()
            .any(|m| shared.index.contains_key(member_index(m, key).as_str()))
}

/// Whether `ctx`'s newest fact is older than the retention window at `now` (a context holding no
/// fact is).
fn stale(shared: &Shared, ctx: &PrincipalContext, now: f64) -> bool {
    let keep = shared.settings.context_retention.as_secs_f64();
    ctx.last_event_time()
        .is_none_or(|newest| newest + keep < now)
}

/// The retention thread: a scan every interval until `stop` is dropped.
pub(super) fn run(shared: Arc<Shared>, inboxes: Vec<Sender<Msg>>, stop: Receiver<()>) {
    let interval = shared.settings.context_scan_interval;
    loop {
        match stop.recv_timeout(interval) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
        let due = scan(&shared);
        for (shard, keys) in due.into_iter().enumerate() {
            for keys in in_parts(keys, FORGET_CHUNK) {
                if inboxes[shard].send(Msg::Forget { keys }).is_err() {
                    return;
                }
            }
        }
    }
}

/// The keys of the contexts due to be forgotten, per owning shard. The contexts are only
/// snapshotted (an `Arc` each) while the map's locks are held, so a shard updating one waits for
/// a pointer copy, not for every fact of a segment's contexts to be read; ages and grant references
/// are read after, with no lock of the contexts held.
fn scan(shared: &Shared) -> Vec<Vec<String>> {
    let now = shared.settings.clock.now();
    let contexts: Vec<Arc<PrincipalContext>> =
        shared.contexts.iter().map(|c| c.value().clone()).collect();
    metrics::gauge!(crate::telemetry::CONTEXTS).set(contexts.len() as f64);
    let mut due = vec![Vec::new(); shared.settings.shards.max(1)];
    for ctx in contexts {
        if stale(shared, &ctx, now) && !referenced(shared, &ctx.key) {
            due[shared.shard_of(&ctx.key)].push(ctx.key.clone());
        }
    }
    due
}

impl Shard {
    /// Forgets the context `key` if it is still due: no grant refers to it, its newest fact is
    /// still past the window, and no write of it is waiting (a context changed since the scan is
    /// not stale any more; one that is part of this batch's writes stays for the next scan).
    pub(super) fn forget_context(&mut self, key: &str, p: &mut Pending) {
        let now = self.shared.settings.clock.now();
        let Some(ctx) = self.shared.contexts.get(key).map(|c| c.clone()) else {
            return;
        };
        if !stale(&self.shared, &ctx, now)
            || referenced(&self.shared, key)
            || self.dirty.contains(key)
            || p.decided.contains(key)
            || self.dirty_revocations.iter().any(|(c, _)| c == key)
            || p.revocations.iter().any(|(c, _)| c == key)
        {
            return;
        }
        self.shared.contexts.remove(key);
        p.changes.revocations.extend(
            ctx.session_revocations
                .keys()
                .map(|filter| (format!("{key}\0{filter}"), None)),
        );
        p.changes.deleted_contexts.push(key.to_owned());
        metrics::counter!(crate::telemetry::CONTEXTS_FORGOTTEN).increment(1);
    }
}
