//! Async QMP client over a unix socket.
//!
//! One reader task owns the read half: it routes each reply to the waiting
//! caller by the `id` we put on the command, and fans events out on a
//! broadcast channel. Callers that need to see the events a command causes
//! subscribe *before* sending it, so no event can slip past them.
//!
//! A [`Qmp`] is a *session*, which outlives one connection: when the reader
//! meets the end of its stream (the daemon died or closed the monitor) the
//! session is `Lost`, and it can be connected again to a restarted daemon
//! (`reconnect`). The events channel and the job claims belong to the
//! session, so a subscriber follows it across reconnects. A reconnected
//! session is `Restoring` until its owner has brought the new daemon in line
//! with the records: meanwhile only the restoring handle (`restorer`) may
//! send, so that no caller works on a daemon that lacks its volumes.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{Mutex, broadcast, oneshot, watch};
use tokio::time::Instant;

#[derive(Debug, Clone, thiserror::Error)]
pub enum QmpError {
    #[error("QMP connection failed: {0}")]
    Connect(String),
    #[error("QMP protocol error: {0}")]
    Protocol(String),
    #[error("QMP connection closed")]
    Disconnected,
    /// The daemon refused the command; `class` is QEMU's error class.
    #[error("QMP {command} failed ({class}): {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
}

impl QmpError {
    /// True when the daemon answered with an error whose text contains `needle`.
    pub fn desc_contains(&self, needle: &str) -> bool {
        matches!(self, QmpError::Command { desc, .. } if desc.contains(needle))
    }
}

/// An asynchronous QMP event.
#[derive(Debug, Clone, Deserialize)]
pub struct Event {
    pub event: String,
    #[serde(default)]
    pub data: Value,
}

impl Event {
    /// The job this event is about (`id` for JOB_*, `device` for BLOCK_JOB_*).
    pub fn job_id(&self) -> Option<&str> {
        self.data
            .get("id")
            .or_else(|| self.data.get("device"))
            .and_then(Value::as_str)
    }
}

/// Where a session stands with its daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    /// Connected: every handle may send.
    Live,
    /// The connection is gone since `since` (the daemon died or closed the
    /// monitor): every command fails with [`QmpError::Disconnected`].
    Lost { since: Instant },
    /// Connected again, to a daemon that does not hold what the records
    /// describe yet: only the restoring handle may send; every other one
    /// gets [`QmpError::Disconnected`] until [`Qmp::finish_restoring`].
    Restoring,
}

type Pending = Arc<std::sync::Mutex<HashMap<u64, oneshot::Sender<Result<Value, QmpError>>>>>;
type Claims = Arc<std::sync::Mutex<HashSet<String>>>;

/// Commands that start a block job named by their `job-id` argument.
const JOB_STARTERS: &[&str] = &["block-commit", "block-stream"];

/// How long a monitor may take to greet a new client. One that accepts but
/// stays silent is held by another client (QEMU 7.2 serves one per monitor).
const GREETING_WAIT: Duration = Duration::from_secs(10);

/// A QMP session. Cheap to clone; all clones share the session, and every
/// clone but a [`Qmp::restorer`] is held back while it is `Restoring`.
#[derive(Clone)]
pub struct Qmp {
    session: Arc<Session>,
    /// Whether this handle may send while the session is `Restoring`.
    restorer: bool,
}

struct Session {
    /// The connection, while there is one.
    link: std::sync::Mutex<Option<Link>>,
    state: watch::Sender<SessionState>,
    events: broadcast::Sender<Event>,
    next_id: AtomicU64,
    /// Numbers the connections, so that a reader that ends marks the
    /// session lost only if its connection is still the session's.
    next_link: AtomicU64,
    timeout: Duration,
    /// Jobs this session started (or claimed), until the daemon reports
    /// them dismissed. Several processes drive one daemon (the node plugin,
    /// the admin CLI): a job is driven to its end by whoever started it, and
    /// the node plugin's adopter (`reconcile.rs`) takes over only jobs that
    /// were started elsewhere.
    claims: Claims,
}

/// One connection to a monitor. Only the session holds its write half:
/// when the last handle on the session goes, the write half closes, the
/// daemon closes the monitor, and the reader ends.
#[derive(Clone)]
struct Link {
    id: u64,
    writer: Arc<Mutex<OwnedWriteHalf>>,
    pending: Pending,
}

impl Session {
    /// Called by a reader that ended: its connection is gone.
    fn lose(&self, link: u64) {
        let Ok(mut slot) = self.link.lock() else {
            return;
        };
        if slot.as_ref().is_some_and(|l| l.id == link) {
            *slot = None;
            self.state.send_replace(SessionState::Lost {
                since: Instant::now(),
            });
        }
    }
}

impl Qmp {
    /// Connects, reads the greeting and leaves negotiation mode.
    pub async fn connect(path: &Path) -> Result<Self, QmpError> {
        let (events, _) = broadcast::channel(1024);
        let session = Session {
            link: std::sync::Mutex::new(None),
            state: watch::Sender::new(SessionState::Lost {
                since: Instant::now(),
            }),
            events,
            next_id: AtomicU64::new(1),
            next_link: AtomicU64::new(1),
            timeout: Duration::from_secs(60),
            claims: Arc::default(),
        };
        let qmp = Qmp {
            session: Arc::new(session),
            restorer: false,
        };
        qmp.reconnect(path).await?;
        qmp.finish_restoring();
        Ok(qmp)
    }

    /// Connects a lost session to the monitor at `path` again (a restarted
    /// daemon's). The session is then `Restoring`: the caller brings the
    /// daemon in line through a [`Qmp::restorer`] handle, then calls
    /// [`Qmp::finish_restoring`]. The claims are dropped: the jobs they named
    /// died with the daemon, or lost the callers that drove them.
    pub async fn reconnect(&self, path: &Path) -> Result<(), QmpError> {
        if !matches!(self.state(), SessionState::Lost { .. }) {
            return Err(QmpError::Protocol("the session is connected".into()));
        }
        let stream = UnixStream::connect(path)
            .await
            .map_err(|e| QmpError::Connect(format!("{}: {e}", path.display())))?;
        let (rd, wr) = stream.into_split();
        let mut rd = BufReader::new(rd);
        let mut greeting = String::new();
        let n = tokio::time::timeout(GREETING_WAIT, rd.read_line(&mut greeting))
            .await
            .map_err(|_| QmpError::Timeout(GREETING_WAIT, "QMP greeting".into()))?
            .map_err(|e| QmpError::Connect(e.to_string()))?;
        if n == 0 || !greeting.contains("\"QMP\"") {
            return Err(QmpError::Protocol(format!("bad greeting {greeting:?}")));
        }
        let s = &self.session;
        let link = Link {
            id: s.next_link.fetch_add(1, Ordering::Relaxed),
            writer: Arc::new(Mutex::new(wr)),
            pending: Pending::default(),
        };
        if let Ok(mut c) = s.claims.lock() {
            c.clear();
        }
        {
            let mut slot = s
                .link
                .lock()
                .map_err(|_| QmpError::Protocol("session poisoned".into()))?;
            *slot = Some(link.clone());
            s.state.send_replace(SessionState::Restoring);
        }
        tokio::spawn(read_loop(
            rd,
            link.id,
            link.pending.clone(),
            Arc::downgrade(&self.session),
            s.events.clone(),
            s.claims.clone(),
        ));
        match self.execute_on(&link, "qmp_capabilities", json!({})).await {
            Ok(_) => Ok(()),
            Err(e) => {
                s.lose(link.id);
                Err(e)
            }
        }
    }

    /// A handle on this session that may send while it is `Restoring`: for
    /// the one task that brings a reconnected daemon in line.
    pub fn restorer(&self) -> Qmp {
        Qmp {
            session: self.session.clone(),
            restorer: true,
        }
    }

    /// Opens a `Restoring` session to every handle. Does nothing in any
    /// other state (a session lost again meanwhile stays lost).
    pub fn finish_restoring(&self) {
        self.session.state.send_if_modified(|s| {
            let restoring = *s == SessionState::Restoring;
            if restoring {
                *s = SessionState::Live;
            }
            restoring
        });
    }

    /// Where the session stands now.
    pub fn state(&self) -> SessionState {
        *self.session.state.borrow()
    }

    /// Every change of [`Qmp::state`] from now on.
    pub fn state_changes(&self) -> watch::Receiver<SessionState> {
        self.session.state.subscribe()
    }

    /// Waits until the session is `Live`.
    pub async fn until_live(&self) {
        let mut states = self.state_changes();
        // Err: the session is gone, which cannot happen while `self` holds it.
        let _ = states.wait_for(|s| *s == SessionState::Live).await;
    }

    /// Subscribe to events. Subscribe before issuing the command whose
    /// events you need.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.session.events.subscribe()
    }

    /// Marks a job as driven by this session (see `claims`): recovery that
    /// picked up a job another session started claims it.
    pub fn claim(&self, job: &str) {
        if let Ok(mut c) = self.session.claims.lock() {
            c.insert(job.to_owned());
        }
    }

    /// Whether this session started or claimed `job` and the daemon has not
    /// dismissed it since.
    pub fn claimed(&self, job: &str) -> bool {
        self.session.claims.lock().is_ok_and(|c| c.contains(job))
    }

    /// The jobs [`Qmp::claimed`] holds right now.
    pub fn claimed_jobs(&self) -> std::collections::HashSet<String> {
        self.session
            .claims
            .lock()
            .map(|c| c.clone())
            .unwrap_or_default()
    }

    /// The connection this handle may send on now.
    fn link(&self) -> Result<Link, QmpError> {
        match self.state() {
            SessionState::Live => {}
            SessionState::Restoring if self.restorer => {}
            SessionState::Restoring | SessionState::Lost { .. } => {
                return Err(QmpError::Disconnected);
            }
        }
        self.session
            .link
            .lock()
            .ok()
            .and_then(|l| l.clone())
            .ok_or(QmpError::Disconnected)
    }

    /// Runs one command and returns its `return` value.
    pub async fn execute(&self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let link = self.link()?;
        self.execute_on(&link, command, arguments).await
    }

    async fn execute_on(
        &self,
        link: &Link,
        command: &str,
        arguments: Value,
    ) -> Result<Value, QmpError> {
        let started_job = JOB_STARTERS
            .contains(&command)
            .then(|| arguments.get("job-id").and_then(Value::as_str))
            .flatten()
            .map(str::to_owned);
        let id = self.session.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        link.pending
            .lock()
            .map_err(|_| QmpError::Protocol("pending map poisoned".into()))?
            .insert(id, tx);
        let mut msg = json!({ "execute": command, "id": id });
        if arguments.as_object().is_some_and(|o| !o.is_empty()) {
            msg["arguments"] = arguments;
        }
        let mut line = msg.to_string();
        line.push('\n');
        tracing::debug!(command, id, "qmp send");
        {
            let mut w = link.writer.lock().await;
            if w.write_all(line.as_bytes()).await.is_err() {
                forget(&link.pending, id);
                return Err(QmpError::Disconnected);
            }
        }
        let timeout = self.session.timeout;
        let reply = match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(QmpError::Disconnected),
            Err(_) => {
                forget(&link.pending, id);
                Err(QmpError::Timeout(timeout, command.to_owned()))
            }
        };
        if reply.is_ok()
            && let Some(job) = started_job
        {
            self.claim(&job);
        }
        reply.map_err(|e| match e {
            QmpError::Command { class, desc, .. } => QmpError::Command {
                command: command.to_owned(),
                class,
                desc,
            },
            other => other,
        })
    }
}

fn forget(pending: &Pending, id: u64) {
    if let Ok(mut p) = pending.lock() {
        p.remove(&id);
    }
}

/// Reads one connection until it ends. Holds no strong reference on the
/// session: a session nobody holds any more must be able to go (and with it
/// the write half, which makes the daemon close the monitor).
async fn read_loop(
    mut rd: BufReader<tokio::net::unix::OwnedReadHalf>,
    link: u64,
    pending: Pending,
    session: Weak<Session>,
    events: broadcast::Sender<Event>,
    claims: Claims,
) {
    let mut line = String::new();
    loop {
        line.clear();
        match rd.read_line(&mut line).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            tracing::warn!(line = line.trim(), "unparsable QMP line");
            continue;
        };
        if v.get("event").is_some() {
            if let Ok(ev) = serde_json::from_value::<Event>(v) {
                tracing::debug!(event = ev.event, data = %ev.data, "qmp event");
                // Status "null": the job was dismissed (by any session); its
                // id may be used again by a later job.
                if ev.event == "JOB_STATUS_CHANGE"
                    && ev.data.get("status").and_then(Value::as_str) == Some("null")
                    && let Some(job) = ev.job_id()
                    && let Ok(mut c) = claims.lock()
                {
                    c.remove(job);
                }
                // No receivers is fine: nobody is waiting for events right now.
                let _ = events.send(ev);
            }
            continue;
        }
        let Some(id) = v.get("id").and_then(Value::as_u64) else {
            tracing::warn!(line = line.trim(), "QMP reply without our id");
            continue;
        };
        let result = if let Some(r) = v.get("return") {
            Ok(r.clone())
        } else if let Some(e) = v.get("error") {
            Err(QmpError::Command {
                command: String::new(),
                class: e
                    .get("class")
                    .and_then(Value::as_str)
                    .unwrap_or("Unknown")
                    .to_owned(),
                desc: e
                    .get("desc")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
            })
        } else {
            Err(QmpError::Protocol(format!(
                "reply without return/error: {v}"
            )))
        };
        let waiter = pending.lock().ok().and_then(|mut p| p.remove(&id));
        if let Some(tx) = waiter {
            let _ = tx.send(result);
        }
    }
    // Connection gone: the session is lost (if this is still its
    // connection), and every caller is woken instead of left hanging.
    if let Some(s) = session.upgrade() {
        s.lose(link);
    }
    if let Ok(mut p) = pending.lock() {
        for (_, tx) in p.drain() {
            let _ = tx.send(Err(QmpError::Disconnected));
        }
    }
}

/// Waits until an event satisfying `pred` arrives on `rx`.
pub async fn wait_event(
    rx: &mut broadcast::Receiver<Event>,
    what: &str,
    timeout: Duration,
    mut pred: impl FnMut(&Event) -> bool,
) -> Result<Event, QmpError> {
    let fut = async {
        loop {
            match rx.recv().await {
                Ok(ev) if pred(&ev) => return Ok(ev),
                Ok(_) => {}
                // We only lose events if >1024 queue up unread; callers then
                // fall back on query-jobs, so treat it as "look again".
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return Err(QmpError::Disconnected),
            }
        }
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| QmpError::Timeout(timeout, what.to_owned()))?
}

/// Waits for JOB_STATUS_CHANGE of `job_id` to reach one of `statuses`.
pub async fn wait_job_status(
    rx: &mut broadcast::Receiver<Event>,
    job_id: &str,
    statuses: &[&str],
    timeout: Duration,
) -> Result<String, QmpError> {
    let ev = wait_event(rx, &format!("job {job_id} {statuses:?}"), timeout, |ev| {
        ev.event == "JOB_STATUS_CHANGE"
            && ev.job_id() == Some(job_id)
            && ev
                .data
                .get("status")
                .and_then(Value::as_str)
                .is_some_and(|s| statuses.contains(&s))
    })
    .await?;
    Ok(ev
        .data
        .get("status")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned())
}

/// One entry of `query-jobs`.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq, Eq)]
pub struct JobInfo {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub status: String,
    #[serde(rename = "current-progress")]
    pub current_progress: u64,
    #[serde(rename = "total-progress")]
    pub total_progress: u64,
    #[serde(default)]
    pub error: Option<String>,
}

pub async fn query_jobs(qmp: &Qmp) -> Result<Vec<JobInfo>, QmpError> {
    let v = qmp.execute("query-jobs", json!({})).await?;
    serde_json::from_value(v).map_err(|e| QmpError::Protocol(format!("query-jobs: {e}")))
}

/// The rate limit (bytes/s, 0: none) of block job `job` as it is now, `None` if no such job.
pub async fn block_job_speed(qmp: &Qmp, job: &str) -> Result<Option<u64>, QmpError> {
    let v = qmp.execute("query-block-jobs", json!({})).await?;
    let jobs = v
        .as_array()
        .ok_or_else(|| QmpError::Protocol("query-block-jobs: not a list".into()))?;
    Ok(jobs
        .iter()
        .find(|j| j.get("device").and_then(Value::as_str) == Some(job))
        .map(|j| j.get("speed").and_then(Value::as_u64).unwrap_or(0)))
}

/// What a monitor socket does for a new client within `within`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Greeting {
    /// It greeted: nobody else holds the monitor (the probe let go again).
    Free,
    /// It accepted the connection but stayed silent: QEMU 7.2 serves one
    /// client per monitor, so another process holds it.
    Held,
    /// Nothing listens (no socket, or a stale one).
    Absent,
}

/// Probes a monitor socket without sending any command.
pub async fn probe(path: &Path, within: Duration) -> Greeting {
    let Ok(stream) = UnixStream::connect(path).await else {
        return Greeting::Absent;
    };
    let mut rd = BufReader::new(stream);
    let mut line = String::new();
    match tokio::time::timeout(within, rd.read_line(&mut line)).await {
        Ok(Ok(n)) if n > 0 && line.contains("\"QMP\"") => Greeting::Free,
        Ok(_) => Greeting::Absent,
        Err(_) => Greeting::Held,
    }
}

/// Whether a `block-stream` job has finished but is not dismissed yet.
/// QEMU 7.2 then crashes on `query-named-block-nodes` (seen here: the job's
/// copy-on-read filter node is half torn down until the job is dismissed),
/// so the engine lists nodes with [`block_graph`] instead. Its owner
/// dismisses such a job at once (a merge's finisher, the flatten watcher),
/// so light recovery waits for that rather than take the volume's lock.
pub fn stream_settling(jobs: &[JobInfo]) -> bool {
    jobs.iter().any(|j| {
        j.kind == "stream"
            && matches!(
                j.status.as_str(),
                "waiting" | "pending" | "aborting" | "concluded"
            )
    })
}

/// The daemon's block nodes and their backing links, as
/// `x-debug-query-block-graph` gives them.
///
/// Not `query-named-block-nodes`: QEMU 7.2 segfaults on that (`segfault at
/// 40`, seen here in a node's daemon and reproduced with a bare one) while a
/// `block-stream` job that ended, finished or cancelled, is not dismissed
/// yet, and such a job can end between any look at `query-jobs`
/// ([`stream_settling`]) and the listing after it: a clone's flatten
/// concludes whenever its copy is done. The graph names nodes and edges
/// only and reads no node's filename; it lists the same nodes, and answers
/// in that state (tested).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockGraph {
    /// Node name -> how many `backing` links lead down from it (0: none).
    /// QEMU's `backing_file_depth` also counts filters' children, which the
    /// graph does not tell apart; the engine's layers are qcow2 nodes, for
    /// which the two agree.
    pub backing_depth: HashMap<String, u64>,
}

impl BlockGraph {
    /// Reads the answer of `x-debug-query-block-graph`.
    pub fn parse(v: &Value) -> Result<Self, QmpError> {
        let bad = |what: &str| QmpError::Protocol(format!("x-debug-query-block-graph: {what}"));
        let nodes = v
            .get("nodes")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("no node list"))?;
        let edges = v
            .get("edges")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("no edge list"))?;
        let mut names = HashMap::new();
        for n in nodes {
            if n.get("type").and_then(Value::as_str) != Some("block-driver") {
                continue;
            }
            let id = n
                .get("id")
                .and_then(Value::as_u64)
                .ok_or_else(|| bad("node id"))?;
            let name = n.get("name").and_then(Value::as_str).unwrap_or_default();
            if !name.is_empty() {
                names.insert(id, name.to_owned());
            }
        }
        let mut backing = HashMap::new();
        for e in edges {
            if e.get("name").and_then(Value::as_str) != Some("backing") {
                continue;
            }
            let end = |k: &str| e.get(k).and_then(Value::as_u64).ok_or_else(|| bad(k));
            backing.insert(end("parent")?, end("child")?);
        }
        let backing_depth = names
            .iter()
            .map(|(id, name)| {
                let mut depth = 0;
                let mut at = *id;
                // Bounded: a chain has fewer links than the graph has edges.
                while let Some(next) = backing.get(&at)
                    && depth < backing.len() as u64
                {
                    depth += 1;
                    at = *next;
                }
                (name.clone(), depth)
            })
            .collect();
        Ok(Self { backing_depth })
    }

    /// Every node's name.
    pub fn names(&self) -> HashSet<String> {
        self.backing_depth.keys().cloned().collect()
    }
}

/// The daemon's block nodes (see [`BlockGraph`]).
pub async fn block_graph(qmp: &Qmp) -> Result<BlockGraph, QmpError> {
    BlockGraph::parse(&qmp.execute("x-debug-query-block-graph", json!({})).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `x-debug-query-block-graph` of a QEMU 7.2 daemon holding `top` on
    /// `base` (each on a `file` node) while the stream job `f1` of `top`,
    /// cancelled, waits to be dismissed: the state in which
    /// `query-named-block-nodes` segfaults it.
    fn settling_stream_graph() -> Value {
        json!({"edges": [
            {"name": "file", "parent": 3, "shared-perm": [], "perm": [], "child": 6},
            {"name": "backing", "parent": 3, "shared-perm": [], "perm": [], "child": 2},
            {"name": "file", "parent": 2, "shared-perm": [], "perm": [], "child": 5},
            {"name": "main node", "parent": 1, "shared-perm": [], "perm": [], "child": 4},
            {"name": "active node", "parent": 1, "shared-perm": [], "perm": [], "child": 3},
            {"name": "intermediate node", "parent": 1, "shared-perm": [], "perm": [], "child": 2}],
        "nodes": [
            {"name": "#block091", "type": "block-driver", "id": 4},
            {"name": "top", "type": "block-driver", "id": 3},
            {"name": "tf", "type": "block-driver", "id": 6},
            {"name": "base", "type": "block-driver", "id": 2},
            {"name": "bf", "type": "block-driver", "id": 5},
            {"name": "f1", "type": "block-job", "id": 1},
            {"name": "", "type": "block-backend", "id": 7}]})
    }

    #[test]
    fn the_block_graph_names_every_node_and_counts_backing_links_only() {
        let g = BlockGraph::parse(&settling_stream_graph()).expect("parse");
        let depth = |n: &str| g.backing_depth.get(n).copied();
        assert_eq!(depth("top"), Some(1));
        assert_eq!(depth("base"), Some(0));
        // A `file` child is no backing; jobs and backends are no nodes.
        assert_eq!(
            (depth("tf"), depth("bf"), depth("#block091")),
            (Some(0), Some(0), Some(0))
        );
        assert_eq!(depth("f1"), None);
        assert_eq!(g.names().len(), 5);
    }

    #[test]
    fn a_longer_chain_counts_every_link_and_a_loop_ends() {
        let node = |id: u64| json!({"name": format!("n{id}"), "type": "block-driver", "id": id});
        let link =
            |parent: u64, child: u64| json!({"name": "backing", "parent": parent, "child": child});
        let chain =
            json!({"nodes": [node(1), node(2), node(3)], "edges": [link(3, 2), link(2, 1)]});
        let g = BlockGraph::parse(&chain).expect("parse");
        assert_eq!(g.backing_depth["n3"], 2);
        assert_eq!(g.backing_depth["n1"], 0);
        let looped = json!({"nodes": [node(1), node(2)], "edges": [link(1, 2), link(2, 1)]});
        assert_eq!(
            BlockGraph::parse(&looped).expect("parse").backing_depth["n1"],
            2
        );
        assert!(BlockGraph::parse(&json!({"nodes": []})).is_err());
    }
}
