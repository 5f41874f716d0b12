//! kexec selection from real disk images written by `imgbuild::disk::write_disk`:
//! the right slot's kernel, initrd and command line, trial entries taken, bad entries
//! refused, the kexec-trial fallback when the new slot has no entry yet.

#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use std::path::{Path, PathBuf};

use imgbuild::disk::{write_disk, DiskContents, DiskLayout, DiskSizes, MIB};
use imgcoord::kexec::{select_from_disk, KexecError};
use imgdisk::esp::{EspFile, MIN_ESP_SIZE};
use imgformat::boot::{self, BootEntry, LoaderConf};
use imgformat::layout::Slot;

fn entry(slot: Slot, version: &str, cmdline: &str, tries: Option<(u32, u32)>) -> EspFile {
    let e = BootEntry {
        slot,
        title: "Test Node OS".into(),
        version: version.into(),
        cmdline: cmdline.into(),
        tries,
    };
    EspFile::bytes(boot::entry_path(&e.name()), e.render().unwrap())
}

fn kernel_files(slot: Slot) -> Vec<EspFile> {
    vec![
        EspFile::bytes(boot::kernel_path(slot), format!("kernel-{}", slot.letter())),
        EspFile::bytes(
            boot::initrd_path(slot),
            format!("initrd-{}", slot.letter()).repeat(1000),
        ),
    ]
}

/// A disk whose ESP holds slot A (good entry) plus `extra` files.
fn disk(dir: &Path, name: &str, extra: Vec<EspFile>) -> PathBuf {
    let root_a = dir.join(format!("{name}-root-a.img"));
    std::fs::write(&root_a, vec![0u8; 1024 * 1024]).unwrap();
    let layout = DiskLayout::plan(
        &DiskSizes {
            esp: MIN_ESP_SIZE,
            root: 16 * MIB,
            var: 16 * MIB,
        },
        name,
    )
    .unwrap();
    let mut files = vec![
        EspFile::bytes(boot::LOADER_CONF_PATH, LoaderConf::default().render()),
        entry(Slot::A, "1.0", "console=ttyS0", None),
    ];
    files.extend(kernel_files(Slot::A));
    files.extend(extra);
    let path = dir.join(format!("{name}.img"));
    write_disk(
        &path,
        &layout,
        &DiskContents {
            esp_files: &files,
            root_a: &root_a,
            var_tree: None,
            seed: name,
            epoch: 1_700_000_000,
        },
    )
    .unwrap();
    path
}

#[test]
fn selects_each_slot_and_the_trial_entry() {
    let dir = tempfile::tempdir().unwrap();
    let mut extra = vec![entry(
        Slot::B,
        "1.1",
        "console=ttyS0 quiet imgbuild.trial=1",
        Some((3, 0)),
    )];
    extra.extend(kernel_files(Slot::B));
    let path = disk(dir.path(), "trial", extra);

    let b = select_from_disk(&path, Slot::B, None).unwrap();
    assert_eq!(b.slot, Slot::B);
    assert_eq!(b.entry_file.as_deref(), Some("imgbuild-b+3.conf"));
    assert_eq!(b.version.as_deref(), Some("1.1"));
    assert_eq!(b.kernel, b"kernel-b");
    assert_eq!(b.initrd, "initrd-b".repeat(1000).as_bytes());
    assert_eq!(
        b.cmdline,
        "root=PARTLABEL=root-b ro console=ttyS0 quiet imgbuild.trial=1"
    );

    let a = select_from_disk(&path, Slot::A, None).unwrap();
    assert_eq!(a.entry_file.as_deref(), Some("imgbuild-a.conf"));
    assert_eq!(a.kernel, b"kernel-a");
    assert_eq!(a.cmdline, "root=PARTLABEL=root-a ro console=ttyS0");
    // A given command line does not override an existing entry's.
    let a2 = select_from_disk(&path, Slot::A, Some("ignored")).unwrap();
    assert_eq!(a2.cmdline, a.cmdline);

    // Staging writes exactly the chosen bytes.
    let staged = b.stage(&dir.path().join("kexec")).unwrap();
    assert_eq!(std::fs::read(&staged.kernel).unwrap(), b"kernel-b");
    assert_eq!(std::fs::read(&staged.initrd).unwrap(), b.initrd);
    assert_eq!(staged.cmdline, b.cmdline);
    // Selection did not modify the image.
    let before = std::fs::read(&path).unwrap();
    select_from_disk(&path, Slot::B, None).unwrap();
    assert!(std::fs::read(&path).unwrap() == before);
}

#[test]
fn partly_used_trial_entry_is_still_chosen() {
    let dir = tempfile::tempdir().unwrap();
    let mut extra = vec![entry(Slot::B, "1.1", "console=ttyS0", Some((1, 2)))];
    extra.extend(kernel_files(Slot::B));
    let path = disk(dir.path(), "used", extra);
    let b = select_from_disk(&path, Slot::B, None).unwrap();
    assert_eq!(b.entry_file.as_deref(), Some("imgbuild-b+1-2.conf"));
    assert_eq!(b.cmdline, "root=PARTLABEL=root-b ro console=ttyS0");
}

#[test]
fn bad_entry_is_never_chosen() {
    let dir = tempfile::tempdir().unwrap();
    let mut extra = vec![entry(Slot::B, "1.1", "console=ttyS0", Some((0, 3)))];
    extra.extend(kernel_files(Slot::B));
    let path = disk(dir.path(), "bad", extra);
    match select_from_disk(&path, Slot::B, None) {
        Err(KexecError::EntryBad { file }) => assert_eq!(file, "imgbuild-b+0-3.conf"),
        other => panic!("expected EntryBad, got {other:?}"),
    }
    // Not even with a command line supplied.
    assert!(matches!(
        select_from_disk(&path, Slot::B, Some("console=ttyS0")),
        Err(KexecError::EntryBad { .. })
    ));
    // The good slot is unaffected.
    assert_eq!(
        select_from_disk(&path, Slot::A, None).unwrap().kernel,
        b"kernel-a"
    );
}

#[test]
fn kexec_trial_without_entry_needs_a_command_line() {
    let dir = tempfile::tempdir().unwrap();
    // Slot B's kernel and initrd are staged on the ESP, its entry not yet written.
    let path = disk(dir.path(), "noentry", kernel_files(Slot::B));
    assert!(matches!(
        select_from_disk(&path, Slot::B, None),
        Err(KexecError::NoEntry { slot: "b", .. })
    ));
    let b = select_from_disk(&path, Slot::B, Some("console=ttyS0 imgbuild.kexec=1")).unwrap();
    assert_eq!(b.entry_file, None);
    assert_eq!(b.version, None);
    assert_eq!(b.kernel, b"kernel-b");
    assert_eq!(
        b.cmdline,
        "root=PARTLABEL=root-b ro console=ttyS0 imgbuild.kexec=1"
    );
}

#[test]
fn missing_kernel_and_non_disks_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    // An entry for B but no kernel files for it.
    let path = disk(
        dir.path(),
        "nokernel",
        vec![entry(Slot::B, "1.1", "", Some((3, 0)))],
    );
    match select_from_disk(&path, Slot::B, None) {
        Err(KexecError::Esp { message, .. }) => {
            assert!(message.contains("imgbuild/b/linux"), "{message}")
        }
        other => panic!("expected Esp error, got {other:?}"),
    }
    let junk = dir.path().join("junk.img");
    std::fs::write(&junk, vec![0u8; 4 * 1024 * 1024]).unwrap();
    assert!(matches!(
        select_from_disk(&junk, Slot::A, None),
        Err(KexecError::Esp { .. })
    ));
}
