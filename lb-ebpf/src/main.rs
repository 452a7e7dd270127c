//! Program entry points only. Each hands its context to its hook (`tc`, `xdp`), which
//! runs `lb::process` (ingress: the service path, read top to bottom) or
//! `reply::process` (tc egress: its mirror for replies), the same for IPv4 and IPv6; the
//! steps live in their own files: `parse` (headers, per family) -> `conntrack` (a known
//! flow?) -> `service` (frontend lookup, source ranges, backend selection) -> `nat`
//! (rewrite, with `csum`), and `refuse` (RST / ICMP / ICMPv6 for a Service without
//! backends), `route` (sending on the flows the program carries itself: SNAT and
//! hairpin) and `frag` (the fragments after the first of a translated reply). Only
//! `parse`, `nat`, `refuse` and `route` look at the address family.
#![no_std]
#![no_main]
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys and values go by reference (STYLE.md): by value they are copied onto the 512-byte stack"
)]

mod conntrack;
mod counters;
mod csum;
mod frag;
mod hook;
mod icmp;
mod lb;
mod log;
mod maps;
mod nat;
mod parse;
mod refuse;
mod reply;
mod route;
mod service;
mod tc;
mod trace;
mod xdp;

use aya_ebpf::{
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

/// tc ingress of the host side of a pod's veth (and any node interface a pod's traffic
/// enters by): translates packets to Service frontends and reverse-translates replies.
#[classifier]
pub fn lb_tc_pod(ctx: TcContext) -> i32 {
    tc::process(&ctx)
}

/// XDP on the node's external interfaces: NodePorts, external and LoadBalancer IPs
/// arriving from outside.
#[xdp]
pub fn lb_xdp_ext(ctx: XdpContext) -> u32 {
    xdp::process(&ctx)
}

/// Tail-called by `lb_xdp_ext` for the packets of SNAT flows: translated and sent on from
/// XDP when their next hop is known (the fast path), else left to tc.
#[xdp]
pub fn lb_xdp_carry(ctx: XdpContext) -> u32 {
    xdp::carry(&ctx)
}

/// tc egress of the pods' veths and the external interfaces: replies of translated
/// flows get their frontend back as their source where they leave.
#[classifier]
pub fn lb_tc_egress(ctx: TcContext) -> i32 {
    tc::egress(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    // SAFETY: eBPF programs cannot panic; the verifier rejects any path that could get here.
    unsafe { core::hint::unreachable_unchecked() }
}
