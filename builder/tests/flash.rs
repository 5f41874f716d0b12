//! `imgbuild flash` to a regular file: the happy path, and a tampered or unsigned image
//! refused before a single byte of the target changes.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};

use imgbuild::flash::{flash, FlashArgs};
use imgchannel::VerifyError;

const MIB: usize = 1 << 20;

struct Fixture {
    _dir: tempfile::TempDir,
    image: PathBuf,
    public: PathBuf,
    target: PathBuf,
}

fn sha256(p: &Path) -> String {
    imgchannel::artifact::sha256_file(p).unwrap()
}

fn fixture(sign: bool) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("node-1.0.raw");
    let bytes: Vec<u8> = (0..6 * MIB + 4096).map(|i| (i % 253) as u8).collect();
    fs::write(&image, &bytes).unwrap();
    let key = dir.path().join("release.key");
    let info = imgchannel::generate(&key).unwrap();
    let sums = dir.path().join("SHA256SUMS");
    fs::write(&sums, format!("{}  node-1.0.raw\n", sha256(&image))).unwrap();
    if sign {
        imgchannel::sign_sums(&sums, &key).unwrap();
    }
    let target = dir.path().join("stick.img");
    fs::write(&target, vec![0x5Au8; 8 * MIB]).unwrap();
    Fixture {
        image,
        public: info.public_path,
        target,
        _dir: dir,
    }
}

fn args(f: &Fixture) -> FlashArgs {
    FlashArgs {
        image: f.image.clone(),
        device: f.target.clone(),
        key: f.public.clone(),
        sums: None,
        force: false,
    }
}

#[test]
fn flashes_a_signed_image_to_a_file_and_the_hash_matches() {
    let f = fixture(true);
    flash(&args(&f), true).unwrap();
    let out = fs::read(&f.target).unwrap();
    let img = fs::read(&f.image).unwrap();
    assert_eq!(out.len(), img.len(), "a file target is sized to the image");
    assert_eq!(sha256(&f.target), sha256(&f.image));

    // A missing target file is created.
    let new = f.target.with_file_name("new.img");
    flash(
        &FlashArgs {
            device: new.clone(),
            ..args(&f)
        },
        true,
    )
    .unwrap();
    assert_eq!(sha256(&new), sha256(&f.image));
}

#[test]
fn tampered_image_is_refused_before_any_byte_is_written() {
    let f = fixture(true);
    let before = sha256(&f.target);
    let mut img = fs::read(&f.image).unwrap();
    img[3 * MIB] ^= 1;
    fs::write(&f.image, &img).unwrap();
    let err = flash(&args(&f), true).unwrap_err();
    assert!(
        matches!(
            err.downcast_ref::<VerifyError>(),
            Some(VerifyError::HashMismatch { .. })
        ),
        "{err:#}"
    );
    assert_eq!(sha256(&f.target), before, "the target must be unchanged");
}

#[test]
fn unsigned_or_wrongly_signed_images_are_refused() {
    let f = fixture(false);
    let before = sha256(&f.target);
    let err = flash(&args(&f), true).unwrap_err();
    assert!(
        matches!(
            err.downcast_ref::<VerifyError>(),
            Some(VerifyError::Unsigned { .. })
        ),
        "{err:#}"
    );
    let signed = fixture(true);
    let err = flash(
        &FlashArgs {
            key: signed.public.clone(),
            ..args(&f)
        },
        true,
    )
    .unwrap_err();
    assert!(err.to_string().contains("verifying"), "{err:#}");
    assert_eq!(sha256(&f.target), before);
}

#[test]
fn the_image_itself_is_never_a_target() {
    let f = fixture(true);
    let before = sha256(&f.image);
    let link = f.image.with_file_name("alias.raw");
    fs::hard_link(&f.image, &link).unwrap();
    let err = flash(
        &FlashArgs {
            device: link,
            ..args(&f)
        },
        true,
    )
    .unwrap_err();
    assert!(err.to_string().contains("the image itself"), "{err:#}");
    assert_eq!(sha256(&f.image), before);
}

#[test]
fn qcow2_is_refused_with_a_hint() {
    let f = fixture(true);
    let mut img = fs::read(&f.image).unwrap();
    img[..4].copy_from_slice(b"QFI\xfb");
    fs::write(&f.image, &img).unwrap();
    let err = flash(&args(&f), true).unwrap_err();
    assert!(err.to_string().contains(".raw"), "{err:#}");
}
