//! `imgupdate`: the node agent. A stub until the updater issues land; it builds so that
//! images and CI can already carry it.

use clap::Parser;

/// Node agent: A/B updates from a signed channel (not implemented yet).
#[derive(Debug, Parser)]
#[command(name = "imgupdate", version, about)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    anyhow::bail!("imgupdate is not implemented yet; see the project's issues")
}
