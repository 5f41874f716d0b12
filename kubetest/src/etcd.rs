//! A single-node etcd for tests: Debian's etcd on free 127.0.0.1 ports with a temporary
//! data directory, ready when its v3 JSON gateway answers, killed and removed on drop.
//!
//! It owns only that process and directory, and never listens beyond 127.0.0.1.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{etcd_binary, free_port, io, ControlPlaneError};

/// A running etcd; `url` is its client URL.
#[derive(Debug)]
pub struct Etcd {
    pub url: String,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Etcd {
    /// Start etcd and wait (up to 30 s) until `POST /v3/kv/range` succeeds.
    pub async fn start() -> Result<Etcd, ControlPlaneError> {
        let binary = etcd_binary()?;
        let dir = tempfile::tempdir().map_err(io("creating etcd's data directory"))?;
        let (client, peer) = (free_port()?, free_port()?);
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Command::new(&binary)
            .args(["--name", "test", "--data-dir"])
            .arg(dir.path().join("data"))
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("test={peer_url}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(io(format!("starting {}", binary.display())))?;
        let etcd = Etcd {
            url,
            child,
            _dir: dir,
        };
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = http
                .post(format!("{}/v3/kv/range", etcd.url))
                .body(r#"{"key":"AA=="}"#)
                .send()
                .await
                .map(|r| r.status().is_success())
                .unwrap_or(false);
            if ok {
                return Ok(etcd);
            }
            if Instant::now() > deadline {
                return Err(ControlPlaneError::NotReady {
                    component: "etcd".into(),
                    seconds: 30,
                    log: String::new(),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
