//! Conntrack's garbage collector: the datapath records each entry's state and when it
//! was last seen; this thread, on a handle of its own, expires the flows whose time is up
//! (both entries together, with their SNAT peers), so the table holds live flows only and
//! a SNAT port is free again once its flow ended. It also purges at once the UDP flows of
//! a backend that left a frontend's ready set (kube-proxy clears them too: kubernetes
//! #48370, #122740), on the writer's word.
//!
//! - [`plan`] (pure): which keys to delete, from a snapshot of the maps;
//! - [`Gc`]: the I/O (batched reads, a re-check of each candidate before it goes, batched
//!   deletes) and its counters;
//! - [`spawn`]: the thread (`lb run` and `lb agent`).
//!
//! It keeps the conntrack filter too (`ct_filter`): it builds it once the agent has
//! attached the programs of this build ([`GcWork::Attached`]), and rebuilds it after a
//! pass that leaves more stale bits than live ones.
//!
//! A flow's state comes from both of its entries (each records its own direction):
//! TCP, a RST either way or a FIN both ways: closed; a FIN one way: closing; an ACK or a
//! reply seen: established; otherwise a SYN waiting. UDP: replied (a stream) or not. Each
//! state has its timeout ([`Timeouts`], flags of both agents), measured from the flow's
//! last packet in either direction.
use std::{
    collections::HashMap,
    os::fd::OwnedFd,
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc, Arc,
    },
    time::{Duration, Instant},
};

use lb_common::{
    CtKey, CtValue, SnatPeer, CT_DIR_FORWARD, CT_DIR_REPLY, CT_F_SNAT, CT_STATE_CLOSED,
    CT_STATE_CLOSING, CT_STATE_ESTABLISHED, PROTO_TCP, PROTO_UDP,
};
use tracing::{debug, info, warn};

use super::{
    batch,
    ct_filter::{self, CtFilter},
};

/// How long a flow lives after its last packet, by state. Defaults: kube-proxy's for an
/// established TCP connection (`--conntrack-tcp-timeout-established` 24 h) and the
/// kernel's for UDP (30 s unreplied, 120 s a stream); Cilium's for the end of a TCP
/// connection (10 s after a RST or FINs both ways) and for a SYN waiting (60 s); the
/// kernel's close-wait for a half-closed one (60 s).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp_syn: Duration,
    pub tcp_established: Duration,
    pub tcp_closing: Duration,
    pub tcp_closed: Duration,
    pub udp: Duration,
    pub udp_stream: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            tcp_syn: Duration::from_secs(60),
            tcp_established: Duration::from_secs(86_400),
            tcp_closing: Duration::from_secs(60),
            tcp_closed: Duration::from_secs(10),
            udp: Duration::from_secs(30),
            udp_stream: Duration::from_secs(120),
        }
    }
}

/// The collector's settings (flags of both agents).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GcOptions {
    /// Time between passes.
    pub interval: Duration,
    pub timeouts: Timeouts,
}

impl Default for GcOptions {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(10),
            timeouts: Timeouts::default(),
        }
    }
}

/// A flow's state, from its entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FlowState {
    TcpSyn,
    TcpEstablished,
    TcpClosing,
    TcpClosed,
    Udp,
    UdpStream,
}

impl FlowState {
    pub const ALL: [FlowState; 6] = [
        FlowState::TcpSyn,
        FlowState::TcpEstablished,
        FlowState::TcpClosing,
        FlowState::TcpClosed,
        FlowState::Udp,
        FlowState::UdpStream,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FlowState::TcpSyn => "tcp_syn",
            FlowState::TcpEstablished => "tcp_established",
            FlowState::TcpClosing => "tcp_closing",
            FlowState::TcpClosed => "tcp_closed",
            FlowState::Udp => "udp",
            FlowState::UdpStream => "udp_stream",
        }
    }

    fn timeout(self, t: &Timeouts) -> Duration {
        match self {
            FlowState::TcpSyn => t.tcp_syn,
            FlowState::TcpEstablished => t.tcp_established,
            FlowState::TcpClosing => t.tcp_closing,
            FlowState::TcpClosed => t.tcp_closed,
            FlowState::Udp => t.udp,
            FlowState::UdpStream => t.udp_stream,
        }
    }

    /// The state of a flow of protocol `proto` from the entries it has (at least one).
    pub fn of(proto: u8, forward: Option<&CtValue>, reply: Option<&CtValue>) -> Self {
        let states = || forward.iter().chain(reply.iter()).map(|v| v.state);
        if proto == PROTO_UDP || proto != PROTO_TCP {
            let replied = reply.is_some_and(|r| r.state == CT_STATE_ESTABLISHED);
            return if replied {
                FlowState::UdpStream
            } else {
                FlowState::Udp
            };
        }
        let closing = |v: Option<&CtValue>| v.is_some_and(|v| v.state >= CT_STATE_CLOSING);
        if states().any(|s| s == CT_STATE_CLOSED) || (closing(forward) && closing(reply)) {
            FlowState::TcpClosed
        } else if states().any(|s| s == CT_STATE_CLOSING) {
            FlowState::TcpClosing
        } else if states().any(|s| s == CT_STATE_ESTABLISHED)
            || reply.is_some_and(|r| r.tcp_flags != 0)
        {
            FlowState::TcpEstablished
        } else {
            FlowState::TcpSyn
        }
    }
}

/// The key of the reply entry a forward entry `(k, v)` pairs with (its SNAT flow's peer
/// gives the new source the backend replies to).
fn reply_key(k: &CtKey, v: &CtValue, snat: &HashMap<CtKey, SnatPeer>) -> Option<CtKey> {
    let (dst, dport) = if v.flags & CT_F_SNAT != 0 {
        let peer = snat.get(k)?;
        (peer.addr, peer.port)
    } else {
        (k.src_addr, k.src_port)
    };
    Some(CtKey {
        src_addr: v.nat_addr,
        dst_addr: dst,
        src_port: v.nat_port,
        dst_port: dport,
        proto: k.proto,
        _pad: [0; 3],
    })
}

/// One flow of a snapshot: its entries' keys and what decides its fate.
#[derive(Clone, Debug)]
struct Flow {
    keys: Vec<CtKey>,
    state: FlowState,
    last_seen_ns: u64,
    service_id: u32,
    backend_id: u32,
    proto: u8,
    /// One of its two entries is missing (the LRU evicted it, or it is being made).
    half: bool,
}

/// What one pass over a snapshot decided.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Conntrack keys to delete, each flow's entries together.
    pub delete: Vec<CtKey>,
    /// Their keys in `LB_SNAT` (the SNAT and hairpin flows').
    pub delete_snat: Vec<CtKey>,
    /// Flows in the snapshot, and those of them that stay, by state.
    pub flows: usize,
    pub live: HashMap<FlowState, usize>,
    /// Flows that go, because their time was up / because they were purged.
    pub expired: usize,
    pub purged: usize,
    /// Flows with one entry only.
    pub half_flows: usize,
}

/// The UDP flows to purge: (frontend id, backend id) pairs whose backend left that
/// frontend's ready set.
pub type Purge = Vec<(u32, u32)>;

/// What the collector's thread is sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GcWork {
    /// UDP flows to purge, at once (the writer's).
    Purge(Purge),
    /// The programs of this build are attached where the agent attaches: no program of
    /// an earlier build inserts entries without their filter bits any more, so the
    /// conntrack filter may be built.
    Attached,
}

/// What else runs on a purge (`Gc::on_purge`), with its pairs.
pub type OnPurge = Box<dyn FnMut(&[(u32, u32)]) + Send>;

fn flows(entries: &[(CtKey, CtValue)], snat: &HashMap<CtKey, SnatPeer>) -> Vec<Flow> {
    let by_key: HashMap<CtKey, &CtValue> = entries.iter().map(|(k, v)| (*k, v)).collect();
    let mut paired: std::collections::HashSet<CtKey> = std::collections::HashSet::new();
    let mut out = Vec::new();
    for (k, v) in entries.iter().filter(|(_, v)| v.dir == CT_DIR_FORWARD) {
        let rk = reply_key(k, v, snat);
        let reply = rk.and_then(|rk| by_key.get(&rk).copied().filter(|r| r.dir == CT_DIR_REPLY));
        let mut keys = vec![*k];
        if let (Some(rk), Some(_)) = (rk, reply) {
            paired.insert(rk);
            keys.push(rk);
        }
        out.push(Flow {
            keys,
            state: FlowState::of(k.proto, Some(v), reply),
            last_seen_ns: v.last_seen_ns.max(reply.map_or(0, |r| r.last_seen_ns)),
            service_id: v.service_id,
            backend_id: v.backend_id,
            proto: k.proto,
            half: reply.is_none(),
        });
    }
    for (k, v) in entries
        .iter()
        .filter(|(k, v)| v.dir == CT_DIR_REPLY && !paired.contains(k))
    {
        out.push(Flow {
            keys: vec![*k],
            state: FlowState::of(k.proto, None, Some(v)),
            last_seen_ns: v.last_seen_ns,
            service_id: v.service_id,
            backend_id: v.backend_id,
            proto: k.proto,
            half: true,
        });
    }
    out
}

/// The keys to delete from a snapshot of conntrack and the SNAT peers, at `now_ns`
/// (CLOCK_MONOTONIC, the datapath's clock): flows whose time is up, and the UDP flows of
/// the `purge` pairs.
pub fn plan(
    entries: &[(CtKey, CtValue)],
    snat: &HashMap<CtKey, SnatPeer>,
    now_ns: u64,
    timeouts: &Timeouts,
    purge: &[(u32, u32)],
) -> Plan {
    let mut p = Plan::default();
    for f in flows(entries, snat) {
        p.flows += 1;
        if f.half {
            p.half_flows += 1;
        }
        let idle = Duration::from_nanos(now_ns.saturating_sub(f.last_seen_ns));
        let purged = f.proto == PROTO_UDP && purge.contains(&(f.service_id, f.backend_id));
        if purged || idle > f.state.timeout(timeouts) {
            if purged {
                p.purged += 1;
            } else {
                p.expired += 1;
            }
            for k in &f.keys {
                if snat.contains_key(k) {
                    p.delete_snat.push(*k);
                }
            }
            p.delete.extend(f.keys);
        } else {
            *p.live.entry(f.state).or_insert(0) += 1;
        }
    }
    p
}

/// The maps the collector works on, on handles of their own.
pub struct GcMaps {
    pub conntrack: OwnedFd,
    pub snat: OwnedFd,
    pub ct_filter: CtFilter,
}

/// The collector's counters (read by `/metrics`, never waiting for it).
#[derive(Debug, Default)]
pub struct GcStats {
    pub runs: AtomicU64,
    pub expired_flows: AtomicU64,
    pub purged_flows: AtomicU64,
    pub deleted_entries: AtomicU64,
    pub errors: AtomicU64,
    /// At the last pass: entries read, flows, half flows, and the live flows by state
    /// (`FlowState::ALL` order).
    pub entries: AtomicU64,
    pub flows: AtomicU64,
    pub half_flows: AtomicU64,
    pub live: [AtomicU64; 6],
    /// How long the last pass took, in microseconds.
    pub last_pass_us: AtomicU64,
    /// The conntrack filter: bits set at the last pass, whether it is on (1) or off (0),
    /// and how many times it was rebuilt.
    pub ct_filter_bits: AtomicU64,
    pub ct_filter_on: AtomicU64,
    pub ct_filter_rebuilds: AtomicU64,
    /// At the last pass: when it read the table (`monotonic_now_ns`), and the creation
    /// time of the oldest entry it left (`u64::MAX`: none). `podpath` detaches the pods'
    /// programs only once no entry older than their last need is left.
    pub last_pass_at_ns: AtomicU64,
    pub oldest_created_ns: AtomicU64,
}

/// The datapath's clock (`bpf_ktime_get_coarse_ns`: CLOCK_MONOTONIC, coarse).
pub fn monotonic_now_ns() -> u64 {
    // SAFETY: an all-zero timespec is valid; clock_gettime writes it.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The collector: its maps, timeouts and counters.
pub struct Gc {
    maps: GcMaps,
    pub timeouts: Timeouts,
    pub stats: Arc<GcStats>,
    /// Also run on every purge (the agent's socket iterator: connected UDP sockets of
    /// the backends that left are destroyed with their flows).
    on_purge: Option<OnPurge>,
}

/// What one pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PassReport {
    pub entries: usize,
    pub flows: usize,
    pub expired: usize,
    pub purged: usize,
    pub deleted: usize,
    pub half_flows: usize,
    pub took: Duration,
    /// The conntrack filter's bits after the pass: set, and set by the entries left.
    pub filter_bits: u64,
    pub filter_live_bits: u64,
    /// Entries left whose bit is clear while the filter is on: made behind the
    /// programs' back (the programs set a bit before they insert its entry), and not
    /// found by them until the filter is rebuilt.
    pub filter_missing: usize,
}

impl Gc {
    pub fn new(maps: GcMaps, timeouts: Timeouts) -> Self {
        Self {
            maps,
            timeouts,
            stats: Arc::default(),
            on_purge: None,
        }
    }

    /// Runs `f` on every purge too, after the flows went.
    pub fn on_purge(mut self, f: OnPurge) -> Self {
        self.on_purge = Some(f);
        self
    }

    /// One pass: read both maps, decide, re-check each candidate (a packet may have come
    /// since the read), delete.
    pub fn pass(&self, purge: &[(u32, u32)]) -> std::io::Result<PassReport> {
        let t0 = Instant::now();
        let read_at = monotonic_now_ns();
        let entries: Vec<(CtKey, CtValue)> = batch::lookup_all_hash(&self.maps.conntrack)?;
        let snat: HashMap<CtKey, SnatPeer> =
            batch::lookup_all_hash::<CtKey, SnatPeer>(&self.maps.snat)?
                .into_iter()
                .collect();
        let plan = plan(&entries, &snat, monotonic_now_ns(), &self.timeouts, purge);
        // A candidate whose entry moved since the read (a packet refreshed it) stays; a
        // purged one goes anyway.
        let by_key: HashMap<CtKey, CtValue> = entries.iter().copied().collect();
        let mut delete = Vec::with_capacity(plan.delete.len());
        for k in &plan.delete {
            let purged = by_key.get(k).is_some_and(|v| {
                k.proto == PROTO_UDP && purge.contains(&(v.service_id, v.backend_id))
            });
            match lookup::<CtKey, CtValue>(&self.maps.conntrack, k) {
                Some(v)
                    if purged
                        || Some(&v.last_seen_ns) == by_key.get(k).map(|o| &o.last_seen_ns) =>
                {
                    delete.push(*k)
                }
                Some(_) => debug!("conntrack GC: an entry was refreshed while collecting; kept"),
                None => {}
            }
        }
        let deleted = delete_keys(&self.maps.conntrack, &delete);
        delete_keys(&self.maps.snat, &plan.delete_snat);
        let took = t0.elapsed();
        let s = &self.stats;
        s.runs.fetch_add(1, Ordering::Relaxed);
        s.expired_flows
            .fetch_add(plan.expired as u64, Ordering::Relaxed);
        s.purged_flows
            .fetch_add(plan.purged as u64, Ordering::Relaxed);
        s.deleted_entries
            .fetch_add(deleted as u64, Ordering::Relaxed);
        s.entries.store(entries.len() as u64, Ordering::Relaxed);
        s.flows.store(plan.flows as u64, Ordering::Relaxed);
        s.half_flows
            .store(plan.half_flows as u64, Ordering::Relaxed);
        for (i, st) in FlowState::ALL.iter().enumerate() {
            s.live[i].store(
                plan.live.get(st).copied().unwrap_or(0) as u64,
                Ordering::Relaxed,
            );
        }
        s.last_pass_us
            .store(took.as_micros() as u64, Ordering::Relaxed);
        // The filter read after the entries: each entry's bit was set before it was
        // inserted, so before it was read.
        let on = self.filter_on();
        let words = self.maps.ct_filter.snapshot();
        let gone: std::collections::HashSet<&CtKey> = delete.iter().collect();
        let left: Vec<&(CtKey, CtValue)> =
            entries.iter().filter(|(k, _)| !gone.contains(k)).collect();
        let oldest = left.iter().map(|(_, v)| v.created_ns).min();
        s.oldest_created_ns
            .store(oldest.unwrap_or(u64::MAX), Ordering::Relaxed);
        s.last_pass_at_ns.store(read_at, Ordering::Relaxed);
        let left_keys = || left.iter().map(|(k, _)| k);
        let filter_live_bits = ct_filter::bits_set(&ct_filter::words(left_keys()));
        let filter_missing = if on {
            ct_filter::missing(&words, left_keys())
        } else {
            0
        };
        let filter_bits = ct_filter::bits_set(&words);
        self.note_filter(filter_bits);
        Ok(PassReport {
            entries: entries.len(),
            flows: plan.flows,
            expired: plan.expired,
            purged: plan.purged,
            deleted,
            half_flows: plan.half_flows,
            took,
            filter_bits,
            filter_live_bits,
            filter_missing,
        })
    }

    /// Whether the programs trust the conntrack filter.
    pub fn filter_on(&self) -> bool {
        self.maps.ct_filter.is_on()
    }

    /// Rebuilds the conntrack filter from the entries there are now, and turns it on
    /// (`ct_filter`). Call only once the programs of this build are attached.
    pub fn rebuild_filter(&self) -> std::io::Result<ct_filter::Rebuilt> {
        let r = self.maps.ct_filter.rebuild(&self.maps.conntrack)?;
        self.stats
            .ct_filter_rebuilds
            .fetch_add(1, Ordering::Relaxed);
        self.note_filter(r.after);
        Ok(r)
    }

    fn note_filter(&self, bits: u64) {
        let s = &self.stats;
        s.ct_filter_bits.store(bits, Ordering::Relaxed);
        s.ct_filter_on
            .store(self.filter_on() as u64, Ordering::Relaxed);
    }
}

/// One entry, if the map has it.
fn lookup<K: aya::Pod, V: aya::Pod>(fd: &OwnedFd, key: &K) -> Option<V> {
    use std::os::fd::AsRawFd;
    // SAFETY: `Pod` types are valid for any bit pattern.
    let mut value: V = unsafe { std::mem::zeroed() };
    let attr = batch::ElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        _pad: 0,
        key: key as *const K as u64,
        value: &mut value as *mut V as u64,
        flags: 0,
    };
    // The pointers outlive the call and point at a key and a value of the map's sizes.
    batch::sys_bpf(batch::BPF_MAP_LOOKUP_ELEM, &attr)
        .ok()
        .map(|_| value)
}

/// Deletes `keys` in batches; a key that is already gone (the LRU evicted it meanwhile)
/// is skipped. Returns how many went.
fn delete_keys(fd: &OwnedFd, keys: &[CtKey]) -> usize {
    let mut done = 0;
    for chunk in keys.chunks(batch::CHUNK) {
        let mut rest = chunk;
        while !rest.is_empty() {
            match batch::delete(fd, rest) {
                Ok(()) => {
                    done += rest.len();
                    break;
                }
                Err((n, _)) => {
                    // The kernel stopped at a key it could not delete (gone): skip it.
                    done += n;
                    rest = &rest[(n + 1).min(rest.len())..];
                }
            }
        }
    }
    done
}

/// Runs passes every `interval`, and at once when the writer sends a purge, until the
/// sender side is dropped. Logs a pass that expired or purged anything, and warns (once a
/// minute at most) when the table is 90 % full. Builds the conntrack filter once told
/// the programs are attached (and again after a rebuild that failed, at the next pass),
/// then rebuilds it when a pass leaves it mostly stale.
pub fn spawn(
    mut gc: Gc,
    interval: Duration,
    max_entries: u32,
    work: mpsc::Receiver<GcWork>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("lb-ct-gc".into())
        .spawn(move || {
            let mut last_warn: Option<Instant> = None;
            let mut next = Instant::now() + interval;
            let mut attached = false;
            loop {
                let wait = next.saturating_duration_since(Instant::now());
                let mut purge = Vec::new();
                let mut take = |w: GcWork| match w {
                    GcWork::Purge(p) => purge.extend(p),
                    GcWork::Attached => attached = true,
                };
                match work.recv_timeout(wait) {
                    Ok(w) => {
                        take(w);
                        // Whatever else is queued goes in the same pass.
                        while let Ok(w) = work.try_recv() {
                            take(w);
                        }
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => next = Instant::now() + interval,
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
                let pass = gc.pass(&purge);
                if !purge.is_empty() {
                    if let Some(f) = gc.on_purge.as_mut() {
                        f(&purge);
                    }
                }
                let mut stale = false;
                match &pass {
                    Ok(r) => {
                        if r.expired + r.purged > 0 {
                            info!(
                                expired = r.expired,
                                purged_udp = r.purged,
                                entries = r.entries,
                                took_us = r.took.as_micros() as u64,
                                "conntrack GC"
                            );
                        }
                        let full = r.entries as u64 * 10 >= max_entries as u64 * 9;
                        if full && last_warn.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                            last_warn = Some(Instant::now());
                            warn!(
                                entries = r.entries,
                                max = max_entries,
                                half_flows = r.half_flows,
                                "the conntrack table is 90% full or more: the least recently \
                                 used flows lose their entries (a client's next packet gets \
                                 them back, counted ct_recreated); raise --max-conntrack"
                            );
                        }
                        if r.filter_missing > 0 {
                            warn!(
                                entries = r.filter_missing,
                                "conntrack entries without their bit in LB_CT_FILTER (made \
                                 behind the programs' back?): the programs do not find them; \
                                 rebuilding the filter"
                            );
                        }
                        stale = r.filter_missing > 0
                            || ct_filter::needs_rebuild(r.filter_bits, r.filter_live_bits);
                    }
                    Err(e) => {
                        gc.stats.errors.fetch_add(1, Ordering::Relaxed);
                        warn!("conntrack GC pass failed: {e}");
                    }
                }
                if attached && (!gc.filter_on() || stale) {
                    match gc.rebuild_filter() {
                        Ok(r) => info!(
                            entries = r.entries,
                            bits_before = r.before,
                            bits_after = r.after,
                            grace_us = r.grace.as_micros() as u64,
                            took_us = r.took.as_micros() as u64,
                            "conntrack filter built"
                        ),
                        Err(e) => {
                            gc.stats.errors.fetch_add(1, Ordering::Relaxed);
                            warn!(
                                "building the conntrack filter failed (the programs look \
                                 every packet up meanwhile; tried again at the next pass): {e}"
                            );
                        }
                    }
                }
            }
        })
}

#[cfg(test)]
mod tests {
    use lb_common::{ipv4_mapped, CT_STATE_NEW, PROTO_TCP, PROTO_UDP};

    use super::*;

    const S: u64 = 1_000_000_000;

    fn a(last: u8) -> lb_common::Addr {
        ipv4_mapped(u32::from_ne_bytes([10, 0, 0, last]))
    }

    /// A client (10.0.0.1:40000) -> frontend (10.0.0.100:80) flow to backend 10.0.0.2:8080:
    /// its forward and reply entries, with the given states and times.
    fn flow(
        proto: u8,
        sport: u16,
        (fwd_state, fwd_seen): (u8, u64),
        reply: Option<(u8, u8, u64)>,
    ) -> Vec<(CtKey, CtValue)> {
        let v = |nat: lb_common::Addr, nat_port: u16, state, tcp_flags, seen, dir| CtValue {
            last_seen_ns: seen,
            created_ns: 0,
            nat_addr: nat,
            nat_port: nat_port.to_be(),
            state,
            tcp_flags,
            backend_id: 7,
            service_id: 3,
            flags: 0,
            dir,
            _pad: [0; 2],
        };
        let fk = CtKey {
            src_addr: a(1),
            dst_addr: a(100),
            src_port: sport.to_be(),
            dst_port: 80u16.to_be(),
            proto,
            _pad: [0; 3],
        };
        let mut out = vec![(fk, v(a(2), 8080, fwd_state, 0, fwd_seen, CT_DIR_FORWARD))];
        if let Some((state, flags, seen)) = reply {
            let rk = CtKey {
                src_addr: a(2),
                dst_addr: a(1),
                src_port: 8080u16.to_be(),
                dst_port: sport.to_be(),
                proto,
                _pad: [0; 3],
            };
            out.push((rk, v(a(100), 80, state, flags, seen, CT_DIR_REPLY)));
        }
        out
    }

    #[test]
    fn flows_expire_by_the_state_of_both_entries_and_go_with_both() {
        let t = Timeouts::default();
        let now = 100_000 * S;
        let snat = HashMap::new();
        // An established connection idle for an hour stays; one closed both ways 11 s
        // ago goes, both entries; one closed one way (half-closed) 11 s ago stays.
        let mut entries = flow(
            PROTO_TCP,
            1,
            (CT_STATE_ESTABLISHED, now - 3600 * S),
            Some((CT_STATE_ESTABLISHED, 0x10, now - 3600 * S)),
        );
        let closed = flow(
            PROTO_TCP,
            2,
            (CT_STATE_CLOSING, now - 11 * S),
            Some((CT_STATE_CLOSING, 0x11, now - 11 * S)),
        );
        entries.extend(closed.iter().copied());
        entries.extend(flow(
            PROTO_TCP,
            3,
            (CT_STATE_CLOSING, now - 11 * S),
            Some((CT_STATE_ESTABLISHED, 0x10, now - 11 * S)),
        ));
        // A reset 11 s ago: closed.
        entries.extend(flow(
            PROTO_TCP,
            4,
            (CT_STATE_CLOSED, now - 11 * S),
            Some((CT_STATE_ESTABLISHED, 0x10, now - 30 * S)),
        ));
        // A SYN unanswered for 61 s; a UDP query unanswered for 31 s; a UDP stream idle
        // for 31 s (stays: 120 s).
        entries.extend(flow(
            PROTO_TCP,
            5,
            (CT_STATE_NEW, now - 61 * S),
            Some((CT_STATE_NEW, 0, now - 61 * S)),
        ));
        entries.extend(flow(
            PROTO_UDP,
            6,
            (CT_STATE_NEW, now - 31 * S),
            Some((CT_STATE_NEW, 0, now - 31 * S)),
        ));
        entries.extend(flow(
            PROTO_UDP,
            7,
            (CT_STATE_NEW, now - 31 * S),
            Some((CT_STATE_ESTABLISHED, 0, now - 31 * S)),
        ));
        let p = plan(&entries, &snat, now, &t, &[]);
        assert_eq!(p.flows, 7);
        assert_eq!(p.expired, 4, "{p:?}");
        assert_eq!(p.delete.len(), 8, "both entries of each");
        for (k, _) in &closed {
            assert!(p.delete.contains(k));
        }
        assert_eq!(p.live.get(&FlowState::TcpEstablished), Some(&1));
        assert_eq!(p.live.get(&FlowState::TcpClosing), Some(&1));
        assert_eq!(p.live.get(&FlowState::UdpStream), Some(&1));
        // The flow's last packet either way counts: a reply 5 s ago keeps a flow whose
        // client was silent for a day and a half.
        let e = flow(
            PROTO_TCP,
            8,
            (CT_STATE_ESTABLISHED, now - 90_000 * S),
            Some((CT_STATE_ESTABLISHED, 0x10, now - 5 * S)),
        );
        assert_eq!(plan(&e, &snat, now, &t, &[]).expired, 0);
    }

    #[test]
    fn a_half_flow_is_counted_and_expires_by_its_own_entry() {
        let t = Timeouts::default();
        let now = 100_000 * S;
        let snat = HashMap::new();
        // The LRU took the reply entry of one flow and the forward entry of another.
        let mut e = flow(PROTO_TCP, 1, (CT_STATE_ESTABLISHED, now - 5 * S), None);
        let orphan = flow(
            PROTO_UDP,
            2,
            (CT_STATE_NEW, 0),
            Some((CT_STATE_NEW, 0, now - 40 * S)),
        )[1];
        e.push(orphan);
        let p = plan(&e, &snat, now, &t, &[]);
        assert_eq!((p.flows, p.half_flows, p.expired), (2, 2, 1));
        assert_eq!(p.delete, vec![orphan.0]);
    }

    #[test]
    fn udp_flows_of_a_purged_backend_go_at_once_and_tcp_ones_stay() {
        let t = Timeouts::default();
        let now = 100_000 * S;
        let snat = HashMap::new();
        let mut e = flow(
            PROTO_UDP,
            1,
            (CT_STATE_NEW, now),
            Some((CT_STATE_ESTABLISHED, 0, now)),
        );
        e.extend(flow(
            PROTO_TCP,
            2,
            (CT_STATE_ESTABLISHED, now),
            Some((CT_STATE_ESTABLISHED, 0x10, now)),
        ));
        let p = plan(&e, &snat, now, &t, &[(3, 7)]);
        assert_eq!((p.purged, p.expired), (1, 0));
        assert_eq!(p.delete.len(), 2, "the UDP flow's two entries");
        assert_eq!(
            plan(&e, &snat, now, &t, &[(3, 8)]).purged,
            0,
            "another backend"
        );
    }

    #[test]
    fn a_snat_flow_pairs_by_its_peer_and_takes_its_peers_along() {
        let t = Timeouts::default();
        let now = 100_000 * S;
        let mut e = flow(PROTO_TCP, 1, (CT_STATE_CLOSED, now - 20 * S), None);
        e[0].1.flags = CT_F_SNAT;
        // The reply entry of a SNAT flow: backend -> this node's address and port 61000.
        let node = a(50);
        let rk = CtKey {
            src_addr: a(2),
            dst_addr: node,
            src_port: 8080u16.to_be(),
            dst_port: 61000u16.to_be(),
            proto: PROTO_TCP,
            _pad: [0; 3],
        };
        let mut rv = e[0].1;
        rv.dir = CT_DIR_REPLY;
        rv.nat_addr = a(100);
        rv.nat_port = 80u16.to_be();
        e.push((rk, rv));
        let mut snat = HashMap::new();
        let peer = |addr, port: u16| SnatPeer {
            addr,
            port: port.to_be(),
            _pad: [0; 6],
        };
        snat.insert(e[0].0, peer(node, 61000));
        snat.insert(rk, peer(a(1), 1));
        let p = plan(&e, &snat, now, &t, &[]);
        assert_eq!((p.flows, p.half_flows, p.expired), (1, 0, 1));
        assert_eq!(p.delete.len(), 2);
        assert_eq!(p.delete_snat.len(), 2);
    }
}
