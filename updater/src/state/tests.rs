use super::*;

fn v() -> String {
    "2.0".to_string()
}

/// One sample of every state.
fn states() -> Vec<State> {
    vec![
        State::Idle,
        State::Checking,
        State::Downloading {
            version: v(),
            done: 10,
            total: 100,
        },
        State::Verifying { version: v() },
        State::Staged {
            version: v(),
            slot: Slot::B,
        },
        State::Locking {
            version: v(),
            slot: Slot::B,
        },
        State::Draining {
            version: v(),
            slot: Slot::B,
        },
        State::Rebooting {
            version: v(),
            slot: Slot::B,
            strategy: Strategy::Kexec,
        },
        State::Trial {
            version: v(),
            slot: Slot::B,
        },
        State::Committed {
            version: v(),
            slot: Slot::B,
        },
        State::RollingBack {
            version: v(),
            slot: Slot::B,
        },
        State::Failed { reason: "x".into() },
    ]
}

/// One sample of every event; `booted` twice: the new slot, and the old one.
fn events() -> Vec<(&'static str, Event)> {
    vec![
        ("check", Event::CheckStarted),
        ("none", Event::NoUpdate),
        ("found", Event::UpdateFound { version: v() }),
        (
            "progress",
            Event::Progress {
                done: 50,
                total: 100,
            },
        ),
        ("written", Event::Written),
        ("staged", Event::Staged { slot: Slot::B }),
        ("lock_req", Event::LockRequested),
        ("lock_ok", Event::LockAcquired),
        (
            "drained",
            Event::Drained {
                strategy: Strategy::Reboot,
            },
        ),
        (
            "boot_new",
            Event::Booted {
                version: v(),
                slot: Slot::B,
            },
        ),
        (
            "boot_old",
            Event::Booted {
                version: "1.0".into(),
                slot: Slot::A,
            },
        ),
        ("healthy", Event::HealthPassed),
        ("unhealthy", Event::HealthFailed { reason: "h".into() }),
        ("rollback", Event::RollbackRequested),
        ("error", Event::Error { reason: "e".into() }),
    ]
}

/// The expected result of every legal (state, event) pair; every pair not listed must be
/// an [`IllegalTransition`].
fn legal(state: &State, event: &str) -> Option<State> {
    use State as S;
    let b = Slot::B;
    let same = || Some(state.clone());
    let failed = |r: &str| Some(S::Failed { reason: r.into() });
    match (state.name(), event) {
        (
            "idle" | "checking" | "downloading" | "verifying" | "staged" | "committed" | "failed",
            "check",
        ) => Some(S::Checking),
        ("checking", "none") => Some(S::Idle),
        ("checking", "found") => Some(S::Downloading {
            version: v(),
            done: 0,
            total: 0,
        }),
        ("downloading", "progress") => Some(S::Downloading {
            version: v(),
            done: 50,
            total: 100,
        }),
        ("downloading", "written") => Some(S::Verifying { version: v() }),
        ("verifying", "staged") => Some(S::Staged {
            version: v(),
            slot: b,
        }),
        ("staged", "lock_req") => Some(S::Locking {
            version: v(),
            slot: b,
        }),
        ("locking", "lock_ok") => Some(S::Draining {
            version: v(),
            slot: b,
        }),
        ("draining", "drained") => Some(S::Rebooting {
            version: v(),
            slot: b,
            strategy: Strategy::Reboot,
        }),
        ("rebooting" | "trial", "boot_new") => Some(S::Trial {
            version: v(),
            slot: b,
        }),
        ("rebooting" | "trial", "boot_old") => {
            failed("expected 2.0 on slot b, but 1.0 on slot a booted")
        }
        ("rolling_back", "boot_new") => same(),
        ("rolling_back", "boot_old") => failed("2.0 rolled back; 1.0 runs on slot a"),
        (_, "boot_new" | "boot_old") => same(),
        ("trial", "healthy") => Some(S::Committed {
            version: v(),
            slot: b,
        }),
        ("trial", "unhealthy") => Some(S::RollingBack {
            version: v(),
            slot: b,
        }),
        ("staged", "rollback") => Some(S::Idle),
        ("trial" | "committed", "rollback") => Some(S::RollingBack {
            version: v(),
            slot: b,
        }),
        (
            "checking" | "downloading" | "verifying" | "locking" | "draining" | "rebooting",
            "error",
        ) => failed("e"),
        _ => None,
    }
}

#[test]
fn every_state_event_pair_follows_the_table() {
    let mut legal_pairs = 0;
    let mut pairs = 0;
    for state in states() {
        for (label, event) in events() {
            pairs += 1;
            let got = next(&state, &event);
            match legal(&state, label) {
                Some(want) => {
                    legal_pairs += 1;
                    assert_eq!(got.as_ref(), Ok(&want), "{} + {label}", state.name());
                }
                None => {
                    let err =
                        got.expect_err(&format!("{} + {label} must be illegal", state.name()));
                    assert_eq!(err.state, state.name());
                    assert_eq!(err.event, event.name());
                }
            }
        }
    }
    assert_eq!(pairs, 12 * 15);
    // Guards the table against being emptied by mistake.
    assert_eq!(legal_pairs, 50);
}

#[test]
fn state_file_round_trips_and_records_history() {
    let dir = tempfile::tempdir().unwrap();
    let mut sf = StateFile::load(dir.path()).unwrap();
    assert_eq!(sf.state, State::Idle);
    sf.apply(Event::CheckStarted).unwrap();
    sf.apply(Event::UpdateFound { version: v() }).unwrap();
    sf.apply(Event::Progress { done: 1, total: 2 }).unwrap();
    sf.apply(Event::Error {
        reason: "disk on fire".into(),
    })
    .unwrap();
    let err = sf.apply(Event::Written).unwrap_err();
    assert_eq!(err.to_string(), "written is not allowed in state failed");
    sf.save(dir.path()).unwrap();
    let back = StateFile::load(dir.path()).unwrap();
    assert_eq!(back, sf);
    assert_eq!(back.failures, 1);
    // Progress ticks are not history; the three other transitions are.
    let names: Vec<&str> = back.history.iter().map(|h| h.event.name()).collect();
    assert_eq!(names, ["check_started", "update_found", "error"]);
    // No temporary file is left behind.
    let files: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(files, [std::ffi::OsString::from(STATE_FILE)]);
}
