//! The reconcile loop of `kube-ovn-agent run`: watch → translate → apply, and keep the program
//! attached.
//!
//! Fail-static throughout: a source outage, a bad object, a full map or a failed attach is
//! logged when it appears and when it clears (not every pass), counted, and leaves the
//! programmed state alone; SIGTERM exits without detaching. The kernel is behind [`Kernel`] (the
//! attach calls; the map tables are [`Tables`], whose backends are already behind a trait), so
//! the policy is tested in-process (`tests.rs`).

mod mode;
mod startup;
mod swap_retry;
#[cfg(test)]
mod tests;

pub use mode::{MODE_LABEL, Mode, node_mode};
pub use startup::StartupClock;
use swap_retry::SwapRetry;

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    net::{Ipv4Addr, Ipv6Addr},
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use tokio::{signal::unix::SignalKind, sync::watch};

use crate::{
    datapath::Datapath,
    datapath::attach::{self, AttachConfig, AttachError, Attachment},
    datapath::maps::{SyncReport, Tables},
    datapath::pins::{PinRoot, RootLock},
    diag,
    faults::{Fault, FaultLog},
    host::KubeProxyMode,
    host::clobber,
    host::ipset,
    host::netlink::{self, IfaceOverride, NodeNet},
    metrics::{ErrorKind, Health, Metrics},
    source::{Changes, Running},
    translate::{self, KubeProxySets, NodeFacts, Options},
};

/// Kube-OVN re-checks kube-proxy's ipsets every gateway pass (3 s).
const KUBE_PROXY_POLL: Duration = Duration::from_secs(3);
const CLOBBER_POLL: Duration = Duration::from_mins(1);
/// How often the agent checks that its pins are still there (`detach --force` removes them).
const PIN_CHECK: Duration = Duration::from_secs(2);

/// Why the loop ended other than by a signal.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the cluster source stopped")]
    SourceStopped,
    #[error("the interface watcher stopped")]
    NetStopped,
    #[error("installing the signal handlers")]
    Signals(#[source] std::io::Error),
}

/// What the loop needs from `run`'s flags besides the translation [`Options`]
/// (`cli::RunArgs` converts into it).
#[derive(Clone, Debug)]
pub struct Config {
    /// `--iface` role overrides, applied after discovery.
    pub ifaces: Vec<IfaceOverride>,
    /// Full re-read of the pinned maps and an attach pass this often.
    pub resync_interval: Duration,
    pub enable_tproxy: bool,
    pub tproxy_port: u16,
    pub kube_proxy_mode: KubeProxyMode,
    /// `--mode`: what the node label (if any) overrides.
    pub mode: Mode,
}

/// The calls the loop makes into the kernel for attachments; the maps are the [`Tables`].
pub trait Kernel {
    fn tables(&mut self) -> &mut Tables;
    /// The loaded program's id, recorded in [`Attachment`]s.
    fn program_id(&self) -> u32;
    /// Attaches the program to `ifname`, or finds it attached.
    fn attach(
        &mut self,
        ifname: &str,
    ) -> impl Future<Output = Result<attach::Outcome, AttachError>>;
    fn detach(&mut self, attachment: &Attachment) -> Result<(), AttachError>;
    /// The tables now hold a complete view without a map error (a map-layout migration
    /// finishes here: `Datapath::finish_migration`).
    fn complete_view_written(&mut self) -> impl Future<Output = ()> {
        async {}
    }
    /// Swaps in a program loaded with the node's current frozen values when they changed
    /// (`Datapath::reload`); true when it did.
    fn follow_frozen_config(&mut self) -> impl Future<Output = bool> {
        async { false }
    }
}

/// The real thing: the loaded [`Datapath`], its pins and an rtnetlink handle.
pub struct KernelDatapath {
    pub datapath: Datapath,
    pub pins: PinRoot,
    pub config: AttachConfig,
    pub rtnl: rtnetlink::Handle,
    /// Paces [`Kernel::follow_frozen_config`]'s swap while it fails.
    swap_retry: SwapRetry,
}

impl KernelDatapath {
    pub fn new(
        datapath: Datapath,
        pins: PinRoot,
        config: AttachConfig,
        rtnl: rtnetlink::Handle,
    ) -> Self {
        Self {
            datapath,
            pins,
            config,
            rtnl,
            swap_retry: SwapRetry::default(),
        }
    }
}

impl Kernel for KernelDatapath {
    fn tables(&mut self) -> &mut Tables {
        &mut self.datapath.tables
    }

    fn program_id(&self) -> u32 {
        self.datapath.program_id
    }

    async fn attach(&mut self, ifname: &str) -> Result<attach::Outcome, AttachError> {
        let program_id = self.datapath.program_id;
        // While maps migrate, attachments keep the old program (on the old maps) until the new
        // maps hold the complete view.
        let existing = if self.datapath.migrating.is_empty() {
            attach::Existing::Replace
        } else {
            attach::Existing::Keep
        };
        attach::ensure(
            self.datapath.program(),
            program_id,
            &self.pins,
            self.config,
            &self.rtnl,
            ifname,
            existing,
        )
        .await
    }

    async fn complete_view_written(&mut self) {
        if self.datapath.migrating.is_empty() {
            return;
        }
        if let Err(e) = self
            .datapath
            .finish_migration(&self.pins, self.config, &self.rtnl)
            .await
        {
            tracing::warn!(
                error = %e,
                "map layout migration not finished; the old program keeps marking where it runs, \
                 retrying after the next complete sync"
            );
        }
    }

    fn detach(&mut self, attachment: &Attachment) -> Result<(), AttachError> {
        attach::remove(&self.pins, attachment)
    }

    async fn follow_frozen_config(&mut self) -> bool {
        let now = self.datapath.load_config;
        let want = now.with_tcp_loose(crate::datapath::object::tcp_loose());
        if want == now {
            if self.swap_retry.succeeded() == swap_retry::Report::Recovered {
                tracing::info!(
                    "nf_conntrack_tcp_loose is back to the value the running program was loaded with"
                );
            }
            return false;
        }
        let attempt = Instant::now();
        if !self.swap_retry.due(attempt) {
            return false;
        }
        match self
            .datapath
            .reload(&self.pins, want, self.config, &self.rtnl)
            .await
        {
            Ok(reloaded) => {
                if self.swap_retry.succeeded() == swap_retry::Report::Recovered {
                    tracing::info!(
                        ?want,
                        "program with the new nf_conntrack_tcp_loose swapped in"
                    );
                }
                reloaded
            }
            Err(e) => {
                let error = diag::render_error(&e);
                if self.swap_retry.failed(attempt, error.clone()) == swap_retry::Report::Failing {
                    tracing::warn!(
                        %error,
                        ?want,
                        "nf_conntrack_tcp_loose changed but the program could not be swapped; the \
                         one loaded with the old value keeps running; retrying with a growing \
                         delay (up to 5 min), logged again only if the error changes"
                    );
                }
                false
            }
        }
    }
}

/// Everything [`Agent::new`] takes, prepared by `run`'s setup.
pub struct Setup<K> {
    pub config: Config,
    pub node_name: String,
    pub pins: PinRoot,
    pub lock: RootLock,
    pub kernel: K,
    pub attach_config: AttachConfig,
    /// Attachments found at start, by interface name.
    pub attached: BTreeMap<String, Attachment>,
    pub options: Options,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    /// kube-proxy's mode as detected at start (`auto` only).
    pub kube_proxy: Option<ipset::DetectedMode>,
    /// The startup phases so far and when the source began listing; the loop adds the rest
    /// up to the first ready.
    pub startup: Option<(StartupClock, Instant)>,
}

pub struct Agent<K> {
    config: Config,
    node_name: String,
    pins: PinRoot,
    /// The root's lock, held for the agent's life.
    lock: RootLock,
    kernel: K,
    attach_config: AttachConfig,
    /// Our attachments, by interface name.
    attached: BTreeMap<String, Attachment>,
    options: Options,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    /// The faults present now, so a lasting fault is logged when it appears and clears only.
    faults: FaultLog,
    /// The translation, kept current one object change at a time.
    engine: translate::Incremental,
    /// What the next pass owes beyond the changes it takes.
    owed: Owed,
    /// kube-proxy's mode as `auto` last detected it.
    kube_proxy: Option<ipset::DetectedMode>,
    clobber_findings: BTreeSet<String>,
    ready: bool,
    /// Interface roles and listing state at the last attach pass.
    last_roles: BTreeMap<String, (u32, u32)>,
    last_listed: bool,
    /// An attach pass is owed (a failure to retry, or the periodic resync).
    attach_due: bool,
    /// The TPROXY listener addresses of the last translation, and what the last listener
    /// check found.
    tproxy_ips: (Option<Ipv4Addr>, Option<Ipv6Addr>),
    tproxy_listeners: netlink::TproxyListeners,
    /// Interfaces whose last attach attempt failed.
    attach_failed: BTreeSet<String>,
    /// Unix seconds of the last pass that applied a complete view without a map error.
    last_sync_unix: Option<u64>,
    /// Where the mode in force came from: `flag` or `node label`.
    mode_from: &'static str,
    /// The last readiness verdict published (and logged).
    last_readiness: Option<bool>,
    /// Until the first ready: the startup phases and when the source began listing.
    startup: Option<(StartupClock, Instant)>,
    /// Then: the phases, as `/status` shows them.
    startup_record: Option<crate::metrics::Startup>,
}

impl<K: Kernel> Agent<K> {
    pub fn new(setup: Setup<K>) -> Self {
        Self {
            config: setup.config,
            node_name: setup.node_name,
            pins: setup.pins,
            lock: setup.lock,
            kernel: setup.kernel,
            attach_config: setup.attach_config,
            attached: setup.attached,
            options: setup.options,
            metrics: setup.metrics,
            health: setup.health,
            faults: FaultLog::default(),
            engine: translate::Incremental::default(),
            owed: Owed::Reread,
            kube_proxy: setup.kube_proxy,
            clobber_findings: BTreeSet::new(),
            ready: false,
            last_roles: BTreeMap::new(),
            last_listed: false,
            attach_due: true,
            tproxy_ips: (None, None),
            tproxy_listeners: netlink::TproxyListeners::default(),
            attach_failed: BTreeSet::new(),
            last_sync_unix: None,
            mode_from: "flag",
            last_readiness: None,
            startup: setup.startup,
            startup_record: None,
        }
    }

    /// Runs until SIGTERM or SIGINT (`Ok`) or until the source or the interface watcher stops.
    pub async fn main_loop(
        &mut self,
        mut running: Running,
        mut node_net: watch::Receiver<Option<NodeNet>>,
    ) -> Result<(), Error> {
        let mut sigterm =
            tokio::signal::unix::signal(SignalKind::terminate()).map_err(Error::Signals)?;
        let mut sigint =
            tokio::signal::unix::signal(SignalKind::interrupt()).map_err(Error::Signals)?;
        let mut kube_proxy_poll = tokio::time::interval(KUBE_PROXY_POLL);
        let mut clobber_poll = tokio::time::interval(CLOBBER_POLL);
        let mut resync = tokio::time::interval(self.config.resync_interval);
        let mut pin_check = tokio::time::interval(PIN_CHECK);
        resync.tick().await;
        let mut pending: Option<Instant> = Some(Instant::now());
        // The clobber check runs the iptables save tools, seconds on a node with a large
        // ruleset: in the background, so cluster changes keep flowing while it runs.
        let mut clobber_check: Option<tokio::task::JoinHandle<clobber::Report>> = None;
        loop {
            self.health.beat();
            if let Some(since) = pending.take() {
                let synced = self.last_sync_unix;
                self.reconcile(&running, &node_net, since).await;
                // A pass that wrote the complete view without a map error moves the stamp.
                if self.last_sync_unix != synced {
                    self.kernel.complete_view_written().await;
                }
            }
            tokio::select! {
                changed = running.changes.changed() => {
                    if changed.is_err() {
                        return Err(Error::SourceStopped);
                    }
                    pending = Some(running.changes.borrow_and_update().received);
                }
                changed = node_net.changed() => {
                    if changed.is_err() {
                        return Err(Error::NetStopped);
                    }
                    pending = Some(Instant::now());
                }
                _ = kube_proxy_poll.tick() => {
                    let kube_proxy_changed = self.poll_kube_proxy();
                    let listener_changed = self.poll_tproxy_listener();
                    // A new program on every attachment: the pass records its id.
                    let reloaded = self.kernel.follow_frozen_config().await;
                    self.attach_due |= reloaded;
                    if kube_proxy_changed || listener_changed || reloaded {
                        pending = Some(Instant::now());
                    }
                }
                _ = clobber_poll.tick() => {
                    if clobber_check.is_none() {
                        clobber_check = Some(tokio::task::spawn_blocking(|| {
                            clobber::check(Duration::from_secs(10))
                        }));
                    }
                }
                report = async { clobber_check.as_mut().expect("guarded").await },
                    if clobber_check.is_some() => {
                    clobber_check = None;
                    self.record_clobber(&report.unwrap_or_default());
                }
                _ = pin_check.tick() => {
                    if self.check_pins() {
                        // A pass re-decides readiness (lost with the pins).
                        pending = Some(Instant::now());
                    }
                }
                _ = resync.tick() => {
                    self.reread_maps();
                    self.owed = self.owed.max(Owed::FullWrite);
                    self.attach_due = true;
                    pending = Some(Instant::now());
                }
                _ = sigterm.recv() => break,
                _ = sigint.recv() => break,
            }
        }
        match &self.pins.not_persistent {
            None => tracing::info!(
                "stopping; the datapath stays attached and programmed (`detach` removes it)"
            ),
            Some(why) => tracing::warn!(
                reason = %why,
                "stopping; the pins go with this agent's mount namespace: tcx attachments are \
                 released, netlink filters keep marking with the maps as they are"
            ),
        }
        Ok(())
    }

    /// Whether our pins were removed behind our back: no more attaching, unhealthy.
    fn pins_missing(&self) -> bool {
        self.health.pins_missing.load(Ordering::Relaxed)
    }

    /// Notices pins removed behind our back (`detach --force`): from then on the agent stops
    /// attaching (re-attaching would half undo what the operator did, and fails for tcx), and
    /// says so on `/healthz`, in `kovn_pins_present` and in the log. True when it just found
    /// them gone.
    fn check_pins(&mut self) -> bool {
        if self.pins_missing() || self.lock.intact(&self.pins) {
            return false;
        }
        self.health.pins_missing.store(true, Ordering::Relaxed);
        self.metrics.pins_present.set(0);
        tracing::error!(
            root = %self.pins.root.display(),
            "this agent's pins were removed (detach --force?): marking has stopped; the agent \
             no longer attaches and reports unhealthy (/healthz 503, kovn_pins_present 0) \
             until it restarts, which re-creates them"
        );
        true
    }

    /// One pass: translate the current snapshot and write it, attach where roles changed.
    pub async fn reconcile(
        &mut self,
        running: &Running,
        node_net: &watch::Receiver<Option<NodeNet>>,
        since: Instant,
    ) {
        let started = Instant::now();
        self.follow_source(running);
        let followed = Instant::now();
        let status = running.source.status();
        *self.metrics.live.source.lock().expect("lock") = status.clone();
        self.note_source_faults(&status);
        self.follow_mode_label();
        let Some(net) = node_net.borrow().clone() else {
            return;
        };
        let node_ips = self.engine.own_internal_ips(&self.node_name);
        let roles = netlink::iface_roles(
            &net,
            &node_ips,
            &self.config.ifaces,
            self.config.enable_tproxy,
        );
        let listed = status.all_listed();
        // Attaching costs syscalls per interface: only when the interfaces changed, a previous
        // attempt failed, or on the periodic resync.
        let attach_pass = self.attach_due || roles != self.last_roles || listed != self.last_listed;
        if attach_pass && !self.pins_missing() {
            self.attach_due = !self.ensure_attachments(&roles, listed).await;
            self.last_roles.clone_from(&roles);
            self.last_listed = listed;
        }
        let attached = Instant::now();

        let facts = NodeFacts {
            node_name: self.node_name.clone(),
            local_v4: net.local_v4.clone(),
            local_v6: net.local_v6.clone(),
            ifaces: roles.values().copied().collect(),
        };
        let step = self.engine.translate(&facts, &self.options);
        let translated = Instant::now();
        let desired = self.engine.desired_mut();
        self.tproxy_ips = (desired.v4.tproxy_listener, desired.v6.tproxy_listener);
        desired.v4.tproxy_listener_opaque = self.tproxy_listeners.v4_opaque;
        desired.v6.tproxy_listener_opaque = self.tproxy_listeners.v6_opaque;
        let issues = self.engine.issues();
        self.metrics
            .translation_issues
            .set(i64::try_from(issues.len()).unwrap_or(i64::MAX));
        let issues = issues
            .iter()
            .map(|issue| Fault::new(format!("skipped: {issue}")));
        // Counted once per distinct problem; the gauge above says how many are current.
        for _ in self.faults.pass("translate", issues).new {
            self.metrics.error(ErrorKind::Translate);
        }

        let report = self.write_maps(listed, &step);
        let written = Instant::now();
        // One summary per map and kind of failure: a full map refuses every entry past its
        // capacity, tens of thousands in one pass.
        let map_faults = self.kernel.tables().faults(&report.errors);
        for fault in &map_faults {
            self.metrics.error(fault.kind);
        }
        self.faults.pass(
            "maps",
            map_faults
                .iter()
                .map(|fault| Fault::keyed(fault.key(), fault.to_string())),
        );
        if report.written + report.removed > 0 {
            tracing::debug!(
                written = report.written,
                removed = report.removed,
                "maps synced"
            );
            self.metrics
                .event_to_write
                .observe(since.elapsed().as_secs_f64());
        }
        self.metrics
            .sync_duration
            .observe(started.elapsed().as_secs_f64());
        *self.metrics.live.map_sizes.lock().expect("lock") = self.kernel.tables().sizes();
        if listed && map_faults.is_empty() {
            let now = unix_now();
            self.last_sync_unix = Some(now);
            self.metrics
                .last_sync
                .set(now.try_into().unwrap_or(i64::MAX));
        }
        if listed && !self.ready {
            if let Some((clock, list_start)) = &mut self.startup {
                clock.span("list", *list_start, started);
                clock.span("snapshot", started, followed);
                clock.span("attach", followed, attached);
                clock.span("translate", attached, translated);
                clock.span("map_write", translated, written);
            }
            self.ready = true;
            tracing::info!(
                elapsed_ms = started.elapsed().as_millis(),
                entries = ?self.kernel.tables().sizes(),
                "first full sync done"
            );
        }
        self.publish_readiness(&status, &roles);
    }

    /// Brings the engine up to date with the source: the changes since the last pass, or the
    /// whole snapshot when the source or this agent lost track. Changes are taken first, then
    /// (on a reset) the snapshot: a change landing in between is in both, and applying it
    /// twice is harmless.
    fn follow_source(&mut self, running: &Running) {
        match running.source.take_changes() {
            Changes::Objects(changes) if self.owed != Owed::Reread => {
                for change in changes {
                    self.engine.apply(change);
                }
            }
            Changes::Objects(_) | Changes::Reset => {
                // Services are translated where the source keeps them, not copied out.
                self.engine
                    .reset_with(|service| running.source.read(service));
                // The engine's previous state is freed.
                crate::source::release_freed_memory();
                self.owed = Owed::FullWrite;
            }
        }
    }

    /// Writes the engine's desired state: everything (a diff against every map) when the rules
    /// or interfaces changed or a full write is owed, else only what this pass touched; before
    /// every kind has listed, only the interfaces.
    fn write_maps(&mut self, listed: bool, step: &translate::Step) -> SyncReport {
        let desired = self.engine.desired();
        let report = if listed && (step.full || self.owed >= Owed::FullWrite) {
            // Only a complete view may remove entries or change the rules in force.
            self.owed = Owed::Touched;
            self.kernel.tables().apply(desired, true)
        } else if listed {
            // What this pass's changes touched, against maps fully synced before.
            self.kernel.tables().apply_touched(desired, &step.touched)
        } else {
            // Until then keep what is programmed; just follow interface changes. The first
            // complete pass then writes everything.
            self.owed = self.owed.max(Owed::FullWrite);
            let ifaces = desired.ifaces.iter().map(|(i, r)| (*i, *r));
            let table = self.kernel.tables().ifaces.sync(ifaces, false);
            SyncReport {
                written: table.written,
                removed: table.removed,
                errors: table.errors,
            }
        };
        if !report.errors.is_empty() {
            // A failed write is retried by a full write next pass (this pass's touched keys
            // are gone).
            self.owed = self.owed.max(Owed::FullWrite);
        }
        report
    }

    /// A kind is at fault while its feed fails; the next list or event (or two quiet minutes)
    /// clears it, and the fault log says "resolved".
    fn note_source_faults(&mut self, status: &crate::source::SourceStatus) {
        let now = crate::source::unix_now();
        let source_faults = status.kinds.iter().filter_map(|(kind, s)| {
            s.last_error
                .as_ref()
                .filter(|_| s.failing_at(now))
                .map(|error| Fault::new(format!("source {kind}: {error}")))
        });
        self.faults.pass("source", source_faults);
    }

    /// Re-decides readiness after a pass (`crate::metrics::readiness`) and publishes it on `/readyz`,
    /// `/status`, `kovn_ready` and `kovn_interface_attached`; logs each change.
    fn publish_readiness(
        &mut self,
        source: &crate::source::SourceStatus,
        roles: &BTreeMap<String, (u32, u32)>,
    ) {
        let interfaces: Vec<crate::metrics::InterfaceState> = roles
            .iter()
            .map(|(name, (_, bits))| crate::metrics::InterfaceState {
                name: name.clone(),
                role: crate::state::role_names(*bits).join("+"),
                // Attempted in the last attach pass (every role change causes one) and not
                // failed: `attach::ensure` found or put our program there.
                attached: self.last_roles.contains_key(name) && !self.attach_failed.contains(name),
            })
            .collect();
        let reasons =
            crate::metrics::readiness(source, self.ready, !self.pins_missing(), &interfaces);
        let ready = reasons.is_empty();
        if ready && let Some((mut clock, _)) = self.startup.take() {
            clock.phase("ready");
            let record = clock.record().clone();
            tracing::info!(
                program = %record.program,
                phases = %record
                    .phases
                    .iter()
                    .map(|p| format!("{} {:.1} ms (at {:.1})", p.name, ms(p.took_us), ms(p.start_us)))
                    .collect::<Vec<_>>()
                    .join(", "),
                "startup phases"
            );
            self.startup_record = Some(record);
        }
        if self.last_readiness != Some(ready) {
            if ready {
                tracing::info!(
                    "ready: the complete view is applied and every interface with a role is attached"
                );
            } else {
                tracing::warn!(reasons = ?reasons, "not ready");
            }
            self.last_readiness = Some(ready);
        }
        self.health.ready.store(ready, Ordering::Relaxed);
        self.metrics.ready.set(i64::from(ready));
        (*self.metrics.live.interfaces.lock().expect("lock")).clone_from(&interfaces);
        let mut status = self.health.status.lock().expect("lock");
        *status = crate::metrics::AgentStatus {
            version: crate::cli::VERSION.to_owned(),
            commit: crate::cli::COMMIT.to_owned(),
            node: self.node_name.clone(),
            mode: if self.options.shadow {
                "shadow"
            } else {
                "enforce"
            }
            .to_owned(),
            mode_from: self.mode_from.to_owned(),
            ready,
            not_ready: reasons,
            last_sync_unix: self.last_sync_unix,
            interfaces,
            source: crate::metrics::SourceKindState::from_status(source),
            bpffs_not_persistent: self.pins.not_persistent.clone(),
            startup: self.startup_record.clone(),
        };
    }

    /// Applies this node's `kube-ovn-ebpf.io/mode` label (over `--mode`) to the next
    /// translation; logs a change and an unusable value once.
    fn follow_mode_label(&mut self) {
        let labels = self
            .engine
            .node(&self.node_name)
            .and_then(|n| n.metadata.labels.as_ref());
        let (mode, from, complaint) = node_mode(labels, self.config.mode);
        self.faults.pass("mode label", complaint.map(Fault::new));
        let shadow = mode == Mode::Shadow;
        if shadow != self.options.shadow || from != self.mode_from {
            tracing::info!(mode = ?mode, from, "mode");
            self.options.shadow = shadow;
            self.mode_from = from;
            self.metrics.set_mode(shadow);
        }
    }

    /// Returns whether every attachment is in place.
    async fn ensure_attachments(
        &mut self,
        roles: &BTreeMap<String, (u32, u32)>,
        listed: bool,
    ) -> bool {
        let mut complete = true;
        let mut faults = Vec::new();
        self.attach_failed.clear();
        let program_id = self.kernel.program_id();
        for ifname in roles.keys() {
            let outcome = self.kernel.attach(ifname).await;
            match outcome {
                Ok(attach::Outcome::Kept) => {}
                Ok(outcome) => {
                    tracing::info!(ifname, ?outcome, mode = ?self.attach_config.mode, "attached");
                    self.attached.insert(
                        ifname.clone(),
                        Attachment {
                            ifname: ifname.clone(),
                            mode: self.attach_config.mode,
                            program_id,
                            link_id: None,
                            filter: Some((self.attach_config.priority, self.attach_config.handle)),
                        },
                    );
                }
                Err(e) => {
                    complete = false;
                    self.attach_failed.insert(ifname.clone());
                    self.metrics.error(ErrorKind::Attach);
                    faults.push(Fault::new(format!(
                        "attaching to {ifname} failed: {}",
                        diag::render_error(&e)
                    )));
                }
            }
        }
        // Detaching waits for a complete view: before the Nodes are listed, a NIC's role is unknown.
        if listed {
            let stale: Vec<String> = self
                .attached
                .keys()
                .filter(|name| !roles.contains_key(*name))
                .cloned()
                .collect();
            for ifname in stale {
                let attachment = self.attached.remove(&ifname).expect("listed above");
                match self.kernel.detach(&attachment) {
                    Ok(()) => {
                        tracing::info!(ifname, "detached: the interface no longer has a role");
                    }
                    Err(e) => {
                        self.metrics.error(ErrorKind::Attach);
                        faults.push(Fault::new(format!("detaching from {ifname} failed: {e}")));
                    }
                }
            }
        }
        self.faults.pass("attach", faults);
        self.metrics
            .attached_interfaces
            .set(i64::try_from(self.attached.len()).unwrap_or(i64::MAX));
        complete
    }

    /// Re-checks (with `--enable-tproxy`) whether the probe listener the kernel would pick lacks
    /// `IP_TRANSPARENT`, as Kube-OVN's listener can be restarted at any time; true when that
    /// changed. A failed check keeps the last answer.
    fn poll_tproxy_listener(&mut self) -> bool {
        if !self.config.enable_tproxy {
            return false;
        }
        let listeners = match netlink::tcp_listeners() {
            Ok(listeners) => {
                self.faults.pass("sock_diag", []);
                listeners
            }
            Err(e) => {
                self.metrics.error(ErrorKind::SockDiag);
                self.faults.pass(
                    "sock_diag",
                    [Fault::new(format!(
                        "listing TCP listeners (sock_diag) failed: {e}"
                    ))],
                );
                return false;
            }
        };
        let (v4, v6) = self.tproxy_ips;
        let now = netlink::TproxyListeners::decide(&listeners, self.config.tproxy_port, v4, v6);
        if now == self.tproxy_listeners {
            return false;
        }
        let families = [
            ("IPv4", self.tproxy_listeners.v4_opaque, now.v4_opaque),
            ("IPv6", self.tproxy_listeners.v6_opaque, now.v6_opaque),
        ];
        for (family, before, opaque) in families {
            let port = self.config.tproxy_port;
            match (before, opaque) {
                (false, true) => tracing::warn!(
                    family,
                    port,
                    "the TPROXY probe listener lacks IP_TRANSPARENT: probes are dropped, not handed to it"
                ),
                (true, false) => tracing::info!(
                    family,
                    port,
                    "the TPROXY probe listener is usable again: probes are handed to it"
                ),
                _ => {}
            }
        }
        self.tproxy_listeners = now;
        true
    }

    /// Re-detects kube-proxy's IPVS sets in `auto` mode; true when they changed.
    fn poll_kube_proxy(&mut self) -> bool {
        let detected = match self.config.kube_proxy_mode {
            KubeProxyMode::Auto => match ipset::detect_kube_proxy() {
                Ok(detection) => {
                    self.faults.pass("ipset", []);
                    if self.kube_proxy != Some(detection.mode) {
                        tracing::info!(mode = %detection.mode, "kube-proxy mode changed");
                        self.kube_proxy = Some(detection.mode);
                    }
                    detection.sets
                }
                Err(e) => {
                    self.metrics.error(ErrorKind::Ipset);
                    self.faults.pass(
                        "ipset",
                        [Fault::new(format!(
                            "checking kube-proxy's ipsets failed: {e}"
                        ))],
                    );
                    return false;
                }
            },
            explicit => kube_proxy_sets(explicit, self.options.kube_proxy_sets),
        };
        if detected == self.options.kube_proxy_sets {
            return false;
        }
        tracing::info!(?detected, "kube-proxy IPVS sets changed");
        self.options.kube_proxy_sets = detected;
        true
    }

    fn record_clobber(&mut self, report: &clobber::Report) {
        self.metrics
            .mark_clobber_rules
            .set(i64::try_from(report.findings.len()).unwrap_or(i64::MAX));
        let current: BTreeSet<String> = report
            .findings
            .iter()
            .map(clobber::Finding::summary)
            .collect();
        for finding in current.difference(&self.clobber_findings) {
            tracing::warn!(mitigation = clobber::MITIGATION, "mark clobber: {finding}");
        }
        self.clobber_findings = current;
    }

    fn reread_maps(&mut self) {
        let result = self.kernel.tables().refresh_all();
        if let Err(e) = &result {
            self.metrics.error(e.kind());
        }
        let fault = result
            .err()
            .map(|e| Fault::new(format!("re-reading the pinned maps failed: {e}")));
        self.faults.pass("refresh", fault);
    }
}

/// What a pass owes beyond writing what its changes touched, least to most.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Owed {
    Touched,
    /// Write the whole desired state: after a re-read, the periodic map refresh, a pass
    /// before every kind listed, a failed write.
    FullWrite,
    /// Re-read the source's snapshot into the engine (at start).
    Reread,
}

/// kube-proxy's IPVS sets for an explicit `--kube-proxy-mode`; `current` (the last detection)
/// in `auto` mode.
pub fn kube_proxy_sets(mode: KubeProxyMode, current: KubeProxySets) -> KubeProxySets {
    match mode {
        KubeProxyMode::Auto => current,
        KubeProxyMode::Ipvs => KubeProxySets::IPVS,
        KubeProxyMode::Iptables | KubeProxyMode::Nftables | KubeProxyMode::None => {
            KubeProxySets::default()
        }
    }
}

#[expect(clippy::cast_precision_loss, reason = "µs of a startup fit f64")]
fn ms(us: u64) -> f64 {
    us as f64 / 1e3
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}
