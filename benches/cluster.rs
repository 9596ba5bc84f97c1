//! Cluster mode against a single node, in one run on this machine: RS256 SETs pushed as fast as
//! they are answered (64 connections, round-robin over the instances), then the time until every
//! one is applied by an engine, and the CPU seconds the whole process spent per SET.
//!
//! Run: `cargo bench --bench cluster -- [--sets 20000] [--concurrency 64] [--partitions 12]
//! [--grants 100000] [--probes 1000] [--standby 0|1] [--brokers HOST:PORT]` (`--brokers`: the handover
//! part on a Kafka-protocol broker already running, e.g. tansu, instead of the in-process mock)
//!
//! Configurations, each on a fresh in-process mock cluster of three brokers: a single node (its
//! intake is a local file: the ceiling this stack reaches without Kafka), then one, two and three
//! instances in cluster mode (every SET appended to `<name>.signals` with `acks=all` before its
//! 202, applied by its principal's owner). The instances run in this process, on the same 2 cores
//! as the load generator and the brokers, so the honest figure is CPU per SET and how it changes
//! with the instance count, not a speed-up.
//!
//! Then handover, for each `--grants` count (comma-free: run again for another): one instance
//! holds the grants; a second joins and restores half of them from the state topic (join
//! handover); then signal → revocation latency in steady state (probes: a RISC account-disabled
//! SET each, for a user with a grant, paced at 200/s; latency = the decision's time − the push's,
//! one process, one clock); then the first instance leaves cleanly while probes go on, and the
//! second restores the rest (leave handover, and the probes' latency during it) — to the grant's
//! revocation, and to the revocation's SET verified at an enforcement point whose push stream's
//! deliverer moves with its partition. Twice: without
//! standby copies (a restore reads the partition from its start), then with `cluster.standby`
//! (each instance follows the whole state topic; a restore reads only what follows its copy).
//!
//! librdkafka's mock broker keeps at most 5 MB (or 100 000 batches) per partition and drops the
//! oldest beyond that, as if the topic had a tiny retention: the state topic holds about 600
//! bytes a grant (its row and its identifier's link), so keep `grants × 600 / partitions` under
//! 5 MB (100 000 grants fit 12 partitions; 1 000 000 need 240). A run past it loses state in the
//! broker, not in Vigil, and fails when a probe's grant is not found.

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
    // Vigil's own log when asked for (`VIGIL_LOG=info`): where a handover spends its time.
    if std::env::var_os("VIGIL_LOG").is_some() {
        vigil::telemetry::init_logging();
    }
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
    let grants = arg("--grants", 100_000) as usize;
    let probes = arg("--probes", 1_000) as usize;
    // `--standby 0`: only without standby copies, `1`: only with them, else both.
    let standby_runs: &[bool] = match arg("--standby", 2) {
        0 => &[false],
        1 => &[true],
        _ => &[false, true],
    };
    let mut handovers = Vec::new();
    for &standby in standby_runs {
        if grants > 0 {
            handovers.push((
                standby,
                handover(partitions, grants, probes, standby, &jwks.jwks_uri(), &key).await?,
            ));
        }
    }
    if !handovers.is_empty() {
        println!();
        println!("| grants | standby | registered/s | bytes a grant | join: restored rows | join: restore s / settled s | leave: restored rows | leave: restore s / owned s | steady p50 / p99 / p999 ms | during leave p50 / p99 / p999 ms (probes) | at the EP, steady | at the EP, during leave (delivered) |");
        println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    }
    for (standby, h) in &handovers {
        let q = |l: &[f64]| {
            format!(
                "{:.1} / {:.1} / {:.1}",
                quantile(l, 0.5),
                quantile(l, 0.99),
                quantile(l, 0.999)
            )
        };
        println!(
            "| {grants} | {} | {:.0} | {:.0} | {} | {:.2} / {:.2} | {} | {:.2} / {:.2} | {} | {} ({}) | {} | {} ({}) |",
            if *standby { "yes" } else { "no" },
            h.registered_per_sec,
            h.bytes_per_grant,
            h.join_restored,
            h.join_restore_secs,
            h.join_secs,
            h.leave_restored,
            h.leave_restore_secs,
            h.leave_secs,
            q(&h.steady_ms),
            q(&h.during_leave_ms),
            h.during_leave_ms.len(),
            q(&h.steady_ep_ms),
            q(&h.during_leave_ep_ms),
            h.during_leave_ep_ms.len()
        );
    }
    Ok(())
}

/// What a handover run measured.
struct Handover {
    registered_per_sec: f64,
    /// Rows restored by the joining instance, and the time from its start until the group's
    /// partitions were split with every restore done.
    join_restored: u64,
    join_secs: f64,
    /// Of which restoring (`vigil_cluster_restore_seconds`, summed over the rebalances).
    join_restore_secs: f64,
    /// Rows restored by the remaining instance when the other left, and the time from the
    /// leave until it owned every partition.
    leave_restored: u64,
    leave_secs: f64,
    leave_restore_secs: f64,
    /// Signal → revocation latencies (ms, sorted).
    steady_ms: Vec<f64>,
    during_leave_ms: Vec<f64>,
    /// Signal → the revocation's SET verified at an enforcement point whose push stream moves
    /// with its partition (ms, sorted).
    steady_ep_ms: Vec<f64>,
    during_leave_ep_ms: Vec<f64>,
    /// The first instance's data directory after the registrations, bytes a grant.
    bytes_per_grant: f64,
}

/// The load generator as a transmitter Vigil trusts (its keys at `jwks_uri`).
fn load_transmitter(jwks_uri: &str) -> TransmitterConfig {
    TransmitterConfig::with_jwks(
        "load",
        ISS,
        vec![AUD.into()],
        "Bearer load",
        vec![Alg::RS256],
        jwks_uri,
    )
}

const BENCH_TOKEN: &str = "bench-cluster-admin-token-0123456789";

/// An instance of the handover cluster: the transmitter, one shared API client.
async fn handover_instance(
    dir: &std::path::Path,
    kafka: &str,
    name: &str,
    partitions: i32,
    standby: bool,
    jwks_uri: &str,
) -> anyhow::Result<Vigil> {
    use vigil::config::{ApiClientConfig, Role};
    let mut config = loopback_config(dir);
    config.transmitters.push(load_transmitter(jwks_uri));
    config.clients = vec![ApiClientConfig {
        name: "bench".into(),
        token: BENCH_TOKEN.into(),
        roles: vec![Role::Grants, Role::Check, Role::Operator, Role::Metrics],
        max_grants: None,
    }];
    config.cluster.brokers = kafka.to_owned();
    config.cluster.name = name.to_owned();
    config.cluster.partitions = partitions;
    config.cluster.standby = standby;
    common::add_eps(&mut config);
    // librdkafka's mock group coordinator waits up to a session timeout for members to rejoin
    // a rebalance (45 s by default): a short one, with heartbeats to match.
    for (k, v) in [
        ("heartbeat_interval_ms", "500"),
        ("session_timeout_ms", "6000"),
    ] {
        config.cluster.properties.insert(k.into(), v.into());
    }
    config.validate()?;
    Ok(Vigil::start(config).await?)
}

/// What `/readyz` says: the partitions owned and how many are being restored.
async fn owned_and_restoring(
    http: &reqwest::Client,
    vigil: &Vigil,
) -> anyhow::Result<(usize, usize)> {
    let ready: serde_json::Value = http
        .get(format!("http://{}/readyz", vigil.local_addr()))
        .bearer_auth(BENCH_TOKEN)
        .send()
        .await?
        .json()
        .await?;
    Ok((
        ready["kafka"]["owned_partitions"]
            .as_array()
            .map_or(0, Vec::len),
        ready["kafka"]["restoring"].as_array().map_or(0, Vec::len),
    ))
}

/// Rows restored and seconds spent restoring (`vigil_cluster_restored_rows_total`,
/// `vigil_cluster_restore_seconds_sum`) in the process (every instance in it: the metrics
/// registry is the process's).
async fn restored(http: &reqwest::Client, vigil: &Vigil) -> anyhow::Result<(u64, f64)> {
    let text = http
        .get(format!("http://{}/metrics", vigil.local_addr()))
        .bearer_auth(BENCH_TOKEN)
        .send()
        .await?
        .text()
        .await?;
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Ok((
        value("vigil_cluster_restored_rows_total") as u64,
        value("vigil_cluster_restore_seconds_sum"),
    ))
}

/// Waits until `vigils` own `partitions` between them, none restoring, each some.
async fn owned_by(
    http: &reqwest::Client,
    vigils: &[&Vigil],
    partitions: usize,
) -> anyhow::Result<()> {
    // Restores on librdkafka's mock broker take minutes at a million grants (its one thread
    // serves every fetch): long enough for the largest runs, short enough to end a stuck one.
    let deadline = Instant::now() + Duration::from_secs(3600);
    loop {
        let mut owned = 0;
        let mut restoring = 0;
        let mut each = usize::MAX;
        for v in vigils {
            let (o, r) = owned_and_restoring(http, v).await?;
            owned += o;
            restoring += r;
            each = each.min(o);
        }
        if owned == partitions && restoring == 0 && each > 0 {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "the partitions did not settle");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn probe_email(i: usize) -> String {
    format!("holder{i}@example.com")
}

/// Pushes one account-disabled SET per user in `users`, paced at `per_sec`, to `url`; returns
/// each user's push time (seconds, the system clock Vigil's decisions are stamped with).
async fn probe(
    http: &reqwest::Client,
    url: &str,
    key: &SigningKey,
    users: std::ops::Range<usize>,
    per_sec: u64,
    stop: &std::sync::atomic::AtomicBool,
) -> anyhow::Result<Vec<(usize, f64)>> {
    let mut sent = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / per_sec.max(1)));
    for u in users {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            break;
        }
        tick.tick().await;
        let token = key.sign_set(&serde_json::json!({
            "iss": ISS, "aud": AUD, "jti": format!("probe-{u}"), "iat": vigil::signal::now_ms() / 1000,
            "sub_id": {"format": "email", "email": probe_email(u)},
            "events": {"https://schemas.openid.net/secevent/risc/event-type/account-disabled": {}}
        }))?;
        let at = vigil::signal::now_ms() as f64 / 1000.0;
        // A push refused while partitions move (503) is retried, as a transmitter would: the
        // latency counts from the first attempt.
        let deadline = Instant::now() + Duration::from_secs(60);
        while push_set(http, url, "Bearer load", &token).await? != 202 {
            anyhow::ensure!(Instant::now() < deadline, "probe {u} never accepted");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        sent.push((u, at));
    }
    Ok(sent)
}

/// The latency (ms, sorted) from each probe's push to its grant's revocation (`revoked.at`, read
/// from the grant at `base`: it moves with the grant, while a departed instance's decision list
/// goes with it).
async fn revocation_latencies(
    http: &reqwest::Client,
    base: &str,
    sent: &[(usize, f64)],
) -> anyhow::Result<Vec<f64>> {
    let mut out = Vec::new();
    for (u, at) in sent {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let grant: serde_json::Value = http
                .get(format!("{base}/v1/grants/h{u}"))
                .bearer_auth(BENCH_TOKEN)
                .send()
                .await?
                .json()
                .await?;
            let revoked = grant["revoked"]["at"].as_f64();
            if let Some(time) = revoked {
                out.push((time - at) * 1e3);
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "probe {u} never revoked its grant"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    out.sort_by(f64::total_cmp);
    Ok(out)
}

async fn handover(
    partitions: i32,
    grants: usize,
    probes: usize,
    standby: bool,
    jwks_uri: &str,
    key: &Arc<SigningKey>,
) -> anyhow::Result<Handover> {
    let name = format!("handover{}", vigil::signal::now_ms());
    // `--brokers HOST:PORT`: a Kafka-protocol broker already running (Vigil creates its topics);
    // else librdkafka's mock cluster, in-process.
    let (_mock, brokers) = match common::text_arg("--brokers") {
        Some(brokers) => (None, brokers),
        None => {
            let kafka = MockCluster::new(3)?;
            let topics = vigil::cluster::Topics::of(&name);
            for (topic, count) in topics.with_partitions(partitions) {
                kafka.create_topic(topic, count, 3)?;
            }
            let brokers = kafka.bootstrap_servers();
            (Some(kafka), brokers)
        }
    };
    let (dir_a, dir_b) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()?;
    let a = handover_instance(dir_a.path(), &brokers, &name, partitions, standby, jwks_uri).await?;
    owned_by(&http, &[&a], partitions as usize).await?;
    // An enforcement point with a push stream (the cluster's: its deliverer is the owner of the
    // stream's partition, which moves too); every receipt's time, by the probe's `jti`.
    let ep = vigil::sim::ep::subscribe(
        &format!("http://{}", a.local_addr()),
        "token-for-ep-push-0123456789",
        "ep-push",
        vigil::sim::ep::Method::Push,
        "127.0.0.1:0".parse()?,
    )
    .await
    .map_err(anyhow::Error::msg)?;
    let receipts = receipts_of(ep);

    eprintln!("== handover (standby: {standby}): registering {grants} grants on one instance…");
    let started = Instant::now();
    let now = vigil::signal::now_ms() / 1000;
    let mut tasks = Vec::new();
    let workers = 256;
    for t in 0..workers {
        let engine = a.engine().clone();
        tasks.push(tokio::spawn(async move {
            let mut i = t;
            while i < grants {
                let request: vigil::grant::GrantRequest =
                    serde_json::from_value(serde_json::json!({
                    "id": format!("h{i}"), "kind": "session",
                    "subject": {"format": "email", "email": probe_email(i)},
                    "issued_at": now - 60, "expires_at": now + 86_400}))?;
                engine
                    .register(request, vigil::grant::Registrant::client("bench"))
                    .await?;
                i += workers;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let registered_per_sec = grants as f64 / started.elapsed().as_secs_f64();
    let store_bytes = bytes_under(dir_a.path());
    let bytes_per_grant = store_bytes as f64 / grants as f64;
    eprintln!(
        "   {registered_per_sec:.0} registrations/s; data directory {:.0} MB ({:.0} bytes a grant)",
        store_bytes as f64 / 1e6,
        store_bytes as f64 / grants as f64
    );

    let before = restored(&http, &a).await?;
    let joined_at = Instant::now();
    let b = handover_instance(dir_b.path(), &brokers, &name, partitions, standby, jwks_uri).await?;
    owned_by(&http, &[&a, &b], partitions as usize).await?;
    let join_secs = joined_at.elapsed().as_secs_f64();
    let after = restored(&http, &a).await?;
    let (join_restored, join_restore_secs) = (after.0 - before.0, after.1 - before.1);
    eprintln!("   join: {join_restored} rows restored in {join_restore_secs:.2} s, settled in {join_secs:.2} s");

    let probes = probes.min(grants / 2);
    let url_b = format!("http://{}/ssf/push/load", b.local_addr());
    let base_b = format!("http://{}", b.local_addr());
    // Keys loaded and connections open before the first probe.
    let warm = key.sign_set(&background_set(ISS, AUD, "handover-warm", 0))?;
    wait_until_accepted(&http, &url_b, &warm).await?;
    let never = std::sync::atomic::AtomicBool::new(false);
    let sent_steady = probe(&http, &url_b, key, 0..probes, 200, &never).await?;
    let steady_ms = revocation_latencies(&http, &base_b, &sent_steady).await?;

    // The first instance leaves while probes go on (to the second), from a second before until
    // a second after the second instance owns every partition.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let during = {
        let (http, url_b, key, stop) = (http.clone(), url_b.clone(), key.clone(), stop.clone());
        tokio::spawn(async move { probe(&http, &url_b, &key, probes..grants, 200, &stop).await })
    };
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let before = restored(&http, &b).await?;
    let left_at = Instant::now();
    a.shutdown().await;
    owned_by(&http, &[&b], partitions as usize).await?;
    let leave_secs = left_at.elapsed().as_secs_f64();
    let after = restored(&http, &b).await?;
    let (leave_restored, leave_restore_secs) = (after.0 - before.0, after.1 - before.1);
    eprintln!("   leave: {leave_restored} rows restored in {leave_restore_secs:.2} s, owned in {leave_secs:.2} s");
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent_during = during.await??;
    let during_leave_ms = revocation_latencies(&http, &base_b, &sent_during).await?;
    let steady_ep_ms = delivered_latencies(&receipts, &sent_steady).await;
    let during_leave_ep_ms = delivered_latencies(&receipts, &sent_during).await;
    b.shutdown().await;
    Ok(Handover {
        registered_per_sec,
        join_restored,
        join_secs,
        join_restore_secs,
        leave_restored,
        leave_secs,
        leave_restore_secs,
        steady_ms,
        during_leave_ms,
        steady_ep_ms,
        during_leave_ep_ms,
        bytes_per_grant,
    })
}

/// Receipt times (ms since the epoch) at `ep`, by the `txn` of the signal that caused each SET
/// (the probe's `jti`), collected as they arrive.
fn receipts_of(
    mut ep: vigil::sim::ep::EnforcementPoint,
) -> Arc<std::sync::Mutex<std::collections::HashMap<String, i64>>> {
    let receipts = Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
    let into = receipts.clone();
    tokio::spawn(async move {
        while let Some(r) = ep.received.recv().await {
            if let (Some(txn), Ok(mut map)) = (r.txn(), into.lock()) {
                map.entry(txn.to_owned()).or_insert(r.at_ms);
            }
        }
    });
    receipts
}

/// The latency (ms, sorted) from each probe's push to its revocation's first receipt at the
/// enforcement point; waits up to 60 s for the last (a probe never delivered is left out, and
/// the count printed says so).
async fn delivered_latencies(
    receipts: &std::sync::Mutex<std::collections::HashMap<String, i64>>,
    sent: &[(usize, f64)],
) -> Vec<f64> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out: Vec<f64> = {
            let Ok(map) = receipts.lock() else {
                return Vec::new();
            };
            sent.iter()
                .filter_map(|(u, at)| {
                    map.get(&format!("probe-{u}"))
                        .map(|&ms| ms as f64 - at * 1e3)
                })
                .collect()
        };
        if out.len() == sent.len() || Instant::now() >= deadline {
            let mut out = out;
            out.sort_by(f64::total_cmp);
            return out;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Bytes of the files under `dir` (a data directory: its stores, intake and audit log).
fn bytes_under(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => bytes_under(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
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
        config.transmitters.push(load_transmitter(jwks_uri));
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
