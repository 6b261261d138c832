//! (f) DiskSnapshots at scale, through the operator on the local cluster hack/bench.sh starts:
//! claims bound on the nodes, then many DiskSnapshots of them created as fast as the API server
//! takes them; the time until every one is Ready, the operator's peak memory, its API requests
//! per DiskSnapshot (from the audit log), and the same for deleting them all.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, PersistentVolumeClaim, Pod};
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use livedisk_api::{DiskSnapshot, Phase};
use serde_json::json;
use tokio::process::{Child, Command};

use crate::audit::{self, Requests};
use crate::report::{Row, Target};
use crate::scenarios::Config;
use crate::watch;

/// The target for the operator's memory at 1,000 DiskSnapshots.
const RSS_TARGET_MIB: f64 = 100.0;
/// DiskSnapshot creations and deletions in flight at once: "as fast as the API takes them"
/// without opening a thousand connections.
const IN_FLIGHT: usize = 32;
/// After a phase ends, the operator's last writes of it (a status, an Event) still belong to it.
const SETTLE: Duration = Duration::from_secs(3);
/// Identity of the benchmark's operator (its POD_NAME): the Lease holder to wait for.
const IDENTITY: &str = "livedisk-bench-operator";

fn progress(msg: &str) {
    eprintln!("bench: (f) {msg}");
}

/// What hack/bench.sh tells the benchmark for (f); `None` if it set nothing.
#[derive(Debug, Clone)]
pub struct ScaleTarget {
    /// The livedisk-operator binary (the release build).
    pub operator_bin: PathBuf,
    /// The chart's operator account (hack/accounts.sh), as the chart runs it.
    pub operator_kubeconfig: PathBuf,
    /// The API server's audit logs.
    pub audit_dir: PathBuf,
    /// Where the operator's log and pid file go.
    pub log_dir: PathBuf,
}

impl ScaleTarget {
    pub fn from_env() -> Result<Option<Self>> {
        let var = |name: &str| std::env::var_os(name).map(PathBuf::from);
        let Some(operator_bin) = var("LIVEDISK_BENCH_OPERATOR_BIN") else {
            return Ok(None);
        };
        let need = |name: &str| var(name).with_context(|| format!("{name} is not set"));
        Ok(Some(Self {
            operator_bin,
            operator_kubeconfig: need("LIVEDISK_BENCH_OPERATOR_KUBECONFIG")?,
            audit_dir: need("LIVEDISK_BENCH_AUDIT_DIR")?,
            log_dir: need("LIVEDISK_BENCH_LOG_DIR")?,
        }))
    }
}

/// What one run of (f) measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Measured {
    pub snapshots: usize,
    pub claims: usize,
    /// From the first create until the API server had taken the last one, seconds.
    pub created: f64,
    /// From the first create until every DiskSnapshot was Ready, seconds.
    pub ready: f64,
    /// From the first delete until every DiskSnapshot was gone, seconds.
    pub deleted: f64,
    /// The operator's peak resident memory (VmHWM) over the whole run, MiB.
    pub peak_rss_mib: f64,
    /// Its resident memory once every DiskSnapshot was Ready, MiB.
    pub ready_rss_mib: f64,
    /// Times the operator exited (and was started again) until all were Ready, and in all.
    pub ready_restarts: usize,
    pub restarts: usize,
    pub create_requests: Requests,
    pub delete_requests: Requests,
}

pub fn rows(m: &Measured) -> Vec<Row> {
    let (n, k) = (m.snapshots, m.claims);
    let per = |r: &Requests| r.total as f64 / n as f64;
    let info = |name: String, measured: String| Row {
        name,
        measured,
        peer: String::new(),
        ratio: f64::NAN,
        target: Target::Info,
    };
    vec![
        info(
            format!("(f) {n} DiskSnapshots of {k} PVCs, first create to all Ready"),
            format!("{:.1} s", m.ready),
        ),
        info(
            "(f)   of which the API server taking all the creates".into(),
            format!("{:.1} s", m.created),
        ),
        Row {
            name: format!("(f) operator's peak RSS (VmHWM) with {n} DiskSnapshots"),
            measured: format!("{:.1} MiB", m.peak_rss_mib),
            peer: format!("{:.1} MiB", m.ready_rss_mib),
            ratio: m.peak_rss_mib,
            target: Target::Below {
                limit: RSS_TARGET_MIB,
                unit: "MiB",
            },
        },
        info(
            "(f)   operator exits (restarted as its Deployment would), to Ready / in all".into(),
            format!("{} / {}", m.ready_restarts, m.restarts),
        ),
        info(
            "(f) operator's API requests per DiskSnapshot, create to Ready".into(),
            format!("{:.2}", per(&m.create_requests)),
        ),
        info(
            format!("(f) delete all {n} (class without rate limit), until all gone"),
            format!("{:.1} s", m.deleted),
        ),
        info(
            "(f) operator's API requests per DiskSnapshot, deletion".into(),
            format!("{:.2}", per(&m.delete_requests)),
        ),
    ]
}

/// `VmHWM:     12345 kB` → 12345 (KiB), for a field of /proc/PID/status.
pub fn status_kib(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

fn memory_mib(pid: u32, field: &str) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading the operator's /proc/{pid}/status"))?;
    let kib = status_kib(&status, field).with_context(|| format!("no {field} in it"))?;
    Ok(kib as f64 / 1024.0)
}

/// The claim snapshot `i` is of: round robin over the claims.
pub fn claim_of(i: usize, claims: usize) -> String {
    format!("claim-{}", i % claims)
}

/// The operator as the chart runs it (its account, leader election on), the benchmark's child,
/// and started again when it exits, as its Deployment's kubelet would (after 10 s, doubling up
/// to 5 minutes: CrashLoopBackOff). Stopped with SIGTERM at the end, killed if the benchmark goes
/// first; its pid is written to `log_dir`, so that hack/bench.sh's trap can stop it after an
/// interrupted run. `tend` keeps it running and samples its peak memory.
pub(crate) struct Operator {
    target: ScaleTarget,
    child: Option<Child>,
    pid: u32,
    /// Exits so far, and when the next start is due after the last one.
    restarts: usize,
    next_start: Option<Instant>,
    /// The highest VmHWM seen of any of its processes, KiB.
    peak_kib: u64,
}

/// More restarts than this in one run: the run is broken, not slow.
const MAX_RESTARTS: usize = 10;

/// kubelet's restart delay after the `n`-th exit (1-based): 10 s, doubling, at most 300 s.
pub fn restart_delay(n: usize) -> Duration {
    let doublings = u32::try_from(n.saturating_sub(1))
        .unwrap_or(u32::MAX)
        .min(5);
    Duration::from_secs(10 * (1u64 << doublings)).min(Duration::from_secs(300))
}

impl Operator {
    pub(crate) fn start(t: &ScaleTarget) -> Result<Self> {
        let mut o = Self {
            target: t.clone(),
            child: None,
            pid: 0,
            restarts: 0,
            next_start: None,
            peak_kib: 0,
        };
        // This run's log only; restarts append to it.
        let _ = std::fs::remove_file(t.log_dir.join("bench-operator.log"));
        o.spawn()?;
        Ok(o)
    }

    fn pid_file(&self) -> PathBuf {
        self.target.log_dir.join("bench-operator.pid")
    }

    fn spawn(&mut self) -> Result<()> {
        let t = &self.target;
        std::fs::create_dir_all(&t.log_dir)?;
        // Appended: a restarted operator's log follows the one before.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(t.log_dir.join("bench-operator.log"))?;
        let child = Command::new(&t.operator_bin)
            .env("KUBECONFIG", &t.operator_kubeconfig)
            .env("POD_NAME", IDENTITY)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", t.operator_bin.display()))?;
        self.pid = child.id().context("the operator exited at once")?;
        std::fs::write(self.pid_file(), self.pid.to_string())?;
        self.child = Some(child);
        self.next_start = None;
        Ok(())
    }

    /// Samples the running operator's peak memory; notices an exit and starts it again when
    /// its delay is over. Fails after `MAX_RESTARTS` exits.
    fn tend(&mut self) -> Result<()> {
        if let Some(child) = self.child.as_mut() {
            match child.try_wait()? {
                None => {
                    if let Ok(status) =
                        std::fs::read_to_string(format!("/proc/{}/status", self.pid))
                        && let Some(kib) = status_kib(&status, "VmHWM")
                    {
                        self.peak_kib = self.peak_kib.max(kib);
                    }
                    return Ok(());
                }
                Some(status) => {
                    self.child = None;
                    self.restarts += 1;
                    let delay = restart_delay(self.restarts);
                    progress(&format!(
                        "the operator exited ({status}; bench-operator.log says why); \
                         restart {} in {} s",
                        self.restarts,
                        delay.as_secs()
                    ));
                    ensure!(
                        self.restarts <= MAX_RESTARTS,
                        "the operator exited {} times: see bench-operator.log",
                        self.restarts
                    );
                    self.next_start = Some(Instant::now() + delay);
                }
            }
        }
        if self.next_start.is_some_and(|at| Instant::now() >= at) {
            self.spawn()?;
        }
        Ok(())
    }

    /// The current process's resident memory, MiB (0 while it is down).
    fn rss_mib(&self) -> f64 {
        if self.child.is_none() {
            return 0.0;
        }
        memory_mib(self.pid, "VmRSS").unwrap_or(0.0)
    }

    pub(crate) async fn stop(mut self) -> Result<()> {
        let _ = std::fs::remove_file(self.pid_file());
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        let pid = libc::pid_t::try_from(self.pid)?;
        // SAFETY: kill(2) only sends a signal, to our own child, not yet reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        match tokio::time::timeout(Duration::from_secs(15), child.wait()).await {
            Ok(status) => {
                status?;
            }
            Err(_) => child.kill().await?,
        }
        Ok(())
    }
}

/// (f), end to end, in a namespace of its own that goes again at the end, also after a failure.
pub async fn disk_snapshots_at_scale(t: ScaleTarget, c: &Config) -> Result<Vec<Row>> {
    let (n, k) = (c.disk_snapshots, c.claims);
    ensure!(
        n >= 1 && (1..=n).contains(&k),
        "{n} DiskSnapshots of {k} claims: need at least one of each, no more claims than snapshots"
    );
    let client = kube::Client::try_default()
        .await
        .context("the cluster's admin kubeconfig (KUBECONFIG)")?;
    let ns = format!(
        "bench-f-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let mut operator = Operator::start(&t)?;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let object = serde_json::from_value(json!({"metadata": {"name": ns}}))?;
    let measured = match namespaces.create(&PostParams::default(), &object).await {
        Ok(_) => measure(&client, &ns, &t, &mut operator, n, k).await,
        Err(e) => Err(anyhow::Error::new(e).context(format!("creating namespace {ns}"))),
    };
    progress("stopping the operator, deleting the namespace");
    let stopped = operator.stop().await;
    let cleaned = clean(&client, &ns).await;
    let m = measured?;
    stopped.context("stopping the operator")?;
    cleaned.context("cleaning up after (f)")?;
    Ok(rows(&m))
}

async fn measure(
    client: &kube::Client,
    ns: &str,
    t: &ScaleTarget,
    operator: &mut Operator,
    n: usize,
    k: usize,
) -> Result<Measured> {
    bind_claims(client, ns, k).await?;
    leading(client, operator).await?;

    let snapshots: Api<DiskSnapshot> = Api::namespaced(client.clone(), ns);
    // Generous: the standard sidecars' client-side rate limits alone take ~2 s per snapshot
    // here; a timeout is a broken run, not a slow one.
    let wait = Duration::from_secs(600) + Duration::from_secs(4) * n as u32;
    progress(&format!("creating {n} DiskSnapshots of {k} PVCs"));
    let from = Utc::now();
    let started = Instant::now();
    let creating = tokio::spawn(create_all(snapshots.clone(), n, k, started));
    let mut last = Instant::now();
    watch::until(
        snapshots.clone(),
        wait,
        "every DiskSnapshot Ready",
        |seen| {
            operator.tend()?;
            ready_count(seen, n, &mut last, started)
        },
    )
    .await?;
    let ready = started.elapsed().as_secs_f64();
    let created = creating.await.context("the create task")??;
    let ready_rss_mib = operator.rss_mib();
    let ready_restarts = operator.restarts;
    progress(&format!(
        "all {n} Ready after {ready:.1} s (creates taken in {created:.1} s); operator RSS \
         {ready_rss_mib:.1} MiB, {ready_restarts} restarts"
    ));
    tokio::time::sleep(SETTLE).await;
    let create_requests = requests(t, from)?;
    progress(&format!(
        "operator's requests, create to Ready: {} ({})",
        create_requests.total,
        create_requests.verbs()
    ));

    progress(&format!("deleting the {n} DiskSnapshots"));
    let from = Utc::now();
    let started = Instant::now();
    let deleting = tokio::spawn(delete_all(snapshots.clone(), n));
    let mut last = Instant::now();
    watch::until(snapshots, wait, "every DiskSnapshot gone", |seen| {
        operator.tend()?;
        if last.elapsed() > Duration::from_secs(10) {
            progress(&format!(
                "{} left after {:.0} s",
                seen.len(),
                started.elapsed().as_secs_f64()
            ));
            last = Instant::now();
        }
        Ok(seen.is_empty())
    })
    .await?;
    let deleted = started.elapsed().as_secs_f64();
    deleting.await.context("the delete task")??;
    progress(&format!("all gone after {deleted:.1} s"));
    tokio::time::sleep(SETTLE).await;
    let delete_requests = requests(t, from)?;
    progress(&format!(
        "operator's requests, deletion: {} ({})",
        delete_requests.total,
        delete_requests.verbs()
    ));
    operator.tend()?;
    Ok(Measured {
        snapshots: n,
        claims: k,
        created,
        ready,
        deleted,
        peak_rss_mib: operator.peak_kib as f64 / 1024.0,
        ready_rss_mib,
        ready_restarts,
        restarts: operator.restarts,
        create_requests,
        delete_requests,
    })
}

/// The operator's requests from `from` until now.
fn requests(t: &ScaleTarget, from: DateTime<Utc>) -> Result<Requests> {
    audit::count_in_dir(&t.audit_dir, audit::OPERATOR_USER, from, Utc::now())
}

/// How many are Ready (all `n` of them: true); fails on one that failed for good.
fn ready_count(
    seen: &BTreeMap<String, DiskSnapshot>,
    n: usize,
    last: &mut Instant,
    started: Instant,
) -> Result<bool> {
    let mut ready = 0;
    for (name, s) in seen {
        let status = s.status.clone().unwrap_or_default();
        match status.phase {
            Phase::Ready => ready += 1,
            Phase::Failed => bail!("DiskSnapshot {name} failed: {status:?}"),
            _ => {}
        }
    }
    if last.elapsed() > Duration::from_secs(10) {
        progress(&format!(
            "{ready}/{n} Ready after {:.0} s",
            started.elapsed().as_secs_f64()
        ));
        *last = Instant::now();
    }
    Ok(ready == n)
}

/// Creates the DiskSnapshots, `IN_FLIGHT` at a time; the seconds from `started` until the API
/// server had taken the last.
async fn create_all(api: Api<DiskSnapshot>, n: usize, k: usize, started: Instant) -> Result<f64> {
    futures::stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            async move {
                let object: DiskSnapshot = serde_json::from_value(json!({
                    "apiVersion": "livedisk.io/v1alpha1", "kind": "DiskSnapshot",
                    "metadata": {"name": format!("snap-{i}")},
                    "spec": {"source": {"persistentVolumeClaimName": claim_of(i, k)}}
                }))?;
                api.create(&PostParams::default(), &object)
                    .await
                    .with_context(|| format!("creating DiskSnapshot snap-{i}"))?;
                Ok::<_, anyhow::Error>(())
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .try_collect::<Vec<_>>()
        .await?;
    Ok(started.elapsed().as_secs_f64())
}

async fn delete_all(api: Api<DiskSnapshot>, n: usize) -> Result<()> {
    futures::stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            async move {
                api.delete(&format!("snap-{i}"), &DeleteParams::default())
                    .await
                    .with_context(|| format!("deleting DiskSnapshot snap-{i}"))?;
                Ok::<_, anyhow::Error>(())
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .try_collect::<Vec<_>>()
        .await?;
    Ok(())
}

/// `k` 64 MiB block claims of the livedisk class, each bound by a consumer pod that the
/// scheduler places (WaitForFirstConsumer; no kubelet runs it: the volume is provisioned on the
/// pod's node and never attached, which a snapshot does not need).
async fn bind_claims(client: &kube::Client, ns: &str, k: usize) -> Result<()> {
    progress(&format!("{k} claims, bound by consumer pods"));
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    for i in 0..k {
        let claim = claim_of(i, k);
        let pvc = serde_json::from_value(json!({
            "metadata": {"name": claim},
            "spec": {"storageClassName": "livedisk", "volumeMode": "Block",
                     "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "64Mi"}}}
        }))?;
        claims.create(&PostParams::default(), &pvc).await?;
        let pod = serde_json::from_value(json!({
            "metadata": {"name": format!("{claim}-consumer")},
            "spec": {"containers": [{"name": "c", "image": "busybox",
                                     "volumeDevices": [{"name": "d", "devicePath": "/dev/xvda"}]}],
                     "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": claim}}]}
        }))?;
        pods.create(&PostParams::default(), &pod).await?;
    }
    let wait = Duration::from_secs(120) + Duration::from_secs(2) * k as u32;
    watch::until(claims, wait, "every claim Bound", |seen| {
        Ok(seen
            .values()
            .filter(|c| c.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound"))
            .count()
            == k)
    })
    .await
}

/// Waits until the benchmark's operator holds the Lease (a fresh cluster's Lease is free).
async fn leading(client: &kube::Client, operator: &mut Operator) -> Result<()> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), "livedisk-system");
    let started = Instant::now();
    watch::until(
        leases,
        Duration::from_secs(60),
        "the operator's Lease",
        |seen| {
            operator.tend()?;
            Ok(seen.get("livedisk-operator").is_some_and(|l| {
                l.spec.as_ref().and_then(|s| s.holder_identity.as_deref()) == Some(IDENTITY)
            }))
        },
    )
    .await?;
    progress(&format!(
        "the operator leads after {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// The consumer pods go only when forced (no kubelet); the namespace takes the rest.
pub(crate) async fn clean(client: &kube::Client, ns: &str) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let now = DeleteParams {
        grace_period_seconds: Some(0),
        ..Default::default()
    };
    for pod in pods.list(&Default::default()).await? {
        let name = kube::ResourceExt::name_any(&pod);
        pods.delete(&name, &now).await?;
    }
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces.delete(ns, &DeleteParams::default()).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::verdict;

    #[test]
    fn reads_memory_fields_of_proc_status() {
        let status = "Name:\tlivedisk-operat\nVmPeak:\t  900000 kB\nVmHWM:\t   41234 kB\nVmRSS:\t   40000 kB\n";
        assert_eq!(status_kib(status, "VmHWM"), Some(41234));
        assert_eq!(status_kib(status, "VmRSS"), Some(40000));
        assert_eq!(status_kib(status, "VmSwap"), None);
    }

    #[test]
    fn restarts_back_off_as_kubelet_does() {
        assert_eq!(restart_delay(1), Duration::from_secs(10));
        assert_eq!(restart_delay(2), Duration::from_secs(20));
        assert_eq!(restart_delay(5), Duration::from_secs(160));
        assert_eq!(restart_delay(6), Duration::from_secs(300));
        assert_eq!(restart_delay(60), Duration::from_secs(300));
    }

    #[test]
    fn snapshots_go_round_robin_over_the_claims() {
        assert_eq!(claim_of(0, 50), "claim-0");
        assert_eq!(claim_of(51, 50), "claim-1");
        assert_eq!(
            (0..1000).filter(|&i| claim_of(i, 50) == "claim-7").count(),
            20
        );
    }

    #[test]
    fn rows_hold_the_memory_to_its_target_and_count_requests_per_object() {
        let requests = |total| Requests {
            total,
            by_verb: BTreeMap::new(),
        };
        let m = Measured {
            snapshots: 1000,
            claims: 50,
            created: 4.0,
            ready: 60.0,
            deleted: 80.0,
            peak_rss_mib: 42.0,
            ready_rss_mib: 40.0,
            ready_restarts: 0,
            restarts: 0,
            create_requests: requests(3500),
            delete_requests: requests(2000),
        };
        let r = rows(&m);
        let verdicts: Vec<_> = r.iter().map(|r| verdict(r.ratio, r.target)).collect();
        assert_eq!(verdicts, ["-", "-", "PASS", "-", "-", "-", "-"]);
        assert!(r[0].name.contains("1000 DiskSnapshots of 50 PVCs"));
        assert_eq!(r[3].measured, "0 / 0");
        assert_eq!(r[4].measured, "3.50");
        assert_eq!(r[6].measured, "2.00");
        let heavy = Measured {
            peak_rss_mib: 120.0,
            ..m
        };
        assert_eq!(
            verdict(rows(&heavy)[2].ratio, rows(&heavy)[2].target),
            "MISS"
        );
    }
}
