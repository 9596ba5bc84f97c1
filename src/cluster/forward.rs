//! Answers from the owner. An API call about a principal another instance owns is sent on to that
//! instance (found in the [`Directory`]) with the caller's credential — the instances of one
//! cluster share their `[[clients]]` — and its answer is returned as it is: the caller gets the
//! owner's status after evaluation, not an acceptance that may later fail. A forwarded call
//! carries [`FORWARDED`] and is never forwarded again, so a stale directory cannot make a loop.

use std::sync::Arc;

use super::members::{Directory, Member};
use super::partition_of;

/// The header a forwarded call carries.
pub const FORWARDED: &str = "x-vigil-forwarded";
/// Most bytes of an owner's answer passed on.
const MAX_ANSWER: usize = 1 << 20;

/// Why a call could not be answered by its owner.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("no instance owns partition {0} right now (a rebalance is under way); retry shortly")]
    NoOwner(i32),
    #[error("the owning instance {instance} did not answer: {reason}")]
    Unreachable { instance: String, reason: String },
}

/// An owner's answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub content_type: Option<String>,
    /// Its `x-vigil-*` headers (an `auth_request` answer's status and reason).
    pub vigil_headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// Where a call goes on another instance: a path (its segments) and a query as the caller sent it.
#[derive(Debug, Clone, Copy)]
pub struct Call<'a> {
    pub segments: &'a [&'a str],
    pub query: Option<&'a str>,
}

/// The other instances, for calls this one does not own.
pub struct Peers {
    directory: Arc<Directory>,
    /// Follows no redirect and resolves names through `destinations`.
    client: reqwest::Client,
    /// An instance's URL comes from a topic: it passes the destination policy like any other.
    destinations: crate::outbound::Destinations,
    partitions: i32,
}

impl Peers {
    pub fn new(
        directory: Arc<Directory>,
        partitions: i32,
        client: reqwest::Client,
        destinations: crate::outbound::Destinations,
    ) -> Peers {
        Peers {
            directory,
            client,
            destinations,
            partitions,
        }
    }

    /// The live instance that owns `key`'s partition.
    pub fn owner_of(&self, key: &str) -> Result<Member, ForwardError> {
        let partition = partition_of(key, self.partitions);
        self.directory
            .owner_of(partition)
            .ok_or(ForwardError::NoOwner(partition))
    }

    /// The other live instances.
    pub fn others(&self) -> Vec<Member> {
        self.directory.others()
    }

    /// Sends `method` to the path of `call.segments` (each percent-encoded) and its query at
    /// `member`, with `body` (JSON) and the caller's `headers` (its credential, an
    /// `auth_request`'s `x-vigil-*`).
    pub async fn send(
        &self,
        member: &Member,
        method: reqwest::Method,
        call: &Call<'_>,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> Result<Answer, ForwardError> {
        self.send_within(member, method, call, headers, body, None)
            .await
    }

    /// [`Peers::send`], waiting up to `timeout` (`None`: the client's 5 s) for a long call.
    pub async fn send_within(
        &self,
        member: &Member,
        method: reqwest::Method,
        call: &Call<'_>,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
        timeout: Option<std::time::Duration>,
    ) -> Result<Answer, ForwardError> {
        let response = self
            .open(member, method, call, headers, body, timeout)
            .await?;
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let vigil_headers = response
            .headers()
            .iter()
            .filter(|(name, _)| name.as_str().starts_with("x-vigil-"))
            .filter_map(|(name, value)| Some((name.to_string(), value.to_str().ok()?.to_owned())))
            .collect();
        let body = crate::outbound::read_capped(response, MAX_ANSWER)
            .await
            .map_err(|e| unreachable(member, e.to_string()))?;
        Ok(Answer {
            status,
            content_type,
            vigil_headers,
            body,
        })
    }

    /// Starts the call [`Peers::send`] makes and returns the owner's response as it arrives (its
    /// body not yet read: an event stream is passed on as it comes). `timeout` replaces the
    /// client's 5 s for a long poll or an event stream.
    pub async fn open(
        &self,
        member: &Member,
        method: reqwest::Method,
        call: &Call<'_>,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
        timeout: Option<std::time::Duration>,
    ) -> Result<reqwest::Response, ForwardError> {
        let unreachable = |reason: String| unreachable(member, reason);
        let mut url = self
            .destinations
            .check_url(&member.url)
            .map_err(|e| unreachable(e.to_string()))?;
        url.path_segments_mut()
            .map_err(|()| unreachable(format!("not a base URL: {}", member.url)))?
            .pop_if_empty()
            .extend(call.segments);
        url.set_query(call.query);
        let mut request = self.client.request(method, url).header(FORWARDED, "1");
        if let Some(timeout) = timeout {
            request = request.timeout(timeout);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body);
        }
        let response = request
            .send()
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        metrics::counter!(crate::telemetry::CLUSTER_FORWARDED).increment(1);
        Ok(response)
    }
}

/// `member` did not answer, and why (an excerpt: the reason may hold remote text).
fn unreachable(member: &Member, reason: String) -> ForwardError {
    ForwardError::Unreachable {
        instance: member.instance.clone(),
        reason: crate::outbound::excerpt(&reason),
    }
}
