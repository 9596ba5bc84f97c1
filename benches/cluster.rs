//! Cluster mode against a single node, in one run on this machine: RS256 SETs pushed as fast as
//! they are answered (64 connections, round-robin over the instances), then the time until every
//! one is applied by an engine, and the CPU seconds the whole process spent per SET.
//!
//! Run: `cargo bench --bench cluster -- [--sets 20000] [--concurrency 64] [--partitions 12]`
//!
//! Configurations, each on a fresh in-process mock cluster of three brokers: a single node (its
//! intake is a local file: the ceiling this stack reaches without Kafka), then one, two and three
//! instances in cluster mode (every SET appended to `<name>.signals` with `acks=all` before its
//! 202, applied by its principal's owner). The instances run in this process, on the same 2 cores
//! as the load generator and the brokers, so the honest figure is CPU per SET and how it changes
//! with the instance count, not a speed-up.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    arg, background_set, cpu_seconds, drive_max_over, loopback_config, push_set, quantile,
    sign_sets,
};
use rdkafka::mocking::MockCluster;
use vigil::config::TransmitterConfig;
use vigil::jose::Alg;
use vigil::sim::{jwks_document, JwksServer, SigningKey};
use vigil::Vigil;

const ISS: &str = "https://idp.example.com/123456789/";
const AUD: &str = "https://sp.example.com/caep";

struct Figures {
    label: String,
    accepted_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    applied_secs: f64,
    cpu_ms_per_set: f64,
}

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let sets = arg("--sets", 20_000) as usize;
    let concurrency = arg("--concurrency", 64) as usize;
    let partitions = arg("--partitions", 12) as i32;
    let key = Arc::new(SigningKey::generate(Alg::RS256, "cluster-bench")?);
    let jwks =
        JwksServer::start("127.0.0.1:0".parse()?, jwks_document(&[key.public_jwk()?])).await?;
    let mut all = Vec::new();
    for (round, instances) in [0usize, 1, 2, 3].into_iter().enumerate() {
        let label = if instances == 0 {
            "single node".to_owned()
        } else {
            format!("cluster, {instances} instance(s)")
        };
        eprintln!("== {label}: signing {sets} SETs…");
        let prefix = format!("r{round}");
        let tokens = sign_sets(&key, sets, |i| background_set(ISS, AUD, &prefix, i));
        let figures = measure(
            &Setup {
                label: &label,
                instances,
                partitions,
                jwks_uri: &jwks.jwks_uri(),
                key: &key,
            },
            tokens,
            concurrency,
        )
        .await?;
        eprintln!(
            "   {:.0} SETs/s accepted, all applied in {:.2} s, {:.3} ms CPU per SET",
            figures.accepted_per_sec, figures.applied_secs, figures.cpu_ms_per_set
        );
        all.push(figures);
    }
    let single = &all[0];
    println!(
        "| configuration | accepted SETs/s | vs single node | push p50 ms | push p99 ms | all applied s | CPU ms per SET | vs single node |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for f in &all {
        println!(
            "| {} | {:.0} | {:.2} | {:.1} | {:.1} | {:.2} | {:.3} | {:.2} |",
            f.label,
            f.accepted_per_sec,
            f.accepted_per_sec / single.accepted_per_sec,
            f.p50_ms,
            f.p99_ms,
            f.applied_secs,
            f.cpu_ms_per_set,
            f.cpu_ms_per_set / single.cpu_ms_per_set,
        );
    }
    Ok(())
}

/// What one configuration is.
struct Setup<'a> {
    label: &'a str,
    /// Instances in cluster mode (0: one single node).
    instances: usize,
    partitions: i32,
    jwks_uri: &'a str,
    key: &'a SigningKey,
}

/// One configuration: its Vigils started, `tokens` pushed, until every one is applied.
async fn measure(
    setup: &Setup<'_>,
    tokens: Vec<String>,
    concurrency: usize,
) -> anyhow::Result<Figures> {
    let Setup {
        label,
        instances,
        partitions,
        jwks_uri,
        key,
    } = *setup;
    let kafka = MockCluster::new(3)?;
    let name = format!("bench{}", vigil::signal::now_ms());
    let topics = vigil::cluster::Topics::of(&name);
    for (topic, count) in topics.with_partitions(partitions) {
        kafka.create_topic(topic, count, 3)?;
    }
    let mut dirs = Vec::new();
    let mut vigils = Vec::new();
    for _ in 0..instances.max(1) {
        let dir = tempfile::tempdir()?;
        let mut config = loopback_config(dir.path());
        config.transmitters.push(TransmitterConfig::with_jwks(
            "load",
            ISS,
            vec![AUD.into()],
            "Bearer load",
            vec![Alg::RS256],
            jwks_uri,
        ));
        if instances > 0 {
            config.cluster.brokers = kafka.bootstrap_servers();
            config.cluster.name = name.clone();
            config.cluster.partitions = partitions;
        }
        vigils.push(Vigil::start(config).await?);
        dirs.push(dir);
    }
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()?;
    let urls: Vec<String> = vigils
        .iter()
        .map(|v| format!("http://{}/ssf/push/load", v.local_addr()))
        .collect();
    let metrics_url = format!("http://{}/metrics", vigils[0].local_addr());
    let token = std::fs::read_to_string(dirs[0].path().join("admin.token"))?;
    if instances > 0 {
        wait_for_partitions(&http, &vigils, &dirs, partitions).await?;
    }
    let folded_before = engine_signals(&http, &metrics_url, &token).await?;
    // Warm-up: keys loaded on every instance, connections open; counted as applied below.
    let mut warm_ups = 0;
    for url in &urls {
        let warm = key.sign_set(&background_set(
            ISS,
            AUD,
            &format!("warm-{label}"),
            warm_ups,
        ))?;
        wait_until_accepted(&http, url, &warm).await?;
        warm_ups += 1;
    }
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    let total = tokens.len();
    let drive = drive_max_over(&http, &urls, "Bearer load", tokens, concurrency).await;
    let (latencies, failures) = (drive.latencies_ms, drive.failures);
    let pushed_secs = started.elapsed().as_secs_f64();
    anyhow::ensure!(failures == 0, "{label}: {failures} pushes not accepted");
    // Applied: every SET folded by some instance's engine (the counter is the process's, summed
    // over the instances in it).
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let folded = engine_signals(&http, &metrics_url, &token).await? - folded_before;
        if folded >= (total + warm_ups) as f64 {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{label}: {folded} of {total} applied"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let applied_secs = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu_before;
    for v in vigils {
        v.shutdown().await;
    }
    Ok(Figures {
        label: label.to_owned(),
        accepted_per_sec: total as f64 / pushed_secs,
        p50_ms: quantile(&latencies, 0.5),
        p99_ms: quantile(&latencies, 0.99),
        applied_secs,
        cpu_ms_per_set: cpu * 1e3 / total as f64,
    })
}

/// Waits until the group has given every partition to some instance.
async fn wait_for_partitions(
    http: &reqwest::Client,
    vigils: &[Vigil],
    dirs: &[tempfile::TempDir],
    partitions: i32,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut owned = 0;
        for (v, dir) in vigils.iter().zip(dirs) {
            let token = std::fs::read_to_string(dir.path().join("admin.token"))?;
            let ready: serde_json::Value = http
                .get(format!("http://{}/readyz", v.local_addr()))
                .bearer_auth(token.trim())
                .send()
                .await?
                .json()
                .await?;
            owned += ready["kafka"]["owned_partitions"]
                .as_array()
                .map_or(0, Vec::len);
        }
        if owned == partitions as usize {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "the partitions were not split");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Pushes `token` until it is accepted (503 while the instance loads its transmitter's keys).
async fn wait_until_accepted(http: &reqwest::Client, url: &str, token: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = push_set(http, url, "Bearer load", token).await?;
        if status == 202 {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "{url} never loaded its keys");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `vigil_engine_signals_total`, summed over its labels, from `/metrics`.
async fn engine_signals(http: &reqwest::Client, url: &str, token: &str) -> anyhow::Result<f64> {
    let text = http
        .get(url)
        .bearer_auth(token.trim())
        .send()
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("vigil_engine_signals_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}
