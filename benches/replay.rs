//! Replay at scale: S recorded signals (CAEP risk-level-change, MEDIUM and LOW in turn) over U
//! subjects with two grants each, recorded in intake and applied through the engine as a push
//! would be (the ceiling, measured in the same run: the live engine, every shard busy, deciding
//! the same signals), then replayed through the live set and a candidate (MEDIUM revokes a
//! human's session instead of stepping it up) with `Engine::replay_blocking`.
//!
//! Run: `cargo bench --bench replay -- [--signals 1000000] [--subjects 100000]`

mod common;

use std::time::Instant;

use serde_json::json;
use vigil::engine::EngineSettings;
use vigil::grant::GrantRequest;

fn main() -> anyhow::Result<()> {
    let signals = common::arg("--signals", 1_000_000) as usize;
    let subjects = common::arg("--subjects", 100_000) as usize;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(signals, subjects))
}

async fn run(n: usize, subjects: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let run = common::EngineRun::start(
        dir.path(),
        EngineSettings {
            max_batch: 1024,
            ..EngineSettings::default()
        },
    )?;
    let (engine, intake) = (run.engine.clone(), run.intake.clone());
    let since = vigil::signal::now_ms() as f64 / 1000.0 - 1.0;

    // Two grants a subject: a session (steps up on MEDIUM) and an access token.
    let mut concurrency = 64;
    let mut tasks = Vec::new();
    for t in 0..concurrency {
        let engine = engine.clone();
        tasks.push(tokio::spawn(async move {
            let mut u = t;
            while u < subjects {
                for (kind, suffix) in [("session", "s"), ("access_token", "t")] {
                    let req: GrantRequest = serde_json::from_value(json!({
                        "id": format!("g{u}{suffix}"), "kind": kind,
                        "subject": {"format": "email", "email": format!("user{u}@example.com")},
                        "issued_at": 1_700_000_000, "expires_at": 4_000_000_000u64,
                        "enforcement_points": ["gw"]
                    }))?;
                    engine
                        .register(req, vigil::grant::Registrant::client("bench"))
                        .await?;
                }
                u += concurrency;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    println!(
        "replay grants={} subjects={subjects} registered",
        2 * subjects
    );

    // Record every signal in intake, as a push is recorded before its 202 (many at once: each
    // waits for the group commit's fsync).
    concurrency = 1024;
    let started = Instant::now();
    let base_time = vigil::signal::now_ms() as f64 / 1000.0;
    let mut tasks = Vec::new();
    for t in 0..concurrency {
        let intake = intake.clone();
        tasks.push(tokio::spawn(async move {
            let mut recorded = Vec::new();
            let mut i = t;
            while i < n {
                let user = i % subjects;
                let level = if (i / subjects) % 2 == 0 {
                    "MEDIUM"
                } else {
                    "LOW"
                };
                let at = base_time + i as f64 / 1000.0;
                let claims = json!({
                    "iss": "https://idp.example.com/", "aud": "vigil", "jti": format!("r{i}"),
                    "iat": at as i64, "sub_id": {"format": "email", "email": format!("user{user}@example.com")},
                    "events": {"https://schemas.openid.net/secevent/caep/event-type/risk-level-change": {
                        "principal": "USER", "current_level": level, "event_timestamp": at}}
                });
                let mut signal = vigil::evaluate::testing::signal_from_claims(&claims, 0)
                    .map_err(anyhow::Error::msg)?;
                signal.received_at_ms = vigil::signal::now_ms();
                match intake.record(&signal, "").await? {
                    vigil::intake::RecordOutcome::Recorded(seq) => {
                        signal.seq = seq;
                        recorded.push(signal);
                    }
                    vigil::intake::RecordOutcome::Duplicate(_) => {
                        anyhow::bail!("a duplicate jti")
                    }
                }
                i += concurrency;
            }
            anyhow::Ok(recorded)
        }));
    }
    let mut recorded = Vec::with_capacity(n);
    for t in tasks {
        recorded.extend(t.await??);
    }
    recorded.sort_by_key(|s| s.seq);
    println!(
        "replay {n} signals recorded in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // The ceiling: the live engine applying and deciding them, until intake has every one
    // marked processed.
    let started = Instant::now();
    for signal in recorded {
        engine.apply_signal(signal).await?;
    }
    while intake.pending_count()? > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let live_secs = started.elapsed().as_secs_f64();
    println!(
        "replay live engine: {n} signals applied and decided in {live_secs:.1} s ({:.0} signals/s)",
        n as f64 / live_secs
    );

    let candidate = common::medium_revokes_candidate()?;
    anyhow::ensure!(
        candidate.version != engine.policy_version(),
        "the candidate must differ from the running set"
    );
    let replaying = engine.clone();
    let rss_before = common::rss_bytes();
    let started = Instant::now();
    let replay =
        tokio::task::spawn_blocking(move || replaying.replay_blocking(&candidate, since, 5))
            .await??;
    let replay_secs = started.elapsed().as_secs_f64();
    let missing = &replay.not_reconstructed;
    anyhow::ensure!(replay.signals == n as u64, "every signal replayed");
    anyhow::ensure!(
        missing.unreproduced == 0,
        "the live set's replay makes every recorded decision again ({} not)",
        missing.unreproduced
    );
    println!(
        "replay: {} signals, {} evaluations per set, in {replay_secs:.1} s ({:.0} signals/s); live {} decisions, candidate {}: +{} -{} ~{}; recorded {} compared (truncated: {}), reproduced {}; RSS +{:.0} MiB",
        replay.signals,
        replay.evaluations,
        replay.signals as f64 / replay_secs,
        replay.live_decisions,
        replay.candidate_decisions,
        replay.added,
        replay.removed,
        replay.changed,
        missing.recorded,
        missing.recorded_truncated,
        missing.reproduced,
        common::rss_bytes().saturating_sub(rss_before) as f64 / (1 << 20) as f64,
    );
    println!("replay / live engine: {:.2}", replay_secs / live_secs);
    drop(engine);
    drop(intake);
    run.stop().await;
    Ok(())
}
