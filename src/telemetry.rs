//! Logs and metrics set-up. Metric names follow `vigil_<name>_<unit>[_total]`:
//!
//! | metric | type | labels | meaning |
//! |---|---|---|---|
//! | `vigil_sets_received_total` | counter | stream, event_type, outcome | every push, by outcome (`accepted`, `duplicate`, `discarded`, an RFC 8935 code, `unavailable`, `storage_error`) |
//! | `vigil_set_verify_seconds` | histogram | stream | key lookup + signature verification |
//! | `vigil_push_request_seconds` | histogram | stream | push request handling, arrival to answer |
//! | `vigil_signal_handling_seconds` | histogram | stream | end to end: SET received to processed by the next stage |
//! | `vigil_store_commit_seconds` | histogram | store (`state`, `intake`) | one group-commit transaction |
//! | `vigil_store_batch_size` | histogram | store | writes per group commit |
//! | `vigil_jwks_fetches_total` | counter | transmitter, outcome | JWKS / metadata fetches |
//! | `vigil_signals_replayed_total` | counter | | pending signals replayed at start-up |
//! | `vigil_engine_signals_total` | counter | changed | signals folded into a context (`changed=no`: older or identical) |
//! | `vigil_engine_batch_seconds` | histogram | | one shard batch, in memory (before its commit) |
//! | `vigil_policy_eval_seconds` | histogram | | one grant's evaluation (inputs + every rule) |
//! | `vigil_decisions_total` | counter | effect, shadow | decisions made |
//! | `vigil_grants` | gauge | | grants held (active and tombstones) |
//! | `vigil_policy_errors_total` | counter | rule | rule evaluations that errored and failed closed |
//! | `vigil_policy_shadow_matches_total` | counter | rule | shadow-mode matches |
//! | `vigil_policy_reloads_total` | counter | outcome | reloads `swapped` / `refused` |
//! | `vigil_policy_swaps_total` | counter | | policy sets swapped in |
//! | `vigil_audit_errors_total` | counter | | audit appends that failed |
//! | `vigil_http_connections_open` | gauge | | accepted connections being served |
//! | `vigil_http_connections_refused_total` | counter | reason | connections closed at once: `full` (over `server.max_connections` and the health reserve), `peer` (over `server.max_connections_per_peer`) |
//! | `vigil_http_reserve_connections_total` | counter | | connections served only `/healthz` and `/readyz` (the server was full) |
//! | `vigil_http_accept_errors_total` | counter | | failed `accept` calls (e.g. out of file descriptors) |
//! | `vigil_http_body_timeouts_total` | counter | | requests whose body did not arrive within `server.body_read_timeout_ms` (408) |
//! | `vigil_tls_handshake_failures_total` | counter | | TLS handshakes refused or timed out |
//! | `vigil_outbound_refused_total` | counter | reason | outbound calls refused before or while sending (destination, redirect, body cap) |
//! | `vigil_task_restarts_total` | counter | task | a shared background task ended unexpectedly and was started again |
//! | `vigil_push_attempts_total` | counter | enforcement_point, outcome | RFC 8935 push attempts to enforcement points (`delivered`, `rejected`, `retry`, `refused`) |
//! | `vigil_event_times_clamped_total` | counter | source | event times beyond `events.max_future_skew_secs` taken as the time of receipt |
//! | `vigil_sets_retried_total` | counter | enforcement_point | push attempts that failed and will be retried |
//! | `vigil_sets_dead_lettered_total` | counter | enforcement_point | SETs moved to the dead letters |
//! | `vigil_push_rejections_total` | counter | err | enforcement points' 400 answers, by RFC 8935 code (`other` for anything else) |
//! | `vigil_streaming_refused_total` | counter | scope | long polls / SSE refused: the enforcement point's own cap (`enforcement_point`) or the shared one (`all`) |
//! | `vigil_audit_repeats_skipped_total` | counter | | decisions a replay made again after a crash, already in the audit log |

/// Accepted connections being served.
pub const HTTP_CONNECTIONS_OPEN: &str = "vigil_http_connections_open";
/// Connections closed at once because the server and its health reserve were full.
pub const HTTP_CONNECTIONS_REFUSED: &str = "vigil_http_connections_refused_total";
/// Connections served only the health routes.
pub const HTTP_RESERVE_CONNECTIONS: &str = "vigil_http_reserve_connections_total";
/// Failed `accept` calls.
pub const HTTP_ACCEPT_ERRORS: &str = "vigil_http_accept_errors_total";
/// Request bodies that did not arrive in time.
pub const HTTP_BODY_TIMEOUTS: &str = "vigil_http_body_timeouts_total";
/// TLS handshakes refused or timed out.
pub const TLS_HANDSHAKE_FAILURES: &str = "vigil_tls_handshake_failures_total";
/// Outbound calls refused by the destination policy, a redirect or a body cap (label `reason`).
pub const OUTBOUND_REFUSED: &str = "vigil_outbound_refused_total";
/// Shared background tasks restarted after ending unexpectedly (label `task`).
pub const TASK_RESTARTS: &str = "vigil_task_restarts_total";
/// Push attempts to enforcement points (labels `enforcement_point`, `outcome`).
pub const PUSH_ATTEMPTS: &str = "vigil_push_attempts_total";
/// Event times from the future taken as the time of receipt (label `source`).
pub const EVENT_TIMES_CLAMPED: &str = "vigil_event_times_clamped_total";

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
                Ok(handle) => Some(handle),
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
