//! The streaming decoder: header, then the ops of the zstd op stream, every length checked
//! against the caps, every source range against the source size and every patch control
//! against its reference before the caller sees it.

use std::io::{self, BufReader, Read};

use super::{
    le32, le64, DeltaError, DeltaHeader, Extent, Op, Record, CONTROL_LEN, FORMAT_VERSION,
    HEADER_LEN, MAGIC, MAX_EXTENTS, MAX_FILE_DIFF_OUT, MAX_LITERAL_LEN, MAX_PATCH_BUFFER,
    TAG_COPY_SOURCE, TAG_END, TAG_FILE_DIFF, TAG_LITERAL, TAG_ZERO, ZSTD_WINDOW_LOG_MAX,
};
use crate::chunk::Sha256Digest;

/// The delta file under the zstd decoder: counts what it reads and remembers whether it
/// ended or failed, so a decoder error can be told apart as truncation, I/O or corruption.
struct Raw<R> {
    inner: R,
    pos: u64,
    eof: bool,
    failed: bool,
}

impl<R: Read> Read for Raw<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(0) if !buf.is_empty() => {
                self.eof = true;
                Ok(0)
            }
            Ok(n) => {
                self.pos += n as u64;
                Ok(n)
            }
            Err(e) => {
                if e.kind() != io::ErrorKind::Interrupted {
                    self.failed = true;
                }
                Err(e)
            }
        }
    }
}

type Body<R> = zstd::stream::read::Decoder<'static, BufReader<Raw<R>>>;

/// Streaming decoder: validates the header, then yields ops.
///
/// Error positions (`at`) are byte offsets in the decompressed op stream (0 = its first
/// op), except for the header's own errors.
pub struct DeltaReader<R: Read> {
    body: Body<R>,
    /// Bytes of the op stream consumed.
    pos: u64,
    header: DeltaHeader,
    written: u64,
    /// Diff bytes of the current `FileDiff` not read yet.
    diff_left: u64,
    done: bool,
}

impl<R: Read> std::fmt::Debug for DeltaReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeltaReader")
            .field("header", &self.header)
            .field("written", &self.written)
            .field("pos", &self.pos)
            .finish_non_exhaustive()
    }
}

pub(super) fn read_header(input: &mut impl Read) -> Result<DeltaHeader, DeltaError> {
    let mut h = [0u8; HEADER_LEN];
    let mut got = 0;
    // Read the magic first so a short non-delta file reports BadMagic only when the bytes
    // it has disagree with the magic.
    for end in [8, HEADER_LEN] {
        while got < end {
            match input.read(&mut h[got..end]) {
                Ok(0) => return Err(DeltaError::Truncated { at: got as u64 }),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(DeltaError::Io(e)),
            }
        }
        if h[..8] != MAGIC {
            return Err(DeltaError::BadMagic);
        }
    }
    let version = le32(&h[8..12]);
    if version != FORMAT_VERSION {
        return Err(DeltaError::UnsupportedVersion(version));
    }
    let flags = le32(&h[12..16]);
    if flags != 0 {
        return Err(DeltaError::UnsupportedFlags(flags));
    }
    Ok(DeltaHeader {
        source_size: le64(&h[16..24]),
        source_sha256: Sha256Digest(h[24..56].try_into().unwrap_or([0; 32])),
        target_size: le64(&h[56..64]),
        target_sha256: Sha256Digest(h[64..96].try_into().unwrap_or([0; 32])),
    })
}

fn cap(what: &'static str, len: u64, cap: u64, at: u64) -> Result<(), DeltaError> {
    if len > cap {
        Err(DeltaError::OverCap { what, len, cap, at })
    } else {
        Ok(())
    }
}

impl<R: Read> DeltaReader<R> {
    /// Read and validate the header.
    pub fn new(mut input: R) -> Result<Self, DeltaError> {
        let header = read_header(&mut input)?;
        let raw = Raw {
            inner: input,
            pos: HEADER_LEN as u64,
            eof: false,
            failed: false,
        };
        let mut body =
            zstd::stream::read::Decoder::with_buffer(BufReader::with_capacity(256 << 10, raw))?
                .single_frame();
        body.window_log_max(ZSTD_WINDOW_LOG_MAX)?;
        Ok(Self {
            body,
            pos: 0,
            header,
            written: 0,
            diff_left: 0,
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

    /// Byte offset in the op stream of the next op.
    pub fn delta_position(&self) -> u64 {
        self.pos
    }

    /// Bytes of the delta file read so far (header and compressed op stream; may run
    /// ahead of the ops decoded by the read buffer).
    pub fn file_position(&self) -> u64 {
        self.body.get_ref().get_ref().pos
    }

    /// Turn a decoder error into truncation, I/O or corruption.
    fn body_error(&self, e: io::Error) -> DeltaError {
        let raw = self.body.get_ref().get_ref();
        if raw.failed {
            DeltaError::Io(e)
        } else if raw.eof || e.kind() == io::ErrorKind::UnexpectedEof {
            DeltaError::Truncated { at: self.pos }
        } else {
            DeltaError::Corrupt {
                at: self.pos,
                why: e.to_string(),
            }
        }
    }

    /// Read exactly `buf.len()` bytes of the op stream.
    fn exact(&mut self, buf: &mut [u8]) -> Result<(), DeltaError> {
        let mut got = 0;
        while got < buf.len() {
            match self.body.read(&mut buf[got..]) {
                // The frame ended before the op stream did.
                Ok(0) => return Err(DeltaError::Truncated { at: self.pos }),
                Ok(n) => {
                    got += n;
                    self.pos += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.body_error(e)),
            }
        }
        Ok(())
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

    /// `len` bytes; callers check `len` against a cap first.
    fn bytes(&mut self, len: usize) -> Result<Vec<u8>, DeltaError> {
        let mut v = vec![0u8; len];
        self.exact(&mut v)?;
        Ok(v)
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

    /// Read the next diff bytes of the current `FileDiff` into `buf`, at most what is
    /// left of them; returns how many (0 when none is left).
    pub fn read_diff(&mut self, buf: &mut [u8]) -> Result<usize, DeltaError> {
        let n = (buf.len() as u64).min(self.diff_left) as usize;
        self.exact(&mut buf[..n])?;
        self.diff_left -= n as u64;
        Ok(n)
    }

    /// Skip the unread diff bytes of the current `FileDiff`.
    fn skip_diff(&mut self) -> Result<(), DeltaError> {
        let mut buf = [0u8; 8192];
        while self.read_diff(&mut buf)? > 0 {}
        Ok(())
    }

    /// After the end op: the frame must end there, and the file with it.
    fn check_end(&mut self) -> Result<(), DeltaError> {
        let mut b = [0u8; 1];
        loop {
            match self.body.read(&mut b) {
                Ok(0) => break,
                Ok(_) => return Err(DeltaError::TrailingData),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.body_error(e)),
            }
        }
        let rest = self.body.get_mut();
        loop {
            match rest.read(&mut b) {
                Ok(0) => return Ok(()),
                Ok(_) => return Err(DeltaError::TrailingData),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(DeltaError::Io(e)),
            }
        }
    }

    /// The next op, or `None` after the end op (which must close exactly the target size
    /// and the delta). Unread diff bytes of the previous op are skipped.
    pub fn next_op(&mut self) -> Result<Option<Op>, DeltaError> {
        if self.done {
            return Ok(None);
        }
        self.skip_diff()?;
        let at = self.pos;
        let tag = self.u8()?;
        let op = match tag {
            TAG_END => {
                if self.written != self.header.target_size {
                    return Err(DeltaError::TargetShort {
                        written: self.written,
                        target_size: self.header.target_size,
                    });
                }
                self.check_end()?;
                self.done = true;
                return Ok(None);
            }
            TAG_COPY_SOURCE => {
                let offset = self.u64()?;
                let len = self.u64()?;
                self.check_source(at, offset, len)?;
                self.advance(at, len)?;
                Op::CopySource { offset, len }
            }
            TAG_ZERO => {
                let len = self.u64()?;
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
                let len = self.u32()?;
                cap("literal length", len.into(), MAX_LITERAL_LEN.into(), at)?;
                if len == 0 {
                    return Err(DeltaError::BadOp {
                        at,
                        why: "zero-length op",
                    });
                }
                self.advance(at, len.into())?;
                Op::Literal {
                    data: self.bytes(len as usize)?,
                }
            }
            TAG_FILE_DIFF => self.file_diff(at)?,
            tag => return Err(DeltaError::UnknownOp { tag, at }),
        };
        Ok(Some(op))
    }

    fn file_diff(&mut self, at: u64) -> Result<Op, DeltaError> {
        let n = self.u32()?;
        cap("extent count", n.into(), MAX_EXTENTS.into(), at)?;
        let mut source_extents = Vec::with_capacity(n as usize);
        let mut ref_len = 0u64;
        for _ in 0..n {
            let offset = self.u64()?;
            let len = self.u64()?;
            self.check_source(at, offset, len)?;
            source_extents.push(Extent { offset, len });
            // Each extent lies inside the source, so the sum of at most MAX_EXTENTS of
            // them cannot overflow; saturate anyway.
            ref_len = ref_len.saturating_add(len);
        }
        let out_len = self.u64()?;
        cap("file diff output", out_len, MAX_FILE_DIFF_OUT, at)?;
        if out_len == 0 {
            return Err(DeltaError::BadOp {
                at,
                why: "zero-length op",
            });
        }
        let records = self.u32()?;
        let extra_len = self.u32()?;
        let buffered = u64::from(records) * CONTROL_LEN as u64 + u64::from(extra_len);
        cap(
            "patch controls and extra bytes",
            buffered,
            MAX_PATCH_BUFFER.into(),
            at,
        )?;
        self.advance(at, out_len)?;
        let bad = |why: &'static str| DeltaError::BadOp { at, why };
        let ctrl = self.bytes(records as usize * CONTROL_LEN)?;
        let mut out = Vec::with_capacity(records as usize);
        let (mut ref_pos, mut produced, mut copied, mut added) = (0u64, 0u64, 0u64, 0u64);
        for rec in ctrl.chunks_exact(CONTROL_LEN) {
            let seek = i64::from_le_bytes(rec[0..8].try_into().unwrap_or([0; 8]));
            let add = le64(&rec[8..16]);
            let copy = le64(&rec[16..24]);
            let p = i128::from(ref_pos) + i128::from(seek);
            if p < 0 || p > i128::from(ref_len) {
                return Err(bad("patch seeks outside the reference"));
            }
            ref_pos = p as u64;
            if add > ref_len - ref_pos {
                return Err(bad("patch adds past the end of the reference"));
            }
            if add == 0 && copy == 0 {
                return Err(bad("patch control produces nothing"));
            }
            if add > out_len - produced || copy > out_len - produced - add {
                return Err(bad("patch produces more than the op's output length"));
            }
            out.push(Record { ref_pos, add, copy });
            ref_pos += add;
            produced += add + copy;
            copied += copy;
            added += add;
        }
        if produced != out_len {
            return Err(bad("patch produces less than the op's output length"));
        }
        if copied != u64::from(extra_len) {
            return Err(bad("patch extra bytes differ from what its controls copy"));
        }
        let extra = self.bytes(extra_len as usize)?;
        self.diff_left = added;
        Ok(Op::FileDiff {
            source_extents,
            out_len,
            records: out,
            extra,
        })
    }
}
