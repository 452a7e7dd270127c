//! The control plane through the real agents, as an operator runs them:
//! - `lb agent` against the test API server (`fake_api`) serving N Services and N
//!   EndpointSlices (10 endpoints each) and this node, paginated as the API server
//!   lists: from its first list request to synced maps, its memory once synced and at
//!   peak, and one endpoint's readiness flipped in the API until the maps show it;
//! - `lb run` on the same objects as a JSON file: start to synced, memory, and one
//!   readiness flip written to the file until the maps show it.
//!
//! The agents run in the root network namespace with an interface glob that matches
//! nothing (`lbbench-none-*`) and maps pinned in a folder of their own: nothing is
//! attached anywhere, and everything is removed afterwards.
use std::{
    io::{Read, Write},
    net::{Ipv4Addr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use lb_common::{FrontendKey, PROTO_TCP};
use lb_userspace::{dataplane::Maps, loader::remove_pins, model::Config};
use serde_json::{json, Value};

use super::{
    check_interrupted,
    datapath::rss_mib,
    progress,
    workload::{self, Endpoints, Svc, NAMESPACE},
};
use crate::{fake_api::FakeApi, Error, Result};

pub const NODE: &str = "bench-node";

/// One agent's run.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct AgentRun {
    /// "lb agent (Kubernetes)" or "lb run (JSON file)".
    pub agent: String,
    pub services: usize,
    pub endpoints: usize,
    /// From the agent's start (spawn) to synced maps, seconds.
    pub start_to_synced_secs: Option<f64>,
    /// `lb agent`: from its first list request to synced maps, seconds.
    pub list_to_synced_secs: Option<f64>,
    /// VmRSS once synced, MiB.
    pub rss_synced_mib: Option<f64>,
    /// VmRSS after the readiness changes, MiB.
    pub rss_after_changes_mib: Option<f64>,
    /// VmHWM (peak) at the end, MiB.
    pub peak_mib: Option<f64>,
    /// One readiness change to the maps, milliseconds, each.
    pub change_ms: Vec<f64>,
    pub error: Option<String>,
}

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Removes a pin folder (and kills nothing) on drop.
struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = remove_pins(&self.0);
    }
}

fn err(e: impl std::fmt::Display) -> Error {
    Error::Sandbox(e.to_string())
}

fn map_args(services: usize, endpoints: usize) -> Vec<String> {
    let fe = (services + services / 4).max(1024);
    let be = (endpoints + endpoints / 4).max(4096);
    [
        "--max-frontends",
        &fe.to_string(),
        "--max-backends",
        &be.to_string(),
        "--max-slots",
        &be.to_string(),
        "--max-conntrack",
        "65536",
    ]
    .map(String::from)
    .to_vec()
}

/// The Kubernetes objects of the workload: a Service and an EndpointSlice each.
fn objects(svcs: &[Svc]) -> Vec<Value> {
    let mut out = Vec::with_capacity(svcs.len() * 2 + 1);
    out.push(json!({"kind": "Node", "metadata": {"name": NODE},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.50.1"}]}}));
    for s in svcs {
        out.push(service(s));
        out.push(slice(s, None));
    }
    out
}

fn service(s: &Svc) -> Value {
    json!({"kind": "Service", "metadata": {"name": s.name, "namespace": NAMESPACE},
        "spec": {"type": "ClusterIP", "clusterIP": s.ip.to_string(), "clusterIPs": [s.ip.to_string()],
                 "ports": [{"name": "http", "port": s.port, "protocol": "TCP", "targetPort": 8080}]}})
}

/// The slice of `s`; `not_ready`: that endpoint's `ready` is false.
fn slice(s: &Svc, not_ready: Option<usize>) -> Value {
    let eps: Vec<Value> = s
        .endpoints
        .iter()
        .enumerate()
        .map(|(i, (ip, _))| {
            json!({"addresses": [ip.to_string()], "nodeName": NODE,
                   "conditions": {"ready": Some(i) != not_ready}})
        })
        .collect();
    json!({"kind": "EndpointSlice",
        "metadata": {"name": format!("{}-1", s.name), "namespace": NAMESPACE,
                     "labels": {"kubernetes.io/service-name": s.name}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": s.endpoints[0].1, "protocol": "TCP"}],
        "endpoints": eps})
}

fn frontend_key(s: &Svc) -> FrontendKey {
    FrontendKey {
        addr: lb_userspace::dataplane::plan::map_addr(&s.ip.into()),
        port: s.port.to_be(),
        proto: PROTO_TCP,
        scope: lb_common::SCOPE_OUTSIDE,
    }
}

/// The ready-backend count of a frontend in the pinned maps.
fn ready_count(maps: &Maps, key: &FrontendKey) -> Option<u32> {
    maps.frontends.get(key, 0).ok().map(|f| f.count)
}

/// Polls until `cond` holds (checking for Ctrl-C and the agent's death), every `every`:
/// a poll that costs the agent something (an HTTP request) must be rare, or it slows
/// what it measures.
fn wait(
    what: &str,
    timeout: Duration,
    every: Duration,
    agent: &mut Proc,
    mut cond: impl FnMut() -> bool,
) -> Result<Duration> {
    let t0 = Instant::now();
    loop {
        if cond() {
            return Ok(t0.elapsed());
        }
        check_interrupted()?;
        if let Ok(Some(st)) = agent.0.try_wait() {
            return Err(err(format!(
                "the agent exited ({st}) while waiting for {what}"
            )));
        }
        if t0.elapsed() > timeout {
            return Err(err(format!(
                "timed out after {timeout:?} waiting for {what}"
            )));
        }
        std::thread::sleep(every);
    }
}

/// A map lookup costs the agent nothing: the readiness polls can be tight.
const TIGHT: Duration = Duration::from_micros(100);

/// A plain HTTP/1.0 GET's status code.
fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_whitespace().nth(1)?.parse().ok()
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(err)?
        .local_addr()
        .map_err(err)?
        .port())
}

/// The services under measure: every `stride`-th filler, for `changes` flips.
fn picks(svcs: &[Svc], changes: usize) -> Vec<usize> {
    let fillers = svcs.len().saturating_sub(2).max(1);
    (0..changes).map(|i| (i * 7919) % fillers).collect()
}

/// Flips endpoint 0 of `changes` picked services, one at a time: `change(i, ready)`
/// makes the change to service `i`, whose frontend has `ready` ready backends (10 or
/// 9), and returns when it was made; the time from then until the kernel map shows the
/// other count is one sample. Then the agent's memory.
fn readiness_changes(
    r: &mut AgentRun,
    svcs: &[Svc],
    changes: usize,
    timeout: Duration,
    agent: &mut Proc,
    maps: &Maps,
    mut change: impl FnMut(usize, u32) -> Result<Instant>,
) -> Result<()> {
    for i in picks(svcs, changes) {
        check_interrupted()?;
        let key = frontend_key(&svcs[i]);
        let ready = ready_count(maps, &key).unwrap_or(0);
        let want = if ready == 10 { 9 } else { 10 };
        let t = change(i, ready)?;
        wait(
            "a readiness change in the maps",
            timeout,
            TIGHT,
            agent,
            || ready_count(maps, &key) == Some(want),
        )?;
        r.change_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    if let Some((rss, hwm)) = rss_mib(agent.0.id()) {
        r.rss_after_changes_mib = Some(rss);
        r.peak_mib = Some(hwm);
    }
    Ok(())
}

/// `lb agent` against the test API server.
pub fn k8s_agent(scale: usize, changes: usize) -> AgentRun {
    let mut r = AgentRun {
        agent: "lb agent (Kubernetes)".into(),
        ..Default::default()
    };
    if let Err(e) = k8s_agent_run(scale, changes, &mut r) {
        r.error = Some(e.to_string());
    }
    r
}

fn k8s_agent_run(scale: usize, changes: usize, r: &mut AgentRun) -> Result<()> {
    let svcs = workload::services(
        scale,
        Endpoints::Exactly(10),
        &[Ipv4Addr::new(10, 244, 0, 12)],
        Ipv4Addr::new(10, 244, 0, 15),
    );
    r.services = svcs.len();
    r.endpoints = workload::endpoint_count(&svcs);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(err)?;
    let api = rt.block_on(FakeApi::start());
    api.load(objects(&svcs));
    let work = std::env::temp_dir().join(format!("lbbench-agent-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(err)?;
    let kubeconfig = work.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let pins = Pins(PathBuf::from(format!(
        "/sys/fs/bpf/lbbench-agent-{}",
        std::process::id()
    )));
    let _ = remove_pins(&pins.0);
    let port = free_port()?;
    let lb = crate::agent::lb_binary()?;
    let t0 = Instant::now();
    let child = Command::new(&lb)
        .arg("agent")
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["--node-name", NODE, "--interfaces", "lbbench-none-*"])
        .args(["--cgroup", "none"])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        // kube-proxy's health check on a loopback port of its own, not the host's
        // 0.0.0.0:10256.
        .args([
            "--healthz-bind-address",
            &format!("127.0.0.1:{}", free_port()?),
        ])
        .arg("--pin-dir")
        .arg(&pins.0)
        .args(map_args(r.services, r.endpoints))
        .env(
            "RUST_LOG",
            std::env::var("LBBENCH_AGENT_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(work.join("agent.log")).map_err(err)?)
        .spawn()
        .map_err(err)?;
    let mut agent = Proc(child);
    let pid = agent.0.id();
    // Ready means synced; the API server noted when the first list began.
    wait(
        "/readyz",
        Duration::from_secs(300),
        Duration::from_millis(20),
        &mut agent,
        || http_status(port, "/readyz") == Some(200),
    )?;
    let (synced, start_to_synced) = (Instant::now(), t0.elapsed());
    r.start_to_synced_secs = Some(start_to_synced.as_secs_f64());
    let first_list = [
        crate::fake_api::Res::Services,
        crate::fake_api::Res::EndpointSlices,
    ]
    .into_iter()
    .filter_map(|res| api.listed_at(res))
    .min()
    .ok_or_else(|| err("the agent never listed"))?;
    let ready = synced.duration_since(first_list);
    r.list_to_synced_secs = Some(ready.as_secs_f64());
    r.rss_synced_mib = rss_mib(pid).map(|(rss, _)| rss);
    progress(format!(
        "   lb agent, {} Services: start to synced {:.2} s (first list to synced {:.2} s), RSS {:.0} MiB",
        r.services,
        start_to_synced.as_secs_f64(),
        ready.as_secs_f64(),
        r.rss_synced_mib.unwrap_or(f64::NAN)
    ));
    // Changes are measured once the agent watches (after its lists, the watches open).
    wait(
        "the EndpointSlice watch",
        Duration::from_secs(30),
        Duration::from_millis(5),
        &mut agent,
        || api.watches(crate::fake_api::Res::EndpointSlices) > 0,
    )?;
    let maps = Maps::from_pins(&pins.0)?;
    let timeout = Duration::from_secs(30);
    readiness_changes(r, &svcs, changes, timeout, &mut agent, &maps, |i, ready| {
        // Endpoint 0 goes not ready, or ready again.
        let obj = slice(&svcs[i], (ready == 10).then_some(0));
        let t = Instant::now();
        api.apply(obj);
        Ok(t)
    })?;
    drop(maps);
    drop(agent);
    let _ = std::fs::copy(work.join("agent.log"), "/tmp/lbbench-last-agent.log");
    let _ = std::fs::remove_dir_all(&work);
    drop(api);
    drop(rt);
    Ok(())
}

/// `lb run` on the workload written as one JSON file.
pub fn file_agent(scale: usize, changes: usize) -> AgentRun {
    let mut r = AgentRun {
        agent: "lb run (JSON file)".into(),
        ..Default::default()
    };
    if let Err(e) = file_agent_run(scale, changes, &mut r) {
        r.error = Some(e.to_string());
    }
    r
}

fn write_config(path: &Path, cfg: &Config) -> Result<()> {
    // Written aside, then renamed: the agent never reads a half-written file.
    let tmp = path.with_extension("tmp");
    let f = std::fs::File::create(&tmp).map_err(err)?;
    serde_json::to_writer(std::io::BufWriter::new(f), cfg).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

fn file_agent_run(scale: usize, changes: usize, r: &mut AgentRun) -> Result<()> {
    let svcs = workload::services(
        scale,
        Endpoints::Exactly(10),
        &[Ipv4Addr::new(10, 244, 0, 12)],
        Ipv4Addr::new(10, 244, 0, 15),
    );
    r.services = svcs.len();
    r.endpoints = workload::endpoint_count(&svcs);
    let mut cfg = workload::to_config(&svcs);
    let work = std::env::temp_dir().join(format!("lbbench-run-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(err)?;
    let path = work.join("services.json");
    write_config(&path, &cfg)?;
    let pins = Pins(PathBuf::from(format!(
        "/sys/fs/bpf/lbbench-run-{}",
        std::process::id()
    )));
    let _ = remove_pins(&pins.0);
    let lb = crate::agent::lb_binary()?;
    let t0 = Instant::now();
    let child = Command::new(&lb)
        .arg("run")
        .arg("--config")
        .arg(&path)
        .args(["--interfaces", "lbbench-none-*", "--poll-ms", "20"])
        .args(["--cgroup", "none"])
        .arg("--pin-dir")
        .arg(&pins.0)
        .args(map_args(r.services, r.endpoints))
        .env(
            "RUST_LOG",
            std::env::var("LBBENCH_AGENT_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(work.join("agent.log")).map_err(err)?)
        .spawn()
        .map_err(err)?;
    let mut agent = Proc(child);
    let pid = agent.0.id();
    let probe = &svcs[svcs.len() - 1];
    let key = frontend_key(probe);
    let want_frontends = workload::cluster_ip_frontend_count(&svcs);
    wait(
        "synced maps",
        Duration::from_secs(300),
        Duration::from_millis(20),
        &mut agent,
        || {
            Maps::from_pins(&pins.0)
                .ok()
                .and_then(|m| m.read_state().ok())
                .is_some_and(|st| {
                    st.frontends.len() == want_frontends
                        && st.frontends.get(&key).is_some_and(|f| f.count > 0)
                })
        },
    )?;
    r.start_to_synced_secs = Some(t0.elapsed().as_secs_f64());
    r.rss_synced_mib = rss_mib(pid).map(|(rss, _)| rss);
    progress(format!(
        "   lb run (JSON), {} Services: start to synced {:.2} s, RSS {:.0} MiB",
        r.services,
        t0.elapsed().as_secs_f64(),
        r.rss_synced_mib.unwrap_or(f64::NAN)
    ));
    let maps = Maps::from_pins(&pins.0)?;
    let timeout = Duration::from_secs(60);
    readiness_changes(r, &svcs, changes, timeout, &mut agent, &maps, |i, ready| {
        // Endpoint 0 goes not ready, or ready again; the change is the file's rename.
        cfg.endpoint_slices[i].endpoints[0].conditions.ready = Some(ready != 10);
        write_config(&path, &cfg)?;
        Ok(Instant::now())
    })?;
    drop(maps);
    drop(agent);
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}
