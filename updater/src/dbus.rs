//! The D-Bus API on the system bus: `org.imgbuild.Update1` at `/org/imgbuild/Update1`.
//!
//! This module owns the interface (methods `Status`, `Check`, `Update`, `Rollback`, all
//! returning JSON strings; signal `Progress(state, done, total)`), the mapping of
//! [`UpdateError`] to D-Bus error names (`org.imgbuild.Update1.Error.*`), and the client
//! calls the CLI makes. Access control is the bus policy's job
//! (`dist/org.imgbuild.Update1.conf`: root only). It must never do update work itself:
//! every method calls into [`crate::install::Updater`], and `Update` runs it on a worker
//! thread so the bus stays responsive.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::Context;
use serde::Serialize;

use crate::config::Config;
use crate::install::{LocalRefusals, Method, UpdateError, Updater};
use crate::slots::Running;
use crate::state::{HistoryEntry, State, StateFile};

pub const BUS_NAME: &str = "org.imgbuild.Update1";
pub const OBJECT_PATH: &str = "/org/imgbuild/Update1";
pub const INTERFACE: &str = "org.imgbuild.Update1";

/// Errors as they appear on the bus.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.imgbuild.Update1.Error")]
pub enum Update1Error {
    #[zbus(error)]
    ZBus(zbus::Error),
    IllegalTransition(String),
    Channel(String),
    Download(String),
    Verification(String),
    NotPublished(String),
    Busy(String),
    Failed(String),
}

impl From<UpdateError> for Update1Error {
    fn from(e: UpdateError) -> Self {
        let msg = format!("{e:#}");
        match e {
            UpdateError::Illegal(_) => Update1Error::IllegalTransition(msg),
            UpdateError::Channel(_) => Update1Error::Channel(msg),
            UpdateError::Fetch(_) => Update1Error::Download(msg),
            UpdateError::Delta(_) | UpdateError::Mismatch(_) | UpdateError::SlotMismatch { .. } => {
                Update1Error::Verification(msg)
            }
            UpdateError::NotPublished(_) => Update1Error::NotPublished(msg),
            UpdateError::Busy(_) => Update1Error::Busy(msg),
            UpdateError::Other(_) => Update1Error::Failed(msg),
        }
    }
}

/// What `status` reports (CLI `--json` and D-Bus `Status`).
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub running: Running,
    pub state: State,
    pub last_check: Option<String>,
    pub failed_versions: Vec<String>,
    pub bytes_fetched: u64,
    pub failures: u64,
    /// Bytes written into the slot / image size, while an update runs in the daemon.
    pub progress: Option<(u64, u64)>,
    /// Whether a daemon answered (false: read from the state file directly).
    pub daemon: bool,
}

impl Status {
    /// Status read directly from the state file.
    pub fn read(cfg: &Config) -> anyhow::Result<Status> {
        let running = crate::slots::running(&cfg.os_release, &cfg.kernel_cmdline)?;
        let sf = StateFile::load(&cfg.state_dir)?;
        let mut status = Status::from_parts(running, &sf);
        if let State::Downloading { .. } = sf.state {
            status.progress = std::fs::read(cfg.state_dir.join(crate::install::PROGRESS_FILE))
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .and_then(|v| Some((v["done"].as_u64()?, v["total"].as_u64()?)));
        }
        Ok(status)
    }

    fn from_parts(running: Running, sf: &StateFile) -> Status {
        Status {
            running,
            state: sf.state.clone(),
            last_check: sf.last_check.clone(),
            failed_versions: sf.failed_versions.clone(),
            bytes_fetched: sf.bytes_fetched,
            failures: sf.failures,
            progress: None,
            daemon: false,
        }
    }
}

/// The last `n` history entries.
pub fn history(cfg: &Config, n: usize) -> anyhow::Result<Vec<HistoryEntry>> {
    let sf = StateFile::load(&cfg.state_dir)?;
    let skip = sf.history.len().saturating_sub(n);
    Ok(sf.history[skip..].to_vec())
}

#[derive(Debug, Default)]
struct Shared {
    busy: AtomicBool,
    progress: Mutex<Option<(u64, u64)>>,
    conn: OnceLock<zbus::blocking::Connection>,
}

/// The object served at [`OBJECT_PATH`].
#[derive(Debug, Clone)]
pub struct Service {
    cfg: Config,
    shared: Arc<Shared>,
}

fn json<T: Serialize>(v: &T) -> Result<String, Update1Error> {
    serde_json::to_string(v).map_err(|e| Update1Error::Failed(e.to_string()))
}

impl Service {
    pub fn new(cfg: Config) -> Service {
        Service {
            cfg,
            shared: Arc::default(),
        }
    }

    fn claim(&self) -> Result<BusyGuard, Update1Error> {
        if self.shared.busy.swap(true, Ordering::SeqCst) {
            return Err(Update1Error::Busy("an operation is already running".into()));
        }
        Ok(BusyGuard(self.shared.clone()))
    }

    /// Run an update now on the calling thread (the daemon's timer uses this too),
    /// emitting `Progress` signals when a bus connection is up.
    pub fn run_update(&self) -> Result<crate::install::UpdateReport, UpdateError> {
        let updater = Updater::new(self.cfg.clone())?;
        // Versions failed on other nodes (recorded where the reboot lock lives).
        let refused = crate::agent::cluster_refusals(&self.cfg)?;
        let shared = self.shared.clone();
        let mut last_pct = u64::MAX;
        let mut progress = |done: u64, total: u64| {
            if let Ok(mut p) = shared.progress.lock() {
                *p = Some((done, total));
            }
            let pct = (done * 100).checked_div(total).unwrap_or(0);
            if pct != last_pct {
                last_pct = pct;
                if let Some(conn) = shared.conn.get() {
                    let _ = conn.emit_signal(
                        None::<&str>,
                        OBJECT_PATH,
                        INTERFACE,
                        "Progress",
                        &("downloading", done, total),
                    );
                }
            }
        };
        let result = updater.update(Method::Auto, &refused, &mut progress);
        if let Ok(mut p) = self.shared.progress.lock() {
            *p = None;
        }
        if let Some(conn) = self.shared.conn.get() {
            let state = StateFile::load(&self.cfg.state_dir)
                .map(|s| s.state.name())
                .unwrap_or("failed");
            let _ = conn.emit_signal(
                None::<&str>,
                OBJECT_PATH,
                INTERFACE,
                "Progress",
                &(state, 0u64, 0u64),
            );
        }
        result
    }
}

struct BusyGuard(Arc<Shared>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.busy.store(false, Ordering::SeqCst);
    }
}

#[zbus::interface(name = "org.imgbuild.Update1")]
impl Service {
    /// The updater's status as JSON.
    fn status(&self) -> Result<String, Update1Error> {
        let mut s = Status::read(&self.cfg).map_err(|e| Update1Error::Failed(format!("{e:#}")))?;
        s.daemon = true;
        if let Some(p) = self.shared.progress.lock().ok().and_then(|p| *p) {
            s.progress = Some(p);
        }
        json(&s)
    }

    /// Check the channel; returns the choice as JSON.
    fn check(&self) -> Result<String, Update1Error> {
        let _guard = self.claim()?;
        let updater = Updater::new(self.cfg.clone()).map_err(UpdateError::from)?;
        json(&updater.check(&LocalRefusals::default())?)
    }

    /// Start check + download + install + stage in the background; follow `Progress`
    /// and `Status`.
    fn update(&self) -> Result<String, Update1Error> {
        let guard = self.claim()?;
        let me = self.clone();
        std::thread::spawn(move || {
            let _guard = guard;
            if let Err(e) = me.run_update() {
                tracing::error!("update failed: {e:#}");
            }
        });
        Ok("{\"started\":true}".into())
    }

    /// Drop a staged update or reject the trial/committed slot; returns the new state.
    fn rollback(&self) -> Result<String, Update1Error> {
        let _guard = self.claim()?;
        let updater = Updater::new(self.cfg.clone()).map_err(UpdateError::from)?;
        json(&updater.rollback()?)
    }

    /// `state` (`downloading`, then the state reached), bytes written, image size.
    #[zbus(signal)]
    async fn progress(
        emitter: &zbus::object_server::SignalEmitter<'_>,
        state: &str,
        done: u64,
        total: u64,
    ) -> zbus::Result<()>;
}

fn builder(address: Option<&str>) -> zbus::Result<zbus::blocking::connection::Builder<'static>> {
    match address {
        Some(a) => zbus::blocking::connection::Builder::address(a),
        None => zbus::blocking::connection::Builder::system(),
    }
}

/// Serve `service` on the bus at `address` (default: the system bus) under [`BUS_NAME`].
pub fn serve(
    service: Service,
    address: Option<&str>,
) -> anyhow::Result<zbus::blocking::Connection> {
    let shared = service.shared.clone();
    let conn = builder(address)
        .and_then(|b| b.name(BUS_NAME))
        .and_then(|b| b.serve_at(OBJECT_PATH, service))
        .and_then(|b| b.build())
        .with_context(|| {
            format!(
                "serving {BUS_NAME} on {}",
                address.unwrap_or("the system bus")
            )
        })?;
    let _ = shared.conn.set(conn.clone());
    Ok(conn)
}

/// Call `method` (no arguments, a JSON string back) on the daemon.
pub fn call(address: Option<&str>, method: &str) -> Result<String, zbus::Error> {
    // A daemon that hangs must not hang its clients (`status` falls back to the file).
    let conn = builder(address)?
        .method_timeout(std::time::Duration::from_secs(30))
        .build()?;
    let reply = conn.call_method(Some(BUS_NAME), OBJECT_PATH, Some(INTERFACE), method, &())?;
    reply.body().deserialize::<String>()
}
