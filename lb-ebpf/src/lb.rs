//! The service path, top to bottom (cilium's lb.h / katran's process_packet):
//! parse -> frontend? -> conntrack (known flow?) -> select backend -> conntrack create
//! -> DNAT; and the mirror for replies: reply conntrack entry? -> reverse NAT.
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use lb_common::{counter, Frontend};

use crate::{
    conntrack,
    counters::count,
    nat,
    parse::{self, Packet, Parsed, ETH_HLEN, IPV4_MIN_HLEN, TCP_MIN_HLEN},
    refuse, service,
};

/// What the program does with the packet; mapped to the hook's return codes at the edge.
pub enum Verdict {
    Pass,
    Drop,
    /// The packet was turned into a refusal and sent back out of the interface it came in.
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

#[inline(always)]
fn process(ctx: &TcContext) -> Verdict {
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

    // 1. To a Service frontend?
    if let Some(frontend) = service::lookup_frontend(&pkt) {
        if pkt.first_fragment {
            count(counter::DROP_FRAGMENT);
            return Verdict::Drop;
        }
        return to_frontend(ctx, &pkt, &frontend);
    }

    // 2. A reply from a backend of a translated flow?
    if let Some(entry) = conntrack::lookup(&conntrack::reply_key(&pkt)) {
        return from_backend(ctx, &pkt, entry);
    }

    // 3. Nothing for us.
    count(counter::PASSED);
    Verdict::Pass
}

/// Client -> frontend: reuse the flow's backend, or pick one and remember it.
#[inline(always)]
fn to_frontend(ctx: &TcContext, pkt: &Packet, frontend: &Frontend) -> Verdict {
    let now = conntrack::now_ns();
    let key = conntrack::forward_key(pkt);
    if let Some(entry) = conntrack::lookup(&key) {
        // SAFETY: pointer from a successful lookup; copied.
        let known = unsafe { *entry };
        if !conntrack::is_new_connection_attempt(pkt, &known) {
            match service::lookup_backend(known.backend_id) {
                Some(b) if b.addr == known.nat_addr && b.port == known.nat_port => {
                    if conntrack::touch(entry, pkt, now) {
                        conntrack::ensure_reply(pkt, &known, now);
                    }
                    return translate(
                        ctx,
                        pkt,
                        known.nat_addr,
                        known.nat_port,
                        counter::TRANSLATED,
                    );
                }
                // The backend was deleted (not merely made not-ready): pick a new one.
                _ => count(counter::BACKEND_RESELECTED),
            }
        }
    }

    let Some((backend_id, backend)) = service::select_backend(pkt, frontend) else {
        return refuse::refuse(ctx, pkt);
    };
    if conntrack::create(
        pkt,
        backend_id,
        frontend.service_id,
        backend.addr,
        backend.port,
        now,
    )
    .is_err()
    {
        count(counter::DROP_CT_FULL);
        return Verdict::Drop;
    }
    translate(ctx, pkt, backend.addr, backend.port, counter::NEW_FLOW)
}

#[inline(always)]
fn translate(ctx: &TcContext, pkt: &Packet, addr: u32, port: u16, counter_ok: u32) -> Verdict {
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
fn from_backend(ctx: &TcContext, pkt: &Packet, entry: *mut lb_common::CtValue) -> Verdict {
    let now = conntrack::now_ns();
    conntrack::touch(entry, pkt, now);
    // SAFETY: pointer from a successful lookup; copied.
    let e = unsafe { *entry };
    match nat::reverse_nat(ctx, pkt, e.nat_addr, e.nat_port) {
        Ok(()) => {
            count(counter::REVERSE_TRANSLATED);
            Verdict::Pass
        }
        Err(()) => {
            count(counter::DROP_REWRITE_FAILED);
            Verdict::Drop
        }
    }
}
