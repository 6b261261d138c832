//! The call record tests read: one JSON object per line, appended for every freeze and unfreeze
//! call that reached the stand-in (whatever its answer) and for every safety unfreeze it did by
//! itself.
//!
//! Fields: `time` (RFC 3339, UTC, milliseconds), `op` (`freeze`, `unfreeze`, `auto-unfreeze`),
//! `namespace`, `name`, `user` (the requesting user the API server named; null for
//! `auto-unfreeze`), `unfreezeTimeout` (as the freeze body gave it; for `auto-unfreeze` the
//! freeze's; null otherwise), `code` (the HTTP status answered; null for `auto-unfreeze`),
//! `message` (why, when the answer is not 200, or what else happened; may be absent).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use chrono::{SecondsFormat, Utc};
use serde_json::{Value, json};

/// One entry.
#[derive(Debug, Clone, Default)]
pub struct Call {
    pub op: &'static str,
    pub namespace: String,
    pub name: String,
    pub user: Option<String>,
    pub unfreeze_timeout: Option<String>,
    pub code: Option<u16>,
    pub message: Option<String>,
}

impl Call {
    /// Pure: the line written for this call at `time`.
    pub fn to_json(&self, time: &str) -> Value {
        let mut line = json!({
            "time": time,
            "op": self.op,
            "namespace": self.namespace,
            "name": self.name,
            "user": self.user,
            "unfreezeTimeout": self.unfreeze_timeout,
            "code": self.code,
        });
        if let (Some(message), Some(map)) = (&self.message, line.as_object_mut()) {
            map.insert("message".into(), json!(message));
        }
        line
    }
}

pub struct Recorder {
    file: Mutex<File>,
}

impl Recorder {
    /// Opens (creating it and its directory) `path` for appending.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self {
            file: Mutex::new(file),
        })
    }

    /// Appends the call as one line (one write, flushed before it returns). A failed write is
    /// logged: the answer to the caller does not depend on it.
    pub fn record(&self, call: &Call) {
        let time = Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
        let mut line = call.to_json(&time).to_string();
        line.push('\n');
        tracing::info!(record = %line.trim_end(), "call");
        let written = match self.file.lock() {
            Ok(mut file) => file.write_all(line.as_bytes()).and_then(|()| file.flush()),
            Err(poisoned) => {
                let mut file = poisoned.into_inner();
                file.write_all(line.as_bytes()).and_then(|()| file.flush())
            }
        };
        if let Err(error) = written {
            tracing::error!(%error, "could not append to the call record");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_carry_every_field_and_append() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/calls.jsonl");
        let recorder = Recorder::open(&path).expect("open");
        recorder.record(&Call {
            op: "freeze",
            namespace: "ns".into(),
            name: "vm".into(),
            user: Some("alice".into()),
            unfreeze_timeout: Some("5m0s".into()),
            code: Some(200),
            message: None,
        });
        recorder.record(&Call {
            op: "auto-unfreeze",
            namespace: "ns".into(),
            name: "vm".into(),
            unfreeze_timeout: Some("5m0s".into()),
            ..Default::default()
        });
        let text = std::fs::read_to_string(&path).expect("read");
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["op"], "freeze");
        assert_eq!(lines[0]["user"], "alice");
        assert_eq!(lines[0]["code"], 200);
        assert!(lines[0].get("message").is_none());
        let time = lines[0]["time"].as_str().expect("time");
        assert!(
            chrono::DateTime::parse_from_rfc3339(time).is_ok() && time.len() == 24,
            "{time}"
        );
        assert_eq!(lines[1]["op"], "auto-unfreeze");
        assert!(lines[1]["user"].is_null() && lines[1]["code"].is_null());
    }
}
