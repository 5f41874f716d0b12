//! `imgbuild publish --channel DIR OUT/`: add a built version to an update channel.
//!
//! Owns turning a build's output directory into a release: it reads the build manifest,
//! checks the root image against it, makes the chunk index and the chunk pack (the image
//! as one zstd frame per run of chunks; published as the image target, so nodes can
//! fetch single chunks by Range and old readers still stream it whole), makes deltas from the K
//! newest published versions (their images are read back from the channel through the
//! verified TUF path, never from unverified files), and hands everything to
//! `imgchannel::publish`, which signs. It never signs anything itself and never changes
//! the build outputs.

use std::fs;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use imgchannel::channel::{self as chan, DeltaInput, ReleaseInput, SigningKeys};
use imgchannel::cli::ExpiryArgs;
use imgformat::chunk::ChunkIndex;
use imgformat::pack::{self, PackOptions};
use imgformat::release;

use crate::build::{sha256_file, BuildReport};
use crate::delta::{self, DeltaOptions};
use crate::progress::Progress;

/// Publish a built version (the output directory of `imgbuild build`) into a channel.
///
/// Adds the zstd-compressed root image (a chunk pack: one zstd frame per run of chunks), its
/// chunk index, deltas from the newest
/// published versions and a signed release manifest. Refuses a version already
/// published and, without --allow-downgrade, a version older than the newest.
#[derive(Debug, Clone, clap::Args)]
pub struct PublishArgs {
    /// Output directory of `imgbuild build` (holds NAME-VERSION.manifest.json).
    pub out: PathBuf,
    /// Channel directory (made by `imgbuild channel init`).
    #[arg(long)]
    pub channel: PathBuf,
    /// Signing keys for the targets, snapshot and timestamp roles (repeat for several).
    #[arg(long, required = true)]
    pub key: Vec<PathBuf>,
    /// Which version in OUT to publish when it holds several builds.
    #[arg(long)]
    pub version: Option<String>,
    /// Make deltas from this many of the newest published versions.
    #[arg(long, default_value = "3")]
    pub deltas: usize,
    /// Oldest version allowed to update straight to this one.
    #[arg(long)]
    pub min_update_from: Option<String>,
    /// Release notes file.
    #[arg(long)]
    pub notes: Option<PathBuf>,
    /// Publish a version older than the newest, making it the channel's max version.
    #[arg(long)]
    pub allow_downgrade: bool,
    /// zstd level for the chunk pack (the full image) and the deltas.
    #[arg(long, default_value = "19")]
    pub zstd_level: i32,
    /// Work directory for chunk index and deltas [default: OUT/.publish-VERSION].
    #[arg(long)]
    pub work: Option<PathBuf>,
    #[command(flatten)]
    pub expiry: ExpiryArgs,
}

/// The build to publish, found in an output directory.
#[derive(Debug, Clone)]
pub struct BuiltVersion {
    pub report: BuildReport,
    pub root_image: PathBuf,
}

/// Find the build manifest in `out` (the one for `version`, or the only one).
pub fn find_build(out: &Path, version: Option<&str>) -> Result<BuiltVersion> {
    let mut manifests = Vec::new();
    for entry in fs::read_dir(out).with_context(|| format!("reading {}", out.display()))? {
        let path = entry
            .with_context(|| format!("reading {}", out.display()))?
            .path();
        if path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(".manifest.json"))
        {
            let text =
                fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            let report: BuildReport = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a build manifest", path.display()))?;
            manifests.push(report);
        }
    }
    let report = match (version, manifests.len()) {
        (_, 0) => bail!(
            "{} holds no NAME-VERSION.manifest.json: is it an `imgbuild build` output directory?",
            out.display()
        ),
        (Some(v), _) => manifests
            .into_iter()
            .find(|m| m.version == v)
            .with_context(|| format!("{} holds no build of version {v}", out.display()))?,
        (None, 1) => manifests.remove(0),
        (None, n) => bail!(
            "{} holds {n} builds ({}); choose one with --version",
            out.display(),
            manifests
                .iter()
                .map(|m| m.version.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let file = format!("{}-{}.root.ext4", report.name, report.version);
    let root_image = out.join(&file);
    let listed = report
        .artifact(".root.ext4")
        .with_context(|| format!("the build manifest lists no {file}"))?;
    let actual = sha256_file(&root_image)?;
    if actual != listed.sha256 {
        bail!(
            "{} does not match its build manifest: sha256 {actual}, manifest says {}",
            root_image.display(),
            listed.sha256
        );
    }
    Ok(BuiltVersion { report, root_image })
}

/// Run `imgbuild publish`.
pub fn publish(args: &PublishArgs, progress: &Progress) -> Result<()> {
    let built = find_build(&args.out, args.version.as_deref())?;
    let (name, version) = (&built.report.name, &built.report.version);
    let keys = SigningKeys::new(args.key.iter().cloned())?;
    let index = chan::local_index(&args.channel)
        .with_context(|| format!("reading channel {}", args.channel.display()))?;
    if index.find(version).is_some() {
        bail!(
            "{name} {version} is already published in {}",
            args.channel.display()
        );
    }
    let work = args
        .work
        .clone()
        .unwrap_or_else(|| args.out.join(format!(".publish-{version}")));
    if work.exists() {
        fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    }
    fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;

    let step = progress.step("chunk index and pack");
    let packed = chunk_pack(
        &built.root_image,
        name,
        version,
        &work,
        &PackOptions {
            level: args.zstd_level,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            ..PackOptions::default()
        },
    )?;
    step.done(&format!(
        "{} chunks in {} frames, pack {:.1} MiB",
        packed.index.chunks.len(),
        packed.index.frames().len(),
        packed.pack_size as f64 / (1 << 20) as f64
    ));

    let mut deltas = Vec::new();
    let bases: Vec<String> = index
        .delta_bases(version, args.deltas)
        .into_iter()
        .map(String::from)
        .collect();
    if !bases.is_empty() {
        let trusted = args.channel.join("metadata/1.root.json");
        let base_url = format!("file://{}", fs::canonicalize(&args.channel)?.display());
        let channel = chan::load(&base_url, &trusted).with_context(|| {
            format!(
                "loading channel {} to read older images",
                args.channel.display()
            )
        })?;
        for from in &bases {
            let step = progress.step(&format!("delta {from} -> {version}"));
            let old_zst = work.join(format!("{from}.root.img.zst"));
            step.message("reading the old image from the channel (verified)");
            channel
                .save_target(&release::image_target(name, from), &old_zst)
                .with_context(|| format!("reading {name} {from} from the channel"))?;
            let old = work.join(format!("{from}.root.img"));
            decompress(&old_zst, &old)?;
            fs::remove_file(&old_zst).ok();
            let out = work.join(release::delta_target(name, from, version));
            step.message("diffing");
            let stats = delta::make_delta(
                &old,
                &built.root_image,
                &out,
                &DeltaOptions {
                    level: args.zstd_level,
                    ..DeltaOptions::default()
                },
            )
            .with_context(|| format!("making the delta {from} -> {version}"))?;
            fs::remove_file(&old).ok();
            step.done(&format!(
                "{:.1} MiB ({} files diffed)",
                stats.delta_size as f64 / (1 << 20) as f64,
                stats.files_same_path + stats.files_renamed
            ));
            deltas.push(DeltaInput {
                from_version: from.clone(),
                path: out,
            });
        }
    }

    let step = progress.step("publish");
    step.message("compressing the image and signing");
    let release_notes = match &args.notes {
        Some(p) => fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        None => String::new(),
    };
    let published = chan::publish_packed(
        &args.channel,
        &keys,
        &ReleaseInput {
            name: name.clone(),
            version: version.clone(),
            recipe_digest: built.report.recipe_digest.clone(),
            image: built.root_image.clone(),
            chunk_index: Some(packed.index_path.clone()),
            deltas,
            min_update_from: args.min_update_from.clone(),
            release_notes,
            allow_downgrade: args.allow_downgrade,
            zstd_level: args.zstd_level,
        },
        &packed.pack_path,
        &args.expiry.policy(),
    )
    .with_context(|| format!("publishing {version} into {}", args.channel.display()))?;
    fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    step.done(&format!(
        "{name} {version} published (targets version {}){}",
        published.targets_version,
        if published.downgrade {
            "; downgrade: max_version set"
        } else {
            ""
        }
    ));
    Ok(())
}

/// A chunk index and the chunk pack it describes, ready to publish.
#[derive(Debug, Clone)]
pub struct ChunkPack {
    /// The chunk index (version 2, naming the pack), as JSON in `index_path`.
    pub index: ChunkIndex,
    pub index_path: PathBuf,
    /// The pack, to publish as the image target [`release::image_target`].
    pub pack_path: PathBuf,
    pub pack_size: u64,
}

/// Cut `image` into chunks and write its chunk pack and index into `work`, named as the
/// channel targets of `name` `version`.
pub fn chunk_pack(
    image: &Path,
    name: &str,
    version: &str,
    work: &Path,
    opts: &PackOptions,
) -> Result<ChunkPack> {
    let mut index = delta::chunk_index(image)?;
    let target = release::image_target(name, version);
    let pack_path = work.join(&target);
    let input = fs::File::open(image).with_context(|| format!("opening {}", image.display()))?;
    let out = fs::File::create(&pack_path)
        .with_context(|| format!("creating {}", pack_path.display()))?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, out);
    let info = pack::write_pack(
        BufReader::with_capacity(1 << 20, input),
        &mut index,
        &target,
        opts,
        &mut out,
    )
    .with_context(|| format!("writing the chunk pack of {}", image.display()))?;
    out.into_inner()
        .map_err(|e| e.into_error())
        .and_then(|f| f.sync_all())
        .with_context(|| format!("writing {}", pack_path.display()))?;
    // The index is JSON in one zstd frame (readers recognise the zstd magic): at -19 a
    // 1 GiB image's index shrinks from 5.2 MB to 1.3 MB, and a node on the chunk path
    // fetches two of them.
    let index_path = work.join(release::chunk_index_target(name, version));
    let json = index.to_json().context("serialising the chunk index")?;
    fs::write(
        &index_path,
        zstd::bulk::compress(&json, 19).context("compressing the chunk index")?,
    )
    .with_context(|| format!("writing {}", index_path.display()))?;
    Ok(ChunkPack {
        index,
        index_path,
        pack_path,
        pack_size: info.size,
    })
}

fn decompress(from: &Path, to: &Path) -> Result<()> {
    let input = fs::File::open(from).with_context(|| format!("opening {}", from.display()))?;
    let mut dec = zstd::Decoder::new(BufReader::new(input))
        .with_context(|| format!("reading {}", from.display()))?;
    let mut out = fs::File::create(to).with_context(|| format!("creating {}", to.display()))?;
    std::io::copy(&mut dec, &mut out)
        .with_context(|| format!("decompressing {}", from.display()))?;
    Ok(())
}
