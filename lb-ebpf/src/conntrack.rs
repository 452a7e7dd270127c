//! Connection tracking. Each translated flow has two entries in the LRU map:
//! - forward, keyed by the client's packet (client -> frontend): which backend;
//! - reply, keyed by the backend's reply (backend -> client): which frontend to restore.
//!
//! Both are keyed by a packet's 5-tuple as it arrives, so one lookup finds either; the
//! value says which (`dir`). Keys and values hold 16-byte addresses for both families
//! (IPv4 mapped), so this file never asks which family a packet is.
//!
//! In front of the map, `LB_CT_FILTER`: every insert sets its key's bit first
//! (`insert`), so while the agent keeps the filter's switch on, a packet whose bit is
//! clear has no entry and is not looked up (`lookup`).
use lb_common::{
    counter, ct_filter_bit, Addr, Backend, CtKey, CtValue, Frontend, SnatPeer, CT_DIR_FORWARD,
    CT_DIR_REPLY, CT_FILTER_ON, CT_FILTER_SWITCH, CT_F_EXTERNAL, CT_F_HAIRPIN, CT_F_SNAT,
    CT_STATE_CLOSED, CT_STATE_CLOSING, CT_STATE_ESTABLISHED, CT_STATE_NEW, FRONTEND_F_KINDS,
    PROTO_UDP,
};

use crate::{
    maps::{LB_CONNTRACK, LB_CT_FILTER, LB_NODE, LB_SNAT, LB_SNAT_SCRATCH},
    parse::{Family, Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    service::flow_hash,
};

/// `BPF_NOEXIST`: an insert that fails if the key is there (a SNAT port in use).
const BPF_NOEXIST: u64 = 1;
/// Ports of the SNAT range tried for a new flow before it is dropped.
const SNAT_TRIES: u32 = 8;

/// Entries are refreshed at most this often, so established flows do not write a shared
/// cache line on every packet.
const REFRESH_NS: u64 = 1_000_000_000;

#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { aya_ebpf::helpers::bpf_ktime_get_coarse_ns() }
}

/// The key of a packet as it arrives: a client's packet finds its flow's forward entry,
/// a backend's reply its reply entry.
#[inline(always)]
pub fn key(pkt: &Packet) -> CtKey {
    CtKey {
        src_addr: pkt.src,
        dst_addr: pkt.dst,
        src_port: pkt.sport,
        dst_port: pkt.dport,
        proto: pkt.proto,
        _pad: [0; 3],
    }
}

/// The entry of `key`, if it has one. Most packets of a node have none (pod to pod, a
/// connect-time flow's): the filter tells them without the hash lookup.
#[inline(always)]
pub fn lookup(key: &CtKey) -> Option<*mut CtValue> {
    if !may_be_tracked(key) {
        return None;
    }
    LB_CONNTRACK.get_ptr_mut(key)
}

/// False only when `LB_CT_FILTER` is on and `key`'s bit is clear: then no entry has the
/// key, since every entry's bit is set before it is inserted, and the agent turns the
/// filter off while it clears stale bits.
#[inline(always)]
fn may_be_tracked(key: &CtKey) -> bool {
    if LB_CT_FILTER.get(CT_FILTER_SWITCH).copied() != Some(CT_FILTER_ON) {
        return true;
    }
    let (word, mask) = ct_filter_bit(key);
    LB_CT_FILTER.get(word).is_none_or(|w| w & mask != 0)
}

/// Sets `key`'s bit in `LB_CT_FILTER`; called before each insert into `LB_CONNTRACK`.
/// An atomic OR: another CPU (or the agent) may set a bit of the same word at once.
#[inline(always)]
fn mark(key: &CtKey) {
    let (word, mask) = ct_filter_bit(key);
    if let Some(w) = LB_CT_FILTER.get_ptr_mut(word) {
        // `lock *(u64 *)(w + 0) |= mask`: BPF_ATOMIC | BPF_OR (Linux 5.12), which
        // `AtomicU64::fetch_or` does not reach on this target (core has no RMW atomics
        // for BPF).
        // SAFETY: a pointer into the map's value, valid while the program runs, aligned
        // for a u64; every other writer uses atomic operations too.
        unsafe {
            core::arch::asm!(
                "lock *(u64 *)({w} + 0) |= {mask}",
                w = in(reg) w,
                mask = in(reg) mask,
                options(nostack),
            )
        };
    }
}

/// Inserts an entry, its filter bit first.
#[inline(always)]
fn insert(key: &CtKey, value: &CtValue, flags: u64) -> Result<(), i32> {
    mark(key);
    LB_CONNTRACK.insert(key, value, flags)
}

/// A pure SYN (no ACK) opens a new connection: if it meets a closing or closed entry
/// (the client reuses a port), the flow starts over with a fresh backend choice.
#[inline(always)]
pub fn is_new_connection_attempt(pkt: &Packet, entry: &CtValue) -> bool {
    pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN && entry.state >= CT_STATE_CLOSING
}

/// Records TCP flags and refreshes `last_seen` at most once per `REFRESH_NS`.
/// Returns true when the entry was refreshed (the caller then also checks the reply entry).
#[inline(always)]
pub fn touch(entry: *mut CtValue, pkt: &Packet, now: u64) -> bool {
    // SAFETY: pointer from a successful map lookup; racing writers only ever store whole
    // scalars, which the datapath tolerates.
    let e = unsafe { &mut *entry };
    let flags = e.tcp_flags | pkt.tcp_flags;
    let state = if pkt.proto == PROTO_UDP {
        // A datagram through an entry: a reply entry met a reply (the flow is a stream,
        // with the longer timeout); a forward entry stays as it was.
        if e.dir == CT_DIR_REPLY {
            CT_STATE_ESTABLISHED
        } else {
            e.state
        }
    } else {
        next_state(e.state, pkt.tcp_flags)
    };
    let refresh = now.wrapping_sub(e.last_seen_ns) > REFRESH_NS;
    if flags != e.tcp_flags || state != e.state {
        e.tcp_flags = flags;
        e.state = state;
    }
    if refresh {
        e.last_seen_ns = now;
    }
    refresh
}

/// TCP: RST closes, FIN starts closing, an ACK on a new entry establishes it; a closed
/// entry stays closed (a new connection on its port starts over, above).
#[inline(always)]
fn next_state(state: u8, tcp_flags: u8) -> u8 {
    if tcp_flags & TCP_RST != 0 {
        CT_STATE_CLOSED
    } else if tcp_flags & TCP_FIN != 0 && state < CT_STATE_CLOSING {
        CT_STATE_CLOSING
    } else if state == CT_STATE_NEW && tcp_flags & TCP_ACK != 0 {
        CT_STATE_ESTABLISHED
    } else {
        state
    }
}

/// Creates the forward and reply entries of a new flow. The reply entry is written first,
/// so that a forward entry never exists without its reply.
#[inline(always)]
pub fn create(
    pkt: &Packet,
    frontend: &Frontend,
    backend_id: u32,
    backend_addr: &Addr,
    backend_port: u16,
    now: u64,
) -> Result<(), ()> {
    let service_id = frontend.service_id;
    // Any kind bit means the frontend is reached from outside (not a ClusterIP).
    let flags = if frontend.flags & FRONTEND_F_KINDS != 0 {
        CT_F_EXTERNAL
    } else {
        0
    };
    let reply = CtKey {
        src_addr: *backend_addr,
        dst_addr: pkt.src,
        src_port: backend_port,
        dst_port: pkt.sport,
        proto: pkt.proto,
        _pad: [0; 3],
    };
    let reply_value = CtValue {
        last_seen_ns: now,
        created_ns: now,
        nat_addr: pkt.dst,
        nat_port: pkt.dport,
        state: CT_STATE_NEW,
        tcp_flags: 0,
        backend_id,
        service_id,
        flags,
        dir: CT_DIR_REPLY,
        _pad: [0; 2],
    };
    insert(&reply, &reply_value, 0).map_err(|_| ())?;
    let forward_value = CtValue {
        last_seen_ns: now,
        created_ns: now,
        nat_addr: *backend_addr,
        nat_port: backend_port,
        state: next_state(CT_STATE_NEW, pkt.tcp_flags),
        tcp_flags: pkt.tcp_flags,
        backend_id,
        service_id,
        flags,
        dir: CT_DIR_FORWARD,
        _pad: [0; 2],
    };
    insert(&key(pkt), &forward_value, 0).map_err(|_| ())
}

/// Re-creates the reply entry of a live forward entry if the LRU evicted it.
#[inline(always)]
pub fn ensure_reply(pkt: &Packet, fwd: &CtValue, now: u64) {
    let reply = CtKey {
        src_addr: fwd.nat_addr,
        dst_addr: pkt.src,
        src_port: fwd.nat_port,
        dst_port: pkt.sport,
        proto: pkt.proto,
        _pad: [0; 3],
    };
    if let Some(entry) = LB_CONNTRACK.get_ptr_mut(&reply) {
        // SAFETY: pointer from a successful lookup.
        unsafe { (*entry).last_seen_ns = now };
        return;
    }
    let value = CtValue {
        last_seen_ns: now,
        created_ns: now,
        nat_addr: pkt.dst,
        nat_port: pkt.dport,
        state: fwd.state,
        tcp_flags: 0,
        backend_id: fwd.backend_id,
        service_id: fwd.service_id,
        flags: fwd.flags,
        dir: CT_DIR_REPLY,
        _pad: [0; 2],
    };
    let _ = insert(&reply, &value, 0);
}

/// The other side of a SNAT flow's translation (`LB_SNAT`), under the key of a packet
/// of the flow as it arrives: for a client's packet, its new source; for a reply, its
/// new destination.
#[inline(always)]
pub fn snat_peer(key: &CtKey) -> Option<SnatPeer> {
    // SAFETY: copied out at once.
    unsafe { LB_SNAT.get(key) }.copied()
}

/// This node's SNAT source of the family (`LB_NODE`, in the map: no copy on the
/// stack), if it has one.
#[inline(always)]
pub fn snat_source(family: Family) -> Option<&'static Addr> {
    let node = LB_NODE.get(0)?;
    // The two addresses lead `NodeConfig` (`snat_v4`, then `snat_v6`): indexed with a
    // bound the verifier can see. (A `match` compiles to `family * 16` from a byte the
    // verifier can only bound by 255; the volatile read keeps the compiler from
    // dropping the mask it knows to be redundant.)
    let i = (family == Family::V6) as usize;
    // SAFETY: reading a local.
    let i = unsafe { core::ptr::read_volatile(&i) } & 1;
    // SAFETY: `NodeConfig` is `#[repr(C)]` and starts with two `Addr`s; i is 0 or 1.
    let addr = unsafe { &*(node as *const lb_common::NodeConfig as *const Addr).add(i) };
    (*addr != [0; 4]).then_some(addr)
}

/// Whose source a new SNAT flow gets (`create_snat`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum SnatTo {
    /// This node's address of the family and a free port of its SNAT range (`LB_NODE`):
    /// a flow from outside toward a backend on another node.
    Node,
    /// The frontend's address and the client's own port: a hairpin flow, the pod is its
    /// own backend. The reply key (pod, target port, frontend, client port) belongs to
    /// the client's own socket, so an entry already there is an earlier connection of it
    /// and is replaced.
    Frontend,
}

/// Creates the entries of a new flow whose source is translated too (`SnatTo`), so
/// that the backend's reply comes back to this program: toward a backend on another
/// node, the source becomes this node's address and a port of its SNAT range; for a
/// hairpin flow, the frontend's address. A port of the range is one whose reply key
/// (backend, node address, backend port, port) is free: the reply entry is inserted
/// only if absent (`BPF_NOEXIST`), from a start given by the flow's hash, at most
/// `SNAT_TRIES` ports, so two flows never share a reply key; the port is free again when
/// its reply entry goes. Each entry has its `LB_SNAT` peer, written before it. Returns
/// the new source (in `LB_SNAT_SCRATCH`'s peer), or the counter of the failure.
///
/// Keys and values are built in a per-CPU scratch map: the tc program's stack (one
/// frame for the whole inlined path) cannot hold them beside the rest.
#[inline(always)]
pub fn create_snat(
    pkt: &Packet,
    frontend: &Frontend,
    backend_id: u32,
    backend: &Backend,
    to: SnatTo,
    now: u64,
) -> Result<*const SnatPeer, u32> {
    let (src, min, range, tries, insert_flags) = match to {
        SnatTo::Node => {
            let node = LB_NODE.get(0).ok_or(counter::DROP_SNAT_EXHAUSTED)?;
            let src = *snat_source(pkt.family).ok_or(counter::DROP_SNAT_EXHAUSTED)?;
            let (min, max) = (node.snat_port_min as u32, node.snat_port_max as u32);
            if min == 0 || max < min {
                return Err(counter::DROP_SNAT_EXHAUSTED);
            }
            (src, min, max - min + 1, SNAT_TRIES, BPF_NOEXIST)
        }
        SnatTo::Frontend => (pkt.dst, u16::from_be(pkt.sport) as u32, 1, 1, 0),
    };
    let sc = LB_SNAT_SCRATCH
        .get_ptr_mut(0)
        .ok_or(counter::DROP_SNAT_EXHAUSTED)?;
    // SAFETY: this CPU's scratch, used only here while the program runs.
    let sc = unsafe { &mut *sc };
    let mut flags = CT_F_SNAT;
    if frontend.flags & FRONTEND_F_KINDS != 0 {
        flags |= CT_F_EXTERNAL;
    }
    if to == SnatTo::Frontend {
        flags |= CT_F_HAIRPIN;
    }
    sc.value = CtValue {
        last_seen_ns: now,
        created_ns: now,
        nat_addr: pkt.dst,
        nat_port: pkt.dport,
        state: CT_STATE_NEW,
        tcp_flags: 0,
        backend_id,
        service_id: frontend.service_id,
        flags,
        dir: CT_DIR_REPLY,
        _pad: [0; 2],
    };
    // The reply's new destination: the client.
    sc.peer = SnatPeer {
        addr: pkt.src,
        port: pkt.sport,
        _pad: [0; 6],
    };
    let start = if range > 1 { flow_hash(pkt) % range } else { 0 };
    let mut port = 0u16;
    for i in 0..SNAT_TRIES {
        if i >= tries {
            break;
        }
        let p = ((min + (start + i) % range) as u16).to_be();
        sc.key = CtKey {
            src_addr: backend.addr,
            dst_addr: src,
            src_port: backend.port,
            dst_port: p,
            proto: pkt.proto,
            _pad: [0; 3],
        };
        if insert(&sc.key, &sc.value, insert_flags).is_ok() {
            port = p;
            break;
        }
    }
    if port == 0 {
        return Err(match to {
            SnatTo::Node => counter::DROP_SNAT_EXHAUSTED,
            SnatTo::Frontend => counter::DROP_CT_FULL,
        });
    }
    LB_SNAT
        .insert(&sc.key, &sc.peer, 0)
        .map_err(|_| counter::DROP_CT_FULL)?;
    // The client's packets: to the backend, from the new source.
    sc.key = key(pkt);
    sc.value.nat_addr = backend.addr;
    sc.value.nat_port = backend.port;
    sc.value.state = next_state(CT_STATE_NEW, pkt.tcp_flags);
    sc.value.tcp_flags = pkt.tcp_flags;
    sc.value.dir = CT_DIR_FORWARD;
    sc.peer.addr = src;
    sc.peer.port = port;
    LB_SNAT
        .insert(&sc.key, &sc.peer, 0)
        .map_err(|_| counter::DROP_CT_FULL)?;
    insert(&sc.key, &sc.value, 0).map_err(|_| counter::DROP_CT_FULL)?;
    Ok(&sc.peer)
}
