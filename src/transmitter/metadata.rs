//! `GET /.well-known/ssf-configuration` (SSF §7, at the insertion-rule location for Vigil's issuer)
//! and `GET /jwks.json`.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::Identity;

pub struct MetadataState {
    /// Vigil's issuer URL as enforcement points know it.
    pub issuer: String,
    pub identity: Arc<Identity>,
}

/// The transmitter configuration metadata. `algs` are the algorithms Vigil signs SETs with (the
/// default first): `signing_alg_values_supported` is Vigil's member (SSF defines none for it), in
/// the naming of OAuth's metadata, so an enforcement point can see before it asks for one.
pub fn metadata_document(issuer: &str, algs: &[crate::jose::Alg]) -> Value {
    let base = issuer.trim_end_matches('/');
    let algs: Vec<&str> = algs.iter().map(|a| a.name()).collect();
    json!({
        "spec_version": "1_0",
        "issuer": issuer,
        "jwks_uri": format!("{base}/jwks.json"),
        "delivery_methods_supported": ["urn:ietf:rfc:8935", "urn:ietf:rfc:8936"],
        "configuration_endpoint": format!("{base}/ssf/streams"),
        "status_endpoint": format!("{base}/ssf/status"),
        "add_subject_endpoint": format!("{base}/ssf/subjects:add"),
        "remove_subject_endpoint": format!("{base}/ssf/subjects:remove"),
        "verification_endpoint": format!("{base}/ssf/verify"),
        "authorization_schemes": [{"spec_urn": "urn:ietf:rfc:6749"}],
        "default_subjects": "ALL",
        "signing_alg_values_supported": algs,
    })
}

pub async fn metadata(State(s): State<Arc<MetadataState>>) -> Response {
    Json(metadata_document(&s.issuer, s.identity.algorithms())).into_response()
}

pub async fn jwks(State(s): State<Arc<MetadataState>>) -> Response {
    (
        [(axum::http::header::CACHE_CONTROL, "max-age=300")],
        Json(s.identity.jwks()),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_has_what_the_caep_interop_profile_requires() {
        let m = metadata_document("https://vigil.example.com", &[crate::jose::Alg::RS256]);
        for field in [
            "spec_version",
            "issuer",
            "jwks_uri",
            "delivery_methods_supported",
            "configuration_endpoint",
            "status_endpoint",
            "verification_endpoint",
            "authorization_schemes",
        ] {
            assert!(m.get(field).is_some(), "{field}");
        }
        // It parses as the receiver side's metadata type, and names the same issuer.
        let parsed: crate::discovery::TransmitterMetadata = serde_json::from_value(m).unwrap();
        assert_eq!(parsed.issuer, "https://vigil.example.com");
    }
}
