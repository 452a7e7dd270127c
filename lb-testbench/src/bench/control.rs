//! Control plane and per-packet runs, with N services x 10 endpoints each:
//! - the library path: model -> `desired_state` -> `Dataplane::sync` on real kernel maps
//!   (loaded, never attached), from empty; then one endpoint change at a time (ready
//!   flipped on one endpoint of one service, the slice put into `ModelCache`, which
//!   recomputes that Service only, then the incremental diff: what the Kubernetes agent
//!   does per change) until it is in the maps;
//! - per-packet cost of the tc program on those maps via BPF_PROG_TEST_RUN;
//! - the agent path: `lb run --config` on the same services as a YAML file, in a sandbox
//!   namespace with no interface to attach to: spawn to synced, RSS, map memory.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use aya::programs::{TestRun, TestRunOptions};
use lb_userspace::{
    dataplane::Dataplane,
    loader::{remove_pins, Datapath, LoadOptions},
    model::desired_state,
};

use super::{
    agentpath, check_interrupted, datapath, progress,
    stats::{median, quantile},
    workload::{self, Endpoints, WEB_IP, WEB_IP6, WEB_PORT},
    Opts,
};
use crate::{packet, sandbox::Sandbox, Error, Result};

#[derive(Clone, Debug, Default)]
pub struct PacketCost {
    /// "tc" (the pod program, ingress), "XDP" (the external-interface program) or "tc
    /// egress" (the reply path), and their IPv6 rows.
    pub program: &'static str,
    /// (name, ns per packet, raw single-run median ns, program return value)
    pub cases: Vec<(&'static str, f64, f64, u32)>,
    /// Harness overhead of one single run, subtracted from the single-run cases.
    pub overhead_ns: f64,
}

#[derive(Clone, Debug, Default)]
pub struct ControlResult {
    pub services: usize,
    pub endpoints: usize,
    /// Model -> desired state, seconds.
    pub model_secs: f64,
    /// `Dataplane::sync` from empty maps, seconds.
    pub sync_secs: f64,
    pub sync_ops: usize,
    pub sync_errors: usize,
    /// One endpoint change to the maps (desired state + diff + map writes), microseconds.
    pub change_us: Vec<f64>,
    /// Per packet, for each program (tc, then XDP).
    pub packet: Vec<PacketCost>,
    /// `lb run --config` on a YAML file: spawn to synced (parse included), seconds.
    pub agent_secs: Option<f64>,
    /// Agent VmRSS and VmHWM once synced, MiB.
    pub agent_rss_mib: Option<(f64, f64)>,
    /// The real agents as operators run them: `lb agent` against the test API server,
    /// and `lb run` on a JSON file (see `agentpath`).
    pub agents: Vec<agentpath::AgentRun>,
    /// bpftool's bytes_memlock of each map, MiB.
    pub map_mib: Vec<(&'static str, f64)>,
    /// The conntrack collector on a full table: (entries, ms of a pass that keeps every
    /// flow, ms of a pass that expires half of them).
    pub gc: Option<(usize, f64, f64)>,
    pub error: Option<String>,
}

/// The part of `bpftool -j map show` read here.
#[derive(Debug, serde::Deserialize)]
struct BpftoolMap {
    bytes_memlock: u64,
}

/// `bytes_memlock` of one map from `bpftool -j map show pinned <path>`, in bytes.
fn parse_bpftool_memlock(text: &str) -> Option<u64> {
    serde_json::from_str::<BpftoolMap>(text)
        .ok()
        .map(|m| m.bytes_memlock)
}

fn map_memlock(pin_dir: &Path) -> Vec<(&'static str, f64)> {
    let mut out = Vec::new();
    for name in lb_common::MAP_NAMES {
        let path = pin_dir.join(name);
        let Ok(o) = Command::new("bpftool")
            .args(["-j", "map", "show", "pinned"])
            .arg(&path)
            .output()
        else {
            continue;
        };
        if let Some(b) = parse_bpftool_memlock(&String::from_utf8_lossy(&o.stdout)) {
            out.push((name, b as f64 / 1048576.0));
        }
    }
    out
}

fn load_opts(pin_dir: PathBuf, services: usize, endpoints: usize) -> LoadOptions {
    let fe = (services + services / 4).max(1024) as u32;
    let be = (endpoints + endpoints / 4).max(4096) as u32;
    LoadOptions {
        pin_dir,
        max_frontends: fe,
        max_backends: be,
        max_slots: be,
        max_conntrack: 262_144,
        ..Default::default()
    }
}

/// The addresses of the per-packet runs, for one family.
struct Family {
    client: IpAddr,
    pod: IpAddr,
    web: IpAddr,
    ping: IpAddr,
    pong: IpAddr,
}

const FAMILIES: [Family; 2] = [
    Family {
        client: IpAddr::V4(Ipv4Addr::new(10, 244, 0, 11)),
        pod: IpAddr::V4(Ipv4Addr::new(10, 244, 0, 12)),
        web: IpAddr::V4(WEB_IP),
        ping: IpAddr::V4(Ipv4Addr::new(10, 96, 255, 1)),
        pong: IpAddr::V4(Ipv4Addr::new(10, 96, 255, 2)),
    },
    Family {
        client: IpAddr::V6(Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, 0xb)),
        pod: IpAddr::V6(Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, 0xc)),
        web: IpAddr::V6(WEB_IP6),
        ping: IpAddr::V6(Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0xff, 1)),
        pong: IpAddr::V6(Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0xff, 2)),
    },
];

/// In each family, PING:80 -> backend PONG:80 and PONG:80 -> backend PING:80.
fn add_ping_pong(cfg: &mut lb_userspace::model::Config) {
    use lb_userspace::model::{
        Endpoint, EndpointPort, EndpointSlice, Protocol, Service, ServicePort,
    };
    for (i, (name, ip, backend)) in FAMILIES
        .iter()
        .flat_map(|f| [("ping", f.ping, f.pong), ("pong", f.pong, f.ping)])
        .enumerate()
    {
        let name = format!("{name}-{i}");
        cfg.services.push(Service {
            name: name.clone(),
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
        });
        cfg.endpoint_slices.push(EndpointSlice {
            name: name.clone(),
            namespace: "bench".into(),
            service_name: name,
            ports: vec![EndpointPort {
                name: String::new(),
                port: 80,
                protocol: Protocol::Tcp,
            }],
            endpoints: vec![Endpoint::new(backend)],
        });
    }
}

/// One BPF_PROG_TEST_RUN: (kernel-timed ns per run, return value, output bytes).
type RunFn<'a> = dyn Fn(&[u8], u32) -> Result<(f64, u32, Vec<u8>)> + 'a;

fn test_run<P>(prog: &P, pkt: &[u8], repeat: u32) -> Result<(f64, u32, Vec<u8>)>
where
    P: for<'b> TestRun<Opts<'b> = TestRunOptions<'b>, Result = aya::programs::TestRunResult>,
{
    let mut out = vec![0u8; 256];
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(pkt),
            data_out: Some(&mut out),
            repeat,
            ..Default::default()
        })
        .map_err(|e| Error::Sandbox(format!("BPF_PROG_TEST_RUN: {e}")))?;
    out.truncate(r.data_size_out as usize);
    Ok((r.duration.as_nanos() as f64, r.return_value, out))
}

/// ns per packet of the programs (the tc one on pods' veths, the XDP one on the node's
/// external interfaces, and the tc egress one that translates replies), each with the
/// maps as they are. In each family (IPv4, then IPv6 beside it).
fn packet_costs(datapath: &mut Datapath) -> Result<Vec<PacketCost>> {
    let mut out = Vec::new();
    for (f, ports) in FAMILIES.iter().zip([(40_000, 50_000), (42_000, 52_000)]) {
        let tc = &*datapath.program();
        out.push(packet_cost(
            ("tc", "tc IPv6"),
            f,
            &|p: &[u8], n| test_run(tc, p, n),
            ports.0,
        )?);
        let xdp = &*datapath.xdp_program();
        out.push(packet_cost(
            ("XDP", "XDP IPv6"),
            f,
            &|p: &[u8], n| test_run(xdp, p, n),
            ports.1,
        )?);
    }
    // The replies of the flows the tc rows made, where they leave.
    for (f, port) in FAMILIES.iter().zip([40_000, 42_000]) {
        out.push(egress_cost(datapath, f, port)?);
    }
    Ok(out)
}

/// ns per packet of the tc egress program: a reply (of the flow `packet_cost` left on
/// `sport`, and repeated over the ping-pong flows it made), and a packet that is no
/// reply, measured as `packet_cost` measures.
fn egress_cost(datapath: &mut Datapath, f: &Family, sport: u16) -> Result<PacketCost> {
    let program = if f.client.is_ipv4() {
        "tc egress"
    } else {
        "tc egress IPv6"
    };
    let tc = &*datapath.program();
    // The backend the tc rows' established flow went to (its entry is still there).
    let (_, _, out) = test_run(tc, &tcp(f.client, sport, f.web, WEB_PORT, packet::ACK), 1)?;
    let (backend, bport) =
        dst_of(&out).ok_or_else(|| Error::Sandbox("ACK came back short".into()))?;
    let egress = &*datapath.egress_program();
    let run = |p: &[u8], n| test_run(egress, p, n);
    let single = |pkt: &[u8]| -> Result<(f64, u32)> {
        let mut v = Vec::with_capacity(2000);
        let mut ret = 0;
        for _ in 0..2000 {
            let (d, r, _) = run(pkt, 1)?;
            v.push(d);
            ret = r;
        }
        Ok((median(&v), ret))
    };
    let repeated = |pkt: &[u8]| -> Result<(f64, u32)> {
        let mut v = Vec::new();
        let mut ret = 0;
        for _ in 0..5 {
            let (d, r, _) = run(pkt, 200_000)?;
            v.push(d);
            ret = r;
        }
        Ok((median(&v), ret))
    };
    let none = tcp(f.client, sport - 1, f.pod, 8080, packet::ACK);
    let (none_repeated, none_ret) = repeated(&none)?;
    let (none_single, _) = single(&none)?;
    let overhead = (none_single - none_repeated).max(0.0);
    let (reply_single, reply_ret) = single(&tcp(backend, bport, f.client, sport, packet::ACK))?;
    // The ping-pong flows of `packet_cost` (client -> PING and -> PONG on sport 1001 up):
    // each repeat turns PONG's reply into PING's and back, a real translation each time.
    let (reply_rep, reply_rep_ret) =
        repeated(&tcp(f.pong, 80, f.client, sport + 1_001, packet::ACK))?;
    Ok(PacketCost {
        program,
        cases: vec![
            (
                "reply, repeated (ping-pong)",
                reply_rep,
                reply_rep,
                reply_rep_ret,
            ),
            (
                "reply (backend to client)",
                reply_single - overhead,
                reply_single,
                reply_ret,
            ),
            ("not a reply (passes)", none_repeated, none_single, none_ret),
        ],
        overhead_ns: overhead,
    })
}

/// A TCP frame of either family.
fn tcp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, flags: u8) -> Vec<u8> {
    packet::Spec::tcp_ip(src, sport, dst, dport, flags).build()
}

/// ns per packet of one program, for a new flow, an established flow, a reply and a
/// packet to no Service, from the kernel's own timing of BPF_PROG_TEST_RUN. `ports`
/// keeps each program's flows apart (they share conntrack).
///
/// The kernel runs `repeat` times on the same buffer, so a packet the program rewrites
/// (every NAT case) would be measured as its rewritten self from the second run on.
/// Those cases therefore use single runs (fresh copy each call; median of 2000), and a
/// single run includes the harness's fixed overhead (timer, skb set-up). That overhead
/// is estimated with the packet to no Service, which the program does not rewrite: its
/// single-run median minus its average over 200000 repeats. Reported values have it
/// subtracted; the raw single-run medians are kept beside them.
fn packet_cost(
    names: (&'static str, &'static str),
    f: &Family,
    run: &RunFn<'_>,
    ports: u16,
) -> Result<PacketCost> {
    let program = if f.client.is_ipv4() { names.0 } else { names.1 };
    let singles = |pkts: &mut dyn FnMut(u16) -> Vec<u8>| -> Result<(f64, u32)> {
        let mut v = Vec::with_capacity(2000);
        let mut ret = 0;
        for i in 0..2000u16 {
            let (d, r, _) = run(&pkts(i), 1)?;
            v.push(d);
            ret = r;
        }
        Ok((median(&v), ret))
    };
    let (client, pod, web) = (f.client, f.pod, f.web);
    let (ping, pong) = (f.ping, f.pong);
    // Harness overhead of a single run, from the packet the program leaves alone.
    let none = tcp(client, ports - 1, pod, 8080, packet::ACK);
    let mut rep = Vec::new();
    let mut none_ret = 0;
    for _ in 0..5 {
        let (d, r, _) = run(&none, 200_000)?;
        rep.push(d);
        none_ret = r;
    }
    let none_repeated = median(&rep);
    let (none_single, _) = singles(&mut |_| none.clone())?;
    let overhead = (none_single - none_repeated).max(0.0);
    // New flows: a fresh source port each run.
    let (new_single, new_ret) =
        singles(&mut |i| tcp(client, ports - 20_000 + i, web, WEB_PORT, packet::SYN))?;
    // Where did those flows go? (a check of the maps the benchmark wrote)
    let mut dsts = std::collections::BTreeMap::new();
    for i in 0..200u16 {
        let (_, _, out) = run(
            &tcp(client, ports - 10_000 + i, web, WEB_PORT, packet::SYN),
            1,
        )?;
        *dsts.entry(dst_of(&out)).or_insert(0) += 1;
    }
    progress(format!(
        "   per packet ({program}): 200 new flows to {web} port {WEB_PORT} went to {dsts:?}"
    ));
    // One established flow, and its replies.
    let sport = ports;
    let (_, _, syn_out) = run(&tcp(client, sport, web, WEB_PORT, packet::SYN), 1)?;
    let (backend, bport) =
        dst_of(&syn_out).ok_or_else(|| Error::Sandbox("SYN came back short".into()))?;
    progress(format!(
        "   per packet ({program}): SYN to {web} port {WEB_PORT} was sent to {backend} port {bport}"
    ));
    if backend == web {
        return Err(Error::Sandbox(format!(
            "{program}: a SYN to {web} was not translated"
        )));
    }
    let est = tcp(client, sport, web, WEB_PORT, packet::ACK);
    let (est_single, est_ret) = singles(&mut |_| est.clone())?;
    let reply = tcp(backend, bport, client, sport, packet::ACK);
    let (reply_single, reply_ret) = singles(&mut |_| reply.clone())?;
    // Repeated (the issue's method): PING <-> PONG flows, so every repeat translates.
    let repeated = |pkt: &[u8]| -> Result<(f64, u32)> {
        run(pkt, 2)?; // the first two runs create the two flows
        let mut v = Vec::new();
        let mut ret = 0;
        for _ in 0..5 {
            let (d, r, _) = run(pkt, 200_000)?;
            v.push(d);
            ret = r;
        }
        Ok((median(&v), ret))
    };
    let pp_sport = ports + 1_000;
    let (est_rep, est_rep_ret) = repeated(&tcp(client, pp_sport, ping, 80, packet::ACK))?;
    // Replies: flows client -> PING and client -> PONG leave reply entries
    // PONG:80 -> client (restore PING) and PING:80 -> client (restore PONG).
    run(&tcp(client, pp_sport + 1, ping, 80, packet::SYN), 1)?;
    run(&tcp(client, pp_sport + 1, pong, 80, packet::SYN), 1)?;
    let (reply_rep, reply_rep_ret) = repeated(&tcp(pong, 80, client, pp_sport + 1, packet::ACK))?;
    let cost = PacketCost {
        program,
        cases: vec![
            (
                "established flow, repeated (ping-pong)",
                est_rep,
                est_rep,
                est_rep_ret,
            ),
            (
                "reply where it enters (passed on), repeated (ping-pong)",
                reply_rep,
                reply_rep,
                reply_rep_ret,
            ),
            (
                "new flow (SYN to a ClusterIP)",
                new_single - overhead,
                new_single,
                new_ret,
            ),
            (
                "established flow (ACK to a ClusterIP)",
                est_single - overhead,
                est_single,
                est_ret,
            ),
            (
                "reply where it enters (passed on)",
                reply_single - overhead,
                reply_single,
                reply_ret,
            ),
            (
                "to no Service (pod IP)",
                none_repeated,
                none_single,
                none_ret,
            ),
        ],
        overhead_ns: overhead,
    };
    Ok(cost)
}

/// The conntrack collector's pass on a full table: conntrack filled (from userspace, in
/// batches) with established TCP flows of both entries, then a pass that keeps them
/// all, then one after half of them were made idle past their timeout.
fn gc_cost(plane: &Dataplane) -> Result<(usize, f64, f64)> {
    use lb_common::{
        ipv4_mapped, CtKey, CtValue, CT_DIR_FORWARD, CT_DIR_REPLY, CT_STATE_ESTABLISHED,
    };
    use lb_userspace::dataplane::gc::{monotonic_now_ns, Gc, Timeouts};
    let maps = plane.maps.gc_maps()?;
    let max = plane.maps.conntrack_handle()?.max_entries() as usize;
    let now = monotonic_now_ns();
    // Established flows expire after 60 s here, and the idle half was last seen 120 s
    // ago: the default timeout (a day) would ask the monotonic clock, which starts at
    // boot, for more than a fresh machine has.
    let timeouts = Timeouts {
        tcp_established: Duration::from_secs(60),
        ..Timeouts::default()
    };
    let idle_ns = 120 * 1_000_000_000;
    if now < idle_ns {
        return Err(Error::Sandbox(
            "conntrack collector: the machine has been up less than 120 s".into(),
        ));
    }
    let flows = max / 2;
    let fill = |old_every: usize| -> Result<()> {
        let mut keys = Vec::with_capacity(flows * 2);
        let mut values = Vec::with_capacity(flows * 2);
        for i in 0..flows {
            let client = ipv4_mapped(u32::from_be_bytes([
                10,
                200,
                (i >> 16) as u8,
                (i >> 8) as u8,
            ]));
            let (fe, be) = (
                ipv4_mapped(u32::from_be_bytes([10, 96, 0, 1])),
                ipv4_mapped(u32::from_be_bytes([10, 244, 0, 2])),
            );
            let sport = ((i & 0xff) as u16 + 1024).to_be();
            let seen = if old_every > 0 && i % old_every == 0 {
                now - idle_ns
            } else {
                now
            };
            let v = |nat, nat_port: u16, dir| CtValue {
                last_seen_ns: seen,
                created_ns: seen,
                nat_addr: nat,
                nat_port: nat_port.to_be(),
                state: CT_STATE_ESTABLISHED,
                tcp_flags: 0x10,
                backend_id: 1,
                service_id: 1,
                flags: 0,
                dir,
                _pad: [0; 2],
            };
            keys.push(CtKey {
                src_addr: client,
                dst_addr: fe,
                src_port: sport,
                dst_port: 80u16.to_be(),
                proto: lb_common::PROTO_TCP,
                _pad: [0; 3],
            });
            values.push(v(be, 8080, CT_DIR_FORWARD));
            keys.push(CtKey {
                src_addr: be,
                dst_addr: client,
                src_port: 8080u16.to_be(),
                dst_port: sport,
                proto: lb_common::PROTO_TCP,
                _pad: [0; 3],
            });
            values.push(v(fe, 80, CT_DIR_REPLY));
        }
        for (k, v) in keys.chunks(4096).zip(values.chunks(4096)) {
            lb_userspace::dataplane::batch::update(&maps.conntrack, k, v)
                .map_err(|(_, e)| Error::Sandbox(format!("filling conntrack: {e}")))?;
        }
        Ok(())
    };
    let gc = Gc::new(plane.maps.gc_maps()?, timeouts);
    fill(0)?;
    let keep = gc.pass(&[]).map_err(|e| Error::Sandbox(e.to_string()))?;
    fill(2)?;
    let expire = gc.pass(&[]).map_err(|e| Error::Sandbox(e.to_string()))?;
    if keep.expired != 0 || expire.expired == 0 {
        return Err(Error::Sandbox(format!(
            "conntrack collector: {} expired of a fresh table, {} of a half-idle one",
            keep.expired, expire.expired
        )));
    }
    // Leave the maps as they were for what follows.
    let _ = gc.pass(&[]);
    Ok((
        keep.entries,
        keep.took.as_secs_f64() * 1e3,
        expire.took.as_secs_f64() * 1e3,
    ))
}

/// Destination address and port of a TCP/UDP frame of either family.
fn dst_of(pkt: &[u8]) -> Option<(IpAddr, u16)> {
    (pkt.len() >= 54).then(|| {
        let v = packet::view(pkt);
        (v.dst, v.dport)
    })
}

/// The control plane runs' Services: `scale` of them with 10 endpoints each; the web
/// Service under test is dual stack (for the per-packet runs of both families).
fn control_workload(scale: usize) -> Vec<workload::Svc> {
    let web = [
        Ipv4Addr::new(10, 244, 0, 12),
        Ipv4Addr::new(10, 244, 0, 13),
        Ipv4Addr::new(10, 244, 0, 14),
    ];
    let mut svcs = workload::services(
        scale,
        Endpoints::Exactly(10),
        &web,
        Ipv4Addr::new(10, 244, 0, 15),
    );
    let web6 = [0xc, 0xd, 0xe].map(|h| Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, h));
    let iperf6 = Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, 0xf);
    workload::with_ipv6(&mut svcs, &web6, iperf6);
    svcs
}

fn library_path(scale: usize, opts: &Opts, r: &mut ControlResult) -> Result<()> {
    let svcs = control_workload(scale);
    r.services = svcs.len();
    r.endpoints = workload::endpoint_count(&svcs);
    let mut cfg = workload::to_config(&svcs);
    drop(svcs);
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/lbbench-cp-{}", std::process::id()));
    let _ = remove_pins(&pin_dir);
    let (mut datapath, maps) =
        Datapath::load(&load_opts(pin_dir.clone(), r.services, r.endpoints))?;
    let result = (|| -> Result<()> {
        let mut plane = Dataplane::new(maps)?;
        let t = Instant::now();
        let desired = desired_state(&cfg.services, &cfg.endpoint_slices, &cfg.node);
        r.model_secs = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let rep = plane.sync(&desired);
        r.sync_secs = t.elapsed().as_secs_f64();
        r.sync_ops = rep.ops;
        r.sync_errors = rep.errors.len();
        drop(desired);
        progress(format!(
            "   library: model {:.3} s, Dataplane::sync from empty {:.3} s ({} map writes, {} errors)",
            r.model_secs, r.sync_secs, r.sync_ops, r.sync_errors
        ));
        check_interrupted()?;
        let mut cache = lb_userspace::model::ModelCache::default();
        cache.replace_all(cfg.services.clone(), cfg.endpoint_slices.clone());
        let rep = plane.sync(cache.desired());
        // The maps hold the whole state now: later deltas start from here.
        cache.take_delta();
        if rep.ops != 0 || !rep.errors.is_empty() {
            return Err(Error::Sandbox(format!(
                "the model cache disagrees with desired_state: {} ops, errors {:?}",
                rep.ops, rep.errors
            )));
        }
        // One endpoint change at a time, spread over the services.
        // Bounded: at most 200 changes or 30 s (20 s quick), at least 5.
        let budget = Duration::from_secs(if opts.quick { 20 } else { 30 });
        let t_all = Instant::now();
        let fillers = cfg.endpoint_slices.len().saturating_sub(2).max(1);
        // Above 20k services only the from-empty sync is measured (the issue asks for
        // change latency at 10k; a change costs far more at 100k, see the report).
        let changes = if scale > 20_000 { 0 } else { 200 };
        for i in 0..changes {
            if i >= 5 && t_all.elapsed() > budget {
                break;
            }
            check_interrupted()?;
            let k = (i * 7919) % fillers;
            let c = &mut cfg.endpoint_slices[k].endpoints[0].conditions;
            c.ready = Some(c.ready == Some(false));
            let t = Instant::now();
            // As the Kubernetes agent does: the changed slice into the model cache (its
            // Service's frontends are recomputed), then the incremental diff to the maps.
            cache.upsert_slice(cfg.endpoint_slices[k].clone());
            let delta = cache.take_delta();
            let rep = plane.sync_delta(cache.current(), Some(&delta));
            let us = t.elapsed().as_secs_f64() * 1e6;
            if rep.ops == 0 || !rep.errors.is_empty() {
                return Err(Error::Sandbox(format!(
                    "endpoint change made {} ops, errors {:?}",
                    rep.ops, rep.errors
                )));
            }
            r.change_us.push(us);
        }
        progress(format!(
            "   library: one endpoint change to the maps p50 {:.2} ms p99 {:.2} ms ({} changes)",
            quantile(&r.change_us, 0.5) / 1e3,
            quantile(&r.change_us, 0.99) / 1e3,
            r.change_us.len()
        ));
        // Two Services that point at each other, so a translated packet is again a packet
        // to a Service: BPF_PROG_TEST_RUN's repeat then measures real established-flow and
        // reply translations (see packet_cost).
        add_ping_pong(&mut cfg);
        let rep = plane.sync(&desired_state(
            &cfg.services,
            &cfg.endpoint_slices,
            &cfg.node,
        ));
        if !rep.errors.is_empty() {
            return Err(Error::Sandbox(format!(
                "ping-pong services: {:?}",
                rep.errors
            )));
        }
        super::conntrack_filter_on(&plane.maps)?;
        r.packet = packet_costs(&mut datapath)?;
        r.gc = Some(gc_cost(&plane)?);
        if let Some((n, keep, expire)) = r.gc {
            progress(format!(
                "   conntrack collector on {n} entries: a pass keeping every flow {keep:.1} ms, one expiring half {expire:.1} ms"
            ));
        }
        for c in &r.packet {
            for (name, ns, raw, ret) in &c.cases {
                progress(format!(
                    "   per packet ({}): {name:<40} {ns:>6.0} ns (single run {raw:.0} ns, verdict {ret})",
                    c.program
                ));
            }
            progress(format!(
                "   per packet ({}): harness overhead of a single run {:.0} ns",
                c.program, c.overhead_ns
            ));
        }
        Ok(())
    })();
    let _ = datapath.shutdown(false);
    let _ = remove_pins(&pin_dir);
    result
}

/// `lb run --config` on the workload written as YAML (the JSON file is measured with
/// `agentpath`, readiness changes included), and the maps' memory.
fn yaml_agent_path(scale: usize, r: &mut ControlResult) -> Result<()> {
    let svcs = control_workload(scale);
    let sb = Sandbox::create("lbbench-cp", &[])?;
    let cfg = workload::to_config(&svcs);
    let (path, text, format) = {
        let t = serde_yaml_ng::to_string(&cfg).map_err(|e| Error::Sandbox(e.to_string()))?;
        (sb.path("services.yaml"), t, "YAML")
    };
    drop(cfg);
    std::fs::write(&path, &text).map_err(|e| Error::Sandbox(e.to_string()))?;
    progress(format!(
        "   agent: {format} config file {:.1} MiB",
        text.len() as f64 / 1048576.0
    ));
    drop(text);
    // The node namespace has no interface the glob matches: nothing is attached.
    let (pid, secs) = datapath::start_agent(
        &sb,
        &path,
        "lbbench-none-*",
        svcs.len(),
        workload::endpoint_count(&svcs),
        "agent.log",
    )?;
    let rss = datapath::rss_mib(pid);
    (r.agent_secs, r.agent_rss_mib) = (Some(secs), rss);
    r.map_mib = map_memlock(sb.pin_dir());
    let n = lb_userspace::dataplane::Maps::from_pins(sb.pin_dir())?
        .frontends
        .keys()
        .count();
    let want = workload::cluster_ip_frontend_count(&svcs);
    if n != want {
        return Err(Error::Sandbox(format!(
            "agent synced {n} frontends, expected {want}"
        )));
    }
    let (rss, hwm) = rss.unwrap_or((f64::NAN, f64::NAN));
    progress(format!(
        "   agent (lb run --config, {format}): spawn to synced {secs:.2} s, VmRSS {rss:.0} MiB, VmHWM {hwm:.0} MiB, maps {:.0} MiB",
        r.map_mib.iter().map(|m| m.1).sum::<f64>()
    ));
    sb.stop(pid, libc::SIGTERM)?;
    Ok(())
}

pub fn run_all(opts: &Opts) -> Result<Vec<ControlResult>> {
    let mut out = Vec::new();
    for scale in opts.cp_scales() {
        check_interrupted()?;
        progress(format!("control plane: {scale} services x 10 endpoints"));
        let mut r = ControlResult::default();
        if let Err(e) = library_path(scale, opts, &mut r) {
            check_interrupted()?;
            progress(format!("   library path failed: {e}"));
            r.error = Some(e.to_string());
        }
        check_interrupted()?;
        if let Err(e) = yaml_agent_path(scale, &mut r) {
            check_interrupted()?;
            progress(format!("   agent path (YAML) failed: {e}"));
            r.error.get_or_insert(e.to_string());
        }
        // A change through the file rewrites and re-reads the whole file (seconds at
        // 100k Services): fewer of them.
        let (k8s_changes, file_changes) = if opts.quick { (50, 5) } else { (200, 20) };
        for file in [false, true] {
            check_interrupted()?;
            let a = if file {
                agentpath::file_agent(scale, file_changes)
            } else {
                agentpath::k8s_agent(scale, k8s_changes)
            };
            if let Some(e) = &a.error {
                check_interrupted()?;
                progress(format!("   {} failed: {e}", a.agent));
            } else {
                progress(format!(
                    "   {}: one readiness change to the maps p50 {:.2} ms, p99 {:.2} ms ({} changes); RSS {:.0} MiB synced, {:.0} MiB after, peak {:.0} MiB",
                    a.agent,
                    quantile(&a.change_ms, 0.5),
                    quantile(&a.change_ms, 0.99),
                    a.change_ms.len(),
                    a.rss_synced_mib.unwrap_or(f64::NAN),
                    a.rss_after_changes_mib.unwrap_or(f64::NAN),
                    a.peak_mib.unwrap_or(f64::NAN)
                ));
            }
            r.agents.push(a);
        }
        out.push(r);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bpftool_json_gives_the_memlock() {
        // bpftool 7.1 `-j map show pinned /sys/fs/bpf/lb/LB_FRONTENDS`.
        let text = r#"{"id":1093,"type":"hash","name":"LB_FRONTENDS","flags":0,"bytes_key":12,"bytes_value":12,"max_entries":65536,"bytes_memlock":5767168,"frozen":0,"btf_id":2154}"#;
        assert_eq!(parse_bpftool_memlock(text), Some(5_767_168));
        // Not a map (bpftool's error object), or not JSON: nothing.
        assert_eq!(
            parse_bpftool_memlock(
                r#"{"error":"bpf obj get (/sys/fs/bpf/x): No such file or directory"}"#
            ),
            None
        );
        assert_eq!(parse_bpftool_memlock(""), None);
    }
}
