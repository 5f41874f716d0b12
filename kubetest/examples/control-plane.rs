//! Run a test control plane by hand: `cargo run -p imgkubetest --example control-plane --
//! [--controllers] [--guest-kubeconfig FILE]`. Prints the server and the kubeconfig path,
//! and stops (removing everything) when its standard input closes or on SIGINT/SIGTERM.

use std::io::Read;
use std::path::PathBuf;

use imgkubetest::{ControlPlane, ControlPlaneOptions};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let controllers = args.iter().any(|a| a == "--controllers");
    let guest = args
        .iter()
        .position(|a| a == "--guest-kubeconfig")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from);
    let cp = ControlPlane::start(ControlPlaneOptions {
        pdb_controller: controllers,
        ..Default::default()
    })
    .await?;
    println!("server {}", cp.server);
    println!("kubeconfig {}", cp.kubeconfig.display());
    println!("ready in {:.1?}", cp.startup);
    if let Some(path) = guest {
        // QEMU user networking: the guest reaches the host's 127.0.0.1 as 10.0.2.2.
        cp.write_kubeconfig_for(&format!("https://10.0.2.2:{}", cp.port), &path)?;
        println!("guest kubeconfig {}", path.display());
    }
    let stdin_closed = tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
    });
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // Every way out drops `cp`, which stops the processes and removes the directory.
    tokio::select! {
        _ = stdin_closed => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    drop(cp);
    // The thread blocked on stdin would keep the runtime (and the process) alive.
    std::process::exit(0)
}
