//! The RFC 8936 poll client: one long-poll loop per poll stream. Every returned SET goes through the
//! receiver's full validation; a valid one is durably recorded **before** its `jti` is put in the
//! next request's `ack`; a rejected one goes in `setErrs` with its RFC 8935 code; one Vigil could
//! not record (store or keys unavailable) is neither, so the transmitter sends it again. Acks not
//! yet sent when Vigil stops are simply lost, and the transmitter's redelivery is answered as a
//! duplicate: nothing is acknowledged that was not recorded.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value};
use tokio::sync::watch;

use crate::liveness::Liveness;
use crate::receiver::{Receiver, Rejection, Transmitter};

/// The largest poll response read (`maxEvents` SETs of a few KiB each, with room).
const MAX_POLL_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

/// Where and how to poll.
#[derive(Debug, Clone)]
pub struct PollSettings {
    pub endpoint_url: String,
    /// The `Authorization` value presented to the transmitter.
    pub credential: super::Credential,
    pub max_events: u32,
    /// How long one long poll may take (the HTTP timeout is a little longer).
    pub timeout: Duration,
}

/// What one response's SETs came to.
#[derive(Debug, Default)]
struct Answers {
    ack: Vec<String>,
    set_errs: Map<String, Value>,
}

/// Polls until shutdown.
pub async fn run(
    receiver: Arc<Receiver>,
    transmitter: Arc<Transmitter>,
    client: reqwest::Client,
    settings: PollSettings,
    liveness: Arc<Liveness>,
    mut shutdown: watch::Receiver<bool>,
) {
    let stream = transmitter.config.stream.clone();
    let mut answers = Answers::default();
    let mut more = false;
    let mut backoff = Duration::from_millis(500);
    let mut retried_unauthorized = false;
    tracing::info!(stream = %stream, url = %settings.endpoint_url, "polling SSF stream (RFC 8936)");
    loop {
        if *shutdown.borrow() {
            break;
        }
        let body = json!({
            "maxEvents": settings.max_events,
            "returnImmediately": more,
            "ack": answers.ack,
            "setErrs": answers.set_errs,
        });
        let parsed = match settings.credential.header().await {
            Err(e) => Err(format!("no credential to poll with: {e}")),
            Ok(credential) => {
                let request = client
                    .post(&settings.endpoint_url)
                    .header("authorization", &credential)
                    .header("accept", "application/json")
                    // RFC 8936 §2.6: the `description`s in `setErrs` are English.
                    .header("content-language", "en")
                    .timeout(settings.timeout + Duration::from_secs(5))
                    .json(&body)
                    .send();
                let response = tokio::select! {
                    r = request => r,
                    _ = shutdown.changed() => break,
                };
                match response {
                    Ok(r) if r.status().is_success() => {
                        match crate::outbound::read_capped(r, MAX_POLL_RESPONSE_BYTES).await {
                            Ok(body) => {
                                serde_json::from_slice::<Value>(&body).map_err(|e| e.to_string())
                            }
                            Err(e) => Err(e.to_string()),
                        }
                    }
                    // An access token the transmitter no longer takes: once, ask again with a
                    // new one at once (the answers are kept).
                    Ok(r)
                        if r.status() == reqwest::StatusCode::UNAUTHORIZED
                            && !retried_unauthorized
                            && settings.credential.rejected(&credential) =>
                    {
                        retried_unauthorized = true;
                        continue;
                    }
                    Ok(r) => Err(format!("HTTP {}", r.status())),
                    Err(e) => Err(crate::outbound::excerpt(&e.to_string())),
                }
            }
        };
        let reply = match parsed {
            Ok(v) => v,
            Err(e) => {
                // The answers are kept and sent with the next request.
                metrics::counter!(crate::telemetry::SSF_POLL_ERRORS, "stream" => stream.clone())
                    .increment(1);
                tracing::warn!(stream = %stream, error = %e, retry_in_ms = backoff.as_millis() as u64,
                    "poll failed");
                liveness.update(&stream, |l| l.error = Some(format!("poll: {e}")));
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => break,
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        backoff = Duration::from_millis(500);
        retried_unauthorized = false;
        // The transmitter has the answers now.
        answers = Answers::default();
        more = reply["moreAvailable"].as_bool().unwrap_or(false);
        let Some(sets) = reply["sets"].as_object() else {
            tracing::warn!(stream = %stream, "poll response without `sets`");
            continue;
        };
        for (jti, token) in sets {
            let Some(token) = token.as_str() else {
                answers.set_errs.insert(
                    jti.clone(),
                    json!({"err": "invalid_request", "description": "the SET is not a string"}),
                );
                continue;
            };
            let result = receiver.receive(&transmitter, token).await;
            let (outcome, event_type) = match &result {
                Ok(a) => (a.outcome_label(), a.event_type()),
                Err(r) => (r.outcome_label(), r.event_type()),
            };
            metrics::counter!(crate::telemetry::SETS_RECEIVED, "stream" => stream.clone(),
                "event_type" => event_type, "outcome" => outcome)
            .increment(1);
            match result {
                Ok(_) => answers.ack.push(jti.clone()),
                Err(Rejection::Set { error, .. }) => {
                    tracing::warn!(stream = %stream, jti, err = error.err.as_str(),
                        description = %error.description, "polled SET rejected");
                    answers.set_errs.insert(
                        jti.clone(),
                        json!({"err": error.err.as_str(), "description": error.description}),
                    );
                }
                Err(e) => {
                    // Not recorded and not refused: leave it for redelivery.
                    tracing::warn!(stream = %stream, jti, error = %e, "polled SET left for redelivery");
                }
            }
        }
        // Answers go out with the next request; with nothing more waiting, that request is a long
        // poll, so acknowledge at once instead of holding the acks for its whole wait.
        if !more && (!answers.ack.is_empty() || !answers.set_errs.is_empty()) {
            more = true;
        }
    }
    tracing::info!(stream = %stream, "poll loop stopped");
}
