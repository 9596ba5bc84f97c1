//! Decisions: what the engine concluded about one grant, with everything needed to explain it.

use serde::{Deserialize, Serialize};

use crate::grant::GrantStatus;

/// What a decision does to a grant. `allow` lifts an earlier step-up or restriction whose condition no
/// longer holds; `notify` informs without changing the grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecisionEffect {
    Revoke,
    StepUp,
    Restrict,
    Notify,
    Allow,
    /// An access request refused (AuthZEN): the grant is unchanged.
    Deny,
}

impl DecisionEffect {
    /// The effect as `vigil_decisions_total` labels it (a constant: no string is built per
    /// decision on a shard's thread).
    pub fn metric_label(self) -> &'static str {
        match self {
            DecisionEffect::Revoke => "revoke",
            DecisionEffect::StepUp => "stepup",
            DecisionEffect::Restrict => "restrict",
            DecisionEffect::Notify => "notify",
            DecisionEffect::Allow => "allow",
            DecisionEffect::Deny => "deny",
        }
    }
}

/// What caused the evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cause {
    /// `signal`, `registration`, `policy_swap` or `dependency` (a device's or delegating user's change).
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub txn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_time: Option<f64>,
}

impl Cause {
    /// Every kind of cause.
    pub const KINDS: [&'static str; 5] = [
        "signal",
        "registration",
        "policy_swap",
        "dependency",
        Cause::ACCESS_REQUEST,
    ];

    /// An access request's evaluation (AuthZEN): recorded, changing no grant.
    pub const ACCESS_REQUEST: &'static str = "access_request";

    /// The cause of a decision made on current state, not on a signal (`registration`,
    /// `policy_swap`, `dependency`).
    pub fn of_state(kind: &str) -> Cause {
        Cause {
            kind: kind.to_owned(),
            seq: None,
            jti: None,
            txn: None,
            source: None,
            event_type: None,
            event_time: None,
        }
    }
}

/// One decision about one grant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// Deterministic: the same grant, cause, effect and policy version always give the same id, so a
    /// decision re-made after a crash is recognisable as the same decision.
    pub id: String,
    /// When it was made (seconds).
    pub time: f64,
    pub grant_id: String,
    /// The grant's principal key.
    pub subject: String,
    pub effect: DecisionEffect,
    pub previous_status: GrantStatus,
    pub status: GrantStatus,
    /// The rules that decided it.
    pub rules: Vec<String>,
    pub reason: String,
    /// Rules that errored and failed closed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
    /// A shadow-mode rule's outcome: recorded, never enforced.
    #[serde(default)]
    pub shadow: bool,
    pub policy_version: String,
    pub context_version: u64,
    pub cause: Cause,
    pub enforcement_points: Vec<String>,
    /// An access request's evaluation: each context it ran on (an agent's, then the delegating
    /// user's), with what matched there.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hops: Vec<Hop>,
}

/// One hop of an access request's evaluation: whose context it ran on and what it found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hop {
    /// The principal whose context this hop evaluated (the grant's principal; for an agent
    /// delegation, then the delegating user).
    pub principal: String,
    /// `principal` or `delegating_user`.
    pub role: String,
    /// The request-time rules that matched on it (an enforced match denies).
    pub rules: Vec<String>,
    pub denied: bool,
}

impl Decision {
    /// Whether it changed the grant's status (an enforced decision other than `notify`).
    pub fn changes_status(&self) -> bool {
        !self.shadow
            && self.effect != DecisionEffect::Notify
            && self.cause.kind != Cause::ACCESS_REQUEST
    }

    /// Whether enforcement points hear of this decision: an enforced revoke, step-up or restrict.
    /// `allow` and `notify` change nothing an enforcement point holds; a shadow decision is only
    /// recorded. The one place this is decided: the engine hands these over durably, the emitter
    /// marks them taken over and signs their SETs.
    pub fn reaches_enforcement_points(&self) -> bool {
        !self.shadow
            && matches!(
                self.effect,
                DecisionEffect::Revoke | DecisionEffect::StepUp | DecisionEffect::Restrict
            )
    }

    /// The deterministic id: 16 hex digits of SHA-256 over the identifying fields. A signal is
    /// identified by its source and `jti`, which every redelivery repeats (a Kafka message's `jti`
    /// is its id or its partition and offset), not by its sequence number, which is drawn anew
    /// for each delivery of a Kafka message.
    pub fn make_id(
        grant_id: &str,
        cause: &Cause,
        effect: DecisionEffect,
        policy_version: &str,
        rules: &[String],
    ) -> String {
        let signal = match (&cause.source, &cause.jti) {
            (Some(source), Some(jti)) => format!("{source}\u{1}{jti}"),
            _ => cause.seq.map(|s| s.to_string()).unwrap_or_default(),
        };
        digest_hex(
            &[
                grant_id,
                &cause.kind,
                &signal,
                &format!("{effect:?}"),
                policy_version,
                &rules.join(","),
            ],
            8,
        )
    }
}

/// The first `bytes` bytes, in hex, of SHA-256 over `parts`, each followed by a NUL (so ("ab", "c")
/// and ("a", "bc") differ): for identifiers that must come out the same whenever their parts do.
pub fn digest_hex(parts: &[&str], bytes: usize) -> String {
    let mut h = openssl::sha::Sha256::new();
    for part in parts {
        h.update(part.as_bytes());
        h.update(&[0]);
    }
    h.finish()
        .iter()
        .take(bytes)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Decisions for other modules' tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::{Cause, Decision, DecisionEffect};
    use crate::grant::GrantStatus;

    /// A decision of `effect` about grant `g` of `u@example.com`, made at `time`, with id `d`.
    pub(crate) fn decision(effect: DecisionEffect, time: f64) -> Decision {
        Decision {
            id: "d".into(),
            time,
            grant_id: "g".into(),
            subject: "email:u@example.com".into(),
            effect,
            previous_status: GrantStatus::Active,
            status: GrantStatus::Active,
            rules: vec!["r".into()],
            reason: "why".into(),
            errors: vec![],
            shadow: false,
            policy_version: "v".into(),
            context_version: 1,
            cause: Cause::of_state("registration"),
            enforcement_points: vec![],
            hops: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The metric label of each effect is the one `vigil_decisions_total` always had (the
    /// effect's name in lower case, without separators): dashboards and alerts keep matching.
    #[test]
    fn metric_labels_are_the_effects_names() {
        use DecisionEffect::*;
        for effect in [Revoke, StepUp, Restrict, Notify, Allow, Deny] {
            assert_eq!(
                effect.metric_label(),
                format!("{effect:?}").to_lowercase(),
                "{effect:?}"
            );
        }
    }

    fn cause(seq: u64, jti: &str) -> Cause {
        Cause {
            kind: "signal".into(),
            seq: Some(seq),
            jti: Some(jti.into()),
            txn: None,
            source: Some("feed:vigil.risk".into()),
            event_type: None,
            event_time: Some(1.0),
        }
    }

    /// A Kafka message redelivered after a crash gets a new sequence number; the decision it
    /// causes again must be recognisable as the same one.
    #[test]
    fn a_redelivered_signal_makes_the_same_decision_id() {
        let rules = ["risk-medium".to_owned()];
        let id = |c: &Cause| Decision::make_id("g1", c, DecisionEffect::StepUp, "v1", &rules);
        assert_eq!(id(&cause(7, "id:m1")), id(&cause(9001, "id:m1")));
        assert_ne!(id(&cause(7, "id:m1")), id(&cause(7, "id:m2")));
        let mut other_source = cause(7, "id:m1");
        other_source.source = Some("feed:other".into());
        assert_ne!(id(&cause(7, "id:m1")), id(&other_source));
        // A cause that is not a signal is told apart by its sequence number.
        let state = Cause::of_state("registration");
        assert_ne!(id(&state), id(&cause(7, "id:m1")));
    }
}
