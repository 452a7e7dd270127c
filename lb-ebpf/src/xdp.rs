//! The XDP hook (`lb_xdp_ext`, the node's external interfaces): the frame before any skb
//! exists, always linear (multi-buffer frames are not enabled for this program), with
//! complete checksums, rewritten in place.
use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::counter;

use crate::{
    counters::count,
    hook::{Hook, Leaving, Verdict},
    lb,
    parse::Packet,
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

    const SENDS_SNAT: bool = false;

    /// Does not happen: SNAT flows are left to tc, and the replies of external flows to
    /// this node's backends leave by a pod's tc program.
    #[inline(always)]
    fn send_routed(&self, _out: &Leaving) -> Verdict {
        Verdict::Pass
    }
}

#[inline(always)]
pub fn process(ctx: &XdpContext) -> u32 {
    match lb::process(ctx) {
        Verdict::Pass | Verdict::Redirect(_) => xdp_action::XDP_PASS,
        Verdict::Drop => xdp_action::XDP_DROP,
    }
}
