//! A small static HTTP/1.1 server for a channel directory: what `imgbuild cluster` and
//! the tests put in front of a channel so nodes fetch it the way they fetch a real CDN.
//!
//! GET and HEAD of regular files below the root, single `Range: bytes=A-B` / `A-` /
//! `-N` requests answered with 206 (416 when unsatisfiable), everything else 404/405.
//! Paths with `..`, empty segments or a NUL are refused; symlinks are not followed out
//! of the root. A thread per connection, one request per connection (`Connection:
//! close`): enough for a handful of nodes, and nothing here is cached.
//!
//! This module owns serving only; it never writes below the root.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One request as logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub peer: SocketAddr,
    pub method: String,
    pub path: String,
    pub range: Option<String>,
    pub status: u16,
    /// Body bytes sent.
    pub bytes: u64,
}

#[derive(Debug, Default)]
struct Shared {
    stop: AtomicBool,
    sent: AtomicU64,
    log: Mutex<Vec<Request>>,
}

/// A running server; stops when dropped.
#[derive(Debug)]
pub struct StaticServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StaticServer {
    /// Serves `root` on `addr` (use `127.0.0.1:0` for a free port).
    pub fn start(root: &Path, addr: SocketAddr) -> std::io::Result<StaticServer> {
        let root = root.canonicalize()?;
        let listener = TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("static-http".into())
            .spawn(move || accept_loop(&listener, &root, &s))?;
        Ok(StaticServer {
            addr,
            shared,
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` (no trailing slash).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Body bytes sent so far.
    pub fn bytes_sent(&self) -> u64 {
        self.shared.sent.load(Ordering::SeqCst)
    }

    /// Requests answered so far, oldest first.
    pub fn requests(&self) -> Vec<Request> {
        self.shared
            .log
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default()
    }
}

impl Drop for StaticServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, root: &Path, shared: &Arc<Shared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, peer)) => {
                let (root, shared) = (root.to_path_buf(), shared.clone());
                std::thread::spawn(move || {
                    if let Some(req) = handle(stream, peer, &root, &shared) {
                        if let Ok(mut log) = shared.log.lock() {
                            log.push(req);
                        }
                    }
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// What a `Range` header asks for, resolved against a file of `len` bytes: the
/// inclusive byte range, or `Err(())` when it cannot be satisfied. `None` for no or an
/// unsupported (multi-range, non-bytes) header: the whole file is sent.
pub fn resolve_range(header: Option<&str>, len: u64) -> Option<Result<(u64, u64), ()>> {
    let spec = header?.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    Some(match (a.is_empty(), b.is_empty()) {
        // -N: the last N bytes.
        (true, false) => match b.parse::<u64>() {
            Ok(0) | Err(_) => Err(()),
            Ok(_) if len == 0 => Err(()),
            Ok(n) => Ok((len.saturating_sub(n), len - 1)),
        },
        (false, _) => match (a.parse::<u64>(), b.parse::<u64>()) {
            (Ok(start), _) if start >= len => Err(()),
            (Ok(start), Ok(end)) if end >= start => Ok((start, end.min(len - 1))),
            (Ok(start), Err(_)) if b.is_empty() => Ok((start, len - 1)),
            _ => Err(()),
        },
        (true, true) => Err(()),
    })
}

/// The file below `root` that `path` (the request target) names, if any.
fn target(root: &Path, path: &str) -> Option<PathBuf> {
    let path = path.split(['?', '#']).next().unwrap_or("");
    let rel = path.strip_prefix('/')?;
    if rel.contains('\0') {
        return None;
    }
    let rel = Path::new(rel);
    if !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        return None;
    }
    let full = root.join(rel).canonicalize().ok()?;
    (full.starts_with(root) && full.is_file()).then_some(full)
}

fn handle(stream: TcpStream, peer: SocketAddr, root: &Path, shared: &Shared) -> Option<Request> {
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .ok()?;
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut first = String::new();
    reader.read_line(&mut first).ok()?;
    let mut range = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.trim().eq_ignore_ascii_case("range") {
                range = Some(v.trim().to_string());
            }
        }
    }
    let mut words = first.split_whitespace();
    let method = words.next().unwrap_or("").to_string();
    let path = words.next().unwrap_or("").to_string();
    let mut req = Request {
        peer,
        method: method.clone(),
        path: path.clone(),
        range: range.clone(),
        status: 0,
        bytes: 0,
    };
    let mut out = stream;
    let result = respond(
        &mut out,
        &method,
        &path,
        range.as_deref(),
        root,
        shared,
        &mut req,
    );
    if result.is_err() && req.status == 0 {
        req.status = 500;
    }
    Some(req)
}

fn respond(
    out: &mut TcpStream,
    method: &str,
    path: &str,
    range: Option<&str>,
    root: &Path,
    shared: &Shared,
    req: &mut Request,
) -> std::io::Result<()> {
    let mut status = |out: &mut TcpStream, code: u16, text: &str| -> std::io::Result<()> {
        req.status = code;
        write!(
            out,
            "HTTP/1.1 {code} {text}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
    };
    if method != "GET" && method != "HEAD" {
        return status(out, 405, "Method Not Allowed");
    }
    let Some(file) = target(root, path) else {
        return status(out, 404, "Not Found");
    };
    let mut f = File::open(&file)?;
    let len = f.metadata()?.len();
    let (code, start, end) = match resolve_range(range, len) {
        None => (200, 0, len),
        Some(Ok((a, b))) => (206, a, b + 1),
        Some(Err(())) => {
            req.status = 416;
            return write!(
                out,
                "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{len}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
        }
    };
    req.status = code;
    let mut head = format!(
        "HTTP/1.1 {code} {}\r\nContent-Length: {}\r\nAccept-Ranges: bytes\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n",
        if code == 206 { "Partial Content" } else { "OK" },
        end - start
    );
    if code == 206 {
        head.push_str(&format!(
            "Content-Range: bytes {start}-{}/{len}\r\n",
            end - 1
        ));
    }
    head.push_str("\r\n");
    out.write_all(head.as_bytes())?;
    if method == "HEAD" {
        return out.flush();
    }
    f.seek(SeekFrom::Start(start))?;
    let mut left = end - start;
    let mut buf = vec![0u8; 256 << 10];
    while left > 0 {
        let want = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
        let n = f.read(&mut buf[..want])?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])?;
        left -= n as u64;
        req.bytes += n as u64;
        shared.sent.fetch_add(n as u64, Ordering::SeqCst);
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_resolve() {
        assert_eq!(resolve_range(None, 10), None);
        assert_eq!(resolve_range(Some("bytes=0-3"), 10), Some(Ok((0, 3))));
        assert_eq!(resolve_range(Some("bytes=4-"), 10), Some(Ok((4, 9))));
        assert_eq!(resolve_range(Some("bytes=4-100"), 10), Some(Ok((4, 9))));
        assert_eq!(resolve_range(Some("bytes=-3"), 10), Some(Ok((7, 9))));
        assert_eq!(resolve_range(Some("bytes=-30"), 10), Some(Ok((0, 9))));
        assert_eq!(resolve_range(Some("bytes=10-"), 10), Some(Err(())));
        assert_eq!(resolve_range(Some("bytes=5-4"), 10), Some(Err(())));
        assert_eq!(resolve_range(Some("bytes=-0"), 10), Some(Err(())));
        assert_eq!(resolve_range(Some("bytes=-"), 10), Some(Err(())));
        assert_eq!(resolve_range(Some("bytes=x-"), 10), Some(Err(())));
        assert_eq!(resolve_range(Some("bytes=0-1,3-4"), 10), None);
        assert_eq!(resolve_range(Some("items=0-1"), 10), None);
        assert_eq!(resolve_range(Some("bytes=0-"), 0), Some(Err(())));
    }

    fn get(url: &str, path: &str, range: Option<&str>) -> (u16, Vec<u8>, String) {
        let addr = url.trim_start_matches("http://");
        let mut s = TcpStream::connect(addr).unwrap();
        let mut req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n");
        if let Some(r) = range {
            req.push_str(&format!("Range: {r}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).unwrap();
        let mut all = Vec::new();
        s.read_to_end(&mut all).unwrap();
        let split = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let head = String::from_utf8_lossy(&all[..split]).into_owned();
        let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        (code, all[split + 4..].to_vec(), head)
    }

    #[test]
    fn serves_files_ranges_and_refuses_escapes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("targets")).unwrap();
        std::fs::write(root.join("targets/a.bin"), b"0123456789").unwrap();
        std::fs::write(dir.path().join("secret"), b"no").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), root.join("link")).unwrap();
        let srv = StaticServer::start(&root, "127.0.0.1:0".parse().unwrap()).unwrap();
        let url = srv.url();

        let (code, body, head) = get(&url, "/targets/a.bin", None);
        assert_eq!((code, body.as_slice()), (200, &b"0123456789"[..]));
        assert!(head.contains("Content-Length: 10"));
        let (code, body, head) = get(&url, "/targets/a.bin", Some("bytes=2-4"));
        assert_eq!((code, body.as_slice()), (206, &b"234"[..]));
        assert!(head.contains("Content-Range: bytes 2-4/10"), "{head}");
        let (code, body, _) = get(&url, "/targets/a.bin", Some("bytes=7-"));
        assert_eq!((code, body.as_slice()), (206, &b"789"[..]));
        assert_eq!(get(&url, "/targets/a.bin", Some("bytes=10-")).0, 416);
        for bad in [
            "/../secret",
            "/link",
            "/targets/../../secret",
            "/targets",
            "/nope",
            "x",
        ] {
            assert_eq!(get(&url, bad, None).0, 404, "{bad}");
        }
        assert_eq!(srv.bytes_sent(), 10 + 3 + 3);
        let log = srv.requests();
        assert!(log
            .iter()
            .any(|r| r.status == 206 && r.range.as_deref() == Some("bytes=2-4")));
    }
}
