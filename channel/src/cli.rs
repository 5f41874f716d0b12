//! Command-line arguments and entry points for the key, signing and channel verbs, ready to
//! be mounted as `imgbuild` subcommands (`keys generate`, `sign`, `verify`,
//! `channel init|refresh|rotate-root`; `imgbuild publish` lives in the builder, which makes
//! the chunk pack).
//!
//! This module owns argument parsing (clap derive; the doc comments are the `--help`
//! text), turning raw flags into the library's validated inputs, and printing results. It
//! must never hold signing or verification logic of its own: every `run_*` calls exactly
//! one library function.

use crate::channel::{self, ExpiryPolicy, RoleKeySet, RoleKeys, SigningKeys};
use crate::{artifact, keys};
use anyhow::{bail, Context};
use clap::Args;
use std::num::NonZeroU64;
use std::path::PathBuf;
use std::time::Duration;

/// Parses a duration such as `90s`, `30m`, `12h`, `7d` or `52w` (a bare number is days).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a number followed by s, m, h, d or w"))?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "" | "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (s, m, h, d, w)")),
    };
    n.checked_mul(secs)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{s:?} is too long"))
}

/// Generate an ed25519 signing key.
///
/// Writes the private key (PKCS#8 DER, mode 0600, never overwriting) to PATH and the
/// public key (TUF key JSON) next to it as NAME.pub. Keep private keys out of the
/// repository and off build machines that do not need them.
#[derive(Debug, Clone, Args)]
pub struct KeysGenerateArgs {
    /// Where to write the private key, e.g. ~/.config/imgbuild/keys/root.key.
    pub path: PathBuf,
}

/// Sign a SHA256SUMS file: writes the detached ed25519 signature SHA256SUMS.sig.
#[derive(Debug, Clone, Args)]
pub struct SignArgs {
    /// The SHA256SUMS file to sign.
    pub sums: PathBuf,
    /// Private key file (from `imgbuild keys generate`).
    #[arg(long, env = "IMGBUILD_SIGNING_KEY")]
    pub key: PathBuf,
}

/// Verify an artifact against its signed SHA256SUMS.
///
/// Checks the signature of SHA256SUMS first, then that the artifact is listed, then its
/// sha256. Exit status is non-zero on any failure, including an unsigned SHA256SUMS.
#[derive(Debug, Clone, Args)]
pub struct VerifyArgs {
    /// The artifact (image, ISO, ...).
    pub artifact: PathBuf,
    /// Public key file (NAME.pub, or a file holding the key in hex).
    #[arg(long)]
    pub key: PathBuf,
    /// The sums file [default: SHA256SUMS next to the artifact].
    #[arg(long)]
    pub sums: Option<PathBuf>,
    /// The signature [default: the sums file's name + .sig].
    #[arg(long)]
    pub signature: Option<PathBuf>,
}

/// Metadata lifetimes; see docs/channel.md for how they interact with `channel refresh`.
#[derive(Debug, Clone, Args)]
pub struct ExpiryArgs {
    /// Lifetime of root.json.
    #[arg(long, default_value = "365d", value_parser = parse_duration)]
    pub root_expiry: Duration,
    /// Lifetime of targets.json.
    #[arg(long, default_value = "180d", value_parser = parse_duration)]
    pub targets_expiry: Duration,
    /// Lifetime of snapshot.json.
    #[arg(long, default_value = "30d", value_parser = parse_duration)]
    pub snapshot_expiry: Duration,
    /// Lifetime of timestamp.json: run `channel refresh` well within it.
    #[arg(long, default_value = "7d", value_parser = parse_duration)]
    pub timestamp_expiry: Duration,
}

impl ExpiryArgs {
    /// The policy these flags describe.
    pub fn policy(&self) -> ExpiryPolicy {
        ExpiryPolicy {
            root: self.root_expiry,
            targets: self.targets_expiry,
            snapshot: self.snapshot_expiry,
            timestamp: self.timestamp_expiry,
        }
    }
}

/// Role keys for a root: `--key` serves every role without a role-specific flag.
#[derive(Debug, Clone, Args)]
pub struct RoleKeyArgs {
    /// Private key used for every role not given its own keys below.
    #[arg(long)]
    pub key: Vec<PathBuf>,
    /// Root role keys (repeat for several).
    #[arg(long)]
    pub root_key: Vec<PathBuf>,
    /// Targets role keys.
    #[arg(long)]
    pub targets_key: Vec<PathBuf>,
    /// Snapshot role keys.
    #[arg(long)]
    pub snapshot_key: Vec<PathBuf>,
    /// Timestamp role keys.
    #[arg(long)]
    pub timestamp_key: Vec<PathBuf>,
    /// Signatures required on root.json.
    #[arg(long, default_value = "1")]
    pub root_threshold: NonZeroU64,
    /// Signatures required on targets.json.
    #[arg(long, default_value = "1")]
    pub targets_threshold: NonZeroU64,
    /// Signatures required on snapshot.json.
    #[arg(long, default_value = "1")]
    pub snapshot_threshold: NonZeroU64,
    /// Signatures required on timestamp.json.
    #[arg(long, default_value = "1")]
    pub timestamp_threshold: NonZeroU64,
}

impl RoleKeyArgs {
    /// Resolves the flags into one key set per role.
    pub fn role_keys(&self) -> anyhow::Result<RoleKeys> {
        let pick = |name: &str, specific: &[PathBuf], threshold: NonZeroU64| {
            let keys = if specific.is_empty() {
                self.key.clone()
            } else {
                specific.to_vec()
            };
            if keys.is_empty() {
                bail!("no key for the {name} role: pass --key or --{name}-key");
            }
            Ok(RoleKeySet { keys, threshold })
        };
        Ok(RoleKeys {
            root: pick("root", &self.root_key, self.root_threshold)?,
            targets: pick("targets", &self.targets_key, self.targets_threshold)?,
            snapshot: pick("snapshot", &self.snapshot_key, self.snapshot_threshold)?,
            timestamp: pick("timestamp", &self.timestamp_key, self.timestamp_threshold)?,
        })
    }
}

/// Create an update channel: a TUF repository served as static files.
#[derive(Debug, Clone, Args)]
pub struct ChannelInitArgs {
    /// Channel directory to create [default: ./CHANNEL]. Serve it with any static HTTP
    /// server; clients use its URL.
    #[arg(long = "dir")]
    pub dir: Option<PathBuf>,
    /// Channel name: stable, beta, nightly, ...
    #[arg(long)]
    pub channel: String,
    #[command(flatten)]
    pub keys: RoleKeyArgs,
    #[command(flatten)]
    pub expiry: ExpiryArgs,
}

/// Re-sign snapshot and timestamp so the channel does not expire (run from cron/CI).
#[derive(Debug, Clone, Args)]
pub struct RefreshArgs {
    /// Channel directory.
    #[arg(long = "channel")]
    pub dir: PathBuf,
    /// Snapshot and timestamp signing keys.
    #[arg(long, required = true)]
    pub key: Vec<PathBuf>,
    #[command(flatten)]
    pub expiry: ExpiryArgs,
}

/// Rotate the channel's root keys (writes N+1.root.json signed by old and new keys).
#[derive(Debug, Clone, Args)]
pub struct RotateRootArgs {
    /// Channel directory.
    #[arg(long = "channel")]
    pub dir: PathBuf,
    /// Current root keys, enough to meet the current root threshold.
    #[arg(long, required = true)]
    pub old_key: Vec<PathBuf>,
    #[command(flatten)]
    pub keys: RoleKeyArgs,
    #[command(flatten)]
    pub expiry: ExpiryArgs,
}

/// `imgbuild keys generate`.
pub fn run_keys_generate(args: &KeysGenerateArgs) -> anyhow::Result<()> {
    let info = keys::generate(&args.path)
        .with_context(|| format!("generating a key at {}", args.path.display()))?;
    println!("private key: {} (mode 0600)", info.private_path.display());
    println!("public key:  {}", info.public_path.display());
    println!("key id:      {}", info.key_id);
    Ok(())
}

/// `imgbuild sign`.
pub fn run_sign(args: &SignArgs) -> anyhow::Result<()> {
    let sig = artifact::sign_sums(&args.sums, &args.key)?;
    println!("{}", sig.display());
    Ok(())
}

/// `imgbuild verify`.
pub fn run_verify(args: &VerifyArgs) -> anyhow::Result<()> {
    let sums = match &args.sums {
        Some(s) => s.clone(),
        None => args
            .artifact
            .parent()
            .map(|d| d.join(artifact::SUMS_FILE))
            .unwrap_or_else(|| PathBuf::from(artifact::SUMS_FILE)),
    };
    let sig = args
        .signature
        .clone()
        .unwrap_or_else(|| artifact::signature_path(&sums));
    let key = keys::load_public_key(&args.key)?;
    artifact::verify_artifact(&args.artifact, &sums, &sig, &key)
        .with_context(|| format!("verifying {}", args.artifact.display()))?;
    println!("{}: OK (signed SHA256SUMS)", args.artifact.display());
    Ok(())
}

/// `imgbuild channel init`.
pub fn run_channel_init(args: &ChannelInitArgs) -> anyhow::Result<()> {
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(&args.channel));
    channel::init(
        &dir,
        &args.channel,
        &args.keys.role_keys()?,
        &args.expiry.policy(),
    )
    .with_context(|| format!("creating channel {} in {}", args.channel, dir.display()))?;
    println!(
        "channel {} created in {}; ship {} in the image as the trusted root",
        args.channel,
        dir.display(),
        dir.join("metadata/1.root.json").display()
    );
    Ok(())
}

/// `imgbuild channel refresh`.
pub fn run_refresh(args: &RefreshArgs) -> anyhow::Result<()> {
    let keys = SigningKeys::new(args.key.iter().cloned())?;
    channel::refresh(&args.dir, &keys, &args.expiry.policy())
        .with_context(|| format!("refreshing {}", args.dir.display()))?;
    Ok(())
}

/// `imgbuild channel rotate-root`.
pub fn run_rotate_root(args: &RotateRootArgs) -> anyhow::Result<()> {
    let old = SigningKeys::new(args.old_key.iter().cloned())?;
    let v = channel::rotate_root(
        &args.dir,
        &old,
        &args.keys.role_keys()?,
        &args.expiry.policy(),
    )
    .with_context(|| format!("rotating the root of {}", args.dir.display()))?;
    println!("wrote metadata/{v}.root.json");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: Cmd,
    }

    #[derive(Debug, clap::Subcommand)]
    enum Cmd {
        Init(ChannelInitArgs),
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("12h"), Ok(Duration::from_secs(12 * 3600)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_duration("2w"), Ok(Duration::from_secs(14 * 86_400)));
        assert!(parse_duration("7y").is_err());
        assert!(parse_duration("d").is_err());
    }

    #[test]
    fn expiry_flags_resolve() {
        let cli = Cli::try_parse_from([
            "x",
            "init",
            "--channel",
            "nightly",
            "--key",
            "k",
            "--timestamp-expiry",
            "1d",
        ])
        .unwrap();
        let Cmd::Init(a) = cli.cmd;
        assert_eq!(a.expiry.policy().timestamp, Duration::from_secs(86_400));
        assert_eq!(a.expiry.policy().snapshot, Duration::from_secs(30 * 86_400));
        assert!(Cli::try_parse_from(["x", "init", "--timestamp-expiry", "1y"]).is_err());
    }

    #[test]
    fn role_specific_keys_override_the_shared_one() {
        let cli = Cli::try_parse_from([
            "x",
            "init",
            "--dir",
            "/c",
            "--channel",
            "nightly",
            "--key",
            "online",
            "--root-key",
            "r1",
            "--root-key",
            "r2",
            "--root-threshold",
            "2",
        ])
        .unwrap();
        let Cmd::Init(a) = cli.cmd;
        let k = a.keys.role_keys().unwrap();
        assert_eq!(k.root.keys, vec![PathBuf::from("r1"), PathBuf::from("r2")]);
        assert_eq!(k.root.threshold.get(), 2);
        assert_eq!(k.timestamp.keys, vec![PathBuf::from("online")]);

        let none = RoleKeyArgs {
            key: vec![],
            ..a.keys.clone()
        };
        let none = RoleKeyArgs {
            targets_key: vec![],
            ..none
        };
        assert!(none.role_keys().is_err());
    }
}
