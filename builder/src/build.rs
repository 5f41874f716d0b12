//! `imgbuild build`: the pipeline, as a flat list of named steps.
//!
//! resolve -> compose -> filesystem -> disk -> outputs. Each step is a function below that
//! takes what the previous ones made. This module owns the order of steps, the work
//! directory and the output directory; it never writes an output that is not complete
//! (outputs are written under a temporary name and renamed when whole).

use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::artifacts::FetchOptions;
use crate::compose::{self, ComposeOptions, Composed};
use crate::disk::{self, DiskContents, DiskLayout, DiskSizes};
use crate::filesystem::{self, Ext4Spec};
use crate::progress::{self, run_capture, run_logged, Progress};
use crate::recipe::{Format, Recipe};
use imgdisk::esp::{EspFile, EspSource};
use imgformat::boot::{self as bootspec, BootEntry};
use imgformat::Slot;

/// Timestamp used for every file when neither `--source-date-epoch`, `SOURCE_DATE_EPOCH`
/// nor the recipe sets one: 2025-01-01T00:00:00Z. A fixed default keeps builds
/// reproducible without configuration.
pub const DEFAULT_EPOCH: i64 = 1_735_689_600;

/// Build an image from a recipe.
#[derive(Debug, Clone, clap::Args)]
pub struct BuildArgs {
    /// The recipe file (TOML; see docs/recipe.md).
    pub recipe: PathBuf,
    /// Directory for the outputs (created if missing).
    #[arg(short, long, default_value = "out")]
    pub output: PathBuf,
    /// Package cache reused across builds.
    #[arg(long, env = "IMGBUILD_CACHE", default_value = compose::DEFAULT_CACHE_DIR)]
    pub cache_dir: PathBuf,
    /// Timestamp for every file and filesystem (seconds since 1970); overrides the recipe.
    #[arg(long, env = "SOURCE_DATE_EPOCH")]
    pub source_date_epoch: Option<i64>,
    /// Directory holding pinned artifacts by file name (air-gapped builds); overrides the
    /// recipe's `downloads.mirror`.
    #[arg(long, value_name = "DIR")]
    pub mirror: Option<PathBuf>,
    /// Cache of downloaded artifacts, one file per sha256.
    #[arg(long, env = "IMGBUILD_ARTIFACT_CACHE", default_value = crate::artifacts::DEFAULT_ARTIFACT_CACHE)]
    pub artifact_cache: PathBuf,
    /// Keep the work directory (root tree, intermediate images) for inspection.
    #[arg(long)]
    pub keep_work: bool,
    /// Sign SHA256SUMS with this ed25519 key (`imgbuild keys generate`); without it the
    /// outputs are marked unsigned.
    #[arg(long)]
    pub key: Option<PathBuf>,
}

/// What a build made.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BuildReport {
    pub name: String,
    pub version: String,
    pub recipe_digest: String,
    pub kernel_version: String,
    pub source_date_epoch: i64,
    /// Output files with sha256 and size, as listed in SHA256SUMS.
    pub artifacts: Vec<Artifact>,
    pub packages: Vec<String>,
    /// Whether SHA256SUMS carries a signature (SHA256SUMS.sig).
    #[serde(default)]
    pub signed: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Artifact {
    pub file: String,
    pub sha256: String,
    pub size: u64,
}

impl BuildReport {
    pub fn artifact(&self, suffix: &str) -> Option<&Artifact> {
        self.artifacts.iter().find(|a| a.file.ends_with(suffix))
    }
}

/// Output file names for a recipe stem.
#[derive(Debug, Clone)]
pub struct OutputNames {
    pub raw: PathBuf,
    pub qcow2: PathBuf,
    pub root: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub manifest: PathBuf,
    pub sums: PathBuf,
    /// `formats = ["iso"]`: the installer ISO.
    pub iso: PathBuf,
    /// `formats = ["pxe"]`: the network-boot directory.
    pub pxe: PathBuf,
}

impl OutputNames {
    pub fn new(dir: &Path, stem: &str) -> OutputNames {
        OutputNames {
            raw: dir.join(format!("{stem}.raw")),
            qcow2: dir.join(format!("{stem}.qcow2")),
            root: dir.join(format!("{stem}.root.ext4")),
            kernel: dir.join(format!("{stem}.vmlinuz")),
            initrd: dir.join(format!("{stem}.initrd")),
            manifest: dir.join(format!("{stem}.manifest.json")),
            sums: dir.join("SHA256SUMS"),
            iso: dir.join(format!("{stem}.iso")),
            pxe: dir.join(format!("{stem}.pxe")),
        }
    }
}

/// Run the whole pipeline.
pub fn build(args: &BuildArgs, progress: &Progress) -> Result<BuildReport> {
    // resolve: everything that can be wrong with the input is found before any work.
    let recipe = Recipe::load(&args.recipe)?;
    let epoch = args
        .source_date_epoch
        .or(recipe.image.source_date_epoch)
        .unwrap_or(DEFAULT_EPOCH);
    let wants_media =
        recipe.formats.contains(&Format::Iso) || recipe.formats.contains(&Format::Pxe);
    if wants_media && args.key.is_none() {
        bail!(
            "{} asks for iso/pxe output: build with --key KEY, the installer refuses unsigned payloads",
            recipe.path.display()
        );
    }
    preflight(&recipe)?;
    if let Some(key) = &args.key {
        imgchannel::keys::load_signing_key(key)
            .with_context(|| format!("checking the signing key {}", key.display()))?;
    }
    fs::create_dir_all(&args.output)
        .with_context(|| format!("creating output directory {}", args.output.display()))?;
    let out_dir = args
        .output
        .canonicalize()
        .with_context(|| format!("resolving {}", args.output.display()))?;
    let stem = recipe.stem();
    let names = OutputNames::new(&out_dir, &stem);
    let log = progress::log_path(&out_dir, &stem);
    fs::write(&log, format!("imgbuild build {}\n", recipe.path.display()))
        .with_context(|| format!("creating build log {}", log.display()))?;
    let work = out_dir.join(format!(".work-{stem}"));
    if work.exists() {
        fs::remove_dir_all(&work)
            .with_context(|| format!("removing stale work directory {}", work.display()))?;
    }
    fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;

    let result = run_steps(&recipe, args, progress, &names, &work, &log, epoch);
    if result.is_ok() && !args.keep_work {
        fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    } else if result.is_err() {
        eprintln!(
            "imgbuild: work directory kept for inspection: {} (build log: {})",
            work.display(),
            log.display()
        );
    }
    result
}

fn run_steps(
    recipe: &Recipe,
    args: &BuildArgs,
    progress: &Progress,
    names: &OutputNames,
    work: &Path,
    log: &Path,
    epoch: i64,
) -> Result<BuildReport> {
    // compose
    let step = progress.step("compose");
    let composed = compose::compose(
        recipe,
        &work.join("root"),
        &ComposeOptions {
            cache_dir: args.cache_dir.clone(),
            artifacts: FetchOptions {
                cache_dir: args.artifact_cache.clone(),
                mirror: args.mirror.clone(),
            },
            epoch,
            log: log.to_path_buf(),
        },
        &step,
    )?;
    let packages = package_list(&composed.root)?;
    step.done(&format!(
        "{} packages, kernel {}",
        packages.len(),
        composed.kernel_version
    ));

    // filesystem
    let step = progress.step("filesystem");
    step.message("normalising timestamps");
    filesystem::normalize_tree(&composed.root, epoch)?;
    let root_img = work.join("root.ext4");
    step.message("mkfs.ext4 -d (root)");
    filesystem::make_ext4(
        &Ext4Spec {
            source: &composed.root,
            label: "root",
            uuid: derived_uuid(recipe, "root-fs"),
            // Stable across versions of the image (see filesystem::make_ext4): deltas
            // between versions then carry no metadata checksum churn.
            hash_seed: disk::derive_uuid(&recipe.image.name, "root-fs-seeds"),
            size: recipe.disk.root_size,
            epoch,
            journal: false,
        },
        &root_img,
        0,
    )
    .map_err(|e| match e.downcast_ref::<filesystem::FilesystemError>() {
        Some(too_large @ filesystem::FilesystemError::TreeTooLarge { .. }) => anyhow::anyhow!(
            "{too_large}; raise disk.root_size in {}",
            recipe.path.display()
        ),
        _ => e.context("making the root filesystem"),
    })?;
    step.done(&format!("root image {} MiB", recipe.disk.root_size >> 20));

    // disk
    let step = progress.step("disk");
    let layout = DiskLayout::plan(
        &DiskSizes {
            esp: recipe.disk.esp_size,
            root: recipe.disk.root_size,
            var: recipe.disk.var_size,
        },
        &recipe.id_seed(),
    )?;
    let esp_files = esp_files(recipe, &composed)?;
    step.message("GPT, ESP, slot A, var");
    let raw_tmp = work.join("disk.raw");
    disk::write_disk(
        &raw_tmp,
        &layout,
        &DiskContents {
            esp_files: &esp_files,
            root_a: &root_img,
            var_tree: Some(&composed.root.join("var")),
            seed: &recipe.id_seed(),
            epoch,
        },
    )?;
    step.done(&format!("{} MiB GPT disk", layout.total_size >> 20));

    // outputs
    let step = progress.step("outputs");
    let mut made: Vec<PathBuf> = Vec::new();
    // Every disk output is made from the raw disk; without `raw` in `formats` it stays
    // in the work directory and goes with it.
    let raw = if recipe.formats.contains(&Format::Raw) {
        publish_file(&raw_tmp, &names.raw)?;
        made.push(names.raw.clone());
        names.raw.clone()
    } else {
        raw_tmp
    };
    if recipe.formats.contains(&Format::Qcow2) {
        step.message("qemu-img convert -O qcow2");
        let tmp = work.join("disk.qcow2");
        run_logged(
            Command::new("qemu-img")
                .args(["convert", "-f", "raw", "-O", "qcow2"])
                .arg(&raw)
                .arg(&tmp),
            log,
            &step,
        )?;
        publish_file(&tmp, &names.qcow2)?;
        made.push(names.qcow2.clone());
    }
    publish_file(&root_img, &names.root)?;
    made.push(names.root.clone());
    copy_output(&composed.kernel, &names.kernel)?;
    made.push(names.kernel.clone());
    copy_output(&composed.initrd, &names.initrd)?;
    made.push(names.initrd.clone());
    if let (true, Some(key)) = (
        recipe.formats.contains(&Format::Iso) || recipe.formats.contains(&Format::Pxe),
        &args.key,
    ) {
        let media = crate::installer::MediaInputs {
            stem: recipe.stem(),
            title: recipe.image.pretty_name.clone(),
            raw: raw.clone(),
            root_ext4: names.root.clone(),
            kernel: names.kernel.clone(),
            initrd: names.initrd.clone(),
            recipe_cmdline: recipe.kernel.cmdline.clone(),
            epoch,
            key: key.clone(),
        };
        if recipe.formats.contains(&Format::Iso) {
            step.message("installer ISO (payload, initrd, EFI image, xorriso)");
            crate::iso::build_iso(&media, &work.join("iso"), &names.iso)?;
            made.push(names.iso.clone());
        }
        if recipe.formats.contains(&Format::Pxe) {
            step.message("PXE directory (payload, initrd, boot.ipxe)");
            crate::pxe::build_pxe(&media, &work.join("pxe"), &names.pxe)?;
            let mut files: Vec<PathBuf> = fs::read_dir(&names.pxe)
                .with_context(|| format!("listing {}", names.pxe.display()))?
                .map(|e| e.map(|e| e.path()))
                .collect::<std::io::Result<_>>()
                .with_context(|| format!("listing {}", names.pxe.display()))?;
            files.sort();
            made.extend(files);
        }
    }

    let mut artifacts = Vec::new();
    for path in &made {
        step.message(&format!("sha256 {}", path.display()));
        artifacts.push(Artifact {
            // Relative to the output directory: `NAME.pxe/initrd.img` for PXE files.
            file: path
                .strip_prefix(names.sums.parent().unwrap_or(Path::new("")))
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_else(|_| file_name(path)),
            sha256: sha256_file(path)?,
            size: fs::metadata(path)
                .with_context(|| format!("reading {}", path.display()))?
                .len(),
        });
    }
    let report = BuildReport {
        name: recipe.image.name.clone(),
        version: recipe.image.version.clone(),
        recipe_digest: recipe.digest.clone(),
        kernel_version: composed.kernel_version.clone(),
        source_date_epoch: epoch,
        artifacts,
        packages,
        signed: args.key.is_some(),
    };
    write_atomic(
        &names.manifest,
        &serde_json::to_vec_pretty(&report).context("serialising the manifest")?,
    )?;
    let mut listed = report.artifacts.clone();
    listed.push(Artifact {
        file: file_name(&names.manifest),
        sha256: sha256_file(&names.manifest)?,
        size: 0,
    });
    write_sums(&names.sums, &listed)?;
    let sig = names.sums.with_extension("sig");
    let unsigned_marker = names.sums.with_file_name("UNSIGNED");
    match &args.key {
        Some(key) => {
            step.message("signing SHA256SUMS");
            imgchannel::sign_sums(&names.sums, key).with_context(|| {
                format!("signing {} with {}", names.sums.display(), key.display())
            })?;
            let _ = fs::remove_file(&unsigned_marker);
        }
        None => {
            let _ = fs::remove_file(&sig);
            write_atomic(
                &unsigned_marker,
                b"These outputs are not signed: build with --key KEY to sign SHA256SUMS.\n",
            )?;
            if !progress.is_quiet() {
                eprintln!(
                    "    outputs are UNSIGNED (no --key): see {}",
                    unsigned_marker.display()
                );
            }
        }
    }
    step.done(&format!(
        "{} files in {}",
        listed.len() + 1,
        names
            .sums
            .parent()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    ));
    Ok(report)
}

/// Host tools and privileges the build needs; checked before any work.
fn preflight(recipe: &Recipe) -> Result<()> {
    // Rows of `imgbuild doctor`'s table, so both name the same packages.
    let mut names = vec![
        "mmdebstrap",
        "mkfs.ext4",
        "debugfs",
        "systemctl",
        "dpkg-query",
    ];
    if recipe.formats.contains(&Format::Qcow2) {
        names.push("qemu-img");
    }
    if recipe.formats.contains(&Format::Iso) {
        names.push("xorriso");
    }
    if recipe.update.is_some() {
        names.push("strip");
    }
    let missing = crate::doctor::missing(&names, &crate::doctor::Host::current());
    if !missing.is_empty() {
        let tools: Vec<&str> = missing.iter().map(|r| r.name).collect();
        let mut packages: Vec<&str> = Vec::new();
        for r in &missing {
            if !packages.contains(&r.package) {
                packages.push(r.package);
            }
        }
        bail!(
            "missing host tools: {}; install them with: apt-get install -y {}",
            tools.join(", "),
            packages.join(" ")
        );
    }
    if !nix::unistd::Uid::effective().is_root() {
        bail!("imgbuild build must run as root: mmdebstrap needs it to create files owned by the image's users (no mounts or loop devices are used)");
    }
    Ok(())
}

/// Look an executable up in PATH.
pub fn find_in_path(tool: &str) -> Option<PathBuf> {
    imgqemu::find_in_path(tool, &std::env::var_os("PATH")?)
}

/// UUID derived from the recipe (never random): same recipe, same UUID.
pub fn derived_uuid(recipe: &Recipe, what: &str) -> Uuid {
    disk::derive_uuid(&recipe.id_seed(), what)
}

/// The ESP: systemd-boot from the image itself (so it matches the image's
/// systemd-bless-boot), the loader configuration, slot A's kernel, initrd and entry.
fn esp_files(recipe: &Recipe, composed: &Composed) -> Result<Vec<EspFile>> {
    let sd_boot = composed
        .root
        .join("usr/lib/systemd/boot/efi/systemd-bootx64.efi");
    if !sd_boot.is_file() {
        bail!(
            "{} is missing: the image needs systemd-boot-efi (pulled in by systemd-boot)",
            sd_boot.display()
        );
    }
    let entry = BootEntry {
        slot: Slot::A,
        title: recipe.image.pretty_name.clone(),
        version: recipe.image.version.clone(),
        cmdline: recipe.kernel.cmdline.clone(),
        tries: None,
    };
    Ok(vec![
        EspFile::file(bootspec::FALLBACK_LOADER_PATH, sd_boot.clone()),
        EspFile::file(bootspec::SYSTEMD_BOOT_PATH, sd_boot),
        EspFile::bytes(
            bootspec::LOADER_CONF_PATH,
            bootspec::LoaderConf::default().render(),
        ),
        EspFile {
            path: bootspec::kernel_path(Slot::A)
                .trim_start_matches('/')
                .into(),
            source: EspSource::File(composed.kernel.clone()),
        },
        EspFile {
            path: bootspec::initrd_path(Slot::A)
                .trim_start_matches('/')
                .into(),
            source: EspSource::File(composed.initrd.clone()),
        },
        EspFile {
            path: format!("loader/entries/{}", entry.file_name()),
            source: EspSource::Bytes(
                entry
                    .render()
                    .context("rendering slot A's boot entry")?
                    .into_bytes(),
            ),
        },
    ])
}

/// `name=version` of every installed package, from the image's dpkg database.
fn package_list(root: &Path) -> Result<Vec<String>> {
    let out = run_capture(
        Command::new("dpkg-query")
            .arg(format!(
                "--admindir={}",
                root.join("var/lib/dpkg").display()
            ))
            .args(["-W", "-f", "${Package}=${Version}\\n"]),
    )?;
    let mut v: Vec<String> = out.lines().map(String::from).collect();
    v.sort();
    Ok(v)
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Move a finished file from the work directory into place (same file system).
fn publish_file(from: &Path, to: &Path) -> Result<()> {
    fs::rename(from, to).with_context(|| format!("moving {} to {}", from.display(), to.display()))
}

fn copy_output(from: &Path, to: &Path) -> Result<()> {
    let tmp = to.with_extension("partial");
    fs::copy(from, &tmp)
        .with_context(|| format!("copying {} to {}", from.display(), tmp.display()))?;
    fs::rename(&tmp, to).with_context(|| format!("renaming {} to {}", tmp.display(), to.display()))
}

fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension("partial");
    fs::write(&tmp, data).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).with_context(|| format!("reading {}", path.display()))?;
    Ok(hex::encode(h.finalize()))
}

/// `SHA256SUMS` in the format `sha256sum -c` reads.
fn write_sums(path: &Path, artifacts: &[Artifact]) -> Result<()> {
    let mut sorted: Vec<&Artifact> = artifacts.iter().collect();
    sorted.sort_by(|a, b| a.file.cmp(&b.file));
    let tmp = path.with_extension("partial");
    let mut w = BufWriter::new(
        fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?,
    );
    for a in sorted {
        writeln!(w, "{}  {}", a.sha256, a.file)
            .with_context(|| format!("writing {}", tmp.display()))?;
    }
    w.flush()
        .with_context(|| format!("writing {}", tmp.display()))?;
    drop(w);
    fs::rename(&tmp, path).with_context(|| format!("renaming {}", tmp.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_are_sorted_and_checkable() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("b.raw"), "b").unwrap();
        fs::write(dir.path().join("a.qcow2"), "a").unwrap();
        let arts: Vec<Artifact> = ["b.raw", "a.qcow2"]
            .iter()
            .map(|f| Artifact {
                file: f.to_string(),
                sha256: sha256_file(&dir.path().join(f)).unwrap(),
                size: 1,
            })
            .collect();
        write_sums(&dir.path().join("SHA256SUMS"), &arts).unwrap();
        let text = fs::read_to_string(dir.path().join("SHA256SUMS")).unwrap();
        assert!(text.find("a.qcow2").unwrap() < text.find("b.raw").unwrap());
        let ok = Command::new("sha256sum")
            .args(["-c", "SHA256SUMS"])
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(
            ok.status.success(),
            "{}",
            String::from_utf8_lossy(&ok.stdout)
        );
    }

    #[test]
    fn derived_uuids_are_stable_and_distinct() {
        let r = Recipe::parse(
            Path::new("r.toml"),
            "[image]\nname = \"a\"\nversion = \"1\"\n",
        )
        .unwrap();
        assert_eq!(derived_uuid(&r, "root-fs"), derived_uuid(&r, "root-fs"));
        assert_ne!(derived_uuid(&r, "root-fs"), derived_uuid(&r, "var-fs"));
        let r2 = Recipe::parse(
            Path::new("r.toml"),
            "[image]\nname = \"a\"\nversion = \"2\"\n",
        )
        .unwrap();
        assert_ne!(derived_uuid(&r, "root-fs"), derived_uuid(&r2, "root-fs"));
    }

    #[test]
    fn install_media_need_a_signing_key() {
        let dir = tempfile::tempdir().unwrap();
        let recipe = dir.path().join("iso.toml");
        fs::write(
            &recipe,
            "[image]\nname = \"x\"\nversion = \"1\"\n[output]\nformats = [\"iso\"]\n",
        )
        .unwrap();
        let out = dir.path().join("out");
        let err = build(
            &BuildArgs {
                recipe,
                output: out.clone(),
                cache_dir: dir.path().join("cache"),
                source_date_epoch: None,
                keep_work: false,
                key: None,
                mirror: None,
                artifact_cache: dir.path().join("artifacts"),
            },
            &Progress::new(true),
        )
        .unwrap_err();
        assert!(err.to_string().contains("--key"), "{err:#}");
        assert!(!out.exists(), "refused before any work");
    }

    #[test]
    fn bad_recipe_stops_before_any_work() {
        let dir = tempfile::tempdir().unwrap();
        let recipe = dir.path().join("bad.toml");
        fs::write(
            &recipe,
            "[image]\nname = \"x\"\nversion = \"1\"\n[disk]\nroot_size = \"huge\"\n",
        )
        .unwrap();
        let out = dir.path().join("out");
        let err = build(
            &BuildArgs {
                recipe: recipe.clone(),
                output: out.clone(),
                cache_dir: dir.path().join("cache"),
                source_date_epoch: None,
                mirror: None,
                artifact_cache: dir.path().join("artifacts"),
                keep_work: false,
                key: None,
            },
            &Progress::new(true),
        )
        .unwrap_err();
        assert!(err.to_string().contains("disk.root_size"), "{err:#}");
        assert!(!out.exists(), "no output directory for a bad recipe");
        assert!(!dir.path().join("cache").exists(), "no cache touched");
    }
}
