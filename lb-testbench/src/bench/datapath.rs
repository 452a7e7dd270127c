//! Data path runs: TCP throughput (iperf3), CPU per Gbit, new connections per second and
//! request latency, for each mode at each scale, interleaved.
use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use super::{
    check_interrupted, loadgen, progress, rules,
    workload::{self, Endpoints, IPERF_IP, IPERF_PORT, WEB_IP, WEB_PORT, WEB_TARGET_PORT},
    Opts,
};
use crate::{sandbox::Sandbox, Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Direct,
    Iptables,
    Nft,
    Ebpf,
}

pub const MODES: [Mode; 4] = [Mode::Direct, Mode::Iptables, Mode::Nft, Mode::Ebpf];

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Direct => "no LB (pod IP)",
            Mode::Iptables => "kube-proxy iptables",
            Mode::Nft => "kube-proxy nftables",
            Mode::Ebpf => "lb (eBPF)",
        }
    }
    pub fn key(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Iptables => "iptables",
            Mode::Nft => "nftables",
            Mode::Ebpf => "ebpf",
        }
    }
    fn prefix(self) -> String {
        format!("lbbench-{}", &self.key()[..3])
    }
}

/// One repeat of one mode (NaN where a run failed).
#[derive(Clone, Debug)]
pub struct Run {
    pub gbps: f64,
    pub cpu_s_per_gbit: f64,
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
        let sb = Sandbox::create(&mode.prefix(), &PODS)?;
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

    fn iperf_target(&self) -> Ipv4Addr {
        match self.mode {
            Mode::Direct => self.sb.pod("iperf").ip,
            _ => IPERF_IP,
        }
    }
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
    let lb = crate::agent::lb_binary()?;
    let fe = (frontends + frontends / 4).max(1024);
    let be = (backends + backends / 4).max(4096);
    let mut cmd = Command::new(lb);
    cmd.args(["run", "--netns", &sb.node, "--interfaces", interfaces])
        .arg("--config")
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

/// Busy and total jiffies of all CPUs (system-wide /proc/stat).
fn cpu_jiffies() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let l = s.lines().next().unwrap_or("");
    let v: Vec<u64> = l
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

fn json_number_after(text: &str, section: &str, key: &str) -> Option<f64> {
    let s = &text[text.find(section)?..];
    let k = format!("\"{key}\":");
    let s = &s[s.find(&k)? + k.len()..];
    let end = s.find([',', '\n', '}']).unwrap_or(s.len());
    s[..end].trim().parse().ok()
}

/// One iperf3 run from the client: (Gbit/s received, CPU seconds per Gbit).
fn iperf(bed: &Bed, secs: u64) -> Result<(f64, f64)> {
    let client = bed.sb.pod("client").netns.clone();
    let target = bed.iperf_target().to_string();
    let (b0, _) = cpu_jiffies();
    let out = bed
        .sb
        .cmd(
            &client,
            &[
                "timeout",
                "-k",
                "2",
                &(secs + 10).to_string(),
                "iperf3",
                "--connect-timeout",
                "3000",
                "-c",
                &target,
                "-p",
                &IPERF_PORT.to_string(),
                "-t",
                &secs.to_string(),
                "-J",
            ],
        )
        .output()
        .map_err(|e| Error::Sandbox(format!("iperf3: {e}")))?;
    let (b1, _) = cpu_jiffies();
    let text = String::from_utf8_lossy(&out.stdout);
    let bps = json_number_after(&text, "\"sum_received\"", "bits_per_second");
    let bytes = json_number_after(&text, "\"sum_received\"", "bytes");
    match (out.status.success(), bps, bytes) {
        (true, Some(bps), Some(bytes)) if bytes > 0.0 => {
            // SAFETY: sysconf has no preconditions.
            let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
            let cpu = (b1 - b0) as f64 / hz;
            Ok((bps / 1e9, cpu / (bytes * 8.0 / 1e9)))
        }
        _ => Err(Error::Sandbox(format!(
            "iperf3 to {target} failed: {}",
            text.lines()
                .find(|l| l.contains("error"))
                .unwrap_or(&text[..text.len().min(300)])
        ))),
    }
}

fn conns(bed: &Bed, opts: &Opts, secs: f64) -> Result<loadgen::LoadResult> {
    loadgen::run(
        &bed.sb.pod("client").netns,
        &bed.web_targets(),
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
        Mode::Iptables => {
            let path = bed.sb.path("iptables.rules");
            std::fs::write(&path, rules::iptables_restore(svcs))
                .map_err(|e| Error::Sandbox(e.to_string()))?;
            let f = std::fs::File::open(&path).map_err(|e| Error::Sandbox(e.to_string()))?;
            let mut cmd = bed.sb.cmd(&node, &["iptables-restore"]);
            cmd.stdin(f);
            res.setup_secs = Some(timed(cmd, limit, "iptables-restore")?);
        }
        Mode::Nft => {
            let path = bed.sb.path("kube-proxy.nft");
            std::fs::write(&path, rules::nft_script(svcs))
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
        1,
        Duration::ZERO,
        Duration::from_millis(200),
        20,
    )?;
    if probe.ok == 0 {
        let mut detail = String::new();
        if bed.mode == Mode::Ebpf {
            let show =
                lb_userspace::show::render(bed.sb.pin_dir(), lb_userspace::show::What::Counters)
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
    progress("creating four identical sandboxes (one per mode)");
    let mut beds = Vec::new();
    for m in MODES {
        beds.push(Bed::create(m)?);
    }
    let web: Vec<Ipv4Addr> = ["be-1", "be-2", "be-3"]
        .iter()
        .map(|b| beds[0].sb.pod(b).ip)
        .collect();
    let iperf_ip = beds[0].sb.pod("iperf").ip;
    let mut out = Vec::new();
    let mut gave_up: Vec<(Mode, String)> = Vec::new();
    for &scale in &opts.scales() {
        check_interrupted()?;
        let svcs = workload::services(scale, Endpoints::Mixed, &web, iperf_ip);
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
            if let Some((_, why)) = gave_up.iter().find(|(m, _)| *m == bed.mode) {
                r.skipped = Some(format!("not measured: {why} at a smaller scale"));
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
                match iperf(&beds[i], opts.iperf_secs()) {
                    Ok(v) => tput[i] = v,
                    Err(e) => {
                        results[i].first_error.get_or_insert(e.to_string());
                    }
                }
            }
            for &i in &order {
                check_interrupted()?;
                let lr = conns(&beds[i], opts, opts.conn_secs())?;
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

    #[test]
    fn iperf_json_numbers() {
        let j = "{\"end\": {\"sum_sent\": {\"bytes\": 5, \"bits_per_second\": 1.0},\n\"sum_received\": {\"start\": 0,\n\"bytes\": 1250000000,\n\"bits_per_second\": 2.5e+10,\n\"sender\": true}}}";
        assert_eq!(
            json_number_after(j, "\"sum_received\"", "bits_per_second"),
            Some(2.5e10)
        );
        assert_eq!(
            json_number_after(j, "\"sum_received\"", "bytes"),
            Some(1.25e9)
        );
    }
}
