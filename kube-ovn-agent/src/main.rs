//! The `kube-ovn-agent` binary: CLI dispatch, logging and exit statuses.

use std::{io::IsTerminal as _, process::ExitCode};

use anyhow::Result;
use clap::Parser;
use kube_ovn_agent::{
    agent as run,
    cli::{Cli, Command},
    datapath::pins::{BpffsError, EXIT_ROOT_IN_USE},
    diag,
    ops::cleanup,
    ops::inspect,
    ops::verify,
};
use tracing_subscriber::{EnvFilter, fmt};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // netlink-packet-route warns about every attribute newer kernels extend; not actionable.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(format!("{},netlink_packet_route=error", cli.log_level))
    });
    // aya logs through the `log` crate; the subscriber's `tracing-log` bridge carries it over.
    // Logs go to stderr in both formats: stdout carries command output (`status --json`, …).
    if cli.log_json {
        fmt()
            .json()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    } else {
        fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            // Colour codes only for a terminal, never into a file or a container log.
            .with_ansi(std::io::stderr().is_terminal())
            .init();
    }
    let json = cli.log_json;
    match dispatch(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let line = diag::render(error.chain());
            if json {
                tracing::error!(error = %line, "exiting");
            } else {
                eprintln!("error: {line}");
            }
            let in_use = error
                .chain()
                .any(|c| matches!(c.downcast_ref(), Some(BpffsError::InUse { .. })));
            if in_use {
                ExitCode::from(EXIT_ROOT_IN_USE)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn dispatch(command: Command) -> Result<()> {
    match command {
        Command::Run(args) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
            .block_on(run::run(*args)),
        Command::Status(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(inspect::status(&args)),
        Command::Dump(args) => inspect::dump(&args),
        Command::Detach(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(inspect::detach(&args)),
        Command::Verify(args) => {
            let options = verify::Options {
                root: args.root.bpffs_root,
                window: args.window,
                tolerance_bp: args.tolerance,
                per_packet: !args.connections_only,
            };
            let report = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(verify::run(&options))?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.text());
            }
            std::process::exit(report.verdict.exit_code());
        }
        Command::CleanupIptables(args) => {
            let state = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(cleanup::datapath_state(&args.root.bpffs_root));
            let options = cleanup::Options {
                dry_run: args.dry_run,
                force: args.force,
            };
            let outcome = cleanup::run(options, &state)?;
            print!("{}", outcome.text());
            anyhow::ensure!(!outcome.failed(), "some rules could not be removed");
            Ok(())
        }
    }
}
