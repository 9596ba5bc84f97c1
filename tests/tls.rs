//! HTTPS on the listener with a configured certificate and client certificates required (mTLS);
//! outbound calls trusting a configured CA bundle: a Vigil fetches another Vigil's JWKS over HTTPS
//! with a certificate only that bundle vouches for.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rustls_pki_types::pem::PemObject;
use vigil::config::TlsConfig;

struct Pki {
    ca_pem: String,
    server_pem: String,
    server_key: String,
    client_pem: String,
    client_key: String,
}

fn pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name
        .push(DnType::CommonName, "Vigil test CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).unwrap();

    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&server_key, &ca_cert, &ca_key)
        .unwrap();
    let client_key = KeyPair::generate().unwrap();
    let mut client = CertificateParams::new(Vec::<String>::new()).unwrap();
    client
        .distinguished_name
        .push(DnType::CommonName, "edge-gateway");
    let client = client.signed_by(&client_key, &ca_cert, &ca_key).unwrap();
    Pki {
        ca_pem: ca_cert.pem(),
        server_pem: server.pem(),
        server_key: server_key.serialize_pem(),
        client_pem: client.pem(),
        client_key: client_key.serialize_pem(),
    }
}

fn write_file(dir: &std::path::Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// HTTPS on the listener with the test PKI's server certificate, client certificates required
/// when `mtls`.
fn listener_tls(dir: &std::path::Path, pki: &Pki, mtls: bool) -> TlsConfig {
    TlsConfig {
        cert: Some(write_file(dir, "server.pem", &pki.server_pem)),
        key: Some(write_file(dir, "server.key", &pki.server_key)),
        client_ca: mtls.then(|| write_file(dir, "ca.pem", &pki.ca_pem)),
        ca_bundle: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_required_client_certificates() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(&dir.path().join("data"), Vec::new());
    config.tls = listener_tls(dir.path(), &pki, true);
    config.validate().unwrap();
    let vigil = start(config).await;
    let url = format!("https://127.0.0.1:{}/healthz", vigil.local_addr().port());
    let ca = reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).unwrap();

    // With a client certificate from the CA: served over TLS, and bearer tokens still apply.
    let identity =
        reqwest::Identity::from_pem(format!("{}{}", pki.client_pem, pki.client_key).as_bytes())
            .unwrap();
    let with_cert = reqwest::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(ca.clone())
        .identity(identity)
        .build()
        .unwrap();
    let resp = with_cert.get(&url).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let api = format!(
        "https://127.0.0.1:{}/v1/decisions",
        vigil.local_addr().port()
    );
    assert_eq!(
        with_cert.get(&api).send().await.unwrap().status().as_u16(),
        401
    );
    let authorized = with_cert
        .get(&api)
        .bearer_auth(vigil.admin_token().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(authorized.status().as_u16(), 200);

    // Without a client certificate: refused in the handshake.
    let without_cert = reqwest::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(ca)
        .build()
        .unwrap();
    assert!(without_cert.get(&url).send().await.is_err());
    // Plain HTTP on the TLS port: no answer.
    let plain = format!("http://127.0.0.1:{}/healthz", vigil.local_addr().port());
    assert!(reqwest::get(&plain)
        .await
        .map(|r| r.status().is_success())
        .map_or(true, |ok| !ok));
    vigil.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_calls_trust_the_configured_ca_bundle() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| write_file(dir.path(), name, text);
    // An HTTPS server whose certificate only the test CA vouches for: a Vigil (no client certs).
    let mut server = test_config(&dir.path().join("server"), Vec::new());
    server.tls.cert = Some(write("server.pem", &pki.server_pem));
    server.tls.key = Some(write("server.key", &pki.server_key));
    let server = start(server).await;
    let jwks = format!("https://127.0.0.1:{}/jwks.json", server.local_addr().port());

    let client = |bundle: Option<std::path::PathBuf>| {
        let config = TlsConfig {
            ca_bundle: bundle,
            ..TlsConfig::default()
        };
        vigil::tls::trust_bundle(reqwest::Client::builder(), &config)
            .unwrap()
            .build()
            .unwrap()
    };
    let trusted = client(Some(write("bundle.pem", &pki.ca_pem)));
    let keys: serde_json::Value = trusted
        .get(&jwks)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(!keys["keys"].as_array().unwrap().is_empty());
    // Without the bundle the same call fails certificate verification.
    assert!(client(None).get(&jwks).send().await.is_err());
    // A bundle that is not PEM is an error naming the file.
    let bad = TlsConfig {
        ca_bundle: Some(write("bad.pem", "not a certificate")),
        ..TlsConfig::default()
    };
    let err = vigil::tls::trust_bundle(reqwest::Client::builder(), &bad)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("bad.pem"), "{err}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tls_settings_are_start_errors_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(&dir.path().join("data"), Vec::new());
    config.tls.cert = Some(dir.path().join("missing.pem"));
    config.tls.key = Some(dir.path().join("missing.key"));
    let err = vigil::Vigil::start(config).await.err().unwrap().to_string();
    assert!(err.contains("missing.pem"), "{err}");

    let mut config = test_config(&dir.path().join("data2"), Vec::new());
    config.tls.cert = Some(dir.path().join("only-cert.pem"));
    assert!(config.validate().is_err(), "cert without key");
}

/// After the handshake a TLS connection has the same time budget as a plain one: idle, it is
/// closed by the request-head timeout; one that never finishes its handshake is closed by the
/// handshake timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tls_connections_are_closed() {
    use tokio::io::AsyncReadExt;
    use tokio_rustls::rustls;
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(&dir.path().join("data"), Vec::new());
    config.tls = listener_tls(dir.path(), &pki, false);
    config.server.request_head_timeout_ms = 500;
    config.server.tls_handshake_timeout_ms = 500;
    let vigil = start(config).await;

    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(pki.ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let client = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client));
    let tcp = tokio::net::TcpStream::connect(vigil.local_addr())
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), tls.read(&mut buf))
        .await
        .expect("an idle TLS connection stayed open")
        .unwrap_or(0);
    assert_eq!(n, 0);

    // A handshake that never comes.
    let mut silent = tokio::net::TcpStream::connect(vigil.local_addr())
        .await
        .unwrap();
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), silent.read(&mut buf))
        .await
        .expect("a connection without a handshake stayed open")
        .unwrap_or(0);
    assert_eq!(n, 0);
    vigil.shutdown().await;
}
