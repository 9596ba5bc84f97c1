//! Soak: a constant push rate against a short intake retention window; disk, RSS and push latency
//! per interval, and whether they stay flat once the window is full.
//!
//! Run: `cargo bench --bench soak -- [--minutes 30] [--rate 1000] [--retention 300]
//! [--segment-kib 4096] [--alg RS256|ES256|EdDSA]`. Reports each minute, then disk and RSS at the end against minute 10
//! (target: within 10 %) and the per-minute p99 (it should not drift).

mod common;

use std::time::Duration;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let minutes = common::arg("--minutes", 30);
    let settings = common::soak::Settings {
        secs: minutes * 60,
        rate: common::arg("--rate", 1000),
        retention_secs: common::arg("--retention", 300),
        segment_bytes: common::arg("--segment-kib", 4096) * 1024,
        sample_every: Duration::from_secs(60),
        alg: common::text_arg("--alg")
            .unwrap_or_else(|| "RS256".to_owned())
            .parse()
            .map_err(|e| anyhow::anyhow!("--alg: {e}"))?,
    };
    let samples = common::soak::run(&settings).await?;
    let at = |minute: u64| samples.iter().find(|s| s.at_secs >= minute * 60);
    let reference = at(10.min(minutes.saturating_sub(1)).max(1));
    let last = samples.last();
    println!(
        "| minute | disk MiB | intake log MiB | state store MiB | RSS MiB | accepted | failed | p50 ms | p99 ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for s in &samples {
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} | {:.2} | {:.2} |",
            s.at_secs / 60,
            s.disk_bytes as f64 / 1048576.0,
            s.intake_bytes as f64 / 1048576.0,
            s.store_bytes as f64 / 1048576.0,
            s.rss_bytes as f64 / 1048576.0,
            s.accepted,
            s.failed,
            s.p50_ms,
            s.p99_ms
        );
    }
    if let (Some(r), Some(l)) = (reference, last) {
        let ratio = |a: u64, b: u64| a as f64 / b.max(1) as f64;
        println!(
            "soak rate={}/s retention={} s: end vs minute {}: disk {:.3}×, RSS {:.3}× (target ≤ 1.10 each)",
            settings.rate,
            settings.retention_secs,
            r.at_secs / 60,
            ratio(l.disk_bytes, r.disk_bytes),
            ratio(l.rss_bytes, r.rss_bytes)
        );
    }
    Ok(())
}
