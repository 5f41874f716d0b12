//! Health checks that gate a new slot: systemd system state not degraded, named units
//! active, HTTP GET expecting 2xx, TCP connect, command exit 0 (an argv list, never a
//! shell string). Each check has its own timeout; a round runs all checks at once and
//! rounds repeat until every check passes in the same round or the overall deadline
//! is reached. Results are data ([`CheckResult`]); [`verdict`] turns a round into
//! Pass / Fail / Pending as a pure function. This module observes only: it never marks
//! boot entries, never reboots and never restarts units.

use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tokio::time::Instant;

/// What a check looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckKind {
    /// `systemctl is-system-running` is `running`; or `starting` with no failed unit
    /// while the only jobs still running are the health gate's own ([`GATE_UNITS`]):
    /// they keep the system `starting` until the gate finishes, and every job waiting
    /// then waits on them. Never `degraded`.
    SystemState,
    /// Every named unit is `active`.
    Units { units: Vec<String> },
    /// GET `url` answers 2xx.
    Http { url: String },
    /// A TCP connection to `address` (`host:port`) succeeds.
    Tcp { address: String },
    /// `argv[0]` with the remaining arguments exits 0.
    Command { argv: Vec<String> },
}

/// One configured check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawCheck", into = "RawCheck")]
pub struct Check {
    pub name: String,
    pub timeout: Duration,
    pub kind: CheckKind,
}

/// Default per-check timeout.
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// The config-file form of a check, e.g.
/// `{ kind = "http", name = "kubelet", url = "http://127.0.0.1:10248/healthz", timeout = "3s" }`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCheck {
    /// `system-state`, `units`, `http`, `tcp` or `command`.
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub units: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub argv: Option<Vec<String>>,
}

impl TryFrom<RawCheck> for Check {
    type Error = String;

    fn try_from(raw: RawCheck) -> Result<Self, String> {
        let fields = [
            ("units", raw.units.is_some()),
            ("url", raw.url.is_some()),
            ("address", raw.address.is_some()),
            ("argv", raw.argv.is_some()),
        ];
        let allowed: &[&str] = match raw.kind.as_str() {
            "system-state" => &[],
            "units" => &["units"],
            "http" => &["url"],
            "tcp" => &["address"],
            "command" => &["argv"],
            other => {
                return Err(format!(
                    "unknown check kind {other:?} (system-state, units, http, tcp, command)"
                ))
            }
        };
        for (field, present) in fields {
            if present && !allowed.contains(&field) {
                return Err(format!("check kind {:?} takes no {field:?}", raw.kind));
            }
        }
        let missing = |f: &str| format!("check kind {:?} needs {f:?}", raw.kind);
        let kind = match raw.kind.as_str() {
            "system-state" => CheckKind::SystemState,
            "units" => {
                let units = raw.units.ok_or_else(|| missing("units"))?;
                if units.is_empty() {
                    return Err(missing("units"));
                }
                CheckKind::Units { units }
            }
            "http" => {
                let url = raw.url.ok_or_else(|| missing("url"))?;
                reqwest::Url::parse(&url).map_err(|e| format!("check url {url:?}: {e}"))?;
                CheckKind::Http { url }
            }
            "tcp" => CheckKind::Tcp {
                address: raw.address.ok_or_else(|| missing("address"))?,
            },
            _ => {
                let argv = raw.argv.ok_or_else(|| missing("argv"))?;
                if argv.first().map_or(true, |a| a.is_empty()) {
                    return Err(missing("argv"));
                }
                CheckKind::Command { argv }
            }
        };
        let timeout = match raw.timeout {
            Some(t) => crate::duration::parse(&t)?,
            None => DEFAULT_CHECK_TIMEOUT,
        };
        let name = raw.name.unwrap_or_else(|| default_name(&kind));
        Ok(Check {
            name,
            timeout,
            kind,
        })
    }
}

impl From<Check> for RawCheck {
    fn from(check: Check) -> RawCheck {
        let mut raw = RawCheck {
            name: Some(check.name),
            timeout: Some(crate::duration::render(check.timeout)),
            ..RawCheck::default()
        };
        match check.kind {
            CheckKind::SystemState => raw.kind = "system-state".into(),
            CheckKind::Units { units } => {
                raw.kind = "units".into();
                raw.units = Some(units);
            }
            CheckKind::Http { url } => {
                raw.kind = "http".into();
                raw.url = Some(url);
            }
            CheckKind::Tcp { address } => {
                raw.kind = "tcp".into();
                raw.address = Some(address);
            }
            CheckKind::Command { argv } => {
                raw.kind = "command".into();
                raw.argv = Some(argv);
            }
        }
        raw
    }
}

fn default_name(kind: &CheckKind) -> String {
    match kind {
        CheckKind::SystemState => "system-state".into(),
        CheckKind::Units { units } => format!("units {}", units.join(",")),
        CheckKind::Http { url } => format!("http {url}"),
        CheckKind::Tcp { address } => format!("tcp {address}"),
        CheckKind::Command { argv } => format!("command {}", argv.join(" ")),
    }
}

impl Check {
    /// A check with the default timeout and name.
    pub fn new(kind: CheckKind) -> Check {
        Check {
            name: default_name(&kind),
            timeout: DEFAULT_CHECK_TIMEOUT,
            kind,
        }
    }

    /// The same check with another timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Check {
        self.timeout = timeout;
        self
    }
}

/// The outcome of one check in one round.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckResult {
    pub name: String,
    pub ok: bool,
    /// What was seen (`HTTP 200`, `degraded`, `exit status 1: ...`, `timed out`).
    pub detail: String,
    #[serde(with = "crate::duration")]
    pub duration: Duration,
}

/// What the checks say about the booted system.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    /// Every check passed in the same round.
    Pass,
    /// The deadline passed with these checks still failing (`name: detail`).
    Fail { reasons: Vec<String> },
    /// Some checks fail but there is time left to retry.
    Pending { failing: Vec<String> },
}

/// The verdict for one round of `results`, finished `elapsed` after the checks
/// started, with the overall `deadline`. Pure: no clock, no I/O.
pub fn verdict(results: &[CheckResult], elapsed: Duration, deadline: Duration) -> Verdict {
    let failing: Vec<String> = results
        .iter()
        .filter(|r| !r.ok)
        .map(|r| format!("{}: {}", r.name, r.detail))
        .collect();
    if failing.is_empty() {
        Verdict::Pass
    } else if elapsed >= deadline {
        Verdict::Fail { reasons: failing }
    } else {
        Verdict::Pending { failing }
    }
}

/// Where systemd's view comes from (systemctl here; D-Bus or a fake elsewhere).
#[async_trait::async_trait]
pub trait SystemdSource: Send + Sync {
    /// The output of `systemctl is-system-running` (`running`, `degraded`, ...).
    async fn system_state(&self) -> Result<String, String>;
    /// The output of `systemctl is-active <unit>` (`active`, `failed`, ...).
    async fn unit_state(&self, unit: &str) -> Result<String, String>;
    /// Units in the `failed` state.
    async fn failed_units(&self) -> Result<Vec<String>, String>;
    /// Units whose job is running (`systemctl list-jobs` state `running`, not
    /// `waiting`).
    async fn running_jobs(&self) -> Result<Vec<String>, String>;
}

/// Units whose jobs may still run while the system counts as settled: the updater's
/// health gate, the daemon (which checks health after a boot), and what waits on them
/// by design. Jobs in the `waiting` state are not looked at: when only these run,
/// everything waiting waits on them (e.g. `multi-user.target`, which wants the daemon).
pub const GATE_UNITS: &[&str] = &[
    "imgupdate-health.service",
    "imgupdate.service",
    "boot-complete.target",
    "systemd-bless-boot.service",
];

/// The `system-state` verdict from what systemd says. Pure, so it is table-tested.
/// `running` lists the units whose job is running.
pub fn system_settled(
    state: &str,
    failed: &[String],
    running: &[String],
) -> Result<String, String> {
    match state {
        "running" => Ok(state.into()),
        "starting" if !failed.is_empty() => Err(format!("failed units: {}", failed.join(", "))),
        "starting" => {
            let others: Vec<&str> = running
                .iter()
                .map(String::as_str)
                .filter(|j| !GATE_UNITS.contains(j))
                .collect();
            if others.is_empty() {
                Ok("starting (only the health gate's jobs left)".into())
            } else {
                Err(format!("starting: jobs running for {}", others.join(", ")))
            }
        }
        other => Err(other.into()),
    }
}

/// Units of the running jobs in `systemctl list-jobs --plain --no-legend` output
/// (`JOB UNIT TYPE STATE` per line).
pub fn parse_running_jobs(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols.len() >= 4 && cols[3] == "running").then(|| cols[1].to_string())
        })
        .collect()
}

/// A column of `systemctl --plain --no-legend` listings.
pub fn parse_unit_column(stdout: &str, column: usize) -> Vec<String> {
    stdout
        .lines()
        .filter_map(|l| l.split_whitespace().nth(column))
        .map(String::from)
        .collect()
}

/// Reads systemd's state by running `systemctl` (argv, no shell).
#[derive(Debug, Clone)]
pub struct Systemctl {
    /// The program to run, normally `systemctl`.
    pub program: String,
}

impl Default for Systemctl {
    fn default() -> Self {
        Systemctl {
            program: "systemctl".into(),
        }
    }
}

/// The first line systemctl printed, whatever its exit status: `is-system-running` and
/// `is-active` exit non-zero for every state but the good one.
pub fn parse_systemctl_state(stdout: &str) -> Result<String, String> {
    match stdout.lines().map(str::trim).find(|l| !l.is_empty()) {
        Some(state) => Ok(state.to_string()),
        None => Err("systemctl printed nothing".into()),
    }
}

async fn systemctl_output(program: &str, args: &[&str]) -> Result<String, String> {
    let output = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("running {program}: {e}"))?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

async fn systemctl(program: &str, args: &[&str]) -> Result<String, String> {
    parse_systemctl_state(&systemctl_output(program, args).await?)
}

#[async_trait::async_trait]
impl SystemdSource for Systemctl {
    async fn system_state(&self) -> Result<String, String> {
        systemctl(&self.program, &["is-system-running"]).await
    }

    async fn unit_state(&self, unit: &str) -> Result<String, String> {
        systemctl(&self.program, &["is-active", "--", unit]).await
    }

    async fn failed_units(&self) -> Result<Vec<String>, String> {
        let out = systemctl_output(
            &self.program,
            &[
                "list-units",
                "--state=failed",
                "--plain",
                "--no-legend",
                "--all",
            ],
        )
        .await?;
        Ok(parse_unit_column(&out, 0))
    }

    async fn running_jobs(&self) -> Result<Vec<String>, String> {
        let out = systemctl_output(&self.program, &["list-jobs", "--plain", "--no-legend"]).await?;
        Ok(parse_running_jobs(&out))
    }
}

/// Runs one check once; Ok(detail) when it passes, Err(detail) when not. The runner
/// applies timeouts around it.
#[async_trait::async_trait]
pub trait Probe: Send + Sync {
    async fn probe(&self, check: &Check) -> Result<String, String>;
}

/// The probe that touches the real system.
#[derive(Debug)]
pub struct SystemProbe<S> {
    pub systemd: S,
    http: reqwest::Client,
}

impl<S: SystemdSource> SystemProbe<S> {
    pub fn new(systemd: S) -> SystemProbe<S> {
        SystemProbe {
            systemd,
            // Per-check timeouts come from the runner; redirects are fine for healthz.
            http: reqwest::Client::new(),
        }
    }
}

#[async_trait::async_trait]
impl<S: SystemdSource> Probe for SystemProbe<S> {
    async fn probe(&self, check: &Check) -> Result<String, String> {
        match &check.kind {
            CheckKind::SystemState => {
                let state = self.systemd.system_state().await?;
                if state != "starting" {
                    return system_settled(&state, &[], &[]);
                }
                let failed = self.systemd.failed_units().await?;
                let running = self.systemd.running_jobs().await?;
                system_settled(&state, &failed, &running)
            }
            CheckKind::Units { units } => {
                let mut bad = Vec::new();
                for unit in units {
                    let state = self.systemd.unit_state(unit).await?;
                    if state != "active" {
                        bad.push(format!("{unit} {state}"));
                    }
                }
                if bad.is_empty() {
                    Ok(format!("{} active", units.len()))
                } else {
                    Err(bad.join(", "))
                }
            }
            CheckKind::Http { url } => {
                let response = self
                    .http
                    .get(url)
                    .send()
                    .await
                    .map_err(|e| format!("GET {url}: {e}"))?;
                let status = response.status();
                if status.is_success() {
                    Ok(format!("HTTP {}", status.as_u16()))
                } else {
                    Err(format!("HTTP {}", status.as_u16()))
                }
            }
            CheckKind::Tcp { address } => tokio::net::TcpStream::connect(address.as_str())
                .await
                .map(|_| format!("connected to {address}"))
                .map_err(|e| format!("connect {address}: {e}")),
            CheckKind::Command { argv } => run_command(argv).await,
        }
    }
}

async fn run_command(argv: &[String]) -> Result<String, String> {
    let (program, args) = argv.split_first().ok_or("empty argv")?;
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        // The runner drops this future on timeout; the child must not outlive it.
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("running {program}: {e}"))?;
    let mut stderr = Vec::new();
    if let Some(mut pipe) = child.stderr.take() {
        // Bounded: a check's complaint fits in a few KiB.
        let _ = (&mut pipe).take(16 * 1024).read_to_end(&mut stderr).await;
    }
    let status = child
        .wait()
        .await
        .map_err(|e| format!("waiting for {program}: {e}"))?;
    let last = String::from_utf8_lossy(&stderr)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| format!(": {}", l.trim()))
        .unwrap_or_default();
    if status.success() {
        Ok("exit status 0".into())
    } else {
        Err(format!("{status}{last}"))
    }
}

/// Run every check once, concurrently, each bounded by its own timeout and by
/// `remaining` (what is left of the overall deadline).
pub async fn run_round(
    checks: &[Check],
    probe: &dyn Probe,
    remaining: Duration,
) -> Vec<CheckResult> {
    let runs = checks.iter().map(|check| async move {
        let started = Instant::now();
        let limit = check.timeout.min(remaining);
        let outcome = tokio::time::timeout(limit, probe.probe(check)).await;
        let (ok, detail) = match outcome {
            Ok(Ok(detail)) => (true, detail),
            Ok(Err(detail)) => (false, detail),
            Err(_) => (
                false,
                format!("timed out after {}", crate::duration::render(limit)),
            ),
        };
        CheckResult {
            name: check.name.clone(),
            ok,
            detail,
            duration: started.elapsed(),
        }
    });
    futures::future::join_all(runs).await
}

/// How the runner paces itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunPolicy {
    /// All checks must pass in one round within this time.
    pub deadline: Duration,
    /// Pause between rounds.
    pub interval: Duration,
}

/// What the runner ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub verdict: Verdict,
    /// The last round's results.
    pub results: Vec<CheckResult>,
    /// Rounds run.
    pub rounds: u32,
    pub elapsed: Duration,
}

/// Run rounds until every check passes in one round (Pass) or the deadline is reached
/// (Fail). Never returns Pending.
pub async fn run_until_verdict(checks: &[Check], probe: &dyn Probe, policy: RunPolicy) -> Report {
    let started = Instant::now();
    let mut rounds = 0;
    loop {
        let remaining = policy.deadline.saturating_sub(started.elapsed());
        let results = run_round(checks, probe, remaining).await;
        rounds += 1;
        let elapsed = started.elapsed();
        // When the next round would start at or after the deadline, this round was the
        // last chance: judge it as if the deadline had come.
        let judged_at = if elapsed + policy.interval >= policy.deadline {
            elapsed.max(policy.deadline)
        } else {
            elapsed
        };
        let verdict = verdict(&results, judged_at, policy.deadline);
        match verdict {
            Verdict::Pending { failing } => {
                tracing::info!(round = rounds, ?failing, "health checks pending");
                tokio::time::sleep(policy.interval).await;
            }
            verdict => {
                return Report {
                    verdict,
                    results,
                    rounds,
                    elapsed,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
