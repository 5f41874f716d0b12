//! Reboot coordination for `imgupdate`: the cluster reboot lock and its backends,
//! health checks and the verdict they lead to, maintenance windows, and choosing what
//! to kexec. This crate decides and coordinates; it never writes slots or boot entries
//! (the updater owns those) and never reboots on its own.
//!
//! The order the updater follows with these parts (issue #6):
//! 1. the new slot is staged and verified;
//! 2. wait for a maintenance window ([`window`]), then take the reboot lock
//!    ([`lock`], opened from `[lock]` by [`config::open_lock`]) and keep renewing it
//!    ([`lock::spawn_renewal`]); if the window closes before the reboot starts, release;
//! 3. drain, then kexec into the new slot ([`kexec`]) or reboot through firmware;
//! 4. after the boot, run the health checks ([`health`]) until a verdict;
//! 5. Pass: commit the slot, uncordon, release the lock. Fail: record the release as
//!    failed where the lock lives ([`lock::RebootLock::mark_release_failed`]), go back
//!    to the old slot, check it, then release the lock.

pub mod config;
pub mod drain;
pub mod duration;
pub mod fleetlock_server;
pub mod health;
pub mod kexec;
pub mod kube;
pub mod lock;
pub mod window;
