//! `imgbuild doctor`: is this host able to build and boot images?
//!
//! Owns the list of host tools the project runs, where each comes from in Debian, and
//! the report (a table, then one `apt-get install` line for what is missing). It must
//! never install or change anything on the host, and never run a tool except to ask
//! its version (bounded by a timeout).

use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

/// Check that every host tool imgbuild needs is installed, and print the one
/// `apt-get install` line that installs the missing ones.
///
/// Exits non-zero when anything is missing.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DoctorArgs {}

/// How a requirement is found on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// An executable in `PATH` (or `/usr/sbin`, `/sbin`, which non-root `PATH`s lack);
    /// `version_args` make it print its version.
    Program {
        version_args: &'static [&'static str],
    },
    /// A file at this absolute path.
    File(&'static str),
    /// A matching pair of OVMF code and vars files (see `imgqemu::OVMF_CANDIDATES`).
    Ovmf,
}

/// One thing the project needs from the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Requirement {
    /// Program or file name as shown in the table.
    pub name: &'static str,
    /// The Debian package that provides it.
    pub package: &'static str,
    /// What imgbuild uses it for.
    pub purpose: &'static str,
    pub probe: Probe,
}

const fn program(
    name: &'static str,
    package: &'static str,
    purpose: &'static str,
    version_args: &'static [&'static str],
) -> Requirement {
    Requirement {
        name,
        package,
        purpose,
        probe: Probe::Program { version_args },
    }
}

/// Everything imgbuild and its tests run on the host, in the order of the pipeline.
pub const REQUIREMENTS: &[Requirement] = &[
    program(
        "mmdebstrap",
        "mmdebstrap",
        "compose the root filesystem",
        &["--version"],
    ),
    program(
        "mkfs.ext4",
        "e2fsprogs",
        "write ext4 root and var filesystems",
        &["-V"],
    ),
    program(
        "debugfs",
        "e2fsprogs",
        "normalise ext4 timestamps, read installer payloads",
        &["-V"],
    ),
    program(
        "systemctl",
        "systemd",
        "enable units in the image (--root)",
        &["--version"],
    ),
    program(
        "dpkg-query",
        "dpkg",
        "list the image's packages",
        &["--version"],
    ),
    program(
        "sfdisk",
        "fdisk",
        "inspect partition tables",
        &["--version"],
    ),
    program("zstd", "zstd", "compress images and deltas", &["--version"]),
    program("xorriso", "xorriso", "write ISO images", &["-version"]),
    program(
        "strip",
        "binutils",
        "strip imgupdate's debug information ([update])",
        &["--version"],
    ),
    program(
        "qemu-img",
        "qemu-utils",
        "convert to qcow2, create disks",
        &["--version"],
    ),
    program(
        "qemu-system-x86_64",
        "qemu-system-x86",
        "boot images and test clusters",
        &["--version"],
    ),
    Requirement {
        name: "OVMF firmware",
        package: "ovmf",
        purpose: "UEFI firmware for QEMU",
        probe: Probe::Ovmf,
    },
    Requirement {
        name: "systemd-bootx64.efi",
        package: "systemd-boot-efi",
        purpose: "boot loader on the ESP",
        probe: Probe::File("/usr/lib/systemd/boot/efi/systemd-bootx64.efi"),
    },
    program(
        "etcd",
        "etcd-server",
        "etcd reboot-lock backend tests",
        &["--version"],
    ),
    program(
        "dbus-daemon",
        "dbus-daemon",
        "private bus for updater tests",
        &["--version"],
    ),
];

/// Directories searched after `PATH`: Debian puts e2fsprogs and fdisk tools in sbin,
/// which an ordinary user's `PATH` does not include.
const SBIN_DIRS: &[&str] = &["/usr/sbin", "/sbin"];

/// What the checks look at: a `PATH` value and the filesystem root (`/` on a real host).
#[derive(Debug, Clone)]
pub struct Host {
    pub path: OsString,
    pub root: PathBuf,
}

impl Host {
    /// This machine, with this process's `PATH`.
    pub fn current() -> Host {
        Host {
            path: std::env::var_os("PATH").unwrap_or_default(),
            root: PathBuf::from("/"),
        }
    }

    fn under(&self, abs: &str) -> PathBuf {
        self.root.join(abs.trim_start_matches('/'))
    }
}

/// The result of checking one requirement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub requirement: Requirement,
    /// Where it was found; `None` when missing.
    pub found: Option<PathBuf>,
    /// First line of its version output, when asked for and available.
    pub version: Option<String>,
}

impl Check {
    pub fn is_missing(&self) -> bool {
        self.found.is_none()
    }
}

/// Looks every requirement up on `host`. Reads the filesystem only; runs nothing.
pub fn check_host(host: &Host) -> Vec<Check> {
    REQUIREMENTS
        .iter()
        .map(|req| Check {
            requirement: *req,
            found: locate(req, host),
            version: None,
        })
        .collect()
}

fn locate(req: &Requirement, host: &Host) -> Option<PathBuf> {
    match req.probe {
        Probe::Program { .. } => imgqemu::find_in_path(req.name, &host.path).or_else(|| {
            let sbin = std::env::join_paths(SBIN_DIRS.iter().map(|d| host.under(d))).ok()?;
            imgqemu::find_in_path(req.name, &sbin)
        }),
        Probe::File(p) => Some(host.under(p)).filter(|p| p.is_file()),
        Probe::Ovmf => imgqemu::firmware_under(&host.root).ok().map(|o| o.code),
    }
}

/// The requirements among `names` (names of [`REQUIREMENTS`] rows) that `host` lacks,
/// in table order. `imgbuild build` checks the ones its recipe needs before any work.
pub fn missing(names: &[&str], host: &Host) -> Vec<Requirement> {
    debug_assert!(
        names
            .iter()
            .all(|n| REQUIREMENTS.iter().any(|r| r.name == *n)),
        "{names:?} names a requirement not in the table"
    );
    REQUIREMENTS
        .iter()
        .filter(|r| names.contains(&r.name) && locate(r, host).is_none())
        .copied()
        .collect()
}

/// The Debian packages providing the missing requirements, once each, in table order.
pub fn missing_packages(checks: &[Check]) -> Vec<&'static str> {
    let mut pkgs: Vec<&'static str> = Vec::new();
    for c in checks.iter().filter(|c| c.is_missing()) {
        if !pkgs.contains(&c.requirement.package) {
            pkgs.push(c.requirement.package);
        }
    }
    pkgs
}

/// `apt-get install -y ...` for what is missing, or `None` when nothing is.
pub fn apt_install_line(checks: &[Check]) -> Option<String> {
    let pkgs = missing_packages(checks);
    (!pkgs.is_empty()).then(|| format!("apt-get install -y {}", pkgs.join(" ")))
}

/// The report table: one row per requirement.
pub fn render_table(checks: &[Check]) -> String {
    let rows: Vec<[String; 4]> = checks
        .iter()
        .map(|c| {
            let status = if c.is_missing() { "MISSING" } else { "found" };
            let detail = match (&c.found, &c.version) {
                (Some(p), Some(v)) => format!("{} ({v})", p.display()),
                (Some(p), None) => p.display().to_string(),
                (None, _) => format!("needed to {}", c.requirement.purpose),
            };
            [
                c.requirement.name.to_owned(),
                status.to_owned(),
                c.requirement.package.to_owned(),
                detail,
            ]
        })
        .collect();
    let header = ["TOOL", "STATUS", "PACKAGE", "PATH / VERSION"].map(str::to_owned);
    let mut widths = [0usize; 3];
    for row in std::iter::once(&header).chain(&rows) {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        out.push_str(&format!(
            "{:<w0$}  {:<w1$}  {:<w2$}  {}\n",
            row[0],
            row[1],
            row[2],
            row[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
        ));
    }
    out
}

/// Runs `program args` and returns the first non-empty line it prints (stdout, else
/// stderr), killing it after `timeout`.
fn version_of(program: &Path, args: &[&str], timeout: Duration) -> Option<String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
    let mut text = String::new();
    for stream in [
        child.stdout.take().map(|s| Box::new(s) as Box<dyn Read>),
        child.stderr.take().map(|s| Box::new(s) as Box<dyn Read>),
    ]
    .into_iter()
    .flatten()
    {
        let mut s = stream;
        text.clear();
        // Version banners are a few lines: well under a pipe buffer, so reading after
        // exit cannot deadlock.
        if s.read_to_string(&mut text).is_ok() {
            if let Some(line) = text.lines().map(str::trim).find(|l| !l.is_empty()) {
                return Some(line.to_owned());
            }
        }
    }
    None
}

/// Checks this host, prints the table and the install line; fails when anything is missing.
pub fn doctor(_args: &DoctorArgs) -> Result<()> {
    let mut checks = check_host(&Host::current());
    for c in &mut checks {
        if let (Some(path), Probe::Program { version_args }) = (&c.found, c.requirement.probe) {
            c.version = version_of(path, version_args, Duration::from_secs(5));
        }
    }
    print!("{}", render_table(&checks));
    let kvm = if Path::new("/dev/kvm").exists() {
        "present, used only with --accel kvm or IMGBUILD_ACCEL=kvm"
    } else {
        "absent"
    };
    println!("\naccelerator: TCG by default; /dev/kvm {kvm}");
    match apt_install_line(&checks) {
        None => {
            println!("all host tools found");
            Ok(())
        }
        Some(line) => {
            println!("\nto install what is missing:\n  {line}");
            let missing: Vec<&str> = checks
                .iter()
                .filter(|c| c.is_missing())
                .map(|c| c.requirement.name)
                .collect();
            bail!("missing host tools: {}", missing.join(", "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    fn exe(dir: &Path, name: &str) {
        let p = dir.join(name);
        fs::create_dir_all(dir).expect("mkdir");
        fs::write(&p, "#!/bin/sh\necho \"$0 9.9\"\n").expect("write");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).expect("chmod");
    }

    fn file(root: &Path, abs: &str) {
        let p = root.join(abs.trim_start_matches('/'));
        fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        fs::write(p, b"x").expect("write");
    }

    /// A fake host: `PATH` is one temp dir, the root another.
    fn fake_host() -> (tempfile::TempDir, Host) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let bin = tmp.path().join("bin");
        fs::create_dir_all(&bin).expect("mkdir");
        let host = Host {
            path: bin.into_os_string(),
            root: tmp.path().join("root"),
        };
        (tmp, host)
    }

    #[test]
    fn empty_host_misses_everything_and_names_each_package_once() {
        let (_tmp, host) = fake_host();
        let checks = check_host(&host);
        assert_eq!(checks.len(), REQUIREMENTS.len());
        assert!(checks.iter().all(Check::is_missing));
        assert_eq!(
            apt_install_line(&checks).expect("something missing"),
            "apt-get install -y mmdebstrap e2fsprogs systemd dpkg fdisk zstd xorriso \
             binutils qemu-utils qemu-system-x86 ovmf systemd-boot-efi etcd-server dbus-daemon"
        );
    }

    #[test]
    fn found_tools_drop_out_of_the_install_line() {
        let (tmp, host) = fake_host();
        let bin = tmp.path().join("bin");
        for name in [
            "mmdebstrap",
            "zstd",
            "xorriso",
            "strip",
            "qemu-img",
            "qemu-system-x86_64",
            "systemctl",
            "dpkg-query",
        ] {
            exe(&bin, name);
        }
        // mkfs.ext4 only in sbin (not in PATH) still counts; debugfs is missing, so
        // e2fsprogs is still needed.
        exe(&host.root.join("usr/sbin"), "mkfs.ext4");
        exe(&host.root.join("sbin"), "sfdisk");
        file(&host.root, imgqemu::OVMF_CANDIDATES[0].0);
        file(&host.root, imgqemu::OVMF_CANDIDATES[0].1);
        file(&host.root, "/usr/lib/systemd/boot/efi/systemd-bootx64.efi");

        let checks = check_host(&host);
        let missing: Vec<&str> = checks
            .iter()
            .filter(|c| c.is_missing())
            .map(|c| c.requirement.name)
            .collect();
        assert_eq!(missing, ["debugfs", "etcd", "dbus-daemon"]);
        assert_eq!(
            apt_install_line(&checks).as_deref(),
            Some("apt-get install -y e2fsprogs etcd-server dbus-daemon")
        );
        let mkfs = checks
            .iter()
            .find(|c| c.requirement.name == "mkfs.ext4")
            .expect("row");
        assert_eq!(mkfs.found, Some(host.root.join("usr/sbin/mkfs.ext4")));
        // What a build checks: only the rows it names.
        let names: Vec<&str> = super::missing(&["mkfs.ext4", "debugfs", "zstd"], &host)
            .iter()
            .map(|r| r.name)
            .collect();
        assert_eq!(names, ["debugfs"]);
    }

    #[test]
    fn non_executable_files_in_path_do_not_count() {
        let (tmp, host) = fake_host();
        fs::write(tmp.path().join("bin/zstd"), b"not a program").expect("write");
        let checks = check_host(&host);
        let zstd = checks
            .iter()
            .find(|c| c.requirement.name == "zstd")
            .expect("row");
        assert!(zstd.is_missing());
    }

    #[test]
    fn nothing_missing_means_no_install_line() {
        let checks: Vec<Check> = REQUIREMENTS
            .iter()
            .map(|r| Check {
                requirement: *r,
                found: Some(PathBuf::from("/x")),
                version: None,
            })
            .collect();
        assert_eq!(apt_install_line(&checks), None);
        assert!(missing_packages(&checks).is_empty());
    }

    #[test]
    fn table_has_a_row_per_requirement_with_status_and_package() {
        let (_tmp, host) = fake_host();
        let mut checks = check_host(&host);
        checks[0].found = Some(PathBuf::from("/usr/bin/mmdebstrap"));
        checks[0].version = Some("mmdebstrap 1.3.5".into());
        let table = render_table(&checks);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), REQUIREMENTS.len() + 1);
        assert!(lines[0].starts_with("TOOL"));
        assert!(
            lines[1].contains("found")
                && lines[1].contains("/usr/bin/mmdebstrap (mmdebstrap 1.3.5)")
        );
        assert!(lines[2].contains("MISSING") && lines[2].contains("e2fsprogs"));
        // Columns line up: STATUS starts at the same offset on every line.
        let col = lines[0].find("STATUS").expect("header");
        assert!(lines[1..]
            .iter()
            .all(|l| matches!(&l[col..col + 5], "found" | "MISSI")));
    }

    #[test]
    fn version_is_the_first_output_line_and_hangs_are_cut_off() {
        let tmp = tempfile::tempdir().expect("tempdir");
        exe(tmp.path(), "tool");
        let v = version_of(&tmp.path().join("tool"), &[], Duration::from_secs(5)).expect("version");
        assert!(v.ends_with("tool 9.9"), "{v}");
        let started = Instant::now();
        let sleeper = Path::new("/bin/sleep");
        assert_eq!(
            version_of(sleeper, &["30"], Duration::from_millis(300)),
            None
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
