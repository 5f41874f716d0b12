//! A minimal HTTP/1.0 GET client for the PXE installer (plain `http://host:port/path`
//! URLs, IP addresses or names the C library resolves).
//!
//! Owns fetching bytes only. There is no TLS: integrity comes from the signed
//! `SHA256SUMS` that every fetched file is checked against before it is used, and the
//! public key that checks it never comes from the network. It never follows redirects.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// A parsed `http://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    pub host: String,
    pub port: u16,
    pub path: String,
}

impl HttpUrl {
    pub fn parse(url: &str) -> Result<HttpUrl> {
        let Some(rest) = url.strip_prefix("http://") else {
            bail!("{url}: only http:// URLs are supported (integrity comes from the signature)");
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (
                h,
                p.parse()
                    .with_context(|| format!("{url}: port {p:?} is not a number"))?,
            ),
            None => (authority, 80),
        };
        if host.is_empty() || path.contains(char::is_whitespace) {
            bail!("{url}: not a usable URL");
        }
        Ok(HttpUrl {
            host: host.to_owned(),
            port,
            path: path.to_owned(),
        })
    }

    /// The URL of `name` in this directory URL (which should end in `/`).
    pub fn join(&self, name: &str) -> HttpUrl {
        let mut path = self.path.clone();
        if !path.ends_with('/') {
            path.push('/');
        }
        path.push_str(name);
        HttpUrl {
            path,
            ..self.clone()
        }
    }
}

impl std::fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}:{}{}", self.host, self.port, self.path)
    }
}

/// GETs `url` and copies the body into `out`; returns the body's length.
pub fn get(url: &HttpUrl, out: &mut impl Write) -> Result<u64> {
    let mut stream = TcpStream::connect((url.host.as_str(), url.port))
        .with_context(|| format!("connecting to {url}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .with_context(|| format!("setting a timeout for {url}"))?;
    write!(
        stream,
        "GET {} HTTP/1.0\r\nHost: {}\r\nUser-Agent: imgbuild-install\r\nConnection: close\r\n\r\n",
        url.path, url.host
    )
    .with_context(|| format!("sending the request for {url}"))?;
    let mut r = BufReader::with_capacity(1 << 20, stream);
    let mut status = String::new();
    r.read_line(&mut status)
        .with_context(|| format!("reading the response from {url}"))?;
    let code = status.split_whitespace().nth(1).unwrap_or_default();
    if code != "200" {
        bail!("{url}: HTTP status {:?}", status.trim());
    }
    let mut length: Option<u64> = None;
    loop {
        let mut line = String::new();
        r.read_line(&mut line)
            .with_context(|| format!("reading the headers from {url}"))?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().ok();
            }
        }
    }
    let n = std::io::copy(&mut r.by_ref(), out).with_context(|| format!("downloading {url}"))?;
    if let Some(len) = length {
        if n != len {
            bail!("{url}: got {n} bytes, the server announced {len}");
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn parses_urls() {
        let u = HttpUrl::parse("http://10.0.2.2:8080/pxe/").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("10.0.2.2", 8080, "/pxe/")
        );
        assert_eq!(
            u.join("SHA256SUMS").to_string(),
            "http://10.0.2.2:8080/pxe/SHA256SUMS"
        );
        assert_eq!(HttpUrl::parse("http://h").unwrap().path, "/");
        assert!(HttpUrl::parse("https://h/").is_err());
        assert!(HttpUrl::parse("http://h:x/").is_err());
    }

    #[test]
    fn gets_a_body_and_rejects_errors() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            for body in [Some("hello"), None] {
                let (mut s, _) = l.accept().unwrap();
                // Read the whole request: closing with unread bytes would reset the
                // connection before the client reads the response.
                let mut req = Vec::new();
                let mut byte = [0u8; 1];
                while !req.ends_with(b"\r\n\r\n") && s.read(&mut byte).unwrap() == 1 {
                    req.push(byte[0]);
                }
                match body {
                    Some(b) => write!(
                        s,
                        "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{b}",
                        b.len()
                    )
                    .unwrap(),
                    None => write!(s, "HTTP/1.0 404 Not Found\r\n\r\n").unwrap(),
                }
            }
        });
        let u = HttpUrl::parse(&format!("http://127.0.0.1:{port}/x")).unwrap();
        let mut out = Vec::new();
        assert_eq!(get(&u, &mut out).unwrap(), 5);
        assert_eq!(out, b"hello");
        let err = get(&u, &mut Vec::new()).unwrap_err();
        assert!(format!("{err:#}").contains("404"), "{err:#}");
        server.join().unwrap();
    }
}
