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
    /// The operator with the test's own identity (`KUBECONFIG`, cluster admin).
    pub fn start() -> Result<Self> {
        Self::spawn(None)
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

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
