//! Vigil's typed configuration.
//!
//! Sources, lowest precedence first: the built-in defaults (an empty file is a complete config), the TOML
//! file named by `--config`, `VIGIL_*` environment variables, then command-line flags. Unknown keys are
//! rejected and every error names the key it is about, so a typo never silently falls back to a default.
//!
//! Environment overrides: `VIGIL_<PATH>` where `<PATH>` is the key path in upper case with `__` between
//! levels and array indexes as numbers, e.g. `VIGIL_LISTEN=0.0.0.0:8080`,
//! `VIGIL_JWKS__MIN_REFETCH_INTERVAL_SECS=30`, `VIGIL_TRANSMITTERS__0__AUTHORIZATION="Bearer …"` (how to keep
//! a push credential out of the file). Values are read as TOML (numbers, booleans, arrays) and fall back
//! to plain strings.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::jose::Alg;
pub use crate::set::Tolerate;

/// Environment variables with the `VIGIL_` prefix that are not config keys.
const NON_CONFIG_ENV: [&str; 4] = [
    "VIGIL_CONFIG",
    "VIGIL_LOG",
    "VIGIL_LOG_FORMAT",
    "VIGIL_TOKEN",
];

/// Why a configuration could not be loaded. `key` is the dotted path of the offending setting.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config is not valid TOML: {0}")]
    Syntax(String),
    #[error("invalid config key `{key}`: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address the HTTP server listens on.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Directory for the embedded store (created if missing).
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    #[serde(default)]
    pub push: PushConfig,
    #[serde(default)]
    pub intake: IntakeConfig,
    #[serde(default)]
    pub jwks: JwksConfig,
    #[serde(default)]
    pub policy: PolicyConfig,
    #[serde(default)]
    pub engine: EngineConfig,
    #[serde(default)]
    pub context: ContextConfig,
    #[serde(default)]
    pub audit: AuditConfig,
    #[serde(default)]
    pub identity: IdentityConfig,
    #[serde(default)]
    pub delivery: DeliveryConfig,
    /// Enforcement points allowed to subscribe to Vigil's SSF streams.
    #[serde(default)]
    pub enforcement_points: Vec<EnforcementPointConfig>,
    /// The transmitters (IdPs, risk systems) Vigil accepts SETs from.
    #[serde(default)]
    pub transmitters: Vec<TransmitterConfig>,
    /// Risk signals from Kafka topics (off unless `brokers` is set).
    #[serde(default)]
    pub kafka: KafkaConfig,
    /// Cluster mode: several instances on one Kafka cluster behaving as one (off unless `brokers`
    /// is set).
    #[serde(default)]
    pub cluster: ClusterConfig,
    /// Callers of Vigil's own API (`/v1/*`, `/metrics`, `/readyz`), each with a bearer token and
    /// roles. With none, Vigil generates one all-roles token in `<data_dir>/admin.token` (0600).
    #[serde(default)]
    pub clients: Vec<ApiClientConfig>,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub tls: TlsConfig,
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub outbound: OutboundConfig,
    #[serde(default)]
    pub events: EventsConfig,
    #[serde(default)]
    pub authzen: AuthzenConfig,
}

/// `[authzen]`: the AuthZEN access evaluation door.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthzenConfig {
    /// The share of permitted evaluations recorded in the audit log (0 to 1; denials always are).
    #[serde(default = "default_audit_sample_rate")]
    pub audit_sample_rate: f64,
}

impl Default for AuthzenConfig {
    fn default() -> AuthzenConfig {
        AuthzenConfig {
            audit_sample_rate: default_audit_sample_rate(),
        }
    }
}

fn default_audit_sample_rate() -> f64 {
    1.0
}

/// The listener's connection budgets: every caller shares the server, so none may hold it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Connections served at once; beyond it, `health_reserve_connections` more are served only
    /// `/healthz` and `/readyz`, and any further one is closed at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Connections one peer address may hold (closed at once beyond), so one host cannot take
    /// the whole pool.
    #[serde(default = "default_max_per_peer")]
    pub max_connections_per_peer: usize,
    #[serde(default = "default_health_reserve")]
    pub health_reserve_connections: usize,
    /// A connection must send a complete request head within this long of being accepted or of
    /// its previous response: the slow-header and the idle keep-alive timeout in one.
    #[serde(default = "default_head_timeout")]
    pub request_head_timeout_ms: u64,
    /// A request body must arrive whole within this long (408 otherwise).
    #[serde(default = "default_body_timeout")]
    pub body_read_timeout_ms: u64,
    #[serde(default = "default_handshake_timeout")]
    pub tls_handshake_timeout_ms: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_connections: default_max_connections(),
            max_connections_per_peer: default_max_per_peer(),
            health_reserve_connections: default_health_reserve(),
            request_head_timeout_ms: default_head_timeout(),
            body_read_timeout_ms: default_body_timeout(),
            tls_handshake_timeout_ms: default_handshake_timeout(),
        }
    }
}

fn default_max_connections() -> usize {
    // Under a typical 1 024 file-descriptor limit, with room for the stores, outbound calls and
    // the health reserve.
    768
}
fn default_max_per_peer() -> usize {
    // A gateway fleet behind one NAT address may hold many; one host still cannot hold them all.
    256
}
fn default_health_reserve() -> usize {
    16
}
fn default_head_timeout() -> u64 {
    30_000
}
fn default_body_timeout() -> u64 {
    30_000
}
fn default_handshake_timeout() -> u64 {
    10_000
}

/// Calls to URLs that other parties chose (enforcement points' push endpoints, URLs in a
/// transmitter's metadata). See `outbound.rs`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboundConfig {
    /// Allow loopback destinations (and plain http to them). For local development and tests
    /// only: in production it would let a party make Vigil call its own host's services.
    #[serde(default)]
    pub allow_loopback: bool,
}

/// Sanity window for the times events claim.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsConfig {
    /// How far ahead of Vigil's clock an event time (`toe`, `event_timestamp`, a risk score's
    /// time) may be: clock skew. A later time is taken as the time of receipt (logged, counted
    /// in `vigil_event_times_clamped_total`), so a signal from the future never pins a fact; a
    /// SET whose `iat` is later is refused (`invalid_request`).
    #[serde(default = "default_future_skew")]
    pub max_future_skew_secs: u64,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            max_future_skew_secs: default_future_skew(),
        }
    }
}

fn default_future_skew() -> u64 {
    300
}

/// HTTPS on the listener (rustls), optional client certificates, and extra CAs for outbound calls.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain of the listener (with `key`: HTTPS only).
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// PEM private key of the listener.
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// PEM CA certificates; when set, every client must present a certificate they signed (mTLS).
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// PEM CA certificates trusted by outbound calls (JWKS, SSF management, push), besides the
    /// public web roots.
    #[serde(default)]
    pub ca_bundle: Option<PathBuf>,
}

/// Abuse limits. Rates are per authenticated caller (by configured name); beyond them the answer
/// is `429` with `Retry-After`. Open long polls and SSE responses beyond the cap get `503`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// SETs per second each transmitter may push.
    #[serde(default = "default_rate")]
    pub transmitter_sets_per_sec: f64,
    /// Requests per second each API client may make.
    #[serde(default = "default_rate")]
    pub client_requests_per_sec: f64,
    /// How many requests above the rate a caller may send at once (both limits).
    #[serde(default = "default_burst")]
    pub burst: f64,
    /// Pushes one transmitter may have in flight at once (429 beyond): its share of intake.
    #[serde(default = "default_transmitter_inflight")]
    pub transmitter_max_inflight: usize,
    /// Long polls and SSE responses open at once, across all enforcement points.
    #[serde(default = "default_streaming")]
    pub max_streaming_connections: usize,
    /// Long polls and SSE responses one enforcement point may hold open (503 beyond).
    #[serde(default = "default_streaming_per_ep")]
    pub max_streaming_connections_per_enforcement_point: usize,
    /// Streams one enforcement point may create (429 beyond): every decision is signed once per
    /// stream it goes to.
    #[serde(default = "default_streams_per_ep")]
    pub max_streams_per_enforcement_point: usize,
    /// Subjects one stream may list (`/ssf/subjects:add`, 429 beyond).
    #[serde(default = "default_subjects_per_stream")]
    pub max_subjects_per_stream: usize,
    /// Push deliveries in flight at once to one enforcement point (its streams share them).
    #[serde(default = "default_push_per_ep")]
    pub push_concurrency_per_enforcement_point: usize,
    /// Requests per second each enforcement point may make to `/ssf/*` (429 beyond).
    #[serde(default = "default_ep_rate")]
    pub enforcement_point_requests_per_sec: f64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            transmitter_sets_per_sec: default_rate(),
            client_requests_per_sec: default_rate(),
            burst: default_burst(),
            transmitter_max_inflight: default_transmitter_inflight(),
            max_streaming_connections: default_streaming(),
            max_streaming_connections_per_enforcement_point: default_streaming_per_ep(),
            max_streams_per_enforcement_point: default_streams_per_ep(),
            max_subjects_per_stream: default_subjects_per_stream(),
            push_concurrency_per_enforcement_point: default_push_per_ep(),
            enforcement_point_requests_per_sec: default_ep_rate(),
        }
    }
}

fn default_rate() -> f64 {
    // Per caller: a budget one party cannot exceed, well above one IdP's steady traffic; raise it
    // for a transmitter that replays a backlog or a gateway fleet sharing one client.
    2_000.0
}
fn default_burst() -> f64 {
    10_000.0
}
fn default_transmitter_inflight() -> usize {
    256
}
fn default_streaming() -> usize {
    1024
}
fn default_streaming_per_ep() -> usize {
    16
}
fn default_streams_per_ep() -> usize {
    16
}
fn default_subjects_per_stream() -> usize {
    10_000
}
fn default_push_per_ep() -> usize {
    4
}
fn default_ep_rate() -> f64 {
    1000.0
}

/// What an API client may do (see `auth.rs`'s module table): configuration vocabulary, so it lives
/// with the configuration that grants it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Grants,
    Check,
    Operator,
    Metrics,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Grants => "grants",
            Role::Check => "check",
            Role::Operator => "operator",
            Role::Metrics => "metrics",
        }
    }
}

/// A caller of Vigil's API: a gateway registering grants, a `check` client, an operator, a metrics
/// scraper. Transmitters and enforcement points have their own credentials (their sections).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiClientConfig {
    /// Who it is, for logs and the audit of denials.
    pub name: String,
    /// Its bearer token (at least 16 characters, unique across clients and enforcement points).
    pub token: String,
    /// What it may do: `grants`, `check`, `operator`, `metrics`.
    pub roles: Vec<Role>,
    /// Most grants it may hold, in place of `engine.max_grants_per_registrant` (a gateway that
    /// holds most sessions by design).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_grants: Option<usize>,
}

/// The Kafka risk-signal source. With no `brokers`, Vigil runs without it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers (`host:port,host:port`). Empty: no Kafka source.
    #[serde(default)]
    pub brokers: String,
    /// Consumer group: Vigil instances sharing it split the topics' partitions.
    #[serde(default = "default_kafka_group")]
    pub group_id: String,
    /// Topics carrying risk signals. A topic with a `mappings` entry is read through it; the others
    /// carry Vigil's native JSON format (see `risk_feed`).
    #[serde(default = "default_kafka_topics")]
    pub topics: Vec<String>,
    /// Where malformed or unmappable messages go, with the error in the `vigil-error` header.
    #[serde(default = "default_kafka_dlq")]
    pub dead_letter_topic: String,
    /// Most messages recorded (one store commit) and committed (one offset commit) per batch.
    #[serde(default = "default_kafka_batch")]
    pub max_batch: usize,
    /// How long a batch waits to fill before it is recorded anyway.
    #[serde(default = "default_kafka_wait")]
    pub batch_wait_ms: u64,
    /// Most signals read and waiting for the engine (in its shards' inboxes): at the bound the
    /// consumer stops fetching until the engine catches up, so a backlog stays in the topic,
    /// not in memory (`vigil_engine_queued_signals`).
    #[serde(default = "default_kafka_queued")]
    pub max_queued_signals: usize,
    /// Most dead letters kept in the store when the dead-letter topic refuses them, shared
    /// fairly between the feed topics: past it, the topics holding the most lose their oldest.
    #[serde(default = "default_kafka_stored_dead_letters")]
    pub max_stored_dead_letters: usize,
    /// Extra librdkafka settings passed through unchanged: security (`security.protocol`,
    /// `sasl.mechanism`, `sasl.username`, `sasl.password`, `ssl.ca.location`, …), timeouts,
    /// `auto.offset.reset`. `_` may stand for `.` in names (for environment overrides:
    /// `VIGIL_KAFKA__PROPERTIES__SASL_PASSWORD`). Offset handling is Vigil's and cannot be changed.
    #[serde(default)]
    pub properties: std::collections::BTreeMap<String, String>,
    /// Foreign message formats, one per topic.
    #[serde(default)]
    pub mappings: Vec<crate::risk_feed::Mapping>,
}

/// Cluster mode (`[cluster]`): Vigil instances sharing a Kafka cluster and a `name` split the
/// principals between them by partition of Vigil's own topics (see `cluster`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Bootstrap servers (`host:port,host:port`). Empty: single node (the default).
    #[serde(default)]
    pub brokers: String,
    /// The cluster's name: the prefix of its topics (`<name>.signals`, …) and its consumer group.
    #[serde(default = "default_cluster_name")]
    pub name: String,
    /// Partitions of the signals topic when Vigil creates it: the unit of ownership, so the most
    /// instances that can share the work. An existing topic keeps its count.
    #[serde(default = "default_cluster_partitions")]
    pub partitions: i32,
    /// Replicas of each partition when Vigil creates its topics.
    #[serde(default = "default_cluster_replication")]
    pub replication_factor: i32,
    /// How long a push waits for the brokers to acknowledge its SET (`acks=all`) before it is
    /// answered 503 with `Retry-After`.
    #[serde(default = "default_cluster_publish_timeout")]
    pub publish_timeout_ms: u64,
    /// This instance's name in the cluster. Empty: one generated at first start and kept in
    /// `<data_dir>/instance.id`.
    #[serde(default)]
    pub instance_id: String,
    /// Where the other instances reach this one's API (grant calls are forwarded to a
    /// principal's owner). Empty: `http://` + `listen` (`https://` with `[tls]`).
    #[serde(default)]
    pub advertised_url: String,
    /// Keep a warm copy of every partition's state (the whole state topic, in memory), so a
    /// partition this instance is assigned is restored from the copy and the records after it
    /// rather than from the partition's start. Costs the cluster's whole state in memory here.
    #[serde(default)]
    pub standby: bool,
    /// Extra librdkafka settings for the cluster's clients (security, timeouts), as in `[kafka]`.
    #[serde(default)]
    pub properties: std::collections::BTreeMap<String, String>,
}

fn default_cluster_name() -> String {
    "vigil".into()
}
fn default_cluster_partitions() -> i32 {
    12
}
fn default_cluster_replication() -> i32 {
    3
}
fn default_cluster_publish_timeout() -> u64 {
    5_000
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            brokers: String::new(),
            name: default_cluster_name(),
            partitions: default_cluster_partitions(),
            replication_factor: default_cluster_replication(),
            publish_timeout_ms: default_cluster_publish_timeout(),
            instance_id: String::new(),
            advertised_url: String::new(),
            standby: false,
            properties: Default::default(),
        }
    }
}

impl ClusterConfig {
    /// Whether cluster mode is on.
    pub fn enabled(&self) -> bool {
        !self.brokers.trim().is_empty()
    }

    /// The pass-through properties with `_` read as `.`.
    pub fn librdkafka_properties(&self) -> impl Iterator<Item = (String, &str)> {
        dotted(&self.properties)
    }

    fn validate(&self, kafka: &KafkaConfig) -> Result<(), ConfigError> {
        if !self.enabled() {
            return Ok(());
        }
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 200
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !name_ok {
            return Err(invalid(
                "cluster.name",
                "must be 1-200 characters of a-z, A-Z, 0-9, '.', '_' or '-' (it names Kafka topics)",
            ));
        }
        if !(1..=10_000).contains(&self.partitions) {
            return Err(invalid("cluster.partitions", "must be between 1 and 10000"));
        }
        if !(1..=16).contains(&self.replication_factor) {
            return Err(invalid(
                "cluster.replication_factor",
                "must be between 1 and 16",
            ));
        }
        if !(100..=120_000).contains(&self.publish_timeout_ms) {
            return Err(invalid(
                "cluster.publish_timeout_ms",
                "must be between 100 and 120000",
            ));
        }
        if self.instance_id.len() > 200 || self.instance_id.chars().any(|c| c.is_control()) {
            return Err(invalid(
                "cluster.instance_id",
                "must be at most 200 printable characters",
            ));
        }
        if !self.advertised_url.is_empty() {
            let ok = url::Url::parse(&self.advertised_url)
                .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
            if !ok {
                return Err(invalid(
                    "cluster.advertised_url",
                    "must be an http(s) URL with a host",
                ));
            }
        }
        for (name, _) in self.librdkafka_properties() {
            if KAFKA_RESERVED.contains(&name.as_str()) || name == "acks" {
                return Err(invalid(
                    format!("cluster.properties.{name}"),
                    "is set by Vigil (ownership and durability depend on it)",
                ));
            }
        }
        if kafka.enabled() && kafka.group_id == self.name {
            // The feeds' group splits the feed topics between instances; the cluster's group splits
            // the signals topic. One group for both would mix two assignments.
            return Err(invalid(
                "kafka.group_id",
                "must differ from cluster.name (the cluster's own consumer group)",
            ));
        }
        Ok(())
    }
}

/// librdkafka properties as configured, `_` read as `.` (so environment overrides can name them).
fn dotted(
    properties: &std::collections::BTreeMap<String, String>,
) -> impl Iterator<Item = (String, &str)> {
    properties
        .iter()
        .map(|(k, v)| (k.replace('_', "."), v.as_str()))
}

/// librdkafka settings Vigil owns: its delivery guarantee depends on them.
const KAFKA_RESERVED: [&str; 5] = [
    "bootstrap.servers",
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "enable.partition.eof",
];

impl KafkaConfig {
    /// Whether the Kafka source runs.
    pub fn enabled(&self) -> bool {
        !self.brokers.trim().is_empty()
    }

    /// The pass-through properties with `_` read as `.`.
    pub fn librdkafka_properties(&self) -> impl Iterator<Item = (String, &str)> {
        dotted(&self.properties)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if !self.enabled() {
            return Ok(());
        }
        if self.group_id.is_empty() {
            return Err(invalid("kafka.group_id", "must not be empty"));
        }
        if self.topics.is_empty() || self.topics.iter().any(String::is_empty) {
            return Err(invalid(
                "kafka.topics",
                "needs at least one non-empty topic",
            ));
        }
        if self.dead_letter_topic.is_empty() || self.topics.contains(&self.dead_letter_topic) {
            return Err(invalid(
                "kafka.dead_letter_topic",
                "must be set and must not be one of `topics`",
            ));
        }
        if self.max_batch == 0 {
            return Err(invalid("kafka.max_batch", "must be greater than 0"));
        }
        if self.max_queued_signals == 0 {
            return Err(invalid(
                "kafka.max_queued_signals",
                "must be greater than 0",
            ));
        }
        if self.max_stored_dead_letters == 0 {
            return Err(invalid(
                "kafka.max_stored_dead_letters",
                "must be greater than 0",
            ));
        }
        for (name, _) in self.librdkafka_properties() {
            if KAFKA_RESERVED.contains(&name.as_str()) {
                return Err(invalid(
                    format!("kafka.properties.{name}"),
                    "is set by Vigil (use `brokers`/`group_id`; offsets are committed only after a durable record)",
                ));
            }
        }
        let mut seen = HashSet::new();
        for (i, m) in self.mappings.iter().enumerate() {
            let key = |field: &str| format!("kafka.mappings[{i}].{field}");
            if !self.topics.contains(&m.topic) {
                return Err(invalid(key("topic"), "must be one of `kafka.topics`"));
            }
            if !seen.insert(m.topic.as_str()) {
                return Err(invalid(key("topic"), "has two mappings"));
            }
            m.check().map_err(|(field, why)| invalid(key(field), why))?;
        }
        Ok(())
    }
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: String::new(),
            group_id: default_kafka_group(),
            topics: default_kafka_topics(),
            dead_letter_topic: default_kafka_dlq(),
            max_batch: default_kafka_batch(),
            batch_wait_ms: default_kafka_wait(),
            max_queued_signals: default_kafka_queued(),
            max_stored_dead_letters: default_kafka_stored_dead_letters(),
            properties: Default::default(),
            mappings: Vec::new(),
        }
    }
}

fn default_kafka_stored_dead_letters() -> usize {
    10_000
}
fn default_kafka_group() -> String {
    "vigil".into()
}
fn default_kafka_topics() -> Vec<String> {
    vec!["vigil.risk".into()]
}
fn default_kafka_dlq() -> String {
    "vigil.risk.dead-letter".into()
}
fn default_kafka_batch() -> usize {
    2000
}
/// Several batches' worth, so the shards always have the next batch queued while one commits.
fn default_kafka_queued() -> usize {
    65_536
}
fn default_kafka_wait() -> u64 {
    10
}

/// Policy-as-code settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Directory of rule files (`*.yaml`) and their tests (`*.test.yaml`). When it does not exist,
    /// the default policy set built into the binary is used.
    #[serde(default = "default_policy_dir")]
    pub dir: PathBuf,
    /// How often the directory is checked for changes (0 disables watching; SIGHUP and
    /// `POST /v1/policies/reload` still reload).
    #[serde(default = "default_watch")]
    pub watch_interval_secs: u64,
    /// Where policy tests find `example:` events when their file names no `examples:` directory
    /// (one it names is relative to the test file). Unset: `../tests/fixtures/spec-examples`
    /// beside the policy directory (this repository's layout).
    #[serde(default)]
    pub examples_dir: Option<PathBuf>,
    /// A reload (file watch, SIGHUP, HTTP) that would change the status of more than this many
    /// grants is refused with its impact, unless forced (`POST /v1/policies/reload?force=true`).
    /// Unset: no limit.
    #[serde(default)]
    pub require_preview: Option<u64>,
    /// Divergences of a shadow set held for listing (`GET /v1/policies/shadow/divergences`):
    /// the newest this many. Every one is still counted in `vigil_shadow_divergences_total`.
    #[serde(default = "default_shadow_divergences")]
    pub shadow_divergences_max: usize,
}

fn default_shadow_divergences() -> usize {
    10_000
}

/// Evaluation engine settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    /// Shard threads; 0 = one per core.
    #[serde(default)]
    pub shards: usize,
    /// Lifetime of a session grant created from CAEP session-established.
    #[serde(default = "default_session_ttl")]
    pub session_ttl_secs: u64,
    /// Signals and API requests in flight across all shards before callers wait (backpressure).
    #[serde(default = "default_inflight")]
    pub max_inflight: usize,
    /// Most grants held (revoked ones count until they expire): a registration of a new grant
    /// beyond it is refused (503 `grant_capacity`), as is a session grant from a
    /// session-established event (`vigil_grants_refused_total`). Grants live in memory, about
    /// 1 KiB each: this is the engine's memory bound against clients registering without end.
    #[serde(default = "default_max_grants")]
    pub max_grants: usize,
    /// Most grants one party holds: an API client (grants it registered) or a transmitter or
    /// risk-feed topic (session grants its session-established events made). A new grant beyond is
    /// refused (429 `grant_quota`), so one party registering without end fills its own share, not
    /// the bound every party shares. Default: half of `max_grants`. Counted per instance.
    #[serde(default)]
    pub max_grants_per_registrant: Option<usize>,
    /// Signals (and API requests) a shard handles per commit: a Kafka batch reaches a shard in
    /// parts of a quarter of this, and while other parties are active (a signal pushed, a grant
    /// registered within the last second) a shard takes a backlog only a quarter batch at a
    /// time: smaller commits, shorter waits for their revocations in the state store's writer.
    #[serde(default = "default_batch")]
    pub max_batch: usize,
    /// How often expired grants are swept.
    #[serde(default = "default_sweep")]
    pub sweep_interval_ms: u64,
    /// How long changed contexts may wait for their write (every source replays its signals until
    /// then: Kafka from the committed offset, intake its pending set): longer writes a busy subject
    /// less often, but holds Kafka offsets and intake's pending set (and the replay after a crash)
    /// for longer. Decisions and grant changes are never deferred by it.
    #[serde(default = "default_checkpoint")]
    pub checkpoint_interval_ms: u64,
    /// Grant changes and the contexts decisions were made on are made durable as one row per
    /// batch appended to the state store's journal, then written at their places by a fold
    /// round per shard (ARCHITECTURE.md). A round starts once this many keys wait, or after
    /// `journal_fold_interval_ms`. More keys per round share more of the store's pages, and
    /// make the journal (disk, and the fold at the next start) longer. Beyond twice as many
    /// waiting behind a round in flight, a shard holds back the sources' backlogs.
    #[serde(default = "default_journal_fold_rows")]
    pub journal_fold_rows: usize,
    /// The longest journaled keys wait for a fold round.
    #[serde(default = "default_journal_fold_interval")]
    pub journal_fold_interval_ms: u64,
    /// Bytes of journaled rows (across the shards) kept in memory for the fold round that writes
    /// them at their places, so it need not encode them again; a row beyond this is encoded
    /// again from the present state. 0 keeps none.
    #[serde(default = "default_journal_fold_cache_bytes")]
    pub journal_fold_cache_bytes: usize,
    /// How long the context of a subject no grant refers to is kept after the newest fact in it
    /// (by event time); then it is forgotten, in memory and on disk. A subject with a grant keeps
    /// its context for as long as it has one. Keep it longer than the longest time between a
    /// signal and the registration of a grant it must still govern.
    #[serde(default = "default_context_retention")]
    pub context_retention_secs: u64,
    /// How long the context of a subject whose account the IdP disabled or purged (RISC) is kept
    /// after its newest fact, if longer than `context_retention_secs`: forgetting a disabled
    /// account sooner would let a grant registered for it later be evaluated as if it were not.
    /// An `account-enabled` ends it.
    #[serde(default = "default_disabled_account_retention")]
    pub disabled_account_retention_secs: u64,
}

/// Context settings.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContextConfig {
    /// Per-kind TTL in seconds (risk, device_compliance, assurance, claims, attributes): a fact older
    /// than its TTL (by event time) no longer counts. Absent = never decays.
    #[serde(default)]
    pub decay: crate::context::Decay,
}

/// Vigil's own identity as an SSF transmitter toward enforcement points.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// Vigil's issuer URL (the `iss` of the SETs it emits, and where its SSF metadata is found).
    /// Default: `http://<listen>`.
    #[serde(default)]
    pub issuer: Option<String>,
    /// Signing algorithm of SETs by default: `RS256` (CAEP interoperability profile), `ES256` or
    /// `EdDSA` (Ed25519).
    #[serde(default = "default_identity_alg")]
    pub alg: Alg,
    /// Further algorithms Vigil keeps a key for, for the enforcement points that accept them
    /// (`enforcement_points[].signing_alg`): an ES256 or Ed25519 signature costs a fraction of an
    /// RSA one. Each key is published in `/jwks.json`, the list in the SSF metadata.
    #[serde(default)]
    pub offered_algs: Vec<Alg>,
    /// How long a rotated-out key stays in the JWKS (its SETs may still be in flight).
    #[serde(default = "default_key_retention")]
    pub key_retention_secs: u64,
    /// How long an RFC 8936 long poll waits for SETs before answering with none.
    #[serde(default = "default_long_poll_secs")]
    pub poll_timeout_secs: u64,
}

/// RFC 8935 push delivery to enforcement points.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryConfig {
    /// Timeout of one push attempt.
    #[serde(default = "default_push_timeout")]
    pub push_timeout_ms: u64,
    /// First retry delay; doubles per failure (with jitter) up to `max_backoff_secs`.
    #[serde(default = "default_initial_backoff")]
    pub initial_backoff_ms: u64,
    #[serde(default = "default_max_backoff")]
    pub max_backoff_secs: u64,
    /// A SET still undelivered this long after it was queued moves to the dead letters — by
    /// push, poll or SSE, whatever the stream's status.
    #[serde(default = "default_dead_letter_after")]
    pub dead_letter_after_secs: u64,
    /// The most SETs one stream's outbox holds; the oldest beyond it move to the dead letters.
    #[serde(default = "default_max_outbox")]
    pub max_outbox_per_stream: usize,
    /// A poll or SSE stream with SETs waiting that nobody read for this long is paused (with a
    /// stream-updated SET telling its receiver when it comes back).
    #[serde(default = "default_unread_pause")]
    pub unread_pause_after_secs: u64,
    /// How long a dead letter is kept for operators to inspect or replay.
    #[serde(default = "default_dead_letter_retention")]
    pub dead_letter_retention_secs: u64,
    /// The most dead letters kept; the oldest beyond it are dropped.
    #[serde(default = "default_max_dead_letters")]
    pub max_dead_letters: usize,
    /// How often these bounds are applied (seconds).
    #[serde(default = "default_outbox_sweep")]
    pub outbox_sweep_secs: u64,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            push_timeout_ms: default_push_timeout(),
            initial_backoff_ms: default_initial_backoff(),
            max_backoff_secs: default_max_backoff(),
            dead_letter_after_secs: default_dead_letter_after(),
            max_outbox_per_stream: default_max_outbox(),
            unread_pause_after_secs: default_unread_pause(),
            dead_letter_retention_secs: default_dead_letter_retention(),
            max_dead_letters: default_max_dead_letters(),
            outbox_sweep_secs: default_outbox_sweep(),
        }
    }
}

fn default_push_timeout() -> u64 {
    5000
}
fn default_initial_backoff() -> u64 {
    500
}
fn default_max_backoff() -> u64 {
    300
}
fn default_dead_letter_after() -> u64 {
    24 * 3600
}
fn default_max_outbox() -> usize {
    100_000
}
fn default_unread_pause() -> u64 {
    24 * 3600
}
fn default_dead_letter_retention() -> u64 {
    7 * 86_400
}
fn default_max_dead_letters() -> usize {
    100_000
}
fn default_audit_max_age() -> u64 {
    90 * 86_400
}
fn default_outbox_sweep() -> u64 {
    30
}

/// An enforcement point (API gateway, sidecar, agent runtime) that manages streams with Vigil.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnforcementPointConfig {
    pub name: String,
    /// Its bearer token for the stream management and poll endpoints.
    pub token: String,
    /// The `aud` of the SETs its streams get (default: its name).
    #[serde(default)]
    pub audience: Option<String>,
    /// The algorithm its SETs are signed with, when it accepts one other than `identity.alg`:
    /// one of `identity.offered_algs`.
    #[serde(default)]
    pub signing_alg: Option<Alg>,
}

impl IdentityConfig {
    /// Every algorithm Vigil signs with: `alg` first, then `offered_algs`.
    pub fn algorithms(&self) -> Vec<Alg> {
        let mut algs = vec![self.alg];
        for alg in &self.offered_algs {
            if !algs.contains(alg) {
                algs.push(*alg);
            }
        }
        algs
    }
}

impl Default for IdentityConfig {
    fn default() -> Self {
        IdentityConfig {
            issuer: None,
            alg: default_identity_alg(),
            offered_algs: Vec::new(),
            key_retention_secs: default_key_retention(),
            poll_timeout_secs: default_poll_timeout(),
        }
    }
}

fn default_identity_alg() -> Alg {
    Alg::RS256
}
fn default_poll_timeout() -> u64 {
    25
}
fn default_key_retention() -> u64 {
    7 * 24 * 3600
}

/// Audit log settings (`<data_dir>/audit/`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    #[serde(default = "default_audit_bytes")]
    pub max_file_bytes: u64,
    #[serde(default = "default_audit_keep")]
    pub keep_files: usize,
    /// Audit files last written longer ago than this are dropped (seconds; 90 days): rotated ones,
    /// and the one being written once it is that old (a log nobody appends to), checked every
    /// minute.
    #[serde(default = "default_audit_max_age")]
    pub max_age_secs: u64,
    /// Each API client's access-request (AuthZEN) decisions are a log of their own
    /// (`<data_dir>/audit/access/<client>/`), rotated at this size…
    #[serde(default = "default_access_audit_bytes")]
    pub access_max_file_bytes: u64,
    /// …keeping this many files, so one client's evaluations rotate out only its own records.
    #[serde(default = "default_access_audit_keep")]
    pub access_keep_files: usize,
}

/// RFC 8935 push endpoint settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushConfig {
    /// Bodies larger than this are refused before parsing.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
}

/// Durable intake settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntakeConfig {
    /// Most signals recorded and waiting for the next pipeline stage (the engine) in memory;
    /// while as many wait, intake's writer holds further appends.
    #[serde(default = "default_channel")]
    pub channel_capacity: usize,
    /// Most SETs written in one storage transaction (group commit).
    #[serde(default = "default_batch")]
    pub max_batch: usize,
    /// How long a processed SET's record is kept (seconds; 7 days by default). The window is also
    /// the `(iss, jti)` dedupe window: a SET redelivered after it is recorded again. Records are
    /// dropped a whole segment at a time, once every record in it is processed and older.
    #[serde(default = "default_intake_retention")]
    pub retention_secs: u64,
    /// Size of one segment file of the intake log; the unit in which records are dropped.
    #[serde(default = "default_intake_segment")]
    pub segment_bytes: u64,
    /// The most the intake log may hold on disk. Past it, processed segments are dropped before
    /// their retention window ends; when none is processed, new SETs are refused (503) until the
    /// engine catches up — what was acknowledged is never dropped.
    #[serde(default = "default_intake_max_bytes")]
    pub max_bytes: u64,
}

/// JWKS caching settings, shared by all transmitters.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwksConfig {
    /// Background refresh period once keys are loaded.
    #[serde(default = "default_refresh")]
    pub refresh_interval_secs: u64,
    /// Least time between two refetches for the same unknown `kid`.
    #[serde(default = "default_min_refetch")]
    pub min_refetch_interval_secs: u64,
    /// Least time since any fetch (the start-up load included) before an unknown `kid` gets its
    /// refetch: a key published just after Vigil loaded the JWKS is found seconds later.
    #[serde(default = "default_refetch_floor")]
    pub refetch_floor_secs: u64,
    /// Retry period while a transmitter's keys have never loaded.
    #[serde(default = "default_retry")]
    pub retry_interval_secs: u64,
    /// Timeout of one metadata or JWKS request.
    #[serde(default = "default_fetch_timeout")]
    pub fetch_timeout_ms: u64,
}

/// One trusted transmitter and its push stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransmitterConfig {
    /// A short name for logs and metrics.
    pub name: String,
    /// The exact `iss` of its SETs (and of its SSF metadata).
    pub issuer: String,
    /// Audience values Vigil accepts; a SET must name at least one.
    pub audiences: Vec<String>,
    /// The push stream path segment: SETs arrive at `POST /ssf/push/{stream}`.
    pub stream: String,
    /// The exact `Authorization` header value the transmitter must send (the SSF `authorization_header`).
    /// Empty for a managed stream: Vigil then generates one and gives it to the transmitter.
    #[serde(default)]
    pub authorization: String,
    /// JWS algorithms accepted from this transmitter. Only asymmetric algorithms can be named.
    #[serde(default = "default_algs")]
    pub algorithms: Vec<Alg>,
    /// The transmitter's JWKS URL. Exactly one of `jwks_uri` and `discovery` must be set.
    #[serde(default)]
    pub jwks_uri: Option<String>,
    /// Find `jwks_uri` in the issuer's `/.well-known/ssf-configuration` (SSF §7).
    #[serde(default)]
    pub discovery: bool,
    /// Complex-subject members this transmitter marks critical (SSF §3.6), in addition to any its
    /// metadata lists. An event whose critical member Vigil cannot process is discarded.
    #[serde(default)]
    pub critical_subject_members: Vec<String>,
    /// Accept legacy subject dialects: in-event `subject`, Google's `subject_type`/`iss-sub`, `phone`.
    #[serde(default = "yes")]
    pub legacy_subjects: bool,
    /// Other deviations from the specs this transmitter's SETs may carry (each counted in
    /// `vigil_ssf_tolerated_deviations_total`).
    #[serde(default)]
    pub tolerate: Tolerate,
    /// This identity provider may ask for OAuth Global Token Revocation
    /// (`POST /oauth/global-token-revocation`, draft-parecki-oauth-global-token-revocation),
    /// authenticated with its `authorization`: every grant of the user it names is revoked.
    #[serde(default)]
    pub global_token_revocation: bool,
    /// Vigil manages its stream at this transmitter (SSF §8): discovers it, creates or adopts the
    /// stream, keeps it configured and verified, and polls it when delivery is poll. Needs
    /// `discovery = true`. Without it the stream is set up out of band and only pushes arrive.
    #[serde(default)]
    pub manage: Option<StreamManagement>,
    /// Most session grants its session-established events may have made and held, in place of
    /// `engine.max_grants_per_registrant` (an identity provider announcing every session).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_grants: Option<usize>,
}

/// How Vigil's stream at a transmitter is delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryMode {
    /// RFC 8935: the transmitter pushes to `<receiver_url>/ssf/push/<stream>`.
    Push,
    /// RFC 8936: Vigil long-polls the endpoint the transmitter assigns.
    Poll,
}

/// `[transmitters.manage.oauth]`: how Vigil gets access tokens for a transmitter's management
/// API and poll endpoint (RFC 6749 §4.4 client credentials). Tokens are kept until shortly before
/// they expire and fetched again after a 401.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuthClient {
    pub client_id: String,
    /// `client_secret_basic` (default), `client_secret_post` or `private_key_jwt`.
    #[serde(default)]
    pub auth_method: ClientAuthMethod,
    /// The secret of the `client_secret_*` methods (`VIGIL_TRANSMITTERS__0__MANAGE__OAUTH__CLIENT_SECRET`).
    #[serde(default)]
    pub client_secret: Option<String>,
    /// `private_key_jwt`: the PEM file of the private key the client assertion is signed with.
    #[serde(default)]
    pub private_key_path: Option<std::path::PathBuf>,
    /// `private_key_jwt`: the key's algorithm (RS256 by default; PS256, ES256, …).
    #[serde(default = "default_assertion_alg")]
    pub private_key_alg: Alg,
    /// `private_key_jwt`: the `kid` of the key, as registered at the authorization server.
    #[serde(default)]
    pub key_id: Option<String>,
    /// The token endpoint. Default: the one the authorization server's RFC 8414 metadata names.
    #[serde(default)]
    pub token_endpoint: Option<String>,
    /// The authorization server whose metadata is read (`/.well-known/oauth-authorization-server`)
    /// when no `token_endpoint` is set. Default: the transmitter's issuer.
    #[serde(default)]
    pub authorization_server: Option<String>,
    /// The `scope` asked for, if any.
    #[serde(default)]
    pub scope: Option<String>,
}

fn default_assertion_alg() -> Alg {
    Alg::RS256
}

/// How the client authenticates at the token endpoint (RFC 7591 §2 names).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuthMethod {
    /// HTTP Basic with the client id and secret (RFC 6749 §2.3.1).
    #[default]
    ClientSecretBasic,
    /// The client id and secret in the form body.
    ClientSecretPost,
    /// A JWT signed with the client's private key (RFC 7523 §2.2).
    PrivateKeyJwt,
}

/// `[transmitters.manage]`: the stream Vigil keeps at a transmitter.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamManagement {
    pub delivery: DeliveryMode,
    /// The exact `Authorization` header value Vigil presents to the management API and poll
    /// endpoint (e.g. `Bearer …` from `VIGIL_TRANSMITTERS__0__MANAGE__CREDENTIAL`). Exactly one
    /// of `credential` and `oauth` is set.
    #[serde(default)]
    pub credential: String,
    /// OAuth 2.0 client credentials (RFC 6749 §4.4) instead of a fixed `credential`: the CAEP
    /// interoperability profile's way, with tokens that expire.
    #[serde(default)]
    pub oauth: Option<OAuthClient>,
    /// Event types to request (URIs). Empty: every CAEP and RISC event Vigil understands.
    #[serde(default)]
    pub events_requested: Vec<String>,
    /// Vigil's base URL as the transmitter reaches it (push): the stream's `endpoint_url` is
    /// `<receiver_url>/ssf/push/<stream>`. Default: `http://<listen>`.
    #[serde(default)]
    pub receiver_url: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    /// Seconds between verification requests (raised to the stream's `min_verification_interval`).
    #[serde(default = "default_verify_interval")]
    pub verify_interval_secs: u64,
    /// Seconds a verification request may go unanswered before the stream is unhealthy
    /// (`vigil_ssf_stream_healthy`, `/readyz`, `vigil streams list`).
    #[serde(default = "default_verification_sla")]
    pub verification_sla_secs: u64,
    /// Seconds between re-reads of the transmitter's metadata and stream status.
    #[serde(default = "default_refresh_interval")]
    pub refresh_interval_secs: u64,
    /// Poll: most SETs per response (`maxEvents`).
    #[serde(default = "default_poll_max")]
    pub poll_max_events: u32,
    /// Poll: how long one long poll may take before Vigil asks again.
    #[serde(default = "default_long_poll_secs")]
    pub poll_timeout_secs: u64,
}

fn default_verify_interval() -> u64 {
    300
}
fn default_refresh_interval() -> u64 {
    600
}
fn default_verification_sla() -> u64 {
    300
}
fn default_poll_max() -> u32 {
    100
}
fn default_long_poll_secs() -> u64 {
    30
}

impl TransmitterConfig {
    /// A transmitter pushing to `/ssf/push/{name}` with keys at `jwks_uri`; the rest at defaults.
    pub fn with_jwks(
        name: &str,
        issuer: &str,
        audiences: Vec<String>,
        authorization: &str,
        algorithms: Vec<Alg>,
        jwks_uri: &str,
    ) -> TransmitterConfig {
        TransmitterConfig {
            name: name.to_owned(),
            issuer: issuer.to_owned(),
            audiences,
            stream: name.to_owned(),
            authorization: authorization.to_owned(),
            algorithms,
            jwks_uri: Some(jwks_uri.to_owned()),
            discovery: false,
            critical_subject_members: Vec::new(),
            legacy_subjects: true,
            tolerate: Tolerate::default(),
            global_token_revocation: false,
            manage: None,
            max_grants: None,
        }
    }

    /// A transmitter found by discovery whose stream Vigil manages (`delivery`, presenting
    /// `credential`), with the management defaults; push credential generated.
    pub fn managed(
        name: &str,
        issuer: &str,
        audiences: Vec<String>,
        delivery: DeliveryMode,
        credential: &str,
    ) -> TransmitterConfig {
        TransmitterConfig {
            jwks_uri: None,
            discovery: true,
            algorithms: default_algs(),
            manage: Some(StreamManagement {
                delivery,
                credential: credential.to_owned(),
                oauth: None,
                events_requested: Vec::new(),
                receiver_url: None,
                description: None,
                verify_interval_secs: default_verify_interval(),
                verification_sla_secs: default_verification_sla(),
                refresh_interval_secs: default_refresh_interval(),
                poll_max_events: default_poll_max(),
                poll_timeout_secs: default_long_poll_secs(),
            }),
            ..TransmitterConfig::with_jwks(name, issuer, audiences, "", Vec::new(), "")
        }
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
fn default_data_dir() -> PathBuf {
    PathBuf::from("vigil-data")
}
fn default_max_body() -> usize {
    64 * 1024
}
fn default_channel() -> usize {
    4096
}
fn default_batch() -> usize {
    256
}
fn default_refresh() -> u64 {
    3600
}
fn default_min_refetch() -> u64 {
    60
}
fn default_refetch_floor() -> u64 {
    2
}
fn default_retry() -> u64 {
    5
}
fn default_fetch_timeout() -> u64 {
    5000
}
/// The default policy directory, relative to the working directory. When it does not exist
/// Vigil runs the built-in set (a fresh checkout's `cargo run -- serve` from anywhere); a
/// configured directory that does not exist is an error.
pub const DEFAULT_POLICY_DIR: &str = "policies";

fn default_policy_dir() -> PathBuf {
    PathBuf::from(DEFAULT_POLICY_DIR)
}
fn default_watch() -> u64 {
    2
}
fn default_session_ttl() -> u64 {
    8 * 3600
}
fn default_inflight() -> usize {
    8192
}
fn default_max_grants() -> usize {
    10_000_000
}
fn default_sweep() -> u64 {
    1000
}
fn default_checkpoint() -> u64 {
    1000
}
fn default_journal_fold_rows() -> usize {
    32_768
}
fn default_journal_fold_interval() -> u64 {
    10_000
}
/// 64 MiB: a round of `journal_fold_rows` keys of revoked session grants and their contexts on
/// two shards.
fn default_journal_fold_cache_bytes() -> usize {
    64 << 20
}
/// Thirty days.
fn default_context_retention() -> u64 {
    30 * 24 * 3600
}
fn default_disabled_account_retention() -> u64 {
    366 * 24 * 3600
}
fn default_audit_bytes() -> u64 {
    64 * 1024 * 1024
}
fn default_audit_keep() -> usize {
    10
}
fn default_access_audit_bytes() -> u64 {
    16 * 1024 * 1024
}
fn default_access_audit_keep() -> usize {
    4
}
fn default_algs() -> Vec<Alg> {
    vec![Alg::RS256]
}
fn yes() -> bool {
    true
}
fn default_intake_retention() -> u64 {
    7 * 86_400
}
fn default_intake_segment() -> u64 {
    64 << 20
}
fn default_intake_max_bytes() -> u64 {
    64 << 30
}

impl Default for PushConfig {
    fn default() -> Self {
        PushConfig {
            max_body_bytes: default_max_body(),
        }
    }
}
impl Default for IntakeConfig {
    fn default() -> Self {
        IntakeConfig {
            channel_capacity: default_channel(),
            max_batch: default_batch(),
            retention_secs: default_intake_retention(),
            segment_bytes: default_intake_segment(),
            max_bytes: default_intake_max_bytes(),
        }
    }
}
impl Default for JwksConfig {
    fn default() -> Self {
        JwksConfig {
            refresh_interval_secs: default_refresh(),
            min_refetch_interval_secs: default_min_refetch(),
            refetch_floor_secs: default_refetch_floor(),
            retry_interval_secs: default_retry(),
            fetch_timeout_ms: default_fetch_timeout(),
        }
    }
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            dir: default_policy_dir(),
            watch_interval_secs: default_watch(),
            examples_dir: None,
            require_preview: None,
            shadow_divergences_max: default_shadow_divergences(),
        }
    }
}
impl EngineConfig {
    /// `max_grants_per_registrant`, or half of `max_grants` (at least one) when unset.
    pub fn grants_per_registrant(&self) -> usize {
        self.max_grants_per_registrant
            .unwrap_or((self.max_grants / 2).max(1))
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            shards: 0,
            session_ttl_secs: default_session_ttl(),
            max_inflight: default_inflight(),
            max_grants: default_max_grants(),
            max_grants_per_registrant: None,
            max_batch: default_batch(),
            sweep_interval_ms: default_sweep(),
            checkpoint_interval_ms: default_checkpoint(),
            journal_fold_rows: default_journal_fold_rows(),
            journal_fold_interval_ms: default_journal_fold_interval(),
            journal_fold_cache_bytes: default_journal_fold_cache_bytes(),
            context_retention_secs: default_context_retention(),
            disabled_account_retention_secs: default_disabled_account_retention(),
        }
    }
}
impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            max_file_bytes: default_audit_bytes(),
            keep_files: default_audit_keep(),
            access_max_file_bytes: default_access_audit_bytes(),
            access_keep_files: default_access_audit_keep(),
            max_age_secs: default_audit_max_age(),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: default_listen(),
            data_dir: default_data_dir(),
            push: PushConfig::default(),
            intake: IntakeConfig::default(),
            jwks: JwksConfig::default(),
            policy: PolicyConfig::default(),
            engine: EngineConfig::default(),
            context: ContextConfig::default(),
            audit: AuditConfig::default(),
            identity: IdentityConfig::default(),
            delivery: DeliveryConfig::default(),
            enforcement_points: Vec::new(),
            transmitters: Vec::new(),
            kafka: KafkaConfig::default(),
            cluster: ClusterConfig::default(),
            clients: Vec::new(),
            limits: LimitsConfig::default(),
            tls: TlsConfig::default(),
            server: ServerConfig::default(),
            outbound: OutboundConfig::default(),
            events: EventsConfig::default(),
            authzen: AuthzenConfig::default(),
        }
    }
}

impl Config {
    /// Loads the file (or the built-in defaults) and applies environment overrides, then validates.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        Config::load_reporting(file, env).map(|(config, _)| config)
    }

    /// [`Config::load`], also saying which `VIGIL_*` variables were applied and which were ignored.
    pub fn load_reporting(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(Config, EnvReport), ConfigError> {
        let text = match file {
            Some(path) => std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
                path: path.to_owned(),
                source,
            })?,
            None => String::new(),
        };
        Config::from_toml_reporting(&text, env)
    }

    /// Parses TOML text, applies environment overrides and validates.
    pub fn from_toml(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        Config::from_toml_reporting(text, env).map(|(config, _)| config)
    }

    /// [`Config::from_toml`], with the report of the environment variables.
    ///
    /// Only a `VIGIL_*` variable whose path names a configuration key is applied. One whose path
    /// names no key (Kubernetes' `VIGIL_SERVICE_HOST`, `VIGIL_PORT=tcp://…` for a Service named
    /// `vigil`, a harness's own flag) is left out and listed in [`EnvReport::ignored`]: the
    /// environment is shared with other software, so an unknown name is not a typo to refuse.
    /// Invalid values of known keys are still errors.
    pub fn from_toml_reporting(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(Config, EnvReport), ConfigError> {
        let mut root: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Syntax(e.to_string()))?;
        let mut vars: Vec<(String, String)> = env
            .into_iter()
            .filter(|(name, _)| {
                name.len() > "VIGIL_".len()
                    && name.starts_with("VIGIL_")
                    && !NON_CONFIG_ENV.contains(&name.as_str())
            })
            .collect();
        // Sorted so that the outcome never depends on the environment's order.
        vars.sort();
        let mut report = EnvReport::default();
        for (name, value) in vars {
            let path = &name["VIGIL_".len()..];
            let mut candidate = root.clone();
            apply_override(&mut candidate, path, &value)?;
            if names_unknown_key(&candidate, path) && !names_unknown_key(&root, path) {
                report.ignored.push(name);
                continue;
            }
            root = candidate;
            report.applied.push(name);
        }
        let config: Config =
            serde_path_to_error::deserialize(toml::Value::Table(root)).map_err(|e| {
                let key = e.path().to_string();
                // toml appends its own "in `key`" line; the key is already named.
                let message = e.into_inner().to_string();
                invalid(key, message.lines().next().unwrap_or_default())
            })?;
        config.validate()?;
        Ok((config, report))
    }

    /// Checks what types alone cannot: uniqueness, URLs, non-empty lists.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(0.0..=1.0).contains(&self.authzen.audit_sample_rate) {
            return Err(invalid(
                "authzen.audit_sample_rate",
                "must be between 0 and 1",
            ));
        }
        if self.push.max_body_bytes == 0 || self.push.max_body_bytes > 4 << 20 {
            return Err(invalid(
                "push.max_body_bytes",
                "must be between 1 and 4194304 (4 MiB; the intake log's records are bounded)",
            ));
        }
        if self.intake.channel_capacity == 0 {
            return Err(invalid("intake.channel_capacity", "must be greater than 0"));
        }
        if self.intake.max_batch == 0 {
            return Err(invalid("intake.max_batch", "must be greater than 0"));
        }
        if self.delivery.max_outbox_per_stream == 0 || self.delivery.max_dead_letters == 0 {
            return Err(invalid(
                "delivery.max_outbox_per_stream",
                "delivery.max_outbox_per_stream and delivery.max_dead_letters must be greater than 0",
            ));
        }
        if self.intake.retention_secs == 0 || self.intake.retention_secs > 366 * 86_400 {
            return Err(invalid(
                "intake.retention_secs",
                "must be between 1 and 31622400 (366 days)",
            ));
        }
        if !(4096..=1 << 30).contains(&self.intake.segment_bytes) {
            return Err(invalid(
                "intake.segment_bytes",
                "must be between 4096 and 1073741824 (1 GiB)",
            ));
        }
        if self.intake.max_bytes < self.intake.segment_bytes.saturating_mul(2) {
            return Err(invalid(
                "intake.max_bytes",
                "must be at least two segments (2 × intake.segment_bytes)",
            ));
        }
        if self.policy.shadow_divergences_max > 1_000_000 {
            return Err(invalid(
                "policy.shadow_divergences_max",
                "must be at most 1000000",
            ));
        }
        for (key, value) in [
            ("engine.max_inflight", self.engine.max_inflight),
            ("engine.max_grants", self.engine.max_grants),
            (
                "engine.max_grants_per_registrant",
                self.engine.grants_per_registrant(),
            ),
            ("engine.max_batch", self.engine.max_batch),
            (
                "engine.sweep_interval_ms",
                self.engine.sweep_interval_ms as usize,
            ),
            (
                "engine.checkpoint_interval_ms",
                self.engine.checkpoint_interval_ms as usize,
            ),
            ("engine.journal_fold_rows", self.engine.journal_fold_rows),
            ("audit.keep_files", self.audit.keep_files),
            ("audit.access_keep_files", self.audit.access_keep_files),
            (
                "policy.shadow_divergences_max",
                self.policy.shadow_divergences_max,
            ),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be greater than 0"));
            }
        }
        let signing = |alg: Alg| matches!(alg, Alg::RS256 | Alg::ES256 | Alg::EdDSA);
        if !signing(self.identity.alg) {
            return Err(invalid("identity.alg", "must be RS256, ES256 or EdDSA"));
        }
        if !self.identity.offered_algs.iter().copied().all(signing) {
            return Err(invalid(
                "identity.offered_algs",
                "each must be RS256, ES256 or EdDSA",
            ));
        }
        if let Some(issuer) = &self.identity.issuer {
            crate::discovery::metadata_url(issuer, "ssf-configuration")
                .map_err(|e| invalid("identity.issuer", e.to_string()))?;
        }
        self.kafka.validate()?;
        self.cluster.validate(&self.kafka)?;
        let mut ep_names = HashSet::new();
        let mut ep_tokens = HashSet::new();
        for (i, ep) in self.enforcement_points.iter().enumerate() {
            if ep.name.is_empty() || !ep_names.insert(ep.name.as_str()) {
                return Err(invalid(
                    format!("enforcement_points[{i}].name"),
                    "must be non-empty and unique",
                ));
            }
            if ep.token.len() < 16 || !ep_tokens.insert(ep.token.as_str()) {
                return Err(invalid(
                    format!("enforcement_points[{i}].token"),
                    "must be unique and at least 16 characters",
                ));
            }
            if let Some(alg) = ep.signing_alg {
                if !self.identity.algorithms().contains(&alg) {
                    return Err(invalid(
                        format!("enforcement_points[{i}].signing_alg"),
                        "must be identity.alg or one of identity.offered_algs",
                    ));
                }
            }
        }
        for (key, value) in [
            (
                "limits.transmitter_sets_per_sec",
                self.limits.transmitter_sets_per_sec,
            ),
            (
                "limits.client_requests_per_sec",
                self.limits.client_requests_per_sec,
            ),
            ("limits.burst", self.limits.burst),
        ] {
            if !(value.is_finite() && value >= 1.0) {
                return Err(invalid(key, "must be a number of at least 1"));
            }
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return Err(invalid("tls", "`cert` and `key` go together"));
        }
        if self.tls.client_ca.is_some() && self.tls.cert.is_none() {
            return Err(invalid(
                "tls.client_ca",
                "client certificates need TLS: set `cert` and `key`",
            ));
        }
        for (key, value) in [
            (
                "limits.max_streaming_connections",
                self.limits.max_streaming_connections,
            ),
            (
                "limits.max_streaming_connections_per_enforcement_point",
                self.limits.max_streaming_connections_per_enforcement_point,
            ),
            (
                "limits.max_streams_per_enforcement_point",
                self.limits.max_streams_per_enforcement_point,
            ),
            (
                "limits.max_subjects_per_stream",
                self.limits.max_subjects_per_stream,
            ),
            (
                "limits.push_concurrency_per_enforcement_point",
                self.limits.push_concurrency_per_enforcement_point,
            ),
            ("server.max_connections", self.server.max_connections),
            (
                "limits.transmitter_max_inflight",
                self.limits.transmitter_max_inflight,
            ),
            (
                "server.max_connections_per_peer",
                self.server.max_connections_per_peer,
            ),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be greater than 0"));
            }
        }
        if !(self.limits.enforcement_point_requests_per_sec.is_finite()
            && self.limits.enforcement_point_requests_per_sec >= 1.0)
        {
            return Err(invalid(
                "limits.enforcement_point_requests_per_sec",
                "must be a number of at least 1",
            ));
        }
        self.check_durations()?;
        let mut client_names = HashSet::new();
        for (i, c) in self.clients.iter().enumerate() {
            if c.name.is_empty() || !client_names.insert(c.name.as_str()) {
                return Err(invalid(
                    format!("clients[{i}].name"),
                    "must be non-empty and unique",
                ));
            }
            // Unique across enforcement points too: a token names exactly one caller.
            if c.token.len() < 16 || !ep_tokens.insert(c.token.as_str()) {
                return Err(invalid(
                    format!("clients[{i}].token"),
                    "must be unique (among clients and enforcement points) and at least 16 characters",
                ));
            }
            if c.roles.is_empty() {
                return Err(invalid(format!("clients[{i}].roles"), "must name a role"));
            }
            if c.max_grants == Some(0) {
                return Err(invalid(
                    format!("clients[{i}].max_grants"),
                    "must be greater than 0",
                ));
            }
        }
        let mut names = HashSet::new();
        let mut streams = HashSet::new();
        for (i, t) in self.transmitters.iter().enumerate() {
            let key = |field: &str| format!("transmitters[{i}].{field}");
            if t.name.is_empty() || !names.insert(t.name.as_str()) {
                return Err(invalid(key("name"), "must be non-empty and unique"));
            }
            if t.max_grants == Some(0) {
                return Err(invalid(key("max_grants"), "must be greater than 0"));
            }
            let stream_ok = !t.stream.is_empty()
                && t.stream
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b));
            if !stream_ok {
                return Err(invalid(
                    key("stream"),
                    "must be non-empty and use only RFC 3986 unreserved characters",
                ));
            }
            if !streams.insert(t.stream.as_str()) {
                return Err(invalid(key("stream"), "is used by two transmitters"));
            }
            if t.issuer.is_empty() {
                return Err(invalid(key("issuer"), "must not be empty"));
            }
            if t.audiences.is_empty() || t.audiences.iter().any(String::is_empty) {
                return Err(invalid(
                    key("audiences"),
                    "needs at least one non-empty value",
                ));
            }
            // A managed stream gets a generated push credential (kept in the store).
            if t.authorization.trim().is_empty() && t.manage.is_none() {
                return Err(invalid(
                    key("authorization"),
                    "must not be empty: every push must be authenticated",
                ));
            }
            if let Some(m) = &t.manage {
                if !t.discovery {
                    return Err(invalid(
                        key("manage"),
                        "needs `discovery = true`: the management endpoints come from the metadata",
                    ));
                }
                match (&m.oauth, m.credential.trim().is_empty()) {
                    (None, true) => {
                        return Err(invalid(
                            key("manage.credential"),
                            "must not be empty (or set `manage.oauth` for client credentials)",
                        ))
                    }
                    (Some(_), false) => {
                        return Err(invalid(
                            key("manage"),
                            "set either `credential` or `oauth`, not both",
                        ))
                    }
                    _ => {}
                }
                if let Some(o) = &m.oauth {
                    let secret = o.client_secret.as_deref().is_some_and(|s| !s.is_empty());
                    let method_ok = match o.auth_method {
                        ClientAuthMethod::ClientSecretBasic
                        | ClientAuthMethod::ClientSecretPost => secret,
                        ClientAuthMethod::PrivateKeyJwt => o.private_key_path.is_some(),
                    };
                    if o.client_id.is_empty() || !method_ok {
                        return Err(invalid(
                            key("manage.oauth"),
                            "needs `client_id` and, for client_secret_basic / client_secret_post, \
                             `client_secret`; for private_key_jwt, `private_key_path`",
                        ));
                    }
                    for url in [&o.token_endpoint, &o.authorization_server]
                        .into_iter()
                        .flatten()
                    {
                        reqwest::Url::parse(url)
                            .map_err(|e| invalid(key("manage.oauth"), e.to_string()))?;
                    }
                }
                if let Some(url) = &m.receiver_url {
                    reqwest::Url::parse(url)
                        .map_err(|e| invalid(key("manage.receiver_url"), e.to_string()))?;
                }
                if m.poll_max_events == 0 || m.poll_timeout_secs == 0 {
                    return Err(invalid(
                        key("manage"),
                        "poll_max_events and poll_timeout_secs must be greater than 0",
                    ));
                }
            }
            if t.algorithms.is_empty() {
                return Err(invalid(key("algorithms"), "needs at least one algorithm"));
            }
            match (&t.jwks_uri, t.discovery) {
                (Some(_), true) | (None, false) => {
                    return Err(invalid(
                        key("jwks_uri"),
                        "set exactly one of `jwks_uri` and `discovery = true`",
                    ))
                }
                (Some(uri), false) => {
                    check_fetch_url(uri).map_err(|m| invalid(key("jwks_uri"), m))?
                }
                (None, true) => {
                    check_fetch_url(&t.issuer).map_err(|m| invalid(key("issuer"), m))?
                }
            }
        }
        Ok(())
    }
}

impl Config {
    /// Every duration has an upper bound, so no arithmetic on it (deadlines, backoff doubling,
    /// `Instant + Duration`) can overflow and panic; zero is refused where it would mean "spin"
    /// or "never".
    fn check_durations(&self) -> Result<(), ConfigError> {
        const DAY_SECS: u64 = 24 * 3600;
        const MAX_SECS: u64 = 366 * DAY_SECS;
        const MAX_MS: u64 = DAY_SECS * 1000;
        let secs = [
            ("engine.session_ttl_secs", self.engine.session_ttl_secs, 0),
            (
                "engine.context_retention_secs",
                self.engine.context_retention_secs,
                1,
            ),
            (
                "engine.disabled_account_retention_secs",
                self.engine.disabled_account_retention_secs,
                1,
            ),
            (
                "jwks.refresh_interval_secs",
                self.jwks.refresh_interval_secs,
                1,
            ),
            (
                "jwks.min_refetch_interval_secs",
                self.jwks.min_refetch_interval_secs,
                0,
            ),
            ("jwks.refetch_floor_secs", self.jwks.refetch_floor_secs, 0),
            ("jwks.retry_interval_secs", self.jwks.retry_interval_secs, 1),
            (
                "identity.key_retention_secs",
                self.identity.key_retention_secs,
                0,
            ),
            (
                "identity.poll_timeout_secs",
                self.identity.poll_timeout_secs,
                0,
            ),
            (
                "delivery.max_backoff_secs",
                self.delivery.max_backoff_secs,
                1,
            ),
            (
                "delivery.dead_letter_after_secs",
                self.delivery.dead_letter_after_secs,
                1,
            ),
            ("audit.max_age_secs", self.audit.max_age_secs, 1),
            (
                "delivery.outbox_sweep_secs",
                self.delivery.outbox_sweep_secs,
                1,
            ),
            (
                "delivery.unread_pause_after_secs",
                self.delivery.unread_pause_after_secs,
                1,
            ),
            (
                "delivery.dead_letter_retention_secs",
                self.delivery.dead_letter_retention_secs,
                1,
            ),
            (
                "policy.watch_interval_secs",
                self.policy.watch_interval_secs,
                0,
            ),
            (
                "events.max_future_skew_secs",
                self.events.max_future_skew_secs,
                0,
            ),
        ];
        for (key, value, min) in secs {
            if value < min || value > MAX_SECS {
                return Err(invalid(
                    key,
                    format!("must be between {min} and {MAX_SECS} seconds"),
                ));
            }
        }
        let mut ms = vec![
            ("jwks.fetch_timeout_ms", self.jwks.fetch_timeout_ms),
            ("engine.sweep_interval_ms", self.engine.sweep_interval_ms),
            (
                "engine.checkpoint_interval_ms",
                self.engine.checkpoint_interval_ms,
            ),
            (
                "engine.journal_fold_interval_ms",
                self.engine.journal_fold_interval_ms,
            ),
            ("delivery.push_timeout_ms", self.delivery.push_timeout_ms),
            (
                "delivery.initial_backoff_ms",
                self.delivery.initial_backoff_ms,
            ),
            (
                "server.request_head_timeout_ms",
                self.server.request_head_timeout_ms,
            ),
            (
                "server.body_read_timeout_ms",
                self.server.body_read_timeout_ms,
            ),
            (
                "server.tls_handshake_timeout_ms",
                self.server.tls_handshake_timeout_ms,
            ),
        ];
        for (i, t) in self.transmitters.iter().enumerate() {
            if let Some(m) = &t.manage {
                for (field, value) in [
                    ("verify_interval_secs", m.verify_interval_secs),
                    ("verification_sla_secs", m.verification_sla_secs),
                    ("refresh_interval_secs", m.refresh_interval_secs),
                    ("poll_timeout_secs", m.poll_timeout_secs),
                ] {
                    if value > MAX_SECS {
                        return Err(invalid(
                            format!("transmitters[{i}].manage.{field}"),
                            format!("must be at most {MAX_SECS} seconds"),
                        ));
                    }
                }
            }
        }
        ms.retain(|(_, v)| *v == 0 || *v > MAX_MS);
        if let Some((key, _)) = ms.first() {
            return Err(invalid(
                *key,
                format!("must be between 1 and {MAX_MS} milliseconds"),
            ));
        }
        Ok(())
    }
}

/// Which `VIGIL_*` environment variables configured Vigil. Names only: values may be secrets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnvReport {
    /// Variables applied as configuration keys.
    pub applied: Vec<String>,
    /// Variables with the prefix whose path names no configuration key, left out.
    pub ignored: Vec<String>,
}

/// Whether `root` fails to deserialize because of an unknown key named by a segment of `path`.
fn names_unknown_key(root: &toml::Table, path: &str) -> bool {
    let Err(e) = Config::deserialize(toml::Value::Table(root.clone())) else {
        return false;
    };
    let message = e.to_string();
    path.split("__")
        .any(|seg| message.starts_with(&format!("unknown field `{}`", seg.to_ascii_lowercase())))
}

/// Keys are fetched over HTTPS; plain HTTP is allowed only to loopback (local development and tests).
fn check_fetch_url(raw: &str) -> Result<(), String> {
    let url = reqwest::Url::parse(raw).map_err(|e| format!("`{raw}` is not a URL: {e}"))?;
    match url.scheme() {
        "https" => Ok(()),
        "http" => {
            let loopback = match url.host() {
                Some(url::Host::Domain(d)) => d == "localhost",
                Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
                Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
                None => false,
            };
            if loopback {
                Ok(())
            } else {
                Err(format!("`{raw}` must use https (http only to loopback)"))
            }
        }
        other => Err(format!("`{raw}`: unsupported scheme `{other}`")),
    }
}

/// Sets `path` (e.g. `TRANSMITTERS__0__AUTHORIZATION`) in `root` to `raw`.
fn apply_override(root: &mut toml::Table, path: &str, raw: &str) -> Result<(), ConfigError> {
    let segments: Vec<String> = path.split("__").map(str::to_ascii_lowercase).collect();
    let env_name = format!("VIGIL_{path}");
    let value = parse_env_value(raw);
    let mut cursor = root;
    for (i, seg) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        let next_is_index = segments
            .get(i + 1)
            .is_some_and(|s| s.parse::<usize>().is_ok());
        if last {
            cursor.insert(seg.clone(), value);
            return Ok(());
        }
        let entry = cursor.entry(seg.clone()).or_insert_with(|| {
            if next_is_index {
                toml::Value::Array(Vec::new())
            } else {
                toml::Value::Table(toml::Table::new())
            }
        });
        cursor = match entry {
            toml::Value::Table(t) => t,
            toml::Value::Array(items) => {
                let idx: usize = segments[i + 1]
                    .parse()
                    .map_err(|_| invalid(&env_name, "expected an array index"))?;
                let item = items.get_mut(idx).ok_or_else(|| {
                    invalid(
                        &env_name,
                        format!("`{seg}` has no element {idx} to override"),
                    )
                })?;
                match item {
                    toml::Value::Table(t) => {
                        if i + 2 == segments.len() {
                            return Err(invalid(&env_name, "cannot replace a whole table"));
                        }
                        // Skip the index segment on the next iteration.
                        return apply_override(t, &segments[i + 2..].join("__"), raw);
                    }
                    _ => return Err(invalid(&env_name, "not a table")),
                }
            }
            _ => return Err(invalid(&env_name, format!("`{seg}` is not a table"))),
        };
    }
    Ok(())
}

fn parse_env_value(raw: &str) -> toml::Value {
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONE: &str = r#"
        [[transmitters]]
        name = "idp"
        issuer = "https://idp.example.com/"
        audiences = ["https://vigil.example.com"]
        stream = "idp"
        authorization = "Bearer s3cret"
        jwks_uri = "https://idp.example.com/jwks.json"
    "#;

    fn no_env() -> Vec<(String, String)> {
        Vec::new()
    }

    fn err_of(text: &str, env: Vec<(String, String)>) -> String {
        match Config::from_toml(text, env) {
            Ok(_) => panic!("accepted: {text}"),
            Err(e) => e.to_string(),
        }
    }

    /// `[cluster]` values that would name bad topics, overflow or break ownership are refused by
    /// key; risk feeds with cluster mode are refused until they are re-keyed to their owner.
    #[test]
    fn cluster_settings_are_checked() {
        let on = |extra: &str| format!("[cluster]\nbrokers = \"k:9092\"\n{extra}");
        assert!(Config::from_toml(&on(""), no_env())
            .unwrap()
            .cluster
            .enabled());
        assert!(!Config::from_toml("", no_env()).unwrap().cluster.enabled());
        for (extra, key) in [
            ("name = \"a b\"", "cluster.name"),
            ("name = \"\"", "cluster.name"),
            ("partitions = 0", "cluster.partitions"),
            ("partitions = 20000", "cluster.partitions"),
            ("replication_factor = 0", "cluster.replication_factor"),
            ("publish_timeout_ms = 1", "cluster.publish_timeout_ms"),
            ("advertised_url = \"ftp://x\"", "cluster.advertised_url"),
            (
                "[cluster.properties]\nacks = \"1\"",
                "cluster.properties.acks",
            ),
            (
                "[cluster.properties]\ngroup_id = \"x\"",
                "cluster.properties.group.id",
            ),
        ] {
            let e = err_of(&on(extra), no_env());
            assert!(e.contains(key), "{extra}: {e}");
        }
        // Risk feeds with a cluster: in a consumer group of their own.
        let e = err_of(
            &format!(
                "{}\n[kafka]\nbrokers = \"k:9092\"\ngroup_id = \"vigil\"",
                on("")
            ),
            no_env(),
        );
        assert!(
            e.contains("kafka.group_id") && e.contains("cluster.name"),
            "{e}"
        );
        let feeds = format!(
            "{}\n[kafka]\nbrokers = \"k:9092\"\ngroup_id = \"vigil-feeds\"",
            on("")
        );
        assert!(Config::from_toml(&feeds, no_env()).is_ok());
    }

    #[test]
    fn empty_file_is_the_default() {
        let c = Config::from_toml("", no_env()).unwrap();
        assert_eq!(c.listen, default_listen());
        assert_eq!(c.push.max_body_bytes, 65536);
        assert!(c.transmitters.is_empty());
    }

    #[test]
    fn example_config_in_repo_is_valid() {
        for file in [
            "config/example.toml",
            "config/dev.toml",
            "config/cluster-dev.toml",
        ] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
            Config::load(Some(&path), no_env()).unwrap_or_else(|e| panic!("{file}: {e}"));
        }
    }

    #[test]
    fn unknown_keys_are_rejected_by_name() {
        assert!(err_of("listne = \"127.0.0.1:1\"", no_env()).contains("listne"));
        let e = err_of(&format!("{ONE}\nflavour = 1"), no_env());
        assert!(
            e.contains("transmitters[0].flavour") || e.contains("flavour"),
            "{e}"
        );
        let e = err_of("[jwks]\nrefresh = 3", no_env());
        assert!(e.contains("refresh"), "{e}");
    }

    #[test]
    fn invalid_values_name_their_key() {
        let e = err_of("listen = \"nowhere\"", no_env());
        assert!(e.contains("`listen`"), "{e}");
        let e = err_of(
            &ONE.replace("jwks_uri", "algorithms = [\"HS256\"]\njwks_uri"),
            no_env(),
        );
        assert!(
            e.contains("transmitters[0].algorithms") && e.contains("HMAC"),
            "{e}"
        );
        let e = err_of(
            &ONE.replace("https://idp.example.com/jwks", "http://10.0.0.1/jwks"),
            no_env(),
        );
        assert!(e.contains("transmitters[0].jwks_uri"), "{e}");
        let e = err_of(&ONE.replace("Bearer s3cret", ""), no_env());
        assert!(e.contains("transmitters[0].authorization"), "{e}");
        let e = err_of(&format!("{ONE}\ndiscovery = true"), no_env());
        assert!(e.contains("exactly one"), "{e}");
        let e = err_of(
            &format!("{ONE}{}", ONE.replace("stream = \"idp\"", "stream = \"x\"")),
            no_env(),
        );
        assert!(e.contains("transmitters[1].name"), "{e}");
        // An enforcement point's signing algorithm must be one Vigil offers.
        let ep = "[[enforcement_points]]\nname = \"gw\"\ntoken = \"0123456789abcdef\"\nsigning_alg = \"ES256\"\n";
        let e = err_of(&format!("{ONE}\n{ep}"), no_env());
        assert!(e.contains("enforcement_points[0].signing_alg"), "{e}");
        let offered = format!("[identity]\noffered_algs = [\"ES256\"]\n{ONE}\n{ep}");
        let config = Config::from_toml(&offered, no_env()).unwrap();
        assert_eq!(config.identity.algorithms(), [Alg::RS256, Alg::ES256]);
        let e = err_of(
            &format!("[identity]\noffered_algs = [\"PS256\"]\n{ONE}"),
            no_env(),
        );
        assert!(e.contains("identity.offered_algs"), "{e}");
        // Grant quotas: none of zero; unset, half of the bound.
        let e = err_of(
            &format!("[engine]\nmax_grants_per_registrant = 0\n{ONE}"),
            no_env(),
        );
        assert!(e.contains("engine.max_grants_per_registrant"), "{e}");
        let client = "[[clients]]\nname = \"gw\"\ntoken = \"gateway-token-0123456789\"\nroles = [\"grants\"]\n";
        let e = err_of(&format!("{ONE}\n{client}max_grants = 0\n"), no_env());
        assert!(e.contains("clients[0].max_grants"), "{e}");
        let e = err_of(
            &ONE.replace("jwks_uri", "max_grants = 0\njwks_uri"),
            no_env(),
        );
        assert!(e.contains("transmitters[0].max_grants"), "{e}");
        let config = Config::from_toml(
            &format!("[engine]\nmax_grants = 9\n{ONE}\n{client}"),
            no_env(),
        )
        .unwrap();
        assert_eq!(config.engine.grants_per_registrant(), 4);
    }

    #[test]
    fn environment_overrides() {
        let env = vec![
            ("VIGIL_LISTEN".to_owned(), "127.0.0.1:9999".to_owned()),
            (
                "VIGIL_JWKS__MIN_REFETCH_INTERVAL_SECS".to_owned(),
                "7".to_owned(),
            ),
            (
                "VIGIL_TRANSMITTERS__0__AUTHORIZATION".to_owned(),
                "Bearer from-env".to_owned(),
            ),
            ("VIGIL_LOG".to_owned(), "debug".to_owned()),
            ("OTHER".to_owned(), "x".to_owned()),
        ];
        let c = Config::from_toml(ONE, env).unwrap();
        assert_eq!(c.listen.port(), 9999);
        assert_eq!(c.jwks.min_refetch_interval_secs, 7);
        assert_eq!(c.transmitters[0].authorization, "Bearer from-env");
        // A known key with a bad value is still an error naming it.
        let e = err_of(
            "",
            vec![("VIGIL_PUSH__MAX_BODY_BYTES".into(), "lots".into())],
        );
        assert!(e.contains("push.max_body_bytes"), "{e}");
        // More than the intake log's records hold is refused at start.
        let e = err_of(
            "",
            vec![("VIGIL_PUSH__MAX_BODY_BYTES".into(), "8388608".into())],
        );
        assert!(e.contains("push.max_body_bytes"), "{e}");
    }

    #[test]
    fn variables_naming_no_key_are_ignored_and_reported() {
        // What Kubernetes injects for a Service named `vigil`, plus a harness's own flag.
        let env = vec![
            ("VIGIL_SERVICE_HOST".to_owned(), "10.96.0.12".to_owned()),
            ("VIGIL_SERVICE_PORT".to_owned(), "8080".to_owned()),
            ("VIGIL_PORT".to_owned(), "tcp://10.96.0.12:8080".to_owned()),
            (
                "VIGIL_PORT_8080_TCP_ADDR".to_owned(),
                "10.96.0.12".to_owned(),
            ),
            ("VIGIL_JWKS__NOT_A_KEY".to_owned(), "1".to_owned()),
            ("VIGIL_LISTEN".to_owned(), "127.0.0.1:9998".to_owned()),
            ("VIGIL_LOG".to_owned(), "debug".to_owned()),
            (
                "VIGIL_TRANSMITTERS__0__AUTHORIZATION".to_owned(),
                "Bearer from-env".to_owned(),
            ),
        ];
        let (c, report) = Config::from_toml_reporting(ONE, env).unwrap();
        assert_eq!(c.listen.port(), 9998);
        assert_eq!(c.transmitters[0].authorization, "Bearer from-env");
        assert_eq!(
            report.applied,
            ["VIGIL_LISTEN", "VIGIL_TRANSMITTERS__0__AUTHORIZATION"]
        );
        assert_eq!(
            report.ignored,
            [
                "VIGIL_JWKS__NOT_A_KEY",
                "VIGIL_PORT",
                "VIGIL_PORT_8080_TCP_ADDR",
                "VIGIL_SERVICE_HOST",
                "VIGIL_SERVICE_PORT"
            ]
        );
        // A file with an unknown key is still refused, whatever the environment.
        let e = err_of(
            "listne = 1",
            vec![("VIGIL_SERVICE_HOST".into(), "x".into())],
        );
        assert!(e.contains("listne"), "{e}");
    }

    #[test]
    fn durations_have_bounds() {
        for (text, key) in [
            (
                "[delivery]\nmax_backoff_secs = 9223372036854775807",
                "delivery.max_backoff_secs",
            ),
            (
                "[delivery]\npush_timeout_ms = 0",
                "delivery.push_timeout_ms",
            ),
            (
                "[jwks]\nrefresh_interval_secs = 99999999999",
                "jwks.refresh_interval_secs",
            ),
            (
                "[server]\nrequest_head_timeout_ms = 86400001",
                "server.request_head_timeout_ms",
            ),
            (
                "[events]\nmax_future_skew_secs = 99999999999",
                "events.max_future_skew_secs",
            ),
        ] {
            let e = err_of(text, no_env());
            assert!(e.contains(key), "{text}: {e}");
        }
    }
}
