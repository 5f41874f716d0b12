//! Choosing what to kexec, and the two calls that do it. From a disk image file or a
//! block device, read the ESP (FAT32, through `imgdisk`) and pick the target slot's
//! kernel, initrd and command line (`root=PARTLABEL=root-<slot> ro` + the entry's
//! options, as `imgformat::boot` renders them). Then load them with `kexec_file_load`
//! and ask systemd (`org.freedesktop.systemd1.Manager.KExec` over D-Bus) for an orderly
//! kexec. Selection never writes: the ESP is opened through a reader that refuses
//! writes, and a bad entry (`+0-N`, no tries left) is never chosen. Loading and the
//! D-Bus call are exercised for real only in QEMU (the cluster tests); here they are
//! thin wrappers.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use imgformat::boot::{self, BootEntry, EntryName};
use imgformat::layout::{PartitionRole, Slot};

/// Why nothing can be kexeced.
#[derive(Debug, thiserror::Error)]
pub enum KexecError {
    #[error("reading the ESP of {path}: {message}")]
    Esp { path: String, message: String },
    #[error("slot {slot} has no usable boot entry (entries: {entries:?})")]
    NoEntry {
        slot: &'static str,
        entries: Vec<String>,
    },
    #[error("boot entry {file} is marked bad (no tries left)")]
    EntryBad { file: String },
    #[error("boot entry {file}: {message}")]
    BadEntry { file: String, message: String },
    #[error("staging kexec files in {path}: {source}")]
    Stage { path: String, source: io::Error },
    #[error("kexec_file_load: {0}")]
    Load(io::Error),
    #[error("kexec_file_load is not available on this architecture")]
    Unsupported,
    #[error("asking systemd to kexec: {0}")]
    Systemd(String),
}

/// What to kexec.
#[derive(Clone, PartialEq, Eq)]
pub struct KexecTarget {
    pub slot: Slot,
    /// Entry file the choice came from (e.g. `imgbuild-b+3.conf`), `None` when the
    /// command line was given because the slot has no entry yet (kexec trial).
    pub entry_file: Option<String>,
    /// Image version from the entry, if any.
    pub version: Option<String>,
    pub kernel: Vec<u8>,
    pub initrd: Vec<u8>,
    /// Full kernel command line, starting with `root=PARTLABEL=root-<slot> ro`.
    pub cmdline: String,
}

impl std::fmt::Debug for KexecTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KexecTarget")
            .field("slot", &self.slot)
            .field("entry_file", &self.entry_file)
            .field("version", &self.version)
            .field("kernel_bytes", &self.kernel.len())
            .field("initrd_bytes", &self.initrd.len())
            .field("cmdline", &self.cmdline)
            .finish()
    }
}

/// A reader that refuses every write, so fatfs can open a live ESP without changing
/// it (reads alone never make fatfs write; this makes sure).
#[derive(Debug)]
pub struct ReadOnly<F>(pub F);

impl<F: Read> Read for ReadOnly<F> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl<F: Seek> Seek for ReadOnly<F> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.0.seek(pos)
    }
}

impl<F> Write for ReadOnly<F> {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "the ESP is opened read-only for kexec selection",
        ))
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Pick the entry to boot `slot` from the entry file names on the ESP. Pure.
///
/// Among our entries for `slot`, bad ones (`+0-N`) are never chosen; a good entry
/// (no counter) wins over a trial one, then more tries left wins.
pub fn choose_entry(file_names: &[String], slot: Slot) -> Result<String, KexecError> {
    let mut ours: Vec<(EntryName, &String)> = file_names
        .iter()
        .filter_map(|f| EntryName::parse(f).ok().map(|n| (n, f)))
        .filter(|(n, _)| n.slot == slot)
        .collect();
    if ours.is_empty() {
        return Err(KexecError::NoEntry {
            slot: slot.letter(),
            entries: file_names.to_vec(),
        });
    }
    // Good first, then most tries left.
    ours.sort_by_key(|(n, _)| match n.tries {
        None => (0, 0),
        Some((left, _)) => (1, u32::MAX - left),
    });
    let (name, file) = &ours[0];
    if name.is_bad() {
        return Err(KexecError::EntryBad {
            file: file.to_string(),
        });
    }
    Ok(file.to_string())
}

fn esp_err(path: &Path, err: impl std::fmt::Display) -> KexecError {
    KexecError::Esp {
        path: path.display().to_string(),
        message: format!("{err:#}"),
    }
}

/// Entry file names in `loader/entries` of the ESP.
fn list_entries<F: Read + Write + Seek>(esp: F) -> io::Result<Vec<String>> {
    let fs = fatfs::FileSystem::new(esp, fatfs::FsOptions::new())?;
    let dir = fs.root_dir().open_dir(boot::ENTRIES_DIR)?;
    let mut names = Vec::new();
    for entry in dir.iter() {
        let entry = entry?;
        if entry.is_file() {
            names.push(entry.file_name());
        }
    }
    names.sort();
    Ok(names)
}

/// Choose `slot`'s kernel, initrd and command line from the ESP at byte range
/// `[offset, offset + size)` of `disk` (an image file or a block device).
///
/// With no usable entry for `slot` and `cmdline` given, the kernel and initrd are
/// still taken from the slot's directory and the command line becomes
/// `root=PARTLABEL=root-<slot> ro <cmdline>` (the kexec trial, whose entry is written
/// only after the health checks pass). A bad entry is never overridden.
pub fn select_from_esp(
    disk: &File,
    offset: u64,
    size: u64,
    slot: Slot,
    cmdline: Option<&str>,
    what: &Path,
) -> Result<KexecTarget, KexecError> {
    let esp = || {
        fscommon::StreamSlice::new(ReadOnly(disk), offset, offset + size)
            .map_err(|e| esp_err(what, e))
    };
    let names = list_entries(esp()?).map_err(|e| esp_err(what, e))?;
    let (entry_file, entry) = match choose_entry(&names, slot) {
        Ok(file) => {
            let path = format!("{}/{file}", boot::ENTRIES_DIR);
            let bytes = imgdisk::esp::read_esp_file(esp()?, &path).map_err(|e| esp_err(what, e))?;
            let text = String::from_utf8(bytes).map_err(|e| KexecError::BadEntry {
                file: file.clone(),
                message: e.to_string(),
            })?;
            let entry = BootEntry::parse(&file, &text).map_err(|e| KexecError::BadEntry {
                file: file.clone(),
                message: e.to_string(),
            })?;
            (Some(file), Some(entry))
        }
        Err(KexecError::NoEntry { .. }) if cmdline.is_some() => (None, None),
        Err(e) => return Err(e),
    };
    let cmdline = match (&entry, cmdline) {
        (Some(entry), _) => entry.options(),
        (None, extra) => BootEntry {
            slot,
            title: String::new(),
            version: String::new(),
            cmdline: extra.unwrap_or_default().to_string(),
            tries: None,
        }
        .options(),
    };
    let kernel = imgdisk::esp::read_esp_file(esp()?, &boot::kernel_path(slot))
        .map_err(|e| esp_err(what, e))?;
    let initrd = imgdisk::esp::read_esp_file(esp()?, &boot::initrd_path(slot))
        .map_err(|e| esp_err(what, e))?;
    Ok(KexecTarget {
        slot,
        entry_file,
        version: entry.map(|e| e.version),
        kernel,
        initrd,
        cmdline,
    })
}

/// [`select_from_esp`] on a disk image file or block device, finding the ESP through
/// the GPT.
pub fn select_from_disk(
    path: &Path,
    slot: Slot,
    cmdline: Option<&str>,
) -> Result<KexecTarget, KexecError> {
    let layout = imgdisk::layout::inspect(path).map_err(|e| esp_err(path, e))?;
    let esp = layout
        .require(PartitionRole::Esp)
        .map_err(|e| esp_err(path, e))?;
    let file = File::open(path).map_err(|e| esp_err(path, e))?;
    select_from_esp(&file, esp.offset(), esp.size(), slot, cmdline, path)
}

/// Kernel and initrd written to files, ready for [`kexec_file_load`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Staged {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
}

impl KexecTarget {
    /// Write kernel and initrd into `dir` (e.g. `/run/imgupdate/kexec`, a tmpfs).
    pub fn stage(&self, dir: &Path) -> Result<Staged, KexecError> {
        let err = |source| KexecError::Stage {
            path: dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(err)?;
        let kernel = dir.join(format!("linux-{}", self.slot.letter()));
        let initrd = dir.join(format!("initrd-{}", self.slot.letter()));
        std::fs::write(&kernel, &self.kernel).map_err(err)?;
        std::fs::write(&initrd, &self.initrd).map_err(err)?;
        Ok(Staged {
            kernel,
            initrd,
            cmdline: self.cmdline.clone(),
        })
    }
}

/// Load `staged` as the kexec kernel (`kexec_file_load(2)`: the kernel verifies and
/// parses the image itself). Needs CAP_SYS_BOOT.
pub fn kexec_file_load(staged: &Staged) -> Result<(), KexecError> {
    let kernel = File::open(&staged.kernel).map_err(KexecError::Load)?;
    let initrd = File::open(&staged.initrd).map_err(KexecError::Load)?;
    let cmdline = CString::new(staged.cmdline.as_bytes()).map_err(|e| {
        KexecError::Load(io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))
    })?;
    load_syscall(&kernel, &initrd, &cmdline)
}

#[cfg(all(
    target_os = "linux",
    any(
        target_arch = "x86_64",
        target_arch = "aarch64",
        target_arch = "riscv64"
    )
))]
#[allow(unsafe_code)]
fn load_syscall(kernel: &File, initrd: &File, cmdline: &CString) -> Result<(), KexecError> {
    use std::os::fd::AsRawFd;
    let bytes = cmdline.as_bytes_with_nul();
    // SAFETY: kexec_file_load(kernel_fd, initrd_fd, cmdline_len, cmdline, flags) only
    // reads: two open file descriptors that outlive the call (borrowed `File`s) and
    // `bytes.len()` bytes at `bytes.as_ptr()`, a NUL-terminated buffer owned by
    // `cmdline` for the duration of the call, as the syscall requires the length to
    // include the NUL. Flags 0: load for a normal kexec, with an initrd.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_kexec_file_load,
            libc::c_long::from(kernel.as_raw_fd()),
            libc::c_long::from(initrd.as_raw_fd()),
            bytes.len() as libc::c_ulong,
            bytes.as_ptr(),
            0 as libc::c_ulong,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(KexecError::Load(io::Error::last_os_error()))
    }
}

#[cfg(not(all(
    target_os = "linux",
    any(
        target_arch = "x86_64",
        target_arch = "aarch64",
        target_arch = "riscv64"
    )
)))]
fn load_syscall(_: &File, _: &File, _: &CString) -> Result<(), KexecError> {
    Err(KexecError::Unsupported)
}

/// Ask systemd for an orderly kexec into the loaded kernel
/// (`org.freedesktop.systemd1.Manager.KExec` on the system bus, like `systemctl kexec`).
pub async fn systemd_kexec() -> Result<(), KexecError> {
    let conn = zbus::Connection::system()
        .await
        .map_err(|e| KexecError::Systemd(e.to_string()))?;
    systemd_kexec_on(&conn).await
}

/// [`systemd_kexec`] on a given bus connection (tests use a private bus).
pub async fn systemd_kexec_on(conn: &zbus::Connection) -> Result<(), KexecError> {
    conn.call_method(
        Some("org.freedesktop.systemd1"),
        "/org/freedesktop/systemd1",
        Some("org.freedesktop.systemd1.Manager"),
        "KExec",
        &(),
    )
    .await
    .map_err(|e| KexecError::Systemd(e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn choose_entry_table() {
        let table: Vec<(&[&str], Slot, Result<&str, &str>)> = vec![
            (
                &["imgbuild-a.conf", "imgbuild-b+3.conf"],
                Slot::B,
                Ok("imgbuild-b+3.conf"),
            ),
            (
                &["imgbuild-a.conf", "imgbuild-b+3.conf"],
                Slot::A,
                Ok("imgbuild-a.conf"),
            ),
            (
                &["imgbuild-a.conf", "imgbuild-b+2-1.conf"],
                Slot::B,
                Ok("imgbuild-b+2-1.conf"),
            ),
            (
                &["imgbuild-a.conf", "imgbuild-b+0-3.conf"],
                Slot::B,
                Err("bad"),
            ),
            (&["imgbuild-a.conf"], Slot::B, Err("none")),
            // Foreign and malformed names are ignored.
            (
                &["debian.conf", "imgbuild-c.conf", "imgbuild-b+x.conf"],
                Slot::B,
                Err("none"),
            ),
            // Good beats trial beats bad; more tries left wins among trials.
            (
                &[
                    "imgbuild-b+0-3.conf",
                    "imgbuild-b+1-2.conf",
                    "imgbuild-b+2-1.conf",
                ],
                Slot::B,
                Ok("imgbuild-b+2-1.conf"),
            ),
            (
                &["imgbuild-b+3.conf", "imgbuild-b.conf"],
                Slot::B,
                Ok("imgbuild-b.conf"),
            ),
        ];
        for (files, slot, want) in table {
            let got = choose_entry(&names(files), slot);
            match (want, got) {
                (Ok(w), Ok(g)) => assert_eq!(g, w, "{files:?}"),
                (Err("bad"), Err(KexecError::EntryBad { .. })) => {}
                (Err("none"), Err(KexecError::NoEntry { .. })) => {}
                (w, g) => panic!("{files:?} {slot:?}: want {w:?}, got {g:?}"),
            }
        }
    }

    #[test]
    fn read_only_refuses_writes() {
        let mut r = ReadOnly(io::Cursor::new(vec![1u8, 2, 3]));
        assert!(r.write(&[0]).is_err());
        let mut buf = [0u8; 3];
        r.read_exact(&mut buf).unwrap();
        assert_eq!(buf, [1, 2, 3]);
    }
}
