//! Drain and uncordon a Kubernetes node before and after a reboot.
//!
//! Drain = cordon, then evict every pod bound to the node through the Eviction API, so
//! the API server enforces PodDisruptionBudgets (HTTP 429 means "not now": retried
//! until the timeout). DaemonSet-owned pods (their controller would recreate them on the
//! node anyway) and mirror pods (static pods owned by the kubelet) are skipped, as
//! `kubectl drain --ignore-daemonsets` does. A drain that does not finish in time is
//! *postponed*: the node is uncordoned again and the caller is told which pods were in
//! the way; pods are deleted without eviction only if `force_after_timeout` is set.
//! This module never reboots and never touches the reboot lock.

use std::time::{Duration, Instant};

use crate::kube::{Eviction, KubeClient, KubeError, Pod};

/// Annotation the kubelet puts on mirror pods of static pods.
pub const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// How to drain.
#[derive(Debug, Clone)]
pub struct DrainOptions {
    /// Give up (postpone) after this long.
    pub timeout: Duration,
    /// Pause between rounds of evictions that were refused (429) or pods still terminating.
    pub retry_interval: Duration,
    /// Grace period passed with each eviction (`None`: the pod's own).
    pub grace_period_seconds: Option<i64>,
    /// On timeout, delete the remaining pods without eviction (ignores PDBs) instead of
    /// postponing.
    pub force_after_timeout: bool,
}

impl Default for DrainOptions {
    fn default() -> Self {
        DrainOptions {
            timeout: Duration::from_secs(600),
            retry_interval: Duration::from_secs(5),
            grace_period_seconds: None,
            force_after_timeout: false,
        }
    }
}

/// `namespace/name` of a pod.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for PodRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Why a pod was left on the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SkipReason {
    DaemonSet,
    Mirror,
}

/// The result of a drain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DrainOutcome {
    /// Every evictable pod is gone; the node stays cordoned.
    Drained {
        evicted: Vec<PodRef>,
        skipped: Vec<(PodRef, SkipReason)>,
        /// Deleted without eviction after the timeout (`force_after_timeout`).
        forced: Vec<PodRef>,
    },
    /// Not finished within the timeout: the node was uncordoned, the update should wait.
    Postponed {
        evicted: Vec<PodRef>,
        /// Pods still on the node, with the last reason (e.g. the PDB message).
        remaining: Vec<(PodRef, String)>,
    },
}

/// A drain that could not be carried out at all.
#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    #[error("draining node {node}: {source}")]
    Api {
        node: String,
        #[source]
        source: KubeError,
    },
}

fn api(node: &str) -> impl Fn(KubeError) -> DrainError + '_ {
    move |source| DrainError::Api {
        node: node.to_string(),
        source,
    }
}

/// Mark the node unschedulable.
pub async fn cordon(client: &KubeClient, node: &str) -> Result<(), DrainError> {
    client
        .set_unschedulable(node, true)
        .await
        .map(|_| ())
        .map_err(api(node))
}

/// Make the node schedulable again.
pub async fn uncordon(client: &KubeClient, node: &str) -> Result<(), DrainError> {
    client
        .set_unschedulable(node, false)
        .await
        .map(|_| ())
        .map_err(api(node))
}

/// Whether a pod is left alone by a drain, and why.
pub fn skip_reason(pod: &Pod) -> Option<SkipReason> {
    if pod.metadata.annotations.contains_key(MIRROR_ANNOTATION) {
        return Some(SkipReason::Mirror);
    }
    let ds = pod
        .metadata
        .owner_references
        .iter()
        .any(|o| o.kind == "DaemonSet" && o.controller == Some(true));
    ds.then_some(SkipReason::DaemonSet)
}

fn pod_ref(pod: &Pod) -> PodRef {
    PodRef {
        namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        name: pod.metadata.name.clone().unwrap_or_default(),
    }
}

/// Cordon `node` and evict its pods (see the module docs).
pub async fn drain(
    client: &KubeClient,
    node: &str,
    opts: &DrainOptions,
) -> Result<DrainOutcome, DrainError> {
    let deadline = Instant::now() + opts.timeout;
    cordon(client, node).await?;
    let mut evicted: Vec<PodRef> = Vec::new();
    loop {
        let pods = client.pods_on_node(node).await.map_err(api(node))?;
        let mut skipped = Vec::new();
        let mut remaining: Vec<(PodRef, String)> = Vec::new();
        for pod in &pods {
            let r = pod_ref(pod);
            if let Some(why) = skip_reason(pod) {
                skipped.push((r, why));
                continue;
            }
            if pod.metadata.deletion_timestamp.is_some() {
                remaining.push((r, "terminating".into()));
                continue;
            }
            match client
                .evict(&r.namespace, &r.name, opts.grace_period_seconds)
                .await
                .map_err(api(node))?
            {
                Eviction::Accepted => {
                    tracing::info!(pod = %r, "evicted");
                    if !evicted.contains(&r) {
                        evicted.push(r.clone());
                    }
                    remaining.push((r, "terminating".into()));
                }
                Eviction::Gone => {}
                Eviction::Blocked(why) => {
                    tracing::info!(pod = %r, %why, "eviction refused, will retry");
                    remaining.push((r, why));
                }
            }
        }
        // Pods accepted for eviction may already be gone (grace period 0, no kubelet).
        if !remaining.is_empty() {
            let still = client.pods_on_node(node).await.map_err(api(node))?;
            remaining.retain(|(r, _)| still.iter().any(|p| pod_ref(p) == *r));
        }
        if remaining.is_empty() {
            skipped.sort();
            evicted.sort();
            return Ok(DrainOutcome::Drained {
                evicted,
                skipped,
                forced: Vec::new(),
            });
        }
        if Instant::now() + opts.retry_interval > deadline {
            remaining.sort();
            evicted.sort();
            if opts.force_after_timeout {
                let mut forced = Vec::new();
                for (r, _) in remaining {
                    let path = format!("/api/v1/namespaces/{}/pods/{}", r.namespace, r.name);
                    match client.delete(&path, opts.grace_period_seconds).await {
                        Ok(()) => forced.push(r),
                        Err(e) if e.is_not_found() => {}
                        Err(e) => return Err(api(node)(e)),
                    }
                }
                skipped.sort();
                return Ok(DrainOutcome::Drained {
                    evicted,
                    skipped,
                    forced,
                });
            }
            uncordon(client, node).await?;
            return Ok(DrainOutcome::Postponed { evicted, remaining });
        }
        tokio::time::sleep(opts.retry_interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube::{ObjectMeta, OwnerReference};

    fn pod(annotations: &[(&str, &str)], owner: Option<(&str, bool)>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("p".into()),
                namespace: Some("ns".into()),
                annotations: annotations
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                owner_references: owner
                    .map(|(kind, controller)| OwnerReference {
                        api_version: "apps/v1".into(),
                        kind: kind.into(),
                        name: "o".into(),
                        uid: "u".into(),
                        controller: Some(controller),
                    })
                    .into_iter()
                    .collect(),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn skip_reasons_table() {
        assert_eq!(skip_reason(&pod(&[], None)), None);
        assert_eq!(
            skip_reason(&pod(&[], Some(("DaemonSet", true)))),
            Some(SkipReason::DaemonSet)
        );
        assert_eq!(
            skip_reason(&pod(&[], Some(("DaemonSet", false)))),
            None,
            "only the controlling owner counts"
        );
        assert_eq!(skip_reason(&pod(&[], Some(("ReplicaSet", true)))), None);
        assert_eq!(
            skip_reason(&pod(&[(MIRROR_ANNOTATION, "abc")], None)),
            Some(SkipReason::Mirror)
        );
        assert_eq!(pod_ref(&pod(&[], None)).to_string(), "ns/p");
    }
}
