//! `imginstall`: write a verified imgbuild disk image onto a disk.
//!
//! This crate owns the three things every path that puts an image on a machine shares
//! (`imgbuild flash`, the ISO installer, the PXE installer): choosing and refusing a
//! target device ([`target`]), checking a signed `SHA256SUMS` ([`verify`]) and writing an
//! image with its first MiB held back until the rest is written and its hash matched
//! ([`write`]). The live installer that runs as PID 1 in the installer's initramfs is
//! [`live`]. It must never write a byte to a target before the image's signature and hash
//! verified, and never write the partition table (the first MiB) of an image whose
//! streamed hash does not match the signed one: a half-written disk must not boot.

pub mod http;
pub mod live;
pub mod target;
pub mod verify;
pub mod write;

/// One mebibyte.
pub const MIB: u64 = 1 << 20;
