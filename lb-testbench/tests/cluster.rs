//! End-to-end on a two-node cluster (`Sandbox::cluster`): two node namespaces on a
//! bridged underlay, each routing the other's pod CIDRs via the other's address (a routed
//! CNI without overlay), one real `lb run` agent per node with its own pin folder, each
//! on a file naming its own node and the same dual-stack Service with `nodeName` on every
//! endpoint. Real programs (curl, nginx, a UDP responder in each backend pod) send
//! TCP and UDP through the ClusterIP to backends on the other node, over IPv4 and IPv6; we
//! assert what the clients received, and which node's maps did the work: the client's
//! node DNATs on the client pod's veth (tc) and reverse-translates the reply as it
//! comes in on its `eth0` (XDP), with its own conntrack; the backend's node never sees
//! the Service address and keeps no state for the flow. Also: dropping a cluster leaves
//! no namespace and no pin. Needs root; run one at a time.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::Path,
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use lb_testbench::{
    agent::{agent_log, lb_binary, spawn_agent, wait_agent_ready},
    sandbox::{hostport, Sandbox},
};
use lb_userspace::dataplane::Maps;

/// The Service's ClusterIPs (one per family).
const WEB: &str = "10.96.0.10";
const WEB6: &str = "fd00:10:96::a";
/// NodePorts of web: 30080/TCP, 30053/UDP.
const NODE_PORT_HTTP: u16 = 30080;
const NODE_PORT_DNS: u16 = 30053;
/// (2 ClusterIPs + the node's 2 addresses) x (80/TCP, 53/UDP).
const FRONTENDS: usize = 8;
/// Where a request comes from: a pod, or the client outside the cluster.
const OUTSIDE: &str = "outside";
/// Node 0 runs the first client and a backend; node 1 two backends and the second
/// client. Each backend runs nginx (8080) and a UDP responder (5353), both answering
/// with the pod's name.
const NODE_0: &[&str] = &["client-0", "backend-0"];
const NODE_1: &[&str] = &["backend-1a", "backend-1b", "client-1"];
const BACKENDS: [&str; 3] = ["backend-0", "backend-1a", "backend-1b"];

static N: AtomicUsize = AtomicUsize::new(0);

fn prefix() -> String {
    format!(
        "lbt{}c{}",
        std::process::id() % 100_000,
        N.fetch_add(1, Ordering::SeqCst)
    )
}

/// The agent file of node `node`: this node (its name and both its addresses) and web, a
/// dual-stack NodePort Service (80 -> 8080/TCP, 53 -> 5353/UDP, NodePorts 30080 and
/// 30053, the given traffic policies) on `backends`, one EndpointSlice per family,
/// every endpoint with its pod's node as `nodeName`.
fn config(sb: &Sandbox, node: usize, backends: &[&str], policies: Policies) -> String {
    let Policies { external, internal } = policies;
    let n = &sb.nodes[node];
    let eps = |v6: bool| -> String {
        backends
            .iter()
            .map(|b| {
                let p = sb.pod(b);
                let addr = if v6 {
                    p.ip6.to_string()
                } else {
                    p.ip.to_string()
                };
                let node_name = &sb.nodes[p.node].name;
                format!("      - {{addresses: [\"{addr}\"], nodeName: {node_name}}}\n")
            })
            .collect()
    };
    let ports = "    ports:
      - {name: http, port: 8080, protocol: TCP}
      - {name: dns, port: 5353, protocol: UDP}
";
    format!(
        "node: {{name: {}, addresses: [\"{}\", \"{}\"]}}
services:
  - name: web
    clusterIPs: [\"{WEB}\", \"{WEB6}\"]
    ipFamilies: [IPv4, IPv6]
    ipFamilyPolicy: RequireDualStack
    type: NodePort
    externalTrafficPolicy: {external}
    internalTrafficPolicy: {internal}
    ports:
      - {{name: http, port: 80, nodePort: {NODE_PORT_HTTP}, protocol: TCP}}
      - {{name: dns, port: 53, nodePort: {NODE_PORT_DNS}, protocol: UDP}}
endpointSlices:
  - name: web-v4
    serviceName: web
{ports}    endpoints:
{}  - name: web-v6
    serviceName: web
{ports}    endpoints:
{}",
        n.name,
        n.ip,
        n.ip6,
        eps(false),
        eps(true),
    )
}

/// web's externalTrafficPolicy and internalTrafficPolicy.
#[derive(Clone, Copy)]
struct Policies {
    external: &'static str,
    internal: &'static str,
}

const CLUSTER: Policies = Policies {
    external: "Cluster",
    internal: "Cluster",
};

struct Cluster {
    sb: Sandbox,
}

impl Cluster {
    /// The two nodes and their pods, the servers in every backend pod, and an agent per
    /// node, on files whose web Service has `backends` (externalTrafficPolicy Cluster).
    fn new(backends: &[&str]) -> Cluster {
        Self::with_policies(backends, CLUSTER)
    }

    fn with_policies(backends: &[&str], policies: Policies) -> Cluster {
        let sb = Sandbox::cluster(&prefix(), &[NODE_0, NODE_1]).unwrap();
        for b in BACKENDS {
            sb.start_nginx(b, 8080).unwrap();
            sb.start_udp_echo(b, 5353).unwrap();
        }
        let lb = lb_binary().unwrap();
        for k in 0..sb.nodes.len() {
            let file = sb.path(&format!("services-n{k}.yaml"));
            std::fs::write(&file, config(&sb, k, backends, policies)).unwrap();
            spawn_agent(&sb, k, &lb, &file, &[]).unwrap();
        }
        // externalTrafficPolicy Local: also the NodePorts' inside views (the node's own
        // sockets and its pods' see every endpoint).
        let frontends = if policies.external == "Local" {
            FRONTENDS + 4
        } else {
            FRONTENDS
        };
        for k in 0..sb.nodes.len() {
            let links = sb.pods.iter().filter(|p| p.node == k).count();
            wait_agent_ready(&sb, k, frontends, links, Duration::from_secs(30)).unwrap();
        }
        Cluster { sb }
    }

    /// The namespace of a pod, or of the client outside (`OUTSIDE`).
    fn netns(&self, from: &str) -> String {
        if from == OUTSIDE {
            return self.sb.outside.clone();
        }
        self.sb.pod(from).netns.clone()
    }

    /// Both agents' logs, for failure messages.
    fn logs(&self) -> String {
        (0..self.sb.nodes.len())
            .map(|k| {
                let name = agent_log(&self.sb, k);
                format!("--- {name}\n{}", self.sb.log(&name))
            })
            .collect()
    }

    /// HTTP from `pod` to `ip`:80, `n` times, each on a new connection: who answered,
    /// how often.
    fn who_answers_http(&self, pod: &str, ip: &str, n: usize) -> BTreeMap<String, usize> {
        self.who_answers_http_at(pod, &hostport(ip, 80), n)
    }

    /// HTTP from `pod` (or `OUTSIDE`) to `to` ("ip:port"), `n` times.
    fn who_answers_http_at(&self, pod: &str, to: &str, n: usize) -> BTreeMap<String, usize> {
        let url = format!("http://{to}/");
        self.sb
            .who_answers_http(&self.netns(pod), &url, n)
            .unwrap_or_else(|code| panic!("{pod}: curl {url} failed: exit {code}\n{}", self.logs()))
    }

    /// One UDP datagram from `pod` to `ip`:53, `n` times, each from a new socket (a new
    /// source port): who answered, how often. Every answer must come from the Service's
    /// address and port.
    fn who_answers_udp(&self, pod: &str, ip: &str, n: usize) -> BTreeMap<String, usize> {
        self.who_answers_udp_at(pod, &hostport(ip, 53), n)
    }

    /// UDP from `pod` (or `OUTSIDE`) to `to` ("ip:port"), `n` times.
    fn who_answers_udp_at(&self, pod: &str, to: &str, n: usize) -> BTreeMap<String, usize> {
        let service: SocketAddr = to.parse().unwrap();
        self.sb
            .who_answers_udp(&self.netns(pod), service, n)
            .unwrap_or_else(|e| panic!("{pod}: {e}\n{}", self.logs()))
    }

    /// Node `node`'s datapath counters.
    fn counters(&self, node: usize) -> BTreeMap<&'static str, u64> {
        Maps::from_pins(&self.sb.nodes[node].pin_dir)
            .unwrap()
            .counters()
            .unwrap()
            .into_iter()
            .collect()
    }

    /// Node `node`'s conntrack entries.
    fn conntrack_len(&self, node: usize) -> usize {
        Maps::from_pins(&self.sb.nodes[node].pin_dir)
            .unwrap()
            .conntrack_entries()
            .unwrap()
            .len()
    }
}

fn names(seen: &BTreeMap<String, usize>) -> Vec<&str> {
    seen.keys().map(String::as_str).collect()
}

/// [sig-network] Services should be able to connect to a ClusterIP with a backend on
/// another node: a client on node 0, the backends only on node 1, over both families.
/// Every request is answered, by node 1's pods (both of them, over 30 connections per
/// family: each is missed with probability 2^-30); node 0 did the translation both ways
/// (its forward and reply counters), node 1 none (no conntrack entry, no new flow).
#[test]
fn should_be_able_to_connect_to_a_cluster_ip_with_a_backend_on_another_node() {
    let c = Cluster::new(&["backend-1a", "backend-1b"]);
    for ip in [WEB, WEB6] {
        let seen = c.who_answers_http("client-0", ip, 30);
        assert_eq!(names(&seen), ["backend-1a", "backend-1b"], "{ip}: {seen:?}");
    }
    let (n0, n1) = (c.counters(0), c.counters(1));
    assert!(n0["new_flow"] >= 60, "node 0: {n0:?}");
    assert!(n0["reverse_translated"] >= 60, "node 0: {n0:?}");
    assert_eq!(n1["new_flow"], 0, "node 1: {n1:?}");
    assert_eq!(n1["reverse_translated"], 0, "node 1: {n1:?}");
    assert_eq!(c.conntrack_len(1), 0, "node 1 keeps no state for the flows");
}

/// The same over UDP: every datagram to the ClusterIP:53 is answered from the
/// ClusterIP:53 (the reply reverse-translated by node 0's XDP as it arrives from node 1),
/// by both of node 1's pods, over both families.
#[test]
fn should_be_able_to_reach_a_cluster_ip_over_udp_with_a_backend_on_another_node() {
    let c = Cluster::new(&["backend-1a", "backend-1b"]);
    for ip in [WEB, WEB6] {
        let seen = c.who_answers_udp("client-0", ip, 30);
        assert_eq!(names(&seen), ["backend-1a", "backend-1b"], "{ip}: {seen:?}");
    }
    let n1 = c.counters(1);
    assert_eq!(n1["new_flow"], 0, "node 1: {n1:?}");
    assert_eq!(c.conntrack_len(1), 0, "node 1 keeps no state for the flows");
}

/// A client on node 1 and the Service's backends on both nodes (backend-0 on node 0,
/// backend-1a on node 1): both answer, over TCP and UDP and both families; UDP answers
/// come from the Service address whichever node the backend is on.
#[test]
fn a_pod_on_the_second_node_reaches_backends_on_both_nodes_through_the_cluster_ip() {
    let c = Cluster::new(&["backend-0", "backend-1a"]);
    for ip in [WEB, WEB6] {
        let seen = c.who_answers_http("client-1", ip, 30);
        assert_eq!(names(&seen), ["backend-0", "backend-1a"], "{ip}: {seen:?}");
        let seen = c.who_answers_udp("client-1", ip, 30);
        assert_eq!(names(&seen), ["backend-0", "backend-1a"], "{ip}: {seen:?}");
    }
    let n0 = c.counters(0);
    assert_eq!(n0["new_flow"], 0, "node 0: {n0:?}");
    assert_eq!(c.conntrack_len(0), 0, "node 0 keeps no state for the flows");
}

/// Dropping a cluster (with both agents running) removes every namespace it made and
/// both nodes' pin folders.
#[test]
fn dropping_a_cluster_leaves_no_namespace_and_no_pin() {
    let c = Cluster::new(&["backend-1a"]);
    let prefix = c.sb.prefix.clone();
    let pin_dirs: Vec<_> = c.sb.nodes.iter().map(|n| n.pin_dir.clone()).collect();
    assert!(pin_dirs.iter().all(|d| d.join("LB_CONNTRACK").exists()));
    assert!(!leftovers(&prefix).is_empty());
    drop(c);
    assert_eq!(leftovers(&prefix), BTreeSet::new());
    for d in &pin_dirs {
        assert!(!d.exists(), "{} is still there", d.display());
    }
}

/// Namespaces and bpffs entries of the sandbox `prefix`: named `prefix` or `prefix-...`.
fn leftovers(prefix: &str) -> BTreeSet<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let netns = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect::<Vec<_>>();
    let pins = std::fs::read_dir(Path::new("/sys/fs/bpf"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect::<Vec<_>>();
    netns
        .into_iter()
        .chain(pins)
        .filter(|n| n == prefix || n.starts_with(&format!("{prefix}-")))
        .collect()
}

/// [sig-network] Services should be able to create a functioning NodePort service, on
/// two nodes, externalTrafficPolicy Cluster: a client outside the cluster reaches node
/// 0's NodePort, TCP and UDP, both families, and the backends on node 1 answer as well
/// as node 0's own; node 0 source-NATs the flows it sends to node 1 (so their replies
/// come back through it, to be translated back: the client only ever sees node 0's
/// address), node 1 translates nothing.
#[test]
fn should_be_able_to_create_a_functioning_node_port_service_with_backends_on_both_nodes() {
    let c = Cluster::new(&["backend-0", "backend-1a", "backend-1b"]);
    let node0 = &c.sb.nodes[0];
    for ip in [node0.ip.to_string(), node0.ip6.to_string()] {
        let seen = c.who_answers_http_at(OUTSIDE, &hostport(&ip, NODE_PORT_HTTP), 40);
        assert_eq!(
            names(&seen),
            ["backend-0", "backend-1a", "backend-1b"],
            "{ip}: {seen:?}\n{}",
            c.logs()
        );
        let seen = c.who_answers_udp_at(OUTSIDE, &hostport(&ip, NODE_PORT_DNS), 40);
        assert_eq!(
            names(&seen),
            ["backend-0", "backend-1a", "backend-1b"],
            "{ip}: {seen:?}"
        );
    }
    // A pod on node 0 reaching its own node's NodePort: the same (source-NATed by the
    // tc program on the pod's veth toward node 1).
    let seen = c.who_answers_http_at(
        "client-0",
        &hostport(&node0.ip.to_string(), NODE_PORT_HTTP),
        30,
    );
    assert_eq!(
        names(&seen),
        ["backend-0", "backend-1a", "backend-1b"],
        "from a pod: {seen:?}"
    );
    let (n0, n1) = (c.counters(0), c.counters(1));
    assert!(n0["new_flow"] >= 160, "node 0: {n0:?}");
    assert_eq!(n0["drop_snat_exhausted"], 0, "node 0: {n0:?}");
    assert_eq!(n1["new_flow"], 0, "node 1 translates nothing: {n1:?}");
    // Node 1 saw node 0's address, not the client's: every reply came back through node
    // 0, reverse-translated there (at least one per request).
    assert!(n0["reverse_translated"] >= 160, "node 0: {n0:?}");
    // After a flow's first packet (tc's), XDP carried its packets both ways, with the
    // MACs of the next hops it learned (the XDP fast path): at least the replies and the
    // requests' later packets of the flows from outside.
    assert!(n0["xdp_sent"] >= 80, "node 0: {n0:?}");
}

/// [sig-network] Services should only target nodes with endpoints (externalTrafficPolicy
/// Local): node 0's NodePort with endpoints only on node 1 answers nothing (dropped, as
/// kube-proxy does, not refused); node 1's NodePort answers from its own pods.
#[test]
fn should_only_target_nodes_with_endpoints_with_external_traffic_policy_local() {
    let c = Cluster::with_policies(
        &["backend-1a", "backend-1b"],
        Policies {
            external: "Local",
            ..CLUSTER
        },
    );
    let (node0, node1) = (&c.sb.nodes[0], &c.sb.nodes[1]);
    for (ip0, ip1) in [
        (node0.ip.to_string(), node1.ip.to_string()),
        (node0.ip6.to_string(), node1.ip6.to_string()),
    ] {
        let seen = c.who_answers_http_at(OUTSIDE, &hostport(&ip1, NODE_PORT_HTTP), 20);
        assert_eq!(
            names(&seen),
            ["backend-1a", "backend-1b"],
            "{ip1}: {seen:?}"
        );
        let to = hostport(&ip0, NODE_PORT_HTTP);
        assert_eq!(
            c.sb.http_get(&c.sb.outside, &format!("http://{to}/")),
            Err(28),
            "{to}: no local endpoint: dropped (curl times out), not refused"
        );
    }
    let n0 = c.counters(0);
    assert!(n0["drop_no_backend"] >= 2, "node 0: {n0:?}");
    assert_eq!(n0["new_flow"], 0, "node 0 sends nothing to node 1: {n0:?}");
}

/// [sig-network] Services should respect internalTrafficPolicy=Local Pod to Pod: with
/// a backend on each node, a pod reaches only its own node's through the ClusterIP, TCP
/// and UDP, both families; a NodePort (externalTrafficPolicy Cluster) still reaches
/// both from outside.
#[test]
fn should_respect_internal_traffic_policy_local_pod_to_pod() {
    let c = Cluster::with_policies(
        &["backend-0", "backend-1a"],
        Policies {
            internal: "Local",
            ..CLUSTER
        },
    );
    for (client, own) in [("client-0", "backend-0"), ("client-1", "backend-1a")] {
        for ip in [WEB, WEB6] {
            let seen = c.who_answers_http(client, ip, 20);
            assert_eq!(names(&seen), [own], "{client} -> {ip}: {seen:?}");
            let seen = c.who_answers_udp(client, ip, 20);
            assert_eq!(names(&seen), [own], "{client} -> {ip} (UDP): {seen:?}");
        }
    }
    let node0 = &c.sb.nodes[0];
    let seen = c.who_answers_http_at(
        OUTSIDE,
        &hostport(&node0.ip.to_string(), NODE_PORT_HTTP),
        30,
    );
    assert_eq!(names(&seen), ["backend-0", "backend-1a"], "{seen:?}");
}
