//! Agent memory with the file source (issue 13 item 7). Needs root.
//!
//! The release agent binary, `--source file:`, inside a private network namespace, on a cluster
//! file of N Services as `kubectl get -o yaml` prints them (`testing::objects::cluster_file`):
//! resident memory 3 s after `/readyz` (the first read's peak has been handed back by then), the
//! peak (`VmHWM`: the parse of the whole file), and resident memory after [`RELOADS`] new versions
//! of the file, each renamed over the old one as docs/operations.md tells writers to. The kube
//! source's memory at the same scales is in the control-plane benchmark, which drives the agent
//! through the API.
//!
//! Run through `cargo xtask bench memory [--quick]`; writes JSON (schema in BENCHMARKS.md).

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use kube_ovn_agent::testing::{
    http, missing_privilege,
    netns::{Bpffs, NetNs, TempPath},
    objects::cluster_file,
    stats::{BenchArgs, Spread, loadavg, machine_facts, proc_memory_mib, spread},
};
use serde::Serialize;

const AGENT: &str = env!("CARGO_BIN_EXE_kube-ovn-agent");
const METRICS_PORT: u16 = 19_665;
const ADDR: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), METRICS_PORT);
/// New versions of the cluster file after the first.
const RELOADS: u16 = 5;
/// How long after ready (and after the last reload) resident memory is read.
const SETTLE: Duration = Duration::from_secs(3);

#[derive(Serialize)]
struct Report {
    machine: serde_json::Value,
    reloads: u16,
    results: Vec<Scale>,
}

#[derive(Serialize)]
struct Scale {
    services: usize,
    file_mib: f64,
    rounds: Vec<Round>,
    ready_ms: Spread,
    rss_ready_mib: Spread,
    peak_mib: Spread,
    rss_after_reloads_mib: Spread,
    peak_after_reloads_mib: Spread,
}

#[derive(Serialize, Clone, Copy)]
struct Round {
    ready_ms: f64,
    rss_ready_mib: f64,
    peak_mib: f64,
    rss_after_reloads_mib: f64,
    peak_after_reloads_mib: f64,
}

fn main() {
    let BenchArgs {
        list,
        quick,
        out,
        scales,
    } = BenchArgs::from_env("memory", &[10_000], &[10_000, 50_000, 100_000, 150_000]);
    if list {
        return;
    }
    if let Some(why) = missing_privilege() {
        eprintln!("*** SKIPPING the memory benchmark: {why} ***");
        std::process::exit(i32::from(kube_ovn_agent::testing::privilege_required()));
    }
    let rounds = if quick { 1 } else { 3 };
    let load_before = loadavg();
    let mut results = Vec::new();
    for services in scales {
        let dir = TempPath::new("kovn-memb-", "d");
        std::fs::create_dir_all(&*dir).expect("bench directory");
        let path = dir.join("cluster.yaml");
        replace(&path, &cluster_file(services, 0));
        #[expect(clippy::cast_precision_loss, reason = "MiB of a file fit f64")]
        let file_mib = std::fs::metadata(&path).expect("cluster file").len() as f64 / 1_048_576.0;
        let runs: Vec<Round> = (0..rounds).map(|_| agent_run(&path, services)).collect();
        let of = |f: fn(&Round) -> f64| spread(runs.iter().map(f).collect());
        let scale = Scale {
            services,
            file_mib,
            ready_ms: of(|r| r.ready_ms),
            rss_ready_mib: of(|r| r.rss_ready_mib),
            peak_mib: of(|r| r.peak_mib),
            rss_after_reloads_mib: of(|r| r.rss_after_reloads_mib),
            peak_after_reloads_mib: of(|r| r.peak_after_reloads_mib),
            rounds: runs,
        };
        eprintln!(
            "memory: {services} Services ({file_mib:.0} MiB file): ready {:.0} ms, RSS {:.0} MiB \
             (peak {:.0}), after {RELOADS} reloads {:.0} MiB (peak {:.0})",
            scale.ready_ms.median,
            scale.rss_ready_mib.median,
            scale.peak_mib.median,
            scale.rss_after_reloads_mib.median,
            scale.peak_after_reloads_mib.median,
        );
        results.push(scale);
        let _ = std::fs::remove_dir_all(&*dir);
    }
    let report = Report {
        machine: machine_facts(load_before),
        reloads: RELOADS,
        results,
    };
    if let Some(parent) = Path::new(&out).parent() {
        std::fs::create_dir_all(parent).expect("output directory");
    }
    std::fs::write(
        &out,
        serde_json::to_string_pretty(&report).expect("serialise"),
    )
    .expect("write the report");
    eprintln!("memory: wrote {out}");
}

/// The agent process, killed if the benchmark panics before stopping it.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// One agent from start to [`RELOADS`] reloads of the file at `path`, inside a private namespace.
fn agent_run(path: &Path, services: usize) -> Round {
    let ns = NetNs::new("kovn-memb-").expect("create namespace");
    ns.sh("ip link add name eth0 type veth peer name peer0 && ip addr add 192.168.0.11/16 dev eth0 && ip link set eth0 up && ip link set peer0 up")
        .expect("shell in namespace");
    let bpffs = Bpffs::mount();
    let started = Instant::now();
    let child = ns
        .command(AGENT)
        .args(["run", "--node-name", "n1", "--kube-proxy-mode", "ipvs"])
        .args(["--log-level", "warn", "--source-max-bytes", "1Gi"])
        .arg(format!("--source=file:{}", path.display()))
        .arg(format!("--metrics-addr=127.0.0.1:{METRICS_PORT}"))
        .arg("--bpffs-root")
        .arg(bpffs.root())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map(KillOnDrop)
        .expect("start the agent");
    let pid = child.0.id();
    let in_ns = |what: &str, f: &(dyn Fn() -> bool + Sync)| {
        let done = ns
            .enter(|| {
                let deadline = Instant::now() + Duration::from_mins(3);
                while Instant::now() < deadline {
                    if f() {
                        return true;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                false
            })
            .expect("enter namespace");
        assert!(done, "{services} Services: {what} within 3 minutes");
    };
    in_ns("ready", &|| http_status("/readyz") == Some(200));
    let ready_ms = started.elapsed().as_secs_f64() * 1e3;
    std::thread::sleep(SETTLE);
    let rss_ready_mib = proc_memory_mib(pid, "VmRSS");
    let peak_mib = proc_memory_mib(pid, "VmHWM");
    for version in 1..=RELOADS {
        replace(path, &cluster_file(services, version));
        // The first read is the first list: version v is the (v + 1)th.
        in_ns(&format!("version {version} applied"), &|| {
            service_relists() > u64::from(version)
        });
    }
    std::thread::sleep(SETTLE);
    let round = Round {
        ready_ms,
        rss_ready_mib,
        peak_mib,
        rss_after_reloads_mib: proc_memory_mib(pid, "VmRSS"),
        peak_after_reloads_mib: proc_memory_mib(pid, "VmHWM"),
    };
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "SIGTERM the agent");
    drop(child);
    // The pins outlive the agent by design: remove them with the namespace's bpffs.
    drop(bpffs);
    round
}

/// Replaces `path` by renaming a complete new file over it.
fn replace(path: &Path, text: &str) {
    let next = path.with_extension("next");
    std::fs::write(&next, text).expect("write the next version");
    std::fs::rename(&next, path).expect("rename it over the file");
}

/// `kovn_source_relists_total{kind="Service"}`: versions of the file the source has read.
fn service_relists() -> u64 {
    http_body("/metrics")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("kovn_source_relists") && l.contains("kind=\"Service\""))
        .and_then(|l| l.split_whitespace().last()?.parse().ok())
        .unwrap_or(0)
}

fn http_status(path: &str) -> Option<u16> {
    http::get(ADDR, path).map(|(code, _)| code)
}

fn http_body(path: &str) -> Option<String> {
    http::get(ADDR, path).map(|(_, body)| body)
}
