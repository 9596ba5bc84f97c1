//! The receiver's other half: Vigil as an SSF *client* of the transmitters it receives from.
//!
//! For each `[[transmitters]]` entry with a `manage` section, a [`StreamManager`] discovers the
//! transmitter (`/.well-known/ssf-configuration`, or `risc-configuration` for legacy RISC ones),
//! creates or adopts Vigil's stream through the SSF §8 management API ([`mgmt`]), keeps its id in
//! the store ([`state`], so restarts adopt instead of duplicating), verifies it periodically and
//! tracks its liveness ([`crate::liveness`]); for a poll stream it runs the RFC 8936 client ([`poll`]).
//! Push streams arrive at the existing `/ssf/push/{stream}` endpoint with a generated credential.
//!
//! Boundaries: it never validates SETs itself — every polled SET goes through
//! [`crate::receiver::Receiver::receive`], exactly like a pushed one.

pub mod credential;
pub mod http;
pub mod manager;
pub mod mgmt;
pub mod poll;
pub mod state;

use std::sync::Arc;

use crate::liveness::Liveness;

pub use credential::{Credential, CredentialError, TokenSource};
pub use manager::{ManageError, StreamManager};
pub use state::{RecordShare, StreamRecord, StreamRecords};

/// Every managed stream, by transmitter name.
#[derive(Default)]
pub struct StreamClients {
    pub managers: Vec<Arc<StreamManager>>,
    pub liveness: Arc<Liveness>,
}

impl StreamClients {
    pub fn get(&self, name: &str) -> Option<Arc<StreamManager>> {
        self.managers.iter().find(|m| m.name() == name).cloned()
    }
}
