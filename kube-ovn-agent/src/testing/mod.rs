//! Shared by the privileged test suites, the benchmarks and the VM matrix: packet building,
//! `BPF_PROG_TEST_RUN` helpers and the spec's fixture node.

pub mod agent;
pub mod apiserver;
pub mod fixture;
pub mod http;
pub mod objects;
pub mod oracle;
pub mod packet;
pub mod stats;
pub mod sync_order;
pub mod topology;

/// Network namespaces and bpffs mounts, shared with the e2e code through the testkit crate.
pub use kube_ovn_testkit::netns;

use std::time::Duration;

use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray},
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use kube_ovn_ebpf_common::names;

use crate::{datapath::maps::Tables, datapath::object, state::MapState};

/// A freshly loaded, unpinned datapath for tests and benchmarks.
pub struct TestDatapath {
    pub ebpf: Ebpf,
    pub tables: Tables,
    counters: PerCpuArray<MapData, u64>,
}

impl TestDatapath {
    pub fn load() -> Self {
        Self::load_with(object::LoadConfig::default())
    }

    /// Loaded with `config` frozen into the program.
    pub fn load_with(config: object::LoadConfig) -> Self {
        let mut ebpf =
            object::load(None, config).unwrap_or_else(|e| panic!("loading the datapath: {e}"));
        let mut maps = object::take_maps(&mut ebpf);
        let tables = Tables::from_maps(&mut maps).unwrap_or_else(|e| panic!("{e}"));
        let counters = maps
            .remove(names::COUNTERS)
            .expect("counter map")
            .try_into()
            .expect("counter map is a per-CPU array");
        Self {
            ebpf,
            tables,
            counters,
        }
    }

    /// Writes `desired` (with pruning); any map error fails the test.
    pub fn apply(&mut self, desired: &MapState) {
        let report = self.tables.apply(desired, true);
        assert!(
            report.errors.is_empty(),
            "map sync failed: {:?}",
            report.errors
        );
    }

    pub fn program(&mut self) -> &SchedClassifier {
        object::program(&mut self.ebpf).expect("program")
    }

    pub fn run(&mut self, frame: &[u8], mark_in: u32) -> Option<RunResult> {
        run(self.program(), frame, mark_in)
    }

    /// Counter values summed over CPUs, indexed by `counter` slot.
    pub fn counters(&self) -> Vec<u64> {
        crate::datapath::maps::read_counters(&self.counters).expect("reading counters")
    }
}

/// The prefix of `struct __sk_buff` that `BPF_PROG_TEST_RUN` lets a test set and read back,
/// padded to the 6.x size. Older kernels accept the longer buffer because the tail is zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct SkBuffCtx {
    pub len: u32,
    pub pkt_type: u32,
    pub mark: u32,
    pub queue_mapping: u32,
    pub protocol: u32,
    pub vlan_present: u32,
    pub vlan_tci: u32,
    pub vlan_proto: u32,
    pub priority: u32,
    pub ingress_ifindex: u32,
    pub ifindex: u32,
    pub rest: [u32; 37],
}
const _: () = assert!(size_of::<SkBuffCtx>() == 192);

/// `TC_ACT_UNSPEC` as `BPF_PROG_TEST_RUN` reports it.
pub const VERDICT_CONTINUE: u32 = u32::MAX;

/// What one run of the program did to a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunResult {
    pub verdict: u32,
    pub mark: u32,
    /// Whether the frame came back byte-for-byte unchanged.
    pub unchanged: bool,
}

/// Runs the classifier once on `frame` with `skb->mark = mark_in` (the frame is seen on the
/// test-run device, loopback, ifindex 1). `None` when the kernel refuses to build an skb from the
/// frame: since 6.x, `BPF_PROG_TEST_RUN` rejects IPv4/IPv6 frames shorter than their fixed IP
/// header (`EINVAL`). Such frames can still arrive on a real device; the netns tests inject them.
pub fn run(prog: &SchedClassifier, frame: &[u8], mark_in: u32) -> Option<RunResult> {
    let ctx_in = SkBuffCtx {
        mark: mark_in,
        ..bytemuck::Zeroable::zeroed()
    };
    let mut ctx_out: SkBuffCtx = bytemuck::Zeroable::zeroed();
    let mut data_out = vec![0u8; frame.len() + 256];
    let result = prog.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut data_out),
        ctx_in: Some(bytemuck::bytes_of(&ctx_in)),
        ctx_out: Some(bytemuck::bytes_of_mut(&mut ctx_out)),
        ..TestRunOptions::default()
    });
    let result = match result {
        Ok(result) => result,
        Err(_) if shorter_than_ip_header(frame) => return None,
        Err(e) => panic!(
            "BPF_PROG_TEST_RUN on a {}-byte frame: {e}: {:?}",
            frame.len(),
            std::error::Error::source(&e)
        ),
    };
    let out_len = result.data_size_out as usize;
    Some(RunResult {
        verdict: result.return_value,
        mark: ctx_out.mark,
        unchanged: data_out.get(..out_len) == Some(frame),
    })
}

/// Whether the Ethernet header announces IPv4/IPv6 but the frame cannot hold the IP header.
pub fn shorter_than_ip_header(frame: &[u8]) -> bool {
    match frame.get(12..14) {
        Some([0x08, 0x00]) => frame.len() < 14 + 20,
        Some([0x86, 0xdd]) => frame.len() < 14 + 40,
        _ => false,
    }
}

/// Average time per run over `repeat` runs inside the kernel (one syscall).
pub fn time_per_run(prog: &SchedClassifier, frame: &[u8], repeat: u32) -> Duration {
    let result = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            repeat,
            ..TestRunOptions::default()
        })
        .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN x{repeat}: {e}"));
    result.duration
}

/// The root check and the skip-or-fail rule of the privileged suites (the testkit's).
pub use kube_ovn_testkit::privileged::{missing_privilege, required as privilege_required};

/// `KOVN_TEST_TIME_SCALE` (default 1): deadlines of real-traffic tests are multiplied by it,
/// for kernels run under emulation (the VM matrix sets 10).
pub fn time_scale() -> u32 {
    std::env::var("KOVN_TEST_TIME_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|v| *v > 0)
        .unwrap_or(1)
}

/// `duration` stretched by [`time_scale`].
pub fn scaled(duration: Duration) -> Duration {
    duration * time_scale()
}
