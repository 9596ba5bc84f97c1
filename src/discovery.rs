//! SSF 1.0 §7 transmitter configuration metadata: where to find it (the insertion rule) and the
//! checks that decide whether it may be used at all (§7.2.4: `issuer` must equal the issuer Vigil
//! asked about, otherwise the information MUST NOT be used).

use reqwest::Url;
use serde::Deserialize;

/// Why transmitter metadata could not be fetched or must not be used.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("issuer `{0}` is not an absolute URL without query or fragment")]
    BadIssuer(String),
    #[error("fetching {url}: {reason}")]
    Fetch { url: String, reason: String },
    #[error("metadata at {url} names issuer `{found}`, expected `{expected}` (SSF §7.2.4)")]
    IssuerMismatch {
        url: String,
        expected: String,
        found: String,
    },
    #[error("metadata at {url} has no `jwks_uri`, so its SETs cannot be verified")]
    NoJwksUri { url: String },
}

/// The metadata fields the receiver needs. Unknown fields are ignored (SSF §4.2.3 spirit).
#[derive(Debug, Clone, Deserialize)]
pub struct TransmitterMetadata {
    pub issuer: String,
    #[serde(default)]
    pub jwks_uri: Option<String>,
    #[serde(default)]
    pub spec_version: Option<String>,
    #[serde(default)]
    pub delivery_methods_supported: Vec<String>,
    #[serde(default)]
    pub critical_subject_members: Vec<String>,
    /// Stream management endpoints (SSF §8); absent when the transmitter offers no management API.
    #[serde(default)]
    pub configuration_endpoint: Option<String>,
    #[serde(default)]
    pub status_endpoint: Option<String>,
    #[serde(default)]
    pub add_subject_endpoint: Option<String>,
    #[serde(default)]
    pub remove_subject_endpoint: Option<String>,
    #[serde(default)]
    pub verification_endpoint: Option<String>,
    #[serde(default)]
    pub default_subjects: Option<String>,
}

/// SSF §7: `/.well-known/ssf-configuration` is *inserted* between host and path, after removing a
/// trailing `/` from the issuer: `https://tr.example.com/issuer1` →
/// `https://tr.example.com/.well-known/ssf-configuration/issuer1`.
pub fn metadata_url(issuer: &str, well_known: &str) -> Result<Url, DiscoveryError> {
    let url = Url::parse(issuer).map_err(|_| DiscoveryError::BadIssuer(issuer.to_owned()))?;
    if url.query().is_some() || url.fragment().is_some() || url.cannot_be_a_base() {
        return Err(DiscoveryError::BadIssuer(issuer.to_owned()));
    }
    let path = url.path().trim_end_matches('/');
    let mut out = url.clone();
    out.set_path(&format!("/.well-known/{well_known}{path}"));
    Ok(out)
}

/// Fetches and validates the metadata of `issuer`: `/.well-known/ssf-configuration`, and when
/// that does not exist (404), the legacy RISC transmitters' `/.well-known/risc-configuration`.
pub async fn fetch_metadata(
    client: &reqwest::Client,
    issuer: &str,
) -> Result<TransmitterMetadata, DiscoveryError> {
    match fetch_from(client, issuer, "ssf-configuration").await {
        Err(DiscoveryError::Fetch { reason, .. }) if reason == NOT_FOUND => {
            fetch_from(client, issuer, "risc-configuration").await
        }
        other => other,
    }
}

const NOT_FOUND: &str = "HTTP 404 Not Found";
/// The largest metadata document read (it is a few hundred bytes in practice).
const MAX_METADATA_BYTES: usize = 256 * 1024;

async fn fetch_from(
    client: &reqwest::Client,
    issuer: &str,
    well_known: &str,
) -> Result<TransmitterMetadata, DiscoveryError> {
    let url = metadata_url(issuer, well_known)?;
    let fetch_err = |reason: String| DiscoveryError::Fetch {
        url: url.to_string(),
        reason,
    };
    let resp = client
        .get(url.clone())
        .header(reqwest::header::ACCEPT, "application/json")
        .send()
        .await
        .map_err(|e| fetch_err(e.to_string()))?;
    if !resp.status().is_success() {
        return Err(fetch_err(format!("HTTP {}", resp.status())));
    }
    let body = crate::outbound::read_capped(resp, MAX_METADATA_BYTES)
        .await
        .map_err(|e| fetch_err(e.to_string()))?;
    let meta: TransmitterMetadata =
        serde_json::from_slice(&body).map_err(|e| fetch_err(e.to_string()))?;
    if meta.issuer != issuer {
        return Err(DiscoveryError::IssuerMismatch {
            url: url.to_string(),
            expected: issuer.to_owned(),
            found: crate::outbound::excerpt(&meta.issuer),
        });
    }
    if meta.jwks_uri.is_none() {
        return Err(DiscoveryError::NoJwksUri {
            url: url.to_string(),
        });
    }
    Ok(meta)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insertion_rule() {
        let cases = [
            (
                "https://tr.example.com",
                "https://tr.example.com/.well-known/ssf-configuration",
            ),
            (
                "https://tr.example.com/",
                "https://tr.example.com/.well-known/ssf-configuration",
            ),
            (
                "https://tr.example.com/issuer1",
                "https://tr.example.com/.well-known/ssf-configuration/issuer1",
            ),
            (
                "https://tr.example.com/a/b/",
                "https://tr.example.com/.well-known/ssf-configuration/a/b",
            ),
            (
                "http://127.0.0.1:9000/t",
                "http://127.0.0.1:9000/.well-known/ssf-configuration/t",
            ),
        ];
        for (issuer, expected) in cases {
            assert_eq!(
                metadata_url(issuer, "ssf-configuration").unwrap().as_str(),
                expected
            );
        }
        assert!(metadata_url("https://x.example/?q=1", "ssf-configuration").is_err());
        assert!(metadata_url("not a url", "ssf-configuration").is_err());
    }

    #[test]
    fn spec_metadata_example_parses() {
        let v = crate::test_support::spec_example("ssf-transmitter-configuration-response.json");
        let meta: TransmitterMetadata = serde_json::from_value(v).unwrap();
        assert_eq!(meta.issuer, "https://tr.example.com");
        assert!(meta.jwks_uri.is_some());
    }
}
