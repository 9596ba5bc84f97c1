//! The decision rules: what one evaluation's outcome does to one grant. Pure — given the grant,
//! the outcome and its cause it returns the decisions made and the grant's new state; the shard
//! applies them ([`super::shard`]). A status change is one decision (revoke, step-up, restrict, or
//! allow when no rule restricts the grant any more); each `notify` match and each shadow match is
//! a decision of its own that changes nothing.

use crate::decision::{Cause, Decision, DecisionEffect};
use crate::grant::{Grant, GrantStatus, Revocation};
use crate::policy::{Effect, Evaluation};
use crate::signal::Signal;

/// What an outcome decided about one grant.
#[derive(Default)]
pub(super) struct Decided {
    pub decisions: Vec<Decision>,
    /// The grant's new state, when its status changed.
    pub updated: Option<Grant>,
}

pub(super) fn decide(
    grant: &Grant,
    outcome: &Evaluation,
    cause: &Cause,
    policy_version: &str,
    context_version: u64,
    now: f64,
) -> Decided {
    let mut decided = Decided::default();
    let make = |effect: DecisionEffect,
                status: GrantStatus,
                rules: Vec<String>,
                reason: String,
                errors: Vec<String>,
                shadow: bool| Decision {
        id: Decision::make_id(&grant.id, cause, effect, policy_version, &rules)
            + if shadow { "-shadow" } else { "" },
        time: now,
        grant_id: grant.id.to_string(),
        subject: grant.principal.to_string(),
        effect,
        previous_status: grant.status,
        status,
        rules,
        reason,
        errors,
        shadow,
        policy_version: policy_version.to_owned(),
        context_version,
        cause: cause.clone(),
        enforcement_points: grant.enforcement_points.to_vec(),
        hops: Vec::new(),
    };
    let target = status_after(outcome);
    if target != grant.status {
        let deciding = outcome.deciding_rules();
        let (effect, rules, reason) = match target {
            GrantStatus::Revoked => (
                DecisionEffect::Revoke,
                deciding.iter().map(|m| m.id.clone()).collect(),
                join_reasons(&deciding),
            ),
            GrantStatus::StepUp => (
                DecisionEffect::StepUp,
                deciding.iter().map(|m| m.id.clone()).collect(),
                join_reasons(&deciding),
            ),
            GrantStatus::Restricted => (
                DecisionEffect::Restrict,
                deciding.iter().map(|m| m.id.clone()).collect(),
                join_reasons(&deciding),
            ),
            GrantStatus::Active => (
                DecisionEffect::Allow,
                Vec::new(),
                "no rule restricts the grant any more".to_owned(),
            ),
        };
        let errors = deciding
            .iter()
            .filter(|m| m.error.is_some())
            .map(|m| m.id.clone())
            .collect();
        let decision = make(effect, target, rules, reason, errors, false);
        let mut updated = grant.clone();
        updated.status = target;
        updated.status_reason =
            (target != GrantStatus::Active).then(|| decision.reason.as_str().into());
        updated.status_rules = (target != GrantStatus::Active)
            .then(|| Box::new(decision.rules.clone().into_boxed_slice()));
        if target == GrantStatus::Revoked {
            updated.revoked = Some(Box::new(Revocation {
                at: now,
                decision_id: decision.id.clone(),
                reason: decision.reason.clone(),
                rules: decision.rules.clone(),
            }));
        }
        decided.updated = Some(updated);
        decided.decisions.push(decision);
    }
    for n in outcome.notifications() {
        decided.decisions.push(make(
            DecisionEffect::Notify,
            target.max(grant.status),
            vec![n.id.clone()],
            n.reason.clone(),
            Vec::new(),
            false,
        ));
    }
    for s in &outcome.shadow {
        let effect = match s.effect {
            Effect::Revoke => DecisionEffect::Revoke,
            Effect::StepUp => DecisionEffect::StepUp,
            Effect::Restrict => DecisionEffect::Restrict,
            Effect::Notify => DecisionEffect::Notify,
        };
        let mut d = make(
            effect,
            grant.status,
            vec![s.id.clone()],
            s.reason.clone(),
            Vec::new(),
            true,
        );
        d.status = grant.status.max(target);
        decided.decisions.push(d);
    }
    decided
}

/// The status an outcome puts a grant in (an impact preview asks the same question).
pub(super) fn status_after(outcome: &Evaluation) -> GrantStatus {
    match outcome.effect {
        Some(Effect::Revoke) => GrantStatus::Revoked,
        Some(Effect::StepUp) => GrantStatus::StepUp,
        Some(Effect::Restrict) => GrantStatus::Restricted,
        Some(Effect::Notify) | None => GrantStatus::Active,
    }
}

fn join_reasons(matches: &[&crate::policy::RuleMatch]) -> String {
    matches
        .iter()
        .map(|m| m.reason.as_str())
        .collect::<Vec<_>>()
        .join("; ")
}

/// The cause of a decision a signal triggered (`kind`: `signal`, or `dependency` for a grant
/// re-evaluated because a device's or delegating user's context changed).
pub(super) fn cause_of(signal: &Signal, kind: &str) -> Cause {
    Cause {
        kind: kind.to_owned(),
        seq: Some(signal.seq),
        jti: Some(signal.jti.clone()),
        txn: signal.txn.clone(),
        source: Some(signal.source.label()),
        event_type: Some(signal.event_type_name().to_owned()),
        event_time: Some(signal.event_time),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::grant::GrantRequest;
    use crate::policy::RuleMatch;

    fn grant() -> Grant {
        let v = json!({"id": "g", "kind": "session",
            "subject": {"format": "email", "email": "u@example.com"},
            "issued_at": 10.0, "expires_at": 3600.0});
        serde_json::from_value::<GrantRequest>(v)
            .unwrap()
            .into_grant("email:u@example.com".into(), 10.0)
            .unwrap()
    }

    fn matched(id: &str, effect: Effect, shadow: bool) -> RuleMatch {
        RuleMatch {
            id: id.into(),
            effect,
            reason: format!("{id} matched"),
            error: None,
            shadow,
        }
    }

    fn run(grant: &Grant, outcome: &Evaluation) -> Decided {
        decide(
            grant,
            outcome,
            &Cause::of_state("registration"),
            "v1",
            3,
            100.0,
        )
    }

    #[test]
    fn a_revocation_changes_the_status_once_and_records_why() {
        let g = grant();
        let outcome = Evaluation {
            effect: Some(Effect::Revoke),
            matched: vec![matched("risk-high", Effect::Revoke, false)],
            shadow: vec![],
        };
        let d = run(&g, &outcome);
        assert_eq!(d.decisions.len(), 1);
        let decision = &d.decisions[0];
        assert_eq!(decision.effect, DecisionEffect::Revoke);
        assert_eq!(decision.rules, ["risk-high"]);
        assert!(decision.reaches_enforcement_points());
        let updated = d.updated.unwrap();
        assert_eq!(updated.status, GrantStatus::Revoked);
        assert_eq!(updated.revoked.unwrap().decision_id, decision.id);
        // The same outcome on a grant already revoked decides nothing more.
        let revoked = run(&g, &outcome).updated.unwrap();
        let again = run(&revoked, &outcome);
        assert!(again.decisions.is_empty() && again.updated.is_none());
    }

    #[test]
    fn notify_and_shadow_matches_decide_without_changing_the_grant() {
        let g = grant();
        let outcome = Evaluation {
            effect: None,
            matched: vec![matched("note", Effect::Notify, false)],
            shadow: vec![matched("try-revoke", Effect::Revoke, true)],
        };
        let d = run(&g, &outcome);
        assert!(d.updated.is_none(), "the grant stays active");
        let effects: Vec<_> = d.decisions.iter().map(|d| (d.effect, d.shadow)).collect();
        assert_eq!(
            effects,
            [
                (DecisionEffect::Notify, false),
                (DecisionEffect::Revoke, true)
            ]
        );
        assert!(d.decisions.iter().all(|d| !d.reaches_enforcement_points()));
        assert!(d.decisions[1].id.ends_with("-shadow"));
    }

    #[test]
    fn a_restricted_grant_no_rule_restricts_is_allowed_again() {
        let mut g = grant();
        g.status = GrantStatus::Restricted;
        let d = run(&g, &Evaluation::default());
        assert_eq!(d.decisions.len(), 1);
        assert_eq!(d.decisions[0].effect, DecisionEffect::Allow);
        assert_eq!(d.updated.unwrap().status, GrantStatus::Active);
    }
}
