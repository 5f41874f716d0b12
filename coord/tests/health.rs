//! Health checks against real things on this machine: HTTP and TCP servers on
//! 127.0.0.1, `true` / `false` / `sleep`, and systemd state from a stand-in source.

#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use std::time::{Duration, Instant};

use imgcoord::health::{
    run_round, run_until_verdict, Check, CheckKind, RunPolicy, SystemProbe, SystemdSource, Verdict,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// systemd as a test wants it.
struct FakeSystemd {
    system: &'static str,
    units: Vec<(&'static str, &'static str)>,
}

#[async_trait::async_trait]
impl SystemdSource for FakeSystemd {
    async fn system_state(&self) -> Result<String, String> {
        Ok(self.system.to_string())
    }
    async fn unit_state(&self, unit: &str) -> Result<String, String> {
        Ok(self
            .units
            .iter()
            .find(|(u, _)| *u == unit)
            .map_or("inactive", |(_, s)| s)
            .to_string())
    }
    async fn failed_units(&self) -> Result<Vec<String>, String> {
        Ok(self
            .units
            .iter()
            .filter(|(_, s)| *s == "failed")
            .map(|(u, _)| u.to_string())
            .collect())
    }
    async fn running_jobs(&self) -> Result<Vec<String>, String> {
        Ok(self
            .units
            .iter()
            .filter(|(_, s)| *s == "activating")
            .map(|(u, _)| u.to_string())
            .collect())
    }
}

fn probe() -> SystemProbe<FakeSystemd> {
    SystemProbe::new(FakeSystemd {
        system: "running",
        units: vec![],
    })
}

/// An HTTP server answering every request with `status`.
async fn http_server(status: &'static str) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/healthz", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 2048];
            let _ = s.read(&mut buf).await;
            let body = "ok";
            let answer = format!(
                "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(answer.as_bytes()).await;
        }
    });
    (url, task)
}

fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn check(kind: CheckKind, timeout_ms: u64) -> Check {
    Check::new(kind).with_timeout(Duration::from_millis(timeout_ms))
}

#[tokio::test]
async fn http_checks_expect_2xx() {
    let (ok_url, t1) = http_server("200 OK").await;
    let (bad_url, t2) = http_server("503 Service Unavailable").await;
    let (no_content, t3) = http_server("204 No Content").await;
    let dead_url = format!("http://127.0.0.1:{}/healthz", closed_port());
    let checks = [
        check(CheckKind::Http { url: ok_url }, 2000),
        check(CheckKind::Http { url: bad_url }, 2000),
        check(CheckKind::Http { url: no_content }, 2000),
        check(CheckKind::Http { url: dead_url }, 2000),
    ];
    let results = run_round(&checks, &probe(), Duration::from_secs(10)).await;
    let got: Vec<(bool, &str)> = results.iter().map(|r| (r.ok, r.detail.as_str())).collect();
    assert_eq!(got[0], (true, "HTTP 200"));
    assert_eq!(got[1], (false, "HTTP 503"));
    assert_eq!(got[2], (true, "HTTP 204"));
    assert!(!got[3].0 && got[3].1.starts_with("GET "), "{:?}", got[3]);
    for t in [t1, t2, t3] {
        t.abort();
    }
}

#[tokio::test]
async fn http_check_that_hangs_times_out() {
    // Accepts and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    let hold = tokio::spawn(async move {
        let mut open = Vec::new();
        loop {
            let (s, _) = listener.accept().await.unwrap();
            open.push(s);
        }
    });
    let started = Instant::now();
    let results = run_round(
        &[check(CheckKind::Http { url }, 300)],
        &probe(),
        Duration::from_secs(10),
    )
    .await;
    assert!(!results[0].ok);
    assert_eq!(results[0].detail, "timed out after 300ms");
    assert!(started.elapsed() < Duration::from_secs(2));
    hold.abort();
}

#[tokio::test]
async fn tcp_checks_connect() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let open = listener.local_addr().unwrap().to_string();
    let closed = format!("127.0.0.1:{}", closed_port());
    let results = run_round(
        &[
            check(CheckKind::Tcp { address: open }, 1000),
            check(CheckKind::Tcp { address: closed }, 1000),
        ],
        &probe(),
        Duration::from_secs(5),
    )
    .await;
    assert!(results[0].ok, "{:?}", results[0]);
    assert!(
        !results[1].ok && results[1].detail.contains("connect"),
        "{:?}",
        results[1]
    );
}

#[tokio::test]
async fn command_checks_use_exit_status_and_time_out() {
    let argv = |a: &[&str]| CheckKind::Command {
        argv: a.iter().map(|s| s.to_string()).collect(),
    };
    let started = Instant::now();
    let results = run_round(
        &[
            check(argv(&["true"]), 2000),
            check(argv(&["false"]), 2000),
            check(argv(&["sleep", "30"]), 300),
            check(argv(&["/nonexistent/program"]), 2000),
            // Arguments are passed as-is, never through a shell.
            check(argv(&["test", "a b", "=", "a b"]), 2000),
            check(argv(&["ls", "/nonexistent-dir-for-check"]), 2000),
        ],
        &probe(),
        Duration::from_secs(10),
    )
    .await;
    let ok: Vec<bool> = results.iter().map(|r| r.ok).collect();
    assert_eq!(ok, [true, false, false, false, true, false], "{results:?}");
    assert_eq!(results[0].detail, "exit status 0");
    assert_eq!(results[1].detail, "exit status: 1");
    assert_eq!(results[2].detail, "timed out after 300ms");
    assert!(results[3].detail.contains("running /nonexistent/program"));
    assert!(
        results[5].detail.contains("nonexistent-dir-for-check"),
        "{:?}",
        results[5]
    );
    // sleep 30 was cut, not waited for.
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn systemd_state_and_units() {
    let degraded = SystemProbe::new(FakeSystemd {
        system: "degraded",
        units: vec![
            ("kubelet.service", "active"),
            ("containerd.service", "failed"),
        ],
    });
    let units = |u: &[&str]| CheckKind::Units {
        units: u.iter().map(|s| s.to_string()).collect(),
    };
    let results = run_round(
        &[
            check(CheckKind::SystemState, 1000),
            check(units(&["kubelet.service"]), 1000),
            check(
                units(&["kubelet.service", "containerd.service", "etcd.service"]),
                1000,
            ),
        ],
        &degraded,
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(
        (results[0].ok, results[0].detail.as_str()),
        (false, "degraded")
    );
    assert!(results[1].ok);
    assert_eq!(
        (results[2].ok, results[2].detail.as_str()),
        (false, "containerd.service failed, etcd.service inactive")
    );
    let healthy = probe();
    let r = run_round(
        &[check(CheckKind::SystemState, 1000)],
        &healthy,
        Duration::from_secs(5),
    )
    .await;
    assert!(r[0].ok);
}

#[tokio::test]
async fn runner_waits_for_a_service_that_comes_up() {
    // Port reserved now, served only after a second: the TCP check fails, then passes.
    let port = closed_port();
    let server = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let l = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        loop {
            let _ = l.accept().await;
        }
    });
    let report = run_until_verdict(
        &[
            check(
                CheckKind::Tcp {
                    address: format!("127.0.0.1:{port}"),
                },
                500,
            ),
            check(
                CheckKind::Command {
                    argv: vec!["true".into()],
                },
                500,
            ),
        ],
        &probe(),
        RunPolicy {
            deadline: Duration::from_secs(10),
            interval: Duration::from_millis(200),
        },
    )
    .await;
    assert_eq!(report.verdict, Verdict::Pass, "{report:?}");
    assert!(report.rounds >= 2, "{report:?}");
    server.abort();

    // And one that never comes up fails at the deadline, not before, not much after.
    let started = Instant::now();
    let report = run_until_verdict(
        &[check(
            CheckKind::Command {
                argv: vec!["false".into()],
            },
            500,
        )],
        &probe(),
        RunPolicy {
            deadline: Duration::from_millis(1500),
            interval: Duration::from_millis(200),
        },
    )
    .await;
    assert!(matches!(report.verdict, Verdict::Fail { .. }), "{report:?}");
    assert!(started.elapsed() >= Duration::from_millis(1200));
    assert!(started.elapsed() < Duration::from_secs(4));
}
