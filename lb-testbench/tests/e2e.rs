//! End-to-end: a node and pods as network namespaces, the real `lb run` agent, and real
//! programs (curl, nginx, iperf3, and a UDP responder in each pod) sending TCP and UDP
//! through a ClusterIP. We assert what the clients actually received. Needs root; run
//! one at a time.
use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    path::PathBuf,
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use lb_testbench::{
    agent::{lb_binary, spawn_agent, spawn_agent_on, wait_agent_ready},
    sandbox::{hostport, run_in, Sandbox},
};
use lb_userspace::dataplane::Maps;
const WEB: &str = "10.96.0.10";
const IPERF: &str = "10.96.0.20";
const EMPTY: &str = "10.96.0.30";
const BACKENDS: [&str; 3] = ["backend-1", "backend-2", "backend-3"];

static N: AtomicUsize = AtomicUsize::new(0);

fn backend_ip(name: &str) -> String {
    // Sandbox::create gives .11 to the first pod (client), then .12, .13, .14.
    match name {
        "backend-1" => "10.244.0.12",
        "backend-2" => "10.244.0.13",
        "backend-3" => "10.244.0.14",
        other => panic!("{other}"),
    }
    .to_string()
}

/// web (TCP 80 -> 8080, UDP 53 -> 5353) on the given backends with readiness;
/// iperf (5201) on `iperf` backends; empty (80/TCP, 53/UDP) with no endpoints.
fn config(web: &[(&str, bool)], iperf: &[&str]) -> String {
    let eps = |list: Vec<(String, bool)>| -> String {
        list.iter()
            .map(|(a, r)| {
                format!("      - addresses: [\"{a}\"]\n        conditions: {{ready: {r}}}\n")
            })
            .collect()
    };
    let web_eps = eps(web.iter().map(|(n, r)| (backend_ip(n), *r)).collect());
    let iperf_eps = eps(iperf.iter().map(|n| (backend_ip(n), true)).collect());
    format!(
        "services:
  - name: web
    clusterIP: {WEB}
    ports:
      - {{name: http, port: 80, targetPort: 8080, protocol: TCP}}
      - {{name: dns, port: 53, targetPort: 5353, protocol: UDP}}
  - name: iperf
    clusterIP: {IPERF}
    ports:
      - {{name: iperf, port: 5201, protocol: TCP}}
  - name: empty
    clusterIP: {EMPTY}
    ports:
      - {{name: http, port: 80, protocol: TCP}}
      - {{name: dns, port: 53, protocol: UDP}}
endpointSlices:
  - name: web-1
    serviceName: web
    ports:
      - {{name: http, port: 8080, protocol: TCP}}
      - {{name: dns, port: 5353, protocol: UDP}}
    endpoints:
{web_eps}  - name: iperf-1
    serviceName: iperf
    ports:
      - {{name: iperf, port: 5201, protocol: TCP}}
    endpoints:
{iperf_eps}"
    )
}

const FRONTENDS: usize = 5;

struct Env {
    sb: Sandbox,
    config: PathBuf,
    agent: u32,
}

impl Env {
    /// A client and three backends running nginx (8080), a UDP responder (5353) and
    /// iperf3 (5201); the agent runs on `cfg`.
    fn new(cfg: &str, agent_args: &[&str]) -> Env {
        Self::with_frontends(cfg, agent_args, FRONTENDS)
    }

    /// `new`, for a config with `frontends` frontends.
    fn with_frontends(cfg: &str, agent_args: &[&str], frontends: usize) -> Env {
        let prefix = format!(
            "lbt{}{}",
            std::process::id() % 100_000,
            N.fetch_add(1, Ordering::SeqCst)
        );
        let sb =
            Sandbox::create(&prefix, &["client", "backend-1", "backend-2", "backend-3"]).unwrap();
        for b in BACKENDS {
            sb.start_nginx(b, 8080).unwrap();
            sb.start_udp_echo(b, 5353).unwrap();
            sb.start_iperf3(b, 5201).unwrap();
        }
        let config = sb.path("services.yaml");
        std::fs::write(&config, cfg).unwrap();
        let agent = spawn_agent(&sb, 0, &lb_binary().unwrap(), &config, agent_args).unwrap();
        wait_agent_ready(&sb, 0, frontends, 4, Duration::from_secs(30)).unwrap();
        Env { sb, config, agent }
    }

    /// Stops the agent with SIGTERM; it must exit cleanly.
    fn stop_agent(&self) {
        let status = self
            .sb
            .stop(self.agent, libc::SIGTERM)
            .unwrap()
            .expect("agent exited");
        assert!(status.success(), "{}", self.agent_log());
    }

    fn client(&self) -> String {
        self.sb.pod("client").netns.clone()
    }

    /// One HTTP request on a new connection; Ok(body) or Err(curl exit code).
    fn curl(&self, ip: &str) -> Result<String, i32> {
        self.sb.http_get(&self.client(), &format!("http://{ip}/"))
    }

    /// Rewrites the config and waits until the maps show `ready` backends for web:80.
    fn update(&self, cfg: &str, web_ready: u32) {
        std::fs::write(&self.config, cfg).unwrap();
        self.wait_web_ready(web_ready);
    }

    fn wait_web_ready(&self, web_ready: u32) {
        wait_until(
            Duration::from_secs(10),
            "the agent to apply the new file",
            || (self.web_frontend()?.count == web_ready).then_some(()),
        );
    }

    /// web's ClusterIP frontend (port 80) as the pinned maps hold it.
    fn web_frontend(&self) -> Option<lb_common::Frontend> {
        let maps = Maps::from_pins(self.sb.pin_dir()).ok()?;
        let st = maps.read_state().ok()?;
        let key = lb_common::FrontendKey {
            addr: lb_userspace::dataplane::plan::map_addr(&WEB.parse().unwrap()),
            port: 80u16.to_be(),
            proto: lb_common::PROTO_TCP,
            scope: lb_common::SCOPE_OUTSIDE,
        };
        st.frontends.get(&key).copied()
    }

    fn agent_log(&self) -> String {
        self.sb.log("agent.log")
    }

    /// Runs `f` with a socket API inside the client's namespace.
    fn in_client<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        run_in(&self.client(), f).unwrap()
    }

    /// Starts iperf3 in the client against `ip` for `secs` seconds, JSON to a log.
    fn start_iperf3(&self, ip: &str, secs: u32, log: &str) -> u32 {
        self.start_iperf3_from(&self.client(), ip, 5201, secs, log)
    }

    /// Starts iperf3 in `netns` against `ip:port`.
    fn start_iperf3_from(&self, netns: &str, ip: &str, port: u16, secs: u32, log: &str) -> u32 {
        let cmd = self.sb.cmd(
            netns,
            &[
                "iperf3",
                "-c",
                ip,
                "-p",
                &port.to_string(),
                "-t",
                &secs.to_string(),
                "-i",
                "0.5",
                "-J",
            ],
        );
        self.sb.spawn(cmd, log).unwrap()
    }

    /// Waits for an iperf3 client to finish; returns per-interval bits/s and the total.
    fn iperf3_result(&self, pid: u32, log: &str) -> (Vec<f64>, f64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // SAFETY: probing our own child with signal 0.
            let alive = unsafe { libc::kill(pid as i32, 0) } == 0
                && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .unwrap_or_default()
                    .contains(") Z");
            if !alive || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.sb.stop(pid, libc::SIGTERM).unwrap();
        let text = self.sb.log(log);
        let v: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("iperf3 output ({e}): {text}"));
        assert!(v.get("error").is_none(), "iperf3 failed: {}", v["error"]);
        let intervals = v["intervals"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["sum"]["bits_per_second"].as_f64().unwrap())
            .collect();
        (
            intervals,
            v["end"]["sum_received"]["bits_per_second"]
                .as_f64()
                .unwrap(),
        )
    }
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

fn all_ready() -> String {
    config(
        &[
            ("backend-1", true),
            ("backend-2", true),
            ("backend-3", true),
        ],
        &["backend-3"],
    )
}

#[test]
fn http_through_the_cluster_ip_reaches_every_ready_backend() {
    let env = Env::new(&all_ready(), &[]);
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    // P(a backend never picked in 40 hashed connections) = 3 * (2/3)^40 < 1e-6.
    for _ in 0..40 {
        let who = env
            .curl(WEB)
            .unwrap_or_else(|code| panic!("curl failed with exit {code}\n{}", env.agent_log()));
        *seen.entry(who).or_default() += 1;
    }
    assert_eq!(
        seen.keys().cloned().collect::<Vec<_>>(),
        BACKENDS.to_vec(),
        "{seen:?}"
    );
}

#[test]
fn udp_through_the_cluster_ip_is_answered_from_the_service_address() {
    let env = Env::new(&all_ready(), &[]);
    let answers: Vec<(SocketAddr, String)> = env.in_client(|| {
        (0..48)
            .map(|_| {
                let s = UdpSocket::bind("0.0.0.0:0").unwrap();
                s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                s.send_to(b"who?", "10.96.0.10:53").unwrap();
                let mut buf = [0u8; 64];
                let (n, from) = s.recv_from(&mut buf).expect("an answer");
                (from, String::from_utf8_lossy(&buf[..n]).trim().to_string())
            })
            .collect()
    });
    let mut seen = BTreeMap::new();
    for (from, who) in answers {
        assert_eq!(
            from,
            "10.96.0.10:53".parse().unwrap(),
            "the client only ever sees the Service"
        );
        *seen.entry(who).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
}

#[test]
fn a_udp_reply_larger_than_the_mtu_reaches_the_client_whole_from_the_service_address() {
    // 4000 bytes over a 1500-byte veth: the backend's kernel sends three fragments, and
    // the client reassembles them only if all three come from the Service address.
    let env = Env::new(&all_ready(), &[]);
    let answers: Vec<(SocketAddr, Vec<u8>)> = env.in_client(|| {
        (0..12)
            .map(|_| {
                let s = UdpSocket::bind("0.0.0.0:0").unwrap();
                s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                s.send_to(b"size 4000", "10.96.0.10:53").unwrap();
                let mut buf = vec![0u8; 65_536];
                let (n, from) = s.recv_from(&mut buf).expect(
                    "the whole reply (a fragment from the backend's address never completes it)",
                );
                buf.truncate(n);
                (from, buf)
            })
            .collect()
    });
    let mut seen = BTreeMap::new();
    for (from, reply) in answers {
        assert_eq!(from, "10.96.0.10:53".parse().unwrap());
        assert_eq!(reply.len(), 4000);
        let who = String::from_utf8_lossy(&reply);
        let who = who.lines().next().unwrap().to_string();
        assert!(BACKENDS.contains(&who.as_str()), "{who}");
        *seen.entry(who).or_insert(0) += 1;
    }
    eprintln!("answered by {seen:?}");
    // `lb show counters` lists the new counter: two later fragments a reply.
    let out = std::process::Command::new(lb_binary().unwrap())
        .args(["show", "counters", "--pin-dir"])
        .arg(env.sb.pin_dir())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let fragments: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("reverse_translated_fragment "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("lb show counters: {text}"));
    assert!(fragments >= 24, "{text}");
}

fn http_get(s: &mut TcpStream) -> String {
    s.write_all(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n").unwrap();
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("backend-")
        || !String::from_utf8_lossy(&got).ends_with('\n')
    {
        let n = s
            .read(&mut buf)
            .expect("response on the kept-alive connection");
        assert!(n > 0, "connection closed");
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got).to_string();
    text.lines().last().unwrap().trim().to_string()
}

#[test]
fn a_backend_set_not_ready_gets_no_new_connections_but_keeps_established_ones() {
    let env = Env::new(&all_ready(), &[]);
    let mut conn = env.in_client(|| {
        let s =
            TcpStream::connect_timeout(&"10.96.0.10:80".parse().unwrap(), Duration::from_secs(3))
                .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    });
    let first = http_get(&mut conn);
    let ready: Vec<(&str, bool)> = BACKENDS.iter().map(|b| (*b, *b != first)).collect();
    env.update(&config(&ready, &["backend-3"]), 2);
    for _ in 0..20 {
        let who = env.curl(WEB).expect("new connections still work");
        assert_ne!(
            who, first,
            "{first} is not ready and must get no new connection"
        );
    }
    assert_eq!(
        http_get(&mut conn),
        first,
        "the established connection continues"
    );
}

#[test]
fn changing_the_file_does_not_interrupt_a_running_iperf3_stream() {
    let env = Env::new(&all_ready(), &[]);
    let pid = env.start_iperf3(IPERF, 5, "iperf-client.json");
    std::thread::sleep(Duration::from_millis(1500));
    // Remove a web backend and add a second iperf backend (new connections only).
    env.update(
        &config(
            &[("backend-1", true), ("backend-2", true)],
            &["backend-3", "backend-2"],
        ),
        2,
    );
    let (intervals, total) = env.iperf3_result(pid, "iperf-client.json");
    assert!(intervals.len() >= 9, "{intervals:?}");
    assert!(
        intervals.iter().all(|bps| *bps > 0.0),
        "an interval without traffic: {intervals:?}"
    );
    assert!(total > 0.0);
}

#[test]
fn an_agent_restart_with_pins_kept_does_not_interrupt_a_tcp_stream() {
    let env = Env::new(&all_ready(), &["--keep-pinned"]);
    let pid = env.start_iperf3(IPERF, 5, "iperf-client.json");
    std::thread::sleep(Duration::from_millis(1000));
    env.stop_agent();
    assert!(
        env.sb.pin_dir().join("LB_CONNTRACK").exists(),
        "maps stay pinned"
    );
    std::thread::sleep(Duration::from_millis(1000)); // no agent at all for a second
    let again = spawn_agent(
        &env.sb,
        0,
        &lb_binary().unwrap(),
        &env.config,
        &["--keep-pinned"],
    )
    .unwrap();
    let (intervals, _) = env.iperf3_result(pid, "iperf-client.json");
    assert!(
        intervals.iter().all(|bps| *bps > 0.0),
        "an interval without traffic: {intervals:?}"
    );
    wait_until(Duration::from_secs(10), "the new agent to attach", || {
        env.agent_log().contains("replaced=true").then_some(())
    });
    let log = env.agent_log();
    assert!(log.contains("re-using pinned maps"), "{log}");
    assert!(env.curl(WEB).is_ok());
    env.sb.stop(again, libc::SIGTERM).unwrap();
}

/// An agent started again (pins kept) with `--interfaces` no longer naming the client's
/// veth detaches from it: its link pin goes, so the earlier agent's program leaves the
/// veth (the client's packets to a ClusterIP are no longer translated), while the
/// backends' veths, still named, keep theirs.
#[test]
fn an_agent_started_again_with_narrower_globs_detaches_from_what_they_no_longer_name() {
    let env = Env::new(&all_ready(), &["--keep-pinned"]);
    assert!(env.curl(WEB).is_ok());
    let client_if = env.sb.pod("client").host_if.clone();
    let pins = |dir: &str| -> Vec<String> {
        std::fs::read_dir(env.sb.pin_dir().join(dir))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let of_client = |names: Vec<String>| {
        names
            .iter()
            .filter(|n| n.starts_with(&format!("{client_if}@")))
            .count()
    };
    assert_eq!(of_client(pins("links")), 1, "{:?}", pins("links"));
    assert_eq!(of_client(pins("egress-links")), 1);
    env.stop_agent();
    let backends: Vec<String> = BACKENDS
        .iter()
        .map(|b| env.sb.pod(b).host_if.clone())
        .collect();
    let again = spawn_agent_on(
        &env.sb,
        0,
        &lb_binary().unwrap(),
        &env.config,
        &backends.join(","),
        &[],
    )
    .unwrap();
    wait_until(Duration::from_secs(10), "the new agent to run", || {
        env.agent_log()
            .contains("conntrack filter built")
            .then_some(())
    });
    assert_eq!(of_client(pins("links")), 0, "{:?}", pins("links"));
    assert_eq!(of_client(pins("egress-links")), 0);
    assert_eq!(pins("links").len(), BACKENDS.len(), "{:?}", pins("links"));
    assert!(
        env.agent_log()
            .contains("detached: the interface is no longer one this agent attaches to"),
        "{}",
        env.agent_log()
    );
    assert!(
        env.curl(WEB).is_err(),
        "the client's veth has no program any more"
    );
    env.sb.stop(again, libc::SIGTERM).unwrap();
}

/// The conntrack entries of the flows to `ip:port` (their forward entries), with when
/// each was made: a table flushed or rewritten behind the flows would give them new ones.
fn flows_to(env: &Env, ip: &str, port: u16) -> BTreeMap<(SocketAddr, u32), u64> {
    let maps = Maps::from_pins(env.sb.pin_dir()).unwrap();
    let dst = lb_userspace::dataplane::plan::map_addr(&ip.parse().unwrap());
    maps.conntrack_entries()
        .unwrap()
        .into_iter()
        .filter(|(k, v)| {
            v.dir == lb_common::CT_DIR_FORWARD && k.dst_addr == dst && k.dst_port == port.to_be()
        })
        .map(|(k, v)| {
            let src = lb_userspace::dataplane::plan::ip_addr(&k.src_addr);
            let client = SocketAddr::new(src, u16::from_be(k.src_port));
            ((client, v.backend_id), v.created_ns)
        })
        .collect()
}

/// A datapath counter, from the pinned maps.
fn counter(env: &Env, name: &str) -> u64 {
    let maps = Maps::from_pins(env.sb.pin_dir()).unwrap();
    maps.counters()
        .unwrap()
        .into_iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("no counter {name}"))
        .1
}

/// Issue 11's fault: the agent killed with SIGKILL in the middle of an iperf3 stream (no
/// shutdown at all, and without `--keep-pinned`, which only a clean exit reads) and
/// started again on the same pins. The pinned links keep the programs attached while no
/// agent runs, the new agent re-uses the maps without flushing them and swaps its
/// programs into the links: the stream has no interval without traffic and no reset, and
/// its conntrack entries are the ones made before the kill (a flushed table would have
/// recreated them, with another creation time and `ct_recreated` counted).
#[test]
fn an_agent_killed_with_sigkill_mid_stream_and_started_again_keeps_the_stream() {
    let env = Env::new(&all_ready(), &[]);
    let pid = env.start_iperf3(IPERF, 10, "iperf-client.json");
    // iperf3's control connection and its data stream.
    let before = wait_until(Duration::from_secs(5), "the iperf3 flows", || {
        let f = flows_to(&env, IPERF, 5201);
        (f.len() >= 2).then_some(f)
    });
    let recreated = counter(&env, "ct_recreated");
    std::thread::sleep(Duration::from_millis(2500));
    let status = env
        .sb
        .stop(env.agent, libc::SIGKILL)
        .unwrap()
        .expect("the agent was running");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{}", env.agent_log());
    for pin in [
        "LB_CONNTRACK",
        "lb_tc_pod",
        "links",
        "egress-links",
        "xdp-links",
    ] {
        assert!(env.sb.pin_dir().join(pin).exists(), "{pin} stays pinned");
    }
    let links = std::fs::read_dir(env.sb.pin_dir().join("links"))
        .unwrap()
        .count();
    assert_eq!(links, 4, "the pods' links stay pinned");
    // No agent at all: the pinned links keep the datapath running, new flows too.
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        env.curl(WEB).is_ok(),
        "a new connection with no agent running"
    );
    std::thread::sleep(Duration::from_millis(1000));
    let again = spawn_agent(&env.sb, 0, &lb_binary().unwrap(), &env.config, &[]).unwrap();
    // Two links on each of the 4 pods' veths, three on the node's eth0.
    wait_until(Duration::from_secs(15), "the new agent to attach", || {
        (env.agent_log().matches("replaced=true").count() >= 11).then_some(())
    });
    let log = env.agent_log();
    assert!(log.contains("re-using pinned maps"), "{log}");
    assert!(
        !log.contains("replaced=false"),
        "every link re-adopted: {log}"
    );
    let (intervals, total) = env.iperf3_result(pid, "iperf-client.json");
    assert!(
        intervals.len() >= 19 && intervals.iter().all(|bps| *bps > 0.0),
        "an interval without traffic: {intervals:?}"
    );
    assert!(total > 0.0);
    let after = flows_to(&env, IPERF, 5201);
    for (flow, created) in &before {
        assert_eq!(
            after.get(flow),
            Some(created),
            "the flow {flow:?} keeps its conntrack entry across the kill and restart \
             (before: {before:?}, after: {after:?})"
        );
    }
    assert_eq!(
        counter(&env, "ct_recreated"),
        recreated,
        "no flow lost its conntrack entry"
    );
    assert!(env.curl(WEB).is_ok());
    env.sb.stop(again, libc::SIGTERM).unwrap();
}

#[test]
fn an_upgrade_from_the_previous_map_layout_does_not_interrupt_a_tcp_stream() {
    // The datapath left running (--keep-pinned) with its pins turned into the previous
    // layout's (before Maglev: `lb_testbench::layout1`), as an agent of that version
    // leaves them; the agent of this layout starts on them, migrates the frontends and
    // counters, adopts conntrack and swaps its programs into the links: the stream goes
    // on, and new connections work.
    let env = Env::new(&all_ready(), &["--keep-pinned"]);
    let pid = env.start_iperf3(IPERF, 5, "iperf-client.json");
    std::thread::sleep(Duration::from_millis(1000));
    env.stop_agent();
    let before = lb_testbench::layout1::downgrade(env.sb.pin_dir()).unwrap();
    assert_eq!(before.len(), FRONTENDS);
    let again = spawn_agent(
        &env.sb,
        0,
        &lb_binary().unwrap(),
        &env.config,
        &["--keep-pinned"],
    )
    .unwrap();
    let (intervals, _) = env.iperf3_result(pid, "iperf-client.json");
    assert!(
        intervals.iter().all(|bps| *bps > 0.0),
        "an interval without traffic: {intervals:?}\n{}",
        env.agent_log()
    );
    wait_until(Duration::from_secs(10), "the new agent to attach", || {
        env.agent_log().contains("replaced=true").then_some(())
    });
    let log = env.agent_log();
    assert!(
        log.contains("migrated the pinned maps from layout version 1 to 2"),
        "{log}"
    );
    assert_eq!(
        lb_userspace::upgrade::recorded(env.sb.pin_dir()).unwrap(),
        Some(lb_common::LAYOUT_VERSION)
    );
    let after = lb_testbench::layout1::frontends(env.sb.pin_dir()).unwrap();
    assert_eq!(
        after
            .iter()
            .map(|(k, f)| (*k, f.service_id))
            .collect::<Vec<_>>(),
        before
            .iter()
            .map(|(k, f)| (*k, f.service_id))
            .collect::<Vec<_>>(),
        "every frontend kept with its service id"
    );
    env.wait_web_ready(3);
    assert!(env.curl(WEB).is_ok());
    env.sb.stop(again, libc::SIGTERM).unwrap();
}

#[test]
fn a_service_without_backends_refuses_at_once() {
    let env = Env::new(&all_ready(), &[]);
    let t = Instant::now();
    assert_eq!(env.curl(EMPTY), Err(7), "curl: connection refused");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "refused, not timed out"
    );
    let err = env.in_client(|| {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s.connect("10.96.0.30:53").unwrap();
        s.send(b"anyone?").unwrap();
        let mut buf = [0u8; 16];
        s.recv(&mut buf).unwrap_err()
    });
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
}

#[test]
fn a_pod_created_after_the_agent_started_gets_the_program() {
    let mut env = Env::new(&all_ready(), &[]);
    let late = env.sb.add_pod("late").unwrap();
    wait_until(
        Duration::from_secs(10),
        "the agent to attach to lxc-late",
        || {
            std::fs::read_dir(env.sb.pin_dir().join("links"))
                .ok()?
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("lxc-late@"))
                .then_some(())
        },
    );
    let who = env.sb.http_get(&late.netns, "http://10.96.0.10/");
    let who = who.unwrap_or_else(|code| panic!("curl exit {code}\n{}", env.agent_log()));
    assert!(who.starts_with("backend-"));
}

#[test]
fn a_malformed_file_is_rejected_and_the_running_state_stays() {
    let env = Env::new(&all_ready(), &[]);
    std::fs::write(
        &env.config,
        "services:\n  - name: web\n    clusterIP: 10.96.0.999\n    ports: []\n",
    )
    .unwrap();
    wait_until(
        Duration::from_secs(10),
        "the agent to report the bad file",
        || env.agent_log().contains("line 3").then_some(()),
    );
    assert!(env.agent_log().contains("keeping the running state"));
    env.wait_web_ready(3);
    assert!(env.curl(WEB).is_ok());
}

#[test]
fn exit_without_keep_pinned_detaches_and_unpins_everything() {
    let env = Env::new(&all_ready(), &[]);
    assert!(env.curl(WEB).is_ok());
    env.stop_agent();
    assert!(!env.sb.pin_dir().exists(), "pins removed");
    // The kernel releases a link once its last reference (fd or pin) is gone, which
    // may take an RCU grace period: poll briefly.
    wait_until(
        Duration::from_secs(5),
        "the tc program to be detached",
        || {
            let out = env
                .sb
                .exec(&env.sb.node, &["bpftool", "net", "show"])
                .ok()?;
            (!String::from_utf8_lossy(&out.stdout).contains("lb_tc_pod")).then_some(())
        },
    );
    assert!(
        env.curl(WEB).is_err(),
        "no dataplane: the ClusterIP is not reachable any more"
    );
}

/// Not an assertion on speed (the machine is shared): prints both figures for the
/// record and checks that both paths carry traffic.
#[test]
fn iperf3_through_the_cluster_ip_beside_the_pod_ip() {
    let env = Env::new(&all_ready(), &[]);
    let mut rows = Vec::new();
    for round in 0..2 {
        for (label, ip) in [("pod IP", "10.244.0.14"), ("ClusterIP", IPERF)] {
            let log = format!("iperf-{round}-{label}.json").replace(' ', "-");
            let pid = env.start_iperf3(ip, 3, &log);
            let (_, total) = env.iperf3_result(pid, &log);
            assert!(total > 0.0);
            rows.push(format!("{label:<10} {:>8.2} Gbit/s", total / 1e9));
        }
    }
    eprintln!(
        "iperf3, client pod -> backend-3, 3 s each, interleaved:\n{}",
        rows.join("\n")
    );
}

const NODE_IP: &str = lb_testbench::sandbox::NODE_IP;
const EXTERNAL_IP: &str = "203.0.113.10";
/// An endpoint on another node: nothing answers there, so a request sent to it times out.
const ELSEWHERE: &str = "10.244.9.9";
/// The frontends of `nodeport_config` (and of the files made from it).
const NODEPORT_FRONTENDS: usize = 14;

/// The node is `node-a` at NODE_IP. web: NodePort 30080/TCP and 30053/UDP, external IP
/// EXTERNAL_IP, externalTrafficPolicy Local, the three backends here plus one on `node-b`
/// (which this one-node sandbox has not: `tests/cluster.rs` sends there); iperf:
/// NodePort 30201 on backend-3; far: NodePort 30081 with its only endpoint, on `node-b`,
/// not ready. 10 frontends, and the inside views of web's 4 external ones (what the
/// node's own sockets and its pods' get: every endpoint): `NODEPORT_FRONTENDS`.
fn nodeport_config() -> String {
    let here: String = BACKENDS
        .iter()
        .map(|b| {
            format!(
                "      - {{addresses: [{}], nodeName: node-a}}\n",
                backend_ip(b)
            )
        })
        .collect();
    format!(
        "node: {{name: node-a, addresses: [{NODE_IP}]}}
services:
  - name: web
    clusterIP: {WEB}
    type: NodePort
    externalTrafficPolicy: Local
    externalIPs: [{EXTERNAL_IP}]
    ports:
      - {{name: http, port: 80, nodePort: 30080, protocol: TCP}}
      - {{name: dns, port: 53, nodePort: 30053, protocol: UDP}}
  - name: iperf
    clusterIP: {IPERF}
    type: NodePort
    ports:
      - {{name: iperf, port: 5201, nodePort: 30201, protocol: TCP}}
  - name: far
    clusterIP: {EMPTY}
    type: NodePort
    ports:
      - {{name: http, port: 80, nodePort: 30081, protocol: TCP}}
endpointSlices:
  - name: web-1
    serviceName: web
    ports:
      - {{name: http, port: 8080, protocol: TCP}}
      - {{name: dns, port: 5353, protocol: UDP}}
    endpoints:
{here}      - {{addresses: [{ELSEWHERE}], nodeName: node-b}}
  - name: iperf-1
    serviceName: iperf
    ports:
      - {{name: iperf, port: 5201, protocol: TCP}}
    endpoints:
      - {{addresses: [{}], nodeName: node-a}}
  - name: far-1
    serviceName: far
    ports:
      - {{name: http, port: 8080, protocol: TCP}}
    endpoints:
      - {{addresses: [{ELSEWHERE}], nodeName: node-b, conditions: {{ready: false}}}}
",
        backend_ip("backend-3")
    )
}

#[test]
fn nodeports_and_external_ips_from_outside_reach_only_this_nodes_backends() {
    let env = Env::with_frontends(&nodeport_config(), &[], NODEPORT_FRONTENDS);
    let outside = env.sb.outside.clone();
    let link = env
        .sb
        .exec(&env.sb.node, &["ip", "link", "show", "eth0"])
        .unwrap();
    assert!(
        String::from_utf8_lossy(&link.stdout).contains("xdp"),
        "the XDP program is on the external interface: {}",
        String::from_utf8_lossy(&link.stdout)
    );

    // TCP: every request answered, by each backend of this node, never by the one
    // elsewhere (a request sent there would time out).
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for url in [
        format!("http://{NODE_IP}:30080/"),
        format!("http://{EXTERNAL_IP}/"),
    ] {
        for _ in 0..30 {
            let who = env.sb.http_get(&outside, &url).unwrap_or_else(|code| {
                panic!("curl {url} failed with exit {code}\n{}", env.agent_log())
            });
            *seen.entry(who).or_default() += 1;
        }
    }
    assert_eq!(
        seen.keys().cloned().collect::<Vec<_>>(),
        BACKENDS.to_vec(),
        "{seen:?}"
    );
    // A pod reaches the NodePort too (the reply crosses the node as the backend sent
    // it, and gets the node's address as its source where it leaves, at the client's
    // veth).
    for _ in 0..6 {
        let who = env
            .sb
            .http_get(&env.client(), &format!("http://{NODE_IP}:30080/"))
            .unwrap_or_else(|code| panic!("pod -> NodePort: curl exit {code}"));
        assert!(BACKENDS.contains(&who.as_str()), "{who}");
    }

    // UDP: answered from the NodePort's address.
    let answers: Vec<SocketAddr> = run_in(&outside, || {
        (0..12)
            .map(|_| {
                let s = UdpSocket::bind("0.0.0.0:0").unwrap();
                s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                s.send_to(b"who?", (NODE_IP, 30053)).unwrap();
                let mut buf = [0u8; 64];
                s.recv_from(&mut buf).expect("an answer").1
            })
            .collect()
    })
    .unwrap();
    let nodeport: SocketAddr = format!("{NODE_IP}:30053").parse().unwrap();
    assert!(answers.iter().all(|a| *a == nodeport), "{answers:?}");

    // No ready endpoint anywhere: refused at once by the node's kernel.
    let t = Instant::now();
    assert_eq!(
        env.sb
            .http_get(&outside, &format!("http://{NODE_IP}:30081/")),
        Err(7),
        "connection refused"
    );
    assert!(t.elapsed() < Duration::from_secs(2));

    // A bulk TCP stream through the NodePort (iperf3: full-size segments, both ways).
    let pid = env.start_iperf3_from(&outside, NODE_IP, 30201, 2, "iperf-nodeport.json");
    let (intervals, total) = env.iperf3_result(pid, "iperf-nodeport.json");
    assert!(
        total > 0.0 && intervals.iter().all(|b| *b > 0.0),
        "{intervals:?}"
    );
    eprintln!("iperf3 outside -> NodePort: {:.2} Gbit/s", total / 1e9);

    let maps = Maps::from_pins(env.sb.pin_dir()).unwrap();
    let counters: BTreeMap<&str, u64> = maps.counters().unwrap().into_iter().collect();
    assert!(counters["new_flow"] >= 72, "{counters:?}");
    assert!(counters["passed_no_backend"] >= 1, "{counters:?}");
}

#[test]
fn a_udp_reply_larger_than_the_mtu_reaches_an_outside_client_through_a_nodeport() {
    // Every fragment of the reply gets the node's address as its source where it leaves
    // by the external interface (tc egress), the later ones by the first's note.
    let env = Env::with_frontends(&nodeport_config(), &[], NODEPORT_FRONTENDS);
    let answers: Vec<(SocketAddr, usize)> = run_in(&env.sb.outside.clone(), || {
        (0..6)
            .map(|_| {
                let s = UdpSocket::bind("0.0.0.0:0").unwrap();
                s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                s.send_to(b"size 4000", (NODE_IP, 30053)).unwrap();
                let mut buf = vec![0u8; 65_536];
                let (n, from) = s.recv_from(&mut buf).expect("the whole reply");
                (from, n)
            })
            .collect()
    })
    .unwrap();
    let nodeport: SocketAddr = format!("{NODE_IP}:30053").parse().unwrap();
    assert!(
        answers.iter().all(|a| *a == (nodeport, 4000)),
        "{answers:?}"
    );
}

// ---- Dual stack: IPv6 everywhere IPv4 works (named after kube's dual-stack e2e cases) ----

const WEB6: &str = "fd00:10:96::a";
const IPERF6: &str = "fd00:10:96::14";
const NODE_IP6: &str = lb_testbench::sandbox::NODE_IP6;

/// The backends' IPv6 addresses (the sandbox gives pod n the host part n).
fn backend_ip6(name: &str) -> String {
    match name {
        "backend-1" => "fd00:10:244::c",
        "backend-2" => "fd00:10:244::d",
        "backend-3" => "fd00:10:244::e",
        other => panic!("{other}"),
    }
    .to_string()
}

/// web: a dual-stack NodePort Service (ClusterIPs WEB and WEB6, NodePort 30080/TCP and
/// 30053/UDP on both node addresses) on the three backends, one IPv4 and one IPv6 slice;
/// iperf: dual-stack on backend-3. The node is `node-a`. 8 frontends.
fn dual_stack_config() -> String {
    let eps = |ip: fn(&str) -> String| -> String {
        BACKENDS
            .iter()
            .map(|b| format!("      - {{addresses: [\"{}\"], nodeName: node-a}}\n", ip(b)))
            .collect()
    };
    let (v4, v6) = (eps(backend_ip), eps(backend_ip6));
    format!(
        "node: {{name: node-a, addresses: [\"{NODE_IP}\", \"{NODE_IP6}\"]}}
services:
  - name: web
    clusterIPs: [\"{WEB}\", \"{WEB6}\"]
    ipFamilies: [IPv4, IPv6]
    ipFamilyPolicy: RequireDualStack
    type: NodePort
    ports:
      - {{name: http, port: 80, nodePort: 30080, protocol: TCP}}
      - {{name: dns, port: 53, nodePort: 30053, protocol: UDP}}
  - name: iperf
    clusterIPs: [\"{IPERF6}\", \"{IPERF}\"]
    ports:
      - {{name: iperf, port: 5201, protocol: TCP}}
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
{v6}  - name: iperf-v6
    serviceName: iperf
    ports:
      - {{name: iperf, port: 5201, protocol: TCP}}
    endpoints:
      - {{addresses: [\"{}\"], nodeName: node-a}}
  - name: iperf-v4
    serviceName: iperf
    ports:
      - {{name: iperf, port: 5201, protocol: TCP}}
    endpoints:
      - {{addresses: [\"{}\"], nodeName: node-a}}
",
        backend_ip6("backend-3"),
        backend_ip("backend-3"),
    )
}

/// 2 ClusterIPs x 2 ports + 2 NodePorts x 2 ports (web), 2 ClusterIPs (iperf).
const DUAL_STACK_FRONTENDS: usize = 10;

/// HTTP from `netns` to `url`, `n` times: who answered, how often.
fn who_answers(env: &Env, netns: &str, url: &str, n: usize) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        let who = env
            .sb
            .http_get(netns, url)
            .unwrap_or_else(|code| panic!("curl {url} failed: exit {code}\n{}", env.agent_log()));
        *seen.entry(who).or_insert(0) += 1;
    }
    seen
}

/// UDP datagrams from `netns` to `to`, `n` times: (the source of each answer, who).
fn udp_answers(env: &Env, netns: &str, to: String, n: usize) -> Vec<(SocketAddr, String)> {
    env.sb
        .udp_ask(netns, to.parse().unwrap(), n)
        .unwrap()
        .into_iter()
        .map(|a| a.expect("an answer"))
        .collect()
}

/// [sig-network] [Feature:IPv6DualStack] should function for pod-Service: http
#[test]
fn dual_stack_should_function_for_pod_service_http() {
    let env = Env::with_frontends(&dual_stack_config(), &[], DUAL_STACK_FRONTENDS);
    for ip in [WEB, WEB6] {
        let url = format!("http://{}/", hostport(ip, 80));
        let seen = who_answers(&env, &env.client(), &url, 30);
        assert_eq!(
            seen.keys().cloned().collect::<Vec<_>>(),
            BACKENDS.to_vec(),
            "{url}: {seen:?}"
        );
    }
}

/// [sig-network] [Feature:IPv6DualStack] should function for pod-Service: udp
#[test]
fn dual_stack_should_function_for_pod_service_udp() {
    let env = Env::with_frontends(&dual_stack_config(), &[], DUAL_STACK_FRONTENDS);
    for ip in [WEB, WEB6] {
        let service: SocketAddr = hostport(ip, 53).parse().unwrap();
        let answers = udp_answers(&env, &env.client(), service.to_string(), 36);
        let mut seen = BTreeMap::new();
        for (from, who) in answers {
            assert_eq!(from, service, "the client only ever sees the Service");
            *seen.entry(who).or_insert(0) += 1;
        }
        assert_eq!(seen.len(), 3, "{ip}: {seen:?}");
    }
}

/// [sig-network] [Feature:IPv6DualStack] should function for endpoint-Service (the
/// NodePort from outside the cluster, on the node's IPv6 and IPv4 addresses), http and
/// udp; and a pod reaching the node's IPv6 NodePort (its reply routed by the program).
#[test]
fn dual_stack_node_ports_from_outside_and_from_a_pod_on_both_families() {
    let env = Env::with_frontends(&dual_stack_config(), &[], DUAL_STACK_FRONTENDS);
    let outside = env.sb.outside.clone();
    for ip in [NODE_IP6, NODE_IP] {
        let url = format!("http://{}/", hostport(ip, 30080));
        let seen = who_answers(&env, &outside, &url, 30);
        assert_eq!(
            seen.keys().cloned().collect::<Vec<_>>(),
            BACKENDS.to_vec(),
            "{url}: {seen:?}"
        );
        let node_port: SocketAddr = hostport(ip, 30053).parse().unwrap();
        for (from, _) in udp_answers(&env, &outside, node_port.to_string(), 12) {
            assert_eq!(from, node_port, "answered from the NodePort");
        }
    }
    let seen = who_answers(
        &env,
        &env.client(),
        &format!("http://{}/", hostport(NODE_IP6, 30080)),
        6,
    );
    assert_eq!(seen.values().sum::<usize>(), 6);
}

/// iperf3 over IPv6 through the ClusterIP, beside the pod's IPv6 address (not an
/// assertion on speed: prints both and checks both carry traffic).
#[test]
fn iperf3_over_ipv6_through_the_cluster_ip_beside_the_pod_ip() {
    let env = Env::with_frontends(&dual_stack_config(), &[], DUAL_STACK_FRONTENDS);
    let mut rows = Vec::new();
    for round in 0..2 {
        for (label, ip) in [
            ("pod IP", backend_ip6("backend-3")),
            ("ClusterIP", IPERF6.into()),
        ] {
            let log = format!("iperf6-{round}-{label}.json").replace(' ', "-");
            let pid = env.start_iperf3(&ip, 2, &log);
            let (intervals, total) = env.iperf3_result(pid, &log);
            assert!(total > 0.0, "{label}: no traffic");
            assert!(
                intervals.iter().all(|b| *b > 0.0),
                "{label}: an interval without traffic"
            );
            rows.push(format!("{label:<10} {:>8.2} Gbit/s", total / 1e9));
        }
    }
    eprintln!(
        "iperf3 over IPv6, client pod -> backend-3, 2 s each, interleaved:\n{}",
        rows.join("\n")
    );
}

// ---- sessionAffinity ClientIP ----

/// Waits until web's ClusterIP frontend has the affinity timeout `want` (0: none).
fn wait_affinity(env: &Env, want: u32) {
    wait_until(Duration::from_secs(10), "the affinity in the maps", || {
        (env.web_frontend()?.affinity_timeout_s == want).then_some(())
    });
}

/// [sig-network] Services should have session affinity work for service with type
/// clusterIP, for NodePort service, and should be able to switch session affinity for
/// service with type clusterIP: with ClientIP affinity every request of the client pod
/// (to the ClusterIP) and of the outside (to the NodePort) is answered by one backend;
/// switched off on the live Service, the client's requests spread over the three;
/// switched on again, they stick to one.
#[test]
fn should_have_session_affinity_work_and_switch_for_cluster_ip_and_node_port() {
    // Without web's endpoint on another node (which this one-node sandbox has not).
    let elsewhere = format!("      - {{addresses: [{ELSEWHERE}], nodeName: node-b}}\n");
    let plain = nodeport_config().replace(&elsewhere, "");
    let web = "    type: NodePort\n    externalTrafficPolicy: Local\n";
    assert!(plain.contains(web));
    let sticky = plain.replace(web, &format!("{web}    sessionAffinity: ClientIP\n"));
    let env = Env::with_frontends(&sticky, &[], NODEPORT_FRONTENDS);
    wait_affinity(&env, 10_800);
    let cluster_ip = format!("http://{WEB}/");
    let node_port = format!("http://{NODE_IP}:30080/");
    let seen = who_answers(&env, &env.client(), &cluster_ip, 20);
    assert_eq!(seen.len(), 1, "ClusterIP: {seen:?}");
    let outside = env.sb.outside.clone();
    let seen = who_answers(&env, &outside, &node_port, 20);
    assert_eq!(seen.len(), 1, "NodePort: {seen:?}");

    std::fs::write(&env.config, &plain).unwrap();
    wait_affinity(&env, 0);
    let seen = who_answers(&env, &env.client(), &cluster_ip, 40);
    assert_eq!(seen.len(), 3, "affinity off: {seen:?}");

    std::fs::write(&env.config, &sticky).unwrap();
    wait_affinity(&env, 10_800);
    let seen = who_answers(&env, &env.client(), &cluster_ip, 20);
    assert_eq!(seen.len(), 1, "affinity on again: {seen:?}");
}

/// [sig-network] Services should have session affinity timeout work for service with
/// type clusterIP, and for NodePort service: with a 1 s timeout, back-to-back requests
/// stick to one backend, and requests each sent after the timeout has run out are
/// balanced afresh (three backends: all ten on one by chance has odds of 5e-5).
#[test]
fn should_have_session_affinity_timeout_work_for_cluster_ip_and_node_port() {
    let elsewhere = format!("      - {{addresses: [{ELSEWHERE}], nodeName: node-b}}\n");
    let plain = nodeport_config().replace(&elsewhere, "");
    let web = "    type: NodePort\n    externalTrafficPolicy: Local\n";
    assert!(plain.contains(web));
    let sticky = plain.replace(
        web,
        &format!("{web}    sessionAffinity: ClientIP\n    sessionAffinityTimeoutSeconds: 1\n"),
    );
    let env = Env::with_frontends(&sticky, &[], NODEPORT_FRONTENDS);
    wait_affinity(&env, 1);
    for (netns, url) in [
        (env.client(), format!("http://{WEB}/")),
        (env.sb.outside.clone(), format!("http://{NODE_IP}:30080/")),
    ] {
        let seen = who_answers(&env, &netns, &url, 10);
        assert_eq!(seen.len(), 1, "{url}, within the timeout: {seen:?}");
        let mut after = BTreeMap::new();
        for _ in 0..10 {
            std::thread::sleep(Duration::from_millis(1_300));
            let who = env.sb.http_get(&netns, &url).expect("an answer");
            *after.entry(who).or_insert(0) += 1;
        }
        assert!(after.len() > 1, "{url}, each after the timeout: {after:?}");
    }
}

/// [sig-network] Services should allow pods to hairpin back to themselves through
/// services: a pod that is its Service's only backend reaches itself through the
/// ClusterIP (TCP and UDP), and sees the Service's address as its peer.
#[test]
fn should_allow_pods_to_hairpin_back_to_themselves_through_services() {
    let env = Env::new(&config(&[("backend-1", true)], &[]), &[]);
    let pod = env.sb.pod("backend-1").netns.clone();
    for _ in 0..5 {
        assert_eq!(
            env.sb.http_get(&pod, &format!("http://{WEB}/")),
            Ok("backend-1".to_string()),
            "{}",
            env.agent_log()
        );
    }
    assert_eq!(
        env.sb.http_get(&pod, &format!("http://{WEB}/clientip")),
        Ok(WEB.to_string()),
        "the pod sees the Service's address as its peer"
    );
    let web_dns: SocketAddr = format!("{WEB}:53").parse().unwrap();
    for answer in env.sb.udp_ask(&pod, web_dns, 5).unwrap() {
        let (from, who) = answer.expect("an answer");
        assert_eq!((from, who.as_str()), (web_dns, "backend-1"));
    }
    // Other clients still reach it as before.
    assert_eq!(env.curl(WEB), Ok("backend-1".to_string()));
    let maps = Maps::from_pins(env.sb.pin_dir()).unwrap();
    let counters: BTreeMap<&str, u64> = maps.counters().unwrap().into_iter().collect();
    assert!(counters["new_hairpin"] >= 11, "{counters:?}");
}

/// The LoadBalancer IP of `guarded` (backend-1, this node's), its
/// loadBalancerSourceRanges, and a second address of the outside namespace, outside them.
const GUARDED_LB: &str = "198.51.100.20";
const OUTSIDE_OTHER: &str = "192.168.50.99";

fn guarded_config(ranges: &[&str]) -> String {
    let ranges = if ranges.is_empty() {
        String::new()
    } else {
        format!("    loadBalancerSourceRanges: [{}]\n", ranges.join(", "))
    };
    format!(
        "node: {{name: node-a, addresses: [{NODE_IP}]}}
services:
  - name: guarded
    clusterIP: {WEB}
    type: LoadBalancer
    loadBalancerIPs: [{GUARDED_LB}]
{ranges}    ports:
      - {{name: http, port: 80, nodePort: 30080, protocol: TCP}}
endpointSlices:
  - name: guarded-1
    serviceName: guarded
    ports:
      - {{name: http, port: 8080, protocol: TCP}}
    endpoints:
      - {{addresses: [{}], nodeName: node-a}}
",
        backend_ip("backend-1")
    )
}

/// [sig-network] LoadBalancers should only allow access from service loadbalancer
/// source ranges: from outside, the LoadBalancer IP answers the sources in its ranges
/// only (the others' connections time out: dropped), follows a change of the ranges at
/// once, and the Service's NodePort stays open to all.
#[test]
fn should_only_allow_access_from_service_loadbalancer_source_ranges() {
    let env = Env::with_frontends(&guarded_config(&["192.168.50.2/32"]), &[], 3);
    let outside = env.sb.outside.clone();
    env.sb
        .exec(
            &outside,
            &[
                "ip",
                "addr",
                "add",
                &format!("{OUTSIDE_OTHER}/24"),
                "dev",
                "eth0",
            ],
        )
        .unwrap();
    let get_from = |src: &str, url: &str| -> Result<String, i32> {
        match env
            .sb
            .cmd(
                &outside,
                &["curl", "-s", "--max-time", "2", "--interface", src, url],
            )
            .output()
        {
            Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).trim().into()),
            Ok(o) => Err(o.status.code().unwrap_or(-1)),
            Err(_) => Err(-1),
        }
    };
    let lb_url = format!("http://{GUARDED_LB}/");
    let np_url = format!("http://{NODE_IP}:30080/");
    assert_eq!(
        get_from("192.168.50.2", &lb_url),
        Ok("backend-1".into()),
        "{}",
        env.agent_log()
    );
    assert_eq!(
        get_from(OUTSIDE_OTHER, &lb_url),
        Err(28),
        "dropped: curl times out"
    );
    assert_eq!(
        get_from(OUTSIDE_OTHER, &np_url),
        Ok("backend-1".into()),
        "the NodePort is open"
    );
    let dropped = |env: &Env| -> u64 {
        let maps = Maps::from_pins(env.sb.pin_dir()).unwrap();
        let c: BTreeMap<&str, u64> = maps.counters().unwrap().into_iter().collect();
        c["drop_source_range"]
    };
    assert!(dropped(&env) >= 1);
    // The ranges change: the other address gets in, the first one no longer does.
    std::fs::write(
        &env.config,
        guarded_config(&[&format!("{OUTSIDE_OTHER}/32")]),
    )
    .unwrap();
    wait_until(Duration::from_secs(10), "the new ranges", || {
        (get_from(OUTSIDE_OTHER, &lb_url) == Ok("backend-1".into())).then_some(())
    });
    assert_eq!(get_from("192.168.50.2", &lb_url), Err(28));
    // No ranges: every source.
    std::fs::write(&env.config, guarded_config(&[])).unwrap();
    wait_until(Duration::from_secs(10), "the ranges to go", || {
        (get_from("192.168.50.2", &lb_url) == Ok("backend-1".into())).then_some(())
    });
    assert_eq!(get_from(OUTSIDE_OTHER, &lb_url), Ok("backend-1".into()));
}

// ---- conntrack's lifecycle ----

/// Conntrack entries of the node's maps now.
fn conntrack_len(env: &Env) -> usize {
    Maps::from_pins(env.sb.pin_dir())
        .unwrap()
        .conntrack_entries()
        .unwrap()
        .len()
}

/// Closed connections leave the table: 200 short HTTP connections through the ClusterIP
/// (each closed by FINs both ways) are gone, both entries each, once the closed state's
/// timeout has run out; a connection still open stays. (With LRU eviction only, all 400
/// entries stayed until the table filled.)
#[test]
fn closed_connections_expire_and_open_ones_stay() {
    let env = Env::new(
        &all_ready(),
        &[
            "--ct-gc-interval-ms",
            "300",
            "--ct-timeout-tcp-closed-s",
            "1",
        ],
    );
    let mut open = env.in_client(|| {
        let s =
            TcpStream::connect_timeout(&"10.96.0.10:80".parse().unwrap(), Duration::from_secs(3))
                .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    });
    let first = http_get(&mut open);
    let client = env.client();
    let n = env
        .sb
        .cmd(
            &client,
            &[
                "sh",
                "-c",
                "for i in $(seq 200); do curl -s -o /dev/null --max-time 3 http://10.96.0.10/ || exit 1; done",
            ],
        )
        .status()
        .unwrap();
    assert!(n.success(), "200 requests");
    assert!(
        conntrack_len(&env) >= 2,
        "the open connection's entries at least"
    );
    wait_until(
        Duration::from_secs(10),
        "the closed flows to expire",
        || (conntrack_len(&env) == 2).then_some(()),
    );
    assert_eq!(http_get(&mut open), first, "the open connection goes on");
}

/// kubernetes #48370 / #122740: a UDP client that keeps its source port (a resolver)
/// keeps its conntrack flow; when its backend leaves the ready set, the flow is purged at
/// once, and the next datagram from the same socket reaches a ready backend. (Not-ready
/// backends keep their TCP flows: see
/// a_backend_set_not_ready_gets_no_new_connections_but_keeps_established_ones.)
#[test]
fn udp_flows_to_a_backend_that_leaves_the_ready_set_are_purged_at_once() {
    let env = Env::new(&all_ready(), &[]);
    let sock = env.in_client(|| {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        s.connect("10.96.0.10:53").unwrap();
        s
    });
    // None: no answer within a second. (A datagram in flight while its flow is purged
    // loses its answer: the reply entry is gone when the answer leaves, which then
    // does not come from the Service address. As with kube-proxy's conntrack -D.)
    let ask = |s: &UdpSocket| -> Option<String> {
        s.send(b"who?").unwrap();
        let mut buf = [0u8; 64];
        let n = s.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).trim().to_string())
    };
    let first = ask(&sock).expect("an answer");
    for _ in 0..5 {
        assert_eq!(ask(&sock).as_ref(), Some(&first), "one flow, one backend");
    }
    let ready: Vec<(&str, bool)> = BACKENDS.iter().map(|b| (*b, *b != first)).collect();
    env.update(&config(&ready, &["backend-3"]), 2);
    let t = Instant::now();
    let mut lost = 0;
    let next = loop {
        match ask(&sock) {
            Some(who) if who != first => break who,
            Some(_) => {}
            None => lost += 1,
        }
        if t.elapsed() > Duration::from_secs(5) {
            break first.clone();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_ne!(
        next, first,
        "{first} left the ready set; its UDP flow must go"
    );
    assert!(lost <= 1, "at most the datagram in flight is lost: {lost}");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "purged at once: {:?}",
        t.elapsed()
    );
}

/// The table under pressure, as a new user tried it: `--max-conntrack 2048` (1,024
/// flows) and 3,000 kept-alive HTTP connections through the ClusterIP, each used twice.
/// The LRU evicts the least recently used flows' entries; a client's next packet gets
/// them back on the same backend (counted `ct_recreated`), so no connection is reset,
/// and the operator sees the pressure (the counter, the collector's half-flows).
#[test]
fn a_full_table_evicts_idle_flows_and_their_next_packet_brings_them_back() {
    const CONNS: usize = 3_000;
    // SAFETY: plain setrlimit on this test process (3,000 sockets need more than 1,024
    // descriptors).
    unsafe {
        let lim = libc::rlimit {
            rlim_cur: 16_384,
            rlim_max: 16_384,
        };
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
    let env = Env::new(&all_ready(), &["--max-conntrack", "2048"]);
    let (first, second) = env.in_client(|| {
        let round = |conns: &mut Vec<Option<TcpStream>>| -> (usize, BTreeMap<String, usize>) {
            let mut failed = 0;
            let mut who = BTreeMap::new();
            for c in conns.iter_mut() {
                let Some(s) = c else {
                    failed += 1;
                    continue;
                };
                let ok = s
                    .write_all(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
                    .ok()
                    .and_then(|()| {
                        let mut buf = [0u8; 512];
                        let n = s.read(&mut buf).ok()?;
                        let text = String::from_utf8_lossy(&buf[..n]).to_string();
                        text.starts_with("HTTP/1.1 200")
                            .then(|| text.lines().last().unwrap_or("").trim().to_string())
                    });
                match ok {
                    Some(name) => *who.entry(name).or_insert(0) += 1,
                    None => {
                        failed += 1;
                        *c = None;
                    }
                }
            }
            (failed, who)
        };
        let mut conns: Vec<Option<TcpStream>> = (0..CONNS)
            .map(|_| {
                let s = TcpStream::connect_timeout(
                    &"10.96.0.10:80".parse().unwrap(),
                    Duration::from_secs(3),
                )
                .ok()?;
                s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
                Some(s)
            })
            .collect();
        let first = round(&mut conns);
        let second = round(&mut conns);
        (first, second)
    });
    let maps = Maps::from_pins(env.sb.pin_dir()).unwrap();
    let counters: BTreeMap<&str, u64> = maps.counters().unwrap().into_iter().collect();
    eprintln!(
        "first round: {} failed {:?}; second: {} failed {:?}; counters {counters:?}",
        first.0, first.1, second.0, second.1
    );
    assert_eq!(first.0, 0, "every connection answers once: {first:?}");
    assert_eq!(second.0, 0, "and again, after eviction: {second:?}");
    assert!(
        counters["ct_recreated"] > 0,
        "the pressure is seen: {counters:?}"
    );
}

/// Path MTU discovery through a ClusterIP, both families: the link to backend-3 gets a
/// smaller MTU on its node side (the pod itself keeps 1500): 1280 for IPv6 (its
/// minimum), then 1000 for IPv4 (which takes IPv6 off that link). The node answers the
/// client's full-size segments, after DNAT, with "packet too big" (IPv6) or
/// "fragmentation needed" (IPv4) quoting backend-3. The tc egress program gives that
/// quote the Service back, so the client's stack finds its socket, caches the smaller
/// MTU for the Service address and the upload goes through. Untranslated, the client
/// drops the error (no socket talks to backend-3) and keeps sending segments the node
/// cannot forward: a black hole (checked by hand: 0 bits/s and no cached MTU).
#[test]
fn path_mtu_discovery_through_the_cluster_ip_reaches_the_client() {
    let env = Env::with_frontends(&dual_stack_config(), &[], DUAL_STACK_FRONTENDS);
    let node = env.sb.nodes[0].netns.clone();
    let link = env.sb.pod("backend-3").host_if.clone();
    for (n, (vip, mtu)) in [(IPERF6, "1280"), (IPERF, "1000")].into_iter().enumerate() {
        let out = env
            .sb
            .exec(&node, &["ip", "link", "set", &link, "mtu", mtu])
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let log = format!("pmtu-{n}.json");
        let pid = env.start_iperf3(vip, 2, &log);
        let (_, total) = env.iperf3_result(pid, &log);
        let route = env
            .sb
            .exec(&env.client(), &["ip", "route", "get", vip])
            .unwrap();
        let route = String::from_utf8_lossy(&route.stdout).into_owned();
        let maps = Maps::from_pins(env.sb.pin_dir()).unwrap();
        let counters: BTreeMap<&str, u64> = maps.counters().unwrap().into_iter().collect();
        eprintln!("{vip}: {:.2} Gbit/s; {route}", total / 1e9);
        assert!(
            route.contains(&format!("mtu {mtu}")),
            "{vip}: the client learnt the path MTU toward the Service: {route}"
        );
        assert!(total > 0.0, "{vip}: the upload went through");
        assert!(
            counters["reverse_translated_icmp"] > n as u64,
            "{vip}: counted: {counters:?}"
        );
    }
}

/// A UDP datagram larger than the MTU, both ways, both families, through a ClusterIP
/// from a pod (tc) and a NodePort from outside (XDP): the client's kernel sends it in
/// three fragments; the first makes the flow and leaves a note, the later two get the
/// same backend from it, whose kernel reassembles the request (it only hands whole
/// datagrams to the socket) and answers 4000 bytes, fragmented too, reverse-translated
/// fragment by fragment. Before the forward notes, the first fragment was dropped and
/// no request ever reached a backend.
#[test]
fn a_udp_datagram_larger_than_the_mtu_reaches_one_backend_whole_and_back() {
    let env = Env::with_frontends(&dual_stack_config(), &[], DUAL_STACK_FRONTENDS);
    let (client, outside) = (env.client(), env.sb.outside.clone());
    for (netns, to) in [
        (&client, hostport(WEB, 53)),
        (&client, hostport(WEB6, 53)),
        (&outside, hostport(NODE_IP, 30053)),
        (&outside, hostport(NODE_IP6, 30053)),
    ] {
        let to: SocketAddr = to.parse().unwrap();
        let answers: Vec<(SocketAddr, usize)> = run_in(netns, move || {
            let mut request = b"size 4000".to_vec();
            request.resize(4000, b' ');
            (0..6)
                .map(|_| {
                    let any: SocketAddr = if to.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }
                        .parse()
                        .unwrap();
                    let s = UdpSocket::bind(any).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                    s.send_to(&request, to).unwrap();
                    let mut buf = vec![0u8; 65_536];
                    let (n, from) = s
                        .recv_from(&mut buf)
                        .expect("an answer to the whole request");
                    (from, n)
                })
                .collect()
        })
        .unwrap();
        assert!(
            answers.iter().all(|a| *a == (to, 4000)),
            "{to}: {answers:?}"
        );
    }
    let maps = Maps::from_pins(env.sb.pin_dir()).unwrap();
    let counters: BTreeMap<&str, u64> = maps.counters().unwrap().into_iter().collect();
    assert!(
        counters["translated_fragment"] >= 4 * 6 * 2,
        "two later fragments per request: {counters:?}"
    );
    assert_eq!(counters["drop_fragment"], 0, "{counters:?}");
}

/// The bytes of a map key or value, as bpftool's `hex` arguments.
fn hex_args<T: Copy>(v: &T) -> Vec<String> {
    // SAFETY: `T` is one of lb_common's #[repr(C)] types without implicit padding.
    let bytes = unsafe { std::slice::from_raw_parts(v as *const T as *const u8, size_of::<T>()) };
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn bpftool_map(op: &str, map: &std::path::Path, key: &[String], value: Option<&[String]>) {
    let mut args: Vec<String> = vec!["map".into(), op.into(), "pinned".into()];
    args.push(map.display().to_string());
    args.push("key".into());
    args.push("hex".into());
    args.extend(key.iter().cloned());
    if let Some(v) = value {
        args.push("value".into());
        args.push("hex".into());
        args.extend(v.iter().cloned());
    }
    let out = std::process::Command::new("bpftool")
        .args(&args)
        .output()
        .expect("bpftool");
    assert!(
        out.status.success(),
        "bpftool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Issue 11's faults: map entries changed behind the agent's back (with bpftool) are
/// found by the next drift check (`--resync-secs`) and rewritten, and only they: the
/// ClusterIP whose frontend was deleted serves again, a slot pointed elsewhere names
/// its backend again, a stray frontend goes.
#[test]
fn map_entries_changed_behind_the_agents_back_are_repaired_at_the_next_resync() {
    let env = Env::new(&all_ready(), &["--resync-secs", "1"]);
    assert!(env.curl(WEB).is_ok());
    let pins = env.sb.pin_dir().to_path_buf();
    let key = lb_common::FrontendKey {
        addr: lb_userspace::dataplane::plan::map_addr(&WEB.parse().unwrap()),
        port: 80u16.to_be(),
        proto: lb_common::PROTO_TCP,
        scope: lb_common::SCOPE_OUTSIDE,
    };
    assert!(env.web_frontend().is_some());

    // 1. web's ClusterIP frontend deleted: its requests go nowhere until the repair.
    bpftool_map("delete", &pins.join("LB_FRONTENDS"), &hex_args(&key), None);
    let t0 = Instant::now();
    wait_until(
        Duration::from_secs(10),
        "the frontend to be rewritten",
        || env.web_frontend(),
    );
    eprintln!("frontend rewritten after {:?}", t0.elapsed());
    let web = env.web_frontend().unwrap();
    assert_eq!(web.count, 3);
    assert!(env.curl(WEB).is_ok());
    let before = Maps::from_pins(&pins).unwrap().read_state().unwrap();

    // 2. One of web's slots pointed at a backend id that names nothing, and a stray
    // frontend written.
    let slot = lb_common::SlotKey {
        service_id: web.service_id,
        slot: 1,
    };
    bpftool_map(
        "update",
        &pins.join("LB_SLOTS"),
        &hex_args(&slot),
        Some(&hex_args(&lb_common::Slot { backend_id: 999 })),
    );
    let stray = lb_common::FrontendKey {
        addr: lb_userspace::dataplane::plan::map_addr(&"10.96.0.99".parse().unwrap()),
        ..key
    };
    let stray_value = lb_common::Frontend {
        service_id: 777,
        count: 0,
        flags: 0,
        affinity_timeout_s: 0,
        table_base: 0,
        table_size: 0,
    };
    bpftool_map(
        "update",
        &pins.join("LB_FRONTENDS"),
        &hex_args(&stray),
        Some(&hex_args(&stray_value)),
    );
    // Repaired: the stray is gone, and web's slots and Maglev table name its three
    // backends again (the slot that pointed elsewhere counts as a backend that left, so
    // the last slot may have moved into its place).
    let backends = |st: &lb_userspace::dataplane::plan::MapState| {
        let f = st.frontends.get(&key)?;
        let mut set: Vec<_> = st
            .slot_list(f)
            .iter()
            .map(|id| st.backend(*id).copied())
            .collect();
        set.sort_by_key(|b| b.map(|b| b.addr));
        let table_ok = st.table(f).is_some_and(|cells| {
            cells
                .iter()
                .all(|c| st.slot(f.service_id, c.slot) == Some(c.backend_id))
        });
        table_ok.then_some(set)
    };
    let want = backends(&before).unwrap();
    assert_eq!(want.len(), 3);
    wait_until(Duration::from_secs(10), "the maps to be repaired", || {
        let now = Maps::from_pins(&pins).ok()?.read_state().ok()?;
        (now.frontends.get(&stray).is_none() && backends(&now)? == want).then_some(())
    });
    let log = env.agent_log();
    assert!(
        log.matches("changed behind the agent's back").count() >= 2,
        "{log}"
    );
    assert!(env.curl(WEB).is_ok());
}

/// A running `lb trace` (`-o json`), stopped with SIGINT (as Ctrl-C) on drop.
struct Tracer {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Tracer {
    /// Starts `lb trace` on the sandbox's pins and waits until it traces.
    fn start(env: &Env, args: &[&str]) -> Tracer {
        use std::{io::BufRead, process::Stdio};
        let mut child = std::process::Command::new(lb_binary().unwrap())
            .arg("trace")
            .arg("--pin-dir")
            .arg(env.sb.pin_dir())
            .args(["-o", "json"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
        let mut first = String::new();
        err.read_line(&mut first).unwrap();
        assert!(first.starts_with("tracing"), "lb trace said: {first}");
        let (tx, lines) = std::sync::mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        Tracer { child, lines }
    }

    /// The next line that `keep` accepts, within 5 s.
    fn find(&self, what: &str, keep: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no trace line of {what}"));
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            if keep(&v) {
                return v;
            }
        }
    }

    /// Ctrl-C: it must exit cleanly.
    fn stop(mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let status = self.child.wait().unwrap();
        assert!(status.success(), "lb trace exited with {status}");
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `lb trace` against a running `lb run`: a real request through the ClusterIP shows
/// as a new flow to the backend that answered it, a request to a Service without
/// backends as a refusal; `--service` keeps only its frontend's events; tracing is on
/// while a tracer runs and off once the last one stops (Ctrl-C).
#[test]
fn lb_trace_shows_new_flows_with_their_backend_and_refusals() {
    let env = Env::new(&all_ready(), &[]);
    let pins = env.sb.pin_dir().to_path_buf();
    assert_eq!(lb_userspace::trace::state(&pins).unwrap().enabled, 0);
    let tracer = Tracer::start(&env, &[]);
    assert_eq!(lb_userspace::trace::state(&pins).unwrap().enabled, 1);
    let who = env.curl(WEB).unwrap();
    let flow = tracer.find("the request to web", |v| {
        v["kind"] == "new-flow" && v["frontend"] == "10.96.0.10:80"
    });
    assert_eq!(
        flow["backend"],
        format!("{}:8080", backend_ip(&who)),
        "the backend that answered: {flow}"
    );
    assert_eq!(
        (&flow["reason"], &flow["by"], &flow["hook"], &flow["proto"]),
        (
            &"new_flow".into(),
            &"maglev".into(),
            &"tc".into(),
            &"TCP".into()
        ),
        "{flow}"
    );
    assert!(flow["client"].as_str().unwrap().starts_with("10.244.0.11:"));
    assert_eq!(env.curl(EMPTY), Err(7));
    let refused = tracer.find("the request to empty", |v| v["frontend"] == "10.96.0.30:80");
    assert_eq!(
        (&refused["kind"], &refused["reason"]),
        (&"refused".into(), &"refused_no_backend".into()),
        "{refused}"
    );
    assert!(refused.get("backend").is_none(), "{refused}");
    tracer.stop();
    assert_eq!(lb_userspace::trace::state(&pins).unwrap().enabled, 0);

    // Filtered to the empty Service: web's flows are not printed.
    let tracer = Tracer::start(&env, &["--service", "10.96.0.30"]);
    env.curl(WEB).unwrap();
    assert_eq!(env.curl(EMPTY), Err(7));
    let first = tracer.find("any line", |_| true);
    assert_eq!(first["frontend"], "10.96.0.30:80", "{first}");
    tracer.stop();
}
