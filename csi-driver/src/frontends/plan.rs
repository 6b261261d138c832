//! What to do with a volume's front end, decided from what is observed on the host (pid file,
//! process table, mount table, recorded URI). Pure, so that every case is unit-tested; the
//! server observes before each call, which makes start and stop idempotent and lets a restarted
//! server adopt front ends still running.

/// A volume's front end as found on the host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// A FUSE mount sits on the front end's mount point.
    pub mounted: bool,
    /// The pid file names a live nbdfuse serving this volume's file.
    pub pid: Option<i32>,
    /// The URI recorded at start (absent for a front end started before URIs were recorded).
    pub uri: Option<String>,
}

impl Observed {
    /// nbdfuse lives and its mount is in place: the file serves I/O.
    pub fn running(&self) -> bool {
        self.mounted && self.pid.is_some()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartPlan {
    /// The running front end already serves this URI: return it.
    Reuse { pid: i32 },
    /// A running front end serves another export: refused, never replaced under a consumer.
    Conflict { running: String },
    /// Start nbdfuse, after clearing what a dead or half-started one left.
    Spawn {
        /// A FUSE mount whose nbdfuse is gone (reads fail with ENOTCONN): detach it.
        unmount_stale: bool,
        /// An nbdfuse without its mount (it never finished starting): end it.
        terminate: Option<i32>,
    },
}

pub fn plan_start(observed: &Observed, uri: &str) -> StartPlan {
    match (observed.running(), observed.pid, &observed.uri) {
        (true, Some(pid), None) => StartPlan::Reuse { pid },
        (true, Some(pid), Some(running)) if running == uri => StartPlan::Reuse { pid },
        (true, _, Some(running)) => StartPlan::Conflict {
            running: running.clone(),
        },
        _ => StartPlan::Spawn {
            unmount_stale: observed.mounted,
            terminate: observed.pid,
        },
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopPlan {
    /// No mount and no process: only leftover files to remove.
    Nothing,
    /// Unmount (nbdfuse exits by itself once unmounted), then wait for `pid` to be gone.
    Unmount { pid: Option<i32> },
    /// A process without its mount: terminate it.
    Terminate { pid: i32 },
}

pub fn plan_stop(observed: &Observed) -> StopPlan {
    match (observed.mounted, observed.pid) {
        (true, pid) => StopPlan::Unmount { pid },
        (false, Some(pid)) => StopPlan::Terminate { pid },
        (false, None) => StopPlan::Nothing,
    }
}

/// Whether a process's command line (NUL-separated, as in /proc/PID/cmdline) is nbdfuse serving
/// `file`: a pid file can outlive its process, and the pid be reused by another program.
pub fn is_front_end_cmdline(cmdline: &[u8], file: &str) -> bool {
    let mut args = cmdline
        .split(|b| *b == 0)
        .map(|a| std::str::from_utf8(a).unwrap_or(""));
    let program = args.next().unwrap_or("");
    let name = program.rsplit('/').next().unwrap_or("");
    name == "nbdfuse" && args.any(|a| a == file)
}

#[cfg(test)]
mod tests {
    use super::*;

    const URI: &str = "nbd+unix:///vol-x?socket=/run/ld/nbd.sock";

    fn observed(mounted: bool, pid: Option<i32>, uri: Option<&str>) -> Observed {
        Observed {
            mounted,
            pid,
            uri: uri.map(str::to_string),
        }
    }

    #[test]
    fn start_reuses_a_running_front_end_of_the_same_export() {
        assert_eq!(
            plan_start(&observed(true, Some(7), Some(URI)), URI),
            StartPlan::Reuse { pid: 7 }
        );
        // Started by a node plugin of a release that recorded no URI: adopted as it is.
        assert_eq!(
            plan_start(&observed(true, Some(7), None), URI),
            StartPlan::Reuse { pid: 7 }
        );
    }

    #[test]
    fn start_never_replaces_a_running_front_end_of_another_export() {
        let other = "nbd+unix:///vol-x?socket=/elsewhere/nbd.sock";
        assert_eq!(
            plan_start(&observed(true, Some(7), Some(other)), URI),
            StartPlan::Conflict {
                running: other.into()
            }
        );
    }

    #[test]
    fn start_clears_leftovers_before_spawning() {
        assert_eq!(
            plan_start(&observed(false, None, None), URI),
            StartPlan::Spawn {
                unmount_stale: false,
                terminate: None
            }
        );
        // nbdfuse died (kill -9, engine pod restart): its mount is dead.
        assert_eq!(
            plan_start(&observed(true, None, Some(URI)), URI),
            StartPlan::Spawn {
                unmount_stale: true,
                terminate: None
            }
        );
        // nbdfuse without a mount, with any URI: it never served, end it.
        assert_eq!(
            plan_start(&observed(false, Some(9), Some("other")), URI),
            StartPlan::Spawn {
                unmount_stale: false,
                terminate: Some(9)
            }
        );
    }

    #[test]
    fn stop_plans() {
        assert_eq!(
            plan_stop(&observed(true, Some(7), Some(URI))),
            StopPlan::Unmount { pid: Some(7) }
        );
        assert_eq!(
            plan_stop(&observed(true, None, None)),
            StopPlan::Unmount { pid: None }
        );
        assert_eq!(
            plan_stop(&observed(false, Some(7), None)),
            StopPlan::Terminate { pid: 7 }
        );
        assert_eq!(plan_stop(&Observed::default()), StopPlan::Nothing);
    }

    #[test]
    fn only_nbdfuse_serving_the_file_counts() {
        let file = "/run/ld/attach/vol-x/fuse/disk";
        let cmd = |args: &[&str]| args.join("\0").into_bytes();
        assert!(is_front_end_cmdline(
            &cmd(&["nbdfuse", "-P", "/p", file, URI, ""]),
            file
        ));
        assert!(is_front_end_cmdline(
            &cmd(&["/usr/bin/nbdfuse", "-P", "/p", file, URI]),
            file
        ));
        assert!(!is_front_end_cmdline(
            &cmd(&["nbdfuse", "-P", "/p", "/other/disk", URI]),
            file
        ));
        assert!(!is_front_end_cmdline(&cmd(&["sleep", file]), file));
        // A zombie has an empty command line.
        assert!(!is_front_end_cmdline(b"", file));
    }
}
