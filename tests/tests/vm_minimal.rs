//! VM tier: build `recipes/minimal.toml` for real (mmdebstrap, mkfs.ext4, GPT, FAT32,
//! systemd-boot) and boot it through OVMF under QEMU TCG.
//!
//! Run with `cargo test -p imgbuild-tests -- --ignored --test-threads=1` (scripts/test does).

use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use imgbuild::build::BuildReport;
use imgbuild_tests::{build_recipe, e2e_dir, parse_boot_report};
use imgqemu::{Vm, VmConfig};

/// The minimal image, built once per test process.
fn minimal() -> &'static (PathBuf, BuildReport) {
    static BUILT: OnceLock<(PathBuf, BuildReport)> = OnceLock::new();
    BUILT.get_or_init(|| {
        let out = e2e_dir("minimal");
        let _ = fs::remove_dir_all(&out);
        let report = build_recipe("recipes/minimal.toml", &out).expect("build minimal");
        (out, report)
    })
}

#[test]
#[ignore = "VM tier: builds an image with mmdebstrap and boots it in QEMU"]
fn minimal_image_boots_to_multi_user_with_read_only_root_a() {
    let (out, report) = minimal();
    assert_eq!(report.version, "1.0.0");
    let qcow2 = out.join("minimal-1.0.0.qcow2");
    assert!(qcow2.is_file());

    // Boot an overlay on a 4 GiB disk, larger than the image, so first boot must grow var.
    let work = tempfile::tempdir().unwrap();
    let overlay = work.path().join("node.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&qcow2)
        .arg(&overlay)
        .arg("4G")
        .status()
        .unwrap();
    assert!(st.success());

    let mut cfg = VmConfig::uefi("minimal", imgqemu::firmware().unwrap(), &overlay);
    cfg.snapshot = false;
    cfg.serial_log = Some(out.join("boot.serial.log"));
    let vm = Vm::start(&cfg).unwrap();
    let started = std::time::Instant::now();
    if let Err(e) = vm.wait_for_serial("imgbuild-report: end", Duration::from_secs(600)) {
        panic!("the image did not finish booting: {e}");
    }
    eprintln!("boot report after {:.1}s", started.elapsed().as_secs_f64());
    let log = vm.serial_log();
    vm.kill().expect("stop the VM");

    let r = parse_boot_report(&log).unwrap();
    assert!(
        log.contains("Reached target") && log.contains("multi-user.target"),
        "systemd did not report reaching multi-user.target"
    );
    assert_eq!(r.state, "running", "system state (failed: {:?})", r.failed);
    assert!(r.failed.is_empty(), "failed units: {:?}", r.failed);
    assert_eq!(r.get("partlabel"), Some("root-a"), "{r:?}");
    let opts = r.get("options").unwrap_or_default();
    assert!(
        opts.split(',').any(|o| o == "ro"),
        "root mount options {opts}"
    );
    assert_eq!(r.get("image"), Some("minimal"));
    assert_eq!(r.get("version"), Some("1.0.0"));
    assert_eq!(r.get("kernel"), Some(report.kernel_version.as_str()));
    let var_mib: u64 = r.get("var_mib").unwrap_or("0").parse().unwrap();
    // The image's var partition is 256 MiB; on a 4 GiB disk it grows to about 1.9 GiB.
    assert!(
        var_mib > 1500,
        "var was not grown to the disk: {var_mib} MiB"
    );
}

#[test]
#[ignore = "VM tier: builds the minimal image twice with mmdebstrap"]
fn minimal_image_is_bit_for_bit_reproducible() {
    let (out, first) = minimal();
    let again = e2e_dir("minimal-again");
    let _ = fs::remove_dir_all(&again);
    let second = build_recipe("recipes/minimal.toml", &again).unwrap();
    for a in &first.artifacts {
        let b = second
            .artifact(&a.file)
            .unwrap_or_else(|| panic!("second build lacks {}", a.file));
        assert_eq!(a.sha256, b.sha256, "{} differs between two builds", a.file);
    }
    assert_eq!(
        fs::read(out.join("SHA256SUMS")).unwrap(),
        fs::read(again.join("SHA256SUMS")).unwrap()
    );
    let _ = fs::remove_dir_all(&again);
}
