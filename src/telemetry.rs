//! Logs and metrics set-up, and every metric Vigil exports, declared once ([`CATALOGUE`]): its
//! name (`vigil_<name>_<unit>[_total]`), type, labels and meaning. Code refers to a metric only by
//! the constant declared here, the exporter publishes the meaning as the metric's `# HELP` line,
//! and a test fails if a metric is recorded anywhere under a name not declared here. Adding a
//! metric is one line below.

/// A metric's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One exported metric.
#[derive(Debug)]
pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    pub labels: &'static [&'static str],
    pub help: &'static str,
}

macro_rules! catalogue {
    ($($id:ident = $name:literal, $kind:ident, [$($label:literal),*], $help:literal;)+) => {
        $(#[doc = $help] pub const $id: &str = $name;)+
        /// Every metric Vigil exports.
        pub const CATALOGUE: &[Metric] = &[
            $(Metric { name: $name, kind: Kind::$kind, labels: &[$($label),*], help: $help }),+
        ];
    };
}

catalogue! {
    // SETs in (push, poll) and their verification.
    SETS_RECEIVED = "vigil_sets_received_total", Counter, ["stream", "event_type", "outcome"],
        "SETs received by push or poll, by outcome (accepted, duplicate, discarded, an RFC 8935 error code, unavailable, storage_error)";
    SET_VERIFY_SECONDS = "vigil_set_verify_seconds", Histogram, ["stream"],
        "Key lookup and signature verification of one SET";
    PUSH_REQUEST_SECONDS = "vigil_push_request_seconds", Histogram, ["stream"],
        "Push request handling, arrival to answer";
    SIGNAL_HANDLING_SECONDS = "vigil_signal_handling_seconds", Histogram, ["stream"],
        "End to end: signal received to processed by the engine";
    JWKS_FETCHES = "vigil_jwks_fetches_total", Counter, ["transmitter", "outcome"],
        "JWKS and SSF metadata fetches from transmitters";
    SIGNALS_REPLAYED = "vigil_signals_replayed_total", Counter, [],
        "Pending signals replayed at start-up";
    EVENT_TIMES_CLAMPED = "vigil_event_times_clamped_total", Counter, ["source"],
        "Event times beyond events.max_future_skew_secs taken as the time of receipt";
    SSF_CLIENT_TOKENS = "vigil_ssf_client_tokens_total", Counter, ["transmitter"],
        "Access tokens fetched with OAuth client credentials for transmitters' management and poll endpoints";
    SSF_POLL_ERRORS = "vigil_ssf_poll_errors_total", Counter, ["stream"],
        "Polls of a transmitter's stream that failed (retried with backoff)";
    SSF_STREAM_SETUP_ERRORS = "vigil_ssf_stream_setup_errors_total", Counter, ["stream"],
        "Failed attempts to create or update a stream at a transmitter";
    SSF_STREAM_VERIFICATION_MISSED = "vigil_ssf_stream_verification_missed_total", Counter, ["stream"],
        "Verification events requested from a transmitter that did not arrive in time";
    SSF_STREAM_LAST_EVENT_TIMESTAMP_SECONDS = "vigil_ssf_stream_last_event_timestamp_seconds", Gauge, ["stream"],
        "When the stream last delivered a SET (Unix seconds)";
    SSF_STREAM_LAST_VERIFIED_TIMESTAMP_SECONDS = "vigil_ssf_stream_last_verified_timestamp_seconds", Gauge, ["stream"],
        "When the stream last passed verification (Unix seconds)";
    SSF_STREAM_ENABLED = "vigil_ssf_stream_enabled", Gauge, ["stream"],
        "1 while the transmitter reports the stream enabled, else 0";
    SSF_STREAM_HEALTHY = "vigil_ssf_stream_healthy", Gauge, ["stream"],
        "0 while a verification request has gone unanswered longer than the stream's SLA (manage.verification_sla_secs), else 1";
    ACCESS_EVALUATIONS = "vigil_access_evaluations_total", Counter, ["decision"],
        "AuthZEN access evaluations, by decision (allow, deny)";
    ACCESS_EVALUATION_SECONDS = "vigil_access_evaluation_seconds", Histogram, [],
        "Time to decide one AuthZEN access evaluation";
    ACCESS_AUDIT_DROPPED = "vigil_access_audit_dropped_total", Counter, [],
        "Access decision records not written to the audit log (the asking client past its share of the queue, the queue full, or the write failed)";
    GLOBAL_TOKEN_REVOCATIONS = "vigil_global_token_revocations_total", Counter, ["transmitter", "status"],
        "OAuth Global Token Revocation requests, by identity provider (unknown: not authenticated) and answer status";
    SSF_TOLERATED = "vigil_ssf_tolerated_deviations_total", Counter, ["transmitter", "deviation"],
        "SETs accepted although they deviate from the specs, by deviation (each tolerated only where the transmitter's switch allows it)";
    // Kafka.
    KAFKA_CONSUMED = "vigil_kafka_consumed_total", Counter, ["topic"],
        "Kafka messages consumed";
    KAFKA_APPLIED = "vigil_kafka_applied_total", Counter, ["topic"],
        "Kafka signals applied by the engine";
    KAFKA_APPLY_ERRORS = "vigil_kafka_apply_errors_total", Counter, [],
        "Kafka batches the engine failed to apply (rewound and redelivered)";
    KAFKA_BATCH_SECONDS = "vigil_kafka_batch_seconds", Histogram, [],
        "One Kafka batch, consumed to applied and checkpointed";
    KAFKA_COMMIT_ERRORS = "vigil_kafka_commit_errors_total", Counter, [],
        "Offset commits that failed";
    KAFKA_CLIENT_ERRORS = "vigil_kafka_client_errors_total", Counter, [],
        "Errors librdkafka reported";
    KAFKA_DEAD_LETTERED = "vigil_kafka_dead_lettered_total", Counter, ["topic"],
        "Bad Kafka messages copied to the dead-letter topic";
    KAFKA_DEAD_LETTER_STORED = "vigil_kafka_dead_letter_stored_total", Counter, ["topic"],
        "Bad Kafka messages kept in the store because the dead-letter topic was unavailable";
    KAFKA_STORED_DEAD_LETTERS = "vigil_kafka_stored_dead_letters", Gauge, [],
        "Dead letters kept in the store (bounded by kafka.max_stored_dead_letters)";
    KAFKA_STORED_DEAD_LETTERS_DROPPED = "vigil_kafka_stored_dead_letters_dropped_total", Counter, [],
        "Stored dead letters dropped past kafka.max_stored_dead_letters (the oldest of the topics holding the most)";
    KAFKA_CONSUMER_LAG = "vigil_kafka_consumer_lag", Gauge, ["topic", "partition"],
        "Messages behind the partition's end, for each partition this instance owns";
    KAFKA_PARTITIONS = "vigil_kafka_partitions", Gauge, ["consumer"],
        "Partitions of the subscribed topics (consumer: signals — cluster mode's signals topic — or risk_feeds)";
    KAFKA_PARTITIONS_OWNED = "vigil_kafka_partitions_owned", Gauge, ["consumer"],
        "Partitions of the subscribed topics assigned to this instance (consumer: signals or risk_feeds)";
    // Cluster mode.
    CLUSTER_PUBLISH_ERRORS = "vigil_cluster_publish_errors_total", Counter, [],
        "Signals the brokers did not take in cluster.publish_timeout_ms (the push was answered 503)";
    CLUSTER_PARTITIONS_OWNED = "vigil_cluster_partitions_owned", Gauge, [],
        "Partitions of the signals topic this instance owns";
    CLUSTER_MEMBERS = "vigil_cluster_members", Gauge, [],
        "Instances in the members directory (this one included), heard from within the last hour";
    CLUSTER_FORWARDED = "vigil_cluster_forwarded_total", Counter, [],
        "API calls answered by the owning instance (forwarded there)";
    CLUSTER_CHANGELOG_ERRORS = "vigil_cluster_changelog_errors_total", Counter, [],
        "Shard batches whose rows the state topic did not take (their signals are replayed, their API calls answered with an error)";
    CLUSTER_RESTORE_REMAINING = "vigil_cluster_restore_remaining", Gauge, ["partition"],
        "State topic records left to read before a partition taken over is applied to (0 once restored)";
    CLUSTER_RESTORE_SECONDS = "vigil_cluster_restore_seconds", Histogram, [],
        "Taking over the state of the partitions one rebalance assigned: dropping what was held, reading them back, storing and holding them";
    CLUSTER_STANDBY_ROWS = "vigil_cluster_standby_rows", Gauge, [],
        "Rows held in the standby copies of the state topic's partitions (cluster.standby)";
    CLUSTER_RESTORED_ROWS = "vigil_cluster_restored_rows_total", Counter, [],
        "Rows of state taken over from the state topic with partitions this instance was assigned";
    CLUSTER_RELEASED_ROWS = "vigil_cluster_released_rows_total", Counter, [],
        "Stored rows dropped with partitions this instance gave up";
    CLUSTER_STATUS_VIEW_GRANTS = "vigil_cluster_status_view_grants", Gauge, [],
        "Grants in this instance's status view (the whole cluster's, as their owners last wrote them)";
    CLUSTER_STATUS_VIEW_LAG = "vigil_cluster_status_view_lag", Gauge, [],
        "State topic records the status view has yet to read (how far check answers from the view may lag the owners)";
    CLUSTER_DECISIONS_COPIED = "vigil_cluster_decisions_copied_total", Counter, [],
        "Other instances' decisions copied from the decisions topic into this instance's audit log";
    CLUSTER_DECISION_COPIES_LAG = "vigil_cluster_decision_copies_lag", Gauge, [],
        "Decision records on the decisions topic not yet copied into this instance's audit log (how far /v1/decisions here may lag the cluster)";
    CLUSTER_VIEW_ANSWERS = "vigil_cluster_view_answers_total", Counter, ["answer"],
        "Checks for a grant held elsewhere answered with the status view: deny (revoked or expired there, no hop), confirmed (the owner answered), unconfirmed (the owner could not be reached: denied)";
    // The engine.
    ALIASES = "vigil_aliases", Gauge, [],
        "Identifier-to-principal links held (in cluster mode the whole cluster's alias table, read from the alias topic)";
    ENGINE_SIGNALS = "vigil_engine_signals_total", Counter, ["changed"],
        "Signals folded into a context (changed=no: older or identical)";
    ENGINE_BATCH_SECONDS = "vigil_engine_batch_seconds", Histogram, [],
        "One shard batch, in memory, before its commit";
    ENGINE_CHECKPOINTS = "vigil_engine_checkpoints_total", Counter, ["outcome"],
        "Shard checkpoints settled (two finished in one batch count once): outcome=stored (their pushed signals marked processed, their sources' batches answered) or failed (a part, or a batch commit whose signals they cover, was not stored: the signals stay pending for replay, the batches are answered with the failure)";
    ENGINE_SHARD_HELD = "vigil_engine_shard_held", Gauge, ["shard", "set"],
        "What a shard holds until its next checkpoint or commit settles it, set at each sweep: contexts changed since the last checkpoint (dirty), those of them a decision's commit stored since (decided_stored), contexts whose deletion is in flight (forgetting), session revocations and links waiting for the checkpoint (dirty_revocations, dirty_aliases), pushed signals it covers (checkpoint_processed), commit failures waiting for the checkpoint they fail (unstored), rows and decisions of failed commits to write again (written_again). Each is emptied by the checkpoint or commit after it; one that keeps growing is a store that is not keeping up";
    ENGINE_JOURNAL_KEYS = "vigil_engine_journal_keys", Gauge, ["shard"],
        "Keys (grants, contexts) a shard journaled that no fold round has written at their places yet; beyond twice engine.journal_fold_rows waiting behind a round, the shard holds back the sources' backlogs";
    ENGINE_JOURNAL_KEPT_BYTES = "vigil_engine_journal_kept_bytes", Gauge, ["shard"],
        "Bytes of journaled rows a shard keeps for the fold round that writes them at their places (at most engine.journal_fold_cache_bytes across the shards); a key whose row did not fit is encoded again from its present state";
    ENGINE_JOURNAL_FOLDED = "vigil_engine_journal_folded_rows_total", Counter, ["from"],
        "Rows fold rounds wrote at their places: from=journal (the row the batch journaled, kept) or present (encoded again from the present state: it did not fit engine.journal_fold_cache_bytes)";
    ENGINE_JOURNAL_FOLDS = "vigil_engine_journal_folds_total", Counter, ["outcome"],
        "Journal fold rounds ended: outcome=stored (their journal rows deleted) or failed (a part was not stored: the keys wait for the next round)";
    ENGINE_JOURNAL_HANDOFFS_MOVED = "vigil_engine_journal_handoffs_moved_total", Counter, [],
        "Decisions delivery had not taken over when their journal rows were deleted (by a fold round or the start-up fold), moved to hand-off rows of their own; outside a restart, delivery is behind";
    CONTEXT_FACTS_EVICTED = "vigil_context_facts_evicted_total", Counter, [],
        "Facts dropped from a context holding 256 keys of their kind (the oldest by event time of the party — transmitter or feed topic — holding the most goes)";
    CONTEXTS = "vigil_contexts", Gauge, [],
        "Subject contexts held (counted at each retention scan)";
    CONTEXTS_FORGOTTEN = "vigil_contexts_forgotten_total", Counter, [],
        "Contexts forgotten: no grant refers to them and their newest fact is older than engine.context_retention_secs";
    CONTEXT_SCAN_SECONDS = "vigil_context_scan_seconds", Histogram, [],
        "One context retention scan: the walk over every context and link that finds what is due (the links' map is held a segment at a time meanwhile)";
    GRANTS_REFUSED = "vigil_grants_refused_total", Counter, ["reason"],
        "New grants refused (registrations, and session grants from session-established events): reason capacity (Vigil holds engine.max_grants) or quota (their registrant holds engine.max_grants_per_registrant)";
    ALIASES_FORGOTTEN = "vigil_aliases_forgotten_total", Counter, [],
        "Identifier-to-principal links forgotten with their principal's context (engine.context_retention_secs), or a window after their principal had neither context nor grant";
    ENGINE_QUEUED_SIGNALS = "vigil_engine_queued_signals", Gauge, [],
        "Signals of sources' batches (Kafka) waiting in the shards' inboxes (bounded by kafka.max_queued_signals)";
    ENGINE_OVERLOADED = "vigil_engine_overloaded_total", Counter, [],
        "Requests refused because the engine had engine.max_inflight in flight";
    POLICY_EVAL_SECONDS = "vigil_policy_eval_seconds", Histogram, [],
        "One grant's evaluation: inputs and every rule";
    DECISIONS = "vigil_decisions_total", Counter, ["effect", "shadow"],
        "Decisions made";
    GRANTS = "vigil_grants", Gauge, [],
        "Grants held (active and tombstones)";
    GRANTS_BY_REGISTRANT = "vigil_grants_by_registrant", Gauge, ["registrant"],
        "Grants held per party that made them (client:<name>, transmitter:<name>; unrecorded for grants from before), on this instance; its quota (engine.max_grants_per_registrant or the party's own max_grants) counts these and vigil_cluster_grants_by_registrant";
    CLUSTER_GRANTS_BY_REGISTRANT = "vigil_cluster_grants_by_registrant", Gauge, ["registrant"],
        "Cluster mode: grants held per party on the other live instances, as they last announced (members topic), counted against the party's quota with this instance's";
    CHECKS = "vigil_checks_total", Counter, ["decision"],
        "Live checks answered, by verdict";
    STORE_COMMIT_SECONDS = "vigil_store_commit_seconds", Histogram, ["store"],
        "One group-commit transaction (store: state, intake_meta; intake: one append and fdatasync of the intake log)";
    STORE_BATCH_SIZE = "vigil_store_batch_size", Histogram, ["store"],
        "Writes per group commit";
    STORE_COMMIT_ERRORS = "vigil_store_commit_errors_total", Counter, ["store"],
        "Group commits that failed (a write in them failed, or the disk did): nothing in them was written, and each writer was told";
    STREAMS_PAUSED_UNREAD = "vigil_streams_paused_unread_total", Counter, [],
        "Poll and SSE streams paused because nobody read their waiting SETs for delivery.unread_pause_after_secs";
    OUTBOX_DEAD_LETTERED = "vigil_outbox_dead_lettered_total", Counter, [],
        "SETs moved from an outbox to the dead letters by the sweep (too old, or past delivery.max_outbox_per_stream)";
    DEAD_LETTERS_DROPPED = "vigil_dead_letters_dropped_total", Counter, [],
        "Dead letters dropped (older than delivery.dead_letter_retention_secs, or past delivery.max_dead_letters)";
    INTAKE_LOG_SETS = "vigil_intake_log_sets", Gauge, [],
        "SETs the intake log retains (the dedupe window's records and those pending)";
    INTAKE_LOG_BYTES = "vigil_intake_log_bytes", Gauge, [],
        "Bytes of the intake log's segment files";
    INTAKE_LOG_SEGMENTS = "vigil_intake_log_segments", Gauge, [],
        "Segment files of the intake log";
    INTAKE_PENDING = "vigil_intake_pending", Gauge, [],
        "SETs recorded and not yet processed by the engine";
    INTAKE_HANDED_ON_WAITING = "vigil_intake_handed_on_waiting", Gauge, [],
        "Signals intake's writer handed on that the engine's hand-off has not taken yet (bounded by intake.channel_capacity; at the bound, appends wait)";
    INTAKE_LOG_SYNCS = "vigil_intake_log_syncs_total", Counter, [],
        "fdatasync calls on the intake log: group commits of SETs, and what detached processed marks wrote before a roll or shutdown";
    INTAKE_SEGMENTS_PRUNED = "vigil_intake_segments_pruned_total", Counter, ["reason"],
        "Intake segments dropped (reason: retention, or size when intake.max_bytes made room early)";
    AUDIT_ERRORS = "vigil_audit_errors_total", Counter, [],
        "Audit appends that failed";
    AUDIT_FILES_DROPPED = "vigil_audit_files_dropped_total", Counter, [],
        "Audit log files dropped (beyond audit.keep_files, or older than audit.max_age_secs)";
    AUDIT_REPEATS_SKIPPED = "vigil_audit_repeats_skipped_total", Counter, [],
        "Decisions a replay made again after a crash, already in the audit log";
    // Policy.
    POLICY_ERRORS = "vigil_policy_errors_total", Counter, ["rule"],
        "Rule evaluations that errored and failed closed";
    POLICY_SHADOW_MATCHES = "vigil_policy_shadow_matches_total", Counter, ["rule"],
        "Shadow-mode rule matches on live grants (recorded, never enforced)";
    POLICY_RELOADS = "vigil_policy_reloads_total", Counter, ["outcome"],
        "Policy reloads, swapped or refused";
    POLICY_SWAPS = "vigil_policy_swaps_total", Counter, [],
        "Policy sets swapped in";
    SHADOW_DIVERGENCES = "vigil_shadow_divergences_total", Counter, ["rule", "direction"],
        "Evaluations where the shadow set would leave a grant in another status than the live set (direction: stricter or looser; rule: the stricter side's deciding rule)";
    SHADOW_DIVERGENCES_HELD = "vigil_shadow_divergences_held", Gauge, [],
        "Shadow divergences held for listing (the newest policy.shadow_divergences_max)";
    // Delivery to enforcement points.
    SETS_EMITTED = "vigil_sets_emitted_total", Counter, [],
        "SETs queued for enforcement points' streams";
    DELIVERY_QUEUED = "vigil_delivery_queued", Gauge, ["lane"],
        "Decisions waiting for delivery, by lane: interactive, or bulk (a source's backlog; the shards hold the backlogs at engine::BULK_BOUND)";
    EMIT_ERRORS = "vigil_emit_errors_total", Counter, [],
        "Decisions whose SETs could not be signed or queued (they stay pending)";
    SETS_DELIVERED = "vigil_sets_delivered_total", Counter, ["method"],
        "SETs delivered and acknowledged (push, poll, sse)";
    DECISION_DELIVERED_SECONDS = "vigil_decision_delivered_seconds", Histogram, ["method"],
        "SET queued to acknowledged by the enforcement point";
    SETS_RETRIED = "vigil_sets_retried_total", Counter, ["enforcement_point"],
        "Push attempts that failed and will be retried";
    SETS_DEAD_LETTERED = "vigil_sets_dead_lettered_total", Counter, ["enforcement_point"],
        "SETs moved to the dead letters after their retries";
    SETS_REJECTED_BY_RECEIVER = "vigil_sets_rejected_by_receiver_total", Counter, [],
        "SETs an enforcement point rejected in a poll acknowledgement (setErrs)";
    PUSH_ATTEMPTS = "vigil_push_attempts_total", Counter, ["enforcement_point", "outcome"],
        "RFC 8935 push attempts to enforcement points (delivered, rejected, retry, refused)";
    PUSH_REJECTIONS = "vigil_push_rejections_total", Counter, ["err"],
        "Enforcement points' 400 answers, by RFC 8935 error code (other for anything else)";
    STREAMING_REFUSED = "vigil_streaming_refused_total", Counter, ["scope"],
        "Long polls and SSE connections refused: the enforcement point's own cap (enforcement_point) or the shared one (all)";
    // The HTTP server, API clients and outbound calls.
    API_DENIED = "vigil_api_denied_total", Counter, ["reason"],
        "API requests refused: no or bad credential, role, or rate_limited";
    HTTP_CONNECTIONS_OPEN = "vigil_http_connections_open", Gauge, [],
        "Accepted connections being served";
    HTTP_CONNECTIONS_REFUSED = "vigil_http_connections_refused_total", Counter, ["reason"],
        "Connections closed at once: full (over server.max_connections and the health reserve), peer (over server.max_connections_per_peer)";
    HTTP_RESERVE_CONNECTIONS = "vigil_http_reserve_connections_total", Counter, [],
        "Connections served only /healthz and /readyz because the server was full";
    HTTP_ACCEPT_ERRORS = "vigil_http_accept_errors_total", Counter, [],
        "Failed accept calls (e.g. out of file descriptors)";
    HTTP_BODY_TIMEOUTS = "vigil_http_body_timeouts_total", Counter, [],
        "Requests whose body did not arrive within server.body_read_timeout_ms (408)";
    TLS_HANDSHAKE_FAILURES = "vigil_tls_handshake_failures_total", Counter, [],
        "TLS handshakes refused or timed out";
    OUTBOUND_REFUSED = "vigil_outbound_refused_total", Counter, ["reason"],
        "Outbound calls refused before or while sending (destination, redirect, body cap)";
    TASK_RESTARTS = "vigil_task_restarts_total", Counter, ["task"],
        "Shared background tasks that ended unexpectedly and were started again";
}

/// Publishes every metric's meaning, so the exporter writes its `# HELP` line.
fn describe_all() {
    for m in CATALOGUE {
        match m.kind {
            Kind::Counter => metrics::describe_counter!(m.name, m.help),
            Kind::Gauge => metrics::describe_gauge!(m.name, m.help),
            Kind::Histogram => metrics::describe_histogram!(m.name, m.help),
        }
    }
}

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

const LATENCY_BUCKETS: [f64; 16] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0,
];
const SIZE_BUCKETS: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// Installs the process-wide Prometheus recorder once and returns its handle. `None` if another
/// recorder was installed first (metrics then go there).
pub fn metrics_handle() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Suffix("_size".into()), &SIZE_BUCKETS)
                });
            match builder.and_then(|b| b.install_recorder()) {
                Ok(handle) => {
                    describe_all();
                    Some(handle)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "Prometheus recorder not installed");
                    None
                }
            }
        })
        .clone()
}

/// Initializes structured logging. `VIGIL_LOG` is an `EnvFilter` directive (default `info`);
/// `VIGIL_LOG_FORMAT=json` switches to JSON lines.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VIGIL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let json = std::env::var("VIGIL_LOG_FORMAT").is_ok_and(|v| v == "json");
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources(dir: &std::path::Path, out: &mut Vec<(String, String)>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                out.push((path.display().to_string(), text));
            }
        }
    }

    /// Metrics are recorded only through the constants declared here, each constant is used, and
    /// names follow the convention: a metric cannot be added, renamed or dropped without its line in
    /// the catalogue (and so its `# HELP`) following.
    #[test]
    fn every_metric_is_declared_once_and_recorded_by_its_constant() {
        let mut files = Vec::new();
        sources(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
            &mut files,
        );
        let macros = ["counter!(", "gauge!(", "histogram!("];
        for (path, text) in files.iter().filter(|(p, _)| !p.ends_with("telemetry.rs")) {
            for m in macros {
                for (at, _) in text.match_indices(m) {
                    let after = text[at + m.len()..].trim_start();
                    assert!(
                        !after.starts_with('"'),
                        "{path}: a metric named by a literal; declare it in telemetry::CATALOGUE"
                    );
                }
            }
        }
        let mut names = std::collections::HashSet::new();
        for metric in CATALOGUE {
            assert!(names.insert(metric.name), "{} declared twice", metric.name);
            assert!(metric.name.starts_with("vigil_"), "{}", metric.name);
            assert_eq!(
                metric.kind == Kind::Counter,
                metric.name.ends_with("_total"),
                "{}: counters, and only counters, end in _total",
                metric.name
            );
            assert!(!metric.help.is_empty());
        }
        let code: String = files
            .iter()
            .filter(|(p, _)| !p.ends_with("telemetry.rs"))
            .map(|(_, t)| t.as_str())
            .collect();
        // Each declared constant is used somewhere (its identifier follows `telemetry::`).
        let declared = include_str!("telemetry.rs");
        for line in declared.lines() {
            let line = line.trim_start();
            let Some((id, rest)) = line.split_once(" = \"vigil_") else {
                continue;
            };
            if id
                .chars()
                .all(|c| c.is_ascii_uppercase() || c == '_' || c.is_ascii_digit())
                && rest.contains("\", ")
            {
                assert!(
                    code.contains(&format!("telemetry::{id}")),
                    "{id} is declared but never recorded"
                );
            }
        }
    }

    /// `/metrics` carries each metric's meaning as its `# HELP` line.
    #[test]
    fn the_exporter_writes_help_lines() {
        // Nothing else in this process installs a recorder.
        let handle = metrics_handle().unwrap();
        metrics::counter!(DECISIONS, "effect" => "revoke", "shadow" => "false").increment(1);
        metrics::gauge!(GRANTS).set(1.0);
        let text = handle.render();
        assert!(
            text.contains("# HELP vigil_decisions_total Decisions made"),
            "{text}"
        );
        assert!(text.contains("# HELP vigil_grants Grants held"), "{text}");
    }
}
