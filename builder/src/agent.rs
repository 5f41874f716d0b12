//! The node updater that a recipe's `[update]` section puts into the image: the
//! `imgupdate` program, its systemd units and D-Bus policy (the files in
//! `updater/dist/`, embedded here so the builder and the updater ship one copy), the
//! configuration rendered from `[update]`, and the channel's trusted `root.json`.
//!
//! This module owns finding and checking those files before any work ([`prepare`]) and
//! writing them into a composed tree ([`AgentPayload::install`]). The config itself is
//! validated in `recipe::update`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::compose::write_image_file;
use crate::recipe::{UpdateSection, IMAGE_ROOT_JSON};

/// Environment variable naming the `imgupdate` program to install.
pub const IMGUPDATE_ENV: &str = "IMGBUILD_IMGUPDATE";

/// The program's path in the image (the units run it from there).
pub const IMAGE_BINARY: &str = "/usr/bin/imgupdate";

/// Units enabled in the image.
pub const UNITS: &[&str] = &["imgupdate.service", "imgupdate-health.service"];

const SERVICE_UNIT: &str = include_str!("../../updater/dist/imgupdate.service");
const HEALTH_UNIT: &str = include_str!("../../updater/dist/imgupdate-health.service");
const DBUS_POLICY: &str = include_str!("../../updater/dist/org.imgbuild.Update1.conf");
const README: &str = include_str!("../../updater/README.md");

/// Everything `[update]` adds to the image, read and checked.
#[derive(Debug, Clone)]
pub struct AgentPayload {
    /// The `imgupdate` program on the build host.
    pub binary: PathBuf,
    /// (image path, contents, mode) of the other files.
    files: Vec<(&'static str, Vec<u8>, u32)>,
}

/// Finds the program and reads the root; fails before any work when either is missing
/// or the program is not an x86-64 ELF executable.
pub fn prepare(section: &UpdateSection) -> Result<AgentPayload> {
    let binary = match &section.binary {
        Some(p) => p.clone(),
        None => crate::installer::companion_binary("imgupdate", IMGUPDATE_ENV, "imgupdate")?,
    };
    check_elf(&binary)?;
    let root = std::fs::read(&section.trusted_root)
        .with_context(|| format!("reading {}", section.trusted_root.display()))?;
    Ok(AgentPayload {
        binary,
        files: vec![
            (
                "/etc/imgupdate/config.toml",
                section.config_toml.clone().into_bytes(),
                0o644,
            ),
            (IMAGE_ROOT_JSON, root, 0o644),
            (
                "/usr/lib/systemd/system/imgupdate.service",
                SERVICE_UNIT.into(),
                0o644,
            ),
            (
                "/usr/lib/systemd/system/imgupdate-health.service",
                HEALTH_UNIT.into(),
                0o644,
            ),
            (
                "/usr/share/dbus-1/system.d/org.imgbuild.Update1.conf",
                DBUS_POLICY.into(),
                0o644,
            ),
            ("/usr/share/doc/imgupdate/README.md", README.into(), 0o644),
        ],
    })
}

impl AgentPayload {
    /// Writes the files into the tree at `root` (the program without its debug
    /// information: a debug build is ~7x larger). Returns the units to enable.
    pub fn install(&self, root: &Path) -> Result<&'static [&'static str]> {
        for (path, data, mode) in &self.files {
            write_image_file(root, path, data, *mode)?;
        }
        // Written through write_image_file first (confined to the tree, parents made),
        // then replaced by the stripped copy.
        let dest = write_image_file(root, IMAGE_BINARY, b"", 0o755)?;
        let out = Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(&dest)
            .arg(&self.binary)
            .output()
            .context("running strip (binutils)")?;
        if !out.status.success() {
            bail!(
                "strip --strip-debug {} failed: {}",
                self.binary.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        set_mode(&dest, 0o755)?;
        Ok(UNITS)
    }
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))
}

/// The program must be a 64-bit little-endian x86-64 ELF: the image is amd64.
fn check_elf(path: &Path) -> Result<()> {
    use std::io::Read;
    let mut head = [0u8; 20];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .with_context(|| format!("reading {}", path.display()))?;
    let ok = head[..4] == *b"\x7fELF"
        && head[4] == 2 // 64-bit
        && head[5] == 1 // little-endian
        && u16::from_le_bytes([head[18], head[19]]) == 62; // EM_X86_64
    if !ok {
        bail!(
            "{} is not an x86-64 ELF program (set [update] binary or {IMGUPDATE_ENV})",
            path.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_elf_accepts_this_test_program_and_rejects_text() {
        let exe = std::env::current_exe().unwrap();
        check_elf(&exe).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().join("imgupdate");
        std::fs::write(&text, "#!/bin/sh\necho not a program\n").unwrap();
        let err = check_elf(&text).unwrap_err().to_string();
        assert!(err.contains("not an x86-64 ELF"), "{err}");
        let short = dir.path().join("short");
        std::fs::write(&short, "\x7fELF").unwrap();
        assert!(check_elf(&short).is_err());
    }

    #[test]
    fn embedded_units_run_the_installed_program() {
        for unit in [SERVICE_UNIT, HEALTH_UNIT] {
            assert!(
                unit.contains(&format!("ExecStart={IMAGE_BINARY} ")),
                "{unit}"
            );
        }
        assert!(HEALTH_UNIT.contains("Before=boot-complete.target"));
    }
}
