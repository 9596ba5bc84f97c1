//! Evaluating one grant: builds the policy inputs (`grant`, `context`, `signal`, `subject`, `now`)
//! from the grant, the contexts it depends on and the triggering signal, and runs the policy set.
//!
//! Pure and shared: the engine and `vigil policy test` call the same function, so a policy test
//! exercises exactly what production evaluates.
//!
//! An agent delegation is evaluated against the agent's own context *and* the delegating user's, and
//! the stronger outcome wins: a delegation is never stronger than the user who granted it.

pub mod testing;

use std::sync::Arc;

use serde_json::{json, Value};

use crate::context::{Decay, PrincipalContext};
use crate::grant::Grant;
use crate::policy::{EvalInput, Evaluation, PolicySet};
use crate::principal::{filter_matches, Target};
use crate::signal::Signal;

/// A signal as policy sees it: the signal, what it targets, and its `signal` variable — built once
/// per signal, however many grants the signal re-evaluates.
#[derive(Debug)]
pub struct Triggered<'a> {
    pub signal: &'a Signal,
    pub target: &'a Target,
    view: Arc<Value>,
}

impl<'a> Triggered<'a> {
    pub fn new(signal: &'a Signal, target: &'a Target) -> Triggered<'a> {
        let view = crate::context::object([
            ("type", json!(signal.event_type_name())),
            ("uri", json!(signal.event_uri)),
            ("jti", json!(signal.jti)),
            ("txn", json!(signal.txn)),
            ("iss", json!(signal.iss)),
            ("source", json!(signal.source.label())),
            ("event_time", json!(signal.event_time)),
            // Taken out of the event's JSON, not copied: a signal's view is built for each one.
            (
                "payload",
                serde_json::to_value(&signal.event)
                    .ok()
                    .and_then(|mut v| v.get_mut("payload").map(Value::take))
                    .unwrap_or(Value::Null),
            ),
        ]);
        Triggered {
            signal,
            target,
            view: Arc::new(view),
        }
    }
}

/// What triggered an evaluation.
#[derive(Debug, Clone, Copy)]
pub enum Trigger<'a> {
    /// A signal, with its subject resolved.
    Signal(&'a Triggered<'a>),
    /// No signal: registration, a policy swap, or a dependency's change. Evaluates current state.
    State,
}

/// The contexts a grant's evaluation reads.
#[derive(Debug, Clone, Copy)]
pub struct Contexts<'a> {
    pub principal: &'a PrincipalContext,
    /// Contexts of the grant's device and session, where facts about them alone arrived.
    pub entities: &'a [&'a PrincipalContext],
    /// The delegating user's context, for agent delegations.
    pub delegator: Option<&'a PrincipalContext>,
    /// `principal`'s view, built once for all of its grants by a caller evaluating them one
    /// after the other (a policy swap, an impact preview) — only where it is the same for each
    /// ([`PrincipalContext::view_is_grant_independent`], no device or session context): building
    /// it again for every grant was a sixth of a swap's time.
    pub view: Option<&'a Arc<Value>>,
}

/// Whether a signal's subject covers this grant (principal identifiers, narrowing members, token).
pub fn subject_matches(target: &Target, grant: &Grant) -> bool {
    let names_grant = target.identifiers.is_empty()
        || target.identifiers.iter().any(|id| {
            **id == *grant.principal
                || grant.identifiers.contains(id)
                || grant.token.as_deref() == Some(id.as_str())
                || grant.on_behalf_of.as_deref() == Some(id.as_str())
        });
    let token_ok = target
        .identifiers
        .iter()
        .filter(|id| id.starts_with("jwt_id:"))
        .all(|id| grant.token.as_deref() == Some(id.as_str()));
    names_grant && token_ok && filter_matches(&target.members, &grant.members)
}

/// The `signal` variable: the trigger's, shared.
pub fn signal_view(trigger: Trigger<'_>) -> Arc<Value> {
    static NONE: std::sync::OnceLock<Arc<Value>> = std::sync::OnceLock::new();
    match trigger {
        Trigger::Signal(t) => t.view.clone(),
        Trigger::State => NONE
            .get_or_init(|| Arc::new(json!({"type": "none"})))
            .clone(),
    }
}

/// The `subject` variable.
pub fn subject_view(trigger: Trigger<'_>, grant: &Grant) -> Value {
    match trigger {
        Trigger::Signal(t) => json!({
            "identifiers": t.target.identifiers,
            "members": t.target.members,
            "matches_grant": subject_matches(t.target, grant),
        }),
        Trigger::State => json!({
            "identifiers": [grant.principal],
            "members": {},
            "matches_grant": true,
        }),
    }
}

/// Evaluates `grant` under `policy`.
pub fn evaluate_grant(
    policy: &PolicySet,
    grant: &Grant,
    contexts: Contexts<'_>,
    trigger: Trigger<'_>,
    decay: &Decay,
    now: f64,
) -> Evaluation {
    let [outcome] = evaluate_grant_under([policy], grant, contexts, trigger, decay, now);
    outcome
}

/// Evaluates `grant` under each of `policies` on inputs built once (a shadow set or a replay's
/// candidate beside the live set).
pub fn evaluate_grant_under<const N: usize>(
    policies: [&PolicySet; N],
    grant: &Grant,
    contexts: Contexts<'_>,
    trigger: Trigger<'_>,
    decay: &Decay,
    now: f64,
) -> [Evaluation; N] {
    let trigger_type = match trigger {
        Trigger::Signal(t) => Some(t.signal.event_type_name().to_owned()),
        Trigger::State => None,
    };
    let input = EvalInput {
        grant: grant.policy_view(),
        context: contexts.view.cloned().unwrap_or_else(|| {
            Arc::new(
                contexts
                    .principal
                    .view(grant, contexts.entities, decay, now),
            )
        }),
        signal: signal_view(trigger),
        subject: subject_view(trigger, grant),
        now,
        trigger: trigger_type,
        request: crate::policy::no_request(),
    };
    let mut outcomes = policies.map(|policy| policy.evaluate_screened(&input));
    if let Some(delegator) = contexts.delegator {
        let input = EvalInput {
            context: Arc::new(delegator.view(grant, contexts.entities, decay, now)),
            ..input
        };
        for (outcome, policy) in outcomes.iter_mut().zip(policies) {
            with_delegating_user(outcome, policy.evaluate_screened(&input));
        }
    }
    outcomes
}

pub use crate::decision::Hop;

/// Evaluates the request-time rules on an access `request` for `grant`: on the grant principal's
/// context, and for an agent delegation also on the delegating user's — an agent acting for a user
/// is never allowed more than the user; every hop is returned for the decision log.
pub fn evaluate_request(
    policy: &PolicySet,
    grant: &Grant,
    contexts: Contexts<'_>,
    request: Arc<Value>,
    decay: &Decay,
    now: f64,
) -> (Evaluation, Vec<Hop>) {
    let input = EvalInput {
        grant: grant.policy_view(),
        context: Arc::new(
            contexts
                .principal
                .view(grant, contexts.entities, decay, now),
        ),
        signal: signal_view(Trigger::State),
        subject: subject_view(Trigger::State, grant),
        now,
        trigger: None,
        request,
    };
    let hop = |principal: &str, role: &str, e: &Evaluation| Hop {
        principal: principal.to_owned(),
        role: role.to_owned(),
        rules: e.matched.iter().map(|m| m.id.clone()).collect(),
        denied: e.effect.is_some(),
    };
    let mut outcome = policy.evaluate_request(&input);
    let mut hops = vec![hop(&grant.principal, "principal", &outcome)];
    if let (Some(delegator), Some(user)) = (contexts.delegator, grant.on_behalf_of.as_deref()) {
        let input = EvalInput {
            context: Arc::new(delegator.view(grant, contexts.entities, decay, now)),
            ..input
        };
        let via_user = policy.evaluate_request(&input);
        hops.push(hop(user, "delegating_user", &via_user));
        with_delegating_user(&mut outcome, via_user);
    }
    (outcome, hops)
}

/// Folds the delegating user's evaluation into the agent's: the stronger effect wins, and the
/// user's matches are added (said to be the user's) where the agent's did not already match.
fn with_delegating_user(outcome: &mut Evaluation, via_user: Evaluation) {
    outcome.effect = outcome.effect.max(via_user.effect);
    for mut m in via_user.matched {
        if !outcome.matched.iter().any(|o| o.id == m.id) {
            m.reason = format!("delegating user: {}", m.reason);
            outcome.matched.push(m);
        }
    }
    outcome.shadow.extend(via_user.shadow);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A signal's `signal` variable is built once: every grant it re-evaluates shares it.
    #[test]
    fn a_signals_view_is_built_once_and_shared() {
        let signal = testing::signal_from_claims(
            &crate::test_support::spec_example("caep-session-revoked.json"),
            1,
        )
        .unwrap();
        let target = Target::default();
        let triggered = Triggered::new(&signal, &target);
        let first = signal_view(Trigger::Signal(&triggered));
        let second = signal_view(Trigger::Signal(&triggered));
        assert!(Arc::ptr_eq(&first, &second));
        assert_eq!(first["type"], "session-revoked");
        assert_eq!(signal_view(Trigger::State)["type"], "none");
        // Every field policy reads, in its order, the payload as the event serializes it.
        let keys: Vec<&str> = first
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            [
                "type",
                "uri",
                "jti",
                "txn",
                "iss",
                "source",
                "event_time",
                "payload"
            ]
        );
        assert_eq!(first["jti"], signal.jti.as_str());
        assert_eq!(first["iss"], signal.iss.as_str());
        assert_eq!(first["event_time"], signal.event_time);
        assert_eq!(
            first["payload"],
            serde_json::to_value(&signal.event).unwrap()["payload"]
        );
    }

    /// The screened evaluation gives exactly what running every condition gives: the shipped
    /// rules and rules that fail (fail closed), shadow and `notify` ones, over every spec
    /// example's signal folded into a context one after the other, for grants of each kind, as
    /// the signal triggers them and on current state.
    #[test]
    fn screening_rules_out_changes_no_outcome() {
        let shipped = PolicySet::load_dir_or_builtin(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/policies"
        )))
        .unwrap();
        let failing = PolicySet::from_sources(&[(
            "f.yaml".to_owned(),
            r#"
rules:
  - {id: missing-fact, on: ['*'], when: "context.nothing.here == 1", effect: revoke}
  - {id: wrong-type, on: ['*'], when: "context.risk.level > 3", effect: step_up}
  - {id: out-of-range, on: ['*'], when: "grant.scopes[7] == 'admin'", effect: restrict}
  - {id: guarded, on: ['*'], when: "has(context.risk.level) && context.risk.level == 'HIGH'", effect: revoke}
  - {id: never, on: ['*'], when: "grant.issued_at < 0", effect: revoke}
  - {id: noted, on: [session-revoked], when: "subject.matches_grant", effect: notify}
  - {id: watched, on: ['*'], mode: shadow, when: "context.risk.level == 'LOW'", effect: revoke}
  - {id: by-signal, on: ['*'], when: "signal.type == 'credential-change' && grant.kind == 'session'", effect: step_up}
"#
            .to_owned(),
        )])
        .unwrap();
        let grants: Vec<Grant> = [
            json!({"id": "h", "kind": "session", "subject": {"format": "email", "email": "user@example.com"},
                   "session": "s1", "device": "d1", "scopes": ["read"], "issued_at": 1_500_000_000u64,
                   "expires_at": 1_900_000_000u64,
                   "attributes": {"required_assurance": {"namespace": "nist-aal", "level": "aal2"}}}),
            json!({"id": "w", "kind": "access_token", "principal_type": "workload",
                   "subject": {"format": "opaque", "id": "svc-1"}, "issued_at": 1_800_000_000u64,
                   "expires_at": 1_900_000_000u64}),
            json!({"id": "a", "kind": "agent_delegation", "principal_type": "agent",
                   "subject": {"format": "opaque", "id": "agent-7"},
                   "on_behalf_of": {"format": "email", "email": "user@example.com"},
                   "issued_at": 1_600_000_000u64, "expires_at": 1_900_000_000u64}),
        ]
        .into_iter()
        .map(|g| {
            let request: crate::grant::GrantRequest = serde_json::from_value(g).unwrap();
            let principal = request.identifier_keys().unwrap().remove(0);
            request.into_grant(principal, 1_600_000_000.0).unwrap()
        })
        .collect();
        let mut names: Vec<String> = std::fs::read_dir(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/spec-examples"
        ))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| (n.starts_with("caep-") || n.starts_with("risc-")) && n.ends_with(".json"))
        .collect();
        names.sort();
        let decay = Decay::default();
        let now = 1_700_000_500.0;
        let (mut compared, mut matched, mut failed) = (0, 0, 0);
        for grant in &grants {
            let mut context = PrincipalContext::new(&grant.principal);
            for (seq, name) in names.iter().enumerate() {
                let Ok(signal) = testing::signal_from_claims(
                    &crate::test_support::spec_example(name),
                    seq as u64,
                ) else {
                    continue;
                };
                let target = Target::of(&signal.subject);
                context.apply(&signal, &target);
                let triggered = Triggered::new(&signal, &target);
                for trigger in [Trigger::Signal(&triggered), Trigger::State] {
                    let input = EvalInput {
                        grant: grant.policy_view(),
                        context: Arc::new(context.view(grant, &[], &decay, now)),
                        signal: signal_view(trigger),
                        subject: subject_view(trigger, grant),
                        now,
                        trigger: match trigger {
                            Trigger::Signal(t) => Some(t.signal.event_type_name().to_owned()),
                            Trigger::State => None,
                        },
                        request: crate::policy::no_request(),
                    };
                    for policy in [&shipped, &failing] {
                        let every = policy.evaluate(&input);
                        assert_eq!(
                            policy.evaluate_screened(&input),
                            every,
                            "{name}, grant {}",
                            grant.id
                        );
                        compared += 1;
                        matched += usize::from(every.effect.is_some());
                        failed += every.matched.iter().filter(|m| m.error.is_some()).count();
                    }
                }
            }
        }
        assert!(compared > 100, "{compared} evaluations compared");
        assert!(
            matched > 0 && failed > 0,
            "{matched} matched, {failed} failed closed"
        );
    }
}
