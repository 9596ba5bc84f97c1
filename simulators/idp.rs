//! `vigil-idp`: a simulated identity provider acting as an SSF transmitter — metadata, a JWKS with
//! key rotation, the stream management API, push delivery with retries and an RFC 8936 poll
//! endpoint — emitting CAEP and RISC events (login, logout, credential change, device drift, risk
//! changes, account disable) about users, workloads and agents at a chosen rate.
//!
//! ```text
//! cargo run --bin vigil-idp -- --rate 2          # issuer http://127.0.0.1:9100
//! cargo run -- serve --config config/idp-demo.toml
//! cargo run -- streams list
//! ```

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use vigil::sim::idp::{Idp, IdpSettings, Population};

#[derive(Parser)]
#[command(about = "A simulated IdP: an SSF transmitter emitting CAEP and RISC events")]
struct Args {
    /// Address to serve on; the issuer is `http://<listen>`.
    #[arg(long, default_value = "127.0.0.1:9100")]
    listen: std::net::SocketAddr,
    /// The `aud` of the streams it creates (Vigil's `audiences` must contain it).
    #[arg(long, default_value = "https://vigil.example")]
    audience: String,
    /// The `Authorization` value receivers must present to manage streams and poll.
    #[arg(long, default_value = "Bearer idp-receiver-token")]
    credential: String,
    /// Events per second once a stream exists (0: none).
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// Events to emit (0: until interrupted).
    #[arg(long, default_value_t = 0)]
    count: u64,
    #[arg(long, default_value_t = 50)]
    users: u64,
    #[arg(long, default_value_t = 5)]
    workloads: u64,
    #[arg(long, default_value_t = 5)]
    agents: u64,
    /// Seconds between verification requests a stream accepts (faster ones get 429).
    #[arg(long, default_value_t = 10)]
    min_verification_interval: u64,
    /// Rotate the signing key every this many seconds (0: never).
    #[arg(long, default_value_t = 0)]
    rotate_keys_every: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let settings = IdpSettings {
        receiver_credential: args.credential.clone(),
        audience: args.audience.clone(),
        min_verification_interval: args.min_verification_interval,
        long_poll: Duration::from_secs(20),
        ..IdpSettings::default()
    };
    let idp = Idp::start(args.listen, settings)
        .await
        .context("starting the IdP")?;
    println!("issuer {}", idp.issuer());
    println!(
        "metadata {}/.well-known/ssf-configuration; receivers authenticate with `{}`",
        idp.issuer(),
        args.credential
    );
    let population = Population {
        users: args.users,
        workloads: args.workloads,
        agents: args.agents,
    };
    let interval = if args.rate > 0.0 {
        Duration::from_secs_f64(1.0 / args.rate)
    } else {
        Duration::from_secs(3600)
    };
    let mut ticker = tokio::time::interval(interval);
    let mut rotate = tokio::time::interval(Duration::from_secs(args.rotate_keys_every.max(1)));
    rotate.tick().await;
    let mut n = 0u64;
    let mut streams_seen = 0;
    loop {
        tokio::select! {
            _ = ticker.tick(), if args.rate > 0.0 => {
                let streams = idp.streams().len();
                if streams != streams_seen {
                    println!("streams: {streams}");
                    streams_seen = streams;
                }
                if streams == 0 {
                    continue;
                }
                let delivered_to = idp.emit_population(&population, n)?;
                let (uri, sub, _) = vigil::sim::idp::population_event(&population, n);
                let name = uri.rsplit('/').next().unwrap_or(uri);
                println!("event {n}: {name} about {sub} → {delivered_to} stream(s)");
                n += 1;
                if args.count > 0 && n >= args.count {
                    println!("done: {n} events");
                    // Keep serving so queued events are delivered and polls answered.
                    tokio::signal::ctrl_c().await?;
                    return Ok(());
                }
            }
            _ = rotate.tick(), if args.rotate_keys_every > 0 => {
                println!("signing key rotated: {}", idp.rotate_keys()?);
            }
            _ = tokio::signal::ctrl_c() => {
                let seen = idp.observed();
                println!("stopped: {n} events; {} pushed, {} acknowledged by poll, {} poll errors",
                    seen.pushed.len(), seen.acked.len(), seen.set_errs.len());
                return Ok(());
            }
        }
    }
}
