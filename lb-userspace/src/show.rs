//! `lb show`: what is in the maps, read from the pins (works while the agent runs, and
//! after it exited with `--keep-pinned`), as tables for people or JSON for programs,
//! filtered by frontend, backend or address.
//!
//! The maps hold what the datapath uses, and no more: a frontend's slots hold the
//! backends it sends new connections to (its ready endpoints, or its serving
//! terminating ones when none is ready: the maps cannot tell which), and `LB_BACKENDS`
//! also keeps the backends no slot names any more (not ready, or terminating) while a
//! Service lists them, for their established flows. Kubernetes names are not in the
//! maps; a frontend's service id groups the frontends of one Service port.
use std::{
    collections::BTreeMap, fmt::Write as _, net::IpAddr, path::Path, str::FromStr, time::Duration,
};

use lb_common::{
    CtKey, CtValue, CT_DIR_FORWARD, CT_F_EXTERNAL, CT_F_SNAT, CT_STATE_CLOSED, CT_STATE_CLOSING,
    CT_STATE_ESTABLISHED, FRONTEND_F_HOST_ONLY, FRONTEND_F_LOCAL,
};
use serde::Serialize;

use crate::{
    dataplane::{
        plan::{backend_addr, frontend_addr, ip_addr, MapState},
        Maps,
    },
    model::{FrontendKind, Protocol, Scope},
    Error, Result,
};

/// What a running `lb agent` knows of a frontend that the maps do not: the Service port
/// it belongs to and every endpoint listed for it, with its conditions
/// (`GET /debug/frontends` on the agent's `--listen` address).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct FrontendView {
    pub frontend: String,
    /// `namespace/name:port-name`.
    pub service: String,
    pub backends: Vec<EndpointView>,
}

/// One endpoint of a frontend as the agent has it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct EndpointView {
    pub address: String,
    /// It gets new connections (the rules: ready, or serving terminating when none is).
    pub active: bool,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// The agent's view of every frontend, from its model (on the writer thread).
pub fn agent_view(model: &crate::model::ModelCache) -> Vec<FrontendView> {
    model
        .current()
        .frontends
        .iter()
        .map(|(fe, spec)| {
            let key = spec
                .service
                .rsplit_once(':')
                .and_then(|(svc, _)| svc.split_once('/'))
                .map(|(ns, name)| crate::model::object_key(ns, name));
            let backends = spec
                .known
                .iter()
                .map(|b| {
                    let ep = key.as_ref().and_then(|k| model.endpoint(k, b.ip));
                    // KEP-1672: ready unset is ready; serving unset is ready's value.
                    let c = ep.map(|e| e.conditions).unwrap_or_default();
                    let ready = c.ready.unwrap_or(true);
                    EndpointView {
                        address: b.to_string(),
                        active: spec.active.contains(b),
                        ready,
                        serving: c.serving.unwrap_or(ready),
                        terminating: c.terminating.unwrap_or(false),
                        node: ep.and_then(|e| e.node_name.as_deref().map(String::from)),
                    }
                })
                .collect();
            FrontendView {
                frontend: fe.to_string(),
                service: spec.service.to_string(),
                backends,
            }
        })
        .collect()
}

/// Asks the agent at `addr` for its view (a plain HTTP/1.0 GET on the loopback, 2 s at
/// most).
pub fn fetch_agent_view(
    addr: std::net::SocketAddr,
) -> std::result::Result<Vec<FrontendView>, String> {
    use std::io::{Read, Write};
    let timeout = Duration::from_secs(2);
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    write!(s, "GET /debug/frontends HTTP/1.0\r\nHost: {addr}\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| e.to_string())?;
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no HTTP answer")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(head.lines().next().unwrap_or("").to_string());
    }
    serde_json::from_str(body).map_err(|e| format!("not the agent's view: {e}"))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum What {
    Services,
    Backends,
    Conntrack,
    Counters,
    All,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns, for people.
    #[default]
    Table,
    /// One JSON object with a key per table, for programs.
    Json,
}

/// An address, with a port and a protocol if given: `10.96.0.10`, `10.96.0.10:80`,
/// `[fd00::10]:80/TCP`, `10.96.0.10:53/UDP`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub port: Option<u16>,
    pub proto: Option<Protocol>,
}

impl FromStr for Endpoint {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = |why: &str| {
            format!("{s:?}: {why} (want IP, IP:PORT or IP:PORT/PROTO, IPv6 as [IP]:PORT)")
        };
        let (rest, proto) = match s.rsplit_once('/') {
            Some((r, p)) => {
                let proto = match p.to_ascii_uppercase().as_str() {
                    "TCP" => Protocol::Tcp,
                    "UDP" => Protocol::Udp,
                    _ => return Err(bad("the protocol is TCP or UDP")),
                };
                (r, Some(proto))
            }
            None => (s, None),
        };
        if let Ok(ip) = rest.parse::<IpAddr>() {
            return Ok(Self {
                ip,
                port: None,
                proto,
            });
        }
        let addr: std::net::SocketAddr = rest.parse().map_err(|_| bad("not an address"))?;
        Ok(Self {
            ip: addr.ip(),
            port: Some(addr.port()),
            proto,
        })
    }
}

impl Endpoint {
    /// Whether the address, port and protocol given are this (a port or protocol not
    /// given matches any).
    pub fn matches(&self, ip: IpAddr, port: u16, proto: Protocol) -> bool {
        self.ip == ip
            && self.port.is_none_or(|p| p == port)
            && self.proto.is_none_or(|p| p == proto)
    }
}

/// A frontend by its address (`IP[:PORT[/PROTO]]`), its service id (a number), or its
/// Service (`namespace/name` or `namespace/name:port-name`, known from the agent).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceMatch {
    Frontend(Endpoint),
    Id(u32),
    Name(String),
}

impl FromStr for ServiceMatch {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if let Ok(id) = s.parse::<u32>() {
            return Ok(Self::Id(id));
        }
        match s.parse::<Endpoint>() {
            Ok(e) => Ok(Self::Frontend(e)),
            Err(_) if s.contains('/') && !s.contains('[') => Ok(Self::Name(s.to_string())),
            Err(e) => Err(format!("{e}, or a Service as namespace/name[:port]")),
        }
    }
}

/// What to keep of each table. A row is kept when it matches every filter given.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Frontends (and their backends and flows) of this frontend or service id.
    pub service: Option<ServiceMatch>,
    /// Backends (and the frontends and flows that use them).
    pub backend: Option<Endpoint>,
    /// Rows in which this address appears anywhere.
    pub address: Option<IpAddr>,
    /// Conntrack entries of this client's flows (the forward entry's source, the reply
    /// entry's destination); the other tables have no clients and ignore it.
    pub client: Option<Endpoint>,
}

impl Filter {
    fn is_empty(&self) -> bool {
        self.service.is_none()
            && self.backend.is_none()
            && self.address.is_none()
            && self.client.is_none()
    }
}

#[derive(Debug, Serialize)]
pub struct BackendRef {
    /// Its id in LB_BACKENDS (0: listed by the agent, in no slot of this frontend).
    pub id: u32,
    pub address: String,
    /// "active": in the frontend's slots (new connections go to it); with the agent's
    /// view, also "not ready" or "terminating" for the endpoints it lists that no slot
    /// holds.
    pub state: &'static str,
    /// On another node (a flow from outside to it is source-NATed).
    pub remote: bool,
    /// The endpoint's conditions, from the agent (absent without it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ready: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serving: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub terminating: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct FrontendRow {
    pub frontend: String,
    /// The Service port (`namespace/name:port-name`), from the agent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    pub kind: String,
    pub service_id: u32,
    /// externalTrafficPolicy Local.
    pub local: bool,
    /// Who sees this entry: "outside" (every client and the packet path) or "inside"
    /// (the node's own sockets and its pods', through the socket programs: the view of
    /// an externalTrafficPolicy Local frontend with every endpoint); also the
    /// `@inside` of `frontend`.
    pub scope: &'static str,
    /// Served to the node's own sockets only (127.0.0.1:NodePort).
    pub host_only: bool,
    /// sessionAffinity ClientIP timeout, seconds (0: none).
    pub affinity_timeout_s: u32,
    /// Cells of its Maglev table (0: none, it hashes over its slots).
    pub maglev_cells: u32,
    /// The backends new connections go to, in slot order.
    pub backends: Vec<BackendRef>,
    /// Whether its address has its bit in `LB_FE_FILTER`; false: the programs do not
    /// look it up, so no client reaches it (the agent's next drift check repairs it).
    pub in_filter: bool,
    #[serde(skip)]
    ip: IpAddr,
}

#[derive(Debug, Serialize)]
pub struct BackendRow {
    pub id: u32,
    pub address: String,
    pub remote: bool,
    /// "active" (some frontend's slots hold it) or "inactive" (no slot does: not ready
    /// or terminating; kept while a Service lists it, for its established flows).
    pub state: &'static str,
    /// How many frontends' slots hold it.
    pub frontends: usize,
}

#[derive(Debug, Serialize)]
pub struct ConntrackRow {
    pub direction: &'static str,
    pub protocol: String,
    pub source: String,
    pub destination: String,
    /// Forward: the backend the flow goes to; reply: the frontend its replies come from.
    pub nat: String,
    pub backend_id: u32,
    pub service_id: u32,
    pub state: &'static str,
    pub external: bool,
    pub snat: bool,
    /// Seconds since the entry was last refreshed (the datapath refreshes it at most once
    /// a second, so this is the flow's idle time to within a second).
    pub idle_s: f64,
    /// Seconds since the entry was made.
    pub age_s: f64,
    /// Whether its key's bit is set in `LB_CT_FILTER`; false while the filter is on:
    /// the programs do not look the entry up (only a bug or a hand-made entry does this).
    pub in_filter: bool,
}

/// `LB_CT_FILTER` (`dataplane::ct_filter`): whether the programs trust it, and its fill.
#[derive(Debug, Serialize)]
pub struct CtFilterView {
    /// Off from an agent's load until its collector builds it (after attaching).
    pub on: bool,
    pub bits_set: u64,
    pub bits: u64,
}

/// Everything asked for, ready to print either way.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// Where the Service names and endpoint conditions come from: the agent's address,
    /// or why there are none.
    pub agent: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub services: Option<Vec<FrontendRow>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backends: Option<Vec<BackendRow>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conntrack: Option<Vec<ConntrackRow>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conntrack_filter: Option<CtFilterView>,
    /// Per-CPU sums of the datapath's decision counters (never filtered: they are not
    /// per Service).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub counters: Option<BTreeMap<&'static str, u64>>,
}

/// Reads the maps pinned under `pin_dir` and renders them.
pub fn render(
    pin_dir: &Path,
    what: What,
    format: Format,
    filter: &Filter,
    agent: Option<std::net::SocketAddr>,
) -> Result<String> {
    let maps =
        Maps::from_pins(pin_dir).map_err(|e| match crate::loader::foreign_bpffs(pin_dir) {
            Some(why) => Error::Map(format!("{e}; note: {why}")),
            None => e,
        })?;
    let view = agent.map(|a| (a, fetch_agent_view(a)));
    let report = read(&maps, what, filter, view)?;
    Ok(match format {
        Format::Json => {
            let mut s = serde_json::to_string_pretty(&report)
                .map_err(|e| Error::Map(format!("encoding JSON: {e}")))?;
            s.push('\n');
            s
        }
        Format::Table => table(&report, filter),
    })
}

/// Now on the clock the datapath stamps conntrack entries with (`bpf_ktime_get_coarse_ns`,
/// CLOCK_MONOTONIC_COARSE).
fn monotonic_now_ns() -> u64 {
    // SAFETY: an all-zero timespec is valid; clock_gettime writes it.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: a valid clock id and out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `agent`: its address and its view (or why it could not be had).
pub fn read(
    maps: &Maps,
    what: What,
    filter: &Filter,
    agent: Option<(
        std::net::SocketAddr,
        std::result::Result<Vec<FrontendView>, String>,
    )>,
) -> Result<Report> {
    let all = what == What::All;
    let mut report = Report::default();
    let view = match agent {
        None => {
            report.agent = "none asked (--agent \"\"): no Service names or conditions".into();
            None
        }
        Some((addr, Ok(v))) => {
            report.agent = addr.to_string();
            Some(v)
        }
        Some((addr, Err(e))) => {
            report.agent = format!(
                "no agent answered at {addr} ({e}): the maps only, no Service names or conditions"
            );
            None
        }
    };
    let need_state = all || matches!(what, What::Services | What::Backends | What::Conntrack);
    let st = if need_state {
        Some(maps.read_state()?)
    } else {
        None
    };
    if let Some(st) = &st {
        let mut frontends = frontend_rows(st, &maps.frontend_filter()?);
        if let Some(view) = &view {
            merge(&mut frontends, view);
        }
        if all || what == What::Backends {
            report.backends = Some(backend_rows(st, &frontends, filter));
        }
        if all || what == What::Conntrack {
            let entries = maps.conntrack_entries()?;
            let ct_filter = maps.ct_filter()?;
            let words = ct_filter.snapshot();
            report.conntrack = Some(conntrack_rows(
                entries,
                &frontends,
                filter,
                monotonic_now_ns(),
                &words,
            ));
            report.conntrack_filter = Some(CtFilterView {
                on: ct_filter.is_on(),
                bits_set: crate::dataplane::ct_filter::bits_set(&words),
                bits: crate::dataplane::ct_filter::CT_FILTER_BITS,
            });
        }
        if all || what == What::Services {
            report.services = Some(
                frontends
                    .into_iter()
                    .filter(|f| keep_frontend(f, filter))
                    .collect(),
            );
        }
    }
    if all || what == What::Counters {
        report.counters = Some(maps.counters()?.into_iter().collect());
    }
    Ok(report)
}

fn frontend_rows(st: &MapState, filter: &[u64]) -> Vec<FrontendRow> {
    let mut fes: Vec<_> = st.frontends.iter().collect();
    fes.sort_by_key(|(k, _)| frontend_addr(k));
    fes.into_iter()
        .map(|(k, f)| {
            let fa = frontend_addr(k);
            let backends = st
                .slot_list(f)
                .iter()
                .map(|id| match st.backend(*id) {
                    Some(b) => BackendRef {
                        id: *id,
                        address: backend_addr(b).to_string(),
                        state: "active",
                        remote: backend_addr(b).remote,
                        ready: None,
                        serving: None,
                        terminating: None,
                        node: None,
                    },
                    None => BackendRef {
                        id: *id,
                        address: format!("#{id}?"),
                        state: "missing",
                        remote: false,
                        ready: None,
                        serving: None,
                        terminating: None,
                        node: None,
                    },
                })
                .collect();
            FrontendRow {
                frontend: fa.to_string(),
                service: None,
                kind: FrontendKind::from_flags(f.flags).to_string(),
                service_id: f.service_id,
                local: f.flags & FRONTEND_F_LOCAL != 0,
                scope: match fa.scope {
                    Scope::Outside => "outside",
                    Scope::Inside => "inside",
                },
                host_only: f.flags & FRONTEND_F_HOST_ONLY != 0,
                affinity_timeout_s: f.affinity_timeout_s,
                maglev_cells: f.table_size,
                backends,
                in_filter: crate::dataplane::plan::filter::has(filter, &k.addr),
                ip: fa.ip,
            }
        })
        .collect()
}

/// Adds the agent's view: each frontend's Service, its active backends' conditions, and
/// the endpoints it lists that no slot holds (not ready, or terminating).
fn merge(rows: &mut [FrontendRow], view: &[FrontendView]) {
    let by_frontend: BTreeMap<&str, &FrontendView> =
        view.iter().map(|v| (v.frontend.as_str(), v)).collect();
    for row in rows {
        let Some(v) = by_frontend.get(row.frontend.as_str()) else {
            continue;
        };
        row.service = Some(v.service.clone());
        for e in &v.backends {
            let conditions = |b: &mut BackendRef| {
                b.ready = Some(e.ready);
                b.serving = Some(e.serving);
                b.terminating = Some(e.terminating);
                b.node = e.node.clone();
            };
            match row.backends.iter_mut().find(|b| b.address == e.address) {
                Some(b) => conditions(b),
                None => {
                    let mut b = BackendRef {
                        id: 0,
                        address: e.address.clone(),
                        state: if e.terminating {
                            "terminating"
                        } else {
                            "not ready"
                        },
                        remote: false,
                        ready: None,
                        serving: None,
                        terminating: None,
                        node: None,
                    };
                    conditions(&mut b);
                    row.backends.push(b);
                }
            }
        }
    }
}

/// `ip:port/PROTO` of a backend reference, parsed back for the filters.
fn parse_endpoint(s: &str) -> Option<(IpAddr, u16, Protocol)> {
    let e: Endpoint = s.parse().ok()?;
    Some((e.ip, e.port?, e.proto?))
}

fn frontend_matches(f: &FrontendRow, m: &ServiceMatch) -> bool {
    match m {
        ServiceMatch::Id(id) => f.service_id == *id,
        ServiceMatch::Name(n) => f
            .service
            .as_deref()
            .is_some_and(|s| s == n || s.rsplit_once(':').is_some_and(|(svc, _)| svc == n)),
        ServiceMatch::Frontend(e) => {
            parse_endpoint(&f.frontend).is_some_and(|(ip, port, proto)| e.matches(ip, port, proto))
        }
    }
}

fn backend_matches(b: &BackendRef, e: &Endpoint) -> bool {
    parse_endpoint(&b.address).is_some_and(|(ip, port, proto)| e.matches(ip, port, proto))
}

fn keep_frontend(f: &FrontendRow, filter: &Filter) -> bool {
    filter
        .service
        .as_ref()
        .is_none_or(|m| frontend_matches(f, m))
        && filter
            .backend
            .is_none_or(|e| f.backends.iter().any(|b| backend_matches(b, &e)))
        && filter.address.is_none_or(|a| {
            f.ip == a
                || f.backends
                    .iter()
                    .any(|b| parse_endpoint(&b.address).is_some_and(|(ip, _, _)| ip == a))
        })
}

fn backend_rows(st: &MapState, frontends: &[FrontendRow], filter: &Filter) -> Vec<BackendRow> {
    let mut users: BTreeMap<u32, Vec<&FrontendRow>> = BTreeMap::new();
    for f in frontends {
        for b in f.backends.iter().filter(|b| b.state == "active") {
            users.entry(b.id).or_default().push(f);
        }
    }
    let mut bs: Vec<_> = st.backends().collect();
    bs.sort_by_key(|(id, _)| *id);
    bs.into_iter()
        .filter_map(|(id, b)| {
            let addr = backend_addr(b);
            let used = users.get(&id).map(Vec::as_slice).unwrap_or_default();
            let keep = filter
                .service
                .as_ref()
                .is_none_or(|m| used.iter().any(|f| frontend_matches(f, m)))
                && filter
                    .backend
                    .is_none_or(|e| e.matches(addr.ip, addr.port, addr.proto))
                && filter.address.is_none_or(|a| addr.ip == a);
            keep.then(|| BackendRow {
                id,
                address: addr.to_string(),
                remote: addr.remote,
                state: if used.is_empty() {
                    "inactive"
                } else {
                    "active"
                },
                frontends: used.len(),
            })
        })
        .collect()
}

/// The entry's own state (its direction's packets; `lb_userspace::dataplane::gc` reads
/// the flow's from both entries).
fn state_name(v: &CtValue) -> &'static str {
    match v.state {
        CT_STATE_ESTABLISHED => "established",
        CT_STATE_CLOSING => "closing",
        CT_STATE_CLOSED => "closed",
        _ => "new",
    }
}

fn ep(a: &lb_common::Addr, port: u16) -> (IpAddr, u16) {
    (ip_addr(a), u16::from_be(port))
}

fn fmt_ep((ip, port): (IpAddr, u16)) -> String {
    std::net::SocketAddr::new(ip, port).to_string()
}

fn conntrack_rows(
    mut entries: Vec<(CtKey, CtValue)>,
    frontends: &[FrontendRow],
    filter: &Filter,
    now_ns: u64,
    ct_filter: &[u64],
) -> Vec<ConntrackRow> {
    entries.sort_by_key(|(k, v)| (v.dir, k.src_addr, k.src_port, k.dst_addr, k.dst_port));
    let ids: Option<Vec<u32>> = filter.service.as_ref().map(|m| {
        frontends
            .iter()
            .filter(|f| frontend_matches(f, m))
            .map(|f| f.service_id)
            .collect()
    });
    entries
        .into_iter()
        .filter_map(|(k, v)| {
            let proto = Protocol::from_number(k.proto);
            let (src, dst, nat) = (
                ep(&k.src_addr, k.src_port),
                ep(&k.dst_addr, k.dst_port),
                ep(&v.nat_addr, v.nat_port),
            );
            let forward = v.dir == CT_DIR_FORWARD;
            // The backend's side of the flow: a forward entry's new destination, a reply
            // entry's source; the client's: a forward entry's source, a reply entry's
            // destination (a SNAT flow's reply goes to this node's address: its client is
            // in LB_SNAT).
            let backend = if forward { nat } else { src };
            let client = if forward { src } else { dst };
            let keep = ids.as_ref().is_none_or(|ids| ids.contains(&v.service_id))
                && filter
                    .backend
                    .is_none_or(|e| proto.is_some_and(|p| e.matches(backend.0, backend.1, p)))
                && filter
                    .client
                    .is_none_or(|e| proto.is_some_and(|p| e.matches(client.0, client.1, p)))
                && filter
                    .address
                    .is_none_or(|a| [src.0, dst.0, nat.0].contains(&a));
            keep.then(|| ConntrackRow {
                direction: if forward { "forward" } else { "reply" },
                protocol: proto
                    .map(|p| p.to_string())
                    .unwrap_or_else(|| k.proto.to_string()),
                source: fmt_ep(src),
                destination: fmt_ep(dst),
                nat: fmt_ep(nat),
                backend_id: v.backend_id,
                service_id: v.service_id,
                state: state_name(&v),
                external: v.flags & CT_F_EXTERNAL != 0,
                snat: v.flags & CT_F_SNAT != 0,
                idle_s: Duration::from_nanos(now_ns.saturating_sub(v.last_seen_ns)).as_secs_f64(),
                age_s: Duration::from_nanos(now_ns.saturating_sub(v.created_ns)).as_secs_f64(),
                in_filter: crate::dataplane::ct_filter::has(ct_filter, &k),
            })
        })
        .collect()
}

/// An idle time as people read it: `0s`, `42s`, `3m12s`, `2h05m`.
fn fmt_idle(s: f64) -> String {
    let s = s as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

fn table(r: &Report, filter: &Filter) -> String {
    let mut out = String::new();
    if let Some(rows) = &r.services {
        let _ = writeln!(
            out,
            "{:<24} {:<12} {:>6} {:>6} {:>6}  {:<28} BACKENDS",
            "FRONTEND", "KIND", "ID", "ACTIVE", "MAGLEV", "SERVICE"
        );
        for f in rows {
            let mut kind = f.kind.clone();
            if f.local {
                kind.push_str(",local");
            }
            if f.host_only {
                kind.push_str(",host");
            }
            let list: Vec<String> = f
                .backends
                .iter()
                .map(|b| {
                    let mut state = vec![b.state];
                    match (b.state, b.ready, b.serving, b.terminating) {
                        ("active", Some(true), _, _) => state.push("ready"),
                        ("active", Some(false), Some(true), Some(true)) => {
                            state.extend(["serving", "terminating"])
                        }
                        ("active", Some(false), _, _) => state.push("not ready"),
                        ("terminating", _, Some(true), _) => state.push("serving"),
                        _ => {}
                    }
                    format!("{}({})", b.address, state.join(","))
                })
                .collect();
            let _ = writeln!(
                out,
                "{:<24} {:<12} {:>6} {:>6} {:>6}  {:<28} {}",
                f.frontend,
                kind,
                f.service_id,
                f.backends.iter().filter(|b| b.state == "active").count(),
                if f.maglev_cells == 0 {
                    "-".to_string()
                } else {
                    f.maglev_cells.to_string()
                },
                f.service.as_deref().unwrap_or("-"),
                list.join(" ")
            );
        }
        let _ = writeln!(
            out,
            "(active: in the frontend's slots, new connections go to it; maglev: cells of its table; names and conditions: {})",
            r.agent
        );
        for f in rows.iter().filter(|f| !f.in_filter) {
            let _ = writeln!(
                out,
                "warning: {}: its address has no bit in LB_FE_FILTER, so the programs do not look it up and no client reaches it (the agent's next drift check writes it again)",
                f.frontend
            );
        }
        let _ = writeln!(out);
    }
    if let Some(rows) = &r.backends {
        let _ = writeln!(
            out,
            "{:>6}  {:<28} {:<7} {:<9} {:>9}",
            "ID", "BACKEND", "NODE", "STATE", "FRONTENDS"
        );
        for b in rows {
            let _ = writeln!(
                out,
                "{:>6}  {:<28} {:<7} {:<9} {:>9}",
                b.id,
                b.address,
                if b.remote { "remote" } else { "local" },
                b.state,
                b.frontends
            );
        }
        if rows.iter().any(|b| b.state == "inactive") {
            let _ = writeln!(
                out,
                "(inactive: in no frontend's slots, i.e. not ready or terminating; kept for its established flows)"
            );
        }
        let _ = writeln!(out);
    }
    if let Some(rows) = &r.conntrack {
        let _ = writeln!(
            out,
            "{:<8} {:<5} {:<24} {:<24} {:<24} {:>7} {:>6}  {:<20} {:<7} IDLE",
            "DIR", "PROTO", "SOURCE", "DESTINATION", "NAT", "BACKEND", "ID", "STATE", "AGE"
        );
        for c in rows {
            let mut state = c.state.to_string();
            if c.external {
                state.push_str(" external");
            }
            if c.snat {
                state.push_str(" snat");
            }
            let _ = writeln!(
                out,
                "{:<8} {:<5} {:<24} {:<24} {:<24} {:>7} {:>6}  {:<20} {:<7} {}",
                c.direction,
                c.protocol,
                c.source,
                c.destination,
                c.nat,
                c.backend_id,
                c.service_id,
                state,
                fmt_idle(c.age_s),
                fmt_idle(c.idle_s)
            );
        }
        if let Some(f) = &r.conntrack_filter {
            let _ = writeln!(
                out,
                "(conntrack filter: {}, {} of {} bits set)",
                if f.on {
                    "on"
                } else {
                    "off, every packet looked up"
                },
                f.bits_set,
                f.bits
            );
            if f.on {
                for c in rows.iter().filter(|c| !c.in_filter) {
                    let _ = writeln!(
                        out,
                        "warning: {} {} -> {}: its key has no bit in LB_CT_FILTER, so the programs do not find it (the agent's collector finds it at its next pass and rebuilds the filter)",
                        c.direction, c.source, c.destination
                    );
                }
            }
        }
        let _ = writeln!(out);
    }
    if let Some(counters) = &r.counters {
        let _ = writeln!(out, "{:<28} {:>14}", "COUNTER", "PACKETS");
        for (name, v) in counters {
            let _ = writeln!(out, "{name:<28} {v:>14}");
        }
        if !filter.is_empty() {
            let _ = writeln!(
                out,
                "(counters are the whole datapath's: filters do not apply)"
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_with_or_without_port_and_protocol() {
        let e: Endpoint = "10.96.0.10".parse().unwrap();
        assert_eq!((e.port, e.proto), (None, None));
        let e: Endpoint = "10.96.0.10:53/udp".parse().unwrap();
        assert_eq!((e.port, e.proto), (Some(53), Some(Protocol::Udp)));
        let e: Endpoint = "[fd00::10]:80".parse().unwrap();
        assert_eq!(e.ip, "fd00::10".parse::<IpAddr>().unwrap());
        assert!(e.matches(e.ip, 80, Protocol::Tcp));
        assert!(!e.matches(e.ip, 81, Protocol::Tcp));
        let err = "10.96.0.10:80/SCTP".parse::<Endpoint>().unwrap_err();
        assert!(err.contains("TCP or UDP"), "{err}");
        assert!("web".parse::<Endpoint>().unwrap_err().contains("\"web\""));
        assert_eq!("12".parse::<ServiceMatch>().unwrap(), ServiceMatch::Id(12));
        assert_eq!(
            "shop/web:http".parse::<ServiceMatch>().unwrap(),
            ServiceMatch::Name("shop/web:http".into())
        );
        assert!(matches!(
            "[fd00::10]:80/TCP".parse::<ServiceMatch>().unwrap(),
            ServiceMatch::Frontend(_)
        ));
        assert!("[fd00::10]:80/SCTP".parse::<ServiceMatch>().is_err());
    }

    #[test]
    fn idle_times_read_as_people_write_them() {
        assert_eq!(fmt_idle(0.4), "0s");
        assert_eq!(fmt_idle(59.9), "59s");
        assert_eq!(fmt_idle(192.0), "3m12s");
        assert_eq!(fmt_idle(7500.0), "2h05m");
    }
}
