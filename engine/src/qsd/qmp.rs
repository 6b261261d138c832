//! Async QMP client over a unix socket.
//!
//! One reader task owns the read half: it routes each reply to the waiting
//! caller by the `id` we put on the command, and fans events out on a
//! broadcast channel. Callers that need to see the events a command causes
//! subscribe *before* sending it, so no event can slip past them.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{Mutex, broadcast, oneshot};

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

type Pending = Arc<std::sync::Mutex<HashMap<u64, oneshot::Sender<Result<Value, QmpError>>>>>;
type Claims = Arc<std::sync::Mutex<HashSet<String>>>;

/// Commands that start a block job named by their `job-id` argument.
const JOB_STARTERS: &[&str] = &["block-commit", "block-stream"];

/// A connected QMP session. Cheap to clone; all clones share one socket.
#[derive(Clone)]
pub struct Qmp {
    writer: Arc<Mutex<OwnedWriteHalf>>,
    pending: Pending,
    events: broadcast::Sender<Event>,
    next_id: Arc<AtomicU64>,
    timeout: Duration,
    /// Jobs this session started (or claimed), until the daemon reports
    /// them dismissed. Several processes drive one daemon (the node plugin,
    /// the admin CLI): a job is driven to its end by whoever started it, and
    /// the node plugin's adopter (`reconcile.rs`) takes over only jobs that
    /// were started elsewhere.
    claims: Claims,
}

impl Qmp {
    /// Connects, reads the greeting and leaves negotiation mode.
    pub async fn connect(path: &Path) -> Result<Self, QmpError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|e| QmpError::Connect(format!("{}: {e}", path.display())))?;
        let (rd, wr) = stream.into_split();
        let mut rd = BufReader::new(rd);
        let mut greeting = String::new();
        let n = tokio::time::timeout(Duration::from_secs(10), rd.read_line(&mut greeting))
            .await
            .map_err(|_| QmpError::Timeout(Duration::from_secs(10), "QMP greeting".into()))?
            .map_err(|e| QmpError::Connect(e.to_string()))?;
        if n == 0 || !greeting.contains("\"QMP\"") {
            return Err(QmpError::Protocol(format!("bad greeting {greeting:?}")));
        }
        let (events, _) = broadcast::channel(1024);
        let pending: Pending = Arc::default();
        let claims: Claims = Arc::default();
        tokio::spawn(read_loop(
            rd,
            pending.clone(),
            events.clone(),
            claims.clone(),
        ));
        let qmp = Qmp {
            writer: Arc::new(Mutex::new(wr)),
            pending,
            events,
            next_id: Arc::new(AtomicU64::new(1)),
            timeout: Duration::from_secs(60),
            claims,
        };
        qmp.execute("qmp_capabilities", json!({})).await?;
        Ok(qmp)
    }

    /// Subscribe to events. Subscribe before issuing the command whose
    /// events you need.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Marks a job as driven by this session (see `claims`): recovery that
    /// picked up a job another session started claims it.
    pub fn claim(&self, job: &str) {
        if let Ok(mut c) = self.claims.lock() {
            c.insert(job.to_owned());
        }
    }

    /// Whether this session started or claimed `job` and the daemon has not
    /// dismissed it since.
    pub fn claimed(&self, job: &str) -> bool {
        self.claims.lock().is_ok_and(|c| c.contains(job))
    }

    /// The jobs [`Qmp::claimed`] holds right now.
    pub fn claimed_jobs(&self) -> std::collections::HashSet<String> {
        self.claims.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// Runs one command and returns its `return` value.
    pub async fn execute(&self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let started_job = JOB_STARTERS
            .contains(&command)
            .then(|| arguments.get("job-id").and_then(Value::as_str))
            .flatten()
            .map(str::to_owned);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending
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
            let mut w = self.writer.lock().await;
            if w.write_all(line.as_bytes()).await.is_err() {
                self.forget(id);
                return Err(QmpError::Disconnected);
            }
        }
        let reply = match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(QmpError::Disconnected),
            Err(_) => {
                self.forget(id);
                Err(QmpError::Timeout(self.timeout, command.to_owned()))
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

    fn forget(&self, id: u64) {
        if let Ok(mut p) = self.pending.lock() {
            p.remove(&id);
        }
    }
}

async fn read_loop(
    mut rd: BufReader<tokio::net::unix::OwnedReadHalf>,
    pending: Pending,
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
    // Connection gone: wake every caller instead of leaving them hanging.
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
