//! The livedisk operator: reconciles the user-facing `livedisk.io` resources.

mod controller;
mod decide;
mod error;
mod evacuation;
mod export;
mod failure;
mod finalized;
mod kinds;
mod leader;
mod merge;
mod metrics;
mod migration;
mod node_work;
mod observe;
mod orphans;
mod restore;
mod snapshot;
mod standard;
mod startup;
mod status;

use anyhow::Context;
use clap::{ArgAction, Parser};
use kube::client::ClientBuilder;
use livedisk_telemetry::{Endpoint, ReadyFlag, Registry, TelemetryArgs};

use crate::leader::{Elector, Leadership, Settings, Timing};

/// Command-line flags; every flag also reads an environment variable.
#[derive(Parser, Debug)]
#[command(
    name = "livedisk-operator",
    version,
    about = "Reconciles livedisk.io resources"
)]
struct Args {
    /// How long to wait for the livedisk CRDs to be established before giving up, in seconds.
    #[arg(long, env = "LIVEDISK_CRD_WAIT_SECONDS", default_value_t = 120)]
    crd_wait_seconds: u64,
    /// Name reported in Events (`reportingController`).
    #[arg(
        long,
        env = "LIVEDISK_CONTROLLER_NAME",
        default_value = "livedisk-operator"
    )]
    controller_name: String,
    /// Pod name, reported in Events (`reportingInstance`) and the identity of this replica in
    /// the Lease (default: `<hostname>_<pid>`).
    #[arg(long, env = "POD_NAME")]
    pod_name: Option<String>,
    /// Run the controllers only while this replica holds the Lease (`--leader-elect=false` to
    /// turn it off). On by default, so that a second copy of the operator (a standby replica, a
    /// copy started by hand beside the installed one) never writes beside the first; off only for
    /// a single replica that may not use Leases.
    #[arg(
        long,
        env = "LIVEDISK_LEADER_ELECT",
        default_value_t = true,
        action = ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    leader_elect: bool,
    /// Namespace of the Lease (default: the pod's namespace from POD_NAMESPACE or its
    /// ServiceAccount, else livedisk-system).
    #[arg(long, env = "POD_NAMESPACE")]
    leader_election_namespace: Option<String>,
    /// Name of the Lease.
    #[arg(
        long,
        env = "LIVEDISK_LEADER_ELECTION_LEASE_NAME",
        default_value = "livedisk-operator"
    )]
    leader_election_lease_name: String,
    #[command(flatten)]
    telemetry: TelemetryArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    livedisk_telemetry::logging::init(args.telemetry.log_format);
    // Probes are served from the start. Ready once the CRDs are established (a standby replica
    // can take over) and, while this replica runs the controllers, once their caches synced.
    let mut registry = Registry::default();
    let metrics = metrics::OperatorMetrics::register(&mut registry);
    let ready = ReadyFlag::default();
    let _endpoint = Endpoint::from_args(&args.telemetry, registry, ready.check())
        .await
        .context("starting the telemetry endpoint")?;
    let config = kube::Config::infer()
        .await
        .context("no Kubernetes client configuration (KUBECONFIG or in-cluster)")?;
    let reporter = kube::runtime::events::Reporter {
        controller: args.controller_name.clone(),
        instance: args.pod_name.clone(),
    };
    if !args.leader_elect {
        tracing::warn!("leader election is off: this replica acts as if it were the only one");
        let client = kube::Client::try_from(config)?;
        wait_for_crds(&client, &args).await?;
        ready.set(true);
        let namespace = settings(&args).namespace;
        controller::run_all(
            client,
            reporter,
            Leadership::unconditional(),
            metrics,
            ready,
            namespace,
        )
        .await?;
        return Ok(());
    }

    let settings = settings(&args);
    let namespace = settings.namespace.clone();
    let mut elector = Elector::new(kube::Client::try_from(config.clone())?, settings);
    let leadership = elector.leadership();
    // Every write of the controllers goes through the fence: none leaves while this replica
    // cannot prove it holds the Lease.
    let client = ClientBuilder::try_from(config)?
        .with_layer(&leader::fence::layer(leadership.clone()))
        .build();
    wait_for_crds(&client, &args).await?;
    ready.set(true);
    elector.acquire().await;
    tokio::select! {
        stopped = controller::run_all(client, reporter, leadership, metrics, ready, namespace) => {
            // The controllers stopped on SIGTERM/SIGINT: hand the Lease over at once.
            elector.release().await;
            stopped?;
            Ok(())
        }
        _lost = elector.keep() => {
            // Exiting is the only way to be sure nothing of this replica acts any more; the
            // Deployment restarts it as a candidate, which acts again only once it wins the Lease.
            // The elector has logged why; exit at once, without unwinding the controllers.
            std::process::exit(1)
        }
    }
}

async fn wait_for_crds(client: &kube::Client, args: &Args) -> anyhow::Result<()> {
    startup::wait_for_crds(
        client,
        std::time::Duration::from_secs(args.crd_wait_seconds),
    )
    .await
}

/// The Lease settings from the flags and the pod's environment.
fn settings(args: &Args) -> Settings {
    let service_account_namespace =
        std::fs::read_to_string(leader::SERVICE_ACCOUNT_NAMESPACE_FILE).ok();
    // The kernel's host name (the pod name inside a pod); read from procfs to avoid unsafe FFI.
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap_or_else(|_| "unknown-host".to_string());
    Settings {
        namespace: leader::lease_namespace(
            args.leader_election_namespace.as_deref(),
            service_account_namespace.as_deref(),
        ),
        name: args.leader_election_lease_name.clone(),
        identity: leader::identity(args.pod_name.as_deref(), &hostname, std::process::id()),
        timing: Timing::DEFAULT,
    }
}
