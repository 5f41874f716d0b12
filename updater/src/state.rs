//! The update flow as a state machine, and the one state file that records it.
//!
//! This module owns [`State`], [`Event`], the pure transition function [`next`] and the
//! on-disk [`StateFile`] (`<state_dir>/state.json`, written atomically: temp file, fsync,
//! rename, fsync of the directory). [`next`] does not write to disk; callers apply events
//! in memory and commit with [`StateFile::save`]. This module must never perform the
//! work a state describes (fetching, writing slots, rebooting): it only says what may
//! happen next. The transition table is in the crate documentation.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use imgformat::layout::Slot;
use serde::{Deserialize, Serialize};

use crate::config::Strategy;

/// Where the flow is. Each variant names the version and slot it concerns, so the record
/// alone says what the next step is after a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum State {
    /// Nothing in flight; the running slot is the only bootable one we vouch for.
    Idle,
    /// Loading the channel and choosing a version.
    Checking,
    /// Writing `version` into the inactive slot (download and write are one pass). The
    /// inactive slot's boot entry is already gone.
    Downloading {
        version: String,
        done: u64,
        total: u64,
    },
    /// Hashing the whole inactive slot against the signed image sha256.
    Verifying { version: String },
    /// The slot holds `version`, verified; kernel, initrd (and for `reboot`, the entry
    /// with boot counting) are on the ESP.
    Staged { version: String, slot: Slot },
    /// Waiting for the cluster reboot lock (issue 6).
    Locking { version: String, slot: Slot },
    /// Cordoning and draining the node (issue 6).
    Draining { version: String, slot: Slot },
    /// kexec or reboot requested; the next start tells whether it happened.
    Rebooting {
        version: String,
        slot: Slot,
        strategy: Strategy,
    },
    /// Running `version` from `slot`; health checks decide.
    Trial { version: String, slot: Slot },
    /// `version` on `slot` passed its checks and is the default.
    Committed { version: String, slot: Slot },
    /// `version` on `slot` was rejected; going back to the other slot.
    RollingBack { version: String, slot: Slot },
    /// The last attempt failed; `reason` says why. A new check may start.
    Failed { reason: String },
}

/// What happened. Events come from the updater's own steps, from issue 6's lock, drain
/// and health layers, and from [`Event::Booted`], fed once at every start with what
/// actually runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A check of the channel begins.
    CheckStarted,
    /// Nothing newer (or allowed) is published.
    NoUpdate,
    /// `version` is the one to install.
    UpdateFound { version: String },
    /// Bytes written into the slot so far.
    Progress { done: u64, total: u64 },
    /// The last byte is in the slot.
    Written,
    /// The whole slot hashed to the signed sha256 and was staged in `slot`.
    Staged { slot: Slot },
    /// The lock layer starts asking for the reboot lock.
    LockRequested,
    /// The reboot lock is held.
    LockAcquired,
    /// The node is drained; reboot with `strategy`.
    Drained { strategy: Strategy },
    /// At start: this version runs from this slot.
    Booted { version: String, slot: Slot },
    /// All health checks passed.
    HealthPassed,
    /// A health check failed.
    HealthFailed { reason: String },
    /// An operator asked to roll back (or to drop a staged update).
    RollbackRequested,
    /// A step failed.
    Error { reason: String },
}

/// An event that the current state does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{event} is not allowed in state {state}")]
pub struct IllegalTransition {
    pub state: String,
    pub event: String,
}

impl State {
    /// The state's name as in the table (`downloading`, `staged`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            State::Idle => "idle",
            State::Checking => "checking",
            State::Downloading { .. } => "downloading",
            State::Verifying { .. } => "verifying",
            State::Staged { .. } => "staged",
            State::Locking { .. } => "locking",
            State::Draining { .. } => "draining",
            State::Rebooting { .. } => "rebooting",
            State::Trial { .. } => "trial",
            State::Committed { .. } => "committed",
            State::RollingBack { .. } => "rolling_back",
            State::Failed { .. } => "failed",
        }
    }

    /// States in which the updater may start writing the inactive slot again: nothing
    /// depends on that slot (a crashed download or verification restarts from here too).
    pub fn may_check(&self) -> bool {
        matches!(
            self,
            State::Idle
                | State::Committed { .. }
                | State::Failed { .. }
                | State::Staged { .. }
                | State::Checking
                | State::Downloading { .. }
                | State::Verifying { .. }
        )
    }
}

impl Event {
    /// The event's name as in the table.
    pub fn name(&self) -> &'static str {
        match self {
            Event::CheckStarted => "check_started",
            Event::NoUpdate => "no_update",
            Event::UpdateFound { .. } => "update_found",
            Event::Progress { .. } => "progress",
            Event::Written => "written",
            Event::Staged { .. } => "staged",
            Event::LockRequested => "lock_requested",
            Event::LockAcquired => "lock_acquired",
            Event::Drained { .. } => "drained",
            Event::Booted { .. } => "booted",
            Event::HealthPassed => "health_passed",
            Event::HealthFailed { .. } => "health_failed",
            Event::RollbackRequested => "rollback_requested",
            Event::Error { .. } => "error",
        }
    }
}

/// The transition function: pure, total, never panics. See the table in the crate docs.
pub fn next(state: &State, event: &Event) -> Result<State, IllegalTransition> {
    use Event as E;
    use State as S;
    let illegal = || IllegalTransition {
        state: state.name().to_string(),
        event: event.name().to_string(),
    };
    let out = match (state, event) {
        // A check may begin whenever nothing depends on the inactive slot; an interrupted
        // check, download or verification is redone (the download resumes from its journal).
        (s, E::CheckStarted) if s.may_check() => S::Checking,
        (S::Checking, E::NoUpdate) => S::Idle,
        (S::Checking, E::UpdateFound { version }) => S::Downloading {
            version: version.clone(),
            done: 0,
            total: 0,
        },
        (S::Downloading { version, .. }, E::Progress { done, total }) => S::Downloading {
            version: version.clone(),
            done: *done,
            total: *total,
        },
        (S::Downloading { version, .. }, E::Written) => S::Verifying {
            version: version.clone(),
        },
        (S::Verifying { version }, E::Staged { slot }) => S::Staged {
            version: version.clone(),
            slot: *slot,
        },
        (S::Staged { version, slot }, E::LockRequested) => S::Locking {
            version: version.clone(),
            slot: *slot,
        },
        (S::Locking { version, slot }, E::LockAcquired) => S::Draining {
            version: version.clone(),
            slot: *slot,
        },
        (S::Draining { version, slot }, E::Drained { strategy }) => S::Rebooting {
            version: version.clone(),
            slot: *slot,
            strategy: *strategy,
        },
        // What actually booted decides (brupop: "reboot never completes successfully").
        (
            S::Rebooting { version, slot, .. } | S::Trial { version, slot },
            E::Booted {
                version: running,
                slot: booted,
            },
        ) => {
            if running == version && booted == slot {
                S::Trial {
                    version: version.clone(),
                    slot: *slot,
                }
            } else {
                S::Failed {
                    reason: format!(
                        "expected {version} on slot {slot}, but {running} on slot {booted} booted"
                    ),
                }
            }
        }
        (
            S::RollingBack { version, slot },
            E::Booted {
                version: running,
                slot: booted,
            },
        ) => {
            if booted == slot {
                state.clone()
            } else {
                S::Failed {
                    reason: format!("{version} rolled back; {running} runs on slot {booted}"),
                }
            }
        }
        // Booting does not change states that do not wait for a boot.
        (s, E::Booted { .. }) => s.clone(),
        (S::Trial { version, slot }, E::HealthPassed) => S::Committed {
            version: version.clone(),
            slot: *slot,
        },
        (S::Trial { version, slot }, E::HealthFailed { .. }) => S::RollingBack {
            version: version.clone(),
            slot: *slot,
        },
        (S::Staged { .. }, E::RollbackRequested) => S::Idle,
        (S::Trial { version, slot } | S::Committed { version, slot }, E::RollbackRequested) => {
            S::RollingBack {
                version: version.clone(),
                slot: *slot,
            }
        }
        (
            S::Checking
            | S::Downloading { .. }
            | S::Verifying { .. }
            | S::Locking { .. }
            | S::Draining { .. }
            | S::Rebooting { .. },
            E::Error { reason },
        ) => S::Failed {
            reason: reason.clone(),
        },
        _ => return Err(illegal()),
    };
    Ok(out)
}

/// Schema version of the state file.
pub const STATE_SCHEMA: u32 = 1;
/// File name of the state file inside the state directory.
pub const STATE_FILE: &str = "state.json";
/// History entries kept.
pub const HISTORY_LEN: usize = 200;

/// One recorded transition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// RFC 3339 UTC.
    pub time: String,
    pub from: String,
    pub event: Event,
    pub to: State,
}

/// The single source of truth on the node, `<state_dir>/state.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateFile {
    pub schema: u32,
    pub state: State,
    /// Versions that failed here; never installed again (issue 6 adds the cluster-wide list).
    #[serde(default)]
    pub failed_versions: Vec<String>,
    /// RFC 3339 time of the last completed check.
    #[serde(default)]
    pub last_check: Option<String>,
    /// Bytes downloaded over the lifetime of the node.
    #[serde(default)]
    pub bytes_fetched: u64,
    /// Failed attempts over the lifetime of the node.
    #[serde(default)]
    pub failures: u64,
    #[serde(default)]
    pub history: Vec<HistoryEntry>,
}

impl Default for StateFile {
    fn default() -> Self {
        StateFile {
            schema: STATE_SCHEMA,
            state: State::Idle,
            failed_versions: Vec::new(),
            last_check: None,
            bytes_fetched: 0,
            failures: 0,
            history: Vec::new(),
        }
    }
}

/// Now, RFC 3339 UTC, seconds.
pub fn now() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Second)
        .map_or_else(|_| jiff::Timestamp::now().to_string(), |t| t.to_string())
}

impl StateFile {
    /// The state file's path in `dir`.
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(STATE_FILE)
    }

    /// Read the state file in `dir`; a missing file is a fresh [`StateFile::default`].
    pub fn load(dir: &Path) -> Result<StateFile> {
        let path = Self::path(dir);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("parsing the state file {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(StateFile::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Apply `event` in memory (no disk write), recording it in the history.
    pub fn apply(&mut self, event: Event) -> Result<&State, IllegalTransition> {
        let to = next(&self.state, &event)?;
        if let State::Failed { .. } = to {
            if !matches!(self.state, State::Failed { .. }) {
                self.failures += 1;
            }
        }
        // Progress ticks would drown the history; the state itself carries them.
        if !matches!(event, Event::Progress { .. })
            && (to != self.state || !matches!(event, Event::Booted { .. }))
        {
            self.history.push(HistoryEntry {
                time: now(),
                from: self.state.name().to_string(),
                event,
                to: to.clone(),
            });
            if self.history.len() > HISTORY_LEN {
                let extra = self.history.len() - HISTORY_LEN;
                self.history.drain(..extra);
            }
        }
        self.state = to;
        Ok(&self.state)
    }

    /// Commit to `<dir>/state.json` atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(self).context("serialising the state")?;
        write_atomic(&Self::path(dir), &bytes)
    }
}

/// Write `bytes` to `path` so that a crash leaves the old or the new file, never a mix:
/// temp file in the same directory, fsync, rename, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut f =
            fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.sync_all()
            .with_context(|| format!("syncing {}", tmp.display()))?;
    }
    crate::failpoint::hit("state.rename");
    fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    sync_dir(dir)
}

/// fsync a directory so a rename in it is durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing directory {}", dir.display()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
