//! The command line: one subcommand per verb, help text from doc comments.
//!
//! Owns argument definitions only; every verb's work lives in its own module.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::build::BuildArgs;
use crate::cluster::cli::{DownArgs, LogsArgs, StatusArgs, UpArgs};
use crate::doctor::DoctorArgs;
use crate::flash::FlashArgs;
use crate::publish::PublishArgs;
use crate::run::RunArgs;
use imgchannel::cli::{
    ChannelInitArgs, KeysGenerateArgs, RefreshArgs, RotateRootArgs, SignArgs, VerifyArgs,
};

/// Build signed, bootable A/B disk images for Kubernetes nodes, and boot them in QEMU.
#[derive(Debug, Parser)]
#[command(name = "imgbuild", version, about, long_about = None)]
pub struct Cli {
    /// Print only errors (no progress).
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// More log output (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build an image from a recipe: compose, filesystem, disk, outputs.
    Build(BuildArgs),
    /// Boot an image in QEMU (UEFI, serial console here); Ctrl-C powers it off.
    Run(RunArgs),
    /// List missing host tools and the apt-get line that installs them.
    Doctor(DoctorArgs),
    /// Signing keys (ed25519, PKCS#8, mode 0600).
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Sign a SHA256SUMS file (writes SHA256SUMS.sig next to it).
    Sign(SignArgs),
    /// Verify an artifact against a signed SHA256SUMS: signature first, then its hash.
    Verify(VerifyArgs),
    /// Update channels (TUF repositories served as static files).
    #[command(subcommand)]
    Channel(ChannelCommand),
    /// Publish a built version into a channel, with chunk index and deltas.
    Publish(PublishArgs),
    /// Test clusters: N QEMU nodes from one image, with the channel and a lock service.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Write a signed raw image to a USB stick (or file): verify, write, read back.
    Flash(FlashArgs),
    /// Print shell completions for bash, zsh, fish, elvish or powershell.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write man pages (imgbuild.1 and one per subcommand) into a directory.
    Man {
        /// Output directory.
        #[arg(default_value = "man")]
        dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Generate an ed25519 key pair: PATH (private, 0600) and PATH.pub.
    Generate(KeysGenerateArgs),
}

#[derive(Debug, Subcommand)]
pub enum ChannelCommand {
    /// Create a channel: root.json with the role keys, empty targets.
    Init(ChannelInitArgs),
    /// Re-sign snapshot and timestamp so the channel does not expire (cron/CI).
    Refresh(RefreshArgs),
    /// Rotate the root keys: a new root.json signed by the old and the new keys.
    RotateRoot(RotateRootArgs),
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Boot N nodes from one image, with the channel and a lock service on 127.0.0.1;
    /// stays in the foreground until Ctrl-C, `cluster down` or --timeout.
    Up(UpArgs),
    /// Each node's running/staged version, updater state and lock holder.
    Status(StatusArgs),
    /// A node's serial console.
    Logs(LogsArgs),
    /// Stop a cluster's processes and remove its files.
    Down(DownArgs),
}
