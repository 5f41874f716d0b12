//! The cluster-wide reboot lock: a counting semaphore with N slots per group, shared by
//! every backend (FleetLock, etcd, Kubernetes Leases). A backend must never let more
//! than N nodes hold a slot, and must never block the cluster forever when a holder
//! dies (TTL or fencing). This module owns the trait and the shared types only.

pub mod etcd;
pub mod fleetlock;
pub mod kubernetes;

use std::sync::Arc;
use std::time::Duration;

/// Who is asking: the node's id and the lock group (e.g. "default", "workers").
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeIdentity {
    pub id: String,
    pub group: String,
}

/// A release recorded as failed by some node.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FailedRelease {
    pub version: String,
    pub node: String,
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("lock service unreachable: {0}")]
    Unreachable(String),
    #[error("lock service refused: {0}")]
    Refused(String),
    #[error("conflict, try again: {0}")]
    Conflict(String),
    #[error("lock protocol error: {0}")]
    Protocol(String),
}

/// A cluster-wide reboot lock with N slots (a counting semaphore). Locks expire or are
/// fenced: a node that dies holding one does not block the cluster forever.
#[async_trait::async_trait]
pub trait RebootLock: Send + Sync {
    /// Take one slot for this node; Ok(false) when all slots are held by others.
    /// Idempotent: a node that already holds a slot gets Ok(true) (and a renewal).
    async fn try_acquire(&self) -> Result<bool, LockError>;
    /// Keep a held slot alive (TTL backends); a no-op where the protocol has no TTL.
    async fn renew(&self) -> Result<(), LockError>;
    /// Give the slot back; releasing a slot not held is Ok.
    async fn release(&self) -> Result<(), LockError>;
    /// Current holders' node ids.
    async fn holders(&self) -> Result<Vec<String>, LockError>;
    /// Record, where every node sees it, that `version` failed its health checks here.
    async fn mark_release_failed(&self, version: &str, reason: &str) -> Result<(), LockError>;
    /// Versions recorded as failed by any node of the group.
    async fn failed_releases(&self) -> Result<Vec<FailedRelease>, LockError>;
}

/// Renew `lock` every `every` in a task until [`Renewal::stop`] is called or a renewal
/// fails (lost slot, `max_hold` reached, service gone); the task's result says which.
/// The updater runs this between taking the lock and releasing it.
pub fn spawn_renewal(lock: Arc<dyn RebootLock>, every: Duration) -> Renewal {
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = &mut stop_rx => return Ok(()),
                _ = tokio::time::sleep(every) => {}
            }
            if let Err(err) = lock.renew().await {
                tracing::warn!("reboot lock renewal failed: {err}");
                return Err(err);
            }
        }
    });
    Renewal {
        stop: Some(stop_tx),
        task,
    }
}

/// A running renewal; dropping it stops renewing.
#[derive(Debug)]
pub struct Renewal {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), LockError>>,
}

impl Renewal {
    /// Stop renewing; returns the error that ended the renewals early, if any.
    pub async fn stop(mut self) -> Result<(), LockError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match (&mut self.task).await {
            Ok(result) => result,
            Err(e) => Err(LockError::Protocol(format!("renewal task: {e}"))),
        }
    }

    /// Whether renewals have ended (by error).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

impl Drop for Renewal {
    fn drop(&mut self) {
        self.task.abort();
    }
}
