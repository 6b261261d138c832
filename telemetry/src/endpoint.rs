//! The HTTPS endpoint: `/healthz`, `/readyz` (anyone; they say only ok / not ok) and `/metrics`
//! (an authorized bearer token; see [`crate::auth`]).
//!
//! It runs on a thread with a runtime of its own, so a stuck main runtime cannot silence it: the
//! probes then tell kubelet the truth (see [`crate::health`]), and scraping never competes with
//! the I/O path for the main runtime's workers. Metrics are encoded on a blocking thread, since
//! some collectors read the disk (the node plugin's pool and records).
//!
//! The TLS accept loop is written here (tokio-rustls + hyper-util's connection builder, as in
//! axum's own TLS example) rather than taken from axum-server: it is a few lines over crates the
//! tree already has, with the rustls provider (ring) the kube client uses.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use prometheus_client::encoding::prometheus_text;
use prometheus_client::registry::Registry;
use tokio_rustls::TlsAcceptor;

use crate::args::TelemetryArgs;
use crate::auth::{Authorizer, Decision};
use crate::error::TelemetryError;
use crate::health::{Heartbeat, ReadyCheck};
use crate::tls::{ServingCert, self_signed_names};

/// A TLS handshake that takes longer than this is dropped (a stalled or hostile client).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct EndpointConfig {
    pub addr: SocketAddr,
    /// `tls.crt` + `tls.key`; `None`: self-signed at start.
    pub tls_dir: Option<PathBuf>,
    pub registry: Registry,
    pub ready: ReadyCheck,
    /// How to reach the API server for token and access reviews (the process's own identity).
    pub kube: kube::Config,
}

/// A running endpoint. It serves until the process exits.
pub struct Endpoint {
    local_addr: SocketAddr,
}

struct Shared {
    authorizer: Authorizer,
    registry: Arc<Registry>,
    ready: ReadyCheck,
    heartbeat: Heartbeat,
}

impl Endpoint {
    /// The endpoint the flags ask for, or `None` without `--metrics-addr`. Call from the main
    /// runtime (its heartbeat starts there).
    pub async fn from_args(
        args: &TelemetryArgs,
        registry: Registry,
        ready: ReadyCheck,
    ) -> Result<Option<Self>, TelemetryError> {
        let Some(addr) = args.metrics_addr else {
            return Ok(None);
        };
        let kube = kube::Config::infer()
            .await
            .map_err(|e| TelemetryError::KubeConfig(e.to_string()))?;
        Self::start(EndpointConfig {
            addr,
            tls_dir: args.metrics_tls_dir.clone(),
            registry,
            ready,
            kube,
        })
        .map(Some)
    }

    /// Binds, loads (or makes) the certificate and starts serving; every failure is returned
    /// here, before the process goes on. Call from the main runtime.
    pub fn start(config: EndpointConfig) -> Result<Self, TelemetryError> {
        let cert = match &config.tls_dir {
            Some(dir) => ServingCert::load(dir)?,
            None => ServingCert::self_signed(self_signed_names(config.addr.ip(), hostname()))?,
        };
        let acceptor = TlsAcceptor::from(cert.server_config()?);
        let bind = |source| TelemetryError::Bind {
            addr: config.addr,
            source,
        };
        let listener = std::net::TcpListener::bind(config.addr).map_err(bind)?;
        listener.set_nonblocking(true).map_err(bind)?;
        let local_addr = listener.local_addr().map_err(bind)?;
        let heartbeat = Heartbeat::start();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(TelemetryError::Thread)?;
        // The client's background worker is spawned on the endpoint's own runtime.
        let client = {
            let _entered = runtime.enter();
            kube::Client::try_from(config.kube).map_err(TelemetryError::Review)?
        };
        let shared = Arc::new(Shared {
            authorizer: Authorizer::new(client),
            registry: Arc::new(config.registry),
            ready: config.ready,
            heartbeat,
        });
        let listener = {
            let _entered = runtime.enter();
            tokio::net::TcpListener::from_std(listener).map_err(bind)?
        };
        std::thread::Builder::new()
            .name("telemetry".into())
            .spawn(move || runtime.block_on(serve(listener, acceptor, router(shared))))
            .map_err(TelemetryError::Thread)?;
        tracing::info!(addr = %local_addr, "telemetry endpoint serving (HTTPS: /healthz, /readyz, /metrics)");
        Ok(Self { local_addr })
    }

    /// The address it listens on (the port the system chose for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(shared)
}

async fn serve(listener: tokio::net::TcpListener, acceptor: TlsAcceptor, app: Router) {
    loop {
        let (tcp, _peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors and the like: pause instead of spinning.
                tracing::warn!(%error, "telemetry endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            let Ok(Ok(tls)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
            else {
                return;
            };
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), TowerToHyperService::new(app))
                .await;
        });
    }
}

/// Pure: a probe's answer.
fn probe_answer(ok: bool) -> (StatusCode, &'static str) {
    if ok {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ok\n")
    }
}

async fn healthz(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    probe_answer(shared.heartbeat.alive(Instant::now()))
}

async fn readyz(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    probe_answer(shared.heartbeat.alive(Instant::now()) && (shared.ready)())
}

async fn metrics(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match shared.authorizer.decide(authorization).await {
        Ok(Decision::Allowed) => {}
        Ok(Decision::Unauthenticated) => {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                "Unauthorized\n",
            )
                .into_response();
        }
        Ok(Decision::Forbidden) => return (StatusCode::FORBIDDEN, "Forbidden\n").into_response(),
        Err(error) => {
            tracing::warn!(%error, "could not review a scraper's token");
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "cannot review the token now\n",
            )
                .into_response();
        }
    }
    let registry = shared.registry.clone();
    let encoded = tokio::task::spawn_blocking(move || {
        let mut text = String::new();
        prometheus_text::encode(&mut text, &registry).map(|()| text)
    })
    .await;
    match encoded {
        Ok(Ok(text)) => (
            [(header::CONTENT_TYPE, prometheus_text::CONTENT_TYPE)],
            text,
        )
            .into_response(),
        Ok(Err(_)) | Err(_) => {
            tracing::warn!("encoding the metrics failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n").into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::counter::Counter;

    use super::*;
    use crate::client;
    use crate::health::ReadyFlag;

    /// An endpoint on a free loopback port whose API server does not exist: enough for
    /// everything that needs no review (the real reviews are tested on the local cluster).
    fn endpoint(ready: ReadyFlag) -> Endpoint {
        let mut registry = Registry::default();
        let counter: Counter = Counter::default();
        registry.register("livedisk_test_things", "Things.", counter);
        let kube = kube::Config::new("https://127.0.0.1:1".parse().unwrap());
        Endpoint::start(EndpointConfig {
            addr: "127.0.0.1:0".parse().unwrap(),
            tls_dir: None,
            registry,
            ready: ready.check(),
            kube,
        })
        .expect("endpoint starts")
    }

    #[tokio::test]
    async fn probes_answer_over_tls_and_metrics_want_a_token() {
        let ready = ReadyFlag::default();
        let endpoint = endpoint(ready.clone());
        let addr = endpoint.local_addr();
        let tls = client::Tls::Unverified;
        let get = |path: &'static str| client::get(addr, "localhost", &tls, path, None);
        let healthz = get("/healthz").await.expect("healthz");
        assert_eq!((healthz.status, healthz.body.as_str()), (200, "ok\n"));
        let readyz = get("/readyz").await.expect("readyz");
        assert_eq!((readyz.status, readyz.body.as_str()), (503, "not ok\n"));
        ready.set(true);
        assert_eq!(get("/readyz").await.expect("readyz").status, 200);
        let anonymous = get("/metrics").await.expect("metrics");
        assert_eq!(anonymous.status, 401);
        assert!(!anonymous.body.contains("livedisk_test_things"));
        let basic = client::get(addr, "localhost", &tls, "/metrics", Some("Basic eDp5"))
            .await
            .expect("metrics");
        assert_eq!(basic.status, 401);
        assert_eq!(get("/other").await.expect("other").status, 404);
    }

    #[tokio::test]
    async fn a_certificate_from_the_tls_dir_is_served_and_verifiable() {
        let dir = tempfile::tempdir().unwrap();
        let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        std::fs::write(dir.path().join("tls.crt"), made.cert.pem()).unwrap();
        std::fs::write(dir.path().join("tls.key"), made.signing_key.serialize_pem()).unwrap();
        let endpoint = Endpoint::start(EndpointConfig {
            addr: "127.0.0.1:0".parse().unwrap(),
            tls_dir: Some(dir.path().to_path_buf()),
            registry: Registry::default(),
            ready: ReadyFlag::default().check(),
            kube: kube::Config::new("https://127.0.0.1:1".parse().unwrap()),
        })
        .expect("endpoint starts");
        let trusted = client::Tls::Trust(vec![made.cert.der().clone()]);
        let reply = client::get(
            endpoint.local_addr(),
            "localhost",
            &trusted,
            "/healthz",
            None,
        )
        .await
        .expect("a verified connection");
        assert_eq!(reply.status, 200);
        let other = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let wrong = client::Tls::Trust(vec![other.cert.der().clone()]);
        assert!(
            client::get(endpoint.local_addr(), "localhost", &wrong, "/healthz", None)
                .await
                .is_err(),
            "a certificate from another issuer was accepted"
        );
    }

    #[test]
    fn a_busy_port_is_an_error_at_start() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let _entered = runtime.enter();
        let error = Endpoint::start(EndpointConfig {
            addr: taken.local_addr().unwrap(),
            tls_dir: None,
            registry: Registry::default(),
            ready: ReadyFlag::default().check(),
            kube: kube::Config::new("https://127.0.0.1:1".parse().unwrap()),
        })
        .err()
        .expect("port in use");
        assert!(matches!(error, TelemetryError::Bind { .. }), "{error}");
    }
}
