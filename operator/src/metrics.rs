//! The operator's metrics: reconciles by kind, failed reconciles by kind and reason (the error's
//! code, the same reason its Warning Event carries), and how long reconciles take.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::error::Error;

/// Reconcile latency buckets, in seconds: a pass answered from caches takes milliseconds; one
/// that applies objects and writes status, a few API round trips.
const DURATION_BUCKETS: [f64; 10] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    /// The livedisk kind reconciled (`DiskSnapshot`, ...).
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    kind: String,
    /// The error's code as a CamelCase reason (`Unavailable`, `PermissionDenied`, ...).
    reason: &'static str,
}

pub struct OperatorMetrics {
    reconciles: Family<KindLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    durations: Family<KindLabels, Histogram>,
}

impl OperatorMetrics {
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let metrics = Self {
            reconciles: Family::default(),
            errors: Family::default(),
            durations: Family::new_with_constructor(
                (|| Histogram::new(DURATION_BUCKETS)) as fn() -> Histogram,
            ),
        };
        registry.register(
            "livedisk_operator_reconciles",
            "Reconciles run, by kind (failed ones included)",
            metrics.reconciles.clone(),
        );
        registry.register(
            "livedisk_operator_reconcile_errors",
            "Reconciles that failed, by kind and reason",
            metrics.errors.clone(),
        );
        registry.register_with_unit(
            "livedisk_operator_reconcile_duration",
            "Time one reconcile took, by kind",
            Unit::Seconds,
            metrics.durations.clone(),
        );
        Arc::new(metrics)
    }

    /// Records one finished reconcile of `kind`.
    pub fn reconciled<T>(&self, kind: &str, result: &Result<T, Error>, took: Duration) {
        let labels = KindLabels { kind: kind.into() };
        self.reconciles.get_or_create(&labels).inc();
        self.durations
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
        if let Some(reason) = error_reason(result) {
            self.errors
                .get_or_create(&ErrorLabels {
                    kind: kind.into(),
                    reason,
                })
                .inc();
        }
    }
}

/// Pure: the reason label of a failed reconcile, `None` for a successful one.
pub fn error_reason<T>(result: &Result<T, Error>) -> Option<&'static str> {
    result.as_ref().err().map(|error| error.code().reason())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_labelled_with_their_code_reason() {
        assert_eq!(error_reason::<()>(&Ok(())), None);
        let unreadable = Error::InvalidObject("bad".into());
        assert_eq!(
            error_reason::<()>(&Err(unreadable)),
            Some("InvalidArgument")
        );
        let caches = Error::CacheSync("down".into());
        assert_eq!(error_reason::<()>(&Err(caches)), Some("Unavailable"));
    }

    #[test]
    fn every_reconcile_counts_and_failures_count_by_reason() {
        let mut registry = Registry::default();
        let metrics = OperatorMetrics::register(&mut registry);
        let took = Duration::from_millis(3);
        metrics.reconciled::<()>("DiskSnapshot", &Ok(()), took);
        metrics.reconciled::<()>("DiskSnapshot", &Err(Error::CacheSync("x".into())), took);
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &registry).unwrap();
        for line in [
            r#"livedisk_operator_reconciles_total{kind="DiskSnapshot"} 2"#,
            r#"livedisk_operator_reconcile_errors_total{kind="DiskSnapshot",reason="Unavailable"} 1"#,
            r#"livedisk_operator_reconcile_duration_seconds_count{kind="DiskSnapshot"} 2"#,
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
    }
}
