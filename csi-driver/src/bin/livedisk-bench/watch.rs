//! Waiting on the API server by watching, not polling (scenario f): a watch's events kept as the
//! set of objects that exist now, and a wait until a predicate over that set holds.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::time::Duration;

use anyhow::{Result, bail};
use futures::TryStreamExt;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;

/// The objects a watch has shown to exist, by name. A (re)listing is buffered until it is
/// complete, so that an object deleted while the watch was down is not kept.
#[derive(Debug)]
pub struct Seen<K> {
    objects: BTreeMap<String, K>,
    listing: Option<BTreeMap<String, K>>,
    /// A first listing completed: before it, "no objects" means "not known yet".
    synced: bool,
}

impl<K> Default for Seen<K> {
    fn default() -> Self {
        Self {
            objects: BTreeMap::new(),
            listing: None,
            synced: false,
        }
    }
}

impl<K: Resource> Seen<K> {
    /// Takes one event; true once the set is complete (a first listing ended).
    pub fn apply(&mut self, event: watcher::Event<K>) -> bool {
        match event {
            watcher::Event::Init => self.listing = Some(BTreeMap::new()),
            watcher::Event::InitApply(o) => {
                let name = o.name_any();
                self.listing
                    .get_or_insert_with(BTreeMap::new)
                    .insert(name, o);
            }
            watcher::Event::InitDone => {
                self.objects = self.listing.take().unwrap_or_default();
                self.synced = true;
            }
            watcher::Event::Apply(o) => {
                self.objects.insert(o.name_any(), o);
            }
            watcher::Event::Delete(o) => {
                self.objects.remove(&o.name_any());
            }
        }
        self.synced
    }

    pub fn objects(&self) -> &BTreeMap<String, K> {
        &self.objects
    }
}

/// Watches `api` until `done` holds for the objects that exist, or fails after `timeout`. `done`
/// is asked after every event once the first listing is complete, and every second besides
/// (so that it can watch over something other than the objects, a process say, when no event
/// comes); it may fail the wait itself (an object that ended in failure, say). Transient watch
/// errors are retried with backoff.
pub async fn until<K>(
    api: Api<K>,
    timeout: Duration,
    what: &str,
    mut done: impl FnMut(&BTreeMap<String, K>) -> Result<bool>,
) -> Result<()>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let stream = watcher(api, watcher::Config::default()).default_backoff();
    futures::pin_mut!(stream);
    let mut seen = Seen::default();
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            event = stream.try_next() => {
                match event {
                    Ok(Some(event)) => {
                        if seen.apply(event) && done(seen.objects())? {
                            return Ok(());
                        }
                    }
                    Ok(None) => bail!("the watch for {what} ended"),
                    // The backoff retries it: only said.
                    Err(e) => eprintln!("bench: watch for {what}: {e} (retrying)"),
                }
            }
            _ = tick.tick() => {
                if seen.synced && done(seen.objects())? {
                    return Ok(());
                }
            }
            _ = &mut deadline => {
                bail!("timed out after {} s waiting for {what}", timeout.as_secs())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;

    fn cm(name: &str) -> ConfigMap {
        let mut c = ConfigMap::default();
        c.metadata.name = Some(name.into());
        c
    }

    fn names(s: &Seen<ConfigMap>) -> Vec<&str> {
        s.objects().keys().map(String::as_str).collect()
    }

    #[test]
    fn a_listing_replaces_what_was_seen_once_complete() {
        let mut s = Seen::default();
        assert!(!s.apply(watcher::Event::Init));
        assert!(!s.apply(watcher::Event::InitApply(cm("a"))));
        assert!(names(&s).is_empty(), "not complete yet");
        assert!(s.apply(watcher::Event::InitDone));
        assert_eq!(names(&s), ["a"]);
        assert!(s.apply(watcher::Event::Apply(cm("b"))));
        assert_eq!(names(&s), ["a", "b"]);
        assert!(s.apply(watcher::Event::Delete(cm("a"))));
        assert_eq!(names(&s), ["b"]);
        // The watch restarted: "b" went while it was down.
        s.apply(watcher::Event::Init);
        s.apply(watcher::Event::InitApply(cm("c")));
        assert_eq!(names(&s), ["b"]);
        assert!(s.apply(watcher::Event::InitDone));
        assert_eq!(names(&s), ["c"]);
    }
}
