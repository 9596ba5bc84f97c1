//! AuthZEN access evaluation against a plain status lookup, in one run on one Vigil: the same
//! grants asked at the same fixed rate through `POST /access/v1/evaluation` (grant status, then
//! the request-time rules on the principal's live context, and a decision record queued for the
//! audit log) and through `POST /v1/check` (grant status only), interleaved, real HTTP on
//! loopback. The ratio is what request-time evaluation costs on top of a status lookup.
//!
//! Run: `cargo bench --bench authzen -- [--grants 10000] [--rate 400] [--secs 10]`

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{arg, loopback_config, quantile};
use serde_json::json;
use vigil::Vigil;

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(
        arg("--grants", 10_000) as usize,
        arg("--rate", 400),
        arg("--secs", 10),
    ))
}

async fn run(grants: usize, rate: u64, secs: u64) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut config = loopback_config(dir.path());
    config.policy.watch_interval_secs = 0;
    let vigil = Vigil::start(config).await?;
    let base = format!("http://{}", vigil.local_addr());
    let client = vigil::sim::api_client(vigil.admin_token())?;
    let now = vigil::signal::now_ms() as f64 / 1000.0;
    for i in 0..grants {
        let g = json!({"id": format!("g{i}"), "kind": "session",
            "subject": {"format": "email", "email": format!("u{}@example.com", i % 1000)},
            "issued_at": now - 60.0, "expires_at": now + 3600.0});
        client
            .post(format!("{base}/v1/grants"))
            .json(&g)
            .send()
            .await?;
    }
    // Warm both paths.
    for i in 0..200 {
        let _ = ask(&client, &base, true, i % grants).await;
        let _ = ask(&client, &base, false, i % grants).await;
    }
    let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let total = (rate * secs) as usize;
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(total);
    let client = Arc::new(client);
    let base = Arc::new(base);
    let mut ticker = tokio::time::interval(interval);
    for n in 0..total {
        ticker.tick().await;
        let (client, base) = (client.clone(), base.clone());
        // Alternate the two: each sees the same load, the same moment, the same grants.
        let authzen = n % 2 == 0;
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let ok = ask(&client, &base, authzen, (n * 7919) % grants).await;
            (authzen, ok, t.elapsed().as_secs_f64() * 1000.0)
        }));
    }
    let mut az = Vec::new();
    let mut check = Vec::new();
    let mut failed = 0;
    for t in tasks {
        let (authzen, ok, ms) = t.await?;
        if !ok {
            failed += 1;
        }
        if authzen {
            az.push(ms);
        } else {
            check.push(ms);
        }
    }
    let wall = started.elapsed().as_secs_f64();
    az.sort_by(f64::total_cmp);
    check.sort_by(f64::total_cmp);
    let row = |name: &str, v: &[f64]| {
        println!(
            "| {name} | {} | {:.2} | {:.2} | {:.2} |",
            v.len(),
            quantile(v, 0.5),
            quantile(v, 0.99),
            quantile(v, 0.999)
        )
    };
    println!(
        "{grants} grants, {rate} requests/s for {secs} s (half each), {wall:.1} s wall, {failed} failed"
    );
    println!("| path | requests | p50 ms | p99 ms | p999 ms |");
    println!("|---|---|---|---|---|");
    row("AuthZEN evaluation", &az);
    row("status lookup (/v1/check)", &check);
    println!(
        "ratio AuthZEN / check: p50 {:.2}, p99 {:.2}",
        quantile(&az, 0.5) / quantile(&check, 0.5),
        quantile(&az, 0.99) / quantile(&check, 0.99)
    );
    vigil.shutdown().await;
    Ok(())
}

/// One request for grant `g{i}`: an AuthZEN evaluation or a status check; whether it answered 200
/// with a decision.
async fn ask(client: &reqwest::Client, base: &str, authzen: bool, i: usize) -> bool {
    let (path, body) = if authzen {
        (
            "/access/v1/evaluation",
            json!({"subject": {"type": "user", "id": format!("u{}@example.com", i % 1000)},
                   "action": {"name": "pay", "properties": {"sensitive": true}},
                   "resource": {"type": "api", "id": "payments"},
                   "context": {"grant_id": format!("g{i}")}}),
        )
    } else {
        ("/v1/check", json!({"grant_id": format!("g{i}")}))
    };
    match client
        .post(format!("{base}{path}"))
        .json(&body)
        .send()
        .await
    {
        Ok(r) if r.status().is_success() => r.json::<serde_json::Value>().await.is_ok(),
        _ => false,
    }
}
