//! The compose step: a Debian root filesystem tree made by mmdebstrap and configured as an
//! imgbuild image (os-release, empty machine-id, fstab with /var on its own partition,
//! read-only root, serial console, recipe files and units, the small initrd).
//!
//! It owns the tree under the work directory and nothing else: it never writes outside
//! the tree (paths in the image are resolved as a chroot would, so a symlink in the image
//! cannot send a write to the host) and never passes recipe strings through a shell.

use std::ffi::OsString;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};

use crate::artifacts::{self, FetchOptions};
use crate::progress::{run_capture, run_logged, Step};
use crate::recipe::{FileContent, InitrdMode, Recipe};

/// Where mmdebstrap's downloaded packages are kept between builds.
pub const DEFAULT_CACHE_DIR: &str = "/var/cache/imgbuild/apt";

/// What the compose step produced.
#[derive(Debug, Clone)]
pub struct Composed {
    /// The root filesystem tree.
    pub root: PathBuf,
    /// Kernel version, e.g. `6.1.0-28-amd64`.
    pub kernel_version: String,
    /// `/boot/vmlinuz-*` inside the tree.
    pub kernel: PathBuf,
    /// `/boot/initrd.img-*` inside the tree.
    pub initrd: PathBuf,
}

/// Settings of the compose step that do not come from the recipe.
#[derive(Debug, Clone)]
pub struct ComposeOptions {
    pub cache_dir: PathBuf,
    /// Where pinned artifacts come from (cache, `--mirror`).
    pub artifacts: FetchOptions,
    pub epoch: i64,
    pub log: PathBuf,
}

/// Build the tree at `root` (which must not exist yet).
pub fn compose(
    recipe: &Recipe,
    root: &Path,
    opts: &ComposeOptions,
    step: &Step,
) -> Result<Composed> {
    for p in [root, opts.cache_dir.as_path()] {
        // mmdebstrap's special hooks split their arguments on white space.
        if p.to_string_lossy().chars().any(char::is_whitespace) {
            bail!("{} contains white space, which mmdebstrap hooks cannot take; choose another directory", p.display());
        }
    }
    if root.exists() {
        bail!(
            "{} exists already; refusing to compose into it",
            root.display()
        );
    }
    fs::create_dir_all(&opts.cache_dir)
        .with_context(|| format!("creating package cache {}", opts.cache_dir.display()))?;
    let _lock = CacheLock::take(&opts.cache_dir)?;

    // Pinned artifacts first: a wrong digest stops the build before mmdebstrap runs.
    let fetched = artifacts::fetch_all(recipe, &opts.artifacts, &|m| step.message(m))?;
    // The node updater's program and root are found before mmdebstrap runs, too.
    let agent = match &recipe.update {
        Some(section) => Some(
            crate::agent::prepare(section)
                .with_context(|| format!("[update] in {}", recipe.path.display()))?,
        ),
        None => None,
    };

    let early = root.with_extension("early");
    if early.exists() {
        fs::remove_dir_all(&early).with_context(|| format!("removing {}", early.display()))?;
    }
    write_early_files(recipe, &early)?;

    let mirrors = if recipe.base.mirrors.is_empty() {
        let found = host_mirrors(Path::new("/etc/apt"), &recipe.base.suite)?;
        if found.is_empty() {
            bail!(
                "base.mirrors is not set and /etc/apt has no sources for suite {:?}; set base.mirrors in {}",
                recipe.base.suite,
                recipe.path.display()
            );
        }
        found
    } else {
        recipe.base.mirrors.clone()
    };
    step.message(&format!(
        "mmdebstrap {} ({} packages)",
        recipe.base.suite,
        recipe.base.packages.len()
    ));
    let args = mmdebstrap_args(recipe, &mirrors, root, &opts.cache_dir, &early);
    run_logged(
        Command::new("mmdebstrap")
            .args(&args)
            .env("SOURCE_DATE_EPOCH", opts.epoch.to_string())
            .env("LC_ALL", "C.UTF-8"),
        &opts.log,
        step,
    )
    .context("composing the root filesystem with mmdebstrap")?;
    fs::remove_dir_all(&early).with_context(|| format!("removing {}", early.display()))?;

    step.message("configuring the image");
    configure(recipe, agent.as_ref(), root, &opts.log)?;
    artifacts::install(root, &fetched)
        .with_context(|| format!("installing artifacts of {}", recipe.path.display()))?;
    let composed = find_kernel(root)?;
    Ok(composed)
}

/// The mmdebstrap command line (without the program name). Pure, so it is tested.
pub fn mmdebstrap_args(
    recipe: &Recipe,
    mirrors: &[String],
    root: &Path,
    cache: &Path,
    early: &Path,
) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |s: String| a.push(OsString::from(s));
    push("--variant=minbase".into());
    push("--format=directory".into());
    push(format!(
        "--architectures={}",
        recipe.image.architecture.debian()
    ));
    push(format!("--components={}", recipe.base.components.join(",")));
    push(format!("--include={}", recipe.base.packages.join(",")));
    push(format!(
        "--aptopt=APT::Install-Recommends \"{}\"",
        if recipe.base.recommends {
            "true"
        } else {
            "false"
        }
    ));
    if !recipe.base.docs {
        for opt in [
            "path-exclude=/usr/share/man/*",
            "path-exclude=/usr/share/info/*",
            "path-exclude=/usr/share/doc/*",
            "path-include=/usr/share/doc/*/copyright",
            "path-exclude=/usr/share/locale/*",
            "path-include=/usr/share/locale/locale.alias",
        ] {
            push(format!("--dpkgopt={opt}"));
        }
    }
    // The package cache: fill the chroot's archive dir from it, skip emptying it, copy
    // new downloads back out (mmdebstrap(1), "EXAMPLES").
    push("--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives/".into());
    push(format!(
        "--setup-hook=sync-in {} /var/cache/apt/archives/",
        cache.display()
    ));
    push("--skip=download/empty".into());
    // Configuration the kernel's postinst must already see (the initrd is made once).
    push(format!("--essential-hook=sync-in {} /", early.display()));
    push(format!(
        "--customize-hook=sync-out /var/cache/apt/archives {}",
        cache.display()
    ));
    push(recipe.base.suite.clone());
    a.push(root.as_os_str().to_owned());
    for m in mirrors {
        a.push(OsString::from(m));
    }
    a
}

/// Files that must exist before packages are installed: the initrd configuration.
fn write_early_files(recipe: &Recipe, early: &Path) -> Result<()> {
    let conf_dir = early.join("etc/initramfs-tools/conf.d");
    fs::create_dir_all(&conf_dir).with_context(|| format!("creating {}", conf_dir.display()))?;
    let modules = match recipe.kernel.initrd {
        InitrdMode::Small => "list",
        InitrdMode::Full => "most",
    };
    write_file(
        &conf_dir.join("imgbuild.conf"),
        format!(
            "# Written by imgbuild from {}.\nMODULES={modules}\nCOMPRESS=zstd\n",
            recipe.path.display()
        )
        .as_bytes(),
        0o644,
    )?;
    let mod_dir = early.join("usr/share/initramfs-tools/modules.d");
    fs::create_dir_all(&mod_dir).with_context(|| format!("creating {}", mod_dir.display()))?;
    let mut list = String::from("# Written by imgbuild: modules the small initrd carries.\n");
    for m in &recipe.kernel.initrd_modules {
        list.push_str(m);
        list.push('\n');
    }
    write_file(&mod_dir.join("imgbuild"), list.as_bytes(), 0o644)
}

/// Apt sources of the host for `suite` and its `-updates`/`-security` companions, as
/// one-line entries mmdebstrap takes as mirrors.
pub fn host_mirrors(apt_dir: &Path, suite: &str) -> Result<Vec<String>> {
    let mut entries = Vec::new();
    let list = apt_dir.join("sources.list");
    if list.exists() {
        let text =
            fs::read_to_string(&list).with_context(|| format!("reading {}", list.display()))?;
        entries.extend(parse_one_line_sources(&text));
    }
    let dir = apt_dir.join("sources.list.d");
    if dir.is_dir() {
        let mut names: Vec<PathBuf> = fs::read_dir(&dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        names.sort();
        for p in names {
            let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
            if ext != "list" && ext != "sources" {
                continue;
            }
            let text =
                fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
            if ext == "list" {
                entries.extend(parse_one_line_sources(&text));
            } else {
                entries.extend(parse_deb822_sources(&text));
            }
        }
    }
    let wanted = [
        suite.to_string(),
        format!("{suite}-updates"),
        format!("{suite}-security"),
    ];
    let mut out: Vec<String> = Vec::new();
    for e in entries {
        if wanted.contains(&e.suite) {
            let line = format!("deb {} {} {}", e.uri, e.suite, e.components.join(" "));
            if !out.contains(&line) {
                out.push(line);
            }
        }
    }
    Ok(out)
}

/// One `deb` source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AptSource {
    pub uri: String,
    pub suite: String,
    pub components: Vec<String>,
}

/// `deb [opts] URI SUITE COMPONENT...` lines; `deb-src` and comments are skipped.
pub fn parse_one_line_sources(text: &str) -> Vec<AptSource> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let Some(rest) = line.strip_prefix("deb ") else {
            continue;
        };
        let mut rest = rest.trim();
        if rest.starts_with('[') {
            match rest.find(']') {
                Some(end) => rest = rest[end + 1..].trim(),
                None => continue,
            }
        }
        let words: Vec<&str> = rest.split_whitespace().collect();
        if words.len() >= 3 {
            out.push(AptSource {
                uri: words[0].to_string(),
                suite: words[1].to_string(),
                components: words[2..].iter().map(|s| s.to_string()).collect(),
            });
        }
    }
    out
}

/// deb822 `.sources` stanzas (sources.list(5)); disabled stanzas and `deb-src` are skipped.
pub fn parse_deb822_sources(text: &str) -> Vec<AptSource> {
    let mut out = Vec::new();
    for stanza in text.split("\n\n") {
        let mut fields: Vec<(String, String)> = Vec::new();
        for line in stanza.lines() {
            if line.starts_with('#') {
                continue;
            }
            if line.starts_with(' ') || line.starts_with('\t') {
                if let Some(last) = fields.last_mut() {
                    last.1.push(' ');
                    last.1.push_str(line.trim());
                }
            } else if let Some((k, v)) = line.split_once(':') {
                fields.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        let get = |k: &str| {
            fields
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        if get("enabled").is_some_and(|v| v.eq_ignore_ascii_case("no")) {
            continue;
        }
        if !get("types")
            .unwrap_or("")
            .split_whitespace()
            .any(|t| t == "deb")
        {
            continue;
        }
        let components: Vec<String> = get("components")
            .unwrap_or("")
            .split_whitespace()
            .map(String::from)
            .collect();
        for uri in get("uris").unwrap_or("").split_whitespace() {
            for suite in get("suites").unwrap_or("").split_whitespace() {
                out.push(AptSource {
                    uri: uri.to_string(),
                    suite: suite.to_string(),
                    components: components.clone(),
                });
            }
        }
    }
    out
}

/// Resolve an absolute image path inside `root` the way a chroot would: symlinks in the
/// image are followed relative to `root`, never to the host. The last component is not
/// followed when `follow_last` is false. Errors if resolution leaves the tree's control
/// (too many links).
pub fn resolve_in_root(root: &Path, path: &str, follow_last: bool) -> Result<PathBuf> {
    let mut parts: Vec<String> = Vec::new();
    let mut pending: Vec<String> = path
        .split('/')
        .filter(|p| !p.is_empty())
        .rev()
        .map(String::from)
        .collect();
    let mut links = 0;
    while let Some(part) = pending.pop() {
        match part.as_str() {
            "." => continue,
            ".." => {
                parts.pop();
                continue;
            }
            _ => {}
        }
        let candidate: PathBuf = parts
            .iter()
            .fold(root.to_path_buf(), |p, c| p.join(c))
            .join(&part);
        let is_last = pending.is_empty();
        let meta = fs::symlink_metadata(&candidate);
        if let Ok(m) = meta {
            if m.file_type().is_symlink() && (follow_last || !is_last) {
                links += 1;
                if links > 40 {
                    bail!("{path}: too many levels of symbolic links in the image");
                }
                let target = fs::read_link(&candidate)
                    .with_context(|| format!("reading link {}", candidate.display()))?;
                if target.is_absolute() {
                    parts.clear();
                }
                for c in target.components().rev() {
                    match c {
                        Component::Normal(s) => pending.push(s.to_string_lossy().into_owned()),
                        Component::ParentDir => pending.push("..".into()),
                        Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
                    }
                }
                continue;
            }
        }
        parts.push(part);
    }
    Ok(parts.iter().fold(root.to_path_buf(), |p, c| p.join(c)))
}

/// Write `data` to the image path `path` (chroot-resolved), creating parent directories.
pub fn write_image_file(root: &Path, path: &str, data: &[u8], mode: u32) -> Result<PathBuf> {
    let target = resolve_in_root(root, path, false)?;
    if let Ok(m) = fs::symlink_metadata(&target) {
        if m.file_type().is_symlink() || m.is_file() {
            fs::remove_file(&target).with_context(|| format!("replacing {}", target.display()))?;
        } else if m.is_dir() {
            bail!("{path} is a directory in the image; cannot write a file there");
        }
    }
    let parent = target
        .parent()
        .ok_or_else(|| anyhow!("{path} has no parent"))?;
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    write_file(&target, data, mode)?;
    Ok(target)
}

fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    let mut f = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(data)
        .with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting mode of {}", path.display()))
}

/// os-release with the image's identity: Debian's fields, our name, IMAGE_ID, IMAGE_VERSION.
pub fn render_os_release(debian: &str, recipe: &Recipe) -> String {
    let mut out = String::new();
    for line in debian.lines() {
        let key = line.split('=').next().unwrap_or("");
        if matches!(
            key,
            "PRETTY_NAME" | "IMAGE_ID" | "IMAGE_VERSION" | "VARIANT_ID"
        ) {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out.push_str(&format!("PRETTY_NAME=\"{}\"\n", recipe.image.pretty_name));
    out.push_str("VARIANT_ID=imgbuild\n");
    out.push_str(&format!("IMAGE_ID={}\n", recipe.image.name));
    out.push_str(&format!("IMAGE_VERSION={}\n", recipe.image.version));
    out
}

/// The image's fstab: root stays as the kernel mounted it (read-only, chosen by slot),
/// /var from its own partition, the ESP on demand at /efi (for systemd-bless-boot and
/// the updater), /tmp in memory.
pub const FSTAB: &str = "\
# Written by imgbuild. / is mounted read-only by the kernel from the booted slot.
PARTLABEL=var  /var  ext4  defaults,nodev,nosuid,x-systemd.growfs  0  2
PARTLABEL=esp  /efi  vfat  umask=0077,noauto,x-systemd.automount,x-systemd.idle-timeout=60  0  2
tmpfs          /tmp  tmpfs defaults,nodev,nosuid,mode=1777  0  0
";

/// systemd-repart grows the `var` partition into the free space after it on first boot
/// (a disk larger than the image); `x-systemd.growfs` in fstab then grows the filesystem.
/// Partitions without a definition here (ESP, root slots) are left alone.
pub const REPART_VAR: &str = "\
# Written by imgbuild: grow the var partition to fill the disk.
[Partition]
Type=var
Label=var
";

/// Prints, once boot has finished, what the tests and `imgbuild run` read: system state,
/// failed units, where / came from, the version. Between `imgbuild-report:` markers.
pub const BOOT_REPORT_SCRIPT: &str = r#"#!/bin/sh
# Written by imgbuild: the boot report. Waits until systemd has finished starting up,
# then prints one block to the console.
state=$(systemctl is-system-running --wait 2>/dev/null)
failed=$(systemctl list-units --state=failed --no-legend --plain 2>/dev/null | awk '{print $1}' | tr '\n' ' ')
src=$(findmnt -n -o SOURCE /)
opts=$(findmnt -n -o OPTIONS /)
label=$(lsblk -n -o PARTLABEL "$src" 2>/dev/null)
var_mib=$(df -B1M --output=size /var 2>/dev/null | tail -n 1 | tr -d ' ')
var_src=$(findmnt -n -o SOURCE /var)
. /etc/os-release
echo "imgbuild-report: begin"
echo "imgbuild-report: state=$state"
echo "imgbuild-report: failed=$failed"
echo "imgbuild-report: root=$src partlabel=$label options=$opts"
echo "imgbuild-report: var=$var_src var_mib=$var_mib"
echo "imgbuild-report: image=$IMAGE_ID version=$IMAGE_VERSION kernel=$(uname -r)"
echo "imgbuild-report: end"
"#;

pub const BOOT_REPORT_UNIT: &str = "\
[Unit]
Description=imgbuild boot report on the console
After=multi-user.target

[Service]
# exec, not oneshot: the start job ends at once, so waiting for boot to finish
# inside the script cannot wait for this unit itself.
Type=exec
ExecStart=/usr/lib/imgbuild/boot-report
StandardOutput=tty
StandardError=journal
TTYPath=/dev/console

[Install]
WantedBy=multi-user.target
";

/// Configure the composed tree as an imgbuild image.
fn configure(
    recipe: &Recipe,
    agent: Option<&crate::agent::AgentPayload>,
    root: &Path,
    log: &Path,
) -> Result<()> {
    // Identity.
    let os_release = resolve_in_root(root, "/usr/lib/os-release", true)?;
    let debian = fs::read_to_string(&os_release)
        .with_context(|| format!("reading {}", os_release.display()))?;
    write_image_file(
        root,
        "/usr/lib/os-release",
        render_os_release(&debian, recipe).as_bytes(),
        0o644,
    )?;
    let etc_os = root.join("etc/os-release");
    if fs::symlink_metadata(&etc_os).is_err() {
        symlink("../usr/lib/os-release", &etc_os)
            .with_context(|| format!("linking {}", etc_os.display()))?;
    }
    // Empty machine-id: systemd makes a transient one on the read-only root at first boot.
    write_image_file(root, "/etc/machine-id", b"", 0o444)?;
    let dbus_id = root.join("var/lib/dbus/machine-id");
    if fs::symlink_metadata(&dbus_id).is_ok() {
        fs::remove_file(&dbus_id).with_context(|| format!("removing {}", dbus_id.display()))?;
    }
    write_image_file(
        root,
        "/etc/hostname",
        format!("{}\n", recipe.image.hostname).as_bytes(),
        0o644,
    )?;
    write_image_file(
        root,
        "/etc/hosts",
        format!(
            "127.0.0.1\tlocalhost\n127.0.1.1\t{}\n::1\tlocalhost ip6-localhost ip6-loopback\n",
            recipe.image.hostname
        )
        .as_bytes(),
        0o644,
    )?;
    write_image_file(root, "/etc/fstab", FSTAB.as_bytes(), 0o644)?;
    write_image_file(
        root,
        "/usr/lib/repart.d/50-var.conf",
        REPART_VAR.as_bytes(),
        0o644,
    )?;
    for dir in ["efi", "var", "tmp"] {
        fs::create_dir_all(root.join(dir))
            .with_context(|| format!("creating /{dir} in the image"))?;
    }

    // Recipe files.
    for f in &recipe.files {
        let data = match &f.content {
            FileContent::Inline(s) => s.as_bytes().to_vec(),
            FileContent::Source(p) => {
                fs::read(p).with_context(|| format!("reading {}", p.display()))?
            }
        };
        write_image_file(root, &f.path, &data, f.mode)
            .with_context(|| format!("writing {} (from {})", f.path, recipe.path.display()))?;
    }

    // Units.
    let mut enable = recipe.systemd.enable.clone();
    if let Some(agent) = agent {
        let units = agent
            .install(root)
            .context("installing imgupdate ([update])")?;
        enable.extend(units.iter().map(|u| u.to_string()));
    }
    if recipe.systemd.boot_report {
        write_image_file(
            root,
            "/usr/lib/imgbuild/boot-report",
            BOOT_REPORT_SCRIPT.as_bytes(),
            0o755,
        )?;
        write_image_file(
            root,
            "/usr/lib/systemd/system/imgbuild-boot-report.service",
            BOOT_REPORT_UNIT.as_bytes(),
            0o644,
        )?;
        enable.push("imgbuild-boot-report.service".into());
    }
    systemctl(root, &["set-default", "multi-user.target"], log)?;
    for (verb, units) in [
        ("enable", &enable),
        ("disable", &recipe.systemd.disable),
        ("mask", &recipe.systemd.mask),
    ] {
        if units.is_empty() {
            continue;
        }
        let mut args = vec![verb];
        args.extend(units.iter().map(String::as_str));
        systemctl(root, &args, log)
            .with_context(|| format!("systemd.{verb} in {}", recipe.path.display()))?;
    }
    Ok(())
}

fn systemctl(root: &Path, args: &[&str], log: &Path) -> Result<()> {
    let mut cmd = Command::new("systemctl");
    cmd.arg(format!("--root={}", root.display()))
        .arg("--no-reload")
        .args(args);
    let out = run_capture(&mut cmd)?;
    let mut f = fs::File::options()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    writeln!(f, "$ {}\n{out}", crate::progress::describe(&cmd))
        .with_context(|| format!("writing {}", log.display()))?;
    Ok(())
}

/// Find the one kernel and its initrd in the tree.
pub fn find_kernel(root: &Path) -> Result<Composed> {
    let boot = root.join("boot");
    let mut versions: Vec<String> = fs::read_dir(&boot)
        .with_context(|| format!("reading {}", boot.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("vmlinuz-"))
                .map(String::from)
        })
        .collect();
    versions.sort();
    let version = match versions.as_slice() {
        [one] => one.clone(),
        [] => bail!(
            "no kernel in {}: the recipe must install one (linux-image-amd64)",
            boot.display()
        ),
        many => bail!(
            "{} kernels in {} ({}); an image boots exactly one",
            many.len(),
            boot.display(),
            many.join(", ")
        ),
    };
    let kernel = boot.join(format!("vmlinuz-{version}"));
    let initrd = boot.join(format!("initrd.img-{version}"));
    if !initrd.is_file() {
        bail!("kernel {version} has no initrd at {}", initrd.display());
    }
    Ok(Composed {
        root: root.to_path_buf(),
        kernel_version: version,
        kernel,
        initrd,
    })
}

/// Exclusive lock on the package cache while mmdebstrap syncs it in and out; flock(2)
/// is released when the file is closed, also if we crash.
struct CacheLock {
    _lock: nix::fcntl::Flock<fs::File>,
}

impl CacheLock {
    fn take(cache: &Path) -> Result<CacheLock> {
        let path = cache.join(".imgbuild.lock");
        let file =
            fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| anyhow!("locking {}: {e}", path.display()))?;
        Ok(CacheLock { _lock: lock })
    }
}

#[cfg(test)]
mod tests;
