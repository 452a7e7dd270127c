//! The watch loop: three watches (Services, EndpointSlices, this Node) whose events are
//! translated one by one and handed to the writer thread by key. Nothing is kept of the
//! Kubernetes objects themselves: the model holds the translated objects, which keep
//! only the fields it uses.
//!
//! - An event costs O(its object): its translation and its Service's recomputation in
//!   the model, whatever the size of the cluster.
//! - A (re)list is bracketed for the writer (`ListStart`, `ListDone`), which then removes
//!   what the list did not name: after a relist the model is exactly the API's state.
//! - When the API server is unreachable the watches retry with a short, capped backoff
//!   (`watch_backoff`), so the agent is current again within seconds of its return, and
//!   the maps keep the last state meanwhile. A `410 Gone` (history compacted while the
//!   watch was away) relists at once instead of backing off first.
use std::{collections::BTreeMap, future::Future, time::Duration};

use futures::{stream::BoxStream, StreamExt};
use k8s_openapi::{
    api::{
        core::v1::{Node, Service as K8sService},
        discovery::v1::EndpointSlice as K8sSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    runtime::{
        watcher::{self, watcher, Event},
        WatchStreamExt,
    },
    Api, Client, Resource,
};
use tracing::{debug, info, warn};

use super::{
    metrics::{FieldLabel, KindLabel, Metrics, ReasonLabel},
    translate::{self, Outcome, Rules, SkipReason, Translated},
};
use crate::{
    dataplane::writer::{Kind, Update, Updates},
    model, Error, Result,
};

#[derive(Clone, Debug)]
pub struct ControllerOptions {
    /// This node's name (downward API `spec.nodeName`).
    pub node_name: String,
    pub rules: Rules,
    /// kube-proxy's node health (`/healthz`, `/livez`), told of every change handed to
    /// the writer and of this node.
    pub health: Option<super::proxyhealth::ProxyHealth>,
}

/// The watches' backoff after an error: 0.25 s doubling to 2 s, with jitter (kube's
/// default goes to 30 s, which kept an agent stale for a minute after an API server
/// outage). Reset by the first event that arrives.
fn watch_backoff() -> watcher::ExponentialBackoff {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(250))
        .with_max_delay(Duration::from_secs(2))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .into()
}

/// A watch error that ends the watch's history: the watcher relists on its next poll.
fn is_gone(e: &watcher::Error) -> bool {
    matches!(e, watcher::Error::WatchError(s) if s.code == 410)
}

/// One event of one watch.
type Ev = (Kind, watcher::Result<Event<Obj>>);

/// The watched objects, in one stream.
enum Obj {
    Service(Box<K8sService>),
    Slice(Box<K8sSlice>),
    Node(Box<Node>),
}

impl Obj {
    fn meta(&self) -> &ObjectMeta {
        match self {
            Obj::Service(o) => &o.metadata,
            Obj::Slice(o) => &o.metadata,
            Obj::Node(o) => &o.metadata,
        }
    }
}

/// A watch of one kind, 410s relisted at once, other errors backed off.
fn watch<K>(
    api: Api<K>,
    cfg: watcher::Config,
    kind: Kind,
    wrap: fn(K) -> Obj,
    metrics: Metrics,
) -> BoxStream<'static, Ev>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    watcher(api, cfg)
        .filter_map(move |r| {
            let out = match r {
                Err(e) if is_gone(&e) => {
                    count_watch_error(&metrics, kind);
                    info!(
                        "the {} watch's history expired (410 Gone); relisting",
                        kind.name()
                    );
                    None
                }
                r => Some(r),
            };
            std::future::ready(out)
        })
        .backoff(watch_backoff())
        .map(move |r| (kind, r.map(|e| e.modify_map(wrap))))
        .boxed()
}

fn count_watch_error(metrics: &Metrics, kind: Kind) {
    metrics
        .watch_errors
        .get_or_create(&KindLabel {
            kind: kind.name().into(),
        })
        .inc();
}

/// `Event::map` for our one-stream type.
trait EventMap<K> {
    fn modify_map(self, f: fn(K) -> Obj) -> Event<Obj>;
}

impl<K> EventMap<K> for Event<K> {
    fn modify_map(self, f: fn(K) -> Obj) -> Event<Obj> {
        match self {
            Event::Apply(o) => Event::Apply(f(o)),
            Event::Delete(o) => Event::Delete(f(o)),
            Event::InitApply(o) => Event::InitApply(f(o)),
            Event::Init => Event::Init,
            Event::InitDone => Event::InitDone,
        }
    }
}

/// (kind, namespace, name) of an object that had something to report, with the
/// resourceVersion reported: lines and counters come once per object version.
type Reported = BTreeMap<(Kind, String, String), String>;

fn namespace_and_name(meta: &ObjectMeta) -> (String, String) {
    (
        meta.namespace.clone().unwrap_or_else(|| "default".into()),
        meta.name.clone().unwrap_or_default(),
    )
}

pub struct Controller {
    client: Client,
    opts: ControllerOptions,
    updates: Updates,
    metrics: Metrics,
    /// Trigger times older than this are not observed (as kube-proxy does: they predate us).
    started: jiff::Timestamp,
}

impl Controller {
    pub fn new(
        client: Client,
        opts: ControllerOptions,
        updates: Updates,
        metrics: Metrics,
    ) -> Self {
        Self {
            client,
            opts,
            updates,
            metrics,
            started: jiff::Timestamp::now(),
        }
    }

    /// Runs until `shutdown` resolves. Watch errors never end it: they are retried.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let cfg = watcher::Config::default();
        let node_cfg = cfg
            .clone()
            .fields(&format!("metadata.name={}", self.opts.node_name));
        let m = &self.metrics;
        let streams = vec![
            watch(
                Api::<K8sService>::all(self.client.clone()),
                cfg.clone(),
                Kind::Service,
                |o| Obj::Service(Box::new(o)),
                m.clone(),
            ),
            watch(
                Api::<K8sSlice>::all(self.client.clone()),
                cfg,
                Kind::EndpointSlice,
                |o| Obj::Slice(Box::new(o)),
                m.clone(),
            ),
            watch(
                Api::<Node>::all(self.client.clone()),
                node_cfg,
                Kind::Node,
                |o| Obj::Node(Box::new(o)),
                m.clone(),
            ),
        ];
        let mut events = futures::stream::select_all(streams);
        let mut reported = Reported::new();
        let mut node_seen = false;
        tokio::pin!(shutdown);
        info!(node = %self.opts.node_name, "watching Services, EndpointSlices and this node");
        loop {
            tokio::select! {
                _ = &mut shutdown => return Ok(()),
                ev = events.next() => {
                    let Some(ev) = ev else {
                        return Err(Error::Load("the Kubernetes watch streams ended unexpectedly".into()));
                    };
                    let updates = self.on_event(ev, &mut reported, &mut node_seen);
                    for u in updates {
                        if !self.updates.send(u) {
                            return Err(Error::Load("the dataplane writer stopped".into()));
                        }
                        if let Some(h) = &self.opts.health {
                            h.queued(self.updates.sent());
                        }
                    }
                }
            }
        }
    }

    fn on_event(
        &self,
        (kind, ev): Ev,
        reported: &mut Reported,
        node_seen: &mut bool,
    ) -> Vec<Update> {
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                count_watch_error(&self.metrics, kind);
                warn!(
                    "watching {}s failed: {e}; retrying, the dataplane keeps its last state",
                    kind.name()
                );
                return Vec::new();
            }
        };
        match ev {
            Event::Init => {
                if kind == Kind::Node {
                    *node_seen = false;
                }
                vec![Update::ListStart(kind)]
            }
            Event::InitDone => {
                let mut out = Vec::new();
                if kind == Kind::Node && !*node_seen {
                    warn!(
                        "node {:?} not found in the API: check NODE_NAME / --node-name",
                        self.opts.node_name
                    );
                    out.push(Update::Node(self.nameless_node()));
                }
                out.push(Update::ListDone(kind));
                out
            }
            Event::InitApply(o) => self.apply(o, false, reported, node_seen),
            Event::Apply(o) => self.apply(o, true, reported, node_seen),
            Event::Delete(o) => {
                let (ns, name) = namespace_and_name(o.meta());
                reported.remove(&(kind, ns.clone(), name.clone()));
                vec![match o {
                    Obj::Service(_) => Update::RemoveService(ns, name),
                    Obj::Slice(_) => Update::RemoveSlice(ns, name),
                    Obj::Node(_) => {
                        if let Some(h) = &self.opts.health {
                            h.sync_node(None);
                        }
                        Update::Node(self.nameless_node())
                    }
                }]
            }
        }
    }

    /// This node before it is listed (or after it is gone): its name alone, so local
    /// endpoints are known and NodePorts wait for its addresses.
    fn nameless_node(&self) -> model::Node {
        model::Node {
            name: Some(self.opts.node_name.clone()),
            addresses: Vec::new(),
            ..Default::default()
        }
    }

    /// Translates an added or changed object. `live`: a watch event (not part of a
    /// list), whose trigger time is observed.
    fn apply(
        &self,
        o: Obj,
        live: bool,
        reported: &mut Reported,
        node_seen: &mut bool,
    ) -> Vec<Update> {
        let (ns, name) = namespace_and_name(o.meta());
        match &o {
            Obj::Service(s) => {
                let t = translate::service(s, &self.opts.rules);
                self.report(Kind::Service, &s.metadata, &t, reported);
                vec![match t.outcome {
                    Outcome::Use(m) => Update::Service(m),
                    _ => Update::RemoveService(ns, name),
                }]
            }
            Obj::Slice(s) => {
                let trigger = translate::trigger_time(s).filter(|t| live && *t >= self.started);
                let t = translate::endpoint_slice(s);
                self.report(Kind::EndpointSlice, &s.metadata, &t, reported);
                vec![match t.outcome {
                    Outcome::Use(m) => Update::Slice(m, trigger),
                    _ => Update::RemoveSlice(ns, name),
                }]
            }
            Obj::Node(n) => {
                if !*node_seen {
                    info!(node = ?n.metadata.name, "found this node");
                }
                *node_seen = true;
                if let Some(h) = &self.opts.health {
                    h.sync_node(Some(n));
                }
                vec![Update::Node(translate::node(n))]
            }
        }
    }

    /// Logs and counts what a translation skipped, ignored or rejected, once per object
    /// version.
    fn report<T>(&self, kind: Kind, meta: &ObjectMeta, t: &Translated<T>, reported: &mut Reported) {
        let (ns, name) = namespace_and_name(meta);
        let key = (kind, ns.clone(), name.clone());
        let noteworthy = !t.skipped.is_empty() || matches!(t.outcome, Outcome::Reject(_));
        if !noteworthy {
            reported.remove(&key);
            return;
        }
        let version = meta.resource_version.clone().unwrap_or_default();
        if reported.get(&key) == Some(&version) {
            return;
        }
        reported.insert(key, version);
        for s in &t.skipped {
            let why = match s.reason {
                SkipReason::Sctp => "the dataplane handles TCP and UDP only",
                SkipReason::Family => "the Service has no cluster IP of that family",
                SkipReason::Fqdn => "FQDN endpoints are not proxied",
                SkipReason::Ignored(field) => {
                    self.metrics
                        .ignored_fields
                        .get_or_create(&FieldLabel {
                            kind: kind.name().into(),
                            field: field.into(),
                        })
                        .inc();
                    warn!(
                        "{} {ns}/{name}: ignoring {}: not implemented by this dataplane yet",
                        kind.name(),
                        s.what
                    );
                    continue;
                }
            };
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
