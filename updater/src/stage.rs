//! Changing what boots: the boot entries, kernels and initrds on the ESP, written with
//! `fatfs` (no mounts), following the rules in `imgformat::boot`'s module docs.
//!
//! This module owns: making a slot unbootable before it is written
//! ([`invalidate_slot`]), staging a verified slot (its kernel and initrd, read from its
//! ext4 root with `ext4-view`, and for the `reboot` strategy its entry with boot counting),
//! the kexec plan, committing an entry, and marking a slot bad. It must never make a slot
//! bootable that has not been verified, never touch the running slot's entry except to
//! mark it bad on an explicit rollback, and never write `loader.conf` or EFI variables.

use std::io::{Read, Seek, SeekFrom};

use anyhow::{bail, Context, Result};
use imgformat::boot::{self, BootEntry, EntryName, DEFAULT_TRIES, ENTRIES_DIR};
use imgformat::layout::Slot;
use serde::Serialize;

use crate::slots::Disk;

/// Entries on the ESP that belong to `slot`, as (file name, parsed name).
pub fn slot_entries(disk: &Disk, slot: Slot) -> Result<Vec<(String, EntryName)>> {
    let names = imgdisk::esp::list_dir(disk.open_esp()?, ENTRIES_DIR)?;
    Ok(names
        .into_iter()
        .filter_map(|n| {
            // Our own temporary names end in .tmp and never parse.
            let parsed = EntryName::parse(&n.to_ascii_lowercase()).ok()?;
            (parsed.slot == slot).then_some((n, parsed))
        })
        .collect())
}

/// The current entry of `slot`, if it has one that parses.
pub fn read_entry(disk: &Disk, slot: Slot) -> Result<Option<BootEntry>> {
    let Some((name, _)) = slot_entries(disk, slot)?.into_iter().next() else {
        return Ok(None);
    };
    let path = format!("{ENTRIES_DIR}/{name}");
    let bytes = imgdisk::esp::read_esp_file(disk.open_esp()?, &path)?;
    let text = String::from_utf8(bytes).with_context(|| format!("{path} is not UTF-8"))?;
    Ok(Some(BootEntry::parse(&name.to_ascii_lowercase(), &text)?))
}

/// Remove every entry of `slot` and sync the disk, so the firmware cannot boot it while
/// it is being written. Returns how many entries were removed.
pub fn invalidate_slot(disk: &Disk, slot: Slot) -> Result<usize> {
    let entries = slot_entries(disk, slot)?;
    for (name, _) in &entries {
        imgdisk::esp::remove_file(disk.open_esp()?, &format!("{ENTRIES_DIR}/{name}"))?;
    }
    // Also any half-written temporary entry of ours.
    for name in imgdisk::esp::list_dir(disk.open_esp()?, ENTRIES_DIR)? {
        if name.ends_with(".tmp")
            && name.to_ascii_lowercase().starts_with(&format!(
                "{}{}",
                boot::ENTRY_PREFIX,
                slot.letter()
            ))
        {
            imgdisk::esp::remove_file(disk.open_esp()?, &format!("{ENTRIES_DIR}/{name}"))?;
        }
    }
    disk.sync()?;
    Ok(entries.len())
}

/// Whether the firmware could boot `slot` (an entry with tries left or without counter).
pub fn is_bootable(disk: &Disk, slot: Slot) -> Result<bool> {
    Ok(slot_entries(disk, slot)?.iter().any(|(_, n)| !n.is_bad()))
}

/// Adapter: ext4-view reads the slot through its bounded view.
struct SlotReader<R>(R);

impl<R: Read + Seek> ext4_view::Ext4Read for SlotReader<R> {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        self.0.seek(SeekFrom::Start(start_byte)).map_err(Box::new)?;
        self.0.read_exact(dst).map_err(Box::new)?;
        Ok(())
    }
}

/// The kernel and initrd inside a root filesystem: exactly one `/boot/vmlinuz-<v>` and its
/// `/boot/initrd.img-<v>` (the builder's rule, `imgbuild::compose::find_kernel`).
pub fn read_kernel(disk: &Disk, slot: Slot, image_len: u64) -> Result<(Vec<u8>, Vec<u8>)> {
    let reader = SlotReader(disk.open_slot(slot, Some(image_len))?);
    let fs = ext4_view::Ext4::load(Box::new(reader))
        .with_context(|| format!("reading the ext4 root of slot {slot}"))?;
    let mut versions = Vec::new();
    for e in fs
        .read_dir("/boot")
        .with_context(|| format!("listing /boot in slot {slot}"))?
    {
        let e = e.with_context(|| format!("listing /boot in slot {slot}"))?;
        if let Ok(name) = e.file_name().as_str() {
            if let Some(v) = name.strip_prefix("vmlinuz-") {
                versions.push(v.to_string());
            }
        }
    }
    let version = match versions.as_slice() {
        [one] => one.clone(),
        [] => bail!("slot {slot} has no /boot/vmlinuz-*"),
        many => bail!(
            "slot {slot} has {} kernels in /boot: {}",
            many.len(),
            many.join(", ")
        ),
    };
    let read = |p: String| {
        fs.read(p.as_str())
            .with_context(|| format!("reading {p} from slot {slot}"))
    };
    Ok((
        read(format!("/boot/vmlinuz-{version}"))?,
        read(format!("/boot/initrd.img-{version}"))?,
    ))
}

/// What issue 6's kexec step loads: files on the ESP and the command line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KexecPlan {
    pub slot: Slot,
    /// ESP-relative path of the kernel (`imgbuild/b/linux`).
    pub kernel: String,
    /// ESP-relative path of the initrd.
    pub initrd: String,
    /// Full kernel command line (`root=PARTLABEL=root-b ro ...`).
    pub cmdline: String,
    /// The entry to write with [`commit_entry`] once the health checks passed.
    #[serde(skip)]
    pub entry: BootEntry,
}

/// The entry `slot` gets for `version`: title and extra command line copied from the
/// running slot's entry, so both slots boot the same way.
pub fn entry_for(
    disk: &Disk,
    active: Slot,
    slot: Slot,
    version: &str,
    tries: Option<u32>,
) -> Result<BootEntry> {
    let template = read_entry(disk, active)?;
    let (title, cmdline) = match template {
        Some(t) => (t.title, t.cmdline),
        None => ("imgbuild".to_string(), String::new()),
    };
    Ok(BootEntry {
        slot,
        title,
        version: version.to_string(),
        cmdline,
        tries: tries.map(|t| (t, 0)),
    })
}

fn install_kernel(disk: &Disk, slot: Slot, image_len: u64) -> Result<()> {
    let (kernel, initrd) = read_kernel(disk, slot, image_len)?;
    // The slot has no entry (removed before it was written), so its old kernel and
    // initrd boot nothing: drop them first, so the ESP never needs room for three pairs.
    if !slot_entries(disk, slot)?.is_empty() {
        bail!("slot {slot} still has a boot entry; refusing to replace its kernel");
    }
    imgdisk::esp::remove_file(disk.open_esp()?, &boot::kernel_path(slot))?;
    imgdisk::esp::remove_file(disk.open_esp()?, &boot::initrd_path(slot))?;
    imgdisk::esp::write_file(disk.open_esp()?, &boot::kernel_path(slot), &kernel)?;
    imgdisk::esp::write_file(disk.open_esp()?, &boot::initrd_path(slot), &initrd)?;
    Ok(())
}

/// `reboot` strategy: kernel and initrd, then the entry `imgbuild-<slot>+3.conf`. The next
/// firmware boot picks it (newest version); boot counting falls back by itself.
pub fn stage_for_reboot(
    disk: &Disk,
    active: Slot,
    slot: Slot,
    version: &str,
    image_len: u64,
) -> Result<BootEntry> {
    install_kernel(disk, slot, image_len)?;
    let entry = entry_for(disk, active, slot, version, Some(DEFAULT_TRIES))?;
    commit_entry(disk, &entry)?;
    Ok(entry)
}

/// `kexec` strategy: kernel and initrd only. No entry: a hang after the kexec sends the
/// next firmware boot to the old slot. Write `plan.entry` with [`commit_entry`] after the
/// health checks passed.
pub fn stage_for_kexec(
    disk: &Disk,
    active: Slot,
    slot: Slot,
    version: &str,
    image_len: u64,
) -> Result<KexecPlan> {
    install_kernel(disk, slot, image_len)?;
    disk.sync()?;
    kexec_plan(disk, active, slot, version)
}

/// The kexec plan for a slot already staged (e.g. after a restart in `staged`): reads the
/// running slot's entry for the command line, writes nothing.
pub fn kexec_plan(disk: &Disk, active: Slot, slot: Slot, version: &str) -> Result<KexecPlan> {
    let entry = entry_for(disk, active, slot, version, None)?;
    Ok(KexecPlan {
        slot,
        kernel: boot::kernel_path(slot),
        initrd: boot::initrd_path(slot),
        cmdline: entry.options(),
        entry,
    })
}

/// Read a staged slot's kernel and initrd back from the ESP (what `kexec_file_load` gets).
pub fn read_staged(disk: &Disk, plan: &KexecPlan) -> Result<(Vec<u8>, Vec<u8>)> {
    Ok((
        imgdisk::esp::read_esp_file(disk.open_esp()?, &plan.kernel)?,
        imgdisk::esp::read_esp_file(disk.open_esp()?, &plan.initrd)?,
    ))
}

/// Write `entry` as the only entry of its slot (replacing any other counter state), sync.
pub fn commit_entry(disk: &Disk, entry: &BootEntry) -> Result<()> {
    let text = entry.render()?;
    let name = entry.file_name();
    for (old, _) in slot_entries(disk, entry.slot)? {
        if old != name {
            imgdisk::esp::remove_file(disk.open_esp()?, &format!("{ENTRIES_DIR}/{old}"))?;
        }
    }
    crate::failpoint::hit("stage.entry");
    imgdisk::esp::write_file(
        disk.open_esp()?,
        &format!("{ENTRIES_DIR}/{name}"),
        text.as_bytes(),
    )?;
    disk.sync()
}

/// Mark `slot`'s entry bad (`+0-N`, sorted last by systemd-boot), keeping it for forensics.
pub fn mark_bad(disk: &Disk, slot: Slot) -> Result<bool> {
    let Some((name, parsed)) = slot_entries(disk, slot)?.into_iter().next() else {
        return Ok(false);
    };
    let done = parsed.tries.map_or(DEFAULT_TRIES, |(l, d)| l + d).max(1);
    let bad = EntryName {
        slot,
        tries: Some((0, done)),
    };
    imgdisk::esp::rename(
        disk.open_esp()?,
        &format!("{ENTRIES_DIR}/{name}"),
        &boot::entry_path(&bad),
    )?;
    disk.sync()?;
    Ok(true)
}
