//! Prometheus metrics and the health endpoints (`/metrics`, `/healthz`, `/readyz`).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use aya::maps::{MapData, PerCpuArray};
use kube_ovn_ebpf_common::counter;
use prometheus_client::{
    collector::Collector,
    encoding::{
        DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
    },
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Metric, Registry},
};
use tokio::sync::{Semaphore, oneshot};

use serde::{Deserialize, Serialize};

use crate::{
    agent::Mode,
    source::{KIND_STATES, SourceStatus, unix_now as source_now},
};

/// `kovn_errors_total{kind}`: what failed. Each is counted once per distinct fault (a map's
/// faults once per map and kind per pass), not once per refused entry.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum ErrorKind {
    /// A map refused entries past its capacity.
    MapFull,
    /// Any other failed map write or removal.
    MapWrite,
    MapRead,
    /// A pinned map is missing or not the layout this build expects.
    MapLayout,
    Attach,
    /// Objects the translation skipped.
    Translate,
    Ipset,
    /// The TPROXY listener check.
    SockDiag,
}

impl ErrorKind {
    pub const ALL: [Self; 8] = [
        Self::MapFull,
        Self::MapWrite,
        Self::MapRead,
        Self::MapLayout,
        Self::Attach,
        Self::Translate,
        Self::Ipset,
        Self::SockDiag,
    ];

    /// The `kind` label's value (docs/operations.md lists them; alert rules match on them).
    pub const fn label(self) -> &'static str {
        match self {
            Self::MapFull => "map_full",
            Self::MapWrite => "map_write",
            Self::MapRead => "map_read",
            Self::MapLayout => "map_layout",
            Self::Attach => "attach",
            Self::Translate => "translate",
            Self::Ipset => "ipset",
            Self::SockDiag => "sock_diag",
        }
    }
}

impl EncodeLabelValue for ErrorKind {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        std::fmt::Write::write_str(encoder, self.label())
    }
}

impl EncodeLabelValue for Mode {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        std::fmt::Write::write_str(
            encoder,
            match self {
                Mode::Enforce => "enforce",
                Mode::Shadow => "shadow",
            },
        )
    }
}

/// The label sets, one per family that has labels.
pub mod labels {
    use prometheus_client::encoding::EncodeLabelSet;

    use super::{ErrorKind, Mode};

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct Error {
        pub kind: ErrorKind,
    }

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct BuildInfo {
        pub version: &'static str,
        pub commit: &'static str,
        pub program_tag: String,
    }

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct ModeIs {
        pub mode: Mode,
    }

    /// `kovn_datapath_packets`: a datapath counter slot's name.
    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct Counter {
        pub counter: &'static str,
    }

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct Map {
        pub map: &'static str,
    }

    /// A watched kind (`kovn_source_*`).
    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct Kind {
        pub kind: &'static str,
    }

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct KindState {
        pub kind: &'static str,
        pub state: &'static str,
    }

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct Interface {
        pub interface: String,
        pub role: String,
    }
}

/// One scrape-time family: its descriptor, then one sample per label set.
fn encode_family<L: EncodeLabelSet, M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    (name, help, metric_type): (&str, &str, MetricType),
    samples: impl IntoIterator<Item = (L, M)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, metric_type)?;
    for (labels, metric) in samples {
        metric.encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A scrape-time gauge of a count or a timestamp (saturating at `i64::MAX`).
fn gauge<T: TryInto<i64>>(value: T) -> ConstGauge<i64> {
    ConstGauge::new(value.try_into().unwrap_or(i64::MAX))
}

/// Registers `metric` and hands it back for the agent to update.
fn register<M: Metric + Clone>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M {
    registry.register(name, help, metric.clone());
    metric
}

/// One interface that has a role on this node, and whether our program is attached to it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceState {
    pub name: String,
    /// Its roles, `+`-joined (`ovn0`, `nic`, `nic+no-ethernet`, …).
    pub role: String,
    pub attached: bool,
}

/// One kind's feed as `/status` and `status` show it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceKindState {
    pub kind: String,
    /// `listing`, `watching` or `failing`.
    pub state: String,
    pub objects: usize,
    pub errors: u64,
    pub relists: u64,
    pub last_event_unix: Option<u64>,
    pub last_error: Option<String>,
}

impl SourceKindState {
    pub fn from_status(status: &SourceStatus) -> Vec<Self> {
        status
            .kinds
            .iter()
            .map(|(kind, s)| Self {
                kind: (*kind).to_owned(),
                state: s.state_at(source_now()).to_owned(),
                objects: s.objects,
                errors: s.errors,
                relists: s.relists,
                last_event_unix: s.last_event_unix,
                last_error: s.last_error.clone(),
            })
            .collect()
    }
}

/// What the running agent says about itself on `/status` (read by `status`): the facts only it
/// knows, which the pins do not hold.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    pub version: String,
    pub commit: String,
    pub node: String,
    /// `enforce` or `shadow`, as the agent programs it now.
    pub mode: String,
    /// Where the mode came from: `flag` (`--mode`) or `node label` (`kube-ovn-ebpf.io/mode`).
    pub mode_from: String,
    pub ready: bool,
    /// Why it is not ready (empty when ready): the `/readyz` body.
    pub not_ready: Vec<String>,
    /// Unix seconds of the last pass that applied a complete view without a map error.
    pub last_sync_unix: Option<u64>,
    pub interfaces: Vec<InterfaceState>,
    pub source: Vec<SourceKindState>,
    /// Why the pins will not outlive the agent (a bpffs it mounted in a mount namespace of its
    /// own); absent when they will.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bpffs_not_persistent: Option<String>,
    /// Where the time to the first ready went; absent until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startup: Option<Startup>,
}

/// Process start → first ready, phase by phase (`agent::StartupClock`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Startup {
    /// How the program came to run: `reused` (pinned by an earlier run of this build and
    /// configuration: neither loaded nor verified), `loaded` (nothing was pinned), `replacing`
    /// (replaces the pinned program in place) or `migrating` (a map-layout migration).
    pub program: String,
    /// In the order they ended; overlapping phases (`list` runs beside `datapath`) say so by
    /// their start.
    pub phases: Vec<StartupPhase>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartupPhase {
    pub name: String,
    /// µs from process start.
    pub start_us: u64,
    pub took_us: u64,
}

impl AgentStatus {
    /// The lines `status` prints for the agent; ages are relative to `now` (Unix seconds).
    pub fn text(&self, now: u64) -> String {
        use std::fmt::Write as _;
        let age = |at: Option<u64>| {
            at.map_or_else(
                || "never".to_owned(),
                |at| format!("{} s ago", now.saturating_sub(at)),
            )
        };
        let mut out = String::new();
        let _ = writeln!(
            out,
            "agent         {} on node {} — version {} (commit {}), mode {} (from {}), last sync {}",
            if self.ready { "ready" } else { "NOT READY" },
            self.node,
            self.version,
            self.commit,
            self.mode,
            self.mode_from,
            age(self.last_sync_unix)
        );
        for reason in &self.not_ready {
            let _ = writeln!(out, "not ready     {reason}");
        }
        if let Some(why) = &self.bpffs_not_persistent {
            let _ = writeln!(out, "bpffs         NOT PERSISTENT: {why}");
        }
        for (i, iface) in self.interfaces.iter().enumerate() {
            let label = if i == 0 { "interfaces" } else { "" };
            let _ = writeln!(
                out,
                "{label:<13} {:<15} {:<20} {}",
                iface.name,
                iface.role,
                if iface.attached {
                    "attached"
                } else {
                    "NOT ATTACHED"
                }
            );
        }
        for (i, kind) in self.source.iter().enumerate() {
            let label = if i == 0 { "source" } else { "" };
            let _ = write!(
                out,
                "{label:<13} {:<12} {:<8} {} objects, {} lists, {} errors, last event {}",
                kind.kind,
                kind.state,
                kind.objects,
                kind.relists,
                kind.errors,
                age(kind.last_event_unix)
            );
            match &kind.last_error {
                Some(error) if kind.state == "failing" => {
                    let _ = writeln!(out, ", error: {error}");
                }
                _ => out.push('\n'),
            }
        }
        out
    }
}

/// `kovn_bpffs_persistent`: whether the pins outlive the agent (0: a bpffs it mounted in a
/// mount namespace of its own, see `PinRoot::prepare`). Fixed for the process's life.
pub fn register_bpffs_persistent(registry: &mut Registry, persistent: bool) {
    let gauge: Gauge = Gauge::default();
    gauge.set(i64::from(persistent));
    registry.register(
        "kovn_bpffs_persistent",
        "1 when the pins (and with them tcx attachments) outlive the agent; 0 when the agent \
         mounted its bpffs in a mount namespace of its own, which takes them along when it exits",
        gauge,
    );
}

/// Why `status` got no [`AgentStatus`].
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("no agent answered on {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("reading {addr}/status: {source}")]
    Io {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{addr}/status answered {status_line:?}")]
    Status {
        addr: SocketAddr,
        status_line: String,
    },
    #[error("{addr}/status is not an agent status: {source}")]
    Decode {
        addr: SocketAddr,
        source: serde_json::Error,
    },
}

/// Largest `/status` body read (a node with hundreds of interfaces stays far below).
const MAX_STATUS_BYTES: u64 = 4 << 20;

/// `GET /status` of the agent at `addr` (one HTTP/1.0 request, blocking, each step bounded by
/// `timeout`).
pub fn fetch_status(addr: SocketAddr, timeout: Duration) -> Result<AgentStatus, FetchError> {
    use std::io::{Read as _, Write as _};
    let io = |source| FetchError::Io { addr, source };
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)
        .map_err(|source| FetchError::Connect { addr, source })?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    stream
        .write_all(b"GET /status HTTP/1.0\r\nHost: agent\r\n\r\n")
        .map_err(io)?;
    let mut response = Vec::new();
    stream
        .take(MAX_STATUS_BYTES)
        .read_to_end(&mut response)
        .map_err(io)?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status_line = head.lines().next().unwrap_or_default();
    if status_line.split_whitespace().nth(1) != Some("200") {
        return Err(FetchError::Status {
            addr,
            status_line: status_line.to_owned(),
        });
    }
    serde_json::from_str(body).map_err(|source| FetchError::Decode { addr, source })
}

/// Whether the node marks what its roles say, from one reconcile pass. Ready means all of:
/// every watched kind has been listed completely and that complete view was applied to the maps
/// (so entries are in place and stale ones pruned); the agent's pins are still under its root;
/// at least one interface has a role; and the program is attached to every interface that has
/// one (ovn0, the NodePort NICs, provider bridges, `lo` with TPROXY). A full map or a later
/// watch outage does not take readiness away (the programmed state stays and marks; alerts
/// report those); a lost attachment or removed pins do. Returns the reasons it is not ready,
/// empty when ready.
pub fn readiness(
    source: &SourceStatus,
    complete_view_applied: bool,
    pins_present: bool,
    interfaces: &[InterfaceState],
) -> Vec<String> {
    let mut reasons = Vec::new();
    let unlisted: Vec<&str> = source
        .kinds
        .iter()
        .filter(|(_, s)| !s.listed)
        .map(|(kind, _)| *kind)
        .collect();
    if !unlisted.is_empty() {
        reasons.push(format!(
            "waiting for the first complete list of {}",
            unlisted.join(", ")
        ));
    } else if !complete_view_applied {
        reasons.push("the complete view is not applied to the maps yet".to_owned());
    }
    if !pins_present {
        reasons.push(
            "this agent's pins were removed (detach --force?): marking has stopped".to_owned(),
        );
    }
    if interfaces.is_empty() {
        reasons.push("no interface has a role on this node: nothing would be marked".to_owned());
    }
    for iface in interfaces.iter().filter(|i| !i.attached) {
        reasons.push(format!(
            "not attached to {} (role {})",
            iface.name, iface.role
        ));
    }
    reasons
}

/// Values read from the kernel and the source at scrape time.
#[derive(Default)]
pub struct Live {
    pub counters: Mutex<Option<PerCpuArray<MapData, u64>>>,
    pub map_sizes: Mutex<Vec<(&'static str, usize)>>,
    /// Each map's `max_entries`.
    pub map_capacities: Mutex<Vec<(&'static str, usize)>>,
    pub source: Mutex<SourceStatus>,
    /// Interfaces with a role and their attach state.
    pub interfaces: Mutex<Vec<InterfaceState>>,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live").finish_non_exhaustive()
    }
}

impl Collector for Live {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counters = self.counters.lock().ok().and_then(|c| {
            c.as_ref()
                .and_then(|c| crate::datapath::maps::read_counters(c).ok())
        });
        if let Some(values) = counters {
            encode_family(
                &mut encoder,
                (
                    "kovn_datapath_packets",
                    "Packets by rule hit or by why they were not classified (per-CPU map, summed)",
                    MetricType::Counter,
                ),
                counter::NAMES.iter().zip(values).map(|(name, value)| {
                    (labels::Counter { counter: name }, ConstCounter::new(value))
                }),
            )?;
        }
        let sizes = self.map_sizes.lock().map(|s| s.clone()).unwrap_or_default();
        if !sizes.is_empty() {
            encode_family(
                &mut encoder,
                (
                    "kovn_map_entries",
                    "Entries in each datapath map",
                    MetricType::Gauge,
                ),
                sizes
                    .into_iter()
                    .map(|(map, size)| (labels::Map { map }, gauge(size))),
            )?;
        }
        let capacities = self
            .map_capacities
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default();
        if !capacities.is_empty() {
            encode_family(
                &mut encoder,
                (
                    "kovn_map_capacity",
                    "Entries each datapath map can hold (max_entries); compare with \
                     kovn_map_entries",
                    MetricType::Gauge,
                ),
                capacities
                    .into_iter()
                    .map(|(map, capacity)| (labels::Map { map }, gauge(capacity))),
            )?;
        }
        let source = self.source.lock().map(|s| s.clone()).unwrap_or_default();
        encode_source(&source, &mut encoder)?;
        let interfaces = self
            .interfaces
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default();
        encode_interfaces(&interfaces, &mut encoder)?;
        Ok(())
    }
}

/// The per-kind source families.
fn encode_source(
    source: &SourceStatus,
    encoder: &mut DescriptorEncoder,
) -> Result<(), std::fmt::Error> {
    if source.kinds.is_empty() {
        return Ok(());
    }
    let now = source_now();
    let kinds = || {
        source
            .kinds
            .iter()
            .map(|(kind, s)| (labels::Kind { kind }, s))
    };
    encode_family(
        encoder,
        (
            "kovn_source_listed",
            "1 once a kind has been listed completely",
            MetricType::Gauge,
        ),
        kinds().map(|(kind, s)| (kind, gauge(s.listed))),
    )?;
    encode_family(
        encoder,
        (
            "kovn_source_errors",
            "Watch failures and rejected inputs per kind",
            MetricType::Counter,
        ),
        kinds().map(|(kind, s)| (kind, ConstCounter::new(s.errors))),
    )?;
    encode_family(
        encoder,
        (
            "kovn_source_relists",
            "Complete lists received per kind, the first included (file source: file \
             versions applied)",
            MetricType::Counter,
        ),
        kinds().map(|(kind, s)| (kind, ConstCounter::new(s.relists))),
    )?;
    encode_family(
        encoder,
        (
            "kovn_source_last_event_timestamp_seconds",
            "Unix time of the last complete list or watch event per kind",
            MetricType::Gauge,
        ),
        kinds().filter_map(|(kind, s)| Some((kind, gauge(s.last_event_unix?)))),
    )?;
    encode_family(
        encoder,
        (
            "kovn_source_state",
            "1 for each kind's feed state: listing (no complete list yet), watching, failing \
             (errors in the last 2 minutes and no list or event since: the view is stale)",
            MetricType::Gauge,
        ),
        source.kinds.iter().flat_map(|(kind, s)| {
            let current = s.state_at(now);
            KIND_STATES
                .into_iter()
                .map(move |state| (labels::KindState { kind, state }, gauge(current == state)))
        }),
    )
}

/// `kovn_interface_attached`.
fn encode_interfaces(
    interfaces: &[InterfaceState],
    encoder: &mut DescriptorEncoder,
) -> Result<(), std::fmt::Error> {
    if interfaces.is_empty() {
        return Ok(());
    }
    encode_family(
        encoder,
        (
            "kovn_interface_attached",
            "1 while the program is attached to an interface that has a role, 0 while \
             attaching to it fails",
            MetricType::Gauge,
        ),
        interfaces.iter().map(|iface| {
            let labels = labels::Interface {
                interface: iface.name.clone(),
                role: iface.role.clone(),
            };
            (labels, gauge(iface.attached))
        }),
    )
}

/// Metrics the agent updates as it works.
pub struct Metrics {
    pub registry: Registry,
    pub live: Arc<Live>,
    /// Seconds per reconcile pass (snapshot → translate → map diff → writes).
    pub sync_duration: Histogram,
    /// Seconds from a watch event (or file change) reaching the agent to the map write.
    pub event_to_write: Histogram,
    /// Faults by [`ErrorKind`].
    pub errors: Family<labels::Error, Counter>,
    /// Objects the last translation had to skip.
    pub translation_issues: Gauge,
    /// Rules found that can clear our mark bits (see `status`).
    pub mark_clobber_rules: Gauge,
    pub attached_interfaces: Gauge,
    pub ready: Gauge,
    /// 1 while the pins under the root are the ones this agent created (0 after `detach --force`).
    pub pins_present: Gauge,
    /// 1, labelled with the version, commit and loaded program tag.
    pub build_info: Family<labels::BuildInfo, Gauge>,
    /// 1 for the mode in force, 0 for the other.
    pub mode: Family<labels::ModeIs, Gauge>,
    /// Unix seconds of the last pass that applied a complete view without a map error.
    pub last_sync: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let live = Arc::new(Live::default());
        let pins_present = Gauge::default();
        pins_present.set(1);
        // Registration order is the order of `/metrics`.
        Self {
            sync_duration: register(
                &mut registry,
                "kovn_sync_duration_seconds",
                "Duration of a reconcile pass",
                Histogram::new(exponential_buckets(0.000_05, 2.0, 18)),
            ),
            event_to_write: register(
                &mut registry,
                "kovn_event_to_map_write_seconds",
                "Latency from a cluster or node change to the map write that reflects it",
                Histogram::new(exponential_buckets(0.000_05, 2.0, 18)),
            ),
            errors: register(
                &mut registry,
                "kovn_errors",
                "Errors by kind",
                Family::default(),
            ),
            translation_issues: register(
                &mut registry,
                "kovn_translation_issues",
                "Objects skipped or partly ignored by the last translation",
                Gauge::default(),
            ),
            mark_clobber_rules: register(
                &mut registry,
                "kovn_mark_clobber_rules",
                "netfilter rules after TC ingress that can clear our mark bits",
                Gauge::default(),
            ),
            attached_interfaces: register(
                &mut registry,
                "kovn_attached_interfaces",
                "Interfaces the classifier is attached to",
                Gauge::default(),
            ),
            ready: register(
                &mut registry,
                "kovn_ready",
                "1 after the first full sync",
                Gauge::default(),
            ),
            pins_present: register(
                &mut registry,
                "kovn_pins_present",
                "1 while this agent's pins exist under its bpffs root; 0 once they were removed \
                 behind its back (detach --force): marking has stopped",
                pins_present,
            ),
            build_info: register(
                &mut registry,
                "kovn_build_info",
                "1, labelled with the agent's version and commit and the loaded program's tag",
                Family::default(),
            ),
            mode: register(
                &mut registry,
                "kovn_mode",
                "1 for the mode the datapath runs in (enforce writes marks, shadow counts only)",
                Family::default(),
            ),
            last_sync: register(
                &mut registry,
                "kovn_last_sync_timestamp_seconds",
                "Unix time of the last reconcile pass that applied a complete view without a map \
                 error",
                Gauge::default(),
            ),
            registry: {
                registry.register_collector(Box::new(live.clone()));
                registry
            },
            live,
        }
    }

    /// Sets `kovn_build_info` once the program is loaded.
    pub fn set_build_info(&self, program_tag: &str) {
        let labels = labels::BuildInfo {
            version: crate::cli::VERSION,
            commit: crate::cli::COMMIT,
            program_tag: program_tag.to_owned(),
        };
        self.build_info.get_or_create(&labels).set(1);
    }

    /// Sets `kovn_mode`: 1 for `current`, 0 for the other mode.
    pub fn set_mode(&self, shadow: bool) {
        for (mode, on) in [(Mode::Enforce, !shadow), (Mode::Shadow, shadow)] {
            self.mode
                .get_or_create(&labels::ModeIs { mode })
                .set(i64::from(on));
        }
    }

    pub fn error(&self, kind: ErrorKind) {
        self.errors.get_or_create(&labels::Error { kind }).inc();
    }

    pub fn render(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

/// What the health endpoints report.
#[derive(Default)]
pub struct Health {
    pub ready: AtomicBool,
    /// What `/status` serves; its `not_ready` is the `/readyz` body.
    pub status: Mutex<AgentStatus>,
    /// Set once the pins were removed behind the agent's back: `/healthz` fails from then on.
    pub pins_missing: AtomicBool,
    /// Unix seconds of the last loop iteration; `/healthz` fails if it stops moving.
    pub heartbeat: AtomicU64,
}

impl Health {
    pub fn beat(&self) {
        self.heartbeat.store(unix_now(), Ordering::Relaxed);
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// How long the loop may go silent before `/healthz` fails.
const STALL: Duration = Duration::from_mins(2);

struct Served {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

/// Bounds of the HTTP server. The endpoint has no authentication and, with `hostNetwork`, sits on
/// the node's address: whatever connects must not be able to exhaust the agent's descriptors.
#[derive(Clone, Copy, Debug)]
pub struct ServeLimits {
    /// Connections kept open at once; a new one past this closes the longest-open one (after
    /// its request in flight, if any), so a fresh probe is always served.
    pub max_connections: usize,
    /// How long a connection may take to send a request's headers, and how long it may stay
    /// idle between requests, before it is closed.
    pub idle_timeout: Duration,
}

impl Default for ServeLimits {
    fn default() -> Self {
        Self {
            max_connections: 64,
            idle_timeout: Duration::from_secs(10),
        }
    }
}

/// How long an evicted connection may take to finish its request before it is dropped.
const EVICTION_GRACE: Duration = Duration::from_secs(1);
/// Pause after a failed accept (out of descriptors, say) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves until the process ends.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    serve_on(listener, ServeLimits::default(), metrics, health).await
}

/// Serves on `listener` within `limits` until the process ends.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    limits: ServeLimits,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(render))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/status", get(agent_status))
        .with_state(Arc::new(Served { metrics, health }));
    // One permit per open connection: the bound is strict, sockets included.
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    // Open connections by age; each entry closes its connection when sent to.
    let open: Arc<Mutex<BTreeMap<u64, oneshot::Sender<()>>>> = Arc::default();
    let mut accept_failing = false;
    let mut next_id = 0u64;
    loop {
        let permit = if let Ok(permit) = permits.clone().try_acquire_owned() {
            permit
        } else {
            // Full: close the longest-open connection and take its permit once it is gone.
            let oldest = open
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .pop_first();
            if let Some((_, close)) = oldest {
                let _ = close.send(());
            }
            permits
                .clone()
                .acquire_owned()
                .await
                .expect("the semaphore is never closed")
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                if std::mem::take(&mut accept_failing) {
                    tracing::info!("metrics server accepts connections again");
                }
                stream
            }
            Err(e) => {
                if !std::mem::replace(&mut accept_failing, true) {
                    tracing::warn!(error = %e, "metrics server cannot accept connections");
                }
                drop(permit);
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let id = next_id;
        next_id += 1;
        let (close, closed) = oneshot::channel();
        open.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id, close);
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let open = open.clone();
        tokio::spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            // hyper runs this timer whenever it waits for a request head, so it bounds both a
            // slow sender and an idle keep-alive connection.
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.idle_timeout);
            let connection =
                builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = closed => {
                    connection.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(EVICTION_GRACE, connection.as_mut()).await;
                }
            }
            open.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&id);
            drop(permit);
        });
    }
}

async fn render(State(served): State<Arc<Served>>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        served.metrics.render(),
    )
}

async fn healthz(State(served): State<Arc<Served>>) -> impl IntoResponse {
    if served.health.pins_missing.load(Ordering::Relaxed) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "the pins under the bpffs root were removed (detach --force?): marking has stopped; \
             restarting the agent re-creates them\n",
        );
    }
    let last = served.health.heartbeat.load(Ordering::Relaxed);
    if unix_now().saturating_sub(last) <= STALL.as_secs() {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "reconcile loop stalled\n")
    }
}

/// 200 `ready` when [`readiness`] found nothing missing at the last pass, else 503 with one
/// reason per line.
async fn readyz(State(served): State<Arc<Served>>) -> impl IntoResponse {
    if served.health.ready.load(Ordering::Relaxed) {
        return (StatusCode::OK, "ready\n".to_owned());
    }
    let status = served
        .health
        .status
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut body = String::new();
    for reason in &status.not_ready {
        body.push_str(reason);
        body.push('\n');
    }
    if body.is_empty() {
        body.push_str("first reconcile pass not done\n");
    }
    (StatusCode::SERVICE_UNAVAILABLE, body)
}

async fn agent_status(State(served): State<Arc<Served>>) -> impl IntoResponse {
    let status = served
        .health
        .status
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        serde_json::to_string(&status).unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_renders_every_family() {
        let metrics = Metrics::new();
        metrics.error(ErrorKind::MapFull);
        metrics.sync_duration.observe(0.002);
        metrics
            .live
            .map_sizes
            .lock()
            .unwrap()
            .push(("kovn_subnets4", 3));
        let text = metrics.render();
        for needle in [
            "kovn_errors_total{kind=\"map_full\"} 1",
            "kovn_sync_duration_seconds_count 1",
            "kovn_map_entries{map=\"kovn_subnets4\"} 3",
            "kovn_ready 0",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
    }

    #[test]
    fn every_error_kind_renders_its_documented_label() {
        let metrics = Metrics::new();
        let operations = include_str!("../../docs/operations.md");
        for kind in ErrorKind::ALL {
            metrics.error(kind);
            let label = kind.label();
            let needle = format!("kovn_errors_total{{kind=\"{label}\"}} 1");
            assert!(metrics.render().contains(&needle), "missing {needle:?}");
            assert!(
                operations.contains(&format!("`{label}`")),
                "docs/operations.md does not list {label:?}"
            );
        }
    }

    #[test]
    fn new_families_render_with_their_labels() {
        let metrics = Metrics::new();
        metrics.set_build_info("0123456789abcdef");
        metrics.set_mode(true);
        metrics.last_sync.set(1_700_000_000);
        let (feed, _rx) = crate::source::Feed::new(&[crate::cluster::Kind::Node]);
        feed.listed(crate::cluster::Kind::Node, 2);
        *metrics.live.source.lock().unwrap() = feed.status();
        metrics
            .live
            .interfaces
            .lock()
            .unwrap()
            .push(InterfaceState {
                name: "ovn0".into(),
                role: "ovn0".into(),
                attached: true,
            });
        let text = metrics.render();
        let build_info = format!(
            "kovn_build_info{{version=\"{}\",commit=\"{}\",program_tag=\"0123456789abcdef\"}} 1",
            crate::cli::VERSION,
            crate::cli::COMMIT
        );
        for needle in [
            build_info.as_str(),
            "kovn_mode{mode=\"shadow\"} 1",
            "kovn_mode{mode=\"enforce\"} 0",
            "kovn_last_sync_timestamp_seconds 1700000000",
            "kovn_interface_attached{interface=\"ovn0\",role=\"ovn0\"} 1",
            "kovn_source_relists_total{kind=\"Node\"} 1",
            "kovn_source_state{kind=\"Node\",state=\"watching\"} 1",
            "kovn_source_state{kind=\"Node\",state=\"failing\"} 0",
            "kovn_source_last_event_timestamp_seconds{kind=\"Node\"} ",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
    }

    fn iface(name: &str, attached: bool) -> InterfaceState {
        InterfaceState {
            name: name.into(),
            role: "nic".into(),
            attached,
        }
    }

    #[test]
    fn readiness_needs_a_complete_applied_view_pins_and_every_attachment() {
        use crate::cluster::Kind;
        let (feed, _rx) = crate::source::Feed::new(&[Kind::Node, Kind::Service]);
        feed.listed(Kind::Node, 1);
        let attached = [iface("ovn0", true), iface("eth0", true)];
        let reasons = readiness(&feed.status(), false, true, &attached);
        assert_eq!(
            reasons,
            ["waiting for the first complete list of Service"],
            "{reasons:?}"
        );
        feed.listed(Kind::Service, 0);
        let source = feed.status();
        assert_eq!(
            readiness(&source, false, true, &attached),
            ["the complete view is not applied to the maps yet"]
        );
        assert!(readiness(&source, true, true, &attached).is_empty());
        // A watch failing after the first list keeps readiness: the programmed state marks.
        feed.error(Kind::Service, "connection refused".into());
        assert!(readiness(&feed.status(), true, true, &attached).is_empty());
        let reasons = readiness(
            &source,
            true,
            true,
            &[iface("ovn0", true), iface("eth1", false)],
        );
        assert_eq!(reasons, ["not attached to eth1 (role nic)"]);
        assert_eq!(
            readiness(&source, true, true, &[]),
            ["no interface has a role on this node: nothing would be marked"]
        );
        assert_eq!(readiness(&source, true, false, &attached).len(), 1);
    }

    fn get(addr: SocketAddr, path: &str) -> (String, String) {
        use std::io::{Read as _, Write as _};
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        write!(stream, "GET {path} HTTP/1.0\r\nHost: a\r\n\r\n").unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        (head.lines().next().unwrap().to_owned(), body.to_owned())
    }

    #[test]
    fn readyz_and_status_follow_the_published_verdict_both_ways() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let health = Arc::new(Health::default());
        runtime.spawn(serve_on(
            listener,
            ServeLimits::default(),
            Arc::new(Metrics::new()),
            health.clone(),
        ));
        let publish = |ready: bool, reasons: &[&str]| {
            health.ready.store(ready, Ordering::Relaxed);
            let mut status = health.status.lock().unwrap();
            status.ready = ready;
            status.node = "n1".into();
            status.not_ready = reasons.iter().map(|r| (*r).to_owned()).collect();
        };
        publish(false, &["not attached to eth1 (role nic)"]);
        let (line, body) = get(addr, "/readyz");
        assert!(line.contains("503"), "{line}");
        assert_eq!(body, "not attached to eth1 (role nic)\n");
        let fetched = fetch_status(addr, Duration::from_secs(2)).unwrap();
        assert_eq!(
            (
                fetched.ready,
                fetched.not_ready.len(),
                fetched.node.as_str()
            ),
            (false, 1, "n1")
        );
        assert!(fetched.text(0).contains("NOT READY on node n1"));
        publish(true, &[]);
        let (line, body) = get(addr, "/readyz");
        assert!(line.contains("200"), "{line}");
        assert_eq!(body, "ready\n");
        assert!(fetch_status(addr, Duration::from_secs(2)).unwrap().ready);
        publish(
            false,
            &["this agent's pins were removed (detach --force?): marking has stopped"],
        );
        assert!(
            get(addr, "/readyz").0.contains("503"),
            "readiness can be lost again"
        );
        drop(runtime);
        let error = fetch_status(addr, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(error, FetchError::Connect { .. }), "{error}");
    }

    /// Whether the server closed `stream` (EOF or reset) within `within`.
    fn closed(mut stream: &std::net::TcpStream, within: Duration) -> bool {
        use std::io::Read as _;
        stream.set_read_timeout(Some(within)).unwrap();
        let mut byte = [0u8; 1];
        match stream.read(&mut byte) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        }
    }

    #[test]
    fn idle_connections_past_the_bound_neither_block_probes_nor_stay_open() {
        use std::io::{Read as _, Write as _};
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let health = Arc::new(Health::default());
        health.beat();
        let limits = ServeLimits {
            max_connections: 4,
            idle_timeout: Duration::from_millis(500),
        };
        runtime.spawn(serve_on(listener, limits, Arc::new(Metrics::new()), health));
        let idle: Vec<std::net::TcpStream> = (0..20)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        let started = std::time::Instant::now();
        let mut probe = std::net::TcpStream::connect(addr).unwrap();
        probe
            .set_read_timeout(Some(Duration::from_secs(1)))
            .unwrap();
        probe
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut answer = String::new();
        probe
            .read_to_string(&mut answer)
            .expect("/healthz answers within a second");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(started.elapsed() < Duration::from_secs(1));
        // The oldest were evicted as the newer ones came; the rest go after the idle timeout.
        let evicted = idle[..16]
            .iter()
            .filter(|s| closed(s, Duration::from_millis(200)))
            .count();
        assert_eq!(evicted, 16, "connections past the bound are closed at once");
        for stream in &idle[16..] {
            assert!(
                closed(stream, Duration::from_secs(2)),
                "an idle connection outlived the idle timeout"
            );
        }
    }
}
