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
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tokio::sync::{Semaphore, oneshot};

use crate::source::SourceStatus;

/// Values read from the kernel and the source at scrape time.
#[derive(Default)]
pub struct Live {
    pub counters: Mutex<Option<PerCpuArray<MapData, u64>>>,
    pub map_sizes: Mutex<Vec<(&'static str, usize)>>,
    /// Each map's `max_entries`.
    pub map_capacities: Mutex<Vec<(&'static str, usize)>>,
    pub source: Mutex<SourceStatus>,
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
            let mut family = encoder.encode_descriptor(
                "kovn_datapath_packets",
                "Packets by rule hit or by why they were not classified (per-CPU map, summed)",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (name, value) in counter::NAMES.iter().zip(values) {
                let labels = [("counter", *name)];
                ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
            }
        }
        let sizes = self.map_sizes.lock().map(|s| s.clone()).unwrap_or_default();
        if !sizes.is_empty() {
            let mut family = encoder.encode_descriptor(
                "kovn_map_entries",
                "Entries in each datapath map",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (map, size) in sizes {
                let labels = [("map", map)];
                let size = i64::try_from(size).unwrap_or(i64::MAX);
                ConstGauge::new(size).encode(family.encode_family(&labels)?)?;
            }
        }
        let capacities = self
            .map_capacities
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default();
        if !capacities.is_empty() {
            let mut family = encoder.encode_descriptor(
                "kovn_map_capacity",
                "Entries each datapath map can hold (max_entries); compare with kovn_map_entries",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (map, capacity) in capacities {
                let labels = [("map", map)];
                let capacity = i64::try_from(capacity).unwrap_or(i64::MAX);
                ConstGauge::new(capacity).encode(family.encode_family(&labels)?)?;
            }
        }
        let source = self.source.lock().map(|s| s.clone()).unwrap_or_default();
        if !source.kinds.is_empty() {
            let mut listed = encoder.encode_descriptor(
                "kovn_source_listed",
                "1 once a kind has been listed completely",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (kind, status) in &source.kinds {
                let labels = [("kind", *kind)];
                ConstGauge::new(i64::from(status.listed)).encode(listed.encode_family(&labels)?)?;
            }
            let mut errors = encoder.encode_descriptor(
                "kovn_source_errors",
                "Watch failures and rejected inputs per kind",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (kind, status) in &source.kinds {
                let labels = [("kind", *kind)];
                ConstCounter::new(status.errors).encode(errors.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// Metrics the agent updates as it works.
pub struct Metrics {
    pub registry: Registry,
    pub live: Arc<Live>,
    /// Seconds per reconcile pass (snapshot → translate → map diff → writes).
    pub sync_duration: Histogram,
    /// Seconds from a watch event (or file change) reaching the agent to the map write.
    pub event_to_write: Histogram,
    /// Errors by kind: `map_full`, `map_write`, `map_read`, `attach`, `netlink`, `source`,
    /// `translate`, `ipset`.
    pub errors: Family<Vec<(String, String)>, Counter>,
    /// Objects the last translation had to skip.
    pub translation_issues: Gauge,
    /// Rules found that can clear our mark bits (see `status`).
    pub mark_clobber_rules: Gauge,
    pub attached_interfaces: Gauge,
    pub ready: Gauge,
    /// 1 while the pins under the root are the ones this agent created (0 after `detach --force`).
    pub pins_present: Gauge,
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
        let sync_duration = Histogram::new(exponential_buckets(0.000_05, 2.0, 18));
        let event_to_write = Histogram::new(exponential_buckets(0.000_05, 2.0, 18));
        let errors = Family::default();
        let translation_issues = Gauge::default();
        let mark_clobber_rules = Gauge::default();
        let attached_interfaces = Gauge::default();
        let ready = Gauge::default();
        let pins_present = Gauge::default();
        pins_present.set(1);
        registry.register(
            "kovn_sync_duration_seconds",
            "Duration of a reconcile pass",
            sync_duration.clone(),
        );
        registry.register(
            "kovn_event_to_map_write_seconds",
            "Latency from a cluster or node change to the map write that reflects it",
            event_to_write.clone(),
        );
        registry.register("kovn_errors", "Errors by kind", errors.clone());
        registry.register(
            "kovn_translation_issues",
            "Objects skipped or partly ignored by the last translation",
            translation_issues.clone(),
        );
        registry.register(
            "kovn_mark_clobber_rules",
            "netfilter rules after TC ingress that can clear our mark bits",
            mark_clobber_rules.clone(),
        );
        registry.register(
            "kovn_attached_interfaces",
            "Interfaces the classifier is attached to",
            attached_interfaces.clone(),
        );
        registry.register("kovn_ready", "1 after the first full sync", ready.clone());
        registry.register(
            "kovn_pins_present",
            "1 while this agent's pins exist under its bpffs root; 0 once they were removed \
             behind its back (detach --force): marking has stopped",
            pins_present.clone(),
        );
        registry.register_collector(Box::new(live.clone()));
        Self {
            registry,
            live,
            sync_duration,
            event_to_write,
            errors,
            translation_issues,
            mark_clobber_rules,
            attached_interfaces,
            ready,
            pins_present,
        }
    }

    pub fn error(&self, kind: &str) {
        self.errors
            .get_or_create(&vec![("kind".to_owned(), kind.to_owned())])
            .inc();
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

async fn readyz(State(served): State<Arc<Served>>) -> impl IntoResponse {
    if served.health.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "first full sync not done\n",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_renders_every_family() {
        let metrics = Metrics::new();
        metrics.error("map_full");
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
