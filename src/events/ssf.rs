//! SSF 1.0 framework events: verification (§8.1.4) and stream-updated (§8.1.5).

use serde::{Deserialize, Serialize};

use super::vocab::StreamStatus;

/// §8.1.4 verification. `state` echoes the receiver's request; an unsolicited verification has none.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Verification {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
}

/// §8.1.5 stream-updated: the transmitter changed the stream's status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamUpdated {
    pub status: StreamStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}
