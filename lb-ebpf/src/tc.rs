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
    parse::{Packet, ETH_HLEN, IPV4_MIN_HLEN, IPV6_HLEN},
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

/// Makes sure the fixed IP header is in the skb's linear area (packets from a socket
/// usually have all their headers there; a GRO'd or fragmented skb may not): the
/// longer of the two, IPv6's, which holds IPv4's too. The parser pulls what it reads
/// further itself, no more (`PacketData::make_readable`): a pull of bytes the linear
/// area lacks copies the skb's head when it is cloned, as every TCP segment a local
/// socket sends is (its payload sits in page fragments behind 66 bytes of headers), and
/// pulling a fixed worst case did that to nearly every data segment.
#[inline(always)]
fn pull_headers(ctx: &TcContext) {
    const WANT: u32 = (ETH_HLEN + IPV6_HLEN) as u32;
    let len = ctx.len();
    let want = if len < WANT { len } else { WANT };
    let linear = (ctx.data_end() - ctx.data()) as u32;
    if linear < want && len >= (ETH_HLEN + IPV4_MIN_HLEN) as u32 {
        let _ = ctx.pull_data(want);
    }
}

/// The bit of `skb->tc_index` by which tc ingress tells tc egress that a packet needs
/// nothing there (`Verdict::PassUntracked`). The field is the skb's, kept from ingress
/// through the node's routing to the device it leaves by, and read by no qdisc or
/// classifier of current kernels (dsmark and tcindex, its users, left in 6.3). A tc
/// program does not write it itself: when it returns `TC_ACT_OK` the kernel sets
/// `tc_index` to the minor half of the classid the program left (`__sk_buff.tc_classid`),
/// so that is what both programs write. Ingress always writes it (a packet that arrives
/// with the bit set from elsewhere does not skip), egress clears it, so that it never
/// leaves the node's stack; a packet no ingress of ours saw (the node's own, one from an
/// interface without our program) has it clear and is looked up.
pub const UNTRACKED: u32 = 1 << 15;

#[inline(always)]
fn action(v: Verdict) -> i32 {
    match v {
        Verdict::Pass | Verdict::PassUntracked => TC_ACT_OK,
        Verdict::Drop => TC_ACT_SHOT,
        Verdict::Redirect(code) => code,
    }
}

/// The context pointer, loaded afresh for each access of a field: the verifier wants
/// every access at a constant offset from the context itself, and with one pointer the
/// compiler keeps the field's address in a register for both the read and the write.
#[inline(always)]
fn skb(ctx: &TcContext) -> *mut aya_ebpf::bindings::__sk_buff {
    // SAFETY: reading a pointer field of the program's own context struct.
    unsafe { core::ptr::read_volatile(&ctx.skb.skb) }
}

#[inline(always)]
fn tc_index(ctx: &TcContext) -> u32 {
    // SAFETY: a field of the program's own skb, readable by tc programs.
    unsafe { (*skb(ctx)).tc_index }
}

/// What `tc_index` becomes when the program returns `TC_ACT_OK` (its low 16 bits).
#[inline(always)]
fn set_tc_index(ctx: &TcContext, v: u32) {
    // SAFETY: as above; tc programs may write the classid.
    unsafe { (*skb(ctx)).tc_classid = v & 0xffff }
}

/// Ingress: the service path.
#[inline(always)]
pub fn process(ctx: &TcContext) -> i32 {
    pull_headers(ctx);
    let v = lb::process(ctx);
    let mark = tc_index(ctx);
    set_tc_index(
        ctx,
        if matches!(v, Verdict::PassUntracked) {
            mark | UNTRACKED
        } else {
            mark & !UNTRACKED
        },
    );
    action(v)
}

/// Egress: the reply path, unless ingress found the packet untracked.
#[inline(always)]
pub fn egress(ctx: &TcContext) -> i32 {
    let mark = tc_index(ctx);
    if mark & UNTRACKED != 0 {
        set_tc_index(ctx, mark & !UNTRACKED);
        return TC_ACT_OK;
    }
    pull_headers(ctx);
    action(reply::process(ctx))
}
