//! `lb-testbench vm-load`: the workload of `cargo xtask vm-test`, run inside a VM on
//! another kernel. A sandbox with a client pod and one iperf3 backend pod behind a
//! Service with a ClusterIP and a NodePort; the agent runs on it; iperf3 measures TCP
//! throughput, interleaved, on four paths: from the client pod to the pod IP directly
//! (no load balancer) and to the ClusterIP (the tc program), and from outside the node to
//! the pod IP directly and to the NodePort (the XDP program). The results go to stdout
//! between [`RESULTS_BEGIN`] and [`RESULTS_END`], which the host side picks out of the
//! serial console.
//!
//! One backend only: iperf3 opens a control and a data connection, which must meet the
//! same server.
use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use lb_userspace::dataplane::Maps;

use crate::{
    agent::{lb_binary, spawn_agent},
    bench::stats::median,
    sandbox::{Sandbox, NODE_IP},
    Error, Result,
};

pub const RESULTS_BEGIN: &str = "=== LB-VM-RESULTS-BEGIN ===";
pub const RESULTS_END: &str = "=== LB-VM-RESULTS-END ===";

const CLUSTER_IP: &str = "10.96.0.20";
const PORT: u16 = 5201;
const NODE_PORT: u16 = 30201;

fn config(backend: Ipv4Addr) -> String {
    format!(
        "node: {{addresses: [\"{NODE_IP}\"]}}\n\
         services:\n  - name: iperf\n    namespace: vmtest\n    clusterIP: {CLUSTER_IP}\n    type: NodePort\n    ports:\n      \
         - name: iperf\n        port: {PORT}\n        targetPort: {PORT}\n        nodePort: {NODE_PORT}\n        protocol: TCP\n\
         endpointSlices:\n  - name: iperf-1\n    namespace: vmtest\n    serviceName: iperf\n    ports:\n      \
         - name: iperf\n        port: {PORT}\n        protocol: TCP\n    endpoints:\n      \
         - addresses: [\"{backend}\"]\n        conditions: {{ready: true}}\n"
    )
}

fn err(msg: impl Into<String>) -> Error {
    Error::Sandbox(msg.into())
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// Waits until the agent programmed both frontends and attached to both pods' veths and
/// to the node's external interface. Link pins cannot be counted: on kernels without
/// tcx (< 6.6) the pods' attachments are netlink tc filters, which are not pinned. The
/// agent's log says when it attached.
fn wait_ready(sb: &Sandbox, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let log = sb.log("agent.log");
        let attached = |hook: &str| {
            log.lines()
                .filter(|l| l.contains(" attached") && l.contains(hook))
                .count()
        };
        let attached = (attached("hook=Pod"), attached("hook=External"));
        let frontends = Maps::from_pins(sb.pin_dir())
            .and_then(|m| m.read_state())
            .map(|s| s.frontends.len())
            .unwrap_or(0);
        if frontends == 2 && attached.0 >= 2 && attached.1 >= 1 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(err(format!(
                "the agent did not become ready in {timeout:?} (frontends {frontends}, attached (pods, external) {attached:?}); its log:\n{}",
                sb.log("agent.log")
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One iperf3 run from `client` (a namespace) to `target:port`; returns the received
/// throughput in Gbit/s.
fn iperf3(sb: &Sandbox, client: &str, target: &str, port: u16, seconds: u32) -> Result<f64> {
    let out = sb
        .cmd(
            client,
            &[
                "iperf3",
                "-c",
                target,
                "-p",
                &port.to_string(),
                "-t",
                &seconds.to_string(),
                "--connect-timeout",
                "5000",
                "-J",
            ],
        )
        .output()
        .map_err(|e| err(format!("starting iperf3: {e}")))?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        err(format!(
            "iperf3 to {target}: no JSON ({e}); stderr: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    })?;
    if let Some(e) = json.get("error").and_then(|e| e.as_str()) {
        return Err(err(format!("iperf3 to {target}: {e}")));
    }
    json.pointer("/end/sum_received/bits_per_second")
        .and_then(|v| v.as_f64())
        .map(|bps| bps / 1e9)
        .ok_or_else(|| {
            err(format!(
                "iperf3 to {target}: no end.sum_received in its JSON"
            ))
        })
}

fn list(v: &[f64]) -> String {
    v.iter()
        .map(|x| format!("{x:.2}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn run_vm_load(seconds: u32, repeats: usize) -> Result<()> {
    crate::sandbox::require_tools(&["ip", "iperf3", "ss", "sysctl"])?;
    let release = kernel_release();
    println!("vm-load: kernel {release}");
    let lb = lb_binary()?;
    println!("vm-load: creating the sandbox (node, client pod, backend pod)");
    let sb = Sandbox::create("lbvm", &["client", "backend"])?;
    let backend = sb.pod("backend").clone();
    let client = sb.pod("client").netns.clone();
    sb.start_iperf3("backend", PORT)?;
    let cfg = sb.path("services.yaml");
    std::fs::write(&cfg, config(backend.ip)).map_err(|e| err(e.to_string()))?;
    println!(
        "vm-load: starting the agent: ClusterIP {CLUSTER_IP}:{PORT} and NodePort \
         {NODE_IP}:{NODE_PORT} -> {}:{PORT}",
        backend.ip
    );
    let agent = spawn_agent(&sb, 0, &lb, &cfg, &[])?;
    wait_ready(&sb, Duration::from_secs(60))?;
    let log = sb.log("agent.log");
    let attachment = if log.contains("held=true") {
        "netlink tc filters on the pods' veths (no tcx before 6.6: not pinned, they live \
         with the agent); an XDP link on the node's eth0"
    } else {
        "tcx links on the pods' veths and an XDP link on the node's eth0, all pinned"
    };
    println!("vm-load: agent ready; attached as {attachment}");

    let backend_ip = backend.ip.to_string();
    let outside = sb.outside.clone();
    // (from, to, port, what): each pair is a path without and with the load balancer.
    let paths: [(&str, &str, u16, &str); 4] = [
        (
            &client,
            &backend_ip,
            PORT,
            "client pod -> pod IP, no load balancer",
        ),
        (
            &client,
            CLUSTER_IP,
            PORT,
            "client pod -> ClusterIP, tc program",
        ),
        (
            &outside,
            &backend_ip,
            PORT,
            "outside -> pod IP, no load balancer",
        ),
        (
            &outside,
            NODE_IP,
            NODE_PORT,
            "outside -> NodePort, XDP program",
        ),
    ];
    let mut results: [Vec<f64>; 4] = Default::default();
    for r in 0..repeats {
        // A B, then B A: neither path of a pair always runs first.
        let order: [usize; 4] = if r % 2 == 0 {
            [0, 1, 2, 3]
        } else {
            [1, 0, 3, 2]
        };
        for i in order {
            let (from, addr, port, what) = paths[i];
            let g = iperf3(&sb, from, addr, port, seconds)?;
            println!(
                "vm-load: run {}/{repeats}: {addr}:{port} ({what}): {g:.2} Gbit/s",
                r + 1
            );
            results[i].push(g);
        }
    }
    let counters = Maps::from_pins(sb.pin_dir())?.counters()?;
    let count = |name: &str| {
        counters
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(0, |(_, v)| *v)
    };
    let (new_flows, translated) = (count("new_flow"), count("translated"));
    sb.stop(agent, libc::SIGTERM)?;
    drop(sb);

    let ratio = |lb: usize, direct: usize| {
        let r: Vec<f64> = results[lb]
            .iter()
            .zip(&results[direct])
            .map(|(lb, direct)| lb / direct)
            .collect();
        let (lo, hi) = r
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
                (lo.min(*x), hi.max(*x))
            });
        format!("{:.3} ({lo:.3}-{hi:.3})", median(&r))
    };
    let mut t = String::new();
    let _ = writeln!(t, "guest kernel (uname -r): {release}");
    let _ = writeln!(t, "attachment: {attachment}");
    let _ = writeln!(
        t,
        "iperf3 TCP, one stream, {seconds} s per run, {repeats} runs per path, interleaved"
    );
    let _ = writeln!(t);
    let _ = writeln!(t, "| path | median Gbit/s | runs (Gbit/s) |");
    let _ = writeln!(t, "|---|---|---|");
    for (i, (_, addr, port, what)) in paths.iter().enumerate() {
        let _ = writeln!(
            t,
            "| {what} ({addr}:{port}) | {:.2} | {} |",
            median(&results[i]),
            list(&results[i])
        );
    }
    let _ = writeln!(t);
    let _ = writeln!(
        t,
        "ClusterIP / pod IP from the client pod, median of pair ratios: {}",
        ratio(1, 0)
    );
    let _ = writeln!(
        t,
        "NodePort / pod IP from outside, median of pair ratios: {}",
        ratio(3, 2)
    );
    let _ = writeln!(
        t,
        "datapath counters: {new_flows} new flows, {translated} packets translated (DNAT)"
    );
    println!("{RESULTS_BEGIN}");
    print!("{t}");
    println!("{RESULTS_END}");
    if translated == 0 {
        return Err(err(
            "the ClusterIP runs passed without a translated packet: the dataplane was not in the path",
        ));
    }
    Ok(())
}
