//! One managed stream's lifecycle at its transmitter: discover, create or adopt, reconcile with the
//! configuration, verify periodically, re-read status; and the operations the API and CLI ask for.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::{watch, Mutex};

use super::mgmt::{MgmtClient, MgmtError, StreamConfig};
use super::poll::{self, PollSettings};
use super::state::{StateError, StreamRecords};
use crate::config::{DeliveryMode, StreamManagement, TransmitterConfig};
use crate::discovery::{self, DiscoveryError};
use crate::events::EventKind;
use crate::intake::Intake;
use crate::liveness::Liveness;
use crate::receiver::Receiver;

const PUSH: &str = "urn:ietf:rfc:8935";
const POLL: &str = "urn:ietf:rfc:8936";

/// Why a management step failed.
#[derive(Debug, thiserror::Error)]
pub enum ManageError {
    #[error("discovery: {0}")]
    Discovery(#[from] DiscoveryError),
    #[error("{0}")]
    Mgmt(#[from] MgmtError),
    #[error("stream record: {0}")]
    State(#[from] StateError),
    #[error("the metadata's `{field}` is unusable: {reason}")]
    Metadata { field: &'static str, reason: String },
    #[error("no stream yet: it has not been created or adopted")]
    NoStream,
    #[error("recording the verification state: {0}")]
    Intake(String),
    #[error("credential: {0}")]
    Credential(#[from] super::CredentialError),
}

/// A managed stream.
pub struct StreamManager {
    pub(crate) config: TransmitterConfig,
    manage: StreamManagement,
    /// `endpoint_url` for push: where the transmitter reaches this stream.
    push_url: String,
    client: reqwest::Client,
    records: StreamRecords,
    intake: Intake,
    liveness: Arc<Liveness>,
    mgmt: Mutex<Option<MgmtClient>>,
    current: Mutex<Option<StreamConfig>>,
    /// What management and poll calls present: the fixed credential or OAuth tokens.
    credential: super::Credential,
}

impl StreamManager {
    pub fn new(
        config: TransmitterConfig,
        manage: StreamManagement,
        default_receiver_url: &str,
        client: reqwest::Client,
        records: StreamRecords,
        intake: Intake,
        liveness: Arc<Liveness>,
    ) -> Result<StreamManager, ManageError> {
        let base = manage
            .receiver_url
            .clone()
            .unwrap_or_else(|| default_receiver_url.to_owned());
        let push_url = format!("{}/ssf/push/{}", base.trim_end_matches('/'), config.stream);
        liveness.update(&config.stream, |l| {
            l.transmitter = config.name.clone();
            l.delivery = Some(
                match manage.delivery {
                    DeliveryMode::Push => "push",
                    DeliveryMode::Poll => "poll",
                }
                .into(),
            );
        });
        let credential = match &manage.oauth {
            Some(oauth) => super::Credential::OAuth(Arc::new(super::TokenSource::new(
                &config.name,
                client.clone(),
                oauth.clone(),
                &config.issuer,
            )?)),
            None => super::Credential::Fixed(manage.credential.clone()),
        };
        Ok(StreamManager {
            config,
            manage,
            push_url,
            client,
            records,
            intake,
            liveness,
            mgmt: Mutex::new(None),
            current: Mutex::new(None),
            credential,
        })
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn stream(&self) -> &str {
        &self.config.stream
    }

    /// Discovers the transmitter (fresh metadata every call) and checks what management needs.
    async fn connect(&self) -> Result<MgmtClient, ManageError> {
        let metadata = discovery::fetch_metadata(&self.client, &self.config.issuer).await?;
        for (field, value) in [
            ("configuration_endpoint", &metadata.configuration_endpoint),
            ("verification_endpoint", &metadata.verification_endpoint),
        ] {
            let Some(url) = value else {
                return Err(ManageError::Metadata {
                    field,
                    reason: "missing".into(),
                });
            };
            reqwest::Url::parse(url).map_err(|e| ManageError::Metadata {
                field,
                reason: e.to_string(),
            })?;
        }
        let wanted = match self.manage.delivery {
            DeliveryMode::Push => PUSH,
            DeliveryMode::Poll => POLL,
        };
        if !metadata.delivery_methods_supported.is_empty()
            && !metadata
                .delivery_methods_supported
                .iter()
                .any(|m| m == wanted)
        {
            return Err(ManageError::Metadata {
                field: "delivery_methods_supported",
                reason: format!("does not offer {wanted}"),
            });
        }
        let client = MgmtClient::new(
            self.client.clone(),
            metadata,
            self.credential.clone(),
            self.config.issuer.clone(),
            self.config.audiences.clone(),
            self.liveness.clock().clone(),
        );
        *self.mgmt.lock().await = Some(client.clone());
        Ok(client)
    }

    async fn mgmt(&self) -> Result<MgmtClient, ManageError> {
        if let Some(m) = self.mgmt.lock().await.clone() {
            return Ok(m);
        }
        self.connect().await
    }

    fn events_requested(&self) -> Vec<String> {
        if self.manage.events_requested.is_empty() {
            EventKind::ALL
                .iter()
                .filter(|k| !k.is_framework())
                .map(|k| k.uri())
                .collect()
        } else {
            self.manage.events_requested.clone()
        }
    }

    /// The receiver-supplied fields of Vigil's stream (SSF §8.1.1).
    pub(crate) fn desired(&self) -> Value {
        let delivery = match self.manage.delivery {
            DeliveryMode::Push => json!({
                "method": PUSH,
                "endpoint_url": self.push_url,
                // The stored credential (in cluster mode the cluster's: every instance accepts it).
                "authorization_header": self
                    .records
                    .get(&self.config.name)
                    .ok()
                    .and_then(|r| r.authorization)
                    .unwrap_or_else(|| self.config.authorization.clone()),
            }),
            DeliveryMode::Poll => json!({"method": POLL}),
        };
        let mut body = json!({"delivery": delivery, "events_requested": self.events_requested()});
        body["description"] = json!(self.manage.description.clone().unwrap_or_else(|| format!(
            "Vigil continuous access evaluation ({})",
            self.config.stream
        )));
        body
    }

    /// Whether an existing stream is the one Vigil would have created.
    fn is_ours(&self, config: &StreamConfig) -> bool {
        match self.manage.delivery {
            DeliveryMode::Push => {
                config.delivery_method() == PUSH && config.endpoint_url() == Some(&self.push_url)
            }
            DeliveryMode::Poll => config.delivery_method() == POLL,
        }
    }

    fn needs_update(&self, config: &StreamConfig) -> bool {
        let want: BTreeSet<String> = self.events_requested().into_iter().collect();
        let have: BTreeSet<String> = config.events_requested().into_iter().collect();
        want != have || !self.is_ours(config)
    }

    /// Creates or adopts the stream and brings it in line with the configuration. Idempotent:
    /// a known stream id is read back first; otherwise an existing stream of Vigil's is adopted
    /// (also when create answers 409); only then is one created.
    pub async fn ensure(&self) -> Result<StreamConfig, ManageError> {
        let mgmt = self.connect().await?;
        let mut record = self.records.get(&self.config.name)?;
        let mut found = None;
        let mut adopted = false;
        if let Some(id) = &record.stream_id {
            match mgmt.read(id).await {
                Ok(c) => found = Some(c),
                Err(e) if e.is_not_found() => {
                    tracing::warn!(transmitter = %self.config.name, stream_id = %id,
                        "the transmitter no longer knows Vigil's stream; creating a new one");
                }
                Err(e) => return Err(e.into()),
            }
        }
        if found.is_none() {
            found = self.adopt(&mgmt).await?;
            adopted = found.is_some();
        }
        // The push credential last sent to the transmitter by this call, if any.
        let mut sent: Option<String> = None;
        let mut created = false;
        let desired = self.desired();
        let config = match found {
            Some(c) => c,
            None => match mgmt.create(&desired).await {
                Ok(c) => {
                    created = true;
                    sent = desired["delivery"]["authorization_header"]
                        .as_str()
                        .map(str::to_owned);
                    c
                }
                Err(e) if e.is_conflict() => {
                    // One stream per receiver, and it exists: it is Vigil's whatever its delivery
                    // (the update below brings it in line).
                    adopted = true;
                    self.adopt_any(&mgmt).await?.ok_or(e)?
                }
                Err(e) => return Err(e.into()),
            },
        };
        if record.stream_id.as_deref() != Some(config.stream_id()) {
            record.stream_id = Some(config.stream_id().to_owned());
            self.records.put(&self.config.name, &record).await?;
        }
        // An adopted stream gets Vigil's delivery (its push credential cannot be read back), and
        // so does a push stream last given another credential than the current one (cluster
        // mode: the cluster's credential was replaced after the stream was set up).
        let push = self.manage.delivery == DeliveryMode::Push;
        let stale_credential =
            push && !created && !self.records.get(&self.config.name)?.credential_given();
        let config = if adopted || stale_credential || self.needs_update(&config) {
            let mut body = self.desired();
            body["stream_id"] = json!(config.stream_id());
            sent = body["delivery"]["authorization_header"]
                .as_str()
                .map(str::to_owned);
            match mgmt.update(&body, false).await? {
                Some(updated) => updated,
                None => config,
            }
        } else {
            config
        };
        if let (true, Some(sent)) = (push, sent) {
            let mut record = self.records.get(&self.config.name)?;
            if record.authorization.as_deref() == Some(sent.as_str()) && !record.credential_given()
            {
                record.give_credential();
                self.records.put(&self.config.name, &record).await?;
            }
        }
        tracing::info!(transmitter = %self.config.name, stream_id = %config.stream_id(),
            delivery = %config.delivery_method(), delivered = ?config.events_delivered(),
            "SSF stream ready");
        self.liveness.update(&self.config.stream, |l| {
            l.stream_id = Some(config.stream_id().to_owned());
            l.events_delivered = config.events_delivered();
            l.error = None;
        });
        self.refresh_status(&mgmt, config.stream_id()).await;
        *self.current.lock().await = Some(config.clone());
        Ok(config)
    }

    /// An existing stream at the transmitter that is Vigil's (same delivery), if any.
    async fn adopt(&self, mgmt: &MgmtClient) -> Result<Option<StreamConfig>, ManageError> {
        for v in mgmt.list().await? {
            let Ok(c) = mgmt.checked("list streams", v) else {
                continue;
            };
            // A push stream to this stream's push path is Vigil's even if the receiver's base URL
            // changed since; one to another path is another managed stream's (two transmitters
            // configured at one identity provider must not take each other's stream).
            let our_path = format!("/ssf/push/{}", self.config.stream);
            let pushes_here = self.manage.delivery == DeliveryMode::Push
                && c.delivery_method() == PUSH
                && c.endpoint_url().is_some_and(|u| u.ends_with(&our_path));
            if self.is_ours(&c) || pushes_here {
                tracing::info!(transmitter = %self.config.name, stream_id = %c.stream_id(),
                    "adopting an existing stream");
                return Ok(Some(c));
            }
        }
        Ok(None)
    }

    /// The first stream at the transmitter issued for Vigil (right `iss` and `aud`).
    async fn adopt_any(&self, mgmt: &MgmtClient) -> Result<Option<StreamConfig>, ManageError> {
        Ok(mgmt
            .list()
            .await?
            .into_iter()
            .find_map(|v| mgmt.checked("list streams", v).ok()))
    }

    async fn refresh_status(&self, mgmt: &MgmtClient, stream_id: &str) {
        if mgmt.metadata().status_endpoint.is_none() {
            return;
        }
        match mgmt.status(stream_id).await {
            Ok(s) => self.liveness.status(
                &self.config.stream,
                s["status"].as_str().unwrap_or("unknown"),
                s["reason"].as_str(),
            ),
            Err(e) => {
                tracing::warn!(transmitter = %self.config.name, error = %e, "cannot read stream status");
                self.liveness
                    .update(&self.config.stream, |l| l.error = Some(e.to_string()));
            }
        }
    }

    async fn stream_id(&self) -> Result<String, ManageError> {
        if let Some(c) = self.current.lock().await.as_ref() {
            return Ok(c.stream_id().to_owned());
        }
        self.records
            .get(&self.config.name)?
            .stream_id
            .ok_or(ManageError::NoStream)
    }

    /// Asks the transmitter for a verification event with a fresh state; the receiver accepts it
    /// only with that state (`invalid_state` otherwise).
    pub async fn verify(&self) -> Result<(), ManageError> {
        let mgmt = self.mgmt().await?;
        let id = self.stream_id().await?;
        let state = format!("{:032x}", rand::random::<u128>());
        self.intake
            .expect_verification_state(&self.config.stream, &state)
            .await
            .map_err(|e| ManageError::Intake(e.to_string()))?;
        if self.records.is_shared() {
            // Every instance must accept the event carrying it, wherever it is pushed.
            let mut record = self.records.get(&self.config.name)?;
            record.verification = Some(super::state::ExpectedVerification {
                stream: self.config.stream.clone(),
                state: state.clone(),
            });
            self.records.put(&self.config.name, &record).await?;
        }
        mgmt.verify(&id, &state).await?;
        self.liveness.verification_requested(
            &self.config.stream,
            Duration::from_secs(self.manage.verification_sla_secs),
        );
        Ok(())
    }

    /// The transmitter's view of the stream: configuration and status, plus Vigil's liveness.
    pub async fn describe(&self) -> Result<Value, ManageError> {
        let mgmt = self.mgmt().await?;
        let id = self.stream_id().await?;
        let config = mgmt.read(&id).await?;
        self.refresh_status(&mgmt, &id).await;
        Ok(json!({
            "transmitter": self.config.name,
            "stream": self.config.stream,
            "config": config.0,
            "liveness": self.liveness.get(&self.config.stream),
        }))
    }

    /// Asks the transmitter to enable, pause or disable the stream (SSF §8.1.2.2). `None` when it
    /// answered 202 (not decided yet).
    pub async fn set_status(
        &self,
        status: &str,
        reason: Option<&str>,
    ) -> Result<Option<Value>, ManageError> {
        let mgmt = self.mgmt().await?;
        let id = self.stream_id().await?;
        let answer = mgmt.set_status(&id, status, reason).await?;
        if let Some(s) = &answer {
            self.liveness.status(
                &self.config.stream,
                s["status"].as_str().unwrap_or("unknown"),
                s["reason"].as_str(),
            );
        }
        Ok(answer)
    }

    pub async fn add_subject(&self, subject: &Value) -> Result<(), ManageError> {
        let mgmt = self.mgmt().await?;
        let id = self.stream_id().await?;
        Ok(mgmt.add_subject(&id, subject, Some(true)).await?)
    }

    pub async fn remove_subject(&self, subject: &Value) -> Result<(), ManageError> {
        let mgmt = self.mgmt().await?;
        let id = self.stream_id().await?;
        Ok(mgmt.remove_subject(&id, subject).await?)
    }

    /// Deletes the stream at the transmitter and forgets it (the next start creates a new one).
    pub async fn delete(&self) -> Result<(), ManageError> {
        let mgmt = self.mgmt().await?;
        let id = self.stream_id().await?;
        mgmt.delete(&id).await?;
        let mut record = self.records.get(&self.config.name)?;
        record.stream_id = None;
        self.records.put(&self.config.name, &record).await?;
        *self.current.lock().await = None;
        self.liveness.update(&self.config.stream, |l| {
            l.stream_id = None;
            l.status = "deleted".into();
        });
        Ok(())
    }

    /// Keeps the stream alive until shutdown: ensure (retrying with backoff), start polling for a
    /// poll stream, then verify every interval (respecting `min_verification_interval` and 429),
    /// re-reading metadata and status every refresh interval.
    pub async fn run(
        self: Arc<Self>,
        receiver: Arc<Receiver>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut backoff = Duration::from_secs(1);
        let config = loop {
            match self.ensure().await {
                Ok(c) => break c,
                Err(e) => {
                    metrics::counter!(crate::telemetry::SSF_STREAM_SETUP_ERRORS,
                        "stream" => self.config.stream.clone())
                    .increment(1);
                    tracing::error!(transmitter = %self.config.name, error = %e,
                        retry_in_s = backoff.as_secs(), "SSF stream not set up");
                    self.liveness
                        .update(&self.config.stream, |l| l.error = Some(e.to_string()));
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.changed() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(60));
        };
        let mut tasks = Vec::new();
        if self.manage.delivery == DeliveryMode::Poll {
            // The poll request carries the management credential: only to the issuer's origin.
            let endpoint = config.endpoint_url().filter(|url| {
                crate::outbound::same_origin(url, &self.config.issuer)
                    .inspect_err(|e| {
                        tracing::error!(transmitter = %self.config.name, error = %e,
                            "the poll endpoint is not on the transmitter's origin; not polling")
                    })
                    .is_ok()
            });
            match (endpoint, receiver.transmitter(&self.config.stream)) {
                (Some(url), Some(t)) => tasks.push(tokio::spawn(poll::run(
                    receiver.clone(),
                    t,
                    self.client.clone(),
                    PollSettings {
                        endpoint_url: url.to_owned(),
                        credential: self.credential.clone(),
                        max_events: self.manage.poll_max_events,
                        timeout: Duration::from_secs(self.manage.poll_timeout_secs),
                    },
                    self.liveness.clone(),
                    shutdown.clone(),
                ))),
                _ => tracing::error!(transmitter = %self.config.name,
                    "poll stream without an endpoint_url; nothing will be received"),
            }
        }
        let verify_every = verify_interval(self.manage.verify_interval_secs, &config);
        let refresh_every = Duration::from_secs(self.manage.refresh_interval_secs.max(1));
        let mut next_verify = tokio::time::Instant::now();
        let mut next_refresh = tokio::time::Instant::now() + refresh_every;
        loop {
            let now = tokio::time::Instant::now();
            if now >= next_verify {
                next_verify = now + verify_every;
                self.check_verified(verify_every);
                match self.verify().await {
                    Ok(()) => {}
                    Err(ManageError::Mgmt(MgmtError::TooManyRequests { retry_after, .. })) => {
                        // `retry_after` is saturated where it is read (`MAX_RETRY_AFTER`).
                        next_verify = now + retry_after.max(Duration::from_secs(1));
                    }
                    Err(e) => {
                        tracing::warn!(transmitter = %self.config.name, error = %e, "verification request failed");
                        self.liveness
                            .update(&self.config.stream, |l| l.error = Some(e.to_string()));
                    }
                }
            }
            if now >= next_refresh {
                next_refresh = now + refresh_every;
                // Cluster mode: the cluster's push credential was replaced since the stream was
                // set up; the transmitter is given the current one.
                let stale = self.manage.delivery == DeliveryMode::Push
                    && self
                        .records
                        .get(&self.config.name)
                        .is_ok_and(|r| !r.credential_given());
                if stale {
                    if let Err(e) = self.ensure().await {
                        tracing::warn!(transmitter = %self.config.name, error = %e, "the stream's push credential not brought up to date");
                    }
                }
                match self.connect().await {
                    Ok(m) => {
                        if let Ok(id) = self.stream_id().await {
                            self.refresh_status(&m, &id).await;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(transmitter = %self.config.name, error = %e, "metadata refresh failed; keeping the last")
                    }
                }
            }
            // The moment a stream's SLA runs out is assessed then, not at the next scrape.
            let sla_due = self.liveness.assess().map(|due_ms| {
                let wait = due_ms.saturating_sub(self.liveness.clock().now_ms()).max(0);
                tokio::time::Instant::now()
                    + Duration::from_millis(u64::try_from(wait).unwrap_or(0) + 1)
            });
            let wake = next_verify
                .min(next_refresh)
                .min(sla_due.unwrap_or(next_refresh));
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => {}
                _ = shutdown.changed() => break,
            }
        }
        for t in tasks {
            let _ = t.await;
        }
    }

    /// Alert when the last requested verification was not answered within an interval.
    fn check_verified(&self, interval: Duration) {
        let Some(live) = self.liveness.get(&self.config.stream) else {
            return;
        };
        let (Some(asked), answered) = (live.verification_requested_ms, live.last_verified_ms)
        else {
            return;
        };
        let overdue = self.liveness.clock().now_ms() - asked > interval.as_millis() as i64;
        if overdue && answered.is_none_or(|a| a < asked) {
            metrics::counter!(crate::telemetry::SSF_STREAM_VERIFICATION_MISSED,
                "stream" => self.config.stream.clone())
            .increment(1);
            tracing::warn!(alert = true, transmitter = %self.config.name, stream = %self.config.stream,
                "SSF stream stopped verifying: the last verification request got no event");
        }
    }
}

/// How often to ask for verification: the configured interval, no faster than the transmitter's
/// `min_verification_interval` (saturated to a week where it is read), at least a second.
pub fn verify_interval(configured_secs: u64, config: &StreamConfig) -> Duration {
    Duration::from_secs(
        configured_secs
            .max(config.min_verification_interval())
            .clamp(
                1,
                super::mgmt::MAX_VERIFICATION_INTERVAL_SECS.max(configured_secs),
            ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transmitters_interval_is_saturated() {
        let cfg =
            |v: Value| StreamConfig(json!({"stream_id": "s", "min_verification_interval": v}));
        assert_eq!(
            verify_interval(60, &cfg(json!(u64::MAX))),
            Duration::from_secs(super::super::mgmt::MAX_VERIFICATION_INTERVAL_SECS)
        );
        assert_eq!(
            verify_interval(60, &cfg(json!(10))),
            Duration::from_secs(60)
        );
        assert_eq!(
            verify_interval(60, &cfg(json!(600))),
            Duration::from_secs(600)
        );
        assert_eq!(
            verify_interval(0, &cfg(json!("soon"))),
            Duration::from_secs(1)
        );
        // Adding it to the clock cannot overflow.
        let _ = tokio::time::Instant::now() + verify_interval(60, &cfg(json!(u64::MAX)));
    }
}
