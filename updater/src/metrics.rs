//! Prometheus metrics in the text exposition format, served on a local port or written to
//! a textfile for node_exporter.
//!
//! This module owns rendering the metrics from the state file and what runs, and the two
//! ways out. It must never change state and never listen on anything but the configured
//! address (127.0.0.1 in the shipped config).

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;

use anyhow::Context;

use crate::slots::Running;
use crate::state::{State, StateFile};

/// Every state name, so each gets a 0/1 series.
const STATES: [&str; 12] = [
    "idle",
    "checking",
    "downloading",
    "verifying",
    "staged",
    "locking",
    "draining",
    "rebooting",
    "trial",
    "committed",
    "rolling_back",
    "failed",
];

/// The metrics text.
pub fn render(running: &Running, sf: &StateFile) -> String {
    let mut out = String::new();
    out.push_str("# HELP imgupdate_state Current state of the update flow (1 = current).\n");
    out.push_str("# TYPE imgupdate_state gauge\n");
    for s in STATES {
        let v = u8::from(sf.state.name() == s);
        out.push_str(&format!("imgupdate_state{{state=\"{s}\"}} {v}\n"));
    }
    out.push_str("# HELP imgupdate_running_version_info The version and slot that booted.\n");
    out.push_str("# TYPE imgupdate_running_version_info gauge\n");
    out.push_str(&format!(
        "imgupdate_running_version_info{{version=\"{}\",slot=\"{}\"}} 1\n",
        escape(&running.version),
        running.slot
    ));
    if let State::Staged { version, slot } = &sf.state {
        out.push_str(
            "# HELP imgupdate_staged_version_info The version staged in the inactive slot.\n",
        );
        out.push_str("# TYPE imgupdate_staged_version_info gauge\n");
        out.push_str(&format!(
            "imgupdate_staged_version_info{{version=\"{}\",slot=\"{slot}\"}} 1\n",
            escape(version)
        ));
    }
    out.push_str("# HELP imgupdate_bytes_fetched_total Bytes downloaded from the channel.\n");
    out.push_str("# TYPE imgupdate_bytes_fetched_total counter\n");
    out.push_str(&format!(
        "imgupdate_bytes_fetched_total {}\n",
        sf.bytes_fetched
    ));
    out.push_str("# HELP imgupdate_failures_total Failed update attempts.\n");
    out.push_str("# TYPE imgupdate_failures_total counter\n");
    out.push_str(&format!("imgupdate_failures_total {}\n", sf.failures));
    if let Some(t) = sf
        .last_check
        .as_deref()
        .and_then(|t| t.parse::<jiff::Timestamp>().ok())
    {
        out.push_str("# HELP imgupdate_last_check_timestamp_seconds Time of the last check.\n");
        out.push_str("# TYPE imgupdate_last_check_timestamp_seconds gauge\n");
        out.push_str(&format!(
            "imgupdate_last_check_timestamp_seconds {}\n",
            t.as_second()
        ));
    }
    out
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Write the metrics to `path` atomically (node_exporter's textfile collector).
pub fn write_textfile(path: &Path, text: &str) -> anyhow::Result<()> {
    crate::state::write_atomic(path, text.as_bytes())
}

/// Serve `GET /metrics` on `addr` in a background thread; `render` is called per request.
pub fn serve(
    addr: SocketAddr,
    render: impl Fn() -> String + Send + 'static,
) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).with_context(|| format!("listening on {addr}"))?;
    let local = listener
        .local_addr()
        .context("reading the metrics address")?;
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut stream = stream;
            let mut first = String::new();
            if BufReader::new(&stream).read_line(&mut first).is_err() {
                continue;
            }
            let resp = if first.starts_with("GET /metrics ") {
                let body = render();
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    .to_string()
            };
            let _ = stream.write_all(resp.as_bytes());
        }
    });
    Ok(local)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use imgformat::layout::Slot;

    #[test]
    fn renders_state_versions_and_counters() {
        let running = Running {
            version: "1.0".into(),
            image_id: None,
            slot: Slot::A,
        };
        let sf = StateFile {
            state: State::Staged {
                version: "1.1".into(),
                slot: Slot::B,
            },
            bytes_fetched: 1234,
            failures: 2,
            last_check: Some("2026-01-01T00:00:00Z".into()),
            ..StateFile::default()
        };
        let text = render(&running, &sf);
        assert!(text.contains("imgupdate_state{state=\"staged\"} 1\n"));
        assert!(text.contains("imgupdate_state{state=\"idle\"} 0\n"));
        assert!(text.contains("imgupdate_running_version_info{version=\"1.0\",slot=\"a\"} 1\n"));
        assert!(text.contains("imgupdate_staged_version_info{version=\"1.1\",slot=\"b\"} 1\n"));
        assert!(text.contains("imgupdate_bytes_fetched_total 1234\n"));
        assert!(text.contains("imgupdate_failures_total 2\n"));
        assert!(text.contains("imgupdate_last_check_timestamp_seconds 1767225600\n"));
    }

    #[test]
    fn serves_metrics_on_a_local_port() {
        use std::io::Read;
        let addr = serve("127.0.0.1:0".parse().unwrap(), || {
            "imgupdate_failures_total 7\n".into()
        })
        .unwrap();
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"), "{resp}");
        assert!(
            resp.ends_with("\r\n\r\nimgupdate_failures_total 7\n"),
            "{resp}"
        );
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /other HTTP/1.1\r\n\r\n").unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        assert!(resp.starts_with("HTTP/1.1 404"), "{resp}");
    }
}
