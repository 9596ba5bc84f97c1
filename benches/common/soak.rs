//! The soak: Vigil in this process under a constant push rate for a long time, its data directory's
//! bytes, the process's RSS and the push latency sampled at fixed intervals. With a short intake
//! retention window the intake log fills to the window and then stays flat: what was written is
//! dropped as fast as it is written. Shared by `cargo bench --bench soak` (30 minutes, the
//! figure) and `tests/soak.rs` (2 minutes in CI, a test that pruning keeps disk flat).
//!
//! SETs come from a pool signed up front and pushed in a cycle: a SET comes round again only after
//! its first copy left the retention window (the pool covers the window and a margin), so every
//! push is a new record, as in a real feed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vigil::config::TransmitterConfig;
use vigil::jose::Alg;
use vigil::sim::{jwks_document, JwksServer, SigningKey};
use vigil::Vigil;

/// Pushes in flight at most: three quarters of the server's per-peer connection budget (see
/// where the client is built).
const IN_FLIGHT: usize = 192;

/// How a soak runs.
#[derive(Debug, Clone)]
pub struct Settings {
    pub secs: u64,
    /// SETs pushed per second, constant (an open loop: a slow answer does not slow the load).
    pub rate: u64,
    pub retention_secs: u64,
    pub segment_bytes: u64,
    pub sample_every: Duration,
    /// What the transmitter signs with: EdDSA signs fast enough to fill a pool for thousands of
    /// SETs a second over a 5-minute window, where RS256 takes minutes.
    pub alg: Alg,
}

/// One interval's figures.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Seconds since the load started, at the interval's end.
    pub at_secs: u64,
    pub disk_bytes: u64,
    pub intake_bytes: u64,
    /// The state store's file: redb grows it by doubling when one commit needs more free pages
    /// than it has, so a failing flatness check says which of the two grew.
    pub store_bytes: u64,
    pub rss_bytes: u64,
    pub accepted: usize,
    pub failed: usize,
    /// The failed pushes by what answered: an HTTP status, or `transport` (no answer: the
    /// connection refused or cut).
    pub failures: std::collections::BTreeMap<String, usize>,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// Bytes of every file under `dir`.
pub fn dir_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Runs a soak and returns a sample per interval.
pub async fn run(settings: &Settings) -> anyhow::Result<Vec<Sample>> {
    let iss = "https://idp.example.com/";
    let aud = "https://sp.example.com/caep";
    let key = Arc::new(SigningKey::generate(settings.alg, "soak")?);
    let jwks =
        JwksServer::start("127.0.0.1:0".parse()?, jwks_document(&[key.public_jwk()?])).await?;
    let dir = tempfile::tempdir()?;
    let mut config = super::loopback_config(dir.path());
    config.intake.retention_secs = settings.retention_secs;
    config.intake.segment_bytes = settings.segment_bytes;
    config.transmitters.push(TransmitterConfig::with_jwks(
        "soak",
        iss,
        vec![aud.into()],
        "Bearer soak",
        vec![settings.alg],
        &jwks.jwks_uri(),
    ));
    let vigil = Vigil::start(config).await?;
    let url = format!("http://{}/ssf/push/soak", vigil.local_addr());
    // The window, two segments' fill and a margin: a SET comes round once its first copy is gone.
    let pool = (settings.rate * (settings.retention_secs + 30)) as usize + 2 * 1000;
    eprintln!("soak: signing {pool} {} SETs…", settings.alg);
    let tokens = Arc::new(super::sign_sets(&key, pool, |i| {
        super::background_set(iss, aud, "soak", i)
    }));
    // One transmitter, one address: it must stay inside the server's budget of connections per
    // peer (`server.max_connections_per_peer`, 256), or the server closes the connections beyond
    // it at once. With as many pushes in flight as the budget, the pool's churn — an idle
    // connection dropped and a new one opened while the server has not yet seen the first one
    // close — went over it now and then (268 refusals, 16 failed pushes in 7 minutes), which is
    // what the soak's rare "transport" failures were. Fewer in flight than the budget, and every
    // connection kept in the pool, leaves room for that churn.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(IN_FLIGHT)
        .build()?;
    let latencies = Arc::new(std::sync::Mutex::new(Vec::<f64>::new()));
    let failed = Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::<
        String,
        usize,
    >::new()));
    let in_flight = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let start = Instant::now();
    let period = Duration::from_secs_f64(1.0 / settings.rate.max(1) as f64);
    let mut samples = Vec::new();
    let mut next_sample = start + settings.sample_every;
    let mut sent: u64 = 0;
    let end = start + Duration::from_secs(settings.secs);
    while Instant::now() < end {
        // Open loop: the n-th SET is due at start + n × period, whatever the answers did.
        let due = start + period.mul_f64(sent as f64);
        if due > Instant::now() {
            tokio::time::sleep_until(due.into()).await;
        }
        let token_index = (sent as usize) % tokens.len();
        sent += 1;
        let permit = in_flight.clone().acquire_owned().await?;
        let (client, url, tokens, recorded, failures) = (
            client.clone(),
            url.clone(),
            tokens.clone(),
            latencies.clone(),
            failed.clone(),
        );
        tokio::spawn(async move {
            let t = Instant::now();
            let answer = super::push_set(&client, &url, "Bearer soak", &tokens[token_index]).await;
            if matches!(answer, Ok(202)) {
                recorded
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(t.elapsed().as_secs_f64() * 1000.0);
            } else {
                // A transport failure is named by its root cause (refused, reset, closed before
                // the answer, …): the kinds tell a budget's refusal from a keep-alive race.
                let kind = match answer {
                    Ok(status) => status.to_string(),
                    Err(e) => format!("transport: {}", e.root_cause()),
                };
                *failures
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .entry(kind)
                    .or_default() += 1;
            }
            drop(permit);
        });
        if Instant::now() >= next_sample {
            next_sample += settings.sample_every;
            let mut l = std::mem::take(
                &mut *latencies
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            );
            l.sort_by(f64::total_cmp);
            let mut sample = Sample {
                at_secs: start.elapsed().as_secs(),
                disk_bytes: dir_bytes(dir.path()),
                intake_bytes: dir_bytes(&dir.path().join(vigil::intake::LOG_DIR)),
                store_bytes: std::fs::metadata(dir.path().join(vigil::store::STATE_FILE))
                    .map_or(0, |m| m.len()),
                rss_bytes: super::rss_bytes(),
                accepted: l.len(),
                failed: 0,
                failures: std::mem::take(
                    &mut *failed
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner),
                ),
                p50_ms: super::quantile(&l, 0.5),
                p99_ms: super::quantile(&l, 0.99),
            };
            sample.failed = sample.failures.values().sum();
            eprintln!(
                "soak: {:>5} s  disk {:>7.1} MiB (intake log {:>6.1} MiB, state store {:>6.1} MiB)  RSS {:>6.1} MiB  {} accepted, {} failed {:?}  p50 {:.2} ms  p99 {:.2} ms",
                sample.at_secs,
                sample.disk_bytes as f64 / 1048576.0,
                sample.intake_bytes as f64 / 1048576.0,
                sample.store_bytes as f64 / 1048576.0,
                sample.rss_bytes as f64 / 1048576.0,
                sample.accepted,
                sample.failed,
                sample.failures,
                sample.p50_ms,
                sample.p99_ms
            );
            samples.push(sample);
        }
    }
    let _ = in_flight.acquire_many(IN_FLIGHT as u32).await;
    // What the server refused, by reason (its connection budgets), beside the client's failures.
    if let Ok(metrics) = client
        .get(format!("http://{}/metrics", vigil.local_addr()))
        .bearer_auth(vigil.admin_token().unwrap_or_default())
        .send()
        .await
    {
        for line in metrics.text().await.unwrap_or_default().lines() {
            if line.starts_with(vigil::telemetry::HTTP_CONNECTIONS_REFUSED) {
                eprintln!("soak: server: {line}");
            }
        }
    }
    vigil.shutdown().await;
    Ok(samples)
}
