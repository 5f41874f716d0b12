//! Delta generation X→Y and chunk indexes, on the builder side.
//!
//! [`make_delta`] writes a delta (format in `imgformat::delta`, spec `docs/delta-format.md`)
//! in two stages over one sequential walk of the new image Y:
//!
//! 1. file level: the builder made both ext4 images, so it reads each file's extents in
//!    both (`delta::ext4`) and, for each changed file of Y, diffs it (bsdiff-style, via
//!    `bidiff`) against its old version at the same path or against a renamed sibling (same
//!    path once digit runs are normalised: `/usr/lib/modules/6.1.0-25-amd64/x.ko` ↔
//!    `…/6.1.0-26-amd64/x.ko`), emitting a `FileDiff` op for the file's blocks;
//! 2. block level, for everything else (metadata, directories, unchanged or new files):
//!    each 4 KiB block is a `Zero`, a `CopySource` of an identical block of X (found by
//!    hash, preferring the continuation of the previous copy) or `Literal` zstd data.
//!
//! This module owns the policy of which op to emit; it must never define the byte format
//! (that is `imgformat`'s) and never publishes or signs anything.

pub mod ext4;

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::fs::File;
use std::hash::{Hash, Hasher};
use std::io::{self, BufReader, BufWriter};
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use imgformat::chunk::{ChunkIndex, Chunking, Sha256Digest};
use imgformat::delta::{
    apply_with, ApplyOptions, DeltaHeader, DeltaWriter, Extent, Patch, PatchBuilder, MAX_EXTENTS,
    MAX_PATCH_BUFFER,
};

pub use imgformat::chunk::{chunks_missing, ChunkSource, FetchPlan};

/// Largest piece of one file diffed as one op (bounds the patch and the diff time).
const MAX_PIECE: u64 = 64 << 20;

/// Options of [`make_delta`].
#[derive(Debug, Clone)]
pub struct DeltaOptions {
    /// zstd level of the delta's op stream.
    pub level: i32,
    /// Run the file-level stage (needs two ext4 images; silently off otherwise).
    pub file_diff: bool,
    /// Apply the written delta to the old image and check the result's hash.
    pub verify: bool,
}

impl Default for DeltaOptions {
    fn default() -> Self {
        Self {
            level: 19,
            file_diff: true,
            verify: true,
        }
    }
}

/// What [`make_delta`] produced.
#[derive(Debug, Clone, Default)]
pub struct DeltaStats {
    pub source_size: u64,
    pub target_size: u64,
    pub delta_size: u64,
    /// Target bytes per kind of op.
    pub copied: u64,
    pub zeroed: u64,
    pub literal: u64,
    pub file_diff: u64,
    /// Uncompressed patch bytes (controls, extra and diff bytes) of all `FileDiff` ops.
    pub patch_bytes: u64,
    /// Pieces whose patch was dropped for literal data (no better than compression).
    pub patches_dropped: u64,
    /// Files diffed against the file at the same path / against a renamed sibling.
    pub files_same_path: u64,
    pub files_renamed: u64,
    /// Seconds spent.
    pub seconds: f64,
}

/// Chunk index of an image file with the default chunking.
pub fn chunk_index(image: &Path) -> Result<ChunkIndex> {
    chunk_index_with(image, Chunking::default())
}

/// Chunk index of an image file with the given chunking.
pub fn chunk_index_with(image: &Path, chunking: Chunking) -> Result<ChunkIndex> {
    let f = File::open(image).with_context(|| format!("opening {}", image.display()))?;
    ChunkIndex::compute(BufReader::with_capacity(1 << 20, f), chunking)
        .with_context(|| format!("chunking {}", image.display()))
}

/// A run of new-image blocks that belongs to one changed file with an old counterpart.
#[derive(Debug, Clone)]
struct Piece {
    start: u64,
    len: u64,
    /// The old counterpart's data as byte extents of the old image.
    reference: Vec<Extent>,
    renamed: bool,
}

/// A path with every run of ASCII digits replaced by `#`: the key for renamed siblings.
fn sibling_key(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut in_digits = false;
    for c in path.chars() {
        if c.is_ascii_digit() {
            if !in_digits {
                out.push('#');
            }
            in_digits = true;
        } else {
            out.push(c);
            in_digits = false;
        }
    }
    out
}

fn merged_extents(extents: &[ext4::FileExtent]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for e in extents {
        if let Some(last) = out.last_mut() {
            if last.0 + last.1 == e.physical {
                last.1 += e.len;
                continue;
            }
        }
        out.push((e.physical, e.len));
    }
    out
}

/// Pair each file of the new image with its old counterpart and cut its blocks into pieces.
fn plan_pieces(old: &[u8], new: &[u8], bs: u64) -> Result<Vec<Piece>> {
    let old_fs = ext4::walk(old).context("reading the old image as ext4")?;
    let new_fs = ext4::walk(new).context("reading the new image as ext4")?;
    if old_fs.block_size != bs || new_fs.block_size != bs {
        bail!(
            "block sizes {} / {} differ from {bs}",
            old_fs.block_size,
            new_fs.block_size
        );
    }
    let by_path: HashMap<&str, &ext4::FileEntry> =
        old_fs.files.iter().map(|f| (f.path.as_str(), f)).collect();
    let mut by_key: HashMap<String, Vec<&ext4::FileEntry>> = HashMap::new();
    for f in &old_fs.files {
        by_key.entry(sibling_key(&f.path)).or_default().push(f);
    }
    let mut pieces = Vec::new();
    for nf in &new_fs.files {
        let (of, renamed) = match by_path.get(nf.path.as_str()) {
            Some(of) => (*of, false),
            None => match by_key
                .get(&sibling_key(&nf.path))
                .and_then(|c| c.iter().min_by_key(|of| of.size.abs_diff(nf.size)).copied())
            {
                Some(of) => (of, true),
                None => continue,
            },
        };
        let reference: Vec<Extent> = merged_extents(&of.extents)
            .into_iter()
            .map(|(p, l)| Extent {
                offset: p * bs,
                len: l * bs,
            })
            .collect();
        // A truncated old image may claim blocks it does not have.
        if reference.is_empty()
            || reference.len() > MAX_EXTENTS as usize
            || reference
                .iter()
                .any(|e| e.offset + e.len > old.len() as u64)
        {
            continue;
        }
        for (phys, len) in merged_extents(&nf.extents) {
            let max_blocks = (MAX_PIECE / bs).max(1);
            let mut s = 0;
            while s < len {
                let n = (len - s).min(max_blocks);
                pieces.push(Piece {
                    start: phys + s,
                    len: n,
                    reference: reference.clone(),
                    renamed,
                });
                s += n;
            }
        }
    }
    pieces.sort_by_key(|p| p.start);
    // Defensive: a corrupt image could claim overlapping blocks; keep the first.
    let mut end = 0;
    pieces.retain(|p| {
        let keep = p.start >= end;
        if keep {
            end = p.start + p.len;
        }
        keep
    });
    Ok(pieces)
}

/// bsdiff-style patch turning `reference` into `data`.
fn diff_patch(reference: &[u8], data: &[u8]) -> Result<Patch> {
    let mut pb = PatchBuilder::new();
    let mut old_pos: i64 = 0;
    let mut new_pos: usize = 0;
    let mut diff = Vec::new();
    let params = bidiff::DiffParams::default();
    bidiff::diff(reference, data, &params, |m| -> io::Result<()> {
        let bad = || io::Error::other("bidiff produced an out-of-range match");
        if m.add_new_start < new_pos {
            return Err(bad());
        }
        if m.add_new_start > new_pos {
            pb.push(0, &[], data.get(new_pos..m.add_new_start).ok_or_else(bad)?);
        }
        let n = data
            .get(m.add_new_start..m.add_new_start + m.add_length)
            .ok_or_else(bad)?;
        let o = reference
            .get(m.add_old_start..m.add_old_start + m.add_length)
            .ok_or_else(bad)?;
        diff.clear();
        diff.extend(n.iter().zip(o).map(|(n, o)| n.wrapping_sub(*o)));
        let extra = data.get(m.copy_start()..m.copy_end).ok_or_else(bad)?;
        pb.push(m.add_old_start as i64 - old_pos, &diff, extra);
        old_pos = (m.add_old_start + m.add_length) as i64;
        new_pos = m.copy_end;
        Ok(())
    })?;
    if new_pos < data.len() {
        pb.push(0, &[], &data[new_pos..]);
    }
    Ok(pb.finish())
}

/// Size of `parts`, concatenated, compressed at zstd level 3 (an estimate of their cost).
fn compressed_len(parts: &[&[u8]]) -> io::Result<u64> {
    struct Count(u64);
    impl io::Write for Count {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0 += b.len() as u64;
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let mut enc = zstd::stream::write::Encoder::new(Count(0), 3)?;
    for p in parts {
        io::Write::write_all(&mut enc, p)?;
    }
    Ok(enc.finish()?.0)
}

fn block_hash(b: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    b.hash(&mut h);
    h.finish()
}

/// Finds blocks of the old image equal to a given block.
struct BlockMatcher<'a> {
    old: &'a [u8],
    bs: usize,
    index: HashMap<u64, u64>,
    /// Old block after the previous match: tried first so copies form long runs.
    next: Option<u64>,
}

impl<'a> BlockMatcher<'a> {
    fn new(old: &'a [u8], bs: usize) -> Self {
        let mut index = HashMap::new();
        for (i, b) in old.chunks_exact(bs).enumerate() {
            if b.iter().any(|&x| x != 0) {
                index.entry(block_hash(b)).or_insert(i as u64);
            }
        }
        Self {
            old,
            bs,
            index,
            next: None,
        }
    }

    fn old_block(&self, i: u64) -> Option<&'a [u8]> {
        let s = (i as usize).checked_mul(self.bs)?;
        self.old.get(s..s + self.bs)
    }

    /// An old block equal to `block`, without moving the continuation cursor.
    fn lookup(&self, block: &[u8], same_index: u64) -> Option<u64> {
        [self.next, Some(same_index)]
            .into_iter()
            .flatten()
            .find(|&i| self.old_block(i) == Some(block))
            .or_else(|| {
                let i = *self.index.get(&block_hash(block))?;
                (self.old_block(i) == Some(block)).then_some(i)
            })
    }

    fn find(&mut self, block: &[u8], same_index: u64) -> Option<u64> {
        let hit = self.lookup(block, same_index);
        self.next = hit.map(|i| i + 1);
        hit
    }
}

fn is_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

/// Block-level stage for new-image block `b`.
fn emit_block<W: io::Write>(
    w: &mut DeltaWriter<W>,
    stats: &mut DeltaStats,
    matcher: &mut BlockMatcher<'_>,
    new_img: &[u8],
    b: u64,
) -> Result<()> {
    let bs = matcher.bs as u64;
    let blk = &new_img[(b * bs) as usize..((b + 1) * bs) as usize];
    if is_zero(blk) {
        w.zero(bs)?;
        stats.zeroed += bs;
    } else if let Some(src) = matcher.find(blk, b) {
        w.copy_source(src * bs, bs)?;
        stats.copied += bs;
    } else {
        w.literal(blk)?;
        stats.literal += bs;
    }
    Ok(())
}

fn read_image(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// Write a delta `old` → `new` to `out`.
pub fn make_delta(old: &Path, new: &Path, out: &Path, opts: &DeltaOptions) -> Result<DeltaStats> {
    let t0 = Instant::now();
    let old_img = read_image(old)?;
    let new_img = read_image(new)?;
    let header = DeltaHeader {
        source_size: old_img.len() as u64,
        source_sha256: Sha256Digest::of(&old_img),
        target_size: new_img.len() as u64,
        target_sha256: Sha256Digest::of(&new_img),
    };
    let bs: u64 = 4096;
    let pieces = if opts.file_diff {
        match plan_pieces(&old_img, &new_img, bs) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!("file-level stage off: {e:#}");
                Vec::new()
            }
        }
    } else {
        Vec::new()
    };
    let file = File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut w = DeltaWriter::new(BufWriter::with_capacity(1 << 20, file), header, opts.level)
        .with_context(|| format!("writing {}", out.display()))?;
    let mut stats = DeltaStats {
        source_size: header.source_size,
        target_size: header.target_size,
        ..DeltaStats::default()
    };
    let mut matcher = BlockMatcher::new(&old_img, bs as usize);
    let bsz = bs as usize;
    let full_blocks = new_img.len() as u64 / bs;
    let mut b = 0u64;
    let mut pieces = pieces.into_iter().peekable();
    let mut reference_buf = Vec::new();
    while b < full_blocks {
        while pieces.peek().is_some_and(|p| p.start < b) {
            pieces.next();
        }
        let piece = match pieces.peek() {
            Some(p) if p.start == b && p.start + p.len <= full_blocks => pieces.next(),
            _ => None,
        };
        let Some(p) = piece else {
            emit_block(&mut w, &mut stats, &mut matcher, &new_img, b)?;
            b += 1;
            continue;
        };
        let data = &new_img[(p.start * bs) as usize..((p.start + p.len) * bs) as usize];
        // A file whose blocks all exist in the old image is cheaper as copies.
        let all_known = data
            .chunks_exact(bsz)
            .enumerate()
            .all(|(i, blk)| is_zero(blk) || matcher.lookup(blk, p.start + i as u64).is_some());
        let patch = if all_known {
            None
        } else {
            reference_buf.clear();
            for e in &p.reference {
                reference_buf
                    .extend_from_slice(&old_img[e.offset as usize..(e.offset + e.len) as usize]);
            }
            diff_patch(&reference_buf, data).ok()
        };
        // A patch against an unrelated old file is no better than literal data (compressed
        // files, rewritten files): keep it only when a fast compression of it is clearly
        // smaller than one of the piece (both end up in the same zstd stream).
        let worth_it = |patch: &Patch| -> bool {
            patch.buffered_len() <= MAX_PATCH_BUFFER as usize
                && match (
                    compressed_len(&patch.stream_parts()),
                    compressed_len(&[data]),
                ) {
                    (Ok(p), Ok(d)) => (p as f64) < d as f64 * 0.85,
                    _ => true,
                }
        };
        match patch {
            Some(patch) if worth_it(&patch) => {
                w.file_diff(&p.reference, p.len * bs, &patch)?;
                stats.file_diff += p.len * bs;
                stats.patch_bytes += patch.len() as u64;
                if p.renamed {
                    stats.files_renamed += 1;
                } else {
                    stats.files_same_path += 1;
                }
            }
            other => {
                if other.is_some() {
                    stats.patches_dropped += 1;
                }
                for k in p.start..p.start + p.len {
                    emit_block(&mut w, &mut stats, &mut matcher, &new_img, k)?;
                }
            }
        }
        b = p.start + p.len;
    }
    let tail = &new_img[(full_blocks * bs) as usize..];
    if !tail.is_empty() {
        if is_zero(tail) {
            w.zero(tail.len() as u64)?;
            stats.zeroed += tail.len() as u64;
        } else {
            w.literal(tail)?;
            stats.literal += tail.len() as u64;
        }
    }
    let mut writer = w.finish().context("finishing the delta")?;
    io::Write::flush(&mut writer)?;
    drop(writer);
    stats.delta_size = std::fs::metadata(out)
        .with_context(|| format!("stat {}", out.display()))?
        .len();
    if opts.verify {
        drop(old_img);
        drop(new_img);
        let src = File::open(old).with_context(|| format!("opening {}", old.display()))?;
        let delta = File::open(out).with_context(|| format!("opening {}", out.display()))?;
        apply_with(
            src,
            delta,
            io::sink(),
            ApplyOptions {
                verify_source: false,
            },
        )
        .context("verifying the delta by applying it")?;
    }
    stats.seconds = t0.elapsed().as_secs_f64();
    Ok(stats)
}

#[cfg(test)]
mod tests;
