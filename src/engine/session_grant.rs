//! Session grants from CAEP `session-established` events: an IdP that announces a session makes it
//! a grant Vigil watches, without an enforcement point registering it. Its id is
//! `caep-session:<session id>` (or the SET's issuer and `jti` when the subject names no session),
//! its lifetime `engine.session_ttl_secs` from the event.

use serde_json::{Map, Value};

use crate::events::Event;
use crate::grant::{Grant, GrantKind, GrantStatus, JsonText, PrincipalType};
use crate::principal::Target;
use crate::signal::Signal;

/// The grant a session-established `signal` about principal `key` announces, or `None` for any
/// other signal (or one about a device or session alone).
pub(super) fn from_signal(
    key: &str,
    signal: &Signal,
    target: &Target,
    session_ttl_secs: f64,
    now: f64,
) -> Option<Grant> {
    let Event::SessionEstablished(e) = &signal.event else {
        return None;
    };
    if target.identifiers.is_empty() {
        return None;
    }
    let mut attributes = Map::new();
    for (k, v) in [
        ("acr", e.acr.clone().map(Value::from)),
        ("amr", e.amr.clone().map(Value::from)),
        ("fp_ua", e.fp_ua.clone().map(Value::from)),
        ("ext_id", e.ext_id.clone().map(Value::from)),
    ] {
        if let Some(v) = v {
            attributes.insert(k.to_owned(), v);
        }
    }
    attributes.insert("source".into(), Value::from(signal.source.label()));
    let id = format!(
        "caep-session:{}",
        target
            .members
            .get("session")
            .cloned()
            .unwrap_or_else(|| format!("{}|{}", signal.iss, signal.jti))
    );
    Some(Grant {
        id: id.into(),
        kind: GrantKind::Session,
        principal: key.into(),
        principal_type: PrincipalType::Human,
        identifiers: target.identifiers.clone().into(),
        subject_id: JsonText::new(
            &signal
                .subject
                .member("user")
                .map(|u| u.to_json())
                .unwrap_or_else(|| signal.subject.to_json()),
        ),
        member_ids: JsonText::new(&Value::Object(match &signal.subject {
            crate::subject::SubjectId::Complex { members } => members
                .iter()
                .filter(|(n, _)| n.as_str() != "user")
                .map(|(n, id)| (n.clone(), id.to_json()))
                .collect(),
            _ => Map::new(),
        })),
        members: (&target.members).into(),
        token: None,
        on_behalf_of: None,
        audience: None,
        scopes: Box::default(),
        issued_at: signal.event_time,
        expires_at: signal.event_time + session_ttl_secs,
        attributes: attributes.into(),
        enforcement_points: Box::default(),
        status: GrantStatus::Active,
        status_reason: None,
        status_rules: None,
        registered_at: now,
        registered_by: signal.source.party(),
        revoked: None,
    })
}
