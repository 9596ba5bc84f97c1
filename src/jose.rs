//! Compact JWS parsing and the JOSE-header rules of SSF 1.0 §4.1.1 and RFC 8417 §2.3.
//!
//! Only this module and [`crate::jwks`] know JWS. Parsing does no cryptography: it splits the token,
//! decodes the header and checks `typ`, `crit` and that `alg` is an asymmetric algorithm named in the
//! caller's allow-list, *before* any key is looked up (so `none` and HMAC-with-a-public-key confusion
//! never reach a verifier).

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

/// The JWS algorithms Vigil can verify with a transmitter's public keys. There is deliberately no
/// variant for `none` or the HMAC family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Alg {
    RS256,
    RS384,
    RS512,
    PS256,
    PS384,
    PS512,
    ES256,
    ES384,
    ES512,
    EdDSA,
}

impl Alg {
    pub const ALL: [Alg; 10] = [
        Alg::RS256,
        Alg::RS384,
        Alg::RS512,
        Alg::PS256,
        Alg::PS384,
        Alg::PS512,
        Alg::ES256,
        Alg::ES384,
        Alg::ES512,
        Alg::EdDSA,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Alg::RS256 => "RS256",
            Alg::RS384 => "RS384",
            Alg::RS512 => "RS512",
            Alg::PS256 => "PS256",
            Alg::PS384 => "PS384",
            Alg::PS512 => "PS512",
            Alg::ES256 => "ES256",
            Alg::ES384 => "ES384",
            Alg::ES512 => "ES512",
            Alg::EdDSA => "EdDSA",
        }
    }

    /// The JWK `kty` (and for EC/OKP the `crv`) a key must have to verify this algorithm.
    pub fn key_type(self) -> (&'static str, Option<&'static str>) {
        match self {
            Alg::RS256 | Alg::RS384 | Alg::RS512 | Alg::PS256 | Alg::PS384 | Alg::PS512 => {
                ("RSA", None)
            }
            Alg::ES256 => ("EC", Some("P-256")),
            Alg::ES384 => ("EC", Some("P-384")),
            Alg::ES512 => ("EC", Some("P-521")),
            Alg::EdDSA => ("OKP", Some("Ed25519")),
        }
    }
}

impl fmt::Display for Alg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a string is not an acceptable algorithm name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AlgError {
    #[error("`none` is never accepted: SETs must be signed")]
    None,
    #[error("`{0}` is an HMAC algorithm; it cannot be verified with a transmitter's public keys")]
    Hmac(String),
    #[error("`{0}` is not a supported JWS algorithm")]
    Unknown(String),
}

impl FromStr for Alg {
    type Err = AlgError;
    fn from_str(s: &str) -> Result<Self, AlgError> {
        if let Some(alg) = Alg::ALL.iter().find(|a| a.name() == s) {
            return Ok(*alg);
        }
        Err(match s {
            "none" => AlgError::None,
            s if s.starts_with("HS") => AlgError::Hmac(s.to_owned()),
            s => AlgError::Unknown(s.to_owned()),
        })
    }
}

impl Serialize for Alg {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for Alg {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Why a token is not an acceptable compact JWS. [`JwsError::is_key_problem`] separates the errors
/// RFC 8935 files under `invalid_key` from those under `invalid_request`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwsError {
    #[error("the body is not a compact JWS (expected three base64url parts separated by '.')")]
    NotCompact,
    #[error("encrypted SETs (JWE) are not accepted")]
    Encrypted,
    #[error("the JOSE header is not valid base64url-encoded JSON")]
    BadHeader,
    #[error("the JWS payload or signature is not valid base64url")]
    BadEncoding,
    #[error("the JOSE header has no `typ`; SSF §4.1.1 requires `secevent+jwt`")]
    MissingTyp,
    #[error("the JOSE header `typ` is `{0}`; SSF §4.1.1 requires `secevent+jwt`")]
    WrongTyp(String),
    #[error("the JOSE header lists critical extensions Vigil does not understand: {0}")]
    UnknownCrit(String),
    #[error("the JOSE header has no `alg`")]
    MissingAlg,
    #[error("algorithm not accepted: {0}")]
    AlgRejected(String),
}

impl JwsError {
    /// Whether RFC 8935 calls this an unacceptable key (`invalid_key`) rather than an unparsable SET.
    pub fn is_key_problem(&self) -> bool {
        matches!(self, JwsError::AlgRejected(_))
    }
}

/// A parsed compact JWS whose header passed the SSF checks. The signature is not yet verified.
#[derive(Debug)]
pub struct CompactJws<'a> {
    pub alg: Alg,
    pub kid: Option<String>,
    /// `BASE64URL(header) || '.' || BASE64URL(payload)`: the bytes the signature covers.
    pub signing_input: &'a [u8],
    pub payload: Vec<u8>,
    pub signature: Vec<u8>,
    /// The header had no `typ` (accepted only by [`parse_compact_untyped`]).
    pub typ_missing: bool,
}

/// Splits and checks a compact JWS. `allowed` is the transmitter's algorithm allow-list.
pub fn parse_compact<'a>(token: &'a str, allowed: &[Alg]) -> Result<CompactJws<'a>, JwsError> {
    parse(token, allowed, false)
}

/// [`parse_compact`], also accepting a header without `typ` — Google's RISC tokens have none
/// (SSF §4.1.1 requires it: only for a transmitter whose `tolerate.legacy_risc` is on). A `typ`
/// that is present must still be `secevent+jwt`.
pub fn parse_compact_untyped<'a>(
    token: &'a str,
    allowed: &[Alg],
) -> Result<CompactJws<'a>, JwsError> {
    parse(token, allowed, true)
}

fn parse<'a>(
    token: &'a str,
    allowed: &[Alg],
    typ_optional: bool,
) -> Result<CompactJws<'a>, JwsError> {
    let token = token.trim_ascii();
    let parts: Vec<&str> = token.split('.').collect();
    match parts.len() {
        3 => {}
        5 => return Err(JwsError::Encrypted),
        _ => return Err(JwsError::NotCompact),
    }
    let header_bytes = URL_SAFE_NO_PAD
        .decode(parts[0])
        .map_err(|_| JwsError::BadHeader)?;
    let header: Value = serde_json::from_slice(&header_bytes).map_err(|_| JwsError::BadHeader)?;
    let header = header.as_object().ok_or(JwsError::BadHeader)?;

    // RFC 7515 §4.1.9: media-type comparisons are case-insensitive and the "application/" prefix may
    // be omitted; SSF §4.1.1 makes the value itself mandatory.
    let typ_missing = !header.contains_key("typ");
    match header.get("typ") {
        None if typ_optional => {}
        None => return Err(JwsError::MissingTyp),
        Some(Value::String(t)) => {
            let t = t.to_ascii_lowercase();
            let t = t.strip_prefix("application/").unwrap_or(&t);
            if t != "secevent+jwt" {
                return Err(JwsError::WrongTyp(t.to_owned()));
            }
        }
        Some(other) => return Err(JwsError::WrongTyp(other.to_string())),
    }
    // RFC 7515 §4.1.11: a recipient MUST reject a JWS whose `crit` names extensions it does not know.
    if let Some(crit) = header.get("crit") {
        return Err(JwsError::UnknownCrit(crit.to_string()));
    }
    let alg_name = match header.get("alg") {
        Some(Value::String(a)) => a.as_str(),
        _ => return Err(JwsError::MissingAlg),
    };
    let alg: Alg = alg_name
        .parse()
        .map_err(|e: AlgError| JwsError::AlgRejected(e.to_string()))?;
    if !allowed.contains(&alg) {
        return Err(JwsError::AlgRejected(format!(
            "`{alg}` is not in this transmitter's allow-list"
        )));
    }
    let kid = match header.get("kid") {
        Some(Value::String(k)) => Some(k.clone()),
        _ => None,
    };
    let payload = URL_SAFE_NO_PAD
        .decode(parts[1])
        .map_err(|_| JwsError::BadEncoding)?;
    let signature = URL_SAFE_NO_PAD
        .decode(parts[2])
        .map_err(|_| JwsError::BadEncoding)?;
    let signing_input_len = parts[0].len() + 1 + parts[1].len();
    Ok(CompactJws {
        alg,
        kid,
        signing_input: &token.as_bytes()[..signing_input_len],
        payload,
        signature,
        typ_missing,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(v: &str) -> String {
        URL_SAFE_NO_PAD.encode(v)
    }

    fn token(header: &str) -> String {
        format!("{}.{}.{}", b64(header), b64("{}"), b64("sig"))
    }

    #[test]
    fn accepts_explicitly_typed_allowed_alg() {
        let t = token(r#"{"typ":"secevent+jwt","alg":"RS256","kid":"k1"}"#);
        let jws = parse_compact(&t, &[Alg::RS256]).unwrap();
        assert_eq!(jws.alg, Alg::RS256);
        assert_eq!(jws.kid.as_deref(), Some("k1"));
        assert_eq!(jws.signature, b"sig");
        let (signed, _) = t.rsplit_once('.').unwrap();
        assert_eq!(jws.signing_input, signed.as_bytes());
        let t = token(r#"{"typ":"Application/SecEvent+JWT","alg":"ES256"}"#);
        assert!(parse_compact(&t, &[Alg::ES256]).is_ok());
    }

    #[test]
    fn header_rules() {
        let allowed = [Alg::RS256];
        let cases = [
            (token(r#"{"alg":"RS256"}"#), JwsError::MissingTyp),
            (
                token(r#"{"typ":"JWT","alg":"RS256"}"#),
                JwsError::WrongTyp("jwt".into()),
            ),
            (
                token(r#"{"typ":"secevent+jwt","alg":"RS256","crit":["b64"]}"#),
                JwsError::UnknownCrit(r#"["b64"]"#.into()),
            ),
            (token(r#"{"typ":"secevent+jwt"}"#), JwsError::MissingAlg),
        ];
        for (t, expected) in cases {
            assert_eq!(parse_compact(&t, &allowed).err(), Some(expected));
        }
        for alg in ["none", "HS256", "RS999", "ES256"] {
            let t = token(&format!(r#"{{"typ":"secevent+jwt","alg":"{alg}"}}"#));
            let err = parse_compact(&t, &allowed).err().unwrap();
            assert!(err.is_key_problem(), "{alg}: {err}");
        }
    }

    #[test]
    fn structure_errors() {
        assert_eq!(
            parse_compact("abc", &[Alg::RS256]).err(),
            Some(JwsError::NotCompact)
        );
        assert_eq!(
            parse_compact("a.b.c.d.e", &[Alg::RS256]).err(),
            Some(JwsError::Encrypted)
        );
        assert_eq!(
            parse_compact("%%.b.c", &[Alg::RS256]).err(),
            Some(JwsError::BadHeader)
        );
        let t = format!("{}.%%.c", b64(r#"{"typ":"secevent+jwt","alg":"RS256"}"#));
        assert_eq!(
            parse_compact(&t, &[Alg::RS256]).err(),
            Some(JwsError::BadEncoding)
        );
    }

    #[test]
    fn alg_names_parse_strictly() {
        assert_eq!("EdDSA".parse::<Alg>(), Ok(Alg::EdDSA));
        assert_eq!("none".parse::<Alg>(), Err(AlgError::None));
        assert!(matches!("HS512".parse::<Alg>(), Err(AlgError::Hmac(_))));
        assert!(matches!("rs256".parse::<Alg>(), Err(AlgError::Unknown(_))));
    }
}
