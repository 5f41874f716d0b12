//! Settings a hypervisor hands a virtual node through SMBIOS type 11 ("OEM strings",
//! QEMU's `-smbios type=11,value=...`): one image boots as many distinct cluster nodes.
//!
//! Only with `smbios_overrides = true` in the config (off by default: on real hardware
//! the firmware vendor writes these strings). The keys are
//! `io.imgbuild.update.node_id=`, `io.imgbuild.update.channel_url=`,
//! `io.imgbuild.update.lock_url=` and `io.imgbuild.update.strategy=` (`kexec`/`reboot`). Trust is unchanged: the channel is still verified
//! against the image's root.json, so a URL only says where to fetch from.
//!
//! This module owns parsing the raw DMI entries and applying the keys to a [`Config`];
//! it never writes anything.

use std::path::Path;

use crate::config::Config;

/// The whole SMBIOS structure table (present whenever the kernel has DMI; the
/// per-entry directory below needs the `dmi-sysfs` module, which is not loaded by
/// default and which a sandboxed service may not load).
pub const DMI_TABLE: &str = "/sys/firmware/dmi/tables/DMI";
/// Where Linux exposes raw DMI entries (`11-0`, `11-1`, ... for type 11).
pub const DMI_ENTRIES: &str = "/sys/firmware/dmi/entries";

/// Prefix of the strings this module reads.
pub const PREFIX: &str = "io.imgbuild.update.";

/// The strings of one raw SMBIOS structure: `bytes[1]` is the length of the formatted
/// area, then NUL-terminated strings up to an empty one. Malformed input yields the
/// strings that could be read.
pub fn structure_strings(bytes: &[u8]) -> Vec<String> {
    let Some(&len) = bytes.get(1) else {
        return vec![];
    };
    let mut rest = bytes.get(usize::from(len)..).unwrap_or(&[]);
    let mut out = Vec::new();
    while let Some(end) = rest.iter().position(|&b| b == 0) {
        if end == 0 {
            break;
        }
        out.push(String::from_utf8_lossy(&rest[..end]).into_owned());
        rest = &rest[end + 1..];
    }
    out
}

/// The OEM strings of every type 11 structure in a whole SMBIOS table: structures one
/// after another (header, formatted area, strings up to a double NUL) until type 127.
pub fn table_oem_strings(table: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut pos = 0;
    while let (Some(&kind), Some(&len)) = (table.get(pos), table.get(pos + 1)) {
        let len = usize::from(len);
        if len < 4 || kind == 127 {
            break;
        }
        // The string set ends at the first double NUL after the formatted area.
        let strings_at = pos + len;
        let Some(end) = table
            .get(strings_at..)
            .and_then(|rest| rest.windows(2).position(|w| w == [0, 0]))
        else {
            break;
        };
        let next = strings_at + end + 2;
        if kind == 11 {
            out.extend(structure_strings(&table[pos..next]));
        }
        pos = next;
    }
    out
}

/// The OEM strings of this machine: from the whole table, else the entries directory.
pub fn system_oem_strings() -> Vec<String> {
    match std::fs::read(DMI_TABLE) {
        Ok(table) => table_oem_strings(&table),
        Err(_) => oem_strings(Path::new(DMI_ENTRIES)),
    }
}

/// All OEM strings (every type 11 structure) under `entries`.
pub fn oem_strings(entries: &Path) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(entries) else {
        return vec![];
    };
    let mut names: Vec<_> = dir
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("11-"))
        .collect();
    names.sort();
    names
        .iter()
        .filter_map(|n| std::fs::read(entries.join(n).join("raw")).ok())
        .flat_map(|raw| structure_strings(&raw))
        .collect()
}

/// Applies the `io.imgbuild.update.*` strings to `cfg`; returns the keys applied.
/// Unknown keys under the prefix are reported and ignored.
pub fn apply(cfg: &mut Config, strings: &[String]) -> Vec<String> {
    let mut applied = Vec::new();
    for s in strings {
        let Some((key, value)) = s.strip_prefix(PREFIX).and_then(|kv| kv.split_once('=')) else {
            continue;
        };
        let value = value.trim().to_string();
        match key {
            "node_id" => cfg.node_id = Some(value),
            "channel_url" => cfg.channel_url = value,
            "strategy" => match value.as_str() {
                "kexec" => cfg.strategy = crate::config::Strategy::Kexec,
                "reboot" => cfg.strategy = crate::config::Strategy::Reboot,
                other => {
                    tracing::warn!("SMBIOS {PREFIX}strategy={other:?} ignored (kexec or reboot)");
                    continue;
                }
            },
            "lock_url" => match &mut cfg.lock {
                Some(lock) => lock.url = Some(value),
                None => {
                    tracing::warn!("SMBIOS {PREFIX}lock_url given but the config has no [lock]");
                    continue;
                }
            },
            other => {
                tracing::warn!("SMBIOS: unknown key {PREFIX}{other} ignored");
                continue;
            }
        }
        applied.push(key.to_string());
    }
    applied
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A type 11 structure as QEMU writes it.
    fn type11(strings: &[&str]) -> Vec<u8> {
        let mut b = vec![11, 5, 0x00, 0x11, strings.len() as u8];
        for s in strings {
            b.extend_from_slice(s.as_bytes());
            b.push(0);
        }
        b.push(0);
        if strings.is_empty() {
            b.push(0);
        }
        b
    }

    fn config() -> Config {
        Config::parse(
            "channel_url = \"http://a/\"\ntrusted_root = \"/r.json\"\nsmbios_overrides = true\n\
             [lock]\nbackend = \"fleetlock\"\nurl = \"http://l/\"\n",
            "t",
        )
        .unwrap()
    }

    #[test]
    fn strings_of_a_structure() {
        assert_eq!(
            structure_strings(&type11(&["a=1", "io.imgbuild.update.node_id=n2"])),
            ["a=1", "io.imgbuild.update.node_id=n2"]
        );
        assert!(structure_strings(&type11(&[])).is_empty());
        // Truncated: what can be read is read, nothing panics.
        assert_eq!(structure_strings(&[11, 5, 0, 0, 1, b'x', 0]), ["x"]);
        assert!(structure_strings(&[11, 5, 0]).is_empty());
        assert!(structure_strings(&[11, 200, 0, 0]).is_empty());
        assert!(structure_strings(&[]).is_empty());
        assert_eq!(
            structure_strings(&[11, 5, 0, 0, 1, b'x']),
            Vec::<String>::new()
        );
    }

    #[test]
    fn table_yields_every_type11_structure() {
        // Type 1 with one string, type 11 with two, a type 11 without strings, end.
        let mut table = vec![1, 4, 0, 0];
        table.extend_from_slice(b"QEMU\0\0");
        table.extend(type11(&["io.imgbuild.update.node_id=n1", "x=y"]));
        table.extend(type11(&[]));
        table.extend(type11(&["late=1"]));
        table.extend([127, 4, 0xff, 0xfe, 0, 0]);
        table.extend(type11(&["after-end=1"]));
        assert_eq!(
            table_oem_strings(&table),
            ["io.imgbuild.update.node_id=n1", "x=y", "late=1"]
        );
        // Truncated anywhere: no panic, a prefix of the strings.
        for cut in 0..table.len() {
            let got = table_oem_strings(&table[..cut]);
            assert!(got.len() <= 3, "cut {cut}");
        }
        assert!(table_oem_strings(&[11, 2, 0, 0]).is_empty());
    }

    #[test]
    fn reads_every_type11_entry_in_order() {
        let dir = tempfile::tempdir().unwrap();
        for (name, strings) in [
            ("11-1", &["b=2"][..]),
            ("11-0", &["a=1"][..]),
            ("1-0", &["not=oem"][..]),
        ] {
            std::fs::create_dir_all(dir.path().join(name)).unwrap();
            std::fs::write(dir.path().join(name).join("raw"), type11(strings)).unwrap();
        }
        assert_eq!(oem_strings(dir.path()), ["a=1", "b=2"]);
        assert!(oem_strings(&dir.path().join("missing")).is_empty());
    }

    #[test]
    fn apply_sets_node_channel_and_lock() {
        let mut cfg = config();
        let applied = apply(
            &mut cfg,
            &[
                "io.imgbuild.update.node_id=node-2".into(),
                "io.imgbuild.update.channel_url=http://10.0.2.2:4000/".into(),
                "io.imgbuild.update.lock_url=http://10.0.2.2:4001".into(),
                "io.imgbuild.update.strategy=reboot".into(),
                "io.imgbuild.update.strategy=sideways".into(),
                "io.imgbuild.update.bogus=1".into(),
                "io.systemd.credential:x=y".into(),
                "io.imgbuild.update.novalue".into(),
            ],
        );
        assert_eq!(applied, ["node_id", "channel_url", "lock_url", "strategy"]);
        assert_eq!(cfg.strategy, crate::config::Strategy::Reboot);
        assert_eq!(cfg.node_id.as_deref(), Some("node-2"));
        assert_eq!(cfg.channel_url, "http://10.0.2.2:4000/");
        assert_eq!(
            cfg.lock.unwrap().url.as_deref(),
            Some("http://10.0.2.2:4001")
        );
    }

    #[test]
    fn lock_url_without_lock_is_ignored() {
        let mut cfg = Config::parse(
            "channel_url = \"http://a/\"\ntrusted_root = \"/r.json\"\n",
            "t",
        )
        .unwrap();
        assert!(apply(&mut cfg, &["io.imgbuild.update.lock_url=http://x".into()]).is_empty());
        assert!(cfg.lock.is_none());
    }
}
