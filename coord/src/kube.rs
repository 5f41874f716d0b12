//! A small typed Kubernetes API client: exactly what the reboot lock and the drain need
//! (Nodes, Pods, Evictions, Leases), over `reqwest` with rustls.
//!
//! It owns HTTP, authentication (bearer token) and the mapping of API status codes to
//! [`KubeError`]; it holds no policy. Trust is explicit: the API server's CA certificate
//! is the only root accepted (never disables verification). Eviction uses `policy/v1`
//! where the server serves it and falls back to `policy/v1beta1` (Kubernetes < 1.22,
//! found by API discovery once per client).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::OnceCell;

/// An API call that did not give the expected answer.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// Bad client configuration (URL, certificate, token).
    #[error("kubernetes client configuration: {0}")]
    Config(String),
    /// The server could not be reached or the connection broke.
    #[error("kubernetes API unreachable: {0}")]
    Transport(String),
    /// The server answered with an error status (`Status` object decoded when present).
    #[error("kubernetes API {method} {path}: HTTP {status} {reason}: {message}")]
    Api {
        method: String,
        path: String,
        status: u16,
        reason: String,
        message: String,
    },
    /// The answer was not the JSON we expected.
    #[error("kubernetes API {path}: cannot decode the answer: {message}")]
    Decode { path: String, message: String },
}

impl KubeError {
    /// HTTP status of an API error.
    pub fn status(&self) -> Option<u16> {
        match self {
            KubeError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
    /// 409: stale `resourceVersion` on update, or the object already exists on create.
    pub fn is_conflict(&self) -> bool {
        self.status() == Some(409)
    }
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }
    /// 429: an eviction refused because of a PodDisruptionBudget (or rate limiting).
    pub fn is_too_many_requests(&self) -> bool {
        self.status() == Some(429)
    }
}

/// Where the API server is and how to authenticate.
#[derive(Clone)]
pub struct KubeConfig {
    /// `https://host:port`, without a trailing slash.
    pub server: String,
    /// Bearer token.
    pub token: String,
    /// PEM certificate(s) of the CA that signed the server's certificate. These are the
    /// only trusted roots.
    pub ca_pem: Vec<u8>,
    /// Per-request timeout.
    pub timeout: Duration,
}

impl std::fmt::Debug for KubeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeConfig")
            .field("server", &self.server)
            .field("token", &"<redacted>")
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl KubeConfig {
    /// In-cluster configuration: the service account token and CA mounted into pods.
    pub fn in_cluster() -> Result<KubeConfig, KubeError> {
        let dir = Path::new("/var/run/secrets/kubernetes.io/serviceaccount");
        let host = std::env::var("KUBERNETES_SERVICE_HOST")
            .map_err(|_| KubeError::Config("KUBERNETES_SERVICE_HOST is not set".into()))?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
        let read = |name: &str| {
            std::fs::read(dir.join(name)).map_err(|e| {
                KubeError::Config(format!("reading {}: {e}", dir.join(name).display()))
            })
        };
        let token = String::from_utf8(read("token")?)
            .map_err(|_| KubeError::Config("service account token is not UTF-8".into()))?;
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        Ok(KubeConfig {
            server: format!("https://{host}:{port}"),
            token: token.trim().to_string(),
            ca_pem: read("ca.crt")?,
            timeout: Duration::from_secs(30),
        })
    }
}

/// Standard object metadata (the fields we use).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_timestamp: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub owner_references: Vec<OwnerReference>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OwnerReference {
    pub api_version: String,
    pub kind: String,
    pub name: String,
    pub uid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controller: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Node {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: NodeSpec,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeSpec {
    #[serde(default)]
    pub unschedulable: bool,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Pod {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PodSpec,
    #[serde(default)]
    pub status: PodStatus,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    #[serde(default)]
    pub node_name: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    #[serde(default)]
    pub phase: Option<String>,
}

#[derive(Debug, Deserialize)]
struct List<T> {
    items: Vec<T>,
}

/// A `coordination.k8s.io/v1` Lease.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Lease {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: LeaseSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaseSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder_identity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_duration_seconds: Option<i64>,
    /// MicroTime, RFC 3339 with microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acquire_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renew_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_transitions: Option<i64>,
}

/// What an eviction request did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Eviction {
    /// Accepted: the pod is being deleted.
    Accepted,
    /// The pod does not exist (any more).
    Gone,
    /// Refused for now (HTTP 429), usually by a PodDisruptionBudget; retry later.
    Blocked(String),
}

/// The API version an Eviction body uses on this server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvictionVersion {
    V1,
    V1beta1,
}

/// A typed client for one API server.
#[derive(Debug, Clone)]
pub struct KubeClient {
    http: reqwest::Client,
    server: String,
    token: String,
    eviction_version: std::sync::Arc<OnceCell<EvictionVersion>>,
}

impl KubeClient {
    pub fn new(config: &KubeConfig) -> Result<KubeClient, KubeError> {
        let certs = reqwest::Certificate::from_pem_bundle(&config.ca_pem)
            .map_err(|e| KubeError::Config(format!("CA certificate: {e}")))?;
        if certs.is_empty() {
            return Err(KubeError::Config("no CA certificate given".into()));
        }
        let http = reqwest::Client::builder()
            .tls_certs_only(certs)
            .timeout(config.timeout)
            .build()
            .map_err(|e| KubeError::Config(format!("building the HTTP client: {e}")))?;
        let server = config.server.trim_end_matches('/').to_string();
        if !server.starts_with("https://") {
            return Err(KubeError::Config(format!(
                "server {server:?} is not an https:// URL"
            )));
        }
        Ok(KubeClient {
            http,
            server,
            token: config.token.clone(),
            eviction_version: Default::default(),
        })
    }

    /// One request; `body` is sent as JSON with `content_type`. Returns the decoded answer.
    pub async fn request<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, &Value)>,
    ) -> Result<T, KubeError> {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.server))
            .bearer_auth(&self.token)
            .header("Accept", "application/json");
        if let Some((content_type, body)) = body {
            let bytes = serde_json::to_vec(body).map_err(|e| KubeError::Decode {
                path: path.to_string(),
                message: e.to_string(),
            })?;
            req = req.header("Content-Type", content_type).body(bytes);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| KubeError::Transport(format!("{method} {path}: {e}")))?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| KubeError::Transport(format!("{method} {path}: {e}")))?;
        if !status.is_success() {
            return Err(api_error(&method, path, status, &bytes));
        }
        serde_json::from_slice(&bytes).map_err(|e| KubeError::Decode {
            path: path.to_string(),
            message: e.to_string(),
        })
    }

    /// GET as JSON.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, KubeError> {
        self.request(Method::GET, path, None).await
    }

    /// POST a JSON object (create).
    pub async fn create<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &Value,
    ) -> Result<T, KubeError> {
        self.request(Method::POST, path, Some(("application/json", body)))
            .await
    }

    /// PUT a JSON object (replace; carries `metadata.resourceVersion` for optimistic
    /// concurrency: a stale one gives HTTP 409).
    pub async fn replace<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &Value,
    ) -> Result<T, KubeError> {
        self.request(Method::PUT, path, Some(("application/json", body)))
            .await
    }

    /// JSON merge patch (RFC 7386).
    pub async fn merge_patch<T: DeserializeOwned>(
        &self,
        path: &str,
        patch: &Value,
    ) -> Result<T, KubeError> {
        self.request(
            Method::PATCH,
            path,
            Some(("application/merge-patch+json", patch)),
        )
        .await
    }

    /// DELETE, optionally with a grace period.
    pub async fn delete(
        &self,
        path: &str,
        grace_period_seconds: Option<i64>,
    ) -> Result<(), KubeError> {
        let body = grace_period_seconds
            .map(|g| json!({"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": g}));
        let _: Value = self
            .request(
                Method::DELETE,
                path,
                body.as_ref().map(|b| ("application/json", b)),
            )
            .await?;
        Ok(())
    }

    pub async fn get_node(&self, name: &str) -> Result<Node, KubeError> {
        self.get(&format!("/api/v1/nodes/{}", segment(name)?)).await
    }

    /// Cordon (`true`) or uncordon (`false`) a node.
    pub async fn set_unschedulable(
        &self,
        name: &str,
        unschedulable: bool,
    ) -> Result<Node, KubeError> {
        self.merge_patch(
            &format!("/api/v1/nodes/{}", segment(name)?),
            &json!({"spec": {"unschedulable": unschedulable}}),
        )
        .await
    }

    /// All pods bound to `node`, in every namespace.
    pub async fn pods_on_node(&self, node: &str) -> Result<Vec<Pod>, KubeError> {
        let list: List<Pod> = self
            .get(&format!(
                "/api/v1/pods?fieldSelector=spec.nodeName%3D{}",
                segment(node)?
            ))
            .await?;
        Ok(list.items)
    }

    /// The Eviction API version this server serves (discovery, cached).
    pub async fn eviction_version(&self) -> Result<EvictionVersion, KubeError> {
        self.eviction_version
            .get_or_try_init(|| async {
                match self.get::<Value>("/apis/policy/v1").await {
                    Ok(_) => Ok(EvictionVersion::V1),
                    Err(e) if e.is_not_found() => Ok(EvictionVersion::V1beta1),
                    Err(e) => Err(e),
                }
            })
            .await
            .copied()
    }

    /// Ask the API server to evict a pod (it checks PodDisruptionBudgets).
    pub async fn evict(
        &self,
        namespace: &str,
        name: &str,
        grace_period_seconds: Option<i64>,
    ) -> Result<Eviction, KubeError> {
        let version = self.eviction_version().await?;
        let path = format!(
            "/api/v1/namespaces/{}/pods/{}/eviction",
            segment(namespace)?,
            segment(name)?
        );
        let body = eviction_body(version, namespace, name, grace_period_seconds);
        let result: Result<Value, KubeError> = self.create(&path, &body).await;
        let result = match result {
            // A server that serves policy/v1 discovery but not the v1 Eviction kind.
            Err(KubeError::Api {
                status: 400,
                ref message,
                ..
            }) if version == EvictionVersion::V1 && message.contains("policy/v1") => {
                self.create(
                    &path,
                    &eviction_body(
                        EvictionVersion::V1beta1,
                        namespace,
                        name,
                        grace_period_seconds,
                    ),
                )
                .await
            }
            other => other,
        };
        match result {
            Ok(_) => Ok(Eviction::Accepted),
            Err(e) if e.is_not_found() => Ok(Eviction::Gone),
            Err(KubeError::Api {
                status: 429,
                message,
                ..
            }) => Ok(Eviction::Blocked(message)),
            Err(e) => Err(e),
        }
    }

    /// A Lease, or `None` if it does not exist.
    pub async fn get_lease(&self, namespace: &str, name: &str) -> Result<Option<Lease>, KubeError> {
        match self.get(&lease_path(namespace, Some(name))?).await {
            Ok(l) => Ok(Some(l)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Create a Lease; HTTP 409 if it exists already.
    pub async fn create_lease(&self, namespace: &str, lease: &Lease) -> Result<Lease, KubeError> {
        self.create(&lease_path(namespace, None)?, &lease_json(lease)?)
            .await
    }

    /// Replace a Lease; `lease.metadata.resourceVersion` must be the one read, else 409.
    pub async fn update_lease(&self, namespace: &str, lease: &Lease) -> Result<Lease, KubeError> {
        let name = lease
            .metadata
            .name
            .as_deref()
            .ok_or_else(|| KubeError::Config("lease without a name".into()))?;
        self.replace(&lease_path(namespace, Some(name))?, &lease_json(lease)?)
            .await
    }
}

fn eviction_body(
    version: EvictionVersion,
    namespace: &str,
    name: &str,
    grace_period_seconds: Option<i64>,
) -> Value {
    let api_version = match version {
        EvictionVersion::V1 => "policy/v1",
        EvictionVersion::V1beta1 => "policy/v1beta1",
    };
    let mut body = json!({
        "apiVersion": api_version,
        "kind": "Eviction",
        "metadata": {"name": name, "namespace": namespace},
    });
    if let Some(g) = grace_period_seconds {
        body["deleteOptions"] = json!({"gracePeriodSeconds": g});
    }
    body
}

fn lease_path(namespace: &str, name: Option<&str>) -> Result<String, KubeError> {
    let base = format!(
        "/apis/coordination.k8s.io/v1/namespaces/{}/leases",
        segment(namespace)?
    );
    Ok(match name {
        Some(n) => format!("{base}/{}", segment(n)?),
        None => base,
    })
}

fn lease_json(lease: &Lease) -> Result<Value, KubeError> {
    let mut v = serde_json::to_value(lease).map_err(|e| KubeError::Decode {
        path: "lease".into(),
        message: e.to_string(),
    })?;
    v["apiVersion"] = json!("coordination.k8s.io/v1");
    v["kind"] = json!("Lease");
    Ok(v)
}

/// A name used as one URL path segment: Kubernetes names are DNS labels/subdomains, so
/// anything else is refused rather than escaped.
fn segment(name: &str) -> Result<&str, KubeError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if ok {
        Ok(name)
    } else {
        Err(KubeError::Config(format!(
            "{name:?} is not a Kubernetes object name"
        )))
    }
}

fn api_error(method: &Method, path: &str, status: StatusCode, body: &[u8]) -> KubeError {
    #[derive(Deserialize)]
    struct Status {
        #[serde(default)]
        reason: String,
        #[serde(default)]
        message: String,
    }
    let (reason, message) = match serde_json::from_slice::<Status>(body) {
        Ok(s) => (s.reason, s.message),
        Err(_) => (
            status.canonical_reason().unwrap_or("").to_string(),
            String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned(),
        ),
    };
    KubeError::Api {
        method: method.to_string(),
        path: path.to_string(),
        status: status.as_u16(),
        reason,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_they_reach_a_url() {
        assert!(segment("node-1.example").is_ok());
        for bad in ["", "a/b", "../x", "A", "x?y=1", "a b"] {
            assert!(segment(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn eviction_body_uses_the_served_version() {
        let v1 = eviction_body(EvictionVersion::V1, "ns", "p", None);
        assert_eq!(v1["apiVersion"], "policy/v1");
        assert!(v1.get("deleteOptions").is_none());
        let beta = eviction_body(EvictionVersion::V1beta1, "ns", "p", Some(0));
        assert_eq!(beta["apiVersion"], "policy/v1beta1");
        assert_eq!(beta["deleteOptions"]["gracePeriodSeconds"], 0);
        assert_eq!(beta["metadata"]["namespace"], "ns");
    }

    #[test]
    fn lease_serialises_as_the_api_expects() {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some("l".into()),
                resource_version: Some("42".into()),
                ..Default::default()
            },
            spec: LeaseSpec {
                holder_identity: Some("node-a".into()),
                lease_duration_seconds: Some(30),
                renew_time: Some("2026-01-01T00:00:00.000000Z".into()),
                ..Default::default()
            },
        };
        let v = lease_json(&lease).unwrap();
        assert_eq!(v["kind"], "Lease");
        assert_eq!(v["apiVersion"], "coordination.k8s.io/v1");
        assert_eq!(v["metadata"]["resourceVersion"], "42");
        assert_eq!(v["spec"]["holderIdentity"], "node-a");
        assert_eq!(v["spec"]["leaseDurationSeconds"], 30);
        assert!(v["spec"].get("acquireTime").is_none());
    }

    #[test]
    fn api_errors_keep_status_reason_and_message() {
        let body =
            br#"{"kind":"Status","reason":"Conflict","message":"the object has been modified"}"#;
        let e = api_error(&Method::PUT, "/x", StatusCode::CONFLICT, body);
        assert!(e.is_conflict());
        assert!(
            e.to_string().contains("the object has been modified"),
            "{e}"
        );
        let e = api_error(&Method::GET, "/x", StatusCode::NOT_FOUND, b"not json");
        assert!(e.is_not_found());
        assert!(e.to_string().contains("not json"));
    }

    #[test]
    fn config_debug_hides_the_token() {
        let c = KubeConfig {
            server: "https://127.0.0.1:1".into(),
            token: "secret-token".into(),
            ca_pem: vec![],
            timeout: Duration::from_secs(1),
        };
        assert!(!format!("{c:?}").contains("secret-token"));
        assert!(
            KubeClient::new(&c).is_err(),
            "no CA is a configuration error"
        );
    }
}
