//! `imgformat`: the contract between `imgbuild` (which writes disks, channels and deltas)
//! and `imgupdate` (which reads them on a node).
//!
//! This crate owns types and constants only. It must never do I/O policy, networking or
//! anything a node and a builder could disagree on at run time.

pub mod boot;
pub mod chunk;
pub mod delta;
pub mod error;
pub mod layout;
pub mod pack;
pub mod release;

pub use layout::{PartitionRole, Slot};
