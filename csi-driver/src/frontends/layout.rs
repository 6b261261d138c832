//! Where the front-end server and its front ends live in the engine's socket directory, and
//! which NBD URIs it accepts. Pure: paths and parsing only, shared by the server and its client
//! (the node plugin computes the same FUSE file path to check its loop devices).

use std::path::{Component, Path, PathBuf};

use livedisk_engine::VolumeId;

/// The server's socket, beside the engine daemon's QMP and NBD sockets.
pub const SOCKET_NAME: &str = "frontends.sock";

/// The server's socket in an engine socket directory.
pub fn socket(engine_dir: &Path) -> PathBuf {
    engine_dir.join(SOCKET_NAME)
}

/// Per-volume attach state lives under this directory (the node plugin keeps its loop device
/// and publish targets there too).
pub fn attach_root(engine_dir: &Path) -> PathBuf {
    engine_dir.join("attach")
}

/// The files of one volume's front end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrontEndPaths {
    /// `<engine dir>/attach/<volume>`.
    pub dir: PathBuf,
    /// nbdfuse's mount point.
    pub fuse_dir: PathBuf,
    /// The file nbdfuse serves in it (what a loop device goes over).
    pub file: PathBuf,
    /// Written by nbdfuse (`-P`) once it serves: the readiness signal and the adoption handle.
    pub pid_file: PathBuf,
    pub log_file: PathBuf,
    /// The export URI the front end was started with, for idempotent starts after adoption.
    pub uri_file: PathBuf,
}

impl FrontEndPaths {
    pub fn new(engine_dir: &Path, volume: &VolumeId) -> Self {
        let dir = attach_root(engine_dir).join(volume.as_str());
        let fuse_dir = dir.join("fuse");
        Self {
            file: fuse_dir.join("disk"),
            pid_file: dir.join("nbdfuse.pid"),
            log_file: dir.join("nbdfuse.log"),
            uri_file: dir.join("nbdfuse.uri"),
            fuse_dir,
            dir,
        }
    }
}

/// Why an export URI is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UriError {
    #[error("NBD URI {0:?} is not of the form nbd+unix:///<export>?socket=<path>")]
    Malformed(String),
    #[error("NBD URI {uri:?} names export {export:?}, not the volume's own export {volume:?}")]
    OtherExport {
        uri: String,
        export: String,
        volume: String,
    },
    #[error("NBD URI {uri:?}: the socket must be directly in the engine socket directory {dir}")]
    ForeignSocket { uri: String, dir: String },
}

/// Accepts only the volume's own writable export on this host's engine daemon: the export is
/// named after the volume, and its socket sits directly in the engine socket directory. A
/// front end can therefore never serve another volume's data, or a socket elsewhere.
pub fn check_export_uri(uri: &str, volume: &VolumeId, engine_dir: &Path) -> Result<(), UriError> {
    let malformed = || UriError::Malformed(uri.to_string());
    let rest = uri.strip_prefix("nbd+unix:///").ok_or_else(malformed)?;
    let (export, query) = rest.split_once('?').ok_or_else(malformed)?;
    let socket = query.strip_prefix("socket=").ok_or_else(malformed)?;
    if socket.contains(['&', '#', '%']) || export.contains(['/', '#', '%']) {
        return Err(malformed());
    }
    if export != volume.as_str() {
        return Err(UriError::OtherExport {
            uri: uri.to_string(),
            export: export.to_string(),
            volume: volume.to_string(),
        });
    }
    let socket = Path::new(socket);
    let plain = socket.is_absolute()
        && socket
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    if !plain || socket.parent() != Some(engine_dir) {
        return Err(UriError::ForeignSocket {
            uri: uri.to_string(),
            dir: engine_dir.display().to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol() -> VolumeId {
        VolumeId::parse("vol-0a1b2c3d-0000-4000-8000-000000000001").unwrap()
    }

    #[test]
    fn paths_sit_under_the_engine_dir() {
        let p = FrontEndPaths::new(Path::new("/run/ld"), &vol());
        let dir = "/run/ld/attach/vol-0a1b2c3d-0000-4000-8000-000000000001";
        assert_eq!(p.dir, PathBuf::from(dir));
        assert_eq!(p.file, PathBuf::from(format!("{dir}/fuse/disk")));
        assert_eq!(p.pid_file, PathBuf::from(format!("{dir}/nbdfuse.pid")));
        assert_eq!(
            socket(Path::new("/run/ld")),
            PathBuf::from("/run/ld/frontends.sock")
        );
    }

    #[test]
    fn the_volumes_own_export_on_this_engine_is_accepted() {
        let uri = format!("nbd+unix:///{}?socket=/run/ld/nbd.sock", vol());
        assert_eq!(check_export_uri(&uri, &vol(), Path::new("/run/ld")), Ok(()));
        // A trailing slash on the directory names the same directory.
        assert_eq!(
            check_export_uri(&uri, &vol(), Path::new("/run/ld/")),
            Ok(())
        );
    }

    #[test]
    fn other_exports_and_sockets_are_refused() {
        let dir = Path::new("/run/ld");
        let other = "vol-0a1b2c3d-0000-4000-8000-000000000002";
        assert!(matches!(
            check_export_uri(
                &format!("nbd+unix:///{other}?socket=/run/ld/nbd.sock"),
                &vol(),
                dir
            ),
            Err(UriError::OtherExport { .. })
        ));
        for socket in [
            "/tmp/nbd.sock",
            "/run/ld/sub/nbd.sock",
            "/run/ld/../ld/nbd.sock",
            "relative/nbd.sock",
            "/run/ld",
        ] {
            let uri = format!("nbd+unix:///{}?socket={socket}", vol());
            assert!(
                matches!(
                    check_export_uri(&uri, &vol(), dir),
                    Err(UriError::ForeignSocket { .. })
                ),
                "{socket}"
            );
        }
        for uri in [
            "nbd://host:10809/x".to_string(),
            format!("nbd+unix:///{}", vol()),
            format!("nbd+unix:///{}?tls=on", vol()),
            format!("nbd+unix:///{}?socket=/run/ld/nbd.sock&tls=on", vol()),
            format!("nbd+unix:///{}?socket=/run/ld/%2e%2e/nbd.sock", vol()),
        ] {
            assert!(
                matches!(
                    check_export_uri(&uri, &vol(), dir),
                    Err(UriError::Malformed(_))
                ),
                "{uri}"
            );
        }
    }
}
