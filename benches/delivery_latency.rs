//! Delivery latency harness: signal → revocation delivered to a subscribed enforcement point, per
//! delivery method (RFC 8935 push, RFC 8936 poll, SSE), everything real on loopback: a signed CAEP/RISC
//! SET pushed to Vigil over HTTP, durable intake, evaluation, a signed SET in the outbox, delivery, and
//! verification with Vigil's JWKS at the enforcement point.
//!
//! Run: `cargo bench --bench delivery_latency -- [--signals 300] [--rate 100]`
//!
//! Latency is measured from just before the IdP's push to the enforcement point's verified receipt.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{add_eps, arg, delivery_latencies, loopback_config, quantile, subscribe_eps};
use serde_json::json;
use vigil::config::TransmitterConfig;
use vigil::jose::Alg;
use vigil::sim::{jwks_document, JwksServer, SigningKey};
use vigil::Vigil;

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(arg("--signals", 300) as usize, arg("--rate", 100)))
}

async fn run(signals: usize, rate: u64) -> anyhow::Result<()> {
    let iss = "https://idp.example.com/";
    let key = SigningKey::generate(Alg::RS256, "idp")?;
    let jwks =
        JwksServer::start("127.0.0.1:0".parse()?, jwks_document(&[key.public_jwk()?])).await?;
    let dir = tempfile::tempdir()?;
    let mut config = loopback_config(dir.path());
    config.transmitters.push(TransmitterConfig::with_jwks(
        "idp",
        iss,
        vec!["vigil".into()],
        "Bearer idp",
        vec![Alg::RS256],
        &jwks.jwks_uri(),
    ));
    add_eps(&mut config);
    config.policy.watch_interval_secs = 0;
    let vigil = Vigil::start(config).await?;
    let issuer = format!("http://{}", vigil.local_addr());
    let eps = subscribe_eps(&issuer).await?;
    let client = vigil::sim::api_client(vigil.admin_token())?;
    let now = vigil::signal::now_ms() as f64 / 1000.0;
    for i in 0..signals {
        let g = json!({"id": format!("g{i}"), "kind": "session", "subject": {"format": "email", "email": format!("u{i}@example.com")},
            "issued_at": now - 60.0, "expires_at": now + 3600.0});
        client
            .post(format!("{issuer}/v1/grants"))
            .json(&g)
            .send()
            .await?;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut sent: HashMap<String, Instant> = HashMap::new();
    let gap = Duration::from_micros(1_000_000 / rate.max(1));
    for i in 0..signals {
        let jti = format!("sig-{i}");
        let claims = json!({"iss": iss, "aud": "vigil", "jti": jti, "iat": now as i64,
            "sub_id": {"format": "email", "email": format!("u{i}@example.com")},
            "events": {"https://schemas.openid.net/secevent/risc/event-type/account-disabled": {}}});
        let token = key.sign_set(&claims)?;
        sent.insert(jti, Instant::now());
        let status = client
            .post(format!("{issuer}/ssf/push/idp"))
            .header("Content-Type", "application/secevent+jwt")
            .header("Authorization", "Bearer idp")
            .body(token)
            .send()
            .await?
            .status();
        anyhow::ensure!(status.as_u16() == 202, "push answered {status}");
        tokio::time::sleep(gap).await;
    }
    println!("delivery_latency signals={signals} rate={rate}/s (signal pushed → revocation verified at the enforcement point)");
    for (name, lat) in delivery_latencies(eps, &sent, signals).await {
        println!(
            "  {name:>4}: received {}/{signals}; p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            lat.len(),
            quantile(&lat, 0.5),
            quantile(&lat, 0.99),
            lat.last().copied().unwrap_or(f64::NAN)
        );
    }
    vigil.shutdown().await;
    Ok(())
}
