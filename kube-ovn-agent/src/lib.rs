//! kube-ovn-agent: keeps the kube-ovn-ebpf datapath's maps equal to what Kube-OVN's PREROUTING
//! ipsets would hold, and its program attached to the right interfaces.

pub mod agent;
pub mod cli;
pub mod cluster;
pub mod datapath;
pub mod diag;
pub mod faults;
pub mod host;
pub mod metrics;
pub mod ops;
pub mod source;
pub mod state;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod translate;
