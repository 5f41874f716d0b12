//! Tampering: each attack is rejected before a byte of the target reaches the caller
//! (either `load` fails, so there is no `Channel` to read from, or the read fails and the
//! destination file is never created).

// Helpers shared by the tests below unwrap like the tests themselves.
#![allow(clippy::unwrap_used)]

mod common;

use common::{copy_tree, serve, Fixture};
use imgchannel::{ExpiryPolicy, LoadError, LoadOptions, RoleKeySet, RoleKeys, SigningKeys};
use std::fs;
use std::num::NonZeroU64;
use std::path::Path;
use std::time::Duration;

fn two_releases() -> Fixture {
    let f = Fixture::new("stable");
    f.publish("1.0.0", &[]);
    f.publish("1.1.0", &["1.0.0"]);
    f
}

fn load_dir(f: &Fixture, dir: &Path) -> Result<imgchannel::Channel, LoadError> {
    imgchannel::load(dir.to_str().unwrap(), &f.root())
}

/// The on-disk file of target `name` (`targets/<sha256>.<name>`).
fn target_file(dir: &Path, name: &str) -> std::path::PathBuf {
    let suffix = format!(".{name}");
    fs::read_dir(dir.join("targets"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().ends_with(&suffix))
        .unwrap_or_else(|| panic!("no file for target {name}"))
}

fn flip_bit(path: &Path, offset: usize) {
    let mut b = fs::read(path).unwrap();
    b[offset] ^= 0x01;
    fs::write(path, b).unwrap();
}

#[test]
fn flipped_bit_in_a_target_is_rejected_before_any_byte_is_returned() {
    let f = two_releases();
    let ch = load_dir(&f, &f.dir).unwrap();
    let m = ch.latest_release().unwrap().unwrap();
    // Control: the untampered target reads fine.
    assert!(ch.read_target(&m.deltas[0].target).is_ok());

    flip_bit(&target_file(&f.dir, &m.image.target), 100);
    flip_bit(&target_file(&f.dir, &m.deltas[0].target), 2999);

    for base in [f.dir.to_str().unwrap().to_owned(), serve(f.dir.clone())] {
        let ch = imgchannel::load(&base, &f.root()).unwrap();
        for name in [&m.image.target, &m.deltas[0].target] {
            match ch.read_target(name) {
                Err(LoadError::Mismatch { .. }) => {}
                other => panic!(
                    "{base} {name}: expected Mismatch, got {:?}",
                    other.map(|b| b.len())
                ),
            }
        }
        // Streaming to a file: the destination never appears, no partial file is left.
        let outdir = tempfile::tempdir().unwrap();
        let dest = outdir.path().join("image.zst");
        assert!(matches!(
            ch.save_target(&m.image.target, &dest),
            Err(LoadError::Mismatch { .. })
        ));
        assert!(!dest.exists());
        assert_eq!(fs::read_dir(outdir.path()).unwrap().count(), 0);
        // The untouched older release is still readable.
        let v1 = ch.release("1.0.0").unwrap();
        assert!(ch.read_target(&v1.image.target).is_ok());
    }
}

#[test]
fn truncated_target_is_rejected() {
    let f = two_releases();
    let ch = load_dir(&f, &f.dir).unwrap();
    let m = ch.latest_release().unwrap().unwrap();
    let p = target_file(&f.dir, &m.deltas[0].target);
    let b = fs::read(&p).unwrap();
    fs::write(&p, &b[..b.len() / 2]).unwrap();
    assert!(matches!(
        ch.read_target(&m.deltas[0].target),
        Err(LoadError::Mismatch { .. })
    ));
}

#[test]
fn targets_signed_with_a_key_the_root_does_not_trust_are_rejected() {
    // The genuine channel A: one key for everything.
    let f = two_releases();
    // The attacker holds the snapshot and timestamp key (an online key) but not the
    // targets key. They build the same history in channel B, whose targets role is their
    // own key, and publish an evil 1.1.0 into it.
    let attacker = common::key(f.tmp.path(), "attacker");
    let one = |k: &Path| RoleKeySet {
        keys: vec![k.to_owned()],
        threshold: NonZeroU64::MIN,
    };
    let b_keys = RoleKeys {
        root: one(&f.key),
        targets: one(&attacker),
        snapshot: one(&f.key),
        timestamp: one(&f.key),
    };
    let b = f.tmp.path().join("attacker-channel");
    imgchannel::init(&b, "stable", &b_keys, &ExpiryPolicy::default()).unwrap();
    let both = SigningKeys::new([f.key.clone(), attacker]).unwrap();
    let policy = ExpiryPolicy::default();
    imgchannel::publish(&b, &both, &f.release("1.0.0", &[]), &policy).unwrap();
    let mut evil = f.release("1.1.0", &[]);
    fs::write(&evil.image, b"evil image").unwrap();
    evil.release_notes = "evil".into();
    imgchannel::publish(&b, &both, &evil, &policy).unwrap();

    // Serve A's root with B's targets/snapshot/timestamp (validly signed by the genuine
    // snapshot/timestamp key, versions in sequence) and B's target files.
    let served = f.tmp.path().join("served");
    copy_tree(&f.dir, &served);
    for name in ["3.targets.json", "3.snapshot.json", "timestamp.json"] {
        fs::copy(
            b.join("metadata").join(name),
            served.join("metadata").join(name),
        )
        .unwrap();
    }
    copy_tree(&b.join("targets"), &served.join("targets"));

    match load_dir(&f, &served) {
        Err(LoadError::BadSignature { detail }) => assert!(detail.contains("targets"), "{detail}"),
        other => panic!(
            "expected BadSignature on targets, got {:?}",
            other.map(|c| c.index().clone())
        ),
    }

    // And a channel signed entirely by other keys fails at the first file (timestamp).
    let g = Fixture::new("stable");
    g.publish("1.0.0", &[]);
    g.publish("1.1.0", &[]);
    match load_dir(&f, &g.dir) {
        Err(LoadError::BadSignature { detail }) => {
            assert!(detail.contains("timestamp"), "{detail}")
        }
        other => panic!(
            "expected BadSignature on timestamp, got {:?}",
            other.map(|c| c.index().clone())
        ),
    }
}

#[test]
fn expired_timestamp_is_rejected() {
    let f = two_releases();
    let short = ExpiryPolicy {
        timestamp: Duration::ZERO,
        ..ExpiryPolicy::default()
    };
    imgchannel::refresh(&f.dir, &f.signing, &short).unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    match load_dir(&f, &f.dir) {
        Err(LoadError::Expired { role }) => assert_eq!(role, "timestamp"),
        other => panic!(
            "expected Expired, got {:?}",
            other.map(|c| c.metadata_versions())
        ),
    }
    // A refresh with a normal lifetime revives the channel.
    imgchannel::refresh(&f.dir, &f.signing, &ExpiryPolicy::default()).unwrap();
    assert_eq!(
        load_dir(&f, &f.dir).unwrap().metadata_versions(),
        [1, 3, 5, 5]
    );
}

#[test]
fn rolled_back_metadata_is_rejected_by_a_client_that_saw_newer() {
    let f = Fixture::new("stable");
    f.publish("1.0.0", &[]);
    let old = f.tmp.path().join("old");
    copy_tree(&f.dir, &old); // timestamp 2 -> snapshot 2 -> targets 2
    f.publish("1.1.0", &["1.0.0"]);

    let datastore = tempfile::tempdir().unwrap();
    let opts = LoadOptions {
        datastore: Some(datastore.path().to_owned()),
    };
    let http_dir = f.tmp.path().join("served");
    copy_tree(&f.dir, &http_dir);
    let url = serve(http_dir.clone());
    let ch = imgchannel::load_with(&url, &f.root(), &opts).unwrap();
    assert_eq!(ch.metadata_versions(), [1, 3, 3, 3]);
    drop(ch);

    // The mirror now serves the older (validly signed, unexpired) timestamp and snapshot.
    fs::copy(
        old.join("metadata/timestamp.json"),
        http_dir.join("metadata/timestamp.json"),
    )
    .unwrap();
    match imgchannel::load_with(&url, &f.root(), &opts) {
        Err(LoadError::Rollback { .. }) => {}
        other => panic!(
            "expected Rollback, got {:?}",
            other.map(|c| c.metadata_versions())
        ),
    }
    // Control: a client without that memory accepts the older, genuine state — the
    // refusal above came from the datastore, not from a broken mirror.
    let fresh = imgchannel::load_with(&url, &f.root(), &LoadOptions::default()).unwrap();
    assert_eq!(fresh.metadata_versions(), [1, 2, 2, 2]);
}

#[test]
fn older_snapshot_served_under_the_current_name_is_rejected() {
    let f = two_releases();
    let served = f.tmp.path().join("served");
    copy_tree(&f.dir, &served);
    fs::copy(
        served.join("metadata/2.snapshot.json"),
        served.join("metadata/3.snapshot.json"),
    )
    .unwrap();
    assert!(matches!(
        load_dir(&f, &served),
        Err(LoadError::Mismatch { .. })
    ));
}

#[test]
fn mixed_metadata_versions_are_rejected() {
    let f = two_releases();

    // targets.json from the previous publish under the current name.
    let a = f.tmp.path().join("mixed-a");
    copy_tree(&f.dir, &a);
    fs::copy(
        a.join("metadata/2.targets.json"),
        a.join("metadata/3.targets.json"),
    )
    .unwrap();
    assert!(matches!(load_dir(&f, &a), Err(LoadError::Mismatch { .. })));

    // A new timestamp whose snapshot was never uploaded (half-synced mirror).
    let b = f.tmp.path().join("mixed-b");
    copy_tree(&f.dir, &b);
    fs::remove_file(b.join("metadata/3.snapshot.json")).unwrap();
    assert!(matches!(load_dir(&f, &b), Err(LoadError::Fetch { .. })));

    // Control: the unmodified copy loads.
    let c = f.tmp.path().join("intact");
    copy_tree(&f.dir, &c);
    assert!(load_dir(&f, &c).is_ok());
}
