//! `vigil-ep`: an enforcement-point simulator. It subscribes to Vigil like any SSF receiver (push,
//! poll or SSE), verifies every SET against Vigil's JWKS, and prints each revocation with how long
//! after the decision it arrived.
//!
//! ```text
//! cargo run -- serve --config config/dev.toml              # Vigil, with an enforcement point "demo-gw"
//! cargo run --bin vigil-ep -- --method sse                 # then revoke something (README)
//! ```

use clap::Parser;
use vigil::sim::ep::{subscribe, Method};

#[derive(Parser)]
#[command(about = "Receive Vigil's revocations as an SSF enforcement point")]
struct Args {
    /// Vigil's issuer URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    vigil: String,
    /// This enforcement point's bearer token (from Vigil's `[[enforcement_points]]`).
    #[arg(long, default_value = "demo-gateway-token-0123456789")]
    token: String,
    /// The `aud` Vigil uses for it.
    #[arg(long, default_value = "demo-gw")]
    audience: String,
    /// push, poll or sse.
    #[arg(long, default_value = "sse")]
    method: Method,
    /// Where the push receiver listens.
    #[arg(long, default_value = "127.0.0.1:8091")]
    listen: std::net::SocketAddr,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut ep = subscribe(
        &args.vigil,
        &args.token,
        &args.audience,
        args.method,
        args.listen,
    )
    .await
    .map_err(anyhow::Error::msg)?;
    println!(
        "subscribed: stream {} ({:?}); waiting for SETs (Ctrl-C to stop)",
        ep.stream_id, args.method
    );
    while let Some(r) = ep.received.recv().await {
        let event_ms = (r.event_time() * 1000.0) as i64;
        println!(
            "{} {} txn={} subject={} (+{} ms after the decision)",
            r.event_name(),
            r.jti(),
            r.txn().unwrap_or("-"),
            r.subject(),
            r.at_ms - event_ms
        );
    }
    Ok(())
}
