//! `cargo xtask bench [--quick] [datapath] [control-plane] [memory] [traffic]`: every benchmark, each
//! writing JSON under `target/bench/` (schemas in BENCHMARKS.md). Needs root.

use std::path::Path;

use anyhow::Result;
use clap::ValueEnum;

use crate::{cmd, nodesim};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Suite {
    /// The classifier alone under `BPF_PROG_TEST_RUN`, per packet kind and set size.
    Datapath,
    /// The agent: cold start to programmed maps, change-to-map-write latency, memory; and map
    /// sync against ipset/iptables-restore of the same state.
    ControlPlane,
    /// The agent's resident memory with the file source: ready, peak, after reloads, per scale.
    Memory,
    /// Real traffic through the namespace node: baseline vs iptables vs ebpf, interleaved.
    Traffic,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Short runs (fewer rounds, smaller scales) for a quick look or CI.
    #[arg(long)]
    pub quick: bool,
    /// Traffic only: also measure with k stacked copies of each hook for each k listed
    /// (e.g. 1,4,16) and fit the cost of one more hook. Off by default.
    #[arg(long, value_name = "K1,K2,…", value_delimiter = ',')]
    pub amplify: Vec<usize>,
    /// Which suites; all when none is given.
    #[arg(value_enum)]
    pub suites: Vec<Suite>,
}

pub fn run(args: &Args) -> Result<()> {
    crate::setup::ensure_all()?;
    let suites = if args.suites.is_empty() {
        vec![
            Suite::Datapath,
            Suite::ControlPlane,
            Suite::Memory,
            Suite::Traffic,
        ]
    } else {
        args.suites.clone()
    };
    let out = cmd::workspace_root().join("target/bench");
    std::fs::create_dir_all(&out)?;
    for suite in suites {
        match suite {
            Suite::Datapath => cargo_bench("datapath", &out.join("datapath.json"), args.quick)?,
            Suite::ControlPlane => {
                cargo_bench("control_plane", &out.join("control-plane.json"), args.quick)?;
            }
            Suite::Memory => cargo_bench("memory", &out.join("memory.json"), args.quick)?,
            Suite::Traffic => {
                let mut traffic = vec![
                    "traffic".into(),
                    "--out".into(),
                    out.clone().into_os_string(),
                ];
                if args.quick {
                    traffic.push("--quick".into());
                }
                if !args.amplify.is_empty() {
                    let ks: Vec<String> = args.amplify.iter().map(ToString::to_string).collect();
                    traffic.push("--amplify".into());
                    traffic.push(ks.join(",").into());
                }
                nodesim::run::<std::ffi::OsString>(&traffic)?;
            }
        }
    }
    Ok(())
}

/// One of the agent's `cargo bench` targets (`kube-ovn-agent/benches/`), writing its JSON to `json`.
fn cargo_bench(bench: &str, json: &Path, quick: bool) -> Result<()> {
    let json = json.to_string_lossy();
    let mut args = vec![
        "bench",
        "-p",
        "kube-ovn-agent",
        "--bench",
        bench,
        "--",
        "--out",
        &json,
    ];
    if quick {
        args.push("--quick");
    }
    cmd::cargo(&args)
}
