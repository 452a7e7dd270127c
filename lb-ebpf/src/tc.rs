//! The tc hooks: `lb_tc_pod` (ingress of the pods' veths, and behind XDP on the external
//! interfaces) runs the service path (`lb.rs`), `lb_tc_egress` (egress of both) the
//! reply path (`reply.rs`). An skb, whose headers may need pulling into the linear
//! area, and which the kernel's csum helpers rewrite (they also handle
//! CHECKSUM_PARTIAL). A refusal is built here and sent back; SNAT flows are routed here,
//! hairpin flows sent back to their pod.
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use lb_common::{counter, CtValue};

use crate::{
    counters::count,
    hook::{Hook, Leaving, Verdict},
    lb,
    parse::{Packet, ETH_HLEN, IPV4_MIN_HLEN, TCP_MIN_HLEN},
    refuse, reply, route,
};

impl Hook for TcContext {
    #[inline(always)]
    fn refuse(&self, pkt: &Packet) -> Verdict {
        refuse::refuse(self, pkt)
    }

    const CREATES_CARRIED: bool = true;

    /// Its source is now this node's own address or a frontend's: routed here, by FIB
    /// lookup and redirect, since the kernel's input route check would drop it as martian.
    #[inline(always)]
    fn route(&self, out: &Leaving<'_>) -> Result<u32, Verdict> {
        route::tc_route(self, out)
    }

    #[inline(always)]
    fn send(&self, out: &Leaving<'_>, ifindex: &u32) -> Verdict {
        route::tc_send(self, out, *ifindex)
    }

    /// The egress device.
    type Route = u32;

    #[inline(always)]
    fn carry(
        &self,
        pkt: &Packet,
        entry: *mut CtValue,
        known: &CtValue,
        now: u64,
    ) -> Option<Verdict> {
        lb::carried(self, pkt, entry, known, now)
    }

    #[inline(always)]
    fn send_back(&self) -> Verdict {
        match route::back(self) {
            Ok(code) => Verdict::Redirect(code),
            Err(()) => {
                count(counter::DROP_REWRITE_FAILED);
                Verdict::Drop
            }
        }
    }
}

/// Makes sure the headers we parse are in the skb's linear area (packets from a socket
/// usually are; a GRO'd or fragmented skb may not be): the longest IPv4 header, or an
/// IPv6 header without extension headers, and TCP. (The IPv6 parser pulls further
/// itself when it walks extension headers, `PacketData::make_readable`.)
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
fn action(v: Verdict) -> i32 {
    match v {
        Verdict::Pass => TC_ACT_OK,
        Verdict::Drop => TC_ACT_SHOT,
        Verdict::Redirect(code) => code,
    }
}

/// Ingress: the service path.
#[inline(always)]
pub fn process(ctx: &TcContext) -> i32 {
    pull_headers(ctx);
    action(lb::process(ctx))
}

/// Egress: the reply path.
#[inline(always)]
pub fn egress(ctx: &TcContext) -> i32 {
    pull_headers(ctx);
    action(reply::process(ctx))
}
