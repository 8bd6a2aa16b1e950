//! Datapath micro-benchmark: `BPF_PROG_TEST_RUN` with a repeat count, per packet kind and per
//! set size. Run through `cargo xtask bench datapath [--quick]`; needs root. Prints a table and
//! writes JSON (schema in BENCHMARKS.md).

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use ipnet::{Ipv4Net, Ipv6Net};
use kube_ovn_agent::{
    state::{MapState, Proto, ServicePort},
    testing::{
        TestDatapath,
        fixture::{self, Mode},
        missing_privilege,
        packet::Packet,
        stats::{Spread, spread},
        time_per_run,
    },
};
use kube_ovn_ebpf_common::role;
use serde::Serialize;

#[derive(Serialize)]
struct Report {
    kernel: String,
    cpu: String,
    cores: usize,
    rounds: usize,
    repeat: u32,
    /// An empty two-instruction `sched_cls` program: the harness's own cost per run.
    baseline_ns: Spread,
    verified_instructions: Option<u32>,
    results: Vec<Row>,
}

#[derive(Serialize)]
struct Row {
    case: &'static str,
    entries: usize,
    ns: Spread,
    /// Median minus the baseline median: the program's own cost.
    net_median_ns: f64,
}

/// The fixture node of spec §5.1 with every set padded to `n` entries that never match the
/// benchmark packets, so lookups walk realistically filled maps.
fn padded(n: usize) -> MapState {
    let mut d = fixture::desired(Mode::A, role::OVN0 | role::NODE_NIC);
    for i in 0..n {
        let [_, hi, mid, lo] = u32::try_from(i).expect("small").to_be_bytes();
        // 20.0.0.0/8 and 2001:db9::/32 hold nothing the packets use.
        d.v4.subnets.insert(
            Ipv4Net::new(Ipv4Addr::new(20, hi, mid, 0), 24)
                .expect("/24")
                .trunc(),
        );
        d.v4.local
            .insert(Ipv4Net::new(Ipv4Addr::new(20, hi, mid, lo), 32).expect("/32"));
        d.v4.other_nodes.insert(Ipv4Addr::new(21, hi, mid, lo));
        d.v4.service_ports.insert(ServicePort {
            addr: Ipv4Addr::new(22, hi, mid, lo),
            proto: Proto::Tcp,
            port: 443,
        });
        let v6 = |prefix: u16| {
            Ipv6Addr::new(
                0x2001,
                0xdb9,
                prefix,
                u16::from(hi),
                u16::from(mid),
                u16::from(lo),
                0,
                1,
            )
        };
        d.v6.subnets
            .insert(Ipv6Net::new(v6(1), 112).expect("/112").trunc());
        d.v6.local.insert(Ipv6Net::new(v6(2), 128).expect("/128"));
        d.v6.other_nodes.insert(v6(3));
        d.v6.service_ports.insert(ServicePort {
            addr: v6(4),
            proto: Proto::Tcp,
            port: 443,
        });
    }
    d
}

fn cases() -> Vec<(&'static str, Vec<u8>)> {
    let mut truncated = Packet::tcp("192.168.0.12", "192.168.0.11", 30080).frame();
    truncated[16..18].copy_from_slice(&200u16.to_be_bytes()); // IPv4 total length beyond the frame
    vec![
        (
            "r1_hit_v4",
            Packet::tcp("10.16.0.5", "10.96.0.1", 443).frame(),
        ),
        (
            "r2_r3_hit_v4",
            Packet::tcp("192.168.0.12", "192.168.0.11", 30080).frame(),
        ),
        (
            "miss_v4",
            Packet::tcp("203.0.113.7", "10.16.0.9", 8080).frame(),
        ),
        (
            "r2_r3_hit_v6",
            Packet::tcp("fd00::12", "fd00::11", 30080).frame(),
        ),
        ("malformed", truncated),
    ]
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
    let quick = args.iter().any(|a| a == "--quick");
    let out = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| {
            concat!(env!("CARGO_MANIFEST_DIR"), "/../target/bench/datapath.json").into()
        });
    let rounds = 5;
    let repeat: u32 = if quick { 200_000 } else { 2_000_000 };
    let sizes = [10usize, 1_000, 100_000];

    let mut dp = TestDatapath::load();
    let frame = Packet::tcp("10.16.0.5", "10.96.0.1", 443).frame();
    let baseline = spread(
        (0..rounds)
            .map(|_| empty_program_ns(&frame, repeat))
            .collect(),
    );
    let verified = dp
        .program()
        .info()
        .ok()
        .and_then(|i| i.verified_instruction_count());

    let mut results = Vec::new();
    for &n in &sizes {
        let desired = padded(n);
        dp.apply(&desired);
        let cases = cases();
        // Interleave cases within each round so drift spreads evenly over them.
        let mut samples: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
        for _ in 0..rounds {
            for (i, (_, frame)) in cases.iter().enumerate() {
                let per_run: Duration = time_per_run(dp.program(), frame, repeat);
                samples[i].push(per_run.as_secs_f64() * 1e9);
            }
        }
        for ((case, _), samples) in cases.iter().zip(samples) {
            let ns = spread(samples);
            results.push(Row {
                case,
                entries: n,
                ns,
                net_median_ns: ns.median - baseline.median,
            });
        }
    }

    let report = Report {
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
        rounds,
        repeat,
        baseline_ns: baseline,
        verified_instructions: verified,
        results,
    };
    print_table(&report);
    if let Some(dir) = std::path::Path::new(&out).parent() {
        std::fs::create_dir_all(dir).expect("create the output directory");
    }
    std::fs::write(&out, serde_json::to_string_pretty(&report).expect("JSON")).expect("write JSON");
    println!("\nwrote {out}");
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).map_or_else(|_| "unknown".into(), |s| s.trim().to_owned())
}

fn print_table(r: &Report) {
    println!(
        "kovn_ingress per packet (BPF_PROG_TEST_RUN, {} runs × {} rounds; kernel {}, {}, {} cores)",
        r.repeat, r.rounds, r.kernel, r.cpu, r.cores
    );
    println!(
        "harness baseline (empty program): median {:.1} ns (min {:.1}, max {:.1}); verifier-processed instructions: {}",
        r.baseline_ns.median,
        r.baseline_ns.min,
        r.baseline_ns.max,
        r.verified_instructions
            .map_or("unknown".into(), |n| n.to_string())
    );
    println!(
        "\n{:<14} {:>8} {:>10} {:>10} {:>10} {:>12}",
        "case", "entries", "median ns", "min ns", "max ns", "net ns"
    );
    for row in &r.results {
        println!(
            "{:<14} {:>8} {:>10.1} {:>10.1} {:>10.1} {:>12.1}",
            row.case, row.entries, row.ns.median, row.ns.min, row.ns.max, row.net_median_ns
        );
    }
    // Targets are reported, not asserted (issue: ≤ 30 ns for IPv4 TCP hits, flat ±15 %).
    println!("\ntargets:");
    for case in ["r1_hit_v4", "r2_r3_hit_v4"] {
        let rows: Vec<&Row> = r.results.iter().filter(|row| row.case == case).collect();
        let (first, last) = (rows[0], rows[rows.len() - 1]);
        let change = (last.ns.median / first.ns.median - 1.0) * 100.0;
        println!(
            "  {case}: median {:.1} ns gross / {:.1} ns net of the harness at {} entries (target ≤ 30 ns: {}); {} → {} entries: {change:+.1} % (target within ±15 %: {})",
            first.ns.median,
            first.net_median_ns,
            first.entries,
            if first.ns.median <= 30.0 {
                "met"
            } else if first.net_median_ns <= 30.0 {
                "met net of the harness only"
            } else {
                "missed"
            },
            first.entries,
            last.entries,
            if change.abs() <= 15.0 {
                "met"
            } else {
                "missed"
            },
        );
    }
}

/// Per-run time of a two-instruction program (`r0 = TC_ACT_UNSPEC; exit`), loaded with raw
/// `bpf()` so nothing but the harness is measured.
fn empty_program_ns(frame: &[u8], repeat: u32) -> f64 {
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
    // SAFETY: valid attr structs for these commands; the fd is closed below.
    unsafe {
        let fd = libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &raw const load,
            size_of::<Load>(),
        );
        assert!(
            fd >= 0,
            "loading the empty program: {}",
            std::io::Error::last_os_error()
        );
        let mut run = Run {
            prog_fd: u32::try_from(fd).expect("fd"),
            retval: 0,
            data_size_in: u32::try_from(frame.len()).expect("small"),
            data_size_out: 0,
            data_in: frame.as_ptr() as u64,
            data_out: 0,
            repeat,
            duration: 0,
            rest: [0; 8],
        };
        let rc = libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &raw mut run,
            size_of::<Run>(),
        );
        assert_eq!(
            rc,
            0,
            "test-running the empty program: {}",
            std::io::Error::last_os_error()
        );
        libc::close(i32::try_from(fd).expect("fd"));
        f64::from(run.duration)
    }
}
