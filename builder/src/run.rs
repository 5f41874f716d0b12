//! `imgbuild run`: boot one disk image under QEMU with UEFI and show its serial console.
//!
//! Owns turning the command-line flags into an `imgqemu::VmConfig`, supervising the
//! guest (timeout, `--until`, Ctrl-C/SIGTERM) and the exit status. It must never leave
//! QEMU running when it returns, and never write to the image unless `--no-snapshot`.

use std::io::{BufRead, IsTerminal};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use imgqemu::{Accel, Ovmf, PortForward, UserNet, Vm, VmConfig, WaitError};

/// How long a guest gets to power off after Ctrl-C or SIGTERM before QEMU is killed.
const POWEROFF_GRACE: Duration = Duration::from_secs(30);

/// How often the supervisor looks at signals, the timeout and the console.
const TICK: Duration = Duration::from_millis(200);

/// Boot a disk image in QEMU (UEFI firmware) and stream its serial console here.
///
/// Writes go to a throw-away snapshot unless --no-snapshot. Ctrl-C or SIGTERM presses
/// the VM's power button (a second one kills it). Exits 0 when the guest powers off,
/// or, with --until, as soon as the pattern appears on the console.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Disk image to boot: raw or qcow2 (detected from the header).
    #[arg(value_name = "IMAGE")]
    pub image: PathBuf,

    /// Kill the VM and fail after this many seconds (0: no limit).
    #[arg(long, value_name = "SECS", default_value_t = 600)]
    pub timeout: u64,

    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 1024)]
    pub memory: u32,

    /// Write to IMAGE itself instead of a snapshot that is discarded on exit.
    #[arg(long)]
    pub no_snapshot: bool,

    /// Where to write the serial console [default: IMAGE.serial.log].
    #[arg(long, value_name = "FILE")]
    pub serial_log: Option<PathBuf>,

    /// Exit 0 (and kill the VM) as soon as PATTERN (a plain substring) appears on the
    /// serial console; fail if the guest stops or the timeout comes first.
    #[arg(long, value_name = "PATTERN")]
    pub until: Option<String>,

    /// Accelerator: auto is TCG unless IMGBUILD_ACCEL=kvm; kvm is never guessed
    /// because nested KVM can hang the guest.
    #[arg(long, value_enum, default_value_t = AccelArg::Auto)]
    pub accel: AccelArg,

    /// Forward 127.0.0.1:HOSTPORT on this machine to GUESTPORT in the guest (TCP;
    /// repeatable).
    #[arg(long = "forward", value_name = "HOSTPORT:GUESTPORT")]
    pub forwards: Vec<PortForward>,
}

/// `--accel` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AccelArg {
    Auto,
    Tcg,
    Kvm,
}

impl From<AccelArg> for Accel {
    fn from(a: AccelArg) -> Accel {
        match a {
            AccelArg::Auto => Accel::Auto,
            AccelArg::Tcg => Accel::Tcg,
            AccelArg::Kvm => Accel::Kvm,
        }
    }
}

/// `IMAGE.serial.log` next to the image (the extension is appended, not replaced).
pub fn default_serial_log(image: &Path) -> PathBuf {
    let mut s = image.as_os_str().to_owned();
    s.push(".serial.log");
    PathBuf::from(s)
}

/// A VM name from the image file name: what `imgqemu` accepts, nothing else.
fn vm_name(image: &Path) -> String {
    let stem = image
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(32)
        .collect();
    if name.is_empty() {
        "image".to_owned()
    } else {
        name
    }
}

/// The VM `args` describe, booted with `ovmf`. Pure: no I/O.
pub fn vm_config(args: &RunArgs, ovmf: Ovmf) -> VmConfig {
    let mut cfg = VmConfig::uefi(&vm_name(&args.image), ovmf, &args.image);
    cfg.snapshot = !args.no_snapshot;
    cfg.memory_mib = args.memory;
    cfg.accel = args.accel.into();
    cfg.network = Some(UserNet {
        forwards: args.forwards.clone(),
    });
    cfg.serial_log = Some(
        args.serial_log
            .clone()
            .unwrap_or_else(|| default_serial_log(&args.image)),
    );
    cfg.echo_serial = true;
    cfg
}

/// Boots `args.image` and supervises it until it powers off, `--until` matches, the
/// timeout passes or a signal arrives. QEMU is gone when this returns.
pub fn run(args: &RunArgs) -> Result<()> {
    std::fs::metadata(&args.image)
        .with_context(|| format!("disk image {}", args.image.display()))?;
    let cfg = vm_config(args, imgqemu::firmware()?);
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ] {
        signal_hook::flag::register(sig, Arc::clone(&stop))
            .with_context(|| format!("installing a handler for signal {sig}"))?;
    }
    let vm = Vm::start(&cfg).with_context(|| format!("booting {}", args.image.display()))?;
    eprintln!(
        "imgbuild run: booting {} ({}, serial log {}); Ctrl-C powers it off",
        args.image.display(),
        if args.no_snapshot {
            "writes go to the image"
        } else {
            "snapshot: writes are discarded"
        },
        vm.serial_log_path().display()
    );
    if std::io::stdin().is_terminal() {
        forward_terminal_lines(&vm);
    }
    let result = supervise(&vm, args, &stop);
    // Whatever happened above, no QEMU outlives this function.
    vm.kill()?;
    result
}

/// Sends each line typed on the terminal to the guest console. The thread blocks on
/// stdin and is left behind when `run` returns; it owns nothing that needs cleanup.
fn forward_terminal_lines(vm: &Vm) {
    let writer = vm.serial_writer();
    let spawned = std::thread::Builder::new()
        .name("terminal-input".into())
        .spawn(move || {
            for line in std::io::stdin().lock().lines() {
                let Ok(mut line) = line else { break };
                line.push('\n');
                if writer.send(line.as_bytes()).is_err() {
                    break;
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("not forwarding terminal input: {e}");
    }
}

fn supervise(vm: &Vm, args: &RunArgs, stop: &AtomicBool) -> Result<()> {
    let started = Instant::now();
    let deadline = (args.timeout > 0).then(|| started + Duration::from_secs(args.timeout));
    let mut from = 0;
    loop {
        if stop.swap(false, Ordering::SeqCst) {
            return power_off_after_signal(vm, stop);
        }
        let now = Instant::now();
        let tick = match deadline {
            Some(d) if now >= d => {
                vm.kill()?;
                bail!(
                    "{} did not {} within {} s; VM killed\n--- last serial lines ---\n{}",
                    args.image.display(),
                    match &args.until {
                        Some(p) => format!("print {p:?}"),
                        None => "power off".to_owned(),
                    },
                    args.timeout,
                    vm.serial_tail(imgqemu::TAIL_LINES)
                );
            }
            Some(d) => TICK.min(d - now),
            None => TICK,
        };
        match &args.until {
            Some(pattern) => {
                let mark = vm.serial_mark();
                match vm.wait_for_serial_from(from, pattern, tick) {
                    Ok(hit) => {
                        eprintln!(
                            "\nimgbuild run: found {pattern:?} after {:.1} s: {}",
                            started.elapsed().as_secs_f64(),
                            hit.line.trim()
                        );
                        return Ok(());
                    }
                    // Everything before `mark` has been searched; a match may still
                    // straddle it.
                    Err(WaitError::Timeout { .. }) => {
                        from = mark
                            .saturating_sub(pattern.len().saturating_sub(1))
                            .max(from)
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            None => {
                if let Some(status) = vm.wait_exit(tick) {
                    if status.success() {
                        eprintln!("\nimgbuild run: the guest powered off");
                        return Ok(());
                    }
                    bail!(
                        "QEMU exited with {status}\n--- last serial lines ---\n{}",
                        vm.serial_tail(imgqemu::TAIL_LINES)
                    );
                }
            }
        }
    }
}

/// First signal: ACPI power button and up to [`POWEROFF_GRACE`] to comply. A second
/// signal, or the grace running out, kills QEMU. Always an error: the run was cut short.
fn power_off_after_signal(vm: &Vm, stop: &AtomicBool) -> Result<()> {
    eprintln!("\nimgbuild run: pressing the power button (again to kill the VM)");
    if let Err(e) = vm.powerdown() {
        vm.kill()?;
        bail!("interrupted; the power button failed ({e:#}), VM killed");
    }
    let deadline = Instant::now() + POWEROFF_GRACE;
    loop {
        if let Some(status) = vm.wait_exit(TICK) {
            bail!("interrupted; the guest powered off ({status})");
        }
        if stop.load(Ordering::SeqCst) || Instant::now() >= deadline {
            vm.kill()?;
            bail!("interrupted; VM killed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    fn parse(argv: &[&str]) -> RunArgs {
        Cli::try_parse_from(std::iter::once("run").chain(argv.iter().copied()))
            .expect("parse")
            .run
    }

    fn ovmf() -> Ovmf {
        Ovmf {
            code: "/fw/CODE.fd".into(),
            vars_template: "/fw/VARS.fd".into(),
        }
    }

    #[test]
    fn defaults() {
        let a = parse(&["out/node.raw"]);
        assert_eq!(a.timeout, 600);
        assert_eq!(a.memory, 1024);
        assert!(!a.no_snapshot);
        assert_eq!(a.accel, AccelArg::Auto);
        let cfg = vm_config(&a, ovmf());
        assert!(cfg.snapshot);
        assert!(cfg.echo_serial);
        assert_eq!(cfg.name, "node");
        assert_eq!(cfg.accel, Accel::Auto);
        assert_eq!(cfg.disk, Some(PathBuf::from("out/node.raw")));
        assert_eq!(
            cfg.serial_log,
            Some(PathBuf::from("out/node.raw.serial.log"))
        );
    }

    #[test]
    fn flags_reach_the_vm_config() {
        let a = parse(&[
            "--memory",
            "2048",
            "--no-snapshot",
            "--accel",
            "kvm",
            "--forward",
            "2222:22",
            "--forward",
            "6443:6443",
            "--serial-log",
            "/tmp/x.log",
            "--until",
            "login:",
            "my image,v2.qcow2",
        ]);
        let cfg = vm_config(&a, ovmf());
        assert_eq!(cfg.memory_mib, 2048);
        assert!(!cfg.snapshot);
        assert_eq!(cfg.accel, Accel::Kvm);
        assert_eq!(cfg.serial_log, Some(PathBuf::from("/tmp/x.log")));
        assert_eq!(cfg.name, "my-image-v2");
        assert!(cfg.validate().is_ok());
        let fwd = &cfg.network.expect("network").forwards;
        assert_eq!(
            fwd,
            &[
                PortForward {
                    host: 2222,
                    guest: 22
                },
                PortForward {
                    host: 6443,
                    guest: 6443
                }
            ]
        );
        assert_eq!(a.until.as_deref(), Some("login:"));
    }

    #[test]
    fn bad_forwards_and_accels_are_rejected() {
        for argv in [
            &["--forward", "22", "i.raw"][..],
            &["--forward", "0:22", "i.raw"],
            &["--accel", "hvf", "i.raw"],
            &["--timeout", "-1", "i.raw"],
        ] {
            let r = Cli::try_parse_from(std::iter::once("run").chain(argv.iter().copied()));
            assert!(r.is_err(), "{argv:?} accepted");
        }
    }

    #[test]
    fn vm_names_are_always_valid() {
        assert_eq!(vm_name(Path::new("/a/b/node-1.raw")), "node-1");
        assert_eq!(vm_name(Path::new("/")), "image");
        assert_eq!(vm_name(Path::new("ünï côdé.img")), "-n--c-d-");
    }

    /// QEMU processes that are children of this test process.
    fn our_qemu_children() -> Vec<u32> {
        let me = std::process::id().to_string();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let pid: u32 = e.file_name().to_str()?.parse().ok()?;
                let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
                // pid (comm) state ppid ...
                let (comm, rest) = stat.split_once(") ")?;
                let ppid = rest.split_whitespace().nth(1)?;
                (comm.contains("qemu-system") && ppid == me).then_some(pid)
            })
            .collect()
    }

    fn blank_disk(dir: &Path) -> PathBuf {
        let disk = dir.join("blank.raw");
        std::fs::File::create(&disk)
            .and_then(|f| f.set_len(64 << 20))
            .expect("create blank disk");
        disk
    }

    /// Real boots of OVMF on a blank disk: `--until`, `--timeout`, and SIGTERM twice.
    /// One test, so only one guest runs at a time.
    #[test]
    fn run_supervises_a_real_guest() {
        if let Err(e) = imgqemu::find_qemu() {
            eprintln!("skipped: {e}");
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = blank_disk(dir.path());
        let disk_arg = disk.to_str().expect("utf-8 path");

        // --until: exits 0 as soon as OVMF gives up on the disk; the log is next to it.
        let started = Instant::now();
        let mut args = parse(&[
            "--memory",
            "256",
            "--until",
            "BdsDxe: failed to load Boot",
            disk_arg,
        ]);
        run(&args).expect("run --until");
        eprintln!("run --until: {:.1} s", started.elapsed().as_secs_f64());
        let log = std::fs::read_to_string(dir.path().join("blank.raw.serial.log")).expect("log");
        assert!(log.contains("BdsDxe: failed to load Boot"));
        assert!(our_qemu_children().is_empty());
        assert_eq!(
            std::fs::read(&disk).expect("read disk"),
            vec![0u8; 64 << 20],
            "snapshot mode wrote to the image"
        );

        // --timeout: a pattern that never comes fails with the console tail.
        args.until = Some("this never appears".into());
        args.timeout = 3;
        let err = run(&args).expect_err("timeout");
        let msg = format!("{err:#}");
        assert!(msg.contains("within 3 s; VM killed"), "{msg}");
        assert!(msg.contains("--- last serial lines ---"), "{msg}");
        assert!(our_qemu_children().is_empty());

        // SIGTERM: power button first (the EFI shell ignores it), a second one kills.
        args.timeout = 120;
        let signaller = std::thread::spawn(|| {
            std::thread::sleep(Duration::from_secs(4));
            signal_hook::low_level::raise(signal_hook::consts::SIGTERM).expect("raise");
            std::thread::sleep(Duration::from_secs(2));
            signal_hook::low_level::raise(signal_hook::consts::SIGTERM).expect("raise");
        });
        let started = Instant::now();
        let err = run(&args).expect_err("interrupted");
        signaller.join().expect("signaller");
        assert!(
            format!("{err:#}").contains("interrupted; VM killed"),
            "{err:#}"
        );
        assert!(started.elapsed() < Duration::from_secs(30));
        assert!(our_qemu_children().is_empty());
    }
}
