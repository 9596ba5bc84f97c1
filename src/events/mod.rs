//! Typed security events: the 8 CAEP 1.0 events, the 14 RISC 1.0 events and the 2 SSF 1.0 framework
//! events, with their required and optional fields and enum values exactly as the specs spell them,
//! and Vigil's own Global Token Revocation (a request that becomes a signal, [`VIGIL_PREFIX`]).
//!
//! [`Event::parse`] turns one member of a SET's `events` claim into a typed value. A known event whose
//! payload violates its definition is an error (RFC 8935 `invalid_request`: "the Event Payload within
//! the SET does not conform to the event's definition"); an unknown event type is kept verbatim as
//! [`Event::Unknown`] so it can be recorded and counted. Unknown *fields* are ignored (SSF §4.2.3).

mod caep;
mod kind;
mod risc;
mod ssf;
mod vocab;

pub use caep::*;
pub use kind::{EventKind, CAEP_PREFIX, RISC_PREFIX, SSF_PREFIX, VIGIL_PREFIX};
pub use risc::*;
pub use ssf::*;
pub use vocab::*;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A payload that does not conform to its event's definition.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{event} event payload does not conform: {reason}")]
pub struct EventError {
    pub event: &'static str,
    pub reason: String,
}

/// One security event, typed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "payload", rename_all = "kebab-case")]
pub enum Event {
    // CAEP 1.0 §3
    SessionRevoked(SessionRevoked),
    TokenClaimsChange(TokenClaimsChange),
    CredentialChange(CredentialChange),
    AssuranceLevelChange(AssuranceLevelChange),
    DeviceComplianceChange(DeviceComplianceChange),
    SessionEstablished(SessionEstablished),
    SessionPresented(SessionPresented),
    RiskLevelChange(RiskLevelChange),
    // RISC 1.0 §2
    AccountCredentialChangeRequired(RiscCommon),
    AccountPurged(RiscCommon),
    AccountDisabled(AccountDisabled),
    AccountEnabled(RiscCommon),
    IdentifierChanged(IdentifierChanged),
    IdentifierRecycled(RiscCommon),
    CredentialCompromise(CredentialCompromise),
    OptIn(RiscCommon),
    OptOutInitiated(RiscCommon),
    OptOutCancelled(RiscCommon),
    OptOutEffective(RiscCommon),
    RecoveryActivated(RiscCommon),
    RecoveryInformationChanged(RiscCommon),
    SessionsRevoked(RiscCommon),
    // SSF 1.0 §8.1.4, §8.1.5
    Verification(Verification),
    StreamUpdated(StreamUpdated),
    // Vigil's own: an OAuth Global Token Revocation request (`event_timestamp`: its receipt).
    GlobalTokenRevocation(RiscCommon),
    /// An event type Vigil does not know: accepted, recorded and counted, never interpreted.
    Unknown {
        uri: String,
        payload: Map<String, Value>,
    },
}

impl Event {
    /// Parses the payload of the event identified by `uri`. `payload` must be a JSON object.
    pub fn parse(uri: &str, payload: &Value) -> Result<Event, EventError> {
        let Some(kind) = EventKind::from_uri(uri) else {
            let payload = payload.as_object().cloned().ok_or_else(|| EventError {
                event: "unknown",
                reason: "payload must be a JSON object".into(),
            })?;
            return Ok(Event::Unknown {
                uri: uri.to_owned(),
                payload,
            });
        };
        let p = payload;
        let k = kind;
        Ok(match kind {
            EventKind::SessionRevoked => Event::SessionRevoked(typed(k, p)?),
            EventKind::TokenClaimsChange => Event::TokenClaimsChange(typed(k, p)?),
            EventKind::CredentialChange => Event::CredentialChange(typed(k, p)?),
            EventKind::AssuranceLevelChange => Event::AssuranceLevelChange(typed(k, p)?),
            EventKind::DeviceComplianceChange => Event::DeviceComplianceChange(typed(k, p)?),
            EventKind::SessionEstablished => Event::SessionEstablished(typed(k, p)?),
            EventKind::SessionPresented => Event::SessionPresented(typed(k, p)?),
            EventKind::RiskLevelChange => Event::RiskLevelChange(typed(k, p)?),
            EventKind::AccountCredentialChangeRequired => {
                Event::AccountCredentialChangeRequired(typed(k, p)?)
            }
            EventKind::AccountPurged => Event::AccountPurged(typed(k, p)?),
            EventKind::AccountDisabled => Event::AccountDisabled(typed(k, p)?),
            EventKind::AccountEnabled => Event::AccountEnabled(typed(k, p)?),
            EventKind::IdentifierChanged => Event::IdentifierChanged(typed(k, p)?),
            EventKind::IdentifierRecycled => Event::IdentifierRecycled(typed(k, p)?),
            EventKind::CredentialCompromise => Event::CredentialCompromise(typed(k, p)?),
            EventKind::OptIn => Event::OptIn(typed(k, p)?),
            EventKind::OptOutInitiated => Event::OptOutInitiated(typed(k, p)?),
            EventKind::OptOutCancelled => Event::OptOutCancelled(typed(k, p)?),
            EventKind::OptOutEffective => Event::OptOutEffective(typed(k, p)?),
            EventKind::RecoveryActivated => Event::RecoveryActivated(typed(k, p)?),
            EventKind::RecoveryInformationChanged => {
                Event::RecoveryInformationChanged(typed(k, p)?)
            }
            EventKind::SessionsRevoked => Event::SessionsRevoked(typed(k, p)?),
            EventKind::Verification => Event::Verification(typed(k, p)?),
            EventKind::StreamUpdated => Event::StreamUpdated(typed(k, p)?),
            EventKind::GlobalTokenRevocation => Event::GlobalTokenRevocation(typed(k, p)?),
        })
    }

    /// The known kind, or `None` for [`Event::Unknown`].
    pub fn kind(&self) -> Option<EventKind> {
        Some(match self {
            Event::SessionRevoked(_) => EventKind::SessionRevoked,
            Event::TokenClaimsChange(_) => EventKind::TokenClaimsChange,
            Event::CredentialChange(_) => EventKind::CredentialChange,
            Event::AssuranceLevelChange(_) => EventKind::AssuranceLevelChange,
            Event::DeviceComplianceChange(_) => EventKind::DeviceComplianceChange,
            Event::SessionEstablished(_) => EventKind::SessionEstablished,
            Event::SessionPresented(_) => EventKind::SessionPresented,
            Event::RiskLevelChange(_) => EventKind::RiskLevelChange,
            Event::AccountCredentialChangeRequired(_) => EventKind::AccountCredentialChangeRequired,
            Event::AccountPurged(_) => EventKind::AccountPurged,
            Event::AccountDisabled(_) => EventKind::AccountDisabled,
            Event::AccountEnabled(_) => EventKind::AccountEnabled,
            Event::IdentifierChanged(_) => EventKind::IdentifierChanged,
            Event::IdentifierRecycled(_) => EventKind::IdentifierRecycled,
            Event::CredentialCompromise(_) => EventKind::CredentialCompromise,
            Event::OptIn(_) => EventKind::OptIn,
            Event::OptOutInitiated(_) => EventKind::OptOutInitiated,
            Event::OptOutCancelled(_) => EventKind::OptOutCancelled,
            Event::OptOutEffective(_) => EventKind::OptOutEffective,
            Event::RecoveryActivated(_) => EventKind::RecoveryActivated,
            Event::RecoveryInformationChanged(_) => EventKind::RecoveryInformationChanged,
            Event::SessionsRevoked(_) => EventKind::SessionsRevoked,
            Event::Verification(_) => EventKind::Verification,
            Event::StreamUpdated(_) => EventKind::StreamUpdated,
            Event::GlobalTokenRevocation(_) => EventKind::GlobalTokenRevocation,
            Event::Unknown { .. } => return None,
        })
    }

    /// The event's own `event_timestamp` (CAEP §2; RISC credential-compromise §2.7), in seconds.
    pub fn event_timestamp(&self) -> Option<f64> {
        let common = match self {
            Event::SessionRevoked(e) => &e.common,
            Event::TokenClaimsChange(e) => &e.common,
            Event::CredentialChange(e) => &e.common,
            Event::AssuranceLevelChange(e) => &e.common,
            Event::DeviceComplianceChange(e) => &e.common,
            Event::SessionEstablished(e) => &e.common,
            Event::SessionPresented(e) => &e.common,
            Event::RiskLevelChange(e) => &e.common,
            Event::AccountCredentialChangeRequired(e)
            | Event::AccountPurged(e)
            | Event::AccountEnabled(e)
            | Event::IdentifierRecycled(e)
            | Event::OptIn(e)
            | Event::OptOutInitiated(e)
            | Event::OptOutCancelled(e)
            | Event::OptOutEffective(e)
            | Event::RecoveryActivated(e)
            | Event::RecoveryInformationChanged(e)
            | Event::SessionsRevoked(e)
            | Event::GlobalTokenRevocation(e) => &e.common,
            Event::AccountDisabled(e) => &e.common,
            Event::IdentifierChanged(e) => &e.common,
            Event::CredentialCompromise(e) => &e.common,
            Event::Verification(_) | Event::StreamUpdated(_) => return None,
            Event::Unknown { payload, .. } => return payload.get("event_timestamp")?.as_f64(),
        };
        common.event_timestamp
    }

    /// A short, bounded label for metrics: the kind's name, or `unknown`.
    pub fn metric_label(&self) -> &'static str {
        self.kind().map_or("unknown", EventKind::name)
    }
}

fn typed<T: DeserializeOwned>(kind: EventKind, payload: &Value) -> Result<T, EventError> {
    if !payload.is_object() {
        return Err(EventError {
            event: kind.name(),
            reason: "payload must be a JSON object".into(),
        });
    }
    serde_json::from_value(payload.clone()).map_err(|e| EventError {
        event: kind.name(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests;
