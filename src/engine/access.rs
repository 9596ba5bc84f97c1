//! Access requests (the AuthZEN door, `authzen.rs`): is this grant usable for this action on this
//! resource, right now, under the request-time rules?
//!
//! The grant must pass what `check` asks (known, not expired, not revoked, stepped up or
//! restricted, the action within its scopes, the resource its audience); then the request-time
//! rules (`on: [access-request]`) run on its principal's live context — and, for an agent
//! delegation, on the delegating user's too ([`crate::evaluate::evaluate_request`]). Fail closed:
//! a rule that errors denies. Nothing changes: no grant, no context. Each evaluation becomes a
//! decision record (cause `access_request`, effect `allow` or `deny`, every hop of the delegation,
//! the asking client) written to that client's access log off the request path, in batches.

use std::sync::Arc;

use serde_json::Value;

use super::inputs::Inputs;
use super::Engine;
use crate::decision::{Cause, Decision, DecisionEffect, Hop};
use crate::grant::GrantStatus;

/// How an access request names the grant(s) it is made under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrantRef {
    Id(String),
    /// A session's member key (`opaque:<id>`, or an identifier's key): its grants.
    Session(String),
    /// A token's key (`jwt_id:<iss>|<jti>`): its grants.
    Token(String),
}

/// What an access request names besides its raw `request` (what rules see).
pub struct AccessRequest<'a> {
    /// `None`: nothing named (denied, fail closed).
    pub grant: Option<&'a GrantRef>,
    pub action: Option<&'a str>,
    pub resource: Option<&'a str>,
    /// `{subject, resource, action, context}` as the request gave them.
    pub request: Arc<Value>,
    /// The API client asking: recorded as the decision's `cause.source`.
    pub client: Option<&'a str>,
}

/// The answer to one access request.
#[derive(Debug, Clone)]
pub struct Access {
    pub allowed: bool,
    /// `unknown`, `expired`, the grant's status, or `denied_by_rule`.
    pub status: String,
    pub reason: String,
    /// The request-time rules that denied it.
    pub rules: Vec<String>,
    pub hops: Vec<Hop>,
    pub policy_version: String,
    /// The decision record's id (what the audit log holds of it, when recorded).
    pub decision_id: String,
}

impl Engine {
    /// Decides `req` now: every grant it names must allow. The decision record is returned
    /// with the answer; the caller records it ([`AccessLog`]) or not (sampling).
    pub fn evaluate_access(&self, req: AccessRequest<'_>) -> (Access, Decision) {
        let now = self.shared.settings.clock.now();
        let policy = self.shared.policy();
        let named: Vec<Arc<crate::grant::Grant>> = match req.grant {
            None => Vec::new(),
            Some(GrantRef::Id(id)) => self.grant(id).into_iter().collect(),
            Some(GrantRef::Session(key)) => self.grants_by(Some(key), None),
            Some(GrantRef::Token(key)) => self.grants_by(None, Some(key)),
        };
        let grants: Vec<&crate::grant::Grant> = named.iter().map(|g| &**g).collect();
        let base = crate::check::check(&grants, req.action, req.resource, now);
        let mut access = Access {
            allowed: base.decision == crate::check::Verdict::Allow,
            status: base.status,
            reason: base.reason,
            rules: Vec::new(),
            hops: Vec::new(),
            policy_version: policy.version.clone(),
            decision_id: String::new(),
        };
        let mut context_version = 0;
        let mut errors = Vec::new();
        // The record names the grant that denied, else the first one named.
        let mut recorded = named.first();
        for grant in &named {
            if !access.allowed {
                break;
            }
            let inputs = Inputs::gather(&self.shared.contexts, grant);
            context_version = inputs.context_version();
            let (outcome, hops) = inputs.evaluate_request(
                &policy,
                grant,
                req.request.clone(),
                &self.shared.settings.decay,
                now,
            );
            outcome.record(&grant.id);
            access.hops.extend(hops);
            if outcome.effect.is_some() {
                recorded = Some(grant);
                let deciding = outcome.deciding_rules();
                access.allowed = false;
                access.status = "denied_by_rule".into();
                access.rules = deciding.iter().map(|m| m.id.clone()).collect();
                access.reason = deciding
                    .iter()
                    .map(|m| m.reason.as_str())
                    .collect::<Vec<_>>()
                    .join("; ");
                errors = deciding
                    .iter()
                    .filter(|m| m.error.is_some())
                    .map(|m| m.id.clone())
                    .collect();
            }
        }
        let cause = Cause {
            jti: Some(format!("{:032x}", rand::random::<u128>())),
            event_type: req.action.map(str::to_owned),
            source: req.client.map(str::to_owned),
            ..Cause::of_state(Cause::ACCESS_REQUEST)
        };
        let effect = if access.allowed {
            DecisionEffect::Allow
        } else {
            DecisionEffect::Deny
        };
        let grant_id = recorded.map_or("", |g| &*g.id);
        let status = recorded.map_or(GrantStatus::Active, |g| g.status);
        let decision = Decision {
            id: Decision::make_id(grant_id, &cause, effect, &policy.version, &access.rules),
            time: now,
            grant_id: grant_id.to_owned(),
            subject: recorded.map_or_else(String::new, |g| g.principal.to_string()),
            effect,
            previous_status: status,
            status,
            rules: access.rules.clone(),
            reason: access.reason.clone(),
            errors,
            shadow: false,
            policy_version: policy.version.clone(),
            context_version,
            cause,
            enforcement_points: Vec::new(),
            hops: access.hops.clone(),
        };
        access.decision_id = decision.id.clone();
        (access, decision)
    }
}

/// Writes access decision records to their client's access log (`audit::AccessLogs`) off the
/// request path: a bounded queue drained in batches by one thread (one sync per client in a
/// batch, not per request). A record that finds no room is
/// dropped and counted (`vigil_access_audit_dropped_total`): an evaluation never waits for the
/// disk. The queue is shared between API clients fairly ([`Shares`]): one that floods it with
/// evaluations loses its own records, not another's.
#[derive(Clone)]
pub struct AccessLog {
    queue: std::sync::mpsc::SyncSender<(Arc<str>, Decision)>,
    shares: Arc<std::sync::Mutex<Shares>>,
}

/// Records waiting to be written, at most.
const ACCESS_LOG_QUEUE: usize = 16_384;
/// Records written in one append, at most.
const ACCESS_LOG_BATCH: usize = 1_024;

/// The queue's places each client holds. A client may hold `capacity / (n + 1)` of them, `n`
/// being the clients holding any (itself included), and none once `capacity` are held: a client
/// alone holds at most half of the queue, and one past its share (because others came) gets no
/// more until the writer has taken its records down to it — so the queue drains towards room for
/// one more client, and a client that floods it cannot keep another's records out of it.
#[derive(Debug, Default)]
struct Shares {
    held: std::collections::HashMap<Arc<str>, usize>,
    total: usize,
}

impl Shares {
    /// Counts one more record of `client` if it is within its share of `capacity`.
    fn take(&mut self, client: &Arc<str>, capacity: usize) -> bool {
        let held = self.held.get(client).copied().unwrap_or(0);
        let holders = self.held.len() + usize::from(held == 0);
        if self.total >= capacity || held >= (capacity / (holders + 1)).max(1) {
            return false;
        }
        *self.held.entry(client.clone()).or_insert(0) += 1;
        self.total += 1;
        true
    }

    /// `n` of `client`'s records left the queue (written, or dropped).
    fn release(&mut self, client: &str, n: usize) {
        if let Some(held) = self.held.get_mut(client) {
            let n = n.min(*held);
            *held -= n;
            self.total -= n;
            if *held == 0 {
                self.held.remove(client);
            }
        }
    }
}

/// Locks the shares; a panic while they were held cannot leave a count half-changed.
fn shares(s: &std::sync::Mutex<Shares>) -> std::sync::MutexGuard<'_, Shares> {
    s.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl AccessLog {
    /// Starts the writer thread for `audit`; it ends when every [`AccessLog`] is dropped.
    pub fn start(logs: Arc<crate::audit::AccessLogs>) -> AccessLog {
        let (queue, records) =
            std::sync::mpsc::sync_channel::<(Arc<str>, Decision)>(ACCESS_LOG_QUEUE);
        let shares_held = Arc::new(std::sync::Mutex::new(Shares::default()));
        let released = shares_held.clone();
        let spawned = std::thread::Builder::new()
            .name("vigil-access-log".into())
            .spawn(move || {
                while let Ok(first) = records.recv() {
                    let mut batch = vec![first];
                    while batch.len() < ACCESS_LOG_BATCH {
                        match records.try_recv() {
                            Ok(d) => batch.push(d),
                            Err(_) => break,
                        }
                    }
                    {
                        let mut held = shares(&released);
                        for (client, _) in &batch {
                            held.release(client, 1);
                        }
                    }
                    // One append (one sync) per client in the batch, in its log.
                    let mut by_client: std::collections::HashMap<Arc<str>, Vec<Decision>> =
                        std::collections::HashMap::new();
                    for (client, d) in batch {
                        by_client.entry(client).or_default().push(d);
                    }
                    for (client, decisions) in by_client {
                        if let Err(e) = logs.append(&client, &decisions) {
                            metrics::counter!(crate::telemetry::ACCESS_AUDIT_DROPPED)
                                .increment(decisions.len() as u64);
                            tracing::warn!(error = %e, client = %client, records = decisions.len(), "access decisions not written to the audit log");
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "could not start the access log writer: access decisions are not recorded");
        }
        AccessLog {
            queue,
            shares: shares_held,
        }
    }

    /// Queues `client`'s `decision` for the audit log (dropped and counted when the client is
    /// past its share of the queue, or the queue is full).
    pub fn record(&self, client: &Arc<str>, decision: Decision) {
        if !shares(&self.shares).take(client, ACCESS_LOG_QUEUE) {
            metrics::counter!(crate::telemetry::ACCESS_AUDIT_DROPPED).increment(1);
            return;
        }
        if self.queue.try_send((client.clone(), decision)).is_err() {
            shares(&self.shares).release(client, 1);
            metrics::counter!(crate::telemetry::ACCESS_AUDIT_DROPPED).increment(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client alone may hold half the queue; the next finds room however much the first holds;
    /// shares shrink as more clients hold places, never past the queue's capacity, and places
    /// come back as records leave.
    #[test]
    fn a_client_that_floods_the_queue_leaves_room_for_others() {
        let (a, b, c): (Arc<str>, Arc<str>, Arc<str>) = ("a".into(), "b".into(), "c".into());
        let mut shares = Shares::default();
        let taken =
            |s: &mut Shares, who: &Arc<str>, n: usize| (0..n).filter(|_| s.take(who, 120)).count();
        assert_eq!(taken(&mut shares, &a, 1000), 60, "alone: half of 120");
        assert_eq!(
            taken(&mut shares, &b, 1000),
            40,
            "two holding: a third each"
        );
        assert_eq!(taken(&mut shares, &a, 1000), 0, "a is past its share");
        assert_eq!(
            taken(&mut shares, &c, 1000),
            20,
            "a quarter, but only 20 places are left"
        );
        assert_eq!(shares.total, 120);
        shares.release(&a, 60);
        assert_eq!(
            taken(&mut shares, &a, 1000),
            30,
            "three holding: a quarter each"
        );
        shares.release(&a, 30);
        shares.release(&b, 40);
        shares.release(&c, 1000);
        assert!(shares.held.is_empty() && shares.total == 0, "emptied");
        assert_eq!(taken(&mut shares, &c, 1000), 60);
    }
}
