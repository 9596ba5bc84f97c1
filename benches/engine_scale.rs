//! Scale harness for the engine as it runs in production (shards, store, audit):
//! registers N grants over N/10 subjects through the engine, reports the registration rate and the
//! resident memory per grant, then swaps the policy set and times the re-evaluation of every grant
//! (until every shard has committed).
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
    let (decisions, mut rx) = tokio::sync::mpsc::channel(4096);
    tokio::spawn(async move { while rx.recv().await.is_some() {} });
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
                engine.register(req).await?;
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

    let swapped = PolicySet::from_sources(&[(
        "bench.yaml".to_owned(),
        format!("{}\n# bench swap\n", vigil::policy::BUILTIN),
    )])?;
    let started = Instant::now();
    engine.swap_policy(swapped)?.wait().await;
    println!(
        "engine_scale policy swap: every one of {n} grants re-evaluated and committed in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    engine.shutdown().await;
    drop(engine);
    writer_thread.join();
    intake_thread.join();
    Ok(())
}
