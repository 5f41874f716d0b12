//! The cluster reboot lock: a counting semaphore that lets at most N nodes of a group
//! reboot at once, with backends chosen in the updater's configuration.

pub mod kubernetes;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeIdentity {
    pub id: String,
    pub group: String,
}
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
#[async_trait::async_trait]
pub trait RebootLock: Send + Sync {
    async fn try_acquire(&self) -> Result<bool, LockError>;
    async fn renew(&self) -> Result<(), LockError>;
    async fn release(&self) -> Result<(), LockError>;
    async fn holders(&self) -> Result<Vec<String>, LockError>;
    async fn mark_release_failed(&self, version: &str, reason: &str) -> Result<(), LockError>;
    async fn failed_releases(&self) -> Result<Vec<FailedRelease>, LockError>;
}
