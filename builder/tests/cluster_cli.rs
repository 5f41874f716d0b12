//! `imgbuild cluster up | status | logs | down` as a user runs them, with real QEMU
//! processes (OVMF on a blank disk: nothing boots, which is all the lifecycle needs) and
//! a real FleetLock server: `down` stops every process `up` started and removes every
//! file; a second `up` on the same directory is refused.

#![allow(clippy::unwrap_used)] // test helpers

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn imgbuild() -> Command {
    Command::new(env!("CARGO_BIN_EXE_imgbuild"))
}

fn status_json(dir: &Path) -> Option<serde_json::Value> {
    let out = imgbuild()
        .args(["cluster", "status", "--json", "--dir"])
        .arg(dir)
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).unwrap())
}

fn alive(pid: u64) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[test]
fn up_status_logs_down_leave_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("blank.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("64M")
        .status()
        .unwrap();
    assert!(st.success());
    let channel = tmp.path().join("channel");
    std::fs::create_dir_all(&channel).unwrap();
    let dir = tmp.path().join("cl");

    let mut up = imgbuild()
        .args([
            "cluster",
            "up",
            "--nodes",
            "2",
            "--timeout",
            "300",
            "--memory",
            "256",
        ])
        .arg("--channel")
        .arg(&channel)
        .arg("--dir")
        .arg(&dir)
        .arg(&img)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // Both nodes run (QEMU started; no updater answers on a blank disk).
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = status_json(&dir) {
            if s["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .all(|n| n["up"] == true)
            {
                break s;
            }
        }
        assert!(Instant::now() < deadline, "cluster did not come up");
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(status["nodes"].as_array().unwrap().len(), 2);
    assert_eq!(status["supervisor_alive"], true);
    assert_eq!(status["lock"], "fleetlock");
    assert!(status["lock_holders"].as_array().unwrap().is_empty());
    for n in status["nodes"].as_array().unwrap() {
        assert_eq!(n["reachable"], false);
    }
    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("cluster.json")).unwrap()).unwrap();
    let pids: Vec<u64> = info["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["pid"].as_u64().unwrap())
        .collect();
    assert!(pids.iter().all(|p| alive(*p)));
    // Every service listens on loopback only.
    for url in [&info["channel_url"], &info["lock_url"]] {
        assert!(
            url.as_str().unwrap().starts_with("http://127.0.0.1:"),
            "{url}"
        );
    }

    let logs = imgbuild()
        .args(["cluster", "logs", "node-2", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(logs.status.success());
    assert!(String::from_utf8_lossy(&logs.stdout).contains("# imgqemu"));
    let bad = imgbuild()
        .args(["cluster", "logs", "node-9", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("node-1, node-2"));

    // A second cluster on the same directory is refused, and changes nothing.
    let again = imgbuild()
        .args(["cluster", "up", "--nodes", "1", "--dir"])
        .arg(&dir)
        .arg(&img)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists"));
    assert!(pids.iter().all(|p| alive(*p)));

    let down = imgbuild()
        .args(["cluster", "down", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    let exit = up.wait().unwrap();
    assert!(exit.success(), "cluster up exited {exit}");
    assert!(!dir.exists(), "cluster directory left behind");
    std::thread::sleep(Duration::from_millis(200));
    for p in pids {
        assert!(!alive(p), "QEMU {p} still runs");
    }
    let mut out = String::new();
    use std::io::Read;
    up.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    assert!(out.contains("stopping the cluster"), "{out}");
}
