//! `livedisk-csi backup`: the reference client of the node's HTTPS export front. `full` reads a
//! whole snapshot export, `incremental` the extents changed since the export's base, both into
//! sparse files with a manifest beside them; `restore` writes a full backup and incrementals
//! onto a block device or file. See docs/backup.md.
//!
//! * [`args`]: the command line; [`url`]: the export URL.
//! * [`http`]: the HTTPS client; [`credentials`]: the CA and token it uses; [`retry`]: waiting out a restarting front.
//! * [`plan`]: pure decisions on ranges and buffers; [`chain`]: pure checks of a restore chain.
//! * [`fetch`]: parallel reads into a file; [`restore`]: the restore command.
//! * [`files`] and [`manifest`]: what is written to disk; [`progress`]: stderr and the summary.

pub mod args;
pub mod chain;
pub mod credentials;
pub mod error;
pub mod fetch;
pub mod files;
pub mod http;
pub mod manifest;
pub mod plan;
pub mod progress;
pub mod restore;
pub mod retry;
pub mod url;

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;

use args::{BackupArgs, BackupCmd, FetchArgs};
use credentials::Credentials;
use error::BackupError;
use fetch::{Output, Reading};
use http::{Client, retrying};
use manifest::Manifest;
use progress::{Progress, Summary};

/// Runs a backup command until it ends or SIGINT/SIGTERM stops it.
pub async fn run(args: BackupArgs) -> Result<Summary, BackupError> {
    // The handlers are installed before any work starts, so a signal can never kill the
    // process without the message that the output is incomplete.
    let mut signals = Signals::install();
    let (incomplete, hint, work): (_, _, BoxFuture<'_, _>) = match &args.cmd {
        BackupCmd::Full(a) => (&a.output, BACKUP_HINT, Box::pin(full(a))),
        BackupCmd::Incremental(a) => (&a.output, BACKUP_HINT, Box::pin(incremental(a))),
        BackupCmd::Restore(a) => (&a.target, RESTORE_HINT, Box::pin(restore::run(a))),
    };
    // Dropping the work on a signal aborts its requests; the blocking writes in flight end
    // with the process.
    tokio::select! {
        result = work => result,
        signal = signals.recv() => Err(BackupError::Interrupted {
            signal,
            incomplete: incomplete.display().to_string(),
            hint,
        }),
    }
}

const BACKUP_HINT: &str = "no manifest was written; run the backup again";
const RESTORE_HINT: &str = "it holds part of the restore; run the restore again";

async fn full(args: &FetchArgs) -> Result<Summary, BackupError> {
    let (client, budget) = connect(args)?;
    let mut connection = client.connection();
    let size = retrying(&mut connection, "HEAD", budget, |c| Box::pin(c.size())).await?;
    drop(connection);
    let output = create(args, size)?;
    let progress = Progress::new("backup full", size);
    let reporter = progress.report();
    let pieces = plan::whole(size, args.chunk_size);
    fetch::read_into(&client, pieces, size, &output, &reading(args), &progress).await?;
    finish(&output).await?;
    drop(reporter);
    let manifest = Manifest::Full(manifest::Full {
        url: client.url.url.clone(),
        size,
        bytes_read: progress.done(),
        snapshot: client.url.snapshot(),
        created_at: manifest::now(),
    });
    write_manifest(&args.output, manifest).await?;
    Ok(progress.summary("backup full"))
}

async fn incremental(args: &FetchArgs) -> Result<Summary, BackupError> {
    let (client, budget) = connect(args)?;
    let mut connection = client.connection();
    let map = retrying(&mut connection, "reading the extent map", budget, |c| {
        Box::pin(c.extent_map())
    })
    .await?;
    drop(connection);
    let output = create(args, map.size)?;
    let progress = Progress::new("backup incremental", plan::total(&map.extents));
    let reporter = progress.report();
    // Touching extents are read as one; nothing outside the map is read.
    let pieces = plan::split(&plan::coalesce(&map.extents), args.chunk_size);
    fetch::read_into(
        &client,
        pieces,
        map.size,
        &output,
        &reading(args),
        &progress,
    )
    .await?;
    finish(&output).await?;
    drop(reporter);
    let manifest = Manifest::Incremental(manifest::Incremental {
        url: client.url.url.clone(),
        base: map.base,
        snapshot: map.snapshot,
        size: map.size,
        extents: map.extents,
        bytes_read: progress.done(),
        created_at: manifest::now(),
    });
    write_manifest(&args.output, manifest).await?;
    Ok(progress.summary("backup incremental"))
}

fn connect(args: &FetchArgs) -> Result<(Arc<Client>, Duration), BackupError> {
    let credentials = Credentials::load(&args.credentials)?;
    let client = Client::new(args.url.clone(), &credentials)?;
    Ok((client, Duration::from_secs(args.retry_seconds)))
}

fn reading(args: &FetchArgs) -> Reading {
    Reading {
        parallel: usize::from(args.parallel),
        budget: Duration::from_secs(args.retry_seconds),
    }
}

fn create(args: &FetchArgs, size: u64) -> Result<Output, BackupError> {
    let file = files::create_output(&args.output, size, args.force)?;
    Ok(Output {
        file: Arc::new(file),
        path: Arc::new(args.output.clone()),
    })
}

/// The data on stable storage before the manifest says the backup is whole.
async fn finish(output: &Output) -> Result<(), BackupError> {
    let (file, path) = (output.file.clone(), output.path.clone());
    tokio::task::spawn_blocking(move || files::sync(&file, &path))
        .await
        .map_err(|e| BackupError::io("flushing", output.path.as_path(), std::io::Error::other(e)))?
}

async fn write_manifest(backup: &std::path::Path, manifest: Manifest) -> Result<(), BackupError> {
    let path = backup.to_path_buf();
    tokio::task::spawn_blocking(move || files::write_manifest(&path, &manifest))
        .await
        .map_err(|e| BackupError::io("writing the manifest of", backup, std::io::Error::other(e)))?
}

/// SIGINT and SIGTERM, either of which stops a command.
struct Signals {
    interrupt: Option<tokio::signal::unix::Signal>,
    terminate: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn install() -> Self {
        use tokio::signal::unix::{SignalKind, signal};
        Self {
            interrupt: signal(SignalKind::interrupt()).ok(),
            terminate: signal(SignalKind::terminate()).ok(),
        }
    }

    /// The name of the first signal that arrives (a handler that could not be installed
    /// never fires, and leaves the default action).
    async fn recv(&mut self) -> &'static str {
        async fn one(signal: &mut Option<tokio::signal::unix::Signal>) {
            match signal {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            () = one(&mut self.interrupt) => "SIGINT",
            () = one(&mut self.terminate) => "SIGTERM",
        }
    }
}
