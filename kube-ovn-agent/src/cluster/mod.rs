//! The Kubernetes objects the agent reads, and a snapshot of them.
//!
//! Services, Nodes, Pods and ServiceCIDRs are the k8s-openapi types. Kube-OVN's Subnet is
//! declared here with only the fields the translation uses; unknown fields are ignored so newer
//! Kube-OVN versions parse.

use std::{borrow::Cow, sync::Arc};

use k8s_openapi::{
    api::{
        core::v1::{Node, Pod, Service},
        networking::v1::ServiceCIDR,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::core::{ClusterResourceScope, Resource};
use serde::{Deserialize, Serialize};

/// `kubeovn.io/v1` Subnet (cluster-scoped).
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Subnet {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: SubnetSpec,
    /// Why `spec` did not decode (it is then empty). A Subnet decodes even so: one bad Subnet
    /// must not fail the list of all of them (a CRD schema can let through what the spec
    /// fields' types refuse); the sources reject it alone and name it.
    #[serde(skip)]
    pub decode_error: Option<String>,
}

impl<'de> Deserialize<'de> for Subnet {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Raw {
            #[serde(default)]
            metadata: ObjectMeta,
            #[serde(default)]
            spec: Option<serde_json::Value>,
        }
        let raw = Raw::deserialize(deserializer)?;
        let (spec, decode_error) = match raw.spec.map(SubnetSpec::deserialize) {
            None => (SubnetSpec::default(), None),
            Some(Ok(spec)) => (spec, None),
            Some(Err(error)) => (SubnetSpec::default(), Some(format!("spec: {error}"))),
        };
        Ok(Self {
            metadata: raw.metadata,
            spec,
            decode_error,
        })
    }
}

/// The Subnet fields Kube-OVN's PREROUTING ipsets depend on (spec §2).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SubnetSpec {
    /// VPC name; the default VPC is Kube-OVN's `--cluster-router` (`ovn-cluster`).
    #[serde(default)]
    pub vpc: String,
    /// One CIDR, or an IPv4 and an IPv6 CIDR separated by a comma (dual stack).
    #[serde(default)]
    pub cidr_block: String,
    /// `IPv4`, `IPv6` or `Dual`.
    #[serde(default)]
    pub protocol: String,
    /// Set for underlay subnets.
    #[serde(default)]
    pub vlan: String,
    #[serde(default)]
    pub logical_gateway: bool,
    #[serde(default)]
    pub u2o_interconnection: bool,
    #[serde(default)]
    pub nat_outgoing: bool,
    /// `distributed` or `centralized`.
    #[serde(default)]
    pub gateway_type: String,
}

impl Resource for Subnet {
    type DynamicType = ();
    type Scope = ClusterResourceScope;

    fn kind((): &()) -> Cow<'_, str> {
        "Subnet".into()
    }
    fn group((): &()) -> Cow<'_, str> {
        "kubeovn.io".into()
    }
    fn version((): &()) -> Cow<'_, str> {
        "v1".into()
    }
    fn plural((): &()) -> Cow<'_, str> {
        "subnets".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// Everything the translation reads from the cluster, at one point in time.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub subnets: Vec<Arc<Subnet>>,
    pub services: Vec<Arc<Service>>,
    pub nodes: Vec<Arc<Node>>,
    /// `networking.k8s.io/v1` ServiceCIDRs; empty where the cluster does not serve the API.
    pub service_cidrs: Vec<Arc<ServiceCIDR>>,
    /// Pods on this node (for the TPROXY replacement).
    pub pods: Vec<Arc<Pod>>,
}

/// The kinds a source delivers, for status, metrics and RBAC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Subnet,
    Service,
    Node,
    ServiceCidr,
    Pod,
}

impl Kind {
    pub const ALL: [Self; 5] = [
        Self::Subnet,
        Self::Service,
        Self::Node,
        Self::ServiceCidr,
        Self::Pod,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Subnet => "Subnet",
            Self::Service => "Service",
            Self::Node => "Node",
            Self::ServiceCidr => "ServiceCIDR",
            Self::Pod => "Pod",
        }
    }

    /// (API group, resource plural) — the RBAC rule this kind needs.
    pub fn api_resource(self) -> (&'static str, &'static str) {
        match self {
            Self::Subnet => ("kubeovn.io", "subnets"),
            Self::Service => ("", "services"),
            Self::Node => ("", "nodes"),
            Self::ServiceCidr => ("networking.k8s.io", "servicecidrs"),
            Self::Pod => ("", "pods"),
        }
    }
}

/// The annotation holding a pod's subnet (Kube-OVN's `LogicalSwitchAnnotationTemplate` for the
/// `ovn` provider).
pub const LOGICAL_SWITCH_ANNOTATION: &str = "ovn.kubernetes.io/logical_switch";

/// The annotation holding a Node's join-subnet address(es) (Kube-OVN's `IPAddressAnnotation`).
/// kube-ovn-cni programs exactly the address families it names: `c.protocol` is
/// `CheckProtocol` of it (<https://github.com/kubeovn/kube-ovn/blob/v1.16.2/pkg/daemon/controller.go#L162>),
/// and iptables/ipset handles exist only for those families
/// (<https://github.com/kubeovn/kube-ovn/blob/v1.16.2/pkg/daemon/controller_linux.go#L116>).
pub const IP_ADDRESS_ANNOTATION: &str = "ovn.kubernetes.io/ip_address";

/// Labels that keep a Service away from kube-proxy: its informers list Services with
/// `!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless`
/// (<https://github.com/kubernetes/kubernetes/blob/v1.33.0/cmd/kube-proxy/app/server.go#L550-L577>),
/// so such a Service is in none of kube-proxy's sets.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";

/// The label selector kube-proxy (and the kube source) lists Services with.
pub const KUBE_PROXY_SERVICE_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

/// Whether kube-proxy ignores this Service because of its labels.
pub fn ignored_by_kube_proxy(meta: &ObjectMeta) -> bool {
    meta.labels.as_ref().is_some_and(|labels| {
        labels.contains_key(SERVICE_PROXY_NAME_LABEL) || labels.contains_key(HEADLESS_LABEL)
    })
}

/// `namespace/name` or `name` of an object, for messages.
pub fn object_name(meta: &ObjectMeta) -> String {
    match (&meta.namespace, &meta.name) {
        (Some(ns), Some(name)) => format!("{ns}/{name}"),
        (None, Some(name)) => name.clone(),
        _ => "<unnamed>".into(),
    }
}

/// One object of any kind the translation reads, shared with the source that holds it.
#[derive(Clone, Debug)]
pub enum Object {
    Subnet(Arc<Subnet>),
    Service(Arc<Service>),
    Node(Arc<Node>),
    ServiceCidr(Arc<ServiceCIDR>),
    Pod(Arc<Pod>),
}

/// A created, changed or deleted object, as a source saw it: what an incremental translation
/// consumes instead of a whole [`Snapshot`].
#[derive(Clone, Debug)]
pub struct ObjectChange {
    pub kind: Kind,
    /// `namespace/name` or `name` ([`object_name`]).
    pub key: String,
    /// The object now; `None` when it was deleted.
    pub object: Option<Object>,
}

/// The kinds a source watches, typed: how a watched object becomes an [`Object`].
pub trait Watched: Sized {
    const KIND: Kind;
    fn object(this: Arc<Self>) -> Object;
    fn meta(&self) -> &ObjectMeta;
}

macro_rules! watched {
    ($($ty:ty => $variant:ident),*) => {$(
        impl Watched for $ty {
            const KIND: Kind = Kind::$variant;
            fn object(this: Arc<Self>) -> Object {
                Object::$variant(this)
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
        }
    )*};
}

watched!(Subnet => Subnet, Service => Service, Node => Node, ServiceCIDR => ServiceCidr, Pod => Pod);

impl Snapshot {
    /// The snapshot as upserts, in kind order (an iterator: a large snapshot is not copied).
    pub fn changes(&self) -> impl Iterator<Item = ObjectChange> + '_ {
        fn of<T: Watched>(objects: &[Arc<T>]) -> impl Iterator<Item = ObjectChange> + '_ {
            objects.iter().map(|o| ObjectChange {
                kind: T::KIND,
                key: object_name(o.meta()),
                object: Some(T::object(Arc::clone(o))),
            })
        }
        of(&self.subnets)
            .chain(of(&self.services))
            .chain(of(&self.nodes))
            .chain(of(&self.service_cidrs))
            .chain(of(&self.pods))
    }
}
