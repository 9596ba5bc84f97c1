//! Calls Vigil makes to URLs other parties chose: enforcement points' push endpoints, what a
//! transmitter's metadata names (JWKS, stream management, poll). Every such URL is hostile until
//! checked, so this module is the one place that decides
//! - where Vigil may connect ([`Destinations`]): `https` only, plain `http` only to loopback and
//!   only when configured for development; never link-local (cloud metadata services), unspecified,
//!   multicast or broadcast addresses, nor loopback unless configured; the check runs on the URL
//!   *and* on every address a host name resolves to ([`Destinations::resolver`]), so a name that
//!   resolves to `169.254.169.254` is refused like the literal;
//! - that a redirect is followed only within the same origin ([`same_origin_redirects`]): an
//!   `https` key URL redirected to plain `http` or to another host is an error, not a fetch;
//! - that a response body is capped while it streams ([`read_capped`]), not after it was buffered;
//! - how a `Retry-After` value is read ([`retry_after`]): delta-seconds or HTTP-date, saturated to
//!   a configured ceiling before any arithmetic;
//! - what of a remote body may reach a log or an API answer ([`excerpt`]).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use reqwest::Url;

/// Why an outbound call was refused or failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OutboundError {
    #[error("`{0}` is not a URL")]
    NotUrl(String),
    #[error("scheme `{0}` is not allowed (https only; http only to loopback when configured)")]
    Scheme(String),
    #[error("destination {0} is not allowed ({1})")]
    Destination(String, &'static str),
    #[error("the response body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("{0}")]
    Transport(String),
    #[error("`{url}` is not on the origin of `{origin}`")]
    OtherOrigin { url: String, origin: String },
}

impl OutboundError {
    /// A short, fixed label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            OutboundError::NotUrl(_) => "not_url",
            OutboundError::Scheme(_) => "scheme",
            OutboundError::Destination(..) => "destination",
            OutboundError::TooLarge(_) => "too_large",
            OutboundError::Transport(_) => "transport",
            OutboundError::OtherOrigin { .. } => "other_origin",
        }
    }
}

/// Which destinations a party-supplied URL may name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Destinations {
    /// Loopback addresses (and plain `http` to them) allowed: local development and tests only.
    pub allow_loopback: bool,
}

impl Destinations {
    /// Checks a URL's scheme and, when its host is an address literal, the address.
    pub fn check_url(&self, raw: &str) -> Result<Url, OutboundError> {
        let url = Url::parse(raw).map_err(|_| OutboundError::NotUrl(excerpt(raw)))?;
        if !matches!(url.scheme(), "https" | "http") {
            return Err(refused(OutboundError::Scheme(excerpt(url.scheme()))));
        }
        let loopback_host = match url.host() {
            Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
            Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
            Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
            None => return Err(OutboundError::NotUrl(excerpt(raw))),
        };
        match url.scheme() {
            "https" => {}
            "http" if loopback_host && self.allow_loopback => {}
            other => return Err(refused(OutboundError::Scheme(excerpt(other)))),
        }
        if loopback_host && !self.allow_loopback {
            return Err(refused(OutboundError::Destination(
                excerpt(url.host_str().unwrap_or_default()),
                "loopback",
            )));
        }
        match url.host() {
            Some(url::Host::Ipv4(ip)) => self.check_ip(IpAddr::V4(ip))?,
            Some(url::Host::Ipv6(ip)) => self.check_ip(IpAddr::V6(ip))?,
            _ => {}
        }
        Ok(url)
    }

    /// Checks one address Vigil is about to connect to.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), OutboundError> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let why = match ip {
            IpAddr::V4(v4) if v4.is_link_local() => Some("link-local"),
            IpAddr::V4(v4) if v4.is_unspecified() || v4.octets()[0] == 0 => Some("unspecified"),
            IpAddr::V4(v4) if v4.is_multicast() || v4.is_broadcast() => Some("multicast"),
            IpAddr::V4(v4) if v4.is_loopback() && !self.allow_loopback => Some("loopback"),
            IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80 => Some("link-local"),
            IpAddr::V6(v6) if v6.is_unspecified() => Some("unspecified"),
            IpAddr::V6(v6) if v6.is_multicast() => Some("multicast"),
            IpAddr::V6(v6) if v6.is_loopback() && !self.allow_loopback => Some("loopback"),
            _ => None,
        };
        match why {
            Some(why) => Err(refused(OutboundError::Destination(ip.to_string(), why))),
            None => Ok(()),
        }
    }

    /// A DNS resolver that drops every address this policy refuses (and fails when none is
    /// left), for clients that connect to party-supplied host names.
    pub fn resolver(self) -> Arc<FilteringResolver> {
        Arc::new(FilteringResolver(self))
    }
}

fn refused(e: OutboundError) -> OutboundError {
    metrics::counter!(crate::telemetry::OUTBOUND_REFUSED, "reason" => e.label()).increment(1);
    e
}

/// See [`Destinations::resolver`].
pub struct FilteringResolver(Destinations);

impl reqwest::dns::Resolve for FilteringResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.0;
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = found
                .iter()
                .copied()
                .filter(|a| policy.check_ip(a.ip()).is_ok())
                .collect();
            if allowed.is_empty() {
                let e: Box<dyn std::error::Error + Send + Sync> = Box::new(
                    OutboundError::Destination(excerpt(&host), "no allowed address"),
                );
                return Err(e);
            }
            let addrs: reqwest::dns::Addrs = Box::new(allowed.into_iter());
            Ok(addrs)
        })
    }
}

/// A redirect policy that follows at most five redirects, each to the origin (scheme, host and
/// port) of the URL that was asked for: never to plain `http`, never to another host.
pub fn same_origin_redirects() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        let Some(first) = attempt.previous().first() else {
            return attempt.stop();
        };
        if attempt.previous().len() > 5 {
            return attempt.error("too many redirects");
        }
        if attempt.url().origin() == first.origin() {
            attempt.follow()
        } else {
            metrics::counter!(crate::telemetry::OUTBOUND_REFUSED, "reason" => "redirect")
                .increment(1);
            let to = excerpt(attempt.url().as_str());
            attempt.error(format!("redirect to another origin refused: {to}"))
        }
    })
}

/// Whether `url` is on the same origin as `origin` (what a management credential may be sent
/// to).
pub fn same_origin(url: &str, origin: &str) -> Result<Url, OutboundError> {
    let u = Url::parse(url).map_err(|_| OutboundError::NotUrl(excerpt(url)))?;
    let o = Url::parse(origin).map_err(|_| OutboundError::NotUrl(excerpt(origin)))?;
    if u.origin() != o.origin() {
        return Err(refused(OutboundError::OtherOrigin {
            url: excerpt(url),
            origin: excerpt(origin),
        }));
    }
    Ok(u)
}

/// Reads a response body, failing as soon as it exceeds `max` bytes (a declared length over the
/// cap fails before any byte is read).
pub async fn read_capped(
    mut resp: reqwest::Response,
    max: usize,
) -> Result<Vec<u8>, OutboundError> {
    if resp.content_length().is_some_and(|n| n > max as u64) {
        return Err(refused(OutboundError::TooLarge(max)));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| OutboundError::Transport(e.to_string()))?
    {
        if body.len() + chunk.len() > max {
            return Err(refused(OutboundError::TooLarge(max)));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// `Retry-After` (RFC 9110 §10.2.3: delta-seconds or an HTTP-date), saturated to `ceiling`.
/// `None` when absent or unreadable; a date in the past is zero.
pub fn retry_after(
    headers: &reqwest::header::HeaderMap,
    ceiling: Duration,
    now: SystemTime,
) -> Option<Duration> {
    let raw = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    parse_retry_after(raw, now).map(|d| d.min(ceiling))
}

/// The delay a `Retry-After` value asks for at `now`, with no arithmetic that can overflow.
pub fn parse_retry_after(raw: &str, now: SystemTime) -> Option<Duration> {
    let raw = raw.trim();
    if !raw.is_empty() && raw.bytes().all(|b| b.is_ascii_digit()) {
        // More digits than u64 holds saturates rather than failing: it means "a long time".
        return Some(Duration::from_secs(raw.parse::<u64>().unwrap_or(u64::MAX)));
    }
    let at = httpdate::parse_http_date(raw).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// At most 120 printable ASCII characters of a remote party's text, for logs and API answers:
/// control characters (log injection, terminal escapes) and everything else become `?`.
pub fn excerpt(text: &str) -> String {
    const MAX: usize = 120;
    let mut out: String = text
        .chars()
        .take(MAX)
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect();
    if text.chars().nth(MAX).is_some() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn party_urls_must_be_https_and_not_internal() {
        let strict = Destinations::default();
        assert!(strict.check_url("https://gw.example.com/events").is_ok());
        assert!(strict.check_url("https://10.1.2.3/events").is_ok());
        for (url, why) in [
            ("http://gw.example.com/events", "scheme"),
            ("file:///etc/passwd", "scheme"),
            ("gopher://gw.example.com/", "scheme"),
            ("https://169.254.169.254/latest/meta-data", "destination"),
            ("https://[fe80::1]/x", "destination"),
            ("https://[::ffff:169.254.169.254]/x", "destination"),
            ("https://0.0.0.0/x", "destination"),
            ("https://224.0.0.1/x", "destination"),
            ("https://127.0.0.1/x", "destination"),
            ("https://localhost/x", "destination"),
            ("http://127.0.0.1:9/x", "scheme"),
            ("not a url", "not_url"),
        ] {
            let e = strict.check_url(url).unwrap_err();
            assert_eq!(e.label(), why, "{url}: {e}");
        }
        let dev = Destinations {
            allow_loopback: true,
        };
        assert!(dev.check_url("http://127.0.0.1:9/x").is_ok());
        assert!(dev.check_url("http://localhost:9/x").is_ok());
        assert!(dev.check_url("http://10.0.0.1/x").is_err());
        assert!(dev.check_url("https://169.254.169.254/").is_err());
    }

    #[test]
    fn retry_after_saturates_and_reads_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("18446744073709551615", now),
            Some(Duration::from_secs(u64::MAX))
        );
        assert_eq!(
            parse_retry_after("99999999999999999999999999", now),
            Some(Duration::from_secs(u64::MAX))
        );
        let later = httpdate::fmt_http_date(now + Duration::from_secs(120));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(120))
        );
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(120));
        assert_eq!(parse_retry_after(&earlier, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("-1", now), None);
        assert_eq!(parse_retry_after("soon", now), None);
        let mut h = reqwest::header::HeaderMap::new();
        h.insert("retry-after", "18446744073709551615".parse().unwrap());
        assert_eq!(
            retry_after(&h, Duration::from_secs(300), now),
            Some(Duration::from_secs(300))
        );
    }

    #[test]
    fn excerpts_are_short_and_printable() {
        assert_eq!(excerpt("ok \u{1b}[31mred\n"), "ok ?[31mred?");
        let long = "x".repeat(500);
        assert_eq!(excerpt(&long).chars().count(), 121);
    }

    #[test]
    fn origins_compare_scheme_host_and_port() {
        assert!(same_origin("https://tr.example.com/streams", "https://tr.example.com/").is_ok());
        assert!(same_origin("http://tr.example.com/streams", "https://tr.example.com/").is_err());
        assert!(same_origin("https://evil.example/streams", "https://tr.example.com/").is_err());
        assert!(same_origin("https://tr.example.com:8443/", "https://tr.example.com/").is_err());
    }

    #[tokio::test]
    async fn an_endless_body_is_cut_at_the_cap_while_it_streams() {
        // A server that streams forever, with no declared length.
        let app = axum::Router::new().route(
            "/jwks.json",
            axum::routing::get(|| async {
                let chunk = axum::body::Bytes::from(vec![b' '; 64 * 1024]);
                let endless = futures_util::stream::repeat_with(move || {
                    Ok::<_, std::convert::Infallible>(chunk.clone())
                });
                axum::body::Body::from_stream(endless)
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let resp = reqwest::get(format!("http://{addr}/jwks.json"))
            .await
            .unwrap();
        let e = read_capped(resp, 1024 * 1024).await.unwrap_err();
        assert_eq!(e, OutboundError::TooLarge(1024 * 1024));
    }
}
