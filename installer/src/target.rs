//! Which block devices may be written, as pure functions over `/proc/self/mountinfo`
//! text and a `/sys` tree (so tests feed them fake text and fake directories).
//!
//! Owns the refusal rules: a device that holds `/`, a device with any mounted partition,
//! a read-only device, one smaller than the image, and (where asked) a non-removable one.
//! It never opens a device for writing and never looks at `/dev` contents.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::MIB;

/// One line of `/proc/self/mountinfo` (only what the refusal rules need).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// `major:minor` of the mounted device (0:N for virtual filesystems).
    pub dev: (u32, u32),
    /// Where it is mounted (octal escapes decoded).
    pub mount_point: String,
    /// The mount source, e.g. `/dev/sda1` (octal escapes decoded).
    pub source: String,
}

/// Parses `/proc/self/mountinfo`; lines that do not parse are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let dev = fields.get(2)?;
            let (maj, min) = dev.split_once(':')?;
            let mount_point = unescape(fields.get(4)?);
            let sep = fields.iter().position(|f| *f == "-")?;
            let source = unescape(fields.get(sep + 2)?);
            Some(MountEntry {
                dev: (maj.parse().ok()?, min.parse().ok()?),
                mount_point,
                source,
            })
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let digits = std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(digits, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A whole-disk block device as `/sys/block/NAME` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDevice {
    /// Kernel name, e.g. `vda`, `sda`, `nvme0n1`.
    pub name: String,
    pub dev: (u32, u32),
    /// Size in bytes.
    pub size: u64,
    pub removable: bool,
    pub read_only: bool,
    /// Partitions: (kernel name, major:minor).
    pub partitions: Vec<(String, (u32, u32))>,
}

impl BlockDevice {
    /// `/dev/NAME`.
    pub fn dev_path(&self) -> PathBuf {
        Path::new("/dev").join(&self.name)
    }

    /// Whether `dev` is this disk or one of its partitions.
    fn owns(&self, dev: (u32, u32)) -> bool {
        self.dev == dev || self.partitions.iter().any(|p| p.1 == dev)
    }

    /// Whether a mount source names this disk or one of its partitions.
    fn owns_source(&self, source: &str) -> bool {
        let Some(name) = source.strip_prefix("/dev/") else {
            return false;
        };
        name == self.name || self.partitions.iter().any(|p| p.0 == name)
    }
}

/// Why a device may not be written. Each rule is its own variant so callers (and their
/// exit codes) can tell them apart.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("refusing {device}: it holds the running system's root filesystem (/ is {root})")]
    HoldsRoot { device: String, root: String },
    #[error("refusing {device}: {mounted} is mounted on {mount_point}; unmount it first")]
    Mounted {
        device: String,
        mounted: String,
        mount_point: String,
    },
    #[error("refusing {device}: it is read-only")]
    ReadOnly { device: String },
    #[error("refusing {device}: it is {} MiB, smaller than the image ({} MiB)", size / MIB, needed / MIB)]
    TooSmall {
        device: String,
        size: u64,
        needed: u64,
    },
    #[error("refusing {device}: it is not a removable device (use --force if you mean it)")]
    NotRemovable { device: String },
}

/// Checks every refusal rule for writing an image of `image_size` bytes to `dev`, given
/// the current mounts. Rules are checked in the order of [`Refusal`]'s variants.
pub fn check_target(
    dev: &BlockDevice,
    mounts: &[MountEntry],
    image_size: u64,
    require_removable: bool,
) -> Result<(), Refusal> {
    let device = dev.dev_path().display().to_string();
    if let Some(root) = mounts.iter().find(|m| m.mount_point == "/") {
        if dev.owns(root.dev) || dev.owns_source(&root.source) {
            return Err(Refusal::HoldsRoot {
                device,
                root: root.source.clone(),
            });
        }
    }
    if let Some(m) = mounts
        .iter()
        .find(|m| dev.owns(m.dev) || dev.owns_source(&m.source))
    {
        return Err(Refusal::Mounted {
            device,
            mounted: m.source.clone(),
            mount_point: m.mount_point.clone(),
        });
    }
    if dev.read_only {
        return Err(Refusal::ReadOnly { device });
    }
    if dev.size < image_size {
        return Err(Refusal::TooSmall {
            device,
            size: dev.size,
            needed: image_size,
        });
    }
    if require_removable && !dev.removable {
        return Err(Refusal::NotRemovable { device });
    }
    Ok(())
}

fn read_trim(path: &Path) -> io::Result<String> {
    Ok(fs::read_to_string(path)?.trim().to_owned())
}

fn parse_dev(text: &str) -> Option<(u32, u32)> {
    let (a, b) = text.split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

fn invalid(path: &Path, what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{}: not {what}", path.display()),
    )
}

/// Reads `SYS/block/NAME` (`sys` is `/sys` on a real system).
pub fn read_block_device(sys: &Path, name: &str) -> io::Result<BlockDevice> {
    let dir = sys.join("block").join(name);
    let dev_file = dir.join("dev");
    let dev = parse_dev(&read_trim(&dev_file)?).ok_or_else(|| invalid(&dev_file, "MAJ:MIN"))?;
    let size_file = dir.join("size");
    let sectors: u64 = read_trim(&size_file)?
        .parse()
        .map_err(|_| invalid(&size_file, "a sector count"))?;
    let flag = |f: &str| read_trim(&dir.join(f)).map(|v| v == "1").unwrap_or(false);
    let mut partitions = Vec::new();
    for entry in fs::read_dir(&dir)? {
        let entry = entry?;
        let p = entry.path();
        if p.join("partition").is_file() {
            if let Some(d) = read_trim(&p.join("dev")).ok().and_then(|t| parse_dev(&t)) {
                partitions.push((entry.file_name().to_string_lossy().into_owned(), d));
            }
        }
    }
    partitions.sort();
    Ok(BlockDevice {
        name: name.to_owned(),
        dev,
        // /sys/block/X/size is always in 512-byte units, whatever the logical block size.
        size: sectors * 512,
        removable: flag("removable"),
        read_only: flag("ro"),
        partitions,
    })
}

/// The whole-disk device a `/dev/...` path (or a bare kernel name) refers to, if it is
/// one `SYS/block` lists. Partitions are not whole disks and give `None`.
pub fn disk_name(sys: &Path, path: &Path) -> Option<String> {
    let name = path.strip_prefix("/dev").unwrap_or(path);
    let name = name.to_str()?;
    if name.contains('/') || name.is_empty() {
        return None;
    }
    sys.join("block")
        .join(name)
        .is_dir()
        .then(|| name.to_owned())
}

/// Kernel names of devices that are never install targets: loop, RAM, optical, zram,
/// device-mapper and md devices.
fn is_virtual(name: &str) -> bool {
    ["loop", "ram", "sr", "zram", "dm-", "md", "fd", "nbd"]
        .iter()
        .any(|p| name.starts_with(p))
}

/// Every whole disk in `SYS/block` that could be an install target (not virtual, not
/// empty), sorted by name.
pub fn list_disks(sys: &Path) -> io::Result<Vec<BlockDevice>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(sys.join("block"))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if is_virtual(&name) {
            continue;
        }
        let dev = read_block_device(sys, &name)?;
        if dev.size > 0 {
            out.push(dev);
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 252:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
23 22 0:5 / /dev rw,nosuid shared:2 - devtmpfs udev rw
24 22 8:17 / /media/usb\\040stick rw - vfat /dev/sdb1 rw
25 22 0:45 / /home rw - btrfs /dev/nvme0n1p2 rw
garbage line
";

    fn disk(name: &str, dev: (u32, u32), parts: &[(&str, (u32, u32))]) -> BlockDevice {
        BlockDevice {
            name: name.into(),
            dev,
            size: 8 << 30,
            removable: true,
            read_only: false,
            partitions: parts.iter().map(|(n, d)| (n.to_string(), *d)).collect(),
        }
    }

    #[test]
    fn parses_mountinfo_with_escapes() {
        let m = parse_mountinfo(MOUNTINFO);
        assert_eq!(m.len(), 4);
        assert_eq!(m[0].dev, (252, 1));
        assert_eq!(m[0].source, "/dev/vda1");
        assert_eq!(m[2].mount_point, "/media/usb stick");
        assert_eq!(m[3].source, "/dev/nvme0n1p2");
    }

    #[test]
    fn refusal_table() {
        let mounts = parse_mountinfo(MOUNTINFO);
        let image = 2 << 30;
        type Case = (BlockDevice, bool, Result<(), &'static str>);
        let cases: Vec<Case> = vec![
            // the root disk, found by major:minor of a partition
            (
                disk("vda", (252, 0), &[("vda1", (252, 1))]),
                false,
                Err("HoldsRoot"),
            ),
            // a USB stick with a mounted partition
            (
                disk("sdb", (8, 16), &[("sdb1", (8, 17))]),
                false,
                Err("Mounted"),
            ),
            // btrfs: anonymous 0:N device, found by the mount source
            (
                disk("nvme0n1", (259, 0), &[("nvme0n1p2", (259, 2))]),
                false,
                Err("Mounted"),
            ),
            // an idle removable stick
            (disk("sdc", (8, 32), &[("sdc1", (8, 33))]), true, Ok(())),
            (
                BlockDevice {
                    read_only: true,
                    ..disk("sdd", (8, 48), &[])
                },
                false,
                Err("ReadOnly"),
            ),
            (
                BlockDevice {
                    size: 1 << 30,
                    ..disk("sde", (8, 64), &[])
                },
                false,
                Err("TooSmall"),
            ),
            (
                BlockDevice {
                    removable: false,
                    ..disk("sdf", (8, 80), &[])
                },
                true,
                Err("NotRemovable"),
            ),
            // --force: a fixed disk is fine when removability is not required
            (
                BlockDevice {
                    removable: false,
                    ..disk("sdf", (8, 80), &[])
                },
                false,
                Ok(()),
            ),
        ];
        for (dev, require_removable, want) in cases {
            let got = check_target(&dev, &mounts, image, require_removable);
            let got_kind = got.as_ref().map(|_| ()).map_err(|e| {
                let dbg = format!("{e:?}");
                dbg.split([' ', '{']).next().unwrap_or_default().to_owned()
            });
            assert_eq!(
                got_kind,
                want.map_err(str::to_owned),
                "{}: {got:?}",
                dev.name
            );
            if let Err(e) = got {
                assert!(e.to_string().contains(&format!("/dev/{}", dev.name)), "{e}");
            }
        }
    }

    fn fake_sys(root: &Path, name: &str, dev: &str, sectors: u64, removable: &str) {
        let d = root.join("block").join(name);
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("dev"), format!("{dev}\n")).unwrap();
        fs::write(d.join("size"), format!("{sectors}\n")).unwrap();
        fs::write(d.join("removable"), format!("{removable}\n")).unwrap();
        fs::write(d.join("ro"), "0\n").unwrap();
    }

    #[test]
    fn reads_fake_sysfs() {
        let t = tempfile::tempdir().unwrap();
        fake_sys(t.path(), "vda", "254:0", 8_388_608, "0");
        let p = t.path().join("block/vda/vda1");
        fs::create_dir_all(&p).unwrap();
        fs::write(p.join("partition"), "1\n").unwrap();
        fs::write(p.join("dev"), "254:1\n").unwrap();
        fake_sys(t.path(), "sr0", "11:0", 1000, "1");
        fake_sys(t.path(), "loop0", "7:0", 0, "0");
        fake_sys(t.path(), "sda", "8:0", 0, "1");
        let d = read_block_device(t.path(), "vda").unwrap();
        assert_eq!(d.size, 4 << 30);
        assert_eq!(d.partitions, vec![("vda1".to_string(), (254, 1))]);
        assert!(!d.removable);
        let names: Vec<String> = list_disks(t.path())
            .unwrap()
            .into_iter()
            .map(|d| d.name)
            .collect();
        assert_eq!(
            names,
            vec!["vda"],
            "optical, loop and empty devices are skipped"
        );
        assert_eq!(
            disk_name(t.path(), Path::new("/dev/vda")).as_deref(),
            Some("vda")
        );
        assert_eq!(disk_name(t.path(), Path::new("/dev/vda1")), None);
        assert_eq!(disk_name(t.path(), Path::new("/dev/../etc")), None);
    }
}
