//! Reproducible ext4 images made from a directory tree with `mkfs.ext4 -d`.
//!
//! This module owns turning a finished tree into an ext4 filesystem, either as its own
//! file or in place at a byte offset inside a disk image, such that the same tree and the
//! same [`Ext4Spec`] always give the same bytes. It never mounts anything, never uses loop
//! devices, never builds shell strings and never touches bytes outside
//! `offset..offset + size` of the target.
//!
//! Where the nondeterminism comes from and what removes it (measured with e2fsprogs 1.47.0):
//! - UUID and directory hash seed: `-U` and `-E hash_seed=`, both derived from the recipe.
//! - Superblock times (`s_mkfs_time`, `s_wtime`, `s_lastcheck`) and the times of inodes
//!   mke2fs creates itself (root, `lost+found`, journal, `crtime` of every inode):
//!   `E2FSPROGS_FAKE_TIME`. `s_kbytes_written` only counts what mke2fs wrote, so it is
//!   stable for the same input.
//! - Directory order: mke2fs 1.47.0 sorts the entries of each source directory, so inode
//!   numbers do not depend on the order the host filesystem returns them in.
//! - **ctime and atime**: `mkfs.ext4 -d` copies `st_ctime` and `st_atime` of every source
//!   file into its inode. ctime cannot be set from user space, and mke2fs reading a file
//!   updates its atime (relatime), so a second build from the same tree differs. After
//!   mkfs we therefore set `atime`, `ctime` and `crtime` of every in-use inode to the epoch
//!   with one `debugfs -w` session (`set_inode_field <ino> ...`), using the inode bitmap
//!   printed by `dumpe2fs` to find the in-use inodes. On a copy of 25,113 files
//!   (`/usr/share/man` + `zoneinfo`, 97 MB) that pass took 0.08 s on an idle machine
//!   (0.4 s with 2 cores under load), against ~20 s (~40 s loaded) for `mkfs.ext4 -d`
//!   itself; two builds of that tree with different ctimes are byte-identical (see the
//!   ignored test `large_tree_is_reproducible_and_timed`). `mtime` is kept from the
//!   tree; [`normalize_tree`] sets it.
//! - mke2fs features come from the host's `/etc/mke2fs.conf` (we do not override
//!   `MKE2FS_CONFIG`), so byte identity holds between hosts with the same e2fsprogs
//!   version and configuration.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use filetime::FileTime;
use uuid::Uuid;

/// ext4 block size we always use (`-b 4096`).
pub const BLOCK_SIZE: u64 = 4096;
/// On-disk inode size mke2fs uses with its default configuration.
const INODE_SIZE: u64 = 256;
/// Bytes per inode mke2fs uses for `-T default` (`inode_ratio` in mke2fs.conf).
const INODE_RATIO: u64 = 16384;
/// Inodes below this number are reserved by ext4 (`s_first_ino` of revision 1).
const FIRST_INODE: u64 = 11;
/// The root directory inode.
const ROOT_INODE: u64 = 2;
const MIB: u64 = 1024 * 1024;

const MKFS: &str = "mkfs.ext4";
const DEBUGFS: &str = "debugfs";
const DUMPE2FS: &str = "dumpe2fs";

/// Everything that decides the bytes of an ext4 image besides the tree itself.
#[derive(Debug, Clone)]
pub struct Ext4Spec<'a> {
    /// Directory whose contents become the filesystem root.
    pub source: &'a Path,
    /// Filesystem label (`-L`), at most 16 bytes.
    pub label: &'a str,
    /// Filesystem UUID (`-U`); derive it from the recipe, never random.
    pub uuid: Uuid,
    /// Directory hash seed (`-E hash_seed=`); derive it from the recipe, never random.
    pub hash_seed: Uuid,
    /// Filesystem size in bytes; must be a multiple of 4096.
    pub size: u64,
    /// Timestamp used for every time mke2fs or the inodes record (SOURCE_DATE_EPOCH).
    pub epoch: i64,
    /// Whether to create a journal (a read-only root does not need one).
    pub journal: bool,
}

/// Errors callers branch on; everything else is an [`anyhow::Error`] with context.
#[derive(Debug, thiserror::Error)]
pub enum FilesystemError {
    /// The tree cannot fit into the requested filesystem size.
    #[error(
        "{label} tree {} needs {} MiB ({} MiB of files and directories in {inodes} inodes \
         plus about {} MiB of ext4 metadata) but the {label} filesystem is {} MiB",
        tree_path.display(), mib_up(*needed), mib_up(*tree), mib_up(*needed - *tree), size / MIB
    )]
    TreeTooLarge {
        label: String,
        tree_path: PathBuf,
        tree: u64,
        inodes: u64,
        needed: u64,
        size: u64,
    },
}

fn mib_up(bytes: u64) -> u64 {
    bytes.div_ceil(MIB)
}

/// What a tree will occupy in an ext4 filesystem with 4 KiB blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TreeUsage {
    /// Data and directory blocks plus inode table space, in bytes.
    pub bytes: u64,
    /// Number of inodes the tree needs (hard links counted once, root included).
    pub inodes: u64,
}

/// Set atime and mtime of every entry under `root` (and `root` itself) to `epoch`.
///
/// Symlinks get their own times set without following them.
pub fn normalize_tree(root: &Path, epoch: i64) -> Result<()> {
    let time = FileTime::from_unix_time(epoch, 0);
    // Parents after their children: listing a directory updates its atime (relatime), so
    // a directory's times are set only once it has been read.
    for entry in walkdir::WalkDir::new(root).contents_first(true) {
        let entry = entry.with_context(|| format!("walking {}", root.display()))?;
        let path = entry.path();
        filetime::set_symlink_file_times(path, time, time)
            .with_context(|| format!("setting times of {}", path.display()))?;
    }
    Ok(())
}

/// Bytes `root` needs in an ext4 filesystem: apparent file sizes rounded up to 4 KiB
/// blocks, directory blocks, long symlink targets, plus 256 bytes of inode table each.
pub fn tree_size(root: &Path) -> Result<u64> {
    Ok(tree_usage(root)?.bytes)
}

/// Like [`tree_size`], also counting inodes.
pub fn tree_usage(root: &Path) -> Result<TreeUsage> {
    let mut seen = HashSet::new();
    let mut usage = TreeUsage::default();
    for entry in walkdir::WalkDir::new(root) {
        let entry = entry.with_context(|| format!("walking {}", root.display()))?;
        let meta = entry
            .metadata()
            .with_context(|| format!("reading metadata of {}", entry.path().display()))?;
        if meta.nlink() > 1 && !meta.is_dir() && !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        usage.inodes += 1;
        usage.bytes += INODE_SIZE;
        let ft = meta.file_type();
        if ft.is_file() {
            usage.bytes += meta.len().div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
        } else if ft.is_dir() {
            // One block holds ~100 typical entries; every directory has at least one.
            let entries = fs::read_dir(entry.path())
                .with_context(|| format!("reading directory {}", entry.path().display()))?
                .count() as u64;
            usage.bytes += (entries / 100 + 1) * BLOCK_SIZE;
        } else if ft.is_symlink() && meta.len() >= 60 {
            // Targets shorter than 60 bytes live in the inode ("fast symlink").
            usage.bytes += BLOCK_SIZE;
        }
    }
    Ok(usage)
}

/// Inode count to ask mke2fs for: its default unless the tree needs more.
fn inode_count(size: u64, tree_inodes: u64) -> Option<u64> {
    let default = size / INODE_RATIO;
    let needed = FIRST_INODE + tree_inodes + tree_inodes / 8 + 16;
    (needed > default).then_some(needed)
}

/// Metadata mke2fs puts into a filesystem of `size` bytes besides the tree: inode tables,
/// the journal, bitmaps and group descriptors (estimated as 1/64 of the size).
fn metadata_overhead(size: u64, inodes: u64, journal: bool) -> u64 {
    let blocks = size / BLOCK_SIZE;
    // ext2fs_default_journal_size() in e2fsprogs 1.47.
    let journal_blocks = match (journal, blocks) {
        (false, _) | (_, 0..=2047) => 0,
        (_, 2048..=32767) => 1024,
        (_, 32768..=262_143) => 4096,
        (_, 262_144..=524_287) => 8192,
        (_, 524_288..=4_194_303) => 16384,
        (_, 4_194_304..=8_388_607) => 32768,
        _ => 65536,
    };
    inodes * INODE_SIZE + journal_blocks * BLOCK_SIZE + size / 64
}

/// Check up front that `spec.source` fits into `spec.size` bytes.
pub fn check_fits(spec: &Ext4Spec) -> Result<TreeUsage> {
    let usage = tree_usage(spec.source)?;
    let inodes = inode_count(spec.size, usage.inodes).unwrap_or(spec.size / INODE_RATIO);
    // The tree's own inode bytes are part of the inode table, which the overhead counts.
    let data = usage.bytes - usage.inodes * INODE_SIZE;
    let needed = data + metadata_overhead(spec.size, inodes, spec.journal);
    if needed > spec.size {
        return Err(FilesystemError::TreeTooLarge {
            label: spec.label.to_string(),
            tree_path: spec.source.to_path_buf(),
            tree: usage.bytes,
            inodes: usage.inodes,
            needed,
            size: spec.size,
        }
        .into());
    }
    Ok(usage)
}

/// The name e2fsprogs tools open: `path` or `path?offset=N` (unix_io's option syntax).
fn e2fs_device_name(target: &Path, offset: u64) -> Result<String> {
    let name = target
        .to_str()
        .with_context(|| format!("{} is not valid UTF-8", target.display()))?;
    if name.contains('?') {
        // libext2fs splits a device name at the first '?' into name and I/O options.
        bail!("{name}: e2fsprogs cannot open a path containing '?'");
    }
    Ok(if offset == 0 {
        name.to_string()
    } else {
        format!("{name}?offset={offset}")
    })
}

/// Make an ext4 filesystem from `spec.source` in `target`.
///
/// With `offset == 0` the file is (re)created with exactly `spec.size` bytes. Otherwise it
/// must already exist and span `offset + spec.size` bytes; only that range is written.
pub fn make_ext4(spec: &Ext4Spec, target: &Path, offset: u64) -> Result<()> {
    if spec.size == 0 || spec.size % BLOCK_SIZE != 0 {
        bail!(
            "ext4 size for {} must be a non-zero multiple of {BLOCK_SIZE} bytes, got {}",
            spec.label,
            spec.size
        );
    }
    if spec.label.len() > 16 {
        bail!("ext4 label {:?} is longer than 16 bytes", spec.label);
    }
    let device = e2fs_device_name(target, offset)?;
    let usage = check_fits(spec)?;

    if offset == 0 {
        let file = File::create(target)
            .with_context(|| format!("creating ext4 image {}", target.display()))?;
        file.set_len(spec.size)
            .with_context(|| format!("sizing {} to {} bytes", target.display(), spec.size))?;
    } else {
        let len = fs::metadata(target)
            .with_context(|| format!("reading metadata of {}", target.display()))?
            .len();
        if len < offset + spec.size {
            bail!(
                "{}: filesystem {} at offset {offset} with {} bytes would end past the file's \
                 end ({len} bytes)",
                target.display(),
                spec.label,
                spec.size
            );
        }
    }

    let mut extended = format!("hash_seed={},root_owner=0:0", spec.hash_seed);
    if offset != 0 {
        extended.push_str(&format!(",offset={offset}"));
    }
    let mut cmd = Command::new(MKFS);
    cmd.args(["-q", "-F", "-T", "default", "-b", "4096"])
        .arg("-d")
        .arg(spec.source)
        .args(["-L", spec.label])
        // Made with the hash seed as UUID so that the metadata checksum seed (fixed by
        // `metadata_csum_seed`) comes from it; the real UUID is set afterwards. Two
        // versions built with the same hash seed then share every unchanged metadata
        // block, which keeps deltas between them small.
        .args(["-U", &spec.hash_seed.to_string()])
        .args(["-E", &extended]);
    if spec.journal {
        cmd.args(["-O", "metadata_csum_seed"]);
    } else {
        cmd.args(["-O", "^has_journal,metadata_csum_seed"]);
    }
    if let Some(n) = inode_count(spec.size, usage.inodes) {
        cmd.args(["-N", &n.to_string()]);
    }
    cmd.arg(target).arg(format!("{}k", spec.size / 1024));
    let output = run(&mut cmd, spec.epoch, None)
        .with_context(|| format!("running {MKFS} for {}", target.display()))?;
    if !output.status.success() {
        if offset == 0 {
            // A half-made image must not be mistaken for a finished one.
            let _ = fs::remove_file(target);
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        let hint = if stderr.contains("Could not allocate block") {
            " (the tree does not fit: raise the filesystem size)"
        } else if stderr.contains("Could not allocate inode") {
            " (too many files for the inode count)"
        } else {
            ""
        };
        bail!(
            "{MKFS} failed for {} ({}){hint}: {}",
            target.display(),
            output.status,
            stderr.trim()
        );
    }

    let mut tune = Command::new("tune2fs");
    tune.args(["-U", &spec.uuid.to_string()]).arg(&device);
    let output = run(&mut tune, spec.epoch, None)
        .with_context(|| format!("running tune2fs for {}", target.display()))?;
    if !output.status.success() {
        if offset == 0 {
            let _ = fs::remove_file(target);
        }
        bail!(
            "tune2fs -U failed for {} ({}): {}",
            target.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }

    reset_inode_times(&device, spec.epoch)
        .with_context(|| format!("normalizing inode times in {}", target.display()))
}

/// Run `cmd` with the reproducibility environment, feeding `stdin` from a thread so a
/// chatty child cannot deadlock us.
fn run(cmd: &mut Command, epoch: i64, stdin: Option<String>) -> Result<std::process::Output> {
    cmd.env("E2FSPROGS_FAKE_TIME", epoch.to_string())
        .env("SOURCE_DATE_EPOCH", epoch.to_string())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
    let writer = match (stdin, child.stdin.take()) {
        (Some(input), Some(mut pipe)) => {
            Some(std::thread::spawn(move || pipe.write_all(input.as_bytes())))
        }
        _ => None,
    };
    let output = child
        .wait_with_output()
        .with_context(|| format!("waiting for {cmd:?}"))?;
    if let Some(writer) = writer {
        writer
            .join()
            .map_err(|_| anyhow::anyhow!("stdin writer thread panicked"))?
            .with_context(|| format!("writing commands to {cmd:?}"))?;
    }
    Ok(output)
}

/// Set atime, ctime and crtime of every in-use inode to `epoch` (see the module docs).
fn reset_inode_times(device: &str, epoch: i64) -> Result<()> {
    let output = run(Command::new(DUMPE2FS).arg(device), epoch, None)?;
    if !output.status.success() {
        bail!(
            "{DUMPE2FS} {device} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let bitmap = InodeBitmap::parse(&String::from_utf8_lossy(&output.stdout))
        .with_context(|| format!("parsing {DUMPE2FS} output for {device}"))?;
    let mut commands = String::new();
    for ino in bitmap.used_inodes() {
        if ino == ROOT_INODE || ino >= FIRST_INODE {
            for field in ["atime", "ctime", "crtime"] {
                commands.push_str(&format!("set_inode_field <{ino}> {field} @{epoch}\n"));
            }
        }
    }
    let mut cmd = Command::new(DEBUGFS);
    cmd.args(["-w", "-f", "-", device]);
    let output = run(&mut cmd, epoch, Some(commands))?;
    // debugfs exits 0 even when a command fails; failures show up on stderr, after the
    // version banner.
    let stderr = String::from_utf8_lossy(&output.stderr);
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("debugfs "))
        .collect();
    if !output.status.success() || !errors.is_empty() {
        bail!(
            "{DEBUGFS} -w {device} failed ({}): {}",
            output.status,
            errors.join("; ")
        );
    }
    Ok(())
}

/// Which inodes are in use, read from `dumpe2fs` output.
#[derive(Debug, PartialEq, Eq)]
struct InodeBitmap {
    inode_count: u64,
    /// Free inode ranges (inclusive), from every group's "Free inodes:" line.
    free: Vec<(u64, u64)>,
}

impl InodeBitmap {
    fn parse(text: &str) -> Result<InodeBitmap> {
        let mut inode_count = None;
        let mut free = Vec::new();
        for line in text.lines() {
            if let Some(v) = line.strip_prefix("Inode count:") {
                inode_count = Some(
                    v.trim()
                        .parse::<u64>()
                        .with_context(|| format!("bad inode count line {line:?}"))?,
                );
            } else if let Some(list) = line.trim_start().strip_prefix("Free inodes:") {
                // The per-group lines are indented; the superblock's total is not.
                if !line.starts_with(' ') {
                    continue;
                }
                for range in list.split(',').map(str::trim).filter(|r| !r.is_empty()) {
                    let (a, b) = range.split_once('-').unwrap_or((range, range));
                    let parse = |s: &str| {
                        s.trim()
                            .parse::<u64>()
                            .with_context(|| format!("bad free inode range {range:?}"))
                    };
                    free.push((parse(a)?, parse(b)?));
                }
            }
        }
        let inode_count = inode_count.context("no \"Inode count:\" line")?;
        Ok(InodeBitmap { inode_count, free })
    }

    /// In-use inode numbers: the complement of the free ranges, in ascending order.
    fn used_inodes(&self) -> Vec<u64> {
        let mut free = self.free.clone();
        free.sort_unstable();
        let mut used = Vec::new();
        let mut next = 1;
        for (a, b) in free {
            used.extend(next..a.min(self.inode_count + 1));
            next = next.max(b + 1);
        }
        used.extend(next..=self.inode_count);
        used
    }
}

#[cfg(test)]
mod tests;
