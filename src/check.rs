//! The live `check` answer for enforcement points that prefer to ask: is this grant (or the grants of
//! this session or token) usable right now?
//!
//! Fail closed: an unknown or expired grant is denied; a revoked grant is denied with the revocation's
//! reason; a grant that must step up or is restricted is denied with its status so the enforcement
//! point can send the user to re-authenticate; an action outside a grant's scopes is denied. When a
//! session or token names several grants, every one must allow.

use serde::{Deserialize, Serialize};

use crate::grant::{Grant, GrantStatus};

/// The body of `POST /v1/check`. Exactly one of `grant_id`, `session`, `token` is needed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckRequest {
    #[serde(default)]
    pub grant_id: Option<String>,
    /// A session id (plain string, as registered) or a session identifier object.
    #[serde(default)]
    pub session: Option<serde_json::Value>,
    /// A token's JWT `iss` and `jti`.
    #[serde(default)]
    pub token: Option<crate::grant::TokenId>,
    /// The action requested; must be one of the grant's scopes when it has any.
    #[serde(default)]
    pub action: Option<String>,
    /// The resource (audience) requested; must equal the grant's audience when it has one.
    #[serde(default)]
    pub resource: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Allow,
    Deny,
}

/// The answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckResult {
    pub decision: Verdict,
    /// `unknown`, `expired`, or the grant's status.
    pub status: String,
    pub reason: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub grants: Vec<String>,
}

impl CheckResult {
    fn deny(status: &str, reason: impl Into<String>, grants: Vec<String>) -> CheckResult {
        CheckResult {
            decision: Verdict::Deny,
            status: status.to_owned(),
            reason: reason.into(),
            grants,
        }
    }

    /// Whether the grant is unknown (HTTP 401 for `auth_request`) rather than refused (403).
    pub fn is_unknown(&self) -> bool {
        self.status == "unknown"
    }
}

/// Judges the grants a request names, at time `now`.
pub fn check(
    grants: &[&Grant],
    action: Option<&str>,
    resource: Option<&str>,
    now: f64,
) -> CheckResult {
    let ids: Vec<String> = grants.iter().map(|g| g.id.to_string()).collect();
    if grants.is_empty() {
        return CheckResult::deny("unknown", "no active grant matches the request", ids);
    }
    for g in grants {
        if g.is_expired(now) {
            return CheckResult::deny("expired", format!("grant `{}` has expired", g.id), ids);
        }
        let reason = || {
            g.revoked
                .as_ref()
                .map(|r| r.reason.clone())
                .or_else(|| g.status_reason.as_deref().map(str::to_owned))
                .unwrap_or_default()
        };
        match g.status {
            GrantStatus::Active => {}
            GrantStatus::Revoked => return CheckResult::deny("revoked", reason(), ids),
            GrantStatus::StepUp => return CheckResult::deny("step_up", reason(), ids),
            GrantStatus::Restricted => return CheckResult::deny("restricted", reason(), ids),
        }
        if let Some(a) = action {
            if !g.scopes.is_empty() && !g.scopes.iter().any(|s| s == a) {
                return CheckResult::deny(
                    "active",
                    format!("action `{a}` is not granted by `{}`", g.id),
                    ids,
                );
            }
        }
        if let (Some(r), Some(aud)) = (resource, &g.audience) {
            if r != &***aud {
                return CheckResult::deny(
                    "active",
                    format!("resource `{r}` is not the audience of `{}`", g.id),
                    ids,
                );
            }
        }
    }
    CheckResult {
        decision: Verdict::Allow,
        status: "active".into(),
        reason: "the grant is active".into(),
        grants: ids,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grant::{GrantRequest, Revocation};
    use serde_json::json;

    fn grant(status: GrantStatus) -> Grant {
        let r: GrantRequest = serde_json::from_value(json!({
            "id": "g", "kind": "access_token", "subject": {"format": "email", "email": "a@b.c"},
            "scopes": ["read"], "audience": "https://api", "issued_at": 0, "expires_at": 100
        }))
        .unwrap();
        let mut g = r.into_grant("email:a@b.c".into(), 0.0).unwrap();
        g.status = status;
        if status == GrantStatus::Revoked {
            g.revoked = Some(Box::new(Revocation {
                at: 5.0,
                decision_id: "d".into(),
                reason: "risk HIGH".into(),
                rules: vec![],
            }));
        }
        g
    }

    #[test]
    fn verdicts() {
        let active = grant(GrantStatus::Active);
        assert_eq!(
            check(&[&active], Some("read"), Some("https://api"), 10.0).decision,
            Verdict::Allow
        );
        assert_eq!(
            check(&[&active], Some("write"), None, 10.0).decision,
            Verdict::Deny
        );
        assert_eq!(
            check(&[&active], None, Some("https://other"), 10.0).decision,
            Verdict::Deny
        );
        assert_eq!(check(&[&active], None, None, 100.0).status, "expired");
        let revoked = grant(GrantStatus::Revoked);
        let r = check(&[&revoked], None, None, 10.0);
        assert_eq!(
            (r.decision, r.status.as_str(), r.reason.as_str()),
            (Verdict::Deny, "revoked", "risk HIGH")
        );
        assert_eq!(
            check(&[&active, &revoked], None, None, 10.0).decision,
            Verdict::Deny,
            "every grant must allow"
        );
        assert_eq!(
            check(&[&grant(GrantStatus::StepUp)], None, None, 10.0).status,
            "step_up"
        );
        assert!(check(&[], None, None, 10.0).is_unknown());
    }
}
