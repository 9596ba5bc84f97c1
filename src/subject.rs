//! Subject identifiers: RFC 9493 formats, the SSF 1.0 additions (§3.4–3.5), complex subjects (§3.3),
//! critical members (§3.6) and complex-subject matching (§8.1.3.1).
//!
//! Parsing is deliberately forgiving about *extra* members (SSF §4.2.3: receivers ignore unknown fields)
//! and strict about the members a format requires: a required member that is missing, empty or of the
//! wrong JSON type is an error, because a subject Vigil cannot name is a subject it cannot act on.
//!
//! Legacy dialects (SSE ID1 / early CAEP drafts, Google RISC) are accepted when `legacy` is set:
//! `subject_type` for `format`, `iss-sub` for `iss_sub`, `phone` for `phone_number`, `jwt-id` for
//! `jwt_id`, and complex subjects written without `"format": "complex"`.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The complex-subject members SSF 1.0 §3.3 defines. Others are allowed (each at most once) but carry no
/// meaning Vigil knows.
pub const DEFINED_MEMBERS: [&str; 7] = [
    "user",
    "device",
    "session",
    "application",
    "tenant",
    "org_unit",
    "group",
];

/// Why a JSON value is not a subject identifier Vigil accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubjectError {
    #[error("subject identifier must be a JSON object")]
    NotAnObject,
    #[error("subject identifier has no `format` member")]
    MissingFormat,
    #[error("subject format `{format}` needs a non-empty string member `{member}`")]
    MissingMember {
        format: &'static str,
        member: &'static str,
    },
    #[error("subject format `{format}`: member `{member}` has the wrong type")]
    WrongType {
        format: &'static str,
        member: &'static str,
    },
    #[error("complex subject member `{0}` is not a subject identifier: {1}")]
    BadMember(String, Box<SubjectError>),
    #[error("complex subject has no members")]
    EmptyComplex,
    #[error("a complex subject cannot contain another complex subject (member `{0}`)")]
    NestedComplex(String),
    #[error("`aliases` must not contain another `aliases` identifier")]
    NestedAliases,
    #[error("`aliases` needs a non-empty array `identifiers`")]
    EmptyAliases,
    #[error("subject format `{format}`: member `{member}` contains a control character")]
    ControlCharacter {
        format: &'static str,
        member: &'static str,
    },
}

/// One subject identifier. Simple formats carry their members; `Complex` carries named members;
/// `Proprietary` keeps a format Vigil does not know (SSF §3.4) with its members verbatim.
///
/// Serde goes through [`SubjectId::to_json`] and [`SubjectId::from_json`] so the JSON form is always the
/// spec's (format names, hyphenated members), whatever the variant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubjectId {
    Account {
        uri: String,
    },
    Email {
        email: String,
    },
    IssSub {
        iss: String,
        sub: String,
    },
    Opaque {
        id: String,
    },
    PhoneNumber {
        phone_number: String,
    },
    Did {
        url: String,
    },
    Uri {
        uri: String,
    },
    Aliases {
        identifiers: Vec<SubjectId>,
    },
    JwtId {
        iss: String,
        jti: String,
    },
    SamlAssertionId {
        issuer: String,
        assertion_id: String,
    },
    IpAddresses {
        ip_addresses: Vec<String>,
    },
    Complex {
        members: BTreeMap<String, SubjectId>,
    },
    Proprietary {
        format: String,
        members: Map<String, Value>,
    },
}

impl Serialize for SubjectId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for SubjectId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(deserializer)?;
        SubjectId::from_json(&v, false).map_err(serde::de::Error::custom)
    }
}

impl SubjectId {
    /// Parses a subject identifier from its JSON form.
    pub fn from_json(value: &Value, legacy: bool) -> Result<Self, SubjectError> {
        parse(value, legacy, Depth::Top)
    }

    /// The JSON form, exactly as RFC 9493 / SSF spell it.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("format".into(), Value::String(self.format().to_owned()));
        let mut put = |k: &str, v: &str| {
            m.insert(k.to_owned(), Value::String(v.to_owned()));
        };
        match self {
            SubjectId::Account { uri } | SubjectId::Uri { uri } => put("uri", uri),
            SubjectId::Email { email } => put("email", email),
            SubjectId::IssSub { iss, sub } => {
                put("iss", iss);
                put("sub", sub);
            }
            SubjectId::Opaque { id } => put("id", id),
            SubjectId::PhoneNumber { phone_number } => put("phone_number", phone_number),
            SubjectId::Did { url } => put("url", url),
            SubjectId::JwtId { iss, jti } => {
                put("iss", iss);
                put("jti", jti);
            }
            SubjectId::SamlAssertionId {
                issuer,
                assertion_id,
            } => {
                put("issuer", issuer);
                put("assertion_id", assertion_id);
            }
            SubjectId::IpAddresses { ip_addresses } => {
                m.insert("ip-addresses".into(), Value::from(ip_addresses.clone()));
            }
            SubjectId::Aliases { identifiers } => {
                let list = identifiers.iter().map(SubjectId::to_json).collect();
                m.insert("identifiers".into(), Value::Array(list));
            }
            SubjectId::Complex { members } => {
                for (name, id) in members {
                    m.insert(name.clone(), id.to_json());
                }
            }
            SubjectId::Proprietary { members, .. } => {
                for (k, v) in members {
                    m.insert(k.clone(), v.clone());
                }
            }
        }
        Value::Object(m)
    }

    /// The format name as RFC 9493 / SSF spell it.
    pub fn format(&self) -> &str {
        match self {
            SubjectId::Account { .. } => "account",
            SubjectId::Email { .. } => "email",
            SubjectId::IssSub { .. } => "iss_sub",
            SubjectId::Opaque { .. } => "opaque",
            SubjectId::PhoneNumber { .. } => "phone_number",
            SubjectId::Did { .. } => "did",
            SubjectId::Uri { .. } => "uri",
            SubjectId::Aliases { .. } => "aliases",
            SubjectId::JwtId { .. } => "jwt_id",
            SubjectId::SamlAssertionId { .. } => "saml_assertion_id",
            SubjectId::IpAddresses { .. } => "ip-addresses",
            SubjectId::Complex { .. } => "complex",
            SubjectId::Proprietary { format, .. } => format,
        }
    }

    /// The named member of a complex subject (`user`, `session`, …), if this is one.
    pub fn member(&self, name: &str) -> Option<&SubjectId> {
        match self {
            SubjectId::Complex { members } => members.get(name),
            _ => None,
        }
    }

    /// SSF §8.1.3.1 matching. Simple subjects match only when identical. Complex subjects match when,
    /// for every member, one side lacks it or both hold identical identifiers (absent = wildcard).
    /// An `aliases` identifier matches when any of its identifiers does.
    pub fn matches(&self, other: &SubjectId) -> bool {
        match (self, other) {
            (SubjectId::Aliases { identifiers }, o) => identifiers.iter().any(|i| i.matches(o)),
            (s, SubjectId::Aliases { identifiers }) => identifiers.iter().any(|i| s.matches(i)),
            (SubjectId::Complex { members: a }, SubjectId::Complex { members: b }) => a
                .iter()
                .all(|(name, id)| b.get(name).is_none_or(|other| id == other)),
            (a, b) => a == b,
        }
    }

    /// SSF §3.6: the names of members listed as critical that Vigil cannot process, i.e. that carry
    /// no meaning Vigil knows (a member name outside SSF §3.3) or whose identifier format Vigil does not
    /// understand. A non-empty answer means the event MUST be discarded.
    pub fn unprocessable_critical_members(&self, critical: &[String]) -> Vec<String> {
        let SubjectId::Complex { members } = self else {
            return Vec::new();
        };
        critical
            .iter()
            .filter(|name| {
                members.get(name.as_str()).is_some_and(|id| {
                    !DEFINED_MEMBERS.contains(&name.as_str())
                        || matches!(id, SubjectId::Proprietary { .. })
                })
            })
            .cloned()
            .collect()
    }
}

impl fmt::Display for SubjectId {
    /// A compact, human-readable rendering for logs and metrics descriptions (never for matching).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SubjectId::Account { uri } | SubjectId::Uri { uri } => {
                write!(f, "{}:{uri}", self.format())
            }
            SubjectId::Email { email } => write!(f, "email:{email}"),
            SubjectId::IssSub { iss, sub } => write!(f, "iss_sub:{iss}|{sub}"),
            SubjectId::Opaque { id } => write!(f, "opaque:{id}"),
            SubjectId::PhoneNumber { phone_number } => write!(f, "phone_number:{phone_number}"),
            SubjectId::Did { url } => write!(f, "did:{url}"),
            SubjectId::JwtId { iss, jti } => write!(f, "jwt_id:{iss}|{jti}"),
            SubjectId::SamlAssertionId {
                issuer,
                assertion_id,
            } => write!(f, "saml_assertion_id:{issuer}|{assertion_id}"),
            SubjectId::IpAddresses { ip_addresses } => {
                write!(f, "ip-addresses:{}", ip_addresses.join(","))
            }
            SubjectId::Aliases { identifiers } => {
                write!(f, "aliases[")?;
                for (i, id) in identifiers.iter().enumerate() {
                    if i > 0 {
                        write!(f, ", ")?;
                    }
                    write!(f, "{id}")?;
                }
                write!(f, "]")
            }
            SubjectId::Complex { members } => {
                write!(f, "complex{{")?;
                for (i, (name, id)) in members.iter().enumerate() {
                    if i > 0 {
                        write!(f, ", ")?;
                    }
                    write!(f, "{name}={id}")?;
                }
                write!(f, "}}")
            }
            SubjectId::Proprietary { format, .. } => write!(f, "{format}:…"),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Depth {
    Top,
    InComplex,
    InAliases,
}

fn parse(value: &Value, legacy: bool, depth: Depth) -> Result<SubjectId, SubjectError> {
    let obj = value.as_object().ok_or(SubjectError::NotAnObject)?;
    let format = match (
        obj.get("format"),
        legacy.then(|| obj.get("subject_type")).flatten(),
    ) {
        (Some(Value::String(f)), _) => f.as_str(),
        (Some(_), _) => {
            return Err(SubjectError::WrongType {
                format: "?",
                member: "format",
            })
        }
        (None, Some(Value::String(f))) => f.as_str(),
        (None, _) if legacy && depth == Depth::Top && looks_like_legacy_complex(obj) => "complex",
        (None, _) => return Err(SubjectError::MissingFormat),
    };
    let format = if legacy {
        match format {
            "iss-sub" => "iss_sub",
            "phone" => "phone_number",
            "jwt-id" => "jwt_id",
            other => other,
        }
    } else {
        format
    };
    Ok(match format {
        "account" => SubjectId::Account {
            uri: req_str(obj, "account", "uri")?,
        },
        "email" => SubjectId::Email {
            email: req_str(obj, "email", "email")?,
        },
        "iss_sub" => SubjectId::IssSub {
            iss: req_str(obj, "iss_sub", "iss")?,
            sub: req_str(obj, "iss_sub", "sub")?,
        },
        "opaque" => SubjectId::Opaque {
            id: req_str(obj, "opaque", "id")?,
        },
        "phone_number" => {
            // The RISC and SSF §8.1.3.3 examples say "phone"; a legacy sender may also name the member so.
            let phone_number = match (legacy, obj.get("phone_number"), obj.get("phone")) {
                (true, None, Some(_)) => req_str(obj, "phone_number", "phone")?,
                _ => req_str(obj, "phone_number", "phone_number")?,
            };
            SubjectId::PhoneNumber { phone_number }
        }
        "did" => SubjectId::Did {
            url: req_str(obj, "did", "url")?,
        },
        "uri" => SubjectId::Uri {
            uri: req_str(obj, "uri", "uri")?,
        },
        "jwt_id" => SubjectId::JwtId {
            iss: req_str(obj, "jwt_id", "iss")?,
            jti: req_str(obj, "jwt_id", "jti")?,
        },
        "saml_assertion_id" => SubjectId::SamlAssertionId {
            issuer: req_str(obj, "saml_assertion_id", "issuer")?,
            assertion_id: req_str(obj, "saml_assertion_id", "assertion_id")?,
        },
        "ip-addresses" => {
            let list = obj.get("ip-addresses").and_then(Value::as_array).ok_or(
                SubjectError::MissingMember {
                    format: "ip-addresses",
                    member: "ip-addresses",
                },
            )?;
            let mut ip_addresses = Vec::with_capacity(list.len());
            for v in list {
                match v.as_str() {
                    Some(s) if has_control(s) => {
                        return Err(SubjectError::ControlCharacter {
                            format: "ip-addresses",
                            member: "ip-addresses",
                        })
                    }
                    Some(s) if !s.is_empty() => ip_addresses.push(s.to_owned()),
                    _ => {
                        return Err(SubjectError::WrongType {
                            format: "ip-addresses",
                            member: "ip-addresses",
                        })
                    }
                }
            }
            if ip_addresses.is_empty() {
                return Err(SubjectError::MissingMember {
                    format: "ip-addresses",
                    member: "ip-addresses",
                });
            }
            SubjectId::IpAddresses { ip_addresses }
        }
        "aliases" => {
            if depth == Depth::InAliases {
                return Err(SubjectError::NestedAliases);
            }
            let list = obj
                .get("identifiers")
                .and_then(Value::as_array)
                .filter(|l| !l.is_empty())
                .ok_or(SubjectError::EmptyAliases)?;
            let identifiers = list
                .iter()
                .map(|v| parse(v, legacy, Depth::InAliases))
                .collect::<Result<Vec<_>, _>>()?;
            SubjectId::Aliases { identifiers }
        }
        "complex" => {
            if depth != Depth::Top {
                return Err(SubjectError::NestedComplex("(nested)".into()));
            }
            let mut members = BTreeMap::new();
            for (name, v) in obj {
                if name == "format" || name == "subject_type" {
                    continue;
                }
                // SSF §3.3: every member is itself a Subject Identifier. A non-object member is either
                // an unknown extension field (ignored, SSF §4.2.3) or garbage; only objects are members.
                if !v.is_object() {
                    continue;
                }
                let id = parse(v, legacy, Depth::InComplex).map_err(|e| match e {
                    SubjectError::NestedComplex(_) => SubjectError::NestedComplex(name.clone()),
                    other => SubjectError::BadMember(name.clone(), Box::new(other)),
                })?;
                members.insert(name.clone(), id);
            }
            if members.is_empty() {
                return Err(SubjectError::EmptyComplex);
            }
            SubjectId::Complex { members }
        }
        other if has_control(other) => {
            return Err(SubjectError::ControlCharacter {
                format: "(proprietary)",
                member: "format",
            })
        }
        other => {
            let mut members = obj.clone();
            members.remove("format");
            members.remove("subject_type");
            SubjectId::Proprietary {
                format: other.to_owned(),
                members,
            }
        }
    })
}

/// SSE ID1 complex subjects had no `format`: an object whose members are all objects named like SSF
/// complex members.
fn looks_like_legacy_complex(obj: &Map<String, Value>) -> bool {
    !obj.is_empty()
        && obj
            .iter()
            .all(|(k, v)| v.is_object() && DEFINED_MEMBERS.contains(&k.as_str()))
}

/// Whether `s` holds a control character (NUL, newline, escape, …). No identifier format has one,
/// and the store keys a principal's rows by its identifier with `\0` as the separator
/// (`context \0 session filter`): an identifier holding one could name another principal's row
/// there. Logs and the console show identifiers too, where control characters forge lines.
pub fn has_control(s: &str) -> bool {
    s.chars().any(char::is_control)
}

fn req_str(
    obj: &Map<String, Value>,
    format: &'static str,
    member: &'static str,
) -> Result<String, SubjectError> {
    match obj.get(member) {
        Some(Value::String(s)) if has_control(s) => {
            Err(SubjectError::ControlCharacter { format, member })
        }
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(Value::String(_)) | None => Err(SubjectError::MissingMember { format, member }),
        Some(_) => Err(SubjectError::WrongType { format, member }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::spec_example;
    use serde_json::json;

    /// No identifier holds a control character: the store joins keys with `\0`, and logs and
    /// the console print identifiers. Each member that becomes part of a key is checked.
    #[test]
    fn identifiers_holding_a_control_character_are_refused() {
        for (v, member) in [
            (
                json!({"format": "email", "email": "a\u{0}b@example.com"}),
                "email",
            ),
            (json!({"format": "opaque", "id": "s\n1"}), "id"),
            (
                json!({"format": "iss_sub", "iss": "https://i.example", "sub": "x\u{1b}[2J"}),
                "sub",
            ),
            (
                json!({"format": "ip-addresses", "ip-addresses": ["10.0.0.1\u{0}"]}),
                "ip-addresses",
            ),
            (
                json!({"format": "complex", "user": {"format": "opaque", "id": "u\u{7f}"}}),
                "id",
            ),
            (json!({"format": "x-vendor\u{0}", "id": "1"}), "format"),
        ] {
            let err = SubjectId::from_json(&v, false).expect_err(&v.to_string());
            assert!(
                err.to_string()
                    .contains(&format!("`{member}` contains a control character")),
                "{v}: {err}"
            );
        }
        // Characters beyond ASCII are not control characters.
        assert!(SubjectId::from_json(
            &json!({"format": "email", "email": "zoë@example.com"}),
            false
        )
        .is_ok());
    }

    fn id(v: Value) -> SubjectId {
        match SubjectId::from_json(&v, false) {
            Ok(s) => s,
            Err(e) => panic!("{v}: {e}"),
        }
    }

    #[test]
    fn parses_every_rfc9493_and_ssf_format() {
        let cases = [
            (
                json!({"format":"account","uri":"acct:a@example.com"}),
                "account",
            ),
            (json!({"format":"email","email":"a@example.com"}), "email"),
            (
                json!({"format":"iss_sub","iss":"https://i","sub":"s"}),
                "iss_sub",
            ),
            (json!({"format":"opaque","id":"x"}), "opaque"),
            (
                json!({"format":"phone_number","phone_number":"+1"}),
                "phone_number",
            ),
            (json!({"format":"did","url":"did:example:1"}), "did"),
            (json!({"format":"uri","uri":"https://u"}), "uri"),
            (
                json!({"format":"aliases","identifiers":[{"format":"email","email":"a@b"},{"format":"opaque","id":"1"}]}),
                "aliases",
            ),
            (spec_example("ssf-subject-id-jwt-id.json"), "jwt_id"),
            (
                spec_example("ssf-subject-id-saml-assertion-id.json"),
                "saml_assertion_id",
            ),
            (
                spec_example("ssf-subject-id-ip-addresses.json"),
                "ip-addresses",
            ),
            (
                json!({"format":"catalog_item","catalog_id":"c0384"}),
                "catalog_item",
            ),
        ];
        for (v, format) in cases {
            assert_eq!(id(v).format(), format);
        }
    }

    #[test]
    fn missing_or_empty_required_members_are_errors() {
        for v in [
            json!({"format":"email"}),
            json!({"format":"email","email":""}),
            json!({"format":"iss_sub","iss":"x"}),
            json!({"format":"iss_sub","iss":"x","sub":7}),
            json!({"format":"ip-addresses","ip-addresses":[]}),
            json!({"format":"aliases","identifiers":[]}),
            json!({"format":"aliases","identifiers":[{"format":"aliases","identifiers":[{"format":"opaque","id":"1"}]}]}),
            json!({"format":"complex"}),
            json!({"format":"complex","user":{"format":"complex","user":{"format":"opaque","id":"1"}}}),
            json!({"id":"x"}),
            json!("opaque"),
        ] {
            assert!(
                SubjectId::from_json(&v, false).is_err(),
                "{v} should be rejected"
            );
        }
    }

    #[test]
    fn legacy_dialects_only_when_enabled() {
        let google = json!({"subject_type":"iss-sub","iss":"https://accounts.google.com/","sub":"7375626A656374"});
        assert!(SubjectId::from_json(&google, false).is_err());
        assert_eq!(
            SubjectId::from_json(&google, true),
            Ok(SubjectId::IssSub {
                iss: "https://accounts.google.com/".into(),
                sub: "7375626A656374".into()
            })
        );
        let phone = spec_example("ssf-remove-subject-request.json")["subject"].clone();
        assert_eq!(
            SubjectId::from_json(&phone, true),
            Ok(SubjectId::PhoneNumber {
                phone_number: "+12065550123".into()
            })
        );
        let id1 =
            json!({"user":{"format":"email","email":"a@b"},"device":{"format":"opaque","id":"d"}});
        assert_eq!(
            SubjectId::from_json(&id1, true).map(|s| s.format().to_owned()),
            Ok("complex".to_owned())
        );
    }

    #[test]
    fn spec_matching_examples() {
        // SSF §8.1.3.1: examples 1 and 2 match, example 3 does not (different group).
        for (n, expected) in [(1, true), (2, true), (3, false)] {
            let event = id(spec_example(&format!(
                "ssf-subject-matching-{n}-event-subject.json"
            )));
            let added = id(spec_example(&format!(
                "ssf-subject-matching-{n}-receiver-added.json"
            )));
            assert_eq!(event.matches(&added), expected, "example {n}");
            assert_eq!(added.matches(&event), expected, "example {n} reversed");
        }
    }

    #[test]
    fn simple_subjects_match_only_when_identical_and_aliases_match_any() {
        let a = id(json!({"format":"email","email":"a@example.com"}));
        let b = id(json!({"format":"email","email":"b@example.com"}));
        assert!(a.matches(&a.clone()));
        assert!(!a.matches(&b));
        let aliases = id(
            json!({"format":"aliases","identifiers":[{"format":"opaque","id":"1"},{"format":"email","email":"b@example.com"}]}),
        );
        assert!(aliases.matches(&b));
        assert!(b.matches(&aliases));
        assert!(!aliases.matches(&a));
    }

    #[test]
    fn critical_members_vigil_cannot_process() {
        let s = id(json!({
            "format":"complex",
            "user":{"format":"email","email":"a@b"},
            "tenant":{"format":"catalog_item","x":"y"},
            "cluster":{"format":"opaque","id":"c1"}
        }));
        let critical = |names: &[&str]| names.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(s
            .unprocessable_critical_members(&critical(&["user"]))
            .is_empty());
        assert_eq!(
            s.unprocessable_critical_members(&critical(&["user", "tenant"])),
            vec!["tenant"]
        );
        assert_eq!(
            s.unprocessable_critical_members(&critical(&["cluster"])),
            vec!["cluster"]
        );
        // A critical member the event does not carry is not a reason to discard.
        assert!(s
            .unprocessable_critical_members(&critical(&["device"]))
            .is_empty());
    }

    #[test]
    fn serde_round_trip_keeps_format_names() {
        let v = spec_example("ssf-subject-id-ip-addresses.json");
        let s = id(v.clone());
        let back = serde_json::to_value(&s).unwrap_or_default();
        assert_eq!(back, v);
    }
}
