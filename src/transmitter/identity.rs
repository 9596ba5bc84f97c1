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
    #[error("the cluster's key topic: {0}")]
    Shared(String),
}

/// A record of the cluster's key topic: a key id and the key's record, `None` to drop the key.
pub type KeyRecord = (String, Option<Vec<u8>>);

/// Cluster mode: where the keys are shared, so that every instance signs with the same ones.
pub trait KeyShare: Send + Sync {
    /// Appends key records — a key id and its record, `None` to drop the key — returning once the
    /// brokers have them all (blocking: called from blocking tasks).
    fn publish(&self, records: Vec<KeyRecord>) -> Result<(), String>;
}

/// Where the keys are kept.
enum Keep {
    /// `<data_dir>/keys/signing.json`: a single node's.
    File(PathBuf),
    /// The cluster's key topic.
    Shared(Arc<dyn KeyShare>),
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
    /// The key new SETs are signed with, per algorithm offered (in the order of `algs`).
    active: Active,
}

/// One active key per algorithm offered: the default's, then the others'.
struct Active {
    default: Arc<SigningKey>,
    others: Vec<Arc<SigningKey>>,
}

impl Active {
    /// The key of the `i`-th algorithm offered (the default's when out of range).
    fn get(&self, i: usize) -> Arc<SigningKey> {
        i.checked_sub(1)
            .and_then(|j| self.others.get(j))
            .unwrap_or(&self.default)
            .clone()
    }

    fn iter(&self) -> impl Iterator<Item = &Arc<SigningKey>> {
        std::iter::once(&self.default).chain(&self.others)
    }
}

/// The signing identity.
pub struct Identity {
    keep: Keep,
    /// The algorithms Vigil holds a key for: the first signs by default, the others for the
    /// enforcement points that ask for them (`signing_alg`), each key published in the JWKS.
    algs: Vec<Alg>,
    /// The algorithm each enforcement point (by configured name) gets its SETs in, when not the
    /// default.
    chosen: std::collections::HashMap<String, Alg>,
    retention_secs: f64,
    keys: RwLock<Keys>,
    /// Key creation, retirement and retention are timed by it, and so are the `iat`s of the SETs
    /// signed with them.
    clock: Clock,
}

impl Identity {
    /// Loads the keys in `dir`, creating a key for each of `algs` (the first is the default)
    /// that has none; keys of algorithms no longer offered are retired.
    pub fn load_or_create(
        dir: &Path,
        algs: &[Alg],
        retention_secs: u64,
        clock: Clock,
    ) -> Result<Identity, IdentityError> {
        let algs = offered(algs);
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
        let t = clock.now();
        let (_, added) = fill(&mut stored, &algs, t, |alg| {
            new_key(alg, t).map(|k| vec![k])
        })?;
        if added {
            write_keys(&path, &stored).map_err(file_err)?;
        }
        let active = active_keys(&stored, &algs)?;
        Ok(Identity {
            keep: Keep::File(path),
            algs,
            chosen: Default::default(),
            retention_secs: retention_secs as f64,
            keys: RwLock::new(Keys { stored, active }),
            clock,
        })
    }

    /// Which algorithm each enforcement point (by configured name) gets; one not named, or
    /// naming an algorithm not offered, gets the default.
    pub fn with_choices(mut self, chosen: std::collections::HashMap<String, Alg>) -> Identity {
        self.chosen = chosen
            .into_iter()
            .filter(|(_, alg)| self.algs.contains(alg))
            .collect();
        self
    }

    /// The algorithms offered, the default first.
    pub fn algorithms(&self) -> &[Alg] {
        &self.algs
    }

    /// The cluster's identity: the key records read from the key topic (`records`, the last of
    /// each id). When none of them is a usable key, this instance's own keys from an earlier single
    /// node run in `seed_dir` are published (so enforcement points keep trusting its key id), else
    /// a new key. Blocking: it may publish.
    pub fn shared(
        records: Vec<(String, Vec<u8>)>,
        seed_dir: &Path,
        algs: &[Alg],
        retention_secs: u64,
        clock: Clock,
        share: Arc<dyn KeyShare>,
    ) -> Result<Identity, IdentityError> {
        let algs = offered(algs);
        let mut stored: Vec<StoredKey> = records
            .iter()
            .filter_map(|(_, bytes)| serde_json::from_slice(bytes).ok())
            .collect();
        let own: Vec<StoredKey> = std::fs::read(seed_dir.join("signing.json"))
            .ok()
            .and_then(|bytes| serde_json::from_slice::<Vec<StoredKey>>(&bytes).ok())
            .unwrap_or_default()
            .into_iter()
            .filter(|k| k.retired_at.is_none())
            .collect();
        let t = clock.now();
        let (changed, _) = fill(&mut stored, &algs, t, |alg| {
            let mine: Vec<StoredKey> = own.iter().filter(|k| k.alg == alg).cloned().collect();
            if mine.is_empty() {
                new_key(alg, t).map(|k| vec![k])
            } else {
                Ok(mine)
            }
        })?;
        if !changed.is_empty() {
            share
                .publish(records_of(&changed, &[])?)
                .map_err(IdentityError::Shared)?;
        }
        let active = active_keys(&stored, &algs)?;
        Ok(Identity {
            keep: Keep::Shared(share),
            algs,
            chosen: Default::default(),
            retention_secs: retention_secs as f64,
            keys: RwLock::new(Keys { stored, active }),
            clock,
        })
    }

    /// Takes up a key record another instance published (`None`: the key was dropped).
    pub fn learn(&self, kid: &str, record: Option<&[u8]>) {
        let mut keys = match self.keys.write() {
            Ok(k) => k,
            Err(p) => p.into_inner(),
        };
        let mut stored = keys.stored.clone();
        stored.retain(|k| k.kid != kid);
        if let Some(bytes) = record {
            match serde_json::from_slice::<StoredKey>(bytes) {
                Ok(key) if key.kid == kid => stored.push(key),
                _ => {
                    tracing::warn!(%kid, "an unreadable record on the key topic");
                    return;
                }
            }
        }
        // The active keys stay as they are if the records leave none (a rotation half read).
        if let Ok(active) = active_keys(&stored, &self.algs) {
            for (new, old) in active.iter().zip(keys.active.iter()) {
                if new.kid != old.kid {
                    tracing::info!(kid = %new.kid, "signing key taken up from the cluster");
                }
            }
            keys.active = active;
        }
        keys.stored = stored;
    }

    /// The key new SETs are signed with by default.
    pub fn signer(&self) -> Arc<SigningKey> {
        self.signer_of(0)
    }

    /// The key the SETs of the enforcement point named `owner` are signed with.
    pub fn signer_for(&self, owner: &str) -> Arc<SigningKey> {
        let i = self
            .chosen
            .get(owner)
            .and_then(|alg| self.algs.iter().position(|a| a == alg))
            .unwrap_or(0);
        self.signer_of(i)
    }

    fn signer_of(&self, i: usize) -> Arc<SigningKey> {
        match self.keys.read() {
            Ok(k) => k.active.get(i),
            Err(p) => p.into_inner().active.get(i),
        }
    }

    /// Makes a new key active; the old one stays in the JWKS for the retention period.
    /// In cluster mode the change is published first and so reaches every instance.
    pub fn rotate(&self) -> Result<String, IdentityError> {
        let mut keys = match self.keys.write() {
            Ok(k) => k,
            Err(p) => p.into_inner(),
        };
        let mut stored = keys.stored.clone();
        let t = self.clock.now();
        let mut changed = Vec::new();
        for k in stored.iter_mut().filter(|k| k.retired_at.is_none()) {
            k.retired_at = Some(t);
            changed.push(k.clone());
        }
        let expired: Vec<String> = stored
            .iter()
            .filter(|k| k.retired_at.is_some_and(|r| t - r > self.retention_secs))
            .map(|k| k.kid.clone())
            .collect();
        stored.retain(|k| !expired.contains(&k.kid));
        let mut kid = String::new();
        for (i, alg) in self.algs.iter().enumerate() {
            let new = new_key(*alg, t)?;
            if i == 0 {
                kid = new.kid.clone();
            }
            changed.push(new.clone());
            stored.push(new);
        }
        match &self.keep {
            Keep::File(path) => {
                write_keys(path, &stored).map_err(|reason| IdentityError::File {
                    path: path.clone(),
                    reason,
                })?
            }
            Keep::Shared(share) => share
                .publish(records_of(&changed, &expired)?)
                .map_err(IdentityError::Shared)?,
        }
        keys.active = active_keys(&stored, &self.algs)?;
        keys.stored = stored;
        tracing::info!(%kid, "signing keys rotated");
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

/// The records of `changed` keys and of `dropped` key ids, for the key topic.
fn records_of(changed: &[StoredKey], dropped: &[String]) -> Result<Vec<KeyRecord>, IdentityError> {
    let mut records = Vec::with_capacity(changed.len() + dropped.len());
    for k in changed {
        let bytes = serde_json::to_vec(k).map_err(|e| IdentityError::Shared(e.to_string()))?;
        records.push((k.kid.clone(), Some(bytes)));
    }
    records.extend(dropped.iter().map(|kid| (kid.clone(), None)));
    Ok(records)
}

/// The algorithms offered: `algs` without repeats, in order; RS256 when empty.
fn offered(algs: &[Alg]) -> Vec<Alg> {
    let mut out: Vec<Alg> = Vec::with_capacity(algs.len().max(1));
    for alg in algs {
        if !out.contains(alg) {
            out.push(*alg);
        }
    }
    if out.is_empty() {
        out.push(Alg::RS256);
    }
    out
}

/// Makes `stored` hold an active key for each of `algs` (`make` gives the keys of an algorithm
/// that has none) and retires the active keys of algorithms no longer offered, at `t`. Returns
/// the keys changed or added, and whether any were.
fn fill(
    stored: &mut Vec<StoredKey>,
    algs: &[Alg],
    t: f64,
    mut make: impl FnMut(Alg) -> Result<Vec<StoredKey>, IdentityError>,
) -> Result<(Vec<StoredKey>, bool), IdentityError> {
    let mut changed = Vec::new();
    for k in stored
        .iter_mut()
        .filter(|k| k.retired_at.is_none() && !algs.contains(&k.alg))
    {
        k.retired_at = Some(t);
        changed.push(k.clone());
    }
    for alg in algs {
        if !stored
            .iter()
            .any(|k| k.retired_at.is_none() && k.alg == *alg)
        {
            let added = make(*alg)?;
            changed.extend(added.iter().cloned());
            stored.extend(added);
        }
    }
    let any = !changed.is_empty();
    Ok((changed, any))
}

/// The keys SETs are signed with, one per algorithm of `algs`: of that algorithm's keys not
/// retired, the latest created (then the greatest id), so instances that read the same records
/// choose the same key.
fn active_keys(stored: &[StoredKey], algs: &[Alg]) -> Result<Active, IdentityError> {
    let mut keys = algs
        .iter()
        .map(|alg| {
            let k = stored
                .iter()
                .filter(|k| k.retired_at.is_none() && k.alg == *alg)
                .max_by(|a, b| {
                    a.created_at
                        .total_cmp(&b.created_at)
                        .then_with(|| a.kid.cmp(&b.kid))
                })
                .ok_or_else(|| IdentityError::File {
                    path: PathBuf::new(),
                    reason: format!("no active {} key", alg.name()),
                })?;
            let jwk =
                Jwk::from_map(k.private_jwk.clone()).map_err(crate::signing::SigningError::from)?;
            Ok(Arc::new(SigningKey::from_private_jwk(k.alg, &k.kid, jwk)?))
        })
        .collect::<Result<Vec<_>, IdentityError>>()?
        .into_iter();
    let default = keys.next().ok_or_else(|| IdentityError::File {
        path: PathBuf::new(),
        reason: "no algorithm offered".into(),
    })?;
    Ok(Active {
        default,
        others: keys.collect(),
    })
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
        let id = Identity::load_or_create(dir.path(), &[Alg::RS256], 3600, clock.clone()).unwrap();
        let first = id.signer().kid.clone();
        // Reload: same key.
        let id = Identity::load_or_create(dir.path(), &[Alg::RS256], 3600, clock.clone()).unwrap();
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

    /// The key topic, in memory: every record published, in order.
    #[derive(Default)]
    struct Topic(std::sync::Mutex<Vec<KeyRecord>>);

    impl KeyShare for Topic {
        fn publish(&self, records: Vec<KeyRecord>) -> Result<(), String> {
            self.0.lock().unwrap().extend(records);
            Ok(())
        }
    }

    impl Topic {
        /// Every record from `from` on, and how many there are in all.
        fn since(&self, from: usize) -> (Vec<KeyRecord>, usize) {
            let all = self.0.lock().unwrap();
            (all[from.min(all.len())..].to_vec(), all.len())
        }

        /// The last record of each key, as a reader that starts now gets them.
        fn latest(&self) -> Vec<(String, Vec<u8>)> {
            let mut latest = std::collections::BTreeMap::new();
            for (k, v) in self.0.lock().unwrap().iter() {
                latest.insert(k.clone(), v.clone());
            }
            latest
                .into_iter()
                .filter_map(|(k, v)| Some((k, v?)))
                .collect()
        }
    }

    fn follow(id: &Identity, records: Vec<KeyRecord>) {
        for (kid, record) in records {
            id.learn(&kid, record.as_deref());
        }
    }

    /// In cluster mode every instance signs with the same key and publishes the same JWKS: the
    /// first one's key (a single node's own, if it had one) is taken up by the others, a rotation
    /// on any one by all, and racing rotations still end on one signing key everywhere.
    #[test]
    fn instances_sharing_the_key_topic_sign_alike() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Clock::manual(1_700_000_000_000);
        let own = Identity::load_or_create(dir.path(), &[Alg::RS256], 3600, clock.clone()).unwrap();
        let own_kid = own.signer().kid.clone();
        let topic = Arc::new(Topic::default());
        let empty = tempfile::tempdir().unwrap();
        let a = Identity::shared(
            topic.latest(),
            dir.path(),
            &[Alg::RS256],
            3600,
            clock.clone(),
            topic.clone(),
        )
        .unwrap();
        assert_eq!(a.signer().kid, own_kid, "the single node's key carries on");
        let b = Identity::shared(
            topic.latest(),
            empty.path(),
            &[Alg::RS256],
            3600,
            clock.clone(),
            topic.clone(),
        )
        .unwrap();
        assert_eq!(b.signer().kid, own_kid);
        let (_, mut read) = topic.since(0);
        assert_eq!(read, 1, "the second instance published nothing");

        clock.advance(std::time::Duration::from_secs(10));
        let rotated = b.rotate().unwrap();
        let (records, end) = topic.since(read);
        read = end;
        follow(&a, records.clone());
        follow(&b, records);
        assert_eq!(a.signer().kid, rotated);
        assert_eq!(published(&a), published(&b));
        assert!(
            published(&a).contains(&own_kid),
            "the retired key stays published"
        );

        // Two rotations at once: each instance reads both, and both sign with the same key.
        clock.advance(std::time::Duration::from_secs(10));
        a.rotate().unwrap();
        b.rotate().unwrap();
        let (records, _) = topic.since(read);
        follow(&a, records.clone());
        follow(&b, records);
        assert_eq!(a.signer().kid, b.signer().kid);
        assert_eq!(published(&a), published(&b));
    }
}
