//! kube-ovn-agent: keeps the kube-ovn-ebpf datapath's maps equal to what Kube-OVN's PREROUTING
//! ipsets would hold, and its program attached to the right interfaces.

pub mod attach;
pub mod batch;
pub mod bpffs;
pub mod cleanup;
pub mod cli;
pub mod clobber;
pub mod cluster;
pub mod datapath;
pub mod diag;
pub mod ebpf;
pub mod faults;
pub mod ipset;
pub mod maps;
pub mod metrics;
pub mod model;
pub mod node;
pub mod source;
pub mod state;
pub mod testing;
pub mod translate;
pub mod verify;
pub mod xtables;
