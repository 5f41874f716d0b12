//! Shared helpers for the end-to-end tests: build a recipe once per test run, read the
//! boot report an image prints on its serial console.
//!
//! Owns only test plumbing; it never decides what a test asserts.

pub mod cluster;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use imgbuild::build::{build, BuildArgs, BuildReport};
use imgbuild::progress::Progress;

/// The workspace root (where `recipes/` lives).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Where the end-to-end tests put images: `target/e2e/NAME` (not cleaned between runs,
/// so a failed run can be inspected).
pub fn e2e_dir(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    target.join("e2e").join(name)
}

/// Build a recipe of the workspace (path relative to the workspace root, or absolute)
/// into `out`, with the package cache of `IMGBUILD_CACHE` or the default one.
pub fn build_recipe(recipe: &str, out: &Path) -> Result<BuildReport> {
    build_recipe_with(&workspace_root().join(recipe), out, &Progress::new(false))
}

/// [`build_recipe`] for any recipe path, reporting through `progress`.
pub fn build_recipe_with(recipe: &Path, out: &Path, progress: &Progress) -> Result<BuildReport> {
    let args = BuildArgs {
        recipe: recipe.to_path_buf(),
        output: out.to_path_buf(),
        cache_dir: std::env::var_os("IMGBUILD_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(imgbuild::compose::DEFAULT_CACHE_DIR)),
        source_date_epoch: None,
        mirror: None,
        artifact_cache: PathBuf::from(imgbuild::artifacts::DEFAULT_ARTIFACT_CACHE),
        keep_work: false,
        key: None,
    };
    build(&args, progress).with_context(|| format!("building {}", recipe.display()))
}

/// The boot report printed by `imgbuild-boot-report.service`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootReport {
    /// `systemctl is-system-running --wait`: `running` or `degraded`, ...
    pub state: String,
    /// Failed units, empty when none.
    pub failed: Vec<String>,
    pub fields: BTreeMap<String, String>,
}

impl BootReport {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields.get(key).map(String::as_str)
    }
}

/// Parse the last complete boot report in a serial log.
pub fn parse_boot_report(log: &str) -> Result<BootReport> {
    let lines: Vec<&str> = log.lines().collect();
    let Some(end) = lines
        .iter()
        .rposition(|l| l.contains("imgbuild-report: end"))
    else {
        bail!("no complete boot report (no 'imgbuild-report: end') in the serial log");
    };
    let Some(begin) = lines[..end]
        .iter()
        .rposition(|l| l.contains("imgbuild-report: begin"))
    else {
        bail!("boot report has an end but no begin");
    };
    let mut fields = BTreeMap::new();
    let mut failed = Vec::new();
    let mut state = None;
    for line in &lines[begin + 1..end] {
        let Some((_, rest)) = line.split_once("imgbuild-report: ") else {
            continue;
        };
        let rest = rest.trim_end_matches('\r');
        if let Some(s) = rest.strip_prefix("state=") {
            state = Some(s.trim().to_string());
        } else if let Some(f) = rest.strip_prefix("failed=") {
            failed = f.split_whitespace().map(String::from).collect();
        } else {
            for word in rest.split_whitespace() {
                if let Some((k, v)) = word.split_once('=') {
                    fields.insert(k.to_string(), v.to_string());
                }
            }
        }
    }
    let Some(state) = state else {
        bail!("boot report has no state line");
    };
    Ok(BootReport {
        state,
        failed,
        fields,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "[  OK  ] Reached target multi-user.target\r\n\
imgbuild-report: begin\r\n\
imgbuild-report: state=starting\r\n\
imgbuild-report: end\r\n\
noise\n\
imgbuild-report: begin\n\
imgbuild-report: state=degraded\n\
imgbuild-report: failed=a.service b.mount \n\
imgbuild-report: root=/dev/vda2 partlabel=root-a options=ro,relatime\n\
imgbuild-report: image=minimal version=1.0.0 kernel=6.1.0-28-amd64\n\
imgbuild-report: end\n";

    #[test]
    fn parses_the_last_report() {
        let r = parse_boot_report(LOG).unwrap();
        assert_eq!(r.state, "degraded");
        assert_eq!(r.failed, vec!["a.service", "b.mount"]);
        assert_eq!(r.get("partlabel"), Some("root-a"));
        assert_eq!(r.get("options"), Some("ro,relatime"));
        assert_eq!(r.get("version"), Some("1.0.0"));
    }

    #[test]
    fn incomplete_report_is_an_error() {
        assert!(parse_boot_report("imgbuild-report: begin\nimgbuild-report: state=x\n").is_err());
        assert!(parse_boot_report("imgbuild-report: end\n").is_err());
        assert!(parse_boot_report("imgbuild-report: begin\nimgbuild-report: end\n").is_err());
    }
}
