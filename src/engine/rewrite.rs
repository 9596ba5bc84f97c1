//! What a batch whose commit failed leaves to write again. A shard applies a batch in memory
//! before its commit; if the commit fails (the store, or in cluster mode the changelog) and a
//! later one succeeds — a write error other than I/O, brokers that refused an append for a
//! moment — memory holds what neither does. A source that redelivers the batch's signals then
//! changes nothing in memory, so nothing would ever write them, and the checkpoint after would
//! acknowledge them: after a restart or a failover, a revoked grant would be valid again. So the
//! shard notes what each batch's ordinary write holds ([`Written`]), and after a failure writes
//! the present state of the same rows with a later batch and hands its decisions to delivery
//! again (same decisions, so the same SET `jti`s) — in cluster mode also to the decision trail,
//! which a refused append kept them off. A checkpoint chunk that failed puts its
//! contexts and session revocations back among the dirty ones instead
//! (`Shard::settle_checkpoints`): a redelivered signal dirties its context even when it changes
//! nothing, but notes no session revocation the context already holds. A registration answered
//! with the failure is written too: its grant is held and enforced in memory already, and the
//! client's retry of it is an update.

use std::sync::Arc;

use super::commit::Pending;
use super::persist::Changes;
use super::shard::Shard;
use crate::decision::Decision;
use crate::grant::{Grant, GrantId};

/// Most decisions kept to hand to delivery again while the store keeps failing. Beyond it a
/// decision is dropped with a warning. After a restart it is made again (same id): its batch was
/// never acknowledged, so its signals are replayed onto what is stored. If the store recovers
/// without a restart, the enforcement points never get it, though the grant is stored with its
/// status and live checks answer by it.
const MAX_HANDED_AGAIN: usize = 16_384;

/// The rows of a batch's ordinary write, by key, and the decisions it handed to delivery.
#[derive(Default)]
pub(super) struct Written {
    grants: Vec<GrantId>,
    deleted_grants: Vec<(GrantId, String)>,
    /// Keys of the contexts written with decisions.
    contexts: Vec<String>,
    aliases: Vec<(String, String)>,
    handoff: Vec<(Decision, Arc<Grant>)>,
}

impl Written {
    /// The keys of what `changes` writes in the ordinary lane (the checkpoint's contexts and
    /// revocations go to the bulk lane and are kept by its batches), before it is encoded.
    pub(super) fn of(changes: &Changes) -> Written {
        Written {
            grants: changes.grants.iter().map(|g| g.id.clone()).collect(),
            deleted_grants: changes.deleted_grants.clone(),
            contexts: changes
                .decided_contexts
                .iter()
                .map(|c| c.key.clone())
                .collect(),
            aliases: changes.aliases.clone(),
            handoff: Vec::new(),
        }
    }

    /// The rows and decisions held to write again.
    pub(super) fn len(&self) -> usize {
        self.grants.len()
            + self.deleted_grants.len()
            + self.contexts.len()
            + self.aliases.len()
            + self.handoff.len()
    }

    /// Adds the decisions of a failed batch delivery must act on — its own, and those it
    /// handed again itself: delivery dropped them when their commit failed.
    pub(super) fn hand_again(&mut self, p: &mut Pending) {
        self.handoff.extend(
            p.for_delivery()
                .map(|(_, d, grant)| (d.clone(), grant.clone())),
        );
        self.handoff.append(&mut p.rehanded);
    }

    /// Forgets what concerns principals another instance owns now: their rows are its to write.
    pub(super) fn release(&mut self, released: &dyn Fn(&str) -> bool) {
        self.deleted_grants
            .retain(|(_, principal)| !released(principal));
        self.contexts.retain(|key| !released(key));
        self.aliases.retain(|(_, principal)| !released(principal));
    }

    /// Adds `other`, each row once: while the store keeps failing, every batch's write holds
    /// what the last attempt wrote again, so without this the rows would pile up.
    pub(super) fn merge(&mut self, other: Written) {
        fn once<T: Ord>(rows: &mut Vec<T>, more: Vec<T>) {
            rows.extend(more);
            rows.sort_unstable();
            rows.dedup();
        }
        once(&mut self.grants, other.grants);
        once(&mut self.deleted_grants, other.deleted_grants);
        once(&mut self.contexts, other.contexts);
        once(&mut self.aliases, other.aliases);
        self.handoff.extend(other.handoff);
        let mut seen = std::collections::HashSet::new();
        self.handoff.retain(|(d, _)| seen.insert(d.id.clone()));
        if self.handoff.len() > MAX_HANDED_AGAIN {
            tracing::warn!(
                dropped = self.handoff.len() - MAX_HANDED_AGAIN,
                "the store keeps failing: decisions beyond the bound are left for replay after a restart"
            );
            self.handoff.truncate(MAX_HANDED_AGAIN);
        }
    }
}

impl Shard {
    /// Puts into batch `p` the present state of what a failed commit held: grants as they are
    /// now (or their deletion, if they are still gone), contexts as they are now, links that
    /// still lead where they did; and its decisions, handed to delivery again with `p`'s.
    pub(super) fn write_again(&self, written: Written, p: &mut Pending) {
        let shared = &self.shared;
        for id in written.grants {
            if let Some(grant) = shared.grants.get(&id).map(|g| g.clone()) {
                p.changes.grants.push(grant);
            }
        }
        for (id, principal) in written.deleted_grants {
            if !shared.grants.contains_key(&id) {
                p.changes.deleted_grants.push((id, principal));
            }
        }
        for key in written.contexts {
            if let Some(ctx) = shared.contexts.get(&key).map(|c| c.clone()) {
                p.changes.decided_contexts.push(ctx);
            }
        }
        for (alias, principal) in written.aliases {
            if shared.aliases.get(&alias).is_some_and(|p| *p == principal) {
                p.changes.aliases.push((alias, principal));
            }
        }
        p.rehanded.extend(written.handoff);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::testing::decision;
    use crate::decision::DecisionEffect;

    fn grant() -> Arc<Grant> {
        let request: crate::grant::GrantRequest = serde_json::from_value(serde_json::json!({
            "id": "g", "kind": "session", "subject": {"format": "email", "email": "u@example.com"},
            "issued_at": 10.0, "expires_at": 3600.0}))
        .unwrap();
        Arc::new(
            request
                .into_grant("email:u@example.com".into(), 10.0)
                .unwrap(),
        )
    }

    /// While the store keeps failing, each failed batch holds what the last attempt wrote again:
    /// merged, each row and each decision is kept once.
    #[test]
    fn rows_written_again_and_again_are_kept_once() {
        let one = || Written {
            grants: vec!["g".into()],
            deleted_grants: vec![("h".into(), "email:u@example.com".to_owned())],
            contexts: vec!["email:u@example.com".to_owned()],
            aliases: vec![("phone:1".to_owned(), "email:u@example.com".to_owned())],
            handoff: vec![(decision(DecisionEffect::Revoke, 1_700_000_000.0), grant())],
        };
        let mut pending = Written::default();
        for _ in 0..3 {
            pending.merge(one());
        }
        assert_eq!(pending.grants.len(), 1);
        assert_eq!(pending.deleted_grants.len(), 1);
        assert_eq!(pending.contexts.len(), 1);
        assert_eq!(pending.aliases.len(), 1);
        assert_eq!(pending.handoff.len(), 1);

        // Decisions to hand again are bounded.
        let many = Written {
            handoff: (0..MAX_HANDED_AGAIN + 10)
                .map(|i| {
                    let mut d = decision(DecisionEffect::Revoke, 1_700_000_000.0);
                    d.id = format!("d{i}");
                    (d, grant())
                })
                .collect(),
            ..Written::default()
        };
        pending.merge(many);
        assert_eq!(pending.handoff.len(), MAX_HANDED_AGAIN);

        // Released principals' rows are another instance's to write.
        pending.release(&|principal: &str| principal == "email:u@example.com");
        assert!(pending.deleted_grants.is_empty() && pending.contexts.is_empty());
        assert!(pending.aliases.is_empty());
    }
}
