//! The client side of a channel: loading it with full TUF verification and reading its
//! targets, never handing a caller bytes before `tough` checked their length and sha256.

use super::*;

/// Why loading a channel or reading a target failed. The updater maps these to D-Bus
/// errors; every variant means "nothing was handed to the caller".
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A metadata file is past its expiry.
    #[error("{role} metadata has expired")]
    Expired {
        /// The role.
        role: String,
    },
    /// Metadata older than what this client already trusts was served (TUF rollback).
    #[error("rollback refused: {detail}")]
    Rollback {
        /// tough's account.
        detail: String,
    },
    /// A signature does not verify or a threshold is not met.
    #[error("signature check failed: {detail}")]
    BadSignature {
        /// tough's account.
        detail: String,
    },
    /// A file's sha256 or length differs from the signed metadata (a tampered target or
    /// metadata files from different publishes).
    #[error("content does not match the signed metadata: {detail}")]
    Mismatch {
        /// tough's account.
        detail: String,
    },
    /// The channel does not list this target.
    #[error("target {name} is not in the channel")]
    NotFound {
        /// Target name.
        name: String,
    },
    /// Fetching failed (connection, HTTP status, missing file).
    #[error("fetching failed: {detail}")]
    Fetch {
        /// tough's account.
        detail: String,
    },
    /// Verified content that this version of the tool cannot use.
    #[error("{what}: {detail}")]
    Invalid {
        /// What was being read.
        what: String,
        /// Why it is unusable.
        detail: String,
    },
    /// Any other failure reported by tough.
    #[error(transparent)]
    Tuf(Box<tough::error::Error>),
    /// Local I/O (runtime, temp files, destination).
    #[error(transparent)]
    Local(#[from] anyhow::Error),
}

impl From<tough::error::Error> for LoadError {
    fn from(e: tough::error::Error) -> Self {
        use tough::error::Error as E;
        let detail = e.to_string();
        match e {
            E::ExpiredMetadata { role, .. } => LoadError::Expired {
                role: role.to_string(),
            },
            E::OlderMetadata { .. }
            | E::OlderSnapshotInTimestamp { .. }
            | E::SnapshotRoleRollback { .. }
            | E::SnapshotRoleMissing { .. } => LoadError::Rollback { detail },
            E::VerifyMetadata { .. }
            | E::VerifyRoleMetadata { .. }
            | E::VerifyTrustedMetadata { .. } => LoadError::BadSignature { detail },
            E::HashMismatch { .. } | E::MaxSizeExceeded { .. } | E::VersionMismatch { .. } => {
                LoadError::Mismatch { detail }
            }
            E::Transport { .. } => {
                // tough checks a target's length and digest inside the byte stream, so a
                // tampered target surfaces as a transport error wrapping the real cause.
                let mut cause = std::error::Error::source(&e);
                while let Some(c) = cause {
                    if let Some(inner) = c.downcast_ref::<tough::error::Error>() {
                        if matches!(inner, E::HashMismatch { .. } | E::MaxSizeExceeded { .. }) {
                            return LoadError::Mismatch { detail };
                        }
                    }
                    cause = c.source();
                }
                LoadError::Fetch { detail }
            }
            other => LoadError::Tuf(Box::new(other)),
        }
    }
}

/// Read from `repo` the whole of target `name`, returning it only once tough has checked
/// its length and sha256 (tough's stream yields bytes before its final check, so nothing
/// from the stream is passed on until the stream has ended without error).
pub(super) async fn read_verified(
    repo: &tough::Repository,
    name: &str,
) -> Result<Vec<u8>, LoadError> {
    let tn = TargetName::new(name).map_err(LoadError::from)?;
    let stream = repo
        .read_target(&tn)
        .await?
        .ok_or_else(|| LoadError::NotFound {
            name: name.to_owned(),
        })?;
    Ok(stream.into_vec().await?)
}

/// A loaded, verified channel for async callers (the updater daemon). [`Channel`] wraps it
/// for blocking callers.
#[derive(Debug)]
pub struct AsyncChannel {
    repo: tough::Repository,
    index: ChannelIndex,
}

/// A loaded, verified channel for blocking callers (the CLI, tests). Must not be used
/// from inside an async runtime: use [`AsyncChannel`] there.
#[derive(Debug)]
pub struct Channel {
    inner: AsyncChannel,
    rt: tokio::runtime::Runtime,
}

/// Client-side options.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Persistent directory where tough keeps the newest metadata it has trusted, to
    /// detect rollbacks across runs. Must exist. `None`: a temporary one (no rollback
    /// protection across loads).
    pub datastore: Option<PathBuf>,
}

fn base_url(base: &str) -> Result<Url, LoadError> {
    let mut url = match Url::parse(base) {
        Ok(u) if u.scheme().len() > 1 => u,
        _ => {
            let abs = fs::canonicalize(base)
                .with_context(|| format!("resolving the channel directory {base}"))?;
            Url::from_directory_path(&abs).map_err(|()| anyhow!("{} as a URL", abs.display()))?
        }
    };
    if !url.path().ends_with('/') {
        let p = format!("{}/", url.path());
        url.set_path(&p);
    }
    Ok(url)
}

/// Loads and verifies the channel at `base` (a directory, `file://` URL or `http(s)://`
/// URL of the channel directory) starting from the trusted root in `trusted_root`.
pub fn load(base: &str, trusted_root: &Path) -> Result<Channel, LoadError> {
    load_with(base, trusted_root, &LoadOptions::default())
}

/// [`load`] with options.
pub fn load_with(
    base: &str,
    trusted_root: &Path,
    opts: &LoadOptions,
) -> Result<Channel, LoadError> {
    let rt = runtime()?;
    let inner = rt.block_on(AsyncChannel::load(base, trusted_root, opts))?;
    Ok(Channel { inner, rt })
}

fn parse_json<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, LoadError> {
    serde_json::from_slice(bytes).map_err(|e| LoadError::Invalid {
        what: what.to_owned(),
        detail: e.to_string(),
    })
}

impl AsyncChannel {
    /// [`load_with`] for async callers.
    pub async fn load(
        base: &str,
        trusted_root: &Path,
        opts: &LoadOptions,
    ) -> Result<Self, LoadError> {
        let root = tokio::fs::read(trusted_root)
            .await
            .with_context(|| format!("reading the trusted root {}", trusted_root.display()))?;
        let base = base_url(base)?;
        let join = |d: &str| {
            base.join(&format!("{d}/"))
                .with_context(|| format!("joining {d} to {base}"))
        };
        let mut loader = RepositoryLoader::new(&root, join(METADATA_DIR)?, join(TARGETS_DIR)?);
        if let Some(d) = &opts.datastore {
            loader = loader.datastore(d.clone());
        }
        let repo = loader.load().await?;
        let bytes = read_verified(&repo, CHANNEL_INDEX_TARGET).await?;
        let index: ChannelIndex = parse_json(CHANNEL_INDEX_TARGET, &bytes)?;
        if index.schema > RELEASE_SCHEMA_VERSION {
            return Err(LoadError::Invalid {
                what: CHANNEL_INDEX_TARGET.to_owned(),
                detail: format!(
                    "schema {} is newer than {RELEASE_SCHEMA_VERSION}",
                    index.schema
                ),
            });
        }
        Ok(Self { repo, index })
    }

    /// The verified channel index.
    pub fn index(&self) -> &ChannelIndex {
        &self.index
    }

    /// Versions of the trusted root, targets, snapshot and timestamp metadata.
    pub fn metadata_versions(&self) -> [u64; 4] {
        [
            self.repo.root().signed.version.get(),
            self.repo.targets().signed.version.get(),
            self.repo.snapshot().signed.version.get(),
            self.repo.timestamp().signed.version.get(),
        ]
    }

    /// The release manifest of `version`.
    pub async fn release(&self, version: &str) -> Result<ReleaseManifest, LoadError> {
        let entry = self
            .index
            .find(version)
            .ok_or_else(|| LoadError::NotFound {
                name: format!("release {version}"),
            })?;
        let bytes = self.read_target(&entry.manifest).await?;
        let m: ReleaseManifest = parse_json(&entry.manifest, &bytes)?;
        if m.schema > RELEASE_SCHEMA_VERSION || m.version != version {
            return Err(LoadError::Invalid {
                what: entry.manifest.clone(),
                detail: format!(
                    "schema {} / version {} (expected {version})",
                    m.schema, m.version
                ),
            });
        }
        Ok(m)
    }

    /// The manifest of the channel's `latest` release, if any.
    pub async fn latest_release(&self) -> Result<Option<ReleaseManifest>, LoadError> {
        match &self.index.latest {
            Some(v) => self.release(v).await.map(Some),
            None => Ok(None),
        }
    }

    /// Length and sha256 (hex) of target `name` as the verified targets metadata signs
    /// them, for callers that fetch the file themselves (resumable HTTP Range downloads of
    /// `targets/<sha256>.<name>`) and must check it against exactly these values.
    pub fn target_digest(&self, name: &str) -> Result<(u64, String), LoadError> {
        let tn = TargetName::new(name)?;
        let target = self
            .repo
            .targets()
            .signed
            .find_target(&tn, false)
            .map_err(|_| LoadError::NotFound {
                name: name.to_owned(),
            })?;
        Ok((target.length, hex::encode(&target.hashes.sha256)))
    }

    /// The bytes of target `name`, returned only after the whole target verified.
    pub async fn read_target(&self, name: &str) -> Result<Vec<u8>, LoadError> {
        read_verified(&self.repo, name).await
    }

    /// Streams target `name` into `dest` without holding it in memory: into a temporary
    /// file next to `dest`, renamed to `dest` only after tough has verified the whole
    /// target. On any error `dest` is left untouched and the temporary file removed.
    pub async fn save_target(&self, name: &str, dest: &Path) -> Result<(), LoadError> {
        use futures::StreamExt;
        use tokio::io::AsyncWriteExt;
        let dir = match dest.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let tn = TargetName::new(name)?;
        let mut stream = self
            .repo
            .read_target(&tn)
            .await?
            .ok_or_else(|| LoadError::NotFound {
                name: name.to_owned(),
            })?;
        let tmp = tempfile::Builder::new()
            .prefix(".partial-")
            .tempfile_in(dir)
            .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
        let handle = tmp
            .as_file()
            .try_clone()
            .with_context(|| format!("opening {}", tmp.path().display()))?;
        let mut w = tokio::io::BufWriter::new(tokio::fs::File::from_std(handle));
        while let Some(chunk) = stream.next().await {
            w.write_all(&chunk?)
                .await
                .with_context(|| format!("writing {}", tmp.path().display()))?;
        }
        w.flush()
            .await
            .with_context(|| format!("writing {}", tmp.path().display()))?;
        w.get_ref()
            .sync_all()
            .await
            .with_context(|| format!("syncing {}", tmp.path().display()))?;
        tmp.persist(dest)
            .map_err(|e| anyhow!("moving into {}: {}", dest.display(), e.error))?;
        Ok(())
    }
}

impl Channel {
    /// The async channel inside.
    pub fn as_async(&self) -> &AsyncChannel {
        &self.inner
    }

    /// The verified channel index.
    pub fn index(&self) -> &ChannelIndex {
        self.inner.index()
    }

    /// Versions of the trusted root, targets, snapshot and timestamp metadata.
    pub fn metadata_versions(&self) -> [u64; 4] {
        self.inner.metadata_versions()
    }

    /// The release manifest of `version`.
    pub fn release(&self, version: &str) -> Result<ReleaseManifest, LoadError> {
        self.rt.block_on(self.inner.release(version))
    }

    /// The manifest of the channel's `latest` release, if any.
    pub fn latest_release(&self) -> Result<Option<ReleaseManifest>, LoadError> {
        self.rt.block_on(self.inner.latest_release())
    }

    /// See [`AsyncChannel::target_digest`].
    pub fn target_digest(&self, name: &str) -> Result<(u64, String), LoadError> {
        self.inner.target_digest(name)
    }

    /// The bytes of target `name`, returned only after the whole target verified.
    pub fn read_target(&self, name: &str) -> Result<Vec<u8>, LoadError> {
        self.rt.block_on(self.inner.read_target(name))
    }

    /// See [`AsyncChannel::save_target`].
    pub fn save_target(&self, name: &str, dest: &Path) -> Result<(), LoadError> {
        self.rt.block_on(self.inner.save_target(name, dest))
    }
}
