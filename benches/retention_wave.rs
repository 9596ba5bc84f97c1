//! A retention wave under load: C contexts that fall due at the same moment (a risk feed that
//! scored every account at once, a window ago), forgotten by context retention while probes —
//! one session revocation every 20 ms, each for a grant of its own — keep arriving. Prints each
//! second's probe latency (submitted → the grant revoked in the engine), when a sample of the
//! filled contexts had all left memory, and the probes before the wave against those from it on
//! (the store's deletions go on after the contexts have left memory).
//!
//! Run: `cargo bench --bench retention_wave -- [--contexts 200000] [--probes 2500]`

mod common;

use std::time::{Duration, Instant};

use serde_json::json;
use vigil::engine::EngineSettings;
use vigil::grant::GrantRequest;
use vigil::signal::Signal;

/// The retention window: the filled contexts' newest facts are dated so that they fall due
/// [`LEAD`] after the fill starts.
const WINDOW: Duration = Duration::from_secs(3600);
const LEAD: f64 = 30.0;
const PROBE_GAP: Duration = Duration::from_millis(20);

fn main() -> anyhow::Result<()> {
    let contexts = common::arg("--contexts", 200_000) as usize;
    let probes = common::arg("--probes", 2_500) as usize;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(contexts, probes))
}

fn signal(claims: serde_json::Value) -> anyhow::Result<Signal> {
    let mut signal =
        vigil::evaluate::testing::signal_from_claims(&claims, 0).map_err(anyhow::Error::msg)?;
    signal.received_at_ms = vigil::signal::now_ms();
    Ok(signal)
}

async fn run(contexts: usize, probes: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let run = common::EngineRun::start(
        dir.path(),
        EngineSettings {
            context_retention: WINDOW,
            context_scan_interval: Duration::from_millis(250),
            ..EngineSettings::default()
        },
    )?;
    let engine = run.engine.clone();

    for p in 0..probes {
        let req: GrantRequest = serde_json::from_value(json!({
            "id": format!("g{p}"), "kind": "session",
            "subject": {"format": "email", "email": format!("probe{p}@example.com")},
            "session": format!("s{p}"),
            "issued_at": 1_700_000_000, "expires_at": 4_000_000_000u64,
        }))?;
        engine
            .register(req, vigil::grant::Registrant::client("bench"))
            .await?;
    }

    // The fill: one LOW risk level per subject, all dated a window before the same moment.
    let started = Instant::now();
    let due_at = vigil::signal::now_ms() as f64 / 1000.0 + LEAD;
    let dated = due_at - WINDOW.as_secs_f64();
    let mut waiting = Vec::new();
    for part in 0..contexts.div_ceil(1000) {
        let mut batch = Vec::with_capacity(1000);
        for u in part * 1000..((part + 1) * 1000).min(contexts) {
            batch.push(signal(json!({
                "iss": "https://idp.example.com/", "aud": "vigil", "jti": format!("f{u}"),
                "iat": dated as i64, "sub_id": {"format": "email", "email": format!("user{u}@example.com")},
                "events": {"https://schemas.openid.net/secevent/caep/event-type/risk-level-change": {
                    "principal": "USER", "current_level": "LOW", "event_timestamp": dated}}
            }))?);
        }
        waiting.push(engine.submit_batch(batch)?);
    }
    tokio::task::spawn_blocking(move || {
        waiting
            .into_iter()
            .try_for_each(|done| done.wait_blocking())
    })
    .await??;
    let filled = started.elapsed().as_secs_f64();
    println!("retention_wave: {contexts} contexts filled in {filled:.1} s; due {LEAD:.0} s after the fill began");
    anyhow::ensure!(
        filled < LEAD - 5.0,
        "the fill took too long to leave time before the wave"
    );

    // Probes: a watcher thread sees each probed grant revoked.
    let watch = common::RevocationWatch::start(engine.clone(), Duration::from_micros(200));
    // When the wave ended: none of a hundred filled subjects, spread over the fill, known.
    let sample = (0..100)
        .map(|k| {
            let u = k * contexts / 100;
            vigil::subject::SubjectId::from_json(
                &json!({"format": "email", "email": format!("user{u}@example.com")}),
                false,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut wave_end = None;
    let mut waiting = Vec::new();
    for p in 0..probes {
        let now = vigil::signal::now_ms() as f64 / 1000.0;
        let probe = signal(json!({
            "iss": "https://idp.example.com/", "aud": "vigil", "jti": format!("p{p}"),
            "iat": now as i64, "sub_id": {"format": "complex",
                "user": {"format": "email", "email": format!("probe{p}@example.com")},
                "session": {"format": "opaque", "id": format!("s{p}")}},
            "events": {"https://schemas.openid.net/secevent/caep/event-type/session-revoked": {
                "initiating_entity": "policy", "event_timestamp": now}}
        }))?;
        watch.watch(format!("g{p}"), Instant::now());
        waiting.push(engine.submit_batch(vec![probe])?);
        if wave_end.is_none() && !sample.iter().any(|s| engine.knows(s)) {
            wave_end = Some(started.elapsed().as_secs_f64());
        }
        tokio::time::sleep(PROBE_GAP).await;
    }
    tokio::task::spawn_blocking(move || {
        waiting
            .into_iter()
            .try_for_each(|done| done.wait_blocking())
    })
    .await??;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let seen: Vec<(f64, f64)> = watch
        .finish()
        .into_iter()
        .map(|(at, ms)| (at.duration_since(started).as_secs_f64(), ms))
        .collect();
    anyhow::ensure!(
        seen.len() == probes,
        "{} of {probes} probes revoked",
        seen.len()
    );
    let wave_end = match wave_end {
        Some(at) => format!("the sampled contexts all forgotten by {at:.1} s"),
        None => "sampled contexts still known when the probes ended".to_owned(),
    };

    // Per second: probes sent in it, their latency p50 / p99 / max.
    let mut seconds: Vec<Vec<f64>> = Vec::new();
    for (at, ms) in &seen {
        let s = *at as usize;
        if seconds.len() <= s {
            seconds.resize(s + 1, Vec::new());
        }
        seconds[s].push(*ms);
    }
    println!("retention_wave: due at {LEAD:.0} s, {wave_end}");
    println!("| second | probes | p50 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|");
    for (s, ms) in seconds.iter_mut().enumerate() {
        if ms.is_empty() {
            continue;
        }
        ms.sort_by(f64::total_cmp);
        println!(
            "| {s} | {} | {:.1} | {:.1} | {:.1} |",
            ms.len(),
            common::quantile(ms, 0.5),
            common::quantile(ms, 0.99),
            ms[ms.len() - 1]
        );
    }
    let mut before: Vec<f64> = seen
        .iter()
        .filter(|(at, _)| *at < LEAD - 1.0)
        .map(|(_, ms)| *ms)
        .collect();
    // From a second before the contexts fall due to the end: the store's deletions go on after
    // the contexts have left memory.
    let mut from_due: Vec<f64> = seen
        .iter()
        .filter(|(at, _)| *at >= LEAD - 1.0)
        .map(|(_, ms)| *ms)
        .collect();
    before.sort_by(f64::total_cmp);
    from_due.sort_by(f64::total_cmp);
    let summary = |v: &[f64]| {
        if v.is_empty() {
            "none".to_owned()
        } else {
            format!(
                "p50 {:.1} / p99 {:.1} / max {:.1} ms ({} probes)",
                common::quantile(v, 0.5),
                common::quantile(v, 0.99),
                v[v.len() - 1],
                v.len()
            )
        }
    };
    println!("retention_wave: before the wave {}", summary(&before));
    println!("retention_wave: from the wave on {}", summary(&from_due));
    drop(engine);
    run.stop().await;
    Ok(())
}
