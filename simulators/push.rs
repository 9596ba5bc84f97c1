//! `vigil-push`: a minimal SSF transmitter for trying Vigil by hand. It serves its JWKS on loopback,
//! signs SET files (e.g. the spec examples) with its key and pushes them per RFC 8935.
//!
//! ```text
//! cargo run -- serve --config config/dev.toml          # terminal 1
//! cargo run --bin vigil-push -- tests/fixtures/spec-examples/caep-session-revoked.json
//! cargo run --bin vigil-push -- --tamper --expect 400 tests/fixtures/spec-examples/caep-session-revoked.json
//! ```
//! Defaults match `config/dev.toml`. Each SET gets a fresh `jti` and `iat` unless `--keep-jti`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Parser;
use serde_json::Value;
use vigil::jose::Alg;
use vigil::sim::{jwks_document, JwksServer, SigningKey};

#[derive(Parser)]
#[command(about = "Sign SET files and push them to Vigil (RFC 8935)")]
struct Args {
    /// SET claim files (JSON) to sign and push.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Vigil's push endpoint.
    #[arg(long, default_value = "http://127.0.0.1:8080/ssf/push/dev")]
    url: String,
    /// Authorization header value.
    #[arg(long, default_value = "Bearer dev-push-secret")]
    auth: String,
    /// Where to serve the JWKS (Vigil's config points its `jwks_uri` here).
    #[arg(long, default_value = "127.0.0.1:8090")]
    jwks_listen: SocketAddr,
    /// Signing algorithm.
    #[arg(long, default_value = "RS256")]
    alg: Alg,
    /// Private key file (created on first use, so the `kid` stays stable across runs).
    #[arg(long, default_value = "target/vigil-push/key.jwk")]
    key_file: PathBuf,
    /// Override `iss`.
    #[arg(long, default_value = "https://idp.example.com/123456789/")]
    iss: String,
    /// Override `aud`.
    #[arg(long, default_value = "https://sp.example.com/caep")]
    aud: String,
    /// Keep each file's `jti` and `iat` instead of fresh ones.
    #[arg(long)]
    keep_jti: bool,
    /// Corrupt the signature (Vigil must answer 400 invalid_key).
    #[arg(long)]
    tamper: bool,
    /// Expected HTTP status; any other makes the command fail.
    #[arg(long, default_value_t = 202)]
    expect: u16,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let key_file =
        args.key_file
            .with_file_name(format!("{}-{}.jwk", stem(&args.key_file), args.alg));
    let kid = format!("vigil-push-{}", args.alg);
    let key = SigningKey::load_or_generate(&key_file, args.alg, &kid)
        .with_context(|| format!("key file {}", key_file.display()))?;
    let jwks = JwksServer::start(args.jwks_listen, jwks_document(&[key.public_jwk()?]))
        .await
        .with_context(|| format!("serving the JWKS on {}", args.jwks_listen))?;
    eprintln!("JWKS served at {}", jwks.jwks_uri());

    let client = reqwest::Client::new();
    let mut failures = 0;
    for file in &args.files {
        let text = std::fs::read_to_string(file).with_context(|| file.display().to_string())?;
        let mut claims: Value =
            serde_json::from_str(&text).with_context(|| file.display().to_string())?;
        claims["iss"] = Value::String(args.iss.clone());
        claims["aud"] = Value::String(args.aud.clone());
        if !args.keep_jti {
            claims["jti"] = Value::String(format!("{:032x}", rand::random::<u128>()));
            claims["iat"] = Value::from(vigil::signal::now_ms() / 1000);
        }
        let mut token = key.sign_set(&claims)?;
        if args.tamper {
            token = tamper(&token);
        }
        let resp = client
            .post(&args.url)
            .header("Content-Type", "application/secevent+jwt")
            .header("Accept", "application/json")
            .header("Authorization", &args.auth)
            .body(token)
            .send()
            .await
            .with_context(|| format!("pushing to {}", args.url))?;
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap_or_default();
        println!("{} -> {status} {body}", file.display());
        if status != args.expect {
            failures += 1;
        }
    }
    if failures > 0 {
        bail!("{failures} push(es) did not get HTTP {}", args.expect);
    }
    Ok(())
}

fn stem(path: &std::path::Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "key".into())
}

/// Flips one character in the middle of the signature.
fn tamper(token: &str) -> String {
    let mut bytes = token.as_bytes().to_vec();
    let sig_start = token.rfind('.').map_or(0, |i| i + 1);
    let i = sig_start + (bytes.len() - sig_start) / 2;
    bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
    String::from_utf8(bytes).unwrap_or_default()
}
