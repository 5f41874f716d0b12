//! FleetLock client against our protocol-conformant server on 127.0.0.1: the wire
//! format, error kinds, idempotence, contention and TTL expiry.

#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use imgcoord::fleetlock_server::{
    max_holders, EventKind, FleetLockServer, RequestBody, ServerConfig,
};
use imgcoord::lock::fleetlock::FleetLockClient;
use imgcoord::lock::{LockError, NodeIdentity, RebootLock};

fn node(id: &str, group: &str) -> NodeIdentity {
    NodeIdentity {
        id: id.to_string(),
        group: group.to_string(),
    }
}

async fn server(slots: usize, ttl: Option<Duration>) -> FleetLockServer {
    let config = ServerConfig {
        slots,
        ttl,
        ..ServerConfig::default()
    };
    FleetLockServer::start("127.0.0.1:0".parse().unwrap(), config)
        .await
        .unwrap()
}

fn client(server: &FleetLockServer, id: &str, group: &str) -> FleetLockClient {
    FleetLockClient::new(&server.url(), node(id, group), Duration::from_secs(5)).unwrap()
}

#[test]
fn request_body_is_exactly_the_zincati_shape() {
    let body = RequestBody {
        client_params: imgcoord::fleetlock_server::ClientParams {
            id: "c988d2509fdf4cdcbed39037c56406fb".into(),
            group: "workers".into(),
        },
        version: None,
        reason: None,
    };
    assert_eq!(
        serde_json::to_string(&body).unwrap(),
        r#"{"client_params":{"id":"c988d2509fdf4cdcbed39037c56406fb","group":"workers"}}"#
    );
}

#[tokio::test]
async fn server_enforces_header_method_body_and_group() {
    let srv = server(1, None).await;
    let http = reqwest::Client::new();
    let url = format!("{}/v1/pre-reboot", srv.url());
    let body = r#"{"client_params":{"id":"a","group":"default"}}"#;

    let kind = |r: reqwest::Response| async move {
        let status = r.status().as_u16();
        let v: serde_json::Value = r.json().await.unwrap();
        assert!(
            !v["value"].as_str().unwrap().is_empty(),
            "value must be non-empty"
        );
        (status, v["kind"].as_str().unwrap().to_string())
    };

    // No header: refused, nothing locked.
    let r = http.post(&url).body(body).send().await.unwrap();
    assert_eq!(kind(r).await, (400, "missing_fleet_lock_header".into()));
    // Wrong header value.
    let r = http
        .post(&url)
        .header("fleet-lock-protocol", "yes")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(kind(r).await, (400, "missing_fleet_lock_header".into()));
    // GET is not an operation.
    let r = http
        .get(&url)
        .header("fleet-lock-protocol", "true")
        .send()
        .await
        .unwrap();
    assert_eq!(kind(r).await, (405, "method_not_allowed".into()));
    // Malformed JSON, missing group, empty id, group outside ^[a-zA-Z0-9.-]+$.
    for (b, k) in [
        ("not json", "invalid_body"),
        (r#"{"client_params":{"id":"a"}}"#, "invalid_body"),
        (
            r#"{"client_params":{"id":"","group":"default"}}"#,
            "invalid_client_id",
        ),
        (
            r#"{"client_params":{"id":"a","group":"bad group"}}"#,
            "invalid_client_group",
        ),
        (
            r#"{"client_params":{"id":"a","group":""}}"#,
            "invalid_client_group",
        ),
    ] {
        let r = http
            .post(&url)
            .header("fleet-lock-protocol", "true")
            .body(b)
            .send()
            .await
            .unwrap();
        assert_eq!(kind(r).await, (400, k.to_string()), "body {b}");
    }
    assert!(srv.holders("default").is_empty());
    // Unknown endpoint.
    let r = http
        .post(format!("{}/v2/pre-reboot", srv.url()))
        .header("fleet-lock-protocol", "true")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(kind(r).await, (404, "not_found".into()));

    // A well-formed request with the header locks; a second node gets 409 with the kind
    // Zincati's docs name.
    let r = http
        .post(&url)
        .header("fleet-lock-protocol", "true")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let r = http
        .post(&url)
        .header("fleet-lock-protocol", "true")
        .body(r#"{"client_params":{"id":"b","group":"default"}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(kind(r).await, (409, "failed_lock_semaphore_full".into()));
    assert_eq!(srv.holders("default"), vec!["a".to_string()]);
}

#[tokio::test]
async fn client_lock_is_recursive_owned_and_per_group() {
    let srv = server(1, None).await;
    let a = client(&srv, "node-a", "default");
    let b = client(&srv, "node-b", "default");
    let w = client(&srv, "node-w", "workers");

    // Releasing what is not held is fine (UnlockIfHeld).
    a.release().await.unwrap();
    assert!(a.try_acquire().await.unwrap());
    // Recursive: again true, still one holder.
    assert!(a.try_acquire().await.unwrap());
    a.renew().await.unwrap();
    assert!(!b.try_acquire().await.unwrap());
    // Owned: b's unlock does not free a's slot.
    b.release().await.unwrap();
    assert_eq!(a.holders().await.unwrap(), vec!["node-a".to_string()]);
    assert!(!b.try_acquire().await.unwrap());
    // Groups are separate semaphores.
    assert!(w.try_acquire().await.unwrap());
    // b renewing a slot it does not hold is a conflict.
    assert!(matches!(b.renew().await, Err(LockError::Conflict(_))));
    a.release().await.unwrap();
    a.release().await.unwrap();
    assert!(b.try_acquire().await.unwrap());
    assert_eq!(b.holders().await.unwrap(), vec!["node-b".to_string()]);

    let kinds: Vec<(String, EventKind)> = srv
        .history()
        .into_iter()
        .filter(|e| e.group == "default")
        .map(|e| (e.id, e.kind))
        .collect();
    use EventKind::*;
    let expect = [
        ("node-a", ReleasedNotHeld),
        ("node-a", Acquired),
        ("node-a", Renewed),
        ("node-a", Renewed),
        ("node-b", Refused),
        ("node-b", ReleasedNotHeld),
        ("node-b", Refused),
        ("node-b", Refused),
        ("node-a", Released),
        ("node-a", ReleasedNotHeld),
        ("node-b", Acquired),
    ];
    let expect: Vec<(String, EventKind)> =
        expect.iter().map(|(i, k)| (i.to_string(), *k)).collect();
    assert_eq!(kinds, expect);
    // Timestamps are ordered.
    let h = srv.history();
    assert!(h.windows(2).all(|w| w[0].at <= w[1].at));
    // The same history over HTTP, for cluster checks.
    let over_http: Vec<imgcoord::fleetlock_server::Event> =
        reqwest::get(format!("{}/v1/imgbuild/history", srv.url()))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    assert_eq!(over_http, h);
}

#[tokio::test]
async fn failed_releases_are_shared_by_the_group() {
    let srv = server(1, None).await;
    let a = client(&srv, "node-a", "default");
    let b = client(&srv, "node-b", "default");
    let other = client(&srv, "node-o", "workers");
    a.mark_release_failed("1.4.0", "kubelet healthz: connection refused")
        .await
        .unwrap();
    let seen = b.failed_releases().await.unwrap();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].version, "1.4.0");
    assert_eq!(seen[0].node, "node-a");
    assert_eq!(seen[0].reason, "kubelet healthz: connection refused");
    assert!(other.failed_releases().await.unwrap().is_empty());
}

/// A server that answers 404 to everything but the two FleetLock endpoints, as a
/// third-party FleetLock server would to our extension endpoints.
async fn plain_fleetlock_server() -> (String, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let n = s.read(&mut buf).await.unwrap();
            let req = String::from_utf8_lossy(&buf[..n]);
            let status = if req.starts_with("POST /v1/pre-reboot ")
                || req.starts_with("POST /v1/steady-state ")
            {
                "200 OK"
            } else {
                "404 Not Found"
            };
            let answer =
                format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            s.write_all(answer.as_bytes()).await.unwrap();
        }
    });
    (url, task)
}

#[tokio::test]
async fn third_party_server_without_extensions() {
    let (url, task) = plain_fleetlock_server().await;
    let c = FleetLockClient::new(&url, node("n", "default"), Duration::from_secs(5)).unwrap();
    assert!(c.try_acquire().await.unwrap());
    c.renew().await.unwrap();
    c.release().await.unwrap();
    // Failed-release record is ignored (logged), never an error that blocks an update.
    c.mark_release_failed("2.0", "bad").await.unwrap();
    assert!(c.failed_releases().await.unwrap().is_empty());
    // Holders are unknown, not "nobody".
    assert!(matches!(c.holders().await, Err(LockError::Protocol(_))));
    task.abort();
}

#[tokio::test]
async fn unreachable_and_server_errors_are_typed() {
    // A port nobody listens on.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    drop(l);
    let c = FleetLockClient::new(&url, node("n", "default"), Duration::from_secs(2)).unwrap();
    assert!(matches!(
        c.try_acquire().await,
        Err(LockError::Unreachable(_))
    ));
    // Invalid group: the server refuses with a 400, the client reports Refused.
    let srv = server(1, None).await;
    let bad = client(&srv, "n", "no spaces allowed");
    match bad.try_acquire().await {
        Err(LockError::Refused(msg)) => assert!(msg.contains("invalid_client_group"), "{msg}"),
        other => panic!("expected Refused, got {other:?}"),
    }
}

/// `clients` tasks each take the lock `iterations` times, hold it briefly and release.
/// The server's history must never show more than `slots` holders, and a counter of
/// clients that believe they hold a slot must never exceed it either.
async fn contend(clients: usize, slots: usize, iterations: usize) {
    let srv = Arc::new(server(slots, None).await);
    let inside = Arc::new(AtomicUsize::new(0));
    let max_inside = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..clients {
        let c = client(&srv, &format!("node-{i}"), "default");
        let inside = inside.clone();
        let max_inside = max_inside.clone();
        tasks.push(tokio::spawn(async move {
            let mut done = 0;
            let mut attempts = 0;
            while done < iterations {
                attempts += 1;
                assert!(attempts < 10_000, "client {i} starved");
                if c.try_acquire().await.unwrap() {
                    let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                    max_inside.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    inside.fetch_sub(1, Ordering::SeqCst);
                    c.release().await.unwrap();
                    done += 1;
                } else {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let history = srv.history();
    let acquired = history
        .iter()
        .filter(|e| e.kind == EventKind::Acquired)
        .count();
    assert_eq!(acquired, clients * iterations);
    let max = max_holders(&history, "default");
    eprintln!(
        "fleetlock contention: {clients} clients x {iterations} iterations, {slots} slots: \
         max holders {max}, max believed {}, {} refusals",
        max_inside.load(Ordering::SeqCst),
        history
            .iter()
            .filter(|e| e.kind == EventKind::Refused)
            .count()
    );
    assert!(max <= slots, "history shows {max} holders > {slots}");
    // The slots were really contended, and really all used.
    assert!(history.iter().any(|e| e.kind == EventKind::Refused));
    assert_eq!(max, slots);
    assert!(max_inside.load(Ordering::SeqCst) <= slots);
    assert!(srv.holders("default").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_one_slot() {
    contend(2, 1, 30).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_clients_two_slots() {
    contend(5, 2, 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_clients_one_slot() {
    contend(5, 1, 10).await;
}

#[tokio::test]
async fn ttl_frees_a_dead_holder() {
    let srv = server(1, Some(Duration::from_millis(400))).await;
    let dead = client(&srv, "dead", "default");
    let alive = client(&srv, "alive", "default");
    assert!(dead.try_acquire().await.unwrap());
    assert!(!alive.try_acquire().await.unwrap());
    // A holder that renews keeps the slot past the TTL.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        dead.renew().await.unwrap();
    }
    assert!(!alive.try_acquire().await.unwrap());
    // Now it "dies": no renewals, no steady-state.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(alive.try_acquire().await.unwrap());
    assert_eq!(srv.holders("default"), vec!["alive".to_string()]);
    // The dead node comes back and finds its slot gone.
    assert!(matches!(dead.renew().await, Err(LockError::Conflict(_))));
    let h = srv.history();
    assert!(h
        .iter()
        .any(|e| e.id == "dead" && e.kind == EventKind::Expired));
    assert!(max_holders(&h, "default") <= 1);
}

#[tokio::test]
async fn renewal_task_keeps_the_slot_and_reports_loss() {
    let srv = server(1, Some(Duration::from_millis(300))).await;
    let holder: Arc<dyn RebootLock> = Arc::new(client(&srv, "holder", "default"));
    let other = client(&srv, "other", "default");
    assert!(holder.try_acquire().await.unwrap());
    let renewal = imgcoord::lock::spawn_renewal(holder.clone(), Duration::from_millis(100));
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert!(
        !other.try_acquire().await.unwrap(),
        "renewals must keep the slot"
    );
    renewal.stop().await.unwrap();
    // Without renewals the TTL frees it.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(other.try_acquire().await.unwrap());
    // A renewal of a lost slot ends the task with Conflict.
    let renewal = imgcoord::lock::spawn_renewal(holder.clone(), Duration::from_millis(50));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(renewal.is_finished());
    assert!(matches!(renewal.stop().await, Err(LockError::Conflict(_))));
}

#[tokio::test]
async fn gate_takes_the_lock_only_inside_a_window() {
    use imgcoord::window::{acquire_in_window, RawWindow, Window};
    let srv = server(1, None).await;
    let c = client(&srv, "n", "default");
    // No windows: always open, lock taken at once.
    assert!(
        acquire_in_window(&[], &c, Duration::from_millis(50), Duration::from_secs(2))
            .await
            .unwrap()
    );
    c.release().await.unwrap();
    // A window that is closed now (1 minute long, starting 12 hours from now).
    let later = jiff::Timestamp::now()
        .checked_add(jiff::SignedDuration::from_hours(12))
        .unwrap()
        .to_zoned(jiff::tz::TimeZone::UTC);
    let closed = Window::try_from(RawWindow {
        days: vec![format!("{:?}", later.weekday())],
        start: later.strftime("%H:%M").to_string(),
        length: "1m".into(),
        tz: "UTC".into(),
    })
    .unwrap();
    let started = std::time::Instant::now();
    assert!(!acquire_in_window(
        std::slice::from_ref(&closed),
        &c,
        Duration::from_millis(50),
        Duration::from_millis(500)
    )
    .await
    .unwrap());
    assert!(started.elapsed() < Duration::from_secs(2));
    // The lock was never taken while waiting for the window.
    assert!(srv.history().iter().all(|e| e.kind != EventKind::Refused));
    assert_eq!(
        srv.history()
            .iter()
            .filter(|e| e.kind == EventKind::Acquired)
            .count(),
        1
    );
    assert!(srv.holders("default").is_empty());
}
