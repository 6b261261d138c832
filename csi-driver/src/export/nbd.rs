//! The NBD-over-TLS listener of the front.
//!
//! QEMU's NBD server has one TLS identity and one authorization for all of its exports, and the
//! engine daemon's server also carries the consumers' writable exports, so it stays on its unix
//! socket (0600) and never faces the network. The front speaks the fixed-newstyle handshake to
//! the client itself: TLS is required before any option (`NBD_OPT_STARTTLS`, then a handshake
//! that admits only a pinned client certificate), `NBD_OPT_LIST` answers with the client's own
//! exports only, and every option that names an export is refused with `NBD_REP_ERR_UNKNOWN`
//! unless a live grant admits the client to it (the same answer as for an export that does not
//! exist, so a client learns nothing of the others). Admitted options are passed to the daemon's
//! server unchanged and its replies back; once `NBD_OPT_GO` (or `NBD_OPT_EXPORT_NAME`) succeeds
//! the two connections are spliced until either side closes or the grant is withdrawn.
//!
//! Protocol reference: <https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use livedisk_api::ExportProtocol;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio_rustls::TlsAcceptor;

use super::grants::{Credential, Grant, sha256_hex};
use super::{Front, FrontError};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
const FLAG_NO_ZEROES: u16 = 1 << 1;
const CLIENT_NO_ZEROES: u32 = 1 << 1;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_STARTTLS: u32 = 5;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_LIST_META_CONTEXT: u32 = 9;
const OPT_SET_META_CONTEXT: u32 = 10;
const OPT_EXTENDED_HEADERS: u32 = 11;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_ERR: u32 = 1 << 31;
const REP_ERR_UNSUP: u32 = REP_ERR | 1;
const REP_ERR_INVALID: u32 = REP_ERR | 3;
const REP_ERR_TLS_REQD: u32 = REP_ERR | 5;
const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;

/// Largest option a client may send (an export name is at most 4 KiB; meta-context queries a
/// few more).
const MAX_OPTION: u32 = 64 * 1024;
/// Largest option reply accepted from the daemon.
const MAX_REPLY: u32 = 16 * 1024 * 1024;
/// The whole negotiation (before data flows) must end within this.
const NEGOTIATION_TIMEOUT: Duration = Duration::from_secs(60);
/// Copy buffer of a spliced connection.
const SPLICE_BUFFER: usize = 256 * 1024;

/// What one option asks of the front, decided from its number and data alone.
#[derive(Debug, PartialEq, Eq)]
pub enum OptionAsk {
    /// Before TLS: anything but STARTTLS/ABORT is refused with `ERR_TLS_REQD`.
    StartTls,
    Abort,
    List,
    /// Names an export: admitted or refused by the grants.
    Named {
        name: String,
        kind: u32,
    },
    /// Names no export and is harmless to pass on (structured replies, extended headers).
    PassOn,
    /// Not understood: `ERR_UNSUP`.
    Unsupported,
    /// Malformed: `ERR_INVALID` with why.
    Invalid(String),
}

/// Pure: what an option is, from its number and data.
pub fn classify(option: u32, data: &[u8]) -> OptionAsk {
    match option {
        OPT_STARTTLS if data.is_empty() => OptionAsk::StartTls,
        OPT_STARTTLS => OptionAsk::Invalid("STARTTLS carries no data".into()),
        OPT_ABORT => OptionAsk::Abort,
        OPT_LIST if data.is_empty() => OptionAsk::List,
        OPT_LIST => OptionAsk::Invalid("LIST carries no data".into()),
        OPT_EXPORT_NAME => match std::str::from_utf8(data) {
            Ok(name) => OptionAsk::Named {
                name: name.to_string(),
                kind: option,
            },
            Err(_) => OptionAsk::Invalid("the export name is not UTF-8".into()),
        },
        OPT_INFO | OPT_GO | OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
            match length_prefixed_name(data) {
                Some(name) => OptionAsk::Named { name, kind: option },
                None => OptionAsk::Invalid("the option's export name is malformed".into()),
            }
        }
        OPT_STRUCTURED_REPLY | OPT_EXTENDED_HEADERS if data.is_empty() => OptionAsk::PassOn,
        OPT_STRUCTURED_REPLY | OPT_EXTENDED_HEADERS => {
            OptionAsk::Invalid("the option carries no data".into())
        }
        _ => OptionAsk::Unsupported,
    }
}

/// Pure: the export name at the start of INFO/GO/meta-context option data (u32 length, name).
fn length_prefixed_name(data: &[u8]) -> Option<String> {
    let len = u32::from_be_bytes(data.get(..4)?.try_into().ok()?) as usize;
    let name = data.get(4..4 + len)?;
    String::from_utf8(name.to_vec()).ok()
}

/// Serves the NBD listener until the process ends.
pub async fn serve(listener: TcpListener, front: Arc<Front>) {
    super::listener::accept_loop(listener, "NBD front", move |tcp, peer| {
        let front = front.clone();
        async move {
            match connection(tcp, &front).await {
                Ok(()) => tracing::debug!(%peer, "NBD front: connection closed"),
                Err(error) => tracing::info!(%peer, %error, "NBD front: connection ended"),
            }
        }
    })
    .await
}

/// One client connection: negotiation, then the splice.
async fn connection(mut tcp: TcpStream, front: &Front) -> Result<(), FrontError> {
    let Some(config) = front.tls.nbd() else {
        return Err(FrontError::NotReady);
    };
    tcp.set_nodelay(true)?;
    let negotiated = tokio::time::timeout(NEGOTIATION_TIMEOUT, async {
        let client_flags = greet(&mut tcp).await?;
        if !plaintext_options(&mut tcp).await? {
            return Ok(None);
        }
        let tls = TlsAcceptor::from(config).accept(tcp).await?;
        let pin = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| sha256_hex(c.as_ref()))
            .ok_or(FrontError::Refused("no client certificate".into()))?;
        let credential = Credential::Certificate(pin);
        tls_options(tls, front, &credential, client_flags).await
    })
    .await
    .map_err(|_| FrontError::Refused("the negotiation took too long".into()))??;
    match negotiated {
        None => Ok(()),
        Some((tls, backend, grant)) => splice(tls, backend, grant).await,
    }
}

/// Sends the fixed-newstyle greeting and reads the client's flags.
async fn greet(tcp: &mut TcpStream) -> Result<u32, FrontError> {
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&NBDMAGIC.to_be_bytes());
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    tcp.write_all(&greeting).await?;
    let flags = tcp.read_u32().await?;
    if flags & u32::from(FLAG_FIXED_NEWSTYLE) == 0 {
        return Err(FrontError::Refused(
            "the client does not speak fixed-newstyle NBD".into(),
        ));
    }
    Ok(flags)
}

/// Options before TLS: only STARTTLS (true) and ABORT (false) are served.
async fn plaintext_options(tcp: &mut TcpStream) -> Result<bool, FrontError> {
    loop {
        let (option, data) = read_option(tcp).await?;
        match classify(option, &data) {
            OptionAsk::StartTls => {
                reply(tcp, option, REP_ACK, b"").await?;
                return Ok(true);
            }
            OptionAsk::Abort => {
                reply(tcp, option, REP_ACK, b"").await?;
                return Ok(false);
            }
            // No reply can refuse EXPORT_NAME: the connection ends.
            OptionAsk::Named {
                kind: OPT_EXPORT_NAME,
                ..
            } => {
                return Err(FrontError::Refused("NBD_OPT_EXPORT_NAME before TLS".into()));
            }
            _ => {
                reply(
                    tcp,
                    option,
                    REP_ERR_TLS_REQD,
                    b"TLS is required: send NBD_OPT_STARTTLS first",
                )
                .await?;
            }
        }
    }
}

type Negotiated<S> = Option<(S, UnixStream, Arc<Grant>)>;

/// Options under TLS, until a GO/EXPORT_NAME is admitted (the splice follows) or the client
/// aborts.
async fn tls_options<S>(
    mut tls: S,
    front: &Front,
    credential: &Credential,
    client_flags: u32,
) -> Result<Negotiated<S>, FrontError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut backend: Option<UnixStream> = None;
    loop {
        let (option, data) = read_option(&mut tls).await?;
        let ask = classify(option, &data);
        let grant = match &ask {
            OptionAsk::StartTls => {
                reply(
                    &mut tls,
                    option,
                    REP_ERR_INVALID,
                    b"TLS is already negotiated",
                )
                .await?;
                continue;
            }
            OptionAsk::Abort => {
                reply(&mut tls, option, REP_ACK, b"").await?;
                return Ok(None);
            }
            OptionAsk::List => {
                for name in front
                    .grants
                    .visible(ExportProtocol::Nbd, credential, SystemTime::now())
                {
                    let mut entry = (name.len() as u32).to_be_bytes().to_vec();
                    entry.extend_from_slice(name.as_bytes());
                    reply(&mut tls, option, REP_SERVER, &entry).await?;
                }
                reply(&mut tls, option, REP_ACK, b"").await?;
                continue;
            }
            OptionAsk::Unsupported => {
                reply(
                    &mut tls,
                    option,
                    REP_ERR_UNSUP,
                    b"option not supported by this server",
                )
                .await?;
                continue;
            }
            OptionAsk::Invalid(why) => {
                reply(&mut tls, option, REP_ERR_INVALID, why.as_bytes()).await?;
                continue;
            }
            OptionAsk::PassOn => None,
            OptionAsk::Named { name, kind } => {
                match front
                    .grants
                    .admit(ExportProtocol::Nbd, name, credential, SystemTime::now())
                {
                    Some(grant) => Some(grant),
                    None if *kind == OPT_EXPORT_NAME => {
                        return Err(FrontError::Refused(format!(
                            "export {name:?} is not open to this client"
                        )));
                    }
                    None => {
                        let message = format!("no export {name:?} for this client");
                        reply(&mut tls, option, REP_ERR_UNKNOWN, message.as_bytes()).await?;
                        continue;
                    }
                }
            }
        };
        let socket = match &grant {
            Some(g) => g.backend_socket.clone(),
            None => front.backend_socket.clone(),
        };
        if backend.is_none() {
            backend = Some(open_backend(&socket, client_flags).await?);
        }
        let Some(daemon) = backend.as_mut() else {
            continue;
        };
        forward_option(daemon, option, &data).await?;
        if option == OPT_EXPORT_NAME {
            // The daemon answers with the export's size and flags (and 124 zero bytes unless
            // the client asked for none), or closes.
            let len = if client_flags & CLIENT_NO_ZEROES != 0 {
                10
            } else {
                134
            };
            let mut answer = vec![0u8; len];
            daemon.read_exact(&mut answer).await?;
            tls.write_all(&answer).await?;
            tls.flush().await?;
            let grant = grant.ok_or(FrontError::Refused("no grant".into()))?;
            let daemon = backend.take().ok_or(FrontError::NotReady)?;
            return Ok(Some((tls, daemon, grant)));
        }
        let last = relay_replies(daemon, &mut tls).await?;
        if option == OPT_GO && last == REP_ACK {
            let grant = grant.ok_or(FrontError::Refused("no grant".into()))?;
            let daemon = backend.take().ok_or(FrontError::NotReady)?;
            return Ok(Some((tls, daemon, grant)));
        }
    }
}

/// Connects to the daemon's NBD socket and completes its greeting with the client's flags.
async fn open_backend(
    socket: &std::path::Path,
    client_flags: u32,
) -> Result<UnixStream, FrontError> {
    let mut daemon = UnixStream::connect(socket).await?;
    let magic = daemon.read_u64().await?;
    let opt = daemon.read_u64().await?;
    let _flags = daemon.read_u16().await?;
    if magic != NBDMAGIC || opt != IHAVEOPT {
        return Err(FrontError::Backend(
            "the engine's NBD server did not greet with fixed-newstyle".into(),
        ));
    }
    daemon.write_u32(client_flags).await?;
    Ok(daemon)
}

async fn read_option<S: AsyncRead + Unpin>(stream: &mut S) -> Result<(u32, Vec<u8>), FrontError> {
    let magic = stream.read_u64().await?;
    if magic != IHAVEOPT {
        return Err(FrontError::Refused("bad option magic".into()));
    }
    let option = stream.read_u32().await?;
    let len = stream.read_u32().await?;
    if len > MAX_OPTION {
        return Err(FrontError::Refused(format!("option of {len} bytes")));
    }
    let mut data = vec![0u8; len as usize];
    stream.read_exact(&mut data).await?;
    Ok((option, data))
}

async fn forward_option(
    daemon: &mut UnixStream,
    option: u32,
    data: &[u8],
) -> Result<(), FrontError> {
    let mut out = Vec::with_capacity(16 + data.len());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    daemon.write_all(&out).await?;
    Ok(())
}

async fn reply<S: AsyncWrite + Unpin>(
    stream: &mut S,
    option: u32,
    kind: u32,
    data: &[u8],
) -> Result<(), FrontError> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    stream.write_all(&out).await?;
    stream.flush().await?;
    Ok(())
}

/// Copies the daemon's replies to one option to the client, up to the final one (ACK or an
/// error); returns its type.
async fn relay_replies<S: AsyncWrite + Unpin>(
    daemon: &mut UnixStream,
    client: &mut S,
) -> Result<u32, FrontError> {
    loop {
        let magic = daemon.read_u64().await?;
        if magic != REPLY_MAGIC {
            return Err(FrontError::Backend("bad option reply magic".into()));
        }
        let option = daemon.read_u32().await?;
        let kind = daemon.read_u32().await?;
        let len = daemon.read_u32().await?;
        if len > MAX_REPLY {
            return Err(FrontError::Backend(format!("option reply of {len} bytes")));
        }
        let mut data = vec![0u8; len as usize];
        daemon.read_exact(&mut data).await?;
        reply(client, option, kind, &data).await?;
        if kind == REP_ACK || kind & REP_ERR != 0 {
            return Ok(kind);
        }
    }
}

/// Transmission: bytes flow both ways until either side closes or the grant is withdrawn or
/// expires; what the daemon sends is counted on the grant.
async fn splice<S>(client: S, daemon: UnixStream, grant: Arc<Grant>) -> Result<(), FrontError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut revoked = grant.revocation();
    let until_expiry = grant
        .expires
        .map(|e| e.duration_since(SystemTime::now()).unwrap_or_default())
        .unwrap_or(Duration::MAX);
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut daemon_read, mut daemon_write) = daemon.into_split();
    let requests = async {
        let copied = tokio::io::copy(&mut client_read, &mut daemon_write).await;
        let _ = daemon_write.shutdown().await;
        copied.map(|_| ())
    };
    let counted = grant.clone();
    let replies = async move {
        let mut buffer = vec![0u8; SPLICE_BUFFER];
        loop {
            let n = daemon_read.read(&mut buffer).await?;
            if n == 0 {
                let _ = client_write.shutdown().await;
                return Ok::<(), std::io::Error>(());
            }
            client_write.write_all(&buffer[..n]).await?;
            client_write.flush().await?;
            counted.count(n as u64);
        }
    };
    tokio::select! {
        result = async { tokio::try_join!(requests, replies) } => {
            result?;
            Ok(())
        }
        _ = revoked.wait_for(|r| *r) => Err(FrontError::Refused(format!("export {} withdrawn", grant.export))),
        _ = sleep_for(until_expiry) => Err(FrontError::Refused(format!("export {} expired", grant.export))),
    }
}

async fn sleep_for(d: Duration) {
    match tokio::time::Instant::now().checked_add(d) {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(name: &str) -> Vec<u8> {
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        data
    }

    #[test]
    fn options_that_name_an_export_are_recognised() {
        for option in [
            OPT_INFO,
            OPT_GO,
            OPT_LIST_META_CONTEXT,
            OPT_SET_META_CONTEXT,
        ] {
            assert_eq!(
                classify(option, &named("snap-1")),
                OptionAsk::Named {
                    name: "snap-1".into(),
                    kind: option
                }
            );
        }
        assert_eq!(
            classify(OPT_EXPORT_NAME, b"snap-2"),
            OptionAsk::Named {
                name: "snap-2".into(),
                kind: OPT_EXPORT_NAME
            }
        );
    }

    #[test]
    fn malformed_and_unknown_options_are_refused_not_passed_on() {
        assert!(matches!(
            classify(OPT_GO, &[0, 0, 0, 9, b'a']),
            OptionAsk::Invalid(_)
        ));
        assert!(matches!(
            classify(OPT_STARTTLS, b"x"),
            OptionAsk::Invalid(_)
        ));
        assert_eq!(classify(42, b""), OptionAsk::Unsupported);
        assert_eq!(classify(OPT_STRUCTURED_REPLY, b""), OptionAsk::PassOn);
        assert_eq!(classify(OPT_LIST, b""), OptionAsk::List);
        assert_eq!(classify(OPT_STARTTLS, b""), OptionAsk::StartTls);
    }
}
