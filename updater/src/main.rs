//! `imgupdate`: the node agent's command line. Each subcommand calls into the library;
//! `status` asks the daemon over D-Bus when one runs and reads the state file otherwise.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use imgupdate::agent::{self, Phase};
use imgupdate::dbus::{self, Service, Status};
use imgupdate::reboot::Outcome;
use imgupdate::{Config, Method, UpdateError, Updater};

/// A/B updates of an imgbuild node from a signed channel.
#[derive(Debug, Parser)]
#[command(name = "imgupdate", version)]
struct Cli {
    /// Configuration file.
    #[arg(long, global = true, default_value = imgupdate::config::DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// Update this disk (device or image file) instead of the one holding `/`.
    #[arg(long, global = true)]
    disk: Option<PathBuf>,
    /// D-Bus address to use instead of the system bus (tests).
    #[arg(long, global = true, env = "IMGUPDATE_BUS_ADDRESS")]
    bus: Option<String>,
    /// Print machine-readable JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent: serve the D-Bus API and metrics, check and update on schedule.
    Daemon {
        /// Do not check on a timer (the bus API still works).
        #[arg(long)]
        no_timer: bool,
    },
    /// Show what runs, the update state and progress.
    Status,
    /// Ask the channel what it offers; changes nothing on disk but the check time.
    Check,
    /// Check, then download, write, verify and stage the new version in the inactive slot.
    Update {
        /// How to write the slot.
        #[arg(long, value_enum, default_value_t = Method::Auto)]
        method: Method,
    },
    /// Show the recorded transitions, oldest first.
    History {
        /// How many entries.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Drop a staged update, or mark the trial/committed slot bad so the old one boots.
    Rollback,
    /// Move a staged slot on: wait for a maintenance window, take the cluster reboot
    /// lock, drain, then kexec (or reboot) into it.
    Reboot,
    /// After a boot: health checks, then commit (good, default, uncordon, release the
    /// lock) or roll back. Run by imgupdate-health.service before boot-complete.target;
    /// exits non-zero when the running system is not healthy.
    VerifyBoot,
    /// Print a shell completion script.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff).
    Man,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = e
                .downcast_ref::<UpdateError>()
                .map_or(1, UpdateError::exit_code);
            if cli.json {
                println!(
                    "{}",
                    serde_json::json!({ "error": format!("{e:#}"), "exit_code": code })
                );
            } else {
                eprintln!("imgupdate: {e:#}");
            }
            ExitCode::from(code)
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("IMGUPDATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Under systemd stderr goes to the journal; no timestamps there (journald adds them).
    let under_systemd = std::env::var_os("JOURNAL_STREAM").is_some();
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if under_systemd {
        fmt.without_time().with_ansi(false).init();
    } else {
        fmt.init();
    }
}

fn load_config(cli: &Cli) -> anyhow::Result<Config> {
    let mut cfg = Config::load(&cli.config)?;
    if let Some(d) = &cli.disk {
        cfg.disk = Some(d.clone());
    }
    if cfg.smbios_overrides {
        let strings =
            imgupdate::smbios::oem_strings(std::path::Path::new(imgupdate::smbios::DMI_ENTRIES));
        let applied = imgupdate::smbios::apply(&mut cfg, &strings);
        tracing::debug!("SMBIOS overrides applied: {applied:?}");
    }
    Ok(cfg)
}

fn print<T: serde::Serialize>(
    json: bool,
    value: &T,
    human: impl FnOnce(&T) -> String,
) -> anyhow::Result<()> {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(value).context("serialising the output")?
        );
    } else {
        println!("{}", human(value));
    }
    Ok(())
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    // These need no configuration (packaging runs them at build time).
    match &cli.command {
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                *shell,
                &mut Cli::command(),
                "imgupdate",
                &mut std::io::stdout(),
            );
            return Ok(());
        }
        Command::Man => {
            use clap::CommandFactory;
            return clap_mangen::Man::new(Cli::command())
                .render(&mut std::io::stdout())
                .context("writing the man page");
        }
        _ => {}
    }
    let cfg = load_config(cli)?;
    let bus = cli.bus.as_deref();
    match &cli.command {
        Command::Daemon { no_timer } => daemon(cfg, bus, *no_timer),
        Command::Status => {
            let status: serde_json::Value = match dbus::call(bus, "Status") {
                Ok(text) => serde_json::from_str(&text).context("parsing the daemon's status")?,
                Err(e) => {
                    tracing::debug!("no daemon ({e}); reading the state file");
                    serde_json::to_value(Status::read(&cfg)?).context("serialising the status")?
                }
            };
            print(cli.json, &status, |s| {
                format!(
                    "running {} on slot {}\nstate   {}\n{}",
                    s["running"]["version"].as_str().unwrap_or("?"),
                    s["running"]["slot"].as_str().unwrap_or("?"),
                    s["state"],
                    s["last_check"]
                        .as_str()
                        .map(|t| format!("checked {t}"))
                        .unwrap_or_default()
                )
            })
        }
        Command::Check => {
            let refused = imgupdate::agent::cluster_refusals(&cfg)?;
            let choice = Updater::new(cfg)?.check(&refused)?;
            print(cli.json, &choice, |c| format!("{c:?}"))
        }
        Command::Update { method } => {
            let refused = imgupdate::agent::cluster_refusals(&cfg)?;
            let report = Updater::new(cfg)?.update(*method, &refused, &mut |_, _| {})?;
            print(cli.json, &report, |r| {
                format!("{:?} -> state {}", r.choice, r.state.name())
            })
        }
        Command::History { limit } => {
            let h = dbus::history(&cfg, *limit)?;
            print(cli.json, &h, |h| {
                h.iter()
                    .map(|e| {
                        format!(
                            "{}  {} --{}--> {}",
                            e.time,
                            e.from,
                            e.event.name(),
                            e.to.name()
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            })
        }
        Command::Rollback => {
            let state = Updater::new(cfg)?.rollback()?;
            print(cli.json, &state, |s| format!("state {}", s.name()))
        }
        Command::Reboot => {
            let out = agent::run(&cfg, Phase::Reboot)?;
            print(cli.json, &out, |o| format!("{o:?}"))
        }
        Command::VerifyBoot => {
            let out = agent::run(&cfg, Phase::VerifyBoot)?;
            print(cli.json, &out, |o| format!("{o:?}"))?;
            if let Outcome::Unhealthy { reasons } = out {
                anyhow::bail!("the running system is unhealthy: {}", reasons.join("; "));
            }
            Ok(())
        }
        Command::Completions { .. } | Command::Man => Ok(()),
    }
}

fn daemon(cfg: Config, bus: Option<&str>, no_timer: bool) -> anyhow::Result<()> {
    let updater = Updater::new(cfg.clone())?;
    let sf = updater.start()?;
    tracing::info!(
        "running {} on slot {}; state {}",
        updater.running.version,
        updater.running.slot,
        sf.state.name()
    );
    // Ready first (the bus name is what systemd waits for with Type=dbus): a boot's
    // health checks can take minutes, and units ordered after this one (multi-user.target
    // wants it) must not wait for them, or the system never settles.
    let service = Service::new(cfg.clone());
    let _conn = dbus::serve(service.clone(), bus)?;
    let metrics = {
        let cfg = cfg.clone();
        let running = updater.running.clone();
        move || {
            let sf = imgupdate::StateFile::load(&cfg.state_dir).unwrap_or_default();
            imgupdate::metrics::render(&running, &sf)
        }
    };
    if let Some(addr) = cfg.metrics.listen {
        let local = imgupdate::metrics::serve(addr, metrics.clone())?;
        tracing::info!("metrics on http://{local}/metrics");
    }
    // What booted decides: finish a trial or a rollback before checking for updates.
    match agent::run(&cfg, Phase::VerifyBoot) {
        Ok(out) => tracing::info!("boot verification: {out:?}"),
        Err(e) => tracing::warn!("boot verification: {e:#}"),
    }
    loop {
        if let Some(path) = &cfg.metrics.textfile {
            if let Err(e) = imgupdate::metrics::write_textfile(path, &metrics()) {
                tracing::warn!("metrics textfile: {e:#}");
            }
        }
        if no_timer {
            std::thread::sleep(Duration::from_secs(60));
            continue;
        }
        match service.run_update() {
            Ok(r) => tracing::info!("check: {:?}, state {}", r.choice, r.state.name()),
            Err(e) => tracing::warn!("update: {e:#}"),
        }
        let staged = imgupdate::StateFile::load(&cfg.state_dir)
            .is_ok_and(|sf| matches!(sf.state, imgupdate::State::Staged { .. }));
        if staged {
            match agent::run(&cfg, Phase::Reboot) {
                Ok(out) => tracing::info!("reboot flow: {out:?}"),
                Err(e) => tracing::warn!("reboot flow: {e:#}"),
            }
        }
        std::thread::sleep(Duration::from_secs(cfg.check_interval_secs));
    }
}
