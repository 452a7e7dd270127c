//! Connection tracking. Each translated flow has two entries in the LRU map:
//! - forward, keyed by the client's packet (client -> frontend): which backend;
//! - reply, keyed by the backend's reply (backend -> client): which frontend to restore.
//!
//! Both are keyed by a packet's 5-tuple as it arrives, so one lookup finds either; the
//! value says which (`dir`). Keys and values hold 16-byte addresses for both families
//! (IPv4 mapped), so this file never asks which family a packet is.
use lb_common::{
    counter, Addr, Backend, CtKey, CtValue, Frontend, SnatPeer, CT_DIR_FORWARD, CT_DIR_REPLY,
    CT_F_EXTERNAL, CT_F_SNAT, CT_STATE_CLOSING, CT_STATE_ESTABLISHED, CT_STATE_NEW,
    FRONTEND_F_KINDS,
};

use crate::{
    maps::{LB_CONNTRACK, LB_NODE, LB_SNAT, LB_SNAT_SCRATCH},
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

#[inline(always)]
pub fn lookup(key: &CtKey) -> Option<*mut CtValue> {
    LB_CONNTRACK.get_ptr_mut(key)
}

/// A pure SYN (no ACK) opens a new connection: if it meets a closing entry (the client
/// reuses a port), the flow starts over with a fresh backend choice.
#[inline(always)]
pub fn is_new_connection_attempt(pkt: &Packet, entry: &CtValue) -> bool {
    pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN && entry.state == CT_STATE_CLOSING
}

/// Records TCP flags and refreshes `last_seen` at most once per `REFRESH_NS`.
/// Returns true when the entry was refreshed (the caller then also checks the reply entry).
#[inline(always)]
pub fn touch(entry: *mut CtValue, pkt: &Packet, now: u64) -> bool {
    // SAFETY: pointer from a successful map lookup; racing writers only ever store whole
    // scalars, which the datapath tolerates.
    let e = unsafe { &mut *entry };
    let flags = e.tcp_flags | pkt.tcp_flags;
    let state = next_state(e.state, pkt.tcp_flags);
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

#[inline(always)]
fn next_state(state: u8, tcp_flags: u8) -> u8 {
    if tcp_flags & (TCP_FIN | TCP_RST) != 0 {
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
    LB_CONNTRACK
        .insert(&reply, &reply_value, 0)
        .map_err(|_| ())?;
    let forward_value = CtValue {
        last_seen_ns: now,
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
    LB_CONNTRACK
        .insert(&key(pkt), &forward_value, 0)
        .map_err(|_| ())
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
    let _ = LB_CONNTRACK.insert(&reply, &value, 0);
}

/// The other side of a SNAT flow's translation (`LB_SNAT`), under the key of a packet
/// of the flow as it arrives: for a client's packet, its new source; for a reply, its
/// new destination.
#[inline(always)]
pub fn snat_peer(key: &CtKey) -> Option<SnatPeer> {
    // SAFETY: copied out at once.
    unsafe { LB_SNAT.get(key) }.copied()
}

/// Creates the entries of a new flow from outside to a backend on another node, whose
/// source becomes this node's address and a port of its SNAT range (`LB_NODE`), so that
/// the backend's reply comes back here. The port is one whose reply key (backend, node
/// address, backend port, port) is free: the reply entry is inserted only if absent
/// (`BPF_NOEXIST`), from a start given by the flow's hash, at most `SNAT_TRIES` ports,
/// so two flows never share a reply key. The port is free again when its reply entry
/// goes. Each entry has its `LB_SNAT` peer, written before it. Returns the new source
/// (in `LB_SNAT_SCRATCH`'s peer), or the counter of the failure.
///
/// Keys and values are built in a per-CPU scratch map: the tc program's stack (one
/// frame for the whole inlined path) cannot hold them beside the rest.
#[inline(always)]
pub fn create_snat(
    pkt: &Packet,
    service_id: u32,
    backend_id: u32,
    backend: &Backend,
    now: u64,
) -> Result<*const SnatPeer, u32> {
    let node = LB_NODE.get(0).ok_or(counter::DROP_SNAT_EXHAUSTED)?;
    let src = match pkt.family {
        Family::V4 => node.snat_v4,
        Family::V6 => node.snat_v6,
    };
    let (min, max) = (node.snat_port_min as u32, node.snat_port_max as u32);
    if src == [0; 4] || min == 0 || max < min {
        return Err(counter::DROP_SNAT_EXHAUSTED);
    }
    let sc = LB_SNAT_SCRATCH
        .get_ptr_mut(0)
        .ok_or(counter::DROP_SNAT_EXHAUSTED)?;
    // SAFETY: this CPU's scratch, used only here while the program runs.
    let sc = unsafe { &mut *sc };
    let flags = CT_F_EXTERNAL | CT_F_SNAT;
    sc.value = CtValue {
        last_seen_ns: now,
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
    // The reply's new destination: the client.
    sc.peer = SnatPeer {
        addr: pkt.src,
        port: pkt.sport,
        _pad: [0; 6],
    };
    let range = max - min + 1;
    let start = flow_hash(pkt) % range;
    let mut port = 0u16;
    for i in 0..SNAT_TRIES {
        let p = ((min + (start + i) % range) as u16).to_be();
        sc.key = CtKey {
            src_addr: backend.addr,
            dst_addr: src,
            src_port: backend.port,
            dst_port: p,
            proto: pkt.proto,
            _pad: [0; 3],
        };
        if LB_CONNTRACK.insert(&sc.key, &sc.value, BPF_NOEXIST).is_ok() {
            port = p;
            break;
        }
    }
    if port == 0 {
        return Err(counter::DROP_SNAT_EXHAUSTED);
    }
    LB_SNAT
        .insert(&sc.key, &sc.peer, 0)
        .map_err(|_| counter::DROP_CT_FULL)?;
    // The client's packets: to the backend, from this node's address and the port.
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
    LB_CONNTRACK
        .insert(&sc.key, &sc.value, 0)
        .map_err(|_| counter::DROP_CT_FULL)?;
    Ok(&sc.peer)
}
