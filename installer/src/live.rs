//! The live installer: PID 1 of the installer initramfs (`rdinit=/imgbuild-install`),
//! shared by the ISO and PXE boot paths.
//!
//! Boot sequence: mount /proc, /sys, /dev; start the initrd's own `systemd-udevd` so the
//! image's storage (and, for PXE, network) modules load; insmod any extra modules the
//! builder added; for PXE bring the network up with the initrd's klibc `ipconfig` and
//! download the payload; verify the payload; choose and check the target disk; write
//! it ([`crate::write`]); sync and `reboot(2)`.
//!
//! Payload (in the initramfs under [`PAYLOAD_DIR`], or at `imgbuild.url=` for PXE):
//! `SHA256SUMS` listing `NAME.raw` and `NAME.raw.zst`, its detached signature
//! `SHA256SUMS.sig`, and `NAME.raw.zst`. The public key is always the one in the
//! initramfs ([`PUBKEY_PATH`], optionally pinned by `imgbuild.pubkey-sha256=`), never
//! one from the network. Nothing is written before the signature and the `.zst` hash
//! verify; the first MiB is written only after the decompressed stream's hash matches
//! the signed `NAME.raw` hash. `var` is not resized here: the image grows it to the disk
//! on its first boot (systemd-repart), exactly as on a flashed disk.
//!
//! This module never exits while it is PID 1 (that would panic the kernel): on an error
//! it prints the reason on the console and starts a rescue shell, or waits.

use std::fs;
use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::http::{self, HttpUrl};
use crate::target::{self, BlockDevice, Refusal};
use crate::verify::{self, Sums};
use crate::write::{self, Phase};
use crate::MIB;

/// Where the embedded payload lives in the initramfs.
pub const PAYLOAD_DIR: &str = "/imgbuild/payload";
/// The public key (64 hex digits) payloads are checked with.
pub const PUBKEY_PATH: &str = "/imgbuild/pubkey";
/// Extra kernel modules (`*.ko`) the builder added, loaded in the order of `order`.
pub const MODULES_DIR: &str = "/imgbuild/modules";
/// `blockdev` from the image (PXE initrds): re-reads a RAM disk's partition table.
pub const BLOCKDEV_PATH: &str = "/imgbuild/bin/blockdev";
/// The image's `brd` (RAM disk) module (PXE initrds), loaded only for `imgbuild.diskless`.
pub const BRD_MODULE: &str = "/imgbuild/brd.ko";
/// Prefix of every console line, so logs and tests can find them.
pub const TAG: &str = "imgbuild-install:";

/// How the target disk is chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetChoice {
    /// `imgbuild.install=/dev/X`.
    Device(PathBuf),
    /// `imgbuild.install=auto`: the only candidate, without asking.
    Auto,
    /// Nothing given: ask on the console when there is exactly one candidate.
    Ask,
}

/// What the kernel command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub target: TargetChoice,
    /// `imgbuild.url=http://.../`: fetch the payload from this directory (PXE).
    pub url: Option<String>,
    /// `imgbuild.pubkey-sha256=HEX`: the embedded key must have this fingerprint.
    pub pubkey_sha256: Option<String>,
    /// `imgbuild.noreboot`: power off instead of rebooting when done.
    pub poweroff: bool,
    /// `imgbuild.diskless`: write the image to a RAM disk and boot slot A from it.
    pub diskless: bool,
}

/// Parses `/proc/cmdline`. Unknown words are ignored (they belong to the kernel).
pub fn parse_cmdline(text: &str) -> Options {
    let mut o = Options {
        target: TargetChoice::Ask,
        url: None,
        pubkey_sha256: None,
        poweroff: false,
        diskless: false,
    };
    for word in text.split_whitespace() {
        match word.split_once('=') {
            Some(("imgbuild.install", "auto")) => o.target = TargetChoice::Auto,
            Some(("imgbuild.install", dev)) if !dev.is_empty() => {
                o.target = TargetChoice::Device(PathBuf::from(dev))
            }
            Some(("imgbuild.url", url)) => o.url = Some(url.to_owned()),
            Some(("imgbuild.pubkey-sha256", h)) => o.pubkey_sha256 = Some(h.to_ascii_lowercase()),
            None if word == "imgbuild.noreboot" => o.poweroff = true,
            None if word == "imgbuild.diskless" => o.diskless = true,
            _ => {}
        }
    }
    o
}

/// Print one tagged line on the console.
pub fn say(msg: &str) {
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{TAG} {msg}");
    let _ = out.flush();
}

/// Whether a disk is an ISO 9660 medium (`CD001` at byte 32769): the installer's own
/// boot medium when an ISO was `dd`-ed to a stick. Never a candidate.
fn is_iso9660(dev: &Path) -> bool {
    let mut buf = [0u8; 5];
    fs::File::open(dev)
        .and_then(|mut f| {
            use std::io::{Seek, SeekFrom};
            f.seek(SeekFrom::Start(32769))?;
            f.read_exact(&mut buf)
        })
        .map(|_| &buf == b"CD001")
        .unwrap_or(false)
}

/// Which disk to write, from the cmdline choice and the candidates (boot media
/// already removed). `confirm` asks the operator; it is called only for [`TargetChoice::Ask`].
pub fn choose_target(
    choice: &TargetChoice,
    sys: &Path,
    candidates: &[BlockDevice],
    confirm: &mut dyn FnMut(&BlockDevice) -> bool,
) -> Result<BlockDevice> {
    let list = || {
        candidates
            .iter()
            .map(|d| format!("{} ({} MiB)", d.dev_path().display(), d.size / MIB))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match choice {
        TargetChoice::Device(path) => {
            let name = target::disk_name(sys, path).ok_or_else(|| {
                anyhow!(
                    "imgbuild.install={}: not a whole disk; disks here: {}",
                    path.display(),
                    list()
                )
            })?;
            target::read_block_device(sys, &name)
                .with_context(|| format!("reading {}/block/{name}", sys.display()))
        }
        TargetChoice::Auto | TargetChoice::Ask => match candidates {
            [only] => {
                if *choice == TargetChoice::Ask && !confirm(only) {
                    bail!("not confirmed; nothing was written");
                }
                Ok(only.clone())
            }
            [] => bail!("no disk to install onto was found"),
            _ => bail!(
                "{} disks found ({}): choose one with imgbuild.install=/dev/NAME on the kernel command line",
                candidates.len(),
                list()
            ),
        },
    }
}

/// The verified payload, ready to write.
#[derive(Debug)]
pub struct Payload {
    /// The `.zst` file (verified).
    pub zst: PathBuf,
    /// Decompressed size (from the zstd frame header).
    pub image_len: u64,
    /// Signed sha256 of the decompressed image.
    pub image_sha256: String,
    pub name: String,
}

/// Verifies a payload directory: signature with `key`, then the `.zst` hash.
pub fn verify_payload(dir: &Path, key_text: &str, pin: Option<&str>) -> Result<Payload> {
    let key = verify::parse_public_key(key_text)?;
    if let Some(pin) = pin {
        let actual = verify::key_fingerprint(&key);
        if actual != pin {
            return Err(verify::VerifyError::KeyNotPinned {
                actual,
                pinned: pin.to_owned(),
            }
            .into());
        }
    }
    let read = |n: &str| {
        let p = dir.join(n);
        fs::read(&p).with_context(|| format!("reading {}", p.display()))
    };
    let sums = Sums::verify(&read("SHA256SUMS")?, &read("SHA256SUMS.sig")?, &key)?;
    let zst_name = sums
        .names()
        .find(|n| n.ends_with(".raw.zst"))
        .ok_or_else(|| anyhow!("the signed SHA256SUMS lists no *.raw.zst disk image"))?
        .to_owned();
    let raw_name = zst_name.trim_end_matches(".zst").to_owned();
    let image_sha256 = sums.get(&raw_name)?.to_owned();
    let zst = dir.join(&zst_name);
    sums.check_file(&zst_name, &zst)?;
    let mut head = [0u8; 18];
    let n = fs::File::open(&zst)
        .and_then(|mut f| f.read(&mut head))
        .with_context(|| format!("reading {}", zst.display()))?;
    let image_len = zstd::zstd_safe::get_frame_content_size(&head[..n])
        .ok()
        .flatten()
        .ok_or_else(|| anyhow!("{zst_name}: the zstd frame does not record the image size"))?;
    Ok(Payload {
        zst,
        image_len,
        image_sha256,
        name: raw_name,
    })
}

/// Downloads the payload named by a signed SHA256SUMS at `url` into `dir`: the sums
/// file and signature first, verified, then only the `.zst` it lists.
pub fn fetch_payload(url: &str, dir: &Path, key_text: &str) -> Result<()> {
    let base = HttpUrl::parse(url)?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let fetch = |name: &str| -> Result<PathBuf> {
        let path = dir.join(name);
        let u = base.join(name);
        say(&format!("downloading {u}"));
        let mut f =
            fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        http::get(&u, &mut f)?;
        Ok(path)
    };
    let sums = fetch("SHA256SUMS")?;
    let sig = fetch("SHA256SUMS.sig")?;
    let key = verify::parse_public_key(key_text)?;
    let read = |p: &Path| fs::read(p).with_context(|| format!("reading {}", p.display()));
    let listing = Sums::verify(&read(&sums)?, &read(&sig)?, &key)?;
    let zst = listing
        .names()
        .find(|n| n.ends_with(".raw.zst"))
        .ok_or_else(|| anyhow!("the signed SHA256SUMS at {url} lists no *.raw.zst"))?
        .to_owned();
    if zst.contains('/') {
        bail!("{zst}: the payload name must be a plain file name");
    }
    fetch(&zst)?;
    Ok(())
}

/// Installs the verified payload onto `dev` after the refusal checks.
pub fn install(payload: &Payload, dev: &BlockDevice, mountinfo: &str) -> Result<()> {
    let mounts = target::parse_mountinfo(mountinfo);
    target::check_target(dev, &mounts, payload.image_len, false)?;
    install_with(payload, dev, false)
}

/// Writes the verified payload to `dev` (no refusal checks: the caller made them).
fn install_with(payload: &Payload, dev: &BlockDevice, skip_zeros: bool) -> Result<()> {
    let path = dev.dev_path();
    say(&format!(
        "writing {} ({} MiB) to {}",
        payload.name,
        payload.image_len / MIB,
        path.display()
    ));
    let src = fs::File::open(&payload.zst)
        .with_context(|| format!("opening {}", payload.zst.display()))?;
    let decoder = zstd::Decoder::new(src)
        .with_context(|| format!("starting to decompress {}", payload.zst.display()))?;
    let mut target = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {} for writing", path.display()))?;
    let total = payload.image_len;
    let started = Instant::now();
    let mut last = (Phase::Write, 0u64);
    let mut report = |phase: Phase, done: u64| {
        let pct = done * 100 / total.max(1);
        if phase != last.0 || pct >= last.1 + 10 || done == total {
            let what = match phase {
                Phase::Write => "written",
                Phase::ReadBack => "verified",
            };
            say(&format!(
                "{what} {} of {} MiB ({pct}%, {:.0}s)",
                done / MIB,
                total / MIB,
                started.elapsed().as_secs_f64()
            ));
            last = (phase, pct);
        }
    };
    write::write_image_with(
        decoder,
        &mut target,
        total,
        &payload.image_sha256,
        skip_zeros,
        &mut report,
    )
    .with_context(|| format!("writing {}", path.display()))?;
    say(&format!(
        "installed {} onto {} and read it back: sha256 {} matches the signature; var grows to the disk on first boot",
        payload.name,
        path.display(),
        payload.image_sha256
    ));
    Ok(())
}

fn run_tool(program: &str, args: &[&str]) -> Result<()> {
    let st = Command::new(program)
        .args(args)
        .status()
        .with_context(|| format!("starting {program}"))?;
    if !st.success() {
        bail!("{program} {} failed: {st}", args.join(" "));
    }
    Ok(())
}

/// Mounts the API filesystems and loads drivers through the initrd's own udev.
fn setup_system() -> Result<()> {
    use nix::mount::{mount, MsFlags};
    for (src, dir, fstype) in [
        ("proc", "/proc", "proc"),
        ("sysfs", "/sys", "sysfs"),
        ("devtmpfs", "/dev", "devtmpfs"),
        ("tmpfs", "/run", "tmpfs"),
    ] {
        fs::create_dir_all(dir).with_context(|| format!("creating {dir}"))?;
        if let Err(e) = mount(Some(src), dir, Some(fstype), MsFlags::empty(), None::<&str>) {
            if e != nix::errno::Errno::EBUSY {
                return Err(anyhow!("mounting {fstype} on {dir}: {e}"));
            }
        }
    }
    let udevd = "/usr/lib/systemd/systemd-udevd";
    let udev = Path::new(udevd).is_file();
    if udev {
        run_tool(udevd, &["--daemon", "--resolve-names=never"])?;
        run_tool(
            "/usr/bin/udevadm",
            &["trigger", "--type=subsystems", "--action=add"],
        )?;
        run_tool(
            "/usr/bin/udevadm",
            &["trigger", "--type=devices", "--action=add"],
        )?;
        run_tool("/usr/bin/udevadm", &["settle", "--timeout=60"])?;
    } else {
        say("no systemd-udevd in the initrd: relying on built-in drivers");
    }
    // After udev: the extra modules depend on ones udev loaded (virtio, virtio_ring).
    if load_extra_modules() && udev {
        run_tool("/usr/bin/udevadm", &["settle", "--timeout=60"])?;
    }
    Ok(())
}

/// Loads `MODULES_DIR/*.ko` in the order listed in `MODULES_DIR/order` (best effort:
/// a module that is built in or already loaded fails harmlessly). Returns whether there
/// was a list.
fn load_extra_modules() -> bool {
    let order = Path::new(MODULES_DIR).join("order");
    let Ok(text) = fs::read_to_string(&order) else {
        return false;
    };
    for name in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path = Path::new(MODULES_DIR).join(name);
        let res = fs::File::open(&path)
            .map_err(anyhow::Error::from)
            .and_then(|f| {
                nix::kmod::finit_module(&f, c"", nix::kmod::ModuleInitFlags::empty())
                    .map_err(anyhow::Error::from)
            });
        if let Err(e) = res {
            say(&format!("loading {}: {e} (continuing)", path.display()));
        }
    }
    true
}

/// DHCP on the first Ethernet interface with the initrd's klibc `ipconfig`.
fn setup_network() -> Result<()> {
    let mut ifaces: Vec<String> = fs::read_dir("/sys/class/net")
        .context("listing /sys/class/net")?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "lo")
        .collect();
    ifaces.sort();
    let Some(iface) = ifaces.first() else {
        bail!("no network interface: the NIC's driver is not in the initrd");
    };
    say(&format!("DHCP on {iface}"));
    run_tool(
        "/usr/bin/ipconfig",
        &["-t", "30", "-c", "dhcp", "-d", iface],
    )
}

fn ask_on_console(dev: &BlockDevice) -> bool {
    say(&format!(
        "install onto {} ({} MiB)? Everything on it is lost. Type yes and Enter:",
        dev.dev_path().display(),
        dev.size / MIB
    ));
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    line.trim() == "yes"
}

/// The whole installation, from an initramfs that already has `/proc` etc.
fn install_from_cmdline(opts: &Options) -> Result<()> {
    let key_text =
        fs::read_to_string(PUBKEY_PATH).with_context(|| format!("reading {PUBKEY_PATH}"))?;
    let payload_dir = match &opts.url {
        Some(url) => {
            setup_network()?;
            let dir = PathBuf::from("/run/imgbuild/payload");
            fetch_payload(url, &dir, &key_text)?;
            dir
        }
        None => PathBuf::from(PAYLOAD_DIR),
    };
    say("verifying the payload's signature and hash");
    let payload = verify_payload(&payload_dir, &key_text, opts.pubkey_sha256.as_deref())?;
    say(&format!(
        "signature good: {} ({} MiB, sha256 {})",
        payload.name,
        payload.image_len / MIB,
        payload.image_sha256
    ));
    if opts.diskless {
        return run_diskless(&payload);
    }
    let sys = Path::new("/sys");
    let candidates: Vec<BlockDevice> = target::list_disks(sys)
        .context("listing disks in /sys/block")?
        .into_iter()
        .filter(|d| !is_iso9660(&d.dev_path()))
        .collect();
    let dev = choose_target(&opts.target, sys, &candidates, &mut ask_on_console)?;
    let mountinfo =
        fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    install(&payload, &dev, &mountinfo).map_err(|e| match e.downcast_ref::<Refusal>() {
        Some(r) => anyhow!("{r}; nothing was written"),
        None => e,
    })
}

/// udev rules giving the diskless RAM disk's partitions their `by-partlabel` links.
pub const RAMDISK_RULES: &str = "\
# Written by imgbuild-install (diskless): 60-persistent-storage.rules skips ram* devices.
SUBSYSTEM==\"block\", KERNEL==\"ram0p[0-9]*\", IMPORT{builtin}=\"blkid\"
SUBSYSTEM==\"block\", KERNEL==\"ram0p[0-9]*\", ENV{ID_PART_ENTRY_NAME}==\"?*\", SYMLINK+=\"disk/by-partlabel/$env{ID_PART_ENTRY_NAME}\"
";
const RAMDISK_RULES_PATH: &str = "/run/udev/rules.d/61-imgbuild-ramdisk.rules";

/// Diskless: the verified disk image goes onto a RAM disk (`brd`, sized to the image,
/// zero blocks skipped so only used space takes memory), written and checked exactly
/// like a real disk; then slot A of that RAM disk becomes the root and the image's own
/// init starts. Its fstab finds `var` and the ESP on the RAM disk by partition label, so
/// no disk of the machine may carry another imgbuild installation (labels would clash).
/// Returns only on failure.
fn run_diskless(payload: &Payload) -> Result<()> {
    use nix::mount::{mount, MsFlags};
    use std::os::unix::process::CommandExt;
    // udev's persistent-storage rules skip RAM disks, so the image would never see
    // /dev/disk/by-partlabel/var. A rule in /run (which becomes the system's /run) adds
    // the partition-label links for the RAM disk, in the initrd and after switch-root.
    fs::create_dir_all("/run/udev/rules.d").context("creating /run/udev/rules.d")?;
    fs::write(RAMDISK_RULES_PATH, RAMDISK_RULES)
        .with_context(|| format!("writing {RAMDISK_RULES_PATH}"))?;
    run_tool("/usr/bin/udevadm", &["control", "--reload"])?;
    let kib = payload.image_len.div_ceil(1024);
    let params = std::ffi::CString::new(format!("rd_nr=1 rd_size={kib} max_part=15"))
        .context("brd parameters")?;
    let brd = fs::File::open(BRD_MODULE).with_context(|| format!("opening {BRD_MODULE}"))?;
    nix::kmod::finit_module(&brd, &params, nix::kmod::ModuleInitFlags::empty())
        .with_context(|| format!("loading {BRD_MODULE} with {params:?}"))?;
    run_tool("/usr/bin/udevadm", &["settle", "--timeout=60"])?;
    let ram = BlockDevice {
        name: "ram0".into(),
        dev: (0, 0),
        size: kib * 1024,
        removable: false,
        read_only: false,
        partitions: Vec::new(),
    };
    say(&format!(
        "diskless: writing the image to /dev/ram0 ({} MiB of RAM at most)",
        kib / 1024
    ));
    install_with(payload, &ram, true)?;
    run_tool(BLOCKDEV_PATH, &["--rereadpt", "/dev/ram0"])?;
    run_tool("/usr/bin/udevadm", &["settle", "--timeout=60"])?;
    let uevent = fs::read_to_string("/sys/class/block/ram0p2/uevent")
        .context("reading /sys/class/block/ram0p2/uevent: the RAM disk has no partition 2")?;
    if !uevent.lines().any(|l| l == "PARTNAME=root-a") {
        bail!("/dev/ram0p2 is not labelled root-a");
    }
    fs::create_dir_all("/root").context("creating /root")?;
    mount(
        Some("/dev/ram0p2"),
        "/root",
        Some("ext4"),
        MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .context("mounting /dev/ram0p2 (root-a) on /root")?;
    let _ = run_tool("/usr/bin/udevadm", &["control", "--exit"]);
    for dir in ["/dev", "/proc", "/sys", "/run"] {
        let to = format!("/root{dir}");
        mount(
            Some(dir),
            to.as_str(),
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        )
        .with_context(|| format!("moving {dir} to {to}"))?;
    }
    say("diskless: starting the image's init from /dev/ram0p2 (root-a)");
    let err = Command::new("/usr/bin/run-init")
        .args(["/root", "/sbin/init"])
        .exec();
    Err(anyhow!("starting /usr/bin/run-init: {err}"))
}

/// Entry point of `/imgbuild-install` as PID 1. Never returns.
pub fn main_pid1() -> ! {
    say("imgbuild live installer starting");
    let result = setup_system().and_then(|()| {
        let cmdline = fs::read_to_string("/proc/cmdline").context("reading /proc/cmdline")?;
        let opts = parse_cmdline(&cmdline);
        install_from_cmdline(&opts).map(|()| opts)
    });
    match result {
        Ok(opts) => {
            nix::unistd::sync();
            let how = if opts.poweroff {
                nix::sys::reboot::RebootMode::RB_POWER_OFF
            } else {
                nix::sys::reboot::RebootMode::RB_AUTOBOOT
            };
            say("done: rebooting into the installed system");
            let _ = nix::sys::reboot::reboot(how);
        }
        Err(e) => {
            say(&format!("ERROR: {e:#}"));
            say("installation stopped; the target's partition table was not written unless it verified");
            nix::unistd::sync();
        }
    }
    loop {
        if Path::new("/bin/sh").exists() {
            say("starting a rescue shell (/bin/sh); 'reboot -f' restarts the machine");
            let _ = Command::new("/bin/sh").status();
        }
        std::thread::sleep(Duration::from_secs(3600));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline() {
        let o = parse_cmdline(
            "console=ttyS0 rdinit=/imgbuild-install imgbuild.install=/dev/vda quiet\n",
        );
        assert_eq!(o.target, TargetChoice::Device("/dev/vda".into()));
        assert_eq!(o.url, None);
        assert!(parse_cmdline("imgbuild.diskless").diskless);
        let o = parse_cmdline("imgbuild.install=auto imgbuild.url=http://10.0.2.2:8000/p/ imgbuild.pubkey-sha256=AB imgbuild.noreboot");
        assert_eq!(o.target, TargetChoice::Auto);
        assert_eq!(o.url.as_deref(), Some("http://10.0.2.2:8000/p/"));
        assert_eq!(o.pubkey_sha256.as_deref(), Some("ab"));
        assert!(o.poweroff);
        assert_eq!(parse_cmdline("imgbuild.install=").target, TargetChoice::Ask);
    }

    fn dev(name: &str) -> BlockDevice {
        BlockDevice {
            name: name.into(),
            dev: (254, 0),
            size: 4 << 30,
            removable: false,
            read_only: false,
            partitions: vec![],
        }
    }

    #[test]
    fn choosing_a_target() {
        let sys = Path::new("/nonexistent-sys");
        let one = [dev("vda")];
        let two = [dev("vda"), dev("vdb")];
        let mut yes = |_: &BlockDevice| true;
        let mut no = |_: &BlockDevice| false;
        assert_eq!(
            choose_target(&TargetChoice::Auto, sys, &one, &mut no)
                .unwrap()
                .name,
            "vda"
        );
        assert_eq!(
            choose_target(&TargetChoice::Ask, sys, &one, &mut yes)
                .unwrap()
                .name,
            "vda"
        );
        let e = choose_target(&TargetChoice::Ask, sys, &one, &mut no).unwrap_err();
        assert!(e.to_string().contains("nothing was written"));
        let e = choose_target(&TargetChoice::Auto, sys, &two, &mut yes).unwrap_err();
        assert!(e.to_string().contains("imgbuild.install=/dev/NAME"), "{e}");
        assert!(choose_target(&TargetChoice::Auto, sys, &[], &mut yes).is_err());
        let e = choose_target(
            &TargetChoice::Device("/dev/sdz".into()),
            sys,
            &one,
            &mut yes,
        )
        .unwrap_err();
        assert!(e.to_string().contains("not a whole disk"), "{e}");
    }
}
