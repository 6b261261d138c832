//! Command-line shape of `livedisk-csi backup` (clap derive).

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::url::ExportUrl;
use crate::cli::size::parse_size;

#[derive(Debug, Args)]
pub struct BackupArgs {
    #[command(subcommand)]
    pub cmd: BackupCmd,
}

#[derive(Debug, Subcommand)]
pub enum BackupCmd {
    /// Reads the whole image of a snapshot export into a sparse file.
    Full(FetchArgs),
    /// Reads the extents changed since the export's base snapshot into a sparse file.
    Incremental(FetchArgs),
    /// Writes a full backup, then incrementals in order, onto a block device or file.
    Restore(RestoreArgs),
}

#[derive(Debug, Args)]
pub struct FetchArgs {
    /// The export's URL (its DiskExport's status.endpoint), https://HOST:PORT/exports/NAME.
    #[arg(long, value_parser = parse_url)]
    pub url: ExportUrl,
    /// Directory with `ca-cert.pem` and `token` (the export's credentials Secret, mounted).
    #[arg(long, env = "LIVEDISK_BACKUP_CREDENTIALS")]
    pub credentials: PathBuf,
    /// The backup file; its manifest is written beside it as FILE.backup.json.
    #[arg(long)]
    pub output: PathBuf,
    /// Overwrite an existing output file.
    #[arg(long)]
    pub force: bool,
    /// Bytes per request (suffixes allowed).
    #[arg(long, value_parser = parse_chunk, default_value = "4MiB")]
    pub chunk_size: u64,
    /// Requests in flight, each on its own connection.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub parallel: u16,
    /// How long one request may keep failing with connection errors or 5xx answers (a front
    /// restarting) before the backup gives up.
    #[arg(long, default_value_t = 120)]
    pub retry_seconds: u64,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The full backup file.
    #[arg(long)]
    pub full: PathBuf,
    /// An incremental backup file to apply after the full one; repeat in the order taken.
    #[arg(long)]
    pub incremental: Vec<PathBuf>,
    /// The block device or file to write (it must exist and hold at least the image's size).
    #[arg(long)]
    pub target: PathBuf,
    /// The target reads zeros everywhere (a new device or file): skip writing the full
    /// backup's zeros.
    #[arg(long)]
    pub target_is_zeroed: bool,
    /// Bytes per read and write (suffixes allowed).
    #[arg(long, value_parser = parse_chunk, default_value = "4MiB")]
    pub chunk_size: u64,
}

fn parse_url(s: &str) -> Result<ExportUrl, String> {
    ExportUrl::parse(s).map_err(|e| e.to_string())
}

/// A chunk of 4 KiB to 256 MiB: each one in flight is held in memory whole.
fn parse_chunk(s: &str) -> Result<u64, String> {
    let size = parse_size(s)?;
    if !(4096..=256 << 20).contains(&size) {
        return Err(format!("chunk size {s:?}: between 4KiB and 256MiB"));
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_sizes_are_bounded() {
        assert_eq!(parse_chunk("4MiB"), Ok(4 << 20));
        assert!(parse_chunk("1K").is_err());
        assert!(parse_chunk("1GiB").is_err());
    }
}
