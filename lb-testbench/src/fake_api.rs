//! A small HTTP server that speaks the Kubernetes API's list and watch protocol for
//! Services, EndpointSlices and Nodes, to drive the real kube client in tests and in the
//! benchmark (100,000 Services and as many slices).
//!
//! - `GET <collection>`: a list with `metadata.resourceVersion`, paginated as the API
//!   server does when the client asks (`limit`, `continue`);
//! - `GET <collection>?watch=true&resourceVersion=R`: JSON lines of events after R, a
//!   BOOKMARK when caught up, then new events as they happen; an `ERROR` 410 (Expired)
//!   when R is older than the last compaction or when `expire()` is called;
//! - `fieldSelector=metadata.name=X` is honoured (the agent watches its own node);
//! - `drop_connections()` cuts every TCP connection; `stop()` also closes the listener
//!   (connections refused) until `restart()`; `hold_lists()` makes list requests of a
//!   collection wait until `release_lists()`.
//!
//! Objects are kept as their JSON text, so a list of a hundred thousand is a
//! concatenation, and `load()` puts many in place at once (history starting after them).
//!
//! [`ApiInNetns`] runs one inside a sandbox's namespace: on a node's loopback address for
//! that node's agent, or on the outside's underlay address for every node of a cluster.
use std::{
    collections::{BTreeMap, BTreeSet},
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::{
    body::{Frame, Incoming},
    server::conn::http1,
    service::service_fn,
    Request, Response, StatusCode,
};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Res {
    Services,
    EndpointSlices,
    Nodes,
}

impl Res {
    fn from_path(path: &str) -> Option<Self> {
        match path {
            "/api/v1/services" => Some(Res::Services),
            "/apis/discovery.k8s.io/v1/endpointslices" => Some(Res::EndpointSlices),
            "/api/v1/nodes" => Some(Res::Nodes),
            _ => None,
        }
    }

    fn from_kind(kind: &str) -> Self {
        match kind {
            "Service" => Res::Services,
            "EndpointSlice" => Res::EndpointSlices,
            "Node" => Res::Nodes,
            other => panic!("the fake API does not serve kind {other:?}"),
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Res::Services => "Service",
            Res::EndpointSlices => "EndpointSlice",
            Res::Nodes => "Node",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Res::EndpointSlices => "discovery.k8s.io/v1",
            _ => "v1",
        }
    }
}

/// (namespace, name)
type Key = (String, String);
type Body = BoxBody<Bytes, Infallible>;

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed()
}

/// One entry of the watch history: a whole `{"type":..,"object":..}` line.
struct Logged {
    rv: u64,
    res: Res,
    name: String,
    line: Bytes,
}

#[derive(Default)]
struct Store {
    rv: u64,
    /// Watches from a resourceVersion below this get 410 Gone.
    compacted: u64,
    /// Each object's JSON text, in key order (the order lists page through).
    objects: BTreeMap<Res, BTreeMap<Key, Bytes>>,
    log: Vec<Logged>,
    lists: BTreeMap<Res, usize>,
    /// When the last list of each collection began.
    listed_at: BTreeMap<Res, std::time::Instant>,
    watches: BTreeMap<Res, usize>,
}

struct Inner {
    store: Mutex<Store>,
    /// Bumped on every change (wakes the watch streams).
    changed: watch::Sender<u64>,
    /// Bumped by `expire()`: every open watch gets a 410 and ends.
    expired: watch::Sender<u64>,
    /// Collections whose list requests wait.
    held: watch::Sender<BTreeSet<Res>>,
    connections: Mutex<Vec<JoinHandle<()>>>,
}

pub struct FakeApi {
    inner: Arc<Inner>,
    pub addr: SocketAddr,
    acceptor: Mutex<Option<JoinHandle<()>>>,
}

fn key_of(obj: &Value) -> Key {
    let m = &obj["metadata"];
    (
        m["namespace"].as_str().unwrap_or("").to_string(),
        m["name"]
            .as_str()
            .expect("object without metadata.name")
            .to_string(),
    )
}

/// Sets apiVersion and resourceVersion, and returns the object's collection, key and text.
fn stamp(mut obj: Value, rv: u64) -> (Res, Key, Bytes) {
    let res = Res::from_kind(obj["kind"].as_str().expect("object without kind"));
    obj["apiVersion"] = json!(res.api_version());
    obj["metadata"]["resourceVersion"] = json!(rv.to_string());
    let key = key_of(&obj);
    (res, key, Bytes::from(obj.to_string()))
}

fn event_line(kind: &str, text: &Bytes) -> Bytes {
    let mut line = Vec::with_capacity(text.len() + 32);
    line.extend_from_slice(b"{\"type\":\"");
    line.extend_from_slice(kind.as_bytes());
    line.extend_from_slice(b"\",\"object\":");
    line.extend_from_slice(text);
    line.extend_from_slice(b"}\n");
    Bytes::from(line)
}

impl FakeApi {
    /// On the loopback address, a port the kernel chooses.
    pub async fn start() -> Self {
        Self::start_on(std::net::Ipv4Addr::LOCALHOST.into()).await
    }

    /// On `ip` (of the calling thread's network namespace), a port the kernel chooses.
    pub async fn start_on(ip: std::net::IpAddr) -> Self {
        let listener = TcpListener::bind((ip, 0))
            .await
            .expect("binding the fake API server");
        let addr = listener.local_addr().unwrap();
        let inner = Arc::new(Inner {
            store: Mutex::new(Store::default()),
            changed: watch::Sender::new(0),
            expired: watch::Sender::new(0),
            held: watch::Sender::new(BTreeSet::new()),
            connections: Mutex::new(Vec::new()),
        });
        let api = Self {
            inner,
            addr,
            acceptor: Mutex::new(None),
        };
        api.serve(listener);
        api
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig that points the real kube client at this server.
    pub fn write_kubeconfig(&self, path: &std::path::Path) {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: nobody\n\
             current-context: fake\nusers:\n- name: nobody\n  user: {{}}\n",
            self.url()
        );
        std::fs::write(path, text).expect("writing the kubeconfig");
    }

    fn serve(&self, listener: TcpListener) {
        let inner = self.inner.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                // As the API server (Go sets it on every TCP connection): without it, a
                // watch event written after a small unacknowledged one waits for the
                // client's delayed ACK (40 ms).
                let _ = stream.set_nodelay(true);
                let inner2 = inner.clone();
                let conn = tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let inner = inner2.clone();
                        async move { Ok::<_, Infallible>(handle(&inner, req).await) }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
                let mut conns = inner.connections.lock().unwrap();
                conns.retain(|c| !c.is_finished());
                conns.push(conn);
            }
        });
        *self.acceptor.lock().unwrap() = Some(task);
    }

    /// Creates or replaces an object (ADDED or MODIFIED), with a new resourceVersion.
    pub fn apply(&self, obj: Value) {
        let mut st = self.inner.store.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        let (res, key, text) = stamp(obj, rv);
        let kind = if st
            .objects
            .entry(res)
            .or_default()
            .insert(key.clone(), text.clone())
            .is_some()
        {
            "MODIFIED"
        } else {
            "ADDED"
        };
        st.log.push(Logged {
            rv,
            res,
            name: key.1,
            line: event_line(kind, &text),
        });
        drop(st);
        self.inner.changed.send_replace(rv);
    }

    /// Puts many objects in place at once, without watch events: the history starts
    /// after them (a watch from before gets 410 and relists). For large workloads.
    pub fn load(&self, objs: impl IntoIterator<Item = Value>) {
        let mut st = self.inner.store.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        for obj in objs {
            let (res, key, text) = stamp(obj, rv);
            st.objects.entry(res).or_default().insert(key, text);
        }
        st.compacted = rv;
        drop(st);
        self.inner.changed.send_replace(rv);
    }

    /// Deletes an object (DELETED). Panics if it does not exist (a test mistake).
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) {
        let res = Res::from_kind(kind);
        let mut st = self.inner.store.lock().unwrap();
        let text = st
            .objects
            .entry(res)
            .or_default()
            .remove(&(namespace.to_string(), name.to_string()))
            .unwrap_or_else(|| panic!("deleting {kind} {namespace}/{name}: no such object"));
        st.rv += 1;
        let rv = st.rv;
        let mut obj: Value = serde_json::from_slice(&text).expect("stored JSON");
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let text = Bytes::from(obj.to_string());
        st.log.push(Logged {
            rv,
            res,
            name: name.to_string(),
            line: event_line("DELETED", &text),
        });
        drop(st);
        self.inner.changed.send_replace(rv);
    }

    /// Compacts the history and sends 410 Gone to every open watch: clients must relist.
    pub fn expire(&self) {
        let mut st = self.inner.store.lock().unwrap();
        st.compacted = st.rv;
        st.log.clear();
        drop(st);
        self.inner.expired.send_modify(|n| *n += 1);
    }

    /// Compacts the history without telling anyone: a watch that resumes from before
    /// now gets 410 (as after an API server outage long enough for etcd's compaction).
    pub fn compact(&self) {
        let mut st = self.inner.store.lock().unwrap();
        st.compacted = st.rv;
        st.log.clear();
    }

    /// List requests of `res` wait until `release_lists(res)`.
    pub fn hold_lists(&self, res: Res) {
        self.inner.held.send_modify(|h| {
            h.insert(res);
        });
    }

    pub fn release_lists(&self, res: Res) {
        self.inner.held.send_modify(|h| {
            h.remove(&res);
        });
    }

    /// Cuts every open connection (watches end without a final chunk).
    pub fn drop_connections(&self) {
        for c in self.inner.connections.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    /// Stops answering: the listener closes and every connection is cut.
    pub fn stop(&self) {
        if let Some(a) = self.acceptor.lock().unwrap().take() {
            a.abort();
        }
        self.drop_connections();
    }

    /// Answers again, on the same address.
    pub async fn restart(&self) {
        let listener = rebind(self.addr).await;
        self.serve(listener);
    }

    /// Number of list requests served for a collection (a paginated list counts once).
    pub fn lists(&self, res: Res) -> usize {
        self.inner
            .store
            .lock()
            .unwrap()
            .lists
            .get(&res)
            .copied()
            .unwrap_or(0)
    }

    /// When the last list of a collection began (its first page was asked for).
    pub fn listed_at(&self, res: Res) -> Option<std::time::Instant> {
        self.inner
            .store
            .lock()
            .unwrap()
            .listed_at
            .get(&res)
            .copied()
    }

    /// Number of watch requests served for a collection.
    pub fn watches(&self, res: Res) -> usize {
        self.inner
            .store
            .lock()
            .unwrap()
            .watches
            .get(&res)
            .copied()
            .unwrap_or(0)
    }
}

/// A listener on `addr` again, once the aborted acceptor has dropped the old one (when
/// its task is next polled).
async fn rebind(addr: SocketAddr) -> TcpListener {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match TcpListener::bind(addr).await {
            Ok(l) => return l,
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("rebinding the fake API server on {addr}: {e}"),
        }
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.stop();
    }
}

fn query(req: &Request<Incoming>) -> BTreeMap<String, String> {
    let decode = |s: &str| {
        let mut out = Vec::new();
        let b = s.as_bytes();
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'%' if i + 2 < b.len() => {
                    let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                    out.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
                    i += 3;
                }
                b'+' => {
                    out.push(b' ');
                    i += 1;
                }
                c => {
                    out.push(c);
                    i += 1;
                }
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn json_response(code: StatusCode, body: Body) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(body)
        .unwrap()
}

async fn handle(inner: &Arc<Inner>, req: Request<Incoming>) -> Response<Body> {
    let Some(res) = Res::from_path(req.uri().path()) else {
        let msg = format!("the fake API does not serve {}", req.uri().path());
        let body = full(status(404, "NotFound", &msg).to_string());
        return json_response(StatusCode::NOT_FOUND, body);
    };
    let q = query(&req);
    // Only `metadata.name=X` is supported, which is all the agent uses.
    let name = q.get("fieldSelector").map(|s| {
        s.strip_prefix("metadata.name=")
            .unwrap_or_else(|| panic!("unsupported fieldSelector {s:?}"))
            .to_string()
    });
    let watching = matches!(q.get("watch").map(String::as_str), Some("true" | "1"));
    if !watching {
        let mut held = inner.held.subscribe();
        let _ = held.wait_for(|h| !h.contains(&res)).await;
        return list(inner, res, &q, name.as_deref());
    }
    watch_stream(inner, res, &q, name)
}

/// One page of a list. The continue token is "<list resourceVersion>-<offset>".
fn list(
    inner: &Arc<Inner>,
    res: Res,
    q: &BTreeMap<String, String>,
    name: Option<&str>,
) -> Response<Body> {
    let limit: usize = q
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let mut st = inner.store.lock().unwrap();
    // A continue token is the list's resourceVersion and the last key sent
    // ("rv-namespace/name"): the next page starts after that key, found in the tree
    // (as the API server continues from a key in etcd), not by counting from the start.
    let (list_rv, after) = match q.get("continue").filter(|c| !c.is_empty()) {
        Some(c) => {
            let (rv, key) = c.split_once('-').unwrap_or(("", ""));
            let (ns, n) = key.split_once('/').unwrap_or(("", ""));
            (
                rv.parse().unwrap_or(st.rv),
                Some((ns.to_string(), n.to_string())),
            )
        }
        None => {
            *st.lists.entry(res).or_default() += 1;
            st.listed_at.insert(res, std::time::Instant::now());
            (st.rv, None)
        }
    };
    let empty = BTreeMap::new();
    let all = st.objects.get(&res).unwrap_or(&empty);
    let from = match &after {
        Some(k) => std::ops::Bound::Excluded(k),
        None => std::ops::Bound::Unbounded,
    };
    let matching = all
        .range((from, std::ops::Bound::Unbounded))
        .filter(|((_, n), _)| name.is_none_or(|want| n == want));
    let mut body = Vec::new();
    body.extend_from_slice(
        format!(
            "{{\"kind\":\"{}List\",\"apiVersion\":\"{}\",\"metadata\":{{\"resourceVersion\":\"{list_rv}\"",
            res.kind(),
            res.api_version()
        )
        .as_bytes(),
    );
    let mut items = Vec::new();
    let mut last = None;
    let mut more = false;
    for (i, (key, text)) in matching.enumerate() {
        if i == limit {
            more = true;
            break;
        }
        if i > 0 {
            items.push(b',');
        }
        items.extend_from_slice(text);
        last = Some(key);
    }
    if let (true, Some((ns, n))) = (more, last) {
        body.extend_from_slice(format!(",\"continue\":\"{list_rv}-{ns}/{n}\"").as_bytes());
    }
    body.extend_from_slice(b"},\"items\":[");
    body.extend_from_slice(&items);
    body.extend_from_slice(b"]}");
    drop(st);
    json_response(StatusCode::OK, full(body))
}

fn watch_stream(
    inner: &Arc<Inner>,
    res: Res,
    q: &BTreeMap<String, String>,
    name: Option<String>,
) -> Response<Body> {
    let mut st = inner.store.lock().unwrap();
    *st.watches.entry(res).or_default() += 1;
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|r| r.parse().ok())
        .unwrap_or(0);
    let timeout = Duration::from_secs(
        q.get("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .unwrap_or(290),
    );
    let gone = from < st.compacted;
    drop(st);
    let line = |v: Value| Bytes::from(format!("{v}\n"));
    if gone {
        let msg = format!("too old resource version: {from}");
        let body = line(json!({"type": "ERROR", "object": status(410, "Expired", &msg)}));
        return json_response(StatusCode::OK, full(body));
    }
    struct W {
        inner: Arc<Inner>,
        res: Res,
        name: Option<String>,
        cursor: u64,
        changed: watch::Receiver<u64>,
        expired: watch::Receiver<u64>,
        deadline: tokio::time::Instant,
        bookmarked: bool,
        done: bool,
    }
    let mut expired = inner.expired.subscribe();
    expired.mark_unchanged();
    let w = W {
        inner: inner.clone(),
        res,
        name,
        cursor: from,
        changed: inner.changed.subscribe(),
        expired,
        deadline: tokio::time::Instant::now() + timeout,
        bookmarked: false,
        done: false,
    };
    let stream = futures::stream::unfold(w, move |mut w| async move {
        loop {
            if w.done {
                return None;
            }
            if w.expired.has_changed().unwrap_or(false) {
                w.done = true;
                let msg = format!("too old resource version: {}", w.cursor);
                let b = line(json!({"type": "ERROR", "object": status(410, "Expired", &msg)}));
                return Some((Ok::<_, Infallible>(b), w));
            }
            {
                // Before reading, so a change made after the read wakes us up.
                w.changed.mark_unchanged();
                let st = w.inner.store.lock().unwrap();
                let start = st.log.partition_point(|l| l.rv <= w.cursor);
                let mut out = Vec::new();
                for l in &st.log[start..] {
                    if l.res == w.res && w.name.as_ref().is_none_or(|n| *n == l.name) {
                        out.extend_from_slice(&l.line);
                    }
                }
                let caught_up = st.rv;
                drop(st);
                if out.is_empty() && !w.bookmarked {
                    w.bookmarked = true;
                    let bm = json!({"type": "BOOKMARK", "object": {"kind": w.res.kind(), "apiVersion": w.res.api_version(),
                        "metadata": {"resourceVersion": caught_up.to_string()}}});
                    out = format!("{bm}\n").into_bytes();
                }
                w.cursor = caught_up;
                if !out.is_empty() {
                    return Some((Ok(Bytes::from(out)), w));
                }
            }
            tokio::select! {
                _ = w.changed.changed() => {}
                _ = w.expired.changed() => {
                    // Seen again at the top of the loop.
                    w.expired.mark_changed();
                }
                _ = tokio::time::sleep_until(w.deadline) => w.done = true,
            }
        }
    });
    json_response(
        StatusCode::OK,
        BodyExt::boxed(StreamBody::new(stream.map(|b| b.map(Frame::data)))),
    )
}

/// A [`FakeApi`] on a runtime whose threads live in the network namespace `netns`,
/// listening on `ip` there; stopped on drop.
pub struct ApiInNetns {
    api: Option<FakeApi>,
    /// The runtime whose threads are in the namespace.
    handle: tokio::runtime::Handle,
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ApiInNetns {
    pub fn start(netns: &str, ip: std::net::IpAddr) -> crate::Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let ns = netns.to_string();
        let thread = std::thread::spawn(move || {
            if let Err(e) = crate::sandbox::enter(&ns) {
                let _ = tx.send(Err(e));
                return;
            }
            // Worker threads are made by this thread, so they are inside the namespace too.
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(crate::Error::Sandbox(format!("runtime: {e}"))));
                    return;
                }
            };
            let api = rt.block_on(FakeApi::start_on(ip));
            let _ = tx.send(Ok((api, rt.handle().clone())));
            let _ = stop_rx.recv();
            drop(rt);
        });
        let (api, handle) = rx
            .recv()
            .map_err(|_| crate::Error::Sandbox("the fake API server's thread died".into()))??;
        Ok(Self {
            api: Some(api),
            handle,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    pub fn api(&self) -> &FakeApi {
        self.api.as_ref().expect("the API server until dropped")
    }

    /// [`FakeApi::restart`] from a thread outside the namespace: the listener is bound
    /// on the server's runtime, whose threads are in it.
    pub fn restart(&self) {
        let addr = self.api().addr;
        let listener = self
            .handle
            .block_on(self.handle.spawn(rebind(addr)))
            .expect("rebinding the fake API server");
        let _runtime = self.handle.enter();
        self.api().serve(listener);
    }
}

impl Drop for ApiInNetns {
    fn drop(&mut self) {
        drop(self.api.take());
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
