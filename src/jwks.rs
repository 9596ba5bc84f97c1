//! A transmitter's signing keys: fetched over HTTP(S) from its `jwks_uri` (configured, or discovered
//! from its SSF metadata), cached, refreshed in the background, and refetched once — rate-limited — when
//! a SET names a `kid` the cache does not hold, so key rotation needs no restart.
//!
//! Invariants:
//! - a SET signed by a cached key is verified without touching the network or any async lock;
//! - keys are only ever used with an algorithm that fits them (`kty`/`crv`, and the JWK's own `alg` if
//!   it has one): an RSA key can never verify an HMAC signature;
//! - RSA keys below 2048 bits are refused at load time, and a SET naming one is `invalid_key`.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use josekit::jwk::Jwk;
use josekit::jws::JwsVerifier;
use serde_json::Value;

use crate::discovery;
use crate::jose::{Alg, CompactJws};
use crate::jws_verifier::DigestVerifier;

/// Smallest RSA modulus accepted (CAEP interoperability profile; NIST SP 800-131A).
pub const MIN_RSA_BITS: usize = 2048;
const MAX_JWKS_BYTES: usize = 1 << 20;

/// Where a transmitter's keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// A configured JWKS URL.
    JwksUri(String),
    /// The `jwks_uri` of the issuer's `/.well-known/ssf-configuration` (SSF §7).
    Discovery,
}

/// Why a SET's signature could not be checked or did not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The keys have never been fetched successfully: a temporary condition, not the SET's fault.
    #[error("the transmitter's keys are not available yet: {0}")]
    Unavailable(String),
    /// `refetch` says whether the JWKS was fetched again for it, and if not, why.
    #[error("no key with kid `{kid}` in the transmitter's JWKS ({refetch})")]
    UnknownKid { kid: String, refetch: String },
    #[error("the SET has no `kid` and the JWKS does not hold exactly one {0} key")]
    Ambiguous(Alg),
    #[error("key `{kid}` cannot be used: {reason}")]
    Refused { kid: String, reason: String },
    #[error("key `{kid}` does not fit algorithm {alg}")]
    WrongAlg { kid: String, alg: Alg },
    #[error("the signature does not verify")]
    BadSignature,
}

/// One usable key with a ready verifier per algorithm it may verify.
#[derive(Debug)]
pub struct Key {
    pub kid: Option<String>,
    verifiers: Vec<(Alg, Verifier)>,
}

/// How a key checks signatures: pre-hashed on a reused OpenSSL context (every algorithm but
/// EdDSA: `jws_verifier`), or by josekit (EdDSA, which has no pre-hashed form).
#[derive(Debug)]
enum Verifier {
    Digest(DigestVerifier),
    Jose(Box<dyn JwsVerifier>),
}

impl Verifier {
    fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        match self {
            Verifier::Digest(v) => v.verify(message, signature),
            Verifier::Jose(v) => v.verify(message, signature).is_ok(),
        }
    }
}

impl Key {
    fn verifier(&self, alg: Alg) -> Option<&Verifier> {
        self.verifiers
            .iter()
            .find(|(a, _)| *a == alg)
            .map(|(_, v)| v)
    }
}

/// A parsed JWKS, restricted to the algorithms a transmitter may use.
#[derive(Debug, Default)]
pub struct KeySet {
    loaded: bool,
    by_kid: HashMap<String, Arc<Key>>,
    all: Vec<Arc<Key>>,
    /// Keys present in the JWKS but refused, with why: reported when a SET names them.
    refused: HashMap<String, String>,
}

impl KeySet {
    /// Parses a JWKS document. Individual bad keys are refused (and remembered), not fatal.
    pub fn from_jwks_json(bytes: &[u8], allowed: &[Alg]) -> Result<KeySet, String> {
        let doc: Value =
            serde_json::from_slice(bytes).map_err(|e| format!("JWKS is not JSON: {e}"))?;
        let keys = doc
            .get("keys")
            .and_then(Value::as_array)
            .ok_or("JWKS has no `keys` array")?;
        let mut set = KeySet {
            loaded: true,
            ..KeySet::default()
        };
        for (i, raw) in keys.iter().enumerate() {
            let kid = raw.get("kid").and_then(Value::as_str).map(str::to_owned);
            let label = kid.clone().unwrap_or_else(|| format!("#{i}"));
            match build_key(raw, kid.clone(), allowed) {
                Ok(key) => {
                    let key = Arc::new(key);
                    if let Some(kid) = kid {
                        set.by_kid.insert(kid, key.clone());
                    }
                    set.all.push(key);
                }
                Err(reason) => {
                    tracing::warn!(kid = %label, %reason, "JWKS key refused");
                    set.refused.insert(label, reason);
                }
            }
        }
        Ok(set)
    }

    /// Verifies `jws` against the key its header names; no I/O.
    pub fn verify(&self, jws: &CompactJws<'_>) -> Result<(), KeyError> {
        let key = self.find(jws.kid.as_deref(), jws.alg)?;
        let verifier = key.verifier(jws.alg).ok_or(KeyError::WrongAlg {
            kid: key.kid.clone().unwrap_or_default(),
            alg: jws.alg,
        })?;
        if verifier.verify(jws.signing_input, &jws.signature) {
            Ok(())
        } else {
            Err(KeyError::BadSignature)
        }
    }

    fn find(&self, kid: Option<&str>, alg: Alg) -> Result<Arc<Key>, KeyError> {
        match kid {
            Some(kid) => {
                if let Some(key) = self.by_kid.get(kid) {
                    return match key.verifier(alg) {
                        Some(_) => Ok(key.clone()),
                        None => Err(KeyError::WrongAlg {
                            kid: crate::outbound::excerpt(kid),
                            alg,
                        }),
                    };
                }
                match self.refused.get(kid) {
                    Some(reason) => Err(KeyError::Refused {
                        kid: crate::outbound::excerpt(kid),
                        reason: reason.clone(),
                    }),
                    None => Err(KeyError::UnknownKid {
                        kid: crate::outbound::excerpt(kid),
                        refetch: "in the cached keys".into(),
                    }),
                }
            }
            None => {
                let mut fits = self.all.iter().filter(|k| k.verifier(alg).is_some());
                match (fits.next(), fits.next()) {
                    (Some(key), None) => Ok(key.clone()),
                    _ => Err(KeyError::Ambiguous(alg)),
                }
            }
        }
    }
}

fn build_key(raw: &Value, kid: Option<String>, allowed: &[Alg]) -> Result<Key, String> {
    let map = raw.as_object().ok_or("not a JSON object")?.clone();
    let jwk = Jwk::from_map(map).map_err(|e| e.to_string())?;
    if let Some(u) = jwk.key_use() {
        if u != "sig" {
            return Err(format!("`use` is `{u}`, not `sig`"));
        }
    }
    if jwk.key_type() == "RSA" {
        let bits = rsa_modulus_bits(&jwk).ok_or("RSA key without a valid modulus `n`")?;
        if bits < MIN_RSA_BITS {
            return Err(format!(
                "RSA key of {bits} bits is below the {MIN_RSA_BITS}-bit minimum"
            ));
        }
    }
    let mut verifiers = Vec::new();
    for &alg in allowed {
        let (kty, crv) = alg.key_type();
        if jwk.key_type() != kty || crv.is_some_and(|c| jwk.curve() != Some(c)) {
            continue;
        }
        if jwk.algorithm().is_some_and(|a| a != alg.name()) {
            continue;
        }
        // josekit's checks of the JWK (`key_ops`, sizes) run for every algorithm; its verifier is
        // kept only where no pre-hashed one exists.
        let jose = verifier_for(alg, &jwk).map_err(|e| format!("not a valid {alg} key: {e}"))?;
        let verifier = match alg {
            Alg::EdDSA => Verifier::Jose(jose),
            _ => Verifier::Digest(
                digest_verifier(alg, &jwk).map_err(|e| format!("not a valid {alg} key: {e}"))?,
            ),
        };
        verifiers.push((alg, verifier));
    }
    if verifiers.is_empty() {
        return Err(format!(
            "no allowed algorithm ({}) fits a `{}` key{}",
            allowed
                .iter()
                .map(|a| a.name())
                .collect::<Vec<_>>()
                .join(", "),
            jwk.key_type(),
            jwk.algorithm()
                .map(|a| format!(" with alg `{a}`"))
                .unwrap_or_default()
        ));
    }
    Ok(Key { kid, verifiers })
}

/// The pre-hashed verifier of `jwk` (already checked by josekit) for `alg`.
fn digest_verifier(alg: Alg, jwk: &Jwk) -> Result<DigestVerifier, String> {
    let member = |name: &str| member_bytes(jwk, name);
    let built = match alg.key_type().0 {
        "RSA" => DigestVerifier::rsa(alg, &member("n")?, &member("e")?),
        _ => DigestVerifier::ec(alg, &member("x")?, &member("y")?),
    };
    built.map_err(|e| e.to_string())
}

/// A base64url member of `jwk` (a key's `n`, `e`, `x`, `y`), decoded.
fn member_bytes(jwk: &Jwk, name: &str) -> Result<Vec<u8>, String> {
    use base64::Engine;
    let text = jwk
        .parameter(name)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("no `{name}`"))?;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text)
        .map_err(|e| format!("`{name}` is not base64url: {e}"))
}

fn rsa_modulus_bits(jwk: &Jwk) -> Option<usize> {
    let bytes = member_bytes(jwk, "n").ok()?;
    let first = bytes.iter().position(|b| *b != 0)?;
    let lead = bytes[first];
    Some((bytes.len() - first - 1) * 8 + (8 - lead.leading_zeros() as usize))
}

fn verifier_for(alg: Alg, jwk: &Jwk) -> Result<Box<dyn JwsVerifier>, josekit::JoseError> {
    use josekit::jws;
    Ok(match alg {
        Alg::RS256 => Box::new(jws::RS256.verifier_from_jwk(jwk)?),
        Alg::RS384 => Box::new(jws::RS384.verifier_from_jwk(jwk)?),
        Alg::RS512 => Box::new(jws::RS512.verifier_from_jwk(jwk)?),
        Alg::PS256 => Box::new(jws::PS256.verifier_from_jwk(jwk)?),
        Alg::PS384 => Box::new(jws::PS384.verifier_from_jwk(jwk)?),
        Alg::PS512 => Box::new(jws::PS512.verifier_from_jwk(jwk)?),
        Alg::ES256 => Box::new(jws::ES256.verifier_from_jwk(jwk)?),
        Alg::ES384 => Box::new(jws::ES384.verifier_from_jwk(jwk)?),
        Alg::ES512 => Box::new(jws::ES512.verifier_from_jwk(jwk)?),
        Alg::EdDSA => Box::new(jws::EdDSA.verifier_from_jwk(jwk)?),
    })
}

/// Timing knobs for a [`KeyStore`].
#[derive(Debug, Clone)]
pub struct KeyStoreSettings {
    /// Least time between two fetches for the same unknown `kid` (an attacker repeating one kid
    /// costs one fetch per interval).
    pub min_refetch: Duration,
    /// Least time between any fetch and one for an unknown `kid`: a `kid` never asked about gets
    /// its refetch once this has passed since the last fetch of any kind — also the start-up
    /// load, so a key published just after it is found.
    pub refetch_floor: Duration,
    /// Time between background refreshes once keys are loaded.
    pub refresh_interval: Duration,
    /// Time between retries while keys have never loaded.
    pub retry_interval: Duration,
}

/// The cached keys of one transmitter.
pub struct KeyStore {
    name: String,
    issuer: String,
    source: KeySource,
    allowed: Vec<Alg>,
    client: reqwest::Client,
    settings: KeyStoreSettings,
    keys: RwLock<Arc<KeySet>>,
    /// Serializes fetches and remembers when the last one started (the refetch floor).
    fetch_gate: tokio::sync::Mutex<Option<Instant>>,
    /// The unknown `kid`s a fetch was made for lately, and when (the rate limit per kid).
    asked_kids: std::sync::Mutex<std::collections::VecDeque<(String, Instant)>>,
    last_error: RwLock<Option<String>>,
    /// `critical_subject_members` learnt from the metadata (SSF §3.6), when discovery is used.
    discovered_critical: RwLock<Vec<String>>,
}

impl KeyStore {
    pub fn new(
        name: &str,
        issuer: &str,
        source: KeySource,
        allowed: Vec<Alg>,
        client: reqwest::Client,
        settings: KeyStoreSettings,
    ) -> KeyStore {
        KeyStore {
            name: name.to_owned(),
            issuer: issuer.to_owned(),
            source,
            allowed,
            client,
            settings,
            keys: RwLock::new(Arc::new(KeySet::default())),
            fetch_gate: tokio::sync::Mutex::new(None),
            asked_kids: std::sync::Mutex::new(std::collections::VecDeque::new()),
            last_error: RwLock::new(None),
            discovered_critical: RwLock::new(Vec::new()),
        }
    }

    /// Whether a JWKS has been loaded at least once.
    pub fn is_loaded(&self) -> bool {
        self.snapshot().loaded
    }

    /// `critical_subject_members` from the transmitter's metadata (empty without discovery).
    pub fn discovered_critical_members(&self) -> Vec<String> {
        self.discovered_critical
            .read()
            .map(|g| g.clone())
            .unwrap_or_default()
    }

    fn snapshot(&self) -> Arc<KeySet> {
        match self.keys.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Verifies the signature of `jws`. A miss on the cache triggers at most one refetch: for a
    /// `kid` not asked about lately, once [`KeyStoreSettings::refetch_floor`] has passed since
    /// the last fetch; for one asked about, once `min_refetch` has. An unknown `kid`'s error says
    /// whether the keys were fetched again for it.
    pub async fn verify(&self, jws: &CompactJws<'_>) -> Result<(), KeyError> {
        let first = self.snapshot();
        match first.verify(jws) {
            // A known key answers without the network: a refetch cannot change the verdict.
            Ok(()) => return Ok(()),
            Err(
                e @ (KeyError::BadSignature | KeyError::WrongAlg { .. } | KeyError::Refused { .. }),
            ) if first.loaded => return Err(e),
            Err(_) => {}
        }
        let note = match jws.kid.as_deref() {
            Some(kid) if first.loaded => self.refetch_for_kid(kid).await,
            _ => {
                self.refetch(false).await;
                "after a refetch".to_owned()
            }
        };
        let second = self.snapshot();
        if !second.loaded {
            let why = self
                .last_error
                .read()
                .ok()
                .and_then(|g| g.clone())
                .unwrap_or_else(|| "not fetched yet".into());
            return Err(KeyError::Unavailable(why));
        }
        second.verify(jws).map_err(|e| match e {
            KeyError::UnknownKid { kid, .. } => KeyError::UnknownKid { kid, refetch: note },
            other => other,
        })
    }

    /// Unknown `kid`s remembered for the per-kid rate limit.
    const ASKED_KIDS: usize = 64;

    /// Fetches the JWKS again for an unknown `kid`, unless the last fetch is within the floor or
    /// this kid was fetched for within `min_refetch`; answers what happened, for its error.
    async fn refetch_for_kid(&self, kid: &str) -> String {
        let before = self.snapshot();
        let mut last = self.fetch_gate.lock().await;
        if !Arc::ptr_eq(&before, &self.snapshot()) {
            return "the keys were fetched again just now".into();
        }
        if let Some(ago) = last.map(|t| t.elapsed()) {
            if ago < self.settings.refetch_floor {
                return format!(
                    "not fetched again: the keys were fetched {} ms ago, within the {} s floor \
                     (jwks.refetch_floor_secs); retry shortly",
                    ago.as_millis(),
                    self.settings.refetch_floor.as_secs()
                );
            }
        }
        {
            let mut asked = self.asked_kids.lock().unwrap_or_else(|p| p.into_inner());
            asked.retain(|(_, at)| at.elapsed() < self.settings.min_refetch);
            if let Some((_, at)) = asked.iter().find(|(k, _)| k == kid) {
                return format!(
                    "not fetched again: the keys were fetched for this kid {} s ago \
                     (jwks.min_refetch_interval_secs: {})",
                    at.elapsed().as_secs(),
                    self.settings.min_refetch.as_secs()
                );
            }
            if asked.len() >= Self::ASKED_KIDS {
                asked.pop_front();
            }
            asked.push_back((kid.to_owned(), Instant::now()));
        }
        *last = Some(Instant::now());
        self.load().await;
        match self.last_error.read().ok().and_then(|e| e.clone()) {
            Some(why) => format!("fetching the keys again failed: {why}"),
            None => "the keys were fetched again".into(),
        }
    }

    /// Fetches the JWKS unless one was fetched less than `min_refetch` ago (`force` skips the limit).
    /// Concurrent callers wait for the fetch in flight instead of starting their own.
    pub async fn refetch(&self, force: bool) {
        let before = self.snapshot();
        let mut last = self.fetch_gate.lock().await;
        if !Arc::ptr_eq(&before, &self.snapshot()) {
            return; // someone else refreshed while we waited
        }
        if !force && last.is_some_and(|t| t.elapsed() < self.settings.min_refetch) {
            return;
        }
        *last = Some(Instant::now());
        self.load().await;
    }

    /// One fetch, its keys swapped in (or its error kept, the cached keys staying).
    async fn load(&self) {
        match self.fetch().await {
            Ok(set) => {
                let n = set.all.len();
                if let Ok(mut g) = self.keys.write() {
                    *g = Arc::new(set);
                }
                if let Ok(mut e) = self.last_error.write() {
                    *e = None;
                }
                metrics::counter!(crate::telemetry::JWKS_FETCHES, "transmitter" => self.name.clone(), "outcome" => "ok").increment(1);
                tracing::info!(transmitter = %self.name, keys = n, "JWKS loaded");
            }
            Err(reason) => {
                metrics::counter!(crate::telemetry::JWKS_FETCHES, "transmitter" => self.name.clone(), "outcome" => "error").increment(1);
                if self.is_loaded() {
                    tracing::warn!(transmitter = %self.name, %reason, "JWKS fetch failed; keeping the cached keys");
                } else {
                    tracing::warn!(transmitter = %self.name, %reason,
                        "JWKS fetch failed; no keys yet (pushes are answered 503 until they load)");
                }
                if let Ok(mut e) = self.last_error.write() {
                    *e = Some(reason);
                }
            }
        }
    }

    async fn fetch(&self) -> Result<KeySet, String> {
        let jwks_uri = match &self.source {
            KeySource::JwksUri(u) => u.clone(),
            KeySource::Discovery => {
                let meta = discovery::fetch_metadata(&self.client, &self.issuer)
                    .await
                    .map_err(|e| e.to_string())?;
                if let Ok(mut g) = self.discovered_critical.write() {
                    *g = meta.critical_subject_members.clone();
                }
                let uri = meta.jwks_uri.unwrap_or_default();
                // The metadata is the transmitter's word, so its `jwks_uri` gets the rule a
                // configured one gets: https, or the issuer's own (loopback development) origin.
                if crate::outbound::same_origin(&uri, &self.issuer).is_err() {
                    crate::outbound::Destinations::default()
                        .check_url(&uri)
                        .map_err(|e| format!("jwks_uri from the metadata: {e}"))?;
                }
                uri
            }
        };
        let resp = self
            .client
            .get(&jwks_uri)
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| format!("{jwks_uri}: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("{jwks_uri}: HTTP {}", resp.status()));
        }
        // Capped while it streams: a slow endless body cannot grow memory.
        let body = crate::outbound::read_capped(resp, MAX_JWKS_BYTES)
            .await
            .map_err(|e| format!("{jwks_uri}: {e}"))?;
        KeySet::from_jwks_json(&body, &self.allowed).map_err(|e| format!("{jwks_uri}: {e}"))
    }

    /// Keeps the keys fresh until `shutdown` fires: retries quickly until the first load succeeds,
    /// then refreshes every `refresh_interval`.
    pub async fn run_refresh(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        loop {
            self.refetch(true).await;
            let wait = if self.is_loaded() {
                self.settings.refresh_interval
            } else {
                self.settings.retry_interval
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn jwks_of(keys: &[Jwk]) -> Vec<u8> {
        let keys: Vec<Value> = keys
            .iter()
            .map(|k| Value::Object(k.as_ref().clone()))
            .collect();
        serde_json::to_vec(&json!({ "keys": keys })).unwrap()
    }

    fn public(jwk: Jwk, kid: &str) -> Jwk {
        let mut public = jwk.to_public_key().unwrap();
        public.set_key_id(kid);
        public
    }

    #[test]
    fn refuses_small_rsa_keys_and_remembers_why() {
        let small = public(Jwk::generate_rsa_key(1024).unwrap(), "small");
        let big = public(Jwk::generate_rsa_key(2048).unwrap(), "big");
        let set = KeySet::from_jwks_json(&jwks_of(&[small, big]), &[Alg::RS256]).unwrap();
        assert!(set.find(Some("big"), Alg::RS256).is_ok());
        match set.find(Some("small"), Alg::RS256) {
            Err(KeyError::Refused { reason, .. }) => assert!(reason.contains("1024 bits")),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            set.find(Some("nope"), Alg::RS256).err(),
            Some(KeyError::UnknownKid {
                kid: "nope".into(),
                refetch: "in the cached keys".into()
            })
        );
    }

    #[test]
    fn keys_only_serve_algorithms_that_fit_them() {
        let ec = public(
            Jwk::generate_ec_key(josekit::jwk::alg::ec::EcCurve::P256).unwrap(),
            "ec",
        );
        let rsa = public(Jwk::generate_rsa_key(2048).unwrap(), "rsa");
        let set = KeySet::from_jwks_json(&jwks_of(&[ec, rsa]), &[Alg::RS256, Alg::ES256]).unwrap();
        assert!(set.find(Some("ec"), Alg::ES256).is_ok());
        assert!(matches!(
            set.find(Some("ec"), Alg::RS256),
            Err(KeyError::WrongAlg { .. })
        ));
        assert!(set.find(Some("rsa"), Alg::RS256).is_ok());
        // Without a kid, exactly one candidate per algorithm is required.
        assert!(set.find(None, Alg::ES256).is_ok());
    }

    #[test]
    fn rsa_modulus_bits_counts_exactly() {
        for bits in [2048u32, 3072] {
            let jwk = Jwk::generate_rsa_key(bits).unwrap();
            assert_eq!(rsa_modulus_bits(&jwk), Some(bits as usize));
        }
    }

    #[test]
    fn malformed_jwks_documents() {
        assert!(KeySet::from_jwks_json(b"nope", &[Alg::RS256]).is_err());
        assert!(KeySet::from_jwks_json(b"{}", &[Alg::RS256]).is_err());
        let set =
            KeySet::from_jwks_json(br#"{"keys":[{"kty":"RSA","kid":"x"}, 5]}"#, &[Alg::RS256])
                .unwrap();
        assert!(set.all.is_empty());
        assert!(matches!(
            set.find(Some("x"), Alg::RS256),
            Err(KeyError::Refused { .. })
        ));
    }
}
