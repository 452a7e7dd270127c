//! The watch loop: three reflectors (Services, EndpointSlices, this node), a debounce,
//! and a sync that recomputes the desired state from the stores and applies the diff.
//!
//! - A burst of events is coalesced: the first event arms a timer (`debounce`, a few ms)
//!   and the sync runs when it fires, whatever came in between; the delay is bounded
//!   because later events do not push the timer.
//! - Nothing is written before both the Service and the EndpointSlice lists are
//!   complete, so a restarted agent never empties backends it kept in pinned maps.
//! - After a watch restart (410 Gone, reconnect) the reflector swaps in the new list and
//!   the sync diffs against the mirror of the maps: only what differs is written.
//! - When the API server is unreachable the watchers retry with kube's default backoff
//!   and the maps keep the last state.
use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use futures::{stream::BoxStream, StreamExt};
use k8s_openapi::api::{
    core::v1::{Node, Service as K8sService},
    discovery::v1::EndpointSlice as K8sSlice,
};
use kube::{
    runtime::{
        reflector::{self, reflector, Store},
        watcher::{self, watcher, Event},
        WatchStreamExt,
    },
    Api, Client,
};
use tokio::{sync::watch, time::Instant};
use tracing::{debug, error, info, warn};

use super::{
    metrics::{KindLabel, Metrics, ReasonLabel},
    translate::{self, Outcome, Rules, SkipReason, Translated},
};
use crate::{dataplane::Dataplane, model::ModelCache, Error, Result};

/// How long to wait after the first event of a burst before syncing.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(15);
/// Retry delay after a sync in which the kernel refused some map operations.
const RETRY_FAILED_SYNC: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
pub struct ControllerOptions {
    /// This node's name (downward API `spec.nodeName`).
    pub node_name: String,
    pub rules: Rules,
    pub debounce: Duration,
}

/// Readiness, shared with the HTTP server and the agent.
#[derive(Clone, Debug)]
pub struct Health {
    ready: Arc<AtomicBool>,
    /// Number of completed syncs, for whoever waits for the first one.
    synced: watch::Sender<u64>,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            ready: Arc::new(AtomicBool::new(false)),
            synced: watch::Sender::new(0),
        }
    }
}

impl Health {
    /// True once all three watches listed and the result was written to the maps.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// Resolves once at least one sync has been written to the maps.
    pub async fn first_sync(&self) {
        let mut rx = self.synced.subscribe();
        let _ = rx.wait_for(|n| *n > 0).await;
    }

    /// Number of syncs written so far.
    pub fn syncs(&self) -> u64 {
        *self.synced.borrow()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }
}

/// One watch event, reduced to what the loop needs (the stores hold the objects).
type Ev = (Kind, Result<Step, watcher::Error>);

/// What was last reported for an object (its resourceVersion), so skip and reject lines
/// and their counters come once per object version, not once per sync.
/// (kind, namespace, name) of a watched object; the namespace as the model reads it.
type ObjectKey = (Kind, String, String);
type Reported = BTreeMap<ObjectKey, String>;

fn object_key(
    kind: Kind,
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> ObjectKey {
    (
        kind,
        meta.namespace.clone().unwrap_or_else(|| "default".into()),
        meta.name.clone().unwrap_or_default(),
    )
}

/// The object was translated at this very resourceVersion already (and so is in the model).
fn unchanged(
    key: &ObjectKey,
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    reported: &Reported,
) -> bool {
    let version = meta.resource_version.as_deref().unwrap_or_default();
    !version.is_empty() && reported.get(key).map(String::as_str) == Some(version)
}

pub struct Controller {
    client: Client,
    opts: ControllerOptions,
    plane: Arc<Mutex<Dataplane>>,
    metrics: Metrics,
    health: Health,
    /// Trigger times older than this are not observed (as kube-proxy does: they predate us).
    started: jiff::Timestamp,
}

impl Controller {
    pub fn new(
        client: Client,
        opts: ControllerOptions,
        plane: Arc<Mutex<Dataplane>>,
        metrics: Metrics,
        health: Health,
    ) -> Self {
        Self {
            client,
            opts,
            plane,
            metrics,
            health,
            started: jiff::Timestamp::now(),
        }
    }

    /// Runs until `shutdown` resolves. Watch errors never end it: they are retried.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let (services, svc_writer) = reflector::store::<K8sService>();
        let (slices, slice_writer) = reflector::store::<K8sSlice>();
        let (nodes, node_writer) = reflector::store::<Node>();
        let cfg = watcher::Config::default();
        let svc_stream = reflector(
            svc_writer,
            watcher(Api::<K8sService>::all(self.client.clone()), cfg.clone()),
        )
        .default_backoff()
        .map(|r| (Kind::Service, r.map(|e| step(&e, |_| None))));
        let slice_stream = reflector(
            slice_writer,
            watcher(Api::<K8sSlice>::all(self.client.clone()), cfg.clone()),
        )
        .default_backoff()
        .map(|r| {
            (
                Kind::EndpointSlice,
                r.map(|e| step(&e, translate::trigger_time)),
            )
        });
        let node_cfg = cfg.fields(&format!("metadata.name={}", self.opts.node_name));
        let node_stream = reflector(
            node_writer,
            watcher(Api::<Node>::all(self.client.clone()), node_cfg),
        )
        .default_backoff()
        .map(|r| (Kind::Node, r.map(|e| step(&e, |_| None))));
        let streams: Vec<BoxStream<'static, Ev>> = vec![
            svc_stream.boxed(),
            slice_stream.boxed(),
            node_stream.boxed(),
        ];
        let mut events = futures::stream::select_all(streams);

        let mut state = LoopState::default();
        tokio::pin!(shutdown);
        info!(node = %self.opts.node_name, "watching Services, EndpointSlices and this node");
        loop {
            let timer = async {
                match state.deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = &mut shutdown => return Ok(()),
                ev = events.next() => {
                    let Some(ev) = ev else {
                        return Err(Error::Load("the Kubernetes watch streams ended unexpectedly".into()));
                    };
                    self.on_event(ev, &mut state, &nodes);
                    if state.dirty && state.deadline.is_none() && state.can_sync() {
                        state.deadline = Some(Instant::now() + self.opts.debounce);
                    }
                }
                _ = timer => {
                    state.deadline = None;
                    state.dirty = false;
                    let ok = self.sync(&services, &slices, &nodes, &mut state);
                    if !ok {
                        state.deadline = Some(Instant::now() + RETRY_FAILED_SYNC);
                    }
                    if state.listed.len() == 3 && !self.health.is_ready() {
                        self.health.ready.store(true, Ordering::SeqCst);
                        info!("ready: all watches listed and the dataplane is synced");
                    }
                }
            }
        }
    }

    fn on_event(&self, (kind, step): Ev, state: &mut LoopState, nodes: &Store<Node>) {
        match step {
            Err(e) => {
                self.metrics
                    .watch_errors
                    .get_or_create(&KindLabel {
                        kind: kind.name().into(),
                    })
                    .inc();
                warn!("watching {}s failed: {e}; retrying with backoff, the dataplane keeps its last state", kind.name());
            }
            Ok(Step::Changed(trigger)) => {
                // A Node event matters only if its name or addresses (where NodePorts
                // open) changed: its status is updated every few seconds.
                if kind == Kind::Node {
                    state.dirty |= state.model.set_node(self.this_node(nodes));
                } else {
                    state.dirty = true;
                }
                if let Some(t) = trigger.filter(|t| *t >= self.started) {
                    state.triggers.push(t);
                }
            }
            Ok(Step::Listed) => {
                if kind == Kind::Node {
                    match nodes.state().first() {
                        Some(n) => info!(node = ?n.metadata.name, "found this node"),
                        None => warn!(
                            "node {:?} not found in the API: check NODE_NAME / --node-name",
                            self.opts.node_name
                        ),
                    }
                }
                if state.listed.insert(kind) {
                    info!("{}s listed", kind.name());
                }
                // A relist re-syncs (the diff writes only what changed meanwhile); the
                // node's first list makes the agent ready even if nothing else changed.
                state.dirty = true;
            }
            Ok(Step::Nothing) => {}
        }
    }

    /// This node as the model sees it. Until it is listed, its name alone: local
    /// endpoints are known, NodePorts wait for its addresses.
    fn this_node(&self, nodes: &Store<Node>) -> crate::model::Node {
        nodes.state().first().map_or_else(
            || crate::model::Node {
                name: Some(self.opts.node_name.clone()),
                addresses: Vec::new(),
            },
            |n| translate::node(n),
        )
    }

    /// Translates the objects that changed since the last sync (by resourceVersion),
    /// updates the model for their Services only, and applies the diff.
    /// Returns false if some map operation failed (the caller retries).
    fn sync(
        &self,
        services: &Store<K8sService>,
        slices: &Store<K8sSlice>,
        nodes: &Store<Node>,
        state: &mut LoopState,
    ) -> bool {
        let t0 = std::time::Instant::now();
        state.model.set_node(self.this_node(nodes));
        let mut seen = BTreeSet::new();
        for s in services.state() {
            let key = object_key(Kind::Service, &s.metadata);
            seen.insert(key.clone());
            if unchanged(&key, &s.metadata, &state.reported) {
                continue;
            }
            let t = translate::service(&s, &self.opts.rules);
            self.report(&key, &s.metadata, &t, &mut state.reported);
            match t.outcome {
                Outcome::Use(m) => state.model.upsert_service(m),
                _ => state.model.remove_service(&(key.1, key.2)),
            }
        }
        for s in slices.state() {
            let key = object_key(Kind::EndpointSlice, &s.metadata);
            seen.insert(key.clone());
            if unchanged(&key, &s.metadata, &state.reported) {
                continue;
            }
            let t = translate::endpoint_slice(&s);
            self.report(&key, &s.metadata, &t, &mut state.reported);
            match t.outcome {
                Outcome::Use(m) => state.model.upsert_slice(m),
                _ => state.model.remove_slice(&(key.1, key.2)),
            }
        }
        // Objects gone from the stores.
        for (kind, ns, name) in state.reported.keys().filter(|k| !seen.contains(*k)) {
            let key = (ns.clone(), name.clone());
            match kind {
                Kind::Service => state.model.remove_service(&key),
                Kind::EndpointSlice => state.model.remove_slice(&key),
                Kind::Node => {}
            }
        }
        state.reported.retain(|k, _| seen.contains(k));
        let service_count = state.model.service_count();
        let desired = state.model.desired();
        let (report, backend_count) = {
            let mut plane = self.plane.lock().unwrap_or_else(|p| p.into_inner());
            let report = plane.sync(desired);
            (report, plane.state().backends.len())
        };
        let elapsed = t0.elapsed();
        let m = &self.metrics;
        m.syncs.inc();
        m.sync_duration.observe(elapsed.as_secs_f64());
        m.map_operations
            .inc_by((report.ops - report.errors.len()) as u64);
        m.map_update_errors.inc_by(report.errors.len() as u64);
        m.services.set(service_count as i64);
        m.frontends.set(desired.frontends.len() as i64);
        m.backends.set(backend_count as i64);
        for e in &report.errors {
            error!("map update failed: {e}; retrying in {RETRY_FAILED_SYNC:?}");
        }
        let ok = report.errors.is_empty();
        if ok {
            let now = jiff::Timestamp::now();
            for t in state.triggers.drain(..) {
                let secs = now.duration_since(t).as_secs_f64().max(0.0);
                m.network_programming_duration.observe(secs);
            }
        }
        info!(
            services = service_count,
            frontends = desired.frontends.len(),
            backends = backend_count,
            map_ops = report.ops,
            errors = report.errors.len(),
            took_us = elapsed.as_micros() as u64,
            "synced"
        );
        self.health.synced.send_modify(|n| *n += 1);
        ok
    }

    /// Logs and counts what a translation skipped or rejected, once per object version.
    fn report<T>(
        &self,
        key: &ObjectKey,
        meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
        t: &Translated<T>,
        reported: &mut Reported,
    ) {
        let version = meta.resource_version.clone().unwrap_or_default();
        if reported.get(key) == Some(&version) {
            return;
        }
        reported.insert(key.clone(), version);
        let kind = key.0;
        let (_, ns, name) = key;
        for s in &t.skipped {
            let label = ReasonLabel {
                reason: s.reason.label().into(),
            };
            match kind {
                Kind::Service => self
                    .metrics
                    .skipped_service_ports
                    .get_or_create(&label)
                    .inc(),
                _ => self
                    .metrics
                    .skipped_endpoint_slices
                    .get_or_create(&label)
                    .inc(),
            };
            let why = match s.reason {
                SkipReason::Sctp => "the dataplane handles TCP and UDP only",
                SkipReason::Ipv6 => "the dataplane is IPv4 only",
                SkipReason::Fqdn => "FQDN endpoints are not proxied",
            };
            info!("{} {ns}/{name}: skipping {}: {why}", kind.name(), s.what);
        }
        match &t.outcome {
            Outcome::Use(_) => {}
            Outcome::Ignore(why) => debug!("{} {ns}/{name}: ignored: {why}", kind.name()),
            Outcome::Reject(e) => {
                self.metrics
                    .rejected_objects
                    .get_or_create(&KindLabel {
                        kind: kind.name().into(),
                    })
                    .inc();
                warn!(
                    "rejected {e}; it is left out of the dataplane, everything else keeps working"
                );
            }
        }
    }
}

enum Step {
    /// An object was added, changed or deleted (with the slice's trigger time, if any).
    Changed(Option<jiff::Timestamp>),
    /// A (re)list completed: the store now holds the full list.
    Listed,
    Nothing,
}

fn step<K>(e: &Event<K>, trigger: impl Fn(&K) -> Option<jiff::Timestamp>) -> Step {
    match e {
        Event::Apply(o) => Step::Changed(trigger(o)),
        Event::Delete(_) => Step::Changed(None),
        Event::InitDone => Step::Listed,
        Event::Init | Event::InitApply(_) => Step::Nothing,
    }
}

#[derive(Default)]
struct LoopState {
    /// Watches whose first list completed.
    listed: BTreeSet<Kind>,
    dirty: bool,
    deadline: Option<Instant>,
    /// Trigger times of slice changes not yet written to the maps.
    triggers: Vec<jiff::Timestamp>,
    /// Objects translated so far, with the resourceVersion translated: also the cache
    /// that lets a sync translate only what changed.
    reported: Reported,
    /// The model, updated object by object.
    model: ModelCache,
}

impl LoopState {
    /// Both Services and EndpointSlices are listed: the desired state is complete.
    fn can_sync(&self) -> bool {
        self.listed.contains(&Kind::Service) && self.listed.contains(&Kind::EndpointSlice)
    }
}
