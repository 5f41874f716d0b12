//! `imgbuild` binary: parse arguments, set up logging, call one function per verb.

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser};
use imgbuild::cli::{ChannelCommand, Cli, ClusterCommand, Command, KeysCommand};
use imgbuild::progress::Progress;
use imgchannel::cli as chancli;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.quiet, cli.verbose);
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("imgbuild: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> Result<()> {
    let progress = Progress::new(cli.quiet);
    match cli.command {
        Command::Build(args) => {
            let report = imgbuild::build::build(&args, &progress)?;
            if !cli.quiet {
                for a in &report.artifacts {
                    println!("{}  {}", a.sha256, args.output.join(&a.file).display());
                }
            }
            Ok(())
        }
        Command::Run(args) => imgbuild::run::run(&args),
        Command::Doctor(args) => imgbuild::doctor::doctor(&args),
        Command::Keys(KeysCommand::Generate(args)) => chancli::run_keys_generate(&args),
        Command::Sign(args) => chancli::run_sign(&args),
        Command::Verify(args) => chancli::run_verify(&args),
        Command::Channel(ChannelCommand::Init(args)) => chancli::run_channel_init(&args),
        Command::Channel(ChannelCommand::Refresh(args)) => chancli::run_refresh(&args),
        Command::Channel(ChannelCommand::RotateRoot(args)) => chancli::run_rotate_root(&args),
        Command::Publish(args) => imgbuild::publish::publish(&args, &progress),
        Command::Cluster(ClusterCommand::Up(args)) => imgbuild::cluster::cli::up(&args, cli.quiet),
        Command::Cluster(ClusterCommand::Status(args)) => imgbuild::cluster::cli::status(&args),
        Command::Cluster(ClusterCommand::Logs(args)) => imgbuild::cluster::cli::logs(&args),
        Command::Cluster(ClusterCommand::Down(args)) => imgbuild::cluster::cli::down(&args),
        Command::Flash(args) => imgbuild::flash::flash(&args, cli.quiet),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "imgbuild",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Man { dir } => write_man_pages(&dir),
    }
}

fn write_man_pages(dir: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let cmd = Cli::command();
    let mut pages = vec![("imgbuild".to_string(), cmd.clone())];
    for sub in cmd.get_subcommands() {
        pages.push((format!("imgbuild-{}", sub.get_name()), sub.clone()));
    }
    for (name, page) in pages {
        let path = dir.join(format!("{name}.1"));
        let mut buf = Vec::new();
        clap_mangen::Man::new(page.name(name.clone()))
            .render(&mut buf)
            .with_context(|| format!("rendering {name}.1"))?;
        std::fs::write(&path, buf).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn init_logging(quiet: bool, verbose: u8) {
    let default = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}
