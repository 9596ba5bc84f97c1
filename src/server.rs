//! The listener: accepts connections (plain or TLS), gives each a budget of time, and caps how
//! many are open so that no caller can starve the others or the health checks.
//!
//! Why this is not `axum::serve`: a server that never closes an idle or slow connection can be
//! emptied of file descriptors by anyone who opens sockets and sends nothing (a review reproduced
//! it with 300 idle sockets: `/healthz` stopped answering and transmitter pushes would have been
//! refused). Here:
//! - every connection must send a complete request head within `request_head_timeout` of being
//!   accepted or of its previous response — the same timer closes idle keep-alive connections
//!   and slow-header (slowloris) ones;
//! - a request body must arrive whole within `body_read_timeout` ([`body_deadline`]);
//! - one peer address holds at most `max_connections_per_peer` of them, so a single host cannot
//!   take the whole pool (a connection over it is closed at once);
//! - at most `max_connections` are served; the next `health_reserve` connections are served only
//!   `/healthz` and `/readyz` (everything else gets `503` + `Retry-After` and the connection is
//!   closed), so a monitor can still see the process while it is full; beyond that a new
//!   connection is closed at once instead of waiting in the kernel's backlog;
//! - `TCP_NODELAY` on every accepted socket: SSE events and small answers are not held back by
//!   Nagle's algorithm waiting for the client's delayed ACK.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use axum::Router;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;

/// Connection budgets (`[server]` in the configuration).
#[derive(Debug, Clone)]
pub struct ServerLimits {
    pub max_connections: usize,
    /// Connections one peer address may hold, so one host cannot take the whole pool.
    pub max_connections_per_peer: usize,
    pub health_reserve: usize,
    pub request_head_timeout: Duration,
    pub tls_handshake_timeout: Duration,
}

/// Which router a connection is served.
enum Admission {
    /// Within `max_connections`: everything.
    Full(OwnedSemaphorePermit),
    /// Within the health-check reserve: `/healthz` and `/readyz` only.
    Reserve(OwnedSemaphorePermit),
}

/// Serves `app` (and `health` on reserve connections) until `shutdown`, then lets open
/// connections finish for at most 10 s.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    app: Router,
    health: Router,
    limits: ServerLimits,
    mut shutdown: watch::Receiver<bool>,
) {
    let peers = PeerConnections::new(limits.max_connections_per_peer);
    let full = Arc::new(Semaphore::new(limits.max_connections));
    let reserve = Arc::new(Semaphore::new(limits.health_reserve));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    // HTTP/1 only, so the connection goes straight to hyper's HTTP/1 state machine and its head
    // timeout runs from the first moment (version sniffing would wait for a first byte with no
    // timer at all).
    let mut http =
        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
            .http1_only();
    http.http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.request_head_timeout);
    // Reserve connections answer one request and close.
    let mut reserve_http = http.clone();
    reserve_http.http1().keep_alive(false);
    let health = health.fallback(reserve_only);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.changed() => break,
        };
        let (tcp, peer) = match accepted {
            Ok((tcp, peer)) => (tcp, peer.ip()),
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                metrics::counter!(crate::telemetry::HTTP_ACCEPT_ERRORS).increment(1);
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(peer_slot) = peers.admit(peer) else {
            metrics::counter!(crate::telemetry::HTTP_CONNECTIONS_REFUSED, "reason" => "peer")
                .increment(1);
            drop(tcp);
            continue;
        };
        let admission = match full.clone().try_acquire_owned() {
            Ok(p) => Admission::Full(p),
            Err(_) => match reserve.clone().try_acquire_owned() {
                Ok(p) => Admission::Reserve(p),
                Err(_) => {
                    metrics::counter!(crate::telemetry::HTTP_CONNECTIONS_REFUSED, "reason" => "full")
                        .increment(1);
                    drop(tcp);
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let (router, builder, permit) = match admission {
            Admission::Full(p) => (app.clone(), http.clone(), p),
            Admission::Reserve(p) => {
                metrics::counter!(crate::telemetry::HTTP_RESERVE_CONNECTIONS).increment(1);
                (health.clone(), reserve_http.clone(), p)
            }
        };
        let watcher = graceful.watcher();
        let tls = tls.clone();
        let handshake_timeout = limits.tls_handshake_timeout;
        tokio::spawn(async move {
            let _permit = permit;
            let _peer_slot = peer_slot;
            metrics::gauge!(crate::telemetry::HTTP_CONNECTIONS_OPEN).increment(1.0);
            serve_connection(tcp, tls, handshake_timeout, router, builder, watcher).await;
            metrics::gauge!(crate::telemetry::HTTP_CONNECTIONS_OPEN).decrement(1.0);
        });
    }
    drop(listener);
    if tokio::time::timeout(Duration::from_secs(10), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after 10 s; closing them");
    }
}

async fn serve_connection(
    tcp: TcpStream,
    tls: Option<TlsAcceptor>,
    handshake_timeout: Duration,
    router: Router,
    builder: hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor>,
    watcher: hyper_util::server::graceful::Watcher,
) {
    let service = hyper_util::service::TowerToHyperService::new(router);
    let result = match tls {
        None => {
            let io = hyper_util::rt::TokioIo::new(tcp);
            watcher.watch(builder.serve_connection(io, service)).await
        }
        Some(acceptor) => {
            let stream = match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    metrics::counter!(crate::telemetry::TLS_HANDSHAKE_FAILURES).increment(1);
                    tracing::info!(error = %e, "TLS handshake refused");
                    return;
                }
                Err(_) => {
                    metrics::counter!(crate::telemetry::TLS_HANDSHAKE_FAILURES).increment(1);
                    return;
                }
            };
            let io = hyper_util::rt::TokioIo::new(stream);
            watcher.watch(builder.serve_connection(io, service)).await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// Open connections per peer address. Entries exist only while a peer has a connection open, so
/// the map is bounded by the connection cap.
#[derive(Clone)]
struct PeerConnections {
    max: usize,
    open: Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>,
}

/// One connection's place in its peer's count, given back when dropped.
struct PeerSlot {
    peers: PeerConnections,
    peer: IpAddr,
}

impl PeerConnections {
    fn new(max: usize) -> PeerConnections {
        PeerConnections {
            max,
            open: Arc::default(),
        }
    }

    fn admit(&self, peer: IpAddr) -> Option<PeerSlot> {
        let mut open = self.open.lock().ok()?;
        let n = open.entry(peer).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(PeerSlot {
            peers: self.clone(),
            peer,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        if let Ok(mut open) = self.peers.open.lock() {
            if let Some(n) = open.get_mut(&self.peer) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    open.remove(&self.peer);
                }
            }
        }
    }
}

/// What a reserve connection answers for anything but the health routes.
async fn reserve_only() -> Response {
    crate::error_body::refusal(
        StatusCode::SERVICE_UNAVAILABLE,
        "busy",
        "the server is at its connection limit; retry later",
        Duration::from_secs(1),
    )
}

/// Middleware: the request body must arrive whole within `limit`, or the request fails with
/// `408`. Without it a client could hold a connection (and a handler) open by sending one byte of
/// its body at a time, each within the head timeout.
pub async fn body_deadline(
    axum::extract::State(limit): axum::extract::State<Duration>,
    request: Request,
    next: Next,
) -> Response {
    // A request without a body (most GETs) has nothing to wait for: no timer, no allocation.
    if http_body::Body::is_end_stream(request.body()) {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    let expired = Arc::new(AtomicBool::new(false));
    let body = Body::new(Deadline {
        inner: body,
        sleep: Box::pin(tokio::time::sleep(limit)),
        expired: expired.clone(),
    });
    let response = next.run(Request::from_parts(parts, body)).await;
    // Extractors turn a failed body read into a 400; say what it was when it was the clock.
    if expired.load(Ordering::Relaxed) {
        metrics::counter!(crate::telemetry::HTTP_BODY_TIMEOUTS).increment(1);
        let mut r = crate::error_body::error(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            "the request body did not arrive in time",
        );
        r.headers_mut().insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
        return r;
    }
    response
}

/// The body read deadline's error.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within its time limit")]
pub struct BodyTimeout;

struct Deadline {
    inner: Body,
    sleep: Pin<Box<tokio::time::Sleep>>,
    expired: Arc<AtomicBool>,
}

impl http_body::Body for Deadline {
    type Data = axum::body::Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|r| r.map_err(Into::into)));
        }
        if self.sleep.as_mut().poll(cx).is_ready() {
            self.expired.store(true, Ordering::Relaxed);
            return Poll::Ready(Some(Err(Box::new(BodyTimeout))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
