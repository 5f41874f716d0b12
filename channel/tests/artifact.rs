//! Signed build outputs: SHA256SUMS + SHA256SUMS.sig, and each way verification refuses.

// Helpers shared by the tests below unwrap like the tests themselves.
#![allow(clippy::unwrap_used)]

mod common;

use imgchannel::artifact::{signature_path, verify_sums};
use imgchannel::keys::load_public_key;
use imgchannel::{sign_sums, verify_artifact, VerifyError};
use sha2::{Digest, Sha256};
use std::fs;
use std::path::{Path, PathBuf};

struct Out {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    key: PathBuf,
    public: ed25519_dalek::VerifyingKey,
}

fn signed_outputs() -> Out {
    let tmp = tempfile::tempdir().unwrap();
    let key = common::key(tmp.path(), "release");
    let public = load_public_key(&key.with_extension("pub")).unwrap();
    let dir = tmp.path().join("out");
    fs::create_dir(&dir).unwrap();
    let mut sums = String::new();
    for (name, seed) in [("minimal-1.0.0.raw", 1), ("minimal-1.0.0.qcow2", 2)] {
        let data = common::bytes(seed, 20_000);
        sums.push_str(&format!("{}  {name}\n", hex::encode(Sha256::digest(&data))));
        fs::write(dir.join(name), data).unwrap();
    }
    fs::write(dir.join("SHA256SUMS"), sums).unwrap();
    let sig = sign_sums(&dir.join("SHA256SUMS"), &key).unwrap();
    assert_eq!(sig, dir.join("SHA256SUMS.sig"));
    assert_eq!(fs::read(&sig).unwrap().len(), 64);
    Out {
        _tmp: tmp,
        dir,
        key,
        public,
    }
}

fn verify(o: &Out, artifact: &str) -> Result<(), VerifyError> {
    let sums = o.dir.join("SHA256SUMS");
    verify_artifact(
        &o.dir.join(artifact),
        &sums,
        &signature_path(&sums),
        &o.public,
    )
}

fn flip(path: &Path, at: usize) {
    let mut b = fs::read(path).unwrap();
    b[at] ^= 0x80;
    fs::write(path, b).unwrap();
}

#[test]
fn intact_outputs_verify() {
    let o = signed_outputs();
    verify(&o, "minimal-1.0.0.raw").unwrap();
    verify(&o, "minimal-1.0.0.qcow2").unwrap();
}

#[test]
fn flipped_bit_in_the_artifact_is_a_hash_mismatch() {
    let o = signed_outputs();
    flip(&o.dir.join("minimal-1.0.0.raw"), 12345);
    match verify(&o, "minimal-1.0.0.raw") {
        Err(VerifyError::HashMismatch {
            expected, actual, ..
        }) => {
            assert_ne!(expected, actual);
            let listed = fs::read_to_string(o.dir.join("SHA256SUMS")).unwrap();
            assert!(listed.contains(&expected));
        }
        other => panic!("expected HashMismatch, got {other:?}"),
    }
    verify(&o, "minimal-1.0.0.qcow2").unwrap();
}

#[test]
fn flipped_bit_in_sha256sums_is_a_bad_signature() {
    let o = signed_outputs();
    // Flip a bit inside the qcow2 line's hash; the raw image itself is untouched.
    flip(&o.dir.join("SHA256SUMS"), 70);
    assert!(matches!(
        verify(&o, "minimal-1.0.0.raw"),
        Err(VerifyError::BadSignature { .. })
    ));
}

#[test]
fn substituted_sums_listing_a_tampered_image_is_a_bad_signature() {
    let o = signed_outputs();
    let raw = o.dir.join("minimal-1.0.0.raw");
    fs::write(&raw, b"evil").unwrap();
    let evil = format!(
        "{}  minimal-1.0.0.raw\n",
        hex::encode(Sha256::digest(b"evil"))
    );
    fs::write(o.dir.join("SHA256SUMS"), evil).unwrap();
    assert!(matches!(
        verify(&o, "minimal-1.0.0.raw"),
        Err(VerifyError::BadSignature { .. })
    ));
}

#[test]
fn wrong_key_is_a_bad_signature() {
    let o = signed_outputs();
    let other = common::key(o.dir.parent().unwrap(), "other");
    let other_pub = load_public_key(&other.with_extension("pub")).unwrap();
    let sums = o.dir.join("SHA256SUMS");
    assert!(matches!(
        verify_artifact(
            &o.dir.join("minimal-1.0.0.raw"),
            &sums,
            &signature_path(&sums),
            &other_pub
        ),
        Err(VerifyError::BadSignature { .. })
    ));
    // Re-signing with the other key makes it verify under that key only.
    sign_sums(&sums, &other).unwrap();
    assert!(matches!(
        verify(&o, "minimal-1.0.0.raw"),
        Err(VerifyError::BadSignature { .. })
    ));
    verify_sums(&sums, &signature_path(&sums), &other_pub).unwrap();
}

#[test]
fn missing_or_truncated_signature() {
    let o = signed_outputs();
    let sig = o.dir.join("SHA256SUMS.sig");
    let bytes = fs::read(&sig).unwrap();
    fs::write(&sig, &bytes[..63]).unwrap();
    assert!(matches!(
        verify(&o, "minimal-1.0.0.raw"),
        Err(VerifyError::BadSignature { .. })
    ));
    fs::remove_file(&sig).unwrap();
    assert!(matches!(
        verify(&o, "minimal-1.0.0.raw"),
        Err(VerifyError::Unsigned { .. })
    ));
}

#[test]
fn unlisted_artifact_is_refused() {
    let o = signed_outputs();
    fs::write(o.dir.join("extra.iso"), b"iso").unwrap();
    match verify(&o, "extra.iso") {
        Err(VerifyError::NotListed { name, .. }) => assert_eq!(name, "extra.iso"),
        other => panic!("expected NotListed, got {other:?}"),
    }
}

#[test]
fn signing_refuses_a_world_readable_key() {
    use std::os::unix::fs::PermissionsExt;
    let o = signed_outputs();
    fs::set_permissions(&o.key, fs::Permissions::from_mode(0o644)).unwrap();
    let before = fs::read(o.dir.join("SHA256SUMS.sig")).unwrap();
    assert!(sign_sums(&o.dir.join("SHA256SUMS"), &o.key).is_err());
    assert_eq!(fs::read(o.dir.join("SHA256SUMS.sig")).unwrap(), before);
}
