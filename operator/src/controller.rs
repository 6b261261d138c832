//! Runs the controllers of every livedisk kind: DiskSnapshot (`crate::snapshot`), the kinds
//! that hand their work to nodes (`crate::node_work`: DiskMerge, DiskMigration, DiskExport,
//! DiskRestore) and DiskEvacuation (`crate::evacuation`), whose work is DiskMigrations.

use std::sync::Arc;

use kube::core::PartialObjectMeta;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;

use crate::error::Error;
use crate::export::Export;
use crate::leader::Leadership;
use crate::merge::Merge;
use crate::metrics::OperatorMetrics;
use crate::migration::Migration;
use crate::node_work::NodeWorkContext;
use crate::observe::Caches;
use crate::restore::Restore;

pub struct Context {
    pub(crate) client: Client,
    pub(crate) recorder: Recorder,
    pub(crate) caches: Caches,
    /// Checked before each reconcile: a replica that does not hold the Lease does nothing.
    pub(crate) leadership: Leadership,
    pub(crate) metrics: Arc<OperatorMetrics>,
}

/// Runs the controllers of all kinds until the process is stopped (SIGTERM or SIGINT). `ready`
/// is false while their reference caches sync.
pub async fn run_all(
    client: Client,
    reporter: Reporter,
    leadership: Leadership,
    metrics: Arc<OperatorMetrics>,
    ready: livedisk_telemetry::ReadyFlag,
    namespace: String,
) -> Result<(), Error> {
    ready.set(false);
    let caches = Caches::start(&client).await?;
    ready.set(true);
    let export_ca = Arc::new(crate::export::ca::CaStore::new(client.clone(), namespace));
    let node_work = || {
        Arc::new(NodeWorkContext {
            client: client.clone(),
            recorder: Recorder::new(client.clone(), reporter.clone()),
            leadership: leadership.clone(),
            metrics: metrics.clone(),
            export_ca: export_ca.clone(),
        })
    };
    let merges = node_work();
    let restores = node_work();
    let exports = node_work();
    let migrations = node_work();
    let evacuations = Arc::new(crate::evacuation::EvacuationContext {
        client: client.clone(),
        recorder: Recorder::new(client.clone(), reporter.clone()),
        leadership: leadership.clone(),
        metrics: metrics.clone(),
    });
    let signer = tokio::spawn(crate::export::signer::run(
        client.clone(),
        export_ca.clone(),
        leadership.clone(),
    ));
    // Lives as long as the controllers, which end on SIGTERM/SIGINT.
    let orphans = tokio::spawn(crate::orphans::run(client.clone(), leadership.clone()));
    let context = Arc::new(Context {
        recorder: Recorder::new(client.clone(), reporter),
        client: client.clone(),
        caches,
        leadership,
        metrics,
    });
    tokio::join!(
        crate::snapshot::run(context.clone()),
        crate::node_work::run::<Merge>(merges),
        crate::node_work::run::<Migration>(migrations),
        crate::node_work::run::<Export>(exports),
        crate::node_work::run::<Restore>(restores),
        crate::evacuation::run(evacuations),
    );
    orphans.abort();
    signer.abort();
    Ok(())
}

/// Objects of one kind reconciled at once: a pass is a few cache reads and at most a couple of
/// writes, and without a bound many objects created together would each hold a request (and its
/// buffers) in flight at the same moment.
pub(crate) const CONCURRENT_RECONCILES: u16 = 16;

/// A metadata-only watch of every `K`, as the stream of objects it touched.
pub(crate) fn metadata_watch<K>(
    client: &Client,
) -> impl futures::Stream<Item = Result<PartialObjectMeta<K>, watcher::Error>> + Send + 'static
where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    watcher(
        Api::<PartialObjectMeta<K>>::all(client.clone()),
        watcher::Config::default().any_semantic(),
    )
    .default_backoff()
    .touched_objects()
}

/// The Event note limit of the events.k8s.io API, in bytes.
const EVENT_NOTE_LIMIT: usize = 1024;

/// Pure: a note cut to the Event API's limit, at a character boundary.
pub(crate) fn event_note(message: &str) -> String {
    if message.len() <= EVENT_NOTE_LIMIT {
        return message.to_string();
    }
    let ellipsis = "…";
    let mut end = EVENT_NOTE_LIMIT - ellipsis.len();
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{ellipsis}", &message[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_notes_are_cut_to_the_event_limit() {
        assert_eq!(event_note("short"), "short");
        let long = "ä".repeat(EVENT_NOTE_LIMIT);
        let note = event_note(&long);
        assert!(note.len() <= EVENT_NOTE_LIMIT, "{}", note.len());
        assert!(note.ends_with('…'));
    }
}
