//! The delta format X→Y: its header, its ops, the streaming encoder ([`DeltaWriter`]), the
//! decoder ([`DeltaReader`]) and the applier ([`apply`]).
//!
//! A delta rebuilds the target image Y in ONE sequential pass, reading the source image X
//! (the node's active slot) by offset. The spec is `docs/delta-format.md`; the byte layout
//! and the caps below are normative. This module owns the codec and the applier over
//! `Read`/`Write`/`Seek` traits only: it must never open files, fetch anything, decide
//! which slot to write or make a slot bootable. The applier's memory is bounded by the
//! caps (about 36 MiB worst case), whatever the image size; parsing never panics and every
//! malformed input is a typed [`DeltaError`].

use std::io::{self, Read, Seek, SeekFrom, Write};

use sha2::{Digest, Sha256};

use crate::chunk::Sha256Digest;
pub use crate::error::DeltaError;

/// First bytes of every delta.
pub const MAGIC: [u8; 8] = *b"IMGDELTA";
/// Version of the format this module reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// Size of the fixed header.
pub const HEADER_LEN: usize = 96;

/// Cap on the uncompressed size of one `Literal` op.
pub const MAX_LITERAL_LEN: u32 = 4 << 20;
/// Cap on the compressed size of one `Literal` op.
pub const MAX_LITERAL_COMPRESSED: u32 = (4 << 20) + (128 << 10);
/// Cap on the number of source extents of one `FileDiff` op.
pub const MAX_EXTENTS: u32 = 16_384;
/// Cap on the three compressed patch streams of one `FileDiff` op together.
pub const MAX_PATCH_LEN: u32 = 8 << 20;
/// Cap on the bytes one `FileDiff` op produces.
pub const MAX_FILE_DIFF_OUT: u64 = 1 << 30;
/// zstd window cap (log2) for every compressed stream in a delta: 4 MiB.
pub const ZSTD_WINDOW_LOG_MAX: u32 = 22;

const TAG_END: u8 = 0;
const TAG_COPY_SOURCE: u8 = 1;
const TAG_LITERAL: u8 = 2;
const TAG_ZERO: u8 = 3;
const TAG_FILE_DIFF: u8 = 4;

/// Size of one control record in a decompressed patch control stream.
const CONTROL_LEN: usize = 24;
/// I/O piece size of the applier.
const IO_BUF: usize = 1 << 20;
/// Piece size for patch application (the ref cache and the add/copy buffers).
const PATCH_BUF: usize = 256 << 10;
/// References up to this size are cached whole while their patch applies.
const SMALL_REFERENCE: u64 = 4 << 20;

/// The fixed header: which source the delta applies to and which target it produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeltaHeader {
    pub source_size: u64,
    pub source_sha256: Sha256Digest,
    pub target_size: u64,
    pub target_sha256: Sha256Digest,
}

impl DeltaHeader {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(&MAGIC);
        h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&0u32.to_le_bytes());
        h[16..24].copy_from_slice(&self.source_size.to_le_bytes());
        h[24..56].copy_from_slice(&self.source_sha256.0);
        h[56..64].copy_from_slice(&self.target_size.to_le_bytes());
        h[64..96].copy_from_slice(&self.target_sha256.0);
        h
    }
}

/// A byte range of the source image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
}

/// The compressed streams of a bsdiff-style patch (see [`PatchBuilder`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Patch {
    pub ctrl: Vec<u8>,
    pub diff: Vec<u8>,
    pub extra: Vec<u8>,
}

impl Patch {
    /// Compressed size of the three streams.
    pub fn len(&self) -> usize {
        self.ctrl.len() + self.diff.len() + self.extra.len()
    }

    /// True when all three streams are empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One decoded op.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Copy `len` bytes of the source from `offset`.
    CopySource { offset: u64, len: u64 },
    /// `raw_len` bytes, zstd-compressed in `data`.
    Literal { raw_len: u32, data: Vec<u8> },
    /// `len` zero bytes.
    Zero { len: u64 },
    /// `out_len` bytes produced by applying `patch` to the concatenation of `source_extents`.
    FileDiff {
        source_extents: Vec<Extent>,
        out_len: u64,
        patch: Patch,
    },
}

/// Builds a [`Patch`]: a sequence of controls, each "move the reference cursor by `seek`,
/// add `diff` bytewise (wrapping) to the next `diff.len()` reference bytes, then insert
/// `extra` verbatim". The three streams are compressed separately (the diff stream is
/// mostly zeros, the way bsdiff lays it out).
pub struct PatchBuilder {
    ctrl: zstd::stream::write::Encoder<'static, Vec<u8>>,
    diff: zstd::stream::write::Encoder<'static, Vec<u8>>,
    extra: zstd::stream::write::Encoder<'static, Vec<u8>>,
}

impl std::fmt::Debug for PatchBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PatchBuilder").finish_non_exhaustive()
    }
}

fn capped_encoder(level: i32) -> io::Result<zstd::stream::write::Encoder<'static, Vec<u8>>> {
    let mut e = zstd::stream::write::Encoder::new(Vec::new(), level)?;
    e.window_log(ZSTD_WINDOW_LOG_MAX)?;
    e.include_checksum(false)?;
    Ok(e)
}

impl PatchBuilder {
    /// A new builder compressing all three streams at zstd `level`.
    pub fn new(level: i32) -> io::Result<Self> {
        Self::with_levels(level, level)
    }

    /// A new builder compressing the control and diff streams at `diff_level` and the
    /// extra (new bytes) stream at `extra_level`. The diff stream is long and mostly zeros:
    /// high levels cost much time there for little gain.
    pub fn with_levels(diff_level: i32, extra_level: i32) -> io::Result<Self> {
        Ok(Self {
            ctrl: capped_encoder(diff_level)?,
            diff: capped_encoder(diff_level)?,
            extra: capped_encoder(extra_level)?,
        })
    }

    /// Append one control.
    pub fn push(&mut self, seek: i64, diff: &[u8], extra: &[u8]) -> io::Result<()> {
        let mut rec = [0u8; CONTROL_LEN];
        rec[0..8].copy_from_slice(&seek.to_le_bytes());
        rec[8..16].copy_from_slice(&(diff.len() as u64).to_le_bytes());
        rec[16..24].copy_from_slice(&(extra.len() as u64).to_le_bytes());
        self.ctrl.write_all(&rec)?;
        self.diff.write_all(diff)?;
        self.extra.write_all(extra)
    }

    /// Finish the three streams.
    pub fn finish(self) -> io::Result<Patch> {
        Ok(Patch {
            ctrl: self.ctrl.finish()?,
            diff: self.diff.finish()?,
            extra: self.extra.finish()?,
        })
    }
}

/// Streaming encoder. Adjacent `CopySource` ops on contiguous ranges, adjacent `Zero` ops
/// and adjacent literal bytes are merged, so a generator can emit block by block.
pub struct DeltaWriter<W: Write> {
    out: W,
    header: DeltaHeader,
    level: i32,
    written: u64,
    pending: Pending,
    literal: Vec<u8>,
    compressor: zstd::bulk::Compressor<'static>,
}

impl<W: Write> std::fmt::Debug for DeltaWriter<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeltaWriter")
            .field("header", &self.header)
            .field("level", &self.level)
            .field("written", &self.written)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy)]
enum Pending {
    None,
    Copy { offset: u64, len: u64 },
    Zero { len: u64 },
}

impl<W: Write> DeltaWriter<W> {
    /// Write the header; literals are compressed at zstd `level`.
    pub fn new(mut out: W, header: DeltaHeader, level: i32) -> Result<Self, DeltaError> {
        out.write_all(&header.encode())?;
        let mut compressor = zstd::bulk::Compressor::new(level)?;
        compressor.set_parameter(zstd::zstd_safe::CParameter::WindowLog(ZSTD_WINDOW_LOG_MAX))?;
        Ok(Self {
            out,
            header,
            level,
            written: 0,
            pending: Pending::None,
            literal: Vec::new(),
            compressor,
        })
    }

    /// Target bytes described so far.
    pub fn position(&self) -> u64 {
        self.written
    }

    fn advance(&mut self, len: u64) -> Result<(), DeltaError> {
        match self.written.checked_add(len) {
            Some(n) if n <= self.header.target_size => {
                self.written = n;
                Ok(())
            }
            _ => Err(DeltaError::TargetOverrun {
                at: self.written,
                target_size: self.header.target_size,
            }),
        }
    }

    /// Copy `len` source bytes from `offset`.
    pub fn copy_source(&mut self, offset: u64, len: u64) -> Result<(), DeltaError> {
        if len == 0 {
            return Ok(());
        }
        if offset
            .checked_add(len)
            .map_or(true, |end| end > self.header.source_size)
        {
            return Err(DeltaError::SourceRange {
                at: self.written,
                offset,
                len,
                source_size: self.header.source_size,
            });
        }
        self.advance(len)?;
        if let Pending::Copy { offset: o, len: l } = &mut self.pending {
            if *o + *l == offset {
                *l += len;
                return Ok(());
            }
        }
        self.flush_pending()?;
        self.pending = Pending::Copy { offset, len };
        Ok(())
    }

    /// `len` zero bytes.
    pub fn zero(&mut self, len: u64) -> Result<(), DeltaError> {
        if len == 0 {
            return Ok(());
        }
        self.advance(len)?;
        if let Pending::Zero { len: l } = &mut self.pending {
            *l += len;
            return Ok(());
        }
        self.flush_pending()?;
        self.pending = Pending::Zero { len };
        Ok(())
    }

    /// Literal bytes (buffered, compressed in pieces of at most [`MAX_LITERAL_LEN`]).
    pub fn literal(&mut self, mut data: &[u8]) -> Result<(), DeltaError> {
        self.advance(data.len() as u64)?;
        if !matches!(self.pending, Pending::None) {
            self.flush_pending()?;
        }
        while !data.is_empty() {
            let room = MAX_LITERAL_LEN as usize - self.literal.len();
            let take = room.min(data.len());
            self.literal.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.literal.len() == MAX_LITERAL_LEN as usize {
                self.flush_literal()?;
            }
        }
        Ok(())
    }

    /// Produce the next `out_len` bytes by applying `patch` to the concatenation of
    /// `source_extents`.
    pub fn file_diff(
        &mut self,
        source_extents: &[Extent],
        out_len: u64,
        patch: &Patch,
    ) -> Result<(), DeltaError> {
        let at = self.written;
        if source_extents.len() > MAX_EXTENTS as usize {
            return Err(DeltaError::OverCap {
                what: "extent count",
                len: source_extents.len() as u64,
                cap: u64::from(MAX_EXTENTS),
                at,
            });
        }
        if patch.len() > MAX_PATCH_LEN as usize {
            return Err(DeltaError::OverCap {
                what: "patch length",
                len: patch.len() as u64,
                cap: u64::from(MAX_PATCH_LEN),
                at,
            });
        }
        if out_len == 0 || out_len > MAX_FILE_DIFF_OUT {
            return Err(DeltaError::BadOp {
                at,
                why: "file diff output length is zero or over the cap",
            });
        }
        for e in source_extents {
            if e.len == 0
                || e.offset
                    .checked_add(e.len)
                    .map_or(true, |end| end > self.header.source_size)
            {
                return Err(DeltaError::SourceRange {
                    at,
                    offset: e.offset,
                    len: e.len,
                    source_size: self.header.source_size,
                });
            }
        }
        self.advance(out_len)?;
        self.flush_pending()?;
        let mut buf = Vec::with_capacity(1 + 4 + 16 * source_extents.len() + 20);
        buf.push(TAG_FILE_DIFF);
        buf.extend_from_slice(&(source_extents.len() as u32).to_le_bytes());
        for e in source_extents {
            buf.extend_from_slice(&e.offset.to_le_bytes());
            buf.extend_from_slice(&e.len.to_le_bytes());
        }
        buf.extend_from_slice(&out_len.to_le_bytes());
        buf.extend_from_slice(&(patch.ctrl.len() as u32).to_le_bytes());
        buf.extend_from_slice(&(patch.diff.len() as u32).to_le_bytes());
        buf.extend_from_slice(&(patch.extra.len() as u32).to_le_bytes());
        self.out.write_all(&buf)?;
        self.out.write_all(&patch.ctrl)?;
        self.out.write_all(&patch.diff)?;
        self.out.write_all(&patch.extra)?;
        Ok(())
    }

    fn flush_pending(&mut self) -> Result<(), DeltaError> {
        match std::mem::replace(&mut self.pending, Pending::None) {
            Pending::None => self.flush_literal(),
            Pending::Copy { offset, len } => {
                let mut b = [0u8; 17];
                b[0] = TAG_COPY_SOURCE;
                b[1..9].copy_from_slice(&offset.to_le_bytes());
                b[9..17].copy_from_slice(&len.to_le_bytes());
                Ok(self.out.write_all(&b)?)
            }
            Pending::Zero { len } => {
                let mut b = [0u8; 9];
                b[0] = TAG_ZERO;
                b[1..9].copy_from_slice(&len.to_le_bytes());
                Ok(self.out.write_all(&b)?)
            }
        }
    }

    fn flush_literal(&mut self) -> Result<(), DeltaError> {
        if self.literal.is_empty() {
            return Ok(());
        }
        let data = self.compressor.compress(&self.literal)?;
        if data.len() > MAX_LITERAL_COMPRESSED as usize {
            // Cannot happen for zstd (bound ~ len + len/255), kept as a guard.
            return Err(DeltaError::OverCap {
                what: "compressed literal",
                len: data.len() as u64,
                cap: u64::from(MAX_LITERAL_COMPRESSED),
                at: self.written,
            });
        }
        let mut b = [0u8; 9];
        b[0] = TAG_LITERAL;
        b[1..5].copy_from_slice(&(self.literal.len() as u32).to_le_bytes());
        b[5..9].copy_from_slice(&(data.len() as u32).to_le_bytes());
        self.out.write_all(&b)?;
        self.out.write_all(&data)?;
        self.literal.clear();
        Ok(())
    }

    /// Write the end op; fails unless exactly `target_size` bytes were described.
    pub fn finish(mut self) -> Result<W, DeltaError> {
        self.flush_pending()?;
        self.flush_literal()?;
        if self.written != self.header.target_size {
            return Err(DeltaError::TargetShort {
                written: self.written,
                target_size: self.header.target_size,
            });
        }
        self.out.write_all(&[TAG_END])?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Counts the bytes consumed from the delta so errors can say where.
struct Counted<R> {
    inner: R,
    pos: u64,
}

impl<R: Read> Counted<R> {
    fn exact(&mut self, buf: &mut [u8]) -> Result<(), DeltaError> {
        match self.inner.read_exact(buf) {
            Ok(()) => {
                self.pos += buf.len() as u64;
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                Err(DeltaError::Truncated { at: self.pos })
            }
            Err(e) => Err(DeltaError::Io(e)),
        }
    }

    fn u8(&mut self) -> Result<u8, DeltaError> {
        let mut b = [0u8; 1];
        self.exact(&mut b)?;
        Ok(b[0])
    }

    fn u32(&mut self) -> Result<u32, DeltaError> {
        let mut b = [0u8; 4];
        self.exact(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn u64(&mut self) -> Result<u64, DeltaError> {
        let mut b = [0u8; 8];
        self.exact(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn bytes(&mut self, len: usize) -> Result<Vec<u8>, DeltaError> {
        // Callers check `len` against a cap before calling.
        let mut v = vec![0u8; len];
        self.exact(&mut v)?;
        Ok(v)
    }
}

/// Streaming decoder: validates the header, then yields ops, checking every length
/// against the caps, every source range against the source size and the running target
/// position against the target size.
pub struct DeltaReader<R: Read> {
    input: Counted<R>,
    header: DeltaHeader,
    written: u64,
    done: bool,
}

impl<R: Read> std::fmt::Debug for DeltaReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeltaReader")
            .field("header", &self.header)
            .field("written", &self.written)
            .finish_non_exhaustive()
    }
}

impl<R: Read> DeltaReader<R> {
    /// Read and validate the header.
    pub fn new(input: R) -> Result<Self, DeltaError> {
        let mut input = Counted {
            inner: input,
            pos: 0,
        };
        let mut h = [0u8; HEADER_LEN];
        // Read the magic first so a short non-delta file reports BadMagic only when the
        // bytes it has disagree with the magic.
        input.exact(&mut h[..8])?;
        if h[..8] != MAGIC {
            return Err(DeltaError::BadMagic);
        }
        input.exact(&mut h[8..])?;
        let version = le32(&h[8..12]);
        if version != FORMAT_VERSION {
            return Err(DeltaError::UnsupportedVersion(version));
        }
        let flags = le32(&h[12..16]);
        if flags != 0 {
            return Err(DeltaError::UnsupportedFlags(flags));
        }
        let header = DeltaHeader {
            source_size: le64(&h[16..24]),
            source_sha256: Sha256Digest(h[24..56].try_into().unwrap_or([0; 32])),
            target_size: le64(&h[56..64]),
            target_sha256: Sha256Digest(h[64..96].try_into().unwrap_or([0; 32])),
        };
        Ok(Self {
            input,
            header,
            written: 0,
            done: false,
        })
    }

    /// The header.
    pub fn header(&self) -> &DeltaHeader {
        &self.header
    }

    /// Target bytes the ops read so far produce.
    pub fn position(&self) -> u64 {
        self.written
    }

    fn advance(&mut self, at: u64, len: u64) -> Result<(), DeltaError> {
        match self.written.checked_add(len) {
            Some(n) if n <= self.header.target_size => {
                self.written = n;
                Ok(())
            }
            _ => Err(DeltaError::TargetOverrun {
                at,
                target_size: self.header.target_size,
            }),
        }
    }

    fn check_source(&self, at: u64, offset: u64, len: u64) -> Result<(), DeltaError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.header.source_size && len > 0 => Ok(()),
            _ => Err(DeltaError::SourceRange {
                at,
                offset,
                len,
                source_size: self.header.source_size,
            }),
        }
    }

    /// The next op, or `None` after the end op (which must close exactly the target size
    /// and be the last byte of the delta).
    pub fn next_op(&mut self) -> Result<Option<Op>, DeltaError> {
        if self.done {
            return Ok(None);
        }
        let at = self.input.pos;
        let tag = self.input.u8()?;
        let op = match tag {
            TAG_END => {
                if self.written != self.header.target_size {
                    return Err(DeltaError::TargetShort {
                        written: self.written,
                        target_size: self.header.target_size,
                    });
                }
                let mut b = [0u8; 1];
                loop {
                    match self.input.inner.read(&mut b) {
                        Ok(0) => break,
                        Ok(_) => return Err(DeltaError::TrailingData),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(DeltaError::Io(e)),
                    }
                }
                self.done = true;
                return Ok(None);
            }
            TAG_COPY_SOURCE => {
                let offset = self.input.u64()?;
                let len = self.input.u64()?;
                self.check_source(at, offset, len)?;
                self.advance(at, len)?;
                Op::CopySource { offset, len }
            }
            TAG_ZERO => {
                let len = self.input.u64()?;
                if len == 0 {
                    return Err(DeltaError::BadOp {
                        at,
                        why: "zero-length op",
                    });
                }
                self.advance(at, len)?;
                Op::Zero { len }
            }
            TAG_LITERAL => {
                let raw_len = self.input.u32()?;
                let comp_len = self.input.u32()?;
                cap("literal length", raw_len.into(), MAX_LITERAL_LEN.into(), at)?;
                cap(
                    "compressed literal",
                    comp_len.into(),
                    MAX_LITERAL_COMPRESSED.into(),
                    at,
                )?;
                if raw_len == 0 {
                    return Err(DeltaError::BadOp {
                        at,
                        why: "zero-length op",
                    });
                }
                self.advance(at, raw_len.into())?;
                let data = self.input.bytes(comp_len as usize)?;
                Op::Literal { raw_len, data }
            }
            TAG_FILE_DIFF => {
                let n = self.input.u32()?;
                cap("extent count", n.into(), MAX_EXTENTS.into(), at)?;
                let mut source_extents = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    let offset = self.input.u64()?;
                    let len = self.input.u64()?;
                    self.check_source(at, offset, len)?;
                    source_extents.push(Extent { offset, len });
                }
                let out_len = self.input.u64()?;
                cap("file diff output", out_len, MAX_FILE_DIFF_OUT, at)?;
                if out_len == 0 {
                    return Err(DeltaError::BadOp {
                        at,
                        why: "zero-length op",
                    });
                }
                let ctrl_len = self.input.u32()?;
                let diff_len = self.input.u32()?;
                let extra_len = self.input.u32()?;
                let total = u64::from(ctrl_len) + u64::from(diff_len) + u64::from(extra_len);
                cap("patch length", total, MAX_PATCH_LEN.into(), at)?;
                self.advance(at, out_len)?;
                let patch = Patch {
                    ctrl: self.input.bytes(ctrl_len as usize)?,
                    diff: self.input.bytes(diff_len as usize)?,
                    extra: self.input.bytes(extra_len as usize)?,
                };
                Op::FileDiff {
                    source_extents,
                    out_len,
                    patch,
                }
            }
            tag => return Err(DeltaError::UnknownOp { tag, at }),
        };
        Ok(Some(op))
    }

    /// Byte offset in the delta of the next op.
    pub fn delta_position(&self) -> u64 {
        self.input.pos
    }
}

fn cap(what: &'static str, len: u64, cap: u64, at: u64) -> Result<(), DeltaError> {
    if len > cap {
        Err(DeltaError::OverCap { what, len, cap, at })
    } else {
        Ok(())
    }
}

fn le32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

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
    let header = *DeltaReader::new(&head[..got])?.header();
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
    let mut reader = DeltaReader::new(io::BufReader::with_capacity(256 << 10, delta))?;
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
    let mut literal_buf: Vec<u8> = Vec::new();
    let mut decompressor = zstd::bulk::Decompressor::new()?;
    decompressor.set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(
        ZSTD_WINDOW_LOG_MAX,
    ))?;
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
            Op::Literal { raw_len, data } => {
                literal_buf.clear();
                literal_buf.reserve(raw_len as usize);
                let n = decompressor
                    .decompress_to_buffer(&data, &mut literal_buf)
                    .map_err(|e| DeltaError::Corrupt {
                        at,
                        why: e.to_string(),
                    })?;
                if n != raw_len as usize {
                    return Err(DeltaError::Corrupt {
                        at,
                        why: format!("literal decompressed to {n} bytes, expected {raw_len}"),
                    });
                }
                sink.put(&literal_buf)?;
                stats.literal += u64::from(raw_len);
            }
            Op::FileDiff {
                source_extents,
                out_len,
                patch,
            } => {
                apply_patch(&mut source, &source_extents, out_len, &patch, &mut sink, at)?;
                stats.file_diff += out_len;
            }
        }
    }
    sink.flush_buf()?;
    sink.out.flush()?;
    stats.delta_bytes = reader.delta_position();
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

fn patch_stream(data: &[u8], at: u64) -> Result<impl Read + '_, DeltaError> {
    let mut d = zstd::stream::read::Decoder::with_buffer(data).map_err(|e| corrupt(at, e))?;
    d.window_log_max(ZSTD_WINDOW_LOG_MAX)
        .map_err(|e| corrupt(at, e))?;
    Ok(d)
}

fn corrupt(at: u64, e: impl std::fmt::Display) -> DeltaError {
    DeltaError::Corrupt {
        at,
        why: e.to_string(),
    }
}

/// Read exactly `buf.len()` bytes from a patch stream; a short stream is corruption.
fn patch_read(r: &mut impl Read, buf: &mut [u8], at: u64, what: &str) -> Result<(), DeltaError> {
    r.read_exact(buf).map_err(|e| DeltaError::Corrupt {
        at,
        why: format!("{what} stream: {e}"),
    })
}

fn at_eof(r: &mut impl Read) -> bool {
    let mut b = [0u8; 1];
    matches!(r.read(&mut b), Ok(0))
}

fn apply_patch<S: Read + Seek, T: Write>(
    source: &mut S,
    extents: &[Extent],
    out_len: u64,
    patch: &Patch,
    sink: &mut TargetSink<T>,
    at: u64,
) -> Result<(), DeltaError> {
    let mut reference = Reference::new(source, extents);
    let mut ctrl = patch_stream(&patch.ctrl, at)?;
    let mut diff = patch_stream(&patch.diff, at)?;
    let mut extra = patch_stream(&patch.extra, at)?;
    let bad = |why: &'static str| DeltaError::BadOp { at, why };
    let mut ref_pos: u64 = 0;
    let mut produced: u64 = 0;
    let mut a = vec![0u8; PATCH_BUF];
    let mut b = vec![0u8; PATCH_BUF];
    loop {
        let mut rec = [0u8; CONTROL_LEN];
        // A clean end of the control stream is the end of the patch.
        let mut got = 0;
        while got < CONTROL_LEN {
            match ctrl.read(&mut rec[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(corrupt(at, e)),
            }
        }
        if got == 0 {
            break;
        }
        if got < CONTROL_LEN {
            return Err(bad("patch control stream ends inside a record"));
        }
        let seek = i64::from_le_bytes(rec[0..8].try_into().unwrap_or([0; 8]));
        let add_len = le64(&rec[8..16]);
        let copy_len = le64(&rec[16..24]);
        let new_pos = i128::from(ref_pos) + i128::from(seek);
        if new_pos < 0 || new_pos > i128::from(reference.len) {
            return Err(bad("patch seeks outside the reference"));
        }
        ref_pos = new_pos as u64;
        if add_len > reference.len - ref_pos {
            return Err(bad("patch adds past the end of the reference"));
        }
        if add_len > out_len - produced || copy_len > out_len - produced - add_len {
            return Err(bad("patch produces more than the op's output length"));
        }
        let mut left = add_len;
        while left > 0 {
            let n = left.min(PATCH_BUF as u64) as usize;
            reference.read_at(ref_pos, &mut a[..n])?;
            patch_read(&mut diff, &mut b[..n], at, "diff")?;
            for (x, d) in a[..n].iter_mut().zip(&b[..n]) {
                *x = x.wrapping_add(*d);
            }
            sink.put(&a[..n])?;
            ref_pos += n as u64;
            left -= n as u64;
        }
        let mut left = copy_len;
        while left > 0 {
            let n = left.min(PATCH_BUF as u64) as usize;
            patch_read(&mut extra, &mut b[..n], at, "extra")?;
            sink.put(&b[..n])?;
            left -= n as u64;
        }
        produced += add_len + copy_len;
    }
    if produced != out_len {
        return Err(bad("patch produces less than the op's output length"));
    }
    if !at_eof(&mut diff) || !at_eof(&mut extra) {
        return Err(bad("patch streams have unused bytes"));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
