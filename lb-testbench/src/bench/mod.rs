//! The benchmark behind `cargo xtask bench` (`lb-testbench bench`). It compares this dataplane with
//! what an operator would otherwise run (no load balancer at all, kube-proxy's iptables
//! mode with the tested services last or in the middle of KUBE-SERVICES, kube-proxy's
//! nftables mode) on the same namespace sandbox topology and the same services and
//! endpoints, measures the forwarding rate of real packets to a NodePort on one core
//! (`forwarding`, `pktgen`), and writes `results/latest.{md,json}`.
//!
//! Every mode gets its own sandbox (node + client + 3 nginx pods + 1 iperf3 pod), so no
//! mode pays for another's state (netfilter conntrack hooks, the tc program); the
//! sandboxes are identical and runs alternate between them (A B C D E, rotated every
//! repeat). Everything lives in network namespaces named `lbbench-*`; the root namespace
//! is never touched.
pub mod agentpath;
pub mod charts;
pub mod connect;
pub mod consistency;
pub mod control;
pub mod cpu;
pub mod datapath;
pub mod forwarding;
pub mod loadgen;
pub mod pktgen;
pub mod progtime;
pub mod report;
pub mod rules;
pub mod stats;
pub mod tracecost;
pub mod workload;

use std::{path::PathBuf, time::Instant};

pub use crate::agent::check_interrupted;
use crate::{agent::catch_interrupts, Error, Result};

static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// Progress line with the elapsed time.
pub fn progress(msg: impl std::fmt::Display) {
    let t = START.get_or_init(Instant::now).elapsed().as_secs();
    eprintln!("[{:>2}:{:02}] {msg}", t / 60, t % 60);
}

/// Benchmark: this dataplane against no load balancer, kube-proxy iptables and nftables.
#[derive(clap::Args, Clone, Debug)]
pub struct Opts {
    /// Short run: small scales, fewer and shorter repeats (a few minutes).
    #[arg(long)]
    pub quick: bool,
    /// Service counts for the data path runs (default 1,1000,10000,100000; quick 1,1000).
    #[arg(long, value_delimiter = ',')]
    pub scales: Option<Vec<usize>>,
    /// Service counts (x 10 endpoints) for the control plane runs (default 10000,100000; quick 10000).
    #[arg(long, value_delimiter = ',')]
    pub cp_scales: Option<Vec<usize>>,
    /// Repeats of each data path and forwarding-rate measurement (default 3; quick 2).
    #[arg(long)]
    pub repeats: Option<usize>,
    /// Seconds per iperf3 run (default 4; quick 2), after 1 s omitted (`iperf3 -O 1`).
    #[arg(long)]
    pub iperf_secs: Option<u64>,
    /// Seconds per connection-rate run (default 3; quick 2), after a 0.5 s warm-up.
    #[arg(long)]
    pub conn_secs: Option<f64>,
    /// Load generator threads (concurrent connections).
    #[arg(long, default_value_t = 4)]
    pub threads: usize,
    /// Give up loading a baseline's rules after this many seconds (that mode is then
    /// reported as not measured at that scale and above).
    #[arg(long, default_value_t = 240)]
    pub rule_load_timeout: u64,
    /// Output folder.
    #[arg(long, default_value = "results")]
    pub out: PathBuf,
    /// Skip the data path runs (control plane and per-packet cost only).
    #[arg(long)]
    pub no_datapath: bool,
    /// Skip the control plane runs.
    #[arg(long)]
    pub no_control: bool,
    /// Skip the measure of `lb trace`'s cost when off (`tracecost`).
    #[arg(long)]
    pub no_trace_cost: bool,
    /// Measure `lb trace`'s cost only, into `<out>/trace_cost.{md,json}` (latest.* are
    /// left as they are).
    #[arg(long)]
    pub trace_cost_only: bool,
    /// Skip the forwarding-rate runs (real packets to a NodePort, one core).
    #[arg(long)]
    pub no_forwarding: bool,
    /// Seconds per forwarding-rate run (default 3; quick 2), after a 0.5 s warm-up.
    #[arg(long)]
    pub fwd_secs: Option<f64>,
    /// Services on the node in the forwarding-rate runs (the NodePort under test and
    /// fillers).
    #[arg(long, default_value_t = 1000)]
    pub fwd_services: usize,
    /// How the forwarding-rate generator sends: XDP frames (BPF_PROG_TEST_RUN live
    /// frames, redirected) or skbs (AF_PACKET).
    #[arg(long, value_enum, default_value_t = pktgen::GenKind::XdpLive)]
    pub fwd_generator: pktgen::GenKind,
    /// Measure nothing: draw the SVG charts of `<out>/latest.json` beside it.
    #[arg(long)]
    pub charts_only: bool,
    /// Only the connect-time comparison (connect-time balancing, the tc path, kube-proxy
    /// iptables, no load balancer; scales 1 and 10000 unless --scales): writes
    /// `<out>/connect_time.{md,json}`.
    #[arg(long)]
    pub connect_time: bool,
}

impl Opts {
    pub fn scales(&self) -> Vec<usize> {
        self.scales.clone().unwrap_or_else(|| {
            if self.quick {
                vec![1, 1000]
            } else {
                vec![1, 1000, 10_000, 100_000]
            }
        })
    }
    pub fn cp_scales(&self) -> Vec<usize> {
        self.cp_scales.clone().unwrap_or_else(|| {
            if self.quick {
                vec![10_000]
            } else {
                vec![10_000, 100_000]
            }
        })
    }
    pub fn repeats(&self) -> usize {
        self.repeats.unwrap_or(if self.quick { 2 } else { 3 })
    }
    pub fn iperf_secs(&self) -> u64 {
        self.iperf_secs.unwrap_or(if self.quick { 2 } else { 4 })
    }
    pub fn conn_secs(&self) -> f64 {
        self.conn_secs.unwrap_or(if self.quick { 2.0 } else { 3.0 })
    }
    pub fn fwd_secs(&self) -> f64 {
        self.fwd_secs.unwrap_or(if self.quick { 2.0 } else { 3.0 })
    }
}

/// Runs the whole benchmark and writes `latest.md` and `latest.json` to `opts.out`.
pub fn run(opts: &Opts) -> Result<()> {
    START.get_or_init(Instant::now);
    if opts.charts_only {
        return charts::write(&opts.out);
    }
    catch_interrupts();
    if opts.connect_time {
        return connect::run(opts);
    }
    run_all(opts)
}

/// Turns the conntrack filter on for a datapath the bench loaded itself (no agent), as
/// the agent's collector does once the programs are attached: the load leaves it off,
/// and with it off every packet does the conntrack lookup, which a node does not.
pub(crate) fn conntrack_filter_on(maps: &lb_userspace::dataplane::Maps) -> Result<()> {
    let gc = maps.gc_maps()?;
    gc.ct_filter
        .rebuild(&gc.conntrack)
        .map_err(|e| Error::Sandbox(format!("building the conntrack filter: {e}")))?;
    Ok(())
}

fn trace_cost_only(opts: &Opts) -> Result<()> {
    let t = tracecost::run_all(opts)?;
    let machine = report::Machine::describe(opts);
    let md = format!(
        "Measured {} on {}.\n{}",
        machine.date,
        machine.one_line(),
        tracecost::markdown(&t)
    );
    let json = serde_json::to_string_pretty(&t).map_err(|e| Error::Sandbox(e.to_string()))? + "\n";
    std::fs::create_dir_all(&opts.out).map_err(|e| Error::Sandbox(e.to_string()))?;
    for (name, text) in [("trace_cost.md", &md), ("trace_cost.json", &json)] {
        let p = opts.out.join(name);
        std::fs::write(&p, text).map_err(|e| Error::Sandbox(format!("{}: {e}", p.display())))?;
    }
    println!("{md}");
    progress(format!(
        "wrote {}/trace_cost.md and trace_cost.json",
        opts.out.display()
    ));
    Ok(())
}

fn run_all(opts: &Opts) -> Result<()> {
    if opts.trace_cost_only {
        return trace_cost_only(opts);
    }
    crate::sandbox::require_tools(&[
        "ip",
        "nginx",
        "iperf3",
        "ss",
        "iptables-restore",
        "nft",
        "bpftool",
        "ethtool",
    ])?;
    let machine = report::Machine::describe(opts);
    progress(format!("machine: {}", machine.one_line()));
    let dp = if opts.no_datapath {
        Vec::new()
    } else {
        datapath::run_all(opts)?
    };
    let fwd = if opts.no_forwarding {
        None
    } else {
        Some(forwarding::run_all(opts)?)
    };
    let cp = if opts.no_control {
        Vec::new()
    } else {
        control::run_all(opts)?
    };
    let trace_cost = if opts.no_trace_cost {
        None
    } else {
        Some(tracecost::run_all(opts)?)
    };
    let rep = report::Report {
        machine,
        datapath: dp,
        forwarding: fwd,
        control: cp,
        consistency: consistency::measure(&[10, 100, 1000], 200_000),
        trace_cost,
    };
    std::fs::create_dir_all(&opts.out).map_err(|e| Error::Sandbox(e.to_string()))?;
    let md = rep.markdown();
    let json = rep.json()?;
    for (name, text) in [("latest.md", &md), ("latest.json", &json)] {
        let p = opts.out.join(name);
        std::fs::write(&p, text).map_err(|e| Error::Sandbox(format!("{}: {e}", p.display())))?;
    }
    println!("{md}");
    progress(format!(
        "wrote {}/latest.md and latest.json",
        opts.out.display()
    ));
    charts::write(&opts.out)?;
    Ok(())
}
