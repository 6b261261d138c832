//! Counting one client's API requests in the API server's audit log (scenario f).
//!
//! The local cluster's audit policy (hack/cluster.sh) logs every request of the livedisk
//! namespace's ServiceAccounts at Metadata level, each with the user who made it. That is a
//! per-client count the API server's own `apiserver_request_total` cannot give (it has no user
//! or client label), so the benchmark counts the operator's requests there.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::Path;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use serde::Deserialize;

/// The operator's identity on the local cluster: the chart's ServiceAccount
/// (`hack/accounts.sh`), whose kubeconfig the benchmark starts it with.
pub const OPERATOR_USER: &str = "system:serviceaccount:livedisk-system:livedisk-operator";

/// Requests counted, in total and by verb (`create`, `patch`, `watch`, ...).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Requests {
    pub total: usize,
    pub by_verb: BTreeMap<String, usize>,
}

impl Requests {
    /// "create 1000, get 12, patch 3000" for the progress lines and the docs.
    pub fn verbs(&self) -> String {
        self.by_verb
            .iter()
            .map(|(verb, n)| format!("{verb} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Entry {
    #[serde(rename = "auditID")]
    audit_id: String,
    verb: String,
    user: User,
    request_received_timestamp: DateTime<Utc>,
}

#[derive(Deserialize)]
struct User {
    #[serde(default)]
    username: String,
}

/// The requests of `user` the API server received in `[from, to)`, each once (a watch is logged
/// when its response starts and again when it ends, under one audit ID). Lines that are not
/// audit events are skipped.
#[cfg(test)]
pub fn count<'a>(
    lines: impl IntoIterator<Item = &'a str>,
    user: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Requests {
    let mut seen = HashSet::new();
    let mut found = Requests::default();
    for line in lines {
        tally(&mut found, &mut seen, line, user, from, to);
    }
    found
}

fn tally(
    found: &mut Requests,
    seen: &mut HashSet<String>,
    line: &str,
    user: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) {
    let Ok(e) = serde_json::from_str::<Entry>(line) else {
        return;
    };
    let t = e.request_received_timestamp;
    if e.user.username != user || t < from || t >= to || !seen.insert(e.audit_id) {
        return;
    }
    found.total += 1;
    *found.by_verb.entry(e.verb).or_default() += 1;
}

/// [`count`] over every audit log file in `dir` (`audit.log` and its rotated copies), read line
/// by line (a run of (f) at full scale logs hundreds of MB).
pub fn count_in_dir(
    dir: &Path,
    user: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Requests> {
    let mut found = Requests::default();
    let mut seen = HashSet::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if !(name.starts_with("audit") && name.ends_with(".log")) {
            continue;
        }
        let file =
            std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        for line in BufReader::new(file).lines() {
            let line = line.with_context(|| format!("reading {}", path.display()))?;
            // Most lines are other clients': not worth parsing.
            if line.contains(user) {
                tally(&mut found, &mut seen, &line, user, from, to);
            }
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(id: &str, verb: &str, user: &str, at: &str, stage: &str) -> String {
        format!(
            r#"{{"kind":"Event","apiVersion":"audit.k8s.io/v1","level":"Metadata","auditID":"{id}","stage":"{stage}","requestURI":"/x","verb":"{verb}","user":{{"username":"{user}","groups":["system:serviceaccounts"]}},"requestReceivedTimestamp":"{at}","stageTimestamp":"{at}"}}"#
        )
    }

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn counts_one_users_requests_in_the_window_once_each() {
        let me = OPERATOR_USER;
        let other = "system:serviceaccount:livedisk-system:livedisk-csi-controller";
        let log = [
            // Before the window: the operator's start-up lists.
            line(
                "a",
                "list",
                me,
                "2026-12-04T18:00:00.900000Z",
                "ResponseComplete",
            ),
            line(
                "b",
                "create",
                me,
                "2026-12-04T18:00:01.000000Z",
                "ResponseComplete",
            ),
            line(
                "c",
                "patch",
                me,
                "2026-12-04T18:00:01.500000Z",
                "ResponseComplete",
            ),
            line(
                "c",
                "patch",
                me,
                "2026-12-04T18:00:01.500000Z",
                "ResponseComplete",
            ),
            // A watch: started and ended, one request.
            line(
                "d",
                "watch",
                me,
                "2026-12-04T18:00:02.000000Z",
                "ResponseStarted",
            ),
            line(
                "d",
                "watch",
                me,
                "2026-12-04T18:00:02.000000Z",
                "ResponseComplete",
            ),
            line(
                "e",
                "create",
                other,
                "2026-12-04T18:00:02.000000Z",
                "ResponseComplete",
            ),
            "not json".to_string(),
            // At the window's end: outside.
            line(
                "f",
                "create",
                me,
                "2026-12-04T18:00:03.000000Z",
                "ResponseComplete",
            ),
        ];
        let r = count(
            log.iter().map(String::as_str),
            me,
            at("2026-12-04T18:00:01Z"),
            at("2026-12-04T18:00:03Z"),
        );
        assert_eq!(r.total, 3);
        assert_eq!(r.verbs(), "create 1, patch 1, watch 1");
    }
}
