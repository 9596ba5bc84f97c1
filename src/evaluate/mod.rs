//! Evaluating one grant: builds the policy inputs (`grant`, `context`, `signal`, `subject`, `now`)
//! from the grant, the contexts it depends on and the triggering signal, and runs the policy set.
//!
//! Pure and shared: the engine and `vigil policy test` call the same function, so a policy test
//! exercises exactly what production evaluates.
//!
//! An agent delegation is evaluated against the agent's own context *and* the delegating user's, and
//! the stronger outcome wins: a delegation is never stronger than the user who granted it.

pub mod testing;

use serde_json::{json, Value};

use crate::context::{Decay, PrincipalContext};
use crate::grant::Grant;
use crate::policy::{EvalInput, Evaluation, PolicySet};
use crate::principal::{filter_matches, Target};
use crate::signal::Signal;

/// What triggered an evaluation.
#[derive(Debug, Clone, Copy)]
pub enum Trigger<'a> {
    /// A signal, with its subject resolved.
    Signal(&'a Signal, &'a Target),
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

/// The `signal` variable.
pub fn signal_view(trigger: Trigger<'_>) -> Value {
    match trigger {
        Trigger::Signal(s, _) => json!({
            "type": s.event_type_name(),
            "uri": s.event_uri,
            "jti": s.jti,
            "txn": s.txn,
            "iss": s.iss,
            "source": s.source.label(),
            "event_time": s.event_time,
            "payload": serde_json::to_value(&s.event).map(|v| v["payload"].clone()).unwrap_or(Value::Null),
        }),
        Trigger::State => json!({"type": "none"}),
    }
}

/// The `subject` variable.
pub fn subject_view(trigger: Trigger<'_>, grant: &Grant) -> Value {
    match trigger {
        Trigger::Signal(_, target) => json!({
            "identifiers": target.identifiers,
            "members": target.members,
            "matches_grant": subject_matches(target, grant),
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
    let trigger_type = match trigger {
        Trigger::Signal(s, _) => Some(s.event_type_name().to_owned()),
        Trigger::State => None,
    };
    let input = EvalInput {
        grant: grant.policy_view(),
        context: contexts
            .principal
            .view(grant, contexts.entities, decay, now),
        signal: signal_view(trigger),
        subject: subject_view(trigger, grant),
        now,
        trigger: trigger_type,
    };
    let mut outcome = policy.evaluate(&input);
    if let Some(delegator) = contexts.delegator {
        let input = EvalInput {
            context: delegator.view(grant, contexts.entities, decay, now),
            ..input
        };
        let via_user = policy.evaluate(&input);
        outcome.effect = outcome.effect.max(via_user.effect);
        for mut m in via_user.matched {
            if !outcome.matched.iter().any(|o| o.id == m.id) {
                m.reason = format!("delegating user: {}", m.reason);
                outcome.matched.push(m);
            }
        }
        outcome.shadow.extend(via_user.shadow);
    }
    outcome
}
