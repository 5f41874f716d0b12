//! `systemd_kexec_on` against a private `dbus-daemon` with a stand-in
//! `org.freedesktop.systemd1` that records the call: the right bus name, object path,
//! interface and method, as systemd's `systemctl kexec` uses them. The real KExec runs
//! only in QEMU.

#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// A private session bus, killed on drop.
struct Bus {
    child: Child,
    address: String,
}

impl Drop for Bus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn bus() -> Bus {
    let mut child = Command::new("dbus-daemon")
        .args(["--session", "--nofork", "--print-address=1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting dbus-daemon");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    Bus {
        child,
        address: line.trim().to_string(),
    }
}

struct FakeManager {
    kexec_calls: Arc<AtomicUsize>,
}

#[zbus::interface(name = "org.freedesktop.systemd1.Manager")]
impl FakeManager {
    #[zbus(name = "KExec")]
    fn kexec(&self) {
        self.kexec_calls.fetch_add(1, Ordering::SeqCst);
    }
}

async fn connect(address: &str) -> zbus::Connection {
    zbus::connection::Builder::address(address)
        .unwrap()
        .build()
        .await
        .unwrap()
}

#[tokio::test]
async fn kexec_is_asked_of_systemd_manager() {
    let bus = bus();
    let calls = Arc::new(AtomicUsize::new(0));
    let systemd = connect(&bus.address).await;
    systemd
        .object_server()
        .at(
            "/org/freedesktop/systemd1",
            FakeManager {
                kexec_calls: calls.clone(),
            },
        )
        .await
        .unwrap();
    systemd
        .request_name("org.freedesktop.systemd1")
        .await
        .unwrap();

    let updater = connect(&bus.address).await;
    imgcoord::kexec::systemd_kexec_on(&updater).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // Without systemd on the bus the call fails with a typed error.
    drop(systemd);
    let err = imgcoord::kexec::systemd_kexec_on(&updater)
        .await
        .unwrap_err();
    assert!(
        matches!(err, imgcoord::kexec::KexecError::Systemd(_)),
        "{err:?}"
    );
}
