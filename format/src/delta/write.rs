//! The streaming encoder: header, then every op into one zstd frame.

use std::io::Write;

use super::{
    DeltaError, DeltaHeader, Extent, Patch, CONTROL_LEN, MAX_EXTENTS, MAX_FILE_DIFF_OUT,
    MAX_LITERAL_LEN, MAX_PATCH_BUFFER, TAG_COPY_SOURCE, TAG_END, TAG_FILE_DIFF, TAG_LITERAL,
    TAG_ZERO, ZSTD_WINDOW_LOG_MAX,
};

/// Streaming encoder. Adjacent `CopySource` ops on contiguous ranges, adjacent `Zero` ops
/// and adjacent literal bytes are merged, so a generator can emit block by block.
pub struct DeltaWriter<W: Write> {
    body: zstd::stream::write::Encoder<'static, W>,
    header: DeltaHeader,
    level: i32,
    written: u64,
    pending: Pending,
    literal: Vec<u8>,
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
    /// Write the header; the op stream is compressed at zstd `level` (with a window of
    /// at most 2^[`ZSTD_WINDOW_LOG_MAX`] bytes and a frame checksum).
    pub fn new(mut out: W, header: DeltaHeader, level: i32) -> Result<Self, DeltaError> {
        out.write_all(&header.encode())?;
        let mut body = zstd::stream::write::Encoder::new(out, level)?;
        body.window_log(ZSTD_WINDOW_LOG_MAX)?;
        body.include_checksum(true)?;
        Ok(Self {
            body,
            header,
            level,
            written: 0,
            pending: Pending::None,
            literal: Vec::new(),
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

    /// Copy `len` bytes of the source from `offset`.
    pub fn copy_source(&mut self, offset: u64, len: u64) -> Result<(), DeltaError> {
        if len == 0 {
            return Ok(());
        }
        self.check_source(offset, len)?;
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

    fn check_source(&self, offset: u64, len: u64) -> Result<(), DeltaError> {
        if len == 0
            || offset
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

    /// Literal bytes (buffered, written in ops of at most [`MAX_LITERAL_LEN`]).
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
    /// `source_extents`. The patch must produce exactly `out_len` bytes and buffer at most
    /// [`MAX_PATCH_BUFFER`] (checked here, so a generator never writes an op the applier
    /// refuses).
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
        if patch.buffered_len() > MAX_PATCH_BUFFER as usize {
            return Err(DeltaError::OverCap {
                what: "patch controls and extra bytes",
                len: patch.buffered_len() as u64,
                cap: u64::from(MAX_PATCH_BUFFER),
                at,
            });
        }
        if out_len == 0 || out_len > MAX_FILE_DIFF_OUT {
            return Err(DeltaError::BadOp {
                at,
                why: "file diff output length is zero or over the cap",
            });
        }
        if patch.ctrl.len() % CONTROL_LEN != 0
            || (patch.diff.len() + patch.extra.len()) as u64 != out_len
        {
            return Err(DeltaError::BadOp {
                at,
                why: "patch does not produce the op's output length",
            });
        }
        for e in source_extents {
            self.check_source(e.offset, e.len)?;
        }
        self.advance(out_len)?;
        self.flush_pending()?;
        let mut buf = Vec::with_capacity(1 + 4 + 16 * source_extents.len() + 16);
        buf.push(TAG_FILE_DIFF);
        buf.extend_from_slice(&(source_extents.len() as u32).to_le_bytes());
        for e in source_extents {
            buf.extend_from_slice(&e.offset.to_le_bytes());
            buf.extend_from_slice(&e.len.to_le_bytes());
        }
        buf.extend_from_slice(&out_len.to_le_bytes());
        buf.extend_from_slice(&((patch.ctrl.len() / CONTROL_LEN) as u32).to_le_bytes());
        buf.extend_from_slice(&(patch.extra.len() as u32).to_le_bytes());
        self.body.write_all(&buf)?;
        for part in patch.stream_parts() {
            self.body.write_all(part)?;
        }
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
                Ok(self.body.write_all(&b)?)
            }
            Pending::Zero { len } => {
                let mut b = [0u8; 9];
                b[0] = TAG_ZERO;
                b[1..9].copy_from_slice(&len.to_le_bytes());
                Ok(self.body.write_all(&b)?)
            }
        }
    }

    fn flush_literal(&mut self) -> Result<(), DeltaError> {
        if self.literal.is_empty() {
            return Ok(());
        }
        let mut b = [0u8; 5];
        b[0] = TAG_LITERAL;
        b[1..5].copy_from_slice(&(self.literal.len() as u32).to_le_bytes());
        self.body.write_all(&b)?;
        self.body.write_all(&self.literal)?;
        self.literal.clear();
        Ok(())
    }

    /// Write the end op and close the zstd frame; fails unless exactly `target_size`
    /// bytes were described.
    pub fn finish(mut self) -> Result<W, DeltaError> {
        self.flush_pending()?;
        self.flush_literal()?;
        if self.written != self.header.target_size {
            return Err(DeltaError::TargetShort {
                written: self.written,
                target_size: self.header.target_size,
            });
        }
        self.body.write_all(&[TAG_END])?;
        let mut out = self.body.finish()?;
        out.flush()?;
        Ok(out)
    }
}
