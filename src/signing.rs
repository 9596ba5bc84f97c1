//! Vigil's signing keys: generate private JWKs and sign SETs with them, as an SSF transmitter does
//! (SSF §4.1.1 header: `typ: secevent+jwt`, `alg`, `kid`), for the SETs Vigil emits to enforcement
//! points (`transmitter/identity.rs` persists and rotates them). The simulators and tests sign with
//! their own JOSE (`sim::jose`), never with this.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use josekit::jwk::Jwk;
use josekit::jws::JwsSigner;
use serde_json::{json, Value};

use crate::jose::Alg;

/// Why a key could not be made or used.
#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    #[error("key error: {0}")]
    Key(#[from] josekit::JoseError),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("JSON error: {0}")]
    Json(#[from] serde_json::Error),
    #[error("a {0} key is not read from PEM (RS, PS, ES256 and ES384 are)")]
    NoPem(&'static str),
}

/// A transmitter's private signing key.
pub struct SigningKey {
    pub alg: Alg,
    pub kid: String,
    private: Jwk,
    signer: Box<dyn JwsSigner>,
}

impl SigningKey {
    /// Generates a fresh key for `alg` (RSA keys are 2048 bits).
    pub fn generate(alg: Alg, kid: &str) -> Result<SigningKey, SigningError> {
        use josekit::jwk::alg::{ec::EcCurve, ed::EdCurve};
        let jwk = match alg {
            Alg::RS256 | Alg::RS384 | Alg::RS512 | Alg::PS256 | Alg::PS384 | Alg::PS512 => {
                Jwk::generate_rsa_key(2048)?
            }
            Alg::ES256 => Jwk::generate_ec_key(EcCurve::P256)?,
            Alg::ES384 => Jwk::generate_ec_key(EcCurve::P384)?,
            Alg::ES512 => Jwk::generate_ec_key(EcCurve::P521)?,
            Alg::EdDSA => Jwk::generate_ed_key(EdCurve::Ed25519)?,
        };
        SigningKey::from_private_jwk(alg, kid, jwk)
    }

    /// Wraps an existing private JWK.
    pub fn from_private_jwk(alg: Alg, kid: &str, mut jwk: Jwk) -> Result<SigningKey, SigningError> {
        use josekit::jws;
        jwk.set_key_id(kid);
        let signer: Box<dyn JwsSigner> = match alg {
            Alg::RS256 => Box::new(jws::RS256.signer_from_jwk(&jwk)?),
            Alg::RS384 => Box::new(jws::RS384.signer_from_jwk(&jwk)?),
            Alg::RS512 => Box::new(jws::RS512.signer_from_jwk(&jwk)?),
            Alg::PS256 => Box::new(jws::PS256.signer_from_jwk(&jwk)?),
            Alg::PS384 => Box::new(jws::PS384.signer_from_jwk(&jwk)?),
            Alg::PS512 => Box::new(jws::PS512.signer_from_jwk(&jwk)?),
            Alg::ES256 => Box::new(jws::ES256.signer_from_jwk(&jwk)?),
            Alg::ES384 => Box::new(jws::ES384.signer_from_jwk(&jwk)?),
            Alg::ES512 => Box::new(jws::ES512.signer_from_jwk(&jwk)?),
            Alg::EdDSA => Box::new(jws::EdDSA.signer_from_jwk(&jwk)?),
        };
        Ok(SigningKey {
            alg,
            kid: kid.to_owned(),
            private: jwk,
            signer,
        })
    }

    /// Reads a private key in PEM (PKCS#8, or PKCS#1 / SEC 1) for `alg`: an RSA key for the RS
    /// and PS algorithms, an EC key of the algorithm's curve for ES256 / ES384.
    pub fn from_pem(alg: Alg, kid: &str, pem: &[u8]) -> Result<SigningKey, SigningError> {
        use josekit::jwk::alg::{ec::EcCurve, ec::EcKeyPair, rsa::RsaKeyPair};
        let jwk = match alg {
            Alg::RS256 | Alg::RS384 | Alg::RS512 | Alg::PS256 | Alg::PS384 | Alg::PS512 => {
                RsaKeyPair::from_pem(pem)?.to_jwk_key_pair()
            }
            Alg::ES256 => EcKeyPair::from_pem(pem, Some(EcCurve::P256))?.to_jwk_key_pair(),
            Alg::ES384 => EcKeyPair::from_pem(pem, Some(EcCurve::P384))?.to_jwk_key_pair(),
            Alg::ES512 | Alg::EdDSA => return Err(SigningError::NoPem(alg.name())),
        };
        SigningKey::from_private_jwk(alg, kid, jwk)
    }

    /// Signs `claims` as a plain JWT (`{"typ":"JWT","alg":…,"kid":…}`): an OAuth client
    /// assertion (RFC 7523), not a SET.
    pub fn sign_jwt(&self, claims: &Value) -> Result<String, SigningError> {
        let header = json!({"typ": "JWT", "alg": self.alg.name(), "kid": self.kid});
        self.sign_raw(&header, &serde_json::to_vec(claims)?)
    }

    /// The private JWK's members, for persisting.
    pub fn private_jwk_map(&self) -> serde_json::Map<String, Value> {
        self.private.as_ref().clone()
    }

    /// The public JWK (with `kid`, `alg` and `use: sig`) to publish in a JWKS.
    pub fn public_jwk(&self) -> Result<Jwk, SigningError> {
        let mut public = self.private.to_public_key()?;
        public.set_key_id(&self.kid);
        public.set_algorithm(self.alg.name());
        public.set_key_use("sig");
        Ok(public)
    }

    /// Signs `claims` as a SET: JOSE header `{"typ":"secevent+jwt","alg":…,"kid":…}` (SSF §4.1.1).
    pub fn sign_set(&self, claims: &Value) -> Result<String, SigningError> {
        let header = json!({"typ": "secevent+jwt", "alg": self.alg.name(), "kid": self.kid});
        self.sign_raw(&header, &serde_json::to_vec(claims)?)
    }

    fn sign_raw(&self, header: &Value, payload: &[u8]) -> Result<String, SigningError> {
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(header)?),
            URL_SAFE_NO_PAD.encode(payload)
        );
        let signature = self.signer.sign(signing_input.as_bytes())?;
        Ok(format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature)
        ))
    }
}

/// A JWKS document from public keys.
pub fn jwks_document(keys: &[Jwk]) -> Value {
    let keys: Vec<Value> = keys
        .iter()
        .map(|k| Value::Object(k.as_ref().clone()))
        .collect();
    json!({ "keys": keys })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_algorithm_signs_and_publishes_a_key() {
        for alg in Alg::ALL {
            let key = SigningKey::generate(alg, "k").unwrap();
            let jwk = key.public_jwk().unwrap();
            assert_eq!(jwk.algorithm(), Some(alg.name()));
            assert!(
                jwk.parameter("d").is_none(),
                "public JWK must not carry the private part"
            );
            let token = key.sign_set(&json!({"iss": "x"})).unwrap();
            assert_eq!(token.split('.').count(), 3);
        }
    }
}
