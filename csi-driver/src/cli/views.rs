//! Pure view builders: engine data in, a table and a JSON document out.

use std::collections::HashSet;
use std::path::Path;

use livedisk_engine::record::{ExportTarget, InFlight, SnapshotState, VolumeRecord};
use livedisk_engine::{
    ExportInfo, Extent, ExtentPage, JobInfo, SnapshotId, SnapshotInfo, VolumeInfo,
};
use serde_json::{Value, json};

use super::size::format_size;
use super::table::{render, render_kv};

/// What a command prints: `text` by default, `json` with `--json`.
#[derive(Debug, Clone, PartialEq)]
pub struct Out {
    pub text: String,
    pub json: Value,
}

fn state_of(rec: &VolumeRecord) -> &'static str {
    match (&rec.in_flight, rec.deleted) {
        (Some(InFlight::Merge { .. }), _) => "merging",
        (None, false) if rec.pending_revert.is_some() => "reverting",
        (None, true) => "deleted",
        (None, false) => "live",
    }
}

pub struct DaemonFacts {
    pub pid: Option<i32>,
    pub alive: bool,
    /// QEMU version from QMP, or why it could not be asked.
    pub version: Result<String, String>,
}

pub fn info(pool: &Path, runtime: &Path, volumes: usize, d: &DaemonFacts) -> Out {
    let pid = match (d.pid, d.alive) {
        (Some(p), true) => p.to_string(),
        (Some(p), false) => format!("{p} (not running)"),
        (None, _) => "none".into(),
    };
    let version = match &d.version {
        Ok(v) => v.clone(),
        Err(e) => format!("unknown ({e})"),
    };
    Out {
        text: render_kv(&[
            ("pool", pool.display().to_string()),
            ("runtime dir", runtime.display().to_string()),
            ("volumes", volumes.to_string()),
            ("daemon pid", pid),
            ("qemu version", version),
        ]),
        json: json!({
            "pool": pool, "runtimeDir": runtime, "volumes": volumes,
            "daemonPid": d.pid, "daemonAlive": d.alive,
            "qemuVersion": d.version.as_ref().ok(),
            "qemuVersionError": d.version.as_ref().err(),
        }),
    }
}

pub fn volumes(recs: &[VolumeRecord]) -> Out {
    let rows = recs
        .iter()
        .map(|r| {
            vec![
                r.id.to_string(),
                format_size(r.size),
                r.layers.len().to_string(),
                r.snapshots.len().to_string(),
                r.exports.len().to_string(),
                state_of(r).into(),
            ]
        })
        .collect::<Vec<_>>();
    let json = recs
        .iter()
        .map(|r| {
            json!({
                "id": r.id, "size": r.size, "layers": r.layers.len(),
                "snapshots": r.snapshots.len(), "exports": r.exports.len(),
                "state": state_of(r),
            })
        })
        .collect();
    Out {
        text: render(
            &["VOLUME", "SIZE", "LAYERS", "SNAPSHOTS", "EXPORTS", "STATE"],
            &rows,
        ),
        json: Value::Array(json),
    }
}

/// One layer's file facts, gathered by the caller.
pub struct LayerFile {
    pub path: String,
    /// Bytes the file occupies on disk, `None` if it is missing.
    pub disk_usage: Option<u64>,
}

pub fn chain(rec: &VolumeRecord, files: &[LayerFile]) -> Out {
    let mut rows = vec![];
    let mut js = vec![];
    for (i, (l, f)) in rec.layers.iter().zip(files).enumerate() {
        let role = match (&l.sealed_by, i + 1 == rec.layers.len() && !rec.deleted) {
            (None, true) => "active".to_string(),
            // Sealed by the engine itself so that a merge never commits the layer taking writes
            // (see csi-driver/README.md); it goes away with that merge.
            (None, false) => "internal".to_string(),
            (Some(s), _) => s.to_string(),
        };
        let usage = f.disk_usage.map_or("missing".into(), format_size);
        rows.push(vec![
            l.seq.to_string(),
            rec.node_name(l.seq),
            usage,
            role,
            f.path.clone(),
        ]);
        js.push(json!({
            "seq": l.seq, "node": rec.node_name(l.seq), "file": f.path,
            "diskUsage": f.disk_usage, "sealedBy": l.sealed_by,
        }));
    }
    Out {
        text: render(&["SEQ", "NODE", "DISK", "SEALED BY", "FILE"], &rows),
        json: json!({ "volume": rec.id, "layers": js }),
    }
}

fn snap_state(s: SnapshotState) -> &'static str {
    match s {
        SnapshotState::Ready => "ready",
        SnapshotState::Deleting => "deleting",
    }
}

fn extent_summary(list: &[Extent]) -> String {
    let bytes: u64 = list.iter().map(|e| e.length).sum();
    format!("{} in {} extents", format_size(bytes), list.len())
}

/// Snapshots, then the deleted ones whose tombstones still answer as the
/// base of a delta (state `deleted`; their CHANGED is what was written
/// after them up to the live snapshot named): an admin sees why a deleted
/// ID still answers, and until when.
pub fn snapshots(rec: &VolumeRecord) -> Out {
    let created = |t: &chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%d %H:%M:%S").to_string();
    let mut rows = rec
        .snapshots
        .iter()
        .map(|s| {
            vec![
                s.id.to_string(),
                created(&s.created),
                format_size(s.size),
                snap_state(s.state).into(),
                s.changed
                    .as_deref()
                    .map_or("not captured".into(), extent_summary),
            ]
        })
        .collect::<Vec<_>>();
    rows.extend(rec.tombstones.iter().map(|t| {
        vec![
            t.id.to_string(),
            created(&t.created),
            "-".into(),
            "deleted".into(),
            format!("{} up to {}", extent_summary(&t.changed), t.before),
        ]
    }));
    let mut json: Vec<Value> = rec
        .snapshots
        .iter()
        .map(|s| {
            json!({
                "id": s.id, "volume": rec.id, "created": s.created, "size": s.size,
                "state": snap_state(s.state),
                "changedExtents": s.changed.as_ref().map(Vec::len),
                "changedBytes": s.changed.as_ref().map(|c| c.iter().map(|e| e.length).sum::<u64>()),
                // A hidden base: the engine's own snapshot, made for this clone.
                "forClone": s.for_clone,
            })
        })
        .collect();
    json.extend(rec.tombstones.iter().map(|t| {
        json!({
            "id": t.id, "volume": rec.id, "created": t.created, "state": "deleted",
            // Only a delta's base: its changes up to this live snapshot.
            "until": t.before,
            "changedExtents": t.changed.len(),
            "changedBytes": t.changed.iter().map(|e| e.length).sum::<u64>(),
        })
    }));
    let json = Value::Array(json);
    Out {
        text: render(&["SNAPSHOT", "CREATED", "SIZE", "STATE", "CHANGED"], &rows),
        json,
    }
}

pub fn percent(done: u64, total: u64) -> String {
    if total == 0 {
        return "-".into();
    }
    format!("{:.1}%", done as f64 * 100.0 / total as f64)
}

pub fn jobs(list: &[JobInfo]) -> Out {
    let rows = list
        .iter()
        .map(|j| {
            vec![
                j.id.clone(),
                j.kind.clone(),
                j.status.clone(),
                format!(
                    "{}/{}",
                    format_size(j.current_progress),
                    format_size(j.total_progress)
                ),
                percent(j.current_progress, j.total_progress),
                j.error.clone().unwrap_or_default(),
            ]
        })
        .collect::<Vec<_>>();
    Out {
        text: render(
            &["JOB", "TYPE", "STATUS", "PROGRESS", "DONE", "ERROR"],
            &rows,
        ),
        json: json!(list),
    }
}

/// Exports declared by the records, with whether the daemon serves them.
pub fn exports(recs: &[VolumeRecord], live: &HashSet<String>, socket: &Path) -> Out {
    let mut rows = vec![];
    let mut js = vec![];
    for r in recs {
        for e in &r.exports {
            let (name, eid) = r.export_names(&e.target);
            let (kind, writable) = match e.target {
                ExportTarget::Volume => ("volume", true),
                ExportTarget::Import => ("import", true),
                ExportTarget::Snapshot { .. } => ("snapshot", false),
            };
            let dirty_bitmap = e
                .changed_since
                .as_ref()
                .map(livedisk_engine::bitmap::context_name);
            let info = ExportInfo {
                name: name.clone(),
                socket: socket.to_path_buf(),
                writable,
                dirty_bitmap: dirty_bitmap.clone(),
            };
            let served = live.contains(&eid);
            rows.push(vec![
                name.clone(),
                kind.into(),
                r.id.to_string(),
                if served { "yes" } else { "NO" }.into(),
                info.uri(),
            ]);
            js.push(json!({
                "name": name, "kind": kind, "volume": r.id, "exportId": eid,
                "writable": writable, "served": served, "uri": info.uri(),
                "dirtyBitmap": dirty_bitmap,
            }));
        }
    }
    Out {
        text: render(&["NAME", "KIND", "VOLUME", "SERVED", "URI"], &rows),
        json: Value::Array(js),
    }
}

pub fn volume_created(v: &VolumeInfo) -> Out {
    Out {
        text: render(
            &["VOLUME", "SIZE"],
            &[vec![v.id.to_string(), format_size(v.size)]],
        ),
        json: json!(v),
    }
}

pub fn snapshots_created(list: &[SnapshotInfo], transaction_ms: f64, total_ms: f64) -> Out {
    let rows = list
        .iter()
        .map(|s| vec![s.id.to_string(), s.volume.to_string(), format_size(s.size)])
        .collect::<Vec<_>>();
    let mut text = render(&["SNAPSHOT", "VOLUME", "SIZE"], &rows);
    text.push_str(&format!(
        "transaction {transaction_ms:.1} ms, total {total_ms:.1} ms\n"
    ));
    Out {
        text,
        json: json!({
            "snapshots": list,
            "transactionMs": transaction_ms,
            "totalMs": total_ms,
        }),
    }
}

pub fn extent_page(p: &ExtentPage) -> Out {
    let rows = p
        .extents
        .iter()
        .map(|e| vec![e.offset.to_string(), e.length.to_string()])
        .collect::<Vec<_>>();
    let bytes: u64 = p.extents.iter().map(|e| e.length).sum();
    let mut text = render(&["OFFSET", "LENGTH"], &rows);
    text.push_str(&format!(
        "{} extents, {} of {}\n",
        p.extents.len(),
        format_size(bytes),
        format_size(p.volume_size)
    ));
    if let Some(last) = p.extents.last() {
        text.push_str(&format!("next page: --start {}\n", last.end()));
    }
    Out {
        text,
        json: json!({
            "volumeSize": p.volume_size,
            "extents": p.extents,
            "nextStart": p.extents.last().map(|e| e.end()),
        }),
    }
}

pub fn export_started(e: &ExportInfo) -> Out {
    let mut kv = vec![
        ("name", e.name.clone()),
        ("writable", e.writable.to_string()),
        ("uri", e.uri()),
    ];
    if let Some(b) = &e.dirty_bitmap {
        kv.push(("dirty-bitmap", b.clone()));
    }
    Out {
        text: render_kv(&kv),
        json: json!({
            "name": e.name, "socket": e.socket, "writable": e.writable, "uri": e.uri(),
            "dirtyBitmap": e.dirty_bitmap,
        }),
    }
}

pub fn reverted(v: &VolumeInfo, snap: &SnapshotId, ms: f64) -> Out {
    Out {
        text: render_kv(&[
            ("volume", v.id.to_string()),
            ("reverted to", snap.to_string()),
            ("size", format_size(v.size)),
            ("layers", v.layers.to_string()),
            ("snapshots kept", v.snapshots.to_string()),
            ("took", format!("{ms:.1} ms")),
        ]),
        json: json!({
            "volume": v.id, "snapshot": snap, "size": v.size,
            "layers": v.layers, "snapshots": v.snapshots, "ms": ms,
        }),
    }
}

pub fn message(msg: String, json: Value) -> Out {
    Out {
        text: format!("{msg}\n"),
        json,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use livedisk_engine::record::{Layer, SnapshotRecord};
    use livedisk_engine::{SnapshotId, VolumeId};

    fn rec() -> VolumeRecord {
        let mut r = VolumeRecord::new(VolumeId::generate(), 1 << 30);
        let s = SnapshotId::generate();
        r.layers = vec![
            Layer {
                seq: 0,
                sealed_by: Some(s.clone()),
            },
            Layer {
                seq: 1,
                sealed_by: None,
            },
        ];
        r.snapshots = vec![SnapshotRecord {
            id: s,
            created: chrono::Utc::now(),
            size: 1 << 30,
            state: SnapshotState::Ready,
            changed: Some(vec![Extent {
                offset: 0,
                length: 65536,
            }]),
            inherited: vec![],
            for_clone: None,
        }];
        r
    }

    #[test]
    fn volumes_table_and_json() {
        let r = rec();
        let o = volumes(std::slice::from_ref(&r));
        let lines: Vec<&str> = o.text.lines().collect();
        assert!(lines[0].starts_with("VOLUME"));
        assert!(lines[1].contains("1GiB") && lines[1].ends_with("live"));
        assert_eq!(o.json[0]["layers"], 2);
        assert_eq!(o.json[0]["snapshots"], 1);
    }

    #[test]
    fn chain_marks_active_and_missing() {
        let r = rec();
        let files = vec![
            LayerFile {
                path: "/p/layer-0.qcow2".into(),
                disk_usage: Some(2 << 20),
            },
            LayerFile {
                path: "/p/layer-1.qcow2".into(),
                disk_usage: None,
            },
        ];
        let o = chain(&r, &files);
        assert!(o.text.contains("2MiB"));
        let last = o.text.lines().last().unwrap_or_default();
        assert!(last.contains("missing") && last.contains("active"));
        assert_eq!(o.json["layers"][1]["diskUsage"], Value::Null);
    }

    #[test]
    fn snapshots_show_changed_bytes() {
        let o = snapshots(&rec());
        assert!(o.text.contains("64KiB in 1 extents"));
        assert_eq!(o.json[0]["changedBytes"], 65536);
    }

    #[test]
    fn snapshots_list_tombstones_as_deleted_after_the_live_ones() {
        let mut r = rec();
        let (gone, live) = (SnapshotId::generate(), r.snapshots[0].id.clone());
        r.tombstones.push(livedisk_engine::record::Tombstone {
            id: gone.clone(),
            created: chrono::Utc::now(),
            before: live.clone(),
            changed: vec![Extent {
                offset: 0,
                length: 131072,
            }],
        });
        let o = snapshots(&r);
        let last = o.text.lines().last().unwrap_or_default();
        assert!(last.starts_with(gone.as_str()) && last.contains("deleted"));
        assert!(last.contains(&format!("128KiB in 1 extents up to {live}")));
        assert_eq!(o.json[1]["state"], "deleted");
        assert_eq!(o.json[1]["until"], live.as_str());
        assert_eq!(o.json[0]["state"], "ready");
    }

    #[test]
    fn extent_page_tells_next_start() {
        let p = ExtentPage {
            volume_size: 1 << 20,
            extents: vec![Extent {
                offset: 4096,
                length: 4096,
            }],
        };
        let o = extent_page(&p);
        assert!(o.text.contains("next page: --start 8192"));
        assert_eq!(o.json["nextStart"], 8192);
    }

    #[test]
    fn percent_handles_zero_total() {
        assert_eq!(percent(1, 0), "-");
        assert_eq!(percent(1, 4), "25.0%");
    }

    #[test]
    fn exports_flag_unserved() {
        let mut r = rec();
        r.exports.push(livedisk_engine::record::ExportRecord {
            target: ExportTarget::Volume,
            changed_since: None,
        });
        let (s, b) = (
            livedisk_engine::SnapshotId::generate(),
            livedisk_engine::SnapshotId::generate(),
        );
        r.exports.push(livedisk_engine::record::ExportRecord {
            target: ExportTarget::Snapshot { id: s },
            changed_since: Some(b.clone()),
        });
        let o = exports(
            std::slice::from_ref(&r),
            &HashSet::new(),
            Path::new("/run/x/nbd.sock"),
        );
        assert!(o.text.contains(" NO "));
        assert_eq!(o.json[0]["served"], false);
        assert_eq!(o.json[0]["dirtyBitmap"], serde_json::Value::Null);
        assert_eq!(
            o.json[1]["dirtyBitmap"],
            format!("qemu:dirty-bitmap:changed-since-{b}")
        );
        assert!(
            o.json[0]["uri"]
                .as_str()
                .is_some_and(|u| u.ends_with("socket=/run/x/nbd.sock"))
        );
    }
}
