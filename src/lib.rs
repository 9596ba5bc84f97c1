//! Vigil: a continuous access-evaluation engine. See `ARCHITECTURE.md` for the code map.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod api;
pub mod app;
pub use app::Vigil;
pub use config::Config;

/// jemalloc instead of glibc malloc for every binary, test and bench linking Vigil. The hot paths
/// (Kafka and SET intake, context folding, CEL evaluation) make many small short-lived allocations
/// across threads; under glibc malloc they took over a quarter of the Kafka benchmark's CPU
/// (`_int_malloc`, `unlink_chunk`, `malloc_consolidate`). mimalloc was as fast there but doubled
/// the revocation-delivery tail (p99, max); jemalloc keeps that tail at or below glibc's. The
/// measurements are in `benches/RESULTS.md`.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

pub mod audit;
pub mod auth;
pub mod authzen;
pub mod check;
pub mod clock;
pub mod cluster;
pub mod compact_map;
pub mod config;
pub mod console;
pub mod context;
pub mod decision;
pub mod discovery;
pub mod engine;
pub mod error_body;
pub mod evaluate;
pub mod events;
pub mod fair;
pub mod global_revocation;
pub mod grant;
pub mod handoff;
pub mod intake;
pub mod jose;
pub mod jwks;
pub mod jws_verifier;
pub mod kafka;
pub mod limits;
pub mod liveness;
pub mod ops;
pub mod outbound;
pub mod parts;
pub mod policy;
pub mod policy_api;
pub mod principal;
pub mod push;
pub mod receiver;
pub mod reload;
pub mod risk_feed;
pub mod server;
pub mod set;
pub mod signal;
pub mod signing;
pub mod sim;
pub mod ssf_client;
pub mod store;
pub mod subject;
pub mod supervise;
pub mod telemetry;
pub mod tls;
pub mod transmitter;

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod test_support;
