//! Who may read which export: the front's admission table, filled by the node's LivediskExport
//! reconciler and read by both listeners on every connection, option and request.
//!
//! A grant admits one client certificate (by the SHA-256 of its DER) and one bearer token (by its
//! SHA-256) to one export name, until it expires or is withdrawn. Withdrawing a grant (the
//! DiskExport was deleted, or it expired) also ends every connection it admitted: each holds a
//! receiver of the grant's `revoked` channel.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use livedisk_api::ExportProtocol;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

/// Hex SHA-256 of `bytes`: how certificates and tokens are named in grants.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Who is asking: the credentials a connection or request presented.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Credential {
    /// Hex SHA-256 of the client certificate's DER.
    Certificate(String),
    /// Hex SHA-256 of a bearer token.
    Token(String),
}

/// One admission: a credential pair to one export.
#[derive(Debug)]
pub struct Grant {
    /// The LivediskExport this grant serves (its bytes are counted there).
    pub work: String,
    /// The export's name on the wire (the snapshot ID).
    pub export: String,
    /// The listener that admits it.
    pub protocol: ExportProtocol,
    /// The engine's NBD export name and socket behind it.
    pub backend_name: String,
    pub backend_socket: PathBuf,
    pub certificate_sha256: String,
    pub token_sha256: String,
    /// Base of the changed-extent map, when the export has one.
    pub base: Option<String>,
    pub expires: Option<SystemTime>,
    /// Bytes sent to clients admitted by this grant.
    pub bytes_served: AtomicU64,
    revoked: watch::Sender<bool>,
    /// When the byte count was last reported (reports are spaced, not sent per change).
    reported: std::sync::Mutex<Option<std::time::Instant>>,
}

impl Grant {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        work: String,
        export: String,
        protocol: ExportProtocol,
        backend_name: String,
        backend_socket: PathBuf,
        certificate_sha256: String,
        token_sha256: String,
        base: Option<String>,
        expires: Option<SystemTime>,
        bytes_served: u64,
    ) -> Self {
        Self {
            work,
            export,
            protocol,
            backend_name,
            backend_socket,
            certificate_sha256,
            token_sha256,
            base,
            expires,
            bytes_served: AtomicU64::new(bytes_served),
            revoked: watch::channel(false).0,
            reported: std::sync::Mutex::new(None),
        }
    }

    /// Whether `credential` on `protocol`'s listener is this grant's and the grant still holds
    /// at `now`.
    pub fn admits(
        &self,
        protocol: ExportProtocol,
        credential: &Credential,
        now: SystemTime,
    ) -> bool {
        protocol == self.protocol && self.matches(credential, now)
    }

    fn matches(&self, credential: &Credential, now: SystemTime) -> bool {
        let matches = match credential {
            Credential::Certificate(c) => *c == self.certificate_sha256,
            Credential::Token(t) => *t == self.token_sha256,
        };
        matches && !self.expired(now)
    }

    pub fn expired(&self, now: SystemTime) -> bool {
        self.expires.is_some_and(|e| now >= e)
    }

    /// A receiver that changes to `true` when the grant is withdrawn.
    pub fn revocation(&self) -> watch::Receiver<bool> {
        self.revoked.subscribe()
    }

    pub fn count(&self, bytes: u64) {
        self.bytes_served.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Whether a report of the byte count is due (`every` since the last one), and if so,
    /// marks it made.
    pub fn report_due(&self, every: std::time::Duration) -> bool {
        let mut last = self.reported.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        match *last {
            Some(t) if now.duration_since(t) < every => false,
            _ => {
                *last = Some(now);
                true
            }
        }
    }

    pub fn served(&self) -> u64 {
        self.bytes_served.load(Ordering::Relaxed)
    }
}

/// The table: grants by LivediskExport name.
#[derive(Default)]
pub struct Grants {
    by_work: RwLock<HashMap<String, Arc<Grant>>>,
}

impl Grants {
    /// Adds or replaces the grant of `grant.work`; a replaced grant's connections end.
    pub fn put(&self, grant: Grant) -> Arc<Grant> {
        let grant = Arc::new(grant);
        let old = self
            .by_work
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(grant.work.clone(), grant.clone());
        if let Some(old) = old {
            old.revoked.send_replace(true);
        }
        grant
    }

    pub fn get(&self, work: &str) -> Option<Arc<Grant>> {
        self.read().get(work).cloned()
    }

    /// Withdraws the grant of `work` and ends its connections.
    pub fn remove(&self, work: &str) -> Option<Arc<Grant>> {
        let old = self
            .by_work
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(work);
        if let Some(old) = &old {
            old.revoked.send_replace(true);
        }
        old
    }

    /// The grant admitting `credential` on `protocol` to `export` at `now`, if any.
    pub fn admit(
        &self,
        protocol: ExportProtocol,
        export: &str,
        credential: &Credential,
        now: SystemTime,
    ) -> Option<Arc<Grant>> {
        self.read()
            .values()
            .find(|g| g.export == export && g.admits(protocol, credential, now))
            .cloned()
    }

    /// The export names `credential` may see at `now` (what `NBD_OPT_LIST` answers), sorted.
    pub fn visible(
        &self,
        protocol: ExportProtocol,
        credential: &Credential,
        now: SystemTime,
    ) -> Vec<String> {
        let mut names: Vec<String> = self
            .read()
            .values()
            .filter(|g| g.admits(protocol, credential, now))
            .map(|g| g.export.clone())
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Whether any live grant names this client certificate: the TLS handshake's check.
    pub fn knows_certificate(
        &self,
        protocol: ExportProtocol,
        sha256: &str,
        now: SystemTime,
    ) -> bool {
        let credential = Credential::Certificate(sha256.to_string());
        self.read()
            .values()
            .any(|g| g.admits(protocol, &credential, now))
    }

    /// Whether another grant than `work` serves the same export (the engine's export of a
    /// snapshot is shared by every DiskExport of it, so it stays until the last one goes).
    pub fn export_shared(&self, work: &str, export: &str) -> bool {
        self.read()
            .values()
            .any(|g| g.work != work && g.export == export)
    }

    /// Whether any grant serves `export` (a volume this node serves to another node keeps its
    /// engine export when the local consumer lets go).
    pub fn serves_export(&self, export: &str) -> bool {
        self.read().values().any(|g| g.export == export)
    }

    /// The names of every grant's work.
    pub fn works(&self) -> Vec<String> {
        self.read().keys().cloned().collect()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<Grant>>> {
        self.by_work.read().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const NBD: ExportProtocol = ExportProtocol::Nbd;

    fn grant(work: &str, export: &str, cert: &str, expires: Option<SystemTime>) -> Grant {
        Grant::new(
            work.into(),
            export.into(),
            NBD,
            export.into(),
            "/run/nbd.sock".into(),
            sha256_hex(cert.as_bytes()),
            sha256_hex(format!("token-{cert}").as_bytes()),
            None,
            expires,
            0,
        )
    }

    fn cert(c: &str) -> Credential {
        Credential::Certificate(sha256_hex(c.as_bytes()))
    }

    #[test]
    fn a_credential_sees_and_opens_only_its_own_export() {
        let grants = Grants::default();
        let now = SystemTime::now();
        grants.put(grant("w1", "snap-1", "a", None));
        grants.put(grant("w2", "snap-2", "b", None));
        assert_eq!(
            grants.visible(NBD, &cert("a"), now),
            vec!["snap-1".to_string()]
        );
        assert!(grants.admit(NBD, "snap-1", &cert("a"), now).is_some());
        assert!(grants.admit(NBD, "snap-2", &cert("a"), now).is_none());
        assert!(grants.admit(NBD, "snap-1", &cert("c"), now).is_none());
        let token = Credential::Token(sha256_hex(b"token-b"));
        assert!(grants.admit(NBD, "snap-2", &token, now).is_some());
        // A grant admits only on its own protocol's listener.
        assert!(
            grants
                .admit(ExportProtocol::Http, "snap-2", &token, now)
                .is_none()
        );
        assert!(grants.admit(NBD, "snap-1", &token, now).is_none());
    }

    #[test]
    fn an_expired_grant_admits_nothing() {
        let grants = Grants::default();
        let now = SystemTime::now();
        grants.put(grant("w1", "snap-1", "a", Some(now)));
        assert!(grants.admit(NBD, "snap-1", &cert("a"), now).is_none());
        assert!(grants.visible(NBD, &cert("a"), now).is_empty());
        assert!(!grants.knows_certificate(NBD, &sha256_hex(b"a"), now));
        let earlier = now - Duration::from_secs(1);
        assert!(grants.admit(NBD, "snap-1", &cert("a"), earlier).is_some());
    }

    #[test]
    fn withdrawing_a_grant_signals_its_connections() {
        let grants = Grants::default();
        let g = grants.put(grant("w1", "snap-1", "a", None));
        let rx = g.revocation();
        assert!(!*rx.borrow());
        grants.remove("w1");
        assert!(*rx.borrow());
        assert!(grants.get("w1").is_none());
    }

    #[test]
    fn an_export_is_shared_while_another_grant_names_it() {
        let grants = Grants::default();
        grants.put(grant("w1", "snap-1", "a", None));
        assert!(!grants.export_shared("w1", "snap-1"));
        grants.put(grant("w2", "snap-1", "b", None));
        assert!(grants.export_shared("w1", "snap-1"));
    }
}
