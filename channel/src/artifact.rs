//! Signed build outputs: `SHA256SUMS` plus a detached ed25519 signature over its exact
//! bytes (`SHA256SUMS.sig`, the raw 64-byte signature).
//!
//! This module owns signing a sums file and verifying one artifact against it: signature
//! first, then the listing, then the artifact's hash. It must never accept an artifact
//! whose sums file is unsigned or whose signature does not verify, and must never parse
//! the sums file from bytes other than the ones whose signature it checked.
//!
//! The signature is interoperable: `openssl pkeyutl -verify -pubin -inkey KEY.pem -rawin
//! -in SHA256SUMS -sigfile SHA256SUMS.sig` accepts it (with the public key in PEM form).

use anyhow::Context;
use ed25519_dalek::{Signature, Signer, VerifyingKey};
use sha2::{Digest, Sha256};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::keys;

/// File name of the sums file the builder writes.
pub const SUMS_FILE: &str = "SHA256SUMS";

/// Suffix appended to the sums file's name for its detached signature.
pub const SIGNATURE_SUFFIX: &str = ".sig";

/// Why an artifact was not accepted. The updater and `imgbuild flash` map these to exit
/// codes, so each refusal has its own variant.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// There is no signature next to the sums file.
    #[error("{} is unsigned: {} does not exist", sums.display(), sig.display())]
    Unsigned {
        /// The sums file.
        sums: PathBuf,
        /// Where its signature should be.
        sig: PathBuf,
    },
    /// The signature does not verify with the given public key.
    #[error("the signature {} does not verify {} with the given key", sig.display(), sums.display())]
    BadSignature {
        /// The sums file.
        sums: PathBuf,
        /// The signature file.
        sig: PathBuf,
    },
    /// The sums file is signed but does not list the artifact.
    #[error("{name} is not listed in {}", sums.display())]
    NotListed {
        /// The artifact's file name.
        name: String,
        /// The sums file.
        sums: PathBuf,
    },
    /// The artifact's sha256 differs from the signed listing.
    #[error("{} has sha256 {actual}, the signed SHA256SUMS says {expected}", artifact.display())]
    HashMismatch {
        /// The artifact.
        artifact: PathBuf,
        /// sha256 in the signed sums file.
        expected: String,
        /// sha256 of the artifact as read.
        actual: String,
    },
    /// The signed sums file has a line that is not `HASH  NAME`.
    #[error("{} line {line}: not a sha256sum line", sums.display())]
    Malformed {
        /// The sums file.
        sums: PathBuf,
        /// 1-based line number.
        line: usize,
    },
    /// Reading a file failed.
    #[error("reading {}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// Path of the detached signature of `sums`: `SHA256SUMS.sig`.
pub fn signature_path(sums: &Path) -> PathBuf {
    let mut s = sums.as_os_str().to_owned();
    s.push(SIGNATURE_SUFFIX);
    PathBuf::from(s)
}

/// Signs the exact bytes of `sums` with the private key at `key` and writes the detached
/// signature to [`signature_path`]`(sums)` (replacing an older one atomically).
pub fn sign_sums(sums: &Path, key: &Path) -> anyhow::Result<PathBuf> {
    let signing = keys::load_signing_key(key)
        .with_context(|| format!("loading the signing key {}", key.display()))?;
    let bytes = fs::read(sums).with_context(|| format!("reading {}", sums.display()))?;
    let sig = signing.sign(&bytes);
    let sig_path = signature_path(sums);
    let dir = match sig_path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".sig-")
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    tmp.write_all(&sig.to_bytes())
        .with_context(|| format!("writing {}", tmp.path().display()))?;
    tmp.persist(&sig_path)
        .with_context(|| format!("writing {}", sig_path.display()))?;
    Ok(sig_path)
}

/// Checks the signature of `sums` and returns its verified bytes.
pub fn verify_sums(sums: &Path, sig: &Path, key: &VerifyingKey) -> Result<Vec<u8>, VerifyError> {
    let sig_bytes = match fs::read(sig) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(VerifyError::Unsigned {
                sums: sums.to_owned(),
                sig: sig.to_owned(),
            })
        }
        Err(source) => {
            return Err(VerifyError::Io {
                path: sig.to_owned(),
                source,
            })
        }
    };
    let bytes = fs::read(sums).map_err(|source| VerifyError::Io {
        path: sums.to_owned(),
        source,
    })?;
    let bad = || VerifyError::BadSignature {
        sums: sums.to_owned(),
        sig: sig.to_owned(),
    };
    let signature = Signature::from_slice(&sig_bytes).map_err(|_| bad())?;
    key.verify_strict(&bytes, &signature).map_err(|_| bad())?;
    Ok(bytes)
}

/// Parses `sha256sum` output (`HASH  NAME` or `HASH *NAME`) into (name, hash) pairs.
fn parse_sums(sums: &Path, bytes: &[u8]) -> Result<Vec<(String, String)>, VerifyError> {
    let malformed = |line| VerifyError::Malformed {
        sums: sums.to_owned(),
        line,
    };
    let text = std::str::from_utf8(bytes).map_err(|_| malformed(0))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let (hash, rest) = line.split_once(' ').ok_or_else(|| malformed(i + 1))?;
        let name = rest
            .strip_prefix(' ')
            .or_else(|| rest.strip_prefix('*'))
            .ok_or_else(|| malformed(i + 1))?;
        if hash.len() != 64 || !hash.bytes().all(|c| c.is_ascii_hexdigit()) || name.is_empty() {
            return Err(malformed(i + 1));
        }
        out.push((name.to_owned(), hash.to_ascii_lowercase()));
    }
    Ok(out)
}

/// Verifies `artifact` against the signed `sums` file: the signature `sig` first (with
/// `key`), then that the artifact's file name is listed, then its sha256.
pub fn verify_artifact(
    artifact: &Path,
    sums: &Path,
    sig: &Path,
    key: &VerifyingKey,
) -> Result<(), VerifyError> {
    let bytes = verify_sums(sums, sig, key)?;
    let listing = parse_sums(sums, &bytes)?;
    let name = artifact
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let expected = listing
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, h)| h)
        .ok_or_else(|| VerifyError::NotListed {
            name: name.clone(),
            sums: sums.to_owned(),
        })?;
    let actual = sha256_file(artifact).map_err(|source| VerifyError::Io {
        path: artifact.to_owned(),
        source,
    })?;
    if actual != expected {
        return Err(VerifyError::HashMismatch {
            artifact: artifact.to_owned(),
            expected,
            actual,
        });
    }
    Ok(())
}

/// sha256 (hex) of a file, streamed.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = fs::File::open(path)?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(hex::encode(h.finalize()))
}
