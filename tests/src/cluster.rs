//! The cluster tier's shared parts: node images with imgupdate inside (1.0.0, 1.0.1,
//! and a bad 1.0.2 whose canary unit fails), a TUF channel with 1.0.0 published,
//! copied per scenario so tests do not depend on each other's order, and the polling
//! loop with its per-node timeline. Used by `tests/vm_cluster.rs` and
//! `benches/cluster.rs`.

#![allow(clippy::unwrap_used)] // test plumbing: a failure here is a failed test

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use imgbuild::cluster::{Cluster, NodeStatus};
use imgbuild::progress::Progress;
use imgcoord::fleetlock_server::EventKind;

use crate::{build_recipe_with, e2e_dir, workspace_root};

pub const V1: &str = "1.0.0";
pub const V2: &str = "1.0.1";
/// The bad release: `canary.service` exits 1, so the system-state check fails.
pub const V3: &str = "1.0.2";

/// Images and the 1.0.0 channel, made once per process.
#[derive(Debug)]
pub struct Fixture {
    pub work: PathBuf,
    pub key: PathBuf,
    /// The channel with 1.0.0 published; never changed after the fixture is made.
    channel: PathBuf,
}

/// Builds the `imgupdate` program (the test binary's package does not) and returns it.
pub fn cargo_build_imgupdate() -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let st = Command::new(cargo)
        .args(["build", "-p", "imgupdate", "--bin", "imgupdate"])
        .current_dir(workspace_root())
        .status()
        .unwrap();
    assert!(st.success(), "building imgupdate failed");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let bin = target.join("debug/imgupdate");
    assert!(bin.is_file(), "{} missing", bin.display());
    bin
}

/// The node recipe of `version`; 1.0.2 carries a unit that fails.
pub fn recipe(version: &str) -> String {
    let bad = version == V3;
    let mut text = format!(
        r#"include = "base.toml"

[image]
name = "node"
version = "{version}"
pretty_name = "imgbuild cluster node {version}"

[[files]]
path = "/etc/systemd/network/80-dhcp.network"
content = "[Match]\nName=en*\n\n[Network]\nDHCP=ipv4\n"

# The updater's log on the serial console too, so a CI failure can be read there.
[[files]]
path = "/etc/systemd/system/imgupdate.service.d/console.conf"
content = "[Service]\nStandardError=journal+console\n"

[[files]]
path = "/etc/systemd/system/imgupdate-health.service.d/console.conf"
content = "[Service]\nStandardError=journal+console\n"
"#
    );
    if bad {
        text.push_str(
            r#"
[[files]]
path = "/etc/systemd/system/canary.service"
content = "[Unit]\nDescription=Release canary (fails in 1.0.2)\n\n[Service]\nType=oneshot\nExecStart=/bin/false\n\n[Install]\nWantedBy=multi-user.target\n"
"#,
        );
    }
    text.push_str(&format!(
        r#"
[output]
formats = ["qcow2"]

[systemd]
enable = ["systemd-networkd.service"{}]

[update]
channel_url = "http://10.0.2.2:9/"
trusted_root = "root.json"
smbios_overrides = true
check_interval_secs = 10
strategy = "kexec"

[update.metrics]
listen = "0.0.0.0:9548"

[update.lock]
backend = "fleetlock"
url = "http://10.0.2.2:9"

[update.health]
deadline = "90s"
interval = "3s"
checks = [{{ kind = "system-state" }}]
"#,
        if bad { r#", "canary.service""# } else { "" }
    ));
    text
}

pub fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let bin = cargo_build_imgupdate();
        std::env::set_var(imgbuild::agent::IMGUPDATE_ENV, &bin);
        let work = e2e_dir("cluster");
        let key = work.join("keys/channel.key");
        let channel = work.join("channel");
        // Images of an earlier run are reused when their inputs are the same: the
        // recipes, the base recipe and the imgupdate program (a stamp of their hashes).
        let stamp = inputs_stamp(&bin);
        let stamp_file = work.join("inputs.sha256");
        if fs::read_to_string(&stamp_file).ok().as_deref() == Some(stamp.as_str()) {
            eprintln!("reusing the node images and channel in {}", work.display());
            return Fixture { work, key, channel };
        }
        let _ = fs::remove_dir_all(&work);
        fs::create_dir_all(&work).unwrap();
        let created = Channel::create(&work, "nightly");
        assert_eq!((&created.dir, &created.key), (&channel, &key));
        let recipes = work.join("recipes");
        fs::create_dir_all(&recipes).unwrap();
        fs::copy(
            workspace_root().join("recipes/minimal.toml"),
            recipes.join("base.toml"),
        )
        .unwrap();
        fs::copy(
            channel.join("metadata/1.root.json"),
            recipes.join("root.json"),
        )
        .unwrap();
        for v in [V1, V2, V3] {
            let path = recipes.join(format!("node-{v}.toml"));
            fs::write(&path, recipe(v)).unwrap();
            let started = Instant::now();
            build_recipe_with(&path, &work.join(format!("out-{v}")), &Progress::new(true)).unwrap();
            eprintln!("built node {v} in {:.0}s", started.elapsed().as_secs_f64());
            // Nodes boot the qcow2 and publishing reads the root image: with `formats =
            // ["qcow2"]` the 2.4 GB raw disk is not kept.
            let out = work.join(format!("out-{v}"));
            assert!(out.join(format!("node-{v}.qcow2")).is_file());
            assert!(!out.join(format!("node-{v}.raw")).exists());
        }
        created.publish(V1);
        fs::write(&stamp_file, &stamp).unwrap();
        Fixture { work, key, channel }
    })
}

/// Runs an imgbuild verb through the same argument parser and library calls as the
/// `imgbuild` program.
fn run_imgbuild(args: &[&str]) {
    use clap::Parser;
    use imgbuild::cli::{ChannelCommand, Cli, Command as Verb};
    let cli = Cli::try_parse_from(std::iter::once("imgbuild").chain(args.iter().copied()))
        .unwrap_or_else(|e| panic!("imgbuild {args:?}: {e}"));
    let result = match cli.command {
        Verb::Channel(ChannelCommand::Init(a)) => imgchannel::cli::run_channel_init(&a),
        Verb::Publish(a) => imgbuild::publish::publish(&a, &Progress::new(true)),
        other => panic!("not wired in this test: {other:?}"),
    };
    if let Err(e) = result {
        panic!("imgbuild {args:?}: {e:#}");
    }
}

impl Fixture {
    /// The qcow2 image of `version`.
    pub fn image(&self, version: &str) -> PathBuf {
        self.work
            .join(format!("out-{version}/node-{version}.qcow2"))
    }

    /// A new channel `NAME` holding what the fixture's channel holds (1.0.0).
    pub fn channel_copy(&self, name: &str) -> Channel {
        let dir = scratch(name);
        copy_tree(&self.channel, &dir);
        Channel {
            dir,
            work: self.work.clone(),
            key: self.key.clone(),
        }
    }
}

/// Per-node moments, printed as a table.
#[derive(Debug, Default)]
pub struct Timeline {
    pub start: Option<Instant>,
    rows: BTreeMap<String, Vec<(f64, String)>>,
    last: BTreeMap<String, String>,
}

impl Timeline {
    pub fn note(&mut self, node: &str, what: &str) {
        let t = self
            .start
            .get_or_insert_with(Instant::now)
            .elapsed()
            .as_secs_f64();
        eprintln!("[{t:>6.1}s] {node}: {what}");
        self.rows
            .entry(node.into())
            .or_default()
            .push((t, what.into()));
    }

    /// Records a node's status when it changed.
    pub fn observe(&mut self, st: &NodeStatus) {
        let line = format!(
            "{} {} {}{}",
            if st.reachable { "up" } else { "unreachable" },
            st.running_version.as_deref().unwrap_or("-"),
            st.state.as_deref().unwrap_or("-"),
            st.staged_version
                .as_deref()
                .map(|v| format!(" staged={v}"))
                .unwrap_or_default()
        );
        if self.last.get(&st.name) != Some(&line) {
            self.note(&st.name, &line);
            self.last.insert(st.name.clone(), line);
        }
    }

    pub fn print(&self) {
        eprintln!("--- timeline ---");
        for (node, rows) in &self.rows {
            for (t, what) in rows {
                eprintln!("{node:<8} {t:>7.1}s  {what}");
            }
        }
    }
}

/// Polls until `done` holds for the statuses, recording lock events too; panics with
/// the timeline and serial tails after `secs`.
pub fn wait_until(
    cluster: &Cluster,
    tl: &mut Timeline,
    secs: u64,
    what: &str,
    mut done: impl FnMut(&[NodeStatus]) -> bool,
) -> Vec<NodeStatus> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut seen_events = 0;
    loop {
        let history = cluster.lock_history();
        for e in history.iter().skip(seen_events) {
            if !matches!(e.kind, EventKind::Refused | EventKind::Renewed) {
                tl.note(&e.id, &format!("lock {:?}", e.kind));
            }
        }
        seen_events = history.len();
        let st = cluster.status();
        for s in &st {
            tl.observe(s);
        }
        if done(&st) {
            return st;
        }
        if Instant::now() > deadline {
            tl.print();
            for (i, s) in st.iter().enumerate() {
                eprintln!(
                    "--- {} serial tail ---\n{}",
                    s.name,
                    tail(&cluster.serial_history(i), 40)
                );
            }
            panic!(
                "timed out after {secs}s waiting for: {what} (logs in {})",
                cluster.dir().display()
            );
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

pub fn on(st: &NodeStatus, version: &str) -> bool {
    st.reachable
        && st.running_version.as_deref() == Some(version)
        && matches!(st.state.as_deref(), Some("idle" | "committed"))
}

/// How many times the firmware started a boot loader, and how many kernels started.
pub fn boots(serial: &str) -> (usize, usize) {
    (
        serial.matches("BdsDxe: starting").count(),
        serial.matches("Linux version").count(),
    )
}

/// sha256 over what the node images are made of (besides Debian's packages).
fn inputs_stamp(imgupdate: &Path) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for v in [V1, V2, V3] {
        h.update(recipe(v).as_bytes());
    }
    h.update(fs::read(workspace_root().join("recipes/minimal.toml")).unwrap());
    h.update(fs::read(imgupdate).unwrap());
    format!("{:x}", h.finalize())
}

/// A channel of this run: a copy of the fixture's channel with 1.0.0 published.
#[derive(Debug)]
pub struct Channel {
    pub dir: PathBuf,
    /// The fixture's work directory (holds `out-VERSION/`).
    work: PathBuf,
    key: PathBuf,
}

impl Channel {
    /// A new channel `WORK/channel` named `name`, signed by a new key
    /// `WORK/keys/channel.key`; versions are published from `WORK/out-VERSION`.
    pub fn create(work: &Path, name: &str) -> Channel {
        let key = work.join("keys/channel.key");
        fs::create_dir_all(key.parent().unwrap()).unwrap();
        imgchannel::generate(&key).unwrap();
        let dir = work.join("channel");
        run_imgbuild(&[
            "channel",
            "init",
            "--channel",
            name,
            "--dir",
            dir.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
        ]);
        Channel {
            dir,
            work: work.to_path_buf(),
            key,
        }
    }

    /// Publishes `version` (built by the fixture) into this channel.
    pub fn publish(&self, version: &str) {
        let started = Instant::now();
        run_imgbuild(&[
            "publish",
            self.work.join(format!("out-{version}")).to_str().unwrap(),
            "--channel",
            self.dir.to_str().unwrap(),
            "--key",
            self.key.to_str().unwrap(),
            "--zstd-level",
            "3",
        ]);
        eprintln!(
            "published {version} in {:.0}s",
            started.elapsed().as_secs_f64()
        );
    }
}

/// A fresh directory `NAME` under the fixture's work directory.
pub fn scratch(name: &str) -> PathBuf {
    let d = fixture().work.join(name);
    let _ = fs::remove_dir_all(&d);
    d
}

fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &dest);
        } else {
            fs::copy(e.path(), &dest).unwrap();
        }
    }
}
