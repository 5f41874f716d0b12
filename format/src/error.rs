//! Typed errors of the chunk index and the delta codec.
//!
//! The updater branches on these (retry the fetch, fall back to chunks or the full image,
//! refuse the update), so each distinct cause is its own variant. Nothing here formats
//! policy: messages describe what was wrong with the bytes, not what to do next.

use std::io;

use thiserror::Error;

use crate::chunk::{Chunking, Sha256Digest};

/// Errors reading, parsing or computing a chunk index.
#[derive(Debug, Error)]
pub enum ChunkIndexError {
    #[error("reading the image: {0}")]
    Io(#[from] io::Error),
    #[error("chunk index JSON: {0}")]
    Json(serde_json::Error),
    #[error("unsupported chunk index version {0}")]
    UnsupportedVersion(u32),
    #[error("unsupported chunking parameters {0:?}")]
    BadChunking(Chunking),
    #[error("chunk {index} is empty, too long or not contiguous with the previous one")]
    BadChunk { index: usize },
    #[error("chunks end at {chunks_end} but the image size is {image_size}")]
    SizeMismatch { chunks_end: u64, image_size: u64 },
    /// The pack description is inconsistent (`index`: the first chunk concerned).
    #[error("chunk pack: {why} (chunk {index:?})")]
    BadPack {
        index: Option<usize>,
        why: &'static str,
    },
    /// A frame of the pack does not decompress to exactly its chunks.
    #[error("pack frame at byte {pack_offset} is corrupt: {why}")]
    FrameCorrupt { pack_offset: u64, why: String },
    /// A chunk decompressed from the pack does not hash to its signed sha256.
    #[error("chunk {index} (image byte {offset}) from the pack does not match its sha256")]
    ChunkHash { index: usize, offset: u64 },
}

/// Errors encoding, decoding or applying a delta.
#[derive(Debug, Error)]
pub enum DeltaError {
    /// Reading the source, writing the target, or a non-EOF error reading the delta.
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    #[error("delta truncated at byte {at}")]
    Truncated { at: u64 },
    #[error("not a delta (bad magic)")]
    BadMagic,
    #[error("unsupported delta format version {0}")]
    UnsupportedVersion(u32),
    #[error("unsupported delta header flags {0:#x}")]
    UnsupportedFlags(u32),
    #[error("unknown op tag {tag:#04x} at byte {at}")]
    UnknownOp { tag: u8, at: u64 },
    #[error("{what} of {len} exceeds the format cap of {cap} (op at byte {at})")]
    OverCap {
        what: &'static str,
        len: u64,
        cap: u64,
        at: u64,
    },
    #[error("op at byte {at} is invalid: {why}")]
    BadOp { at: u64, why: &'static str },
    #[error(
        "op at byte {at} reads source range {offset}+{len} beyond the source ({source_size} bytes)"
    )]
    SourceRange {
        at: u64,
        offset: u64,
        len: u64,
        source_size: u64,
    },
    #[error("op at byte {at} writes past the target size {target_size}")]
    TargetOverrun { at: u64, target_size: u64 },
    #[error("delta ended after {written} of {target_size} target bytes")]
    TargetShort { written: u64, target_size: u64 },
    #[error("bytes after the end op")]
    TrailingData,
    #[error("compressed data in op at byte {at} is corrupt: {why}")]
    Corrupt { at: u64, why: String },
    #[error("source is {actual} bytes, the delta expects {expected}")]
    SourceSize { expected: u64, actual: u64 },
    #[error("source sha256 is {actual:?}, the delta expects {expected:?}")]
    SourceHash {
        expected: Sha256Digest,
        actual: Sha256Digest,
    },
    #[error("target sha256 is {actual:?}, the delta promises {expected:?}")]
    TargetHash {
        expected: Sha256Digest,
        actual: Sha256Digest,
    },
}
