//! The simulators' own JOSE: the simulated transmitters sign SETs, and the simulated enforcement
//! points verify Vigil's, with `jsonwebtoken` on ring. Vigil signs and verifies with josekit on
//! OpenSSL; the two sides share no JOSE code, so a bug in Vigil's (a wrong signature encoding, a
//! header it should refuse) cannot pass on both sides of a test. Keys are generated with OpenSSL —
//! generation is not JOSE — and their public JWKs are written here from the raw key material.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Validation};
use openssl::bn::{BigNum, BigNumContext};
use openssl::ec::{EcGroup, EcKey};
use openssl::nid::Nid;
use openssl::pkey::PKey;
use openssl::rsa::Rsa;
use serde_json::{json, Value};

use crate::jose::Alg;

/// What a simulator's signing can fail with.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("key generation: {0}")]
    Key(#[from] openssl::error::ErrorStack),
    #[error("JWS: {0}")]
    Jws(#[from] jsonwebtoken::errors::Error),
    #[error("`{0}` is not an algorithm the simulators sign with")]
    Unsupported(&'static str),
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// A transmitter's private signing key with its `kid`.
pub struct SigningKey {
    pub alg: Alg,
    pub kid: String,
    algorithm: Algorithm,
    private: EncodingKey,
    /// The public JWK without `kid`, `alg` and `use`.
    public: serde_json::Map<String, Value>,
    /// The private key, PKCS#8 PEM, for [`SigningKey::save`].
    pem: Vec<u8>,
}

/// An EC algorithm's curve: OpenSSL's name, the JWK's, the coordinates' size and the algorithm.
fn curve(alg: Alg) -> (Nid, &'static str, usize, Algorithm) {
    if alg == Alg::ES384 {
        (Nid::SECP384R1, "P-384", 48, Algorithm::ES384)
    } else {
        (Nid::X9_62_PRIME256V1, "P-256", 32, Algorithm::ES256)
    }
}

fn b64(bytes: &[u8]) -> Value {
    Value::from(URL_SAFE_NO_PAD.encode(bytes))
}

/// An EC coordinate as the JWK wants it: big-endian, left-padded to the curve's size.
fn coordinate(n: &BigNum, size: usize) -> Result<Value, SimError> {
    Ok(b64(
        &n.to_vec_padded(i32::try_from(size).unwrap_or(i32::MAX))?
    ))
}

impl SigningKey {
    /// Generates a fresh key for `alg` (RSA keys are 2048 bits). RS256/384/512, PS256/384/512,
    /// ES256/384 and EdDSA (Ed25519).
    pub fn generate(alg: Alg, kid: &str) -> Result<SigningKey, SimError> {
        let key = match alg {
            Alg::RS256 | Alg::RS384 | Alg::RS512 | Alg::PS256 | Alg::PS384 | Alg::PS512 => {
                PKey::from_rsa(Rsa::generate(2048)?)?
            }
            Alg::ES256 | Alg::ES384 => {
                let group = EcGroup::from_curve_name(curve(alg).0)?;
                PKey::from_ec_key(EcKey::generate(&group)?)?
            }
            Alg::EdDSA => PKey::generate_ed25519()?,
            Alg::ES512 => return Err(SimError::Unsupported("ES512")),
        };
        SigningKey::from_private(alg, kid, &key)
    }

    /// Loads a key saved by [`SigningKey::save`], or generates and saves one.
    pub fn load_or_generate(
        path: &std::path::Path,
        alg: Alg,
        kid: &str,
    ) -> Result<SigningKey, SimError> {
        if let Ok(pem) = std::fs::read(path) {
            if let Ok(key) = PKey::private_key_from_pem(&pem) {
                if let Ok(key) = SigningKey::from_private(alg, kid, &key) {
                    return Ok(key);
                }
            }
        }
        let key = SigningKey::generate(alg, kid)?;
        key.save(path)?;
        Ok(key)
    }

    /// Writes the private key to `path` (PKCS#8 PEM, readable by its owner only).
    pub fn save(&self, path: &std::path::Path) -> Result<(), SimError> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)?
            .write_all(&self.pem)?;
        Ok(())
    }

    fn from_private(
        alg: Alg,
        kid: &str,
        key: &PKey<openssl::pkey::Private>,
    ) -> Result<SigningKey, SimError> {
        let (algorithm, private, public) = match alg {
            Alg::RS256 | Alg::RS384 | Alg::RS512 | Alg::PS256 | Alg::PS384 | Alg::PS512 => {
                let rsa = key.rsa()?;
                let public =
                    json!({"kty": "RSA", "n": b64(&rsa.n().to_vec()), "e": b64(&rsa.e().to_vec())});
                let algorithm = match alg {
                    Alg::RS256 => Algorithm::RS256,
                    Alg::RS384 => Algorithm::RS384,
                    Alg::RS512 => Algorithm::RS512,
                    Alg::PS256 => Algorithm::PS256,
                    Alg::PS384 => Algorithm::PS384,
                    _ => Algorithm::PS512,
                };
                (
                    algorithm,
                    EncodingKey::from_rsa_der(&rsa.private_key_to_der()?),
                    public,
                )
            }
            Alg::ES256 | Alg::ES384 => {
                let (nid, crv, size, algorithm) = curve(alg);
                let group = EcGroup::from_curve_name(nid)?;
                let ec = key.ec_key()?;
                let (mut x, mut y) = (BigNum::new()?, BigNum::new()?);
                let mut ctx = BigNumContext::new()?;
                ec.public_key()
                    .affine_coordinates(&group, &mut x, &mut y, &mut ctx)?;
                let public = json!({"kty": "EC", "crv": crv,
                    "x": coordinate(&x, size)?, "y": coordinate(&y, size)?});
                (
                    algorithm,
                    EncodingKey::from_ec_der(&key.private_key_to_pkcs8()?),
                    public,
                )
            }
            Alg::EdDSA => {
                let public =
                    json!({"kty": "OKP", "crv": "Ed25519", "x": b64(&key.raw_public_key()?)});
                (
                    Algorithm::EdDSA,
                    EncodingKey::from_ed_der(&key.private_key_to_pkcs8()?),
                    public,
                )
            }
            Alg::ES512 => return Err(SimError::Unsupported("ES512")),
        };
        let Value::Object(public) = public else {
            return Err(SimError::Unsupported("a public key that is not an object"));
        };
        Ok(SigningKey {
            alg,
            kid: kid.to_owned(),
            algorithm,
            private,
            public,
            pem: key.private_key_to_pem_pkcs8()?,
        })
    }

    /// The public JWK (with `kid`, `alg` and `use: sig`) to publish in a JWKS.
    pub fn public_jwk(&self) -> Result<Value, SimError> {
        let mut jwk = self.public.clone();
        jwk.insert("kid".into(), Value::from(self.kid.as_str()));
        jwk.insert("alg".into(), Value::from(self.alg.name()));
        jwk.insert("use".into(), Value::from("sig"));
        Ok(Value::Object(jwk))
    }

    /// Signs `claims` as a SET: JOSE header `{"typ":"secevent+jwt","alg":…,"kid":…}` (SSF §4.1.1).
    pub fn sign_set(&self, claims: &Value) -> Result<String, SimError> {
        let header = json!({"typ": "secevent+jwt", "alg": self.alg.name(), "kid": self.kid});
        self.sign_raw(&header, &serde_json::to_vec(claims)?)
    }

    /// Signs an arbitrary header and payload with this key's algorithm, whatever the header says
    /// (for negative tests).
    pub fn sign_raw(&self, header: &Value, payload: &[u8]) -> Result<String, SimError> {
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(header)?),
            URL_SAFE_NO_PAD.encode(payload)
        );
        let signature =
            jsonwebtoken::crypto::sign(signing_input.as_bytes(), &self.private, self.algorithm)?;
        Ok(format!("{signing_input}.{signature}"))
    }
}

/// A JWKS document from public JWKs.
pub fn jwks_document(keys: &[Value]) -> Value {
    json!({ "keys": keys })
}

/// A transmitter's published keys, as a receiver holds them.
pub struct PublishedKeys(JwkSet);

impl PublishedKeys {
    /// Parses a JWKS document.
    pub fn from_jwks_json(bytes: &[u8]) -> Result<PublishedKeys, String> {
        serde_json::from_slice(bytes)
            .map(PublishedKeys)
            .map_err(|e| format!("JWKS: {e}"))
    }

    /// Verifies `token`'s signature only: typ `secevent+jwt`, RS256, ES256 or EdDSA, by the key its
    /// `kid` names. Returns its claims.
    pub fn verify(&self, token: &str) -> Result<Value, String> {
        self.decode(token, None)
    }

    /// Verifies `token` as a SET from `issuer` for `audience`, the way an SSF receiver does: its
    /// signature ([`PublishedKeys::verify`]), `iss` and `aud`, a `jti`, an `iat` and exactly one
    /// event. Returns its claims.
    pub fn verify_set(&self, token: &str, issuer: &str, audience: &str) -> Result<Value, String> {
        let claims = self.decode(token, Some((issuer, audience)))?;
        if !claims["jti"].is_string() || !claims["iat"].is_number() {
            return Err("a SET needs a jti and an iat".into());
        }
        if claims["events"].as_object().map(|e| e.len()) != Some(1) {
            return Err("a SET from Vigil carries exactly one event".into());
        }
        Ok(claims)
    }

    fn decode(&self, token: &str, expect: Option<(&str, &str)>) -> Result<Value, String> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| format!("header: {e}"))?;
        if header.typ.as_deref() != Some("secevent+jwt") {
            return Err(format!("typ {:?} is not secevent+jwt", header.typ));
        }
        if !matches!(
            header.alg,
            Algorithm::RS256 | Algorithm::ES256 | Algorithm::EdDSA
        ) {
            return Err(format!("alg {:?} is not RS256, ES256 or EdDSA", header.alg));
        }
        let kid = header.kid.ok_or("no kid")?;
        let jwk = self.0.find(&kid).ok_or_else(|| format!("no key {kid}"))?;
        let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("key {kid}: {e}"))?;
        let mut validation = Validation::new(header.alg);
        validation.validate_exp = false;
        match expect {
            Some((issuer, audience)) => {
                validation.required_spec_claims = ["iss", "aud"].map(str::to_owned).into();
                validation.set_issuer(&[issuer]);
                validation.set_audience(&[audience]);
            }
            None => {
                validation.required_spec_claims.clear();
                validation.validate_aud = false;
            }
        }
        jsonwebtoken::decode::<Value>(token, &key, &validation)
            .map(|t| t.claims)
            .map_err(|e| format!("SET: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every algorithm signs, and what RS256, ES256 and EdDSA sign verifies against the published key;
    /// a token altered, from another issuer or for another audience does not.
    #[test]
    fn signs_and_verifies_sets() {
        let dir = tempfile::tempdir().unwrap();
        for alg in [Alg::RS256, Alg::ES256, Alg::PS256, Alg::ES384, Alg::EdDSA] {
            let key = SigningKey::generate(alg, "k").unwrap();
            assert_eq!(key.sign_set(&json!({})).unwrap().split('.').count(), 3);
            // Saved and loaded back: the same key.
            let path = dir.path().join(format!("{}.pem", alg.name()));
            let saved = SigningKey::load_or_generate(&path, alg, "k").unwrap();
            let loaded = SigningKey::load_or_generate(&path, alg, "k").unwrap();
            assert_eq!(saved.public_jwk().unwrap(), loaded.public_jwk().unwrap());
        }
        for alg in [Alg::RS256, Alg::ES256, Alg::EdDSA] {
            let key = SigningKey::generate(alg, "k1").unwrap();
            let jwks = jwks_document(&[key.public_jwk().unwrap()]);
            let keys = PublishedKeys::from_jwks_json(jwks.to_string().as_bytes()).unwrap();
            let set = json!({"iss": "https://v/", "aud": "ep", "jti": "j", "iat": 1,
                "events": {"https://schemas.openid.net/secevent/caep/event-type/session-revoked": {}}});
            let token = key.sign_set(&set).unwrap();
            assert_eq!(keys.verify_set(&token, "https://v/", "ep").unwrap(), set);
            assert!(keys.verify_set(&token, "https://w/", "ep").is_err());
            assert!(keys.verify_set(&token, "https://v/", "other").is_err());
            let mut tampered = token.clone();
            tampered.insert_str(token.find('.').unwrap() + 1, "e30");
            assert!(keys.verify_set(&tampered, "https://v/", "ep").is_err());
            let other = SigningKey::generate(alg, "k1").unwrap();
            let forged = other.sign_set(&set).unwrap();
            assert!(keys.verify_set(&forged, "https://v/", "ep").is_err());
        }
    }
}
