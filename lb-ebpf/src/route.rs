//! Routing a translated packet ourselves. A reply of a flow that came from outside (a
//! NodePort) gets this node's own address as its source when reverse-translated, and
//! so does the client's packet of a SNAT flow (toward a backend on another node); the
//! kernel's input route check would drop either as a martian (a packet arriving with a
//! local source). So the program looks the route up (`bpf_fib_lookup`), decrements the
//! TTL (IPv4, with the header checksum) or the hop limit (IPv6, which has no header
//! checksum) as forwarding would, and sends the packet on itself — as Cilium does:
//! to the egress device, which resolves the next hop's MAC (`bpf_redirect_neigh`).
//! This is tc's: the XDP program leaves such packets, untranslated, to the tc program
//! behind it on the same interface (`passed_to_tc`).
//!
//! The later fragments of such a reply get the same treatment (`frag.rs`): they carry
//! the node's address too.
//!
//! Rules: no route, or a TTL / hop limit that would reach 0: the packet goes to the kernel as it is
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
    hook::{Leaving, Verdict},
    parse::{ptr_at, Family, IP_CSUM_OFF},
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
/// Offset of the TTL / protocol word in the IPv4 header.
const IP_TTL_OFF: usize = 8;
/// Offset of the hop limit in the IPv6 header.
const IPV6_HOP_LIMIT_OFF: usize = 7;

/// The lookup's parameters for `out`, arriving by `ifindex`. With `check_mtu`, the
/// lookup checks the packet's length against the route's MTU (too long: the kernel
/// gets it, as before).
#[inline(always)]
fn fib_params(out: &Leaving, ifindex: u32, check_mtu: bool) -> FibParams {
    // SAFETY: a plain C struct; all-zero is its documented initial state.
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    fib.l4_protocol = out.proto;
    fib.sport = out.sport;
    fib.dport = out.dport;
    fib.ifindex = ifindex;
    if check_mtu {
        fib.__bindgen_anon_1.tot_len = if out.l3_len > 0xffff {
            0xffff
        } else {
            out.l3_len as u16
        };
    }
    match out.family {
        Family::V4 => {
            fib.family = AF_INET;
            fib.__bindgen_anon_3.ipv4_src = out.src[3];
            fib.__bindgen_anon_4.ipv4_dst = out.dst[3];
        }
        Family::V6 => {
            fib.family = AF_INET6;
            fib.__bindgen_anon_3.ipv6_src = out.src;
            fib.__bindgen_anon_4.ipv6_dst = out.dst;
        }
    }
    fib
}

#[inline(always)]
pub fn redirect(ctx: &TcContext, out: &Leaving) -> Verdict {
    // The device the packet came in by (on tc ingress, the skb's own device), and
    // whether the skb is GSO.
    // SAFETY: reading fields of the program's skb.
    let (ifindex, gso_size) = unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).gso_size) };
    // Not for a GSO skb (a pod's TSO send, up to 64 KiB, cut to the MTU on the way
    // out): the kernel checks its segments itself, where the header's length would fail
    // every large reply.
    let mut fib = fib_params(out, ifindex, gso_size == 0);
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
    let hop = match out.family {
        Family::V4 => decrement_ttl(ctx, out.l3_off),
        Family::V6 => decrement_hop_limit(ctx, out.l3_off),
    };
    match hop {
        Hop::Done => {}
        Hop::Expired => return Verdict::Pass,
        Hop::Failed => {
            count(counter::DROP_REWRITE_FAILED);
            return Verdict::Drop;
        }
    }
    // SAFETY: no neighbour parameters: the helper resolves the next hop itself.
    let ret = unsafe { bpf_redirect_neigh(fib.ifindex, core::ptr::null_mut(), 0, 0) } as i32;
    if ret == TC_ACT_REDIRECT {
        Verdict::Redirect(ret)
    } else {
        Verdict::Pass
    }
}

enum Hop {
    Done,
    /// It would reach 0: the kernel drops it (and answers time exceeded).
    Expired,
    /// A helper failed.
    Failed,
}

/// IPv4: TTL - 1, with the header checksum.
#[inline(always)]
fn decrement_ttl(ctx: &TcContext, l3_off: usize) -> Hop {
    let Some(word) = ptr_at::<[u8; 2], _>(ctx, l3_off + IP_TTL_OFF) else {
        return Hop::Expired;
    };
    // SAFETY: bounds-checked by ptr_at.
    let old = unsafe { word.read_unaligned() };
    if old[0] <= 1 {
        return Hop::Expired;
    }
    let new = [old[0] - 1, old[1]];
    let (old16, new16) = (u16::from_ne_bytes(old), u16::from_ne_bytes(new));
    if ctx
        .l3_csum_replace(l3_off + IP_CSUM_OFF, old16 as u64, new16 as u64, 2)
        .is_err()
        || ctx.store(l3_off + IP_TTL_OFF, &new16, 0).is_err()
    {
        return Hop::Failed;
    }
    Hop::Done
}

/// IPv6: hop limit - 1 (no header checksum; the L4 checksum does not cover it).
#[inline(always)]
fn decrement_hop_limit(ctx: &TcContext, l3_off: usize) -> Hop {
    let Some(hop) = ptr_at::<u8, _>(ctx, l3_off + IPV6_HOP_LIMIT_OFF) else {
        return Hop::Expired;
    };
    // SAFETY: bounds-checked by ptr_at.
    let old = unsafe { hop.read() };
    if old <= 1 {
        return Hop::Expired;
    }
    if ctx
        .store(l3_off + IPV6_HOP_LIMIT_OFF, &(old - 1), 0)
        .is_err()
    {
        return Hop::Failed;
    }
    Hop::Done
}
