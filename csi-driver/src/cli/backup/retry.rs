//! Retries of one request against a front that may be restarting: the node plugin that serves
//! the export can be killed and restarted, and its export comes back within seconds, so a
//! connection error or a 5xx is waited out (with backoff, for a bounded time) instead of
//! failing a backup that has read gigabytes.

use std::time::{Duration, Instant};

use super::error::BackupError;

const FIRST_WAIT: Duration = Duration::from_millis(250);
const LONGEST_WAIT: Duration = Duration::from_secs(5);

/// Pure: the wait before attempt `failures + 1`: doubling from 250 ms, at most 5 s.
pub fn backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    FIRST_WAIT
        .saturating_mul(1u32 << doublings)
        .min(LONGEST_WAIT)
}

/// Pure: how long to wait before the next attempt, or `None` when the budget is spent. The last
/// wait is cut so that the final attempt starts inside the budget.
pub fn next_wait(failing_for: Duration, failures: u32, budget: Duration) -> Option<Duration> {
    if failing_for >= budget {
        return None;
    }
    Some(backoff(failures).min(budget - failing_for))
}

/// The retry state of one request: when it started failing, how often, and why last.
pub struct Retry {
    url: String,
    what: String,
    budget: Duration,
    first_failure: Option<Instant>,
    failures: u32,
    last: String,
}

impl Retry {
    pub fn new(url: &str, what: impl Into<String>, budget: Duration) -> Self {
        Self {
            url: url.to_string(),
            what: what.into(),
            budget,
            first_failure: None,
            failures: 0,
            last: String::new(),
        }
    }

    /// Records a transient failure, says so on stderr the first time, and waits; an error once
    /// the budget is spent.
    pub async fn failed(&mut self, why: String) -> Result<(), BackupError> {
        let first = *self.first_failure.get_or_insert_with(Instant::now);
        self.failures += 1;
        if self.failures == 1 {
            eprintln!(
                "warning: {} of {} failed: {why}; retrying for up to {} s",
                self.what,
                self.url,
                self.budget.as_secs()
            );
        }
        self.last = why;
        match next_wait(first.elapsed(), self.failures, self.budget) {
            Some(wait) => {
                tokio::time::sleep(wait).await;
                Ok(())
            }
            None => Err(BackupError::Unavailable {
                url: self.url.clone(),
                what: self.what.clone(),
                seconds: first.elapsed().as_secs(),
                attempts: self.failures,
                last: std::mem::take(&mut self.last),
            }),
        }
    }

    /// Records the success that ends the retries; says on stderr that the backup resumed when
    /// it had failed before.
    pub fn succeeded(&self) {
        if let Some(first) = self.first_failure {
            eprintln!(
                "backup resumed: {} of {} succeeded after {} failed attempts over {:.1} s (last error: {})",
                self.what,
                self.url,
                self.failures,
                first.elapsed().as_secs_f64(),
                self.last
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_five_seconds() {
        let ms = |n| backoff(n).as_millis();
        assert_eq!(
            [ms(1), ms(2), ms(3), ms(4), ms(5), ms(6)],
            [250, 500, 1000, 2000, 4000, 5000]
        );
        assert_eq!(ms(1000), 5000);
    }

    #[test]
    fn the_budget_bounds_the_waits() {
        let budget = Duration::from_secs(120);
        assert_eq!(
            next_wait(Duration::ZERO, 1, budget),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            next_wait(Duration::from_secs(118), 9, budget),
            Some(Duration::from_secs(2))
        );
        assert_eq!(next_wait(Duration::from_secs(120), 9, budget), None);
        assert_eq!(next_wait(Duration::ZERO, 1, Duration::ZERO), None);
    }
}
