//! `[update]`: the node updater that goes into the image.
//!
//! The section is imgupdate's own configuration file (`/etc/imgupdate/config.toml`,
//! every key documented in `updater/README.md`), with two keys that only the builder
//! reads: `trusted_root` names the channel's TUF `root.json` on the build host (it is
//! copied to [`IMAGE_ROOT_JSON`] and the config points there), and `binary` optionally
//! names the `imgupdate` program to install. The rest is validated here by imgupdate's
//! own parser, so a recipe whose updater could not start is refused before any work.

use std::fs;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use toml::Spanned;

use super::{RecipeError, Validator};

/// Where the trusted root goes in the image.
pub const IMAGE_ROOT_JSON: &str = "/usr/share/imgupdate/root.json";

/// A validated `[update]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateSection {
    /// imgupdate's `config.toml` as it is written into the image.
    pub config_toml: String,
    /// The channel's `root.json` on the build host.
    pub trusted_root: PathBuf,
    /// The `imgupdate` program to install; `None`: `$IMGBUILD_IMGUPDATE`, else the one
    /// next to `imgbuild`.
    pub binary: Option<PathBuf>,
}

impl Validator<'_> {
    /// Validates `[update]`; returns the section and the digests of the files it pulls in.
    pub(super) fn update(
        &self,
        raw: Option<Spanned<toml::Table>>,
    ) -> Result<(Option<UpdateSection>, Vec<[u8; 32]>), RecipeError> {
        let Some(raw) = raw else {
            return Ok((None, vec![]));
        };
        let span = raw.span();
        let mut table = raw.into_inner();
        let base_dir = self.path.parent().unwrap_or(Path::new("."));
        let host_path = |key: &str, v: toml::Value| -> Result<PathBuf, RecipeError> {
            match v {
                toml::Value::String(s) if !s.is_empty() && !s.chars().any(char::is_control) => {
                    Ok(base_dir.join(s))
                }
                other => Err(self.err(
                    span.clone(),
                    &format!("update.{key}"),
                    format!("{other} is not a file path"),
                )),
            }
        };
        let Some(root_value) = table.remove("trusted_root") else {
            return Err(self.err(
                span,
                "update.trusted_root",
                "is required: the channel's root.json (from `imgbuild channel init`), relative to the recipe",
            ));
        };
        let trusted_root = host_path("trusted_root", root_value)?;
        let root_bytes = fs::read(&trusted_root).map_err(|e| {
            self.err(
                span.clone(),
                "update.trusted_root",
                format!("cannot read {}: {e}", trusted_root.display()),
            )
        })?;
        check_root_json(&root_bytes).map_err(|why| {
            self.err(
                span.clone(),
                "update.trusted_root",
                format!("{}: {why}", trusted_root.display()),
            )
        })?;
        let mut digests = vec![Sha256::digest(&root_bytes).into()];
        let binary = match table.remove("binary") {
            None => None,
            Some(v) => {
                let p = host_path("binary", v)?;
                let bytes = fs::read(&p).map_err(|e| {
                    self.err(
                        span.clone(),
                        "update.binary",
                        format!("cannot read {}: {e}", p.display()),
                    )
                })?;
                digests.push(Sha256::digest(&bytes).into());
                Some(p)
            }
        };
        table.insert(
            "trusted_root".into(),
            toml::Value::String(IMAGE_ROOT_JSON.into()),
        );
        let config_toml = render_config(&table).map_err(|e| {
            self.err(
                span.clone(),
                "update",
                format!("cannot be written as TOML: {e}"),
            )
        })?;
        imgupdate::Config::parse(&config_toml, "[update]").map_err(|e| {
            let (field, message) = match e {
                imgupdate::config::ConfigError::Invalid { field, reason, .. } => {
                    (format!("update.{field}"), reason)
                }
                imgupdate::config::ConfigError::Parse { source, .. } => {
                    ("update".to_string(), source.message().to_string())
                }
                other => ("update".to_string(), other.to_string()),
            };
            self.err(span.clone(), &field, message)
        })?;
        Ok((
            Some(UpdateSection {
                config_toml,
                trusted_root,
                binary,
            }),
            digests,
        ))
    }
}

/// The config file text: a header, then the table (keys sorted, so it is reproducible).
fn render_config(table: &toml::Table) -> Result<String, toml::ser::Error> {
    Ok(format!(
        "# /etc/imgupdate/config.toml: written by imgbuild from the recipe's [update] section.\n\
         # Every key is described in imgupdate's README (/usr/share/doc/imgupdate).\n\n{}",
        toml::to_string(table)?
    ))
}

/// A TUF root metadata file: JSON whose `signed._type` is `root`. (Its signatures are
/// checked by the node's TUF client; this catches the wrong file being named.)
fn check_root_json(bytes: &[u8]) -> Result<(), String> {
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    match v.pointer("/signed/_type").and_then(|t| t.as_str()) {
        Some("root") => Ok(()),
        Some(other) => Err(format!("is TUF `{other}` metadata, not root.json")),
        None => Err("is not TUF metadata (no signed._type)".into()),
    }
}
