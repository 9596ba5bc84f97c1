//! Vigil's signing identity: the keys it signs its SETs with, persisted in
//! `<data_dir>/keys/signing.json` (created on first start, mode 0600). Rotation adds a new active key
//! and keeps the previous ones in the JWKS for `retention` — long enough for every SET signed with them
//! to be delivered and verified — then drops them.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use josekit::jwk::Jwk;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::clock::Clock;
use crate::jose::Alg;
use crate::signing::{jwks_document, SigningKey};

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("key file {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("key: {0}")]
    Key(#[from] crate::signing::SigningError),
}

#[derive(Clone, Serialize, Deserialize)]
struct StoredKey {
    kid: String,
    alg: Alg,
    private_jwk: Map<String, Value>,
    created_at: f64,
    #[serde(default)]
    retired_at: Option<f64>,
}

struct Keys {
    stored: Vec<StoredKey>,
    active: Arc<SigningKey>,
}

/// The signing identity.
pub struct Identity {
    path: PathBuf,
    alg: Alg,
    retention_secs: f64,
    keys: RwLock<Keys>,
    /// Key creation, retirement and retention are timed by it, and so are the `iat`s of the SETs
    /// signed with them.
    clock: Clock,
}

impl Identity {
    /// Loads the keys in `dir`, or creates a first key for `alg`.
    pub fn load_or_create(
        dir: &Path,
        alg: Alg,
        retention_secs: u64,
        clock: Clock,
    ) -> Result<Identity, IdentityError> {
        let path = dir.join("signing.json");
        let file_err = |reason: String| IdentityError::File {
            path: path.clone(),
            reason,
        };
        let mut stored: Vec<StoredKey> = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| file_err(e.to_string()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(file_err(e.to_string())),
        };
        let usable = stored
            .iter()
            .any(|k| k.retired_at.is_none() && k.alg == alg);
        if !usable {
            for k in stored.iter_mut().filter(|k| k.retired_at.is_none()) {
                k.retired_at = Some(clock.now());
            }
            stored.push(new_key(alg, clock.now())?);
            write_keys(&path, &stored).map_err(file_err)?;
        }
        let active = active_key(&stored)?;
        Ok(Identity {
            path,
            alg,
            retention_secs: retention_secs as f64,
            keys: RwLock::new(Keys { stored, active }),
            clock,
        })
    }

    /// The key new SETs are signed with.
    pub fn signer(&self) -> Arc<SigningKey> {
        match self.keys.read() {
            Ok(k) => k.active.clone(),
            Err(p) => p.into_inner().active.clone(),
        }
    }

    /// Makes a new key active; the old one stays in the JWKS for the retention period.
    pub fn rotate(&self) -> Result<String, IdentityError> {
        let mut keys = self.keys.write().map_err(|_| IdentityError::File {
            path: self.path.clone(),
            reason: "lock poisoned".into(),
        })?;
        let mut stored = keys.stored.clone();
        let t = self.clock.now();
        for k in stored.iter_mut().filter(|k| k.retired_at.is_none()) {
            k.retired_at = Some(t);
        }
        stored.retain(|k| k.retired_at.is_none_or(|r| t - r <= self.retention_secs));
        let new = new_key(self.alg, t)?;
        let kid = new.kid.clone();
        stored.push(new);
        write_keys(&self.path, &stored).map_err(|reason| IdentityError::File {
            path: self.path.clone(),
            reason,
        })?;
        keys.active = active_key(&stored)?;
        keys.stored = stored;
        tracing::info!(%kid, "signing key rotated");
        Ok(kid)
    }

    /// The clock this identity signs by.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// The public JWKS: the active key and retired keys still within the retention period.
    pub fn jwks(&self) -> Value {
        let t = self.clock.now();
        let keys = match self.keys.read() {
            Ok(k) => k.stored.clone(),
            Err(p) => p.into_inner().stored.clone(),
        };
        let publics: Vec<Jwk> = keys
            .iter()
            .filter(|k| k.retired_at.is_none_or(|r| t - r <= self.retention_secs))
            .filter_map(|k| {
                let jwk = Jwk::from_map(k.private_jwk.clone()).ok()?;
                SigningKey::from_private_jwk(k.alg, &k.kid, jwk)
                    .ok()?
                    .public_jwk()
                    .ok()
            })
            .collect();
        jwks_document(&publics)
    }
}

/// A new key created at `t`; its `kid` is unique however many keys are made in one millisecond
/// (a test's clock may stand still).
fn new_key(alg: Alg, t: f64) -> Result<StoredKey, IdentityError> {
    let kid = format!(
        "vigil-{}-{:x}-{:04x}",
        alg.name().to_lowercase(),
        (t * 1000.0) as u64,
        rand::random::<u16>()
    );
    let key = SigningKey::generate(alg, &kid)?;
    Ok(StoredKey {
        kid,
        alg,
        private_jwk: key.private_jwk_map(),
        created_at: t,
        retired_at: None,
    })
}

fn active_key(stored: &[StoredKey]) -> Result<Arc<SigningKey>, IdentityError> {
    let k = stored
        .iter()
        .rev()
        .find(|k| k.retired_at.is_none())
        .ok_or_else(|| IdentityError::File {
            path: PathBuf::new(),
            reason: "no active key".into(),
        })?;
    let jwk = Jwk::from_map(k.private_jwk.clone()).map_err(crate::signing::SigningError::from)?;
    Ok(Arc::new(SigningKey::from_private_jwk(k.alg, &k.kid, jwk)?))
}

/// Writes atomically (temp file + rename), readable by the owner only.
fn write_keys(path: &Path, keys: &[StoredKey]) -> Result<(), String> {
    if let Some(dir) = path.parent() {
        crate::store::private_dir(dir).map_err(|e| e.to_string())?;
    }
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(keys).map_err(|e| e.to_string())?;
    std::fs::write(&tmp, bytes).map_err(|e| e.to_string())?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| e.to_string())?;
    }
    std::fs::rename(&tmp, path).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The key ids the JWKS publishes.
    fn published(id: &Identity) -> Vec<String> {
        id.jwks()["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kid"].as_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn keys_persist_rotate_and_stay_published_for_the_retention() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Clock::manual(1_700_000_000_000);
        let id = Identity::load_or_create(dir.path(), Alg::RS256, 3600, clock.clone()).unwrap();
        let first = id.signer().kid.clone();
        // Reload: same key.
        let id = Identity::load_or_create(dir.path(), Alg::RS256, 3600, clock.clone()).unwrap();
        assert_eq!(id.signer().kid, first);
        let second = id.rotate().unwrap();
        assert_ne!(second, first);
        let kids = published(&id);
        assert!(kids.contains(&first) && kids.contains(&second), "{kids:?}");
        assert!(
            id.jwks()["keys"][0].get("d").is_none(),
            "no private part in the JWKS"
        );
        // The retired key is published until the clock passes its retention, and not after.
        clock.advance(std::time::Duration::from_secs(3600));
        assert_eq!(id.jwks()["keys"].as_array().unwrap().len(), 2);
        clock.advance(std::time::Duration::from_secs(1));
        let kids = published(&id);
        assert_eq!(kids, vec![second]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("signing.json"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
