//! Vigil as an SSF transmitter toward enforcement points (SSF 1.0 §7–8): its signing identity, its
//! transmitter metadata and JWKS. Stream management, SET emission and delivery build on this.

mod identity;
mod metadata;

pub use identity::{Identity, IdentityError};
pub use metadata::{jwks, metadata, MetadataState};
