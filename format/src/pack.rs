//! The chunk pack: a root image stored as consecutive zstd frames, one frame per chunk or
//! per run of consecutive chunks, so that a node can fetch any frame on its own with an
//! HTTP Range request (the design of casync's and desync's chunk stores, kept in one file).
//!
//! Concatenated zstd frames are one valid zstd stream, so the pack is also the full image:
//! a plain zstd decoder (and the updater's full-image path) streams it whole. The signed
//! chunk index (version 2, [`crate::chunk`]) records where each chunk's frame lies.
//!
//! This module owns the frame layout ([`plan_frames`]), writing a pack ([`write_pack`]) and
//! decoding one fetched frame into verified chunks ([`decode_frame`]). It must never fetch,
//! open files or decide which frames a node needs; a frame it decodes is only trusted
//! after every chunk in it matched the signed index.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::ops::Range;

use sha2::{Digest, Sha256};

use crate::chunk::{
    ChunkIndex, ChunkSource, FetchPlan, Frame, PackInfo, Sha256Digest, MAX_FRAME_LEN,
    PACK_COMPRESSION,
};
use crate::error::ChunkIndexError;

/// How to write a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackOptions {
    /// zstd level of every frame.
    pub level: i32,
    /// Consecutive chunks are grouped until a frame holds at least this many bytes
    /// (0: one frame per chunk). Larger frames compress better; a node then fetches whole
    /// frames, so it may fetch chunks it already has. Figures in `docs/delta-format.md`.
    pub min_frame: u32,
    /// Frames compressed in parallel.
    pub threads: usize,
}

impl Default for PackOptions {
    /// Level 19, one frame per chunk, one thread.
    fn default() -> Self {
        Self {
            level: 19,
            min_frame: DEFAULT_MIN_FRAME,
            threads: 1,
        }
    }
}

/// Default smallest frame (see [`PackOptions::min_frame`]): 0, one frame per chunk. On a
/// real 1 GiB pair at level 19, grouping chunks into frames of at least 64 KiB made the
/// pack 6.6% smaller but the frames a node fetches 2.3× larger (`docs/delta-format.md`).
pub const DEFAULT_MIN_FRAME: u32 = 0;

/// Group the chunks of `index` into frames: consecutive chunks until the frame holds at
/// least `min_frame` bytes, never more than [`MAX_FRAME_LEN`].
pub fn plan_frames(index: &ChunkIndex, min_frame: u32) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut len = 0u64;
    for (i, c) in index.chunks.iter().enumerate() {
        if i > start && len + u64::from(c.len) > MAX_FRAME_LEN {
            out.push(start..i);
            start = i;
            len = 0;
        }
        len += u64::from(c.len);
        if len >= u64::from(min_frame) {
            out.push(start..i + 1);
            start = i + 1;
            len = 0;
        }
    }
    if start < index.chunks.len() {
        out.push(start..index.chunks.len());
    }
    out
}

/// Write the pack of `image` (which must be the image `index` describes: every chunk is
/// re-hashed) to `out`, fill in every chunk's frame location, and record the pack as
/// target `target` in the index, which becomes version 2. Reads the image once,
/// sequentially; holds about `threads` × 8 MiB.
pub fn write_pack(
    mut image: impl Read,
    index: &mut ChunkIndex,
    target: &str,
    opts: &PackOptions,
    mut out: impl Write,
) -> Result<PackInfo, ChunkIndexError> {
    index.validate()?;
    let frames = plan_frames(index, opts.min_frame);
    let threads = opts.threads.max(1);
    // Frames are compressed in batches of about 8 MiB per thread.
    let batch_bytes = 8 * 1024 * 1024 * threads as u64;
    let mut whole = Sha256::new();
    let mut pack_offset = 0u64;
    let mut next = 0;
    while next < frames.len() {
        let mut end = next;
        let mut bytes = 0u64;
        while end < frames.len() && (end == next || bytes < batch_bytes) {
            bytes += frame_len(index, &frames[end]);
            end += 1;
        }
        // Read the batch's raw frames, checking each chunk against the index.
        let mut raw: Vec<Vec<u8>> = Vec::with_capacity(end - next);
        for f in &frames[next..end] {
            let mut buf = vec![0u8; frame_len(index, f) as usize];
            image.read_exact(&mut buf)?;
            let mut at = 0usize;
            for i in f.clone() {
                let c = &index.chunks[i];
                let piece = &buf[at..at + c.len as usize];
                if Sha256Digest::of(piece) != c.sha256 {
                    return Err(ChunkIndexError::ChunkHash {
                        index: i,
                        offset: c.offset,
                    });
                }
                at += c.len as usize;
            }
            raw.push(buf);
        }
        let compressed = compress_all(&raw, opts.level, threads)?;
        for (f, z) in frames[next..end].iter().zip(&compressed) {
            let len = u32::try_from(z.len()).map_err(|_| ChunkIndexError::BadPack {
                index: Some(f.start),
                why: "frame too long",
            })?;
            for i in f.clone() {
                index.chunks[i].pack_offset = Some(pack_offset);
                index.chunks[i].pack_len = Some(len);
            }
            out.write_all(z)?;
            whole.update(z);
            pack_offset += u64::from(len);
        }
        next = end;
    }
    out.flush()?;
    let info = PackInfo {
        target: target.to_string(),
        compression: PACK_COMPRESSION.to_string(),
        size: pack_offset,
        sha256: Sha256Digest(whole.finalize().into()),
    };
    index.version = crate::chunk::CHUNK_INDEX_VERSION;
    index.pack = Some(info.clone());
    index.validate()?;
    Ok(info)
}

fn frame_len(index: &ChunkIndex, f: &Range<usize>) -> u64 {
    index.chunks[f.clone()]
        .iter()
        .map(|c| u64::from(c.len))
        .sum()
}

fn compress_all(
    raw: &[Vec<u8>],
    level: i32,
    threads: usize,
) -> Result<Vec<Vec<u8>>, ChunkIndexError> {
    let per = raw.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = raw
            .chunks(per)
            .map(|part| {
                s.spawn(move || -> std::io::Result<Vec<Vec<u8>>> {
                    let mut c = zstd::bulk::Compressor::new(level)?;
                    // The chunk sha256s in the signed index check every byte; zstd's own
                    // checksum would add 4 bytes per frame for nothing.
                    c.include_checksum(false)?;
                    c.include_contentsize(true)?;
                    part.iter().map(|r| c.compress(r)).collect()
                })
            })
            .collect();
        let mut out = Vec::with_capacity(raw.len());
        for h in handles {
            let part = h
                .join()
                .map_err(|_| std::io::Error::other("a compression thread panicked"))??;
            out.extend(part);
        }
        Ok(out)
    })
}

/// Decode one frame fetched from the pack: `compressed` must be exactly the frame's
/// bytes. On success `out` holds the frame's uncompressed bytes, every chunk of which
/// matched its sha256 in the (signed) index; on any error `out` must not be used. Bounded:
/// never decompresses more than the frame's length ([`MAX_FRAME_LEN`] at most).
pub fn decode_frame(
    index: &ChunkIndex,
    frame: &Frame,
    compressed: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), ChunkIndexError> {
    let corrupt = |why: String| ChunkIndexError::FrameCorrupt {
        pack_offset: frame.pack_offset,
        why,
    };
    if compressed.len() as u64 != u64::from(frame.pack_len) {
        return Err(corrupt(format!(
            "{} bytes, the index says {}",
            compressed.len(),
            frame.pack_len
        )));
    }
    if frame.len > MAX_FRAME_LEN || frame.chunks.end > index.chunks.len() {
        return Err(corrupt("frame out of bounds".into()));
    }
    out.clear();
    out.reserve_exact(frame.len as usize);
    let mut d = zstd::bulk::Decompressor::new().map_err(|e| corrupt(e.to_string()))?;
    // decompress_to_buffer writes into the spare capacity only: an oversized frame fails.
    let n = d
        .decompress_to_buffer(compressed, out)
        .map_err(|e| corrupt(e.to_string()))?;
    if n as u64 != frame.len || out.len() as u64 != frame.len {
        return Err(corrupt(format!(
            "decompresses to {n} bytes, the index says {}",
            frame.len
        )));
    }
    let mut at = 0usize;
    for i in frame.chunks.clone() {
        let c = &index.chunks[i];
        let piece = &out[at..at + c.len as usize];
        if Sha256Digest::of(piece) != c.sha256 {
            return Err(ChunkIndexError::ChunkHash {
                index: i,
                offset: c.offset,
            });
        }
        at += c.len as usize;
    }
    Ok(())
}

/// The frames a node must fetch to follow `plan` (from [`crate::chunk::chunks_missing`]
/// for `target`): for each chunk content to fetch, the frame of its first occurrence.
/// Returned in pack order, each frame once, as indexes into `target.frames()`. Also returns,
/// for every target chunk, the index of the frame that holds its bytes.
pub fn frames_needed(target: &ChunkIndex, plan: &FetchPlan) -> (Vec<usize>, Vec<usize>) {
    let frames = target.frames();
    let mut frame_of = vec![0usize; target.chunks.len()];
    for (fi, f) in frames.iter().enumerate() {
        for i in f.chunks.clone() {
            frame_of[i] = fi;
        }
    }
    let mut first: HashMap<Sha256Digest, usize> = HashMap::new();
    let mut need = vec![false; frames.len()];
    for (i, (c, src)) in target.chunks.iter().zip(&plan.sources).enumerate() {
        if *src == ChunkSource::Fetch {
            let at = *first.entry(c.sha256).or_insert(i);
            need[frame_of[at]] = true;
        }
    }
    let needed = (0..frames.len()).filter(|&f| need[f]).collect();
    (needed, frame_of)
}

/// Byte ranges of the pack to request for `frames` (in pack order): adjacent frames, and
/// frames separated by at most `max_gap` bytes, share a request; then, while there are
/// more than `max_requests` ranges, the two separated by the smallest gap are merged.
/// Bytes in the gaps are fetched and discarded.
pub fn coalesce(frames: &[&Frame], max_gap: u64, max_requests: usize) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for f in frames {
        match out.last_mut() {
            Some(r) if f.pack_offset >= r.end && f.pack_offset - r.end <= max_gap => {
                r.end = f.pack_end();
            }
            _ => out.push(f.pack_offset..f.pack_end()),
        }
    }
    let max_requests = max_requests.max(1);
    if out.len() > max_requests {
        // Keep the largest gaps as request boundaries.
        let mut gaps: Vec<(u64, usize)> = out
            .windows(2)
            .enumerate()
            .map(|(i, w)| (w[1].start - w[0].end, i))
            .collect();
        gaps.sort_unstable_by(|a, b| b.cmp(a));
        let mut cut = vec![false; out.len()];
        for &(_, i) in gaps.iter().take(max_requests - 1) {
            cut[i] = true;
        }
        let mut merged: Vec<Range<u64>> = Vec::with_capacity(max_requests);
        let mut cur = out[0].clone();
        for (i, r) in out.iter().enumerate().skip(1) {
            if cut[i - 1] {
                merged.push(cur);
                cur = r.clone();
            } else {
                cur.end = r.end;
            }
        }
        merged.push(cur);
        out = merged;
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;
    use crate::chunk::Chunking;

    fn data(n: usize) -> Vec<u8> {
        // Compressible but not periodic (so FastCDC finds boundaries): pseudo-random
        // letters from a small alphabet.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b"abcdefgh"[(x >> 40) as usize % 8]
            })
            .collect()
    }

    fn packed(min_frame: u32) -> (Vec<u8>, ChunkIndex, Vec<u8>) {
        let img = data(700_000);
        let mut idx = ChunkIndex::compute(&img[..], Chunking::default()).unwrap();
        let mut pack = Vec::new();
        let opts = PackOptions {
            level: 3,
            min_frame,
            threads: 2,
        };
        write_pack(&img[..], &mut idx, "x.pack", &opts, &mut pack).unwrap();
        (img, idx, pack)
    }

    #[test]
    fn pack_is_one_zstd_stream_and_frames_decode_to_verified_chunks() {
        for min_frame in [0, 64 << 10, 1 << 20] {
            let (img, idx, pack) = packed(min_frame);
            assert_eq!(idx.version, 2);
            let info = idx.pack.clone().unwrap();
            assert_eq!(info.size, pack.len() as u64);
            assert_eq!(info.sha256, Sha256Digest::of(&pack));
            // The whole pack is the image to a plain zstd decoder.
            assert_eq!(zstd::decode_all(&pack[..]).unwrap(), img);
            let back = ChunkIndex::from_json(&idx.to_json().unwrap()).unwrap();
            assert_eq!(back, idx);
            let frames = idx.frames();
            if min_frame == 0 {
                assert_eq!(frames.len(), idx.chunks.len());
            } else {
                assert!(frames.len() < idx.chunks.len());
            }
            let mut out = Vec::new();
            for f in &frames {
                let z = &pack[f.pack_offset as usize..f.pack_end() as usize];
                decode_frame(&idx, f, z, &mut out).unwrap();
                assert_eq!(out, img[f.offset as usize..(f.offset + f.len) as usize]);
            }
        }
    }

    #[test]
    fn tampered_or_misplaced_frames_are_refused() {
        let (_, idx, pack) = packed(0);
        let frames = idx.frames();
        let f = &frames[1];
        let z = pack[f.pack_offset as usize..f.pack_end() as usize].to_vec();
        let mut out = Vec::new();
        // Another frame's bytes in this frame's place: decodes, but the hash refuses it.
        let other = &frames[2];
        let mut wrong = pack[other.pack_offset as usize..other.pack_end() as usize].to_vec();
        wrong.resize(z.len(), 0);
        assert!(decode_frame(&idx, f, &wrong, &mut out).is_err());
        // A flipped byte anywhere in the frame.
        for at in [0, z.len() / 2, z.len() - 1] {
            let mut bad = z.clone();
            bad[at] ^= 0x40;
            let err = decode_frame(&idx, f, &bad, &mut out).unwrap_err();
            assert!(
                matches!(
                    err,
                    ChunkIndexError::FrameCorrupt { .. } | ChunkIndexError::ChunkHash { .. }
                ),
                "{err}"
            );
        }
        // Too short, too long.
        assert!(matches!(
            decode_frame(&idx, f, &z[..z.len() - 1], &mut out),
            Err(ChunkIndexError::FrameCorrupt { .. })
        ));
        // A frame that decompresses to more than the index says is cut off, not buffered.
        let mut big = idx.clone();
        let mut f2 = f.clone();
        f2.len -= 1;
        big.chunks[f2.chunks.start].len -= 1;
        assert!(decode_frame(&big, &f2, &z, &mut out).is_err());
    }

    #[test]
    fn needed_frames_and_coalesced_ranges() {
        let (img, idx, _) = packed(0);
        // The node has the image with its middle third replaced.
        let mut have_img = img.clone();
        let n = img.len();
        have_img[n / 3..2 * n / 3].copy_from_slice(&data(n)[..2 * n / 3 - n / 3]);
        let have = ChunkIndex::compute(&have_img[..], Chunking::default()).unwrap();
        let plan = crate::chunk::chunks_missing(&idx, &have);
        let (needed, frame_of) = frames_needed(&idx, &plan);
        assert!(!needed.is_empty() && needed.len() < idx.frames().len());
        assert_eq!(frame_of.len(), idx.chunks.len());
        let frames = idx.frames();
        let fetch: u64 = needed.iter().map(|&f| u64::from(frames[f].pack_len)).sum();
        let refs: Vec<&Frame> = needed.iter().map(|&f| &frames[f]).collect();
        let ranges = coalesce(&refs, 0, 1000);
        assert_eq!(ranges.iter().map(|r| r.end - r.start).sum::<u64>(), fetch);
        assert!(ranges.len() < refs.len(), "adjacent frames share requests");
        let one = coalesce(&refs, 0, 1);
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].start, refs[0].pack_offset);
        assert_eq!(one[0].end, refs.last().unwrap().pack_end());
        assert!(coalesce(&[], 0, 4).is_empty());
    }

    #[test]
    fn write_pack_refuses_an_image_the_index_does_not_describe() {
        let img = data(200_000);
        let mut idx = ChunkIndex::compute(&img[..], Chunking::default()).unwrap();
        let mut other = img.clone();
        other[150_000] ^= 1;
        let err = write_pack(
            &other[..],
            &mut idx,
            "x",
            &PackOptions::default(),
            std::io::sink(),
        )
        .unwrap_err();
        assert!(matches!(err, ChunkIndexError::ChunkHash { .. }), "{err}");
    }
}
