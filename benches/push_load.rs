//! Load harness: sustained RFC 8935 push ingestion through the whole receiver — HTTP on loopback,
//! transport auth, JWS verification against a JWKS fetched over HTTP, claim validation, durable
//! group-commit to disk, hand-off — with pre-signed SETs, each with a unique `jti`.
//!
//! Run: `cargo bench --bench push_load -- [--sets N] [--concurrency C] [--alg RS256|ES256|PS256|EdDSA]`
//!
//! The load generator runs in the same process on the same 2 cores as Vigil, so the figure is a
//! lower bound of what Vigil alone sustains. It prints SETs/s and latency percentiles, and checks that
//! every 202 was recorded.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::loopback_config;
use serde_json::{json, Value};
use vigil::config::TransmitterConfig;
use vigil::jose::Alg;
use vigil::sim::{jwks_document, JwksServer, SigningKey};
use vigil::Vigil;

struct Args {
    sets: usize,
    concurrency: usize,
    alg: Alg,
}

fn args() -> Args {
    let mut out = Args {
        sets: 20_000,
        concurrency: 64,
        alg: Alg::RS256,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--sets" => out.sets = it.next().and_then(|v| v.parse().ok()).unwrap_or(out.sets),
            "--concurrency" => {
                out.concurrency = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(out.concurrency)
            }
            "--alg" => out.alg = it.next().and_then(|v| v.parse().ok()).unwrap_or(out.alg),
            _ => {} // `cargo bench` passes --bench; ignore what we do not know
        }
    }
    out
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() -> anyhow::Result<()> {
    let args = args();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let iss = "https://idp.example.com/123456789/";
    let aud = "https://sp.example.com/caep";
    let key = Arc::new(SigningKey::generate(args.alg, "load")?);
    let jwks =
        JwksServer::start("127.0.0.1:0".parse()?, jwks_document(&[key.public_jwk()?])).await?;
    let dir = tempfile::tempdir()?;
    let mut config = loopback_config(dir.path());
    config.transmitters.push(TransmitterConfig::with_jwks(
        "load",
        iss,
        vec![aud.into()],
        "Bearer load",
        vec![args.alg],
        &jwks.jwks_uri(),
    ));
    let vigil = Vigil::start(config).await?;
    let url = format!("http://{}/ssf/push/load", vigil.local_addr());

    let warmup = 200;
    let total = args.sets + warmup;
    eprintln!("signing {total} {} SETs…", args.alg);
    let tokens = sign_all(&key, total, iss, aud);

    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .build()?;
    // Warm-up: loads the JWKS, fills connection pools.
    for token in &tokens[..warmup] {
        push(&client, &url, token).await?;
    }

    let tokens = Arc::new(tokens);
    let next = Arc::new(AtomicUsize::new(warmup));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency {
        let (client, url, tokens, next) =
            (client.clone(), url.clone(), tokens.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut failures = 0usize;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= tokens.len() {
                    break;
                }
                let t = Instant::now();
                match push(&client, &url, &tokens[i]).await {
                    Ok(202) => latencies.push(t.elapsed()),
                    _ => failures += 1,
                }
            }
            (latencies, failures)
        }));
    }
    let mut latencies = Vec::with_capacity(args.sets);
    let mut failures = 0;
    for t in tasks {
        let (l, f) = t.await?;
        latencies.extend(l);
        failures += f;
    }
    let elapsed = started.elapsed();
    latencies.sort();
    let stored = vigil.intake().stored_count()?;
    let rate = latencies.len() as f64 / elapsed.as_secs_f64();
    println!(
        "push_load alg={} sets={} concurrency={} -> {:.0} SETs/s accepted; latency p50 {:.2} ms, p99 {:.2} ms, p999 {:.2} ms; non-202: {failures}; stored: {stored}",
        args.alg,
        args.sets,
        args.concurrency,
        rate,
        percentile(&latencies, 0.50).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        percentile(&latencies, 0.999).as_secs_f64() * 1e3,
    );
    vigil.shutdown().await;
    anyhow::ensure!(failures == 0, "{failures} pushes were not accepted");
    anyhow::ensure!(
        stored as usize == total,
        "stored {stored} of {total} accepted SETs"
    );
    Ok(())
}

fn sign_all(key: &SigningKey, n: usize, iss: &str, aud: &str) -> Vec<String> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let chunk = n.div_ceil(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    (t * chunk..((t + 1) * chunk).min(n))
                        .map(|i| {
                            let set: Value = json!({
                                "iss": iss, "aud": aud, "jti": format!("load-{i}"), "iat": 1_700_000_000 + i,
                                "txn": format!("txn-{i}"),
                                "sub_id": {"format": "complex",
                                    "user": {"format": "iss_sub", "iss": iss, "sub": format!("user-{}", i % 1000)},
                                    "session": {"format": "opaque", "id": format!("s-{i}")}},
                                "events": {"https://schemas.openid.net/secevent/caep/event-type/session-revoked": {
                                    "initiating_entity": "policy", "reason_admin": {"en": "load"}, "event_timestamp": 1_700_000_000 + i}}
                            });
                            key.sign_set(&set).unwrap_or_default()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    })
}

async fn push(client: &reqwest::Client, url: &str, token: &str) -> anyhow::Result<u16> {
    let resp = client
        .post(url)
        .header("Content-Type", "application/secevent+jwt")
        .header("Authorization", "Bearer load")
        .body(token.to_owned())
        .send()
        .await?;
    Ok(resp.status().as_u16())
}
