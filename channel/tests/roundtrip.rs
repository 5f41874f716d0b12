//! Channel round trip: init, publish, load from a directory, file:// and HTTP; refusals;
//! downgrade marker; refresh; root rotation.

// Helpers shared by the tests below unwrap like the tests themselves.
#![allow(clippy::unwrap_used)]

mod common;

use common::{serve, Fixture};
use imgchannel::{ExpiryPolicy, PublishError, RoleKeySet, RoleKeys, SigningKeys};
use sha2::{Digest, Sha256};
use std::num::NonZeroU64;

fn sha256(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

fn check_two_releases(ch: &imgchannel::Channel, f: &Fixture) {
    let latest = ch.latest_release().unwrap().expect("a latest release");
    assert_eq!(latest.version, "1.1.0");
    assert_eq!(latest.name, "minimal");
    assert_eq!(latest.release_notes, "release 1.1.0");
    let raw = std::fs::read(f.tmp.path().join("in-1.1.0/root.img")).unwrap();
    assert_eq!(latest.image.sha256, sha256(&raw));
    assert_eq!(latest.image.size, raw.len() as u64);

    // The image target decompresses to the exact image.
    let compressed = ch.read_target(&latest.image.target).unwrap();
    assert_eq!(compressed.len() as u64, latest.image.compressed_size);
    assert_eq!(zstd::decode_all(&compressed[..]).unwrap(), raw);

    // Delta and chunk index come back byte for byte, as listed.
    assert_eq!(latest.deltas.len(), 1);
    let d = &latest.deltas[0];
    assert_eq!(d.from_version, "1.0.0");
    let delta = ch.read_target(&d.target).unwrap();
    assert_eq!(
        delta,
        std::fs::read(f.tmp.path().join("in-1.1.0/from-1.0.0.delta")).unwrap()
    );
    assert_eq!(
        (sha256(&delta), delta.len() as u64),
        (d.sha256.clone(), d.size)
    );
    let chunks = ch
        .read_target(latest.chunk_index.as_deref().unwrap())
        .unwrap();
    assert_eq!(chunks, b"{\"version\":\"1.1.0\"}\n");

    // The older release is still there, image included.
    let v1 = ch.release("1.0.0").unwrap();
    let raw1 = std::fs::read(f.tmp.path().join("in-1.0.0/root.img")).unwrap();
    let img1 = ch.read_target(&v1.image.target).unwrap();
    assert_eq!(zstd::decode_all(&img1[..]).unwrap(), raw1);
    assert_eq!(ch.index().channel, "nightly");
    assert_eq!(ch.index().releases.len(), 2);
    // init + two publishes: targets/snapshot/timestamp at version 3, root at 1.
    assert_eq!(ch.metadata_versions(), [1, 3, 3, 3]);
}

#[test]
fn publish_two_versions_and_load_from_dir_file_url_and_http() {
    let f = Fixture::new("nightly");
    let p1 = f.publish("1.0.0", &[]);
    assert_eq!(p1.targets_version, 2);
    let p2 = f.publish("1.1.0", &["1.0.0"]);
    assert_eq!(p2.targets_version, 3);
    assert!(!p2.downgrade);

    let dir = f.dir.to_str().unwrap().to_owned();
    check_two_releases(&imgchannel::load(&dir, &f.root()).unwrap(), &f);

    let file_url = url::Url::from_directory_path(&f.dir).unwrap().to_string();
    assert!(file_url.starts_with("file://"));
    check_two_releases(&imgchannel::load(&file_url, &f.root()).unwrap(), &f);

    let http = serve(f.dir.clone());
    check_two_releases(&imgchannel::load(&http, &f.root()).unwrap(), &f);
}

#[test]
fn save_target_streams_the_verified_image_to_a_file() {
    let f = Fixture::new("stable");
    f.publish("1.0.0", &[]);
    let ch = imgchannel::load(&serve(f.dir.clone()), &f.root()).unwrap();
    let m = ch.latest_release().unwrap().unwrap();
    let out = f.tmp.path().join("out.zst");
    ch.save_target(&m.image.target, &out).unwrap();
    let raw = std::fs::read(f.tmp.path().join("in-1.0.0/root.img")).unwrap();
    assert_eq!(
        zstd::decode_all(&std::fs::read(&out).unwrap()[..]).unwrap(),
        raw
    );
    assert!(matches!(
        ch.read_target("no-such-target"),
        Err(imgchannel::LoadError::NotFound { .. })
    ));
}

#[test]
fn empty_channel_loads_with_no_release() {
    let f = Fixture::new("beta");
    let ch = imgchannel::load(f.dir.to_str().unwrap(), &f.root()).unwrap();
    assert!(ch.latest_release().unwrap().is_none());
    assert_eq!(ch.metadata_versions(), [1, 1, 1, 1]);
    // The served layout: versioned metadata, one unversioned timestamp, hashed targets.
    for name in [
        "1.root.json",
        "root.json",
        "1.targets.json",
        "1.snapshot.json",
        "timestamp.json",
    ] {
        assert!(f.dir.join("metadata").join(name).is_file(), "{name}");
    }
    let targets: Vec<String> = std::fs::read_dir(f.dir.join("targets"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(targets.len(), 1);
    assert!(targets[0].ends_with(".channel.json") && targets[0].len() == 64 + 1 + 12);
}

fn metadata_listing(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir.join("metadata"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn refusals_leave_the_channel_unchanged() {
    let f = Fixture::new("stable");
    f.publish("1.0.0", &[]);
    f.publish("1.1.0", &["1.0.0"]);
    let before = metadata_listing(&f.dir);
    let policy = ExpiryPolicy::default();

    match imgchannel::publish(&f.dir, &f.signing, &f.release("1.1.0", &[]), &policy) {
        Err(PublishError::AlreadyPublished { version }) => assert_eq!(version, "1.1.0"),
        other => panic!("expected AlreadyPublished, got {other:?}"),
    }
    match imgchannel::publish(&f.dir, &f.signing, &f.release("1.0.5", &[]), &policy) {
        Err(PublishError::Downgrade { version, newest }) => {
            assert_eq!((version.as_str(), newest.as_str()), ("1.0.5", "1.1.0"))
        }
        other => panic!("expected Downgrade, got {other:?}"),
    }
    match imgchannel::publish(&f.dir, &f.signing, &f.release("1.2.0", &["0.9"]), &policy) {
        Err(PublishError::UnknownDeltaBase { from }) => assert_eq!(from, "0.9"),
        other => panic!("expected UnknownDeltaBase, got {other:?}"),
    }
    let mut bad = f.release("1.3.0", &[]);
    bad.version = "1.3/../x".into();
    assert!(imgchannel::publish(&f.dir, &f.signing, &bad, &policy).is_err());

    assert_eq!(metadata_listing(&f.dir), before);
    let leftovers: Vec<_> = std::fs::read_dir(&f.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".staging"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // And init refuses an existing channel.
    assert!(matches!(
        imgchannel::init(&f.dir, "stable", &RoleKeys::single(&f.key), &policy),
        Err(PublishError::AlreadyInitialized { .. })
    ));
}

#[test]
fn downgrade_with_flag_sets_max_version_and_a_newer_release_clears_it() {
    let f = Fixture::new("stable");
    f.publish("1.0.0", &[]);
    f.publish("1.1.0", &["1.0.0"]);
    let mut r = f.release("1.0.5", &[]);
    r.allow_downgrade = true;
    let p = imgchannel::publish(&f.dir, &f.signing, &r, &ExpiryPolicy::default()).unwrap();
    assert!(p.downgrade);
    let ch = imgchannel::load(f.dir.to_str().unwrap(), &f.root()).unwrap();
    assert_eq!(ch.index().max_version.as_deref(), Some("1.0.5"));
    assert_eq!(ch.index().latest.as_deref(), Some("1.0.5"));
    assert_eq!(ch.index().newest().unwrap().version, "1.1.0");
    assert_eq!(ch.latest_release().unwrap().unwrap().version, "1.0.5");
    // 1.1.0's targets are kept: nodes can still be told about it.
    assert!(ch.release("1.1.0").is_ok());

    f.publish("1.2.0", &["1.1.0", "1.0.5"]);
    let ch = imgchannel::load(f.dir.to_str().unwrap(), &f.root()).unwrap();
    assert_eq!(ch.index().max_version, None);
    assert_eq!(ch.index().latest.as_deref(), Some("1.2.0"));
    assert_eq!(ch.latest_release().unwrap().unwrap().deltas.len(), 2);
}

#[test]
fn refresh_resigns_snapshot_and_timestamp_only() {
    let f = Fixture::new("nightly");
    f.publish("1.0.0", &[]);
    let targets_before = std::fs::read(f.dir.join("metadata/2.targets.json")).unwrap();
    imgchannel::refresh(&f.dir, &f.signing, &ExpiryPolicy::default()).unwrap();
    imgchannel::refresh(&f.dir, &f.signing, &ExpiryPolicy::default()).unwrap();
    assert!(!f.dir.join("metadata/3.targets.json").exists());
    assert_eq!(
        std::fs::read(f.dir.join("metadata/2.targets.json")).unwrap(),
        targets_before
    );
    let ch = imgchannel::load(f.dir.to_str().unwrap(), &f.root()).unwrap();
    assert_eq!(ch.metadata_versions(), [1, 2, 4, 4]);
    assert_eq!(ch.latest_release().unwrap().unwrap().version, "1.0.0");
}

#[test]
fn root_rotation_is_followed_by_a_client_holding_the_old_root() {
    let f = Fixture::new("stable");
    f.publish("1.0.0", &[]);
    let new_key = common::key(f.tmp.path(), "new");
    let policy = ExpiryPolicy::default();

    // Wrong "old" keys: the new root would not carry the old threshold. Refused, nothing written.
    let wrong = SigningKeys::new([new_key.clone()]).unwrap();
    match imgchannel::rotate_root(&f.dir, &wrong, &RoleKeys::single(&new_key), &policy) {
        Err(PublishError::RootThreshold { version, by_root }) => {
            assert_eq!((version, by_root), (2, 1))
        }
        other => panic!("expected RootThreshold, got {other:?}"),
    }
    assert!(!f.dir.join("metadata/2.root.json").exists());

    let v =
        imgchannel::rotate_root(&f.dir, &f.signing, &RoleKeys::single(&new_key), &policy).unwrap();
    assert_eq!(v, 2);
    assert!(f.dir.join("metadata/2.root.json").is_file());
    assert_eq!(
        std::fs::read(f.dir.join("metadata/root.json")).unwrap(),
        std::fs::read(f.dir.join("metadata/2.root.json")).unwrap()
    );

    // The old key can no longer publish; the new one can.
    assert!(imgchannel::publish(&f.dir, &f.signing, &f.release("1.1.0", &[]), &policy).is_err());
    let new_signing = SigningKeys::new([new_key]).unwrap();
    imgchannel::publish(
        &f.dir,
        &new_signing,
        &f.release("1.1.0", &["1.0.0"]),
        &policy,
    )
    .unwrap();

    let http = serve(f.dir.clone());
    let ch = imgchannel::load(&http, &f.root()).unwrap();
    assert_eq!(
        ch.metadata_versions()[0],
        2,
        "client followed 1.root.json -> 2.root.json"
    );
    assert_eq!(ch.latest_release().unwrap().unwrap().version, "1.1.0");
}

#[test]
fn threshold_two_root_needs_both_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, online) = (
        common::key(tmp.path(), "root-a"),
        common::key(tmp.path(), "root-b"),
        common::key(tmp.path(), "online"),
    );
    let two = NonZeroU64::new(2).unwrap();
    let online_set = RoleKeySet {
        keys: vec![online.clone()],
        threshold: NonZeroU64::MIN,
    };
    let keys = RoleKeys {
        root: RoleKeySet {
            keys: vec![a.clone(), b.clone()],
            threshold: two,
        },
        targets: online_set.clone(),
        snapshot: online_set.clone(),
        timestamp: online_set,
    };
    let dir = tmp.path().join("ch");
    let policy = ExpiryPolicy::default();

    // Threshold above the number of keys is refused.
    let mut too_high = keys.clone();
    too_high.targets.threshold = two;
    assert!(imgchannel::init(&dir, "stable", &too_high, &policy).is_err());
    assert!(!dir.join("metadata/1.root.json").exists());

    imgchannel::init(&dir, "stable", &keys, &policy).unwrap();
    let root: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("metadata/1.root.json")).unwrap()).unwrap();
    assert_eq!(root["signed"]["roles"]["root"]["threshold"], 2);
    assert_eq!(root["signed"]["consistent_snapshot"], true);
    assert_eq!(root["signatures"].as_array().unwrap().len(), 2);
    // The key IDs `keys generate` reports are the ones root.json lists for each role.
    let id = |k: &std::path::Path| {
        imgchannel::keys::key_id(
            &imgchannel::keys::load_public_key(&k.with_extension("pub")).unwrap(),
        )
        .unwrap()
    };
    let ids = |role: &str| -> Vec<String> {
        let mut v: Vec<String> = root["signed"]["roles"][role]["keyids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap().to_owned())
            .collect();
        v.sort();
        v
    };
    let mut root_ids = vec![id(&a), id(&b)];
    root_ids.sort();
    assert_eq!(ids("root"), root_ids);
    assert_eq!(ids("timestamp"), vec![id(&online)]);
    assert!(root["signed"]["keys"][id(&online)].is_object());

    // Rotating with only one of the two root keys does not meet the old threshold.
    let new_keys = RoleKeys::single(&online);
    let one = SigningKeys::new([a.clone()]).unwrap();
    assert!(matches!(
        imgchannel::rotate_root(&dir, &one, &new_keys, &policy),
        Err(PublishError::RootThreshold {
            version: 2,
            by_root: 1
        })
    ));
    let both = SigningKeys::new([a, b]).unwrap();
    assert_eq!(
        imgchannel::rotate_root(&dir, &both, &new_keys, &policy).unwrap(),
        2
    );
    let ch = imgchannel::load(dir.to_str().unwrap(), &dir.join("metadata/1.root.json")).unwrap();
    assert_eq!(ch.metadata_versions()[0], 2);
}

#[test]
fn publishing_into_a_directory_that_is_not_a_channel_is_refused() {
    let f = Fixture::new("stable");
    let empty = f.tmp.path().join("not-a-channel");
    std::fs::create_dir(&empty).unwrap();
    let policy = ExpiryPolicy::default();
    assert!(matches!(
        imgchannel::publish(&empty, &f.signing, &f.release("1.0.0", &[]), &policy),
        Err(PublishError::NotInitialized { .. })
    ));
    assert!(matches!(
        imgchannel::refresh(&empty, &f.signing, &policy),
        Err(PublishError::NotInitialized { .. })
    ));
    assert_eq!(std::fs::read_dir(&empty).unwrap().count(), 0);
}

#[test]
fn local_index_lists_releases_for_choosing_delta_bases() {
    let f = Fixture::new("stable");
    f.publish("1.0.0", &[]);
    f.publish("1.1.0", &["1.0.0"]);
    f.publish("1.2.0", &["1.1.0", "1.0.0"]);
    let idx = imgchannel::local_index(&f.dir).unwrap();
    assert_eq!(idx.delta_bases("1.3.0", 2), vec!["1.2.0", "1.1.0"]);
    assert_eq!(idx.update_target("1.0.0").unwrap().version, "1.2.0");
}

#[test]
fn wire_types_ignore_fields_added_by_newer_publishers() {
    let json = r#"{"schema":1,"channel":"stable","releases":[],"latest":null,
                   "max_version":null,"added_later":{"x":1}}"#;
    let idx: imgformat::release::ChannelIndex = serde_json::from_str(json).unwrap();
    assert_eq!(idx.channel, "stable");
    assert!(serde_json::from_str::<imgformat::release::ChannelIndex>(r#"{"schema":1}"#).is_err());
}

#[test]
fn async_client_works_inside_a_runtime() {
    // Publishing is blocking (it runs its own runtime), so set up first, then drive the
    // async client from inside a runtime the way the updater daemon does.
    let f = Fixture::new("stable");
    f.publish("1.0.0", &[]);
    let url = serve(f.dir.clone());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let opts = imgchannel::LoadOptions::default();
        let ch = imgchannel::AsyncChannel::load(&url, &f.root(), &opts)
            .await
            .unwrap();
        let m = ch.latest_release().await.unwrap().unwrap();
        assert_eq!(m.version, "1.0.0");
        let out = f.tmp.path().join("img.zst");
        ch.save_target(&m.image.target, &out).await.unwrap();
        let raw = std::fs::read(f.tmp.path().join("in-1.0.0/root.img")).unwrap();
        assert_eq!(
            zstd::decode_all(&std::fs::read(&out).unwrap()[..]).unwrap(),
            raw
        );
    });
}

#[test]
fn metadata_left_by_an_interrupted_publish_does_not_block_the_next_one() {
    let f = Fixture::new("stable");
    f.publish("1.0.0", &[]);
    // A publish that died after writing 3.targets.json but before timestamp.json.
    std::fs::write(f.dir.join("metadata/3.targets.json"), b"{\"partial\":").unwrap();
    std::fs::write(f.dir.join("metadata/3.snapshot.json"), b"").unwrap();
    f.publish("1.1.0", &["1.0.0"]);
    let ch = imgchannel::load(f.dir.to_str().unwrap(), &f.root()).unwrap();
    assert_eq!(ch.metadata_versions(), [1, 3, 3, 3]);
    assert_eq!(ch.latest_release().unwrap().unwrap().version, "1.1.0");
}
