//! The soak harness's CI run (`cargo bench --bench soak` is the 30-minute figure): two minutes
//! of constant pushes against a 15-second intake retention window. A test of pruning, not of speed:
//! once the window is full, the data directory and the intake log stop growing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../benches/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_stays_flat_once_the_retention_window_is_full() {
    let settings = common::soak::Settings {
        secs: 120,
        rate: 150,
        retention_secs: 15,
        segment_bytes: 128 * 1024,
        sample_every: Duration::from_secs(10),
        alg: vigil::jose::Alg::RS256,
    };
    let samples = common::soak::run(&settings).await.unwrap();
    assert!(samples.len() >= 10, "{} samples", samples.len());
    let failed: usize = samples.iter().map(|s| s.failed).sum();
    assert_eq!(failed, 0, "pushes not accepted");
    // Written over two minutes: ≈ 18 000 SETs, ≈ 13 MB of log; the window holds ≈ 15 s of it.
    let written: usize = samples.iter().map(|s| s.accepted).sum();
    assert!(written > 10_000, "only {written} SETs pushed");
    let at_60 = samples.iter().find(|s| s.at_secs >= 60).unwrap();
    let last = samples.last().unwrap();
    let peak_intake = samples
        .iter()
        .filter(|s| s.at_secs >= 60)
        .map(|s| s.intake_bytes)
        .max()
        .unwrap();
    // The log holds the window and the segments not yet past it: far less than what was written.
    assert!(
        peak_intake < 5 << 20,
        "intake log reached {peak_intake} bytes"
    );
    assert!(
        last.intake_bytes as f64 <= at_60.intake_bytes as f64 * 1.5 + (256 << 10) as f64,
        "intake log grew from {} to {} bytes",
        at_60.intake_bytes,
        last.intake_bytes
    );
    // Besides the intake log, the data directory holds two redb files: the state store and
    // intake's index. They hold little live data here (a thousand users' contexts, the pending
    // set); a file's size is what one commit needed at its busiest. redb grows a file by doubling
    // when a commit needs more free pages than it has, and gives a free tail back at a later
    // commit, so one sample is the phase of that step (CI saw the state store go 4.5 → 3.5 →
    // 6.5 MiB within a minute). Against the peak of the first minute with the window full, one
    // doubling is a commit's high-water mark; files that kept what they should drop double again
    // and again.
    let redb_bytes = |s: &common::soak::Sample| s.disk_bytes.saturating_sub(s.intake_bytes);
    let peak_redb = samples
        .iter()
        .filter(|s| (30..=60).contains(&s.at_secs))
        .map(redb_bytes)
        .max()
        .unwrap();
    assert!(
        redb_bytes(last) <= 2 * peak_redb + (1 << 20),
        "the redb files grew from {peak_redb} to {} bytes (the state store file to {})",
        redb_bytes(last),
        last.store_bytes
    );
}
