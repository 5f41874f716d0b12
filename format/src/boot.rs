//! The boot contract on the ESP: where each slot's kernel and initrd live, how its Boot
//! Loader Specification (Type 1) entry is named and written, and what `loader.conf` says.
//!
//! The builder writes these files into a fresh ESP; the updater rewrites them on a node.
//! Both call these pure functions so they cannot disagree. This module never touches a
//! file, an EFI variable or a disk. All paths are relative to the ESP root with `/`
//! separators and no leading slash, except inside entry files, where the Boot Loader
//! Specification wants absolute paths (`/imgbuild/a/linux`).
//!
//! # Entries and boot counting
//!
//! Each bootable slot has exactly one entry, `loader/entries/imgbuild-<slot>.conf`. A slot
//! on trial carries a boot counter in the name (UAPI Boot Loader Specification, "Boot
//! counting"): `imgbuild-b+3.conf` has 3 tries left; systemd-boot renames it to
//! `imgbuild-b+2-1.conf` before booting it, and so on down to `+0-3`, which marks the
//! entry bad. `systemd-bless-boot` renames a good one back to `imgbuild-b.conf` once
//! `boot-complete.target` is reached. A slot without an entry (an empty `root-b` on a new
//! disk) cannot be booted by the firmware.
//!
//! # Which entry boots: `loader.conf`
//!
//! Every entry carries `sort-key imgbuild` and the image version. systemd-boot (checked
//! against the 252 sources that Debian bookworm ships) treats the entry id as the lower-cased
//! file name including the counter and `.conf`, sorts entries with no tries left to the end,
//! then by sort-key, then by version, newest first, and boots the first entry matching the
//! `default` glob. So the default [`LoaderConf`] says `default imgbuild-*`
//! ([`DefaultEntry::Newest`]): the newest version that is not known bad boots, and a trial
//! that fails its tries falls back to the other slot without anyone editing `loader.conf`.
//!
//! How the updater changes what boots:
//! - Firmware trial of a new slot: write the kernel, initrd and then the entry with a
//!   counter (`imgbuild-b+3.conf`, newer version). The next firmware boot picks it; if it
//!   never reaches `boot-complete.target` it runs out of tries and sorts last.
//! - kexec trial: leave the ESP alone, kexec, and write the new slot's entry only after
//!   the health checks passed, so a hang sends the next firmware boot to the old slot.
//! - Rollback of a slot that booted fine but is rejected: rename its entry to a bad
//!   counter (`imgbuild-b+0-1.conf`) or remove it.
//! - Pinning a slot regardless of versions: rewrite `loader.conf` with
//!   [`DefaultEntry::Slot`] (`default imgbuild-a*`), written to a temporary name and
//!   renamed over the old file. A pinned slot boots even when its entry is bad, so pinning
//!   turns off the automatic fallback. The `LoaderEntryDefault` EFI variable
//!   (`bootctl set-default`) overrides `loader.conf`; the updater must not set it.

use std::fmt;

use crate::layout::Slot;

/// Directory of Type 1 entries on the ESP.
pub const ENTRIES_DIR: &str = "loader/entries";
/// systemd-boot's configuration file on the ESP.
pub const LOADER_CONF_PATH: &str = "loader/loader.conf";
/// Where UEFI firmware looks for a boot loader on removable media and fresh disks.
pub const FALLBACK_LOADER_PATH: &str = "EFI/BOOT/BOOTX64.EFI";
/// systemd-boot's own install location (what `bootctl install` uses).
pub const SYSTEMD_BOOT_PATH: &str = "EFI/systemd/systemd-bootx64.efi";
/// Prefix of every entry file name we own.
pub const ENTRY_PREFIX: &str = "imgbuild-";
/// `sort-key` of all our entries; it makes systemd-boot order them by `version`.
pub const SORT_KEY: &str = "imgbuild";
/// Tries a freshly installed slot gets before it is considered bad.
pub const DEFAULT_TRIES: u32 = 3;

/// Directory holding one slot's kernel and initrd, relative to the ESP root.
pub fn slot_dir(slot: Slot) -> String {
    format!("imgbuild/{}", slot.letter())
}

/// The slot's kernel, relative to the ESP root (`imgbuild/a/linux`).
pub fn kernel_path(slot: Slot) -> String {
    format!("{}/linux", slot_dir(slot))
}

/// The slot's initrd, relative to the ESP root (`imgbuild/a/initrd`).
pub fn initrd_path(slot: Slot) -> String {
    format!("{}/initrd", slot_dir(slot))
}

/// The entry file for `name`, relative to the ESP root.
pub fn entry_path(name: &EntryName) -> String {
    format!("{ENTRIES_DIR}/{name}")
}

/// The parts of an entry file name: `imgbuild-<slot>[+<left>[-<done>]].conf`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryName {
    pub slot: Slot,
    /// Boot counter `(tries left, tries done)`, if the entry is on trial.
    pub tries: Option<(u32, u32)>,
}

/// Why a file name is not one of our entry names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryNameError {
    #[error("{0:?} is not a boot entry: it does not end in .conf")]
    NotConf(String),
    #[error("{0:?} is not an imgbuild boot entry: it does not start with {ENTRY_PREFIX:?}")]
    NotOurs(String),
    #[error("{0:?} names no slot: expected imgbuild-a or imgbuild-b")]
    UnknownSlot(String),
    #[error("{0:?} has a malformed boot counter: expected +LEFT or +LEFT-DONE in decimal")]
    BadCounter(String),
}

impl EntryName {
    /// An entry without a boot counter (a slot known to be good).
    pub fn good(slot: Slot) -> EntryName {
        EntryName { slot, tries: None }
    }

    /// An entry on trial with `left` tries and none done yet.
    pub fn trial(slot: Slot, left: u32) -> EntryName {
        EntryName {
            slot,
            tries: Some((left, 0)),
        }
    }

    /// Whether systemd-boot considers this entry bad (no tries left).
    pub fn is_bad(&self) -> bool {
        matches!(self.tries, Some((0, _)))
    }

    /// Parse a file name (no directory) back into its parts.
    pub fn parse(file_name: &str) -> Result<EntryName, EntryNameError> {
        let stem = file_name
            .strip_suffix(".conf")
            .ok_or_else(|| EntryNameError::NotConf(file_name.to_string()))?;
        let rest = stem
            .strip_prefix(ENTRY_PREFIX)
            .ok_or_else(|| EntryNameError::NotOurs(file_name.to_string()))?;
        let (slot, counter) = match rest.split_once('+') {
            Some((slot, counter)) => (slot, Some(counter)),
            None => (rest, None),
        };
        let slot = match slot {
            "a" => Slot::A,
            "b" => Slot::B,
            _ => return Err(EntryNameError::UnknownSlot(file_name.to_string())),
        };
        let tries = match counter {
            None => None,
            Some(counter) => {
                let bad = || EntryNameError::BadCounter(file_name.to_string());
                let (left, done) = counter.split_once('-').unwrap_or((counter, "0"));
                Some((
                    parse_decimal(left).ok_or_else(bad)?,
                    parse_decimal(done).ok_or_else(bad)?,
                ))
            }
        };
        Ok(EntryName { slot, tries })
    }
}

/// Digits only: `u32::from_str` would also take a leading `+`.
fn parse_decimal(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

impl fmt::Display for EntryName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{ENTRY_PREFIX}{}", self.slot.letter())?;
        match self.tries {
            None => {}
            // The spec leaves out "-0"; systemd-boot writes "+LEFT-DONE" from then on.
            Some((left, 0)) => write!(f, "+{left}")?,
            Some((left, done)) => write!(f, "+{left}-{done}")?,
        }
        f.write_str(".conf")
    }
}

/// One slot's Type 1 boot entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootEntry {
    pub slot: Slot,
    /// Menu title, e.g. the image's PRETTY_NAME.
    pub title: String,
    /// Image version; systemd-boot boots the newest one first (`strverscmp` order).
    pub version: String,
    /// Kernel command line after `root=PARTLABEL=root-<slot> ro`.
    pub cmdline: String,
    /// Boot counter `(tries left, tries done)`, if the entry is on trial.
    pub tries: Option<(u32, u32)>,
}

/// Why an entry cannot be rendered or parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BootEntryError {
    #[error("boot entry {field} must not be empty")]
    Empty { field: &'static str },
    #[error("boot entry {field} {value:?} contains a line break or control character")]
    ControlCharacter { field: &'static str, value: String },
    #[error(transparent)]
    Name(#[from] EntryNameError),
    #[error("boot entry {file}: missing or unexpected {key:?} line")]
    Key { file: String, key: &'static str },
}

impl BootEntry {
    /// The entry's file name, with the boot counter if there is one.
    pub fn name(&self) -> EntryName {
        EntryName {
            slot: self.slot,
            tries: self.tries,
        }
    }

    /// The entry's file name (no directory), e.g. `imgbuild-b+3.conf`.
    pub fn file_name(&self) -> String {
        self.name().to_string()
    }

    /// The kernel command line this entry passes: the slot's root, read-only, then
    /// `cmdline`.
    pub fn options(&self) -> String {
        let root = format!("root=PARTLABEL={} ro", self.slot.label());
        if self.cmdline.is_empty() {
            root
        } else {
            format!("{root} {}", self.cmdline)
        }
    }

    /// The entry file's contents.
    pub fn render(&self) -> Result<String, BootEntryError> {
        for (field, value, may_be_empty) in [
            ("title", &self.title, false),
            ("version", &self.version, false),
            ("cmdline", &self.cmdline, true),
        ] {
            if value.trim().is_empty() && !may_be_empty {
                return Err(BootEntryError::Empty { field });
            }
            if value.chars().any(char::is_control) {
                return Err(BootEntryError::ControlCharacter {
                    field,
                    value: value.clone(),
                });
            }
        }
        Ok(format!(
            "title {}\nversion {}\nsort-key {SORT_KEY}\nlinux /{}\ninitrd /{}\noptions {}\n",
            self.title,
            self.version,
            kernel_path(self.slot),
            initrd_path(self.slot),
            self.options(),
        ))
    }

    /// Read an entry we wrote back from its file name and contents.
    ///
    /// Strict on purpose: an entry whose kernel, initrd or root does not belong to the slot
    /// its name claims is an error, not something to boot.
    pub fn parse(file_name: &str, contents: &str) -> Result<BootEntry, BootEntryError> {
        let name = EntryName::parse(file_name)?;
        let key_err = |key| BootEntryError::Key {
            file: file_name.to_string(),
            key,
        };
        let mut fields: [(&'static str, Option<&str>); 6] = [
            ("title", None),
            ("version", None),
            ("sort-key", None),
            ("linux", None),
            ("initrd", None),
            ("options", None),
        ];
        for line in contents.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (key, value) = line.split_once([' ', '\t']).unwrap_or((line, ""));
            let field =
                fields
                    .iter_mut()
                    .find(|(k, _)| *k == key)
                    .ok_or_else(|| BootEntryError::Key {
                        file: file_name.to_string(),
                        key: "unknown key",
                    })?;
            if field.1.replace(value.trim()).is_some() {
                return Err(key_err(field.0));
            }
        }
        let get = |i: usize| fields[i].1.ok_or_else(|| key_err(fields[i].0));
        let expect = |i: usize, want: &str| {
            if get(i)? == want {
                Ok(())
            } else {
                Err(key_err(fields[i].0))
            }
        };
        expect(2, SORT_KEY)?;
        expect(3, &format!("/{}", kernel_path(name.slot)))?;
        expect(4, &format!("/{}", initrd_path(name.slot)))?;
        let root = format!("root=PARTLABEL={} ro", name.slot.label());
        let options = get(5)?;
        let cmdline = options
            .strip_prefix(&root)
            .filter(|rest| rest.is_empty() || rest.starts_with(' '))
            .ok_or_else(|| key_err("options"))?
            .trim_start();
        Ok(BootEntry {
            slot: name.slot,
            title: get(0)?.to_string(),
            version: get(1)?.to_string(),
            cmdline: cmdline.to_string(),
            tries: name.tries,
        })
    }
}

/// Which entry systemd-boot boots by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultEntry {
    /// `default imgbuild-*`: the newest version that still has tries left.
    Newest,
    /// `default imgbuild-<slot>*`: this slot, whatever its counter says.
    Slot(Slot),
}

impl DefaultEntry {
    /// The glob written after `default` (matched against lower-cased file names).
    pub fn pattern(self) -> String {
        match self {
            DefaultEntry::Newest => format!("{ENTRY_PREFIX}*"),
            DefaultEntry::Slot(slot) => format!("{ENTRY_PREFIX}{}*", slot.letter()),
        }
    }
}

/// systemd-boot's `loader/loader.conf`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoaderConf {
    /// Seconds the menu is shown; 0 boots the default at once (a key press still shows
    /// the menu).
    pub timeout: u32,
    pub default: DefaultEntry,
}

impl Default for LoaderConf {
    fn default() -> LoaderConf {
        LoaderConf {
            timeout: 0,
            default: DefaultEntry::Newest,
        }
    }
}

impl LoaderConf {
    /// The file's contents. `editor no` because an editable command line on a node is a
    /// root shell for anyone at the console; `console-mode keep` leaves the firmware's mode.
    pub fn render(&self) -> String {
        format!(
            "timeout {}\ndefault {}\neditor no\nconsole-mode keep\n",
            self.timeout,
            self.default.pattern()
        )
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;

    #[test]
    fn paths_per_slot() {
        let table = [
            (Slot::A, "imgbuild/a/linux", "imgbuild/a/initrd"),
            (Slot::B, "imgbuild/b/linux", "imgbuild/b/initrd"),
        ];
        for (slot, kernel, initrd) in table {
            assert_eq!(kernel_path(slot), kernel);
            assert_eq!(initrd_path(slot), initrd);
        }
        assert_eq!(
            entry_path(&EntryName::trial(Slot::B, 3)),
            "loader/entries/imgbuild-b+3.conf"
        );
    }

    #[test]
    fn entry_names_render_and_parse_back() {
        let table = [
            ("imgbuild-a.conf", Slot::A, None),
            ("imgbuild-b.conf", Slot::B, None),
            ("imgbuild-b+3.conf", Slot::B, Some((3, 0))),
            ("imgbuild-a+2-1.conf", Slot::A, Some((2, 1))),
            ("imgbuild-a+0-3.conf", Slot::A, Some((0, 3))),
            ("imgbuild-b+10-20.conf", Slot::B, Some((10, 20))),
        ];
        for (file, slot, tries) in table {
            let name = EntryName { slot, tries };
            assert_eq!(name.to_string(), file);
            assert_eq!(EntryName::parse(file), Ok(name), "{file}");
        }
        // "-0" is accepted (systemd-boot reads it as the same counter) and written shorter.
        let name = EntryName::parse("imgbuild-a+4-0.conf").unwrap();
        assert_eq!(name.tries, Some((4, 0)));
        assert_eq!(name.to_string(), "imgbuild-a+4.conf");
        assert!(EntryName::parse("imgbuild-a+0-3.conf").unwrap().is_bad());
        assert!(!EntryName::parse("imgbuild-a+1-2.conf").unwrap().is_bad());
        assert!(!EntryName::parse("imgbuild-a.conf").unwrap().is_bad());
    }

    #[test]
    fn garbage_entry_names_are_rejected_with_a_reason() {
        use EntryNameError as E;
        type Case = (&'static str, fn(String) -> EntryNameError);
        let table: [Case; 16] = [
            ("imgbuild-a", E::NotConf),
            ("imgbuild-a.conf.bak", E::NotConf),
            ("imgbuild-a.CONF", E::NotConf),
            ("debian-a.conf", E::NotOurs),
            ("imgbuild.conf", E::NotOurs),
            ("imgbuild-c.conf", E::UnknownSlot),
            ("imgbuild-.conf", E::UnknownSlot),
            ("imgbuild-ab.conf", E::UnknownSlot),
            ("imgbuild-A.conf", E::UnknownSlot),
            ("imgbuild-a+.conf", E::BadCounter),
            ("imgbuild-a++3.conf", E::BadCounter),
            ("imgbuild-a+3-.conf", E::BadCounter),
            ("imgbuild-a+-3.conf", E::BadCounter),
            ("imgbuild-a+3-1-1.conf", E::BadCounter),
            ("imgbuild-a+x.conf", E::BadCounter),
            ("imgbuild-a+99999999999.conf", E::BadCounter),
        ];
        for (file, err) in table {
            assert_eq!(EntryName::parse(file), Err(err(file.to_string())), "{file}");
        }
    }

    fn entry(slot: Slot, tries: Option<(u32, u32)>) -> BootEntry {
        BootEntry {
            slot,
            title: "Kubernetes node".to_string(),
            version: "1.2.3".to_string(),
            cmdline: "console=ttyS0 quiet".to_string(),
            tries,
        }
    }

    #[test]
    fn entry_renders_bls_keys_for_its_slot() {
        let e = entry(Slot::B, Some((3, 0)));
        assert_eq!(e.file_name(), "imgbuild-b+3.conf");
        assert_eq!(
            e.render().unwrap(),
            "title Kubernetes node\nversion 1.2.3\nsort-key imgbuild\n\
             linux /imgbuild/b/linux\ninitrd /imgbuild/b/initrd\n\
             options root=PARTLABEL=root-b ro console=ttyS0 quiet\n"
        );
        let bare = BootEntry {
            cmdline: String::new(),
            ..entry(Slot::A, None)
        };
        assert_eq!(bare.options(), "root=PARTLABEL=root-a ro");
    }

    #[test]
    fn entry_rejects_injected_lines_and_empty_fields() {
        let table = [
            (
                BootEntry {
                    cmdline: "quiet\nlinux /evil".to_string(),
                    ..entry(Slot::A, None)
                },
                "cmdline",
            ),
            (
                BootEntry {
                    title: "a\rb".to_string(),
                    ..entry(Slot::A, None)
                },
                "title",
            ),
            (
                BootEntry {
                    version: " ".to_string(),
                    ..entry(Slot::A, None)
                },
                "version",
            ),
        ];
        for (e, field) in table {
            let err = e.render().unwrap_err();
            assert!(err.to_string().contains(field), "{err}");
        }
    }

    #[test]
    fn entry_parses_back_and_checks_it_matches_its_name() {
        for e in [entry(Slot::A, None), entry(Slot::B, Some((2, 1)))] {
            let text = e.render().unwrap();
            assert_eq!(BootEntry::parse(&e.file_name(), &text), Ok(e));
        }
        let a = entry(Slot::A, None).render().unwrap();
        // Slot A's contents under slot B's name must not parse.
        let err = BootEntry::parse("imgbuild-b.conf", &a).unwrap_err();
        assert!(
            matches!(err, BootEntryError::Key { key: "linux", .. }),
            "{err}"
        );
        let twice = format!("{a}title again\n");
        assert!(BootEntry::parse("imgbuild-a.conf", &twice).is_err());
        let root_c = a.replace("root-a ro", "root-ab ro");
        assert!(BootEntry::parse("imgbuild-a.conf", &root_c).is_err());
        assert!(BootEntry::parse("other.conf", &a).is_err());
    }

    #[test]
    fn loader_conf_renders() {
        let table = [
            (
                LoaderConf::default(),
                "timeout 0\ndefault imgbuild-*\neditor no\nconsole-mode keep\n",
            ),
            (
                LoaderConf {
                    timeout: 5,
                    default: DefaultEntry::Slot(Slot::B),
                },
                "timeout 5\ndefault imgbuild-b*\neditor no\nconsole-mode keep\n",
            ),
        ];
        for (conf, text) in table {
            assert_eq!(conf.render(), text);
        }
    }

    /// The default globs must match every name the slot's entry can have and nothing of
    /// the other slot (a tiny `*`-only matcher stands in for systemd-boot's efi_fnmatch).
    #[test]
    fn default_globs_match_all_counter_states() {
        fn matches(pattern: &str, id: &str) -> bool {
            match pattern.split_once('*') {
                None => pattern == id,
                Some((prefix, "")) => id.starts_with(prefix),
                Some(_) => unreachable!("only trailing * is used"),
            }
        }
        for tries in [None, Some((3, 0)), Some((1, 2)), Some((0, 3))] {
            for slot in [Slot::A, Slot::B] {
                let id = EntryName { slot, tries }.to_string();
                assert!(matches(&DefaultEntry::Newest.pattern(), &id), "{id}");
                assert!(matches(&DefaultEntry::Slot(slot).pattern(), &id), "{id}");
                assert!(!matches(&DefaultEntry::Slot(!slot).pattern(), &id), "{id}");
            }
        }
    }
}
