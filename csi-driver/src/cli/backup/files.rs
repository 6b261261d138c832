//! The files the client writes and reads: backup files (sparse, written at offsets), their
//! manifests (written atomically), and the restore target. Blocking calls; the async callers
//! run them on the blocking pool.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::error::BackupError;
use super::manifest::{self, Manifest};
use super::plan;

/// Zero runs shorter than this are written anyway: holes smaller than this are not worth the
/// extra system calls.
pub const HOLE_GRANULE: usize = 64 * 1024;

/// Creates the backup file `path` of `size` bytes, all of it a hole. An existing file is
/// refused unless `force`; then it is truncated first (old data must not show through the
/// holes) and its old manifest removed first, so that a backup interrupted here is not taken
/// for the old one.
pub fn create_output(path: &Path, size: u64, force: bool) -> Result<File, BackupError> {
    let mut options = OpenOptions::new();
    options.write(true);
    if force {
        let old = manifest::path_for(path);
        match std::fs::remove_file(&old) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(BackupError::io("removing the old manifest", old, e)),
        }
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    let file = options.open(path).map_err(|e| match e.kind() {
        ErrorKind::AlreadyExists => BackupError::OutputExists {
            path: path.to_path_buf(),
        },
        _ => BackupError::io("creating", path, e),
    })?;
    file.set_len(size)
        .map_err(|e| BackupError::io("sizing", path, e))?;
    Ok(file)
}

/// Writes `buf` at `offset`: all of it, or with `sparse` only its non-zero runs (the file must
/// read zeros elsewhere). Returns the bytes written.
pub fn write_at(
    file: &File,
    path: &Path,
    offset: u64,
    buf: &[u8],
    sparse: bool,
) -> Result<u64, BackupError> {
    let runs = if sparse {
        plan::data_runs(buf, HOLE_GRANULE)
    } else {
        vec![(0, buf.len())]
    };
    let mut written = 0u64;
    for (start, len) in runs {
        file.write_all_at(&buf[start..start + len], offset + start as u64)
            .map_err(|e| BackupError::io("writing", path, e))?;
        written += len as u64;
    }
    Ok(written)
}

/// Reads exactly `len` bytes at `offset`.
pub fn read_at(file: &File, path: &Path, offset: u64, len: usize) -> Result<Vec<u8>, BackupError> {
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset)
        .map_err(|e| BackupError::io("reading", path, e))?;
    Ok(buf)
}

/// Flushes a file's data to stable storage.
pub fn sync(file: &File, path: &Path) -> Result<(), BackupError> {
    file.sync_all()
        .map_err(|e| BackupError::io("flushing", path, e))
}

/// Writes the manifest of `backup` the crash-safe way: a temporary file, flushed, renamed over,
/// and the directory flushed; a reader sees the whole manifest or none.
pub fn write_manifest(backup: &Path, manifest: &Manifest) -> Result<(), BackupError> {
    let path = manifest::path_for(backup);
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp_name);
    let json = serde_json::to_vec_pretty(manifest)
        .map_err(|e| BackupError::io("formatting", &path, std::io::Error::other(e)))?;
    let mut file = File::create(&tmp).map_err(|e| BackupError::io("creating", &tmp, e))?;
    file.write_all(&json)
        .and_then(|()| file.write_all(b"\n"))
        .map_err(|e| BackupError::io("writing", &tmp, e))?;
    sync(&file, &tmp)?;
    std::fs::rename(&tmp, &path).map_err(|e| BackupError::io("renaming into place", &path, e))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| BackupError::io("flushing the directory", dir, e))
}

/// The manifest of `backup`; a missing one means the backup never finished.
pub fn read_manifest(backup: &Path) -> Result<Manifest, BackupError> {
    let path = manifest::path_for(backup);
    let text = std::fs::read(&path).map_err(|e| match e.kind() {
        ErrorKind::NotFound => BackupError::Backup {
            path: backup.to_path_buf(),
            why: format!(
                "no manifest {}: not a finished backup (the client writes it last)",
                path.display()
            ),
        },
        _ => BackupError::io("reading", &path, e),
    })?;
    serde_json::from_slice(&text).map_err(|e| BackupError::Backup {
        path: backup.to_path_buf(),
        why: format!("manifest {}: {e}", path.display()),
    })
}

/// Opens a backup file for reading and checks it holds the `size` bytes its manifest promises.
pub fn open_backup(path: &Path, size: u64) -> Result<File, BackupError> {
    let file = File::open(path).map_err(|e| BackupError::io("opening", path, e))?;
    let len = file
        .metadata()
        .map_err(|e| BackupError::io("inspecting", path, e))?
        .len();
    if len < size {
        return Err(BackupError::Backup {
            path: path.to_path_buf(),
            why: format!("the file holds {len} bytes, its manifest says {size}"),
        });
    }
    Ok(file)
}

/// Opens the restore target (a block device or a file, which must exist) for writing, and its
/// size: the end a seek reaches, which for a block device is the device's size.
pub fn open_target(path: &Path) -> Result<(File, u64), BackupError> {
    let mut file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| BackupError::io("opening the target", path, e))?;
    let size = file
        .seek(SeekFrom::End(0))
        .map_err(|e| BackupError::io("finding the size of the target", path, e))?;
    Ok((file, size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::backup::manifest::Full;
    use std::os::unix::fs::MetadataExt;

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("livedisk-backup-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn outputs_are_not_overwritten_without_force_and_start_as_holes() {
        let dir = temp_dir("create");
        let path = dir.join("img");
        let file = create_output(&path, 8 << 20, false).unwrap();
        assert_eq!(file.metadata().unwrap().len(), 8 << 20);
        assert_eq!(file.metadata().unwrap().blocks(), 0);
        assert!(matches!(
            create_output(&path, 8 << 20, false),
            Err(BackupError::OutputExists { .. })
        ));
        // A sparse write of a buffer with one non-zero byte allocates one granule at most.
        let mut buf = vec![0u8; 1 << 20];
        buf[HOLE_GRANULE * 3 + 1] = 7;
        assert_eq!(
            write_at(&file, &path, 0, &buf, true).unwrap(),
            HOLE_GRANULE as u64
        );
        let reader = File::open(&path).unwrap();
        assert_eq!(
            read_at(&reader, &path, HOLE_GRANULE as u64 * 3, 2).unwrap(),
            vec![0, 7]
        );
        // With force the old manifest goes first and the data is dropped.
        let manifest = Manifest::Full(Full {
            url: "u".into(),
            size: 1,
            bytes_read: 1,
            snapshot: None,
            created_at: "t".into(),
        });
        write_manifest(&path, &manifest).unwrap();
        assert_eq!(read_manifest(&path).unwrap(), manifest);
        let again = create_output(&path, 4096, true).unwrap();
        assert_eq!(again.metadata().unwrap().blocks(), 0);
        assert!(matches!(
            read_manifest(&path),
            Err(BackupError::Backup { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn short_backups_and_missing_targets_are_refused() {
        let dir = temp_dir("open");
        let path = dir.join("img");
        std::fs::write(&path, [1u8; 10]).unwrap();
        assert!(open_backup(&path, 10).is_ok());
        assert!(matches!(
            open_backup(&path, 11),
            Err(BackupError::Backup { .. })
        ));
        assert_eq!(open_target(&path).unwrap().1, 10);
        assert!(open_target(&dir.join("none")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
