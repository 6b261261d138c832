//! Mount-table queries and the few mount operations the Node service needs.

use std::path::Path;

use super::attach::run;
use crate::grpc::error::CsiError;

/// Decodes the octal escapes (`\040` for a space) the kernel uses in mountinfo paths.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 4 <= bytes.len()
            && let Ok(code) = u8::from_str_radix(&field[i + 1..i + 4], 8)
        {
            out.push(code);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Mount points listed in a mountinfo text (field 5 of each line).
pub fn mount_points(mountinfo: &str) -> Vec<String> {
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape)
        .collect()
}

/// Whether `path` is a mount point in this process's mount namespace.
pub fn is_mounted(path: &Path) -> bool {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let wanted = path.to_string_lossy();
    mount_points(&mountinfo).iter().any(|p| *p == wanted)
}

pub async fn bind(source: &Path, target: &Path, readonly: bool) -> Result<(), CsiError> {
    run(
        "mount",
        &[
            "--bind",
            &source.to_string_lossy(),
            &target.to_string_lossy(),
        ],
    )
    .await?;
    if readonly {
        run(
            "mount",
            &["-o", "remount,bind,ro", &target.to_string_lossy()],
        )
        .await?;
    }
    Ok(())
}

pub async fn unmount(target: &Path) -> Result<(), CsiError> {
    if is_mounted(target) {
        run("umount", &[&target.to_string_lossy()]).await?;
    }
    Ok(())
}

/// The filesystem type on a device, or `None` when it holds none.
pub async fn filesystem(device: &Path) -> Result<Option<String>, CsiError> {
    let output = tokio::process::Command::new("blkid")
        .args(["-p", "-s", "TYPE", "-o", "value"])
        .arg(device)
        .output()
        .await
        .map_err(|e| CsiError::Internal(format!("running blkid: {e}")))?;
    let kind = String::from_utf8_lossy(&output.stdout).trim().to_string();
    // blkid exits 2 when it finds nothing: an empty device.
    Ok((!kind.is_empty()).then_some(kind))
}

/// Formats an empty device (never one that holds a filesystem) and mounts it.
pub async fn format_and_mount(
    device: &Path,
    fs_type: &str,
    target: &Path,
    options: &[String],
) -> Result<(), CsiError> {
    match filesystem(device).await? {
        Some(existing) if existing != fs_type => {
            return Err(CsiError::FailedPrecondition(format!(
                "{} holds a {existing} filesystem, not the requested {fs_type}",
                device.display()
            )));
        }
        Some(_) => {}
        None => {
            let mkfs = format!("mkfs.{fs_type}");
            let quiet = if fs_type == "xfs" { "-q" } else { "-qF" };
            run(&mkfs, &[quiet, &device.to_string_lossy()]).await?;
        }
    }
    let mut args = vec!["-t".to_string(), fs_type.to_string()];
    if !options.is_empty() {
        args.push("-o".into());
        args.push(options.join(","));
    }
    args.push(device.to_string_lossy().into_owned());
    args.push(target.to_string_lossy().into_owned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run("mount", &args).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_are_read_and_unescaped() {
        let info = "36 35 98:0 / /mnt/with\\040space rw,noatime shared:1 - ext4 /dev/loop0 rw\n\
                    37 35 98:0 / /plain rw - ext4 /dev/loop1 rw\n";
        assert_eq!(
            mount_points(info),
            vec!["/mnt/with space".to_string(), "/plain".to_string()]
        );
    }
}
