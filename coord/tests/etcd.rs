//! The etcd semaphore against a real etcd (Debian's `/usr/bin/etcd`) started by each
//! test on 127.0.0.1 with free ports and a temporary data directory.

#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use imgcoord::lock::etcd::{EtcdLock, EtcdOptions};
use imgcoord::lock::{LockError, NodeIdentity, RebootLock};
use imgkubetest::{free_port, Etcd};

/// A real etcd on free 127.0.0.1 ports, killed on drop (shared with imgkubetest).
async fn etcd() -> Etcd {
    Etcd::start().await.expect("starting etcd")
}

fn lock(etcd: &Etcd, id: &str, slots: usize, ttl: Duration) -> EtcdLock {
    let options = EtcdOptions {
        slots,
        ttl,
        max_hold: Duration::from_secs(300),
        request_timeout: Duration::from_secs(5),
    };
    let identity = NodeIdentity {
        id: id.to_string(),
        group: "default".to_string(),
    };
    EtcdLock::new(&etcd.url, identity, options).unwrap()
}

/// Number of raw slot keys in etcd right now (not what the clients think).
async fn raw_slot_keys(http: &reqwest::Client, url: &str) -> usize {
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let answer: serde_json::Value = http
        .post(format!("{url}/v3/kv/range"))
        .json(&serde_json::json!({
            "key": b64("/imgbuild/lock/default/slots/"),
            "range_end": b64("/imgbuild/lock/default/slots0"),
            "count_only": true,
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    answer["count"].as_str().unwrap_or("0").parse().unwrap()
}

#[tokio::test]
async fn acquire_is_idempotent_owned_and_counted() {
    let etcd = etcd().await;
    let ttl = Duration::from_secs(30);
    let a = lock(&etcd, "node-a", 2, ttl);
    let b = lock(&etcd, "node-b", 2, ttl);
    let c = lock(&etcd, "node-c", 2, ttl);
    a.release().await.unwrap(); // not held: fine
    assert!(a.try_acquire().await.unwrap());
    assert!(a.try_acquire().await.unwrap()); // idempotent, still one slot
    assert!(b.try_acquire().await.unwrap());
    assert!(!c.try_acquire().await.unwrap());
    let mut holders = c.holders().await.unwrap();
    holders.sort();
    assert_eq!(holders, ["node-a", "node-b"]);
    a.renew().await.unwrap();
    // c's refused attempt left no key and no renewal is possible.
    assert!(matches!(c.renew().await, Err(LockError::Conflict(_))));
    a.release().await.unwrap();
    assert!(c.try_acquire().await.unwrap());
    let mut holders = a.holders().await.unwrap();
    holders.sort();
    assert_eq!(holders, ["node-b", "node-c"]);

    // After a "reboot" (a new client with the same id), the slot is found again and
    // renewed, not taken twice.
    let b_again = lock(&etcd, "node-b", 2, ttl);
    assert!(b_again.try_acquire().await.unwrap());
    b_again.renew().await.unwrap();
    assert_eq!(a.holders().await.unwrap().len(), 2);
    b_again.release().await.unwrap();
    assert_eq!(a.holders().await.unwrap(), ["node-c"]);
}

async fn contend(clients: usize, slots: usize, iterations: usize) {
    let etcd = etcd().await;
    let inside = Arc::new(AtomicUsize::new(0));
    let max_inside = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    // Sample the raw key space continuously.
    let sampler = {
        let url = etcd.url.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let (mut max, mut samples) = (0, 0);
            while !stop.load(Ordering::SeqCst) {
                max = max.max(raw_slot_keys(&http, &url).await);
                samples += 1;
            }
            (max, samples)
        })
    };
    let mut tasks = Vec::new();
    for i in 0..clients {
        let l = lock(&etcd, &format!("node-{i}"), slots, Duration::from_secs(30));
        let (inside, max_inside) = (inside.clone(), max_inside.clone());
        tasks.push(tokio::spawn(async move {
            let (mut done, mut attempts) = (0, 0);
            while done < iterations {
                attempts += 1;
                assert!(attempts < 5_000, "node-{i} starved");
                if l.try_acquire().await.unwrap() {
                    let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                    max_inside.fetch_max(now, Ordering::SeqCst);
                    assert!(l.holders().await.unwrap().len() <= slots);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    inside.fetch_sub(1, Ordering::SeqCst);
                    l.release().await.unwrap();
                    done += 1;
                } else {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
            attempts
        }));
    }
    let mut attempts = 0;
    for t in tasks {
        attempts += t.await.unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    let (max_raw, samples) = sampler.await.unwrap();
    eprintln!(
        "etcd contention: {clients} clients x {iterations} iterations, {slots} slots: \
         max raw slot keys {max_raw} over {samples} samples, max believed holders {}, \
         {attempts} attempts",
        max_inside.load(Ordering::SeqCst)
    );
    assert!(max_raw <= slots);
    assert!(max_inside.load(Ordering::SeqCst) <= slots);
    assert!(samples > 10, "sampler barely ran");
    // Clients really contended (some attempts were refused).
    assert!(
        attempts > clients * iterations,
        "no contention: {attempts} attempts"
    );
    assert_eq!(raw_slot_keys(&reqwest::Client::new(), &etcd.url).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_one_slot() {
    contend(2, 1, 15).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_clients_two_slots() {
    contend(5, 2, 8).await;
}

#[tokio::test]
async fn dead_holder_is_released_by_ttl() {
    let etcd = etcd().await;
    let ttl = Duration::from_secs(2);
    let dead = lock(&etcd, "dead", 1, ttl);
    let alive = lock(&etcd, "alive", 1, ttl);
    assert!(dead.try_acquire().await.unwrap());
    // While renewing, the holder keeps its slot well past the TTL.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(800)).await;
        dead.renew().await.unwrap();
        assert!(!alive.try_acquire().await.unwrap());
    }
    // The process "dies": dropped without release, nobody renews.
    drop(dead);
    let started = Instant::now();
    while !alive.try_acquire().await.unwrap() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "TTL never freed the slot"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "dead holder released after {:?} (TTL {ttl:?})",
        started.elapsed()
    );
    assert_eq!(alive.holders().await.unwrap(), ["alive"]);
    // A node coming back after its lease lapsed cannot renew.
    let back = lock(&etcd, "dead", 1, ttl);
    assert!(matches!(back.renew().await, Err(LockError::Conflict(_))));
}

#[tokio::test]
async fn renewals_stop_after_max_hold() {
    let etcd = etcd().await;
    let options = EtcdOptions {
        slots: 1,
        ttl: Duration::from_secs(5),
        max_hold: Duration::from_millis(500),
        request_timeout: Duration::from_secs(5),
    };
    let id = NodeIdentity {
        id: "slow".into(),
        group: "default".into(),
    };
    let l = EtcdLock::new(&etcd.url, id, options).unwrap();
    assert!(l.try_acquire().await.unwrap());
    l.renew().await.unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(matches!(l.renew().await, Err(LockError::Refused(_))));
    // Re-acquiring is no loophole: the slot is not renewed past max_hold either.
    assert!(matches!(l.try_acquire().await, Err(LockError::Refused(_))));
    // Releasing still works.
    l.release().await.unwrap();
    assert!(l.holders().await.unwrap().is_empty());
}

#[tokio::test]
async fn failed_releases_are_visible_to_all() {
    let etcd = etcd().await;
    let a = lock(&etcd, "node-a", 1, Duration::from_secs(30));
    let b = lock(&etcd, "node-b", 1, Duration::from_secs(30));
    assert!(b.failed_releases().await.unwrap().is_empty());
    a.mark_release_failed("1.4.0", "unit kubelet.service failed")
        .await
        .unwrap();
    let seen = b.failed_releases().await.unwrap();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        (seen[0].version.as_str(), seen[0].node.as_str()),
        ("1.4.0", "node-a")
    );
    assert_eq!(seen[0].reason, "unit kubelet.service failed");
}

#[tokio::test]
async fn unreachable_etcd_is_typed() {
    let port = free_port().unwrap();
    let l = EtcdLock::new(
        &format!("http://127.0.0.1:{port}"),
        NodeIdentity {
            id: "n".into(),
            group: "default".into(),
        },
        EtcdOptions::default(),
    )
    .unwrap();
    assert!(matches!(
        l.try_acquire().await,
        Err(LockError::Unreachable(_))
    ));
}
