//! The HTTPS listener of the front: `Range` reads of a snapshot export and its changed-extent
//! map, for backup tools that speak HTTP rather than NBD.
//!
//! * `HEAD /exports/NAME`: the size (`Content-Length`), `Accept-Ranges: bytes`.
//! * `GET /exports/NAME`, with one `Range: bytes=A-B` (206) or without (200, the whole image).
//! * `GET /exports/NAME/extents`: JSON `{snapshot, base, size, extents: [{offset, length}]}`, the
//!   extents changed since the export's base (404 for an export without one).
//!
//! A request is admitted by a bearer token (`Authorization: Bearer …`) or the client certificate
//! of the TLS handshake, either one named by a live grant of that export. Without any, 401; with
//! credentials of another export, 404 (as for an export that does not exist). Data is read from
//! the engine daemon's unix socket over NBD, one request per piece.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use livedisk_api::ExportProtocol;
use livedisk_engine::SnapshotId;
use livedisk_engine::nbd_client::NbdClient;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::Front;
use super::grants::{Credential, Grant, sha256_hex};

type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, std::io::Error>;

/// Largest single NBD read behind a response.
const PIECE: usize = 2 * 1024 * 1024;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// What a request asks for, decided from its method, path and `Range` header.
#[derive(Debug, PartialEq, Eq)]
pub enum Ask {
    Size {
        export: String,
    },
    Data {
        export: String,
        range: Option<(u64, Option<u64>)>,
    },
    Extents {
        export: String,
    },
}

/// Why a request is answered without data.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub message: String,
}

fn refusal(status: StatusCode, message: impl Into<String>) -> Refusal {
    Refusal {
        status,
        message: message.into(),
    }
}

/// Pure: the request's ask, or why it is refused.
pub fn parse(method: &Method, path: &str, range: Option<&str>) -> Result<Ask, Refusal> {
    let rest = path.strip_prefix("/exports/").ok_or_else(|| {
        refusal(
            StatusCode::NOT_FOUND,
            "no such path: exports are under /exports/NAME",
        )
    })?;
    let (export, extents) = match rest.strip_suffix("/extents") {
        Some(name) => (name, true),
        None => (rest, false),
    };
    if export.is_empty() || export.contains('/') {
        return Err(refusal(
            StatusCode::NOT_FOUND,
            "no such path: exports are under /exports/NAME",
        ));
    }
    let export = export.to_string();
    match (method, extents) {
        (&Method::GET, true) => Ok(Ask::Extents { export }),
        (&Method::HEAD, false) => Ok(Ask::Size { export }),
        (&Method::GET, false) => Ok(Ask::Data {
            export,
            range: range.map(parse_range).transpose()?,
        }),
        _ => Err(refusal(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET and HEAD are served",
        )),
    }
}

/// Pure: one `bytes=A-B` or `bytes=A-` range (inclusive end); suffix and multiple ranges are
/// refused.
pub fn parse_range(value: &str) -> Result<(u64, Option<u64>), Refusal> {
    let bad = |why: &str| refusal(StatusCode::RANGE_NOT_SATISFIABLE, why.to_string());
    let spec = value
        .trim()
        .strip_prefix("bytes=")
        .ok_or_else(|| bad("only byte ranges are served (Range: bytes=A-B)"))?;
    if spec.contains(',') {
        return Err(bad("one range per request"));
    }
    let (a, b) = spec.split_once('-').ok_or_else(|| bad("a range is A-B"))?;
    let start: u64 = a
        .trim()
        .parse()
        .map_err(|_| bad("a range's start is a byte offset (suffix ranges are not served)"))?;
    let end = match b.trim() {
        "" => None,
        b => Some(
            b.parse::<u64>()
                .map_err(|_| bad("a range's end is a byte offset"))?,
        ),
    };
    if end.is_some_and(|e| e < start) {
        return Err(bad("a range ends before it starts"));
    }
    Ok((start, end))
}

/// Pure: the byte span `[start, end)` a range selects of an image of `size` bytes.
pub fn span(range: Option<(u64, Option<u64>)>, size: u64) -> Result<(u64, u64), Refusal> {
    match range {
        None => Ok((0, size)),
        Some((start, _)) if start >= size => Err(refusal(
            StatusCode::RANGE_NOT_SATISFIABLE,
            format!("the range starts at or after the end of the {size}-byte image"),
        )),
        Some((start, end)) => Ok((start, end.map_or(size, |e| (e + 1).min(size)))),
    }
}

/// Pure: the request's credential: a bearer token first, else the TLS client certificate.
pub fn credential(authorization: Option<&str>, certificate: Option<&str>) -> Option<Credential> {
    let token = authorization
        .and_then(|a| a.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty());
    match (token, certificate) {
        (Some(t), _) => Some(Credential::Token(sha256_hex(t.as_bytes()))),
        (None, Some(c)) => Some(Credential::Certificate(c.to_string())),
        (None, None) => None,
    }
}

/// Serves the HTTPS listener until the process ends.
pub async fn serve(listener: TcpListener, front: Arc<Front>) {
    super::listener::accept_loop(listener, "HTTPS front", move |tcp, peer| {
        let front = front.clone();
        async move {
            let Some(config) = front.tls.https() else {
                tracing::info!(%peer, "HTTPS front: no certificate yet, connection refused");
                return;
            };
            let accepted =
                tokio::time::timeout(HANDSHAKE_TIMEOUT, TlsAcceptor::from(config).accept(tcp))
                    .await;
            let tls = match accepted {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => {
                    tracing::info!(%peer, %error, "HTTPS front: handshake refused");
                    return;
                }
                Err(_) => return,
            };
            let certificate = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| sha256_hex(c.as_ref()));
            let service = hyper::service::service_fn(move |request| {
                let front = front.clone();
                let certificate = certificate.clone();
                async move {
                    Ok::<_, Infallible>(answer(&front, certificate.as_deref(), request).await)
                }
            });
            if let Err(error) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .await
            {
                tracing::debug!(%peer, %error, "HTTPS front: connection ended");
            }
        }
    })
    .await
}

async fn answer(
    front: &Front,
    certificate: Option<&str>,
    request: Request<Incoming>,
) -> Response<Body> {
    match respond(front, certificate, &request).await {
        Ok(response) => response,
        Err(refused) => text(refused.status, &refused.message),
    }
}

async fn respond(
    front: &Front,
    certificate: Option<&str>,
    request: &Request<Incoming>,
) -> Result<Response<Body>, Refusal> {
    let header_str = |name| {
        request
            .headers()
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };
    let ask = parse(
        request.method(),
        request.uri().path(),
        header_str(header::RANGE),
    )?;
    let credential = credential(header_str(header::AUTHORIZATION), certificate).ok_or_else(|| {
        refusal(
            StatusCode::UNAUTHORIZED,
            "credentials required: Authorization: Bearer <token> or the export's client certificate",
        )
    })?;
    let export = match &ask {
        Ask::Size { export } | Ask::Data { export, .. } | Ask::Extents { export } => export,
    };
    let now = SystemTime::now();
    // After a start the grants come back as the node reconciles its exports again; until then
    // a request no grant admits may be one of theirs: retry (503), not refused for good.
    if front
        .grants
        .admit(ExportProtocol::Http, export, &credential, now)
        .is_none()
        && front.is_restoring()
    {
        return Err(refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "this node's export front has just started and is restoring its exports; retry in a few seconds",
        ));
    }
    let grant = match front
        .grants
        .admit(ExportProtocol::Http, export, &credential, now)
    {
        Some(grant) => grant,
        None if front
            .grants
            .visible(ExportProtocol::Http, &credential, now)
            .is_empty() =>
        {
            return Err(refusal(
                StatusCode::UNAUTHORIZED,
                "these credentials open no export on this node (wrong, withdrawn or expired)",
            ));
        }
        None => {
            return Err(refusal(
                StatusCode::NOT_FOUND,
                format!("no export {export:?} for these credentials"),
            ));
        }
    };
    match ask {
        Ask::Extents { .. } => extents(front, &grant).await,
        Ask::Size { .. } => {
            let nbd = open(&grant).await?;
            Ok(Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_LENGTH, nbd.size())
                .header(header::ACCEPT_RANGES, "bytes")
                .body(empty())
                .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "response")))
        }
        Ask::Data { range, .. } => {
            let nbd = open(&grant).await?;
            let size = nbd.size();
            let (start, end) = span(range, size)?;
            let status = if range.is_some() {
                StatusCode::PARTIAL_CONTENT
            } else {
                StatusCode::OK
            };
            let mut builder = Response::builder()
                .status(status)
                .header(header::CONTENT_LENGTH, end - start)
                .header(header::ACCEPT_RANGES, "bytes")
                .header(header::CONTENT_TYPE, "application/octet-stream");
            if range.is_some() {
                builder = builder.header(
                    header::CONTENT_RANGE,
                    format!("bytes {start}-{}/{size}", end.saturating_sub(1)),
                );
            }
            let body = data_body(nbd, grant.clone(), start, end);
            Ok(builder
                .body(body)
                .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "response")))
        }
    }
}

/// The changed-extent map of the export's base, from the engine's records.
async fn extents(front: &Front, grant: &Grant) -> Result<Response<Body>, Refusal> {
    let Some(base) = &grant.base else {
        return Err(refusal(
            StatusCode::NOT_FOUND,
            "this export has no base snapshot, so no changed-extent map (set baseSnapshotName)",
        ));
    };
    let internal = |e: String| refusal(StatusCode::INTERNAL_SERVER_ERROR, e);
    let snap = SnapshotId::parse(&grant.export).map_err(|e| internal(e.to_string()))?;
    let base_id = SnapshotId::parse(base).map_err(|e| internal(e.to_string()))?;
    let list = front
        .engine
        .changed_extents(&base_id, &snap)
        .await
        .map_err(|e| {
            internal(format!(
                "the engine could not list the changed extents: {e}"
            ))
        })?;
    let body = serde_json::json!({
        "snapshot": grant.export,
        "base": base,
        "size": list.volume_size,
        "extents": list.extents.iter().map(|e| serde_json::json!({"offset": e.offset, "length": e.length})).collect::<Vec<_>>(),
    });
    let bytes = Bytes::from(body.to_string());
    grant.count(bytes.len() as u64);
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, bytes.len())
        .body(
            Full::new(bytes)
                .map_err(|never| match never {})
                .boxed_unsync(),
        )
        .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "response")))
}

async fn open(grant: &Grant) -> Result<NbdClient, Refusal> {
    NbdClient::connect(&grant.backend_socket, &grant.backend_name)
        .await
        .map_err(|e| {
            refusal(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the engine does not serve export {} now: {e}", grant.export),
            )
        })
}

/// The bytes `[start, end)`, read piece by piece as the client takes them; the response ends
/// early (the client sees a short body) if the grant is withdrawn or a read fails.
fn data_body(nbd: NbdClient, grant: Arc<Grant>, start: u64, end: u64) -> Body {
    let revoked = grant.revocation();
    let pieces = futures::stream::unfold(
        (nbd, grant, start, revoked),
        move |(mut nbd, grant, at, revoked)| async move {
            if at >= end || *revoked.borrow() {
                return None;
            }
            let len = ((end - at) as usize).min(PIECE);
            let mut buf = vec![0u8; len];
            match nbd.read(at, &mut buf).await {
                Ok(()) => {
                    grant.count(len as u64);
                    let frame = Ok(Frame::data(Bytes::from(buf)));
                    Some((frame, (nbd, grant, at + len as u64, revoked)))
                }
                Err(error) => {
                    tracing::warn!(export = %grant.export, %error, "HTTPS front: read failed");
                    let e = std::io::Error::other(error.to_string());
                    Some((Err(e), (nbd, grant, end, revoked)))
                }
            }
        },
    );
    BodyExt::boxed_unsync(StreamBody::new(futures::StreamExt::boxed(pieces)))
}

fn empty() -> Body {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn text(status: StatusCode, message: &str) -> Response<Body> {
    let mut response = Response::new(
        Full::new(Bytes::from(format!("{message}\n")))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if status == StatusCode::UNAUTHORIZED {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_methods_map_to_asks() {
        assert_eq!(
            parse(&Method::HEAD, "/exports/snap-1", None),
            Ok(Ask::Size {
                export: "snap-1".into()
            })
        );
        assert_eq!(
            parse(&Method::GET, "/exports/snap-1", Some("bytes=0-4095")),
            Ok(Ask::Data {
                export: "snap-1".into(),
                range: Some((0, Some(4095)))
            })
        );
        assert_eq!(
            parse(&Method::GET, "/exports/snap-1/extents", None),
            Ok(Ask::Extents {
                export: "snap-1".into()
            })
        );
        assert_eq!(
            parse(&Method::GET, "/other", None).map_err(|r| r.status),
            Err(StatusCode::NOT_FOUND)
        );
        assert_eq!(
            parse(&Method::PUT, "/exports/snap-1", None).map_err(|r| r.status),
            Err(StatusCode::METHOD_NOT_ALLOWED)
        );
    }

    #[test]
    fn ranges_are_single_and_clipped_to_the_image() {
        assert_eq!(parse_range("bytes=10-"), Ok((10, None)));
        assert!(parse_range("bytes=0-1,4-5").is_err());
        assert!(parse_range("bytes=-500").is_err());
        assert!(parse_range("bytes=9-3").is_err());
        assert_eq!(span(Some((0, Some(99))), 50), Ok((0, 50)));
        assert_eq!(span(Some((10, None)), 50), Ok((10, 50)));
        assert_eq!(span(None, 50), Ok((0, 50)));
        assert!(span(Some((50, None)), 50).is_err());
    }

    #[test]
    fn a_bearer_token_comes_before_the_certificate() {
        assert_eq!(
            credential(Some("Bearer abc"), Some("pin")),
            Some(Credential::Token(sha256_hex(b"abc")))
        );
        assert_eq!(
            credential(None, Some("pin")),
            Some(Credential::Certificate("pin".into()))
        );
        assert_eq!(credential(Some("Basic x"), None), None);
        assert_eq!(credential(Some("Bearer "), None), None);
    }
}
