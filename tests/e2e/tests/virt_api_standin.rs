//! The virt-api stand-in (`tests/virt-api-standin`, started by `hack/cluster.sh up`): KubeVirt's
//! freeze and unfreeze subresources, called through the real API server as the operator will
//! call them, with ServiceAccount tokens. The API server's aggregator authenticates the caller,
//! authorizes it with RBAC, and proxies to the stand-in with its front-proxy client certificate;
//! the stand-in authorizes again with a SubjectAccessReview (as virt-api does), answers as
//! virt-api does, reports the guest's state in the VMI's `status.fsFreezeStatus` and appends
//! every call to `$LIVEDISK_STATE_DIR/virt-api-standin/calls.jsonl`. Tests read only their own
//! namespace's lines of that record.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, ObjectMeta, Patch, PatchParams, PostParams,
};
use livedisk_e2e::{
    TestNamespace, client, eventually, kubeconfig_with_token, kubectl, service_account_token,
    workspace_root,
};
use serde_json::{Value, json};

const VMI_CRD: &str = "virtualmachineinstances.kubevirt.io";
const SUBRESOURCES: &str = "/apis/subresources.kubevirt.io/v1";

fn vmis() -> ApiResource {
    let gvk = GroupVersionKind::gvk("kubevirt.io", "v1", "VirtualMachineInstance");
    ApiResource::from_gvk_with_plural(&gvk, "virtualmachineinstances")
}

/// KubeVirt's VirtualMachineInstance kind. KubeVirt's own CRDs are to come with the cluster
/// setup; until they do, this test applies a minimal VMI CRD of its own when the cluster has
/// none (test setup only: the cluster setup installs no hand-written KubeVirt CRD). Like
/// KubeVirt's, it has no status subresource: virt-handler writes a VMI's status with the object.
async fn ensure_vmi_crd(admin: &Client) -> Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
    if crds.get_opt(VMI_CRD).await?.is_none() {
        let crd: CustomResourceDefinition = serde_json::from_value(json!({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": VMI_CRD},
            "spec": {
                "group": "kubevirt.io",
                "scope": "Namespaced",
                "names": {
                    "plural": "virtualmachineinstances",
                    "singular": "virtualmachineinstance",
                    "kind": "VirtualMachineInstance",
                    "shortNames": ["vmi", "vmis"],
                },
                "versions": [{
                    "name": "v1", "served": true, "storage": true,
                    "schema": {"openAPIV3Schema": {
                        "type": "object", "x-kubernetes-preserve-unknown-fields": true,
                    }},
                }],
            },
        }))?;
        crds.patch(
            VMI_CRD,
            &PatchParams::apply("livedisk-e2e-minimal-vmi-crd").force(),
            &Patch::Apply(&crd),
        )
        .await
        .context("applying the minimal VMI CRD")?;
    }
    eventually(60, "the VMI CRD to be Established", || async {
        let crd = crds.get(VMI_CRD).await?;
        let established = crd
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        Ok(established.then_some(()))
    })
    .await
}

/// The record file of the cluster's stand-in.
fn record_path() -> PathBuf {
    std::env::var_os("LIVEDISK_STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".livedisk"))
        .join("virt-api-standin/calls.jsonl")
}

fn pki(file: &str) -> PathBuf {
    std::env::var_os("LIVEDISK_STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".livedisk"))
        .join("pki")
        .join(file)
}

/// A namespace with two ServiceAccounts: `freezer`, whose Role allows the freeze and unfreeze
/// subresources, and `nobody`, with no RBAC at all; a client for each.
struct Fixture {
    admin: Client,
    ns: TestNamespace,
    freezer: Client,
    nobody: Client,
}

impl Fixture {
    async fn new(prefix: &str) -> Result<Self> {
        let admin = client().await?;
        ensure_vmi_crd(&admin).await?;
        let ns = TestNamespace::create(&admin, prefix).await?;
        let accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), &ns.name);
        for name in ["freezer", "nobody"] {
            let account = ServiceAccount {
                metadata: ObjectMeta {
                    name: Some(name.into()),
                    ..Default::default()
                },
                ..Default::default()
            };
            accounts.create(&PostParams::default(), &account).await?;
        }
        let role = Role {
            metadata: ObjectMeta {
                name: Some("vmi-freezer".into()),
                ..Default::default()
            },
            rules: Some(vec![PolicyRule {
                api_groups: Some(vec!["subresources.kubevirt.io".into()]),
                resources: Some(vec![
                    "virtualmachineinstances/freeze".into(),
                    "virtualmachineinstances/unfreeze".into(),
                ]),
                verbs: vec!["update".into()],
                ..Default::default()
            }]),
        };
        Api::<Role>::namespaced(admin.clone(), &ns.name)
            .create(&PostParams::default(), &role)
            .await?;
        let binding = RoleBinding {
            metadata: ObjectMeta {
                name: Some("vmi-freezer".into()),
                ..Default::default()
            },
            role_ref: RoleRef {
                api_group: Some("rbac.authorization.k8s.io".into()),
                kind: "Role".into(),
                name: "vmi-freezer".into(),
            },
            subjects: Some(vec![Subject {
                kind: "ServiceAccount".into(),
                name: "freezer".into(),
                namespace: Some(ns.name.clone()),
                ..Default::default()
            }]),
        };
        Api::<RoleBinding>::namespaced(admin.clone(), &ns.name)
            .create(&PostParams::default(), &binding)
            .await?;
        let freezer = token_client(&admin, &ns.name, "freezer").await?;
        let nobody = token_client(&admin, &ns.name, "nobody").await?;
        let fixture = Self {
            admin,
            ns,
            freezer,
            nobody,
        };
        // The RBAC authorizer reads from a cache: wait until it knows the binding.
        let user = fixture.user("freezer");
        eventually(30, "the freezer's RoleBinding to take effect", || async {
            Ok(fixture.may_freeze(&user).await?.then_some(()))
        })
        .await?;
        Ok(fixture)
    }

    fn user(&self, account: &str) -> String {
        format!("system:serviceaccount:{}:{account}", self.ns.name)
    }

    async fn may_freeze(&self, user: &str) -> Result<bool> {
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(user.to_string()),
                resource_attributes: Some(ResourceAttributes {
                    group: Some("subresources.kubevirt.io".into()),
                    resource: Some("virtualmachineinstances".into()),
                    subresource: Some("freeze".into()),
                    namespace: Some(self.ns.name.clone()),
                    verb: Some("update".into()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let answer = Api::<SubjectAccessReview>::all(self.admin.clone())
            .create(&PostParams::default(), &review)
            .await?;
        Ok(answer.status.map(|s| s.allowed).unwrap_or(false))
    }

    fn vmi_api(&self) -> Api<DynamicObject> {
        Api::namespaced_with(self.admin.clone(), &self.ns.name, &vmis())
    }

    /// A VMI in `phase` (as virt-controller and virt-handler would have set it), with
    /// `annotations`.
    async fn vmi(&self, name: &str, phase: &str, annotations: &[(&str, &str)]) -> Result<()> {
        let annotations: serde_json::Map<String, Value> = annotations
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        let object: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "kubevirt.io/v1",
            "kind": "VirtualMachineInstance",
            "metadata": {"name": name, "annotations": annotations},
            "spec": {"domain": {"devices": {}}},
            "status": {"phase": phase},
        }))?;
        let api = self.vmi_api();
        let made = api.create(&PostParams::default(), &object).await?;
        // A VMI kind with a status subresource drops the status on create.
        if made.data.pointer("/status/phase").is_none() {
            let patch = json!({"status": {"phase": phase}});
            api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
        }
        Ok(())
    }

    async fn freeze_status(&self, name: &str) -> Result<Option<String>> {
        let vmi = self.vmi_api().get(name).await?;
        Ok(vmi
            .data
            .pointer("/status/fsFreezeStatus")
            .and_then(|s| s.as_str())
            .map(str::to_string))
    }

    /// This namespace's lines of the record.
    fn records(&self) -> Result<Vec<Value>> {
        let path = record_path();
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading the stand-in's record {}", path.display()))?;
        let mut lines = Vec::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let value: Value =
                serde_json::from_str(line).with_context(|| format!("a record line: {line}"))?;
            if value["namespace"] == self.ns.name.as_str() {
                lines.push(value);
            }
        }
        Ok(lines)
    }

    /// Waits for this namespace's record to have `count` lines.
    async fn records_with(&self, count: usize) -> Result<Vec<Value>> {
        eventually(15, &format!("{count} record lines"), || async {
            let lines = self.records()?;
            Ok((lines.len() >= count).then_some(lines))
        })
        .await
    }
}

async fn token_client(admin: &Client, namespace: &str, account: &str) -> Result<Client> {
    let token = service_account_token(admin, namespace, account).await?;
    let kubeconfig = kube::config::Kubeconfig::from_yaml(&kubeconfig_with_token(&token)?)?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
    Ok(Client::try_from(config)?)
}

/// `PUT .../virtualmachineinstances/NAME/OP` through the API server, as KubeVirt's client does.
async fn put(
    client: &Client,
    namespace: &str,
    name: &str,
    op: &str,
    body: &str,
) -> std::result::Result<String, kube::Error> {
    let request = http::Request::put(format!(
        "{SUBRESOURCES}/namespaces/{namespace}/virtualmachineinstances/{name}/{op}"
    ))
    .header("Content-Type", "application/json")
    .body(body.as_bytes().to_vec())
    .map_err(kube::Error::HttpError)?;
    client.request_text(request).await
}

fn status_of(result: std::result::Result<String, kube::Error>) -> (u16, String) {
    match result {
        Ok(_) => (200, String::new()),
        Err(kube::Error::Api(status)) => (status.code, status.message),
        Err(other) => (0, other.to_string()),
    }
}

/// The fields a record line is checked by.
fn summary(line: &Value) -> (String, String, Value, Value) {
    (
        line["op"].as_str().unwrap_or_default().to_string(),
        line["name"].as_str().unwrap_or_default().to_string(),
        line["user"].clone(),
        line["code"].clone(),
    )
}

#[tokio::test]
async fn discovery_of_the_subresources_goes_through_the_api_server() -> Result<()> {
    let admin = client().await?;
    let output = kubectl().args(["get", "--raw", SUBRESOURCES]).output()?;
    assert!(
        output.status.success(),
        "kubectl get --raw {SUBRESOURCES}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let list: Value = serde_json::from_slice(&output.stdout)?;
    assert_eq!(list["kind"], "APIResourceList", "{list}");
    assert_eq!(list["groupVersion"], "subresources.kubevirt.io/v1");
    let names: Vec<&str> = list["resources"]
        .as_array()
        .context("no resources")?
        .iter()
        .filter_map(|r| r["name"].as_str())
        .collect();
    for name in [
        "virtualmachineinstances/freeze",
        "virtualmachineinstances/unfreeze",
    ] {
        assert!(names.contains(&name), "{name} not in {names:?}");
    }
    // Registered through an ExternalName Service, verified by its caBundle (not skipped).
    let apiservices = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("apiregistration.k8s.io", "v1", "APIService"),
        "apiservices",
    );
    let apiservice = Api::<DynamicObject>::all_with(admin.clone(), &apiservices)
        .get("v1.subresources.kubevirt.io")
        .await?;
    assert!(apiservice.data["spec"]["caBundle"].is_string());
    assert_ne!(apiservice.data["spec"]["insecureSkipTLSVerify"], true);
    let available = apiservice.data["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Available" && c["status"] == "True");
    assert!(available, "{}", apiservice.data["status"]);
    Ok(())
}

#[tokio::test]
async fn a_running_vmi_is_frozen_and_unfrozen_by_a_user_allowed_to() -> Result<()> {
    let f = Fixture::new("standin-freeze").await?;
    let ns = f.ns.name.clone();
    f.vmi("vm", "Running", &[]).await?;
    assert_eq!(f.freeze_status("vm").await?, None);

    put(
        &f.freezer,
        &ns,
        "vm",
        "freeze",
        r#"{"unfreezeTimeout":"5m0s"}"#,
    )
    .await?;
    assert_eq!(f.freeze_status("vm").await?.as_deref(), Some("frozen"));
    put(&f.freezer, &ns, "vm", "unfreeze", "").await?;
    assert_eq!(f.freeze_status("vm").await?, None);
    // Unfreezing a guest that is not frozen is no error.
    put(&f.freezer, &ns, "vm", "unfreeze", "").await?;

    let lines = f.records_with(3).await?;
    let user = json!(f.user("freezer"));
    assert_eq!(lines.len(), 3, "{lines:#?}");
    assert_eq!(
        summary(&lines[0]),
        ("freeze".into(), "vm".into(), user.clone(), json!(200))
    );
    assert_eq!(lines[0]["unfreezeTimeout"], "5m0s");
    assert_eq!(
        summary(&lines[1]),
        ("unfreeze".into(), "vm".into(), user.clone(), json!(200))
    );
    assert!(lines[1]["unfreezeTimeout"].is_null());
    assert_eq!(summary(&lines[2]).3, json!(200));
    assert_eq!(lines[2]["message"], "was not frozen");
    for line in &lines {
        let time = line["time"].as_str().context("no time")?;
        chrono::DateTime::parse_from_rfc3339(time).with_context(|| time.to_string())?;
        assert_eq!(time.len(), "2026-01-01T00:00:00.000Z".len(), "{time}");
    }
    f.ns.delete().await
}

#[tokio::test]
async fn refusals_answer_as_virt_api_does() -> Result<()> {
    let f = Fixture::new("standin-refuse").await?;
    let ns = f.ns.name.clone();
    f.vmi("scheduled", "Scheduled", &[]).await?;
    f.vmi("running", "Running", &[]).await?;
    let body = r#"{"unfreezeTimeout":"5m0s"}"#;

    // Not Running: 409, for both.
    let (code, message) = status_of(put(&f.freezer, &ns, "scheduled", "freeze", body).await);
    assert_eq!(code, 409, "{message}");
    assert!(message.contains("VM is not running"), "{message}");
    let (code, message) = status_of(put(&f.freezer, &ns, "scheduled", "unfreeze", "").await);
    assert_eq!(code, 409, "{message}");
    assert!(message.contains("VMI is not running"), "{message}");
    // No such VMI: 404.
    let (code, message) = status_of(put(&f.freezer, &ns, "missing", "freeze", body).await);
    assert_eq!(code, 404, "{message}");
    assert!(message.contains("\"missing\" not found"), "{message}");
    // No or no readable unfreezeTimeout: virt-handler's 400, which virt-api answers as 500.
    for bad in ["{}", r#"{"unfreezeTimeout":"soon"}"#] {
        let (code, message) = status_of(put(&f.freezer, &ns, "running", "freeze", bad).await);
        assert_eq!(code, 500, "{bad}: {message}");
        assert!(
            message.contains("unexpected return code 400"),
            "{bad}: {message}"
        );
    }
    assert_eq!(f.freeze_status("running").await?, None);
    // Without RBAC: the API server itself refuses (403); the stand-in never hears of it.
    let (code, message) = status_of(put(&f.nobody, &ns, "running", "freeze", body).await);
    assert_eq!(code, 403, "{message}");
    assert!(
        message.contains("cannot update resource \"virtualmachineinstances/freeze\""),
        "{message}"
    );
    let (code, _) = status_of(put(&f.nobody, &ns, "running", "unfreeze", "").await);
    assert_eq!(code, 403);
    assert_eq!(f.freeze_status("running").await?, None);

    let lines = f.records_with(5).await?;
    let freezer = json!(f.user("freezer"));
    let got: Vec<_> = lines.iter().map(summary).collect();
    assert_eq!(
        got,
        [
            (
                "freeze".into(),
                "scheduled".into(),
                freezer.clone(),
                json!(409)
            ),
            (
                "unfreeze".into(),
                "scheduled".into(),
                freezer.clone(),
                json!(409)
            ),
            (
                "freeze".into(),
                "missing".into(),
                freezer.clone(),
                json!(404)
            ),
            (
                "freeze".into(),
                "running".into(),
                freezer.clone(),
                json!(500)
            ),
            (
                "freeze".into(),
                "running".into(),
                freezer.clone(),
                json!(500)
            ),
        ],
        "{lines:#?}"
    );
    assert_eq!(lines[4]["unfreezeTimeout"], "soon");
    f.ns.delete().await
}

#[tokio::test]
async fn an_unanswered_freeze_thaws_after_its_timeout() -> Result<()> {
    let f = Fixture::new("standin-auto").await?;
    let ns = f.ns.name.clone();
    f.vmi("vm", "Running", &[]).await?;

    let frozen_at = Instant::now();
    put(
        &f.freezer,
        &ns,
        "vm",
        "freeze",
        r#"{"unfreezeTimeout":"2s"}"#,
    )
    .await?;
    assert_eq!(f.freeze_status("vm").await?.as_deref(), Some("frozen"));
    // A second freeze of a frozen guest changes nothing: the first timer still runs (as
    // virt-launcher does), so the longer timeout here does not extend it.
    put(
        &f.freezer,
        &ns,
        "vm",
        "freeze",
        r#"{"unfreezeTimeout":"5m0s"}"#,
    )
    .await?;
    eventually(15, "the guest to thaw by itself", || async {
        Ok(f.freeze_status("vm").await?.is_none().then_some(()))
    })
    .await?;
    let thawed_after = frozen_at.elapsed();
    assert!(
        thawed_after >= Duration::from_millis(1900) && thawed_after < Duration::from_secs(10),
        "{thawed_after:?}"
    );

    let lines = f.records_with(3).await?;
    assert_eq!(lines.len(), 3, "{lines:#?}");
    assert_eq!(lines[1]["code"], 200);
    assert!(
        lines[1]["message"]
            .as_str()
            .is_some_and(|m| m.contains("already frozen")),
        "{lines:#?}"
    );
    let auto = &lines[2];
    assert_eq!(auto["op"], "auto-unfreeze");
    assert!(auto["user"].is_null() && auto["code"].is_null(), "{auto}");
    assert_eq!(auto["unfreezeTimeout"], "2s");
    let time = |line: &Value| -> Result<chrono::DateTime<chrono::FixedOffset>> {
        let text = line["time"].as_str().context("no time")?;
        Ok(chrono::DateTime::parse_from_rfc3339(text)?)
    };
    let waited = (time(auto)? - time(&lines[0])?).num_milliseconds();
    assert!(
        (1900..4000).contains(&waited),
        "thawed {waited} ms after the freeze"
    );
    f.ns.delete().await
}

#[tokio::test]
async fn the_test_annotations_fail_or_hold_a_freeze() -> Result<()> {
    let f = Fixture::new("standin-knobs").await?;
    let ns = f.ns.name.clone();
    let body = r#"{"unfreezeTimeout":"5m0s"}"#;

    // The guest agent fails: 500 with its message, nothing frozen.
    f.vmi(
        "failing",
        "Running",
        &[("livedisk.io/standin-freeze-error", "fsfreeze: device busy")],
    )
    .await?;
    let (code, message) = status_of(put(&f.freezer, &ns, "failing", "freeze", body).await);
    assert_eq!(code, 500, "{message}");
    assert!(message.contains("fsfreeze: device busy"), "{message}");
    assert_eq!(f.freeze_status("failing").await?, None);

    // A held answer: the freeze is done and recorded at once, the answer comes 2 s later.
    f.vmi(
        "slow",
        "Running",
        &[("livedisk.io/standin-freeze-delay", "2")],
    )
    .await?;
    let started = Instant::now();
    put(&f.freezer, &ns, "slow", "freeze", body).await?;
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    put(&f.freezer, &ns, "slow", "unfreeze", "").await?;

    // The caller gone in the middle of a held freeze: the guest stays frozen (until an unfreeze
    // or its timeout), and the record has the freeze from before the answer.
    let (client, namespace) = (f.freezer.clone(), ns.clone());
    let caller = tokio::spawn(async move {
        put(
            &client,
            &namespace,
            "slow",
            "freeze",
            r#"{"unfreezeTimeout":"5m0s"}"#,
        )
        .await
    });
    let lines = f.records_with(4).await?;
    assert!(!caller.is_finished(), "the answer came before it was due");
    caller.abort();
    assert_eq!(summary(&lines[3]), summary(&lines[1]));
    assert_eq!(f.freeze_status("slow").await?.as_deref(), Some("frozen"));
    put(&f.freezer, &ns, "slow", "unfreeze", "").await?;
    assert_eq!(f.freeze_status("slow").await?, None);

    let lines = f.records_with(5).await?;
    let got: Vec<_> = lines
        .iter()
        .map(|l| (l["op"].clone(), l["name"].clone(), l["code"].clone()))
        .collect();
    assert_eq!(
        got,
        [
            (json!("freeze"), json!("failing"), json!(500)),
            (json!("freeze"), json!("slow"), json!(200)),
            (json!("unfreeze"), json!("slow"), json!(200)),
            (json!("freeze"), json!("slow"), json!(200)),
            (json!("unfreeze"), json!("slow"), json!(200)),
        ],
        "{lines:#?}"
    );
    assert!(
        lines[0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("fsfreeze: device busy")),
        "{lines:#?}"
    );
    f.ns.delete().await
}

/// One HTTPS PUT straight to the stand-in (not through the API server), as `curl` makes it with
/// `cert` (a `pki/` name, or a path) and `headers`: the HTTP code (0: no answer) and the body.
fn direct_put(
    port: u16,
    path: &str,
    cert: Option<(PathBuf, PathBuf)>,
    headers: &[String],
) -> Result<(u16, String)> {
    let host = "virt-api-standin.kubevirt.svc";
    let mut command = Command::new("curl");
    command
        .args([
            "-sS",
            "-X",
            "PUT",
            "--max-time",
            "20",
            "-w",
            "\n%{http_code}",
        ])
        .arg("--resolve")
        .arg(format!("{host}:{port}:127.0.0.1"))
        .arg("--cacert")
        .arg(pki("ca.crt"))
        .args(["-H", "Content-Type: application/json"])
        .args(["--data", r#"{"unfreezeTimeout":"5m0s"}"#]);
    if let Some((crt, key)) = cert {
        command.arg("--cert").arg(crt).arg("--key").arg(key);
    }
    for header in headers {
        command.arg("-H").arg(header);
    }
    command.arg(format!("https://{host}:{port}{path}"));
    let output = command.output().context("running curl")?;
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", stdout.as_str()));
    Ok((code.trim().parse().unwrap_or(0), body.to_string()))
}

#[tokio::test]
async fn only_the_aggregator_is_believed() -> Result<()> {
    let f = Fixture::new("standin-direct").await?;
    let ns = f.ns.name.clone();
    f.vmi("vm", "Running", &[]).await?;
    let apiservices = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("apiregistration.k8s.io", "v1", "APIService"),
        "apiservices",
    );
    let apiservice = Api::<DynamicObject>::all_with(f.admin.clone(), &apiservices)
        .get("v1.subresources.kubevirt.io")
        .await?;
    let port = apiservice.data["spec"]["service"]["port"]
        .as_u64()
        .context("the APIService names no port")? as u16;
    let path = format!("{SUBRESOURCES}/namespaces/{ns}/virtualmachineinstances/vm/freeze");
    let front_proxy = Some((pki("front-proxy-client.crt"), pki("front-proxy-client.key")));

    // No client certificate, or one of the cluster CA (the admin's): no TLS connection at all.
    let (code, body) = direct_put(
        port,
        &path,
        None,
        &[format!("X-Remote-User: {}", f.user("freezer"))],
    )?;
    assert_eq!(code, 0, "answered without a client certificate: {body}");
    let admin = Some((pki("admin.crt"), pki("admin.key")));
    let (code, body) = direct_put(
        port,
        &path,
        admin,
        &[format!("X-Remote-User: {}", f.user("freezer"))],
    )?;
    assert_eq!(code, 0, "answered a certificate of another CA: {body}");

    // A certificate of the front-proxy CA, but not the allowed name: 401.
    let dir = std::env::temp_dir().join(format!("standin-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    let (crt, key) = (dir.join("other.crt"), dir.join("other.key"));
    let openssl = |args: &[&str]| -> Result<()> {
        let status = Command::new("openssl")
            .args(args)
            .current_dir(&dir)
            .output()?;
        if !status.status.success() {
            bail!(
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&status.stderr)
            );
        }
        Ok(())
    };
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "other.key",
        "-out",
        "other.csr",
        "-subj",
        "/CN=not-the-aggregator",
    ])?;
    // An X.509 v3 client certificate (extensions make it v3; webpki accepts no other).
    std::fs::write(
        dir.join("other.ext"),
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n",
    )?;
    let ca_crt = pki("front-proxy-ca.crt");
    let ca_key = pki("front-proxy-ca.key");
    openssl(&[
        "x509",
        "-req",
        "-in",
        "other.csr",
        "-days",
        "1",
        "-CA",
        ca_crt.to_str().context("path")?,
        "-CAkey",
        ca_key.to_str().context("path")?,
        "-CAcreateserial",
        "-CAserial",
        "other.srl",
        "-extfile",
        "other.ext",
        "-out",
        "other.crt",
    ])?;
    let (code, body) = direct_put(
        port,
        &path,
        Some((crt, key)),
        &[format!("X-Remote-User: {}", f.user("freezer"))],
    )?;
    std::fs::remove_dir_all(&dir)?;
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("not-the-aggregator"), "{body}");

    // The aggregator's certificate without a user: 401; naming a user without RBAC: the
    // stand-in's own access review refuses it (403).
    let (code, body) = direct_put(port, &path, front_proxy.clone(), &[])?;
    assert_eq!(code, 401, "{body}");
    let nobody = f.user("nobody");
    let headers = [
        format!("X-Remote-User: {nobody}"),
        "X-Remote-Group: system:serviceaccounts".to_string(),
        "X-Remote-Group: system:authenticated".to_string(),
    ];
    let (code, body) = direct_put(port, &path, front_proxy.clone(), &headers)?;
    assert_eq!(code, 403, "{body}");
    let status: Value = serde_json::from_str(&body).with_context(|| body.clone())?;
    assert_eq!(status["kind"], "Status");
    assert_eq!(status["reason"], "Forbidden");
    assert_eq!(f.freeze_status("vm").await?, None);
    // And the freezer, named the same way, may.
    let headers = [
        format!("X-Remote-User: {}", f.user("freezer")),
        format!("X-Remote-Group: system:serviceaccounts:{ns}"),
    ];
    let (code, body) = direct_put(port, &path, front_proxy, &headers)?;
    assert_eq!(code, 200, "{body}");
    assert_eq!(f.freeze_status("vm").await?.as_deref(), Some("frozen"));
    put(&f.freezer, &ns, "vm", "unfreeze", "").await?;

    let lines = f.records_with(5).await?;
    let got: Vec<_> = lines
        .iter()
        .map(|l| (l["user"].clone(), l["code"].clone()))
        .collect();
    assert_eq!(
        got,
        [
            // A user the stand-in did not believe is not recorded as one.
            (Value::Null, json!(401)),
            (Value::Null, json!(401)),
            (json!(nobody), json!(403)),
            (json!(f.user("freezer")), json!(200)),
            (json!(f.user("freezer")), json!(200)),
        ],
        "{lines:#?}"
    );
    f.ns.delete().await
}
