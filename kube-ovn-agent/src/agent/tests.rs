//! The loop's fail-static policy, in-process: a fake [`Kernel`] over in-memory tables, a source
//! whose listing state the test sets, a fixed interface list.

use std::{
    collections::BTreeSet,
    io,
    sync::{Arc, Mutex},
    time::Instant,
};

use ipnet::IpNet;
use tokio::sync::watch;

use super::*;
use crate::{
    cluster::{Kind, Snapshot},
    datapath::attach::{AttachMode, Outcome, TcxOrder},
    host::netlink::Link,
    source::{Change, ClusterSource, KindStatus, SourceStatus},
    testing::objects::spec_cluster,
};

/// Records the attach calls; interfaces in `failing` refuse.
struct FakeKernel {
    tables: Tables,
    attached: Vec<String>,
    detached: Vec<String>,
    failing: BTreeSet<String>,
}

impl Kernel for FakeKernel {
    fn tables(&mut self) -> &mut Tables {
        &mut self.tables
    }

    fn program_id(&self) -> u32 {
        7
    }

    async fn attach(&mut self, ifname: &str) -> Result<Outcome, AttachError> {
        if self.failing.contains(ifname) {
            return Err(AttachError::Pin {
                op: "pinning",
                path: format!("/sys/fs/bpf/test/{ifname}"),
                source: io::Error::from_raw_os_error(libc::EPERM),
            });
        }
        self.attached.push(ifname.to_owned());
        Ok(Outcome::Created)
    }

    fn detach(&mut self, attachment: &Attachment) -> Result<(), AttachError> {
        self.detached.push(attachment.ifname.clone());
        Ok(())
    }
}

/// A source whose snapshot and per-kind listing state the test sets.
struct FakeSource {
    snapshot: Mutex<Snapshot>,
    status: Mutex<SourceStatus>,
    journal: crate::source::Journal,
}

impl ClusterSource for FakeSource {
    fn snapshot(&self) -> Snapshot {
        self.snapshot.lock().expect("lock").clone()
    }
    fn status(&self) -> SourceStatus {
        self.status.lock().expect("lock").clone()
    }
    fn take_changes(&self) -> Changes {
        self.journal.take()
    }
}

impl FakeSource {
    fn list(&self, kind: Kind) {
        self.status
            .lock()
            .expect("lock")
            .kinds
            .entry(kind.name())
            .or_default()
            .listed = true;
    }

    fn list_all(&self) {
        for kind in Kind::ALL {
            self.list(kind);
        }
    }
}

struct Rig {
    agent: Agent<FakeKernel>,
    source: Arc<FakeSource>,
    running: Running,
    net_tx: watch::Sender<Option<NodeNet>>,
    net: watch::Receiver<Option<NodeNet>>,
    _dir: TempDir,
}

/// A directory under the system temp dir, removed on drop (the pin root's lock needs one).
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn link(index: u32, name: &str) -> Link {
    Link {
        index,
        name: name.to_owned(),
        kind: String::new(),
        addrs: Vec::<IpNet>::new(),
        up: true,
        master: None,
        ethernet: true,
    }
}

fn node_net(names: &[&str]) -> NodeNet {
    NodeNet {
        links: names
            .iter()
            .zip(2..)
            .map(|(name, index)| (index, link(index, name)))
            .collect(),
        ..NodeNet::default()
    }
}

impl Rig {
    fn new(ifaces: &[&str]) -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "kovn-agent-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let dir = TempDir(dir);
        let pins = PinRoot::new(&dir.0);
        let lock = pins.lock().expect("locking the temp root");
        let source = Arc::new(FakeSource {
            snapshot: Mutex::new(spec_cluster()),
            status: Mutex::new(SourceStatus {
                kinds: Kind::ALL
                    .iter()
                    .map(|k| (k.name(), KindStatus::default()))
                    .collect(),
            }),
            journal: crate::source::Journal::default(),
        });
        let (_changes_tx, changes) = watch::channel(Change {
            seq: 0,
            received: Instant::now(),
        });
        let running = Running {
            source: source.clone(),
            changes,
        };
        let (net_tx, net) = watch::channel(Some(node_net(ifaces)));
        let attach_config = AttachConfig {
            mode: AttachMode::Tcx,
            tcx_order: TcxOrder::First,
            priority: 1,
            handle: 1,
        };
        let agent = Agent::new(Setup {
            config: Config {
                ifaces: Vec::new(),
                resync_interval: Duration::from_mins(5),
                enable_tproxy: false,
                tproxy_port: 0,
                kube_proxy_mode: KubeProxyMode::Iptables,
                mode: Mode::Enforce,
            },
            node_name: "n1".to_owned(),
            pins,
            lock,
            kernel: FakeKernel {
                tables: Tables::in_memory(),
                attached: Vec::new(),
                detached: Vec::new(),
                failing: BTreeSet::new(),
            },
            attach_config,
            attached: BTreeMap::new(),
            options: Options::default(),
            metrics: Arc::new(Metrics::new()),
            health: Arc::new(Health::default()),
            kube_proxy: None,
            startup: None,
        });
        Self {
            agent,
            source,
            running,
            net_tx,
            net,
            _dir: dir,
        }
    }

    async fn pass(&mut self) {
        self.agent
            .reconcile(&self.running, &self.net, Instant::now())
            .await;
    }

    fn programmed(&mut self) -> crate::state::MapState {
        self.agent.kernel.tables().current()
    }
}

#[tokio::test]
async fn prunes_only_after_every_kind_listed() {
    let mut rig = Rig::new(&["eth0"]);
    // What an earlier agent left programmed: a subnet the cluster no longer has.
    let stale: ipnet::Ipv4Net = "10.99.0.0/16".parse().expect("cidr");
    let mut left = crate::state::MapState::default();
    left.v4.subnets.insert(stale);
    rig.agent.kernel.tables().apply(&left, false);

    for kind in Kind::ALL.into_iter().take(Kind::ALL.len() - 1) {
        rig.source.list(kind);
        rig.pass().await;
        assert!(
            rig.programmed().v4.subnets.contains(&stale),
            "pruned with only some kinds listed (last listed: {kind:?})"
        );
    }
    rig.source.list_all();
    rig.pass().await;
    let programmed = rig.programmed();
    assert!(
        !programmed.v4.subnets.contains(&stale),
        "not pruned with every kind listed"
    );
    assert!(
        programmed
            .v4
            .subnets
            .contains(&"10.16.0.0/16".parse().expect("cidr")),
        "the cluster's subnets are written once listed: {:?}",
        programmed.v4.subnets
    );
}

#[tokio::test]
async fn before_the_listing_only_interfaces_are_synced() {
    let mut rig = Rig::new(&["eth0"]);
    rig.pass().await;
    let programmed = rig.programmed();
    assert_eq!(
        programmed.ifaces.keys().copied().collect::<Vec<_>>(),
        vec![2],
        "the interface map follows the node before the listing"
    );
    assert!(
        programmed.v4.subnets.is_empty() && programmed.v4.rules == 0,
        "rules or entries written from a partial view: {programmed:?}"
    );

    // A new interface is followed too, still without the cluster's entries.
    rig.net_tx
        .send(Some(node_net(&["eth0", "eth1"])))
        .expect("receiver alive");
    rig.pass().await;
    let programmed = rig.programmed();
    assert_eq!(
        programmed.ifaces.keys().copied().collect::<Vec<_>>(),
        vec![2, 3]
    );
    assert!(programmed.v4.subnets.is_empty());
}

#[tokio::test]
async fn detaches_only_on_a_complete_view() {
    let mut rig = Rig::new(&["eth0", "eth1"]);
    rig.pass().await;
    assert_eq!(rig.agent.kernel.attached, ["eth0", "eth1"]);

    // eth1 goes away before the listing is complete: its attachment stays.
    rig.net_tx
        .send(Some(node_net(&["eth0"])))
        .expect("receiver alive");
    rig.pass().await;
    assert!(
        rig.agent.kernel.detached.is_empty(),
        "detached from a partial view: {:?}",
        rig.agent.kernel.detached
    );
    assert!(rig.agent.attached.contains_key("eth1"));

    rig.source.list_all();
    rig.pass().await;
    assert_eq!(rig.agent.kernel.detached, ["eth1"]);
    assert!(!rig.agent.attached.contains_key("eth1"));
}

#[tokio::test]
async fn a_lasting_fault_is_remembered_once_and_cleared() {
    let mut rig = Rig::new(&["eth0", "eth1"]);
    rig.source.list_all();
    rig.agent.kernel.failing.insert("eth1".to_owned());
    for _ in 0..5 {
        // The failed attach keeps an attach pass owed, so each pass retries.
        rig.pass().await;
        assert_eq!(
            rig.agent.faults.len(),
            1,
            "one failing interface is one remembered fault, however many passes"
        );
        assert!(rig.agent.attach_due, "a failed attach is retried");
    }
    rig.agent.kernel.failing.clear();
    rig.pass().await;
    assert!(
        rig.agent.faults.is_empty(),
        "the fault clears once the attach works"
    );
    assert!(!rig.agent.attach_due);
    assert!(rig.agent.kernel.attached.iter().any(|i| i == "eth1"));
}

/// After the first complete pass, changes reach the maps through the source's journal (the
/// snapshot is not read again: the objects below are only in the journal), deletes included;
/// a relist re-reads the snapshot and drops what it no longer has.
#[tokio::test]
async fn changes_flow_through_the_journal_and_a_relist_rereads() {
    use crate::testing::objects::{Port, service, subnet};
    let mut rig = Rig::new(&["eth0"]);
    rig.agent.options.kube_proxy_sets = KubeProxySets::IPVS;
    rig.source.list_all();
    rig.pass().await;
    let full = rig.programmed();
    assert!(
        full.v4
            .subnets
            .contains(&"10.16.0.0/16".parse().expect("cidr"))
    );

    let svc = Arc::new(service(
        "default/new",
        "ClusterIP",
        &["10.96.7.7"],
        &[Port("TCP", 8443, None)],
        false,
    ));
    let key = crate::state::ServicePort {
        addr: "10.96.7.7".parse().expect("ip"),
        proto: crate::state::Proto::Tcp,
        port: 8443,
    };
    rig.source.journal.upsert(svc);
    rig.source
        .journal
        .upsert(Arc::new(subnet("extra", "10.55.0.0/16")));
    rig.pass().await;
    let programmed = rig.programmed();
    assert!(programmed.v4.service_ports.contains(&key), "{programmed:?}");
    assert!(
        programmed
            .v4
            .subnets
            .contains(&"10.55.0.0/16".parse().expect("cidr"))
    );
    assert_eq!(
        programmed.v4.service_ports.len(),
        full.v4.service_ports.len() + 1,
        "only the change was added"
    );

    rig.source
        .journal
        .record(Kind::Service, "default/new".into(), None);
    rig.pass().await;
    assert!(!rig.programmed().v4.service_ports.contains(&key));
    assert!(
        rig.programmed()
            .v4
            .subnets
            .contains(&"10.55.0.0/16".parse().expect("cidr"))
    );

    // A relist: the snapshot (without the extra Subnet) is the whole truth again.
    rig.source.journal.reset();
    rig.pass().await;
    assert_eq!(rig.programmed(), full);
}
