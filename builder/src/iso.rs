//! `formats = ["iso"]`: `NAME-VERSION.iso`, a UEFI-bootable hybrid ISO with the live
//! installer.
//!
//! Layout: an ISO 9660 filesystem (a README) plus an appended GPT partition holding a
//! FAT32 EFI image (written with `fatfs` through `imgdisk::esp`, no mounts) that the El
//! Torito EFI entry points at, so the same file boots from a CD drive and, `dd`-ed to a
//! USB stick, as a disk. The FAT image holds the image's own systemd-boot (from its ESP)
//! as `EFI/BOOT/BOOTX64.EFI`, two loader entries (ask before installing; install onto the
//! only disk unattended), the image's kernel and the installer initrd with the signed
//! payload embedded. This module owns that layout and the xorriso call; it never runs
//! xorriso through a shell, and the result is reproducible (`SOURCE_DATE_EPOCH`).

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use imgdisk::esp::{self, EspFile};
use imgformat::layout::PartitionRole;

use crate::installer::{self, InitrdSpec, MediaInputs};

/// Volume label of the ISO and of its EFI image.
pub const VOLUME_LABEL: &str = "IMGBUILD";

const MIB: u64 = 1 << 20;

/// systemd-boot, read from the ESP of the image itself.
pub fn systemd_boot_from_disk(raw: &Path) -> Result<Vec<u8>> {
    let layout = imgdisk::layout::inspect(raw)
        .with_context(|| format!("reading the partition table of {}", raw.display()))?;
    let esp = layout.require(PartitionRole::Esp)?;
    let file = File::open(raw).with_context(|| format!("opening {}", raw.display()))?;
    let slice = fscommon::StreamSlice::new(file, esp.offset(), esp.offset() + esp.size())
        .with_context(|| format!("the ESP of {}", raw.display()))?;
    esp::read_esp_file(slice, imgformat::boot::FALLBACK_LOADER_PATH)
        .with_context(|| format!("reading systemd-boot from the ESP of {}", raw.display()))
}

/// Loader entries: `(file name, contents)`. The first is the default.
pub fn loader_entries(title: &str, cmdline: &str) -> Vec<(String, String)> {
    let entry = |what: &str, extra: &str| {
        format!(
            "title   {title}: {what}\nlinux   /imgbuild/vmlinuz\ninitrd  /imgbuild/install.img\noptions {cmdline}{extra}\n"
        )
    };
    vec![
        (
            "imgbuild-install.conf".into(),
            entry("install (asks before writing)", ""),
        ),
        (
            "imgbuild-install-auto.conf".into(),
            entry(
                "install onto the only disk, unattended",
                " imgbuild.install=auto",
            ),
        ),
    ]
}

/// The FAT32 EFI image: systemd-boot, loader configuration, kernel, installer initrd.
pub fn write_efi_image(
    out: &Path,
    sd_boot: Vec<u8>,
    kernel: &Path,
    initrd: &Path,
    entries: &[(String, String)],
    seed: &str,
    epoch: i64,
) -> Result<u64> {
    let mut files = vec![
        EspFile::bytes(imgformat::boot::FALLBACK_LOADER_PATH, sd_boot),
        EspFile::bytes(
            imgformat::boot::LOADER_CONF_PATH,
            format!(
                "default {}\ntimeout 3\nconsole-mode keep\neditor yes\n",
                entries.first().map(|e| e.0.as_str()).unwrap_or_default()
            ),
        ),
        EspFile::file("imgbuild/vmlinuz", kernel),
        EspFile::file("imgbuild/install.img", initrd),
    ];
    for (name, text) in entries {
        files.push(EspFile::bytes(
            format!("{}/{name}", imgformat::boot::ENTRIES_DIR),
            text.clone(),
        ));
    }
    let mut payload = 0u64;
    for p in [kernel, initrd] {
        payload += fs::metadata(p)
            .with_context(|| format!("reading {}", p.display()))?
            .len();
    }
    // FAT overhead with 512-byte clusters is small; leave 1/16 and 8 MiB of room.
    let size = ((payload + payload / 16 + 8 * MIB).div_ceil(MIB) * MIB).max(esp::MIN_ESP_SIZE);
    let f = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(out)
        .with_context(|| format!("creating {}", out.display()))?;
    f.set_len(size)
        .with_context(|| format!("sizing {}", out.display()))?;
    esp::write_esp(
        f,
        size,
        esp::volume_id(&format!("{seed} iso")),
        VOLUME_LABEL,
        &files,
        epoch,
    )
    .with_context(|| format!("writing the EFI image {}", out.display()))?;
    Ok(size)
}

/// `--modification-date` / xorriso time format: `YYYYMMDDhhmmss00` (UTC).
pub fn iso_date(epoch: i64) -> String {
    let days = epoch.div_euclid(86_400);
    let secs = epoch.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}{:02}{:02}{:02}00",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// The xorriso arguments for an EFI-only hybrid ISO.
pub fn xorriso_args(
    out: &Path,
    staging: &Path,
    efi_image: &Path,
    epoch: i64,
) -> Vec<std::ffi::OsString> {
    let mut a: Vec<std::ffi::OsString> = Vec::new();
    for s in ["-as", "mkisofs", "-o"] {
        a.push(s.into());
    }
    a.push(out.into());
    for s in [
        "-V",
        VOLUME_LABEL,
        "-iso-level",
        "3",
        "-r",
        "-J",
        "-joliet-long",
        "-partition_offset",
        "16",
        "-append_partition",
        "2",
        "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
    ] {
        a.push(s.into());
    }
    a.push(efi_image.into());
    for s in [
        "-appended_part_as_gpt",
        "-c",
        "boot.catalog",
        "-e",
        "--interval:appended_partition_2:all::",
        "-no-emul-boot",
    ] {
        a.push(s.into());
    }
    a.push(format!("--modification-date={}", iso_date(epoch)).into());
    a.push(staging.into());
    a
}

/// Builds `out` (`NAME-VERSION.iso`) in `work`.
pub fn build_iso(inputs: &MediaInputs, work: &Path, out: &Path) -> Result<PathBuf> {
    fs::create_dir_all(work).with_context(|| format!("creating {}", work.display()))?;
    let payload = installer::make_payload(&inputs.raw, &work.join("payload"), &inputs.key)?;
    let installer_bin = installer::installer_binary()?;
    let initrd = work.join("install.img");
    installer::write_installer_initrd(
        &InitrdSpec {
            base_initrd: &inputs.initrd,
            root_ext4: &inputs.root_ext4,
            installer: &installer_bin,
            payload: &payload,
            embed_payload: true,
            modules: Vec::new(),
            extra_files: Vec::new(),
            epoch: inputs.epoch,
        },
        &initrd,
    )?;
    let cmdline = installer::installer_cmdline(&inputs.recipe_cmdline, &[]);
    let efi = work.join("efiboot.img");
    write_efi_image(
        &efi,
        systemd_boot_from_disk(&inputs.raw)?,
        &inputs.kernel,
        &initrd,
        &loader_entries(&inputs.title, &cmdline),
        &inputs.stem,
        inputs.epoch,
    )?;
    let staging = work.join("iso-root");
    fs::create_dir_all(&staging).with_context(|| format!("creating {}", staging.display()))?;
    fs::write(
        staging.join("README.TXT"),
        format!(
            "{} installer.\n\nBoot this medium with UEFI. It writes the signed disk image {}.raw to a disk\n\
             after checking its signature, then reboots into it. Kernel command line options:\n\
             imgbuild.install=/dev/NAME (target disk) or imgbuild.install=auto (the only disk).\n",
            inputs.title, inputs.stem
        ),
    )
    .with_context(|| format!("writing {}", staging.display()))?;
    let partial = out.with_extension("iso.partial");
    let _ = fs::remove_file(&partial);
    let output = Command::new("xorriso")
        .args(xorriso_args(&partial, &staging, &efi, inputs.epoch))
        .env("SOURCE_DATE_EPOCH", inputs.epoch.to_string())
        .output()
        .context("running xorriso (apt-get install xorriso)")?;
    if !output.status.success() {
        bail!(
            "xorriso failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    fs::rename(&partial, out)
        .with_context(|| format!("renaming {} to {}", partial.display(), out.display()))?;
    Ok(out.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_dates() {
        assert_eq!(iso_date(0), "1970010100000000");
        assert_eq!(iso_date(1_735_689_600), "2025010100000000");
        assert_eq!(iso_date(951_827_696), "2000022912345600");
    }

    #[test]
    fn entries_share_the_cmdline() {
        let e = loader_entries("T", "rdinit=/imgbuild-install console=ttyS0");
        assert_eq!(e.len(), 2);
        assert!(e[0]
            .1
            .contains("options rdinit=/imgbuild-install console=ttyS0\n"));
        assert!(e[1].1.ends_with("imgbuild.install=auto\n"));
        assert!(e
            .iter()
            .all(|(_, t)| t.contains("linux   /imgbuild/vmlinuz")));
    }

    /// A tiny fake EFI image turned into a hybrid ISO twice: same bytes, GPT present.
    #[test]
    fn xorriso_output_is_reproducible_and_hybrid() {
        if crate::build::find_in_path("xorriso").is_none() {
            eprintln!("skipping: no xorriso");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("k");
        let i = dir.path().join("i");
        fs::write(&k, b"kernel").unwrap();
        fs::write(&i, b"initrd").unwrap();
        let efi = dir.path().join("efi.img");
        write_efi_image(
            &efi,
            b"MZ".to_vec(),
            &k,
            &i,
            &loader_entries("T", "x"),
            "s",
            1_700_000_000,
        )
        .unwrap();
        let staging = dir.path().join("root");
        fs::create_dir_all(&staging).unwrap();
        fs::write(staging.join("README.TXT"), "r").unwrap();
        let mut hashes = Vec::new();
        for n in 0..2 {
            let out = dir.path().join(format!("{n}.iso"));
            let st = Command::new("xorriso")
                .args(xorriso_args(&out, &staging, &efi, 1_700_000_000))
                .env("SOURCE_DATE_EPOCH", "1700000000")
                .output()
                .unwrap();
            assert!(
                st.status.success(),
                "{}",
                String::from_utf8_lossy(&st.stderr)
            );
            let bytes = fs::read(&out).unwrap();
            assert_eq!(&bytes[512..520], b"EFI PART", "GPT for USB sticks");
            assert_eq!(&bytes[32769..32774], b"CD001");
            hashes.push(crate::build::sha256_file(&out).unwrap());
        }
        assert_eq!(hashes[0], hashes[1]);
    }
}
