//! Program entry points only. Each hands its context to its hook (`tc`, `xdp`), which
//! runs `lb::process`, the algorithm read top to bottom, the same for IPv4 and IPv6; the
//! steps live in their own files: `parse` (headers, per family) -> `conntrack` (a known
//! flow?) -> `service` (frontend lookup, backend selection) -> `nat` (rewrite, with
//! `csum`), and `refuse` (RST / ICMP / ICMPv6 for a Service without backends), `route`
//! (replies of external flows) and `frag` (the fragments after the first of a translated
//! reply); `xdp_snat` is the XDP fast path of SNAT flows, its own program (tail-called).
//! Only `parse`, `nat`, `refuse` and `route` look at the address family.
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
mod xdp_snat;

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

/// XDP, reached only by a tail call from `lb_xdp_ext`: the packets of SNAT flows
/// (from outside to another node's backend, and their replies), translated and sent on
/// at once when the next hop is resolved (`xdp_snat.rs`). A program of its own so that
/// its verification does not add to `lb_xdp_ext`'s.
#[xdp]
pub fn lb_xdp_snat(ctx: XdpContext) -> u32 {
    xdp_snat::process(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    // SAFETY: eBPF programs cannot panic; the verifier rejects any path that could get here.
    unsafe { core::hint::unreachable_unchecked() }
}
