//! `imgbuild publish` end to end on small real ext4 images: build outputs -> signed TUF
//! channel with chunk index and a delta -> loaded back through tough -> the delta applied
//! to the old image gives the new image, byte for byte.

#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use std::fs;
use std::path::{Path, PathBuf};

use clap::Parser;
use imgbuild::build::{sha256_file, Artifact, BuildReport};
use imgbuild::cli::{Cli, Command};
use imgbuild::filesystem::{make_ext4, Ext4Spec};
use imgbuild::progress::Progress;
use imgformat::release;
use uuid::Uuid;

const EPOCH: i64 = 1_735_689_600;

/// A fake `imgbuild build` output directory holding a real ext4 root image.
fn build_output(dir: &Path, version: &str, files: &[(&str, Vec<u8>)]) -> PathBuf {
    let tree = dir.join(format!("tree-{version}"));
    for (path, data) in files {
        let p = tree.join(path);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, data).unwrap();
    }
    let out = dir.join(format!("out-{version}"));
    fs::create_dir_all(&out).unwrap();
    let root = out.join(format!("demo-{version}.root.ext4"));
    make_ext4(
        &Ext4Spec {
            source: &tree,
            label: "root",
            uuid: Uuid::new_v5(&Uuid::NAMESPACE_OID, version.as_bytes()),
            hash_seed: Uuid::new_v5(&Uuid::NAMESPACE_OID, b"seed"),
            size: 24 << 20,
            epoch: EPOCH,
            journal: false,
        },
        &root,
        0,
    )
    .unwrap();
    let report = BuildReport {
        name: "demo".into(),
        version: version.into(),
        recipe_digest: format!("digest-{version}"),
        kernel_version: "6.1.0-test".into(),
        source_date_epoch: EPOCH,
        artifacts: vec![Artifact {
            file: format!("demo-{version}.root.ext4"),
            sha256: sha256_file(&root).unwrap(),
            size: fs::metadata(&root).unwrap().len(),
        }],
        packages: vec![],
        signed: false,
    };
    fs::write(
        out.join(format!("demo-{version}.manifest.json")),
        serde_json::to_vec(&report).unwrap(),
    )
    .unwrap();
    out
}

fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn publish(out: &Path, channel: &Path, key: &Path) -> anyhow::Result<()> {
    let cli = Cli::try_parse_from([
        "imgbuild".as_ref(),
        "publish".as_ref(),
        out.as_os_str(),
        "--channel".as_ref(),
        channel.as_os_str(),
        "--key".as_ref(),
        key.as_os_str(),
        "--zstd-level".as_ref(),
        "3".as_ref(),
    ])
    .unwrap();
    let Command::Publish(args) = cli.command else {
        panic!("not a publish command")
    };
    imgbuild::publish::publish(&args, &Progress::new(true))
}

#[test]
fn publish_two_versions_and_apply_the_delta_read_back_through_tuf() {
    let dir = tempfile::tempdir().unwrap();
    let base = noise(1, 3 << 20);
    let mut changed = base.clone();
    changed[100_000..100_100].copy_from_slice(&[7u8; 100]);
    let v1 = build_output(
        dir.path(),
        "1.0",
        &[
            ("usr/lib/big.bin", base.clone()),
            ("etc/version", b"1.0\n".to_vec()),
        ],
    );
    let v2 = build_output(
        dir.path(),
        "1.1",
        &[
            ("usr/lib/big.bin", changed),
            ("etc/version", b"1.1\n".to_vec()),
            ("usr/lib/new.bin", noise(2, 64 << 10)),
        ],
    );
    let key = dir.path().join("keys/signing.key");
    fs::create_dir_all(key.parent().unwrap()).unwrap();
    imgchannel::keys::generate(&key).unwrap();
    let channel = dir.path().join("nightly");
    imgchannel::channel::init(
        &channel,
        "nightly",
        &imgchannel::channel::RoleKeys::single(&key),
        &imgchannel::channel::ExpiryPolicy::default(),
    )
    .unwrap();

    publish(&v1, &channel, &key).unwrap();
    publish(&v2, &channel, &key).unwrap();
    let again = publish(&v2, &channel, &key).unwrap_err();
    assert!(
        format!("{again:#}").contains("already published"),
        "{again:#}"
    );

    let url = format!("file://{}", channel.display());
    let loaded = imgchannel::channel::load(&url, &channel.join("metadata/1.root.json")).unwrap();
    let latest = loaded.latest_release().unwrap().expect("a latest release");
    assert_eq!(latest.version, "1.1");
    let new_image = v2.join("demo-1.1.root.ext4");
    assert_eq!(latest.image.sha256, sha256_file(&new_image).unwrap());
    assert_eq!(
        latest.chunk_index.as_deref(),
        Some(release::chunk_index_target("demo", "1.1").as_str())
    );
    let delta_info = latest
        .deltas
        .iter()
        .find(|d| d.from_version == "1.0")
        .expect("a delta from 1.0");
    let delta = loaded.read_target(&delta_info.target).unwrap();
    let old = fs::File::open(v1.join("demo-1.0.root.ext4")).unwrap();
    let mut rebuilt = Vec::new();
    imgformat::delta::apply(old, &delta[..], &mut rebuilt).unwrap();
    assert_eq!(rebuilt, fs::read(&new_image).unwrap());
    assert!(
        (delta.len() as u64) < latest.image.compressed_size,
        "delta ({} B) should be smaller than the full compressed image ({} B)",
        delta.len(),
        latest.image.compressed_size
    );
}

#[test]
fn publish_refuses_a_root_image_that_does_not_match_its_build_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let out = build_output(dir.path(), "2.0", &[("etc/x", b"x".to_vec())]);
    let img = out.join("demo-2.0.root.ext4");
    let mut bytes = fs::read(&img).unwrap();
    bytes[5000] ^= 1;
    fs::write(&img, bytes).unwrap();
    let err = imgbuild::publish::find_build(&out, None).unwrap_err();
    assert!(
        err.to_string()
            .contains("does not match its build manifest"),
        "{err:#}"
    );
    let err = imgbuild::publish::find_build(dir.path(), None).unwrap_err();
    assert!(
        err.to_string().contains("no NAME-VERSION.manifest.json"),
        "{err:#}"
    );
}
