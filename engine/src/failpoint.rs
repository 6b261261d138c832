//! Crash points for fault tests: with `LIVEDISK_FAILPOINT=<name>` in the
//! environment the process kills itself with SIGKILL when it reaches that
//! point — a kill -9 at an exact instant, which no outside timing can hit
//! reliably. With `LIVEDISK_FAILPOINT_DAEMON=1` it SIGKILLs the daemon first
//! (pid given by the caller), so both die at that instant.
//!
//! Points: `snapshot-before-transaction`, `snapshot-after-transaction`,
//! `capture-before-store` (a snapshot returned; its background capture read
//! the sealed layer's map but did not store it),
//! `merge-before-seal`, `merge-after-seal` (around the internal seal's
//! transaction when deleting the latest snapshot), `merge-before-complete`
//! (active commits: deleted volumes only), `merge-before-finalize` (a
//! non-active commit copied and flushed, its job `pending`),
//! `merge-after-complete`;
//! `revert-before-rebase` (the new layer's file exists, its difference not
//! yet computed), `revert-before-built` (computed, not yet marked built),
//! `revert-after-built` (marked built, no switch yet), `revert-after-switch`
//! (the record names the new layer, the old ones not yet dropped).

/// Dies here if the environment asks for it; otherwise does nothing.
pub fn hit(name: &str, daemon_pid: Option<i32>) {
    if std::env::var("LIVEDISK_FAILPOINT").as_deref() != Ok(name) {
        return;
    }
    tracing::warn!(failpoint = name, "failpoint reached: killing this process");
    if std::env::var("LIVEDISK_FAILPOINT_DAEMON").as_deref() == Ok("1")
        && let Some(pid) = daemon_pid
    {
        // SAFETY: signalling the daemon pid this engine started or attached to.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        while crate::qsd::daemon::pid_alive(pid) {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
    // SAFETY: killing our own process, as a crash would.
    unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
}
