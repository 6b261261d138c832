//! A client of a real qemu-guest-agent on the unix socket QEMU serves it on (the test VM's
//! `vm-run live --agent SOCKET`), for VMIs that name one: there the stand-in does what
//! virt-launcher does for a freeze and an unfreeze, instead of only reporting them.
//!
//! The protocol is QEMU's guest agent protocol: one JSON object per line each way. A client
//! first sends 0xFF (which resets the agent's parser) and `guest-sync-delimited` with an id of
//! its own, and skips every line until the reply carrying that id: a previous client may have
//! left a reply unread on the channel.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// How long one agent command may take. virt-launcher gives a freeze the same order of time; a
/// guest that answers nothing in this long is reported, not waited for.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub enum AgentError {
    /// The socket could not be reached or the channel broke.
    Channel(String),
    /// The agent answered the command with an error.
    Refused(String),
    /// No answer within [`CALL_TIMEOUT`].
    Timeout(&'static str),
}

impl std::fmt::Display for AgentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AgentError::Channel(why) => write!(f, "the guest agent's channel: {why}"),
            AgentError::Refused(why) => write!(f, "the guest agent refused: {why}"),
            AgentError::Timeout(command) => write!(
                f,
                "the guest agent did not answer {command} within {}s",
                CALL_TIMEOUT.as_secs()
            ),
        }
    }
}

/// The guest agent of one VM.
pub struct GuestAgent {
    socket: PathBuf,
}

impl GuestAgent {
    pub fn new(socket: &Path) -> Self {
        Self {
            socket: socket.to_path_buf(),
        }
    }

    /// `guest-fsfreeze-status`: whether the guest's filesystems are frozen.
    pub async fn is_frozen(&self) -> Result<bool, AgentError> {
        let status = self.execute("guest-fsfreeze-status").await?;
        Ok(status.as_str() == Some("frozen"))
    }

    /// `guest-fsfreeze-freeze`: the number of filesystems frozen.
    pub async fn freeze(&self) -> Result<u64, AgentError> {
        count(self.execute("guest-fsfreeze-freeze").await?)
    }

    /// `guest-fsfreeze-thaw`: the number of filesystems thawed.
    pub async fn thaw(&self) -> Result<u64, AgentError> {
        count(self.execute("guest-fsfreeze-thaw").await?)
    }

    async fn execute(&self, command: &'static str) -> Result<Value, AgentError> {
        tokio::time::timeout(CALL_TIMEOUT, self.exchange(command))
            .await
            .map_err(|_| AgentError::Timeout(command))?
    }

    async fn exchange(&self, command: &str) -> Result<Value, AgentError> {
        let channel =
            |e: std::io::Error| AgentError::Channel(format!("{}: {e}", self.socket.display()));
        let stream = connect(&self.socket).await.map_err(channel)?;
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read);
        let id = sync_id();
        let sync = json!({"execute": "guest-sync-delimited", "arguments": {"id": id}});
        let mut request = vec![0xFF];
        request.extend(format!("{sync}\n").bytes());
        write.write_all(&request).await.map_err(channel)?;
        loop {
            let reply = read_reply(&mut lines).await.map_err(channel)?;
            if reply.get("return") == Some(&json!(id)) {
                break;
            }
        }
        let call = json!({"execute": command});
        write
            .write_all(format!("{call}\n").as_bytes())
            .await
            .map_err(channel)?;
        outcome(read_reply(&mut lines).await.map_err(channel)?)
    }
}

/// A unix socket address holds at most 107 bytes of path; a test VM's socket lives in a node's
/// directory under the cluster's state dir, which may be longer. A longer path is reached
/// through its directory opened here: `/proc/self/fd/N/NAME`.
const SUN_PATH_MAX: usize = 107;

async fn connect(socket: &Path) -> std::io::Result<UnixStream> {
    if socket.as_os_str().len() <= SUN_PATH_MAX {
        return UnixStream::connect(socket).await;
    }
    let (Some(dir), Some(name)) = (socket.parent(), socket.file_name()) else {
        return UnixStream::connect(socket).await;
    };
    let dir = std::fs::File::open(dir)?;
    let short = PathBuf::from(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&dir)
    ))
    .join(name);
    let stream = UnixStream::connect(&short).await;
    drop(dir);
    stream
}

/// A sync id of this call: different from the previous client's with overwhelming likelihood
/// (the agent echoes it; only the low 31 bits are kept, as it is a JSON integer either way).
fn sync_id() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    (nanos as u64 ^ u64::from(std::process::id())) & 0x7fff_ffff
}

/// One reply line; the agent prefixes the reply to a delimited sync with 0xFF.
async fn read_reply(
    lines: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
) -> std::io::Result<Value> {
    loop {
        let mut line = Vec::new();
        if lines.read_until(b'\n', &mut line).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the agent closed the connection",
            ));
        }
        let text = line.strip_prefix(&[0xFF]).unwrap_or(&line);
        if text.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        return serde_json::from_slice(text).map_err(std::io::Error::other);
    }
}

/// Pure: a reply's `return`, or the agent's error as text.
pub fn outcome(reply: Value) -> Result<Value, AgentError> {
    if let Some(error) = reply.get("error") {
        let text = error
            .get("desc")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| error.to_string());
        return Err(AgentError::Refused(text));
    }
    reply
        .get("return")
        .cloned()
        .ok_or_else(|| AgentError::Channel(format!("a reply without return or error: {reply}")))
}

/// Pure: the filesystem count a freeze or thaw returns.
fn count(value: Value) -> Result<u64, AgentError> {
    value
        .as_u64()
        .ok_or_else(|| AgentError::Channel(format!("expected a count of filesystems, got {value}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_reply_is_the_agents_refusal_with_its_description() {
        let refused = outcome(
            json!({"error": {"class": "GenericError", "desc": "failed to freeze /mnt: Device or resource busy"}}),
        );
        assert!(
            matches!(refused, Err(AgentError::Refused(ref why)) if why == "failed to freeze /mnt: Device or resource busy"),
            "{refused:?}"
        );
        assert_eq!(outcome(json!({"return": 2})).ok(), Some(json!(2)));
        assert!(matches!(
            outcome(json!({"event": "x"})),
            Err(AgentError::Channel(_))
        ));
    }

    #[tokio::test]
    async fn a_socket_path_longer_than_an_address_holds_is_reached_through_its_directory() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("d".repeat(60)).join("e".repeat(60));
        std::fs::create_dir_all(&deep).unwrap();
        let path = deep.join("qga.sock");
        assert!(path.as_os_str().len() > SUN_PATH_MAX);
        // Bound through the same trick: the listener's path is as long.
        let holder = std::fs::File::open(&deep).unwrap();
        let short = format!(
            "/proc/self/fd/{}/qga.sock",
            std::os::fd::AsRawFd::as_raw_fd(&holder)
        );
        let listener = tokio::net::UnixListener::bind(&short).unwrap();
        let accept = tokio::spawn(async move { listener.accept().await.map(|_| ()) });
        connect(&path).await.unwrap();
        accept.await.unwrap().unwrap();
    }

    /// A scripted agent on a socket: a stale reply first (left by an earlier client), then the
    /// sync's reply, then the command's. The client must skip the stale one.
    #[tokio::test]
    async fn a_stale_reply_before_the_sync_is_skipped() {
        use tokio::net::UnixListener;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qga.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (read, mut write) = stream.into_split();
            let mut lines = BufReader::new(read);
            let mut line = Vec::new();
            lines.read_until(b'\n', &mut line).await.unwrap();
            assert_eq!(line[0], 0xFF, "the client resets the parser first");
            let sync: Value = serde_json::from_slice(&line[1..]).unwrap();
            let id = sync["arguments"]["id"].clone();
            write.write_all(b"{\"return\": 1}\n").await.unwrap();
            let mut raw = vec![0xFF];
            raw.extend(format!("{}\n", json!({"return": id})).bytes());
            write.write_all(&raw).await.unwrap();
            line.clear();
            lines.read_until(b'\n', &mut line).await.unwrap();
            let call: Value = serde_json::from_slice(&line).unwrap();
            assert_eq!(call["execute"], "guest-fsfreeze-freeze");
            write.write_all(b"{\"return\": 3}\n").await.unwrap();
        });
        let frozen = GuestAgent::new(&path).freeze().await.unwrap();
        assert_eq!(frozen, 3);
        server.await.unwrap();
    }
}
