//! A signed `SHA256SUMS` as the installer checks it: the same format `imgbuild build
//! --key` writes (`imgchannel::artifact`): the detached signature is the raw 64-byte
//! ed25519 signature over the file's exact bytes, the public key 64 hex digits.
//!
//! Owns checking the signature and then reading the listing out of the very bytes that
//! were checked. It never parses a sums file whose signature it has not verified, and it
//! never reads a file twice to verify it (a caller hashes once, then uses what it hashed).

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, VerifyingKey};
use sha2::{Digest, Sha256};

/// Why a payload was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("the signature does not verify SHA256SUMS with the installer's public key")]
    BadSignature,
    #[error("the public key is not 64 hex digits of an ed25519 key: {0}")]
    BadKey(String),
    #[error("the public key's sha256 is {actual}, but imgbuild.pubkey-sha256= pins {pinned}")]
    KeyNotPinned { actual: String, pinned: String },
    #[error("SHA256SUMS line {0} is not a sha256sum line")]
    Malformed(usize),
    #[error("{0} is not listed in the signed SHA256SUMS")]
    NotListed(String),
    #[error("{name} has sha256 {actual}, the signed SHA256SUMS says {expected}")]
    HashMismatch {
        name: String,
        expected: String,
        actual: String,
    },
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Parses a public key file's text: 64 hex digits (what the builder embeds).
pub fn parse_public_key(text: &str) -> Result<VerifyingKey, VerifyError> {
    let bytes: [u8; 32] = hex::decode(text.trim())
        .map_err(|e| VerifyError::BadKey(e.to_string()))?
        .try_into()
        .map_err(|v: Vec<u8>| VerifyError::BadKey(format!("{} bytes", v.len())))?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| VerifyError::BadKey(e.to_string()))
}

/// sha256 (hex) of a public key's 32 bytes: what `imgbuild.pubkey-sha256=` pins.
pub fn key_fingerprint(key: &VerifyingKey) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// A verified listing: (file name, sha256 hex) pairs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sums(Vec<(String, String)>);

impl Sums {
    /// Checks `sig` over `bytes` with `key` (strict ed25519), then parses the listing.
    pub fn verify(bytes: &[u8], sig: &[u8], key: &VerifyingKey) -> Result<Sums, VerifyError> {
        let signature = Signature::from_slice(sig).map_err(|_| VerifyError::BadSignature)?;
        key.verify_strict(bytes, &signature)
            .map_err(|_| VerifyError::BadSignature)?;
        let text = std::str::from_utf8(bytes).map_err(|_| VerifyError::Malformed(0))?;
        let mut out = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let (hash, rest) = line.split_once(' ').ok_or(VerifyError::Malformed(i + 1))?;
            let name = rest
                .strip_prefix(' ')
                .or_else(|| rest.strip_prefix('*'))
                .ok_or(VerifyError::Malformed(i + 1))?;
            if hash.len() != 64 || !hash.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(VerifyError::Malformed(i + 1));
            }
            out.push((name.to_owned(), hash.to_ascii_lowercase()));
        }
        Ok(Sums(out))
    }

    /// The signed sha256 of `name`.
    pub fn get(&self, name: &str) -> Result<&str, VerifyError> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, h)| h.as_str())
            .ok_or_else(|| VerifyError::NotListed(name.to_owned()))
    }

    /// Names listed, in file order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(n, _)| n.as_str())
    }

    /// Hashes the file at `path` and compares it with the signed hash of `name`.
    pub fn check_file(&self, name: &str, path: &Path) -> Result<(), VerifyError> {
        let expected = self.get(name)?;
        let actual = sha256_file(path).map_err(|source| VerifyError::Io {
            path: path.to_owned(),
            source,
        })?;
        if actual != expected {
            return Err(VerifyError::HashMismatch {
                name: name.to_owned(),
                expected: expected.to_owned(),
                actual,
            });
        }
        Ok(())
    }
}

/// sha256 (hex) of everything `r` yields, in 4 MiB reads.
pub fn sha256_reader(mut r: impl Read) -> std::io::Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// sha256 (hex) of a file.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    sha256_reader(fs::File::open(path)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};

    #[test]
    fn verifies_then_parses_and_rejects_tampering() {
        let key = SigningKey::generate(&mut rand_core::OsRng);
        let sums = format!("{}  a.raw\n{} *b.zst\n", "ab".repeat(32), "CD".repeat(32));
        let sig = key.sign(sums.as_bytes()).to_bytes();
        let vk = parse_public_key(&hex::encode(key.verifying_key().as_bytes())).unwrap();
        let s = Sums::verify(sums.as_bytes(), &sig, &vk).unwrap();
        assert_eq!(s.get("a.raw").unwrap(), "ab".repeat(32));
        assert_eq!(s.get("b.zst").unwrap(), "cd".repeat(32));
        assert!(matches!(s.get("c"), Err(VerifyError::NotListed(_))));

        let tampered = sums.replace("ab", "ac");
        assert!(matches!(
            Sums::verify(tampered.as_bytes(), &sig, &vk),
            Err(VerifyError::BadSignature)
        ));
        let other = SigningKey::generate(&mut rand_core::OsRng).verifying_key();
        assert!(matches!(
            Sums::verify(sums.as_bytes(), &sig, &other),
            Err(VerifyError::BadSignature)
        ));
        assert!(matches!(
            Sums::verify(sums.as_bytes(), &sig[..10], &vk),
            Err(VerifyError::BadSignature)
        ));
        assert!(parse_public_key("zz").is_err());
    }

    #[test]
    fn file_hash_is_compared_with_the_signed_one() {
        let key = SigningKey::generate(&mut rand_core::OsRng);
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("x");
        fs::write(&f, b"hello").unwrap();
        let sums = format!("{}  x\n", sha256_file(&f).unwrap());
        let sig = key.sign(sums.as_bytes()).to_bytes();
        let s = Sums::verify(sums.as_bytes(), &sig, &key.verifying_key()).unwrap();
        s.check_file("x", &f).unwrap();
        fs::write(&f, b"hellO").unwrap();
        assert!(matches!(
            s.check_file("x", &f),
            Err(VerifyError::HashMismatch { .. })
        ));
    }
}
