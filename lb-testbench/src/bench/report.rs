//! The results as a markdown table and as JSON (serde), with the machine they came from
//! and a met / missed line per target.
use std::fmt::Write;

use serde::Serialize;

use super::{
    control::ControlResult,
    datapath::{Mode, ModeResult, Run, ScaleResult},
    forwarding::{ForwardingResult, FwdMode},
    stats::{pair_ratios, quantile, summarize, Summary},
    Opts,
};
use crate::{Error, Result};

#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub date: String,
    pub nproc: usize,
    pub cpu: String,
    pub kernel: String,
    pub mem_gib: f64,
    pub iptables: String,
    pub nft: String,
    pub run: String,
}

fn cmd_out(prog: &str, args: &[&str]) -> String {
    std::process::Command::new(prog)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

impl Machine {
    pub fn describe(opts: &Opts) -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .unwrap_or("?")
            .trim()
            .to_string();
        let mem_kb: f64 = std::fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0.0);
        Machine {
            date: cmd_out("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            nproc: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            cpu,
            kernel: cmd_out("uname", &["-r"]),
            mem_gib: mem_kb / 1048576.0,
            iptables: cmd_out("iptables", &["-V"]),
            nft: cmd_out("nft", &["-v"]),
            run: format!(
                "{}: data path scales {:?}, {} repeats, iperf3 {} s (after {} s omitted), connection runs {} s x {} threads; forwarding rate {} x {} s, {} services; control plane scales {:?} x 10 endpoints",
                if opts.quick { "--quick" } else { "default" },
                opts.scales(),
                opts.repeats(),
                opts.iperf_secs(),
                super::datapath::IPERF_OMIT_SECS,
                opts.conn_secs(),
                opts.threads,
                opts.repeats(),
                opts.fwd_secs(),
                opts.fwd_services,
                opts.cp_scales()
            ),
        }
    }

    pub fn one_line(&self) -> String {
        format!(
            "{} x {}, kernel {}, {:.0} GiB",
            self.nproc, self.cpu, self.kernel, self.mem_gib
        )
    }
}

pub struct Report {
    pub machine: Machine,
    pub datapath: Vec<ScaleResult>,
    /// The forwarding rate with real packets (None: not run).
    pub forwarding: Option<ForwardingResult>,
    pub control: Vec<ControlResult>,
    /// Flows moved when one of N backends goes (`consistency`).
    pub consistency: Vec<super::consistency::ConsistencyRow>,
    /// `lb trace`'s cost when off (None: not run).
    pub trace_cost: Option<super::tracecost::TraceCost>,
}

fn fmt_sum(s: &Summary, prec: usize) -> String {
    if s.n == 0 {
        return "–".into();
    }
    if s.n == 1 {
        return format!("{:.*}", prec, s.median);
    }
    format!(
        "{:.*} ({:.*}–{:.*})",
        prec, s.median, prec, s.min, prec, s.max
    )
}

fn col(m: &ModeResult, f: impl Fn(&Run) -> f64) -> Vec<f64> {
    m.runs.iter().map(f).collect()
}

fn mode(s: &ScaleResult, m: Mode) -> Option<&ModeResult> {
    s.modes
        .iter()
        .find(|r| r.mode == m && r.skipped.is_none() && !r.runs.is_empty())
}

/// Median of pair-by-pair ratios a/b of one metric at one scale.
fn ratio(s: &ScaleResult, a: Mode, b: Mode, f: impl Fn(&Run) -> f64 + Copy) -> Option<Summary> {
    let (ma, mb) = (mode(s, a)?, mode(s, b)?);
    let r = summarize(&pair_ratios(&col(ma, f), &col(mb, f)));
    (r.n > 0).then_some(r)
}

/// IPv6 beside IPv4: the same client, services and backends over both families, for
/// the path without a load balancer and this dataplane (the Services under test are
/// dual stack), run after the IPv4 runs of each repeat.
fn ipv6_markdown(o: &mut String, datapath: &[ScaleResult]) {
    let has = |s: &ScaleResult| {
        s.modes
            .iter()
            .any(|m| m.runs.iter().any(|r| r.ipv6.is_some()))
    };
    if !datapath.iter().any(has) {
        return;
    }
    o.push_str("\n#### IPv6 beside IPv4\n\n");
    o.push_str("The Services under test are dual stack (an IPv6 cluster IP beside the IPv4 one, each served by the pods' addresses of its family); the same client, pods and measures as above, over IPv6, right after the IPv4 runs of each repeat. Ratios: pair by pair, median (min–max).\n\n");
    o.push_str("| services | mode | TCP Gbit/s IPv4 | TCP Gbit/s IPv6 | new conn/s IPv4 | new conn/s IPv6 | p99 µs IPv4 | p99 µs IPv6 |\n");
    o.push_str("|---|---|---|---|---|---|---|---|\n");
    let v6 =
        |f: fn(&super::datapath::Run6) -> f64| move |r: &Run| r.ipv6.as_ref().map_or(f64::NAN, f);
    for s in datapath.iter().filter(|s| has(s)) {
        for m in [Mode::Direct, Mode::Ebpf] {
            let Some(mr) = mode(s, m) else { continue };
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                s.services,
                m.name(),
                fmt_sum(&summarize(&col(mr, |r| r.gbps)), 2),
                fmt_sum(&summarize(&col(mr, v6(|r| r.gbps))), 2),
                fmt_sum(&summarize(&col(mr, |r| r.cps)), 0),
                fmt_sum(&summarize(&col(mr, v6(|r| r.cps))), 0),
                fmt_sum(&summarize(&col(mr, |r| r.p99_us)), 0),
                fmt_sum(&summarize(&col(mr, v6(|r| r.p99_us))), 0),
            );
        }
    }
    o.push_str("\n| services | lb / no LB, Gbit/s, IPv4 | lb / no LB, Gbit/s, IPv6 | lb / no LB, conn/s, IPv4 | lb / no LB, conn/s, IPv6 |\n|---|---|---|---|---|\n");
    for s in datapath.iter().filter(|s| has(s)) {
        let r = |f: &dyn Fn(&Run) -> f64| {
            ratio(s, Mode::Ebpf, Mode::Direct, f)
                .map(|r| fmt_sum(&r, 2))
                .unwrap_or("–".into())
        };
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} |",
            s.services,
            r(&|r: &Run| r.gbps),
            r(&v6(|r| r.gbps)),
            r(&|r: &Run| r.cps),
            r(&v6(|r| r.cps)),
        );
    }
}

struct Target {
    what: String,
    goal: String,
    got: String,
    verdict: String,
}

fn verdict(value: Option<f64>, goal: f64, higher_is_better: bool) -> String {
    match value {
        None => "not measured".into(),
        Some(v) if !v.is_finite() => "not measured".into(),
        Some(v) => {
            // Distance from the goal, as a share of the goal.
            let by = if higher_is_better {
                (v - goal) / goal
            } else {
                (goal - v) / goal
            };
            if by >= 0.0 {
                format!("**met** (by {:.0}%)", by * 100.0)
            } else {
                format!("**missed** (by {:.0}%)", -by * 100.0)
            }
        }
    }
}

impl Report {
    fn scale(&self, n: usize) -> Option<&ScaleResult> {
        self.datapath.iter().find(|s| s.services == n.max(2))
    }

    fn targets(&self) -> Vec<Target> {
        let mut t = Vec::new();
        // 1. Throughput via the ClusterIP vs the pod IP, worst scale.
        let worst = self
            .datapath
            .iter()
            .filter_map(|s| {
                Some((
                    s.services,
                    ratio(s, Mode::Ebpf, Mode::Direct, |r| r.gbps)?.median,
                ))
            })
            .min_by(|a, b| a.1.total_cmp(&b.1));
        t.push(Target {
            what: "TCP throughput via the ClusterIP / direct pod path (worst scale, median of pair ratios)".into(),
            goal: "≥ 0.97".into(),
            got: worst.map(|(n, v)| format!("{v:.3} at {n} services")).unwrap_or("–".into()),
            verdict: verdict(worst.map(|w| w.1), 0.97, true),
        });
        // 2. New conn/s vs iptables at 10k services, the services under test last in
        // KUBE-SERVICES and in its middle.
        for (m, placement) in [
            (Mode::Iptables, "last in"),
            (Mode::IptablesMiddle, "in the middle of"),
        ] {
            let (at, r) = match self
                .scale(10_000)
                .and_then(|s| ratio(s, Mode::Ebpf, m, |r| r.cps))
            {
                Some(r) => ("10000".to_string(), Some(r.median)),
                None => {
                    let alt = self.datapath.iter().rev().find_map(|s| {
                        Some((s.services, ratio(s, Mode::Ebpf, m, |r| r.cps)?.median))
                    });
                    match alt {
                        Some((n, v)) => (format!("{n} (10000 not run)"), Some(v)),
                        None => ("–".into(), None),
                    }
                }
            };
            t.push(Target {
                what: format!(
                    "new connections/s at 10k services / kube-proxy iptables, tested Service {placement} KUBE-SERVICES (median of pair ratios)"
                ),
                goal: "≥ 2.0".into(),
                got: r
                    .map(|v| format!("{v:.2} at {at} services"))
                    .unwrap_or("–".into()),
                verdict: if at.contains("not run") {
                    "not measured at 10k".into()
                } else {
                    verdict(r, 2.0, true)
                },
            });
        }
        // 3. New conn/s at 100k vs at 1 service (medians: different scales cannot pair).
        let cps =
            |n: usize| Some(summarize(&col(mode(self.scale(n)?, Mode::Ebpf)?, |r| r.cps)).median);
        let r = cps(100_000).zip(cps(1)).map(|(a, b)| a / b);
        t.push(Target {
            what: "new connections/s at 100k services / at 1 service (lb, ratio of medians)".into(),
            goal: "≥ 0.95".into(),
            got: r.map(|v| format!("{v:.3}")).unwrap_or("–".into()),
            verdict: verdict(r, 0.95, true),
        });
        // 4. Per-packet cost at the largest control plane scale, for each program.
        let largest = self
            .control
            .iter()
            .filter(|c| !c.packet.is_empty())
            .max_by_key(|c| c.services);
        for program in ["tc", "XDP"] {
            let cost = largest.and_then(|c| c.packet.iter().find(|p| p.program == program));
            for (case, name, goal) in [
                ("established flow, repeated", "established flow", 60.0),
                ("new flow", "new flow", 150.0),
            ] {
                let v = cost
                    .and_then(|p| p.cases.iter().find(|x| x.0.starts_with(case)))
                    .map(|x| x.1);
                t.push(Target {
                    what: format!(
                        "per-packet cost, {name}, {program} program (BPF_PROG_TEST_RUN, {} services)",
                        largest.map(|c| c.services).unwrap_or(0)
                    ),
                    goal: format!("≤ {goal:.0} ns"),
                    got: v.map(|v| format!("{v:.0} ns")).unwrap_or("–".into()),
                    verdict: verdict(v, goal, false),
                });
            }
        }
        // 5. Forwarding rate with real packets: XDP against kube-proxy's iptables NodePort.
        let r = self
            .forwarding
            .as_ref()
            .and_then(|f| f.ratios(FwdMode::Xdp, FwdMode::Iptables));
        t.push(Target {
            what: "forwarding rate to a NodePort, real packets on one core: lb XDP / kube-proxy iptables (median of pair ratios)".into(),
            goal: "≥ 3.0".into(),
            got: r.as_ref().map(|r| format!("{:.2}", r.median)).unwrap_or("–".into()),
            verdict: verdict(r.map(|r| r.median), 3.0, true),
        });
        // 6. The control plane through the real agents (not the library path).
        for agent in ["lb agent (Kubernetes)", "lb run (JSON file)"] {
            let run = |n: usize| {
                self.control
                    .iter()
                    .find(|c| c.services == n)
                    .and_then(|c| c.agents.iter().find(|a| a.agent == agent))
                    .filter(|a| a.error.is_none())
            };
            let big = run(100_000);
            let (synced, what) = if agent.starts_with("lb agent") {
                (big.and_then(|a| a.list_to_synced_secs), "its first list")
            } else {
                (big.and_then(|a| a.start_to_synced_secs), "its start")
            };
            t.push(Target {
                what: format!("{agent}: 100k services x 10 endpoints, from {what} to synced maps"),
                goal: "≤ 2 s".into(),
                got: synced.map(|v| format!("{v:.2} s")).unwrap_or("–".into()),
                verdict: verdict(synced, 2.0, false),
            });
            let rss = big.and_then(|a| a.rss_synced_mib);
            t.push(Target {
                what: format!("{agent}: resident memory (VmRSS) once synced, 100k x 10"),
                goal: "≤ 150 MiB".into(),
                got: rss.map(|v| format!("{v:.0} MiB")).unwrap_or("–".into()),
                verdict: verdict(rss, 150.0, false),
            });
            let peak = big.and_then(|a| a.peak_mib);
            t.push(Target {
                what: format!(
                    "{agent}: peak memory (VmHWM), 100k x 10, readiness changes included"
                ),
                goal: "≤ 300 MiB".into(),
                got: peak.map(|v| format!("{v:.0} MiB")).unwrap_or("–".into()),
                verdict: verdict(peak, 300.0, false),
            });
            for n in [10_000, 100_000] {
                let v = run(n).map(|a| quantile(&a.change_ms, 0.99));
                t.push(Target {
                    what: format!(
                        "{agent}: one endpoint readiness change to the maps at {}k services, p99",
                        n / 1000
                    ),
                    goal: "≤ 10 ms".into(),
                    got: v.map(|v| format!("{v:.2} ms")).unwrap_or("–".into()),
                    verdict: verdict(v, 10.0, false),
                });
            }
        }
        t
    }

    pub fn markdown(&self) -> String {
        let m = &self.machine;
        let mut o = String::new();
        let _ = writeln!(o, "### Benchmark results ({})\n", m.date);
        let _ = writeln!(
            o,
            "Machine: {} CPUs ({}), kernel {}, {:.0} GiB RAM; {}; {}.  \nRun: {}.\n",
            m.nproc, m.cpu, m.kernel, m.mem_gib, m.iptables, m.nft, m.run
        );
        o.push_str("Each value: median (min–max) over the repeats. Modes ran in separate but identical sandboxes, ");
        o.push_str("interleaved (order rotated every repeat). TCP throughput: iperf3 with its first second omitted (`-O 1`, excluded from its sums); ");
        o.push_str(
            "CPU-s/Gbit is system-wide (/proc/stat) over the measured seconds of the iperf3 run. ",
        );
        o.push_str("Connections: a new TCP connection per HTTP request to nginx, closed loop; latency is connect to last byte.\n\n");
        o.push_str("#### Data path\n\n");
        o.push_str("| services (endpoints) | mode | rules/agent ready | TCP Gbit/s | CPU-s/Gbit | new conn/s | p50 µs | p99 µs | errors |\n");
        o.push_str("|---|---|---|---|---|---|---|---|---|\n");
        for s in &self.datapath {
            for r in &s.modes {
                let scale = format!("{} ({})", s.services, s.endpoints);
                if let Some(why) = &r.skipped {
                    let mut why = why.replace('|', "/").replace('\n', " ");
                    why.truncate(120);
                    let _ = writeln!(o, "| {scale} | {} | {why} | | | | | | |", r.mode.name());
                    continue;
                }
                let setup = match (r.mode, r.setup_secs) {
                    (Mode::Direct, _) => "–".to_string(),
                    (Mode::Ebpf, Some(v)) => format!(
                        "{v:.2} s (RSS {:.0} MiB)",
                        r.agent_rss_mib.map(|x| x.0).unwrap_or(f64::NAN)
                    ),
                    (_, Some(v)) => format!("{v:.2} s"),
                    (_, None) => "–".into(),
                };
                let errors: u64 = r.runs.iter().map(|x| x.errors).sum();
                let _ = writeln!(
                    o,
                    "| {scale} | {} | {setup} | {} | {} | {} | {} | {} | {errors} |",
                    r.mode.name(),
                    fmt_sum(&summarize(&col(r, |x| x.gbps)), 2),
                    fmt_sum(&summarize(&col(r, |x| x.cpu_s_per_gbit)), 3),
                    fmt_sum(&summarize(&col(r, |x| x.cps)), 0),
                    fmt_sum(&summarize(&col(r, |x| x.p50_us)), 0),
                    fmt_sum(&summarize(&col(r, |x| x.p99_us)), 0),
                );
            }
        }
        o.push_str(
            "\nRatios, computed pair by pair (runs made back to back), median (min–max):\n\n",
        );
        o.push_str("| services | lb / no LB, Gbit/s | lb / iptables (last), conn/s | lb / iptables (middle), conn/s | lb / nftables, conn/s | lb / no LB, conn/s | lb / iptables (last), p99 | lb / iptables (middle), p99 |\n");
        o.push_str("|---|---|---|---|---|---|---|---|\n");
        for s in &self.datapath {
            let f = |a, b, g: fn(&Run) -> f64| {
                ratio(s, a, b, g)
                    .map(|r| fmt_sum(&r, 2))
                    .unwrap_or("–".into())
            };
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                s.services,
                f(Mode::Ebpf, Mode::Direct, |r| r.gbps),
                f(Mode::Ebpf, Mode::Iptables, |r| r.cps),
                f(Mode::Ebpf, Mode::IptablesMiddle, |r| r.cps),
                f(Mode::Ebpf, Mode::Nft, |r| r.cps),
                f(Mode::Ebpf, Mode::Direct, |r| r.cps),
                f(Mode::Ebpf, Mode::Iptables, |r| r.p99_us),
                f(Mode::Ebpf, Mode::IptablesMiddle, |r| r.p99_us),
            );
        }
        o.push_str("\nkube-proxy iptables: \"(last)\" has the ClusterIP rules of the Services under test after every other Service's in KUBE-SERVICES (the worst case), \"(middle)\" in the middle of them (where one is on average: kube-proxy writes that chain in the order of its service map, not by age); the same rules otherwise, in separate sandboxes.\n");
        let errs: Vec<String> = self
            .datapath
            .iter()
            .flat_map(|s| {
                s.modes.iter().filter_map(move |r| {
                    Some(format!(
                        "{} at {}: {}",
                        r.mode.name(),
                        s.services,
                        r.first_error.as_ref()?
                    ))
                })
            })
            .collect();
        if !errs.is_empty() {
            o.push_str("\nFirst error seen per mode and scale:\n\n");
            for e in errs {
                let _ = writeln!(o, "- {}", e.replace('\n', " "));
            }
        }
        ipv6_markdown(&mut o, &self.datapath);
        if let Some(f) = &self.forwarding {
            forwarding_markdown(&mut o, f);
        }
        if !self.control.is_empty() {
            o.push_str("\n#### Control plane and per-packet cost (N services x 10 endpoints)\n\n");
            o.push_str("The real agents, as operators run them: `lb agent` against the test API server (lists paginated by 500, as the API server does), `lb run` on a JSON file. \"first list\": from the agent's first list request to `/readyz` (ready means synced). A readiness change: one endpoint's `ready` flipped (in the API, or in the file, written aside and renamed) until the frontend's count in the kernel map changes.\n\n");
            o.push_str("| services | endpoints | agent | start to synced | first list to synced | VmRSS synced | VmRSS after changes | VmHWM (peak) | readiness change p50 / p99 (n) |\n");
            o.push_str("|---|---|---|---|---|---|---|---|---|\n");
            for c in &self.control {
                for a in &c.agents {
                    let f = |v: Option<f64>, unit: &str, prec: usize| {
                        v.map(|v| format!("{v:.prec$} {unit}"))
                            .unwrap_or("–".into())
                    };
                    let _ = writeln!(
                        o,
                        "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                        c.services,
                        c.endpoints,
                        a.agent,
                        f(a.start_to_synced_secs, "s", 2),
                        f(a.list_to_synced_secs, "s", 2),
                        f(a.rss_synced_mib, "MiB", 0),
                        f(a.rss_after_changes_mib, "MiB", 0),
                        f(a.peak_mib, "MiB", 0),
                        match &a.error {
                            Some(e) => format!("failed: {}", e.replace('\n', " ")),
                            None => format!(
                                "{:.2} / {:.2} ms ({})",
                                quantile(&a.change_ms, 0.5),
                                quantile(&a.change_ms, 0.99),
                                a.change_ms.len()
                            ),
                        }
                    );
                }
            }
            o.push_str("\nThe library path (what the agents run inside, without list, watch or file; for comparison): the model from scratch, `Dataplane::sync` from empty maps, one endpoint change through `ModelCache` and an incremental sync; and `lb run` on the same objects as YAML.\n\n");
            o.push_str("| services | endpoints | model | Dataplane::sync from empty | map writes | endpoint change p50 / p99 | lb run (YAML) spawn to synced | its VmRSS / VmHWM | map memlock |\n");
            o.push_str("|---|---|---|---|---|---|---|---|---|\n");
            for c in &self.control {
                let (rss, hwm) = c.agent_rss_mib.unwrap_or((f64::NAN, f64::NAN));
                let _ = writeln!(
                    o,
                    "| {} | {} | {:.3} s | {:.3} s | {} | {:.2} / {:.2} ms | {} | {rss:.0} / {hwm:.0} MiB | {:.1} MiB |",
                    c.services,
                    c.endpoints,
                    c.model_secs,
                    c.sync_secs,
                    c.sync_ops,
                    quantile(&c.change_us, 0.5) / 1e3,
                    quantile(&c.change_us, 0.99) / 1e3,
                    c.agent_secs.map(|s| format!("{s:.2} s")).unwrap_or("–".into()),
                    c.map_mib.iter().map(|m| m.1).sum::<f64>()
                );
            }
            o.push_str("\nThe conntrack collector (`lb_userspace::dataplane::gc`) on a conntrack table filled to its size with established flows: a pass that keeps them all, and one that expires half of them (both entries each).\n\n| services | entries | pass, nothing to expire | pass, half expired |\n|---|---|---|---|\n");
            for c in &self.control {
                if let Some((n, keep, expire)) = c.gc {
                    let _ = writeln!(
                        o,
                        "| {} | {n} | {keep:.1} ms | {expire:.1} ms |",
                        c.services
                    );
                }
            }
            o.push_str("\n| services | program | ");
            let names: Vec<&str> = self
                .control
                .iter()
                .flat_map(|c| c.packet.first())
                .flat_map(|p| p.cases.iter().map(|x| x.0))
                .take(6)
                .collect();
            for n in &names {
                let _ = write!(o, "{n} | ");
            }
            o.push('\n');
            o.push_str(&"|---".repeat(names.len() + 2));
            o.push_str("|\n");
            for c in &self.control {
                for p in &c.packet {
                    let _ = write!(o, "| {} | {} | ", c.services, p.program);
                    for (_, ns, raw, ret) in &p.cases {
                        let _ = write!(o, "{ns:.0} ns (raw {raw:.0}, verdict {ret}) | ");
                    }
                    o.push('\n');
                }
            }
            o.push_str("\nPer packet: BPF_PROG_TEST_RUN on each loaded program (tc: the pods' veths; XDP: the node's external interfaces) over maps holding the services above, with the conntrack filter on (as the agent's collector turns it on once the programs are attached); ");
            o.push_str("the kernel's own timing. The kernel repeats a run on the same buffer, so a packet the program rewrites ");
            o.push_str("would be measured as its rewritten self from the second run on. \"Repeated (ping-pong)\": two Services whose ");
            o.push_str("backends are each other's ClusterIP, so every repeat is again a real established-flow (or reply) translation; ");
            o.push_str("median of 5 x 200000 repeats (the method the issue asks for; the target rows use it). A new flow cannot be ");
            o.push_str("repeated (the first run creates its conntrack entry): new flow and the other rows are medians of 2000 single runs ");
            o.push_str("(new flow: a fresh source port each), minus the harness overhead of a single run, estimated from the packet to ");
            o.push_str("no Service (which is not rewritten): its single-run median minus its average over 200000 repeats");
            let oh: Vec<String> = self
                .control
                .iter()
                .flat_map(|c| c.packet.iter())
                .map(|p| format!("{} {:.0} ns", p.program, p.overhead_ns))
                .collect();
            let _ = writeln!(o, " ({}). \"raw\" is the single-run median before that subtraction. Verdicts: tc 0 = TC_ACT_OK, XDP 2 = XDP_PASS.", oh.join(", "));
            for c in self.control.iter().filter(|c| c.error.is_some()) {
                let _ = writeln!(
                    o,
                    "\nControl plane at {}: error: {}",
                    c.services,
                    c.error.as_deref().unwrap_or("")
                );
            }
        }
        o.push_str(&super::consistency::markdown(&self.consistency));
        if let Some(t) = &self.trace_cost {
            o.push_str(&super::tracecost::markdown(t));
        }
        o.push_str("\n#### Targets\n\n| target | goal | result | verdict |\n|---|---|---|---|\n");
        for t in self.targets() {
            let _ = writeln!(o, "| {} | {} | {} | {} |", t.what, t.goal, t.got, t.verdict);
        }
        o
    }

    /// The results as JSON: the same numbers as the markdown, each run of each mode.
    pub fn json(&self) -> Result<String> {
        let doc = JsonReport {
            machine: &self.machine,
            datapath: self
                .datapath
                .iter()
                .map(|s| JsonScale {
                    services: s.services,
                    endpoints: s.endpoints,
                    modes: s
                        .modes
                        .iter()
                        .map(|r| JsonMode {
                            mode: r.mode,
                            setup_secs: r.setup_secs,
                            agent_rss_mib: r.agent_rss_mib.map(|v| v.0),
                            skipped: r.skipped.as_deref(),
                            first_error: r.first_error.as_deref(),
                            runs: &r.runs,
                        })
                        .collect(),
                })
                .collect(),
            forwarding: self.forwarding.as_ref(),
            control: self
                .control
                .iter()
                .map(|c| JsonControl {
                    services: c.services,
                    endpoints: c.endpoints,
                    model_secs: c.model_secs,
                    sync_secs: c.sync_secs,
                    sync_ops: c.sync_ops,
                    sync_errors: c.sync_errors,
                    change_p50_ms: quantile(&c.change_us, 0.5) / 1e3,
                    change_p99_ms: quantile(&c.change_us, 0.99) / 1e3,
                    changes: c.change_us.len(),
                    yaml_agent_secs: c.agent_secs,
                    yaml_agent_rss_mib: c.agent_rss_mib.map(|v| v.0),
                    yaml_agent_hwm_mib: c.agent_rss_mib.map(|v| v.1),
                    agents: &c.agents,
                    map_memlock_mib: c.map_mib.iter().copied().collect(),
                    conntrack_gc: c.gc.map(|(entries, keep_ms, expire_half_ms)| JsonGc {
                        entries,
                        keep_ms,
                        expire_half_ms,
                    }),
                    per_packet: c
                        .packet
                        .iter()
                        .flat_map(|p| {
                            p.cases
                                .iter()
                                .map(|(case, ns, raw, verdict)| JsonPacketCase {
                                    program: p.program,
                                    case,
                                    ns: *ns,
                                    raw_single_run_ns: *raw,
                                    verdict: *verdict,
                                })
                        })
                        .collect(),
                    error: c.error.as_deref(),
                })
                .collect(),
            consistency: &self.consistency,
            trace_cost: self.trace_cost.as_ref(),
            targets: self
                .targets()
                .into_iter()
                .map(|t| JsonTarget {
                    verdict: t.verdict.replace("**", ""),
                    target: t.what,
                    goal: t.goal,
                    result: t.got,
                })
                .collect(),
        };
        let mut text = serde_json::to_string_pretty(&doc)
            .map_err(|e| Error::Sandbox(format!("results as JSON: {e}")))?;
        text.push('\n');
        Ok(text)
    }
}

// The JSON document (`latest.json`). Non-finite numbers (a failed run) are written as
// null.
#[derive(Serialize)]
struct JsonReport<'a> {
    machine: &'a Machine,
    datapath: Vec<JsonScale<'a>>,
    forwarding: Option<&'a ForwardingResult>,
    control: Vec<JsonControl<'a>>,
    consistency: &'a [super::consistency::ConsistencyRow],
    trace_cost: Option<&'a super::tracecost::TraceCost>,
    targets: Vec<JsonTarget>,
}

#[derive(Serialize)]
struct JsonScale<'a> {
    services: usize,
    endpoints: usize,
    modes: Vec<JsonMode<'a>>,
}

#[derive(Serialize)]
struct JsonMode<'a> {
    mode: Mode,
    setup_secs: Option<f64>,
    agent_rss_mib: Option<f64>,
    skipped: Option<&'a str>,
    first_error: Option<&'a str>,
    runs: &'a [Run],
}

#[derive(Serialize)]
struct JsonControl<'a> {
    services: usize,
    endpoints: usize,
    model_secs: f64,
    sync_secs: f64,
    sync_ops: usize,
    sync_errors: usize,
    change_p50_ms: f64,
    change_p99_ms: f64,
    changes: usize,
    yaml_agent_secs: Option<f64>,
    yaml_agent_rss_mib: Option<f64>,
    yaml_agent_hwm_mib: Option<f64>,
    agents: &'a [super::agentpath::AgentRun],
    map_memlock_mib: std::collections::BTreeMap<&'static str, f64>,
    conntrack_gc: Option<JsonGc>,
    per_packet: Vec<JsonPacketCase<'a>>,
    error: Option<&'a str>,
}

#[derive(Serialize)]
struct JsonGc {
    entries: usize,
    keep_ms: f64,
    expire_half_ms: f64,
}

#[derive(Serialize)]
struct JsonPacketCase<'a> {
    program: &'static str,
    case: &'a str,
    ns: f64,
    raw_single_run_ns: f64,
    verdict: u32,
}

#[derive(Serialize)]
struct JsonTarget {
    target: String,
    goal: String,
    result: String,
    verdict: String,
}

/// Thousands of packets per second.
fn kpps(v: f64) -> String {
    if v.is_finite() {
        format!("{:.0}k", v / 1e3)
    } else {
        "–".into()
    }
}

fn fmt_kpps(s: &Summary) -> String {
    match s.n {
        0 => "–".into(),
        1 => kpps(s.median),
        _ => format!("{} ({}–{})", kpps(s.median), kpps(s.min), kpps(s.max)),
    }
}

fn fmt_share(s: &Summary) -> String {
    if s.n == 0 {
        "–".into()
    } else {
        format!("{:.0}%", s.median * 100.0)
    }
}

/// The forwarding-rate section of latest.md: a row per mode, the ratios and how the
/// forwarding was pinned.
fn forwarding_markdown(o: &mut String, f: &ForwardingResult) {
    let _ = writeln!(
        o,
        "\n#### Forwarding rate with real packets (NodePort, {}-byte frames, one core)\n",
        f.frame_bytes
    );
    if let Some(e) = &f.error {
        let _ = writeln!(o, "Not measured: {e}.");
        return;
    }
    o.push_str("| mode | rules/agent ready | packets/s delivered | / no LB | offered packets/s | NAPI thread busy | CPU 1 busy | errors |\n");
    o.push_str("|---|---|---|---|---|---|---|---|\n");
    for r in &f.modes {
        if let Some(why) = &r.skipped {
            let mut why = why.replace('|', "/").replace('\n', " ");
            why.truncate(160);
            let _ = writeln!(o, "| {} | {why} | | | | | | |", r.mode.name());
            continue;
        }
        let col = |g: fn(&super::forwarding::FwdRun) -> f64| -> Summary {
            summarize(&r.runs.iter().map(g).collect::<Vec<_>>())
        };
        let vs_direct = if r.mode == FwdMode::Direct {
            "1".to_string()
        } else {
            f.ratios(r.mode, FwdMode::Direct)
                .map(|s| fmt_sum(&s, 2))
                .unwrap_or("–".into())
        };
        let errors = r
            .runs
            .iter()
            .filter(|x| !x.delivered_pps.is_finite())
            .count();
        let _ = writeln!(
            o,
            "| {} | {} | {} | {vs_direct} | {} | {} | {} | {errors} |",
            r.mode.name(),
            r.setup_secs
                .map(|v| format!("{v:.2} s"))
                .unwrap_or("–".into()),
            fmt_kpps(&col(|x| x.delivered_pps)),
            fmt_kpps(&col(|x| x.offered_pps)),
            fmt_share(&col(|x| x.napi_thread_busy)),
            fmt_share(&col(|x| x.fwd_cpu_busy)),
        );
    }
    let pair = |a, b| f.ratios(a, b).map(|s| fmt_sum(&s, 2)).unwrap_or("–".into());
    let _ = writeln!(
        o,
        "\nRatios of packets/s delivered, pair by pair (runs of a repeat are back to back), median (min–max): lb XDP / kube-proxy iptables {}; lb XDP / kube-proxy nftables {}; lb tc / kube-proxy iptables {}; lb XDP / lb tc {}.\n",
        pair(FwdMode::Xdp, FwdMode::Iptables),
        pair(FwdMode::Xdp, FwdMode::Nft),
        pair(FwdMode::Tc, FwdMode::Iptables),
        pair(FwdMode::Xdp, FwdMode::Tc),
    );
    let threads: Vec<String> = f
        .modes
        .iter()
        .filter_map(|r| Some(format!("{}: {}", r.mode.key(), r.napi_thread.as_ref()?)))
        .collect();
    let last_cpus: std::collections::BTreeSet<usize> = f
        .modes
        .iter()
        .flat_map(|r| r.runs.iter().filter_map(|x| x.napi_last_cpu))
        .collect();
    let _ = writeln!(
        o,
        "How: {} x {} s per mode after a 0.5 s warm-up, modes interleaved (order rotated every repeat), each in its own sandbox (node, outside, one backend pod) with {} Services: the NodePort under test (UDP 30009, `externalTrafficPolicy: Local`, one endpoint: the pod) and ClusterIP fillers. \
         The test bench's packet generator (this kernel has no pktgen module) sends {}-byte frames (64 on a wire) in {} flows (source ports) from the outside namespace to NodePort 30009 of the node's address (no LB: to the pod's address, routed by the node) with {}. \
         Delivered: `rx_packets` of the backend pod's eth0 over the run (/proc/net/dev in the pod's namespace); a UDP socket bound in the pod keeps it from answering with ICMP errors. \
         Modes: kube-proxy's iptables and nftables NodePort rules (KUBE-NODEPORTS -> KUBE-EXT -> KUBE-SVL -> KUBE-SEP DNAT; `nodeport-ips` and the `service-nodeports` map -> external -> local -> endpoint chains), this dataplane's XDP program on the node's eth0 (`--external-interfaces eth0`), and its tc program on the same eth0 given as a pod interface (`--interfaces eth0,lxc-*`, no XDP).\n",
        f.repeats,
        f.secs,
        f.services,
        f.frame_bytes,
        f.flows,
        f.generator.describe(),
    );
    let _ = writeln!(
        o,
        "Pinning: the generator's thread runs on CPU {gen} (sched_setaffinity, read back before it sends; nice -20). The node's eth0 (a veth) receives through NAPI (GRO on, `ethtool -K eth0 gro on`, and the sender's TSO off, or a veth skips NAPI for the sender's skbs), NAPI made threaded (`/sys/class/net/eth0/threaded` = 1), and the `napi/eth0-<id>` kernel thread that appeared pinned to CPU {fwd} with sched_setaffinity and made SCHED_FIFO {prio} (so it has its core, within the kernel's real-time limit of 95%, whatever else the machine runs). That thread does all the node does with a packet: XDP or GRO, tc, netfilter, routing, the pod's veth, and the pod's receive (the softirq it raises runs on its CPU). \
         Checked in /proc before every run: the thread's `Cpus_allowed_list` and policy ({}); after every run, the CPU it last ran on ({:?}) and its CPU time: \"NAPI thread busy\" is its share of the run (near 95%: the generator kept it busy; lower: it waited for frames), \"CPU 1 busy\" CPU 1's busy share in /proc/stat, other load included. \
         Caveats: the node's eth0 is a veth, and the pod is reached through another veth and a receive backlog on the same core; only kube-proxy's nat rules are loaded, not its filter-table chains (KUBE-FORWARD and the firewall checks, which a real node also runs on every forwarded packet).\n",
        threads.join("; "),
        last_cpus,
        gen = f.generator_cpu,
        fwd = f.forwarding_cpu,
        prio = super::forwarding::FWD_PRIORITY,
    );
    let errs: Vec<String> = f
        .modes
        .iter()
        .filter_map(|r| Some(format!("{}: {}", r.mode.name(), r.first_error.as_ref()?)))
        .collect();
    for e in errs {
        let _ = writeln!(o, "- {}", e.replace('\n', " "));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_trace_cost_is_in_the_table_and_the_json_when_measured() {
        let machine = Machine {
            date: "2026-12-02 18:00 UTC".into(),
            nproc: 2,
            cpu: "cpu".into(),
            kernel: "6.18".into(),
            mem_gib: 24.0,
            iptables: String::new(),
            nft: String::new(),
            run: String::new(),
        };
        let case = super::super::tracecost::TraceCase {
            case: "new flow (SYN to a ClusterIP, single run)",
            no_switch_ns: vec![100.0],
            off_ns: vec![100.0],
            on_ns: vec![110.0],
            off_copy_ns: vec![100.0],
        };
        let mut rep = Report {
            machine,
            datapath: Vec::new(),
            forwarding: None,
            control: Vec::new(),
            consistency: Vec::new(),
            trace_cost: None,
        };
        let heading = "#### `lb trace` off: its cost per packet";
        assert!(!rep.markdown().contains(heading));
        rep.trace_cost = Some(super::super::tracecost::TraceCost {
            rounds: 1,
            new_flows_per_round: 1,
            repeat: 1,
            events_read: 1,
            new_flows_traced: 1,
            verified_no_switch: Some(1),
            verified_release: Some(2),
            cases: vec![case],
        });
        let md = rep.markdown();
        assert!(md.contains(heading), "{md}");
        assert!(md.contains("tracing off costs nothing measurable"), "{md}");
        let json: serde_json::Value = serde_json::from_str(&rep.json().unwrap()).unwrap();
        assert_eq!(json["trace_cost"]["cases"][0]["on_ns"][0], 110.0);
    }

    #[test]
    fn verdicts_say_by_how_much() {
        assert_eq!(verdict(Some(2.2), 2.0, true), "**met** (by 10%)");
        assert_eq!(verdict(Some(1.0), 2.0, true), "**missed** (by 50%)");
        assert_eq!(verdict(Some(50.0), 60.0, false), "**met** (by 17%)");
        assert!(verdict(Some(120.0), 60.0, false).starts_with("**missed**"));
        assert_eq!(verdict(None, 1.0, true), "not measured");
    }
}
