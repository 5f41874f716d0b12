//! Finding the host's UEFI firmware (OVMF) and the QEMU binary.
//!
//! Owns the list of places distributions install OVMF and the error that tells a user
//! which package to install. It must never write to, or hand QEMU, the system variable
//! store template: `vm` copies it into the VM's work directory first.

use std::env;
use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Environment overrides for unusual installations; both must be set together.
pub const OVMF_CODE_ENV: &str = "IMGBUILD_OVMF_CODE";
pub const OVMF_VARS_ENV: &str = "IMGBUILD_OVMF_VARS";

/// Matching (code, vars template) pairs, best first. A code image only works with the
/// vars template of the same flash size, so they are never mixed.
pub const OVMF_CANDIDATES: &[(&str, &str)] = &[
    // Debian/Ubuntu `ovmf`
    (
        "/usr/share/OVMF/OVMF_CODE_4M.fd",
        "/usr/share/OVMF/OVMF_VARS_4M.fd",
    ),
    (
        "/usr/share/OVMF/OVMF_CODE.fd",
        "/usr/share/OVMF/OVMF_VARS.fd",
    ),
    // Fedora `edk2-ovmf`
    (
        "/usr/share/edk2/ovmf/OVMF_CODE.fd",
        "/usr/share/edk2/ovmf/OVMF_VARS.fd",
    ),
    // Arch `edk2-ovmf`
    (
        "/usr/share/edk2/x64/OVMF_CODE.4m.fd",
        "/usr/share/edk2/x64/OVMF_VARS.4m.fd",
    ),
];

/// The QEMU system emulator we drive.
pub const QEMU_BINARY: &str = "qemu-system-x86_64";

/// OVMF firmware: read-only code and the template its private variable store is copied from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ovmf {
    pub code: PathBuf,
    pub vars_template: PathBuf,
}

/// Host prerequisites that are missing.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FirmwareError {
    #[error(
        "OVMF UEFI firmware not found: no {first} (looked for {looked}); \
         install the Debian package `ovmf` (apt-get install -y ovmf)"
    )]
    OvmfMissing { first: String, looked: String },
    #[error("{var} is set to {path}, which does not exist")]
    OverrideMissing { var: &'static str, path: PathBuf },
    #[error("set both {OVMF_CODE_ENV} and {OVMF_VARS_ENV}, or neither")]
    OverrideHalf,
    #[error(
        "{QEMU_BINARY} not found in PATH; install the Debian package `qemu-system-x86` \
         (apt-get install -y qemu-system-x86)"
    )]
    QemuMissing,
}

/// Finds OVMF on this host: the `IMGBUILD_OVMF_CODE`/`IMGBUILD_OVMF_VARS` overrides if
/// set, otherwise the first complete pair in [`OVMF_CANDIDATES`].
pub fn firmware() -> Result<Ovmf, FirmwareError> {
    match (env::var_os(OVMF_CODE_ENV), env::var_os(OVMF_VARS_ENV)) {
        (Some(code), Some(vars)) => {
            let ovmf = Ovmf {
                code: code.into(),
                vars_template: vars.into(),
            };
            for (var, path) in [
                (OVMF_CODE_ENV, &ovmf.code),
                (OVMF_VARS_ENV, &ovmf.vars_template),
            ] {
                if !path.is_file() {
                    return Err(FirmwareError::OverrideMissing {
                        var,
                        path: path.clone(),
                    });
                }
            }
            Ok(ovmf)
        }
        (None, None) => firmware_under(Path::new("/")),
        _ => Err(FirmwareError::OverrideHalf),
    }
}

/// Like [`firmware`] without the overrides, with every candidate path taken relative to
/// `root` (`/` on a real host; a temporary directory in tests).
pub fn firmware_under(root: &Path) -> Result<Ovmf, FirmwareError> {
    let under = |p: &str| root.join(p.trim_start_matches('/'));
    for (code, vars) in OVMF_CANDIDATES {
        let (code, vars) = (under(code), under(vars));
        if code.is_file() && vars.is_file() {
            return Ok(Ovmf {
                code,
                vars_template: vars,
            });
        }
    }
    let (code, vars) = OVMF_CANDIDATES[0];
    let first = if under(code).is_file() { vars } else { code };
    Err(FirmwareError::OvmfMissing {
        first: under(first).display().to_string(),
        looked: OVMF_CANDIDATES
            .iter()
            .map(|(c, _)| under(c).display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// The first executable regular file called `name` in the directories of `path_var`
/// (a `PATH`-style list).
pub fn find_in_path(name: &str, path_var: &OsStr) -> Option<PathBuf> {
    env::split_paths(path_var)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// `qemu-system-x86_64` from `PATH`, or an error naming the package that provides it.
pub fn find_qemu() -> Result<PathBuf, FirmwareError> {
    let path = env::var_os("PATH").unwrap_or_default();
    find_in_path(QEMU_BINARY, &path).ok_or(FirmwareError::QemuMissing)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn touch(root: &Path, p: &str) {
        let p = root.join(p.trim_start_matches('/'));
        fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        fs::write(&p, b"fw").expect("write");
    }

    #[test]
    fn missing_ovmf_names_the_file_and_the_package() {
        let root = tempfile::tempdir().expect("tempdir");
        let err = firmware_under(root.path()).expect_err("nothing installed");
        let msg = err.to_string();
        assert!(msg.contains("OVMF_CODE_4M.fd"), "{msg}");
        assert!(msg.contains("apt-get install -y ovmf"), "{msg}");
    }

    #[test]
    fn a_half_pair_is_not_used_and_the_missing_half_is_named() {
        let root = tempfile::tempdir().expect("tempdir");
        touch(root.path(), "/usr/share/OVMF/OVMF_CODE_4M.fd");
        touch(root.path(), "/usr/share/OVMF/OVMF_VARS.fd");
        let msg = firmware_under(root.path())
            .expect_err("no pair")
            .to_string();
        assert!(
            msg.contains("no ") && msg.contains("OVMF_VARS_4M.fd"),
            "{msg}"
        );
    }

    #[test]
    fn first_complete_pair_wins() {
        let root = tempfile::tempdir().expect("tempdir");
        touch(root.path(), "/usr/share/OVMF/OVMF_CODE.fd");
        touch(root.path(), "/usr/share/OVMF/OVMF_VARS.fd");
        touch(root.path(), "/usr/share/edk2/ovmf/OVMF_CODE.fd");
        touch(root.path(), "/usr/share/edk2/ovmf/OVMF_VARS.fd");
        let ovmf = firmware_under(root.path()).expect("found");
        assert_eq!(ovmf.code, root.path().join("usr/share/OVMF/OVMF_CODE.fd"));
        assert_eq!(
            ovmf.vars_template,
            root.path().join("usr/share/OVMF/OVMF_VARS.fd")
        );
    }

    #[test]
    fn find_in_path_needs_the_exec_bit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tool = dir.path().join("tool");
        fs::write(&tool, b"#!/bin/sh\n").expect("write");
        assert_eq!(find_in_path("tool", dir.path().as_os_str()), None);
        fs::set_permissions(&tool, fs::Permissions::from_mode(0o755)).expect("chmod");
        assert_eq!(find_in_path("tool", dir.path().as_os_str()), Some(tool));
        assert_eq!(find_in_path("other", dir.path().as_os_str()), None);
    }
}
