//! The server modes of the `livedisk-csi` binary: `controller`, `node`, and `frontends` (the
//! engine pod's front-end server).

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use livedisk_csi_proto::csi::v1::controller_server::ControllerServer;
use livedisk_csi_proto::csi::v1::group_controller_server::GroupControllerServer;
use livedisk_csi_proto::csi::v1::identity_server::IdentityServer;
use livedisk_csi_proto::csi::v1::node_server::NodeServer;
use tonic::transport::Server;

use crate::cluster::controller::ControllerService;
use crate::cluster::group::GroupControllerService;
use crate::grpc::identity::IdentityService;
use crate::grpc::metrics::{CallMetrics, CallMetricsLayer};
use crate::grpc::{authority, server};
use crate::metadata::{NodeMetadata, RelayMetadata, TlsDir};
use crate::node::agent::{self, Agent};
use crate::node::engine_health;
use crate::node::metrics::{EngineSlot, NodeMetrics};
use crate::node::registration::RegistrationHandle;
use crate::node::restore_work::RestoreGate;
use crate::node::service::NodeService;
use livedisk_csi_proto::csi::v1::snapshot_metadata_server::SnapshotMetadataServer;
use livedisk_engine::{DaemonPolicy, Engine, EngineConfig};
use livedisk_telemetry::{Endpoint, ReadyFlag, Registry, TelemetryArgs};

#[derive(Debug, Args)]
pub struct ControllerArgs {
    /// Where to serve CSI (Identity + Controller).
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    pub csi_endpoint: String,
    /// How long one CSI call waits for a node before answering DEADLINE_EXCEEDED.
    #[arg(long, env = "LIVEDISK_NODE_WAIT_SECONDS", default_value_t = 120)]
    pub node_wait_seconds: u64,
    /// Directory with `ca.crt`, `tls.crt`, `tls.key`: the client side of the nodes' private
    /// changed-block service. When set, the SnapshotMetadata service is served and relayed.
    #[arg(long, env = "LIVEDISK_NODE_GRPC_TLS_DIR")]
    pub node_tls_dir: Option<PathBuf>,
    /// The name the nodes' server certificate carries (checked by the controller).
    #[arg(long, env = "LIVEDISK_NODE_GRPC_SERVER_NAME", default_value = crate::metadata::NODE_TLS_NAME)]
    pub node_tls_server_name: String,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

#[derive(Debug, Args)]
pub struct NodeArgs {
    /// Where to serve CSI (Identity + Node).
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    pub csi_endpoint: String,
    /// This node's name (the Node object), usually from the downward API.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// The pool directory of this node's volumes.
    #[arg(long, env = "LIVEDISK_POOL", default_value = "/var/lib/livedisk/pools")]
    pub pool_dir: PathBuf,
    /// Runtime directory of this host's engine daemon (QMP and NBD sockets, attach state).
    #[arg(
        long,
        env = "LIVEDISK_RUNTIME_DIR",
        default_value = "/var/lib/livedisk/engine"
    )]
    pub engine_socket_dir: PathBuf,
    /// Address (ip:port) for the private changed-block service, served with mutual TLS.
    #[arg(long, env = "LIVEDISK_NODE_GRPC_LISTEN", requires = "node_tls_dir")]
    pub metadata_listen: Option<std::net::SocketAddr>,
    /// URL under which the controller reaches that service (reported in the LivediskNode).
    #[arg(
        long,
        env = "LIVEDISK_NODE_GRPC_ADVERTISE",
        requires = "metadata_listen"
    )]
    pub metadata_advertise: Option<String>,
    /// Directory with `ca.crt`, `tls.crt`, `tls.key` for the private service (server side).
    #[arg(long, env = "LIVEDISK_NODE_GRPC_TLS_DIR")]
    pub node_tls_dir: Option<PathBuf>,
    /// Address the export front binds (its NBD-over-TLS and HTTPS listeners). Unset: this node
    /// serves no exports (its LivediskExports fail with a message saying so).
    #[arg(long, env = "LIVEDISK_EXPORT_LISTEN")]
    pub export_listen: Option<std::net::IpAddr>,
    /// Host clients dial to reach the export front (in endpoints and the front's certificate).
    /// Default: the listen address.
    #[arg(long, env = "LIVEDISK_EXPORT_HOST", requires = "export_listen")]
    pub export_host: Option<String>,
    /// TCP port of the export front's NBD-over-TLS listener.
    #[arg(long, env = "LIVEDISK_EXPORT_NBD_PORT", default_value_t = 10809)]
    pub export_nbd_port: u16,
    /// TCP port of the export front's HTTPS listener.
    #[arg(long, env = "LIVEDISK_EXPORT_HTTPS_PORT", default_value_t = 10810)]
    pub export_https_port: u16,
    /// How long the node plugin waits for its engine daemon to come back once it is gone. The
    /// engine re-attaches to a restarted daemon by itself; after this long without one the
    /// plugin exits non-zero, so that it is restarted and opens its engine afresh.
    #[arg(long, env = "LIVEDISK_ENGINE_RECONNECT_SECONDS", default_value_t = 30)]
    pub engine_reconnect_seconds: u64,
    /// Who starts the host's engine daemon when none runs. `attach` where a daemon owner exists
    /// (the chart's engine pod): the plugin then waits for that daemon and never starts one in
    /// its own container, where it would go down with the plugin.
    #[arg(long, env = "LIVEDISK_ENGINE_DAEMON", value_enum, default_value_t = EngineDaemon::Start)]
    pub engine_daemon: EngineDaemon,
    /// kubelet's plugin registry directory (`<kubelet root>/plugins_registry`). When set, the
    /// node plugin registers itself with kubelet there (socket `csi.livedisk.io-reg.sock`), in
    /// place of the node-driver-registrar sidecar.
    #[arg(long, env = "LIVEDISK_REGISTRATION_DIR")]
    pub registration_dir: Option<PathBuf>,
    /// The CSI socket's path as kubelet sees it (what registration tells kubelet). Default: the
    /// path of --csi-endpoint, right when kubelet and the plugin share the mount namespace.
    #[arg(long, env = "LIVEDISK_KUBELET_CSI_ENDPOINT")]
    pub kubelet_csi_endpoint: Option<PathBuf>,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

/// Whether a process that finds no engine daemon on its host starts one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineDaemon {
    /// Start one (a host without an engine pod: `make up`'s processes, a bare host).
    Start,
    /// Only attach to the daemon its owner starts; wait for it (node plugin) or fail (admin).
    Attach,
}

impl From<EngineDaemon> for DaemonPolicy {
    fn from(d: EngineDaemon) -> Self {
        match d {
            EngineDaemon::Start => DaemonPolicy::StartWhenAbsent,
            EngineDaemon::Attach => DaemonPolicy::AttachOnly,
        }
    }
}

#[derive(Debug, Args)]
pub struct FrontEndsArgs {
    /// Runtime directory of this host's engine daemon (the node plugin's --engine-socket-dir):
    /// the server listens on `frontends.sock` in it and mounts each volume's front end at
    /// `attach/<volume>/fuse`.
    #[arg(
        long,
        env = "LIVEDISK_RUNTIME_DIR",
        default_value = "/var/lib/livedisk/engine"
    )]
    pub engine_socket_dir: PathBuf,
    /// Log format: `text` for people, `json` (one object per line) for log pipelines.
    #[arg(long, env = "LIVEDISK_LOG_FORMAT", value_enum, default_value_t = livedisk_telemetry::LogFormat::Text)]
    pub log_format: livedisk_telemetry::LogFormat,
}

/// Serves the front-end API until SIGTERM. The front ends keep serving after it stops (a
/// restarted server adopts them); they end only when stopped through the API, or with the
/// container (or host) they run in.
pub async fn frontends(args: FrontEndsArgs) -> Result<()> {
    let server = crate::frontends::FrontEndServer::start(&args.engine_socket_dir).await?;
    server::shutdown_signal().await;
    server.stop().await
}

fn reflection() -> Result<
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(livedisk_csi_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building gRPC reflection")
}

/// Serves the controller until SIGTERM. Ready (`/readyz`) once its API client is made and its
/// socket bound: it keeps no state of its own to load.
pub async fn controller(args: ControllerArgs) -> Result<()> {
    let mut registry = Registry::default();
    let calls = CallMetrics::register(&mut registry);
    let ready = ReadyFlag::default();
    let _endpoint = Endpoint::from_args(&args.telemetry, registry, ready.check())
        .await
        .context("starting the telemetry endpoint")?;
    let client = kube::Client::try_default()
        .await
        .context("connecting to the API server")?;
    let path = server::socket_path(&args.csi_endpoint)?;
    let listener = server::bind(&path)?;
    tracing::info!(socket = %path.display(), "CSI controller serving");
    ready.set(true);
    let relay = match &args.node_tls_dir {
        Some(dir) => Some(SnapshotMetadataServer::new(RelayMetadata {
            client: client.clone(),
            tls: TlsDir::load(dir)?.client(&args.node_tls_server_name),
        })),
        None => None,
    };
    // One controller for both services: they share its in-flight calls and its timeout.
    let controller = Arc::new(ControllerService::new(
        client,
        Duration::from_secs(args.node_wait_seconds),
    ));
    Server::builder()
        .layer(CallMetricsLayer::new(calls))
        .add_service(IdentityServer::new(IdentityService {
            controller: true,
            snapshot_metadata: relay.is_some(),
            readiness: None,
        }))
        .add_service(ControllerServer::from_arc(controller.clone()))
        .add_service(GroupControllerServer::new(GroupControllerService::new(
            controller,
        )))
        .add_optional_service(relay)
        .add_service(reflection()?)
        .serve_with_incoming_shutdown(authority::incoming(listener), server::shutdown_signal())
        .await
        .context("serving CSI")?;
    Ok(())
}

/// Serves the node plugin and runs its agent until SIGTERM, or until its engine has had no daemon
/// for `--engine-reconnect-seconds` (then it returns an error: the process exits non-zero).
/// Ready (`/readyz`) exactly when Probe says ready: while its engine's session with the daemon
/// is live.
pub async fn node(args: NodeArgs) -> Result<()> {
    // The endpoint answers probes from the start, while the engine still recovers its pool.
    let mut registry = Registry::default();
    let calls = CallMetrics::register(&mut registry);
    let opened: EngineSlot = Arc::new(OnceLock::new());
    let node_metrics = NodeMetrics::register(&mut registry, opened.clone());
    let engine_ready = {
        let opened = opened.clone();
        Arc::new(move || {
            opened
                .get()
                .is_some_and(|engine| engine_health::ready(engine.session()))
        })
    };
    let _endpoint = Endpoint::from_args(&args.telemetry, registry, engine_ready)
        .await
        .context("starting the telemetry endpoint")?;
    let client = kube::Client::try_default()
        .await
        .context("connecting to the API server")?;
    let engine = Arc::new(
        Engine::open_with(
            EngineConfig {
                pool: args.pool_dir.clone(),
                runtime_dir: args.engine_socket_dir.clone(),
            },
            args.engine_daemon.into(),
        )
        .await
        .context("opening the engine")?,
    );
    let _ = opened.set(engine.clone());
    let path = server::socket_path(&args.csi_endpoint)?;
    let listener = server::bind(&path)?;
    // Registration starts once the CSI socket listens: kubelet calls NodeGetInfo on it as soon
    // as it has registered the driver.
    let registration = match &args.registration_dir {
        Some(dir) => Some(RegistrationHandle::start(
            dir,
            args.kubelet_csi_endpoint.as_deref().unwrap_or(&path),
        )?),
        None => None,
    };
    let restores = RestoreGate::start(client.clone(), &args.node_name);
    let front = match args.export_listen {
        Some(listen) => {
            let config = crate::export::FrontConfig {
                listen,
                host: args
                    .export_host
                    .clone()
                    .unwrap_or_else(|| listen.to_string()),
                nbd_port: args.export_nbd_port,
                https_port: args.export_https_port,
            };
            Some(
                crate::export::Front::start(
                    config,
                    engine.clone(),
                    client.clone(),
                    &args.node_name,
                )
                .await
                .context("starting the export front")?,
            )
        }
        None => None,
    };
    let remote = crate::node::remote_attach::RemoteAttacher::new(
        client.clone(),
        args.node_name.clone(),
        engine.clone(),
        front.clone(),
    );
    let served = front.as_ref().map(|f| f.grants.clone());
    // One call per volume at a time across the CSI node service and the node agent: serving or
    // withdrawing another node's attachment shares the volume's engine export with a local
    // NodeStage/NodeUnstage, whose front end must not lose it between its export and its connect.
    let volume_calls = crate::grpc::inflight::InFlight::default();
    let node_agent = Arc::new(Agent {
        client,
        engine: engine.clone(),
        node_name: args.node_name.clone(),
        metadata_endpoint: args.metadata_advertise.clone(),
        metrics: node_metrics,
        merges: Default::default(),
        imports: Default::default(),
        front,
        volume_calls: volume_calls.clone(),
        group_turns: Default::default(),
    });
    let metadata_task = match (args.metadata_listen, &args.node_tls_dir) {
        (Some(listen), Some(dir)) => {
            let tls = TlsDir::load(dir)?.server();
            let service = SnapshotMetadataServer::new(NodeMetadata {
                engine: engine.clone(),
            });
            let server = Server::builder()
                .tls_config(tls)
                .context("TLS for the changed-block service")?
                .layer(CallMetricsLayer::new(calls.clone()))
                .add_service(service)
                .serve_with_shutdown(listen, server::shutdown_signal());
            tracing::info!(%listen, "private changed-block service (mutual TLS) serving");
            Some(tokio::spawn(server))
        }
        _ => None,
    };
    let agent_task = tokio::spawn(agent::run(node_agent));
    let (gave_up, gave_up_reason) = tokio::sync::oneshot::channel();
    let abandoned = engine_health::abandoned(
        engine.session_changes(),
        Duration::from_secs(args.engine_reconnect_seconds),
    );
    let shutdown = async move {
        tokio::select! {
            () = server::shutdown_signal() => {}
            reason = abandoned => {
                tracing::error!(reason, "giving up on the engine daemon");
                let _ = gave_up.send(reason);
            }
        }
    };
    tracing::info!(socket = %path.display(), node = %args.node_name, "CSI node plugin serving");
    Server::builder()
        .layer(CallMetricsLayer::new(calls))
        .add_service(IdentityServer::new(IdentityService {
            controller: false,
            snapshot_metadata: false,
            readiness: Some(engine.clone()),
        }))
        .add_service(NodeServer::new(NodeService::new(
            engine,
            &args.engine_socket_dir,
            args.node_name,
            restores,
            remote,
            served,
            volume_calls,
        )))
        .add_service(reflection()?)
        .serve_with_incoming_shutdown(authority::incoming(listener), shutdown)
        .await
        .context("serving CSI")?;
    agent_task.abort();
    if let Some(task) = metadata_task {
        task.abort();
    }
    if let Some(registration) = registration {
        registration.stop().await?;
    }
    match gave_up_reason.await {
        Ok(reason) => anyhow::bail!(reason),
        Err(_) => Ok(()),
    }
}
