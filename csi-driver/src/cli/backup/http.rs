//! The HTTPS client of the node's export front: `HEAD` for the size, `GET` of one byte range,
//! `GET …/extents` for the changed-extent map. HTTP/1.1 over rustls (ring provider); the only
//! trusted root is the CA from the credentials, and the server name is the URL's host (an IP
//! address as well as a DNS name).
//!
//! Each in-flight request has a [`Connection`] of its own that is kept alive between requests.
//! Answers are sorted into success, a transient failure (connection errors, 5xx, a body that
//! ends early: the caller retries) and a refusal (4xx: retrying cannot help).

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use http_body_util::{BodyExt, Empty};
use hyper::body::{Bytes, Incoming};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

use super::credentials::Credentials;
use super::error::BackupError;
use super::plan::{self, Extent};
use super::retry::Retry;
use super::url::ExportUrl;

/// Longest wait for a connection, an answer's head or the next piece of its body: a front that
/// stalls this long is treated like one that dropped the connection.
const STALL: Duration = Duration::from_secs(30);
/// How much of an error answer's text is kept for the message.
const ERROR_TEXT: usize = 2048;
/// Largest extent map accepted (about 6 million extents), so a broken front cannot exhaust memory.
const MAX_MAP: usize = 256 << 20;

/// The changed-extent map of an export with a base, as `GET …/extents` answers it.
#[derive(Debug, Clone, Deserialize)]
pub struct ExtentMap {
    pub snapshot: String,
    pub base: String,
    pub size: u64,
    pub extents: Vec<Extent>,
}

/// Why a request did not succeed.
#[derive(Debug)]
pub enum Failure {
    /// Worth another attempt: the front may be restarting.
    Retry(String),
    /// Stop: retrying gives the same answer.
    Fatal(BackupError),
}

/// What an answer's status means for a request that succeeds with `expected`.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Success,
    Retry,
    Refused,
    Unexpected,
}

/// Pure: sorts a status. Timeouts and rate limits (408, 429) are transient like 5xx.
pub fn verdict(status: StatusCode, expected: StatusCode) -> Verdict {
    if status == expected {
        Verdict::Success
    } else if status.is_server_error()
        || status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
    {
        Verdict::Retry
    } else if status.is_client_error() {
        Verdict::Refused
    } else {
        Verdict::Unexpected
    }
}

/// The front of one export: where it is, how to reach it, what to show it.
pub struct Client {
    pub url: ExportUrl,
    server_name: ServerName<'static>,
    connector: TlsConnector,
    authorization: HeaderValue,
}

impl Client {
    pub fn new(url: ExportUrl, credentials: &Credentials) -> Result<Arc<Self>, BackupError> {
        let tls = |why: String| BackupError::Tls {
            url: url.url.clone(),
            why,
        };
        let mut roots = RootCertStore::empty();
        for cert in &credentials.ca {
            roots
                .add(cert.clone())
                .map_err(|e| tls(format!("the CA certificate: {e}")))?;
        }
        let mut config = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let server_name = ServerName::try_from(url.host.clone()).map_err(|e| BackupError::Url {
            url: url.url.clone(),
            why: format!("host {:?}: {e}", url.host),
        })?;
        let mut authorization = HeaderValue::from_str(&format!("Bearer {}", credentials.token))
            .map_err(|_| BackupError::Credentials {
                path: "token".into(),
                why: "the token is not a valid header value".into(),
            })?;
        authorization.set_sensitive(true);
        Ok(Arc::new(Self {
            url,
            server_name,
            connector: TlsConnector::from(Arc::new(config)),
            authorization,
        }))
    }

    /// A connection of its own for one worker (opened at its first request).
    pub fn connection(self: &Arc<Self>) -> Connection {
        Connection {
            client: self.clone(),
            sender: None,
        }
    }
}

/// One kept-alive HTTP/1.1 connection to the front, reopened after any failure.
pub struct Connection {
    client: Arc<Client>,
    sender: Option<SendRequest<Empty<Bytes>>>,
}

impl Connection {
    pub fn url(&self) -> &ExportUrl {
        &self.client.url
    }

    /// `HEAD` of the export: its size.
    pub async fn size(&mut self) -> Result<u64, Failure> {
        let path = self.client.url.path.clone();
        let response = self
            .answer(Method::HEAD, &path, None, StatusCode::OK)
            .await?;
        let size = response
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        self.finish(response).await?;
        size.ok_or_else(|| self.protocol(&path, "the HEAD answer has no Content-Length".into()))
    }

    /// `GET …/extents`: the extents changed since the export's base, checked.
    pub async fn extent_map(&mut self) -> Result<ExtentMap, Failure> {
        let path = self.client.url.extents_path();
        let response = self
            .answer(Method::GET, &path, None, StatusCode::OK)
            .await?;
        let body = self.body(response, MAX_MAP, None).await?;
        let map: ExtentMap = serde_json::from_slice(&body).map_err(|e| {
            self.protocol(
                &path,
                format!("the extent map is not the expected JSON: {e}"),
            )
        })?;
        plan::check_extents(&map.extents, map.size)
            .map_err(|why| self.protocol(&path, format!("the extent map is invalid: {why}")))?;
        Ok(map)
    }

    /// `GET` of exactly `extent` of an image of `size` bytes.
    pub async fn read(&mut self, extent: Extent, size: u64) -> Result<Vec<u8>, Failure> {
        let path = self.client.url.path.clone();
        let response = self
            .answer(
                Method::GET,
                &path,
                Some(extent),
                StatusCode::PARTIAL_CONTENT,
            )
            .await?;
        let range = response
            .headers()
            .get(header::CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| "the 206 answer has no Content-Range".to_string())
            .and_then(plan::parse_content_range)
            .and_then(|got| plan::check_answer(extent, size, &got));
        if let Err(why) = range {
            self.sender = None;
            return Err(self.protocol(&path, why));
        }
        let length = usize::try_from(extent.length)
            .map_err(|_| self.protocol(&path, "the range is larger than memory".into()))?;
        self.body(response, length, Some(length)).await
    }

    /// Sends a request and sorts its answer: the response when its status is `expected`.
    async fn answer(
        &mut self,
        method: Method,
        path: &str,
        range: Option<Extent>,
        expected: StatusCode,
    ) -> Result<Response<Incoming>, Failure> {
        let response = self.send(&method, path, range).await?;
        let status = response.status();
        match verdict(status, expected) {
            Verdict::Success => Ok(response),
            Verdict::Retry => {
                let text = self.reason(&method, path, response).await;
                Err(Failure::Retry(format!(
                    "{method} answered {status}: {text}"
                )))
            }
            Verdict::Refused => {
                let text = self.reason(&method, path, response).await;
                Err(Failure::Fatal(BackupError::Refused {
                    url: self.client.url.at(path),
                    status: status.as_u16(),
                    message: text,
                }))
            }
            Verdict::Unexpected => {
                self.sender = None;
                Err(self.protocol(
                    path,
                    format!("{method} answered {status}, expected {expected}"),
                ))
            }
        }
    }

    /// Sends one request on the kept-alive connection, or on a new one. A kept-alive
    /// connection that the front closed while idle fails before any answer; that is no fault of
    /// the front, so the request goes once more on a fresh connection without counting as a
    /// failure.
    async fn send(
        &mut self,
        method: &Method,
        path: &str,
        range: Option<Extent>,
    ) -> Result<Response<Incoming>, Failure> {
        if let Some(mut sender) = self.sender.take()
            && sender.ready().await.is_ok()
            && let Ok(Ok(response)) = timeout(
                STALL,
                sender.send_request(self.request(method, path, range)?),
            )
            .await
        {
            self.sender = Some(sender);
            return Ok(response);
        }
        let mut sender = self.connect().await?;
        let response = match timeout(
            STALL,
            sender.send_request(self.request(method, path, range)?),
        )
        .await
        {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => return Err(Failure::Retry(format!("{method}: {}", causes(&e)))),
            Err(_) => {
                return Err(Failure::Retry(format!(
                    "{method}: no answer for {} s",
                    STALL.as_secs()
                )));
            }
        };
        self.sender = Some(sender);
        Ok(response)
    }

    fn request(
        &self,
        method: &Method,
        path: &str,
        range: Option<Extent>,
    ) -> Result<Request<Empty<Bytes>>, Failure> {
        let mut request = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(header::HOST, &self.client.url.authority)
            .header(header::AUTHORIZATION, self.client.authorization.clone())
            .header(
                header::USER_AGENT,
                concat!("livedisk-csi-backup/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(extent) = range {
            request = request.header(header::RANGE, extent.range_header());
        }
        request
            .body(Empty::new())
            .map_err(|e| self.protocol(path, format!("building the request: {e}")))
    }

    /// A new TCP + TLS connection and its HTTP/1.1 handshake.
    async fn connect(&self) -> Result<SendRequest<Empty<Bytes>>, Failure> {
        let url = &self.client.url;
        let stalled =
            |what: &str| Failure::Retry(format!("{what}: no answer for {} s", STALL.as_secs()));
        let tcp = timeout(STALL, TcpStream::connect((url.host.as_str(), url.port)))
            .await
            .map_err(|_| stalled("connecting"))?
            .map_err(|e| Failure::Retry(format!("connecting to {}: {e}", url.authority)))?;
        // Without Nagle the small requests go out at once (the answers are what is large).
        let _ = tcp.set_nodelay(true);
        let tls = timeout(
            STALL,
            self.client
                .connector
                .connect(self.client.server_name.clone(), tcp),
        )
        .await
        .map_err(|_| stalled("TLS handshake"))?
        .map_err(|e| self.tls_failure(e))?;
        let (sender, connection) = timeout(STALL, http1::handshake(TokioIo::new(tls)))
            .await
            .map_err(|_| stalled("HTTP handshake"))?
            .map_err(|e| Failure::Retry(format!("HTTP handshake: {}", causes(&e))))?;
        // The connection task ends when the sender is dropped or the front closes it; its
        // errors reach the request that was in flight.
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(sender)
    }

    /// A certificate the CA did not sign (or not for this host) is refused for good; anything
    /// else in a handshake (a front going down under it) is transient.
    fn tls_failure(&self, error: std::io::Error) -> Failure {
        use tokio_rustls::rustls::Error as Tls;
        match error.get_ref().and_then(|e| e.downcast_ref::<Tls>()) {
            Some(
                e @ (Tls::InvalidCertificate(_)
                | Tls::NoCertificatesPresented
                | Tls::UnsupportedNameType),
            ) => Failure::Fatal(BackupError::Tls {
                url: self.client.url.url.clone(),
                why: format!("the front's certificate is refused: {e}"),
            }),
            _ => Failure::Retry(format!("TLS handshake: {error}")),
        }
    }

    /// Reads a body of at most `limit` bytes (exactly `exact` when given); a body that ends
    /// early or stalls is transient (the front went away mid-answer), one that is too long is
    /// a protocol error. The connection is kept only after a whole body.
    async fn body(
        &mut self,
        response: Response<Incoming>,
        limit: usize,
        exact: Option<usize>,
    ) -> Result<Vec<u8>, Failure> {
        let mut body = response.into_body();
        let mut buf = Vec::with_capacity(exact.unwrap_or(0));
        loop {
            let frame = match timeout(STALL, body.frame()).await {
                Err(_) => {
                    self.sender = None;
                    return Err(Failure::Retry(format!(
                        "the answer stalled for {} s",
                        STALL.as_secs()
                    )));
                }
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    self.sender = None;
                    return Err(Failure::Retry(format!(
                        "the answer broke off after {} bytes: {}",
                        buf.len(),
                        causes(&e)
                    )));
                }
                Ok(Some(Ok(frame))) => frame,
            };
            if let Ok(data) = frame.into_data() {
                if buf.len() + data.len() > limit {
                    self.sender = None;
                    let path = self.client.url.path.clone();
                    return Err(
                        self.protocol(&path, format!("the answer is longer than {limit} bytes"))
                    );
                }
                buf.extend_from_slice(&data);
            }
        }
        if let Some(want) = exact
            && buf.len() != want
        {
            self.sender = None;
            return Err(Failure::Retry(format!(
                "the answer ended after {} of {want} bytes",
                buf.len()
            )));
        }
        Ok(buf)
    }

    /// Drains a body without data (HEAD) so the connection can be reused.
    async fn finish(&mut self, response: Response<Incoming>) -> Result<(), Failure> {
        self.body(response, ERROR_TEXT, None).await.map(|_| ())
    }

    /// Why the front refused: the text of its answer; for a `HEAD`, which has no body, the text
    /// of the same refusal to a one-byte `GET`, so the message says why rather than only the
    /// status.
    async fn reason(
        &mut self,
        method: &Method,
        path: &str,
        response: Response<Incoming>,
    ) -> String {
        let status = response.status();
        let text = self.error_text(response).await;
        if method != Method::HEAD {
            return text;
        }
        let asked = self.send(&Method::GET, path, Some(Extent::new(0, 1))).await;
        match asked {
            Ok(again) if again.status() == status => self.error_text(again).await,
            _ => {
                self.sender = None;
                text
            }
        }
    }

    /// The text of an error answer, shortened; the connection is not reused after it.
    async fn error_text(&mut self, response: Response<Incoming>) -> String {
        let status = response.status();
        let mut body = response.into_body();
        let mut text = Vec::new();
        while text.len() < ERROR_TEXT {
            match timeout(STALL, body.frame()).await {
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        text.extend_from_slice(&data);
                    }
                }
                _ => break,
            }
        }
        self.sender = None;
        text.truncate(ERROR_TEXT);
        let text = String::from_utf8_lossy(&text).trim().to_string();
        if text.is_empty() {
            status.canonical_reason().unwrap_or("no text").to_string()
        } else {
            text
        }
    }

    fn protocol(&self, path: &str, why: String) -> Failure {
        Failure::Fatal(BackupError::Protocol {
            url: self.client.url.at(path),
            why,
        })
    }
}

/// Pure: an error and its causes on one line (hyper's own message is only "connection error";
/// what happened is in its source).
pub fn causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        text.push_str(": ");
        text.push_str(&e.to_string());
        cause = e.source();
    }
    text
}

/// Runs `ask` on `connection` until it succeeds, fails for good, or keeps failing for `budget`.
pub async fn retrying<T>(
    connection: &mut Connection,
    what: impl Into<String>,
    budget: Duration,
    ask: impl for<'c> Fn(&'c mut Connection) -> BoxFuture<'c, Result<T, Failure>>,
) -> Result<T, BackupError> {
    let mut retry = Retry::new(&connection.url().url, what, budget);
    loop {
        match ask(connection).await {
            Ok(value) => {
                retry.succeeded();
                return Ok(value);
            }
            Err(Failure::Fatal(e)) => return Err(e),
            Err(Failure::Retry(why)) => retry.failed(why).await?,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_are_joined_on_one_line() {
        let inner = std::io::Error::other("reset by peer");
        #[derive(Debug, thiserror::Error)]
        #[error("connection error")]
        struct Outer(#[source] std::io::Error);
        assert_eq!(causes(&Outer(inner)), "connection error: reset by peer");
    }

    #[test]
    fn statuses_sort_into_success_retry_and_refusal() {
        let v = |s: u16, e: StatusCode| verdict(StatusCode::from_u16(s).unwrap(), e);
        assert_eq!(v(206, StatusCode::PARTIAL_CONTENT), Verdict::Success);
        for s in [500, 502, 503, 504, 408, 429] {
            assert_eq!(v(s, StatusCode::PARTIAL_CONTENT), Verdict::Retry, "{s}");
        }
        for s in [400, 401, 403, 404, 416] {
            assert_eq!(v(s, StatusCode::PARTIAL_CONTENT), Verdict::Refused, "{s}");
        }
        // A front that ignores Range sends the whole image with 200: not what was asked.
        assert_eq!(v(200, StatusCode::PARTIAL_CONTENT), Verdict::Unexpected);
        assert_eq!(v(302, StatusCode::OK), Verdict::Unexpected);
    }

    #[test]
    fn extent_maps_parse_from_the_front_s_json() {
        let map: ExtentMap = serde_json::from_str(
            r#"{"snapshot":"snap-b","base":"snap-a","size":131072,"extents":[{"offset":0,"length":65536}]}"#,
        )
        .unwrap();
        assert_eq!(map.base, "snap-a");
        assert_eq!(map.extents, vec![Extent::new(0, 65536)]);
    }
}
