//! The real operator binary as a child process of a test.

use std::path::Path;
use std::process::{Child, Command, Stdio};

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

    fn spawn(kubeconfig: Option<&Path>) -> Result<Self> {
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
        if let Some(kubeconfig) = kubeconfig {
            command.env("KUBECONFIG", kubeconfig);
        }
        let child = command.spawn().context("starting livedisk-operator")?;
        Ok(Self { child, log })
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
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
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
