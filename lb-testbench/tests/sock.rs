//! Connect-time balancing end to end: the real `lb run` with its socket programs on a
//! cgroup the test makes (`TestCgroup`, never the machine's root cgroup), and clients
//! run in that cgroup (`lb-testbench sock-client`, which prints what its own socket
//! calls report). Needs root; run one at a time.
use std::{
    collections::BTreeSet,
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use lb_testbench::{
    agent::{lb_binary, spawn_agent, wait_agent_ready},
    cgroup::TestCgroup,
    sandbox::{Sandbox, NODE_IP, NODE_IP6},
};
use lb_userspace::dataplane::{plan::map_addr, Maps};

const WEB: &str = "10.96.0.10";
const WEB6: &str = "fd00:10:96::a";
const BACKENDS: [&str; 3] = ["backend-1", "backend-2", "backend-3"];

static N: AtomicUsize = AtomicUsize::new(0);

fn backend_ip(name: &str) -> &'static str {
    // Sandbox::create gives .11 to the first pod, then .12, .13, ...
    match name {
        "backend-1" => "10.244.0.12",
        "backend-2" => "10.244.0.13",
        "backend-3" => "10.244.0.14",
        other => panic!("{other}"),
    }
}

fn backend_ip6(name: &str) -> &'static str {
    match name {
        "backend-1" => "fd00:10:244::c",
        "backend-2" => "fd00:10:244::d",
        "backend-3" => "fd00:10:244::e",
        other => panic!("{other}"),
    }
}

/// web, dual stack: ClusterIPs WEB and WEB6 and the NodePorts of both node addresses,
/// TCP 80 -> 8080 (30080), UDP 53 -> 5353 (30053), on the `ready` backends (the others
/// listed not ready), one slice per family.
fn config(ready: &[&str]) -> String {
    config_with(ready, "Cluster", &[])
}

/// `config`, with the externalTrafficPolicy `etp`, and the backends of `remote` on
/// another node (node-1: their pods are on this one, but the agent counts them remote).
fn config_with(ready: &[&str], etp: &str, remote: &[&str]) -> String {
    let eps =
        |ip: fn(&str) -> &'static str| -> String {
            BACKENDS
                .iter()
                .map(|b| {
                    format!(
                    "      - {{addresses: [\"{}\"], nodeName: {}, conditions: {{ready: {}}}}}\n",
                    ip(b),
                    if remote.contains(b) { "node-1" } else { "node-0" },
                    ready.contains(b)
                )
                })
                .collect()
        };
    let (v4, v6) = (eps(backend_ip), eps(backend_ip6));
    format!(
        "node: {{name: node-0, addresses: [\"{NODE_IP}\", \"{NODE_IP6}\"]}}
services:
  - name: web
    clusterIPs: [\"{WEB}\", \"{WEB6}\"]
    ipFamilies: [IPv4, IPv6]
    ipFamilyPolicy: RequireDualStack
    type: NodePort
    externalTrafficPolicy: {etp}
    ports:
      - {{name: http, port: 80, targetPort: 8080, nodePort: 30080, protocol: TCP}}
      - {{name: dns, port: 53, targetPort: 5353, nodePort: 30053, protocol: UDP}}
endpointSlices:
  - name: web-v4
    serviceName: web
    ports:
      - {{name: http, port: 8080, protocol: TCP}}
      - {{name: dns, port: 5353, protocol: UDP}}
    endpoints:
{v4}  - name: web-v6
    serviceName: web
    ports:
      - {{name: http, port: 8080, protocol: TCP}}
      - {{name: dns, port: 5353, protocol: UDP}}
    endpoints:
{v6}"
    )
}

/// ClusterIPs and NodePorts of both families, TCP and UDP, and the NodePorts on
/// 127.0.0.1 (TCP and UDP; the socket programs are attached).
const FRONTENDS: usize = 10;
/// With externalTrafficPolicy Local: also the inside views of the 4 NodePorts.
const FRONTENDS_LOCAL: usize = 14;

struct Env {
    // Dropped in order: the sandbox (and with it the agent) before the cgroup.
    sb: Sandbox,
    cg: TestCgroup,
    config: PathBuf,
    agent: u32,
    /// The frontends the agent writes.
    frontends: usize,
    /// The pod interfaces the agent attaches to at start (none with `--pods-in-cgroup`:
    /// connect-time balancing covers every pod flow).
    pod_links: usize,
}

impl Env {
    /// Two client pods and three backends (nginx on 8080, a UDP responder on 5353); the
    /// agent's socket programs on a cgroup of this test.
    fn new(ready: &[&str], agent_args: &[&str]) -> Env {
        Env::with_config(&config_text(ready), FRONTENDS, agent_args)
    }

    /// As `new`, on the file `text` (of `frontends` frontends).
    fn with_config(text: &str, frontends: usize, agent_args: &[&str]) -> Env {
        let k = N.fetch_add(1, Ordering::SeqCst);
        let prefix = format!("lbs{}{k}", std::process::id() % 100_000);
        let cg = TestCgroup::create(&format!("sock{k}")).unwrap();
        let sb = Sandbox::create(
            &prefix,
            &["client", "backend-1", "backend-2", "backend-3", "other"],
        )
        .unwrap();
        for b in BACKENDS {
            sb.start_nginx(b, 8080).unwrap();
            sb.start_udp_echo(b, 5353).unwrap();
        }
        let config = sb.path("services.yaml");
        std::fs::write(&config, text).unwrap();
        let mut args = vec!["--cgroup", cg.path_str()];
        args.extend_from_slice(agent_args);
        let agent = spawn_agent(&sb, 0, &lb_binary().unwrap(), &config, &args).unwrap();
        let env = Env {
            sb,
            cg,
            config,
            agent,
            frontends,
            pod_links: if agent_args.contains(&"--pods-in-cgroup") {
                0
            } else {
                5
            },
        };
        env.wait_ready();
        env
    }

    fn wait_ready(&self) {
        wait_agent_ready(
            &self.sb,
            0,
            self.frontends,
            self.pod_links,
            Duration::from_secs(30),
        )
        .unwrap();
        wait_until(
            Duration::from_secs(10),
            "the socket programs' links",
            || (self.sock_links() == 8).then_some(()),
        );
    }

    /// 12 calls of `mode` to `to` from the node, in the cgroup: each sees only the
    /// Service (the reply's source, and getpeername() where connected), each answered by
    /// a backend, and at least two backends answer.
    fn spread_from_node(&self, mode: &str, to: &str) {
        let mut answered = BTreeSet::new();
        for _ in 0..12 {
            let line = self
                .client(&self.sb.node, true, mode, to)
                .unwrap_or_else(|e| panic!("{mode} {to} from the node: {e}"));
            let (peer, from, reply) = fields(&line);
            assert_eq!(from, to, "{mode}: {line}");
            if mode != "udp" {
                assert_eq!(peer, to, "{mode}: {line}");
            }
            assert!(BACKENDS.contains(&reply.as_str()), "{mode}: {line}");
            answered.insert(reply);
        }
        assert!(
            answered.len() >= 2,
            "{mode} {to}: 12 connections all went to {answered:?}"
        );
    }

    /// From `netns` (in the test's cgroup or not), WEB over TCP, UDP and connected UDP:
    /// each reply from the Service's address, answered by a backend.
    fn reach_web_each_way(&self, netns: &str, in_cgroup: bool, who: &str) {
        for mode in ["tcp", "udp", "udp-connected"] {
            let to = if mode == "tcp" {
                format!("{WEB}:80")
            } else {
                format!("{WEB}:53")
            };
            let line = self
                .client(netns, in_cgroup, mode, &to)
                .unwrap_or_else(|e| panic!("{mode} from {who}: {e}"));
            let (_, from, reply) = fields(&line);
            assert_eq!(from, to, "{line}");
            assert!(BACKENDS.contains(&reply.as_str()), "{line}");
        }
    }

    /// The socket programs' link pins.
    fn sock_links(&self) -> usize {
        let dir = self.sb.pin_dir.join("sock-links");
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|d| std::fs::read_dir(d.path()).map(|e| e.count()).unwrap_or(0))
            .sum()
    }

    /// The programs attached to the test's cgroup, as bpftool lists them.
    fn cgroup_programs(&self) -> usize {
        let out = Command::new("bpftool")
            .args(["cgroup", "show", self.cg.path_str()])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("lb_sock_"))
            .count()
    }

    /// `lb-testbench sock-client MODE TO` in `netns`, in the test's cgroup or not: its
    /// line (`peer=.. from=.. reply=..`), or its error.
    fn client(&self, netns: &str, in_cgroup: bool, mode: &str, to: &str) -> Result<String, String> {
        let mut cmd = self.client_cmd(netns, in_cgroup, mode, to, &[]);
        let out = cmd.output().map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }

    fn client_cmd(
        &self,
        netns: &str,
        in_cgroup: bool,
        mode: &str,
        to: &str,
        extra: &[&str],
    ) -> Command {
        let bin = testbench_binary();
        let mut args = vec![bin.to_str().unwrap(), "sock-client", mode, to];
        args.extend_from_slice(extra);
        let mut cmd = self.sb.cmd(netns, &args);
        if in_cgroup {
            self.cg.put(&mut cmd);
        }
        cmd
    }

    fn counter(&self, name: &str) -> u64 {
        Maps::from_pins(&self.sb.pin_dir)
            .unwrap()
            .counters()
            .unwrap()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v)
            .unwrap_or_else(|| panic!("no counter {name}"))
    }
}

fn config_text(ready: &[&str]) -> String {
    config(ready)
}

fn testbench_binary() -> PathBuf {
    let lb = lb_binary().unwrap();
    let bin = lb.with_file_name("lb-testbench");
    assert!(bin.is_file(), "{} is not built", bin.display());
    bin
}

fn wait_until<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `peer=P from=F reply=R` -> (P, F, R).
fn fields(line: &str) -> (String, String, String) {
    let get = |key: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in {line:?}"))
            .to_string()
    };
    (get("peer="), get("from="), get("reply="))
}

#[test]
fn a_host_network_client_reaches_a_cluster_ip_and_its_own_node_port_over_tcp_and_udp() {
    let env = Env::new(&BACKENDS, &[]);
    let node = env.sb.node.clone();
    let before = env.counter("sock_connect_translated");
    let mut targets = Vec::new();
    for (ip, tcp, udp) in [
        (WEB.to_string(), 80, 53),
        (NODE_IP.to_string(), 30080, 30053),
        (format!("[{WEB6}]"), 80, 53),
        (format!("[{NODE_IP6}]"), 30080, 30053),
        // An IPv6 socket to the IPv4 ClusterIP, IPv4-mapped: an IPv4 client.
        (format!("[::ffff:{WEB}]"), 80, 53),
    ] {
        targets.push((format!("{ip}:{tcp}"), "tcp"));
        targets.push((format!("{ip}:{udp}"), "udp"));
        targets.push((format!("{ip}:{udp}"), "udp-connected"));
    }
    for (to, mode) in targets {
        env.spread_from_node(mode, &to);
    }
    // 5 x 24 connect()s (TCP and connected UDP), 5 x 12 unconnected sends; every reply
    // and getpeername() reverse-translated.
    assert_eq!(env.counter("sock_connect_translated") - before, 120);
    assert_eq!(env.counter("sock_sendmsg_translated"), 60);
    assert!(env.counter("sock_reverse_translated") >= 60 + 120);
    // Nothing went through the packet path: no conntrack entry for any of it.
    let ct = Maps::from_pins(&env.sb.pin_dir)
        .unwrap()
        .conntrack_entries()
        .unwrap();
    assert!(ct.is_empty(), "conntrack: {ct:?}");
    // The socket programs verify in a few thousand instructions each (printed with
    // --nocapture), far from the kernel's limit.
    for name in lb_common::SOCK_PROG_NAMES {
        let info = aya::programs::ProgramInfo::from_pin(env.sb.pin_dir.join(name)).unwrap();
        let n = info.verified_instruction_count().unwrap();
        eprintln!("{name}: {n} instructions verified");
        assert!(n < 100_000, "{name}: {n}");
    }
    // The same client outside the cgroup is not translated (the programs act there
    // alone): the node has no route to the ClusterIP.
    assert!(
        env.client(&node, false, "tcp", &format!("{WEB}:80"))
            .is_err(),
        "a client outside the cgroup reached the ClusterIP"
    );
}

#[test]
fn a_pod_in_the_cgroup_balances_at_connect_time_while_a_pod_outside_takes_the_tc_path() {
    let env = Env::new(&BACKENDS, &[]);
    let client = env.sb.pod("client").netns.clone();
    let other = env.sb.pod("other").netns.clone();
    let (sock0, new0, tr0, passed0, egress0) = (
        env.counter("sock_connect_translated"),
        env.counter("new_flow"),
        env.counter("translated"),
        env.counter("passed"),
        env.counter("egress_passed"),
    );
    env.reach_web_each_way(&client, true, "the pod in the cgroup");
    // Translated at connect time: no packet of these flows was rewritten by a program.
    assert_eq!(env.counter("sock_connect_translated") - sock0, 2);
    assert_eq!(env.counter("new_flow"), new0, "the tc path saw a new flow");
    assert_eq!(env.counter("translated"), tr0, "a program rewrote a packet");
    // Their packets, both ways, were looked up once, at tc ingress (`passed`), which
    // marked them untracked (skb tc_index): tc egress let them leave without a lookup,
    // so `egress_passed` hardly moved (the node's own ARP and neighbour discovery
    // toward the pods, which no ingress of ours saw, are all it may count).
    let (passed, egress) = (
        env.counter("passed") - passed0,
        env.counter("egress_passed") - egress0,
    );
    eprintln!(
        "connect-time flows: {passed} packets passed at ingress, {egress} looked up at egress"
    );
    assert!(passed >= 10, "passed {passed}");
    assert!(
        egress * 4 < passed,
        "egress looked up {egress} of {passed} packets"
    );
    // The pod outside the cgroup: the tc program's path, as before.
    env.reach_web_each_way(&other, false, "the pod outside the cgroup");
    assert_eq!(env.counter("new_flow") - new0, 3, "the tc path's new flows");
    assert_eq!(env.counter("sock_connect_translated") - sock0, 2);
}

#[test]
fn with_connect_time_balancing_off_a_pod_takes_the_tc_path_and_the_node_still_connects() {
    let env = Env::new(&BACKENDS, &["--connect-time-balancing", "off"]);
    let client = env.sb.pod("client").netns.clone();
    let new0 = env.counter("new_flow");
    let line = env
        .client(&client, true, "tcp", &format!("{WEB}:80"))
        .unwrap();
    assert!(BACKENDS.contains(&fields(&line).2.as_str()), "{line}");
    assert_eq!(
        env.counter("new_flow") - new0,
        1,
        "the pod's flow took the tc path"
    );
    assert!(env.counter("sock_left_to_packet_path") >= 1);
    let node = env.sb.node.clone();
    let sock0 = env.counter("sock_connect_translated");
    let line = env
        .client(&node, true, "tcp", &format!("{WEB}:80"))
        .unwrap();
    assert_eq!(fields(&line).0, format!("{WEB}:80"), "{line}");
    assert_eq!(env.counter("sock_connect_translated") - sock0, 1);
}

#[test]
fn a_connected_udp_socket_whose_backend_leaves_is_destroyed_and_the_client_reconnects() {
    let env = Env::new(&["backend-1"], &[]);
    let node = env.sb.node.clone();
    let log = env.sb.path("udp-client.log");
    let mut cmd = env.client_cmd(
        &node,
        true,
        "udp-connected",
        &format!("{WEB}:53"),
        &["--repeat", "100", "--interval-ms", "100"],
    );
    let f = std::fs::File::create(&log).unwrap();
    cmd.stdout(f);
    let mut child = cmd.spawn().unwrap();
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_until(Duration::from_secs(10), "two answers by backend-1", || {
        (read().matches("reply=backend-1").count() >= 2).then_some(())
    });
    // backend-1 leaves the ready set, backend-2 comes.
    std::fs::write(&env.config, config(&["backend-2"])).unwrap();
    let status = wait_until(Duration::from_secs(15), "the client to stop", || {
        child.try_wait().unwrap()
    });
    assert!(status.success(), "{}", read());
    let out = read();
    let last = out.lines().last().unwrap_or("");
    // Destroyed (udp_abort): a call waiting gets ECONNABORTED; the socket is also
    // disconnected, so a send after it gets EDESTADDRREQ.
    assert!(
        last.starts_with("error=ConnectionAborted") || last.contains("(os error 89)"),
        "the socket was not destroyed: {out}"
    );
    assert!(!out.contains("reply=backend-2"), "{out}");
    assert!(env.counter("sock_destroyed") >= 1);
    // The client's new socket reaches the backend that is ready.
    let line = env
        .client(&node, true, "udp-connected", &format!("{WEB}:53"))
        .unwrap();
    assert_eq!(fields(&line).2, "backend-2", "{line}");
}

#[test]
fn the_socket_programs_stay_attached_across_a_restart_with_pins_kept_and_go_without() {
    let mut env = Env::new(&BACKENDS, &["--keep-pinned"]);
    let node = env.sb.node.clone();
    let web = format!("{WEB}:80");
    assert_eq!(env.cgroup_programs(), 8);
    env.sb.stop(env.agent, libc::SIGTERM).unwrap();
    // No agent: the pinned links keep translating.
    assert_eq!(env.sock_links(), 8);
    let line = env.client(&node, true, "tcp", &web).unwrap();
    assert_eq!(fields(&line).0, web, "{line}");
    // A new agent swaps its programs into the pinned links: still 8 attached, not 16.
    let args = ["--cgroup", env.cg.path_str()];
    env.agent = spawn_agent(&env.sb, 0, &lb_binary().unwrap(), &env.config, &args).unwrap();
    // (The pins of the first make the maps look ready at once: wait for this one.)
    wait_until(
        Duration::from_secs(30),
        "the new agent's socket programs",
        || {
            env.sb
                .log("agent.log")
                .contains("socket programs attached")
                .then_some(())
        },
    );
    env.wait_ready();
    assert_eq!(env.cgroup_programs(), 8);
    let log = env.sb.log("agent.log");
    assert!(!log.contains("stale link pin"), "not swapped in: {log}");
    let line = env.client(&node, true, "tcp", &web).unwrap();
    assert_eq!(fields(&line).0, web, "{line}");
    // Without --keep-pinned, its exit detaches them.
    env.sb.stop(env.agent, libc::SIGTERM).unwrap();
    assert_eq!(env.sock_links(), 0, "{}", env.sb.log("agent.log"));
    wait_until(Duration::from_secs(5), "the programs to detach", || {
        (env.cgroup_programs() == 0).then_some(())
    });
    assert!(env.client(&node, true, "tcp", &web).is_err());
}

#[test]
fn a_host_network_client_of_a_service_without_ready_backends_is_refused_at_once() {
    let env = Env::new(&[], &[]);
    let node = env.sb.node.clone();
    for (mode, to) in [
        ("tcp", format!("{WEB}:80")),
        ("udp", format!("{WEB}:53")),
        ("udp-connected", format!("{WEB}:53")),
        ("tcp", format!("[{WEB6}]:80")),
    ] {
        let t = Instant::now();
        let e = env.client(&node, true, mode, &to).unwrap_err();
        assert!(e.contains("os error 111"), "{mode} {to}: {e}");
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "{mode} {to}: not at once"
        );
    }
    assert_eq!(env.counter("sock_refused_no_backend"), 4);
}

#[test]
fn lb_agent_fed_by_the_api_serves_a_host_network_client_at_connect_time() {
    use lb_testbench::{
        agent::{spawn_k8s_agent, wait_attached},
        fake_api::ApiInNetns,
    };
    use serde_json::json;
    let k = N.fetch_add(1, Ordering::SeqCst);
    let cg = TestCgroup::create(&format!("sockk8s{k}")).unwrap();
    let prefix = format!("lbsk{}{k}", std::process::id() % 100_000);
    let sb = Sandbox::create(&prefix, &["client", "backend-1", "backend-2"]).unwrap();
    for b in ["backend-1", "backend-2"] {
        sb.start_nginx(b, 8080).unwrap();
    }
    let server = ApiInNetns::start(&sb.node, std::net::Ipv4Addr::LOCALHOST.into()).unwrap();
    let api = server.api();
    api.apply(json!({"kind": "Node", "metadata": {"name": sb.nodes[0].name}}));
    api.apply(json!({"kind": "Service", "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"type": "ClusterIP", "clusterIP": WEB, "clusterIPs": [WEB],
                 "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]}}));
    api.apply(json!({"kind": "EndpointSlice",
        "metadata": {"name": "web-x1", "namespace": "shop",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": [backend_ip("backend-1")], "conditions": {"ready": true}},
                      {"addresses": [backend_ip("backend-2")], "conditions": {"ready": true}}]}));
    let kubeconfig = sb.path("kubeconfig.yaml");
    api.write_kubeconfig(&kubeconfig);
    spawn_k8s_agent(
        &sb,
        0,
        &lb_binary().unwrap(),
        &kubeconfig,
        &["--cgroup", cg.path_str()],
    )
    .unwrap();
    wait_attached(&sb, 0, 3, Duration::from_secs(30)).unwrap();
    wait_until(Duration::from_secs(15), "the socket programs", || {
        sb.log("agent.log")
            .contains("socket programs attached")
            .then_some(())
    });
    let bin = testbench_binary();
    let to = format!("{WEB}:80");
    let mut seen = BTreeSet::new();
    for _ in 0..12 {
        let mut cmd = sb.cmd(
            &sb.node,
            &[bin.to_str().unwrap(), "sock-client", "tcp", &to],
        );
        cg.put(&mut cmd);
        let out = cmd.output().unwrap();
        let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(
            out.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            sb.log("agent.log")
        );
        let (peer, _, reply) = fields(&line);
        assert_eq!(peer, to, "{line}");
        seen.insert(reply);
    }
    assert_eq!(
        seen,
        ["backend-1".to_string(), "backend-2".to_string()].into()
    );
    drop(sb);
    drop(cg);
}

#[test]
fn an_agent_started_with_cgroup_none_removes_an_earlier_agents_socket_programs() {
    let mut env = Env::new(&BACKENDS, &["--keep-pinned"]);
    env.sb.stop(env.agent, libc::SIGTERM).unwrap();
    assert_eq!(env.cgroup_programs(), 8);
    std::fs::write(env.sb.path("agent.log"), "").unwrap();
    env.agent = spawn_agent(&env.sb, 0, &lb_binary().unwrap(), &env.config, &[]).unwrap();
    wait_until(Duration::from_secs(30), "the new agent", || {
        env.sb
            .log("agent.log")
            .contains("--cgroup none")
            .then_some(())
    });
    assert_eq!(env.sock_links(), 0);
    wait_until(Duration::from_secs(5), "the programs to detach", || {
        (env.cgroup_programs() == 0).then_some(())
    });
    let node = env.sb.node.clone();
    assert!(env
        .client(&node, true, "tcp", &format!("{WEB}:80"))
        .is_err());
}

/// kube-proxy's rule for externalTrafficPolicy Local (iptables `KUBE-EXT-*`: "route
/// LOCAL traffic to service chain", and the pods' short-circuit): the node itself and
/// its pods reach every endpoint of such a NodePort, only traffic from outside is kept
/// to this node's. backend-1 is this node's; backend-2 and backend-3 are counted on
/// node-1 (their pods are here: the one-node sandbox routes to them).
#[test]
fn an_external_traffic_policy_local_node_port_serves_the_node_and_its_pods_from_every_endpoint_and_outside_from_the_local_one(
) {
    let remote = ["backend-2", "backend-3"];
    let env = Env::with_config(
        &config_with(&BACKENDS, "Local", &remote),
        FRONTENDS_LOCAL,
        &[],
    );
    let node = env.sb.node.clone();
    let pod = env.sb.pod("client").netns.clone();
    for (netns, who) in [(&node, "the node"), (&pod, "a pod in the cgroup")] {
        for (to, mode) in [
            (format!("{NODE_IP}:30080"), "tcp"),
            (format!("{NODE_IP}:30053"), "udp"),
            (format!("[{NODE_IP6}]:30080"), "tcp"),
        ] {
            let mut answered = BTreeSet::new();
            for _ in 0..12 {
                let line = env
                    .client(netns, true, mode, &to)
                    .unwrap_or_else(|e| panic!("{mode} {to} from {who}: {e}"));
                let (_, from, reply) = fields(&line);
                assert_eq!(from, to, "{who}, {mode}: {line}");
                answered.insert(reply);
            }
            assert!(
                answered.iter().any(|r| remote.contains(&r.as_str())),
                "{who}, {mode} {to}: 12 connections all went to {answered:?}, none to another node's endpoint"
            );
        }
    }
    // From outside (the packet path): this node's endpoint only.
    let outside = env.sb.outside.clone();
    for _ in 0..6 {
        let line = env
            .client(&outside, false, "tcp", &format!("{NODE_IP}:30080"))
            .unwrap_or_else(|e| panic!("from outside: {e}"));
        assert_eq!(fields(&line).2, "backend-1", "from outside: {line}");
    }
    // No local endpoint any more (backend-1 not ready): from outside nothing answers
    // (dropped, as kube-proxy), the node still reaches the others.
    std::fs::write(
        &env.config,
        config_with(&["backend-2", "backend-3"], "Local", &remote),
    )
    .unwrap();
    let to = format!("{NODE_IP}:30080");
    wait_until(Duration::from_secs(10), "backend-1 to leave", || {
        env.client(&outside, false, "tcp", &to)
            .is_err()
            .then_some(())
    });
    for _ in 0..6 {
        let line = env
            .client(&node, true, "tcp", &to)
            .unwrap_or_else(|e| panic!("from the node, no local endpoint: {e}"));
        let reply = fields(&line).2;
        assert!(remote.contains(&reply.as_str()), "{line}");
    }
}

/// kube-proxy's iptables mode serves NodePorts on 127.0.0.1 to the node's own processes
/// (`--iptables-localhost-nodeports`, on by default; IPv4 only). A pod's 127.0.0.1 is
/// its own: its connect() there is not translated.
#[test]
fn a_host_network_client_reaches_node_ports_on_127_0_0_1_while_a_pods_127_0_0_1_stays_its_own() {
    let env = Env::new(&BACKENDS, &[]);
    for (to, mode) in [
        ("127.0.0.1:30080", "tcp"),
        ("127.0.0.1:30053", "udp"),
        ("127.0.0.1:30053", "udp-connected"),
    ] {
        env.spread_from_node(mode, to);
    }
    // A pod in the cgroup: its own loopback, where nothing listens.
    let pod = env.sb.pod("client").netns.clone();
    let before = env.counter("sock_connect_translated");
    let e = env
        .client(&pod, true, "tcp", "127.0.0.1:30080")
        .unwrap_err();
    assert!(e.contains("os error 111"), "a pod's 127.0.0.1:30080: {e}");
    assert_eq!(env.counter("sock_connect_translated"), before);
    drop(env);
    // --localhost-nodeports false: not served (the node's own stack refuses it).
    let env = Env::with_config(
        &config_text(&BACKENDS),
        FRONTENDS - 2,
        &["--localhost-nodeports", "false"],
    );
    let e = env
        .client(&env.sb.node, true, "tcp", "127.0.0.1:30080")
        .unwrap_err();
    assert!(e.contains("os error 111"), "with the flag off: {e}");
}

const LB_IP: &str = "203.0.113.20";

/// lb: a LoadBalancer Service (ClusterIP 10.96.0.20, LoadBalancer IP LB_IP, TCP 80 ->
/// 8080, NodePort 30090) on the three backends, with `ranges` as its
/// loadBalancerSourceRanges. 4 frontends: the ClusterIP, the NodePort on NODE_IP and on
/// 127.0.0.1, the LoadBalancer IP.
fn source_ranges_config(ranges: &str) -> String {
    let eps: String = BACKENDS
        .iter()
        .map(|b| {
            format!(
                "      - {{addresses: [\"{}\"], nodeName: node-0}}\n",
                backend_ip(b)
            )
        })
        .collect();
    format!(
        "node: {{name: node-0, addresses: [\"{NODE_IP}\"]}}
services:
  - name: lb
    clusterIP: 10.96.0.20
    type: LoadBalancer
    loadBalancerIPs: [\"{LB_IP}\"]
    loadBalancerSourceRanges: [{ranges}]
    ports:
      - {{name: http, port: 80, targetPort: 8080, nodePort: 30090, protocol: TCP}}
endpointSlices:
  - name: lb-1
    serviceName: lb
    ports:
      - {{name: http, port: 8080, protocol: TCP}}
    endpoints:
{eps}"
    )
}

/// Whether the socket programs' switch `SOCK_CFG_F_NO_POD_PATH` is on.
fn no_pod_path(env: &Env) -> bool {
    let map =
        aya::maps::MapData::from_pin(env.sb.pin_dir.join(lb_common::MAP_SOCK_CONFIG)).unwrap();
    let arr: aya::maps::Array<_, lb_common::SockConfig> =
        aya::maps::Array::try_from(aya::maps::Map::Array(map)).unwrap();
    arr.get(&0, 0).unwrap().flags & lb_common::SOCK_CFG_F_NO_POD_PATH != 0
}

/// The pods' link pins (tc ingress and egress).
fn pod_link_pins(env: &Env) -> usize {
    ["links", "egress-links"]
        .iter()
        .map(|d| {
            std::fs::read_dir(env.sb.pin_dir.join(d))
                .map(|e| e.count())
                .unwrap_or(0)
        })
        .sum()
}

/// With every pod's clients in the socket programs' cgroup (`--pods-in-cgroup`, what
/// the cgroup v2 root is on a node) the pods' veths carry no program: their flows are
/// translated at connect time, and the replies of outside clients' flows where they
/// leave the node. A frontend with loadBalancerSourceRanges brings the programs back
/// (the packet path checks the ranges); once it is gone and its flows have left
/// conntrack, they go again.
#[test]
fn with_every_pod_in_the_cgroup_the_pods_veths_carry_no_program_until_a_frontend_needs_the_packet_path(
) {
    let env = Env::new(
        &BACKENDS,
        &[
            "--pods-in-cgroup",
            "--ct-gc-interval-ms",
            "200",
            "--ct-timeout-tcp-closing-s",
            "1",
            "--ct-timeout-tcp-closed-s",
            "1",
        ],
    );
    let client = env.sb.pod("client").netns.clone();
    assert_eq!(pod_link_pins(&env), 0, "{}", env.sb.log("agent.log"));
    // (A pod's socket to a frontend with source ranges would be refused, not left to a
    // packet path that is not there.)
    assert!(no_pod_path(&env));
    let passed0 = env.counter("passed") + env.counter("egress_passed");
    env.reach_web_each_way(&client, true, "the pod");
    // No program saw their packets (with programs on the veths, tc ingress counts each
    // of these 20-odd packets `passed`).
    let seen = env.counter("passed") + env.counter("egress_passed") - passed0;
    assert!(seen < 5, "{seen} packets went through a program");
    // From outside, the NodePort: XDP translates it on the node's eth0, and tc egress
    // there gives the reply the node's address back; nothing on the pod's veth.
    let body = env
        .sb
        .http_get(&env.sb.outside, &format!("http://{NODE_IP}:30080/"))
        .unwrap_or_else(|e| panic!("NodePort from outside: curl {e}"));
    assert!(BACKENDS.contains(&body.trim()), "{body}");
    assert_eq!(pod_link_pins(&env), 0);

    // The switch at work: the ClusterIP's entry given the source-range flag behind the
    // agent's back (its mirror, so its decision, does not see it). The pod's connect()
    // is refused at once (EPERM), not left to a packet path that is not there.
    let mut maps = Maps::from_pins(&env.sb.pin_dir).unwrap();
    let key = lb_common::FrontendKey {
        addr: map_addr(&WEB.parse().unwrap()),
        port: 80u16.to_be(),
        proto: 6,
        scope: lb_common::SCOPE_OUTSIDE,
    };
    let web = maps.frontends.get(&key, 0).unwrap();
    let ranged = lb_common::Frontend {
        flags: web.flags | lb_common::FRONTEND_F_SOURCE_RANGES,
        ..web
    };
    maps.frontends.insert(key, ranged, 0).unwrap();
    let refused0 = env.counter("sock_refused_source_range");
    let e = env
        .client(&client, true, "tcp", &format!("{WEB}:80"))
        .unwrap_err();
    maps.frontends.insert(key, web, 0).unwrap();
    assert!(e.contains("os error 1)"), "refused with EPERM: {e}");
    assert_eq!(env.counter("sock_refused_source_range") - refused0, 1);

    // A LoadBalancer IP with source ranges (holding the pods' addresses): the pods get
    // the programs, and the pod's connection to it takes the packet path.
    std::fs::write(&env.config, source_ranges_config("10.244.0.0/16")).unwrap();
    wait_until(Duration::from_secs(10), "the pods' programs", || {
        (pod_link_pins(&env) == 10).then_some(())
    });
    // Cleared once the programs are attached.
    wait_until(Duration::from_secs(5), "the switch cleared", || {
        (!no_pod_path(&env)).then_some(())
    });
    let to = format!("{LB_IP}:80");
    let left0 = env.counter("sock_left_to_packet_path");
    let new0 = env.counter("new_flow");
    let line = env
        .client(&client, true, "tcp", &to)
        .unwrap_or_else(|e| panic!("the pod to the LoadBalancer IP: {e}"));
    let (peer, _, reply) = fields(&line);
    assert_eq!(peer, to, "{line}");
    assert!(BACKENDS.contains(&reply.as_str()), "{line}");
    assert_eq!(env.counter("sock_left_to_packet_path") - left0, 1);
    assert_eq!(env.counter("new_flow") - new0, 1);

    // The ranges gone: the programs stay while that flow's entries are in conntrack,
    // then go.
    std::fs::write(&env.config, config_text(&BACKENDS)).unwrap();
    wait_until(Duration::from_secs(20), "the pods' programs to go", || {
        (pod_link_pins(&env) == 0).then_some(())
    });
    assert!(no_pod_path(&env));
    let log = env.sb.log("agent.log");
    assert!(log.contains("why=SourceRanges"), "{log}");
    assert!(log.contains("why=EarlierFlows"), "{log}");
    let line = env
        .client(&client, true, "tcp", &format!("{WEB}:80"))
        .unwrap();
    assert_eq!(fields(&line).0, format!("{WEB}:80"), "{line}");
}

/// An agent that finds the pods' programs an earlier agent attached (here one whose
/// cgroup did not hold every pod) keeps them while a flow that agent translated on the
/// packet path is in conntrack, then removes them.
#[test]
fn the_pods_programs_of_an_earlier_agent_stay_while_its_packet_path_flows_last() {
    let mut env = Env::new(&BACKENDS, &["--keep-pinned"]);
    assert_eq!(pod_link_pins(&env), 10);
    // A pod outside the cgroup: the tc path, a UDP flow in conntrack.
    let other = env.sb.pod("other").netns.clone();
    let line = env
        .client(&other, false, "udp", &format!("{WEB}:53"))
        .unwrap();
    assert!(BACKENDS.contains(&fields(&line).2.as_str()), "{line}");
    env.sb.stop(env.agent, libc::SIGTERM).unwrap();
    // The next agent: every pod in its cgroup, UDP flows idle 3 s expire (answered
    // or not).
    let args = [
        "--cgroup",
        env.cg.path_str(),
        "--pods-in-cgroup",
        "--keep-pinned",
        "--ct-gc-interval-ms",
        "200",
        "--ct-timeout-udp-s",
        "3",
        "--ct-timeout-udp-stream-s",
        "3",
    ];
    env.agent = spawn_agent(&env.sb, 0, &lb_binary().unwrap(), &env.config, &args).unwrap();
    wait_until(Duration::from_secs(30), "the new agent's decision", || {
        env.sb
            .log("agent.log")
            .contains("why=EarlierFlows")
            .then_some(())
    });
    assert_eq!(
        pod_link_pins(&env),
        10,
        "removed under a flow that needs them"
    );
    let t = Instant::now();
    wait_until(Duration::from_secs(20), "the pods' programs to go", || {
        (pod_link_pins(&env) == 0).then_some(())
    });
    eprintln!("removed {:?} after the decision", t.elapsed());
    wait_until(Duration::from_secs(5), "the agent to say so", || {
        env.sb
            .log("agent.log")
            .contains("carry no program")
            .then_some(())
    });
    // The pod in the cgroup still reaches the Service, at connect time.
    let client = env.sb.pod("client").netns.clone();
    let line = env
        .client(&client, true, "tcp", &format!("{WEB}:80"))
        .unwrap();
    assert_eq!(fields(&line).0, format!("{WEB}:80"), "{line}");
}

/// loadBalancerSourceRanges for the node's own connections (kube-proxy checks the
/// source address the packet gets; at connect time the node's address of the family
/// stands for it): served while a range holds the node's address, refused at once
/// (EPERM, as a firewall's drop of a local packet) when none does.
#[test]
fn a_host_network_client_reaches_a_load_balancer_ip_only_while_its_source_ranges_hold_the_nodes_address(
) {
    let env = Env::with_config(&source_ranges_config("192.168.50.0/24"), 4, &[]);
    let node = env.sb.node.clone();
    let to = format!("{LB_IP}:80");
    for _ in 0..6 {
        let line = env
            .client(&node, true, "tcp", &to)
            .unwrap_or_else(|e| panic!("the node's address in range: {e}"));
        let (peer, _, reply) = fields(&line);
        assert_eq!(peer, to, "{line}");
        assert!(BACKENDS.contains(&reply.as_str()), "{line}");
    }
    assert_eq!(env.counter("sock_refused_source_range"), 0);
    // Ranges that hold no address of the node's.
    std::fs::write(&env.config, source_ranges_config("198.51.100.0/24")).unwrap();
    let e = wait_until(Duration::from_secs(10), "the new ranges", || {
        env.client(&node, true, "tcp", &to).err()
    });
    assert!(e.contains("os error 1)"), "refused with EPERM: {e}");
    let t = Instant::now();
    let e = env.client(&node, true, "tcp", &to).unwrap_err();
    assert!(e.contains("os error 1)"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(2), "not at once");
    assert!(env.counter("sock_refused_source_range") >= 2);
    // The NodePort and the ClusterIP stay open to the node (no ranges there).
    let line = env
        .client(&node, true, "tcp", &format!("{NODE_IP}:30090"))
        .unwrap();
    assert!(BACKENDS.contains(&fields(&line).2.as_str()), "{line}");
}
