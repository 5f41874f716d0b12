//! Reboot coordination for `imgupdate`: the cluster reboot lock and its backends,
//! health checks and the verdict they lead to, maintenance windows, and choosing what
//! to kexec. This crate decides and coordinates; it never writes slots or boot entries
//! (the updater owns those) and never reboots on its own.

pub mod config;
pub mod duration;
pub mod fleetlock_server;
pub mod health;
pub mod kexec;
pub mod lock;
pub mod window;
