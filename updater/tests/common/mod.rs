//! Shared fixture: two small root images (1.0 and 1.1), a real channel published with
//! imgchannel the way `imgbuild publish` does (chunk indexes and chunk packs as the image
//! targets, a delta 1.0 -> 1.1), a GPT disk image with 1.0 in root-a, and a static HTTP
//! server with Range support, a byte counter and misbehaving modes. [`publish_third`] adds
//! a 1.2 (no delta from 1.0) to one node's channel.

#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};

use imgbuild::disk::{write_disk, DiskContents};
use imgbuild::filesystem::{make_ext4, Ext4Spec};
use imgchannel::{DeltaInput, ExpiryPolicy, ReleaseInput, RoleKeys, SigningKeys};
use imgdisk::esp::EspFile;
use imgdisk::layout::{derive_uuid, DiskLayout, DiskSizes, MIB};
use imgformat::boot::{self, BootEntry, LoaderConf};
use imgformat::layout::{PartitionRole, Slot};
use imgupdate::Config;

pub const OLD: &str = "1.0";
pub const NEW: &str = "1.1";
/// Two versions after [`OLD`]; only [`publish_third`] publishes it.
pub const THIRD: &str = "1.2";
pub const ROOT_SIZE: u64 = 16 * MIB;
const EPOCH: i64 = 1_700_000_000;

/// Deterministic pseudo-random bytes.
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

pub fn sha256_file(path: &Path) -> String {
    let mut f = std::fs::File::open(path).unwrap();
    imgupdate::slots::hash_reader(&mut f).unwrap()
}

/// Built once per test binary: images, channel, pristine disk.
pub struct Base {
    pub dir: PathBuf,
    pub channel: PathBuf,
    pub key: PathBuf,
    pub disk: PathBuf,
    pub old_img: PathBuf,
    pub new_img: PathBuf,
    pub new_kernel: Vec<u8>,
}

fn tree(dir: &Path, version: &str) {
    let w = |rel: &str, data: &[u8]| {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    };
    let new = version == NEW;
    let third = version == THIRD;
    let kver = match version {
        NEW => "6.1.0-2-test",
        THIRD => "6.1.0-3-test",
        _ => "6.1.0-1-test",
    };
    let k = match version {
        NEW => 1,
        THIRD => 2,
        _ => 0,
    };
    w(&format!("boot/vmlinuz-{kver}"), &bytes(10 + k, 200 << 10));
    w(
        &format!("boot/initrd.img-{kver}"),
        &bytes(20 + k, 300 << 10),
    );
    let mut tool = bytes(30, 1 << 20);
    if third {
        tool[700_000..720_000].copy_from_slice(&bytes(31, 20_000));
    }
    w("usr/bin/tool", &tool);
    let mut lib = bytes(40, 1 << 20);
    if new || third {
        lib[300_000..364_000].copy_from_slice(&bytes(41, 64_000));
        w("usr/bin/added", &bytes(42, 256 << 10));
    }
    if third {
        lib[800_000..810_000].copy_from_slice(&bytes(43, 10_000));
        w("usr/share/data", &bytes(44, 64 << 10));
    }
    w("usr/lib/libthing.so", &lib);
    w(
        "etc/os-release",
        format!("NAME=test\nIMAGE_ID=minimal\nIMAGE_VERSION={version}\n").as_bytes(),
    );
}

fn image(base: &Path, version: &str) -> PathBuf {
    let t = base.join(format!("tree-{version}"));
    tree(&t, version);
    imgbuild::filesystem::normalize_tree(&t, EPOCH).unwrap();
    let img = base.join(format!("root-{version}.img"));
    let seed = format!("test-{version}");
    make_ext4(
        &Ext4Spec {
            source: &t,
            label: "root",
            uuid: derive_uuid(&seed, "root-uuid"),
            hash_seed: derive_uuid(&seed, "root-hash"),
            size: ROOT_SIZE,
            epoch: EPOCH,
            journal: false,
        },
        &img,
        0,
    )
    .unwrap();
    img
}

/// Publish `version` as `imgbuild publish` does: chunk index and chunk pack made by
/// `imgbuild::publish::chunk_pack`, the pack as the image target.
pub fn publish_release(
    channel: &Path,
    key: &Path,
    work: &Path,
    version: &str,
    img: &Path,
    deltas: Vec<DeltaInput>,
) {
    let work = work.join(format!("pack-{version}"));
    std::fs::create_dir_all(&work).unwrap();
    let opts = imgformat::pack::PackOptions {
        level: 3,
        threads: 2,
        ..Default::default()
    };
    let packed = imgbuild::publish::chunk_pack(img, "minimal", version, &work, &opts).unwrap();
    let release = ReleaseInput {
        name: "minimal".into(),
        version: version.into(),
        recipe_digest: format!("sha256:{}", "ab".repeat(32)),
        image: img.to_path_buf(),
        chunk_index: Some(packed.index_path.clone()),
        deltas,
        min_update_from: None,
        release_notes: String::new(),
        allow_downgrade: false,
        zstd_level: 3,
    };
    let signing = SigningKeys::new([key.to_path_buf()]).unwrap();
    imgchannel::publish_packed(
        channel,
        &signing,
        &release,
        &packed.pack_path,
        &ExpiryPolicy::default(),
    )
    .unwrap();
}

/// The 1.2 image (made once per test binary).
pub fn third_image() -> &'static PathBuf {
    static THIRD_IMG: OnceLock<PathBuf> = OnceLock::new();
    THIRD_IMG.get_or_init(|| image(&base().dir, THIRD))
}

/// Publish 1.2 into `channel` with a delta from 1.1 only: a node on 1.0 has no delta.
pub fn publish_third(channel: &Path, work: &Path) {
    let b = base();
    let delta = work.join("1.1-1.2.delta");
    imgbuild::delta::make_delta(
        &b.new_img,
        third_image(),
        &delta,
        &imgbuild::delta::DeltaOptions {
            level: 3,
            file_diff: true,
            verify: false,
        },
    )
    .unwrap();
    let d = vec![DeltaInput {
        from_version: NEW.into(),
        path: delta,
    }];
    publish_release(channel, &b.key, work, THIRD, third_image(), d);
}

pub fn base() -> &'static Base {
    static BASE: OnceLock<Base> = OnceLock::new();
    BASE.get_or_init(|| {
        // One fixture per test binary, replaced on every run (never piles up in /tmp).
        let exe = std::env::current_exe().unwrap();
        let stem = exe.file_stem().unwrap().to_string_lossy().into_owned();
        // `update-<hash>`: the name without cargo's hash, so rebuilds reuse the directory.
        let stem = stem
            .rsplit_once('-')
            .map_or(stem.clone(), |(s, _)| s.to_string());
        let dir =
            PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("imgupdate-fixture-{stem}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let old_img = image(&dir, OLD);
        let new_img = image(&dir, NEW);
        let delta = dir.join("old-new.delta");
        imgbuild::delta::make_delta(
            &old_img,
            &new_img,
            &delta,
            &imgbuild::delta::DeltaOptions {
                level: 3,
                file_diff: true,
                verify: false,
            },
        )
        .unwrap();
        let key = dir.join("all.key");
        imgchannel::keys::generate(&key).unwrap();
        let channel = dir.join("channel");
        imgchannel::init(
            &channel,
            "stable",
            &RoleKeys::single(&key),
            &ExpiryPolicy::default(),
        )
        .unwrap();
        publish_release(&channel, &key, &dir, OLD, &old_img, vec![]);
        let d = vec![DeltaInput {
            from_version: OLD.into(),
            path: delta,
        }];
        publish_release(&channel, &key, &dir, NEW, &new_img, d);

        // The disk: 1.0 in root-a with its kernel, initrd and a good entry.
        let layout = DiskLayout::plan(
            &DiskSizes {
                esp: 64 * MIB,
                root: ROOT_SIZE,
                var: 16 * MIB,
            },
            "test-disk",
        )
        .unwrap();
        let entry = BootEntry {
            slot: Slot::A,
            title: "Test OS".into(),
            version: OLD.into(),
            cmdline: "console=ttyS0 quiet".into(),
            tries: None,
        };
        let t = dir.join(format!("tree-{OLD}/boot"));
        let esp_files = vec![
            EspFile::bytes(
                boot::kernel_path(Slot::A),
                std::fs::read(t.join("vmlinuz-6.1.0-1-test")).unwrap(),
            ),
            EspFile::bytes(
                boot::initrd_path(Slot::A),
                std::fs::read(t.join("initrd.img-6.1.0-1-test")).unwrap(),
            ),
            EspFile::bytes(boot::entry_path(&entry.name()), entry.render().unwrap()),
            EspFile::bytes(boot::LOADER_CONF_PATH, LoaderConf::default().render()),
        ];
        let disk = dir.join("disk.img");
        write_disk(
            &disk,
            &layout,
            &DiskContents {
                esp_files: &esp_files,
                root_a: &old_img,
                var_tree: None,
                seed: "test-disk",
                epoch: EPOCH,
            },
        )
        .unwrap();
        let new_kernel =
            std::fs::read(dir.join(format!("tree-{NEW}/boot/vmlinuz-6.1.0-2-test"))).unwrap();
        Base {
            dir,
            channel,
            key,
            disk,
            old_img,
            new_img,
            new_kernel,
        }
    })
}

/// How the test server behaves.
pub const NORMAL: u8 = 0;
/// Answers Range requests with 200 and the whole body.
pub const IGNORE_RANGE: u8 = 1;
/// Serves garbage of the right length for targets.
pub const GARBAGE: u8 = 2;

/// A static HTTP/1.1 server on 127.0.0.1 with Range support.
pub struct Server {
    pub url: String,
    pub mode: Arc<AtomicU8>,
    /// Requests that carried a Range header.
    pub ranges: Arc<AtomicU64>,
    /// Body bytes sent.
    pub sent: Arc<AtomicU64>,
}

pub fn serve(root: PathBuf) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let mode = Arc::new(AtomicU8::new(NORMAL));
    let ranges = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let (m, r, s) = (mode.clone(), ranges.clone(), sent.clone());
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let (root, m, r, s) = (root.clone(), m.clone(), r.clone(), s.clone());
            std::thread::spawn(move || {
                let _ = handle(stream, &root, m.load(Ordering::SeqCst), &r, &s);
            });
        }
    });
    Server {
        url,
        mode,
        ranges,
        sent,
    }
}

fn handle(
    mut stream: TcpStream,
    root: &Path,
    mode: u8,
    ranges: &AtomicU64,
    sent: &AtomicU64,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut first = String::new();
    reader.read_line(&mut first)?;
    let mut range: Option<(u64, Option<u64>)> = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
        let l = line.to_ascii_lowercase();
        if let Some(v) = l.strip_prefix("range: bytes=") {
            range = v.trim().split_once('-').and_then(|(a, b)| {
                Some((
                    a.parse().ok()?,
                    if b.is_empty() { None } else { b.parse().ok() },
                ))
            });
        }
    }
    let path = first.split_whitespace().nth(1).unwrap_or("/");
    let rel = path.trim_start_matches('/');
    let file = if rel.split('/').any(|c| c == ".." || c.is_empty()) {
        None
    } else {
        std::fs::File::open(root.join(rel))
            .ok()
            .filter(|f| f.metadata().unwrap().is_file())
    };
    let Some(mut file) = file else {
        stream.write_all(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )?;
        return stream.flush();
    };
    let len = file.metadata()?.len();
    let is_target = rel.starts_with("targets/") && !rel.ends_with(".json");
    let (start, end) = match (range, mode) {
        (Some((s, e)), NORMAL | GARBAGE) => {
            let e = e.unwrap_or(len - 1).min(len - 1);
            ranges.fetch_add(1, Ordering::SeqCst);
            write!(
                stream,
                "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {s}-{e}/{len}\r\nConnection: close\r\n\r\n",
                e + 1 - s,
            )?;
            (s, e + 1)
        }
        _ => {
            write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
            )?;
            (0, len)
        }
    };
    if mode == GARBAGE && is_target {
        let junk = bytes(99, (end - start) as usize);
        stream.write_all(&junk)?;
    } else {
        file.seek(SeekFrom::Start(start))?;
        let mut left = end - start;
        let mut buf = vec![0u8; 64 << 10];
        while left > 0 {
            let want = buf.len().min(left as usize);
            let n = file.read(&mut buf[..want])?;
            if n == 0 {
                break;
            }
            stream.write_all(&buf[..n])?;
            sent.fetch_add(n as u64, Ordering::SeqCst);
            left -= n as u64;
        }
    }
    stream.flush()
}

/// One node: its own copy of the disk and channel, a state dir, os-release and cmdline
/// saying 1.0 runs from root-a, a server, and a config file.
pub struct Node {
    pub tmp: tempfile::TempDir,
    pub disk: PathBuf,
    pub channel: PathBuf,
    pub server: Server,
    pub config_path: PathBuf,
    pub cfg: Config,
}

pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

impl Node {
    pub fn new(strategy: &str) -> Node {
        let b = base();
        let tmp = tempfile::tempdir().unwrap();
        let disk = tmp.path().join("disk.img");
        std::fs::copy(&b.disk, &disk).unwrap();
        let channel = tmp.path().join("channel");
        copy_tree(&b.channel, &channel);
        let server = serve(channel.clone());
        let osr = tmp.path().join("os-release");
        std::fs::write(&osr, format!("IMAGE_ID=minimal\nIMAGE_VERSION={OLD}\n")).unwrap();
        let cmdline = tmp.path().join("cmdline");
        std::fs::write(&cmdline, "root=PARTLABEL=root-a ro console=ttyS0 quiet\n").unwrap();
        let text = format!(
            "channel_url = \"{}\"\ntrusted_root = \"{}\"\nstate_dir = \"{}\"\nstrategy = \"{strategy}\"\n\
             disk = \"{}\"\nos_release = \"{}\"\nkernel_cmdline = \"{}\"\n",
            server.url,
            channel.join("metadata/1.root.json").display(),
            tmp.path().join("state").display(),
            disk.display(),
            osr.display(),
            cmdline.display(),
        );
        let config_path = tmp.path().join("config.toml");
        std::fs::write(&config_path, &text).unwrap();
        let cfg = Config::load(&config_path).unwrap();
        Node {
            tmp,
            disk,
            channel,
            server,
            config_path,
            cfg,
        }
    }

    pub fn updater(&self) -> imgupdate::Updater {
        imgupdate::Updater::new(self.cfg.clone()).unwrap()
    }

    pub fn disk(&self) -> imgupdate::slots::Disk {
        imgupdate::slots::Disk::open(&self.disk).unwrap()
    }

    /// sha256 of the first `len` bytes of a slot.
    pub fn slot_hash(&self, slot: Slot, len: u64) -> String {
        self.disk().hash_slot(slot, len).unwrap()
    }

    /// sha256 of the whole partition of a slot.
    pub fn partition_hash(&self, slot: Slot) -> String {
        let d = self.disk();
        let (_, size) = d.range(PartitionRole::Root(slot)).unwrap();
        d.hash_slot(slot, size).unwrap()
    }

    /// Entry file names on the ESP.
    pub fn entries(&self) -> Vec<String> {
        let d = self.disk();
        imgdisk::esp::list_dir(d.open_esp().unwrap(), boot::ENTRIES_DIR).unwrap()
    }

    pub fn bootable(&self, slot: Slot) -> bool {
        imgupdate::stage::is_bootable(&self.disk(), slot).unwrap()
    }

    pub fn state(&self) -> imgupdate::StateFile {
        imgupdate::StateFile::load(&self.cfg.state_dir).unwrap()
    }
}
