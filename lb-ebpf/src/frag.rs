//! Fragmented datagrams of translated flows, both ways: to a frontend where they arrive
//! (ingress, `lb.rs`, tc and XDP) and a reply where it leaves (tc egress, `reply.rs`). A
//! fragmented datagram has its L4 header in the first fragment only: that one finds its
//! conntrack entry (or makes one) by its ports and is translated like any packet; the
//! later fragments have no ports, so the first leaves a note in `LB_FRAGS`, keyed by
//! what every fragment of the datagram carries (source, destination, identification,
//! protocol, as they arrive: IPv4's 16-bit IP id, or the 32-bit id of the IPv6 fragment
//! header and its next header), saying which address to give them: the backend as
//! destination (`FRAG_REWRITE_DST`, noted at ingress) or the frontend as source
//! (`FRAG_REWRITE_SRC`, noted at egress). Each hook only applies its own kind: a
//! reply's later fragment meets its note at ingress too, and passes there.
//!
//! A later fragment gets that address (and, for IPv4, a fixed header checksum), nothing
//! else: the L4 checksum, in the first fragment, already covers the new pseudo-header.
//! The backend's stack reassembles the datagram (or the node's, for its own connection
//! tracking, which fragments it again on the way out).
//!
//! Rules (ARCHITECTURE.md, bad input):
//! - a later fragment without a note (not ours, or it overtook its first fragment) passes
//!   untouched, counted `passed_fragment`: a reordered datagram is lost (the receiver
//!   cannot reassemble fragments with two sources) as it was before;
//! - a note older than `FRAG_TIMEOUT_NS` is ignored: its datagram is gone, and the same
//!   key may come again on another datagram (the IP id wraps);
//! - notes are never deleted (fragments may come twice or out of order, so the last one
//!   seen says nothing): the LRU recycles them.
use lb_common::{counter, Addr, CtValue, FragKey, FragValue, FRAG_REWRITE_DST, FRAG_REWRITE_SRC};

use crate::{
    counters::count,
    hook::Verdict,
    maps::LB_FRAGS,
    nat::Rewriter,
    parse::{Fragment, Packet},
};

/// Linux's default reassembly timeout (`net.ipv4.ipfrag_time`): the receiver has dropped
/// an incomplete datagram by then.
const FRAG_TIMEOUT_NS: u64 = 30_000_000_000;

/// A first fragment of a reply was reverse-translated per `entry` (its reply entry): note
/// the new source for the later fragments. A failed insert only loses the note (those
/// fragments then pass untouched, as before).
#[inline(always)]
pub fn note_reply(pkt: &Packet, entry: &CtValue, now: u64) {
    let key = FragKey {
        src_addr: pkt.src,
        dst_addr: pkt.dst,
        id: pkt.frag_id,
        proto: pkt.proto,
        _pad: [0; 3],
    };
    let value = FragValue {
        created_ns: now,
        addr: entry.nat_addr,
        field: FRAG_REWRITE_SRC,
        flags: entry.flags,
        _pad: [0; 6],
    };
    let _ = LB_FRAGS.insert(&key, &value, 0);
}

/// A first fragment to a frontend was DNATed to `backend`: note it for the later ones
/// (keyed as they arrive, to the frontend). A failed insert only loses the note.
#[inline(always)]
pub fn note_forward(pkt: &Packet, backend: &Addr, now: u64) {
    let key = FragKey {
        src_addr: pkt.src,
        dst_addr: pkt.dst,
        id: pkt.frag_id,
        proto: pkt.proto,
        _pad: [0; 3],
    };
    let value = FragValue {
        created_ns: now,
        addr: *backend,
        field: FRAG_REWRITE_DST,
        flags: 0,
        _pad: [0; 6],
    };
    let _ = LB_FRAGS.insert(&key, &value, 0);
}

/// A fragment after the first: translated as its first fragment was, if that one left a
/// note of this hook's kind (`field`: `FRAG_REWRITE_DST` at ingress, `FRAG_REWRITE_SRC`
/// at egress).
#[inline(always)]
pub fn later<C: Rewriter>(ctx: &C, frag: &Fragment, now: u64, field: u8) -> Verdict {
    let key = FragKey {
        src_addr: frag.src,
        dst_addr: frag.dst,
        id: frag.frag_id,
        proto: frag.proto,
        _pad: [0; 3],
    };
    let Some(note) = LB_FRAGS.get_ptr(&key) else {
        count(counter::PASSED_FRAGMENT);
        return Verdict::Pass;
    };
    // SAFETY: pointer from a successful lookup; copied.
    let note = unsafe { *note };
    if note.field != field || now.wrapping_sub(note.created_ns) > FRAG_TIMEOUT_NS {
        count(counter::PASSED_FRAGMENT);
        return Verdict::Pass;
    }
    let (off, old, done) = if field == FRAG_REWRITE_SRC {
        (
            frag.family.src_off(),
            &frag.src,
            counter::REVERSE_TRANSLATED_FRAGMENT,
        )
    } else {
        (
            frag.family.dst_off(),
            &frag.dst,
            counter::TRANSLATED_FRAGMENT,
        )
    };
    if ctx
        .rewrite_ip_addr(frag.family, frag.l3_off, frag.l3_off + off, old, &note.addr)
        .is_err()
    {
        count(counter::DROP_REWRITE_FAILED);
        return Verdict::Drop;
    }
    count(done);
    Verdict::Pass
}
