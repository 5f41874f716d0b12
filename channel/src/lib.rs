//! `imgchannel`: how imgbuild signs what it publishes and how nodes verify it.
//!
//! This crate owns three things: ed25519 key files ([`keys`]), signed build outputs
//! (`SHA256SUMS` + detached signature, [`artifact`]) and update channels as TUF
//! repositories written and read with `tough` ([`channel`]). It must never invent a
//! signature scheme, never write a private key with a mode wider than 0600, and never hand
//! bytes to a caller before they verified. It knows nothing of disks, slots or deltas'
//! contents: chunk indexes and deltas arrive as finished files.

pub mod artifact;
pub mod channel;
pub mod cli;
pub mod keys;
pub mod serve;

pub use artifact::{sign_sums, verify_artifact, VerifyError};
pub use channel::{
    init, load, load_with, local_index, publish, publish_packed, refresh, rotate_root,
    AsyncChannel, Channel, DeltaInput, ExpiryPolicy, LoadError, LoadOptions, PublishError,
    Published, ReleaseInput, RoleKeySet, RoleKeys, SigningKeys,
};
pub use keys::{generate, KeyError, PublicKeyInfo};
