//! The disk layout: partition labels, Discoverable Partitions Specification type GUIDs and
//! the A/B slot type.
//!
//! Both sides find partitions by these labels and types; nothing here touches a disk.
//! Reference: UAPI Group, Discoverable Partitions Specification (x86-64 GUIDs).

use std::fmt;
use std::ops::Not;
use std::str::FromStr;

use uuid::{uuid, Uuid};

/// EFI System Partition type GUID.
pub const ESP_TYPE: Uuid = uuid!("c12a7328-f81f-11d2-ba4b-00a0c93ec93b");
/// Root partition (x86-64) type GUID, used by both root slots.
pub const ROOT_X86_64_TYPE: Uuid = uuid!("4f68bce3-e8cd-4db1-96e7-fbcaf984b709");
/// Variable data partition (`/var`) type GUID.
pub const VAR_TYPE: Uuid = uuid!("4d21b016-b534-45c2-a9fb-5c16e091fd2d");

/// GPT partition labels, in on-disk order.
pub const ESP_LABEL: &str = "esp";
pub const ROOT_A_LABEL: &str = "root-a";
pub const ROOT_B_LABEL: &str = "root-b";
pub const VAR_LABEL: &str = "var";

/// Partition alignment: 1 MiB, what every partitioning tool uses by default.
pub const ALIGNMENT: u64 = 1024 * 1024;
/// Logical sector size of the images we write.
pub const SECTOR_SIZE: u64 = 512;

/// One of the two root slots.
///
/// `!slot` is the other slot, so the inactive slot is always `!active`. Serialised as its
/// letter (`"a"` / `"b"`), e.g. in the updater's state file.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Slot {
    A,
    B,
}

impl Slot {
    /// The GPT label of this slot's partition.
    pub fn label(self) -> &'static str {
        match self {
            Slot::A => ROOT_A_LABEL,
            Slot::B => ROOT_B_LABEL,
        }
    }

    /// 1-based GPT partition number of this slot.
    pub fn partition_number(self) -> u32 {
        match self {
            Slot::A => 2,
            Slot::B => 3,
        }
    }

    /// Lower-case letter used in file names (`a` / `b`).
    pub fn letter(self) -> &'static str {
        match self {
            Slot::A => "a",
            Slot::B => "b",
        }
    }

    /// The slot whose partition carries `label`, if any.
    pub fn from_label(label: &str) -> Option<Slot> {
        match label {
            ROOT_A_LABEL => Some(Slot::A),
            ROOT_B_LABEL => Some(Slot::B),
            _ => None,
        }
    }
}

impl Not for Slot {
    type Output = Slot;
    fn not(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.letter())
    }
}

/// Error for an unknown slot name.
#[derive(Debug, thiserror::Error)]
#[error("unknown slot {0:?}: expected a, b, root-a or root-b")]
pub struct UnknownSlot(pub String);

impl FromStr for Slot {
    type Err = UnknownSlot;
    fn from_str(s: &str) -> Result<Slot, UnknownSlot> {
        match s.to_ascii_lowercase().as_str() {
            "a" | ROOT_A_LABEL => Ok(Slot::A),
            "b" | ROOT_B_LABEL => Ok(Slot::B),
            _ => Err(UnknownSlot(s.to_string())),
        }
    }
}

/// What a partition is for, in on-disk order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartitionRole {
    Esp,
    Root(Slot),
    Var,
}

impl PartitionRole {
    /// All partitions of an imgbuild disk, in GPT order (entry 1 first).
    pub const ALL: [PartitionRole; 4] = [
        PartitionRole::Esp,
        PartitionRole::Root(Slot::A),
        PartitionRole::Root(Slot::B),
        PartitionRole::Var,
    ];

    pub fn label(self) -> &'static str {
        match self {
            PartitionRole::Esp => ESP_LABEL,
            PartitionRole::Root(slot) => slot.label(),
            PartitionRole::Var => VAR_LABEL,
        }
    }

    pub fn type_guid(self) -> Uuid {
        match self {
            PartitionRole::Esp => ESP_TYPE,
            PartitionRole::Root(_) => ROOT_X86_64_TYPE,
            PartitionRole::Var => VAR_TYPE,
        }
    }

    /// 1-based GPT partition number.
    pub fn partition_number(self) -> u32 {
        match self {
            PartitionRole::Esp => 1,
            PartitionRole::Root(slot) => slot.partition_number(),
            PartitionRole::Var => 4,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inactive_slot_is_not_active() {
        assert_eq!(!Slot::A, Slot::B);
        assert_eq!(!Slot::B, Slot::A);
        assert_eq!(!!Slot::A, Slot::A);
    }

    #[test]
    fn slot_parses_letters_and_labels() {
        assert_eq!("a".parse::<Slot>().unwrap(), Slot::A);
        assert_eq!("root-b".parse::<Slot>().unwrap(), Slot::B);
        assert_eq!("B".parse::<Slot>().unwrap(), Slot::B);
        let err = "c".parse::<Slot>().unwrap_err();
        assert!(err.to_string().contains("\"c\""));
    }

    #[test]
    fn roles_are_in_gpt_order_with_dps_types() {
        let numbers: Vec<u32> = PartitionRole::ALL
            .iter()
            .map(|r| r.partition_number())
            .collect();
        assert_eq!(numbers, vec![1, 2, 3, 4]);
        assert_eq!(
            PartitionRole::Root(Slot::B).type_guid().to_string(),
            "4f68bce3-e8cd-4db1-96e7-fbcaf984b709"
        );
        assert_eq!(PartitionRole::Var.label(), "var");
        assert_eq!(Slot::from_label("root-a"), Some(Slot::A));
        assert_eq!(Slot::from_label("var"), None);
    }
}
