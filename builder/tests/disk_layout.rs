//! Builds a small imgbuild disk end to end (GPT, FAT32 ESP, ext4 root-a, empty root-b,
//! ext4 var) and reads it back with the `gpt` crate, `sfdisk`, `fatfs` and e2fsprogs.
#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use imgbuild::disk::{self, DiskContents, DiskLayout, DiskSizes};
use imgbuild::filesystem::{make_ext4, normalize_tree, Ext4Spec};
use imgdisk::esp::{read_esp_file, EspFile};
use imgformat::boot::{self, BootEntry, LoaderConf};
use imgformat::layout::{PartitionRole, Slot};
use sha2::{Digest, Sha256};

const MIB: u64 = 1024 * 1024;
const EPOCH: i64 = 1_700_000_000;
const SEED: &str = "test-node 1.0.0";
const SYSTEMD_BOOT: &str = "/usr/lib/systemd/boot/efi/systemd-bootx64.efi";

fn sizes() -> DiskSizes {
    DiskSizes {
        esp: 64 * MIB,
        root: 32 * MIB,
        var: 32 * MIB,
    }
}

fn esp_files() -> Vec<EspFile> {
    let entry = BootEntry {
        slot: Slot::A,
        title: "Test node".to_string(),
        version: "1.0.0".to_string(),
        cmdline: "console=ttyS0".to_string(),
        tries: None,
    };
    vec![
        EspFile::file(boot::FALLBACK_LOADER_PATH, SYSTEMD_BOOT),
        EspFile::bytes(boot::LOADER_CONF_PATH, LoaderConf::default().render()),
        EspFile::bytes(boot::entry_path(&entry.name()), entry.render().unwrap()),
        EspFile::bytes(boot::kernel_path(Slot::A), vec![0x4du8; 200_000]),
        EspFile::bytes(boot::initrd_path(Slot::A), vec![0x1fu8; 100_000]),
    ]
}

/// Make a root tree and var tree, then a full disk in `dir`; returns the disk path.
fn build(dir: &Path) -> PathBuf {
    let root = dir.join("root");
    fs::create_dir_all(root.join("etc")).unwrap();
    fs::create_dir_all(root.join("usr/lib")).unwrap();
    fs::write(root.join("etc/os-release"), "IMAGE_VERSION=1.0.0\n").unwrap();
    fs::write(root.join("usr/lib/big"), vec![3u8; 1_000_000]).unwrap();
    std::os::unix::fs::symlink("../usr/lib", root.join("etc/lib")).unwrap();
    let var = dir.join("var");
    fs::create_dir_all(var.join("lib/imgupdate")).unwrap();
    fs::write(var.join("lib/imgupdate/state"), "{}\n").unwrap();
    normalize_tree(&root, EPOCH).unwrap();

    let layout = DiskLayout::plan(&sizes(), SEED).unwrap();
    let root_img = dir.join("root.ext4");
    let spec = Ext4Spec {
        source: &root,
        label: "root",
        uuid: disk::derive_uuid(SEED, "root filesystem uuid"),
        hash_seed: disk::derive_uuid(SEED, "root filesystem hash seed"),
        size: 24 * MIB,
        epoch: EPOCH,
        journal: false,
    };
    make_ext4(&spec, &root_img, 0).unwrap();

    let files = esp_files();
    let path = dir.join("node.raw");
    disk::write_disk(
        &path,
        &layout,
        &DiskContents {
            esp_files: &files,
            root_a: &root_img,
            var_tree: Some(&var),
            seed: SEED,
            epoch: EPOCH,
        },
    )
    .unwrap();
    assert!(!disk::partial_path(&path).exists());
    path
}

fn sha256(path: &Path) -> String {
    let mut hasher = Sha256::new();
    let mut file = File::open(path).unwrap();
    let mut buf = vec![0; 1 << 20];
    loop {
        let n = file.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    hex::encode(hasher.finalize())
}

fn tool(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(out.status.success(), "{program} {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

fn at_offset(path: &Path, offset: u64) -> String {
    format!("{}?offset={offset}", path.display())
}

#[test]
fn disk_reads_back_with_gpt_sfdisk_fatfs_and_e2fsprogs() {
    let dir = tempfile::tempdir().unwrap();
    let path = build(dir.path());
    let layout = DiskLayout::plan(&sizes(), SEED).unwrap();
    assert_eq!(fs::metadata(&path).unwrap().len(), layout.total_size);

    // The gpt crate, requiring both headers to be valid.
    let gpt = gpt::GptConfig::new()
        .writable(false)
        .only_valid_headers(true)
        .open(&path)
        .unwrap();
    assert_eq!(*gpt.guid(), layout.disk_guid);
    let parts = gpt.partitions();
    assert_eq!(parts.len(), 4);
    for extent in &layout.partitions {
        let p = &parts[&extent.role.partition_number()];
        assert_eq!(p.name, extent.role.label());
        assert_eq!(p.part_type_guid.guid, extent.role.type_guid());
        assert_eq!(p.part_guid, extent.guid);
        assert_eq!(
            (p.first_lba, p.last_lba),
            (extent.first_lba, extent.last_lba)
        );
    }

    // sfdisk's independent reading.
    let json: serde_json::Value =
        serde_json::from_str(&tool("sfdisk", &["--json", path.to_str().unwrap()])).unwrap();
    let table = &json["partitiontable"];
    assert_eq!(table["label"], "gpt");
    assert_eq!(
        table["id"].as_str().unwrap().to_lowercase(),
        layout.disk_guid.to_string()
    );
    let sf_parts = table["partitions"].as_array().unwrap();
    assert_eq!(sf_parts.len(), 4);
    let expected = [
        ("esp", "c12a7328-f81f-11d2-ba4b-00a0c93ec93b", 64),
        ("root-a", "4f68bce3-e8cd-4db1-96e7-fbcaf984b709", 32),
        ("root-b", "4f68bce3-e8cd-4db1-96e7-fbcaf984b709", 32),
        ("var", "4d21b016-b534-45c2-a9fb-5c16e091fd2d", 32),
    ];
    for ((name, type_guid, size_mib), (sf, extent)) in expected
        .into_iter()
        .zip(sf_parts.iter().zip(&layout.partitions))
    {
        assert_eq!(sf["name"], name);
        assert_eq!(sf["type"].as_str().unwrap().to_lowercase(), type_guid);
        assert_eq!(
            sf["uuid"].as_str().unwrap().to_lowercase(),
            extent.guid.to_string()
        );
        let start = sf["start"].as_u64().unwrap();
        assert_eq!(start % 2048, 0, "{name} starts on a 1 MiB boundary");
        assert_eq!(start, extent.first_lba);
        assert_eq!(sf["size"].as_u64().unwrap() * 512, size_mib * MIB, "{name}");
    }
    let verify = Command::new("sfdisk")
        .args(["--verify", path.to_str().unwrap()])
        .output()
        .unwrap();
    let verify_out = String::from_utf8_lossy(&verify.stdout);
    assert!(verify.status.success(), "{verify:?}");
    assert!(verify_out.contains("No errors detected"), "{verify_out}");

    // Protective MBR: one 0xEE partition from LBA 1, boot signature.
    let mut mbr = [0u8; 512];
    File::open(&path).unwrap().read_exact(&mut mbr).unwrap();
    assert_eq!(mbr[446 + 4], 0xEE);
    assert_eq!(u32::from_le_bytes(mbr[454..458].try_into().unwrap()), 1);
    assert_eq!(
        u32::from_le_bytes(mbr[458..462].try_into().unwrap()) as u64,
        layout.total_size / 512 - 1
    );
    assert!(mbr[462..510].iter().all(|&b| b == 0));
    assert_eq!(&mbr[510..], &[0x55, 0xAA]);

    // ESP files, read back with fatfs through a slice of the disk file.
    let esp = layout.extent(PartitionRole::Esp).unwrap();
    let file = File::options().read(true).write(true).open(&path).unwrap();
    for f in esp_files() {
        let slice =
            fscommon::StreamSlice::new(&file, esp.offset(), esp.offset() + esp.size()).unwrap();
        let expected = match &f.source {
            imgdisk::esp::EspSource::Bytes(b) => b.clone(),
            imgdisk::esp::EspSource::File(p) => fs::read(p).unwrap(),
        };
        assert_eq!(
            read_esp_file(slice, &f.path).unwrap(),
            expected,
            "{}",
            f.path
        );
    }
    // dosfstools finds nothing to repair (it has no offset option: check a copy).
    let esp_copy = dir.path().join("esp.img");
    let mut esp_bytes = vec![0u8; esp.size() as usize];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut esp_bytes, esp.offset()).unwrap();
    fs::write(&esp_copy, &esp_bytes).unwrap();
    drop(esp_bytes);
    let fsck = tool("fsck.fat", &["-n", "-v", esp_copy.to_str().unwrap()]);
    assert!(fsck.contains("32 bit entries"), "{fsck}");
    assert!(!fsck.contains("Leaving filesystem unchanged"), "{fsck}");
    fs::remove_file(&esp_copy).unwrap();

    // blkid reads the ESP at its offset as FAT32 ("vfat").
    let blkid = tool(
        "blkid",
        &[
            "-p",
            "-O",
            &esp.offset().to_string(),
            path.to_str().unwrap(),
        ],
    );
    assert!(
        blkid.contains("TYPE=\"vfat\"") && blkid.contains("VERSION=\"FAT32\""),
        "{blkid}"
    );

    // root-a: ext4 labelled "root" with our files; root-b: all zeros.
    let root_a = layout.offset(PartitionRole::Root(Slot::A)).unwrap();
    let header = tool("dumpe2fs", &["-h", &at_offset(&path, root_a)]);
    assert!(
        header.contains("Filesystem volume name:   root"),
        "{header}"
    );
    assert_eq!(
        tool(
            "debugfs",
            &["-R", "cat /etc/os-release", &at_offset(&path, root_a)]
        ),
        "IMAGE_VERSION=1.0.0\n"
    );
    let root_b = layout.extent(PartitionRole::Root(Slot::B)).unwrap();
    let bytes = fs::read(&path).unwrap();
    let b_range = root_b.offset() as usize..(root_b.offset() + root_b.size()) as usize;
    assert!(
        bytes[b_range].iter().all(|&b| b == 0),
        "root-b must be empty"
    );

    // var: ext4 labelled "var" with a journal and the var tree.
    let var = layout.offset(PartitionRole::Var).unwrap();
    let header = tool("dumpe2fs", &["-h", &at_offset(&path, var)]);
    assert!(header.contains("Filesystem volume name:   var"), "{header}");
    assert!(header.contains("has_journal"), "{header}");
    assert_eq!(
        tool(
            "debugfs",
            &["-R", "cat /lib/imgupdate/state", &at_offset(&path, var)]
        ),
        "{}\n"
    );

    // Both ext4 filesystems pass a forced read-only fsck.
    for offset in [root_a, var] {
        tool("e2fsck", &["-fn", &at_offset(&path, offset)]);
    }

    // Sparse: the empty slot and the free space of each filesystem are holes.
    let allocated = fs::metadata(&path).unwrap().blocks() * 512;
    assert!(allocated < 40 * MIB, "{allocated} bytes allocated");

    // And our own reader gives the plan back.
    assert_eq!(disk::inspect(&path).unwrap(), layout);
}

#[test]
fn two_builds_are_byte_identical() {
    let one = tempfile::tempdir().unwrap();
    let two = tempfile::tempdir().unwrap();
    let a = build(one.path());
    // The second build's trees are created later (other ctimes) in another directory.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let b = build(two.path());
    assert_eq!(sha256(&a), sha256(&b));
}

#[test]
fn oversized_root_image_fails_without_leaving_a_disk() {
    let dir = tempfile::tempdir().unwrap();
    let layout = DiskLayout::plan(&sizes(), SEED).unwrap();
    let root_img = dir.path().join("root.ext4");
    File::create(&root_img).unwrap().set_len(33 * MIB).unwrap();
    let path = dir.path().join("node.raw");
    let err = disk::write_disk(
        &path,
        &layout,
        &DiskContents {
            esp_files: &esp_files(),
            root_a: &root_img,
            var_tree: None,
            seed: SEED,
            epoch: EPOCH,
        },
    )
    .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("is 33 MiB but the root-a slot is 32 MiB"),
        "{msg}"
    );
    assert!(!path.exists());
    assert!(!disk::partial_path(&path).exists());
}

#[test]
fn inspect_rejects_disks_that_are_not_ours() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("foreign.raw");
    File::create(&path).unwrap().set_len(8 * MIB).unwrap();
    let script = "label: gpt\nsize=2MiB, type=linux, name=data\n";
    let mut child = Command::new("sfdisk")
        .args(["--quiet", path.to_str().unwrap()])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), script.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success());
    let err = disk::inspect(&path).unwrap_err();
    assert!(
        format!("{err:#}").contains("unknown label \"data\""),
        "{err:#}"
    );
    let blank = dir.path().join("blank.raw");
    File::create(&blank).unwrap().set_len(MIB).unwrap();
    assert!(disk::inspect(&blank).is_err());
}
