//! What `lb trace` costs the datapath when nobody traces: the per-packet cost of the tc
//! program (BPF_PROG_TEST_RUN, the kernel's own timing) in three builds (one loaded twice) side by
//! side, each with maps of its own holding the same Services:
//! - **off**: the release object, as shipped, with nobody tracing (the programs read the
//!   switch, `LB_TRACE`, at the start and the end of each new flow's decision);
//! - **on**: the same object with a tracer registered (`lb trace`'s registration), every
//!   new flow's event written to the ring buffer, which the run drains (and counts);
//! - **no switch**: the programs built without tracing (`lb-ebpf` feature `no-trace`,
//!   `trace::on()` a constant false: the switch and the events compiled out), the floor;
//! - **off, a second copy**: the release object loaded again, for the noise (how far two
//!   loads of one build differ).
//!
//! The machine is noisy, so the builds take turns within each round (the order rotated
//! every round), and each comparison is a ratio of two builds' values of the same round,
//! reported as the median (min–max) over the rounds. Cases: a new flow (a SYN to a
//! ClusterIP, a fresh client port each run; the median of single runs, harness included,
//! which every build pays alike), an established flow (ping-pong Services, so each of the
//! kernel's repeats is a real translation; no build reads the switch there, so its
//! ratio shows the noise), and a packet to no Service.
use std::{
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
};

use aya::programs::{TestRun, TestRunOptions};
use lb_userspace::{
    dataplane::Dataplane,
    loader::{remove_pins, Datapath, LoadOptions, EBPF_OBJECT},
    model::{
        desired_state, Config, Endpoint, EndpointPort, EndpointSlice, Protocol, Service,
        ServicePort,
    },
};
use serde::Serialize;

use super::{
    check_interrupted, progress,
    stats::{median, pair_ratios, summarize, Summary},
    Opts,
};
use crate::{packet, Error, Result};

/// The build without the tracing switch, from `cargo xtask bench`.
pub fn no_trace_object() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/ebpf-no-trace/bpfel-unknown-none/release/lb-ebpf")
}

const BUILDS: [&str; 4] = ["no switch", "off", "on", "off, a second copy"];
const CASES: [&str; 3] = [
    "new flow (SYN to a ClusterIP, single run)",
    "established flow, repeated (ping-pong)",
    "to no Service, repeated",
];

#[derive(Clone, Debug, Serialize)]
pub struct TraceCost {
    pub rounds: usize,
    pub new_flows_per_round: usize,
    pub repeat: u32,
    /// Events read from the ring buffer while tracing was on, and new flows sent then.
    pub events_read: u64,
    pub new_flows_traced: u64,
    /// The tc program's verified instructions in the build without the switch and in
    /// the release object (how far the two builds' code differs).
    pub verified_no_switch: Option<u32>,
    pub verified_release: Option<u32>,
    pub cases: Vec<TraceCase>,
}

/// One case: each build's ns per packet, round by round, and the ratios.
#[derive(Clone, Debug, Serialize)]
pub struct TraceCase {
    pub case: &'static str,
    pub no_switch_ns: Vec<f64>,
    pub off_ns: Vec<f64>,
    pub on_ns: Vec<f64>,
    /// A second copy of "off" (the same object, maps of its own): how far two loads of
    /// one build differ, the noise of the comparison.
    pub off_copy_ns: Vec<f64>,
}

fn ip(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

const WEB: [u8; 4] = [10, 96, 0, 10];
const PING: [u8; 4] = [10, 96, 255, 1];
const PONG: [u8; 4] = [10, 96, 255, 2];

/// web (three backends), and PING and PONG, each the other's backend.
fn config() -> Config {
    let svc = |name: &str, ip: IpAddr, backends: Vec<IpAddr>, port: u16| {
        let service = Service {
            name: name.into(),
            namespace: "bench".into(),
            cluster_ips: vec![ip],
            ports: vec![ServicePort {
                name: String::new(),
                port: 80,
                target_port: None,
                protocol: Protocol::Tcp,
                ..Default::default()
            }],
            ..Default::default()
        };
        let slice = EndpointSlice {
            name: name.into(),
            namespace: "bench".into(),
            service_name: name.into(),
            ports: vec![EndpointPort {
                name: String::new(),
                port,
                protocol: Protocol::Tcp,
            }],
            endpoints: backends.into_iter().map(Endpoint::new).collect(),
        };
        (service, slice)
    };
    let [a, b, c, d] = WEB;
    let [pa, pb, pc, pd] = PING;
    let [qa, qb, qc, qd] = PONG;
    let all = [
        svc(
            "web",
            ip(a, b, c, d),
            (12..15).map(|h| ip(10, 244, 0, h)).collect(),
            8080,
        ),
        svc("ping", ip(pa, pb, pc, pd), vec![ip(qa, qb, qc, qd)], 80),
        svc("pong", ip(qa, qb, qc, qd), vec![ip(pa, pb, pc, pd)], 80),
    ];
    let (services, endpoint_slices) = all.into_iter().unzip();
    Config {
        services,
        endpoint_slices,
        ..Default::default()
    }
}

/// One build, loaded in a pin folder of its own, with the Services synced.
struct Build {
    name: &'static str,
    datapath: Datapath,
    _plane: Dataplane,
    pin_dir: PathBuf,
}

impl Drop for Build {
    fn drop(&mut self) {
        let _ = remove_pins(&self.pin_dir);
    }
}

fn load(name: &'static str, object: &[u8], i: usize) -> Result<Build> {
    let pin_dir = PathBuf::from(format!(
        "/sys/fs/bpf/lbbench-trace-{}-{i}",
        std::process::id()
    ));
    let _ = remove_pins(&pin_dir);
    let opts = LoadOptions {
        pin_dir: pin_dir.clone(),
        max_frontends: 1024,
        max_backends: 1024,
        max_slots: 1024,
        max_conntrack: 262_144,
        max_maglev_cells: 4096,
        ..Default::default()
    };
    let (datapath, maps) = Datapath::load_object(&opts, object)
        .map_err(|e| Error::Sandbox(format!("trace cost, {name}: {e}")))?;
    super::conntrack_filter_on(&maps)?;
    let mut plane = Dataplane::new(maps).map_err(|e| Error::Sandbox(e.to_string()))?;
    let c = config();
    let rep = plane.sync(&desired_state(&c.services, &c.endpoint_slices, &c.node));
    if !rep.errors.is_empty() {
        return Err(Error::Sandbox(format!(
            "trace cost, {name}: {:?}",
            rep.errors
        )));
    }
    Ok(Build {
        name,
        datapath,
        _plane: plane,
        pin_dir,
    })
}

/// One BPF_PROG_TEST_RUN of the tc program: (ns per run, return value, output).
fn run(b: &mut Build, pkt: &[u8], repeat: u32) -> Result<(f64, u32, Vec<u8>)> {
    let mut out = vec![0u8; 256];
    let r = b
        .datapath
        .program()
        .test_run(TestRunOptions {
            data_in: Some(pkt),
            data_out: Some(&mut out),
            repeat,
            ..Default::default()
        })
        .map_err(|e| Error::Sandbox(format!("BPF_PROG_TEST_RUN ({}): {e}", b.name)))?;
    out.truncate(r.data_size_out as usize);
    Ok((r.duration.as_nanos() as f64, r.return_value, out))
}

fn tcp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, flags: u8) -> Vec<u8> {
    packet::Spec::tcp_ip(src, sport, dst, dport, flags).build()
}

/// Batches a round is cut into: the builds take turns batch by batch, so that what the
/// machine does meanwhile falls on all alike.
const BATCHES: usize = 20;

/// Samples of one build in one round: single runs of new flows, and the averages of
/// repeated runs of the two other cases.
#[derive(Default)]
struct Samples {
    new_flow: Vec<f64>,
    established: Vec<f64>,
    to_none: Vec<f64>,
}

/// One batch of the three cases on one build: `flows` new flows (the `batch`-th of
/// round `round`), then `repeat` repeats of an established flow and of a packet to no
/// Service. The round's ping-pong flows are made at its first batch.
fn measure(
    b: &mut Build,
    round: usize,
    batch: usize,
    flows: usize,
    repeat: u32,
    s: &mut Samples,
) -> Result<()> {
    let web = IpAddr::from(WEB);
    // A client of its own per round: every SYN is a new flow.
    let client = ip(10, 200, round as u8, 1);
    for i in 0..flows {
        let port = 10_000 + (batch * flows + i) as u16;
        let (ns, ret, out) = run(b, &tcp(client, port, web, 80, packet::SYN), 1)?;
        if ret != 0 || packet::view(&out).dst == web {
            return Err(Error::Sandbox(format!(
                "trace cost, {}: a SYN to {web} was not translated (verdict {ret})",
                b.name
            )));
        }
        s.new_flow.push(ns);
    }
    let client = ip(10, 244, 0, 11);
    let ping = tcp(
        client,
        30_000 + round as u16,
        IpAddr::from(PING),
        80,
        packet::ACK,
    );
    if batch == 0 {
        run(b, &ping, 2)?; // the flows to PING and PONG, made by the first two runs
    }
    s.established.push(run(b, &ping, repeat)?.0);
    let none = tcp(client, 30_000, ip(10, 244, 0, 12), 8080, packet::ACK);
    s.to_none.push(run(b, &none, repeat)?.0);
    Ok(())
}

/// Measures the builds against each other (see the module's doc).
pub fn run_all(opts: &Opts) -> Result<TraceCost> {
    let rounds = if opts.quick { 3 } else { 7 };
    let (flows, repeat) = (4000, 1_000_000);
    let floor_path = no_trace_object();
    let floor = std::fs::read(&floor_path).map_err(|e| {
        Error::Sandbox(format!(
            "{}: {e} (cargo xtask bench builds it: the eBPF crate with feature no-trace)",
            floor_path.display()
        ))
    })?;
    progress(format!(
        "lb trace's cost: tc program, {rounds} rounds of {flows} new flows and {repeat} repeats, builds in turn"
    ));
    let mut builds = [
        load(BUILDS[0], &floor, 0)?,
        load(BUILDS[1], EBPF_OBJECT, 1)?,
        load(BUILDS[2], EBPF_OBJECT, 2)?,
        load(BUILDS[3], EBPF_OBJECT, 3)?,
    ];
    lb_userspace::trace::register(&builds[2].pin_dir, std::process::id(), true)
        .map_err(|e| Error::Sandbox(format!("registering a tracer: {e}")))?;
    let verified = |b: &mut Build| {
        b.datapath
            .program()
            .info()
            .ok()
            .and_then(|i| i.verified_instruction_count())
    };
    let (verified_no_switch, verified_release) =
        (verified(&mut builds[0]), verified(&mut builds[1]));
    let mut events = lb_userspace::trace::open_events(&builds[2].pin_dir)
        .map_err(|e| Error::Sandbox(e.to_string()))?;
    let mut values: [[Vec<f64>; 4]; 3] = Default::default(); // [case][build]
    let (mut read, mut traced) = (0u64, 0u64);
    for round in 0..rounds {
        let mut samples: [Samples; 4] = Default::default();
        for batch in 0..BATCHES {
            check_interrupted()?;
            for k in 0..4 {
                let b = (round + batch + k) % 4;
                let per_batch = (flows / BATCHES, repeat / BATCHES as u32);
                measure(
                    &mut builds[b],
                    round,
                    batch,
                    per_batch.0,
                    per_batch.1,
                    &mut samples[b],
                )?;
                if b == 2 {
                    traced += per_batch.0 as u64 + if batch == 0 { 2 } else { 0 };
                    while events.next().is_some() {
                        read += 1;
                    }
                }
            }
        }
        for (b, s) in samples.iter().enumerate() {
            values[0][b].push(median(&s.new_flow));
            values[1][b].push(median(&s.established));
            values[2][b].push(median(&s.to_none));
        }
        progress(format!(
            "   round {}: new flow {:.0} / {:.0} / {:.0} ns, established {:.1} / {:.1} / {:.1} ns (no switch / off / on)",
            round + 1,
            values[0][0][round],
            values[0][1][round],
            values[0][2][round],
            values[1][0][round],
            values[1][1][round],
            values[1][2][round],
        ));
    }
    drop(events);
    let r = TraceCost {
        rounds,
        new_flows_per_round: flows,
        repeat,
        events_read: read,
        new_flows_traced: traced,
        verified_no_switch,
        verified_release,
        cases: CASES
            .iter()
            .zip(values)
            .map(|(case, [none, off, on, off_copy])| TraceCase {
                case,
                no_switch_ns: none,
                off_ns: off,
                on_ns: on,
                off_copy_ns: off_copy,
            })
            .collect(),
    };
    Ok(r)
}

fn fmt(s: &Summary, prec: usize) -> String {
    format!("{:.p$} ({:.p$}–{:.p$})", s.median, s.min, s.max, p = prec)
}

/// The section of `latest.md` (and of `trace_cost.md`).
pub fn markdown(t: &TraceCost) -> String {
    let mut o = String::from(
        "\n#### `lb trace` off: its cost per packet (tc program, BPF_PROG_TEST_RUN)\n\n\
         | case | no switch (ns) | off (ns) | on (ns) | off / no switch | on / no switch | on / off | off / off (noise) |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for c in &t.cases {
        let _ = std::fmt::Write::write_fmt(
            &mut o,
            format_args!(
                "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
                c.case,
                fmt(&summarize(&c.no_switch_ns), 1),
                fmt(&summarize(&c.off_ns), 1),
                fmt(&summarize(&c.on_ns), 1),
                fmt(&summarize(&pair_ratios(&c.off_ns, &c.no_switch_ns)), 3),
                fmt(&summarize(&pair_ratios(&c.on_ns, &c.no_switch_ns)), 3),
                fmt(&summarize(&pair_ratios(&c.on_ns, &c.off_ns)), 3),
                fmt(&summarize(&pair_ratios(&c.off_ns, &c.off_copy_ns)), 3),
            ),
        );
    }
    if let Some(c) = t.cases.first() {
        let off = summarize(&pair_ratios(&c.off_ns, &c.no_switch_ns));
        let noise = summarize(&pair_ratios(&c.off_ns, &c.off_copy_ns));
        let on = summarize(&pair_ratios(&c.on_ns, &c.off_ns));
        let verdict = if off.median <= noise.max {
            "within the noise: tracing off costs nothing measurable".to_string()
        } else {
            format!(
                "**above the noise: tracing off costs {:.1}%**",
                (off.median - 1.0) * 100.0
            )
        };
        let _ = std::fmt::Write::write_fmt(
            &mut o,
            format_args!(
                "\nNew flows (the only packets that read the switch) with tracing off: {:.3} of the build without the \
                 switch, median (min–max {:.3}–{:.3}); two loads of the off build differ by {:.3}–{:.3}: {verdict}. \
                 Tracing on: {:.3} of off ({:+.0} ns a new flow: its event). (The two builds' code differs beyond the \
                 switch: the tc program verifies in {} instructions without it, {} with it; a build without the switch \
                 that is slower is no cost of the switch.)\n",
                off.median,
                off.min,
                off.max,
                noise.min,
                noise.max,
                on.median,
                median(&c.on_ns) - median(&c.off_ns),
                t.verified_no_switch.map_or("?".into(), |n| n.to_string()),
                t.verified_release.map_or("?".into(), |n| n.to_string()),
            ),
        );
    }
    let _ = std::fmt::Write::write_fmt(
        &mut o,
        format_args!(
            "\nHow: the tc program of three builds (four loads) side by side, each with maps of its own holding the same Services: \
             \"no switch\", the programs built without tracing (feature `no-trace`: the switch and the events compiled out); \
             \"off\", the release object with nobody tracing (as shipped); \"on\", the release object with a tracer registered \
             in `LB_TRACE`, each new flow's event written to the ring buffer and read ({} events read for {} new flows); \
             and a second copy of \"off\" (the same object, maps of its own): \"off / off\" is how far two loads of one \
             build differ, the noise of the other ratios. \
             {} rounds; in each, per build, {} new flows (a SYN to a ClusterIP from a fresh client port: the median of \
             single runs, the harness's fixed overhead included, the same in every build) and {} repeats of an established \
             flow (ping-pong Services: each repeat a real translation) and of a packet to no Service (the median of the \
             batches' kernel time / repeats), in {} batches, the builds taking turns batch by batch (order rotated), so that \
             what else the machine does falls on all alike. Values: median (min–max) over the rounds; ratios pair by \
             pair within a round. Known flows never read the switch: their ratio is the noise.\n",
            t.events_read, t.new_flows_traced, t.rounds, t.new_flows_per_round, t.repeat, BATCHES
        ),
    );
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_has_a_row_per_case_with_the_ratios_of_each_round() {
        let t = TraceCost {
            rounds: 2,
            new_flows_per_round: 10,
            repeat: 100,
            events_read: 10,
            new_flows_traced: 10,
            verified_no_switch: None,
            verified_release: None,
            cases: vec![TraceCase {
                case: CASES[0],
                no_switch_ns: vec![100.0, 200.0],
                off_ns: vec![101.0, 198.0],
                on_ns: vec![150.0, 260.0],
                off_copy_ns: vec![101.0, 198.0],
            }],
        };
        let md = markdown(&t);
        let row = md.lines().find(|l| l.starts_with("| new flow")).unwrap();
        assert_eq!(
            row,
            "| new flow (SYN to a ClusterIP, single run) | 150.0 (100.0–200.0) | 149.5 (101.0–198.0) | \
             205.0 (150.0–260.0) | 1.000 (0.990–1.010) | 1.400 (1.300–1.500) | 1.399 (1.313–1.485) | \
             1.000 (1.000–1.000) |"
        );
    }
}
