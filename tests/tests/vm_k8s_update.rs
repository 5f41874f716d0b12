//! VM tier, opt-in (issue 8): a Kubernetes node is updated the way a cluster operator
//! expects. A real control plane (etcd, kube-apiserver, kube-controller-manager and
//! kube-scheduler v1.20.2 from `scripts/build-k8s`) runs on 127.0.0.1; one QEMU node
//! built from `recipes/k8s-node.toml` + `recipes/k8s-node-local.toml` (the v1.20.2
//! kubelet, containerd) plus an `[update]` section registers with it and goes Ready.
//! A pod is bound to it; then v2 is published and imgupdate on the node takes the
//! FleetLock lock, cordons and drains the node through the API with the kubeconfig the
//! kubelet uses too (`[drain] kubeconfig`), kexecs into v2, checks containerd, the
//! kubelet unit and the kubelet's `/healthz`, commits and uncordons.
//!
//! Asserted through the API and the cluster status: cordoned before the kexec, the pod
//! evicted, v2 running after exactly one firmware boot and two kernel starts, the
//! health verdict, uncordoned and Ready on the new boot. A timeline with timings is
//! printed; images, channel and serial logs stay in target/e2e/k8s-update/ on failure
//! (removed after a pass). Run with
//! `cargo test -p imgbuild-tests --test vm_k8s_update -- --ignored --test-threads=1 --nocapture`
//! (needs `scripts/build-k8s`). Measured here (TCG, 2 shared cores, three runs): whole
//! test 584–786 s; VM start → node Ready 58–78 s; published → cordoned 172–255 s
//! (download and verification of the 2 GiB slot), → pod gone 176–259 s, → kexec
//! 192–275 s; kexec → Ready on v2 47–50 s; published → uncordoned 238–324 s.
//!
//! The guest reaches the host's 127.0.0.1 as 10.0.2.2; the API server's self-signed
//! certificate is checked against the DNS name `kubernetes` (`tls-server-name`).

#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use imgbuild::cluster::{Cluster, ClusterSpec, LockKind, NodeStatus};
use imgbuild::progress::Progress;
use imgbuild_tests::cluster::{cargo_build_imgupdate, tail, Channel};
use imgbuild_tests::{build_recipe_with, e2e_dir, workspace_root};
use imgcoord::fleetlock_server::EventKind;
use imgcoord::kube::{KubeClient, KubeConfig};
use imgkubetest::{ControlPlane, ControlPlaneOptions};
use serde_json::{json, Value};

const V1: &str = "1.20.2-1";
const V2: &str = "1.20.2-2";
/// The image's name, hence its host name, hence the Node name the kubelet registers
/// and the one imgupdate drains by default (`[drain] node_name` unset).
const NODE: &str = "k8s-e2e";
/// In the image: the kubelet's kubeconfig, which imgupdate reads too. Not under
/// /etc/kubernetes: that is bind-mounted from /var (kubeadm writes there).
const KUBECONFIG: &str = "/etc/imgbuild-e2e/kubelet.conf";
const NAMESPACE: &str = "e2e";
const POD: &str = "victim";

/// The node recipe: the repository's k8s recipes, the kubelet pointed at the test
/// control plane, and imgupdate with drain, kexec and kubelet health checks.
fn recipe(version: &str) -> String {
    format!(
        r#"include = "k8s-node-local.toml"

[image]
name = "{NODE}"
version = "{version}"
pretty_name = "imgbuild k8s e2e node {version}"

# No `kubeadm join`: the kubelet gets its kubeconfig (admin token, CA embedded) and a
# KubeletConfiguration from the image; /etc/default/kubelet overrides the kubeadm
# drop-in's paths (EnvironmentFile= wins over Environment=).
[[files]]
path = "{KUBECONFIG}"
source = "kubelet.conf"
mode = "0600"

[[files]]
path = "/etc/imgbuild-e2e/kubelet-config.yaml"
source = "kubelet-config.yaml"

[[files]]
path = "/etc/default/kubelet"
content = """
KUBELET_KUBECONFIG_ARGS=--kubeconfig={KUBECONFIG}
KUBELET_CONFIG_ARGS=--config=/etc/imgbuild-e2e/kubelet-config.yaml
KUBELET_EXTRA_ARGS=--container-runtime=remote --container-runtime-endpoint=unix:///run/containerd/containerd.sock --cgroup-driver=systemd
"""

# The updater's log on the serial console too, so a failure can be read there.
[[files]]
path = "/etc/systemd/system/imgupdate.service.d/console.conf"
content = "[Service]\nStandardError=journal+console\n"

[[files]]
path = "/etc/systemd/system/imgupdate-health.service.d/console.conf"
content = "[Service]\nStandardError=journal+console\n"

[update]
channel_url = "http://10.0.2.2:9/"
trusted_root = "root.json"
smbios_overrides = true
check_interval_secs = 10
strategy = "kexec"
drain_timeout_secs = 600

[update.metrics]
listen = "0.0.0.0:9548"

[update.lock]
backend = "fleetlock"
url = "http://10.0.2.2:9"

[update.drain]
kubernetes = true
kubeconfig = "{KUBECONFIG}"

[update.health]
deadline = "10m"
interval = "5s"
checks = [
  {{ kind = "units", units = ["containerd.service", "kubelet.service"] }},
  {{ kind = "http", url = "http://127.0.0.1:10248/healthz" }},
]
"#
    )
}

const KUBELET_CONFIG: &str = "apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: systemd
failSwapOn: false
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
authorization: {mode: AlwaysAllow}
staticPodPath: /etc/kubernetes/manifests
";

fn build_image(recipe: &Path, out: &Path) {
    build_recipe_with(recipe, out, &Progress::new(true)).unwrap();
}

/// Moments since the start, printed as they happen and as a table at the end.
struct Timeline {
    start: Instant,
    rows: Vec<(f64, String)>,
}

impl Timeline {
    fn note(&mut self, what: impl Into<String>) -> f64 {
        let t = self.start.elapsed().as_secs_f64();
        let what = what.into();
        eprintln!("[{t:>7.1}s] {what}");
        self.rows.push((t, what));
        t
    }

    fn print(&self) {
        eprintln!("--- timeline ---");
        for (t, what) in &self.rows {
            eprintln!("{t:>8.1}s  {what}");
        }
    }
}

/// What the API says about the node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct NodeView {
    exists: bool,
    ready: bool,
    unschedulable: bool,
    boot_id: String,
    os_image: String,
}

fn node_view(v: &Value) -> NodeView {
    let ready = v["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True");
    NodeView {
        exists: true,
        ready,
        unschedulable: v["spec"]["unschedulable"].as_bool().unwrap_or(false),
        boot_id: v["status"]["nodeInfo"]["bootID"]
            .as_str()
            .unwrap_or_default()
            .into(),
        os_image: v["status"]["nodeInfo"]["osImage"]
            .as_str()
            .unwrap_or_default()
            .into(),
    }
}

struct Env {
    rt: tokio::runtime::Runtime,
    client: KubeClient,
}

impl Env {
    fn node(&self) -> NodeView {
        match self
            .rt
            .block_on(self.client.get::<Value>(&format!("/api/v1/nodes/{NODE}")))
        {
            Ok(v) => node_view(&v),
            Err(e) if e.is_not_found() => NodeView::default(),
            Err(e) => panic!("reading node {NODE}: {e}"),
        }
    }

    /// The pod, `None` once it is gone.
    fn pod(&self) -> Option<Value> {
        match self.rt.block_on(
            self.client
                .get::<Value>(&format!("/api/v1/namespaces/{NAMESPACE}/pods/{POD}")),
        ) {
            Ok(v) => Some(v),
            Err(e) if e.is_not_found() => None,
            Err(e) => panic!("reading pod {POD}: {e}"),
        }
    }
}

fn fail(cluster: &Cluster, cp: &ControlPlane, tl: &Timeline, what: &str) -> ! {
    tl.print();
    eprintln!(
        "--- node serial tail ---\n{}",
        tail(&cluster.serial_history(0), 80)
    );
    eprintln!(
        "--- kube-apiserver log tail ---\n{}",
        cp.log_tail("kube-apiserver", 20)
    );
    panic!("{what} (serial logs in {})", cluster.dir().display());
}

fn status_line(st: &NodeStatus) -> String {
    format!(
        "imgupdate: {} {} {}{}",
        if st.reachable { "up" } else { "unreachable" },
        st.running_version.as_deref().unwrap_or("-"),
        st.state.as_deref().unwrap_or("-"),
        st.staged_version
            .as_deref()
            .map(|v| format!(" staged={v}"))
            .unwrap_or_default()
    )
}

fn kernel_starts(serial: &str) -> usize {
    serial.matches("Linux version").count()
}

#[test]
#[ignore = "VM tier: builds two k8s node images and boots one under QEMU with a real control plane"]
fn a_kubernetes_node_is_drained_kexeced_health_checked_and_uncordoned() {
    let t_all = Instant::now();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let cp = rt
        .block_on(ControlPlane::start(ControlPlaneOptions {
            // The node lifecycle controller marks the node NotReady while it kexecs.
            pdb_controller: true,
            ..Default::default()
        }))
        .expect("starting the control plane (run scripts/build-k8s)");
    let client = KubeClient::new(&KubeConfig {
        server: cp.server.clone(),
        token: cp.token.clone(),
        ca_pem: cp.ca_pem.clone(),
        timeout: Duration::from_secs(20),
        ..KubeConfig::default()
    })
    .unwrap();
    let env = Env { rt, client };
    eprintln!("control plane ready in {:.1?} at {}", cp.startup, cp.server);

    // Channel, recipes and both images.
    let bin = cargo_build_imgupdate();
    std::env::set_var(imgbuild::agent::IMGUPDATE_ENV, &bin);
    let work = e2e_dir("k8s-update");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).unwrap();
    let channel = Channel::create(&work, "stable");
    let recipes = work.join("recipes");
    fs::create_dir_all(&recipes).unwrap();
    for r in ["k8s-node.toml", "k8s-node-local.toml"] {
        fs::copy(workspace_root().join("recipes").join(r), recipes.join(r)).unwrap();
    }
    fs::copy(
        channel.dir.join("metadata/1.root.json"),
        recipes.join("root.json"),
    )
    .unwrap();
    cp.write_kubeconfig_for(
        &format!("https://{}:{}", imgbuild::cluster::HOST_FROM_GUEST, cp.port),
        &recipes.join("kubelet.conf"),
    )
    .unwrap();
    // What the node's imgupdate will read, read here by the same code first.
    let parsed = KubeConfig::from_kubeconfig_file(&recipes.join("kubelet.conf")).unwrap();
    assert_eq!(parsed.tls_server_name.as_deref(), Some("kubernetes"));
    // ... and used from here (same certificate name, the host's address).
    let from_host = KubeClient::new(&KubeConfig {
        server: cp.server.clone(),
        ..parsed
    })
    .unwrap();
    let _: Value = env.rt.block_on(from_host.get("/api/v1/nodes")).unwrap();
    fs::write(recipes.join("kubelet-config.yaml"), KUBELET_CONFIG).unwrap();
    // The disk is shared and small: every file is removed as soon as nothing needs it
    // (publishing reads the root image, the VM boots v1's qcow2).
    let mut build_secs = Vec::new();
    for v in [V1, V2] {
        let path = recipes.join(format!("node-{v}.toml"));
        fs::write(&path, recipe(v)).unwrap();
        let started = Instant::now();
        let out = work.join(format!("out-{v}"));
        build_image(&path, &out);
        build_secs.push(started.elapsed().as_secs_f64());
        eprintln!(
            "built {NODE} {v} in {:.0}s",
            started.elapsed().as_secs_f64()
        );
        fs::remove_file(out.join(format!("{NODE}-{v}.raw"))).unwrap();
        if v == V1 {
            let started = Instant::now();
            channel.publish(V1);
            eprintln!("published {V1} in {:.0}s", started.elapsed().as_secs_f64());
            fs::remove_file(out.join(format!("{NODE}-{v}.root.ext4"))).unwrap();
        } else {
            fs::remove_file(out.join(format!("{NODE}-{v}.qcow2"))).unwrap();
        }
    }

    // One node, FleetLock lock.
    let image = work.join(format!("out-{V1}/{NODE}-{V1}.qcow2"));
    let mut spec = ClusterSpec::new("k8s", &image, 1, &work.join("cluster"));
    spec.channel = Some(channel.dir.clone());
    spec.lock = LockKind::Fleetlock;
    spec.lock_slots = 1;
    spec.memory_mib = 2048;
    spec.disk_size = 8 << 30;
    let cluster = Cluster::up(spec).unwrap();
    let mut tl = Timeline {
        start: Instant::now(),
        rows: vec![],
    };
    tl.note(format!("VM started ({V1})"));

    // Registered and Ready on v1.
    let deadline = Instant::now() + Duration::from_secs(900);
    let mut last_status = String::new();
    let mut last_node = NodeView::default();
    let first = loop {
        let st = &cluster.status()[0];
        let line = status_line(st);
        if line != last_status {
            tl.note(&line);
            last_status = line;
        }
        let n = env.node();
        if n.exists && !last_node.exists {
            tl.note(format!("node {NODE} registered"));
        }
        last_node = n.clone();
        if n.ready && st.running_version.as_deref() == Some(V1) {
            break n;
        }
        if Instant::now() > deadline {
            fail(&cluster, &cp, &tl, "the node did not become Ready on v1");
        }
        std::thread::sleep(Duration::from_secs(2));
    };
    let t_ready1 = tl.note(format!(
        "node Ready on {V1} (osImage {:?}, bootID {})",
        first.os_image, first.boot_id
    ));
    assert!(!first.unschedulable);
    assert!(first.os_image.contains(V1), "{first:?}");

    // A pod bound to the node. Nothing can pull its image; a drain evicts it anyway.
    let _: Value = env
        .rt
        .block_on(env.client.create(
            "/api/v1/namespaces",
            &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}),
        ))
        .unwrap();
    let _: Value = env
        .rt
        .block_on(env.client.create(
            &format!("/api/v1/namespaces/{NAMESPACE}/pods"),
            &json!({"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": POD, "namespace": NAMESPACE},
                    "spec": {"nodeName": NODE,
                             "containers": [{"name": "c", "image": "registry.invalid/pause:1"}]}}),
        ))
        .unwrap();
    tl.note(format!("pod {NAMESPACE}/{POD} bound to {NODE}"));
    // The kubelet takes it on (reports a status) before the update starts.
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let p = env.pod().expect("the pod vanished before the update");
        if p["status"]["conditions"]
            .as_array()
            .is_some_and(|c| !c.is_empty())
        {
            tl.note(format!(
                "kubelet reports the pod: phase {}",
                p["status"]["phase"].as_str().unwrap_or("?")
            ));
            break;
        }
        if Instant::now() > deadline {
            tl.note("the kubelet did not report the pod within 180 s (continuing)");
            break;
        }
        std::thread::sleep(Duration::from_secs(2));
    }

    // Publish v2 and watch.
    let t_publish_start = tl.note(format!("publishing {V2}"));
    channel.publish(V2);
    let t_published = tl.note(format!("published {V2}"));
    let mut t_cordoned: Option<f64> = None;
    let mut cordoned_on_old_boot = false;
    let mut t_pod_terminating: Option<f64> = None;
    let mut t_pod_gone: Option<f64> = None;
    let mut pod_gone_before_kexec = false;
    let mut t_kexec: Option<f64> = None;
    let mut t_not_ready: Option<f64> = None;
    let mut t_ready2: Option<f64> = None;
    let mut t_uncordoned: Option<f64> = None;
    let mut seen_events = 0;
    let deadline = Instant::now() + Duration::from_secs(2400);
    let last = loop {
        let history = cluster.lock_history();
        for e in history.iter().skip(seen_events) {
            if !matches!(e.kind, EventKind::Refused | EventKind::Renewed) {
                tl.note(format!("lock {:?} by {}", e.kind, e.id));
            }
        }
        seen_events = history.len();
        let st = cluster.status()[0].clone();
        let line = status_line(&st);
        if line != last_status {
            tl.note(&line);
            last_status = line;
        }
        let serial = cluster.serial_history(0);
        if t_kexec.is_none() && kernel_starts(&serial) >= 2 {
            t_kexec = Some(tl.note("second kernel started (kexec)"));
        }
        let n = env.node();
        let new_boot = n.exists && n.boot_id != first.boot_id;
        if n.unschedulable && t_cordoned.is_none() {
            t_cordoned = Some(tl.note("node cordoned (spec.unschedulable)"));
            cordoned_on_old_boot = !new_boot && t_kexec.is_none();
        }
        if t_pod_gone.is_none() {
            match env.pod() {
                Some(p) => {
                    if t_pod_terminating.is_none() && !p["metadata"]["deletionTimestamp"].is_null()
                    {
                        t_pod_terminating = Some(tl.note("pod terminating (evicted)"));
                    }
                }
                None => {
                    t_pod_gone = Some(tl.note("pod gone"));
                    pod_gone_before_kexec = t_kexec.is_none();
                }
            }
        }
        if n.ready != last_node.ready || n.boot_id != last_node.boot_id {
            tl.note(format!(
                "node {} bootID {} osImage {:?}",
                if n.ready { "Ready" } else { "NotReady" },
                n.boot_id,
                n.os_image
            ));
        }
        if !n.ready && t_cordoned.is_some() && t_not_ready.is_none() {
            t_not_ready = Some(tl.elapsed());
        }
        if new_boot && n.ready && t_ready2.is_none() {
            t_ready2 = Some(tl.note(format!("node Ready on the new boot ({})", n.os_image)));
        }
        // imgupdate uncordons after the health checks, possibly before the kubelet
        // has reported the new boot: the kexec seen on the console is the reference.
        if t_kexec.is_some() && t_cordoned.is_some() && !n.unschedulable && t_uncordoned.is_none() {
            t_uncordoned = Some(tl.note("node uncordoned"));
        }
        last_node = n.clone();
        let committed = st.running_version.as_deref() == Some(V2)
            && matches!(st.state.as_deref(), Some("idle" | "committed"));
        if t_uncordoned.is_some() && committed && t_ready2.is_some() && n.ready && new_boot {
            break n;
        }
        if Instant::now() > deadline {
            fail(
                &cluster,
                &cp,
                &tl,
                "timed out waiting for the node to be updated, Ready and uncordoned",
            );
        }
        std::thread::sleep(Duration::from_secs(2));
    };
    tl.note(format!("{NODE} on {V2}: committed, Ready, schedulable"));
    tl.print();

    let serial = cluster.serial_history(0);
    let st = cluster.status()[0].clone();
    let since =
        |t: Option<f64>, from: f64| t.map(|t| format!("{:.0}s", t - from)).unwrap_or("-".into());
    eprintln!("--- figures ---");
    eprintln!(
        "control plane ready          {:.1}s",
        cp.startup.as_secs_f64()
    );
    eprintln!(
        "image builds                 {V1} {:.0}s, {V2} {:.0}s",
        build_secs[0], build_secs[1]
    );
    eprintln!("VM start -> node Ready (v1)  {t_ready1:.0}s");
    eprintln!(
        "publish {V2}                 {:.0}s",
        t_published - t_publish_start
    );
    eprintln!(
        "published -> cordoned        {}",
        since(t_cordoned, t_published)
    );
    eprintln!(
        "published -> pod gone        {}",
        since(t_pod_gone, t_published)
    );
    eprintln!(
        "published -> kexec           {}",
        since(t_kexec, t_published)
    );
    eprintln!(
        "kexec -> NotReady seen       {}",
        since(t_not_ready, t_kexec.unwrap_or(0.0))
    );
    eprintln!(
        "kexec -> Ready on v2         {}",
        since(t_ready2, t_kexec.unwrap_or(0.0))
    );
    eprintln!(
        "kexec -> uncordoned          {}",
        since(t_uncordoned, t_kexec.unwrap_or(0.0))
    );
    eprintln!(
        "published -> uncordoned      {}",
        since(t_uncordoned, t_published)
    );
    eprintln!(
        "whole test                   {:.0}s",
        t_all.elapsed().as_secs_f64()
    );

    // Cordoned and drained before the kexec.
    let t_kexec = t_kexec.unwrap_or_else(|| fail(&cluster, &cp, &tl, "no kexec seen"));
    assert!(
        cordoned_on_old_boot,
        "the node was not cordoned before the kexec"
    );
    assert!(
        t_cordoned.unwrap() < t_kexec,
        "cordoned at {t_cordoned:?}, kexec at {t_kexec}"
    );
    assert!(
        pod_gone_before_kexec && t_pod_gone.unwrap() <= t_kexec,
        "the pod was not evicted before the kexec (gone at {t_pod_gone:?}, kexec at {t_kexec})"
    );
    // kexec, not the firmware: one firmware boot (power-on), two kernels.
    assert_eq!(
        (
            serial.matches("BdsDxe: loading").count(),
            kernel_starts(&serial)
        ),
        (1, 2),
        "firmware boots and kernel starts"
    );
    // v2 runs from the other slot, the health checks passed and the slot is committed.
    assert_eq!(st.running_version.as_deref(), Some(V2));
    assert_eq!(st.running_slot.as_deref(), Some("b"));
    assert!(
        serial.contains("verdict=Pass"),
        "no passing health verdict on the console"
    );
    assert!(last.os_image.contains(V2), "{last:?}");
    assert!(last.ready && !last.unschedulable, "{last:?}");
    assert_ne!(last.boot_id, first.boot_id);
    // The lock was taken by this node and given back after the commit.
    let history = cluster.lock_history();
    let id = &cluster.info().nodes[0].name;
    assert!(
        history
            .iter()
            .any(|e| e.kind == EventKind::Acquired && &e.id == id),
        "{history:#?}"
    );
    assert!(
        history
            .iter()
            .any(|e| e.kind == EventKind::Released && &e.id == id),
        "{history:#?}"
    );
    cluster.down().unwrap();
    drop(cp);
    // Images and channel (about 2.5 GB) are only worth keeping when something failed.
    fs::remove_dir_all(&work).unwrap();
}

impl Timeline {
    fn elapsed(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }
}
