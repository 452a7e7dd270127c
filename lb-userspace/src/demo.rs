//! `lb demo`: Service load balancing in a sandbox, in under a minute. A client pod and
//! three nginx backend pods behind veth pairs; the agent runs in standalone mode on the
//! built-in config; the client sends requests to the ClusterIP and we print who answered.
use std::{
    collections::BTreeMap,
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use crate::{
    dataplane::Maps,
    sandbox::{Sandbox, NODE_IP},
    show, Error, Result,
};

pub const DEMO_CONFIG: &str = include_str!("demo.yaml");
pub const DEMO_CLUSTER_IP: &str = "10.96.0.10";
pub const DEMO_NODE_PORT: u16 = 30080;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        Err(Error::Sandbox("interrupted; cleaning up".into()))
    } else {
        Ok(())
    }
}

/// Starts `lb run` for a sandbox, in its node namespace, on `config`.
pub fn spawn_agent(
    sb: &Sandbox,
    lb: &std::path::Path,
    config: &std::path::Path,
    extra: &[&str],
) -> Result<u32> {
    let mut cmd = Command::new(lb);
    cmd.args([
        "run",
        "--netns",
        &sb.node,
        "--interfaces",
        sb.interface_glob(),
        "--external-interfaces",
        sb.external_interface(),
    ])
    .arg("--config")
    .arg(config)
    .arg("--pin-dir")
    .arg(sb.pin_dir())
    .args(["--poll-ms", "100"])
    // Small maps: the sandbox has a handful of services.
    .args([
        "--max-frontends",
        "1024",
        "--max-backends",
        "4096",
        "--max-slots",
        "4096",
        "--max-conntrack",
        "65536",
    ])
    .args(extra)
    .env(
        "RUST_LOG",
        std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
    );
    sb.spawn(cmd, "agent.log")
}

/// Waits until the agent's pinned maps hold `frontends` frontends and it attached to
/// `links` pod interfaces and to the node's external interface.
pub fn wait_agent_ready(
    sb: &Sandbox,
    frontends: usize,
    links: usize,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        interrupted()?;
        let count = |dir: &str| {
            std::fs::read_dir(sb.pin_dir().join(dir))
                .map(|d| d.count())
                .unwrap_or(0)
        };
        let (n_links, n_xdp) = (count("links"), count("xdp-links"));
        if let Ok(maps) = Maps::from_pins(sb.pin_dir()) {
            if let Ok(st) = maps.read_state() {
                if st.frontends.len() == frontends && n_links >= links && n_xdp >= 1 {
                    return Ok(());
                }
            }
        }
        if Instant::now() > deadline {
            return Err(Error::Sandbox(format!(
                "the agent did not become ready in {timeout:?}; its log:\n{}",
                sb.log("agent.log")
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn run_demo(requests: usize) -> Result<()> {
    crate::sandbox::require_tools(&["ip", "nginx", "curl", "ss"])?;
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as usize);
        libc::signal(libc::SIGTERM, on_signal as *const () as usize);
    }
    let lb = std::env::current_exe().map_err(|e| Error::Sandbox(e.to_string()))?;
    println!(
        "== creating the sandbox: a node, a client pod, three backend pods and the outside (network namespaces)"
    );
    let sb = Sandbox::create("lbdemo", &["client", "backend-1", "backend-2", "backend-3"])?;
    for p in &sb.pods {
        println!(
            "   pod {:<10} {:<12} netns {:<20} veth {}",
            p.name, p.ip, p.netns, p.host_if
        );
    }
    for b in ["backend-1", "backend-2", "backend-3"] {
        sb.start_nginx(b, 8080)?;
    }
    interrupted()?;
    let config = sb.path("services.yaml");
    std::fs::write(&config, DEMO_CONFIG).map_err(|e| Error::Sandbox(e.to_string()))?;
    println!(
        "== starting the agent (standalone mode, built-in config: Service demo/web \
         {DEMO_CLUSTER_IP}:80 and NodePort {NODE_IP}:{DEMO_NODE_PORT} -> :8080)"
    );
    let agent = spawn_agent(&sb, &lb, &config, &[])?;
    wait_agent_ready(&sb, 2, 4, Duration::from_secs(30))?;
    print!("{}", show::render(sb.pin_dir(), show::What::Services)?);

    let mut all_counts: BTreeMap<String, usize> = BTreeMap::new();
    let client = sb.pod("client").netns.clone();
    let paths = [
        (
            "the client pod",
            client.as_str(),
            format!("http://{DEMO_CLUSTER_IP}/"),
        ),
        (
            "outside the node",
            sb.outside.as_str(),
            format!("http://{NODE_IP}:{DEMO_NODE_PORT}/"),
        ),
    ];
    for (from, netns, url) in &paths {
        println!("== {requests} requests from {from} to {url} (a new connection each)");
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for i in 1..=requests {
            interrupted()?;
            let who = sb
                .http_get(netns, url)
                .unwrap_or_else(|code| format!("FAILED (curl exit {code})"));
            println!("   request {i:>2}: answered by {who}");
            *counts.entry(who).or_default() += 1;
        }
        println!("== answers per backend");
        for (who, n) in &counts {
            println!("   {who:<12} {n:>3} {}", "#".repeat(*n));
            *all_counts.entry(who.clone()).or_default() += n;
        }
    }
    let counts = all_counts;
    print!("{}", show::render(sb.pin_dir(), show::What::Counters)?);
    println!("== stopping the agent and removing the sandbox");
    sb.stop(agent, libc::SIGTERM)?;
    drop(sb);
    let failed = counts.keys().filter(|k| k.starts_with("FAILED")).count();
    if failed > 0 || counts.len() < 3 {
        return Err(Error::Sandbox(format!(
            "the demo did not see all three backends answer: {counts:?}"
        )));
    }
    println!(
        "done: every backend answered; all requests went through the ClusterIP or the NodePort"
    );
    Ok(())
}
