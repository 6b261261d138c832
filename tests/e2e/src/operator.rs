//! The real operator binary as a child process of a test.

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::workspace_binary;

/// Kills the operator when the test ends, pass or fail.
pub struct Operator {
    pub child: Child,
    log: std::path::PathBuf,
}

impl Operator {
    /// The operator as the chart installs it: under the chart's operator ServiceAccount (the
    /// kubeconfig `hack/accounts.sh` writes), never the test's admin identity.
    pub fn start() -> Result<Self> {
        Self::spawn(Some(&chart_account_kubeconfig("operator")?))
    }

    /// The operator with the identity of another kubeconfig (for example a restricted one).
    pub fn start_with_kubeconfig(kubeconfig: &Path) -> Result<Self> {
        Self::spawn(Some(kubeconfig))
    }

    /// One replica of several: the operator under `kubeconfig`, with `identity` as its pod name
    /// (`POD_NAME`: its identity in the Lease and in its Events).
    pub fn start_replica(kubeconfig: &Path, identity: &str) -> Result<Self> {
        Self::spawn_with(Some(kubeconfig), &[("POD_NAME", identity)])
    }

    /// The operator under the chart's operator ServiceAccount, with extra environment (flags).
    pub fn start_with_env(env: &[(&str, &str)]) -> Result<Self> {
        Self::spawn_with(Some(&chart_account_kubeconfig("operator")?), env)
    }

    fn spawn(kubeconfig: Option<&Path>) -> Result<Self> {
        Self::spawn_with(kubeconfig, &[])
    }

    fn spawn_with(kubeconfig: Option<&Path>, env: &[(&str, &str)]) -> Result<Self> {
        let log = std::env::temp_dir().join(format!(
            "livedisk-operator-{}-{}.log",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        let file = std::fs::File::create(&log)?;
        let mut command = Command::new(workspace_binary("livedisk-operator")?);
        command
            .env("LIVEDISK_CRD_WAIT_SECONDS", "180")
            .env("RUST_LOG", "info,livedisk_operator=debug")
            .stdout(Stdio::from(file.try_clone()?))
            .stderr(Stdio::from(file));
        command.envs(env.iter().copied());
        if let Some(kubeconfig) = kubeconfig {
            command.env("KUBECONFIG", kubeconfig);
        }
        let child = command.spawn().context("starting livedisk-operator")?;
        Ok(Self { child, log })
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `signal` (`libc::SIGSTOP`, `SIGCONT`, `SIGTERM`, ...) to the operator process.
    pub fn signal(&self, signal: libc::c_int) -> Result<()> {
        let pid = libc::pid_t::try_from(self.child.id()).context("pid out of range")?;
        // SAFETY: kill(2) only sends a signal; the pid is that of our own child, not yet reaped
        // (it is reaped only by `wait` in `stop` or `drop`).
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(std::io::Error::last_os_error()).context("kill(2)");
        }
        Ok(())
    }

    /// Stops the operator as kubelet stops a pod: SIGTERM (a leader stops its controllers and
    /// releases its Lease), then SIGKILL if it is still there after `grace`. Returns how it ended.
    pub fn stop(&mut self, grace: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        self.signal(libc::SIGTERM)?;
        // A stopped process handles SIGTERM only once it runs again.
        self.signal(libc::SIGCONT)?;
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.child.kill()?;
        Ok(self.child.wait()?)
    }
}

/// The kubeconfig of a chart account, written by `hack/accounts.sh apply` beside the cluster's
/// admin kubeconfig (`$LIVEDISK_STATE_DIR/kubeconfig` -> `$LIVEDISK_STATE_DIR/accounts/`).
pub fn chart_account_kubeconfig(component: &str) -> Result<std::path::PathBuf> {
    let admin = std::env::var_os("KUBECONFIG").context(
        "KUBECONFIG is not set: start the local cluster with `make up` (or run `make test`)",
    )?;
    let state = Path::new(&admin)
        .parent()
        .context("KUBECONFIG has no parent directory")?;
    let path = state
        .join("accounts")
        .join(format!("{component}.kubeconfig"));
    anyhow::ensure!(
        path.is_file(),
        "{} is missing: the chart's accounts are not set up on this cluster (run `hack/accounts.sh apply`)",
        path.display()
    );
    Ok(path)
}

impl Drop for Operator {
    /// Pass or fail, the operator goes; gracefully, so that the next test's operator finds the
    /// Lease released instead of waiting for it to expire.
    fn drop(&mut self) {
        if self.stop(Duration::from_secs(10)).is_err() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The operator (it signs the node plugins' export front certificates), once each of `nodes`
/// has registered and has its front's certificate, issued for the request of the plugin running
/// now (a restarted plugin asks anew with a new key, while its status still shows the old
/// certificate): what a test of traffic between nodes needs.
pub async fn operator_with_fronts(client: &kube::Client, nodes: &[&str]) -> Result<Operator> {
    use livedisk_api::internal::LivediskNode;
    use sha2::Digest;
    let operator = Operator::start()?;
    let api: kube::Api<LivediskNode> = kube::Api::all(client.clone());
    for name in nodes {
        crate::eventually(90, &format!("{name}'s front certificate"), || async {
            // Not registered yet right after the cluster came up: wait for it too.
            let Some(node) = api.get_opt(name).await? else {
                return Ok(None);
            };
            let Some(front) = node.status.and_then(|s| s.export_front) else {
                return Ok(None);
            };
            let asked = front.certificate_request.map(|r| {
                sha2::Sha256::digest(r.as_bytes())
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>()
            });
            let current = front.certificate.is_some()
                && asked.is_some()
                && front.signed_request_sha256 == asked;
            Ok(current.then_some(()))
        })
        .await?;
    }
    // The plugins pick the certificate up from their watch of the same object a moment later.
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(operator)
}
