//! Metrics of the gRPC calls a CSI server answers: how many, by method and code, and how long
//! they took, for the controller and the node plugin alike. Counted by a tower layer on the tonic
//! server ([`CallMetricsLayer`]), so no service counts for itself.
//!
//! A call's code is where gRPC puts it: in the response headers when the call failed before any
//! message (a "trailers-only" answer), else in the trailers after the last message; a response
//! body dropped before its trailers is a call the client cancelled. The method label takes only
//! the methods the driver's proto files declare (anything else is `unknown`), so a client cannot
//! grow the label set.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};
use livedisk_telemetry::Registry;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Unit;
use prost::Message;
use tonic::Code;
use tower::{Layer, Service};

/// Latency buckets, in seconds: from a Probe (milliseconds) to a call that waited the
/// controller's whole node wait (120 s by default).
const LATENCY_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    /// The gRPC service, e.g. `csi.v1.Controller`.
    pub service: String,
    /// The method, e.g. `CreateSnapshot`.
    pub method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    pub service: String,
    pub method: String,
    /// The gRPC status code, named as gRPC names it (`OK`, `NotFound`, ...).
    pub code: &'static str,
}

/// The call metrics of one server process.
pub struct CallMetrics {
    known: HashSet<String>,
    calls: Family<CallLabels, Counter>,
    durations: Family<MethodLabels, Histogram>,
}

impl CallMetrics {
    /// Registers the call metrics in `registry`; the methods known are those of the driver's
    /// proto files.
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let calls = Family::<CallLabels, Counter>::default();
        let durations = Family::<MethodLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(LATENCY_BUCKETS)) as fn() -> Histogram,
        );
        registry.register(
            "livedisk_csi_grpc_calls",
            "gRPC calls answered, by service, method and status code",
            calls.clone(),
        );
        registry.register_with_unit(
            "livedisk_csi_grpc_call_duration",
            "Time from a gRPC call's arrival to its status, by service and method",
            Unit::Seconds,
            durations.clone(),
        );
        Arc::new(Self {
            known: known_methods(livedisk_csi_proto::FILE_DESCRIPTOR_SET),
            calls,
            durations,
        })
    }

    fn record(&self, method: &MethodLabels, code: Code, seconds: f64) {
        self.calls
            .get_or_create(&CallLabels {
                service: method.service.clone(),
                method: method.method.clone(),
                code: code_name(code),
            })
            .inc();
        self.durations.get_or_create(method).observe(seconds);
    }
}

/// Pure: every `/package.Service/Method` path a file descriptor set declares.
pub fn known_methods(descriptor_set: &[u8]) -> HashSet<String> {
    let Ok(set) = prost_types::FileDescriptorSet::decode(descriptor_set) else {
        return HashSet::new();
    };
    set.file
        .iter()
        .flat_map(|file| {
            let package = file.package().to_string();
            file.service.iter().flat_map(move |service| {
                let package = package.clone();
                service
                    .method
                    .iter()
                    .map(move |method| format!("/{package}.{}/{}", service.name(), method.name()))
            })
        })
        .collect()
}

/// Pure: the labels of a request path; a path the proto files do not declare is `unknown`.
pub fn method_labels(path: &str, known: &HashSet<String>) -> MethodLabels {
    let split = path
        .strip_prefix('/')
        .and_then(|rest| rest.split_once('/'))
        .filter(|_| known.contains(path));
    match split {
        Some((service, method)) => MethodLabels {
            service: service.to_string(),
            method: method.to_string(),
        },
        None => MethodLabels {
            service: "unknown".into(),
            method: "unknown".into(),
        },
    }
}

/// Pure: the gRPC name of a status code, as gRPC's own libraries print it (so dashboards made
/// for other gRPC servers read these too). Exhaustive.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// Pure: the code in a `grpc-status` header or trailer, if there is one.
pub fn status_code(headers: &HeaderMap) -> Option<Code> {
    let value = headers.get("grpc-status")?.to_str().ok()?;
    value.trim().parse::<i32>().ok().map(Code::from_i32)
}

/// One call being answered: recorded exactly once, when its code is known, or as cancelled if
/// its response is dropped first.
struct Call {
    metrics: Arc<CallMetrics>,
    method: MethodLabels,
    started: Instant,
    recorded: bool,
}

impl Call {
    fn finish(&mut self, code: Code) {
        if !self.recorded {
            self.recorded = true;
            self.metrics
                .record(&self.method, code, self.started.elapsed().as_secs_f64());
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.finish(Code::Cancelled);
    }
}

/// The tower layer that counts every call of a tonic server.
#[derive(Clone)]
pub struct CallMetricsLayer {
    metrics: Arc<CallMetrics>,
}

impl CallMetricsLayer {
    pub fn new(metrics: Arc<CallMetrics>) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for CallMetricsLayer {
    type Service = CallMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CallMetricsService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct CallMetricsService<S> {
    inner: S,
    metrics: Arc<CallMetrics>,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for CallMetricsService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Send + 'static,
{
    type Response = Response<ObservedBody<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let mut call = Call {
            method: method_labels(request.uri().path(), &self.metrics.known),
            metrics: self.metrics.clone(),
            started: Instant::now(),
            recorded: false,
        };
        let answer = self.inner.call(request);
        Box::pin(async move {
            let (parts, body) = answer.await?.into_parts();
            // A trailers-only answer carries the status in its headers.
            if let Some(code) = status_code(&parts.headers) {
                call.finish(code);
            }
            Ok(Response::from_parts(
                parts,
                ObservedBody {
                    inner: body,
                    call: (!call.recorded).then_some(call),
                },
            ))
        })
    }
}

pin_project_lite::pin_project! {
    /// A response body that records its call's code when the trailers pass through.
    pub struct ObservedBody<B> {
        #[pin]
        inner: B,
        call: Option<Call>,
    }
}

impl<B: Body> Body for ObservedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Some(call) = this.call.as_mut() {
            match &polled {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(code) = frame.trailers_ref().and_then(status_code) {
                        call.finish(code);
                    }
                }
                // The stream broke, or ended without a status: the client sees no success.
                Poll::Ready(Some(Err(_))) | Poll::Ready(None) => call.finish(Code::Unknown),
                Poll::Pending => {}
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_known_methods_are_those_of_the_csi_proto() {
        let known = known_methods(livedisk_csi_proto::FILE_DESCRIPTOR_SET);
        for path in [
            "/csi.v1.Controller/CreateSnapshot",
            "/csi.v1.Controller/DeleteSnapshot",
            "/csi.v1.Node/NodeStageVolume",
            "/csi.v1.Identity/Probe",
        ] {
            assert!(known.contains(path), "{path} missing from {known:?}");
        }
        assert!(!known.contains("/csi.v1.Controller/Nope"));
    }

    #[test]
    fn paths_map_to_service_and_method_and_strangers_to_unknown() {
        let known = known_methods(livedisk_csi_proto::FILE_DESCRIPTOR_SET);
        assert_eq!(
            method_labels("/csi.v1.Controller/CreateSnapshot", &known),
            MethodLabels {
                service: "csi.v1.Controller".into(),
                method: "CreateSnapshot".into()
            }
        );
        for stranger in ["/csi.v1.Controller/Made-Up", "/x", "", "no-slash", "/a/b/c"] {
            assert_eq!(
                method_labels(stranger, &known).method,
                "unknown",
                "{stranger}"
            );
        }
    }

    #[test]
    fn codes_read_from_grpc_status_and_named_as_grpc_names_them() {
        let mut headers = HeaderMap::new();
        assert_eq!(status_code(&headers), None);
        headers.insert("grpc-status", "5".parse().unwrap());
        assert_eq!(status_code(&headers), Some(Code::NotFound));
        headers.insert("grpc-status", "0".parse().unwrap());
        assert_eq!(status_code(&headers).map(code_name), Some("OK"));
        headers.insert("grpc-status", "x".parse().unwrap());
        assert_eq!(status_code(&headers), None);
        assert_eq!(code_name(Code::Cancelled), "Canceled");
        assert_eq!(code_name(Code::FailedPrecondition), "FailedPrecondition");
    }

    #[test]
    fn a_call_is_recorded_once_and_a_dropped_one_as_cancelled() {
        let mut registry = Registry::default();
        let metrics = CallMetrics::register(&mut registry);
        let method = MethodLabels {
            service: "csi.v1.Identity".into(),
            method: "Probe".into(),
        };
        let call = |metrics: &Arc<CallMetrics>| Call {
            metrics: metrics.clone(),
            method: method.clone(),
            started: Instant::now(),
            recorded: false,
        };
        let mut answered = call(&metrics);
        answered.finish(Code::Ok);
        answered.finish(Code::Internal);
        drop(answered);
        drop(call(&metrics));
        let count = |code| {
            metrics
                .calls
                .get_or_create(&CallLabels {
                    service: method.service.clone(),
                    method: method.method.clone(),
                    code,
                })
                .get()
        };
        assert_eq!(
            (count("OK"), count("Internal"), count("Canceled")),
            (1, 0, 1)
        );
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(
                r#"livedisk_csi_grpc_calls_total{service="csi.v1.Identity",method="Probe",code="OK"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"livedisk_csi_grpc_call_duration_seconds_count{service="csi.v1.Identity",method="Probe"} 2"#),
            "{text}"
        );
    }
}
