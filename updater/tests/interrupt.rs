//! kill -9 at many points of an update, then run again: the result is always either the
//! old state untouched or a completed, verified slot; never a bootable unverified slot.
//!
//! The crash is a real process abort (`IMGUPDATE_FAILPOINT=<point>:<n>` makes the n-th
//! pass through a named point call `abort()`: no destructors, no flushing), in a child
//! process running the real `imgupdate` binary.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::*;
use imgformat::layout::Slot;
use imgupdate::State;

fn run(node: &Node, failpoint: Option<&str>) -> std::process::Output {
    run_with(node, failpoint, "full")
}

fn run_with(node: &Node, failpoint: Option<&str>, method: &str) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_imgupdate"));
    cmd.arg("--config")
        .arg(&node.config_path)
        .args(["--json", "update", "--method", method])
        .env("IMGUPDATE_LOG", "warn")
        .env_remove("IMGUPDATE_FAILPOINT");
    if let Some(fp) = failpoint {
        cmd.env("IMGUPDATE_FAILPOINT", fp);
    }
    cmd.output().unwrap()
}

#[test]
fn killed_at_any_point_then_rerun_ends_verified() {
    let b = base();
    let new_len = std::fs::metadata(&b.new_img).unwrap().len();
    let new_sha = sha256_file(&b.new_img);
    let mut points: Vec<String> = Vec::new();
    // IMGUPDATE_INTERRUPT_BENCH=1: every download write up to 400 (a few minutes more).
    let fetch_points = if std::env::var_os("IMGUPDATE_INTERRUPT_BENCH").is_some() {
        400
    } else {
        30
    };
    points.extend((1..=fetch_points).map(|k| format!("fetch.write:{k}")));
    points.extend((1..=16).map(|k| format!("slot.write:{k}")));
    points.extend((1..=8).map(|k| format!("state.rename:{k}")));
    points.extend(
        [
            "install.invalidated:1",
            "install.verified:1",
            "stage.entry:1",
        ]
        .map(String::from),
    );
    let mut aborted = 0;
    let mut resumed = 0;
    for point in &points {
        let node = Node::new("reboot");
        let active = node.partition_hash(Slot::A);
        let out = run(&node, Some(point));
        let killed = !out.status.success() && out.status.code().is_none();
        if killed {
            aborted += 1;
        } else {
            assert!(
                out.status.success(),
                "{point}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // Never a bootable slot that is not exactly 1.1.
        if node.bootable(Slot::B) {
            assert_eq!(
                node.slot_hash(Slot::B, new_len),
                new_sha,
                "{point}: bootable but unverified"
            );
        }
        assert_eq!(
            node.partition_hash(Slot::A),
            active,
            "{point}: slot a changed"
        );
        // Killed while writing the slot: `status` (no daemon) shows how far it got.
        if killed && point.starts_with("slot.write:") && point != "slot.write:1" {
            let out = Command::new(env!("CARGO_BIN_EXE_imgupdate"))
                .arg("--config")
                .arg(&node.config_path)
                .args(["--bus", "unix:path=/nonexistent/bus", "--json", "status"])
                .output()
                .unwrap();
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(v["state"]["state"], "downloading", "{point}: {v}");
            assert_eq!(v["progress"][1].as_u64(), Some(new_len), "{point}: {v}");
            assert!(v["progress"][0].as_u64().unwrap() > 0, "{point}: {v}");
        }
        // The rerun finishes.
        let out = run(&node, None);
        assert!(
            out.status.success(),
            "{point}: rerun: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(node.slot_hash(Slot::B, new_len), new_sha, "{point}");
        assert!(node.bootable(Slot::B), "{point}");
        assert_eq!(
            node.state().state,
            State::Staged {
                version: NEW.into(),
                slot: Slot::B
            }
        );
        assert_eq!(
            node.partition_hash(Slot::A),
            active,
            "{point}: slot a changed"
        );
        // Killed after the first journal sync (1 MiB): the rerun fetches less than all.
        let fetched = report["bytes_fetched"].as_u64().unwrap();
        let total = node.server.sent.load(std::sync::atomic::Ordering::SeqCst);
        if killed && fetched < total - fetched {
            resumed += 1;
        }
    }
    assert!(
        aborted >= 50,
        "only {aborted} of {} points were reached",
        points.len()
    );
    assert!(resumed >= 5, "only {resumed} reruns resumed a download");
}

/// The delta and chunk writers under the same crashes (fewer points: same download code).
#[test]
fn killed_delta_and_chunk_writes_rerun_to_a_verified_slot() {
    let b = base();
    let new_len = std::fs::metadata(&b.new_img).unwrap().len();
    let new_sha = sha256_file(&b.new_img);
    let mut aborted = 0;
    for method in ["delta", "chunks"] {
        for point in [
            "fetch.write:1",
            "slot.write:1",
            "slot.write:5",
            "slot.write:12",
            "install.verified:1",
            "stage.entry:1",
        ] {
            let node = Node::new("reboot");
            let active = node.partition_hash(Slot::A);
            let out = run_with(&node, Some(point), method);
            if out.status.code().is_none() {
                aborted += 1;
            }
            if node.bootable(Slot::B) {
                assert_eq!(
                    node.slot_hash(Slot::B, new_len),
                    new_sha,
                    "{method} {point}"
                );
            }
            let out = run_with(&node, None, method);
            assert!(
                out.status.success(),
                "{method} {point}: {}",
                String::from_utf8_lossy(&out.stdout)
            );
            assert_eq!(
                node.slot_hash(Slot::B, new_len),
                new_sha,
                "{method} {point}"
            );
            assert!(node.bootable(Slot::B), "{method} {point}");
            assert_eq!(node.partition_hash(Slot::A), active, "{method} {point}");
        }
    }
    assert!(aborted >= 10, "only {aborted} crashes happened");
}
