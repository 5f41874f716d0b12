//! The updater's configuration file, `/etc/imgupdate/config.toml`.
//!
//! This module owns parsing and validating that file into a [`Config`] and its defaults.
//! It must never touch the network, the disk being updated or the state file: a config
//! is only data. Unknown keys are errors (a typo must not silently disable a setting) and
//! every error names the file, and for syntax or type errors the line and the field.
//! The reference with every key is `updater/README.md`.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where the daemon reads its configuration unless `--config` says otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/imgupdate/config.toml";
/// Default state directory, on the `var` partition.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/imgupdate";

/// How the node moves into a staged slot (issue 6 carries it out).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// `kexec_file_load` the new kernel; the firmware default changes only after the
    /// health checks passed.
    #[default]
    Kexec,
    /// Write the new entry with boot counting and reboot through the firmware.
    Reboot,
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Strategy::Kexec => "kexec",
            Strategy::Reboot => "reboot",
        })
    }
}

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// URL of the channel directory (`https://...`, `http://...`, `file:///...` or a path).
    pub channel_url: String,
    /// The TUF `root.json` shipped in the image.
    pub trusted_root: PathBuf,
    /// Where the newest trusted TUF metadata is cached (rollback and freeze protection
    /// across restarts). Default: `<state_dir>/metadata`.
    #[serde(default)]
    pub metadata_dir: Option<PathBuf>,
    /// State file, progress journal and downloads. Must be on persistent storage.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Seconds between two checks of the channel by the daemon.
    #[serde(default = "default_interval")]
    pub check_interval_secs: u64,
    /// `kexec` (default) or `reboot`.
    #[serde(default)]
    pub strategy: Strategy,
    /// Run exactly this version (move to it, up or down, when the channel lists it).
    #[serde(default)]
    pub pinned_version: Option<String>,
    /// Never install a version above this one.
    #[serde(default)]
    pub max_version: Option<String>,
    /// The disk (device or image file) to update instead of the one holding `/`.
    #[serde(default)]
    pub disk: Option<PathBuf>,
    /// os-release to read the running `IMAGE_VERSION` from.
    #[serde(default = "default_os_release")]
    pub os_release: PathBuf,
    /// Kernel command line to read the booted slot (`root=PARTLABEL=root-X`) from.
    #[serde(default = "default_cmdline")]
    pub kernel_cmdline: PathBuf,
    /// Prometheus metrics.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// This node's id for the reboot lock. Default: `/etc/machine-id`.
    #[serde(default)]
    pub node_id: Option<String>,
    /// Seconds a drain may take before the reboot is postponed (lock released).
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout_secs: u64,
    /// Cluster reboot lock (`imgcoord::config::LockConfig`); none: reboot without one.
    #[serde(default)]
    pub lock: Option<imgcoord::config::LockConfig>,
    /// Health checks that gate a new slot (`imgcoord::config::HealthConfig`).
    #[serde(default)]
    pub health: imgcoord::config::HealthConfig,
    /// Maintenance windows (`imgcoord::config::WindowConfig`); none: any time.
    #[serde(default)]
    pub window: imgcoord::config::WindowConfig,
    /// Draining the node before a reboot; none: nothing to drain.
    #[serde(default)]
    pub drain: DrainConfig,
    /// Take `node_id`, `channel_url` and the lock URL from SMBIOS OEM strings
    /// (`io.imgbuild.update.*`, see [`crate::smbios`]): for VM fleets and test clusters
    /// where the hypervisor is trusted. Off by default.
    #[serde(default)]
    pub smbios_overrides: bool,
}

/// `[drain]`: `kubernetes = true` cordons and drains this node through the Kubernetes
/// API before the reboot and uncordons it after a healthy boot. Credentials: the
/// `kubeconfig` file when given (a node is not a pod), else the in-cluster service
/// account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct DrainConfig {
    #[serde(default)]
    pub kubernetes: bool,
    /// The node's name in the cluster. Default: the host name.
    #[serde(default)]
    pub node_name: Option<String>,
    /// A kubeconfig file (absolute path; its current context) with the API server, its
    /// CA and the credentials; read by `imgcoord::kube::KubeConfig::from_kubeconfig_file`.
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
}

/// Where metrics go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serve `/metrics` on this address (use 127.0.0.1).
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// Write the metrics to this file (node_exporter textfile collector), atomically.
    #[serde(default)]
    pub textfile: Option<PathBuf>,
}

fn default_state_dir() -> PathBuf {
    PathBuf::from(DEFAULT_STATE_DIR)
}
fn default_interval() -> u64 {
    3600
}
fn default_drain_timeout() -> u64 {
    900
}
fn default_os_release() -> PathBuf {
    PathBuf::from("/etc/os-release")
}
fn default_cmdline() -> PathBuf {
    PathBuf::from("/proc/cmdline")
}

/// Why a configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// Syntax, type or unknown-field errors; toml's message names the line and the key.
    #[error("{path}: {source}")]
    Parse {
        path: String,
        source: Box<toml::de::Error>,
    },
    #[error("{path}: field `{field}`: {reason}")]
    Invalid {
        path: String,
        field: &'static str,
        reason: String,
    },
}

impl Config {
    /// Read and validate `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::parse(&text, &path.display().to_string())
    }

    /// Parse and validate `text`; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_string(),
            source: Box::new(e),
        })?;
        cfg.validate(origin, text)?;
        Ok(cfg)
    }

    fn validate(&self, origin: &str, text: &str) -> Result<(), ConfigError> {
        let invalid = |field: &'static str, reason: &str| ConfigError::Invalid {
            path: match line_of(text, field) {
                Some(n) => format!("{origin}, line {n}"),
                None => origin.to_string(),
            },
            field,
            reason: reason.to_string(),
        };
        if self.channel_url.trim().is_empty() {
            return Err(invalid("channel_url", "must not be empty"));
        }
        if self.check_interval_secs < 10 {
            return Err(invalid("check_interval_secs", "must be at least 10"));
        }
        if !self.state_dir.is_absolute() {
            return Err(invalid("state_dir", "must be an absolute path"));
        }
        for (field, v) in [
            ("pinned_version", &self.pinned_version),
            ("max_version", &self.max_version),
        ] {
            if v.as_deref().is_some_and(|v| v.trim().is_empty()) {
                return Err(invalid(field, "must not be empty when set"));
            }
        }
        if let Some(k) = &self.drain.kubeconfig {
            if !self.drain.kubernetes {
                return Err(invalid(
                    "kubeconfig",
                    "[drain] kubeconfig needs kubernetes = true",
                ));
            }
            if !k.is_absolute() {
                return Err(invalid("kubeconfig", "must be an absolute path"));
            }
        }
        if let Some(lock) = &self.lock {
            if let Some(k) = &lock.kubeconfig {
                if lock.backend != imgcoord::config::LockBackend::Kubernetes {
                    return Err(invalid(
                        "kubeconfig",
                        "[lock] kubeconfig needs backend = \"kubernetes\"",
                    ));
                }
                if !k.is_absolute() {
                    return Err(invalid("kubeconfig", "must be an absolute path"));
                }
            }
        }
        if let (Some(pin), Some(max)) = (&self.pinned_version, &self.max_version) {
            if imgformat::release::compare_versions(pin, max) == std::cmp::Ordering::Greater {
                return Err(invalid(
                    "pinned_version",
                    &format!("{pin} is above max_version {max}"),
                ));
            }
        }
        Ok(())
    }

    /// The TUF metadata cache directory.
    pub fn metadata_dir(&self) -> PathBuf {
        self.metadata_dir
            .clone()
            .unwrap_or_else(|| self.state_dir.join("metadata"))
    }
}

/// 1-based line of the top-level `key = ...` assignment in `text`, for error messages.
fn line_of(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|l| {
            l.trim_start()
                .strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
        .map(|i| i + 1)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::Duration;

    const MINIMAL: &str = "channel_url = \"https://updates.example/stable\"\n\
                           trusted_root = \"/usr/share/imgupdate/root.json\"\n";

    #[test]
    fn shipped_example_parses() {
        let text = include_str!("../dist/config.toml.example");
        let c = Config::parse(text, "config.toml.example").unwrap();
        assert_eq!(c.strategy, Strategy::Kexec);
        assert_eq!(c.metrics.listen.unwrap().to_string(), "127.0.0.1:9548");
    }

    #[test]
    fn drain_section_parses_and_rejects_unknown_fields() {
        let c = Config::parse(MINIMAL, "test").unwrap();
        assert_eq!(c.drain, DrainConfig::default());
        let text = format!("{MINIMAL}\n[drain]\nkubernetes = true\nnode_name = \"n1\"\n");
        let c = Config::parse(&text, "test").unwrap();
        assert!(c.drain.kubernetes);
        assert_eq!(c.drain.node_name.as_deref(), Some("n1"));
        let bad = format!("{MINIMAL}\n[drain]\nkubernets = true\n");
        let err = Config::parse(&bad, "test").unwrap_err().to_string();
        assert!(err.contains("kubernets"), "{err}");
    }

    #[test]
    fn lock_kubeconfig_is_absolute_and_needs_the_kubernetes_backend() {
        let text = format!(
            "{MINIMAL}\n[lock]\nbackend = \"kubernetes\"\nkubeconfig = \"/etc/kubernetes/kubelet.conf\"\n"
        );
        let c = Config::parse(&text, "test").unwrap();
        assert_eq!(
            c.lock.unwrap().kubeconfig.as_deref(),
            Some(Path::new("/etc/kubernetes/kubelet.conf"))
        );
        for (lock, why) in [
            (
                "backend = \"etcd\"\nurl = \"http://127.0.0.1:2379\"\nkubeconfig = \"/k.conf\"",
                "backend = \"kubernetes\"",
            ),
            (
                "backend = \"kubernetes\"\nkubeconfig = \"k.conf\"",
                "absolute",
            ),
        ] {
            let err = Config::parse(&format!("{MINIMAL}\n[lock]\n{lock}\n"), "c.toml")
                .unwrap_err()
                .to_string();
            assert!(err.contains("kubeconfig") && err.contains(why), "{err}");
        }
    }

    #[test]
    fn drain_kubeconfig_is_absolute_and_needs_kubernetes() {
        let text = format!(
            "{MINIMAL}\n[drain]\nkubernetes = true\nkubeconfig = \"/etc/kubernetes/kubelet.conf\"\n"
        );
        let c = Config::parse(&text, "test").unwrap();
        assert_eq!(
            c.drain.kubeconfig.as_deref(),
            Some(Path::new("/etc/kubernetes/kubelet.conf"))
        );
        let err = Config::parse(
            &format!("{MINIMAL}\n[drain]\nkubeconfig = \"/k.conf\"\n"),
            "c.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("line 5")
                && err.contains("kubeconfig")
                && err.contains("kubernetes = true"),
            "{err}"
        );
        let err = Config::parse(
            &format!("{MINIMAL}\n[drain]\nkubernetes = true\nkubeconfig = \"k.conf\"\n"),
            "c.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("absolute"), "{err}");
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(MINIMAL, "c.toml").unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/imgupdate"));
        assert_eq!(
            c.metadata_dir(),
            PathBuf::from("/var/lib/imgupdate/metadata")
        );
        assert_eq!(c.strategy, Strategy::Kexec);
        assert_eq!(c.check_interval_secs, 3600);
        assert!(c.lock.is_none() && c.pinned_version.is_none());
    }

    #[test]
    fn full_config_parses() {
        let text = format!(
            "{MINIMAL}state_dir = \"/srv/upd\"\nstrategy = \"reboot\"\n\
             max_version = \"2.0\"\npinned_version = \"1.5\"\ndisk = \"/tmp/d.img\"\n\
             [metrics]\nlisten = \"127.0.0.1:9548\"\n[lock]\nbackend = \"etcd\"\n\
             url = \"http://127.0.0.1:2379\"\n[health]\ndeadline = \"5m\"\n\
             checks = [{{ kind = \"http\", url = \"http://127.0.0.1:10248/healthz\" }}]\n\
             [window]\nwindows = [{{ days = [\"Sat\"], start = \"01:00\", length = \"3h\" }}]\n"
        );
        let c = Config::parse(&text, "c.toml").unwrap();
        assert_eq!(c.strategy, Strategy::Reboot);
        assert_eq!(c.metrics.listen.unwrap().port(), 9548);
        assert_eq!(c.lock.unwrap().backend, imgcoord::config::LockBackend::Etcd);
        assert_eq!(c.health.deadline, Duration::from_secs(300));
        assert_eq!(c.health.checks.len(), 1);
        assert_eq!(c.window.windows.len(), 1);
        assert_eq!(c.drain_timeout_secs, 900);
        assert_eq!(c.disk, Some(PathBuf::from("/tmp/d.img")));
    }

    #[test]
    fn errors_name_the_field_and_line() {
        let err = Config::parse(&format!("{MINIMAL}stratgy = \"kexec\"\n"), "c.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("c.toml") && err.contains("stratgy") && err.contains("line 3"),
            "{err}"
        );
        let err = Config::parse(&format!("{MINIMAL}strategy = \"warp\"\n"), "c.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 3") && err.contains("warp"), "{err}");
        let err = Config::parse("trusted_root = \"/r.json\"\n", "c.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("channel_url"), "{err}");
        let err = Config::parse(
            &format!("{MINIMAL}pinned_version = \"3\"\nmax_version = \"2\"\n"),
            "c.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("line 3") && err.contains("field `pinned_version`"),
            "{err}"
        );
        let err = Config::parse(&format!("{MINIMAL}check_interval_secs = 5\n"), "c.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("check_interval_secs"), "{err}");
    }
}
