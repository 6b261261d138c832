//! The livedisk operator: reconciles the user-facing `livedisk.io` resources.

mod controller;
mod decide;
mod error;
mod kinds;
mod observe;
mod standard;
mod startup;
mod status;

use clap::Parser;
use tracing_subscriber::{EnvFilter, fmt};

/// Command-line flags; every flag also reads an environment variable.
#[derive(Parser, Debug)]
#[command(
    name = "livedisk-operator",
    version,
    about = "Reconciles livedisk.io resources"
)]
struct Args {
    /// How long to wait for the livedisk CRDs to be established before giving up, in seconds.
    #[arg(long, env = "LIVEDISK_CRD_WAIT_SECONDS", default_value_t = 120)]
    crd_wait_seconds: u64,
    /// Log format: `text` for people, `json` for log pipelines.
    #[arg(long, env = "LIVEDISK_LOG_FORMAT", default_value = "text")]
    log_format: String,
    /// Name reported in Events (`reportingController`).
    #[arg(
        long,
        env = "LIVEDISK_CONTROLLER_NAME",
        default_value = "livedisk-operator"
    )]
    controller_name: String,
    /// Pod name, reported in Events (`reportingInstance`).
    #[arg(long, env = "POD_NAME")]
    pod_name: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_logging(&args.log_format);
    let client = kube::Client::try_default().await?;
    startup::wait_for_crds(
        &client,
        std::time::Duration::from_secs(args.crd_wait_seconds),
    )
    .await?;
    let reporter = kube::runtime::events::Reporter {
        controller: args.controller_name,
        instance: args.pod_name,
    };
    controller::run_all(client, reporter).await?;
    Ok(())
}

fn init_logging(format: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = fmt().with_env_filter(filter);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
