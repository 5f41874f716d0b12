//! The applier: one sequential pass over the target, reading the source by offset.

use std::io::{self, Read, Seek, SeekFrom, Write};

use sha2::{Digest, Sha256};

use super::{DeltaError, DeltaReader, Extent, Op, Record, HEADER_LEN};
use crate::chunk::Sha256Digest;

/// I/O piece size of the applier.
const IO_BUF: usize = 1 << 20;
/// Piece size for patch application (the ref cache and the add buffers).
const PATCH_BUF: usize = 256 << 10;
/// References up to this size are cached whole while their patch applies.
const SMALL_REFERENCE: u64 = 4 << 20;
// A patch's reference and diff pieces share the I/O buffer.
const _: () = assert!(IO_BUF >= 2 * PATCH_BUF);

/// What [`apply_with`] checks besides the target hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApplyOptions {
    /// Hash the whole source before writing anything and refuse a source whose sha256
    /// differs from the header (default). Turn off only when the caller has verified the
    /// slot already (e.g. against its chunk index); the target hash is checked regardless,
    /// so a wrong source can never produce an accepted target.
    pub verify_source: bool,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        Self {
            verify_source: true,
        }
    }
}

/// What an apply did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub ops: u64,
    pub target_size: u64,
    pub copied: u64,
    pub zeroed: u64,
    pub literal: u64,
    pub file_diff: u64,
    pub delta_bytes: u64,
}

/// Apply with the default options: verify the whole source up front, write the target
/// sequentially, verify the target's sha256 at the end.
pub fn apply<S, D, T>(source: S, delta: D, target: T) -> Result<ApplyStats, DeltaError>
where
    S: Read + Seek,
    D: Read,
    T: Write,
{
    apply_with(source, delta, target, ApplyOptions::default())
}

/// Apply without re-reading the source up front: a second thread hashes `source_copy` (a
/// second handle on the same source, e.g. the slot opened twice) while this one applies,
/// so the wall time is about the larger of the two instead of their sum. A source whose
/// hash differs from the header is reported as [`DeltaError::SourceHash`] (in preference to
/// any other error), but only after the target was written — harmless, since such a target
/// cannot pass its own hash check and a slot becomes bootable only after that check.
pub fn apply_concurrent_verify<S, V, D, T>(
    source: S,
    source_copy: V,
    mut delta: D,
    target: T,
) -> Result<ApplyStats, DeltaError>
where
    S: Read + Seek,
    V: Read + Send,
    D: Read,
    T: Write,
{
    let mut head = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match delta.read(&mut head[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let header = super::read::read_header(&mut &head[..got])?;
    std::thread::scope(|scope| {
        let hasher = scope.spawn(move || hash_all(source_copy));
        let applied = apply_with(
            source,
            (&head[..got]).chain(delta),
            target,
            ApplyOptions {
                verify_source: false,
            },
        );
        let hashed = hasher
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("source hashing thread panicked")));
        match hashed {
            Ok(actual) if actual != header.source_sha256 => Err(DeltaError::SourceHash {
                expected: header.source_sha256,
                actual,
            }),
            Ok(_) => applied,
            Err(e) => applied.and(Err(DeltaError::Io(e))),
        }
    })
}

fn hash_all(mut r: impl Read) -> io::Result<Sha256Digest> {
    let mut buf = vec![0u8; IO_BUF];
    let mut h = Sha256::new();
    loop {
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => h.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Sha256Digest(h.finalize().into()))
}

/// Hashes and counts what goes to the target, buffering into large writes.
struct TargetSink<T: Write> {
    out: T,
    buf: Vec<u8>,
    hash: Sha256,
    written: u64,
}

impl<T: Write> TargetSink<T> {
    fn put(&mut self, data: &[u8]) -> io::Result<()> {
        self.hash.update(data);
        self.written += data.len() as u64;
        if self.buf.len() + data.len() > IO_BUF {
            self.flush_buf()?;
        }
        if data.len() >= IO_BUF {
            self.out.write_all(data)
        } else {
            self.buf.extend_from_slice(data);
            Ok(())
        }
    }

    fn flush_buf(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.out.write_all(&self.buf)?;
            self.buf.clear();
        }
        Ok(())
    }
}

/// Apply `delta` to `source`, writing the target to `target` in one sequential pass.
pub fn apply_with<S, D, T>(
    mut source: S,
    delta: D,
    target: T,
    opts: ApplyOptions,
) -> Result<ApplyStats, DeltaError>
where
    S: Read + Seek,
    D: Read,
    T: Write,
{
    // The reader buffers the delta file itself (under its zstd decoder).
    let mut reader = DeltaReader::new(delta)?;
    let header = *reader.header();
    let actual = source.seek(SeekFrom::End(0))?;
    if actual != header.source_size {
        return Err(DeltaError::SourceSize {
            expected: header.source_size,
            actual,
        });
    }
    let mut buf = vec![0u8; IO_BUF];
    if opts.verify_source {
        source.seek(SeekFrom::Start(0))?;
        let got = hash_all(&mut source)?;
        if got != header.source_sha256 {
            return Err(DeltaError::SourceHash {
                expected: header.source_sha256,
                actual: got,
            });
        }
    }
    let mut sink = TargetSink {
        out: target,
        buf: Vec::with_capacity(IO_BUF),
        hash: Sha256::new(),
        written: 0,
    };
    let mut stats = ApplyStats {
        target_size: header.target_size,
        ..ApplyStats::default()
    };
    loop {
        let at = reader.delta_position();
        let Some(op) = reader.next_op()? else { break };
        stats.ops += 1;
        match op {
            Op::CopySource { offset, len } => {
                source.seek(SeekFrom::Start(offset))?;
                let mut left = len;
                while left > 0 {
                    let n = left.min(IO_BUF as u64) as usize;
                    source.read_exact(&mut buf[..n])?;
                    sink.put(&buf[..n])?;
                    left -= n as u64;
                }
                stats.copied += len;
            }
            Op::Zero { len } => {
                buf.fill(0);
                let mut left = len;
                while left > 0 {
                    let n = left.min(IO_BUF as u64) as usize;
                    sink.put(&buf[..n])?;
                    left -= n as u64;
                }
                stats.zeroed += len;
            }
            Op::Literal { data } => {
                sink.put(&data)?;
                stats.literal += data.len() as u64;
            }
            Op::FileDiff {
                source_extents,
                out_len,
                records,
                extra,
            } => {
                let mut reference = Reference::new(&mut source, &source_extents);
                let patch = Patch {
                    records: &records,
                    extra: &extra,
                    at,
                };
                apply_patch(&mut reference, patch, &mut reader, &mut sink, &mut buf)?;
                stats.file_diff += out_len;
            }
        }
    }
    sink.flush_buf()?;
    sink.out.flush()?;
    stats.delta_bytes = reader.file_position();
    let got = Sha256Digest(sink.hash.finalize().into());
    if got != header.target_sha256 {
        return Err(DeltaError::TargetHash {
            expected: header.target_sha256,
            actual: got,
        });
    }
    Ok(stats)
}

/// The reference of a `FileDiff`: the concatenation of source extents, read through a
/// small cache so the mostly-forward access of a patch costs few seeks.
struct Reference<'a, S> {
    source: &'a mut S,
    extents: &'a [Extent],
    /// Start of each extent in reference coordinates (prefix sums).
    starts: Vec<u64>,
    len: u64,
    cache: Vec<u8>,
    cache_start: u64,
}

impl<'a, S: Read + Seek> Reference<'a, S> {
    fn new(source: &'a mut S, extents: &'a [Extent]) -> Self {
        let mut starts = Vec::with_capacity(extents.len());
        let mut len = 0u64;
        for e in extents {
            starts.push(len);
            // Extents were checked against the source size, so this cannot overflow.
            len = len.saturating_add(e.len);
        }
        Self {
            source,
            extents,
            starts,
            len,
            cache: Vec::new(),
            cache_start: 0,
        }
    }

    /// Copy reference bytes `[pos, pos + out.len())` into `out`; the caller keeps the range
    /// inside the reference.
    fn read_at(&mut self, mut pos: u64, mut out: &mut [u8]) -> io::Result<()> {
        while !out.is_empty() {
            let cache_end = self.cache_start + self.cache.len() as u64;
            if pos < self.cache_start || pos >= cache_end {
                self.fill(pos)?;
                continue;
            }
            let off = (pos - self.cache_start) as usize;
            let n = (self.cache.len() - off).min(out.len());
            out[..n].copy_from_slice(&self.cache[off..off + n]);
            pos += n as u64;
            out = &mut out[n..];
        }
        Ok(())
    }

    fn fill(&mut self, pos: u64) -> io::Result<()> {
        self.cache.clear();
        // A reference up to SMALL_REFERENCE bytes (most files) is read once, whole: bsdiff
        // controls jump back and forth, and refilling a window on each jump re-reads it.
        let pos = if self.len <= SMALL_REFERENCE { 0 } else { pos };
        self.cache_start = pos;
        let window = if self.len <= SMALL_REFERENCE {
            SMALL_REFERENCE
        } else {
            PATCH_BUF as u64
        };
        let want = window.min(self.len - pos) as usize;
        let mut i = match self.starts.binary_search(&pos) {
            Ok(i) => i,
            Err(i) => i - 1,
        };
        let mut p = pos;
        while self.cache.len() < want {
            let e = self.extents[i];
            let within = p - self.starts[i];
            let n = ((e.len - within) as usize).min(want - self.cache.len());
            self.source.seek(SeekFrom::Start(e.offset + within))?;
            let old = self.cache.len();
            self.cache.resize(old + n, 0);
            self.source.read_exact(&mut self.cache[old..])?;
            p += n as u64;
            i += 1;
        }
        Ok(())
    }
}

/// The buffered part of one `FileDiff` op and where it starts in the op stream.
struct Patch<'a> {
    records: &'a [Record],
    extra: &'a [u8],
    at: u64,
}

/// Apply one patch: each record's add bytes (reference plus the streamed diff bytes), then
/// its copy bytes from `extra`. The reader validated every record against the reference.
/// `scratch` (the applier's I/O buffer, at least 2 × `PATCH_BUF`) holds the reference and
/// diff pieces, so no op allocates.
fn apply_patch<S: Read + Seek, R: Read, T: Write>(
    reference: &mut Reference<'_, S>,
    patch: Patch<'_>,
    reader: &mut DeltaReader<R>,
    sink: &mut TargetSink<T>,
    scratch: &mut [u8],
) -> Result<(), DeltaError> {
    let Patch { records, extra, at } = patch;
    let (a, rest) = scratch.split_at_mut(PATCH_BUF);
    let b = &mut rest[..PATCH_BUF];
    let mut xp = 0usize;
    for rec in records {
        let mut pos = rec.ref_pos;
        let mut left = rec.add;
        while left > 0 {
            let n = left.min(PATCH_BUF as u64) as usize;
            reference.read_at(pos, &mut a[..n])?;
            if reader.read_diff(&mut b[..n])? != n {
                return Err(DeltaError::BadOp {
                    at,
                    why: "patch diff bytes end early",
                });
            }
            for (x, d) in a[..n].iter_mut().zip(&b[..n]) {
                *x = x.wrapping_add(*d);
            }
            sink.put(&a[..n])?;
            pos += n as u64;
            left -= n as u64;
        }
        // The reader checked that the records copy exactly `extra.len()` bytes.
        let copy = rec.copy as usize;
        let piece = extra.get(xp..xp + copy).ok_or(DeltaError::BadOp {
            at,
            why: "patch extra bytes end early",
        })?;
        sink.put(piece)?;
        xp += copy;
    }
    Ok(())
}
