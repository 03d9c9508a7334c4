//! One outage of the source (or one run of transient local errors in the
//! apply) and its retries. Every outage gets a window of its own,
//! `cloudmig.source_retry_timeout` from its first failure, with a doubling
//! backoff (1 s up to 30 s) inside it. Whoever retries ends the outage
//! (drops its `Outage`) once work progressed again, so a source that
//! restarts once a day never exhausts a window taken weeks earlier.

use std::time::{Duration, Instant};

/// The longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

pub struct Outage {
    started: Instant,
    deadline: Instant,
    /// Retries so far.
    pub attempts: u32,
    backoff: Duration,
}

impl Outage {
    /// An outage that starts now, with the window of `cloudmig.source_retry_timeout`.
    pub fn begin() -> Self {
        Self::with_window(crate::guc::source_retry_timeout())
    }

    fn with_window(window: Duration) -> Self {
        let now = Instant::now();
        Outage {
            started: now,
            deadline: now + window,
            attempts: 0,
            backoff: Duration::from_secs(1),
        }
    }

    /// Counts one more retry and says how long to wait before it; None once
    /// the window is over (the caller gives up).
    pub fn next_attempt(&mut self) -> Option<Duration> {
        let now = Instant::now();
        if now >= self.deadline {
            return None;
        }
        self.attempts += 1;
        let wait = self.backoff.min(self.deadline - now);
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        Some(wait)
    }

    /// Seconds left before this outage's window closes.
    pub fn seconds_left(&self) -> f64 {
        self.deadline
            .saturating_duration_since(Instant::now())
            .as_secs_f64()
    }

    /// How long this outage has lasted.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// What a give-up adds to the error message.
    pub fn gave_up(&self) -> String {
        format!(
            "gave up after {} attempt(s) over {}s of this outage (cloudmig.source_retry_timeout = {}s)",
            self.attempts,
            self.elapsed().as_secs(),
            crate::guc::source_retry_timeout().as_secs()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_within_the_window_and_stops_at_its_end() {
        let mut outage = Outage::with_window(Duration::from_secs(3600));
        let waits: Vec<u64> = (0..7)
            .map(|_| outage.next_attempt().map(|w| w.as_secs()).unwrap_or(0))
            .collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(outage.attempts, 7);
        let mut over = Outage::with_window(Duration::ZERO);
        assert!(over.next_attempt().is_none());
    }
}
