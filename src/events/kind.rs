//! Event-type URIs: the canonical ones from CAEP 1.0, RISC 1.0 and SSF 1.0, plus the legacy aliases
//! still sent by older transmitters (SSE ID1 framework events, Google's RISC verification).

/// CAEP 1.0 §3 event-type URI prefix.
pub const CAEP_PREFIX: &str = "https://schemas.openid.net/secevent/caep/event-type/";
/// RISC 1.0 §2 event-type URI prefix.
pub const RISC_PREFIX: &str = "https://schemas.openid.net/secevent/risc/event-type/";
/// Vigil's own event types: requests that are not SETs but become signals (OAuth Global Token
/// Revocation, draft-parecki-oauth-global-token-revocation, which defines no event-type URI).
pub const VIGIL_PREFIX: &str = "urn:vigil:event-type:";
/// SSF 1.0 §8.1.4–8.1.5 framework event-type URI prefix.
pub const SSF_PREFIX: &str = "https://schemas.openid.net/secevent/ssf/event-type/";
/// SSE ID1 used this prefix for the framework events (standards.md §5.6).
const SSE_PREFIX: &str = "https://schemas.openid.net/secevent/sse/event-type/";

macro_rules! kinds {
    ($($variant:ident => ($prefix:ident, $name:literal)),+ $(,)?) => {
        /// Every event type Vigil knows.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum EventKind { $($variant),+ }

        impl EventKind {
            /// All kinds, in spec order.
            pub const ALL: &'static [EventKind] = &[$(EventKind::$variant),+];

            /// The short name, as it ends the URI (`session-revoked`).
            pub fn name(self) -> &'static str {
                match self { $(EventKind::$variant => $name),+ }
            }

            /// The canonical event-type URI.
            pub fn uri(self) -> String {
                match self { $(EventKind::$variant => format!("{}{}", $prefix, $name)),+ }
            }

            fn from_canonical(uri: &str) -> Option<EventKind> {
                $(
                    if uri.strip_prefix($prefix) == Some($name) {
                        return Some(EventKind::$variant);
                    }
                )+
                None
            }
        }
    };
}

kinds! {
    SessionRevoked => (CAEP_PREFIX, "session-revoked"),
    TokenClaimsChange => (CAEP_PREFIX, "token-claims-change"),
    CredentialChange => (CAEP_PREFIX, "credential-change"),
    AssuranceLevelChange => (CAEP_PREFIX, "assurance-level-change"),
    DeviceComplianceChange => (CAEP_PREFIX, "device-compliance-change"),
    SessionEstablished => (CAEP_PREFIX, "session-established"),
    SessionPresented => (CAEP_PREFIX, "session-presented"),
    RiskLevelChange => (CAEP_PREFIX, "risk-level-change"),
    AccountCredentialChangeRequired => (RISC_PREFIX, "account-credential-change-required"),
    AccountPurged => (RISC_PREFIX, "account-purged"),
    AccountDisabled => (RISC_PREFIX, "account-disabled"),
    AccountEnabled => (RISC_PREFIX, "account-enabled"),
    IdentifierChanged => (RISC_PREFIX, "identifier-changed"),
    IdentifierRecycled => (RISC_PREFIX, "identifier-recycled"),
    CredentialCompromise => (RISC_PREFIX, "credential-compromise"),
    OptIn => (RISC_PREFIX, "opt-in"),
    OptOutInitiated => (RISC_PREFIX, "opt-out-initiated"),
    OptOutCancelled => (RISC_PREFIX, "opt-out-cancelled"),
    OptOutEffective => (RISC_PREFIX, "opt-out-effective"),
    RecoveryActivated => (RISC_PREFIX, "recovery-activated"),
    RecoveryInformationChanged => (RISC_PREFIX, "recovery-information-changed"),
    SessionsRevoked => (RISC_PREFIX, "sessions-revoked"),
    Verification => (SSF_PREFIX, "verification"),
    StreamUpdated => (SSF_PREFIX, "stream-updated"),
    GlobalTokenRevocation => (VIGIL_PREFIX, "global-token-revocation"),
}

impl EventKind {
    /// The kind an event-type URI names, accepting legacy aliases. `None` for an unknown URI.
    pub fn from_uri(uri: &str) -> Option<EventKind> {
        if let Some(kind) = Self::from_canonical(uri) {
            return Some(kind);
        }
        match uri.strip_prefix(SSE_PREFIX) {
            Some("verification") => return Some(EventKind::Verification),
            Some("stream-updated") => return Some(EventKind::StreamUpdated),
            _ => {}
        }
        // Google's RISC service sends its verification event under the RISC prefix.
        (uri.strip_prefix(RISC_PREFIX) == Some("verification")).then_some(EventKind::Verification)
    }

    /// Whether this is an SSF framework event (about the stream, not about a user).
    pub fn is_framework(self) -> bool {
        matches!(self, EventKind::Verification | EventKind::StreamUpdated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_match_the_specs() {
        let count = |prefix: &str| {
            EventKind::ALL
                .iter()
                .filter(|k| k.uri().starts_with(prefix))
                .count()
        };
        assert_eq!(count(CAEP_PREFIX), 8);
        assert_eq!(count(RISC_PREFIX), 14);
        assert_eq!(count(SSF_PREFIX), 2);
    }

    #[test]
    fn uris_round_trip_and_legacy_aliases_resolve() {
        for &k in EventKind::ALL {
            assert_eq!(EventKind::from_uri(&k.uri()), Some(k));
        }
        assert_eq!(
            EventKind::from_uri("https://schemas.openid.net/secevent/sse/event-type/verification"),
            Some(EventKind::Verification)
        );
        assert_eq!(
            EventKind::from_uri("https://schemas.openid.net/secevent/risc/event-type/verification"),
            Some(EventKind::Verification)
        );
        assert_eq!(
            EventKind::from_uri(
                "https://schemas.openid.net/secevent/caep/event-type/Session-Revoked"
            ),
            None,
            "URIs are case-sensitive"
        );
    }
}
