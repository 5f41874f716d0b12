//! Update channels as TUF repositories, written with `tough`'s editor and read with its
//! loader.
//!
//! This module owns the channel directory (`metadata/` + `targets/`, see
//! `docs/channel.md`): creating it, publishing releases into it, re-signing its
//! timestamp/snapshot, rotating its root, and loading it on the client side with full TUF
//! verification. It must never invent a signature scheme (every signature is made and
//! checked by `tough`), never rewrite a versioned metadata file or a published target in
//! place, never drop an older release's targets, and never hand a caller target bytes
//! before `tough` has checked their length and sha256 against signed metadata.

use crate::keys::{self, KeyError};
use anyhow::{anyhow, bail, Context};
use imgformat::release::{
    self, compare_versions, ChannelIndex, DeltaInfo, ImageInfo, ReleaseEntry, ReleaseManifest,
    CHANNEL_INDEX_TARGET, IMAGE_COMPRESSION, METADATA_DIR, RELEASE_SCHEMA_VERSION, TARGETS_DIR,
};
use sha2::{Digest, Sha256};
use std::cmp::Ordering;
use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::io::{BufReader, BufWriter, Read, Write};
use std::num::NonZeroU64;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tough::editor::signed::{PathExists, SignedRole};
use tough::editor::RepositoryEditor;
use tough::key_source::{KeySource, LocalKeySource};
use tough::schema::{
    Hashes, KeyHolder, Metafile, RoleKeys as TufRoleKeys, RoleType, Root, Snapshot, Target,
    Timestamp,
};
use tough::{ExpirationEnforcement, IntoVec, RepositoryLoader, TargetName};
use url::Url;

mod client;
use client::read_verified;
pub use client::{load, load_with, AsyncChannel, Channel, LoadError, LoadOptions};
mod publish;
pub use publish::{publish, publish_packed};

/// TUF specification version written into every role.
const SPEC_VERSION: &str = "1.0.0";

/// Name of the convenience copy of the newest root in `metadata/` (clients follow the
/// versioned `N.root.json` chain; this copy is for bootstrapping trust out of band).
pub const CURRENT_ROOT: &str = "root.json";

/// Lock file taken by every writer of a channel directory (not part of what is served).
pub const LOCK_FILE: &str = ".channel.lock";

/// The keys of one TUF role and how many of them must sign.
#[derive(Debug, Clone)]
pub struct RoleKeySet {
    /// Private key files (PKCS#8 DER, mode 0600).
    pub keys: Vec<PathBuf>,
    /// Signatures required.
    pub threshold: NonZeroU64,
}

/// Keys for the four top-level roles. One key may serve several roles.
#[derive(Debug, Clone)]
pub struct RoleKeys {
    /// Signs root.json (and the next root, on rotation).
    pub root: RoleKeySet,
    /// Signs targets.json.
    pub targets: RoleKeySet,
    /// Signs snapshot.json.
    pub snapshot: RoleKeySet,
    /// Signs timestamp.json.
    pub timestamp: RoleKeySet,
}

impl RoleKeys {
    /// One key for every role, threshold 1: a small or test setup.
    pub fn single(key: impl Into<PathBuf>) -> Self {
        let set = RoleKeySet {
            keys: vec![key.into()],
            threshold: NonZeroU64::MIN,
        };
        Self {
            root: set.clone(),
            targets: set.clone(),
            snapshot: set.clone(),
            timestamp: set,
        }
    }

    fn sets(&self) -> [(RoleType, &RoleKeySet); 4] {
        [
            (RoleType::Root, &self.root),
            (RoleType::Targets, &self.targets),
            (RoleType::Snapshot, &self.snapshot),
            (RoleType::Timestamp, &self.timestamp),
        ]
    }

    /// Every distinct key file, in a stable order.
    pub fn all_paths(&self) -> Vec<PathBuf> {
        let set: BTreeSet<&PathBuf> = self.sets().iter().flat_map(|(_, s)| &s.keys).collect();
        set.into_iter().cloned().collect()
    }
}

/// How long each role's metadata stays valid after it is signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpiryPolicy {
    /// root.json (rotated rarely, by hand).
    pub root: Duration,
    /// targets.json (re-signed on every publish).
    pub targets: Duration,
    /// snapshot.json (re-signed on publish and refresh).
    pub snapshot: Duration,
    /// timestamp.json (re-signed on publish and refresh: run refresh well within this).
    pub timestamp: Duration,
}

const DAY: u64 = 24 * 60 * 60;

impl Default for ExpiryPolicy {
    /// root 1 year, targets 180 days, snapshot 30 days, timestamp 7 days.
    fn default() -> Self {
        Self {
            root: Duration::from_secs(365 * DAY),
            targets: Duration::from_secs(180 * DAY),
            snapshot: Duration::from_secs(30 * DAY),
            timestamp: Duration::from_secs(7 * DAY),
        }
    }
}

fn expires_after(d: Duration) -> anyhow::Result<jiff::Timestamp> {
    let span = jiff::SignedDuration::try_from(d).context("expiry duration out of range")?;
    jiff::Timestamp::now()
        .checked_add(span)
        .context("expiry time out of range")
}

/// A set of private key files used to sign; `tough` picks, for each role, the ones the
/// root lists for it.
#[derive(Debug, Clone)]
pub struct SigningKeys {
    paths: Vec<PathBuf>,
}

impl SigningKeys {
    /// Checks each key file (mode 0600, parses as an ed25519 PKCS#8 key).
    pub fn new(paths: impl IntoIterator<Item = PathBuf>) -> Result<Self, KeyError> {
        let paths: Vec<PathBuf> = paths.into_iter().collect();
        for p in &paths {
            keys::load_signing_key(p)?;
        }
        Ok(Self { paths })
    }

    fn sources(&self) -> Vec<Box<dyn KeySource>> {
        self.paths
            .iter()
            .map(|p| Box::new(LocalKeySource { path: p.clone() }) as Box<dyn KeySource>)
            .collect()
    }
}

/// Refusals of the writing side. Callers (the CLI) map each to its own message and exit
/// code; everything else is [`PublishError::Other`] with context.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// `init` on a directory that already holds channel metadata.
    #[error("{} already holds a channel", dir.display())]
    AlreadyInitialized {
        /// The channel directory.
        dir: PathBuf,
    },
    /// The directory is not a channel (no `metadata/N.root.json`).
    #[error("{} is not a channel directory (run `imgbuild channel init`)", dir.display())]
    NotInitialized {
        /// The directory.
        dir: PathBuf,
    },
    /// This version is already in the channel.
    #[error("version {version} is already published in this channel")]
    AlreadyPublished {
        /// The version.
        version: String,
    },
    /// The version is older than the newest published one and no downgrade was allowed.
    #[error("version {version} is older than the newest published {newest}; pass --allow-downgrade to publish it")]
    Downgrade {
        /// The version being published.
        version: String,
        /// The newest published version.
        newest: String,
    },
    /// A delta starts from a version the channel does not hold.
    #[error("delta from {from}: that version is not published in this channel")]
    UnknownDeltaBase {
        /// The delta's source version.
        from: String,
    },
    /// The keys given do not meet the root threshold of root version `by_root` for the
    /// new root version `version` (TUF 5.3.4: both the old and the new root must sign).
    #[error("root version {version} would not carry the signature threshold of root version {by_root} with the keys given")]
    RootThreshold {
        /// The root being signed.
        version: u64,
        /// The root whose threshold is not met.
        by_root: u64,
    },
    /// A key file was refused.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// Anything else, with context.
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl From<tough::error::Error> for PublishError {
    fn from(e: tough::error::Error) -> Self {
        PublishError::Other(anyhow::Error::new(e))
    }
}

/// One release to publish: files the builder already made.
#[derive(Debug, Clone)]
pub struct ReleaseInput {
    /// Image name.
    pub name: String,
    /// Image version.
    pub version: String,
    /// Digest of the recipe and inputs.
    pub recipe_digest: String,
    /// The uncompressed root filesystem image; published zstd-compressed.
    pub image: PathBuf,
    /// The chunk index made for this image (published as is).
    pub chunk_index: Option<PathBuf>,
    /// Deltas from older published versions (published as is).
    pub deltas: Vec<DeltaInput>,
    /// Oldest version allowed to update straight to this one.
    pub min_update_from: Option<String>,
    /// Release notes.
    pub release_notes: String,
    /// Allow publishing a version older than the newest one (see `docs/channel.md`).
    pub allow_downgrade: bool,
    /// zstd level for the image (19 for releases; tests use 1).
    pub zstd_level: i32,
}

/// A delta file made by the delta generator.
#[derive(Debug, Clone)]
pub struct DeltaInput {
    /// The version it applies to.
    pub from_version: String,
    /// The delta file.
    pub path: PathBuf,
}

/// What [`publish`] did.
#[derive(Debug, Clone)]
pub struct Published {
    /// The manifest written.
    pub manifest: ReleaseManifest,
    /// True when the release was a downgrade and `max_version` was set.
    pub downgrade: bool,
    /// Version of the targets metadata that lists the release.
    pub targets_version: u64,
}

/// The channel directory's parts.
#[derive(Debug)]
struct Layout {
    dir: PathBuf,
    metadata: PathBuf,
    targets: PathBuf,
}

impl Layout {
    fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            metadata: dir.join(METADATA_DIR),
            targets: dir.join(TARGETS_DIR),
        }
    }

    /// Exclusive lock for the whole read-modify-write of a publish/refresh/rotation.
    /// Refuses a directory without `metadata/` (not a channel) before creating anything.
    fn lock(&self) -> Result<nix::fcntl::Flock<fs::File>, PublishError> {
        if !self.metadata.is_dir() {
            return Err(PublishError::NotInitialized {
                dir: self.dir.clone(),
            });
        }
        let path = self.dir.join(LOCK_FILE);
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| anyhow!("locking {}: {e}", path.display()).into())
    }

    /// Highest `N.root.json` in `metadata/`.
    fn latest_root(&self) -> Result<(u64, PathBuf), PublishError> {
        let entries = match fs::read_dir(&self.metadata) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(PublishError::NotInitialized {
                    dir: self.dir.clone(),
                })
            }
            Err(e) => {
                return Err(anyhow::Error::new(e)
                    .context(format!("reading {}", self.metadata.display()))
                    .into())
            }
        };
        let mut best: Option<u64> = None;
        for entry in entries {
            let entry = entry.with_context(|| format!("reading {}", self.metadata.display()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(n) = name
                .strip_suffix(".root.json")
                .and_then(|n| n.parse::<u64>().ok())
            {
                best = best.max(Some(n));
            }
        }
        let n = best.ok_or_else(|| PublishError::NotInitialized {
            dir: self.dir.clone(),
        })?;
        Ok((n, self.metadata.join(format!("{n}.root.json"))))
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn check_name(what: &str, s: &str) -> anyhow::Result<()> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b".+~_-".contains(&c));
    if !ok {
        bail!("{what} {s:?} must be 1-64 characters of [A-Za-z0-9.+~_-], starting with a letter or digit");
    }
    Ok(())
}

fn role_keys_of(set: &RoleKeySet) -> anyhow::Result<Vec<ed25519_dalek::VerifyingKey>> {
    if set.keys.is_empty() {
        bail!("a role needs at least one key");
    }
    if set.threshold.get() > set.keys.len() as u64 {
        bail!(
            "threshold {} is larger than the {} key(s) given",
            set.threshold,
            set.keys.len()
        );
    }
    Ok(set
        .keys
        .iter()
        .map(|p| keys::load_signing_key(p).map(|k| k.verifying_key()))
        .collect::<Result<_, _>>()?)
}

/// root.json content for `keys` (not yet signed).
fn build_root(
    keys: &RoleKeys,
    version: NonZeroU64,
    expires: jiff::Timestamp,
) -> anyhow::Result<Root> {
    let mut root = Root {
        spec_version: SPEC_VERSION.to_owned(),
        consistent_snapshot: true,
        version,
        expires,
        keys: HashMap::new(),
        roles: HashMap::new(),
        _extra: HashMap::new(),
    };
    for (role, set) in keys.sets() {
        let infos = role_keys_of(set).with_context(|| format!("keys of the {role} role"))?;
        let mut keyids = Vec::new();
        for vk in infos {
            let key = keys::tuf_key(&vk);
            let id = key.key_id().context("computing a key ID")?;
            root.keys.insert(id.clone(), key);
            if !keyids.contains(&id) {
                keyids.push(id);
            }
        }
        if set.threshold.get() > keyids.len() as u64 {
            bail!(
                "{role}: threshold {} exceeds its {} distinct keys",
                set.threshold,
                keyids.len()
            );
        }
        root.roles.insert(
            role,
            TufRoleKeys {
                keyids,
                threshold: set.threshold,
                _extra: HashMap::new(),
            },
        );
    }
    Ok(root)
}

/// Versions of targets and snapshot metadata the current timestamp chain references. A
/// versioned file above these is an orphan of an interrupted publish: no client can have
/// been pointed at it, so it may be replaced.
#[derive(Debug, Clone, Copy)]
struct Current {
    targets: u64,
    snapshot: u64,
}

impl Current {
    fn of(repo: &tough::Repository) -> Self {
        Self {
            targets: repo.targets().signed.version.get(),
            snapshot: repo.snapshot().signed.version.get(),
        }
    }

    fn is_orphan(&self, name: &str) -> bool {
        let version = |suffix: &str| {
            name.strip_suffix(suffix)
                .and_then(|n| n.parse::<u64>().ok())
        };
        version(".targets.json").is_some_and(|v| v > self.targets)
            || version(".snapshot.json").is_some_and(|v| v > self.snapshot)
    }
}

/// Moves metadata written in `staging` into `metadata/` so that a client never sees a
/// half-written state: versioned files first (never replacing a file a client may have
/// seen), then `timestamp.json` with one atomic rename.
fn commit_metadata(
    staging: &Path,
    metadata: &Path,
    current: Option<Current>,
) -> anyhow::Result<()> {
    fs::create_dir_all(metadata).with_context(|| format!("creating {}", metadata.display()))?;
    let mut names: Vec<String> = fs::read_dir(staging)
        .with_context(|| format!("reading {}", staging.display()))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()
        .with_context(|| format!("reading {}", staging.display()))?;
    // Roots, then targets, then snapshot; timestamp last.
    let rank = |n: &str| {
        if n.ends_with(".root.json") {
            0
        } else if n.ends_with(".targets.json") {
            1
        } else if n.ends_with(".snapshot.json") {
            2
        } else {
            3
        }
    };
    names.sort_by_key(|n| (rank(n), n.clone()));
    let mut newest_root: Option<(u64, PathBuf)> = None;
    for name in &names {
        let src = staging.join(name);
        let dst = metadata.join(name);
        fsync_file(&src)?;
        if name == "timestamp.json" {
            fs::rename(&src, &dst)
                .with_context(|| format!("moving {} to {}", src.display(), dst.display()))?;
            continue;
        }
        if dst.exists() && current.is_some_and(|c| c.is_orphan(name)) {
            tracing::warn!(path = %dst.display(), "replacing metadata left by an interrupted publish");
            fs::rename(&src, &dst)
                .with_context(|| format!("moving {} to {}", src.display(), dst.display()))?;
            continue;
        }
        if dst.exists() {
            let same = fs::read(&src).ok() == fs::read(&dst).ok();
            if !same {
                bail!(
                    "{} already exists with other content; refusing to replace versioned metadata",
                    dst.display()
                );
            }
            continue;
        }
        fs::hard_link(&src, &dst)
            .with_context(|| format!("linking {} to {}", src.display(), dst.display()))?;
        if let Some(n) = name
            .strip_suffix(".root.json")
            .and_then(|n| n.parse::<u64>().ok())
        {
            if newest_root.as_ref().map_or(true, |(v, _)| n > *v) {
                newest_root = Some((n, dst.clone()));
            }
        }
    }
    if let Some((_, path)) = newest_root {
        let tmp = metadata.join(".root.json.partial");
        fs::copy(&path, &tmp).with_context(|| format!("copying {}", path.display()))?;
        fs::rename(&tmp, metadata.join(CURRENT_ROOT))
            .with_context(|| format!("writing {}", metadata.join(CURRENT_ROOT).display()))?;
    }
    fs::File::open(metadata)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", metadata.display()))?;
    Ok(())
}

fn fsync_file(path: &Path) -> anyhow::Result<()> {
    fs::File::open(path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", path.display()))
}

fn target_name(name: &str) -> anyhow::Result<TargetName> {
    TargetName::new(name).with_context(|| format!("target name {name:?}"))
}

async fn add_file_target(
    editor: &mut RepositoryEditor,
    path: &Path,
    name: &str,
) -> anyhow::Result<(TargetName, PathBuf)> {
    let target = Target::from_path(path)
        .await
        .with_context(|| format!("hashing {}", path.display()))?;
    let tn = target_name(name)?;
    editor.remove_target(&tn)?;
    editor.add_target(tn.clone(), target)?;
    Ok((tn, path.to_owned()))
}

fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> anyhow::Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value)
        .with_context(|| format!("serialising {}", path.display()))?;
    bytes.push(b'\n');
    fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

/// Creates a channel: a TUF repository in `dir` (`metadata/1.root.json` with the given
/// role keys and thresholds, consistent snapshots on) whose first targets metadata lists
/// only an empty channel index.
pub fn init(
    dir: &Path,
    channel: &str,
    keys: &RoleKeys,
    expiry: &ExpiryPolicy,
) -> Result<(), PublishError> {
    check_name("channel name", channel)?;
    // Keys and thresholds are checked before anything is created.
    let signing = SigningKeys::new(keys.all_paths())?;
    let root = build_root(keys, NonZeroU64::MIN, expires_after(expiry.root)?)?;
    let layout = Layout::new(dir);
    for d in [&layout.metadata, &layout.targets] {
        fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let _lock = layout.lock()?;
    if fs::read_dir(&layout.metadata)
        .with_context(|| format!("reading {}", layout.metadata.display()))?
        .next()
        .is_some()
    {
        return Err(PublishError::AlreadyInitialized {
            dir: dir.to_owned(),
        });
    }
    runtime()?.block_on(async {
        let staging = tempfile::Builder::new()
            .prefix(".staging-")
            .tempdir_in(dir)
            .with_context(|| format!("creating a staging directory in {}", dir.display()))?;
        let meta = staging.path().join(METADATA_DIR);
        let signed_root = sign_root(&root, &[&root], &signing).await?;
        signed_root.write(&meta, true).await?;
        let root_path = meta.join("1.root.json");

        let index_path = staging.path().join(CHANNEL_INDEX_TARGET);
        write_json(&index_path, &ChannelIndex::empty(channel))?;
        let mut editor = RepositoryEditor::new(&root_path).await?;
        set_versions(&mut editor, 1, 1, 1, expiry)?;
        let files = vec![add_file_target(&mut editor, &index_path, CHANNEL_INDEX_TARGET).await?];
        let signed = editor.sign(&signing.sources()).await?;
        for (name, path) in &files {
            signed
                .copy_target(path, &layout.targets, PathExists::Skip, Some(name))
                .await?;
        }
        signed.write(&meta).await?;
        commit_metadata(&meta, &layout.metadata, None)?;
        Ok::<_, PublishError>(())
    })
}

fn set_versions(
    editor: &mut RepositoryEditor,
    targets: u64,
    snapshot: u64,
    timestamp: u64,
    expiry: &ExpiryPolicy,
) -> anyhow::Result<()> {
    let nz = |v: u64| NonZeroU64::new(v).context("metadata version 0");
    editor
        .targets_version(nz(targets)?)?
        .targets_expires(expires_after(expiry.targets)?)?;
    editor
        .snapshot_version(nz(snapshot)?)
        .snapshot_expires(expires_after(expiry.snapshot)?)
        .timestamp_version(nz(timestamp)?)
        .timestamp_expires(expires_after(expiry.timestamp)?);
    Ok(())
}

/// Signs `root` with every matching key of `signing` for each root in `signers` and checks
/// that each of `signers` is satisfied (TUF 5.3.4: a new root is signed by the old root's
/// threshold and its own).
async fn sign_root(
    root: &Root,
    signers: &[&Root],
    signing: &SigningKeys,
) -> Result<SignedRole<Root>, PublishError> {
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let sources = signing.sources();
    let threshold = |signer: &Root| PublishError::RootThreshold {
        version: root.version.get(),
        by_root: signer.version.get(),
    };
    let mut signed: Option<SignedRole<Root>> = None;
    for signer in signers {
        let role = match SignedRole::new(
            root.clone(),
            &KeyHolder::Root((*signer).clone()),
            &sources,
            &rng,
        )
        .await
        {
            Ok(r) => r,
            // None of the keys given is a root key of this signer.
            Err(tough::error::Error::KeysNotFoundInRoot { .. }) => return Err(threshold(signer)),
            Err(e) => {
                return Err(anyhow::Error::new(e)
                    .context(format!("signing root version {}", root.version))
                    .into())
            }
        };
        signed = Some(match signed {
            None => role,
            Some(s) => s.add_old_signatures(role.signed().signatures.clone())?,
        });
    }
    let signed = signed.context("no root to sign with")?;
    for signer in signers {
        signer
            .verify_role(signed.signed())
            .map_err(|_| threshold(signer))?;
    }
    Ok(signed)
}

/// Loads the channel in `dir` as the publisher sees it: every signature verified against
/// its newest root, expiry not enforced (the publisher is about to re-sign).
async fn load_local(layout: &Layout, root_path: &Path) -> anyhow::Result<tough::Repository> {
    let root = fs::read(root_path).with_context(|| format!("reading {}", root_path.display()))?;
    let url = |d: &Path| {
        let abs = fs::canonicalize(d).with_context(|| format!("resolving {}", d.display()))?;
        Url::from_directory_path(&abs).map_err(|()| anyhow!("{} as a URL", abs.display()))
    };
    RepositoryLoader::new(&root, url(&layout.metadata)?, url(&layout.targets)?)
        .expiration_enforcement(ExpirationEnforcement::Unsafe)
        .load()
        .await
        .with_context(|| format!("loading the channel in {}", layout.dir.display()))
}

async fn read_index(repo: &tough::Repository) -> anyhow::Result<ChannelIndex> {
    let bytes = read_verified(repo, CHANNEL_INDEX_TARGET)
        .await
        .map_err(anyhow::Error::new)?;
    let index: ChannelIndex =
        serde_json::from_slice(&bytes).context("parsing the channel index")?;
    if index.schema > RELEASE_SCHEMA_VERSION {
        bail!(
            "channel index schema {} is newer than this tool ({RELEASE_SCHEMA_VERSION})",
            index.schema
        );
    }
    Ok(index)
}

/// The channel index of the channel in `dir`, as published (signatures verified, expiry
/// not enforced): what the builder consults to choose delta bases
/// ([`ChannelIndex::delta_bases`]) before [`publish`].
pub fn local_index(dir: &Path) -> Result<ChannelIndex, PublishError> {
    let layout = Layout::new(dir);
    let _lock = layout.lock()?;
    let (_, root_path) = layout.latest_root()?;
    runtime()?.block_on(async {
        let repo = load_local(&layout, &root_path).await?;
        Ok(read_index(&repo).await?)
    })
}

/// Re-signs snapshot and timestamp (new versions, new expiry from `expiry.snapshot` and
/// `expiry.timestamp`), leaving targets metadata untouched: the nightly cron job that keeps
/// a channel from expiring.
pub fn refresh(dir: &Path, keys: &SigningKeys, expiry: &ExpiryPolicy) -> Result<(), PublishError> {
    let layout = Layout::new(dir);
    let _lock = layout.lock()?;
    let (_, root_path) = layout.latest_root()?;
    runtime()?.block_on(async {
        let repo = load_local(&layout, &root_path).await?;
        let root = KeyHolder::Root(repo.root().signed.clone());
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let sources = keys.sources();
        let old = &repo.snapshot().signed;
        let nz = |v: u64| NonZeroU64::new(v).context("metadata version 0");
        let mut snapshot = Snapshot::new(
            SPEC_VERSION.to_owned(),
            nz(old.version.get() + 1)?,
            expires_after(expiry.snapshot)?,
        );
        snapshot.meta = old.meta.clone();
        let snapshot = SignedRole::new(snapshot, &root, &sources, &rng)
            .await
            .context("signing snapshot")?;
        let mut timestamp = Timestamp::new(
            SPEC_VERSION.to_owned(),
            nz(repo.timestamp().signed.version.get() + 1)?,
            expires_after(expiry.timestamp)?,
        );
        timestamp.meta.insert(
            "snapshot.json".to_owned(),
            Metafile {
                hashes: Some(Hashes {
                    sha256: snapshot.sha256().to_vec().into(),
                    _extra: HashMap::new(),
                }),
                length: Some(*snapshot.length()),
                version: snapshot.signed().signed.version,
                _extra: HashMap::new(),
            },
        );
        let timestamp = SignedRole::new(timestamp, &root, &sources, &rng)
            .await
            .context("signing timestamp")?;
        let staging = tempfile::Builder::new()
            .prefix(".staging-")
            .tempdir_in(dir)
            .with_context(|| format!("creating a staging directory in {}", dir.display()))?;
        snapshot.write(staging.path(), true).await?;
        timestamp.write(staging.path(), true).await?;
        commit_metadata(staging.path(), &layout.metadata, Some(Current::of(&repo)))?;
        Ok(())
    })
}

/// Rotates the root: writes `N+1.root.json` with `new_keys`' roles and thresholds, signed
/// by the current root's threshold (from `old_keys`) and by the new root keys, so TUF
/// clients holding any older root follow the chain. Then re-signs targets, snapshot and
/// timestamp with the new keys (TUF 5.3.11: clients drop timestamp/snapshot trust when
/// those keys change).
pub fn rotate_root(
    dir: &Path,
    old_keys: &SigningKeys,
    new_keys: &RoleKeys,
    expiry: &ExpiryPolicy,
) -> Result<u64, PublishError> {
    let layout = Layout::new(dir);
    let _lock = layout.lock()?;
    let (n, root_path) = layout.latest_root()?;
    let new_signing = SigningKeys::new(new_keys.all_paths())?;
    let version = NonZeroU64::new(n + 1).context("root version overflow")?;
    let new_root = build_root(new_keys, version, expires_after(expiry.root)?)?;
    runtime()?.block_on(async {
        let repo = load_local(&layout, &root_path).await?;
        let old_root = repo.root().signed.clone();
        let mut both = old_keys.clone();
        both.paths.extend(new_signing.paths.iter().cloned());
        let signed_root = sign_root(&new_root, &[&old_root, &new_root], &both).await?;
        let staging = tempfile::Builder::new()
            .prefix(".staging-")
            .tempdir_in(dir)
            .with_context(|| format!("creating a staging directory in {}", dir.display()))?;
        let meta = staging.path().join(METADATA_DIR);
        signed_root.write(&meta, true).await?;
        let new_root_path = meta.join(format!("{}.root.json", version));
        let mut editor = RepositoryEditor::new(&new_root_path).await?;
        editor.targets(repo.targets().clone())?;
        set_versions(
            &mut editor,
            repo.targets().signed.version.get() + 1,
            repo.snapshot().signed.version.get() + 1,
            repo.timestamp().signed.version.get() + 1,
            expiry,
        )?;
        let signed = editor
            .sign(&new_signing.sources())
            .await
            .context("re-signing targets, snapshot and timestamp with the new keys")?;
        signed.write(&meta).await?;
        commit_metadata(&meta, &layout.metadata, Some(Current::of(&repo)))?;
        Ok(version.get())
    })
}
