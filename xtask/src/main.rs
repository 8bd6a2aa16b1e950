//! `cargo xtask …`: every task a person or CI runs on this repository.

mod cmd;
mod setup;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, test, demo and benchmark kube-ovn-ebpf")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what building and testing need: the nightly's rust-src, bpf-linker 0.10.0 and
    /// the apt packages (bpftool, iproute2, iptables, ipset, nftables). Idempotent.
    Setup,
    /// Build the eBPF object and the agent that embeds it.
    BuildEbpf,
    /// Everything CI runs: setup, formatting, clippy, unit tests, the privileged
    /// BPF_PROG_TEST_RUN and network-namespace suites.
    Test,
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Setup => setup::ensure_all(),
        Command::BuildEbpf => {
            setup::ensure_build_tools()?;
            cmd::cargo(&["build", "--release", "--package", "kube-ovn-agent"])
        }
        Command::Test => test(),
    }
}

fn test() -> Result<()> {
    setup::ensure_all()?;
    cmd::cargo(&["fmt", "--all", "--check"])?;
    cmd::cargo(&["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"])?;
    cmd::cargo_ebpf_clippy()?;
    // Root-only suites skip loudly without privileges; in CI (root) a skip is a failure.
    let require = if setup::is_root() { "1" } else { "" };
    cmd::cargo_with_env(
        &["test", "--workspace", "--", "--test-threads", "2"],
        &[("KOVN_REQUIRE_PRIVILEGED", require)],
    )?;
    println!("xtask test: all suites passed");
    Ok(())
}
