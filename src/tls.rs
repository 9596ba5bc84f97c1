//! TLS for Vigil's listener (rustls; optional client certificates = mTLS) and the extra CA bundle
//! its outbound calls trust.
//!
//! With `[tls] cert` and `key` set the listener speaks only HTTPS; with `client_ca` too, a client
//! without a certificate signed by that CA is refused in the handshake, before any HTTP (bearer
//! tokens still apply on top). Outbound calls (JWKS, SSF management, push delivery) always verify
//! certificates: against the public web roots plus `ca_bundle` when set.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} from {path}: {reason}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{path} holds no {what}")]
    Empty { what: &'static str, path: PathBuf },
    #[error("TLS settings rejected: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client CA verifier: {0}")]
    Verifier(String),
    #[error("CA bundle {path}: {reason}")]
    Bundle { path: PathBuf, reason: String },
}

fn certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Pem {
            what,
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// The listener's TLS settings, or `None` when `[tls]` names no certificate.
pub fn acceptor(config: &TlsConfig) -> Result<Option<TlsAcceptor>, TlsError> {
    let (Some(cert), Some(key)) = (&config.cert, &config.key) else {
        return Ok(None);
    };
    let chain = certs(cert, "certificate")?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Pem {
        what: "private key",
        path: key.clone(),
        reason: e.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let mut server = match &config.client_ca {
        None => builder.with_no_client_auth().with_single_cert(chain, key)?,
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in certs(ca, "client CA certificate")? {
                roots.add(c)?;
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .map_err(|e| TlsError::Verifier(e.to_string()))?;
            builder
                .with_client_cert_verifier(verifier)
                .with_single_cert(chain, key)?
        }
    };
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(TlsAcceptor::from(Arc::new(server))))
}

/// `builder` trusting the certificates of `config.ca_bundle` too.
pub fn trust_bundle(
    builder: reqwest::ClientBuilder,
    config: &TlsConfig,
) -> Result<reqwest::ClientBuilder, TlsError> {
    let Some(path) = &config.ca_bundle else {
        return Ok(builder);
    };
    let bundle = |reason: String| TlsError::Bundle {
        path: path.clone(),
        reason,
    };
    let pem = std::fs::read(path).map_err(|e| bundle(e.to_string()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| bundle(e.to_string()))?;
    if certs.is_empty() {
        return Err(bundle("no certificate in it".into()));
    }
    Ok(certs
        .into_iter()
        .fold(builder, |b, c| b.add_root_certificate(c)))
}
