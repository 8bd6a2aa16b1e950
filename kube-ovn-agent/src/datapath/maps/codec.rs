//! Conversions between human keys (addresses, CIDRs, ports) and the `#[repr(C)]` forms of the
//! common crate that the kernel maps store.

use std::net::{Ipv4Addr, Ipv6Addr};

use aya::maps::lpm_trie::Key;
use ipnet::{Ipv4Net, Ipv6Net};
use kube_ovn_ebpf_common::{PRESENT, ProbeTargetV4, ProbeTargetV6, ServicePortV4, ServicePortV6};

use crate::state::{ProbeTarget, Proto, ServicePort};

/// Conversion between a human key/value and the raw `#[repr(C)]` form stored in the kernel.
pub trait Codec: Sized {
    type Raw: aya::Pod;
    fn encode(&self) -> Self::Raw;
    fn decode(raw: &Self::Raw) -> Option<Self>;
}

impl Codec for Ipv4Addr {
    type Raw = [u8; 4];
    fn encode(&self) -> [u8; 4] {
        self.octets()
    }
    fn decode(raw: &[u8; 4]) -> Option<Self> {
        Some((*raw).into())
    }
}

impl Codec for Ipv6Addr {
    type Raw = [u8; 16];
    fn encode(&self) -> [u8; 16] {
        self.octets()
    }
    fn decode(raw: &[u8; 16]) -> Option<Self> {
        Some((*raw).into())
    }
}

/// The per-family keys: one impl per address type, the same field mapping.
macro_rules! family_codecs {
    ($($addr:ty => $service_port:ident, $probe_target:ident;)*) => {$(
        impl Codec for ServicePort<$addr> {
            type Raw = $service_port;
            fn encode(&self) -> $service_port {
                $service_port {
                    addr: self.addr.octets(),
                    port: self.port,
                    proto: self.proto.number(),
                    pad: 0,
                }
            }
            fn decode(raw: &$service_port) -> Option<Self> {
                Some(Self {
                    addr: raw.addr.into(),
                    proto: Proto::from_number(raw.proto)?,
                    port: raw.port,
                })
            }
        }

        impl Codec for ProbeTarget<$addr> {
            type Raw = $probe_target;
            fn encode(&self) -> $probe_target {
                $probe_target {
                    addr: self.addr.octets(),
                    port: self.port,
                    pad: 0,
                }
            }
            fn decode(raw: &$probe_target) -> Option<Self> {
                Some(Self {
                    addr: raw.addr.into(),
                    port: raw.port,
                })
            }
        }
    )*};
}

family_codecs! {
    Ipv4Addr => ServicePortV4, ProbeTargetV4;
    Ipv6Addr => ServicePortV6, ProbeTargetV6;
}

/// Set membership: the value of set-like maps.
impl Codec for () {
    type Raw = u8;
    fn encode(&self) -> u8 {
        PRESENT
    }
    fn decode(_: &u8) -> Option<Self> {
        Some(())
    }
}

/// A CIDR as an LPM-trie key.
pub trait Prefix: Sized {
    type Data: aya::Pod;
    fn to_key(&self) -> Key<Self::Data>;
    fn from_key(key: &Key<Self::Data>) -> Option<Self>;
}

impl Prefix for Ipv4Net {
    type Data = [u8; 4];
    fn to_key(&self) -> Key<[u8; 4]> {
        Key::new(u32::from(self.prefix_len()), self.network().octets())
    }
    fn from_key(key: &Key<[u8; 4]>) -> Option<Self> {
        Self::new(
            Ipv4Addr::from(key.data()),
            u8::try_from(key.prefix_len()).ok()?,
        )
        .ok()
    }
}

impl Prefix for Ipv6Net {
    type Data = [u8; 16];
    fn to_key(&self) -> Key<[u8; 16]> {
        Key::new(u32::from(self.prefix_len()), self.network().octets())
    }
    fn from_key(key: &Key<[u8; 16]>) -> Option<Self> {
        Self::new(
            Ipv6Addr::from(key.data()),
            u8::try_from(key.prefix_len()).ok()?,
        )
        .ok()
    }
}

/// The first 64 bits of an IPv6 address: the key of the /64 subnet front
/// (`kube_ovn_ebpf_common::exact`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ipv6Prefix64(pub [u8; 8]);

impl Ipv6Prefix64 {
    pub fn of(addr: Ipv6Addr) -> Self {
        let o = addr.octets();
        Self([o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7]])
    }
}

impl Codec for Ipv6Prefix64 {
    type Raw = [u8; 8];
    fn encode(&self) -> [u8; 8] {
        self.0
    }
    fn decode(raw: &[u8; 8]) -> Option<Self> {
        Some(Self(*raw))
    }
}
