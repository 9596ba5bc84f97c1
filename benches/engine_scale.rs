//! Scale harness for the engine as it runs in production (shards, store, audit):
//! registers N grants over N/10 subjects through the engine, reports the registration rate and the
//! resident memory per grant, then swaps the policy set and times the re-evaluation of every grant
//! (until every shard has committed); before that, previews the impact of a candidate set on every
//! grant (`Engine::impact_blocking`) and compares its time with the swap's.
//!
//! Run: `cargo bench --bench engine_scale -- [--grants 1000000]`

mod common;

use std::sync::Arc;
use std::time::Instant;

use common::rss_bytes;
use serde_json::json;
use vigil::audit::AuditLog;
use vigil::engine::{Engine, EngineSettings};
use vigil::grant::GrantRequest;
use vigil::policy::PolicySet;
use vigil::store::{self, BatchWriter};

fn main() -> anyhow::Result<()> {
    let mut grants = 1_000_000usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--grants" {
            grants = args.next().and_then(|v| v.parse().ok()).unwrap_or(grants);
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(grants))
}

async fn run(n: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let db = store::open(dir.path())?;
    let (writer, writer_thread) = BatchWriter::start(db.clone(), "state", 1024)?;
    let (intake, intake_thread) = vigil::intake::Intake::open_dir(dir.path(), 1024)?;
    let audit = Arc::new(AuditLog::open(&dir.path().join("audit"), 64 << 20, 4)?);
    let policy_dir = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/policies"));
    let policy = PolicySet::load_dir_or_builtin(policy_dir)?;
    let (decisions, rx) = vigil::engine::lanes(4096);
    tokio::spawn(rx.discard());
    let settings = EngineSettings {
        max_batch: 1024,
        ..EngineSettings::default()
    };
    let engine = Arc::new(Engine::start(
        &db, writer, intake, audit, policy, decisions, settings,
    )?);

    let rss_before = rss_bytes();
    let started = Instant::now();
    let concurrency = 256;
    let mut tasks = Vec::new();
    for t in 0..concurrency {
        let engine = engine.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = t;
            while i < n {
                let req: GrantRequest = serde_json::from_value(json!({
                    "id": format!("g{i}"), "kind": if i % 3 == 0 { "access_token" } else { "session" },
                    "subject": {"format": "email", "email": format!("user{}@example.com", i / 10)},
                    "session": format!("s{i}"), "scopes": ["read"],
                    "issued_at": 1_700_000_000, "expires_at": 4_000_000_000u64,
                    "enforcement_points": ["gw"]
                }))?;
                engine.register(req, vigil::grant::Registrant::client("bench")).await?;
                i += concurrency;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let reg = started.elapsed();
    let rss_after = rss_bytes();
    println!(
        "engine_scale grants={n} subjects={}: registered in {:.1} s ({:.0} grants/s, each evaluated and committed)",
        n / 10,
        reg.as_secs_f64(),
        n as f64 / reg.as_secs_f64()
    );
    println!(
        "engine_scale RSS growth {:.0} MiB = {:.0} bytes per grant (in-memory grant, indexes, contexts and the store's cache)",
        (rss_after.saturating_sub(rss_before)) as f64 / (1 << 20) as f64,
        rss_after.saturating_sub(rss_before) as f64 / n as f64
    );

    // Risk on a fifth of the subjects, so the preview and the swap evaluate their grants (on the
    // others the screen proves no rule can match): MEDIUM on every tenth (their human sessions
    // step up), LOW on every tenth after it.
    let with_risk = n / 10 / 5;
    let mut signals = Vec::with_capacity(with_risk);
    for k in 0..with_risk {
        let user = k * 5;
        let level = if k % 2 == 0 { "MEDIUM" } else { "LOW" };
        let claims = json!({
            "iss": "https://idp.example.com/", "aud": "vigil", "jti": format!("risk-{user}"),
            "iat": 1_700_000_100, "sub_id": {"format": "email", "email": format!("user{user}@example.com")},
            "events": {"https://schemas.openid.net/secevent/caep/event-type/risk-level-change": {
                "principal": "USER", "current_level": level, "event_timestamp": 1_700_000_100}}
        });
        signals.push(
            vigil::evaluate::testing::signal_from_claims(&claims, k as u64 + 1)
                .map_err(anyhow::Error::msg)?,
        );
    }
    let started = Instant::now();
    for batch in signals.chunks(1024) {
        let submitting = engine.clone();
        let batch = batch.to_vec();
        tokio::task::spawn_blocking(move || submitting.submit_batch(batch)?.wait_blocking())
            .await??;
    }
    println!(
        "engine_scale risk on {with_risk} subjects applied in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // Impact preview of a candidate (MEDIUM risk revokes humans' sessions instead of stepping
    // up): every grant evaluated on its contexts, nothing changed. The swap below (every grant
    // re-evaluated and committed) is the ceiling it is compared with, in the same run.
    let candidate = common::medium_revokes_candidate()?;
    anyhow::ensure!(
        candidate.version != engine.policy_version(),
        "the candidate must differ from the running set"
    );
    let previewing = engine.clone();
    let started = Instant::now();
    let impact =
        tokio::task::spawn_blocking(move || previewing.impact_blocking(&candidate, 5)).await??;
    let impact_secs = started.elapsed().as_secs_f64();
    anyhow::ensure!(impact.evaluated == n as u64, "every grant evaluated");
    println!(
        "engine_scale impact preview: {} grants evaluated in {impact_secs:.2} s ({:.0} grants/s; {} would change)",
        impact.evaluated,
        impact.evaluated as f64 / impact_secs,
        impact.changes.changed
    );

    let swapped = PolicySet::from_sources(&[(
        "bench.yaml".to_owned(),
        format!("{}\n# bench swap\n", vigil::policy::BUILTIN),
    )])?;
    let started = Instant::now();
    engine.swap_policy(swapped)?.wait().await;
    let swap_secs = started.elapsed().as_secs_f64();
    println!(
        "engine_scale policy swap: every one of {n} grants re-evaluated and committed in {swap_secs:.2} s"
    );
    println!(
        "engine_scale impact preview / policy swap: {:.2}",
        impact_secs / swap_secs
    );
    engine.shutdown().await;
    drop(engine);
    writer_thread.join();
    intake_thread.join();
    Ok(())
}
