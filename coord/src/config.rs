//! Configuration of reboot coordination, as sections the updater's config file embeds:
//! `[lock]`, `[health]` and `[window]`. Every struct refuses unknown keys, so a typo
//! is an error at load time, not a silently ignored setting. Parsing and defaults only;
//! [`open_lock`] turns a `[lock]` section into a backend.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::health::{Check, RunPolicy};
use crate::lock::etcd::{EtcdLock, EtcdOptions};
use crate::lock::fleetlock::FleetLockClient;
use crate::lock::{LockError, NodeIdentity, RebootLock};
use crate::window::Window;

/// Which lock service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LockBackend {
    /// A FleetLock server (Zincati's protocol); `url` is its base URL.
    Fleetlock,
    /// An etcd v3 cluster; `url` is a client endpoint.
    Etcd,
    /// Lease objects in the cluster the node belongs to.
    Kubernetes,
}

/// `[lock]`, e.g. `backend = "etcd"`, `url = "http://10.0.0.1:2379"`, `slots = 2`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockConfig {
    pub backend: LockBackend,
    /// Base URL (FleetLock) or endpoint (etcd); optional for Kubernetes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Lock group (FleetLock's `group`): nodes of one group share the slots.
    #[serde(default = "default_group")]
    pub group: String,
    /// How many nodes of the group may reboot at once (enforced by etcd and
    /// Kubernetes; a FleetLock server has its own setting).
    #[serde(default = "one")]
    pub slots: usize,
    /// A holder that stops renewing loses its slot after this long; must cover a
    /// reboot and the health checks.
    #[serde(default = "default_ttl", with = "crate::duration")]
    pub ttl: Duration,
    /// Renewals stop after a slot has been held this long in total.
    #[serde(default = "default_max_hold", with = "crate::duration")]
    pub max_hold: Duration,
    /// Timeout of each request to the lock service.
    #[serde(default = "default_request_timeout", with = "crate::duration")]
    pub request_timeout: Duration,
    /// Namespace of the Lease objects (Kubernetes backend).
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Kubernetes backend: a kubeconfig file (absolute path; its current context) with the
    /// API server, its CA and the credentials, e.g. the kubelet's. Without it the
    /// in-cluster service account is used (imgupdate deployed in a pod).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubeconfig: Option<std::path::PathBuf>,
}

fn default_namespace() -> String {
    "kube-system".into()
}

fn default_group() -> String {
    "default".into()
}
fn one() -> usize {
    1
}
fn default_ttl() -> Duration {
    Duration::from_secs(15 * 60)
}
fn default_max_hold() -> Duration {
    Duration::from_secs(60 * 60)
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(10)
}

/// `[health]`: `deadline = "5m"`, `interval = "5s"`, `checks = [{ kind = ... }]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    #[serde(default)]
    pub checks: Vec<Check>,
    /// All checks must pass in one round within this time after boot.
    #[serde(default = "default_deadline", with = "crate::duration")]
    pub deadline: Duration,
    /// Pause between rounds.
    #[serde(default = "default_interval", with = "crate::duration")]
    pub interval: Duration,
}

fn default_deadline() -> Duration {
    Duration::from_secs(5 * 60)
}
fn default_interval() -> Duration {
    Duration::from_secs(5)
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            checks: Vec::new(),
            deadline: default_deadline(),
            interval: default_interval(),
        }
    }
}

impl HealthConfig {
    /// The runner's pacing.
    pub fn policy(&self) -> RunPolicy {
        RunPolicy {
            deadline: self.deadline,
            interval: self.interval,
        }
    }
}

/// `[window]`: `windows = [{ days = ["Sat","Sun"], start = "01:00", length = "3h",
/// tz = "Europe/Berlin" }]`; no windows means reboots are allowed at any time.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowConfig {
    #[serde(default)]
    pub windows: Vec<Window>,
}

/// The group label FleetLock allows (`^[a-zA-Z0-9.-]+$`); we require it of every
/// backend so a group means the same everywhere (and is safe in etcd keys).
fn check_group(group: &str) -> Result<(), LockError> {
    let ok = !group.is_empty()
        && group
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(LockError::Protocol(format!(
            "lock group {group:?} must match ^[a-zA-Z0-9.-]+$"
        )))
    }
}

/// Open the configured lock for `identity` (whose group is replaced by the
/// configured one). FleetLock and etcd here; Kubernetes is built by its own module.
pub fn open_lock(
    config: &LockConfig,
    identity: &NodeIdentity,
) -> Result<Box<dyn RebootLock>, LockError> {
    check_group(&config.group)?;
    if identity.id.is_empty() {
        return Err(LockError::Protocol("node id must not be empty".into()));
    }
    let identity = NodeIdentity {
        id: identity.id.clone(),
        group: config.group.clone(),
    };
    if config.kubeconfig.is_some() && config.backend != LockBackend::Kubernetes {
        return Err(LockError::Protocol(format!(
            "[lock] kubeconfig is for backend \"kubernetes\", not {:?}",
            config.backend
        )));
    }
    let url = || {
        config.url.as_deref().ok_or_else(|| {
            LockError::Protocol(format!("[lock] backend {:?} needs url", config.backend))
        })
    };
    match config.backend {
        LockBackend::Fleetlock => Ok(Box::new(FleetLockClient::new(
            url()?,
            identity,
            config.request_timeout,
        )?)),
        LockBackend::Etcd => Ok(Box::new(EtcdLock::new(
            url()?,
            identity,
            EtcdOptions {
                slots: config.slots,
                ttl: config.ttl,
                max_hold: config.max_hold,
                request_timeout: config.request_timeout,
            },
        )?)),
        LockBackend::Kubernetes => {
            // The API server and credentials: the kubeconfig file when given (a node's
            // daemon), else the in-cluster service account (imgupdate in a pod).
            let kube = match &config.kubeconfig {
                Some(path) => crate::kube::KubeConfig::from_kubeconfig_file(path),
                None => crate::kube::KubeConfig::in_cluster(),
            }
            .map_err(|e| LockError::Unreachable(format!("kubernetes lock: {e}")))?;
            let client = crate::kube::KubeClient::new(&kube)
                .map_err(|e| LockError::Unreachable(format!("kubernetes lock: {e}")))?;
            let slots = u32::try_from(config.slots)
                .map_err(|_| LockError::Protocol("[lock] slots is too large".into()))?;
            Ok(Box::new(crate::lock::kubernetes::LeaseLock::new(
                client,
                crate::lock::kubernetes::LeaseLockConfig {
                    namespace: config.namespace.clone(),
                    node: identity,
                    slots,
                    lease_duration: config.ttl,
                },
            )?))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct UpdaterLike {
        lock: LockConfig,
        #[serde(default)]
        health: HealthConfig,
        #[serde(default)]
        window: WindowConfig,
    }

    #[test]
    fn full_example_parses() {
        let c: UpdaterLike = toml::from_str(
            r#"
            [lock]
            backend = "etcd"
            url = "http://127.0.0.1:2379"
            group = "workers"
            slots = 2
            ttl = "20m"
            max_hold = "2h"

            [health]
            deadline = "10m"
            checks = [
              { kind = "system-state" },
              { kind = "http", name = "kubelet", url = "http://127.0.0.1:10248/healthz", timeout = "3s" },
            ]

            [window]
            windows = [{ days = ["Sat", "Sun"], start = "01:00", length = "3h", tz = "Europe/Berlin" }]
            "#,
        )
        .unwrap();
        assert_eq!(c.lock.backend, LockBackend::Etcd);
        assert_eq!(c.lock.slots, 2);
        assert_eq!(c.lock.ttl, Duration::from_secs(1200));
        assert_eq!(c.lock.max_hold, Duration::from_secs(7200));
        assert_eq!(c.lock.request_timeout, Duration::from_secs(10));
        assert_eq!(c.health.deadline, Duration::from_secs(600));
        assert_eq!(c.health.interval, Duration::from_secs(5));
        assert_eq!(c.health.checks.len(), 2);
        assert_eq!(c.window.windows.len(), 1);
    }

    #[test]
    fn defaults_and_refusals() {
        let c: UpdaterLike = toml::from_str(
            "[lock]\nbackend = \"fleetlock\"\nurl = \"http://fleetlock.example/base\"\n",
        )
        .unwrap();
        assert_eq!(c.lock.group, "default");
        assert_eq!(c.lock.slots, 1);
        assert_eq!(c.health, HealthConfig::default());
        assert!(c.window.windows.is_empty());
        for bad in [
            "[lock]\nbackend = \"zookeeper\"\n",
            "[lock]\nbackend = \"etcd\"\nurl = \"x\"\nslot = 2\n",
            "[lock]\nbackend = \"etcd\"\nttl = \"forever\"\n",
            "[lock]\nbackend = \"etcd\"\n[health]\ndeadline = \"5m\"\ncheck = []\n",
            "[lock]\nbackend = \"etcd\"\n[window]\nwindow = []\n",
        ] {
            assert!(toml::from_str::<UpdaterLike>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn open_lock_validates() {
        let id = NodeIdentity {
            id: "node-1".into(),
            group: "ignored".into(),
        };
        let cfg = |backend, url: Option<&str>, group: &str| LockConfig {
            backend,
            url: url.map(str::to_string),
            group: group.into(),
            slots: 1,
            ttl: default_ttl(),
            max_hold: default_max_hold(),
            request_timeout: default_request_timeout(),
            namespace: default_namespace(),
            kubeconfig: None,
        };
        assert!(open_lock(
            &cfg(
                LockBackend::Fleetlock,
                Some("http://127.0.0.1:1"),
                "default"
            ),
            &id
        )
        .is_ok());
        assert!(open_lock(
            &cfg(LockBackend::Etcd, Some("http://127.0.0.1:1"), "default"),
            &id
        )
        .is_ok());
        assert!(open_lock(&cfg(LockBackend::Etcd, None, "default"), &id).is_err());
        assert!(open_lock(&cfg(LockBackend::Etcd, Some("http://x"), "a/b"), &id).is_err());
        assert!(open_lock(&cfg(LockBackend::Kubernetes, None, "default"), &id).is_err());
        let mut zero = cfg(LockBackend::Etcd, Some("http://x"), "default");
        zero.slots = 0;
        assert!(open_lock(&zero, &id).is_err());
        // A kubeconfig only means something to the Kubernetes backend.
        let mut etcd_kc = cfg(LockBackend::Etcd, Some("http://127.0.0.1:1"), "default");
        etcd_kc.kubeconfig = Some("/k.conf".into());
        let err = open_lock(&etcd_kc, &id).err().unwrap().to_string();
        assert!(err.contains("kubeconfig"), "{err}");
        // The Kubernetes backend reads it (and names it when it is missing).
        let mut kube = cfg(LockBackend::Kubernetes, None, "default");
        kube.kubeconfig = Some("/nonexistent/kubelet.conf".into());
        let err = open_lock(&kube, &id).err().unwrap().to_string();
        assert!(err.contains("/nonexistent/kubelet.conf"), "{err}");
    }
}
