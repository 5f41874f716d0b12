//! What a VM is made of, and the QEMU command line that follows from it.
//!
//! Owns [`VmConfig`] and the pure function [`qemu_args`] that turns it into arguments.
//! It must never touch the filesystem, spawn anything or read the environment: detection
//! (disk formats, firmware, accelerator) happens in `vm` and `firmware`, so the command
//! line can be tested as data.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::firmware::Ovmf;

/// Prefix of every fw_cfg file we pass; the guest reads
/// `/sys/firmware/qemu_fw_cfg/by_name/opt/imgbuild/<name>/raw`.
pub const FW_CFG_PREFIX: &str = "opt/imgbuild/";

/// QEMU limits fw_cfg file names to 55 bytes (`FW_CFG_MAX_FILE_PATH` minus the NUL).
const FW_CFG_MAX_NAME: usize = 55;

/// Environment variable that picks the accelerator when [`Accel::Auto`] is asked for.
pub const ACCEL_ENV: &str = "IMGBUILD_ACCEL";

/// Disk image format as QEMU's `format=` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

impl DiskFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }

    /// Detects the format from the first bytes of an image: qcow2 starts with `QFI\xfb`,
    /// anything else is treated as raw.
    pub fn from_magic(head: &[u8]) -> DiskFormat {
        if head.starts_with(b"QFI\xfb") {
            DiskFormat::Qcow2
        } else {
            DiskFormat::Raw
        }
    }
}

/// A disk attached as a virtio-blk device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    pub path: PathBuf,
    /// `None`: detected from the image header when the VM starts.
    pub format: Option<DiskFormat>,
    /// Writes go to a temporary overlay that QEMU discards (`snapshot=on`).
    pub snapshot: bool,
}

impl Disk {
    /// A disk whose writes are discarded when the VM exits.
    pub fn snapshot(path: impl Into<PathBuf>) -> Disk {
        Disk {
            path: path.into(),
            format: None,
            snapshot: true,
        }
    }
}

/// Which accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Accel {
    /// `IMGBUILD_ACCEL` (`tcg` or `kvm`) if set, otherwise TCG. KVM is never guessed:
    /// nested KVM on CI hosts can hang the guest forever while `/dev/kvm` looks fine.
    #[default]
    Auto,
    /// Software emulation (`-accel tcg,tb-size=256`): slow, always works.
    Tcg,
    /// Hardware virtualisation: only when asked for explicitly.
    Kvm,
}

impl Accel {
    /// Resolves `Auto` from the value of `IMGBUILD_ACCEL` (passed in so this stays pure).
    pub fn resolve(self, env_value: Option<&str>) -> Result<Accel, ParseAccelError> {
        match self {
            Accel::Auto => match env_value.map(str::trim) {
                None | Some("") => Ok(Accel::Tcg),
                Some(v) => match v.parse()? {
                    Accel::Auto => Ok(Accel::Tcg),
                    other => Ok(other),
                },
            },
            other => Ok(other),
        }
    }
}

/// An accelerator name other than `auto`, `tcg` or `kvm`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("unknown accelerator {0:?}: expected auto, tcg or kvm")]
pub struct ParseAccelError(String);

impl FromStr for Accel {
    type Err = ParseAccelError;
    fn from_str(s: &str) -> Result<Accel, ParseAccelError> {
        match s {
            "auto" => Ok(Accel::Auto),
            "tcg" => Ok(Accel::Tcg),
            "kvm" => Ok(Accel::Kvm),
            other => Err(ParseAccelError(other.to_owned())),
        }
    }
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Auto => "auto",
            Accel::Tcg => "tcg",
            Accel::Kvm => "kvm",
        })
    }
}

/// A TCP port forward from `127.0.0.1:host` to the guest's `guest` port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortForward {
    pub host: u16,
    pub guest: u16,
}

/// A forward that is not `HOSTPORT:GUESTPORT` with both ports in 1..=65535.
#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid port forward {0:?}: expected HOSTPORT:GUESTPORT, both 1-65535")]
pub struct ParseForwardError(String);

impl FromStr for PortForward {
    type Err = ParseForwardError;
    fn from_str(s: &str) -> Result<PortForward, ParseForwardError> {
        let err = || ParseForwardError(s.to_owned());
        let (h, g) = s.split_once(':').ok_or_else(err)?;
        let host: u16 = h.parse().map_err(|_| err())?;
        let guest: u16 = g.parse().map_err(|_| err())?;
        if host == 0 || guest == 0 {
            return Err(err());
        }
        Ok(PortForward { host, guest })
    }
}

/// How the guest gets its first instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Firmware {
    /// OVMF from two pflash devices: the code read-only, and a private copy of the
    /// variable store template made in the VM's work directory when it starts.
    Uefi(Ovmf),
    /// QEMU loads a kernel (and initrd) itself: `-kernel`, `-initrd`, `-append`.
    DirectKernel {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        cmdline: String,
    },
}

/// User-mode (slirp) networking with a virtio NIC.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserNet {
    /// Host ports are bound to 127.0.0.1 only.
    pub forwards: Vec<PortForward>,
}

/// Everything needed to start one VM. Build it with [`VmConfig::uefi`] or
/// [`VmConfig::direct_kernel`], then set fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// Shows up in logs, the work directory name and `-name`.
    pub name: String,
    pub firmware: Firmware,
    /// The boot disk (first virtio disk, `bootindex=0`).
    pub disk: Option<PathBuf>,
    /// `None`: detected from the image header.
    pub disk_format: Option<DiskFormat>,
    /// Discard writes to the boot disk. Default true. This is the drive's `snapshot=on`
    /// rather than the global `-snapshot`, which would also cover the pflash vars copy
    /// and hide OVMF's variable writes from anyone inspecting it.
    pub snapshot: bool,
    pub extra_disks: Vec<Disk>,
    /// Guest memory in MiB. Default 1024.
    pub memory_mib: u32,
    /// Default 1: TCG here runs one vCPU per host thread and the host is shared.
    pub cpus: u32,
    pub accel: Accel,
    /// `None`: no network device at all.
    pub network: Option<UserNet>,
    /// Exit instead of rebooting (`-no-reboot`).
    pub no_reboot: bool,
    /// Where the serial console is written. `None`: `serial.log` in the work directory.
    pub serial_log: Option<PathBuf>,
    /// Also copy the serial console to this process's stdout as it arrives.
    pub echo_serial: bool,
    /// fw_cfg files `opt/imgbuild/<name>` with string contents, e.g. node identity.
    pub fw_cfg: Vec<(String, String)>,
    /// SMBIOS type 11 OEM strings (`systemd` reads `io.systemd.credential:` ones).
    pub oem_strings: Vec<String>,
    /// Parent of the per-VM work directory. `None`: the system temp directory.
    pub work_parent: Option<PathBuf>,
    /// Keep the work directory (vars copy, QMP socket, logs) after the VM is dropped.
    pub keep_work_dir: bool,
    /// A variable store that outlives the VM (a node restarted after a power cut keeps
    /// its boot entries): copied from the template when it does not exist yet, used as
    /// it is otherwise. `None`: a fresh copy in the work directory.
    pub vars_file: Option<PathBuf>,
    /// `None`: `qemu-system-x86_64` from `PATH`.
    pub qemu_binary: Option<PathBuf>,
    /// Appended verbatim after everything else, for what this struct does not model.
    pub extra_args: Vec<OsString>,
}

impl VmConfig {
    fn base(name: &str, firmware: Firmware) -> VmConfig {
        VmConfig {
            name: name.to_owned(),
            firmware,
            disk: None,
            disk_format: None,
            snapshot: true,
            extra_disks: Vec::new(),
            memory_mib: 1024,
            cpus: 1,
            accel: Accel::Auto,
            network: Some(UserNet::default()),
            no_reboot: false,
            serial_log: None,
            echo_serial: false,
            fw_cfg: Vec::new(),
            oem_strings: Vec::new(),
            work_parent: None,
            keep_work_dir: false,
            vars_file: None,
            qemu_binary: None,
            extra_args: Vec::new(),
        }
    }

    /// Boots `disk` through OVMF, with snapshot on and user networking.
    pub fn uefi(name: &str, ovmf: Ovmf, disk: impl Into<PathBuf>) -> VmConfig {
        VmConfig {
            disk: Some(disk.into()),
            ..VmConfig::base(name, Firmware::Uefi(ovmf))
        }
    }

    /// Boots a kernel directly, without a disk unless one is set afterwards.
    pub fn direct_kernel(
        name: &str,
        kernel: impl Into<PathBuf>,
        initrd: Option<PathBuf>,
        cmdline: &str,
    ) -> VmConfig {
        VmConfig::base(
            name,
            Firmware::DirectKernel {
                kernel: kernel.into(),
                initrd,
                cmdline: cmdline.to_owned(),
            },
        )
    }

    /// Checks what [`qemu_args`] cannot express or QEMU would reject late.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(ConfigError::Name(self.name.clone()));
        }
        if self.memory_mib < 64 {
            return Err(ConfigError::Memory(self.memory_mib));
        }
        if self.cpus == 0 {
            return Err(ConfigError::Cpus);
        }
        for (name, _) in &self.fw_cfg {
            let ok_chars = name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
            if name.is_empty()
                || !ok_chars
                || name.starts_with('/')
                || FW_CFG_PREFIX.len() + name.len() > FW_CFG_MAX_NAME
            {
                return Err(ConfigError::FwCfgName(name.clone()));
            }
        }
        if let Some(net) = &self.network {
            let mut seen = std::collections::BTreeSet::new();
            for f in &net.forwards {
                if !seen.insert(f.host) {
                    return Err(ConfigError::DuplicateForward(f.host));
                }
            }
        }
        Ok(())
    }
}

/// A [`VmConfig`] that QEMU would reject or misread.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConfigError {
    #[error("VM name {0:?} must be non-empty ASCII letters, digits, '-', '_' or '.'")]
    Name(String),
    #[error("{0} MiB of memory is too little to boot anything (minimum 64)")]
    Memory(u32),
    #[error("a VM needs at least one CPU")]
    Cpus,
    #[error("fw_cfg name {0:?}: use letters, digits, '-', '_', '.', '/', at most {max} bytes after {FW_CFG_PREFIX:?}", max = FW_CFG_MAX_NAME - FW_CFG_PREFIX.len())]
    FwCfgName(String),
    #[error("host port {0} is forwarded twice")]
    DuplicateForward(u16),
}

/// Paths inside a VM's work directory that appear on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkPaths {
    pub dir: PathBuf,
    /// The private, writable copy of the OVMF variable store.
    pub vars: PathBuf,
    pub qmp_socket: PathBuf,
}

impl WorkPaths {
    pub fn new(dir: &Path) -> WorkPaths {
        WorkPaths {
            dir: dir.to_owned(),
            vars: dir.join("OVMF_VARS.fd"),
            qmp_socket: dir.join("qmp.sock"),
        }
    }
}

/// QEMU's option syntax splits on commas; a literal comma is written twice.
fn escape(value: &OsStr) -> OsString {
    let mut out = Vec::with_capacity(value.len());
    for &b in value.as_bytes() {
        out.push(b);
        if b == b',' {
            out.push(b',');
        }
    }
    OsString::from_vec(out)
}

/// `prefix` followed by an escaped value, e.g. `file=` + a path with commas.
fn opt(prefix: &str, value: impl AsRef<OsStr>) -> OsString {
    let mut s = OsString::from(prefix);
    s.push(escape(value.as_ref()));
    s
}

fn drive(id: &str, path: &Path, format: Option<DiskFormat>, snapshot: bool) -> OsString {
    let mut s = opt("file=", path);
    s.push(",if=none,id=");
    s.push(id);
    if let Some(f) = format {
        s.push(",format=");
        s.push(f.as_str());
    }
    if snapshot {
        s.push(",snapshot=on");
    }
    s
}

/// The QEMU arguments (without the program name) for `cfg`, with `accel` already
/// resolved and the work directory's paths in `work`. Pure: no I/O, no environment.
///
/// The serial console is QEMU's stdio (`-chardev stdio`), so the caller must pipe
/// stdin and stdout; the QMP socket is created by QEMU in the work directory.
pub fn qemu_args(cfg: &VmConfig, accel: Accel, work: &WorkPaths) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |items: &[&dyn AsRef<OsStr>]| {
        for i in items {
            a.push(i.as_ref().to_owned());
        }
    };
    push(&[&"-name", &opt("", &cfg.name)]);
    // -nodefaults: no default NIC, VGA, CD-ROM, monitor or serial; everything is explicit.
    push(&[&"-nodefaults", &"-display", &"none", &"-machine", &"q35"]);
    let accel_arg = match accel {
        Accel::Kvm => "kvm",
        // Auto is resolved by the caller; if it reaches here, the safe choice is TCG.
        Accel::Tcg | Accel::Auto => "tcg,tb-size=256",
    };
    push(&[&"-accel", &accel_arg]);
    if accel == Accel::Kvm {
        push(&[&"-cpu", &"host"]);
    }
    push(&[
        &"-smp",
        &cfg.cpus.to_string(),
        &"-m",
        &cfg.memory_mib.to_string(),
    ]);
    match &cfg.firmware {
        Firmware::Uefi(ovmf) => {
            push(&[
                &"-drive",
                &opt("if=pflash,format=raw,unit=0,readonly=on,file=", &ovmf.code),
            ]);
            push(&[
                &"-drive",
                &opt("if=pflash,format=raw,unit=1,file=", &work.vars),
            ]);
        }
        Firmware::DirectKernel {
            kernel,
            initrd,
            cmdline,
        } => {
            // -kernel/-initrd/-append take a plain string, not an option list: no escaping.
            push(&[&"-kernel", kernel]);
            if let Some(initrd) = initrd {
                push(&[&"-initrd", initrd]);
            }
            push(&[&"-append", cmdline]);
        }
    }
    if let Some(disk) = &cfg.disk {
        push(&[
            &"-drive",
            &drive("disk0", disk, cfg.disk_format, cfg.snapshot),
        ]);
        push(&[&"-device", &"virtio-blk-pci,drive=disk0,bootindex=0"]);
    }
    for (i, d) in cfg.extra_disks.iter().enumerate() {
        let id = format!("disk{}", i + 1);
        push(&[&"-drive", &drive(&id, &d.path, d.format, d.snapshot)]);
        push(&[&"-device", &format!("virtio-blk-pci,drive={id}")]);
    }
    if let Some(net) = &cfg.network {
        let mut netdev = String::from("user,id=net0");
        for f in &net.forwards {
            netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{}-:{}", f.host, f.guest));
        }
        push(&[&"-netdev", &netdev]);
        push(&[&"-device", &"virtio-net-pci,netdev=net0"]);
    }
    // Entropy for the guest: without it, early boot under TCG can stall on getrandom().
    push(&[&"-device", &"virtio-rng-pci"]);
    push(&[
        &"-chardev",
        &"stdio,id=serial0,signal=off",
        &"-serial",
        &"chardev:serial0",
    ]);
    let mut qmp = opt("unix:", &work.qmp_socket);
    qmp.push(",server=on,wait=off");
    push(&[&"-qmp", &qmp]);
    for (name, value) in &cfg.fw_cfg {
        let mut s = opt("name=", format!("{FW_CFG_PREFIX}{name}"));
        s.push(opt(",string=", value));
        push(&[&"-fw_cfg", &s]);
    }
    if !cfg.oem_strings.is_empty() {
        let mut s = OsString::from("type=11");
        for v in &cfg.oem_strings {
            s.push(opt(",value=", v));
        }
        push(&[&"-smbios", &s]);
    }
    if cfg.no_reboot {
        push(&[&"-no-reboot"]);
    }
    for e in &cfg.extra_args {
        push(&[e]);
    }
    a
}

/// Renders a command line for humans (logs, error messages). Never executed.
pub fn display_command(program: &Path, args: &[OsString]) -> String {
    let mut out = program.display().to_string();
    for a in args {
        let s = a.to_string_lossy();
        out.push(' ');
        if s.is_empty() || s.contains(|c: char| c.is_whitespace() || "'\"\\$`".contains(c)) {
            out.push_str(&format!("{s:?}"));
        } else {
            out.push_str(&s);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ovmf() -> Ovmf {
        Ovmf {
            code: PathBuf::from("/fw/CODE.fd"),
            vars_template: PathBuf::from("/fw/VARS.fd"),
        }
    }

    fn args_of(cfg: &VmConfig) -> Vec<String> {
        let work = WorkPaths::new(Path::new("/w"));
        qemu_args(cfg, cfg.accel.resolve(None).expect("accel"), &work)
            .into_iter()
            .map(|s| s.into_string().expect("utf-8"))
            .collect()
    }

    /// The value following the first occurrence of `flag`.
    fn value_after<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn uefi_uses_readonly_code_and_private_vars_copy() {
        let cfg = VmConfig::uefi("node1", ovmf(), "/img/disk.raw");
        let args = args_of(&cfg);
        let drives = value_after(&args, "-drive");
        assert_eq!(
            drives[0],
            "if=pflash,format=raw,unit=0,readonly=on,file=/fw/CODE.fd"
        );
        assert_eq!(
            drives[1],
            "if=pflash,format=raw,unit=1,file=/w/OVMF_VARS.fd"
        );
        assert!(
            !args.iter().any(|a| a.contains("/fw/VARS.fd")),
            "the system vars template must never reach QEMU: {args:?}"
        );
        assert_eq!(drives[2], "file=/img/disk.raw,if=none,id=disk0,snapshot=on");
        assert!(args.contains(&"virtio-blk-pci,drive=disk0,bootindex=0".to_owned()));
    }

    #[test]
    fn defaults_are_q35_tcg_one_cpu_1024_mib_and_serial_on_stdio() {
        let cfg = VmConfig::uefi("n", ovmf(), "/d");
        let args = args_of(&cfg);
        assert_eq!(value_after(&args, "-machine"), ["q35"]);
        assert_eq!(value_after(&args, "-accel"), ["tcg,tb-size=256"]);
        assert_eq!(value_after(&args, "-smp"), ["1"]);
        assert_eq!(value_after(&args, "-m"), ["1024"]);
        assert_eq!(value_after(&args, "-display"), ["none"]);
        assert_eq!(value_after(&args, "-serial"), ["chardev:serial0"]);
        assert_eq!(
            value_after(&args, "-chardev"),
            ["stdio,id=serial0,signal=off"]
        );
        assert_eq!(
            value_after(&args, "-qmp"),
            ["unix:/w/qmp.sock,server=on,wait=off"]
        );
        assert!(args.contains(&"-nodefaults".to_owned()));
        assert!(!args.contains(&"-no-reboot".to_owned()));
        assert!(!args.contains(&"-cpu".to_owned()));
    }

    #[test]
    fn kvm_only_when_asked_for() {
        let mut cfg = VmConfig::uefi("n", ovmf(), "/d");
        cfg.accel = Accel::Kvm;
        let args = args_of(&cfg);
        assert_eq!(value_after(&args, "-accel"), ["kvm"]);
        assert_eq!(value_after(&args, "-cpu"), ["host"]);
    }

    #[test]
    fn auto_accel_resolves_from_env_value_and_defaults_to_tcg() {
        assert_eq!(Accel::Auto.resolve(None).expect("ok"), Accel::Tcg);
        assert_eq!(Accel::Auto.resolve(Some("")).expect("ok"), Accel::Tcg);
        assert_eq!(Accel::Auto.resolve(Some("kvm")).expect("ok"), Accel::Kvm);
        assert_eq!(Accel::Auto.resolve(Some("auto")).expect("ok"), Accel::Tcg);
        assert_eq!(Accel::Tcg.resolve(Some("kvm")).expect("ok"), Accel::Tcg);
        assert!(Accel::Auto.resolve(Some("hvf")).is_err());
    }

    #[test]
    fn direct_kernel_and_no_disk() {
        let mut cfg = VmConfig::direct_kernel(
            "k",
            "/boot/vmlinuz",
            Some(PathBuf::from("/boot/initrd.img")),
            "console=ttyS0 panic=-1",
        );
        cfg.no_reboot = true;
        cfg.network = None;
        let args = args_of(&cfg);
        assert_eq!(value_after(&args, "-kernel"), ["/boot/vmlinuz"]);
        assert_eq!(value_after(&args, "-initrd"), ["/boot/initrd.img"]);
        assert_eq!(value_after(&args, "-append"), ["console=ttyS0 panic=-1"]);
        assert!(value_after(&args, "-drive").is_empty());
        assert!(value_after(&args, "-netdev").is_empty());
        assert!(args.contains(&"-no-reboot".to_owned()));
    }

    #[test]
    fn forwards_bind_loopback_only() {
        let mut cfg = VmConfig::uefi("n", ovmf(), "/d");
        cfg.network = Some(UserNet {
            forwards: vec![
                "2222:22".parse().expect("fwd"),
                "6443:6443".parse().expect("fwd"),
            ],
        });
        let args = args_of(&cfg);
        assert_eq!(
            value_after(&args, "-netdev"),
            ["user,id=net0,hostfwd=tcp:127.0.0.1:2222-:22,hostfwd=tcp:127.0.0.1:6443-:6443"]
        );
        assert_eq!(
            value_after(&args, "-device")[1],
            "virtio-net-pci,netdev=net0"
        );
    }

    #[test]
    fn forward_parsing_rejects_garbage() {
        assert_eq!(
            "8080:80".parse::<PortForward>().expect("ok"),
            PortForward {
                host: 8080,
                guest: 80
            }
        );
        for bad in ["80", "0:80", "80:0", "a:b", "70000:1", ":", "1:2:3"] {
            assert!(bad.parse::<PortForward>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn commas_in_paths_and_strings_are_doubled() {
        let mut cfg = VmConfig::uefi("n", ovmf(), "/img/a,b.qcow2");
        cfg.disk_format = Some(DiskFormat::Qcow2);
        cfg.snapshot = false;
        cfg.fw_cfg = vec![("node/name".into(), "worker-1,zone=a".into())];
        cfg.oem_strings = vec![
            "io.imgbuild.node=worker-1".into(),
            "io.systemd.credential:x=a,b".into(),
        ];
        let args = args_of(&cfg);
        assert_eq!(
            value_after(&args, "-drive")[2],
            "file=/img/a,,b.qcow2,if=none,id=disk0,format=qcow2"
        );
        assert_eq!(
            value_after(&args, "-fw_cfg"),
            ["name=opt/imgbuild/node/name,string=worker-1,,zone=a"]
        );
        assert_eq!(
            value_after(&args, "-smbios"),
            ["type=11,value=io.imgbuild.node=worker-1,value=io.systemd.credential:x=a,,b"]
        );
    }

    #[test]
    fn extra_disks_get_their_own_ids() {
        let mut cfg = VmConfig::uefi("n", ovmf(), "/d");
        cfg.extra_disks = vec![
            Disk::snapshot("/e1"),
            Disk {
                path: "/e2".into(),
                format: Some(DiskFormat::Raw),
                snapshot: false,
            },
        ];
        let args = args_of(&cfg);
        let drives = value_after(&args, "-drive");
        assert_eq!(drives[3], "file=/e1,if=none,id=disk1,snapshot=on");
        assert_eq!(drives[4], "file=/e2,if=none,id=disk2,format=raw");
        let devices = value_after(&args, "-device");
        assert!(devices.contains(&"virtio-blk-pci,drive=disk2"));
    }

    #[test]
    fn validate_rejects_bad_names_and_fw_cfg_keys() {
        let mut cfg = VmConfig::uefi("ok-name_1", ovmf(), "/d");
        assert!(cfg.validate().is_ok());
        cfg.name = "bad name".into();
        assert!(matches!(cfg.validate(), Err(ConfigError::Name(_))));
        cfg.name = "n".into();
        cfg.fw_cfg = vec![("/abs".into(), String::new())];
        assert!(matches!(cfg.validate(), Err(ConfigError::FwCfgName(_))));
        cfg.fw_cfg = vec![("x".repeat(43), String::new())];
        assert!(matches!(cfg.validate(), Err(ConfigError::FwCfgName(_))));
        cfg.fw_cfg = vec![("x".repeat(42), String::new())];
        assert!(cfg.validate().is_ok());
        cfg.network = Some(UserNet {
            forwards: vec![
                PortForward { host: 1, guest: 2 },
                PortForward { host: 1, guest: 3 },
            ],
        });
        assert!(matches!(
            cfg.validate(),
            Err(ConfigError::DuplicateForward(1))
        ));
    }

    #[test]
    fn format_magic() {
        assert_eq!(
            DiskFormat::from_magic(b"QFI\xfb\0\0\0\x03"),
            DiskFormat::Qcow2
        );
        assert_eq!(DiskFormat::from_magic(&[0u8; 512]), DiskFormat::Raw);
        assert_eq!(DiskFormat::from_magic(b""), DiskFormat::Raw);
    }

    #[test]
    fn display_quotes_only_what_needs_it() {
        let s = display_command(
            Path::new("qemu"),
            &["-append".into(), "console=ttyS0 quiet".into(), "-m".into()],
        );
        assert_eq!(s, "qemu -append \"console=ttyS0 quiet\" -m");
    }
}
