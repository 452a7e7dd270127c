//! Address translation: DNAT of a client's packet to the backend, and the mirror rewrite
//! of the backend's reply back to the frontend. The sequence of field changes lives here
//! once; how a field and its checksums are rewritten depends on the hook (`Rewriter`):
//! on tc the kernel's csum helpers (which also handle CHECKSUM_PARTIAL skbs), on XDP a
//! folded incremental update (RFC 1624).
use aya_ebpf::{bindings::BPF_F_PSEUDO_HDR, programs::TcContext};
use lb_common::PROTO_UDP;

use crate::parse::{Packet, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, L4_DPORT_OFF, L4_SPORT_OFF};

/// `BPF_F_MARK_MANGLED_0`: a UDP checksum of 0 ("none") stays 0, and a computed 0 is
/// written as 0xffff.
const BPF_F_MARK_MANGLED_0: u64 = 1 << 5;

pub trait Rewriter {
    /// Replace the 4-byte IPv4 address at `off` (old value `old`), fixing the IP header
    /// checksum and the L4 checksum (pseudo-header).
    fn rewrite_addr(&self, pkt: &Packet, off: usize, old: u32, new: u32) -> Result<(), ()>;
    /// Replace the 2-byte L4 port at `off`, fixing the L4 checksum.
    fn rewrite_port(&self, pkt: &Packet, off: usize, old: u16, new: u16) -> Result<(), ()>;
}

#[inline(always)]
fn l4_flags(pkt: &Packet) -> u64 {
    if pkt.proto == PROTO_UDP {
        BPF_F_MARK_MANGLED_0
    } else {
        0
    }
}

impl Rewriter for TcContext {
    #[inline(always)]
    fn rewrite_addr(&self, pkt: &Packet, off: usize, old: u32, new: u32) -> Result<(), ()> {
        let csum = pkt.l4_off + pkt.csum_off;
        self.l4_csum_replace(
            csum,
            old as u64,
            new as u64,
            BPF_F_PSEUDO_HDR as u64 | l4_flags(pkt) | 4,
        )
        .map_err(|_| ())?;
        self.l3_csum_replace(pkt.l3_off + IP_CSUM_OFF, old as u64, new as u64, 4)
            .map_err(|_| ())?;
        self.store(off, &new, 0).map_err(|_| ())
    }

    #[inline(always)]
    fn rewrite_port(&self, pkt: &Packet, off: usize, old: u16, new: u16) -> Result<(), ()> {
        let csum = pkt.l4_off + pkt.csum_off;
        self.l4_csum_replace(csum, old as u64, new as u64, l4_flags(pkt) | 2)
            .map_err(|_| ())?;
        self.store(off, &new, 0).map_err(|_| ())
    }
}

/// Client -> frontend becomes client -> backend.
#[inline(always)]
pub fn dnat<R: Rewriter>(ctx: &R, pkt: &Packet, addr: u32, port: u16) -> Result<(), ()> {
    if addr != pkt.dst {
        ctx.rewrite_addr(pkt, pkt.l3_off + IP_DST_OFF, pkt.dst, addr)?;
    }
    if port != pkt.dport {
        ctx.rewrite_port(pkt, pkt.l4_off + L4_DPORT_OFF, pkt.dport, port)?;
    }
    Ok(())
}

/// Backend -> client becomes frontend -> client.
#[inline(always)]
pub fn reverse_nat<R: Rewriter>(ctx: &R, pkt: &Packet, addr: u32, port: u16) -> Result<(), ()> {
    if addr != pkt.src {
        ctx.rewrite_addr(pkt, pkt.l3_off + IP_SRC_OFF, pkt.src, addr)?;
    }
    if port != pkt.sport {
        ctx.rewrite_port(pkt, pkt.l4_off + L4_SPORT_OFF, pkt.sport, port)?;
    }
    Ok(())
}
