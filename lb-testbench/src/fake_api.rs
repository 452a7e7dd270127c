//! A small HTTP server that speaks the Kubernetes API's list and watch protocol for
//! Services, EndpointSlices and Nodes, to drive the real kube client in tests.
//!
//! - `GET <collection>`: a list with `metadata.resourceVersion`;
//! - `GET <collection>?watch=true&resourceVersion=R`: JSON lines of events after R, a
//!   BOOKMARK when caught up, then new events as they happen; an `ERROR` 410 (Expired)
//!   when R is older than the last compaction or when `expire()` is called;
//! - `fieldSelector=metadata.name=X` is honoured (the agent watches its own node);
//! - `drop_connections()` cuts every TCP connection; `stop()` also closes the listener
//!   (connections refused) until `start()`.
use std::{
    collections::BTreeMap,
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

type Key = (String, String);
type Body = BoxBody<Bytes, Infallible>;

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed()
}

#[derive(Default)]
struct Store {
    rv: u64,
    /// Watches from a resourceVersion at or below this get 410 Gone.
    compacted: u64,
    objects: BTreeMap<Res, BTreeMap<Key, Value>>,
    log: Vec<(u64, Res, &'static str, Value)>,
    lists: BTreeMap<Res, usize>,
    watches: BTreeMap<Res, usize>,
}

struct Inner {
    store: Mutex<Store>,
    /// Bumped on every change (wakes the watch streams).
    changed: watch::Sender<u64>,
    /// Bumped by `expire()`: every open watch gets a 410 and ends.
    expired: watch::Sender<u64>,
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

impl FakeApi {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the fake API server");
        let addr = listener.local_addr().unwrap();
        let inner = Arc::new(Inner {
            store: Mutex::new(Store::default()),
            changed: watch::Sender::new(0),
            expired: watch::Sender::new(0),
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
                let inner2 = inner.clone();
                let conn = tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let inner = inner2.clone();
                        async move { Ok::<_, Infallible>(handle(&inner, req)) }
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
    pub fn apply(&self, mut obj: Value) {
        let res = Res::from_kind(obj["kind"].as_str().expect("object without kind"));
        obj["apiVersion"] = json!(res.api_version());
        let key = key_of(&obj);
        let mut st = self.inner.store.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let objects = st.objects.entry(res).or_default();
        let kind = if objects.insert(key, obj.clone()).is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        st.log.push((rv, res, kind, obj));
        drop(st);
        self.inner.changed.send_replace(rv);
    }

    /// Deletes an object (DELETED). Panics if it does not exist (a test mistake).
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) {
        let res = Res::from_kind(kind);
        let mut st = self.inner.store.lock().unwrap();
        let mut obj = st
            .objects
            .entry(res)
            .or_default()
            .remove(&(namespace.to_string(), name.to_string()))
            .unwrap_or_else(|| panic!("deleting {kind} {namespace}/{name}: no such object"));
        st.rv += 1;
        let rv = st.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        st.log.push((rv, res, "DELETED", obj));
        drop(st);
        self.inner.changed.send_replace(rv);
    }

    /// Compacts the history and sends 410 Gone to every open watch: clients must relist.
    pub fn expire(&self) {
        let mut st = self.inner.store.lock().unwrap();
        st.compacted = st.rv;
        drop(st);
        self.inner.expired.send_modify(|n| *n += 1);
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
        // The aborted acceptor drops its listener when the task is next polled.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("rebinding the fake API server on {}: {e}", self.addr),
            }
        };
        self.serve(listener);
    }

    /// Number of list requests served for a collection.
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

fn json_response(code: StatusCode, v: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(full(v.to_string()))
        .unwrap()
}

fn handle(inner: &Arc<Inner>, req: Request<Incoming>) -> Response<Body> {
    let Some(res) = Res::from_path(req.uri().path()) else {
        let msg = format!("the fake API does not serve {}", req.uri().path());
        return json_response(StatusCode::NOT_FOUND, &status(404, "NotFound", &msg));
    };
    let q = query(&req);
    // Only `metadata.name=X` is supported, which is all the agent uses.
    let name = q.get("fieldSelector").map(|s| {
        s.strip_prefix("metadata.name=")
            .unwrap_or_else(|| panic!("unsupported fieldSelector {s:?}"))
            .to_string()
    });
    let matches = move |obj: &Value| {
        name.as_ref()
            .is_none_or(|n| obj["metadata"]["name"].as_str() == Some(n))
    };
    let watching = matches!(q.get("watch").map(String::as_str), Some("true" | "1"));
    let mut st = inner.store.lock().unwrap();
    if !watching {
        *st.lists.entry(res).or_default() += 1;
        let items: Vec<Value> = st
            .objects
            .get(&res)
            .into_iter()
            .flat_map(|m| m.values())
            .filter(|o| matches(o))
            .cloned()
            .collect();
        let list = json!({
            "kind": format!("{}List", res.kind()), "apiVersion": res.api_version(),
            "metadata": {"resourceVersion": st.rv.to_string()}, "items": items,
        });
        return json_response(StatusCode::OK, &list);
    }
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
        return Response::builder()
            .header("content-type", "application/json")
            .body(full(body))
            .unwrap();
    }
    struct W {
        inner: Arc<Inner>,
        res: Res,
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
        cursor: from,
        changed: inner.changed.subscribe(),
        expired,
        deadline: tokio::time::Instant::now() + timeout,
        bookmarked: false,
        done: false,
    };
    let stream = futures::stream::unfold((w, matches), move |(mut w, matches)| async move {
        loop {
            if w.done {
                return None;
            }
            if w.expired.has_changed().unwrap_or(false) {
                w.done = true;
                let msg = format!("too old resource version: {}", w.cursor);
                let b = line(json!({"type": "ERROR", "object": status(410, "Expired", &msg)}));
                return Some((Ok::<_, Infallible>(b), (w, matches)));
            }
            {
                // Before reading, so a change made after the read wakes us up.
                w.changed.mark_unchanged();
                let st = w.inner.store.lock().unwrap();
                let mut out = String::new();
                for (rv, res, kind, obj) in &st.log {
                    if *rv > w.cursor && *res == w.res && matches(obj) {
                        out.push_str(&format!("{}\n", json!({"type": kind, "object": obj})));
                    }
                }
                let caught_up = st.rv;
                drop(st);
                let had_events = !out.is_empty();
                if !had_events && !w.bookmarked {
                    w.bookmarked = true;
                    let bm = json!({"type": "BOOKMARK", "object": {"kind": w.res.kind(), "apiVersion": w.res.api_version(),
                        "metadata": {"resourceVersion": caught_up.to_string()}}});
                    out = format!("{bm}\n");
                }
                w.cursor = caught_up;
                if !out.is_empty() {
                    return Some((Ok(Bytes::from(out)), (w, matches)));
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
    Response::builder()
        .header("content-type", "application/json")
        .body(BodyExt::boxed(StreamBody::new(
            stream.map(|b| b.map(Frame::data)),
        )))
        .unwrap()
}
