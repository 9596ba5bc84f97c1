//! RISC 1.0 §2 event payloads. Most RISC events carry no attributes of their own; they share
//! [`RiscCommon`], which admits the optional claims RISC §2.7 borrows from CAEP §2.

use serde::{Deserialize, Serialize};

use super::caep::CaepCommon;
use super::vocab::*;

/// The optional claims a RISC event may carry (`event_timestamp`, `reason_admin`, …).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RiscCommon {
    #[serde(flatten)]
    pub common: CaepCommon,
}

/// §2.3 account-disabled.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AccountDisabled {
    #[serde(flatten)]
    pub common: CaepCommon,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<DisableReason>,
}

/// §2.5 identifier-changed. The subject carries the OLD identifier; `new-value` the new one.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct IdentifierChanged {
    #[serde(flatten)]
    pub common: CaepCommon,
    #[serde(rename = "new-value", default, skip_serializing_if = "Option::is_none")]
    pub new_value: Option<String>,
}

/// §2.7 credential-compromise. `event_timestamp` is the time of discovery.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CredentialCompromise {
    #[serde(flatten)]
    pub common: CaepCommon,
    pub credential_type: CredentialType,
}
