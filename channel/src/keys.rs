//! ed25519 key files: generation, loading, and the TUF form of a public key.
//!
//! This module owns the on-disk form of imgbuild's signing keys: the private key is a
//! PKCS#8 DER document (what `tough::key_source::LocalKeySource` parses; `tough` does not
//! take PEM for ed25519), created with mode 0600 and never overwritten; the public key sits
//! next to it as `NAME.pub`, a TUF key object (`{"keytype":"ed25519","keyval":{"public":
//! HEX},"scheme":"ed25519"}`). It must never write a private key anywhere else, widen a
//! key file's mode, or load a private key that group or others can read.

use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use ed25519_dalek::{SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::{self, Permissions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use tough::schema::key::{Ed25519Key, Ed25519Scheme, Key};

/// Mode of a private key file.
pub const PRIVATE_KEY_MODE: u32 = 0o600;

/// Errors about key files; callers branch on [`KeyError::Exists`] and [`KeyError::Insecure`].
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Refusing to overwrite an existing key file.
    #[error("{} already exists; refusing to overwrite a key", path.display())]
    Exists {
        /// The existing file.
        path: PathBuf,
    },
    /// The private key file can be read by group or others.
    #[error(
        "{} has mode {mode:04o}: a private key must not be readable by group or others (chmod 600)",
        path.display()
    )]
    Insecure {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file is not a key of the expected form.
    #[error("{} is not a valid {what}: {reason}", path.display())]
    Malformed {
        /// The key file.
        path: PathBuf,
        /// What was expected.
        what: &'static str,
        /// Why it was rejected.
        reason: String,
    },
    /// Reading or writing failed.
    #[error("{action} {}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// The public half of a generated key, as `keys generate` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PublicKeyInfo {
    /// TUF key ID (hex sha256 of the canonical key object): what root.json lists.
    pub key_id: String,
    /// The raw 32-byte ed25519 public key, hex.
    pub public_hex: String,
    /// The private key file (PKCS#8 DER, mode 0600).
    pub private_path: PathBuf,
    /// The public key file (`NAME.pub`, TUF key JSON).
    pub public_path: PathBuf,
}

/// Path of the public key that belongs to the private key at `private`: `NAME.pub`.
pub fn public_key_path(private: &Path) -> PathBuf {
    private.with_extension("pub")
}

/// Generates an ed25519 key: writes the private key to `path` (PKCS#8 DER, created with
/// mode 0600, appearing atomically and never overwriting) and the public key to
/// [`public_key_path`]`(path)`.
pub fn generate(path: &Path) -> Result<PublicKeyInfo, KeyError> {
    let pub_path = public_key_path(path);
    if pub_path == path {
        return Err(KeyError::Malformed {
            path: path.to_owned(),
            what: "private key path",
            reason: "it must not end in .pub".into(),
        });
    }
    for p in [path, pub_path.as_path()] {
        if p.symlink_metadata().is_ok() {
            return Err(KeyError::Exists { path: p.to_owned() });
        }
    }
    let signing = SigningKey::generate(&mut rand_core::OsRng);
    // PKCS#8 v1 (private key only): tough/aws-lc-rs take v1 and v2, but OpenSSL 3.0
    // cannot read the v2 document ed25519-dalek writes, and operators use openssl.
    let v1 = ed25519_dalek::pkcs8::KeypairBytes {
        secret_key: signing.to_bytes(),
        public_key: None,
    };
    let der = v1.to_pkcs8_der().map_err(|e| KeyError::Malformed {
        path: path.to_owned(),
        what: "PKCS#8 document",
        reason: e.to_string(),
    })?;
    write_new(path, der.as_bytes(), PRIVATE_KEY_MODE)?;

    let verifying = signing.verifying_key();
    let mut json =
        serde_json::to_vec_pretty(&tuf_key(&verifying)).map_err(|e| KeyError::Malformed {
            path: pub_path.clone(),
            what: "TUF key",
            reason: e.to_string(),
        })?;
    json.push(b'\n');
    write_new(&pub_path, &json, 0o644)?;

    Ok(PublicKeyInfo {
        key_id: key_id(&verifying)?,
        public_hex: hex::encode(verifying.as_bytes()),
        private_path: path.to_owned(),
        public_path: pub_path,
    })
}

/// Writes `bytes` to a new file at `path` with `mode` from the moment it exists: a
/// temporary file with that mode in the same directory, linked into place without
/// replacing anything.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), KeyError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let io = |action, source| KeyError::Io {
        action,
        path: path.to_owned(),
        source,
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".imgbuild-key-")
        .permissions(Permissions::from_mode(mode))
        .tempfile_in(dir)
        .map_err(|e| io("creating a temporary file next to", e))?;
    tmp.write_all(bytes).map_err(|e| io("writing", e))?;
    tmp.as_file().sync_all().map_err(|e| io("syncing", e))?;
    tmp.persist_noclobber(path).map_err(|e| {
        if e.error.kind() == std::io::ErrorKind::AlreadyExists {
            KeyError::Exists {
                path: path.to_owned(),
            }
        } else {
            io("moving into place", e.error)
        }
    })?;
    Ok(())
}

/// Refuses a private key file that group or others can access, or that is not a regular
/// file. Called before every use of a private key, including by `tough` signing.
pub fn check_private_key_file(path: &Path) -> Result<(), KeyError> {
    let meta = fs::metadata(path).map_err(|source| KeyError::Io {
        action: "reading the metadata of",
        path: path.to_owned(),
        source,
    })?;
    if !meta.is_file() {
        return Err(KeyError::Malformed {
            path: path.to_owned(),
            what: "private key",
            reason: "not a regular file".into(),
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Insecure {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// Loads a private key (PKCS#8 DER, v1 or v2), after [`check_private_key_file`].
pub fn load_signing_key(path: &Path) -> Result<SigningKey, KeyError> {
    check_private_key_file(path)?;
    let der = fs::read(path).map_err(|source| KeyError::Io {
        action: "reading",
        path: path.to_owned(),
        source,
    })?;
    SigningKey::from_pkcs8_der(&der).map_err(|e| KeyError::Malformed {
        path: path.to_owned(),
        what: "ed25519 PKCS#8 DER private key",
        reason: e.to_string(),
    })
}

#[derive(Deserialize)]
struct TufKeyFile {
    keytype: String,
    keyval: HashMap<String, String>,
}

/// Loads a public key: a TUF key JSON (`NAME.pub` as [`generate`] writes it) or a file
/// holding only the 64 hex digits of the key.
pub fn load_public_key(path: &Path) -> Result<VerifyingKey, KeyError> {
    let text = fs::read_to_string(path).map_err(|source| KeyError::Io {
        action: "reading",
        path: path.to_owned(),
        source,
    })?;
    let malformed = |reason: String| KeyError::Malformed {
        path: path.to_owned(),
        what: "ed25519 public key",
        reason,
    };
    let hex_key = if text.trim_start().starts_with('{') {
        let k: TufKeyFile = serde_json::from_str(&text).map_err(|e| malformed(e.to_string()))?;
        if k.keytype != "ed25519" {
            return Err(malformed(format!("key type {:?}", k.keytype)));
        }
        k.keyval
            .get("public")
            .cloned()
            .ok_or_else(|| malformed("no keyval.public".into()))?
    } else {
        text.trim().to_owned()
    };
    let bytes: [u8; 32] = hex::decode(&hex_key)
        .map_err(|e| malformed(e.to_string()))?
        .try_into()
        .map_err(|v: Vec<u8>| malformed(format!("{} bytes, expected 32", v.len())))?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| malformed(e.to_string()))
}

/// The TUF key object of an ed25519 public key.
pub fn tuf_key(key: &VerifyingKey) -> Key {
    Key::Ed25519 {
        keyval: Ed25519Key {
            public: key.as_bytes().to_vec().into(),
            _extra: HashMap::new(),
        },
        scheme: Ed25519Scheme::Ed25519,
        _extra: HashMap::new(),
    }
}

/// The TUF key ID (hex) of an ed25519 public key: sha256 of its canonical JSON.
pub fn key_id(key: &VerifyingKey) -> Result<String, KeyError> {
    tuf_key(key)
        .key_id()
        .map(|id| hex::encode(AsRef::<[u8]>::as_ref(&id)))
        .map_err(|e| KeyError::Malformed {
            path: PathBuf::new(),
            what: "TUF key object",
            reason: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_key_is_0600_and_tough_parses_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("root.key");
        let info = generate(&path).unwrap();
        assert_eq!(info.public_path, dir.path().join("root.pub"));
        let mode = fs::metadata(&path).unwrap().mode() & 0o7777;
        assert_eq!(mode, 0o600);

        // tough's own parser (what LocalKeySource uses) accepts the file and derives the
        // same public key as the .pub file.
        let der = fs::read(&path).unwrap();
        let sign = tough::sign::parse_keypair(&der).unwrap();
        let public = load_public_key(&info.public_path).unwrap();
        assert_eq!(tough::sign::Sign::tuf_key(&sign), tuf_key(&public));
        assert_eq!(hex::encode(public.as_bytes()), info.public_hex);
        assert_eq!(info.key_id.len(), 64);

        let signing = load_signing_key(&path).unwrap();
        assert_eq!(signing.verifying_key(), public);
    }

    #[test]
    fn generate_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.key");
        fs::write(&path, b"precious").unwrap();
        assert!(matches!(generate(&path), Err(KeyError::Exists { .. })));
        assert_eq!(fs::read(&path).unwrap(), b"precious");

        let path2 = dir.path().join("other.key");
        fs::write(dir.path().join("other.pub"), b"x").unwrap();
        assert!(matches!(generate(&path2), Err(KeyError::Exists { .. })));
        assert!(!path2.exists(), "no private key left behind");
    }

    #[test]
    fn group_readable_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.key");
        generate(&path).unwrap();
        fs::set_permissions(&path, Permissions::from_mode(0o640)).unwrap();
        match load_signing_key(&path) {
            Err(KeyError::Insecure { mode, .. }) => assert_eq!(mode, 0o640),
            other => panic!("expected Insecure, got {other:?}"),
        }
    }

    #[test]
    fn public_key_accepts_bare_hex_and_rejects_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let info = generate(&dir.path().join("k.key")).unwrap();
        let hex_file = dir.path().join("k.hex");
        fs::write(&hex_file, format!("{}\n", info.public_hex)).unwrap();
        assert_eq!(
            load_public_key(&hex_file).unwrap(),
            load_public_key(&info.public_path).unwrap()
        );
        fs::write(&hex_file, "abcd\n").unwrap();
        assert!(matches!(
            load_public_key(&hex_file),
            Err(KeyError::Malformed { .. })
        ));
    }
}
