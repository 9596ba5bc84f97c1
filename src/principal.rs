//! Canonical keys for subject identifiers, and what a signal's subject targets.
//!
//! Every simple identifier has one canonical key (`email:jane@example.com`, `iss_sub:<iss>|<sub>`, …). A
//! *principal* (user, workload, service account, agent, device) is known by one key; the engine's alias
//! index maps every identifier key registered for it (an `aliases` subject, or the identifiers a grant
//! registers together) to that key. Complex-subject members other than `user` (session, device, tenant,
//! application, group, org_unit) narrow a signal to part of a principal's grants (SSF §3.3).

use std::collections::BTreeMap;

use serde_json::Value;

use crate::subject::SubjectId;

/// The members a grant may be narrowed by (SSF §3.3 complex-subject members other than `user`).
pub const GRANT_MEMBERS: [&str; 6] = [
    "session",
    "device",
    "tenant",
    "application",
    "group",
    "org_unit",
];

/// The canonical key of a simple identifier. `None` for complex and aliases (they hold several).
///
/// Canonicalization: e-mail addresses are lower-cased (RFC 9493 §3.2.2 lets receivers canonicalize;
/// IdPs treat them case-insensitively), phone numbers lose spaces, dashes, dots and parentheses.
pub fn identifier_key(id: &SubjectId) -> Option<String> {
    Some(match id {
        SubjectId::Account { uri } => format!("account:{uri}"),
        SubjectId::Email { email } => format!("email:{}", email.to_lowercase()),
        SubjectId::IssSub { iss, sub } => format!("iss_sub:{iss}|{sub}"),
        SubjectId::Opaque { id } => format!("opaque:{id}"),
        SubjectId::PhoneNumber { phone_number } => {
            let digits: String = phone_number
                .chars()
                .filter(|c| !matches!(c, ' ' | '-' | '.' | '(' | ')'))
                .collect();
            format!("phone_number:{digits}")
        }
        SubjectId::Did { url } => format!("did:{url}"),
        SubjectId::Uri { uri } => format!("uri:{uri}"),
        SubjectId::JwtId { iss, jti } => format!("jwt_id:{iss}|{jti}"),
        SubjectId::SamlAssertionId {
            issuer,
            assertion_id,
        } => format!("saml_assertion_id:{issuer}|{assertion_id}"),
        SubjectId::IpAddresses { ip_addresses } => {
            let mut ips = ip_addresses.clone();
            ips.sort();
            format!("ip-addresses:{}", ips.join(","))
        }
        SubjectId::Proprietary { format, members } => {
            // BTreeMap gives a stable member order, so equal identifiers get equal keys.
            let sorted: BTreeMap<&String, &Value> = members.iter().collect();
            format!(
                "{format}:{}",
                serde_json::to_string(&sorted).unwrap_or_default()
            )
        }
        SubjectId::Aliases { .. } | SubjectId::Complex { .. } => return None,
    })
}

/// All identifier keys of a principal identifier (one, or several for `aliases`).
pub fn principal_keys(id: &SubjectId) -> Vec<String> {
    match id {
        SubjectId::Aliases { identifiers } => {
            identifiers.iter().filter_map(identifier_key).collect()
        }
        SubjectId::Complex { members } => {
            members.get("user").map(principal_keys).unwrap_or_default()
        }
        other => identifier_key(other).into_iter().collect(),
    }
}

/// A member key for a grant's session, device, tenant, … given either as an identifier object or as a
/// plain string (taken as an `opaque` id, which is how IdPs name sessions in the CAEP examples).
pub fn member_key(value: &Value) -> Option<String> {
    match value {
        Value::String(s) if !s.is_empty() && !crate::subject::has_control(s) => {
            Some(format!("opaque:{s}"))
        }
        Value::Object(_) => SubjectId::from_json(value, true)
            .ok()
            .as_ref()
            .and_then(identifier_key),
        _ => None,
    }
}

/// What a signal's subject points at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Target {
    /// Identifier keys naming the principal (the complex `user` member, the simple subject, or every
    /// identifier of an `aliases` subject). Empty when the subject names only members (e.g. a device).
    pub identifiers: Vec<String>,
    /// Narrowing members (`session`, `device`, `tenant`, …) by name, as member keys.
    pub members: BTreeMap<String, String>,
}

impl Target {
    pub fn of(subject: &SubjectId) -> Target {
        match subject {
            SubjectId::Complex { members } => Target {
                identifiers: members.get("user").map(principal_keys).unwrap_or_default(),
                members: members
                    .iter()
                    .filter(|(name, _)| name.as_str() != "user")
                    .filter_map(|(name, id)| identifier_key(id).map(|k| (name.clone(), k)))
                    .collect(),
            },
            other => Target {
                identifiers: principal_keys(other),
                members: BTreeMap::new(),
            },
        }
    }
}

/// A grant's member keys by member name (`session` → `opaque:s-1`), sorted by name. A grant names
/// one or two members at most; a `BTreeMap` allocated a leaf of 11 slots (640 bytes) for them, once
/// per grant — a quarter of a grant's memory at 1 M grants. Names are the static
/// [`GRANT_MEMBERS`] (no allocation per grant for `"session"`), keys
/// boxed, and the slice holds exactly its entries. Stored as a JSON map, as before.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Members(Box<[(&'static str, Box<str>)]>);

impl Members {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .binary_search_by(|(n, _)| (*n).cmp(name))
            .ok()
            .map(|i| &*self.0[i].1)
    }

    /// Sets `name`'s key, replacing any. A name that is not a grant member is ignored: a grant
    /// cannot be narrowed by it.
    pub fn insert(&mut self, name: &str, key: &str) {
        let Some(name) = GRANT_MEMBERS.iter().find(|n| **n == name) else {
            return;
        };
        match self.0.binary_search_by(|(n, _)| n.cmp(name)) {
            Ok(i) => self.0[i].1 = key.into(),
            Err(i) => {
                let mut v = std::mem::take(&mut self.0).into_vec();
                v.insert(i, (name, key.into()));
                self.0 = v.into_boxed_slice();
            }
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &str)> {
        self.0.iter().map(|(n, k)| (*n, &**k))
    }
}

impl From<&BTreeMap<String, String>> for Members {
    fn from(map: &BTreeMap<String, String>) -> Members {
        let mut members = Members::default();
        for (name, key) in map {
            members.insert(name, key);
        }
        members
    }
}

impl serde::Serialize for Members {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

impl<'de> serde::Deserialize<'de> for Members {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Members, D::Error> {
        BTreeMap::<String, String>::deserialize(d).map(|m| Members::from(&m))
    }
}

/// Whether a narrowing filter (members → keys) covers a grant's members. `session` and `device` are
/// strict — a signal about one session or device never reaches a grant that names no session or device
/// (that is what makes "user + session revokes one session" precise); the other members follow SSF
/// §8.1.3.1 and act as wildcards where the grant does not name them.
pub fn filter_matches(filter: &BTreeMap<String, String>, grant_members: &Members) -> bool {
    filter
        .iter()
        .all(|(name, key)| match grant_members.get(name) {
            Some(k) => k == key.as_str(),
            None => !matches!(name.as_str(), "session" | "device"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::spec_example;
    use serde_json::json;

    fn sub(v: Value) -> SubjectId {
        SubjectId::from_json(&v, true).unwrap()
    }

    #[test]
    fn keys_are_canonical() {
        assert_eq!(
            identifier_key(&sub(json!({"format":"email","email":"Jane@Example.COM"}))),
            Some("email:jane@example.com".into())
        );
        assert_eq!(
            identifier_key(&sub(
                json!({"format":"phone_number","phone_number":"+1 206-555.0123"})
            )),
            Some("phone_number:+12065550123".into())
        );
        let a = sub(json!({"format":"catalog_item","b":1,"a":2}));
        let b = sub(json!({"a":2,"format":"catalog_item","b":1}));
        assert_eq!(identifier_key(&a), identifier_key(&b));
    }

    #[test]
    fn complex_subjects_split_into_principal_and_members() {
        let set = spec_example("caep-session-revoked-2-complex-session-user-tenant.json");
        let t = Target::of(&sub(set["sub_id"].clone()));
        assert_eq!(
            t.identifiers,
            vec!["iss_sub:https://idp.example.com/123456789/|99beb27c-c1c2-4955-882a-e0dc4996fcbc"]
        );
        assert_eq!(
            t.members.get("session").map(String::as_str),
            Some("opaque:dMTlD|1600802906337.16|16008.16")
        );
        assert_eq!(
            t.members.get("tenant").map(String::as_str),
            Some("opaque:123456789")
        );
        let device_only = spec_example("caep-device-compliance-change.json");
        let t = Target::of(&sub(device_only["sub_id"].clone()));
        assert!(t.identifiers.is_empty());
        assert!(t.members.contains_key("device"));
    }

    #[test]
    fn session_and_device_filters_are_strict_others_are_wildcards() {
        let filter: BTreeMap<String, String> =
            [("session".to_owned(), "opaque:s1".to_owned())].into();
        let with = |pairs: &[(&str, &str)]| -> Members {
            let mut m = Members::default();
            for (name, key) in pairs {
                m.insert(name, key);
            }
            m
        };
        assert!(filter_matches(&filter, &with(&[("session", "opaque:s1")])));
        assert!(!filter_matches(&filter, &with(&[("session", "opaque:s2")])));
        assert!(!filter_matches(&filter, &with(&[])));
        let tenant: BTreeMap<String, String> =
            [("tenant".to_owned(), "opaque:t".to_owned())].into();
        assert!(filter_matches(&tenant, &with(&[])));
        assert!(!filter_matches(&tenant, &with(&[("tenant", "opaque:u")])));
    }

    #[test]
    fn members_keep_name_order_and_their_json_form() {
        let mut m = Members::default();
        m.insert("session", "opaque:s");
        m.insert("device", "opaque:d");
        m.insert("session", "opaque:s2");
        m.insert("user", "email:a@example.com");
        let names: Vec<&str> = m.iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["device", "session"], "`user` is not a grant member");
        assert_eq!(m.get("session"), Some("opaque:s2"));
        assert_eq!(m.get("tenant"), None);
        let json = serde_json::to_value(&m).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"device": "opaque:d", "session": "opaque:s2"})
        );
        assert_eq!(serde_json::from_value::<Members>(json).unwrap(), m);
    }

    #[test]
    fn member_keys_accept_plain_strings_and_identifiers() {
        assert_eq!(member_key(&json!("s1")), Some("opaque:s1".into()));
        assert_eq!(
            member_key(&json!({"format":"opaque","id":"s1"})),
            Some("opaque:s1".into())
        );
        assert_eq!(member_key(&json!(5)), None);
        assert_eq!(member_key(&json!("s\u{0}1")), None, "a control character");
    }
}
