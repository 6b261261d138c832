//! Remote attach: a volume another node holds, used on this node.
//!
//! This node's daemon opens the owner's export of the volume as an NBD client (QEMU's `nbd`
//! block driver) over TLS with an x509 client certificate, and serves that node to the local
//! consumer as the same writable export a local volume gets (named by the volume's ID on the
//! daemon's unix socket), so the attach path above it does not change. The client reconnects by
//! itself after a network blip or a restart of the owner's front (`reconnect-delay`): requests
//! wait for the connection instead of failing while it comes back.
//!
//! What is attached is recorded under `<pool>/remote/<volume>/` (the record and the TLS files
//! the daemon reads) before the daemon is asked, so a restarted daemon gets it back
//! (`restore_remotes`) and a detach after a crash knows what to remove.

use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::engine::{Engine, Result};
use super::record::{ExportRecord, ExportTarget, atomic_write, atomic_write_private};
use super::types::ExportInfo;
use crate::error::EngineError;
use livedisk_common::VolumeId;

/// How long a request waits for a lost connection to the owner to come back before it fails.
/// Long on purpose: a consumer (a VM's guest, a filesystem) copes with a slow request far
/// better than with an I/O error, and a restarted owner plugin or a network blip is back in
/// seconds.
pub const RECONNECT_DELAY: Duration = Duration::from_secs(300);

const RECORD_FILE: &str = "attachment.json";
const TLS_DIR: &str = "tls";

/// Where a remote volume is served and how to prove who this node is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteSource {
    /// The owner's export front (a host its certificate names) and NBD port.
    pub host: String,
    pub port: u16,
    /// The export's name on the wire (the volume's ID).
    pub export: String,
    /// PEM: the driver's export CA, this node's certificate and its key.
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// What is recorded of a remote attachment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteRecord {
    pub volume: VolumeId,
    pub host: String,
    pub port: u16,
    pub export: String,
}

/// The raw filter node a remote attachment's export sits on, over its NBD client node: the
/// export's way to the volume can then be changed under a connected consumer
/// (`blockdev-reopen` of the filter's `file`), which is how a volume that migrates to this node
/// becomes local to its consumer here (`localize_remote_attachment`).
pub(super) fn filter_node(volume: &VolumeId) -> String {
    format!("rf{}", &volume.hex()[..24])
}

/// The daemon's names for a remote volume's objects: TLS credentials, NBD client node, export.
pub(super) fn names(volume: &VolumeId) -> (String, String, String) {
    let hex = &volume.hex()[..24];
    (
        format!("tlsr{hex}"),
        format!("remote-{hex}"),
        format!("v{hex}"),
    )
}

impl Engine {
    fn remote_root(&self) -> PathBuf {
        self.store.pool().join("remote")
    }

    fn remote_dir(&self, volume: &VolumeId) -> PathBuf {
        // A validated ID: it cannot name a path outside the pool.
        self.remote_root().join(volume.as_str())
    }

    /// The remote attachment of `volume` on this node, if one is recorded.
    pub fn remote_record(&self, volume: &VolumeId) -> Result<Option<RemoteRecord>> {
        let path = self.remote_dir(volume).join(RECORD_FILE);
        match fs::read(&path) {
            Ok(body) => serde_json::from_slice(&body).map(Some).map_err(|e| {
                EngineError::Io(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                ))
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Every volume attached remotely on this node.
    pub fn remote_volumes(&self) -> Result<Vec<VolumeId>> {
        let entries = match fs::read_dir(self.remote_root()) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(e.into()),
        };
        let mut out = vec![];
        for entry in entries {
            let entry = entry?;
            if let Some(id) = entry
                .file_name()
                .to_str()
                .and_then(|n| VolumeId::parse(n).ok())
                && entry.path().join(RECORD_FILE).exists()
            {
                out.push(id);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Attaches another node's volume through this node's daemon and returns the local export
    /// the consumer's front end opens. Idempotent; a recorded attachment to another source is
    /// replaced only once it is detached. Refused for a volume this node holds.
    pub async fn attach_remote(
        &self,
        volume: &VolumeId,
        source: &RemoteSource,
    ) -> Result<ExportInfo> {
        let _g = self.locks.try_lock(volume)?;
        if self.store.load(volume)?.is_some() {
            return Err(EngineError::FailedPrecondition(format!(
                "volume {volume} is held by this node: it is attached locally, not remotely"
            )));
        }
        let record = RemoteRecord {
            volume: volume.clone(),
            host: source.host.clone(),
            port: source.port,
            export: source.export.clone(),
        };
        match self.remote_record(volume)? {
            Some(existing) if existing != record => {
                return Err(EngineError::FailedPrecondition(format!(
                    "volume {volume} is attached from {}:{} already; detach it first",
                    existing.host, existing.port
                )));
            }
            _ => {}
        }
        self.write_remote(&record, source)?;
        self.open_remote(&record).await?;
        Ok(self.remote_export(volume))
    }

    /// The local export a remotely attached volume is served under (what its front end opens).
    pub fn remote_export(&self, volume: &VolumeId) -> ExportInfo {
        ExportInfo {
            name: volume.to_string(),
            socket: self.daemon().runtime.nbd_socket(),
            writable: true,
            dirty_bitmap: None,
        }
    }

    /// Writes the TLS files (key 0600 in a 0700 directory) and then the record.
    fn write_remote(&self, record: &RemoteRecord, source: &RemoteSource) -> Result<()> {
        self.write_remote_tls(&record.volume, source)?;
        self.write_remote_record(record)
    }

    /// The TLS files the daemon's NBD client of `volume` reads.
    pub(super) fn write_remote_tls(&self, volume: &VolumeId, source: &RemoteSource) -> Result<()> {
        write_client_tls(
            &self.remote_dir(volume).join(TLS_DIR),
            &source.ca_pem,
            &source.cert_pem,
            &source.key_pem,
        )
    }

    /// The record that makes `volume` a remote attachment of this node (restored after a
    /// daemon restart, ended by `detach_remote`).
    pub(super) fn write_remote_record(&self, record: &RemoteRecord) -> Result<()> {
        let body = serde_json::to_vec_pretty(record).map_err(io::Error::other)?;
        atomic_write(&self.remote_dir(&record.volume).join(RECORD_FILE), &body)?;
        Ok(())
    }

    /// Whether anything of `write_remote_tls` is left for `volume`.
    pub(super) fn has_remote_files(&self, volume: &VolumeId) -> bool {
        self.remote_dir(volume).exists()
    }

    /// Removes what `write_remote_tls` wrote, for a volume with no remote record.
    pub(super) fn remove_remote_files(&self, volume: &VolumeId) -> Result<()> {
        match fs::remove_dir_all(self.remote_dir(volume)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Makes the daemon serve a recorded attachment: credentials, NBD client, its filter node,
    /// export. Each step finds what a previous (interrupted) attempt left.
    async fn open_remote(&self, record: &RemoteRecord) -> Result<()> {
        let (_, node, export) = names(&record.volume);
        let filter = filter_node(&record.volume);
        self.open_remote_node(record).await?;
        let filtered = self
            .qmp
            .execute(
                "blockdev-add",
                json!({ "driver": "raw", "node-name": filter, "file": node }),
            )
            .await;
        match filtered {
            Ok(_) => {}
            Err(e) if e.desc_contains("Duplicate nodes") || e.desc_contains("already") => {}
            Err(e) => return Err(e.into()),
        }
        let exported = self
            .qmp
            .execute(
                "block-export-add",
                json!({
                    "type": "nbd", "id": export, "node-name": filter,
                    "name": record.volume.to_string(), "writable": true,
                }),
            )
            .await;
        match exported {
            Ok(_) => Ok(()),
            Err(e) if e.desc_contains("already") => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The NBD client node of `record` (and its credentials), without an export: what a
    /// migration mirrors into, and what a remote attachment exports.
    pub(super) async fn open_remote_node(&self, record: &RemoteRecord) -> Result<String> {
        self.open_remote_node_with(record, false).await
    }

    /// [`Engine::open_remote_node`]; `read_only` for a read-only export (QEMU's NBD client
    /// refuses to open one read-write): a remote clone's source snapshot.
    pub(super) async fn open_remote_node_with(
        &self,
        record: &RemoteRecord,
        read_only: bool,
    ) -> Result<String> {
        let (creds, node, _) = names(&record.volume);
        let tls = self.remote_dir(&record.volume).join(TLS_DIR);
        let added = self
            .qmp
            .execute(
                "object-add",
                json!({
                    "qom-type": "tls-creds-x509", "id": creds, "endpoint": "client",
                    "dir": tls.to_string_lossy(), "verify-peer": true,
                }),
            )
            .await;
        match added {
            Ok(_) => {}
            Err(e) if e.desc_contains("duplicate") || e.desc_contains("already") => {}
            Err(e) => return Err(e.into()),
        }
        let opened = self
            .qmp
            .execute(
                "blockdev-add",
                json!({
                    "driver": "nbd", "node-name": node,
                    "server": { "type": "inet", "host": record.host, "port": record.port.to_string() },
                    "export": record.export, "tls-creds": creds,
                    "reconnect-delay": RECONNECT_DELAY.as_secs(),
                    "read-only": read_only,
                }),
            )
            .await;
        match opened {
            Ok(_) => {}
            Err(e) if e.desc_contains("Duplicate nodes") || e.desc_contains("already") => {}
            Err(e) => {
                return Err(EngineError::Unreachable(format!(
                    "connecting to {}:{} for volume {}: {e}",
                    record.host, record.port, record.volume
                )));
            }
        }
        Ok(node)
    }

    /// Removes the NBD client node of `volume` and its credentials (not the export). Idempotent.
    pub(super) async fn close_remote_node(&self, volume: &VolumeId) -> Result<()> {
        let (creds, node, _) = names(volume);
        match self
            .qmp
            .execute("blockdev-del", json!({ "node-name": node }))
            .await
        {
            Ok(_) => {}
            Err(e) if e.desc_contains("Failed to find node") || e.desc_contains("not found") => {}
            Err(e) => return Err(e.into()),
        }
        match self.qmp.execute("object-del", json!({ "id": creds })).await {
            Ok(_) => Ok(()),
            Err(e) if e.desc_contains("not found") => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Ends a remote attachment: the local export (refused while a consumer is connected), the
    /// NBD client, the credentials, then the record. Idempotent.
    pub async fn detach_remote(&self, volume: &VolumeId) -> Result<()> {
        let _g = self.locks.try_lock(volume)?;
        if self.remote_record(volume)?.is_none() && !self.remote_dir(volume).exists() {
            return Ok(());
        }
        let (_, _, export) = names(volume);
        self.delete_export_and_wait(&export).await?;
        self.remove_remote_filter(volume).await?;
        self.close_remote_node(volume).await?;
        self.remove_remote_files(volume)
    }

    /// Removes the filter node of `volume`'s remote attachment (once no export sits on it).
    /// Idempotent.
    pub(super) async fn remove_remote_filter(&self, volume: &VolumeId) -> Result<()> {
        match self
            .qmp
            .execute("blockdev-del", json!({ "node-name": filter_node(volume) }))
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.desc_contains("Failed to find node") || e.desc_contains("not found") => {
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Makes a volume that has come to this node (a migration's import, handed over) local to
    /// the consumer that used it here through a remote attachment: the attachment's filter
    /// node is switched, under the connected consumer, from the NBD client to the volume's
    /// active layer (`blockdev-reopen`); the export becomes the volume's consumer export in its
    /// record, and the NBD client, its credentials and the attachment's record go. Returns
    /// whether the volume was attached remotely (false: nothing to do).
    ///
    /// Crash-safe in this order: until the record names the consumer export, a restarted daemon
    /// serves the attachment as before (through the old owner) and this is called again; after
    /// it, the export is re-created on the active layer whichever way the filter pointed.
    pub async fn localize_remote_attachment(&self, volume: &VolumeId) -> Result<bool> {
        let _g = self.locks.try_lock(volume)?;
        if self.remote_record(volume)?.is_none() && !self.has_remote_files(volume) {
            return Ok(false);
        }
        let mut rec = self.load(volume)?;
        if self.is_incoming(volume)? {
            return Err(EngineError::FailedPrecondition(format!(
                "volume {volume} is still being migrated to this node"
            )));
        }
        let active = rec
            .active()
            .ok_or_else(|| EngineError::NotFound(format!("volume {volume}")))?;
        let active = rec.node_name(active.seq);
        let (_, _, export) = names(volume);
        let filter = filter_node(volume);
        match self.export_nodes().await?.get(&export) {
            Some(node) if *node == filter => {
                self.qmp
                    .execute(
                        "blockdev-reopen",
                        json!({ "options": [{ "driver": "raw", "node-name": filter, "file": active }] }),
                    )
                    .await?;
            }
            Some(node) if *node == active => {}
            Some(node) => {
                // An attachment made before exports sat on a filter: its consumer keeps the
                // way through the old owner until it is staged again.
                return Err(EngineError::FailedPrecondition(format!(
                    "the remote attachment of volume {volume} is exported from node {} (no \
                     filter node to switch); stage the volume again to use it locally",
                    node
                )));
            }
            None => {}
        }
        if !rec.exports.iter().any(|e| e.target == ExportTarget::Volume) {
            rec.exports.push(ExportRecord {
                target: ExportTarget::Volume,
                changed_since: None,
            });
            self.store.save(&rec)?;
        }
        self.close_remote_node(volume).await?;
        self.remove_remote_files(volume)?;
        tracing::info!(%volume, "remote attachment switched to the local volume under its consumer");
        Ok(true)
    }

    /// After a daemon (re)start: every recorded remote attachment served again. One that cannot
    /// be opened (its owner unreachable) is reported and left recorded: the next stage or
    /// detach of it acts on the record.
    pub(super) async fn restore_remotes(&self) -> Result<()> {
        for volume in self.remote_volumes()? {
            let Some(record) = self.remote_record(&volume)? else {
                continue;
            };
            match self.open_remote(&record).await {
                Ok(()) => {}
                // Without the daemon nothing can be restored: the caller starts over.
                Err(e @ (EngineError::Qmp(_) | EngineError::Daemon(_)))
                    if e.code() == livedisk_common::ErrorCode::Unavailable =>
                {
                    return Err(e);
                }
                Err(e) => self.note_recovery_error(&volume, &e),
            }
        }
        Ok(())
    }
}

/// A directory QEMU's `tls-creds-x509` (endpoint client) reads: the CA, the certificate and the
/// key, each 0600 in a 0700 directory.
pub(super) fn write_client_tls(
    dir: &std::path::Path,
    ca: &str,
    cert: &str,
    key: &str,
) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    atomic_write_private(&dir.join("ca-cert.pem"), ca.as_bytes())?;
    atomic_write_private(&dir.join("client-cert.pem"), cert.as_bytes())?;
    atomic_write_private(&dir.join("client-key.pem"), key.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn daemon_names_are_distinct_per_volume_and_from_local_exports() {
        let a = VolumeId::generate();
        let b = VolumeId::generate();
        let (ca, na, ea) = names(&a);
        assert_ne!(names(&a), names(&b));
        assert!(na.starts_with("remote-") && ca.starts_with("tlsr"));
        // The same export id a local consumer export of the volume would have: a node holds a
        // volume or attaches it remotely, never both.
        assert_eq!(ea, format!("v{}", &a.hex()[..24]));
    }
}
