//! The writer thread: owns the model (`ModelCache`) and the dataplane writer, and is fed
//! object updates by a source (the Kubernetes watches, or the standalone file). Map
//! writes never run on the async runtime's threads, and nothing else takes a lock on
//! the maps' writer.
//!
//! Updates are applied to the model as they arrive; a sync follows as soon as the queue
//! is empty (after `debounce`, if set), so a burst of events is written as one diff, and a
//! single change reaches the maps at once. The diff covers only the frontends the model
//! says changed. After a sync in which the kernel refused some op, the next one compares
//! everything; it runs when the next update arrives, or after `retry`.
//!
//! With `lists` set, nothing is written before each of those kinds has been listed in
//! full, so an agent restarted on pinned maps never removes what it has not seen yet.
//! A list ([`Update::ListStart`] .. [`Update::ListDone`]) also removes the objects of its
//! kind it did not name: after a relist (410 Gone) the model is exactly the API's state,
//! deletions that happened while the watch was down included.
use std::{
    collections::BTreeSet,
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc::{self, Receiver, RecvTimeoutError, Sender},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use ahash::AHashSet as HashSet;
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use super::Dataplane;
use crate::model::{object_key, Config, EndpointSlice, ModelCache, Node, ObjectKey, Service};

/// After a sync this large (the first one of a big cluster), the memory its plan and the
/// list's decoding used is handed back to the system.
const RETURN_MEMORY_AFTER_OPS: usize = 100_000;

/// Gives freed heap memory back to the system: glibc's malloc keeps what a large
/// transient allocation (a plan of millions of ops, a list of the whole cluster) freed,
/// and the agent's resident memory would stay at its peak.
fn return_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The kinds of object a source lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }
}

/// One change from a source.
#[derive(Debug)]
pub enum Update {
    Service(Service),
    /// (namespace, name)
    RemoveService(String, String),
    /// A slice, with the time of the change that caused it if the source knows it
    /// (`endpoints.kubernetes.io/last-change-trigger-time`): observed as the network
    /// programming latency once written.
    Slice(EndpointSlice, Option<jiff::Timestamp>),
    RemoveSlice(String, String),
    /// This node, as last seen.
    Node(Node),
    /// A full list of a kind begins: what it does not name again is removed at its end.
    ListStart(Kind),
    ListDone(Kind),
    /// The whole input at once (the standalone file).
    Replace(Config),
}

/// What the writer has done, published after each sync.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Status {
    /// Syncs written so far.
    pub syncs: u64,
    /// Map operations the last sync's kernel refused.
    pub last_errors: usize,
    /// The maps hold loadBalancerSourceRanges (as of the last sync, or the maps the
    /// writer started on): written before the frontends they are of, removed after.
    pub source_ranges: bool,
}

/// What one sync did, for whoever keeps metrics.
#[derive(Debug)]
pub struct SyncStats<'a> {
    pub took: Duration,
    /// Entries a drift check found changed behind the agent's back, which this sync
    /// rewrote (0: none found).
    pub drift_entries: usize,
    pub ops: usize,
    pub errors: &'a [String],
    pub services: usize,
    pub frontends: usize,
    pub backends: usize,
    /// Cells of `LB_MAGLEV` the frontends' tables take, and its size.
    pub maglev_cells: u64,
    pub maglev_max_cells: u32,
    /// Frontends with two or more ready backends left without a Maglev table (the map
    /// is full): they hash over their slots.
    pub without_table: usize,
    /// Trigger times of the slice changes this sync wrote (only when it succeeded).
    pub triggers: &'a [jiff::Timestamp],
    /// Updates the writer had received when it synced (all of them in this sync),
    /// counted as `Updates::sent` counts them.
    pub updates: u64,
}

pub type OnSync = Box<dyn FnMut(&SyncStats<'_>) + Send>;

#[derive(Clone, Debug)]
pub struct WriterOptions {
    /// Kinds that must be listed before the first write.
    pub lists: BTreeSet<Kind>,
    /// After the first update of a burst, wait this long for more before syncing.
    pub debounce: Duration,
    /// After a sync with errors, compare everything again after this long.
    pub retry: Duration,
    /// Where the health checks of the Services with a `healthCheckNodePort` go, if
    /// they are served.
    pub health_checks: Option<crate::healthcheck::HealthChecks>,
    /// Where the UDP backends that left a frontend's ready set go, so the conntrack
    /// collector purges their flows at once (`gc`).
    pub purges: Option<Sender<super::gc::GcWork>>,
    /// How often the maps are read back and compared with the mirror, so entries
    /// changed behind the agent's back (bpftool, another process) are repaired; `None`:
    /// never.
    pub resync: Option<Duration>,
    /// Serve NodePorts on 127.0.0.1 to the node's own sockets (`Node::localhost_nodeports`,
    /// set on every node the sources send): where the socket programs are attached and
    /// `--localhost-nodeports` is on.
    pub localhost_nodeports: bool,
}

impl Default for WriterOptions {
    fn default() -> Self {
        Self {
            lists: BTreeSet::new(),
            debounce: Duration::ZERO,
            retry: Duration::from_secs(1),
            resync: None,
            health_checks: None,
            purges: None,
            localhost_nodeports: false,
        }
    }
}

/// The handle on the writer thread.
pub struct Writer {
    tx: Sender<Msg>,
    /// Updates sent (`Updates::sent`).
    sent: Arc<AtomicU64>,
    status: watch::Receiver<Status>,
    thread: Option<JoinHandle<Dataplane>>,
}

/// Messages move through the channel one at a time: an update is not boxed (that would
/// cost an allocation per watch event).
#[expect(
    clippy::large_enum_variant,
    reason = "an update moves through the channel by value; boxing it costs an allocation per watch event"
)]
enum Msg {
    Update(Update),
    /// A question about the model, answered on the writer thread between updates.
    Query(Query),
    Stop,
}

type Query = Box<dyn FnOnce(&ModelCache) + Send>;

/// A cheap, cloneable handle to ask the writer thread about its model.
#[derive(Clone)]
pub struct Queries(Sender<Msg>);

impl Queries {
    /// Runs `f` on the model on the writer thread (after the updates queued before);
    /// its answer comes on the returned channel. `None` if the writer is gone.
    pub fn ask<T: Send + 'static>(
        &self,
        f: impl FnOnce(&ModelCache) -> T + Send + 'static,
    ) -> Option<tokio::sync::oneshot::Receiver<T>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let q: Query = Box::new(move |m| {
            let _ = tx.send(f(m));
        });
        self.0.send(Msg::Query(q)).ok()?;
        Some(rx)
    }
}

/// A cheap, cloneable sender of updates.
#[derive(Clone)]
pub struct Updates(Sender<Msg>, Arc<AtomicU64>);

impl Updates {
    /// Queues an update; false if the writer is gone.
    pub fn send(&self, u: Update) -> bool {
        send_update(&self.0, &self.1, u)
    }

    /// Updates sent to the writer so far (by every sender): the number of the last one,
    /// which a sync covers once `SyncStats::updates` reaches it.
    pub fn sent(&self) -> u64 {
        self.1.load(Ordering::SeqCst)
    }
}

fn send_update(tx: &Sender<Msg>, sent: &AtomicU64, u: Update) -> bool {
    sent.fetch_add(1, Ordering::SeqCst);
    tx.send(Msg::Update(u)).is_ok()
}

impl Writer {
    pub fn spawn(plane: Dataplane, opts: WriterOptions, on_sync: OnSync) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let (status_tx, status) = watch::channel(Status {
            source_ranges: has_source_ranges(&plane),
            ..Status::default()
        });
        let thread = std::thread::Builder::new()
            .name("lb-writer".into())
            .spawn(move || {
                // The first drift check: one period after the start.
                let next_resync = opts.resync.map(|d| Instant::now() + d);
                let mut w = Loop {
                    plane,
                    model: ModelCache::default(),
                    opts,
                    on_sync,
                    status: status_tx,
                    listed: BTreeSet::new(),
                    listing: Default::default(),
                    triggers: Vec::new(),
                    failed: false,
                    without_table: 0,
                    next_resync,
                    drift: None,
                    received: 0,
                };
                w.run(rx);
                w.plane
            })?;
        Ok(Self {
            tx,
            sent: Arc::default(),
            status,
            thread: Some(thread),
        })
    }

    pub fn updates(&self) -> Updates {
        Updates(self.tx.clone(), self.sent.clone())
    }

    pub fn queries(&self) -> Queries {
        Queries(self.tx.clone())
    }

    pub fn send(&self, u: Update) -> bool {
        send_update(&self.tx, &self.sent, u)
    }

    pub fn status(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    /// Stops the thread once it has handled what was queued before, and returns the
    /// dataplane.
    pub fn stop(mut self) -> Dataplane {
        let _ = self.tx.send(Msg::Stop);
        self.thread
            .take()
            .expect("joined once")
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.tx.send(Msg::Stop);
            let _ = t.join();
        }
    }
}

struct Loop {
    plane: Dataplane,
    model: ModelCache,
    opts: WriterOptions,
    on_sync: OnSync,
    status: watch::Sender<Status>,
    listed: BTreeSet<Kind>,
    /// Keys named by a list in progress, per kind.
    listing: [Option<HashSet<ObjectKey>>; 2],
    triggers: Vec<jiff::Timestamp>,
    /// The last sync had errors: compare everything on the next.
    failed: bool,
    /// Frontends without a Maglev table after the last sync (warned about on change).
    without_table: usize,
    /// When the maps are next compared with the mirror (`WriterOptions::resync`).
    next_resync: Option<Instant>,
    /// Entries the last drift check found changed behind the agent's back (reported
    /// with the repairing sync).
    drift: Option<super::Drift>,
    /// Updates received so far (`SyncStats::updates`).
    received: u64,
}

fn slot(kind: Kind) -> Option<usize> {
    match kind {
        Kind::Service => Some(0),
        Kind::EndpointSlice => Some(1),
        Kind::Node => None,
    }
}

impl Loop {
    fn run(&mut self, rx: Receiver<Msg>) {
        loop {
            // Block for the next update; after a failed sync, wake up to retry, and
            // when a drift check is due, to make it.
            let now = Instant::now();
            let wake = [self.failed.then(|| now + self.opts.retry), self.next_resync]
                .into_iter()
                .flatten()
                .min();
            let first = match wake {
                Some(at) => match rx.recv_timeout(at.saturating_duration_since(now)) {
                    Ok(m) => Some(m),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => return,
                },
                None => match rx.recv() {
                    Ok(m) => Some(m),
                    Err(_) => return,
                },
            };
            if first.is_none() && self.next_resync.is_some_and(|at| at <= Instant::now()) {
                self.next_resync = self.opts.resync.map(|d| Instant::now() + d);
                // After a failed sync a full one is due anyway; before the first, the
                // maps hold nothing to check.
                if !self.failed && (!self.ready() || !self.check_drift()) {
                    continue;
                }
            }
            let mut stop = false;
            // A batch of queries alone changes nothing: no sync follows it.
            let mut updated = first.is_none();
            if let Some(m) = first {
                updated |= !matches!(m, Msg::Query(_));
                stop |= self.handle(m);
                if !self.opts.debounce.is_zero() && !stop && updated {
                    std::thread::sleep(self.opts.debounce);
                }
                // Everything queued meanwhile goes into the same sync.
                while let Ok(m) = rx.try_recv() {
                    updated |= !matches!(m, Msg::Query(_));
                    stop |= self.handle(m);
                }
            }
            if !updated {
                continue;
            }
            // A sync after every batch of updates, even one that changed nothing in the
            // maps (it is cheap: the delta is empty), so whoever waits for one sees the
            // batch handled, and trigger times are observed.
            if self.ready() {
                self.sync();
            } else {
                // Still listing: recompute what arrived so far while the rest is on its
                // way, so the first sync has only the diff left to do.
                self.model.update();
            }
            if stop {
                return;
            }
        }
    }

    /// Applies one message to the model; true for a stop.
    fn handle(&mut self, m: Msg) -> bool {
        let u = match m {
            Msg::Stop => return true,
            Msg::Query(q) => {
                q(&self.model);
                return false;
            }
            Msg::Update(u) => u,
        };
        self.received += 1;
        match u {
            Update::Service(s) => {
                self.seen(Kind::Service, s.key());
                self.model.upsert_service(s);
            }
            Update::RemoveService(ns, name) => {
                let key = object_key(&ns, &name);
                self.model.remove_service(&key);
                self.seen(Kind::Service, key);
            }
            Update::Slice(s, trigger) => {
                self.seen(Kind::EndpointSlice, s.key());
                self.triggers.extend(trigger);
                self.model.upsert_slice(s);
            }
            Update::RemoveSlice(ns, name) => {
                let key = object_key(&ns, &name);
                self.model.remove_slice(&key);
                self.seen(Kind::EndpointSlice, key);
            }
            Update::Node(mut n) => {
                n.localhost_nodeports = self.opts.localhost_nodeports;
                self.model.set_node(n);
            }
            Update::ListStart(kind) => {
                if let Some(i) = slot(kind) {
                    self.listing[i] = Some(HashSet::new());
                }
            }
            Update::ListDone(kind) => {
                if let Some(seen) = slot(kind).and_then(|i| self.listing[i].take()) {
                    match kind {
                        Kind::Service => self.model.retain_services(|k| seen.contains(k)),
                        _ => self.model.retain_slices(|k| seen.contains(k)),
                    }
                }
                if self.listed.insert(kind) {
                    info!("{}s listed", kind.name());
                }
            }
            Update::Replace(mut cfg) => {
                cfg.node.localhost_nodeports = self.opts.localhost_nodeports;
                self.model.set_node(cfg.node);
                self.model.replace_all(cfg.services, cfg.endpoint_slices);
            }
        }
        false
    }

    fn seen(&mut self, kind: Kind, key: ObjectKey) {
        if let Some(set) = slot(kind).and_then(|i| self.listing[i].as_mut()) {
            set.insert(key);
        }
    }

    fn ready(&self) -> bool {
        self.opts.lists.is_subset(&self.listed)
    }

    /// Reads the maps back and compares them with the mirror; true if they differ (the
    /// mirror now holds what the maps hold, and the next sync, a full one, repairs it).
    fn check_drift(&mut self) -> bool {
        let t0 = Instant::now();
        match self.plane.check_drift() {
            Ok(None) => {
                debug!(took_us = t0.elapsed().as_micros() as u64, "maps as written");
                false
            }
            Ok(Some(d)) => {
                warn!(
                    frontends = d.frontends,
                    slots = d.slots,
                    backends = d.backends,
                    source_ranges = d.ranges,
                    maglev_tables = d.tables,
                    node = d.node,
                    frontend_filter_words = d.filter,
                    "map entries changed behind the agent's back; rewriting them"
                );
                self.drift = Some(d);
                self.failed = true;
                true
            }
            Err(e) => {
                error!("reading the maps back to check them: {e}");
                false
            }
        }
    }

    fn sync(&mut self) {
        let t0 = Instant::now();
        let delta = self.model.take_delta();
        if self.model.take_health_changed() {
            if let Some(h) = &self.opts.health_checks {
                h.publish(self.model.health_checks());
            }
        }
        let desired = self.model.current();
        let report = if self.failed {
            self.plane.sync(desired)
        } else {
            self.plane.sync_delta(desired, Some(&delta))
        };
        let took = t0.elapsed();
        if !report.udp_gone.is_empty() {
            if let Some(tx) = &self.opts.purges {
                let _ = tx.send(super::gc::GcWork::Purge(report.udp_gone.clone()));
            }
        }
        self.failed = !report.errors.is_empty();
        for e in &report.errors {
            error!("map update failed: {e}; retrying in {:?}", self.opts.retry);
        }
        let triggers = if self.failed {
            Vec::new()
        } else {
            std::mem::take(&mut self.triggers)
        };
        let drift = self.drift.take();
        let stats = SyncStats {
            took,
            drift_entries: drift.as_ref().map_or(0, super::Drift::entries),
            ops: report.ops,
            errors: &report.errors,
            services: self.model.service_count(),
            frontends: desired.frontends.len(),
            backends: self.plane.state().backend_count(),
            maglev_cells: self.plane.state().table_space().used(),
            maglev_max_cells: self.plane.state().table_space().capacity(),
            without_table: self.plane.state().frontends_without_table(),
            triggers: &triggers,
            updates: self.received,
        };
        if stats.without_table != self.without_table {
            if stats.without_table > 0 {
                warn!(
                    frontends = stats.without_table,
                    cells = stats.maglev_cells,
                    max_cells = stats.maglev_max_cells,
                    "LB_MAGLEV is full: these frontends hash over their slots, so a change of \
                     their backends moves most of their new flows (raise --max-maglev-cells)"
                );
            } else {
                info!("every frontend with two or more backends has a Maglev table again");
            }
            self.without_table = stats.without_table;
        }
        info!(
            services = stats.services,
            frontends = stats.frontends,
            backends = stats.backends,
            changed = delta.changed.len(),
            map_ops = stats.ops,
            errors = stats.errors.len(),
            took_us = took.as_micros() as u64,
            "synced"
        );
        (self.on_sync)(&stats);
        if report.ops > RETURN_MEMORY_AFTER_OPS {
            return_freed_memory();
        }
        let source_ranges = has_source_ranges(&self.plane);
        self.status.send_modify(|s| {
            s.syncs += 1;
            s.last_errors = report.errors.len();
            s.source_ranges = source_ranges;
        });
    }
}

/// Whether `plane`'s maps hold source ranges (`LB_SRC_RANGES`).
fn has_source_ranges(plane: &Dataplane) -> bool {
    plane.state().ranges().next().is_some()
}
