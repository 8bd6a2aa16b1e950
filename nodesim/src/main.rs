//! `kube-ovn-nodesim`: a Kube-OVN node simulated in private network namespaces (`node`), and what
//! runs on it — the end-to-end suite (`e2e`), the traffic benchmark (`traffic`) and Kube-OVN's
//! own gateway code as an oracle (`kube_ovn`). `cargo xtask e2e`, `cargo xtask bench traffic` and
//! `cargo xtask kube-ovn` build it with `--release` and run it, so the load generators and servers
//! whose CPU the benchmark reports are optimised code. Needs root.

mod e2e;
mod kube_ovn;
mod node;
mod tables;
mod traffic;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use xtask::{cmd, setup};

#[derive(Parser)]
#[command(about = "A Kube-OVN node simulated in network namespaces: e2e, traffic benchmark")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// `cargo xtask e2e`: see docs/e2e.md.
    E2e(e2e::Args),
    /// `cargo xtask bench traffic`: see BENCHMARKS.md.
    Traffic {
        /// Short runs (fewer rounds, smaller scales).
        #[arg(long)]
        quick: bool,
        /// Directory the JSON, Markdown and SVG results are written to.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Also measure with k stacked copies of each hook, for each k listed (e.g. 1,4,16),
        /// and fit the cost of one more hook (BENCHMARKS.md, "Amplified mode").
        #[arg(long, value_name = "K1,K2,…", value_delimiter = ',')]
        amplify: Vec<usize>,
    },
    /// `cargo xtask kube-ovn`: see docs/kube-ovn-real.md.
    KubeOvn(kube_ovn::Args),
    /// `cargo xtask bench-tables`: BENCHMARKS.md's tables from the JSON in bench-results/.
    Tables {
        /// Fail if a generated table differs instead of rewriting it.
        #[arg(long)]
        check: bool,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::E2e(args) => e2e::run(&args),
        Command::Traffic {
            quick,
            out,
            amplify,
        } => traffic::run(quick, &amplify, &out),
        Command::KubeOvn(args) => kube_ovn::run(&args),
        Command::Tables { check } => tables::run(check),
    }
}
