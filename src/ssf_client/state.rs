//! What Vigil remembers about its streams at transmitters, so a restart adopts them instead of
//! creating duplicates: table `rx_streams`, transmitter name → `{stream_id, authorization}`.
//!
//! In cluster mode ([`StreamRecords::share`]) the records are the cluster's (one stream per
//! transmitter, one push credential every instance accepts): a change is published through
//! [`RecordShare`] and every instance takes it up into its table ([`StreamRecords::apply`]).

use std::sync::{Arc, OnceLock};

use futures_util::future::BoxFuture;

use redb::{Database, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::store::{BatchWriter, WriteError};

const STREAMS: TableDefinition<&str, &[u8]> = TableDefinition::new("rx_streams");

/// Why the stream record could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("store: {0}")]
    Store(String),
    #[error(transparent)]
    Write(#[from] WriteError),
}

fn store<E: std::fmt::Display>(e: E) -> StateError {
    StateError::Store(e.to_string())
}

/// One managed stream's durable facts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StreamRecord {
    /// The transmitter's id for Vigil's stream, once created or adopted.
    #[serde(default)]
    pub stream_id: Option<String>,
    /// The push `authorization_header` Vigil generated and gave the transmitter.
    #[serde(default)]
    pub authorization: Option<String>,
    /// A digest (hex) of the credential the transmitter was last given: in cluster mode the
    /// cluster's credential may be replaced after a stream was set up (instances starting
    /// together), and the stream is then updated with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub given: Option<String>,
    /// Cluster mode: the verification Vigil last asked for, so that every instance — the
    /// transmitter may push the verification event to any — accepts exactly its `state`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification: Option<ExpectedVerification>,
}

/// The `state` a requested verification event must carry on `stream` (SSF §8.1.4.2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExpectedVerification {
    pub stream: String,
    pub state: String,
}

impl StreamRecord {
    /// Whether the transmitter has the current push credential.
    pub fn credential_given(&self) -> bool {
        match &self.authorization {
            Some(a) => self.given.as_deref() == Some(credential_digest(a).as_str()),
            None => true,
        }
    }

    /// Notes that the transmitter was given the current push credential.
    pub fn give_credential(&mut self) {
        self.given = self.authorization.as_deref().map(credential_digest);
    }
}

/// The hex digest a record keeps of a credential given.
fn credential_digest(credential: &str) -> String {
    crate::auth::digest(credential)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Cluster mode: where the records are shared.
pub trait RecordShare: Send + Sync {
    /// Publishes `name`'s record; returns once this instance has taken it up.
    fn publish(&self, name: &str, record: Vec<u8>) -> BoxFuture<'static, Result<(), String>>;
}

/// Handle on `rx_streams`.
#[derive(Clone)]
pub struct StreamRecords {
    db: Arc<Database>,
    writer: BatchWriter,
    shared: Arc<OnceLock<Arc<dyn RecordShare>>>,
}

impl StreamRecords {
    pub fn open(db: Arc<Database>, writer: BatchWriter) -> Result<StreamRecords, StateError> {
        let txn = db.begin_write().map_err(store)?;
        txn.open_table(STREAMS).map_err(store)?;
        txn.commit().map_err(store)?;
        Ok(StreamRecords {
            db,
            writer,
            shared: Arc::default(),
        })
    }

    /// Cluster mode, before the cluster's records are read: what the table held (an earlier
    /// run's, stale since) is dropped.
    pub async fn forget_all(&self) -> Result<(), StateError> {
        self.writer
            .write(|txn| {
                txn.delete_table(STREAMS).map_err(WriteError::storage)?;
                txn.open_table(STREAMS).map_err(WriteError::storage)?;
                Ok(())
            })
            .await?;
        Ok(())
    }

    /// Cluster mode from now on: changes are published through `shared` (and taken up here as
    /// they are read back, [`StreamRecords::apply`]).
    pub fn share(&self, shared: Arc<dyn RecordShare>) -> Result<(), StateError> {
        self.shared
            .set(shared)
            .map_err(|_| StateError::Store("the records are shared already".into()))
    }

    /// Cluster mode: takes up `name`'s record as published by any instance; the verification it
    /// expects, for intake to remember (a verification event may be pushed to any instance).
    pub async fn apply(
        &self,
        name: &str,
        bytes: Vec<u8>,
    ) -> Result<Option<ExpectedVerification>, StateError> {
        let record: StreamRecord = serde_json::from_slice(&bytes).map_err(store)?;
        self.write(name, bytes).await?;
        Ok(record.verification)
    }

    /// Whether the records are the cluster's.
    pub fn is_shared(&self) -> bool {
        self.shared.get().is_some()
    }

    async fn write(&self, name: &str, bytes: Vec<u8>) -> Result<(), StateError> {
        let name = name.to_owned();
        self.writer
            .write(move |txn| {
                txn.open_table(STREAMS)
                    .map_err(WriteError::storage)?
                    .insert(name.as_str(), bytes.as_slice())
                    .map_err(WriteError::storage)?;
                Ok(())
            })
            .await?;
        Ok(())
    }

    pub fn get(&self, name: &str) -> Result<StreamRecord, StateError> {
        let txn = self.db.begin_read().map_err(store)?;
        let table = txn.open_table(STREAMS).map_err(store)?;
        match table.get(name).map_err(store)? {
            Some(bytes) => serde_json::from_slice(bytes.value()).map_err(store),
            None => Ok(StreamRecord::default()),
        }
    }

    pub async fn put(&self, name: &str, record: &StreamRecord) -> Result<(), StateError> {
        let bytes = serde_json::to_vec(record).map_err(store)?;
        match self.shared.get() {
            Some(shared) => shared.publish(name, bytes).await.map_err(StateError::Store),
            None => self.write(name, bytes).await,
        }
    }

    /// The push credential for `name`: the stored one, else a new random one, stored before it is
    /// used. In cluster mode the one the cluster's records hold after this instance's was
    /// published (instances starting together may each publish one; the last wins everywhere).
    pub async fn push_credential(&self, name: &str) -> Result<String, StateError> {
        let mut record = self.get(name)?;
        if let Some(a) = &record.authorization {
            return Ok(a.clone());
        }
        let secret = format!("Bearer vigil-{:032x}", rand::random::<u128>());
        record.authorization = Some(secret.clone());
        self.put(name, &record).await?;
        Ok(self.get(name)?.authorization.unwrap_or(secret))
    }
}
