//! Prometheus metrics and the health endpoints (`/metrics`, `/healthz`, `/readyz`).

use std::{
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

use crate::source::SourceStatus;

/// Values read from the kernel and the source at scrape time.
#[derive(Default)]
pub struct Live {
    pub counters: Mutex<Option<PerCpuArray<MapData, u64>>>,
    pub map_sizes: Mutex<Vec<(&'static str, usize)>>,
    pub source: Mutex<SourceStatus>,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live").finish_non_exhaustive()
    }
}

impl Collector for Live {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counters = self
            .counters
            .lock()
            .ok()
            .and_then(|c| c.as_ref().and_then(|c| crate::maps::read_counters(c).ok()));
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

/// Serves until the process ends.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(render))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(Arc::new(Served { metrics, health }));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app).await
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
}
