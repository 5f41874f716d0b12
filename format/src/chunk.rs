//! The chunk index of a root image: how the image is cut into chunks, each chunk's offset,
//! length and sha256, and the whole image's sha256 and size.
//!
//! The index is a TUF target (signed transitively by the channel), serialised as JSON.
//! It serves the any-to-any fallback: a node that has no delta from its version fetches only
//! the chunks its own slot cannot supply ([`chunks_missing`]). This module owns the type,
//! the chunkers (pure functions over [`Read`]) and the planning; it must never open files,
//! fetch anything or decide policy (which mirror, how many retries) — that is the updater's.
//!
//! Version 2 adds the chunk pack ([`crate::pack`]): each chunk also names the zstd frame of
//! the pack that holds it, so a node can fetch only the frames it lacks with HTTP Range
//! requests and check every chunk against its signed sha256 before writing it anywhere.
//!
//! Chunking was chosen by measurement on ext4 root image pairs (figures in
//! `docs/delta-format.md`): a new root image places files at different 4 KiB blocks than
//! the old one, so fixed chunks larger than a block lose almost everything, and 4 KiB fixed
//! chunks make a huge index. Content-defined chunking (FastCDC, 4/16/64 KiB) resynchronises
//! after every shift and is the default.

use std::collections::HashMap;
use std::io::{self, Read};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::ChunkIndexError;

/// Format version of the chunk index this crate writes (2: with the chunk pack).
pub const CHUNK_INDEX_VERSION: u32 = 2;

/// Oldest format version readers accept (1: no pack; a node then seeds from its slot and
/// takes the missing chunks from the full image).
pub const MIN_CHUNK_INDEX_VERSION: u32 = 1;

/// Largest uncompressed frame of a chunk pack; bounds what a node buffers per frame.
pub const MAX_FRAME_LEN: u64 = 4 * 1024 * 1024;

/// Largest decompressed chunk index [`ChunkIndex::from_bytes`] reads (a 1.5 GiB image in
/// 4 KiB fixed chunks is about 60 MB of version 2 JSON).
pub const MAX_INDEX_JSON: u64 = 256 * 1024 * 1024;

const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// Compression of every frame of a chunk pack.
pub const PACK_COMPRESSION: &str = "zstd";

/// Largest chunk the index may describe; bounds what a node buffers per chunk.
pub const MAX_CHUNK_LEN: u32 = 4 * 1024 * 1024;

/// A sha256 digest, serialised as lowercase hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sha256Digest(pub [u8; 32]);

impl Sha256Digest {
    /// Digest of `data`.
    pub fn of(data: &[u8]) -> Self {
        Self(Sha256::digest(data).into())
    }

    /// Lowercase hex form.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl std::fmt::Debug for Sha256Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256:{}", self.to_hex())
    }
}

impl std::fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl Serialize for Sha256Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Sha256Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(&s, &mut out).map_err(serde::de::Error::custom)?;
        Ok(Self(out))
    }
}

/// How an image was cut into chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Chunking {
    /// Consecutive chunks of `size` bytes (the last one may be shorter).
    Fixed { size: u32 },
    /// FastCDC (2020 variant, normalisation level 1) with these size bounds.
    FastCdc { min: u32, avg: u32, max: u32 },
}

impl Default for Chunking {
    /// FastCDC with 4 KiB minimum, 16 KiB average, 64 KiB maximum chunks.
    fn default() -> Self {
        Chunking::FastCdc {
            min: 4 << 10,
            avg: 16 << 10,
            max: 64 << 10,
        }
    }
}

/// One chunk of the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    pub offset: u64,
    pub len: u32,
    pub sha256: Sha256Digest,
    /// Byte offset in the chunk pack of the zstd frame holding this chunk (version 2 with
    /// a pack only). Consecutive chunks may share one frame: they then carry the same
    /// `pack_offset` and `pack_len`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pack_offset: Option<u64>,
    /// Compressed length of that frame.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pack_len: Option<u32>,
}

impl Chunk {
    /// A chunk not (yet) placed in a pack.
    pub fn new(offset: u64, len: u32, sha256: Sha256Digest) -> Self {
        Self {
            offset,
            len,
            sha256,
            pack_offset: None,
            pack_len: None,
        }
    }
}

/// The chunk pack of an image: a TUF target holding the image as consecutive zstd frames,
/// each frame one chunk or a run of consecutive chunks. Concatenated, the frames are one
/// valid zstd stream of the whole image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackInfo {
    /// TUF target name of the pack.
    pub target: String,
    /// [`PACK_COMPRESSION`].
    pub compression: String,
    /// Length of the pack file (what `targets.json` signs).
    pub size: u64,
    /// sha256 of the pack file (what `targets.json` signs).
    pub sha256: Sha256Digest,
}

/// One zstd frame of a chunk pack, derived from the chunks that share it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Offset of the frame in the pack.
    pub pack_offset: u64,
    /// Compressed length.
    pub pack_len: u32,
    /// The chunks it holds (indexes into [`ChunkIndex::chunks`]).
    pub chunks: std::ops::Range<usize>,
    /// Offset in the image of its first byte.
    pub offset: u64,
    /// Uncompressed length (sum of its chunks).
    pub len: u64,
}

impl Frame {
    /// Offset in the pack just past the frame.
    pub fn pack_end(&self) -> u64 {
        self.pack_offset + u64::from(self.pack_len)
    }
}

/// The chunk index of one image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkIndex {
    pub version: u32,
    pub chunking: Chunking,
    pub image_size: u64,
    pub image_sha256: Sha256Digest,
    pub chunks: Vec<Chunk>,
    /// The chunk pack, when one was published (version 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pack: Option<PackInfo>,
}

impl ChunkIndex {
    /// Cut `image` into chunks and hash them and the whole image, in one sequential pass.
    pub fn compute(mut image: impl Read, chunking: Chunking) -> Result<Self, ChunkIndexError> {
        validate_chunking(chunking)?;
        let mut whole = Sha256::new();
        let mut chunks = Vec::new();
        let mut offset = 0u64;
        match chunking {
            Chunking::Fixed { size } => {
                let mut buf = vec![0u8; size as usize];
                loop {
                    let n = read_full(&mut image, &mut buf)?;
                    if n == 0 {
                        break;
                    }
                    whole.update(&buf[..n]);
                    chunks.push(Chunk::new(offset, n as u32, Sha256Digest::of(&buf[..n])));
                    offset += n as u64;
                    if n < buf.len() {
                        break;
                    }
                }
            }
            Chunking::FastCdc { min, avg, max } => {
                for c in fastcdc::v2020::StreamCDC::new(image, min, avg, max) {
                    let c = c.map_err(|e| match e {
                        fastcdc::v2020::Error::IoError(e) => ChunkIndexError::Io(e),
                        other => ChunkIndexError::Io(io::Error::other(other.to_string())),
                    })?;
                    whole.update(&c.data);
                    chunks.push(Chunk::new(
                        c.offset,
                        c.length as u32,
                        Sha256Digest::of(&c.data),
                    ));
                    offset = c.offset + c.length as u64;
                }
            }
        }
        Ok(Self {
            version: CHUNK_INDEX_VERSION,
            chunking,
            image_size: offset,
            image_sha256: Sha256Digest(whole.finalize().into()),
            chunks,
            pack: None,
        })
    }

    /// Serialise as JSON (the TUF target's bytes).
    pub fn to_json(&self) -> Result<Vec<u8>, ChunkIndexError> {
        serde_json::to_vec(self).map_err(ChunkIndexError::Json)
    }

    /// Parse and validate: known version, chunks contiguous from 0 to `image_size`, each
    /// chunk non-empty and at most [`MAX_CHUNK_LEN`], and, with a pack, frames that tile
    /// the pack (see [`ChunkIndex::frames`]).
    pub fn from_json(bytes: &[u8]) -> Result<Self, ChunkIndexError> {
        let idx: Self = serde_json::from_slice(bytes).map_err(ChunkIndexError::Json)?;
        idx.validate()?;
        Ok(idx)
    }

    /// As [`ChunkIndex::from_json`], for the bytes of a chunk index target that may also be
    /// one zstd frame of that JSON (recognised by the zstd magic, which JSON never starts
    /// with). Readers accept both so that publishers can switch to a compressed index
    /// (a 5.2 MB index compresses to 1.3 MB) once nodes read it. Decompression stops at
    /// [`MAX_INDEX_JSON`] bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ChunkIndexError> {
        if !bytes.starts_with(&ZSTD_MAGIC) {
            return Self::from_json(bytes);
        }
        let mut json = Vec::new();
        let dec = zstd::Decoder::new(bytes).map_err(ChunkIndexError::Io)?;
        dec.take(MAX_INDEX_JSON + 1)
            .read_to_end(&mut json)
            .map_err(ChunkIndexError::Io)?;
        if json.len() as u64 > MAX_INDEX_JSON {
            return Err(ChunkIndexError::Io(io::Error::other(
                "compressed chunk index larger than the cap",
            )));
        }
        Self::from_json(&json)
    }

    /// Check the invariants [`ChunkIndex::from_json`] promises.
    pub fn validate(&self) -> Result<(), ChunkIndexError> {
        if !(MIN_CHUNK_INDEX_VERSION..=CHUNK_INDEX_VERSION).contains(&self.version) {
            return Err(ChunkIndexError::UnsupportedVersion(self.version));
        }
        validate_chunking(self.chunking)?;
        let mut next = 0u64;
        for (i, c) in self.chunks.iter().enumerate() {
            if c.offset != next || c.len == 0 || c.len > MAX_CHUNK_LEN {
                return Err(ChunkIndexError::BadChunk { index: i });
            }
            next = next
                .checked_add(u64::from(c.len))
                .ok_or(ChunkIndexError::BadChunk { index: i })?;
        }
        if next != self.image_size {
            return Err(ChunkIndexError::SizeMismatch {
                chunks_end: next,
                image_size: self.image_size,
            });
        }
        self.check_frames().map(|_| ())
    }

    /// The frames of the chunk pack in pack order (empty without a pack). Valid indexes
    /// only (as [`ChunkIndex::from_json`] returns them).
    pub fn frames(&self) -> Vec<Frame> {
        self.check_frames().unwrap_or_default()
    }

    /// Frames must tile the pack: the first at 0, each starting where the previous one
    /// ends, the last ending at the pack size; a frame holds consecutive chunks, at most
    /// [`MAX_FRAME_LEN`] bytes of them, and is no longer than zstd's bound for them.
    fn check_frames(&self) -> Result<Vec<Frame>, ChunkIndexError> {
        let bad = |index: Option<usize>, why: &'static str| ChunkIndexError::BadPack { index, why };
        let Some(pack) = &self.pack else {
            if let Some(i) = self
                .chunks
                .iter()
                .position(|c| c.pack_offset.is_some() || c.pack_len.is_some())
            {
                return Err(bad(Some(i), "pack location without a pack"));
            }
            return Ok(Vec::new());
        };
        if self.version < 2 {
            return Err(bad(None, "a version 1 index has no pack"));
        }
        if pack.compression != PACK_COMPRESSION {
            return Err(bad(None, "unknown pack compression"));
        }
        let mut frames: Vec<Frame> = Vec::new();
        for (i, c) in self.chunks.iter().enumerate() {
            let (Some(off), Some(len)) = (c.pack_offset, c.pack_len) else {
                return Err(bad(Some(i), "chunk without a pack location"));
            };
            match frames.last_mut() {
                Some(f) if f.pack_offset == off && f.pack_len == len => {
                    f.chunks.end = i + 1;
                    f.len += u64::from(c.len);
                    if f.len > MAX_FRAME_LEN {
                        return Err(bad(Some(i), "frame longer than the cap"));
                    }
                }
                last => {
                    let start = last.map_or(0, |f| f.pack_end());
                    if off != start {
                        return Err(bad(Some(i), "frame does not start where the previous ends"));
                    }
                    frames.push(Frame {
                        pack_offset: off,
                        pack_len: len,
                        chunks: i..i + 1,
                        offset: c.offset,
                        len: u64::from(c.len),
                    });
                }
            }
        }
        for f in &frames {
            if f.pack_len == 0 || u64::from(f.pack_len) > max_frame_pack_len(f.len) {
                return Err(bad(Some(f.chunks.start), "frame length out of bounds"));
            }
        }
        if frames.last().map_or(0, Frame::pack_end) != pack.size {
            return Err(bad(None, "frames do not end at the pack size"));
        }
        Ok(frames)
    }
}

/// The longest compressed frame a reader accepts for `len` uncompressed bytes: zstd's
/// worst case (`ZSTD_COMPRESSBOUND`) plus room for a frame header.
pub fn max_frame_pack_len(len: u64) -> u64 {
    len + len / 256 + 64 + (128u64 << 10).saturating_sub(len) / 2048 + 32
}

fn validate_chunking(chunking: Chunking) -> Result<(), ChunkIndexError> {
    let ok = match chunking {
        Chunking::Fixed { size } => size > 0 && size <= MAX_CHUNK_LEN,
        Chunking::FastCdc { min, avg, max } => {
            // fastcdc's own bounds (it panics outside them, so check first).
            (64..=1_048_576).contains(&min)
                && (256..=4_194_304).contains(&avg)
                && (1024..=16_777_216).contains(&max)
                && min <= avg
                && avg <= max
                && max <= MAX_CHUNK_LEN
        }
    };
    if ok {
        Ok(())
    } else {
        Err(ChunkIndexError::BadChunking(chunking))
    }
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Where one target chunk comes from in a [`FetchPlan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkSource {
    /// The node already has these bytes in its own slot at `offset`.
    Seed { offset: u64 },
    /// The node must fetch this chunk.
    Fetch,
}

/// The any-to-any plan: for each chunk of the target, where its bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchPlan {
    /// One entry per target chunk, in target order.
    pub sources: Vec<ChunkSource>,
    /// Number of chunks to fetch (distinct by content: a chunk repeated in the target is
    /// fetched once).
    pub fetch_chunks: usize,
    /// Bytes to fetch (distinct by content).
    pub fetch_bytes: u64,
    /// Bytes of the target the node's own slot supplies.
    pub seed_bytes: u64,
}

/// Plan how a node holding the image described by `have` reaches `target`: every target
/// chunk whose sha256 appears anywhere in `have` is copied from the node's slot (the node
/// re-hashes what it reads), the rest is fetched. Planning only: no I/O.
pub fn chunks_missing(target: &ChunkIndex, have: &ChunkIndex) -> FetchPlan {
    let mut have_by_hash: HashMap<(Sha256Digest, u32), u64> = HashMap::new();
    for c in &have.chunks {
        have_by_hash.entry((c.sha256, c.len)).or_insert(c.offset);
    }
    let mut fetched: HashMap<Sha256Digest, ()> = HashMap::new();
    let mut plan = FetchPlan {
        sources: Vec::with_capacity(target.chunks.len()),
        fetch_chunks: 0,
        fetch_bytes: 0,
        seed_bytes: 0,
    };
    for c in &target.chunks {
        if let Some(&offset) = have_by_hash.get(&(c.sha256, c.len)) {
            plan.sources.push(ChunkSource::Seed { offset });
            plan.seed_bytes += u64::from(c.len);
        } else {
            plan.sources.push(ChunkSource::Fetch);
            if fetched.insert(c.sha256, ()).is_none() {
                plan.fetch_chunks += 1;
                plan.fetch_bytes += u64::from(c.len);
            }
        }
    }
    plan
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;

    fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    #[test]
    fn fixed_index_covers_image_and_round_trips_json() {
        let data = pseudo_random(300_000, 1);
        let idx = ChunkIndex::compute(&data[..], Chunking::Fixed { size: 65536 }).unwrap();
        assert_eq!(idx.image_size, 300_000);
        assert_eq!(idx.chunks.len(), 5);
        assert_eq!(idx.chunks[4].len, 300_000 - 4 * 65536);
        assert_eq!(idx.image_sha256, Sha256Digest::of(&data));
        assert_eq!(idx.chunks[1].sha256, Sha256Digest::of(&data[65536..131072]));
        let json = idx.to_json().unwrap();
        assert_eq!(ChunkIndex::from_json(&json).unwrap(), idx);
    }

    #[test]
    fn cdc_index_covers_image() {
        let data = pseudo_random(500_000, 2);
        let c = Chunking::FastCdc {
            min: 4096,
            avg: 16384,
            max: 65536,
        };
        let idx = ChunkIndex::compute(&data[..], c).unwrap();
        idx.validate().unwrap();
        assert_eq!(idx.image_sha256, Sha256Digest::of(&data));
    }

    #[test]
    fn from_json_rejects_bad_indexes() {
        let data = pseudo_random(100_000, 3);
        let idx = ChunkIndex::compute(&data[..], Chunking::Fixed { size: 65536 }).unwrap();
        let mut v = idx.clone();
        v.version = 3;
        assert!(matches!(
            ChunkIndex::from_json(&v.to_json().unwrap()),
            Err(ChunkIndexError::UnsupportedVersion(3))
        ));
        v.version = 0;
        assert!(matches!(
            ChunkIndex::from_json(&v.to_json().unwrap()),
            Err(ChunkIndexError::UnsupportedVersion(0))
        ));
        let mut gap = idx.clone();
        gap.chunks[1].offset += 1;
        assert!(matches!(
            ChunkIndex::from_json(&gap.to_json().unwrap()),
            Err(ChunkIndexError::BadChunk { index: 1 })
        ));
        let mut short = idx.clone();
        short.image_size += 1;
        assert!(matches!(
            ChunkIndex::from_json(&short.to_json().unwrap()),
            Err(ChunkIndexError::SizeMismatch { .. })
        ));
        assert!(matches!(
            ChunkIndex::from_json(b"{\"version\":1"),
            Err(ChunkIndexError::Json(_))
        ));
        let json = String::from_utf8(idx.to_json().unwrap()).unwrap();
        let bad_hex = json.replacen("\"sha256\":\"", "\"sha256\":\"zz", 1);
        assert!(ChunkIndex::from_json(bad_hex.as_bytes()).is_err());
    }

    fn packed_index() -> ChunkIndex {
        // Compressible, non-periodic data so FastCDC cuts several chunks per frame.
        let data: Vec<u8> = pseudo_random(400_000, 6)
            .iter()
            .map(|b| b'a' + b % 8)
            .collect();
        let mut idx = ChunkIndex::compute(&data[..], Chunking::default()).unwrap();
        let opts = crate::pack::PackOptions {
            level: 1,
            min_frame: 32 << 10,
            threads: 1,
        };
        crate::pack::write_pack(&data[..], &mut idx, "p", &opts, io::sink()).unwrap();
        assert!(idx.frames().len() > 1 && idx.frames().len() < idx.chunks.len());
        idx
    }

    #[test]
    fn v2_pack_locations_are_validated() {
        let idx = packed_index();
        let bad = |i: &ChunkIndex| {
            matches!(
                ChunkIndex::from_json(&i.to_json().unwrap()),
                Err(ChunkIndexError::BadPack { .. })
            )
        };
        // A version 1 index is still read; it cannot carry a pack.
        let mut v1 = ChunkIndex::compute(&[7u8; 5000][..], Chunking::Fixed { size: 4096 }).unwrap();
        v1.version = 1;
        ChunkIndex::from_json(&v1.to_json().unwrap()).unwrap();
        let mut v1_pack = idx.clone();
        v1_pack.version = 1;
        assert!(bad(&v1_pack));
        // Locations without a pack, a chunk without a location.
        let mut orphan = idx.clone();
        orphan.pack = None;
        assert!(bad(&orphan));
        let mut missing = idx.clone();
        missing.chunks[3].pack_len = None;
        assert!(bad(&missing));
        // A gap or overlap between frames, a wrong pack size, an empty frame.
        let f = idx.frames();
        let mut gap = idx.clone();
        for c in &mut gap.chunks[f[1].chunks.clone()] {
            c.pack_offset = Some(f[1].pack_offset + 1);
        }
        assert!(bad(&gap));
        let mut size = idx.clone();
        size.pack.as_mut().unwrap().size += 1;
        assert!(bad(&size));
        let mut empty = idx.clone();
        for c in &mut empty.chunks[f[0].chunks.clone()] {
            c.pack_len = Some(0);
        }
        assert!(bad(&empty));
        // A frame longer than zstd could ever make it.
        let mut long = idx.clone();
        let last = f.last().unwrap();
        for c in &mut long.chunks[last.chunks.clone()] {
            c.pack_len = Some(u32::MAX);
        }
        long.pack.as_mut().unwrap().size = last.pack_offset + u64::from(u32::MAX);
        assert!(bad(&long));
        let mut comp = idx.clone();
        comp.pack.as_mut().unwrap().compression = "xz".into();
        assert!(bad(&comp));
    }

    #[test]
    fn from_bytes_reads_plain_and_zstd_compressed_json() {
        let idx = packed_index();
        let json = idx.to_json().unwrap();
        assert_eq!(ChunkIndex::from_bytes(&json).unwrap(), idx);
        let z = zstd::encode_all(&json[..], 19).unwrap();
        assert!(z.len() < json.len());
        assert_eq!(ChunkIndex::from_bytes(&z).unwrap(), idx);
        // Cut compressed bytes: a typed error; garbled ones: an error or (a changed hash
        // digit) another valid index, never a panic.
        assert!(ChunkIndex::from_bytes(&z[..z.len() / 2]).is_err());
        for at in (4..z.len()).step_by(211) {
            let mut g = z.clone();
            g[at] ^= 0xff;
            let _ = ChunkIndex::from_bytes(&g);
        }
        assert!(ChunkIndex::from_bytes(&ZSTD_MAGIC).is_err());
    }

    /// Truncated or garbled index bytes give typed errors, never a panic.
    #[test]
    fn truncated_or_garbled_v2_index_never_panics() {
        let json = packed_index().to_json().unwrap();
        for cut in (0..json.len()).step_by(97) {
            assert!(ChunkIndex::from_json(&json[..cut]).is_err(), "cut at {cut}");
        }
        let mut x = 1u64;
        for _ in 0..2000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut g = json.clone();
            let at = (x as usize) % g.len();
            let alphabet = b"0123456789,:{}[]\"a-";
            g[at] = alphabet[(x >> 32) as usize % alphabet.len()];
            // Either still valid (the digit changed an unchecked hash) or a typed error.
            let _ = ChunkIndex::from_json(&g);
        }
    }

    #[test]
    fn plan_seeds_moved_chunks_and_fetches_new_ones() {
        let a = pseudo_random(4 * 4096, 4);
        let fresh = pseudo_random(4096, 5);
        // target: chunk 2, chunk 0, new, new again, chunk 3
        let mut b = Vec::new();
        b.extend_from_slice(&a[8192..12288]);
        b.extend_from_slice(&a[0..4096]);
        b.extend_from_slice(&fresh);
        b.extend_from_slice(&fresh);
        b.extend_from_slice(&a[12288..16384]);
        let fixed = Chunking::Fixed { size: 4096 };
        let have = ChunkIndex::compute(&a[..], fixed).unwrap();
        let target = ChunkIndex::compute(&b[..], fixed).unwrap();
        let plan = chunks_missing(&target, &have);
        assert_eq!(
            plan.sources,
            vec![
                ChunkSource::Seed { offset: 8192 },
                ChunkSource::Seed { offset: 0 },
                ChunkSource::Fetch,
                ChunkSource::Fetch,
                ChunkSource::Seed { offset: 12288 },
            ]
        );
        assert_eq!(plan.fetch_chunks, 1);
        assert_eq!(plan.fetch_bytes, 4096);
        assert_eq!(plan.seed_bytes, 3 * 4096);
    }

    #[test]
    fn bad_chunking_is_an_error_not_a_panic() {
        let r = ChunkIndex::compute(&[0u8; 10][..], Chunking::Fixed { size: 0 });
        assert!(matches!(r, Err(ChunkIndexError::BadChunking(_))));
        let r = ChunkIndex::compute(
            &[0u8; 10][..],
            Chunking::FastCdc {
                min: 1,
                avg: 2,
                max: 3,
            },
        );
        assert!(matches!(r, Err(ChunkIndexError::BadChunking(_))));
    }
}
