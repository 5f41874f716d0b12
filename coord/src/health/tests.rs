use super::*;
use std::collections::HashMap;
use std::sync::Mutex;

#[test]
fn system_settled_table() {
    let v = |xs: &[&str]| xs.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let table: Vec<(&str, Vec<String>, Vec<String>, bool)> = vec![
        ("running", v(&[]), v(&[]), true),
        ("degraded", v(&[]), v(&[]), false),
        ("maintenance", v(&[]), v(&[]), false),
        ("starting", v(&[]), v(&[]), true),
        (
            "starting",
            v(&[]),
            v(&["imgupdate-health.service", "boot-complete.target"]),
            true,
        ),
        ("starting", v(&[]), v(&["imgupdate.service"]), true),
        (
            "starting",
            v(&[]),
            v(&["kubelet.service", "imgupdate.service"]),
            false,
        ),
        (
            "starting",
            v(&["canary.service"]),
            v(&["imgupdate-health.service"]),
            false,
        ),
    ];
    for (i, (state, failed, jobs, ok)) in table.into_iter().enumerate() {
        assert_eq!(system_settled(state, &failed, &jobs).is_ok(), ok, "row {i}");
    }
    let err = system_settled("starting", &v(&["a.service"]), &[]).unwrap_err();
    assert!(err.contains("a.service"), "{err}");
    let err = system_settled("starting", &[], &v(&["x.mount"])).unwrap_err();
    assert!(err.contains("running"), "{err}");
    assert!(err.contains("x.mount"), "{err}");
}

#[test]
fn unit_columns() {
    let jobs = "12 imgupdate-health.service start running\n\
                13 boot-complete.target start waiting\n\
                14 multi-user.target start waiting\n\
                15 dev-x.device start running\nbogus\n";
    assert_eq!(
        parse_running_jobs(jobs),
        ["imgupdate-health.service", "dev-x.device"]
    );
    let failed = "canary.service loaded failed failed Canary\n";
    assert_eq!(parse_unit_column(failed, 0), ["canary.service"]);
    assert!(parse_unit_column("", 0).is_empty());
}

fn r(name: &str, ok: bool, detail: &str) -> CheckResult {
    CheckResult {
        name: name.into(),
        ok,
        detail: detail.into(),
        duration: Duration::from_millis(1),
    }
}

#[test]
fn verdict_table() {
    let s = Duration::from_secs;
    let pass = Verdict::Pass;
    let pending = |f: &[&str]| Verdict::Pending {
        failing: f.iter().map(|x| x.to_string()).collect(),
    };
    let fail = |f: &[&str]| Verdict::Fail {
        reasons: f.iter().map(|x| x.to_string()).collect(),
    };
    let table: Vec<(Vec<CheckResult>, Duration, Duration, Verdict)> = vec![
        // No checks configured: nothing can fail.
        (vec![], s(0), s(60), pass.clone()),
        (vec![r("a", true, "ok")], s(1), s(60), pass.clone()),
        (
            vec![r("a", true, "ok"), r("b", true, "ok")],
            s(59),
            s(60),
            pass.clone(),
        ),
        // All pass exactly at the deadline: still a pass.
        (vec![r("a", true, "ok")], s(60), s(60), pass.clone()),
        (
            vec![r("a", false, "HTTP 503")],
            s(1),
            s(60),
            pending(&["a: HTTP 503"]),
        ),
        (
            vec![r("a", true, "ok"), r("b", false, "degraded")],
            s(30),
            s(60),
            pending(&["b: degraded"]),
        ),
        (
            vec![r("a", false, "HTTP 503")],
            s(60),
            s(60),
            fail(&["a: HTTP 503"]),
        ),
        (
            vec![
                r("a", false, "x"),
                r("b", true, "ok"),
                r("c", false, "timed out"),
            ],
            s(61),
            s(60),
            fail(&["a: x", "c: timed out"]),
        ),
        // A zero deadline judges the first round finally.
        (vec![r("a", false, "x")], s(0), s(0), fail(&["a: x"])),
    ];
    for (i, (results, elapsed, deadline, want)) in table.into_iter().enumerate() {
        assert_eq!(verdict(&results, elapsed, deadline), want, "row {i}");
    }
}

#[test]
fn systemctl_output_table() {
    for (out, want) in [
        ("running\n", Ok("running")),
        ("degraded\n", Ok("degraded")),
        ("\n  starting  \n", Ok("starting")),
        ("active\nactive\n", Ok("active")),
        ("", Err(())),
    ] {
        let got = parse_systemctl_state(out);
        match want {
            Ok(w) => assert_eq!(got.as_deref(), Ok(w), "{out:?}"),
            Err(()) => assert!(got.is_err(), "{out:?}"),
        }
    }
}

/// A probe that answers from a script: check name -> outcomes per attempt (the
/// last one repeats), each taking `delay` of (paused) time.
struct Scripted {
    script: HashMap<String, (Duration, Vec<bool>)>,
    calls: Mutex<HashMap<String, usize>>,
}

#[async_trait::async_trait]
impl Probe for Scripted {
    async fn probe(&self, check: &Check) -> Result<String, String> {
        let n = {
            let mut calls = self.calls.lock().unwrap();
            let n = calls.entry(check.name.clone()).or_default();
            *n += 1;
            *n
        };
        let (delay, outcomes) = &self.script[&check.name];
        tokio::time::sleep(*delay).await;
        let ok = outcomes[(n - 1).min(outcomes.len() - 1)];
        if ok {
            Ok(format!("attempt {n} ok"))
        } else {
            Err(format!("attempt {n} failed"))
        }
    }
}

fn cmd(name: &str, timeout_ms: u64) -> Check {
    Check {
        name: name.into(),
        timeout: Duration::from_millis(timeout_ms),
        kind: CheckKind::Tcp {
            address: "unused:1".into(),
        },
    }
}

#[tokio::test(start_paused = true)]
async fn runner_table() {
    let ms = Duration::from_millis;
    struct Row {
        // (name, timeout ms, delay ms, outcomes)
        checks: Vec<(&'static str, u64, u64, Vec<bool>)>,
        deadline: u64,
        interval: u64,
        pass: bool,
        rounds: u32,
        reasons: Vec<&'static str>,
    }
    let table = vec![
        // Passes on the first round.
        Row {
            checks: vec![("a", 1000, 10, vec![true]), ("b", 1000, 20, vec![true])],
            deadline: 10_000,
            interval: 1000,
            pass: true,
            rounds: 1,
            reasons: vec![],
        },
        // b becomes healthy on its third attempt; both must pass in one round.
        Row {
            checks: vec![
                ("a", 1000, 10, vec![true]),
                ("b", 1000, 10, vec![false, false, true]),
            ],
            deadline: 10_000,
            interval: 1000,
            pass: true,
            rounds: 3,
            reasons: vec![],
        },
        // a passes then flaps: a round where a fails does not count.
        Row {
            checks: vec![
                ("a", 1000, 10, vec![true, false, true]),
                ("b", 1000, 10, vec![false, true]),
            ],
            deadline: 10_000,
            interval: 1000,
            pass: true,
            rounds: 3,
            reasons: vec![],
        },
        // Never healthy: fails at the deadline with the last reason.
        Row {
            checks: vec![("a", 1000, 10, vec![true]), ("b", 1000, 10, vec![false])],
            deadline: 5_000,
            interval: 1000,
            pass: false,
            rounds: 5,
            reasons: vec!["b: attempt 5 failed"],
        },
        // A hanging check is cut by its own timeout each round.
        Row {
            checks: vec![("slow", 300, 60_000, vec![true])],
            deadline: 2_000,
            interval: 500,
            pass: false,
            rounds: 3,
            reasons: vec!["slow: timed out after 300ms"],
        },
        // The overall deadline cuts a check whose own timeout is longer.
        Row {
            checks: vec![("slow", 60_000, 60_000, vec![true])],
            deadline: 1_000,
            interval: 100,
            pass: false,
            rounds: 1,
            reasons: vec!["slow: timed out after 1s"],
        },
    ];
    for (i, row) in table.into_iter().enumerate() {
        let checks: Vec<Check> = row.checks.iter().map(|(n, t, _, _)| cmd(n, *t)).collect();
        let probe = Scripted {
            script: row
                .checks
                .iter()
                .map(|(n, _, d, o)| (n.to_string(), (ms(*d), o.clone())))
                .collect(),
            calls: Mutex::new(HashMap::new()),
        };
        let policy = RunPolicy {
            deadline: ms(row.deadline),
            interval: ms(row.interval),
        };
        let report = run_until_verdict(&checks, &probe, policy).await;
        assert_eq!(report.rounds, row.rounds, "row {i}: {report:?}");
        match (&report.verdict, row.pass) {
            (Verdict::Pass, true) => {}
            (Verdict::Fail { reasons }, false) => assert_eq!(reasons, &row.reasons, "row {i}"),
            (v, _) => panic!("row {i}: unexpected {v:?}"),
        }
        assert!(report.elapsed <= ms(row.deadline), "row {i}: {report:?}");
    }
}

#[test]
fn config_checks_parse_and_refuse() {
    #[derive(Deserialize)]
    struct H {
        checks: Vec<Check>,
    }
    let ok = r#"
        checks = [
          { kind = "system-state" },
          { kind = "units", units = ["kubelet.service", "containerd.service"] },
          { kind = "http", name = "kubelet", url = "http://127.0.0.1:10248/healthz", timeout = "3s" },
          { kind = "tcp", address = "127.0.0.1:6443" },
          { kind = "command", argv = ["/usr/bin/true"], timeout = "1m" },
        ]
    "#;
    let h: H = toml::from_str(ok).unwrap();
    assert_eq!(h.checks.len(), 5);
    assert_eq!(h.checks[0].name, "system-state");
    assert_eq!(h.checks[2].name, "kubelet");
    assert_eq!(h.checks[2].timeout, Duration::from_secs(3));
    assert_eq!(h.checks[3].timeout, DEFAULT_CHECK_TIMEOUT);
    assert_eq!(h.checks[4].timeout, Duration::from_secs(60));
    assert_eq!(
        h.checks[4].kind,
        CheckKind::Command {
            argv: vec!["/usr/bin/true".into()]
        }
    );
    for bad in [
        r#"checks = [{ kind = "http" }]"#,
        r#"checks = [{ kind = "http", url = "not a url" }]"#,
        r#"checks = [{ kind = "tcp", address = "x:1", url = "http://x" }]"#,
        r#"checks = [{ kind = "command", argv = [] }]"#,
        r#"checks = [{ kind = "units", units = [] }]"#,
        r#"checks = [{ kind = "ping", address = "x" }]"#,
        r#"checks = [{ kind = "tcp", address = "x:1", colour = "red" }]"#,
        r#"checks = [{ kind = "tcp", address = "x:1", timeout = "soon" }]"#,
    ] {
        assert!(toml::from_str::<H>(bad).is_err(), "{bad}");
    }
    // Round trip through the raw form.
    let again: Check = serde_json::from_value(serde_json::to_value(&h.checks[2]).unwrap()).unwrap();
    assert_eq!(again, h.checks[2]);
}
