//! kube-ovn-agent: keeps the kube-ovn-ebpf datapath's maps equal to what Kube-OVN's PREROUTING
//! ipsets would hold, and its program attached to the right interfaces.
//!
//! The layers, in the order data flows through them (watch → translate → apply):

/// The loop of `run`: reconcile passes, attach policy, fault tracking, behind a kernel seam.
pub mod agent;
/// The command line (clap types only) and its conversion into the layers' options.
pub mod cli;
/// What we read: the Kubernetes kinds, Kube-OVN's Subnet, a [`cluster::Snapshot`] of them.
pub mod cluster;
/// Apply, kernel side: the embedded object, its pins, attachments, map tables, raw syscalls.
pub mod datapath;
/// Errors as an operator reads them: one line, each cause once.
pub mod diag;
/// Lasting faults logged when they appear and clear, and log-safe escaping of outside text.
pub mod faults;
/// The node: interfaces and addresses (netlink), ipsets, iptables/nftables, mark clobbers.
pub mod host;
/// Prometheus metrics and the health endpoints.
pub mod metrics;
/// One-shot commands: `status`/`dump`/`detach`, `verify`, `cleanup-iptables`, `preflight`.
pub mod ops;
/// Watch: the API server or a YAML file keeps a current snapshot and wakes the loop on change.
pub mod source;
/// What the maps should hold, in human terms (CIDRs, addresses, ports).
pub mod state;
/// Test support (fixtures, the reference model, the fake API server, the privileged kit); only
/// for tests, benches and examples (`--features testing`).
#[cfg(any(test, feature = "testing"))]
pub mod testing;
/// Decide: snapshot + node facts → [`state::MapState`]; pure, no I/O, no CLI framework.
pub mod translate;
