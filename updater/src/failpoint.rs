//! Crash injection for the interruption tests: `IMGUPDATE_FAILPOINT=<name>:<n>` makes the
//! n-th pass through the named point abort the process on the spot (no destructors, no
//! buffered writes flushed: what `kill -9` does).
//!
//! This module owns only that counter. It must never change behaviour when the variable
//! is unset, and it is compiled out of release builds (`debug_assertions`).

#[cfg(debug_assertions)]
mod imp {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;

    static TARGET: OnceLock<Option<(String, u64)>> = OnceLock::new();
    static COUNT: AtomicU64 = AtomicU64::new(0);

    pub fn hit(name: &str) {
        let target = TARGET.get_or_init(|| {
            let v = std::env::var("IMGUPDATE_FAILPOINT").ok()?;
            let (n, k) = v.rsplit_once(':')?;
            Some((n.to_string(), k.parse().ok()?))
        });
        if let Some((n, k)) = target {
            if n == name || n == "*" {
                let seen = COUNT.fetch_add(1, Ordering::SeqCst) + 1;
                if seen == *k {
                    eprintln!("imgupdate: failpoint {name} #{k}: aborting");
                    std::process::abort();
                }
            }
        }
    }
}

/// Pass through the named crash point.
#[cfg(debug_assertions)]
pub fn hit(name: &str) {
    imp::hit(name);
}

/// Pass through the named crash point (no-op in release builds).
#[cfg(not(debug_assertions))]
pub fn hit(_name: &str) {}
