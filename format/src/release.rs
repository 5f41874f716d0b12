//! Release manifests and the channel index: the wire types a published update channel
//! carries as TUF targets, and the naming rules for those targets.
//!
//! This module owns the JSON shapes `imgbuild publish` writes and `imgupdate` reads, the
//! target-name conventions, and the version ordering both sides must agree on. It must
//! never do I/O, verify signatures or decide policy beyond "which version is newer":
//! the bytes it parses have already been verified by TUF (the `imgchannel` crate) before
//! they reach these types.

use serde::{Deserialize, Serialize};
use std::cmp::Ordering;

/// Schema version of [`ReleaseManifest`] and [`ChannelIndex`]. Readers refuse a larger one.
/// Adding an optional field does not change it (readers ignore fields they do not know,
/// so older nodes keep working); any change an older reader would misread bumps it.
pub const RELEASE_SCHEMA_VERSION: u32 = 1;

/// Sub-directory of a channel directory holding the TUF metadata (the metadata base URL).
pub const METADATA_DIR: &str = "metadata";

/// Sub-directory of a channel directory holding the TUF targets (the targets base URL).
pub const TARGETS_DIR: &str = "targets";

/// The target every channel carries: the signed [`ChannelIndex`].
pub const CHANNEL_INDEX_TARGET: &str = "channel.json";

/// Compression applied to the published root image.
pub const IMAGE_COMPRESSION: &str = "zstd";

/// Target name of the release manifest of `name` at `version`.
pub fn manifest_target(name: &str, version: &str) -> String {
    format!("{name}-{version}.release.json")
}

/// Target name of the zstd-compressed root image of `name` at `version`.
pub fn image_target(name: &str, version: &str) -> String {
    format!("{name}-{version}.root.img.zst")
}

/// Target name of the chunk index of `name` at `version`.
pub fn chunk_index_target(name: &str, version: &str) -> String {
    format!("{name}-{version}.chunks.json")
}

/// Target name of the delta that turns `from` into `version`.
pub fn delta_target(name: &str, from: &str, version: &str) -> String {
    format!("{name}-{version}.from-{from}.delta")
}

/// Everything a node needs to know about one published version. Published as the target
/// [`manifest_target`]`(name, version)`; the files it names are targets of the same channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseManifest {
    /// [`RELEASE_SCHEMA_VERSION`] at the time of writing.
    pub schema: u32,
    /// Image name (`[image] name` of the recipe).
    pub name: String,
    /// Image version (`[image] version`), ordered with [`compare_versions`].
    pub version: String,
    /// Digest of the recipe and its inputs, as the builder reports it.
    pub recipe_digest: String,
    /// The root filesystem image.
    pub image: ImageInfo,
    /// Target name of the chunk index, when one was published.
    pub chunk_index: Option<String>,
    /// Deltas that produce this version from older ones.
    pub deltas: Vec<DeltaInfo>,
    /// Oldest running version allowed to update straight to this one; `None`: any.
    pub min_update_from: Option<String>,
    /// Free text shown to operators.
    pub release_notes: String,
    /// RFC 3339 UTC time of publication.
    pub published_at: String,
}

/// The root filesystem image of a release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    /// Target name of the compressed image.
    pub target: String,
    /// Compression of the target ([`IMAGE_COMPRESSION`]).
    pub compression: String,
    /// sha256 (hex) of the uncompressed image: what the slot must hash to.
    pub sha256: String,
    /// Size in bytes of the uncompressed image.
    pub size: u64,
    /// Size in bytes of the compressed target.
    pub compressed_size: u64,
}

/// A delta from an older version to the release that lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaInfo {
    /// Version the delta applies to (the node's running version).
    pub from_version: String,
    /// Target name of the delta file.
    pub target: String,
    /// Size in bytes of the delta file.
    pub size: u64,
    /// sha256 (hex) of the delta file.
    pub sha256: String,
}

/// The signed table of contents of a channel, published as [`CHANNEL_INDEX_TARGET`].
///
/// Downgrade semantics (after Bottlerocket's `max_version`): nodes never move to a
/// version lower than the one they run, unless `max_version` is set and is lower than the
/// running version; then they move to the newest release not above `max_version`. A normal
/// publish of a version newer than every published one clears `max_version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelIndex {
    /// [`RELEASE_SCHEMA_VERSION`] at the time of writing.
    pub schema: u32,
    /// Channel name (`stable`, `beta`, `nightly`, ...).
    pub channel: String,
    /// Every release still offered, in publication order.
    pub releases: Vec<ReleaseEntry>,
    /// The version nodes should run: the last one published.
    pub latest: Option<String>,
    /// Set by a downgrade publish: nodes above this version go down to it.
    pub max_version: Option<String>,
}

/// One release in the [`ChannelIndex`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseEntry {
    /// Image version.
    pub version: String,
    /// Target name of its [`ReleaseManifest`].
    pub manifest: String,
}

impl ChannelIndex {
    /// An index with no release yet.
    pub fn empty(channel: &str) -> Self {
        Self {
            schema: RELEASE_SCHEMA_VERSION,
            channel: channel.to_owned(),
            releases: Vec::new(),
            latest: None,
            max_version: None,
        }
    }

    /// The release with the highest version, by [`compare_versions`].
    pub fn newest(&self) -> Option<&ReleaseEntry> {
        self.releases
            .iter()
            .max_by(|a, b| compare_versions(&a.version, &b.version))
    }

    /// The entry for `version`, if published.
    pub fn find(&self, version: &str) -> Option<&ReleaseEntry> {
        self.releases.iter().find(|r| r.version == version)
    }

    /// The versions a new release `version` should carry deltas from: the `k` newest
    /// published versions below it, newest first (the default `k` is 3).
    pub fn delta_bases(&self, version: &str, k: usize) -> Vec<&str> {
        let mut older: Vec<&str> = self
            .releases
            .iter()
            .map(|r| r.version.as_str())
            .filter(|v| compare_versions(v, version) == Ordering::Less)
            .collect();
        older.sort_by(|a, b| compare_versions(b, a));
        older.truncate(k);
        older
    }

    /// The release a node running `running` should move to, or `None` to stay.
    ///
    /// The newest release not above `max_version` (when set) is the goal. A node below
    /// it updates; a node above `max_version` goes down to it (the signed downgrade); a
    /// node between the goal and `max_version`, or on the goal, stays. Whether the node
    /// may jump straight there (`min_update_from`) is in the goal's manifest.
    pub fn update_target(&self, running: &str) -> Option<&ReleaseEntry> {
        let allowed = |v: &str| match &self.max_version {
            Some(max) => compare_versions(v, max) != Ordering::Greater,
            None => true,
        };
        let goal = self
            .releases
            .iter()
            .filter(|r| allowed(&r.version))
            .max_by(|a, b| compare_versions(&a.version, &b.version))?;
        match compare_versions(&goal.version, running) {
            Ordering::Greater => Some(goal),
            Ordering::Less if !allowed(running) => Some(goal),
            _ => None,
        }
    }
}

/// Orders two image versions the way dpkg does (without epochs): digit runs compare as
/// numbers, other runs compare byte by byte with letters before punctuation, and `~`
/// sorts before anything, even the end of the string. So `1.0~rc1 < 1.0 < 1.0.1 < 1.10`
/// and `2024.9 < 2024.10`. Use `~` for pre-releases.
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        // Non-digit prefix.
        let (an, ar) = split_while(a, |c| !c.is_ascii_digit());
        let (bn, br) = split_while(b, |c| !c.is_ascii_digit());
        let ord = compare_non_digits(an, bn);
        if ord != Ordering::Equal {
            return ord;
        }
        // Digit run.
        let (ad, ar) = split_while(ar, |c| c.is_ascii_digit());
        let (bd, br) = split_while(br, |c| c.is_ascii_digit());
        let ord = compare_digits(ad, bd);
        if ord != Ordering::Equal {
            return ord;
        }
        if ar.is_empty() && br.is_empty() {
            return Ordering::Equal;
        }
        a = ar;
        b = br;
    }
}

fn split_while(s: &[u8], pred: impl Fn(u8) -> bool) -> (&[u8], &[u8]) {
    let n = s.iter().position(|&c| !pred(c)).unwrap_or(s.len());
    s.split_at(n)
}

/// dpkg's character weight: `~` lowest, then end of string, then letters, then the rest.
fn weight(c: Option<u8>) -> i32 {
    match c {
        Some(b'~') => -1,
        None => 0,
        Some(c) if c.is_ascii_alphabetic() => i32::from(c),
        Some(c) => i32::from(c) + 256,
    }
}

fn compare_non_digits(a: &[u8], b: &[u8]) -> Ordering {
    let n = a.len().max(b.len());
    for i in 0..n {
        let ord = weight(a.get(i).copied()).cmp(&weight(b.get(i).copied()));
        if ord != Ordering::Equal {
            return ord;
        }
    }
    Ordering::Equal
}

fn compare_digits(a: &[u8], b: &[u8]) -> Ordering {
    let trim = |s: &[u8]| -> usize { s.iter().position(|&c| c != b'0').unwrap_or(s.len()) };
    let (a, b) = (&a[trim(a)..], &b[trim(b)..]);
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_order_like_dpkg() {
        let ordered = [
            "0.9", "1.0~rc1", "1.0~rc2", "1.0", "1.0a", "1.0.0", "1.0.1", "1.2", "1.10", "2024.9",
            "2024.10",
        ];
        for w in ordered.windows(2) {
            assert_eq!(
                compare_versions(w[0], w[1]),
                Ordering::Less,
                "{} < {}",
                w[0],
                w[1]
            );
            assert_eq!(
                compare_versions(w[1], w[0]),
                Ordering::Greater,
                "{} > {}",
                w[1],
                w[0]
            );
        }
        assert_eq!(compare_versions("1.02", "1.2"), Ordering::Equal);
        assert_eq!(compare_versions("1.2.3", "1.2.3"), Ordering::Equal);
    }

    fn index(versions: &[&str], max: Option<&str>) -> ChannelIndex {
        let mut idx = ChannelIndex::empty("stable");
        for v in versions {
            idx.releases.push(ReleaseEntry {
                version: (*v).into(),
                manifest: manifest_target("minimal", v),
            });
        }
        idx.max_version = max.map(Into::into);
        idx
    }

    #[test]
    fn delta_bases_are_the_newest_older_versions() {
        let idx = index(&["1.0", "1.10", "1.2", "1.9", "2.0"], None);
        assert_eq!(idx.delta_bases("1.11", 3), vec!["1.10", "1.9", "1.2"]);
        assert_eq!(idx.delta_bases("1.1", 3), vec!["1.0"]);
        assert!(idx.delta_bases("0.1", 3).is_empty());
    }

    #[test]
    fn update_target_follows_max_version() {
        let target = |idx: &ChannelIndex, running: &str| {
            idx.update_target(running).map(|r| r.version.clone())
        };
        let normal = index(&["1.0", "1.1", "1.2"], None);
        assert_eq!(target(&normal, "1.0").as_deref(), Some("1.2"));
        assert_eq!(target(&normal, "1.2"), None);
        // A node ahead of the channel (e.g. installed from a newer ISO) is not downgraded.
        assert_eq!(target(&normal, "1.3"), None);

        let capped = index(&["1.0", "1.1", "1.2", "1.1.5"], Some("1.1.5"));
        assert_eq!(
            target(&capped, "1.2").as_deref(),
            Some("1.1.5"),
            "downgrade"
        );
        assert_eq!(
            target(&capped, "1.0").as_deref(),
            Some("1.1.5"),
            "capped update"
        );
        assert_eq!(target(&capped, "1.1.5"), None);

        assert_eq!(target(&ChannelIndex::empty("x"), "1.0"), None);
    }

    #[test]
    fn newest_uses_version_order_not_publication_order() {
        let mut idx = ChannelIndex::empty("stable");
        for v in ["1.10", "1.9", "1.2"] {
            idx.releases.push(ReleaseEntry {
                version: v.into(),
                manifest: manifest_target("minimal", v),
            });
        }
        assert_eq!(idx.newest().map(|r| r.version.as_str()), Some("1.10"));
        assert_eq!(
            idx.find("1.9").map(|r| r.manifest.as_str()),
            Some("minimal-1.9.release.json")
        );
        assert!(idx.find("1.3").is_none());
    }
}
