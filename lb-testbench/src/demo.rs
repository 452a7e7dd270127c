//! `cargo xtask demo`: Service load balancing in a sandbox, in under a minute. A client
//! pod and three nginx backend pods behind veth pairs; the real `lb run` runs on the
//! built-in config; the client sends requests to the ClusterIP, the outside to the
//! NodePort, and we print who answered.
use std::{collections::BTreeMap, time::Duration};

use lb_userspace::show;

use crate::{
    agent::{catch_interrupts, check_interrupted, lb_binary, spawn_agent, wait_agent_ready},
    sandbox::{Sandbox, NODE_IP},
    Error, Result,
};

pub const DEMO_CONFIG: &str = include_str!("demo.yaml");
pub const DEMO_CLUSTER_IP: &str = "10.96.0.10";
pub const DEMO_NODE_PORT: u16 = 30080;

pub fn run_demo(requests: usize) -> Result<()> {
    crate::sandbox::require_tools(&["ip", "nginx", "curl", "ss"])?;
    catch_interrupts();
    let lb = lb_binary()?;
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
    check_interrupted()?;
    let config = sb.path("services.yaml");
    std::fs::write(&config, DEMO_CONFIG).map_err(|e| Error::Sandbox(e.to_string()))?;
    println!(
        "== starting the agent (standalone mode, built-in config: Service demo/web \
         {DEMO_CLUSTER_IP}:80 and NodePort {NODE_IP}:{DEMO_NODE_PORT} -> :8080)"
    );
    let agent = spawn_agent(&sb, 0, &lb, &config, &[])?;
    wait_agent_ready(&sb, 0, 2, 4, Duration::from_secs(30))?;
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
            check_interrupted()?;
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
