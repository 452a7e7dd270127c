//! The service path, top to bottom (cilium's lb.h / katran's process_packet):
//! parse -> conntrack (a known flow, either way?) -> established: DNAT to its backend,
//! reply: reverse NAT; otherwise frontend? -> select backend -> conntrack create -> DNAT.
use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_OK, TC_ACT_SHOT},
    programs::{TcContext, XdpContext},
};
use lb_common::{counter, CtValue, Frontend, CT_DIR_REPLY, CT_F_EXTERNAL};

use crate::{
    conntrack,
    counters::count,
    nat::{self, Rewriter},
    parse::{self, Packet, PacketData, Parsed, ETH_HLEN, IPV4_MIN_HLEN, TCP_MIN_HLEN},
    refuse, route, service,
};

/// What the algorithm needs from the hook it runs on: packet bounds, a way to rewrite
/// fields with their checksums, and an answer for a frontend without a ready backend.
pub trait Hook: PacketData + Rewriter {
    fn refuse(&self, pkt: &Packet) -> Verdict;
    /// Sends on a reverse-translated reply of a flow that came from outside.
    fn send_external_reply(&self, pkt: &Packet, src: u32, sport: u16) -> Verdict;
}

impl Hook for TcContext {
    #[inline(always)]
    fn refuse(&self, pkt: &Packet) -> Verdict {
        refuse::refuse(self, pkt)
    }

    /// Its source may now be this node's own address (a NodePort): routed here, by FIB
    /// lookup and redirect, since the kernel's input route check would drop it as martian.
    #[inline(always)]
    fn send_external_reply(&self, pkt: &Packet, src: u32, sport: u16) -> Verdict {
        route::redirect(self, pkt, src, sport)
    }
}

impl Hook for XdpContext {
    /// The packet goes on to the kernel unchanged. A NodePort is a port of the node's own
    /// address where nothing listens, so the kernel answers with a TCP RST or an ICMP port
    /// unreachable: the same refusal tc builds by hand, without a copy of that code.
    #[inline(always)]
    fn refuse(&self, _pkt: &Packet) -> Verdict {
        count(counter::PASSED_NO_BACKEND);
        Verdict::Pass
    }

    /// Does not happen: external flows only go to this node's backends, whose replies
    /// leave through the pod program.
    #[inline(always)]
    fn send_external_reply(&self, _pkt: &Packet, _src: u32, _sport: u16) -> Verdict {
        Verdict::Pass
    }
}

/// What the program does with the packet; mapped to the hook's return codes at the edge.
pub enum Verdict {
    Pass,
    Drop,
    /// The program sent the packet on itself (tc only): a refusal back out of the
    /// interface it came in by, or a routed reply of an external flow.
    Redirect(i32),
}

#[inline(always)]
fn tc_code(v: Verdict) -> i32 {
    match v {
        Verdict::Pass => TC_ACT_OK,
        Verdict::Drop => TC_ACT_SHOT,
        Verdict::Redirect(code) => code,
    }
}

/// Makes sure the headers we parse are in the skb's linear area (packets from a socket
/// usually are; a GRO'd or fragmented skb may not be).
#[inline(always)]
fn pull_headers(ctx: &TcContext) {
    const WANT: u32 = (ETH_HLEN + 60 + TCP_MIN_HLEN) as u32;
    let len = ctx.len();
    let want = if len < WANT { len } else { WANT };
    let linear = (ctx.data_end() - ctx.data()) as u32;
    if linear < want && len >= (ETH_HLEN + IPV4_MIN_HLEN) as u32 {
        let _ = ctx.pull_data(want);
    }
}

#[inline(always)]
pub fn process_tc(ctx: &TcContext) -> i32 {
    pull_headers(ctx);
    tc_code(process(ctx))
}

/// XDP sees the frame before any skb exists: the headers are always in the linear
/// buffer (multi-buffer frames are not enabled for this program).
#[inline(always)]
pub fn process_xdp(ctx: &XdpContext) -> u32 {
    match process(ctx) {
        Verdict::Pass | Verdict::Redirect(_) => xdp_action::XDP_PASS,
        Verdict::Drop => xdp_action::XDP_DROP,
    }
}

#[inline(always)]
fn process<C: Hook>(ctx: &C) -> Verdict {
    let pkt = match parse::parse_ipv4(ctx) {
        Parsed::Packet(pkt) => pkt,
        Parsed::Other => {
            count(counter::PASSED);
            return Verdict::Pass;
        }
        Parsed::Malformed => {
            count(counter::PASSED_MALFORMED);
            return Verdict::Pass;
        }
        Parsed::LaterFragment => {
            count(counter::PASSED_FRAGMENT);
            return Verdict::Pass;
        }
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
                known.nat_addr,
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
    if conntrack::create(pkt, frontend, backend_id, backend.addr, backend.port, now).is_err() {
        count(counter::DROP_CT_FULL);
        return Verdict::Drop;
    }
    translate(ctx, pkt, backend.addr, backend.port, counter::NEW_FLOW)
}

#[inline(always)]
fn translate<C: Hook>(ctx: &C, pkt: &Packet, addr: u32, port: u16, counter_ok: u32) -> Verdict {
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

/// Backend -> client: restore the frontend's address and port as the source.
#[inline(always)]
fn from_backend<C: Hook>(
    ctx: &C,
    pkt: &Packet,
    entry: *mut CtValue,
    e: &CtValue,
    now: u64,
) -> Verdict {
    conntrack::touch(entry, pkt, now);
    match nat::reverse_nat(ctx, pkt, e.nat_addr, e.nat_port) {
        Ok(()) => {
            count(counter::REVERSE_TRANSLATED);
            if e.flags & CT_F_EXTERNAL != 0 {
                return ctx.send_external_reply(pkt, e.nat_addr, e.nat_port);
            }
            Verdict::Pass
        }
        Err(()) => {
            count(counter::DROP_REWRITE_FAILED);
            Verdict::Drop
        }
    }
}
