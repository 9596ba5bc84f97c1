//! Vigil as an SSF transmitter toward enforcement points (SSF 1.0 §7–8): its signing identity, its
//! transmitter metadata and JWKS. Stream management, SET emission and delivery build on this.

pub mod emit;
mod identity;
mod metadata;
pub mod mgmt;
pub mod outbox_bounds;
pub mod push;
pub mod streams;

pub use identity::{Identity, IdentityError, KeyRecord, KeyShare};
pub use metadata::{jwks, metadata, metadata_document, MetadataState};
