//! Reads a list of byte ranges from the front into a sparse file, a few at a time: each worker
//! has its own kept-alive connection, takes the next range, retries it through a restart of
//! the front, and writes it at its offset.

use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::task::JoinSet;

use super::error::BackupError;
use super::files;
use super::http::{Client, retrying};
use super::plan::Extent;
use super::progress::Progress;

/// Where the ranges go: a new backup file that reads zeros wherever nothing is written.
pub struct Output {
    pub file: Arc<File>,
    pub path: Arc<PathBuf>,
}

/// How the ranges are read.
pub struct Reading {
    pub parallel: usize,
    /// How long one range may keep failing transiently before the backup gives up.
    pub budget: Duration,
}

/// Reads every piece of an image of `size` bytes into `output` at its offset; all-zero parts
/// are left as holes. Stops at the first error that retrying could not cure, abandoning the
/// other pieces.
pub async fn read_into(
    client: &Arc<Client>,
    pieces: Vec<Extent>,
    size: u64,
    output: &Output,
    reading: &Reading,
    progress: &Arc<Progress>,
) -> Result<(), BackupError> {
    let pieces = Arc::new(pieces);
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = JoinSet::new();
    for _ in 0..reading.parallel.min(pieces.len()) {
        workers.spawn(worker(
            client.clone(),
            pieces.clone(),
            next.clone(),
            size,
            Output {
                file: output.file.clone(),
                path: output.path.clone(),
            },
            reading.budget,
            progress.clone(),
        ));
    }
    // Dropping the set on an early return aborts the other workers.
    while let Some(joined) = workers.join_next().await {
        joined.map_err(|e| {
            BackupError::io("writing", output.path.as_path(), std::io::Error::other(e))
        })??;
    }
    Ok(())
}

async fn worker(
    client: Arc<Client>,
    pieces: Arc<Vec<Extent>>,
    next: Arc<AtomicUsize>,
    size: u64,
    output: Output,
    budget: Duration,
    progress: Arc<Progress>,
) -> Result<(), BackupError> {
    let mut connection = client.connection();
    loop {
        let Some(&piece) = pieces.get(next.fetch_add(1, Ordering::Relaxed)) else {
            return Ok(());
        };
        let what = format!("reading bytes {}-{}", piece.offset, piece.end() - 1);
        let data = retrying(&mut connection, what, budget, |c| {
            Box::pin(c.read(piece, size))
        })
        .await?;
        let file = output.file.clone();
        let path = output.path.clone();
        let written = tokio::task::spawn_blocking(move || {
            files::write_at(&file, &path, piece.offset, &data, true)
        })
        .await
        .map_err(|e| {
            BackupError::io("writing", output.path.as_path(), std::io::Error::other(e))
        })??;
        progress.add(piece.length, written);
    }
}
