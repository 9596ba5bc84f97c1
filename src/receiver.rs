//! The SSF receiver's validation pipeline, shared by every way a SET arrives (RFC 8935 push now,
//! RFC 8936 poll later). It implements the order of `standards.md` §11:
//!
//! 1. transport credential (per stream)                → `authentication_failed` / `access_denied`
//! 2. (push only) media type and body                  → `invalid_request` (in `push.rs`)
//! 3. compact JWS, `typ`, `alg` in the allow-list       → `invalid_request` / `invalid_key`
//! 4. `kid` → cached JWKS (one refetch on miss) → sig   → `invalid_key`
//! 5. `iss`                                             → `invalid_issuer`
//! 6. `aud`                                             → `invalid_audience`
//! 7. required / forbidden claims, one event, subject,
//!    event payload                                     → `invalid_request`
//! 8. redelivery of a recorded `jti`                    → accepted again, nothing written
//! 9. critical subject members Vigil cannot process     → accepted and discarded (SSF §3.6)
//! 10. verification `state`                             → `invalid_state`
//! 11. durable record, then hand-off to the next stage  → accepted
//!
//! Nothing is written for a rejected SET, and a SET is acknowledged only after its record is on disk.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use subtle::ConstantTimeEq;

use crate::config::TransmitterConfig;
use crate::events::Event;
use crate::intake::{HandOn, Intake, RecordOutcome};
use crate::jose::{self, JwsError};
use crate::jwks::{KeyError, KeyStore};
use crate::liveness::Liveness;
use crate::set::{self, ErrorCode, SetError, SetRules};
use crate::signal::{Signal, SignalSource};

/// A configured transmitter with its live key cache.
pub struct Transmitter {
    pub config: TransmitterConfig,
    pub keys: Arc<KeyStore>,
    /// `auth::digest` of the push credential (`config.authorization`, or the cluster's current one
    /// for a managed stream: [`Transmitter::set_credential`]), computed once per credential: every
    /// push compares against it.
    credential_digest: std::sync::RwLock<[u8; 32]>,
}

impl Transmitter {
    pub fn new(config: TransmitterConfig, keys: Arc<KeyStore>) -> Transmitter {
        let credential_digest = crate::auth::digest(&config.authorization);
        Transmitter {
            config,
            keys,
            credential_digest: std::sync::RwLock::new(credential_digest),
        }
    }

    /// Cluster mode: the push credential of a stream Vigil keeps at this transmitter is the
    /// cluster's, which an instance may replace (instances that started together each published
    /// one; the last is every instance's).
    pub fn set_credential(&self, authorization: &str) {
        let digest = crate::auth::digest(authorization);
        match self.credential_digest.write() {
            Ok(mut d) => *d = digest,
            Err(p) => *p.into_inner() = digest,
        }
    }

    fn credential_matches(&self, presented: &[u8; 32]) -> bool {
        let digest = match self.credential_digest.read() {
            Ok(d) => *d,
            Err(p) => *p.into_inner(),
        };
        bool::from(presented.ct_eq(&digest))
    }

    /// Critical members from config and from the transmitter's metadata (SSF §3.6).
    fn critical_members(&self) -> Vec<String> {
        let mut all = self.config.critical_subject_members.clone();
        for m in self.keys.discovered_critical_members() {
            if !all.contains(&m) {
                all.push(m);
            }
        }
        all
    }
}

/// A SET the receiver accepted (every variant is acknowledged with 202 / a poll ack).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accepted {
    /// Newly recorded under this intake sequence number.
    Recorded { seq: u64, event_type: &'static str },
    /// Already recorded earlier; answered exactly as the first delivery was.
    Duplicate { seq: u64, event_type: &'static str },
    /// Valid, but discarded because a critical subject member cannot be processed (SSF §3.6).
    Discarded {
        event_type: &'static str,
        members: Vec<String>,
    },
}

impl Accepted {
    pub fn outcome_label(&self) -> &'static str {
        match self {
            Accepted::Recorded { .. } => "accepted",
            Accepted::Duplicate { .. } => "duplicate",
            Accepted::Discarded { .. } => "discarded",
        }
    }
    pub fn event_type(&self) -> &'static str {
        match self {
            Accepted::Recorded { event_type, .. }
            | Accepted::Duplicate { event_type, .. }
            | Accepted::Discarded { event_type, .. } => event_type,
        }
    }
}

/// Why a SET was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The SET (or its delivery) is bad: answered with an RFC 8935 error. `event_type` is known
    /// when the rejection happened after the event was parsed.
    #[error("{error}")]
    Set {
        error: SetError,
        event_type: &'static str,
    },
    /// The transmitter's keys are not available yet: try again later (503).
    #[error("temporarily unavailable: {0}")]
    Unavailable(String),
    /// Vigil could not record the SET (500); nothing was acknowledged.
    #[error("could not record the SET: {0}")]
    Storage(String),
    /// The log that records SETs cannot take this one now (503 with `Retry-After`): cluster
    /// mode's brokers did not take it in time, or the intake log is at `intake.max_bytes` with
    /// nothing processed to drop. Nothing was acknowledged.
    #[error("the signals log is not available: {0}")]
    LogUnavailable(String),
    /// The transmitter is over its rate limit (429 with `Retry-After`); nothing was read.
    #[error("rate limit exceeded; retry in {0:?}")]
    RateLimited(std::time::Duration),
}

impl Rejection {
    fn set(err: ErrorCode, description: impl Into<String>) -> Rejection {
        Rejection::Set {
            error: SetError::new(err, description),
            event_type: "none",
        }
    }

    pub fn outcome_label(&self) -> &'static str {
        match self {
            Rejection::Set { error, .. } => error.err.as_str(),
            Rejection::Unavailable(_) => "unavailable",
            Rejection::Storage(_) => "storage_error",
            Rejection::LogUnavailable(_) => "log_unavailable",
            Rejection::RateLimited(_) => "rate_limited",
        }
    }

    pub fn event_type(&self) -> &'static str {
        match self {
            Rejection::Set { event_type, .. } => event_type,
            _ => "none",
        }
    }
}

/// The receiver: transmitters by stream, durable intake, and the hand-off channel.
pub struct Receiver {
    by_stream: HashMap<String, Arc<Transmitter>>,
    intake: Intake,
    next: HandOn,
    liveness: Arc<Liveness>,
    max_future_skew_secs: u64,
    /// Cluster mode: validated signals go to the signals topic instead of local intake.
    cluster: Option<Arc<crate::cluster::ClusterIntake>>,
}

impl Receiver {
    pub fn new(
        transmitters: Vec<Arc<Transmitter>>,
        intake: Intake,
        next: HandOn,
        liveness: Arc<Liveness>,
    ) -> Receiver {
        let by_stream = transmitters
            .into_iter()
            .map(|t| (t.config.stream.clone(), t))
            .collect();
        Receiver {
            by_stream,
            intake,
            next,
            liveness,
            max_future_skew_secs: crate::config::EventsConfig::default().max_future_skew_secs,
            cluster: None,
        }
    }

    /// Cluster mode: records validated signals on the signals topic, for their principal's owner.
    pub fn with_cluster(mut self, cluster: Arc<crate::cluster::ClusterIntake>) -> Receiver {
        self.cluster = Some(cluster);
        self
    }

    /// How far ahead of the clock an event time may be (`events.max_future_skew_secs`).
    pub fn with_max_future_skew(mut self, secs: u64) -> Receiver {
        self.max_future_skew_secs = secs;
        self
    }

    /// The transmitter behind a stream name.
    pub fn transmitter(&self, stream: &str) -> Option<Arc<Transmitter>> {
        self.by_stream.get(stream).cloned()
    }

    /// The inbound streams' liveness.
    pub fn liveness(&self) -> &Arc<Liveness> {
        &self.liveness
    }

    pub fn transmitters(&self) -> impl Iterator<Item = &Arc<Transmitter>> {
        self.by_stream.values()
    }

    /// Whether the next stage is still consuming.
    pub fn pipeline_running(&self) -> bool {
        !self.next.is_closed()
    }

    /// Step 1: the transport credential. `presented` is the raw `Authorization` header value.
    ///
    /// An unknown stream is answered like a wrong credential, so stream names cannot be probed. A
    /// credential that belongs to *another* stream authenticates its transmitter but does not
    /// authorize it here: `access_denied`.
    pub fn authenticate(
        &self,
        stream: &str,
        presented: Option<&[u8]>,
    ) -> Result<Arc<Transmitter>, Rejection> {
        let Some(presented) = presented else {
            return Err(Rejection::set(
                ErrorCode::AuthenticationFailed,
                "the request has no Authorization header",
            ));
        };
        // Compared as digests: equal lengths, so the credential's length does not leak.
        let presented = crate::auth::digest(presented);
        let matches = |t: &Transmitter| t.credential_matches(&presented);
        if let Some(t) = self.by_stream.get(stream) {
            if matches(t) {
                return Ok(t.clone());
            }
        }
        let belongs_elsewhere = self
            .by_stream
            .values()
            .any(|t| t.config.stream != stream && matches(t));
        if belongs_elsewhere && self.by_stream.contains_key(stream) {
            return Err(Rejection::set(
                ErrorCode::AccessDenied,
                "this transmitter is not authorized to push to this stream",
            ));
        }
        Err(Rejection::set(
            ErrorCode::AuthenticationFailed,
            "the transmitter could not be authenticated for this stream",
        ))
    }

    /// Steps 3–11 for one compact SET from an authenticated transmitter.
    pub async fn receive(&self, t: &Transmitter, token: &str) -> Result<Accepted, Rejection> {
        let received_at_ms = self.liveness.clock().now_ms();
        let parse = if t.config.tolerate.legacy_risc {
            jose::parse_compact_untyped
        } else {
            jose::parse_compact
        };
        let jws = parse(token, &t.config.algorithms).map_err(|e: JwsError| {
            let code = if e.is_key_problem() {
                ErrorCode::InvalidKey
            } else {
                ErrorCode::InvalidRequest
            };
            Rejection::set(code, e.to_string())
        })?;

        let started = Instant::now();
        let verified = t.keys.verify(&jws).await;
        metrics::histogram!(crate::telemetry::SET_VERIFY_SECONDS, "stream" => t.config.stream.clone())
            .record(started.elapsed().as_secs_f64());
        verified.map_err(|e| match e {
            KeyError::Unavailable(why) => Rejection::Unavailable(why),
            other => Rejection::set(ErrorCode::InvalidKey, other.to_string()),
        })?;

        let rules = SetRules {
            issuer: &t.config.issuer,
            audiences: &t.config.audiences,
            legacy_subjects: t.config.legacy_subjects,
            tolerate: t.config.tolerate,
        };
        let mut validated = set::validate_claims(&jws.payload, rules).map_err(|error| {
            let event_type = "none";
            Rejection::Set { error, event_type }
        })?;
        if jws.typ_missing {
            validated.tolerated.push("missing_typ");
        }
        let event_type = validated.event.metric_label();
        let reject = |err: ErrorCode, description: String| Rejection::Set {
            error: SetError::new(err, description),
            event_type,
        };

        // Step 8: a redelivery gets the first delivery's answer, whatever has changed since.
        match self.intake.lookup_jti(&validated.iss, &validated.jti) {
            Ok(Some(seq)) => return Ok(Accepted::Duplicate { seq, event_type }),
            Ok(None) => {}
            Err(e) => return Err(Rejection::Storage(e.to_string())),
        }

        let unprocessable = validated
            .subject
            .unprocessable_critical_members(&t.critical_members());
        if !unprocessable.is_empty() {
            tracing::warn!(
                stream = %t.config.stream, jti = %validated.jti, members = ?unprocessable,
                "SET discarded: critical subject members Vigil cannot process (SSF §3.6)"
            );
            return Ok(Accepted::Discarded {
                event_type,
                members: unprocessable,
            });
        }

        if let Event::Verification(v) = &validated.event {
            if let Some(state) = &v.state {
                let asked = self
                    .intake
                    .expected_verification_states(&t.config.stream)
                    .map_err(|e| Rejection::Storage(e.to_string()))?;
                match asked.iter().position(|a| a == state) {
                    Some(0) => {}
                    Some(_) if t.config.tolerate.late_verification => {
                        validated.tolerated.push("late_verification");
                    }
                    _ => {
                        return Err(reject(
                            ErrorCode::InvalidState,
                            if t.config.tolerate.late_verification {
                                "the verification state matches none of the last requests".into()
                            } else {
                                "the verification state does not match the last one requested"
                                    .into()
                            },
                        ))
                    }
                }
            }
        }
        // Every deviation accepted is counted, once the SET is otherwise acceptable.
        for deviation in &validated.tolerated {
            metrics::counter!(crate::telemetry::SSF_TOLERATED,
                "transmitter" => t.config.name.clone(), "deviation" => *deviation)
            .increment(1);
        }

        // Liveness: the stream delivers; a verification with the requested state (checked above)
        // proves it end to end; stream-updated carries the transmitter's status.
        let stream = &t.config.stream;
        self.liveness.saw_event(stream);
        match &validated.event {
            Event::Verification(v) if v.state.is_some() => self.liveness.verified(stream),
            Event::StreamUpdated(u) => {
                self.liveness
                    .status(stream, u.status.as_str(), u.reason.as_deref())
            }
            _ => {}
        }
        let source = SignalSource::SsfPush {
            transmitter: t.config.name.clone(),
            stream: t.config.stream.clone(),
        };
        let mut signal = Signal::from_set(validated, source, received_at_ms);
        // Clamped before it is recorded, so a replay reads the same time.
        signal.clamp_future_event_time(received_at_ms as f64 / 1000.0, self.max_future_skew_secs);
        self.record(signal, token, event_type).await
    }

    /// Records an accepted signal — on the signals topic in cluster mode, else in intake and
    /// then handed to the next stage — and answers how.
    async fn record(
        &self,
        signal: Signal,
        token: &str,
        event_type: &'static str,
    ) -> Result<Accepted, Rejection> {
        if let Some(cluster) = &self.cluster {
            // The brokers' acknowledgement is the record. A copy received again (here or on
            // another instance) is appended again and applied by the owner with no further
            // effect, so it is answered like the first.
            return match cluster.append(&signal, token).await {
                Ok(offset) => Ok(Accepted::Recorded {
                    seq: offset,
                    event_type,
                }),
                Err(e) => Err(Rejection::LogUnavailable(e.to_string())),
            };
        }
        // Intake's writer hands a newly recorded signal on to the next stage.
        match self
            .intake
            .record_and_hand_on(signal, token, &self.next)
            .await
        {
            Ok(RecordOutcome::Duplicate(seq)) => Ok(Accepted::Duplicate { seq, event_type }),
            Ok(RecordOutcome::Recorded(seq)) => Ok(Accepted::Recorded { seq, event_type }),
            Err(e) if e.is_full() => Err(Rejection::LogUnavailable(e.to_string())),
            Err(e) => Err(Rejection::Storage(e.to_string())),
        }
    }

    /// The transmitter that may ask for OAuth Global Token Revocation with `presented` (its
    /// `authorization`, compared in constant time), if any.
    pub fn authenticate_revoker(&self, presented: Option<&[u8]>) -> Option<Arc<Transmitter>> {
        // Compared as digests, as pushes are: the credential's length does not leak.
        let presented = crate::auth::digest(presented?);
        self.by_stream
            .values()
            .filter(|t| t.config.global_token_revocation)
            .find(|t| t.credential_matches(&presented))
            .cloned()
    }

    /// Records an OAuth Global Token Revocation of `subject` asked by `t` (the request `body`
    /// kept as its raw record) as a signal of Vigil's own `global-token-revocation` type, at the
    /// time of receipt.
    pub async fn global_token_revocation(
        &self,
        t: &Transmitter,
        subject: crate::subject::SubjectId,
        body: &str,
    ) -> Result<Accepted, Rejection> {
        let received_at_ms = self.liveness.clock().now_ms();
        let now = received_at_ms as f64 / 1000.0;
        let event = crate::events::Event::GlobalTokenRevocation(crate::events::RiscCommon {
            common: crate::events::CaepCommon {
                event_timestamp: Some(now),
                ..crate::events::CaepCommon::default()
            },
        });
        let signal = Signal {
            seq: 0,
            event_time: now,
            source: SignalSource::SsfPush {
                transmitter: t.config.name.clone(),
                stream: t.config.stream.clone(),
            },
            iss: t.config.issuer.clone(),
            jti: format!("gtr-{:032x}", rand::random::<u128>()),
            txn: None,
            event_uri: crate::events::EventKind::GlobalTokenRevocation.uri(),
            event,
            subject,
            iat: now,
            received_at_ms,
            attributes: serde_json::Map::new(),
            ttl_secs: None,
        };
        self.record(
            signal,
            body,
            crate::events::EventKind::GlobalTokenRevocation.name(),
        )
        .await
    }
}
