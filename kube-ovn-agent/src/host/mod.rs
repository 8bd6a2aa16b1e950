//! The node itself: its interfaces and addresses (netlink), and the netfilter state Kube-OVN and
//! kube-proxy keep there (ipsets, iptables/nftables rules, and who rewrites them).

pub mod clobber;
pub mod exec;
pub mod ipset;
pub mod netlink;
pub mod xtables;

/// kube-proxy's mode on this node (`run --kube-proxy-mode`): `auto` detects its IPVS ipsets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KubeProxyMode {
    Auto,
    Ipvs,
    Iptables,
    /// kube-proxy's nftables mode (GA in Kubernetes 1.33): no KUBE-* ipsets, so Kube-OVN
    /// installs R1b only, as in iptables mode.
    Nftables,
    None,
}
