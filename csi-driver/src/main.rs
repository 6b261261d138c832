//! `livedisk-csi`: the CSI driver's binary: `controller` and `node` serve CSI (see `run.rs`),
//! `frontends` serves the FUSE front ends beside the engine daemon, `admin` is the node-local
//! admin command, `backup` the client of the node's HTTPS export front.

mod cli;

use clap::Parser;

use cli::args::{Cli, Command};
use cli::exit::{chain_messages, classify, report};

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Admin(a) => match cli::admin::run(&a).await {
            Ok(out) => {
                if a.json {
                    match serde_json::to_string_pretty(&out.json) {
                        Ok(s) => println!("{s}"),
                        Err(e) => eprintln!("error: formatting JSON: {e}"),
                    }
                } else {
                    print!("{}", out.text);
                }
                0
            }
            Err(e) => {
                eprint!("{}", report(&chain_messages(&e)));
                classify(&e).code()
            }
        },
        Command::Backup(args) => match cli::backup::run(args).await {
            // One JSON line on stdout, for scripts; progress went to stderr.
            Ok(summary) => match serde_json::to_string(&summary) {
                Ok(line) => {
                    println!("{line}");
                    0
                }
                Err(e) => {
                    eprintln!("error: formatting the summary: {e}");
                    1
                }
            },
            Err(e) => {
                eprint!("{}", report(&e.messages()));
                e.class().code()
            }
        },
        Command::Controller(args) => {
            serve(
                args.telemetry.log_format,
                livedisk_csi::run::controller(args),
            )
            .await
        }
        Command::Node(args) => {
            serve(args.telemetry.log_format, livedisk_csi::run::node(args)).await
        }
        Command::Frontends(args) => {
            serve(args.log_format, livedisk_csi::run::frontends(args)).await
        }
    };
    std::process::exit(code);
}

/// Runs a server mode with structured logs (text or JSON); exit 0 on a clean shutdown, 1 on an
/// error.
async fn serve(
    log_format: livedisk_telemetry::LogFormat,
    server: impl std::future::Future<Output = anyhow::Result<()>>,
) -> i32 {
    livedisk_telemetry::logging::init(log_format);
    match server.await {
        Ok(()) => 0,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "server stopped");
            1
        }
    }
}
