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

mod update;
pub use update::{UpdateSection, IMAGE_ROOT_JSON};

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

struct Validator<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Validator<'_> {
    fn err(&self, span: Range<usize>, field: &str, message: impl Into<String>) -> RecipeError {
        let (line, column) = line_col(self.text, span.start);
        RecipeError::Invalid {
            path: self.path.to_path_buf(),
            line,
            column,
            field: field.to_string(),
            message: message.into(),
        }
    }

    fn check(
        &self,
        value: &Spanned<String>,
        field: &str,
        ok: impl Fn(&str) -> bool,
        why: &str,
    ) -> Result<String, RecipeError> {
        if ok(value.get_ref()) {
            Ok(value.get_ref().clone())
        } else {
            Err(self.err(
                value.span(),
                field,
                format!("{:?} is not valid: {why}", value.get_ref()),
            ))
        }
    }

    fn recipe(&self, raw: RawRecipe, includes: Vec<PathBuf>) -> Result<Recipe, RecipeError> {
        // `include` was resolved before this model was read.
        let _ = raw.include;
        let image = self.image(raw.image)?;
        let mut base = self.base(raw.base)?;
        let kernel = self.kernel(raw.kernel)?;
        let (files, extra_digest) = self.files(raw.files)?;
        let systemd = self.systemd(raw.systemd)?;
        let disk = self.disk(raw.disk)?;
        let formats = self.formats(raw.output)?;
        let artifacts = self.artifacts(raw.artifacts, &files)?;
        let downloads = self.downloads(raw.downloads)?;
        let (update, update_digest) = self.update(raw.update)?;
        if update.is_some() {
            base.packages
                .extend(UPDATE_PACKAGES.iter().map(|p| p.to_string()));
            base.packages.sort();
            base.packages.dedup();
        }
        let mut hasher = Sha256::new();
        hasher.update(self.text.as_bytes());
        for d in extra_digest.into_iter().chain(update_digest) {
            hasher.update(d);
        }
        Ok(Recipe {
            path: self.path.to_path_buf(),
            digest: hex::encode(hasher.finalize()),
            image,
            base,
            kernel,
            files,
            systemd,
            disk,
            formats,
            artifacts,
            downloads,
            includes,
            update,
        })
    }

    fn image(&self, raw: RawImage) -> Result<Image, RecipeError> {
        let name = self.check(
            &raw.name,
            "image.name",
            is_image_name,
            "use lower-case letters, digits, '.', '_' and '-', starting with a letter or digit (os-release IMAGE_ID)",
        )?;
        let version = self.check(
            &raw.version,
            "image.version",
            is_version,
            "use letters, digits and '.+~_-', starting with a letter or digit (os-release IMAGE_VERSION)",
        )?;
        let pretty_name = match &raw.pretty_name {
            Some(p) => self.check(
                p,
                "image.pretty_name",
                |s| {
                    !s.is_empty()
                        && s.len() <= 200
                        && !s.chars().any(|c| {
                            c.is_control() || c == '"' || c == '\\' || c == '$' || c == '`'
                        })
                },
                "must be 1-200 printable characters without quotes, backslashes, '$' or '`'",
            )?,
            None => format!("{name} {version}"),
        };
        let architecture = match &raw.architecture {
            None => Architecture::X86_64,
            Some(a) => match a.get_ref().as_str() {
                "x86_64" | "amd64" => Architecture::X86_64,
                other => {
                    return Err(self.err(
                        a.span(),
                        "image.architecture",
                        format!("{other:?} is not supported: only \"x86_64\" (Debian amd64) is"),
                    ))
                }
            },
        };
        let hostname = match &raw.hostname {
            Some(h) => self.check(
                h,
                "image.hostname",
                is_hostname,
                "use 1-63 letters, digits and '-', not starting or ending with '-'",
            )?,
            None => name.replace(['.', '_'], "-"),
        };
        let source_date_epoch = match &raw.source_date_epoch {
            Some(e) if *e.get_ref() < 0 => {
                return Err(self.err(
                    e.span(),
                    "image.source_date_epoch",
                    "must be a non-negative number of seconds since 1970",
                ))
            }
            Some(e) => Some(*e.get_ref()),
            None => None,
        };
        Ok(Image {
            name,
            version,
            pretty_name,
            architecture,
            hostname,
            source_date_epoch,
        })
    }

    fn base(&self, raw: RawBase) -> Result<Base, RecipeError> {
        let suite = match &raw.suite {
            Some(s) => self.check(
                s,
                "base.suite",
                is_suite,
                "use lower-case letters, digits and '-' (a Debian suite or codename)",
            )?,
            None => "bookworm".to_string(),
        };
        let mut mirrors = Vec::new();
        if let Some(list) = &raw.mirrors {
            if list.get_ref().is_empty() {
                return Err(self.err(
                    list.span(),
                    "base.mirrors",
                    "is empty: leave it out to use the host's apt sources",
                ));
            }
            for (i, m) in list.get_ref().iter().enumerate() {
                mirrors.push(self.check(
                    m,
                    &format!("base.mirrors[{i}]"),
                    is_mirror,
                    "expected an http(s)/file URL or a one-line sources entry \"deb URL SUITE COMPONENT...\"",
                )?);
            }
        }
        let components = match &raw.components {
            None => vec!["main".to_string()],
            Some(list) => {
                let mut out = Vec::new();
                for (i, c) in list.iter().enumerate() {
                    out.push(self.check(
                        c,
                        &format!("base.components[{i}]"),
                        is_suite,
                        "use lower-case letters, digits and '-'",
                    )?);
                }
                out
            }
        };
        let mut packages: Vec<String> = REQUIRED_PACKAGES.iter().map(|s| s.to_string()).collect();
        for (i, p) in raw.packages.iter().enumerate() {
            packages.push(self.check(
                p,
                &format!("base.packages[{i}]"),
                is_package,
                "not a Debian package name (lower-case letters, digits, '+', '-', '.'; 2+ characters)",
            )?);
        }
        packages.sort();
        packages.dedup();
        Ok(Base {
            suite,
            mirrors,
            components,
            packages,
            docs: raw.docs.unwrap_or(false),
            recommends: raw.recommends.unwrap_or(false),
        })
    }

    fn kernel(&self, raw: RawKernel) -> Result<Kernel, RecipeError> {
        let cmdline = match &raw.cmdline {
            Some(c) => {
                let s = self.check(
                    c,
                    "kernel.cmdline",
                    |s| s.len() <= 2048 && !s.chars().any(|ch| ch.is_control()),
                    "must be one line of at most 2048 printable characters",
                )?;
                if let Some(bad) = s
                    .split_whitespace()
                    .find(|w| w.starts_with("root=") || *w == "ro" || *w == "rw")
                {
                    return Err(self.err(
                        c.span(),
                        "kernel.cmdline",
                        format!("{bad:?} is set by imgbuild for each slot; remove it"),
                    ));
                }
                s
            }
            None => DEFAULT_CMDLINE.to_string(),
        };
        let initrd = match &raw.initrd {
            None => InitrdMode::Small,
            Some(m) => match m.get_ref().as_str() {
                "small" => InitrdMode::Small,
                "full" => InitrdMode::Full,
                other => {
                    return Err(self.err(
                        m.span(),
                        "kernel.initrd",
                        format!("{other:?} is not one of \"small\" (listed modules only) or \"full\" (Debian's MODULES=most)"),
                    ))
                }
            },
        };
        let mut initrd_modules: Vec<String> = DEFAULT_INITRD_MODULES
            .iter()
            .map(|s| s.to_string())
            .collect();
        for (i, m) in raw.initrd_modules.iter().enumerate() {
            initrd_modules.push(self.check(
                m,
                &format!("kernel.initrd_modules[{i}]"),
                |s| {
                    !s.is_empty()
                        && s.len() <= 64
                        && s.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
                },
                "a kernel module name: letters, digits, '_' and '-'",
            )?);
        }
        initrd_modules.dedup();
        Ok(Kernel {
            cmdline,
            initrd,
            initrd_modules,
        })
    }

    fn files(&self, raw: Vec<RawFile>) -> Result<(Vec<FileEntry>, Vec<[u8; 32]>), RecipeError> {
        let base_dir = self.path.parent().unwrap_or(Path::new("."));
        let mut out: Vec<FileEntry> = Vec::new();
        let mut digests = Vec::new();
        for (i, f) in raw.into_iter().enumerate() {
            let field = format!("files[{i}]");
            let path = self.check(
                &f.path,
                &format!("{field}.path"),
                is_image_path,
                "must be an absolute, normalised path (no '.', '..', '//' or control characters) below /",
            )?;
            if out.iter().any(|o| o.path == path) {
                return Err(self.err(
                    f.path.span(),
                    &format!("{field}.path"),
                    format!("{path:?} is listed twice"),
                ));
            }
            let content = match (f.content, f.source) {
                (Some(c), None) => {
                    digests.push(Sha256::digest(c.as_bytes()).into());
                    FileContent::Inline(c)
                }
                (None, Some(src)) => {
                    let rel = src.get_ref();
                    let full = base_dir.join(rel);
                    let bytes = fs::read(&full).map_err(|e| {
                        self.err(
                            src.span(),
                            &format!("{field}.source"),
                            format!("cannot read {}: {e}", full.display()),
                        )
                    })?;
                    digests.push(Sha256::digest(&bytes).into());
                    FileContent::Source(full)
                }
                (Some(_), Some(src)) => {
                    return Err(self.err(
                        src.span(),
                        &field,
                        "give either content or source, not both",
                    ))
                }
                (None, None) => {
                    return Err(self.err(f.path.span(), &field, "needs content or source"))
                }
            };
            let mode = match &f.mode {
                None => 0o644,
                Some(m) => {
                    let s = m.get_ref();
                    match u32::from_str_radix(s, 8) {
                        Ok(v) if v <= 0o7777 && !s.is_empty() => v,
                        _ => {
                            return Err(self.err(
                                m.span(),
                                &format!("{field}.mode"),
                                format!("{s:?} is not an octal file mode like \"0644\""),
                            ))
                        }
                    }
                }
            };
            out.push(FileEntry {
                path,
                content,
                mode,
            });
        }
        Ok((out, digests))
    }

    fn units(&self, list: &[Spanned<String>], key: &str) -> Result<Vec<String>, RecipeError> {
        list.iter()
            .enumerate()
            .map(|(i, u)| {
                self.check(
                    u,
                    &format!("systemd.{key}[{i}]"),
                    is_unit_name,
                    "not a systemd unit name like \"foo.service\" or \"bar.timer\"",
                )
            })
            .collect()
    }

    fn systemd(&self, raw: RawSystemd) -> Result<Systemd, RecipeError> {
        Ok(Systemd {
            enable: self.units(&raw.enable, "enable")?,
            disable: self.units(&raw.disable, "disable")?,
            mask: self.units(&raw.mask, "mask")?,
            boot_report: raw.boot_report.unwrap_or(true),
        })
    }

    fn size(
        &self,
        raw: &Option<Spanned<String>>,
        field: &str,
        default: u64,
        min: u64,
    ) -> Result<u64, RecipeError> {
        let Some(s) = raw else { return Ok(default) };
        let bytes = parse_size(s.get_ref()).map_err(|why| self.err(s.span(), field, why))?;
        if bytes < min {
            return Err(self.err(
                s.span(),
                field,
                format!("{} is too small: at least {} MiB", s.get_ref(), min / MIB),
            ));
        }
        if bytes % MIB != 0 {
            return Err(self.err(
                s.span(),
                field,
                format!(
                    "{} is not a whole number of MiB (partitions are 1 MiB aligned)",
                    s.get_ref()
                ),
            ));
        }
        Ok(bytes)
    }

    fn disk(&self, raw: RawDisk) -> Result<DiskConfig, RecipeError> {
        Ok(DiskConfig {
            // FAT32 with 512-byte sectors needs at least 65525 clusters.
            esp_size: self.size(&raw.esp_size, "disk.esp_size", DEFAULT_ESP_SIZE, 64 * MIB)?,
            root_size: self.size(
                &raw.root_size,
                "disk.root_size",
                DEFAULT_ROOT_SIZE,
                64 * MIB,
            )?,
            var_size: self.size(&raw.var_size, "disk.var_size", DEFAULT_VAR_SIZE, 16 * MIB)?,
        })
    }

    fn mode(
        &self,
        raw: &Option<Spanned<String>>,
        field: &str,
        default: u32,
    ) -> Result<u32, RecipeError> {
        let Some(m) = raw else { return Ok(default) };
        let s = m.get_ref();
        match u32::from_str_radix(s, 8) {
            Ok(v) if v <= 0o7777 && !s.is_empty() => Ok(v),
            _ => Err(self.err(
                m.span(),
                field,
                format!("{s:?} is not an octal file mode like \"0755\""),
            )),
        }
    }

    fn artifacts(
        &self,
        raw: Vec<RawArtifact>,
        files: &[FileEntry],
    ) -> Result<Vec<PinnedArtifact>, RecipeError> {
        let mut out: Vec<PinnedArtifact> = Vec::new();
        for (i, a) in raw.into_iter().enumerate() {
            let field = format!("artifacts[{i}]");
            let name = self.check(
                &a.name,
                &format!("{field}.name"),
                is_image_name,
                "use lower-case letters, digits, '.', '_' and '-', starting with a letter or digit",
            )?;
            if out.iter().any(|o| o.name == name) {
                return Err(self.err(
                    a.name.span(),
                    &format!("{field}.name"),
                    format!("{name:?} is listed twice"),
                ));
            }
            let url = self.check(
                &a.url,
                &format!("{field}.url"),
                |u| is_url(u) && url_file_name(u).is_some(),
                "expected an http(s):// or file:/ URL ending in a file name",
            )?;
            let sha256 = self.check(
                &a.sha256,
                &format!("{field}.sha256"),
                |h| {
                    h.len() == 64
                        && h.bytes()
                            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                },
                "expected 64 lower-case hex digits",
            )?;
            let install = match (&a.extract, &a.dest, &a.members) {
                (None, Some(dest), None) => ArtifactInstall::File {
                    dest: self.check(
                        dest,
                        &format!("{field}.dest"),
                        is_image_path,
                        "must be an absolute, normalised path below /",
                    )?,
                },
                (None, None, _) => {
                    return Err(self.err(
                        a.name.span(),
                        &format!("{field}.dest"),
                        "is required (the path in the image), or use extract + members",
                    ))
                }
                (None, Some(_), Some(m)) => {
                    return Err(self.err(
                        m.span(),
                        &format!("{field}.members"),
                        "only with extract = \"tar.gz\"",
                    ))
                }
                (Some(x), dest, members) => {
                    if x.get_ref() != "tar.gz" {
                        return Err(self.err(
                            x.span(),
                            &format!("{field}.extract"),
                            format!("{:?} is not supported: only \"tar.gz\"", x.get_ref()),
                        ));
                    }
                    if let Some(d) = dest {
                        return Err(self.err(
                            d.span(),
                            &format!("{field}.dest"),
                            "an extracted archive installs `members`, not `dest`",
                        ));
                    }
                    let Some(members) = members else {
                        return Err(self.err(
                            x.span(),
                            &format!("{field}.members"),
                            "is required with extract: { \"path/in/archive\" = \"/path/in/image\" }",
                        ));
                    };
                    if members.get_ref().is_empty() {
                        return Err(self.err(
                            members.span(),
                            &format!("{field}.members"),
                            "is empty",
                        ));
                    }
                    for (member, dest) in members.get_ref() {
                        if !is_archive_member(member) {
                            return Err(self.err(
                                members.span(),
                                &format!("{field}.members"),
                                format!(
                                    "{member:?} is not a relative, normalised path in the archive"
                                ),
                            ));
                        }
                        if !is_image_path(dest) {
                            return Err(self.err(
                                members.span(),
                                &format!("{field}.members.{member}"),
                                format!("{dest:?} is not an absolute, normalised path below /"),
                            ));
                        }
                    }
                    ArtifactInstall::TarGz {
                        members: members.get_ref().clone(),
                    }
                }
            };
            for dest in install.dests() {
                let clash = files.iter().any(|f| f.path == dest)
                    || out.iter().any(|o| o.install.dests().contains(&dest));
                if clash {
                    return Err(self.err(
                        a.name.span(),
                        &field,
                        format!("{dest:?} is also written by another file or artifact"),
                    ));
                }
            }
            let mode = self.mode(&a.mode, &format!("{field}.mode"), 0o755)?;
            out.push(PinnedArtifact {
                name,
                url,
                sha256,
                install,
                mode,
            });
        }
        Ok(out)
    }

    fn downloads(&self, raw: RawDownloads) -> Result<Downloads, RecipeError> {
        let mirror = match &raw.mirror {
            None => None,
            Some(m) => {
                let s = self.check(
                    m,
                    "downloads.mirror",
                    |s| !s.is_empty() && s.len() <= 1024 && !s.chars().any(|c| c.is_control()),
                    "must be a directory path",
                )?;
                Some(self.path.parent().unwrap_or(Path::new(".")).join(s))
            }
        };
        Ok(Downloads { mirror })
    }

    fn formats(&self, raw: RawOutput) -> Result<Vec<Format>, RecipeError> {
        let Some(list) = raw.formats else {
            return Ok(vec![Format::Raw, Format::Qcow2]);
        };
        let mut out = Vec::new();
        for (i, f) in list.iter().enumerate() {
            let fmt = match f.get_ref().as_str() {
                "raw" => Format::Raw,
                "qcow2" => Format::Qcow2,
                "iso" => Format::Iso,
                "pxe" => Format::Pxe,
                other => {
                    return Err(self.err(
                        f.span(),
                        &format!("output.formats[{i}]"),
                        format!("{other:?} is not a known format: expected \"raw\", \"qcow2\", \"iso\" or \"pxe\""),
                    ))
                }
            };
            out.push(fmt);
        }
        out.sort();
        out.dedup();
        // The raw disk is what everything else is made from.
        if !out.contains(&Format::Raw) {
            out.insert(0, Format::Raw);
        }
        Ok(out)
    }
}

/// Parse a size: bytes, or a number with K/M/G/T (binary, optional "iB"/"B").
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like \"512MiB\", \"1G\" or a number of bytes"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" | "k" | "KB" => 1 << 10,
        "M" | "MiB" | "MB" => 1 << 20,
        "G" | "GiB" | "GB" => 1 << 30,
        "T" | "TiB" | "TB" => 1 << 40,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {s:?}: use K, M, G or T (powers of 1024)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

fn is_image_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"._-".contains(c))
}

fn is_version(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b".+~_-".contains(c))
}

fn is_hostname(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
}

fn is_suite(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
}

fn is_package(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() >= 2
        && b.len() <= 128
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"+-.".contains(c))
}

fn is_url(s: &str) -> bool {
    (s.starts_with("http://") || s.starts_with("https://") || s.starts_with("file:/"))
        && s.len() <= 512
        && !s.chars().any(|c| c.is_whitespace() || c.is_control())
}

fn is_mirror(s: &str) -> bool {
    if is_url(s) {
        return true;
    }
    let words: Vec<&str> = s.split_whitespace().collect();
    if s.chars().any(|c| c.is_control()) || words.len() < 4 || words[0] != "deb" {
        return false;
    }
    // `deb [options] URL SUITE COMPONENT...` without options (they could redirect trust).
    is_url(words[1]) && words[2..].iter().all(|w| is_suite(w))
}

/// The last path segment of a URL (without query or fragment), if it is a plain file name.
pub fn url_file_name(url: &str) -> Option<&str> {
    let rest = url
        .split_once("://")
        .map(|(_, r)| r)
        .or_else(|| url.strip_prefix("file:"))?;
    let path = rest.split(['?', '#']).next()?;
    let name = path.rsplit('/').next()?;
    let ok = !name.is_empty()
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._+-~".contains(&b));
    ok.then_some(name)
}

fn is_archive_member(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 1024
        && !s.starts_with('/')
        && !s.starts_with('-')
        && !s.ends_with('/')
        && !s.chars().any(|c| c.is_control())
        && s.split('/').all(|part| !part.is_empty() && part != "..")
}

fn is_image_path(s: &str) -> bool {
    s.starts_with('/')
        && s.len() > 1
        && s.len() <= 1024
        && !s.ends_with('/')
        && !s.chars().any(|c| c.is_control())
        && s[1..]
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..")
}

fn is_unit_name(s: &str) -> bool {
    const SUFFIXES: &[&str] = &[
        ".service",
        ".socket",
        ".timer",
        ".target",
        ".path",
        ".mount",
        ".automount",
        ".swap",
        ".slice",
        ".scope",
    ];
    s.len() <= 255
        && SUFFIXES
            .iter()
            .any(|suf| s.len() > suf.len() && s.ends_with(suf))
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b":-_.@\\".contains(&c))
}

#[cfg(test)]
mod tests;
