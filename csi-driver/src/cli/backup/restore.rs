//! `backup restore`: a full backup, then each incremental's extents in order, onto a block
//! device or file. Every manifest and the chain are checked before the first byte is written.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};

use super::args::RestoreArgs;
use super::chain;
use super::error::BackupError;
use super::files;
use super::manifest::{Full, Incremental, Manifest};
use super::plan::{self, Extent};
use super::progress::{Progress, Summary};

/// Chunks copied at once: reads and writes of different chunks overlap.
const IN_FLIGHT: usize = 4;

pub async fn run(args: &RestoreArgs) -> Result<Summary, BackupError> {
    let (full, incrementals) = manifests(args)?;
    chain::check(&args.full, &full, &incrementals).map_err(BackupError::Chain)?;
    let full_file = Arc::new(files::open_backup(&args.full, full.size)?);
    let mut sources = Vec::with_capacity(incrementals.len());
    for (path, inc) in &incrementals {
        sources.push((
            Arc::new(files::open_backup(path, inc.size)?),
            path.clone(),
            inc,
        ));
    }
    let (target, have) = files::open_target(&args.target)?;
    if have < full.size {
        return Err(BackupError::TargetTooSmall {
            path: args.target.clone(),
            have,
            need: full.size,
        });
    }
    let target = Target {
        file: Arc::new(target),
        path: Arc::new(args.target.clone()),
    };
    let changed: u64 = incrementals
        .iter()
        .map(|(_, i)| plan::total(&i.extents))
        .sum();
    let progress = Progress::new("restore", full.size + changed);
    let _reporter = progress.report();

    // The whole image, zeros included unless the target is known to read zeros already: a
    // used disk or file would otherwise keep its old bytes where the image has none.
    let pieces = plan::whole(full.size, args.chunk_size);
    let sparse = args.target_is_zeroed;
    copy(&full_file, &args.full, pieces, &target, sparse, &progress).await?;
    // Then each incremental's extents, in the order given: a later change wins over an earlier
    // one. Their zeros are written too: they are changes to zero.
    for (file, path, inc) in &sources {
        let pieces = plan::split(&plan::coalesce(&inc.extents), args.chunk_size);
        copy(file, path, pieces, &target, false, &progress).await?;
    }
    let (file, path) = (target.file.clone(), target.path.clone());
    tokio::task::spawn_blocking(move || files::sync(&file, &path))
        .await
        .map_err(|e| {
            BackupError::io("flushing", args.target.as_path(), std::io::Error::other(e))
        })??;
    Ok(progress.summary("backup restore"))
}

/// The manifests of the full backup and the incrementals, each of the kind its option says.
fn manifests(args: &RestoreArgs) -> Result<(Full, Vec<(PathBuf, Incremental)>), BackupError> {
    let wrong = |path: &Path, why: &str| BackupError::Backup {
        path: path.to_path_buf(),
        why: why.to_string(),
    };
    let full = match files::read_manifest(&args.full)? {
        Manifest::Full(full) => full,
        Manifest::Incremental(_) => {
            return Err(wrong(
                &args.full,
                "is an incremental backup; --full takes a full one",
            ));
        }
    };
    let mut incrementals = Vec::with_capacity(args.incremental.len());
    for path in &args.incremental {
        match files::read_manifest(path)? {
            Manifest::Incremental(inc) => incrementals.push((path.clone(), inc)),
            Manifest::Full(_) => {
                return Err(wrong(path, "is a full backup; give it with --full"));
            }
        }
    }
    Ok((full, incrementals))
}

struct Target {
    file: Arc<File>,
    path: Arc<PathBuf>,
}

/// Copies `pieces` from `source` to the same offsets of the target, a few at a time.
async fn copy(
    source: &Arc<File>,
    source_path: &Path,
    pieces: Vec<Extent>,
    target: &Target,
    sparse: bool,
    progress: &Arc<Progress>,
) -> Result<(), BackupError> {
    let source_path = Arc::new(source_path.to_path_buf());
    futures::stream::iter(pieces)
        .map(|piece| {
            let (source, source_path) = (source.clone(), source_path.clone());
            let (file, path) = (target.file.clone(), target.path.clone());
            let progress = progress.clone();
            async move {
                let length = usize::try_from(piece.length)
                    .map_err(|_| BackupError::Usage("--chunk-size is larger than memory".into()))?;
                let written = tokio::task::spawn_blocking(move || {
                    let buf = files::read_at(&source, &source_path, piece.offset, length)?;
                    files::write_at(&file, &path, piece.offset, &buf, sparse)
                })
                .await
                .map_err(|e| {
                    BackupError::io(
                        "copying to",
                        target.path.as_path(),
                        std::io::Error::other(e),
                    )
                })??;
                progress.add(piece.length, written);
                Ok::<(), BackupError>(())
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .try_collect::<()>()
        .await
}
