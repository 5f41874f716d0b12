use super::*;

fn s(v: &str, slot: Slot) -> (String, Slot) {
    (v.to_string(), slot)
}

fn states() -> Vec<State> {
    let (version, slot) = s("1.1", Slot::B);
    vec![
        State::Idle,
        State::Checking,
        State::Downloading {
            version: version.clone(),
            done: 1,
            total: 2,
        },
        State::Verifying {
            version: version.clone(),
        },
        State::Staged {
            version: version.clone(),
            slot,
        },
        State::Locking {
            version: version.clone(),
            slot,
        },
        State::Draining {
            version: version.clone(),
            slot,
        },
        State::Rebooting {
            version: version.clone(),
            slot,
            strategy: Strategy::Kexec,
        },
        State::Trial {
            version: version.clone(),
            slot,
        },
        State::Committed {
            version: version.clone(),
            slot,
        },
        State::RollingBack {
            version: version.clone(),
            slot,
        },
        State::Failed { reason: "x".into() },
    ]
}

/// A window open on every day from 00:00 for `hours` hours, UTC.
fn window(hours: u32) -> Window {
    let raw: toml::Table = toml::from_str(&format!(
        "days = [\"Mon\",\"Tue\",\"Wed\",\"Thu\",\"Fri\",\"Sat\",\"Sun\"]\nstart = \"00:00\"\nlength = \"{hours}h\"\n"
    ))
    .unwrap();
    raw.try_into().unwrap()
}

fn act(state: &State, open: Option<bool>, held: bool, verdict: Option<&Verdict>) -> Action {
    // 06:00 UTC: inside a 12h window from midnight, outside a 1h one.
    let now: Timestamp = "2026-11-21T06:00:00Z".parse().unwrap();
    let windows = match open {
        None => vec![],
        Some(true) => vec![window(12)],
        Some(false) => vec![window(1)],
    };
    next_action(&Inputs {
        state,
        now,
        windows: &windows,
        lock_held: held,
        verdict,
        strategy: Strategy::Reboot,
    })
}

#[test]
fn staged_locking_draining_are_gated_by_window_and_lock() {
    for st in &states()[4..7] {
        assert_eq!(
            act(st, Some(false), false, None),
            Action::WaitWindow,
            "{st:?}"
        );
        assert_eq!(act(st, Some(true), false, None), Action::TakeLock, "{st:?}");
        assert_eq!(
            act(st, None, false, None),
            Action::TakeLock,
            "no windows = open"
        );
        assert_eq!(
            act(st, Some(false), true, None),
            Action::ReleaseLock,
            "{st:?}"
        );
        assert_eq!(act(st, Some(true), true, None), Action::Drain, "{st:?}");
        assert_eq!(act(st, None, true, None), Action::Drain, "{st:?}");
    }
}

#[test]
fn rebooting_reboots_only_with_the_lock() {
    let st = &states()[7];
    let want = Action::Reboot {
        strategy: Strategy::Kexec,
        slot: Slot::B,
    };
    // The window no longer matters once drained.
    assert_eq!(act(st, Some(false), true, None), want);
    assert_eq!(act(st, Some(true), true, None), want);
    assert_eq!(act(st, Some(true), false, None), Action::TakeLock);
}

#[test]
fn trial_follows_the_verdict() {
    let st = &states()[8];
    let pending = Verdict::Pending {
        failing: vec!["a".into()],
    };
    let fail = Verdict::Fail {
        reasons: vec!["a".into()],
    };
    for held in [false, true] {
        assert_eq!(act(st, None, held, None), Action::RunHealth);
        assert_eq!(act(st, None, held, Some(&pending)), Action::RunHealth);
        assert_eq!(act(st, None, held, Some(&Verdict::Pass)), Action::Commit);
        assert_eq!(act(st, None, held, Some(&fail)), Action::RollBack);
    }
}

#[test]
fn rolling_back_reboots_to_the_other_slot_with_the_configured_strategy() {
    let st = &states()[10];
    for held in [false, true] {
        assert_eq!(
            act(st, Some(false), held, None),
            Action::Reboot {
                strategy: Strategy::Reboot,
                slot: Slot::A
            }
        );
    }
}

#[test]
fn failed_checks_the_old_slot_before_releasing() {
    let st = &states()[11];
    let fail = Verdict::Fail {
        reasons: vec!["a".into()],
    };
    assert_eq!(act(st, None, true, None), Action::RunHealth);
    assert_eq!(
        act(st, None, true, Some(&Verdict::Pass)),
        Action::ReleaseLock
    );
    assert_eq!(
        act(st, None, true, Some(&fail)),
        Action::Idle,
        "stay cordoned"
    );
    assert_eq!(act(st, None, false, None), Action::Idle);
}

#[test]
fn resting_and_busy_states_release_a_leftover_lock() {
    let all = states();
    for st in [&all[0], &all[1], &all[2], &all[3], &all[9]] {
        assert_eq!(
            act(st, Some(true), true, None),
            Action::ReleaseLock,
            "{st:?}"
        );
        assert_eq!(act(st, Some(true), false, None), Action::Idle, "{st:?}");
        assert_eq!(act(st, Some(false), false, None), Action::Idle, "{st:?}");
    }
}

#[test]
fn cluster_refusals_refuse_recorded_versions() {
    let r = ClusterRefusals(vec![FailedRelease {
        version: "1.1".into(),
        node: "n1".into(),
        reason: "kubelet".into(),
    }]);
    assert!(r.is_refused("1.1"));
    assert!(!r.is_refused("1.2"));
}
