#![allow(clippy::unwrap_used)]

use super::*;
use imgformat::release::ReleaseEntry;

fn index(versions: &[&str], max: Option<&str>) -> ChannelIndex {
    let mut idx = ChannelIndex::empty("stable");
    for v in versions {
        idx.releases.push(ReleaseEntry {
            version: (*v).into(),
            manifest: release::manifest_target("m", v),
        });
    }
    idx.max_version = max.map(Into::into);
    idx
}

#[test]
fn choose_honours_pin_max_and_refusals() {
    let idx = index(&["1.0", "1.1", "1.2"], None);
    let none = LocalRefusals::default();
    let up = |v: &str| Choice::Update { version: v.into() };
    // (running, pinned, max, refused, expected)
    type Case = (
        &'static str,
        Option<&'static str>,
        Option<&'static str>,
        &'static [&'static str],
        Choice,
    );
    let table: [Case; 10] = [
        ("1.0", None, None, &[], up("1.2")),
        ("1.2", None, None, &[], Choice::UpToDate),
        ("1.0", None, Some("1.1"), &[], up("1.1")),
        ("1.1", None, Some("1.1"), &[], Choice::UpToDate),
        ("1.2", Some("1.0"), None, &[], up("1.0")),
        ("1.0", Some("1.0"), None, &[], Choice::UpToDate),
        (
            "1.0",
            Some("0.9"),
            None,
            &[],
            Choice::PinnedMissing {
                version: "0.9".into(),
            },
        ),
        // A failed newest release is skipped for the newest good one...
        ("1.0", None, None, &["1.2"], up("1.1")),
        // ...and reported when there is none.
        (
            "1.1",
            None,
            None,
            &["1.2"],
            Choice::Refused {
                version: "1.2".into(),
            },
        ),
        (
            "1.0",
            None,
            None,
            &["1.1", "1.2"],
            Choice::Refused {
                version: "1.2".into(),
            },
        ),
    ];
    for (running, pin, max, refused, want) in table {
        let refused = LocalRefusals(refused.iter().map(|s| s.to_string()).collect());
        assert_eq!(
            choose(&idx, running, pin, max, &refused),
            want,
            "{running} {pin:?} {max:?}"
        );
    }
    // The channel's own max_version still downgrades.
    let capped = index(&["1.0", "1.1", "1.2"], Some("1.1"));
    assert_eq!(choose(&capped, "1.2", None, None, &none), up("1.1"));
}
