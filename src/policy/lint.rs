//! `vigil policy check`: compile (unknown fields, CEL syntax, unknown variables and signal types are
//! load errors) and lint what compiling cannot see:
//!
//! - a rule that errors on the reference inputs (every documented field present, every grant kind
//!   and principal type; a request-time rule also on a reference access request) would fail
//!   closed in production: an **error**;
//! - a rule whose condition is the constant `false`, or that repeats an earlier rule's `on` and `when`
//!   with an equal or weaker effect, can never decide anything: an **unreachable** warning.

use serde_json::json;

use super::{EvalInput, PolicySet};
use crate::context::{Decay, PrincipalContext};
use crate::grant::GrantRequest;

/// A finding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub rule: String,
    pub error: bool,
    pub message: String,
}

/// Lints a compiled set.
pub fn lint(policy: &PolicySet) -> Vec<Finding> {
    let mut findings = Vec::new();
    for (i, rule) in policy.rules.iter().enumerate() {
        let when = rule.spec.when.trim();
        if when == "false" {
            findings.push(Finding {
                rule: rule.spec.id.clone(),
                error: false,
                message: "unreachable: the condition is the constant `false`".into(),
            });
        }
        for earlier in &policy.rules[..i] {
            let same_on = {
                let (mut a, mut b) = (earlier.spec.on.clone(), rule.spec.on.clone());
                a.sort();
                b.sort();
                a == b
            };
            if same_on
                && earlier.spec.when.trim() == when
                && earlier.spec.mode == rule.spec.mode
                && earlier.spec.effect >= rule.spec.effect
            {
                findings.push(Finding {
                    rule: rule.spec.id.clone(),
                    error: false,
                    message: format!(
                        "unreachable: `{}` has the same trigger and condition with an equal or stronger effect",
                        earlier.spec.id
                    ),
                });
            }
        }
    }
    findings.extend(reference_errors(policy));
    findings
}

/// Evaluates every rule on reference inputs (each grant kind × principal type, each trigger) and
/// reports the rules that error.
fn reference_errors(policy: &PolicySet) -> Vec<Finding> {
    let mut findings: Vec<Finding> = Vec::new();
    let kinds = [
        "session",
        "access_token",
        "refresh_token",
        "agent_delegation",
    ];
    let types = ["human", "workload", "service_account", "agent"];
    let mut triggers: Vec<Option<String>> = vec![None];
    for rule in &policy.rules {
        triggers.extend(rule.spec.on.iter().map(|t| Some(t.clone())));
    }
    let ctx = PrincipalContext::new("email:reference@example.com");
    for kind in kinds {
        for principal_type in types {
            let request: Result<GrantRequest, _> = serde_json::from_value(json!({
                "id": "reference", "kind": kind, "principal_type": principal_type,
                "subject": {"format": "email", "email": "reference@example.com"},
                "on_behalf_of": (kind == "agent_delegation").then(|| json!({"format": "email", "email": "user@example.com"})),
                "session": "s", "device": "d", "audience": "https://api.example.com",
                "scopes": ["read"], "issued_at": 1000, "expires_at": 2000,
                "attributes": {"acr": "urn:example:acr:1", "required_assurance": {"namespace": "NIST-AAL", "level": "nist-aal2"}},
                "enforcement_points": ["ep"]
            }));
            let Ok(grant) = request.map_err(|e| e.to_string()).and_then(|r| {
                r.into_grant("email:reference@example.com".into(), 1000.0)
                    .map_err(|e| e.to_string())
            }) else {
                continue;
            };
            for trigger in &triggers {
                let input = EvalInput {
                    grant: grant.policy_view(),
                    context: std::sync::Arc::new(ctx.view(&grant, &[], &Decay::default(), 1500.0)),
                    signal: std::sync::Arc::new(
                        json!({"type": trigger.clone().unwrap_or_else(|| "none".into()),
                                   "uri": "", "jti": "j", "txn": null, "iss": "", "source": "ssf:reference",
                                   "event_time": 1500.0, "payload": {}}),
                    ),
                    subject: json!({"identifiers": [grant.principal], "members": {}, "matches_grant": true}),
                    now: 1500.0,
                    request: crate::policy::no_request(),
                    trigger: trigger.clone(),
                };
                let mut outcome = policy.evaluate(&input);
                // Request-time rules, on a reference access request.
                let requested = policy.evaluate_request(&EvalInput {
                    request: std::sync::Arc::new(json!({
                        "subject": {"type": "user", "id": "reference@example.com", "properties": {}},
                        "action": {"name": "read", "properties": {}},
                        "resource": {"type": "api", "id": "reference", "properties": {}},
                        "context": {"grant_id": "reference"}})),
                    ..input
                });
                outcome.matched.extend(requested.matched);
                outcome.shadow.extend(requested.shadow);
                for m in outcome.matched.iter().chain(&outcome.shadow) {
                    if let Some(err) = &m.error {
                        if !findings.iter().any(|f| f.rule == m.id) {
                            findings.push(Finding {
                                rule: m.id.clone(),
                                error: true,
                                message: format!(
                                    "errors on the reference input ({kind}, {principal_type}) and would fail closed: {err}"
                                ),
                            });
                        }
                    }
                }
            }
        }
    }
    findings
}
