//! Vigil: a continuous access-evaluation engine. See `ARCHITECTURE.md` for the code map.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod config;
pub mod discovery;
pub mod events;
pub mod jose;
pub mod jwks;
pub mod set;
pub mod subject;

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod test_support;
