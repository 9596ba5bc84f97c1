//! The closed and open value lists the CAEP, RISC and SSF specs define, spelled exactly (case matters).
//!
//! A *closed* list rejects any other value. An *open* list ("or a mutually agreed value", "or a custom
//! alias", "or another") keeps unknown values in an `Other` variant.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

macro_rules! spec_enum {
    (
        $(#[$meta:meta])*
        $name:ident { $($variant:ident => $text:literal),+ $(,)? }
        $(, other = $other:ident)?
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub enum $name {
            $($variant,)+
            $(
                /// A value outside the spec's list, which the spec allows here.
                $other(String),
            )?
        }

        impl $name {
            /// The value as the spec spells it.
            pub fn as_str(&self) -> &str {
                match self {
                    $($name::$variant => $text,)+
                    $($name::$other(s) => s,)?
                }
            }

            /// Parses a value; case-sensitive.
            pub fn parse(s: &str) -> Result<Self, String> {
                match s {
                    $($text => Ok($name::$variant),)+
                    $(s if !s.is_empty() => Ok($name::$other(s.to_owned())),)?
                    other => Err(format!(
                        "`{other}` is not one of: {}",
                        [$($text),+].join(", ")
                    )),
                }
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                $name::parse(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

spec_enum! {
    /// CAEP §2 `initiating_entity`.
    InitiatingEntity { Admin => "admin", User => "user", Policy => "policy", System => "system" }
}

spec_enum! {
    /// CAEP §3.3.1 `credential_type` (reused by RISC §2.7).
    CredentialType {
        Password => "password",
        Pin => "pin",
        X509 => "x509",
        Fido2Platform => "fido2-platform",
        Fido2Roaming => "fido2-roaming",
        FidoU2f => "fido-u2f",
        VerifiableCredential => "verifiable-credential",
        PhoneVoice => "phone-voice",
        PhoneSms => "phone-sms",
        App => "app",
    }, other = Other
}

spec_enum! {
    /// CAEP §3.3.1 `change_type`.
    ChangeType { Create => "create", Revoke => "revoke", Update => "update", Delete => "delete" }
}

spec_enum! {
    /// CAEP §3.4.1 `namespace`.
    AssuranceNamespace {
        Rfc8176 => "RFC8176",
        Rfc6711 => "RFC6711",
        IsoIec29115 => "ISO-IEC-29115",
        NistIal => "NIST-IAL",
        NistAal => "NIST-AAL",
        NistFal => "NIST-FAL",
    }, other = Custom
}

spec_enum! {
    /// CAEP §3.4.1 `change_direction`.
    ChangeDirection { Increase => "increase", Decrease => "decrease" }
}

spec_enum! {
    /// CAEP §3.5.1 `previous_status` / `current_status`.
    ComplianceStatus { Compliant => "compliant", NotCompliant => "not-compliant" }
}

spec_enum! {
    /// CAEP §3.8.1 `principal`.
    RiskPrincipal {
        User => "USER",
        Device => "DEVICE",
        Session => "SESSION",
        Tenant => "TENANT",
        OrgUnit => "ORG_UNIT",
        Group => "GROUP",
    }, other = Other
}

spec_enum! {
    /// CAEP §3.8.1 `current_level` / `previous_level`.
    RiskLevel { Low => "LOW", Medium => "MEDIUM", High => "HIGH" }
}

impl RiskLevel {
    /// Ordering for policy: LOW < MEDIUM < HIGH.
    pub fn rank(&self) -> u8 {
        match self {
            RiskLevel::Low => 1,
            RiskLevel::Medium => 2,
            RiskLevel::High => 3,
        }
    }
}

spec_enum! {
    /// RISC §2.3 account-disabled `reason`.
    DisableReason { Hijacking => "hijacking", BulkAccount => "bulk-account" }
}

spec_enum! {
    /// SSF §8.1.2 stream status.
    StreamStatus { Enabled => "enabled", Paused => "paused", Disabled => "disabled" }
}

/// CAEP §2 `reason_admin` / `reason_user`: a JSON object with at least one member, keyed by BCP47
/// language tag, with string values. A plain string (pre-final drafts) is not accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LangMap(pub BTreeMap<String, String>);

impl LangMap {
    /// The text for `lang`, else English, else any.
    pub fn best(&self, lang: &str) -> Option<&str> {
        self.0
            .get(lang)
            .or_else(|| self.0.get("en"))
            .or_else(|| self.0.values().next())
            .map(String::as_str)
    }
}

impl<'de> Deserialize<'de> for LangMap {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let map = BTreeMap::<String, String>::deserialize(d).map_err(|e| {
            serde::de::Error::custom(format!("must be an object of language tag to string ({e})"))
        })?;
        if map.is_empty() {
            return Err(serde::de::Error::custom(
                "must hold at least one language tag",
            ));
        }
        Ok(LangMap(map))
    }
}
/// An ordering for assurance levels: the number a level name ends with (`nist-aal2` → 2, `AAL3` → 3),
/// else 0. The CAEP namespaces (NIST IAL/AAL/FAL, RFC 8176 acr values, ISO 29115 LoA) all number
/// their levels this way.
pub fn assurance_rank(level: &str) -> i64 {
    let digits: String = level
        .chars()
        .rev()
        .take_while(|c| c.is_ascii_digit())
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    digits.parse().unwrap_or(0)
}
