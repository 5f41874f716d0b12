//! The command line: one subcommand per verb, help text from doc comments.
//!
//! Owns argument definitions only; every verb's work lives in its own module.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::build::BuildArgs;
use crate::doctor::DoctorArgs;
use crate::run::RunArgs;

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
