//! k8s tier: imgupdate's Kubernetes drainer against a real kube-apiserver (v1.20.2 built
//! by scripts/build-k8s): cordon + evict + uncordon through the reboot flow's trait, and
//! a drain that cannot finish is reported as postponed with the pods that remain.

#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use std::time::Duration;

use imgcoord::drain::DrainOptions;
use imgcoord::kube::{KubeClient, KubeConfig};
use imgkubetest::{ControlPlane, ControlPlaneOptions};
use imgupdate::kubedrain::KubeDrainer;
use imgupdate::reboot::{Drained, Drainer};
use serde_json::{json, Value};

async fn start() -> (ControlPlane, KubeClient) {
    let cp = ControlPlane::start(ControlPlaneOptions::default())
        .await
        .expect("starting the test control plane (run scripts/build-k8s)");
    let client = KubeClient::new(&KubeConfig {
        server: cp.server.clone(),
        token: cp.token.clone(),
        ca_pem: cp.ca_pem.clone(),
        timeout: Duration::from_secs(20),
        ..KubeConfig::default()
    })
    .unwrap();
    (cp, client)
}

async fn create(client: &KubeClient, path: &str, body: Value) {
    let _: Value = client.create(path, &body).await.unwrap();
}

async fn pod(client: &KubeClient, name: &str, node: &str) {
    create(
        client,
        "/api/v1/namespaces/apps/pods",
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "namespace": "apps"},
               "spec": {"nodeName": node, "containers": [{"name": "c", "image": "registry.invalid/pause:1"}]}}),
    )
    .await;
}

fn drainer(client: &KubeClient, node: &str) -> KubeDrainer {
    let mut d = KubeDrainer::new(client.clone(), node);
    d.options = DrainOptions {
        retry_interval: Duration::from_millis(500),
        // No kubelet runs: let the API server delete evicted pods at once.
        grace_period_seconds: Some(0),
        ..DrainOptions::default()
    };
    d
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "k8s tier: needs scripts/build-k8s"]
async fn kube_drainer_cordons_evicts_and_uncordons() {
    let (_cp, client) = start().await;
    create(
        &client,
        "/api/v1/namespaces",
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "apps"}}),
    )
    .await;
    for n in ["n1", "n2"] {
        create(
            &client,
            "/api/v1/nodes",
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": n}}),
        )
        .await;
    }
    pod(&client, "web-1", "n1").await;
    pod(&client, "other", "n2").await;

    let d = drainer(&client, "n1");
    d.cordon().await.unwrap();
    assert!(client.get_node("n1").await.unwrap().spec.unschedulable);
    assert_eq!(
        d.drain(Duration::from_secs(30)).await.unwrap(),
        Drained::Drained
    );
    let left: Vec<String> = client
        .pods_on_node("n1")
        .await
        .unwrap()
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    assert!(left.is_empty(), "pods left on n1: {left:?}");
    assert_eq!(
        client.pods_on_node("n2").await.unwrap().len(),
        1,
        "n2 untouched"
    );
    d.uncordon().await.unwrap();
    assert!(!client.get_node("n1").await.unwrap().spec.unschedulable);
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "k8s tier: needs scripts/build-k8s"]
async fn kube_drainer_reports_a_drain_it_cannot_finish_as_postponed() {
    let (_cp, client) = start().await;
    // A Running pod guarded by a PodDisruptionBudget. Without a controller-manager the
    // PDB never computes status, so every eviction is refused (429) until the timeout.
    create(
        &client,
        "/api/v1/namespaces",
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "apps"}}),
    )
    .await;
    create(
        &client,
        "/api/v1/nodes",
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}}),
    )
    .await;
    create(
        &client,
        "/api/v1/namespaces/apps/pods",
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "db-0", "namespace": "apps", "labels": {"app": "db"}},
               "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "registry.invalid/pause:1"}]}}),
    )
    .await;
    // Mark it Running and Ready (status subresource), so the PDB applies to it (v1.20
    // evicts Pending pods regardless of PDBs).
    let _: Value = client
        .merge_patch(
            "/api/v1/namespaces/apps/pods/db-0/status",
            &json!({"status": {"phase": "Running",
                               "conditions": [{"type": "Ready", "status": "True"}]}}),
        )
        .await
        .unwrap();
    create(
        &client,
        "/apis/policy/v1beta1/namespaces/apps/poddisruptionbudgets",
        json!({"apiVersion": "policy/v1beta1", "kind": "PodDisruptionBudget",
               "metadata": {"name": "db", "namespace": "apps"},
               "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "db"}}}}),
    )
    .await;

    let d = drainer(&client, "n1");
    d.cordon().await.unwrap();
    match d.drain(Duration::from_secs(4)).await.unwrap() {
        Drained::Postponed { reason } => assert!(reason.contains("apps/db-0"), "{reason}"),
        other => panic!("expected a postponed drain, got {other:?}"),
    }
    assert_eq!(
        client.pods_on_node("n1").await.unwrap().len(),
        1,
        "the pod stays"
    );
}

/// `[drain] kubeconfig`: a node's imgupdate reads the API server, CA and token from a
/// kubeconfig file (kubectl's form with a CA file, and the guest form with the CA
/// embedded and `tls-server-name`), not from a pod's service account.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "k8s tier: needs scripts/build-k8s"]
async fn drainer_from_a_kubeconfig_file_cordons_and_uncordons() {
    let (cp, client) = start().await;
    create(
        &client,
        "/api/v1/nodes",
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "kc-node"}}),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let guest_form = dir.path().join("kubelet.conf");
    // What a QEMU guest gets, pointed at the host's loopback instead of 10.0.2.2.
    cp.write_kubeconfig_for(&cp.server, &guest_form).unwrap();
    for kubeconfig in [cp.kubeconfig.clone(), guest_form] {
        let cfg = imgupdate::config::Config::parse(
            &format!(
                "channel_url = \"file:///srv/channel\"\ntrusted_root = \"/r.json\"\n\
                 [drain]\nkubernetes = true\nnode_name = \"kc-node\"\nkubeconfig = \"{}\"\n",
                kubeconfig.display()
            ),
            "test",
        )
        .unwrap();
        let d = imgupdate::agent::kube_drainer(&cfg).unwrap().unwrap();
        d.cordon().await.unwrap();
        assert!(
            client.get_node("kc-node").await.unwrap().spec.unschedulable,
            "{}",
            kubeconfig.display()
        );
        d.uncordon().await.unwrap();
        assert!(!client.get_node("kc-node").await.unwrap().spec.unschedulable);
    }
}
