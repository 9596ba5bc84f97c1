//! One public key, ready to check JWS signatures (RS*, PS*, ES*) thousands of times a second.
//!
//! Why not `openssl::sign::Verifier`, as josekit does: OpenSSL 3 looks the signature and digest
//! implementations up in its provider tables on every `EVP_DigestVerifyInit`, and a push profile
//! had that set-up at half the cost of the RSA-2048 verification itself (benches/RESULTS.md).
//! Here the digest comes from OpenSSL's SHA-2 functions (no look-up), and the public-key operation
//! runs on a context set up once — padding and digest chosen — and reused: `EVP_PKEY_verify` may be
//! called any number of times on one context with the same parameters. A context is used by one
//! verification at a time; idle ones wait in a small pool.
//!
//! EdDSA is not here: Ed25519 signs the message itself, not a digest of it, so there is no
//! pre-hashed form to verify (`jwks` keeps josekit's verifier for it).

use std::sync::{Mutex, PoisonError};

use openssl::bn::BigNum;
use openssl::ec::{EcGroup, EcKey};
use openssl::ecdsa::EcdsaSig;
use openssl::error::ErrorStack;
use openssl::md::{Md, MdRef};
use openssl::nid::Nid;
use openssl::pkey::{PKey, Public};
use openssl::pkey_ctx::PkeyCtx;
use openssl::rsa::{Padding, Rsa};
use openssl::sign::RsaPssSaltlen;

use crate::jose::Alg;

/// Most idle contexts a key keeps: one per verification running at once (the server's worker
/// threads), with room to spare; more are made when needed and dropped after.
const IDLE_CONTEXTS: usize = 8;

/// Why a key cannot be made into a verifier.
#[derive(Debug, thiserror::Error)]
pub enum VerifierError {
    #[error("{0} does not take this kind of key")]
    WrongKeyType(Alg),
    #[error("not a valid key: {0}")]
    Key(#[from] ErrorStack),
}

/// The digest a JWS algorithm signs.
#[derive(Debug, Clone, Copy)]
enum Hash {
    Sha256,
    Sha384,
    Sha512,
}

impl Hash {
    fn of(alg: Alg) -> Hash {
        match alg {
            // EdDSA never gets here (its key type is neither RSA nor EC).
            Alg::RS256 | Alg::PS256 | Alg::ES256 | Alg::EdDSA => Hash::Sha256,
            Alg::RS384 | Alg::PS384 | Alg::ES384 => Hash::Sha384,
            Alg::RS512 | Alg::PS512 | Alg::ES512 => Hash::Sha512,
        }
    }

    fn md(self) -> &'static MdRef {
        match self {
            Hash::Sha256 => Md::sha256(),
            Hash::Sha384 => Md::sha384(),
            Hash::Sha512 => Md::sha512(),
        }
    }

    /// The digest of `message`, in the first bytes of the buffer (how many: the second value).
    fn digest(self, message: &[u8]) -> ([u8; 64], usize) {
        let mut out = [0u8; 64];
        let len = match self {
            Hash::Sha256 => {
                let mut h = openssl::sha::Sha256::new();
                h.update(message);
                out[..32].copy_from_slice(&h.finish());
                32
            }
            Hash::Sha384 => {
                let mut h = openssl::sha::Sha384::new();
                h.update(message);
                out[..48].copy_from_slice(&h.finish());
                48
            }
            Hash::Sha512 => {
                let mut h = openssl::sha::Sha512::new();
                h.update(message);
                out.copy_from_slice(&h.finish());
                64
            }
        };
        (out, len)
    }
}

/// What a JWS signature of the key looks like on the wire.
#[derive(Debug, Clone, Copy)]
enum Shape {
    /// RS*, PS*: exactly as long as the modulus (RFC 8017 §8.1.2 and §8.2.2, step 1). OpenSSL
    /// takes a shorter one as the same integer, so a signature whose first byte is zero would
    /// also verify with that byte cut off; the length is checked here instead.
    Rsa { len: usize },
    /// ES*: `r ‖ s`, each `half` bytes (RFC 7518 §3.4).
    Ec { half: usize },
}

/// A public key and the algorithm it verifies.
pub struct DigestVerifier {
    alg: Alg,
    hash: Hash,
    key: PKey<Public>,
    shape: Shape,
    idle: Mutex<Vec<PkeyCtx<Public>>>,
}

impl std::fmt::Debug for DigestVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DigestVerifier")
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

impl DigestVerifier {
    /// An RS* or PS* verifier for the RSA key of modulus `n` and exponent `e` (big-endian).
    pub fn rsa(alg: Alg, n: &[u8], e: &[u8]) -> Result<DigestVerifier, VerifierError> {
        // An RSA key only ever verifies an RSA algorithm (see `jwks`' invariants).
        if alg.key_type().0 != "RSA" {
            return Err(VerifierError::WrongKeyType(alg));
        }
        let rsa = Rsa::from_public_components(BigNum::from_slice(n)?, BigNum::from_slice(e)?)?;
        let len = usize::try_from(rsa.size()).unwrap_or(usize::MAX);
        DigestVerifier::new(alg, PKey::from_rsa(rsa)?, Shape::Rsa { len })
    }

    /// An ES* verifier for the point (`x`, `y`) of the algorithm's curve; refused if the point is
    /// not on it.
    pub fn ec(alg: Alg, x: &[u8], y: &[u8]) -> Result<DigestVerifier, VerifierError> {
        let (nid, half) = match alg {
            Alg::ES256 => (Nid::X9_62_PRIME256V1, 32),
            Alg::ES384 => (Nid::SECP384R1, 48),
            Alg::ES512 => (Nid::SECP521R1, 66),
            other => return Err(VerifierError::WrongKeyType(other)),
        };
        let group = EcGroup::from_curve_name(nid)?;
        let (x, y) = (BigNum::from_slice(x)?, BigNum::from_slice(y)?);
        let key = EcKey::from_public_key_affine_coordinates(&group, &x, &y)?;
        key.check_key()?;
        DigestVerifier::new(alg, PKey::from_ec_key(key)?, Shape::Ec { half })
    }

    fn new(alg: Alg, key: PKey<Public>, shape: Shape) -> Result<DigestVerifier, VerifierError> {
        let verifier = DigestVerifier {
            alg,
            hash: Hash::of(alg),
            key,
            shape,
            idle: Mutex::new(Vec::new()),
        };
        // A key the algorithm cannot use fails here, at load, not at the first SET.
        let context = verifier.context()?;
        verifier.put_back(context);
        Ok(verifier)
    }

    /// A context set up for this key and algorithm.
    fn context(&self) -> Result<PkeyCtx<Public>, ErrorStack> {
        let mut ctx = PkeyCtx::new(&self.key)?;
        ctx.verify_init()?;
        let md = self.hash.md();
        match self.alg {
            Alg::RS256 | Alg::RS384 | Alg::RS512 => ctx.set_rsa_padding(Padding::PKCS1)?,
            Alg::PS256 | Alg::PS384 | Alg::PS512 => {
                // RFC 7518 §3.5: MGF1 with the same hash, a salt as long as the hash.
                ctx.set_rsa_padding(Padding::PKCS1_PSS)?;
                ctx.set_rsa_pss_saltlen(RsaPssSaltlen::DIGEST_LENGTH)?;
                ctx.set_rsa_mgf1_md(md)?;
            }
            _ => {}
        }
        ctx.set_signature_md(md)?;
        Ok(ctx)
    }

    fn put_back(&self, ctx: PkeyCtx<Public>) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < IDLE_CONTEXTS {
            idle.push(ctx);
        }
    }

    /// Whether `signature` is this key's signature of `message` under its algorithm.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        let der;
        let signature = match self.shape {
            Shape::Rsa { len } if signature.len() == len => signature,
            Shape::Rsa { .. } => return false,
            Shape::Ec { half } => match ecdsa_der(signature, half) {
                Some(d) => {
                    der = d;
                    &der[..]
                }
                None => return false,
            },
        };
        let (digest, len) = self.hash.digest(message);
        let taken = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let mut ctx = match taken {
            Some(ctx) => ctx,
            None => match self.context() {
                Ok(ctx) => ctx,
                Err(_) => return false,
            },
        };
        match ctx.verify(&digest[..len], signature) {
            Ok(true) => {
                self.put_back(ctx);
                true
            }
            // A context that saw a failure is not reused: whatever state the failure left in
            // it goes with it. Failures are rare, and cost no more than every call did before.
            _ => false,
        }
    }
}

/// A JWS ECDSA signature (`r ‖ s`, each `half` bytes) as the DER `ECDSA-Sig-Value` OpenSSL takes.
fn ecdsa_der(signature: &[u8], half: usize) -> Option<Vec<u8>> {
    if signature.len() != 2 * half {
        return None;
    }
    let (r, s) = signature.split_at(half);
    let sig =
        EcdsaSig::from_private_components(BigNum::from_slice(r).ok()?, BigNum::from_slice(s).ok()?)
            .ok()?;
    sig.to_der().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use josekit::jwk::Jwk;

    /// A key pair made by josekit, its signer and a [`DigestVerifier`] built from its public JWK —
    /// the way `jwks` builds them — so the two JOSE implementations check each other.
    fn pair(alg: Alg) -> (Box<dyn josekit::jws::JwsSigner>, DigestVerifier) {
        use base64::Engine;
        use josekit::jws;
        let b64 = |jwk: &Jwk, name: &str| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(jwk.parameter(name).unwrap().as_str().unwrap())
                .unwrap()
        };
        let (private, signer): (Jwk, Box<dyn josekit::jws::JwsSigner>) = match alg {
            Alg::RS256 | Alg::RS512 | Alg::PS256 | Alg::PS384 => {
                let jwk = Jwk::generate_rsa_key(2048).unwrap();
                let signer: Box<dyn josekit::jws::JwsSigner> = match alg {
                    Alg::RS256 => Box::new(jws::RS256.signer_from_jwk(&jwk).unwrap()),
                    Alg::RS512 => Box::new(jws::RS512.signer_from_jwk(&jwk).unwrap()),
                    Alg::PS256 => Box::new(jws::PS256.signer_from_jwk(&jwk).unwrap()),
                    _ => Box::new(jws::PS384.signer_from_jwk(&jwk).unwrap()),
                };
                (jwk, signer)
            }
            Alg::ES256 => {
                let jwk = Jwk::generate_ec_key(josekit::jwk::alg::ec::EcCurve::P256).unwrap();
                let signer = Box::new(jws::ES256.signer_from_jwk(&jwk).unwrap());
                (jwk, signer)
            }
            Alg::ES384 => {
                let jwk = Jwk::generate_ec_key(josekit::jwk::alg::ec::EcCurve::P384).unwrap();
                let signer = Box::new(jws::ES384.signer_from_jwk(&jwk).unwrap());
                (jwk, signer)
            }
            Alg::ES512 => {
                let jwk = Jwk::generate_ec_key(josekit::jwk::alg::ec::EcCurve::P521).unwrap();
                let signer = Box::new(jws::ES512.signer_from_jwk(&jwk).unwrap());
                (jwk, signer)
            }
            other => panic!("no pair for {other}"),
        };
        let verifier = match alg.key_type().0 {
            "RSA" => DigestVerifier::rsa(alg, &b64(&private, "n"), &b64(&private, "e")),
            _ => DigestVerifier::ec(alg, &b64(&private, "x"), &b64(&private, "y")),
        }
        .unwrap();
        (signer, verifier)
    }

    /// Every algorithm: josekit's signature verifies, again and again on the reused context, and
    /// from several threads at once; a changed message, a changed signature, a truncated one and
    /// one of another algorithm do not — and a good one still does after them.
    #[test]
    fn verifies_what_josekit_signs_and_nothing_else() {
        for alg in [
            Alg::RS256,
            Alg::RS512,
            Alg::PS256,
            Alg::PS384,
            Alg::ES256,
            Alg::ES384,
            Alg::ES512,
        ] {
            let (signer, verifier) = pair(alg);
            let message = b"eyJhbGciOiJSUzI1NiJ9.eyJqdGkiOiIxIn0";
            let signature = signer.sign(message).unwrap();
            for _ in 0..3 {
                assert!(verifier.verify(message, &signature), "{alg}");
            }
            std::thread::scope(|s| {
                for _ in 0..4 {
                    s.spawn(|| {
                        for _ in 0..20 {
                            assert!(verifier.verify(message, &signature), "{alg}");
                        }
                    });
                }
            });
            let idle = verifier.idle.lock().unwrap().len();
            assert!((1..=IDLE_CONTEXTS).contains(&idle), "{alg}: {idle} idle");

            assert!(!verifier.verify(b"eyJhbGciOiJSUzI1NiJ9.eyJqdGkiOiIyIn0", &signature));
            let mut flipped = signature.clone();
            flipped[10] ^= 1;
            assert!(!verifier.verify(message, &flipped), "{alg}");
            assert!(!verifier.verify(message, &signature[1..]), "{alg}");
            assert!(!verifier.verify(message, &[]), "{alg}");
            let (other, _) = pair(alg);
            assert!(
                !verifier.verify(message, &other.sign(message).unwrap()),
                "{alg}: another key's signature"
            );
            assert!(verifier.verify(message, &signature), "{alg} after failures");
        }
    }

    /// A signature whose first byte is zero is the same integer without that byte, and OpenSSL
    /// would take it so; RFC 8017 wants exactly the modulus' length, so neither a shorter nor a
    /// longer form verifies. (The test signs until a signature starts with zero: 1 in 256.)
    #[test]
    fn an_rsa_signature_is_exactly_as_long_as_the_modulus() {
        for alg in [Alg::RS256, Alg::PS256] {
            let (signer, verifier) = pair(alg);
            let (message, signature) = (0u32..20_000)
                .map(|i| format!("header.{i}").into_bytes())
                .map(|m| {
                    let s = signer.sign(&m).unwrap();
                    (m, s)
                })
                .find(|(_, s)| s[0] == 0)
                .expect("a signature starting with zero within 20 000");
            assert!(verifier.verify(&message, &signature), "{alg}");
            assert!(!verifier.verify(&message, &signature[1..]), "{alg}");
            let longer = [&[0u8][..], &signature].concat();
            assert!(!verifier.verify(&message, &longer), "{alg}");
            assert!(verifier.verify(&message, &signature), "{alg} after");
        }
    }

    /// RS256 and PS256 differ only in padding: a signature of one never verifies as the other.
    #[test]
    fn padding_is_part_of_the_algorithm() {
        let (signer, rs) = pair(Alg::RS256);
        let message = b"header.payload";
        let signature = signer.sign(message).unwrap();
        let rsa = openssl::rsa::Rsa::public_key_from_pem(
            &rs.key.rsa().unwrap().public_key_to_pem().unwrap(),
        )
        .unwrap();
        let ps = DigestVerifier::rsa(Alg::PS256, &rsa.n().to_vec(), &rsa.e().to_vec()).unwrap();
        assert!(rs.verify(message, &signature));
        assert!(!ps.verify(message, &signature));
    }

    #[test]
    fn a_point_off_the_curve_and_a_key_of_another_type_are_refused() {
        assert!(DigestVerifier::ec(Alg::ES256, &[1; 32], &[2; 32]).is_err());
        let (_, rs) = pair(Alg::RS256);
        let rsa = rs.key.rsa().unwrap();
        let (n, e) = (rsa.n().to_vec(), rsa.e().to_vec());
        assert!(matches!(
            DigestVerifier::rsa(Alg::ES256, &n, &e),
            Err(VerifierError::WrongKeyType(Alg::ES256))
        ));
        assert!(matches!(
            DigestVerifier::ec(Alg::RS256, &[1; 32], &[2; 32]),
            Err(VerifierError::WrongKeyType(Alg::RS256))
        ));
    }
}
