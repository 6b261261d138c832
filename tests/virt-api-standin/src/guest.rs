//! The guests' side, played by the stand-in: which VMIs are frozen, their safety unfreeze timers,
//! and the VMI status that KubeVirt's virt-handler would report (`status.fsFreezeStatus`).
//!
//! What KubeVirt does, and this copies: a freeze of a guest that is already frozen succeeds and
//! changes nothing (virt-launcher checks the guest agent's status first), so the first freeze's
//! safety timer keeps running; a freeze with a timeout of N whole seconds (N != 0) thaws the guest
//! by itself after N seconds unless an unfreeze came first; an unfreeze cancels the timer and
//! thaws. The state is in memory: a restarted stand-in has forgotten frozen guests and their
//! timers (an unfreeze still clears the status).
//!
//! A VMI that names its guest's real qemu-guest-agent socket ([`AGENT_SOCKET_ANNOTATION`]) is
//! frozen for real: the stand-in asks that agent (`guest-fsfreeze-status`, `-freeze`, `-thaw`)
//! as virt-launcher does, and the call fails when the agent fails.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use serde_json::json;
use tokio::task::JoinHandle;

use crate::agent::{AgentError, GuestAgent};
use crate::record::{Call, Recorder};

/// Test knob: the unix socket of the guest's real qemu-guest-agent (the test VM's
/// `vm-run live --agent`, reachable from the stand-in's host). With it, freezes and unfreezes
/// reach the guest; without it, only the VMI's status is kept.
pub const AGENT_SOCKET_ANNOTATION: &str = "livedisk.io/standin-guest-agent-socket";

/// Why a freeze or an unfreeze failed.
#[derive(Debug)]
pub enum GuestError {
    /// Writing the VMI's status.
    Api(kube::Error),
    /// The guest agent.
    Agent(AgentError),
}

impl From<kube::Error> for GuestError {
    fn from(error: kube::Error) -> Self {
        GuestError::Api(error)
    }
}

/// The value KubeVirt writes to `status.fsFreezeStatus` of a frozen guest (absent when thawed).
pub const FROZEN: &str = "frozen";

struct Frozen {
    generation: u64,
    timer: Option<JoinHandle<()>>,
    agent: Option<PathBuf>,
}

pub struct Guests {
    client: kube::Client,
    resource: ApiResource,
    recorder: Arc<Recorder>,
    /// By VMI uid (a VMI deleted and made again under its name is another guest).
    frozen: tokio::sync::Mutex<HashMap<String, Frozen>>,
    generation: AtomicU64,
}

/// What a freeze did.
#[derive(Debug, PartialEq, Eq)]
pub enum Froze {
    /// Frozen now; with a real agent, how many filesystems it froze.
    Now(Option<u64>),
    /// It was frozen already: nothing changed, the first freeze's timer still runs.
    AlreadyFrozen,
}

/// The VMI facts the handlers need.
pub struct Vmi {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub phase: Option<String>,
    pub annotations: std::collections::BTreeMap<String, String>,
}

impl Vmi {
    /// The guest's real agent, when the VMI names one.
    fn agent(&self) -> Option<PathBuf> {
        self.annotations
            .get(AGENT_SOCKET_ANNOTATION)
            .map(|p| PathBuf::from(p.trim()))
            .filter(|p| !p.as_os_str().is_empty())
    }

    fn from_object(object: DynamicObject, namespace: &str) -> Self {
        let phase = object
            .data
            .pointer("/status/phase")
            .and_then(|p| p.as_str())
            .map(str::to_string);
        Self {
            namespace: namespace.to_string(),
            name: object.metadata.name.unwrap_or_default(),
            uid: object.metadata.uid.unwrap_or_default(),
            phase,
            annotations: object.metadata.annotations.unwrap_or_default(),
        }
    }
}

impl Guests {
    pub fn new(client: kube::Client, recorder: Arc<Recorder>) -> Arc<Self> {
        let gvk = GroupVersionKind::gvk("kubevirt.io", "v1", "VirtualMachineInstance");
        Arc::new(Self {
            client,
            resource: ApiResource::from_gvk_with_plural(&gvk, "virtualmachineinstances"),
            recorder,
            frozen: tokio::sync::Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
        })
    }

    fn api(&self, namespace: &str) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), namespace, &self.resource)
    }

    /// The VMI, or `None` when there is none of that name (or no VMI kind at all).
    pub async fn get(&self, namespace: &str, name: &str) -> Result<Option<Vmi>, kube::Error> {
        Ok(self
            .api(namespace)
            .get_opt(name)
            .await?
            .map(|o| Vmi::from_object(o, namespace)))
    }

    /// Freezes the guest and reports it frozen on the VMI; with `seconds` != 0, thaws it by
    /// itself after that long (negative: at once, as Go's timer does) unless unfrozen first.
    pub async fn freeze(
        self: &Arc<Self>,
        vmi: &Vmi,
        seconds: i64,
        unfreeze_timeout: &str,
    ) -> Result<Froze, GuestError> {
        let mut frozen = self.frozen.lock().await;
        if frozen.contains_key(&vmi.uid) {
            return Ok(Froze::AlreadyFrozen);
        }
        let agent = vmi.agent();
        let mut count = None;
        if let Some(socket) = &agent {
            let guest = GuestAgent::new(socket);
            // As virt-launcher: a guest frozen already (by an earlier stand-in, say) is left so.
            if guest.is_frozen().await.map_err(GuestError::Agent)? {
                return Ok(Froze::AlreadyFrozen);
            }
            count = Some(guest.freeze().await.map_err(GuestError::Agent)?);
        }
        if let Err(error) = self.set_status(vmi, true).await {
            if let Some(socket) = &agent {
                // Nobody could tell it is frozen: thaw it rather than leave it so.
                let _ = GuestAgent::new(socket).thaw().await;
            }
            return Err(error.into());
        }
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        let timer = (seconds != 0).then(|| {
            let guests = Arc::clone(self);
            let (namespace, name, uid) = (vmi.namespace.clone(), vmi.name.clone(), vmi.uid.clone());
            let unfreeze_timeout = unfreeze_timeout.to_string();
            let wait = Duration::from_secs(seconds.max(0) as u64);
            tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                guests
                    .safety_unfreeze(namespace, name, uid, generation, unfreeze_timeout)
                    .await;
            })
        });
        frozen.insert(
            vmi.uid.clone(),
            Frozen {
                generation,
                timer,
                agent,
            },
        );
        Ok(Froze::Now(count))
    }

    /// Thaws the guest (cancelling its safety timer) and clears the VMI's freeze status. Returns
    /// whether it was frozen, and with a real agent how many filesystems it thawed (it is asked
    /// even when this stand-in did not freeze the guest: it may have been restarted).
    pub async fn unfreeze(&self, vmi: &Vmi) -> Result<(bool, Option<u64>), GuestError> {
        let mut frozen = self.frozen.lock().await;
        let mut thawed = None;
        if let Some(socket) = vmi.agent() {
            thawed = Some(
                GuestAgent::new(&socket)
                    .thaw()
                    .await
                    .map_err(GuestError::Agent)?,
            );
        }
        let was = frozen.remove(&vmi.uid);
        if let Some(timer) = was.as_ref().and_then(|f| f.timer.as_ref()) {
            timer.abort();
        }
        if let Err(error) = self.set_status(vmi, false).await {
            // Still frozen as far as anyone can tell: keep it so (without a timer if it had one
            // aborted; a later unfreeze thaws it).
            if let Some(entry) = was {
                frozen.insert(
                    vmi.uid.clone(),
                    Frozen {
                        generation: entry.generation,
                        timer: None,
                        agent: entry.agent,
                    },
                );
            }
            return Err(error.into());
        }
        Ok((was.is_some(), thawed))
    }

    async fn safety_unfreeze(
        &self,
        namespace: String,
        name: String,
        uid: String,
        generation: u64,
        unfreeze_timeout: String,
    ) {
        let mut frozen = self.frozen.lock().await;
        let agent = match frozen.get(&uid) {
            Some(entry) if entry.generation == generation => {
                frozen.remove(&uid).and_then(|entry| entry.agent)
            }
            _ => return,
        };
        let thawed = match &agent {
            Some(socket) => match GuestAgent::new(socket).thaw().await {
                Ok(n) => format!(" (the guest agent thawed {n} filesystems)"),
                Err(error) => format!(" ({error})"),
            },
            None => String::new(),
        };
        let vmi = Vmi {
            namespace: namespace.clone(),
            name: name.clone(),
            uid,
            phase: None,
            annotations: Default::default(),
        };
        let message = match self.set_status(&vmi, false).await {
            Ok(()) => format!(
                "unfreeze was not called within {unfreeze_timeout}: thawed by the safety timer{thawed}"
            ),
            Err(error) => format!(
                "thawed by the safety timer{thawed}; the VMI's status could not be cleared: {error}"
            ),
        };
        drop(frozen);
        tracing::warn!(%namespace, %name, "{message}");
        self.recorder.record(&Call {
            op: "auto-unfreeze",
            namespace,
            name,
            user: None,
            unfreeze_timeout: Some(unfreeze_timeout),
            code: None,
            message: Some(message),
        });
    }

    /// Writes (or removes) `status.fsFreezeStatus` as virt-handler reports it. KubeVirt's VMI
    /// kind has no status subresource (virt-handler writes the object), so the object is patched;
    /// where the kind was installed with one (the patch left status alone), the status
    /// subresource is patched instead. The VMI's uid is part of the patch: a VMI made again under
    /// the same name is never touched on behalf of the old one (the API server refuses it).
    async fn set_status(&self, vmi: &Vmi, frozen: bool) -> Result<(), kube::Error> {
        let value = if frozen { json!(FROZEN) } else { json!(null) };
        let patch = json!({
            "metadata": { "uid": vmi.uid },
            "status": { "fsFreezeStatus": value },
        });
        let api = self.api(&vmi.namespace);
        let params = PatchParams::default();
        let patched = api.patch(&vmi.name, &params, &Patch::Merge(&patch)).await?;
        let now = patched.data.pointer("/status/fsFreezeStatus").cloned();
        if now.unwrap_or(json!(null)) != value {
            api.patch_status(&vmi.name, &params, &Patch::Merge(&patch))
                .await?;
        }
        Ok(())
    }
}
