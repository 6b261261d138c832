//! Repairs the HTTP/2 `:authority` of requests from gRPC clients that send a socket path there.
//!
//! Why: several gRPC implementations put the unix socket's path in `:authority`. kubelet's plugin
//! watcher dials `<plugins_registry>/<name>.sock` without a `unix:` scheme (kubelet v1.36,
//! `pluginmanager/operationexecutor.dial`), so grpc-go sends the escaped path
//! (`%2Fvar%2Flib%2F...`); gRPC's C core (Python `grpcio` 1.57 and later, C++, Ruby) sends the
//! escaped path without its leading slash for `unix:` targets (`tmp%2Fcsi%2Fcsi.sock`), and
//! grpc-java and old grpcurl send the path itself. The `h2` crate under tonic refuses each as a
//! malformed authority and resets the stream (PROTOCOL_ERROR) before any service sees the call,
//! and it has no option to accept it. So each connection on the driver's unix sockets passes
//! through a small relay: frames from the client are copied as they are, except header blocks,
//! which are decoded (HPACK, with the client's dynamic table), get `localhost` instead of an
//! authority that is not one (what grpc-go itself sends for `unix:` targets), and are encoded
//! again (with the table `h2` mirrors). Frames to the client are copied untouched.
//!
//! The relay holds to the limits `h2` advertises (hyper's defaults, which tonic keeps): frames of
//! at most 16 KiB and a dynamic table of at most 4096 octets. It also bounds a header block, so
//! that a client cannot make it hold more than `h2` itself would; a client that breaks these
//! loses its connection, as `h2` would close it with a GOAWAY.

use std::io;

use loona_hpack::{Decoder, Encoder};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};

/// What an authority that is not one becomes.
const FALLBACK_AUTHORITY: &[u8] = b"localhost";
/// The client connection preface (RFC 9113 §3.4), copied before the first frame.
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The largest frame payload h2 accepts unless told otherwise (SETTINGS_MAX_FRAME_SIZE default,
/// which hyper keeps): a larger frame from the client ends the connection, and re-encoded header
/// blocks are cut into frames of at most this.
const MAX_FRAME_PAYLOAD: usize = 16_384;
/// The HPACK dynamic table size h2 announces (SETTINGS_HEADER_TABLE_SIZE, the protocol's
/// default): the most a client's encoder may use, and what the relay's encoder uses toward h2.
const HEADER_TABLE_SIZE: usize = 4_096;
/// The most a header block may hold, encoded or decoded (names, values and 32 octets per field,
/// as RFC 7541 counts them). h2 refuses header lists over 16 KiB (hyper's
/// SETTINGS_MAX_HEADER_LIST_SIZE) with a reset of that stream only, so blocks up to this bound
/// are relayed and left to h2 to judge; beyond it the connection ends.
const MAX_HEADER_BLOCK: usize = 1 << 20;
/// Relay buffer between the relay and tonic.
const RELAY_BUFFER: usize = 64 * 1024;

const FRAME_HEADERS: u8 = 0x1;
const FRAME_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;

type HeaderList = Vec<(Vec<u8>, Vec<u8>)>;

/// The header list with an `:authority` that does not parse as one replaced by `localhost`.
pub fn repaired(headers: HeaderList) -> HeaderList {
    headers
        .into_iter()
        .map(|(name, value)| {
            if name == b":authority" && http::uri::Authority::try_from(&value[..]).is_err() {
                tracing::trace!(
                    authority = %String::from_utf8_lossy(&value),
                    "request :authority is not one; localhost instead"
                );
                (name, FALLBACK_AUTHORITY.to_vec())
            } else {
                (name, value)
            }
        })
        .collect()
}

/// Re-encodes the header blocks of one connection. The decoder follows the client's encoder, the
/// encoder is what the server's decoder follows, so every block of the connection must go through
/// the same `HeaderBlocks`.
pub struct HeaderBlocks {
    decoder: Decoder<'static>,
    encoder: Encoder<'static>,
}

impl Default for HeaderBlocks {
    fn default() -> Self {
        let mut decoder = Decoder::new();
        decoder.set_max_allowed_table_size(HEADER_TABLE_SIZE);
        let mut encoder = Encoder::new();
        encoder.set_max_table_size(HEADER_TABLE_SIZE);
        Self { decoder, encoder }
    }
}

impl HeaderBlocks {
    /// One complete header block from the client, as the server gets it.
    pub fn rewrite(&mut self, block: &[u8]) -> io::Result<Vec<u8>> {
        let mut headers = HeaderList::new();
        let mut size = 0usize;
        self.decoder
            .decode_with_cb(block, |name, value| {
                // The decoder goes on to the block's end either way (its table must follow the
                // client's); fields past the bound are only counted, never copied.
                size = size.saturating_add(name.len() + value.len() + 32);
                if size <= MAX_HEADER_BLOCK {
                    headers.push((name.into_owned(), value.into_owned()));
                }
            })
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("HPACK: {e:?}")))?;
        if size > MAX_HEADER_BLOCK {
            return Err(protocol_error("header list larger than the relay holds"));
        }
        let headers = repaired(headers);
        Ok(self
            .encoder
            .encode(headers.iter().map(|(n, v)| (&n[..], &v[..]))))
    }
}

struct FrameHeader {
    length: usize,
    kind: u8,
    flags: u8,
    stream: u32,
}

impl FrameHeader {
    fn parse(bytes: &[u8; 9]) -> Self {
        Self {
            length: usize::from(bytes[0]) << 16
                | usize::from(bytes[1]) << 8
                | usize::from(bytes[2]),
            kind: bytes[3],
            flags: bytes[4],
            stream: u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]) & 0x7fff_ffff,
        }
    }

    fn encode(length: usize, kind: u8, flags: u8, stream: u32) -> [u8; 9] {
        let s = stream.to_be_bytes();
        [
            (length >> 16) as u8,
            (length >> 8) as u8,
            length as u8,
            kind,
            flags,
            s[0],
            s[1],
            s[2],
            s[3],
        ]
    }
}

fn protocol_error(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// The header block fragment and priority fields of a HEADERS payload (padding dropped).
fn headers_payload(flags: u8, payload: &[u8]) -> io::Result<(Vec<u8>, Vec<u8>)> {
    let mut rest = payload;
    let mut pad = 0;
    if flags & FLAG_PADDED != 0 {
        let (&len, tail) = rest
            .split_first()
            .ok_or_else(|| protocol_error("HEADERS without its pad length"))?;
        pad = usize::from(len);
        rest = tail;
    }
    let mut priority = Vec::new();
    if flags & FLAG_PRIORITY != 0 {
        if rest.len() < 5 {
            return Err(protocol_error("HEADERS shorter than its priority fields"));
        }
        priority = rest[..5].to_vec();
        rest = &rest[5..];
    }
    if pad > rest.len() {
        return Err(protocol_error("HEADERS padding longer than the frame"));
    }
    Ok((rest[..rest.len() - pad].to_vec(), priority))
}

/// The frames that carry a re-encoded header block: HEADERS (with the priority fields, END_STREAM
/// kept, no padding) then CONTINUATION frames as needed, END_HEADERS on the last.
fn header_frames(stream: u32, flags: u8, priority: &[u8], block: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(block.len() + priority.len() + 18);
    let first_room = MAX_FRAME_PAYLOAD - priority.len();
    let (first, mut rest) = block.split_at(block.len().min(first_room));
    let kept = flags & (FLAG_END_STREAM | FLAG_PRIORITY);
    let end = if rest.is_empty() { FLAG_END_HEADERS } else { 0 };
    out.extend(FrameHeader::encode(
        priority.len() + first.len(),
        FRAME_HEADERS,
        kept | end,
        stream,
    ));
    out.extend(priority);
    out.extend(first);
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(rest.len().min(MAX_FRAME_PAYLOAD));
        let end = if tail.is_empty() { FLAG_END_HEADERS } else { 0 };
        out.extend(FrameHeader::encode(
            chunk.len(),
            FRAME_CONTINUATION,
            end,
            stream,
        ));
        out.extend(chunk);
        rest = tail;
    }
    out
}

async fn read_frame(
    from: &mut (impl AsyncRead + Unpin),
) -> io::Result<Option<(FrameHeader, [u8; 9], Vec<u8>)>> {
    let mut raw = [0u8; 9];
    match from.read_exact(&mut raw).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let header = FrameHeader::parse(&raw);
    if header.length > MAX_FRAME_PAYLOAD {
        return Err(protocol_error("frame larger than SETTINGS_MAX_FRAME_SIZE"));
    }
    let mut payload = vec![0u8; header.length];
    from.read_exact(&mut payload).await?;
    Ok(Some((header, raw, payload)))
}

/// Copies the client's side of one connection to the server, header blocks re-encoded.
pub async fn relay_client_frames(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
) -> io::Result<()> {
    let mut preface = [0u8; 24];
    from.read_exact(&mut preface).await?;
    to.write_all(&preface).await?;
    if &preface != PREFACE {
        // Not HTTP/2 with prior knowledge: leave the refusal to the server.
        tokio::io::copy(&mut from, &mut to).await?;
        return to.shutdown().await;
    }
    let mut blocks = HeaderBlocks::default();
    while let Some((header, raw, payload)) = read_frame(&mut from).await? {
        if header.kind != FRAME_HEADERS {
            to.write_all(&raw).await?;
            to.write_all(&payload).await?;
            continue;
        }
        let (mut block, priority) = headers_payload(header.flags, &payload)?;
        let mut end_headers = header.flags & FLAG_END_HEADERS != 0;
        while !end_headers {
            let (next, _, fragment) = read_frame(&mut from)
                .await?
                .ok_or_else(|| protocol_error("connection closed inside a header block"))?;
            if next.kind != FRAME_CONTINUATION || next.stream != header.stream {
                return Err(protocol_error("header block not continued by CONTINUATION"));
            }
            block.extend(fragment);
            if block.len() > MAX_HEADER_BLOCK {
                return Err(protocol_error("header block larger than the relay holds"));
            }
            end_headers = next.flags & FLAG_END_HEADERS != 0;
        }
        let block = blocks.rewrite(&block)?;
        to.write_all(&header_frames(
            header.stream,
            header.flags,
            &priority,
            &block,
        ))
        .await?;
    }
    to.shutdown().await
}

/// The server's end of a relayed connection: what tonic serves instead of `client`. One task per
/// connection runs both directions; it ends when the server's side ends (the client's reads are
/// then pointless), once the client has closed and the server has sent all it had to, or at once
/// when the client sends what the relay refuses (both sides are closed then).
pub fn relayed(client: tokio::net::UnixStream) -> DuplexStream {
    let (server_end, relay_end) = tokio::io::duplex(RELAY_BUFFER);
    tokio::spawn(async move {
        let (client_read, mut client_write) = client.into_split();
        let (mut relay_read, relay_write) = tokio::io::split(relay_end);
        let to_client = async move {
            let _ = tokio::io::copy(&mut relay_read, &mut client_write).await;
            let _ = client_write.shutdown().await;
        };
        let to_server = relay_client_frames(client_read, relay_write);
        tokio::pin!(to_client, to_server);
        tokio::select! {
            () = &mut to_client => {}
            ended = &mut to_server => match ended {
                Ok(()) => to_client.await,
                // Not HTTP/2 as h2 takes it: the whole connection ends here, as h2 would end it.
                Err(e) => tracing::debug!(error = %e, "gRPC connection closed by the relay"),
            },
        }
    });
    server_end
}

/// The connections of a unix socket listener, each through [`relayed`]: what the driver's gRPC
/// servers on unix sockets serve.
pub fn incoming(
    listener: tokio::net::UnixListener,
) -> impl futures::Stream<Item = io::Result<DuplexStream>> {
    tokio_stream::StreamExt::map(
        tokio_stream::wrappers::UnixListenerStream::new(listener),
        |connection| connection.map(relayed),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn h(name: &str, value: &str) -> (Vec<u8>, Vec<u8>) {
        (name.as_bytes().to_vec(), value.as_bytes().to_vec())
    }

    #[test]
    fn an_escaped_socket_path_becomes_localhost_and_a_real_authority_stays() {
        let kubelet = vec![
            h(":method", "POST"),
            h(
                ":authority",
                "%2Fvar%2Flib%2Fkubelet%2Fplugins_registry%2Fcsi.livedisk.io-reg.sock",
            ),
            h(":path", "/pluginregistration.Registration/GetInfo"),
        ];
        let out = repaired(kubelet);
        assert_eq!(out[1], h(":authority", "localhost"));
        assert_eq!(
            out[2],
            h(":path", "/pluginregistration.Registration/GetInfo")
        );
        let fine = vec![h(":authority", "localhost:9000")];
        assert_eq!(repaired(fine.clone()), fine);
        // gRPC's C core (grpcio 1.85: the escaped path without its leading slash) and
        // grpc-java 1.79 (the path as it is).
        for sent in ["tmp%2Fcsi%2Fcontroller.sock", "/tmp/csi/controller.sock"] {
            assert_eq!(
                repaired(vec![h(":authority", sent)]),
                vec![h(":authority", "localhost")]
            );
        }
    }

    /// What the relay hands on from `client` (preface included), or its error.
    async fn relay(client: &[u8]) -> io::Result<Vec<u8>> {
        let (mut from, relay_in) = tokio::io::duplex(1 << 22);
        let (relay_out, mut to) = tokio::io::duplex(1 << 22);
        from.write_all(client).await?;
        drop(from);
        relay_client_frames(relay_in, relay_out).await?;
        let mut out = Vec::new();
        to.read_to_end(&mut out).await?;
        Ok(out)
    }

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = FrameHeader::encode(payload.len(), kind, flags, stream).to_vec();
        out.extend(payload);
        out
    }

    #[tokio::test]
    async fn frames_pass_unchanged_and_header_blocks_get_localhost() {
        let list = [h(":method", "POST"), h(":authority", "tmp%2Fcsi.sock")];
        let block = Encoder::new().encode(list.iter().map(|(n, v)| (&n[..], &v[..])));
        let settings = frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]);
        let data = frame(0x0, FLAG_END_STREAM, 1, &[0, 0, 0, 0, 0]);
        let mut client = PREFACE.to_vec();
        client.extend(&settings);
        client.extend(frame(FRAME_HEADERS, FLAG_END_HEADERS, 1, &block));
        client.extend(&data);
        let out = relay(&client).await.unwrap();
        let mut rest = out.strip_prefix(&PREFACE[..]).unwrap();
        rest = rest.strip_prefix(&settings[..]).unwrap();
        let head = FrameHeader::parse(rest[..9].try_into().unwrap());
        assert_eq!(
            (head.kind, head.flags, head.stream),
            (FRAME_HEADERS, FLAG_END_HEADERS, 1)
        );
        let got = Decoder::new().decode(&rest[9..9 + head.length]).unwrap();
        assert_eq!(
            got,
            vec![h(":method", "POST"), h(":authority", "localhost")]
        );
        assert_eq!(&rest[9 + head.length..], &data[..]);
    }

    async fn refused(client: &[u8], why: &str) {
        match relay(client).await {
            Ok(_) => panic!("relayed; expected a refusal ({why})"),
            Err(e) => assert!(e.to_string().contains(why), "{e}, expected {why}"),
        }
    }

    #[tokio::test]
    async fn what_h2_would_refuse_ends_the_connection_without_holding_it() {
        // A frame over SETTINGS_MAX_FRAME_SIZE.
        let mut client = PREFACE.to_vec();
        client.extend(frame(0x0, 0, 1, &vec![0; MAX_FRAME_PAYLOAD + 1]));
        refused(&client, "frame larger than SETTINGS_MAX_FRAME_SIZE").await;
        // A dynamic table larger than h2 announces.
        let mut client = PREFACE.to_vec();
        client.extend(frame(
            FRAME_HEADERS,
            FLAG_END_HEADERS,
            1,
            &[0x3f, 0xe1, 0x3f],
        ));
        refused(&client, "InvalidMaxDynamicSize").await;
        // A small block that decodes to more than the relay holds: one large field in the
        // table, then referred to again and again (one octet each).
        let mut block = Encoder::new().encode([(&b"x-big"[..], &[b'a'; 4000][..])]);
        block.extend(std::iter::repeat_n(0x80 | 62, 300));
        let mut client = PREFACE.to_vec();
        client.extend(frame(FRAME_HEADERS, FLAG_END_HEADERS, 1, &block));
        refused(&client, "header list larger").await;
        // A header block continued past the bound.
        let mut client = PREFACE.to_vec();
        client.extend(frame(FRAME_HEADERS, 0, 1, &[0; 16]));
        for _ in 0..=MAX_HEADER_BLOCK / MAX_FRAME_PAYLOAD {
            client.extend(frame(FRAME_CONTINUATION, 0, 1, &vec![0; MAX_FRAME_PAYLOAD]));
        }
        refused(&client, "header block larger").await;
    }

    #[test]
    fn re_encoded_blocks_decode_to_the_repaired_list_across_a_connection() {
        let list = vec![
            h(":method", "POST"),
            h(":scheme", "http"),
            h(":authority", "%2Fsock"),
            h(":path", "/a"),
        ];
        let mut client = Encoder::new();
        let mut server = Decoder::new();
        let mut blocks = HeaderBlocks::default();
        // Twice: the second block refers to the client's dynamic table.
        for _ in 0..2 {
            let sent = client.encode(list.iter().map(|(n, v)| (&n[..], &v[..])));
            let got = server.decode(&blocks.rewrite(&sent).unwrap()).unwrap();
            assert_eq!(got, repaired(list.clone()));
        }
    }

    #[test]
    fn headers_payload_drops_padding_and_keeps_priority() {
        let payload = [2u8, 0, 0, 0, 3, 16, 0xaa, 0xbb, 0, 0];
        let (block, priority) = headers_payload(FLAG_PADDED | FLAG_PRIORITY, &payload).unwrap();
        assert_eq!(block, vec![0xaa, 0xbb]);
        assert_eq!(priority, vec![0, 0, 0, 3, 16]);
        assert!(headers_payload(FLAG_PADDED, &[9, 1]).is_err());
    }

    #[test]
    fn large_blocks_are_cut_into_continuations() {
        let block = vec![7u8; MAX_FRAME_PAYLOAD + 10];
        let frames = header_frames(5, FLAG_END_STREAM, &[], &block);
        let first = FrameHeader::parse(frames[..9].try_into().unwrap());
        assert_eq!(
            (first.length, first.kind, first.flags, first.stream),
            (MAX_FRAME_PAYLOAD, FRAME_HEADERS, FLAG_END_STREAM, 5)
        );
        let at = 9 + MAX_FRAME_PAYLOAD;
        let second = FrameHeader::parse(frames[at..at + 9].try_into().unwrap());
        assert_eq!(
            (second.length, second.kind, second.flags),
            (10, FRAME_CONTINUATION, FLAG_END_HEADERS)
        );
        assert_eq!(frames.len(), 18 + block.len());
    }
}
