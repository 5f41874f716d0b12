//! The partition layout of an imgbuild disk: where each partition lives (1 MiB aligned,
//! in the order and with the Discoverable Partitions types of `imgformat::layout`), the
//! GUIDs of the disk and its partitions (UUID v5 from a seed, never random), and reading
//! a disk's GPT back into that layout.
//!
//! Shared by the builder (which plans and writes disks) and the updater and installer
//! (which find slots on a disk). It never writes a disk.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::path::Path;

use anyhow::{Context, Result};
use gpt::disk::LogicalBlockSize;
use gpt::GptConfig;
use imgformat::layout::{PartitionRole, ALIGNMENT, SECTOR_SIZE, VAR_LABEL};
use uuid::Uuid;

use crate::esp::MIN_ESP_SIZE;

pub const MIB: u64 = 1024 * 1024;

/// Smallest root slot: an ext4 image with 4 KiB blocks and room for a useful tree.
pub const MIN_ROOT_SIZE: u64 = 16 * MIB;
/// Smallest `var`: mke2fs gives no journal below 8 MiB, and `var` also holds the
/// updater's state and grows on first boot anyway.
pub const MIN_VAR_SIZE: u64 = 16 * MIB;

/// Namespace of every UUID imgbuild derives (UUID v5 of the URL below).
fn namespace() -> Uuid {
    Uuid::new_v5(&Uuid::NAMESPACE_URL, b"https://imgbuild.invalid/uuid")
}

/// A stable UUID for `purpose` within a build identified by `seed` (e.g. recipe name
/// and version). Same inputs, same UUID; never random.
pub fn derive_uuid(seed: &str, purpose: &str) -> Uuid {
    Uuid::new_v5(&namespace(), format!("{seed}\0{purpose}").as_bytes())
}

/// Requested partition sizes in bytes; each is rounded up to 1 MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskSizes {
    pub esp: u64,
    pub root: u64,
    pub var: u64,
}

/// Where one partition lives, in 512-byte sectors (inclusive, as in GPT).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionExtent {
    pub role: PartitionRole,
    pub first_lba: u64,
    pub last_lba: u64,
    /// Unique partition GUID.
    pub guid: Uuid,
}

impl PartitionExtent {
    /// Byte offset of the partition in the disk.
    pub fn offset(&self) -> u64 {
        self.first_lba * SECTOR_SIZE
    }

    /// Size of the partition in bytes.
    pub fn size(&self) -> u64 {
        (self.last_lba + 1 - self.first_lba) * SECTOR_SIZE
    }
}

/// The partition table of an imgbuild disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskLayout {
    pub disk_guid: Uuid,
    /// Size of the whole disk image in bytes.
    pub total_size: u64,
    /// In GPT order (entry 1 first).
    pub partitions: Vec<PartitionExtent>,
}

/// Why a layout cannot be planned or read back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("the {label} partition is {} MiB but must be at least {} MiB: {why}", size / MIB, min / MIB)]
    TooSmall {
        label: &'static str,
        size: u64,
        min: u64,
        why: &'static str,
    },
    #[error("partition sizes add up to more than a disk can hold")]
    Overflow,
    #[error("{0}")]
    NotImgbuild(String),
}

impl DiskLayout {
    /// Plan the disk: ESP, root-a, root-b (same size as root-a), var, each starting on a
    /// 1 MiB boundary, with 1 MiB left at the end for the backup GPT. Pure.
    pub fn plan(sizes: &DiskSizes, seed: &str) -> Result<DiskLayout, LayoutError> {
        let checks: [(&'static str, u64, u64, &'static str); 3] = [
            (
                imgformat::layout::ESP_LABEL,
                sizes.esp,
                MIN_ESP_SIZE,
                "FAT32 needs at least 65,525 clusters, about 33 MiB with 512-byte sectors, \
                 and some firmware misreads volumes near that limit as FAT16",
            ),
            (
                "root",
                sizes.root,
                MIN_ROOT_SIZE,
                "each root slot holds a whole ext4 root filesystem",
            ),
            (
                VAR_LABEL,
                sizes.var,
                MIN_VAR_SIZE,
                "var needs an ext4 journal and room for the updater's state",
            ),
        ];
        for (label, size, min, why) in checks {
            if size < min {
                return Err(LayoutError::TooSmall {
                    label,
                    size,
                    min,
                    why,
                });
            }
        }
        let round = |n: u64| {
            n.checked_next_multiple_of(ALIGNMENT)
                .ok_or(LayoutError::Overflow)
        };
        let mut partitions = Vec::new();
        let mut next = ALIGNMENT; // the primary GPT lives in the first MiB
        for role in PartitionRole::ALL {
            let size = round(match role {
                PartitionRole::Esp => sizes.esp,
                PartitionRole::Root(_) => sizes.root,
                PartitionRole::Var => sizes.var,
            })?;
            let end = next.checked_add(size).ok_or(LayoutError::Overflow)?;
            partitions.push(PartitionExtent {
                role,
                first_lba: next / SECTOR_SIZE,
                last_lba: end / SECTOR_SIZE - 1,
                guid: derive_uuid(seed, &format!("partition {}", role.label())),
            });
            next = end;
        }
        // The backup GPT (array + header, 33 sectors) needs the last MiB.
        let total_size = next.checked_add(ALIGNMENT).ok_or(LayoutError::Overflow)?;
        Ok(DiskLayout {
            disk_guid: derive_uuid(seed, "disk"),
            total_size,
            partitions,
        })
    }

    /// The partition with `role`, if the layout has it.
    pub fn extent(&self, role: PartitionRole) -> Option<&PartitionExtent> {
        self.partitions.iter().find(|p| p.role == role)
    }

    /// Byte offset of the partition with `role`.
    pub fn offset(&self, role: PartitionRole) -> Option<u64> {
        self.extent(role).map(PartitionExtent::offset)
    }

    /// Size in bytes of the partition with `role`.
    pub fn size(&self, role: PartitionRole) -> Option<u64> {
        self.extent(role).map(PartitionExtent::size)
    }

    pub fn require(&self, role: PartitionRole) -> Result<&PartitionExtent> {
        self.extent(role)
            .with_context(|| format!("the disk layout has no {} partition", role.label()))
    }
}

/// Read the partition table of an imgbuild disk image (or device) back into a layout.
///
/// Every partition must carry one of our labels with its matching type GUID, and all four
/// must be present; anything else is not an imgbuild disk.
pub fn inspect(path: &Path) -> Result<DiskLayout> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let total_size = file
        .seek(SeekFrom::End(0))
        .with_context(|| format!("finding the size of {}", path.display()))?;
    let gpt = GptConfig::new()
        .writable(false)
        .logical_block_size(LogicalBlockSize::Lb512)
        .open_from_device(file)
        .with_context(|| format!("reading the GPT of {}", path.display()))?;
    let not_ours = |why: String| LayoutError::NotImgbuild(format!("{}: {why}", path.display()));
    let mut partitions = Vec::new();
    for (number, part) in gpt.partitions().iter().filter(|(_, p)| p.is_used()) {
        let role = PartitionRole::ALL
            .into_iter()
            .find(|r| r.label() == part.name)
            .ok_or_else(|| {
                not_ours(format!(
                    "partition {number} has unknown label {:?}",
                    part.name
                ))
            })?;
        if part.part_type_guid.guid != role.type_guid() {
            return Err(not_ours(format!(
                "partition {number} ({}) has type {} instead of {}",
                part.name,
                part.part_type_guid.guid,
                role.type_guid()
            ))
            .into());
        }
        if partitions.iter().any(|p: &PartitionExtent| p.role == role) {
            return Err(not_ours(format!("label {} appears twice", part.name)).into());
        }
        partitions.push(PartitionExtent {
            role,
            first_lba: part.first_lba,
            last_lba: part.last_lba,
            guid: part.part_guid,
        });
    }
    for role in PartitionRole::ALL {
        if !partitions.iter().any(|p| p.role == role) {
            return Err(not_ours(format!("no {} partition", role.label())).into());
        }
    }
    partitions.sort_by_key(|p| p.role.partition_number());
    Ok(DiskLayout {
        disk_guid: *gpt.guid(),
        total_size,
        partitions,
    })
}
