//! CAEP 1.0 §2–3 event payloads.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::vocab::*;

/// CAEP §2 optional claims every CAEP event may carry.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CaepCommon {
    /// Seconds since the epoch at which the event happened (not when the SET was issued).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_timestamp: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initiating_entity: Option<InitiatingEntity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason_admin: Option<LangMap>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason_user: Option<LangMap>,
}

/// §3.1 session-revoked: no event-specific claims. A complex subject names the sessions to revoke.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SessionRevoked {
    #[serde(flatten)]
    pub common: CaepCommon,
}

/// §3.2 token-claims-change: `claims` holds the changed claims with their new values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenClaimsChange {
    #[serde(flatten)]
    pub common: CaepCommon,
    pub claims: Map<String, Value>,
}

/// §3.3 credential-change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CredentialChange {
    #[serde(flatten)]
    pub common: CaepCommon,
    pub credential_type: CredentialType,
    pub change_type: ChangeType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub friendly_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x509_issuer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x509_serial: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fido2_aaguid: Option<String>,
}

/// §3.4 assurance-level-change. An absent `previous_level` means "unknown".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AssuranceLevelChange {
    #[serde(flatten)]
    pub common: CaepCommon,
    pub namespace: AssuranceNamespace,
    pub current_level: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_level: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change_direction: Option<ChangeDirection>,
}

/// §3.5 device-compliance-change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceComplianceChange {
    #[serde(flatten)]
    pub common: CaepCommon,
    pub previous_status: ComplianceStatus,
    pub current_status: ComplianceStatus,
}

/// §3.6 session-established. `event_timestamp` is the establishment time.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SessionEstablished {
    #[serde(flatten)]
    pub common: CaepCommon,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fp_ua: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acr: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amr: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ext_id: Option<String>,
}

/// §3.7 session-presented.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SessionPresented {
    #[serde(flatten)]
    pub common: CaepCommon,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fp_ua: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ext_id: Option<String>,
}

/// §3.8 risk-level-change. An absent `previous_level` means "unknown".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RiskLevelChange {
    #[serde(flatten)]
    pub common: CaepCommon,
    pub principal: RiskPrincipal,
    pub current_level: RiskLevel,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_level: Option<RiskLevel>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub risk_reason: Option<String>,
}
