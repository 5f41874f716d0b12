//! `imgcoord`: cluster reboot coordination for `imgupdate`.
//!
//! Owns the reboot lock backends and the Kubernetes drain; it never reboots anything.

pub mod drain;
pub mod kube;
pub mod lock;
