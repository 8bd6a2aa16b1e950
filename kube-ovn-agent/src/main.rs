//! The `kube-ovn-agent` binary: CLI dispatch and logging.

mod inspect;
mod run;

use anyhow::Result;
use clap::Parser;
use kube_ovn_agent::{
    cleanup,
    cli::{Cli, Command},
    verify,
};
use tracing_subscriber::{EnvFilter, fmt};

fn main() -> Result<()> {
    let cli = Cli::parse();
    // netlink-packet-route warns about every attribute newer kernels extend; not actionable.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(format!("{},netlink_packet_route=error", cli.log_level))
    });
    // aya logs through the `log` crate; the subscriber's `tracing-log` bridge carries it over.
    if cli.log_json {
        fmt().json().with_env_filter(filter).init();
    } else {
        fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    }
    match cli.command {
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
