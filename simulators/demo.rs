//! `vigil-demo`: the whole path on one machine, as a story. It starts a simulated IdP (an SSF
//! transmitter Vigil discovers and creates its stream at), an in-process Kafka broker with a fraud
//! engine's topic, Vigil itself, and an API gateway enforcement point subscribed to Vigil over SSE.
//! Then users log in (the gateway registers their sessions), signals arrive from the IdP (pushed SETs)
//! and the fraud engine (Kafka), and each decision and revocation is printed with the latency of
//! every hop: signal → decision → revocation verified at the gateway.
//!
//! ```text
//! cargo run --bin vigil-demo                 # the story, then a summary
//! cargo run --bin vigil-demo -- --follow     # then keep the IdP's population traffic flowing
//! ```

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use serde_json::{json, Value};
use vigil::config::TransmitterConfig;
use vigil::config::{Config, DeliveryMode, EnforcementPointConfig};
use vigil::sim::ep::{subscribe, EnforcementPoint, Method};
use vigil::sim::idp::{Idp, IdpSettings, Population};
use vigil::sim::risk::{fraud_engine_mapping, mock_cluster, Publisher, RiskMessage};
use vigil::Vigil;

const AUDIENCE: &str = "https://vigil.example";
const IDP_CREDENTIAL: &str = "Bearer demo-idp-receiver";
const GATEWAY_TOKEN: &str = "demo-gateway-token-0123456789";
const FRAUD_TOPIC: &str = "fraud.scores";

#[derive(Parser)]
#[command(about = "Vigil end to end: IdP, Kafka fraud engine, Vigil, gateway — with hop latencies")]
struct Args {
    /// After the story, keep the IdP emitting its population's events (per second) until Ctrl-C.
    #[arg(long)]
    follow: bool,
    #[arg(long, default_value_t = 2.0)]
    rate: f64,
}

fn now_ms() -> i64 {
    vigil::signal::now_ms()
}

struct Demo {
    vigil: Vigil,
    idp: Idp,
    kafka_publisher: Publisher,
    gateway: EnforcementPoint,
    http: reqwest::Client,
    base: String,
    rows: Vec<(String, i64, i64)>,
}

impl Demo {
    async fn login(&self, user: &str) -> anyhow::Result<()> {
        let t = now_ms() as f64 / 1000.0;
        let grant = json!({
            "id": format!("web-{user}"), "kind": "session",
            "subject": {"format": "email", "email": format!("{user}@example.com")},
            "session": format!("sess-{user}"), "device": format!("laptop-{user}"),
            "issued_at": t, "expires_at": t + 8.0 * 3600.0, "enforcement_points": ["gateway"],
        });
        let resp = self
            .http
            .post(format!("{}/v1/grants", self.base))
            .json(&grant)
            .send()
            .await?;
        if resp.status().as_u16() != 201 {
            bail!("registering {user}'s session: HTTP {}", resp.status());
        }
        println!("  login   {user}@example.com → the gateway registers session grant web-{user}");
        Ok(())
    }

    /// Waits for the decision on `grant` and the gateway's copy of the revocation; prints both.
    async fn follow(&mut self, what: &str, grant: &str, sent_ms: i64) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let decision = loop {
            let d: Value = self
                .http
                .get(format!("{}/v1/decisions?grant={grant}", self.base))
                .send()
                .await?
                .json()
                .await?;
            if let Some(first) = d["decisions"].as_array().and_then(|a| a.first()).cloned() {
                break first;
            }
            if Instant::now() > deadline {
                bail!("no decision on {grant} within 20 s");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        let decided_ms = (decision["time"].as_f64().unwrap_or(0.0) * 1000.0) as i64;
        println!(
            "  decide  {} {grant}: rule {} — {} (policy {})",
            decision["effect"].as_str().unwrap_or("?"),
            decision["rules"],
            decision["reason"].as_str().unwrap_or(""),
            decision["policy_version"].as_str().unwrap_or("?"),
        );
        let received = tokio::time::timeout(Duration::from_secs(20), self.gateway.received.recv())
            .await
            .context("the gateway got no SET within 20 s")?
            .context("the gateway's subscription ended")?;
        let event = received.event_name().to_owned();
        println!(
            "  enforce gateway verified a signed CAEP {event} SET (jti {}) and drops the session",
            received.jti()
        );
        let to_decision = decided_ms - sent_ms;
        let to_gateway = received.at_ms - decided_ms;
        println!(
            "  latency signal → decision {to_decision} ms, decision → gateway {to_gateway} ms, total {} ms",
            received.at_ms - sent_ms
        );
        self.rows.push((what.to_owned(), to_decision, to_gateway));
        Ok(())
    }
}

fn idp_transmitter(issuer: &str) -> TransmitterConfig {
    let mut t = TransmitterConfig::managed(
        "idp",
        issuer,
        vec![AUDIENCE.into()],
        DeliveryMode::Push,
        IDP_CREDENTIAL,
    );
    if let Some(m) = &mut t.manage {
        m.description = Some("Vigil demo".into());
        m.verify_interval_secs = 30;
    }
    t
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    println!("Vigil demo: IdP (SSF push) + fraud engine (Kafka) → Vigil → API gateway (SSE)\n");

    let idp = Idp::start(
        "127.0.0.1:0".parse()?,
        IdpSettings {
            receiver_credential: IDP_CREDENTIAL.into(),
            audience: AUDIENCE.into(),
            ..IdpSettings::default()
        },
    )
    .await?;
    let kafka = mock_cluster(&[(FRAUD_TOPIC, 1), ("vigil.risk.dead-letter", 1)])?;
    // A fresh store each run, removed at the end.
    let data = std::env::temp_dir().join(format!("vigil-demo-{}", std::process::id()));
    let mut config = Config {
        listen: "127.0.0.1:0".parse()?,
        data_dir: data.clone(),
        transmitters: vec![idp_transmitter(idp.issuer())],
        enforcement_points: vec![EnforcementPointConfig {
            name: "gateway".into(),
            token: GATEWAY_TOKEN.into(),
            audience: None,
            signing_alg: None,
        }],
        ..Config::default()
    };
    // Every party of the demo runs on this machine's loopback.
    config.outbound.allow_loopback = true;
    config.kafka.brokers = kafka.bootstrap_servers();
    config.kafka.topics = vec![FRAUD_TOPIC.into()];
    config.kafka.mappings = vec![fraud_engine_mapping(FRAUD_TOPIC)];
    // The mock broker answers a fetch only when its wait expires (a real broker answers as soon as
    // data arrives), so keep the wait short here.
    for (k, v) in [
        ("heartbeat_interval_ms", "300"),
        ("fetch_wait_max_ms", "10"),
    ] {
        config.kafka.properties.insert(k.into(), v.into());
    }
    config.validate()?;
    let vigil = Vigil::start(config).await?;
    let base = format!("http://{}", vigil.local_addr());
    println!("setup");
    println!("  vigil   listening on {base} (policies: the built-in set unless ./policies exists)");
    println!("  idp     SSF transmitter at {}", idp.issuer());

    let http = vigil::sim::api_client(vigil.admin_token())?;
    // Vigil discovers the IdP, creates its push stream and verifies it.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s: Value = http
            .get(format!("{base}/v1/ssf/streams"))
            .send()
            .await?
            .json()
            .await?;
        let live = &s["streams"][0]["liveness"];
        if live["last_verified_ms"].is_i64() {
            println!(
                "  stream  Vigil created push stream {} at the IdP and verified it",
                live["stream_id"].as_str().unwrap_or("?")
            );
            break;
        }
        if Instant::now() > deadline {
            bail!("the IdP stream was not verified within 20 s: {s}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let gateway = subscribe(
        &base,
        GATEWAY_TOKEN,
        "gateway",
        Method::Sse,
        "127.0.0.1:0".parse()?,
    )
    .await
    .map_err(anyhow::Error::msg)?;
    println!(
        "  gateway subscribed to Vigil's revocations over SSE (stream {})",
        gateway.stream_id
    );
    let kafka_publisher = Publisher::new(&kafka.bootstrap_servers())?;
    // The consumer group joins in the background (seconds on the mock broker): a warm-up score for a
    // user with no grants shows when it is consuming.
    let warm = RiskMessage {
        email: "warm-up@example.com".into(),
        score: 1.0,
        event_time: now_ms() as f64 / 1000.0,
        id: "warm-up".into(),
        reason: "warm-up".into(),
    };
    kafka_publisher
        .publish(
            FRAUD_TOPIC,
            Some(warm.key()),
            warm.foreign().to_string().as_bytes(),
        )
        .await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while vigil
        .engine()
        .explain("email:warm-up@example.com")
        .is_none()
    {
        if Instant::now() > deadline {
            bail!("the Kafka consumer group did not start within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("  kafka   Vigil's consumer group reads the fraud engine's topic {FRAUD_TOPIC}");

    let mut demo = Demo {
        vigil,
        idp,
        kafka_publisher,
        gateway,
        http,
        base,
        rows: Vec::new(),
    };

    println!("\n09:00 users log in");
    for user in ["alice", "bob", "carol", "dave"] {
        demo.login(user).await?;
    }

    println!("\n09:12 the IdP's risk engine sees alice sign in from two continents (CAEP risk-level-change, pushed)");
    let t0 = now_ms();
    demo.idp.emit(
        "https://schemas.openid.net/secevent/caep/event-type/risk-level-change",
        json!({"format": "email", "email": "alice@example.com"}),
        json!({"event_timestamp": t0 / 1000, "principal": "USER", "current_level": "HIGH",
            "risk_reason": "impossible travel"}),
    )?;
    demo.follow("IdP risk HIGH (push)", "web-alice", t0).await?;

    println!(
        "\n09:20 the fraud engine scores bob critical (foreign JSON on Kafka topic {FRAUD_TOPIC})"
    );
    let t0 = now_ms();
    let msg = RiskMessage {
        email: "bob@example.com".into(),
        score: 97.0,
        event_time: t0 as f64 / 1000.0,
        id: format!("fraud-{t0}"),
        reason: "card testing pattern".into(),
    };
    demo.kafka_publisher
        .publish(
            FRAUD_TOPIC,
            Some(msg.key()),
            msg.foreign().to_string().as_bytes(),
        )
        .await?;
    demo.follow("fraud engine critical (Kafka)", "web-bob", t0)
        .await?;

    println!(
        "\n09:31 carol's laptop falls out of compliance (CAEP device-compliance-change, pushed)"
    );
    let t0 = now_ms();
    demo.idp.emit(
        "https://schemas.openid.net/secevent/caep/event-type/device-compliance-change",
        json!({"user": {"format": "email", "email": "carol@example.com"},
            "device": {"format": "opaque", "id": "laptop-carol"}}),
        json!({"event_timestamp": t0 / 1000, "previous_status": "compliant",
            "current_status": "not-compliant"}),
    )?;
    demo.follow("device not compliant (push)", "web-carol", t0)
        .await?;

    println!("\n09:45 the IdP disables dave's hijacked account (RISC account-disabled, pushed)");
    let t0 = now_ms();
    demo.idp.emit(
        "https://schemas.openid.net/secevent/risc/event-type/account-disabled",
        json!({"format": "email", "email": "dave@example.com"}),
        json!({"reason": "hijacking"}),
    )?;
    demo.follow("account disabled (push)", "web-dave", t0)
        .await?;

    println!("\nsummary (this run, this machine)");
    println!(
        "  {:<32} {:>20} {:>22}",
        "signal", "signal → decision", "decision → gateway"
    );
    for (what, a, b) in &demo.rows {
        println!("  {what:<32} {a:>17} ms {b:>19} ms");
    }
    // The URL only while the process that serves it is still running.
    if args.follow {
        println!(
            "  every decision, its rule, reason and policy version: {}/v1/decisions",
            demo.base
        );
    } else {
        println!("  run with --follow to keep Vigil running and browse its decisions");
    }

    if args.follow {
        println!(
            "\nfollowing the IdP's population traffic ({} events/s); Ctrl-C to stop",
            args.rate
        );
        let population = Population::default();
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate.max(0.1)));
        let mut n = 0u64;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    demo.idp.emit_population(&population, n)?;
                    n += 1;
                }
                Some(r) = demo.gateway.received.recv() => {
                    println!("  gateway: {} about {}", r.event_name(), r.subject());
                }
                _ = tokio::signal::ctrl_c() => break,
            }
        }
    }
    demo.vigil.shutdown().await;
    let _ = std::fs::remove_dir_all(&data);
    Ok(())
}
