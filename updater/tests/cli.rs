//! The `imgupdate` binary without a daemon: check, update, status, history, rollback with
//! `--json`, and exit codes that scripts can branch on.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::*;

fn imgupdate(node: &Node, args: &[&str]) -> (i32, serde_json::Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_imgupdate"))
        .arg("--config")
        .arg(&node.config_path)
        // No daemon on this (nonexistent) bus: status reads the state file.
        .args(["--bus", "unix:path=/nonexistent/bus", "--json"])
        .args(args)
        .env("IMGUPDATE_LOG", "error")
        .output()
        .unwrap();
    let v = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", String::from_utf8_lossy(&out.stdout)));
    (out.status.code().unwrap(), v)
}

#[test]
fn cli_check_update_status_history_rollback() {
    let node = Node::new("reboot");
    let (code, v) = imgupdate(&node, &["check"]);
    assert_eq!(code, 0);
    assert_eq!(v, serde_json::json!({"result": "update", "version": NEW}));

    let (code, v) = imgupdate(&node, &["update"]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["method"], "delta");
    assert_eq!(
        v["state"],
        serde_json::json!({"state": "staged", "version": NEW, "slot": "b"})
    );

    let (code, v) = imgupdate(&node, &["status"]);
    assert_eq!(code, 0);
    assert_eq!(v["daemon"], false);
    assert_eq!(v["running"]["version"], OLD);
    assert_eq!(v["state"]["state"], "staged");
    assert!(v["last_check"].is_string());

    let (code, v) = imgupdate(&node, &["history"]);
    assert_eq!(code, 0);
    let events: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"]["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        events,
        ["check_started", "update_found", "written", "staged"]
    );

    let (code, v) = imgupdate(&node, &["rollback"]);
    assert_eq!(code, 0);
    assert_eq!(v["state"], "idle");
    // Nothing to roll back now: exit code 3 (illegal in this state) and a JSON error.
    let (code, v) = imgupdate(&node, &["rollback"]);
    assert_eq!(code, 3);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("not allowed in state idle"),
        "{v}"
    );
}

#[test]
fn cli_reports_config_errors_with_field_and_line() {
    let node = Node::new("reboot");
    let mut text = std::fs::read_to_string(&node.config_path).unwrap();
    text.push_str("strategy_typo = \"kexec\"\n");
    std::fs::write(&node.config_path, text).unwrap();
    let (code, v) = imgupdate(&node, &["status"]);
    assert_eq!(code, 1);
    let err = v["error"].as_str().unwrap();
    assert!(
        err.contains("strategy_typo") && err.contains("line 8"),
        "{err}"
    );
}

#[test]
fn completions_and_man_page_need_no_config() {
    for args in [&["completions", "bash"][..], &["man"][..]] {
        let out = Command::new(env!("CARGO_BIN_EXE_imgupdate"))
            .args(["--config", "/nonexistent.toml"])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.contains("rollback"), "{args:?}: {text}");
    }
}
