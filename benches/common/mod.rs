//! Shared by the load harnesses (each bench is its own crate and includes this with `mod common;`,
//! so not every harness uses every helper).
#![allow(dead_code)]

pub mod kafka;
pub mod soak;

/// The numeric value after `name` on the command line (`--signals 300`), else `default`.
pub fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The text after `name` on the command line (`--brokers 127.0.0.1:9092`), if given.
pub fn text_arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

/// Vigil's built-in defaults on a loopback port of its own, with its data in `dir`.
pub fn loopback_config(dir: &std::path::Path) -> vigil::Config {
    let mut config = vigil::Config {
        listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        data_dir: dir.to_owned(),
        ..vigil::Config::default()
    };
    // The simulated enforcement points are on loopback and poll as fast as the harness drives.
    config.outbound.allow_loopback = true;
    config.limits.enforcement_point_requests_per_sec = 1e6;
    // The harness is one transmitter and one client at the host's ceiling.
    config.limits.transmitter_sets_per_sec = 1e9;
    config.limits.client_requests_per_sec = 1e9;
    config.limits.burst = 1e9;
    config.limits.transmitter_max_inflight = 1 << 20;
    config
}

/// CPU time (user + system, seconds) this process has used so far, from `/proc/self/stat`.
/// Comparing CPU per unit of work is steadier than wall-clock rates on a shared 2-core machine.
pub fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may contain spaces) start at field 3; utime and
    // stime are fields 14 and 15, in clock ticks (100 per second on Linux).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// The `p` quantile (0..=1) of sorted samples (nearest rank); NaN when there are none.
pub fn quantile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[(((sorted.len() - 1) as f64) * p).round() as usize]
}

/// Signs `n` SETs on every core; `claims(i)` gives the i-th SET's claims.
pub fn sign_sets(
    key: &vigil::sim::SigningKey,
    n: usize,
    claims: impl Fn(usize) -> serde_json::Value + Sync,
) -> Vec<String> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let chunk = n.div_ceil(threads).max(1);
    let claims = &claims;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    (t * chunk..((t + 1) * chunk).min(n))
                        .map(|i| key.sign_set(&claims(i)).unwrap_or_default())
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

/// A load-test SET: a CAEP session-revoked for a session nobody holds a grant on, so it exercises
/// the whole receiver and the engine's routing without causing decisions.
pub fn background_set(iss: &str, aud: &str, prefix: &str, i: usize) -> serde_json::Value {
    serde_json::json!({
        "iss": iss, "aud": aud, "jti": format!("{prefix}-{i}"), "iat": 1_700_000_000 + i,
        "txn": format!("txn-{i}"),
        "sub_id": {"format": "complex",
            "user": {"format": "iss_sub", "iss": iss, "sub": format!("user-{}", i % 1000)},
            "session": {"format": "opaque", "id": format!("{prefix}-s-{i}")}},
        "events": {"https://schemas.openid.net/secevent/caep/event-type/session-revoked": {
            "initiating_entity": "policy", "reason_admin": {"en": "load"},
            "event_timestamp": 1_700_000_000 + i}}
    })
}

/// Pushes one SET (RFC 8935) and returns the HTTP status.
pub async fn push_set(
    client: &reqwest::Client,
    url: &str,
    authorization: &str,
    token: &str,
) -> anyhow::Result<u16> {
    let resp = client
        .post(url)
        .header("Content-Type", "application/secevent+jwt")
        .header("Authorization", authorization)
        .body(token.to_owned())
        .send()
        .await?;
    Ok(resp.status().as_u16())
}

/// What pushing a set of SETs as fast as possible gave.
pub struct Drive {
    /// Accepted (202) SETs per second.
    pub rate: f64,
    /// Latency of each accepted push, milliseconds, sorted.
    pub latencies_ms: Vec<f64>,
    /// Answers other than 202, and transport errors.
    pub failures: usize,
}

/// Pushes every token to `url` from `concurrency` connections, as fast as they are answered.
pub async fn drive_max(
    client: &reqwest::Client,
    url: &str,
    authorization: &str,
    tokens: Vec<String>,
    concurrency: usize,
) -> Drive {
    drive_max_over(
        client,
        &[url.to_owned()],
        authorization,
        tokens,
        concurrency,
    )
    .await
}

/// [`drive_max`] over several endpoints: the i-th token goes to `urls[i % urls.len()]`.
pub async fn drive_max_over(
    client: &reqwest::Client,
    urls: &[String],
    authorization: &str,
    tokens: Vec<String>,
    concurrency: usize,
) -> Drive {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let urls = Arc::new(urls.to_vec());
    let tokens = Arc::new(tokens);
    let next = Arc::new(AtomicUsize::new(0));
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, urls, auth, tokens, next) = (
            client.clone(),
            urls.clone(),
            authorization.to_owned(),
            tokens.clone(),
            next.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut failures = 0usize;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(token) = tokens.get(i) else { break };
                let t = std::time::Instant::now();
                match push_set(&client, &urls[i % urls.len()], &auth, token).await {
                    Ok(202) => latencies.push(t.elapsed().as_secs_f64() * 1e3),
                    _ => failures += 1,
                }
            }
            (latencies, failures)
        }));
    }
    let mut latencies_ms = Vec::with_capacity(tokens.len());
    let mut failures = 0;
    for t in tasks {
        match t.await {
            Ok((l, f)) => {
                latencies_ms.extend(l);
                failures += f;
            }
            Err(_) => failures += 1,
        }
    }
    let secs = started.elapsed().as_secs_f64();
    latencies_ms.sort_by(f64::total_cmp);
    Drive {
        rate: latencies_ms.len() as f64 / secs,
        latencies_ms,
        failures,
    }
}

/// The number after `key` on its line of `/proc/self/<file>` (0 if there is none).
fn proc_self_number(file: &str, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/self/{file}"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0)
}

/// Bytes this process has caused to be written to storage so far (`write_bytes` of
/// `/proc/self/io`: what reached the block layer, not what sat in the page cache and was
/// overwritten).
pub fn written_bytes() -> u64 {
    proc_self_number("io", "write_bytes:")
}

/// This process's resident set size, bytes (`VmRSS` in `/proc/self/status`).
pub fn rss_bytes() -> u64 {
    proc_self_number("status", "VmRSS:") * 1024
}

/// Subscribes one simulated enforcement point per delivery method (push, poll, SSE) to the Vigil at
/// `base`, as `ep-<method>` with the token `token-for-ep-<method>-0123456789` (configure those).
pub async fn subscribe_eps(
    base: &str,
) -> anyhow::Result<Vec<(String, vigil::sim::ep::EnforcementPoint)>> {
    use vigil::sim::ep::{subscribe, Method};
    let mut eps = Vec::new();
    for (name, method) in [
        ("push", Method::Push),
        ("poll", Method::Poll),
        ("sse", Method::Sse),
    ] {
        let ep = subscribe(
            base,
            &format!("token-for-ep-{name}-0123456789"),
            &format!("ep-{name}"),
            method,
            "127.0.0.1:0".parse()?,
        )
        .await
        .map_err(anyhow::Error::msg)?;
        eps.push((name.to_owned(), ep));
    }
    Ok(eps)
}

/// Per enforcement point, the latency (ms, sorted) from each signal's send time in `sent` (keyed
/// by `txn`, which Vigil's SETs carry over from the triggering signal) to its verified receipt;
/// waits for `expected` receipts or 5 s of silence.
pub async fn delivery_latencies(
    eps: Vec<(String, vigil::sim::ep::EnforcementPoint)>,
    sent: &std::collections::HashMap<String, std::time::Instant>,
    expected: usize,
) -> Vec<(String, Vec<f64>)> {
    use std::time::{Duration, Instant};
    let mut out = Vec::new();
    for (name, mut ep) in eps {
        let mut lat = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while lat.len() < expected && Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_secs(5), ep.received.recv()).await {
                Ok(Some(r)) => {
                    if let Some(t) = r.txn().and_then(|t| sent.get(t)) {
                        // The receipt's own clock time, moved onto the monotonic clock.
                        let age = (vigil::signal::now_ms() - r.at_ms).max(0) as u64;
                        let arrived = Instant::now() - Duration::from_millis(age);
                        lat.push(arrived.duration_since(*t).as_secs_f64() * 1e3);
                    }
                }
                _ => break,
            }
        }
        lat.sort_by(f64::total_cmp);
        out.push((name, lat));
    }
    out
}

/// Configures the three enforcement points `subscribe_eps` subscribes.
pub fn add_eps(config: &mut vigil::Config) {
    for m in ["push", "poll", "sse"] {
        config
            .enforcement_points
            .push(vigil::config::EnforcementPointConfig {
                name: format!("ep-{m}"),
                token: format!("token-for-ep-{m}-0123456789"),
                audience: None,
                signing_alg: None,
            });
    }
}

/// The built-in set with MEDIUM risk revoking a human's session instead of stepping it up: the
/// candidate the impact preview and replay benches compare with the running built-in set.
pub fn medium_revokes_candidate() -> anyhow::Result<vigil::policy::PolicySet> {
    let text = vigil::policy::BUILTIN.replace(
        "effect: step_up\n    reason: \"risk MEDIUM",
        "effect: revoke\n    reason: \"risk MEDIUM",
    );
    anyhow::ensure!(
        text != vigil::policy::BUILTIN,
        "the candidate must differ from the built-in set"
    );
    Ok(vigil::policy::PolicySet::from_sources(&[(
        "candidate.yaml".to_owned(),
        text,
    )])?)
}

/// An engine as it runs — the state store and its writer, intake and the audit log in one
/// directory, the built-in policy set — with its decisions drained, for the harnesses that drive
/// the engine without HTTP. [`EngineRun::stop`] shuts it down and joins its writers.
pub struct EngineRun {
    pub engine: std::sync::Arc<vigil::engine::Engine>,
    pub intake: vigil::intake::Intake,
    writer_thread: vigil::store::BatchWriterThread,
    intake_thread: vigil::intake::IntakeThreads,
}

impl EngineRun {
    /// Starts it in `dir` (inside a Tokio runtime: the decisions are drained by a task).
    pub fn start(
        dir: &std::path::Path,
        settings: vigil::engine::EngineSettings,
    ) -> anyhow::Result<EngineRun> {
        use std::sync::Arc;
        let db = vigil::store::open(dir)?;
        let (writer, writer_thread) = vigil::store::BatchWriter::start(db.clone(), "state", 1024)?;
        let (intake, intake_thread) = vigil::intake::Intake::open_dir(dir, 1024)?;
        let audit = Arc::new(vigil::audit::AuditLog::open(
            &dir.join("audit"),
            64 << 20,
            8,
        )?);
        let policy = vigil::policy::PolicySet::from_sources(&[(
            "live.yaml".into(),
            vigil::policy::BUILTIN.into(),
        )])?;
        let (decisions, rx) = vigil::engine::lanes(4096);
        tokio::spawn(rx.discard());
        let engine = Arc::new(vigil::engine::Engine::start(
            &db,
            writer,
            intake.clone(),
            audit,
            policy,
            decisions,
            settings,
        )?);
        Ok(EngineRun {
            engine,
            intake,
            writer_thread,
            intake_thread,
        })
    }

    /// Shuts the engine down and waits for the store's and intake's writers.
    pub async fn stop(self) {
        self.engine.shutdown().await;
        drop(self.engine);
        drop(self.intake);
        self.writer_thread.join();
        self.intake_thread.join();
    }
}

/// A thread that sees grants revoked in the engine — what `check` answers — by polling each
/// watched grant's status every `poll`, and times each from the moment it was handed over.
///
/// It polls only while a watched grant is pending and otherwise waits on a condition variable:
/// a thread waking every 100 µs for nothing took ≈ 5 % of the two cores in the load harness's
/// latency phase (10 000 context switches a second), CPU the Vigil it measures did not get.
pub struct RevocationWatch {
    shared: std::sync::Arc<WatchShared>,
    thread: std::thread::JoinHandle<()>,
}

/// What [`RevocationWatch`]'s callers and its thread share.
struct WatchShared {
    state: std::sync::Mutex<WatchState>,
    wake: std::sync::Condvar,
}

#[derive(Default)]
struct WatchState {
    sent: std::collections::HashMap<String, std::time::Instant>,
    seen: Vec<(std::time::Instant, f64)>,
    stop: bool,
}

impl RevocationWatch {
    pub fn start(
        engine: std::sync::Arc<vigil::engine::Engine>,
        poll: std::time::Duration,
    ) -> RevocationWatch {
        let shared = std::sync::Arc::new(WatchShared {
            state: std::sync::Mutex::new(WatchState::default()),
            wake: std::sync::Condvar::new(),
        });
        let thread = {
            let shared = shared.clone();
            std::thread::spawn(move || {
                let mut pending = std::collections::HashMap::new();
                loop {
                    {
                        let Ok(mut state) = shared.state.lock() else {
                            return;
                        };
                        while pending.is_empty() && state.sent.is_empty() && !state.stop {
                            state = match shared.wake.wait(state) {
                                Ok(s) => s,
                                Err(_) => return,
                            };
                        }
                        if state.stop {
                            return;
                        }
                        pending.extend(state.sent.drain());
                    }
                    let mut seen = Vec::new();
                    pending.retain(|id: &String, at: &mut std::time::Instant| {
                        let revoked = engine
                            .grant(id)
                            .is_some_and(|g| g.status == vigil::grant::GrantStatus::Revoked);
                        if revoked {
                            seen.push((*at, at.elapsed().as_secs_f64() * 1e3));
                        }
                        !revoked
                    });
                    if !seen.is_empty() {
                        if let Ok(mut state) = shared.state.lock() {
                            state.seen.extend(seen);
                        }
                    }
                    if !pending.is_empty() {
                        std::thread::sleep(poll);
                    }
                }
            })
        };
        RevocationWatch { shared, thread }
    }

    /// Watches `grant`, timed from `at`.
    pub fn watch(&self, grant: String, at: std::time::Instant) {
        if let Ok(mut state) = self.shared.state.lock() {
            state.sent.insert(grant, at);
        }
        self.shared.wake.notify_one();
    }

    /// How many watched grants were seen revoked so far.
    pub fn seen(&self) -> usize {
        self.shared.state.lock().map_or(0, |s| s.seen.len())
    }

    /// Stops the thread; each grant seen revoked: when it was handed over, and the milliseconds
    /// until it was seen revoked.
    pub fn finish(self) -> Vec<(std::time::Instant, f64)> {
        if let Ok(mut state) = self.shared.state.lock() {
            state.stop = true;
        }
        self.shared.wake.notify_one();
        let _ = self.thread.join();
        self.shared
            .state
            .lock()
            .map(|s| s.seen.clone())
            .unwrap_or_default()
    }
}
