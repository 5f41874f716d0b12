//! Generator tests on random data and on real ext4 images made with `mkfs.ext4 -d`.
#![allow(clippy::unwrap_used)] // tests may unwrap

use super::*;
use std::path::PathBuf;
use std::process::Command;

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

/// Something shaped like a kernel module: structured, compressible, with "addresses" that
/// shift between versions.
fn module_like(n: usize, seed: u64, shift: u32) -> Vec<u8> {
    let words = pseudo_random(n / 8 + 1, seed);
    let mut out = Vec::with_capacity(n);
    for (i, w) in words.iter().enumerate() {
        let addr = (i as u32 * 64 + shift).to_le_bytes();
        out.extend_from_slice(&addr);
        out.extend_from_slice(&[w % 16, b'm', b'o', b'd']);
    }
    out.truncate(n);
    out
}

fn reproduce(old: &Path, new: &Path, delta: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    imgformat::delta::apply(
        File::open(old).unwrap(),
        File::open(delta).unwrap(),
        &mut out,
    )
    .unwrap();
    assert_eq!(
        Sha256Digest::of(&out),
        Sha256Digest::of(&std::fs::read(new).unwrap())
    );
    out
}

#[test]
fn random_data_with_moved_blocks_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let old = pseudo_random(1 << 20, 1);
    let mut new = Vec::new();
    new.extend_from_slice(&old[512 * 1024..]); // moved by half the image
    new.extend_from_slice(&[0u8; 64 * 1024]);
    new.extend_from_slice(&pseudo_random(24 * 4096, 2)); // new blocks
    new.extend_from_slice(&old[..100 * 4096]);
    let (o, n, d) = (
        dir.path().join("old"),
        dir.path().join("new"),
        dir.path().join("delta"),
    );
    std::fs::write(&o, &old).unwrap();
    std::fs::write(&n, &new).unwrap();
    let stats = make_delta(&o, &n, &d, &DeltaOptions::default()).unwrap();
    reproduce(&o, &n, &d);
    assert_eq!(stats.copied, (512 + 400) * 1024);
    assert_eq!(stats.zeroed, 64 * 1024);
    assert_eq!(stats.literal, 24 * 4096);
    assert!(stats.delta_size < 24 * 4096 + 1000, "{stats:?}");
}

fn mkfs(tree: &Path, img: &Path) {
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-I", "256"])
        .args(["-U", "6f1c8e26-3b4e-4c2a-9d6e-0a1b2c3d4e5f"])
        .args([
            "-E",
            "hash_seed=0e4c3b2a-1d9f-4e8a-b7c6-5d4e3f2a1b0c,root_owner=0:0",
        ])
        .arg("-d")
        .arg(tree)
        .arg(img)
        .arg("24M")
        .env("E2FSPROGS_FAKE_TIME", "1700000000")
        .status()
        .unwrap();
    assert!(st.success());
}

fn write(root: &Path, rel: &str, data: &[u8]) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, data).unwrap();
}

/// Two small root trees: v1 and v2 where a binary changed in place, the module directory
/// was renamed with slightly changed modules, a file was added and one removed.
fn ext4_pair(dir: &Path) -> (PathBuf, PathBuf) {
    let (t1, t2) = (dir.join("t1"), dir.join("t2"));
    for (t, ver, shift) in [(&t1, "6.1.0-25-amd64", 0u32), (&t2, "6.1.0-26-amd64", 4096)] {
        write(
            t,
            "etc/os-release",
            format!("IMAGE_VERSION={shift}\n").as_bytes(),
        );
        write(t, "usr/share/doc/big.txt", &module_like(300_000, 7, 0));
        for m in 0..6 {
            let data = module_like(150_000 + m * 10_000, 100 + m as u64, shift);
            write(t, &format!("usr/lib/modules/{ver}/kernel/m{m}.ko"), &data);
        }
        let mut bin = module_like(2_000_000, 9, 0);
        if shift > 0 {
            bin[1_000_000..1_000_100].copy_from_slice(&[0xAB; 100]);
            bin.extend_from_slice(b"new version trailer");
        }
        write(t, "usr/bin/kubelet", &bin);
        // Rewritten entirely (like a recompressed file): a patch would not pay.
        write(
            t,
            "usr/share/seed.bin",
            &pseudo_random(40_000, 20 + u64::from(shift)),
        );
    }
    write(&t1, "usr/share/removed", &pseudo_random(50_000, 3));
    write(&t2, "usr/share/added", &pseudo_random(50_000, 4));
    let (i1, i2) = (dir.join("v1.img"), dir.join("v2.img"));
    mkfs(&t1, &i1);
    mkfs(&t2, &i2);
    (i1, i2)
}

#[test]
fn ext4_walker_lists_files_with_their_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (i1, _) = ext4_pair(dir.path());
    let img = std::fs::read(&i1).unwrap();
    let fs = ext4::walk(&img).unwrap();
    let paths: Vec<&str> = fs.files.iter().map(|f| f.path.as_str()).collect();
    assert!(paths.contains(&"/usr/bin/kubelet"), "{paths:?}");
    assert!(paths.contains(&"/usr/lib/modules/6.1.0-25-amd64/kernel/m3.ko"));
    for f in &fs.files {
        let mut data = Vec::new();
        for e in &f.extents {
            let s = (e.physical * fs.block_size) as usize;
            data.extend_from_slice(&img[s..s + (e.len * fs.block_size) as usize]);
        }
        data.truncate(f.size as usize);
        let on_disk = std::fs::read(dir.path().join("t1").join(&f.path[1..])).unwrap();
        assert_eq!(data, on_disk, "{}", f.path);
    }
}

#[test]
fn ext4_walker_rejects_garbage_without_panicking() {
    assert!(ext4::walk(&[]).is_err());
    assert!(ext4::walk(&pseudo_random(1 << 20, 5)).is_err());
    let dir = tempfile::tempdir().unwrap();
    let (i1, _) = ext4_pair(dir.path());
    let img = std::fs::read(&i1).unwrap();
    // Scribble over metadata areas: the walker may fail or list fewer files, never panic.
    for (k, off) in [4096usize, 8192, 1 << 16, 1 << 20, 2 << 20]
        .iter()
        .enumerate()
    {
        let mut bad = img.clone();
        let noise = pseudo_random(64 * 1024, 10 + k as u64);
        bad[*off..*off + noise.len()].copy_from_slice(&noise);
        let _ = ext4::walk(&bad);
    }
    // A truncated image has no readable directories: no files, no panic.
    assert!(ext4::walk(&img[..8192]).map_or(true, |f| f.files.is_empty()));
}

#[test]
fn changed_and_renamed_files_become_file_diffs() {
    let dir = tempfile::tempdir().unwrap();
    let (i1, i2) = ext4_pair(dir.path());
    let d = dir.path().join("v1-v2.delta");
    let stats = make_delta(&i1, &i2, &d, &DeltaOptions::default()).unwrap();
    reproduce(&i1, &i2, &d);
    assert!(stats.files_same_path >= 1, "{stats:?}");
    assert_eq!(stats.files_renamed, 6, "{stats:?}");
    // seed.bin: rewritten with other random bytes, a patch is no better than literals.
    // (Version 1 also dropped os-release, a one-block file, whose three zstd frames cost
    // more than it; in version 2 every op shares one stream.)
    assert_eq!(stats.patches_dropped, 1, "{stats:?}");
    // Block level alone has to send the modules again.
    let d0 = dir.path().join("v1-v2.blocks.delta");
    let opts = DeltaOptions {
        file_diff: false,
        ..DeltaOptions::default()
    };
    let block_stats = make_delta(&i1, &i2, &d0, &opts).unwrap();
    reproduce(&i1, &i2, &d0);
    eprintln!("file level {stats:?}\nblock level {block_stats:?}");
    assert!(
        stats.delta_size * 2 < block_stats.delta_size,
        "file level {} vs block level {}",
        stats.delta_size,
        block_stats.delta_size
    );
}

#[test]
fn chunk_plan_between_real_images() {
    let dir = tempfile::tempdir().unwrap();
    let (i1, i2) = ext4_pair(dir.path());
    let a = chunk_index(&i1).unwrap();
    let b = chunk_index(&i2).unwrap();
    assert_eq!(
        b.image_sha256,
        Sha256Digest::of(&std::fs::read(&i2).unwrap())
    );
    let plan = chunks_missing(&b, &a);
    assert_eq!(plan.sources.len(), b.chunks.len());
    assert!(plan.seed_bytes > 0 && plan.fetch_bytes > 0, "{plan:?}");
    assert_eq!(chunks_missing(&b, &b).fetch_bytes, 0);
}

#[test]
fn sibling_key_ignores_versions() {
    assert_eq!(
        sibling_key("/usr/lib/modules/6.1.0-25-amd64/kernel/x.ko"),
        sibling_key("/usr/lib/modules/6.1.0-26-amd64/kernel/x.ko")
    );
    assert_ne!(sibling_key("/a/x.ko"), sibling_key("/a/y.ko"));
}

#[test]
fn truncated_old_image_is_handled_without_panicking() {
    let dir = tempfile::tempdir().unwrap();
    let (i1, i2) = ext4_pair(dir.path());
    let mut old = std::fs::read(&i1).unwrap();
    old.truncate(old.len() / 3);
    let short = dir.path().join("short.img");
    std::fs::write(&short, &old).unwrap();
    let d = dir.path().join("d");
    make_delta(&short, &i2, &d, &DeltaOptions::default()).unwrap();
    reproduce(&short, &i2, &d);
}
