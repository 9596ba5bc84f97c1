//! The Kafka throughput measurement shared by `kafka_apply` and the `load` harness (see
//! `kafka_apply.rs` for what is measured and how).

use std::time::{Duration, Instant};

use futures_util::{StreamExt, TryStreamExt};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use serde_json::json;
use vigil::sim::risk::{message, mock_cluster, Pattern};
use vigil::Vigil;

use super::{cpu_seconds, loopback_config};

/// What to measure.
pub struct KafkaArgs {
    pub messages: u64,
    pub users: u64,
    pub grants: u64,
    pub partitions: i32,
    pub batch: usize,
    pub engine_batch: usize,
    pub checkpoint_ms: u64,
    /// `engine.journal_fold_rows`.
    pub journal_fold_rows: usize,
    /// Also (or, with `vigil` false, only) the bare-consumer ceiling on the same topic.
    pub ceiling: bool,
    /// A Kafka-protocol broker already running (`HOST:PORT`), instead of librdkafka's mock
    /// cluster in-process: the run makes topics of its own there.
    pub brokers: Option<String>,
    pub vigil: bool,
    /// The messages' shape: `Steady` (mostly low scores over many users) or `Revoking` (with
    /// `users == messages`, every message revokes every grant of its user).
    pub pattern: Pattern,
    /// Push probes (0: none): while the topic is applied, a transmitter pushes an RS256 SET every
    /// 20 ms, each revoking a grant of its own — how long another party's signal waits behind
    /// the Kafka backlog, in the engine and at enforcement points subscribed by push, poll and
    /// SSE. Those hold only the probes' grants (the Kafka users' grants name another
    /// enforcement point, so their revocations are not signed for them).
    pub push_probes: usize,
    /// With push probes: the enforcement point holding the Kafka users' grants subscribes too
    /// (poll), so every revocation the backlog makes is signed and queued for it — delivery
    /// then has a backlog of its own to work through.
    pub backlog_sets: bool,
}

/// What the push probes saw while the Kafka backlog was applied (milliseconds, sorted).
#[derive(Default)]
pub struct ProbeFigures {
    /// Push → 202.
    pub acknowledged: Vec<f64>,
    /// Push → the probe's grant revoked in the engine.
    pub revoked: Vec<f64>,
    /// Push → the revocation's SET verified at each enforcement point (`push`, `poll`, `sse`).
    pub delivered: Vec<(String, Vec<f64>)>,
}

/// What was measured.
#[derive(Default)]
pub struct KafkaFigures {
    /// Signals applied per second, first applied batch to the last one committed.
    pub end_to_end: f64,
    /// Between 10 % and 90 % applied.
    pub steady: Option<f64>,
    pub cpu_us_per_signal: f64,
    pub cores_busy: f64,
    pub decisions: usize,
    /// The state store's commits during the run, and their mean time (seconds).
    pub state_commits: u64,
    pub state_commit_mean: f64,
    /// Bytes written to storage per signal applied (the state store, the audit log, intake).
    pub bytes_per_signal: f64,
    /// The bare consumer's messages per second.
    pub ceiling: Option<f64>,
    /// With `push_probes`: the probes sent before the last message was applied.
    pub probes: Option<ProbeFigures>,
}

const PROBE_ISS: &str = "https://idp.example.com/";
const PROBE_AUD: &str = "https://vigil.example.com/";
const PROBE_GAP: Duration = Duration::from_millis(20);

/// The push probes' transmitter: its key, the JWKS server Vigil fetches it from, and the probes'
/// SETs, signed before anything is measured (probe `p` revokes grant `pg-{p}`'s session).
struct Probes {
    _jwks: vigil::sim::JwksServer,
    tokens: Vec<String>,
}

impl Probes {
    async fn configure(config: &mut vigil::Config, n: usize) -> anyhow::Result<Probes> {
        use vigil::sim::{jwks_document, JwksServer, SigningKey};
        let key = SigningKey::generate(vigil::jose::Alg::RS256, "probe")?;
        let jwks =
            JwksServer::start("127.0.0.1:0".parse()?, jwks_document(&[key.public_jwk()?])).await?;
        config
            .transmitters
            .push(vigil::config::TransmitterConfig::with_jwks(
                "probe",
                PROBE_ISS,
                vec![PROBE_AUD.into()],
                "Bearer probe",
                vec![vigil::jose::Alg::RS256],
                &jwks.jwks_uri(),
            ));
        let now = vigil::signal::now_ms() / 1000;
        let tokens = super::sign_sets(&key, n, |p| {
            json!({"iss": PROBE_ISS, "aud": PROBE_AUD, "jti": format!("probe-{p}"), "iat": now,
                "sub_id": {"format": "complex",
                    "user": {"format": "email", "email": format!("probe{p}@example.com")},
                    "session": {"format": "opaque", "id": format!("ps-{p}")}},
                "events": {"https://schemas.openid.net/secevent/caep/event-type/session-revoked": {
                    "initiating_entity": "policy", "event_timestamp": now}}})
        });
        Ok(Probes {
            _jwks: jwks,
            tokens,
        })
    }

    /// Probe `p`'s grant.
    fn grant(p: usize, now: f64) -> serde_json::Value {
        json!({"id": format!("pg-{p}"), "kind": "session",
            "subject": {"format": "email", "email": format!("probe{p}@example.com")},
            "session": format!("ps-{p}"), "issued_at": now - 60.0, "expires_at": now + 3600.0})
    }

    /// Pushes a probe every [`PROBE_GAP`] until `done` is set or the probes run out; a watcher
    /// thread times each from its push until its grant is revoked in the engine. Only probes
    /// pushed before `done` are counted.
    async fn run(
        self,
        engine: std::sync::Arc<vigil::engine::Engine>,
        addr: std::net::SocketAddr,
        eps: Vec<(String, vigil::sim::ep::EnforcementPoint)>,
        done: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) -> anyhow::Result<ProbeFigures> {
        use std::sync::atomic::Ordering;
        let watch = super::RevocationWatch::start(engine, Duration::from_micros(200));
        // From an address of its own, as another transmitter's would be.
        let client = reqwest::Client::builder()
            .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
            .build()?;
        let url = format!("http://{addr}/ssf/push/probe");
        // Probe 0 loads the transmitter's keys and opens the connection; it is not counted.
        let Some((first, rest)) = self.tokens.split_first() else {
            anyhow::bail!("no probes");
        };
        super::push_set(&client, &url, "Bearer probe", first).await?;
        let mut acknowledged = Vec::new();
        // By the revocation SETs' `txn`: the probe's `jti`.
        let mut sent = std::collections::HashMap::new();
        for (p, token) in rest.iter().enumerate().map(|(i, t)| (i + 1, t)) {
            if done.load(Ordering::Relaxed) {
                break;
            }
            let at = Instant::now();
            watch.watch(format!("pg-{p}"), at);
            sent.insert(format!("probe-{p}"), at);
            let status = super::push_set(&client, &url, "Bearer probe", token).await?;
            anyhow::ensure!(status == 202, "probe push answered {status}");
            acknowledged.push(at.elapsed().as_secs_f64() * 1e3);
            tokio::time::sleep(PROBE_GAP).await;
        }
        // The last probes' revocations, however long they wait.
        let deadline = Instant::now() + Duration::from_secs(120);
        while watch.seen() < acknowledged.len() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut revoked: Vec<f64> = watch.finish().into_iter().map(|(_, ms)| ms).collect();
        anyhow::ensure!(
            revoked.len() == acknowledged.len(),
            "{} of {} probes revoked",
            revoked.len(),
            acknowledged.len()
        );
        revoked.sort_by(f64::total_cmp);
        acknowledged.sort_by(f64::total_cmp);
        // Probe 0's revocation is delivered too, and not timed (not in `sent`).
        let delivered = super::delivery_latencies(eps, &sent, acknowledged.len()).await;
        Ok(ProbeFigures {
            acknowledged,
            revoked,
            delivered,
        })
    }
}

pub async fn measure(args: &KafkaArgs) -> anyhow::Result<KafkaFigures> {
    let (messages, users, grants, partitions) =
        (args.messages, args.users, args.grants, args.partitions);
    let (_cluster, brokers, topic, dead_letter) = match &args.brokers {
        Some(brokers) => {
            // Names of this run's own, so a broker that outlives runs never serves an old topic.
            let run = vigil::signal::now_ms();
            let (topic, dead_letter) = (format!("vigil.risk.{run}"), format!("vigil.dead.{run}"));
            create_topics(brokers, &[(&topic, partitions), (&dead_letter, 1)]).await?;
            (None, brokers.clone(), topic, dead_letter)
        }
        None => {
            let (topic, dead_letter) =
                ("vigil.risk".to_owned(), "vigil.risk.dead-letter".to_owned());
            let cluster = mock_cluster(&[(&topic, partitions), (&dead_letter, 1)])?;
            let brokers = cluster.bootstrap_servers();
            (Some(cluster), brokers, topic, dead_letter)
        }
    };
    let topic = topic.as_str();

    // Fill the topic first, so the consumer is measured, not the producer — except when every
    // message is to revoke a grant: those grants must be registered before anything is consumed,
    // so the topic is filled after (the producer is many times faster than what is measured).
    let now = vigil::signal::now_ms() as f64 / 1000.0;
    let publish_first = args.pattern != Pattern::Revoking;
    if publish_first {
        publish(&brokers, topic, args)?;
    }

    let mut figures = KafkaFigures::default();
    if args.ceiling && publish_first {
        figures.ceiling = Some(consume_only(&brokers, topic, messages).await?);
    }
    if !args.vigil {
        return Ok(figures);
    }

    let dir = tempfile::tempdir()?;
    let mut config = loopback_config(dir.path());
    config.kafka.brokers = brokers.clone();
    config.kafka.topics = vec![topic.to_owned()];
    config.kafka.dead_letter_topic = dead_letter;
    config.kafka.group_id = format!("vigil.{topic}");
    config.kafka.max_batch = args.batch;
    config.engine.max_batch = args.engine_batch;
    config.engine.checkpoint_interval_ms = args.checkpoint_ms;
    config.engine.journal_fold_rows = args.journal_fold_rows;
    let probes = if args.push_probes > 0 {
        super::add_eps(&mut config);
        // Holds the Kafka users' grants; subscribes no stream.
        config
            .enforcement_points
            .push(vigil::config::EnforcementPointConfig {
                name: "gateway".into(),
                token: "token-for-gateway-0123456789".into(),
                audience: None,
                signing_alg: None,
            });
        Some(Probes::configure(&mut config, args.push_probes).await?)
    } else {
        None
    };
    config.validate()?;
    let vigil = Vigil::start(config).await?;
    let eps = match &probes {
        Some(_) => super::subscribe_eps(&format!("http://{}", vigil.local_addr())).await?,
        None => Vec::new(),
    };
    // The gateway takes (and verifies) every SET the backlog makes, as fast as it can.
    let _gateway = if probes.is_some() && args.backlog_sets {
        let mut gateway = vigil::sim::ep::subscribe(
            &format!("http://{}", vigil.local_addr()),
            "token-for-gateway-0123456789",
            "gateway",
            vigil::sim::ep::Method::Poll,
            "127.0.0.1:0".parse()?,
        )
        .await
        .map_err(anyhow::Error::msg)?;
        let mut received = std::mem::replace(
            &mut gateway.received,
            tokio::sync::mpsc::unbounded_channel().1,
        );
        tokio::spawn(async move { while received.recv().await.is_some() {} });
        Some(gateway)
    } else {
        None
    };
    // With enforcement points subscribed, the Kafka users' grants are held by another one.
    let kafka_eps: Vec<&str> = if probes.is_some() {
        vec!["gateway"]
    } else {
        Vec::new()
    };
    // Grants for some of the users, so signals trigger real evaluations (64 registrations in
    // flight: a revoking run registers as many grants as it has messages).
    let client = vigil::sim::api_client(vigil.admin_token())?;
    let url = format!("http://{}/v1/grants", vigil.local_addr());
    let probe_grants = probes.as_ref().map_or(0, |p| p.tokens.len());
    // Grant `i` is user `i % users`'s: more grants than users gives each several.
    let registrations = (0..grants as usize)
        .map(|i| {
            let user = i as u64 % users.max(1);
            json!({"id": format!("g-{i}"), "kind": "session",
            "subject": {"format": "email", "email": format!("user-{user}@example.com")},
            "session": format!("s-{i}"), "issued_at": now - 60.0, "expires_at": now + 3600.0,
            "enforcement_points": kafka_eps})
        })
        .chain((0..probe_grants).map(|p| Probes::grant(p, now)));
    futures_util::stream::iter(registrations)
        .map(|grant| {
            let (client, url) = (client.clone(), url.clone());
            async move {
                client
                    .post(url)
                    .json(&grant)
                    .send()
                    .await?
                    .error_for_status()?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(64)
        .try_collect::<Vec<()>>()
        .await?;
    eprintln!(
        "kafka: {grants} grants registered; RSS {} MiB",
        super::rss_bytes() >> 20
    );
    if !publish_first {
        publish(&brokers, topic, args)?;
    }

    // Progress is Vigil's own count of signals applied and committed by the engine.
    let metrics_url = format!("http://{}/metrics", vigil.local_addr());
    let applied_so_far = || async {
        let text = client.get(&metrics_url).send().await?.text().await?;
        let applied = format!("vigil_kafka_applied_total{{topic=\"{topic}\"}}");
        anyhow::Ok(sample(&text, &applied) as u64)
    };
    // The state store's commits (count, seconds in all): how many signals shared one fsync.
    let state_commits = || async {
        let text = client.get(&metrics_url).send().await?.text().await?;
        anyhow::Ok((
            sample(&text, "vigil_store_commit_seconds_count{store=\"state\"}"),
            sample(&text, "vigil_store_commit_seconds_sum{store=\"state\"}"),
        ))
    };
    let (commits0, commit_secs0) = state_commits().await?;
    let (t0, c0, cpu0, written0) = loop {
        let c = applied_so_far().await?;
        if c > 0 {
            break (Instant::now(), c, cpu_seconds(), super::written_bytes());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let kafka_done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let probing = probes.map(|probes| {
        let (engine, addr, done) = (
            vigil.engine().clone(),
            vigil.local_addr(),
            kafka_done.clone(),
        );
        tokio::spawn(async move { probes.run(engine, addr, eps, done).await })
    });
    let deadline = Instant::now() + Duration::from_secs(600);
    // (elapsed, applied) when a tenth and nine tenths of the messages were applied.
    let (mut tenth, mut nine_tenths) = (None, None);
    loop {
        let applied = applied_so_far().await?;
        if tenth.is_none() && applied >= messages / 10 {
            tenth = Some((t0.elapsed().as_secs_f64(), applied));
        }
        if nine_tenths.is_none() && applied >= messages * 9 / 10 {
            nine_tenths = Some((t0.elapsed().as_secs_f64(), applied));
        }
        if applied >= messages {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "stuck at {applied} of {messages}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    kafka_done.store(true, std::sync::atomic::Ordering::Relaxed);
    let cpu = cpu_seconds() - cpu0;
    let written = super::written_bytes().saturating_sub(written0);
    let applied = messages - c0;
    figures.end_to_end = applied as f64 / secs;
    if let (Some((a, na)), Some((b, nb))) = (tenth, nine_tenths) {
        if b > a {
            figures.steady = Some((nb - na) as f64 / (b - a));
        }
    }
    // The whole process (Vigil, the mock broker, this harness's polling) on this machine's cores.
    figures.cpu_us_per_signal = cpu * 1e6 / applied as f64;
    figures.cores_busy = cpu / secs;
    figures.bytes_per_signal = written as f64 / applied as f64;
    // Vigil's own count of the decisions made (revocations, step-ups, …), not a page of the log.
    let decisions_so_far = || async {
        let text = client.get(&metrics_url).send().await?.text().await?;
        anyhow::Ok(
            text.lines()
                .filter(|l| {
                    l.starts_with("vigil_decisions_total{") && !l.contains("effect=\"allow\"")
                })
                .filter_map(|l| l.rsplit_once(' ')?.1.trim().parse::<f64>().ok())
                .sum::<f64>() as usize,
        )
    };
    figures.decisions = decisions_so_far().await?;
    let (commits, commit_secs) = state_commits().await?;
    figures.state_commits = (commits - commits0) as u64;
    figures.state_commit_mean = (commit_secs - commit_secs0) / figures.state_commits.max(1) as f64;
    eprintln!(
        "kafka: {} decisions when every message was applied; RSS {} MiB",
        figures.decisions,
        super::rss_bytes() >> 20
    );
    if let Some(probing) = probing {
        figures.probes = Some(probing.await??);
    }
    vigil.shutdown().await;
    // A topic filled after the grants were registered: the bare consumer reads it now, whole.
    if args.ceiling && !publish_first {
        figures.ceiling = Some(consume_only(&brokers, topic, messages).await?);
    }
    Ok(figures)
}

/// The value of the sample `series` (a metric name and its labels, as rendered) in the
/// Prometheus text `text`; 0 when it is not there.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0)
}

/// Publishes `args.messages` messages of `args.pattern` to `topic` and waits until the brokers
/// have them all.
fn publish(brokers: &str, topic: &str, args: &KafkaArgs) -> anyhow::Result<()> {
    let (messages, users, partitions) = (args.messages, args.users, args.partitions);
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "20")
        .set("queue.buffering.max.messages", "1000000")
        .create()?;
    let started = Instant::now();
    let now = vigil::signal::now_ms() as f64 / 1000.0;
    for n in 0..messages {
        let m = message(args.pattern, n, users, now);
        let body = m.native().to_string();
        let mut record = BaseRecord::to(topic).key(m.key()).payload(&body);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, r)) => {
                    producer.poll(Duration::from_millis(10));
                    record = r;
                }
            }
        }
    }
    producer.flush(Duration::from_secs(120))?;
    println!(
        "published {messages} messages to {partitions} partitions in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Creates `topics` (name, partitions; one replica) on the broker at `brokers`.
async fn create_topics(brokers: &str, topics: &[(&str, i32)]) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|(name, partitions)| NewTopic::new(name, *partitions, TopicReplication::Fixed(1)))
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in admin.create_topics(&new, &options).await? {
        result.map_err(|(topic, code)| anyhow::anyhow!("cannot create topic {topic}: {code}"))?;
    }
    Ok(())
}

/// The ceiling on this machine: the same topic read by a bare consumer of the same librdkafka from
/// the same broker, each payload copied out as Vigil's consumer does, and nothing else (no
/// parse, no engine, no store, no offset commit). Counted from the first message to the last.
async fn consume_only(brokers: &str, topic: &str, messages: u64) -> anyhow::Result<f64> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::Message;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("ceiling.{topic}"))
        .set("fetch.queue.backoff.ms", "10")
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()?;
    consumer.subscribe(&[topic])?;
    let topic = topic.to_owned();
    let (n, secs, cpu) = tokio::task::spawn_blocking(move || {
        let mut n = 0u64;
        let mut bytes = 0usize;
        let mut started = None;
        let mut cpu0 = 0.0;
        let deadline = Instant::now() + Duration::from_secs(600);
        while n < messages && Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                if started.is_none() {
                    started = Some(Instant::now());
                    cpu0 = cpu_seconds();
                }
                let payload = m.payload().map(<[u8]>::to_vec).unwrap_or_default();
                bytes += payload.len() + m.topic().len();
                n += 1;
            }
        }
        let secs = started.map_or(0.0, |s| s.elapsed().as_secs_f64());
        std::hint::black_box(bytes);
        (n, secs, cpu_seconds() - cpu0)
    })
    .await?;
    println!(
        "ceiling: a bare consumer read {n} messages of {topic} in {secs:.2} s: {:.0} messages/s; \
         CPU {:.1} µs per message",
        n as f64 / secs,
        cpu * 1e6 / n as f64
    );
    Ok(n as f64 / secs)
}
