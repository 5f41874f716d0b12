//! What a cluster's nodes and lock service say: each node's updater metrics (through
//! the forwarded metrics port) and the FleetLock server's history and failed releases.
//! Parsing is pure and tested; fetching is a plain HTTP/1.1 request on 127.0.0.1.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use imgcoord::fleetlock_server::{Event, EventKind};
use serde::Serialize;

use super::ClusterInfo;

/// One node as `cluster status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct NodeStatus {
    pub name: String,
    /// QEMU runs.
    pub up: bool,
    /// The updater answered on its metrics port.
    pub reachable: bool,
    pub running_version: Option<String>,
    pub running_slot: Option<String>,
    pub staged_version: Option<String>,
    /// The update state machine's state.
    pub state: Option<String>,
    pub failures: Option<u64>,
}

/// Reads imgupdate's Prometheus text into `st`.
pub fn parse_metrics(text: &str, st: &mut NodeStatus) {
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let label = |name: &str| -> Option<String> {
            let start = series.find(&format!("{name}=\""))? + name.len() + 2;
            let end = series[start..].find('"')? + start;
            Some(series[start..end].to_string())
        };
        if series.starts_with("imgupdate_state{") && value.trim() == "1" {
            st.state = label("state");
        } else if series.starts_with("imgupdate_running_version_info{") {
            st.running_version = label("version");
            st.running_slot = label("slot");
        } else if series.starts_with("imgupdate_staged_version_info{") {
            st.staged_version = label("version");
        } else if series == "imgupdate_failures_total" {
            st.failures = value.trim().parse().ok();
        }
    }
}

/// Holders of `group` after replaying a FleetLock history.
pub fn holders_from_history(history: &[Event], group: &str) -> Vec<String> {
    let mut held = BTreeSet::new();
    for e in history.iter().filter(|e| e.group == group) {
        match e.kind {
            EventKind::Acquired => {
                held.insert(e.id.clone());
            }
            EventKind::Released | EventKind::Expired => {
                held.remove(&e.id);
            }
            _ => {}
        }
    }
    held.into_iter().collect()
}

/// One HTTP/1.1 request with `Connection: close`; returns (status, body).
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<(u16, Vec<u8>)> {
    let timeout = Duration::from_secs(3);
    let mut s = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    s.write_all(body)?;
    let mut all = Vec::new();
    s.read_to_end(&mut all)
        .with_context(|| format!("reading the answer of {addr}"))?;
    let Some(split) = all.windows(4).position(|w| w == b"\r\n\r\n") else {
        bail!("{addr}{path}: no HTTP header in the answer");
    };
    let head = String::from_utf8_lossy(&all[..split]);
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("{addr}{path}: bad status line"))?;
    Ok((code, all[split + 4..].to_vec()))
}

fn addr_of(url: &str) -> Result<SocketAddr> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("{url}: not an http:// URL"))?;
    rest.trim_end_matches('/')
        .parse()
        .with_context(|| format!("{url}: not host:port"))
}

/// The metrics text of the node forwarded at `addr`.
pub fn fetch_metrics(addr: SocketAddr) -> Result<String> {
    let (code, body) = http(addr, "GET", "/metrics", &[], b"")?;
    if code != 200 {
        bail!("{addr}/metrics answered {code}");
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// The FleetLock server's history.
pub fn fleetlock_history(url: &str) -> Result<Vec<Event>> {
    let (code, body) = http(addr_of(url)?, "GET", "/v1/imgbuild/history", &[], b"")?;
    if code != 200 {
        bail!("{url}/v1/imgbuild/history answered {code}");
    }
    serde_json::from_slice(&body).context("parsing the FleetLock history")
}

/// Versions recorded as failed in the `default` group.
pub fn fleetlock_failed(url: &str) -> Result<Vec<String>> {
    let body = br#"{"client_params":{"id":"imgbuild-cluster","group":"default"}}"#;
    let (code, answer) = http(
        addr_of(url)?,
        "POST",
        "/v1/imgbuild/failed",
        &[
            ("fleet-lock-protocol", "true"),
            ("Content-Type", "application/json"),
        ],
        body,
    )?;
    if code != 200 {
        bail!("{url}/v1/imgbuild/failed answered {code}");
    }
    let v: serde_json::Value = serde_json::from_slice(&answer)?;
    Ok(v["failed"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|f| f["version"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default())
}

/// Whether process `pid` runs.
pub fn alive(pid: u32) -> bool {
    pid != 0 && std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Every node's status.
pub fn collect(info: &ClusterInfo) -> Vec<NodeStatus> {
    info.nodes
        .iter()
        .map(|n| {
            let mut st = NodeStatus {
                name: n.name.clone(),
                up: alive(n.pid),
                ..NodeStatus::default()
            };
            if st.up {
                if let Ok(text) = fetch_metrics(n.metrics) {
                    st.reachable = true;
                    parse_metrics(&text, &mut st);
                }
            }
            st
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_read() {
        let text = "# HELP imgupdate_state x\n\
            imgupdate_state{state=\"idle\"} 0\n\
            imgupdate_state{state=\"staged\"} 1\n\
            imgupdate_running_version_info{version=\"1.0.0\",slot=\"a\"} 1\n\
            imgupdate_staged_version_info{version=\"1.0.1\",slot=\"b\"} 1\n\
            imgupdate_failures_total 2\n";
        let mut st = NodeStatus::default();
        parse_metrics(text, &mut st);
        assert_eq!(st.state.as_deref(), Some("staged"));
        assert_eq!(st.running_version.as_deref(), Some("1.0.0"));
        assert_eq!(st.running_slot.as_deref(), Some("a"));
        assert_eq!(st.staged_version.as_deref(), Some("1.0.1"));
        assert_eq!(st.failures, Some(2));
        let mut empty = NodeStatus::default();
        parse_metrics("garbage\n{{\n", &mut empty);
        assert_eq!(empty, NodeStatus::default());
    }

    #[test]
    fn holders_replay_the_history() {
        let ev = |id: &str, kind| Event {
            at: "2026-01-01T00:00:00Z".parse().unwrap(),
            group: "default".into(),
            id: id.into(),
            kind,
            holders_after: 0,
        };
        let h = vec![
            ev("a", EventKind::Acquired),
            ev("b", EventKind::Refused),
            ev("a", EventKind::Released),
            ev("b", EventKind::Acquired),
            ev("c", EventKind::Acquired),
            ev("c", EventKind::Expired),
        ];
        assert_eq!(holders_from_history(&h, "default"), ["b"]);
        assert!(holders_from_history(&h, "other").is_empty());
    }
}
