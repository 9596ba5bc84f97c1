//! The wall clock, injected. Everything that reads "now" — grant expiry and live checks, the time
//! a decision is made or a signal received, the `iat` of emitted SETs, key rotation, the outbox's
//! ages and dead letters, a transmitter's verification deadline — reads it from the one [`Clock`]
//! `Vigil::start_with_clock` hands out, and every wait whose length is a policy (a push retry's
//! backoff, a `Retry-After`) sleeps on it. So a test moves time forward instead of sleeping
//! through it: production uses [`Clock::system`]; a test makes a [`Clock::manual`] and
//! [`Clock::advance`]s it. (Intervals that only pace work — batching, sweeps, re-reads — run on
//! tokio's or the OS's monotonic clocks, and latency histograms measure real elapsed time.)

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

/// Where "now" comes from.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    /// A test's clock, in milliseconds since the Unix epoch (its sleepers watch it); `None`: the
    /// system's.
    manual: Option<Arc<watch::Sender<i64>>>,
}

impl Clock {
    /// The system's wall clock.
    pub fn system() -> Clock {
        Clock { manual: None }
    }

    /// A clock that stands at `start_ms` (milliseconds since the Unix epoch) until advanced.
    pub fn manual(start_ms: i64) -> Clock {
        Clock {
            manual: Some(Arc::new(watch::Sender::new(start_ms))),
        }
    }

    /// Milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> i64 {
        match &self.manual {
            Some(t) => *t.borrow(),
            None => crate::signal::now_ms(),
        }
    }

    /// Seconds since the Unix epoch.
    pub fn now(&self) -> f64 {
        self.now_ms() as f64 / 1000.0
    }

    /// "Now" as a [`SystemTime`](std::time::SystemTime) (for HTTP dates).
    pub fn system_time(&self) -> std::time::SystemTime {
        let ms = u64::try_from(self.now_ms()).unwrap_or(0);
        std::time::UNIX_EPOCH + Duration::from_millis(ms)
    }

    /// Moves a manual clock forward (every copy of it sees the new time, and wakes the sleepers
    /// whose time has come); the system clock moves by itself, so this does nothing to it.
    pub fn advance(&self, by: Duration) {
        if let Some(t) = &self.manual {
            let ms = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
            t.send_modify(|now| *now = now.saturating_add(ms));
        }
    }

    /// How many [`Clock::sleep`]s wait on a manual clock (zero for the system's): a test waits for
    /// the sleeper it means to wake before it advances the clock, or the sleep would start from
    /// the advanced time.
    pub fn sleepers(&self) -> usize {
        self.manual.as_ref().map_or(0, |t| t.receiver_count())
    }

    /// Waits `d` by this clock: tokio's timer for the system clock; for a manual one, until it
    /// has been advanced by `d` (however long that takes in real time).
    pub async fn sleep(&self, d: Duration) {
        let Some(t) = &self.manual else {
            return tokio::time::sleep(d).await;
        };
        let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        // The deadline is read before this sleeper counts in `sleepers`: a test that advances
        // once it sees the sleeper cannot move the start of the wait.
        let deadline = t.borrow().saturating_add(ms);
        let mut rx = t.subscribe();
        while *rx.borrow_and_update() < deadline {
            // The sender lives as long as this clock (we hold it), so `changed` cannot fail.
            if rx.changed().await.is_err() {
                return;
            }
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

    /// A sleep on a manual clock ends when the clock has moved far enough, in as many steps as it
    /// takes, and not before — however long it waits in real time.
    #[tokio::test]
    async fn a_sleep_on_a_manual_clock_ends_when_the_clock_passes_its_deadline() {
        let clock = Clock::manual(0);
        let sleeper = tokio::spawn({
            let clock = clock.clone();
            async move { clock.sleep(Duration::from_secs(30)).await }
        });
        while clock.sleepers() == 0 {
            tokio::task::yield_now().await;
        }
        clock.advance(Duration::from_secs(20));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!sleeper.is_finished(), "woke 10 s early");
        clock.advance(Duration::from_secs(10));
        tokio::time::timeout(Duration::from_secs(5), sleeper)
            .await
            .expect("the sleep did not end when the clock passed its deadline")
            .unwrap();
    }
}
