//! Every map the datapath uses, declared once. Names are the kernel object names the agent pins
//! and `bpftool` shows (`kube_ovn_ebpf_common::names`).

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC},
    btf_maps::{Array, HashMap, LpmTrie, PerCpuArray},
    macros::btf_map,
};
use kube_ovn_ebpf_common::{
    Config, DirChunk, FrontSet, Iface, ProbeTargetV4, ProbeTargetV6, ServicePortV4, ServicePortV6,
    capacity, counter, dir, exact, front4, nodeport,
};

const NO_PREALLOC: usize = BPF_F_NO_PREALLOC as usize;
/// The agent writes the [`front4`] arrays through a memory mapping, one atomic word at a time.
const MMAPABLE: usize = BPF_F_MMAPABLE as usize;
const FRONT_SETS: usize = front4::SETS as usize;

#[btf_map(name = "kovn_config")]
pub static CONFIG: Array<Config, 1> = Array::new();

/// Roles of the interfaces the agent attached to, at `iface_slot(ifindex)`.
#[btf_map(name = "kovn_ifaces")]
pub static IFACES: Array<Iface, { capacity::IFACE_SLOTS as usize }> = Array::new();

#[btf_map(name = "kovn_counters")]
pub static COUNTERS: PerCpuArray<u64, { counter::SLOTS as usize }> = PerCpuArray::new();

/// `ovn40subnets` / `ovn60subnets` (hash:net).
#[btf_map(name = "kovn_subnets4")]
pub static SUBNETS_V4: LpmTrie<[u8; 4], u8, { capacity::SUBNETS as usize }> = LpmTrie::new();
/// The direct-indexed front of `SUBNETS_V4` (`kube_ovn_ebpf_common::dir`).
#[btf_map(name = "kovn_sub4_l16")]
pub static SUBNETS_V4_L16: Array<u32, { dir::SLOTS as usize }> = Array::new();
#[btf_map(name = "kovn_sub4_l24")]
pub static SUBNETS_V4_L24: Array<DirChunk, { dir::CHUNKS as usize }> = Array::new();
#[btf_map(name = "kovn_subnets6")]
pub static SUBNETS_V6: LpmTrie<[u8; 16], u8, { capacity::SUBNETS as usize }> = LpmTrie::new();
/// The exact-match front of `SUBNETS_V6`: its /64s, by the address's first 8 bytes
/// (`kube_ovn_ebpf_common::exact`).
#[btf_map(name = "kovn_sub6_64")]
pub static SUBNETS_V6_EXACT: HashMap<[u8; 8], u8, { exact::CAPACITY as usize }, NO_PREALLOC> =
    HashMap::new();

/// `ovn40services` / `ovn60services` (hash:net): R1b.
#[btf_map(name = "kovn_svccidr4")]
pub static SERVICE_CIDRS_V4: LpmTrie<[u8; 4], u8, { capacity::SERVICE_CIDRS as usize }> =
    LpmTrie::new();
#[btf_map(name = "kovn_svccidr6")]
pub static SERVICE_CIDRS_V6: LpmTrie<[u8; 16], u8, { capacity::SERVICE_CIDRS as usize }> =
    LpmTrie::new();

/// `KUBE-CLUSTER-IP` / `KUBE-6-CLUSTER-IP` (hash:ip,port): R1a.
#[btf_map(name = "kovn_svcport4")]
pub static SERVICE_PORTS_V4: HashMap<
    ServicePortV4,
    u8,
    { capacity::SERVICE_PORTS as usize },
    NO_PREALLOC,
> = HashMap::new();
#[btf_map(name = "kovn_svcport6")]
pub static SERVICE_PORTS_V6: HashMap<
    ServicePortV6,
    u8,
    { capacity::SERVICE_PORTS as usize },
    NO_PREALLOC,
> = HashMap::new();

/// `ovn40other-node` / `ovn60other-node`: other nodes' InternalIPs. Kube-OVN's set is hash:net
/// but only ever holds single addresses, so an exact-match hash is enough.
#[btf_map(name = "kovn_othernode4")]
pub static OTHER_NODES_V4: HashMap<[u8; 4], u8, { capacity::OTHER_NODES as usize }, NO_PREALLOC> =
    HashMap::new();
#[btf_map(name = "kovn_othernode6")]
pub static OTHER_NODES_V6: HashMap<[u8; 16], u8, { capacity::OTHER_NODES as usize }, NO_PREALLOC> =
    HashMap::new();

/// `-m addrtype --dst-type LOCAL`: the kernel's local routing table (addresses and prefixes
/// such as 127.0.0.0/8), mirrored by the agent from netlink.
#[btf_map(name = "kovn_local4")]
pub static LOCAL_ADDRS_V4: LpmTrie<[u8; 4], u8, { capacity::LOCAL_ADDRS as usize }> =
    LpmTrie::new();
#[btf_map(name = "kovn_local6")]
pub static LOCAL_ADDRS_V6: LpmTrie<[u8; 16], u8, { capacity::LOCAL_ADDRS as usize }> =
    LpmTrie::new();
/// The exact-match fronts of the local-address tries: their /32s and /128s.
#[btf_map(name = "kovn_local4_32")]
pub static LOCAL_ADDRS_V4_EXACT: HashMap<[u8; 4], u8, { exact::CAPACITY as usize }, NO_PREALLOC> =
    HashMap::new();
#[btf_map(name = "kovn_local6_128")]
pub static LOCAL_ADDRS_V6_EXACT: HashMap<[u8; 16], u8, { exact::CAPACITY as usize }, NO_PREALLOC> =
    HashMap::new();

/// `KUBE[-6]-NODE-PORT-LOCAL-{TCP,UDP}` (bitmap:port), indexed by port; value: `nodeport` bits.
#[btf_map(name = "kovn_nplocal")]
pub static NODEPORT_LOCAL: Array<u8, { nodeport::PORTS as usize }> = Array::new();

/// Kube-OVN's mangle `OVN-PREROUTING` TPROXY targets: custom-VPC pods' probe ports on this node.
#[btf_map(name = "kovn_tproxy4")]
pub static TPROXY_V4: HashMap<
    ProbeTargetV4,
    u8,
    { capacity::PROBE_TARGETS as usize },
    NO_PREALLOC,
> = HashMap::new();
#[btf_map(name = "kovn_tproxy6")]
pub static TPROXY_V6: HashMap<
    ProbeTargetV6,
    u8,
    { capacity::PROBE_TARGETS as usize },
    NO_PREALLOC,
> = HashMap::new();

/// The set-associative fronts of `SERVICE_PORTS_V4`, the local /32s and `OTHER_NODES_V4`
/// (`kube_ovn_ebpf_common::front4`).
#[btf_map(name = "kovn_svc4_front")]
pub static SERVICE_PORTS_V4_FRONT: Array<FrontSet, FRONT_SETS, MMAPABLE> = Array::new();
#[btf_map(name = "kovn_loc4_front")]
pub static LOCAL_ADDRS_V4_FRONT: Array<FrontSet, FRONT_SETS, MMAPABLE> = Array::new();
#[btf_map(name = "kovn_oth4_front")]
pub static OTHER_NODES_V4_FRONT: Array<FrontSet, FRONT_SETS, MMAPABLE> = Array::new();
