//! Forwarding rate with real packets, beside BPF_PROG_TEST_RUN's per-packet figures:
//! small UDP datagrams from outside the node to a NodePort, forwarded by the node to a
//! backend pod, with the node's receive processing pinned to one core.
//!
//! Each mode gets a sandbox of its own (node, outside, one `sink` pod):
//! - no load balancer: the frames go to the pod's address, routed by the node;
//! - kube-proxy's iptables NodePort rules, and its nftables ones (`rules`);
//! - this dataplane's tc program, on the node's eth0 given as a pod interface
//!   (`--interfaces eth0,lxc-*`, no XDP): the tc program serves NodePorts too;
//! - this dataplane's XDP program on eth0 (`--external-interfaces eth0`).
//!
//! The generator (`pktgen`) runs in the outside namespace on CPU 0 and sends 60-byte
//! frames (64 on a wire) in 16 flows to NodePort 30009 of the node (or to the pod).
//! Receive processing: GRO is turned on for the node's eth0 and TSO off for its peer (a
//! veth receives through NAPI only with GRO or an XDP program, and takes a sender's
//! skbs through NAPI only when it could aggregate them), and NAPI made threaded
//! (`/sys/class/net/eth0/threaded`); the `napi/eth0-<id>` kernel thread that appears is
//! pinned to CPU 1 with sched_setaffinity, made SCHED_FIFO, and checked in /proc before
//! and after every run. That thread runs everything the node does with a packet: XDP,
//! GRO, tc, netfilter, routing, the pod's veth and the pod's receive backlog (the
//! softirq it raises runs on CPU 1).
//! Delivered: the `rx_packets` counter of the pod's eth0 (/proc/net/dev in the pod's
//! namespace, the counter sysfs shows), over the run; a UDP socket bound in the pod
//! keeps it from answering each datagram with an ICMP error.
use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use serde::Serialize;

use super::{
    check_interrupted, datapath,
    pktgen::{self, GenKind, Generator, Sink},
    progress, rules, stats, workload, Opts,
};
use crate::{
    sandbox::{Sandbox, NODE_IP},
    Error, Result,
};

/// The CPU the generator (and the sink's reader) run on.
pub const GEN_CPU: usize = 0;
/// The CPU the node's receive processing (its NAPI thread) is pinned to.
pub const FWD_CPU: usize = 1;
/// The NAPI thread's real-time priority (SCHED_FIFO): the core is the forwarding's, not
/// shared with whatever else the machine runs.
pub const FWD_PRIORITY: i32 = 50;
const FLOWS: u16 = 16;
const FIRST_SPORT: u16 = 40_000;
const WARMUP: Duration = Duration::from_millis(500);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FwdMode {
    Direct,
    Iptables,
    Nft,
    Tc,
    Xdp,
}

pub const FWD_MODES: [FwdMode; 5] = [
    FwdMode::Direct,
    FwdMode::Iptables,
    FwdMode::Nft,
    FwdMode::Tc,
    FwdMode::Xdp,
];

impl FwdMode {
    pub fn name(self) -> &'static str {
        match self {
            FwdMode::Direct => "no LB (pod IP, routed)",
            FwdMode::Iptables => "kube-proxy iptables (NodePort)",
            FwdMode::Nft => "kube-proxy nftables (NodePort)",
            FwdMode::Tc => "lb tc on eth0 (NodePort)",
            FwdMode::Xdp => "lb XDP on eth0 (NodePort)",
        }
    }
    pub fn key(self) -> &'static str {
        match self {
            FwdMode::Direct => "direct",
            FwdMode::Iptables => "iptables",
            FwdMode::Nft => "nftables",
            FwdMode::Tc => "tc",
            FwdMode::Xdp => "xdp",
        }
    }
    fn prefix(self) -> &'static str {
        match self {
            FwdMode::Direct => "lbbench-fdir",
            FwdMode::Iptables => "lbbench-fipt",
            FwdMode::Nft => "lbbench-fnft",
            FwdMode::Tc => "lbbench-ftc",
            FwdMode::Xdp => "lbbench-fxdp",
        }
    }
}

/// Written as its key ("xdp").
impl Serialize for FwdMode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.key())
    }
}

/// One run of one mode, over its measured seconds.
#[derive(Clone, Debug, Serialize)]
pub struct FwdRun {
    /// Packets the pod's eth0 received, per second.
    pub delivered_pps: f64,
    /// Frames the generator sent, per second.
    pub offered_pps: f64,
    /// Datagrams the sink socket read, per second.
    pub sink_pps: f64,
    /// CPU time of the node's NAPI thread, as a share of the run.
    pub napi_thread_busy: f64,
    /// CPU 1's busy share (/proc/stat: all but idle and iowait).
    pub fwd_cpu_busy: f64,
    /// The CPU the NAPI thread last ran on (/proc/<pid>/stat).
    pub napi_last_cpu: Option<usize>,
}

#[derive(Clone, Debug, Serialize)]
pub struct FwdModeResult {
    pub mode: FwdMode,
    /// Rule load, or agent start to synced and attached, seconds.
    pub setup_secs: Option<f64>,
    /// Why this mode was not measured.
    pub skipped: Option<String>,
    pub first_error: Option<String>,
    /// The node's NAPI thread and its CPUs, as read back after pinning.
    pub napi_thread: Option<String>,
    pub runs: Vec<FwdRun>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ForwardingResult {
    /// Services on the node (the sink's NodePort and fillers' ClusterIPs).
    pub services: usize,
    pub frame_bytes: usize,
    pub flows: u16,
    /// How the frames were put on the wire.
    pub generator: GenKind,
    pub secs: f64,
    pub repeats: usize,
    pub generator_cpu: usize,
    pub forwarding_cpu: usize,
    pub modes: Vec<FwdModeResult>,
    /// Why the section did not run.
    pub error: Option<String>,
}

impl ForwardingResult {
    pub fn mode(&self, m: FwdMode) -> Option<&FwdModeResult> {
        self.modes
            .iter()
            .find(|r| r.mode == m && r.skipped.is_none() && !r.runs.is_empty())
    }

    /// Pair-by-pair ratios a/b of the delivered rate (runs of a repeat are back to back).
    pub fn ratios(&self, a: FwdMode, b: FwdMode) -> Option<stats::Summary> {
        let col = |m| -> Option<Vec<f64>> {
            Some(self.mode(m)?.runs.iter().map(|r| r.delivered_pps).collect())
        };
        let r = stats::summarize(&stats::pair_ratios(&col(a)?, &col(b)?));
        (r.n > 0).then_some(r)
    }
}

/// One mode's sandbox. Fields drop in order: the sink's thread ends before the sandbox
/// (and its namespaces) goes.
struct Bed {
    mode: FwdMode,
    generator: GenKind,
    sink: Sink,
    frames: Vec<Vec<u8>>,
    agent: Option<u32>,
    napi: Option<i32>,
    sb: Sandbox,
}

#[derive(serde::Deserialize)]
struct IpLink {
    address: String,
}

/// The MAC address of `eth0` in `netns` (`ip -j link`).
fn mac_of(sb: &Sandbox, netns: &str) -> Result<[u8; 6]> {
    let out = sb.exec(netns, &["ip", "-j", "link", "show", "dev", "eth0"])?;
    let links: Vec<IpLink> = serde_json::from_slice(&out.stdout)
        .map_err(|e| Error::Sandbox(format!("ip -j link in {netns}: {e}")))?;
    links
        .first()
        .and_then(|l| pktgen::parse_mac(&l.address))
        .ok_or_else(|| Error::Sandbox(format!("no MAC address for eth0 in {netns}")))
}

impl Bed {
    fn create(mode: FwdMode, generator: GenKind) -> Result<Self> {
        let sb = Sandbox::create(mode.prefix(), &["sink"])?;
        let pod = sb.pod("sink").clone();
        // A veth receives through NAPI (which can be threaded and pinned) only with GRO
        // on or an XDP program attached, and then only packets it may aggregate: none
        // while its peer (the sender) has TSO on, unless UDP GRO forwarding is on (which
        // would aggregate the datagrams). Attaching XDP turns the peer's TSO off; here
        // it is off in every mode, and GRO on, so all modes receive the same way.
        sb.exec(&sb.outside, &["ethtool", "-K", "eth0", "tso", "off"])?;
        sb.exec(&sb.node, &["ethtool", "-K", "eth0", "gro", "on"])?;
        let sink = Sink::start(&pod.netns, workload::SINK_PORT, GEN_CPU)?;
        let node_ip: Ipv4Addr = NODE_IP.parse().expect("an address");
        let outside_ip: Ipv4Addr = crate::sandbox::OUTSIDE_IP.parse().expect("an address");
        let (dst, dport) = match mode {
            FwdMode::Direct => (pod.ip, workload::SINK_PORT),
            _ => (node_ip, workload::SINK_NODE_PORT),
        };
        let frames = pktgen::udp_frames(
            mac_of(&sb, &sb.outside)?,
            mac_of(&sb, &sb.node)?,
            outside_ip,
            dst,
            dport,
            FIRST_SPORT,
            FLOWS,
        );
        Ok(Self {
            mode,
            generator,
            sink,
            frames,
            agent: None,
            napi: None,
            sb,
        })
    }

    /// Puts the mode's rules or agent in place; seconds it took.
    fn load(&mut self, services: usize, opts: &Opts) -> Result<Option<f64>> {
        let pod_ip = self.sb.pod("sink").ip;
        let svcs = workload::forwarding_services(services, pod_ip);
        let node_ip: Ipv4Addr = NODE_IP.parse().expect("an address");
        let limit = Duration::from_secs(opts.rule_load_timeout);
        let node = self.sb.node.clone();
        let secs = match self.mode {
            FwdMode::Direct => None,
            FwdMode::Iptables => {
                // Last or middle does not matter here: a NodePort's packet misses every
                // ClusterIP rule of KUBE-SERVICES before the NodePort jump either way.
                let path = self.sb.path("iptables.rules");
                std::fs::write(
                    &path,
                    rules::iptables_restore(&svcs, rules::Placement::Last),
                )
                .map_err(|e| Error::Sandbox(e.to_string()))?;
                let f = std::fs::File::open(&path).map_err(|e| Error::Sandbox(e.to_string()))?;
                let mut cmd = self.sb.cmd(&node, &["iptables-restore"]);
                cmd.stdin(f);
                Some(datapath::timed(cmd, limit, "iptables-restore")?)
            }
            FwdMode::Nft => {
                let path = self.sb.path("kube-proxy.nft");
                std::fs::write(&path, rules::nft_script(&svcs, &[node_ip]))
                    .map_err(|e| Error::Sandbox(e.to_string()))?;
                let cmd = self
                    .sb
                    .cmd(&node, &["nft", "-f", &path.display().to_string()]);
                Some(datapath::timed(cmd, limit, "nft -f")?)
            }
            FwdMode::Tc | FwdMode::Xdp => {
                let path = self.sb.path("services.yaml");
                let cfg = workload::to_config_on_node(&svcs, Some(node_ip));
                let text =
                    serde_yaml_ng::to_string(&cfg).map_err(|e| Error::Sandbox(e.to_string()))?;
                std::fs::write(&path, text).map_err(|e| Error::Sandbox(e.to_string()))?;
                let (interfaces, external) = if self.mode == FwdMode::Tc {
                    ("eth0,lxc-*", None)
                } else {
                    ("lxc-*", Some("eth0"))
                };
                let (pid, secs) = datapath::start_agent_with(
                    &self.sb,
                    &path,
                    interfaces,
                    external,
                    svcs.len() + 1,
                    workload::endpoint_count(&svcs),
                    "agent.log",
                )?;
                self.agent = Some(pid);
                Some(secs)
            }
        };
        // Sanity: a short burst must reach the sink.
        let before = self.sink.received();
        let gen = Generator::start(
            self.generator,
            &self.sb.outside,
            "eth0",
            self.frames.clone(),
            GEN_CPU,
        )?;
        std::thread::sleep(Duration::from_millis(300));
        gen.stop()?;
        std::thread::sleep(Duration::from_millis(100));
        if self.sink.received() == before {
            let mut detail = String::new();
            if self.agent.is_some() {
                detail = lb_userspace::show::render(
                    self.sb.pin_dir(),
                    lb_userspace::show::What::Counters,
                    Default::default(),
                    &Default::default(),
                    None,
                )
                .unwrap_or_default();
            }
            return Err(Error::Sandbox(format!(
                "{}: no datagram reached the sink pod {detail}",
                self.mode.name()
            )));
        }
        self.napi = Some(thread_napi(&self.sb)?);
        Ok(secs)
    }
}

/// Kernel threads named `napi/eth0-*`: (pid, name).
fn napi_threads() -> Vec<(i32, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(comm) = std::fs::read_to_string(e.path().join("comm")) {
            let comm = comm.trim();
            if comm.starts_with("napi/eth0-") {
                out.push((pid, comm.to_string()));
            }
        }
    }
    out
}

/// "Cpus_allowed_list" of a task, from /proc/<pid>/status.
fn cpus_allowed_list(pid: i32) -> Option<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(|v| v.trim().to_string())
}

/// Makes NAPI of the node's eth0 threaded, finds its new kernel thread (the one
/// `napi/eth0-*` that was not there before), pins it to [`FWD_CPU`] and checks the
/// pinning in /proc. Returns its pid.
fn thread_napi(sb: &Sandbox) -> Result<i32> {
    let before: BTreeSet<i32> = napi_threads().into_iter().map(|t| t.0).collect();
    sb.exec(
        &sb.node,
        &["sh", "-c", "echo 1 > /sys/class/net/eth0/threaded"],
    )?;
    let new: Vec<(i32, String)> = napi_threads()
        .into_iter()
        .filter(|t| !before.contains(&t.0))
        .collect();
    let [(pid, _)] = new[..] else {
        return Err(Error::Sandbox(format!(
            "threaded NAPI on the node's eth0: expected one new napi/eth0-* thread, found {new:?}"
        )));
    };
    pktgen::pin_to_cpu(pid, FWD_CPU)?;
    pktgen::set_fifo(pid, FWD_PRIORITY)?;
    check_pinned(pid)?;
    Ok(pid)
}

/// The NAPI thread is still there, allowed on [`FWD_CPU`] only, and SCHED_FIFO.
fn check_pinned(pid: i32) -> Result<String> {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    let allowed = cpus_allowed_list(pid);
    let sched = pktgen::scheduler(pid)?;
    if !comm.starts_with("napi/eth0-")
        || allowed.as_deref() != Some(&FWD_CPU.to_string())
        || sched != (libc::SCHED_FIFO, FWD_PRIORITY)
    {
        return Err(Error::Sandbox(format!(
            "the NAPI thread {pid} ({}) is not pinned to CPU {FWD_CPU} as SCHED_FIFO {FWD_PRIORITY}: Cpus_allowed_list {allowed:?}, policy and priority {sched:?}",
            comm.trim()
        )));
    }
    Ok(format!(
        "{} (pid {pid}): Cpus_allowed_list {}, SCHED_FIFO {}",
        comm.trim(),
        allowed.unwrap_or_default(),
        sched.1
    ))
}

/// (utime + stime in clock ticks, the CPU it last ran on) from /proc/<pid>/stat.
fn task_cpu(pid: i32) -> Option<(u64, usize)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_task_stat(&s)
}

fn parse_task_stat(s: &str) -> Option<(u64, usize)> {
    // Fields after the command's closing parenthesis start with field 3 (state).
    let f: Vec<&str> = s.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: u64 = f.get(14 - 3)?.parse().ok()?;
    let stime: u64 = f.get(15 - 3)?.parse().ok()?;
    let cpu: usize = f.get(39 - 3)?.parse().ok()?;
    Some((utime + stime, cpu))
}

/// (busy, total) clock ticks of one CPU from /proc/stat.
fn cpu_ticks(stat: &str, cpu: usize) -> Option<(u64, u64)> {
    let name = format!("cpu{cpu}");
    let l = stat
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name.as_str()))?;
    let v: Vec<u64> = l
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3)? + v.get(4)?;
    Some((total - idle, total))
}

/// `rx_packets` of `ifname` from /proc/net/dev text.
fn rx_packets(netdev: &str, ifname: &str) -> Option<u64> {
    netdev.lines().find_map(|l| {
        let (name, rest) = l.split_once(':')?;
        if name.trim() != ifname {
            return None;
        }
        rest.split_whitespace().nth(1)?.parse().ok()
    })
}

/// `rx_packets` of eth0 in `netns` (/proc/thread-self/net/dev read from a thread in it).
fn pod_rx_packets(netns: &str) -> Result<u64> {
    let text = crate::sandbox::run_in(netns, || {
        std::fs::read_to_string("/proc/thread-self/net/dev")
    })?
    .map_err(|e| Error::Sandbox(format!("/proc/net/dev in {netns}: {e}")))?;
    rx_packets(&text, "eth0")
        .ok_or_else(|| Error::Sandbox(format!("no eth0 in /proc/net/dev of {netns}")))
}

struct Snapshot {
    t: Instant,
    offered: u64,
    delivered: u64,
    sink: u64,
    napi: (u64, usize),
    cpu: (u64, u64),
}

fn snapshot(bed: &Bed, gen: &Generator, napi: i32) -> Result<Snapshot> {
    let delivered = pod_rx_packets(&bed.sb.pod("sink").netns)?;
    let t = Instant::now();
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    Ok(Snapshot {
        t,
        offered: gen.offered(),
        delivered,
        sink: bed.sink.received(),
        napi: task_cpu(napi)
            .ok_or_else(|| Error::Sandbox(format!("the NAPI thread {napi} is gone")))?,
        cpu: cpu_ticks(&stat, FWD_CPU).unwrap_or((0, 0)),
    })
}

/// Sleeps `d`, returning early with an error on Ctrl-C.
fn sleep_checked(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        check_interrupted()?;
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
    Ok(())
}

fn run_one(bed: &Bed, secs: f64) -> Result<FwdRun> {
    let napi = bed.napi.expect("loaded");
    check_pinned(napi)?;
    let gen = Generator::start(
        bed.generator,
        &bed.sb.outside,
        "eth0",
        bed.frames.clone(),
        GEN_CPU,
    )?;
    sleep_checked(WARMUP)?;
    let a = snapshot(bed, &gen, napi)?;
    sleep_checked(Duration::from_secs_f64(secs))?;
    let b = snapshot(bed, &gen, napi)?;
    let g = gen.stop()?;
    if g.calls > 0 {
        progress(format!(
            "   generator: {} calls, {:.1}% of its {:.1} s in them",
            g.calls,
            g.secs_in_calls / g.secs.max(1e-9) * 100.0,
            g.secs
        ));
    }
    let dt = (b.t - a.t).as_secs_f64();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let run = FwdRun {
        delivered_pps: (b.delivered - a.delivered) as f64 / dt,
        offered_pps: (b.offered - a.offered) as f64 / dt,
        sink_pps: (b.sink - a.sink) as f64 / dt,
        napi_thread_busy: (b.napi.0 - a.napi.0) as f64 / hz / dt,
        fwd_cpu_busy: (b.cpu.0 - a.cpu.0) as f64 / (b.cpu.1 - a.cpu.1).max(1) as f64,
        napi_last_cpu: Some(b.napi.1),
    };
    if b.napi.1 != FWD_CPU {
        return Err(Error::Sandbox(format!(
            "the NAPI thread last ran on CPU {}, not {FWD_CPU}",
            b.napi.1
        )));
    }
    if run.napi_thread_busy < 0.05 && run.delivered_pps > 0.0 {
        return Err(Error::Sandbox(format!(
            "the NAPI thread ran {:.1}% of the run: the packets were forwarded elsewhere (not through NAPI)",
            run.napi_thread_busy * 100.0
        )));
    }
    Ok(run)
}

pub fn run_all(opts: &Opts) -> Result<ForwardingResult> {
    let mut res = ForwardingResult {
        services: opts.fwd_services,
        frame_bytes: pktgen::FRAME_LEN,
        flows: FLOWS,
        generator: opts.fwd_generator,
        secs: opts.fwd_secs(),
        repeats: opts.repeats(),
        generator_cpu: GEN_CPU,
        forwarding_cpu: FWD_CPU,
        modes: Vec::new(),
        error: None,
    };
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    if cpus <= FWD_CPU {
        res.error = Some(format!(
            "needs CPUs {GEN_CPU} and {FWD_CPU}; this machine has {cpus}"
        ));
        return Ok(res);
    }
    progress(format!(
        "forwarding rate: {} sandboxes, {} services, {}-byte frames in {FLOWS} flows, generator on CPU {GEN_CPU}, node's NAPI thread on CPU {FWD_CPU}",
        FWD_MODES.len(),
        opts.fwd_services,
        pktgen::FRAME_LEN
    ));
    let mut beds = Vec::new();
    for m in FWD_MODES {
        check_interrupted()?;
        let mut r = FwdModeResult {
            mode: m,
            setup_secs: None,
            skipped: None,
            first_error: None,
            napi_thread: None,
            runs: Vec::new(),
        };
        let bed = Bed::create(m, opts.fwd_generator).and_then(|mut bed| {
            r.setup_secs = bed.load(opts.fwd_services, opts)?;
            r.napi_thread = Some(check_pinned(bed.napi.expect("loaded"))?);
            Ok(bed)
        });
        match bed {
            Ok(bed) => {
                progress(format!(
                    "   {}: ready{}; {}",
                    m.name(),
                    r.setup_secs
                        .map(|s| format!(" in {s:.2} s"))
                        .unwrap_or_default(),
                    r.napi_thread.as_deref().unwrap_or("")
                ));
                beds.push(Some(bed));
            }
            Err(e) => {
                check_interrupted()?;
                progress(format!("   {}: {e}", m.name()));
                r.skipped = Some(e.to_string());
                beds.push(None);
            }
        }
        res.modes.push(r);
    }
    let active: Vec<usize> = (0..beds.len()).filter(|&i| beds[i].is_some()).collect();
    for rep in 0..opts.repeats() {
        let order: Vec<usize> = (0..active.len())
            .map(|k| active[(k + rep) % active.len()])
            .collect();
        for &i in &order {
            check_interrupted()?;
            let bed = beds[i].as_ref().expect("active");
            match run_one(bed, res.secs) {
                Ok(run) => {
                    progress(format!(
                        "   repeat {}/{} {:<32} {:>9.0} pkt/s delivered (offered {:>9.0}, sink read {:>9.0}), NAPI thread {:>3.0}% of CPU {FWD_CPU}, CPU {FWD_CPU} busy {:>3.0}%",
                        rep + 1,
                        opts.repeats(),
                        bed.mode.name(),
                        run.delivered_pps,
                        run.offered_pps,
                        run.sink_pps,
                        run.napi_thread_busy * 100.0,
                        run.fwd_cpu_busy * 100.0
                    ));
                    res.modes[i].runs.push(run);
                }
                Err(e) => {
                    check_interrupted()?;
                    progress(format!("   {}: {e}", bed.mode.name()));
                    res.modes[i].first_error.get_or_insert(e.to_string());
                    // Keeps the repeats aligned for the pair ratios.
                    res.modes[i].runs.push(FwdRun {
                        delivered_pps: f64::NAN,
                        offered_pps: f64::NAN,
                        sink_pps: f64::NAN,
                        napi_thread_busy: f64::NAN,
                        fwd_cpu_busy: f64::NAN,
                        napi_last_cpu: None,
                    });
                }
            }
        }
    }
    for bed in beds.iter_mut().flatten() {
        if let Some(pid) = bed.agent.take() {
            let _ = bed.sb.stop(pid, libc::SIGTERM);
        }
    }
    drop(beds);
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_parse() {
        let netdev = "Inter-|   Receive                                                |  Transmit\n face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    lo:       0       0    0    0    0     0          0         0        0       0    0    0    0     0       0          0\n  eth0:123456789012 3456789    0   12    0     0          0         0      866      11    0    0    0     0       0          0\n";
        assert_eq!(rx_packets(netdev, "eth0"), Some(3_456_789));
        assert_eq!(rx_packets(netdev, "lo"), Some(0));
        assert_eq!(rx_packets(netdev, "eth1"), None);
        // A kernel thread's stat: the command holds a '/' and a '-'.
        let stat = "4242 (napi/eth0-8195) S 2 0 0 0 -1 2129984 0 0 0 0 17 2345 0 0 20 0 1 0 1234 0 0 18446744073709551615 0 0 0 0 0 0 0 2147483647 0 0 0 0 17 1 0 0 0 0 0 0 0 0 0 0 0 0 0";
        assert_eq!(parse_task_stat(stat), Some((17 + 2345, 1)));
        let procstat = "cpu  10 0 10 100 5 0 3 0 0 0\ncpu0 4 0 6 50 2 0 1 0 0 0\ncpu1 6 0 4 50 3 0 2 0 0 0\nintr 1\n";
        assert_eq!(cpu_ticks(procstat, 1), Some((12, 65)));
        assert_eq!(cpu_ticks(procstat, 0), Some((11, 63)));
        assert_eq!(cpu_ticks(procstat, 2), None);
    }

    #[test]
    fn ratios_pair_runs_of_the_same_repeat() {
        let run = |pps: f64| FwdRun {
            delivered_pps: pps,
            offered_pps: 0.0,
            sink_pps: 0.0,
            napi_thread_busy: 1.0,
            fwd_cpu_busy: 1.0,
            napi_last_cpu: Some(1),
        };
        let mode = |m, runs: Vec<f64>| FwdModeResult {
            mode: m,
            setup_secs: None,
            skipped: None,
            first_error: None,
            napi_thread: None,
            runs: runs.into_iter().map(run).collect(),
        };
        let r = ForwardingResult {
            services: 1,
            frame_bytes: 60,
            flows: 16,
            generator: GenKind::XdpLive,
            secs: 1.0,
            repeats: 3,
            generator_cpu: 0,
            forwarding_cpu: 1,
            modes: vec![
                mode(FwdMode::Iptables, vec![100.0, 200.0, 100.0]),
                mode(FwdMode::Xdp, vec![300.0, 400.0, 500.0]),
            ],
            error: None,
        };
        let s = r.ratios(FwdMode::Xdp, FwdMode::Iptables).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (3.0, 2.0, 5.0, 3));
        assert!(r.ratios(FwdMode::Xdp, FwdMode::Direct).is_none());
    }
}
