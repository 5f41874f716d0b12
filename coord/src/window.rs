//! Maintenance windows: when a node may reboot. A window opens on each listed day of
//! the week at a local start time in its time zone and stays open for `length` of real
//! (elapsed) time, so it may cross midnight (it belongs to the day it starts) and a DST
//! change inside it does not stretch or shrink it. A start time that does not exist on
//! a DST day (spring gap) opens at the instant after the gap; one that exists twice
//! (autumn fold) opens at the first. No windows configured means "always open".
//!
//! The combined gate with the reboot lock lives here too ([`next_step`],
//! [`acquire_in_window`]): wait for a window, then take the lock, then reboot; if the
//! window closes before the reboot starts, give the lock back. Taking the lock first
//! would hold a cluster-wide slot while waiting for a window, starving nodes whose
//! window is open. This module decides only; it never reboots.

use std::time::Duration;

use jiff::civil::{Time, Weekday};
use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp, ToSpan};
use serde::{Deserialize, Serialize};

use crate::lock::{LockError, RebootLock};

/// One window, validated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawWindow", into = "RawWindow")]
pub struct Window {
    /// Days on which the window starts.
    pub days: Vec<Weekday>,
    /// Local start time.
    pub start: Time,
    /// How long it stays open (elapsed time, at most 7 days).
    pub length: Duration,
    /// IANA name, e.g. `Europe/Berlin`.
    pub tz_name: String,
    tz: TimeZone,
}

/// The config-file form: `{ days = ["Sat","Sun"], start = "01:00", length = "3h",
/// tz = "Europe/Berlin" }`; `tz` defaults to UTC.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWindow {
    pub days: Vec<String>,
    pub start: String,
    pub length: String,
    #[serde(default = "utc")]
    pub tz: String,
}

fn utc() -> String {
    "UTC".into()
}

/// Longest window accepted: a week is "always open" already.
pub const MAX_LENGTH: Duration = Duration::from_secs(7 * 24 * 3600);

/// `Mon`, `monday`, `Tue`, ... (case-insensitive).
pub fn parse_weekday(text: &str) -> Result<Weekday, String> {
    let t = text.trim().to_ascii_lowercase();
    let day = match t.get(..3).unwrap_or("") {
        "mon" => Weekday::Monday,
        "tue" => Weekday::Tuesday,
        "wed" => Weekday::Wednesday,
        "thu" => Weekday::Thursday,
        "fri" => Weekday::Friday,
        "sat" => Weekday::Saturday,
        "sun" => Weekday::Sunday,
        _ => return Err(format!("unknown day {text:?} (Mon..Sun)")),
    };
    let full = format!("{day:?}").to_ascii_lowercase();
    if t.len() == 3 || t == full {
        Ok(day)
    } else {
        Err(format!("unknown day {text:?} (Mon..Sun)"))
    }
}

fn weekday_name(day: Weekday) -> String {
    format!("{day:?}").chars().take(3).collect()
}

impl TryFrom<RawWindow> for Window {
    type Error = String;

    fn try_from(raw: RawWindow) -> Result<Window, String> {
        let mut days = raw
            .days
            .iter()
            .map(|d| parse_weekday(d))
            .collect::<Result<Vec<_>, _>>()?;
        days.sort_by_key(|d| d.to_monday_zero_offset());
        days.dedup();
        if days.is_empty() {
            return Err("a window needs at least one day".into());
        }
        let start: Time = raw
            .start
            .parse()
            .map_err(|e| format!("window start {:?}: {e}", raw.start))?;
        let length = crate::duration::parse(&raw.length)?;
        if length.is_zero() || length > MAX_LENGTH {
            return Err(format!(
                "window length {:?} must be > 0 and <= 7 days",
                raw.length
            ));
        }
        let tz = TimeZone::get(&raw.tz).map_err(|e| format!("window tz {:?}: {e}", raw.tz))?;
        Ok(Window {
            days,
            start,
            length,
            tz_name: raw.tz,
            tz,
        })
    }
}

impl From<Window> for RawWindow {
    fn from(w: Window) -> RawWindow {
        RawWindow {
            days: w.days.iter().map(|d| weekday_name(*d)).collect(),
            start: w.start.strftime("%H:%M").to_string(),
            length: crate::duration::render(w.length),
            tz: w.tz_name,
        }
    }
}

impl Window {
    /// Starts of this window in `[from - length, from + 8 days]`, oldest first.
    fn starts_around(&self, from: Timestamp) -> Vec<Timestamp> {
        let local = from.to_zoned(self.tz.clone()).date();
        let back = (self.length.as_secs() / 86_400) as i64 + 1;
        let mut out = Vec::new();
        for offset in -back..=8 {
            let Ok(date) = local.checked_add(offset.days()) else {
                continue;
            };
            if !self.days.contains(&date.weekday()) {
                continue;
            }
            // `compatible`: a start in a DST gap moves past the gap, one in a fold
            // takes the first occurrence.
            if let Ok(zoned) = date.to_datetime(self.start).to_zoned(self.tz.clone()) {
                out.push(zoned.timestamp());
            }
        }
        out
    }

    fn end_of(&self, start: Timestamp) -> Option<Timestamp> {
        let length = SignedDuration::try_from(self.length).ok()?;
        start.checked_add(length).ok()
    }

    /// The end of the occurrence open at `now`, if one is.
    pub fn open_until(&self, now: Timestamp) -> Option<Timestamp> {
        self.starts_around(now)
            .into_iter()
            .filter_map(|s| Some((s, self.end_of(s)?)))
            .filter(|(s, e)| *s <= now && now < *e)
            .map(|(_, e)| e)
            .max()
    }

    /// The first start at or after `now`.
    pub fn next_start(&self, now: Timestamp) -> Option<Timestamp> {
        self.starts_around(now).into_iter().find(|s| *s >= now)
    }
}

/// Whether a reboot may start at `now`. No windows: always.
pub fn is_open(windows: &[Window], now: Timestamp) -> bool {
    windows.is_empty() || windows.iter().any(|w| w.open_until(now).is_some())
}

/// When the windows next allow a reboot: `now` if open, else the earliest start.
pub fn next_open(windows: &[Window], now: Timestamp) -> Option<Timestamp> {
    if is_open(windows, now) {
        return Some(now);
    }
    windows.iter().filter_map(|w| w.next_start(now)).min()
}

/// When the currently open windows close (the latest end among them); `None` if no
/// window is open or no windows are configured (never closes).
pub fn closes_at(windows: &[Window], now: Timestamp) -> Option<Timestamp> {
    windows.iter().filter_map(|w| w.open_until(now)).max()
}

/// What the updater does next, from the window and the lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Window closed, no lock: wait for the window (do not take the lock).
    WaitForWindow,
    /// Window open, no lock: try to take it.
    TakeLock,
    /// Window open and lock held: reboot now.
    Reboot,
    /// Lock held but the window closed before the reboot started: give it back.
    ReleaseLock,
}

/// The gate as a pure function: reboot only when the window is open AND the lock held.
pub fn next_step(window_open: bool, lock_held: bool) -> Step {
    match (window_open, lock_held) {
        (false, false) => Step::WaitForWindow,
        (true, false) => Step::TakeLock,
        (true, true) => Step::Reboot,
        (false, true) => Step::ReleaseLock,
    }
}

/// Wait for a window, then poll the lock every `poll` while the window stays open;
/// returns once the lock is held inside an open window (the caller reboots at once and
/// should re-check [`is_open`] right before, releasing on a miss). Gives up after
/// `give_up` with Ok(false), releasing anything taken.
pub async fn acquire_in_window(
    windows: &[Window],
    lock: &dyn RebootLock,
    poll: Duration,
    give_up: Duration,
) -> Result<bool, LockError> {
    let started = tokio::time::Instant::now();
    let mut held = false;
    loop {
        if started.elapsed() >= give_up {
            if held {
                lock.release().await?;
            }
            return Ok(false);
        }
        let now = Timestamp::now();
        let open = is_open(windows, now);
        let wait = match next_step(open, held) {
            Step::Reboot => return Ok(true),
            Step::TakeLock => {
                held = lock.try_acquire().await?;
                if held {
                    continue; // re-check the window: it may have closed meanwhile
                }
                poll
            }
            Step::ReleaseLock => {
                tracing::info!("maintenance window closed before the reboot; releasing the lock");
                lock.release().await?;
                held = false;
                continue;
            }
            Step::WaitForWindow => next_open(windows, now)
                .and_then(|t| Duration::try_from(t.duration_since(now)).ok())
                .unwrap_or(poll)
                .max(Duration::from_millis(10)),
        };
        let left = give_up.saturating_sub(started.elapsed());
        tokio::time::sleep(wait.min(left)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(days: &[&str], start: &str, length: &str, tz: &str) -> Window {
        Window::try_from(RawWindow {
            days: days.iter().map(|d| d.to_string()).collect(),
            start: start.into(),
            length: length.into(),
            tz: tz.into(),
        })
        .unwrap()
    }

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn is_open_table() {
        let weekend = w(&["Sat", "Sun"], "01:00", "3h", "Europe/Berlin");
        let late_friday = w(&["Fri"], "23:00", "3h", "Europe/Berlin");
        let spring = w(&["Sun"], "01:00", "3h", "Europe/Berlin");
        let in_gap = w(&["Sun"], "02:30", "1h", "Europe/Berlin");
        let in_fold = w(&["Sun"], "02:30", "1h", "Europe/Berlin");
        let table: Vec<(&Window, &str, bool, &str)> = vec![
            // 2026-11-21 is a Saturday; Berlin is UTC+1 in winter.
            (&weekend, "2026-11-21T00:30:00Z", true, "Sat 01:30 local"),
            (&weekend, "2026-11-21T00:00:00Z", true, "start is inclusive"),
            (&weekend, "2026-11-20T23:59:59Z", false, "one second early"),
            (
                &weekend,
                "2026-11-21T03:00:00Z",
                false,
                "end is exclusive (04:00 local)",
            ),
            (&weekend, "2026-11-22T02:59:59Z", true, "Sun 03:59:59 local"),
            (&weekend, "2026-11-23T00:30:00Z", false, "Monday"),
            (&weekend, "2026-11-21T12:00:00Z", false, "Saturday noon"),
            // Crossing midnight: belongs to Friday, open into Saturday.
            (
                &late_friday,
                "2026-11-20T22:00:00Z",
                true,
                "Fri 23:00 local",
            ),
            (
                &late_friday,
                "2026-11-21T00:30:00Z",
                true,
                "Sat 01:30 local, started Fri",
            ),
            (
                &late_friday,
                "2026-11-21T01:00:00Z",
                false,
                "Sat 02:00 local, closed",
            ),
            (
                &late_friday,
                "2026-11-21T22:30:00Z",
                false,
                "Sat 23:30: Sat not listed",
            ),
            // DST starts 2026-03-29 02:00 CET -> 03:00 CEST. 01:00 CET = 00:00Z; three
            // real hours end at 03:00Z = 05:00 CEST.
            (&spring, "2026-03-29T00:00:00Z", true, "01:00 CET"),
            (
                &spring,
                "2026-03-29T02:30:00Z",
                true,
                "04:30 CEST, 2.5 real hours in",
            ),
            (
                &spring,
                "2026-03-29T03:00:00Z",
                false,
                "05:00 CEST, 3 real hours",
            ),
            // 02:30 does not exist that night: opens at 03:30 CEST = 01:30Z.
            (
                &in_gap,
                "2026-03-29T01:29:59Z",
                false,
                "before the moved start",
            ),
            (&in_gap, "2026-03-29T01:30:00Z", true, "03:30 CEST"),
            (&in_gap, "2026-03-29T02:29:59Z", true, "one real hour"),
            (&in_gap, "2026-03-29T02:30:00Z", false, "closed"),
            // DST ends 2026-10-25 03:00 CEST -> 02:00 CET: 02:30 happens twice; the
            // window opens at the first (CEST, 00:30Z) and lasts one real hour.
            (&in_fold, "2026-10-25T00:30:00Z", true, "02:30 CEST"),
            (
                &in_fold,
                "2026-10-25T01:15:00Z",
                true,
                "02:15 CET, 45 min in",
            ),
            (
                &in_fold,
                "2026-10-25T01:45:00Z",
                false,
                "02:45 CET, second 02:30 not a start",
            ),
        ];
        for (window, now, want, why) in table {
            assert_eq!(
                is_open(std::slice::from_ref(window), ts(now)),
                want,
                "{now}: {why}"
            );
        }
    }

    #[test]
    fn next_open_table() {
        let weekend = w(&["Sat", "Sun"], "01:00", "3h", "Europe/Berlin");
        let weekday_night = w(&["Mon", "Tue", "Wed", "Thu", "Fri"], "02:00", "1h", "UTC");
        let ny = w(&["Wed"], "22:00", "4h", "America/New_York");
        let table: Vec<(Vec<&Window>, &str, Option<&str>)> = vec![
            // Open now: now.
            (
                vec![&weekend],
                "2026-11-21T00:30:00Z",
                Some("2026-11-21T00:30:00Z"),
            ),
            // Friday noon: Saturday 01:00 Berlin.
            (
                vec![&weekend],
                "2026-11-20T12:00:00Z",
                Some("2026-11-21T00:00:00Z"),
            ),
            // Sunday after the window: next Saturday.
            (
                vec![&weekend],
                "2026-11-22T05:00:00Z",
                Some("2026-11-28T00:00:00Z"),
            ),
            // Several windows: the earliest wins (Monday 02:00 UTC before Saturday).
            (
                vec![&weekend, &weekday_night],
                "2026-11-22T05:00:00Z",
                Some("2026-11-23T02:00:00Z"),
            ),
            // Summer in Berlin (UTC+2): Sat 01:00 CEST = Fri 23:00Z.
            (
                vec![&weekend],
                "2026-07-01T00:00:00Z",
                Some("2026-07-03T23:00:00Z"),
            ),
            // The Saturday after DST ends 2026-10-25 is back at UTC+1.
            (
                vec![&weekend],
                "2026-10-26T00:00:00Z",
                Some("2026-10-31T00:00:00Z"),
            ),
            // New York Wed 22:00 EST = Thu 03:00Z.
            (
                vec![&ny],
                "2026-11-23T00:00:00Z",
                Some("2026-11-26T03:00:00Z"),
            ),
            // No windows: always open.
            (vec![], "2026-11-23T00:00:00Z", Some("2026-11-23T00:00:00Z")),
        ];
        for (windows, now, want) in table {
            let windows: Vec<Window> = windows.into_iter().cloned().collect();
            assert_eq!(next_open(&windows, ts(now)), want.map(ts), "{now}");
            // next_open is open there.
            if let Some(t) = next_open(&windows, ts(now)) {
                assert!(is_open(&windows, t), "{now}: next_open {t} is not open");
            }
        }
    }

    #[test]
    fn closes_at_reports_the_open_window_end() {
        let weekend = w(&["Sat", "Sun"], "01:00", "3h", "Europe/Berlin");
        let windows = [weekend];
        assert_eq!(
            closes_at(&windows, ts("2026-11-21T01:00:00Z")),
            Some(ts("2026-11-21T03:00:00Z"))
        );
        assert_eq!(closes_at(&windows, ts("2026-11-21T05:00:00Z")), None);
        assert_eq!(closes_at(&[], ts("2026-11-21T05:00:00Z")), None);
    }

    #[test]
    fn gate_table() {
        assert_eq!(next_step(false, false), Step::WaitForWindow);
        assert_eq!(next_step(true, false), Step::TakeLock);
        assert_eq!(next_step(true, true), Step::Reboot);
        assert_eq!(next_step(false, true), Step::ReleaseLock);
    }

    #[test]
    fn config_parses_and_refuses() {
        #[derive(Deserialize)]
        struct C {
            windows: Vec<Window>,
        }
        let c: C = toml::from_str(
            r#"windows = [
                { days = ["Sat","Sun"], start = "01:00", length = "3h", tz = "Europe/Berlin" },
                { days = ["monday", "Fri", "fri"], start = "23:30", length = "1h 30m" },
            ]"#,
        )
        .unwrap();
        assert_eq!(c.windows[0].days, [Weekday::Saturday, Weekday::Sunday]);
        assert_eq!(c.windows[1].days, [Weekday::Monday, Weekday::Friday]);
        assert_eq!(c.windows[1].tz_name, "UTC");
        assert_eq!(c.windows[1].length, Duration::from_secs(5400));
        for bad in [
            r#"windows = [{ days = [], start = "01:00", length = "3h" }]"#,
            r#"windows = [{ days = ["Caturday"], start = "01:00", length = "3h" }]"#,
            r#"windows = [{ days = ["Sa"], start = "01:00", length = "3h" }]"#,
            r#"windows = [{ days = ["Sat"], start = "25:00", length = "3h" }]"#,
            r#"windows = [{ days = ["Sat"], start = "01:00", length = "0s" }]"#,
            r#"windows = [{ days = ["Sat"], start = "01:00", length = "8d" }]"#,
            r#"windows = [{ days = ["Sat"], start = "01:00", length = "3h", tz = "Mars/Olympus" }]"#,
            r#"windows = [{ days = ["Sat"], start = "01:00", length = "3h", zone = "UTC" }]"#,
        ] {
            assert!(toml::from_str::<C>(bad).is_err(), "{bad}");
        }
        // Round trip.
        let json = serde_json::to_string(&c.windows[0]).unwrap();
        assert_eq!(
            json,
            r#"{"days":["Sat","Sun"],"start":"01:00","length":"3h","tz":"Europe/Berlin"}"#
        );
        let back: Window = serde_json::from_str(&json).unwrap();
        assert_eq!(back, c.windows[0]);
    }
}
