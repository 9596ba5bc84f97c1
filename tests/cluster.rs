//! Cluster mode against librdkafka's mock cluster of three brokers (in this process), with three
//! `vigil serve` processes on loopback sharing it:
//! - the consumer group splits the signals topic's partitions between the instances, and each says
//!   in `/readyz` which it owns;
//! - a grant registered, read, deleted or checked (`/v1/check`, nginx `auth_request`) through any
//!   instance is held and answered by its principal's owner alone (the instances find it in the
//!   members directory), and once revoked no instance answers allow; `/v1/decisions` on any
//!   instance lists the whole cluster's;
//! - a SET pushed to any instance — and the same SET again to a third — is applied once, by the
//!   owner of its principal's partition alone, whose grant is revoked;
//! - with every broker down a push is answered 503 with `Retry-After` (nothing acknowledged), and
//!   the transmitter's retry is taken and applied once the brokers are back;
//! - enforcement points: a stream created through one instance exists on all; every instance
//!   signs with the cluster's keys and publishes the same JWKS, and a rotation on one is taken up by
//!   all; a poll stream is polled and an SSE stream read through any instance, a push stream is
//!   pushed by one; a stream's SETs not yet acknowledged when its deliverer is killed are delivered
//!   by the next one with the same `jti`s;
//! - risk feeds (`[kafka]`) with `[cluster]`: the feeds' group splits the feed topic between the
//!   instances, and each message reaches its principal's owner (re-keyed onto the signals topic),
//!   applied once however often it is delivered;
//! - a stream Vigil keeps at a transmitter is one stream, run by one instance at a time (its
//!   transmitter's partition's owner), whose push credential every instance accepts, and it moves
//!   to another instance when that one is killed;
//! - the partitioner is Kafka's: librdkafka's `murmur2` partitioner puts every key where
//!   `vigil::cluster::partition_of` says.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{json, Value};
use vigil::jose::Alg;

const ISS: &str = "https://idp.example.com/";
const AUD: &str = "https://vigil.example.com/";
const NAME: &str = "itest";
const PARTITIONS: i32 = 6;
const CLUSTER_ISSUER: &str = "https://vigil.cluster.test/";
const EP_TOKEN: &str = "token-for-the-gateway-0123456789";
const DISABLED: &str = "https://schemas.openid.net/secevent/risc/event-type/account-disabled";

/// One `vigil serve` process, logging to `vigil.log` in its directory.
struct Instance {
    child: Child,
    base: String,
    dir: tempfile::TempDir,
}

impl Instance {
    /// `kill -9`, then the same instance again: its configuration, port and data directory.
    fn kill_and_restart(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.child = spawn_vigil(self.dir.path());
    }
}

/// `vigil serve` with the configuration in `dir`, appending its log to `dir/vigil.log`.
fn spawn_vigil(dir: &std::path::Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("vigil.log"))
        .unwrap();
    Command::new(env!("CARGO_BIN_EXE_vigil"))
        .args(["serve", "--config"])
        .arg(dir.join("vigil.toml"))
        // Its own working directory: the default `policies` (absent: the built-in set) is the
        // instance's, so a promoted shadow set is written there, never to this checkout's.
        .current_dir(dir)
        .env("VIGIL_LOG", "info")
        .stdout(log)
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A failed test shows what each instance warned of (its directory goes with it).
        if std::thread::panicking() {
            let log =
                std::fs::read_to_string(self.dir.path().join("vigil.log")).unwrap_or_default();
            let warned: Vec<&str> = own_lines(&log)
                .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                .collect();
            eprintln!(
                "--- {} warned ({} lines; the last 40):",
                self.base,
                warned.len()
            );
            for line in &warned[warned.len().saturating_sub(40)..] {
                eprintln!("{line}");
            }
        }
    }
}

/// An instance's log without the Kafka client's own lines (a broker down repeats them by the
/// hundred) or a warning repeated from the line before: what Vigil itself did.
fn own_lines(log: &str) -> impl Iterator<Item = &str> {
    let mut previous = String::new();
    log.lines().filter(move |l| {
        if l.contains("rdkafka") {
            return false;
        }
        // The message without its time stamp (the text after the level).
        let message = l.split_once(" WARN ").map_or(*l, |(_, m)| m);
        let repeated = l.contains(" WARN ") && message == previous;
        previous = message.to_owned();
        !repeated
    })
}

/// Starts an instance whose group session lasts `session_timeout_ms` (how long a killed instance
/// keeps its partitions), keeping standby copies of every partition if `standby`.
fn start_instance(
    tx: &Transmitter,
    brokers: &str,
    session_timeout_ms: u32,
    standby: bool,
) -> Instance {
    start_instance_with(tx, brokers, session_timeout_ms, standby, |_| {})
}

/// [`start_instance`] with `edit` applied to its configuration.
fn start_instance_with(
    tx: &Transmitter,
    brokers: &str,
    session_timeout_ms: u32,
    standby: bool,
    edit: impl FnOnce(&mut vigil::config::Config),
) -> Instance {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut config = test_config(dir.path(), vec![tx.config("idp", ISS, &[AUD])]);
    config.listen = format!("127.0.0.1:{port}").parse().unwrap();
    config.data_dir = dir.path().join("data");
    config.clients = vec![admin_client()];
    config.cluster.brokers = brokers.to_owned();
    config.cluster.name = NAME.into();
    config.cluster.partitions = PARTITIONS;
    config.cluster.publish_timeout_ms = 1_500;
    config.cluster.standby = standby;
    // One issuer for the cluster (its load balancer's name) and one enforcement point.
    config.identity.issuer = Some(CLUSTER_ISSUER.into());
    config
        .enforcement_points
        .push(vigil::config::EnforcementPointConfig {
            name: "gateway".into(),
            token: EP_TOKEN.into(),
            audience: None,
            signing_alg: None,
        });
    for (k, v) in [
        ("heartbeat_interval_ms", "500".to_owned()),
        ("session_timeout_ms", session_timeout_ms.to_string()),
    ] {
        config.cluster.properties.insert(k.into(), v);
    }
    edit(&mut config);
    config.validate().unwrap();
    std::fs::write(
        dir.path().join("vigil.toml"),
        toml::to_string(&config).unwrap(),
    )
    .unwrap();
    let child = spawn_vigil(dir.path());
    Instance {
        child,
        base: format!("http://{}", config.listen),
        dir,
    }
}

/// Three brokers (librdkafka's mock cluster) with the cluster's topics: it cannot create them.
/// The topics Vigil wants with one partition get four, as some brokers make them whatever is
/// asked (tansu does): Vigil writes and reads those on partition 0 alone, so the directory,
/// aliases, keys and streams must work all the same.
fn brokers_with_topics() -> MockCluster<'static, rdkafka::producer::DefaultProducerContext> {
    let kafka = MockCluster::new(3).unwrap();
    for (topic, partitions) in vigil::cluster::Topics::of(NAME).with_partitions(PARTITIONS) {
        kafka.create_topic(topic, partitions.max(4), 3).unwrap();
    }
    kafka
}

/// Two instances on three brokers ([`brokers_with_topics`]) with a transmitter, each configured
/// by `edit`; the brokers live as long as the value returned.
async fn two_instances(
    edit: impl Fn(&mut vigil::config::Config),
) -> (
    MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    Transmitter,
    Vec<Instance>,
) {
    let kafka = brokers_with_topics();
    let tx = Transmitter::start(&[Alg::RS256]).await;
    let instances = (0..2)
        .map(|_| start_instance_with(&tx, &kafka.bootstrap_servers(), 10_000, false, &edit))
        .collect();
    (kafka, tx, instances)
}

/// Waits up to `secs` for `check`; on a timeout prints what each instance says of itself (its
/// `/readyz` and the end of its log) and fails with `what`.
async fn wait_for<F, Fut>(instances: &[Instance], secs: u64, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    while std::time::Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let http = http();
    for i in instances {
        let ready = match http
            .get(format!("{}/readyz", i.base))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
        {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(e) => e.to_string(),
        };
        let log = std::fs::read_to_string(i.dir.path().join("vigil.log")).unwrap_or_default();
        let lines: Vec<&str> = own_lines(&log).collect();
        let tail = &lines[lines.len().saturating_sub(60)..];
        eprintln!("== {} /readyz: {ready}", i.base);
        for line in tail {
            eprintln!("   {line}");
        }
    }
    panic!("timed out waiting for {what}");
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// Waits until every partition is owned by exactly one of `instances` and each owns some; the
/// partitions each owns. The wait is for the mock brokers' group rebalances, with this binary's
/// ten tests' instances sharing two cores: once in three whole-suite runs here it took past 90 s.
async fn split(http: &reqwest::Client, instances: &[&Instance]) -> Vec<BTreeSet<i32>> {
    eventually_within(180, "the partitions split", || async {
        let mut all = Vec::new();
        for i in instances {
            all.push(owned(http, &i.base).await?);
        }
        let union: BTreeSet<i32> = all.iter().flatten().copied().collect();
        let total: usize = all.iter().map(BTreeSet::len).sum();
        (union.len() == PARTITIONS as usize
            && total == PARTITIONS as usize
            && all.iter().all(|o| !o.is_empty()))
        .then_some(all)
    })
    .await
}

/// An instance's `/readyz` body (`None` while it does not answer).
async fn readyz(http: &reqwest::Client, base: &str) -> Option<Value> {
    http.get(format!("{base}/readyz"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()
}

/// The partitions `/readyz` says the instance owns (`None` while it does not answer).
async fn owned(http: &reqwest::Client, base: &str) -> Option<BTreeSet<i32>> {
    let body = readyz(http, base).await?;
    body["kafka"]["owned_partitions"]
        .as_array()
        .map(|a| a.iter().map(|p| p.as_i64().unwrap() as i32).collect())
}

/// Which of `among` (indexes into `bases`) owns `partition`, by its `/readyz`.
async fn owner_among(
    http: &reqwest::Client,
    bases: &[String],
    among: &[usize],
    partition: i32,
) -> Option<usize> {
    for &i in among {
        if owned(http, &bases[i])
            .await
            .unwrap_or_default()
            .contains(&partition)
        {
            return Some(i);
        }
    }
    None
}

fn now() -> f64 {
    vigil::signal::now_ms() as f64 / 1000.0
}

fn principal_key(email: &str) -> String {
    principal_key_of(&json!({"format": "email", "email": email}))
}

/// The routing key of a subject naming one identifier.
fn principal_key_of(subject: &Value) -> String {
    let subject = vigil::subject::SubjectId::from_json(subject, true).unwrap();
    vigil::principal::Target::of(&subject).identifiers[0].clone()
}

async fn push_set(http: &reqwest::Client, base: &str, tx: &Transmitter, claims: &Value) -> u16 {
    let token = tx.key(Alg::RS256).sign_set(claims).unwrap();
    http.post(format!("{base}/ssf/push/idp"))
        .header("Content-Type", "application/secevent+jwt")
        .header("Authorization", tx.config("idp", ISS, &[AUD]).authorization)
        .body(token)
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

async fn grant_status(http: &reqwest::Client, base: &str, grant: &str) -> (u16, Value) {
    let r = admin_get(http, &format!("{base}/v1/grants/{grant}")).await;
    let code = r.status().as_u16();
    (code, r.json().await.unwrap_or(Value::Null))
}

/// A session grant `id` for `email`, valid for the next hour.
fn session_grant(id: &str, email: &str) -> Value {
    let t = now();
    json!({"id": id, "kind": "session", "subject": {"format": "email", "email": email},
        "issued_at": t - 5.0, "expires_at": t + 3600.0})
}

/// `POST /v1/grants` at `base`: the status and body of the answer.
async fn register(http: &reqwest::Client, base: &str, grant: &Value) -> (u16, Value) {
    let r = http
        .post(format!("{base}/v1/grants"))
        .bearer_auth(ADMIN_TOKEN)
        .json(grant)
        .send()
        .await
        .unwrap();
    let code = r.status().as_u16();
    (code, r.json().await.unwrap_or(Value::Null))
}

/// A gauge or counter without labels from an instance's `/metrics` (0 when absent).
async fn metric(http: &reqwest::Client, base: &str, name: &str) -> u64 {
    let text = admin_get(http, &format!("{base}/metrics"))
        .await
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// `vigil_aliases` of an instance: the identifier links it holds.
async fn aliases_held(http: &reqwest::Client, base: &str) -> u64 {
    metric(http, base, "vigil_aliases").await
}

/// [`register`] through an instance that may not know the owner yet (503 while its members
/// directory fills): retried for up to 30 s.
async fn register_through(http: &reqwest::Client, entry: &str, grant: &Value) -> (u16, Value) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (code, body) = register(http, entry, grant).await;
        if code != 503 || std::time::Instant::now() > deadline {
            return (code, body);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// [`register_through`], answered 201.
async fn registered(http: &reqwest::Client, entry: &str, grant: &Value) {
    let (code, body) = register_through(http, entry, grant).await;
    assert_eq!(code, 201, "{body}");
}

/// What `base` answers for `grant` by `POST /v1/check` (decision, status) and by nginx's
/// `auth_request` (HTTP status), checked against what is expected.
async fn assert_live_answers(
    http: &reqwest::Client,
    base: &str,
    grant: &str,
    (decision, status, code): (&str, &str, u16),
) {
    assert_eq!(
        check(http, base, grant).await,
        (decision.to_owned(), status.to_owned())
    );
    assert_eq!(
        auth_request(http, base, grant).await,
        (code, status.to_owned())
    );
}

/// `POST /v1/check` for a grant: the whole answer.
async fn check_answer(http: &reqwest::Client, base: &str, grant: &str) -> Value {
    http.post(format!("{base}/v1/check"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"grant_id": grant}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// `POST /v1/check` for a grant: its decision and status.
async fn check(http: &reqwest::Client, base: &str, grant: &str) -> (String, String) {
    let answer = check_answer(http, base, grant).await;
    (
        answer["decision"].as_str().unwrap_or("").to_owned(),
        answer["status"].as_str().unwrap_or("").to_owned(),
    )
}

/// nginx's `auth_request` for a grant: the status code and `X-Vigil-Status`.
async fn auth_request(http: &reqwest::Client, base: &str, grant: &str) -> (u16, String) {
    let r = http
        .get(format!("{base}/v1/check/auth_request"))
        .bearer_auth(ADMIN_TOKEN)
        .header("x-vigil-grant", grant)
        .send()
        .await
        .unwrap();
    let status = r
        .headers()
        .get("x-vigil-status")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    (r.status().as_u16(), status)
}

async fn decisions_for(http: &reqwest::Client, base: &str, grant: &str) -> usize {
    listed_decisions(http, base, &format!("grant={grant}&limit=100"))
        .await
        .len()
}

fn disabled(email: &str, jti: &str) -> Value {
    json!({"iss": ISS, "aud": AUD, "jti": jti, "iat": now() as i64,
        "sub_id": {"format": "email", "email": email},
        "events": {DISABLED: {}}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn any_instance_takes_a_set_and_only_the_owner_applies_it() {
    let kafka = brokers_with_topics();
    let brokers = kafka.bootstrap_servers();
    let tx = Transmitter::start(&[Alg::RS256]).await;
    // A session that outlives the brokers' outage below (two publish timeouts and the checks
    // between them: more than 15 s on a loaded machine), so the partitions do not move then.
    let instances: Vec<Instance> = (0..3)
        .map(|_| start_instance(&tx, &brokers, 45_000, false))
        .collect();
    let http = http();

    // The group settles: every partition owned by exactly one instance, each instance some.
    let owners = split(&http, &instances.iter().collect::<Vec<_>>()).await;
    println!("owned partitions: {owners:?}");
    let owner_of = |email: &str| {
        let p = vigil::cluster::partition_of(&principal_key(email), PARTITIONS);
        owners.iter().position(|o| o.contains(&p)).unwrap()
    };

    // Users on every instance; each grant registered on its owner, its SET pushed to another
    // instance and again to the third.
    let users: Vec<String> = (0..9).map(|i| format!("user{i}@example.com")).collect();
    let by_owner: BTreeSet<usize> = users.iter().map(|u| owner_of(u)).collect();
    assert_eq!(by_owner.len(), 3, "the users fall on every instance");
    for (i, user) in users.iter().enumerate() {
        let owner = &instances[owner_of(user)].base;
        let g = session_grant(&format!("g{i}"), user);
        // Registered through another instance (every third through the owner itself): the
        // owner answers, after evaluation.
        let entry = &instances[(owner_of(user) + i) % 3].base;
        let answer = register_through(&http, entry, &g).await;
        assert_eq!(answer.0, 201, "{}", answer.1);
        assert_eq!(answer.1["grant"]["status"], "active", "{}", answer.1);
        // Only the owner holds it; the others answer for it by asking the owner.
        for (j, other) in instances.iter().enumerate() {
            let local = http
                .get(format!("{}/v1/grants/g{i}", other.base))
                .bearer_auth(ADMIN_TOKEN)
                .header("x-vigil-forwarded", "1")
                .send()
                .await
                .unwrap()
                .status()
                .as_u16();
            assert_eq!(local, if j == owner_of(user) { 200 } else { 404 });
            let (code, g) = grant_status(&http, &other.base, &format!("g{i}")).await;
            assert_eq!(
                (code, g["id"].as_str()),
                (200, Some(format!("g{i}").as_str()))
            );
            // Checked on any instance: the owner's live answer.
            let grant = format!("g{i}");
            assert_live_answers(&http, &other.base, &grant, ("allow", "active", 200)).await;
        }
        // A call that was already forwarded is not forwarded again.
        if entry != owner {
            let r = http
                .post(format!("{entry}/v1/grants"))
                .bearer_auth(ADMIN_TOKEN)
                .header("x-vigil-forwarded", "1")
                .json(&g)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 421);
        }
    }
    for (i, user) in users.iter().enumerate() {
        let owner = owner_of(user);
        let claims = disabled(user, &format!("dis-{i}"));
        for other in [(owner + 1) % 3, (owner + 2) % 3] {
            assert_eq!(
                push_set(&http, &instances[other].base, &tx, &claims).await,
                202
            );
        }
    }
    for (i, user) in users.iter().enumerate() {
        let owner = &instances[owner_of(user)];
        let grant = format!("g{i}");
        wait_for(&instances, 30, "the owner to revoke the grant", || async {
            grant_status(&http, &owner.base, &grant).await.1["status"] == "revoked"
        })
        .await;
        let listed =
            listed_decisions(&http, &owner.base, &format!("grant={grant}&limit=100")).await;
        assert_eq!(
            listed.len(),
            1,
            "the SET received twice is one decision: {listed:?}"
        );
        for other in &instances {
            assert_eq!(
                grant_status(&http, &other.base, &grant).await.1["status"],
                "revoked",
                "every instance answers with the owner's state"
            );
            assert_eq!(
                decisions_for(&http, &other.base, &grant).await,
                1,
                "every instance lists the owner's decision, once"
            );
            // Once revoked, no instance answers allow.
            assert_live_answers(&http, &other.base, &grant, ("deny", "revoked", 403)).await;
        }
        // A grant no instance holds is unknown everywhere (401 for nginx), after asking them all.
        assert_eq!(
            auth_request(&http, &instances[0].base, "nobody").await.0,
            401
        );
    }
    // Every instance lists the whole cluster's decisions: one per user, oldest first, the newest
    // up to the limit.
    for instance in &instances {
        for (limit, want) in [(100, users.len()), (5, 5)] {
            let listed = listed_decisions(&http, &instance.base, &format!("limit={limit}")).await;
            assert_eq!(listed.len(), want);
            assert!(listed
                .windows(2)
                .all(|w| w[0]["time"].as_f64() <= w[1]["time"].as_f64()));
        }
    }

    // Two registrations race on one new identifier (a phone), each on its own principal's owner:
    // the identifier ends linked to one principal on every instance. A SET naming only the phone,
    // pushed to each instance in turn, revokes exactly one of the two grants.
    let (first, second) = {
        let mut pair = (0..60).map(|i| format!("racer{i}@example.com"));
        let first = pair.next().unwrap();
        let second = pair.find(|e| owner_of(e) != owner_of(&first)).unwrap();
        (first, second)
    };
    let phone = json!({"format": "phone_number", "phone_number": "+12025550199"});
    let racing = |id: &str, email: &str| {
        let mut g = session_grant(id, email);
        g["subject"] = json!({"format": "aliases", "identifiers": [
            {"format": "email", "email": email}, phone]});
        g
    };
    let links_before: Vec<u64> = {
        let mut held = Vec::new();
        for instance in &instances {
            held.push(aliases_held(&http, &instance.base).await);
        }
        held
    };
    let (race_1, race_2) = (racing("race-1", &first), racing("race-2", &second));
    let (one, two) = tokio::join!(
        register_through(&http, &instances[owner_of(&first)].base, &race_1),
        register_through(&http, &instances[owner_of(&second)].base, &race_2),
    );
    assert_eq!((one.0, two.0), (201, 201), "{one:?} {two:?}");
    // Both emails and the phone are in every instance's table (then a moment for the last link).
    for (instance, before) in instances.iter().zip(&links_before) {
        eventually_within(30, "the racing links read everywhere", || async {
            (aliases_held(&http, &instance.base).await >= before + 3).then_some(())
        })
        .await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (i, instance) in instances.iter().enumerate() {
        let by_phone = json!({"iss": ISS, "aud": AUD, "jti": format!("race-phone-{i}"),
            "iat": now() as i64, "sub_id": phone, "events": {DISABLED: {}}});
        assert_eq!(push_set(&http, &instance.base, &tx, &by_phone).await, 202);
    }
    wait_for(&instances, 30, "one racing grant revoked", || async {
        let mut revoked = 0;
        for g in ["race-1", "race-2"] {
            if grant_status(&http, &instances[0].base, g).await.1["status"] == "revoked" {
                revoked += 1;
            }
        }
        revoked > 0
    })
    .await;
    // Every SET has been applied by then or moments after. Registrations that raced made two
    // principals, and the phone's SETs reached one of them; one that saw the other's link first
    // joined its principal, and both grants are revoked.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for instance in &instances {
        let mut seen = Vec::new();
        for g in ["race-1", "race-2"] {
            let (_, body) = grant_status(&http, &instance.base, g).await;
            seen.push((body["principal"].clone(), body["status"].clone()));
        }
        let one_principal = seen[0].0 == seen[1].0;
        let revoked = seen.iter().filter(|(_, s)| s == "revoked").count();
        println!("racing registrations: {seen:?}");
        assert_eq!(
            revoked,
            if one_principal { 2 } else { 1 },
            "{}: one principal for the phone: {seen:?}",
            instance.base
        );
    }

    // A link its principal's owner forgot (context retention) is a tombstone on the alias topic:
    // every instance drops it from its table.
    let links_now: Vec<u64> = {
        let mut held = Vec::new();
        for instance in &instances {
            held.push(aliases_held(&http, &instance.base).await);
        }
        held
    };
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    producer
        .send(
            FutureRecord::<str, [u8]>::to(&vigil::cluster::Topics::of(NAME).aliases)
                .key("phone_number:+12025550199")
                .partition(0),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    for (instance, before) in instances.iter().zip(&links_now) {
        eventually_within(30, "the forgotten link dropped everywhere", || async {
            (aliases_held(&http, &instance.base).await + 1 == *before).then_some(())
        })
        .await;
    }

    // Every broker down: a push is refused with 503 + Retry-After and acknowledges nothing; the
    // transmitter's retry after the brokers return is taken and applied.
    let late = "late@example.com";
    let owner = &instances[owner_of(late)].base;
    assert_eq!(
        register(&http, owner, &session_grant("late", late)).await.0,
        201
    );
    // A deletion through another instance reaches the owner.
    assert_eq!(
        register(&http, owner, &session_grant("gone", late)).await.0,
        201
    );
    let elsewhere = &instances[(owner_of(late) + 2) % 3].base;
    let deleted = http
        .delete(format!("{elsewhere}/v1/grants/gone"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status().as_u16(), 204);
    assert_eq!(grant_status(&http, owner, "gone").await.0, 404);
    for broker in 1..=3 {
        kafka.broker_down(broker).unwrap();
    }
    let claims = disabled(late, "dis-late");
    let token = tx.key(Alg::RS256).sign_set(&claims).unwrap();
    let entry = &instances[(owner_of(late) + 1) % 3].base;
    let refused = http
        .post(format!("{entry}/ssf/push/idp"))
        .header("Content-Type", "application/secevent+jwt")
        .header("Authorization", tx.config("idp", ISS, &[AUD]).authorization)
        .body(token)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 503);
    assert!(refused.headers().get("retry-after").is_some());
    assert_eq!(
        grant_status(&http, owner, "late").await.1["status"],
        "active"
    );
    // A registration is not acknowledged while the state topic cannot take it (503, retry);
    // the owner goes on answering checks from its state.
    // (Its answer is what is checked, not how fast it comes: on a loaded machine it has taken
    // more than the client's usual 10 s.)
    let unreplicated = http
        .post(format!("{owner}/v1/grants"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&session_grant("during-outage", late))
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .unwrap();
    assert_eq!(unreplicated.status().as_u16(), 503);
    assert!(unreplicated.headers().get("retry-after").is_some());
    assert_live_answers(&http, owner, "late", ("allow", "active", 200)).await;
    for broker in 1..=3 {
        kafka.broker_up(broker).unwrap();
    }
    wait_for(
        &instances,
        30,
        "the retried push taken once the brokers are back",
        || async { push_set(&http, entry, &tx, &claims).await == 202 },
    )
    .await;
    wait_for(
        &instances,
        30,
        "the retried SET applied by the owner",
        || async { grant_status(&http, owner, "late").await.1["status"] == "revoked" },
    )
    .await;
    drop(instances);
}

/// State moves with its partition. Three instances (keeping standby copies, so the restores
/// start from them) hold grants (some revoked); one is killed (`kill -9`): once the group gives
/// its partitions to the others, they answer for its grants
/// with the status they had — a revoked grant stays revoked — and apply new signals to them. An
/// instance that joins takes partitions over with their state, and no instance that gave a
/// partition up answers for it from what it held.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_principals_state_moves_with_its_partition() {
    let kafka = brokers_with_topics();
    let brokers = kafka.bootstrap_servers();
    let tx = Transmitter::start(&[Alg::RS256]).await;
    let mut instances: Vec<Instance> = (0..3)
        .map(|_| start_instance(&tx, &brokers, 4_000, true))
        .collect();
    let http = http();
    let owners = split(&http, &instances.iter().collect::<Vec<_>>()).await;
    let owner_of = |email: &str| {
        let p = vigil::cluster::partition_of(&principal_key(email), PARTITIONS);
        owners.iter().position(|o| o.contains(&p)).unwrap()
    };
    // Identity across instances: a grant whose subject names an email and a phone number on
    // another instance's partition is revoked by a SET naming only the phone, sent to that other
    // instance (it routes by the cluster's alias table, not by the phone's own partition).
    let linked_email = "linked@example.com";
    let phone = (0..100)
        .map(|n| format!("+1202555{n:04}"))
        .find(|phone| {
            let key = principal_key_of(&json!({"format": "phone_number", "phone_number": phone}));
            let p = vigil::cluster::partition_of(&key, PARTITIONS);
            !owners[owner_of(linked_email)].contains(&p)
        })
        .unwrap();
    let phone_subject = json!({"format": "phone_number", "phone_number": phone});
    let phone_owner = {
        let p = vigil::cluster::partition_of(&principal_key_of(&phone_subject), PARTITIONS);
        owners.iter().position(|o| o.contains(&p)).unwrap()
    };
    let mut linked = session_grant("linked", linked_email);
    linked["subject"] = json!({"format": "aliases", "identifiers": [
        {"format": "email", "email": linked_email}, phone_subject]});
    let links_before = aliases_held(&http, &instances[phone_owner].base).await;
    let (code, body) = register_through(&http, &instances[phone_owner].base, &linked).await;
    assert_eq!(code, 201, "{body}");
    // The two links (email and phone, to the email's principal) reach the phone's owner through
    // the alias topic.
    eventually_within(30, "the links in the phone owner's alias table", || async {
        (aliases_held(&http, &instances[phone_owner].base).await >= links_before + 2).then_some(())
    })
    .await;
    let by_phone = json!({"iss": ISS, "aud": AUD, "jti": "by-phone", "iat": now() as i64,
        "sub_id": phone_subject, "events": {DISABLED: {}}});
    // The link reaches every instance's alias table within moments of the registration.
    let mut accepted = false;
    for _ in 0..50 {
        if push_set(&http, &instances[phone_owner].base, &tx, &by_phone).await == 202 {
            accepted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(accepted);
    wait_for(
        &instances,
        30,
        "the SET naming the phone to revoke the grant",
        || async {
            grant_status(&http, &instances[phone_owner].base, "linked")
                .await
                .1["status"]
                == "revoked"
        },
    )
    .await;

    let users: Vec<String> = (0..12).map(|i| format!("mover{i}@example.com")).collect();
    let victim = owner_of(&users[0]);
    let on_victim: Vec<usize> = (0..users.len())
        .filter(|&i| owner_of(&users[i]) == victim)
        .collect();
    assert!(
        on_victim.len() >= 2,
        "two users on one instance: {owners:?}"
    );
    for (i, user) in users.iter().enumerate() {
        let owner = &instances[owner_of(user)].base;
        let (code, body) = register(&http, owner, &session_grant(&format!("m{i}"), user)).await;
        assert_eq!(code, 201, "{body}");
    }
    // The victim's first user is revoked before the handover.
    let revoked = on_victim[0];
    assert_eq!(
        push_set(
            &http,
            &instances[victim].base,
            &tx,
            &disabled(&users[revoked], "before")
        )
        .await,
        202
    );
    let grant = format!("m{revoked}");
    wait_for(&instances, 30, "the owner to revoke the grant", || async {
        grant_status(&http, &instances[victim].base, &grant).await.1["status"] == "revoked"
    })
    .await;

    // Every instance holds a warm copy of every partition's state.
    for instance in &instances {
        let base = &instance.base;
        eventually_within(30, "standby copies held", || async {
            (metric(&http, base, "vigil_cluster_standby_rows").await > 0).then_some(())
        })
        .await;
    }
    // The revocation reaches every other instance's status view (the owner writes it to the
    // state topic a moment after it applies it): a check there is then denied from the view, with
    // no hop to the owner.
    for (i, instance) in instances.iter().enumerate().filter(|(i, _)| *i != victim) {
        let base = &instance.base;
        let denied = r#"vigil_cluster_view_answers_total{answer="deny"}"#;
        let before = metric(&http, base, denied).await;
        eventually_within(
            30,
            &format!("instance {i}'s view to hold the revocation"),
            || async {
                let answer = check_answer(&http, base, &grant).await;
                assert_eq!(answer["decision"], json!("deny"), "{answer}");
                (metric(&http, base, denied).await > before).then_some(())
            },
        )
        .await;
    }
    // kill -9: the others take its partitions over after its session times out. Until then a
    // check on another instance is answered with its status view: the revoked grant denied at
    // once; an active one denied as `unconfirmed`, with the view's lag (fail closed: its owner
    // cannot confirm it, and the view alone never allows).
    let mut killed = instances.remove(victim);
    killed.child.kill().unwrap();
    killed.child.wait().unwrap();
    let active = format!("m{}", on_victim[1]);
    let mut from_view = 0;
    for instance in &instances {
        let answer = check_answer(&http, &instance.base, &grant).await;
        assert_eq!(
            (answer["decision"].as_str(), answer["status"].as_str()),
            (Some("deny"), Some("revoked")),
            "{answer}"
        );
        assert!(
            answer.get("view_lag").is_none(),
            "a revocation needs no confirmation: {answer}"
        );
        let answer = check_answer(&http, &instance.base, &active).await;
        if answer.get("view_lag").is_some() {
            assert_eq!(
                (answer["decision"].as_str(), answer["status"].as_str()),
                (Some("deny"), Some("unconfirmed")),
                "{answer}"
            );
            from_view += 1;
        } else {
            // The partition already moved: the new owner's live answer.
            assert_eq!(answer["status"], json!("active"), "{answer}");
        }
    }
    assert!(
        from_view > 0,
        "answered from the view while the owner was gone"
    );
    let survivors = split(&http, &instances.iter().collect::<Vec<_>>()).await;
    println!("after the kill: {survivors:?}");
    for (i, _) in users.iter().enumerate() {
        let want = if i == revoked { "revoked" } else { "active" };
        for instance in &instances {
            let (code, body) = grant_status(&http, &instance.base, &format!("m{i}")).await;
            assert_eq!(
                (code, body["status"].as_str()),
                (200, Some(want)),
                "m{i}: {body}"
            );
        }
    }
    for instance in &instances {
        assert_live_answers(&http, &instance.base, &grant, ("deny", "revoked", 403)).await;
        // The killed owner's decision outlives it: every other instance lists it.
        let listed =
            listed_decisions(&http, &instance.base, &format!("grant={grant}&limit=100")).await;
        assert_eq!(listed.len(), 1, "the dead owner's decision: {listed:?}");
        assert_eq!(listed[0]["effect"], "revoke");
    }
    // The principal's new owner explains it with the decision its old owner made.
    let explained = http
        .get(format!(
            "{}/v1/subjects/{}",
            instances[0].base,
            principal_key(&users[revoked])
        ))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(explained.status(), 200);
    let explained: Value = explained.json().await.unwrap();
    assert!(
        explained["recent_decisions"]
            .as_array()
            .is_some_and(|d| d.iter().any(|d| d["grant_id"] == json!(grant))),
        "{explained}"
    );
    // A signal for another of its users reaches the new owner, which holds the grant.
    let moved = on_victim[1];
    assert_eq!(
        push_set(
            &http,
            &instances[0].base,
            &tx,
            &disabled(&users[moved], "after")
        )
        .await,
        202
    );
    let moved_grant = format!("m{moved}");
    wait_for(
        &instances,
        30,
        "the new owner to revoke the moved grant",
        || async {
            grant_status(&http, &instances[1].base, &moved_grant)
                .await
                .1["status"]
                == "revoked"
        },
    )
    .await;

    // A new instance joins: partitions move to it with their state.
    instances.push(start_instance(&tx, &brokers, 4_000, true));
    let rejoined = split(&http, &instances.iter().collect::<Vec<_>>()).await;
    println!("after the join: {rejoined:?}");
    for (i, _) in users.iter().enumerate() {
        let want = if i == revoked || i == moved {
            "revoked"
        } else {
            "active"
        };
        let holders = {
            let mut n = 0;
            for instance in &instances {
                let local = http
                    .get(format!("{}/v1/grants/m{i}", instance.base))
                    .bearer_auth(ADMIN_TOKEN)
                    .header("x-vigil-forwarded", "1")
                    .send()
                    .await
                    .unwrap();
                if local.status().as_u16() == 200 {
                    n += 1;
                }
                let (code, body) = grant_status(&http, &instance.base, &format!("m{i}")).await;
                assert_eq!(
                    (code, body["status"].as_str()),
                    (200, Some(want)),
                    "m{i}: {body}"
                );
            }
            n
        };
        assert_eq!(holders, 1, "m{i} is held by its owner alone");
    }
    for instance in &instances {
        for g in [&grant, &moved_grant] {
            assert_live_answers(&http, &instance.base, g, ("deny", "revoked", 403)).await;
            // A new instance lists decisions made before it joined, by one gone before it came.
            let listed =
                listed_decisions(&http, &instance.base, &format!("grant={g}&limit=100")).await;
            assert_eq!(listed.len(), 1, "{g}: {listed:?}");
        }
    }
    drop(kafka);
}

/// Kills per run of the cluster crash test; `CRASH_KILLS=N` for more.
fn kills() -> usize {
    std::env::var("CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4)
}

/// What the load of the crash test saw acknowledged.
#[derive(Default)]
struct Acknowledged {
    /// Grants answered 201 (by index).
    registered: BTreeSet<usize>,
    /// Users whose account-disabled SET was answered 202.
    pushed: BTreeSet<usize>,
    /// Users whose HIGH risk-feed message the brokers acknowledged.
    fed: BTreeSet<usize>,
    /// Users whose account-disabled event the simulated IdP queued on Vigil's poll stream.
    polled: BTreeSet<usize>,
    /// Grants seen revoked, with when first seen; confirmed once seen revoked again a second
    /// later (an answer read from memory may precede its batch's durability by milliseconds).
    first_seen_revoked: std::collections::BTreeMap<usize, std::time::Instant>,
    confirmed_revoked: BTreeSet<usize>,
    /// `allow` answered for a confirmed revoked grant: (grant, instance).
    violations: Vec<(usize, String)>,
    checks: usize,
}

/// The cluster under load — registrations and account-disabled SETs sent to any instance, HIGH
/// risk-feed messages produced to the feed topic, account-disabled events a transmitter queues on
/// the stream Vigil polls (one instance at a time), live checks on any instance, an enforcement
/// point polling its stream through any instance and another taking pushes — while it scales out
/// from one instance to three, a random instance is killed with SIGKILL and restarted, again and
/// again, and one leaves cleanly. Afterwards: every 201'd grant is held by its owner; every 202'd
/// SET, every acknowledged feed message and every polled event was applied (its user's grant
/// revoked); the others'
/// grants are still active; every revocation reached both enforcement points; and no instance
/// ever answered `allow` for a grant after its revocation was confirmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_work_survives_kill_9_of_any_instance() {
    use rand::Rng;
    let kafka = brokers_with_topics();
    feed_topics(&kafka);
    let brokers = kafka.bootstrap_servers();
    let tx = Arc::new(Transmitter::start(&[Alg::RS256]).await);
    // A transmitter Vigil polls: one stream for the cluster, polled by one instance at a time.
    let idp = Arc::new(polled_idp().await);
    let polled_transmitter = {
        let mut t = vigil::config::TransmitterConfig::managed(
            "idp-poll",
            idp.issuer(),
            vec![AUD.into()],
            vigil::config::DeliveryMode::Poll,
            "Bearer idp-receiver-token",
        );
        if let Some(m) = &mut t.manage {
            m.poll_timeout_secs = 1;
        }
        t
    };
    let start = || {
        start_instance_with(&tx, &brokers, 4_000, false, |config| {
            with_feeds(&brokers)(config);
            config.transmitters.push(polled_transmitter.clone());
        })
    };
    // One instance at first; the load goes to whichever instances are in the cluster.
    let mut instances = vec![start()];
    let bases = Arc::new(std::sync::RwLock::new(vec![instances[0].base.clone()]));
    let pick = |bases: &std::sync::RwLock<Vec<String>>| {
        let bases = bases.read().unwrap();
        bases[rand::rng().random_range(0..bases.len())].clone()
    };
    let http = http();
    split(&http, &instances.iter().collect::<Vec<_>>()).await;
    wait_for(&instances, 30, "Vigil's stream at the IdP", || async {
        idp.streams().len() == 1
    })
    .await;
    // Users started by the loader so far; it goes on until the kills are done.
    let users = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let load_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let email = |i: usize| format!("crash{i}@example.com");
    let acked = Arc::new(std::sync::Mutex::new(Acknowledged::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let running = |stop: &Arc<std::sync::atomic::AtomicBool>| {
        !stop.load(std::sync::atomic::Ordering::Relaxed)
    };
    // The enforcement points: one polls its stream through any instance, one takes pushes.
    let (poll_id, audience) = {
        let stream = create_stream(&http, &instances[0].base, None).await;
        (
            stream["stream_id"].as_str().unwrap().to_owned(),
            stream["aud"].as_str().unwrap().to_owned(),
        )
    };
    let pushed_sets: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let push_url = {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/events", listener.local_addr().unwrap());
        let sink = pushed_sets.clone();
        tokio::spawn(async move {
            let app = axum::Router::new().route(
                "/events",
                axum::routing::post(move |body: String| {
                    let sink = sink.clone();
                    async move {
                        sink.lock().unwrap().push(body);
                        axum::http::StatusCode::ACCEPTED
                    }
                }),
            );
            axum::serve(listener, app).await.unwrap();
        });
        url
    };
    create_stream(&http, &instances[0].base, Some(&push_url)).await;
    let polled_sets: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let poller = {
        let (http, bases, stop, poll_id, polled) = (
            http.clone(),
            bases.clone(),
            stop.clone(),
            poll_id.clone(),
            polled_sets.clone(),
        );
        tokio::spawn(async move {
            let mut ack: Vec<String> = Vec::new();
            while running(&stop) {
                // Not answered (an instance down, the stream's partition moving): what was to be
                // acknowledged is acknowledged with the next answer, or delivered again.
                if let Some(sets) = poll_through(&http, &pick(&bases), &poll_id, &ack).await {
                    ack = sets.keys().cloned().collect();
                    polled.lock().unwrap().extend(sets.into_values());
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("acks", "all")
        .create()
        .unwrap();

    // Registrations, then (for every other user) the SET that disables the account, each sent to
    // a random instance and retried until acknowledged.
    let loader = {
        let (http, bases, acked, tx, stop, users, load_done, producer, idp) = (
            http.clone(),
            bases.clone(),
            acked.clone(),
            tx.clone(),
            stop.clone(),
            users.clone(),
            load_done.clone(),
            producer.clone(),
            idp.clone(),
        );
        tokio::spawn(async move {
            while !load_done.load(std::sync::atomic::Ordering::Relaxed) {
                let i = users.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let grant = session_grant(&format!("c{i}"), &email(i));
                while running(&stop) {
                    let base = pick(&bases);
                    let r = http
                        .post(format!("{base}/v1/grants"))
                        .bearer_auth(ADMIN_TOKEN)
                        .json(&grant)
                        .send()
                        .await;
                    if r.is_ok_and(|r| r.status().as_u16() == 201) {
                        acked.lock().unwrap().registered.insert(i);
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                if i % 4 == 1 {
                    let message = high_risk(&email(i), &format!("crash-feed-{i}"));
                    while running(&stop) {
                        let sent = producer
                            .send(
                                FutureRecord::<str, str>::to("risk")
                                    .key(&email(i))
                                    .payload(&message),
                                Duration::from_secs(5),
                            )
                            .await;
                        if sent.is_ok() {
                            acked.lock().unwrap().fed.insert(i);
                            break;
                        }
                    }
                }
                if i % 8 == 3 {
                    let queued = idp
                        .emit(
                            DISABLED,
                            json!({"format": "email", "email": email(i)}),
                            json!({}),
                        )
                        .unwrap();
                    if queued > 0 {
                        acked.lock().unwrap().polled.insert(i);
                    }
                }
                if i % 2 == 1 {
                    continue;
                }
                let claims = disabled(&email(i), &format!("crash-{i}"));
                while running(&stop) {
                    if push_set(&http, &pick(&bases), &tx, &claims).await == 202 {
                        acked.lock().unwrap().pushed.insert(i);
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        })
    };
    // Live checks on random instances: a revocation, once confirmed, is never answered allow.
    let checker = {
        let (http, bases, acked, stop, users) = (
            http.clone(),
            bases.clone(),
            acked.clone(),
            stop.clone(),
            users.clone(),
        );
        tokio::spawn(async move {
            while running(&stop) {
                let started = users.load(std::sync::atomic::Ordering::Relaxed);
                if started < 2 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                let i = 2 * rand::rng().random_range(0..started / 2);
                let base = pick(&bases);
                let Ok(r) = http
                    .post(format!("{base}/v1/check"))
                    .bearer_auth(ADMIN_TOKEN)
                    .json(&json!({"grant_id": format!("c{i}")}))
                    .send()
                    .await
                else {
                    continue;
                };
                let Ok(answer) = r.json::<Value>().await else {
                    continue;
                };
                let mut a = acked.lock().unwrap();
                a.checks += 1;
                if answer["status"] == "revoked" {
                    let first = *a
                        .first_seen_revoked
                        .entry(i)
                        .or_insert_with(std::time::Instant::now);
                    if first.elapsed() > Duration::from_secs(1) {
                        a.confirmed_revoked.insert(i);
                    }
                }
                if answer["decision"] == "allow" && a.confirmed_revoked.contains(&i) {
                    a.violations.push((i, base));
                }
            }
        })
    };

    // Scale out under load: 1 → 3 instances, the partitions (and their state) spread out.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for _ in 0..2 {
        instances.push(start());
        bases
            .write()
            .unwrap()
            .push(instances.last().unwrap().base.clone());
    }
    split(&http, &instances.iter().collect::<Vec<_>>()).await;
    println!("scaled out to 3");
    for kill in 0..kills() {
        tokio::time::sleep(Duration::from_millis(
            rand::rng().random_range(1_000..3_000),
        ))
        .await;
        let victim = rand::rng().random_range(0..instances.len());
        println!("kill {kill}: instance {victim}");
        instances[victim].kill_and_restart();
        // Back in the group before the next kill.
        split(&http, &instances.iter().collect::<Vec<_>>()).await;
    }
    // One instance leaves cleanly (SIGTERM): its partitions move at once, no session timeout.
    let leaving = instances.pop().unwrap();
    bases.write().unwrap().pop();
    let left_at = std::time::Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &leaving.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    split(&http, &instances.iter().collect::<Vec<_>>()).await;
    println!(
        "one left cleanly: partitions moved in {:?}",
        left_at.elapsed()
    );
    drop(leaving);
    // Let the loader finish the user it is on, then stop the checker.
    load_done.store(true, std::sync::atomic::Ordering::Relaxed);
    eventually_within(120, "the load to finish", || async {
        loader.is_finished().then_some(())
    })
    .await;
    let users = users.load(std::sync::atomic::Ordering::Relaxed);
    split(&http, &instances.iter().collect::<Vec<_>>()).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    checker.await.unwrap();
    poller.await.unwrap();

    // Every event the IdP queued is polled and acknowledged in the end.
    wait_for(&instances, 90, "the IdP's events all polled", || async {
        idp.streams()
            .first()
            .is_some_and(|s| s["queued"] == json!(0))
    })
    .await;
    let (registered, pushed, fed, polled, checks, confirmed, violations) = {
        let a = acked.lock().unwrap();
        (
            a.registered.clone(),
            a.pushed.clone(),
            a.fed.clone(),
            a.polled.clone(),
            a.checks,
            a.confirmed_revoked.len(),
            a.violations.clone(),
        )
    };
    println!(
        "registered {}, SETs acknowledged {}, feed messages acknowledged {}, IdP events polled {}, checks {checks}, revocations confirmed during the run {confirmed}",
        registered.len(),
        pushed.len(),
        fed.len(),
        polled.len()
    );
    assert_eq!(registered.len(), users, "every grant registered in the end");
    assert_eq!(
        pushed.len(),
        users.div_ceil(2),
        "every SET acknowledged in the end"
    );
    assert!(
        violations.is_empty(),
        "allow after a confirmed revocation: {violations:?}"
    );
    assert_eq!(
        fed.len(),
        users / 4 + usize::from(users % 4 > 1),
        "every feed message acknowledged"
    );
    assert_eq!(polled.len(), (users + 4) / 8, "every IdP event queued");
    assert_eq!(
        idp.streams().len(),
        1,
        "one stream at the IdP for the cluster, across the kills"
    );
    let revoked: BTreeSet<usize> = pushed.union(&fed).chain(&polled).copied().collect();
    for i in 0..users {
        let want = if revoked.contains(&i) {
            "revoked"
        } else {
            "active"
        };
        let grant = format!("c{i}");
        let what = format!(
            "every acknowledged SET and feed message applied: {grant} {want} (pushed {}, fed {})",
            pushed.contains(&i),
            fed.contains(&i)
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let current = bases.read().unwrap().clone();
            let mut all = true;
            for base in &current {
                let (code, body) = grant_status(&http, base, &grant).await;
                all &= code == 200 && body["status"] == want;
            }
            if all || std::time::Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let current = bases.read().unwrap().clone();
        for base in current {
            let (code, body) = grant_status(&http, &base, &grant).await;
            if code != 200 || body["status"] != want {
                let subject = admin_get(&http, &format!("{base}/v1/subjects/email:{}", email(i)))
                    .await
                    .text()
                    .await
                    .unwrap_or_default();
                let decisions =
                    listed_decisions(&http, &base, &format!("grant={grant}&limit=100")).await;
                println!("{base}: {grant} {code} {body}\n  subject: {subject}\n  decisions: {decisions:?}");
            }
        }
        wait_for(&instances, 60, &what, || async {
            let mut all = true;
            let current = bases.read().unwrap().clone();
            for base in current {
                let (code, body) = grant_status(&http, &base, &grant).await;
                all &= code == 200 && body["status"] == want;
            }
            all
        })
        .await;
    }
    // Every revocation reached both enforcement points (at least once: a SET delivered again
    // after a failover carries the same jti), each SET verified with the cluster's keys; no
    // enforcement point heard of a revocation that did not happen.
    let want: BTreeSet<String> = revoked.iter().map(|&i| email(i)).collect();
    let base = bases.read().unwrap()[0].clone();
    let (_, keys) = jwks_of(&http, &base).await;
    let subjects_of = |sets: &std::sync::Mutex<Vec<String>>| -> BTreeSet<String> {
        sets.lock()
            .unwrap()
            .iter()
            .map(|set| {
                let claims = keys.verify_set(set, CLUSTER_ISSUER, &audience).unwrap();
                crash_user(&claims["sub_id"].to_string())
            })
            .collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let mut ack: Vec<String> = Vec::new();
    loop {
        let (polled, pushed) = (subjects_of(&polled_sets), subjects_of(&pushed_sets));
        assert!(
            polled.is_subset(&want),
            "polled: {:?}",
            polled.difference(&want)
        );
        assert!(
            pushed.is_subset(&want),
            "pushed: {:?}",
            pushed.difference(&want)
        );
        if polled == want && pushed == want {
            break;
        }
        if std::time::Instant::now() > deadline {
            println!(
                "not polled: {:?}; not pushed: {:?}",
                want.difference(&polled),
                want.difference(&pushed)
            );
            wait_for(
                &instances,
                0,
                "every revocation delivered to both enforcement points",
                || async { false },
            )
            .await;
        }
        if let Some(sets) = poll_through(&http, &base, &poll_id, &ack).await {
            ack = sets.keys().cloned().collect();
            polled_sets.lock().unwrap().extend(sets.into_values());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "delivered: {} revocations, {} SETs polled, {} pushed",
        want.len(),
        polled_sets.lock().unwrap().len(),
        pushed_sets.lock().unwrap().len()
    );
    drop(instances);
    drop(kafka);
}

/// The crash test's user a SET's subject names (`crash<i>@example.com`).
fn crash_user(subject: &str) -> String {
    let at = subject.find("crash").expect("a crash test user");
    let end = subject[at..].find("@example.com").expect("an email") + at;
    format!("{}@example.com", &subject[at..end])
}

/// Context retention in cluster mode: a subject a SET named by two identifiers, with no grant, is
/// linked on every instance (the alias topic); once its window is over its owner forgets its
/// context and both links, and the links' tombstones on the alias topic take them off every
/// instance's table. A subject with a grant keeps its links everywhere — also on the instance
/// that holds neither its grant nor its context (the links are its owner's to forget).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_forgotten_subjects_links_leave_every_instance() {
    const WINDOW_SECS: u64 = 5;
    let (_kafka, tx, instances) = two_instances(|config| {
        // The SET below disables the account: its context's window is that one.
        config.engine.context_retention_secs = WINDOW_SECS;
        config.engine.disabled_account_retention_secs = WINDOW_SECS;
    })
    .await;
    let http = http();
    let owners = split(&http, &instances.iter().collect::<Vec<_>>()).await;
    let email = "ghost@example.com";
    let owner = owners
        .iter()
        .position(|o| {
            o.contains(&vigil::cluster::partition_of(
                &principal_key(email),
                PARTITIONS,
            ))
        })
        .unwrap();
    let before: Vec<u64> = {
        let mut held = Vec::new();
        for instance in &instances {
            held.push(aliases_held(&http, &instance.base).await);
        }
        held
    };
    // A subject with a grant, linked by two identifiers too.
    let mut kept = session_grant("kept", "kept@example.com");
    kept["subject"] = json!({"format": "aliases", "identifiers": [
        {"format": "email", "email": "kept@example.com"},
        {"format": "phone_number", "phone_number": "+12025550143"}]});
    registered(&http, &instances[0].base, &kept).await;
    let before: Vec<u64> = before.iter().map(|held| held + 2).collect();
    // Pushed to the instance that does not own the subject: it goes to the owner, which links
    // both identifiers; every instance reads the links.
    let set = json!({"iss": ISS, "aud": AUD, "jti": "ghost-1", "iat": now() as i64,
        "sub_id": {"format": "aliases", "identifiers": [
            {"format": "email", "email": email},
            {"format": "phone_number", "phone_number": "+12025550142"}]},
        "events": {DISABLED: {}}});
    assert_eq!(
        push_set(&http, &instances[1 - owner].base, &tx, &set).await,
        202
    );
    for (instance, before) in instances.iter().zip(&before) {
        eventually_within(30, "the two links read everywhere", || async {
            (aliases_held(&http, &instance.base).await == before + 2).then_some(())
        })
        .await;
    }
    let subject = format!(
        "{}/v1/subjects/{}",
        instances[owner].base,
        principal_key(email)
    );
    assert_eq!(
        admin_get(&http, &subject).await.status(),
        200,
        "the owner's context"
    );
    // The window passes: the owner forgets the context, and every instance the links.
    for (instance, before) in instances.iter().zip(&before) {
        eventually_within(30, "the forgotten links gone everywhere", || async {
            (aliases_held(&http, &instance.base).await == *before).then_some(())
        })
        .await;
    }
    assert_eq!(
        admin_get(&http, &subject).await.status(),
        404,
        "the context forgotten"
    );
    // Another window: the grant's links are still on both instances.
    tokio::time::sleep(Duration::from_secs(WINDOW_SECS + 2)).await;
    for (instance, before) in instances.iter().zip(&before) {
        assert_eq!(
            aliases_held(&http, &instance.base).await,
            *before,
            "{}: a grant's links stay",
            instance.base
        );
    }
    assert!(
        metric(
            &http,
            &instances[owner].base,
            "vigil_aliases_forgotten_total"
        )
        .await
            >= 2,
        "counted on the owner"
    );
}

/// A party's grant quota is the cluster's, not each instance's: with its grants spread over two
/// instances, a new one is refused on either once the two together hold the quota, whichever
/// instance is asked; a grant deleted on one makes room on the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partys_grant_quota_is_counted_across_the_cluster() {
    const QUOTA: usize = 4;
    let (_kafka, _tx, instances) = two_instances(|config| {
        config.engine.max_grants_per_registrant = Some(QUOTA);
    })
    .await;
    let http = http();
    let owners = split(&http, &instances.iter().collect::<Vec<_>>()).await;
    // Three subjects owned by each instance.
    let owned_by = |i: usize| -> Vec<String> {
        (0..)
            .map(|n| format!("quota-{n}@example.com"))
            .filter(|email| {
                owners[i].contains(&vigil::cluster::partition_of(
                    &principal_key(email),
                    PARTITIONS,
                ))
            })
            .take(3)
            .collect()
    };
    let (first, second) = (owned_by(0), owned_by(1));
    // Two grants on each instance, all registered through the first.
    for (n, email) in first[..2].iter().chain(&second[..2]).enumerate() {
        registered(
            &http,
            &instances[0].base,
            &session_grant(&format!("q{n}"), email),
        )
        .await;
    }
    let elsewhere = "vigil_cluster_grants_by_registrant{registrant=\"client:test-admin\"}";
    for instance in &instances {
        wait_for(
            &instances,
            30,
            "the other instance's count announced",
            || async { metric(&http, &instance.base, elsewhere).await == 2 },
        )
        .await;
    }
    // Each holds two, under the quota on its own: the cluster holds four, and both refuse.
    for (instance, email) in instances.iter().zip([&first[2], &second[2]]) {
        let (code, body) = register(&http, &instance.base, &session_grant("over", email)).await;
        assert_eq!(code, 429, "{}: {body}", instance.base);
        assert_eq!(body["error"], "grant_quota", "{body}");
        assert_eq!(grant_status(&http, &instance.base, "over").await.0, 404);
    }
    // A grant deleted on the second instance makes room on the first once announced.
    let deleted = http
        .delete(format!("{}/v1/grants/q3", instances[1].base))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status().as_u16(), 204);
    let room = session_grant("room", &first[2]);
    eventually_within(30, "room on the first instance", || async {
        (register(&http, &instances[0].base, &room).await.0 == 201).then_some(())
    })
    .await;
    // Full again, once the second instance has heard of it.
    wait_for(
        &instances,
        30,
        "the first instance's new count announced",
        || async { metric(&http, &instances[1].base, elsewhere).await == 3 },
    )
    .await;
    let (code, body) = register(
        &http,
        &instances[1].base,
        &session_grant("over", &second[2]),
    )
    .await;
    assert_eq!(code, 429, "{body}");
}

/// `partition_of` is Kafka's partitioner: librdkafka's own `murmur2` partitioner, producing to
/// the mock broker, puts every key on the partition it names.
#[tokio::test]
async fn keys_land_where_partition_of_says() {
    let kafka = MockCluster::new(1).unwrap();
    kafka.create_topic("keys", 7, 1).unwrap();
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap_servers())
        .set("partitioner", "murmur2")
        .create()
        .unwrap();
    for i in 0..200 {
        let key = principal_key(&format!("someone{i}@example.com"));
        let delivered = producer
            .send(
                FutureRecord::to("keys").key(&key).payload("x"),
                Duration::from_secs(5),
            )
            .await
            .unwrap();
        assert_eq!(
            delivered.partition,
            vigil::cluster::partition_of(&key, 7),
            "{key}"
        );
    }
}

/// A SET's `kid` header.
fn kid_of(token: &str) -> String {
    use base64::Engine;
    let header = token.split('.').next().unwrap();
    let header: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(header)
            .unwrap(),
    )
    .unwrap();
    header["kid"].as_str().unwrap().to_owned()
}

/// The key ids an instance's JWKS publishes, and the keys to verify with.
async fn jwks_of(
    http: &reqwest::Client,
    base: &str,
) -> (BTreeSet<String>, vigil::sim::jose::PublishedKeys) {
    let bytes = http
        .get(format!("{base}/jwks.json"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let doc: Value = serde_json::from_slice(&bytes).unwrap();
    let kids = doc["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap().to_owned())
        .collect();
    (
        kids,
        vigil::sim::jose::PublishedKeys::from_jwks_json(&bytes).unwrap(),
    )
}

/// An SSF management call as the enforcement point: status and body.
async fn ep_call(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = http.request(method, url).bearer_auth(EP_TOKEN);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let r = request.send().await.unwrap();
    let code = r.status().as_u16();
    (code, r.json().await.unwrap_or(Value::Null))
}

/// Creates a stream through `base` as the enforcement point (`delivery`: a push endpoint, or
/// poll when `None`): its configuration, answered 201.
async fn create_stream(http: &reqwest::Client, base: &str, push_to: Option<&str>) -> Value {
    let body = match push_to {
        Some(url) => json!({"delivery": {"method": "urn:ietf:rfc:8935", "endpoint_url": url}}),
        None => json!({}),
    };
    let (code, stream) = ep_call(
        http,
        reqwest::Method::POST,
        &format!("{base}/ssf/streams"),
        Some(body),
    )
    .await;
    assert_eq!(code, 201, "{stream}");
    stream
}

/// A simulated IdP (an SSF transmitter) that Vigil manages a stream at and polls.
async fn polled_idp() -> vigil::sim::idp::Idp {
    vigil::sim::idp::Idp::start(
        "127.0.0.1:0".parse().unwrap(),
        vigil::sim::idp::IdpSettings {
            receiver_credential: "Bearer idp-receiver-token".into(),
            audience: AUD.into(),
            long_poll: Duration::from_secs(1),
            ..vigil::sim::idp::IdpSettings::default()
        },
    )
    .await
    .unwrap()
}

/// Polls `stream` through `base` (acknowledging `ack`), returning its SETs by `jti`.
async fn poll_through(
    http: &reqwest::Client,
    base: &str,
    stream: &str,
    ack: &[String],
) -> Option<std::collections::BTreeMap<String, String>> {
    let r = http
        .post(format!("{base}/ssf/poll/{stream}"))
        .bearer_auth(EP_TOKEN)
        .json(&json!({"ack": ack, "returnImmediately": true}))
        .send()
        .await
        .ok()?;
    if r.status() != 200 {
        return None;
    }
    let body: Value = r.json().await.ok()?;
    Some(
        body["sets"]
            .as_object()?
            .iter()
            .map(|(jti, set)| (jti.clone(), set.as_str().unwrap_or_default().to_owned()))
            .collect(),
    )
}

/// Enforcement points against three instances: streams, keys, poll, SSE and push for the whole
/// cluster, and a stream's unacknowledged SETs across the kill of its deliverer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn enforcement_points_are_served_by_the_whole_cluster() {
    let kafka = brokers_with_topics();
    let brokers = kafka.bootstrap_servers();
    let tx = Transmitter::start(&[Alg::RS256]).await;
    let http = http();
    let mut instances: Vec<Instance> = (0..3)
        .map(|_| start_instance(&tx, &brokers, 6_000, false))
        .collect();
    let refs: Vec<&Instance> = instances.iter().collect();
    split(&http, &refs).await;
    let bases: Vec<String> = instances.iter().map(|i| i.base.clone()).collect();

    // One signing identity: every instance publishes the same keys.
    let (kids, _) = jwks_of(&http, &bases[0]).await;
    assert!(!kids.is_empty());
    for base in &bases[1..] {
        assert_eq!(jwks_of(&http, base).await.0, kids, "{base}'s JWKS");
    }

    // A push receiver for the gateway, on loopback.
    let pushed: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let push_url = format!("http://{}/events", listener.local_addr().unwrap());
    let sink = pushed.clone();
    tokio::spawn(async move {
        let app = axum::Router::new()
            .route(
                "/events",
                axum::routing::post(move |body: String| {
                    let sink = sink.clone();
                    async move {
                        sink.lock().unwrap().push(body);
                        axum::http::StatusCode::ACCEPTED
                    }
                }),
            )
            // A receiver that rejects every SET (RFC 8935 §2.3): its SETs are dead-lettered.
            .route(
                "/rejects",
                axum::routing::post(|| async {
                    (
                        axum::http::StatusCode::BAD_REQUEST,
                        axum::Json(json!({"err": "invalid_request", "description": "no"})),
                    )
                }),
            );
        axum::serve(listener, app).await.unwrap();
    });
    let rejects_url = push_url.replace("/events", "/rejects");

    // A poll stream created through instance 0, a push stream through instance 1: both read back
    // through every instance.
    let poll_stream = create_stream(&http, &bases[0], None).await;
    let poll_id = poll_stream["stream_id"].as_str().unwrap().to_owned();
    let audience = poll_stream["aud"].as_str().unwrap().to_owned();
    let push_stream = create_stream(&http, &bases[1], Some(&push_url)).await;
    let push_id = push_stream["stream_id"].as_str().unwrap().to_owned();
    let rejected = create_stream(&http, &bases[2], Some(&rejects_url)).await;
    let rejected_id = rejected["stream_id"].as_str().unwrap().to_owned();
    // (The other instances read the streams topic within tens of milliseconds.)
    for base in &bases {
        for id in [&poll_id, &push_id] {
            let read = eventually_within(5, "the stream on every instance", || async {
                let (code, read) = ep_call(
                    &http,
                    reqwest::Method::GET,
                    &format!("{base}/ssf/streams?stream_id={id}"),
                    None,
                )
                .await;
                (code == 200).then_some(read)
            })
            .await;
            assert_eq!(read["stream_id"], json!(id));
        }
    }

    // Users on every owner, each revoked by a SET pushed to a rotating instance: both streams get
    // every revocation, polled through instance 2, signed with the cluster's key.
    let users: Vec<String> = (0..6).map(|i| format!("ep-user-{i}@example.com")).collect();
    for (i, user) in users.iter().enumerate() {
        registered(
            &http,
            &bases[i % 3],
            &session_grant(&format!("ep-grant-{i}"), user),
        )
        .await;
    }
    for (i, user) in users.iter().enumerate() {
        let claims = json!({"iss": ISS, "aud": AUD, "iat": now() as i64, "jti": format!("ep-off-{i}"),
            "sub_id": {"format": "email", "email": user},
            "events": {DISABLED: {"event_timestamp": now() as i64}}});
        assert_eq!(
            push_set(&http, &bases[(i + 1) % 3], &tx, &claims).await,
            202
        );
    }
    let (_, keys) = jwks_of(&http, &bases[2]).await;
    let mut polled: std::collections::BTreeMap<String, String> = Default::default();
    let mut ack: Vec<String> = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while polled.len() < users.len() {
        if std::time::Instant::now() > deadline {
            for base in &bases {
                eprintln!(
                    "{base}: emitted {}",
                    metric(&http, base, "vigil_sets_emitted_total").await
                );
            }
            for i in 0..6 {
                eprintln!(
                    "grant {i}: {:?}",
                    grant_status(&http, &bases[0], &format!("ep-grant-{i}")).await
                );
            }
            wait_for(
                &instances,
                0,
                "every revocation polled through instance 2",
                || async { false },
            )
            .await;
        }
        if let Some(sets) = poll_through(&http, &bases[2], &poll_id, &ack).await {
            ack.clear();
            for (jti, set) in sets {
                ack.push(jti.clone());
                polled.insert(jti, set);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut subjects = BTreeSet::new();
    for set in polled.values() {
        let claims = keys.verify_set(set, CLUSTER_ISSUER, &audience).unwrap();
        subjects.insert(claims["sub_id"]["email"].as_str().unwrap_or("").to_owned());
        assert!(kids.contains(&kid_of(set)));
    }
    assert_eq!(subjects, users.iter().cloned().collect::<BTreeSet<_>>());
    // Acknowledged through instance 2: gone wherever the stream is delivered from.
    assert_eq!(
        poll_through(&http, &bases[0], &poll_id, &ack)
            .await
            .map(|s| s.len()),
        Some(0)
    );
    wait_for(&instances, 60, "every revocation pushed", || async {
        pushed.lock().unwrap().len() >= users.len()
    })
    .await;
    let pushed_now = pushed.lock().unwrap().clone();
    let pushed_subjects: BTreeSet<String> = pushed_now
        .iter()
        .map(|set| {
            keys.verify_set(set, CLUSTER_ISSUER, &audience).unwrap()["sub_id"]["email"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(pushed_subjects, subjects, "each revocation pushed once");
    // The rejected SETs are dead letters on the rejecting stream's deliverer, listed by every
    // instance; a subject is explained by every instance (its owner's context).
    for base in &bases {
        let listed = eventually_within(30, "the cluster's dead letters", || async {
            let listed: Value = admin_get(&http, &format!("{base}/v1/deadletters"))
                .await
                .json()
                .await
                .ok()?;
            let ours = listed["dead_letters"]
                .as_array()?
                .iter()
                .filter(|d| d["stream_id"] == json!(rejected_id))
                .count();
            // Fewer than a page: every instance's are listed, and counted.
            let all = listed["dead_letters"].as_array()?.len();
            (ours == users.len() && listed["total"] == json!(all)).then_some(ours)
        })
        .await;
        assert_eq!(listed, users.len(), "{base}");
        let explained = admin_get(&http, &format!("{base}/v1/subjects/email:{}", users[0])).await;
        assert_eq!(explained.status(), 200, "{base} explains {}", users[0]);
    }

    // A rotation on instance 1 is every instance's: each publishes the new key and signs with it.
    let rotated: Value = http
        .post(format!("{}/v1/keys/rotate", bases[1]))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let new_kid = rotated["kid"].as_str().unwrap().to_owned();
    wait_for(&instances, 20, "the new key on every instance", || async {
        let mut all = true;
        for base in &bases {
            all &= jwks_of(&http, base).await.0.contains(&new_kid);
        }
        all
    })
    .await;

    // Two more revocations, not acknowledged: polled through instance 0, then the stream's
    // deliverer is killed and the next one delivers the same SETs (same jti), by SSE through an
    // instance that does not deliver the stream.
    for (i, user) in ["ep-late-0@example.com", "ep-late-1@example.com"]
        .iter()
        .enumerate()
    {
        registered(
            &http,
            &bases[i],
            &session_grant(&format!("ep-late-{i}"), user),
        )
        .await;
        let claims = json!({"iss": ISS, "aud": AUD, "iat": now() as i64, "jti": format!("ep-late-off-{i}"),
            "sub_id": {"format": "email", "email": user},
            "events": {DISABLED: {"event_timestamp": now() as i64}}});
        assert_eq!(push_set(&http, &bases[2 - i], &tx, &claims).await, 202);
    }
    let (_, keys) = jwks_of(&http, &bases[0]).await;
    let mut late: std::collections::BTreeMap<String, String> = Default::default();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while late.len() < 2 {
        if std::time::Instant::now() > deadline {
            wait_for(&instances, 0, "the late revocations polled", || async {
                false
            })
            .await;
        }
        if let Some(sets) = poll_through(&http, &bases[0], &poll_id, &[]).await {
            late = sets;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for set in late.values() {
        assert_eq!(kid_of(set), new_kid, "signed with the rotated key");
        keys.verify_set(set, CLUSTER_ISSUER, &audience).unwrap();
    }
    let partition = vigil::cluster::partition_of(&poll_id, PARTITIONS);
    let deliverer = owner_among(&http, &bases, &[0, 1, 2], partition)
        .await
        .expect("some instance delivers the poll stream");
    instances[deliverer].child.kill().unwrap();
    instances[deliverer].child.wait().unwrap();
    let survivors: Vec<usize> = (0..3).filter(|i| *i != deliverer).collect();
    let refs: Vec<&Instance> = survivors.iter().map(|&i| &instances[i]).collect();
    split(&http, &refs).await;
    let next = owner_among(&http, &bases, &survivors, partition)
        .await
        .expect("a survivor delivers the poll stream");
    let through = survivors.iter().copied().find(|&i| i != next).unwrap();
    // (503 with Retry-After until the instance passing it on has heard who delivers it now.)
    let mut sse = eventually_within(20, "an SSE stream through a non-deliverer", || async {
        let r = http
            .get(format!("{}/ssf/sse/{poll_id}", bases[through]))
            .bearer_auth(EP_TOKEN)
            .timeout(Duration::from_secs(60))
            .send()
            .await
            .ok()?;
        match r.status().as_u16() {
            200 => Some(r),
            503 => None,
            other => panic!("SSE through a non-deliverer answered {other}"),
        }
    })
    .await;
    let mut text = String::new();
    let mut again = BTreeSet::new();
    while again.len() < late.len() {
        let chunk = tokio::time::timeout(Duration::from_secs(30), sse.chunk())
            .await
            .expect("SSE events in time")
            .unwrap()
            .expect("the event stream stays open");
        text.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = text.find("\n\n") {
            let block: String = text.drain(..end + 2).collect();
            if let Some(data) = block.lines().find_map(|l| l.strip_prefix("data:")) {
                let claims = keys
                    .verify_set(data.trim(), CLUSTER_ISSUER, &audience)
                    .unwrap();
                again.insert(claims["jti"].as_str().unwrap().to_owned());
            }
        }
    }
    assert_eq!(
        again,
        late.keys().cloned().collect::<BTreeSet<_>>(),
        "the same SETs, the same jti"
    );
    drop(sse);

    // The killed instance comes back: it reads the cluster's keys and streams again.
    instances[deliverer].child = spawn_vigil(instances[deliverer].dir.path());
    let refs: Vec<&Instance> = instances.iter().collect();
    split(&http, &refs).await;
    assert!(jwks_of(&http, &bases[deliverer]).await.0.contains(&new_kid));
    let (code, _) = ep_call(
        &http,
        reqwest::Method::GET,
        &format!("{}/ssf/streams?stream_id={push_id}", bases[deliverer]),
        None,
    )
    .await;
    assert_eq!(code, 200);
}

/// Risk feeds on `brokers`' `risk` topic (three partitions, made by [`feed_topics`]), consumed by
/// the cluster's feeds group.
fn with_feeds(brokers: &str) -> impl Fn(&mut vigil::config::Config) + '_ {
    move |config| {
        config.kafka.brokers = brokers.to_owned();
        config.kafka.group_id = format!("{NAME}-feeds");
        config.kafka.topics = vec!["risk".into()];
        config.kafka.dead_letter_topic = "risk.dead-letter".into();
        config.kafka.batch_wait_ms = 5;
        // A killed instance's feed partitions move after this (librdkafka's default is 45 s).
        for (k, v) in [
            ("heartbeat_interval_ms", "500"),
            ("session_timeout_ms", "4000"),
        ] {
            config.kafka.properties.insert(k.into(), v.into());
        }
    }
}

/// The feed topic and its dead-letter topic on the mock brokers.
fn feed_topics(kafka: &MockCluster<'static, rdkafka::producer::DefaultProducerContext>) {
    kafka.create_topic("risk", 3, 3).unwrap();
    kafka.create_topic("risk.dead-letter", 1, 3).unwrap();
}

/// A native risk-feed message: HIGH for `email`, with the dedupe id `id`.
fn high_risk(email: &str, id: &str) -> String {
    json!({"subject": {"format": "email", "email": email}, "level": "HIGH",
        "source": "ueba", "event_time": now(), "id": id})
    .to_string()
}

/// Risk feeds in cluster mode: three instances split a three-partition feed topic in their feeds'
/// group; a HIGH score for each of six users, produced to whichever partition, revokes the user's
/// grant on its owner; the same messages again (same ids) decide nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn risk_feeds_reach_each_principals_owner() {
    let kafka = brokers_with_topics();
    feed_topics(&kafka);
    let brokers = kafka.bootstrap_servers();
    let tx = Transmitter::start(&[Alg::RS256]).await;
    let http = http();
    let instances: Vec<Instance> = (0..3)
        .map(|_| start_instance_with(&tx, &brokers, 6_000, false, with_feeds(&brokers)))
        .collect();
    let refs: Vec<&Instance> = instances.iter().collect();
    split(&http, &refs).await;
    let bases: Vec<String> = instances.iter().map(|i| i.base.clone()).collect();
    // The feed topic's three partitions are split between the instances, each ready.
    eventually_within(60, "the feed partitions split", || async {
        let mut assigned = 0;
        for base in &bases {
            let ready = readyz(&http, base).await?;
            if ready["status"] != json!("ready") {
                return None;
            }
            assigned += ready["risk_feeds"]["assigned"].as_u64()?;
        }
        (assigned == 3).then_some(())
    })
    .await;

    let users: Vec<String> = (0..6)
        .map(|i| format!("feed-user-{i}@example.com"))
        .collect();
    for (i, user) in users.iter().enumerate() {
        registered(
            &http,
            &bases[i % 3],
            &session_grant(&format!("feed-grant-{i}"), user),
        )
        .await;
    }
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    let produce_all = || async {
        for (i, user) in users.iter().enumerate() {
            let message = high_risk(user, &format!("feed-high-{i}"));
            producer
                .send(
                    FutureRecord::<str, str>::to("risk")
                        .key(&format!("feed-{i}"))
                        .payload(&message),
                    Duration::from_secs(5),
                )
                .await
                .unwrap();
        }
    };
    produce_all().await;
    for i in 0..users.len() {
        let grant = format!("feed-grant-{i}");
        wait_for(
            &instances,
            60,
            &format!("{grant} revoked by the feed"),
            || async {
                grant_status(&http, &bases[(i + 1) % 3], &grant).await.1["status"]
                    == json!("revoked")
            },
        )
        .await;
    }
    // Delivered again (same ids): applied once, nothing decided again.
    produce_all().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    for i in 0..users.len() {
        assert_eq!(
            decisions_for(&http, &bases[i % 3], &format!("feed-grant-{i}")).await,
            1,
            "one decision for feed-grant-{i}"
        );
    }
}

/// Streams Vigil keeps at a transmitter (the simulated IdP), with three instances: one poll
/// stream and one push stream at the IdP, not one per instance; the push stream's credential is
/// accepted by the instance the IdP pushes to, whichever instance made it; the poll loop runs on
/// one instance, and when that one is killed another takes the stream over (no new stream) and
/// the IdP's next events are polled and applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_at_transmitters_run_on_one_instance_and_move() {
    use vigil::config::{DeliveryMode, TransmitterConfig};
    const CREDENTIAL: &str = "Bearer idp-receiver-token";
    let kafka = brokers_with_topics();
    let brokers = kafka.bootstrap_servers();
    let tx = Transmitter::start(&[Alg::RS256]).await;
    let idp = polled_idp().await;
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    // The IdP pushes to instance 2 (its load balancer, say); any instance may have set it up.
    let push_receiver = format!("http://127.0.0.1:{}", ports[2]);
    let managed = |name: &str, delivery: DeliveryMode| {
        let mut t =
            TransmitterConfig::managed(name, idp.issuer(), vec![AUD.into()], delivery, CREDENTIAL);
        if let Some(m) = &mut t.manage {
            m.verify_interval_secs = 1;
            m.refresh_interval_secs = 1;
            m.poll_timeout_secs = 1;
            m.receiver_url = Some(push_receiver.clone());
        }
        t
    };
    let http = http();
    let mut instances: Vec<Instance> = ports
        .iter()
        .map(|&port| {
            start_instance_with(&tx, &brokers, 4_000, false, |config| {
                config.listen = format!("127.0.0.1:{port}").parse().unwrap();
                config
                    .transmitters
                    .push(managed("idp-poll", DeliveryMode::Poll));
                config
                    .transmitters
                    .push(managed("idp-push", DeliveryMode::Push));
            })
        })
        .collect();
    let refs: Vec<&Instance> = instances.iter().collect();
    split(&http, &refs).await;
    let bases: Vec<String> = instances.iter().map(|i| i.base.clone()).collect();
    // One stream per transmitter, not one per instance.
    wait_for(&instances, 30, "the two streams at the IdP", || async {
        idp.streams().len() == 2
    })
    .await;

    let disable = |email: &str| {
        idp.emit(
            "https://schemas.openid.net/secevent/risc/event-type/account-disabled",
            json!({"format": "email", "email": email}),
            json!({}),
        )
        .unwrap();
    };
    for (i, user) in ["managed-a@example.com", "managed-b@example.com"]
        .iter()
        .enumerate()
    {
        registered(
            &http,
            &bases[i],
            &session_grant(&format!("managed-{i}"), user),
        )
        .await;
        disable(user);
        wait_for(&instances, 30, "the IdP's event applied", || async {
            grant_status(&http, &bases[(i + 1) % 3], &format!("managed-{i}"))
                .await
                .1["status"]
                == json!("revoked")
        })
        .await;
    }
    // Both streams delivered: the poll stream was polled and acknowledged, and instance 2 took the
    // IdP's pushes with the cluster's credential.
    wait_for(&instances, 30, "polled and pushed deliveries", || async {
        let seen = idp.observed();
        let done = seen.acked.len() >= 2 && seen.pushed.len() >= 2;
        if !done {
            println!(
                "IdP: acked {}, pushed {}, push failures {}",
                seen.acked.len(),
                seen.pushed.len(),
                seen.push_failures
            );
        }
        done
    })
    .await;

    // The instance running the streams is killed: another takes them over — the same two streams —
    // and the IdP's next event is polled and applied.
    let key = "transmitter:idp-poll";
    let partition = vigil::cluster::partition_of(key, PARTITIONS);
    let holder = owner_among(&http, &bases, &[0, 1, 2], partition)
        .await
        .expect("an instance runs the poll stream");
    instances[holder].child.kill().unwrap();
    instances[holder].child.wait().unwrap();
    let survivors: Vec<usize> = (0..3).filter(|&i| i != holder).collect();
    let refs: Vec<&Instance> = survivors.iter().map(|&i| &instances[i]).collect();
    split(&http, &refs).await;
    let acked_before = idp.observed().acked.len();
    registered(
        &http,
        &bases[survivors[0]],
        &session_grant("managed-c", "managed-c@example.com"),
    )
    .await;
    disable("managed-c@example.com");
    wait_for(
        &instances,
        60,
        "the event polled by the next instance",
        || async {
            grant_status(&http, &bases[survivors[1]], "managed-c")
                .await
                .1["status"]
                == json!("revoked")
                && idp.observed().acked.len() > acked_before
        },
    )
    .await;
    assert_eq!(
        idp.streams().len(),
        2,
        "the streams were taken over, not made again"
    );
    instances[holder].child = spawn_vigil(instances[holder].dir.path());
    let refs: Vec<&Instance> = instances.iter().collect();
    split(&http, &refs).await;
    assert_eq!(idp.streams().len(), 2);
}

/// A shadow set loaded through one instance runs on every instance, each on its own partitions'
/// grants; any instance lists the cluster's divergences; a promotion through another makes it live
/// on all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_set_runs_on_every_instance_and_is_promoted_on_all() {
    let kafka = brokers_with_topics();
    let brokers = kafka.bootstrap_servers();
    let tx = Transmitter::start(&[Alg::RS256]).await;
    let instances: Vec<Instance> = (0..3)
        .map(|_| start_instance(&tx, &brokers, 4_000, false))
        .collect();
    let http = http();
    let owners = split(&http, &instances.iter().collect::<Vec<_>>()).await;
    let owner_of = |email: &str| {
        let p = vigil::cluster::partition_of(&principal_key(email), PARTITIONS);
        owners.iter().position(|o| o.contains(&p)).unwrap()
    };
    let users: Vec<String> = (0..9).map(|i| format!("shadowed{i}@example.com")).collect();
    let on: BTreeSet<usize> = users.iter().map(|u| owner_of(u)).collect();
    assert_eq!(on.len(), 3, "the users fall on every instance: {owners:?}");
    for (i, user) in users.iter().enumerate() {
        let (code, body) = register_through(
            &http,
            &instances[owner_of(user)].base,
            &session_grant(&format!("sh{i}"), user),
        )
        .await;
        assert_eq!(code, 201, "{body}");
    }
    // The built-in set, with MEDIUM revoking a human's session instead of stepping it up.
    let candidate = vigil::policy::BUILTIN.replace(
        "effect: step_up\n    reason: \"risk MEDIUM",
        "effect: revoke\n    reason: \"risk MEDIUM",
    );
    assert_ne!(candidate, vigil::policy::BUILTIN);
    let loaded = http
        .put(format!("{}/v1/policies/shadow", instances[0].base))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"files": {"default.yaml": candidate}}))
        .send()
        .await
        .unwrap();
    assert_eq!(loaded.status().as_u16(), 201);
    let loaded: Value = loaded.json().await.unwrap();
    assert_eq!(
        loaded["instances"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| i["status"] == 201)
            .count(),
        2,
        "{loaded}"
    );
    let rlc = "https://schemas.openid.net/secevent/caep/event-type/risk-level-change";
    for (i, user) in users.iter().enumerate() {
        let t = now();
        let claims = json!({"iss": ISS, "aud": AUD, "jti": format!("medium-{i}"), "iat": t as i64,
            "sub_id": {"format": "email", "email": user},
            "events": {rlc: {"principal": "USER", "current_level": "MEDIUM", "event_timestamp": t}}});
        assert_eq!(
            push_set(&http, &instances[i % 3].base, &tx, &claims).await,
            202
        );
    }
    // Every instance's divergences, listed by any of them.
    let divergences = || async {
        http.get(format!(
            "{}/v1/policies/shadow/divergences",
            instances[1].base
        ))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap_or(Value::Null)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while divergences().await["counts"]["total"] != 9 {
        if std::time::Instant::now() > deadline {
            for instance in &instances {
                let own = http
                    .get(format!("{}/v1/policies/shadow/divergences", instance.base))
                    .bearer_auth(ADMIN_TOKEN)
                    .header("x-vigil-forwarded", "1")
                    .send()
                    .await
                    .unwrap()
                    .text()
                    .await
                    .unwrap();
                println!("{}: {own}", instance.base);
            }
            panic!("the cluster's divergences: {}", divergences().await);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let listed = divergences().await;
    assert_eq!(
        listed["divergences"].as_array().unwrap().len(),
        9,
        "{listed}"
    );
    assert!(listed["divergences"]
        .as_array()
        .unwrap()
        .iter()
        .all(|d| d["direction"] == "stricter" && d["shadow"]["status"] == "revoked"));
    // Never enforced: stepped up, as the live set decides.
    for (i, user) in users.iter().enumerate() {
        let base = &instances[owner_of(user)].base;
        let grant = format!("sh{i}");
        wait_for(&instances, 30, "the live step-up", || async {
            grant_status(&http, base, &grant).await.1["status"] == "step_up"
        })
        .await;
    }

    // An AuthZEN evaluation through an instance that does not hold the grant is decided by its
    // owner, on the owner's live state (here: stepped up).
    let holder = owner_of(&users[0]);
    let elsewhere = &instances[(holder + 1) % 3].base;
    let evaluated: Value = http
        .post(format!("{elsewhere}/access/v1/evaluation"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"subject": {"type": "user", "id": users[0]},
                      "action": {"name": "read"}, "resource": {"type": "api", "id": "orders"},
                      "context": {"grant_id": "sh0"}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(evaluated["decision"], false, "{evaluated}");
    assert_eq!(evaluated["context"]["status"], "step_up", "{evaluated}");

    // Replayed through any instance: each replays the partitions it owns from the signals
    // topic, the answers added up — the nine MEDIUM signals each step up under the live set and
    // revoke under the candidate, and every recorded decision is made again by the live set.
    let replay = http
        .post(format!("{}/v1/policies/replay", instances[2].base))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"files": {"default.yaml": candidate}, "since": "1h", "samples": 20}))
        .timeout(Duration::from_secs(120))
        .send()
        .await
        .unwrap();
    assert_eq!(replay.status().as_u16(), 200);
    let replay: Value = replay.json().await.unwrap();
    assert_eq!(
        replay["partitions"],
        json!((0..PARTITIONS).collect::<Vec<_>>()),
        "{replay}"
    );
    assert_eq!(replay["signals"], 9, "{replay}");
    assert_eq!(replay["changed"], 9, "{replay}");
    assert_eq!(replay["added"], 0, "{replay}");
    assert_eq!(replay["removed"], 0, "{replay}");
    let changed: BTreeSet<&str> = replay["samples"]["changed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            assert_eq!(c["live"]["to"], "step_up", "{c}");
            assert_eq!(c["candidate"]["to"], "revoked", "{c}");
            c["grant_id"].as_str().unwrap()
        })
        .collect();
    assert_eq!(changed.len(), 9, "{replay}");
    let missing = &replay["not_reconstructed"];
    assert_eq!(missing["unreproduced"], 0, "{replay}");
    assert_eq!(missing["recorded"], missing["reproduced"], "{replay}");
    assert!(missing["recorded"].as_u64().unwrap() >= 9, "{replay}");
    assert_eq!(missing["grants_gone"], 0, "{replay}");

    // The live feed on any instance: every partition's signals, newest first; its cursor
    // answers only what came since.
    let feed = |query: String| {
        let http = http.clone();
        let base = instances[1].base.clone();
        async move {
            let page: Value = admin_get(&http, &format!("{base}/v1/signals?{query}"))
                .await
                .json()
                .await
                .unwrap();
            page
        }
    };
    let page = feed("limit=50".into()).await;
    let jtis: BTreeSet<&str> = page["signals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["jti"].as_str().unwrap())
        .collect();
    let expected: BTreeSet<String> = (0..9).map(|i| format!("medium-{i}")).collect();
    assert_eq!(
        jtis,
        expected.iter().map(String::as_str).collect(),
        "{page}"
    );
    let cursor = page["cursor"].as_str().unwrap().to_owned();
    let again = feed(format!("cursor={cursor}")).await;
    assert_eq!(again["signals"], json!([]), "{again}");
    let t = now();
    let nobody = json!({"iss": ISS, "aud": AUD, "jti": "feed-next", "iat": t as i64,
        "sub_id": {"format": "email", "email": "nobody@example.com"},
        "events": {rlc: {"principal": "USER", "current_level": "LOW", "event_timestamp": t}}});
    assert_eq!(push_set(&http, &instances[0].base, &tx, &nobody).await, 202);
    let next = feed(format!("cursor={cursor}")).await;
    assert_eq!(
        next["signals"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["jti"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["feed-next"],
        "{next}"
    );

    // Promoted through another instance: live everywhere, every session revoked by the swap.
    let promoted = http
        .post(format!("{}/v1/policies/shadow/promote", instances[2].base))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(promoted.status().as_u16(), 200);
    let promoted: Value = promoted.json().await.unwrap();
    assert_eq!(promoted["status"], "swapped", "{promoted}");
    assert!(
        promoted["instances"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["status"] == 200),
        "{promoted}"
    );
    for (i, user) in users.iter().enumerate() {
        let base = &instances[owner_of(user)].base;
        let grant = format!("sh{i}");
        wait_for(&instances, 30, "the promoted set's revocation", || async {
            grant_status(&http, base, &grant).await.1["status"] == "revoked"
        })
        .await;
    }
    for instance in &instances {
        let gone = http
            .get(format!("{}/v1/policies/shadow", instance.base))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(gone.status().as_u16(), 404);
        assert!(instance.dir.path().join("policies/default.yaml").exists());
    }
}
