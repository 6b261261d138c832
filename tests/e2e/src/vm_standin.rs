//! The record of the virt-api stand-in (`hack/cluster.sh` starts it): one JSON line per call to
//! the `subresources.kubevirt.io` freeze API that reached it through the API server.

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::Deserialize;

/// One call as the stand-in recorded it.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Call {
    /// RFC 3339, when the call arrived.
    pub time: String,
    /// `freeze`, `unfreeze` or `auto-unfreeze` (the unfreeze timeout passed).
    pub op: String,
    pub namespace: String,
    pub name: String,
    /// The caller, as the API server vouched for it (none for an `auto-unfreeze`).
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub unfreeze_timeout: Option<String>,
    /// The HTTP status it answered (none for an `auto-unfreeze`).
    #[serde(default)]
    pub code: Option<u16>,
    #[serde(default)]
    pub message: Option<String>,
}

impl Call {
    /// The arrival time in nanoseconds since the epoch.
    pub fn nanos(&self) -> Result<i64> {
        let time: k8s_openapi::jiff::Timestamp = self.time.parse().context("record time")?;
        i64::try_from(time.as_nanosecond()).context("time out of range")
    }
}

/// The record file of the cluster the tests run against.
pub fn record() -> Result<PathBuf> {
    let state = std::env::var("LIVEDISK_STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| crate::workspace_root().join(".livedisk"));
    Ok(state.join("virt-api-standin").join("calls.jsonl"))
}

/// The calls made for the instance `namespace/name`, in order.
pub fn calls_for(namespace: &str, name: &str) -> Result<Vec<Call>> {
    let path = record()?;
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let mut calls = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let call: Call =
            serde_json::from_str(line).with_context(|| format!("record line {line}"))?;
        if call.namespace == namespace && call.name == name {
            calls.push(call);
        }
    }
    Ok(calls)
}
