//! `lb trace`: the datapath's decisions as they happen, one line each (like `cilium
//! monitor`): a new flow with its client, frontend, chosen backend and how it was
//! chosen; a refusal; a drop with its reason. The programs write [`TraceEvent`]s to the
//! pinned ring buffer `LB_EVENTS` only while `LB_TRACE` says a tracer reads; this
//! command turns it on while it runs and off when the last tracer leaves.
//!
//! Several tracers may run at once: each registers its process id in `LB_TRACE`'s value
//! (under an exclusive `flock` of the pin folder, so two tracers never lose each other's
//! change), and tracing is on while any registered process lives. They share the one
//! ring buffer, so each event goes to one of them (whichever reads it first): two
//! tracers at once see the events split between them. A tracer killed before it could
//! take itself out (SIGKILL) is found dead and removed by the next tracer that starts or
//! stops; until then the programs keep writing events nobody reads (and count them
//! `trace_lost` once the ring is full). Filters apply here, in userspace: the programs
//! write every event while tracing is on.
use std::{
    fs::File,
    io::Write,
    net::IpAddr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use aya::maps::{Array, HashMap, Map, MapData, RingBuf};
use lb_common::{
    counter, Backend, Frontend, FrontendKey, TraceConfig, TraceEvent, MAP_BACKENDS, MAP_EVENTS,
    MAP_FRONTENDS, MAP_TRACE, MAX_TRACERS, TRACE_F_HAIRPIN, TRACE_F_KNOWN, TRACE_F_SNAT,
    TRACE_HOOK_TC, TRACE_HOOK_XDP, TRACE_NOTHING,
};
use serde::Serialize;

use crate::{
    dataplane::plan::ip_addr,
    model::Protocol,
    show::{self, Format, ServiceMatch},
    Error, Result,
};

/// What `lb trace` prints.
#[derive(Clone, Debug, Default)]
pub struct TraceOptions {
    pub pin_dir: PathBuf,
    pub format: Format,
    /// Only events of this frontend (`IP[:PORT[/PROTO]]`), service id or Service
    /// (`namespace/name[:port]`, resolved through the agent at start).
    pub service: Option<ServiceMatch>,
    /// Only events in which this address is the client, the frontend or the backend.
    pub address: Option<IpAddr>,
    /// Stop after this many events printed.
    pub count: Option<u64>,
    /// The agent to ask for Service names (`--service namespace/name`).
    pub agent: Option<std::net::SocketAddr>,
}

/// One event as printed (`-o json`: one object per line).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TraceLine {
    /// Wall-clock time of the decision (RFC 3339, UTC).
    pub time: String,
    /// `new-flow`, `refused` or `drop`.
    pub kind: &'static str,
    /// The counter the datapath incremented for the decision (`lb show counters`).
    pub reason: &'static str,
    pub proto: &'static str,
    /// `IP:PORT` (IPv6 as `[IP]:PORT`).
    pub client: String,
    pub frontend: String,
    pub service_id: u32,
    /// The chosen backend, if any (its address: none if it is gone since).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_id: Option<u32>,
    /// How the backend was chosen: `hash`, `affinity`, `conntrack`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub by: Option<&'static str>,
    /// The program: `tc` or `xdp`.
    pub hook: &'static str,
    /// `snat`, `hairpin`, `recreated` (a TCP packet without SYN found no entry).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub flags: Vec<&'static str>,
    #[serde(skip)]
    ips: [Option<IpAddr>; 3],
    #[serde(skip)]
    frontend_key: (IpAddr, u16, Protocol),
}

fn socket(ip: IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(ip, port).to_string()
}

/// CLOCK_MONOTONIC and CLOCK_REALTIME now, in ns: the events carry the first.
fn clocks() -> (u64, i128) {
    let now = |clock| {
        // SAFETY: timespec is plain data; clock_gettime fills it.
        let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
        // SAFETY: valid clock id and out-pointer.
        unsafe { libc::clock_gettime(clock, &mut ts) };
        ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
    };
    (now(libc::CLOCK_MONOTONIC) as u64, now(libc::CLOCK_REALTIME))
}

/// What an event names by id, looked up where the agent keeps it: a backend's address
/// and port by its id (`LB_BACKENDS`), whether a frontend has sessionAffinity
/// (`LB_FRONTENDS`). At the time of printing: a backend deleted since (and its id given
/// to another) would be named wrong, a window of the time it takes to print a line.
pub trait Names {
    fn backend(&self, id: u32) -> Option<(IpAddr, u16)>;
    /// How the frontend chooses a new flow's backend: "affinity" (sessionAffinity
    /// ClientIP), "maglev" (its Maglev table), "hash" (over its slots, no table).
    fn chosen_by(&self, key: &FrontendKey) -> Option<&'static str>;
}

/// [`Names`] from the pinned maps.
pub struct PinnedNames {
    backends: Array<MapData, Backend>,
    frontends: HashMap<MapData, FrontendKey, Frontend>,
}

impl PinnedNames {
    pub fn open(pin_dir: &Path) -> Result<Self> {
        crate::upgrade::check_readable(pin_dir)?;
        let open = |name: &str| {
            let path = pin_dir.join(name);
            MapData::from_pin(&path)
                .map_err(|e| Error::Map(format!("cannot open {}: {e}", path.display())))
        };
        Ok(Self {
            backends: Array::try_from(Map::Array(open(MAP_BACKENDS)?))
                .map_err(|e| Error::Map(format!("{MAP_BACKENDS}: {e}")))?,
            frontends: HashMap::try_from(Map::HashMap(open(MAP_FRONTENDS)?))
                .map_err(|e| Error::Map(format!("{MAP_FRONTENDS}: {e}")))?,
        })
    }
}

impl Names for PinnedNames {
    fn backend(&self, id: u32) -> Option<(IpAddr, u16)> {
        let b = self.backends.get(&id, 0).ok()?;
        (b.addr != [0; 4]).then(|| (ip_addr(&b.addr), u16::from_be(b.port)))
    }
    fn chosen_by(&self, key: &FrontendKey) -> Option<&'static str> {
        self.frontends.get(key, 0).ok().map(|f| {
            if f.affinity_timeout_s != 0 {
                "affinity"
            } else if f.table_size != 0 {
                "maglev"
            } else {
                "hash"
            }
        })
    }
}

/// The kind of event a decision is, by the counter it incremented.
pub fn kind_of(reason: u32) -> &'static str {
    match reason {
        counter::NEW_FLOW | counter::NEW_HAIRPIN => "new-flow",
        counter::REFUSED_NO_BACKEND | counter::PASSED_NO_BACKEND | counter::DROP_NO_BACKEND => {
            "refused"
        }
        _ => "drop",
    }
}

impl TraceLine {
    /// The line of `e` (None: nothing to report); `(mono, real)` are the clocks now (to
    /// place the event's monotonic time on the wall clock).
    pub fn new(e: &TraceEvent, (mono, real): (u64, i128), names: &dyn Names) -> Option<Self> {
        if e.reason == TRACE_NOTHING {
            return None;
        }
        let proto = Protocol::from_number(e.proto).unwrap_or(Protocol::Tcp);
        let wall = real - (mono as i128 - e.ts_ns as i128);
        let time = jiff::Timestamp::from_nanosecond(wall)
            .map(|t| format!("{t:.6}"))
            .unwrap_or_else(|_| e.ts_ns.to_string());
        let client = ip_addr(&e.client);
        let frontend = ip_addr(&e.frontend);
        let backend = (e.backend_id != 0)
            .then(|| names.backend(e.backend_id))
            .flatten();
        let port = u16::from_be;
        let mut flags: Vec<&'static str> = [(TRACE_F_SNAT, "snat"), (TRACE_F_HAIRPIN, "hairpin")]
            .into_iter()
            .filter(|(f, _)| e.flags & f != 0)
            .map(|(_, n)| n)
            .collect();
        let kind = kind_of(e.reason);
        // A TCP flow started by a packet without SYN: its entries were gone.
        if kind == "new-flow" && e.proto == lb_common::PROTO_TCP && e.tcp_flags & 0x02 == 0 {
            flags.push("recreated");
        }
        let key = FrontendKey {
            addr: e.frontend,
            port: e.frontend_port,
            proto: e.proto,
            scope: lb_common::SCOPE_OUTSIDE,
        };
        let by = if e.backend_id == 0 {
            None
        } else if e.flags & TRACE_F_KNOWN != 0 {
            Some("conntrack")
        } else {
            names.chosen_by(&key)
        };
        Some(TraceLine {
            time,
            kind,
            reason: counter::NAMES
                .get(e.reason as usize)
                .copied()
                .unwrap_or("unknown"),
            proto: match proto {
                Protocol::Tcp => "TCP",
                Protocol::Udp => "UDP",
            },
            client: socket(client, port(e.client_port)),
            frontend: socket(frontend, port(e.frontend_port)),
            service_id: e.service_id,
            backend: backend.map(|(ip, p)| socket(ip, p)),
            backend_id: (e.backend_id != 0).then_some(e.backend_id),
            by,
            hook: match e.hook {
                TRACE_HOOK_TC => "tc",
                TRACE_HOOK_XDP => "xdp",
                _ => "unknown",
            },
            flags,
            ips: [Some(client), Some(frontend), backend.map(|(ip, _)| ip)],
            frontend_key: (frontend, port(e.frontend_port), proto),
        })
    }

    /// The line people read: `TIME KIND PROTO CLIENT -> FRONTEND (service N) => BACKEND
    /// (backend N, by HOW) REASON [HOOK] FLAGS`.
    pub fn text(&self) -> String {
        let mut s = format!(
            "{} {:<8} {} {} -> {} (service {})",
            self.time, self.kind, self.proto, self.client, self.frontend, self.service_id
        );
        if let Some(id) = self.backend_id {
            let b = self.backend.as_deref().unwrap_or("(gone)");
            s += &format!(" => {b} (backend {id}");
            if let Some(by) = self.by {
                s += &format!(", by {by}");
            }
            s += ")";
        }
        s += &format!(": {} [{}]", self.reason, self.hook);
        if !self.flags.is_empty() {
            s += &format!(" {}", self.flags.join(","));
        }
        s
    }
}

/// The filters, resolved once at start.
#[derive(Clone, Debug, Default)]
pub struct TraceFilter {
    service: Option<ServiceMatch>,
    /// `--service namespace/name[:port]`: the frontends the agent names for it.
    frontends: Vec<(IpAddr, u16, Protocol)>,
    address: Option<IpAddr>,
}

impl TraceFilter {
    /// `--service` and `--address` as `lb show` takes them; a Service name is resolved
    /// to its frontends by asking the agent (an error if it cannot be asked, or knows no
    /// such Service).
    pub fn new(
        service: Option<ServiceMatch>,
        address: Option<IpAddr>,
        agent: Option<std::net::SocketAddr>,
    ) -> Result<Self> {
        let mut frontends = Vec::new();
        if let Some(ServiceMatch::Name(n)) = &service {
            let agent = agent.ok_or_else(|| {
                Error::Map(format!(
                    "--service {n}: a Service name needs the agent (--agent), which knows \
                     its frontends; or give a frontend IP[:PORT] or a service id"
                ))
            })?;
            let view = show::fetch_agent_view(agent).map_err(|e| {
                Error::Map(format!(
                    "--service {n}: asking the agent at {agent} for its frontends: {e}"
                ))
            })?;
            frontends = view
                .iter()
                .filter(|v| {
                    v.service == *n || v.service.rsplit_once(':').is_some_and(|(s, _)| s == n)
                })
                .filter_map(|v| {
                    let e: show::Endpoint = v.frontend.parse().ok()?;
                    Some((e.ip, e.port?, e.proto?))
                })
                .collect();
            if frontends.is_empty() {
                return Err(Error::Map(format!(
                    "--service {n}: the agent at {agent} knows no frontend of that Service"
                )));
            }
        }
        Ok(Self {
            service,
            frontends,
            address,
        })
    }

    pub fn keeps(&self, l: &TraceLine) -> bool {
        let service = match &self.service {
            None => true,
            Some(ServiceMatch::Id(id)) => l.service_id == *id,
            Some(ServiceMatch::Frontend(e)) => {
                let (ip, port, proto) = l.frontend_key;
                e.matches(ip, port, proto)
            }
            Some(ServiceMatch::Name(_)) => self.frontends.contains(&l.frontend_key),
        };
        service && self.address.is_none_or(|a| l.ips.contains(&Some(a)))
    }
}

/// An exclusive lock of the pin folder (`flock`), held while `LB_TRACE` is changed
/// (released when the file closes).
struct PinLock(#[expect(dead_code, reason = "held for its lock")] File);

impl PinLock {
    fn take(dir: &Path) -> Result<Self> {
        let f =
            File::open(dir).map_err(|e| Error::Map(format!("opening {}: {e}", dir.display())))?;
        // SAFETY: a valid open file descriptor.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(Error::Map(format!(
                "locking {}: {}",
                dir.display(),
                std::io::Error::last_os_error()
            )));
        }
        Ok(Self(f))
    }
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Takes `pid` in (`join`) or out of the tracers in `LB_TRACE`, dropping dead ones, and
/// sets `enabled` to the number left. Returns that number.
pub fn register(pin_dir: &Path, pid: u32, join: bool) -> Result<u32> {
    let _lock = PinLock::take(pin_dir)?;
    let path = pin_dir.join(MAP_TRACE);
    let data = MapData::from_pin(&path).map_err(|e| {
        Error::Map(format!(
            "cannot open {}: {e} (is an agent running with --pin-dir {}?)",
            path.display(),
            pin_dir.display()
        ))
    })?;
    let mut map: Array<MapData, TraceConfig> =
        Array::try_from(Map::Array(data)).map_err(|e| Error::Map(format!("{MAP_TRACE}: {e}")))?;
    let mut cfg = map
        .get(&0, 0)
        .map_err(|e| Error::Map(format!("reading {MAP_TRACE}: {e}")))?;
    let mut tracers: Vec<u32> = cfg
        .tracers
        .iter()
        .copied()
        .filter(|&p| p != 0 && p != pid && alive(p))
        .collect();
    if join {
        if tracers.len() >= MAX_TRACERS {
            return Err(Error::Map(format!(
                "{} tracers already run (pids {tracers:?}); {MAX_TRACERS} at most",
                tracers.len()
            )));
        }
        tracers.push(pid);
    }
    cfg.tracers = [0; MAX_TRACERS];
    cfg.tracers[..tracers.len()].copy_from_slice(&tracers);
    cfg.enabled = tracers.len() as u32;
    map.set(0, cfg, 0)
        .map_err(|e| Error::Map(format!("writing {MAP_TRACE}: {e}")))?;
    Ok(cfg.enabled)
}

/// Whether tracing is on (`LB_TRACE`), and which processes trace.
pub fn state(pin_dir: &Path) -> Result<TraceConfig> {
    let path = pin_dir.join(MAP_TRACE);
    let data = MapData::from_pin(&path)
        .map_err(|e| Error::Map(format!("cannot open {}: {e}", path.display())))?;
    let map: Array<MapData, TraceConfig> =
        Array::try_from(Map::Array(data)).map_err(|e| Error::Map(format!("{MAP_TRACE}: {e}")))?;
    map.get(&0, 0)
        .map_err(|e| Error::Map(format!("reading {MAP_TRACE}: {e}")))
}

/// Opens the pinned ring buffer.
pub fn open_events(pin_dir: &Path) -> Result<RingBuf<MapData>> {
    let path = pin_dir.join(MAP_EVENTS);
    let data = MapData::from_pin(&path).map_err(|e| {
        Error::Map(format!(
            "cannot open {}: {e} (is an agent of this version running with --pin-dir {}?)",
            path.display(),
            pin_dir.display()
        ))
    })?;
    RingBuf::try_from(Map::RingBuf(data)).map_err(|e| Error::Map(format!("{MAP_EVENTS}: {e}")))
}

/// The event in a ring buffer record.
pub fn parse_event(bytes: &[u8]) -> Option<TraceEvent> {
    (bytes.len() >= size_of::<TraceEvent>()).then(|| {
        // SAFETY: TraceEvent is plain integers (any bit pattern valid), and the record
        // holds at least its size; read unaligned.
        unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<TraceEvent>()) }
    })
}

/// Runs `lb trace` until Ctrl-C (SIGINT), SIGTERM, `--count` events or a closed
/// stdout; tracing is on meanwhile, and off again afterwards if no other tracer runs.
pub async fn run(opts: TraceOptions) -> Result<()> {
    let filter = TraceFilter::new(opts.service.clone(), opts.address, opts.agent)?;
    let ring = open_events(&opts.pin_dir)?;
    let names = PinnedNames::open(&opts.pin_dir)?;
    let pid = std::process::id();
    let n = register(&opts.pin_dir, pid, true)?;
    eprintln!(
        "tracing the datapath pinned under {} ({n} tracer{} now; Ctrl-C to stop)",
        opts.pin_dir.display(),
        if n == 1 { "" } else { "s" }
    );
    let result = follow(ring, &filter, &names, &opts).await;
    let left = register(&opts.pin_dir, pid, false);
    result?;
    left.map(|_| ())
}

async fn follow(
    ring: RingBuf<MapData>,
    filter: &TraceFilter,
    names: &dyn Names,
    opts: &TraceOptions,
) -> Result<()> {
    use tokio::{
        io::unix::AsyncFd,
        signal::unix::{signal, SignalKind},
    };
    let io = |e: std::io::Error| Error::Map(format!("{MAP_EVENTS}: {e}"));
    // SAFETY: the AsyncFd owns the ring buffer, whose fd stays open as long as it does.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| io(e.into()))?;
    let mut int = signal(SignalKind::interrupt()).map_err(io)?;
    let mut term = signal(SignalKind::terminate()).map_err(io)?;
    let mut printed = 0u64;
    let mut out = std::io::stdout().lock();
    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard.map_err(io)?;
                let clocks = clocks();
                let rb = guard.get_inner_mut();
                while let Some(item) = rb.next() {
                    let Some(e) = parse_event(&item) else { continue };
                    let Some(line) = TraceLine::new(&e, clocks, names) else { continue };
                    if !filter.keeps(&line) {
                        continue;
                    }
                    let text = match opts.format {
                        Format::Table => line.text(),
                        Format::Json => serde_json::to_string(&line)
                            .map_err(|e| Error::Map(format!("JSON: {e}")))?,
                    };
                    match writeln!(out, "{text}").and_then(|()| out.flush()) {
                        Ok(()) => {}
                        // `lb trace | head`: the reader left.
                        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
                        Err(e) => return Err(Error::Map(format!("writing to stdout: {e}"))),
                    }
                    printed += 1;
                    if opts.count.is_some_and(|c| printed >= c) {
                        return Ok(());
                    }
                }
                guard.clear_ready();
            }
            _ = int.recv() => return Ok(()),
            _ = term.recv() => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use lb_common::{ipv4_mapped, PROTO_TCP};

    use super::*;

    fn v4(a: [u8; 4]) -> lb_common::Addr {
        ipv4_mapped(u32::from_ne_bytes(a))
    }

    fn event() -> TraceEvent {
        TraceEvent {
            ts_ns: 5_000_000_000,
            client: v4([10, 244, 0, 11]),
            frontend: v4([10, 96, 0, 10]),
            client_port: 40000u16.to_be(),
            frontend_port: 80u16.to_be(),
            proto: PROTO_TCP,
            tcp_flags: 0x10,
            hook: TRACE_HOOK_TC,
            flags: 0,
            reason: counter::NEW_FLOW,
            service_id: 3,
            backend_id: 7,
            _pad: 0,
        }
    }

    /// Backend 7 is 10.244.0.12:8080; the frontend has affinity when told.
    struct Fixed(Option<bool>);

    impl Names for Fixed {
        fn backend(&self, id: u32) -> Option<(IpAddr, u16)> {
            (id == 7).then(|| ("10.244.0.12".parse().unwrap(), 8080))
        }
        fn chosen_by(&self, key: &FrontendKey) -> Option<&'static str> {
            (key.addr == v4([10, 96, 0, 10]) && key.port == 80u16.to_be())
                .then_some(self.0)
                .flatten()
                .map(|a| if a { "affinity" } else { "hash" })
        }
    }

    #[test]
    fn an_event_reads_as_one_line_with_its_backend_and_why() {
        // 1 s after the event, at 2026-01-01T00:00:01Z.
        let clocks = (6_000_000_000, 1_767_225_601_000_000_000);
        let line = TraceLine::new(&event(), clocks, &Fixed(Some(true))).unwrap();
        assert_eq!(
            line.text(),
            "2026-01-01T00:00:00.000000Z new-flow TCP 10.244.0.11:40000 -> 10.96.0.10:80 \
             (service 3) => 10.244.0.12:8080 (backend 7, by affinity): new_flow [tc] recreated"
        );
        let json: serde_json::Value = serde_json::to_value(&line).unwrap();
        assert_eq!(json["backend"], "10.244.0.12:8080");
        assert_eq!(json["reason"], "new_flow");
        assert_eq!(json["by"], "affinity");
        assert_eq!(json["flags"][0], "recreated");
        let syn = TraceEvent {
            tcp_flags: 0x02,
            ..event()
        };
        let line = TraceLine::new(&syn, clocks, &Fixed(Some(false))).unwrap();
        assert_eq!((line.by, line.flags.len()), (Some("hash"), 0));
        let mut refused = event();
        refused.reason = counter::REFUSED_NO_BACKEND;
        refused.backend_id = 0;
        let line = TraceLine::new(&refused, (5_000_000_000, 0), &Fixed(None)).unwrap();
        assert!(
            line.text().ends_with(
                "refused  TCP 10.244.0.11:40000 -> 10.96.0.10:80 (service 3): \
                 refused_no_backend [tc]"
            ),
            "{}",
            line.text()
        );
        let json = serde_json::to_value(&line).unwrap();
        assert!(
            json.get("backend").is_none() && json.get("by").is_none(),
            "{json}"
        );
        let drop = TraceEvent {
            reason: counter::DROP_FRAGMENT,
            flags: TRACE_F_SNAT | TRACE_F_KNOWN,
            hook: TRACE_HOOK_XDP,
            ..event()
        };
        let line = TraceLine::new(&drop, (5_000_000_000, 0), &Fixed(None)).unwrap();
        assert_eq!(
            (line.kind, line.reason, line.by, line.hook),
            ("drop", "drop_fragment", Some("conntrack"), "xdp")
        );
        assert_eq!(line.flags, ["snat"]);
        let nothing = TraceEvent {
            reason: TRACE_NOTHING,
            ..event()
        };
        assert_eq!(TraceLine::new(&nothing, (0, 0), &Fixed(None)), None);
    }

    #[test]
    fn filters_keep_events_of_their_frontend_id_or_address() {
        let line = TraceLine::new(&event(), (5_000_000_000, 0), &Fixed(None)).unwrap();
        let keeps = |service: Option<&str>, address: Option<&str>| {
            TraceFilter::new(
                service.map(|s| s.parse().unwrap()),
                address.map(|a| a.parse().unwrap()),
                None,
            )
            .unwrap()
            .keeps(&line)
        };
        assert!(keeps(None, None));
        assert!(keeps(Some("3"), None));
        assert!(!keeps(Some("4"), None));
        assert!(keeps(Some("10.96.0.10"), None));
        assert!(keeps(Some("10.96.0.10:80/TCP"), None));
        assert!(!keeps(Some("10.96.0.10:81"), None));
        assert!(!keeps(Some("10.96.0.10:80/UDP"), None));
        for a in ["10.244.0.11", "10.96.0.10", "10.244.0.12"] {
            assert!(keeps(None, Some(a)), "{a}");
        }
        assert!(!keeps(None, Some("10.244.0.13")));
        assert!(!keeps(Some("3"), Some("10.244.0.13")));
        // A Service name needs the agent to be resolved.
        let e = TraceFilter::new(Some("shop/web".parse().unwrap()), None, None).unwrap_err();
        assert!(e.to_string().contains("--agent"), "{e}");
    }

    #[test]
    fn a_short_record_is_no_event() {
        let e = event();
        // SAFETY: reading the bytes of a plain struct.
        let bytes = unsafe {
            std::slice::from_raw_parts((&e as *const TraceEvent).cast::<u8>(), size_of_val(&e))
        };
        assert_eq!(parse_event(bytes), Some(e));
        assert_eq!(parse_event(&bytes[..63]), None);
    }
}
