//! Data path runs: TCP throughput (iperf3), CPU per Gbit, new connections per second and
//! request latency, for each mode at each scale, interleaved.
use std::{
    io::Read,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use super::{
    check_interrupted, loadgen, progress, rules,
    workload::{
        self, Endpoints, IPERF_IP, IPERF_IP6, IPERF_PORT, WEB_IP, WEB_IP6, WEB_PORT,
        WEB_TARGET_PORT,
    },
    Opts,
};
use crate::{sandbox::Sandbox, Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Direct,
    /// kube-proxy's iptables rules with the services under test last in KUBE-SERVICES.
    Iptables,
    /// The same rules with the services under test in the middle of KUBE-SERVICES.
    IptablesMiddle,
    Nft,
    Ebpf,
}

pub const MODES: [Mode; 5] = [
    Mode::Direct,
    Mode::Iptables,
    Mode::IptablesMiddle,
    Mode::Nft,
    Mode::Ebpf,
];

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Direct => "no LB (pod IP)",
            Mode::Iptables => "kube-proxy iptables (last)",
            Mode::IptablesMiddle => "kube-proxy iptables (middle)",
            Mode::Nft => "kube-proxy nftables",
            Mode::Ebpf => "lb (eBPF)",
        }
    }
    pub fn key(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Iptables => "iptables",
            Mode::IptablesMiddle => "iptables-middle",
            Mode::Nft => "nftables",
            Mode::Ebpf => "ebpf",
        }
    }
    fn prefix(self) -> &'static str {
        match self {
            Mode::Direct => "lbbench-dir",
            Mode::Iptables => "lbbench-ipt",
            Mode::IptablesMiddle => "lbbench-ipm",
            Mode::Nft => "lbbench-nft",
            Mode::Ebpf => "lbbench-ebp",
        }
    }
}

/// Written as its key ("iptables-middle").
impl Serialize for Mode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.key())
    }
}

/// One repeat of one mode (NaN where a run failed).
#[derive(Clone, Debug, Serialize)]
pub struct Run {
    pub gbps: f64,
    pub cpu_s_per_gbit: f64,
    #[serde(rename = "conns_per_s")]
    pub cps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub errors: u64,
    /// The same over IPv6, for the modes that have it (no LB, this dataplane); NaN for
    /// the others (kube-proxy's rules here are IPv4's).
    pub ipv6: Option<Run6>,
}

/// IPv6 figures of one repeat.
#[derive(Clone, Debug, Serialize)]
pub struct Run6 {
    pub gbps: f64,
    #[serde(rename = "conns_per_s")]
    pub cps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub errors: u64,
}

#[derive(Clone, Debug)]
pub struct ModeResult {
    pub mode: Mode,
    /// Rule load (iptables-restore / nft -f) or agent start to synced-and-attached, seconds.
    pub setup_secs: Option<f64>,
    /// Agent VmRSS / VmHWM after start, MiB (eBPF only).
    pub agent_rss_mib: Option<(f64, f64)>,
    /// Why this mode was not measured at this scale.
    pub skipped: Option<String>,
    pub runs: Vec<Run>,
    pub first_error: Option<String>,
}

#[derive(Clone, Debug)]
pub struct ScaleResult {
    pub services: usize,
    pub endpoints: usize,
    pub modes: Vec<ModeResult>,
}

const PODS: [&str; 5] = ["client", "be-1", "be-2", "be-3", "iperf"];

struct Bed {
    mode: Mode,
    sb: Sandbox,
    agent: Option<u32>,
}

impl Bed {
    fn create(mode: Mode) -> Result<Self> {
        let sb = web_sandbox(mode.prefix(), &PODS)?;
        sb.start_iperf3("iperf", IPERF_PORT)?;
        Ok(Self {
            mode,
            sb,
            agent: None,
        })
    }

    fn web_targets(&self) -> Vec<SocketAddr> {
        match self.mode {
            // No load balancer: the client spreads over the pods itself.
            Mode::Direct => ["be-1", "be-2", "be-3"]
                .iter()
                .map(|b| SocketAddr::V4(SocketAddrV4::new(self.sb.pod(b).ip, WEB_TARGET_PORT)))
                .collect(),
            _ => vec![SocketAddr::V4(SocketAddrV4::new(WEB_IP, WEB_PORT))],
        }
    }

    fn iperf_target(&self) -> IpAddr {
        match self.mode {
            Mode::Direct => self.sb.pod("iperf").ip.into(),
            _ => IPERF_IP.into(),
        }
    }

    /// Measured over IPv6 too: the path without a load balancer and this dataplane.
    fn has_ipv6(&self) -> bool {
        matches!(self.mode, Mode::Direct | Mode::Ebpf)
    }

    fn web_targets6(&self) -> Vec<SocketAddr> {
        match self.mode {
            Mode::Direct => ["be-1", "be-2", "be-3"]
                .iter()
                .map(|b| SocketAddr::new(self.sb.pod(b).ip6.into(), WEB_TARGET_PORT))
                .collect(),
            _ => vec![SocketAddr::new(WEB_IP6.into(), WEB_PORT)],
        }
    }

    fn iperf_target6(&self) -> IpAddr {
        match self.mode {
            Mode::Direct => self.sb.pod("iperf").ip6.into(),
            _ => IPERF_IP6.into(),
        }
    }
}

/// A sandbox of `pods` for the new-connection benchmarks: the pod `client` tuned to open
/// connections fast (the whole local port range, TIME_WAIT reuse), nginx on `be-1` to
/// `be-3` (a deep accept queue) on [`WEB_TARGET_PORT`].
pub fn web_sandbox(prefix: &str, pods: &[&str]) -> Result<Sandbox> {
    let sb = Sandbox::create(prefix, pods)?;
    let client = sb.pod("client").netns.clone();
    for (k, v) in [
        ("net.ipv4.ip_local_port_range", "1024 65535"),
        ("net.ipv4.tcp_tw_reuse", "1"),
    ] {
        sb.exec(&client, &["sysctl", "-qw", &format!("{k}={v}")])?;
    }
    for b in ["be-1", "be-2", "be-3"] {
        let ns = sb.pod(b).netns.clone();
        sb.exec(&ns, &["sysctl", "-qw", "net.core.somaxconn=4096"])?;
        sb.start_nginx(b, WEB_TARGET_PORT)?;
    }
    Ok(sb)
}

/// Runs `cmd` with a time limit; Ok(seconds) on success.
pub fn timed(mut cmd: Command, limit: Duration, what: &str) -> Result<f64> {
    let t = Instant::now();
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::Sandbox(format!("{what}: {e}")))?;
    loop {
        if let Some(st) = child
            .try_wait()
            .map_err(|e| Error::Sandbox(e.to_string()))?
        {
            if !st.success() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                err.truncate(2000);
                return Err(Error::Sandbox(format!("{what} failed ({st}): {err}")));
            }
            return Ok(t.elapsed().as_secs_f64());
        }
        if t.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::Sandbox(format!(
                "{what}: gave up after {} s",
                limit.as_secs()
            )));
        }
        if check_interrupted().is_err() {
            let _ = child.kill();
            let _ = child.wait();
            check_interrupted()?;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// VmRSS and VmHWM of a process, MiB.
pub fn rss_mib(pid: u32) -> Option<(f64, f64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let get = |key: &str| -> Option<f64> {
        let l = s.lines().find(|l| l.starts_with(key))?;
        let kb: f64 = l.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb / 1024.0)
    };
    Some((get("VmRSS:")?, get("VmHWM:")?))
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

/// Starts `lb run` on `config` in the sandbox's node namespace with maps sized for
/// `frontends` and `backends`; waits until it logged "running" (maps synced, interfaces
/// attached). Returns (pid, seconds from spawn to running).
pub fn start_agent(
    sb: &Sandbox,
    config: &Path,
    interfaces: &str,
    frontends: usize,
    backends: usize,
    log: &str,
) -> Result<(u32, f64)> {
    start_agent_with(sb, config, interfaces, None, frontends, backends, log)
}

/// [`start_agent`], with the XDP program on the `external` interfaces too.
pub fn start_agent_with(
    sb: &Sandbox,
    config: &Path,
    interfaces: &str,
    external: Option<&str>,
    frontends: usize,
    backends: usize,
    log: &str,
) -> Result<(u32, f64)> {
    start_agent_on(
        sb, config, interfaces, external, None, frontends, backends, log,
    )
}

/// [`start_agent_with`], with the socket programs on `cgroup` (a cgroup the bench made,
/// which holds every pod client of the bench: `--pods-in-cgroup`; `None`: `--cgroup
/// none`).
#[expect(
    clippy::too_many_arguments,
    reason = "the agent's knobs, each named at the call"
)]
pub fn start_agent_on(
    sb: &Sandbox,
    config: &Path,
    interfaces: &str,
    external: Option<&str>,
    cgroup: Option<&str>,
    frontends: usize,
    backends: usize,
    log: &str,
) -> Result<(u32, f64)> {
    let lb = crate::agent::lb_binary()?;
    let fe = (frontends + frontends / 4).max(1024);
    let be = (backends + backends / 4).max(4096);
    let mut cmd = Command::new(lb);
    cmd.args(["run", "--netns", &sb.node, "--interfaces", interfaces]);
    cmd.args(["--cgroup", cgroup.unwrap_or("none")]);
    if cgroup.is_some() {
        // The bench's cgroup stands for a node's cgroup v2 root: the clients of its
        // pods (the load generator) run under it.
        cmd.arg("--pods-in-cgroup");
    }
    if let Some(external) = external {
        cmd.args(["--external-interfaces", external]);
    }
    cmd.arg("--config")
        .arg(config)
        .arg("--pin-dir")
        .arg(sb.pin_dir())
        .args(["--poll-ms", "250"])
        .args(["--max-frontends", &fe.to_string()])
        .args([
            "--max-backends",
            &be.to_string(),
            "--max-slots",
            &be.to_string(),
        ])
        .args(["--max-conntrack", "262144"])
        .env("RUST_LOG", "info");
    let t = Instant::now();
    let pid = sb.spawn(cmd, log)?;
    let deadline = t + Duration::from_secs(600);
    loop {
        check_interrupted()?;
        if sb.log(log).contains("running interfaces") {
            return Ok((pid, t.elapsed().as_secs_f64()));
        }
        if !alive(pid) || Instant::now() > deadline {
            return Err(Error::Sandbox(format!(
                "the agent did not start; its log:\n{}",
                sb.log(log)
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Seconds iperf3 runs before it measures (`-O`): TCP slow start and the first
/// second's noise are left out of every number.
pub const IPERF_OMIT_SECS: u64 = 1;

/// What iperf3's `--json` output says (the fields read; serde ignores the rest).
#[derive(Debug, Deserialize)]
struct IperfJson {
    #[serde(default)]
    intervals: Vec<IperfInterval>,
    end: Option<IperfEnd>,
    error: Option<String>,
}

#[derive(Debug, Deserialize)]
struct IperfInterval {
    sum: IperfSum,
}

#[derive(Debug, Deserialize)]
struct IperfEnd {
    sum_sent: Option<IperfSum>,
    sum_received: Option<IperfSum>,
}

#[derive(Debug, Deserialize)]
struct IperfSum {
    seconds: f64,
    bytes: f64,
    bits_per_second: f64,
    #[serde(default)]
    omitted: bool,
}

/// The measured part of one iperf3 run (the omitted first seconds excluded).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct IperfOutcome {
    /// Received by the server, over `secs`.
    pub bits_per_second: f64,
    pub bytes: f64,
    pub secs: f64,
    /// Seconds of intervals iperf3 marked omitted (left out of the sums).
    pub omitted_secs: f64,
}

/// Reads iperf3's `--json` output of a run with `-O omit`. Checks that the omitted
/// seconds really are out of the sums: iperf3 marks those intervals `omitted` and
/// restarts its counters after them, so the sender's sum equals the bytes of the
/// intervals that are not omitted, and the receiver's sum covers `-t` seconds, not `-O
/// + -t`.
pub fn parse_iperf(text: &str, omit: u64) -> std::result::Result<IperfOutcome, String> {
    let j: IperfJson =
        serde_json::from_str(text).map_err(|e| format!("iperf3 --json output: {e}"))?;
    if let Some(e) = j.error {
        return Err(e);
    }
    let end = j.end.ok_or("iperf3 --json output: no \"end\"")?;
    let rx = end
        .sum_received
        .ok_or("iperf3 --json output: no \"end.sum_received\"")?;
    let omitted_secs = j
        .intervals
        .iter()
        .filter(|i| i.sum.omitted)
        .fold(0.0, |acc, i| acc + i.sum.seconds);
    if omit > 0 {
        if omitted_secs < omit as f64 * 0.9 {
            return Err(format!(
                "iperf3 omitted {omitted_secs:.2} s, asked for {omit} s"
            ));
        }
        let measured: f64 = j
            .intervals
            .iter()
            .filter(|i| !i.sum.omitted)
            .map(|i| i.sum.bytes)
            .sum();
        if let Some(tx) = &end.sum_sent {
            if (tx.bytes - measured).abs() > 0.01 * measured.max(1.0) {
                return Err(format!(
                    "iperf3's sum ({} bytes) is not the sum of its measured intervals ({measured})",
                    tx.bytes
                ));
            }
        }
    }
    if rx.bytes <= 0.0 || rx.seconds <= 0.0 {
        return Err("iperf3 received nothing".into());
    }
    Ok(IperfOutcome {
        bits_per_second: rx.bits_per_second,
        bytes: rx.bytes,
        secs: rx.seconds,
        omitted_secs,
    })
}

/// Busy jiffies at time `at`, interpolated between the samples around it.
fn busy_at(samples: &[(Instant, u64)], at: Instant) -> Option<f64> {
    let after = samples.iter().position(|(t, _)| *t >= at)?;
    if after == 0 {
        return (samples[0].0 == at).then_some(samples[0].1 as f64);
    }
    let ((t0, b0), (t1, b1)) = (samples[after - 1], samples[after]);
    let span = (t1 - t0).as_secs_f64();
    let f = if span > 0.0 {
        (at - t0).as_secs_f64() / span
    } else {
        1.0
    };
    Some(b0 as f64 + f * (b1 as f64 - b0 as f64))
}

/// One iperf3 run from the client: (Gbit/s received, CPU seconds per Gbit), both over
/// the measured seconds only: iperf3 runs `-O 1` (its first second omitted), and the
/// CPU is sampled (system-wide /proc/stat, every 50 ms) through the run and counted over
/// the last `secs` measured seconds before iperf3 ended.
fn iperf(bed: &Bed, target: IpAddr, secs: u64) -> Result<(f64, f64)> {
    let client = bed.sb.pod("client").netns.clone();
    let target = target.to_string();
    let mut child = bed
        .sb
        .cmd(
            &client,
            &[
                "timeout",
                "-k",
                "2",
                &(secs + IPERF_OMIT_SECS + 10).to_string(),
                "iperf3",
                "--connect-timeout",
                "3000",
                "-c",
                &target,
                "-p",
                &IPERF_PORT.to_string(),
                "-O",
                &IPERF_OMIT_SECS.to_string(),
                "-t",
                &secs.to_string(),
                "--json",
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| Error::Sandbox(format!("iperf3: {e}")))?;
    let mut stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let mut samples = vec![(Instant::now(), super::cpu::busy_ticks())];
    let status = loop {
        std::thread::sleep(Duration::from_millis(50));
        samples.push((Instant::now(), super::cpu::busy_ticks()));
        if let Some(st) = child
            .try_wait()
            .map_err(|e| Error::Sandbox(e.to_string()))?
        {
            break st;
        }
        if check_interrupted().is_err() {
            let _ = child.kill();
            let _ = child.wait();
            check_interrupted()?;
        }
    };
    let text = reader.join().unwrap_or_default();
    let outcome = parse_iperf(&text, IPERF_OMIT_SECS)
        .and_then(|o| {
            status
                .success()
                .then_some(o)
                .ok_or(format!("iperf3: {status}"))
        })
        .map_err(|e| Error::Sandbox(format!("iperf3 to {target} failed: {e}")))?;
    let (end, _) = *samples.last().expect("sampled");
    let start = end - Duration::from_secs_f64(outcome.secs);
    let cpu = match (busy_at(&samples, start), busy_at(&samples, end)) {
        (Some(a), Some(b)) => (b - a) / super::cpu::ticks_per_sec(),
        _ => f64::NAN,
    };
    Ok((
        outcome.bits_per_second / 1e9,
        cpu / (outcome.bytes * 8.0 / 1e9),
    ))
}

fn conns(bed: &Bed, targets: &[SocketAddr], opts: &Opts, secs: f64) -> Result<loadgen::LoadResult> {
    loadgen::run(
        &bed.sb.pod("client").netns,
        targets,
        loadgen::Spread::RoundRobin,
        opts.threads,
        Duration::from_millis(500),
        Duration::from_secs_f64(secs),
        50_000_000,
    )
}

/// Puts the services of one scale in place for `bed`'s mode.
fn load_scale(
    bed: &mut Bed,
    svcs: &[workload::Svc],
    opts: &Opts,
    res: &mut ModeResult,
) -> Result<()> {
    let limit = Duration::from_secs(opts.rule_load_timeout);
    let node = bed.sb.node.clone();
    match bed.mode {
        Mode::Direct => {}
        Mode::Iptables | Mode::IptablesMiddle => {
            let placement = if bed.mode == Mode::Iptables {
                rules::Placement::Last
            } else {
                rules::Placement::Middle
            };
            let path = bed.sb.path("iptables.rules");
            std::fs::write(&path, rules::iptables_restore(svcs, placement))
                .map_err(|e| Error::Sandbox(e.to_string()))?;
            let f = std::fs::File::open(&path).map_err(|e| Error::Sandbox(e.to_string()))?;
            let mut cmd = bed.sb.cmd(&node, &["iptables-restore"]);
            cmd.stdin(f);
            res.setup_secs = Some(timed(cmd, limit, "iptables-restore")?);
        }
        Mode::Nft => {
            let path = bed.sb.path("kube-proxy.nft");
            std::fs::write(&path, rules::nft_script(svcs, &[]))
                .map_err(|e| Error::Sandbox(e.to_string()))?;
            let cmd = bed
                .sb
                .cmd(&node, &["nft", "-f", &path.display().to_string()]);
            res.setup_secs = Some(timed(cmd, limit, "nft -f")?);
        }
        Mode::Ebpf => {
            if let Some(pid) = bed.agent.take() {
                bed.sb.stop(pid, libc::SIGTERM)?;
            }
            let path = bed.sb.path("services.yaml");
            let cfg = workload::to_config(svcs);
            let text = serde_yaml_ng::to_string(&cfg).map_err(|e| Error::Sandbox(e.to_string()))?;
            std::fs::write(&path, text).map_err(|e| Error::Sandbox(e.to_string()))?;
            let log = format!("agent-{}.log", svcs.len());
            let (pid, secs) = start_agent(
                &bed.sb,
                &path,
                "lxc-*",
                svcs.len(),
                workload::endpoint_count(svcs),
                &log,
            )?;
            bed.agent = Some(pid);
            res.setup_secs = Some(secs);
            res.agent_rss_mib = rss_mib(pid);
        }
    }
    // Sanity: one short burst through the path must get answers.
    let probe = loadgen::run(
        &bed.sb.pod("client").netns,
        &bed.web_targets(),
        loadgen::Spread::RoundRobin,
        1,
        Duration::ZERO,
        Duration::from_millis(200),
        20,
    )?;
    if probe.ok == 0 {
        let mut detail = String::new();
        if bed.mode == Mode::Ebpf {
            let show = lb_userspace::show::render(
                bed.sb.pin_dir(),
                lb_userspace::show::What::Counters,
                Default::default(),
                &Default::default(),
                None,
            )
            .unwrap_or_default();
            let log = bed.sb.log(&format!("agent-{}.log", svcs.len()));
            let tail: Vec<&str> = log.lines().rev().take(5).collect();
            detail = format!(
                "\n{show}\nagent log (last lines, newest first):\n{}",
                tail.join("\n")
            );
        }
        return Err(Error::Sandbox(format!(
            "{}: no answer through the service: {}{detail}",
            bed.mode.name(),
            probe.first_error.unwrap_or_default()
        )));
    }
    Ok(())
}

pub fn run_all(opts: &Opts) -> Result<Vec<ScaleResult>> {
    progress(format!(
        "creating {} identical sandboxes (one per mode)",
        MODES.len()
    ));
    let mut beds = Vec::new();
    for m in MODES {
        beds.push(Bed::create(m)?);
    }
    let web: Vec<Ipv4Addr> = ["be-1", "be-2", "be-3"]
        .iter()
        .map(|b| beds[0].sb.pod(b).ip)
        .collect();
    let iperf_ip = beds[0].sb.pod("iperf").ip;
    let web6: Vec<Ipv6Addr> = ["be-1", "be-2", "be-3"]
        .iter()
        .map(|b| beds[0].sb.pod(b).ip6)
        .collect();
    let iperf_ip6 = beds[0].sb.pod("iperf").ip6;
    let mut out = Vec::new();
    let mut gave_up: Vec<(Mode, String)> = Vec::new();
    for &scale in &opts.scales() {
        check_interrupted()?;
        let mut svcs = workload::services(scale, Endpoints::Mixed, &web, iperf_ip);
        workload::with_ipv6(&mut svcs, &web6, iperf_ip6);
        let endpoints = workload::endpoint_count(&svcs);
        progress(format!(
            "scale {}: {} services, {endpoints} endpoints: loading every mode",
            svcs.len(),
            svcs.len()
        ));
        let mut results: Vec<ModeResult> = Vec::new();
        for bed in beds.iter_mut() {
            let mut r = ModeResult {
                mode: bed.mode,
                setup_secs: None,
                agent_rss_mib: None,
                skipped: None,
                runs: Vec::new(),
                first_error: None,
            };
            let same_rules_failed = bed.mode == Mode::IptablesMiddle
                && results
                    .iter()
                    .any(|x| x.mode == Mode::Iptables && x.skipped.is_some());
            if let Some((_, why)) = gave_up.iter().find(|(m, _)| *m == bed.mode) {
                r.skipped = Some(format!("not measured: {why} at a smaller scale"));
            } else if same_rules_failed {
                // The same rules in another order: they would fail (or time out) too.
                let why = "not measured: the same rules failed to load in the (last) order";
                r.skipped = Some(why.into());
                gave_up.push((bed.mode, why.into()));
            } else if let Err(e) = load_scale(bed, &svcs, opts, &mut r) {
                check_interrupted()?;
                progress(format!("   {}: {e}", bed.mode.name()));
                let why = e.to_string();
                r.skipped = Some(why.clone());
                gave_up.push((bed.mode, why));
            }
            if let Some(s) = r.setup_secs {
                let what = if bed.mode == Mode::Ebpf {
                    "agent start to synced+attached"
                } else {
                    "rule load"
                };
                progress(format!("   {}: {what} {s:.2} s", bed.mode.name()));
            }
            results.push(r);
        }
        let active: Vec<usize> = (0..beds.len())
            .filter(|&i| results[i].skipped.is_none())
            .collect();
        for rep in 0..opts.repeats() {
            // Rotate the order every repeat: no mode always runs first or last.
            let order: Vec<usize> = (0..active.len())
                .map(|k| active[(k + rep) % active.len()])
                .collect();
            let mut tput = vec![(f64::NAN, f64::NAN); beds.len()];
            for &i in &order {
                check_interrupted()?;
                let target = beds[i].iperf_target();
                match iperf(&beds[i], target, opts.iperf_secs()) {
                    Ok(v) => tput[i] = v,
                    Err(e) => {
                        results[i].first_error.get_or_insert(e.to_string());
                    }
                }
            }
            for &i in &order {
                check_interrupted()?;
                let lr = conns(&beds[i], &beds[i].web_targets(), opts, opts.conn_secs())?;
                if results[i].first_error.is_none() {
                    results[i].first_error = lr.first_error.clone();
                }
                let run = Run {
                    gbps: tput[i].0,
                    cpu_s_per_gbit: tput[i].1,
                    cps: lr.conns_per_sec(),
                    p50_us: super::stats::quantile(&lr.latencies_us, 0.50),
                    p99_us: super::stats::quantile(&lr.latencies_us, 0.99),
                    errors: lr.errors,
                    ipv6: None,
                };
                progress(format!(
                    "   scale {scale} repeat {}/{} {:<20} {:>6.2} Gbit/s {:>5.2} CPU-s/Gbit {:>8.0} conn/s p50 {:>6.0} us p99 {:>6.0} us errors {}",
                    rep + 1,
                    opts.repeats(),
                    beds[i].mode.name(),
                    run.gbps,
                    run.cpu_s_per_gbit,
                    run.cps,
                    run.p50_us,
                    run.p99_us,
                    run.errors
                ));
                results[i].runs.push(run);
            }
            // The same over IPv6, where the mode has it, in the same rotated order.
            for &i in order.iter().filter(|&&i| beds[i].has_ipv6()) {
                check_interrupted()?;
                let target = beds[i].iperf_target6();
                let gbps = match iperf(&beds[i], target, opts.iperf_secs()) {
                    Ok((g, _)) => g,
                    Err(e) => {
                        results[i].first_error.get_or_insert(format!("IPv6: {e}"));
                        f64::NAN
                    }
                };
                let lr = conns(&beds[i], &beds[i].web_targets6(), opts, opts.conn_secs())?;
                if results[i].first_error.is_none() {
                    results[i].first_error = lr.first_error.clone().map(|e| format!("IPv6: {e}"));
                }
                let run6 = Run6 {
                    gbps,
                    cps: lr.conns_per_sec(),
                    p50_us: super::stats::quantile(&lr.latencies_us, 0.50),
                    p99_us: super::stats::quantile(&lr.latencies_us, 0.99),
                    errors: lr.errors,
                };
                progress(format!(
                    "   scale {scale} repeat {}/{} {:<20} IPv6 {:>6.2} Gbit/s {:>8.0} conn/s p50 {:>6.0} us p99 {:>6.0} us errors {}",
                    rep + 1,
                    opts.repeats(),
                    beds[i].mode.name(),
                    run6.gbps,
                    run6.cps,
                    run6.p50_us,
                    run6.p99_us,
                    run6.errors
                ));
                if let Some(run) = results[i].runs.last_mut() {
                    run.ipv6 = Some(run6);
                }
            }
        }
        out.push(ScaleResult {
            services: svcs.len(),
            endpoints,
            modes: results,
        });
    }
    progress("removing the sandboxes");
    for bed in beds.iter_mut() {
        if let Some(pid) = bed.agent.take() {
            let _ = bed.sb.stop(pid, libc::SIGTERM);
        }
    }
    drop(beds);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// iperf3 3.12 `-c ... -O 1 -t 2 --json` (trimmed to the fields read): the omitted
    /// first second, then two measured ones whose counters restart at 0.
    const IPERF_SAMPLE: &str = r#"{
        "start": {"test_start": {"protocol": "TCP", "num_streams": 1, "omit": 1, "duration": 2}},
        "intervals": [
            {"streams": [], "sum": {"start": 0, "end": 1.00064, "seconds": 1.0006400346755981, "bytes": 1572339712, "bits_per_second": 12570672030.005224, "retransmits": 0, "omitted": true, "sender": true}},
            {"streams": [], "sum": {"start": 4.8e-05, "end": 1.000007, "seconds": 1.000054955482483, "bytes": 1394606080, "bits_per_second": 11156235543.693, "retransmits": 3738, "omitted": false, "sender": true}},
            {"streams": [], "sum": {"start": 1.000007, "end": 1.999553, "seconds": 0.999545991420746, "bytes": 1579417600, "bits_per_second": 12641079958.752312, "retransmits": 113, "omitted": false, "sender": true}}
        ],
        "end": {
            "sum_sent": {"start": 0, "end": 1.999553, "seconds": 1.999553, "bytes": 2974023680, "bits_per_second": 11898754091.539457, "retransmits": 3851, "sender": true},
            "sum_received": {"start": 0, "end": 2.00302, "seconds": 2.00302, "bytes": 2979399888, "bits_per_second": 11899631109.025373, "sender": true},
            "cpu_utilization_percent": {"host_total": 40.1}
        }
    }"#;

    #[test]
    fn iperf_json_is_read_without_the_omitted_second() {
        let o = parse_iperf(IPERF_SAMPLE, 1).unwrap();
        assert!((o.bits_per_second - 11_899_631_109.0).abs() < 1.0);
        assert_eq!(o.bytes, 2979399888.0);
        assert!((o.secs - 2.003).abs() < 1e-3, "the measured seconds only");
        assert!((o.omitted_secs - 1.0).abs() < 1e-2);
        // A run where nothing was omitted fails the check when an omit was asked for.
        let none = IPERF_SAMPLE.replace("\"omitted\": true", "\"omitted\": false");
        let e = parse_iperf(&none, 1).unwrap_err();
        assert!(e.contains("omitted 0.00 s"), "{e}");
        // Sums that include the omitted interval's bytes are refused.
        let sums_all = IPERF_SAMPLE.replace("\"bytes\": 2974023680", "\"bytes\": 4546363392");
        assert!(parse_iperf(&sums_all, 1)
            .unwrap_err()
            .contains("not the sum"));
        // iperf3's own error is passed on.
        let e = parse_iperf(r#"{"start": {}, "intervals": [], "end": {}, "error": "unable to connect to server: Connection refused"}"#, 1)
            .unwrap_err();
        assert!(e.contains("Connection refused"), "{e}");
        assert!(parse_iperf("not json", 1).is_err());
    }

    #[test]
    fn cpu_samples_are_interpolated() {
        let t0 = Instant::now();
        let s = [
            (t0, 100),
            (t0 + Duration::from_millis(100), 110),
            (t0 + Duration::from_millis(200), 130),
        ];
        assert_eq!(busy_at(&s, t0 + Duration::from_millis(150)), Some(120.0));
        assert_eq!(busy_at(&s, t0 + Duration::from_millis(200)), Some(130.0));
        assert_eq!(busy_at(&s, t0), Some(100.0));
        assert_eq!(busy_at(&s, t0 + Duration::from_millis(300)), None);
    }
}
