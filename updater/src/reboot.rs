//! The reboot flow of issue 6: from a staged slot to a committed or rolled-back one.
//!
//! This module owns the pure decision [`next_action`] (state record, time, maintenance
//! windows, lock status and health verdict in; one [`Action`] out, brupop style), the
//! small traits the flow acts through ([`Drainer`], [`Rebooter`]; the lock is
//! `imgcoord::lock::RebootLock`), their trivial or real implementations ([`NoDrain`],
//! [`SystemRebooter`]) and the [`Driver`] that loops `next_action` and performs each
//! action. Order before the reboot: window open → lock → cordon and drain (timeout ⇒
//! postponed, lock released) → the `rebooting` state recorded atomically → kexec or
//! firmware reboot. After a boot, what actually booted decides (via
//! [`Event::Booted`]): the new slot runs its health checks, then commits (entry made
//! good and default, history, uncordon, release) or rolls back (entry marked bad, the
//! release recorded failed where the lock lives, reboot to the old slot, health check
//! there, uncordon, release). The old slot running while a trial was recorded means the
//! trial hung or was reset: the version is failed, recorded, and the lock released.
//! This module never writes the inactive slot's contents and never reboots without the
//! `rebooting` state saved first.

use std::path::PathBuf;
use std::time::Duration;

use imgcoord::config::HealthConfig;
use imgcoord::health::{run_until_verdict, Probe, Verdict};
use imgcoord::lock::{FailedRelease, LockError, RebootLock};
use imgcoord::window::{self, Step, Window};
use imgformat::boot;
use imgformat::layout::Slot;
use jiff::Timestamp;

use crate::config::Strategy;
use crate::install::RefusedVersions;
use crate::stage::{self, KexecPlan};
use crate::state::{Event, IllegalTransition, State, StateFile};
use crate::Updater;

/// What the flow does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Nothing to do (resting state, or an unhealthy old slot left for an operator).
    Idle,
    /// Staged, but no maintenance window is open: wait, take no lock.
    WaitWindow,
    /// Window open: try to take the cluster reboot lock.
    TakeLock,
    /// Lock held inside a window: cordon and drain.
    Drain,
    /// Drained (or rolling back): boot `slot` with `strategy`. The driver builds the
    /// [`KexecPlan`] from the disk (a pure function cannot read it).
    Reboot { strategy: Strategy, slot: Slot },
    /// Run the health checks of the running system.
    RunHealth,
    /// The trial passed: make its entry good and the default.
    Commit,
    /// The trial failed: mark it bad, record the failed release, go back.
    RollBack,
    /// Uncordon and give the lock back.
    ReleaseLock,
}

/// Everything [`next_action`] looks at.
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    pub state: &'a State,
    pub now: Timestamp,
    /// Maintenance windows; none means always open.
    pub windows: &'a [Window],
    /// Whether this node holds the cluster reboot lock.
    pub lock_held: bool,
    /// The verdict of health checks run in this boot, if any ran.
    pub verdict: Option<&'a Verdict>,
    /// The configured strategy (for reboots not recorded in the state: rollbacks).
    pub strategy: Strategy,
}

/// The next action, pure. Table (window = open, held = lock held):
///
/// | state | condition | action |
/// |---|---|---|
/// | staged, locking, draining | !window, !held | wait_window |
/// | staged, locking, draining | window, !held | take_lock |
/// | staged, locking, draining | !window, held | release_lock |
/// | staged, locking, draining | window, held | drain |
/// | rebooting{s, slot} | held | reboot{s, slot} |
/// | rebooting | !held | take_lock |
/// | trial | no verdict / pending | run_health |
/// | trial | pass | commit |
/// | trial | fail | roll_back |
/// | rolling_back{slot} | - | reboot{strategy, !slot} |
/// | failed | held, no verdict / pending | run_health |
/// | failed | held, pass | release_lock |
/// | failed | held, fail | idle (stay cordoned, keep the lock) |
/// | idle, checking, downloading, verifying, committed | held | release_lock |
/// | any other | !held | idle |
pub fn next_action(i: &Inputs<'_>) -> Action {
    let gate = || {
        let open = i.windows.is_empty() || window::is_open(i.windows, i.now);
        match window::next_step(open, i.lock_held) {
            Step::WaitForWindow => Action::WaitWindow,
            Step::TakeLock => Action::TakeLock,
            Step::ReleaseLock => Action::ReleaseLock,
            Step::Reboot => Action::Drain,
        }
    };
    match i.state {
        State::Staged { .. } | State::Locking { .. } | State::Draining { .. } => gate(),
        State::Rebooting { strategy, slot, .. } => {
            if i.lock_held {
                Action::Reboot {
                    strategy: *strategy,
                    slot: *slot,
                }
            } else {
                Action::TakeLock
            }
        }
        State::Trial { .. } => match i.verdict {
            None | Some(Verdict::Pending { .. }) => Action::RunHealth,
            Some(Verdict::Pass) => Action::Commit,
            Some(Verdict::Fail { .. }) => Action::RollBack,
        },
        State::RollingBack { slot, .. } => Action::Reboot {
            strategy: i.strategy,
            slot: !*slot,
        },
        State::Failed { .. } if i.lock_held => match i.verdict {
            None | Some(Verdict::Pending { .. }) => Action::RunHealth,
            Some(Verdict::Pass) => Action::ReleaseLock,
            Some(Verdict::Fail { .. }) => Action::Idle,
        },
        _ if i.lock_held => Action::ReleaseLock,
        _ => Action::Idle,
    }
}

/// What a drain ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Drained {
    /// Every evictable pod is gone.
    Drained,
    /// The timeout passed first (e.g. a PodDisruptionBudget held); postpone the update.
    Postponed { reason: String },
}

/// Cordon / drain / uncordon the node (Kubernetes lives in `imgcoord::drain`).
#[async_trait::async_trait]
pub trait Drainer: Send + Sync {
    async fn cordon(&self) -> Result<(), String>;
    async fn drain(&self, timeout: Duration) -> Result<Drained, String>;
    async fn uncordon(&self) -> Result<(), String>;
}

/// Nodes without Kubernetes: nothing to drain.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoDrain;

#[async_trait::async_trait]
impl Drainer for NoDrain {
    async fn cordon(&self) -> Result<(), String> {
        Ok(())
    }
    async fn drain(&self, _: Duration) -> Result<Drained, String> {
        Ok(Drained::Drained)
    }
    async fn uncordon(&self) -> Result<(), String> {
        Ok(())
    }
}

/// Leaves the running system for another slot. Both calls return once the reboot was
/// requested; the boot itself is observed at the next start.
#[async_trait::async_trait]
pub trait Rebooter: Send + Sync {
    /// Load `plan`'s kernel (bytes given) and ask for an orderly kexec.
    async fn kexec(&self, plan: &KexecPlan, kernel: Vec<u8>, initrd: Vec<u8>)
        -> Result<(), String>;
    /// Make `slot` the next boot choice and reboot through the firmware.
    async fn reboot_into(&self, slot: Slot) -> Result<(), String>;
}

/// The real rebooter: `kexec_file_load` + systemd's `KExec`, or logind's one-shot
/// boot-loader entry + systemd's `Reboot`, all over the system D-Bus.
#[derive(Debug, Clone)]
pub struct SystemRebooter {
    /// A tmpfs directory for the kexec kernel and initrd (`/run/imgupdate/kexec`).
    pub kexec_dir: PathBuf,
}

impl Default for SystemRebooter {
    fn default() -> Self {
        SystemRebooter {
            kexec_dir: PathBuf::from("/run/imgupdate/kexec"),
        }
    }
}

#[async_trait::async_trait]
impl Rebooter for SystemRebooter {
    async fn kexec(
        &self,
        plan: &KexecPlan,
        kernel: Vec<u8>,
        initrd: Vec<u8>,
    ) -> Result<(), String> {
        let target = imgcoord::kexec::KexecTarget {
            slot: plan.slot,
            entry_file: None,
            version: Some(plan.entry.version.clone()),
            kernel,
            initrd,
            cmdline: plan.cmdline.clone(),
        };
        let staged = target.stage(&self.kexec_dir).map_err(|e| e.to_string())?;
        imgcoord::kexec::kexec_file_load(&staged).map_err(|e| e.to_string())?;
        imgcoord::kexec::systemd_kexec()
            .await
            .map_err(|e| e.to_string())
    }

    async fn reboot_into(&self, slot: Slot) -> Result<(), String> {
        let conn = zbus::Connection::system()
            .await
            .map_err(|e| format!("system bus: {e}"))?;
        // One-shot choice (LoaderEntryOneShot); the entry id has no boot counter.
        let id = boot::EntryName { slot, tries: None }.to_string();
        if let Err(e) = conn
            .call_method(
                Some("org.freedesktop.login1"),
                "/org/freedesktop/login1",
                Some("org.freedesktop.login1.Manager"),
                "SetRebootToBootLoaderEntry",
                &(id.as_str(),),
            )
            .await
        {
            // Without it the firmware default (newest good entry) decides, which is
            // also what boot counting falls back on.
            tracing::warn!("setting the one-shot boot entry {id}: {e}");
        }
        conn.call_method(
            Some("org.freedesktop.systemd1"),
            "/org/freedesktop/systemd1",
            Some("org.freedesktop.systemd1.Manager"),
            "Reboot",
            &(),
        )
        .await
        .map_err(|e| format!("asking systemd to reboot: {e}"))?;
        Ok(())
    }
}

/// Why the flow stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RebootError {
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    Illegal(#[from] IllegalTransition),
    #[error("drain: {0}")]
    Drain(String),
    #[error("reboot: {0}")]
    Reboot(String),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// How a [`Driver`] run ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// Nothing to do in this state.
    Idle,
    /// No maintenance window open; no lock taken.
    WaitWindow,
    /// Other nodes hold every lock slot.
    LockBusy,
    /// The window closed while holding the lock; released.
    WindowClosed,
    /// The drain timed out; uncordoned and the lock released; still staged.
    Postponed { reason: String },
    /// Reboot (kexec or firmware) into `slot` requested.
    Rebooting { slot: Slot },
    /// The trial passed: committed, uncordoned, lock released.
    Committed { version: String },
    /// Back on the old slot, healthy, lock released; `version` failed.
    RolledBack { version: String },
    /// The old slot is not healthy either: stays cordoned, lock kept.
    Unhealthy { reasons: Vec<String> },
    /// The staged version was recorded as failed by another node while this one waited
    /// for the lock: dropped (slot unbootable, back to idle), lock released.
    Refused { version: String },
}

/// Settings of the flow.
#[derive(Debug, Clone)]
pub struct RebootOptions {
    pub windows: Vec<Window>,
    pub health: HealthConfig,
    pub drain_timeout: Duration,
    /// Renew a held lock this often while draining and checking (TTL backends; a third
    /// of the TTL); `None`: never.
    pub renew_every: Option<Duration>,
}

/// Runs the flow for one node, acting through the traits.
pub struct Driver<'a> {
    pub updater: &'a Updater,
    pub lock: &'a dyn RebootLock,
    /// This node's id as the lock knows it.
    pub node_id: String,
    pub drainer: &'a dyn Drainer,
    pub rebooter: &'a dyn Rebooter,
    pub probe: &'a dyn Probe,
    pub opts: RebootOptions,
}

impl std::fmt::Debug for Driver<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("node_id", &self.node_id)
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

fn version_of(s: &State) -> Option<(String, Slot)> {
    match s {
        State::Rebooting { version, slot, .. }
        | State::Trial { version, slot }
        | State::RollingBack { version, slot } => Some((version.clone(), *slot)),
        _ => None,
    }
}

fn remember_failed(sf: &mut StateFile, version: &str) {
    if !sf.failed_versions.iter().any(|v| v == version) {
        sf.failed_versions.push(version.to_string());
    }
}

impl Driver<'_> {
    /// Whether this node holds the lock. A service that cannot list holders (a plain
    /// FleetLock server) answers `unknown`: taking and releasing are idempotent, so the
    /// caller's guess is safe.
    async fn lock_held(&self, unknown: bool) -> Result<bool, LockError> {
        match self.lock.holders().await {
            Ok(holders) => Ok(holders.iter().any(|h| h == &self.node_id)),
            Err(LockError::Refused(e) | LockError::Protocol(e)) => {
                tracing::debug!("the lock service cannot list holders ({e}); assuming {unknown}");
                Ok(unknown)
            }
            Err(e) => Err(e),
        }
    }

    /// Run `work` while renewing the lock every `renew_every`; a failed renewal (lost
    /// slot, `max_hold` reached) ends the work with the lock error.
    /// Never renews a lock not held: for FleetLock a renewal is a `pre-reboot` call.
    async fn renewing<T>(
        &self,
        held: bool,
        work: impl std::future::Future<Output = T>,
    ) -> Result<T, LockError> {
        let Some(every) = self.opts.renew_every.filter(|_| held) else {
            return Ok(work.await);
        };
        let renew = async {
            loop {
                tokio::time::sleep(every).await;
                if let Err(e) = self.lock.renew().await {
                    return e;
                }
            }
        };
        tokio::select! {
            out = work => Ok(out),
            err = renew => Err(err),
        }
    }

    fn dir(&self) -> &std::path::Path {
        &self.updater.cfg.state_dir
    }

    /// Feed what booted; when that ends a trial or a rollback (the old slot runs), record
    /// the failure: the new slot's entry bad, the version failed here and where the
    /// lock lives.
    async fn observe_boot(&self) -> Result<StateFile, RebootError> {
        let mut sf = StateFile::load(self.dir())?;
        let before = sf.state.clone();
        sf.apply(Event::Booted {
            version: self.updater.running.version.clone(),
            slot: self.updater.running.slot,
        })?;
        if sf.state != before {
            if let (State::Failed { reason }, Some((version, slot))) =
                (sf.state.clone(), version_of(&before))
            {
                if stage::is_bootable(&self.updater.disk, slot)? {
                    stage::mark_bad(&self.updater.disk, slot)?;
                }
                remember_failed(&mut sf, &version);
                if !matches!(before, State::RollingBack { .. }) {
                    // A hang or watchdog reset: nobody recorded it yet.
                    self.lock.mark_release_failed(&version, &reason).await?;
                }
            }
            sf.save(self.dir())?;
        }
        Ok(sf)
    }

    fn inputs<'s>(
        &'s self,
        state: &'s State,
        held: bool,
        verdict: Option<&'s Verdict>,
    ) -> Inputs<'s> {
        Inputs {
            state,
            now: Timestamp::now(),
            windows: &self.opts.windows,
            lock_held: held,
            verdict,
            strategy: self.updater.cfg.strategy,
        }
    }

    async fn release(&self) -> Result<(), RebootError> {
        self.drainer.uncordon().await.map_err(RebootError::Drain)?;
        self.lock.release().await?;
        Ok(())
    }

    /// From `staged`: window, lock, drain, record `rebooting`, reboot. Returns once the
    /// reboot was requested or the flow has to wait.
    pub async fn reboot_staged(&self) -> Result<Outcome, RebootError> {
        let mut sf = self.observe_boot().await?;
        let mut held = self.lock_held(false).await?;
        loop {
            let action = next_action(&self.inputs(&sf.state, held, None));
            tracing::info!(state = sf.state.name(), ?action, "reboot flow");
            match action {
                Action::WaitWindow => return Ok(Outcome::WaitWindow),
                Action::TakeLock => {
                    if !self.lock.try_acquire().await? {
                        return Ok(Outcome::LockBusy);
                    }
                    held = true;
                    // Nodes stage in parallel, so a release may have failed on the node
                    // that held the lock before us: it recorded that before it released.
                    if let State::Staged { version, .. } = &sf.state {
                        let version = version.clone();
                        let failed = self.lock.failed_releases().await?;
                        if failed.iter().any(|f| f.version == version) {
                            tracing::warn!(
                                "{version} failed on another node; dropping it instead of booting it"
                            );
                            self.updater
                                .rollback_locked()
                                .map_err(|e| RebootError::Other(e.into()))?;
                            self.release().await?;
                            return Ok(Outcome::Refused { version });
                        }
                    }
                }
                Action::ReleaseLock if matches!(sf.state, State::Staged { .. }) => {
                    self.release().await?;
                    return Ok(Outcome::WindowClosed);
                }
                Action::Drain => {
                    // Locking and draining live in memory only: a crash here leaves
                    // `staged` on disk and the lock is taken again (idempotently).
                    if let State::Staged { .. } = sf.state {
                        sf.apply(Event::LockRequested)?;
                    }
                    if let State::Locking { .. } = sf.state {
                        sf.apply(Event::LockAcquired)?;
                    }
                    self.drainer.cordon().await.map_err(RebootError::Drain)?;
                    match self
                        .renewing(true, self.drainer.drain(self.opts.drain_timeout))
                        .await?
                        .map_err(RebootError::Drain)?
                    {
                        Drained::Drained => {
                            sf.apply(Event::Drained {
                                strategy: self.updater.cfg.strategy,
                            })?;
                        }
                        Drained::Postponed { reason } => {
                            tracing::warn!("drain postponed: {reason}");
                            self.release().await?;
                            return Ok(Outcome::Postponed { reason });
                        }
                    }
                }
                Action::Reboot { strategy, slot } => {
                    // Recorded before the reboot: the next start compares what booted.
                    sf.save(self.dir())?;
                    let version = match &sf.state {
                        State::Rebooting { version, .. } => version.clone(),
                        _ => String::new(),
                    };
                    if let Err(e) = self.reboot(strategy, slot, &version).await {
                        // Nothing rebooted: fail this attempt (a later check may retry
                        // the version; it is not recorded as a bad release) and give
                        // the node back to the cluster.
                        sf.apply(Event::Error {
                            reason: e.to_string(),
                        })?;
                        sf.save(self.dir())?;
                        self.release().await?;
                        return Err(e);
                    }
                    return Ok(Outcome::Rebooting { slot });
                }
                Action::Idle
                | Action::ReleaseLock
                | Action::RunHealth
                | Action::Commit
                | Action::RollBack => return self.verify_boot_from(sf, held).await,
            }
        }
    }

    /// After a boot (`imgupdate verify-boot`, and the daemon at start): what booted
    /// decides; health checks; commit or roll back; release.
    pub async fn verify_boot(&self) -> Result<Outcome, RebootError> {
        let sf = self.observe_boot().await?;
        let held = self.lock_held(true).await?;
        self.verify_boot_from(sf, held).await
    }

    async fn verify_boot_from(
        &self,
        mut sf: StateFile,
        mut held: bool,
    ) -> Result<Outcome, RebootError> {
        let mut verdict: Option<Verdict> = None;
        loop {
            let action = next_action(&self.inputs(&sf.state, held, verdict.as_ref()));
            tracing::info!(state = sf.state.name(), ?action, "boot verification");
            match action {
                Action::RunHealth => {
                    if held {
                        // The lease ran down during the reboot: refresh it first.
                        self.lock.renew().await?;
                    }
                    let report = self
                        .renewing(
                            held,
                            run_until_verdict(
                                &self.opts.health.checks,
                                self.probe,
                                self.opts.health.policy(),
                            ),
                        )
                        .await?;
                    tracing::info!(verdict = ?report.verdict, rounds = report.rounds, "health");
                    verdict = Some(report.verdict);
                }
                Action::Commit => {
                    let State::Trial { version, slot } = sf.state.clone() else {
                        return Err(anyhow::anyhow!("commit outside a trial").into());
                    };
                    let entry = stage::entry_for(&self.updater.disk, !slot, slot, &version, None)?;
                    stage::commit_entry(&self.updater.disk, &entry)?;
                    sf.apply(Event::HealthPassed)?;
                    sf.save(self.dir())?;
                }
                Action::RollBack => {
                    let State::Trial { version, slot } = sf.state.clone() else {
                        return Err(anyhow::anyhow!("rollback outside a trial").into());
                    };
                    let reason = match &verdict {
                        Some(Verdict::Fail { reasons }) => reasons.join("; "),
                        _ => "health checks failed".to_string(),
                    };
                    self.lock.mark_release_failed(&version, &reason).await?;
                    if stage::is_bootable(&self.updater.disk, slot)? {
                        stage::mark_bad(&self.updater.disk, slot)?;
                    }
                    sf.apply(Event::HealthFailed { reason })?;
                    remember_failed(&mut sf, &version);
                    sf.save(self.dir())?;
                    verdict = None;
                }
                Action::Reboot { strategy, slot } => {
                    let version = self.updater.running.version.clone();
                    self.reboot(strategy, slot, &version).await?;
                    return Ok(Outcome::Rebooting { slot });
                }
                Action::ReleaseLock => {
                    self.release().await?;
                    return Ok(match &sf.state {
                        State::Committed { version, .. } => Outcome::Committed {
                            version: version.clone(),
                        },
                        State::Failed { .. } => Outcome::RolledBack {
                            version: sf.failed_versions.last().cloned().unwrap_or_default(),
                        },
                        _ => Outcome::Idle,
                    });
                }
                Action::Idle => {
                    return Ok(match verdict {
                        Some(Verdict::Fail { reasons }) => Outcome::Unhealthy { reasons },
                        _ => Outcome::Idle,
                    });
                }
                Action::TakeLock => {
                    held = self.lock.try_acquire().await?;
                    if !held {
                        return Ok(Outcome::LockBusy);
                    }
                }
                // A staged slot is not verified here; `imgupdate reboot` moves it on.
                Action::WaitWindow | Action::Drain => return Ok(Outcome::Idle),
            }
        }
    }

    /// Boot `slot`: kexec its kernel with the plan from the disk, or a firmware reboot.
    async fn reboot(
        &self,
        strategy: Strategy,
        slot: Slot,
        version: &str,
    ) -> Result<(), RebootError> {
        match strategy {
            Strategy::Kexec => {
                let plan = self.kexec_plan(slot, version)?;
                let (kernel, initrd) = stage::read_staged(&self.updater.disk, &plan)?;
                self.rebooter
                    .kexec(&plan, kernel, initrd)
                    .await
                    .map_err(RebootError::Reboot)
            }
            Strategy::Reboot => self
                .rebooter
                .reboot_into(slot)
                .await
                .map_err(RebootError::Reboot),
        }
    }

    /// What to kexec for `slot`: its own good entry when it has one (the way back to
    /// the old slot), else the staged plan (a kexec trial has no entry yet).
    pub fn kexec_plan(&self, slot: Slot, version: &str) -> Result<KexecPlan, RebootError> {
        let disk = &self.updater.disk;
        if slot == self.updater.running.slot {
            return Err(anyhow::anyhow!("slot {slot} is already running").into());
        }
        match stage::read_entry(disk, slot)? {
            Some(entry) if stage::is_bootable(disk, slot)? => Ok(KexecPlan {
                slot,
                kernel: boot::kernel_path(slot),
                initrd: boot::initrd_path(slot),
                cmdline: entry.options(),
                entry,
            }),
            _ => Ok(stage::kexec_plan(
                disk,
                self.updater.running.slot,
                slot,
                version,
            )?),
        }
    }
}

/// Versions recorded failed where the lock lives, for [`Updater::check`] / `update`.
#[derive(Debug, Clone, Default)]
pub struct ClusterRefusals(pub Vec<FailedRelease>);

impl ClusterRefusals {
    /// Read the group's failed releases from the lock service.
    pub async fn fetch(lock: &dyn RebootLock) -> Result<ClusterRefusals, LockError> {
        Ok(ClusterRefusals(lock.failed_releases().await?))
    }
}

impl RefusedVersions for ClusterRefusals {
    fn is_refused(&self, version: &str) -> bool {
        self.0.iter().any(|f| f.version == version)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
