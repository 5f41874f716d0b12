//! `formats = ["pxe"]`: the directory `NAME-VERSION.pxe/`, everything a network boot of
//! the live installer needs, to be served as static files over HTTP:
//!
//! - `vmlinuz`: the image's kernel;
//! - `initrd.img`: the image's initrd + the installer cpio (installer, public key, NIC
//!   modules taken from the image's root filesystem) but no payload;
//! - `SHA256SUMS`, `SHA256SUMS.sig`, `NAME.raw.zst`: the signed payload, which the
//!   installer downloads from `imgbuild.url=` and verifies before writing anything;
//! - `boot.ipxe`: the iPXE script; chain it with `${base}` set to the directory's URL.
//!
//! This module owns that layout and the script's text. It never puts a key or a URL of
//! the build host into the outputs: where the directory is served is decided at boot
//! (`${base}`), and the only trust anchor is the public key inside `initrd.img`.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::installer::{self, InitrdSpec, MediaInputs};

/// NIC drivers (with their dependencies first) added to the PXE initrd, relative to
/// `/usr/lib/modules/KVER/`: the image's initrd has storage drivers only.
pub const PXE_MODULES: &[&str] = &[
    "kernel/net/core/failover.ko",
    "kernel/drivers/net/net_failover.ko",
    "kernel/drivers/net/virtio_net.ko",
];

/// The RAM disk driver used by diskless boots, relative to `/usr/lib/modules/KVER/`.
pub const BRD_MODULE: &str = "kernel/drivers/block/brd.ko";

/// The kernel version directories under `/usr/lib/modules` of the image.
pub fn kernel_versions(root_ext4: &Path) -> Result<Vec<String>> {
    let out = std::process::Command::new("debugfs")
        .args(["-R", "ls -p /usr/lib/modules"])
        .arg(root_ext4)
        .output()
        .with_context(|| format!("running debugfs on {}", root_ext4.display()))?;
    // `ls -p` lines: /inode/mode/uid/gid/name/size/
    let text = String::from_utf8_lossy(&out.stdout);
    let mut v: Vec<String> = text
        .lines()
        .filter_map(|l| l.split('/').nth(5))
        .filter(|n| !n.is_empty() && *n != "." && *n != "..")
        .map(str::to_owned)
        .collect();
    v.sort();
    Ok(v)
}

/// The iPXE script. `${base}` must be the HTTP URL of the `.pxe/` directory (ending in
/// `/`); `${imgbuild-args}` may add installer options (e.g. `imgbuild.install=/dev/sda`).
pub fn ipxe_script(stem: &str, cmdline: &str) -> String {
    format!(
        "#!ipxe\n\
         # imgbuild network installer for {stem}.\n\
         # Serve this directory over HTTP and chain this script with ${{base}} set to its URL:\n\
         #   set base http://SERVER/{stem}.pxe/\n\
         #   chain ${{base}}boot.ipxe\n\
         # Extra installer options (default: install onto the only disk, unattended):\n\
         #   set imgbuild-args imgbuild.install=/dev/sda\n\
         # or run from RAM without touching any disk:\n\
         #   set imgbuild-args imgbuild.diskless\n\
         isset ${{base}} || goto nobase\n\
         isset ${{imgbuild-args}} || set imgbuild-args imgbuild.install=auto\n\
         kernel ${{base}}vmlinuz initrd=initrd.img {cmdline} imgbuild.url=${{base}} ${{imgbuild-args}}\n\
         initrd ${{base}}initrd.img\n\
         boot\n\
         :nobase\n\
         echo imgbuild: set base to the HTTP URL of {stem}.pxe/ before chaining boot.ipxe\n\
         shell\n"
    )
}

/// Builds `out` (`NAME-VERSION.pxe/`) using `work` for intermediate files.
pub fn build_pxe(inputs: &MediaInputs, work: &Path, out: &Path) -> Result<PathBuf> {
    let partial = out.with_extension("pxe.partial");
    if partial.exists() {
        fs::remove_dir_all(&partial).with_context(|| format!("removing {}", partial.display()))?;
    }
    fs::create_dir_all(work).with_context(|| format!("creating {}", work.display()))?;
    let payload = installer::make_payload(&inputs.raw, &partial, &inputs.key)?;
    let kvers = kernel_versions(&inputs.root_ext4)?;
    let [kver] = kvers.as_slice() else {
        bail!(
            "{} has {} kernels under /usr/lib/modules ({:?}); the PXE initrd needs exactly one",
            inputs.root_ext4.display(),
            kvers.len(),
            kvers
        );
    };
    let mut modules = Vec::new();
    for m in PXE_MODULES {
        let bytes =
            installer::read_from_ext4(&inputs.root_ext4, &format!("/usr/lib/modules/{kver}/{m}"))?;
        let name = m.rsplit('/').next().unwrap_or(m).to_owned();
        modules.push((name, bytes));
    }
    // Diskless boots (`imgbuild.diskless`): a RAM disk driver and `blockdev` to re-read
    // its partition table, both from the image.
    let extra_files = vec![
        (
            "imgbuild/brd.ko".to_owned(),
            0o644,
            installer::read_from_ext4(
                &inputs.root_ext4,
                &format!("/usr/lib/modules/{kver}/{BRD_MODULE}"),
            )?,
        ),
        (
            "imgbuild/bin/blockdev".to_owned(),
            0o755,
            installer::read_from_ext4(&inputs.root_ext4, "/usr/sbin/blockdev")?,
        ),
    ];
    let installer_bin = installer::installer_binary()?;
    installer::write_installer_initrd(
        &InitrdSpec {
            base_initrd: &inputs.initrd,
            root_ext4: &inputs.root_ext4,
            installer: &installer_bin,
            payload: &payload,
            embed_payload: false,
            modules,
            extra_files,
            epoch: inputs.epoch,
        },
        &partial.join("initrd.img"),
    )?;
    fs::copy(&inputs.kernel, partial.join("vmlinuz"))
        .with_context(|| format!("copying {}", inputs.kernel.display()))?;
    let cmdline = installer::installer_cmdline(&inputs.recipe_cmdline, &[]);
    fs::write(
        partial.join("boot.ipxe"),
        ipxe_script(&inputs.stem, &cmdline),
    )
    .with_context(|| format!("writing {}", partial.join("boot.ipxe").display()))?;
    if out.exists() {
        fs::remove_dir_all(out).with_context(|| format!("removing {}", out.display()))?;
    }
    fs::rename(&partial, out)
        .with_context(|| format!("renaming {} to {}", partial.display(), out.display()))?;
    Ok(out.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_passes_base_and_defaults() {
        let s = ipxe_script("n-1", "rdinit=/imgbuild-install console=ttyS0");
        assert!(s.starts_with("#!ipxe\n"));
        assert!(s.contains(
            "kernel ${base}vmlinuz initrd=initrd.img rdinit=/imgbuild-install console=ttyS0 imgbuild.url=${base} ${imgbuild-args}\n"
        ));
        assert!(s.contains("initrd ${base}initrd.img\n"));
        assert!(s.contains("set imgbuild-args imgbuild.install=auto"));
    }
}
