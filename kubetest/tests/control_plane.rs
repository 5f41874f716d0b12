//! The test control plane itself: it starts, serves kubectl, and leaves nothing behind.
//! k8s tier: needs the binaries from `scripts/build-k8s`; fails (not skips) without them.

use imgkubetest::{ControlPlane, ControlPlaneOptions};

#[tokio::test(flavor = "multi_thread")]
#[ignore = "k8s tier: needs scripts/build-k8s"]
async fn control_plane_starts_serves_kubectl_and_cleans_up() {
    let cp = ControlPlane::start(ControlPlaneOptions::default())
        .await
        .expect("control plane");
    eprintln!("control plane ready in {:.1?}", cp.startup);
    let out = cp
        .kubectl()
        .unwrap()
        .args(["get", "--raw", "/readyz"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
    let out = cp
        .kubectl()
        .unwrap()
        .args(["version", "--short"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Server Version: v1.20.2"), "{text}");

    // Token auth is on: a wrong token is refused.
    let out = cp
        .kubectl()
        .unwrap()
        .args(["--token=wrong", "get", "namespaces"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "a wrong token must be refused");

    let dir = cp.dir().to_path_buf();
    let port = cp.port;
    drop(cp);
    assert!(!dir.exists(), "{} is removed on drop", dir.display());
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the API server is gone after drop"
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "k8s tier: needs scripts/build-k8s"]
async fn control_plane_with_controllers_starts() {
    let cp = ControlPlane::start(ControlPlaneOptions {
        pdb_controller: true,
        ..Default::default()
    })
    .await
    .expect("control plane");
    eprintln!(
        "control plane with controller-manager and scheduler ready in {:.1?}",
        cp.startup
    );
    let out = cp
        .kubectl()
        .unwrap()
        .args(["get", "namespaces", "-o", "name"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("namespace/default"));
}
