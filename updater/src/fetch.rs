//! Resumable downloads of channel targets into the state directory.
//!
//! This module owns fetching one target file (`targets/<sha256>.<name>`, TUF consistent
//! snapshot naming) with HTTP Range requests into `<dir>/<sha256>.<name>.partial`, a
//! progress journal next to it, and the final check of length and sha256 against the
//! values the verified TUF metadata signs. Only a file that passed that check is renamed
//! to its final name and handed out. It must never trust a byte it has not hashed, never
//! write outside its download directory, and never decide which target to fetch.
//!
//! It also fetches chosen pieces of a target ([`Fetcher::fetch_pieces`], for the chunk
//! pack): the target's whole-file sha256 cannot be checked on a partial fetch, so the
//! caller checks each piece (against the chunk sha256s of the signed chunk index) as it
//! arrives, and only checked pieces are written, at their own offsets, into a sparse cache
//! file `<sha256>.<name>.pieces`; a journal next to it records how far the checked pieces
//! reach, so an interrupted fetch resumes after the last synced piece.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::failpoint;
use crate::slots::hash_reader;

/// A target to fetch, with the length and sha256 the signed metadata gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    pub name: String,
    pub length: u64,
    pub sha256: String,
}

/// Why a download failed. The file is never handed out in any of these cases.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{url}: HTTP status {status}")]
    Status { url: String, status: u16 },
    #[error("{url}: the server ignored the Range request (answered {status} instead of 206 Partial Content); refusing to mix its body with the {have} bytes already downloaded")]
    RangeIgnored { url: String, status: u16, have: u64 },
    #[error("{url}: Content-Range {got:?} does not start at byte {want}")]
    BadContentRange { url: String, got: String, want: u64 },
    #[error("{name}: the server sent more than the {length} signed bytes")]
    TooLong { name: String, length: u64 },
    #[error("{name}: download ended after {got} of {length} bytes")]
    Truncated { name: String, got: u64, length: u64 },
    #[error("{name}: sha256 {got} does not match the signed {want}")]
    Mismatch {
        name: String,
        got: String,
        want: String,
    },
    #[error("{url}: {detail}")]
    Transport { url: String, detail: String },
    #[error("{url}: the server ignored the Range request for bytes {start}-{end} (answered {status} instead of 206 Partial Content)")]
    PieceRangeIgnored {
        url: String,
        status: u16,
        start: u64,
        end: u64,
    },
    #[error("{name}: the piece at byte {offset} fails its check, nothing of it was kept: {why}")]
    PieceRejected {
        name: String,
        offset: u64,
        why: String,
    },
    #[error(transparent)]
    Local(#[from] anyhow::Error),
}

/// The progress journal: how many bytes of the partial file are known to be on disk.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct Journal {
    name: String,
    sha256: String,
    length: u64,
    synced: u64,
}

/// Where progress goes (bytes of this target so far, its length).
pub type ProgressFn<'a> = &'a mut dyn FnMut(u64, u64);

/// Fetches targets of one channel.
#[derive(Debug, Clone)]
pub struct Fetcher {
    /// The channel's targets base (`<channel>/targets/`), ending in `/`; or a local
    /// directory path.
    base: String,
    client: Option<reqwest::blocking::Client>,
    /// Bytes between two journal syncs.
    pub sync_every: u64,
}

/// Bytes read from the network per write.
const BUF: usize = 64 << 10;

impl Fetcher {
    /// A fetcher for the channel at `channel_url` (the channel directory, as in the config).
    pub fn new(channel_url: &str) -> anyhow::Result<Fetcher> {
        let mut base = channel_url.trim_end_matches('/').to_string();
        base.push_str("/targets/");
        let client = if base.starts_with("http://") || base.starts_with("https://") {
            Some(
                reqwest::blocking::Client::builder()
                    .connect_timeout(std::time::Duration::from_secs(30))
                    .timeout(None)
                    .build()
                    .context("creating the HTTP client")?,
            )
        } else {
            None
        };
        Ok(Fetcher {
            base: base
                .strip_prefix("file://")
                .map(str::to_string)
                .unwrap_or(base),
            client,
            sync_every: 1 << 20,
        })
    }

    /// The verified file for `t` in `dir`, downloading (or resuming) it if needed.
    pub fn fetch(
        &self,
        t: &Expected,
        dir: &Path,
        progress: ProgressFn<'_>,
    ) -> Result<(PathBuf, u64), FetchError> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let file_name = format!("{}.{}", t.sha256, t.name);
        let done = dir.join(&file_name);
        if done.exists() {
            progress(t.length, t.length);
            return Ok((done, 0));
        }
        let partial = dir.join(format!("{file_name}.partial"));
        let journal_path = dir.join(format!("{file_name}.journal"));
        let mut have = read_journal(&journal_path, t);
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&partial)
            .with_context(|| format!("opening {}", partial.display()))?;
        // Bytes past the journal may not have reached the disk before a crash.
        let len = f
            .metadata()
            .with_context(|| format!("reading {}", partial.display()))?
            .len();
        have = have.min(len);
        f.set_len(have)
            .with_context(|| format!("truncating {}", partial.display()))?;
        f.seek(SeekFrom::Start(have))
            .with_context(|| format!("seeking {}", partial.display()))?;
        let url = format!("{}{}", self.base, file_name);
        let mut fetched = 0u64;
        if have < t.length {
            let mut body = self.open(&url, have)?;
            let mut buf = vec![0u8; BUF];
            let mut since_sync = 0u64;
            loop {
                let n = body.read(&mut buf).map_err(|e| FetchError::Transport {
                    url: url.clone(),
                    detail: e.to_string(),
                })?;
                if n == 0 {
                    break;
                }
                if have + n as u64 > t.length {
                    drop(f);
                    discard(&partial, &journal_path);
                    return Err(FetchError::TooLong {
                        name: t.name.clone(),
                        length: t.length,
                    });
                }
                f.write_all(&buf[..n])
                    .with_context(|| format!("writing {}", partial.display()))?;
                failpoint::hit("fetch.write");
                have += n as u64;
                fetched += n as u64;
                since_sync += n as u64;
                if since_sync >= self.sync_every {
                    sync_journal(&f, &journal_path, t, have)?;
                    since_sync = 0;
                }
                progress(have, t.length);
            }
            sync_journal(&f, &journal_path, t, have)?;
        }
        if have != t.length {
            return Err(FetchError::Truncated {
                name: t.name.clone(),
                got: have,
                length: t.length,
            });
        }
        f.seek(SeekFrom::Start(0))
            .with_context(|| format!("seeking {}", partial.display()))?;
        let got = hash_reader(&mut f).with_context(|| format!("hashing {}", partial.display()))?;
        drop(f);
        if got != t.sha256 {
            discard(&partial, &journal_path);
            return Err(FetchError::Mismatch {
                name: t.name.clone(),
                got,
                want: t.sha256.clone(),
            });
        }
        fs::rename(&partial, &done)
            .with_context(|| format!("renaming {} to {}", partial.display(), done.display()))?;
        crate::state::sync_dir(dir)?;
        let _ = fs::remove_file(&journal_path);
        Ok((done, fetched))
    }

    /// A reader of `url` from byte `from` on.
    fn open(&self, url: &str, from: u64) -> Result<Box<dyn Read>, FetchError> {
        let Some(client) = &self.client else {
            let mut f = File::open(url).with_context(|| format!("opening {url}"))?;
            f.seek(SeekFrom::Start(from))
                .with_context(|| format!("seeking {url}"))?;
            return Ok(Box::new(f));
        };
        let mut req = client.get(url);
        if from > 0 {
            req = req.header(reqwest::header::RANGE, format!("bytes={from}-"));
        }
        let resp = req.send().map_err(|e| FetchError::Transport {
            url: url.to_string(),
            detail: format!("{e:#}"),
        })?;
        let status = resp.status().as_u16();
        if from > 0 {
            if status != 206 {
                if resp.status().is_success() {
                    return Err(FetchError::RangeIgnored {
                        url: url.to_string(),
                        status,
                        have: from,
                    });
                }
                return Err(FetchError::Status {
                    url: url.to_string(),
                    status,
                });
            }
            let cr = resp
                .headers()
                .get(reqwest::header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let start = parse_content_range(&cr).map(|(s, _)| s);
            if start != Some(from) {
                return Err(FetchError::BadContentRange {
                    url: url.to_string(),
                    got: cr,
                    want: from,
                });
            }
        } else if status != 200 {
            return Err(FetchError::Status {
                url: url.to_string(),
                status,
            });
        }
        Ok(Box::new(resp))
    }
}

/// A piece of a target the caller can check on its own (a frame of the chunk pack).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Piece {
    pub offset: u64,
    pub len: u32,
}

impl Piece {
    fn end(&self) -> u64 {
        self.offset + u64::from(self.len)
    }
}

/// What [`Fetcher::fetch_pieces`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedPieces {
    /// The sparse cache file: each piece at its own offset, checked.
    pub path: PathBuf,
    /// Bytes received (pieces and the gaps between them within one request).
    pub fetched: u64,
    /// Range requests made.
    pub requests: u64,
}

/// Journal of a piece fetch: every piece ending at or before `synced` is on disk, checked.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct PieceJournal {
    name: String,
    sha256: String,
    length: u64,
    /// sha256 of the piece list: another plan starts over.
    plan: String,
    synced: u64,
}

/// Checks one received piece (its index in the list, its bytes); an error refuses it.
pub type CheckFn<'a> = &'a mut dyn FnMut(usize, &[u8]) -> Result<(), String>;

impl Fetcher {
    /// Fetch `pieces` of target `t` (sorted by offset, not overlapping, inside the target)
    /// with one Range request per entry of `requests` (byte ranges covering the pieces, in
    /// order; bytes between pieces are read and dropped). Each piece is handed to `check`
    /// when complete and written to the cache file only if it passes. Resumes after the
    /// pieces a previous run synced. A server that answers a Range request with anything
    /// but 206 and the exact Content-Range is an error: its body is never used.
    pub fn fetch_pieces(
        &self,
        t: &Expected,
        pieces: &[Piece],
        requests: &[Range<u64>],
        dir: &Path,
        check: CheckFn<'_>,
    ) -> Result<FetchedPieces, FetchError> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let file_name = format!("{}.{}", t.sha256, t.name);
        let cache = dir.join(format!("{file_name}.pieces"));
        let journal_path = dir.join(format!("{file_name}.pieces.journal"));
        let bad_plan = |why: &str| FetchError::Local(anyhow::anyhow!("{}: {why}", t.name));
        for w in pieces.windows(2) {
            if w[1].offset < w[0].end() {
                return Err(bad_plan("pieces overlap or are out of order"));
            }
        }
        if pieces.last().is_some_and(|p| p.end() > t.length) {
            return Err(bad_plan("a piece lies beyond the target"));
        }
        let plan = {
            use sha2::{Digest, Sha256};
            let mut h = Sha256::new();
            for p in pieces {
                h.update(p.offset.to_le_bytes());
                h.update(p.len.to_le_bytes());
            }
            hex::encode(h.finalize())
        };
        let synced = fs::read(&journal_path)
            .ok()
            .and_then(|b| serde_json::from_slice::<PieceJournal>(&b).ok())
            .filter(|j| {
                j.name == t.name && j.sha256 == t.sha256 && j.length == t.length && j.plan == plan
            })
            .map_or(0, |j| j.synced);
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(synced == 0)
            .read(true)
            .write(true)
            .open(&cache)
            .with_context(|| format!("opening {}", cache.display()))?;
        // Sparse: only the pieces take space.
        f.set_len(t.length)
            .with_context(|| format!("sizing {}", cache.display()))?;
        let mut out = FetchedPieces {
            path: cache.clone(),
            fetched: 0,
            requests: 0,
        };
        let mut next = pieces.partition_point(|p| p.end() <= synced);
        let mut since_sync = 0u64;
        let mut buf = Vec::new();
        let url = format!("{}{}", self.base, file_name);
        for r in requests {
            if next >= pieces.len() {
                break;
            }
            if pieces[next].offset >= r.end {
                continue;
            }
            if pieces[next].offset < r.start {
                return Err(bad_plan("a piece is not covered by the requests"));
            }
            // Resume inside a request at the first piece still missing.
            let start = pieces[next].offset;
            let mut body = self.open_range(&url, start..r.end)?;
            out.requests += 1;
            let mut pos = start;
            while next < pieces.len() && pieces[next].end() <= r.end {
                let p = pieces[next];
                let gap = p.offset - pos;
                let skipped = io_copy_exact(&mut body, gap, &url)?;
                out.fetched += skipped;
                buf.resize(p.len as usize, 0);
                read_exact(&mut body, &mut buf, &url, t, p.offset)?;
                out.fetched += u64::from(p.len);
                pos = p.end();
                check(next, &buf).map_err(|why| FetchError::PieceRejected {
                    name: t.name.clone(),
                    offset: p.offset,
                    why,
                })?;
                f.seek(SeekFrom::Start(p.offset))
                    .and_then(|_| f.write_all(&buf))
                    .with_context(|| format!("writing {}", cache.display()))?;
                failpoint::hit("fetch.piece");
                next += 1;
                since_sync += u64::from(p.len);
                if since_sync >= self.sync_every {
                    sync_piece_journal(&f, &journal_path, t, &plan, pos)?;
                    since_sync = 0;
                }
            }
            // The request must end where it said it would: drain the tail of a range
            // whose last piece ended before it (a coalesced gap), and refuse a longer body.
            out.fetched += io_copy_exact(&mut body, r.end - pos, &url)?;
            let mut extra = [0u8; 1];
            if body.read(&mut extra).map_err(|e| transport(&url, &e))? != 0 {
                return Err(FetchError::TooLong {
                    name: t.name.clone(),
                    length: r.end - r.start,
                });
            }
            if since_sync > 0 {
                sync_piece_journal(&f, &journal_path, t, &plan, pos)?;
                since_sync = 0;
            }
        }
        if next < pieces.len() {
            return Err(bad_plan("the requests do not cover every piece"));
        }
        let last = pieces.last().map_or(0, Piece::end);
        sync_piece_journal(&f, &journal_path, t, &plan, last)?;
        Ok(out)
    }

    /// A reader of exactly the bytes `range` of `url` (206 with a matching Content-Range,
    /// or a local file).
    fn open_range(&self, url: &str, range: Range<u64>) -> Result<Box<dyn Read>, FetchError> {
        let len = range.end - range.start;
        let Some(client) = &self.client else {
            let mut f = File::open(url).with_context(|| format!("opening {url}"))?;
            f.seek(SeekFrom::Start(range.start))
                .with_context(|| format!("seeking {url}"))?;
            return Ok(Box::new(f.take(len)));
        };
        let last = range.end.saturating_sub(1);
        let resp = client
            .get(url)
            .header(
                reqwest::header::RANGE,
                format!("bytes={}-{last}", range.start),
            )
            .send()
            .map_err(|e| FetchError::Transport {
                url: url.to_string(),
                detail: format!("{e:#}"),
            })?;
        let status = resp.status().as_u16();
        if status != 206 {
            if resp.status().is_success() {
                return Err(FetchError::PieceRangeIgnored {
                    url: url.to_string(),
                    status,
                    start: range.start,
                    end: last,
                });
            }
            return Err(FetchError::Status {
                url: url.to_string(),
                status,
            });
        }
        let cr = resp
            .headers()
            .get(reqwest::header::CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        if parse_content_range(&cr) != Some((range.start, last)) {
            return Err(FetchError::BadContentRange {
                url: url.to_string(),
                got: cr,
                want: range.start,
            });
        }
        // At most the requested bytes are read; the caller checks for more.
        Ok(Box::new(resp.take(len + 1)))
    }

    /// One range of a target, in memory (at most `max` bytes), for a piece the plan did not
    /// foresee. Not journalled: the caller checks it before use.
    pub fn fetch_range(&self, t: &Expected, range: Range<u64>) -> Result<Vec<u8>, FetchError> {
        let url = format!("{}{}.{}", self.base, t.sha256, t.name);
        let mut body = self.open_range(&url, range.clone())?;
        let mut buf = vec![0u8; (range.end - range.start) as usize];
        read_exact(&mut body, &mut buf, &url, t, range.start)?;
        Ok(buf)
    }
}

fn transport(url: &str, e: &std::io::Error) -> FetchError {
    FetchError::Transport {
        url: url.to_string(),
        detail: e.to_string(),
    }
}

/// Read and drop exactly `n` bytes.
fn io_copy_exact(r: &mut dyn Read, n: u64, url: &str) -> Result<u64, FetchError> {
    let got =
        std::io::copy(&mut r.take(n), &mut std::io::sink()).map_err(|e| transport(url, &e))?;
    if got != n {
        return Err(FetchError::Transport {
            url: url.to_string(),
            detail: format!("the response ended {} bytes early", n - got),
        });
    }
    Ok(got)
}

fn read_exact(
    r: &mut dyn Read,
    buf: &mut [u8],
    url: &str,
    t: &Expected,
    at: u64,
) -> Result<(), FetchError> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => {
                return Err(FetchError::Truncated {
                    name: t.name.clone(),
                    got: at + n as u64,
                    length: at + buf.len() as u64,
                })
            }
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(transport(url, &e)),
        }
    }
    Ok(())
}

fn sync_piece_journal(
    f: &File,
    path: &Path,
    t: &Expected,
    plan: &str,
    synced: u64,
) -> anyhow::Result<()> {
    f.sync_data().context("syncing fetched pieces")?;
    let j = PieceJournal {
        name: t.name.clone(),
        sha256: t.sha256.clone(),
        length: t.length,
        plan: plan.to_string(),
        synced,
    };
    let bytes = serde_json::to_vec(&j).context("serialising the piece journal")?;
    crate::state::write_atomic(path, &bytes)
}

fn read_journal(path: &Path, t: &Expected) -> u64 {
    fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice::<Journal>(&b).ok())
        .filter(|j| j.name == t.name && j.sha256 == t.sha256 && j.length == t.length)
        .map_or(0, |j| j.synced)
}

fn sync_journal(f: &File, path: &Path, t: &Expected, synced: u64) -> anyhow::Result<()> {
    f.sync_data().context("syncing a partial download")?;
    let j = Journal {
        name: t.name.clone(),
        sha256: t.sha256.clone(),
        length: t.length,
        synced,
    };
    let bytes = serde_json::to_vec(&j).context("serialising the download journal")?;
    crate::state::write_atomic(path, &bytes)
}

fn discard(partial: &Path, journal: &Path) {
    let _ = fs::remove_file(partial);
    let _ = fs::remove_file(journal);
}

/// Remove finished and partial downloads in `dir` except those named in `keep`
/// (`<sha256>.<name>` prefixes).
pub fn prune(dir: &Path, keep: &[String]) -> anyhow::Result<()> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(());
    };
    for e in entries {
        let e = e.with_context(|| format!("listing {}", dir.display()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if !keep.iter().any(|k| name.starts_with(k.as_str())) && e.path().is_file() {
            fs::remove_file(e.path())
                .with_context(|| format!("removing {}", e.path().display()))?;
        }
    }
    Ok(())
}

/// The first and last byte of a `Content-Range: bytes A-B/TOTAL` header (TOTAL may be
/// `*`).
pub fn parse_content_range(header: &str) -> Option<(u64, u64)> {
    let (range, _total) = header.trim().strip_prefix("bytes ")?.split_once('/')?;
    let (a, b) = range.split_once('-')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {

    #[test]
    fn content_range_headers() {
        assert_eq!(parse_content_range("bytes 0-9/10"), Some((0, 9)));
        assert_eq!(parse_content_range("bytes 5-7/*"), Some((5, 7)));
        assert_eq!(parse_content_range(" bytes 5-7/100 "), Some((5, 7)));
        for bad in [
            "",
            "bytes 5-/10",
            "bytes -5/10",
            "bytes 5-7",
            "items 0-1/2",
            "bytes a-b/3",
        ] {
            assert_eq!(parse_content_range(bad), None, "{bad}");
        }
    }

    use super::*;
    use sha2::{Digest, Sha256};

    fn setup(data: &[u8]) -> (tempfile::TempDir, Fetcher, Expected) {
        let tmp = tempfile::tempdir().unwrap();
        let sha = hex::encode(Sha256::digest(data));
        fs::create_dir_all(tmp.path().join("channel/targets")).unwrap();
        fs::write(
            tmp.path().join(format!("channel/targets/{sha}.t.bin")),
            data,
        )
        .unwrap();
        let url = format!("file://{}", tmp.path().join("channel").display());
        let t = Expected {
            name: "t.bin".into(),
            length: data.len() as u64,
            sha256: sha,
        };
        (tmp, Fetcher::new(&url).unwrap(), t)
    }

    #[test]
    fn local_fetch_verifies_and_resumes_from_the_journal() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let (tmp, f, t) = setup(&data);
        let dl = tmp.path().join("dl");
        fs::create_dir_all(&dl).unwrap();
        // A crash left 100 000 bytes synced and 50 000 more that may be torn.
        let partial = dl.join(format!("{}.t.bin.partial", t.sha256));
        let mut torn = data[..150_000].to_vec();
        torn[120_000] ^= 1;
        fs::write(&partial, &torn).unwrap();
        let journal = Journal {
            name: t.name.clone(),
            sha256: t.sha256.clone(),
            length: t.length,
            synced: 100_000,
        };
        fs::write(
            dl.join(format!("{}.t.bin.journal", t.sha256)),
            serde_json::to_vec(&journal).unwrap(),
        )
        .unwrap();
        let mut seen = 0;
        let (path, fetched) = f.fetch(&t, &dl, &mut |d, _| seen = d).unwrap();
        assert_eq!(fetched, 200_000, "only the bytes after the synced ones");
        assert_eq!(seen, 300_000);
        assert_eq!(fs::read(&path).unwrap(), data);
        assert!(!partial.exists());
        // Already there: nothing fetched.
        assert_eq!(f.fetch(&t, &dl, &mut |_, _| {}).unwrap().1, 0);
    }

    #[test]
    fn wrong_length_or_hash_is_never_handed_out() {
        let data = vec![5u8; 10_000];
        let (tmp, f, mut t) = setup(&data);
        let dl = tmp.path().join("dl");
        let good = t.clone();
        t.length = 9_000;
        assert!(matches!(
            f.fetch(&t, &dl, &mut |_, _| {}),
            Err(FetchError::TooLong { .. })
        ));
        t.length = 11_000;
        assert!(matches!(
            f.fetch(&t, &dl, &mut |_, _| {}),
            Err(FetchError::Truncated { .. })
        ));
        // Same name and length, different content: the signed hash decides.
        fs::write(
            tmp.path()
                .join(format!("channel/targets/{}.t.bin", good.sha256)),
            vec![6u8; 10_000],
        )
        .unwrap();
        let err = f.fetch(&good, &dl, &mut |_, _| {}).unwrap_err();
        assert!(matches!(err, FetchError::Mismatch { .. }), "{err}");
        assert!(!dl.join(format!("{}.t.bin", good.sha256)).exists());
        assert!(!dl.join(format!("{}.t.bin.partial", good.sha256)).exists());
    }

    #[test]
    fn pieces_are_checked_written_in_place_and_resumed() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 13 % 251) as u8).collect();
        let (tmp, mut f, t) = setup(&data);
        f.sync_every = 1;
        let dl = tmp.path().join("dl");
        let pieces = [
            Piece {
                offset: 1_000,
                len: 500,
            },
            Piece {
                offset: 1_500,
                len: 700,
            },
            Piece {
                offset: 10_000,
                len: 4_000,
            },
            Piece {
                offset: 90_000,
                len: 10_000,
            },
        ];
        let requests = [1_000..2_200, 9_000..14_500, 90_000..100_000];
        let check_ok = |k: usize, b: &[u8]| -> Result<(), String> {
            let p = pieces[k];
            if b == &data[p.offset as usize..p.end() as usize] {
                Ok(())
            } else {
                Err("bytes differ".into())
            }
        };
        // The third piece is refused: an error naming it; the first two are kept.
        let mut refuse_third = |k: usize, b: &[u8]| {
            if k == 2 {
                Err("tampered".to_string())
            } else {
                check_ok(k, b)
            }
        };
        let err = f
            .fetch_pieces(&t, &pieces, &requests, &dl, &mut refuse_third)
            .unwrap_err();
        assert!(
            matches!(err, FetchError::PieceRejected { offset: 10_000, .. }),
            "{err}"
        );
        // The rerun fetches only what is left: pieces 3 and 4 (piece 3 from its own start).
        let mut check = check_ok;
        let got = f
            .fetch_pieces(&t, &pieces, &requests, &dl, &mut check)
            .unwrap();
        assert_eq!(got.requests, 2);
        assert_eq!(got.fetched, (14_500 - 10_000) + 10_000);
        let cache = fs::read(&got.path).unwrap();
        assert_eq!(cache.len(), data.len());
        for p in pieces {
            let r = p.offset as usize..p.end() as usize;
            assert_eq!(cache[r.clone()], data[r]);
        }
        // Bytes outside the pieces are holes.
        assert!(cache[9_000..10_000].iter().all(|&b| b == 0));
        // A plan whose requests miss a piece is refused before any fetch.
        let err = f
            .fetch_pieces(
                &t,
                &pieces,
                &requests[..2],
                &tmp.path().join("dl2"),
                &mut check,
            )
            .unwrap_err();
        assert!(err.to_string().contains("do not cover"), "{err}");
    }
}
