//! Poll and SSE on any instance: a call for a stream whose partition another instance owns is
//! passed on to that instance — the stream's deliverer, which holds its outbox — with the
//! enforcement point's credential and `Last-Event-ID`, and its answer streamed back as it comes.

use std::sync::Arc;

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::future::BoxFuture;

use super::forward::{Call, ForwardError, Peers, FORWARDED};
use crate::transmitter::mgmt::{ForwardedCall, StreamForwarder};

/// The cluster's [`StreamForwarder`].
pub struct StreamCalls {
    peers: Arc<Peers>,
}

impl StreamCalls {
    pub fn new(peers: Arc<Peers>) -> StreamCalls {
        StreamCalls { peers }
    }
}

/// The request headers passed on: the credential, what SSE resumes from, what is accepted.
const PASSED_ON: [&str; 3] = ["authorization", "last-event-id", "accept"];

impl StreamForwarder for StreamCalls {
    fn forward(
        &self,
        stream: &str,
        headers: &HeaderMap,
        call: ForwardedCall,
    ) -> BoxFuture<'static, Response> {
        if headers.contains_key(FORWARDED) {
            let answer = crate::error_body::error(
                StatusCode::MISDIRECTED_REQUEST,
                "not_owner",
                "this instance does not deliver the stream (its partition moved); retry",
            );
            return Box::pin(async move { answer });
        }
        let passed: Vec<(String, String)> = PASSED_ON
            .iter()
            .filter_map(|name| {
                let value = headers.get(*name)?.to_str().ok()?;
                Some(((*name).to_owned(), value.to_owned()))
            })
            .collect();
        let (peers, stream) = (self.peers.clone(), stream.to_owned());
        Box::pin(async move {
            let owner = match peers.owner_of(&stream) {
                Ok(owner) => owner,
                Err(e) => return unavailable(&e),
            };
            let (method, kind) = if call.sse {
                (reqwest::Method::GET, "sse")
            } else {
                (reqwest::Method::POST, "poll")
            };
            let segments = ["ssf", kind, stream.as_str()];
            let headers: Vec<(&str, &str)> = passed
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_str()))
                .collect();
            let body = (!call.sse).then_some(call.body);
            let response = match peers
                .open(
                    &owner,
                    method,
                    &Call {
                        segments: &segments,
                        query: None,
                    },
                    &headers,
                    body,
                    Some(call.timeout),
                )
                .await
            {
                Ok(r) => r,
                Err(e) => return unavailable(&e),
            };
            let status =
                StatusCode::from_u16(response.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            let mut answer = Response::builder().status(status);
            for name in [
                "content-type",
                "cache-control",
                "retry-after",
                "www-authenticate",
            ] {
                if let Some(value) = response.headers().get(name) {
                    answer = answer.header(name, value.as_bytes());
                }
            }
            let chunks = futures_util::stream::unfold(response, |mut response| async move {
                match response.chunk().await {
                    Ok(Some(bytes)) => Some((Ok::<_, std::io::Error>(bytes), response)),
                    Ok(None) => None,
                    Err(e) => Some((Err(std::io::Error::other(e)), response)),
                }
            });
            answer
                .body(axum::body::Body::from_stream(chunks))
                .unwrap_or_else(|e| {
                    crate::error_body::error(StatusCode::BAD_GATEWAY, "bad_gateway", e.to_string())
                })
        })
    }
}

/// No instance could answer for the stream right now: 503, retry shortly.
fn unavailable(e: &ForwardError) -> Response {
    crate::error_body::refusal(
        StatusCode::SERVICE_UNAVAILABLE,
        "not_owner",
        &e.to_string(),
        std::time::Duration::from_secs(1),
    )
    .into_response()
}
