//! Codec and applier tests: round trips, and every malformed input a typed error.

#![allow(clippy::unwrap_used)] // tests may unwrap

use super::*;
use crate::chunk::Sha256Digest;
use std::io;

fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn header(source: &[u8], target: &[u8]) -> DeltaHeader {
    DeltaHeader {
        source_size: source.len() as u64,
        source_sha256: Sha256Digest::of(source),
        target_size: target.len() as u64,
        target_sha256: Sha256Digest::of(target),
    }
}

/// A patch turning `reference` into `new` with bytewise add for a common prefix length
/// and extra bytes for the rest (enough to exercise the applier).
fn simple_patch(reference: &[u8], new: &[u8]) -> Patch {
    let common = reference.len().min(new.len());
    let diff: Vec<u8> = new[..common]
        .iter()
        .zip(&reference[..common])
        .map(|(n, o)| n.wrapping_sub(*o))
        .collect();
    let mut b = PatchBuilder::new();
    let half = common / 2;
    b.push(0, &diff[..half], &[]);
    b.push(0, &diff[half..], &new[common..]);
    b.finish()
}

/// Source and target sharing moved blocks, a zero run, literals and one changed "file"
/// spread over two source extents.
fn fixture() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let source = pseudo_random(64 * 1024, 1);
    let mut file_old = source[4096..8192].to_vec();
    file_old.extend_from_slice(&source[40960..45056]);
    let mut file_new = file_old.clone();
    for i in (0..file_new.len()).step_by(97) {
        file_new[i] ^= 0x5a;
    }
    file_new.extend_from_slice(b"appended tail");
    let lit = pseudo_random(2_000, 2);

    let mut target = Vec::new();
    target.extend_from_slice(&source[16384..32768]); // moved block run
    target.extend_from_slice(&[0u8; 5000]);
    target.extend_from_slice(&lit);
    target.extend_from_slice(&file_new);
    target.extend_from_slice(&source[0..4096]);

    let mut w = DeltaWriter::new(Vec::new(), header(&source, &target), 3).unwrap();
    for blk in 0..4u64 {
        w.copy_source(16384 + blk * 4096, 4096).unwrap(); // merged into one op
    }
    w.zero(5000).unwrap();
    w.literal(&lit[..700]).unwrap();
    w.literal(&lit[700..]).unwrap();
    let extents = [
        Extent {
            offset: 4096,
            len: 4096,
        },
        Extent {
            offset: 40960,
            len: 4096,
        },
    ];
    w.file_diff(
        &extents,
        file_new.len() as u64,
        &simple_patch(&file_old, &file_new),
    )
    .unwrap();
    w.copy_source(0, 4096).unwrap();
    let delta = w.finish().unwrap();
    (source, target, delta)
}

#[test]
fn round_trip_reproduces_target() {
    let (source, target, delta) = fixture();
    let mut out = Vec::new();
    let stats = apply(io::Cursor::new(&source), &delta[..], &mut out).unwrap();
    assert_eq!(Sha256Digest::of(&out), Sha256Digest::of(&target));
    assert_eq!(out, target);
    assert_eq!(stats.copied, 16384 + 4096);
    assert_eq!(stats.zeroed, 5000);
    assert_eq!(stats.literal, 2_000);
    assert_eq!(stats.file_diff, 8192 + 13);
    // copy (merged), zero, literal (merged), file diff, copy
    assert_eq!(stats.ops, 5);
}

#[test]
fn decoder_yields_the_ops_written() {
    let (_, _, delta) = fixture();
    let mut r = DeltaReader::new(&delta[..]).unwrap();
    let mut kinds = Vec::new();
    while let Some(op) = r.next_op().unwrap() {
        kinds.push(match op {
            Op::CopySource { offset, len } => format!("copy {offset}+{len}"),
            Op::Zero { len } => format!("zero {len}"),
            Op::Literal { data } => format!("literal {}", data.len()),
            Op::FileDiff { out_len, .. } => format!("diff {out_len}"),
        });
    }
    assert_eq!(
        kinds,
        [
            "copy 16384+16384",
            "zero 5000",
            "literal 2000",
            "diff 8205",
            "copy 0+4096"
        ]
    );
}

#[test]
fn large_literals_are_split_at_the_cap() {
    let source = vec![1u8; 10];
    let target = pseudo_random(MAX_LITERAL_LEN as usize + 100, 3);
    let mut w = DeltaWriter::new(Vec::new(), header(&source, &target), 1).unwrap();
    w.literal(&target).unwrap();
    let delta = w.finish().unwrap();
    let mut out = Vec::new();
    let stats = apply(io::Cursor::new(&source), &delta[..], &mut out).unwrap();
    assert_eq!(out, target);
    assert_eq!(stats.ops, 2);
}

#[test]
fn truncation_at_every_offset_is_a_typed_error() {
    let (source, _, delta) = fixture();
    for cut in 0..delta.len() {
        let mut out = Vec::new();
        let r = apply(io::Cursor::new(&source), &delta[..cut], &mut out);
        assert!(
            matches!(r, Err(DeltaError::Truncated { .. })),
            "cut at {cut}: {r:?}"
        );
    }
}

#[test]
fn trailing_bytes_are_rejected() {
    let (source, _, mut delta) = fixture();
    delta.push(0);
    let r = apply(io::Cursor::new(&source), &delta[..], Vec::new());
    assert!(matches!(r, Err(DeltaError::TrailingData)), "{r:?}");
}

#[test]
fn bad_magic_version_and_flags_are_rejected() {
    let (source, _, delta) = fixture();
    let mut d = delta.clone();
    d[0] = b'X';
    assert!(matches!(
        apply(io::Cursor::new(&source), &d[..], Vec::new()),
        Err(DeltaError::BadMagic)
    ));
    let mut d = delta.clone();
    d[8..12].copy_from_slice(&7u32.to_le_bytes());
    assert!(matches!(
        apply(io::Cursor::new(&source), &d[..], Vec::new()),
        Err(DeltaError::UnsupportedVersion(7))
    ));
    let mut d = delta.clone();
    d[12] = 1;
    assert!(matches!(
        apply(io::Cursor::new(&source), &d[..], Vec::new()),
        Err(DeltaError::UnsupportedFlags(1))
    ));
}

/// A header for a 100-byte source and target, followed by `ops`.
fn raw_delta(ops: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let source = vec![7u8; 100];
    let target = vec![7u8; 100];
    let mut d = header(&source, &target).encode().to_vec();
    d.extend_from_slice(&zstd::bulk::compress(ops, 1).unwrap());
    (source, d)
}

fn apply_raw(ops: &[u8]) -> Result<ApplyStats, DeltaError> {
    let (source, d) = raw_delta(ops);
    apply(io::Cursor::new(source), &d[..], Vec::new())
}

#[test]
fn unknown_op_is_rejected() {
    let r = apply_raw(&[0x7f]);
    assert!(
        matches!(r, Err(DeltaError::UnknownOp { tag: 0x7f, at: 0 })),
        "{r:?}"
    );
}

#[test]
fn overlong_lengths_are_rejected_before_allocating() {
    // Literal claiming 4 GiB raw.
    let mut op = vec![TAG_LITERAL];
    op.extend_from_slice(&u32::MAX.to_le_bytes());
    op.extend_from_slice(&10u32.to_le_bytes());
    assert!(matches!(
        apply_raw(&op),
        Err(DeltaError::OverCap {
            what: "literal length",
            ..
        })
    ));
    // FileDiff with too many extents.
    let mut op = vec![TAG_FILE_DIFF];
    op.extend_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        apply_raw(&op),
        Err(DeltaError::OverCap {
            what: "extent count",
            ..
        })
    ));
    // FileDiff whose controls and extra bytes are over the cap.
    let mut op = vec![TAG_FILE_DIFF];
    op.extend_from_slice(&0u32.to_le_bytes());
    op.extend_from_slice(&50u64.to_le_bytes());
    op.extend_from_slice(&(MAX_PATCH_BUFFER / 24).to_le_bytes());
    op.extend_from_slice(&(MAX_PATCH_BUFFER % 24 + 1).to_le_bytes());
    assert!(matches!(
        apply_raw(&op),
        Err(DeltaError::OverCap {
            what: "patch controls and extra bytes",
            ..
        })
    ));
    // Zero run longer than the target.
    let mut op = vec![TAG_ZERO];
    op.extend_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(
        apply_raw(&op),
        Err(DeltaError::TargetOverrun { .. })
    ));
    // Copy whose end overflows u64.
    let mut op = vec![TAG_COPY_SOURCE];
    op.extend_from_slice(&u64::MAX.to_le_bytes());
    op.extend_from_slice(&2u64.to_le_bytes());
    assert!(matches!(
        apply_raw(&op),
        Err(DeltaError::SourceRange { .. })
    ));
    // Copy past the end of the source.
    let mut op = vec![TAG_COPY_SOURCE];
    op.extend_from_slice(&90u64.to_le_bytes());
    op.extend_from_slice(&20u64.to_le_bytes());
    assert!(matches!(
        apply_raw(&op),
        Err(DeltaError::SourceRange { .. })
    ));
}

#[test]
fn end_before_target_size_is_rejected() {
    let mut op = vec![TAG_COPY_SOURCE];
    op.extend_from_slice(&0u64.to_le_bytes());
    op.extend_from_slice(&50u64.to_le_bytes());
    op.push(TAG_END);
    assert!(matches!(
        apply_raw(&op),
        Err(DeltaError::TargetShort {
            written: 50,
            target_size: 100
        })
    ));
}

#[test]
fn wrong_source_is_rejected_before_writing() {
    let (mut source, _, delta) = fixture();
    source[100] ^= 1;
    let mut out = Vec::new();
    let r = apply(io::Cursor::new(&source), &delta[..], &mut out);
    assert!(matches!(r, Err(DeltaError::SourceHash { .. })), "{r:?}");
    assert!(out.is_empty());
    source.push(0);
    let r = apply(io::Cursor::new(&source), &delta[..], &mut out);
    assert!(matches!(r, Err(DeltaError::SourceSize { .. })), "{r:?}");
}

#[test]
fn unverified_wrong_source_still_fails_the_target_hash() {
    let (mut source, _, delta) = fixture();
    source[16384 + 5] ^= 1; // a byte the first copy op uses
    let r = apply_with(
        io::Cursor::new(&source),
        &delta[..],
        Vec::new(),
        ApplyOptions {
            verify_source: false,
        },
    );
    assert!(matches!(r, Err(DeltaError::TargetHash { .. })), "{r:?}");
}

#[test]
fn corrupt_op_stream_is_a_typed_error() {
    let source = vec![1u8; 10];
    let target = pseudo_random(1000, 9);
    let mut w = DeltaWriter::new(Vec::new(), header(&source, &target), 3).unwrap();
    w.literal(&target).unwrap();
    let mut delta = w.finish().unwrap();
    // Flip every byte of the compressed op stream in turn: each result is an error, never
    // a panic, and never a target.
    let mut corrupt = 0;
    for i in HEADER_LEN..delta.len() {
        delta[i] ^= 0xff;
        let mut out = Vec::new();
        let r = apply(io::Cursor::new(&source), &delta[..], &mut out);
        assert!(r.is_err(), "flip at {i} accepted");
        if matches!(r, Err(DeltaError::Corrupt { .. })) {
            corrupt += 1;
        }
        delta[i] ^= 0xff;
    }
    assert!(corrupt > 0);
}

/// A raw `FileDiff` op over source extent 0+4096 producing `out_len` bytes with these
/// controls, extra bytes (count as declared) and diff bytes.
fn raw_file_diff(
    out_len: u64,
    records: &[(i64, u64, u64)],
    extra_len: u32,
    payload: &[u8],
) -> Vec<u8> {
    let mut op = vec![TAG_FILE_DIFF];
    op.extend_from_slice(&1u32.to_le_bytes());
    op.extend_from_slice(&0u64.to_le_bytes());
    op.extend_from_slice(&4096u64.to_le_bytes());
    op.extend_from_slice(&out_len.to_le_bytes());
    op.extend_from_slice(&(records.len() as u32).to_le_bytes());
    op.extend_from_slice(&extra_len.to_le_bytes());
    for (seek, add, copy) in records {
        op.extend_from_slice(&seek.to_le_bytes());
        op.extend_from_slice(&add.to_le_bytes());
        op.extend_from_slice(&copy.to_le_bytes());
    }
    op.extend_from_slice(payload);
    op
}

#[test]
fn hostile_patches_are_typed_errors() {
    let source = pseudo_random(8192, 4);
    let target = source[..4096].to_vec();
    let run = |op: Vec<u8>| {
        let mut d = header(&source, &target).encode().to_vec();
        d.extend_from_slice(&zstd::bulk::compress(&op, 1).unwrap());
        apply(io::Cursor::new(&source), &d[..], Vec::new())
    };
    type Controls = Vec<(i64, u64, u64)>;
    let cases: Vec<(Controls, u32, &str)> = vec![
        (vec![(-1, 4096, 0)], 0, "seek before start"),
        (vec![(4097, 0, 4096)], 4096, "seek past end"),
        (vec![(1, 4096, 0)], 0, "add past the reference"),
        (vec![(0, 4096, 1)], 1, "produces more"),
        (vec![(0, 100, 0)], 0, "produces less"),
        (vec![(0, 0, 0), (0, 4096, 0)], 0, "produces nothing"),
        (vec![(0, 4000, 96)], 95, "extra length differs"),
    ];
    for (records, extra_len, what) in cases {
        let r = run(raw_file_diff(4096, &records, extra_len, &[]));
        assert!(matches!(r, Err(DeltaError::BadOp { .. })), "{what}: {r:?}");
    }
    // Diff bytes missing: the op stream ends inside them.
    let r = run(raw_file_diff(4096, &[(0, 4096, 0)], 0, &[0u8; 100]));
    assert!(matches!(r, Err(DeltaError::Truncated { .. })), "{r:?}");
    // A well-formed patch over the same op layout applies.
    let mut op = raw_file_diff(4096, &[(0, 4000, 96)], 96, &source[4000..4096]);
    op.extend_from_slice(&[0u8; 4000]);
    op.push(TAG_END);
    let mut out = Vec::new();
    let mut d = header(&source, &target).encode().to_vec();
    d.extend_from_slice(&zstd::bulk::compress(&op, 1).unwrap());
    apply(io::Cursor::new(&source), &d[..], &mut out).unwrap();
    assert_eq!(out, target);
}

#[test]
fn empty_controls_fold_their_seek_into_the_next() {
    let reference = pseudo_random(100, 12);
    let mut b = PatchBuilder::new();
    b.push(10, &[], &[]);
    b.push(20, &[], &[]);
    b.push(-5, &[0u8; 10], b"!");
    let patch = b.finish();
    assert_eq!(patch.ctrl.len(), CONTROL_LEN);
    assert_eq!(i64::from_le_bytes(patch.ctrl[0..8].try_into().unwrap()), 25);
    let target: Vec<u8> = reference[25..35].iter().chain(b"!").copied().collect();
    let ext = [Extent {
        offset: 0,
        len: 100,
    }];
    let mut w = DeltaWriter::new(Vec::new(), header(&reference, &target), 1).unwrap();
    w.file_diff(&ext, 11, &patch).unwrap();
    let delta = w.finish().unwrap();
    let mut out = Vec::new();
    apply(io::Cursor::new(&reference), &delta[..], &mut out).unwrap();
    assert_eq!(out, target);
}

#[test]
fn writer_refuses_inconsistent_ops() {
    let source = vec![0u8; 100];
    let target = vec![0u8; 100];
    let mut w = DeltaWriter::new(Vec::new(), header(&source, &target), 1).unwrap();
    assert!(matches!(
        w.copy_source(90, 20),
        Err(DeltaError::SourceRange { .. })
    ));
    assert!(matches!(w.zero(101), Err(DeltaError::TargetOverrun { .. })));
    let mut b = PatchBuilder::new();
    b.push(0, &[0u8; 10], b"x");
    let ext = [Extent { offset: 0, len: 10 }];
    assert!(matches!(
        w.file_diff(&ext, 12, &b.finish()),
        Err(DeltaError::BadOp { .. })
    ));
    w.zero(50).unwrap();
    assert!(matches!(w.finish(), Err(DeltaError::TargetShort { .. })));
}

#[test]
fn random_mutations_never_panic_nor_yield_a_wrong_target() {
    let (source, target, delta) = fixture();
    let mut x: u64 = 0x1234_5678_9abc_def1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut rejected = 0;
    for _ in 0..1000 {
        let mut d = delta.clone();
        for _ in 0..1 + next() % 4 {
            let i = (next() % d.len() as u64) as usize;
            d[i] = next() as u8;
        }
        let mut out = Vec::new();
        match apply(io::Cursor::new(&source), &d[..], &mut out) {
            Ok(_) => assert_eq!(out, target),
            Err(_) => rejected += 1,
        }
    }
    assert!(rejected > 600, "only {rejected} mutations rejected");
}

#[test]
fn concurrent_verify_applies_and_reports_a_wrong_source() {
    let (source, target, delta) = fixture();
    let mut out = Vec::new();
    apply_concurrent_verify(io::Cursor::new(&source), &source[..], &delta[..], &mut out).unwrap();
    assert_eq!(out, target);
    // A flipped byte the delta never reads: only the source hash can notice it.
    let mut bad = source.clone();
    bad[60_000] ^= 1;
    let r = apply_concurrent_verify(io::Cursor::new(&bad), &bad[..], &delta[..], Vec::new());
    assert!(matches!(r, Err(DeltaError::SourceHash { .. })), "{r:?}");
    let r = apply_concurrent_verify(
        io::Cursor::new(&source),
        &source[..],
        &delta[..50],
        Vec::new(),
    );
    assert!(matches!(r, Err(DeltaError::Truncated { .. })), "{r:?}");
}

#[test]
fn large_reference_with_back_and_forth_seeks() {
    // Larger than SMALL_REFERENCE, so the windowed cache path runs.
    let source = pseudo_random(5 << 20, 11);
    let ext = [
        Extent {
            offset: 1 << 20,
            len: 4 << 20,
        },
        Extent {
            offset: 0,
            len: 1 << 20,
        },
    ];
    let mut reference = source[1 << 20..].to_vec();
    reference.extend_from_slice(&source[..1 << 20]);
    // Target: reference pieces at 4.5 MiB, 0, 2 MiB, with a few changed bytes.
    let spans = [
        (4_718_592usize, 300_000usize),
        (0, 500_000),
        (2 << 20, 700_000),
    ];
    let mut b = PatchBuilder::new();
    let mut target = Vec::new();
    let mut pos: i64 = 0;
    for (start, len) in spans {
        let mut diff = vec![0u8; len];
        diff[len / 2] = 1;
        b.push(start as i64 - pos, &diff, b"x");
        let mut piece = reference[start..start + len].to_vec();
        piece[len / 2] = piece[len / 2].wrapping_add(1);
        target.extend_from_slice(&piece);
        target.push(b'x');
        pos = (start + len) as i64;
    }
    let patch = b.finish();
    let mut w = DeltaWriter::new(Vec::new(), header(&source, &target), 1).unwrap();
    w.file_diff(&ext, target.len() as u64, &patch).unwrap();
    let delta = w.finish().unwrap();
    let mut out = Vec::new();
    apply(io::Cursor::new(&source), &delta[..], &mut out).unwrap();
    assert_eq!(out, target);
}
