//! Wiring the reboot flow ([`crate::reboot`]) from the configuration: the node's id,
//! the configured lock (or [`LocalLock`] when `[lock]` is absent), the real rebooter,
//! the system health probe, and the cluster-wide refusals for `check`/`update`.
//!
//! This module owns only assembly and the local lock; decisions stay in
//! [`crate::reboot::next_action`]. It never reboots by itself: the CLI (`imgupdate
//! reboot`, `imgupdate verify-boot`) and the daemon call [`run`].

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use imgcoord::health::{SystemProbe, Systemctl};
use imgcoord::lock::{FailedRelease, LockError, NodeIdentity, RebootLock};

use crate::config::Config;
use crate::reboot::{
    ClusterRefusals, Driver, NoDrain, Outcome, RebootError, RebootOptions, SystemRebooter,
};
use crate::Updater;

/// A lock for a node outside any cluster: always granted, held state kept in a file in
/// the state directory so it survives the reboot. Failed releases stay local (the
/// state file's `failed_versions` already refuses them).
#[derive(Debug, Clone)]
pub struct LocalLock {
    pub path: PathBuf,
    pub id: String,
}

#[async_trait::async_trait]
impl RebootLock for LocalLock {
    async fn try_acquire(&self) -> Result<bool, LockError> {
        std::fs::write(&self.path, &self.id)
            .map_err(|e| LockError::Unreachable(format!("{}: {e}", self.path.display())))?;
        Ok(true)
    }
    async fn renew(&self) -> Result<(), LockError> {
        Ok(())
    }
    async fn release(&self) -> Result<(), LockError> {
        match std::fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(LockError::Unreachable(format!(
                "{}: {e}",
                self.path.display()
            ))),
        }
    }
    async fn holders(&self) -> Result<Vec<String>, LockError> {
        Ok(if self.path.exists() {
            vec![self.id.clone()]
        } else {
            vec![]
        })
    }
    async fn mark_release_failed(&self, _: &str, _: &str) -> Result<(), LockError> {
        Ok(())
    }
    async fn failed_releases(&self) -> Result<Vec<FailedRelease>, LockError> {
        Ok(vec![])
    }
}

/// The node id: `node_id` from the config, else `/etc/machine-id`.
pub fn node_id(cfg: &Config) -> anyhow::Result<String> {
    if let Some(id) = &cfg.node_id {
        return Ok(id.clone());
    }
    let id = std::fs::read_to_string("/etc/machine-id").context("reading /etc/machine-id")?;
    Ok(id.trim().to_string())
}

/// The configured reboot lock, or the [`LocalLock`].
pub fn open_lock(cfg: &Config) -> anyhow::Result<Box<dyn RebootLock>> {
    let id = node_id(cfg)?;
    Ok(match &cfg.lock {
        Some(lc) => imgcoord::config::open_lock(
            lc,
            &NodeIdentity {
                id,
                group: lc.group.clone(),
            },
        )?,
        None => Box::new(LocalLock {
            path: cfg.state_dir.join("reboot-lock"),
            id,
        }),
    })
}

/// A runtime for the async parts (lock clients, health checks, D-Bus reboot calls).
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Versions the cluster recorded as failed (empty without `[lock]`).
pub fn cluster_refusals(cfg: &Config) -> anyhow::Result<ClusterRefusals> {
    if cfg.lock.is_none() {
        return Ok(ClusterRefusals::default());
    }
    let lock = open_lock(cfg)?;
    Ok(runtime()?.block_on(ClusterRefusals::fetch(lock.as_ref()))?)
}

/// The Kubernetes drainer when `[drain] kubernetes = true`: credentials from `[drain]
/// kubeconfig` when given, else the in-cluster service account.
pub fn kube_drainer(cfg: &Config) -> anyhow::Result<Option<crate::kubedrain::KubeDrainer>> {
    if !cfg.drain.kubernetes {
        return Ok(None);
    }
    let kube = match &cfg.drain.kubeconfig {
        Some(path) => {
            imgcoord::kube::KubeConfig::from_kubeconfig_file(path).context("[drain] kubeconfig")?
        }
        None => imgcoord::kube::KubeConfig::in_cluster().context(
            "[drain] kubernetes = true without kubeconfig needs the in-cluster service account",
        )?,
    };
    let client =
        imgcoord::kube::KubeClient::new(&kube).context("creating the Kubernetes client")?;
    let node = match &cfg.drain.node_name {
        Some(n) => n.clone(),
        None => nix::unistd::gethostname()
            .context("reading the host name for [drain] node_name")?
            .to_string_lossy()
            .into_owned(),
    };
    Ok(Some(crate::kubedrain::KubeDrainer::new(client, node)))
}

/// Which part of the flow to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// From `staged`: window, lock, drain, reboot.
    Reboot,
    /// After a boot: health, commit or roll back, release.
    VerifyBoot,
}

/// Run one phase with the real system: configured lock, no drain (the Kubernetes
/// drainer plugs in here), kexec/reboot through systemd, system health probe. Holds the
/// state directory lock while running.
pub fn run(cfg: &Config, phase: Phase) -> anyhow::Result<Outcome> {
    let updater = Updater::new(cfg.clone())?;
    let _guard = updater.lock()?;
    let lock = open_lock(cfg)?;
    let kube_drainer = kube_drainer(cfg)?;
    let drainer: &dyn crate::reboot::Drainer = match &kube_drainer {
        Some(d) => d,
        None => &NoDrain,
    };
    let rebooter = SystemRebooter::default();
    let probe = SystemProbe::new(Systemctl::default());
    let driver = Driver {
        updater: &updater,
        lock: lock.as_ref(),
        node_id: node_id(cfg)?,
        drainer,
        rebooter: &rebooter,
        probe: &probe,
        opts: RebootOptions {
            windows: cfg.window.windows.clone(),
            health: cfg.health.clone(),
            drain_timeout: Duration::from_secs(cfg.drain_timeout_secs),
            renew_every: cfg.lock.as_ref().map(|l| l.ttl / 3),
        },
    };
    let out: Result<Outcome, RebootError> = runtime()?.block_on(async {
        match phase {
            Phase::Reboot => driver.reboot_staged().await,
            Phase::VerifyBoot => driver.verify_boot().await,
        }
    });
    Ok(out?)
}
