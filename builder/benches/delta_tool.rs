//! Benchmark driver for `bench/delta.sh` (a `harness = false` bench target, so it builds
//! with `cargo bench --no-run` in release mode): makes and applies deltas and measures
//! chunking choices on real images, printing `key=value` figures. It measures; it asserts
//! nothing about speed.
//!
//! ```text
//! delta_tool make OLD NEW OUT [--no-file-diff] [--level N]
//! delta_tool apply SOURCE DELTA TARGET [--no-verify-source|--concurrent-verify] [--fsync]
//! delta_tool chunks OLD NEW
//! delta_tool inspect DELTA
//! delta_tool pack OLD NEW [--level N] [--threads N] [--frames 0,64,256] [--single]
//!     [--save-index PREFIX]
//! ```
//!
//! `pack` measures the chunk pack of NEW for each smallest frame size (KiB): pack size,
//! index size, and what a node holding OLD fetches by Range requests (frames, requests,
//! bytes); `--single` adds the one-frame zstd image at the same level for comparison.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use imgbuild::delta::{chunk_index_with, chunks_missing, make_delta, DeltaOptions};
use imgformat::chunk::Chunking;
use imgformat::chunk::Frame;
use imgformat::delta::{apply_concurrent_verify, apply_with, ApplyOptions, DeltaReader, Op};
use imgformat::pack::{coalesce, frames_needed, write_pack, PackOptions};

/// Current anonymous RSS in KiB (from /proc/self/status).
fn rss_anon_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("RssAnon:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Samples RssAnon every 5 ms and keeps the maximum.
struct RssSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let (s, p) = (stop.clone(), peak.clone());
        let handle = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(rss_anon_kib(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Self {
            stop,
            peak,
            handle: Some(handle),
        }
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        self.peak.load(Ordering::Relaxed).max(rss_anon_kib())
    }
}

/// A writer that only counts.
struct Count(u64);

impl std::io::Write for Count {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let flag = |f: &str| args.iter().any(|a| a == f);
    let pos: Vec<&str> = args
        .iter()
        .filter(|a| !a.starts_with("--"))
        .map(String::as_str)
        .collect();
    match pos.as_slice() {
        ["make", old, new, out, rest @ ..] => {
            let level = args
                .iter()
                .position(|a| a == "--level")
                .and_then(|i| args.get(i + 1))
                .map(|v| v.parse())
                .transpose()
                .context("--level")?
                .unwrap_or(19);
            let _ = rest;
            let opts = DeltaOptions {
                level,
                file_diff: !flag("--no-file-diff"),
                verify: true,
            };
            let s = make_delta(Path::new(old), Path::new(new), Path::new(out), &opts)?;
            println!(
                "delta_size={} copied={} zeroed={} literal={} file_diff={} patch_bytes={} \
                 files_same_path={} files_renamed={} patches_dropped={} seconds={:.1}",
                s.delta_size,
                s.copied,
                s.zeroed,
                s.literal,
                s.file_diff,
                s.patch_bytes,
                s.files_same_path,
                s.files_renamed,
                s.patches_dropped,
                s.seconds
            );
        }
        ["apply", source, delta, target] => {
            let sampler = RssSampler::start();
            let t0 = Instant::now();
            let src = File::open(source).with_context(|| format!("opening {source}"))?;
            let d = File::open(delta).with_context(|| format!("opening {delta}"))?;
            let out = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(target)
                .with_context(|| format!("opening {target}"))?;
            let mut w = BufWriter::with_capacity(0, out);
            let opts = ApplyOptions {
                verify_source: !flag("--no-verify-source"),
            };
            let stats = if flag("--concurrent-verify") {
                let copy = File::open(source).with_context(|| format!("opening {source}"))?;
                apply_concurrent_verify(src, BufReader::new(copy), d, &mut w)?
            } else {
                apply_with(src, d, &mut w, opts)?
            };
            if flag("--fsync") {
                w.get_ref().sync_all()?;
            }
            let secs = t0.elapsed().as_secs_f64();
            let peak = sampler.finish();
            println!(
                "apply_seconds={secs:.2} throughput_mib_s={:.0} peak_rss_anon_kib={peak} ops={} \
                 copied={} zeroed={} literal={} file_diff={}",
                stats.target_size as f64 / secs / 1048576.0,
                stats.ops,
                stats.copied,
                stats.zeroed,
                stats.literal,
                stats.file_diff
            );
        }
        ["chunks", old, new] => {
            let fixed = |k: u32| Chunking::Fixed { size: k << 10 };
            let cdc = |min: u32, avg: u32, max: u32| Chunking::FastCdc {
                min: min << 10,
                avg: avg << 10,
                max: max << 10,
            };
            println!(
                "{:<28} {:>8} {:>12} {:>14} {:>14}",
                "chunking", "chunks", "index_json", "fetch_bytes", "fetch+index"
            );
            for c in [
                fixed(4),
                fixed(16),
                fixed(64),
                fixed(256),
                cdc(4, 16, 64),
                cdc(16, 64, 256),
                cdc(64, 256, 1024),
            ] {
                let a = chunk_index_with(Path::new(old), c)?;
                let b = chunk_index_with(Path::new(new), c)?;
                let json = b.to_json()?.len() as u64;
                let plan = chunks_missing(&b, &a);
                let name = match c {
                    Chunking::Fixed { size } => format!("fixed {}K", size >> 10),
                    Chunking::FastCdc { min, avg, max } => {
                        format!("fastcdc {}K/{}K/{}K", min >> 10, avg >> 10, max >> 10)
                    }
                };
                println!(
                    "{name:<28} {:>8} {json:>12} {:>14} {:>14}",
                    b.chunks.len(),
                    plan.fetch_bytes,
                    plan.fetch_bytes + json
                );
            }
        }
        ["inspect", delta] => {
            let f = File::open(delta).with_context(|| format!("opening {delta}"))?;
            let mut r = DeltaReader::new(std::io::BufReader::new(f))?;
            // kind -> (ops, target bytes, op stream bytes before compression)
            let mut sums: BTreeMap<&str, (u64, u64, u64)> = BTreeMap::new();
            let mut diff_buf = vec![0u8; 1 << 16];
            loop {
                let at = r.delta_position();
                let Some(op) = r.next_op()? else { break };
                while r.read_diff(&mut diff_buf)? > 0 {}
                let (kind, out) = match &op {
                    Op::CopySource { len, .. } => ("copy", *len),
                    Op::Zero { len } => ("zero", *len),
                    Op::Literal { data } => ("literal", data.len() as u64),
                    Op::FileDiff { out_len, .. } => ("file_diff", *out_len),
                };
                let e = sums.entry(kind).or_default();
                e.0 += 1;
                e.1 += out;
                e.2 += r.delta_position() - at;
            }
            println!(
                "{:<10} {:>8} {:>14} {:>12}",
                "op", "count", "target_bytes", "stream_bytes"
            );
            for (k, (n, out, enc)) in sums {
                println!("{k:<10} {n:>8} {out:>14} {enc:>12}");
            }
            println!(
                "op stream {} bytes, compressed into {} bytes",
                r.delta_position(),
                std::fs::metadata(delta)?.len()
            );
        }
        ["pack", old, new, ..] => {
            let opt = |name: &str| {
                args.iter()
                    .position(|a| a == name)
                    .and_then(|i| args.get(i + 1))
            };
            let level: i32 = opt("--level").map(|v| v.parse()).transpose()?.unwrap_or(19);
            let threads: usize = opt("--threads")
                .map(|v| v.parse())
                .transpose()?
                .unwrap_or(2);
            let frames: Vec<u32> = opt("--frames")
                .map_or("0,64,256", |s| s.as_str())
                .split(',')
                .map(|v| v.parse::<u32>().map(|k| k << 10))
                .collect::<Result<_, _>>()
                .context("--frames")?;
            let a = chunk_index_with(Path::new(old), Chunking::default())?;
            let b = chunk_index_with(Path::new(new), Chunking::default())?;
            let plan = chunks_missing(&b, &a);
            println!(
                "image_bytes={} chunks={} missing_chunks={} missing_raw_bytes={} index_v1_json={}",
                b.image_size,
                b.chunks.len(),
                plan.fetch_chunks,
                plan.fetch_bytes,
                b.to_json()?.len()
            );
            if flag("--single") {
                let t0 = Instant::now();
                let mut count = Count(0);
                let mut enc = zstd::Encoder::new(&mut count, level)?;
                enc.include_checksum(true)?;
                std::io::copy(&mut BufReader::new(File::open(new)?), &mut enc)?;
                enc.finish()?;
                println!(
                    "single_frame level={level} bytes={} seconds={:.1}",
                    count.0,
                    t0.elapsed().as_secs_f64()
                );
            }
            for min_frame in frames {
                let t0 = Instant::now();
                let mut idx = b.clone();
                let mut count = Count(0);
                let opts = PackOptions {
                    level,
                    min_frame,
                    threads,
                };
                let f = BufReader::with_capacity(1 << 20, File::open(new)?);
                write_pack(f, &mut idx, "bench", &opts, &mut count)?;
                if let Some(path) = opt("--save-index") {
                    std::fs::write(format!("{path}.{}K.json", min_frame >> 10), idx.to_json()?)?;
                }
                let all = idx.frames();
                let (needed, _) = frames_needed(&idx, &plan);
                let refs: Vec<&Frame> = needed.iter().map(|&i| &all[i]).collect();
                let fetch: u64 = refs.iter().map(|f| u64::from(f.pack_len)).sum();
                let raw: u64 = refs.iter().map(|f| f.len).sum();
                let exact = coalesce(&refs, 0, usize::MAX).len();
                // imgupdate's policy (install.rs): gaps up to 4 KiB merged, ≤ 1024 requests.
                let capped = coalesce(&refs, 4 << 10, 1024);
                let capped_bytes: u64 = capped.iter().map(|r| r.end - r.start).sum();
                println!(
                    "pack min_frame={}K level={level} pack_bytes={} frames={} index_json={} \
                     fetch_frames={} fetch_raw={raw} fetch_bytes={fetch} requests={exact} \
                     requests_capped={} fetch_bytes_capped={capped_bytes} seconds={:.1}",
                    min_frame >> 10,
                    count.0,
                    all.len(),
                    idx.to_json()?.len(),
                    refs.len(),
                    capped.len(),
                    t0.elapsed().as_secs_f64()
                );
            }
        }
        _ => bail!("usage: delta_tool make|apply|chunks|inspect|pack ... (see the module docs)"),
    }
    Ok(())
}
