//! The embedded store: one redb database file in the data directory, shared by every module that
//! persists state. Each module owns its own tables (named with its prefix) and nobody else's.
//!
//! redb was chosen because it is pure Rust (no C toolchain, no background compaction threads), ACID
//! with a single writer and MVCC readers, and fsyncs on commit by default: an acknowledged write is on
//! disk. The single-writer model fits group commit: one thread batches many small writes per fsync.

use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why the store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create data directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open store {path}: {source}")]
    Open {
        path: PathBuf,
        source: redb::DatabaseError,
    },
}

/// Opens (creating if needed) `<data_dir>/vigil.redb`.
pub fn open(data_dir: &Path) -> Result<Arc<redb::Database>, StoreError> {
    std::fs::create_dir_all(data_dir).map_err(|source| StoreError::Dir {
        path: data_dir.to_owned(),
        source,
    })?;
    let path = data_dir.join("vigil.redb");
    let db = redb::Database::create(&path).map_err(|source| StoreError::Open {
        path: path.clone(),
        source,
    })?;
    Ok(Arc::new(db))
}
