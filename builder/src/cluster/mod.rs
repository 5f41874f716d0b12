//! Test clusters: N QEMU nodes booted from one image, a channel served over HTTP and a
//! reboot-lock service, all on 127.0.0.1 (guests reach the host as 10.0.2.2 through
//! QEMU's user-mode network; nothing listens beyond loopback).
//!
//! Each node gets a qcow2 overlay on the image, its own OVMF variable store (kept
//! across restarts, so a node restarted after a power cut keeps its boot entries), and
//! its identity and the services' URLs as SMBIOS OEM strings, which imgupdate takes
//! with `smbios_overrides = true` ([`imgupdate::smbios`]). The node's metrics port
//! (9548) is forwarded to a free host port: `status` reads the updater's state there.
//!
//! This module owns starting, observing, restarting and tearing down one cluster; the
//! command line (`imgbuild cluster ...`) is in [`cli`]. Everything it makes lives in
//! the cluster directory, which [`Cluster::down`] removes.

pub mod cli;
pub mod status;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use imgchannel::serve::StaticServer;
use imgcoord::fleetlock_server::{Event, FleetLockServer, ServerConfig};
use imgqemu::{Accel, PortForward, UserNet, Vm, VmConfig};
use serde::{Deserialize, Serialize};

pub use status::NodeStatus;

/// The guest port imgupdate serves metrics on (`[update.metrics] listen`).
pub const GUEST_METRICS_PORT: u16 = 9548;
/// How guests see the host's loopback under QEMU user-mode networking.
pub const HOST_FROM_GUEST: &str = "10.0.2.2";
/// The cluster description file in the cluster directory.
pub const STATE_FILE: &str = "cluster.json";

/// Which reboot-lock service the host runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LockKind {
    /// A FleetLock server (imgcoord's, with history).
    Fleetlock,
    /// Debian's etcd (the image's `[update.lock]` must say `backend = "etcd"`).
    Etcd,
    /// No lock service.
    None,
}

/// What to start.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// Cluster name (directory and VM names).
    pub name: String,
    /// The image every node boots (raw or qcow2); never written.
    pub image: PathBuf,
    pub nodes: usize,
    /// Everything the cluster makes goes here; it must not exist.
    pub dir: PathBuf,
    /// Channel directory to serve; `None`: no channel server.
    pub channel: Option<PathBuf>,
    pub lock: LockKind,
    /// Nodes allowed to reboot at once (FleetLock server setting).
    pub lock_slots: usize,
    pub memory_mib: u32,
    /// Virtual disk size of each node (the `var` partition grows into it); never less
    /// than the image's own size.
    pub disk_size: u64,
    pub accel: Accel,
    /// Extra SMBIOS OEM strings for every node.
    pub oem_strings: Vec<String>,
}

impl ClusterSpec {
    pub fn new(name: &str, image: &Path, nodes: usize, dir: &Path) -> ClusterSpec {
        ClusterSpec {
            name: name.into(),
            image: image.into(),
            nodes,
            dir: dir.into(),
            channel: None,
            lock: LockKind::Fleetlock,
            lock_slots: 1,
            memory_mib: 1024,
            disk_size: 4 << 30,
            accel: Accel::Auto,
            oem_strings: vec![],
        }
    }
}

/// One node as recorded in `cluster.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    /// QEMU's pid (0 while stopped).
    pub pid: u32,
    /// Host address forwarded to the guest's metrics port.
    pub metrics: SocketAddr,
    pub overlay: PathBuf,
    pub vars: PathBuf,
    /// Serial log of the current QEMU process; earlier ones are kept beside it.
    pub serial_log: PathBuf,
    /// How many times the node was started (1 = never restarted).
    pub starts: u32,
}

/// `cluster.json`: what `status`, `logs` and `down` read.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClusterInfo {
    pub name: String,
    /// The `cluster up` process that owns everything.
    pub supervisor_pid: u32,
    pub image: PathBuf,
    pub channel_url: Option<String>,
    pub lock: LockKind,
    pub lock_url: Option<String>,
    pub nodes: Vec<NodeInfo>,
}

impl ClusterInfo {
    pub fn load(dir: &Path) -> Result<ClusterInfo> {
        let path = dir.join(STATE_FILE);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {} (is the cluster up?)", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    fn save(&self, dir: &Path) -> Result<()> {
        let path = dir.join(STATE_FILE);
        let tmp = dir.join(format!(".{STATE_FILE}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
    }

    pub fn node(&self, name: &str) -> Result<&NodeInfo> {
        self.nodes.iter().find(|n| n.name == name).with_context(|| {
            format!(
                "no node {name:?} in cluster {:?} (nodes: {})",
                self.name,
                self.nodes
                    .iter()
                    .map(|n| n.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
    }
}

enum LockService {
    Fleetlock(FleetLockServer),
    /// Kept for its lifetime: dropping it stops etcd.
    Etcd {
        _server: imgkubetest::Etcd,
    },
    None,
}

/// A running cluster. Dropping it stops everything but keeps the directory; call
/// [`Cluster::down`] to remove it too.
pub struct Cluster {
    pub spec: ClusterSpec,
    info: ClusterInfo,
    vms: Vec<Option<Vm>>,
    channel: Option<StaticServer>,
    lock: LockService,
    runtime: tokio::runtime::Runtime,
    ovmf: imgqemu::Ovmf,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("info", &self.info).finish()
    }
}

/// A free TCP port on 127.0.0.1 (closed again before QEMU binds it).
fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

/// The virtual size of a disk image (`qemu-img info`).
pub fn image_virtual_size(image: &Path) -> Result<u64> {
    let out = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(image)
        .output()
        .context("running qemu-img info")?;
    if !out.status.success() {
        bail!(
            "qemu-img info {}: {}",
            image.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("parsing qemu-img info of {}", image.display()))?;
    v["virtual-size"]
        .as_u64()
        .with_context(|| format!("qemu-img info of {} has no virtual-size", image.display()))
}

/// The guest's view of a host URL `http://127.0.0.1:PORT`.
pub fn guest_url(host_url: &str) -> String {
    host_url.replacen("127.0.0.1", HOST_FROM_GUEST, 1)
}

/// The SMBIOS strings that make node `name` distinct.
pub fn node_oem_strings(
    name: &str,
    channel_url: Option<&str>,
    lock_url: Option<&str>,
) -> Vec<String> {
    let p = imgupdate::smbios::PREFIX;
    let mut out = vec![format!("{p}node_id={name}")];
    if let Some(u) = channel_url {
        out.push(format!("{p}channel_url={}/", guest_url(u)));
    }
    if let Some(u) = lock_url {
        out.push(format!("{p}lock_url={}", guest_url(u)));
    }
    out
}

impl Cluster {
    /// Starts the services and every node; returns once all QEMU processes run (see
    /// [`Cluster::wait_ready`] for the guests).
    pub fn up(spec: ClusterSpec) -> Result<Cluster> {
        if spec.nodes == 0 {
            bail!("a cluster needs at least one node");
        }
        if spec.dir.exists() {
            bail!(
                "{} exists: another cluster runs there, or one was not taken down (`imgbuild cluster down`)",
                spec.dir.display()
            );
        }
        let image = spec
            .image
            .canonicalize()
            .with_context(|| format!("image {}", spec.image.display()))?;
        let format = imgqemu::detect_format(&image)?;
        // An overlay smaller than its backing image would cut the disk off silently.
        let virtual_size = image_virtual_size(&image)?;
        let disk_size = spec.disk_size.max(virtual_size);
        let ovmf = imgqemu::firmware().context("finding OVMF")?;
        std::fs::create_dir_all(&spec.dir)
            .with_context(|| format!("creating {}", spec.dir.display()))?;
        let dir = spec.dir.canonicalize()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .context("starting the async runtime")?;

        let channel = match &spec.channel {
            Some(c) => Some(
                StaticServer::start(c, "127.0.0.1:0".parse()?)
                    .with_context(|| format!("serving {}", c.display()))?,
            ),
            None => None,
        };
        let (lock, lock_url) = match spec.lock {
            LockKind::Fleetlock => {
                let server = runtime.block_on(FleetLockServer::start(
                    "127.0.0.1:0".parse()?,
                    ServerConfig {
                        slots: spec.lock_slots,
                        ..ServerConfig::default()
                    },
                ))?;
                let url = server.url();
                (LockService::Fleetlock(server), Some(url))
            }
            LockKind::Etcd => {
                let etcd = runtime
                    .block_on(imgkubetest::Etcd::start())
                    .context("starting etcd")?;
                let url = etcd.url.clone();
                (LockService::Etcd { _server: etcd }, Some(url))
            }
            LockKind::None => (LockService::None, None),
        };
        let channel_url = channel.as_ref().map(StaticServer::url);

        let mut nodes = Vec::new();
        for i in 1..=spec.nodes {
            let name = format!("node-{i}");
            let overlay = dir.join(format!("{name}.qcow2"));
            let out = Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", format.as_str(), "-b"])
                .arg(&image)
                .arg(&overlay)
                .arg(disk_size.to_string())
                .output()
                .context("running qemu-img")?;
            if !out.status.success() {
                bail!(
                    "qemu-img create {}: {}",
                    overlay.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            nodes.push(NodeInfo {
                metrics: SocketAddr::from(([127, 0, 0, 1], free_port()?)),
                vars: dir.join(format!("{name}.vars.fd")),
                serial_log: dir.join(format!("{name}.serial.log")),
                overlay,
                name,
                pid: 0,
                starts: 0,
            });
        }
        let info = ClusterInfo {
            name: spec.name.clone(),
            supervisor_pid: std::process::id(),
            image,
            channel_url,
            lock: spec.lock,
            lock_url,
            nodes,
        };
        let mut cluster = Cluster {
            vms: (0..spec.nodes).map(|_| None).collect(),
            spec,
            info,
            channel,
            lock,
            runtime,
            ovmf,
        };
        cluster.info.save(&dir)?;
        for i in 0..cluster.spec.nodes {
            cluster.start_node(i)?;
        }
        Ok(cluster)
    }

    fn vm_config(&self, i: usize) -> VmConfig {
        let n = &self.info.nodes[i];
        let mut cfg = VmConfig::uefi(
            &format!("{}-{}", self.spec.name, n.name),
            self.ovmf.clone(),
            &n.overlay,
        );
        cfg.snapshot = false;
        cfg.disk_format = Some(imgqemu::DiskFormat::Qcow2);
        cfg.memory_mib = self.spec.memory_mib;
        cfg.cpus = 1;
        cfg.accel = self.spec.accel;
        cfg.network = Some(UserNet {
            forwards: vec![PortForward {
                host: n.metrics.port(),
                guest: GUEST_METRICS_PORT,
            }],
        });
        cfg.serial_log = Some(n.serial_log.clone());
        cfg.vars_file = Some(n.vars.clone());
        cfg.work_parent = Some(self.spec.dir.clone());
        cfg.oem_strings = node_oem_strings(
            &n.name,
            self.info.channel_url.as_deref(),
            self.info.lock_url.as_deref(),
        );
        cfg.oem_strings
            .extend(self.spec.oem_strings.iter().cloned());
        cfg
    }

    /// Starts node `i`'s QEMU (again). A restarted node's earlier serial log is kept as
    /// `NAME.serial.N.log`.
    pub fn start_node(&mut self, i: usize) -> Result<()> {
        if self.vms[i].is_some() {
            bail!("{} is running", self.info.nodes[i].name);
        }
        let n = &self.info.nodes[i];
        if n.starts > 0 && n.serial_log.exists() {
            let kept = self
                .spec
                .dir
                .join(format!("{}.serial.{}.log", n.name, n.starts));
            std::fs::rename(&n.serial_log, &kept)
                .with_context(|| format!("keeping {}", n.serial_log.display()))?;
        }
        let vm = Vm::start(&self.vm_config(i))
            .with_context(|| format!("starting {}", self.info.nodes[i].name))?;
        let n = &mut self.info.nodes[i];
        n.pid = vm.pid();
        n.starts += 1;
        self.vms[i] = Some(vm);
        self.info.save(&self.spec.dir)
    }

    /// Cuts node `i`'s power: QEMU is killed without warning.
    pub fn kill_node(&mut self, i: usize) -> Result<()> {
        if let Some(vm) = self.vms[i].take() {
            vm.kill()?;
        }
        self.info.nodes[i].pid = 0;
        self.info.save(&self.spec.dir)
    }

    pub fn info(&self) -> &ClusterInfo {
        &self.info
    }

    pub fn dir(&self) -> &Path {
        &self.spec.dir
    }

    /// The running VM of node `i`.
    pub fn vm(&self, i: usize) -> Option<&Vm> {
        self.vms[i].as_ref()
    }

    /// The serial console of node `i` over all its starts, oldest first.
    pub fn serial_history(&self, i: usize) -> String {
        let n = &self.info.nodes[i];
        let mut out = String::new();
        for k in 1..n.starts {
            let p = self.spec.dir.join(format!("{}.serial.{k}.log", n.name));
            out.push_str(&std::fs::read_to_string(p).unwrap_or_default());
        }
        if let Some(vm) = &self.vms[i] {
            out.push_str(&vm.serial_log());
        }
        out
    }

    /// The channel server (bytes served, request log).
    pub fn channel(&self) -> Option<&StaticServer> {
        self.channel.as_ref()
    }

    /// FleetLock history (empty for other lock services).
    pub fn lock_history(&self) -> Vec<Event> {
        match &self.lock {
            LockService::Fleetlock(s) => s.history(),
            _ => vec![],
        }
    }

    /// Failed releases recorded with the lock service.
    pub fn failed_releases(&self) -> Vec<String> {
        let Some(url) = &self.info.lock_url else {
            return vec![];
        };
        if !matches!(self.lock, LockService::Fleetlock(_)) {
            return vec![];
        }
        status::fleetlock_failed(url).unwrap_or_default()
    }

    /// Every node's status as its metrics tell.
    pub fn status(&self) -> Vec<NodeStatus> {
        status::collect(&self.info)
    }

    /// Waits until every running node's updater answers on its metrics port, or its boot
    /// report ends (images without metrics); fails on a QEMU exit or the timeout.
    pub fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut ready = vec![false; self.vms.len()];
        loop {
            for (i, vm) in self.vms.iter().enumerate() {
                let Some(vm) = vm else {
                    ready[i] = true;
                    continue;
                };
                if ready[i] {
                    continue;
                }
                if let Some(st) = vm.try_wait()? {
                    bail!(
                        "{} exited ({st}) before it was ready; serial log {}",
                        self.info.nodes[i].name,
                        self.info.nodes[i].serial_log.display()
                    );
                }
                ready[i] = status::fetch_metrics(self.info.nodes[i].metrics).is_ok()
                    || vm.serial_log().contains("imgbuild-report: end");
            }
            if ready.iter().all(|r| *r) {
                return Ok(());
            }
            if Instant::now() > deadline {
                let waiting: Vec<&str> = ready
                    .iter()
                    .zip(&self.info.nodes)
                    .filter(|(r, _)| !**r)
                    .map(|(_, n)| n.name.as_str())
                    .collect();
                bail!(
                    "nodes not ready after {}s: {}",
                    timeout.as_secs(),
                    waiting.join(", ")
                );
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// Stops every process and removes the cluster directory.
    pub fn down(mut self) -> Result<()> {
        for vm in self.vms.iter_mut() {
            if let Some(vm) = vm.take() {
                vm.kill()?;
            }
        }
        self.channel.take();
        self.lock = LockService::None;
        let dir = self.spec.dir.clone();
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))
    }

    /// Runs `f` on the cluster's async runtime (lock clients in tests).
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.runtime.block_on(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_urls_and_oem_strings() {
        assert_eq!(guest_url("http://127.0.0.1:4000"), "http://10.0.2.2:4000");
        let s = node_oem_strings(
            "node-2",
            Some("http://127.0.0.1:4000"),
            Some("http://127.0.0.1:4001"),
        );
        assert_eq!(
            s,
            [
                "io.imgbuild.update.node_id=node-2",
                "io.imgbuild.update.channel_url=http://10.0.2.2:4000/",
                "io.imgbuild.update.lock_url=http://10.0.2.2:4001",
            ]
        );
        assert_eq!(node_oem_strings("n", None, None).len(), 1);
    }

    #[test]
    fn virtual_size_of_a_qcow2() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("d.qcow2");
        let st = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&img)
            .arg("5G")
            .status()
            .unwrap();
        assert!(st.success());
        assert_eq!(image_virtual_size(&img).unwrap(), 5 << 30);
        assert!(image_virtual_size(&dir.path().join("missing")).is_err());
    }
}
