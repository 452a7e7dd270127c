//! `cargo xtask demo`: Service load balancing in a sandbox of two nodes, in under a
//! minute. Node 0 has a client pod and two nginx backend pods, node 1 a third backend;
//! the real `lb run` runs on each node on the built-in config; the client sends requests
//! to the ClusterIP, the outside to node 0's NodePort, and we print who answered: the pod
//! on node 1 too, both ways.
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
        "== creating the sandbox: two nodes on one network, a client pod and two backend \
         pods on node-0, a third backend on node-1, and the outside (network namespaces)"
    );
    let sb = Sandbox::cluster(
        "lbdemo",
        &[&["client", "backend-1", "backend-2"], &["backend-3"]],
    )?;
    for n in &sb.nodes {
        println!("   {:<6} {:<14} netns {}", n.name, n.ip, n.netns);
    }
    for p in &sb.pods {
        println!(
            "   pod {:<10} {:<12} on {} netns {:<20} veth {}",
            p.name, p.ip, sb.nodes[p.node].name, p.netns, p.host_if
        );
    }
    for b in ["backend-1", "backend-2", "backend-3"] {
        sb.start_nginx(b, 8080)?;
    }
    check_interrupted()?;
    println!(
        "== starting an agent per node (standalone mode, built-in config: Service demo/web \
         {DEMO_CLUSTER_IP}:80 and NodePort {DEMO_NODE_PORT} -> :8080)"
    );
    let mut agents = Vec::new();
    for (k, node) in sb.nodes.iter().enumerate() {
        let config = sb.path(&format!("services-{}.yaml", node.name));
        std::fs::write(&config, node_config(&node.name, &node.ip.to_string()))
            .map_err(|e| Error::Sandbox(e.to_string()))?;
        agents.push(spawn_agent(&sb, k, &lb, &config, &[])?);
    }
    for (k, node) in sb.nodes.iter().enumerate() {
        let pods = sb.pods.iter().filter(|p| p.node == k).count();
        wait_agent_ready(&sb, k, 2, pods, Duration::from_secs(30))?;
        println!("== {}'s maps", node.name);
        print!(
            "{}",
            show::render(
                &node.pin_dir,
                show::What::Services,
                show::Format::Table,
                &Default::default(),
                None,
            )?
        );
    }

    let mut all_counts: BTreeMap<String, usize> = BTreeMap::new();
    let client = sb.pod("client").netns.clone();
    let paths = [
        (
            "the client pod",
            client.as_str(),
            format!("http://{DEMO_CLUSTER_IP}/"),
        ),
        (
            "outside the cluster (node-0's NodePort)",
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
    println!("== node-0's counters (new_flow: connections it balanced, to node-1's pod too)");
    print!(
        "{}",
        show::render(
            sb.pin_dir(),
            show::What::Counters,
            show::Format::Table,
            &Default::default(),
            None,
        )?
    );
    println!("== stopping the agents and removing the sandbox");
    for agent in agents {
        sb.stop(agent, libc::SIGTERM)?;
    }
    drop(sb);
    let failed = counts.keys().filter(|k| k.starts_with("FAILED")).count();
    if failed > 0 || counts.len() < 3 {
        return Err(Error::Sandbox(format!(
            "the demo did not see all three backends answer: {counts:?}"
        )));
    }
    println!(
        "done: every backend answered, the one on node-1 too; all requests went through the \
         ClusterIP or node-0's NodePort"
    );
    Ok(())
}

/// The built-in config for the node `name` at `address` (the file names node-0).
fn node_config(name: &str, address: &str) -> String {
    let own = "node:\n  name: node-0\n  addresses: [\"192.168.50.1\"]\n";
    assert!(DEMO_CONFIG.contains(own), "demo.yaml names node-0");
    DEMO_CONFIG.replace(
        own,
        &format!("node:\n  name: {name}\n  addresses: [\"{address}\"]\n"),
    )
}
