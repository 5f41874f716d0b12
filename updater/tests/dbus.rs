//! The daemon on a private dbus-daemon that includes the shipped policy file: Status,
//! Update (with Progress signals), Rollback, typed error names, and a non-root caller
//! refused by the policy.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use imgformat::layout::Slot;
use imgupdate::dbus;

/// Kills the child it holds when dropped (only that child, by its pid).
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn private_bus(dir: &std::path::Path) -> (Reap, String) {
    let policy =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("dist/org.imgbuild.Update1.conf");
    let conf = dir.join("bus.conf");
    std::fs::write(
        &conf,
        format!(
            "<!DOCTYPE busconfig PUBLIC \"-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN\" \
             \"http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd\">\n<busconfig>\n\
             <type>session</type>\n<listen>unix:dir={}</listen>\n<auth>EXTERNAL</auth>\n\
             <policy context=\"default\">\n<allow user=\"*\"/>\n\
             <allow send_destination=\"*\" eavesdrop=\"true\"/>\n<allow eavesdrop=\"true\"/>\n\
             <allow own=\"*\"/>\n</policy>\n<include>{}</include>\n</busconfig>\n",
            dir.display(),
            policy.display()
        ),
    )
    .unwrap();
    // Others (the non-root check) must reach the socket.
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut child = Command::new("dbus-daemon")
        .arg(format!("--config-file={}", conf.display()))
        .args(["--nofork", "--print-address=1"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (Reap(child), line.trim().to_string())
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn status(addr: &str) -> serde_json::Value {
    serde_json::from_str(&dbus::call(Some(addr), "Status").unwrap()).unwrap()
}

#[test]
fn daemon_serves_status_update_rollback_over_dbus() {
    let node = Node::new("reboot");
    let busdir = tempfile::tempdir().unwrap();
    let (_bus, addr) = private_bus(busdir.path());
    let _daemon = Reap(
        Command::new(env!("CARGO_BIN_EXE_imgupdate"))
            .arg("--config")
            .arg(&node.config_path)
            .args(["--bus", &addr, "daemon", "--no-timer"])
            .env("IMGUPDATE_LOG", "warn")
            .spawn()
            .unwrap(),
    );
    wait_for("the daemon", Duration::from_secs(30), || {
        dbus::call(Some(&addr), "Status").is_ok()
    });
    let s = status(&addr);
    assert_eq!(s["daemon"], true);
    assert_eq!(s["running"]["version"], OLD);
    assert_eq!(s["state"]["state"], "idle");

    // `imgupdate status` talks to the daemon.
    let out = Command::new(env!("CARGO_BIN_EXE_imgupdate"))
        .arg("--config")
        .arg(&node.config_path)
        .args(["--bus", &addr, "--json", "status"])
        .output()
        .unwrap();
    let cli: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(cli["daemon"], true);

    // Collect Progress signals.
    let signals = Arc::new(Mutex::new(Vec::<(String, u64, u64)>::new()));
    {
        let signals = signals.clone();
        let conn = zbus::blocking::connection::Builder::address(addr.as_str())
            .unwrap()
            .build()
            .unwrap();
        let rule = zbus::MatchRule::builder()
            .msg_type(zbus::message::Type::Signal)
            .interface(dbus::INTERFACE)
            .unwrap()
            .member("Progress")
            .unwrap()
            .build();
        let iter = zbus::blocking::MessageIterator::for_match_rule(rule, &conn, None).unwrap();
        std::thread::spawn(move || {
            let _conn = conn;
            for m in iter.flatten() {
                if let Ok(body) = m.body().deserialize::<(String, u64, u64)>() {
                    signals.lock().unwrap().push(body);
                }
            }
        });
    }

    assert_eq!(
        dbus::call(Some(&addr), "Update").unwrap(),
        "{\"started\":true}"
    );
    wait_for("staged", Duration::from_secs(120), || {
        status(&addr)["state"]["state"] == "staged"
    });
    let s = status(&addr);
    assert_eq!(s["state"]["version"], NEW);
    assert_eq!(s["state"]["slot"], "b");
    assert!(node.bootable(Slot::B));
    wait_for("the final signal", Duration::from_secs(10), || {
        signals
            .lock()
            .unwrap()
            .iter()
            .any(|(s, _, _)| s == "staged")
    });
    let sig = signals.lock().unwrap().clone();
    assert!(
        sig.iter()
            .any(|(s, done, total)| s == "downloading" && *done == *total && *total > 0),
        "{sig:?}"
    );

    // Rollback drops the staged update; a second one is illegal in idle, with a typed name.
    let state: serde_json::Value =
        serde_json::from_str(&dbus::call(Some(&addr), "Rollback").unwrap()).unwrap();
    assert_eq!(state["state"], "idle");
    assert!(!node.bootable(Slot::B));
    match dbus::call(Some(&addr), "Rollback") {
        Err(zbus::Error::MethodError(name, msg, _)) => {
            assert_eq!(
                name.as_str(),
                "org.imgbuild.Update1.Error.IllegalTransition"
            );
            assert!(msg
                .unwrap_or_default()
                .contains("rollback_requested is not allowed in state idle"));
        }
        other => panic!("expected IllegalTransition, got {other:?}"),
    }

    // The policy: a non-root caller is refused.
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "dbus-send",
        ])
        .arg(format!("--bus={addr}"))
        .args([
            "--print-reply",
            "--dest=org.imgbuild.Update1",
            "/org/imgbuild/Update1",
            "org.imgbuild.Update1.Status",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("AccessDenied"), "{err}");
}
