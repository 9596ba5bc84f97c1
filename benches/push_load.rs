//! Load harness: sustained RFC 8935 push ingestion through the whole receiver — HTTP on loopback,
//! transport auth, JWS verification against a JWKS fetched over HTTP, claim validation, durable
//! group-commit to disk, hand-off — with pre-signed SETs, each with a unique `jti`.
//!
//! Run: `cargo bench --bench push_load -- [--sets N] [--concurrency C] [--alg RS256|ES256|PS256|EdDSA]`
//!
//! The load generator runs in the same process on the same 2 cores as Vigil, so the figure is a
//! lower bound of what Vigil alone sustains. It prints SETs/s, the process's CPU time per SET (Vigil
//! and the generator: steadier than the rate on a shared host) and latency percentiles, and checks
//! that every 202 was recorded.

mod common;

use std::sync::Arc;

use common::{
    background_set, cpu_seconds, drive_max, loopback_config, push_set, quantile, sign_sets,
};
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
    let tokens = sign_sets(&key, total, |i| background_set(iss, aud, "load", i));

    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .build()?;
    // Warm-up: loads the JWKS, fills connection pools.
    let mut tokens = tokens;
    let measured = tokens.split_off(warmup);
    let measured_token_bytes = measured.first().map_or(0, |t| t.len());
    for token in &tokens {
        push_set(&client, &url, "Bearer load", token).await?;
    }

    let cpu0 = cpu_seconds();
    let drive = drive_max(&client, &url, "Bearer load", measured, args.concurrency).await;
    let (latencies, failures, rate) = (drive.latencies_ms, drive.failures, drive.rate);
    // Steadier than the rate on a shared host: the process's CPU time (Vigil and the generator)
    // over the SETs pushed.
    let cpu_per_set_us = (cpu_seconds() - cpu0) * 1e6 / args.sets as f64;
    let stored = vigil.intake().stored_count()?;
    // What a retained SET costs on disk: the intake log's files over the records they hold, once
    // the shutdown has cut the newest segment's zeros ahead off.
    vigil.shutdown().await;
    let log_bytes: u64 = std::fs::read_dir(dir.path().join(vigil::intake::LOG_DIR))?
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    let token_bytes = measured_token_bytes;
    println!(
        "push_load alg={} sets={} concurrency={} -> {:.0} SETs/s accepted, {cpu_per_set_us:.0} µs of CPU per SET; latency p50 {:.2} ms, p99 {:.2} ms, p999 {:.2} ms; non-202: {failures}; stored: {stored}; \
         intake log {log_bytes} bytes = {:.0} B per SET (the SET as pushed: {token_bytes} B)",
        args.alg,
        args.sets,
        args.concurrency,
        rate,
        quantile(&latencies, 0.50),
        quantile(&latencies, 0.99),
        quantile(&latencies, 0.999),
        log_bytes as f64 / stored.max(1) as f64,
    );
    anyhow::ensure!(failures == 0, "{failures} pushes were not accepted");
    anyhow::ensure!(
        stored as usize == total,
        "stored {stored} of {total} accepted SETs"
    );
    Ok(())
}
