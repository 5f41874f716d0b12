//! Shared test helpers: keys in tempdirs, small fake images, a static HTTP server.

// Test-only helpers: a failed setup step should panic the test that called it.
#![allow(dead_code, clippy::unwrap_used)]

use imgchannel::{ExpiryPolicy, ReleaseInput, RoleKeys, SigningKeys};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};

/// Generates a key `name.key` in `dir` and returns its path.
pub fn key(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(format!("{name}.key"));
    imgchannel::keys::generate(&p).unwrap();
    p
}

/// Deterministic pseudo-random bytes (xorshift), so images differ per seed.
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A channel with one key for every role, in `tmp/channel`.
pub struct Fixture {
    pub tmp: tempfile::TempDir,
    pub dir: PathBuf,
    pub key: PathBuf,
    pub signing: SigningKeys,
}

impl Fixture {
    pub fn new(channel: &str) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let key = key(tmp.path(), "all");
        let dir = tmp.path().join("channel");
        imgchannel::init(
            &dir,
            channel,
            &RoleKeys::single(&key),
            &ExpiryPolicy::default(),
        )
        .unwrap();
        let signing = SigningKeys::new([key.clone()]).unwrap();
        Self {
            tmp,
            dir,
            key,
            signing,
        }
    }

    pub fn root(&self) -> PathBuf {
        self.dir.join("metadata/1.root.json")
    }

    /// A release of `version` with a 64 KiB image, a chunk index and deltas from `from`.
    pub fn release(&self, version: &str, from: &[&str]) -> ReleaseInput {
        let seed = version.bytes().fold(7u64, |a, b| a * 31 + u64::from(b));
        let inputs = self.tmp.path().join(format!("in-{version}"));
        std::fs::create_dir_all(&inputs).unwrap();
        let image = inputs.join("root.img");
        std::fs::write(&image, bytes(seed, 64 * 1024)).unwrap();
        let chunks = inputs.join("chunks.json");
        std::fs::write(&chunks, format!("{{\"version\":\"{version}\"}}\n")).unwrap();
        let deltas = from
            .iter()
            .map(|f| {
                let p = inputs.join(format!("from-{f}.delta"));
                std::fs::write(&p, bytes(seed ^ 0xde17a, 3000)).unwrap();
                imgchannel::DeltaInput {
                    from_version: (*f).to_owned(),
                    path: p,
                }
            })
            .collect();
        ReleaseInput {
            name: "minimal".into(),
            version: version.into(),
            recipe_digest: format!("sha256:{}", "ab".repeat(32)),
            image,
            chunk_index: Some(chunks),
            deltas,
            min_update_from: None,
            release_notes: format!("release {version}"),
            allow_downgrade: false,
            zstd_level: 1,
        }
    }

    pub fn publish(&self, version: &str, from: &[&str]) -> imgchannel::Published {
        imgchannel::publish(
            &self.dir,
            &self.signing,
            &self.release(version, from),
            &ExpiryPolicy::default(),
        )
        .unwrap()
    }
}

/// Copies a directory tree (files only).
pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

/// A minimal static HTTP/1.1 server on 127.0.0.1 serving `root`, one thread, one
/// request per connection. Returns the base URL.
pub fn serve(root: PathBuf) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let _ = handle(stream, &root);
        }
    });
    url
}

fn handle(mut stream: TcpStream, root: &Path) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut first = String::new();
    reader.read_line(&mut first)?;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
    }
    let path = first.split_whitespace().nth(1).unwrap_or("/");
    let rel = path.trim_start_matches('/');
    let body = if rel.split('/').any(|c| c == ".." || c.is_empty()) {
        None
    } else {
        std::fs::read(root.join(rel)).ok()
    };
    match body {
        Some(b) => {
            write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
                b.len()
            )?;
            stream.write_all(&b)?;
        }
        None => {
            stream.write_all(
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )?;
        }
    }
    stream.flush()
}
