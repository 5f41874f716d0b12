//! The Lease lock backend and the drain against a real kube-apiserver v1.20.2 (etcd +
//! apiserver, plus controller-manager where PodDisruptionBudget status is needed).
//! k8s tier: needs the binaries from `scripts/build-k8s`; these tests fail, not skip,
//! without them.

#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use std::sync::Arc;
use std::time::Duration;

use imgcoord::drain::{self, DrainOptions, DrainOutcome, SkipReason};
use imgcoord::kube::{EvictionVersion, KubeClient, KubeConfig, Lease};
use imgcoord::lock::kubernetes::{LeaseLock, LeaseLockConfig};
use imgcoord::lock::{LockError, NodeIdentity, RebootLock};
use imgkubetest::{ControlPlane, ControlPlaneOptions};
use serde_json::{json, Value};

async fn control_plane(pdb_controller: bool) -> (ControlPlane, KubeClient) {
    let cp = ControlPlane::start(ControlPlaneOptions {
        pdb_controller,
        ..Default::default()
    })
    .await
    .expect("starting the test control plane");
    eprintln!("control plane ready in {:.1?}", cp.startup);
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

async fn namespace(client: &KubeClient, name: &str) {
    let _: Value = client
        .create(
            "/api/v1/namespaces",
            &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}),
        )
        .await
        .unwrap();
}

fn lock(client: &KubeClient, id: &str, slots: u32, secs: u64) -> LeaseLock {
    LeaseLock::new(
        client.clone(),
        LeaseLockConfig {
            namespace: "locks".into(),
            node: NodeIdentity {
                id: id.into(),
                group: "workers".into(),
            },
            slots,
            lease_duration: Duration::from_secs(secs),
        },
    )
    .unwrap()
}

/// `[lock] backend = "kubernetes"` with `kubeconfig`: a node's imgupdate takes the Lease
/// lock with the credentials of a kubeconfig file (kubectl's form, CA in a file), through
/// the same `open_lock` the updater calls.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "k8s tier: needs scripts/build-k8s"]
async fn lease_lock_opened_from_a_kubeconfig_file() {
    let (cp, client) = control_plane(false).await;
    namespace(&client, "locks").await;
    let mut config: imgcoord::config::LockConfig =
        toml::from_str("backend = \"kubernetes\"\nnamespace = \"locks\"\ngroup = \"workers\"")
            .unwrap();
    config.kubeconfig = Some(cp.kubeconfig.clone());
    let id = NodeIdentity {
        id: "kc-node".into(),
        group: "ignored".into(),
    };
    let l = imgcoord::config::open_lock(&config, &id).unwrap();
    assert!(l.try_acquire().await.unwrap());
    assert_eq!(l.holders().await.unwrap(), vec!["kc-node".to_string()]);
    // Another node, same file, same group: the one slot is taken.
    let other = imgcoord::config::open_lock(
        &config,
        &NodeIdentity {
            id: "kc-other".into(),
            group: "ignored".into(),
        },
    )
    .unwrap();
    assert!(!other.try_acquire().await.unwrap());
    l.release().await.unwrap();
    assert!(other.try_acquire().await.unwrap());
    other.release().await.unwrap();
    assert!(l.holders().await.unwrap().is_empty());
}

/// `clients` nodes contend for `slots` slots over several rounds: in every round exactly
/// `min(slots, waiting)` win, and there are never more than `slots` holders.
async fn contend(clients: usize, slots: u32) {
    let (_cp, client) = control_plane(false).await;
    namespace(&client, "locks").await;
    let locks: Vec<Arc<LeaseLock>> = (0..clients)
        .map(|i| Arc::new(lock(&client, &format!("node-{i}"), slots, 60)))
        .collect();
    let mut done = vec![false; clients];
    let mut rounds = 0;
    while done.iter().any(|d| !d) {
        rounds += 1;
        assert!(rounds <= clients + 1, "no progress");
        let tasks: Vec<_> = locks
            .iter()
            .enumerate()
            .filter(|(i, _)| !done[*i])
            .map(|(i, l)| {
                let l = l.clone();
                tokio::spawn(async move { (i, l.try_acquire().await) })
            })
            .collect();
        let mut winners = Vec::new();
        for t in tasks {
            let (i, got) = t.await.unwrap();
            match got {
                Ok(true) => winners.push(i),
                Ok(false) => {}
                // Losing every race is allowed; exceeding N is not.
                Err(LockError::Conflict(_)) => {}
                Err(e) => panic!("node-{i}: {e}"),
            }
        }
        let holders = locks[0].holders().await.unwrap();
        assert!(
            holders.len() <= slots as usize,
            "round {rounds}: {holders:?} exceed {slots} slots"
        );
        let waiting = done.iter().filter(|d| !**d).count();
        assert_eq!(
            winners.len(),
            waiting.min(slots as usize),
            "round {rounds}: winners {winners:?}, holders {holders:?}"
        );
        let mut expect: Vec<String> = winners.iter().map(|i| format!("node-{i}")).collect();
        expect.sort();
        assert_eq!(holders, expect);
        // Idempotent: a holder asking again still holds exactly one slot.
        assert!(locks[winners[0]].try_acquire().await.unwrap());
        assert_eq!(locks[0].holders().await.unwrap().len(), winners.len());
        // A loser asking again while the slots are full gets false.
        if let Some(loser) = (0..clients).find(|i| !done[*i] && !winners.contains(i)) {
            assert!(!locks[loser].try_acquire().await.unwrap());
        }
        for i in winners {
            locks[i].release().await.unwrap();
            done[i] = true;
        }
        assert!(locks[0].holders().await.unwrap().is_empty());
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "k8s tier: needs scripts/build-k8s"]
async fn lease_lock_two_clients_one_slot() {
    contend(2, 1).await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "k8s tier: needs scripts/build-k8s"]
async fn lease_lock_five_clients_two_slots() {
    contend(5, 2).await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "k8s tier: needs scripts/build-k8s"]
async fn lease_lock_expiry_frees_a_dead_holder() {
    let (_cp, client) = control_plane(false).await;
    namespace(&client, "locks").await;
    let a = lock(&client, "node-a", 1, 2);
    let b = lock(&client, "node-b", 1, 2);
    assert!(a.try_acquire().await.unwrap());
    assert!(!b.try_acquire().await.unwrap());
    // A renews: still held after more than one lease duration.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(900)).await;
        a.renew().await.unwrap();
    }
    assert!(!b.try_acquire().await.unwrap(), "renewed lease still held");
    // A "dies": stops renewing.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(a.holders().await.unwrap().is_empty(), "expired");
    assert!(b.try_acquire().await.unwrap(), "expired slot is taken over");
    assert_eq!(b.holders().await.unwrap(), vec!["node-b".to_string()]);
    // The old holder cannot renew a slot that changed hands.
    assert!(matches!(a.renew().await, Err(LockError::Refused(_))));
    // Releasing what one does not hold is a no-op.
    a.release().await.unwrap();
    assert_eq!(b.holders().await.unwrap(), vec!["node-b".to_string()]);
    let lease = client
        .get_lease("locks", &b.slot_name(0))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(lease.spec.lease_transitions, Some(2));
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "k8s tier: needs scripts/build-k8s"]
async fn lease_stale_resource_version_conflicts_and_failed_releases_are_shared() {
    let (_cp, client) = control_plane(false).await;
    namespace(&client, "locks").await;
    let a = lock(&client, "node-a", 1, 60);
    assert!(a.try_acquire().await.unwrap());
    let name = a.slot_name(0);
    let read: Lease = client.get_lease("locks", &name).await.unwrap().unwrap();
    let mut first = read.clone();
    first.spec.holder_identity = Some("intruder-1".into());
    client.update_lease("locks", &first).await.unwrap();
    // A second writer still holding the old resourceVersion is rejected.
    let mut stale = read.clone();
    stale.spec.holder_identity = Some("intruder-2".into());
    let e = client.update_lease("locks", &stale).await.unwrap_err();
    assert!(e.is_conflict(), "{e}");
    // Creating an existing slot conflicts as well.
    let mut dup = read.clone();
    dup.metadata.resource_version = None;
    assert!(client
        .create_lease("locks", &dup)
        .await
        .unwrap_err()
        .is_conflict());
    assert_eq!(
        a.holders().await.unwrap(),
        vec!["intruder-1".to_string()],
        "only the fresh write landed"
    );

    // Failed releases are recorded where the lock lives and seen by every node.
    let b = lock(&client, "node-b", 1, 60);
    assert!(b.failed_releases().await.unwrap().is_empty());
    a.mark_release_failed("2026.11.2", "kubelet unhealthy")
        .await
        .unwrap();
    a.mark_release_failed("2026.11.2", "again").await.unwrap();
    b.mark_release_failed("2026.11.3", "degraded")
        .await
        .unwrap();
    let failed = b.failed_releases().await.unwrap();
    assert_eq!(failed.len(), 2, "{failed:?}");
    assert_eq!(failed[0].version, "2026.11.2");
    assert_eq!(failed[0].node, "node-a");
    assert_eq!(failed[0].reason, "kubelet unhealthy");
    assert_eq!(failed[1].node, "node-b");
}

// ---------------------------------------------------------------------------------------
// Drain

async fn node(client: &KubeClient, name: &str) {
    let _: Value = client
        .create(
            "/api/v1/nodes",
            &json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}}),
        )
        .await
        .unwrap();
}

async fn pod(client: &KubeClient, ns: &str, name: &str, node: &str, meta_extra: Value) {
    let mut metadata = json!({"name": name, "namespace": ns, "labels": {"app": "web"}});
    if let (Some(m), Some(extra)) = (metadata.as_object_mut(), meta_extra.as_object()) {
        for (k, v) in extra {
            m.insert(k.clone(), v.clone());
        }
    }
    let _: Value = client
        .create(
            &format!("/api/v1/namespaces/{ns}/pods"),
            &json!({
                "apiVersion": "v1", "kind": "Pod", "metadata": metadata,
                "spec": {"nodeName": node, "containers": [{"name": "c", "image": "registry.invalid/pause:1"}]}
            }),
        )
        .await
        .unwrap();
}

/// No kubelet runs: mark the pod Running and Ready ourselves (status subresource), so
/// that PodDisruptionBudgets count it (v1.20 evicts Pending pods regardless of PDBs).
async fn running(client: &KubeClient, ns: &str, name: &str) {
    let _: Value = client
        .merge_patch(
            &format!("/api/v1/namespaces/{ns}/pods/{name}/status"),
            &json!({"status": {"phase": "Running", "conditions": [
                {"type": "Ready", "status": "True"}, {"type": "ContainersReady", "status": "True"}
            ]}}),
        )
        .await
        .unwrap();
}

async fn pdb(client: &KubeClient, ns: &str, min_available: i64) {
    let _: Value = client
        .create(
            &format!("/apis/policy/v1beta1/namespaces/{ns}/poddisruptionbudgets"),
            &json!({
                "apiVersion": "policy/v1beta1", "kind": "PodDisruptionBudget",
                "metadata": {"name": "web", "namespace": ns},
                "spec": {"minAvailable": min_available, "selector": {"matchLabels": {"app": "web"}}}
            }),
        )
        .await
        .unwrap();
}

/// Wait until the disruption controller has computed the PDB's status.
async fn pdb_allows(client: &KubeClient, ns: &str, allowed: i64) {
    for _ in 0..120 {
        let p: Value = client
            .get(&format!(
                "/apis/policy/v1beta1/namespaces/{ns}/poddisruptionbudgets/web"
            ))
            .await
            .unwrap();
        if p["status"]["observedGeneration"] == p["metadata"]["generation"]
            && p["status"]["disruptionsAllowed"] == allowed
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("PDB never allowed {allowed} disruptions");
}

async fn pod_names(client: &KubeClient, node: &str) -> Vec<String> {
    let mut v: Vec<String> = client
        .pods_on_node(node)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    v.sort();
    v
}

fn quick(timeout_secs: u64) -> DrainOptions {
    DrainOptions {
        timeout: Duration::from_secs(timeout_secs),
        retry_interval: Duration::from_millis(500),
        // No kubelet: let the API server delete evicted pods at once.
        grace_period_seconds: Some(0),
        force_after_timeout: false,
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "k8s tier: needs scripts/build-k8s"]
async fn drain_cordons_evicts_skips_daemonset_and_mirror_pods_then_uncordons() {
    let (_cp, client) = control_plane(false).await;
    assert_eq!(
        client.eviction_version().await.unwrap(),
        EvictionVersion::V1beta1,
        "v1.20 serves Eviction only as policy/v1beta1"
    );
    namespace(&client, "apps").await;
    node(&client, "n1").await;
    node(&client, "n2").await;
    pod(&client, "apps", "web-1", "n1", json!({})).await;
    pod(&client, "apps", "web-2", "n1", json!({})).await;
    pod(&client, "apps", "other", "n2", json!({})).await;
    pod(
        &client,
        "apps",
        "agent",
        "n1",
        json!({"ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "agent",
            "uid": "0b9a6c3e-1111-4c1d-9a0e-000000000001", "controller": true}]}),
    )
    .await;
    pod(
        &client,
        "apps",
        "static-n1",
        "n1",
        json!({"annotations": {"kubernetes.io/config.mirror": "abc"}}),
    )
    .await;

    let outcome = drain::drain(&client, "n1", &quick(30)).await.unwrap();
    let DrainOutcome::Drained {
        evicted,
        skipped,
        forced,
    } = outcome
    else {
        panic!("not drained: {outcome:?}")
    };
    let names: Vec<&str> = evicted.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["web-1", "web-2"]);
    assert!(forced.is_empty());
    let skipped: Vec<(&str, SkipReason)> =
        skipped.iter().map(|(p, r)| (p.name.as_str(), *r)).collect();
    assert_eq!(
        skipped,
        [
            ("agent", SkipReason::DaemonSet),
            ("static-n1", SkipReason::Mirror)
        ]
    );
    assert!(
        client.get_node("n1").await.unwrap().spec.unschedulable,
        "cordoned"
    );
    assert!(!client.get_node("n2").await.unwrap().spec.unschedulable);
    assert_eq!(pod_names(&client, "n1").await, ["agent", "static-n1"]);
    assert_eq!(
        pod_names(&client, "n2").await,
        ["other"],
        "other nodes untouched"
    );

    drain::uncordon(&client, "n1").await.unwrap();
    assert!(!client.get_node("n1").await.unwrap().spec.unschedulable);
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "k8s tier: needs scripts/build-k8s"]
async fn drain_waits_for_the_pdb_and_finishes_when_it_allows() {
    let (_cp, client) = control_plane(true).await;
    namespace(&client, "apps").await;
    node(&client, "n1").await;
    node(&client, "n2").await;
    for p in ["web-1", "web-2"] {
        pod(&client, "apps", p, "n1", json!({})).await;
        running(&client, "apps", p).await;
    }
    pdb(&client, "apps", 1).await;
    pdb_allows(&client, "apps", 1).await;

    let c = client.clone();
    let task = tokio::spawn(async move { drain::drain(&c, "n1", &quick(90)).await });
    // One pod goes; the PDB then holds the other back (429, retried).
    let mut left = Vec::new();
    for _ in 0..60 {
        left = pod_names(&client, "n1").await;
        if left.len() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(left.len(), 1, "{left:?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(pod_names(&client, "n1").await, left, "PDB honoured");
    assert!(!task.is_finished());
    // A replacement becomes ready elsewhere: the budget allows one more disruption.
    pod(&client, "apps", "web-3", "n2", json!({})).await;
    running(&client, "apps", "web-3").await;
    let outcome = tokio::time::timeout(Duration::from_secs(90), task)
        .await
        .expect("drain finishes")
        .unwrap()
        .unwrap();
    match outcome {
        DrainOutcome::Drained {
            evicted, forced, ..
        } => {
            assert_eq!(evicted.len(), 2, "{evicted:?}");
            assert!(forced.is_empty());
        }
        other => panic!("{other:?}"),
    }
    assert!(pod_names(&client, "n1").await.is_empty());
    assert!(client.get_node("n1").await.unwrap().spec.unschedulable);
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "k8s tier: needs scripts/build-k8s"]
async fn drain_timeout_postpones_and_uncordons_unless_forced() {
    let (_cp, client) = control_plane(true).await;
    namespace(&client, "apps").await;
    node(&client, "n1").await;
    for p in ["web-1", "web-2"] {
        pod(&client, "apps", p, "n1", json!({})).await;
        running(&client, "apps", p).await;
    }
    pdb(&client, "apps", 2).await;
    pdb_allows(&client, "apps", 0).await;

    let outcome = drain::drain(&client, "n1", &quick(4)).await.unwrap();
    match &outcome {
        DrainOutcome::Postponed { evicted, remaining } => {
            assert!(evicted.is_empty());
            let names: Vec<&str> = remaining.iter().map(|(p, _)| p.name.as_str()).collect();
            assert_eq!(names, ["web-1", "web-2"]);
            assert!(
                remaining[0].1.contains("disruption budget"),
                "reason names the PDB: {}",
                remaining[0].1
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(
        !client.get_node("n1").await.unwrap().spec.unschedulable,
        "a postponed drain uncordons"
    );
    assert_eq!(pod_names(&client, "n1").await, ["web-1", "web-2"]);

    let mut forced_opts = quick(3);
    forced_opts.force_after_timeout = true;
    match drain::drain(&client, "n1", &forced_opts).await.unwrap() {
        DrainOutcome::Drained {
            evicted, forced, ..
        } => {
            assert!(evicted.is_empty());
            assert_eq!(forced.len(), 2);
        }
        other => panic!("{other:?}"),
    }
    assert!(pod_names(&client, "n1").await.is_empty());
    assert!(client.get_node("n1").await.unwrap().spec.unschedulable);
}
