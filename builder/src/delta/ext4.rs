//! A minimal read-only ext4 walker: every regular file's path, size and physical extents.
//!
//! The delta generator uses it to learn where each file lives in the old and the new root
//! image (the builder made both with `mkfs.ext4 -d`, so they use extents, no meta_bg, no
//! inline data for regular files of interest). It reads an in-memory image and must never
//! panic on a malformed one: every out-of-range read is an error, and a file it cannot map
//! (block-mapped, inline, corrupt extent tree) is simply left out, so the generator falls
//! back to block-level matching for its blocks. It never writes.

use std::collections::HashSet;

use anyhow::{bail, ensure, Context, Result};

const EXT4_MAGIC: u16 = 0xEF53;
const INCOMPAT_META_BG: u32 = 0x10;
const INCOMPAT_64BIT: u32 = 0x80;
const EXTENTS_FL: u32 = 0x0008_0000;
const INLINE_DATA_FL: u32 = 0x1000_0000;
const EXTENT_MAGIC: u16 = 0xF30A;
const S_IFMT: u16 = 0xF000;
const S_IFREG: u16 = 0x8000;
const S_IFDIR: u16 = 0x4000;
const ROOT_INODE: u32 = 2;
/// Deeper extent trees do not exist in ext4 (max depth 5); guards against loops.
const MAX_DEPTH: u16 = 5;

/// One physically contiguous run of a file, in filesystem blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileExtent {
    pub logical: u64,
    pub physical: u64,
    pub len: u64,
}

/// A regular file of the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileEntry {
    pub path: String,
    pub size: u64,
    /// Extents in logical order (initialised extents only; see [`walk`]).
    pub extents: Vec<FileExtent>,
}

/// The files of one ext4 image.
#[derive(Debug, Clone)]
pub struct Ext4Files {
    pub block_size: u64,
    pub files: Vec<FileEntry>,
}

struct Fs<'a> {
    img: &'a [u8],
    block_size: u64,
    blocks_count: u64,
    inodes_per_group: u32,
    inode_size: u64,
    inode_tables: Vec<u64>,
}

fn slice(img: &[u8], off: u64, len: u64) -> Result<&[u8]> {
    let end = off.checked_add(len).context("offset overflow")?;
    img.get(off as usize..end as usize)
        .with_context(|| format!("read {off}+{len} outside the image"))
}

fn u16_at(b: &[u8], off: usize) -> Result<u16> {
    let s = b.get(off..off + 2).context("short read")?;
    Ok(u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], off: usize) -> Result<u32> {
    let s = b.get(off..off + 4).context("short read")?;
    Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

impl<'a> Fs<'a> {
    fn open(img: &'a [u8]) -> Result<Self> {
        let sb = slice(img, 1024, 1024).context("superblock")?;
        ensure!(
            u16_at(sb, 0x38)? == EXT4_MAGIC,
            "not an ext2/3/4 filesystem"
        );
        let log = u32_at(sb, 0x18)?;
        ensure!(log <= 6, "block size 2^(10+{log}) unsupported");
        let block_size = 1024u64 << log;
        let incompat = u32_at(sb, 0x60)?;
        ensure!(incompat & INCOMPAT_META_BG == 0, "meta_bg is not supported");
        let is64 = incompat & INCOMPAT_64BIT != 0;
        let mut blocks_count = u64::from(u32_at(sb, 0x4)?);
        if is64 {
            blocks_count |= u64::from(u32_at(sb, 0x150)?) << 32;
        }
        let first_data_block = u64::from(u32_at(sb, 0x14)?);
        let blocks_per_group = u64::from(u32_at(sb, 0x20)?);
        let inodes_per_group = u32_at(sb, 0x28)?;
        let rev = u32_at(sb, 0x4C)?;
        let inode_size = if rev >= 1 {
            u64::from(u16_at(sb, 0x58)?)
        } else {
            128
        };
        let desc_size = if is64 {
            u64::from(u16_at(sb, 0xFE)?)
        } else {
            32
        };
        ensure!(
            blocks_per_group > 0 && inodes_per_group > 0 && inode_size >= 128 && desc_size >= 32,
            "implausible superblock geometry"
        );
        let groups = blocks_count
            .saturating_sub(first_data_block)
            .div_ceil(blocks_per_group);
        ensure!(groups <= 1 << 24, "implausible group count {groups}");
        let gdt = (first_data_block + 1) * block_size;
        let mut inode_tables = Vec::with_capacity(groups as usize);
        for g in 0..groups {
            let d = slice(img, gdt + g * desc_size, desc_size).context("group descriptor")?;
            let mut t = u64::from(u32_at(d, 0x8)?);
            if is64 && desc_size >= 64 {
                t |= u64::from(u32_at(d, 0x28)?) << 32;
            }
            inode_tables.push(t);
        }
        Ok(Self {
            img,
            block_size,
            blocks_count,
            inodes_per_group,
            inode_size,
            inode_tables,
        })
    }

    fn inode(&self, ino: u32) -> Result<&'a [u8]> {
        ensure!(ino >= 1, "inode 0");
        let g = (ino - 1) / self.inodes_per_group;
        let i = (ino - 1) % self.inodes_per_group;
        let table = *self
            .inode_tables
            .get(g as usize)
            .with_context(|| format!("inode {ino} beyond the group table"))?;
        let off = table
            .checked_mul(self.block_size)
            .and_then(|o| o.checked_add(u64::from(i) * self.inode_size))
            .context("inode offset overflow")?;
        slice(self.img, off, self.inode_size)
    }

    fn block(&self, b: u64) -> Result<&'a [u8]> {
        ensure!(b < self.blocks_count, "block {b} beyond the filesystem");
        slice(
            self.img,
            b.checked_mul(self.block_size).context("overflow")?,
            self.block_size,
        )
    }

    /// Extents of an inode with the extents flag; `None` when it has uninitialised extents
    /// (their blocks read as zeros, not as their contents).
    fn extents(&self, inode: &[u8]) -> Result<Option<Vec<FileExtent>>> {
        let root = inode.get(0x28..0x28 + 60).context("short inode")?;
        let mut out = Vec::new();
        let mut clean = true;
        self.walk_node(root, MAX_DEPTH + 1, &mut out, &mut clean)?;
        if !clean {
            return Ok(None);
        }
        out.sort_by_key(|e| e.logical);
        for e in &out {
            ensure!(
                e.physical
                    .checked_add(e.len)
                    .is_some_and(|end| end <= self.blocks_count),
                "extent beyond the filesystem"
            );
        }
        Ok(Some(out))
    }

    fn walk_node(
        &self,
        node: &[u8],
        budget: u16,
        out: &mut Vec<FileExtent>,
        clean: &mut bool,
    ) -> Result<()> {
        ensure!(budget > 0, "extent tree too deep");
        ensure!(u16_at(node, 0)? == EXTENT_MAGIC, "bad extent header magic");
        let entries = usize::from(u16_at(node, 2)?);
        let depth = u16_at(node, 6)?;
        ensure!(depth < budget, "extent tree depth does not decrease");
        for k in 0..entries {
            let e = node
                .get(12 + 12 * k..24 + 12 * k)
                .context("extent entry beyond node")?;
            if depth == 0 {
                let logical = u64::from(u32_at(e, 0)?);
                let raw_len = u16_at(e, 4)?;
                let hi = u64::from(u16_at(e, 6)?);
                let lo = u64::from(u32_at(e, 8)?);
                let len = if raw_len > 32768 {
                    *clean = false;
                    raw_len - 32768
                } else {
                    raw_len
                };
                out.push(FileExtent {
                    logical,
                    physical: (hi << 32) | lo,
                    len: u64::from(len),
                });
            } else {
                let lo = u64::from(u32_at(e, 4)?);
                let hi = u64::from(u16_at(e, 8)?);
                let child = self.block((hi << 32) | lo)?;
                self.walk_node(child, depth, out, clean)?;
            }
        }
        Ok(())
    }
}

fn le64_pair(inode: &[u8], lo: usize, hi: usize) -> Result<u64> {
    Ok(u64::from(u32_at(inode, lo)?) | (u64::from(u32_at(inode, hi)?) << 32))
}

/// Walk every directory from the root and list the regular files whose data the walker can
/// map (extent-mapped, fully initialised). Hard links are listed once, under the first path
/// found. Directories it cannot read are skipped with their subtrees.
pub fn walk(img: &[u8]) -> Result<Ext4Files> {
    let fs = Fs::open(img)?;
    let mut files = Vec::new();
    let mut seen: HashSet<u32> = HashSet::new();
    let mut stack: Vec<(u32, String)> = vec![(ROOT_INODE, String::new())];
    seen.insert(ROOT_INODE);
    while let Some((dir_ino, dir_path)) = stack.pop() {
        let Ok(entries) = read_dir(&fs, dir_ino) else {
            continue;
        };
        for (ino, name) in entries {
            if !seen.insert(ino) {
                continue;
            }
            let Ok(inode) = fs.inode(ino) else { continue };
            let mode = u16_at(inode, 0)?;
            let path = format!("{dir_path}/{name}");
            match mode & S_IFMT {
                S_IFDIR => stack.push((ino, path)),
                S_IFREG => {
                    let flags = u32_at(inode, 0x20)?;
                    if flags & EXTENTS_FL == 0 || flags & INLINE_DATA_FL != 0 {
                        continue;
                    }
                    let size = le64_pair(inode, 0x4, 0x6C)?;
                    if let Ok(Some(extents)) = fs.extents(inode) {
                        if !extents.is_empty() {
                            files.push(FileEntry {
                                path,
                                size,
                                extents,
                            });
                        }
                    }
                }
                _ => {}
            }
        }
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(Ext4Files {
        block_size: fs.block_size,
        files,
    })
}

/// Entries of a directory (linear scan of every block: htree interior blocks look like one
/// empty entry to a linear reader, which is what ext4 designed them for).
fn read_dir(fs: &Fs<'_>, ino: u32) -> Result<Vec<(u32, String)>> {
    let inode = fs.inode(ino)?;
    let flags = u32_at(inode, 0x20)?;
    if flags & EXTENTS_FL == 0 || flags & INLINE_DATA_FL != 0 {
        bail!("directory {ino} is not extent-mapped");
    }
    let extents = fs
        .extents(inode)?
        .context("uninitialised directory extent")?;
    let mut out = Vec::new();
    for e in extents {
        for b in e.physical..e.physical + e.len {
            let blk = fs.block(b)?;
            let mut off = 0usize;
            while off + 8 <= blk.len() {
                let child = u32_at(blk, off)?;
                let rec_len = usize::from(u16_at(blk, off + 4)?);
                let name_len = usize::from(blk[off + 6]);
                if rec_len < 8 || off + rec_len > blk.len() {
                    break;
                }
                if child != 0 && name_len > 0 && 8 + name_len <= rec_len {
                    let name = &blk[off + 8..off + 8 + name_len];
                    if name != b"." && name != b".." {
                        out.push((child, String::from_utf8_lossy(name).into_owned()));
                    }
                }
                off += rec_len;
            }
        }
    }
    Ok(out)
}
