//! `imgbuild flash IMAGE DEVICE`: put a signed raw disk image onto a USB stick (or any
//! disk, or a regular file).
//!
//! Owns the order of checks for flashing: signature and image hash first, then the
//! target's refusal rules (mounted, holds `/`, read-only, too small, not removable
//! unless `--force`), then the write ([`imginstall::write`]: first MiB last, fsync,
//! read-back). It never opens the target for writing before both checks passed, and it
//! never writes the partition table of a stream whose hash differs from the signed one.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use imginstall::target::{self, BlockDevice};
use imginstall::verify::Sums;
use imginstall::write::{self, Phase};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Write a signed raw disk image to a device (USB stick) or file, verified before and after.
#[derive(Debug, Clone, clap::Args)]
pub struct FlashArgs {
    /// The raw disk image (NAME-VERSION.raw; qcow2 cannot be written to a device).
    pub image: PathBuf,
    /// The target: a whole-disk block device such as /dev/sdb, or a regular file.
    pub device: PathBuf,
    /// Public key that signed SHA256SUMS (NAME.pub, or a file holding the key in hex).
    #[arg(long)]
    pub key: PathBuf,
    /// The signed sums file [default: SHA256SUMS next to the image; its signature is
    /// the same name + .sig].
    #[arg(long)]
    pub sums: Option<PathBuf>,
    /// Write to a device that is not removable (an internal disk). Mounted devices and
    /// the disk holding / are refused even with --force.
    #[arg(long)]
    pub force: bool,
}

/// What the target of a flash is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A whole-disk block device, as `/sys/block` describes it.
    Disk(BlockDevice),
    /// A regular file (created if missing).
    File,
}

/// Resolves a block device number to its whole-disk entry under `SYS/block`, refusing
/// partitions: an image is a whole disk and goes onto a whole disk.
pub fn block_target(sys: &Path, device: &Path, rdev: (u32, u32)) -> Result<BlockDevice> {
    let link = sys.join(format!("dev/block/{}:{}", rdev.0, rdev.1));
    if link.join("partition").is_file() {
        bail!(
            "refusing {}: it is a partition; give the whole disk (an image carries its own partition table)",
            device.display()
        );
    }
    let resolved = fs::canonicalize(&link)
        .with_context(|| format!("finding {} in {}", device.display(), link.display()))?;
    let name = resolved
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| anyhow!("{}: no device name", resolved.display()))?;
    target::read_block_device(sys, &name)
        .with_context(|| format!("reading {}/block/{name}", sys.display()))
}

/// Classifies the target path (missing paths become regular files).
pub fn classify(sys: &Path, device: &Path) -> Result<Target> {
    match fs::metadata(device) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Target::File),
        Err(e) => Err(e).with_context(|| format!("inspecting {}", device.display())),
        Ok(m) if m.file_type().is_block_device() => {
            let rdev = m.rdev();
            let dev = (
                nix::sys::stat::major(rdev) as u32,
                nix::sys::stat::minor(rdev) as u32,
            );
            Ok(Target::Disk(block_target(sys, device, dev)?))
        }
        Ok(m) if m.is_file() => Ok(Target::File),
        Ok(_) => bail!(
            "refusing {}: neither a block device nor a regular file",
            device.display()
        ),
    }
}

/// Checks the signature of the sums file and the image's hash; returns the signed hash.
/// Nothing about the target is touched.
pub fn verify_image(image: &Path, sums: &Path, key: &Path) -> Result<String> {
    let key_value = imgchannel::keys::load_public_key(key)
        .with_context(|| format!("loading the public key {}", key.display()))?;
    let sig = imgchannel::artifact::signature_path(sums);
    imgchannel::verify_artifact(image, sums, &sig, &key_value)
        .with_context(|| format!("verifying {} against {}", image.display(), sums.display()))?;
    // Take the expected hash from the verified bytes again, for the streaming check.
    let bytes = imgchannel::artifact::verify_sums(sums, &sig, &key_value)
        .with_context(|| format!("verifying {}", sums.display()))?;
    let sig_bytes = fs::read(&sig).with_context(|| format!("reading {}", sig.display()))?;
    let listing = Sums::verify(&bytes, &sig_bytes, &key_value)
        .with_context(|| format!("reading {}", sums.display()))?;
    let name = image
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(listing.get(&name)?.to_owned())
}

fn progress_bar(len: u64, quiet: bool) -> ProgressBar {
    let target = if quiet {
        ProgressDrawTarget::hidden()
    } else {
        ProgressDrawTarget::stderr()
    };
    let bar = ProgressBar::with_draw_target(Some(len), target);
    if let Ok(style) = ProgressStyle::with_template(
        "{prefix:>8} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// Verifies, checks the target, writes, reads back.
pub fn flash(args: &FlashArgs, quiet: bool) -> Result<()> {
    let sums = args
        .sums
        .clone()
        .unwrap_or_else(|| args.image.with_file_name(imgchannel::artifact::SUMS_FILE));
    let mut magic = [0u8; 4];
    {
        use std::io::Read;
        let mut f =
            File::open(&args.image).with_context(|| format!("opening {}", args.image.display()))?;
        let _ = f.read(&mut magic);
    }
    if &magic == b"QFI\xfb" {
        bail!(
            "{} is a qcow2 image; flash the .raw image next to it",
            args.image.display()
        );
    }
    // 1. signature and hash, before the target is even looked at.
    let expected = verify_image(&args.image, &sums, &args.key)?;
    let image_len = fs::metadata(&args.image)
        .with_context(|| format!("reading {}", args.image.display()))?
        .len();
    if !quiet {
        eprintln!(
            "verified {}: signature good, sha256 {expected}",
            args.image.display()
        );
    }
    // 2. the target.
    if let (Ok(a), Ok(b)) = (fs::metadata(&args.image), fs::metadata(&args.device)) {
        if a.dev() == b.dev() && a.ino() == b.ino() {
            bail!("refusing {}: it is the image itself", args.device.display());
        }
    }
    let target = classify(Path::new("/sys"), &args.device)?;
    if let Target::Disk(dev) = &target {
        let mountinfo =
            fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
        target::check_target(
            dev,
            &target::parse_mountinfo(&mountinfo),
            image_len,
            !args.force,
        )?;
    }
    // 3. write, first MiB last, then read back.
    let mut out = OpenOptions::new()
        .read(true)
        .write(true)
        .create(target == Target::File)
        .truncate(false)
        .open(&args.device)
        .with_context(|| format!("opening {} for writing", args.device.display()))?;
    if target == Target::File {
        out.set_len(image_len)
            .with_context(|| format!("sizing {}", args.device.display()))?;
    }
    let src =
        File::open(&args.image).with_context(|| format!("opening {}", args.image.display()))?;
    let bar = progress_bar(image_len, quiet);
    bar.set_prefix("write");
    let mut phase = Phase::Write;
    write::write_image(
        std::io::BufReader::with_capacity(write::BLOCK, src),
        &mut out,
        image_len,
        &expected,
        &mut |p, n| {
            if p != phase {
                phase = p;
                bar.set_prefix("verify");
                bar.reset();
            }
            bar.set_position(n);
        },
    )
    .with_context(|| {
        format!(
            "writing {} to {}",
            args.image.display(),
            args.device.display()
        )
    })?;
    bar.finish_and_clear();
    if !quiet {
        eprintln!(
            "wrote {} to {} ({} MiB) and read it back: sha256 matches the signature",
            args.image.display(),
            args.device.display(),
            image_len >> 20
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_block(sys: &Path, name: &str, dev: &str, parent: Option<&str>) {
        let dir = match parent {
            Some(p) => sys.join("block").join(p).join(name),
            None => sys.join("block").join(name),
        };
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("dev"), format!("{dev}\n")).unwrap();
        fs::write(dir.join("size"), "2048\n").unwrap();
        fs::write(dir.join("removable"), "1\n").unwrap();
        if parent.is_some() {
            fs::write(dir.join("partition"), "1\n").unwrap();
        }
        fs::create_dir_all(sys.join("dev/block")).unwrap();
        std::os::unix::fs::symlink(&dir, sys.join("dev/block").join(dev)).unwrap();
    }

    #[test]
    fn whole_disks_resolve_and_partitions_are_refused() {
        let t = tempfile::tempdir().unwrap();
        fake_block(t.path(), "sdb", "8:16", None);
        fake_block(t.path(), "sdb1", "8:17", Some("sdb"));
        let d = block_target(t.path(), Path::new("/dev/sdb"), (8, 16)).unwrap();
        assert_eq!(d.name, "sdb");
        assert_eq!(d.size, 2048 * 512);
        assert!(d.removable);
        assert_eq!(d.partitions, vec![("sdb1".to_string(), (8, 17))]);
        let e = block_target(t.path(), Path::new("/dev/sdb1"), (8, 17)).unwrap_err();
        assert!(e.to_string().contains("is a partition"), "{e}");
    }

    /// Read-only: on the real /sys and /proc of the test host, the disk holding `/` is
    /// refused (skipped where `/` is not on a block device, e.g. in a container).
    #[test]
    fn this_hosts_root_disk_is_refused() {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
        let mounts = target::parse_mountinfo(&mountinfo);
        let root = mounts.iter().find(|m| m.mount_point == "/").unwrap();
        let sys = Path::new("/sys");
        let link = sys.join(format!("dev/block/{}:{}", root.dev.0, root.dev.1));
        let Ok(mut dir) = fs::canonicalize(&link) else {
            eprintln!("skipping: / is not on a block device");
            return;
        };
        if dir.join("partition").is_file() {
            dir.pop();
        }
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let dev = target::read_block_device(sys, &name).unwrap();
        let err = target::check_target(&dev, &mounts, 1, false).unwrap_err();
        assert!(matches!(err, target::Refusal::HoldsRoot { .. }), "{err}");
    }

    #[test]
    fn files_and_missing_paths_are_file_targets() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("f");
        assert_eq!(classify(t.path(), &f).unwrap(), Target::File);
        fs::write(&f, "x").unwrap();
        assert_eq!(classify(t.path(), &f).unwrap(), Target::File);
        assert!(
            classify(t.path(), t.path()).is_err(),
            "a directory is refused"
        );
    }
}
