//! Helpers shared by unit tests.

use serde_json::Value;

/// A verbatim spec example from `tests/fixtures/spec-examples/`, parsed.
pub fn spec_example(file: &str) -> Value {
    let path = format!(
        "{}/tests/fixtures/spec-examples/{file}",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The spec-example SETs and their event kinds, from `tests/fixtures/spec-example-events.tsv`.
pub fn spec_example_kinds() -> Vec<(String, crate::events::EventKind)> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/spec-example-events.tsv"
    );
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (file, name) = l.split_once('\t').unwrap_or_else(|| panic!("bad line {l}"));
            let kind = crate::events::EventKind::ALL
                .iter()
                .find(|k| k.name() == name)
                .unwrap_or_else(|| panic!("unknown kind {name}"));
            (file.to_owned(), *kind)
        })
        .collect()
}

/// A pushed session-revoked signal about the opaque subject `u1`, with its own `jti`: the
/// plainest signal, for tests of the stages that move signals rather than read them.
pub fn session_revoked(jti: &str) -> crate::signal::Signal {
    crate::signal::Signal {
        seq: 0,
        source: crate::signal::SignalSource::SsfPush {
            transmitter: "t".into(),
            stream: "s".into(),
        },
        iss: "https://idp.example.com/".into(),
        jti: jti.into(),
        txn: None,
        event_uri: "https://schemas.openid.net/secevent/caep/event-type/session-revoked".into(),
        event: crate::events::Event::SessionRevoked(Default::default()),
        subject: crate::subject::SubjectId::Opaque { id: "u1".into() },
        event_time: 1.0,
        iat: 1.0,
        received_at_ms: 1,
        attributes: Default::default(),
        ttl_secs: None,
    }
}
