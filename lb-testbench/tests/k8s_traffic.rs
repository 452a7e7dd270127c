//! The real `lb agent` binary in a namespace sandbox, fed by the fake API server over the
//! real kube client, with real traffic: what kube-proxy's users do on a node. The fake API
//! server runs inside the node's network namespace (the agent reaches it on 127.0.0.1
//! there, as a hostNetwork pod reaches a local API server). And clusters of two or more
//! nodes (`Sandbox::cluster`), one `lb agent` per node with its own Node object, all
//! against one API server in the outside namespace: the upstream Services cases that
//! need Kubernetes objects changing under a running agent, named after them. Needs root;
//! run one at a time.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use lb_testbench::{
    agent::{agent_log, frontends, lb_binary, spawn_k8s_agent, wait_attached},
    fake_api::{ApiInNetns, FakeApi},
    sandbox::{run_in, Sandbox, NODE_IP},
};
use lb_userspace::dataplane::Maps;
use serde_json::{json, Value};

const NODE: &str = "node-1";

fn service(ip: &str) -> Value {
    json!({"kind": "Service", "metadata": {"name": "web", "namespace": "shop"},
           "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip],
                    "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]}})
}

fn slice(eps: &[(&str, bool)]) -> Value {
    let eps: Vec<Value> = eps
        .iter()
        .map(|(a, ready)| json!({"addresses": [a], "conditions": {"ready": ready}}))
        .collect();
    json!({"kind": "EndpointSlice",
           "metadata": {"name": "web-x1", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
           "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}], "endpoints": eps})
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn ready_count(pin_dir: &Path) -> Option<u32> {
    let st = Maps::from_pins(pin_dir).ok()?.read_state().ok()?;
    Some(st.frontends.values().next()?.count)
}

#[test]
fn the_agent_programs_services_from_the_api_and_traffic_follows() {
    let prefix = format!("lbtk{}", std::process::id() % 100_000);
    let sb = Sandbox::create(&prefix, &["client", "backend-1", "backend-2"]).unwrap();
    for b in ["backend-1", "backend-2"] {
        sb.start_nginx(b, 8080).unwrap();
    }
    let server = ApiInNetns::start(&sb.node, Ipv4Addr::LOCALHOST.into()).unwrap();
    let api = server.api();
    api.apply(json!({"kind": "Node", "metadata": {"name": NODE}}));
    api.apply(service("10.96.0.10"));
    api.apply(slice(&[("10.244.0.12", true), ("10.244.0.13", true)]));

    let kubeconfig = sb.path("kubeconfig.yaml");
    api.write_kubeconfig(&kubeconfig);
    let mut cmd = Command::new(lb_binary().unwrap());
    cmd.args([
        "agent",
        "--cgroup",
        "none",
        "--netns",
        &sb.node,
        "--interfaces",
        "lxc-*",
        "--listen",
        "127.0.0.1:19100",
    ])
    .arg("--kubeconfig")
    .arg(&kubeconfig)
    .arg("--pin-dir")
    .arg(sb.pin_dir())
    .args([
        "--max-frontends",
        "256",
        "--max-backends",
        "1024",
        "--max-slots",
        "1024",
    ])
    .args(["--max-conntrack", "4096", "--poll-ms", "100"])
    .env("NODE_NAME", NODE)
    .env("RUST_LOG", "info");
    sb.spawn(cmd, "agent.log").unwrap();
    wait_until("the agent to program web and attach to the pods", || {
        ready_count(sb.pin_dir()) == Some(2)
            && std::fs::read_dir(sb.pin_dir().join("links"))
                .map(|d| d.count())
                .unwrap_or(0)
                == 3
    });

    let client = sb.pod("client").netns.clone();
    let curl = || sb.http_get(&client, "http://10.96.0.10/");
    let seen: BTreeSet<String> = (0..30)
        .map(|_| curl().unwrap_or_else(|c| panic!("curl exit {c}\n{}", sb.log("agent.log"))))
        .collect();
    assert_eq!(
        seen,
        ["backend-1".to_string(), "backend-2".to_string()].into()
    );

    // backend-1 turns not ready in the API: no new connection reaches it.
    api.apply(slice(&[("10.244.0.12", false), ("10.244.0.13", true)]));
    wait_until("readiness to reach the maps", || {
        ready_count(sb.pin_dir()) == Some(1)
    });
    for _ in 0..15 {
        assert_eq!(curl().as_deref(), Ok("backend-2"));
    }

    // The Service is deleted: its ClusterIP stops answering.
    api.delete("Service", "shop", "web");
    wait_until("the frontend to go", || {
        Maps::from_pins(sb.pin_dir())
            .and_then(|m| m.read_state())
            .map(|s| s.frontends.is_empty())
            .unwrap_or(false)
    });
    assert!(curl().is_err(), "a deleted Service must not answer");
}

// ---------------------------------------------------------------------------------------
// Faults (issue 11) on one node: `lb agent` as node-0 against the test API server on the
// node's loopback, a client and three backends (nginx on 8080 answering its name).

/// web's ClusterIP in the fault tests.
const FAULT_WEB: &str = "10.96.0.10";

struct OneNode {
    /// First, so the API server stops before the sandbox's namespaces go.
    server: ApiInNetns,
    sb: Sandbox,
}

impl OneNode {
    /// The sandbox, the API server holding this node's Node, and the agent, started and
    /// attached.
    fn start() -> Self {
        let sb = Sandbox::create(
            &cluster_prefix(),
            &["client", "backend-1", "backend-2", "backend-3"],
        )
        .unwrap();
        for b in ["backend-1", "backend-2", "backend-3"] {
            sb.start_nginx(b, 8080).unwrap();
        }
        let server = ApiInNetns::start(&sb.node, Ipv4Addr::LOCALHOST.into()).unwrap();
        let c = OneNode { server, sb };
        c.api()
            .apply(json!({"kind": "Node", "metadata": {"name": c.sb.nodes[0].name}}));
        let kubeconfig = c.sb.path("kubeconfig.yaml");
        c.api().write_kubeconfig(&kubeconfig);
        spawn_k8s_agent(&c.sb, 0, &lb_binary().unwrap(), &kubeconfig, &[]).unwrap();
        wait_attached(&c.sb, 0, 4, Duration::from_secs(30)).unwrap();
        c
    }

    fn api(&self) -> &FakeApi {
        self.server.api()
    }

    fn log(&self) -> String {
        self.sb.log(&agent_log(&self.sb, 0))
    }

    fn ip(&self, pod: &str) -> String {
        self.sb.pod(pod).ip.to_string()
    }

    /// Waits (up to `secs`) until the maps satisfy `want`.
    fn wait_maps(
        &self,
        secs: u64,
        what: &str,
        want: impl Fn(&BTreeMap<String, Vec<String>>) -> bool,
    ) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let got = frontends(&self.sb, 0).unwrap_or_default();
            if want(&got) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; the maps hold {got:#?}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The agent's `/metrics`, from inside the node's namespace.
    fn metrics(&self) -> String {
        self.sb
            .http_get(&self.sb.node, "http://127.0.0.1:19100/metrics")
            .unwrap_or_else(|c| panic!("/metrics: curl exit {c}\n{}", self.log()))
    }

    /// A datapath counter, from the pinned maps.
    fn counter(&self, name: &str) -> u64 {
        Maps::from_pins(self.sb.pin_dir())
            .unwrap()
            .counters()
            .unwrap()
            .into_iter()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("no counter {name}"))
            .1
    }

    /// The forward conntrack entries of the flows to `ip:port`: client port -> (backend
    /// id, creation time). A table flushed or rewritten behind the flows gives new ones.
    fn flows_to(&self, ip: &str, port: u16) -> BTreeMap<u16, (u32, u64)> {
        let dst = lb_userspace::dataplane::plan::map_addr(&ip.parse().unwrap());
        Maps::from_pins(self.sb.pin_dir())
            .unwrap()
            .conntrack_entries()
            .unwrap()
            .into_iter()
            .filter(|(k, v)| {
                v.dir == lb_common::CT_DIR_FORWARD
                    && k.dst_addr == dst
                    && k.dst_port == port.to_be()
            })
            .map(|(k, v)| (u16::from_be(k.src_port), (v.backend_id, v.created_ns)))
            .collect()
    }
}

/// The sum of a labelled counter family in a Prometheus text exposition.
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Issue 11's fault: the API server gone for minutes (here 75 s, 37 times the watches'
/// longest backoff of 2 s: every watch fails and retries dozens of times). Traffic
/// through the ClusterIP keeps flowing the whole time (a new connection every 200 ms,
/// none may fail); the cluster changes unseen (an endpoint added to web, the Service old
/// deleted) and the maps keep the last state meanwhile; the agent warns that it keeps
/// its last state and counts `lb_watch_errors_total`. When the API server returns (its
/// watch history compacted meanwhile, as etcd's would be after minutes) the agent
/// reconciles within seconds: old's frontend goes, web gets its third backend.
#[test]
fn the_api_server_gone_for_minutes_keeps_traffic_flowing_and_the_agent_reconciles_when_it_returns()
{
    const OUTAGE: Duration = Duration::from_secs(75);
    let c = OneNode::start();
    let (b1, b2, b3) = (c.ip("backend-1"), c.ip("backend-2"), c.ip("backend-3"));
    let ep = |ip: &str| json!({"addresses": [ip], "conditions": conditions(READY)});
    let http = json!([{"name": "http", "port": 8080, "protocol": "TCP"}]);
    c.api().apply(service(FAULT_WEB));
    c.api().apply(k8s_slice(
        "web-x1",
        "web",
        http.clone(),
        vec![ep(&b1), ep(&b2)],
    ));
    c.api().apply(k8s_service(
        "old",
        json!({"clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20"],
               "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}),
    ));
    c.api()
        .apply(k8s_slice("old-x1", "old", http.clone(), vec![ep(&b1)]));
    let web_fe = format!("{FAULT_WEB}:80/TCP");
    let old_fe = "10.96.0.20:80/TCP".to_string();
    let backend = |ip: &str| format!("{ip}:8080/TCP");
    let before: BTreeMap<String, Vec<String>> = [
        (web_fe.clone(), vec![backend(&b1), backend(&b2)]),
        (old_fe.clone(), vec![backend(&b1)]),
    ]
    .into();
    c.wait_maps(15, "web and old", |m| *m == before);
    let errors_before = metric_sum(&c.metrics(), "lb_watch_errors_total");
    const WARNING: &str = "retrying, the dataplane keeps its last state";
    assert!(!c.log().contains(WARNING), "{}", c.log());

    let client = c.sb.pod("client").netns.clone();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (answers, failures) = std::thread::scope(|s| {
        let traffic = s.spawn(|| {
            let (mut answers, mut failures) = (BTreeMap::<String, usize>::new(), Vec::new());
            let start = Instant::now();
            // Once told to stop, on until the third backend answered (at most 100 more).
            let mut after_stop = 0;
            while after_stop < 100 && !answers.contains_key("backend-3") {
                match c.sb.http_get(&client, &format!("http://{FAULT_WEB}/")) {
                    Ok(who) => *answers.entry(who).or_default() += 1,
                    Err(code) => failures.push((start.elapsed(), code)),
                }
                if stop.load(std::sync::atomic::Ordering::SeqCst) {
                    after_stop += 1;
                } else {
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
            (answers, failures)
        });
        let gone = Instant::now();
        c.server.api().stop();
        // The cluster changes while the agent cannot see it.
        c.api().apply(k8s_slice(
            "web-x1",
            "web",
            http.clone(),
            vec![ep(&b1), ep(&b2), ep(&b3)],
        ));
        c.api().delete("Service", "shop", "old");
        c.api().delete("EndpointSlice", "shop", "old-x1");
        while gone.elapsed() < OUTAGE {
            std::thread::sleep(Duration::from_secs(5));
            let now = frontends(&c.sb, 0).unwrap_or_default();
            assert_eq!(
                now,
                before,
                "{:?} into the outage the maps must keep the last known state\n{}",
                gone.elapsed(),
                c.log()
            );
        }
        let errors = metric_sum(&c.metrics(), "lb_watch_errors_total");
        eprintln!(
            "{OUTAGE:?} without the API server: {} watch errors counted, {} warnings logged",
            errors - errors_before,
            c.log().matches(WARNING).count()
        );
        assert!(
            errors >= errors_before + 20.0,
            "the watches' errors are counted while the API server is gone: {errors_before} \
             before, {errors} after {OUTAGE:?}"
        );
        assert!(
            c.log().contains(WARNING),
            "a warning while the API server is gone\n{}",
            c.log()
        );

        // Back, with the history of the changes made meanwhile compacted away.
        c.api().compact();
        let back = Instant::now();
        c.server.restart();
        let mut after = before.clone();
        after.remove(&old_fe);
        after.insert(
            web_fe.clone(),
            vec![backend(&b1), backend(&b2), backend(&b3)],
        );
        c.wait_maps(15, "the state after the outage", |m| *m == after);
        let took = back.elapsed();
        assert!(
            took < Duration::from_secs(10),
            "reconciled {took:?} after the API server's return"
        );
        eprintln!("reconciled {took:?} after the API server's return");
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        traffic.join().unwrap()
    });
    let total: usize = answers.values().sum();
    assert!(
        failures.is_empty(),
        "every request through the ClusterIP is answered, during the outage too; failed \
         (time, curl exit): {failures:?} of {}",
        total + failures.len()
    );
    assert!(total >= 300, "{answers:?}");
    assert!(
        answers.contains_key("backend-3"),
        "the endpoint added during the outage takes traffic once it is back: {answers:?}"
    );
    eprintln!("answers during and after the outage: {answers:?}");
    assert!(
        c.sb.http_get(&client, "http://10.96.0.20/").is_err(),
        "old was deleted during the outage: its ClusterIP no longer answers"
    );
}

/// Issue 11's fault: a burst of 1,000 endpoint changes (endpoints added to and removed
/// from web, a non-surviving endpoint's readiness flipped, its survivors' own slice
/// re-applied) while long-lived connections to the two surviving backends carry
/// requests: every one of them is answered by its own backend all along, none is reset,
/// and their conntrack entries are the ones made before the burst (none recreated, no
/// backend reselected). The agent ends on the burst's last state (backend-3 ready
/// beside the survivors) within seconds.
#[test]
fn a_burst_of_a_thousand_endpoint_changes_keeps_every_established_flow_to_a_surviving_backend() {
    const CHANGES: usize = 1000;
    const CONNECTIONS: usize = 16;
    let c = OneNode::start();
    let (b1, b2, b3) = (c.ip("backend-1"), c.ip("backend-2"), c.ip("backend-3"));
    let ep = |ip: &str, ready: bool| json!({"addresses": [ip], "conditions": conditions(if ready { READY } else { NOT_READY })});
    let http = json!([{"name": "http", "port": 8080, "protocol": "TCP"}]);
    let survivors = |extra: Option<bool>| {
        let mut eps = vec![ep(&b1, true), ep(&b2, true)];
        if let Some(ready) = extra {
            eps.push(ep("10.244.0.200", ready));
        }
        k8s_slice("web-x1", "web", http.clone(), eps)
    };
    c.api().apply(service(FAULT_WEB));
    c.api().apply(survivors(None));
    let web_fe = format!("{FAULT_WEB}:80/TCP");
    let backend = |ip: &str| format!("{ip}:8080/TCP");
    let mut two = vec![backend(&b1), backend(&b2)];
    two.sort();
    c.wait_maps(15, "web's two backends", |m| m.get(&web_fe) == Some(&two));
    let mut three = vec![backend(&b1), backend(&b2), backend(&b3)];
    three.sort();

    let web: std::net::SocketAddr = format!("{FAULT_WEB}:80").parse().unwrap();
    let mut conns = run_in(&c.sb.pod("client").netns, move || {
        (0..CONNECTIONS)
            .map(|_| {
                let s = std::net::TcpStream::connect_timeout(&web, Duration::from_secs(3)).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                s
            })
            .collect::<Vec<_>>()
    })
    .unwrap();
    let owners: Vec<String> = conns.iter_mut().map(keepalive_get).collect();
    assert!(
        owners.iter().any(|o| o == "backend-1") && owners.iter().any(|o| o == "backend-2"),
        "the connections spread over both survivors: {owners:?}"
    );
    let ports: BTreeSet<u16> = conns
        .iter()
        .map(|s| s.local_addr().unwrap().port())
        .collect();
    let flows = c.flows_to(FAULT_WEB, 80);
    assert!(ports.iter().all(|p| flows.contains_key(p)), "{flows:?}");
    let (recreated, reselected) = (c.counter("ct_recreated"), c.counter("backend_reselected"));
    let metrics = c.metrics();
    let (syncs, ops) = (
        metric_sum(&metrics, "lb_syncs_total"),
        metric_sum(&metrics, "lb_map_operations_total"),
    );

    let stop = std::sync::atomic::AtomicBool::new(false);
    let started = Instant::now();
    let rounds = std::thread::scope(|s| {
        // Requests on every connection all through the burst, paced (nginx closes a
        // kept-alive connection after 1,000 requests).
        let traffic = s.spawn(|| {
            let mut rounds = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) && rounds < 900 {
                for (s, owner) in conns.iter_mut().zip(&owners) {
                    assert_eq!(&keepalive_get(s), owner, "a flow moved off its backend");
                }
                rounds += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            rounds
        });
        for i in 0..CHANGES - 2 {
            if i % 5 == 0 {
                // The survivors' own slice, re-applied with a third endpoint flipping.
                c.api().apply(survivors(Some(i % 10 == 0)));
            } else {
                // Another slice of web: a changing set of endpoints that come and go,
                // and backend-3 flipping between ready and not.
                let mut eps = vec![ep(&b3, i % 2 == 0)];
                eps.extend(
                    (0..i % 23).map(|j| ep(&format!("10.244.1.{}", (i + j) % 250 + 1), j % 3 != 0)),
                );
                c.api().apply(k8s_slice("web-x2", "web", http.clone(), eps));
            }
            // Over about two seconds, as a rollout's changes reach an agent: the agent
            // writes many of the states between (a burst sent at once is mostly
            // coalesced into a few syncs).
            std::thread::sleep(Duration::from_millis(2));
        }
        // The last two: web's survivors alone in their slice, backend-3 ready.
        c.api().apply(survivors(None));
        c.api().apply(k8s_slice(
            "web-x2",
            "web",
            http.clone(),
            vec![ep(&b3, true)],
        ));
        eprintln!("{CHANGES} changes applied in {:?}", started.elapsed());
        // Then a marker on both watches: once the maps have it, the agent has applied
        // every change before it (each watch delivers in order, the writer applies in
        // order).
        c.api().apply(k8s_service(
            "marker",
            json!({"clusterIP": MARKER, "clusterIPs": [MARKER],
                   "ports": [{"name": "m", "port": 1000, "protocol": "TCP"}]}),
        ));
        c.api().apply(k8s_slice(
            "marker-x1",
            "marker",
            json!([{"name": "m", "port": 9, "protocol": "TCP"}]),
            vec![ep("10.244.250.1", true)],
        ));
        let marker = (
            format!("{MARKER}:1000/TCP"),
            vec!["10.244.250.1:9/TCP".to_string()],
        );
        c.wait_maps(30, "the burst's last state", |m| {
            m.get(&web_fe) == Some(&three) && m.get(&marker.0) == Some(&marker.1)
        });
        let settled = started.elapsed();
        // A little longer, for anything the writer might still do.
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        eprintln!("the maps held the last state {settled:?} after the burst began");
        traffic.join().unwrap()
    });
    assert!(rounds >= 1, "requests ran during the burst");
    let metrics = c.metrics();
    let (syncs, ops) = (
        metric_sum(&metrics, "lb_syncs_total") - syncs,
        metric_sum(&metrics, "lb_map_operations_total") - ops,
    );
    eprintln!("the burst took {syncs} syncs and {ops} map operations");
    assert!(
        syncs >= 50.0 && ops >= 500.0,
        "the burst's states reached the maps: {syncs} syncs, {ops} map operations"
    );
    eprintln!("{rounds} rounds of requests on {CONNECTIONS} connections during the burst");
    for (s, owner) in conns.iter_mut().zip(&owners) {
        assert_eq!(&keepalive_get(s), owner, "after the burst");
    }
    let after = c.flows_to(FAULT_WEB, 80);
    for p in &ports {
        assert_eq!(
            after.get(p),
            flows.get(p),
            "the conntrack entry of client port {p}"
        );
    }
    assert_eq!(
        c.counter("ct_recreated"),
        recreated,
        "no flow lost its entry"
    );
    assert_eq!(
        c.counter("backend_reselected"),
        reselected,
        "no flow was moved"
    );
    for _ in 0..10 {
        let who =
            c.sb.http_get(&c.sb.pod("client").netns, &format!("http://{FAULT_WEB}/"));
        assert!(
            who.as_deref().is_ok_and(|w| w.starts_with("backend-")),
            "{who:?}"
        );
    }
}

/// One HTTP/1.1 request on a kept-alive connection to nginx; the pod's name it answers.
fn keepalive_get(s: &mut std::net::TcpStream) -> String {
    use std::io::{Read, Write};
    s.write_all(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
        .expect("a request on the kept-alive connection");
    let mut buf = [0u8; 4096];
    let mut got = Vec::new();
    loop {
        let text = String::from_utf8_lossy(&got);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            if head.starts_with("HTTP/1.1 200") && body.ends_with('\n') {
                return body.trim().to_string();
            }
        }
        let n = s
            .read(&mut buf)
            .expect("the response on the kept-alive connection");
        assert!(n > 0, "the connection was closed");
        got.extend_from_slice(&buf[..n]);
    }
}

// ---------------------------------------------------------------------------------------
// A cluster of two (or more) nodes, one `lb agent` per node against one test API server.

/// The Service every cluster test uses unless it says otherwise: web, a NodePort Service
/// (80 -> 8080/TCP "http", NodePort 30080; 53 -> 5353/UDP "dns", NodePort 30053).
const WEB: &str = "10.96.0.10";
const NODE_PORT_HTTP: u16 = 30080;
const NODE_PORT_DNS: u16 = 30053;
/// Node 0 runs a client and a backend, node 1 two backends and a client (as
/// `tests/cluster.rs`). Every `backend-*` pod runs nginx (8080) and a UDP responder
/// (5353), both answering with the pod's name.
const NODE_0: &[&str] = &["client-0", "backend-0"];
const NODE_1: &[&str] = &["backend-1a", "backend-1b", "client-1"];
/// Where a request comes from when it is not a pod: the client outside the cluster.
const OUTSIDE: &str = "outside";
/// EndpointSlice conditions as the EndpointSlice controller writes them.
const READY: &str = "ready";
/// A pod being deleted that still serves (its grace period).
const TERMINATING: &str = "terminating";
/// A pod being deleted of a Service with publishNotReadyAddresses: the controller
/// publishes it as ready, not serving, terminating.
const PUBLISHED_TERMINATING: &str = "published-terminating";
/// A pod that is not ready (its readiness probe fails).
const NOT_READY: &str = "not-ready";
/// A pod being deleted that no longer serves.
const GONE: &str = "gone";

static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn cluster_prefix() -> String {
    format!(
        "lbt{}q{}",
        std::process::id() % 100_000,
        N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    )
}

fn conditions(state: &str) -> Value {
    match state {
        READY => json!({"ready": true, "serving": true, "terminating": false}),
        TERMINATING => json!({"ready": false, "serving": true, "terminating": true}),
        PUBLISHED_TERMINATING => json!({"ready": true, "serving": false, "terminating": true}),
        NOT_READY => json!({"ready": false, "serving": false, "terminating": false}),
        GONE => json!({"ready": false, "serving": false, "terminating": true}),
        other => panic!("no endpoint state {other:?}"),
    }
}

/// A Service in namespace shop.
fn k8s_service(name: &str, spec: Value) -> Value {
    json!({"kind": "Service", "metadata": {"name": name, "namespace": "shop"}, "spec": spec})
}

/// web's spec, with `extra`'s fields set over it.
fn web_spec(extra: Value) -> Value {
    let mut spec = json!({
    "type": "NodePort", "clusterIP": WEB, "clusterIPs": [WEB],
    "ports": [
        {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP", "nodePort": NODE_PORT_HTTP},
        {"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP", "nodePort": NODE_PORT_DNS},
    ]});
    for (k, v) in extra.as_object().expect("an object of spec fields") {
        spec[k] = v.clone();
    }
    spec
}

/// web's slice ports: http 8080/TCP, dns 5353/UDP.
fn web_ports() -> Value {
    json!([{"name": "http", "port": 8080, "protocol": "TCP"},
           {"name": "dns", "port": 5353, "protocol": "UDP"}])
}

/// An IPv4 EndpointSlice of Service `svc` in namespace shop.
fn k8s_slice(name: &str, svc: &str, ports: Value, endpoints: Vec<Value>) -> Value {
    json!({"kind": "EndpointSlice",
           "metadata": {"name": name, "namespace": "shop", "labels": {"kubernetes.io/service-name": svc}},
           "addressType": "IPv4", "ports": ports, "endpoints": endpoints})
}

/// The cluster IP of the marker Service `K8sCluster::settle` uses (hidden from
/// `K8sCluster::wait_maps`).
const MARKER: &str = "10.96.0.250";

struct K8sCluster {
    /// First, so the API server stops before the sandbox's namespaces go.
    server: ApiInNetns,
    sb: Sandbox,
    /// How many times `settle` ran.
    settled: std::sync::atomic::AtomicU16,
}

impl K8sCluster {
    /// Two nodes (`NODE_0`, `NODE_1`) without zones.
    fn new() -> Self {
        Self::with_nodes(&[(NODE_0, None), (NODE_1, None)])
    }

    /// Nodes with their pods and zones (`topology.kubernetes.io/zone`); the servers in
    /// every `backend-*` pod; the test API server in the outside namespace on its
    /// underlay address (every node reaches it over the underlay, as a control plane
    /// on the nodes' network), holding a Node object per node (its name, its InternalIPs
    /// of both families, its zone label); and one `lb agent` per node as that node
    /// (`--node-name`), each attached to its pods and its `eth0`.
    fn with_nodes(nodes: &[(&[&str], Option<&str>)]) -> Self {
        let pods: Vec<&[&str]> = nodes.iter().map(|(p, _)| *p).collect();
        let sb = Sandbox::cluster(&cluster_prefix(), &pods).unwrap();
        for p in sb.pods.clone() {
            if p.name.starts_with("backend") {
                sb.start_nginx(&p.name, 8080).unwrap();
                sb.start_udp_echo(&p.name, 5353).unwrap();
            }
        }
        let api_ip: std::net::IpAddr = lb_testbench::sandbox::OUTSIDE_IP.parse().unwrap();
        let server = ApiInNetns::start(&sb.outside, api_ip).unwrap();
        let c = K8sCluster {
            server,
            sb,
            settled: Default::default(),
        };
        for (k, (_, zone)) in nodes.iter().enumerate() {
            c.api().apply(c.node_object(k, *zone));
        }
        let kubeconfig = c.sb.path("kubeconfig.yaml");
        c.api().write_kubeconfig(&kubeconfig);
        let lb = lb_binary().unwrap();
        for k in 0..nodes.len() {
            spawn_k8s_agent(&c.sb, k, &lb, &kubeconfig, &[]).unwrap();
        }
        for k in 0..nodes.len() {
            let links = c.sb.pods.iter().filter(|p| p.node == k).count();
            wait_attached(&c.sb, k, links, Duration::from_secs(30)).unwrap();
        }
        c
    }

    fn api(&self) -> &FakeApi {
        self.server.api()
    }

    /// Node `k` as the API server lists it.
    fn node_object(&self, k: usize, zone: Option<&str>) -> Value {
        let n = &self.sb.nodes[k];
        let mut obj = json!({"kind": "Node", "metadata": {"name": n.name},
        "status": {"addresses": [
            {"type": "Hostname", "address": n.name},
            {"type": "InternalIP", "address": n.ip.to_string()},
            {"type": "InternalIP", "address": n.ip6.to_string()},
        ]}});
        if let Some(z) = zone {
            obj["metadata"]["labels"] = json!({"topology.kubernetes.io/zone": z});
        }
        obj
    }

    /// The endpoint of pod `pod` (its IPv4 address and node) in state `state`.
    fn ep(&self, pod: &str, state: &str) -> Value {
        let p = self.sb.pod(pod);
        json!({"addresses": [p.ip.to_string()], "nodeName": self.sb.nodes[p.node].name,
               "conditions": conditions(state)})
    }

    /// A slice `name` of Service `svc` with `ports` and the given endpoints (pod, state).
    fn slice(&self, name: &str, svc: &str, ports: Value, eps: &[(&str, &str)]) -> Value {
        k8s_slice(
            name,
            svc,
            ports,
            eps.iter().map(|(p, s)| self.ep(p, s)).collect(),
        )
    }

    /// web's slice with the given endpoints (pod, state).
    fn web_slice(&self, eps: &[(&str, &str)]) -> Value {
        k8s_slice(
            "web-abc",
            "web",
            web_ports(),
            eps.iter().map(|(p, s)| self.ep(p, s)).collect(),
        )
    }

    /// `ip:port/TCP` of pod `pod` at `port`, as the maps show a backend.
    fn backend(&self, pod: &str, port: u16) -> String {
        format!("{}:{port}/TCP", self.sb.pod(pod).ip)
    }

    /// Node `k`'s NodePort frontend (its IPv4 address) of `port`/TCP.
    fn node_port(&self, k: usize, port: u16) -> String {
        format!("{}:{port}/TCP", self.sb.nodes[k].ip)
    }

    /// Every agent's log, for failure messages.
    fn logs(&self) -> String {
        (0..self.sb.nodes.len())
            .map(|k| {
                let name = agent_log(&self.sb, k);
                format!("--- {name}\n{}", self.sb.log(&name))
            })
            .collect()
    }

    /// Waits until every agent has applied every Service and EndpointSlice change made
    /// so far, for a change that leaves the maps as they were: a marker Service and its
    /// slice, changed after them on the same watches (each watch delivers in order, and
    /// the writer applies in order), until every node's maps show the marker's change.
    fn settle(&self) {
        let n = self
            .settled
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1;
        let port = 1000 + n;
        self.api().apply(k8s_service(
            "marker",
            json!({"clusterIP": MARKER, "clusterIPs": [MARKER],
                   "ports": [{"name": "m", "port": port, "protocol": "TCP"}]}),
        ));
        let ep = format!("10.244.250.{}", n % 250 + 1);
        self.api().apply(k8s_slice(
            "marker-abc",
            "marker",
            json!([{"name": "m", "port": 9, "protocol": "TCP"}]),
            vec![json!({"addresses": [ep], "conditions": conditions(READY)})],
        ));
        let (fe, backend) = (format!("{MARKER}:{port}/TCP"), vec![format!("{ep}:9/TCP")]);
        for k in 0..self.sb.nodes.len() {
            let deadline = Instant::now() + Duration::from_secs(15);
            while frontends(&self.sb, k).unwrap_or_default().get(&fe) != Some(&backend) {
                assert!(
                    Instant::now() < deadline,
                    "node {k} did not apply the marker {fe} -> {backend:?}\n{}",
                    self.logs()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Waits until node `k`'s maps satisfy `want` (frontend -> its backends, as
    /// [`frontends`] gives them; `settle`'s marker left out).
    fn wait_maps(
        &self,
        k: usize,
        what: &str,
        want: impl Fn(&BTreeMap<String, Vec<String>>) -> bool,
    ) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let mut got = frontends(&self.sb, k).unwrap_or_default();
            got.retain(|fe, _| !fe.starts_with(MARKER));
            if want(&got) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {k}: timed out waiting for {what}; its maps hold {got:#?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until frontend `fe` of node `k` has exactly `backends` (pods at `port`).
    fn wait_backends(&self, k: usize, fe: &str, port: u16, pods: &[&str]) {
        let mut want: Vec<String> = pods.iter().map(|p| self.backend(p, port)).collect();
        want.sort();
        self.wait_maps(k, &format!("{fe} -> {pods:?}"), |m| {
            m.get(fe) == Some(&want)
        });
    }

    /// Waits until every node's frontend `fe` has exactly `pods` (at `port`).
    fn wait_everywhere(&self, fe: &str, port: u16, pods: &[&str]) {
        for k in 0..self.sb.nodes.len() {
            self.wait_backends(k, fe, port, pods);
        }
    }

    /// Waits until no node has the frontend `fe`.
    fn wait_gone(&self, fe: &str) {
        for k in 0..self.sb.nodes.len() {
            self.wait_maps(k, &format!("{fe} gone"), |m| !m.contains_key(fe));
        }
    }

    fn netns(&self, from: &str) -> String {
        if from == OUTSIDE {
            return self.sb.outside.clone();
        }
        self.sb.pod(from).netns.clone()
    }

    /// HTTP from `from` (a pod or `OUTSIDE`) to `to` ("ip:port"), `n` new connections:
    /// the names of who answered.
    fn http(&self, from: &str, to: &str, n: usize) -> BTreeSet<String> {
        let url = format!("http://{to}/");
        self.sb
            .who_answers_http(&self.netns(from), &url, n)
            .unwrap_or_else(|code| panic!("{from}: curl {url}: exit {code}\n{}", self.logs()))
            .into_keys()
            .collect()
    }

    /// One HTTP request's failure: curl's exit code (7 refused, 28 timed out); panics if
    /// it is answered.
    fn http_fails(&self, from: &str, to: &str) -> i32 {
        let url = format!("http://{to}/");
        match self.sb.http_get(&self.netns(from), &url) {
            Ok(who) => panic!("{from}: {url} answered by {who}, expected no answer"),
            Err(code) => code,
        }
    }

    /// One UDP datagram from `from` to `to` ("ip:port") that gets no answer (refused, or
    /// none in 3 s); panics if it is answered.
    fn udp_fails(&self, from: &str, to: &str) {
        let answers = self
            .sb
            .udp_ask(&self.netns(from), to.parse().unwrap(), 1)
            .unwrap();
        if let Some(Ok((src, who))) = answers.first() {
            panic!("{from}: UDP to {to} answered by {who} from {src}, expected no answer");
        }
    }

    /// UDP from `from` to `to` ("ip:port"), `n` datagrams from new sockets: the names
    /// of who answered (every answer from `to` itself).
    fn udp(&self, from: &str, to: &str, n: usize) -> BTreeSet<String> {
        self.sb
            .who_answers_udp(&self.netns(from), to.parse().unwrap(), n)
            .unwrap_or_else(|e| panic!("{from}: {e}\n{}", self.logs()))
            .into_keys()
            .collect()
    }
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| n.to_string()).collect()
}

/// `ip:port` of a frontend string (`ip:port/PROTO`).
fn addr(fe: &str) -> &str {
    fe.split('/').next().unwrap()
}

/// One agent per node, each with its own Node object, against one API server: a
/// Service with endpoints on both nodes, its traffic policies changed on the live
/// Service, followed by both agents, each as its own node must see it (its maps and the
/// traffic through it): externalTrafficPolicy Local narrows each node's NodePort to its
/// own endpoint (node 1's to node 1's), internalTrafficPolicy Local each node's cluster
/// IP; with no endpoint left on node 0, its cluster IP refuses and its NodePort drops,
/// while node 1's keep serving; Cluster again sends node 0's traffic to node 1.
#[test]
fn both_agents_follow_traffic_policy_changes_each_as_its_own_node() {
    let c = K8sCluster::new();
    let cip = format!("{WEB}:80/TCP");
    let (np0, np1) = (
        c.node_port(0, NODE_PORT_HTTP),
        c.node_port(1, NODE_PORT_HTTP),
    );
    let web = |etp: &str, itp: &str| {
        k8s_service(
            "web",
            web_spec(json!({"externalTrafficPolicy": etp, "internalTrafficPolicy": itp})),
        )
    };
    c.api().apply(web("Cluster", "Cluster"));
    c.api()
        .apply(c.web_slice(&[("backend-0", READY), ("backend-1a", READY)]));
    let both = ["backend-0", "backend-1a"];
    for (k, np) in [(0, &np0), (1, &np1)] {
        c.wait_backends(k, &cip, 8080, &both);
        c.wait_backends(k, np, 8080, &both);
    }
    assert_eq!(c.http(OUTSIDE, addr(&np0), 20), set(&both));
    assert_eq!(c.http(OUTSIDE, addr(&np1), 20), set(&both));
    assert_eq!(c.http("client-0", addr(&cip), 20), set(&both));
    assert_eq!(c.http("client-1", addr(&cip), 20), set(&both));
    assert_eq!(c.udp("client-1", &format!("{WEB}:53"), 20), set(&both));
    let dns1 = format!("{}:{NODE_PORT_DNS}", c.sb.nodes[1].ip);
    assert_eq!(c.udp(OUTSIDE, &dns1, 20), set(&both));

    // externalTrafficPolicy Local: each node's NodePort, its own endpoint.
    c.api().apply(web("Local", "Cluster"));
    c.wait_backends(0, &np0, 8080, &["backend-0"]);
    c.wait_backends(1, &np1, 8080, &["backend-1a"]);
    for k in 0..2 {
        c.wait_backends(k, &cip, 8080, &both);
    }
    assert_eq!(c.http(OUTSIDE, addr(&np0), 10), set(&["backend-0"]));
    assert_eq!(c.http(OUTSIDE, addr(&np1), 10), set(&["backend-1a"]));
    assert_eq!(c.udp(OUTSIDE, &dns1, 10), set(&["backend-1a"]));
    assert_eq!(c.http("client-1", addr(&cip), 20), set(&both));

    // internalTrafficPolicy Local too: each node's cluster IP, its own endpoint.
    c.api().apply(web("Local", "Local"));
    c.wait_backends(0, &cip, 8080, &["backend-0"]);
    c.wait_backends(1, &cip, 8080, &["backend-1a"]);
    assert_eq!(c.http("client-0", addr(&cip), 10), set(&["backend-0"]));
    assert_eq!(c.http("client-1", addr(&cip), 10), set(&["backend-1a"]));

    // Node 0's endpoint goes: node 0 has none left, node 1 keeps its own.
    c.api().apply(c.web_slice(&[("backend-1a", READY)]));
    c.wait_backends(0, &cip, 8080, &[]);
    c.wait_backends(0, &np0, 8080, &[]);
    c.wait_backends(1, &cip, 8080, &["backend-1a"]);
    assert_eq!(c.http_fails("client-0", addr(&cip)), 7, "refused");
    assert_eq!(c.http_fails(OUTSIDE, addr(&np0)), 28, "dropped");
    assert_eq!(c.http("client-1", addr(&cip), 5), set(&["backend-1a"]));
    assert_eq!(c.http(OUTSIDE, addr(&np1), 5), set(&["backend-1a"]));

    // Cluster again: node 0 sends its traffic to node 1's endpoint (from outside,
    // source-NATed to node 0).
    c.api().apply(web("Cluster", "Cluster"));
    c.wait_backends(0, &cip, 8080, &["backend-1a"]);
    c.wait_backends(0, &np0, 8080, &["backend-1a"]);
    assert_eq!(c.http("client-0", addr(&cip), 5), set(&["backend-1a"]));
    assert_eq!(c.http(OUTSIDE, addr(&np0), 5), set(&["backend-1a"]));
}

/// Topology (kube-proxy's `pkg/proxy/topology.go`): three nodes in two zones, node 0
/// (a client, no backend) and node 1 (a backend) in zone-a, node 2 (a backend and a
/// client) in zone-b; web has `trafficDistribution: PreferClose`, its slice the hints
/// the EndpointSlice controller writes for it (each endpoint for its own zone). A pod on
/// node 0 reaches only node 1's backend, the zone's, though node 2's is as remote; node
/// 2's client its own zone's; from outside, node 0's NodePort (externalTrafficPolicy
/// Cluster) zone-a's. An endpoint without hints, and then node 0 without a zone label
/// or in a zone nobody is hinted for, turn hints off: every endpoint again.
#[test]
fn endpoints_hinted_for_the_nodes_zone_take_its_cluster_wide_traffic() {
    let c = K8sCluster::with_nodes(&[
        (&["client-0"], Some("zone-a")),
        (&["backend-1"], Some("zone-a")),
        (&["backend-2", "client-2"], Some("zone-b")),
    ]);
    let hinted = |pod: &str, zone: Option<&str>| {
        let mut ep = c.ep(pod, READY);
        if let Some(z) = zone {
            ep["zone"] = json!(z);
            ep["hints"] = json!({"forZones": [{"name": z}]});
        }
        ep
    };
    let slice = |eps: Vec<Value>| k8s_slice("web-abc", "web", web_ports(), eps);
    c.api().apply(k8s_service(
        "web",
        web_spec(json!({"trafficDistribution": "PreferClose"})),
    ));
    c.api().apply(slice(vec![
        hinted("backend-1", Some("zone-a")),
        hinted("backend-2", Some("zone-b")),
    ]));
    let cip = format!("{WEB}:80/TCP");
    let np0 = c.node_port(0, NODE_PORT_HTTP);
    c.wait_backends(0, &cip, 8080, &["backend-1"]);
    c.wait_backends(0, &np0, 8080, &["backend-1"]);
    c.wait_backends(1, &cip, 8080, &["backend-1"]);
    c.wait_backends(2, &cip, 8080, &["backend-2"]);
    assert_eq!(c.http("client-0", addr(&cip), 20), set(&["backend-1"]));
    assert_eq!(c.http("client-2", addr(&cip), 20), set(&["backend-2"]));
    assert_eq!(c.http(OUTSIDE, addr(&np0), 20), set(&["backend-1"]));
    let both = ["backend-1", "backend-2"];

    // An endpoint without hints: hints are not used, on every node.
    c.api().apply(slice(vec![
        hinted("backend-1", Some("zone-a")),
        hinted("backend-2", None),
    ]));
    for k in 0..3 {
        c.wait_backends(k, &cip, 8080, &both);
    }
    assert_eq!(c.http("client-0", addr(&cip), 20), set(&both));

    // Hints again, then node 0 loses its zone label, then is in zone-c: node 0 uses
    // every endpoint, node 2 (zone-b) keeps its own.
    c.api().apply(slice(vec![
        hinted("backend-1", Some("zone-a")),
        hinted("backend-2", Some("zone-b")),
    ]));
    c.wait_backends(0, &cip, 8080, &["backend-1"]);
    for zone in [None, Some("zone-c")] {
        c.api().apply(c.node_object(0, zone));
        c.wait_backends(0, &cip, 8080, &both);
        c.wait_backends(0, &np0, 8080, &both);
        c.wait_backends(2, &cip, 8080, &["backend-2"]);
        assert_eq!(c.http("client-0", addr(&cip), 20), set(&both), "{zone:?}");
    }
}

/// web as the upstream case makes it: NodePort, `publishNotReadyAddresses` as given, one
/// webserver on node 0 (backend-0) in state `state` (as the EndpointSlice controller
/// publishes it), a client on node 1 (client-1); waits until both nodes have
/// programmed it (`count` backends on every frontend).
fn tolerate_unready(c: &K8sCluster, publish: bool, state: &str, count: usize) {
    c.api().apply(k8s_service(
        "web",
        web_spec(json!({"publishNotReadyAddresses": publish})),
    ));
    c.api().apply(c.web_slice(&[("backend-0", state)]));
    c.settle();
    for k in 0..2 {
        c.wait_maps(k, &format!("web with {count} backend(s)"), |m| {
            m.len() == 4 && m.values().all(|b| b.len() == count)
        });
    }
}

/// [sig-network] Services should be able to connect to terminating and unready
/// endpoints if PublishNotReadyAddresses is true: the webserver on node 0 is deleted
/// and turns unready; the EndpointSlice controller publishes it as ready (not serving,
/// terminating) since the Service publishes not-ready addresses, and kube-proxy uses an
/// endpoint whose ready condition is true. The client on node 1 reaches it through the
/// cluster IP, node 0's NodePort and node 1's own NodePort (node 1 source-NATs that flow
/// toward node 0), five times each.
#[test]
fn should_be_able_to_connect_to_terminating_and_unready_endpoints_if_publish_not_ready_addresses_is_true(
) {
    let c = K8sCluster::new();
    tolerate_unready(&c, true, READY, 1);
    let to = [
        format!("{WEB}:80"),
        addr(&c.node_port(0, NODE_PORT_HTTP)).to_string(),
        addr(&c.node_port(1, NODE_PORT_HTTP)).to_string(),
    ];
    for a in &to {
        assert_eq!(c.http("client-1", a, 1), set(&["backend-0"]), "{a}");
    }
    // Deleted, unready: still published (ready: true, serving: false, terminating).
    tolerate_unready(&c, true, PUBLISHED_TERMINATING, 1);
    for a in &to {
        assert_eq!(c.http("client-1", a, 5), set(&["backend-0"]), "{a}");
    }
    let n1 = frontends(&c.sb, 1).unwrap();
    assert_eq!(
        n1[&c.node_port(1, NODE_PORT_HTTP)],
        [c.backend("backend-0", 8080)]
    );
}

/// [sig-network] Services should not be able to connect to terminating and unready
/// endpoints if PublishNotReadyAddresses is false: the same pod, deleted and unready, is
/// published as not ready and not serving: the cluster IP and both NodePorts refuse the
/// client on node 1.
#[test]
fn should_not_be_able_to_connect_to_terminating_and_unready_endpoints_if_publish_not_ready_addresses_is_false(
) {
    let c = K8sCluster::new();
    tolerate_unready(&c, false, READY, 1);
    assert_eq!(
        c.http("client-1", &format!("{WEB}:80"), 1),
        set(&["backend-0"])
    );
    tolerate_unready(&c, false, GONE, 0);
    for a in [
        format!("{WEB}:80"),
        addr(&c.node_port(0, NODE_PORT_HTTP)).to_string(),
        addr(&c.node_port(1, NODE_PORT_HTTP)).to_string(),
    ] {
        for _ in 0..5 {
            assert_eq!(c.http_fails("client-1", &a), 7, "{a}: refused");
        }
    }
}

/// A ClusterIP Service `name` at `cip` with `ports` and `extra` spec fields.
fn cluster_ip_service(name: &str, cip: &str, ports: Value, extra: Value) -> Value {
    let mut spec =
        json!({"type": "ClusterIP", "clusterIP": cip, "clusterIPs": [cip], "ports": ports});
    for (k, v) in extra.as_object().expect("an object of spec fields") {
        spec[k] = v.clone();
    }
    k8s_service(name, spec)
}

/// [sig-network] Services should serve multiport endpoints from pods: two ports
/// (portname1 80, portname2 81) whose named target ports only one pod each has
/// (backend-0 on node 0: portname1; backend-1a on node 1: portname2), so the
/// EndpointSlice controller writes a slice per port set. From a pod on node 1, each
/// port reaches its pod once it exists, and refuses once it is gone.
#[test]
fn should_serve_multiport_endpoints_from_pods() {
    let c = K8sCluster::new();
    let cip = "10.96.0.20";
    c.api().apply(cluster_ip_service(
        "multi-endpoint-test",
        cip,
        json!([{"name": "portname1", "port": 80, "targetPort": "svc1"},
               {"name": "portname2", "port": 81, "targetPort": "svc2"}]),
        json!({}),
    ));
    let (p1, p2) = (format!("{cip}:80"), format!("{cip}:81"));
    let slice1 = |eps: &[(&str, &str)]| {
        c.slice(
            "multi-endpoint-test-1",
            "multi-endpoint-test",
            json!([{"name": "portname1", "port": 8080, "protocol": "TCP"}]),
            eps,
        )
    };
    let slice2 = |eps: &[(&str, &str)]| {
        c.slice(
            "multi-endpoint-test-2",
            "multi-endpoint-test",
            json!([{"name": "portname2", "port": 8080, "protocol": "TCP"}]),
            eps,
        )
    };
    c.wait_everywhere(&format!("{p1}/TCP"), 8080, &[]);
    c.wait_everywhere(&format!("{p2}/TCP"), 8080, &[]);
    assert_eq!(c.http_fails("client-1", &p1), 7);
    c.api().apply(slice1(&[("backend-0", READY)]));
    c.wait_everywhere(&format!("{p1}/TCP"), 8080, &["backend-0"]);
    assert_eq!(c.http("client-1", &p1, 5), set(&["backend-0"]));
    assert_eq!(c.http_fails("client-1", &p2), 7);
    c.api().apply(slice2(&[("backend-1a", READY)]));
    c.wait_everywhere(&format!("{p2}/TCP"), 8080, &["backend-1a"]);
    assert_eq!(c.http("client-1", &p1, 5), set(&["backend-0"]));
    assert_eq!(c.http("client-1", &p2, 5), set(&["backend-1a"]));
    c.api().apply(slice1(&[]));
    c.wait_everywhere(&format!("{p1}/TCP"), 8080, &[]);
    assert_eq!(c.http_fails("client-1", &p1), 7);
    assert_eq!(c.http("client-1", &p2, 5), set(&["backend-1a"]));
    c.api().apply(slice2(&[]));
    c.wait_everywhere(&format!("{p2}/TCP"), 8080, &[]);
    assert_eq!(c.http_fails("client-1", &p2), 7);
}

/// [sig-network] Services should serve endpoints on same port and different protocols:
/// port 80 over TCP and over UDP, one pod serving both (backend-1a, on node 1), a
/// client on node 0. Both answer; with only the TCP port left, UDP gets no answer; with
/// only the UDP port, TCP fails.
#[test]
fn should_serve_endpoints_on_same_port_and_different_protocols() {
    let c = K8sCluster::new();
    let cip = "10.96.0.21";
    let tcp = json!({"name": "tcp-port", "port": 80, "targetPort": 8080, "protocol": "TCP"});
    let udp = json!({"name": "udp-port", "port": 80, "targetPort": 5353, "protocol": "UDP"});
    let svc = |ports: Value| cluster_ip_service("multiprotocol-test", cip, ports, json!({}));
    c.api().apply(svc(json!([tcp, udp])));
    c.api().apply(c.slice(
        "multiprotocol-test-1",
        "multiprotocol-test",
        json!([{"name": "tcp-port", "port": 8080, "protocol": "TCP"},
               {"name": "udp-port", "port": 5353, "protocol": "UDP"}]),
        &[("backend-1a", READY)],
    ));
    let to = format!("{cip}:80");
    c.wait_everywhere(&format!("{to}/TCP"), 8080, &["backend-1a"]);
    c.wait_maps(0, "the UDP port", |m| {
        m.get(&format!("{to}/UDP")).is_some_and(|b| b.len() == 1)
    });
    assert_eq!(c.http("client-0", &to, 3), set(&["backend-1a"]));
    assert_eq!(c.udp("client-0", &to, 3), set(&["backend-1a"]));
    c.api().apply(svc(json!([tcp])));
    c.wait_gone(&format!("{to}/UDP"));
    assert_eq!(c.http("client-0", &to, 3), set(&["backend-1a"]));
    c.udp_fails("client-0", &to);
    c.api().apply(svc(json!([udp])));
    c.wait_gone(&format!("{to}/TCP"));
    assert_eq!(c.udp("client-0", &to, 3), set(&["backend-1a"]));
    c.http_fails("client-0", &to);
}

/// [sig-network] Services should be able to update service type to NodePort listening
/// on same port number but different protocols: a ClusterIP Service on port 80/TCP
/// becomes a NodePort Service, then gets port 80/UDP too (its NodePort the same number
/// as the TCP one's); both are reached through the cluster IP from a pod and through
/// both nodes' NodePorts from outside.
#[test]
fn should_be_able_to_update_service_type_to_node_port_listening_on_same_port_number_but_different_protocols(
) {
    let c = K8sCluster::new();
    let cip = "10.96.0.22";
    let name = "nodeport-update-service";
    let tcp = json!({"name": "tcp-port", "port": 80, "targetPort": 8080, "protocol": "TCP"});
    c.api()
        .apply(cluster_ip_service(name, cip, json!([tcp]), json!({})));
    c.api().apply(c.slice(
        "nodeport-update-service-1",
        name,
        json!([{"name": "tcp-port", "port": 8080, "protocol": "TCP"},
               {"name": "udp-port", "port": 5353, "protocol": "UDP"}]),
        &[("backend-0", READY), ("backend-1a", READY)],
    ));
    let both = ["backend-0", "backend-1a"];
    c.wait_everywhere(&format!("{cip}:80/TCP"), 8080, &both);
    let mut tcp_np = tcp.clone();
    tcp_np["nodePort"] = json!(30100);
    let mut spec = json!({"type": "NodePort", "ports": [tcp_np]});
    c.api()
        .apply(cluster_ip_service(name, cip, json!([]), spec.clone()));
    for k in 0..2 {
        c.wait_backends(k, &c.node_port(k, 30100), 8080, &both);
    }
    for k in 0..2 {
        let np = format!("{}:30100", c.sb.nodes[k].ip);
        assert_eq!(c.http(OUTSIDE, &np, 20), set(&both), "{np}");
    }
    spec["ports"] = json!([tcp_np,
        {"name": "udp-port", "port": 80, "targetPort": 5353, "protocol": "UDP", "nodePort": 30100}]);
    c.api()
        .apply(cluster_ip_service(name, cip, json!([]), spec));
    for k in 0..2 {
        let fe = format!("{}:30100/UDP", c.sb.nodes[k].ip);
        c.wait_maps(k, &fe, |m| m.get(&fe).is_some_and(|b| b.len() == 2));
    }
    assert_eq!(c.http("client-1", &format!("{cip}:80"), 20), set(&both));
    assert_eq!(c.udp("client-1", &format!("{cip}:80"), 20), set(&both));
    for k in 0..2 {
        let np = format!("{}:30100", c.sb.nodes[k].ip);
        assert_eq!(c.http(OUTSIDE, &np, 20), set(&both), "{np}");
        assert_eq!(c.udp(OUTSIDE, &np, 20), set(&both), "{np}/UDP");
    }
}

/// [sig-network] Services should preserve source pod IP for traffic thru service
/// cluster IP: a server echoing the address a request came from (backend-0, on node 0)
/// behind a cluster IP; a pod on each node sees its own address echoed (no SNAT for
/// cluster IP traffic, on either node).
#[test]
fn should_preserve_source_pod_ip_for_traffic_thru_service_cluster_ip() {
    let c = K8sCluster::new();
    let cip = "10.96.0.23";
    c.api().apply(cluster_ip_service(
        "sourceip-test",
        cip,
        json!([{"name": "http", "port": 8080, "targetPort": 8080}]),
        json!({}),
    ));
    c.api().apply(c.slice(
        "sourceip-test-1",
        "sourceip-test",
        json!([{"name": "http", "port": 8080, "protocol": "TCP"}]),
        &[("backend-0", READY)],
    ));
    c.wait_everywhere(&format!("{cip}:8080/TCP"), 8080, &["backend-0"]);
    for client in ["client-0", "client-1"] {
        let url = format!("http://{cip}:8080/clientip");
        let seen = c.sb.http_get(&c.netns(client), &url);
        assert_eq!(
            seen,
            Ok(c.sb.pod(client).ip.to_string()),
            "{client} through {url}"
        );
    }
}

/// [sig-network] Services should be possible to connect to a service via ExternalIP
/// when the external IP is not assigned to a node: a ClusterIP Service with the
/// external IP 203.0.113.250 (no node has it), two pods (one per node); a pod on node 1
/// reaches both through the cluster IP and through the external IP (toward node 0's,
/// source-NATed by node 1: externalTrafficPolicy Cluster).
#[test]
fn should_be_possible_to_connect_to_a_service_via_external_ip_when_the_external_ip_is_not_assigned_to_a_node(
) {
    let c = K8sCluster::new();
    let (cip, external) = ("10.96.0.24", "203.0.113.250");
    c.api().apply(cluster_ip_service(
        "externalip-test",
        cip,
        json!([{"name": "http", "port": 80, "targetPort": 8080}]),
        json!({"externalIPs": [external]}),
    ));
    c.api().apply(c.slice(
        "externalip-test-1",
        "externalip-test",
        json!([{"name": "http", "port": 8080, "protocol": "TCP"}]),
        &[("backend-0", READY), ("backend-1a", READY)],
    ));
    let both = ["backend-0", "backend-1a"];
    c.wait_everywhere(&format!("{external}:80/TCP"), 8080, &both);
    assert_eq!(c.http("client-1", &format!("{cip}:80"), 20), set(&both));
    assert_eq!(
        c.http("client-1", &format!("{external}:80"), 20),
        set(&both)
    );
}

/// [sig-network] Services should work after the service has been recreated: a Service
/// and its pod; the Service is deleted (its frontends leave both nodes, and its slice
/// goes with it, as the EndpointSlice controller does) and created again under the same
/// name with a new cluster IP: it answers there.
#[test]
fn should_work_after_the_service_has_been_recreated() {
    let c = K8sCluster::new();
    let name = "service-deletion";
    let svc = |cip: &str| {
        cluster_ip_service(
            name,
            cip,
            json!([{"name": "", "port": 80, "targetPort": 8080}]),
            json!({}),
        )
    };
    let slice = c.slice(
        "service-deletion-1",
        name,
        json!([{"name": "", "port": 8080, "protocol": "TCP"}]),
        &[("backend-1a", READY)],
    );
    c.api().apply(svc("10.96.0.25"));
    c.api().apply(slice.clone());
    c.wait_everywhere("10.96.0.25:80/TCP", 8080, &["backend-1a"]);
    assert_eq!(c.http("client-0", "10.96.0.25:80", 3), set(&["backend-1a"]));
    c.api().delete("Service", "shop", name);
    c.api()
        .delete("EndpointSlice", "shop", "service-deletion-1");
    c.wait_gone("10.96.0.25:80/TCP");
    c.http_fails("client-0", "10.96.0.25:80");
    c.api().apply(svc("10.96.0.26"));
    c.api().apply(slice);
    c.wait_everywhere("10.96.0.26:80/TCP", 8080, &["backend-1a"]);
    assert_eq!(c.http("client-0", "10.96.0.26:80", 3), set(&["backend-1a"]));
}

/// [sig-network] Services should be updated after adding or deleting ports: a Service
/// with portname1 (80) and its pod (backend-0); portname2 (81) is added, with a pod
/// of its own (backend-1a, in a slice of its own: the pods' port sets differ); both
/// answer; portname2 is deleted: 80 still answers, 81 no longer does.
#[test]
fn should_be_updated_after_adding_or_deleting_ports() {
    let c = K8sCluster::new();
    let (cip, name) = ("10.96.0.27", "edit-port-test");
    let p1 = json!({"name": "portname1", "port": 80, "targetPort": "svc1"});
    let p2 = json!({"name": "portname2", "port": 81, "targetPort": "svc2"});
    c.api()
        .apply(cluster_ip_service(name, cip, json!([p1]), json!({})));
    c.api().apply(c.slice(
        "edit-port-test-1",
        name,
        json!([{"name": "portname1", "port": 8080, "protocol": "TCP"}]),
        &[("backend-0", READY)],
    ));
    c.wait_everywhere(&format!("{cip}:80/TCP"), 8080, &["backend-0"]);
    assert_eq!(
        c.http("client-1", &format!("{cip}:80"), 3),
        set(&["backend-0"])
    );
    c.api()
        .apply(cluster_ip_service(name, cip, json!([p1, p2]), json!({})));
    let slice2 = |ports: Value| c.slice("edit-port-test-2", name, ports, &[("backend-1a", READY)]);
    c.api().apply(slice2(
        json!([{"name": "portname2", "port": 8080, "protocol": "TCP"}]),
    ));
    c.wait_everywhere(&format!("{cip}:81/TCP"), 8080, &["backend-1a"]);
    assert_eq!(
        c.http("client-1", &format!("{cip}:80"), 3),
        set(&["backend-0"])
    );
    assert_eq!(
        c.http("client-1", &format!("{cip}:81"), 3),
        set(&["backend-1a"])
    );
    c.api()
        .apply(cluster_ip_service(name, cip, json!([p1]), json!({})));
    c.api().apply(slice2(json!([])));
    c.wait_gone(&format!("{cip}:81/TCP"));
    assert_eq!(
        c.http("client-1", &format!("{cip}:80"), 3),
        set(&["backend-0"])
    );
    c.http_fails("client-1", &format!("{cip}:81"));
}

/// An ExternalName Service `name` (no cluster IP: the API server clears it).
fn external_name_service(name: &str, target: &str) -> Value {
    k8s_service(
        name,
        json!({"type": "ExternalName", "externalName": target}),
    )
}

/// A slice of Service `svc` (port "http" 8080/TCP) on backend-0 and backend-1a, the
/// pods `jig.CreateServicePods(2)` makes in the upstream cases.
fn two_pods(c: &K8sCluster, svc: &str) -> Value {
    c.slice(
        &format!("{svc}-1"),
        svc,
        json!([{"name": "http", "port": 8080, "protocol": "TCP"}]),
        &[("backend-0", READY), ("backend-1a", READY)],
    )
}

const TWO_PODS: [&str; 2] = ["backend-0", "backend-1a"];

/// [sig-network] Services should be able to change the type from ExternalName to
/// ClusterIP: nothing is programmed for the ExternalName Service; changed to ClusterIP
/// (a cluster IP allocated, port 80), it reaches its two pods from a pod.
#[test]
fn should_be_able_to_change_the_type_from_external_name_to_cluster_ip() {
    let c = K8sCluster::new();
    let name = "externalname-service";
    c.api()
        .apply(external_name_service(name, "foo.example.com"));
    c.api().apply(two_pods(&c, name));
    c.settle();
    for k in 0..2 {
        assert!(
            frontends(&c.sb, k)
                .unwrap()
                .keys()
                .all(|fe| fe.starts_with(MARKER)),
            "node {k}: nothing for an ExternalName Service"
        );
    }
    let cip = "10.96.0.30";
    c.api().apply(cluster_ip_service(
        name,
        cip,
        json!([{"name": "http", "port": 80, "targetPort": 8080}]),
        json!({}),
    ));
    c.wait_everywhere(&format!("{cip}:80/TCP"), 8080, &TWO_PODS);
    assert_eq!(c.http("client-1", &format!("{cip}:80"), 20), set(&TWO_PODS));
}

/// [sig-network] Services should be able to change the type from ExternalName to
/// NodePort: changed to NodePort, it reaches its two pods through the cluster IP and
/// through both nodes' NodePort, from a pod and from outside.
#[test]
fn should_be_able_to_change_the_type_from_external_name_to_node_port() {
    let c = K8sCluster::new();
    let name = "externalname-service";
    c.api()
        .apply(external_name_service(name, "foo.example.com"));
    c.api().apply(two_pods(&c, name));
    c.settle();
    let cip = "10.96.0.31";
    c.api().apply(cluster_ip_service(
        name,
        cip,
        json!([]),
        json!({"type": "NodePort",
               "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30110}]}),
    ));
    for k in 0..2 {
        c.wait_backends(k, &c.node_port(k, 30110), 8080, &TWO_PODS);
    }
    assert_eq!(c.http("client-1", &format!("{cip}:80"), 20), set(&TWO_PODS));
    for k in 0..2 {
        let np = format!("{}:30110", c.sb.nodes[k].ip);
        assert_eq!(c.http("client-1", &np, 20), set(&TWO_PODS), "{np}");
        assert_eq!(c.http(OUTSIDE, &np, 20), set(&TWO_PODS), "{np}");
    }
}

/// The `externalsvc` Service of the upstream "... to ExternalName" cases (what the
/// ExternalName Service's DNS name leads to), on backend-1b; waits until it answers.
fn external_service(c: &K8sCluster) -> String {
    let cip = "10.96.0.39";
    c.api().apply(cluster_ip_service(
        "externalsvc",
        cip,
        json!([{"name": "http", "port": 80, "targetPort": 8080}]),
        json!({}),
    ));
    c.api().apply(c.slice(
        "externalsvc-1",
        "externalsvc",
        json!([{"name": "http", "port": 8080, "protocol": "TCP"}]),
        &[("backend-1b", READY)],
    ));
    c.wait_everywhere(&format!("{cip}:80/TCP"), 8080, &["backend-1b"]);
    format!("{cip}:80")
}

/// [sig-network] Services should be able to change the type from ClusterIP to
/// ExternalName: changed to ExternalName (pointing at externalsvc), its cluster IP
/// leaves both nodes' maps and no longer answers, while externalsvc, which the name
/// resolves to, does.
#[test]
fn should_be_able_to_change_the_type_from_cluster_ip_to_external_name() {
    let c = K8sCluster::new();
    let (name, cip) = ("clusterip-service", "10.96.0.32");
    c.api().apply(cluster_ip_service(
        name,
        cip,
        json!([{"name": "http", "port": 80, "targetPort": 8080}]),
        json!({}),
    ));
    c.api().apply(two_pods(&c, name));
    c.wait_everywhere(&format!("{cip}:80/TCP"), 8080, &TWO_PODS);
    assert_eq!(c.http("client-1", &format!("{cip}:80"), 20), set(&TWO_PODS));
    let external = external_service(&c);
    c.api().apply(external_name_service(
        name,
        "externalsvc.shop.svc.cluster.local",
    ));
    c.wait_gone(&format!("{cip}:80/TCP"));
    c.http_fails("client-1", &format!("{cip}:80"));
    assert_eq!(c.http("client-1", &external, 3), set(&["backend-1b"]));
}

/// [sig-network] Services should be able to change the type from NodePort to
/// ExternalName: its cluster IP and both nodes' NodePorts leave the maps; the NodePort
/// no longer answers from outside; externalsvc does.
#[test]
fn should_be_able_to_change_the_type_from_node_port_to_external_name() {
    let c = K8sCluster::new();
    let (name, cip) = ("nodeport-service", "10.96.0.33");
    c.api().apply(cluster_ip_service(
        name,
        cip,
        json!([]),
        json!({"type": "NodePort",
               "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30111}]}),
    ));
    c.api().apply(two_pods(&c, name));
    for k in 0..2 {
        c.wait_backends(k, &c.node_port(k, 30111), 8080, &TWO_PODS);
    }
    let np0 = format!("{}:30111", c.sb.nodes[0].ip);
    assert_eq!(c.http(OUTSIDE, &np0, 20), set(&TWO_PODS));
    let external = external_service(&c);
    c.api().apply(external_name_service(
        name,
        "externalsvc.shop.svc.cluster.local",
    ));
    c.wait_gone(&format!("{cip}:80/TCP"));
    for k in 0..2 {
        c.wait_gone(&c.node_port(k, 30111));
    }
    c.http_fails(OUTSIDE, &np0);
    c.http_fails("client-1", &format!("{cip}:80"));
    assert_eq!(c.http("client-1", &external, 3), set(&["backend-1b"]));
}

/// The upstream label cases: `disabled` created with `labels`, `toggled` without; the
/// label put on `toggled` and taken off again; each step checked through both cluster
/// IPs from a pod on node 1 (up: its three pods answer; down: no answer).
fn label_toggles_the_service(labels: Value, disabled: &str, toggled: &str) {
    let c = K8sCluster::new();
    let pods = ["backend-0", "backend-1a", "backend-1b"];
    let (ip_disabled, ip_toggled) = ("10.96.0.34", "10.96.0.35");
    let svc = |name: &str, cip: &str, labels: Option<&Value>| {
        let mut s = cluster_ip_service(
            name,
            cip,
            json!([{"name": "", "port": 80, "targetPort": 8080}]),
            json!({}),
        );
        if let Some(l) = labels {
            s["metadata"]["labels"] = l.clone();
        }
        s
    };
    for (name, cip, l) in [
        (disabled, ip_disabled, Some(&labels)),
        (toggled, ip_toggled, None),
    ] {
        c.api().apply(svc(name, cip, l));
        let eps: Vec<(&str, &str)> = pods.iter().map(|p| (*p, READY)).collect();
        c.api().apply(c.slice(
            &format!("{name}-1"),
            name,
            json!([{"name": "", "port": 8080, "protocol": "TCP"}]),
            &eps,
        ));
    }
    let up = |cip: &str| {
        c.wait_everywhere(&format!("{cip}:80/TCP"), 8080, &pods);
        assert_eq!(
            c.http("client-1", &format!("{cip}:80"), 30),
            set(&pods),
            "{cip}"
        );
    };
    let down = |cip: &str| {
        c.wait_gone(&format!("{cip}:80/TCP"));
        c.http_fails("client-1", &format!("{cip}:80"));
    };
    up(ip_toggled);
    c.settle();
    down(ip_disabled);
    c.api().apply(svc(toggled, ip_toggled, Some(&labels)));
    down(ip_toggled);
    c.api().apply(svc(toggled, ip_toggled, None));
    up(ip_toggled);
    c.settle();
    down(ip_disabled);
}

/// [sig-network] Services should implement service.kubernetes.io/service-proxy-name:
/// a Service labelled for another proxy (foo-bar) is left alone by both agents;
/// labelling a live Service takes it away, removing the label gives it back.
#[test]
fn should_implement_service_kubernetes_io_service_proxy_name() {
    label_toggles_the_service(
        json!({"service.kubernetes.io/service-proxy-name": "foo-bar"}),
        "service-proxy-disabled",
        "service-proxy-toggled",
    );
}

/// [sig-network] Services should implement service.kubernetes.io/headless: a Service
/// labelled headless (with a cluster IP all the same) is not proxied, as kube-proxy's
/// watch excludes it; the label toggled on a live Service takes it away and back.
#[test]
fn should_implement_service_kubernetes_io_headless() {
    label_toggles_the_service(
        json!({"service.kubernetes.io/headless": ""}),
        "service-headless",
        "service-headless-toggled",
    );
}

/// [sig-network] EndpointSlice should support a Service with multiple ports specified
/// in multiple EndpointSlices: a Service without selector, two ports, and a hand-made
/// slice per port, each with a pod of its own: each port reaches its pod.
#[test]
fn should_support_a_service_with_multiple_ports_specified_in_multiple_endpoint_slices() {
    let c = K8sCluster::new();
    let (name, cip) = ("example-custom-endpoints", "10.96.0.36");
    c.api().apply(cluster_ip_service(
        name,
        cip,
        json!([{"name": "example-int-port", "port": 80, "targetPort": 8080},
               {"name": "example-named-port", "port": 81, "targetPort": "http"}]),
        json!({}),
    ));
    for (slice, port, pod) in [
        ("e2e-custom-slice-1", "example-int-port", "backend-0"),
        ("e2e-custom-slice-2", "example-named-port", "backend-1a"),
    ] {
        c.api().apply(c.slice(
            slice,
            name,
            json!([{"name": port, "port": 8080, "protocol": "TCP"}]),
            &[(pod, READY)],
        ));
    }
    c.wait_everywhere(&format!("{cip}:80/TCP"), 8080, &["backend-0"]);
    c.wait_everywhere(&format!("{cip}:81/TCP"), 8080, &["backend-1a"]);
    assert_eq!(
        c.http("client-1", &format!("{cip}:80"), 5),
        set(&["backend-0"])
    );
    assert_eq!(
        c.http("client-0", &format!("{cip}:81"), 5),
        set(&["backend-1a"])
    );
}

/// [sig-network] EndpointSlice should support a Service with multiple endpoint IPs
/// specified in multiple EndpointSlices: one port, a hand-made slice per pod: both
/// pods answer.
#[test]
fn should_support_a_service_with_multiple_endpoint_ips_specified_in_multiple_endpoint_slices() {
    let c = K8sCluster::new();
    let (name, cip) = ("example-custom-endpoints", "10.96.0.37");
    c.api().apply(cluster_ip_service(
        name,
        cip,
        json!([{"name": "example-int-port", "port": 80, "targetPort": 8080}]),
        json!({}),
    ));
    for (slice, pod) in [
        ("e2e-custom-slice-1", "backend-0"),
        ("e2e-custom-slice-2", "backend-1a"),
    ] {
        c.api().apply(c.slice(
            slice,
            name,
            json!([{"name": "example-int-port", "port": 8080, "protocol": "TCP"}]),
            &[(pod, READY)],
        ));
    }
    c.wait_everywhere(&format!("{cip}:80/TCP"), 8080, &TWO_PODS);
    assert_eq!(c.http("client-1", &format!("{cip}:80"), 20), set(&TWO_PODS));
}

/// The upstream terminating-fallback cases: a Service (`extra` spec fields over web's)
/// whose one webserver (backend-0, on node 0) is deleted and still serves during its
/// grace period; pause pods on both nodes (client-0, client-1). Waits until node
/// `k`'s frontend `fe` has the terminating endpoint for every `k` in `serving`.
fn all_terminating(extra: Value, serving: &[(usize, String)]) -> K8sCluster {
    let c = K8sCluster::new();
    c.api().apply(k8s_service("web", web_spec(extra)));
    c.api().apply(c.web_slice(&[("backend-0", READY)]));
    for (k, fe) in serving {
        c.wait_backends(*k, fe, 8080, &["backend-0"]);
    }
    // Deleted: terminating, serving, the only endpoint.
    c.api().apply(c.web_slice(&[("backend-0", TERMINATING)]));
    c.settle();
    for (k, fe) in serving {
        c.wait_backends(*k, fe, 8080, &["backend-0"]);
    }
    c
}

/// [sig-network] Services should fallback to terminating endpoints when there are no
/// ready endpoints with internalTrafficPolicy=Cluster: both pause pods reach the
/// terminating webserver through the cluster IP, five times each.
#[test]
fn should_fallback_to_terminating_endpoints_when_there_are_no_ready_endpoints_with_internal_traffic_policy_cluster(
) {
    let cip = format!("{WEB}:80/TCP");
    let c = all_terminating(
        json!({"type": "ClusterIP", "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}),
        &[(0, cip.clone()), (1, cip.clone())],
    );
    for _ in 0..5 {
        assert_eq!(c.http("client-0", addr(&cip), 1), set(&["backend-0"]));
        assert_eq!(c.http("client-1", addr(&cip), 1), set(&["backend-0"]));
    }
}

/// [sig-network] Services should fallback to local terminating endpoints when there are
/// no ready endpoints with internalTrafficPolicy=Local: the pause pod on the
/// webserver's node reaches it through the cluster IP; the one on the other node gets
/// an error (no local endpoint there: refused), five times each.
#[test]
fn should_fallback_to_local_terminating_endpoints_when_there_are_no_ready_endpoints_with_internal_traffic_policy_local(
) {
    let cip = format!("{WEB}:80/TCP");
    let c = all_terminating(
        json!({"type": "ClusterIP", "internalTrafficPolicy": "Local",
               "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}),
        &[(0, cip.clone())],
    );
    c.wait_backends(1, &cip, 8080, &[]);
    for _ in 0..5 {
        assert_eq!(c.http("client-0", addr(&cip), 1), set(&["backend-0"]));
        assert_eq!(c.http_fails("client-1", addr(&cip)), 7, "refused");
    }
}

/// [sig-network] Services should fallback to terminating endpoints when there are no
/// ready endpoints with externallTrafficPolicy=Cluster (the upstream name's spelling):
/// both pause pods reach the terminating webserver through node 0's NodePort.
#[test]
fn should_fallback_to_terminating_endpoints_when_there_are_no_ready_endpoints_with_externall_traffic_policy_cluster(
) {
    let np0 = format!("{}:{NODE_PORT_HTTP}/TCP", NODE_IP);
    let c = all_terminating(json!({}), &[(0, np0.clone())]);
    for _ in 0..5 {
        assert_eq!(c.http("client-0", addr(&np0), 1), set(&["backend-0"]));
        assert_eq!(c.http("client-1", addr(&np0), 1), set(&["backend-0"]));
    }
}

/// [sig-network] Services should fallback to local terminating endpoints when there are
/// no ready endpoints with externalTrafficPolicy=Local: node 0's NodePort (the
/// webserver's node) serves both pause pods from the terminating endpoint; node 1's
/// NodePort, with no local endpoint, fails for the pause pod on node 0 (dropped).
#[test]
fn should_fallback_to_local_terminating_endpoints_when_there_are_no_ready_endpoints_with_external_traffic_policy_local(
) {
    let np0 = format!("{}:{NODE_PORT_HTTP}/TCP", NODE_IP);
    let c = all_terminating(
        json!({"externalTrafficPolicy": "Local"}),
        &[(0, np0.clone())],
    );
    let np1 = c.node_port(1, NODE_PORT_HTTP);
    c.wait_backends(1, &np1, 8080, &[]);
    for _ in 0..5 {
        c.http_fails("client-0", addr(&np1));
        assert_eq!(c.http("client-0", addr(&np0), 1), set(&["backend-0"]));
        assert_eq!(c.http("client-1", addr(&np0), 1), set(&["backend-0"]));
    }
}

/// A UDP client that keeps asking from one socket, on the fixed source port the upstream
/// Conntrack cases use (12345, their `nc -u -p`), every 100 ms: so every datagram is
/// the same flow. It records who answered each (an empty name: no answer within 300 ms);
/// stopped on drop.
struct UdpProber {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    answers: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl UdpProber {
    fn start(netns: &str, to: std::net::SocketAddr) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let answers = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (stop2, answers2, ns) = (stop.clone(), answers.clone(), netns.to_string());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            lb_testbench::sandbox::enter(&ns).unwrap();
            let sock = std::net::UdpSocket::bind(("0.0.0.0", 12345)).unwrap();
            sock.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            ready_tx.send(()).unwrap();
            let mut buf = [0u8; 256];
            while !stop2.load(std::sync::atomic::Ordering::SeqCst) {
                let who = match sock
                    .send_to(b"who?", to)
                    .and_then(|_| sock.recv_from(&mut buf))
                {
                    Ok((n, from)) if from == to => {
                        String::from_utf8_lossy(&buf[..n]).trim().to_string()
                    }
                    Ok((_, from)) => format!("(answered from {from})"),
                    Err(_) => String::new(),
                };
                answers2.lock().unwrap().push(who);
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        ready_rx.recv().expect("the UDP prober started");
        Self {
            stop,
            answers,
            thread: Some(thread),
        }
    }

    /// Waits (up to 20 s) until the last three answers come from `who`.
    fn wait_for(&self, who: &str, c: &K8sCluster) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let answers = self.answers.lock().unwrap().clone();
            if answers.len() >= 3 && answers[answers.len() - 3..].iter().all(|a| a == who) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the flow never reached {who}; the answers: {answers:?}\n{}",
                c.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for UdpProber {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The upstream "server pod cycles" cases, to `to` ("ip:port"): the client (on node 0)
/// keeps sending one flow to web's UDP port before it has any endpoint; a server on node
/// 1 (backend-1a) appears and gets the flow; a second (backend-1b) appears and the first
/// is deleted: the same flow reaches the second (its entry pointed at a backend that is
/// gone, so it is sent anew).
fn udp_flow_follows_the_server_pods(c: &K8sCluster, to: &str) {
    c.api().apply(k8s_service("web", web_spec(json!({}))));
    c.api().apply(c.web_slice(&[]));
    c.settle();
    let prober = UdpProber::start(&c.sb.pod("client-0").netns, to.parse().unwrap());
    c.api().apply(c.web_slice(&[("backend-1a", READY)]));
    prober.wait_for("backend-1a", c);
    c.api()
        .apply(c.web_slice(&[("backend-1a", READY), ("backend-1b", READY)]));
    c.settle();
    prober.wait_for("backend-1a", c);
    c.api().apply(c.web_slice(&[("backend-1b", READY)]));
    prober.wait_for("backend-1b", c);
}

/// [sig-network] Conntrack should be able to preserve UDP traffic when server pod
/// cycles for a NodePort service: the client on node 0 sends to node 1's NodePort.
#[test]
fn should_be_able_to_preserve_udp_traffic_when_server_pod_cycles_for_a_node_port_service() {
    let c = K8sCluster::new();
    let to = format!("{}:{NODE_PORT_DNS}", c.sb.nodes[1].ip);
    udp_flow_follows_the_server_pods(&c, &to);
}

/// [sig-network] Conntrack should be able to preserve UDP traffic when server pod
/// cycles for a ClusterIP service: the client on node 0 sends to the cluster IP.
#[test]
fn should_be_able_to_preserve_udp_traffic_when_server_pod_cycles_for_a_cluster_ip_service() {
    let c = K8sCluster::new();
    udp_flow_follows_the_server_pods(&c, &format!("{WEB}:53"));
}

/// [sig-network] Conntrack should be able to preserve UDP traffic when initial unready
/// endpoints get ready: the client on node 0 keeps sending one flow to the cluster IP;
/// the server on node 1 is listed first not ready (its slice exists, nothing answers:
/// refused), then ready: the same flow reaches it.
#[test]
fn should_be_able_to_preserve_udp_traffic_when_initial_unready_endpoints_get_ready() {
    let c = K8sCluster::new();
    c.api().apply(k8s_service("web", web_spec(json!({}))));
    c.api().apply(c.web_slice(&[]));
    c.settle();
    let to = format!("{WEB}:53");
    let prober = UdpProber::start(&c.sb.pod("client-0").netns, to.parse().unwrap());
    c.api().apply(c.web_slice(&[("backend-1a", NOT_READY)]));
    c.settle();
    prober.wait_for("", &c);
    c.api().apply(c.web_slice(&[("backend-1a", READY)]));
    prober.wait_for("backend-1a", &c);
}
