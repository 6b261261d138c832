//! Thin wrappers around `qemu-img` for work on files the daemon does not
//! have open yet (creating layers) or only reads a sealed layer's metadata.

use std::path::Path;

use tokio::process::Command;

use crate::extents::{self, Extent};

#[derive(Debug, thiserror::Error)]
pub enum QemuImgError {
    #[error(
        "cannot run qemu-img ({0}); install it with `apt-get install qemu-utils qemu-system-common libnbd-bin`"
    )]
    Missing(std::io::Error),
    #[error("qemu-img {args}: {stderr}")]
    Failed { args: String, stderr: String },
    #[error(transparent)]
    Map(#[from] extents::MapParseError),
}

async fn run(args: &[&str]) -> Result<String, QemuImgError> {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .await
        .map_err(QemuImgError::Missing)?;
    if !out.status.success() {
        return Err(QemuImgError::Failed {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn path_str(p: &Path) -> Result<&str, QemuImgError> {
    p.to_str().ok_or_else(|| QemuImgError::Failed {
        args: String::new(),
        stderr: format!("non-UTF-8 path {}", p.display()),
    })
}

/// A fresh qcow2 file, optionally naming its backing file (relative to its
/// own directory) in the header so offline tools (`qemu-img check`,
/// `compare`) can follow the chain. `-u` because the backing file is open in
/// the daemon and must not be opened (locked) here.
/// The qcow2 cluster size of every layer file (new volumes, snapshot
/// overlays, internal seals, clones, reverts all come from [`create`]): the
/// granularity of extent records and of changed-block bitmaps.
pub const LAYER_CLUSTER_SIZE: u64 = 65536;

pub async fn create(file: &Path, size: u64, backing: Option<&str>) -> Result<(), QemuImgError> {
    let size = size.to_string();
    let cluster = format!("cluster_size={LAYER_CLUSTER_SIZE}");
    let mut args = vec!["create", "-q", "-f", "qcow2", "-o", &cluster];
    if let Some(b) = backing {
        args.extend(["-u", "-b", b, "-F", "qcow2"]);
    }
    args.push(path_str(file)?);
    args.push(&size);
    run(&args).await.map(|_| ())
}

/// Allocation map of one layer alone (backing cut off), from metadata only.
/// Safe while the daemon holds the file: the layer is sealed (nothing writes
/// it) and the snapshot transaction flushed it; `-U` skips the image lock.
pub async fn layer_allocation(file: &Path) -> Result<Vec<Extent>, QemuImgError> {
    let spec = serde_json::json!({
        "driver": "qcow2",
        "file": { "driver": "file", "filename": path_str(file)? },
        "backing": null,
    });
    let arg = format!("json:{spec}");
    let out = run(&["map", "-U", "--output=json", &arg]).await?;
    Ok(extents::parse_qemu_img_map(&out)?)
}

/// True if `file` opens as a qcow2 image (metadata only, no lock taken).
pub async fn is_qcow2(file: &Path) -> Result<bool, QemuImgError> {
    match run(&["info", "-U", "--output=json", path_str(file)?]).await {
        Ok(out) => Ok(serde_json::from_str::<serde_json::Value>(&out)
            .ok()
            .and_then(|v| {
                v.get("format")
                    .and_then(|f| f.as_str().map(|f| f == "qcow2"))
            })
            .unwrap_or(false)),
        Err(QemuImgError::Failed { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}

/// A `json:` image spec for a chain of qcow2 files, base first, with the
/// backing links given explicitly (never taken from the headers).
pub fn chain_spec(files: &[&Path]) -> Result<String, QemuImgError> {
    Ok(format!("json:{}", chain_value(files, false)?))
}

/// The options of [`chain_spec`]; `shared`: every layer read-only with
/// force-share.
fn chain_value(files: &[&Path], shared: bool) -> Result<serde_json::Value, QemuImgError> {
    let mut spec = serde_json::Value::Null;
    for f in files {
        spec = serde_json::json!({
            "driver": "qcow2",
            "file": { "driver": "file", "filename": path_str(f)? },
            "backing": spec,
        });
        if shared {
            spec["read-only"] = serde_json::json!(true);
            spec["force-share"] = serde_json::json!(true);
        }
    }
    Ok(spec)
}

/// Whether two chains read the same (`qemu-img compare`). Reads data: only
/// for recovery decisions, never for answering queries.
pub async fn chains_equal(a: &[&Path], b: &[&Path]) -> Result<bool, QemuImgError> {
    let (sa, sb) = (chain_spec(a)?, chain_spec(b)?);
    let out = Command::new("qemu-img")
        .args(["compare", "-U", "-q", &sa, &sb])
        .output()
        .await
        .map_err(QemuImgError::Missing)?;
    match out.status.code() {
        Some(0) => Ok(true),
        Some(1) => Ok(false),
        _ => Err(QemuImgError::Failed {
            args: "compare".into(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        }),
    }
}

/// Fills a fresh layer `file` (no backing in its header yet) with exactly
/// the clusters where the chain `view` (what the layer must show, base
/// first) differs from the chain `onto` (what it will back onto), then
/// names `onto_header` (relative to the layer's directory) as its backing
/// file in the header, for offline tools.
///
/// `qemu-img rebase` in safe mode does the comparison: the image is opened
/// with its backing given explicitly as `view`, the new backing is the
/// explicit chain `onto`, and every 512-byte run where the two differ is
/// written into the layer (allocating its cluster); clusters where they
/// agree stay unallocated. Both chains are given as `json:` specs because a
/// layer's header may name a stale backing file after merges (QEMU rewrites
/// headers with absolute names, clones name another volume's directory):
/// only the record knows the chain. Safe mode writes the `json:` spec into
/// the header, so a second, metadata-only rebase (`-u`) sets the plain
/// name. `-U` because the daemon holds the chains' files open; it only
/// reads them, and they are sealed (flushed, nothing writes them). The
/// file is synced before returning: the caller's "built" mark must not
/// outrun the data.
pub async fn build_difference(
    file: &Path,
    view: &[&Path],
    onto: &[&Path],
    onto_header: &str,
) -> Result<(), QemuImgError> {
    let image = {
        // `-U` covers the image and the new backing, not the backing given
        // inside the image's spec: each of those layers is opened read-only
        // with force-share itself, or qemu-img would refuse to share the
        // write permission that the daemon holds on every layer it re-added
        // after a restart (seen on QEMU 7.2: "Failed to get shared write
        // lock").
        serde_json::json!({
            "driver": "qcow2",
            "file": { "driver": "file", "filename": path_str(file)? },
            "backing": chain_value(view, true)?,
        })
    };
    let image = format!("json:{image}");
    let onto_spec = chain_spec(onto)?;
    run(&[
        "rebase", "-q", "-U", "-F", "qcow2", "-b", &onto_spec, &image,
    ])
    .await?;
    run(&[
        "rebase",
        "-q",
        "-u",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        "-b",
        onto_header,
        path_str(file)?,
    ])
    .await?;
    sync_file(file).await
}

/// fsync of a file and of its directory (its entry must survive too).
pub async fn sync_file(file: &Path) -> Result<(), QemuImgError> {
    let file = file.to_owned();
    let r = tokio::task::spawn_blocking(move || {
        std::fs::File::open(&file)?.sync_all()?;
        if let Some(dir) = file.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok::<(), std::io::Error>(())
    })
    .await;
    r.map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()))
        .map_err(|stderr| QemuImgError::Failed {
            args: "fsync".into(),
            stderr,
        })
}

/// An NBD export reached over TLS with an x509 client certificate (`tls_dir` holds
/// `ca-cert.pem`, `client-cert.pem`, `client-key.pem`).
pub struct NbdTls<'a> {
    pub host: &'a str,
    pub port: u16,
    pub export: &'a str,
    pub tls_dir: &'a Path,
}

/// Copies the raw bytes of an NBD export into a new raw file (`qemu-img convert`: holes stay
/// holes), at most `rate` bytes per second, reporting the fraction done from qemu-img's own
/// progress output. The child is killed if the future is dropped (a cancelled migration).
pub async fn convert_from_nbd(
    source: &NbdTls<'_>,
    out: &Path,
    rate: Option<u64>,
    progress: impl Fn(f64),
) -> Result<(), QemuImgError> {
    // `--image-opts` values cannot hold commas unescaped; none of these can contain one (host
    // names, numbers, export names of IDs, a pool path checked here).
    let dir = path_str(source.tls_dir)?;
    if dir.contains(',') || source.host.contains(',') || source.export.contains(',') {
        return Err(QemuImgError::Failed {
            args: String::new(),
            stderr: "a comma in a path, host or export name".into(),
        });
    }
    let object = format!("tls-creds-x509,id=migtls,endpoint=client,dir={dir}");
    let image = format!(
        "driver=nbd,server.type=inet,server.host={},server.port={},export={},tls-creds=migtls",
        source.host, source.port, source.export
    );
    let rate = rate.filter(|r| *r > 0).map(|r| r.to_string());
    // `-t writeback`: flushed before qemu-img exits (its default for the output never flushes);
    // the caller's fsync then finds nothing left to write.
    let mut args = vec![
        "convert",
        "-p",
        "-t",
        "writeback",
        "-O",
        "raw",
        "--object",
        &object,
    ];
    if let Some(r) = &rate {
        args.extend(["-r", r]);
    }
    args.extend(["--image-opts", &image, path_str(out)?]);
    let mut child = Command::new("qemu-img")
        .args(&args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(QemuImgError::Missing)?;
    let stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let reading = async {
        if let Some(out) = stdout {
            let _ = super::migrate::read_progress(out, &progress).await;
        }
    };
    let collecting = async {
        let mut text = String::new();
        if let Some(err) = stderr.as_mut() {
            use tokio::io::AsyncReadExt;
            let _ = err.read_to_string(&mut text).await;
        }
        text
    };
    let ((), text) = tokio::join!(reading, collecting);
    let status = child.wait().await.map_err(QemuImgError::Missing)?;
    if !status.success() {
        return Err(QemuImgError::Failed {
            args: args.join(" "),
            stderr: text.trim().to_owned(),
        });
    }
    Ok(())
}
