//! Address translation: DNAT of a client's packet to the backend, and the mirror rewrite
//! of the backend's reply back to the frontend. The sequence of field changes lives here
//! once; how a field and its checksums are rewritten depends on the hook (`Rewriter`):
//! on tc the kernel's csum helpers (which also handle CHECKSUM_PARTIAL skbs), on XDP a
//! folded incremental update (RFC 1624).
use aya_ebpf::{
    bindings::BPF_F_PSEUDO_HDR,
    programs::{TcContext, XdpContext},
};
use lb_common::PROTO_UDP;

use crate::{
    csum,
    parse::{ptr_at, Packet, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, L4_DPORT_OFF, L4_SPORT_OFF},
};

/// `BPF_F_MARK_MANGLED_0`: a UDP checksum of 0 ("none") stays 0, and a computed 0 is
/// written as 0xffff.
const BPF_F_MARK_MANGLED_0: u64 = 1 << 5;

pub trait Rewriter {
    /// Replace the 4-byte IPv4 address at `off` (old value `old`), fixing the IP header
    /// checksum and the L4 checksum (pseudo-header).
    fn rewrite_addr(&self, pkt: &Packet, off: usize, old: u32, new: u32) -> Result<(), ()>;
    /// Replace the 4-byte IPv4 address at `off`, fixing the checksum of the IPv4 header
    /// at `l3_off` only: for a fragment after the first, which has no L4 header (the
    /// first fragment's L4 checksum covers the pseudo-header).
    fn rewrite_ip_addr(&self, l3_off: usize, off: usize, old: u32, new: u32) -> Result<(), ()>;
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
        self.rewrite_ip_addr(pkt.l3_off, off, old, new)
    }

    #[inline(always)]
    fn rewrite_ip_addr(&self, l3_off: usize, off: usize, old: u32, new: u32) -> Result<(), ()> {
        self.l3_csum_replace(l3_off + IP_CSUM_OFF, old as u64, new as u64, 4)
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

/// A 16-bit field: its place and value (one load; see `parse::load` on alignment).
#[inline(always)]
fn read_u16(ctx: &XdpContext, off: usize) -> Result<(*mut u16, u16), ()> {
    let p = ptr_at::<u16, _>(ctx, off).ok_or(())? as *mut u16;
    // SAFETY: ptr_at checked the bounds.
    Ok((p, unsafe { p.read() }))
}

/// Applies `update` to the L4 checksum; a UDP checksum of 0 ("none") stays 0 and a
/// computed 0 is written as 0xffff (RFC 768).
#[inline(always)]
fn update_l4_csum(ctx: &XdpContext, pkt: &Packet, update: impl Fn(u16) -> u16) -> Result<(), ()> {
    let (p, csum) = read_u16(ctx, pkt.l4_off + pkt.csum_off)?;
    if pkt.proto == PROTO_UDP && csum == 0 {
        return Ok(());
    }
    let mut new = update(csum);
    if pkt.proto == PROTO_UDP && new == 0 {
        new = 0xffff;
    }
    // SAFETY: bounds checked in read_u16.
    unsafe { p.write(new) };
    Ok(())
}

/// On XDP the frame is plain memory with complete checksums (no skb, so no
/// CHECKSUM_PARTIAL): fields are written directly and both checksums updated
/// incrementally.
impl Rewriter for XdpContext {
    #[inline(always)]
    fn rewrite_addr(&self, pkt: &Packet, off: usize, old: u32, new: u32) -> Result<(), ()> {
        update_l4_csum(self, pkt, |c| csum::replace4(c, old, new))?;
        self.rewrite_ip_addr(pkt.l3_off, off, old, new)
    }

    #[inline(always)]
    fn rewrite_ip_addr(&self, l3_off: usize, off: usize, old: u32, new: u32) -> Result<(), ()> {
        let addr = ptr_at::<u32, _>(self, off).ok_or(())? as *mut u32;
        let (ip_csum, c) = read_u16(self, l3_off + IP_CSUM_OFF)?;
        // SAFETY: both pointers were bounds-checked above.
        unsafe {
            ip_csum.write(csum::replace4(c, old, new));
            addr.write(new);
        }
        Ok(())
    }

    #[inline(always)]
    fn rewrite_port(&self, pkt: &Packet, off: usize, old: u16, new: u16) -> Result<(), ()> {
        let (port, _) = read_u16(self, off)?;
        update_l4_csum(self, pkt, |c| csum::replace2(c, old, new))?;
        // SAFETY: bounds checked in read_u16.
        unsafe { port.write(new) };
        Ok(())
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
