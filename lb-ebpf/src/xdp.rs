//! The XDP hook (`lb_xdp_ext`, the node's external interfaces): the frame before any skb
//! exists, always linear (multi-buffer frames are not enabled for this program), with
//! complete checksums, rewritten in place. The established packets of SNAT flows are
//! sent on from here when their next hop is known (`XDP_TX` / `XDP_REDIRECT`).
use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{counter, CtValue, XDP_PROG_CARRY};

use crate::{
    counters::count,
    hook::{Hook, Leaving, Verdict, XdpRoute},
    lb,
    maps::LB_XDP_PROGS,
    parse::Packet,
    route,
};

impl Hook for XdpContext {
    /// The packet goes on to the kernel unchanged. A NodePort is a port of the node's own
    /// address where nothing listens, so the kernel answers with a TCP RST or an ICMP port
    /// unreachable: the same refusal tc builds by hand, without a copy of that code.
    #[inline(always)]
    fn refuse(&self, _pkt: &Packet) -> Verdict {
        count(counter::PASSED_NO_BACKEND);
        Verdict::Pass
    }

    const CREATES_CARRIED: bool = false;

    /// The fast path of SNAT flows: sent on here when the FIB knows the next hop's MAC,
    /// else left to tc untouched.
    #[inline(always)]
    fn route(&self, out: &Leaving<'_>) -> Result<XdpRoute, Verdict> {
        route::xdp_route(self, out)
    }

    #[inline(always)]
    fn send(&self, out: &Leaving<'_>, r: &XdpRoute) -> Verdict {
        route::xdp_send(self, out, r)
    }

    type Route = XdpRoute;

    /// A tail call into `lb_xdp_carry` (`carry` below); if it fails (not loaded), tc
    /// gets the packet untouched.
    #[inline(always)]
    fn carry(
        &self,
        _pkt: &Packet,
        _entry: *mut CtValue,
        _known: &CtValue,
        _now: u64,
    ) -> Option<Verdict> {
        // SAFETY: a tail call with the program's own context; control returns only if
        // it fails.
        unsafe { LB_XDP_PROGS.tail_call(self, XDP_PROG_CARRY) };
        count(counter::PASSED_TO_TC);
        Some(Verdict::Pass)
    }

    /// Does not happen: hairpin flows are left to tc before anything is rewritten.
    #[inline(always)]
    fn send_back(&self) -> Verdict {
        Verdict::Pass
    }
}

#[inline(always)]
fn action(v: Verdict) -> u32 {
    match v {
        Verdict::Pass | Verdict::PassUntracked => xdp_action::XDP_PASS,
        Verdict::Drop => xdp_action::XDP_DROP,
        Verdict::Redirect(action) => action as u32,
    }
}

/// The XDP program: the service path.
#[inline(always)]
pub fn process(ctx: &XdpContext) -> u32 {
    action(lb::process(ctx))
}

/// `lb_xdp_carry`, tail-called by the XDP program for a packet of a SNAT flow: the
/// fast path (`lb::process_carried`).
#[inline(always)]
pub fn carry(ctx: &XdpContext) -> u32 {
    action(lb::process_carried(ctx))
}
