//! Boots real guests under QEMU (TCG): a Debian kernel directly, and OVMF with a blank disk.
//!
//! Skipped only when qemu-system-x86_64 is absent. The guests run one at a time (the
//! host is shared), serialised by `ONE_GUEST`.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use imgqemu::{Vm, VmConfig, WaitError};

static ONE_GUEST: Mutex<()> = Mutex::new(());

/// Where the Debian test kernel lives; override with `IMGQEMU_TEST_BOOT_DIR`.
const DEFAULT_BOOT_DIR: &str = "/tmp/rootfs-test/boot";

fn qemu_present() -> bool {
    match imgqemu::find_qemu() {
        Ok(_) => true,
        Err(e) => {
            eprintln!("skipped: {e}");
            false
        }
    }
}

/// The newest `vmlinuz-*` and its `initrd.img-*` in the test boot directory.
fn debian_kernel() -> (PathBuf, PathBuf) {
    let dir = PathBuf::from(
        std::env::var_os("IMGQEMU_TEST_BOOT_DIR").unwrap_or_else(|| DEFAULT_BOOT_DIR.into()),
    );
    let mut kernels: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| {
            panic!(
                "reading {} (set IMGQEMU_TEST_BOOT_DIR to a dir with vmlinuz-* and initrd.img-*): {e}",
                dir.display()
            )
        })
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .collect();
    kernels.sort();
    let kernel = kernels
        .pop()
        .unwrap_or_else(|| panic!("no vmlinuz-* in {}", dir.display()));
    let version = kernel
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .expect("vmlinuz- prefix")
        .to_owned();
    (kernel, dir.join(format!("initrd.img-{version}")))
}

/// True while `pid` exists and is not a zombie. A zombie is dead: it only waits for its
/// parent (here possibly a container's PID 1 that never reaps) to collect its status.
fn process_alive(pid: u32) -> bool {
    match fs::read_to_string(Path::new(&format!("/proc/{pid}/stat"))) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

#[test]
fn direct_kernel_boot_reaches_linux_version_and_kill_leaves_no_process() {
    if !qemu_present() {
        return;
    }
    let _one = ONE_GUEST.lock().unwrap_or_else(PoisonError::into_inner);
    let (kernel, initrd) = debian_kernel();
    // rdinit=/bin/sh: the initrd's busybox shell is PID 1, on the serial console.
    let mut cfg = VmConfig::direct_kernel(
        "direct",
        &kernel,
        Some(initrd),
        "console=ttyS0 panic=-1 rdinit=/bin/sh",
    );
    cfg.memory_mib = 512;
    cfg.network = None;
    cfg.no_reboot = true;
    cfg.fw_cfg = vec![("node/name".into(), "worker-1".into())];
    cfg.oem_strings = vec!["io.imgbuild.node=worker-1".into()];

    let started = Instant::now();
    let vm = Vm::start(&cfg).expect("start QEMU");
    let pid = vm.pid();
    let work = vm.work_dir().to_owned();
    let hit = vm
        .wait_for_serial("Linux version", Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "direct kernel: \"Linux version\" after {:.1}s: {}",
        started.elapsed().as_secs_f64(),
        hit.line
    );
    assert!(hit.line.contains("Linux version"));
    assert!(vm.serial_log().contains("Linux version"));

    // The log file has the command line header and the console output.
    let log = fs::read_to_string(vm.serial_log_path()).expect("read serial log");
    assert!(
        log.starts_with("# imgqemu direct: "),
        "{}",
        &log[..80.min(log.len())]
    );
    assert!(log.contains("opt/imgbuild/node/name,string=worker-1"));

    // QMP answers while the guest runs.
    let mut qmp = imgqemu::Qmp::connect(vm.qmp_socket(), Duration::from_secs(5)).expect("QMP");
    let status = qmp.execute("query-status").expect("query-status");
    assert_eq!(status["running"], true, "{status}");

    // Typing on the console reaches the guest; only the shell's answer says "-42-".
    let prompt = vm
        .wait_for_serial("Run /bin/sh as init process", Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "direct kernel: shell after {:.1}s",
        started.elapsed().as_secs_f64()
    );
    vm.send_serial("echo imgqemu-$((6*7))-ok\n").expect("send");
    let answer = vm
        .wait_for_serial_from(prompt.end, "imgqemu-42-ok", Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        answer.line.trim().ends_with("imgqemu-42-ok"),
        "{}",
        answer.line
    );

    // A pattern that never comes: the error carries the console tail.
    let mark = hit.end;
    let err = vm
        .wait_for_serial_from(mark, "Linux version", Duration::from_secs(2))
        .expect_err("only one Linux version banner");
    match &err {
        WaitError::Timeout { tail, .. } => {
            // The kernel printed well over TAIL_LINES lines by now: the tail is full and
            // ends with what the console shows last.
            assert_eq!(tail.lines().count(), imgqemu::TAIL_LINES, "{tail}");
            let last = tail.lines().last().expect("non-empty tail");
            assert!(vm.serial_log().contains(last), "{last:?} not in the log");
        }
        other => panic!("expected a timeout, got {other}"),
    }

    vm.kill().expect("kill");
    assert!(
        !process_alive(pid),
        "QEMU pid {pid} still exists after kill"
    );
    assert!(vm.try_wait().expect("try_wait").is_some());
    drop(vm);
    assert!(!work.exists(), "work dir {} not removed", work.display());
}

#[test]
fn exited_guest_fails_the_wait_with_the_console_tail() {
    if !qemu_present() {
        return;
    }
    let _one = ONE_GUEST.lock().unwrap_or_else(PoisonError::into_inner);
    let (kernel, _) = debian_kernel();
    // No initrd and no root: the kernel panics, panic=-1 reboots, -no-reboot exits QEMU.
    let mut cfg = VmConfig::direct_kernel("panic", &kernel, None, "console=ttyS0 panic=-1");
    cfg.memory_mib = 256;
    cfg.network = None;
    cfg.no_reboot = true;
    let started = Instant::now();
    let vm = Vm::start(&cfg).expect("start QEMU");
    let err = vm
        .wait_for_serial("login:", Duration::from_secs(180))
        .expect_err("a kernel without root cannot reach login");
    eprintln!(
        "panic boot: QEMU exited after {:.1}s",
        started.elapsed().as_secs_f64()
    );
    match &err {
        WaitError::Exited { tail, .. } => {
            assert!(tail.contains("Kernel panic"), "{tail}");
            assert!(tail.lines().count() <= imgqemu::TAIL_LINES);
        }
        other => panic!("expected QEMU to exit, got {other}"),
    }
    assert!(err.to_string().contains("Kernel panic"));
}

#[test]
fn ovmf_with_blank_disk_reaches_boot_manager_and_writes_only_its_vars_copy() {
    if !qemu_present() {
        return;
    }
    let _one = ONE_GUEST.lock().unwrap_or_else(PoisonError::into_inner);
    let ovmf = imgqemu::firmware().expect("OVMF installed");
    let template_before = fs::read(&ovmf.vars_template).expect("read vars template");

    let dir = tempfile::tempdir().expect("tempdir");
    let disk = dir.path().join("blank.raw");
    // A sparse, all-zero raw image: what `qemu-img create -f raw` makes.
    fs::File::create(&disk)
        .and_then(|f| f.set_len(64 << 20))
        .expect("create blank disk");
    let mut cfg = VmConfig::uefi("ovmf", ovmf.clone(), &disk);
    cfg.memory_mib = 256;
    // No NIC: OVMF would otherwise try PXE before giving up on the disk.
    cfg.network = None;
    cfg.serial_log = Some(dir.path().join("ovmf.serial.log"));

    let started = Instant::now();
    let vm = Vm::start(&cfg).expect("start QEMU");
    assert_ne!(vm.vars_path(), ovmf.vars_template.as_path());
    // OVMF's boot manager (BdsDxe) tries the disk, finds no loader and says so.
    let hit = vm
        .wait_for_serial("BdsDxe: failed to load Boot", Duration::from_secs(180))
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "OVMF: boot manager gave up on the blank disk after {:.1}s: {}",
        started.elapsed().as_secs_f64(),
        hit.line
    );
    let vars = fs::read(vm.vars_path()).expect("read vars copy");
    assert_eq!(vars.len(), template_before.len());
    assert_ne!(
        vars, template_before,
        "OVMF wrote no variables to its private copy"
    );
    assert_eq!(
        fs::read(&ovmf.vars_template).expect("read vars template"),
        template_before,
        "the system vars template changed"
    );

    // The EFI shell does not handle the power button: shutdown must fall back to kill.
    let pid = vm.pid();
    let outcome = vm.shutdown(Duration::from_secs(3)).expect("shutdown");
    assert_eq!(outcome, imgqemu::Shutdown::Killed);
    assert!(!process_alive(pid));
    let log = fs::read_to_string(dir.path().join("ovmf.serial.log")).expect("serial log");
    assert!(log.contains("BdsDxe"));
}

/// Set in the child process of `qemu_dies_when_its_owner_exits_without_cleanup`.
const ORPHAN_CHILD_ENV: &str = "IMGQEMU_TEST_ORPHAN_CHILD";

/// Not a test on its own: run by the test below in a child process, which starts a VM
/// from a short-lived thread, prints QEMU's pid and exits without dropping the `Vm`.
#[test]
fn orphan_child_helper() {
    // The parent passes a directory it owns and removes: Drop never runs here.
    let Some(work_parent) = std::env::var_os(ORPHAN_CHILD_ENV) else {
        return;
    };
    let (kernel, initrd) = debian_kernel();
    let mut cfg = VmConfig::direct_kernel("orphan", &kernel, Some(initrd), "console=ttyS0");
    cfg.memory_mib = 256;
    cfg.network = None;
    cfg.work_parent = Some(PathBuf::from(work_parent));
    // Started on a thread that ends at once: QEMU must survive that...
    let vm = std::thread::spawn(move || Vm::start(&cfg).expect("start QEMU"))
        .join()
        .expect("starter thread");
    vm.wait_for_serial("Linux version", Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}"));
    println!("QEMU_PID={}", vm.pid());
    // ...and die with the process even though Drop never runs.
    std::process::exit(0);
}

#[test]
fn qemu_dies_when_its_owner_exits_without_cleanup() {
    if !qemu_present() {
        return;
    }
    let _one = ONE_GUEST.lock().unwrap_or_else(PoisonError::into_inner);
    let exe = std::env::current_exe().expect("current exe");
    let work_parent = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(exe)
        .args([
            "--exact",
            "orphan_child_helper",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ORPHAN_CHILD_ENV, work_parent.path())
        .output()
        .expect("run the child test process");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let pid: u32 = stdout
        .lines()
        // The harness may print "test ... " on the same line first.
        .find_map(|l| l.split_once("QEMU_PID=").map(|(_, pid)| pid))
        .unwrap_or_else(|| {
            panic!(
                "child printed no QEMU pid\nstdout:\n{stdout}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
        .trim()
        .parse()
        .expect("pid");
    // PR_SET_PDEATHSIG delivers SIGKILL when the child process exits.
    let deadline = Instant::now() + Duration::from_secs(10);
    while process_alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !process_alive(pid),
        "QEMU pid {pid} outlived its owner process"
    );
}
