//! Leader election of the operator on the real API server: two replicas of the real binary, each
//! under the chart's operator ServiceAccount with its own token. Only the holder of the Lease
//! reconciles; a leader stopped with SIGSTOP is replaced once its Lease expires; resumed with
//! SIGCONT, it writes nothing and exits; restarted, it waits, and takes the Lease back at once
//! when the other replica shuts down cleanly (and releases it).
//!
//! The API server's audit log is the witness: every request of the chart's accounts is in it
//! (hack/cluster.sh), with the token's credential id (`JTI=<jti>`), so each replica's requests
//! are told apart without trusting the replicas' own logs.
//!
//! Needs the chart's operator ServiceAccount and RBAC on the cluster (`hack/accounts.sh apply`,
//! which `make test` runs). Its own test binary: it owns the operator's Lease while it runs.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use base64::Engine;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, DeleteParams};
use livedisk_api::DiskSnapshot;
use livedisk_e2e::operator::Operator;
use livedisk_e2e::{TestNamespace, apply, client, error_message, eventually};
use serde_json::{Value, json};

/// The chart's names for release `livedisk` in namespace `livedisk-system`.
const NAMESPACE: &str = "livedisk-system";
const ACCOUNT: &str = "livedisk-operator";
const LEASE: &str = "livedisk-operator";

/// One replica's identity: its pod name (in the Lease) and its token's credential id (in the
/// audit log).
struct Replica {
    name: &'static str,
    kubeconfig: PathBuf,
    credential: String,
}

impl Replica {
    /// A fresh token of the chart's operator ServiceAccount, as kubelet would project one into
    /// this replica's pod.
    async fn mint(client: &Client, name: &'static str) -> Result<Self> {
        let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), NAMESPACE);
        if accounts.get_opt(ACCOUNT).await?.is_none() {
            bail!(
                "ServiceAccount {NAMESPACE}/{ACCOUNT} is missing: apply the chart's accounts \
                 (`hack/accounts.sh apply`, which `make test` runs)"
            );
        }
        let token = livedisk_e2e::service_account_token(client, NAMESPACE, ACCOUNT)
            .await
            .context("requesting a token of the operator's ServiceAccount")?;
        let kubeconfig = std::env::temp_dir().join(format!(
            "livedisk-e2e-leader-{name}-{}.kubeconfig",
            std::process::id()
        ));
        std::fs::write(&kubeconfig, livedisk_e2e::kubeconfig_with_token(&token)?)?;
        Ok(Self {
            name,
            kubeconfig,
            credential: format!("JTI={}", token_id(&token)?),
        })
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}

/// The `jti` claim of a ServiceAccount token (a JWT): the API server records it as the request's
/// credential id.
fn token_id(token: &str) -> Result<String> {
    let payload = token.split('.').nth(1).context("the token is not a JWT")?;
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload.trim_end_matches('='))
            .context("decoding the token's claims")?,
    )?;
    claims["jti"]
        .as_str()
        .map(str::to_string)
        .context("the token has no jti claim")
}

/// One request in the audit log.
#[derive(Debug)]
struct Request {
    credential: Option<String>,
    verb: String,
    resource: String,
    name: String,
    code: u16,
    received: Timestamp,
}

impl Request {
    fn writes(&self) -> bool {
        matches!(
            self.verb.as_str(),
            "create" | "update" | "patch" | "delete" | "deletecollection"
        )
    }

    fn by(&self, replica: &Replica) -> bool {
        self.credential.as_deref() == Some(replica.credential.as_str())
    }

    /// A successful write of the Lease: the moment its writer held it.
    fn wins_lease(&self) -> bool {
        self.writes() && self.resource == "leases" && self.name == LEASE && self.code < 300
    }
}

/// The audit log of the cluster in `KUBECONFIG` (hack/cluster.sh writes it beside the
/// kubeconfig, in `logs/audit.log`).
fn audit_log() -> Result<PathBuf> {
    let kubeconfig = std::env::var_os("KUBECONFIG").context("KUBECONFIG is not set")?;
    let path = Path::new(&kubeconfig)
        .parent()
        .context("KUBECONFIG has no directory")?
        .join("logs/audit.log");
    ensure!(
        path.is_file(),
        "{} is missing: the local cluster writes no audit log (hack/cluster.sh up starts it with one)",
        path.display()
    );
    Ok(path)
}

/// Every completed request in the audit log (the log is written before each answer: blocking
/// mode).
fn audit() -> Result<Vec<Request>> {
    let text = std::fs::read_to_string(audit_log()?)?;
    let mut requests = Vec::new();
    for line in text.lines() {
        let Ok(event) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if event["stage"] != "ResponseComplete" {
            continue;
        }
        let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
        requests.push(Request {
            credential: event["user"]["extra"]["authentication.kubernetes.io/credential-id"][0]
                .as_str()
                .map(str::to_string),
            verb: text(&event["verb"]),
            resource: text(&event["objectRef"]["resource"]),
            name: text(&event["objectRef"]["name"]),
            code: event["responseStatus"]["code"]
                .as_u64()
                .and_then(|c| u16::try_from(c).ok())
                .unwrap_or(0),
            received: text(&event["requestReceivedTimestamp"])
                .parse()
                .with_context(|| format!("audit event without a timestamp: {line}"))?,
        });
    }
    Ok(requests)
}

/// The holder named by the operator's Lease, if any.
async fn holder(leases: &Api<Lease>) -> Result<Option<String>> {
    Ok(leases
        .get_opt(LEASE)
        .await?
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
        .filter(|h| !h.is_empty()))
}

async fn wait_for_holder(
    leases: &Api<Lease>,
    seconds: u64,
    name: &str,
    logs: impl Fn() -> String,
) -> Result<()> {
    eventually(seconds, &format!("{name} to hold the Lease"), || async {
        Ok((holder(leases).await?.as_deref() == Some(name)).then_some(()))
    })
    .await
    .with_context(logs)
}

/// Creates a DiskSnapshot (of a PVC that does not exist) and waits until a replica has written
/// its status: a reconcile happened.
async fn reconciled(
    client: &Client,
    namespace: &str,
    name: &str,
    logs: impl Fn() -> String,
) -> Result<()> {
    let snapshot = json!({"apiVersion": "livedisk.io/v1alpha1", "kind": "DiskSnapshot",
        "metadata": {"name": name}, "spec": {"source": {"persistentVolumeClaimName": "absent"}}});
    apply(client, namespace, &snapshot)
        .await?
        .map_err(|e| anyhow::anyhow!(error_message(&e)))?;
    let snapshots: Api<DiskSnapshot> = Api::namespaced(client.clone(), namespace);
    eventually(60, &format!("a status on DiskSnapshot {name}"), || async {
        let object = snapshots.get(name).await?;
        Ok(object
            .status
            .filter(|s| !s.conditions.is_empty())
            .map(|_| ()))
    })
    .await
    .with_context(logs)
}

/// The status writes of `replica` on the DiskSnapshot `name`.
fn status_writes<'a>(
    requests: &'a [Request],
    replica: &'a Replica,
    name: &'a str,
) -> impl Iterator<Item = &'a Request> {
    requests
        .iter()
        .filter(move |r| r.by(replica) && r.writes() && r.resource == "disksnapshots")
        .filter(move |r| r.name == name)
}

/// Both replicas' logs, for a failure message.
fn logs(a: &Operator, b: &Operator) -> String {
    format!("--- replica A:\n{}\n--- replica B:\n{}", a.log(), b.log())
}

#[tokio::test]
async fn only_the_lease_holder_acts_and_a_resumed_old_leader_writes_nothing() -> Result<()> {
    let client = client().await?;
    let leases: Api<Lease> = Api::namespaced(client.clone(), NAMESPACE);
    // A Lease left by an operator of an earlier run would only delay the first replica.
    let _ = leases.delete(LEASE, &DeleteParams::default()).await;
    let a = Replica::mint(&client, "leader-test-a").await?;
    let b = Replica::mint(&client, "leader-test-b").await?;
    ensure!(
        a.credential != b.credential,
        "the two tokens share a credential id"
    );
    let namespace = TestNamespace::create(&client, "leader").await?;
    let result = scenario(&client, &leases, &namespace.name, &a, &b).await;
    namespace.delete().await?;
    result
}

async fn scenario(
    client: &Client,
    leases: &Api<Lease>,
    ns: &str,
    a: &Replica,
    b: &Replica,
) -> Result<()> {
    // A starts first and leads; B starts once A holds the Lease and stands by.
    let mut first = Operator::start_replica(&a.kubeconfig, a.name)?;
    wait_for_holder(leases, 60, a.name, || first.log()).await?;
    let mut second = Operator::start_replica(&b.kubeconfig, b.name)?;
    eventually(60, "B to see that A holds the Lease", || async {
        Ok(second
            .log()
            .contains("observed the lease held by another replica")
            .then_some(()))
    })
    .await
    .with_context(|| logs(&first, &second))?;
    reconciled(client, ns, "one", || logs(&first, &second)).await?;

    // SIGSTOP the leader: B takes over once the Lease has not been renewed for 15 s.
    first.signal(libc::SIGSTOP)?;
    let stopped = Instant::now();
    let stopped_at = Timestamp::now();
    wait_for_holder(leases, 40, b.name, || logs(&first, &second)).await?;
    let takeover = stopped.elapsed();
    // A renewed at most 2 s (the retry period) before it stopped; B waits 15 s from when it saw
    // that renewal.
    ensure!(
        takeover >= Duration::from_secs(12),
        "B took the Lease {takeover:?} after A stopped: before A's Lease expired"
    );
    reconciled(client, ns, "two", || logs(&first, &second)).await?;
    // Something for A to react to as soon as it runs again: an object B has not reconciled yet,
    // in A's watch buffers.
    let three = json!({"apiVersion": "livedisk.io/v1alpha1", "kind": "DiskSnapshot",
        "metadata": {"name": "three"}, "spec": {"source": {"persistentVolumeClaimName": "absent"}}});
    apply(client, ns, &three)
        .await?
        .map_err(|e| anyhow::anyhow!(error_message(&e)))?;

    // SIGCONT: A finds its renew deadline long past; it writes nothing and exits.
    let resumed_at = Timestamp::now();
    first.signal(libc::SIGCONT)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let exited = loop {
        if let Some(status) = first.child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            bail!("A still runs 30 s after SIGCONT\n{}", logs(&first, &second));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    ensure!(
        !exited.success(),
        "A exited with {exited} after losing the Lease"
    );
    ensure!(
        first.log().contains("lost the lease"),
        "A did not log the loss:\n{}",
        first.log()
    );
    ensure!(
        holder(leases).await?.as_deref() == Some(b.name),
        "the Lease changed hands after A resumed"
    );

    let requests = audit()?;
    // The witness can fail: A's status write of `one`, and B's of `two`, are in the log.
    ensure!(
        status_writes(&requests, a, "one").count() > 0,
        "the audit log shows no status write of A (credential {}) for `one`",
        a.credential
    );
    ensure!(
        status_writes(&requests, b, "two").count() > 0,
        "the audit log shows no status write of B for `two`"
    );
    // B wrote nothing before it won the Lease (a standby only reads).
    let b_won = requests
        .iter()
        .filter(|r| r.by(b) && r.wins_lease())
        .map(|r| r.received)
        .min()
        .context("the audit log shows no Lease write of B")?;
    ensure!(b_won >= stopped_at, "B won the Lease before A stopped");
    let early: Vec<_> = requests
        .iter()
        .filter(|r| r.by(b) && r.writes() && r.received < b_won)
        .collect();
    ensure!(early.is_empty(), "B wrote as a standby: {early:#?}");
    // A wrote nothing after it was stopped: not while stopped, and not once resumed.
    let late: Vec<_> = requests
        .iter()
        .filter(|r| r.by(a) && r.writes() && r.received >= stopped_at)
        .collect();
    ensure!(
        late.is_empty(),
        "A wrote after SIGSTOP (resumed at {resumed_at}): {late:#?}"
    );
    reconciled(client, ns, "four", || logs(&first, &second)).await?;

    // A restarts (as its Deployment would restart it): it stands by while B holds the Lease, and
    // takes it back at once when B shuts down cleanly and releases it.
    drop(first);
    let restarted_at = Timestamp::now();
    let first = Operator::start_replica(&a.kubeconfig, a.name)?;
    eventually(
        60,
        "the restarted A to see that B holds the Lease",
        || async {
            Ok(first
                .log()
                .contains("observed the lease held by another replica")
                .then_some(()))
        },
    )
    .await
    .with_context(|| first.log())?;
    let ended = second.stop(Duration::from_secs(20))?;
    ensure!(
        ended.success(),
        "B did not end cleanly on SIGTERM: {ended}\n{}",
        second.log()
    );
    ensure!(
        second.log().contains("released the lease"),
        "B did not release the Lease:\n{}",
        second.log()
    );
    let released = Instant::now();
    wait_for_holder(leases, 10, a.name, || first.log()).await?;
    // Without the release A would have waited out the whole Lease (15 s).
    ensure!(
        released.elapsed() < Duration::from_secs(10),
        "A took {:?} to take over a released Lease",
        released.elapsed()
    );
    reconciled(client, ns, "five", || first.log()).await?;

    let requests = audit()?;
    let a_won_again = requests
        .iter()
        .filter(|r| r.by(a) && r.wins_lease() && r.received >= restarted_at)
        .map(|r| r.received)
        .min()
        .context("the audit log shows no Lease write of the restarted A")?;
    let before_winning: Vec<_> = requests
        .iter()
        .filter(|r| r.by(a) && r.writes() && r.received >= stopped_at && r.received < a_won_again)
        .collect();
    ensure!(
        before_winning.is_empty(),
        "A wrote before it won the Lease again: {before_winning:#?}"
    );
    ensure!(
        status_writes(&requests, a, "five").count() > 0,
        "the audit log shows no status write of the restarted A for `five`"
    );
    Ok(())
}
