//! Pinned artifacts (`[[artifacts]]`): files fetched by URL or from a mirror directory,
//! verified by sha256, and installed into the composed tree.
//!
//! This module owns where artifact bytes come from and that they are the pinned ones:
//! a mirror directory first (by the URL's file name; air-gapped builds), then the
//! download cache (files named by their sha256), then the URL itself (`file:` or
//! `http(s)` through `curl`, arguments passed as a list, never through a shell). A
//! digest mismatch stops the build and names the expected and actual sha256; an
//! unverified byte is never installed or cached under a digest name. Archives are
//! unpacked in memory and only the listed members are written.

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::compose::write_image_file;
use crate::recipe::{ArtifactInstall, PinnedArtifact, Recipe};

/// Downloaded artifacts are kept here, named by sha256, and reused by every build.
pub const DEFAULT_ARTIFACT_CACHE: &str = "/var/cache/imgbuild/artifacts";

/// Where artifacts may come from besides their URLs.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Cache of verified downloads, one file per sha256.
    pub cache_dir: PathBuf,
    /// Mirror directory holding artifacts by file name; overrides the recipe's.
    pub mirror: Option<PathBuf>,
}

/// An artifact that could not be provided.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("artifact {name}: sha256 mismatch for {origin}: expected {expected}, got {actual}")]
    Mismatch {
        name: String,
        origin: String,
        expected: String,
        actual: String,
    },
    #[error(
        "artifact {name}: {file} is in no mirror or cache and could not be downloaded ({tried})"
    )]
    Unavailable {
        name: String,
        file: String,
        tried: String,
    },
    #[error("artifact {name}: {what}: {source}")]
    Io {
        name: String,
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("artifact {name}: {file}: {message}")]
    Archive {
        name: String,
        file: String,
        message: String,
    },
}

/// An artifact and the verified local file holding its bytes.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub artifact: PinnedArtifact,
    pub path: PathBuf,
}

/// sha256 of a file, hex.
pub fn sha256_of(path: &Path) -> io::Result<String> {
    let mut f = fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Fetch and verify every artifact of the recipe (before any other work, so a bad pin
/// stops the build early). `--mirror` wins over the recipe's `downloads.mirror`.
pub fn fetch_all(
    recipe: &Recipe,
    opts: &FetchOptions,
    progress: &dyn Fn(&str),
) -> Result<Vec<Fetched>, ArtifactError> {
    let opts = FetchOptions {
        cache_dir: opts.cache_dir.clone(),
        mirror: opts.mirror.clone().or(recipe.downloads.mirror.clone()),
    };
    recipe
        .artifacts
        .iter()
        .map(|a| {
            progress(&format!("artifact {} ({})", a.name, a.file_name()));
            Ok(Fetched {
                artifact: a.clone(),
                path: fetch(a, &opts)?,
            })
        })
        .collect()
}

/// A verified local file with the artifact's bytes: from the mirror, the cache, or the URL.
pub fn fetch(a: &PinnedArtifact, opts: &FetchOptions) -> Result<PathBuf, ArtifactError> {
    let io_err = |what: String| {
        let name = a.name.clone();
        move |source| ArtifactError::Io { name, what, source }
    };
    let check = |path: &Path, origin: String| -> Result<(), ArtifactError> {
        let actual = sha256_of(path).map_err(io_err(format!("reading {}", path.display())))?;
        if actual == a.sha256 {
            Ok(())
        } else {
            Err(ArtifactError::Mismatch {
                name: a.name.clone(),
                origin,
                expected: a.sha256.clone(),
                actual,
            })
        }
    };
    let mut tried = Vec::new();
    if let Some(dir) = &opts.mirror {
        let p = dir.join(a.file_name());
        if p.is_file() {
            check(&p, p.display().to_string())?;
            return Ok(p);
        }
        tried.push(format!("mirror {}", p.display()));
    }
    let cached = opts.cache_dir.join(&a.sha256);
    if cached.is_file() {
        match check(&cached, cached.display().to_string()) {
            Ok(()) => return Ok(cached),
            // A damaged cache entry is dropped and fetched again.
            Err(ArtifactError::Mismatch { .. }) => fs::remove_file(&cached)
                .map_err(io_err(format!("removing {}", cached.display())))?,
            Err(e) => return Err(e),
        }
    }
    tried.push(format!("cache {}", cached.display()));
    fs::create_dir_all(&opts.cache_dir)
        .map_err(io_err(format!("creating {}", opts.cache_dir.display())))?;
    let part = opts.cache_dir.join(format!("{}.part", a.sha256));
    let got = if let Some(local) = a
        .url
        .strip_prefix("file://")
        .or(a.url.strip_prefix("file:"))
    {
        fs::copy(local, &part)
            .map(|_| ())
            .map_err(|e| e.to_string())
    } else {
        download(&a.url, &part)
    };
    if let Err(message) = got {
        let _ = fs::remove_file(&part);
        tried.push(format!("{}: {message}", a.url));
        return Err(ArtifactError::Unavailable {
            name: a.name.clone(),
            file: a.file_name().to_string(),
            tried: tried.join("; "),
        });
    }
    if let Err(e) = check(&part, a.url.clone()) {
        let _ = fs::remove_file(&part);
        return Err(e);
    }
    fs::rename(&part, &cached).map_err(io_err(format!("renaming to {}", cached.display())))?;
    Ok(cached)
}

/// `curl` to a file: only http(s), redirects followed, errors as HTTP status.
fn download(url: &str, to: &Path) -> Result<(), String> {
    let out = Command::new("curl")
        .args(["--fail", "--silent", "--show-error", "--location"])
        .args(["--proto", "=http,https", "--proto-redir", "=https"])
        .args(["--connect-timeout", "20", "--retry", "2", "--output"])
        .arg(to)
        .arg("--")
        .arg(url)
        .output()
        .map_err(|e| format!("running curl: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// Write the fetched artifacts into the tree at `root`.
pub fn install(root: &Path, fetched: &[Fetched]) -> anyhow::Result<()> {
    for f in fetched {
        let a = &f.artifact;
        match &a.install {
            ArtifactInstall::File { dest } => {
                let data = fs::read(&f.path).map_err(|source| ArtifactError::Io {
                    name: a.name.clone(),
                    what: format!("reading {}", f.path.display()),
                    source,
                })?;
                write_image_file(root, dest, &data, a.mode)?;
            }
            ArtifactInstall::TarGz { .. } => {
                // Fails unless every listed member is in the archive.
                for (dest, data) in extract_tar_gz(a, &f.path)? {
                    write_image_file(root, &dest, &data, a.mode)?;
                }
            }
        }
    }
    Ok(())
}

fn normalise_member(p: &str) -> String {
    let mut s = p;
    while let Some(rest) = s.strip_prefix("./") {
        s = rest;
    }
    s.trim_end_matches('/').to_string()
}

/// The listed members of a `.tar.gz` (regular files only) as (image path, bytes).
pub fn extract_tar_gz(
    a: &PinnedArtifact,
    archive: &Path,
) -> Result<Vec<(String, Vec<u8>)>, ArtifactError> {
    let ArtifactInstall::TarGz { members } = &a.install else {
        return Ok(Vec::new());
    };
    let err = |message: String| ArtifactError::Archive {
        name: a.name.clone(),
        file: archive.display().to_string(),
        message,
    };
    let wanted: Vec<(String, &String)> = members
        .iter()
        .map(|(m, dest)| (normalise_member(m), dest))
        .collect();
    let file = fs::File::open(archive).map_err(|e| err(e.to_string()))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let mut out: Vec<(String, Vec<u8>)> = Vec::new();
    let mut found = vec![false; wanted.len()];
    for entry in tar.entries().map_err(|e| err(e.to_string()))? {
        let mut entry = entry.map_err(|e| err(e.to_string()))?;
        let path = entry.path().map_err(|e| err(e.to_string()))?;
        let name = normalise_member(&path.to_string_lossy());
        let Some(i) = wanted.iter().position(|(m, _)| *m == name) else {
            continue;
        };
        if !entry.header().entry_type().is_file() {
            return Err(err(format!("member {name:?} is not a regular file")));
        }
        let mut data = Vec::new();
        entry
            .read_to_end(&mut data)
            .map_err(|e| err(format!("reading {name:?}: {e}")))?;
        found[i] = true;
        out.push((wanted[i].1.clone(), data));
    }
    let missing: Vec<&str> = wanted
        .iter()
        .zip(&found)
        .filter(|(_, f)| !**f)
        .map(|((m, _), _)| m.as_str())
        .collect();
    if !missing.is_empty() {
        return Err(err(format!(
            "members not in the archive: {}",
            missing.join(", ")
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn pinned(name: &str, url: &str, data: &[u8], install: ArtifactInstall) -> PinnedArtifact {
        PinnedArtifact {
            name: name.into(),
            url: url.into(),
            sha256: hex::encode(Sha256::digest(data)),
            install,
            mode: 0o755,
        }
    }

    fn file_dest(dest: &str) -> ArtifactInstall {
        ArtifactInstall::File { dest: dest.into() }
    }

    #[test]
    fn mirror_file_is_used_by_url_file_name() {
        let dir = tempfile::tempdir().unwrap();
        let mirror = dir.path().join("mirror");
        fs::create_dir(&mirror).unwrap();
        fs::write(mirror.join("kubelet"), b"kubelet bytes").unwrap();
        let a = pinned(
            "kubelet",
            "https://dl.k8s.io/release/v1.34.4/bin/linux/amd64/kubelet",
            b"kubelet bytes",
            file_dest("/usr/bin/kubelet"),
        );
        let opts = FetchOptions {
            cache_dir: dir.path().join("cache"),
            mirror: Some(mirror.clone()),
        };
        assert_eq!(fetch(&a, &opts).unwrap(), mirror.join("kubelet"));
    }

    #[test]
    fn sha256_mismatch_names_expected_and_actual() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("kubelet"), b"tampered").unwrap();
        let a = pinned(
            "kubelet",
            "https://example.invalid/kubelet",
            b"original",
            file_dest("/usr/bin/kubelet"),
        );
        let e = fetch(
            &a,
            &FetchOptions {
                cache_dir: dir.path().join("cache"),
                mirror: Some(dir.path().to_path_buf()),
            },
        )
        .unwrap_err();
        let actual = hex::encode(Sha256::digest(b"tampered"));
        let msg = e.to_string();
        assert!(msg.contains(&a.sha256), "{msg}");
        assert!(msg.contains(&actual), "{msg}");
        assert!(matches!(e, ArtifactError::Mismatch { .. }));
        assert!(!dir.path().join("cache").join(&a.sha256).exists());
    }

    #[test]
    fn file_urls_are_cached_under_their_digest_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("crictl.bin");
        fs::write(&src, b"v1").unwrap();
        let a = pinned(
            "crictl",
            &format!("file://{}", src.display()),
            b"v1",
            file_dest("/usr/bin/crictl"),
        );
        let opts = FetchOptions {
            cache_dir: dir.path().join("cache"),
            mirror: None,
        };
        let p = fetch(&a, &opts).unwrap();
        assert_eq!(p, dir.path().join("cache").join(&a.sha256));
        // The cache answers even when the source is gone.
        fs::remove_file(&src).unwrap();
        assert_eq!(fetch(&a, &opts).unwrap(), p);
        // A damaged cache entry is not trusted.
        fs::write(&p, b"rot").unwrap();
        assert!(matches!(
            fetch(&a, &opts),
            Err(ArtifactError::Unavailable { .. })
        ));
        assert!(!p.exists());
    }

    #[test]
    fn wrong_download_is_not_cached() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("x");
        fs::write(&src, b"other").unwrap();
        let a = pinned(
            "x",
            &format!("file://{}", src.display()),
            b"pinned",
            file_dest("/x"),
        );
        let opts = FetchOptions {
            cache_dir: dir.path().join("cache"),
            mirror: None,
        };
        assert!(matches!(
            fetch(&a, &opts),
            Err(ArtifactError::Mismatch { .. })
        ));
        assert_eq!(fs::read_dir(dir.path().join("cache")).unwrap().count(), 0);
    }

    #[test]
    fn missing_everywhere_lists_what_was_tried() {
        let dir = tempfile::tempdir().unwrap();
        let a = pinned(
            "kubeadm",
            "file:///nonexistent/kubeadm",
            b"x",
            file_dest("/usr/bin/kubeadm"),
        );
        let e = fetch(
            &a,
            &FetchOptions {
                cache_dir: dir.path().join("cache"),
                mirror: Some(dir.path().join("empty-mirror")),
            },
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("empty-mirror/kubeadm"), "{msg}");
        assert!(msg.contains("/nonexistent/kubeadm"), "{msg}");
    }

    fn tar_gz(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let mut b = tar::Builder::new(gz);
        for (name, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o755);
            h.set_cksum();
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap().finish().unwrap()
    }

    #[test]
    fn tar_gz_members_are_installed_and_others_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let archive = tar_gz(&[
            ("./bridge", b"bridge"),
            ("./loopback", b"loopback"),
            ("./README", b"ignored"),
        ]);
        let path = dir.path().join("cni.tgz");
        fs::write(&path, &archive).unwrap();
        let members: BTreeMap<String, String> = [
            ("bridge".to_string(), "/opt/cni/bin/bridge".to_string()),
            (
                "./loopback".to_string(),
                "/opt/cni/bin/loopback".to_string(),
            ),
        ]
        .into();
        let a = pinned(
            "cni",
            "https://example.invalid/cni.tgz",
            &archive,
            ArtifactInstall::TarGz { members },
        );
        let root = dir.path().join("root");
        fs::create_dir(&root).unwrap();
        install(
            &root,
            &[Fetched {
                artifact: a.clone(),
                path: path.clone(),
            }],
        )
        .unwrap();
        assert_eq!(
            fs::read(root.join("opt/cni/bin/bridge")).unwrap(),
            b"bridge"
        );
        assert_eq!(
            fs::read(root.join("opt/cni/bin/loopback")).unwrap(),
            b"loopback"
        );
        assert!(!root.join("opt/cni/bin/README").exists());
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(root.join("opt/cni/bin/bridge"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o755);

        let mut missing = a;
        missing.install = ArtifactInstall::TarGz {
            members: [("portmap".to_string(), "/opt/cni/bin/portmap".to_string())].into(),
        };
        let e = extract_tar_gz(&missing, &path).unwrap_err();
        assert!(e.to_string().contains("portmap"), "{e}");
    }
}
