//! The real `lb agent` binary in a namespace sandbox, fed by the fake API server over the
//! real kube client, with real traffic: what kube-proxy's users do on a node. The fake API
//! server runs inside the node's network namespace (the agent reaches it on 127.0.0.1
//! there, as a hostNetwork pod reaches a local API server). Needs root.
use std::{
    collections::BTreeSet,
    path::Path,
    process::Command,
    sync::mpsc,
    time::{Duration, Instant},
};

use lb_testbench::{
    fake_api::FakeApi,
    sandbox::{enter, Sandbox},
};
use lb_userspace::dataplane::Maps;
use serde_json::{json, Value};

const NODE: &str = "node-1";

/// The fake API server on a runtime whose threads live in `netns`; stopped on drop.
struct ApiInNetns {
    api: Option<FakeApi>,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ApiInNetns {
    fn start(netns_name: &str) -> Self {
        let (tx, rx) = mpsc::channel();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let ns = netns_name.to_string();
        let thread = std::thread::spawn(move || {
            enter(&ns).unwrap();
            // Worker threads are made by this thread, so they are inside the namespace too.
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            let api = rt.block_on(FakeApi::start());
            tx.send(api).unwrap();
            let _ = stop_rx.recv();
            drop(rt);
        });
        let api = rx.recv().expect("the fake API server started");
        Self {
            api: Some(api),
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    fn api(&self) -> &FakeApi {
        self.api.as_ref().unwrap()
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
    let server = ApiInNetns::start(&sb.node);
    let api = server.api();
    api.apply(json!({"kind": "Node", "metadata": {"name": NODE}}));
    api.apply(service("10.96.0.10"));
    api.apply(slice(&[("10.244.0.12", true), ("10.244.0.13", true)]));

    let kubeconfig = sb.path("kubeconfig.yaml");
    api.write_kubeconfig(&kubeconfig);
    let mut cmd = Command::new(lb_testbench::agent::lb_binary().unwrap());
    cmd.args([
        "agent",
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
