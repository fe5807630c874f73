//! Named crash points for the crash tests, compiled only with the `failpoints` feature.
//!
//! With the feature on, `failpoint!("meta::save::before_rename")` aborts the process when the
//! environment variable `IRONHORN_FAILPOINT` names that point (after skipping the first
//! `IRONHORN_FAILPOINT_SKIP` hits). Without the feature the macro expands to nothing.

#[cfg(feature = "failpoints")]
#[doc(hidden)]
pub fn hit(name: &str) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static HITS: AtomicU64 = AtomicU64::new(0);
    let Ok(want) = std::env::var("IRONHORN_FAILPOINT") else {
        return;
    };
    if want != name {
        return;
    }
    let skip: u64 = std::env::var("IRONHORN_FAILPOINT_SKIP")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    if HITS.fetch_add(1, Ordering::SeqCst) >= skip {
        eprintln!("failpoint {name} fired");
        std::process::abort();
    }
}

/// Aborts the process here when the named failpoint is armed (feature `failpoints` only).
#[macro_export]
macro_rules! failpoint {
    ($name:expr) => {
        #[cfg(feature = "failpoints")]
        $crate::failpoint::hit($name);
    };
}
