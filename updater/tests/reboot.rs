//! The issue-6 reboot flow end to end on disk image files, with a real FleetLock server
//! and real HTTP health checks on 127.0.0.1: a fake rebooter records what it was asked
//! and "boots" by rewriting the node's os-release and kernel command line, so the next
//! start sees the slot it chose. Pass commits; fail rolls back and the failed release
//! reaches other nodes; a hang (old slot with a trial recorded) fails and releases; a
//! closed window takes no lock; a drain timeout postpones and releases.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use imgcoord::config::HealthConfig;
use imgcoord::fleetlock_server::{FleetLockServer, ServerConfig};
use imgcoord::health::{Check, CheckKind, SystemProbe, Systemctl};
use imgcoord::lock::etcd::{EtcdLock, EtcdOptions};
use imgcoord::lock::fleetlock::FleetLockClient;
use imgcoord::lock::{NodeIdentity, RebootLock};
use imgcoord::window::Window;
use imgformat::layout::Slot;
use imgupdate::install::LocalRefusals;
use imgupdate::reboot::{
    ClusterRefusals, Drained, Drainer, Driver, Outcome, RebootOptions, Rebooter,
};
use imgupdate::stage::KexecPlan;
use imgupdate::{Method, State};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn staged(strategy: &str) -> Node {
    let node = Node::new(strategy);
    node.updater()
        .update(Method::Delta, &LocalRefusals::default(), &mut |_, _| {})
        .unwrap();
    assert!(matches!(node.state().state, State::Staged { .. }));
    node
}

/// Pretend `version` now runs from `slot`.
fn boot(node: &Node, version: &str, slot: Slot) {
    std::fs::write(
        &node.cfg.os_release,
        format!("IMAGE_ID=minimal\nIMAGE_VERSION={version}\n"),
    )
    .unwrap();
    std::fs::write(
        &node.cfg.kernel_cmdline,
        format!("root=PARTLABEL={} ro console=ttyS0 quiet\n", slot.label()),
    )
    .unwrap();
}

#[derive(Debug, Clone, PartialEq)]
enum Call {
    Kexec {
        slot: Slot,
        cmdline: String,
        kernel: Vec<u8>,
        initrd_len: usize,
    },
    Reboot(Slot),
}

/// Records reboots and "boots" the slot asked for.
struct FakeRebooter {
    os_release: std::path::PathBuf,
    cmdline: std::path::PathBuf,
    calls: Mutex<Vec<Call>>,
}

impl FakeRebooter {
    fn new(node: &Node) -> FakeRebooter {
        FakeRebooter {
            os_release: node.cfg.os_release.clone(),
            cmdline: node.cfg.kernel_cmdline.clone(),
            calls: Mutex::new(Vec::new()),
        }
    }
    fn boot(&self, slot: Slot) {
        let version = if slot == Slot::B { NEW } else { OLD };
        std::fs::write(
            &self.os_release,
            format!("IMAGE_ID=minimal\nIMAGE_VERSION={version}\n"),
        )
        .unwrap();
        std::fs::write(
            &self.cmdline,
            format!("root=PARTLABEL={} ro console=ttyS0 quiet\n", slot.label()),
        )
        .unwrap();
    }
    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }
}

#[async_trait::async_trait]
impl Rebooter for FakeRebooter {
    async fn kexec(
        &self,
        plan: &KexecPlan,
        kernel: Vec<u8>,
        initrd: Vec<u8>,
    ) -> Result<(), String> {
        self.calls.lock().unwrap().push(Call::Kexec {
            slot: plan.slot,
            cmdline: plan.cmdline.clone(),
            kernel,
            initrd_len: initrd.len(),
        });
        self.boot(plan.slot);
        Ok(())
    }
    async fn reboot_into(&self, slot: Slot) -> Result<(), String> {
        self.calls.lock().unwrap().push(Call::Reboot(slot));
        self.boot(slot);
        Ok(())
    }
}

/// Records calls; drains or times out as told.
#[derive(Default)]
struct RecordingDrainer {
    postpone: bool,
    calls: Mutex<Vec<&'static str>>,
}

#[async_trait::async_trait]
impl Drainer for RecordingDrainer {
    async fn cordon(&self) -> Result<(), String> {
        self.calls.lock().unwrap().push("cordon");
        Ok(())
    }
    async fn drain(&self, _: Duration) -> Result<Drained, String> {
        self.calls.lock().unwrap().push("drain");
        Ok(if self.postpone {
            Drained::Postponed {
                reason: "pdb blocks eviction".into(),
            }
        } else {
            Drained::Drained
        })
    }
    async fn uncordon(&self) -> Result<(), String> {
        self.calls.lock().unwrap().push("uncordon");
        Ok(())
    }
}

/// An HTTP health endpoint answering 200 while `up`, else 503.
async fn health_server(up: Arc<AtomicBool>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/healthz", listener.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 2048];
            let _ = s.read(&mut buf).await;
            let status = if up.load(Ordering::SeqCst) {
                "200 OK"
            } else {
                "503 Service Unavailable"
            };
            let answer =
                format!("HTTP/1.1 {status}\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok");
            let _ = s.write_all(answer.as_bytes()).await;
        }
    });
    url
}

fn lock_for(server: &FleetLockServer, id: &str) -> FleetLockClient {
    FleetLockClient::new(
        &server.url(),
        NodeIdentity {
            id: id.into(),
            group: "default".into(),
        },
        Duration::from_secs(5),
    )
    .unwrap()
}

fn opts(url: &str, windows: Vec<Window>) -> RebootOptions {
    RebootOptions {
        windows,
        health: HealthConfig {
            checks: vec![Check::new(CheckKind::Http { url: url.into() })
                .with_timeout(Duration::from_secs(2))],
            deadline: Duration::from_millis(1500),
            interval: Duration::from_millis(200),
        },
        drain_timeout: Duration::from_secs(1),
        renew_every: Some(Duration::from_millis(300)),
    }
}

/// Everything one test needs on one node.
struct World {
    node: Node,
    server: FleetLockServer,
    /// When set, the lock lives in this etcd instead of the FleetLock server.
    etcd: Option<String>,
    up: Arc<AtomicBool>,
    url: String,
    rebooter: FakeRebooter,
    drainer: RecordingDrainer,
    probe: SystemProbe<Systemctl>,
}

impl World {
    async fn new(node: Node, postpone: bool) -> World {
        let server =
            FleetLockServer::start("127.0.0.1:0".parse().unwrap(), ServerConfig::default())
                .await
                .unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let url = health_server(up.clone()).await;
        let rebooter = FakeRebooter::new(&node);
        World {
            node,
            server,
            etcd: None,
            up,
            url,
            rebooter,
            drainer: RecordingDrainer {
                postpone,
                ..Default::default()
            },
            probe: SystemProbe::new(Systemctl::default()),
        }
    }

    fn lock(&self, id: &str) -> Box<dyn RebootLock> {
        match &self.etcd {
            Some(url) => Box::new(
                EtcdLock::new(
                    url,
                    NodeIdentity {
                        id: id.into(),
                        group: "default".into(),
                    },
                    EtcdOptions {
                        slots: 1,
                        ttl: Duration::from_secs(60),
                        max_hold: Duration::from_secs(600),
                        request_timeout: Duration::from_secs(5),
                    },
                )
                .unwrap(),
            ),
            None => Box::new(lock_for(&self.server, id)),
        }
    }

    /// One start of the agent: a fresh Updater (reads what booted) and a driver.
    async fn run(&self, windows: Vec<Window>, reboot: bool) -> Outcome {
        let updater = self.node.updater();
        let lock = self.lock("node-1");
        let driver = Driver {
            updater: &updater,
            lock: lock.as_ref(),
            node_id: "node-1".into(),
            drainer: &self.drainer,
            rebooter: &self.rebooter,
            probe: &self.probe,
            opts: opts(&self.url, windows),
        };
        if reboot {
            driver.reboot_staged().await.unwrap()
        } else {
            driver.verify_boot().await.unwrap()
        }
    }
}

async fn reboot_staged(w: &World, windows: Vec<Window>) -> Outcome {
    w.run(windows, true).await
}

async fn verify_boot(w: &World) -> Outcome {
    w.run(vec![], false).await
}

/// A window that opens two hours from now (UTC) for one hour: closed now.
fn closed_window() -> Window {
    let hour = jiff::Timestamp::now()
        .to_zoned(jiff::tz::TimeZone::UTC)
        .hour();
    let raw: toml::Table = toml::from_str(&format!(
        "days = [\"Mon\",\"Tue\",\"Wed\",\"Thu\",\"Fri\",\"Sat\",\"Sun\"]\nstart = \"{:02}:00\"\nlength = \"1h\"\n",
        (hour + 2) % 24
    ))
    .unwrap();
    raw.try_into().unwrap()
}

#[test]
fn kexec_trial_that_passes_is_committed_and_the_lock_released() {
    let node = staged("kexec");
    rt().block_on(async {
        let w = World::new(node, false).await;
        let out = reboot_staged(&w, vec![]).await;
        assert_eq!(out, Outcome::Rebooting { slot: Slot::B });
        // Recorded before the reboot, lock held, node drained.
        assert!(matches!(w.node.state().state, State::Rebooting { .. }));
        assert_eq!(w.server.holders("default"), vec!["node-1".to_string()]);
        assert_eq!(*w.drainer.calls.lock().unwrap(), vec!["cordon", "drain"]);
        // The kexec plan: 1.1's kernel from the ESP, slot b's command line.
        match &w.rebooter.calls()[..] {
            [Call::Kexec {
                slot,
                cmdline,
                kernel,
                initrd_len,
            }] => {
                assert_eq!(*slot, Slot::B);
                assert_eq!(cmdline, "root=PARTLABEL=root-b ro console=ttyS0 quiet");
                assert!(*kernel == base().new_kernel);
                assert_eq!(*initrd_len, 300 << 10);
            }
            other => panic!("{other:?}"),
        }
        assert!(!w.node.bootable(Slot::B), "no entry before the checks");

        // Next start: 1.1 on slot b, healthy.
        let out = verify_boot(&w).await;
        assert_eq!(
            out,
            Outcome::Committed {
                version: NEW.into()
            }
        );
        let entries = w.node.entries();
        assert!(
            entries.contains(&"imgbuild-b.conf".to_string()),
            "{entries:?}"
        );
        assert!(
            entries.contains(&"imgbuild-a.conf".to_string()),
            "{entries:?}"
        );
        let sf = w.node.state();
        assert_eq!(
            sf.state,
            State::Committed {
                version: NEW.into(),
                slot: Slot::B
            }
        );
        assert!(sf.history.iter().any(|h| h.to.name() == "committed"));
        assert!(w.server.holders("default").is_empty());
        assert_eq!(w.drainer.calls.lock().unwrap().last(), Some(&"uncordon"));
        // A second verify-boot changes nothing.
        assert_eq!(verify_boot(&w).await, Outcome::Idle);
    });
}

#[test]
fn kexec_trial_that_fails_rolls_back_and_the_cluster_refuses_the_version() {
    let node = staged("kexec");
    let runtime = rt();
    let w = runtime.block_on(async {
        let w = World::new(node, false).await;
        reboot_staged(&w, vec![]).await;
        // 1.1 boots but its health endpoint stays down.
        w.up.store(false, Ordering::SeqCst);
        let out = verify_boot(&w).await;
        assert_eq!(out, Outcome::Rebooting { slot: Slot::A });
        // Back to slot a by kexec with slot a's own entry.
        match w.rebooter.calls().last() {
            Some(Call::Kexec { slot, cmdline, .. }) => {
                assert_eq!(*slot, Slot::A);
                assert_eq!(cmdline, "root=PARTLABEL=root-a ro console=ttyS0 quiet");
            }
            other => panic!("{other:?}"),
        }
        let failed = lock_for(&w.server, "node-2")
            .failed_releases()
            .await
            .unwrap();
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].version, NEW);
        assert_eq!(failed[0].node, "node-1");
        assert!(failed[0].reason.contains("503"), "{}", failed[0].reason);
        assert_eq!(
            w.server.holders("default"),
            vec!["node-1".to_string()],
            "held until the old slot is healthy"
        );
        assert!(matches!(w.node.state().state, State::RollingBack { .. }));

        // Slot a runs again and is healthy: failed, uncordoned, released.
        w.up.store(true, Ordering::SeqCst);
        let out = verify_boot(&w).await;
        assert_eq!(
            out,
            Outcome::RolledBack {
                version: NEW.into()
            }
        );
        let sf = w.node.state();
        assert!(matches!(sf.state, State::Failed { .. }), "{:?}", sf.state);
        assert_eq!(sf.failed_versions, vec![NEW.to_string()]);
        assert!(w.server.holders("default").is_empty());
        assert!(!w.node.bootable(Slot::B));
        assert!(w.node.bootable(Slot::A));
        w
    });
    // Another node sees the failed release and does not take 1.1.
    let other = Node::new("kexec");
    let refused = runtime
        .block_on(ClusterRefusals::fetch(&lock_for(&w.server, "node-2")))
        .unwrap();
    assert_eq!(
        other.updater().check(&refused).unwrap(),
        imgupdate::Choice::Refused {
            version: NEW.into()
        }
    );
}

/// Nodes stage in parallel: one that staged the version another node has since
/// recorded as failed drops it once it holds the lock, and never boots it.
#[test]
fn a_staged_version_failed_elsewhere_is_dropped_when_the_lock_comes() {
    // The reboot strategy stages an entry with boot counting: it must go.
    let node = staged("reboot");
    assert!(node.bootable(Slot::B), "the staged slot has its entry");
    rt().block_on(async {
        let w = World::new(node, false).await;
        lock_for(&w.server, "node-2")
            .mark_release_failed(NEW, "canary.service failed")
            .await
            .unwrap();
        let out = reboot_staged(&w, vec![]).await;
        assert_eq!(
            out,
            Outcome::Refused {
                version: NEW.into()
            }
        );
        assert!(w.rebooter.calls().is_empty(), "nothing rebooted");
        assert!(w.server.holders("default").is_empty(), "lock given back");
        assert!(
            matches!(w.node.state().state, State::Idle),
            "{:?}",
            w.node.state().state
        );
        assert!(!w.node.bootable(Slot::B), "the dropped slot cannot boot");
        assert!(w.node.bootable(Slot::A));
    });
}

#[test]
fn a_trial_that_hangs_lands_on_the_old_slot_and_fails_the_version() {
    let node = staged("reboot");
    rt().block_on(async {
        let w = World::new(node, false).await;
        assert_eq!(
            reboot_staged(&w, vec![]).await,
            Outcome::Rebooting { slot: Slot::B }
        );
        assert_eq!(w.rebooter.calls(), vec![Call::Reboot(Slot::B)]);
        // Boot counting fell back: 1.0 runs from slot a although a trial was recorded.
        boot(&w.node, OLD, Slot::A);
        let out = verify_boot(&w).await;
        assert_eq!(
            out,
            Outcome::RolledBack {
                version: NEW.into()
            }
        );
        let sf = w.node.state();
        assert!(
            matches!(&sf.state, State::Failed { reason } if reason.contains("expected 1.1 on slot b")),
            "{:?}",
            sf.state
        );
        let entries = w.node.entries();
        assert!(entries.contains(&"imgbuild-b+0-3.conf".to_string()), "{entries:?}");
        let failed = lock_for(&w.server, "node-2").failed_releases().await.unwrap();
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].version, NEW);
        assert!(w.server.holders("default").is_empty());
    });
}

#[test]
fn a_closed_window_takes_no_lock() {
    let node = staged("kexec");
    rt().block_on(async {
        let w = World::new(node, false).await;
        let out = reboot_staged(&w, vec![closed_window()]).await;
        assert_eq!(out, Outcome::WaitWindow);
        assert!(w.server.history().is_empty(), "{:?}", w.server.history());
        assert!(w.rebooter.calls().is_empty());
        assert!(w.drainer.calls.lock().unwrap().is_empty());
        assert!(matches!(w.node.state().state, State::Staged { .. }));
    });
}

#[test]
fn a_drain_timeout_postpones_and_releases_the_lock() {
    let node = staged("kexec");
    rt().block_on(async {
        let w = World::new(node, true).await;
        let out = reboot_staged(&w, vec![]).await;
        assert!(matches!(out, Outcome::Postponed { .. }), "{out:?}");
        assert!(w.server.holders("default").is_empty());
        assert_eq!(
            *w.drainer.calls.lock().unwrap(),
            vec!["cordon", "drain", "uncordon"]
        );
        assert!(w.rebooter.calls().is_empty());
        assert!(matches!(w.node.state().state, State::Staged { .. }));
        // Another node may take the lock meanwhile.
        assert!(lock_for(&w.server, "node-2").try_acquire().await.unwrap());
        assert_eq!(
            reboot_staged(&w, vec![]).await,
            Outcome::LockBusy,
            "no reboot while another node holds the lock"
        );
    });
}

/// Run the binary with `node`'s config file.
fn cli(node: &Node, args: &[&str]) -> (i32, serde_json::Value) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_imgupdate"))
        .arg("--config")
        .arg(&node.config_path)
        .args(["--bus", "unix:path=/nonexistent/bus", "--json"])
        .args(args)
        .env("IMGUPDATE_LOG", "error")
        .output()
        .unwrap();
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{args:?}: {e}: {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap(), v)
}

/// Top-level keys first, then tables: the Node config has only top-level keys.
fn append_config(node: &Node, text: &str) {
    let mut c = std::fs::read_to_string(&node.config_path).unwrap();
    c.push_str(text);
    std::fs::write(&node.config_path, c).unwrap();
}

/// A FleetLock server on its own thread for tests that run the binary.
fn fleetlock_in_background() -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        rt().block_on(async move {
            let server =
                FleetLockServer::start("127.0.0.1:0".parse().unwrap(), ServerConfig::default())
                    .await
                    .unwrap();
            tx.send(server.url()).unwrap();
            std::future::pending::<()>().await;
        });
    });
    rx.recv().unwrap()
}

#[test]
fn cli_verify_boot_commits_a_healthy_trial_with_the_local_lock() {
    let node = staged("kexec");
    let rt = rt();
    let up = Arc::new(AtomicBool::new(true));
    // The health endpoint must outlive the blocking CLI call: serve from a thread.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        rt.block_on(async move {
            tx.send(health_server(up).await).unwrap();
            std::future::pending::<()>().await;
        });
    });
    let url = rx.recv().unwrap();
    append_config(
        &node,
        &format!(
            "node_id = \"node-cli\"\n[health]\ndeadline = \"3s\"\ninterval = \"200ms\"\n\
             checks = [{{ kind = \"http\", url = \"{url}\", timeout = \"1s\" }}]\n"
        ),
    );
    // As `imgupdate reboot` leaves it: rebooting recorded, local lock held.
    let mut sf = node.state();
    sf.apply(imgupdate::Event::LockRequested).unwrap();
    sf.apply(imgupdate::Event::LockAcquired).unwrap();
    sf.apply(imgupdate::Event::Drained {
        strategy: imgupdate::Strategy::Kexec,
    })
    .unwrap();
    sf.save(&node.cfg.state_dir).unwrap();
    let lock_file = node.cfg.state_dir.join("reboot-lock");
    std::fs::write(&lock_file, "node-cli").unwrap();
    boot(&node, NEW, Slot::B);
    let (code, v) = cli(&node, &["verify-boot"]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["outcome"], "committed", "{v}");
    assert_eq!(v["version"], NEW);
    assert!(node.entries().contains(&"imgbuild-b.conf".to_string()));
    assert!(!lock_file.exists(), "local lock released");
    assert!(matches!(node.state().state, State::Committed { .. }));
}

#[test]
fn cli_check_refuses_a_version_failed_on_another_node() {
    let url = fleetlock_in_background();
    let node = Node::new("kexec");
    append_config(
        &node,
        &format!("node_id = \"node-2\"\n[lock]\nbackend = \"fleetlock\"\nurl = \"{url}\"\n"),
    );
    let (code, v) = cli(&node, &["check"]);
    assert_eq!((code, v["result"].as_str()), (0, Some("update")), "{v}");
    // node-1 records 1.1 as failed where the lock lives.
    rt().block_on(async {
        let lock = FleetLockClient::new(
            &url,
            NodeIdentity {
                id: "node-1".into(),
                group: "default".into(),
            },
            Duration::from_secs(5),
        )
        .unwrap();
        lock.mark_release_failed(NEW, "kubelet: HTTP 503")
            .await
            .unwrap();
    });
    let (code, v) = cli(&node, &["check"]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["result"], "refused", "{v}");
    assert_eq!(v["version"], NEW);
}

/// A real etcd on free 127.0.0.1 ports, killed on drop (shared with imgkubetest).
async fn etcd() -> imgkubetest::Etcd {
    imgkubetest::Etcd::start().await.expect("starting etcd")
}

#[test]
fn reboot_strategy_rollback_records_the_failed_release_in_etcd() {
    let node = staged("reboot");
    rt().block_on(async {
        let etcd = etcd().await;
        let mut w = World::new(node, false).await;
        w.etcd = Some(etcd.url.clone());
        let holders = || async { w.lock("node-2").holders().await.unwrap() };
        assert_eq!(
            reboot_staged(&w, vec![]).await,
            Outcome::Rebooting { slot: Slot::B }
        );
        assert_eq!(w.rebooter.calls(), vec![Call::Reboot(Slot::B)]);
        assert_eq!(holders().await, vec!["node-1".to_string()]);
        // 1.1 boots from its +3 entry, unhealthy: back to slot a by firmware reboot.
        w.up.store(false, Ordering::SeqCst);
        assert_eq!(verify_boot(&w).await, Outcome::Rebooting { slot: Slot::A });
        assert_eq!(w.rebooter.calls().last(), Some(&Call::Reboot(Slot::A)));
        let entries = w.node.entries();
        assert!(
            entries.contains(&"imgbuild-b+0-3.conf".to_string()),
            "{entries:?}"
        );
        let failed = w.lock("node-2").failed_releases().await.unwrap();
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert_eq!(failed[0].version, NEW);
        assert_eq!(holders().await, vec!["node-1".to_string()]);
        // Slot a, healthy: released (by a fresh client: the lease outlives the process).
        w.up.store(true, Ordering::SeqCst);
        assert_eq!(
            verify_boot(&w).await,
            Outcome::RolledBack {
                version: NEW.into()
            }
        );
        assert!(holders().await.is_empty());
        let refused = ClusterRefusals::fetch(w.lock("node-2").as_ref())
            .await
            .unwrap();
        assert!(imgupdate::RefusedVersions::is_refused(&refused, NEW));
    });
}

/// A rebooter whose kexec cannot load (no CAP_SYS_BOOT, unsupported kernel).
struct BrokenRebooter;

#[async_trait::async_trait]
impl Rebooter for BrokenRebooter {
    async fn kexec(&self, _: &KexecPlan, _: Vec<u8>, _: Vec<u8>) -> Result<(), String> {
        Err("kexec_file_load: Operation not permitted".into())
    }
    async fn reboot_into(&self, _: Slot) -> Result<(), String> {
        Err("no bus".into())
    }
}

#[test]
fn a_reboot_that_cannot_start_fails_the_attempt_but_not_the_release() {
    let node = staged("kexec");
    rt().block_on(async {
        let w = World::new(node, false).await;
        let updater = w.node.updater();
        let lock = w.lock("node-1");
        let driver = Driver {
            updater: &updater,
            lock: lock.as_ref(),
            node_id: "node-1".into(),
            drainer: &w.drainer,
            rebooter: &BrokenRebooter,
            probe: &w.probe,
            opts: opts(&w.url, vec![]),
        };
        let err = driver.reboot_staged().await.unwrap_err();
        assert!(err.to_string().contains("Operation not permitted"), "{err}");
        let sf = w.node.state();
        assert!(matches!(sf.state, State::Failed { .. }), "{:?}", sf.state);
        assert!(sf.failed_versions.is_empty(), "may be retried");
        assert!(w.server.holders("default").is_empty());
        assert_eq!(w.drainer.calls.lock().unwrap().last(), Some(&"uncordon"));
        assert!(w.lock("node-2").failed_releases().await.unwrap().is_empty());
        // The next start (still the old slot) records nothing as failed either.
        assert_eq!(verify_boot(&w).await, Outcome::Idle);
        assert!(w.lock("node-2").failed_releases().await.unwrap().is_empty());
    });
}

#[test]
fn a_lock_held_when_the_window_has_closed_is_given_back() {
    let node = staged("kexec");
    rt().block_on(async {
        let w = World::new(node, false).await;
        // Taken in an earlier window (the agent restarted before it could reboot).
        assert!(w.lock("node-1").try_acquire().await.unwrap());
        let out = reboot_staged(&w, vec![closed_window()]).await;
        assert_eq!(out, Outcome::WindowClosed);
        assert!(w.server.holders("default").is_empty());
        assert!(w.rebooter.calls().is_empty());
        assert!(matches!(w.node.state().state, State::Staged { .. }));
    });
}
