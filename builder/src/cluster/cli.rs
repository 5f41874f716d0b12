//! `imgbuild cluster up|status|logs|down`.
//!
//! `up` stays in the foreground as the cluster's supervisor (like `imgbuild run`): it
//! owns every process, prints node state changes, and tears everything down on
//! SIGINT/SIGTERM or `--timeout`. The other verbs read `cluster.json` in the cluster
//! directory; `down` asks the supervisor to stop (SIGTERM), or cleans up after one that
//! died.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::status::{self, NodeStatus};
use super::{Cluster, ClusterInfo, ClusterSpec, LockKind};
use crate::run::AccelArg;

/// Where clusters live unless `--dir` says otherwise: `DIR/NAME`.
pub const DEFAULT_CLUSTERS_DIR: &str = "/var/lib/imgbuild/clusters";

/// Which cluster (all verbs).
#[derive(Debug, Clone, clap::Args)]
pub struct Target {
    /// Cluster name.
    #[arg(long, default_value = "default")]
    pub name: String,
    /// Cluster directory [default: /var/lib/imgbuild/clusters/NAME].
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

impl Target {
    pub fn dir(&self) -> PathBuf {
        self.dir
            .clone()
            .unwrap_or_else(|| Path::new(DEFAULT_CLUSTERS_DIR).join(&self.name))
    }
}

/// Boot N nodes from one image, with the channel and a lock service on 127.0.0.1.
///
/// Stays in the foreground: prints each node's state changes, and stops every process
/// and removes every file it made on Ctrl-C, SIGTERM (`imgbuild cluster down`) or
/// --timeout. The image's `[update]` needs `smbios_overrides = true` (each node gets
/// its node id, the channel URL and the lock URL that way) and, for `status`,
/// `[update.metrics] listen = "0.0.0.0:9548"`.
#[derive(Debug, Clone, clap::Args)]
pub struct UpArgs {
    /// Image every node boots (raw or qcow2; never written: each node has an overlay).
    #[arg(value_name = "IMAGE")]
    pub image: PathBuf,
    #[command(flatten)]
    pub target: Target,
    /// Number of nodes.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Channel directory to serve over HTTP to the nodes.
    #[arg(long, value_name = "DIR")]
    pub channel: Option<PathBuf>,
    /// Reboot-lock service run on the host (must match the image's [update.lock]).
    #[arg(long, value_enum, default_value_t = LockKind::Fleetlock)]
    pub lock: LockKind,
    /// Nodes that may reboot at once (FleetLock).
    #[arg(long, default_value_t = 1)]
    pub lock_slots: usize,
    /// Guest memory per node, MiB.
    #[arg(long, value_name = "MIB", default_value_t = 1024)]
    pub memory: u32,
    /// Virtual disk size per node (var grows into it), e.g. 4G.
    #[arg(long, default_value = "4G", value_parser = parse_size)]
    pub disk_size: u64,
    /// Stop the cluster after this many seconds (0: never).
    #[arg(long, value_name = "SECS", default_value_t = 3600)]
    pub timeout: u64,
    /// Accelerator (TCG unless IMGBUILD_ACCEL=kvm or --accel kvm).
    #[arg(long, value_enum, default_value_t = AccelArg::Auto)]
    pub accel: AccelArg,
}

fn parse_size(s: &str) -> Result<u64, String> {
    crate::recipe::parse_size(s)
}

/// Show each node's running and staged version, updater state, and the lock holders.
#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub target: Target,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Print a node's serial console.
#[derive(Debug, Clone, clap::Args)]
pub struct LogsArgs {
    /// Node name (node-1, node-2, ...).
    pub node: String,
    #[command(flatten)]
    pub target: Target,
    /// Keep printing what arrives.
    #[arg(short, long)]
    pub follow: bool,
}

/// Stop every process of a cluster and remove its directory.
#[derive(Debug, Clone, clap::Args)]
pub struct DownArgs {
    #[command(flatten)]
    pub target: Target,
}

pub fn up(args: &UpArgs, quiet: bool) -> Result<()> {
    let dir = args.target.dir();
    let mut spec = ClusterSpec::new(&args.target.name, &args.image, args.nodes, &dir);
    spec.channel = args.channel.clone();
    spec.lock = args.lock;
    spec.lock_slots = args.lock_slots;
    spec.memory_mib = args.memory;
    spec.disk_size = args.disk_size;
    spec.accel = args.accel.into();

    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).context("installing signal handlers")?;
    }
    let started = Instant::now();
    let cluster = Cluster::up(spec)?;
    let say = |msg: &str| {
        if !quiet {
            println!("[{:>6.1}s] {msg}", started.elapsed().as_secs_f64());
        }
    };
    let info = cluster.info().clone();
    say(&format!(
        "cluster {:?} in {}: {} nodes",
        info.name,
        dir.display(),
        info.nodes.len()
    ));
    if let Some(u) = &info.channel_url {
        say(&format!("channel  {u}  (guests: {})", super::guest_url(u)));
    }
    if let Some(u) = &info.lock_url {
        say(&format!(
            "lock     {u}  ({:?}; guests: {})",
            info.lock,
            super::guest_url(u)
        ));
    }
    for n in &info.nodes {
        say(&format!(
            "{}  pid {}  metrics http://{}/metrics  serial {}",
            n.name,
            n.pid,
            n.metrics,
            n.serial_log.display()
        ));
    }
    let result = supervise(&cluster, args.timeout, &stop, &say);
    say("stopping the cluster");
    let down = cluster.down();
    result.and(down)
}

fn supervise(cluster: &Cluster, timeout: u64, stop: &AtomicBool, say: &dyn Fn(&str)) -> Result<()> {
    let started = Instant::now();
    let mut ready = false;
    let mut last: BTreeMap<String, String> = BTreeMap::new();
    while !stop.load(Ordering::SeqCst) {
        if timeout > 0 && started.elapsed() > Duration::from_secs(timeout) {
            say(&format!("--timeout {timeout}s reached"));
            return Ok(());
        }
        for (i, n) in cluster.info().nodes.iter().enumerate() {
            if let Some(vm) = cluster.vm(i) {
                if let Some(st) = vm.try_wait()? {
                    bail!(
                        "{} stopped ({st}); its serial log: {}",
                        n.name,
                        n.serial_log.display()
                    );
                }
            }
        }
        let statuses = cluster.status();
        for st in &statuses {
            let line = describe(st);
            if last.get(&st.name) != Some(&line) {
                say(&format!("{}: {line}", st.name));
                last.insert(st.name.clone(), line);
            }
        }
        if !ready && statuses.iter().all(|s| s.reachable) {
            ready = true;
            say("all nodes ready (updater answering)");
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    say("signal received");
    Ok(())
}

fn describe(st: &NodeStatus) -> String {
    if !st.up {
        return "stopped".into();
    }
    if !st.reachable {
        return "booting (updater not answering)".into();
    }
    let mut s = format!(
        "running {} on slot {}, {}",
        st.running_version.as_deref().unwrap_or("?"),
        st.running_slot.as_deref().unwrap_or("?"),
        st.state.as_deref().unwrap_or("?")
    );
    if let Some(v) = &st.staged_version {
        s.push_str(&format!(", staged {v}"));
    }
    s
}

pub fn status(args: &StatusArgs) -> Result<()> {
    let info = ClusterInfo::load(&args.target.dir())?;
    let nodes = status::collect(&info);
    let holders = match (&info.lock, &info.lock_url) {
        (LockKind::Fleetlock, Some(url)) => status::fleetlock_history(url)
            .map(|h| status::holders_from_history(&h, "default"))
            .ok(),
        _ => None,
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "name": info.name,
                "supervisor_alive": status::alive(info.supervisor_pid),
                "channel_url": info.channel_url,
                "lock": info.lock,
                "lock_url": info.lock_url,
                "lock_holders": holders,
                "nodes": nodes,
            }))?
        );
        return Ok(());
    }
    println!(
        "cluster {:?}: supervisor pid {} ({})",
        info.name,
        info.supervisor_pid,
        if status::alive(info.supervisor_pid) {
            "running"
        } else {
            "gone: run `imgbuild cluster down`"
        }
    );
    println!(
        "{:<8} {:<4} {:<10} {:<5} {:<10} {:<12} LOCK",
        "NODE", "UP", "RUNNING", "SLOT", "STAGED", "STATE"
    );
    for st in &nodes {
        let holds = holders
            .as_ref()
            .map(|h| if h.contains(&st.name) { "held" } else { "-" })
            .unwrap_or("?");
        println!(
            "{:<8} {:<4} {:<10} {:<5} {:<10} {:<12} {holds}",
            st.name,
            if st.up { "yes" } else { "no" },
            st.running_version.as_deref().unwrap_or("-"),
            st.running_slot.as_deref().unwrap_or("-"),
            st.staged_version.as_deref().unwrap_or("-"),
            st.state
                .as_deref()
                .unwrap_or(if st.up { "booting" } else { "-" }),
        );
    }
    Ok(())
}

pub fn logs(args: &LogsArgs) -> Result<()> {
    let info = ClusterInfo::load(&args.target.dir())?;
    let node = info.node(&args.node)?;
    let mut f = std::fs::File::open(&node.serial_log)
        .with_context(|| format!("opening {}", node.serial_log.display()))?;
    let mut out = std::io::stdout().lock();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = f.read(&mut buf)?;
        if n > 0 {
            out.write_all(&buf[..n])?;
            continue;
        }
        if !args.follow || !status::alive(info.supervisor_pid) {
            return Ok(());
        }
        out.flush()?;
        std::thread::sleep(Duration::from_millis(300));
        // A restarted node writes a new log file: follow it.
        if let Ok(now) = ClusterInfo::load(&args.target.dir()) {
            if now.node(&args.node)?.starts != node.starts {
                return logs(args);
            }
        } else {
            return Ok(());
        }
    }
}

pub fn down(args: &DownArgs) -> Result<()> {
    let dir = args.target.dir();
    let info = ClusterInfo::load(&dir)?;
    if status::alive(info.supervisor_pid) && info.supervisor_pid != std::process::id() {
        let pid = nix::unistd::Pid::from_raw(
            i32::try_from(info.supervisor_pid).context("supervisor pid out of range")?,
        );
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)
            .with_context(|| format!("signalling the supervisor (pid {pid})"))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while dir.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
        }
        if !dir.exists() {
            println!("cluster {:?} stopped", info.name);
            return Ok(());
        }
        eprintln!("the supervisor did not finish in 60 s; cleaning up after it");
    }
    // The supervisor is gone: kill what it left (only QEMU processes it recorded).
    for n in &info.nodes {
        if !status::alive(n.pid) {
            continue;
        }
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", n.pid)).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains("qemu-system") {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(n.pid)?);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
    }
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    println!("cluster {:?} cleaned up", info.name);
    Ok(())
}
