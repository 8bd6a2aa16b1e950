//! Command-line interface. The command and flag names are a contract other tooling (the
//! `DaemonSet`, e2e and benchmark harnesses) relies on.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;

use crate::{
    agent,
    datapath::attach::{AttachChoice, DEFAULT_HANDLE, TcxOrder},
    datapath::pins::DEFAULT_ROOT,
    host::netlink::IfaceOverride,
    ops::{
        inspect,
        preflight::DaemonSetRef,
        probe::{self, Target},
    },
    source::SourceSpec,
    translate::ServiceMatch,
};

/// This build's version, as in Cargo.toml.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The git commit this binary was built from (build.rs: `$KOVN_GIT_COMMIT`, else `git
/// rev-parse`, else `unknown`).
pub const COMMIT: &str = env!("KOVN_GIT_COMMIT");
/// `--version`'s text: `0.1.0 (commit 0123456789ab)`.
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("KOVN_GIT_COMMIT"),
    ")"
);

#[derive(Parser, Debug)]
#[command(
    name = "kube-ovn-agent",
    version = LONG_VERSION,
    about = "Sets Kube-OVN's PREROUTING marks with a TC-ingress eBPF program instead of iptables"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log filter (tracing env-filter syntax); `RUST_LOG` overrides it.
    #[arg(long, global = true, default_value = "info")]
    pub log_level: String,
    /// Log as JSON lines instead of text.
    #[arg(long, global = true)]
    pub log_json: bool,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Load (or adopt) the datapath, attach it and keep its maps in sync with the cluster.
    /// SIGTERM leaves everything in place; only `detach` removes it. One agent per
    /// --bpffs-root: a second one exits with status 4.
    Run(Box<RunArgs>),
    /// Show version, kernel, attachments, modes, counters, map fill and mark-clobber findings,
    /// and what the running agent reports (readiness and why not, mode and its origin, attach
    /// state per interface, last sync, per-kind source state) from its `/status`.
    Status(StatusArgs),
    /// Decode every datapath map into CIDRs, addresses, ports and roles.
    Dump(ReadArgs),
    /// Remove our attachments, programs and pins — nothing else. Marking stops.
    ///
    /// Refused (exit status 4) while an agent runs on the same --bpffs-root, unless --force.
    /// Exit status 1 when nothing of ours is found there.
    Detach(DetachArgs),
    /// Compare the datapath's rule counters with Kube-OVN's own iptables rules over a window.
    ///
    /// Rule by rule (R1a … R3u), the datapath's packet counts are compared with the counters the
    /// kernel keeps for Kube-OVN's nat OVN-PREROUTING rules (new connections) and with
    /// temporary counting-only copies of those rules in raw PREROUTING (every packet). Run it
    /// with the agent in shadow mode, with traffic (`probe` sends some), before switching to
    /// enforce (docs/migration.md). Exit status: 0 agree, 2 disagree, 3 inconclusive (no
    /// traffic, or no Kube-OVN rules), 1 error.
    Verify(VerifyArgs),
    /// Remove Kube-OVN's PREROUTING jump rules by their exact rule spec.
    ///
    /// Every copy of `-m comment --comment "kube-ovn prerouting rules" -j OVN-PREROUTING` in nat
    /// and mangle PREROUTING, IPv4 and IPv6, on every iptables backend, is deleted by spec, never
    /// by position. Needs the datapath enforcing unless --force. Kube-OVN v1.13 re-inserts the
    /// nat jump within 3 s: read docs/migration.md first.
    CleanupIptables(CleanupArgs),
    /// Check whether this node can run the agent, before installing it: kernel ≥ 5.10, tcx or
    /// clsact, the capabilities in the effective set, a bpffs under --bpffs-root, the kernel's
    /// BTF; and, through the API server, Kube-OVN's kube-ovn-cni `DaemonSet`: its version and
    /// whether its --service-cluster-ip-range, --cluster-router and --enable-tproxy equal the
    /// ones given here. Changes nothing. Exit status 1 when a check fails (warnings do not
    /// count; an unreachable API server is a warning).
    Preflight(PreflightArgs),
    /// Wait until the uninstall `DaemonSet` NAMESPACE/NAME has an up-to-date ready pod on every
    /// node it is scheduled to — each pod's init container ran `detach` there. The chart's
    /// uninstall hook Job runs it, so `helm uninstall` returns only then. Exit status 1 on
    /// timeout.
    UninstallWait(UninstallWaitArgs),
    /// Send a bounded mix of probe traffic for `verify` to compare: TCP connection attempts
    /// and UDP datagrams, round-robin over the targets, capped by --rate, --duration and
    /// --count.
    ///
    /// Run it in an ordinary pod on the node (not hostNetwork), so its packets enter the node
    /// through ovn0 as pod traffic does; `kubectl kovn verify --probe` does that on every node.
    /// Without --target the mix is chosen from --source for --node-name: ClusterIP ports (R1a/
    /// R1b), externalTrafficPolicy: Local NodePorts on the node's InternalIPs and join address
    /// (R2t/R2u), and near-misses that must be marked by nothing (a port the Service lacks, the
    /// address past the Service CIDR, a Cluster-policy NodePort, another node's NodePort, …).
    /// R3t/R3u match other nodes' addresses as source: no pod on the node reaches them. Exit
    /// status 1 when there is nothing to send.
    Probe(ProbeArgs),
}

#[derive(Args, Debug, Clone)]
pub struct ProbeArgs {
    /// A target, PROTO/ADDRESS:PORT[/KIND] (`tcp/10.96.0.10:53`, `udp/[fd00::10]:53`);
    /// repeatable. Given targets replace the chosen mix.
    #[arg(long = "target", value_name = "PROTO/ADDRESS:PORT[/KIND]")]
    pub targets: Vec<Target>,
    /// Where the mix is chosen from when no --target is given: `kube` (the API server: lists
    /// Services, Nodes, Subnets and ServiceCIDRs) or `file:PATH` (kubectl-style YAML).
    #[arg(long, default_value = "kube")]
    pub source: SourceSpec,
    /// The node the probe runs on (its Node object's name); defaults to `$NODE_NAME`.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// Kube-OVN's --service-cluster-ip-range, for the near-miss past the Service CIDR (ready
    /// ServiceCIDR objects replace it).
    #[arg(long, default_value = "10.96.0.0/12", value_parser = parse_cidrs)]
    pub service_cluster_ip_range: Cidrs,
    /// Kube-OVN's --cluster-router: the default VPC, whose subnets are probed.
    #[arg(long, default_value = "ovn-cluster")]
    pub cluster_router: String,
    /// At most this many targets in the chosen mix (one of each kind first).
    #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u16).range(1..=i64::from(probe::MAX_TARGETS)))]
    pub max_targets: u16,
    /// Probes per second, at most (≤ 200).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=i64::from(probe::MAX_RATE)))]
    pub rate: u32,
    /// How long to send: `20s`, `2m` (≤ 10m).
    #[arg(long, default_value = "20s", value_parser = parse_probe_duration)]
    pub duration: Duration,
    /// Probes in all, at most.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub count: u64,
    /// How long a TCP attempt waits for its answer: `300ms`, `1s` (≤ 5s).
    #[arg(long, default_value = "300ms", value_parser = parse_connect_timeout)]
    pub connect_timeout: Duration,
    /// Print the targets and send nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

fn parse_probe_duration(text: &str) -> Result<Duration, String> {
    let duration = parse_duration(text)?;
    if duration > probe::MAX_DURATION {
        return Err(format!("{text:?}: at most 10m"));
    }
    Ok(duration)
}

/// `300ms` or `2s`, 10 ms to 5 s.
fn parse_connect_timeout(text: &str) -> Result<Duration, String> {
    let duration = match text.strip_suffix("ms") {
        Some(ms) => Duration::from_millis(ms.parse().map_err(|e| format!("{text:?}: {e}"))?),
        None => parse_duration(text)?,
    };
    if !(Duration::from_millis(10)..=Duration::from_secs(5)).contains(&duration) {
        return Err(format!("{text:?}: between 10ms and 5s"));
    }
    Ok(duration)
}

#[derive(Args, Debug, Clone)]
pub struct UninstallWaitArgs {
    /// The uninstall `DaemonSet`.
    #[arg(value_parser = parse_required_daemonset_ref, value_name = "NAMESPACE/NAME")]
    pub daemonset: DaemonSetRef,
    /// Give up after this long: `10m`, …
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub timeout: Duration,
}

fn parse_required_daemonset_ref(text: &str) -> Result<DaemonSetRef, String> {
    parse_daemonset_ref(text)?
        .0
        .ok_or_else(|| "expected NAMESPACE/NAME".into())
}

#[derive(Args, Debug, Clone)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub root: RootArgs,
    /// How long to count: `30s`, `5m`, … Send or wait for traffic meanwhile.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub window: Duration,
    /// Allowed difference, in percent of the datapath's count, rounded down to whole packets
    /// (so small counts must match exactly).
    #[arg(long, default_value = "1", value_parser = parse_percent, value_name = "PERCENT")]
    pub tolerance: u32,
    /// Compare with Kube-OVN's new-connection counters only; leave iptables untouched (no
    /// per-packet copies, so over-matching goes unnoticed).
    #[arg(long)]
    pub connections_only: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct CleanupArgs {
    /// The datapath that must be enforcing before the nat jump goes.
    #[command(flatten)]
    pub root: RootArgs,
    /// Print what would be removed; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Remove the nat jump even though no enforcing datapath is pinned under --bpffs-root.
    #[arg(long)]
    pub force: bool,
}

#[derive(Args, Debug, Clone)]
pub struct RootArgs {
    /// Directory on a bpffs holding our pins. Only `run` mounts a bpffs (at /sys/fs/bpf, when
    /// the root is under it and none is mounted there); the other commands use what is there.
    #[arg(long, default_value = DEFAULT_ROOT)]
    pub bpffs_root: PathBuf,
}

#[derive(Args, Debug, Clone)]
pub struct StatusArgs {
    #[command(flatten)]
    pub read: ReadArgs,
    /// Where the running agent serves `/status` (its --metrics-addr). The manifests set
    /// `KOVN_AGENT_ADDR` to `$(HOST_IP):10669` in the agent's container, so `kubectl exec …
    /// status` reaches it.
    #[arg(long, env = "KOVN_AGENT_ADDR", default_value = "127.0.0.1:10669", value_parser = parse_agent_addr)]
    pub agent: SocketAddr,
}

fn parse_agent_addr(text: &str) -> Result<SocketAddr, String> {
    match parse_metrics_addr(text)? {
        MetricsAddr(Some(addr)) => Ok(addr),
        MetricsAddr(None) => Err("expected IP:PORT".into()),
    }
}

#[derive(Args, Debug, Clone)]
pub struct DetachArgs {
    #[command(flatten)]
    pub root: RootArgs,
    /// Detach even though an agent runs on this root. The agent then reports unhealthy
    /// (`/healthz` 503, `kovn_pins_present 0`) and stops attaching; a restart re-creates
    /// everything, so take the agent off this node first if marking is to stay off.
    #[arg(long)]
    pub force: bool,
    /// Exit 0, not 1, when nothing of ours is found under --bpffs-root: for running on every
    /// node, as deploy/uninstall does.
    #[arg(long)]
    pub if_present: bool,
}

#[derive(Args, Debug, Clone)]
pub struct ReadArgs {
    #[command(flatten)]
    pub root: RootArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct PreflightArgs {
    #[command(flatten)]
    pub read: ReadArgs,
    /// Kube-OVN's kube-ovn-cni `DaemonSet`, as NAMESPACE/NAME, whose `cni-server` args are
    /// compared with the three flags below (in-cluster configuration or the kubeconfig);
    /// `none` skips the Kube-OVN checks.
    #[arg(long, default_value = "kube-system/kube-ovn-cni", value_parser = parse_daemonset_ref, value_name = "NAMESPACE/NAME")]
    pub kube_ovn_cni: KubeOvnCni,
    /// The --service-cluster-ip-range `run` will get (as `run`'s flag).
    #[arg(long, default_value = "10.96.0.0/12", value_parser = parse_cidrs)]
    pub service_cluster_ip_range: Cidrs,
    /// The --cluster-router `run` will get.
    #[arg(long, default_value = "ovn-cluster")]
    pub cluster_router: String,
    /// Whether `run` will get --enable-tproxy.
    #[arg(long)]
    pub enable_tproxy: bool,
}

/// `--kube-ovn-cni`: the `DaemonSet` to read, or `none`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubeOvnCni(pub Option<DaemonSetRef>);

fn parse_daemonset_ref(text: &str) -> Result<KubeOvnCni, String> {
    if text == "none" {
        return Ok(KubeOvnCni(None));
    }
    match text.split_once('/') {
        Some((namespace, name))
            if !namespace.is_empty() && !name.is_empty() && !name.contains('/') =>
        {
            Ok(KubeOvnCni(Some(DaemonSetRef {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            })))
        }
        _ => Err("expected NAMESPACE/NAME or `none`".into()),
    }
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Where cluster state comes from: `kube` (the API server, in-cluster or kubeconfig) or
    /// `file:PATH` (kubectl-style YAML, re-read when it changes).
    #[arg(long, default_value = "kube")]
    pub source: SourceSpec,
    /// With `--source file:`, larger files are rejected (and the state already programmed is
    /// kept). Bytes, or with a `Ki`, `Mi` or `Gi` suffix.
    #[arg(long, default_value = "8Mi", value_parser = parse_size, value_name = "BYTES")]
    pub source_max_bytes: u64,
    /// With `--source file:`, a new version holding less than half the objects in force (what a
    /// truncated write that still parses looks like) is applied only once it has stayed
    /// unchanged this long.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub source_shrink_hold: Duration,
    /// This node's name (as in its Node object); defaults to `$NODE_NAME`, then the hostname.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    #[command(flatten)]
    pub root: RootArgs,
    /// Kube-OVN's --service-cluster-ip-range (comma-separated); ready ServiceCIDR objects
    /// replace it when the cluster has them.
    #[arg(long, default_value = "10.96.0.0/12", value_parser = parse_cidrs)]
    pub service_cluster_ip_range: Cidrs,
    /// How R1 recognises Service traffic: `auto` as Kube-OVN (exact ClusterIP+port and the
    /// NodePort rules when kube-proxy's IPVS sets exist, else the Service CIDR); `ip-port` or
    /// `cidr` force one behaviour.
    #[arg(long, value_enum, default_value_t = ServiceMatchArg::Auto)]
    pub service_match: ServiceMatchArg,
    /// kube-proxy's mode: `auto` detects its IPVS ipsets (before the first sync, then every
    /// 3 s, as Kube-OVN does) and reports its nftables tables; `nftables` behaves like
    /// `iptables` (no KUBE-* ipsets: R1b only).
    #[arg(long, value_enum, default_value_t = KubeProxyMode::Auto)]
    pub kube_proxy_mode: KubeProxyMode,
    /// Kube-OVN's --cluster-router: the default VPC's name.
    #[arg(long, default_value = "ovn-cluster")]
    pub cluster_router: String,
    /// How to attach: tcx (kernel ≥ 6.6, pinned links) or netlink clsact filters.
    #[arg(long, value_enum, default_value_t = AttachChoice::Auto)]
    pub attach: AttachChoice,
    /// Position among other tcx programs on the interface.
    #[arg(long, value_enum, default_value_t = TcxOrder::First)]
    pub tcx_order: TcxOrder,
    /// Netlink filter priority (lower runs first).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub tc_priority: u16,
    /// Netlink filter handle.
    #[arg(long, default_value_t = DEFAULT_HANDLE, value_parser = parse_handle)]
    pub tc_handle: u32,
    /// Interface roles on top of discovery, which gives ovn0 its role, a `br-*` OVS bridge
    /// holding an InternalIP the bridge role, and every other link that is up or has an
    /// address the NodePort (nic) role — except links enslaved to a bond, bridge or OVS, veths
    /// without addresses (pods' host ends) and `lo` without a non-loopback address.
    /// NAME=ovn0|nic|bridge|lo adds or changes, NAME=none excludes; NAME may use `*`
    /// (`--iface 'cali*=nic'`, `--iface 'kube-ipvs0=none'`). Repeatable; applied in order.
    #[arg(long = "iface", value_name = "NAME=ROLE")]
    pub ifaces: Vec<IfaceOverride>,
    /// `enforce` writes marks; `shadow` classifies and counts only, to compare with Kube-OVN's
    /// own iptables counters before switching.
    #[arg(long, value_enum, default_value_t = Mode::Enforce)]
    pub mode: Mode,
    /// Address of /metrics, /healthz and /readyz (unauthenticated): IP:PORT, or `none` to
    /// disable the server. The Kubernetes manifest binds the node's address (`$(HOST_IP):10669`) so
    /// kubelet probes and a Service or Prometheus reach it; `0.0.0.0` exposes it on every
    /// address of the node.
    #[arg(long, default_value = "127.0.0.1:10669", value_parser = parse_metrics_addr)]
    pub metrics_addr: MetricsAddr,
    /// Full re-read of the pinned maps to heal changes made behind the agent's back.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub resync_interval: Duration,
    /// Also replace Kube-OVN's TPROXY rules (its `--enable-tproxy`): kubelet probes to
    /// custom-VPC pods, looped through `lo`, are handed to the node's transparent listener.
    /// Attaches to `lo` and watches this node's Pods.
    #[arg(long)]
    pub enable_tproxy: bool,
    /// Port of Kube-OVN's transparent probe listener.
    #[arg(long, default_value_t = kube_ovn_ebpf_common::TPROXY_LISTEN_PORT)]
    pub tproxy_port: u16,
}

impl From<&RunArgs> for agent::Config {
    fn from(args: &RunArgs) -> Self {
        Self {
            ifaces: args.ifaces.clone(),
            resync_interval: args.resync_interval,
            enable_tproxy: args.enable_tproxy,
            tproxy_port: args.tproxy_port,
            kube_proxy_mode: args.kube_proxy_mode,
            mode: args.mode,
        }
    }
}

impl From<&ReadArgs> for inspect::ReadOptions {
    fn from(args: &ReadArgs) -> Self {
        Self {
            bpffs_root: args.root.bpffs_root.clone(),
            json: args.json,
        }
    }
}

impl From<&DetachArgs> for inspect::DetachOptions {
    fn from(args: &DetachArgs) -> Self {
        Self {
            bpffs_root: args.root.bpffs_root.clone(),
            force: args.force,
            if_present: args.if_present,
        }
    }
}

/// `--service-match`, as [`ServiceMatch`] (which `translate` keeps free of the CLI framework).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ServiceMatchArg {
    /// As Kube-OVN: exact ClusterIP+port (R1a) plus the NodePort rules when kube-proxy's IPVS
    /// sets exist for the family, the Service CIDR (R1b) otherwise.
    Auto,
    /// Always R1a plus R2/R3.
    IpPort,
    /// Always R1b, no R2/R3.
    Cidr,
}

impl From<ServiceMatchArg> for ServiceMatch {
    fn from(arg: ServiceMatchArg) -> Self {
        match arg {
            ServiceMatchArg::Auto => Self::Auto,
            ServiceMatchArg::IpPort => Self::IpPort,
            ServiceMatchArg::Cidr => Self::Cidr,
        }
    }
}

pub use crate::{
    agent::{MODE_LABEL, Mode, node_mode},
    host::KubeProxyMode,
};

/// Clap's side of the lower layers' choice enums, which stay free of the CLI framework. The
/// `--help` text of each value is the one line after its name.
macro_rules! value_enum {
    ($type:ty { $($variant:ident => $name:literal $(: $help:literal)?),+ $(,)? }) => {
        impl ValueEnum for $type {
            fn value_variants<'a>() -> &'a [Self] {
                &[$(<$type>::$variant),+]
            }

            fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
                Some(match self {
                    $(<$type>::$variant => {
                        clap::builder::PossibleValue::new($name)$(.help($help))?
                    })+
                })
            }
        }
    };
}

value_enum!(KubeProxyMode {
    Auto => "auto",
    Ipvs => "ipvs",
    Iptables => "iptables",
    Nftables => "nftables": "kube-proxy's nftables mode (GA in Kubernetes 1.33): no KUBE-* ipsets, so Kube-OVN installs R1b only, as in iptables mode",
    None => "none",
});

value_enum!(Mode {
    Enforce => "enforce",
    Shadow => "shadow",
});

value_enum!(AttachChoice {
    Auto => "auto": "tcx where the kernel has it (≥ 6.6), netlink otherwise",
    Tcx => "tcx",
    Netlink => "netlink",
});

value_enum!(TcxOrder {
    First => "first": "Before every other tcx program on the interface (marks are set before anyone looks)",
    Last => "last",
});

/// A parsed `--service-cluster-ip-range`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cidrs(pub Vec<IpNet>);

fn parse_cidrs(text: &str) -> Result<Cidrs, String> {
    text.split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(|c| c.parse::<IpNet>().map_err(|e| format!("{c:?}: {e}")))
        .collect::<Result<Vec<_>, _>>()
        .and_then(|v| {
            if v.is_empty() {
                Err("no CIDR given".into())
            } else {
                Ok(Cidrs(v))
            }
        })
}

/// A parsed `--metrics-addr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetricsAddr(pub Option<SocketAddr>);

fn parse_metrics_addr(text: &str) -> Result<MetricsAddr, String> {
    if text == "none" {
        return Ok(MetricsAddr(None));
    }
    if let Ok(addr) = text.parse() {
        return Ok(MetricsAddr(Some(addr)));
    }
    // `$(HOST_IP):PORT` with an IPv6 host IP arrives without brackets: the port follows the
    // last colon.
    let parsed = text
        .rsplit_once(':')
        .and_then(|(ip, port)| Some(SocketAddr::new(ip.parse().ok()?, port.parse().ok()?)));
    parsed
        .map(|a| MetricsAddr(Some(a)))
        .ok_or_else(|| format!("{text:?}: expected IP:PORT or `none`"))
}

fn parse_handle(text: &str) -> Result<u32, String> {
    let value = match text.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => text.parse(),
    }
    .map_err(|e| format!("{text:?}: {e}"))?;
    if value == 0 {
        return Err("the handle must be non-zero".into());
    }
    Ok(value)
}

/// `1`, `0.5`, `2%` → hundredths of a percent.
fn parse_percent(text: &str) -> Result<u32, String> {
    let number = text.trim().trim_end_matches('%');
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || !(fraction.is_empty() || digits(fraction)) || fraction.len() > 2 {
        return Err(format!(
            "{text:?}: expected a percentage with at most two decimals"
        ));
    }
    let whole: u32 = whole.parse().map_err(|e| format!("{text:?}: {e}"))?;
    let fraction: u32 = format!("{fraction:0<2}")
        .parse()
        .map_err(|e| format!("{text:?}: {e}"))?;
    let value = whole.saturating_mul(100).saturating_add(fraction);
    if value > 10_000 {
        return Err(format!("{text:?}: at most 100%"));
    }
    Ok(value)
}

/// `65536`, `64Ki`, `8Mi` or `1Gi`.
fn parse_size(text: &str) -> Result<u64, String> {
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit())
        .map_or((text, ""), |i| text.split_at(i));
    let n: u64 = number.parse().map_err(|e| format!("{text:?}: {e}"))?;
    let scale: u64 = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        other => return Err(format!("unknown unit {other:?} (use Ki, Mi or Gi)")),
    };
    match n.checked_mul(scale) {
        Some(0) => Err("must be positive".into()),
        Some(bytes) => Ok(bytes),
        None => Err(format!("{text:?}: too large")),
    }
}

/// `30s`, `5m`, `1h` or plain seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit())
        .map_or((text, "s"), |i| text.split_at(i));
    let n: u64 = number.parse().map_err(|e| format!("{text:?}: {e}"))?;
    let seconds = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        other => return Err(format!("unknown unit {other:?} (use s, m or h)")),
    };
    if seconds == 0 {
        return Err("must be positive".into());
    }
    Ok(Duration::from_secs(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("kube-ovn-agent").chain(args.iter().copied()))
    }

    #[test]
    fn run_accepts_every_documented_flag() {
        let cli = parse(&[
            "run",
            "--source",
            "file:/tmp/cluster.yaml",
            "--node-name",
            "n1",
            "--bpffs-root",
            "/run/kovn",
            "--service-cluster-ip-range",
            "10.96.0.0/12,fd00:10:96::/112",
            "--service-match",
            "ip-port",
            "--kube-proxy-mode",
            "ipvs",
            "--attach",
            "netlink",
            "--iface",
            "eth0=nic",
            "--iface",
            "ovn0=ovn0",
            "--mode",
            "shadow",
            "--metrics-addr",
            "127.0.0.1:9999",
        ])
        .expect("valid command line");
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        assert_eq!(run.service_cluster_ip_range.0.len(), 2);
        assert_eq!(run.ifaces.len(), 2);
        assert_eq!(run.mode, Mode::Shadow);
        assert_eq!(run.source_max_bytes, 8 << 20, "the documented default");
        let Command::Run(sized) = parse(&["run", "--source-max-bytes", "64Mi"])
            .unwrap()
            .command
        else {
            panic!("not run")
        };
        assert_eq!(sized.source_max_bytes, 64 << 20);
        assert_eq!(
            run.metrics_addr,
            MetricsAddr(Some("127.0.0.1:9999".parse().unwrap()))
        );
    }

    #[test]
    fn the_metrics_server_binds_loopback_unless_told_otherwise() {
        let Command::Run(run) = parse(&["run"]).unwrap().command else {
            panic!("not run")
        };
        assert_eq!(
            run.metrics_addr,
            MetricsAddr(Some("127.0.0.1:10669".parse().unwrap()))
        );
        for (text, want) in [
            ("192.168.0.11:10669", "192.168.0.11:10669"),
            ("[fd00::11]:10669", "[fd00::11]:10669"),
            ("fd00::11:10669", "[fd00::11]:10669"),
        ] {
            let Command::Run(run) = parse(&["run", "--metrics-addr", text]).unwrap().command else {
                panic!("not run")
            };
            assert_eq!(run.metrics_addr, MetricsAddr(Some(want.parse().unwrap())));
        }
        assert!(parse(&["run", "--metrics-addr", "node:10669"]).is_err());
    }

    #[test]
    fn bad_values_get_one_line_errors_naming_the_problem() {
        for (args, needle) in [
            (&["run", "--source", "http://x"][..], "file:PATH"),
            (
                &["run", "--service-cluster-ip-range", "10.96.0.0/33"],
                "10.96.0.0/33",
            ),
            (&["run", "--iface", "eth0"], "NAME=ROLE"),
            (&["run", "--tc-handle", "0"], "non-zero"),
            (&["run", "--kube-proxy-mode", "userspace"], "userspace"),
            (&["run", "--resync-interval", "5d"], "unit"),
            (&["run", "--source-max-bytes", "8MB"], "Ki, Mi or Gi"),
            (&["run", "--source-max-bytes", "0"], "positive"),
        ] {
            let error = parse(args).expect_err("must be rejected").to_string();
            assert!(error.contains(needle), "{args:?}: {error}");
        }
    }

    #[test]
    fn preflight_names_kube_ovns_daemonset_and_our_flags() {
        let Command::Preflight(args) = parse(&["preflight"]).unwrap().command else {
            panic!("not preflight")
        };
        assert_eq!(
            args.kube_ovn_cni,
            KubeOvnCni(Some(DaemonSetRef {
                namespace: "kube-system".into(),
                name: "kube-ovn-cni".into()
            }))
        );
        assert_eq!(args.cluster_router, "ovn-cluster");
        assert!(!args.enable_tproxy);
        let Command::Preflight(args) = parse(&[
            "preflight",
            "--kube-ovn-cni",
            "none",
            "--service-cluster-ip-range",
            "10.233.0.0/18,fd00::/112",
            "--enable-tproxy",
        ])
        .unwrap()
        .command
        else {
            panic!("not preflight")
        };
        assert_eq!(args.kube_ovn_cni, KubeOvnCni(None));
        assert_eq!(args.service_cluster_ip_range.0.len(), 2);
        assert!(args.enable_tproxy);
        for bad in ["kube-ovn-cni", "/x", "a/", "a/b/c"] {
            let error = parse(&["preflight", "--kube-ovn-cni", bad])
                .expect_err(bad)
                .to_string();
            assert!(error.contains("NAMESPACE/NAME"), "{bad}: {error}");
        }
    }

    #[test]
    fn uninstall_wait_takes_a_daemonset_and_a_timeout() {
        let Command::UninstallWait(args) = parse(&[
            "uninstall-wait",
            "kube-system/kube-ovn-ebpf-uninstall",
            "--timeout",
            "10m",
        ])
        .unwrap()
        .command
        else {
            panic!("not uninstall-wait")
        };
        assert_eq!(
            args.daemonset.to_string(),
            "kube-system/kube-ovn-ebpf-uninstall"
        );
        assert_eq!(args.timeout, Duration::from_mins(10));
        for bad in [
            &["uninstall-wait"][..],
            &["uninstall-wait", "none"],
            &["uninstall-wait", "x"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn read_commands_take_root_and_json() {
        let cli = parse(&["status", "--bpffs-root", "/run/x", "--json"]).unwrap();
        let Command::Status(status) = cli.command else {
            panic!("not status")
        };
        assert!(status.read.json);
        // The default unless KOVN_AGENT_ADDR says otherwise (the manifests set it).
        if std::env::var_os("KOVN_AGENT_ADDR").is_none() {
            assert_eq!(status.agent, "127.0.0.1:10669".parse().unwrap());
        }
        let Command::Status(status) = parse(&["status", "--agent", "fd00::11:10669"])
            .unwrap()
            .command
        else {
            panic!("not status")
        };
        assert_eq!(status.agent, "[fd00::11]:10669".parse().unwrap());
        assert!(parse(&["status", "--agent", "none"]).is_err());
        assert!(parse(&["detach"]).is_ok());
        assert!(matches!(
            parse(&["detach", "--force"]).unwrap().command,
            Command::Detach(DetachArgs {
                force: true,
                if_present: false,
                ..
            })
        ));
        assert!(matches!(
            parse(&["detach", "--if-present"]).unwrap().command,
            Command::Detach(DetachArgs {
                if_present: true,
                ..
            })
        ));
        assert!(parse(&["dump", "--json"]).is_ok());
        assert!(matches!(
            parse(&["preflight", "--json"]).unwrap().command,
            Command::Preflight(PreflightArgs {
                read: ReadArgs { json: true, .. },
                ..
            })
        ));
    }

    #[test]
    fn version_names_the_commit() {
        assert!(LONG_VERSION.starts_with(VERSION));
        assert!(LONG_VERSION.ends_with(&format!("(commit {COMMIT})")));
        assert!(!COMMIT.is_empty());
        let error = parse(&["--version"]).expect_err("--version exits");
        assert!(error.to_string().contains(LONG_VERSION), "{error}");
    }

    #[test]
    fn migration_commands_parse() {
        let cli = parse(&["verify", "--window", "2s", "--tolerance", "0.5%", "--json"]).unwrap();
        let Command::Verify(verify) = cli.command else {
            panic!("not verify")
        };
        assert_eq!(verify.window, Duration::from_secs(2));
        assert_eq!(verify.tolerance, 50);
        assert!(verify.json && !verify.connections_only);
        let defaults = parse(&["verify"]).unwrap();
        assert!(matches!(
            defaults.command,
            Command::Verify(VerifyArgs { tolerance: 100, .. })
        ));
        assert!(matches!(
            parse(&["cleanup-iptables", "--dry-run"]).unwrap().command,
            Command::CleanupIptables(CleanupArgs {
                dry_run: true,
                force: false,
                ..
            })
        ));
        let Command::Probe(probe) = parse(&[
            "probe",
            "--target",
            "tcp/10.96.0.10:53",
            "--target",
            "udp/[fd00::10]:53/cluster-ip",
            "--rate",
            "50",
            "--duration",
            "1m",
            "--connect-timeout",
            "150ms",
        ])
        .unwrap()
        .command
        else {
            panic!("not probe")
        };
        assert_eq!(probe.targets.len(), 2);
        assert_eq!(
            (probe.rate, probe.duration, probe.connect_timeout),
            (50, Duration::from_mins(1), Duration::from_millis(150))
        );
        assert_eq!((probe.count, probe.max_targets), (2000, 24), "the defaults");
        for bad in [
            &["probe", "--rate", "201"][..],
            &["probe", "--rate", "0"],
            &["probe", "--duration", "11m"],
            &["probe", "--connect-timeout", "6s"],
            &["probe", "--connect-timeout", "5ms"],
            &["probe", "--max-targets", "65"],
            &["probe", "--target", "icmp/10.0.0.1:1"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
        for bad in ["101", "1.234", "-1", "x", ""] {
            assert!(
                parse(&["verify", "--tolerance", bad]).is_err(),
                "{bad:?} accepted"
            );
        }
    }
}
