//! The connect-time benchmark (`lb-testbench bench --connect-time`; `cargo xtask bench
//! -- --connect-time`): new connections per second and request latency from a pod to a
//! ClusterIP (three nginx backends, a new TCP connection per request) through
//! connect-time balancing (the agent's socket programs on a cgroup the bench makes; the
//! load generator's process joins it for its runs), through the tc path (the same agent
//! without socket programs), through kube-proxy's iptables rules (the tested Service
//! last in KUBE-SERVICES) and without a load balancer (the client spreads over the pod
//! IPs itself), at each scale; each mode in its own sandbox, runs interleaved (order
//! rotated every repeat). For the two lb modes it also counts the packets a program
//! rewrote during each run (the counters `new_flow`, `translated`,
//! `reverse_translated`): an established connect-time flow must have none. Writes
//! `connect_time.md` and `connect_time.json` to the output folder.
use std::{
    fs,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::PathBuf,
    time::{Duration, Instant},
};

use serde::Serialize;

use super::{
    check_interrupted, cpu, datapath, loadgen, progress, progtime, rules,
    stats::{pair_ratios, quantile, summarize},
    workload::{self, Endpoints, WEB_IP, WEB_PORT, WEB_TARGET_PORT},
    Opts,
};
use crate::{cgroup::TestCgroup, sandbox::Sandbox, Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// No load balancer: the client takes the pod IPs in turn.
    Direct,
    /// No load balancer: the client draws a pod at random for each connection, the
    /// spread every lb mode has (a choice per connection).
    DirectRandom,
    ConnectTime,
    /// Connect-time balancing with no tc program on the pods' veths: what the socket
    /// programs cost alone.
    ConnectTimeNoTc,
    Tc,
    Iptables,
}

const MODES: [Mode; 6] = [
    Mode::Direct,
    Mode::DirectRandom,
    Mode::ConnectTime,
    Mode::ConnectTimeNoTc,
    Mode::Tc,
    Mode::Iptables,
];

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Direct => "no LB (pod IPs in turn)",
            Mode::DirectRandom => "no LB (pod IP at random)",
            Mode::ConnectTime => "lb connect-time",
            Mode::ConnectTimeNoTc => "lb connect-time, no tc on veths",
            Mode::Tc => "lb tc path",
            Mode::Iptables => "kube-proxy iptables (last)",
        }
    }

    fn connect_time(self) -> bool {
        matches!(self, Mode::ConnectTime | Mode::ConnectTimeNoTc)
    }

    fn prefix(self) -> &'static str {
        match self {
            Mode::Direct => "lbbench-cdi",
            Mode::DirectRandom => "lbbench-cdr",
            Mode::ConnectTime => "lbbench-cct",
            Mode::ConnectTimeNoTc => "lbbench-cnt",
            Mode::Tc => "lbbench-ctc",
            Mode::Iptables => "lbbench-cip",
        }
    }
}

const PODS: [&str; 4] = ["client", "be-1", "be-2", "be-3"];

struct Bed {
    mode: Mode,
    sb: Sandbox,
    agent: Option<u32>,
    /// The mode's own cgroup, joined by the load generator for its runs (the
    /// connect-time agents' socket programs are on it).
    cg: Option<TestCgroup>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Run {
    pub cps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub errors: u64,
    /// The machine's busy CPU time per connection (µs, all cores and processes).
    pub cpu_us_per_conn: Option<f64>,
    /// Connections made in the run.
    pub connections: u64,
    /// Packets a program rewrote meanwhile (lb modes): new_flow + translated +
    /// reverse_translated.
    pub rewritten: Option<u64>,
    /// CPU time of the mode's agent process (user and system, its periodic work: the
    /// interface poll, the conntrack collector, the maps' resync), per connection made
    /// (µs; lb modes).
    pub agent_us_per_conn: Option<f64>,
    /// Time the agent's socket programs ran, per connection made (ns; lb modes).
    pub sock_ns_per_conn: Option<f64>,
    /// Time its tc and XDP programs ran, per connection made (ns), and how many runs.
    pub packet_ns_per_conn: Option<f64>,
    pub packet_runs_per_conn: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ModeRuns {
    pub mode: Mode,
    pub name: &'static str,
    pub runs: Vec<Run>,
    /// A run more (lb modes), with the programs' run time measured: what they cost per
    /// connection. Not used for the rates.
    pub cost: Option<Run>,
    pub skipped: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Scale {
    pub services: usize,
    pub modes: Vec<ModeRuns>,
}

/// The bench process in the cgroup while it lives (its load generator's sockets are
/// then the cgroup's), back in its own cgroup after.
struct Joined {
    back: PathBuf,
}

fn join(cg: &TestCgroup) -> Result<Joined> {
    let own = fs::read_to_string("/proc/self/cgroup").map_err(|e| Error::Sandbox(e.to_string()))?;
    let path = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| Error::Sandbox("no cgroup v2 line in /proc/self/cgroup".into()))?;
    let root = lb_userspace::sockets::cgroup2_mount()
        .ok_or_else(|| Error::Sandbox("no cgroup2 mount".into()))?;
    let back = root.join(path.trim_start_matches('/')).join("cgroup.procs");
    let pid = std::process::id().to_string();
    fs::write(cg.path.join("cgroup.procs"), &pid)
        .map_err(|e| Error::Sandbox(format!("joining {}: {e}", cg.path.display())))?;
    Ok(Joined { back })
}

impl Drop for Joined {
    fn drop(&mut self) {
        if let Err(e) = fs::write(&self.back, std::process::id().to_string()) {
            eprintln!("leaving the bench cgroup for {}: {e}", self.back.display());
        }
    }
}

/// The other modes' agents stopped (SIGSTOP) while one mode runs, continued when it
/// ends, also on error: their programs and maps stay, only their userspace pauses. An
/// agent's own periodic work (the conntrack collector walks its map every 10 s; the tc
/// path's holds a few hundred thousand entries after a run) is that agent's cost, not
/// the measured mode's, and it fell on whichever run was under way.
struct Paused(Vec<u32>);

fn pause_others(beds: &[Bed], running: usize) -> Paused {
    let pids: Vec<u32> = beds
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != running)
        .filter_map(|(_, b)| b.agent)
        .collect();
    for &pid in &pids {
        // SAFETY: signalling the bench's own child, which it has not reaped.
        unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
    }
    Paused(pids)
}

impl Drop for Paused {
    fn drop(&mut self) {
        for &pid in &self.0 {
            // SAFETY: as above.
            unsafe { libc::kill(pid as i32, libc::SIGCONT) };
        }
    }
}

/// Waits, before a run, until the mode's agent has been idle for `SETTLE_IDLE` (at most
/// `SETTLE_MAX`). An agent stopped through the other modes' runs finds its
/// periodic work overdue when it is continued (the drift check every 30 s, the
/// conntrack collector every 10 s: their timers ran on while it was stopped), and did
/// it in its own next run: that work, which a node spreads over its period, fell into
/// the agent's few seconds of runs, several times as often as on a node (seen: in 8 of
/// 20 runs at 10,000 Services, 5 to 14 µs per connection). Done before the run, the
/// work falls into a run only when it comes due during one, as on a node.
fn settle(pid: u32) {
    let start = Instant::now();
    let Some(mut last) = cpu::process_ticks(pid) else {
        return;
    };
    while start.elapsed() < SETTLE_MAX {
        std::thread::sleep(SETTLE_IDLE);
        let Some(now) = cpu::process_ticks(pid) else {
            return;
        };
        // (Its interface poll, every 250 ms, may add a tick.)
        if now - last <= 1 {
            return;
        }
        last = now;
    }
}

/// How long an agent must have been idle (at most one clock tick, 10 ms, of CPU) before a
/// run.
const SETTLE_IDLE: Duration = Duration::from_millis(300);
/// The longest wait for it.
const SETTLE_MAX: Duration = Duration::from_secs(10);

fn rewritten(bed: &Bed) -> Option<u64> {
    let maps = lb_userspace::dataplane::Maps::from_pins(bed.sb.pin_dir()).ok()?;
    let c = maps.counters().ok()?;
    Some(
        c.iter()
            .filter(|(n, _)| ["new_flow", "translated", "reverse_translated"].contains(n))
            .map(|(_, v)| v)
            .sum(),
    )
}

fn targets(bed: &Bed) -> Vec<SocketAddr> {
    match bed.mode {
        Mode::Direct | Mode::DirectRandom => ["be-1", "be-2", "be-3"]
            .iter()
            .map(|b| SocketAddr::V4(SocketAddrV4::new(bed.sb.pod(b).ip, WEB_TARGET_PORT)))
            .collect(),
        _ => vec![SocketAddr::V4(SocketAddrV4::new(WEB_IP, WEB_PORT))],
    }
}

fn load(bed: &mut Bed, svcs: &[workload::Svc], opts: &Opts) -> Result<()> {
    let node = bed.sb.node.clone();
    match bed.mode {
        Mode::Direct | Mode::DirectRandom => {}
        Mode::Iptables => {
            let path = bed.sb.path("iptables.rules");
            fs::write(&path, rules::iptables_restore(svcs, rules::Placement::Last))
                .map_err(|e| Error::Sandbox(e.to_string()))?;
            let f = fs::File::open(&path).map_err(|e| Error::Sandbox(e.to_string()))?;
            let mut cmd = bed.sb.cmd(&node, &["iptables-restore"]);
            cmd.stdin(f);
            datapath::timed(
                cmd,
                Duration::from_secs(opts.rule_load_timeout),
                "iptables-restore",
            )?;
        }
        Mode::ConnectTime | Mode::ConnectTimeNoTc | Mode::Tc => {
            if let Some(pid) = bed.agent.take() {
                bed.sb.stop(pid, libc::SIGTERM)?;
            }
            let path = bed.sb.path("services.yaml");
            let text = serde_yaml_ng::to_string(&workload::to_config(svcs))
                .map_err(|e| Error::Sandbox(e.to_string()))?;
            fs::write(&path, text).map_err(|e| Error::Sandbox(e.to_string()))?;
            let cgroup = bed
                .cg
                .as_ref()
                .filter(|_| bed.mode.connect_time())
                .map(|c| c.path_str());
            // (A glob that matches nothing: the agent warns and attaches no tc program.)
            let interfaces = if bed.mode == Mode::ConnectTimeNoTc {
                "lbnone-*"
            } else {
                "lxc-*"
            };
            // The node's eth0 as its external interface, as on a node (XDP there sees
            // none of the bench's traffic, which stays between pods).
            let (pid, _) = datapath::start_agent_on(
                &bed.sb,
                &path,
                interfaces,
                Some(bed.sb.external_interface()),
                cgroup,
                svcs.len(),
                workload::endpoint_count(svcs),
                &format!("agent-{}.log", svcs.len()),
            )?;
            bed.agent = Some(pid);
        }
    }
    Ok(())
}

/// One run. With `stats` (lb modes), the kernel's run-time accounting of BPF programs is
/// on for it, which itself costs every program run two clock reads: the runs the
/// rates come from are made without it.
fn measure(beds: &[Bed], i: usize, secs: f64, threads: usize, stats: bool) -> Result<Run> {
    let _paused = pause_others(beds, i);
    let bed = &beds[i];
    if let Some(pid) = bed.agent {
        settle(pid);
    }
    let lb = stats && bed.agent.is_some();
    let _stats = if lb { Some(progtime::enable()?) } else { None };
    let agent_before = bed.agent.and_then(cpu::process_ticks);
    let before = rewritten(bed);
    let progs_before = progtime::snapshot(bed.sb.pin_dir());
    let lr = {
        let _joined = match &bed.cg {
            Some(cg) => Some(join(cg)?),
            None => None,
        };
        loadgen::run(
            &bed.sb.pod("client").netns,
            &targets(bed),
            if bed.mode == Mode::DirectRandom {
                loadgen::Spread::Random
            } else {
                loadgen::Spread::RoundRobin
            },
            threads,
            Duration::from_millis(500),
            Duration::from_secs_f64(secs),
            50_000_000,
        )?
    };
    let after = rewritten(bed);
    let agent_after = bed.agent.and_then(cpu::process_ticks);
    let progs_after = progtime::snapshot(bed.sb.pin_dir());
    let per_conn = |c: u64| c as f64 / lr.ok.max(1) as f64;
    let sock = progtime::delta(&progs_before, &progs_after, progtime::is_socket_program);
    let packet = progtime::delta(&progs_before, &progs_after, |n| {
        !progtime::is_socket_program(n)
    });
    if lb {
        progress(format!(
            "      per program: {}",
            progtime::per_program(&progs_before, &progs_after)
        ));
    }
    Ok(Run {
        cps: lr.conns_per_sec(),
        p50_us: quantile(&lr.latencies_us, 0.50),
        p99_us: quantile(&lr.latencies_us, 0.99),
        errors: lr.errors,
        cpu_us_per_conn: lr.cpu_us_per_request,
        agent_us_per_conn: agent_before
            .zip(agent_after)
            .map(|(b, a)| per_conn(a - b) * 1e6 / cpu::ticks_per_sec()),
        connections: lr.ok,
        rewritten: before.zip(after).map(|(b, a)| a - b),
        sock_ns_per_conn: lb.then(|| per_conn(sock.ns)),
        packet_ns_per_conn: lb.then(|| per_conn(packet.ns)),
        packet_runs_per_conn: lb.then(|| per_conn(packet.runs)),
    })
}

/// Repeats of every mode (`--repeats`): many short runs rather than a few long ones.
/// The machine's speed drifts by tens of percent over seconds (two cores shared with
/// the nginx pods and whatever else runs), and a ratio of two runs only cancels the drift
/// the two saw alike: short runs back to back, each repeat in a rotated order, and the
/// median of many pair ratios.
fn repeats(opts: &Opts) -> usize {
    opts.repeats.unwrap_or(if opts.quick { 3 } else { 12 })
}

/// Seconds per run (`--conn-secs`), after the load generator's 0.5 s warm-up.
fn run_secs(opts: &Opts) -> f64 {
    opts.conn_secs.unwrap_or(if opts.quick { 1.0 } else { 1.5 })
}

pub fn run(opts: &Opts) -> Result<()> {
    crate::sandbox::require_tools(&["ip", "nginx", "ss", "iptables-restore"])?;
    let scales = opts.scales.clone().unwrap_or_else(|| {
        if opts.quick {
            vec![1, 1000]
        } else {
            vec![1, 10_000]
        }
    });
    progress(format!(
        "creating {} identical sandboxes (one per mode)",
        MODES.len()
    ));
    let mut beds = Vec::new();
    for mode in MODES {
        let sb = datapath::web_sandbox(mode.prefix(), &PODS)?;
        // Every mode's load generator runs in a cgroup of its own, so that only the
        // programs differ between modes; the connect-time agents attach to theirs.
        let cg = Some(TestCgroup::create(mode.prefix())?);
        beds.push(Bed {
            mode,
            sb,
            agent: None,
            cg,
        });
    }
    let web: Vec<Ipv4Addr> = ["be-1", "be-2", "be-3"]
        .iter()
        .map(|b| beds[0].sb.pod(b).ip)
        .collect();
    let mut out = Vec::new();
    for &scale in &scales {
        check_interrupted()?;
        let svcs = workload::services(scale, Endpoints::Mixed, &web, web[2]);
        progress(format!("scale {}: loading every mode", svcs.len()));
        let mut modes: Vec<ModeRuns> = Vec::new();
        for i in 0..beds.len() {
            let mode = beds[i].mode;
            let mut m = ModeRuns {
                mode,
                name: mode.name(),
                runs: Vec::new(),
                cost: None,
                skipped: None,
            };
            let probe = load(&mut beds[i], &svcs, opts)
                .and_then(|()| measure(&beds, i, 0.2, 1, false))
                .and_then(|r| {
                    if r.connections == 0 {
                        Err(Error::Sandbox("no answer through the service".into()))
                    } else {
                        Ok(r)
                    }
                });
            if let Err(e) = probe {
                check_interrupted()?;
                progress(format!("   {}: {e}", mode.name()));
                m.skipped = Some(e.to_string());
            }
            modes.push(m);
        }
        for rep in 0..repeats(opts) {
            let active: Vec<usize> = (0..beds.len())
                .filter(|&i| modes[i].skipped.is_none())
                .collect();
            for k in 0..active.len() {
                check_interrupted()?;
                let i = active[(k + rep) % active.len()];
                let r = measure(&beds, i, run_secs(opts), opts.threads, false)?;
                progress(format!(
                    "   scale {scale} repeat {}/{} {:<28} {:>8.0} conn/s p50 {:>6.0} us p99 {:>6.0} us cpu {:>5.1} us/conn errors {} rewritten {}",
                    rep + 1,
                    repeats(opts),
                    beds[i].mode.name(),
                    r.cps,
                    r.p50_us,
                    r.p99_us,
                    r.cpu_us_per_conn.unwrap_or(f64::NAN),
                    r.errors,
                    r.rewritten.map_or("-".into(), |n| n.to_string()),
                ));
                modes[i].runs.push(r);
            }
        }
        for (i, bed) in beds.iter().enumerate() {
            if modes[i].skipped.is_none() && bed.agent.is_some() {
                check_interrupted()?;
                let r = measure(&beds, i, run_secs(opts), opts.threads, true)?;
                progress(format!(
                    "   scale {scale} programs' cost {:<28} socket {} ns/conn, tc/XDP {} ns/conn",
                    bed.mode.name(),
                    r.sock_ns_per_conn.map_or("-".into(), |n| format!("{n:.0}")),
                    r.packet_ns_per_conn
                        .map_or("-".into(), |n| format!("{n:.0}")),
                ));
                modes[i].cost = Some(r);
            }
        }
        out.push(Scale {
            services: svcs.len(),
            modes,
        });
    }
    for bed in beds.iter_mut() {
        if let Some(pid) = bed.agent.take() {
            let _ = bed.sb.stop(pid, libc::SIGTERM);
        }
    }
    drop(beds);
    let md = markdown(&out, opts);
    fs::create_dir_all(&opts.out).map_err(|e| Error::Sandbox(e.to_string()))?;
    let json = serde_json::to_string_pretty(&out).map_err(|e| Error::Sandbox(e.to_string()))?;
    for (name, text) in [("connect_time.md", &md), ("connect_time.json", &json)] {
        let p = opts.out.join(name);
        fs::write(&p, text).map_err(|e| Error::Sandbox(format!("{}: {e}", p.display())))?;
    }
    println!("{md}");
    progress(format!(
        "wrote {}/connect_time.md and connect_time.json",
        opts.out.display()
    ));
    Ok(())
}

fn fmt_summary(v: &[f64], digits: usize) -> String {
    let s = summarize(v);
    if s.n == 0 {
        return "–".into();
    }
    format!("{:.d$} ({:.d$}–{:.d$})", s.median, s.min, s.max, d = digits)
}

/// One value of every run of a measured mode at a scale, in run order (empty if the
/// mode was skipped there).
fn series(s: &Scale, mode: Mode, f: fn(&Run) -> f64) -> Vec<f64> {
    s.modes
        .iter()
        .find(|m| m.mode == mode && m.skipped.is_none())
        .map(|m| m.runs.iter().map(f).collect())
        .unwrap_or_default()
}

fn markdown(scales: &[Scale], opts: &Opts) -> String {
    use std::fmt::Write as _;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "### Connect-time balancing (new connections per second, {} repeats of {} s x {} threads)\n",
        repeats(opts),
        run_secs(opts),
        opts.threads
    );
    let _ = writeln!(
        md,
        "| services | mode | new conn/s | p50 µs | p99 µs | CPU µs per connection | of it the agent's process | errors | packets rewritten by a program per connection | socket programs, ns per connection | tc/XDP programs, ns per connection (runs) |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|");
    let runs = |m: &ModeRuns, f: fn(&Run) -> f64| m.runs.iter().map(f).collect::<Vec<f64>>();
    for s in scales {
        for m in &s.modes {
            if let Some(why) = &m.skipped {
                let _ = writeln!(
                    md,
                    "| {} | {} | not measured: {why} | | | | | | | | |",
                    s.services, m.name
                );
                continue;
            }
            let per_conn = match m
                .runs
                .iter()
                .map(|r| r.rewritten)
                .collect::<Option<Vec<_>>>()
            {
                Some(v) if !v.is_empty() => {
                    let conns: u64 = m.runs.iter().map(|r| r.connections).sum();
                    let total: u64 = v.iter().sum();
                    format!(
                        "{:.2} ({total} in {conns})",
                        total as f64 / conns.max(1) as f64
                    )
                }
                _ => "–".into(),
            };
            let errors: u64 = m.runs.iter().map(|r| r.errors).sum();
            let cost = |f: fn(&Run) -> Option<f64>| -> String {
                m.cost
                    .as_ref()
                    .and_then(f)
                    .map_or("–".into(), |v| format!("{v:.0}"))
            };
            let packet = match m.cost.as_ref().and_then(|r| r.packet_runs_per_conn) {
                Some(runs) => format!("{} ({runs:.1})", cost(|r| r.packet_ns_per_conn)),
                None => "–".into(),
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {errors} | {per_conn} | {} | {packet} |",
                s.services,
                m.name,
                fmt_summary(&runs(m, |r| r.cps), 0),
                fmt_summary(&runs(m, |r| r.p50_us), 0),
                fmt_summary(&runs(m, |r| r.p99_us), 0),
                fmt_summary(&runs(m, |r| r.cpu_us_per_conn.unwrap_or(f64::NAN)), 1),
                fmt_summary(&runs(m, |r| r.agent_us_per_conn.unwrap_or(f64::NAN)), 2),
                cost(|r| r.sock_ns_per_conn),
            );
        }
    }
    let _ = writeln!(
        md,
        "\nRatios of new conn/s, pair by pair (runs of a repeat are back to back), median (min–max):\n"
    );
    let _ = writeln!(
        md,
        "| services | connect-time / no LB at random | connect-time without tc on veths / no LB at random | tc path / no LB at random | iptables / no LB at random | connect-time / no LB in turn | no LB at random / no LB in turn | connect-time / tc path | connect-time / iptables |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|");
    // The worst scale's median pair ratio of connect-time against each baseline.
    let mut worst_random = f64::INFINITY;
    let mut worst_turn = f64::INFINITY;
    let mut rewrites = 0u64;
    for s in scales {
        let cps = |mode: Mode| series(s, mode, |r| r.cps);
        let ratio = |a: Mode, b: Mode| {
            let r = pair_ratios(&cps(a), &cps(b));
            (fmt_summary(&r, 2), r)
        };
        let (ct_random, r) = ratio(Mode::ConnectTime, Mode::DirectRandom);
        if !r.is_empty() {
            worst_random = worst_random.min(summarize(&r).median);
        }
        let (ct_turn, r) = ratio(Mode::ConnectTime, Mode::Direct);
        if !r.is_empty() {
            worst_turn = worst_turn.min(summarize(&r).median);
        }
        for m in s.modes.iter().filter(|m| m.mode.connect_time()) {
            rewrites += m.runs.iter().filter_map(|r| r.rewritten).sum::<u64>();
        }
        let _ = writeln!(
            md,
            "| {} | {ct_random} | {} | {} | {} | {ct_turn} | {} | {} | {} |",
            s.services,
            ratio(Mode::ConnectTimeNoTc, Mode::DirectRandom).0,
            ratio(Mode::Tc, Mode::DirectRandom).0,
            ratio(Mode::Iptables, Mode::DirectRandom).0,
            ratio(Mode::DirectRandom, Mode::Direct).0,
            ratio(Mode::ConnectTime, Mode::Tc).0,
            ratio(Mode::ConnectTime, Mode::Iptables).0,
        );
    }
    let _ = writeln!(
        md,
        "\nThe machine's busy CPU time per connection (all cores, every process, the kernel included), pair by pair against no LB at random, median (min–max). The two cores stay busy in every mode, so this is the rate's inverse seen from the CPU, and it drifts with the machine as the rate does:\n"
    );
    let _ = writeln!(
        md,
        "| services | connect-time | connect-time without tc on veths | tc path | iptables | no LB in turn |\n|---|---|---|---|---|---|"
    );
    for s in scales {
        let cpu = |mode: Mode| series(s, mode, |r| r.cpu_us_per_conn.unwrap_or(f64::NAN));
        let ratio = |a: Mode| fmt_summary(&pair_ratios(&cpu(a), &cpu(Mode::DirectRandom)), 3);
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} |",
            s.services,
            ratio(Mode::ConnectTime),
            ratio(Mode::ConnectTimeNoTc),
            ratio(Mode::Tc),
            ratio(Mode::Iptables),
            ratio(Mode::Direct),
        );
    }
    let verdict = |ok: bool| if ok { "**met**" } else { "**missed**" };
    let _ = writeln!(
        md,
        "\n| target | goal | result | verdict |\n|---|---|---|---|"
    );
    if worst_random.is_finite() {
        let _ = writeln!(
            md,
            "| new conn/s, connect-time / no load balancer, the client drawing a pod per connection as a balancer does (worst scale, median of pair ratios) | ≥ 0.97 | {worst_random:.2} | {} |",
            verdict(worst_random >= 0.97)
        );
    }
    if worst_turn.is_finite() {
        let _ = writeln!(
            md,
            "| the same against a client taking the pods in turn (an even spread no per-connection choice has; the spread's cost included) | ≥ 0.97 | {worst_turn:.2} | {} |",
            verdict(worst_turn >= 0.97)
        );
    }
    let _ = writeln!(
        md,
        "| packets of connect-time flows rewritten by a program (all runs) | 0 | {rewrites} | {} |",
        verdict(rewrites == 0)
    );
    let _ = writeln!(
        md,
        "\nHow: a sandbox per mode (node, client pod, three nginx pods), the same Services at each scale (the tested one and fillers with 1 to 10 endpoints). The load generator (4 threads in the client pod's network namespace, a new TCP connection per HTTP/1.0 request, closed loop, latency from connect to the last byte) runs in the bench's process, which joins a cgroup the bench made for each connect-time mode for its runs only; the agent there has its socket programs on that cgroup (`--cgroup`, and `--pods-in-cgroup`: the cgroup stands for a node's cgroup v2 root, under which every pod runs), the tc-path agent none (`--cgroup none`); every lb agent has the node's eth0 as its external interface, which none of this traffic crosses; \"no tc on veths\": the connect-time agent with no pod interface to attach to (`--interfaces` matching none). No LB: the client spreads over the pod IPs itself, either in turn (worker w starting at pod w, an even spread at every moment) or drawing a pod at random for each connection, which is the spread every balancer here has (kube-proxy's iptables draws, this project hashes per socket or flow): now and then two of the four workers meet at one nginx while another idles; the two baselines show what that costs. Every mode's load generator runs in a cgroup of its own (only the connect-time agents attach to theirs), so the modes differ by their programs only. While one mode runs, the other modes' agents are stopped (SIGSTOP); before each run the mode's own agent first finishes the periodic work that came due while it was stopped (the bench waits until it has been idle for 0.3 s), so that such work falls into a run only when it comes due during one, as often as on a node. The programs' own cost (socket, tc/XDP columns) comes from one more run per lb mode with the kernel's run-time accounting of BPF programs on (`BPF_ENABLE_STATS`, which itself adds two clock reads per program run, so the rate runs are made without it). Connect-time balancing covering every pod flow there (pods' sockets and connected UDP translated, every pod client under the cgroup, an external interface for traffic from outside), the connect-time agent attaches no program to the pods' veths (`lb_userspace::podpath`): no program runs for its flows' packets, as with \"no tc on veths\", and the counters show no program rewrote any."
    );
    md
}
