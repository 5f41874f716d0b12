//! FleetLock client, speaking the protocol exactly as Zincati does
//! (<https://coreos.github.io/zincati/development/fleetlock/protocol/>): `POST
//! {base}/v1/pre-reboot` to lock (recursive, owned) and `POST {base}/v1/steady-state`
//! to unlock, each with the header `fleet-lock-protocol: true` and the body
//! `{"client_params":{"id":...,"group":...}}`; 200 is success, anything else a failure
//! with an optional `{"kind","value"}` body.
//!
//! FleetLock has no TTL and no failed-release record. We handle that as follows:
//! - `renew` repeats `pre-reboot`: the protocol makes it a no-op for a holder, and our
//!   own server ([`crate::fleetlock_server`]) treats it as a TTL renewal. A renewal that
//!   finds the semaphore full means the slot was lost (expired): `Conflict`.
//! - Failed releases, holders: extension endpoints under `{base}/v1/imgbuild/`, only on
//!   our server. A third-party server answers 404: `mark_release_failed` logs a warning
//!   and succeeds (the node itself still refuses the version), `failed_releases`
//!   returns an empty list with a warning, `holders` is a `Protocol` error (unknown is
//!   not "nobody").
//!
//! This module never retries on its own; the caller decides when to ask again.

use std::time::Duration;

use reqwest::StatusCode;

use super::{FailedRelease, LockError, NodeIdentity, RebootLock};
use crate::fleetlock_server::{
    paths, ClientParams, ErrorBody, FailedBody, HoldersBody, RequestBody, PROTOCOL_HEADER,
};

/// A FleetLock client for one node.
#[derive(Debug, Clone)]
pub struct FleetLockClient {
    base: String,
    identity: NodeIdentity,
    http: reqwest::Client,
}

/// How a non-200 answer reads.
#[derive(Debug)]
struct Failure {
    status: StatusCode,
    body: Option<ErrorBody>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.body {
            Some(b) => write!(f, "HTTP {}: {} ({})", self.status.as_u16(), b.value, b.kind),
            None => write!(f, "HTTP {}", self.status.as_u16()),
        }
    }
}

impl Failure {
    /// Whether the server says all slots are taken. The spec names the kind
    /// `failed_lock_semaphore_full` only as an example, so 409/423 count too.
    fn is_full(&self) -> bool {
        matches!(self.status, StatusCode::CONFLICT | StatusCode::LOCKED)
            || self
                .body
                .as_ref()
                .is_some_and(|b| b.kind.contains("semaphore_full"))
    }
}

impl FleetLockClient {
    /// A client for `base` (e.g. `http://fleetlock.example/base`); `timeout` bounds each
    /// request.
    pub fn new(base: &str, identity: NodeIdentity, timeout: Duration) -> Result<Self, LockError> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            // The header exists to catch redirected requests; following redirects
            // would defeat it.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| LockError::Protocol(format!("building HTTP client: {e}")))?;
        Ok(FleetLockClient {
            base: base.trim_end_matches('/').to_string(),
            identity,
            http,
        })
    }

    fn body(&self) -> RequestBody {
        RequestBody {
            client_params: ClientParams {
                id: self.identity.id.clone(),
                group: self.identity.group.clone(),
            },
            version: None,
            reason: None,
        }
    }

    /// POST `body` to `path`; Ok(Ok(bytes)) on 200, Ok(Err(failure)) on other statuses.
    async fn post(
        &self,
        path: &str,
        body: &RequestBody,
    ) -> Result<Result<Vec<u8>, Failure>, LockError> {
        let url = format!("{}{}", self.base, path);
        let response = self
            .http
            .post(&url)
            .header(PROTOCOL_HEADER, "true")
            .json(body)
            .send()
            .await
            .map_err(|e| LockError::Unreachable(format!("POST {url}: {e}")))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| LockError::Unreachable(format!("POST {url}: reading answer: {e}")))?;
        if status == StatusCode::OK {
            return Ok(Ok(bytes.to_vec()));
        }
        let body = serde_json::from_slice::<ErrorBody>(&bytes).ok();
        Ok(Err(Failure { status, body }))
    }

    fn failed(&self, path: &str, failure: Failure) -> LockError {
        let msg = format!("{}{path}: {failure}", self.base);
        if failure.status.is_server_error() {
            LockError::Unreachable(msg)
        } else {
            LockError::Refused(msg)
        }
    }
}

#[async_trait::async_trait]
impl RebootLock for FleetLockClient {
    async fn try_acquire(&self) -> Result<bool, LockError> {
        match self.post(paths::PRE_REBOOT, &self.body()).await? {
            Ok(_) => Ok(true),
            Err(f) if f.is_full() => {
                tracing::info!(id = %self.identity.id, group = %self.identity.group, "no reboot slot: {f}");
                Ok(false)
            }
            Err(f) => Err(self.failed(paths::PRE_REBOOT, f)),
        }
    }

    async fn renew(&self) -> Result<(), LockError> {
        match self.post(paths::PRE_REBOOT, &self.body()).await? {
            Ok(_) => Ok(()),
            Err(f) if f.is_full() => Err(LockError::Conflict(format!(
                "reboot slot lost (expired and taken by others): {f}"
            ))),
            Err(f) => Err(self.failed(paths::PRE_REBOOT, f)),
        }
    }

    async fn release(&self) -> Result<(), LockError> {
        match self.post(paths::STEADY_STATE, &self.body()).await? {
            Ok(_) => Ok(()),
            Err(f) => Err(self.failed(paths::STEADY_STATE, f)),
        }
    }

    async fn holders(&self) -> Result<Vec<String>, LockError> {
        match self.post(paths::HOLDERS, &self.body()).await? {
            Ok(bytes) => serde_json::from_slice::<HoldersBody>(&bytes)
                .map(|b| b.holders)
                .map_err(|e| LockError::Protocol(format!("holders answer: {e}"))),
            Err(f) if f.status == StatusCode::NOT_FOUND => Err(LockError::Protocol(format!(
                "{}: this FleetLock server cannot list holders (imgbuild extension missing)",
                self.base
            ))),
            Err(f) => Err(self.failed(paths::HOLDERS, f)),
        }
    }

    async fn mark_release_failed(&self, version: &str, reason: &str) -> Result<(), LockError> {
        let mut body = self.body();
        body.version = Some(version.to_string());
        body.reason = Some(reason.to_string());
        match self.post(paths::MARK_FAILED, &body).await? {
            Ok(_) => Ok(()),
            Err(f) if f.status == StatusCode::NOT_FOUND => {
                tracing::warn!(
                    version,
                    "FleetLock server {} has no failed-release record (imgbuild extension); \
                     other nodes will not learn that this release failed here",
                    self.base
                );
                Ok(())
            }
            Err(f) => Err(self.failed(paths::MARK_FAILED, f)),
        }
    }

    async fn failed_releases(&self) -> Result<Vec<FailedRelease>, LockError> {
        match self.post(paths::FAILED, &self.body()).await? {
            Ok(bytes) => serde_json::from_slice::<FailedBody>(&bytes)
                .map(|b| b.failed)
                .map_err(|e| LockError::Protocol(format!("failed-release answer: {e}"))),
            Err(f) if f.status == StatusCode::NOT_FOUND => {
                tracing::warn!(
                    "FleetLock server {} has no failed-release record (imgbuild extension); \
                     assuming none",
                    self.base
                );
                Ok(Vec::new())
            }
            Err(f) => Err(self.failed(paths::FAILED, f)),
        }
    }
}
