//! `lb vm-load` (hidden): the workload of `cargo xtask vm-test`, run inside a VM on
//! another kernel. A sandbox with a client pod and one iperf3 backend pod behind a
//! ClusterIP; the agent runs on it; iperf3 measures TCP throughput from the client to the
//! pod IP directly (no load balancer) and to the ClusterIP (through the eBPF dataplane),
//! interleaved. The results go to stdout between [`RESULTS_BEGIN`] and [`RESULTS_END`],
//! which the host side picks out of the serial console.
//!
//! One backend only: iperf3 opens a control and a data connection, which must meet the
//! same server.
use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use crate::{dataplane::Maps, demo, sandbox::Sandbox, Error, Result};

pub const RESULTS_BEGIN: &str = "=== LB-VM-RESULTS-BEGIN ===";
pub const RESULTS_END: &str = "=== LB-VM-RESULTS-END ===";

const CLUSTER_IP: &str = "10.96.0.20";
const PORT: u16 = 5201;

fn config(backend: Ipv4Addr) -> String {
    format!(
        "services:\n  - name: iperf\n    namespace: vmtest\n    clusterIP: {CLUSTER_IP}\n    ports:\n      \
         - name: iperf\n        port: {PORT}\n        targetPort: {PORT}\n        protocol: TCP\n\
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

/// Waits until the agent programmed the frontend and attached to both pods' veths. Link
/// pins cannot be counted: on kernels without tcx (< 6.6) the attachments are netlink tc
/// filters, which are not pinned. The agent's log says when it attached.
fn wait_ready(sb: &Sandbox, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let attached = sb.log("agent.log").matches("attached tc program").count();
        let frontends = Maps::from_pins(sb.pin_dir())
            .and_then(|m| m.read_state())
            .map(|s| s.frontends.len())
            .unwrap_or(0);
        if frontends == 1 && attached >= 2 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(err(format!(
                "the agent did not become ready in {timeout:?} (frontends {frontends}, attached {attached}); its log:\n{}",
                sb.log("agent.log")
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One iperf3 run from the client pod; returns the received throughput in Gbit/s.
fn iperf3(sb: &Sandbox, client: &str, target: &str, seconds: u32) -> Result<f64> {
    let out = sb
        .cmd(
            client,
            &[
                "iperf3",
                "-c",
                target,
                "-p",
                &PORT.to_string(),
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

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
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
    let lb = std::env::current_exe().map_err(|e| err(e.to_string()))?;
    println!("vm-load: creating the sandbox (node, client pod, backend pod)");
    let sb = Sandbox::create("lbvm", &["client", "backend"])?;
    let backend = sb.pod("backend").clone();
    let client = sb.pod("client").netns.clone();
    sb.start_iperf3("backend", PORT)?;
    let cfg = sb.path("services.yaml");
    std::fs::write(&cfg, config(backend.ip)).map_err(|e| err(e.to_string()))?;
    println!(
        "vm-load: starting the agent: ClusterIP {CLUSTER_IP}:{PORT} -> {}:{PORT}",
        backend.ip
    );
    let agent = demo::spawn_agent(&sb, &lb, &cfg, &[])?;
    wait_ready(&sb, Duration::from_secs(60))?;
    let log = sb.log("agent.log");
    let attachment = if log.contains("netlink=true") {
        "netlink tc filters (no tcx before 6.6: not pinned, they live with the agent)"
    } else {
        "tcx links, pinned"
    };
    println!("vm-load: agent ready; attached as {attachment}");

    let targets = [
        (backend.ip.to_string(), "pod IP, no load balancer"),
        (CLUSTER_IP.to_string(), "ClusterIP through lb, eBPF"),
    ];
    let mut results: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for r in 0..repeats {
        // A B, then B A: neither path always runs first.
        let order: [usize; 2] = if r % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let (addr, what) = &targets[i];
            let g = iperf3(&sb, &client, addr, seconds)?;
            println!(
                "vm-load: run {}/{repeats}: {addr}:{PORT} ({what}): {g:.2} Gbit/s",
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

    let ratios: Vec<f64> = results[1]
        .iter()
        .zip(&results[0])
        .map(|(lb, direct)| lb / direct)
        .collect();
    let (lo, hi) = ratios
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), r| {
            (lo.min(*r), hi.max(*r))
        });
    let mut t = String::new();
    let _ = writeln!(t, "guest kernel (uname -r): {release}");
    let _ = writeln!(t, "tc attachment: {attachment}");
    let _ = writeln!(
        t,
        "iperf3 TCP, one stream, {seconds} s per run, {repeats} runs per path, interleaved"
    );
    let _ = writeln!(t);
    let _ = writeln!(t, "| path | median Gbit/s | runs (Gbit/s) |");
    let _ = writeln!(t, "|---|---|---|");
    for (i, (addr, what)) in targets.iter().enumerate() {
        let _ = writeln!(
            t,
            "| client -> {addr}:{PORT} ({what}) | {:.2} | {} |",
            median(&results[i]),
            list(&results[i])
        );
    }
    let _ = writeln!(t);
    let _ = writeln!(
        t,
        "ClusterIP / pod IP, median of pair ratios: {:.3} ({lo:.3}-{hi:.3})",
        median(&ratios)
    );
    let _ = writeln!(
        t,
        "datapath counters: {new_flows} new flows, {translated} packets translated (DNAT)"
    );
    let _ = writeln!(
        t,
        "NodePort: skipped: the dataplane does not implement NodePort yet (it matches ClusterIP \
         frontends only), so there is nothing to measure."
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
