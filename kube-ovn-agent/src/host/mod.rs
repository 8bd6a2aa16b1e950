//! The node itself: its interfaces and addresses (netlink), and the netfilter state Kube-OVN and
//! kube-proxy keep there (ipsets, iptables/nftables rules, and who rewrites them).

pub mod clobber;
pub mod ipset;
pub mod netlink;
pub mod xtables;
