//! `imgdisk`: reading and writing the parts of an imgbuild disk that both the builder and
//! the node side touch: the partition layout (GPT) and the FAT32 ESP.
//!
//! It owns no policy about what to write; callers decide. It never mounts anything and
//! never needs privileges beyond access to the image file or device.

pub mod esp;
pub mod layout;

pub use layout::{derive_uuid, DiskLayout, DiskSizes, LayoutError, PartitionExtent};
