//! The client's part of a remote attachment: staging a volume that another node holds.
//!
//! The node plugin declares a `LivediskAttachment` pinning its own certificate (its export
//! front's, issued by the driver's export CA for client use too), waits for the owner to serve
//! it, and has its engine daemon open the owner's export over TLS NBD (`Engine::attach_remote`);
//! the consumer's front end and loop device then go over that as over a local volume. Unstaging
//! ends it in the reverse order.

use std::sync::Arc;
use std::time::Duration;

use kube::api::{DeleteParams, PostParams};
use kube::runtime::wait::{Condition, await_condition};
use kube::{Api, Client};
use livedisk_api::internal::{
    AttachmentPhase, LivediskAttachment, LivediskAttachmentSpec, LivediskVolume, attachment_name,
    restore_source_name,
};
use livedisk_engine::qcow2::remote::RemoteSource;
use livedisk_engine::{Engine, ExportInfo, SnapshotId, VolumeId};
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_rustls::rustls::pki_types::pem::PemObject;

use crate::export::Front;
use crate::export::grants::sha256_hex;
use crate::grpc::error::CsiError;
use crate::node::blocking::off_runtime;

/// How long staging waits for the owner to serve an attachment.
const SERVE_TIMEOUT: Duration = Duration::from_secs(60);

/// Where a volume this node was asked to stage lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    /// This node's engine holds it.
    Local,
    /// `owner` holds it; it is (or will be) attached over the network.
    Remote { owner: String, capacity: i64 },
}

pub struct RemoteAttacher {
    client: Client,
    node_name: String,
    engine: Arc<Engine>,
    front: Option<Arc<Front>>,
}

impl RemoteAttacher {
    pub fn new(
        client: Client,
        node_name: String,
        engine: Arc<Engine>,
        front: Option<Arc<Front>>,
    ) -> Self {
        Self {
            client,
            node_name,
            engine,
            front,
        }
    }

    fn attachments(&self) -> Api<LivediskAttachment> {
        Api::all(self.client.clone())
    }

    /// Where `volume` lives: this node's engine, or the node its inventory object names.
    /// NOT_FOUND when no node holds it.
    pub async fn placement(&self, volume: &VolumeId) -> Result<Placement, CsiError> {
        let (engine, id) = (self.engine.clone(), volume.clone());
        let local = off_runtime("reading the volume record", move || {
            Ok(engine.record(&id).is_ok())
        })
        .await?;
        if local {
            let (engine, id) = (self.engine.clone(), volume.clone());
            let incoming = off_runtime("reading the migration marker", move || {
                Ok(engine.is_incoming(&id)?)
            })
            .await?;
            if incoming {
                return Err(CsiError::Unavailable(format!(
                    "volume {volume} is being migrated to this node; it can be staged here once                      the migration's cutover is done"
                )));
            }
            return Ok(Placement::Local);
        }
        let inventory: Api<LivediskVolume> = Api::all(self.client.clone());
        match inventory.get_opt(volume.as_str()).await? {
            Some(v) if v.spec.node_name != self.node_name => Ok(Placement::Remote {
                owner: v.spec.node_name.clone(),
                capacity: v
                    .status
                    .as_ref()
                    .and_then(|s| s.capacity_bytes)
                    .unwrap_or(v.spec.capacity_bytes),
            }),
            // Declared for this node but not (or no longer) in its engine.
            _ => Err(CsiError::NotFound(format!(
                "volume {volume} does not exist"
            ))),
        }
    }

    /// Whether this node's engine attaches `volume` remotely now.
    pub async fn is_attached(&self, volume: &VolumeId) -> Result<bool, CsiError> {
        let (engine, id) = (self.engine.clone(), volume.clone());
        off_runtime("reading the remote attachment record", move || {
            Ok(engine.remote_record(&id)?.is_some())
        })
        .await
    }

    /// Attaches `volume`, held by `owner`, and returns the local export the front end opens.
    pub async fn attach(&self, volume: &VolumeId, owner: &str) -> Result<ExportInfo, CsiError> {
        let (front, identity) = self.identity(&format!(
            "volume {volume} is held by node {owner}; attaching it here"
        ))?;
        let name = attachment_name(volume.as_str(), &self.node_name);
        let spec = LivediskAttachmentSpec {
            node_name: owner.to_string(),
            client_node: self.node_name.clone(),
            volume_id: volume.to_string(),
            client_certificate_sha256: identity.leaf_sha256.clone(),
            snapshot_id: None,
        };
        // Already attached: the daemon keeps presenting the certificate it was attached with,
        // which the existing object pins (this plugin may have restarted with a new one).
        let attached = self.is_attached(volume).await?;
        let (host, port) = self
            .declare_and_wait(&name, spec, attached, &format!("volume {volume}"))
            .await?;
        let source = RemoteSource {
            host,
            port,
            export: volume.to_string(),
            ca_pem: identity.ca_pem,
            cert_pem: identity.leaf_pem,
            key_pem: front.key.key_pem().to_string(),
        };
        let info = self.engine.attach_remote(volume, &source).await?;
        tracing::info!(%volume, %owner, host = %source.host, "volume attached from its owner over TLS NBD");
        Ok(info)
    }

    /// Has `owner` serve `snapshot` (of its `volume`) to this node for the volume `restored`
    /// here from it (a cross-node restore), and returns where and how to read it. The
    /// declaration stays until [`RemoteAttacher::release_restore_source`].
    pub async fn restore_source(
        &self,
        restored: &VolumeId,
        owner: &str,
        volume: &VolumeId,
        snapshot: &SnapshotId,
    ) -> Result<RemoteSource, CsiError> {
        let (front, identity) = self.identity(&format!(
            "snapshot {snapshot} is held by node {owner}; restoring it here"
        ))?;
        let name = restore_source_name(restored.as_str(), &self.node_name);
        let spec = LivediskAttachmentSpec {
            node_name: owner.to_string(),
            client_node: self.node_name.clone(),
            volume_id: volume.to_string(),
            client_certificate_sha256: identity.leaf_sha256.clone(),
            snapshot_id: Some(snapshot.to_string()),
        };
        // A restore already made keeps the connection it was made with (and its certificate).
        let (engine, id) = (self.engine.clone(), restored.clone());
        let made = off_runtime("reading the volume record", move || {
            Ok(engine.record(&id).is_ok())
        })
        .await?;
        let (host, port) = self
            .declare_and_wait(&name, spec, made, &format!("snapshot {snapshot}"))
            .await?;
        Ok(RemoteSource {
            host,
            port,
            export: snapshot.to_string(),
            ca_pem: identity.ca_pem,
            cert_pem: identity.leaf_pem,
            key_pem: front.key.key_pem().to_string(),
        })
    }

    /// Withdraws the source of a volume restored from another node's snapshot: it stands alone
    /// (or is deleted). Idempotent.
    pub async fn release_restore_source(&self, restored: &VolumeId) -> Result<(), CsiError> {
        let name = restore_source_name(restored.as_str(), &self.node_name);
        match self
            .attachments()
            .delete(&name, &DeleteParams::default())
            .await
        {
            Ok(_) => {
                tracing::info!(volume = %restored, attachment = name, "restore source released");
                Ok(())
            }
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// This node's export front and the parts of its certificate chain a client identity needs;
    /// `why` says what needs them, for the error.
    fn identity(&self, why: &str) -> Result<(&Arc<Front>, ChainParts), CsiError> {
        let front = self.front.as_ref().ok_or_else(|| {
            CsiError::FailedPrecondition(format!(
                "{why} needs this node's export front (--export-listen; the chart's \
                 exports.enabled), whose certificate identifies this node"
            ))
        })?;
        let chain = front.tls.chain_pem().ok_or_else(|| {
            CsiError::Unavailable(format!(
                "{why} needs a certificate from the driver's export CA, which this node has not \
                 got yet (the operator signs it)"
            ))
        })?;
        Ok((front, ChainParts::of(&chain)?))
    }

    /// Declares `spec` as the LivediskAttachment `name` (replacing one left for another
    /// certificate or owner unless `in_use`) and waits for its owner to serve it; returns the
    /// address. `what` names the served thing in errors.
    async fn declare_and_wait(
        &self,
        name: &str,
        spec: LivediskAttachmentSpec,
        in_use: bool,
        what: &str,
    ) -> Result<(String, u16), CsiError> {
        let owner = spec.node_name.clone();
        let api = self.attachments();
        match api.get_opt(name).await? {
            Some(_) if in_use => {}
            Some(existing) if existing.spec == spec => {}
            Some(_) => {
                // Left by an attach that did not finish, for another certificate or owner.
                self.delete_and_wait(name).await?;
                self.create(&api, name, spec).await?;
            }
            None => self.create(&api, name, spec).await?,
        }
        let served =
            tokio::time::timeout(SERVE_TIMEOUT, await_condition(api.clone(), name, served()))
                .await
                .map_err(|_| {
                    CsiError::Unavailable(format!(
                        "node {owner} has not served {what} to this node within {SERVE_TIMEOUT:?} \
                 (LivediskAttachment {name})"
                    ))
                })?
                .map_err(|e| {
                    CsiError::Internal(format!("waiting for LivediskAttachment {name}: {e}"))
                })?;
        let status = served.and_then(|a| a.status).unwrap_or_default();
        if status.phase == AttachmentPhase::Failed {
            let error = status.error.unwrap_or(livedisk_api::internal::NodeError {
                code: livedisk_api::internal::ErrorCode::Internal,
                message: "failed without a reason".into(),
            });
            return Err(CsiError::Node(livedisk_api::internal::NodeError {
                code: error.code,
                message: format!("node {owner} cannot serve {what}: {}", error.message),
            }));
        }
        let (Some(host), Some(port)) = (status.host, status.port) else {
            return Err(CsiError::Internal(format!(
                "LivediskAttachment {name} is Ready without an address"
            )));
        };
        let port = u16::try_from(port)
            .map_err(|_| CsiError::Internal(format!("port {port} out of range")))?;
        Ok((host, port))
    }

    async fn create(
        &self,
        api: &Api<LivediskAttachment>,
        name: &str,
        spec: LivediskAttachmentSpec,
    ) -> Result<(), CsiError> {
        let mut object = LivediskAttachment::new(name, spec);
        object.metadata.labels = Some(
            [(
                livedisk_api::internal::attachment::LABEL_CLIENT_NODE.to_string(),
                self.node_name.clone(),
            )]
            .into(),
        );
        match api.create(&PostParams::default(), &object).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn delete_and_wait(&self, name: &str) -> Result<(), CsiError> {
        let api = self.attachments();
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        tokio::time::timeout(
            SERVE_TIMEOUT,
            await_condition(api, name, kube::runtime::conditions::is_deleted("")),
        )
        .await
        .map_err(|_| {
            CsiError::Unavailable(format!(
                "LivediskAttachment {name} is still being withdrawn by its owner"
            ))
        })?
        .map_err(|e| CsiError::Internal(format!("waiting for LivediskAttachment {name}: {e}")))?;
        Ok(())
    }

    /// Ends the remote attachment of `volume` here (the engine's NBD client and export), then
    /// withdraws the owner's admission. Idempotent.
    pub async fn detach(&self, volume: &VolumeId) -> Result<(), CsiError> {
        self.engine.detach_remote(volume).await?;
        let name = attachment_name(volume.as_str(), &self.node_name);
        match self
            .attachments()
            .delete(&name, &DeleteParams::default())
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

impl RemoteAttacher {
    /// After a migration brought `volume` to this node while a consumer here used it through a
    /// remote attachment, and the engine switched that consumer to the local volume
    /// (`Engine::localize_remote_attachment`): withdraws the old owner's admission, which ends
    /// what the old owner kept for it. Nothing while the engine still attaches the volume
    /// remotely. Idempotent.
    pub async fn forget_old_owner(&self, volume: &VolumeId) -> Result<(), CsiError> {
        if self.is_attached(volume).await? {
            return Ok(());
        }
        let name = attachment_name(volume.as_str(), &self.node_name);
        let api = self.attachments();
        match api.get_opt(&name).await? {
            Some(a)
                if a.spec.snapshot_id.is_none()
                    && a.spec.client_node == self.node_name
                    && a.spec.node_name != self.node_name
                    && a.metadata.deletion_timestamp.is_none() =>
            {
                match api.delete(&name, &DeleteParams::default()).await {
                    Ok(_) => {
                        tracing::info!(%volume, old_owner = %a.spec.node_name, "remote attachment to the old owner withdrawn");
                        Ok(())
                    }
                    Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
                    Err(e) => Err(e.into()),
                }
            }
            _ => Ok(()),
        }
    }
}

/// The owner answered: Ready or Failed.
fn served() -> impl Condition<LivediskAttachment> {
    |object: Option<&LivediskAttachment>| {
        object
            .and_then(|a| a.status.as_ref())
            .is_some_and(|s| matches!(s.phase, AttachmentPhase::Ready | AttachmentPhase::Failed))
    }
}

/// The parts of this node's issued chain a client identity needs.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ChainParts {
    pub(crate) leaf_pem: String,
    pub(crate) leaf_sha256: String,
    pub(crate) ca_pem: String,
}

impl ChainParts {
    /// Pure: splits `leaf, …, CA` (PEM) into the leaf and the CA, and digests the leaf's DER.
    pub(crate) fn of(chain_pem: &str) -> Result<Self, CsiError> {
        const END: &str = "-----END CERTIFICATE-----";
        let blocks: Vec<String> = chain_pem
            .split_inclusive(END)
            .map(str::trim)
            .filter(|b| b.ends_with(END))
            .map(|b| format!("{b}\n"))
            .collect();
        let unusable =
            |why: &str| CsiError::Internal(format!("this node's certificate chain {why}"));
        let (Some(leaf), Some(ca)) = (blocks.first(), blocks.last()) else {
            return Err(unusable("is empty"));
        };
        if blocks.len() < 2 {
            return Err(unusable("has no CA certificate after the leaf"));
        }
        let der = CertificateDer::from_pem_slice(leaf.as_bytes())
            .map_err(|e| unusable(&format!("has an unreadable leaf: {e}")))?;
        Ok(Self {
            leaf_sha256: sha256_hex(der.as_ref()),
            leaf_pem: leaf.clone(),
            ca_pem: ca.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(name: &str) -> String {
        let key = rcgen::KeyPair::generate().expect("key");
        rcgen::CertificateParams::new(vec![name.to_string()])
            .expect("params")
            .self_signed(&key)
            .expect("cert")
            .pem()
    }

    #[test]
    fn a_chain_splits_into_its_leaf_and_its_ca() {
        let (leaf, ca) = (cert("leaf"), cert("ca"));
        let parts = ChainParts::of(&format!("{leaf}{ca}")).expect("parts");
        assert_eq!(parts.leaf_pem.trim(), leaf.trim());
        assert_eq!(parts.ca_pem.trim(), ca.trim());
        let der = CertificateDer::from_pem_slice(leaf.as_bytes()).expect("der");
        assert_eq!(parts.leaf_sha256, sha256_hex(der.as_ref()));
    }

    #[test]
    fn a_chain_without_its_ca_is_refused() {
        assert!(ChainParts::of(&cert("leaf")).is_err());
        assert!(ChainParts::of("").is_err());
    }
}
