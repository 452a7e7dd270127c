//! Service lookup and backend selection.
use lb_common::{Addr, Backend, Frontend, FrontendKey, SlotKey};

use crate::{
    maps::{LB_BACKENDS, LB_FRONTENDS, LB_SLOTS},
    parse::Packet,
};

/// The frontend the packet is addressed to, if any.
#[inline(always)]
pub fn lookup_frontend(pkt: &Packet) -> Option<Frontend> {
    let key = FrontendKey {
        addr: pkt.dst,
        port: pkt.dport,
        proto: pkt.proto,
        _pad: 0,
    };
    // SAFETY: the value is copied out at once; userspace replaces whole entries.
    unsafe { LB_FRONTENDS.get(&key) }.copied()
}

/// A backend by id, if it still exists (an unused id holds zeroes).
#[inline(always)]
pub fn lookup_backend(backend_id: u32) -> Option<Backend> {
    LB_BACKENDS
        .get(backend_id)
        .copied()
        .filter(|b| b.addr != [0; 4])
}

/// The four words of an address folded into one (an IPv4-mapped address gives its IPv4
/// address and a constant).
#[inline(always)]
fn fold_addr(a: &Addr) -> u32 {
    a[0] ^ a[1] ^ a[2] ^ a[3]
}

/// murmur3's 32-bit finaliser over the 5-tuple: cheap, and spreads client ports well.
#[inline(always)]
pub fn flow_hash(pkt: &Packet) -> u32 {
    let mut h = fold_addr(&pkt.src)
        ^ fold_addr(&pkt.dst).rotate_left(16)
        ^ (((pkt.sport as u32) << 16) | pkt.dport as u32)
        ^ ((pkt.proto as u32) << 8);
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

/// The one place a backend is chosen for a new flow (Maglev and affinity plug in here).
/// Returns the backend id and the backend, or None if the frontend has no ready backend
/// or its slot table is being rewritten under us.
#[inline(always)]
pub fn select_backend(pkt: &Packet, frontend: &Frontend) -> Option<(u32, Backend)> {
    if frontend.count == 0 {
        return None;
    }
    let slot = flow_hash(pkt) % frontend.count + 1;
    let key = SlotKey {
        service_id: frontend.service_id,
        slot,
    };
    // SAFETY: copied out at once.
    let backend_id = unsafe { LB_SLOTS.get(&key) }?.backend_id;
    lookup_backend(backend_id).map(|b| (backend_id, b))
}
