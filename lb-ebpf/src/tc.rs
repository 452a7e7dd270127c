//! The tc hook (`lb_tc_pod`, ingress of the pods' veths): an skb, whose headers may need
//! pulling into the linear area, and which the kernel's csum helpers rewrite (they also
//! handle CHECKSUM_PARTIAL). A refusal is built here and sent back; a reply of an
//! external flow is routed here.
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};

use crate::{
    hook::{Hook, Leaving, Verdict},
    lb,
    parse::{Packet, ETH_HLEN, IPV4_MIN_HLEN, TCP_MIN_HLEN},
    refuse, route,
};

impl Hook for TcContext {
    #[inline(always)]
    fn refuse(&self, pkt: &Packet) -> Verdict {
        refuse::refuse(self, pkt)
    }

    const SENDS_SNAT: bool = true;

    /// Its source is now this node's own address or a frontend's: routed here, by FIB
    /// lookup and redirect, since the kernel's input route check would drop it as martian.
    #[inline(always)]
    fn send_routed(&self, out: &Leaving) -> Verdict {
        route::redirect(self, out)
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
pub fn process(ctx: &TcContext) -> i32 {
    pull_headers(ctx);
    match lb::process(ctx) {
        Verdict::Pass => TC_ACT_OK,
        Verdict::Drop => TC_ACT_SHOT,
        Verdict::Redirect(code) => code,
    }
}
