//! The Security Event Token profile: RFC 8417 claims as SSF 1.0 §4 restricts them, and the RFC 8935
//! §2.4 error codes every rejection is reported with (push answers and poll `setErrs` alike).
//!
//! [`validate_claims`] runs on a payload whose signature already verified. It checks, in order,
//! `iss`, `aud`, the required claims, the forbidden ones, the single event, the subject and the event
//! payload, and returns a [`ValidatedSet`] with a typed event and subject.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::events::{Event, EventKind};
use crate::subject::SubjectId;

/// RFC 8935 §2.4 "Security Event Token Error Codes", plus `invalid_state` (SSF §8.1.4.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    InvalidRequest,
    InvalidKey,
    InvalidIssuer,
    InvalidAudience,
    AuthenticationFailed,
    AccessDenied,
    InvalidState,
}

impl ErrorCode {
    /// Every code, for parsing what a peer sent.
    pub const ALL: [ErrorCode; 7] = [
        ErrorCode::InvalidRequest,
        ErrorCode::InvalidKey,
        ErrorCode::InvalidIssuer,
        ErrorCode::InvalidAudience,
        ErrorCode::AuthenticationFailed,
        ErrorCode::AccessDenied,
        ErrorCode::InvalidState,
    ];

    /// The code a peer's `err` names, if it is one of these.
    pub fn parse(s: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::InvalidKey => "invalid_key",
            ErrorCode::InvalidIssuer => "invalid_issuer",
            ErrorCode::InvalidAudience => "invalid_audience",
            ErrorCode::AuthenticationFailed => "authentication_failed",
            ErrorCode::AccessDenied => "access_denied",
            ErrorCode::InvalidState => "invalid_state",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rejected SET: the RFC 8935 code and a human-readable description (English).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{err}: {description}")]
pub struct SetError {
    pub err: ErrorCode,
    pub description: String,
}

impl SetError {
    pub fn new(err: ErrorCode, description: impl Into<String>) -> SetError {
        SetError {
            err,
            description: description.into(),
        }
    }
    pub fn request(description: impl Into<String>) -> SetError {
        SetError::new(ErrorCode::InvalidRequest, description)
    }
}

/// `[transmitters.tolerate]`: what real transmitters send that the specs do not say. Where a spec
/// forbids the variant the spec-exact behaviour is the default and the switch is off; every SET
/// accepted through a switch (and through `legacy_subjects`) is counted in
/// `vigil_ssf_tolerated_deviations_total{transmitter,deviation}`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tolerate {
    /// `event_timestamp` in milliseconds: a value past 10^11 (the year 5138 in seconds) is read
    /// as milliseconds (`millisecond_timestamp`). Off: a NumericDate is seconds, and such a time is
    /// clamped as one from the future.
    #[serde(default)]
    pub millisecond_timestamps: bool,
    /// CAEP credential-change `change_type: "revoked"` read as `revoke` (`revoked_change_type`).
    /// Off: CAEP §3.3.1 allows create, revoke, update and delete, and the SET is refused.
    #[serde(default)]
    pub revoked_change_type: bool,
    /// Google RISC's legacy shapes: a JOSE header without `typ` (`missing_typ`), and
    /// `…/secevent/oauth/event-type/tokens-revoked` — every OAuth token of the user revoked —
    /// taken as RISC `sessions-revoked` (`oauth_tokens_revoked`). Off: SSF §4.1.1 requires `typ`.
    #[serde(default)]
    pub legacy_risc: bool,
    /// A verification event answering one of the last four requests rather than the last — late,
    /// but with a state Vigil asked for (`late_verification`). On: SSF does not forbid it; off, such
    /// an event is refused `invalid_state`.
    #[serde(default = "tolerated")]
    pub late_verification: bool,
}

impl Default for Tolerate {
    fn default() -> Tolerate {
        Tolerate {
            millisecond_timestamps: false,
            revoked_change_type: false,
            legacy_risc: false,
            late_verification: true,
        }
    }
}

fn tolerated() -> bool {
    true
}

/// What a transmitter's SETs must satisfy.
#[derive(Debug, Clone, Copy)]
pub struct SetRules<'a> {
    pub issuer: &'a str,
    pub audiences: &'a [String],
    pub legacy_subjects: bool,
    /// The deviations this transmitter's SETs may carry (`[transmitters.tolerate]`).
    pub tolerate: Tolerate,
}

/// A SET whose claims passed every check, with its event and subject typed.
#[derive(Debug, Clone)]
pub struct ValidatedSet {
    pub iss: String,
    pub jti: String,
    /// `iat`, seconds.
    pub iat: f64,
    pub aud: Vec<String>,
    pub txn: Option<String>,
    /// `toe`, seconds.
    pub toe: Option<f64>,
    /// The event-type URI as sent (a tolerated legacy alias as read: `tolerate.legacy_risc`).
    pub event_uri: String,
    pub event: Event,
    pub subject: SubjectId,
    /// Where the subject came from: `sub_id` (SSF 1.0) or a legacy in-event `subject`.
    pub subject_from_legacy: bool,
    /// The deviations from the specs accepted in this SET (`vigil_ssf_tolerated_deviations_total`).
    pub tolerated: Vec<&'static str>,
}

impl ValidatedSet {
    /// When the event happened: `event_timestamp`, else `toe`, else `iat` (seconds). Vigil orders
    /// state changes by this, never by arrival (RFC 8417 §5.3–5.4).
    pub fn event_time(&self) -> f64 {
        self.event
            .event_timestamp()
            .or(self.toe)
            .unwrap_or(self.iat)
    }
}

/// Validates the claims of a signature-checked SET.
pub fn validate_claims(payload: &[u8], rules: SetRules<'_>) -> Result<ValidatedSet, SetError> {
    let claims: Value = serde_json::from_slice(payload)
        .map_err(|e| SetError::request(format!("the JWS payload is not JSON: {e}")))?;
    let claims = claims
        .as_object()
        .ok_or_else(|| SetError::request("the JWS payload is not a JSON object"))?;

    let iss = match claims.get("iss") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(SetError::request("`iss` must be a string")),
        None => return Err(SetError::request("the SET has no `iss` claim")),
    };
    if iss != rules.issuer {
        return Err(SetError::new(
            ErrorCode::InvalidIssuer,
            format!("issuer `{iss}` is not accepted on this stream"),
        ));
    }

    let aud = match claims.get("aud") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| SetError::request("`aud` must be a string or an array of strings"))?,
        Some(_) => {
            return Err(SetError::request(
                "`aud` must be a string or an array of strings",
            ))
        }
        None => {
            return Err(SetError::new(
                ErrorCode::InvalidAudience,
                "the SET has no `aud` claim naming this receiver",
            ))
        }
    };
    if !aud.iter().any(|a| rules.audiences.contains(a)) {
        return Err(SetError::new(
            ErrorCode::InvalidAudience,
            format!("audience {aud:?} does not include this receiver"),
        ));
    }

    let iat = match claims.get("iat") {
        Some(v) => v
            .as_f64()
            .filter(|t| t.is_finite())
            .ok_or_else(|| SetError::request("`iat` must be a NumericDate"))?,
        None => return Err(SetError::request("the SET has no `iat` claim")),
    };
    let jti = match claims.get("jti") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(_) => return Err(SetError::request("`jti` must be a non-empty string")),
        None => return Err(SetError::request("the SET has no `jti` claim")),
    };
    if claims.contains_key("sub") {
        return Err(SetError::request(
            "the SET carries `sub`, which SSF 1.0 §4.1.2 forbids; use `sub_id`",
        ));
    }
    if claims.contains_key("exp") {
        return Err(SetError::request(
            "the SET carries `exp`, which SSF 1.0 §4.1.7 forbids",
        ));
    }
    let toe = match claims.get("toe") {
        None => None,
        Some(v) => Some(
            v.as_f64()
                .filter(|t| t.is_finite())
                .ok_or_else(|| SetError::request("`toe` must be a NumericDate"))?,
        ),
    };
    // SSF §4.1.9 makes `txn` a string; pre-final drafts sent numbers, which are kept as text.
    let txn = match claims.get("txn") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(_) => return Err(SetError::request("`txn` must be a string")),
    };

    let events = match claims.get("events") {
        Some(Value::Object(m)) if !m.is_empty() => m,
        Some(_) => {
            return Err(SetError::request(
                "`events` must be a JSON object with at least one member",
            ))
        }
        None => return Err(SetError::request("the SET has no `events` claim")),
    };
    let (event_uri, payload) = single_event(events)?;
    let mut tolerated = Vec::new();
    let (event_uri, payload) = tolerated_event(event_uri, payload, rules.tolerate, &mut tolerated);
    let event = Event::parse(&event_uri, &payload).map_err(|e| SetError::request(e.to_string()))?;

    let (subject, subject_from_legacy) = match claims.get("sub_id") {
        Some(v) => (
            SubjectId::from_json(v, rules.legacy_subjects)
                .map_err(|e| SetError::request(format!("`sub_id`: {e}")))?,
            false,
        ),
        None => match payload.get("subject") {
            Some(v) if rules.legacy_subjects => (
                SubjectId::from_json(v, true)
                    .map_err(|e| SetError::request(format!("event `subject`: {e}")))?,
                true,
            ),
            _ => {
                return Err(SetError::request(
                    "the SET has no `sub_id` (SSF 1.0 §3.1) and no legacy in-event `subject`",
                ))
            }
        },
    };

    if subject_from_legacy {
        tolerated.push("subject_in_event");
    }
    Ok(ValidatedSet {
        iss,
        jti,
        iat,
        aud,
        txn,
        toe,
        event_uri,
        event,
        subject,
        subject_from_legacy,
        tolerated,
    })
}

/// Google's "every OAuth token of the user revoked" (`tolerate.legacy_risc`).
const OAUTH_TOKENS_REVOKED: &str =
    "https://schemas.openid.net/secevent/oauth/event-type/tokens-revoked";

/// The event as read under the transmitter's tolerances: its URI and payload, rewritten where a
/// switch allows a deviation it carries (each named in `tolerated`), else as sent.
fn tolerated_event<'p>(
    uri: &str,
    payload: &'p Value,
    tolerate: Tolerate,
    tolerated: &mut Vec<&'static str>,
) -> (String, std::borrow::Cow<'p, Value>) {
    let mut uri = uri.to_owned();
    let mut payload = std::borrow::Cow::Borrowed(payload);
    if tolerate.legacy_risc && uri == OAUTH_TOKENS_REVOKED {
        uri = EventKind::SessionsRevoked.uri();
        tolerated.push("oauth_tokens_revoked");
    }
    if tolerate.millisecond_timestamps {
        let ms = payload
            .get("event_timestamp")
            .and_then(Value::as_f64)
            .filter(|t| t.is_finite() && *t > MILLISECONDS_FROM);
        if let Some(ms) = ms {
            if let Some(p) = payload.to_mut().as_object_mut() {
                p.insert("event_timestamp".into(), serde_json::json!(ms / 1000.0));
                tolerated.push("millisecond_timestamp");
            }
        }
    }
    if tolerate.revoked_change_type
        && EventKind::from_uri(&uri) == Some(EventKind::CredentialChange)
    {
        let revoked = payload
            .get("change_type")
            .and_then(Value::as_str)
            .is_some_and(|c| c.eq_ignore_ascii_case("revoked"));
        if revoked {
            if let Some(p) = payload.to_mut().as_object_mut() {
                p.insert("change_type".into(), Value::String("revoke".into()));
                tolerated.push("revoked_change_type");
            }
        }
    }
    (uri, payload)
}

/// An `event_timestamp` past this (the year 5138 in seconds, 1973 in milliseconds) is read as
/// milliseconds where `tolerate.millisecond_timestamps` is on.
const MILLISECONDS_FROM: f64 = 1e11;

/// SSF §4.2.1 (a MUST in the CAEP interoperability profile): one event per SET. Several members are
/// allowed only when they are alternative URIs of the same event type; the canonical one is used.
fn single_event(events: &Map<String, Value>) -> Result<(&str, &Value), SetError> {
    let mut iter = events.iter();
    let Some((first_uri, first_payload)) = iter.next() else {
        return Err(SetError::request("`events` is empty"));
    };
    if events.len() == 1 {
        return Ok((first_uri, first_payload));
    }
    let kind = EventKind::from_uri(first_uri);
    let all_same = kind.is_some() && iter.all(|(uri, _)| EventKind::from_uri(uri) == kind);
    if !all_same {
        return Err(SetError::request(format!(
            "the SET carries {} unrelated events; SSF 1.0 §4.2.1 allows one event per SET",
            events.len()
        )));
    }
    let canonical = kind.map(EventKind::uri).unwrap_or_default();
    Ok(events
        .get_key_value(&canonical)
        .map(|(k, v)| (k.as_str(), v))
        .unwrap_or((first_uri, first_payload)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::spec_example;
    use serde_json::json;

    fn rules_for(set: &Value) -> (String, Vec<String>) {
        let iss = set["iss"].as_str().unwrap().to_owned();
        let aud = match &set["aud"] {
            Value::String(s) => vec![s.clone()],
            Value::Array(a) => vec![a[0].as_str().unwrap().to_owned()],
            _ => vec![],
        };
        (iss, aud)
    }

    fn check(set: &Value) -> Result<ValidatedSet, SetError> {
        let (iss, aud) = rules_for(set);
        let rules = SetRules {
            issuer: &iss,
            audiences: &aud,
            legacy_subjects: true,
            tolerate: crate::config::Tolerate::default(),
        };
        validate_claims(&serde_json::to_vec(set).unwrap(), rules)
    }

    #[test]
    fn spec_example_sets_validate_with_their_subjects() {
        let v = check(&spec_example(
            "caep-session-revoked-2-complex-session-user-tenant.json",
        ))
        .unwrap();
        assert_eq!(v.subject.format(), "complex");
        assert!(v.subject.member("session").is_some());
        assert_eq!(v.txn.as_deref(), Some("8675309"));
        assert_eq!(v.event_time(), 1615304991.0);
        let v = check(&spec_example(
            "ssf-example-caep-token-claims-change-proprietary-subject.json",
        ))
        .unwrap();
        assert_eq!(v.subject.format(), "catalog_item");
        assert_eq!(
            v.iat, 15203800012.0,
            "the 11-digit iat is verbatim spec text"
        );
        let v = check(&spec_example("ssf-verification-array-aud.json")).unwrap();
        assert_eq!(v.aud.len(), 2);
        // No event_timestamp, no toe: the event time falls back to iat.
        let v = check(&spec_example("risc-account-disabled.json")).unwrap();
        assert_eq!(v.event_time(), 1508184845.0);
    }

    #[test]
    fn envelope_rules_map_to_rfc8935_codes() {
        let base = spec_example("caep-session-revoked.json");
        let (iss, aud) = rules_for(&base);
        let rules = SetRules {
            issuer: &iss,
            audiences: &aud,
            legacy_subjects: true,
            tolerate: crate::config::Tolerate::default(),
        };
        let code = |mutate: &dyn Fn(&mut Value)| {
            let mut set = base.clone();
            mutate(&mut set);
            validate_claims(&serde_json::to_vec(&set).unwrap(), rules)
                .err()
                .map(|e| e.err)
        };
        use ErrorCode::*;
        assert_eq!(code(&|_| {}), None);
        assert_eq!(
            code(&|s| s["iss"] = json!("https://evil.example/")),
            Some(InvalidIssuer)
        );
        assert_eq!(
            code(&|s| s["aud"] = json!("https://other.example/")),
            Some(InvalidAudience)
        );
        assert_eq!(
            code(&|s| s["aud"] = json!(["a", "https://sp.example.com/caep"])),
            None
        );
        assert_eq!(
            code(&|s| {
                s.as_object_mut().unwrap().remove("aud");
            }),
            Some(InvalidAudience)
        );
        assert_eq!(
            code(&|s| {
                s.as_object_mut().unwrap().remove("jti");
            }),
            Some(InvalidRequest)
        );
        assert_eq!(
            code(&|s| {
                s.as_object_mut().unwrap().remove("iat");
            }),
            Some(InvalidRequest)
        );
        assert_eq!(
            code(&|s| {
                s.as_object_mut().unwrap().remove("events");
            }),
            Some(InvalidRequest)
        );
        assert_eq!(code(&|s| s["events"] = json!({})), Some(InvalidRequest));
        assert_eq!(code(&|s| s["sub"] = json!("x")), Some(InvalidRequest));
        assert_eq!(code(&|s| s["exp"] = json!(1)), Some(InvalidRequest));
        assert_eq!(code(&|s| s["jti"] = json!("")), Some(InvalidRequest));
        assert_eq!(code(&|s| s["iat"] = json!("now")), Some(InvalidRequest));
        assert_eq!(
            code(&|s| {
                s.as_object_mut().unwrap().remove("sub_id");
            }),
            Some(InvalidRequest)
        );
        assert_eq!(
            code(&|s| s["sub_id"] = json!({"format": "email"})),
            Some(InvalidRequest)
        );
        assert_eq!(
            code(&|s| s["events"]
                ["https://schemas.openid.net/secevent/risc/event-type/account-disabled"] =
                json!({})),
            Some(InvalidRequest),
            "two unrelated events"
        );
        assert_eq!(
            code(&|s| s["events"]
                ["https://schemas.openid.net/secevent/caep/event-type/session-revoked"] =
                json!({"reason_admin": "x"})),
            Some(InvalidRequest),
            "payload violating its definition"
        );
        assert_eq!(
            code(&|s| s["unknown_claim"] = json!({"ignored": true})),
            None
        );
    }

    #[test]
    fn alternative_uris_of_one_event_type_are_one_event() {
        let mut set = spec_example("ssf-verification.json");
        set["events"]["https://schemas.openid.net/secevent/sse/event-type/verification"] =
            json!({"state": "VGhpcyBpcyBhbiBleGFtcGxlIHN0YXRlIHZhbHVlLgo="});
        let v = check(&set).unwrap();
        assert_eq!(v.event.kind(), Some(EventKind::Verification));
        assert_eq!(v.event_uri, EventKind::Verification.uri());
    }

    #[test]
    fn legacy_in_event_subject_is_a_fallback() {
        let mut set = spec_example("caep-session-revoked.json");
        let sub_id = set.as_object_mut().unwrap().remove("sub_id").unwrap();
        set["events"]["https://schemas.openid.net/secevent/caep/event-type/session-revoked"]
            ["subject"] = sub_id;
        let v = check(&set).unwrap();
        assert!(v.subject_from_legacy);
        assert_eq!(v.subject.format(), "opaque");
        let (iss, aud) = rules_for(&set);
        let strict = SetRules {
            issuer: &iss,
            audiences: &aud,
            legacy_subjects: false,
            tolerate: crate::config::Tolerate::default(),
        };
        assert!(validate_claims(&serde_json::to_vec(&set).unwrap(), strict).is_err());
    }
}
