//! Vigil's transmitter identity: SSF metadata at the §7 location, a JWKS that verifies the SETs Vigil
//! signs — checked with the same discovery and key code a standard receiver uses — and rotation.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use serde_json::json;
use vigil::jose::{parse_compact, Alg};
use vigil::jwks::KeySet;

async fn fetch(client: &reqwest::Client, url: &str) -> Vec<u8> {
    client
        .get(url)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_and_jwks_verify_vigils_own_sets_across_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let vigil = start(test_config(dir.path(), vec![])).await;
    let issuer = format!("http://{}", vigil.local_addr());
    let client = reqwest::Client::new();
    let meta = vigil::discovery::fetch_metadata(&client, &issuer)
        .await
        .unwrap();
    assert_eq!(meta.issuer, issuer);
    assert_eq!(meta.spec_version.as_deref(), Some("1_0"));
    let jwks_uri = meta.jwks_uri.unwrap();

    let claims = json!({"iss": issuer, "aud": "ep", "jti": "v1", "iat": 1,
        "sub_id": {"format": "email", "email": "a@example.com"},
        "events": {"https://schemas.openid.net/secevent/caep/event-type/session-revoked": {"reason_admin": {"en": "x"}}}});
    let old = vigil.identity().signer().sign_set(&claims).unwrap();
    let verify = |token: String, jwks: Vec<u8>| {
        let keys = KeySet::from_jwks_json(&jwks, &[Alg::RS256]).unwrap();
        let jws = parse_compact(&token, &[Alg::RS256]).unwrap();
        keys.verify(&jws).is_ok()
    };
    let jwks = fetch(&client, &jwks_uri).await;
    assert!(verify(old.clone(), jwks));

    vigil.identity().rotate().unwrap();
    let new = vigil.identity().signer().sign_set(&claims).unwrap();
    let jwks = fetch(&client, &jwks_uri).await;
    assert!(verify(new, jwks.clone()), "new key published");
    assert!(
        verify(old, jwks),
        "the rotated-out key stays published while its SETs may be in flight"
    );
    vigil.shutdown().await;
}
