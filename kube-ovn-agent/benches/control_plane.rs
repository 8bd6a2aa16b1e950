//! Control-plane benchmark (issue: agent; issue: benchmark §5). Needs root.
//!
//! 1. The real agent binary, `--source kube`, against `testing::apiserver` (the list/watch wire
//!    protocol) inside a private network namespace: time from process start to `/readyz`
//!    (fully programmed maps), resident memory, and the latency from a Service MODIFIED event
//!    leaving the API server to the new ClusterIP:port entry being readable in the pinned map.
//! 2. The same state written by the agent's map sync from nothing, and one change, against
//!    `ipset restore` + `iptables-restore` of Kube-OVN's equivalent sets and chain.
//!
//! Cold starts are repeated (`COLD_ROUNDS`), each round starting the agent afresh and then
//! restoring the same state with ipset/iptables, so the end-to-end comparison is per round and
//! from one run. Objects carry what real ones carry and the agent must parse and drop
//! (`realistic`): managedFields, last-applied annotations, labels, and on Nodes an image list and
//! conditions. A burst of [`BURST`] Service changes measures how fast a rollout's worth of events
//! reaches the maps. CPU is the scheduler's ns accounting (`/proc/<pid>/task/*/schedstat`).
//!
//! Run through `cargo xtask bench control-plane [--quick]`; writes JSON (schema in BENCHMARKS.md).

use std::{
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, TcpStream},
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use aya::maps::{HashMap, Map, MapData};
use k8s_openapi::{
    api::core::v1::{ContainerImage, NodeCondition, Service},
    apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry, ObjectMeta},
};
use kube_ovn_agent::{
    cluster::{Kind, Object, ObjectChange, Snapshot},
    state::MapState,
    testing::{
        TestDatapath,
        apiserver::{ApiServer, Resource},
        missing_privilege,
        netns::{Bpffs, NetNs, TempPath},
        objects::{Port, node, service, subnet},
        stats::{
            BenchArgs, Percentiles, Spread, loadavg, machine_facts, percentiles, proc_memory_mib,
            spread,
        },
    },
    translate::{Incremental, KubeProxySets, NodeFacts, Options, translate},
};
use kube_ovn_ebpf_common::{ServicePortV4, ipproto, names};
use serde::Serialize;

const AGENT: &str = env!("CARGO_BIN_EXE_kube-ovn-agent");
const METRICS_PORT: u16 = 19_664;
const SUBNETS: usize = 1_000;
const NODES: usize = 1_000;
/// Agent cold starts (each followed by an `ipset restore` + `iptables-restore` of the same state)
/// per scale.
const COLD_ROUNDS: usize = 5;
/// Service changes applied back to back in one burst.
const BURST: usize = 100;
/// Container images a Node reports in `status.images` (kubelet reports up to 50 by default).
const NODE_IMAGES: usize = 50;

#[derive(Serialize)]
struct Report {
    kernel: String,
    cores: usize,
    /// Kernel, cores, load, the CPU vulnerability mitigations in force.
    machine: serde_json::Value,
    /// Mean JSON size of one object as served, per kind.
    object_bytes: ObjectBytes,
    results: Vec<Scale>,
}

#[derive(Serialize)]
struct ObjectBytes {
    service: usize,
    node: usize,
    subnet: usize,
    node_images: usize,
}

#[derive(Serialize)]
struct Scale {
    services: usize,
    service_ports: usize,
    subnets: usize,
    nodes: usize,
    /// Agent process start → `/readyz` (every kind listed, maps programmed), the first of
    /// `cold_start_rounds_ms`.
    cold_start_ms: f64,
    /// Every round's cold start, and its spread.
    cold_start_rounds_ms: Vec<f64>,
    cold_start_spread_ms: Spread,
    /// `ipset restore` + `iptables-restore` from nothing, the same rounds (paired with the cold
    /// starts above).
    restore_rounds_ms: Vec<f64>,
    /// Per round: restore time / agent cold start (> 1: the agent is ready sooner).
    restore_over_agent_cold: Vec<f64>,
    restore_over_agent_cold_spread: Spread,
    /// A burst of `BURST` Service changes applied back to back → every new entry readable, one
    /// per round.
    burst_ms: Vec<f64>,
    burst_spread_ms: Spread,
    burst_changes: usize,
    /// Where the agent's cold starts spent their time (its `/status` `startup` phases): per
    /// phase, the median (min–max) over the rounds of its duration, and of when it started
    /// (ms after the agent's `main`). `exec_and_poll` is the rest of the measured time (process
    /// spawn before `main`, and this benchmark's 2 ms `/readyz` poll).
    cold_phases: Vec<PhaseSpread>,
    /// The agent's own CPU time (user + system, all threads, schedstat) from spawn to ready:
    /// what of the cold start is the agent's work rather than waiting for the API server
    /// (which shares the machine's cores here).
    cold_start_agent_cpu_ms: Spread,
    restart_agent_cpu_ms: Spread,
    /// A restart on the same pins and API server after each round's cold start (the pinned
    /// program is reused, not loaded): process start → `/readyz`, per round.
    restart_rounds_ms: Vec<f64>,
    restart_spread_ms: Spread,
    /// Per round: restore time / agent restart.
    restore_over_agent_restart_spread: Spread,
    /// What the restarts said about their program (`reused` expected), per round.
    restart_program: Vec<String>,
    restart_phases: Vec<PhaseSpread>,
    /// Resident memory after the first full sync and after the change series.
    rss_mib_ready: f64,
    rss_mib_after_changes: f64,
    /// The agent's peak resident memory (`VmHWM`) at the end of the first round.
    rss_hwm_mib: f64,
    /// Kernel memory of the agent's pinned maps after the first full sync: the sum of their
    /// `memlock` (fdinfo), which is what is charged to the pod's memory cgroup (≥ 5.11).
    kernel_map_mib: f64,
    /// Service MODIFIED event sent → new entry readable in the pinned map.
    change_to_map_ms: Percentiles,
    /// Every sample of the above, in order.
    change_to_map_samples_ms: Vec<f64>,
    /// The agent's own view (its histograms' means): one reconcile pass, and event receipt →
    /// map write.
    agent_sync_mean_ms: f64,
    agent_event_to_write_mean_ms: f64,
    /// The agent's user + system CPU time over the change series, per change.
    agent_cpu_per_change_ms: f64,
    changes: usize,
    /// Rounds of the cold measurements below, interleaved (map, ipset, map, ipset …).
    cold_rounds: usize,
    /// Translating the snapshot into desired map state (in-process).
    translate_ms: Spread,
    /// Writing that state into freshly loaded, empty maps with the agent's sync (in-process).
    map_write_cold_ms: Spread,
    /// One Service port changed: the incremental translation of that object + the write of
    /// the keys it touched (what the agent does per change).
    map_sync_one_change_ms: Percentiles,
    /// `ipset restore` of Kube-OVN's and kube-proxy's equivalent sets + `iptables-restore` of
    /// the OVN-PREROUTING chain, from nothing (each round in a new namespace).
    ipset_iptables_cold_ms: Spread,
    /// One entry swapped with `ipset restore` (what felix/kube-proxy do for a change).
    ipset_one_change_ms: Percentiles,
}

#[derive(Serialize)]
struct PhaseSpread {
    name: String,
    took_ms: Spread,
    start_ms: Spread,
}

/// One phase of one start, from `/status`.
#[derive(Clone)]
struct Phase {
    name: String,
    took_ms: f64,
    start_ms: f64,
}

/// Per phase name (in the first round's order), the spread over the rounds.
fn phase_spreads(rounds: &[Vec<Phase>]) -> Vec<PhaseSpread> {
    let Some(first) = rounds.first() else {
        return Vec::new();
    };
    first
        .iter()
        .map(|p| {
            let of = |f: fn(&Phase) -> f64| {
                spread(
                    rounds
                        .iter()
                        .filter_map(|r| r.iter().find(|q| q.name == p.name).map(f))
                        .collect(),
                )
            };
            PhaseSpread {
                name: p.name.clone(),
                took_ms: of(|q| q.took_ms),
                start_ms: of(|q| q.start_ms),
            }
        })
        .collect()
}

/// The startup phases of the agent's `/status`, plus `exec_and_poll`: `total_ms` (what the
/// benchmark measured) minus where the agent's `ready` phase ended.
fn startup_phases(status: &serde_json::Value, total_ms: f64) -> (String, Vec<Phase>) {
    let startup = &status["startup"];
    let ms = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN) / 1e3;
    let mut phases: Vec<Phase> = startup["phases"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| Phase {
                    name: p["name"].as_str().unwrap_or("?").to_owned(),
                    took_ms: ms(&p["took_us"]),
                    start_ms: ms(&p["start_us"]),
                })
                .collect()
        })
        .unwrap_or_default();
    let end = phases
        .iter()
        .map(|p| p.start_ms + p.took_ms)
        .fold(0.0, f64::max);
    phases.push(Phase {
        name: "exec_and_poll".into(),
        took_ms: total_ms - end,
        start_ms: end,
    });
    (
        startup["program"].as_str().unwrap_or("?").to_owned(),
        phases,
    )
}

fn cluster_ip(i: usize) -> Ipv4Addr {
    let [_, a, b, c] = u32::try_from(i).expect("small").to_be_bytes();
    Ipv4Addr::new(10, 96 + a, b, c)
}

/// `services` Services with two TCP ports each (every tenth a NodePort with ETP=Local),
/// `SUBNETS` default-VPC Subnets and `NODES` Nodes; node `n0` is this node (192.168.0.11).
fn synthetic(services: usize) -> Snapshot {
    let mut s = Snapshot::default();
    for i in 0..SUBNETS {
        let [_, _, b, c] = u32::try_from(i).expect("small").to_be_bytes();
        s.subnets.push(Arc::new(subnet(
            &format!("subnet-{i}"),
            &format!("10.{}.{}.0/24", 16 + b, c),
        )));
    }
    s.nodes.push(Arc::new(node("n0", &["192.168.0.11"])));
    for i in 1..NODES {
        let [_, _, b, c] = u32::try_from(i).expect("small").to_be_bytes();
        s.nodes.push(Arc::new(node(
            &format!("n{i}"),
            &[&format!("172.16.{b}.{c}")],
        )));
    }
    for i in 0..services {
        let ip = cluster_ip(i).to_string();
        let svc = if i % 10 == 0 {
            let node_port = 30_000 + i32::try_from(i / 10 % 2_000).expect("small");
            service(
                &format!("bench/svc-{i}"),
                "NodePort",
                &[&ip],
                &[
                    Port("TCP", 80, Some(node_port)),
                    Port("TCP", 443, Some(node_port + 2_000)),
                ],
                true,
            )
        } else {
            service(
                &format!("bench/svc-{i}"),
                "ClusterIP",
                &[&ip],
                &[Port("TCP", 80, None), Port("TCP", 443, None)],
                false,
            )
        };
        s.services.push(Arc::new(svc));
    }
    s
}

/// What real objects carry besides the fields the agent reads: labels, a
/// `kubectl.kubernetes.io/last-applied-configuration` annotation and the managedFields of two
/// managers on every object; on Nodes also `NODE_IMAGES` images and the five standard
/// conditions. The agent receives all of it over the wire and drops it in its watchers
/// (`.modify()`), so parsing it is part of every cold start and every event.
fn realistic(snapshot: &mut Snapshot) {
    for svc in &mut snapshot.services {
        decorate(&mut Arc::make_mut(svc).metadata, "Service");
    }
    for subnet in &mut snapshot.subnets {
        decorate(&mut Arc::make_mut(subnet).metadata, "Subnet");
    }
    for (n, node) in snapshot.nodes.iter_mut().enumerate() {
        let node = Arc::make_mut(node);
        decorate(&mut node.metadata, "Node");
        let status = node.status.get_or_insert_with(Default::default);
        status.images = Some(
            (0..NODE_IMAGES)
                .map(|i| ContainerImage {
                    names: Some(vec![
                        format!(
                            "registry.example.com/team-{i}/service-{i}@sha256:{:064x}",
                            n * NODE_IMAGES + i
                        ),
                        format!("registry.example.com/team-{i}/service-{i}:v1.{i}.{n}"),
                    ]),
                    size_bytes: Some(50_000_000 + i64::try_from(i).expect("small") * 1_000_000),
                })
                .collect(),
        );
        status.conditions = Some(
            [
                ("MemoryPressure", "False", "KubeletHasSufficientMemory"),
                ("DiskPressure", "False", "KubeletHasNoDiskPressure"),
                ("PIDPressure", "False", "KubeletHasSufficientPID"),
                ("Ready", "True", "KubeletReady"),
                ("NetworkUnavailable", "False", "RouteCreated"),
            ]
            .into_iter()
            .map(|(type_, status, reason)| NodeCondition {
                type_: type_.into(),
                status: status.into(),
                reason: Some(reason.into()),
                message: Some(format!("kubelet reports {reason}")),
                ..NodeCondition::default()
            })
            .collect(),
        );
    }
}

fn decorate(meta: &mut ObjectMeta, kind: &str) {
    let name = meta.name.clone().unwrap_or_default();
    let labels: std::collections::BTreeMap<String, String> = [
        ("app.kubernetes.io/name", name.as_str()),
        ("app.kubernetes.io/instance", "bench"),
        ("app.kubernetes.io/managed-by", "Helm"),
        ("helm.sh/chart", "bench-1.2.3"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let applied = serde_json::json!({
        "apiVersion": "v1", "kind": kind,
        "metadata": {"name": name, "namespace": meta.namespace, "labels": labels},
        "spec": {"note": "the manifest as last applied, as kubectl stores it"},
    });
    meta.labels
        .get_or_insert_with(Default::default)
        .extend(labels);
    meta.annotations
        .get_or_insert_with(Default::default)
        .insert(
            "kubectl.kubernetes.io/last-applied-configuration".into(),
            applied.to_string(),
        );
    let fields = |manager: &str| ManagedFieldsEntry {
        api_version: Some("v1".into()),
        fields_type: Some("FieldsV1".into()),
        fields_v1: Some(FieldsV1(serde_json::json!({
            "f:metadata": {
                "f:annotations": {".": {}, "f:kubectl.kubernetes.io/last-applied-configuration": {}},
                "f:labels": {".": {}, "f:app.kubernetes.io/instance": {}, "f:app.kubernetes.io/managed-by": {}, "f:app.kubernetes.io/name": {}, "f:helm.sh/chart": {}},
            },
            "f:spec": {"f:ports": {".": {}, "k:{\"port\":80,\"protocol\":\"TCP\"}": {".": {}, "f:name": {}, "f:port": {}, "f:protocol": {}, "f:targetPort": {}}}, "f:selector": {}, "f:sessionAffinity": {}, "f:type": {}},
            "f:status": {"f:conditions": {}, "f:images": {}},
        }))),
        manager: Some(manager.into()),
        operation: Some("Update".into()),
        ..ManagedFieldsEntry::default()
    };
    meta.managed_fields = Some(vec![
        fields("kubectl-client-side-apply"),
        fields("kube-controller-manager"),
    ]);
}

/// Mean JSON size of the first objects of each kind, as the API server sends them.
fn measure_objects(snapshot: &Snapshot) -> ObjectBytes {
    fn mean<T: Serialize>(objects: &[Arc<T>]) -> usize {
        let sample = &objects[..objects.len().min(100)];
        sample
            .iter()
            .map(|o| serde_json::to_vec(o.as_ref()).expect("JSON").len())
            .sum::<usize>()
            / sample.len().max(1)
    }
    ObjectBytes {
        service: mean(&snapshot.services),
        node: mean(&snapshot.nodes),
        subnet: mean(&snapshot.subnets),
        node_images: NODE_IMAGES,
    }
}

#[expect(clippy::too_many_lines, reason = "one linear measurement script")]
fn main() {
    let BenchArgs {
        list,
        quick,
        out,
        scales,
    } = BenchArgs::from_env(
        "control-plane",
        &[1_000, 10_000],
        // The traffic benchmark's scale sweep.
        &[10, 1_000, 10_000, 100_000],
    );
    if list {
        return;
    }
    if let Some(why) = missing_privilege() {
        eprintln!("*** SKIPPING the control-plane benchmark: {why} ***");
        std::process::exit(i32::from(kube_ovn_agent::testing::privilege_required()));
    }
    let changes = if quick { 40 } else { 200 };
    let cold_rounds = COLD_ROUNDS;
    let load_before = loadavg();

    let mut results = Vec::new();
    let mut object_bytes = None;
    for &services in &scales {
        eprintln!("control plane: {services} Services …");
        let mut snapshot = synthetic(services);
        realistic(&mut snapshot);
        object_bytes.get_or_insert_with(|| measure_objects(&snapshot));
        let (mut translations, mut writes, mut restores) = (vec![], vec![], vec![]);
        let (mut colds, mut bursts) = (vec![], vec![]);
        let (mut cold_phases, mut restarts, mut restart_phases, mut restart_program) =
            (vec![], vec![], vec![], vec![]);
        let (mut cold_cpu, mut restart_cpu) = (vec![], vec![]);
        let mut first = None;
        for round in 0..cold_rounds {
            // The change series runs once; every round measures a cold start and a burst.
            let agent = agent_run(&snapshot, if round == 0 { changes } else { 0 });
            colds.push(agent.cold_start_ms);
            bursts.push(agent.burst_ms);
            cold_phases.push(agent.cold_phases.clone());
            cold_cpu.push(agent.cold_cpu_ms);
            restart_cpu.push(agent.restart_cpu_ms);
            restarts.push(agent.restart_ms);
            restart_phases.push(agent.restart_phases.clone());
            restart_program.push(agent.restart_program.clone());
            first.get_or_insert(agent);
            let (translate_ms, write_ms) = map_cold(&snapshot);
            translations.push(translate_ms);
            writes.push(write_ms);
            restores.push(ipset_cold(&snapshot));
        }
        let agent = first.expect("at least one round");
        let ratios: Vec<f64> = restores.iter().zip(&colds).map(|(r, c)| r / c).collect();
        let restart_ratios: Vec<f64> = restores.iter().zip(&restarts).map(|(r, c)| r / c).collect();
        let map_sync_one_change_ms = map_changes(&snapshot, changes);
        let ipset_one_change_ms = ipset_changes(&snapshot, changes);
        results.push(Scale {
            services,
            service_ports: services * 2,
            subnets: SUBNETS,
            nodes: NODES,
            cold_start_ms: agent.cold_start_ms,
            cold_start_spread_ms: spread(colds.clone()),
            cold_start_rounds_ms: colds,
            restore_rounds_ms: restores.clone(),
            restore_over_agent_cold_spread: spread(ratios.clone()),
            restore_over_agent_cold: ratios,
            burst_spread_ms: spread(bursts.clone()),
            burst_ms: bursts,
            burst_changes: BURST,
            cold_phases: phase_spreads(&cold_phases),
            cold_start_agent_cpu_ms: spread(cold_cpu),
            restart_agent_cpu_ms: spread(restart_cpu),
            restart_spread_ms: spread(restarts.clone()),
            restart_rounds_ms: restarts,
            restore_over_agent_restart_spread: spread(restart_ratios),
            restart_program,
            restart_phases: phase_spreads(&restart_phases),
            rss_hwm_mib: agent.rss_hwm,
            rss_mib_ready: agent.rss_ready,
            kernel_map_mib: agent.kernel_map_mib,
            rss_mib_after_changes: agent.rss_after,
            change_to_map_ms: percentiles(agent.latencies.clone()),
            change_to_map_samples_ms: agent.latencies,
            agent_sync_mean_ms: agent.sync_mean_ms,
            agent_event_to_write_mean_ms: agent.agent_event_mean_ms,
            agent_cpu_per_change_ms: agent.cpu_per_change_ms,
            changes,
            cold_rounds,
            translate_ms: spread(translations),
            map_write_cold_ms: spread(writes),
            map_sync_one_change_ms,
            ipset_iptables_cold_ms: spread(restores),
            ipset_one_change_ms,
        });
    }
    let report = Report {
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or_else(|_| "unknown".into(), |s| s.trim().to_owned()),
        cores: std::thread::available_parallelism().map_or(0, usize::from),
        machine: machine_facts(load_before),
        object_bytes: object_bytes.expect("at least one scale"),
        results,
    };
    print_table(&report);
    if let Some(dir) = std::path::Path::new(&out).parent() {
        std::fs::create_dir_all(dir).expect("create the output directory");
    }
    std::fs::write(&out, serde_json::to_string_pretty(&report).expect("JSON")).expect("write JSON");
    println!("\nwrote {out}");
}

fn print_table(r: &Report) {
    println!("\ncontrol plane (kernel {}, {} cores)", r.kernel, r.cores);
    println!(
        "{:>9} {:>11} {:>9} {:>12} {:>22} {:>22}",
        "services",
        "cold start",
        "RSS",
        "RSS after",
        "event→map p50/p99/max",
        "agent pass / event→write",
    );
    for s in &r.results {
        println!(
            "{:>9} {:>9.0}ms {:>6.1}MiB {:>9.1}MiB {:>8.2}/{:.2}/{:.2} ms {:>16.2} / {:.2} ms {:>11.2} ms",
            s.services,
            s.cold_start_ms,
            s.rss_mib_ready,
            s.rss_mib_after_changes,
            s.change_to_map_ms.p50,
            s.change_to_map_ms.p99,
            s.change_to_map_ms.max,
            s.agent_sync_mean_ms,
            s.agent_event_to_write_mean_ms,
            s.agent_cpu_per_change_ms,
        );
    }
    for s in &r.results {
        println!(
            "{:>9} Services: kernel maps {:.1} MiB (memlock of the pinned maps)",
            s.services, s.kernel_map_mib
        );
    }
    let range = |x: &Spread| format!("{:.1} ({:.1}–{:.1})", x.median, x.min, x.max);
    println!(
        "\nfrom nothing, median (min–max) of {} interleaved rounds; one change p50/p99 of {}",
        r.results.first().map_or(0, |s| s.cold_rounds),
        r.results.first().map_or(0, |s| s.changes),
    );
    println!(
        "{:>9} {:>20} {:>20} {:>22} {:>18} {:>20}",
        "services",
        "translate ms",
        "map write ms",
        "ipset+iptables ms",
        "map change ms",
        "ipset change ms",
    );
    for s in &r.results {
        println!(
            "{:>9} {:>20} {:>20} {:>22} {:>8.3}/{:<9.3} {:>9.2}/{:.2}",
            s.services,
            range(&s.translate_ms),
            range(&s.map_write_cold_ms),
            range(&s.ipset_iptables_cold_ms),
            s.map_sync_one_change_ms.p50,
            s.map_sync_one_change_ms.p99,
            s.ipset_one_change_ms.p50,
            s.ipset_one_change_ms.p99,
        );
    }
    println!(
        "\nend to end, per round (agent start → ready, then ipset restore + iptables-restore of the same state), median (min–max) of {} rounds",
        r.results.first().map_or(0, |s| s.cold_rounds),
    );
    println!(
        "{:>9} {:>24} {:>24} {:>22} {:>26}",
        "services", "agent ready ms", "restore ms", "restore / agent", "burst of 100 → maps ms",
    );
    for s in &r.results {
        println!(
            "{:>9} {:>24} {:>24} {:>22} {:>26}",
            s.services,
            range(&s.cold_start_spread_ms),
            range(&s.ipset_iptables_cold_ms),
            format!(
                "{:.2} ({:.2}–{:.2})",
                s.restore_over_agent_cold_spread.median,
                s.restore_over_agent_cold_spread.min,
                s.restore_over_agent_cold_spread.max
            ),
            range(&s.burst_spread_ms),
        );
    }
    print_startup(r);
    println!("\ntargets (reported, not asserted):");
    for s in r.results.iter().filter(|s| s.services == 10_000) {
        let verdict = |ok: bool| if ok { "met" } else { "missed" };
        println!(
            "  10 000 Services: ready ≥ 2× faster than the restore: {} (restore/agent {:.2}, min {:.2}); one change p99 {:.2} ms (≤ 2 ms: {}); burst of {} {:.1} ms (≤ 20 ms: {})",
            verdict(s.restore_over_agent_cold_spread.min >= 2.0),
            s.restore_over_agent_cold_spread.median,
            s.restore_over_agent_cold_spread.min,
            s.change_to_map_ms.p99,
            verdict(s.change_to_map_ms.p99 <= 2.0),
            s.burst_changes,
            s.burst_spread_ms.median,
            verdict(s.burst_spread_ms.max <= 20.0),
        );
    }
}
/// The restart beside the cold start, and where each spent its time.
fn print_startup(r: &Report) {
    let range = |x: &Spread| format!("{:.1} ({:.1}–{:.1})", x.median, x.min, x.max);
    for s in &r.results {
        println!(
            "{:>9} Services: agent CPU to ready {} ms (restart {} ms); restart (pinned program {:?}) → ready {} ms, restore / restart {:.2} ({:.2}–{:.2}); peak RSS {:.1} MiB",
            s.services,
            range(&s.cold_start_agent_cpu_ms),
            range(&s.restart_agent_cpu_ms),
            s.restart_program,
            range(&s.restart_spread_ms),
            s.restore_over_agent_restart_spread.median,
            s.restore_over_agent_restart_spread.min,
            s.restore_over_agent_restart_spread.max,
            s.rss_hwm_mib,
        );
        for (what, phases) in [
            ("cold start", &s.cold_phases),
            ("restart", &s.restart_phases),
        ] {
            let line: Vec<String> = phases
                .iter()
                .map(|p| format!("{} {}", p.name, range(&p.took_ms)))
                .collect();
            println!("          {what} phases (ms): {}", line.join(", "));
        }
    }
}

struct AgentRun {
    cold_start_ms: f64,
    cold_cpu_ms: f64,
    restart_cpu_ms: f64,
    cold_phases: Vec<Phase>,
    restart_ms: f64,
    restart_program: String,
    restart_phases: Vec<Phase>,
    rss_hwm: f64,
    burst_ms: f64,
    rss_ready: f64,
    kernel_map_mib: f64,
    rss_after: f64,
    latencies: Vec<f64>,
    sync_mean_ms: f64,
    agent_event_mean_ms: f64,
    cpu_per_change_ms: f64,
}

/// The agent process, killed if the benchmark panics before stopping it, so a failed run leaves
/// no agent behind.
struct KillOnDrop(std::process::Child);

impl KillOnDrop {
    fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The agent against the API server, both inside one private namespace.
#[expect(clippy::too_many_lines, reason = "one linear measurement script")]
fn agent_run(snapshot: &Snapshot, changes: usize) -> AgentRun {
    let ns = NetNs::new("kovn-cpb-").expect("create namespace");
    ns.sh("ip link add name eth0 type veth peer name peer0 && ip addr add 192.168.0.11/16 dev eth0 && ip link set eth0 up && ip link set peer0 up").expect("shell in namespace");
    let bpffs = Bpffs::mount();
    let runtime = ns
        .enter(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("runtime")
        })
        .expect("enter namespace");
    // The runtime's worker threads were spawned inside the namespace, so its sockets live there.
    let server = ns
        .enter(|| runtime.block_on(ApiServer::start(&[])))
        .expect("enter namespace");
    {
        let mut cluster = server.cluster();
        for s in &snapshot.subnets {
            cluster.apply(Resource::Subnets, s.as_ref());
        }
        for n in &snapshot.nodes {
            cluster.apply(Resource::Nodes, n.as_ref());
        }
        for s in &snapshot.services {
            cluster.apply(Resource::Services, s.as_ref());
        }
        cluster.warm_lists();
    }
    let kubeconfig = TempPath::new("kovn-cpb-kubeconfig-", "yaml");
    std::fs::write(
        &*kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: bench\n  cluster:\n    server: {}\nusers:\n- name: bench\n  user: {{}}\ncontexts:\n- name: bench\n  context:\n    cluster: bench\n    user: bench\ncurrent-context: bench\n",
            server.url()
        ),
    )
    .expect("kubeconfig");

    let (mut child, cold_start_ms) = start_agent(&ns, &bpffs, &kubeconfig);
    let cold_cpu_ms = cpu_ms(child.id());
    let (_, cold_phases) = ns
        .enter(|| http_body("/status"))
        .expect("enter namespace")
        .and_then(|body| json_body(&body))
        .map(|status| startup_phases(&status, cold_start_ms))
        .unwrap_or_default();
    let rss_ready = proc_memory_mib(child.id(), "VmRSS");
    let kernel_map_mib = map_memlock_mib(&bpffs.root().join("maps"));

    let map_path = bpffs.root().join("maps").join(names::SERVICE_PORTS_V4);
    let map: HashMap<MapData, ServicePortV4, u8> =
        Map::from_map_data(MapData::from_pin(&map_path).expect("pinned map"))
            .expect("map")
            .try_into()
            .expect("hash map");
    let before = ns
        .enter(|| http_body("/metrics"))
        .expect("enter namespace")
        .unwrap_or_default();
    let cpu_before = cpu_ms(child.id());
    let mut latencies = Vec::with_capacity(changes);
    for i in 0..changes {
        // Spread over the Services, wrapping on small scales (each change is a new port).
        let index = (i * 7 + 1) % snapshot.services.len();
        let mut svc: Service = snapshot.services[index].as_ref().clone();
        let port = 20_000 + u16::try_from(i).expect("small");
        svc.spec
            .as_mut()
            .expect("spec")
            .ports
            .as_mut()
            .expect("ports")[0]
            .port = i32::from(port);
        let key = ServicePortV4 {
            addr: cluster_ip(index).octets(),
            port,
            proto: ipproto::TCP,
            pad: 0,
        };
        let sent = Instant::now();
        server.cluster().apply(Resource::Services, &svc);
        let deadline = sent + Duration::from_secs(10);
        // Polled, not spun: a spinning reader would take a core from the agent on a small
        // machine and measure the contention instead.
        while map.get(&key, 0).is_err() {
            assert!(
                Instant::now() < deadline,
                "change {i} never reached the map"
            );
            std::thread::sleep(Duration::from_micros(50));
        }
        latencies.push(sent.elapsed().as_secs_f64() * 1e3);
        // Let the write settle before the next event, like independent user changes.
        std::thread::sleep(Duration::from_millis(5));
    }
    let rss_after = proc_memory_mib(child.id(), "VmRSS");
    // Includes the periodic work of the interval (health, polls), so an upper bound per change.
    let cpu_per_change_ms =
        (cpu_ms(child.id()) - cpu_before) / f64::from(u32::try_from(changes).expect("few changes"));
    let after = ns
        .enter(|| http_body("/metrics"))
        .expect("enter namespace")
        .unwrap_or_default();
    // Means over the change series only: the histograms' sum and count deltas.
    let mean = |name: &str| -> f64 {
        let value = |text: &str, suffix: &str| {
            text.lines()
                .find(|l| l.starts_with(&format!("{name}_{suffix} ")))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(f64::NAN)
        };
        let sum = value(&after, "sum") - value(&before, "sum");
        let count = value(&after, "count") - value(&before, "count");
        sum / count * 1e3
    };
    let sync_mean_ms = mean("kovn_sync_duration_seconds");
    let agent_event_mean_ms = mean("kovn_event_to_map_write_seconds");
    // A burst: `BURST` changes back to back (a rollout touching many Services), timed until
    // the last service's newest entry is readable. A Service changed twice in the burst (small
    // scales) must show its last port.
    let mut pending = std::collections::BTreeMap::new();
    let burst_sent = Instant::now();
    for j in 0..BURST {
        let index = (j * 13 + 3) % snapshot.services.len();
        let mut svc: Service = snapshot.services[index].as_ref().clone();
        let port = 40_000 + u16::try_from(j).expect("small");
        svc.spec
            .as_mut()
            .expect("spec")
            .ports
            .as_mut()
            .expect("ports")[0]
            .port = i32::from(port);
        server.cluster().apply(Resource::Services, &svc);
        pending.insert(
            index,
            ServicePortV4 {
                addr: cluster_ip(index).octets(),
                port,
                proto: ipproto::TCP,
                pad: 0,
            },
        );
    }
    let deadline = burst_sent + Duration::from_secs(30);
    while !pending.is_empty() {
        pending.retain(|_, key| map.get(key, 0).is_err());
        assert!(
            Instant::now() < deadline,
            "{} burst changes never reached the map",
            pending.len()
        );
        std::thread::sleep(Duration::from_micros(50));
    }
    let burst_ms = burst_sent.elapsed().as_secs_f64() * 1e3;
    let rss_hwm = proc_memory_mib(child.id(), "VmHWM");
    stop(&mut child);
    // A restart on the same pins: the program pinned above is this build's.
    let (mut child, restart_ms) = start_agent(&ns, &bpffs, &kubeconfig);
    let restart_cpu_ms = cpu_ms(child.id());
    let (restart_program, restart_phases) = ns
        .enter(|| http_body("/status"))
        .expect("enter namespace")
        .and_then(|body| json_body(&body))
        .map(|status| startup_phases(&status, restart_ms))
        .unwrap_or_default();
    stop(&mut child);
    let _ = ns
        .command(AGENT)
        .arg("detach")
        .arg("--bpffs-root")
        .arg(bpffs.root())
        .output();
    drop(server);
    drop(runtime);
    AgentRun {
        cold_start_ms,
        cold_cpu_ms,
        restart_cpu_ms,
        cold_phases,
        restart_ms,
        restart_program,
        restart_phases,
        rss_hwm,
        burst_ms,
        rss_ready,
        kernel_map_mib,
        rss_after,
        latencies,
        sync_mean_ms,
        agent_event_mean_ms,
        cpu_per_change_ms,
    }
}

/// Starts the agent against the API server of `kubeconfig` on `bpffs`; returns it once
/// `/readyz` answers 200, with the time that took (process spawn → ready).
fn start_agent(ns: &NetNs, bpffs: &Bpffs, kubeconfig: &TempPath) -> (KillOnDrop, f64) {
    let started = Instant::now();
    let child = ns
        .command(AGENT)
        .args([
            "run",
            "--source",
            "kube",
            "--node-name",
            "n0",
            "--kube-proxy-mode",
            "ipvs",
            "--log-level",
            "warn",
        ])
        .arg("--metrics-addr")
        .arg(format!("127.0.0.1:{METRICS_PORT}"))
        .arg("--bpffs-root")
        .arg(bpffs.root())
        .env("KUBECONFIG", &**kubeconfig)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map(KillOnDrop)
        .expect("start the agent");
    let ready = ns
        .enter(|| {
            let deadline = Instant::now() + Duration::from_mins(2);
            while Instant::now() < deadline {
                if http_status("/readyz") == Some(200) {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            false
        })
        .expect("enter namespace");
    assert!(ready, "the agent did not become ready within 2 minutes");
    (child, started.elapsed().as_secs_f64() * 1e3)
}

fn stop(child: &mut KillOnDrop) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.0.wait();
}

/// The JSON body of an HTTP/1.0 response.
fn json_body(response: &str) -> Option<serde_json::Value> {
    let (_, body) = response.split_once("\r\n\r\n")?;
    serde_json::from_str(body).ok()
}

fn http_status(path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(("127.0.0.1", METRICS_PORT)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\n\r\n").ok()?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

fn http_body(path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", METRICS_PORT)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\n\r\n").ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    Some(text)
}

/// CPU time of every thread of a process, in milliseconds, from the scheduler's ns accounting
/// (`/proc/<pid>/task/*/schedstat`), not the 10 ms ticks of `/proc/<pid>/stat`.
fn cpu_ms(pid: u32) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return f64::NAN;
    };
    let ns: u64 = tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    #[expect(clippy::cast_precision_loss, reason = "ns of a benchmark run fit f64")]
    let ns = ns as f64;
    ns / 1e6
}

/// The summed `memlock` of every map pinned under `dir`, from this process's fdinfo of each.
fn map_memlock_mib(dir: &std::path::Path) -> f64 {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let mut bytes = 0u64;
    for entry in std::fs::read_dir(dir)
        .expect("the agent's map pins")
        .flatten()
    {
        let Ok(map) = MapData::from_pin(entry.path()) else {
            continue;
        };
        let fd = map.fd().as_fd().as_raw_fd();
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap_or_default();
        bytes += info
            .lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    #[expect(clippy::cast_precision_loss, reason = "MiB of maps fit f64")]
    let bytes = bytes as f64;
    bytes / (1024.0 * 1024.0)
}

fn options() -> Options {
    Options {
        kube_proxy_sets: KubeProxySets::IPVS,
        ..Options::default()
    }
}

fn facts() -> NodeFacts {
    NodeFacts {
        node_name: "n0".into(),
        local_v4: ["192.168.0.11/32".parse().expect("CIDR")].into(),
        ..NodeFacts::default()
    }
}

/// The agent's translate, then its map sync into freshly loaded maps, in-process.
fn map_cold(snapshot: &Snapshot) -> (f64, f64) {
    let mut dp = TestDatapath::load();
    let started = Instant::now();
    let translation = translate(snapshot, &facts(), &options());
    let translated = started.elapsed().as_secs_f64() * 1e3;
    let started = Instant::now();
    dp.apply(&translation.desired);
    (translated, started.elapsed().as_secs_f64() * 1e3)
}

/// Single Service port changes after a full sync, as the agent applies them: the changed
/// object into the incremental translation, then only the touched keys written.
fn map_changes(snapshot: &Snapshot, changes: usize) -> Percentiles {
    let mut dp = TestDatapath::load();
    let mut engine = Incremental::default();
    engine.reset(snapshot);
    let step = engine.translate(&facts(), &options());
    assert!(step.full, "the first step writes everything");
    dp.apply(engine.desired());
    let mut samples = Vec::with_capacity(changes);
    for i in 0..changes {
        let index = (i * 7 + 1) % snapshot.services.len();
        let mut svc: Service = snapshot.services[index].as_ref().clone();
        svc.spec
            .as_mut()
            .expect("spec")
            .ports
            .as_mut()
            .expect("ports")[0]
            .port = 20_000 + i32::try_from(i).expect("small");
        let change = ObjectChange {
            kind: Kind::Service,
            key: format!("bench/svc-{index}"),
            object: Some(Object::Service(Arc::new(svc))),
        };
        let started = Instant::now();
        engine.apply(change);
        let step = engine.translate(&facts(), &options());
        let report = dp.tables.apply_touched(engine.desired(), &step.touched);
        samples.push(started.elapsed().as_secs_f64() * 1e3);
        assert!(!step.full, "a Service change is incremental");
        assert_eq!((report.written, report.removed), (1, 1), "one port changed");
    }
    percentiles(samples)
}

/// Kube-OVN's ipsets plus kube-proxy's as an `ipset restore` script, and Kube-OVN's nat chain
/// as an `iptables-restore` one.
fn restore_scripts(desired: &MapState) -> (String, &'static str) {
    let mut sets = String::new();
    sets.push_str("create ovn40subnets hash:net family inet maxelem 1048576\n");
    for net in &desired.v4.subnets {
        let _ = writeln!(sets, "add ovn40subnets {net}");
    }
    sets.push_str("create ovn40other-node hash:net family inet maxelem 1048576\n");
    for addr in &desired.v4.other_nodes {
        let _ = writeln!(sets, "add ovn40other-node {addr}");
    }
    sets.push_str("create KUBE-CLUSTER-IP hash:ip,port family inet maxelem 1048576\n");
    for p in &desired.v4.service_ports {
        let _ = writeln!(
            sets,
            "add KUBE-CLUSTER-IP {},{}:{}",
            p.addr, p.proto, p.port
        );
    }
    for proto in ["TCP", "UDP"] {
        let _ = writeln!(
            sets,
            "create KUBE-NODE-PORT-LOCAL-{proto} bitmap:port range 0-65535"
        );
    }
    for port in &desired.v4.nodeport_local_tcp {
        let _ = writeln!(sets, "add KUBE-NODE-PORT-LOCAL-TCP {port}");
    }
    let chain = "*nat\n:OVN-PREROUTING - [0:0]\n\
        -A PREROUTING -m comment --comment \"kube-ovn prerouting rules\" -j OVN-PREROUTING\n\
        -A OVN-PREROUTING -i ovn0 -m set --match-set ovn40subnets src -m set --match-set KUBE-CLUSTER-IP dst,dst -j MARK --set-xmark 0x4000/0x4000\n\
        -A OVN-PREROUTING -p tcp -m addrtype --dst-type LOCAL -m set --match-set KUBE-NODE-PORT-LOCAL-TCP dst -j MARK --set-xmark 0x80000/0x80000\n\
        -A OVN-PREROUTING -p tcp -m set --match-set ovn40other-node src -m set --match-set KUBE-NODE-PORT-LOCAL-TCP dst -j MARK --set-xmark 0x4000/0x4000\n\
        -A OVN-PREROUTING -p udp -m addrtype --dst-type LOCAL -m set --match-set KUBE-NODE-PORT-LOCAL-UDP dst -j MARK --set-xmark 0x80000/0x80000\n\
        -A OVN-PREROUTING -p udp -m set --match-set ovn40other-node src -m set --match-set KUBE-NODE-PORT-LOCAL-UDP dst -j MARK --set-xmark 0x4000/0x4000\n\
        COMMIT\n";
    (sets, chain)
}

/// `ipset restore` + `iptables-restore --noflush` from nothing, in a new private namespace.
fn ipset_cold(snapshot: &Snapshot) -> f64 {
    let ns = NetNs::new("kovn-cpi-").expect("create namespace");
    let desired = translate(snapshot, &facts(), &options()).desired;
    let (sets, chain) = restore_scripts(&desired);
    let started = Instant::now();
    feed(&ns, &["ipset", "restore"], &sets);
    feed(&ns, &["iptables-restore", "--noflush"], chain);
    started.elapsed().as_secs_f64() * 1e3
}

/// One `KUBE-CLUSTER-IP` entry swapped per `ipset restore`, as kube-proxy does for a change.
fn ipset_changes(snapshot: &Snapshot, changes: usize) -> Percentiles {
    let ns = NetNs::new("kovn-cpi-").expect("create namespace");
    let desired = translate(snapshot, &facts(), &options()).desired;
    let (sets, _) = restore_scripts(&desired);
    feed(&ns, &["ipset", "restore"], &sets);
    let mut samples = Vec::with_capacity(changes);
    let first = desired.v4.service_ports.iter().next().expect("ports");
    for i in 0..changes {
        let script = format!(
            "del KUBE-CLUSTER-IP {},{}:{}\nadd KUBE-CLUSTER-IP {},{}:{}\n",
            first.addr,
            first.proto,
            if i == 0 {
                usize::from(first.port)
            } else {
                20_000 + i - 1
            },
            first.addr,
            first.proto,
            20_000 + i
        );
        let started = Instant::now();
        feed(&ns, &["ipset", "restore"], &script);
        samples.push(started.elapsed().as_secs_f64() * 1e3);
    }
    percentiles(samples)
}

fn feed(ns: &NetNs, command: &[&str], input: &str) {
    let mut child = ns
        .command(command[0])
        .args(&command[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
