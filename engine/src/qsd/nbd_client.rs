//! A minimal NBD client: fixed-newstyle handshake with `NBD_OPT_GO`, then
//! pipelined `NBD_CMD_WRITE_ZEROES` requests with simple replies (and single
//! durable writes, for the benchmark's latency probe, and flushes).
//!
//! It exists for three jobs in our own daemon: setting bits of a dirty bitmap
//! (see `qcow2/bitmap.rs`), flushing a node, for which QMP has no
//! command (see `qcow2/clone.rs`), and reading a snapshot export for the
//! node's HTTPS front (one plain `NBD_CMD_READ` at a time). QEMU has no QMP command that sets arbitrary
//! bits, but every write request reaching a node marks its dirty bitmaps, and
//! a write-zeroes request carries no payload, so 100k extents cost 100k
//! 28-byte requests on a unix socket. No data is ever read or sent.
//!
//! Only what QEMU's server needs is implemented; structured replies, TLS and
//! every other command are left out on purpose. Protocol reference:
//! <https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::UnixStream;

use crate::extents::Extent;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
const FLAG_NO_ZEROES: u16 = 1 << 1;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERR_BIT: u32 = 1 << 31;
const INFO_EXPORT: u16 = 0;
const TFLAG_READ_ONLY: u16 = 1 << 1;
const TFLAG_SEND_FLUSH: u16 = 1 << 2;
const TFLAG_SEND_FUA: u16 = 1 << 3;
const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_FLAG_FUA: u16 = 1 << 0;
const CMD_WRITE_ZEROES: u16 = 6;

/// Largest single request: the 32-bit length field's maximum rounded down
/// to 64 KiB (so split requests stay cluster-aligned for clusters up to
/// 64 KiB; larger clusters only mark a shared granule twice). As large as
/// possible because QEMU 7.2 serves a write-zeroes on `null-co` through a
/// zeroed bounce buffer of up to 16 MiB allocated per request: measured
/// 9 ms per 1 GiB request (1 TiB in 9.2 s), so fewer, larger requests win.
const MAX_REQUEST: u64 = 0xffff_0000;
/// Option replies we accept (an INFO reply is a few bytes; anything bigger
/// is a broken peer, not something to allocate for).
const MAX_OPTION_REPLY: u32 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("NBD I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("NBD protocol error: {0}")]
    Protocol(String),
    #[error("NBD server refused export {export:?}: {message}")]
    Refused { export: String, message: String },
    #[error("NBD request at {offset}+{length} failed with error {errno}")]
    Request {
        offset: u64,
        length: u64,
        errno: u32,
    },
    #[error("NBD: timed out after {0:?}")]
    Timeout(Duration),
}

/// One connection to one export, ready for transmission.
pub struct NbdClient {
    stream: UnixStream,
    size: u64,
    flags: u16,
}

impl NbdClient {
    /// Connects to `export` on the server at `socket` and negotiates it
    /// with `NBD_OPT_GO`.
    pub async fn connect(socket: &Path, export: &str) -> Result<Self, NbdError> {
        let mut stream = UnixStream::connect(socket).await?;
        let mut hello = [0u8; 18];
        stream.read_exact(&mut hello).await?;
        let magic = u64::from_be_bytes(be8(&hello[0..8]));
        let opt = u64::from_be_bytes(be8(&hello[8..16]));
        let hflags = u16::from_be_bytes([hello[16], hello[17]]);
        if magic != NBDMAGIC || opt != IHAVEOPT {
            return Err(NbdError::Protocol("not a newstyle NBD server".into()));
        }
        if hflags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(NbdError::Protocol("server is not fixed-newstyle".into()));
        }
        // Client flags echo what we use of the server's offer.
        let cflags = u32::from(hflags & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
        let name = export.as_bytes();
        let name_len = u32::try_from(name.len())
            .map_err(|_| NbdError::Protocol("export name too long".into()))?;
        let mut msg = Vec::with_capacity(26 + name.len());
        msg.extend_from_slice(&cflags.to_be_bytes());
        msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
        msg.extend_from_slice(&OPT_GO.to_be_bytes());
        msg.extend_from_slice(&(4 + name_len + 2).to_be_bytes());
        msg.extend_from_slice(&name_len.to_be_bytes());
        msg.extend_from_slice(name);
        // No information requests: NBD_INFO_EXPORT is always sent.
        msg.extend_from_slice(&0u16.to_be_bytes());
        stream.write_all(&msg).await?;

        let mut info: Option<(u64, u16)> = None;
        loop {
            let mut hdr = [0u8; 20];
            stream.read_exact(&mut hdr).await?;
            let magic = u64::from_be_bytes(be8(&hdr[0..8]));
            let option = u32::from_be_bytes(be4(&hdr[8..12]));
            let kind = u32::from_be_bytes(be4(&hdr[12..16]));
            let len = u32::from_be_bytes(be4(&hdr[16..20]));
            if magic != OPT_REPLY_MAGIC || option != OPT_GO {
                return Err(NbdError::Protocol("unexpected option reply".into()));
            }
            if len > MAX_OPTION_REPLY {
                return Err(NbdError::Protocol(format!("option reply of {len} bytes")));
            }
            let mut data = vec![0u8; len as usize];
            stream.read_exact(&mut data).await?;
            if kind & REP_ERR_BIT != 0 {
                return Err(NbdError::Refused {
                    export: export.to_owned(),
                    message: String::from_utf8_lossy(&data).into_owned(),
                });
            }
            match kind {
                REP_ACK => break,
                REP_INFO if data.len() >= 12 && data[0..2] == INFO_EXPORT.to_be_bytes() => {
                    let size = u64::from_be_bytes(be8(&data[2..10]));
                    let flags = u16::from_be_bytes([data[10], data[11]]);
                    info = Some((size, flags));
                }
                // Other information (block sizes, name, description).
                _ => {}
            }
        }
        let (size, flags) =
            info.ok_or_else(|| NbdError::Protocol("server sent no NBD_INFO_EXPORT".into()))?;
        Ok(Self {
            stream,
            size,
            flags,
        })
    }

    /// Sends one write-zeroes request per extent (split at 1 GiB), all
    /// pipelined, and waits for every reply. Extents are clipped to the
    /// export's size. Returns the number of requests sent.
    pub async fn write_zeroes(
        &mut self,
        extents: &[Extent],
        timeout: Duration,
    ) -> Result<u64, NbdError> {
        if self.flags & TFLAG_READ_ONLY != 0 {
            return Err(NbdError::Protocol("export is read-only".into()));
        }
        if self.flags & TFLAG_SEND_WRITE_ZEROES == 0 {
            return Err(NbdError::Protocol(
                "export does not accept NBD_CMD_WRITE_ZEROES".into(),
            ));
        }
        let requests = split_requests(extents, self.size);
        let count = requests.len() as u64;
        let (rd, wr) = self.stream.split();
        // Writing and reading run concurrently: the server stops reading
        // requests while its replies are not being read, so sending first
        // and reading afterwards would deadlock once the socket buffers fill.
        let send = async {
            let mut w = BufWriter::with_capacity(64 * 1024, wr);
            for (cookie, (offset, length)) in requests.iter().enumerate() {
                w.write_all(&request(CMD_WRITE_ZEROES, cookie as u64, *offset, *length))
                    .await?;
            }
            w.flush().await?;
            Ok::<_, NbdError>(())
        };
        let receive = async {
            let mut r = BufReader::with_capacity(64 * 1024, rd);
            let mut seen = vec![false; requests.len()];
            for _ in 0..requests.len() {
                let mut rep = [0u8; 16];
                r.read_exact(&mut rep).await?;
                let (errno, cookie) = simple_reply(&rep)?;
                let i = usize::try_from(cookie)
                    .ok()
                    .filter(|i| *i < requests.len() && !seen[*i])
                    .ok_or_else(|| NbdError::Protocol(format!("unexpected cookie {cookie}")))?;
                seen[i] = true;
                if errno != 0 {
                    let (offset, length) = requests[i];
                    return Err(NbdError::Request {
                        offset,
                        length: u64::from(length),
                        errno,
                    });
                }
            }
            Ok::<_, NbdError>(())
        };
        tokio::time::timeout(timeout, async { tokio::try_join!(send, receive) })
            .await
            .map_err(|_| NbdError::Timeout(timeout))??;
        Ok(count)
    }

    /// One write, with FUA where the export offers it (QEMU's do), so the
    /// reply means the data is durable: what a consumer's `O_DSYNC` write
    /// waits for. Used by the benchmark to time a consumer's writes.
    pub async fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), NbdError> {
        if self.flags & TFLAG_READ_ONLY != 0 {
            return Err(NbdError::Protocol("export is read-only".into()));
        }
        let length = u32::try_from(data.len())
            .map_err(|_| NbdError::Protocol("write larger than 4 GiB".into()))?;
        let flags = if self.flags & TFLAG_SEND_FUA != 0 {
            CMD_FLAG_FUA
        } else {
            0
        };
        self.stream
            .write_all(&request_with(CMD_WRITE, flags, 0, offset, length))
            .await?;
        self.stream.write_all(data).await?;
        let mut rep = [0u8; 16];
        self.stream.read_exact(&mut rep).await?;
        let (errno, _) = simple_reply(&rep)?;
        if errno != 0 {
            return Err(NbdError::Request {
                offset,
                length: u64::from(length),
                errno,
            });
        }
        Ok(())
    }

    /// `NBD_CMD_FLUSH`: its reply means that what the export's node holds is
    /// durable. QEMU's server answers it with a flush of the node
    /// (`blk_co_flush`: its qcow2 metadata cache, then its file), also on a
    /// read-only export.
    pub async fn flush(&mut self, timeout: Duration) -> Result<(), NbdError> {
        if self.flags & TFLAG_SEND_FLUSH == 0 {
            return Err(NbdError::Protocol(
                "export does not accept NBD_CMD_FLUSH".into(),
            ));
        }
        let exchange = async {
            self.stream.write_all(&request(CMD_FLUSH, 0, 0, 0)).await?;
            let mut rep = [0u8; 16];
            self.stream.read_exact(&mut rep).await?;
            let (errno, _) = simple_reply(&rep)?;
            if errno != 0 {
                return Err(NbdError::Request {
                    offset: 0,
                    length: 0,
                    errno,
                });
            }
            Ok(())
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| NbdError::Timeout(timeout))?
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Reads `buf.len()` bytes at `offset` (one request; simple replies, as negotiated).
    pub async fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        let length = u32::try_from(buf.len())
            .map_err(|_| NbdError::Protocol("read larger than 4 GiB".into()))?;
        self.stream
            .write_all(&request(CMD_READ, 0, offset, length))
            .await?;
        let mut rep = [0u8; 16];
        self.stream.read_exact(&mut rep).await?;
        let (errno, _) = simple_reply(&rep)?;
        if errno != 0 {
            return Err(NbdError::Request {
                offset,
                length: u64::from(length),
                errno,
            });
        }
        self.stream.read_exact(buf).await?;
        Ok(())
    }

    /// Ends the session politely (`NBD_CMD_DISC`); the server closes it.
    pub async fn disconnect(mut self) -> Result<(), NbdError> {
        self.stream
            .write_all(&request(CMD_DISC, u64::MAX, 0, 0))
            .await?;
        self.stream.shutdown().await?;
        Ok(())
    }
}

fn be8(b: &[u8]) -> [u8; 8] {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    a
}

fn be4(b: &[u8]) -> [u8; 4] {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    a
}

/// `(errno, cookie)` of a simple reply.
fn simple_reply(rep: &[u8; 16]) -> Result<(u32, u64), NbdError> {
    let magic = u32::from_be_bytes(be4(&rep[0..4]));
    if magic != SIMPLE_REPLY_MAGIC {
        return Err(NbdError::Protocol(format!("reply magic {magic:#x}")));
    }
    Ok((
        u32::from_be_bytes(be4(&rep[4..8])),
        u64::from_be_bytes(be8(&rep[8..16])),
    ))
}

fn request(kind: u16, cookie: u64, offset: u64, length: u32) -> [u8; 28] {
    request_with(kind, 0, cookie, offset, length)
}

fn request_with(kind: u16, flags: u16, cookie: u64, offset: u64, length: u32) -> [u8; 28] {
    let mut m = [0u8; 28];
    m[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    m[4..6].copy_from_slice(&flags.to_be_bytes());
    m[6..8].copy_from_slice(&kind.to_be_bytes());
    m[8..16].copy_from_slice(&cookie.to_be_bytes());
    m[16..24].copy_from_slice(&offset.to_be_bytes());
    m[24..28].copy_from_slice(&length.to_be_bytes());
    m
}

/// `(offset, length)` requests covering the extents within `[0, size)`,
/// none longer than `MAX_REQUEST` and none empty.
fn split_requests(extents: &[Extent], size: u64) -> Vec<(u64, u32)> {
    let mut out = Vec::with_capacity(extents.len());
    for e in extents {
        let mut off = e.offset.min(size);
        let end = e.end().min(size);
        while off < end {
            let len = (end - off).min(MAX_REQUEST);
            // MAX_REQUEST fits in 32 bits.
            out.push((off, len as u32));
            off += len;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn x(offset: u64, length: u64) -> Extent {
        Extent { offset, length }
    }

    #[test]
    fn requests_are_clipped_split_and_never_empty() {
        let size = 3 * MAX_REQUEST;
        assert_eq!(MAX_REQUEST % 65536, 0);
        let r = split_requests(
            &[
                x(0, 65536),
                x(65536, 0),
                x(MAX_REQUEST / 2, 2 * MAX_REQUEST),
                x(size - 4096, 65536),
                x(size + 1, 10),
            ],
            size,
        );
        assert_eq!(
            r,
            vec![
                (0, 65536),
                (MAX_REQUEST / 2, MAX_REQUEST as u32),
                (MAX_REQUEST / 2 + MAX_REQUEST, MAX_REQUEST as u32),
                (size - 4096, 4096),
            ]
        );
    }

    #[test]
    fn request_layout() {
        let m = request(CMD_WRITE_ZEROES, 7, 0x1122_3344_5566_7788, 65536);
        assert_eq!(&m[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&m[6..8], &[0, 6]);
        assert_eq!(u64::from_be_bytes(be8(&m[8..16])), 7);
        assert_eq!(u64::from_be_bytes(be8(&m[16..24])), 0x1122_3344_5566_7788);
        assert_eq!(u32::from_be_bytes(be4(&m[24..28])), 65536);
        assert_eq!(&m[4..6], &[0, 0]);
        let w = request_with(CMD_WRITE, CMD_FLAG_FUA, 1, 0, 4096);
        assert_eq!(&w[4..8], &[0, 1, 0, 1]);
    }
}
