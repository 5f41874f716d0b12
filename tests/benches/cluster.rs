//! Cluster benchmark (issue 7): from one run, prints
//! - time from publish to every node healthy on the new version, for N=1 and N=3
//!   (kexec, lock max 1), and the lock overhead N=3 / N=1 (goal ≤ 3.3);
//! - reboot to healthy (lock taken -> running the new version, committed) by kexec
//!   versus through the firmware, same update, one node (goal kexec ≤ 0.5x).
//!
//! `cargo bench -p imgbuild-tests --bench cluster` (or `bench/cluster.sh`). Builds the
//! node images the cluster tier uses (target/e2e/cluster) and boots QEMU under TCG: it
//! takes a while, and the figures depend on what else the machine runs.

#![allow(clippy::unwrap_used)] // a benchmark: a failure aborts it loudly

use std::time::Instant;

use imgbuild::cluster::{Cluster, ClusterSpec, LockKind};
use imgbuild_tests::cluster::{fixture, on, scratch, wait_until, Timeline, V1, V2};
use imgcoord::fleetlock_server::EventKind;

struct Figures {
    publish_to_healthy: f64,
    /// Per node: lock acquired -> healthy on the new version.
    reboot_to_healthy: Vec<f64>,
}

fn scenario(name: &str, nodes: usize, firmware: bool) -> Figures {
    let f = fixture();
    let channel = f.channel_copy(&format!("bench-{name}-channel"));
    let mut spec = ClusterSpec::new(
        name,
        &f.image(V1),
        nodes,
        &scratch(&format!("bench-{name}")),
    );
    spec.channel = Some(channel.dir.clone());
    spec.lock = LockKind::Fleetlock;
    spec.lock_slots = 1;
    if firmware {
        spec.oem_strings = vec![format!("{}strategy=reboot", imgupdate::smbios::PREFIX)];
    }
    let cluster = Cluster::up(spec).unwrap();
    let mut tl = Timeline::default();
    wait_until(&cluster, &mut tl, 900, "nodes up on 1.0.0", |st| {
        st.iter().all(|s| on(s, V1))
    });
    channel.publish(V2);
    let published = Instant::now();
    let mut locked: Vec<Option<Instant>> = vec![None; nodes];
    let mut healthy: Vec<Option<Instant>> = vec![None; nodes];
    wait_until(&cluster, &mut tl, 3600, "every node on 1.0.1", |st| {
        let history = cluster.lock_history();
        for (i, n) in cluster.info().nodes.iter().enumerate() {
            if locked[i].is_none()
                && history
                    .iter()
                    .any(|e| e.id == n.name && e.kind == EventKind::Acquired)
            {
                locked[i] = Some(Instant::now());
            }
            if healthy[i].is_none() && on(&st[i], V2) {
                healthy[i] = Some(Instant::now());
            }
        }
        healthy.iter().all(Option::is_some)
    });
    tl.print();
    let publish_to_healthy = published.elapsed().as_secs_f64();
    let reboot_to_healthy = locked
        .iter()
        .zip(&healthy)
        .map(|(l, h)| {
            let (l, h) = (l.unwrap_or(published), h.unwrap());
            h.saturating_duration_since(l).as_secs_f64()
        })
        .collect();
    cluster.down().unwrap();
    Figures {
        publish_to_healthy,
        reboot_to_healthy,
    }
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len().max(1) as f64
}

fn main() {
    // `cargo bench` passes --bench; `cargo test` builds benches too but must not run this.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let started = Instant::now();
    let one = scenario("n1", 1, false);
    let three = scenario("n3", 3, false);
    let fw = scenario("fw", 1, true);
    let kexec_reboot = mean(&one.reboot_to_healthy);
    let fw_reboot = mean(&fw.reboot_to_healthy);
    println!();
    println!("cluster benchmark (TCG, -smp 1 per guest, 2 host cores), 1.0.0 -> 1.0.1");
    println!("{:<52} {:>9}", "figure", "value");
    println!(
        "{:<52} {:>8.0}s",
        "publish -> all healthy, N=1 (kexec)", one.publish_to_healthy
    );
    println!(
        "{:<52} {:>8.0}s",
        "publish -> all healthy, N=3 (kexec, lock max 1)", three.publish_to_healthy
    );
    println!(
        "{:<52} {:>8.2}x  (goal <= 3.3x)",
        "lock overhead: N=3 wall / N=1 wall",
        three.publish_to_healthy / one.publish_to_healthy
    );
    println!(
        "{:<52} {:>8.0}s",
        "reboot -> healthy by kexec (lock taken -> committed)", kexec_reboot
    );
    println!(
        "{:<52} {:>8.0}s",
        "reboot -> healthy through the firmware", fw_reboot
    );
    println!(
        "{:<52} {:>8.2}x  (goal <= 0.5x)",
        "kexec / firmware",
        kexec_reboot / fw_reboot
    );
    println!(
        "{:<52} {:>8.0}s",
        "N=3 per-node reboot -> healthy (mean)",
        mean(&three.reboot_to_healthy)
    );
    println!(
        "(benchmark wall time {:.0} min)",
        started.elapsed().as_secs_f64() / 60.0
    );
}
