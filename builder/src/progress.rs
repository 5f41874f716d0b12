//! Progress reporting for long steps, and running external tools with their output logged.
//!
//! Owns what the user sees while a build runs: one spinner per named step on a terminal,
//! plain `==>` lines otherwise, nothing under `--quiet`. It must never decide whether a
//! step runs or fails; it only reports.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How much the user wants to see.
#[derive(Debug, Clone)]
pub struct Progress {
    quiet: bool,
    fancy: bool,
}

impl Progress {
    pub fn new(quiet: bool) -> Progress {
        Progress {
            quiet,
            fancy: !quiet && std::io::stderr().is_terminal(),
        }
    }

    /// True under `--quiet`.
    pub fn is_quiet(&self) -> bool {
        self.quiet
    }

    /// Start a named step.
    pub fn step(&self, name: &str) -> Step {
        let bar = if self.fancy {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner:.cyan} {prefix:.bold} [{elapsed}] {wide_msg}",
                )
                .expect("static template"),
            );
            bar.set_prefix(name.to_string());
            bar.enable_steady_tick(Duration::from_millis(120));
            Some(bar)
        } else {
            if !self.quiet {
                eprintln!("==> {name}");
            }
            None
        };
        tracing::info!(step = name, "step started");
        Step {
            name: name.to_string(),
            bar,
            quiet: self.quiet,
            start: Instant::now(),
        }
    }
}

/// A running step; call [`Step::done`] when it succeeds.
#[derive(Debug)]
pub struct Step {
    name: String,
    bar: Option<ProgressBar>,
    quiet: bool,
    start: Instant,
}

impl Step {
    /// Show what the step is doing now.
    pub fn message(&self, msg: &str) {
        if let Some(bar) = &self.bar {
            bar.set_message(msg.to_string());
        }
        tracing::debug!(step = %self.name, "{msg}");
    }

    /// Finish the step, printing its duration and a short summary.
    pub fn done(self, summary: &str) {
        let secs = self.start.elapsed().as_secs_f64();
        tracing::info!(step = %self.name, seconds = secs, "{summary}");
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        if !self.quiet {
            eprintln!("    {} done in {secs:.1}s: {summary}", self.name);
        }
    }
}

impl Drop for Step {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            if !bar.is_finished() {
                bar.abandon();
            }
        }
    }
}

/// Run `cmd`, appending its stdout and stderr to `log`, showing its latest line on
/// `step`. On failure the error carries the command, its exit status, the last lines it
/// printed and where the full log is.
pub fn run_logged(cmd: &mut Command, log: &Path, step: &Step) -> Result<()> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut file = File::options()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening log {}", log.display()))?;
    writeln!(file, "$ {}", describe(cmd)).with_context(|| format!("writing {}", log.display()))?;
    let file = Arc::new(Mutex::new(file));
    let tail: Arc<Mutex<VecDeque<String>>> = Arc::new(Mutex::new(VecDeque::new()));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {program} (is it installed? try `imgbuild doctor`)"))?;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let mut pumps = Vec::new();
    for stream in [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let file = Arc::clone(&file);
        let tail = Arc::clone(&tail);
        let tx = tx.clone();
        pumps.push(thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(|l| l.ok()) {
                if let Ok(mut f) = file.lock() {
                    let _ = writeln!(f, "{line}");
                }
                if let Ok(mut t) = tail.lock() {
                    if t.len() == 30 {
                        t.pop_front();
                    }
                    t.push_back(line.clone());
                }
                let _ = tx.send(line);
            }
        }));
    }
    drop(tx);
    for line in rx {
        let trimmed = line.trim();
        if !trimmed.is_empty() {
            step.message(trimmed);
        }
    }
    for p in pumps {
        let _ = p.join();
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for {program}"))?;
    if !status.success() {
        let tail = tail
            .lock()
            .map(|t| t.iter().cloned().collect::<Vec<_>>().join("\n"))
            .unwrap_or_default();
        bail!(
            "{program} failed ({status}); its last lines:\n{tail}\n(full log: {})",
            log.display()
        );
    }
    Ok(())
}

/// Run `cmd` quietly and return its stdout; on failure the error carries stderr.
pub fn run_capture(cmd: &mut Command) -> Result<String> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting {program} (is it installed? try `imgbuild doctor`)"))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("{program} printed non-UTF-8 output"))
}

/// A readable rendering of a command line for logs and errors (never executed).
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// The build log of an output stem, next to the outputs.
pub fn log_path(out_dir: &Path, stem: &str) -> PathBuf {
    out_dir.join(format!("{stem}.build.log"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_logged_records_output_and_reports_failure_tail() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let p = Progress::new(true);
        let step = p.step("test");
        run_logged(Command::new("echo").arg("hello"), &log, &step).unwrap();
        let err = run_logged(
            Command::new("sh").args(["-c", "echo boom >&2; exit 3"]),
            &log,
            &step,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("boom"), "{err}");
        assert!(err.contains("exit status: 3"), "{err}");
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("$ echo hello\nhello\n"), "{text}");
        assert!(text.contains("boom"));
    }

    #[test]
    fn missing_program_is_a_clear_error() {
        let err = run_capture(&mut Command::new("/nonexistent/tool"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/tool"), "{err}");
    }
}
