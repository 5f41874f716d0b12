//! The three ways of writing the inactive slot in one sequential pass (by delta from the
//! active slot, by chunks seeded from it, from the full image) and the slot writer with
//! its progress.

use super::*;

impl Updater {
    pub(super) fn write_by_delta(
        &self,
        channel: &Channel,
        fetcher: &Fetcher,
        manifest: &ReleaseManifest,
        target: &str,
        progress: Progress<'_>,
        report: &mut UpdateReport,
    ) -> Result<(), UpdateError> {
        let path = self.fetch(channel, fetcher, target, report)?;
        let open = || File::open(&path).with_context(|| format!("opening {}", path.display()));
        let header = *DeltaReader::new(BufReader::new(open()?))?.header();
        if header.target_sha256.to_hex() != manifest.image.sha256
            || header.target_size != manifest.image.size
        {
            return Err(UpdateError::Mismatch(format!(
                "delta {target} produces {} ({} bytes), the release says {} ({} bytes)",
                header.target_sha256.to_hex(),
                header.target_size,
                manifest.image.sha256,
                manifest.image.size
            )));
        }
        let source = self
            .disk
            .open_slot(self.running.slot, Some(header.source_size))?;
        // The running slot is hashed by a second handle while the delta applies (the
        // wall time is the larger of the two, not their sum); a wrong source is reported
        // at the end, and its target could never pass the slot hash check anyway.
        let mut source_copy = self
            .disk
            .open_slot(self.running.slot, Some(header.source_size))?;
        source_copy
            .seek(io::SeekFrom::Start(0))
            .context("reading the running slot")?;
        let mut w = self.slot_writer(manifest.image.size, progress)?;
        let stats =
            imgformat::delta::apply_concurrent_verify(source, source_copy, open()?, &mut w)?;
        report.seeded_bytes = stats.copied;
        w.finish()?;
        self.disk.sync()?;
        Ok(())
    }

    pub(super) fn write_full(
        &self,
        channel: &Channel,
        fetcher: &Fetcher,
        manifest: &ReleaseManifest,
        progress: Progress<'_>,
        report: &mut UpdateReport,
    ) -> Result<(), UpdateError> {
        let path = self.fetch(channel, fetcher, &manifest.image.target, report)?;
        let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        let mut dec = zstd::Decoder::new(file)
            .with_context(|| format!("decompressing {}", path.display()))?;
        let mut w = io::BufWriter::with_capacity(
            WRITE_BUF,
            self.slot_writer(manifest.image.size, progress)?,
        );
        let n = io::copy(&mut (&mut dec).take(manifest.image.size + 1), &mut w)
            .with_context(|| format!("decompressing {} into the slot", path.display()))?;
        let w = w
            .into_inner()
            .map_err(|e| anyhow::anyhow!("writing the slot: {}", e.error()))?;
        if n != manifest.image.size {
            return Err(anyhow::anyhow!(
                "{} decompresses to {n} bytes, the release says {}",
                manifest.image.target,
                manifest.image.size
            )
            .into());
        }
        w.finish()?;
        self.disk.sync()?;
        Ok(())
    }

    pub(super) fn write_by_chunks(
        &self,
        channel: &Channel,
        fetcher: &Fetcher,
        manifest: &ReleaseManifest,
        progress: Progress<'_>,
        report: &mut UpdateReport,
    ) -> Result<(), UpdateError> {
        let not_published =
            || UpdateError::NotPublished(format!("chunk index of {}", manifest.version));
        let name = manifest.chunk_index.as_deref().ok_or_else(not_published)?;
        let want = ChunkIndex::from_bytes(&channel.read_target(name)?)
            .map_err(|e| UpdateError::Mismatch(format!("{name}: {e}")))?;
        if want.image_sha256.to_hex() != manifest.image.sha256
            || want.image_size != manifest.image.size
        {
            return Err(UpdateError::Mismatch(format!(
                "{name} describes another image"
            )));
        }
        // What the node holds: the signed chunk index of the running version, whose
        // chunks are re-hashed as they are read from the active slot.
        let have_name = release::chunk_index_target(&manifest.name, &self.running.version);
        let have = ChunkIndex::from_bytes(&channel.read_target(&have_name).map_err(|_| {
            UpdateError::NotPublished(format!(
                "chunk index of the running {}",
                self.running.version
            ))
        })?)
        .map_err(|e| UpdateError::Mismatch(format!("{have_name}: {e}")))?;
        let plan = chunks_missing(&want, &have);
        tracing::info!(
            "chunks: {} bytes from the active slot, {} bytes in {} chunks to fetch",
            plan.seed_bytes,
            plan.fetch_bytes,
            plan.fetch_chunks
        );
        report.seeded_bytes = plan.seed_bytes;
        let mut missing = match &want.pack {
            Some(pack) => MissingChunks::Pack(
                self.fetch_frames(channel, fetcher, &want, pack, &plan, report)?,
            ),
            // A version 1 index (or one published without a pack): the missing chunks are
            // cut from the (resumably downloaded, TUF-verified) full image, read in order.
            None if plan.fetch_chunks > 0 => {
                let path = self.fetch(channel, fetcher, &manifest.image.target, report)?;
                let file =
                    File::open(&path).with_context(|| format!("opening {}", path.display()))?;
                MissingChunks::Image(
                    zstd::Decoder::new(file).context("decompressing the image")?,
                    0,
                )
            }
            None => MissingChunks::None,
        };
        let mut seed = self
            .disk
            .open_slot(self.running.slot, Some(have.image_size))?;
        let mut w = io::BufWriter::with_capacity(
            WRITE_BUF,
            self.slot_writer(manifest.image.size, progress)?,
        );
        let mut buf = Vec::new();
        for (i, (c, src)) in want.chunks.iter().zip(&plan.sources).enumerate() {
            buf.resize(c.len as usize, 0);
            let mut ok = false;
            if let ChunkSource::Seed { offset } = src {
                seed.seek(SeekFrom::Start(*offset))
                    .context("seeking the active slot")?;
                seed.read_exact(&mut buf)
                    .context("reading the active slot")?;
                ok = Sha256Digest::of(&buf) == c.sha256;
                if !ok {
                    tracing::warn!("active slot chunk at {offset} does not match its index");
                }
            }
            if !ok {
                missing.chunk(&want, i, *src, &mut buf)?;
            }
            w.write_all(&buf).context("writing the slot")?;
        }
        if let MissingChunks::Pack(p) = &missing {
            report.bytes_fetched += p.refetched;
        }
        let w = w
            .into_inner()
            .map_err(|e| anyhow::anyhow!("writing the slot: {}", e.error()))?;
        w.finish()?;
        self.disk.sync()?;
        Ok(())
    }

    /// Fetch the frames of the chunk pack that hold the chunks `plan` must fetch, with
    /// coalesced Range requests; each frame is decompressed and its chunks checked against
    /// the signed index before it is kept (the pack's whole-file hash cannot be checked on
    /// a partial fetch).
    fn fetch_frames(
        &self,
        channel: &Channel,
        fetcher: &Fetcher,
        want: &ChunkIndex,
        pack: &PackInfo,
        plan: &FetchPlan,
        report: &mut UpdateReport,
    ) -> Result<PackCache, UpdateError> {
        let (length, sha256) = channel.target_digest(&pack.target)?;
        if length != pack.size || sha256 != pack.sha256.to_hex() {
            return Err(UpdateError::Mismatch(format!(
                "the chunk index describes a pack {} that the channel signs otherwise",
                pack.target
            )));
        }
        let t = Expected {
            name: pack.target.clone(),
            length,
            sha256,
        };
        let frames = want.frames();
        let (needed, frame_of) = frames_needed(want, plan);
        let refs: Vec<&Frame> = needed.iter().map(|&f| &frames[f]).collect();
        let requests = coalesce(&refs, MAX_RANGE_GAP, MAX_RANGE_REQUESTS);
        let pieces: Vec<Piece> = refs
            .iter()
            .map(|f| Piece {
                offset: f.pack_offset,
                len: f.pack_len,
            })
            .collect();
        let mut scratch = Vec::new();
        let mut check = |k: usize, bytes: &[u8]| {
            decode_frame(want, refs[k], bytes, &mut scratch).map_err(|e| e.to_string())
        };
        let got = fetcher.fetch_pieces(&t, &pieces, &requests, &self.downloads(), &mut check)?;
        tracing::info!(
            "chunk pack: {} frames in {} requests, {} bytes",
            pieces.len(),
            got.requests,
            got.fetched
        );
        report.bytes_fetched += got.fetched;
        let file =
            File::open(&got.path).with_context(|| format!("opening {}", got.path.display()))?;
        let mut first_fetch = HashMap::new();
        for (i, (c, src)) in want.chunks.iter().zip(&plan.sources).enumerate() {
            if *src == ChunkSource::Fetch {
                first_fetch.entry(c.sha256).or_insert(i);
            }
        }
        Ok(PackCache {
            file,
            frames,
            frame_of,
            fetched: needed,
            first_fetch,
            decoded: None,
            refetched: 0,
            target: t,
            fetcher: fetcher.clone(),
        })
    }
}

/// Range requests for the chunk pack: frames separated by at most this many bytes share
/// one request (about the size of a request and its response headers). Larger gaps cost
/// more than they save: on a real image pair, merging gaps up to 64 KiB fetched 2.5× the
/// bytes (`docs/delta-format.md`).
const MAX_RANGE_GAP: u64 = 4 << 10;

/// At most this many Range requests per update; beyond, the closest ranges merge.
const MAX_RANGE_REQUESTS: usize = 1024;

/// Where the chunks the active slot cannot supply come from.
enum MissingChunks {
    None,
    /// The checked frames of the chunk pack, in the cache file.
    Pack(PackCache),
    /// The full image, decompressed in order (version 1 indexes), and its position.
    Image(zstd::Decoder<'static, BufReader<File>>, u64),
}

/// Frames fetched from the chunk pack, read back and decoded one at a time.
struct PackCache {
    file: File,
    frames: Vec<Frame>,
    /// Frame of every target chunk.
    frame_of: Vec<usize>,
    /// Frames in the cache file (sorted).
    fetched: Vec<usize>,
    /// The first chunk to fetch of each content (whose frame the plan fetched).
    first_fetch: HashMap<Sha256Digest, usize>,
    /// The last decoded frame.
    decoded: Option<(usize, Vec<u8>)>,
    /// Bytes fetched again (damaged cache, bad seeds).
    refetched: u64,
    target: Expected,
    fetcher: Fetcher,
}

impl MissingChunks {
    /// Fill `buf` with target chunk `i`, checked against its sha256.
    fn chunk(
        &mut self,
        want: &ChunkIndex,
        i: usize,
        src: ChunkSource,
        buf: &mut [u8],
    ) -> Result<(), UpdateError> {
        let c = &want.chunks[i];
        match self {
            MissingChunks::None => Err(UpdateError::Mismatch(format!(
                "chunk at {} is not in the active slot and nothing was fetched",
                c.offset
            ))),
            MissingChunks::Image(dec, pos) => {
                if *pos > c.offset {
                    return Err(UpdateError::Mismatch(format!(
                        "chunk at {} comes before {pos}",
                        c.offset
                    )));
                }
                io::copy(&mut (&mut *dec).take(c.offset - *pos), &mut io::sink())
                    .context("skipping in the image")?;
                dec.read_exact(buf).context("reading the image")?;
                *pos = c.offset + u64::from(c.len);
                if Sha256Digest::of(buf) != c.sha256 {
                    return Err(UpdateError::Mismatch(format!(
                        "chunk at {} of the image does not match",
                        c.offset
                    )));
                }
                Ok(())
            }
            MissingChunks::Pack(p) => p.chunk(want, i, src, buf),
        }
    }
}

impl PackCache {
    fn chunk(
        &mut self,
        want: &ChunkIndex,
        i: usize,
        src: ChunkSource,
        buf: &mut [u8],
    ) -> Result<(), UpdateError> {
        // A chunk to fetch comes from the frame of the first chunk with its content (the
        // plan fetched that one); a seed that failed its hash, from its own frame.
        let at = match src {
            ChunkSource::Fetch => self
                .first_fetch
                .get(&want.chunks[i].sha256)
                .copied()
                .unwrap_or(i),
            ChunkSource::Seed { .. } => i,
        };
        let fi = self.frame_of[at];
        if self.decoded.as_ref().map(|d| d.0) != Some(fi) {
            let f = &self.frames[fi];
            let mut out = self.decoded.take().map(|d| d.1).unwrap_or_default();
            let mut cached = false;
            if self.fetched.binary_search(&fi).is_ok() {
                let mut z = vec![0u8; f.pack_len as usize];
                self.file
                    .seek(SeekFrom::Start(f.pack_offset))
                    .and_then(|_| self.file.read_exact(&mut z))
                    .context("reading the fetched frames")?;
                // Checked when it arrived; checked again, as the local copy may have been
                // damaged (or lost with a journal that survived): then it is fetched again.
                match decode_frame(want, f, &z, &mut out) {
                    Ok(()) => cached = true,
                    Err(e) => tracing::warn!(
                        "cached frame at {} of {} is damaged ({e}); fetching it again",
                        f.pack_offset,
                        self.target.name
                    ),
                }
            } else {
                tracing::warn!(
                    "fetching frame at {} of the pack for a bad seed",
                    f.pack_offset
                );
            }
            if !cached {
                let z = self
                    .fetcher
                    .fetch_range(&self.target, f.pack_offset..f.pack_end())?;
                self.refetched += z.len() as u64;
                decode_frame(want, f, &z, &mut out).map_err(|e| {
                    UpdateError::Fetch(FetchError::PieceRejected {
                        name: self.target.name.clone(),
                        offset: f.pack_offset,
                        why: e.to_string(),
                    })
                })?;
            }
            self.decoded = Some((fi, out));
        }
        let (_, data) = self
            .decoded
            .as_ref()
            .ok_or_else(|| UpdateError::Mismatch("no decoded frame".to_string()))?;
        let f = &self.frames[fi];
        let c = &want.chunks[at];
        let start = (c.offset - f.offset) as usize;
        buf.copy_from_slice(&data[start..start + c.len as usize]);
        Ok(())
    }
}

/// Sequential writer into the inactive slot: counts, reports progress, and refuses to
/// write past the image size.
pub(super) struct SlotWriter<'p> {
    pub(super) inner: fscommon::StreamSlice<File>,
    pub(super) written: u64,
    pub(super) total: u64,
    pub(super) progress: Progress<'p>,
}

impl Write for SlotWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.written + buf.len() as u64 > self.total {
            return Err(io::Error::other("more bytes than the signed image size"));
        }
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        failpoint::hit("slot.write");
        (self.progress)(self.written, self.total);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl SlotWriter<'_> {
    pub(super) fn finish(mut self) -> anyhow::Result<()> {
        self.flush().context("flushing the slot")?;
        anyhow::ensure!(
            self.written == self.total,
            "wrote {} of {} bytes into the slot",
            self.written,
            self.total
        );
        Ok(())
    }
}
