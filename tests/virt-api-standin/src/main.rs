//! `virt-api-standin`: a STAND-IN for KubeVirt's virt-api, for the local test cluster only.
//!
//! KubeVirt freezes a guest's filesystems through virt-api's aggregated API
//! (`PUT /apis/subresources.kubevirt.io/v1/namespaces/NS/virtualmachineinstances/NAME/freeze`,
//! body `{"unfreezeTimeout": "5m0s"}`, and `.../unfreeze`), which virt-api hands to virt-handler
//! on the VM's node, which asks the guest agent through virt-launcher. None of KubeVirt's node
//! side can run on the local cluster, so this process plays all of it for those two calls:
//! registered with the real kube-apiserver as the APIService `v1.subresources.kubevirt.io`
//! (hack/cluster.sh does that), it is called through the API server like virt-api, with the
//! caller's own credentials; it authenticates the aggregator by its front-proxy client
//! certificate, authorizes the user with a SubjectAccessReview, answers as virt-api would, keeps
//! the guests' frozen state (with the guest agent's safety unfreeze), reports it in the VMI's
//! `status.fsFreezeStatus` as virt-handler would, and appends every call to a record file that
//! tests read. Two VMI annotations are test knobs (see [`api`]). A guest is frozen for real only
//! when its VMI names the socket of its real qemu-guest-agent (a third annotation, see [`guest`]):
//! then the stand-in asks that agent as virt-launcher would.

mod agent;
mod api;
mod auth;
mod duration;
mod guest;
mod record;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};

/// A TLS handshake that takes longer than this is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A stand-in for KubeVirt's virt-api freeze/unfreeze subresources (local test cluster only).
#[derive(Parser, Debug)]
#[command(name = "virt-api-standin", version)]
struct Args {
    /// The address to listen on (HTTPS).
    #[arg(
        long,
        env = "LIVEDISK_VIRT_API_STANDIN_ADDRESS",
        default_value = "127.0.0.1"
    )]
    address: IpAddr,
    /// The port to listen on; the APIService names it. hack/cluster.sh derives it from its API
    /// server port (+1) unless LIVEDISK_VIRT_API_STANDIN_PORT says otherwise.
    #[arg(long, env = "LIVEDISK_VIRT_API_STANDIN_PORT", default_value_t = 6444)]
    port: u16,
    /// The serving certificate (PEM, leaf first); the APIService's caBundle must verify it for
    /// the name `<service>.<namespace>.svc`.
    #[arg(long)]
    tls_cert_file: PathBuf,
    /// The serving certificate's key (PEM).
    #[arg(long)]
    tls_private_key_file: PathBuf,
    /// The CA of the API server's front-proxy client certificate (its
    /// --requestheader-client-ca-file): a client must show a certificate of it.
    #[arg(long)]
    requestheader_client_ca_file: PathBuf,
    /// Common names of that CA's certificates whose X-Remote-* headers are believed (the API
    /// server's --requestheader-allowed-names); empty: any.
    #[arg(long, value_delimiter = ',', default_value = "front-proxy-client")]
    requestheader_allowed_names: Vec<String>,
    /// The stand-in's own identity towards the API server (access reviews, VMIs); default: the
    /// usual KUBECONFIG / in-cluster inference.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// The call record: one JSON line per call, appended.
    #[arg(long)]
    record: PathBuf,
}

#[tokio::main]
async fn main() -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .init();
    let args = Args::parse();

    let tls = server_config(
        &args.tls_cert_file,
        &args.tls_private_key_file,
        &args.requestheader_client_ca_file,
    )?;
    let client = kube_client(args.kubeconfig.as_deref()).await?;
    let recorder = Arc::new(
        record::Recorder::open(&args.record)
            .with_context(|| format!("opening the call record {}", args.record.display()))?,
    );
    let server = Arc::new(api::Server {
        guests: guest::Guests::new(client.clone(), recorder.clone()),
        client,
        recorder,
        allowed_names: args
            .requestheader_allowed_names
            .into_iter()
            .filter(|n| !n.is_empty())
            .collect(),
    });
    let addr = SocketAddr::new(args.address, args.port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    tracing::info!(
        %addr,
        record = %args.record.display(),
        "virt-api stand-in serving {}/{} (freeze, unfreeze)",
        api::GROUP,
        api::VERSION
    );
    serve(listener, TlsAcceptor::from(tls), server).await;
    Ok(())
}

async fn kube_client(kubeconfig: Option<&Path>) -> Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .with_context(|| format!("using {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no --kubeconfig and none to infer")?,
    };
    kube::Client::try_from(config).context("building the API client")
}

/// Serving `cert`/`key`, and requiring a client certificate of `client_ca`.
fn server_config(cert: &Path, key: &Path, client_ca: &Path) -> Result<Arc<ServerConfig>> {
    let provider = Arc::new(ring::default_provider());
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .with_context(|| format!("reading {}", cert.display()))?;
    let key =
        PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading {}", key.display()))?;
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(client_ca)
        .with_context(|| format!("reading {}", client_ca.display()))?
    {
        let ca = ca.with_context(|| format!("reading {}", client_ca.display()))?;
        roots
            .add(ca)
            .with_context(|| format!("a CA certificate in {}", client_ca.display()))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .context("the client certificate verifier")?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .context("the serving certificate and its key")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Pure: the common name of a DER certificate.
fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

async fn serve(listener: tokio::net::TcpListener, acceptor: TlsAcceptor, server: Arc<api::Server>) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let (acceptor, server) = (acceptor.clone(), server.clone());
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => {
                    tracing::info!(%peer, %error, "TLS handshake refused");
                    return;
                }
                Err(_) => return,
            };
            let peer_cn = Arc::new(
                tls.get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|certs| certs.first())
                    .and_then(|cert| common_name(cert)),
            );
            let service = hyper::service::service_fn(move |request| {
                api::handle(server.clone(), peer_cn.clone(), request)
            });
            if let Err(error) = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), service)
                .await
            {
                tracing::debug!(%peer, %error, "connection ended");
            }
        });
    }
}
