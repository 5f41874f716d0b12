//! The live installer environment shared by the ISO and PXE outputs: the signed payload
//! and the installer initrd (the image's own initrd with a cpio appended that carries
//! `imgbuild-install`, the libraries it needs, the public key and, for the ISO, the
//! payload).
//!
//! Owns the payload format (`NAME.raw.zst` with its size in the zstd frame header, a
//! `SHA256SUMS` listing `NAME.raw` and `NAME.raw.zst`, signed), a deterministic newc cpio
//! writer, and where the installer binary comes from. It never ships an unsigned payload
//! (a key is required), never takes files from the build host that the image has itself
//! (libraries come out of the image's root filesystem with `debugfs`), and never builds
//! a shell string: every tool gets an argument vector.

use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

/// Name of the installer program inside the initramfs (`rdinit=/imgbuild-install`).
pub const INSTALLER_PATH: &str = "imgbuild-install";

/// Environment variable naming the `imgbuild-install` binary to embed.
pub const INSTALLER_ENV: &str = "IMGBUILD_INSTALLER";

/// Libraries `imgbuild-install` links against, copied from the image's root filesystem.
/// (The dynamic loader is in every initramfs-tools initrd already.)
pub const INSTALLER_LIBS: &[&str] = &[
    "usr/lib/x86_64-linux-gnu/libgcc_s.so.1",
    "usr/lib/x86_64-linux-gnu/libc.so.6",
    "usr/lib/x86_64-linux-gnu/libm.so.6",
];

/// zstd level for the payload: fast to make and, under TCG, fast to decompress.
const PAYLOAD_ZSTD_LEVEL: i32 = 3;

/// The signed payload files, in one directory.
#[derive(Debug, Clone)]
pub struct Payload {
    pub dir: PathBuf,
    /// `NAME.raw.zst`
    pub zst: PathBuf,
    pub sums: PathBuf,
    pub sig: PathBuf,
    /// The public key as 64 hex digits (embedded in the initrd).
    pub pubkey_hex: String,
}

impl Payload {
    /// The files a payload directory holds (what PXE serves, what the ISO embeds).
    pub fn files(&self) -> [&Path; 3] {
        [&self.sums, &self.sig, &self.zst]
    }
}

/// Finds the `imgbuild-install` binary: `$IMGBUILD_INSTALLER`, else next to the running
/// executable.
pub fn installer_binary() -> Result<PathBuf> {
    companion_binary("imgbuild-install", INSTALLER_ENV, "imgbuild-installer")
}

/// Finds a program built with imgbuild that goes into images: `$ENV`, else `name` next
/// to the running executable (or one directory up, for test binaries in
/// `target/*/deps`). `package` names the cargo package that builds it, for the error.
pub fn companion_binary(name: &str, env: &str, package: &str) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("{env}={} does not exist", p.display());
        }
        return Ok(p);
    }
    let exe = std::env::current_exe().context("finding the running executable")?;
    let mut dir = exe.parent().map(Path::to_path_buf);
    for _ in 0..2 {
        let Some(d) = dir else { break };
        let candidate = d.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
        dir = d.parent().map(Path::to_path_buf);
    }
    bail!(
        "{name} not found next to {} (build it with `cargo build -p {package}`, or set {env})",
        exe.display()
    )
}

/// Compresses `raw` to `dir/NAME.raw.zst` (size recorded in the frame header), writes
/// `SHA256SUMS` for both and signs it with `key`.
pub fn make_payload(raw: &Path, dir: &Path, key: &Path) -> Result<Payload> {
    let name = raw
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .with_context(|| format!("{}: no file name", raw.display()))?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let zst = dir.join(format!("{name}.zst"));
    let len = fs::metadata(raw)
        .with_context(|| format!("reading {}", raw.display()))?
        .len();
    let mut src = File::open(raw).with_context(|| format!("opening {}", raw.display()))?;
    let out = File::create(&zst).with_context(|| format!("creating {}", zst.display()))?;
    let mut enc =
        zstd::Encoder::new(BufWriter::new(out), PAYLOAD_ZSTD_LEVEL).context("starting zstd")?;
    enc.include_contentsize(true).context("zstd options")?;
    enc.set_pledged_src_size(Some(len))
        .context("zstd pledged size")?;
    let mut raw_hash = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = src
            .read(&mut buf)
            .with_context(|| format!("reading {}", raw.display()))?;
        if n == 0 {
            break;
        }
        raw_hash.update(&buf[..n]);
        enc.write_all(&buf[..n])
            .with_context(|| format!("compressing into {}", zst.display()))?;
    }
    enc.finish()
        .and_then(|mut w| w.flush())
        .with_context(|| format!("finishing {}", zst.display()))?;
    let zst_hash = crate::build::sha256_file(&zst)?;
    let sums = dir.join(imgchannel::artifact::SUMS_FILE);
    fs::write(
        &sums,
        format!(
            "{}  {name}\n{zst_hash}  {name}.zst\n",
            hex::encode(raw_hash.finalize())
        ),
    )
    .with_context(|| format!("writing {}", sums.display()))?;
    let sig = imgchannel::sign_sums(&sums, key)
        .with_context(|| format!("signing {} with {}", sums.display(), key.display()))?;
    let signing = imgchannel::keys::load_signing_key(key)
        .with_context(|| format!("loading {}", key.display()))?;
    Ok(Payload {
        dir: dir.to_owned(),
        zst,
        sums,
        sig,
        pubkey_hex: hex::encode(signing.verifying_key().as_bytes()),
    })
}

/// One file of the image's root filesystem, read with `debugfs` (no mount).
pub fn read_from_ext4(image: &Path, path: &str) -> Result<Vec<u8>> {
    if !path.starts_with('/') || path.contains(['"', '\n', ' ']) {
        bail!("{path}: not a plain absolute path");
    }
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat \"{path}\""))
        .arg(image)
        .output()
        .with_context(|| format!("running debugfs on {}", image.display()))?;
    if !out.status.success() || out.stdout.is_empty() {
        bail!(
            "debugfs could not read {path} from {}: {}",
            image.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

/// A deterministic `newc` cpio writer: inode numbers count up from 1, every entry is
/// owned by root and dated `mtime`.
#[derive(Debug)]
pub struct Cpio<W: Write> {
    out: W,
    ino: u32,
    mtime: u32,
    written: u64,
}

impl<W: Write> Cpio<W> {
    pub fn new(out: W, mtime: i64) -> Cpio<W> {
        Cpio {
            out,
            ino: 0,
            mtime: mtime.clamp(0, i64::from(u32::MAX)) as u32,
            written: 0,
        }
    }

    fn pad(&mut self) -> Result<()> {
        let pad = (4 - (self.written % 4) as usize) % 4;
        self.out
            .write_all(&[0u8; 3][..pad])
            .context("writing cpio")?;
        self.written += pad as u64;
        Ok(())
    }

    fn header(&mut self, name: &str, mode: u32, size: u64, rdev: (u32, u32)) -> Result<()> {
        if size > u64::from(u32::MAX) {
            bail!("{name}: {size} bytes is too large for a newc cpio entry");
        }
        self.ino += 1;
        let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
        let h =
            format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino, mode, 0, 0, nlink, self.mtime, size, 0, 0, rdev.0, rdev.1,
            name.len() + 1, 0
        );
        self.out.write_all(h.as_bytes()).context("writing cpio")?;
        self.out
            .write_all(name.as_bytes())
            .context("writing cpio")?;
        self.out.write_all(&[0]).context("writing cpio")?;
        self.written += h.len() as u64 + name.len() as u64 + 1;
        self.pad()
    }

    pub fn dir(&mut self, name: &str) -> Result<()> {
        self.header(name, 0o040755, 0, (0, 0))
    }

    pub fn char_device(&mut self, name: &str, mode: u32, rdev: (u32, u32)) -> Result<()> {
        self.header(name, 0o020000 | mode, 0, rdev)
    }

    pub fn bytes(&mut self, name: &str, mode: u32, data: &[u8]) -> Result<()> {
        self.header(name, 0o100000 | mode, data.len() as u64, (0, 0))?;
        self.out.write_all(data).context("writing cpio")?;
        self.written += data.len() as u64;
        self.pad()
    }

    /// A file streamed from the build host.
    pub fn file(&mut self, name: &str, mode: u32, path: &Path) -> Result<()> {
        let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let len = f
            .metadata()
            .with_context(|| format!("reading {}", path.display()))?
            .len();
        self.header(name, 0o100000 | mode, len, (0, 0))?;
        let n = std::io::copy(&mut f, &mut self.out)
            .with_context(|| format!("copying {} into the cpio", path.display()))?;
        if n != len {
            bail!("{} changed size while being archived", path.display());
        }
        self.written += n;
        self.pad()
    }

    /// Writes the trailer and returns the writer.
    pub fn finish(mut self) -> Result<W> {
        self.header("TRAILER!!!", 0, 0, (0, 0))?;
        self.out.flush().context("writing cpio")?;
        Ok(self.out)
    }
}

/// What goes into an installer initrd.
#[derive(Debug, Clone)]
pub struct InitrdSpec<'a> {
    /// The image's initrd (compressed cpio).
    pub base_initrd: &'a Path,
    /// The image's root filesystem (ext4), for the installer's libraries.
    pub root_ext4: &'a Path,
    pub installer: &'a Path,
    pub payload: &'a Payload,
    /// Embed the payload (ISO) or only the key (PXE: fetched over HTTP).
    pub embed_payload: bool,
    /// Extra modules `(name, bytes)` loaded in order before udev starts (PXE: NIC).
    pub modules: Vec<(String, Vec<u8>)>,
    /// Other files `(path in the initramfs, mode, bytes)`; parent directories are
    /// created (PXE: `brd.ko` and `blockdev` for diskless boots).
    pub extra_files: Vec<(String, u32, Vec<u8>)>,
    pub epoch: i64,
}

/// Writes `out` = the image's initrd, zero-padded to 4 bytes, followed by an
/// uncompressed cpio with the installer (the kernel unpacks concatenated archives).
pub fn write_installer_initrd(spec: &InitrdSpec, out: &Path) -> Result<()> {
    let mut libs = Vec::new();
    for lib in INSTALLER_LIBS {
        libs.push((lib, read_from_ext4(spec.root_ext4, &format!("/{lib}"))?));
    }
    let mut w =
        BufWriter::new(File::create(out).with_context(|| format!("creating {}", out.display()))?);
    let mut base = File::open(spec.base_initrd)
        .with_context(|| format!("opening {}", spec.base_initrd.display()))?;
    let n = std::io::copy(&mut base, &mut w)
        .with_context(|| format!("copying {}", spec.base_initrd.display()))?;
    w.write_all(&[0u8; 3][..((4 - n % 4) % 4) as usize])
        .with_context(|| format!("writing {}", out.display()))?;
    let mut c = Cpio::new(w, spec.epoch);
    c.dir("dev")?;
    c.char_device("dev/console", 0o600, (5, 1))?;
    c.file(INSTALLER_PATH, 0o755, spec.installer)?;
    for (lib, bytes) in &libs {
        c.bytes(lib, 0o755, bytes)?;
    }
    c.dir("imgbuild")?;
    c.bytes(
        "imgbuild/pubkey",
        0o644,
        format!("{}\n", spec.payload.pubkey_hex).as_bytes(),
    )?;
    if !spec.modules.is_empty() {
        c.dir("imgbuild/modules")?;
        let mut order = String::new();
        for (name, bytes) in &spec.modules {
            c.bytes(&format!("imgbuild/modules/{name}"), 0o644, bytes)?;
            order.push_str(name);
            order.push('\n');
        }
        c.bytes("imgbuild/modules/order", 0o644, order.as_bytes())?;
    }
    let mut made_dirs = std::collections::BTreeSet::new();
    for (path, mode, bytes) in &spec.extra_files {
        if let Some((parent, _)) = path.rsplit_once('/') {
            if parent != "imgbuild" && made_dirs.insert(parent.to_owned()) {
                c.dir(parent)?;
            }
        }
        c.bytes(path, *mode, bytes)?;
    }
    if spec.embed_payload {
        c.dir("imgbuild/payload")?;
        for f in spec.payload.files() {
            let name = f
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            c.file(&format!("imgbuild/payload/{name}"), 0o644, f)?;
        }
    }
    let mut w = c.finish()?;
    w.flush()
        .with_context(|| format!("writing {}", out.display()))?;
    w.get_ref()
        .sync_all()
        .with_context(|| format!("syncing {}", out.display()))?;
    Ok(())
}

/// The build outputs install media are made from (all from one build).
#[derive(Debug, Clone)]
pub struct MediaInputs {
    /// `NAME-VERSION`
    pub stem: String,
    /// Shown in the boot menu.
    pub title: String,
    pub raw: PathBuf,
    pub root_ext4: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The recipe's kernel command line (only its `console=` words are used).
    pub recipe_cmdline: String,
    pub epoch: i64,
    /// Private key that signs the payload.
    pub key: PathBuf,
}

/// The kernel command line of the installer: `rdinit=`, `ro`, the recipe's `console=`
/// words (or serial and screen when it has none), plus `extra` (our own words only).
pub fn installer_cmdline(recipe_cmdline: &str, extra: &[&str]) -> String {
    // `ro`: a diskless boot hands this command line to the image's systemd, which must
    // keep the root read-only as on an installed disk.
    let mut words: Vec<&str> = vec!["rdinit=/imgbuild-install", "ro"];
    let consoles: Vec<&str> = recipe_cmdline
        .split_whitespace()
        .filter(|w| w.starts_with("console="))
        .collect();
    if consoles.is_empty() {
        words.extend(["console=tty0", "console=ttyS0,115200"]);
    } else {
        words.extend(consoles);
    }
    words.extend(extra);
    words.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lists (name, mode, size) of a newc archive, and its data.
    fn parse(mut d: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut off = 0usize;
        let full = d;
        loop {
            d = &full[off..];
            assert_eq!(&d[..6], b"070701", "at {off}");
            let field = |i: usize| {
                u32::from_str_radix(std::str::from_utf8(&d[6 + 8 * i..14 + 8 * i]).unwrap(), 16)
                    .unwrap()
            };
            let mode = field(1);
            let size = field(6) as usize;
            let nsize = field(11) as usize;
            let name = String::from_utf8(d[110..110 + nsize - 1].to_vec()).unwrap();
            let data_start = (off + 110 + nsize + 3) & !3;
            let data = full[data_start..data_start + size].to_vec();
            off = (data_start + size + 3) & !3;
            if name == "TRAILER!!!" {
                assert_eq!(off, full.len());
                return out;
            }
            out.push((name, mode, data));
        }
    }

    #[test]
    fn cpio_round_trips_and_is_deterministic() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        fs::write(&f, b"hello").unwrap();
        let make = || {
            let mut c = Cpio::new(Vec::new(), 1_700_000_000);
            c.dir("dev").unwrap();
            c.char_device("dev/console", 0o600, (5, 1)).unwrap();
            c.file("bin", 0o755, &f).unwrap();
            c.bytes("x/y", 0o644, b"abc").unwrap();
            c.finish().unwrap()
        };
        let a = make();
        assert_eq!(a, make());
        let entries = parse(&a);
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(names, ["dev", "dev/console", "bin", "x/y"]);
        assert_eq!(entries[1].1, 0o020600);
        assert_eq!(entries[2].1, 0o100755);
        assert_eq!(entries[2].2, b"hello");
        assert_eq!(entries[3].2, b"abc");
    }

    #[test]
    fn cmdline_keeps_only_console_words() {
        assert_eq!(
            installer_cmdline(
                "console=ttyS0,115200 root=/dev/x quiet",
                &["imgbuild.install=auto"]
            ),
            "rdinit=/imgbuild-install ro console=ttyS0,115200 imgbuild.install=auto"
        );
        assert!(installer_cmdline("quiet", &[]).contains("console=tty0 console=ttyS0,115200"));
    }

    #[test]
    fn payload_is_signed_and_records_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("n-1.raw");
        let bytes: Vec<u8> = (0..3 << 20).map(|i| (i / 4096) as u8).collect();
        fs::write(&raw, &bytes).unwrap();
        let key = dir.path().join("k");
        let info = imgchannel::generate(&key).unwrap();
        let p = make_payload(&raw, &dir.path().join("payload"), &key).unwrap();
        // The installer's own verifier accepts it, and finds size and hash.
        let v = imginstall::live::verify_payload(&p.dir, &p.pubkey_hex, None).unwrap();
        assert_eq!(v.image_len, bytes.len() as u64);
        assert_eq!(v.name, "n-1.raw");
        assert_eq!(v.image_sha256, crate::build::sha256_file(&raw).unwrap());
        assert_eq!(p.pubkey_hex, info.public_hex);
        // A pinned fingerprint that does not match is refused.
        assert!(imginstall::live::verify_payload(&p.dir, &p.pubkey_hex, Some("00")).is_err());
        // A flipped byte in the payload is refused.
        let mut z = fs::read(&p.zst).unwrap();
        let last = z.len() - 1;
        z[last] ^= 1;
        fs::write(&p.zst, z).unwrap();
        let e = imginstall::live::verify_payload(&p.dir, &p.pubkey_hex, None).unwrap_err();
        assert!(e.to_string().contains("sha256"), "{e:#}");
    }
}
