//! Issues each node front's server certificate: a node plugin publishes a certificate request in
//! its LivediskNode (`status.exportFront`), this signs it with the export CA and writes the chain
//! back beside it. A request not yet signed, or signed by a CA that is no longer current (a
//! rotation), is signed (again).

use std::sync::Arc;

use futures::StreamExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use livedisk_api::internal::{ExportFront, LivediskNode};

use super::ca::CaStore;
use super::credentials::sha256_hex;
use crate::leader::Leadership;

/// The field manager of the operator's part of a LivediskNode's status.
const FIELD_MANAGER: &str = "livedisk-operator-export-ca";

/// Pure: whether a front's certificate must be (re)issued, given the current CA certificate.
pub fn needs_signing(front: &ExportFront, ca_pem: &str) -> bool {
    let Some(request) = &front.certificate_request else {
        return false;
    };
    let signed_this =
        front.signed_request_sha256.as_deref() == Some(sha256_hex(request.as_bytes()).as_str());
    let by_current_ca = front
        .certificate
        .as_deref()
        .is_some_and(|c| c.ends_with(ca_pem));
    !(signed_this && by_current_ca)
}

/// Follows every LivediskNode until shutdown.
pub async fn run(client: Client, ca: Arc<CaStore>, leadership: Leadership) {
    let api: Api<LivediskNode> = Api::all(client);
    let stream = watcher::watcher(api.clone(), watcher::Config::default());
    futures::pin_mut!(stream);
    while let Some(event) = stream.next().await {
        let node = match event {
            Ok(watcher::Event::Apply(n) | watcher::Event::InitApply(n)) => n,
            Ok(_) => continue,
            Err(error) => {
                tracing::warn!(%error, "export CA: watching LivediskNodes");
                continue;
            }
        };
        if !leadership.is_leader() {
            continue;
        }
        if let Err(error) = sign(&api, &ca, &node).await {
            tracing::warn!(node = %node.name_any(), error = %livedisk_common::error_chain(&error), "export CA: could not issue the front's certificate");
        }
    }
}

async fn sign(
    api: &Api<LivediskNode>,
    ca: &CaStore,
    node: &LivediskNode,
) -> Result<(), crate::error::Error> {
    let Some(front) = node.status.as_ref().and_then(|s| s.export_front.as_ref()) else {
        return Ok(());
    };
    let ca = ca.current().await?;
    if !needs_signing(front, &ca.cert_pem) {
        return Ok(());
    }
    let Some(request) = &front.certificate_request else {
        return Ok(());
    };
    let chain = ca.sign_front(request)?;
    let name = node.name_any();
    let patch = serde_json::json!({
        "apiVersion": "livedisk.io/v1alpha1",
        "kind": "LivediskNode",
        "metadata": {"name": name},
        "status": {"exportFront": {
            "certificate": chain,
            "signedRequestSha256": sha256_hex(request.as_bytes()),
        }},
    });
    api.patch_status(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(|cause| crate::error::Error::Apply {
        what: format!("LivediskNode {name} status (front certificate)"),
        cause,
    })?;
    tracing::info!(node = %name, "issued the export front's certificate");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_signed_once_per_request_and_ca() {
        let request = "REQ".to_string();
        let mut front = ExportFront {
            certificate_request: Some(request.clone()),
            ..Default::default()
        };
        assert!(needs_signing(&front, "CA1"));
        front.certificate = Some("LEAF CA1".into());
        front.signed_request_sha256 = Some(sha256_hex(request.as_bytes()));
        assert!(!needs_signing(&front, "CA1"));
        assert!(needs_signing(&front, "CA2"), "a rotated CA signs again");
        front.certificate_request = Some("NEW REQ".into());
        assert!(
            needs_signing(&front, "CA1"),
            "a restarted front's new request is signed"
        );
        assert!(!needs_signing(&ExportFront::default(), "CA1"));
    }
}
