//! Program entry points only. Each hands its context to its hook (`tc`, `xdp`), which
//! runs `lb::process`, the algorithm read top to bottom, the same for IPv4 and IPv6; the
//! steps live in their own files: `parse` (headers, per family) -> `conntrack` (a known
//! flow?) -> `service` (frontend lookup, backend selection) -> `nat` (rewrite, with
//! `csum`), and `refuse` (RST / ICMP / ICMPv6 for a Service without backends), `route`
//! (replies of external flows) and `frag` (the fragments after the first of a translated
//! reply). Only `parse`, `nat`, `refuse` and `route` look at the address family.
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
mod lb;
mod maps;
mod nat;
mod parse;
mod refuse;
mod route;
mod service;
mod tc;
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
/// arriving from outside, and replies of backends on other nodes to this node's pods.
#[xdp]
pub fn lb_xdp_ext(ctx: XdpContext) -> u32 {
    xdp::process(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    // SAFETY: eBPF programs cannot panic; the verifier rejects any path that could get here.
    unsafe { core::hint::unreachable_unchecked() }
}
