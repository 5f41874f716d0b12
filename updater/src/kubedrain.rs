//! The Kubernetes drainer: [`crate::reboot::Drainer`] over `imgcoord::drain` (cordon,
//! eviction honouring PodDisruptionBudgets, DaemonSet and mirror pods skipped, uncordon).
//!
//! It owns only the translation between the two; it never decides when to drain (the
//! reboot flow does) and never deletes pods without eviction unless the drain options
//! say so.

use std::time::Duration;

use imgcoord::drain::{self, DrainOptions, DrainOutcome};
use imgcoord::kube::KubeClient;

use crate::reboot::{Drained, Drainer};

/// Drains one node through the Kubernetes API.
#[derive(Debug, Clone)]
pub struct KubeDrainer {
    pub client: KubeClient,
    /// The node's name in the cluster.
    pub node: String,
    /// Retry interval, grace period, forcing; the timeout comes from each call.
    pub options: DrainOptions,
}

impl KubeDrainer {
    pub fn new(client: KubeClient, node: impl Into<String>) -> KubeDrainer {
        KubeDrainer {
            client,
            node: node.into(),
            options: DrainOptions::default(),
        }
    }
}

#[async_trait::async_trait]
impl Drainer for KubeDrainer {
    async fn cordon(&self) -> Result<(), String> {
        drain::cordon(&self.client, &self.node)
            .await
            .map_err(|e| e.to_string())
    }

    async fn drain(&self, timeout: Duration) -> Result<Drained, String> {
        let opts = DrainOptions {
            timeout,
            ..self.options.clone()
        };
        match drain::drain(&self.client, &self.node, &opts).await {
            Ok(DrainOutcome::Drained { .. }) => Ok(Drained::Drained),
            Ok(DrainOutcome::Postponed { remaining, .. }) => Ok(Drained::Postponed {
                reason: format!(
                    "{} pod(s) still on {} after {timeout:?}: {}",
                    remaining.len(),
                    self.node,
                    remaining
                        .iter()
                        .map(|(pod, why)| format!("{pod} ({why})"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }),
            Err(e) => Err(e.to_string()),
        }
    }

    async fn uncordon(&self) -> Result<(), String> {
        drain::uncordon(&self.client, &self.node)
            .await
            .map_err(|e| e.to_string())
    }
}
