//! `cargo xtask …`: every task a person or CI runs on this repository.

mod bench;
mod demo;
mod golang;
mod helm;
mod image;
mod nodesim;
mod testbed;
mod vm;

use std::ffi::OsString;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};
use xtask::{cmd, setup};

#[derive(Parser)]
#[command(about = "Build, test, demo and benchmark kube-ovn-ebpf")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what building and testing need: the nightly's rust-src, bpf-linker 0.10.0 and
    /// the apt packages (bpftool, iproute2, iptables, ipset, nftables, prometheus for promtool).
    /// Idempotent.
    Setup,
    /// Build the eBPF object and the agent that embeds it.
    BuildEbpf,
    /// The main job, on a throw-away node: private network namespaces, the agent running on the
    /// example cluster (deploy/examples/cluster.yaml), one packet of each kind and the mark each
    /// got, the bpftool view; everything is removed at the end (also on Ctrl-C). Needs root.
    Demo,
    /// Everything CI runs: setup, formatting, clippy, unit tests, the privileged
    /// `BPF_PROG_TEST_RUN` and network-namespace suites, the suites against a real kube-apiserver
    /// (the testbed, built or reused first), the e2e suite and the kernel matrix.
    Test,
    /// End to end on a Kube-OVN node simulated in network namespaces (root): the same traffic
    /// with no hook, Kube-OVN's iptables PREROUTING rules and the eBPF agent, side by side, plus
    /// Calico/kube-proxy chain churn. See docs/e2e.md. Runs the node simulator (`nodesim/`,
    /// built --release); `cargo xtask e2e --help` lists its flags.
    #[command(disable_help_flag = true)]
    E2e {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Benchmarks: datapath (test-run), control plane, real traffic (baseline vs iptables vs
    /// ebpf). Prints tables and writes JSON and SVG under target/bench/. See BENCHMARKS.md.
    Bench(bench::Args),
    /// BENCHMARKS.md's traffic and control-plane tables, rendered from the committed JSON of the
    /// cited runs (bench-results/*.json); `--check` fails instead of rewriting.
    BenchTables {
        #[arg(long)]
        check: bool,
    },
    /// The real Kubernetes control plane for tests (pinned kube-apiserver + etcd built from the
    /// Go module proxy): `build` prints `KUBE_APISERVER=…` and `ETCD=…`. See docs/testbed.md.
    #[command(subcommand)]
    Testbed(testbed::Args),
    /// Helm and Kustomize at the versions go/helm/go.mod pins, built from the Go module proxy
    /// into target/tools/ (the chart test builds them on demand the same way).
    Helm {
        #[command(subcommand)]
        command: helm::Args,
    },
    /// The agent's OCI image from Debian packages and the release binary, no registry needed:
    /// tagged localhost/kube-ovn-ebpf:VERSION, archived under target/image/, started once with
    /// podman to prove it runs. Root, amd64. See docs/install.md.
    Image {
        /// Only what `cargo xtask test` checks: the debug agent on the cached rootfs, started
        /// (`--version`, `preflight`) and removed; no release build, no archive.
        #[arg(long)]
        ci: bool,
    },
    /// Kube-OVN's own gateway code (from the Go module proxy) in a harness: `build` it, `test` its
    /// rules against the spec and this project's transcription (root), `patch-test` the
    /// hand-over switch in contrib/kube-ovn. See docs/kube-ovn-real.md. Runs the node simulator
    /// (`nodesim/`, built --release); `cargo xtask kube-ovn --help` lists its commands.
    #[command(disable_help_flag = true)]
    KubeOvn {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Boot Debian's 5.10/6.1/6.12 kernels under QEMU (TCG, no network) from a busybox
    /// initramfs and run the privileged suites and the verifier statistics in each; `host` runs
    /// them on the running kernel. Prints PASS/FAIL per kernel; fails if any kernel fails.
    VmTest {
        /// Kernels to test (repeat or list): 5.10, 6.1, 6.12, host. Default: 5.10 and 6.1.
        #[arg(long, num_args = 1.., value_delimiter = ',', value_parser = vm::parse_kernel)]
        kernel: Vec<String>,
        /// Record the measured verifier complexity (processed instructions per program) as the
        /// new baseline in kube-ovn-ebpf/verifier-complexity.txt instead of failing on growth.
        #[arg(long)]
        bless: bool,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Setup => setup::ensure_all(),
        Command::BuildEbpf => {
            setup::ensure_build_tools()?;
            cmd::cargo(&["build", "--release", "--package", "kube-ovn-agent"])
        }
        Command::Test => test(),
        Command::Demo => demo::run(),
        Command::E2e { args } => nodesim::exec(&forward("e2e", args)),
        Command::Bench(args) => bench::run(&args),
        Command::BenchTables { check } => nodesim::exec(
            &["tables"]
                .into_iter()
                .chain(check.then_some("--check"))
                .collect::<Vec<_>>(),
        ),
        Command::Testbed(args) => testbed::run(&args),
        Command::Helm { command } => helm::run(&command),
        Command::Image { ci: false } => image::run(),
        Command::Image { ci: true } => image::ci_smoke(),
        Command::KubeOvn { args } => nodesim::exec(&forward("kube-ovn", args)),
        Command::VmTest { kernel, bless } => vm::run(kernel, bless),
    }
}

/// The simulator's command line for `cargo xtask <command> <args>`.
fn forward(command: &str, args: Vec<OsString>) -> Vec<OsString> {
    std::iter::once(OsString::from(command))
        .chain(args)
        .collect()
}

/// The Kube-OVN variants CI checks and runs the differential against: v1.14.10 stands in for
/// v1.13.15 (same positioning fixes; the proxy does not serve v1.13.15) and the patched build
/// (docs/kube-ovn-real.md). `cargo xtask e2e --kube-ovn v1.13.11,v1.14.10,v1.16.2,patched` runs
/// them all.
const CI_KUBE_OVN: &str = "v1.14.10,patched";

fn test() -> Result<()> {
    setup::ensure_all()?;
    cmd::cargo(&["fmt", "--all", "--check"])?;
    cmd::cargo(&["clippy", "--all-targets", "--", "-D", "warnings"])?;
    cmd::cargo_ebpf_clippy()?;
    golang::checks()?;
    // BENCHMARKS.md's tables against the committed JSON they are generated from.
    nodesim::run(&["tables", "--check"])?;
    // Root-only suites skip loudly without privileges; in CI (root) a skip is a failure.
    let require = if setup::is_root() { "1" } else { "" };
    // The real control plane for tests/real_apiserver.rs (cached under target/testbed/).
    let testbed = testbed::build()?;
    // Agents the test kit starts run with only the DaemonSet's capabilities (setpriv), as on a
    // node; suites that need more for their own setup keep root for that.
    let mut env = vec![
        ("KOVN_REQUIRE_PRIVILEGED", require.to_owned()),
        ("KOVN_TEST_AGENT_CAPS", "daemonset".to_owned()),
    ];
    env.extend(
        testbed
            .env()
            .map(|(var, path)| (var, path.display().to_string())),
    );
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    cmd::cargo_with_env(&["test", "--", "--test-threads", "2"], &env)?;
    // The simulated Kube-OVN node at CI size: differential tables, coexistence, faults and
    // migration, ~2 min on 2 cores (docs/e2e.md).
    if setup::is_root() {
        nodesim::run(&["e2e", "--quick"])?;
        // Kube-OVN's own gateway code (docs/kube-ovn-real.md): its rules against the spec and our
        // transcription, then the differential against it, released and patched.
        nodesim::run(&["kube-ovn", "test", "--versions", CI_KUBE_OVN])?;
        nodesim::run(&["e2e", "--kube-ovn", CI_KUBE_OVN])?;
        // The image's Debian rootfs (cached under target/image/) with the debug agent just
        // built, started with podman: ~2.5 min cold, ~20 s warm (docs/install.md).
        image::ci_smoke()?;
    } else {
        bail!(
            "`cargo xtask test` runs privileged suites (BPF, network namespaces): run it as root"
        );
    }
    // The 5.10 and 6.1 guests: ~6 min from cold on 2 cores (docs/kernel-matrix.md).
    vm::run(Vec::new(), false)?;
    println!("xtask test: all suites passed");
    Ok(())
}
