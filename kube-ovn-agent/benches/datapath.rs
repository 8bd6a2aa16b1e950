//! Datapath micro-benchmark: `BPF_PROG_TEST_RUN` per packet kind and per set size. Run through
//! `cargo xtask bench datapath [--quick]`; needs root. Prints a table and writes JSON (schema in
//! BENCHMARKS.md).
//!
//! What keeps it honest (each point is something an earlier version got wrong):
//! - **Dense, distinct padding on the lookup path.** The padding subnets are distinct /24s in
//!   10.0.0.0/7, the supernet of the fixture's pod subnet 10.16.0.0/16, taken nearest to it
//!   first; local addresses and ClusterIP ports are distinct /32s in the Service CIDR; other
//!   nodes are distinct /32s in the node network. After filling, the kernel maps are read back
//!   and must hold exactly the intended count, or the benchmark fails.
//! - **Every case is checked before it is timed:** a hit must come back with its mark, a miss
//!   without one. A packet that stopped taking its intended path fails the run.
//! - **A deep source** (`r1_hit_v4_deep`): the source inside one of the padding /24s, so the
//!   subnet lookup walks the dense part of the trie.
//! - **Cache-cold mode:** K distinct packets (distinct sources, destinations and ports spread
//!   over the padded sets), each run once (repeat 1). Two controls run alongside, packet by
//!   packet: the empty program on the same frames (the harness's cost of a single run) and the
//!   program on one fixed frame with repeat 1 (warm caches, same per-call overhead), so what the
//!   cold figure adds over the warm one is the cache misses.
//! - **Interleaved:** every round runs every case (the empty program included) in an order
//!   rotated by the round, so drift spreads over all of them.
//! - **Gross is the headline:** the per-run time the kernel reports, with nothing subtracted;
//!   the empty program's figure is reported next to it, not taken off it.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    time::Instant,
};

use ipnet::{Ipv4Net, Ipv6Net};
use kube_ovn_agent::{
    datapath::object::LoadConfig,
    state::{MapState, Proto, ServicePort},
    testing::{
        TestDatapath,
        fixture::{self, Mode},
        missing_privilege,
        packet::{L4, Packet, TCP_ACK, TCP_SYN},
        stats::{Spread, spread},
        time_per_run,
    },
    translate::ServiceMatch,
};
use kube_ovn_ebpf_common::{mark, role};
use serde::Serialize;

#[derive(Serialize)]
struct Report {
    schema: u32,
    suite: &'static str,
    /// `--label` (e.g. the datapath version measured), empty when not given.
    label: String,
    commit: String,
    quick: bool,
    wall_s: f64,
    machine: Machine,
    rounds: usize,
    /// Runs per `BPF_PROG_TEST_RUN` call in the hot cases.
    repeat: u32,
    /// Distinct packets per round in the cold mode.
    cold_packets: usize,
    verified_instructions: Option<u32>,
    /// Hot: one frame, `repeat` runs per call; ns per run.
    hot: Vec<HotRow>,
    /// Cold: `cold_packets` distinct frames, one run per call.
    cold: Vec<ColdRow>,
}

#[derive(Serialize)]
struct Machine {
    kernel: String,
    cpu: String,
    cores: usize,
    /// `/sys/devices/system/cpu/vulnerabilities/*`: the mitigations every run pays.
    mitigations: Vec<(String, String)>,
    loadavg_before: String,
    loadavg_after: String,
}

#[derive(Serialize)]
struct HotRow {
    case: &'static str,
    entries: usize,
    /// Gross ns per run over rounds: median, min, max.
    ns: Spread,
}

#[derive(Serialize)]
struct ColdRow {
    case: &'static str,
    entries: usize,
    /// Median over a round's distinct packets, spread over rounds.
    ns: Spread,
    /// The fastest single packet over every round.
    min_ns: f64,
    /// 90th percentile of single packets over every round.
    p90_ns: f64,
    /// Control: the empty program on the same frames, repeat 1 (median per round, spread).
    empty_program_ns: Spread,
    /// Control: this case's first frame over and over, repeat 1 (warm caches).
    same_frame_ns: Spread,
}

/// How a hot case's packet must come back.
struct Case {
    name: &'static str,
    frame: Vec<u8>,
    /// The mark the program must set (0: none).
    mark: u32,
    /// Run on the program loaded for a node with `nf_conntrack_tcp_loose=0` ([`syn_only`])
    /// rather than the default one.
    syn_only: bool,
}

impl Case {
    /// The datapath this case runs on.
    fn on<'a>(
        &self,
        dp: &'a mut TestDatapath,
        strict: &'a mut TestDatapath,
    ) -> &'a mut TestDatapath {
        if self.syn_only { strict } else { dp }
    }
}

/// What the agent loads on an IPVS node with `nf_conntrack_tcp_loose=0` and no TPROXY: TCP
/// without SYN is left to conntrack (docs/design.md §1).
fn syn_only() -> LoadConfig {
    LoadConfig::new(ServiceMatch::Auto, false, Some(false))
}

/// The padding for `n` entries per set: every address distinct, on the path of the lookups the
/// benchmark packets make.
struct Padding {
    subnets_v4: Vec<Ipv4Net>,
    /// ClusterIPs in 10.96.0.0/12: local /32s (IPVS binds them to kube-ipvs0) and TCP/443 ports.
    cluster_ips_v4: Vec<Ipv4Addr>,
    other_nodes_v4: Vec<Ipv4Addr>,
    subnets_v6: Vec<Ipv6Net>,
    cluster_ips_v6: Vec<Ipv6Addr>,
    other_nodes_v6: Vec<Ipv6Addr>,
}

/// The fixture's pod subnet: padding is dense around it.
const POD_SUBNET_V4: Ipv4Addr = Ipv4Addr::new(10, 16, 0, 0);

fn padding(n: usize) -> Padding {
    // /24s of 10.0.0.0/7, nearest to the pod subnet first, skipping the fixture's subnets
    // (10.16/16, 10.17/16) and the Service CIDR 10.96.0.0/12.
    let base = u32::from(Ipv4Addr::new(10, 0, 0, 0)) >> 8;
    let count = 1u32 << 17; // /24s in a /7
    let center = (u32::from(POD_SUBNET_V4) >> 8) - base;
    let usable = |j: u32| {
        let second = (j >> 8) & 0xff;
        let first = 10 + (j >> 16);
        !(first == 10 && (second == 16 || second == 17 || (96..112).contains(&second)))
    };
    let mut subnets_v4 = Vec::with_capacity(n);
    let mut step = 1u32;
    while subnets_v4.len() < n {
        assert!(step < count, "10.0.0.0/7 holds fewer than {n} usable /24s");
        for j in [center.checked_sub(step), Some(center + step)]
            .into_iter()
            .flatten()
        {
            if j < count && usable(j) && subnets_v4.len() < n {
                let net = Ipv4Addr::from((base + j) << 8);
                subnets_v4.push(Ipv4Net::new(net, 24).expect("/24"));
            }
        }
        step += 1;
    }
    let index = |i: usize| u32::try_from(i).expect("fewer than 2^32 entries");
    // 10.96.1.0 onwards: the fixture's 10.96.0.1 and 10.96.0.10 stay apart.
    let cluster_ips_v4 = (0..n)
        .map(|i| Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 1, 0)) + index(i)))
        .collect();
    // 192.168.1.0 onwards: the fixture's node network is 192.168.0.0/24.
    let other_nodes_v4 = (0..n)
        .map(|i| Ipv4Addr::from(u32::from(Ipv4Addr::new(192, 168, 1, 0)) + index(i)))
        .collect();
    let v6 = |base: &str, i: usize| {
        let base: Ipv6Addr = base.parse().expect("base");
        Ipv6Addr::from(u128::from(base) + u128::from(index(i)))
    };
    // /64s of fd00:10:16::/48 next to the pod subnet fd00:10:16::/64.
    let subnets_v6 = (0..n)
        .map(|i| {
            let net = Ipv6Addr::from(
                u128::from("fd00:10:16::".parse::<Ipv6Addr>().expect("v6"))
                    + ((1 + u128::from(index(i))) << 64),
            );
            Ipv6Net::new(net, 64).expect("/64")
        })
        .collect();
    Padding {
        subnets_v4,
        cluster_ips_v4,
        other_nodes_v4,
        subnets_v6,
        cluster_ips_v6: (0..n).map(|i| v6("fd00:10:96::1:0", i)).collect(),
        other_nodes_v6: (0..n).map(|i| v6("fd00::1:0", i)).collect(),
    }
}

/// The fixture node of spec §5.1 (kube-proxy IPVS mode) with every set padded by `p`.
fn padded(p: &Padding) -> MapState {
    let mut d = fixture::desired(Mode::A, role::OVN0 | role::NODE_NIC);
    d.v4.subnets.extend(p.subnets_v4.iter().copied());
    for &addr in &p.cluster_ips_v4 {
        d.v4.local.insert(Ipv4Net::new(addr, 32).expect("/32"));
        d.v4.service_ports.insert(ServicePort {
            addr,
            proto: Proto::Tcp,
            port: 443,
        });
    }
    d.v4.other_nodes.extend(p.other_nodes_v4.iter().copied());
    d.v6.subnets.extend(p.subnets_v6.iter().copied());
    for &addr in &p.cluster_ips_v6 {
        d.v6.local.insert(Ipv6Net::new(addr, 128).expect("/128"));
        d.v6.service_ports.insert(ServicePort {
            addr,
            proto: Proto::Tcp,
            port: 443,
        });
    }
    d.v6.other_nodes.extend(p.other_nodes_v6.iter().copied());
    d
}

/// Reads the kernel maps back and fails unless they hold exactly what `want` says: the padding
/// did not collapse and nothing was dropped.
fn assert_filled(dp: &mut TestDatapath, want: &MapState) {
    dp.tables.refresh_all().expect("reading the maps back");
    let got = dp.tables.current();
    let checks = [
        ("subnets v4", got.v4.subnets.len(), want.v4.subnets.len()),
        ("local v4", got.v4.local.len(), want.v4.local.len()),
        (
            "service ports v4",
            got.v4.service_ports.len(),
            want.v4.service_ports.len(),
        ),
        (
            "other nodes v4",
            got.v4.other_nodes.len(),
            want.v4.other_nodes.len(),
        ),
        ("subnets v6", got.v6.subnets.len(), want.v6.subnets.len()),
        ("local v6", got.v6.local.len(), want.v6.local.len()),
        (
            "service ports v6",
            got.v6.service_ports.len(),
            want.v6.service_ports.len(),
        ),
        (
            "other nodes v6",
            got.v6.other_nodes.len(),
            want.v6.other_nodes.len(),
        ),
    ];
    for (what, got, want) in checks {
        assert_eq!(
            got, want,
            "{what}: the kernel map holds {got} entries, not {want}"
        );
    }
    assert!(got == *want, "the kernel maps differ from the padded state");
}

fn tcp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    Packet::new(
        src.into(),
        dst.into(),
        L4::Tcp {
            sport,
            dport,
            flags,
        },
    )
    .frame()
}

fn hot_cases(p: &Padding) -> Vec<Case> {
    let mut truncated = Packet::tcp("192.168.0.12", "192.168.0.11", 30080).frame();
    truncated[16..18].copy_from_slice(&200u16.to_be_bytes()); // IPv4 total length beyond the frame
    let masq = mark::MASQUERADE;
    let both = mark::MASQUERADE | mark::NODEPORT_LOCAL;
    // The padding /24 farthest from the pod subnet: the last one added, deep in the dense part.
    let deep_src = {
        let net = p.subnets_v4.last().expect("padding");
        Ipv4Addr::from(u32::from(net.network()) + 5)
    };
    let service = Ipv4Addr::new(10, 96, 0, 1);
    vec![
        Case {
            name: "r1_hit_v4",
            frame: Packet::tcp("10.16.0.5", "10.96.0.1", 443).frame(),
            mark: masq,
            syn_only: false,
        },
        Case {
            name: "r1_hit_v4_deep",
            frame: tcp(deep_src, service, 40000, 443, TCP_SYN),
            mark: masq,
            syn_only: false,
        },
        Case {
            name: "r1_est_tcp_v4",
            frame: tcp(Ipv4Addr::new(10, 16, 0, 5), service, 40000, 443, TCP_ACK),
            // Stateless marking (design §1): an established segment is classified too.
            mark: masq,
            syn_only: false,
        },
        Case {
            name: "r1_est_tcp_v4_syn_only",
            frame: tcp(Ipv4Addr::new(10, 16, 0, 5), service, 40000, 443, TCP_ACK),
            // Left to conntrack, which never NATs it with tcp_loose=0: no mark.
            mark: 0,
            syn_only: true,
        },
        Case {
            name: "r1_hit_v4_syn_only",
            frame: Packet::tcp("10.16.0.5", "10.96.0.1", 443).frame(),
            mark: masq,
            syn_only: true,
        },
        Case {
            name: "r2_r3_hit_v4",
            frame: Packet::tcp("192.168.0.12", "192.168.0.11", 30080).frame(),
            mark: both,
            syn_only: false,
        },
        Case {
            name: "miss_v4",
            frame: Packet::tcp("203.0.113.7", "10.16.0.9", 8080).frame(),
            mark: 0,
            syn_only: false,
        },
        Case {
            name: "r1_hit_v6",
            frame: Packet::tcp("fd00:10:16::5", "fd00:10:96::1", 443).frame(),
            mark: masq,
            syn_only: false,
        },
        Case {
            name: "r2_r3_hit_v6",
            frame: Packet::tcp("fd00::12", "fd00::11", 30080).frame(),
            mark: both,
            syn_only: false,
        },
        Case {
            name: "malformed",
            frame: truncated,
            mark: 0,
            syn_only: false,
        },
    ]
}

/// `k` distinct packets of one kind, spread over the padded sets.
fn cold_cases(p: &Padding, k: usize) -> Vec<(&'static str, Vec<Vec<u8>>, u32)> {
    let n = p.subnets_v4.len();
    let sport = |i: usize| 1024 + u16::try_from(i % 60_000).expect("small");
    let r1 = (0..k)
        .map(|i| {
            let net = p.subnets_v4[i % n];
            let host = 1 + u32::try_from(i / n % 250).expect("small");
            let src = Ipv4Addr::from(u32::from(net.network()) + host);
            tcp(
                src,
                p.cluster_ips_v4[(i * 7919) % n],
                sport(i),
                443,
                TCP_SYN,
            )
        })
        .collect();
    let r2_r3 = (0..k)
        .map(|i| {
            tcp(
                p.other_nodes_v4[i % n],
                p.cluster_ips_v4[(i * 7919) % n],
                sport(i),
                30080,
                TCP_SYN,
            )
        })
        .collect();
    vec![
        ("r1_hit_v4", r1, mark::MASQUERADE),
        (
            "r2_r3_hit_v4",
            r2_r3,
            mark::MASQUERADE | mark::NODEPORT_LOCAL,
        ),
    ]
}

fn check(dp: &mut TestDatapath, name: &str, frame: &[u8], want: u32) {
    let got = dp
        .run(frame, 0)
        .unwrap_or_else(|| panic!("{name}: the kernel refused the frame"))
        .mark;
    assert_eq!(
        got, want,
        "{name}: mark {got:#x}, expected {want:#x}: the packet no longer takes the path it measures"
    );
}

/// Fills both datapaths with `desired` (read back) and checks every hot case's mark.
fn fill_and_check(
    dp: &mut TestDatapath,
    strict: &mut TestDatapath,
    desired: &MapState,
    cases: &[Case],
) {
    for d in [&mut *dp, &mut *strict] {
        d.apply(desired);
        assert_filled(d, desired);
    }
    for case in cases {
        check(case.on(dp, strict), case.name, &case.frame, case.mark);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return; // `cargo bench -- --list` probing: nothing to list.
    }
    if let Some(why) = missing_privilege() {
        eprintln!("*** SKIPPING the datapath benchmark: {why} ***");
        std::process::exit(i32::from(kube_ovn_agent::testing::privilege_required()));
    }
    let started = Instant::now();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let quick = args.iter().any(|a| a == "--quick");
    let out = value("--out").unwrap_or_else(|| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../target/bench/datapath.json").into()
    });
    let rounds = 5;
    let repeat: u32 = if quick { 200_000 } else { 2_000_000 };
    let cold_packets = if quick { 1_024 } else { 8_192 };
    let sizes = [10usize, 1_000, 10_000, 100_000];
    let loadavg_before = read("/proc/loadavg");

    let mut dp = TestDatapath::load();
    let mut strict = TestDatapath::load_with(syn_only());
    let empty = EmptyProgram::load();
    let verified = dp
        .program()
        .info()
        .ok()
        .and_then(|i| i.verified_instruction_count());

    let mut hot = Vec::new();
    let mut cold = Vec::new();
    for &n in &sizes {
        let pad = padding(n);
        let desired = padded(&pad);
        let cases = hot_cases(&pad);
        fill_and_check(&mut dp, &mut strict, &desired, &cases);
        // Slot 0 is the empty program, measured in the same rotation as the cases.
        let slots = cases.len() + 1;
        let mut samples: Vec<Vec<f64>> = vec![Vec::new(); slots];
        for round in 0..rounds {
            for s in (0..slots).map(|s| (s + round) % slots) {
                let ns = if s == 0 {
                    empty.ns_per_run(&cases[0].frame, repeat)
                } else {
                    let case = &cases[s - 1];
                    let on = case.on(&mut dp, &mut strict);
                    time_per_run(on.program(), &case.frame, repeat).as_secs_f64() * 1e9
                };
                samples[s].push(ns);
            }
        }
        let mut samples = samples.into_iter();
        hot.push(HotRow {
            case: "empty_program",
            entries: n,
            ns: spread(samples.next().expect("slot 0")),
        });
        for (case, samples) in cases.iter().zip(samples) {
            hot.push(HotRow {
                case: case.name,
                entries: n,
                ns: spread(samples),
            });
        }

        for (name, frames, want) in cold_cases(&pad, cold_packets) {
            for frame in &frames {
                check(&mut dp, name, frame, want);
            }
            cold.push(measure_cold(&mut dp, &empty, name, n, &frames, rounds));
        }
    }

    let report = Report {
        schema: 2,
        suite: "datapath",
        label: value("--label").unwrap_or_default(),
        commit: git_commit(),
        quick,
        wall_s: started.elapsed().as_secs_f64(),
        machine: machine(loadavg_before),
        rounds,
        repeat,
        cold_packets,
        verified_instructions: verified,
        hot,
        cold,
    };
    print_table(&report);
    if let Some(dir) = std::path::Path::new(&out).parent() {
        std::fs::create_dir_all(dir).expect("create the output directory");
    }
    std::fs::write(&out, serde_json::to_string_pretty(&report).expect("JSON")).expect("write JSON");
    println!("\nwrote {out}");
}

/// One cold case: per round, every frame once with the program, the empty program on the same
/// frame, and the first frame again with the program (the warm control), interleaved.
fn measure_cold(
    dp: &mut TestDatapath,
    empty: &EmptyProgram,
    case: &'static str,
    entries: usize,
    frames: &[Vec<u8>],
    rounds: usize,
) -> ColdRow {
    let mut all = Vec::new();
    let (mut per_round, mut empty_rounds, mut same_rounds) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let mut round = Vec::with_capacity(frames.len());
        let mut empty_ns = Vec::with_capacity(frames.len());
        let mut same = Vec::with_capacity(frames.len());
        for frame in frames {
            round.push(time_per_run(dp.program(), frame, 1).as_secs_f64() * 1e9);
            empty_ns.push(empty.ns_per_run(frame, 1));
            same.push(time_per_run(dp.program(), &frames[0], 1).as_secs_f64() * 1e9);
        }
        per_round.push(spread(round.clone()).median);
        empty_rounds.push(spread(empty_ns).median);
        same_rounds.push(spread(same).median);
        all.extend(round);
    }
    all.sort_by(f64::total_cmp);
    ColdRow {
        case,
        entries,
        ns: spread(per_round),
        min_ns: all[0],
        p90_ns: all[all.len() * 9 / 10],
        empty_program_ns: spread(empty_rounds),
        same_frame_ns: spread(same_rounds),
    }
}

fn machine(loadavg_before: String) -> Machine {
    Machine {
        kernel: read("/proc/sys/kernel/osrelease"),
        cpu: std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| {
                c.lines()
                    .find(|l| l.starts_with("model name"))
                    .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
            })
            .unwrap_or_default(),
        cores: std::thread::available_parallelism().map_or(0, usize::from),
        mitigations: mitigations(),
        loadavg_before,
        loadavg_after: read("/proc/loadavg"),
    }
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).map_or_else(|_| "unknown".into(), |s| s.trim().to_owned())
}

fn mitigations() -> Vec<(String, String)> {
    let mut found: Vec<(String, String)> =
        std::fs::read_dir("/sys/devices/system/cpu/vulnerabilities")
            .map(|dir| {
                dir.flatten()
                    .map(|e| {
                        let name = e.file_name().to_string_lossy().into_owned();
                        (name, read(&e.path().to_string_lossy()))
                    })
                    .collect()
            })
            .unwrap_or_default();
    found.sort();
    found
}

fn git_commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or_else(
            || "unknown".into(),
            |o| String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        )
}

fn print_table(r: &Report) {
    println!(
        "kovn_ingress per packet (BPF_PROG_TEST_RUN; hot: {} runs per call × {} rounds; cold: {} distinct packets × 1 run × {} rounds)",
        r.repeat, r.rounds, r.cold_packets, r.rounds
    );
    println!(
        "kernel {}, {}, {} cores, commit {} {}; verifier-processed instructions: {}",
        r.machine.kernel,
        r.machine.cpu,
        r.machine.cores,
        r.commit,
        r.label,
        r.verified_instructions
            .map_or("unknown".into(), |n| n.to_string())
    );
    println!(
        "\nhot, gross ns per run\n{:<24} {:>8} {:>10} {:>10} {:>10}",
        "case", "entries", "median", "min", "max"
    );
    for row in &r.hot {
        println!(
            "{:<24} {:>8} {:>10.1} {:>10.1} {:>10.1}",
            row.case, row.entries, row.ns.median, row.ns.min, row.ns.max
        );
    }
    println!(
        "\ncold, gross ns per run (repeat 1)\n{:<16} {:>8} {:>10} {:>10} {:>10} {:>10} {:>12} {:>12}",
        "case", "entries", "median", "min-round", "p90", "min", "empty prog", "same frame"
    );
    for row in &r.cold {
        println!(
            "{:<16} {:>8} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>12.1} {:>12.1}",
            row.case,
            row.entries,
            row.ns.median,
            row.ns.min,
            row.p90_ns,
            row.min_ns,
            row.empty_program_ns.median,
            row.same_frame_ns.median
        );
    }
    // Goals are reported, not asserted: the run fails only when a packet leaves its path or the
    // padding is not what it claims.
    println!("\ngoals (issue 16), gross:");
    let hot_goal = |case: &str, goal: f64| {
        let rows: Vec<&HotRow> = r.hot.iter().filter(|row| row.case == case).collect();
        let worst = rows
            .iter()
            .map(|row| row.ns.median)
            .fold(f64::MIN, f64::max);
        println!(
            "  hot {case}: worst median over scales {worst:.1} ns (goal ≤ {goal} ns: {})",
            if worst <= goal { "met" } else { "missed" }
        );
    };
    for case in [
        "r1_hit_v4",
        "r1_hit_v4_deep",
        "r2_r3_hit_v4",
        "r1_hit_v4_syn_only",
    ] {
        hot_goal(case, 30.0);
    }
    hot_goal("r1_est_tcp_v4", 10.0);
    hot_goal("r1_est_tcp_v4_syn_only", 10.0);
    for case in ["r1_hit_v6", "r2_r3_hit_v6"] {
        hot_goal(case, 45.0);
    }
    for row in &r.cold {
        println!(
            "  cold {} at {}: median {:.1} ns (goal ≤ 300 ns: {})",
            row.case,
            row.entries,
            row.ns.median,
            if row.ns.median <= 300.0 {
                "met"
            } else {
                "missed"
            }
        );
    }
}

/// A two-instruction program (`r0 = TC_ACT_UNSPEC; exit`), loaded with raw `bpf()`: the
/// harness's own cost per run, measured like the cases.
struct EmptyProgram {
    fd: std::os::fd::OwnedFd,
}

#[repr(C)]
struct Load {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    rest: [u64; 16],
}

#[repr(C)]
struct Run {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    rest: [u64; 8],
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;

impl EmptyProgram {
    fn load() -> Self {
        use std::os::fd::FromRawFd as _;
        let insns: [u64; 2] = [0xffff_ffff_0000_00b7, 0x95];
        let license = b"GPL\0";
        let load = Load {
            prog_type: BPF_PROG_TYPE_SCHED_CLS,
            insn_cnt: 2,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level: 0,
            log_size: 0,
            log_buf: 0,
            kern_version: 0,
            prog_flags: 0,
            prog_name: *b"kovn_bench_noop\0",
            rest: [0; 16],
        };
        // SAFETY: a valid attr struct for BPF_PROG_LOAD; the returned fd is owned below.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_LOAD,
                &raw const load,
                size_of::<Load>(),
            )
        };
        assert!(
            fd >= 0,
            "loading the empty program: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: a fresh fd the kernel just returned, owned by nothing else.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(i32::try_from(fd).expect("fd")) };
        Self { fd }
    }

    fn ns_per_run(&self, frame: &[u8], repeat: u32) -> f64 {
        use std::os::fd::AsRawFd as _;
        let mut run = Run {
            prog_fd: u32::try_from(self.fd.as_raw_fd()).expect("fd"),
            retval: 0,
            data_size_in: u32::try_from(frame.len()).expect("small"),
            data_size_out: 0,
            data_in: frame.as_ptr() as u64,
            data_out: 0,
            repeat,
            duration: 0,
            rest: [0; 8],
        };
        // SAFETY: a valid attr struct for BPF_PROG_TEST_RUN; `frame` outlives the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_TEST_RUN,
                &raw mut run,
                size_of::<Run>(),
            )
        };
        assert_eq!(
            rc,
            0,
            "test-running the empty program: {}",
            std::io::Error::last_os_error()
        );
        f64::from(run.duration)
    }
}
