//! The agent's Prometheus metrics. Gauges and histograms are updated by the controller;
//! the dataplane's per-CPU packet counters are read from the maps at scrape time.
use std::fmt::Write as _;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};

use crate::dataplane::{
    gc::{FlowState, GcStats},
    writer::{OnSync, SyncStats},
    Conntrack, Counters,
};

/// The families read from the maps (and the conntrack collector's counters) at scrape
/// time, not in the registry's own metrics, with their type.
pub const DATAPLANE_FAMILIES: [(&str, &str); 13] = [
    ("lb_dataplane_packets", "counter"),
    ("lb_conntrack_entries", "gauge"),
    ("lb_conntrack_max_entries", "gauge"),
    ("lb_conntrack_flows", "gauge"),
    ("lb_conntrack_half_flows", "gauge"),
    ("lb_conntrack_expired_flows", "counter"),
    ("lb_conntrack_purged_flows", "counter"),
    ("lb_conntrack_gc_deleted_entries", "counter"),
    ("lb_conntrack_gc_errors", "counter"),
    ("lb_conntrack_gc_pass_seconds", "gauge"),
    ("lb_conntrack_filter_on", "gauge"),
    ("lb_conntrack_filter_bits", "gauge"),
    ("lb_conntrack_filter_rebuilds", "counter"),
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FieldLabel {
    pub kind: String,
    pub field: String,
}

/// Every metric the agent exports (cheap to clone: handles are shared).
#[derive(Clone, Debug)]
pub struct Metrics {
    pub services: Gauge,
    pub frontends: Gauge,
    pub backends: Gauge,
    pub maglev_cells: Gauge,
    pub maglev_max_cells: Gauge,
    pub without_table: Gauge,
    pub syncs: Counter,
    pub sync_duration: Histogram,
    pub network_programming_duration: Histogram,
    pub map_operations: Counter,
    pub map_update_errors: Counter,
    pub map_drift_repairs: Counter,
    pub map_drift_entries: Counter,
    pub skipped_service_ports: Family<ReasonLabel, Counter>,
    pub skipped_endpoint_slices: Family<ReasonLabel, Counter>,
    pub rejected_objects: Family<KindLabel, Counter>,
    pub ignored_fields: Family<FieldLabel, Counter>,
    pub watch_errors: Family<KindLabel, Counter>,
}

impl Default for Metrics {
    /// Every labelled family starts with all its known label values at zero, so each
    /// series exists from the first scrape (an alert on `increase(...)` needs no special
    /// case for a series that appears with its first event).
    fn default() -> Self {
        let m = Self {
            services: Gauge::default(),
            frontends: Gauge::default(),
            backends: Gauge::default(),
            maglev_cells: Gauge::default(),
            maglev_max_cells: Gauge::default(),
            without_table: Gauge::default(),
            syncs: Counter::default(),
            map_drift_repairs: Counter::default(),
            map_drift_entries: Counter::default(),
            // 100 us .. ~3 s.
            sync_duration: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            // 1 ms .. ~65 s, as kube-proxy's network programming buckets span.
            network_programming_duration: Histogram::new(exponential_buckets(0.001, 2.0, 17)),
            map_operations: Counter::default(),
            map_update_errors: Counter::default(),
            skipped_service_ports: Family::default(),
            skipped_endpoint_slices: Family::default(),
            rejected_objects: Family::default(),
            ignored_fields: Family::default(),
            watch_errors: Family::default(),
        };
        m.create_known_series();
        m
    }
}

/// The dataplane's counters and conntrack fill, read on each scrape from handles of
/// their own (never waiting for the writer).
struct Dataplane {
    counters: Counters,
    conntrack: Option<Conntrack>,
}

impl std::fmt::Debug for Dataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Dataplane")
    }
}

impl Collector for Dataplane {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        if let Some(ct) = &self.conntrack {
            // Counted on each scrape (the kernel keeps no count a program can ask for):
            // batched reads, about 130 syscalls for a full default map.
            match ct.entries() {
                Ok(n) => {
                    let e = encoder.encode_descriptor(
                        DATAPLANE_FAMILIES[1].0,
                        "Conntrack entries now (LB_CONNTRACK, an LRU: two per flow; at the size it evicts the least recently used)",
                        None,
                        prometheus_client::metrics::MetricType::Gauge,
                    )?;
                    ConstGauge::new(n as i64).encode(e)?;
                }
                Err(e) => tracing::warn!("counting conntrack entries for /metrics failed: {e}"),
            }
            let e = encoder.encode_descriptor(
                DATAPLANE_FAMILIES[2].0,
                "Size of the conntrack map (--max-conntrack)",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            ConstGauge::new(ct.max_entries() as i64).encode(e)?;
        }
        let counters = self.counters.read();
        // A failed read leaves the family out of this scrape (and is logged) rather than
        // failing the whole scrape.
        let counters = match counters {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("reading the dataplane counters for /metrics failed: {e}");
                return Ok(());
            }
        };
        let mut family = encoder.encode_descriptor(
            DATAPLANE_FAMILIES[0].0,
            "Packets per datapath decision, summed over CPUs (LB_COUNTERS); the kinds sock_* count socket calls of connect-time balancing",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (name, value) in counters {
            let labels = KindLabel {
                kind: name.to_string(),
            };
            let metric = family.encode_family(&labels)?;
            ConstCounter::new(value).encode(metric)?;
        }
        Ok(())
    }
}

impl Metrics {
    /// Creates the series of every label value the agent can report, at zero.
    fn create_known_series(&self) {
        use super::translate::{
            IGNORED_SERVICE_FIELDS, IGNORED_SLICE_FIELDS, SERVICE_SKIP_REASONS, SLICE_SKIP_REASONS,
        };
        use crate::dataplane::writer::Kind;
        let reason = |r: super::translate::SkipReason| ReasonLabel {
            reason: r.label().into(),
        };
        for r in SERVICE_SKIP_REASONS {
            drop(self.skipped_service_ports.get_or_create(&reason(r)));
        }
        for r in SLICE_SKIP_REASONS {
            drop(self.skipped_endpoint_slices.get_or_create(&reason(r)));
        }
        let kind = |k: Kind| KindLabel {
            kind: k.name().into(),
        };
        // Nodes are never rejected (a Node without addresses is still this node).
        for k in [Kind::Service, Kind::EndpointSlice] {
            drop(self.rejected_objects.get_or_create(&kind(k)));
        }
        for k in [Kind::Service, Kind::EndpointSlice, Kind::Node] {
            drop(self.watch_errors.get_or_create(&kind(k)));
        }
        let fields = IGNORED_SERVICE_FIELDS
            .iter()
            .map(|f| (Kind::Service, f))
            .chain(
                IGNORED_SLICE_FIELDS
                    .iter()
                    .map(|f| (Kind::EndpointSlice, f)),
            );
        for (k, f) in fields {
            drop(self.ignored_fields.get_or_create(&FieldLabel {
                kind: k.name().into(),
                field: (*f).into(),
            }));
        }
    }

    /// What the writer calls after each sync.
    pub fn on_sync(&self) -> OnSync {
        let m = self.clone();
        Box::new(move |s: &SyncStats<'_>| {
            m.syncs.inc();
            m.sync_duration.observe(s.took.as_secs_f64());
            m.map_operations.inc_by((s.ops - s.errors.len()) as u64);
            m.map_update_errors.inc_by(s.errors.len() as u64);
            if s.drift_entries > 0 {
                m.map_drift_repairs.inc();
                m.map_drift_entries.inc_by(s.drift_entries as u64);
            }
            m.services.set(s.services as i64);
            m.frontends.set(s.frontends as i64);
            m.backends.set(s.backends as i64);
            m.maglev_cells.set(s.maglev_cells as i64);
            m.maglev_max_cells.set(s.maglev_max_cells as i64);
            m.without_table.set(s.without_table as i64);
            let now = jiff::Timestamp::now();
            for t in s.triggers {
                let secs = now.duration_since(*t).as_secs_f64().max(0.0);
                m.network_programming_duration.observe(secs);
            }
        })
    }

    /// A registry with every metric, and the dataplane's counters and conntrack fill if
    /// given.
    pub fn registry(
        &self,
        counters: Option<Counters>,
        conntrack: Option<Conntrack>,
        gc: Option<std::sync::Arc<GcStats>>,
    ) -> Registry {
        let mut r = Registry::default();
        r.register(
            "lb_services",
            "Services programmed in the dataplane",
            self.services.clone(),
        );
        r.register(
            "lb_frontends",
            "Frontends (Service IP, port, protocol) in the dataplane",
            self.frontends.clone(),
        );
        r.register(
            "lb_backends",
            "Distinct backends in the dataplane",
            self.backends.clone(),
        );
        r.register(
            "lb_map_drift_repairs",
            "Drift checks (--resync-secs) that found map entries changed behind the agent's back, each followed by a sync that rewrote them",
            self.map_drift_repairs.clone(),
        );
        r.register(
            "lb_map_drift_entries",
            "Map entries found changed behind the agent's back (and rewritten)",
            self.map_drift_entries.clone(),
        );
        r.register(
            "lb_maglev_cells",
            "Cells of LB_MAGLEV the frontends' Maglev tables take",
            self.maglev_cells.clone(),
        );
        r.register(
            "lb_maglev_max_cells",
            "Cells of LB_MAGLEV (--max-maglev-cells)",
            self.maglev_max_cells.clone(),
        );
        r.register(
            "lb_frontends_without_maglev_table",
            "Frontends with two or more ready backends but no Maglev table (LB_MAGLEV full): \
             they hash over their slots",
            self.without_table.clone(),
        );
        r.register(
            "lb_syncs",
            "Syncs of the desired state to the maps",
            self.syncs.clone(),
        );
        r.register(
            "lb_sync_duration_seconds",
            "Time to compute the desired state and apply the diff to the maps",
            self.sync_duration.clone(),
        );
        r.register(
            "lb_network_programming_duration_seconds",
            "Time from an EndpointSlice change (endpoints.kubernetes.io/last-change-trigger-time) to the maps",
            self.network_programming_duration.clone(),
        );
        r.register(
            "lb_map_operations",
            "Map updates and deletes applied",
            self.map_operations.clone(),
        );
        r.register(
            "lb_map_update_errors",
            "Map updates or deletes the kernel refused",
            self.map_update_errors.clone(),
        );
        r.register(
            "lb_skipped_service_ports",
            "Service ports left out of the dataplane (SCTP; external or LoadBalancer IPs of a family without a cluster IP), counted per object version",
            self.skipped_service_ports.clone(),
        );
        r.register(
            "lb_skipped_endpoint_slices",
            "EndpointSlices left out (FQDN), counted per object version",
            self.skipped_endpoint_slices.clone(),
        );
        r.register(
            "lb_rejected_objects",
            "Malformed objects rejected, per object version",
            self.rejected_objects.clone(),
        );
        r.register(
            "lb_ignored_fields",
            "Fields of Services (and node hints of EndpointSlices) set but not implemented by this dataplane, per object version",
            self.ignored_fields.clone(),
        );
        r.register(
            "lb_watch_errors",
            "Errors of the Kubernetes watches (each is retried with backoff)",
            self.watch_errors.clone(),
        );
        if let Some(counters) = counters {
            r.register_collector(Box::new(Dataplane {
                counters,
                conntrack,
            }));
        }
        if let Some(gc) = gc {
            r.register_collector(Box::new(GcCollector(gc)));
        }
        r
    }
}

/// The conntrack collector's counters, read from its atomics at scrape time.
#[derive(Debug)]
struct GcCollector(std::sync::Arc<GcStats>);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

impl Collector for GcCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        use std::sync::atomic::Ordering::Relaxed;

        use prometheus_client::metrics::MetricType;
        let s = &self.0;
        let mut family = encoder.encode_descriptor(
            DATAPLANE_FAMILIES[3].0,
            "Conntrack flows at the collector's last pass, by state (their timeout follows it)",
            None,
            MetricType::Gauge,
        )?;
        for (i, st) in FlowState::ALL.iter().enumerate() {
            let label = StateLabel { state: st.name() };
            let m = family.encode_family(&label)?;
            ConstGauge::new(s.live[i].load(Relaxed) as i64).encode(m)?;
        }
        let gauge = |encoder: &mut DescriptorEncoder<'_>, i: usize, help: &str, v: i64| {
            let e = encoder.encode_descriptor(
                DATAPLANE_FAMILIES[i].0,
                help,
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(v).encode(e)
        };
        gauge(
            &mut encoder,
            4,
            "Flows with one of their two conntrack entries at the last pass: the LRU evicted the other (the table was full), or it was being made",
            s.half_flows.load(Relaxed) as i64,
        )?;
        let counter = |encoder: &mut DescriptorEncoder<'_>, i: usize, help: &str, v: u64| {
            let e = encoder.encode_descriptor(
                DATAPLANE_FAMILIES[i].0,
                help,
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(v).encode(e)
        };
        counter(
            &mut encoder,
            5,
            "Conntrack flows the collector expired (idle past their state's timeout), both entries",
            s.expired_flows.load(Relaxed),
        )?;
        counter(
            &mut encoder,
            6,
            "UDP flows purged because their backend left the frontend's ready set",
            s.purged_flows.load(Relaxed),
        )?;
        counter(
            &mut encoder,
            7,
            "Conntrack entries the collector deleted",
            s.deleted_entries.load(Relaxed),
        )?;
        counter(
            &mut encoder,
            8,
            "Collector passes that failed (retried at the next)",
            s.errors.load(Relaxed),
        )?;
        let e = encoder.encode_descriptor(
            DATAPLANE_FAMILIES[9].0,
            "How long the collector's last pass took",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(s.last_pass_us.load(Relaxed) as f64 / 1e6).encode(e)?;
        gauge(
            &mut encoder,
            10,
            "1 while the programs trust the conntrack filter (LB_CT_FILTER: packets of no flow skip the conntrack lookup); 0 from the load until the collector builds it",
            s.ct_filter_on.load(Relaxed) as i64,
        )?;
        gauge(
            &mut encoder,
            11,
            "Bits set in the conntrack filter at the collector's last pass (of 1,048,576; stale ones until a rebuild)",
            s.ct_filter_bits.load(Relaxed) as i64,
        )?;
        counter(
            &mut encoder,
            12,
            "Times the collector built the conntrack filter (after attaching; when stale bits outnumbered live ones; after finding an entry without its bit)",
            s.ct_filter_rebuilds.load(Relaxed),
        )
    }
}

/// Renders a registry in the Prometheus text format (version 0.0.4).
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, registry) {
        let _ = writeln!(out, "# encoding failed: {e}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_labelled_series_exists_at_zero_before_its_first_event() {
        let text = render(&Metrics::default().registry(None, None, None));
        for series in [
            r#"lb_skipped_service_ports_total{reason="sctp"} 0"#,
            r#"lb_skipped_service_ports_total{reason="family"} 0"#,
            r#"lb_skipped_endpoint_slices_total{reason="fqdn"} 0"#,
            r#"lb_rejected_objects_total{kind="Service"} 0"#,
            r#"lb_rejected_objects_total{kind="EndpointSlice"} 0"#,
            r#"lb_watch_errors_total{kind="Service"} 0"#,
            r#"lb_watch_errors_total{kind="EndpointSlice"} 0"#,
            r#"lb_watch_errors_total{kind="Node"} 0"#,
            r#"lb_ignored_fields_total{kind="Service",field="trafficDistribution"} 0"#,
            r#"lb_ignored_fields_total{kind="EndpointSlice",field="hints.forNodes"} 0"#,
        ] {
            assert!(
                text.lines().any(|l| l == series),
                "{series} missing from a fresh registry:\n{text}"
            );
        }
    }
}
