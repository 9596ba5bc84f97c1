use serde_json::{json, Value};

use super::*;
use crate::test_support::spec_example;

/// The single event of a spec-example SET, parsed.
fn event_of(file: &str) -> Event {
    let set = spec_example(file);
    let events = set["events"].as_object().cloned().unwrap_or_default();
    assert_eq!(events.len(), 1, "{file}");
    let (uri, payload) = events.into_iter().next().unwrap_or_default();
    match Event::parse(&uri, &payload) {
        Ok(e) => e,
        Err(e) => panic!("{file}: {e}"),
    }
}

#[test]
fn every_spec_example_set_parses_into_its_typed_event() {
    let cases = crate::test_support::spec_example_kinds();
    assert_eq!(cases.len(), 27);
    for (file, kind) in &cases {
        assert_eq!(event_of(file).kind(), Some(*kind), "{file}");
    }
}

#[test]
fn typed_fields_carry_the_spec_values() {
    match event_of("caep-credential-change.json") {
        Event::CredentialChange(c) => {
            assert_eq!(c.credential_type, CredentialType::Fido2Roaming);
            assert_eq!(c.change_type, ChangeType::Create);
            assert_eq!(c.common.initiating_entity, Some(InitiatingEntity::User));
            assert_eq!(c.common.event_timestamp, Some(1615304991.0));
            assert_eq!(
                c.common.reason_admin.as_ref().and_then(|r| r.best("en")),
                Some("User self-enrollment")
            );
        }
        other => panic!("{other:?}"),
    }
    match event_of("caep-risk-level-change.json") {
        Event::RiskLevelChange(r) => {
            assert_eq!(r.principal, RiskPrincipal::User);
            assert_eq!(r.current_level, RiskLevel::Low);
            assert_eq!(r.previous_level, Some(RiskLevel::High));
        }
        other => panic!("{other:?}"),
    }
    match event_of("caep-assurance-level-change-2-custom.json") {
        Event::AssuranceLevelChange(a) => {
            assert_eq!(
                a.namespace,
                AssuranceNamespace::Custom("Retinal Scan".into())
            );
            assert_eq!(a.previous_level, None);
        }
        other => panic!("{other:?}"),
    }
    match event_of("caep-device-compliance-change.json") {
        Event::DeviceComplianceChange(d) => {
            assert_eq!(d.current_status, ComplianceStatus::NotCompliant);
        }
        other => panic!("{other:?}"),
    }
    match event_of("risc-identifier-changed.json") {
        Event::IdentifierChanged(i) => {
            assert_eq!(i.new_value.as_deref(), Some("john.roe@example.com"))
        }
        other => panic!("{other:?}"),
    }
    match event_of("ssf-stream-updated.json") {
        Event::StreamUpdated(s) => assert_eq!(s.status, StreamStatus::Paused),
        other => panic!("{other:?}"),
    }
}

#[test]
fn reason_fragments_are_language_maps() {
    for file in [
        "caep-fragment-reason-admin.json",
        "caep-fragment-reason-user.json",
    ] {
        let fragment = spec_example(file);
        let payload = fragment.as_object().cloned().unwrap_or_default();
        let parsed = Event::parse(&EventKind::SessionRevoked.uri(), &Value::Object(payload));
        assert!(parsed.is_ok(), "{file}: {parsed:?}");
    }
}

#[test]
fn payloads_that_violate_their_definition_are_errors() {
    let caep = |name: &str| format!("{CAEP_PREFIX}{name}");
    let risc = |name: &str| format!("{RISC_PREFIX}{name}");
    let bad = [
        (
            caep("credential-change"),
            json!({"credential_type": "password"}),
        ),
        (
            caep("credential-change"),
            json!({"credential_type": "password", "change_type": "Create"}),
        ),
        (
            caep("risk-level-change"),
            json!({"principal": "USER", "current_level": "high"}),
        ),
        (caep("risk-level-change"), json!({"current_level": "HIGH"})),
        (
            caep("device-compliance-change"),
            json!({"previous_status": "compliant", "current_status": "noncompliant"}),
        ),
        (
            caep("assurance-level-change"),
            json!({"namespace": "NIST-AAL"}),
        ),
        (
            caep("assurance-level-change"),
            json!({"namespace": "NIST-AAL", "current_level": "nist-aal2", "change_direction": "up"}),
        ),
        (caep("token-claims-change"), json!({})),
        (
            caep("session-revoked"),
            json!({"reason_admin": "plain string"}),
        ),
        (caep("session-revoked"), json!({"reason_admin": {}})),
        (
            caep("session-revoked"),
            json!({"initiating_entity": "ADMIN"}),
        ),
        (
            caep("session-revoked"),
            json!({"event_timestamp": "yesterday"}),
        ),
        (caep("session-established"), json!({"amr": "otp"})),
        (risc("account-disabled"), json!({"reason": "spam"})),
        (risc("credential-compromise"), json!({})),
        (
            format!("{SSF_PREFIX}stream-updated"),
            json!({"reason": "no status"}),
        ),
        (
            format!("{SSF_PREFIX}stream-updated"),
            json!({"status": "ENABLED"}),
        ),
        (caep("session-revoked"), json!("not an object")),
    ];
    for (uri, payload) in bad {
        assert!(
            Event::parse(&uri, &payload).is_err(),
            "{uri} {payload} should be rejected"
        );
    }
}

#[test]
fn open_value_lists_keep_agreed_values() {
    let e = Event::parse(
        &format!("{CAEP_PREFIX}credential-change"),
        &json!({"credential_type": "smart-card", "change_type": "revoke"}),
    );
    match e {
        Ok(Event::CredentialChange(c)) => {
            assert_eq!(
                c.credential_type,
                CredentialType::Other("smart-card".into())
            )
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn unknown_event_types_are_kept_verbatim() {
    let e = Event::parse(
        "https://example.com/event/x",
        &json!({"a": 1, "event_timestamp": 5}),
    );
    match &e {
        Ok(ev @ Event::Unknown { uri, .. }) => {
            assert_eq!(uri, "https://example.com/event/x");
            assert_eq!(ev.metric_label(), "unknown");
            assert_eq!(ev.event_timestamp(), Some(5.0));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn every_risc_event_without_attributes_accepts_an_empty_payload() {
    for kind in EventKind::ALL
        .iter()
        .filter(|k| k.uri().starts_with(RISC_PREFIX))
    {
        let r = Event::parse(&kind.uri(), &json!({}));
        if *kind == EventKind::CredentialCompromise {
            assert!(r.is_err());
        } else {
            assert_eq!(r.map(|e| e.kind()), Ok(Some(*kind)), "{kind:?}");
        }
    }
}
