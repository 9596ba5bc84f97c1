//! `vigil-risk`: a risk system publishing risk signals to Kafka — in Vigil's native format or in a
//! foreign "fraud engine" format that Vigil reads through a mapping — at a chosen rate and pattern.
//!
//! With `--mock` it first starts an in-process Kafka-protocol broker (librdkafka's mock cluster) and
//! prints its address, so the whole path runs on one machine with no Kafka installation:
//!
//! ```text
//! cargo run --bin vigil-risk -- --mock --pattern climb --rate 1      # prints: brokers 127.0.0.1:NNNN
//! cargo run --bin vigil-risk -- --mock --broker-only --cluster vigil # a broker for a Vigil cluster
//! VIGIL_KAFKA__BROKERS=127.0.0.1:NNNN cargo run -- serve --config config/dev.toml
//! ```

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, ValueEnum};
use vigil::sim::risk::{message, mock_cluster, Pattern, Publisher};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Format {
    Native,
    Foreign,
}

#[derive(Parser)]
#[command(about = "Publish simulated risk signals to Kafka")]
struct Args {
    /// Kafka bootstrap servers (ignored with --mock).
    #[arg(long, default_value = "127.0.0.1:9092")]
    brokers: String,
    /// Start an in-process mock Kafka cluster and publish to it; it lives while this runs.
    #[arg(long)]
    mock: bool,
    /// Topic to publish to (Vigil's default native topic is `vigil.risk`).
    #[arg(long, default_value = "vigil.risk")]
    topic: String,
    /// Partitions of the topic when --mock creates it.
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// With --mock: also create the topics of the Vigil cluster of this name (`[cluster] name`),
    /// which the mock broker cannot be asked to create.
    #[arg(long)]
    cluster: Option<String>,
    /// Partitions of the cluster's signals topic (`[cluster] partitions`).
    #[arg(long, default_value_t = 12)]
    cluster_partitions: i32,
    /// With --mock: publish nothing, only keep the broker up (for a cluster of Vigil instances).
    #[arg(long)]
    broker_only: bool,
    /// native, or foreign (configure Vigil with the fraud-engine mapping, see config/example.toml).
    #[arg(long, value_enum, default_value = "native")]
    format: Format,
    /// steady, bursts, or climb (one user's risk rising to HIGH).
    #[arg(long, value_enum, default_value = "steady")]
    pattern: Pattern,
    /// Messages per second (0: as fast as the broker takes them).
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// Messages to publish (0: until interrupted).
    #[arg(long, default_value_t = 0)]
    count: u64,
    /// Distinct users for steady and bursts.
    #[arg(long, default_value_t = 1000)]
    users: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cluster = if args.mock {
        let dead_letters = "vigil.risk.dead-letter";
        let mut topics = vec![
            (args.topic.clone(), args.partitions),
            (dead_letters.to_owned(), 1),
        ];
        if let Some(name) = &args.cluster {
            let cluster_topics = vigil::cluster::Topics::of(name);
            for (topic, partitions) in cluster_topics.with_partitions(args.cluster_partitions) {
                topics.push((topic.to_owned(), partitions));
            }
        }
        let topics: Vec<(&str, i32)> = topics.iter().map(|(t, p)| (t.as_str(), *p)).collect();
        let c = mock_cluster(&topics).context("starting the mock cluster")?;
        println!("brokers {}", c.bootstrap_servers());
        if args.broker_only {
            println!("keeping the mock cluster up (Ctrl-C to stop)");
            tokio::signal::ctrl_c().await?;
            return Ok(());
        }
        Some(c)
    } else {
        None
    };
    let brokers = cluster
        .as_ref()
        .map(|c| c.bootstrap_servers())
        .unwrap_or_else(|| args.brokers.clone());
    let publisher = Publisher::new(&brokers)?;
    let started = Instant::now();
    let mut sent = 0u64;
    while args.count == 0 || sent < args.count {
        // Bursts: ten seconds' worth at once, then quiet until the average rate is met again.
        let chunk = match args.pattern {
            Pattern::Bursts => (args.rate * 10.0).max(1.0) as u64,
            _ => 1,
        };
        let now = vigil::signal::now_ms() as f64 / 1000.0;
        let mut batch = Vec::new();
        for _ in 0..chunk {
            if args.count != 0 && sent + batch.len() as u64 >= args.count {
                break;
            }
            let m = message(args.pattern, sent + batch.len() as u64, args.users, now);
            let body = match args.format {
                Format::Native => m.native(),
                Format::Foreign => m.foreign(),
            };
            batch.push((Some(m.key().to_owned()), body.to_string().into_bytes()));
        }
        publisher.publish_all(&args.topic, &batch).await?;
        sent += batch.len() as u64;
        if args.pattern == Pattern::Climb || args.rate < 50.0 {
            println!("published {sent}");
        }
        if args.rate > 0.0 {
            let due = Duration::from_secs_f64(sent as f64 / args.rate);
            tokio::time::sleep(due.saturating_sub(started.elapsed())).await;
        }
    }
    println!(
        "published {sent} messages to {} in {:.1} s",
        args.topic,
        started.elapsed().as_secs_f64()
    );
    if cluster.is_some() {
        println!("keeping the mock cluster up (Ctrl-C to stop)");
        tokio::signal::ctrl_c().await?;
    }
    Ok(())
}
