//! Service lookup, the source-range check, and backend selection.
use aya_ebpf::btf_maps::lpm_trie::Key;
use lb_common::{
    frontend_filter_bit, tuple_hash, Addr, AffinityKey, AffinityValue, Backend, Frontend,
    FrontendKey, SlotKey, SourceRange, FRONTEND_F_HOST_ONLY, SCOPE_OUTSIDE,
};

use crate::{
    maps::{
        LB_AFFINITY, LB_BACKENDS, LB_FE_FILTER, LB_FRONTENDS, LB_MAGLEV, LB_SLOTS, LB_SRC_RANGES,
    },
    parse::Packet,
};

/// What backend selection reads of a flow: its 5-tuple. The packet path hands it the
/// parsed packet; the socket programs (`sock.rs`) the socket's view of it.
pub trait Tuple {
    fn src(&self) -> &Addr;
    fn dst(&self) -> &Addr;
    fn sport(&self) -> u16;
    fn dport(&self) -> u16;
    fn proto(&self) -> u8;
}

impl Tuple for Packet {
    #[inline(always)]
    fn src(&self) -> &Addr {
        &self.src
    }
    #[inline(always)]
    fn dst(&self) -> &Addr {
        &self.dst
    }
    #[inline(always)]
    fn sport(&self) -> u16 {
        self.sport
    }
    #[inline(always)]
    fn dport(&self) -> u16 {
        self.dport
    }
    #[inline(always)]
    fn proto(&self) -> u8 {
        self.proto
    }
}

/// Bits of a full `LB_SRC_RANGES` lookup key: the frontend's id and a 16-byte address.
const SOURCE_RANGE_BITS: u32 = 32 + 128;

/// The frontend the packet is addressed to, if any: as seen from outside (the packet
/// path never looks up the inside view), and never one served to the node's own sockets
/// only (127.0.0.1:NodePort; no such packet crosses an interface the programs are on).
#[inline(always)]
pub fn lookup_frontend(pkt: &Packet) -> Option<Frontend> {
    if !may_be_frontend(&pkt.dst) {
        return None;
    }
    let key = FrontendKey {
        addr: pkt.dst,
        port: pkt.dport,
        proto: pkt.proto,
        scope: SCOPE_OUTSIDE,
    };
    // SAFETY: the value is copied out at once; userspace replaces whole entries.
    unsafe { LB_FRONTENDS.get(&key) }
        .copied()
        .filter(|f| f.flags & FRONTEND_F_HOST_ONLY == 0)
}

/// Whether `addr` may be a frontend's: its bit in `LB_FE_FILTER` is set. A clear bit
/// means no frontend has the address, and the hash lookup is not made.
#[inline(always)]
pub fn may_be_frontend(addr: &Addr) -> bool {
    let (word, mask) = frontend_filter_bit(addr);
    LB_FE_FILTER.get(word).is_some_and(|w| *w & mask != 0)
}

/// loadBalancerSourceRanges: whether the packet's source lies in one of the frontend's
/// ranges (one longest-prefix lookup of the frontend's id and the source).
#[inline(always)]
pub fn source_allowed(pkt: &Packet, frontend: &Frontend) -> bool {
    address_allowed(&pkt.src, frontend)
}

/// Whether `addr` lies in one of the frontend's ranges (the socket programs ask it of
/// the node's own address).
#[inline(always)]
pub fn address_allowed(addr: &Addr, frontend: &Frontend) -> bool {
    let key = Key::new(
        SOURCE_RANGE_BITS,
        SourceRange {
            service_id: frontend.service_id,
            addr: *addr,
        },
    );
    LB_SRC_RANGES.get(&key).is_some()
}

/// A backend by id, if it still exists (an unused id holds zeroes).
#[inline(always)]
pub fn lookup_backend(backend_id: u32) -> Option<Backend> {
    LB_BACKENDS
        .get(backend_id)
        .copied()
        .filter(|b| b.addr != [0; 4])
}

/// murmur3's 32-bit finaliser over the 5-tuple: cheap, and spreads client ports well
/// (`lb_common::tuple_hash`, which the conntrack filter's bit is taken from too).
#[inline(always)]
pub fn flow_hash<T: Tuple>(pkt: &T) -> u32 {
    tuple_hash(pkt.src(), pkt.dst(), pkt.sport(), pkt.dport(), pkt.proto())
}

/// The one place a backend is chosen for a new flow. Returns the backend id and the
/// backend, or None if the frontend has no ready backend or its slots are being
/// rewritten under us.
///
/// Without affinity: the frontend's Maglev table at `hash(5-tuple)` (`hashed`). With
/// sessionAffinity ClientIP (`affinity_timeout_s`): the slot of the client's last new
/// connection to this frontend (`LB_AFFINITY`), if that is younger than the timeout and
/// the slot still holds that backend (a backend that left the ready set, or moved, ends
/// the affinity); otherwise the table's choice, recorded. Each new connection refreshes
/// the record, as kube-proxy's `recent` match does.
#[inline(always)]
pub fn select_backend<T: Tuple>(pkt: &T, frontend: &Frontend, now: u64) -> Option<(u32, Backend)> {
    if frontend.count == 0 {
        return None;
    }
    if frontend.affinity_timeout_s == 0 {
        return hashed(pkt, frontend).map(|(bid, b, _)| (bid, b));
    }
    let key = AffinityKey {
        client: *pkt.src(),
        service_id: frontend.service_id,
        _pad: 0,
    };
    let timeout_ns = frontend.affinity_timeout_s as u64 * 1_000_000_000;
    if let Some(a) = LB_AFFINITY.get_ptr_mut(&key) {
        // SAFETY: pointer from a successful lookup.
        let (last, id, slot) = unsafe { ((*a).last_seen_ns, (*a).backend_id, (*a).slot) };
        if now.wrapping_sub(last) < timeout_ns && slot >= 1 && slot <= frontend.count {
            if let Some((bid, b)) = slot_backend(frontend, slot) {
                if bid == id {
                    // SAFETY: as above; a racing writer stores whole scalars.
                    unsafe { (*a).last_seen_ns = now };
                    return Some((bid, b));
                }
            }
        }
    }
    let (bid, b, slot) = hashed(pkt, frontend)?;
    let value = AffinityValue {
        last_seen_ns: now,
        backend_id: bid,
        slot,
    };
    // A failed insert only loses the affinity of this connection.
    let _ = LB_AFFINITY.insert(&key, &value, 0);
    Some((bid, b))
}

/// The flow's backend by its hash, with the slot that holds it: cell
/// `table_base + hash % table_size` of the frontend's Maglev table (so a change of the
/// backend set moves about 1/N of the flows, and a flow whose conntrack entry was lost
/// lands on the same backend again); a frontend without a table (one backend, or no
/// room in `LB_MAGLEV`) uses slot `hash % count + 1`.
#[inline(always)]
fn hashed<T: Tuple>(pkt: &T, frontend: &Frontend) -> Option<(u32, Backend, u32)> {
    let h = flow_hash(pkt);
    if frontend.table_size != 0 {
        let cell = LB_MAGLEV.get(frontend.table_base.wrapping_add(h % frontend.table_size))?;
        let (bid, slot) = (cell.backend_id, cell.slot);
        if slot == 0 {
            return None;
        }
        return lookup_backend(bid).map(|b| (bid, b, slot));
    }
    let slot = h % frontend.count + 1;
    slot_backend(frontend, slot).map(|(bid, b)| (bid, b, slot))
}

/// The backend in slot `slot` of the frontend.
#[inline(always)]
fn slot_backend(frontend: &Frontend, slot: u32) -> Option<(u32, Backend)> {
    let key = SlotKey {
        service_id: frontend.service_id,
        slot,
    };
    // SAFETY: copied out at once.
    let backend_id = unsafe { LB_SLOTS.get(&key) }?.backend_id;
    lookup_backend(backend_id).map(|b| (backend_id, b))
}
