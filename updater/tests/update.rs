//! Updates X -> Y into a disk image file from a real channel over HTTP: by delta, by
//! chunks, by full image; and bad inputs that must leave the inactive slot unbootable and
//! the active slot untouched.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use imgformat::boot::BootEntry;
use imgformat::layout::Slot;
use imgupdate::install::LocalRefusals;
use imgupdate::{Event, Method, State, Strategy, UpdateError};

fn new_sha() -> String {
    sha256_file(&base().new_img)
}

fn update(node: &Node, method: Method) -> Result<imgupdate::UpdateReport, UpdateError> {
    node.updater()
        .update(method, &LocalRefusals::default(), &mut |_, _| {})
}

/// The end state every successful update must reach.
fn assert_staged(node: &Node, report: &imgupdate::UpdateReport) {
    let len = std::fs::metadata(&base().new_img).unwrap().len();
    assert_eq!(node.slot_hash(Slot::B, len), new_sha(), "slot b holds 1.1");
    assert_eq!(
        report.state,
        State::Staged {
            version: NEW.into(),
            slot: Slot::B
        }
    );
    assert_eq!(node.state().state, report.state);
    // A trial entry with tries, for 1.1 on slot b, same command line as slot a.
    let entries = node.entries();
    assert!(
        entries.contains(&"imgbuild-b+3.conf".to_string()),
        "{entries:?}"
    );
    let d = node.disk();
    let text =
        imgdisk::esp::read_esp_file(d.open_esp().unwrap(), "loader/entries/imgbuild-b+3.conf")
            .unwrap();
    let entry = BootEntry::parse("imgbuild-b+3.conf", &String::from_utf8(text).unwrap()).unwrap();
    assert_eq!(entry.version, NEW);
    assert_eq!(entry.tries, Some((3, 0)));
    assert_eq!(
        entry.options(),
        "root=PARTLABEL=root-b ro console=ttyS0 quiet"
    );
    // The kernel on the ESP is 1.1's.
    let kernel = imgdisk::esp::read_esp_file(d.open_esp().unwrap(), "imgbuild/b/linux").unwrap();
    assert!(
        kernel == base().new_kernel,
        "slot b's kernel is the one from the 1.1 root"
    );
    // Slot a still boots.
    assert!(entries.contains(&"imgbuild-a.conf".to_string()));
}

#[test]
fn update_by_delta() {
    let node = Node::new("reboot");
    let active = node.partition_hash(Slot::A);
    let report = update(&node, Method::Delta).unwrap();
    assert_eq!(report.method, Some(Method::Delta));
    assert_staged(&node, &report);
    assert_eq!(
        node.partition_hash(Slot::A),
        active,
        "the active slot is untouched"
    );
    // Only the delta was fetched: a fraction of the uncompressed image.
    let image = std::fs::metadata(&base().new_img).unwrap().len();
    assert!(
        report.bytes_fetched > 0 && report.bytes_fetched < image / 8,
        "{}",
        report.bytes_fetched
    );
    // A second run finds it staged and writes nothing.
    let again = update(&node, Method::Auto).unwrap();
    assert_eq!(again.bytes_fetched, 0);
    assert_eq!(again.slot, Some(Slot::B));
}

#[test]
fn update_by_chunks() {
    let node = Node::new("reboot");
    let active = node.partition_hash(Slot::A);
    let report = update(&node, Method::Chunks).unwrap();
    assert_eq!(report.method, Some(Method::Chunks));
    // Most of 1.1 is 1.0's bytes: they came from slot a, re-hashed against the index.
    let image = std::fs::metadata(&base().new_img).unwrap().len();
    assert!(report.seeded_bytes > image / 2, "{}", report.seeded_bytes);
    // Only frames of the chunk pack were fetched, not the whole pack.
    let (pack_len, _) = target_file(&node, "minimal-1.1.root.img.zst");
    assert!(
        report.bytes_fetched > 0 && report.bytes_fetched < pack_len / 2,
        "{} of {pack_len}",
        report.bytes_fetched
    );
    assert_staged(&node, &report);
    assert_eq!(node.partition_hash(Slot::A), active);
}

#[test]
fn update_by_full_image() {
    let node = Node::new("reboot");
    let active = node.partition_hash(Slot::A);
    let report = update(&node, Method::Full).unwrap();
    assert_eq!(report.method, Some(Method::Full));
    assert_staged(&node, &report);
    assert_eq!(node.partition_hash(Slot::A), active);
}

#[test]
fn kexec_strategy_stages_kernel_but_no_entry() {
    let node = Node::new("kexec");
    let report = update(&node, Method::Auto).unwrap();
    assert_eq!(report.method, Some(Method::Delta));
    let plan = report.kexec.unwrap();
    assert_eq!(plan.slot, Slot::B);
    assert_eq!(plan.kernel, "imgbuild/b/linux");
    assert_eq!(plan.initrd, "imgbuild/b/initrd");
    assert_eq!(plan.cmdline, "root=PARTLABEL=root-b ro console=ttyS0 quiet");
    assert!(
        !node.bootable(Slot::B),
        "no entry before the health checks passed"
    );
    let (kernel, initrd) = imgupdate::stage::read_staged(&node.disk(), &plan).unwrap();
    assert!(kernel == base().new_kernel);
    assert_eq!(initrd.len(), 300 << 10);
    // After a restart in `staged` the same plan is derived without writing anything.
    let again = imgupdate::stage::kexec_plan(&node.disk(), Slot::A, Slot::B, NEW).unwrap();
    assert_eq!(again, plan);
    // Issue 6 writes it after the health checks: the good entry without a counter.
    imgupdate::stage::commit_entry(&node.disk(), &plan.entry).unwrap();
    assert!(node.entries().contains(&"imgbuild-b.conf".to_string()));
}

/// Every bad-input case: a clear error, slot b unbootable, slot a byte-identical, the
/// failure counted. A download that started ends in `failed`; a channel that cannot be
/// trusted leaves the idle node idle (nothing was in flight).
fn assert_refused(node: &Node, active: &str, err: &UpdateError) {
    assert!(
        !node.bootable(Slot::B),
        "{err}: slot b must stay unbootable"
    );
    assert_eq!(
        node.partition_hash(Slot::A),
        active,
        "{err}: slot a untouched"
    );
    let sf = node.state();
    assert_eq!(sf.failures, 1, "{err}");
    match err {
        UpdateError::Channel(_) => assert_eq!(sf.state, State::Idle, "{err}"),
        _ => assert!(
            matches!(sf.state, State::Failed { .. }),
            "{err}: {:?}",
            sf.state
        ),
    }
}

#[test]
fn tampered_image_is_refused() {
    let node = Node::new("reboot");
    let active = node.partition_hash(Slot::A);
    // Flip a byte in the published compressed image.
    let target = std::fs::read_dir(node.channel.join("targets"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with("minimal-1.1.root.img.zst"))
        .unwrap();
    let mut data = std::fs::read(&target).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0xff;
    std::fs::write(&target, data).unwrap();
    let err = update(&node, Method::Full).unwrap_err();
    assert!(
        matches!(
            err,
            UpdateError::Fetch(imgupdate::fetch::FetchError::Mismatch { .. })
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("does not match the signed"),
        "{err}"
    );
    assert_refused(&node, &active, &err);
}

#[test]
fn wrong_trusted_root_is_refused() {
    let mut node = Node::new("reboot");
    let active = node.partition_hash(Slot::A);
    // A root.json of another channel with another key.
    let other = node.tmp.path().join("other");
    let key = node.tmp.path().join("other.key");
    imgchannel::keys::generate(&key).unwrap();
    imgchannel::init(
        &other,
        "stable",
        &imgchannel::RoleKeys::single(&key),
        &Default::default(),
    )
    .unwrap();
    node.cfg.trusted_root = other.join("metadata/1.root.json");
    let err = update(&node, Method::Auto).unwrap_err();
    assert!(
        matches!(
            err,
            UpdateError::Channel(imgchannel::LoadError::BadSignature { .. })
        ),
        "{err}"
    );
    assert_eq!(err.exit_code(), 4);
    assert_refused(&node, &active, &err);
}

#[test]
fn expired_metadata_is_refused() {
    let node = Node::new("reboot");
    let active = node.partition_hash(Slot::A);
    let signing = imgchannel::SigningKeys::new([base().key.clone()]).unwrap();
    let short = imgchannel::ExpiryPolicy {
        timestamp: Duration::ZERO,
        ..Default::default()
    };
    imgchannel::refresh(&node.channel, &signing, &short).unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    let err = update(&node, Method::Auto).unwrap_err();
    assert!(
        matches!(
            err,
            UpdateError::Channel(imgchannel::LoadError::Expired { .. })
        ),
        "{err}"
    );
    assert_refused(&node, &active, &err);
}

#[test]
fn garbage_from_the_server_is_refused() {
    let node = Node::new("reboot");
    let active = node.partition_hash(Slot::A);
    node.server.mode.store(GARBAGE, Ordering::SeqCst);
    let err = update(&node, Method::Full).unwrap_err();
    assert!(
        matches!(
            err,
            UpdateError::Fetch(imgupdate::fetch::FetchError::Mismatch { .. })
        ),
        "{err}"
    );
    assert_refused(&node, &active, &err);
    // The garbage was discarded: with an honest server the next run succeeds.
    node.server.mode.store(NORMAL, Ordering::SeqCst);
    let report = update(&node, Method::Full).unwrap();
    assert_eq!(
        report.state,
        State::Staged {
            version: NEW.into(),
            slot: Slot::B
        }
    );
}

#[test]
fn range_answered_with_200_is_refused_then_resumes() {
    let node = Node::new("reboot");
    let active = node.partition_hash(Slot::A);
    // A partial download, as a killed run leaves it: half the file and its journal.
    let u = node.updater();
    let ch = u.load_channel().unwrap();
    let name = "minimal-1.1.root.img.zst";
    let (len, sha) = ch.target_digest(name).unwrap();
    let src = node.channel.join(format!("targets/{sha}.{name}"));
    let dl = imgupdate::install::downloads_dir(&node.cfg.state_dir);
    std::fs::create_dir_all(&dl).unwrap();
    let half = std::fs::read(&src).unwrap()[..(len / 2) as usize].to_vec();
    std::fs::write(dl.join(format!("{sha}.{name}.partial")), &half).unwrap();
    std::fs::write(
        dl.join(format!("{sha}.{name}.journal")),
        format!(
            "{{\"name\":\"{name}\",\"sha256\":\"{sha}\",\"length\":{len},\"synced\":{}}}",
            half.len()
        ),
    )
    .unwrap();
    node.server.mode.store(IGNORE_RANGE, Ordering::SeqCst);
    let err = update(&node, Method::Full).unwrap_err();
    assert!(
        matches!(
            err,
            UpdateError::Fetch(imgupdate::fetch::FetchError::RangeIgnored { .. })
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("ignored the Range request"),
        "{err}"
    );
    assert_refused(&node, &active, &err);
    // A server that honours Range: only the missing half is fetched.
    node.server.mode.store(NORMAL, Ordering::SeqCst);
    let before = node.server.ranges.load(Ordering::SeqCst);
    let report = update(&node, Method::Full).unwrap();
    assert_eq!(node.server.ranges.load(Ordering::SeqCst), before + 1);
    assert_eq!(report.bytes_fetched, len - half.len() as u64);
    assert_staged(&node, &report);
}

/// Pretend the node rebooted into `version` on `slot` (what os-release and the kernel
/// command line would say).
fn boot(node: &Node, version: &str, slot: Slot) {
    std::fs::write(
        &node.cfg.os_release,
        format!("IMAGE_ID=minimal\nIMAGE_VERSION={version}\n"),
    )
    .unwrap();
    std::fs::write(
        &node.cfg.kernel_cmdline,
        format!("root=PARTLABEL={} ro console=ttyS0 quiet\n", slot.label()),
    )
    .unwrap();
}

/// Drive the issue-6 steps in the state file as the lock/drain layer would.
fn to_rebooting(node: &Node) {
    let mut sf = node.state();
    sf.apply(Event::LockRequested).unwrap();
    sf.apply(Event::LockAcquired).unwrap();
    sf.apply(Event::Drained {
        strategy: Strategy::Reboot,
    })
    .unwrap();
    sf.save(&node.cfg.state_dir).unwrap();
}

#[test]
fn what_booted_decides_trial_rollback_and_refusal() {
    let node = Node::new("reboot");
    update(&node, Method::Delta).unwrap();
    to_rebooting(&node);
    // The new slot booted: trial.
    boot(&node, NEW, Slot::B);
    let sf = node.updater().start().unwrap();
    assert_eq!(
        sf.state,
        State::Trial {
            version: NEW.into(),
            slot: Slot::B
        }
    );
    // Rejected (as a failed health verdict or an operator would): its entry is marked
    // bad, the old slot's entry stays good, the version is never taken again.
    let state = node.updater().rollback().unwrap();
    assert_eq!(
        state,
        State::RollingBack {
            version: NEW.into(),
            slot: Slot::B
        }
    );
    let entries = node.entries();
    assert!(
        entries.contains(&"imgbuild-b+0-3.conf".to_string()),
        "{entries:?}"
    );
    assert!(
        entries.contains(&"imgbuild-a.conf".to_string()),
        "{entries:?}"
    );
    assert!(!node.bootable(Slot::B));
    // The old slot booted: the rollback is done and recorded.
    boot(&node, OLD, Slot::A);
    let sf = node.updater().start().unwrap();
    assert!(
        matches!(&sf.state, State::Failed { reason } if reason.contains("1.1 rolled back")),
        "{:?}",
        sf.state
    );
    assert_eq!(sf.failed_versions, vec![NEW.to_string()]);
    let choice = node.updater().check(&LocalRefusals::default()).unwrap();
    assert_eq!(
        choice,
        imgupdate::Choice::Refused {
            version: NEW.into()
        }
    );
    // And `update` writes nothing for it.
    let r = update(&node, Method::Auto).unwrap();
    assert_eq!(r.bytes_fetched, 0);
    assert!(!node.bootable(Slot::B));
}

#[test]
fn a_reboot_that_lands_on_the_old_slot_fails_the_version() {
    let node = Node::new("reboot");
    update(&node, Method::Delta).unwrap();
    to_rebooting(&node);
    // Boot counting fell back (or the reboot never happened): 1.0 on slot a runs.
    let sf = node.updater().start().unwrap();
    assert!(
        matches!(&sf.state, State::Failed { reason }
            if reason.contains("expected 1.1 on slot b, but 1.0 on slot a booted")),
        "{:?}",
        sf.state
    );
    assert_eq!(sf.failed_versions, vec![NEW.to_string()]);
    // The cluster-wide list (issue 6) plugs in through the trait.
    struct Cluster;
    impl imgupdate::RefusedVersions for Cluster {
        fn is_refused(&self, v: &str) -> bool {
            v == "1.1"
        }
    }
    let fresh = Node::new("reboot");
    assert_eq!(
        fresh.updater().check(&Cluster).unwrap(),
        imgupdate::Choice::Refused {
            version: NEW.into()
        }
    );
}

#[test]
fn illegal_commands_are_typed_errors() {
    let node = Node::new("reboot");
    let err = node.updater().rollback().unwrap_err();
    assert!(matches!(err, UpdateError::Illegal(_)), "{err}");
    assert_eq!(err.exit_code(), 3);
    assert_eq!(
        err.to_string(),
        "rollback_requested is not allowed in state idle"
    );
    // A second updater on the same state dir is refused while one runs.
    let u = node.updater();
    let _held = u.lock().unwrap();
    let err = node.updater().check(&LocalRefusals::default()).unwrap_err();
    assert!(matches!(err, UpdateError::Busy(_)), "{err}");
}

#[test]
fn min_update_from_goes_through_a_stepping_stone() {
    let node = Node::new("reboot");
    // 1.2 may only be installed from 1.1 on; the node runs 1.0.
    let signing = imgchannel::SigningKeys::new([base().key.clone()]).unwrap();
    let release = imgchannel::ReleaseInput {
        name: "minimal".into(),
        version: "1.2".into(),
        recipe_digest: format!("sha256:{}", "cd".repeat(32)),
        image: base().new_img.clone(),
        chunk_index: None,
        deltas: vec![],
        min_update_from: Some(NEW.into()),
        release_notes: String::new(),
        allow_downgrade: false,
        zstd_level: 1,
    };
    imgchannel::publish(&node.channel, &signing, &release, &Default::default()).unwrap();
    assert_eq!(
        node.updater().check(&LocalRefusals::default()).unwrap(),
        imgupdate::Choice::Update {
            version: "1.2".into()
        }
    );
    let report = update(&node, Method::Auto).unwrap();
    assert_eq!(
        report.choice,
        imgupdate::Choice::Update {
            version: NEW.into()
        }
    );
    assert_staged(&node, &report);
}

#[test]
fn metadata_cache_refuses_a_rolled_back_channel() {
    let node = Node::new("reboot");
    let ts = node.channel.join("metadata/timestamp.json");
    let old_ts = std::fs::read(&ts).unwrap();
    let signing = imgchannel::SigningKeys::new([base().key.clone()]).unwrap();
    imgchannel::refresh(&node.channel, &signing, &Default::default()).unwrap();
    // The node sees (and caches) the newer timestamp.
    node.updater().check(&LocalRefusals::default()).unwrap();
    // A mirror (or attacker) serves the older, validly signed one again.
    std::fs::write(&ts, old_ts).unwrap();
    let active = node.partition_hash(Slot::A);
    let err = update(&node, Method::Auto).unwrap_err();
    assert!(
        matches!(
            err,
            UpdateError::Channel(imgchannel::LoadError::Rollback { .. })
        ),
        "{err}"
    );
    assert_refused(&node, &active, &err);
}

/// The signed (length, sha256) of a target and its file in the node's channel copy.
fn target_file(node: &Node, name: &str) -> (u64, std::path::PathBuf) {
    let ch = node.updater().load_channel().unwrap();
    let (len, sha) = ch.target_digest(name).unwrap();
    (len, node.channel.join(format!("targets/{sha}.{name}")))
}

/// Issue #4, any-to-any: a node two versions behind, with no delta from its version,
/// fetches only the frames of the chunk pack holding chunks its slot lacks, by Range.
#[test]
fn two_versions_back_without_delta_fetches_only_missing_chunks() {
    let node = Node::new("reboot");
    publish_third(&node.channel, node.tmp.path());
    let active = node.partition_hash(Slot::A);
    let (pack_len, _) = target_file(&node, "minimal-1.2.root.img.zst");
    let before = node.server.sent.load(Ordering::SeqCst);
    let ranges_before = node.server.ranges.load(Ordering::SeqCst);
    let report = update(&node, Method::Auto).unwrap();
    let served = node.server.sent.load(Ordering::SeqCst) - before;
    let ranges = node.server.ranges.load(Ordering::SeqCst) - ranges_before;
    assert_eq!(report.method, Some(Method::Chunks), "no delta from 1.0");
    assert_eq!(
        report.state,
        State::Staged {
            version: THIRD.into(),
            slot: Slot::B
        }
    );
    let third = third_image();
    let len = std::fs::metadata(third).unwrap().len();
    assert_eq!(node.slot_hash(Slot::B, len), sha256_file(third));
    assert_eq!(node.partition_hash(Slot::A), active);
    // Everything served (metadata, both chunk indexes, frames) is a fraction of the
    // compressed full image, which itself is a fraction of the image.
    eprintln!(
        "served {served} bytes in total, {} of them frames in {ranges} Range requests; \
         full image {pack_len} compressed, {len} raw; seeded {}",
        report.bytes_fetched, report.seeded_bytes
    );
    // Exactly the frames of the chunks 1.0 lacks (plus at most the small gaps merged
    // into a request): computed here from the signed indexes.
    let (want, have) = indexes(&node, THIRD, OLD);
    let plan = imgformat::chunk::chunks_missing(&want, &have);
    let (needed, _) = imgformat::pack::frames_needed(&want, &plan);
    let frames = want.frames();
    let exact: u64 = needed.iter().map(|&f| u64::from(frames[f].pack_len)).sum();
    assert!(ranges >= 1);
    assert!(
        report.bytes_fetched >= exact && report.bytes_fetched <= exact + ranges * (4 << 10),
        "fetched {}, the missing frames are {exact} bytes",
        report.bytes_fetched
    );
    // 1.2 rewrote about 1 MB of this small image's 3 MB of (random) data.
    assert!(
        report.bytes_fetched < pack_len / 2,
        "{}",
        report.bytes_fetched
    );
    assert!(report.bytes_fetched < len / 8, "{}", report.bytes_fetched);
    assert!(served < pack_len / 2, "served {served} of {pack_len}");
}

/// The signed chunk indexes of `want` and `have` in the node's channel.
fn indexes(
    node: &Node,
    want: &str,
    have: &str,
) -> (imgformat::chunk::ChunkIndex, imgformat::chunk::ChunkIndex) {
    let read = |v: &str| {
        let (_, p) = target_file(node, &format!("minimal-{v}.chunks.json"));
        imgformat::chunk::ChunkIndex::from_bytes(&std::fs::read(p).unwrap()).unwrap()
    };
    (read(want), read(have))
}

/// A frame of the pack altered on the server is refused when it arrives, before anything
/// of it is written; the slot is untouched and stays unbootable.
#[test]
fn tampered_chunk_in_the_pack_is_refused_before_the_slot() {
    let node = Node::new("reboot");
    publish_third(&node.channel, node.tmp.path());
    let active = node.partition_hash(Slot::A);
    let inactive = node.partition_hash(Slot::B);
    // Alter the middle of the first frame the node will need.
    let (want, have) = indexes(&node, THIRD, OLD);
    let plan = imgformat::chunk::chunks_missing(&want, &have);
    let (needed, _) = imgformat::pack::frames_needed(&want, &plan);
    let frame = &want.frames()[needed[0]];
    let (_, pack) = target_file(&node, "minimal-1.2.root.img.zst");
    let mut data = std::fs::read(&pack).unwrap();
    let at = (frame.pack_offset + u64::from(frame.pack_len) / 2) as usize;
    data[at] ^= 0x55;
    std::fs::write(&pack, data).unwrap();
    let err = update(&node, Method::Chunks).unwrap_err();
    assert!(
        matches!(
            &err,
            UpdateError::Fetch(imgupdate::fetch::FetchError::PieceRejected { offset, .. })
                if *offset == frame.pack_offset
        ),
        "{err}"
    );
    assert_eq!(
        node.partition_hash(Slot::B),
        inactive,
        "nothing reached slot b"
    );
    assert_refused(&node, &active, &err);
}

/// A server that answers Range requests with 200 and the whole file: the chunk path
/// refuses its body (typed error); `auto` falls back to the full image.
#[test]
fn server_ignoring_ranges_fails_chunks_and_auto_falls_back_to_full() {
    let node = Node::new("reboot");
    publish_third(&node.channel, node.tmp.path());
    let active = node.partition_hash(Slot::A);
    node.server.mode.store(IGNORE_RANGE, Ordering::SeqCst);
    let err = update(&node, Method::Chunks).unwrap_err();
    assert!(
        matches!(
            err,
            UpdateError::Fetch(imgupdate::fetch::FetchError::PieceRangeIgnored { status: 200, .. })
        ),
        "{err}"
    );
    assert_refused(&node, &active, &err);
    let report = update(&node, Method::Auto).unwrap();
    assert_eq!(report.method, Some(Method::Full));
    let third = third_image();
    let len = std::fs::metadata(third).unwrap().len();
    assert_eq!(node.slot_hash(Slot::B, len), sha256_file(third));
}

/// kill -9 while frames arrive, then run again: the rerun resumes after the synced frames
/// and ends with the verified slot.
#[test]
fn killed_while_fetching_frames_resumes() {
    let third = third_image();
    let len = std::fs::metadata(third).unwrap().len();
    for k in [1, 3, 8] {
        let node = Node::new("reboot");
        publish_third(&node.channel, node.tmp.path());
        let run = |fp: Option<String>| {
            let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_imgupdate"));
            cmd.arg("--config")
                .arg(&node.config_path)
                .args(["--json", "update", "--method", "chunks"])
                .env("IMGUPDATE_LOG", "warn")
                .env_remove("IMGUPDATE_FAILPOINT");
            if let Some(fp) = fp {
                cmd.env("IMGUPDATE_FAILPOINT", fp);
            }
            cmd.output().unwrap()
        };
        let out = run(Some(format!("fetch.piece:{k}")));
        assert!(
            out.status.code().is_none(),
            "fetch.piece:{k} was not reached"
        );
        assert!(!node.bootable(Slot::B));
        let out = run(None);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(node.slot_hash(Slot::B, len), sha256_file(third), "k={k}");
        assert!(node.bootable(Slot::B));
    }
}

/// A release published the pre-pack way (one zstd frame, a version 1 chunk index): the
/// chunk path still seeds from the slot and takes the missing chunks from the full image.
#[test]
fn version_1_index_without_pack_takes_missing_chunks_from_the_full_image() {
    let node = Node::new("reboot");
    let third = third_image();
    let mut idx = imgbuild::delta::chunk_index(third).unwrap();
    idx.version = 1;
    let idx_path = node.tmp.path().join("v1.chunks.json");
    std::fs::write(&idx_path, idx.to_json().unwrap()).unwrap();
    let signing = imgchannel::SigningKeys::new([base().key.clone()]).unwrap();
    let release = imgchannel::ReleaseInput {
        name: "minimal".into(),
        version: THIRD.into(),
        recipe_digest: format!("sha256:{}", "cd".repeat(32)),
        image: third.clone(),
        chunk_index: Some(idx_path),
        deltas: vec![],
        min_update_from: None,
        release_notes: String::new(),
        allow_downgrade: false,
        zstd_level: 3,
    };
    imgchannel::publish(&node.channel, &signing, &release, &Default::default()).unwrap();
    let (image_len, _) = target_file(&node, "minimal-1.2.root.img.zst");
    let report = update(&node, Method::Chunks).unwrap();
    assert_eq!(report.method, Some(Method::Chunks));
    assert_eq!(
        report.bytes_fetched, image_len,
        "the whole single-frame image"
    );
    assert!(report.seeded_bytes > 0);
    let len = std::fs::metadata(third).unwrap().len();
    assert_eq!(node.slot_hash(Slot::B, len), sha256_file(third));
}

/// Killed while writing the slot, after every frame was fetched; the cached frames are
/// then lost (the journal survived): the rerun fetches the frames it finds damaged again
/// and ends with the verified slot.
#[test]
fn damaged_frame_cache_is_fetched_again() {
    let third = third_image();
    let len = std::fs::metadata(third).unwrap().len();
    let node = Node::new("reboot");
    publish_third(&node.channel, node.tmp.path());
    let run = |fp: Option<&str>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_imgupdate"));
        cmd.arg("--config")
            .arg(&node.config_path)
            .args(["--json", "update", "--method", "chunks"])
            .env("IMGUPDATE_LOG", "warn")
            .env_remove("IMGUPDATE_FAILPOINT");
        if let Some(fp) = fp {
            cmd.env("IMGUPDATE_FAILPOINT", fp);
        }
        cmd.output().unwrap()
    };
    let out = run(Some("slot.write:2"));
    assert!(out.status.code().is_none(), "slot.write:2 was not reached");
    let dl = imgupdate::install::downloads_dir(&node.cfg.state_dir);
    let cache = std::fs::read_dir(&dl)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with(".pieces"))
        .unwrap();
    let size = std::fs::metadata(&cache).unwrap().len();
    std::fs::write(&cache, vec![0u8; size as usize]).unwrap();
    let out = run(None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["bytes_fetched"].as_u64().unwrap() > 0);
    assert_eq!(node.slot_hash(Slot::B, len), sha256_file(third));
    assert!(node.bootable(Slot::B));
}

/// A `file://` channel: the chunk path reads the frames' ranges from the pack file.
#[test]
fn file_channel_reads_frame_ranges_from_the_pack() {
    let mut node = Node::new("reboot");
    publish_third(&node.channel, node.tmp.path());
    node.cfg.channel_url = format!("file://{}", node.channel.display());
    let before = node.server.sent.load(Ordering::SeqCst);
    let report = update(&node, Method::Chunks).unwrap();
    assert_eq!(node.server.sent.load(Ordering::SeqCst), before, "no HTTP");
    let (want, have) = indexes(&node, THIRD, OLD);
    let plan = imgformat::chunk::chunks_missing(&want, &have);
    let (needed, _) = imgformat::pack::frames_needed(&want, &plan);
    let frames = want.frames();
    let exact: u64 = needed.iter().map(|&f| u64::from(frames[f].pack_len)).sum();
    assert!(report.bytes_fetched >= exact && report.bytes_fetched < exact + (64 << 10));
    let third = third_image();
    let len = std::fs::metadata(third).unwrap().len();
    assert_eq!(node.slot_hash(Slot::B, len), sha256_file(third));
}

/// The publisher writes the chunk index as one zstd frame of JSON, and nodes read it.
#[test]
fn zstd_compressed_chunk_index_is_read() {
    let node = Node::new("reboot");
    let third = third_image();
    let work = node.tmp.path().join("pack");
    std::fs::create_dir_all(&work).unwrap();
    let packed = imgbuild::publish::chunk_pack(
        third,
        "minimal",
        THIRD,
        &work,
        &imgformat::pack::PackOptions {
            level: 3,
            threads: 2,
            ..Default::default()
        },
    )
    .unwrap();
    let written = std::fs::read(&packed.index_path).unwrap();
    assert!(
        written.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]),
        "the published chunk index is not a zstd frame"
    );
    let release = imgchannel::ReleaseInput {
        name: "minimal".into(),
        version: THIRD.into(),
        recipe_digest: format!("sha256:{}", "cd".repeat(32)),
        image: third.clone(),
        chunk_index: Some(packed.index_path.clone()),
        deltas: vec![],
        min_update_from: None,
        release_notes: String::new(),
        allow_downgrade: false,
        zstd_level: 3,
    };
    let signing = imgchannel::SigningKeys::new([base().key.clone()]).unwrap();
    imgchannel::publish_packed(
        &node.channel,
        &signing,
        &release,
        &packed.pack_path,
        &Default::default(),
    )
    .unwrap();
    let report = update(&node, Method::Chunks).unwrap();
    assert_eq!(report.method, Some(Method::Chunks));
    let len = std::fs::metadata(third).unwrap().len();
    assert_eq!(node.slot_hash(Slot::B, len), sha256_file(third));
}
