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
// `asm!` for the one atomic OR core does not offer here (`conntrack::mark`).
#![feature(asm_experimental_arch)]
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
mod sock;
mod tc;
mod trace;
mod xdp;

use aya_ebpf::{
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};
use sock::{Call, Fam};

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

/// Connect-time balancing (`sock.rs`), on the cgroup of `--cgroup`: a connect() to a
/// frontend goes to a backend.
#[cgroup_sock_addr(connect4)]
pub fn lb_sock_conn4(ctx: SockAddrContext) -> i32 {
    sock::forward(&ctx, Fam::V4, Call::Connect)
}

#[cgroup_sock_addr(connect6)]
pub fn lb_sock_conn6(ctx: SockAddrContext) -> i32 {
    sock::forward(&ctx, Fam::V6, Call::Connect)
}

/// An unconnected UDP datagram to a frontend goes to a backend.
#[cgroup_sock_addr(sendmsg4)]
pub fn lb_sock_send4(ctx: SockAddrContext) -> i32 {
    sock::forward(&ctx, Fam::V4, Call::Sendmsg)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn lb_sock_send6(ctx: SockAddrContext) -> i32 {
    sock::forward(&ctx, Fam::V6, Call::Sendmsg)
}

/// A UDP datagram from a backend reads as from the frontend the socket sent to.
#[cgroup_sock_addr(recvmsg4)]
pub fn lb_sock_recv4(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx, Fam::V4, lb_common::PROTO_UDP)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn lb_sock_recv6(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx, Fam::V6, lb_common::PROTO_UDP)
}

/// getpeername() of a socket connected to a backend names the frontend.
#[cgroup_sock_addr(getpeername4)]
pub fn lb_sock_peer4(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx, Fam::V4, 0)
}

#[cgroup_sock_addr(getpeername6)]
pub fn lb_sock_peer6(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx, Fam::V6, 0)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    // SAFETY: eBPF programs cannot panic; the verifier rejects any path that could get here.
    unsafe { core::hint::unreachable_unchecked() }
}
