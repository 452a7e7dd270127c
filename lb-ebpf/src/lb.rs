//! The service path, top to bottom (cilium's lb.h / katran's process_packet), written
//! once for both hooks and both address families (a `Packet` holds 16-byte addresses,
//! IPv4 mapped; only `parse`, `nat`, `refuse` and `route` look at the family):
//! parse -> conntrack (a known flow, either way?) -> established: DNAT to its backend,
//! reply: reverse NAT; otherwise frontend? -> select backend -> conntrack create ->
//! DNAT. A fragment after the first (no ports) follows its first fragment's
//! translation (`frag`).
use lb_common::{counter, Addr, CtValue, Frontend, CT_DIR_REPLY, CT_F_EXTERNAL};

use crate::{
    conntrack,
    counters::count,
    frag,
    hook::{Hook, Verdict},
    nat,
    parse::{self, Packet, Parsed},
    service,
};

#[inline(always)]
pub fn process<C: Hook>(ctx: &C) -> Verdict {
    let pkt = match parse::parse(ctx) {
        Parsed::Packet(pkt) => pkt,
        Parsed::Other => {
            count(counter::PASSED);
            return Verdict::Pass;
        }
        Parsed::Malformed => {
            count(counter::PASSED_MALFORMED);
            return Verdict::Pass;
        }
        Parsed::LongExtChain => {
            count(counter::PASSED_LONG_EXT_CHAIN);
            return Verdict::Pass;
        }
        Parsed::LaterFragment(f) => return frag::later(ctx, &f, conntrack::now_ns()),
    };

    // 1. A packet of a flow we translate? One lookup finds a client's packet (forward
    //    entry) or a backend's reply (reply entry).
    if let Some(entry) = conntrack::lookup(&conntrack::key(&pkt)) {
        // SAFETY: pointer from a successful lookup; copied.
        let known = unsafe { *entry };
        let now = conntrack::now_ns();
        if known.dir == CT_DIR_REPLY {
            return from_backend(ctx, &pkt, entry, &known, now);
        }
        if pkt.first_fragment {
            count(counter::DROP_FRAGMENT);
            return Verdict::Drop;
        }
        if let Some(v) = established(ctx, &pkt, entry, &known, now) {
            return v;
        }
        // Otherwise a new connection on a reused port, or a deleted backend: the flow
        // starts over with a fresh choice below.
    }

    // 2. A new flow to a Service frontend?
    if let Some(frontend) = service::lookup_frontend(&pkt) {
        if pkt.first_fragment {
            count(counter::DROP_FRAGMENT);
            return Verdict::Drop;
        }
        return new_flow(ctx, &pkt, &frontend, conntrack::now_ns());
    }

    // 3. Nothing for us.
    count(counter::PASSED);
    Verdict::Pass
}

/// Client -> frontend on a known flow: its backend, if the flow may keep it.
#[inline(always)]
fn established<C: Hook>(
    ctx: &C,
    pkt: &Packet,
    entry: *mut CtValue,
    known: &CtValue,
    now: u64,
) -> Option<Verdict> {
    if conntrack::is_new_connection_attempt(pkt, known) {
        return None;
    }
    match service::lookup_backend(known.backend_id) {
        Some(b) if b.addr == known.nat_addr && b.port == known.nat_port => {
            if conntrack::touch(entry, pkt, now) {
                conntrack::ensure_reply(pkt, known, now);
            }
            Some(translate(
                ctx,
                pkt,
                &known.nat_addr,
                known.nat_port,
                counter::TRANSLATED,
            ))
        }
        // The backend was deleted (not merely made not-ready): pick a new one.
        _ => {
            count(counter::BACKEND_RESELECTED);
            None
        }
    }
}

/// Client -> frontend, first packet (or a flow starting over): pick a backend and
/// remember it.
#[inline(always)]
fn new_flow<C: Hook>(ctx: &C, pkt: &Packet, frontend: &Frontend, now: u64) -> Verdict {
    let Some((backend_id, backend)) = service::select_backend(pkt, frontend) else {
        return ctx.refuse(pkt);
    };
    if conntrack::create(pkt, frontend, backend_id, &backend.addr, backend.port, now).is_err() {
        count(counter::DROP_CT_FULL);
        return Verdict::Drop;
    }
    translate(ctx, pkt, &backend.addr, backend.port, counter::NEW_FLOW)
}

#[inline(always)]
fn translate<C: Hook>(ctx: &C, pkt: &Packet, addr: &Addr, port: u16, counter_ok: u32) -> Verdict {
    match nat::dnat(ctx, pkt, addr, port) {
        Ok(()) => {
            count(counter_ok);
            Verdict::Pass
        }
        Err(()) => {
            count(counter::DROP_REWRITE_FAILED);
            Verdict::Drop
        }
    }
}

/// Backend -> client: restore the frontend's address and port as the source (and note it
/// for the later fragments, if this is the first of a fragmented datagram).
#[inline(always)]
fn from_backend<C: Hook>(
    ctx: &C,
    pkt: &Packet,
    entry: *mut CtValue,
    e: &CtValue,
    now: u64,
) -> Verdict {
    conntrack::touch(entry, pkt, now);
    match nat::reverse_nat(ctx, pkt, &e.nat_addr, e.nat_port) {
        Ok(()) => {
            count(counter::REVERSE_TRANSLATED);
            if pkt.first_fragment {
                frag::note_reply(pkt, e, now);
            }
            if e.flags & CT_F_EXTERNAL != 0 {
                return ctx.send_external_reply(pkt, &e.nat_addr, e.nat_port);
            }
            Verdict::Pass
        }
        Err(()) => {
            count(counter::DROP_REWRITE_FAILED);
            Verdict::Drop
        }
    }
}
