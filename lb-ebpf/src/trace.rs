//! `lb trace`: an event per decision worth a line (a new flow and its backend, a
//! refusal, a drop), written to the `LB_EVENTS` ring buffer while a tracer reads
//! (`LB_TRACE`). When nobody traces, each such decision costs one array lookup and one
//! branch, and the packets of known flows pay nothing (no event is emitted for them).
use lb_common::counter;

use crate::{
    counters::count,
    maps::{LB_EVENTS, LB_TRACE_SCRATCH},
    parse::Packet,
};

/// Whether a tracer reads (`LB_TRACE[0].enabled`).
#[cfg(not(feature = "no-trace"))]
#[inline(always)]
pub fn on() -> bool {
    crate::maps::LB_TRACE.get(0).is_some_and(|c| c.enabled != 0)
}

/// Never: the benchmark's build without tracing (feature `no-trace`), the floor that
/// tracing switched off is measured against (`cargo xtask bench`).
#[cfg(feature = "no-trace")]
#[inline(always)]
pub fn on() -> bool {
    false
}

/// What the service path decided about a packet to a frontend, for `lb trace`: written
/// where each decision returns (so nothing more is kept live through the path, which
/// the verifier would explore again for each value), read once at the end.
pub struct Decision {
    /// The counter the decision incremented; [`NOTHING`]: nothing to report.
    pub reason: u32,
    /// The chosen backend (0: none).
    pub backend_id: u32,
    /// `TRACE_F_*`.
    pub flags: u8,
}

/// `Decision::reason`: nothing to report (XDP left a new SNAT flow to tc, which
/// reports it).
pub const NOTHING: u32 = lb_common::TRACE_NOTHING;

impl Decision {
    #[inline(always)]
    pub const fn new() -> Self {
        Decision {
            reason: NOTHING,
            backend_id: 0,
            flags: 0,
        }
    }

    /// The decision, about to return.
    #[inline(always)]
    pub fn set(&mut self, reason: u32, backend_id: u32, flags: u8) {
        self.reason = reason;
        self.backend_id = backend_id;
        self.flags = flags;
    }
}

/// Keeps the addresses of a packet to a frontend in this CPU's `LB_TRACE_SCRATCH` for
/// its event, when [`on`] (at the start of the decision). The event takes them from
/// there, not from the packet's copy on the stack: that one, kept live to the end of
/// the path, made the verifier explore the tc program's new-flow paths apart for each
/// address it had learnt something about (700,000 instructions verified instead of
/// 320,000). Memory of a map is not tracked that way.
#[inline(always)]
pub fn remember(pkt: &Packet, now: u64) {
    if let Some(s) = LB_TRACE_SCRATCH.get_ptr_mut(0) {
        // SAFETY: this CPU's scratch entry, used by this program only while it runs.
        unsafe {
            (*s).ts_ns = now;
            (*s).client = pkt.src;
            (*s).frontend = pkt.dst;
            (*s).client_port = pkt.sport;
        }
    }
}

/// Writes the event of `d` about `pkt` (as it arrived, its addresses [`remember`]ed at
/// `now`) to the ring buffer. A full ring loses the event, counted `trace_lost`. Call
/// only when [`on`]; nothing is written if the scratch holds another packet's addresses
/// (tracing was turned on while this packet was decided).
///
/// Nothing here branches but on what it must (every branch is explored again for every
/// state that reaches the event, and the states of every way through the service path
/// do): the event holds what the path decided as it is, and `lb trace` works out the
/// rest: the kind of event from the reason, the backend's address from its id, how it
/// was chosen from the frontend (hash, or sessionAffinity), and skips [`NOTHING`].
#[inline(always)]
pub fn emit(pkt: &Packet, now: u64, service_id: u32, d: &Decision, hook: u8) {
    let Some(s) = LB_TRACE_SCRATCH.get_ptr(0) else {
        return;
    };
    // SAFETY: this CPU's scratch entry, written by `remember` in this run or an earlier.
    let s = unsafe { &*s };
    if s.ts_ns != now || s.client_port != pkt.sport {
        return;
    }
    let Some(mut entry) = LB_EVENTS.reserve(0) else {
        count(counter::TRACE_LOST);
        return;
    };
    // Field by field into the ring's memory: a whole event built first would take 64
    // bytes of the tc program's 512-byte stack.
    let e = entry.as_mut_ptr();
    // SAFETY: `e` points to the reserved, 8-byte aligned room for one event, written
    // completely here before it is submitted.
    unsafe {
        (*e).ts_ns = now;
        (*e).client = s.client;
        (*e).frontend = s.frontend;
        (*e).client_port = pkt.sport;
        (*e).frontend_port = pkt.dport;
        (*e).proto = pkt.proto;
        (*e).tcp_flags = pkt.tcp_flags;
        (*e).reason = d.reason;
        (*e).service_id = service_id;
        (*e).backend_id = d.backend_id;
        (*e).hook = hook;
        (*e).flags = d.flags;
        (*e)._pad = 0;
    }
    entry.submit(0);
}
