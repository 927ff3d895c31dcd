//! Pure values every layer may use, with no I/O and no imports from the rest of the crate:
//! versions, durations and timestamps, redaction of secrets, digests.
//!
//! The bottom of the layering (see `tests/layering.rs`): the engine, the runner contract,
//! the API types, the controller and the webhook all build on it.

pub mod clock;
pub mod digest;
pub mod redact;
pub mod version;

pub use version::Version;
