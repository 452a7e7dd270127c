//! Sending on a translated packet ourselves, for the flows the node's stack cannot
//! carry. A SNAT flow's packets (toward another node's backend, and its replies) get
//! this node's own address, or a frontend's, as their source; the kernel's input route
//! check would drop either as a martian (a packet arriving with a local source). So the
//! program looks the route up (`bpf_fib_lookup`) before it rewrites anything, decrements
//! the TTL (IPv4, with the header checksum) or the hop limit (IPv6, which has no header
//! checksum) as forwarding would, and sends the packet on itself, as Cilium does:
//! - tc: to the egress device, which resolves the next hop's MAC
//!   (`bpf_redirect_neigh`);
//! - XDP (the fast path): with the MACs the lookup found, back out of the interface it
//!   came in by (`XDP_TX`). A next hop without a neighbour entry yet, or one out of
//!   another interface, is left to tc, untouched (`passed_to_tc`).
//!
//! A hairpin flow's packets go back out of the pod's veth they came by (`back`), MACs
//! swapped (tc only).
//!
//! Rules: no route (or a route whose MTU the packet exceeds), or a TTL / hop limit that
//! would reach 0: tc drops the packet untouched, counted `drop_no_route` (the kernel
//! would drop it too: its source is a local address); XDP leaves it to tc. A failed
//! rewrite: dropped and counted.
use core::mem::size_of;

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, xdp_action, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_REDIRECT,
    },
    helpers::{bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::{TcContext, XdpContext},
};
use lb_common::counter;

use crate::{
    counters::count,
    csum,
    hook::{Leaving, Verdict, XdpRoute},
    maps::LB_FIB_SCRATCH,
    parse::{ptr_at, Family, IP_CSUM_OFF},
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
/// Offset of the TTL / protocol word in the IPv4 header.
const IP_TTL_OFF: usize = 8;
/// Offset of the hop limit in the IPv6 header.
const IPV6_HOP_LIMIT_OFF: usize = 7;

/// The lookup's parameters for `out`, arriving by `ifindex`, in this CPU's scratch
/// (`LB_FIB_SCRATCH`: 64 bytes the tc program's stack has no room for). With
/// `check_mtu`, the lookup checks the packet's length against the route's MTU.
#[inline(always)]
fn fib_params(out: &Leaving<'_>, ifindex: u32, check_mtu: bool) -> Option<&'static mut FibParams> {
    let fib = LB_FIB_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's scratch, used only while the program runs; all-zero is the
    // parameter block's documented initial state.
    let fib = unsafe {
        core::ptr::write_bytes(fib, 0, 1);
        &mut *fib
    };
    fib.l4_protocol = out.pkt.proto;
    fib.sport = out.sport;
    fib.dport = out.dport;
    fib.ifindex = ifindex;
    if check_mtu {
        fib.__bindgen_anon_1.tot_len = if out.pkt.l3_len > 0xffff {
            0xffff
        } else {
            out.pkt.l3_len as u16
        };
    }
    match out.pkt.family {
        Family::V4 => {
            fib.family = AF_INET;
            fib.__bindgen_anon_3.ipv4_src = out.src[3];
            fib.__bindgen_anon_4.ipv4_dst = out.dst[3];
        }
        Family::V6 => {
            fib.family = AF_INET6;
            fib.__bindgen_anon_3.ipv6_src = *out.src;
            fib.__bindgen_anon_4.ipv6_dst = *out.dst;
        }
    }
    Some(fib)
}

/// The TTL or hop limit the packet has now (at `l3_off`), if it can be forwarded once
/// more (> 1).
#[inline(always)]
fn hop_left<C: crate::parse::PacketData>(ctx: &C, out: &Leaving<'_>) -> bool {
    let off = match out.pkt.family {
        Family::V4 => out.pkt.l3_off + IP_TTL_OFF,
        Family::V6 => out.pkt.l3_off + IPV6_HOP_LIMIT_OFF,
    };
    // SAFETY: bounds-checked by ptr_at.
    ptr_at::<u8, C>(ctx, off).is_some_and(|p| unsafe { p.read() } > 1)
}

/// tc: the egress device of `out`, arriving by the skb's own device. SUCCESS or
/// NO_NEIGH (`bpf_redirect_neigh` resolves the neighbour).
#[inline(always)]
pub fn tc_route(ctx: &TcContext, out: &Leaving<'_>) -> Result<u32, Verdict> {
    // The device the packet came in by (on tc ingress, the skb's own device), and
    // whether the skb is GSO.
    // SAFETY: reading fields of the program's skb.
    let (ifindex, gso_size) = unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).gso_size) };
    // Not for a GSO skb (a pod's TSO send, up to 64 KiB, cut to the MTU on the way
    // out): the kernel checks its segments itself, where the header's length would fail
    // every large packet.
    let Some(fib) = fib_params(out, ifindex, gso_size == 0) else {
        count(counter::DROP_NO_ROUTE);
        return Err(Verdict::Drop);
    };
    // SAFETY: ctx is the program's skb; fib is a valid, sized parameter block.
    let rc =
        unsafe { bpf_fib_lookup(ctx.skb.skb as *mut _, fib, size_of::<FibParams>() as i32, 0) };
    if (rc != BPF_FIB_LKUP_RET_SUCCESS as i64 && rc != BPF_FIB_LKUP_RET_NO_NEIGH as i64)
        || !hop_left(ctx, out)
    {
        count(counter::DROP_NO_ROUTE);
        return Err(Verdict::Drop);
    }
    Ok(fib.ifindex)
}

/// tc: the TTL or hop limit one less, then to the route's device, whose neighbour
/// table gives the MACs.
#[inline(always)]
pub fn tc_send(ctx: &TcContext, out: &Leaving<'_>, ifindex: u32) -> Verdict {
    if tc_decrement_hop(ctx, out).is_err() {
        count(counter::DROP_REWRITE_FAILED);
        return Verdict::Drop;
    }
    // SAFETY: no neighbour parameters: the helper resolves the next hop itself.
    let ret = unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) } as i32;
    if ret == TC_ACT_REDIRECT {
        Verdict::Redirect(ret)
    } else {
        count(counter::DROP_NO_ROUTE);
        Verdict::Drop
    }
}

/// tc: IPv4 TTL - 1 with the header checksum, or IPv6 hop limit - 1 (no header
/// checksum; the L4 checksum does not cover it). `route` checked it is > 1.
#[inline(always)]
fn tc_decrement_hop(ctx: &TcContext, out: &Leaving<'_>) -> Result<(), ()> {
    let l3_off = out.pkt.l3_off;
    match out.pkt.family {
        Family::V4 => {
            let word = ptr_at::<[u8; 2], _>(ctx, l3_off + IP_TTL_OFF).ok_or(())?;
            // SAFETY: bounds-checked by ptr_at.
            let old = unsafe { word.read_unaligned() };
            let new = [old[0].wrapping_sub(1), old[1]];
            let (old16, new16) = (u16::from_ne_bytes(old), u16::from_ne_bytes(new));
            ctx.l3_csum_replace(l3_off + IP_CSUM_OFF, old16 as u64, new16 as u64, 2)
                .map_err(|_| ())?;
            ctx.store(l3_off + IP_TTL_OFF, &new16, 0).map_err(|_| ())
        }
        Family::V6 => {
            let hop = ptr_at::<u8, _>(ctx, l3_off + IPV6_HOP_LIMIT_OFF).ok_or(())?;
            // SAFETY: bounds-checked by ptr_at.
            let old = unsafe { hop.read() };
            ctx.store(l3_off + IPV6_HOP_LIMIT_OFF, &old.wrapping_sub(1), 0)
                .map_err(|_| ())
        }
    }
}

/// The interface an XDP frame arrived by.
#[inline(always)]
fn ingress_ifindex(ctx: &XdpContext) -> u32 {
    // SAFETY: reading a field of the program's own context.
    unsafe { (*ctx.ctx).ingress_ifindex }
}

/// XDP: the MACs of `out`'s next hop, if it leaves by the interface it came in by and
/// the neighbour is known (SUCCESS); anything else goes to tc untouched. Out of another
/// interface, XDP would have to redirect, which needs the target to take XDP frames (a
/// veth, such as a pod's, only does with an XDP program on its peer; a NIC with the XDP
/// resources its driver sets up for a program of its own): tc's redirect has no such
/// condition.
#[inline(always)]
pub fn xdp_route(ctx: &XdpContext, out: &Leaving<'_>) -> Result<XdpRoute, Verdict> {
    let Some(fib) = fib_params(out, ingress_ifindex(ctx), true) else {
        count(counter::PASSED_TO_TC);
        return Err(Verdict::Pass);
    };
    // SAFETY: ctx is the program's context; fib is a valid, sized parameter block.
    let rc = unsafe { bpf_fib_lookup(ctx.ctx as *mut _, fib, size_of::<FibParams>() as i32, 0) };
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64
        || fib.ifindex != ingress_ifindex(ctx)
        || !hop_left(ctx, out)
    {
        count(counter::PASSED_TO_TC);
        return Err(Verdict::Pass);
    }
    Ok(XdpRoute {
        smac: fib.smac,
        dmac: fib.dmac,
    })
}

/// XDP: the TTL or hop limit one less, the route's MACs, then back out of the same
/// interface (`XDP_TX`).
#[inline(always)]
pub fn xdp_send(ctx: &XdpContext, out: &Leaving<'_>, route: &XdpRoute) -> Verdict {
    if xdp_decrement_hop(ctx, out).is_err() {
        count(counter::DROP_REWRITE_FAILED);
        return Verdict::Drop;
    }
    let Some(eth) = ptr_at::<[u8; 12], _>(ctx, 0) else {
        count(counter::DROP_REWRITE_FAILED);
        return Verdict::Drop;
    };
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&route.dmac);
    macs[6..].copy_from_slice(&route.smac);
    // SAFETY: bounds-checked by ptr_at.
    unsafe { (eth as *mut [u8; 12]).write(macs) };
    count(counter::XDP_SENT);
    Verdict::Redirect(xdp_action::XDP_TX as i32)
}

/// XDP: the TTL (with the IPv4 header checksum, RFC 1624) or hop limit one less, by
/// plain writes. `route` checked it is > 1.
#[inline(always)]
fn xdp_decrement_hop(ctx: &XdpContext, out: &Leaving<'_>) -> Result<(), ()> {
    let l3_off = out.pkt.l3_off;
    match out.pkt.family {
        Family::V4 => {
            let word = ptr_at::<u16, _>(ctx, l3_off + IP_TTL_OFF).ok_or(())? as *mut u16;
            let c = ptr_at::<u16, _>(ctx, l3_off + IP_CSUM_OFF).ok_or(())? as *mut u16;
            // SAFETY: both bounds-checked by ptr_at (16-bit loads at even offsets of the
            // IP header, as `parse::load`).
            unsafe {
                let old = word.read();
                let mut b = old.to_ne_bytes();
                b[0] = b[0].wrapping_sub(1);
                let new = u16::from_ne_bytes(b);
                c.write(csum::replace2(c.read(), old, new));
                word.write(new);
            }
            Ok(())
        }
        Family::V6 => {
            let hop = ptr_at::<u8, _>(ctx, l3_off + IPV6_HOP_LIMIT_OFF).ok_or(())? as *mut u8;
            // SAFETY: bounds-checked by ptr_at.
            unsafe { hop.write(hop.read().wrapping_sub(1)) };
            Ok(())
        }
    }
}

/// Sends the packet back out of the interface it came in by (on tc ingress, the skb's own
/// device: to the pod that sent it), the Ethernet source and destination swapped (the
/// pod sent it to the node's MAC). Returns the redirect's code.
#[inline(always)]
pub fn back(ctx: &TcContext) -> Result<i32, ()> {
    swap_macs(ctx)?;
    // SAFETY: reading a field of the program's skb.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: plain helper call with the skb's own interface.
    let ret = unsafe { bpf_redirect(ifindex, 0) } as i32;
    if ret == TC_ACT_REDIRECT {
        Ok(ret)
    } else {
        Err(())
    }
}

#[inline(always)]
fn swap_macs(ctx: &TcContext) -> Result<(), ()> {
    let macs: [u8; 12] = ctx.load(0).map_err(|_| ())?;
    let mut swapped = [0u8; 12];
    swapped[..6].copy_from_slice(&macs[6..]);
    swapped[6..].copy_from_slice(&macs[..6]);
    ctx.store(0, &swapped, 0).map_err(|_| ())
}
