//! Waiting on the node's answer in an internal CR's status.

use std::time::Duration;

use kube::Api;
use kube::api::Resource;
use serde::de::DeserializeOwned;

use crate::grpc::error::CsiError;

/// What a poll of the object concluded.
pub enum Poll<T> {
    /// The node finished; answer with this.
    Done(T),
    /// Not yet.
    Pending,
}

/// Polls `name` until `check` says done (or fails), the object disappears (`gone`), or `timeout`.
/// Polling (rather than a watch) keeps each call independent and cheap at CSI call rates.
pub async fn until<K, T>(
    api: &Api<K>,
    name: &str,
    timeout: Duration,
    gone: impl Fn() -> Result<T, CsiError>,
    mut check: impl FnMut(&K) -> Result<Poll<T>, CsiError>,
) -> Result<T, CsiError>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut interval = Duration::from_millis(50);
    loop {
        match api.get_opt(name).await? {
            None => return gone(),
            Some(object) => {
                if let Poll::Done(value) = check(&object)? {
                    return Ok(value);
                }
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(CsiError::Timeout(format!("{name} on its node")));
        }
        tokio::time::sleep(interval).await;
        interval = (interval * 2).min(Duration::from_millis(500));
    }
}
