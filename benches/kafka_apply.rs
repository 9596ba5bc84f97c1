//! Kafka risk-signal throughput: messages already in a topic (librdkafka's in-process mock cluster,
//! a real Kafka-protocol broker on loopback) consumed by Vigil's consumer group, normalized, applied
//! by the engine to each subject's context (and the affected grants evaluated) and committed by it,
//! with offsets committed after.
//!
//! Run: `cargo bench --bench kafka_apply -- [--messages 1200000] [--users 20000] [--grants 1000]
//!       [--partitions 96] [--batch 2000] [--engine-batch 256] [--checkpoint-ms 1000]
//!       [--journal-fold-rows 32768] [--ceiling] [--every-message-revokes]
//!       [--push-probes 0] [--backlog-sets] [--grants-per-user 1] [--compare] [--brokers HOST:PORT]`
//!
//! `--push-probes N`: up to N probes pushed by another transmitter (RS256, RFC 8935), one every
//! 20 ms while the topic is applied, each revoking a grant of its own; prints their 202,
//! push → revoked-in-the-engine and push → revocation verified at an enforcement point (push,
//! poll and SSE, subscribed to the probes' grants only; RS256) times — what a Kafka backlog
//! costs the other parties. With `--backlog-sets` the enforcement point holding the Kafka users'
//! grants subscribes too (poll), so each of their revocations is also signed and queued: a
//! backlog for delivery as well as for the engine (use fewer messages: a signature costs ≈ 1 ms).
//!
//! `--every-message-revokes`: `--messages` (200 000 by default) users, each with a session grant,
//! and a HIGH risk message for each — every message changes a grant's status (a decision, its
//! hand-off and audit record, the grant's row), the "≥ 50 000 applied signals/s" case.
//! `--grants-per-user N` gives each user N session grants, all revoked by its message: a
//! principal whose every session ends at once (an account disabled, credentials stuffed).
//!
//! `--ceiling` measures, instead of Vigil, a bare consumer reading the same topic from the same
//! broker: the rate no consumer built on this librdkafka and this broker can beat here.
//! `--compare` measures both in one run (the bare consumer first, or after Vigil when the topic
//! is filled after the grants are registered) and prints Vigil's steady rate as a share of it.
//!
//! `--brokers HOST:PORT`: a Kafka-protocol broker already running on loopback instead of the
//! in-process mock (the run creates topics of its own there, named after the time it started).
//!
//! The mock broker keeps a bounded log per partition (older segments are dropped, as retention
//! would), so a pre-filled topic needs enough partitions: keep messages / partitions under ~15 000.
//!
//! The rate is counted from the first applied batch (the consumer group join is excluded) to the
//! moment every message is applied and committed by the engine. Applied batches complete at the
//! engine's checkpoints (every `engine.checkpoint_interval_ms`), so that figure includes up to one
//! interval of waiting for the last one; the steady rate, between 10 % and 90 % applied, does not.
//! Use enough messages (a million or more) that the window spans many checkpoints.

mod common;

use common::arg;
use common::kafka::{measure, KafkaArgs};
use vigil::sim::risk::Pattern;

fn main() -> anyhow::Result<()> {
    vigil::telemetry::init_logging();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let ceiling_only = std::env::args().any(|a| a == "--ceiling");
    let compare = std::env::args().any(|a| a == "--compare");
    // Every message revokes a grant: as many users, grants and messages (200 000 by default).
    let revoking = std::env::args().any(|a| a == "--every-message-revokes");
    let per_user = arg("--grants-per-user", 1).max(1);
    let (messages, users, grants) = if revoking {
        let n = arg("--messages", 200_000);
        (n, n, n * per_user)
    } else {
        (
            arg("--messages", 1_200_000),
            arg("--users", 20_000),
            arg("--grants", 1_000),
        )
    };
    let args = KafkaArgs {
        messages,
        users,
        grants,
        partitions: arg("--partitions", 96) as i32,
        batch: arg("--batch", 2000) as usize,
        engine_batch: arg("--engine-batch", 256) as usize,
        checkpoint_ms: arg("--checkpoint-ms", 1000),
        journal_fold_rows: arg(
            "--journal-fold-rows",
            vigil::config::EngineConfig::default().journal_fold_rows as u64,
        ) as usize,
        ceiling: ceiling_only || compare,
        brokers: common::text_arg("--brokers"),
        vigil: !ceiling_only,
        pattern: if revoking {
            Pattern::Revoking
        } else {
            Pattern::Steady
        },
        push_probes: arg("--push-probes", 0) as usize,
        backlog_sets: std::env::args().any(|a| a == "--backlog-sets"),
    };
    let f = rt.block_on(measure(&args))?;
    if args.vigil {
        println!(
            "applied {} Kafka signals: {:.0} signals/s (consume → normalize → engine apply and commit → offset commit)",
            args.messages, f.end_to_end
        );
        if let Some(steady) = f.steady {
            println!("steady: {steady:.0} signals/s between 10 % and 90 % applied (no warm-up, no final checkpoint wait)");
        }
        println!(
            "CPU: {:.1} µs per signal ({:.2} cores busy)",
            f.cpu_us_per_signal, f.cores_busy
        );
        println!("decisions made (other than allow): {}", f.decisions);
        println!(
            "state store: {} commits ({:.0} signals each), {:.1} ms each on average; {:.1} KiB written to storage per signal",
            f.state_commits,
            messages as f64 / f.state_commits.max(1) as f64,
            f.state_commit_mean * 1e3,
            f.bytes_per_signal / 1024.0
        );
        if revoking && per_user > 1 {
            println!(
                "grants revoked: {:.0}/s steady; {:.2} KiB written to storage per grant",
                f.steady.unwrap_or(f.end_to_end) * per_user as f64,
                f.bytes_per_signal / 1024.0 / per_user as f64
            );
        }
    }
    if let (true, Some(c), Some(steady)) = (args.vigil, f.ceiling, f.steady) {
        println!(
            "Vigil's steady rate is {:.0} % of the bare consumer's ({c:.0} messages/s)",
            steady / c * 100.0
        );
    }
    if let Some(p) = &f.probes {
        let summary = |v: &[f64]| {
            format!(
                "p50 {:.1} / p99 {:.1} / max {:.1} ms",
                common::quantile(v, 0.5),
                common::quantile(v, 0.99),
                v.last().copied().unwrap_or(f64::NAN)
            )
        };
        println!(
            "push probes during the backlog ({}): 202 {}; revoked in the engine {}",
            p.revoked.len(),
            summary(&p.acknowledged),
            summary(&p.revoked)
        );
        for (method, delivered) in &p.delivered {
            println!(
                "  revocation verified at the {method} enforcement point ({}): {}",
                delivered.len(),
                summary(delivered)
            );
        }
    }
    Ok(())
}
