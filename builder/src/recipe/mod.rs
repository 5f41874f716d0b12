//! Recipe format v1: the TOML file that describes an image.
//!
//! This module owns parsing and validation only. A recipe that parses here is safe to
//! hand to later steps: every string that reaches an external tool has been checked
//! against a strict pattern, every path is confined, every size is sane. It must never
//! start work (no downloads, no files written): a bad recipe stops before anything runs.
//!
//! Errors name the file and the line and column, or the field and why. The format is
//! documented field by field in `docs/recipe.md`.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use toml::Spanned;

mod syntax;
mod update;
mod validate;
pub use syntax::{parse_size, url_file_name};
pub use update::{UpdateSection, IMAGE_ROOT_JSON};
use validate::Validator;

/// Packages every image needs for the builder's own contract (boot, slots, /var).
pub const REQUIRED_PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "systemd-boot",
    "udev",
    "dbus",
    "kmod",
    "e2fsprogs",
    "linux-image-amd64",
    "initramfs-tools",
    "zstd",
];

/// Packages an image with `[update]` needs besides: imgupdate's TLS clients (channel,
/// lock service, Kubernetes API) load the system's CA store, and fail without one.
pub const UPDATE_PACKAGES: &[&str] = &["ca-certificates"];

/// Modules the small initrd carries by default: enough to find `root-*` by PARTLABEL on
/// virtio, SATA, NVMe and USB disks and mount ext4.
pub const DEFAULT_INITRD_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtio_scsi",
    "sd_mod",
    "ahci",
    "nvme",
    "xhci_pci",
    "usb_storage",
    "uas",
    "ext4",
    "crc32c_generic",
];

/// A recipe error with the place it was found.
#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    #[error("{path}: cannot read recipe: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Syntax or type error, with position from the TOML parser.
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    /// An error in a recipe merged from `include`: positions would point into the merged
    /// document, so only the field is named.
    #[error("{path} (including {included}): {field}: {message}")]
    Merged {
        path: PathBuf,
        included: PathBuf,
        field: String,
        message: String,
    },
    /// A field that parsed but is not acceptable.
    #[error("{path}:{line}:{column}: {field}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        column: usize,
        field: String,
        message: String,
    },
}

impl RecipeError {
    /// Field path (e.g. `image.version`) for validation errors.
    pub fn field(&self) -> Option<&str> {
        match self {
            RecipeError::Invalid { field, .. } | RecipeError::Merged { field, .. } => Some(field),
            _ => None,
        }
    }

    /// 1-based (line, column) where the error was found.
    pub fn position(&self) -> Option<(usize, usize)> {
        match self {
            RecipeError::Parse { line, column, .. } | RecipeError::Invalid { line, column, .. } => {
                Some((*line, *column))
            }
            RecipeError::Read { .. } | RecipeError::Merged { .. } => None,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Raw TOML model (stage one: what the file says).

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRecipe {
    /// Consumed by [`merge_include`] before this model is deserialised.
    #[serde(default)]
    include: Option<Spanned<String>>,
    image: RawImage,
    #[serde(default)]
    base: RawBase,
    #[serde(default)]
    kernel: RawKernel,
    #[serde(default)]
    files: Vec<RawFile>,
    #[serde(default)]
    systemd: RawSystemd,
    #[serde(default)]
    disk: RawDisk,
    #[serde(default)]
    output: RawOutput,
    #[serde(default)]
    artifacts: Vec<RawArtifact>,
    #[serde(default)]
    downloads: RawDownloads,
    /// Kept as a table: it is imgupdate's config file, validated by imgupdate's parser.
    #[serde(default)]
    update: Option<Spanned<toml::Table>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawArtifact {
    name: Spanned<String>,
    url: Spanned<String>,
    sha256: Spanned<String>,
    #[serde(default)]
    dest: Option<Spanned<String>>,
    #[serde(default)]
    mode: Option<Spanned<String>>,
    #[serde(default)]
    extract: Option<Spanned<String>>,
    #[serde(default)]
    members: Option<Spanned<BTreeMap<String, String>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDownloads {
    #[serde(default)]
    mirror: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawImage {
    name: Spanned<String>,
    version: Spanned<String>,
    #[serde(default)]
    pretty_name: Option<Spanned<String>>,
    #[serde(default)]
    architecture: Option<Spanned<String>>,
    #[serde(default)]
    hostname: Option<Spanned<String>>,
    #[serde(default)]
    source_date_epoch: Option<Spanned<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBase {
    #[serde(default)]
    suite: Option<Spanned<String>>,
    #[serde(default)]
    mirrors: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    components: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    packages: Vec<Spanned<String>>,
    #[serde(default)]
    docs: Option<bool>,
    #[serde(default)]
    recommends: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKernel {
    #[serde(default)]
    cmdline: Option<Spanned<String>>,
    #[serde(default)]
    initrd: Option<Spanned<String>>,
    #[serde(default)]
    initrd_modules: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    path: Spanned<String>,
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    source: Option<Spanned<String>>,
    #[serde(default)]
    mode: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSystemd {
    #[serde(default)]
    enable: Vec<Spanned<String>>,
    #[serde(default)]
    disable: Vec<Spanned<String>>,
    #[serde(default)]
    mask: Vec<Spanned<String>>,
    #[serde(default)]
    boot_report: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDisk {
    #[serde(default)]
    esp_size: Option<Spanned<String>>,
    #[serde(default)]
    root_size: Option<Spanned<String>>,
    #[serde(default)]
    var_size: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutput {
    #[serde(default)]
    formats: Option<Vec<Spanned<String>>>,
}

// ---------------------------------------------------------------------------------------
// Validated model (stage two: what the builder does).

/// A validated recipe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipe {
    /// Path of the recipe file.
    pub path: PathBuf,
    /// sha256 of the recipe file and every file it pulls in, hex.
    pub digest: String,
    pub image: Image,
    pub base: Base,
    pub kernel: Kernel,
    pub files: Vec<FileEntry>,
    pub systemd: Systemd,
    pub disk: DiskConfig,
    pub formats: Vec<Format>,
    /// Pinned files fetched by URL or from a mirror directory, checked by sha256.
    pub artifacts: Vec<PinnedArtifact>,
    /// Where pinned artifacts may come from besides their URLs.
    pub downloads: Downloads,
    /// Recipes this one includes (`include`), outermost last; empty without `include`.
    pub includes: Vec<PathBuf>,
    /// `[update]`: the node updater installed into the image.
    pub update: Option<UpdateSection>,
}

/// A file pinned by URL and sha256 (`[[artifacts]]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinnedArtifact {
    /// Identifier, unique in the recipe (also the key an including recipe overrides).
    pub name: String,
    /// `http(s)://` or `file:/` URL; its last path segment is the file name looked up in
    /// a mirror directory.
    pub url: String,
    /// Lower-case hex sha256 of the file at `url`.
    pub sha256: String,
    pub install: ArtifactInstall,
    pub mode: u32,
}

impl PinnedArtifact {
    /// The file name in a mirror directory: the URL's last path segment.
    pub fn file_name(&self) -> &str {
        url_file_name(&self.url).unwrap_or(&self.name)
    }
}

/// How an artifact goes into the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArtifactInstall {
    /// The file itself, at this image path.
    File { dest: String },
    /// A `.tar.gz`: these members (archive path -> image path), nothing else.
    TarGz { members: BTreeMap<String, String> },
}

impl ArtifactInstall {
    /// Image paths this artifact writes.
    pub fn dests(&self) -> Vec<&str> {
        match self {
            ArtifactInstall::File { dest } => vec![dest.as_str()],
            ArtifactInstall::TarGz { members } => members.values().map(String::as_str).collect(),
        }
    }
}

/// `[downloads]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Downloads {
    /// Directory holding artifacts by file name (air-gapped builds); resolved against
    /// the recipe's directory. `--mirror` overrides it.
    pub mirror: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// `IMAGE_ID` in os-release: `[a-z0-9][a-z0-9._-]*`.
    pub name: String,
    /// `IMAGE_VERSION` in os-release: `[A-Za-z0-9][A-Za-z0-9.+~_-]*`.
    pub version: String,
    pub pretty_name: String,
    pub architecture: Architecture,
    pub hostname: String,
    /// Fixed timestamp for every file and filesystem, for reproducible output.
    pub source_date_epoch: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    X86_64,
}

impl Architecture {
    /// Debian's name for the architecture.
    pub fn debian(self) -> &'static str {
        match self {
            Architecture::X86_64 => "amd64",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Base {
    pub suite: String,
    /// Mirror URLs, or whole one-line sources entries (`deb URL SUITE COMPONENT...`).
    /// Empty means "take them from the host's apt sources" (resolved by `compose`).
    pub mirrors: Vec<String>,
    pub components: Vec<String>,
    /// Recipe packages plus [`REQUIRED_PACKAGES`] (and [`UPDATE_PACKAGES`] with
    /// `[update]`), sorted, without duplicates.
    pub packages: Vec<String>,
    /// Keep /usr/share/doc, man pages and locales (default: drop them).
    pub docs: bool,
    /// Install recommended packages too (default: no, as for a server image).
    pub recommends: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kernel {
    /// Extra kernel command line; `root=` and `ro` are added by the builder.
    pub cmdline: String,
    pub initrd: InitrdMode,
    pub initrd_modules: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitrdMode {
    /// Only the listed modules (`MODULES=list`): ~7 MB, about half the boot time under TCG.
    Small,
    /// Debian's default (`MODULES=most`): boots on almost any hardware, ~36 MB.
    Full,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileEntry {
    /// Absolute path in the image.
    pub path: String,
    pub content: FileContent,
    pub mode: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileContent {
    Inline(String),
    /// Resolved against the recipe's directory.
    Source(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Systemd {
    pub enable: Vec<String>,
    pub disable: Vec<String>,
    pub mask: Vec<String>,
    /// Print a boot report (system state, failed units, root mount, version) on the
    /// console once boot has finished.
    pub boot_report: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskConfig {
    pub esp_size: u64,
    pub root_size: u64,
    pub var_size: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Format {
    Raw,
    Qcow2,
    /// `NAME-VERSION.iso`: UEFI hybrid ISO with the live installer (needs `build --key`).
    Iso,
    /// `NAME-VERSION.pxe/`: kernel, installer initrd, signed payload, iPXE script (needs `build --key`).
    Pxe,
}

impl Format {
    pub fn extension(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Iso => "iso",
            Format::Pxe => "pxe",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.extension())
    }
}

pub const MIB: u64 = 1024 * 1024;
pub const DEFAULT_ESP_SIZE: u64 = 256 * MIB;
pub const DEFAULT_ROOT_SIZE: u64 = 1024 * MIB;
pub const DEFAULT_VAR_SIZE: u64 = 512 * MIB;
/// The last `console=` becomes /dev/console, where the boot report is printed.
pub const DEFAULT_CMDLINE: &str = "console=tty0 console=ttyS0,115200";

impl Recipe {
    /// Read and validate a recipe file (and the recipes it includes).
    pub fn load(path: &Path) -> Result<Recipe, RecipeError> {
        load_at(path, 0)
    }

    /// Validate recipe text; `path` names the file in errors and anchors `source` files
    /// and `include`.
    pub fn parse(path: &Path, text: &str) -> Result<Recipe, RecipeError> {
        parse_at(path, text, 0)
    }

    /// Output file stem: `NAME-VERSION`.
    pub fn stem(&self) -> String {
        format!("{}-{}", self.image.name, self.image.version)
    }

    /// Seed from which every GUID and UUID of the image is derived.
    pub fn id_seed(&self) -> String {
        format!(
            "imgbuild:{}:{}:{}",
            self.image.name, self.image.version, self.digest
        )
    }
}

/// 1-based line and column of byte offset `pos` in `text`.
fn line_col(text: &str, pos: usize) -> (usize, usize) {
    let pos = pos.min(text.len());
    let before = &text[..pos];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map(|nl| before[nl + 1..].chars().count() + 1)
        .unwrap_or_else(|| before.chars().count() + 1);
    (line, column)
}

/// How deep `include` may nest (a recipe including one that includes another ...).
pub const MAX_INCLUDE_DEPTH: usize = 4;

fn load_at(path: &Path, depth: usize) -> Result<Recipe, RecipeError> {
    let text = fs::read_to_string(path).map_err(|source| RecipeError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_at(path, &text, depth)
}

fn parse_error(path: &Path, text: &str, e: &toml::de::Error) -> RecipeError {
    let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
    RecipeError::Parse {
        path: path.to_path_buf(),
        line,
        column,
        message: e.message().to_string(),
    }
}

fn parse_at(path: &Path, text: &str, depth: usize) -> Result<Recipe, RecipeError> {
    let (effective, includes) = resolve_includes(path, text, depth)?;
    let Some(included) = includes.first() else {
        let raw: RawRecipe = toml::from_str(text).map_err(|e| parse_error(path, text, &e))?;
        return Validator { path, text }.recipe(raw, includes);
    };
    // The included recipes were validated on their own (with exact positions); what is
    // wrong now comes from this file's overrides, named by field.
    let merged = |field: String, message: String| RecipeError::Merged {
        path: path.to_path_buf(),
        included: included.clone(),
        field,
        message,
    };
    let raw: RawRecipe = toml::from_str(&effective)
        .map_err(|e| merged("(merged recipe)".into(), e.message().to_string()))?;
    Validator {
        path,
        text: &effective,
    }
    .recipe(raw, includes.clone())
    .map_err(|e| match e {
        RecipeError::Invalid { field, message, .. } => merged(field, message),
        other => other,
    })
}

#[derive(Deserialize)]
struct IncludeOnly {
    #[serde(default)]
    include: Option<Spanned<String>>,
}

/// The recipe text with its `include` chain merged in (the text itself when it has no
/// `include`), and the included files, nearest first.
///
/// Merge rules: the included recipe is the base; tables merge key by key; `[[files]]`
/// entries with the same `path` and `[[artifacts]]` entries with the same `name`
/// replace the included ones, and such an entry with `remove = true` (and nothing but
/// its key) deletes it; every other value replaces the included one.
fn resolve_includes(
    path: &Path,
    text: &str,
    depth: usize,
) -> Result<(String, Vec<PathBuf>), RecipeError> {
    let inc: IncludeOnly = toml::from_str(text).map_err(|e| parse_error(path, text, &e))?;
    let Some(name) = inc.include else {
        return Ok((text.to_string(), Vec::new()));
    };
    let v = Validator { path, text };
    let file = v.check(
        &name,
        "include",
        |s| {
            s.ends_with(".toml")
                && s.len() > 5
                && !s.starts_with('.')
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        },
        "must be the file name of a recipe in the same directory (like \"k8s-node.toml\")",
    )?;
    if depth >= MAX_INCLUDE_DEPTH {
        return Err(v.err(
            name.span(),
            "include",
            format!("includes nest deeper than {MAX_INCLUDE_DEPTH} (a cycle?)"),
        ));
    }
    let inc_path = path.parent().unwrap_or(Path::new(".")).join(&file);
    if inc_path == path {
        return Err(v.err(name.span(), "include", "a recipe cannot include itself"));
    }
    let inc_text = fs::read_to_string(&inc_path).map_err(|e| {
        v.err(
            name.span(),
            "include",
            format!("cannot read {}: {e}", inc_path.display()),
        )
    })?;
    // The included recipe must be valid on its own: its errors keep their positions.
    parse_at(&inc_path, &inc_text, depth + 1)?;
    let (base_text, mut chain) = resolve_includes(&inc_path, &inc_text, depth + 1)?;
    let mut base: toml::Table =
        toml::from_str(&base_text).map_err(|e| parse_error(&inc_path, &base_text, &e))?;
    let mut overlay: toml::Table = toml::from_str(text).map_err(|e| parse_error(path, text, &e))?;
    overlay.remove("include");
    merge_tables(&mut base, overlay, "").map_err(|(field, message)| RecipeError::Merged {
        path: path.to_path_buf(),
        included: inc_path.clone(),
        field,
        message,
    })?;
    let merged = toml::to_string(&base).map_err(|e| RecipeError::Merged {
        path: path.to_path_buf(),
        included: inc_path.clone(),
        field: "(merged recipe)".into(),
        message: e.to_string(),
    })?;
    chain.insert(0, inc_path);
    Ok((merged, chain))
}

fn merge_tables(
    base: &mut toml::Table,
    overlay: toml::Table,
    prefix: &str,
) -> Result<(), (String, String)> {
    for (key, value) in overlay {
        let field = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        let id = match field.as_str() {
            "files" => Some("path"),
            "artifacts" => Some("name"),
            _ => None,
        };
        match (base.get_mut(&key), value, id) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o), _) => merge_tables(b, o, &field)?,
            (Some(toml::Value::Array(b)), toml::Value::Array(o), Some(id)) => {
                merge_keyed(b, o, &field, id)?
            }
            (_, value, _) => {
                base.insert(key, value);
            }
        }
    }
    Ok(())
}

fn merge_keyed(
    base: &mut Vec<toml::Value>,
    overlay: Vec<toml::Value>,
    field: &str,
    id: &str,
) -> Result<(), (String, String)> {
    for (i, entry) in overlay.into_iter().enumerate() {
        let here = format!("{field}[{i}]");
        let Some(key) = entry.get(id).and_then(|k| k.as_str()).map(String::from) else {
            return Err((here, format!("needs `{id}` to match or add an entry")));
        };
        let pos = base
            .iter()
            .position(|b| b.get(id).and_then(|k| k.as_str()) == Some(key.as_str()));
        match entry.get("remove") {
            None => match pos {
                Some(p) => base[p] = entry,
                None => base.push(entry),
            },
            Some(toml::Value::Boolean(true)) => {
                let only_key = entry.as_table().is_some_and(|t| t.len() == 2);
                if !only_key {
                    return Err((here, format!("`remove = true` takes only `{id}`")));
                }
                match pos {
                    Some(p) => {
                        base.remove(p);
                    }
                    None => {
                        return Err((
                            format!("{here}.{id}"),
                            format!("{key:?} is not in the included recipe; nothing to remove"),
                        ))
                    }
                }
            }
            Some(_) => return Err((format!("{here}.remove"), "must be `true`".into())),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
