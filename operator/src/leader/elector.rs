//! The I/O shell of leader election: reads and writes the Lease, applies the pure decisions of
//! [`super::decide`], and keeps [`Leadership`] up to date.

use std::time::Instant;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, PostParams};
use livedisk_api::kube_error_message;

use super::Leadership;
use super::decide::{self, Observed, Step, Timing};

/// Which Lease, who this replica is, and the durations.
#[derive(Clone, Debug)]
pub struct Settings {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    pub timing: Timing,
}

/// An attempt that reached no decision (it is retried; only the renew deadline ends leadership).
#[derive(Debug, thiserror::Error)]
pub enum AttemptError {
    #[error("reading Lease {lease}: {}", kube_error_message(cause))]
    Read { lease: String, cause: kube::Error },
    #[error("writing Lease {lease}: {}", kube_error_message(cause))]
    Write { lease: String, cause: kube::Error },
}

/// What one attempt found.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// This replica holds the Lease: it just created, took over or renewed it.
    Holding,
    /// Another replica holds the Lease.
    HeldBy(String),
    /// Another writer changed the Lease between the read and the write (409): read again.
    Conflict,
}

/// The end of leadership, returned by [`Elector::keep`] (which has logged why).
#[derive(Debug)]
pub struct Lost;

/// Campaigns for the Lease, renews it while held, and releases it on a clean shutdown.
pub struct Elector {
    api: Api<Lease>,
    settings: Settings,
    leadership: Leadership,
    observed: Option<Observed>,
    resource_version: Option<String>,
    /// The other holder last logged, so that each change of holder is logged once.
    logged_holder: Option<String>,
}

impl Elector {
    /// An elector on the Lease of `settings`, through `client`, which must not be the fenced
    /// client of the controllers (the fence would refuse the very writes that win the Lease).
    pub fn new(client: Client, settings: Settings) -> Self {
        Self {
            api: Api::namespaced(client, &settings.namespace),
            leadership: Leadership::elected(settings.timing.renew_deadline),
            settings,
            observed: None,
            resource_version: None,
            logged_holder: None,
        }
    }

    /// The getter that tells whether this replica may act.
    pub fn leadership(&self) -> Leadership {
        self.leadership.clone()
    }

    fn lease(&self) -> String {
        format!("{}/{}", self.settings.namespace, self.settings.name)
    }

    /// Returns once this replica holds the Lease; until then tries every retry period.
    pub async fn acquire(&mut self) {
        tracing::info!(
            lease = %self.lease(),
            identity = %self.settings.identity,
            "campaigning for the lease; the controllers start once it is held"
        );
        loop {
            match self.attempt().await {
                Ok(Outcome::Holding) if self.leadership.is_leader() => {
                    let transitions = self
                        .observed
                        .as_ref()
                        .and_then(|o| o.record.lease_transitions)
                        .unwrap_or(0);
                    tracing::info!(
                        lease = %self.lease(),
                        identity = %self.settings.identity,
                        transitions,
                        "acquired the lease: this replica leads"
                    );
                    return;
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "could not acquire the lease; retrying"),
            }
            tokio::time::sleep(self.settings.timing.retry_period).await;
        }
    }

    /// Renews the Lease every retry period; returns when this replica no longer holds it: no
    /// renewal succeeded within the renew deadline, or the Lease names another holder. The
    /// caller must stop acting (the process exits); [`Leadership::is_leader`] is already false.
    pub async fn keep(&mut self) -> Lost {
        loop {
            tokio::time::sleep(self.settings.timing.retry_period).await;
            // After a pause (SIGSTOP) the deadline may have passed while this task slept: decide
            // before sending anything.
            let Some(left) = self.leadership.remaining(Instant::now()) else {
                return self.lost("no renewal succeeded within the renew deadline");
            };
            match tokio::time::timeout(left, self.attempt()).await {
                Ok(Ok(Outcome::Holding)) => {
                    tracing::debug!(lease = %self.lease(), "renewed the lease");
                }
                Ok(Ok(Outcome::HeldBy(holder))) => {
                    self.leadership.resign();
                    return self.lost(&format!("the lease is now held by {holder}"));
                }
                Ok(Ok(Outcome::Conflict)) => {
                    tracing::warn!(lease = %self.lease(), "the lease changed under the renewal; reading it again");
                }
                Ok(Err(error)) => tracing::warn!(%error, "could not renew the lease"),
                Err(_) => {
                    tracing::warn!(lease = %self.lease(), "the renewal got no answer before the renew deadline")
                }
            }
            if !self.leadership.is_leader() {
                return self.lost("no renewal succeeded within the renew deadline");
            }
        }
    }

    fn lost(&self, reason: &str) -> Lost {
        tracing::error!(
            lease = %self.lease(),
            identity = %self.settings.identity,
            reason,
            "lost the lease: this replica stops acting"
        );
        Lost
    }

    /// Gives the Lease up, if this replica still holds it, so that a standby takes over at its
    /// next attempt rather than after the whole lease duration. Stops acting first. Bounded by
    /// the renew deadline; a failure only costs the standby that wait.
    pub async fn release(&mut self) {
        if !self.leadership.is_leader() {
            return;
        }
        self.leadership.resign();
        let deadline = self.settings.timing.renew_deadline;
        match tokio::time::timeout(deadline, self.write_release()).await {
            Ok(Ok(true)) => {
                tracing::info!(lease = %self.lease(), identity = %self.settings.identity, "released the lease")
            }
            Ok(Ok(false)) => {
                tracing::info!(lease = %self.lease(), "the lease has another holder already; nothing to release")
            }
            Ok(Err(error)) => {
                tracing::warn!(%error, "could not release the lease; a standby takes over once it expires")
            }
            Err(_) => {
                tracing::warn!(lease = %self.lease(), "releasing the lease got no answer; a standby takes over once it expires")
            }
        }
    }

    /// Writes the released record over the current one, only if that one is still ours.
    async fn write_release(&self) -> Result<bool, AttemptError> {
        let current = self
            .api
            .get_opt(&self.settings.name)
            .await
            .map_err(|cause| self.read_error(cause))?;
        let Some(current) = current else {
            return Ok(false);
        };
        let record = current.spec.unwrap_or_default();
        if decide::holder(&record) != Some(self.settings.identity.as_str()) {
            return Ok(false);
        }
        let released = decide::released(&record, Timestamp::now());
        let object = self.lease_object(released, current.metadata.resource_version);
        match self
            .api
            .replace(&self.settings.name, &PostParams::default(), &object)
            .await
        {
            Ok(_) => Ok(true),
            Err(cause) if is_conflict(&cause) => Ok(false),
            Err(cause) => Err(self.write_error(cause)),
        }
    }

    /// One try to acquire or renew (client-go's tryAcquireOrRenew): read the Lease, decide, and
    /// write with the resourceVersion read.
    async fn attempt(&mut self) -> Result<Outcome, AttemptError> {
        // The renewal counts from before its first request: any other replica can only have seen
        // it later, so the renew deadline runs out here first.
        let started = Instant::now();
        let current = self
            .api
            .get_opt(&self.settings.name)
            .await
            .map_err(|cause| self.read_error(cause))?;
        let read_at = Instant::now();
        match current {
            Some(lease) => {
                let record = lease.spec.unwrap_or_default();
                self.log_holder(decide::holder(&record));
                self.observed = Some(decide::observe(self.observed.take(), &record, read_at));
                self.resource_version = lease.metadata.resource_version;
            }
            None => {
                self.observed = None;
                self.resource_version = None;
            }
        }
        let step = decide::next_step(
            &self.settings.identity,
            self.observed.as_ref(),
            read_at,
            Timestamp::now(),
            &self.settings.timing,
        );
        let written = match step {
            Step::Wait { holder } => return Ok(Outcome::HeldBy(holder)),
            Step::Create(record) => {
                let object = self.lease_object(record, None);
                self.api.create(&PostParams::default(), &object).await
            }
            Step::Write(record) => {
                let object = self.lease_object(record, self.resource_version.clone());
                self.api
                    .replace(&self.settings.name, &PostParams::default(), &object)
                    .await
            }
        };
        match written {
            Ok(lease) => {
                let record = lease.spec.unwrap_or_default();
                self.observed = Some(decide::observe(None, &record, Instant::now()));
                self.resource_version = lease.metadata.resource_version;
                self.leadership.renewed(started);
                Ok(Outcome::Holding)
            }
            Err(cause) if is_conflict(&cause) => Ok(Outcome::Conflict),
            Err(cause) => Err(self.write_error(cause)),
        }
    }

    /// Logs a change of the other holder once ("observed leader").
    fn log_holder(&mut self, holder: Option<&str>) {
        let other = holder.filter(|h| *h != self.settings.identity);
        if other == self.logged_holder.as_deref() {
            return;
        }
        self.logged_holder = other.map(str::to_string);
        match other {
            Some(holder) => {
                tracing::info!(lease = %self.lease(), %holder, "observed the lease held by another replica")
            }
            None => {
                tracing::info!(lease = %self.lease(), "observed the lease free or held by this replica")
            }
        }
    }

    fn lease_object(&self, record: LeaseSpec, resource_version: Option<String>) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some(self.settings.name.clone()),
                namespace: Some(self.settings.namespace.clone()),
                resource_version,
                ..Default::default()
            },
            spec: Some(record),
        }
    }

    fn read_error(&self, cause: kube::Error) -> AttemptError {
        AttemptError::Read {
            lease: self.lease(),
            cause,
        }
    }

    fn write_error(&self, cause: kube::Error) -> AttemptError {
        AttemptError::Write {
            lease: self.lease(),
            cause,
        }
    }
}

/// Pure: is this the API server's 409 (AlreadyExists on a create, Conflict on a guarded replace):
/// another writer won this round?
fn is_conflict(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 409)
}
