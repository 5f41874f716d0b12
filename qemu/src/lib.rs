//! `imgqemu`: boot one disk image, or a test cluster of them, under QEMU.
//!
//! Owns QEMU command lines, firmware copies, serial logs and process lifetimes. It must
//! never change the image it boots (writes go to `-snapshot` or an overlay) and never
//! leave a QEMU process running after its [`Vm`] is gone.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use std::time::Duration;
//! let cfg = imgqemu::VmConfig::uefi("node1", imgqemu::firmware()?, "node.raw");
//! let vm = imgqemu::Vm::start(&cfg)?;
//! vm.wait_for_serial("login:", Duration::from_secs(120))?;
//! vm.shutdown(Duration::from_secs(30))?;
//! # Ok(()) }
//! ```
//!
//! Acceleration: TCG unless KVM is asked for explicitly (`Accel::Kvm`, or
//! `IMGBUILD_ACCEL=kvm` with `Accel::Auto`). KVM is never auto-detected: on nested
//! hosts `/dev/kvm` can open fine and still hang the guest, and a probe that hangs is
//! worse than a slow boot.

mod config;
mod firmware;
mod qmp;
mod vm;

pub use config::{
    display_command, qemu_args, Accel, ConfigError, Disk, DiskFormat, Firmware, ParseAccelError,
    ParseForwardError, PortForward, UserNet, VmConfig, WorkPaths, ACCEL_ENV, FW_CFG_PREFIX,
};
pub use firmware::{
    find_in_path, find_qemu, firmware, firmware_under, FirmwareError, Ovmf, OVMF_CANDIDATES,
    OVMF_CODE_ENV, OVMF_VARS_ENV, QEMU_BINARY,
};
pub use qmp::Qmp;
pub use vm::{detect_format, SerialMatch, SerialWriter, Shutdown, Vm, WaitError, TAIL_LINES};
