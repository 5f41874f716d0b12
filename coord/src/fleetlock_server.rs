//! A small FleetLock server (the protocol Zincati speaks, see
//! <https://coreos.github.io/zincati/development/fleetlock/protocol/>): N slots per
//! group, owned and recursive locks, the `fleet-lock-protocol: true` header and
//! `{"kind","value"}` error bodies. It adds what the protocol lacks, under
//! `/v1/imgbuild/...` so no FleetLock endpoint changes meaning: an optional TTL for
//! holders that never come back to `steady-state` (renewed by a repeated
//! `pre-reboot`), a failed-release record, a holders query and an event history with
//! timestamps that tests and the cluster checks read. It listens on whatever address it
//! is given (127.0.0.1 in tests and for QEMU guests) and keeps everything in memory: it
//! must never be the only copy of anything a node needs after a restart of the server.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::time::Instant;

use crate::lock::FailedRelease;

/// The FleetLock endpoints and our extensions, relative to the base URL.
pub mod paths {
    /// FleetLock `RecursiveLock`.
    pub const PRE_REBOOT: &str = "/v1/pre-reboot";
    /// FleetLock `UnlockIfHeld`.
    pub const STEADY_STATE: &str = "/v1/steady-state";
    /// Extension: current holders of the client's group.
    pub const HOLDERS: &str = "/v1/imgbuild/holders";
    /// Extension: record a failed release for the client's group.
    pub const MARK_FAILED: &str = "/v1/imgbuild/mark-failed";
    /// Extension: list failed releases of the client's group.
    pub const FAILED: &str = "/v1/imgbuild/failed";
    /// Extension (GET, no header needed): the whole event history as JSON.
    pub const HISTORY: &str = "/v1/imgbuild/history";
}

/// The header every FleetLock request must carry, with the value `true`.
pub const PROTOCOL_HEADER: &str = "fleet-lock-protocol";

/// How the server behaves.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Slots per group unless `group_slots` names the group.
    pub slots: usize,
    /// Per-group slot counts.
    pub group_slots: HashMap<String, usize>,
    /// A holder that has not called `pre-reboot` again for this long loses its slot.
    /// `None`: slots are held until `steady-state`, as in plain FleetLock.
    pub ttl: Option<Duration>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            slots: 1,
            group_slots: HashMap::new(),
            ttl: None,
        }
    }
}

/// What happened, as recorded in the history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A slot was newly taken.
    Acquired,
    /// A holder called `pre-reboot` again (recursive lock; renews the TTL).
    Renewed,
    /// All slots were held by others.
    Refused,
    /// A holder called `steady-state`.
    Released,
    /// `steady-state` from a node that held nothing.
    ReleasedNotHeld,
    /// A holder's TTL ran out.
    Expired,
    /// A failed release was recorded.
    MarkedFailed,
}

/// One entry of the history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Wall-clock time the server handled it.
    pub at: Timestamp,
    pub group: String,
    pub id: String,
    pub kind: EventKind,
    /// Holders of the group right after the event.
    pub holders_after: usize,
}

/// A FleetLock error body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub kind: String,
    pub value: String,
}

/// The request body of every endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestBody {
    pub client_params: ClientParams,
    /// Extension fields of `mark-failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `client_params` of the FleetLock body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientParams {
    pub id: String,
    pub group: String,
}

/// Answer of the holders extension.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldersBody {
    pub holders: Vec<String>,
}

/// Answer of the failed-release extension.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedBody {
    pub failed: Vec<FailedRelease>,
}

#[derive(Debug, Default)]
struct State {
    /// group -> holder id -> last lock or renewal.
    holders: HashMap<String, BTreeMap<String, Instant>>,
    /// group -> version -> record (the newest report wins).
    failed: HashMap<String, BTreeMap<String, FailedRelease>>,
    history: Vec<Event>,
}

#[derive(Debug)]
struct Shared {
    config: ServerConfig,
    state: Mutex<State>,
}

/// A running server; dropping it stops accepting connections.
#[derive(Debug)]
pub struct FleetLockServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FleetLockServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FleetLockServer {
    /// Bind `addr` (port 0 for a free port) and serve in a task of the current runtime.
    pub async fn start(addr: SocketAddr, config: ServerConfig) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            config,
            state: Mutex::new(State::default()),
        });
        let serve_shared = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    Err(err) => {
                        // E.g. out of file descriptors: back off instead of spinning.
                        tracing::warn!("fleetlock accept: {err}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let shared = serve_shared.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(handle(&shared, req).await) }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    if let Err(err) = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await
                    {
                        tracing::debug!("fleetlock connection: {err}");
                    }
                });
            }
        });
        Ok(FleetLockServer { addr, shared, task })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL clients use (`http://addr`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A copy of the event history, oldest first.
    pub fn history(&self) -> Vec<Event> {
        self.shared.lock_state().history.clone()
    }

    /// Current holders of `group` (after expiring stale ones).
    pub fn holders(&self, group: &str) -> Vec<String> {
        let mut state = self.shared.lock_state();
        self.shared.expire(&mut state, group);
        holders_of(&state, group)
    }
}

/// The largest number of holders of `group` the history ever shows.
pub fn max_holders(history: &[Event], group: &str) -> usize {
    history
        .iter()
        .filter(|e| e.group == group)
        .map(|e| e.holders_after)
        .max()
        .unwrap_or(0)
}

fn holders_of(state: &State, group: &str) -> Vec<String> {
    state
        .holders
        .get(group)
        .map(|h| h.keys().cloned().collect())
        .unwrap_or_default()
}

impl Shared {
    fn lock_state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the mutex cannot leave the maps half-updated in a way
        // that matters more than losing the server; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn slots(&self, group: &str) -> usize {
        self.config
            .group_slots
            .get(group)
            .copied()
            .unwrap_or(self.config.slots)
    }

    fn expire(&self, state: &mut State, group: &str) {
        let Some(ttl) = self.config.ttl else { return };
        let now = Instant::now();
        let expired: Vec<String> = state
            .holders
            .get(group)
            .map(|h| {
                h.iter()
                    .filter(|(_, at)| now.duration_since(**at) >= ttl)
                    .map(|(id, _)| id.clone())
                    .collect()
            })
            .unwrap_or_default();
        for id in expired {
            if let Some(h) = state.holders.get_mut(group) {
                h.remove(&id);
            }
            tracing::info!(group, id, "fleetlock: holder expired");
            record(state, group, &id, EventKind::Expired);
        }
    }

    fn lock(&self, params: &ClientParams) -> Response<Full<Bytes>> {
        let mut state = self.lock_state();
        self.expire(&mut state, &params.group);
        let slots = self.slots(&params.group);
        let holders = state.holders.entry(params.group.clone()).or_default();
        let kind = if let Some(at) = holders.get_mut(&params.id) {
            *at = Instant::now();
            EventKind::Renewed
        } else if holders.len() < slots {
            holders.insert(params.id.clone(), Instant::now());
            EventKind::Acquired
        } else {
            EventKind::Refused
        };
        record(&mut state, &params.group, &params.id, kind);
        if kind == EventKind::Refused {
            error(
                StatusCode::CONFLICT,
                "failed_lock_semaphore_full",
                "semaphore currently full, all slots are locked already",
            )
        } else {
            ok_empty()
        }
    }

    fn unlock(&self, params: &ClientParams) -> Response<Full<Bytes>> {
        let mut state = self.lock_state();
        self.expire(&mut state, &params.group);
        let held = state
            .holders
            .get_mut(&params.group)
            .and_then(|h| h.remove(&params.id))
            .is_some();
        let kind = if held {
            EventKind::Released
        } else {
            EventKind::ReleasedNotHeld
        };
        record(&mut state, &params.group, &params.id, kind);
        ok_empty()
    }
}

fn record(state: &mut State, group: &str, id: &str, kind: EventKind) {
    let holders_after = state.holders.get(group).map_or(0, |h| h.len());
    state.history.push(Event {
        at: Timestamp::now(),
        group: group.to_string(),
        id: id.to_string(),
        kind,
        holders_after,
    });
}

fn ok_empty() -> Response<Full<Bytes>> {
    json(StatusCode::OK, &serde_json::json!({}))
}

fn json<T: Serialize>(status: StatusCode, body: &T) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(bytes)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

fn error(status: StatusCode, kind: &str, value: &str) -> Response<Full<Bytes>> {
    json(
        status,
        &ErrorBody {
            kind: kind.to_string(),
            value: value.to_string(),
        },
    )
}

/// The group label the spec allows: `^[a-zA-Z0-9.-]+$`.
fn valid_group(group: &str) -> bool {
    !group.is_empty()
        && group
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
}

async fn handle(shared: &Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    if path == paths::HISTORY {
        if req.method() != Method::GET {
            return error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "use GET",
            );
        }
        return json(StatusCode::OK, &shared.lock_state().history);
    }
    let known = [
        paths::PRE_REBOOT,
        paths::STEADY_STATE,
        paths::HOLDERS,
        paths::MARK_FAILED,
        paths::FAILED,
    ];
    if !known.contains(&path.as_str()) {
        return error(StatusCode::NOT_FOUND, "not_found", "no such endpoint");
    }
    if req.method() != Method::POST {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "FleetLock requests are POST",
        );
    }
    // The fixed header guards against requests that reached us by redirection.
    let header_ok = req
        .headers()
        .get(PROTOCOL_HEADER)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == "true");
    if !header_ok {
        return error(
            StatusCode::BAD_REQUEST,
            "missing_fleet_lock_header",
            "the fleet-lock-protocol header must be \"true\"",
        );
    }
    let bytes = match req.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(err) => {
            return error(StatusCode::BAD_REQUEST, "invalid_body", &err.to_string());
        }
    };
    let body: RequestBody = match serde_json::from_slice(&bytes) {
        Ok(body) => body,
        Err(err) => {
            return error(StatusCode::BAD_REQUEST, "invalid_body", &err.to_string());
        }
    };
    let params = &body.client_params;
    if params.id.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_client_id",
            "client id must not be empty",
        );
    }
    if !valid_group(&params.group) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_client_group",
            "client group must match ^[a-zA-Z0-9.-]+$",
        );
    }
    match path.as_str() {
        paths::PRE_REBOOT => shared.lock(params),
        paths::STEADY_STATE => shared.unlock(params),
        paths::HOLDERS => json(
            StatusCode::OK,
            &HoldersBody {
                holders: {
                    let mut state = shared.lock_state();
                    shared.expire(&mut state, &params.group);
                    holders_of(&state, &params.group)
                },
            },
        ),
        paths::MARK_FAILED => {
            let (Some(version), Some(reason)) = (&body.version, &body.reason) else {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_body",
                    "mark-failed needs version and reason",
                );
            };
            if version.is_empty() {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_body",
                    "version must not be empty",
                );
            }
            let mut state = shared.lock_state();
            state
                .failed
                .entry(params.group.clone())
                .or_default()
                .insert(
                    version.clone(),
                    FailedRelease {
                        version: version.clone(),
                        node: params.id.clone(),
                        reason: reason.clone(),
                    },
                );
            record(
                &mut state,
                &params.group,
                &params.id,
                EventKind::MarkedFailed,
            );
            ok_empty()
        }
        _ => {
            let state = shared.lock_state();
            let failed = state
                .failed
                .get(&params.group)
                .map(|f| f.values().cloned().collect())
                .unwrap_or_default();
            json(StatusCode::OK, &FailedBody { failed })
        }
    }
}
