//! The wall clock, injected. The engine reads "now" — grant expiry, the time a decision is made, a
//! registration's time — from the [`Clock`] in its settings, so a test moves time forward instead
//! of sleeping through it. Production uses [`Clock::system`]; a test makes a [`Clock::manual`] and
//! [`Clock::advance`]s it. (Intervals that only pace work — batching, checkpoints, retries — run on
//! tokio's or the OS's monotonic clocks; tokio's can be paused in tests.)

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Where "now" comes from.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    /// A test's clock, in milliseconds since the Unix epoch; `None`: the system's.
    manual: Option<Arc<AtomicI64>>,
}

impl Clock {
    /// The system's wall clock.
    pub fn system() -> Clock {
        Clock { manual: None }
    }

    /// A clock that stands at `start_ms` (milliseconds since the Unix epoch) until advanced.
    pub fn manual(start_ms: i64) -> Clock {
        Clock {
            manual: Some(Arc::new(AtomicI64::new(start_ms))),
        }
    }

    /// Milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> i64 {
        match &self.manual {
            Some(t) => t.load(Ordering::SeqCst),
            None => crate::signal::now_ms(),
        }
    }

    /// Seconds since the Unix epoch.
    pub fn now(&self) -> f64 {
        self.now_ms() as f64 / 1000.0
    }

    /// Moves a manual clock forward (every copy of it sees the new time); the system clock moves
    /// by itself, so this does nothing to it.
    pub fn advance(&self, by: Duration) {
        if let Some(t) = &self.manual {
            let ms = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
            t.fetch_add(ms, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_advanced_and_its_copies_follow() {
        let clock = Clock::manual(1_000);
        let copy = clock.clone();
        assert_eq!(clock.now_ms(), 1_000);
        clock.advance(Duration::from_millis(2_500));
        assert_eq!(copy.now_ms(), 3_500);
        assert_eq!(copy.now(), 3.5);
        assert!(Clock::system().now_ms() > 1_700_000_000_000);
    }
}
