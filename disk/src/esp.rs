//! The EFI System Partition: a FAT32 filesystem written with the `fatfs` crate.
//!
//! This module owns formatting an ESP and filling it with files (systemd-boot, the
//! loader configuration, each slot's kernel, initrd and entry), reproducibly: the volume
//! id comes from the caller (derived from the recipe) and every directory entry carries
//! the build epoch. It never mounts anything, never reads the clock, and never writes
//! outside the stream it is given; callers confine that stream to the partition's byte
//! range (`fscommon::StreamSlice`). What goes into the ESP, and under which names, is
//! `imgformat::boot`'s business, not this module's.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use fatfs::{Date, DateTime, FatType, FileSystem, FormatVolumeOptions, FsOptions, Time};
use sha2::{Digest, Sha256};

const SECTOR: u64 = 512;
const MIB: u64 = 1024 * 1024;

/// Smallest ESP we make.
///
/// FAT32 needs at least 65,525 clusters; with 512-byte sectors and the 512-byte clusters
/// `fatfs` picks below 260 MB that is ~33 MiB, and some firmware misdetects FAT32 volumes
/// close to that boundary as FAT16. 64 MiB keeps clear of it and holds two kernels and
/// two trimmed initrds (one per slot) next to systemd-boot.
pub const MIN_ESP_SIZE: u64 = 64 * MIB;

/// Where a file's bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EspSource {
    /// Copied from a file on the build host, streamed.
    File(PathBuf),
    /// Given in memory (generated configuration, boot entries).
    Bytes(Vec<u8>),
}

/// One file to put on the ESP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EspFile {
    /// `/`-separated path relative to the ESP root, e.g. `EFI/BOOT/BOOTX64.EFI`; parent
    /// directories are created.
    pub path: String,
    pub source: EspSource,
}

impl EspFile {
    pub fn bytes(path: impl Into<String>, bytes: impl Into<Vec<u8>>) -> EspFile {
        EspFile {
            path: path.into(),
            source: EspSource::Bytes(bytes.into()),
        }
    }

    pub fn file(path: impl Into<String>, source: impl Into<PathBuf>) -> EspFile {
        EspFile {
            path: path.into(),
            source: EspSource::File(source.into()),
        }
    }

    fn len(&self) -> Result<u64> {
        match &self.source {
            EspSource::Bytes(b) => Ok(b.len() as u64),
            EspSource::File(p) => Ok(std::fs::metadata(p)
                .with_context(|| format!("reading metadata of {} for the ESP", p.display()))?
                .len()),
        }
    }
}

/// A FAT volume id derived from `seed` (e.g. the recipe name and version).
pub fn volume_id(seed: &str) -> u32 {
    let digest = Sha256::digest(format!("imgbuild esp volume id\0{seed}").as_bytes());
    u32::from_le_bytes([digest[0], digest[1], digest[2], digest[3]])
}

/// Format `partition` (exactly `size` bytes, position 0 = first byte of the ESP) as FAT32
/// and write `files` into it, all timestamps at `epoch`.
///
/// Files are written sorted by path, so the result does not depend on the order of
/// `files`. Formatting is a quick format: clusters no file uses keep their old bytes, so
/// the range must be zeros (a fresh sparse disk file) for the result to be reproducible.
pub fn write_esp<F: Read + Write + Seek>(
    mut partition: F,
    size: u64,
    volume_id: u32,
    label: &str,
    files: &[EspFile],
    epoch: i64,
) -> Result<()> {
    if size < MIN_ESP_SIZE {
        bail!(
            "the ESP must be at least {} MiB (FAT32 with 512-byte sectors), got {} MiB",
            MIN_ESP_SIZE / MIB,
            size / MIB
        );
    }
    if size % SECTOR != 0 || size / SECTOR > u64::from(u32::MAX) {
        bail!("ESP size {size} is not a whole number of 512-byte sectors below 2 TiB");
    }
    let label = volume_label(label)?;
    let sorted = sorted_files(files)?;

    partition
        .seek(SeekFrom::Start(0))
        .context("seeking to the start of the ESP")?;
    fatfs::format_volume(
        &mut partition,
        FormatVolumeOptions::new()
            .fat_type(FatType::Fat32)
            .bytes_per_sector(SECTOR as u16)
            .total_sectors((size / SECTOR) as u32)
            .volume_id(volume_id)
            .volume_label(label),
    )
    .context("formatting the ESP as FAT32")?;

    let fs = FileSystem::new(
        &mut partition,
        FsOptions::new().time_provider(epoch_time(epoch)),
    )
    .context("opening the freshly formatted ESP")?;
    {
        let root = fs.root_dir();
        for (path, file) in &sorted {
            let (dirs, name) = match path.rsplit_once('/') {
                Some((dirs, name)) => (Some(dirs), name),
                None => (None, path.as_str()),
            };
            let mut dir = root.clone();
            for component in dirs.into_iter().flat_map(|d| d.split('/')) {
                dir = dir.create_dir(component).with_context(|| {
                    format!("creating directory {component} for ESP file {path}")
                })?;
            }
            let len = file.len()?;
            let stats = fs.stats().context("reading ESP free space")?;
            let cluster = u64::from(stats.cluster_size());
            let needed = len.div_ceil(cluster);
            if needed > u64::from(stats.free_clusters()) {
                bail!(
                    "ESP file {path} ({} KiB) does not fit: {} KiB free of the {} MiB ESP; \
                     raise the ESP size",
                    len.div_ceil(1024),
                    u64::from(stats.free_clusters()) * cluster / 1024,
                    size / MIB
                );
            }
            let mut out = dir
                .create_file(name)
                .with_context(|| format!("creating ESP file {path}"))?;
            out.truncate()
                .with_context(|| format!("truncating ESP file {path}"))?;
            let written = match &file.source {
                EspSource::Bytes(bytes) => out.write_all(bytes).map(|()| bytes.len() as u64),
                EspSource::File(src) => {
                    let mut input = File::open(src).with_context(|| {
                        format!("opening {} for ESP file {path}", src.display())
                    })?;
                    io::copy(&mut input, &mut out)
                }
            }
            .with_context(|| format!("writing ESP file {path} ({len} bytes)"))?;
            if written != len {
                bail!("ESP file {path}: source changed size while copying ({len} -> {written})");
            }
            out.flush()
                .with_context(|| format!("flushing ESP file {path}"))?;
        }
    }
    fs.unmount().context("closing the ESP")?;
    fix_dot_entries(&mut partition).context("repairing directory dot entries")?;
    partition.flush().context("flushing the ESP")?;
    Ok(())
}

/// Repair what `fatfs` 0.3.6 gets wrong in every directory it creates.
///
/// It writes a long-name (LFN) entry before the `.` and `..` entries, so they are not the
/// first two slots of the directory as FAT requires (fsck.fat "Expected a valid '.'
/// entry in this slot"), and it points `..` of a top-level directory at the root cluster
/// instead of 0. We walk the tree from the root directory and rewrite the first four
/// slots of each directory as `.`, `..`, free, free. Directories written by anything
/// else already start with `.` and are left alone.
fn fix_dot_entries<F: Read + Write + Seek>(disk: &mut F) -> Result<()> {
    const SLOT: usize = 32;
    const ATTR_LFN: u8 = 0x0F;
    const ATTR_DIR: u8 = 0x10;
    const ATTR_VOLUME: u8 = 0x08;
    let mut boot = [0u8; 512];
    disk.seek(SeekFrom::Start(0))?;
    disk.read_exact(&mut boot)?;
    let u16_at = |o: usize| u64::from(u16::from_le_bytes([boot[o], boot[o + 1]]));
    let u32_at = |o: usize| u32::from_le_bytes([boot[o], boot[o + 1], boot[o + 2], boot[o + 3]]);
    let sector = u16_at(11);
    let cluster_size = sector * u64::from(boot[13]);
    let fat_offset = u16_at(14) * sector;
    let data_offset = fat_offset + u64::from(boot[16]) * u64::from(u32_at(36)) * sector;
    let root_cluster = u32_at(44);
    let cluster_offset = |c: u32| data_offset + u64::from(c - 2) * cluster_size;

    let mut pending = vec![(root_cluster, true)];
    let mut visited = 0usize;
    while let Some((first, is_root)) = pending.pop() {
        visited += 1;
        if visited > 65_536 {
            bail!("directory tree too deep or looping");
        }
        // Read the directory's whole cluster chain.
        let mut data = Vec::new();
        let mut cluster = first;
        for _ in 0..65_536 {
            let start = data.len();
            data.resize(start + cluster_size as usize, 0);
            disk.seek(SeekFrom::Start(cluster_offset(cluster)))?;
            disk.read_exact(&mut data[start..])?;
            let mut next = [0u8; 4];
            disk.seek(SeekFrom::Start(fat_offset + 4 * u64::from(cluster)))?;
            disk.read_exact(&mut next)?;
            cluster = u32::from_le_bytes(next) & 0x0FFF_FFFF;
            if !(2..0x0FFF_FFF8).contains(&cluster) {
                break;
            }
        }
        let slot = |i: usize| &data[i * SLOT..(i + 1) * SLOT];
        if !is_root && data.len() >= 4 * SLOT {
            let is_lfn = |i: usize| slot(i)[11] == ATTR_LFN && slot(i)[0] != 0xE5;
            let named = |i: usize, name: &[u8; 11]| &slot(i)[..11] == name;
            if is_lfn(0) && named(1, b".          ") && is_lfn(2) && named(3, b"..         ") {
                let mut fixed = [0u8; 4 * SLOT];
                fixed[..SLOT].copy_from_slice(slot(1));
                fixed[SLOT..2 * SLOT].copy_from_slice(slot(3));
                let dotdot = &mut fixed[SLOT..2 * SLOT];
                let parent = u32::from(u16::from_le_bytes([dotdot[20], dotdot[21]])) << 16
                    | u32::from(u16::from_le_bytes([dotdot[26], dotdot[27]]));
                if parent == root_cluster {
                    // "..": cluster 0 stands for the root directory (FAT spec, 6.1).
                    dotdot[20..22].fill(0);
                    dotdot[26..28].fill(0);
                }
                fixed[2 * SLOT] = 0xE5;
                fixed[3 * SLOT] = 0xE5;
                disk.seek(SeekFrom::Start(cluster_offset(first)))?;
                disk.write_all(&fixed)?;
            }
        }
        for i in 0..data.len() / SLOT {
            let entry = slot(i);
            match entry[0] {
                0 => break,
                0xE5 | b'.' => continue,
                _ => {}
            }
            let attr = entry[11];
            if attr == ATTR_LFN || attr & ATTR_VOLUME != 0 || attr & ATTR_DIR == 0 {
                continue;
            }
            let child = u32::from(u16::from_le_bytes([entry[20], entry[21]])) << 16
                | u32::from(u16::from_le_bytes([entry[26], entry[27]]));
            if child >= 2 {
                pending.push((child, false));
            }
        }
    }
    Ok(())
}

/// Read one file back from an ESP (for tests and for the updater).
pub fn read_esp_file<F: Read + Write + Seek>(mut partition: F, path: &str) -> Result<Vec<u8>> {
    partition
        .seek(SeekFrom::Start(0))
        .context("seeking to the start of the ESP")?;
    let fs = FileSystem::new(&mut partition, FsOptions::new()).context("opening the ESP")?;
    let mut data = Vec::new();
    fs.root_dir()
        .open_file(path)
        .with_context(|| format!("opening ESP file {path}"))?
        .read_to_end(&mut data)
        .with_context(|| format!("reading ESP file {path}"))?;
    Ok(data)
}

// ---------------------------------------------------------------------------------------
// Changing files in an existing ESP (the updater on a node). Each call opens the
// filesystem on `partition`, does one thing and unmounts it cleanly (FSInfo written);
// the caller fsyncs the device afterwards. Times come from the node's clock.

fn open_fs<F: Read + Write + Seek>(partition: &mut F) -> Result<FileSystem<&mut F>> {
    partition
        .seek(SeekFrom::Start(0))
        .context("seeking to the start of the ESP")?;
    FileSystem::new(partition, FsOptions::new()).context("opening the ESP")
}

/// Names of the files (not directories) in `dir` of an existing ESP, sorted; empty when
/// `dir` does not exist.
pub fn list_dir<F: Read + Write + Seek>(mut partition: F, dir: &str) -> Result<Vec<String>> {
    let fs = open_fs(&mut partition)?;
    let mut names = Vec::new();
    {
        let root = fs.root_dir();
        let d = match root.open_dir(dir) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(names),
            Err(e) => return Err(e).with_context(|| format!("opening ESP directory {dir}")),
        };
        for entry in d.iter() {
            let entry = entry.with_context(|| format!("listing ESP directory {dir}"))?;
            if entry.is_file() {
                names.push(entry.file_name());
            }
        }
    }
    fs.unmount().context("closing the ESP")?;
    names.sort();
    Ok(names)
}

/// Write `data` to `path` in an existing ESP, creating parent directories: the bytes go
/// to `<path>.tmp` first, which is then renamed over `path`. FAT has no atomic replace, so
/// a crash leaves either the old file, no file, or the complete new one, never a torn one.
pub fn write_file<F: Read + Write + Seek>(mut partition: F, path: &str, data: &[u8]) -> Result<()> {
    let tmp = format!("{path}.tmp");
    let fs = open_fs(&mut partition)?;
    {
        let root = fs.root_dir();
        if let Some((dirs, _)) = path.rsplit_once('/') {
            let mut prefix = String::new();
            for part in dirs.split('/') {
                if !prefix.is_empty() {
                    prefix.push('/');
                }
                prefix.push_str(part);
                root.create_dir(&prefix)
                    .with_context(|| format!("creating ESP directory {prefix}"))?;
            }
        }
        remove_if_present(&root, &tmp)?;
        let mut f = root
            .create_file(&tmp)
            .with_context(|| format!("creating ESP file {tmp}"))?;
        f.truncate()
            .with_context(|| format!("truncating ESP file {tmp}"))?;
        f.write_all(data)
            .with_context(|| format!("writing ESP file {tmp}"))?;
        f.flush()
            .with_context(|| format!("writing ESP file {tmp}"))?;
        drop(f);
        remove_if_present(&root, path)?;
        root.rename(&tmp, &root, path)
            .with_context(|| format!("renaming ESP file {tmp} to {path}"))?;
    }
    fs.unmount().context("closing the ESP")?;
    Ok(())
}

/// Remove `path` from an existing ESP; returns whether it existed.
pub fn remove_file<F: Read + Write + Seek>(mut partition: F, path: &str) -> Result<bool> {
    let fs = open_fs(&mut partition)?;
    let existed = remove_if_present(&fs.root_dir(), path)?;
    fs.unmount().context("closing the ESP")?;
    Ok(existed)
}

/// Rename `from` to `to` in an existing ESP, replacing `to` if it exists.
pub fn rename<F: Read + Write + Seek>(mut partition: F, from: &str, to: &str) -> Result<()> {
    let fs = open_fs(&mut partition)?;
    {
        let root = fs.root_dir();
        if from != to {
            remove_if_present(&root, to)?;
        }
        root.rename(from, &root, to)
            .with_context(|| format!("renaming ESP file {from} to {to}"))?;
    }
    fs.unmount().context("closing the ESP")?;
    Ok(())
}

fn remove_if_present<T: fatfs::ReadWriteSeek>(
    root: &fatfs::Dir<'_, T>,
    path: &str,
) -> Result<bool> {
    match root.remove(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("removing ESP file {path}")),
    }
}

/// FAT volume labels are 11 bytes, space padded; we keep them to upper-case ASCII.
fn volume_label(label: &str) -> Result<[u8; 11]> {
    if label.is_empty()
        || label.len() > 11
        || !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        bail!("ESP label {label:?} must be 1-11 characters of A-Z, 0-9, '-' or '_'");
    }
    let mut out = [b' '; 11];
    for (o, b) in out.iter_mut().zip(label.bytes()) {
        *o = b.to_ascii_uppercase();
    }
    Ok(out)
}

/// Validate paths and sort them; FAT compares names without case, so duplicates do too.
fn sorted_files(files: &[EspFile]) -> Result<BTreeMap<String, &EspFile>> {
    let mut sorted = BTreeMap::new();
    let mut folded = HashMap::new();
    for file in files {
        let path = &file.path;
        if path.is_empty()
            || path.starts_with('/')
            || path.contains('\\')
            || path
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == ".." || c.len() > 255)
        {
            bail!("bad ESP path {path:?}: want a relative path like EFI/BOOT/BOOTX64.EFI");
        }
        if let Some(previous) = folded.insert(path.to_lowercase(), path.clone()) {
            bail!("ESP path {path} is given twice (as {previous} and {path})");
        }
        sorted.insert(path.clone(), file);
    }
    Ok(sorted)
}

/// A `fatfs` clock that always says `epoch` (UTC, clamped to what FAT can store).
#[derive(Debug)]
struct EpochTime(DateTime);

impl fatfs::TimeProvider for EpochTime {
    fn get_current_date(&self) -> Date {
        self.0.date
    }
    fn get_current_date_time(&self) -> DateTime {
        self.0
    }
}

/// `fatfs` wants a `&'static` clock; keep one per distinct epoch (a build uses one).
fn epoch_time(epoch: i64) -> &'static EpochTime {
    static CLOCKS: Mutex<Vec<(i64, &'static EpochTime)>> = Mutex::new(Vec::new());
    let mut clocks = CLOCKS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((_, clock)) = clocks.iter().find(|(e, _)| *e == epoch) {
        return clock;
    }
    let clock: &'static EpochTime = Box::leak(Box::new(EpochTime(dos_date_time(epoch))));
    clocks.push((epoch, clock));
    clock
}

/// Convert a Unix time to a DOS date and time (UTC), clamped to 1980-01-01..2107-12-31.
fn dos_date_time(epoch: i64) -> DateTime {
    // 1980-01-01T00:00:00Z and 2107-12-31T23:59:58Z.
    let epoch = epoch.clamp(315_532_800, 4_354_819_198);
    let days = epoch.div_euclid(86_400);
    let secs = epoch.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    DateTime {
        date: Date {
            year: year as u16,
            month: month as u16,
            day: day as u16,
        },
        time: Time {
            hour: (secs / 3600) as u16,
            min: (secs / 60 % 60) as u16,
            sec: (secs % 60) as u16,
            millis: 0,
        },
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;
    use std::io::Cursor;

    const EPOCH: i64 = 1_700_000_000; // 2023-11-14T22:13:20Z

    fn files() -> Vec<EspFile> {
        vec![
            EspFile::bytes("loader/loader.conf", "timeout 0\n"),
            EspFile::bytes("EFI/BOOT/BOOTX64.EFI", vec![0x4d, 0x5a, 1, 2, 3]),
            EspFile::bytes("imgbuild/a/linux", vec![9u8; 300_000]),
            EspFile::bytes("loader/entries/imgbuild-a.conf", "title x\n"),
        ]
    }

    fn esp(files: &[EspFile]) -> Vec<u8> {
        let mut disk = Cursor::new(vec![0u8; MIN_ESP_SIZE as usize]);
        write_esp(&mut disk, MIN_ESP_SIZE, 0x1234_5678, "ESP", files, EPOCH).unwrap();
        disk.into_inner()
    }

    #[test]
    fn files_read_back_and_volume_is_fat32() {
        let mut image = esp(&files());
        for f in files() {
            let EspSource::Bytes(expected) = &f.source else {
                unreachable!()
            };
            let got = read_esp_file(Cursor::new(&mut image[..]), &f.path).unwrap();
            assert_eq!(&got, expected, "{}", f.path);
        }
        let mut cursor = Cursor::new(image);
        let fs = FileSystem::new(&mut cursor, FsOptions::new()).unwrap();
        assert_eq!(fs.fat_type(), FatType::Fat32);
        assert_eq!(fs.volume_id(), 0x1234_5678);
        assert_eq!(fs.volume_label(), "ESP");
        assert!(!fs.read_status_flags().unwrap().dirty());
        let conf = fs.root_dir().open_dir("loader").unwrap();
        let entry = conf
            .iter()
            .map(|e| e.unwrap())
            .find(|e| e.file_name() == "loader.conf")
            .unwrap();
        let modified = entry.modified();
        assert_eq!(
            (modified.date.year, modified.date.month, modified.date.day),
            (2023, 11, 14)
        );
        assert_eq!((modified.time.hour, modified.time.min), (22, 13));
    }

    #[test]
    fn fsck_fat_finds_nothing_to_repair() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("esp.img");
        let mut nested = files();
        nested.push(EspFile::bytes("a/b/c/d/deep.txt", "deep"));
        std::fs::write(&image, esp(&nested)).unwrap();
        let out = std::process::Command::new("fsck.fat")
            .args(["-n", "-V"])
            .arg(&image)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}");
        assert!(!stdout.contains("Leaving filesystem unchanged"), "{stdout}");
        let mut image = std::fs::read(&image).unwrap();
        assert_eq!(
            read_esp_file(Cursor::new(&mut image[..]), "a/b/c/d/deep.txt").unwrap(),
            b"deep"
        );
        // The "." and ".." entries of a directory are its first two slots.
        let mut cursor = Cursor::new(&mut image[..]);
        let fs = FileSystem::new(&mut cursor, FsOptions::new()).unwrap();
        let names: Vec<String> = fs
            .root_dir()
            .open_dir("a/b")
            .unwrap()
            .iter()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [".", "..", "c"]);
    }

    #[test]
    fn same_files_give_same_bytes_in_any_order() {
        let a = esp(&files());
        let mut reversed = files();
        reversed.reverse();
        let b = esp(&reversed);
        assert!(a == b, "ESP images differ");
        let other_epoch = {
            let mut disk = Cursor::new(vec![0u8; MIN_ESP_SIZE as usize]);
            write_esp(&mut disk, MIN_ESP_SIZE, 0x1234_5678, "ESP", &files(), 0).unwrap();
            disk.into_inner()
        };
        assert!(
            a != other_epoch,
            "the epoch must reach the directory entries"
        );
    }

    #[test]
    fn file_source_is_streamed() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinuz");
        std::fs::write(&kernel, vec![5u8; 70_000]).unwrap();
        let image = esp(&[EspFile::file("imgbuild/a/linux", &kernel)]);
        assert_eq!(
            read_esp_file(Cursor::new(image), "imgbuild/a/linux").unwrap(),
            vec![5u8; 70_000]
        );
        let mut disk = Cursor::new(vec![0u8; MIN_ESP_SIZE as usize]);
        let missing = [EspFile::file("x", dir.path().join("missing"))];
        let err = write_esp(&mut disk, MIN_ESP_SIZE, 1, "ESP", &missing, EPOCH).unwrap_err();
        assert!(format!("{err:#}").contains("missing"), "{err:#}");
    }

    #[test]
    fn too_large_content_names_the_file() {
        let big = vec![EspFile::bytes(
            "imgbuild/a/initrd",
            vec![1u8; (MIN_ESP_SIZE + MIB) as usize],
        )];
        let mut disk = Cursor::new(vec![0u8; MIN_ESP_SIZE as usize]);
        let err = write_esp(&mut disk, MIN_ESP_SIZE, 1, "ESP", &big, EPOCH).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("imgbuild/a/initrd"), "{msg}");
        assert!(msg.contains("does not fit"), "{msg}");
    }

    #[test]
    fn writes_stay_inside_the_slice() {
        let mut disk = Cursor::new(vec![0xAAu8; (MIN_ESP_SIZE + 2 * MIB) as usize]);
        let slice = fscommon::StreamSlice::new(&mut disk, MIB, MIB + MIN_ESP_SIZE).unwrap();
        write_esp(slice, MIN_ESP_SIZE, 7, "ESP", &files(), EPOCH).unwrap();
        let bytes = disk.into_inner();
        assert!(bytes[..MIB as usize].iter().all(|&b| b == 0xAA));
        assert!(bytes[(MIB + MIN_ESP_SIZE) as usize..]
            .iter()
            .all(|&b| b == 0xAA));
        let mut bytes = bytes;
        let esp_bytes = &mut bytes[MIB as usize..(MIB + MIN_ESP_SIZE) as usize];
        assert_eq!(
            read_esp_file(Cursor::new(esp_bytes), "loader/loader.conf").unwrap(),
            b"timeout 0\n"
        );
    }

    #[test]
    fn bad_input_is_rejected() {
        let mut disk = Cursor::new(vec![0u8; MIN_ESP_SIZE as usize]);
        let small = write_esp(&mut disk, 32 * MIB, 1, "ESP", &[], EPOCH).unwrap_err();
        assert!(small.to_string().contains("at least 64 MiB"), "{small}");
        for path in ["/abs", "a//b", "../x", "a\\b", ""] {
            let err = write_esp(
                &mut disk,
                MIN_ESP_SIZE,
                1,
                "ESP",
                &[EspFile::bytes(path, "x")],
                EPOCH,
            )
            .unwrap_err();
            assert!(err.to_string().contains("bad ESP path"), "{path}: {err}");
        }
        let dup = [EspFile::bytes("EFI/x", "1"), EspFile::bytes("efi/X", "2")];
        let err = write_esp(&mut disk, MIN_ESP_SIZE, 1, "ESP", &dup, EPOCH).unwrap_err();
        assert!(err.to_string().contains("given twice"), "{err}");
        for label in ["", "TWELVE-CHARS", "a b"] {
            assert!(write_esp(&mut disk, MIN_ESP_SIZE, 1, label, &[], EPOCH).is_err());
        }
    }

    #[test]
    fn dos_dates_convert_and_clamp() {
        let table = [
            (EPOCH, (2023, 11, 14, 22, 13, 20)),
            (0, (1980, 1, 1, 0, 0, 0)),
            (951_782_400, (2000, 2, 29, 0, 0, 0)),
            (i64::MAX, (2107, 12, 31, 23, 59, 58)),
        ];
        for (epoch, (y, mo, d, h, mi, s)) in table {
            let t = dos_date_time(epoch);
            assert_eq!(
                (t.date.year, t.date.month, t.date.day),
                (y, mo, d),
                "{epoch}"
            );
            assert_eq!((t.time.hour, t.time.min, t.time.sec), (h, mi, s), "{epoch}");
        }
        assert!(std::ptr::eq(epoch_time(5), epoch_time(5)));
    }

    #[test]
    fn volume_id_is_derived_not_random() {
        assert_eq!(volume_id("k8s-node 1.2.3"), volume_id("k8s-node 1.2.3"));
        assert_ne!(volume_id("k8s-node 1.2.3"), volume_id("k8s-node 1.2.4"));
    }
}
