//! The Kubernetes agent against a fake API server that speaks list and watch over HTTP
//! (tests/k8s_support/fake_api.rs), with the real kube client and the real eBPF maps
//! (loaded into a private pin folder, no interface attached). We change objects in the
//! fake API and assert what the kernel maps hold. Needs root; run with --test-threads=1.
use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read, Write},
    net::{Ipv4Addr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use lb_testbench::fake_api::{FakeApi, Res};
use lb_userspace::{
    dataplane::{
        plan::{backend_addr, frontend_addr},
        writer::{Writer, WriterOptions},
        Dataplane, Maps,
    },
    healthcheck::{HealthChecks, HealthServer},
    k8s::{
        metrics::Metrics, translate::Rules, writer_options, Controller, ControllerOptions, Health,
    },
    loader::{self, Datapath, LoadOptions},
};
use serde_json::{json, Value};
use tokio::{sync::watch, task::JoinHandle};

const NODE: &str = "node-1";
const WAIT: Duration = Duration::from_secs(15);

static N: AtomicUsize = AtomicUsize::new(0);

/// A pin folder under /sys/fs/bpf with the "lbt" prefix, removed on drop (even when the
/// test fails), so `cargo xtask clean-sandboxes` only ever sees leftovers of killed runs.
struct Pins(PathBuf);

impl Pins {
    fn new() -> Self {
        lb_testbench::sandbox::hold_sandbox_lock();
        let n = N.fetch_add(1, Ordering::SeqCst);
        let dir = PathBuf::from(format!("/sys/fs/bpf/lbt-k8s-{}-{n}", std::process::id()));
        let _ = loader::remove_pins(&dir);
        Self(dir)
    }

    fn load_options(&self) -> LoadOptions {
        LoadOptions {
            pin_dir: self.0.clone(),
            max_frontends: 256,
            max_backends: 1024,
            max_slots: 1024,
            max_conntrack: 1024,
            ..Default::default()
        }
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = loader::remove_pins(&self.0);
    }
}

/// The maps as strings: frontend -> ready backends (sorted), every backend present, and
/// each frontend's `FRONTEND_F_*` flags.
#[derive(Debug, Default, PartialEq, Eq)]
struct Snap {
    frontends: BTreeMap<String, Vec<String>>,
    backends: BTreeSet<String>,
    flags: BTreeMap<String, u32>,
}

fn snapshot(dir: &Path) -> Snap {
    let maps = Maps::from_pins(dir).expect("opening the test maps");
    let st = maps.read_state().expect("reading the test maps");
    let mut snap = Snap::default();
    for (k, f) in &st.frontends {
        let mut list: Vec<String> = st
            .slot_list(f)
            .iter()
            .map(|id| {
                st.backend(*id)
                    .map(|b| backend_addr(b).to_string())
                    .unwrap_or_else(|| format!("#{id}?"))
            })
            .collect();
        list.sort();
        snap.frontends.insert(frontend_addr(k).to_string(), list);
        snap.flags.insert(frontend_addr(k).to_string(), f.flags);
    }
    snap.backends = st
        .backends()
        .map(|(_, b)| backend_addr(b).to_string())
        .collect();
    snap
}

/// The ready backends of a frontend; empty if the frontend is missing.
fn active<'a>(s: &'a Snap, frontend: &str) -> &'a [String] {
    s.frontends
        .get(frontend)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

fn fe(v: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
    v.iter()
        .map(|(f, bs)| (f.to_string(), bs.iter().map(|b| b.to_string()).collect()))
        .collect()
}

/// Polls the maps until `want` holds; panics with the last content after `WAIT`.
/// Returns how long it took.
async fn wait_maps(dir: &Path, what: &str, want: impl Fn(&Snap) -> bool) -> Duration {
    let t0 = Instant::now();
    loop {
        let snap = snapshot(dir);
        if want(&snap) {
            return t0.elapsed();
        }
        if t0.elapsed() > WAIT {
            panic!("timed out after {WAIT:?} waiting for: {what}\nthe maps hold: {snap:#?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(
            t0.elapsed() < WAIT,
            "timed out after {WAIT:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn service(name: &str, ip: &str, ports: &[(&str, u16, &str)]) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, p, proto)| json!({"name": n, "port": p, "protocol": proto}))
        .collect();
    json!({"kind": "Service", "metadata": {"name": name, "namespace": "shop"},
           "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip], "ports": ports}})
}

fn slice(
    name: &str,
    svc: &str,
    ports: &[(&str, u16, &str)],
    eps: &[(&str, Option<bool>)],
) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, p, proto)| json!({"name": n, "port": p, "protocol": proto}))
        .collect();
    let eps: Vec<Value> = eps
        .iter()
        .map(|(a, ready)| match ready {
            Some(r) => json!({"addresses": [a], "conditions": {"ready": r}}),
            None => json!({"addresses": [a]}),
        })
        .collect();
    json!({"kind": "EndpointSlice",
           "metadata": {"name": name, "namespace": "shop", "labels": {"kubernetes.io/service-name": svc}},
           "addressType": "IPv4", "ports": ports, "endpoints": eps})
}

fn node(name: &str) -> Value {
    json!({"kind": "Node", "metadata": {"name": name}})
}

/// A Node with an InternalIP (and its Hostname, which is not a NodePort address).
fn node_at(name: &str, internal_ip: &str) -> Value {
    let mut n = node(name);
    n["status"] = json!({"addresses": [
        {"type": "Hostname", "address": name},
        {"type": "InternalIP", "address": internal_ip},
    ]});
    n
}

/// The controller and the writer thread on a dataplane, talking to the fake API with the
/// real kube client: what `lb agent` runs.
struct Running {
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<lb_userspace::Result<()>>>,
    metrics: Metrics,
    health: Health,
    writer: Option<Writer>,
    _health_checks: HealthServer,
}

impl Running {
    fn start(api: &FakeApi, plane: Dataplane) -> Self {
        let config = kube::Config::new(api.url().parse().unwrap());
        let client = kube::Client::try_from(config).expect("kube client");
        let metrics = Metrics::default();
        let checks = HealthChecks::default();
        let writer = Writer::spawn(
            plane,
            WriterOptions {
                health_checks: Some(checks.clone()),
                ..writer_options(Duration::ZERO)
            },
            metrics.on_sync(),
        )
        .expect("writer thread");
        // The healthCheckNodePorts on the loopback address only (the agent's default is
        // every address of the node).
        let health_checks = HealthServer::start(checks, Ipv4Addr::LOCALHOST.into());
        let health = Health::new(writer.status());
        let opts = ControllerOptions {
            node_name: NODE.into(),
            rules: Rules::default(),
            health: None,
        };
        let controller = Controller::new(client, opts, writer.updates(), metrics.clone());
        let (stop, mut rx) = watch::channel(false);
        let task = tokio::spawn(controller.run(async move {
            let _ = rx.wait_for(|s| *s).await;
        }));
        Self {
            stop,
            task: Some(task),
            metrics,
            health,
            writer: Some(writer),
            _health_checks: health_checks,
        }
    }

    /// Stops the controller and the writer.
    async fn stop(&mut self) {
        let _ = self.stop.send(true);
        let task = self.task.take().unwrap();
        let r = tokio::time::timeout(WAIT, task)
            .await
            .expect("the controller did not stop");
        r.expect("controller task").expect("controller result");
        if let Some(w) = self.writer.take() {
            drop(tokio::task::block_in_place(|| w.stop()));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// The agent on real maps in a pin folder of its own.
struct Agent {
    run: Running,
    metrics: Metrics,
    health: Health,
    _datapath: Datapath,
    /// Last, so the maps are closed before the pins go.
    pins: Option<Pins>,
}

impl Agent {
    async fn start(api: &FakeApi) -> Self {
        let pins = Pins::new();
        let (datapath, maps) =
            Datapath::load(&pins.load_options()).expect("loading the eBPF object (root needed)");
        let run = Running::start(api, Dataplane::new(maps).unwrap());
        Self {
            metrics: run.metrics.clone(),
            health: run.health.clone(),
            run,
            _datapath: datapath,
            pins: Some(pins),
        }
    }

    fn dir(&self) -> &Path {
        &self.pins.as_ref().expect("pins until stopped").0
    }

    async fn wait_ready(&self) {
        let h = self.health.clone();
        wait_until("the agent to be ready", move || h.is_ready()).await;
    }

    /// Stops the controller; returns the pins (removed when the caller drops them).
    async fn stop(mut self) -> Pins {
        self.run.stop().await;
        self.pins.take().unwrap()
    }
}

const WEB: &str = "10.96.0.10";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_and_slices_reach_the_maps_and_converge() {
    let api = FakeApi::start().await;
    api.apply(node(NODE));
    // Objects the agent must ignore or reject without disturbing the rest.
    api.apply(
        json!({"kind": "Service", "metadata": {"name": "headless", "namespace": "shop"},
                     "spec": {"clusterIP": "None", "ports": [{"port": 80}]}}),
    );
    api.apply(
        json!({"kind": "Service", "metadata": {"name": "broken", "namespace": "shop"},
                     "spec": {"clusterIP": "10.96.0.300", "ports": [{"port": 80}]}}),
    );
    api.apply(service(
        "diameter",
        "10.96.0.40",
        &[("tcp", 3868, "TCP"), ("sctp", 3868, "SCTP")],
    ));
    // A field not implemented yet: programmed without it, with a log line and a metric.
    let mut sticky = service("sticky", "10.96.0.50", &[("http", 80, "TCP")]);
    sticky["spec"]["trafficDistribution"] = json!("PreferSameNode");
    api.apply(sticky);
    let agent = Agent::start(&api).await;
    agent.wait_ready().await;
    let dir = agent.dir().to_path_buf();
    wait_maps(
        &dir,
        "only the TCP port of the SCTP service, and the sticky one",
        |s| s.frontends == fe(&[("10.96.0.40:3868/TCP", &[]), ("10.96.0.50:80/TCP", &[])]),
    )
    .await;
    let field = lb_userspace::k8s::metrics::FieldLabel {
        kind: "Service".into(),
        field: "trafficDistribution".into(),
    };
    assert_eq!(agent.metrics.ignored_fields.get_or_create(&field).get(), 1);
    api.delete("Service", "shop", "sticky");
    assert_eq!(
        agent
            .metrics
            .skipped_service_ports
            .get_or_create(&reason("sctp"))
            .get(),
        1
    );
    assert_eq!(
        agent
            .metrics
            .rejected_objects
            .get_or_create(&kind("Service"))
            .get(),
        1
    );
    api.delete("Service", "shop", "diameter");

    // A new Service: its frontends appear, with no backend yet.
    api.apply(service(
        "web",
        WEB,
        &[("http", 80, "TCP"), ("dns", 53, "UDP")],
    ));
    let took = wait_maps(&dir, "web's frontends", |s| {
        s.frontends == fe(&[("10.96.0.10:53/UDP", &[]), ("10.96.0.10:80/TCP", &[])])
    })
    .await;
    assert!(took < Duration::from_secs(1), "propagation took {took:?}");

    // Slices: ports are matched by name; endpoints of all slices are merged.
    let ports = [("http", 8080, "TCP"), ("dns", 5353, "UDP")];
    api.apply(slice(
        "web-a",
        "web",
        &ports,
        &[("10.244.1.2", Some(true)), ("10.244.1.3", None)],
    ));
    wait_maps(&dir, "two backends", |s| {
        s.frontends
            == fe(&[
                (
                    "10.96.0.10:53/UDP",
                    &["10.244.1.2:5353/UDP", "10.244.1.3:5353/UDP"],
                ),
                (
                    "10.96.0.10:80/TCP",
                    &["10.244.1.2:8080/TCP", "10.244.1.3:8080/TCP"],
                ),
            ])
    })
    .await;
    // Scale up with a second slice (one address repeated: deduplicated).
    api.apply(slice(
        "web-b",
        "web",
        &ports,
        &[("10.244.2.2", Some(true)), ("10.244.1.3", Some(true))],
    ));
    wait_maps(&dir, "three backends", |s| {
        active(s, "10.96.0.10:80/TCP").len() == 3
    })
    .await;

    // Readiness flips to false: no new connections, but the backend stays known.
    api.apply(slice(
        "web-b",
        "web",
        &ports,
        &[("10.244.2.2", Some(false)), ("10.244.1.3", Some(true))],
    ));
    wait_maps(&dir, "10.244.2.2 not ready", |s| {
        active(s, "10.96.0.10:80/TCP") == ["10.244.1.2:8080/TCP", "10.244.1.3:8080/TCP"]
            && s.backends.contains("10.244.2.2:8080/TCP")
    })
    .await;

    // Scale down: the slice goes, its only address goes from the backend map too.
    api.delete("EndpointSlice", "shop", "web-b");
    wait_maps(&dir, "web-b gone", |s| {
        active(s, "10.96.0.10:80/TCP").len() == 2 && !s.backends.contains("10.244.2.2:8080/TCP")
    })
    .await;

    // Ports change: dns removed, metrics added.
    api.apply(service(
        "web",
        WEB,
        &[("http", 80, "TCP"), ("metrics", 9090, "TCP")],
    ));
    api.apply(slice(
        "web-a",
        "web",
        &[("http", 8080, "TCP"), ("metrics", 9100, "TCP")],
        &[("10.244.1.2", None)],
    ));
    wait_maps(&dir, "ports changed", |s| {
        s.frontends
            == fe(&[
                ("10.96.0.10:80/TCP", &["10.244.1.2:8080/TCP"]),
                ("10.96.0.10:9090/TCP", &["10.244.1.2:9100/TCP"]),
            ])
    })
    .await;

    // ClusterIP -> ExternalName -> ClusterIP.
    api.apply(
        json!({"kind": "Service", "metadata": {"name": "web", "namespace": "shop"},
                     "spec": {"type": "ExternalName", "externalName": "example.com"}}),
    );
    wait_maps(&dir, "ExternalName: no frontend", |s| {
        s.frontends.is_empty() && s.backends.is_empty()
    })
    .await;
    api.apply(service("web", WEB, &[("http", 80, "TCP")]));
    wait_maps(&dir, "ClusterIP again", |s| {
        s.frontends == fe(&[("10.96.0.10:80/TCP", &["10.244.1.2:8080/TCP"])])
    })
    .await;

    // The malformed Service is fixed: it is programmed.
    api.apply(service("broken", "10.96.0.30", &[("", 80, "TCP")]));
    wait_maps(&dir, "fixed service", |s| {
        s.frontends.contains_key("10.96.0.30:80/TCP")
    })
    .await;

    // Delete everything.
    api.delete("Service", "shop", "web");
    api.delete("Service", "shop", "broken");
    wait_maps(&dir, "empty maps", |s| {
        s.frontends.is_empty() && s.backends.is_empty()
    })
    .await;
    assert_eq!(agent.metrics.map_update_errors.get(), 0);
    agent.stop().await;
}

fn reason(r: &str) -> lb_userspace::k8s::metrics::ReasonLabel {
    lb_userspace::k8s::metrics::ReasonLabel { reason: r.into() }
}

fn kind(k: &str) -> lb_userspace::k8s::metrics::KindLabel {
    lb_userspace::k8s::metrics::KindLabel { kind: k.into() }
}

/// Sets up web with two backends and waits for the maps.
async fn web_with_two_backends(api: &FakeApi, agent: &Agent) {
    api.apply(service("web", WEB, &[("http", 80, "TCP")]));
    api.apply(slice(
        "web-a",
        "web",
        &[("http", 8080, "TCP")],
        &[("10.244.1.2", None), ("10.244.1.3", None)],
    ));
    wait_maps(agent.dir(), "web with two backends", |s| {
        s.frontends
            == fe(&[(
                "10.96.0.10:80/TCP",
                &["10.244.1.2:8080/TCP", "10.244.1.3:8080/TCP"],
            )])
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_restarts_resync_only_what_differs() {
    let api = FakeApi::start().await;
    api.apply(node(NODE));
    let agent = Agent::start(&api).await;
    agent.wait_ready().await;
    web_with_two_backends(&api, &agent).await;
    let dir = agent.dir().to_path_buf();

    // 410 Gone with nothing changed: a relist, and not one map write.
    let (lists, ops, syncs) = (
        api.lists(Res::Services),
        agent.metrics.map_operations.get(),
        agent.health.syncs(),
    );
    api.expire();
    wait_until("a relist of Services and EndpointSlices", || {
        api.lists(Res::Services) > lists && api.lists(Res::EndpointSlices) > lists
    })
    .await;
    let h = agent.health.clone();
    wait_until("a sync after the relist", move || h.syncs() > syncs).await;
    // Let every relist's sync run.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        agent.metrics.map_operations.get(),
        ops,
        "a relist without change wrote to the maps"
    );

    // Changes made while the watches are expired arrive through the relist, as a diff:
    // one backend added = a backend and a slot written, the frontend's count updated.
    api.expire();
    let ops = agent.metrics.map_operations.get();
    api.apply(slice(
        "web-a",
        "web",
        &[("http", 8080, "TCP")],
        &[
            ("10.244.1.2", None),
            ("10.244.1.3", None),
            ("10.244.1.4", None),
        ],
    ));
    wait_maps(&dir, "third backend after relist", |s| {
        active(s, "10.96.0.10:80/TCP").len() == 3
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        agent.metrics.map_operations.get() - ops,
        4,
        "adding one backend should take 4 map writes (backend, slot, Maglev table, frontend)"
    );

    // Both expiries relisted every collection (one list at start, one per expiry).
    wait_until("both relists of Services and EndpointSlices", || {
        api.lists(Res::Services) >= 3 && api.lists(Res::EndpointSlices) >= 3
    })
    .await;
    // A dropped connection: the watch resumes from its resourceVersion (no relist).
    let lists = api.lists(Res::Services);
    let watches = api.watches(Res::Services);
    api.drop_connections();
    wait_until("the Service watch to resume", || {
        api.watches(Res::Services) > watches
    })
    .await;
    api.delete("EndpointSlice", "shop", "web-a");
    wait_maps(&dir, "no backend", |s| {
        s.frontends == fe(&[("10.96.0.10:80/TCP", &[])]) && s.backends.is_empty()
    })
    .await;
    assert_eq!(
        api.lists(Res::Services),
        lists,
        "a dropped watch connection should not force a relist"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_outage_keeps_the_last_state_and_converges_when_back() {
    let api = FakeApi::start().await;
    api.apply(node(NODE));
    let agent = Agent::start(&api).await;
    agent.wait_ready().await;
    web_with_two_backends(&api, &agent).await;
    let dir = agent.dir().to_path_buf();
    let before = snapshot(&dir);

    api.stop();
    // The cluster changes while the agent cannot see it.
    api.delete("EndpointSlice", "shop", "web-a");
    api.apply(service("db", "10.96.0.20", &[("pg", 5432, "TCP")]));
    api.apply(slice(
        "db-a",
        "db",
        &[("pg", 5432, "TCP")],
        &[("10.244.3.2", None)],
    ));
    let errors = agent
        .metrics
        .watch_errors
        .get_or_create(&kind("Service"))
        .get();
    let m = agent.metrics.clone();
    wait_until("watch errors during the outage", move || {
        m.watch_errors.get_or_create(&kind("Service")).get() > errors
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        snapshot(&dir),
        before,
        "the maps must keep the last known state while the API is away"
    );
    assert!(
        agent.health.is_ready(),
        "an outage after the first sync keeps the agent ready (the dataplane works)"
    );

    api.restart().await;
    // Kube's default backoff starts at 0.8 s and doubles: a few seconds at most here.
    wait_maps(&dir, "the state after the outage", |s| {
        s.frontends
            == fe(&[
                ("10.96.0.10:80/TCP", &[]),
                ("10.96.0.20:5432/TCP", &["10.244.3.2:5432/TCP"]),
            ])
    })
    .await;
    agent.stop().await;
}

/// The API server gone for long enough that a client-go-like backoff (0.8 s doubling to
/// 30 s) would be waiting many seconds when it returns, and its history compacted
/// meanwhile (the watches must relist): the agent is current again within seconds, with
/// the deletions made during the outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_is_current_within_seconds_of_the_api_servers_return() {
    let api = FakeApi::start().await;
    api.apply(node(NODE));
    let agent = Agent::start(&api).await;
    agent.wait_ready().await;
    web_with_two_backends(&api, &agent).await;
    api.apply(service("old", "10.96.0.30", &[("x", 81, "TCP")]));
    let dir = agent.dir().to_path_buf();
    wait_maps(&dir, "the old Service", |s| {
        s.frontends.contains_key("10.96.0.30:81/TCP")
    })
    .await;

    api.stop();
    // The cluster changes while the agent cannot see it; the history of those changes is
    // compacted before it comes back.
    api.delete("EndpointSlice", "shop", "web-a");
    api.delete("Service", "shop", "old");
    api.apply(service("db", "10.96.0.20", &[("pg", 5432, "TCP")]));
    api.apply(slice(
        "db-a",
        "db",
        &[("pg", 5432, "TCP")],
        &[("10.244.3.2", None)],
    ));
    tokio::time::sleep(Duration::from_secs(12)).await;
    api.compact();
    api.restart().await;
    let took = wait_maps(&dir, "the state after the outage", |s| {
        s.frontends
            == fe(&[
                ("10.96.0.10:80/TCP", &[]),
                ("10.96.0.20:5432/TCP", &["10.244.3.2:5432/TCP"]),
            ])
    })
    .await;
    assert!(
        took < Duration::from_secs(5),
        "current again {took:?} after the API server came back"
    );
    agent.stop().await;
}

/// An agent restarted on pinned maps writes nothing until Services, EndpointSlices and
/// its Node are all listed: its NodePort frontends stay in place meanwhile, not even
/// removed for a moment (they open on the node's addresses, which come with the Node).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_waits_for_the_node_list_before_writing() {
    let api = FakeApi::start().await;
    api.apply(node_at(NODE, "192.168.50.1"));
    let mut svc = service("web", WEB, &[("http", 80, "TCP")]);
    svc["spec"]["type"] = json!("NodePort");
    svc["spec"]["ports"][0]["nodePort"] = json!(30080);
    api.apply(svc);
    let mut sl = slice(
        "web-a",
        "web",
        &[("http", 8080, "TCP")],
        &[("10.244.1.2", None)],
    );
    sl["endpoints"][0]["nodeName"] = json!(NODE);
    api.apply(sl);
    let want = fe(&[
        ("10.96.0.10:80/TCP", &["10.244.1.2:8080/TCP"]),
        ("192.168.50.1:30080/TCP", &["10.244.1.2:8080/TCP"]),
    ]);
    let agent = Agent::start(&api).await;
    agent.wait_ready().await;
    let dir = agent.dir().to_path_buf();
    wait_maps(&dir, "the NodePort", |s| s.frontends == want).await;
    let pins = agent.stop().await;

    // A second agent on the same maps, with the Node list slow to come.
    api.hold_lists(Res::Nodes);
    let (svc_lists, slice_lists) = (api.lists(Res::Services), api.lists(Res::EndpointSlices));
    let maps = Maps::from_pins(&dir).unwrap();
    let mut second = Running::start(&api, Dataplane::new(maps).unwrap());
    wait_until("the Service and EndpointSlice lists", || {
        api.lists(Res::Services) > svc_lists && api.lists(Res::EndpointSlices) > slice_lists
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(snapshot(&dir).frontends, want, "nothing written yet");
    assert_eq!(second.metrics.map_operations.get(), 0);
    assert!(!second.health.is_ready());
    api.release_lists(Res::Nodes);
    let h = second.health.clone();
    wait_until("ready once the Node is listed", move || h.is_ready()).await;
    assert_eq!(snapshot(&dir).frontends, want);
    assert_eq!(
        second.metrics.map_operations.get(),
        0,
        "the first sync on unchanged pinned maps writes nothing"
    );
    second.stop().await;
    drop(pins);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_written_before_services_and_slices_are_listed() {
    // Maps that already hold a backend (as after an agent restart on pinned maps)...
    let api = FakeApi::start().await;
    api.apply(node(NODE));
    web_seed(&api);
    let agent = Agent::start(&api).await;
    agent.wait_ready().await;
    let dir = agent.dir().to_path_buf();
    wait_maps(&dir, "seeded state", |s| {
        active(s, "10.96.0.10:80/TCP").len() == 2
    })
    .await;
    let ops = agent.metrics.map_operations.get();
    let pins = agent.stop().await;
    // ...and a second controller on the same maps: the first sync writes nothing, since
    // the state did not change, and the readiness comes only after the node is listed.
    let maps = Maps::from_pins(&dir).unwrap();
    let mut second = Running::start(&api, Dataplane::new(maps).unwrap());
    let (metrics, health) = (second.metrics.clone(), second.health.clone());
    let h = health.clone();
    wait_until("ready again", move || h.is_ready()).await;
    assert!(ops > 0);
    assert_eq!(
        metrics.map_operations.get(),
        0,
        "a restart on unchanged pinned maps should write nothing"
    );
    assert_eq!(snapshot(&dir).frontends["10.96.0.10:80/TCP"].len(), 2);
    second.stop().await;
    drop(pins);
}

fn web_seed(api: &FakeApi) {
    api.apply(service("web", WEB, &[("http", 80, "TCP")]));
    api.apply(slice(
        "web-a",
        "web",
        &[("http", 8080, "TCP")],
        &[("10.244.1.2", None), ("10.244.1.3", None)],
    ));
}

// ---- The `lb agent` binary: flags, kubeconfig, HTTP endpoints, signals, pinned restart.

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A plain HTTP/1.0 GET: (status, body); None if the connection fails.
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let code = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((code, body))
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
}

/// `lb agent` on small maps in `pins`, serving /metrics on `port` and kube-proxy's
/// /healthz on a free loopback port (never the host's 0.0.0.0:10256), with `extra` flags.
fn agent_command(kubeconfig: Option<&Path>, pins: &Pins, port: u16, extra: &[&str]) -> Command {
    let mut cmd = Command::new(lb_testbench::agent::lb_binary().unwrap());
    cmd.args(["agent", "--cgroup", "none"]);
    if let Some(k) = kubeconfig {
        cmd.arg("--kubeconfig").arg(k);
    }
    cmd.args([
        "--interfaces",
        "lbt-none-*",
        "--listen",
        &format!("127.0.0.1:{port}"),
    ])
    .arg("--pin-dir")
    .arg(&pins.0)
    .args([
        "--max-frontends",
        "256",
        "--max-backends",
        "1024",
        "--max-slots",
        "1024",
        "--max-conntrack",
        "1024",
    ])
    .args(extra);
    if !extra.contains(&"--healthz-bind-address") {
        cmd.arg("--healthz-bind-address")
            .arg(format!("127.0.0.1:{}", free_port()));
    }
    cmd.env("NODE_NAME", NODE)
        .env("RUST_LOG", "info")
        .env_remove("LB_API_SERVER")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT");
    cmd
}

fn spawn_agent(kubeconfig: &Path, pins: &Pins, port: u16, keep: bool) -> Proc {
    let extra: &[&str] = if keep { &["--keep-pinned"] } else { &[] };
    Proc(
        agent_command(Some(kubeconfig), pins, port, extra)
            .spawn()
            .expect("starting lb agent"),
    )
}

async fn wait_http(port: u16, path: &str, want: u16) -> String {
    let t0 = Instant::now();
    loop {
        if let Some((code, body)) = http_get(port, path) {
            if code == want {
                return body;
            }
        }
        assert!(
            t0.elapsed() < WAIT,
            "timed out waiting for {path} to answer {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn sigterm_and_wait(p: &mut Proc) -> std::process::ExitStatus {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(p.0.id() as i32, libc::SIGTERM) };
    let t0 = Instant::now();
    loop {
        if let Some(st) = p.0.try_wait().unwrap() {
            return st;
        }
        assert!(t0.elapsed() < WAIT, "lb agent did not exit on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_binary_serves_health_metrics_and_restarts_on_pinned_maps() {
    let api = FakeApi::start().await;
    api.apply(node(NODE));
    let pins = Pins::new();
    let kubeconfig = Kubeconfig::new(&api.url());
    let port = free_port();
    let mut agent = spawn_agent(&kubeconfig.0, &pins, port, true);
    assert_eq!(wait_http(port, "/healthz", 200).await, "ok\n");
    wait_http(port, "/readyz", 200).await;
    // Every labelled series exists at zero from the first scrape, before its first event.
    let first = wait_http(port, "/metrics", 200).await;
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
        r#"lb_dataplane_packets_total{kind="drop_no_backend"} 0"#,
        "lb_map_update_errors_total 0",
        "lb_conntrack_entries 0",
        "lb_conntrack_max_entries 1024",
    ] {
        assert!(
            first.lines().any(|l| l == series),
            "{series} missing from a fresh agent's first scrape:\n{first}"
        );
    }
    // The conntrack fill is counted from the map at each scrape.
    {
        let mut maps = Maps::from_pins(&pins.0).unwrap();
        for port in [1000u16, 1001, 1002] {
            let key = lb_common::CtKey {
                src_addr: lb_userspace::dataplane::plan::map_addr(&"10.244.9.9".parse().unwrap()),
                dst_addr: lb_userspace::dataplane::plan::map_addr(&WEB.parse().unwrap()),
                src_port: port.to_be(),
                dst_port: 80u16.to_be(),
                proto: 6,
                _pad: [0; 3],
            };
            // SAFETY: CtValue is plain data; zeroes are a valid (new, forward) entry.
            let value: lb_common::CtValue = unsafe { std::mem::zeroed() };
            maps.conntrack.insert(key, value, 0).unwrap();
        }
    }
    let text = wait_http(port, "/metrics", 200).await;
    assert_eq!(metric(&text, "lb_conntrack_entries"), Some(3.0), "{text}");
    // A slice whose change was triggered just now: the programming latency is observed.
    let now = jiff::Timestamp::now().to_string();
    web_seed(&api);
    let mut sl = slice(
        "web-a",
        "web",
        &[("http", 8080, "TCP")],
        &[("10.244.1.2", None), ("10.244.1.3", None)],
    );
    sl["metadata"]["annotations"] =
        json!({"endpoints.kubernetes.io/last-change-trigger-time": now});
    api.apply(sl);
    wait_maps(&pins.0, "web in the agent's maps", |s| {
        active(s, "10.96.0.10:80/TCP").len() == 2
    })
    .await;
    let mut text = String::new();
    for _ in 0..100 {
        text = wait_http(port, "/metrics", 200).await;
        if metric(&text, "lb_network_programming_duration_seconds_count") == Some(1.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (name, want) in [
        ("lb_services", 1.0),
        ("lb_frontends", 1.0),
        ("lb_backends", 2.0),
        ("lb_network_programming_duration_seconds_count", 1.0),
        ("lb_map_update_errors_total", 0.0),
        ("lb_map_drift_repairs_total", 0.0),
        ("lb_map_drift_entries_total", 0.0),
        ("lb_frontends_without_maglev_table", 0.0),
        ("lb_maglev_cells", 127.0),
    ] {
        assert_eq!(metric(&text, name), Some(want), "{name} in:\n{text}");
    }
    let latency = metric(&text, "lb_network_programming_duration_seconds_sum").unwrap();
    assert!((0.0..2.0).contains(&latency), "latency {latency} s");
    assert!(
        text.contains("lb_dataplane_packets_total{kind=\"new_flow\"} 0"),
        "{text}"
    );
    assert!(metric(&text, "lb_sync_duration_seconds_count").unwrap() >= 1.0);
    let ops_first = metric(&text, "lb_map_operations_total").unwrap();
    assert!(ops_first > 0.0);

    // Restart with the maps kept pinned: the state survives, and the new agent's first
    // sync writes nothing.
    assert!(sigterm_and_wait(&mut agent).success());
    assert_eq!(
        snapshot(&pins.0).frontends["10.96.0.10:80/TCP"].len(),
        2,
        "pins kept"
    );
    let mut agent = spawn_agent(&kubeconfig.0, &pins, port, false);
    let text = {
        wait_http(port, "/readyz", 200).await;
        wait_http(port, "/metrics", 200).await
    };
    assert_eq!(
        metric(&text, "lb_map_operations_total"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(metric(&text, "lb_backends"), Some(2.0));
    // Without --keep-pinned, SIGTERM removes everything.
    assert!(sigterm_and_wait(&mut agent).success());
    assert!(!pins.0.exists(), "{} should be gone", pins.0.display());
}

/// The agent's collector builds the conntrack filter once the agent has attached (the
/// load leaves it off), and rebuilds it when a pass finds an entry without its bit (made
/// behind the programs' back, here by the test): then the bit is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_collector_builds_the_conntrack_filter_and_rebuilds_it_for_an_entry_without_its_bit() {
    let api = FakeApi::start().await;
    api.apply(node(NODE));
    let pins = Pins::new();
    let kubeconfig = Kubeconfig::new(&api.url());
    let port = free_port();
    let mut agent = Proc(
        agent_command(
            Some(&kubeconfig.0),
            &pins,
            port,
            &["--ct-gc-interval-ms", "200"],
        )
        .spawn()
        .expect("starting lb agent"),
    );
    wait_http(port, "/readyz", 200).await;
    let until = |want: &'static [(&'static str, f64)]| async move {
        let t0 = Instant::now();
        loop {
            let text = wait_http(port, "/metrics", 200).await;
            if want.iter().all(|(n, v)| metric(&text, n) == Some(*v)) {
                return text;
            }
            assert!(t0.elapsed() < WAIT, "{want:?} never in:\n{text}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    until(&[
        ("lb_conntrack_filter_on", 1.0),
        ("lb_conntrack_filter_rebuilds_total", 1.0),
        ("lb_conntrack_filter_bits", 0.0),
    ])
    .await;

    let maps = Maps::from_pins(&pins.0).unwrap();
    let key = lb_common::CtKey {
        src_addr: lb_userspace::dataplane::plan::map_addr(&"10.244.9.9".parse().unwrap()),
        dst_addr: lb_userspace::dataplane::plan::map_addr(&WEB.parse().unwrap()),
        src_port: 1000u16.to_be(),
        dst_port: 80u16.to_be(),
        proto: 6,
        _pad: [0; 3],
    };
    {
        let mut maps = Maps::from_pins(&pins.0).unwrap();
        // SAFETY: CtValue is plain data; zeroes are a valid (new, forward) entry; seen
        // now, so the collector keeps it (a SYN waiting: 60 s).
        let mut value: lb_common::CtValue = unsafe { std::mem::zeroed() };
        value.last_seen_ns = lb_userspace::dataplane::gc::monotonic_now_ns();
        maps.conntrack.insert(key, value, 0).unwrap();
    }
    until(&[
        ("lb_conntrack_filter_on", 1.0),
        ("lb_conntrack_filter_rebuilds_total", 2.0),
        ("lb_conntrack_filter_bits", 1.0),
    ])
    .await;
    let words = maps.ct_filter().unwrap().snapshot();
    let (w, mask) = lb_common::ct_filter_bit(&key);
    assert_ne!(words[w as usize] & mask, 0, "the hand-made entry's bit");
    assert!(sigterm_and_wait(&mut agent).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_ports_follow_the_node_addresses_and_the_external_traffic_policy() {
    use lb_common::{FRONTEND_F_LOCAL, FRONTEND_F_NODEPORT};
    let api = FakeApi::start().await;
    api.apply(node_at(NODE, "192.168.50.1"));
    // Another node, which the agent must not take for its own.
    api.apply(node_at("node-2", "192.168.50.9"));
    let agent = Agent::start(&api).await;
    agent.wait_ready().await;
    let dir = agent.dir().to_path_buf();

    let node_port_web = |policy: &str| {
        let mut svc = service("web", WEB, &[("http", 80, "TCP")]);
        svc["spec"]["type"] = json!("NodePort");
        svc["spec"]["externalTrafficPolicy"] = json!(policy);
        svc["spec"]["ports"][0]["nodePort"] = json!(30080);
        svc
    };
    api.apply(node_port_web("Cluster"));
    let mut sl = slice(
        "web-a",
        "web",
        &[("http", 8080, "TCP")],
        &[("10.244.1.2", None), ("10.244.2.2", None)],
    );
    sl["endpoints"][0]["nodeName"] = json!(NODE);
    sl["endpoints"][1]["nodeName"] = json!("node-2");
    api.apply(sl);
    let both: &[&str] = &["10.244.1.2:8080/TCP", "10.244.2.2:8080/TCP"];
    let local: &[&str] = &["10.244.1.2:8080/TCP"];
    let flags = |v: &[(&str, u32)]| -> BTreeMap<String, u32> {
        v.iter().map(|(f, x)| (f.to_string(), *x)).collect()
    };
    // The NodePort opens on this node's address only; with externalTrafficPolicy
    // Cluster it has both endpoints (node-2's source-NATed by the datapath), as the
    // ClusterIP.
    wait_maps(
        &dir,
        "the NodePort on 192.168.50.1 with both endpoints",
        |s| {
            s.frontends
                == fe(&[
                    ("10.96.0.10:80/TCP", both),
                    ("192.168.50.1:30080/TCP", both),
                ])
        },
    )
    .await;
    let snap = snapshot(&dir);
    assert_eq!(
        snap.flags,
        flags(&[
            ("10.96.0.10:80/TCP", 0),
            ("192.168.50.1:30080/TCP", FRONTEND_F_NODEPORT),
        ])
    );
    assert!(snap.backends.contains("10.244.2.2:8080/TCP"));

    // The node's address changes (a watch event on the Node): the NodePort moves.
    api.apply(node_at(NODE, "192.168.50.2"));
    wait_maps(&dir, "the NodePort moved to 192.168.50.2", |s| {
        s.frontends
            == fe(&[
                ("10.96.0.10:80/TCP", both),
                ("192.168.50.2:30080/TCP", both),
            ])
            && s.flags
                == flags(&[
                    ("10.96.0.10:80/TCP", 0),
                    ("192.168.50.2:30080/TCP", FRONTEND_F_NODEPORT),
                ])
    })
    .await;

    // externalTrafficPolicy Local: the NodePort keeps this node's endpoint only, and
    // says so (it drops rather than refuses without one); its inside view (the node's
    // own sockets and its pods') has both.
    api.apply(node_port_web("Local"));
    wait_maps(&dir, "the NodePort with the local endpoint", |s| {
        s.frontends
            == fe(&[
                ("10.96.0.10:80/TCP", both),
                ("192.168.50.2:30080/TCP", local),
                ("192.168.50.2:30080/TCP@inside", both),
            ])
            && s.flags
                == flags(&[
                    ("10.96.0.10:80/TCP", 0),
                    (
                        "192.168.50.2:30080/TCP",
                        FRONTEND_F_NODEPORT | FRONTEND_F_LOCAL,
                    ),
                    ("192.168.50.2:30080/TCP@inside", FRONTEND_F_NODEPORT),
                ])
    })
    .await;

    // The local endpoint moves to the other node: the NodePort has no backend left.
    let mut sl = slice(
        "web-a",
        "web",
        &[("http", 8080, "TCP")],
        &[("10.244.1.2", None), ("10.244.2.2", None)],
    );
    sl["endpoints"][0]["nodeName"] = json!("node-2");
    sl["endpoints"][1]["nodeName"] = json!("node-2");
    api.apply(sl);
    wait_maps(&dir, "no local endpoint", |s| {
        s.frontends
            == fe(&[
                ("10.96.0.10:80/TCP", both),
                ("192.168.50.2:30080/TCP", &[]),
                ("192.168.50.2:30080/TCP@inside", both),
            ])
    })
    .await;

    // Back to ClusterIP: the NodePort frontend goes, the ClusterIP stays.
    api.apply(service("web", WEB, &[("http", 80, "TCP")]));
    wait_maps(&dir, "the NodePort gone", |s| {
        s.frontends == fe(&[("10.96.0.10:80/TCP", both)])
            && s.flags == flags(&[("10.96.0.10:80/TCP", 0)])
    })
    .await;
    api.apply(node_port_web("Cluster"));
    wait_maps(&dir, "the NodePort back", |s| {
        s.frontends.contains_key("192.168.50.2:30080/TCP")
    })
    .await;
    // Deleted: nothing left.
    api.delete("Service", "shop", "web");
    wait_maps(&dir, "empty maps", |s| {
        s.frontends.is_empty() && s.backends.is_empty()
    })
    .await;
    assert_eq!(agent.metrics.map_update_errors.get(), 0);
    agent.stop().await;
}

/// A dual-stack Service (both cluster IPs, an IPv4 and an IPv6 EndpointSlice, a Node
/// with an address of each family): every frontend of each family, served by the
/// endpoints of its own family; then the Service goes single-stack and the IPv6 side
/// leaves the maps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dual_stack_service_is_programmed_on_both_families() {
    let api = FakeApi::start().await;
    let mut n = node(NODE);
    n["status"] = json!({"addresses": [
        {"type": "InternalIP", "address": "192.168.50.1"},
        {"type": "InternalIP", "address": "fd00:50::1"},
    ]});
    api.apply(n);
    let dual = |families: &[&str]| {
        let ips: Vec<&str> = families
            .iter()
            .map(|f| if *f == "IPv4" { WEB } else { "fd00:10:96::a" })
            .collect();
        json!({"kind": "Service", "metadata": {"name": "web", "namespace": "shop"},
               "spec": {"type": "NodePort", "clusterIP": ips[0], "clusterIPs": ips,
                        "ipFamilies": families,
                        "ipFamilyPolicy": if families.len() == 2 { "RequireDualStack" } else { "SingleStack" },
                        "ports": [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080}]}})
    };
    api.apply(dual(&["IPv4", "IPv6"]));
    let slice_of = |name: &str, family: &str, addrs: &[&str]| {
        let eps: Vec<Value> = addrs
            .iter()
            .map(|a| json!({"addresses": [a], "nodeName": NODE}))
            .collect();
        json!({"kind": "EndpointSlice",
               "metadata": {"name": name, "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
               "addressType": family, "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
               "endpoints": eps})
    };
    api.apply(slice_of("web-v4", "IPv4", &["10.244.1.2", "10.244.1.3"]));
    api.apply(slice_of(
        "web-v6",
        "IPv6",
        &["fd00:10:244::2", "fd00:10:244::3"],
    ));
    let agent = Agent::start(&api).await;
    agent.wait_ready().await;
    let dir = agent.dir().to_path_buf();
    let v4: &[&str] = &["10.244.1.2:8080/TCP", "10.244.1.3:8080/TCP"];
    let v6: &[&str] = &["[fd00:10:244::2]:8080/TCP", "[fd00:10:244::3]:8080/TCP"];
    wait_maps(&dir, "both families' frontends", |s| {
        s.frontends
            == fe(&[
                ("10.96.0.10:80/TCP", v4),
                ("192.168.50.1:30080/TCP", v4),
                ("[fd00:10:96::a]:80/TCP", v6),
                ("[fd00:50::1]:30080/TCP", v6),
            ])
    })
    .await;
    // Single stack again: the IPv6 frontends go, and the IPv6 backends with them.
    api.apply(dual(&["IPv4"]));
    wait_maps(&dir, "the IPv4 side only", |s| {
        s.frontends == fe(&[("10.96.0.10:80/TCP", v4), ("192.168.50.1:30080/TCP", v4)])
            && s.backends.iter().all(|b| !b.starts_with('['))
    })
    .await;
    assert_eq!(agent.metrics.map_update_errors.get(), 0);
    agent.stop().await;
}

/// The test API server pages a list as the real one does: each page continues after the
/// last key of the one before, so an object deleted between two pages neither shifts
/// the rest (nothing skipped, nothing repeated) nor comes back. The 100k-Service
/// benchmark lists 200 pages of 500; paging by offset made the test server quadratic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_test_api_server_pages_lists_after_the_last_key() {
    use k8s_openapi::api::core::v1::Service;
    use kube::api::{Api, ListParams};
    let api = FakeApi::start().await;
    for i in 0..7 {
        api.apply(service(
            &format!("s{i}"),
            &format!("10.96.1.{i}"),
            &[("http", 80, "TCP")],
        ));
    }
    let client = kube::Client::try_from(kube::Config::new(api.url().parse().unwrap())).unwrap();
    let services: Api<Service> = Api::all(client);
    let mut names = Vec::new();
    let mut params = ListParams::default().limit(3);
    let mut pages = 0;
    loop {
        let page = services.list(&params).await.expect("list page");
        pages += 1;
        names.extend(page.items.iter().map(|s| s.metadata.name.clone().unwrap()));
        if pages == 1 {
            // s1 was already sent; s4 is on a page not yet sent.
            api.delete("Service", "shop", "s1");
            api.delete("Service", "shop", "s4");
        }
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(c) => params = params.continue_token(&c),
            None => break,
        }
    }
    assert_eq!(names, ["s0", "s1", "s2", "s3", "s5", "s6"]);
    assert_eq!(pages, 2);
}

/// [sig-network] Services should fail health check node port if there are only
/// terminating endpoints: a LoadBalancer Service with externalTrafficPolicy Local and a
/// healthCheckNodePort is answered there as kube-proxy answers (any path): 200 with this
/// node's count of ready endpoints in kube-proxy's JSON body; 503 once its only local
/// endpoint is terminating (serving or not), or when its endpoints are on another node;
/// the port closes when the Service goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_fail_health_check_node_port_if_there_are_only_terminating_endpoints() {
    let api = FakeApi::start().await;
    api.apply(node(NODE));
    let agent = Agent::start(&api).await;
    agent.wait_ready().await;
    let port = free_port();
    let mut svc = service("web", WEB, &[("http", 80, "TCP")]);
    svc["spec"]["type"] = json!("LoadBalancer");
    svc["spec"]["externalTrafficPolicy"] = json!("Local");
    svc["spec"]["healthCheckNodePort"] = json!(port);
    svc["spec"]["ports"][0]["nodePort"] = json!(30080);
    api.apply(svc);
    let web_slice = |eps: Value| {
        let mut sl = slice("web-a", "web", &[("http", 8080, "TCP")], &[]);
        sl["endpoints"] = eps;
        sl
    };
    api.apply(web_slice(json!([
        {"addresses": ["10.244.1.2"], "nodeName": NODE},
        {"addresses": ["10.244.1.3"], "nodeName": NODE, "conditions": {"ready": false}},
        {"addresses": ["10.244.2.2"], "nodeName": "node-2"},
    ])));
    let check = |want: u16, local: u64| async move {
        let body = json!({"service": {"namespace": "shop", "name": "web"},
                          "localEndpoints": local, "serviceProxyHealthy": true});
        wait_until(
            &format!("the health check answers {want} {body}"),
            move || {
                http_get(port, "/healthz").is_some_and(|(code, text)| {
                    code == want && serde_json::from_str::<Value>(&text).ok() == Some(body.clone())
                })
            },
        )
        .await;
    };
    // One ready endpoint here (the not-ready one and node-2's do not count).
    check(200, 1).await;
    let (_, any_path) = http_get(port, "/any/path").unwrap();
    assert!(any_path.contains("\"localEndpoints\":1"), "{any_path}");
    // Its only local endpoint terminating (still serving): 503, as kube-proxy.
    api.apply(web_slice(json!([
        {"addresses": ["10.244.1.2"], "nodeName": NODE,
         "conditions": {"ready": false, "serving": true, "terminating": true}},
        {"addresses": ["10.244.2.2"], "nodeName": "node-2"},
    ])));
    check(503, 0).await;
    // Ready again, then only on another node.
    api.apply(web_slice(
        json!([{"addresses": ["10.244.1.2"], "nodeName": NODE}]),
    ));
    check(200, 1).await;
    api.apply(web_slice(
        json!([{"addresses": ["10.244.2.2"], "nodeName": "node-2"}]),
    ));
    check(503, 0).await;
    // The Service gone: the port closes.
    api.delete("Service", "shop", "web");
    wait_until("the health check port closed", move || {
        http_get(port, "/").is_none()
    })
    .await;
    agent.stop().await;
}

/// A kubeconfig for `api` in a temporary file, removed on drop.
struct Kubeconfig(PathBuf);

impl Kubeconfig {
    fn new(server: &str) -> Self {
        let n = N.fetch_add(1, Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!(
            "lbt-k8s-kubeconfig-{}-{n}.yaml",
            std::process::id()
        ));
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {server}\n\
             contexts:\n- name: c\n  context:\n    cluster: c\n    user: u\n\
             current-context: c\nusers:\n- name: u\n  user: {{}}\n"
        );
        std::fs::write(&path, text).unwrap();
        Self(path)
    }
}

impl Drop for Kubeconfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `http_get` until `cond` holds on (status, body).
async fn wait_answer(
    port: u16,
    path: &str,
    what: &str,
    cond: impl Fn(u16, &str) -> bool,
) -> String {
    let t0 = Instant::now();
    let mut last = None;
    loop {
        if let Some((code, body)) = http_get(port, path) {
            if cond(code, &body) {
                return body;
            }
            last = Some((code, body));
        }
        assert!(
            t0.elapsed() < WAIT,
            "timed out waiting for {path}: {what}; last answer {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// kube-proxy's body: `{"lastUpdated": "..","currentTime": "..", "nodeEligible": b}`.
fn health_body(body: &str) -> Value {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{body:?}: {e}"));
    for key in ["lastUpdated", "currentTime"] {
        let t = v[key].as_str().unwrap_or_else(|| panic!("{key} in {body}"));
        assert!(t.ends_with(" +0000 UTC"), "{key} {t:?}: Go's time format");
    }
    v
}

/// A free loopback port: the test's own `/healthz`.
fn healthz_flags(port: u16) -> [String; 2] {
    ["--healthz-bind-address".into(), format!("127.0.0.1:{port}")]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_binary_answers_kube_proxys_healthz_and_livez() {
    let api = FakeApi::start().await;
    api.apply(node(NODE));
    let pins = Pins::new();
    let kubeconfig = Kubeconfig::new(&api.url());
    let (port, hz) = (free_port(), free_port());
    let flags = healthz_flags(hz);
    let mut extra: Vec<&str> = flags.iter().map(String::as_str).collect();
    // A change that waits a second for a successful sync makes the proxy unhealthy.
    extra.extend(["--healthz-timeout-ms", "1000"]);
    let mut agent = Proc(
        agent_command(Some(&kubeconfig.0), &pins, port, &extra)
            .spawn()
            .expect("starting lb agent"),
    );
    wait_http(port, "/readyz", 200).await;
    let body = wait_http(hz, "/healthz", 200).await;
    assert_eq!(health_body(&body)["nodeEligible"], json!(true), "{body}");
    let body = wait_http(hz, "/livez", 200).await;
    assert!(health_body(&body).get("nodeEligible").is_none(), "{body}");

    // The autoscaler is about to delete this node: /healthz drains it, /livez does not.
    let mut tainted = node(NODE);
    tainted["spec"] = json!({"taints": [
        {"key": "ToBeDeletedByClusterAutoscaler", "value": "1700000000", "effect": "NoSchedule"}
    ]});
    api.apply(tainted);
    let body = wait_answer(hz, "/healthz", "503 for a tainted node", |c, _| c == 503).await;
    assert_eq!(health_body(&body)["nodeEligible"], json!(false), "{body}");
    assert_eq!(http_get(hz, "/livez").unwrap().0, 200);
    api.apply(node(NODE));
    wait_http(hz, "/healthz", 200).await;
    // A node being deleted.
    let mut deleting = node(NODE);
    deleting["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    api.apply(deleting);
    wait_answer(hz, "/healthz", "503 for a node being deleted", |c, _| {
        c == 503
    })
    .await;
    api.apply(node(NODE));
    wait_http(hz, "/healthz", 200).await;

    // More frontends than the map holds (256): every sync fails and retries, the
    // change waits past the timeout, and both endpoints say so.
    for i in 0..300 {
        api.apply(service(
            &format!("s{i}"),
            &format!("10.96.{}.{}", 1 + i / 200, i % 200 + 1),
            &[("http", 80, "TCP")],
        ));
    }
    let body = wait_answer(
        hz,
        "/healthz",
        "503 once syncs fail for a second",
        |c, _| c == 503,
    )
    .await;
    let v = health_body(&body);
    assert_eq!(v["nodeEligible"], json!(true), "{body}");
    assert_ne!(v["lastUpdated"], v["currentTime"], "{body}");
    assert_eq!(http_get(hz, "/livez").unwrap().0, 503);
    for i in 0..300 {
        api.delete("Service", "shop", &format!("s{i}"));
    }
    wait_http(hz, "/healthz", 200).await;
    wait_http(hz, "/livez", 200).await;
    assert!(sigterm_and_wait(&mut agent).success());
}

/// Runs `lb agent` to its exit; returns its status and stderr.
fn agent_exit(mut cmd: Command) -> (std::process::ExitStatus, String) {
    let out = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting lb agent");
    let mut p = Proc(out);
    let t0 = Instant::now();
    let st = loop {
        if let Some(st) = p.0.try_wait().unwrap() {
            break st;
        }
        assert!(t0.elapsed() < WAIT, "lb agent did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    p.0.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    (st, err)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_server_address_is_explicit_without_kube_proxy() {
    let pins = Pins::new();
    // The DaemonSet's placeholder is refused with what to set.
    let mut cmd = agent_command(None, &pins, free_port(), &[]);
    cmd.env("LB_API_SERVER", lb_userspace::k8s::API_SERVER_PLACEHOLDER);
    let (st, err) = agent_exit(cmd);
    assert!(!st.success());
    assert!(
        err.contains("placeholder") && err.contains("LB_API_SERVER"),
        "{err}"
    );
    // In-cluster configuration whose ClusterIP nothing serves: said so, with the fix.
    let closed = free_port();
    let mut cmd = agent_command(None, &pins, free_port(), &[]);
    cmd.env("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        .env("KUBERNETES_SERVICE_PORT", closed.to_string());
    let (st, err) = agent_exit(cmd);
    assert!(!st.success());
    for word in ["127.0.0.1", "ClusterIP", "--api-server", "LB_API_SERVER"] {
        assert!(err.contains(word), "{word} missing from: {err}");
    }
    assert!(
        !pins.0.exists(),
        "nothing is loaded before the API server is known"
    );

    // --api-server replaces the kubeconfig's server (here one where nothing listens).
    let api = FakeApi::start().await;
    api.apply(node(NODE));
    web_seed(&api);
    let dead = Kubeconfig::new(&format!("http://127.0.0.1:{closed}"));
    let port = free_port();
    let url = api.url();
    let mut agent = Proc(
        agent_command(Some(&dead.0), &pins, port, &["--api-server", &url])
            .spawn()
            .unwrap(),
    );
    wait_http(port, "/readyz", 200).await;
    wait_maps(&pins.0, "web from the --api-server", |s| {
        active(s, "10.96.0.10:80/TCP").len() == 2
    })
    .await;
    assert!(sigterm_and_wait(&mut agent).success());
    // LB_API_SERVER alone (outside a pod: no service account, no credentials).
    let port = free_port();
    let mut cmd = agent_command(None, &pins, port, &[]);
    cmd.env("LB_API_SERVER", &url);
    let mut agent = Proc(cmd.spawn().unwrap());
    wait_http(port, "/readyz", 200).await;
    assert!(sigterm_and_wait(&mut agent).success());
    assert!(!pins.0.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lb_show_names_services_and_endpoint_conditions_from_the_agent() {
    let api = FakeApi::start().await;
    api.apply(node(NODE));
    api.apply(service("web", WEB, &[("http", 80, "TCP")]));
    let mut sl = slice(
        "web-a",
        "web",
        &[("http", 8080, "TCP")],
        &[
            ("10.244.1.2", Some(true)),
            ("10.244.1.3", Some(false)),
            ("10.244.1.4", Some(false)),
        ],
    );
    sl["endpoints"][0]["nodeName"] = json!(NODE);
    sl["endpoints"][2]["conditions"] =
        json!({"ready": false, "serving": true, "terminating": true});
    api.apply(sl);
    let pins = Pins::new();
    let kubeconfig = Kubeconfig::new(&api.url());
    let port = free_port();
    let mut agent = Proc(
        agent_command(Some(&kubeconfig.0), &pins, port, &[])
            .spawn()
            .unwrap(),
    );
    wait_http(port, "/readyz", 200).await;
    wait_maps(&pins.0, "web in the maps", |s| {
        active(s, "10.96.0.10:80/TCP").len() == 1
    })
    .await;
    let show = |args: &[&str]| {
        let out = Command::new(lb_testbench::agent::lb_binary().unwrap())
            .arg("show")
            .args(args)
            .arg("--pin-dir")
            .arg(&pins.0)
            .args(["--agent", &format!("127.0.0.1:{port}")])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let text = show(&["services", "-o", "json", "--service", "shop/web"]);
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["agent"], json!(format!("127.0.0.1:{port}")), "{v}");
    let rows = v["services"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{v}");
    assert_eq!(rows[0]["service"], "shop/web:http");
    let b: BTreeMap<String, Value> = rows[0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b["address"].as_str().unwrap().to_string(), b.clone()))
        .collect();
    let ready = &b["10.244.1.2:8080/TCP"];
    assert_eq!(
        (&ready["state"], &ready["ready"], &ready["node"]),
        (&json!("active"), &json!(true), &json!(NODE))
    );
    assert!(ready["id"].as_u64().unwrap() > 0);
    let not_ready = &b["10.244.1.3:8080/TCP"];
    assert_eq!(
        (&not_ready["state"], &not_ready["ready"]),
        (&json!("not ready"), &json!(false))
    );
    let terminating = &b["10.244.1.4:8080/TCP"];
    assert_eq!(
        (
            &terminating["state"],
            &terminating["serving"],
            &terminating["terminating"]
        ),
        (&json!("terminating"), &json!(true), &json!(true))
    );
    // The table says the same.
    let table = show(&["services", "--service", "shop/web:http"]);
    let line = table
        .lines()
        .find(|l| l.starts_with("10.96.0.10:80"))
        .unwrap();
    assert!(line.contains("shop/web:http"), "{line}");
    assert!(line.contains("10.244.1.2:8080/TCP(active,ready)"), "{line}");
    assert!(line.contains("10.244.1.3:8080/TCP(not ready)"), "{line}");
    assert!(
        line.contains("10.244.1.4:8080/TCP(terminating,serving)"),
        "{line}"
    );
    // Without the agent the maps alone: no name, so no frontend matches a name.
    let out = Command::new(lb_testbench::agent::lb_binary().unwrap())
        .args(["show", "services", "-o", "json", "--service", "shop/web"])
        .arg("--pin-dir")
        .arg(&pins.0)
        .args(["--agent", &format!("127.0.0.1:{}", free_port())])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["agent"]
            .as_str()
            .unwrap()
            .starts_with("no agent answered"),
        "{v}"
    );
    assert_eq!(v["services"], json!([]));
    assert!(sigterm_and_wait(&mut agent).success());
}
