//! The real operator binary as a child process of a test.

use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result};

use crate::workspace_binary;

/// Kills the operator when the test ends, pass or fail.
pub struct Operator {
    pub child: Child,
    log: std::path::PathBuf,
}

impl Operator {
    pub fn start() -> Result<Self> {
        let log =
            std::env::temp_dir().join(format!("livedisk-operator-{}.log", std::process::id()));
        let file = std::fs::File::create(&log)?;
        let child = Command::new(workspace_binary("livedisk-operator")?)
            .env("LIVEDISK_CRD_WAIT_SECONDS", "180")
            .env("RUST_LOG", "info,livedisk_operator=debug")
            .stdout(Stdio::from(file.try_clone()?))
            .stderr(Stdio::from(file))
            .spawn()
            .context("starting livedisk-operator")?;
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
