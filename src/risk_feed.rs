//! Risk signals from risk engines, UEBA tools and fraud systems (delivered over Kafka): Vigil's native
//! JSON message format, operator-defined mappings for foreign formats, and their normalization into the
//! same [`Signal`](crate::signal::Signal) a CAEP risk-level-change becomes — so event-time ordering holds across sources (a
//! late, older feed score never overrides a newer CAEP level, and vice versa).
//!
//! Native format (one JSON object per message):
//!
//! ```json
//! {"subject": {"format": "email", "email": "jane@example.com"},   // RFC 9493, or a plain string key
//!  "level": "HIGH",                  // LOW | MEDIUM | HIGH; or give "score" (0–100) instead
//!  "score": 87.5,
//!  "principal": "USER",              // default USER
//!  "source": "ueba",                 // the risk system; default: the topic
//!  "event_time": 1700000000.25,      // seconds, milliseconds (> 1e11) or RFC 3339; default: now
//!  "ttl_secs": 3600,                 // optional: the level stops counting after this
//!  "attributes": {"country": "FR"},  // optional free-form facts for policy (context.attributes);
//!                                    // at most 64 of them, 8 KiB as JSON (else dead-lettered)
//!  "id": "msg-123"}                  // optional id: redeliveries with the same id apply once
//! ```
//!
//! The signal's `iss` is `kafka:<topic>` and its `jti` is `id:<id>` when the message carries an id,
//! else `offset:<partition>/<offset>`: either way a redelivered message is recorded once.
//!
//! A mapping names, per topic, JSON pointers (RFC 6901) to the same facts in a foreign message.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::events::{Event, EventKind, RiskLevel, RiskLevelChange, RiskPrincipal};
use crate::subject::SubjectId;

/// Why a message cannot become a signal (it goes to the dead-letter path).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FeedError {
    #[error("the message is not a JSON object: {0}")]
    NotJson(String),
    #[error("no subject: {0}")]
    Subject(String),
    #[error("no risk level: give `level` (LOW, MEDIUM, HIGH) or a numeric `score`")]
    NoLevel,
    #[error("invalid `{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
    /// A bug, not the message's fault; it is dead-lettered rather than lost or retried forever.
    #[error("internal error while normalizing the message")]
    Internal,
}

/// Score thresholds: a score at or above `high` is HIGH, at or above `medium` MEDIUM, else LOW.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Thresholds {
    pub medium: f64,
    pub high: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            medium: 40.0,
            high: 75.0,
        }
    }
}

/// Where the facts are in a foreign message (JSON pointers), per topic.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mapping {
    pub topic: String,
    /// Pointer to the subject: an RFC 9493 object, or a string taken in `subject_format`.
    pub subject: String,
    /// Format of a string subject: `email`, `opaque`, `phone_number`, `account`, `uri`, `did`.
    #[serde(default)]
    pub subject_format: Option<String>,
    #[serde(default)]
    pub level: Option<String>,
    #[serde(default)]
    pub score: Option<String>,
    #[serde(default)]
    pub time: Option<String>,
    #[serde(default)]
    pub id: Option<String>,
    /// Pointer to a reason string (the risk change's `risk_reason`, what decisions say).
    #[serde(default)]
    pub reason: Option<String>,
    /// A constant source name (default: the topic).
    #[serde(default)]
    pub source: Option<String>,
    /// Foreign level values → LOW / MEDIUM / HIGH (exact match, then case-insensitive).
    #[serde(default)]
    pub level_values: BTreeMap<String, String>,
    /// Attribute name → pointer.
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    #[serde(default)]
    pub thresholds: Thresholds,
}

impl Mapping {
    /// Checks what types cannot: pointers are RFC 6901 (empty or starting with `/`), the subject
    /// format is known, level values map to levels, thresholds are ordered. Names the bad field.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        let pointer = |field: &'static str, p: &str| {
            if p.is_empty() || p.starts_with('/') {
                Ok(())
            } else {
                Err((
                    field,
                    format!("`{p}` is not a JSON pointer (start it with `/`)"),
                ))
            }
        };
        pointer("subject", &self.subject)?;
        for (field, p) in [
            ("level", &self.level),
            ("score", &self.score),
            ("time", &self.time),
            ("id", &self.id),
            ("reason", &self.reason),
        ] {
            if let Some(p) = p {
                pointer(field, p)?;
            }
        }
        for p in self.attributes.values() {
            pointer("attributes", p)?;
        }
        if self.level.is_none() && self.score.is_none() {
            return Err(("level", "give `level` or `score` (or both)".into()));
        }
        if let Some(f) = &self.subject_format {
            if !["email", "opaque", "phone_number", "account", "uri", "did"].contains(&f.as_str()) {
                return Err(("subject_format", format!("unknown format `{f}`")));
            }
        }
        for v in self.level_values.values() {
            RiskLevel::parse(v).map_err(|e| ("level_values", e))?;
        }
        let t = &self.thresholds;
        if !(t.medium.is_finite() && t.high.is_finite() && t.medium <= t.high) {
            return Err(("thresholds", "need finite `medium` <= `high`".into()));
        }
        Ok(())
    }
}

/// Where a message was read: its topic and position, and the time to assume when it names none
/// (the broker's timestamp, else now).
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub now: f64,
    /// When Vigil read the message (milliseconds, the engine's clock).
    pub received_at_ms: i64,
}

/// Where the native format keeps what every mapping names (the topic comes from the message).
static NATIVE: std::sync::LazyLock<Mapping> = std::sync::LazyLock::new(|| Mapping {
    subject: "/subject".into(),
    level: Some("/level".into()),
    score: Some("/score".into()),
    time: Some("/event_time".into()),
    id: Some("/id".into()),
    ..Mapping::default()
});

/// Normalizes a native-format message into a signal (without a sequence number).
pub fn from_native(origin: Origin<'_>, payload: &[u8]) -> Result<crate::signal::Signal, FeedError> {
    let topic = origin.topic;
    let msg = object(payload)?;
    let mut signal = normalize(&NATIVE, &msg, origin)?;
    if let Some(p) = msg.get("principal").and_then(Value::as_str) {
        if let Event::RiskLevelChange(r) = &mut signal.event {
            r.principal = RiskPrincipal::parse(p).map_err(|reason| FeedError::Invalid {
                field: "principal",
                reason,
            })?;
        }
    }
    if let Some(source) = msg.get("source").and_then(Value::as_str) {
        signal.source = crate::signal::SignalSource::RiskFeed {
            topic: topic.to_owned(),
            source: source.to_owned(),
        };
    }
    signal.ttl_secs = match msg.get("ttl_secs") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_u64().ok_or_else(|| FeedError::Invalid {
            field: "ttl_secs",
            reason: "must be a whole number of seconds".into(),
        })?),
    };
    if let Some(attrs) = msg.get("attributes") {
        let attrs = attrs.as_object().ok_or_else(|| FeedError::Invalid {
            field: "attributes",
            reason: "must be an object".into(),
        })?;
        check_attributes(attrs)?;
        signal.attributes = attrs.clone();
    }
    Ok(signal)
}

/// Most attributes one native message may set, and most bytes (as JSON) they may take: every one
/// becomes a fact of the subject's context, kept in memory and written with it, and a Kafka
/// message may be a megabyte — thousands of keys, or one value the size of the message.
pub const MAX_ATTRIBUTES: usize = 64;
pub const MAX_ATTRIBUTES_BYTES: usize = 8 * 1024;

/// Refuses attributes beyond [`MAX_ATTRIBUTES`] or [`MAX_ATTRIBUTES_BYTES`]: the message is
/// dead-lettered with the reason, and nothing of it is applied.
fn check_attributes(attrs: &Map<String, Value>) -> Result<(), FeedError> {
    if attrs.len() > MAX_ATTRIBUTES {
        return Err(FeedError::Invalid {
            field: "attributes",
            reason: format!("has {} entries; at most {MAX_ATTRIBUTES}", attrs.len()),
        });
    }
    let bytes = serde_json::to_vec(attrs).map_or(usize::MAX, |b| b.len());
    if bytes > MAX_ATTRIBUTES_BYTES {
        return Err(FeedError::Invalid {
            field: "attributes",
            reason: format!("take {bytes} bytes as JSON; at most {MAX_ATTRIBUTES_BYTES}"),
        });
    }
    Ok(())
}

/// Normalizes a foreign message with its topic's mapping.
pub fn from_mapped(
    mapping: &Mapping,
    origin: Origin<'_>,
    payload: &[u8],
) -> Result<crate::signal::Signal, FeedError> {
    let msg = object(payload)?;
    normalize(mapping, &msg, origin)
}

fn object(payload: &[u8]) -> Result<Value, FeedError> {
    let v: Value =
        serde_json::from_slice(payload).map_err(|e| FeedError::NotJson(e.to_string()))?;
    if v.is_object() {
        Ok(v)
    } else {
        Err(FeedError::NotJson("not an object".into()))
    }
}

fn normalize(
    m: &Mapping,
    msg: &Value,
    origin: Origin<'_>,
) -> Result<crate::signal::Signal, FeedError> {
    let now = origin.now;
    let subject = match msg.pointer(&m.subject) {
        Some(Value::String(s)) if !s.is_empty() => {
            let format = m.subject_format.as_deref().unwrap_or("opaque");
            let member = match format {
                "email" => "email",
                "phone_number" => "phone_number",
                "account" | "uri" => "uri",
                "did" => "url",
                _ => "id",
            };
            let format = if member == "id" { "opaque" } else { format };
            SubjectId::from_json(&json!({"format": format, member: s}), false)
                .map_err(|e| FeedError::Subject(e.to_string()))?
        }
        Some(v @ Value::Object(_)) => {
            SubjectId::from_json(v, true).map_err(|e| FeedError::Subject(e.to_string()))?
        }
        _ => {
            return Err(FeedError::Subject(format!(
                "nothing usable at `{}`",
                m.subject
            )))
        }
    };
    let level = match m.level.as_deref().and_then(|p| msg.pointer(p)) {
        Some(Value::String(raw)) => {
            let mapped = m
                .level_values
                .get(raw)
                .or_else(|| {
                    m.level_values
                        .iter()
                        .find(|(k, _)| k.eq_ignore_ascii_case(raw))
                        .map(|(_, v)| v)
                })
                .cloned()
                .unwrap_or_else(|| raw.to_ascii_uppercase());
            Some(
                RiskLevel::parse(&mapped).map_err(|reason| FeedError::Invalid {
                    field: "level",
                    reason,
                })?,
            )
        }
        Some(Value::Null) | None => None,
        Some(_) => {
            return Err(FeedError::Invalid {
                field: "level",
                reason: "must be a string".into(),
            })
        }
    };
    let level = match level {
        Some(l) => l,
        None => match m.score.as_deref().and_then(|p| msg.pointer(p)) {
            Some(v) => {
                let score = v
                    .as_f64()
                    .filter(|s| s.is_finite())
                    .ok_or(FeedError::Invalid {
                        field: "score",
                        reason: "must be a number".into(),
                    })?;
                if score >= m.thresholds.high {
                    RiskLevel::High
                } else if score >= m.thresholds.medium {
                    RiskLevel::Medium
                } else {
                    RiskLevel::Low
                }
            }
            None => return Err(FeedError::NoLevel),
        },
    };
    let event_time = match m.time.as_deref().and_then(|p| msg.pointer(p)) {
        None | Some(Value::Null) => now,
        Some(v) => parse_time(v).ok_or_else(|| FeedError::Invalid {
            field: "event_time",
            reason: "must be seconds, milliseconds or an RFC 3339 time".into(),
        })?,
    };
    let id = m.id.as_deref().and_then(|p| msg.pointer(p)).map(|v| {
        v.as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| v.to_string())
    });
    let mut attributes = Map::new();
    for (name, pointer) in &m.attributes {
        if let Some(v) = msg.pointer(pointer) {
            attributes.insert(name.clone(), v.clone());
        }
    }
    // A mapping is chosen by the message's topic, so the origin's topic is the mapping's.
    let source = m.source.clone().unwrap_or_else(|| origin.topic.to_owned());
    Ok(crate::signal::Signal {
        seq: 0,
        source: crate::signal::SignalSource::RiskFeed {
            topic: origin.topic.to_owned(),
            source,
        },
        iss: format!("kafka:{}", origin.topic),
        jti: match id {
            Some(id) => format!("id:{id}"),
            None => format!("offset:{}/{}", origin.partition, origin.offset),
        },
        txn: None,
        event_uri: EventKind::RiskLevelChange.uri(),
        event: Event::RiskLevelChange(RiskLevelChange {
            common: Default::default(),
            principal: RiskPrincipal::User,
            current_level: level,
            previous_level: None,
            risk_reason: m
                .reason
                .as_deref()
                .and_then(|p| msg.pointer(p))
                .or_else(|| msg.get("reason"))
                .and_then(Value::as_str)
                .map(str::to_owned),
        }),
        subject,
        event_time,
        iat: now,
        received_at_ms: origin.received_at_ms,
        attributes,
        ttl_secs: None,
    })
}

/// Seconds since the epoch from seconds, milliseconds (values above 1e11) or RFC 3339 (UTC `Z`
/// or an offset).
fn parse_time(v: &Value) -> Option<f64> {
    if let Some(n) = v.as_f64() {
        return Some(if n > 1e11 { n / 1000.0 } else { n });
    }
    // RFC 3339 through chrono: impossible dates (`2026-02-31`) and offsets are refused, not rolled
    // over into the next month.
    let t = chrono::DateTime::parse_from_rfc3339(v.as_str()?).ok()?;
    Some(t.timestamp() as f64 + f64::from(t.timestamp_subsec_nanos()) / 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::{Decay, PrincipalContext};
    use crate::principal::Target;

    fn at(topic: &str, now: f64) -> Origin<'_> {
        Origin {
            topic,
            partition: 2,
            offset: 41,
            now,
            received_at_ms: (now * 1000.0) as i64,
        }
    }

    #[test]
    fn native_messages_normalize_to_risk_signals() {
        let s = from_native(
            at("risk", 1.0),
            br#"{"subject": {"format": "email", "email": "jane@example.com"}, "score": 90,
                 "source": "ueba", "event_time": 1700000000000, "ttl_secs": 60, "id": "m1",
                 "attributes": {"country": "FR"}, "principal": "DEVICE"}"#,
        )
        .unwrap();
        assert_eq!(s.event_type_name(), "risk-signal");
        assert_eq!(s.event_time, 1_700_000_000.0, "milliseconds are recognised");
        assert_eq!(s.jti, "id:m1");
        assert_eq!(s.iss, "kafka:risk");
        assert_eq!(s.ttl_secs, Some(60));
        assert_eq!(s.attributes["country"], "FR");
        assert_eq!(s.source.label(), "feed:ueba");
        match &s.event {
            Event::RiskLevelChange(r) => {
                assert_eq!(r.current_level, RiskLevel::High);
                assert_eq!(r.principal, RiskPrincipal::Device);
            }
            other => panic!("{other:?}"),
        }
        let plain =
            from_native(at("risk", 5.0), br#"{"subject": "u-1", "level": "medium"}"#).unwrap();
        assert_eq!(plain.jti, "offset:2/41", "no id: the message's position");
        assert_eq!(plain.subject, SubjectId::Opaque { id: "u-1".into() });
        assert_eq!(plain.event_time, 5.0, "no time: now");
    }

    /// A message's attributes are bounded in number and size: beyond either the message is an
    /// error (dead-lettered, nothing applied), at the bound it is a signal.
    #[test]
    fn attributes_beyond_their_bounds_are_refused() {
        let message = |attrs: Value| {
            serde_json::to_vec(
                &serde_json::json!({"subject": "u-1", "level": "LOW", "attributes": attrs}),
            )
            .unwrap()
        };
        let many =
            |n: usize| Value::Object((0..n).map(|i| (format!("a{i}"), Value::from(i))).collect());
        let ok = from_native(at("risk", 1.0), &message(many(MAX_ATTRIBUTES))).unwrap();
        assert_eq!(ok.attributes.len(), MAX_ATTRIBUTES);
        let err = from_native(at("risk", 1.0), &message(many(MAX_ATTRIBUTES + 1))).unwrap_err();
        assert!(
            err.to_string()
                .contains(&format!("at most {MAX_ATTRIBUTES}")),
            "{err}"
        );
        let big = serde_json::json!({"note": "x".repeat(MAX_ATTRIBUTES_BYTES)});
        let err = from_native(at("risk", 1.0), &message(big)).unwrap_err();
        assert!(err.to_string().contains("bytes as JSON"), "{err}");
    }

    #[test]
    fn bad_messages_are_errors_not_panics() {
        for bad in [
            &b"not json"[..],
            b"[1,2]",
            br#"{"level": "HIGH"}"#,
            br#"{"subject": "u", "level": "SEVERE"}"#,
            br#"{"subject": "u"}"#,
            br#"{"subject": "u", "score": "high"}"#,
            br#"{"subject": "u", "level": "HIGH", "event_time": "yesterday"}"#,
            br#"{"subject": {"format": "email"}, "level": "HIGH"}"#,
            br#"{"subject": "u", "level": "HIGH", "ttl_secs": -1}"#,
            // Found by the fuzzer (`kafka_mapping`): a day that overflowed the time arithmetic.
            br#"{"subject": "user-7", "score": 87.5, "event_time": "2026-11-0000000004584946418820579331T10:00:00Z", "principal": "USER"}"#,
            br#"{"subject": "u", "level": "HIGH", "event_time": "2026-13-01T10:00:00Z"}"#,
            br#"{"subject": "u", "level": "HIGH", "event_time": "2026-11-01T25:00:00Z"}"#,
            br#"{"subject": "u", "level": "HIGH", "event_time": "2026-11-01T10:00:00+99:00"}"#,
        ] {
            assert!(
                from_native(at("t", 0.0), bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn mappings_read_foreign_formats() {
        let m = crate::sim::risk::fraud_engine_mapping("fraud");
        let s = from_mapped(
            &m,
            at("fraud", 0.0),
            br#"{"user": {"mail": "Bob@Example.com"}, "assessment": {"band": "Critical"},
                 "ts": "2023-11-14T22:13:20Z", "eventId": 77, "geo": {"cc": "DE"},
                 "why": "card testing"}"#,
        )
        .unwrap();
        assert_eq!(s.event_time, 1_700_000_000.0);
        assert!(
            matches!(&s.event, Event::RiskLevelChange(r) if r.risk_reason.as_deref() == Some("card testing")),
            "the mapped reason: {:?}",
            s.event
        );
        assert_eq!(s.jti, "id:77");
        assert_eq!(s.attributes["country"], "DE");
        assert_eq!(s.source.label(), "feed:fraud-engine");
        assert!(
            matches!(&s.event, Event::RiskLevelChange(r) if r.current_level == RiskLevel::High)
        );
        assert!(from_mapped(&m, at("fraud", 0.0), br#"{"user": {}}"#).is_err());

        assert_eq!(m.check(), Ok(()));
        let not_a_pointer = Mapping {
            subject: "user.mail".into(),
            ..m.clone()
        };
        assert_eq!(not_a_pointer.check().map_err(|e| e.0), Err("subject"));
        let bad_value = Mapping {
            level_values: [("x".to_owned(), "SEVERE".to_owned())].into(),
            ..m.clone()
        };
        assert_eq!(bad_value.check().map_err(|e| e.0), Err("level_values"));
    }

    #[test]
    fn rfc3339_offsets() {
        assert_eq!(
            parse_time(&json!("2023-11-14T23:13:20+01:00")),
            Some(1_700_000_000.0)
        );
        assert_eq!(parse_time(&json!("1970-01-01T00:00:01.5Z")), Some(1.5));
        assert_eq!(parse_time(&json!("garbage")), None);
        // Impossible dates are refused, not rolled into the next month.
        assert_eq!(parse_time(&json!("2026-02-31T10:00:00Z")), None);
        assert_eq!(parse_time(&json!("2026-04-31T10:00:00Z")), None);
        assert_eq!(parse_time(&json!("2025-02-29T10:00:00Z")), None);
        assert!(parse_time(&json!("2024-02-29T10:00:00Z")).is_some());
    }

    #[test]
    fn feed_and_caep_share_event_time_ordering_and_ttl_decays_a_feed_fact() {
        let caep = crate::evaluate::testing::signal_from_claims(
            &json!({"iss": "https://idp.example.com/", "aud": "a", "jti": "c1", "iat": 1000,
                "sub_id": {"format": "email", "email": "jane@example.com"},
                "events": {"https://schemas.openid.net/secevent/caep/event-type/risk-level-change":
                    {"principal": "USER", "current_level": "HIGH", "event_timestamp": 2000}}}),
            1,
        )
        .unwrap();
        // An older feed LOW from the *same* source key would not win; different sources coexist and
        // the context reports the highest live level.
        let feed = from_native(at("risk", 1500.0), br#"{"subject": {"format": "email", "email": "jane@example.com"}, "level": "LOW", "event_time": 1500, "source": "ueba", "ttl_secs": 100}"#).unwrap();
        let mut ctx = PrincipalContext::new("email:jane@example.com");
        ctx.apply(&caep, &Target::of(&caep.subject));
        ctx.apply(&feed, &Target::of(&feed.subject));
        let g: crate::grant::GrantRequest = serde_json::from_value(json!({"id": "g", "kind": "session",
            "subject": {"format": "email", "email": "jane@example.com"}, "issued_at": 1, "expires_at": 99999})).unwrap();
        let g = g.into_grant("email:jane@example.com".into(), 1.0).unwrap();
        let early = ctx.view(&g, &[], &Decay::default(), 1550.0);
        assert_eq!(
            early["risk"]["by_source"].as_object().unwrap().len(),
            2,
            "{early}"
        );
        assert_eq!(early["risk"]["level"], "HIGH");
        let view = ctx.view(&g, &[], &Decay::default(), 2100.0);
        assert_eq!(view["risk"]["level"], "HIGH");
        // The feed fact's own TTL (100 s from 1500) has run out at 2100: only the CAEP fact counts.
        assert!(view["risk"]["by_source"]
            .as_object()
            .unwrap()
            .keys()
            .all(|k| !k.contains("ueba")));
    }
}
