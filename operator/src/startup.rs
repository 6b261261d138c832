//! Start-up: the operator does nothing until the API server serves every livedisk CRD.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::runtime::wait::{await_condition, conditions::is_crd_established};
use kube::{Api, Client};

/// Waits until each public CRD is Established, or fails after `timeout` naming the missing ones.
pub async fn wait_for_crds(client: &Client, timeout: Duration) -> Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let names: Vec<String> = livedisk_api::public_crds()
        .into_iter()
        .filter_map(|crd| crd.metadata.name)
        .collect();
    tracing::info!(crds = ?names, "waiting for the livedisk CRDs to be established");
    let waits = names.iter().map(|name| {
        let api = api.clone();
        async move {
            let established = await_condition(api, name, is_crd_established());
            tokio::time::timeout(timeout, established)
                .await
                .map(|result| result.with_context(|| format!("watching CRD {name}")))
                .unwrap_or_else(|_| bail!("CRD {name} is not established (install it: make generate && kubectl apply -f crds/generated/)"))
        }
    });
    futures::future::try_join_all(waits).await?;
    tracing::info!("all livedisk CRDs are established");
    Ok(())
}
