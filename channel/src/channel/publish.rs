//! Publishing a release into a channel: its image (or chunk pack), chunk index, deltas,
//! release manifest and the updated channel index, as new TUF targets.

use super::*;

/// Compresses `src` with zstd into `dst`, returning (sha256, size) of `src` and of `dst`.
fn compress_image(
    src: &Path,
    dst: &Path,
    level: i32,
) -> anyhow::Result<((String, u64), (String, u64))> {
    struct Hashing<R> {
        inner: R,
        hash: Sha256,
        n: u64,
    }
    impl<R: Read> Read for Hashing<R> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.inner.read(buf)?;
            self.hash.update(&buf[..n]);
            self.n += n as u64;
            Ok(n)
        }
    }
    let f = fs::File::open(src).with_context(|| format!("opening {}", src.display()))?;
    let mut reader = Hashing {
        inner: BufReader::with_capacity(1 << 20, f),
        hash: Sha256::new(),
        n: 0,
    };
    let out = fs::File::create(dst).with_context(|| format!("creating {}", dst.display()))?;
    let mut enc = zstd::Encoder::new(BufWriter::with_capacity(1 << 20, out), level)
        .with_context(|| format!("starting zstd for {}", dst.display()))?;
    enc.include_checksum(true)
        .with_context(|| format!("configuring zstd for {}", dst.display()))?;
    std::io::copy(&mut reader, &mut enc)
        .with_context(|| format!("compressing {} into {}", src.display(), dst.display()))?;
    enc.finish()
        .and_then(|mut w| w.flush())
        .with_context(|| format!("writing {}", dst.display()))?;
    let raw = (hex::encode(reader.hash.finalize()), reader.n);
    let compressed = (
        crate::artifact::sha256_file(dst).with_context(|| format!("hashing {}", dst.display()))?,
        fs::metadata(dst)
            .with_context(|| format!("reading the size of {}", dst.display()))?
            .len(),
    );
    Ok((raw, compressed))
}

/// Publishes a release into the channel in `dir`: the compressed image, chunk index,
/// deltas, its manifest and the updated channel index, as new targets; older releases'
/// targets stay. targets, snapshot and timestamp versions each go up by one.
pub fn publish(
    dir: &Path,
    keys: &SigningKeys,
    release: &ReleaseInput,
    expiry: &ExpiryPolicy,
) -> Result<Published, PublishError> {
    publish_with(dir, keys, release, None, expiry)
}

/// As [`publish`], with the image already compressed: `pack` (a chunk pack, see
/// `imgformat::pack`: concatenated zstd frames that decode to `release.image`) is published
/// as the image target as is, instead of a fresh single-frame compression. The builder
/// made it and checked every chunk of it against the image; this only hashes both files.
pub fn publish_packed(
    dir: &Path,
    keys: &SigningKeys,
    release: &ReleaseInput,
    pack: &Path,
    expiry: &ExpiryPolicy,
) -> Result<Published, PublishError> {
    publish_with(dir, keys, release, Some(pack), expiry)
}

fn publish_with(
    dir: &Path,
    keys: &SigningKeys,
    release: &ReleaseInput,
    pack: Option<&Path>,
    expiry: &ExpiryPolicy,
) -> Result<Published, PublishError> {
    check_name("image name", &release.name)?;
    check_name("version", &release.version)?;
    for d in &release.deltas {
        check_name("delta source version", &d.from_version)?;
    }
    let layout = Layout::new(dir);
    let _lock = layout.lock()?;
    let (_, root_path) = layout.latest_root()?;
    runtime()?.block_on(publish_async(
        &layout, &root_path, keys, release, pack, expiry,
    ))
}

async fn publish_async(
    layout: &Layout,
    root_path: &Path,
    keys: &SigningKeys,
    release: &ReleaseInput,
    pack: Option<&Path>,
    expiry: &ExpiryPolicy,
) -> Result<Published, PublishError> {
    let repo = load_local(layout, root_path).await?;
    let mut index = read_index(&repo).await?;
    let version = release.version.as_str();
    if index.find(version).is_some() {
        return Err(PublishError::AlreadyPublished {
            version: version.to_owned(),
        });
    }
    let newest = index.newest().map(|r| r.version.clone());
    let downgrade = matches!(&newest, Some(n) if compare_versions(version, n) == Ordering::Less);
    if downgrade && !release.allow_downgrade {
        return Err(PublishError::Downgrade {
            version: version.to_owned(),
            newest: newest.unwrap_or_default(),
        });
    }
    for d in &release.deltas {
        if index.find(&d.from_version).is_none() {
            return Err(PublishError::UnknownDeltaBase {
                from: d.from_version.clone(),
            });
        }
    }

    let staging = tempfile::Builder::new()
        .prefix(".staging-")
        .tempdir_in(&layout.dir)
        .with_context(|| format!("creating a staging directory in {}", layout.dir.display()))?;
    let name = release.name.as_str();

    let image_name = release::image_target(name, version);
    let (image_path, (sha256, size), compressed_size) = match pack {
        Some(pack) => {
            let raw = crate::artifact::sha256_file(&release.image)
                .with_context(|| format!("hashing {}", release.image.display()))?;
            let size = fs::metadata(&release.image)
                .with_context(|| format!("reading the size of {}", release.image.display()))?
                .len();
            let packed = fs::metadata(pack)
                .with_context(|| format!("reading the size of {}", pack.display()))?
                .len();
            (pack.to_path_buf(), (raw, size), packed)
        }
        None => {
            let image_path = staging.path().join(&image_name);
            let ((sha256, size), (_, compressed_size)) =
                compress_image(&release.image, &image_path, release.zstd_level)?;
            (image_path, (sha256, size), compressed_size)
        }
    };

    let mut files: Vec<(String, PathBuf)> = vec![(image_name.clone(), image_path)];
    let chunk_index = release.chunk_index.as_ref().map(|p| {
        let n = release::chunk_index_target(name, version);
        files.push((n.clone(), p.clone()));
        n
    });
    let mut deltas = Vec::new();
    for d in &release.deltas {
        let target = release::delta_target(name, &d.from_version, version);
        let sha = crate::artifact::sha256_file(&d.path)
            .with_context(|| format!("hashing {}", d.path.display()))?;
        let size = fs::metadata(&d.path)
            .with_context(|| format!("reading the size of {}", d.path.display()))?
            .len();
        deltas.push(DeltaInfo {
            from_version: d.from_version.clone(),
            target: target.clone(),
            size,
            sha256: sha,
        });
        files.push((target, d.path.clone()));
    }
    let manifest = ReleaseManifest {
        schema: RELEASE_SCHEMA_VERSION,
        name: name.to_owned(),
        version: version.to_owned(),
        recipe_digest: release.recipe_digest.clone(),
        image: ImageInfo {
            target: image_name,
            compression: IMAGE_COMPRESSION.to_owned(),
            sha256,
            size,
            compressed_size,
        },
        chunk_index,
        deltas,
        min_update_from: release.min_update_from.clone(),
        release_notes: release.release_notes.clone(),
        published_at: jiff::Timestamp::now()
            .round(jiff::Unit::Second)
            .map_err(anyhow::Error::new)?
            .to_string(),
    };
    let manifest_name = release::manifest_target(name, version);
    let manifest_path = staging.path().join(&manifest_name);
    write_json(&manifest_path, &manifest)?;
    files.push((manifest_name.clone(), manifest_path));

    index.releases.push(ReleaseEntry {
        version: version.to_owned(),
        manifest: manifest_name,
    });
    index.latest = Some(version.to_owned());
    if downgrade {
        index.max_version = Some(version.to_owned());
    } else if newest.map_or(true, |n| compare_versions(version, &n) == Ordering::Greater) {
        index.max_version = None;
    }
    let index_path = staging.path().join(CHANNEL_INDEX_TARGET);
    write_json(&index_path, &index)?;
    files.push((CHANNEL_INDEX_TARGET.to_owned(), index_path));

    let targets_version = repo.targets().signed.version.get() + 1;
    let mut editor = RepositoryEditor::new(root_path).await?;
    editor.targets(repo.targets().clone())?;
    set_versions(
        &mut editor,
        targets_version,
        repo.snapshot().signed.version.get() + 1,
        repo.timestamp().signed.version.get() + 1,
        expiry,
    )?;
    let mut named = Vec::new();
    for (n, p) in &files {
        named.push(add_file_target(&mut editor, p, n).await?);
    }
    let signed = editor
        .sign(&keys.sources())
        .await
        .context("signing targets, snapshot and timestamp")?;
    for (tn, path) in &named {
        signed
            .copy_target(path, &layout.targets, PathExists::Skip, Some(tn))
            .await
            .with_context(|| format!("copying {} into the channel", path.display()))?;
    }
    let meta = staging.path().join(METADATA_DIR);
    signed.write(&meta).await?;
    commit_metadata(&meta, &layout.metadata, Some(Current::of(&repo)))?;
    tracing::info!(version, targets_version, downgrade, "published");
    Ok(Published {
        manifest,
        downgrade,
        targets_version,
    })
}
