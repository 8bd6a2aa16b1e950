//! kube-ovn-agent: keeps the kube-ovn-ebpf datapath's maps equal to what Kube-OVN's PREROUTING
//! ipsets would hold, and its program attached to the right interfaces.

pub mod cluster;
pub mod ebpf;
pub mod maps;
pub mod model;
pub mod state;
pub mod testing;
pub mod translate;
