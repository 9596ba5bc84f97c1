//! What Vigil remembers about its streams at transmitters, so a restart adopts them instead of
//! creating duplicates: table `rx_streams`, transmitter name → `{stream_id, authorization}`.

use std::sync::Arc;

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
}

/// Handle on `rx_streams`.
#[derive(Clone)]
pub struct StreamRecords {
    db: Arc<Database>,
    writer: BatchWriter,
}

impl StreamRecords {
    pub fn open(db: Arc<Database>, writer: BatchWriter) -> Result<StreamRecords, StateError> {
        let txn = db.begin_write().map_err(store)?;
        txn.open_table(STREAMS).map_err(store)?;
        txn.commit().map_err(store)?;
        Ok(StreamRecords { db, writer })
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

    /// The push credential for `name`: the stored one, else a new random one, stored before it is
    /// used.
    pub async fn push_credential(&self, name: &str) -> Result<String, StateError> {
        let mut record = self.get(name)?;
        if let Some(a) = &record.authorization {
            return Ok(a.clone());
        }
        let secret = format!("Bearer vigil-{:032x}", rand::random::<u128>());
        record.authorization = Some(secret.clone());
        self.put(name, &record).await?;
        Ok(secret)
    }
}
