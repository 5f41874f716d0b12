//! VM tier: the live installer. The ISO (built from the minimal image's outputs with a
//! throw-away key) boots under OVMF from a CD drive next to a blank virtio disk, asks
//! before writing the only disk, installs, reboots from the disk and reaches the boot
//! report on root-a; a disk smaller than the image is refused and stays untouched. The
//! PXE variant boots iPXE from QEMU's user-mode TFTP and installs over HTTP.
//!
//! Set `IMGBUILD_TEST_IMAGES=DIR` to reuse the outputs of an earlier `imgbuild build
//! recipes/minimal.toml` (read only); otherwise the minimal recipe is built first.
//! Run with `cargo test -p imgbuild-tests --test vm_install -- --ignored --test-threads=1`.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::fs;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use imgbuild::installer::MediaInputs;
use imgbuild_tests::{build_recipe, e2e_dir, parse_boot_report, workspace_root};
use imgqemu::{Vm, VmConfig};

const STEM: &str = "minimal-1.0.0";

/// The minimal image's outputs: `IMGBUILD_TEST_IMAGES` or a fresh build.
fn images() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(d) = std::env::var_os("IMGBUILD_TEST_IMAGES") {
            return PathBuf::from(d);
        }
        let out = e2e_dir("minimal-install");
        if !out.join(format!("{STEM}.raw")).is_file() {
            let _ = fs::remove_dir_all(&out);
            build_recipe("recipes/minimal.toml", &out).expect("build minimal");
        }
        out
    })
}

/// Builds `imgbuild-install` (the test binary's package does not) and points the
/// builder at it.
fn installer_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let st = Command::new(cargo)
            .args([
                "build",
                "-p",
                "imgbuild-installer",
                "--bin",
                "imgbuild-install",
            ])
            .current_dir(workspace_root())
            .status()
            .expect("run cargo build");
        assert!(st.success(), "building imgbuild-install failed");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join("target"));
        let bin = target.join("debug/imgbuild-install");
        assert!(bin.is_file(), "{} missing", bin.display());
        std::env::set_var(imgbuild::installer::INSTALLER_ENV, &bin);
        bin
    })
    .clone()
}

fn inputs(work: &Path) -> MediaInputs {
    let dir = images();
    let key = work.join("test.key");
    if !key.exists() {
        imgchannel::generate(&key).expect("generate a test key");
    }
    MediaInputs {
        stem: STEM.into(),
        title: "imgbuild minimal 1.0.0".into(),
        raw: dir.join(format!("{STEM}.raw")),
        root_ext4: dir.join(format!("{STEM}.root.ext4")),
        kernel: dir.join(format!("{STEM}.vmlinuz")),
        initrd: dir.join(format!("{STEM}.initrd")),
        recipe_cmdline: "console=ttyS0,115200 systemd.show_status=1".into(),
        epoch: 1_735_689_600,
        key,
    }
}

/// The installer ISO, built once per test process.
fn iso() -> &'static PathBuf {
    static ISO: OnceLock<PathBuf> = OnceLock::new();
    ISO.get_or_init(|| {
        installer_binary();
        let work = e2e_dir("install");
        let _ = fs::remove_dir_all(&work);
        fs::create_dir_all(&work).unwrap();
        let started = Instant::now();
        let out = work.join(format!("{STEM}.iso"));
        imgbuild::iso::build_iso(&inputs(&work), &work.join("media"), &out).expect("build the ISO");
        eprintln!(
            "ISO built in {:.1}s: {} MiB",
            started.elapsed().as_secs_f64(),
            fs::metadata(&out).unwrap().len() >> 20
        );
        out
    })
}

fn blank_disk(path: &Path, size: &str) {
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw"])
        .arg(path)
        .arg(size)
        .status()
        .unwrap();
    assert!(st.success());
}

fn cdrom_args(iso: &Path) -> Vec<std::ffi::OsString> {
    vec![
        "-drive".into(),
        format!(
            "file={},if=none,id=cd0,media=cdrom,readonly=on,format=raw",
            iso.display()
        )
        .into(),
        "-device".into(),
        "ide-cd,drive=cd0,bootindex=1".into(),
    ]
}

fn wait(vm: &Vm, what: &str, secs: u64) {
    if let Err(e) = vm.wait_for_serial(what, Duration::from_secs(secs)) {
        let tail = vm.serial_tail(60);
        let _ = vm.kill();
        panic!("waiting for {what:?}: {e}\n--- serial tail ---\n{tail}");
    }
}

fn all_zero(path: &Path) -> bool {
    let mut f = fs::File::open(path).unwrap();
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            return true;
        }
        if buf[..n].iter().any(|&b| b != 0) {
            return false;
        }
    }
}

fn assert_installed_system(log: &str) {
    let r = parse_boot_report(log).unwrap();
    assert_eq!(r.get("partlabel"), Some("root-a"), "{r:?}");
    assert_eq!(r.get("image"), Some("minimal"));
    assert_eq!(r.get("version"), Some("1.0.0"));
    assert_eq!(r.state, "running", "failed units: {:?}", r.failed);
    let var_mib: u64 = r.get("var_mib").unwrap_or("0").parse().unwrap();
    assert!(
        var_mib > 1500,
        "var was not grown to the 4 GiB disk: {var_mib} MiB"
    );
}

#[test]
#[ignore = "VM tier: boots the installer ISO in QEMU, installs and boots the disk (~10 min under TCG)"]
fn iso_installs_onto_a_blank_disk_and_reboots_into_it() {
    let iso = iso();
    let work = tempfile::tempdir().unwrap();
    let disk = work.path().join("disk.raw");
    blank_disk(&disk, "4G");
    let mut cfg = VmConfig::uefi("iso-install", imgqemu::firmware().unwrap(), &disk);
    cfg.snapshot = false;
    cfg.disk_format = Some(imgqemu::DiskFormat::Raw);
    cfg.memory_mib = 2048;
    cfg.network = None;
    cfg.serial_log = Some(e2e_dir("install").join("iso-install.serial.log"));
    cfg.extra_args = cdrom_args(iso);
    let vm = Vm::start(&cfg).unwrap();
    let t0 = Instant::now();
    wait(&vm, "Type yes and Enter", 600);
    let prompt = t0.elapsed();
    vm.send_serial("yes\n").unwrap();
    wait(&vm, "done: rebooting into the installed system", 1800);
    let installed = t0.elapsed();
    wait(&vm, "imgbuild-report: end", 900);
    let booted = t0.elapsed();
    let log = vm.serial_log();
    vm.kill().unwrap();
    eprintln!(
        "ISO: installer prompt after {:.0}s, installed after {:.0}s, installed system's boot report after {:.0}s",
        prompt.as_secs_f64(),
        installed.as_secs_f64(),
        booted.as_secs_f64()
    );
    assert!(
        log.contains("signature good"),
        "the payload was not verified"
    );
    assert!(log.contains("matches the signature"), "no read-back check");
    assert_installed_system(&log);
}

#[test]
#[ignore = "VM tier: boots the installer ISO in QEMU next to a disk that is too small"]
fn iso_refuses_a_disk_smaller_than_the_image() {
    let iso = iso();
    let work = tempfile::tempdir().unwrap();
    let disk = work.path().join("small.raw");
    blank_disk(&disk, "1G");
    let mut cfg = VmConfig::uefi("iso-refuse", imgqemu::firmware().unwrap(), &disk);
    cfg.snapshot = false;
    cfg.disk_format = Some(imgqemu::DiskFormat::Raw);
    cfg.memory_mib = 2048;
    cfg.network = None;
    cfg.serial_log = Some(e2e_dir("install").join("iso-refuse.serial.log"));
    cfg.extra_args = cdrom_args(iso);
    let vm = Vm::start(&cfg).unwrap();
    wait(&vm, "Type yes and Enter", 600);
    vm.send_serial("yes\n").unwrap();
    wait(&vm, "installation stopped", 300);
    let log = vm.serial_log();
    vm.kill().unwrap();
    assert!(
        log.contains("refusing /dev/vda: it is 1024 MiB, smaller than the image"),
        "no clear refusal on the console"
    );
    assert!(log.contains("nothing was written"));
    assert!(all_zero(&disk), "the refused disk was written to");
}

#[test]
#[ignore = "VM tier: boots the installer ISO written to a (virtual) USB stick"]
fn iso_dd_to_a_usb_stick_boots_and_never_offers_itself_as_target() {
    let iso = iso();
    let work = tempfile::tempdir().unwrap();
    let disk = work.path().join("disk.raw");
    blank_disk(&disk, "4G");
    let mut cfg = VmConfig::uefi("iso-usb", imgqemu::firmware().unwrap(), &disk);
    cfg.snapshot = false;
    cfg.disk_format = Some(imgqemu::DiskFormat::Raw);
    cfg.memory_mib = 2048;
    cfg.network = None;
    cfg.serial_log = Some(e2e_dir("install").join("iso-usb.serial.log"));
    // The ISO file as a USB mass-storage disk: what `dd if=X.iso of=/dev/sdX` makes.
    cfg.extra_args = vec![
        "-drive".into(),
        format!(
            "file={},if=none,id=usb0,format=raw,readonly=on",
            iso.display()
        )
        .into(),
        "-device".into(),
        "qemu-xhci,id=xhci".into(),
        "-device".into(),
        "usb-storage,bus=xhci.0,drive=usb0,removable=on,bootindex=1".into(),
    ];
    let vm = Vm::start(&cfg).unwrap();
    let t0 = Instant::now();
    wait(&vm, "Type yes and Enter", 600);
    let log = vm.serial_log();
    vm.kill().unwrap();
    eprintln!(
        "USB: installer prompt after {:.0}s",
        t0.elapsed().as_secs_f64()
    );
    assert!(
        log.contains("install onto /dev/vda (4096 MiB)?"),
        "the blank disk is the only candidate"
    );
    assert!(all_zero(&disk), "nothing written before the answer");
}

/// A static file server for the PXE test, on 127.0.0.1 only (the guest reaches it as
/// 10.0.2.2 through QEMU's user-mode network). One connection at a time, no keep-alive.
fn serve_http(root: PathBuf) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { continue };
            let mut req = Vec::new();
            let mut byte = [0u8; 1];
            while !req.ends_with(b"\r\n\r\n") && s.read(&mut byte).map(|n| n == 1).unwrap_or(false)
            {
                req.push(byte[0]);
            }
            let req = String::from_utf8_lossy(&req).into_owned();
            let path = req.split_whitespace().nth(1).unwrap_or("/").to_owned();
            let rel = path.trim_start_matches('/');
            let file = root.join(rel);
            match (rel.contains(".."), fs::File::open(&file)) {
                (false, Ok(mut f)) if file.is_file() => {
                    let len = f.metadata().unwrap().len();
                    let _ = write!(
                        s,
                        "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
                    );
                    let _ = std::io::copy(&mut f, &mut s);
                }
                _ => {
                    let _ = write!(
                        s,
                        "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    );
                }
            }
            eprintln!("http: {path}");
        }
    });
    port
}

/// The PXE directory, built once per test process, under `e2e/install-pxe/http/`.
fn pxe_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        installer_binary();
        let work = e2e_dir("install-pxe");
        let _ = fs::remove_dir_all(&work);
        fs::create_dir_all(&work).unwrap();
        let pxe = work.join("http").join(format!("{STEM}.pxe"));
        let started = Instant::now();
        imgbuild::pxe::build_pxe(&inputs(&work), &work.join("media"), &pxe).expect("build PXE");
        eprintln!(
            "PXE directory built in {:.1}s",
            started.elapsed().as_secs_f64()
        );
        for f in [
            "vmlinuz",
            "initrd.img",
            "boot.ipxe",
            "SHA256SUMS",
            "SHA256SUMS.sig",
        ] {
            assert!(pxe.join(f).is_file(), "{f} missing");
        }
        pxe
    })
}

/// A VM that network-boots `boot.ipxe` from an HTTP server on 127.0.0.1, through a
/// TFTP-served start script that sets `${base}` (and `${imgbuild-args}` if given).
fn pxe_vm(name: &str, disk: Option<&Path>, args: Option<&str>, memory_mib: u32) -> (Vm, u16) {
    let pxe = pxe_dir();
    let port = serve_http(pxe.parent().unwrap().to_path_buf());
    let tftp = e2e_dir("install-pxe").join(format!("tftp-{name}"));
    fs::create_dir_all(&tftp).unwrap();
    let extra = args
        .map(|a| format!("set imgbuild-args {a}\n"))
        .unwrap_or_default();
    fs::write(
        tftp.join("start.ipxe"),
        format!("#!ipxe\nset base http://10.0.2.2:{port}/{STEM}.pxe/\n{extra}chain ${{base}}boot.ipxe\n"),
    )
    .unwrap();
    let mut cfg = VmConfig::uefi(name, imgqemu::firmware().unwrap(), "unused");
    cfg.disk = disk.map(Path::to_path_buf);
    cfg.snapshot = false;
    cfg.disk_format = Some(imgqemu::DiskFormat::Raw);
    cfg.memory_mib = memory_mib;
    cfg.network = None;
    cfg.serial_log = Some(e2e_dir("install-pxe").join(format!("{name}.serial.log")));
    cfg.extra_args = vec![
        "-netdev".into(),
        format!("user,id=pxe0,tftp={},bootfile=start.ipxe", tftp.display()).into(),
        "-device".into(),
        "virtio-net-pci,netdev=pxe0,bootindex=1,romfile=/usr/lib/ipxe/qemu/efi-virtio.rom".into(),
    ];
    (Vm::start(&cfg).unwrap(), port)
}

#[test]
#[ignore = "VM tier: network-boots the installer with iPXE (TFTP + HTTP), installs and boots the disk"]
fn pxe_installs_over_http_and_reboots_into_the_disk() {
    let work = tempfile::tempdir().unwrap();
    let disk = work.path().join("disk.raw");
    blank_disk(&disk, "4G");
    let (vm, port) = pxe_vm("pxe-install", Some(&disk), None, 2048);
    let t0 = Instant::now();
    wait(&vm, "imgbuild live installer starting", 600);
    let kernel = t0.elapsed();
    wait(&vm, "done: rebooting into the installed system", 1800);
    let installed = t0.elapsed();
    wait(&vm, "imgbuild-report: end", 900);
    let booted = t0.elapsed();
    let log = vm.serial_log();
    vm.kill().unwrap();
    eprintln!(
        "PXE: installer running after {:.0}s, installed after {:.0}s, boot report after {:.0}s",
        kernel.as_secs_f64(),
        installed.as_secs_f64(),
        booted.as_secs_f64()
    );
    assert!(log.contains(&format!(
        "downloading http://10.0.2.2:{port}/{STEM}.pxe/SHA256SUMS"
    )));
    assert!(log.contains("signature good"));
    assert_installed_system(&log);
}

#[test]
#[ignore = "VM tier: network-boots a diskless node: the verified image runs from a RAM disk"]
fn pxe_diskless_runs_the_image_from_ram() {
    let (vm, _) = pxe_vm("pxe-diskless", None, Some("imgbuild.diskless"), 3072);
    let t0 = Instant::now();
    wait(&vm, "diskless: starting the image's init", 1800);
    let switched = t0.elapsed();
    wait(&vm, "imgbuild-report: end", 900);
    let booted = t0.elapsed();
    let log = vm.serial_log();
    vm.kill().unwrap();
    eprintln!(
        "PXE diskless: init started after {:.0}s, boot report after {:.0}s",
        switched.as_secs_f64(),
        booted.as_secs_f64()
    );
    assert!(log.contains("signature good"));
    let r = parse_boot_report(&log).unwrap();
    assert_eq!(r.get("root"), Some("/dev/ram0p2"), "{r:?}");
    assert_eq!(r.get("partlabel"), Some("root-a"), "{r:?}");
    assert_eq!(r.get("version"), Some("1.0.0"));
    assert_eq!(r.state, "running", "failed units: {:?}", r.failed);
    let opts = r.get("options").unwrap_or_default();
    assert!(
        opts.split(',').any(|o| o == "ro"),
        "root mount options {opts}"
    );
    assert!(
        r.get("var").is_some_and(|v| v.starts_with("/dev/ram0p")),
        "var comes from the RAM disk: {r:?}"
    );
}
