//! Status building blocks shared by every kind.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Where an object is in its life. Every kind uses a subset; each kind's documentation says which.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
pub enum Phase {
    /// Accepted, nothing done yet (for example waiting for the CSI driver or a node).
    #[default]
    Pending,
    /// The work is being done; `progress` says how far it is.
    Running,
    /// The result exists and can be used (a snapshot is ready, an export is serving).
    Ready,
    /// The work finished successfully and will not run again.
    Completed,
    /// The work stopped because of an error; the `Stalled` condition says why.
    Failed,
    /// The work was cancelled on request; nothing half-done remains.
    Cancelled,
    /// The object is being deleted and its storage released.
    Deleting,
}

/// How far a long operation has come.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    /// Bytes processed so far.
    #[schemars(range(min = 0))]
    pub bytes_done: i64,
    /// Bytes to process in total; may grow while a consumer keeps writing.
    #[schemars(range(min = 0))]
    pub bytes_total: i64,
    /// Recent throughput in bytes per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub bytes_per_second: Option<i64>,
    /// Whole percent done, for printer columns (0-100).
    #[schemars(range(min = 0, max = 100))]
    pub percent: i32,
}

impl Progress {
    /// Progress from two byte counts; the percentage is rounded down and never exceeds 100.
    pub fn new(bytes_done: i64, bytes_total: i64, bytes_per_second: Option<i64>) -> Self {
        let percent = if bytes_total <= 0 {
            0
        } else {
            ((bytes_done.clamp(0, bytes_total) as i128 * 100) / bytes_total as i128) as i32
        };
        Self {
            bytes_done,
            bytes_total,
            bytes_per_second,
            percent,
        }
    }

    /// The same progress at its end: everything done (100 %), also when there was nothing to do
    /// (a merge over empty layers copies 0 of 0 bytes and is still complete).
    pub fn finished(self) -> Self {
        let total = self.bytes_total.max(self.bytes_done);
        Self {
            bytes_done: total,
            bytes_total: total,
            percent: 100,
            ..self
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_finished_progress_is_whole_even_with_nothing_to_do() {
        let nothing = Progress::new(0, 0, Some(0)).finished();
        assert_eq!(
            (nothing.bytes_done, nothing.bytes_total, nothing.percent),
            (0, 0, 100)
        );
        let some = Progress::new(7, 10, None).finished();
        assert_eq!(
            (some.bytes_done, some.bytes_total, some.percent),
            (10, 10, 100)
        );
    }

    #[test]
    fn percent_is_bounded_and_rounded_down() {
        assert_eq!(Progress::new(0, 0, None).percent, 0);
        assert_eq!(Progress::new(1, 3, None).percent, 33);
        assert_eq!(Progress::new(5, 3, None).percent, 100);
        assert_eq!(Progress::new(i64::MAX - 1, i64::MAX, None).percent, 99);
    }
}
