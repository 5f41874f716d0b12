//! A small typed Kubernetes API client: exactly what the reboot lock and the drain need
//! (Nodes, Pods, Evictions, Leases), over `reqwest` with rustls.
//!
//! It owns HTTP, authentication (bearer token, client certificate), where those come
//! from (a pod's service account, or a kubeconfig file for a node's own daemons) and the
//! mapping of API status codes to [`KubeError`]; it holds no policy. Trust is explicit:
//! the API server's CA certificate is the only root accepted (never disables
//! verification), checked against the server's host or the kubeconfig's
//! `tls-server-name`. Eviction uses `policy/v1`
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
    /// Bearer token; empty: none (a client certificate authenticates).
    pub token: String,
    /// PEM certificate(s) of the CA that signed the server's certificate. These are the
    /// only trusted roots.
    pub ca_pem: Vec<u8>,
    /// The name the server's certificate is checked against when it is not the host
    /// of `server` (kubeconfig `tls-server-name`): a DNS name; the connection still
    /// goes to `server`'s address.
    pub tls_server_name: Option<String>,
    /// PEM client certificate followed by its private key (kubeconfig
    /// `client-certificate` + `client-key`), for TLS client authentication.
    pub client_identity_pem: Option<Vec<u8>>,
    /// Per-request timeout.
    pub timeout: Duration,
}

impl Default for KubeConfig {
    fn default() -> Self {
        KubeConfig {
            server: String::new(),
            token: String::new(),
            ca_pem: Vec::new(),
            tls_server_name: None,
            client_identity_pem: None,
            timeout: Duration::from_secs(30),
        }
    }
}

impl std::fmt::Debug for KubeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeConfig")
            .field("server", &self.server)
            .field("token", &"<redacted>")
            .field("tls_server_name", &self.tls_server_name)
            .field(
                "client_identity_pem",
                &self.client_identity_pem.as_ref().map(|_| "<redacted>"),
            )
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
            ..KubeConfig::default()
        })
    }

    /// The current context of a kubeconfig file (what kubectl and the kubelet read):
    /// the cluster's `server`, its CA (`certificate-authority-data`, or the file
    /// `certificate-authority`, relative to the kubeconfig's directory) and
    /// `tls-server-name`; the user's bearer `token` or `tokenFile`, and/or
    /// `client-certificate(-data)` with `client-key(-data)`. Without `current-context`
    /// a file with exactly one context uses that one. Refused, with the file and the
    /// field named: `insecure-skip-tls-verify`, `exec` and `auth-provider` plugins,
    /// basic auth, a cluster without a CA (no system roots are ever trusted).
    pub fn from_kubeconfig_file(path: &Path) -> Result<KubeConfig, KubeError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            KubeError::Config(format!("reading kubeconfig {}: {e}", path.display()))
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        kubeconfig::parse(&text, &path.display().to_string(), base)
    }
}

/// Reading kubeconfig files (client-go's `clientcmd/api/v1` layout, YAML or JSON).
mod kubeconfig {
    use std::path::{Path, PathBuf};

    use base64::Engine as _;
    use serde::Deserialize;

    use super::{KubeConfig, KubeError};

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "kebab-case")]
    struct File {
        #[serde(default)]
        clusters: Option<Vec<NamedCluster>>,
        #[serde(default)]
        users: Option<Vec<NamedUser>>,
        #[serde(default)]
        contexts: Option<Vec<NamedContext>>,
        #[serde(default)]
        current_context: Option<String>,
    }

    #[derive(Debug, Deserialize)]
    struct NamedCluster {
        name: String,
        cluster: Cluster,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "kebab-case")]
    struct Cluster {
        #[serde(default)]
        server: Option<String>,
        #[serde(default)]
        certificate_authority: Option<String>,
        #[serde(default)]
        certificate_authority_data: Option<String>,
        #[serde(default)]
        tls_server_name: Option<String>,
        #[serde(default)]
        insecure_skip_tls_verify: Option<bool>,
        #[serde(default)]
        proxy_url: Option<String>,
    }

    #[derive(Debug, Deserialize)]
    struct NamedUser {
        name: String,
        #[serde(default)]
        user: Option<User>,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(rename_all = "kebab-case")]
    struct User {
        #[serde(default)]
        token: Option<String>,
        #[serde(default, rename = "tokenFile")]
        token_file: Option<String>,
        #[serde(default)]
        client_certificate: Option<String>,
        #[serde(default)]
        client_certificate_data: Option<String>,
        #[serde(default)]
        client_key: Option<String>,
        #[serde(default)]
        client_key_data: Option<String>,
        #[serde(default)]
        username: Option<String>,
        #[serde(default)]
        exec: Option<serde_json::Value>,
        #[serde(default)]
        auth_provider: Option<serde_json::Value>,
    }

    #[derive(Debug, Deserialize)]
    struct NamedContext {
        name: String,
        context: Context,
    }

    #[derive(Debug, Deserialize)]
    struct Context {
        cluster: String,
        #[serde(default)]
        user: Option<String>,
    }

    /// Parse `text` (from `origin`; relative paths are taken from `base`).
    pub(super) fn parse(text: &str, origin: &str, base: &Path) -> Result<KubeConfig, KubeError> {
        let err = |field: &str, reason: &str| {
            KubeError::Config(format!("kubeconfig {origin}: {field}: {reason}"))
        };
        // YAML is a superset of JSON: one parser reads both forms kubectl writes.
        let file: File = serde_yaml_ng::from_str(text)
            .map_err(|e| KubeError::Config(format!("kubeconfig {origin}: {e}")))?;
        let contexts = file.contexts.unwrap_or_default();
        let context = match file.current_context.as_deref().filter(|c| !c.is_empty()) {
            Some(name) => contexts.iter().find(|c| c.name == name).ok_or_else(|| {
                err(
                    "current-context",
                    &format!("no context named {name:?} in contexts"),
                )
            })?,
            None => match contexts.as_slice() {
                [only] => only,
                [] => return Err(err("contexts", "no context given")),
                _ => {
                    return Err(err(
                        "current-context",
                        "not set, and there is more than one context to choose from",
                    ))
                }
            },
        };
        let ctx = format!("contexts[{:?}].context", context.name);

        let cluster_name = &context.context.cluster;
        let named = file
            .clusters
            .unwrap_or_default()
            .into_iter()
            .find(|c| c.name == *cluster_name)
            .ok_or_else(|| {
                err(
                    &format!("{ctx}.cluster"),
                    &format!("no cluster named {cluster_name:?} in clusters"),
                )
            })?;
        let cfield = |f: &str| format!("clusters[{:?}].cluster.{f}", named.name);
        let cluster = named.cluster;
        let server = cluster
            .server
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| err(&cfield("server"), "missing"))?;
        if !server.starts_with("https://") {
            return Err(err(
                &cfield("server"),
                &format!("{server:?} is not an https:// URL"),
            ));
        }
        if cluster.insecure_skip_tls_verify == Some(true) {
            return Err(err(
                &cfield("insecure-skip-tls-verify"),
                "refused: the server's certificate is always verified",
            ));
        }
        if cluster.proxy_url.is_some() {
            return Err(err(&cfield("proxy-url"), "proxies are not supported"));
        }
        let ca_pem = match (
            &cluster.certificate_authority_data,
            &cluster.certificate_authority,
        ) {
            (Some(data), _) => {
                decode(data).map_err(|e| err(&cfield("certificate-authority-data"), &e))?
            }
            (None, Some(file)) => {
                read(base, file).map_err(|e| err(&cfield("certificate-authority"), &e))?
            }
            (None, None) => {
                return Err(err(
                    &cfield("certificate-authority-data"),
                    "missing (or certificate-authority): only the cluster's own CA is trusted",
                ))
            }
        };
        if !String::from_utf8_lossy(&ca_pem).contains("-----BEGIN CERTIFICATE-----") {
            return Err(err(
                &cfield("certificate-authority"),
                "holds no PEM certificate",
            ));
        }

        let (token, client_identity_pem) = match context.context.user.as_deref() {
            None | Some("") => return Err(err(&format!("{ctx}.user"), "missing")),
            Some(user_name) => {
                let named = file
                    .users
                    .unwrap_or_default()
                    .into_iter()
                    .find(|u| u.name == user_name)
                    .ok_or_else(|| {
                        err(
                            &format!("{ctx}.user"),
                            &format!("no user named {user_name:?} in users"),
                        )
                    })?;
                let ufield = |f: &str| format!("users[{:?}].user.{f}", named.name);
                credentials(named.user.unwrap_or_default(), base)
                    .map_err(|(f, reason)| err(&ufield(f), &reason))?
            }
        };
        Ok(KubeConfig {
            server: server.trim_end_matches('/').to_string(),
            token,
            ca_pem,
            tls_server_name: cluster.tls_server_name.filter(|n| !n.is_empty()),
            client_identity_pem,
            ..KubeConfig::default()
        })
    }

    /// (bearer token, client certificate + key PEM); errors name the field.
    #[allow(clippy::type_complexity)]
    fn credentials(
        user: User,
        base: &Path,
    ) -> Result<(String, Option<Vec<u8>>), (&'static str, String)> {
        if user.exec.is_some() {
            return Err(("exec", "credential plugins are not supported".into()));
        }
        if user.auth_provider.is_some() {
            return Err(("auth-provider", "auth providers are not supported".into()));
        }
        if user.username.is_some() {
            return Err(("username", "basic authentication is not supported".into()));
        }
        let token = match (&user.token, &user.token_file) {
            (Some(t), _) if !t.trim().is_empty() => t.trim().to_string(),
            (_, Some(f)) => {
                let bytes = read(base, f).map_err(|e| ("tokenFile", e))?;
                let t = String::from_utf8(bytes)
                    .map_err(|_| ("tokenFile", format!("{f}: not UTF-8")))?;
                if t.trim().is_empty() {
                    return Err(("tokenFile", format!("{f} is empty")));
                }
                t.trim().to_string()
            }
            _ => String::new(),
        };
        let cert = match (&user.client_certificate_data, &user.client_certificate) {
            (Some(d), _) => Some(decode(d).map_err(|e| ("client-certificate-data", e))?),
            (None, Some(f)) => Some(read(base, f).map_err(|e| ("client-certificate", e))?),
            (None, None) => None,
        };
        let key = match (&user.client_key_data, &user.client_key) {
            (Some(d), _) => Some(decode(d).map_err(|e| ("client-key-data", e))?),
            (None, Some(f)) => Some(read(base, f).map_err(|e| ("client-key", e))?),
            (None, None) => None,
        };
        let identity = match (cert, key) {
            (Some(mut cert), Some(key)) => {
                if !cert.ends_with(b"\n") {
                    cert.push(b'\n');
                }
                cert.extend_from_slice(&key);
                Some(cert)
            }
            (Some(_), None) => {
                return Err(("client-key", "missing (client-certificate is set)".into()))
            }
            (None, Some(_)) => {
                return Err(("client-certificate", "missing (client-key is set)".into()))
            }
            (None, None) => None,
        };
        if token.is_empty() && identity.is_none() {
            return Err((
                "token",
                "no credentials (token, tokenFile or client-certificate + client-key)".into(),
            ));
        }
        Ok((token, identity))
    }

    fn decode(data: &str) -> Result<Vec<u8>, String> {
        let compact: String = data.split_whitespace().collect();
        base64::engine::general_purpose::STANDARD
            .decode(compact)
            .map_err(|e| format!("not base64: {e}"))
    }

    fn read(base: &Path, file: &str) -> Result<Vec<u8>, String> {
        let path: PathBuf = base.join(file);
        std::fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()))
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
        let server = config.server.trim_end_matches('/').to_string();
        if !server.starts_with("https://") {
            return Err(KubeError::Config(format!(
                "server {server:?} is not an https:// URL"
            )));
        }
        let mut builder = reqwest::Client::builder()
            .tls_certs_only(certs)
            .timeout(config.timeout);
        if let Some(pem) = &config.client_identity_pem {
            let identity = reqwest::Identity::from_pem(pem)
                .map_err(|e| KubeError::Config(format!("client certificate and key: {e}")))?;
            builder = builder.identity(identity);
        }
        let server = match &config.tls_server_name {
            Some(name) => {
                let (b, s) = with_server_name(builder, &server, name)?;
                builder = b;
                s
            }
            None => server,
        };
        if config.token.is_empty() && config.client_identity_pem.is_none() {
            return Err(KubeError::Config(
                "no credentials (bearer token or client certificate)".into(),
            ));
        }
        let http = builder
            .build()
            .map_err(|e| KubeError::Config(format!("building the HTTP client: {}", chain(&e))))?;
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
            .header("Accept", "application/json");
        if !self.token.is_empty() {
            req = req.bearer_auth(&self.token);
        }
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

/// Check the server's certificate against `name` instead of `server`'s host: requests
/// go to `https://NAME:PORT`, and `NAME` resolves to the address(es) of `server`'s host
/// (looked up once, here). Returns the builder and the server URL to use.
fn with_server_name(
    builder: reqwest::ClientBuilder,
    server: &str,
    name: &str,
) -> Result<(reqwest::ClientBuilder, String), KubeError> {
    use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
    let bad = |why: String| KubeError::Config(format!("tls-server-name {name:?}: {why}"));
    let mut url = reqwest::Url::parse(server)
        .map_err(|e| KubeError::Config(format!("server {server:?}: {e}")))?;
    let port = url.port_or_known_default().unwrap_or(443);
    let addrs: Vec<SocketAddr> = match url.host() {
        Some(url::Host::Domain(d)) if d == name => return Ok((builder, server.to_string())),
        Some(url::Host::Domain(d)) => (d, port)
            .to_socket_addrs()
            .map_err(|e| KubeError::Config(format!("resolving {d}: {e}")))?
            .collect(),
        Some(url::Host::Ipv4(ip)) => vec![SocketAddr::new(IpAddr::V4(ip), port)],
        Some(url::Host::Ipv6(ip)) => vec![SocketAddr::new(IpAddr::V6(ip), port)],
        None => return Err(KubeError::Config(format!("server {server:?} has no host"))),
    };
    if let Ok(ip) = name.trim_matches(['[', ']']).parse::<IpAddr>() {
        if addrs.iter().all(|a| a.ip() == ip) {
            return Ok((builder, server.to_string()));
        }
        return Err(bad(
            "an IP address other than the server's cannot be checked here; name a DNS \
             name the certificate carries (e.g. kubernetes)"
                .into(),
        ));
    }
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        return Err(bad("not a DNS name".into()));
    }
    url.set_host(Some(name)).map_err(|e| bad(e.to_string()))?;
    Ok((
        builder.resolve_to_addrs(name, &addrs),
        url.as_str().trim_end_matches('/').to_string(),
    ))
}

/// An error and its sources, `: `-separated (reqwest's own message is often only
/// "builder error").
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(&format!(": {s}"));
        source = s.source();
    }
    out
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

    /// A throwaway CA and a client certificate it signed (EC P-256; X.509 v3, which
    /// webpki requires), made with `openssl` once per test process: no private key is
    /// kept in the repository.
    struct Pki {
        ca: String,
        client_crt: String,
        client_key: String,
    }

    fn pki() -> &'static Pki {
        static PKI: std::sync::OnceLock<Pki> = std::sync::OnceLock::new();
        PKI.get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let run = |args: &[&str]| {
                let out = std::process::Command::new("openssl")
                    .args(args)
                    .current_dir(dir.path())
                    .output()
                    .expect("running openssl");
                assert!(
                    out.status.success(),
                    "openssl {args:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            };
            let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
            let mut ca = vec!["req", "-x509"];
            ca.extend(ec);
            ca.extend(["-days", "3650", "-subj", "/CN=imgcoord-test-ca"]);
            ca.extend(["-keyout", "ca.key", "-out", "ca.crt"]);
            run(&ca);
            let mut csr = vec!["req"];
            csr.extend(ec);
            csr.extend(["-subj", "/CN=imgcoord-test-client/O=system:masters"]);
            csr.extend(["-keyout", "client.key", "-out", "client.csr"]);
            run(&csr);
            std::fs::write(
                dir.path().join("client.ext"),
                "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n",
            )
            .unwrap();
            run(&[
                "x509", "-req", "-in", "client.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "3650", "-extfile", "client.ext", "-out",
                "client.crt",
            ]);
            let read = |n: &str| std::fs::read_to_string(dir.path().join(n)).unwrap();
            Pki {
                ca: read("ca.crt"),
                client_crt: read("client.crt"),
                client_key: read("client.key"),
            }
        })
    }

    fn b64(s: &str) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    /// A kubeconfig as `kubectl config view --raw` writes it, with `cluster` and `user`
    /// spliced in.
    fn kubeconfig(cluster: &str, user: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\npreferences: {{}}\nclusters:\n- name: other\n  cluster:\n    server: https://other.example:6443\n    certificate-authority-data: {ca}\n- name: test\n  cluster:\n{cluster}users:\n- name: admin\n  user:\n{user}contexts:\n- name: other\n  context:\n    cluster: other\n    user: admin\n- name: test\n  context:\n    cluster: test\n    user: admin\n    namespace: default\ncurrent-context: test\n",
            ca = b64(pki().ca.as_str())
        )
    }

    fn parse(text: &str) -> Result<KubeConfig, KubeError> {
        kubeconfig::parse(text, "/etc/test.conf", Path::new("/nonexistent"))
    }

    #[test]
    fn kubeconfig_with_token_and_embedded_ca() {
        let text = kubeconfig(
            &format!(
                "    server: https://10.0.2.2:6443/\n    tls-server-name: kubernetes\n    certificate-authority-data: {}\n",
                b64(pki().ca.as_str())
            ),
            "    token: abc123\n",
        );
        let c = parse(&text).unwrap();
        assert_eq!(c.server, "https://10.0.2.2:6443");
        assert_eq!(c.token, "abc123");
        assert_eq!(c.ca_pem, pki().ca.as_bytes());
        assert_eq!(c.tls_server_name.as_deref(), Some("kubernetes"));
        assert!(c.client_identity_pem.is_none());
        let client = KubeClient::new(&c).unwrap();
        assert_eq!(
            client.server, "https://kubernetes:6443",
            "requests name the certificate's host; it resolves to 10.0.2.2"
        );
    }

    #[test]
    fn kubeconfig_files_are_relative_to_the_kubeconfig() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("pki")).unwrap();
        std::fs::write(dir.path().join("pki/ca.crt"), pki().ca.as_str()).unwrap();
        std::fs::write(dir.path().join("token"), "tok-from-file\n").unwrap();
        std::fs::write(dir.path().join("client.crt"), pki().client_crt.as_str()).unwrap();
        std::fs::write(dir.path().join("client.key"), pki().client_key.as_str()).unwrap();
        let path = dir.path().join("kubelet.conf");
        std::fs::write(
            &path,
            kubeconfig(
                "    server: https://127.0.0.1:6443\n    certificate-authority: pki/ca.crt\n",
                "    tokenFile: token\n    client-certificate: client.crt\n    client-key: client.key\n",
            ),
        )
        .unwrap();
        let c = KubeConfig::from_kubeconfig_file(&path).unwrap();
        assert_eq!(c.token, "tok-from-file");
        assert_eq!(c.ca_pem, pki().ca.as_bytes());
        let id = String::from_utf8(c.client_identity_pem.clone().unwrap()).unwrap();
        assert!(id.contains("BEGIN CERTIFICATE") && id.contains("BEGIN PRIVATE KEY"));
        assert!(!format!("{c:?}").contains("PRIVATE"), "Debug hides the key");
        KubeClient::new(&c).unwrap();

        let missing = dir.path().join("missing.conf");
        let e = KubeConfig::from_kubeconfig_file(&missing)
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.conf"), "{e}");
    }

    #[test]
    fn kubeconfig_client_certificate_alone_authenticates() {
        let text = kubeconfig(
            &format!(
                "    server: https://127.0.0.1:6443\n    certificate-authority-data: {}\n",
                b64(pki().ca.as_str())
            ),
            &format!(
                "    client-certificate-data: {}\n    client-key-data: {}\n",
                b64(pki().client_crt.as_str()),
                b64(pki().client_key.as_str())
            ),
        );
        let c = parse(&text).unwrap();
        assert!(c.token.is_empty());
        KubeClient::new(&c).unwrap();
    }

    #[test]
    fn kubeconfig_in_json_form() {
        let text = serde_json::json!({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1", "certificate-authority-data": b64(pki().ca.as_str())}}],
            "users": [{"name": "u", "user": {"token": "t"}}],
            "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        })
        .to_string();
        let c = parse(&text).unwrap();
        assert_eq!(
            (c.server.as_str(), c.token.as_str()),
            ("https://127.0.0.1:1", "t")
        );
    }

    #[test]
    fn kubeconfig_errors_name_the_file_and_the_field() {
        let ca = format!(
            "    certificate-authority-data: {}\n",
            b64(pki().ca.as_str())
        );
        let server = "    server: https://127.0.0.1:6443\n";
        let token = "    token: t\n";
        let cases: Vec<(String, &str)> = vec![
            (kubeconfig(&ca, token), "clusters[\"test\"].cluster.server: missing"),
            (
                kubeconfig("    server: http://127.0.0.1:8080\n", token),
                "clusters[\"test\"].cluster.server: \"http://127.0.0.1:8080\" is not an https:// URL",
            ),
            (
                kubeconfig(server, token),
                "clusters[\"test\"].cluster.certificate-authority-data: missing",
            ),
            (
                kubeconfig(&format!("{server}    certificate-authority-data: '%%%'\n"), token),
                "certificate-authority-data: not base64",
            ),
            (
                kubeconfig(&format!("{server}    certificate-authority: ca.crt\n"), token),
                "certificate-authority: reading /nonexistent/ca.crt",
            ),
            (
                kubeconfig(&format!("{server}{ca}    insecure-skip-tls-verify: true\n"), token),
                "insecure-skip-tls-verify: refused",
            ),
            (
                kubeconfig(&format!("{server}{ca}"), "    exec:\n      command: aws\n"),
                "users[\"admin\"].user.exec: credential plugins are not supported",
            ),
            (
                kubeconfig(&format!("{server}{ca}"), "    username: u\n    password: p\n"),
                "users[\"admin\"].user.username",
            ),
            (
                kubeconfig(&format!("{server}{ca}"), "    tokenFile: tok\n"),
                "users[\"admin\"].user.tokenFile: reading /nonexistent/tok",
            ),
            (
                kubeconfig(&format!("{server}{ca}"), "    client-certificate-data: eA==\n"),
                "users[\"admin\"].user.client-key: missing",
            ),
            (
                kubeconfig(&format!("{server}{ca}"), "    {}\n"),
                "users[\"admin\"].user.token: no credentials",
            ),
            (
                kubeconfig(&format!("{server}{ca}"), token)
                    .replace("current-context: test", "current-context: prod"),
                "current-context: no context named \"prod\"",
            ),
            (
                kubeconfig(&format!("{server}{ca}"), token).replace("current-context: test\n", ""),
                "current-context: not set, and there is more than one context",
            ),
            (
                kubeconfig(&format!("{server}{ca}"), token).replace("cluster: test", "cluster: gone"),
                "contexts[\"test\"].context.cluster: no cluster named \"gone\"",
            ),
            (
                kubeconfig(&format!("{server}{ca}"), token).replace("user: admin\n    namespace", "user: nobody\n    namespace"),
                "contexts[\"test\"].context.user: no user named \"nobody\"",
            ),
            ("clusters: [\n".to_string(), "kubeconfig /etc/test.conf: "),
        ];
        for (text, want) in cases {
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.contains("kubeconfig /etc/test.conf"), "{e}");
            assert!(e.contains(want), "want {want:?} in: {e}");
        }
    }

    #[test]
    fn tls_server_name_must_be_a_dns_name_unless_it_is_the_servers_ip() {
        let b = || reqwest::Client::builder();
        let (_, s) = with_server_name(b(), "https://127.0.0.1:6443", "127.0.0.1").unwrap();
        assert_eq!(s, "https://127.0.0.1:6443");
        let e = with_server_name(b(), "https://10.0.2.2:6443", "127.0.0.1")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("tls-server-name \"127.0.0.1\""), "{e}");
        let (_, s) = with_server_name(b(), "https://[::1]:6443", "localhost").unwrap();
        assert_eq!(s, "https://localhost:6443");
        assert!(with_server_name(b(), "https://10.0.2.2", "a/b").is_err());
    }

    #[test]
    fn config_debug_hides_the_token() {
        let c = KubeConfig {
            server: "https://127.0.0.1:1".into(),
            token: "secret-token".into(),
            ca_pem: vec![],
            timeout: Duration::from_secs(1),
            ..KubeConfig::default()
        };
        assert!(!format!("{c:?}").contains("secret-token"));
        assert!(
            KubeClient::new(&c).is_err(),
            "no CA is a configuration error"
        );
    }
}
