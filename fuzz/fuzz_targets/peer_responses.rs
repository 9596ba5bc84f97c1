//! What enforcement points and transmitters answer Vigil's outbound calls: a push response
//! (status, `Retry-After`, a 400's body) and a stream configuration from a transmitter
//! (`min_verification_interval`, `Retry-After` of a 429). None of it may panic — a review found a
//! `Retry-After` of 2^64-1 panicking the one task that delivered for every enforcement point — and
//! every delay derived from it is bounded, so adding it to a clock cannot overflow.
#![no_main]

use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use reqwest::header::{HeaderMap, HeaderValue, RETRY_AFTER};
use vigil::ssf_client::mgmt::{StreamConfig, MAX_RETRY_AFTER};
use vigil::transmitter::push::{classify, Attempt};

const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// The time an HTTP-date `Retry-After` is read against (fixed: a fuzz run must be repeatable).
fn now() -> std::time::SystemTime {
    std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let status = u16::from_be_bytes([data[0], data[1]]) % 600;
    let split = (data[2] as usize).min(data.len() - 3);
    let (retry, body) = data[3..].split_at(split);

    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_bytes(retry) {
        headers.insert(RETRY_AFTER, v);
    }
    match classify(status, &headers, Some(body), MAX_BACKOFF, now()) {
        Attempt::Retry {
            after: Some(after), ..
        } => {
            assert!(after <= MAX_BACKOFF);
            let _ = tokio::time::Instant::now() + after;
        }
        Attempt::Rejected(why) | Attempt::Retry { why, .. } => {
            assert!(why.len() < 400, "a peer's text reached a log unbounded");
        }
        Attempt::Delivered => {}
    }
    if let Ok(text) = std::str::from_utf8(retry) {
        let _ = vigil::outbound::parse_retry_after(text, SystemTime::now());
        if let Some(after) = vigil::outbound::retry_after(&headers, MAX_RETRY_AFTER, now()) {
            assert!(after <= MAX_RETRY_AFTER);
        }
    }
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
        let config = StreamConfig(v);
        let every = vigil::ssf_client::manager::verify_interval(3600, &config);
        let _ = tokio::time::Instant::now() + every;
        let _ = (config.stream_id(), config.events_delivered(), config.aud());
    }
});
