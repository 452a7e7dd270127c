//! The service path, top to bottom (cilium's lb.h / katran's process_packet), written
//! once for both hooks and both address families (a `Packet` holds 16-byte addresses,
//! IPv4 mapped; only `parse`, `nat`, `refuse` and `route` look at the family):
//! parse -> conntrack (a known flow, either way?) -> established: DNAT to its backend,
//! reply: reverse NAT; otherwise frontend? -> select backend -> conntrack create ->
//! DNAT. A fragment after the first (no ports) follows its first fragment's
//! translation (`frag`).
use lb_common::{
    counter, Addr, CtValue, Frontend, BACKEND_F_REMOTE, CT_DIR_REPLY, CT_F_EXTERNAL, CT_F_SNAT,
    FRONTEND_F_KINDS, FRONTEND_F_LOCAL,
};

use crate::{
    conntrack,
    counters::count,
    frag,
    hook::{Hook, Leaving, Verdict},
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
    if known.flags & CT_F_SNAT != 0 {
        return snat_established(ctx, pkt, entry, known, now);
    }
    if !keeps_backend(known) {
        return None;
    }
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

/// Whether the flow's backend still exists as it was chosen (same id, address and port:
/// one indexed load). A deleted backend (not merely made not-ready) is counted, and the
/// flow picks a new one.
#[inline(always)]
fn keeps_backend(known: &CtValue) -> bool {
    match service::lookup_backend(known.backend_id) {
        Some(b) if b.addr == known.nat_addr && b.port == known.nat_port => true,
        _ => {
            count(counter::BACKEND_RESELECTED);
            false
        }
    }
}

/// Client -> frontend, first packet (or a flow starting over): pick a backend and
/// remember it.
#[inline(always)]
fn new_flow<C: Hook>(ctx: &C, pkt: &Packet, frontend: &Frontend, now: u64) -> Verdict {
    let Some((backend_id, backend)) = service::select_backend(pkt, frontend, now) else {
        // externalTrafficPolicy Local without a local endpoint: dropped, as kube-proxy
        // does (the client retries; a load balancer's health check sends it elsewhere).
        if frontend.flags & FRONTEND_F_LOCAL != 0 {
            count(counter::DROP_NO_BACKEND);
            return Verdict::Drop;
        }
        return ctx.refuse(pkt);
    };
    // From outside to another node's backend: its source becomes this node's, so the
    // reply comes back here (externalTrafficPolicy Cluster; with Local, and for a
    // ClusterIP, userspace lists no backend of another node here, or the client's
    // address routes back by itself).
    if frontend.flags & FRONTEND_F_KINDS != 0 && backend.flags & BACKEND_F_REMOTE != 0 {
        if !C::SENDS_SNAT {
            count(counter::PASSED_TO_TC);
            return Verdict::Pass;
        }
        return match conntrack::create_snat(pkt, frontend.service_id, backend_id, &backend, now) {
            // SAFETY: this CPU's scratch, filled by create_snat.
            Ok(src) => unsafe {
                translate_snat(
                    ctx,
                    pkt,
                    (&backend.addr, backend.port),
                    (&(*src).addr, (*src).port),
                    counter::NEW_FLOW,
                )
            },
            Err(c) => {
                count(c);
                Verdict::Drop
            }
        };
    }
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
    if e.flags & CT_F_SNAT != 0 {
        return snat_reply(ctx, pkt, e);
    }
    match nat::reverse_nat(ctx, pkt, &e.nat_addr, e.nat_port) {
        Ok(()) => {
            count(counter::REVERSE_TRANSLATED);
            if pkt.first_fragment {
                frag::note_reply(pkt, e, now);
            }
            if e.flags & CT_F_EXTERNAL != 0 {
                return ctx.send_routed(&Leaving::packet(
                    pkt,
                    (&e.nat_addr, e.nat_port),
                    (&pkt.dst, pkt.dport),
                ));
            }
            Verdict::Pass
        }
        Err(()) => {
            count(counter::DROP_REWRITE_FAILED);
            Verdict::Drop
        }
    }
}

/// Client -> frontend of a SNAT flow: DNAT to its backend, SNAT to its source in
/// `LB_SNAT`, sent on by the hook (XDP leaves it to tc). (Its reply entry is not
/// re-created if the LRU evicted it, as for other flows: the reply then passes
/// untranslated.)
#[inline(always)]
fn snat_established<C: Hook>(
    ctx: &C,
    pkt: &Packet,
    entry: *mut CtValue,
    known: &CtValue,
    now: u64,
) -> Option<Verdict> {
    if !C::SENDS_SNAT {
        count(counter::PASSED_TO_TC);
        return Some(Verdict::Pass);
    }
    if !keeps_backend(known) {
        return None;
    }
    let Some(src) = conntrack::snat_peer(&conntrack::key(pkt)) else {
        // Its SNAT peer was evicted: the flow starts over.
        return None;
    };
    conntrack::touch(entry, pkt, now);
    Some(translate_snat(
        ctx,
        pkt,
        (&known.nat_addr, known.nat_port),
        (&src.addr, src.port),
        counter::TRANSLATED,
    ))
}

/// Client -> frontend of a SNAT flow: DNAT to the backend and SNAT to this node's
/// address and port, then sent on by the hook (the kernel would drop a packet arriving
/// with a source of its own).
#[inline(always)]
fn translate_snat<C: Hook>(
    ctx: &C,
    pkt: &Packet,
    (daddr, dport): (&Addr, u16),
    (saddr, sport): (&Addr, u16),
    counter_ok: u32,
) -> Verdict {
    if nat::dnat(ctx, pkt, daddr, dport).is_err() || nat::snat(ctx, pkt, saddr, sport).is_err() {
        count(counter::DROP_REWRITE_FAILED);
        return Verdict::Drop;
    }
    count(counter_ok);
    ctx.send_routed(&Leaving::packet(pkt, (saddr, sport), (daddr, dport)))
}

/// Backend -> this node's SNAT address and port: the frontend as source, the client
/// (`LB_SNAT`) as destination, sent on by the hook (XDP leaves it to tc). Its later
/// fragments would need their destination rewritten too, which the fragment notes do
/// not do yet: they pass untouched (and the datagram is lost).
#[inline(always)]
fn snat_reply<C: Hook>(ctx: &C, pkt: &Packet, e: &CtValue) -> Verdict {
    if !C::SENDS_SNAT {
        count(counter::PASSED_TO_TC);
        return Verdict::Pass;
    }
    let Some(client) = conntrack::snat_peer(&conntrack::key(pkt)) else {
        count(counter::PASSED);
        return Verdict::Pass;
    };
    if nat::reverse_nat(ctx, pkt, &e.nat_addr, e.nat_port).is_err()
        || nat::reverse_snat(ctx, pkt, &client.addr, client.port).is_err()
    {
        count(counter::DROP_REWRITE_FAILED);
        return Verdict::Drop;
    }
    count(counter::REVERSE_TRANSLATED);
    ctx.send_routed(&Leaving::packet(
        pkt,
        (&e.nat_addr, e.nat_port),
        (&client.addr, client.port),
    ))
}
