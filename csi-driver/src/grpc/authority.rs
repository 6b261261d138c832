//! Repairs the HTTP/2 `:authority` of requests from grpc-go clients that dial a bare socket path.
//!
//! Why: kubelet's plugin watcher dials `<plugins_registry>/<name>.sock` without a `unix:` scheme
//! (kubelet v1.36, `pluginmanager/operationexecutor.dial`), so grpc-go sends the escaped path as
//! the authority (`%2Fvar%2Flib%2F...`). The `h2` crate under tonic refuses that as a malformed
//! authority and resets the stream (PROTOCOL_ERROR) before any service sees the call, and it has
//! no option to accept it. So each connection passes through a small relay: frames from the
//! client are copied as they are, except header blocks, which are decoded (HPACK, with the
//! client's dynamic table), get `localhost` instead of an authority that is not one (what grpc-go
//! itself sends for `unix:` targets), and are encoded again (with the table `h2` mirrors).
//! Frames to the client are copied untouched.

use std::io;

use loona_hpack::{Decoder, Encoder};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};

/// What an authority that is not one becomes.
const FALLBACK_AUTHORITY: &[u8] = b"localhost";
/// The client connection preface (RFC 9113 §3.4), copied before the first frame.
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The largest frame payload h2 accepts unless told otherwise (SETTINGS_MAX_FRAME_SIZE default);
/// re-encoded header blocks are cut into frames of at most this.
const MAX_FRAME_PAYLOAD: usize = 16_384;
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
        Self {
            decoder: Decoder::new(),
            encoder: Encoder::new(),
        }
    }
}

impl HeaderBlocks {
    /// One complete header block from the client, as the server gets it.
    pub fn rewrite(&mut self, block: &[u8]) -> io::Result<Vec<u8>> {
        let headers = self
            .decoder
            .decode(block)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("HPACK: {e:?}")))?;
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

/// The server's end of a relayed connection: what tonic serves instead of `client`.
pub fn relayed(client: tokio::net::UnixStream) -> DuplexStream {
    let (server_end, relay_end) = tokio::io::duplex(RELAY_BUFFER);
    let (client_read, mut client_write) = client.into_split();
    let (mut relay_read, relay_write) = tokio::io::split(relay_end);
    tokio::spawn(async move {
        if let Err(e) = relay_client_frames(client_read, relay_write).await {
            tracing::debug!(error = %e, "registration connection: client side ended");
        }
    });
    tokio::spawn(async move {
        let _ = tokio::io::copy(&mut relay_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
    });
    server_end
}

#[cfg(test)]
mod tests {
    use super::*;

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
