//! The GPT disk image: planning the partition layout and writing the whole disk file.
//!
//! This module owns where each partition of an imgbuild disk lives (1 MiB aligned, in the
//! order and with the Discoverable Partitions types of `imgformat::layout`), the GUIDs of
//! the disk and its partitions (UUID v5 from a seed, never random), and assembling the
//! disk file from an ESP file list, a finished root image for slot A and a tree for
//! `var`. Slot B is left as zeros and gets no boot entry, so it cannot boot.
//!
//! It must never leave a plausible disk behind a failed build: everything is written to
//! `<path>.partial`, the partition table last, and renamed into place only when complete.
//! It never mounts, never uses loop devices and never touches any file but that one.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use gpt::disk::LogicalBlockSize;
use gpt::mbr::ProtectiveMBR;
use gpt::partition::Partition;
use gpt::partition_types::{OperatingSystem, Type};
use gpt::GptConfig;
use imgformat::layout::{PartitionRole, Slot, SECTOR_SIZE, VAR_LABEL};

use crate::filesystem::{self, Ext4Spec};
use imgdisk::esp::{self, EspFile};
pub use imgdisk::layout::*;

/// What goes onto the disk.
#[derive(Debug, Clone, Copy)]
pub struct DiskContents<'a> {
    /// Files of the ESP (systemd-boot, loader.conf, slot A's kernel, initrd and entry).
    pub esp_files: &'a [EspFile],
    /// The finished ext4 image of slot A (see [`filesystem::make_ext4`]).
    pub root_a: &'a Path,
    /// Initial contents of `var`; `None` for an empty filesystem. Its times are
    /// normalized to `epoch` before it is copied.
    pub var_tree: Option<&'a Path>,
    /// Seed of the ESP volume id and of the `var` filesystem's UUID and hash seed; use
    /// the same seed as [`DiskLayout::plan`].
    pub seed: &'a str,
    /// SOURCE_DATE_EPOCH of the build.
    pub epoch: i64,
}

/// The temporary name a disk is built under.
pub fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    path.with_file_name(name)
}

/// Write the disk image to `path`: build `<path>.partial`, then rename it over `path`.
pub fn write_disk(path: &Path, layout: &DiskLayout, contents: &DiskContents) -> Result<()> {
    let partial = partial_path(path);
    let result = write_partial(&partial, layout, contents);
    if let Err(err) = result {
        // Best effort: the .partial name already keeps it from being mistaken for a disk.
        let _ = fs::remove_file(&partial);
        return Err(err);
    }
    fs::rename(&partial, path)
        .with_context(|| format!("renaming {} to {}", partial.display(), path.display()))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("syncing directory {}", dir.display()))?;
    }
    Ok(())
}

fn write_partial(partial: &Path, layout: &DiskLayout, contents: &DiskContents) -> Result<()> {
    let esp = *layout.require(PartitionRole::Esp)?;
    let root_a = *layout.require(PartitionRole::Root(Slot::A))?;
    let var = *layout.require(PartitionRole::Var)?;

    let root_len = fs::metadata(contents.root_a)
        .with_context(|| format!("reading metadata of {}", contents.root_a.display()))?
        .len();
    if root_len > root_a.size() {
        bail!(
            "root image {} is {} MiB but the root-a slot is {} MiB",
            contents.root_a.display(),
            root_len.div_ceil(MIB),
            root_a.size() / MIB
        );
    }

    // A fresh sparse file: every byte we do not write reads as zero (root-b stays empty).
    let _ = fs::remove_file(partial);
    let file = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(partial)
        .with_context(|| format!("creating {}", partial.display()))?;
    file.set_len(layout.total_size).with_context(|| {
        format!(
            "sizing {} to {} bytes",
            partial.display(),
            layout.total_size
        )
    })?;

    let slice = fscommon::StreamSlice::new(&file, esp.offset(), esp.offset() + esp.size())
        .with_context(|| format!("confining writes to the ESP of {}", partial.display()))?;
    esp::write_esp(
        slice,
        esp.size(),
        esp::volume_id(contents.seed),
        "ESP",
        contents.esp_files,
        contents.epoch,
    )
    .with_context(|| format!("writing the ESP of {}", partial.display()))?;

    copy_sparse(contents.root_a, &file, root_a.offset())
        .with_context(|| format!("copying the root-a image into {}", partial.display()))?;

    let empty;
    let var_tree = match contents.var_tree {
        Some(tree) => tree,
        None => {
            empty = tempfile::tempdir().context("creating an empty var tree")?;
            empty.path()
        }
    };
    filesystem::normalize_tree(var_tree, contents.epoch)?;
    let spec = Ext4Spec {
        source: var_tree,
        label: VAR_LABEL,
        uuid: derive_uuid(contents.seed, "var filesystem uuid"),
        hash_seed: derive_uuid(contents.seed, "var filesystem hash seed"),
        size: var.size(),
        epoch: contents.epoch,
        journal: true,
    };
    filesystem::make_ext4(&spec, partial, var.offset())
        .with_context(|| format!("making the var filesystem in {}", partial.display()))?;

    // The partition table goes in last, once everything it points at is complete.
    write_gpt(&file, layout)
        .with_context(|| format!("writing the GPT of {}", partial.display()))?;
    file.sync_all()
        .with_context(|| format!("syncing {}", partial.display()))
}

fn write_gpt(file: &File, layout: &DiskLayout) -> Result<()> {
    let sectors = layout.total_size / SECTOR_SIZE;
    let mut device = file;
    // The protective MBR covers the whole disk, or as much as 32 bits can say (UEFI 5.2.3).
    let mbr_sectors = u32::try_from(sectors - 1).unwrap_or(u32::MAX);
    ProtectiveMBR::with_lb_size(mbr_sectors)
        .overwrite_lba0(&mut device)
        .context("writing the protective MBR")?;

    let mut gpt = GptConfig::new()
        .writable(true)
        .logical_block_size(LogicalBlockSize::Lb512)
        .create_from_device(device, Some(layout.disk_guid))
        .context("initializing the GPT headers")?;
    let table: BTreeMap<u32, Partition> = layout
        .partitions
        .iter()
        .map(|p| {
            (
                p.role.partition_number(),
                Partition {
                    part_type_guid: Type {
                        guid: p.role.type_guid(),
                        os: OperatingSystem::None,
                    },
                    part_guid: p.guid,
                    first_lba: p.first_lba,
                    last_lba: p.last_lba,
                    flags: 0,
                    name: p.role.label().to_string(),
                },
            )
        })
        .collect();
    gpt.update_partitions(table)
        .context("filling the GPT partition array")?;
    let header = gpt.header();
    if layout.partitions.iter().any(|p| {
        p.first_lba < header.first_usable
            || p.last_lba > header.last_usable
            || p.first_lba > p.last_lba
    }) {
        bail!(
            "partitions do not fit the usable sectors {}..={}",
            header.first_usable,
            header.last_usable
        );
    }
    gpt.write().context("writing the GPT")?;
    Ok(())
}

/// Copy `image` into `disk` at `offset`, skipping all-zero 4 KiB blocks so the disk
/// stays sparse (the target range must already be zeros).
fn copy_sparse(image: &Path, disk: &File, offset: u64) -> Result<()> {
    const BLOCK: usize = 4096;
    let mut input = File::open(image).with_context(|| format!("opening {}", image.display()))?;
    let mut buf = vec![0u8; 256 * BLOCK];
    let mut pos = 0u64;
    loop {
        let n = read_full(&mut input, &mut buf)
            .with_context(|| format!("reading {}", image.display()))?;
        if n == 0 {
            return Ok(());
        }
        let mut start = 0;
        while start < n {
            // Find the next run of non-zero blocks and write it in one go.
            let is_zero = |at: usize| buf[at..(at + BLOCK).min(n)].iter().all(|&b| b == 0);
            if is_zero(start) {
                start += BLOCK;
                continue;
            }
            let mut end = start + BLOCK;
            while end < n && !is_zero(end) {
                end += BLOCK;
            }
            let end = end.min(n);
            disk.write_all_at(&buf[start..end], offset + pos + start as u64)
                .with_context(|| format!("writing at byte {}", offset + pos + start as u64))?;
            start = end;
        }
        pos += n as u64;
    }
}

/// Read until `buf` is full or the end of the input.
fn read_full(input: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;
    use uuid::Uuid;

    /// Sectors of a 128-entry GPT partition array (128 × 128 bytes).
    const GPT_ARRAY_SECTORS: u64 = 32;

    fn sizes() -> DiskSizes {
        DiskSizes {
            esp: 64 * MIB,
            root: 32 * MIB,
            var: 32 * MIB,
        }
    }

    #[test]
    fn plan_aligns_rounds_and_leaves_room_for_both_gpts() {
        let odd = DiskSizes {
            root: 32 * MIB + 1,
            ..sizes()
        };
        let layout = DiskLayout::plan(&odd, "seed").unwrap();
        let expected = [
            (PartitionRole::Esp, 1, 64),
            (PartitionRole::Root(Slot::A), 65, 33),
            (PartitionRole::Root(Slot::B), 98, 33),
            (PartitionRole::Var, 131, 32),
        ];
        for ((role, start_mib, size_mib), p) in expected.into_iter().zip(&layout.partitions) {
            assert_eq!(p.role, role);
            assert_eq!(p.offset(), start_mib * MIB, "{role:?}");
            assert_eq!(p.size(), size_mib * MIB, "{role:?}");
            assert_eq!(layout.offset(role), Some(start_mib * MIB));
            assert_eq!(layout.size(role), Some(size_mib * MIB));
        }
        assert_eq!(layout.total_size, 164 * MIB);
        // Backup GPT: 32 array sectors + 1 header after the last partition.
        let last = layout.partitions[3].last_lba;
        assert!(layout.total_size / SECTOR_SIZE - 1 - GPT_ARRAY_SECTORS > last);
    }

    #[test]
    fn plan_guids_come_from_the_seed() {
        let a = DiskLayout::plan(&sizes(), "k8s-node 1.0").unwrap();
        let b = DiskLayout::plan(&sizes(), "k8s-node 1.0").unwrap();
        let c = DiskLayout::plan(&sizes(), "k8s-node 1.1").unwrap();
        assert_eq!(a, b);
        assert_ne!(a.disk_guid, c.disk_guid);
        let mut guids: Vec<Uuid> = a.partitions.iter().map(|p| p.guid).collect();
        guids.push(a.disk_guid);
        guids.sort();
        guids.dedup();
        assert_eq!(guids.len(), 5, "all GUIDs distinct");
        assert!(guids.iter().all(|g| g.get_version_num() == 5));
    }

    #[test]
    fn plan_rejects_small_partitions_and_says_why() {
        let table = [
            (
                DiskSizes {
                    esp: 32 * MIB,
                    ..sizes()
                },
                "esp",
                "FAT32",
            ),
            (DiskSizes { esp: 0, ..sizes() }, "esp", "65,525 clusters"),
            (DiskSizes { root: 0, ..sizes() }, "root", "root filesystem"),
            (
                DiskSizes {
                    var: MIB,
                    ..sizes()
                },
                "var",
                "journal",
            ),
        ];
        for (s, label, why) in table {
            let err = DiskLayout::plan(&s, "x").unwrap_err();
            let msg = err.to_string();
            assert!(msg.starts_with(&format!("the {label} partition")), "{msg}");
            assert!(msg.contains(why), "{msg}");
        }
        let huge = DiskSizes {
            var: u64::MAX - 10,
            ..sizes()
        };
        assert_eq!(DiskLayout::plan(&huge, "x"), Err(LayoutError::Overflow));
    }

    #[test]
    fn sparse_copy_skips_zero_blocks_and_keeps_data() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("img");
        let mut data = vec![0u8; 3 * 1024 * 1024 + 100];
        data[5000] = 1; // block 1
        data[2 * 1024 * 1024 + 7] = 2;
        *data.last_mut().unwrap() = 3; // partial last block
        fs::write(&image, &data).unwrap();
        let disk_path = dir.path().join("disk");
        let disk = File::create(&disk_path).unwrap();
        disk.set_len(8 * MIB).unwrap();
        copy_sparse(&image, &disk, MIB).unwrap();
        let out = fs::read(&disk_path).unwrap();
        assert_eq!(&out[MIB as usize..MIB as usize + data.len()], &data[..]);
        use std::os::unix::fs::MetadataExt;
        let allocated = fs::metadata(&disk_path).unwrap().blocks() * 512;
        assert!(allocated <= 64 * 1024, "{allocated} bytes allocated");
    }

    #[test]
    fn partial_path_appends_a_suffix() {
        assert_eq!(
            partial_path(Path::new("/out/node.raw")),
            Path::new("/out/node.raw.partial")
        );
        assert_eq!(partial_path(Path::new("disk")), Path::new("disk.partial"));
    }
}
