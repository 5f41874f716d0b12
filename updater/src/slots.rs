//! The A/B slots on the node's disk: which disk, which slot runs, where each partition's
//! bytes are, and bounded readers/writers over them.
//!
//! This module owns discovering the disk (the one holding `/`, or `--disk FILE`), reading
//! its GPT through `imgdisk::layout::inspect`, and deciding the active slot from the
//! kernel command line (`root=PARTLABEL=root-X`). It must never write outside a
//! partition's byte range, and never write the active slot: [`Disk::open_slot_for_write`]
//! refuses it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use fscommon::StreamSlice;
use imgdisk::layout::DiskLayout;
use imgformat::layout::{PartitionRole, Slot};
use serde::Serialize;
use sha2::{Digest, Sha256};

/// What runs now, as the system itself reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Running {
    /// `IMAGE_VERSION` from os-release.
    pub version: String,
    /// `IMAGE_ID` from os-release (the image name in the channel).
    pub image_id: Option<String>,
    /// The slot the kernel mounted as `/`.
    pub slot: Slot,
}

/// The slot named by `root=PARTLABEL=root-X` on a kernel command line.
pub fn slot_from_cmdline(cmdline: &str) -> Option<Slot> {
    cmdline
        .split_ascii_whitespace()
        .rev()
        .find_map(|arg| arg.strip_prefix("root=PARTLABEL="))
        .and_then(Slot::from_label)
}

/// `KEY` from os-release text, unquoted.
pub fn os_release_field(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let (k, v) = l.trim().split_once('=')?;
        (k == key).then(|| v.trim().trim_matches(|c| c == '"' || c == '\'').to_string())
    })
}

/// Read what runs from os-release and the kernel command line.
pub fn running(os_release: &Path, cmdline: &Path) -> Result<Running> {
    let osr = std::fs::read_to_string(os_release)
        .with_context(|| format!("reading {}", os_release.display()))?;
    let version = os_release_field(&osr, "IMAGE_VERSION")
        .with_context(|| format!("{} has no IMAGE_VERSION", os_release.display()))?;
    let cmd = std::fs::read_to_string(cmdline)
        .with_context(|| format!("reading {}", cmdline.display()))?;
    let slot = slot_from_cmdline(&cmd).with_context(|| {
        format!(
            "{} has no root=PARTLABEL=root-a or root-b: not booted from an imgbuild slot",
            cmdline.display()
        )
    })?;
    Ok(Running {
        version,
        image_id: os_release_field(&osr, "IMAGE_ID"),
        slot,
    })
}

/// The whole disk that holds the partition labelled `label`, found through
/// `/dev/disk/by-partlabel` and sysfs (`/sys/class/block/<part>/..`).
pub fn disk_of_partlabel(label: &str) -> Result<PathBuf> {
    let link = Path::new("/dev/disk/by-partlabel").join(label);
    let part =
        std::fs::canonicalize(&link).with_context(|| format!("resolving {}", link.display()))?;
    let name = part
        .file_name()
        .with_context(|| format!("{} has no file name", part.display()))?;
    let sys = Path::new("/sys/class/block").join(name);
    let sys =
        std::fs::canonicalize(&sys).with_context(|| format!("resolving {}", sys.display()))?;
    let parent = sys
        .parent()
        .and_then(|p| p.file_name())
        .with_context(|| format!("{} has no parent disk", sys.display()))?;
    Ok(Path::new("/dev").join(parent))
}

/// The node's disk and its partition table.
#[derive(Debug, Clone)]
pub struct Disk {
    pub path: PathBuf,
    pub layout: DiskLayout,
}

impl Disk {
    /// Read the GPT of `path`.
    pub fn open(path: &Path) -> Result<Disk> {
        let layout = imgdisk::layout::inspect(path)?;
        Ok(Disk {
            path: path.to_path_buf(),
            layout,
        })
    }

    /// `override_path`, else the disk holding the running slot's partition.
    pub fn discover(override_path: Option<&Path>, running: Slot) -> Result<Disk> {
        match override_path {
            Some(p) => Disk::open(p),
            None => Disk::open(&disk_of_partlabel(running.label())?),
        }
    }

    /// Byte offset and size of a partition.
    pub fn range(&self, role: PartitionRole) -> Result<(u64, u64)> {
        let e = self.layout.require(role)?;
        Ok((e.offset(), e.size()))
    }

    fn slice(
        &self,
        role: PartitionRole,
        len: Option<u64>,
        write: bool,
    ) -> Result<StreamSlice<File>> {
        let (offset, size) = self.range(role)?;
        let len = len.unwrap_or(size);
        if len > size {
            bail!(
                "{} bytes do not fit into {} ({} bytes) of {}",
                len,
                role.label(),
                size,
                self.path.display()
            );
        }
        let file = OpenOptions::new()
            .read(true)
            .write(write)
            .open(&self.path)
            .with_context(|| format!("opening {}", self.path.display()))?;
        StreamSlice::new(file, offset, offset + len)
            .with_context(|| format!("opening {} of {}", role.label(), self.path.display()))
    }

    /// Read-only view of the first `len` bytes (default: all) of `slot`.
    pub fn open_slot(&self, slot: Slot, len: Option<u64>) -> Result<StreamSlice<File>> {
        self.slice(PartitionRole::Root(slot), len, false)
    }

    /// Writable view of `slot`, which must not be `active`.
    pub fn open_slot_for_write(&self, slot: Slot, active: Slot) -> Result<StreamSlice<File>> {
        if slot == active {
            bail!("refusing to write slot {slot}: it is the running slot");
        }
        self.slice(PartitionRole::Root(slot), None, true)
    }

    /// Read-write view of the ESP.
    pub fn open_esp(&self) -> Result<StreamSlice<File>> {
        self.slice(PartitionRole::Esp, None, true)
    }

    /// Flush everything written to the disk to stable storage.
    pub fn sync(&self) -> Result<()> {
        OpenOptions::new()
            .write(true)
            .open(&self.path)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("syncing {}", self.path.display()))
    }

    /// sha256 (hex) of the first `len` bytes of `slot`.
    pub fn hash_slot(&self, slot: Slot, len: u64) -> Result<String> {
        let mut r = self.open_slot(slot, Some(len))?;
        r.seek(SeekFrom::Start(0))?;
        hash_reader(&mut r)
            .with_context(|| format!("hashing slot {slot} of {}", self.path.display()))
    }
}

/// sha256 (hex) of everything `r` yields.
pub fn hash_reader(r: &mut impl Read) -> std::io::Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn active_slot_from_cmdline() {
        let table = [
            (
                "BOOT_IMAGE=/x root=PARTLABEL=root-a ro quiet",
                Some(Slot::A),
            ),
            ("root=PARTLABEL=root-b ro", Some(Slot::B)),
            // The kernel uses the last root=.
            ("root=PARTLABEL=root-a root=PARTLABEL=root-b", Some(Slot::B)),
            ("root=/dev/sda2 ro", None),
            ("root=PARTLABEL=var", None),
            ("", None),
        ];
        for (cmdline, want) in table {
            assert_eq!(slot_from_cmdline(cmdline), want, "{cmdline}");
        }
    }

    #[test]
    fn os_release_fields_are_unquoted() {
        let text = "NAME=\"Debian\"\nIMAGE_ID=minimal\nIMAGE_VERSION='1.2.3'\n";
        assert_eq!(
            os_release_field(text, "IMAGE_VERSION").as_deref(),
            Some("1.2.3")
        );
        assert_eq!(
            os_release_field(text, "IMAGE_ID").as_deref(),
            Some("minimal")
        );
        assert_eq!(os_release_field(text, "VERSION_ID"), None);
    }
}
