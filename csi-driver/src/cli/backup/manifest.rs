//! The manifest beside each backup file (`FILE.backup.json`): what the file holds, and what
//! restore needs to check a chain. It is written last, after the data is on disk, so a file
//! without one is an unfinished backup.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::plan::Extent;

/// A backup of the whole image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Full {
    pub url: String,
    pub size: u64,
    pub bytes_read: u64,
    /// The snapshot the export served, when its name says it (`snap-…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    pub created_at: String,
}

/// A backup of the extents changed between `base` and `snapshot`, at their offsets in a sparse
/// file of `size` bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Incremental {
    pub url: String,
    pub base: String,
    pub snapshot: String,
    pub size: u64,
    pub extents: Vec<Extent>,
    pub bytes_read: u64,
    pub created_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Manifest {
    Full(Full),
    Incremental(Incremental),
}

/// Pure: `FILE.backup.json` beside `FILE`.
pub fn path_for(backup: &Path) -> PathBuf {
    let mut name: OsString = backup.as_os_str().to_owned();
    name.push(".backup.json");
    PathBuf::from(name)
}

/// Now, as manifests spell times (RFC 3339, UTC, seconds).
pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_sit_beside_their_file() {
        assert_eq!(
            path_for(Path::new("/b/disk.img")),
            PathBuf::from("/b/disk.img.backup.json")
        );
    }

    #[test]
    fn manifests_are_tagged_by_kind_in_camel_case() {
        let full = Manifest::Full(Full {
            url: "https://h/exports/x".into(),
            size: 8,
            bytes_read: 8,
            snapshot: None,
            created_at: "2026-01-01T00:00:00Z".into(),
        });
        let json = serde_json::to_value(&full).unwrap();
        assert_eq!(json["kind"], "full");
        assert_eq!(json["bytesRead"], 8);
        assert!(json.get("snapshot").is_none());
        let inc: Manifest = serde_json::from_str(
            r#"{"kind":"incremental","url":"u","base":"a","snapshot":"b","size":8,
                "extents":[{"offset":0,"length":4}],"bytesRead":4,"createdAt":"t"}"#,
        )
        .unwrap();
        assert!(matches!(inc, Manifest::Incremental(i) if i.extents == vec![Extent::new(0, 4)]));
    }
}
