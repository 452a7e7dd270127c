//! The service path, top to bottom (cilium's lb.h / katran's process_packet), written
//! once for both ingress hooks (tc and XDP) and both address families (a `Packet` holds
//! 16-byte addresses, IPv4 mapped; only `parse`, `nat`, `refuse` and `route` look at
//! the family): parse -> conntrack (a known flow, either way?) -> a client's packet:
//! DNAT to its backend; a backend's reply: passed on, to be reverse-translated where it
//! leaves (`reply.rs`, tc egress), after the node's stack has routed and tracked it as
//! it was sent; otherwise frontend? -> source ranges -> select backend -> conntrack
//! create -> DNAT. The flows the node's stack cannot carry (SNAT toward another node,
//! hairpin) are translated here both ways and sent on by the program itself.
use lb_common::{
    counter, Addr, CtValue, Frontend, BACKEND_F_REMOTE, CT_DIR_REPLY, CT_F_HAIRPIN, CT_F_SNAT,
    FRAG_REWRITE_DST, FRONTEND_F_KINDS, FRONTEND_F_LOCAL, FRONTEND_F_SOURCE_RANGES, PROTO_TCP,
    TRACE_F_HAIRPIN, TRACE_F_KNOWN, TRACE_F_SNAT, TRACE_HOOK_TC, TRACE_HOOK_XDP,
};

use crate::{
    conntrack::{self, SnatTo},
    counters::count,
    frag,
    hook::{Hook, Leaving, Verdict},
    icmp,
    log::debug_log,
    nat,
    parse::{self, Packet, Parsed, TCP_SYN},
    refuse, service,
    trace::{self, Decision},
};

/// The hook `C` is, for `lb trace`.
#[inline(always)]
const fn trace_hook<C: Hook>() -> u8 {
    if C::CREATES_CARRIED {
        TRACE_HOOK_TC
    } else {
        TRACE_HOOK_XDP
    }
}

#[inline(always)]
pub fn process<C: Hook>(ctx: &C) -> Verdict {
    let pkt = match parse::parse(ctx) {
        Parsed::Packet(pkt) => pkt,
        // (Parsed the same way at egress, where these pass too.)
        Parsed::Other => {
            count(counter::PASSED);
            return Verdict::PassUntracked;
        }
        Parsed::Malformed => {
            count(counter::PASSED_MALFORMED);
            debug_log!(ctx, "reason=passed_malformed");
            return Verdict::PassUntracked;
        }
        Parsed::LongExtChain => {
            count(counter::PASSED_LONG_EXT_CHAIN);
            return Verdict::PassUntracked;
        }
        // A later fragment of a datagram to a frontend gets the backend its first
        // fragment got (a reply's is translated where it leaves, `reply.rs`).
        Parsed::LaterFragment(f) => {
            return frag::later(ctx, &f, conntrack::now_ns(), FRAG_REWRITE_DST);
        }
        // An error about a backend's reply after reverse NAT, going to the backend.
        Parsed::IcmpError(e) => {
            return icmp::to_backend(ctx, &e).unwrap_or_else(|| {
                count(counter::PASSED);
                Verdict::Pass
            })
        }
    };

    // 1. A packet of a flow we translate? One lookup finds a client's packet (forward
    //    entry) or a backend's reply (reply entry).
    if let Some(entry) = conntrack::lookup(&conntrack::key(&pkt)) {
        // SAFETY: pointer from a successful lookup; copied.
        let known = unsafe { *entry };
        let now = conntrack::now_ns();
        let reply = known.dir == CT_DIR_REPLY;
        if reply && known.flags & CT_F_SNAT == 0 {
            // The node's stack carries it untranslated, as it saw the client's packets
            // (after DNAT); tc egress gives it the frontend back where it leaves.
            count(counter::PASSED_REPLY);
            return Verdict::Pass;
        }
        if !reply && pkt.first_fragment && known.flags & CT_F_SNAT != 0 {
            count(counter::DROP_FRAGMENT);
            if trace::on() {
                trace::remember(&pkt, now);
                let mut d = Decision::new();
                d.set(
                    counter::DROP_FRAGMENT,
                    known.backend_id,
                    TRACE_F_SNAT | TRACE_F_KNOWN,
                );
                trace::emit(&pkt, now, known.service_id, &d, trace_hook::<C>());
            }
            return Verdict::Drop;
        }
        // (One call site each: every inlined copy is verified again.)
        let known_flow = if known.flags & CT_F_SNAT != 0 {
            ctx.carry(&pkt, entry, &known, now)
        } else {
            established(ctx, &pkt, entry, &known, now)
        };
        if let Some(v) = known_flow {
            return v;
        }
        // Otherwise a new connection on a reused port, or a deleted backend: the flow
        // starts over with a fresh choice below.
    }

    // 2. A new flow to a Service frontend?
    if let Some(frontend) = service::lookup_frontend(&pkt) {
        if pkt.proto == PROTO_TCP && pkt.tcp_flags & TCP_SYN == 0 {
            // A flow under way whose entries are gone (evicted, or expired while idle):
            // the same choice as at its start gives it the same backend while the set
            // is unchanged.
            count(counter::CT_RECREATED);
        }
        let now = conntrack::now_ns();
        if trace::on() {
            trace::remember(&pkt, now);
        }
        // The addresses here, not with the decision: kept live to the end of the path,
        // they multiply the states the verifier explores (see `trace::remember`).
        debug_log!(
            ctx,
            "new flow {:i}:{} -> {:i}:{} proto {}",
            crate::log::bytes(&pkt.src),
            u16::from_be(pkt.sport),
            crate::log::bytes(&pkt.dst),
            u16::from_be(pkt.dport),
            pkt.proto
        );
        let mut d = Decision::new();
        let v = new_flow(ctx, &pkt, &frontend, now, &mut d);
        // `lb trace`: one place for every decision about a new flow, where nothing is
        // left to do but return (one array lookup and one branch when nobody traces).
        if trace::on() {
            trace::emit(&pkt, now, frontend.service_id, &d, trace_hook::<C>());
        }
        // The reason is a counter's index; the agent prints its name.
        debug_log!(
            ctx,
            "reason={} service {} backend {} client port {}",
            d.reason,
            frontend.service_id,
            d.backend_id,
            u16::from_be(pkt.sport)
        );
        return v;
    }

    // 3. Nothing for us, nor for the reply path where it leaves: no entry has its
    //    5-tuple (a connect-time flow's packets, either way, end here).
    count(counter::PASSED);
    Verdict::PassUntracked
}

/// The XDP fast path's program (`lb_xdp_carry`, tail-called for a packet of a SNAT
/// flow): the packet parsed again, its entry found again, then `carried`. Anything that
/// is not such a packet, or a flow that must start over, goes to tc untouched.
#[inline(always)]
pub fn process_carried<C: Hook>(ctx: &C) -> Verdict {
    let Parsed::Packet(pkt) = parse::parse(ctx) else {
        count(counter::PASSED_TO_TC);
        return Verdict::Pass;
    };
    if let Some(entry) = conntrack::lookup(&conntrack::key(&pkt)) {
        // SAFETY: pointer from a successful lookup; copied.
        let known = unsafe { *entry };
        let reply = known.dir == CT_DIR_REPLY;
        if known.flags & CT_F_SNAT != 0 && (reply || !pkt.first_fragment) {
            if let Some(v) = carried(ctx, &pkt, entry, &known, conntrack::now_ns()) {
                return v;
            }
        }
    }
    count(counter::PASSED_TO_TC);
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
/// remember it. `d` gets the decision (`lb trace`), set where it returns.
#[inline(always)]
fn new_flow<C: Hook>(
    ctx: &C,
    pkt: &Packet,
    frontend: &Frontend,
    now: u64,
    d: &mut Decision,
) -> Verdict {
    // loadBalancerSourceRanges: only the listed sources reach a LoadBalancer IP (new
    // flows only, as kube-proxy's firewall chain matches connections in state NEW).
    if frontend.flags & FRONTEND_F_SOURCE_RANGES != 0 && !service::source_allowed(pkt, frontend) {
        count(counter::DROP_SOURCE_RANGE);
        d.set(counter::DROP_SOURCE_RANGE, 0, 0);
        return Verdict::Drop;
    }
    let Some((backend_id, backend)) = service::select_backend(pkt, frontend, now) else {
        // externalTrafficPolicy Local without a local endpoint: dropped, as kube-proxy
        // does (the client retries; a load balancer's health check sends it elsewhere).
        if frontend.flags & FRONTEND_F_LOCAL != 0 {
            count(counter::DROP_NO_BACKEND);
            d.set(counter::DROP_NO_BACKEND, 0, 0);
            return Verdict::Drop;
        }
        // The counter the hook's refusal will increment (tc: refused, or dropped when it
        // is not answered; XDP: left to the kernel), set before it rewrites the packet:
        // a value computed after it would be kept through every way of building the
        // answer.
        let reason = if !C::CREATES_CARRIED {
            counter::PASSED_NO_BACKEND
        } else if refuse::answered(pkt) {
            counter::REFUSED_NO_BACKEND
        } else {
            counter::DROP_NO_BACKEND
        };
        d.set(reason, 0, 0);
        return ctx.refuse(pkt);
    };
    // A pod reaching itself through a Service (hairpin): the kernel would drop a packet
    // arriving with the pod's own address as its source, so the source becomes the
    // frontend's, and the program sends both directions back to the pod.
    let to = if backend.addr == pkt.src {
        SnatTo::Frontend
    } else if frontend.flags & FRONTEND_F_KINDS != 0 && backend.flags & BACKEND_F_REMOTE != 0 {
        // From outside to another node's backend: its source becomes this node's, so
        // the reply comes back here (externalTrafficPolicy Cluster; with Local, and for a
        // ClusterIP, userspace lists no backend of another node here, or the client's
        // address routes back by itself).
        SnatTo::Node
    } else {
        if conntrack::create(pkt, frontend, backend_id, &backend.addr, backend.port, now).is_err() {
            count(counter::DROP_CT_FULL);
            d.set(counter::DROP_CT_FULL, backend_id, 0);
            return Verdict::Drop;
        }
        // Set before the rewrite (a value computed after it would be kept through every
        // way of rewriting; a rewrite that fails, never seen, is counted
        // `drop_rewrite_failed` but reported as decided).
        d.set(counter::NEW_FLOW, backend_id, 0);
        return translate(ctx, pkt, &backend.addr, backend.port, counter::NEW_FLOW);
    };
    // The later fragments of a carried flow would need both addresses and a route.
    if pkt.first_fragment {
        count(counter::DROP_FRAGMENT);
        d.set(counter::DROP_FRAGMENT, backend_id, TRACE_F_SNAT);
        return Verdict::Drop;
    }
    if !C::CREATES_CARRIED {
        // (tc behind XDP makes the flow, and reports it.)
        count(counter::PASSED_TO_TC);
        return Verdict::Pass;
    }
    // Where a SNAT flow's packet goes, before anything is made or rewritten: to the
    // backend, from this node's address (the port is not known yet; the lookup does not
    // depend on it). A hairpin flow goes back to the pod, from the frontend's address.
    let hairpin = to == SnatTo::Frontend;
    let src = if hairpin {
        &pkt.dst
    } else {
        match conntrack::snat_source(pkt.family) {
            Some(a) => a,
            None => {
                count(counter::DROP_SNAT_EXHAUSTED);
                d.set(counter::DROP_SNAT_EXHAUSTED, backend_id, TRACE_F_SNAT);
                return Verdict::Drop;
            }
        }
    };
    let mut out = Leaving::packet(pkt, (src, pkt.sport), (&backend.addr, backend.port));
    let route = if hairpin {
        None
    } else {
        match ctx.route(&out) {
            Ok(r) => Some(r),
            Err(v) => {
                // (Only tc gets here: its route lookup drops what has no route.)
                d.set(counter::DROP_NO_ROUTE, backend_id, TRACE_F_SNAT);
                return v;
            }
        }
    };
    match conntrack::create_snat(pkt, frontend, backend_id, &backend, to, now) {
        Ok(src) => {
            if hairpin {
                count(counter::NEW_HAIRPIN);
            }
            // SAFETY: this CPU's scratch, filled by create_snat, valid while the program
            // runs.
            let src = unsafe { &*src };
            out.src = &src.addr;
            out.sport = src.port;
            let v = translate_sent(ctx, pkt, &out, route.as_ref(), counter::NEW_FLOW);
            // (A drop here is a failed rewrite, or a failed send, counted as which:
            // reported as the first.)
            match v {
                Verdict::Drop => d.set(counter::DROP_REWRITE_FAILED, backend_id, TRACE_F_SNAT),
                _ if hairpin => d.set(
                    counter::NEW_HAIRPIN,
                    backend_id,
                    TRACE_F_SNAT | TRACE_F_HAIRPIN,
                ),
                _ => d.set(counter::NEW_FLOW, backend_id, TRACE_F_SNAT),
            }
            v
        }
        Err(c) => {
            count(c);
            d.set(c, backend_id, TRACE_F_SNAT);
            Verdict::Drop
        }
    }
}

#[inline(always)]
fn translate<C: Hook>(ctx: &C, pkt: &Packet, addr: &Addr, port: u16, counter_ok: u32) -> Verdict {
    match nat::dnat(ctx, pkt, addr, port) {
        Ok(()) => {
            if pkt.first_fragment {
                frag::note_forward(pkt, addr, conntrack::now_ns());
            }
            count(counter_ok);
            Verdict::Pass
        }
        Err(()) => {
            count(counter::DROP_REWRITE_FAILED);
            Verdict::Drop
        }
    }
}

/// A known packet of a flow the program carries itself (SNAT, hairpin), either way: a
/// client's packet gets its backend as destination and its `LB_SNAT` peer as source; a
/// backend's reply the frontend as source and its peer, the client, as destination.
/// Then it is sent on by the hook (XDP carries SNAT flows whose next hop it knows, and
/// leaves the rest to tc). None: a client's flow starts over (a new connection on a
/// reused port, a deleted backend, its peer evicted). (A reply entry the LRU evicted is
/// not re-created, as for other flows: the reply then passes untranslated. Later
/// fragments of a reply would need their destination rewritten too, which the
/// fragment notes do not do yet: they pass untouched, and the datagram is lost.)
#[inline(always)]
pub fn carried<C: Hook>(
    ctx: &C,
    pkt: &Packet,
    entry: *mut CtValue,
    known: &CtValue,
    now: u64,
) -> Option<Verdict> {
    let reply = known.dir == CT_DIR_REPLY;
    if known.flags & CT_F_HAIRPIN != 0 && !C::CREATES_CARRIED {
        count(counter::PASSED_TO_TC);
        return Some(Verdict::Pass);
    }
    if !reply && (conntrack::is_new_connection_attempt(pkt, known) || !keeps_backend(known)) {
        return None;
    }
    let Some(peer) = conntrack::snat_peer(&conntrack::key(pkt)) else {
        if reply {
            count(counter::PASSED);
            return Some(Verdict::Pass);
        }
        return None;
    };
    let out = if reply {
        Leaving::packet(
            pkt,
            (&known.nat_addr, known.nat_port),
            (&peer.addr, peer.port),
        )
    } else {
        Leaving::packet(
            pkt,
            (&peer.addr, peer.port),
            (&known.nat_addr, known.nat_port),
        )
    };
    let route = match carried_route(ctx, known.flags, &out) {
        Ok(r) => r,
        Err(v) => return Some(v),
    };
    conntrack::touch(entry, pkt, now);
    let done = if reply {
        counter::REVERSE_TRANSLATED
    } else {
        counter::TRANSLATED
    };
    Some(translate_sent(ctx, pkt, &out, route.as_ref(), done))
}

/// The route of a carried flow's packet: a SNAT flow's from the FIB (or what to do if
/// the hook has none), none for a hairpin flow (back out of the pod's veth).
#[inline(always)]
fn carried_route<C: Hook>(
    ctx: &C,
    flags: u8,
    out: &Leaving<'_>,
) -> Result<Option<C::Route>, Verdict> {
    if flags & CT_F_HAIRPIN != 0 {
        return Ok(None);
    }
    ctx.route(out).map(Some)
}

/// A packet of a SNAT or hairpin flow, either way: its destination and source rewritten
/// to `out`'s, then sent on along `route` (none: a hairpin flow, back to the pod).
#[inline(always)]
fn translate_sent<C: Hook>(
    ctx: &C,
    pkt: &Packet,
    out: &Leaving<'_>,
    route: Option<&C::Route>,
    counter_ok: u32,
) -> Verdict {
    if nat::dnat(ctx, pkt, out.dst, out.dport).is_err()
        || nat::snat(ctx, pkt, out.src, out.sport).is_err()
    {
        count(counter::DROP_REWRITE_FAILED);
        return Verdict::Drop;
    }
    count(counter_ok);
    match route {
        Some(r) => ctx.send(out, r),
        None => ctx.send_back(),
    }
}
