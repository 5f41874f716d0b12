//! Check, install and stage: the updater's own steps from "is there an update?" to
//! "the inactive slot holds it, verified, and is staged".
//!
//! This module owns choosing the version (channel, pinned and max version, refused
//! versions), writing the target root image into the INACTIVE slot in one streaming pass
//! (by delta from the active slot, else by chunks seeded from the active slot, else from
//! the full image), verifying the whole slot against the signed sha256, and driving the
//! state file through those steps. Order (Bottlerocket's): the inactive slot's entry is
//! removed and synced before the first byte; the slot is made bootable only after its
//! hash matched. It must never write the active slot (the `slots` module refuses), never
//! hand an unverified download to a writer, and never reboot, lock or drain (issue 6).

use std::cmp::Ordering;
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use imgchannel::{Channel, LoadError, LoadOptions};
use imgformat::chunk::{
    chunks_missing, ChunkIndex, ChunkSource, FetchPlan, Frame, PackInfo, Sha256Digest,
};
use imgformat::delta::DeltaReader;
use imgformat::layout::Slot;
use imgformat::pack::{coalesce, decode_frame, frames_needed};
use imgformat::release::{self, compare_versions, ChannelIndex, ReleaseEntry, ReleaseManifest};
use serde::Serialize;

use crate::config::{Config, Strategy};
use crate::failpoint;
use crate::fetch::{Expected, FetchError, Fetcher, Piece};
use crate::slots::{self, Disk, Running};
use crate::stage::{self, KexecPlan};
use crate::state::{Event, IllegalTransition, State, StateFile};

mod write;
use write::SlotWriter;

/// Why an update did not happen. The CLI maps these to exit codes, the daemon to D-Bus
/// error names ([`UpdateError::dbus_name`]).
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error(transparent)]
    Illegal(#[from] IllegalTransition),
    #[error("channel: {0}")]
    Channel(#[from] LoadError),
    #[error("download: {0}")]
    Fetch(#[from] FetchError),
    #[error("delta: {0}")]
    Delta(#[from] imgformat::error::DeltaError),
    /// Signed pieces that do not fit together (delta header, chunk index, release).
    #[error("the downloaded data does not match the signed release: {0}")]
    Mismatch(String),
    #[error("slot {slot} does not hash to the signed sha256 of {version} (got {got}, want {want}); it stays unbootable")]
    SlotMismatch {
        slot: Slot,
        version: String,
        got: String,
        want: String,
    },
    #[error("version {0} is not in the channel")]
    NotPublished(String),
    #[error("another imgupdate holds {0}")]
    Busy(String),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl UpdateError {
    /// The D-Bus error name for this error.
    pub fn dbus_name(&self) -> &'static str {
        match self {
            UpdateError::Illegal(_) => "org.imgbuild.Update1.Error.IllegalTransition",
            UpdateError::Channel(_) => "org.imgbuild.Update1.Error.Channel",
            // A fetched chunk that fails its signed hash is a verification failure.
            UpdateError::Fetch(FetchError::PieceRejected { .. }) => {
                "org.imgbuild.Update1.Error.Verification"
            }
            UpdateError::Fetch(_) => "org.imgbuild.Update1.Error.Download",
            UpdateError::Delta(_) | UpdateError::Mismatch(_) | UpdateError::SlotMismatch { .. } => {
                "org.imgbuild.Update1.Error.Verification"
            }
            UpdateError::NotPublished(_) => "org.imgbuild.Update1.Error.NotPublished",
            UpdateError::Busy(_) => "org.imgbuild.Update1.Error.Busy",
            UpdateError::Other(_) => "org.imgbuild.Update1.Error.Failed",
        }
    }

    /// Process exit code of the CLI for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            UpdateError::Illegal(_) => 3,
            UpdateError::Channel(_) => 4,
            UpdateError::Fetch(FetchError::PieceRejected { .. }) => 6,
            UpdateError::Fetch(_) => 5,
            UpdateError::Delta(_) | UpdateError::Mismatch(_) | UpdateError::SlotMismatch { .. } => {
                6
            }
            UpdateError::NotPublished(_) => 7,
            UpdateError::Busy(_) => 8,
            UpdateError::Other(_) => 1,
        }
    }
}

/// Versions this node must not install. Issue 6's lock backends add the cluster-wide
/// list (a version that failed on another node).
pub trait RefusedVersions {
    fn is_refused(&self, version: &str) -> bool;
}

/// Only the versions that failed on this node (the state file's list).
#[derive(Debug, Clone, Default)]
pub struct LocalRefusals(pub Vec<String>);

impl RefusedVersions for LocalRefusals {
    fn is_refused(&self, version: &str) -> bool {
        self.0.iter().any(|v| v == version)
    }
}

/// What a check decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Choice {
    UpToDate,
    Update {
        version: String,
    },
    /// The version to go to failed before; staying.
    Refused {
        version: String,
    },
    /// The pinned version is not published.
    PinnedMissing {
        version: String,
    },
}

/// Pick the version to move to: the pinned one if set, else the channel's rule
/// ([`ChannelIndex::update_target`]) over the releases not above `max` and not refused.
pub fn choose(
    index: &ChannelIndex,
    running: &str,
    pinned: Option<&str>,
    max: Option<&str>,
    refused: &dyn RefusedVersions,
) -> Choice {
    let target: Option<String> = if let Some(pin) = pinned {
        if compare_versions(pin, running) == Ordering::Equal {
            None
        } else if index.find(pin).is_some() {
            Some(pin.to_string())
        } else {
            return Choice::PinnedMissing {
                version: pin.to_string(),
            };
        }
    } else {
        let mut allowed = index.clone();
        if let Some(max) = max {
            allowed
                .releases
                .retain(|r: &ReleaseEntry| compare_versions(&r.version, max) != Ordering::Greater);
        }
        let newest = allowed.update_target(running).map(|r| r.version.clone());
        // A release that failed is skipped: the node moves to the newest good one
        // (e.g. from 1.0 to 1.1 when 1.2 failed), and stays only when none is left.
        allowed
            .releases
            .retain(|r: &ReleaseEntry| r.version == running || !refused.is_refused(&r.version));
        match allowed.update_target(running) {
            Some(r) => Some(r.version.clone()),
            None => {
                return match newest {
                    Some(v) if refused.is_refused(&v) => Choice::Refused { version: v },
                    _ => Choice::UpToDate,
                }
            }
        }
    };
    match target {
        None => Choice::UpToDate,
        Some(v) if refused.is_refused(&v) => Choice::Refused { version: v },
        Some(v) => Choice::Update { version: v },
    }
}

/// How to write the slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Delta if one from the running version exists, else chunks, else the full image.
    #[default]
    Auto,
    Delta,
    Chunks,
    Full,
}

/// `{version, done, total}` of the slot being written, in the state directory.
pub const PROGRESS_FILE: &str = "progress.json";

/// Slot writes are gathered into blocks of this size.
const WRITE_BUF: usize = 1 << 20;

/// Progress reports: (bytes written into the slot, image size).
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);

/// What an update did.
#[derive(Debug, Clone, Serialize)]
pub struct UpdateReport {
    pub choice: Choice,
    pub from_version: String,
    pub slot: Option<Slot>,
    pub method: Option<Method>,
    pub bytes_fetched: u64,
    /// Bytes of the new image copied from the active slot (delta copies or seeded chunks).
    pub seeded_bytes: u64,
    pub strategy: Strategy,
    /// For `kexec`: what to load.
    pub kexec: Option<KexecPlan>,
    pub state: State,
}

/// The updater on one node: configuration, what runs, and the disk.
#[derive(Debug)]
pub struct Updater {
    pub cfg: Config,
    pub running: Running,
    pub disk: Disk,
}

impl Updater {
    /// Read what runs and find the disk.
    pub fn new(cfg: Config) -> anyhow::Result<Updater> {
        let running = slots::running(&cfg.os_release, &cfg.kernel_cmdline)?;
        let disk = Disk::discover(cfg.disk.as_deref(), running.slot)?;
        Ok(Updater { cfg, running, disk })
    }

    /// The slot updates are written to.
    pub fn inactive(&self) -> Slot {
        !self.running.slot
    }

    /// Exclusive lock on the state directory for one operation (flock, released on exit
    /// or crash), so a CLI call and the daemon never write the slot at the same time.
    pub fn lock(&self) -> Result<nix::fcntl::Flock<File>, UpdateError> {
        let dir = &self.cfg.state_dir;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("lock");
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|_| UpdateError::Busy(path.display().to_string()))
    }

    fn downloads(&self) -> PathBuf {
        self.cfg.state_dir.join("downloads")
    }

    /// Load the state file and feed it what booted ("what actually booted decides").
    pub fn start(&self) -> anyhow::Result<StateFile> {
        let mut sf = StateFile::load(&self.cfg.state_dir)?;
        let before = sf.state.clone();
        sf.apply(Event::Booted {
            version: self.running.version.clone(),
            slot: self.running.slot,
        })
        .context("applying the booted event")?;
        if sf.state != before {
            if let State::Failed { .. } = sf.state {
                if let Some(v) = version_of(&before) {
                    remember_failed(&mut sf, &v);
                }
            }
            sf.save(&self.cfg.state_dir)?;
        }
        Ok(sf)
    }

    /// Load and verify the channel, caching its metadata in the metadata directory.
    pub fn load_channel(&self) -> Result<Channel, UpdateError> {
        let dir = self.cfg.metadata_dir();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(imgchannel::load_with(
            &self.cfg.channel_url,
            &self.cfg.trusted_root,
            &LoadOptions {
                datastore: Some(dir),
            },
        )?)
    }

    /// Check the channel and say what it offers. Records the time of the check; the
    /// state itself does not change (a check alone installs nothing).
    pub fn check(&self, refused: &dyn RefusedVersions) -> Result<Choice, UpdateError> {
        let _lock = self.lock()?;
        let mut sf = self.start()?;
        let (choice, _) = self.decide(&mut sf, refused)?;
        sf.save(&self.cfg.state_dir)?;
        Ok(choice)
    }

    fn decide(
        &self,
        sf: &mut StateFile,
        refused: &dyn RefusedVersions,
    ) -> Result<(Choice, Channel), UpdateError> {
        let channel = self.load_channel()?;
        let local = LocalRefusals(sf.failed_versions.clone());
        let both = Both(&local, refused);
        let choice = choose(
            channel.index(),
            &self.running.version,
            self.cfg.pinned_version.as_deref(),
            self.cfg.max_version.as_deref(),
            &both,
        );
        sf.last_check = Some(crate::state::now());
        Ok((choice, channel))
    }

    /// Check, then write, verify and stage the chosen version.
    pub fn update(
        &self,
        method: Method,
        refused: &dyn RefusedVersions,
        progress: Progress<'_>,
    ) -> Result<UpdateReport, UpdateError> {
        let _lock = self.lock()?;
        let mut sf = self.start()?;
        let mut report = UpdateReport {
            choice: Choice::UpToDate,
            from_version: self.running.version.clone(),
            slot: None,
            method: None,
            bytes_fetched: 0,
            seeded_bytes: 0,
            strategy: self.cfg.strategy,
            kexec: None,
            state: sf.state.clone(),
        };
        let result = self.update_in(&mut sf, method, refused, progress, &mut report);
        if let Err(e) = &result {
            if !matches!(e, UpdateError::Illegal(_)) && !is_resting(&sf.state) {
                // Legal from every non-resting state an update passes through.
                let _ = sf.apply(Event::Error {
                    reason: e.to_string(),
                });
            }
        }
        sf.bytes_fetched += report.bytes_fetched;
        sf.save(&self.cfg.state_dir)?;
        report.state = sf.state.clone();
        result.map(|()| report)
    }

    fn update_in(
        &self,
        sf: &mut StateFile,
        method: Method,
        refused: &dyn RefusedVersions,
        progress: Progress<'_>,
        report: &mut UpdateReport,
    ) -> Result<(), UpdateError> {
        let prev = sf.state.clone();
        crate::state::next(&prev, &Event::CheckStarted)?;
        let (choice, channel) = match self.decide(sf, refused) {
            Ok(x) => x,
            // A failed check changes nothing a resting state vouches for (a staged slot
            // stays staged); an interrupted attempt ends in failed.
            Err(e) if is_resting(&prev) => {
                sf.failures += 1;
                return Err(e);
            }
            Err(e) => {
                sf.apply(Event::CheckStarted)?;
                return Err(e);
            }
        };
        report.choice = choice.clone();
        let version = match (&prev, choice) {
            // Already staged: nothing to write again.
            (
                State::Staged {
                    version: staged,
                    slot,
                },
                Choice::Update { version },
            ) if *staged == version => {
                report.slot = Some(*slot);
                if self.cfg.strategy == Strategy::Kexec {
                    report.kexec = Some(stage::kexec_plan(
                        &self.disk,
                        self.running.slot,
                        *slot,
                        &version,
                    )?);
                }
                return Ok(());
            }
            (_, Choice::Update { version }) => version,
            // Resting states stay as they are; an interrupted attempt ends in Idle.
            (State::Idle | State::Committed { .. } | State::Staged { .. }, _) => return Ok(()),
            _ => {
                sf.apply(Event::CheckStarted)?;
                sf.apply(Event::NoUpdate)?;
                return Ok(());
            }
        };
        sf.apply(Event::CheckStarted)?;
        sf.save(&self.cfg.state_dir)?;
        let manifest = self.reachable(&channel, &version)?;
        let version = manifest.version.clone();
        if report.choice
            != (Choice::Update {
                version: version.clone(),
            })
        {
            tracing::info!(
                "{} is not reachable from {} in one step; going to {version} first",
                report_version(&report.choice),
                self.running.version
            );
            report.choice = Choice::Update {
                version: version.clone(),
            };
        }
        sf.apply(Event::UpdateFound {
            version: version.clone(),
        })?;
        sf.save(&self.cfg.state_dir)?;
        let slot = self.inactive();
        report.slot = Some(slot);

        // Before the first byte: the slot must not be bootable.
        stage::invalidate_slot(&self.disk, slot)?;
        failpoint::hit("install.invalidated");

        let fetcher = Fetcher::new(&self.cfg.channel_url)?;
        // Progress for readers without a daemon (`imgupdate status`): every 5 %, atomically.
        let progress_path = self.cfg.state_dir.join(PROGRESS_FILE);
        let mut last_step = u64::MAX;
        let mut tee = |done: u64, total: u64| {
            progress(done, total);
            let step = (done * 20).checked_div(total).unwrap_or(0);
            if step != last_step {
                last_step = step;
                let body = serde_json::json!({ "version": version, "done": done, "total": total });
                if let Err(e) =
                    crate::state::write_atomic(&progress_path, body.to_string().as_bytes())
                {
                    tracing::warn!("writing {}: {e:#}", progress_path.display());
                }
            }
        };
        let used = self.write_slot(&channel, &fetcher, &manifest, method, &mut tee, report)?;
        let _ = std::fs::remove_file(&progress_path);
        report.method = Some(used);
        sf.apply(Event::Written)?;
        sf.save(&self.cfg.state_dir)?;

        // After the last byte: the whole slot range against the signed sha256.
        let got = self.disk.hash_slot(slot, manifest.image.size)?;
        if got != manifest.image.sha256 {
            return Err(UpdateError::SlotMismatch {
                slot,
                version,
                got,
                want: manifest.image.sha256.clone(),
            });
        }
        failpoint::hit("install.verified");
        match self.cfg.strategy {
            Strategy::Reboot => {
                stage::stage_for_reboot(
                    &self.disk,
                    self.running.slot,
                    slot,
                    &version,
                    manifest.image.size,
                )?;
            }
            Strategy::Kexec => {
                report.kexec = Some(stage::stage_for_kexec(
                    &self.disk,
                    self.running.slot,
                    slot,
                    &version,
                    manifest.image.size,
                )?);
            }
        }
        sf.apply(Event::Staged { slot })?;
        sf.save(&self.cfg.state_dir)?;
        // The download served its purpose; keep the state dir small.
        crate::fetch::prune(&self.downloads(), &[])?;
        Ok(())
    }

    /// The manifest of `goal`, or, when `goal` requires a newer running version
    /// (`min_update_from`), of the newest release between the running version and `goal`
    /// that this node may install directly (a stepping stone).
    fn reachable(&self, channel: &Channel, goal: &str) -> Result<ReleaseManifest, UpdateError> {
        let running = &self.running.version;
        let allows = |m: &ReleaseManifest| {
            m.min_update_from
                .as_deref()
                .map_or(true, |min| compare_versions(running, min) != Ordering::Less)
        };
        let m = channel.release(goal)?;
        if allows(&m) {
            return Ok(m);
        }
        let mut between: Vec<&str> = channel
            .index()
            .releases
            .iter()
            .map(|r| r.version.as_str())
            .filter(|v| {
                compare_versions(v, running) == Ordering::Greater
                    && compare_versions(v, goal) == Ordering::Less
            })
            .collect();
        between.sort_by(|a, b| compare_versions(b, a));
        for v in between {
            let m = channel.release(v)?;
            if allows(&m) {
                return Ok(m);
            }
        }
        Err(UpdateError::NotPublished(format!(
            "a release that {running} may update to on the way to {goal} (min_update_from {})",
            m.min_update_from.as_deref().unwrap_or("?")
        )))
    }

    fn write_slot(
        &self,
        channel: &Channel,
        fetcher: &Fetcher,
        manifest: &ReleaseManifest,
        method: Method,
        progress: Progress<'_>,
        report: &mut UpdateReport,
    ) -> Result<Method, UpdateError> {
        let delta = manifest
            .deltas
            .iter()
            .find(|d| d.from_version == self.running.version);
        if matches!(method, Method::Auto | Method::Delta) {
            match delta {
                Some(d) => match self
                    .write_by_delta(channel, fetcher, manifest, &d.target, progress, report)
                {
                    Ok(()) => return Ok(Method::Delta),
                    Err(e) if method == Method::Auto && fallback_ok(&e) => {
                        tracing::warn!("delta failed ({e}); falling back");
                    }
                    Err(e) => return Err(e),
                },
                None if method == Method::Delta => {
                    return Err(UpdateError::NotPublished(format!(
                        "delta {} -> {}",
                        self.running.version, manifest.version
                    )))
                }
                None => {}
            }
        }
        if matches!(method, Method::Auto | Method::Chunks) {
            match self.write_by_chunks(channel, fetcher, manifest, progress, report) {
                Ok(()) => return Ok(Method::Chunks),
                // A server without Range support serves the full image still.
                Err(e @ UpdateError::Fetch(FetchError::PieceRangeIgnored { .. }))
                    if method == Method::Auto =>
                {
                    tracing::warn!("{e}; falling back to the full image");
                }
                Err(e) if method == Method::Auto && fallback_ok(&e) => {
                    tracing::warn!("chunked install failed ({e}); falling back to the full image");
                }
                Err(e) => return Err(e),
            }
        }
        self.write_full(channel, fetcher, manifest, progress, report)?;
        Ok(Method::Full)
    }

    fn fetch(
        &self,
        channel: &Channel,
        fetcher: &Fetcher,
        target: &str,
        report: &mut UpdateReport,
    ) -> Result<PathBuf, UpdateError> {
        let (length, sha256) = channel.target_digest(target)?;
        let t = Expected {
            name: target.to_string(),
            length,
            sha256,
        };
        let (path, fetched) = fetcher.fetch(&t, &self.downloads(), &mut |done, total| {
            tracing::debug!("{target}: {done}/{total}");
        })?;
        report.bytes_fetched += fetched;
        Ok(path)
    }

    fn slot_writer<'p>(
        &self,
        size: u64,
        progress: Progress<'p>,
    ) -> Result<SlotWriter<'p>, UpdateError> {
        let slot = self.inactive();
        let (_, part_size) = self
            .disk
            .range(imgformat::layout::PartitionRole::Root(slot))?;
        if size > part_size {
            return Err(anyhow::anyhow!(
                "the image ({size} bytes) is larger than slot {slot} ({part_size} bytes)"
            )
            .into());
        }
        let mut inner = self.disk.open_slot_for_write(slot, self.running.slot)?;
        inner.seek(SeekFrom::Start(0)).context("seeking the slot")?;
        Ok(SlotWriter {
            inner,
            written: 0,
            total: size,
            progress,
        })
    }

    /// Roll back: drop a staged update, or mark the trial/committed slot bad so the
    /// firmware boots the other one. Issue 6 performs the reboot.
    pub fn rollback(&self) -> Result<State, UpdateError> {
        let _lock = self.lock()?;
        self.rollback_locked()
    }

    /// [`Updater::rollback`] for a caller that holds the state directory lock.
    pub fn rollback_locked(&self) -> Result<State, UpdateError> {
        let mut sf = self.start()?;
        let slot = match &sf.state {
            State::Staged { slot, .. }
            | State::Trial { slot, .. }
            | State::Committed { slot, .. } => *slot,
            other => {
                return Err(IllegalTransition {
                    state: other.name().to_string(),
                    event: Event::RollbackRequested.name().to_string(),
                }
                .into())
            }
        };
        let version = version_of(&sf.state);
        sf.apply(Event::RollbackRequested)?;
        match &sf.state {
            State::Idle => {
                stage::invalidate_slot(&self.disk, slot)?;
            }
            _ => {
                if !stage::is_bootable(&self.disk, !slot)? {
                    return Err(anyhow::anyhow!(
                        "slot {} has no good boot entry to roll back to",
                        !slot
                    )
                    .into());
                }
                stage::mark_bad(&self.disk, slot)?;
                if let Some(v) = version {
                    remember_failed(&mut sf, &v);
                }
            }
        }
        sf.save(&self.cfg.state_dir)?;
        Ok(sf.state)
    }
}

fn report_version(c: &Choice) -> &str {
    match c {
        Choice::Update { version }
        | Choice::Refused { version }
        | Choice::PinnedMissing { version } => version,
        Choice::UpToDate => "",
    }
}

/// States a failed check leaves alone.
fn is_resting(s: &State) -> bool {
    matches!(
        s,
        State::Idle | State::Committed { .. } | State::Staged { .. }
    )
}

fn fallback_ok(e: &UpdateError) -> bool {
    matches!(
        e,
        UpdateError::Delta(_) | UpdateError::Mismatch(_) | UpdateError::NotPublished(_)
    )
}

fn version_of(s: &State) -> Option<String> {
    match s {
        State::Downloading { version, .. }
        | State::Verifying { version }
        | State::Staged { version, .. }
        | State::Locking { version, .. }
        | State::Draining { version, .. }
        | State::Rebooting { version, .. }
        | State::Trial { version, .. }
        | State::Committed { version, .. }
        | State::RollingBack { version, .. } => Some(version.clone()),
        _ => None,
    }
}

fn remember_failed(sf: &mut StateFile, version: &str) {
    if !sf.failed_versions.iter().any(|v| v == version) {
        sf.failed_versions.push(version.to_string());
    }
}

struct Both<'a>(&'a dyn RefusedVersions, &'a dyn RefusedVersions);

impl RefusedVersions for Both<'_> {
    fn is_refused(&self, version: &str) -> bool {
        self.0.is_refused(version) || self.1.is_refused(version)
    }
}

/// A file path in the downloads directory, for tests.
pub fn downloads_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("downloads")
}

#[cfg(test)]
mod tests;
