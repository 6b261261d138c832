//! Helpers for the end-to-end tests, which run against the real local cluster that `make test`
//! (or `make up`) starts. Nothing here mocks the API server.

pub mod csi;
pub mod disks;
pub mod metrics;
pub mod operator;
pub mod phases;
pub mod vm;
pub mod vm_standin;

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use kube::discovery::pinned_kind;
use kube::{Client, ResourceExt};

/// A client for the local cluster, or a message that says how to start it.
pub async fn client() -> Result<Client> {
    if std::env::var_os("KUBECONFIG").is_none() {
        bail!(
            "KUBECONFIG is not set: start the local cluster with `make up` (or run `make test`), \
             then `source .livedisk/env`"
        );
    }
    let client = Client::try_default()
        .await
        .context("building a client from KUBECONFIG")?;
    client.apiserver_version().await.context(
        "the API server in KUBECONFIG does not answer; is the local cluster up (`make up`)?",
    )?;
    Ok(client)
}

/// Polls until `check` returns Some, or fails with `what` after `seconds`.
pub async fn eventually<T, F, Fut>(seconds: u64, what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(seconds);
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("timed out after {seconds}s waiting for {what}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
}

/// The extents a changed-block answer names for writes of the given 4 KiB blocks: the qcow2
/// clusters (64 KiB, the default) covering them, adjacent ones merged.
pub fn expected_extents(blocks: &[u64]) -> Vec<(u64, u64)> {
    const CLUSTER: u64 = 64 << 10;
    let mut clusters: Vec<u64> = blocks.iter().map(|b| b * 4096 / CLUSTER).collect();
    clusters.sort_unstable();
    clusters.dedup();
    let mut extents: Vec<(u64, u64)> = Vec::new();
    for cluster in clusters {
        match extents.last_mut() {
            Some((offset, length)) if *offset + *length == cluster * CLUSTER => *length += CLUSTER,
            _ => extents.push((cluster * CLUSTER, CLUSTER)),
        }
    }
    extents
}

/// The CSI volume handle of `claim`'s PV once the claim is bound, and the node its consumer pod
/// `pod_name` was scheduled to (WaitForFirstConsumer provisions on that node).
pub async fn bound_volume(
    client: &Client,
    namespace: &str,
    claim: &str,
    pod_name: &str,
) -> Result<(String, String)> {
    use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
    let volume_name = eventually(120, &format!("PVC {claim} to be bound"), || async {
        let object = claims.get(claim).await?;
        let bound = object.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
        Ok(object.spec.and_then(|s| s.volume_name).filter(|_| bound))
    })
    .await?;
    let pv: PersistentVolume = Api::all(client.clone()).get(&volume_name).await?;
    let handle = pv
        .spec
        .and_then(|s| s.csi)
        .map(|c| c.volume_handle)
        .context("PV has no CSI source")?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let node = eventually(60, &format!("pod {pod_name} to be scheduled"), || async {
        Ok(pods.get(pod_name).await?.spec.and_then(|s| s.node_name))
    })
    .await?;
    Ok((handle, node))
}

/// The workspace root (this crate lives in `<root>/tests/e2e`).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A namespace created for one test, with a unique name.
pub struct TestNamespace {
    pub name: String,
    client: Client,
}

impl TestNamespace {
    pub async fn create(client: &Client, prefix: &str) -> Result<Self> {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let name = format!("{prefix}-{}", &suffix[..8]);
        let api: Api<Namespace> = Api::all(client.clone());
        let namespace: Namespace = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": name }
        }))?;
        api.create(&PostParams::default(), &namespace)
            .await
            .context("creating namespace")?;
        Ok(Self {
            name,
            client: client.clone(),
        })
    }

    /// Deletes the namespace (the garbage collector removes what is in it). Its livedisk objects
    /// go first, with the operator's finalizers taken off: most tests stop their operator before
    /// they clean up, and an object left holding a finalizer would block the next test's CRD
    /// removal. (What they own goes with the namespace.)
    pub async fn delete(self) -> Result<()> {
        remove_livedisk_objects(&self.client, Some(&self.name)).await?;
        let api: Api<Namespace> = Api::all(self.client.clone());
        api.delete(&self.name, &DeleteParams::default()).await?;
        Ok(())
    }
}

/// Deletes the objects of every public livedisk kind in `namespace` (all namespaces and the
/// cluster-scoped kinds too: `None`) and takes the operator's finalizers off them, until none is
/// left: test cleanup, where the operator may be stopped (or a failed test left its objects). An
/// operator still running cannot put a finalizer back on an object being deleted.
pub async fn remove_livedisk_objects(client: &Client, namespace: Option<&str>) -> Result<()> {
    let unguarded = serde_json::json!({"metadata": {"finalizers": null}});
    let gone = |result: std::result::Result<(), kube::Error>| match result {
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        other => other,
    };
    for crd in livedisk_api::public_crds() {
        let version = crd
            .spec
            .versions
            .first()
            .map(|v| v.name.clone())
            .context("a CRD without versions")?;
        let gvk = GroupVersionKind::gvk(&crd.spec.group, &version, &crd.spec.names.kind);
        let resource = kube::core::ApiResource::from_gvk_with_plural(&gvk, &crd.spec.names.plural);
        let cluster_scoped = crd.spec.scope == "Cluster";
        // A namespace holds no object of a cluster-scoped kind (a DiskEvacuation).
        if cluster_scoped && namespace.is_some() {
            continue;
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let all: Api<DynamicObject> = match namespace {
                Some(namespace) => Api::namespaced_with(client.clone(), namespace, &resource),
                None => Api::all_with(client.clone(), &resource),
            };
            let left = all.list(&Default::default()).await?.items;
            if left.is_empty() {
                break;
            }
            for object in &left {
                let name = object.name_any();
                let api: Api<DynamicObject> = match object.namespace() {
                    Some(namespace) => Api::namespaced_with(client.clone(), &namespace, &resource),
                    None => Api::all_with(client.clone(), &resource),
                };
                if object.metadata.deletion_timestamp.is_none() {
                    gone(
                        api.delete(&name, &DeleteParams::background())
                            .await
                            .map(|_| ()),
                    )?;
                }
                if !object.finalizers().is_empty() {
                    gone(
                        api.patch(&name, &PatchParams::default(), &Patch::Merge(&unguarded))
                            .await
                            .map(|_| ()),
                    )?;
                }
            }
            if std::time::Instant::now() > deadline {
                bail!(
                    "{} {} objects were still there after 60 s of removing them",
                    left.len(),
                    crd.spec.names.kind
                );
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

/// Parses a multi-document YAML manifest into JSON objects.
pub fn parse_manifests(yaml: &str) -> Result<Vec<serde_json::Value>> {
    let documents: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(yaml).context("parsing YAML manifests")?;
    Ok(documents.into_iter().filter(|d| !d.is_null()).collect())
}

/// The API of the object's kind in `namespace`, found through discovery.
pub async fn api_for(
    client: &Client,
    namespace: &str,
    object: &serde_json::Value,
) -> Result<(Api<DynamicObject>, DynamicObject)> {
    let object: DynamicObject = serde_json::from_value(object.clone()).context("not an object")?;
    let types = object
        .types
        .clone()
        .context("object has no apiVersion/kind")?;
    let gvk = GroupVersionKind::try_from(&types)?;
    let (resource, capabilities) = pinned_kind(client, &gvk)
        .await
        .with_context(|| format!("discovering {}", types.kind))?;
    let api = match capabilities.scope {
        kube::discovery::Scope::Namespaced => {
            Api::namespaced_with(client.clone(), namespace, &resource)
        }
        kube::discovery::Scope::Cluster => Api::all_with(client.clone(), &resource),
    };
    Ok((api, object))
}

/// Server-side applies one object with strict field validation, as `kubectl apply
/// --server-side` would. Returns the API server's error unchanged so tests can read it.
pub async fn apply(
    client: &Client,
    namespace: &str,
    object: &serde_json::Value,
) -> Result<std::result::Result<DynamicObject, kube::Error>> {
    let (api, object) = api_for(client, namespace, object).await?;
    let params = PatchParams::apply("livedisk-e2e").validation_strict();
    Ok(api
        .patch(&object.name_any(), &params, &Patch::Apply(&object))
        .await)
}

/// The message of an API error (what `kubectl` would print).
pub fn error_message(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) => status.message.clone(),
        other => other.to_string(),
    }
}

/// Path of a binary built by this workspace, or an error that says how to build it.
pub fn workspace_binary(name: &str) -> Result<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let path = target.join("debug").join(name);
    if !path.exists() {
        bail!(
            "{} is missing: build it with `cargo build --workspace`",
            path.display()
        );
    }
    Ok(path)
}

/// The `kubectl` on PATH (the harness's build, via `.livedisk/env`), with a discovery cache of its
/// own: the shared one can predate CRDs installed moments ago, and categories such as `livedisk`
/// are resolved from it.
pub fn kubectl() -> std::process::Command {
    let cache = std::env::temp_dir().join(format!("livedisk-e2e-kubectl-{}", std::process::id()));
    let mut command = std::process::Command::new("kubectl");
    command.arg("--cache-dir").arg(cache);
    command
}

/// The test's own kubeconfig (from `KUBECONFIG`) with its user replaced by a bearer token: the
/// same API server, another identity.
pub fn kubeconfig_with_token(token: &str) -> Result<String> {
    let own = kube::config::Kubeconfig::read().context("reading KUBECONFIG")?;
    let cluster = own
        .clusters
        .first()
        .context("KUBECONFIG names no cluster")?;
    let config = serde_json::json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [cluster],
        "users": [{"name": "token", "user": {"token": token}}],
        "contexts": [{"name": "token", "context": {"cluster": cluster.name, "user": "token"}}],
        "current-context": "token",
    });
    Ok(serde_json::to_string_pretty(&config)?)
}

/// A token of a ServiceAccount from the TokenRequest API (an hour long, bound to nothing), as
/// kubelet would project one into a pod. Each token has its own credential id in the audit log.
pub async fn service_account_token(client: &Client, namespace: &str, name: &str) -> Result<String> {
    use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
    use k8s_openapi::api::core::v1::ServiceAccount;
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            expiration_seconds: Some(3600),
            ..Default::default()
        }),
        ..Default::default()
    };
    let answered = api
        .create_token_request(name, &kube::api::PostParams::default(), &request)
        .await
        .with_context(|| format!("TokenRequest for {namespace}/{name}"))?;
    answered
        .status
        .and_then(|s| s.token)
        .context("TokenRequest answered no token")
}
