//! Routing a reply ourselves. A reply of a flow that came from outside (a NodePort) gets
//! this node's own address as its source when reverse-translated at the pod's veth; the
//! kernel's input route check would drop it there as a martian (a packet from outside
//! claiming a local source). So the program looks the route up (`bpf_fib_lookup`),
//! decrements the TTL as forwarding would, and hands the packet to the egress device,
//! which resolves the next hop's MAC (`bpf_redirect_neigh`) — as Cilium does.
//!
//! The later fragments of such a reply get the same treatment (`frag.rs`): they carry
//! the node's address too.
//!
//! Rules: no route, or a TTL that would reach 0: the packet goes to the kernel as it is
//! (which drops it, as it would have before); a failed rewrite: dropped and counted.
use core::mem::size_of;

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        TC_ACT_REDIRECT,
    },
    helpers::{bpf_fib_lookup, bpf_redirect_neigh},
    programs::TcContext,
};
use lb_common::counter;

use crate::{
    counters::count,
    hook::Verdict,
    parse::{ptr_at, Fragment, Packet, IP_CSUM_OFF},
};

const AF_INET: u8 = 2;
/// Offset of the TTL / protocol word in the IPv4 header.
const IP_TTL_OFF: usize = 8;

/// What the route lookup needs of a reply, as it will leave (addresses and ports in
/// network byte order). A fragment after the first has no ports: 0.
pub struct Leaving {
    /// Offset of the IPv4 header.
    pub l3_off: usize,
    pub tot_len: u16,
    pub proto: u8,
    pub src: u32,
    pub dst: u32,
    pub sport: u16,
    pub dport: u16,
}

impl Leaving {
    /// A reverse-translated packet: its new source address and port.
    #[inline(always)]
    pub fn packet(pkt: &Packet, src: u32, sport: u16) -> Self {
        Leaving {
            l3_off: pkt.l3_off,
            tot_len: pkt.tot_len,
            proto: pkt.proto,
            src,
            dst: pkt.dst,
            sport,
            dport: pkt.dport,
        }
    }

    /// A reverse-translated fragment after the first: its new source address.
    #[inline(always)]
    pub fn fragment(frag: &Fragment, src: u32) -> Self {
        Leaving {
            l3_off: frag.l3_off,
            tot_len: frag.tot_len,
            proto: frag.proto,
            src,
            dst: frag.dst,
            sport: 0,
            dport: 0,
        }
    }
}

#[inline(always)]
pub fn redirect(ctx: &TcContext, out: &Leaving) -> Verdict {
    // SAFETY: a plain C struct; all-zero is its documented initial state.
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    fib.family = AF_INET;
    fib.l4_protocol = out.proto;
    fib.sport = out.sport;
    fib.dport = out.dport;
    fib.__bindgen_anon_1.tot_len = out.tot_len;
    // The device the packet came in by (on tc ingress, the skb's own device).
    // SAFETY: reading a field of the program's skb.
    fib.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    fib.__bindgen_anon_3.ipv4_src = out.src;
    fib.__bindgen_anon_4.ipv4_dst = out.dst;
    // SAFETY: ctx is the program's skb; fib is a valid, sized parameter block.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.skb.skb as *mut _,
            &mut fib,
            size_of::<FibParams>() as i32,
            0,
        )
    };
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 && rc != BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        return Verdict::Pass;
    }
    let Some(word) = ptr_at::<[u8; 2], _>(ctx, out.l3_off + IP_TTL_OFF) else {
        return Verdict::Pass;
    };
    // SAFETY: bounds-checked by ptr_at.
    let old = unsafe { word.read_unaligned() };
    if old[0] <= 1 {
        return Verdict::Pass;
    }
    let new = [old[0] - 1, old[1]];
    let (old16, new16) = (u16::from_ne_bytes(old), u16::from_ne_bytes(new));
    if ctx
        .l3_csum_replace(out.l3_off + IP_CSUM_OFF, old16 as u64, new16 as u64, 2)
        .is_err()
        || ctx.store(out.l3_off + IP_TTL_OFF, &new16, 0).is_err()
    {
        count(counter::DROP_REWRITE_FAILED);
        return Verdict::Drop;
    }
    // SAFETY: no neighbour parameters: the helper resolves the next hop itself.
    let ret = unsafe { bpf_redirect_neigh(fib.ifindex, core::ptr::null_mut(), 0, 0) } as i32;
    if ret == TC_ACT_REDIRECT as i32 {
        Verdict::Redirect(ret)
    } else {
        Verdict::Pass
    }
}
