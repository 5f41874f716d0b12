//! `imgupdate`: the node agent that moves a node from one signed image version to the
//! next, A/B style.
//!
//! This crate owns the node side of updates: its configuration ([`config`]), the one
//! state file and the state machine ([`state`]), finding the slots ([`slots`]), resumable
//! downloads ([`fetch`]), writing and verifying the inactive slot ([`install`]), what boots
//! ([`stage`]), the reboot flow ([`reboot`], wired by [`agent`]), the D-Bus API ([`dbus`]) and metrics ([`metrics`]). It must never write the
//! running slot, never make a slot bootable before its whole image hash matched the
//! signed one, and never trust bytes that TUF (via `imgchannel`) did not vouch for.
//! Issue 6 adds the reboot lock, drain, kexec/reboot and the health verdict on top,
//! feeding the events marked "(issue 6)" below.
//!
//! # The state machine
//!
//! [`state::next`] is pure; [`state::StateFile`] records the result atomically. At every
//! start the updater feeds [`state::Event::Booted`] with what actually runs (os-release
//! `IMAGE_VERSION`, `root=PARTLABEL=root-X` from the kernel command line): never assume a
//! reboot happened. Pairs not listed are illegal and give [`state::IllegalTransition`].
//!
//! | state | event | next state |
//! |---|---|---|
//! | idle, committed, failed, staged, checking, downloading, verifying | check_started | checking |
//! | checking | no_update | idle |
//! | checking | update_found{v} | downloading{v} |
//! | downloading | progress | downloading (counters updated) |
//! | downloading | written | verifying |
//! | verifying | staged{slot} | staged{v, slot} |
//! | staged | lock_requested (issue 6) | locking |
//! | locking | lock_acquired (issue 6) | draining |
//! | draining | drained{strategy} (issue 6) | rebooting{strategy} |
//! | rebooting, trial | booted{v, slot} (the expected ones) | trial |
//! | rebooting, trial | booted{other} | failed ("expected ..., but ... booted") |
//! | rolling_back{v, slot} | booted{slot} | rolling_back (not yet gone) |
//! | rolling_back{v, slot} | booted{other slot} | failed ("v rolled back") |
//! | any other state | booted | unchanged |
//! | trial | health_passed (issue 6) | committed |
//! | trial | health_failed (issue 6) | rolling_back |
//! | staged | rollback_requested | idle (the staged slot's entry is removed) |
//! | trial, committed | rollback_requested | rolling_back (its entry marked bad) |
//! | checking, downloading, verifying, locking, draining, rebooting | error | failed |
//!
//! Resting states (idle, committed, staged) are left alone by a check that finds nothing
//! new. A version whose trial failed or was rolled back is recorded in
//! `failed_versions` and never installed again on this node.

//! # For issue 6 (lock, drain, kexec, health)
//!
//! - Drive the flow with [`StateFile::load`] / [`StateFile::apply`] / [`StateFile::save`]
//!   (events `LockRequested`, `LockAcquired`, `Drained{strategy}`, `HealthPassed`,
//!   `HealthFailed`), holding [`Updater::lock`] while doing so; call [`Updater::start`] at
//!   every start so what booted decides.
//! - kexec: [`stage::kexec_plan`] / [`stage::read_staged`] give the kernel, initrd and
//!   command line of the staged slot; after the checks passed, [`stage::commit_entry`]
//!   with `plan.entry` makes it the firmware default (newest version, no counter = good).
//! - Reject a slot: [`Updater::rollback`] (or [`stage::mark_bad`]); the version lands in
//!   `failed_versions`. Cluster-wide refusals plug in through [`RefusedVersions`].
//! - `[lock]`, `[health]` and `[window]` are `imgcoord::config` types in [`Config`].
//! - [`reboot`] holds the pure [`reboot::next_action`] and the [`reboot::Driver`];
//!   [`agent`] wires them from the configuration for the CLI and the daemon.

pub mod agent;
pub mod config;
pub mod dbus;
pub mod failpoint;
pub mod fetch;
pub mod install;
pub mod kubedrain;
pub mod metrics;
pub mod reboot;
pub mod slots;
pub mod smbios;
pub mod stage;
pub mod state;

pub use config::{Config, Strategy};
pub use install::{Choice, Method, RefusedVersions, UpdateError, UpdateReport, Updater};
pub use state::{next, Event, IllegalTransition, State, StateFile};
