//! Address translation: DNAT of a client's packet to the backend, and the mirror rewrite
//! of the backend's reply back to the frontend. The sequence of field changes lives here
//! once, for both families; how a field and its checksums are rewritten depends on the
//! hook (`Rewriter`) and, for an address, on the family:
//! - tc: the kernel's csum helpers (which also handle CHECKSUM_PARTIAL skbs). IPv4: the
//!   address with `l3_csum_replace` and `l4_csum_replace(.., BPF_F_PSEUDO_HDR | 4)`.
//!   IPv6 (no header checksum): the difference of the two 16-byte addresses
//!   (`bpf_csum_diff`) applied with `l4_csum_replace(.., 0, diff, BPF_F_PSEUDO_HDR)`.
//! - XDP: plain writes and folded incremental updates (RFC 1624, `csum.rs`).
//!
//! An address of the other family than the packet's (a map entry that cannot belong to
//! this packet: userspace serves each frontend with backends of its own family) is
//! refused (`Err`: dropped, `drop_rewrite_failed`), never written half.
use aya_ebpf::{
    bindings::BPF_F_PSEUDO_HDR,
    programs::{TcContext, XdpContext},
};
use lb_common::{is_ipv4_mapped, Addr, PROTO_UDP};

use crate::{
    csum,
    parse::{ptr_at, Family, Packet, IP_CSUM_OFF, L4_DPORT_OFF, L4_SPORT_OFF},
};

/// `BPF_F_MARK_MANGLED_0`: a UDP checksum of 0 ("none") stays 0, and a computed 0 is
/// written as 0xffff.
const BPF_F_MARK_MANGLED_0: u64 = 1 << 5;
/// `BPF_F_IPV6` (Linux 6.16, and stable kernels since): the pseudo-header change is an
/// IPv6 address, which a CHECKSUM_COMPLETE skb's `csum` already covers (the address and
/// the L4 checksum change cancel out there), so the helper must leave `skb->csum` alone.
/// Older kernels refuse the flag (`-EINVAL`, before touching anything): the call is then
/// repeated without it.
const BPF_F_IPV6: u64 = 1 << 7;

/// Whether `addr` can be written into a packet of `family`.
#[inline(always)]
pub fn fits(family: Family, addr: &Addr) -> bool {
    is_ipv4_mapped(addr) == (family == Family::V4)
}

pub trait Rewriter {
    /// Replace the source or destination address at `off` (old value `old`), fixing the
    /// L4 checksum (pseudo-header) and, for IPv4, the header checksum.
    fn rewrite_addr(&self, pkt: &Packet, off: usize, old: &Addr, new: &Addr) -> Result<(), ()>;
    /// Replace the address at `off`, fixing the IPv4 header checksum at `l3_off` (IPv6
    /// has none) only: for a fragment after the first, which has no L4 header (the first
    /// fragment's L4 checksum covers the pseudo-header).
    fn rewrite_ip_addr(
        &self,
        family: Family,
        l3_off: usize,
        off: usize,
        old: &Addr,
        new: &Addr,
    ) -> Result<(), ()>;
    /// Replace the 2-byte L4 port at `off`, fixing the L4 checksum.
    fn rewrite_port(&self, pkt: &Packet, off: usize, old: u16, new: u16) -> Result<(), ()>;
    /// Writes `new` over `old` at `off` (2, 4 or 16 bytes), fixing the plain checksum at
    /// `csum_off` whose data they are (no pseudo-header: an ICMP message's own
    /// checksum over the header it quotes).
    fn store2_csum(&self, off: usize, old: u16, new: u16, csum_off: usize) -> Result<(), ()>;
    fn store4_csum(&self, off: usize, old: u32, new: u32, csum_off: usize) -> Result<(), ()>;
    fn store16_csum(&self, off: usize, old: &Addr, new: &Addr, csum_off: usize) -> Result<(), ()>;
    /// Fixes the checksum at `csum_off` for a change of a 16-byte address of its
    /// pseudo-header (an ICMPv6 error's own address; the address itself is written by
    /// `rewrite_ip_addr`).
    fn pseudo16(&self, csum_off: usize, old: &Addr, new: &Addr) -> Result<(), ()>;
}

#[inline(always)]
fn l4_flags(pkt: &Packet) -> u64 {
    if pkt.proto == PROTO_UDP {
        BPF_F_MARK_MANGLED_0
    } else {
        0
    }
}

/// tc, IPv4: the L4 checksum's pseudo-header, one 4-byte address.
#[inline(always)]
fn tc_l4_addr_v4(ctx: &TcContext, csum: usize, old: u32, new: u32, flags: u64) -> Result<(), ()> {
    ctx.l4_csum_replace(
        csum,
        old as u64,
        new as u64,
        BPF_F_PSEUDO_HDR as u64 | flags | 4,
    )
    .map_err(|_| ())
}

/// tc, IPv6: the L4 checksum's pseudo-header, one 16-byte address, in diff mode.
#[inline(always)]
fn tc_l4_addr_v6(
    ctx: &TcContext,
    csum: usize,
    old: &Addr,
    new: &Addr,
    flags: u64,
) -> Result<(), ()> {
    let diff = csum::diff16(old, new) as u64;
    let flags = BPF_F_PSEUDO_HDR as u64 | flags;
    if ctx
        .l4_csum_replace(csum, 0, diff, flags | BPF_F_IPV6)
        .is_ok()
    {
        return Ok(());
    }
    ctx.l4_csum_replace(csum, 0, diff, flags).map_err(|_| ())
}

impl Rewriter for TcContext {
    #[inline(always)]
    fn rewrite_addr(&self, pkt: &Packet, off: usize, old: &Addr, new: &Addr) -> Result<(), ()> {
        if !fits(pkt.family, new) {
            return Err(());
        }
        let csum = pkt.l4_off + pkt.csum_off;
        match pkt.family {
            Family::V4 => tc_l4_addr_v4(self, csum, old[3], new[3], l4_flags(pkt))?,
            Family::V6 => tc_l4_addr_v6(self, csum, old, new, l4_flags(pkt))?,
        }
        self.rewrite_ip_addr(pkt.family, pkt.l3_off, off, old, new)
    }

    #[inline(always)]
    fn rewrite_ip_addr(
        &self,
        family: Family,
        l3_off: usize,
        off: usize,
        old: &Addr,
        new: &Addr,
    ) -> Result<(), ()> {
        if !fits(family, new) {
            return Err(());
        }
        match family {
            Family::V4 => {
                self.l3_csum_replace(l3_off + IP_CSUM_OFF, old[3] as u64, new[3] as u64, 4)
                    .map_err(|_| ())?;
                self.store(off, &new[3], 0).map_err(|_| ())
            }
            Family::V6 => self.store(off, new, 0).map_err(|_| ()),
        }
    }

    #[inline(always)]
    fn rewrite_port(&self, pkt: &Packet, off: usize, old: u16, new: u16) -> Result<(), ()> {
        let csum = pkt.l4_off + pkt.csum_off;
        self.l4_csum_replace(csum, old as u64, new as u64, l4_flags(pkt) | 2)
            .map_err(|_| ())?;
        self.store(off, &new, 0).map_err(|_| ())
    }

    #[inline(always)]
    fn store2_csum(&self, off: usize, old: u16, new: u16, csum_off: usize) -> Result<(), ()> {
        self.l4_csum_replace(csum_off, old as u64, new as u64, 2)
            .map_err(|_| ())?;
        self.store(off, &new, 0).map_err(|_| ())
    }

    #[inline(always)]
    fn store4_csum(&self, off: usize, old: u32, new: u32, csum_off: usize) -> Result<(), ()> {
        self.l4_csum_replace(csum_off, old as u64, new as u64, 4)
            .map_err(|_| ())?;
        self.store(off, &new, 0).map_err(|_| ())
    }

    #[inline(always)]
    fn store16_csum(&self, off: usize, old: &Addr, new: &Addr, csum_off: usize) -> Result<(), ()> {
        let diff = csum::diff16(old, new) as u64;
        self.l4_csum_replace(csum_off, 0, diff, 0).map_err(|_| ())?;
        self.store(off, new, 0).map_err(|_| ())
    }

    #[inline(always)]
    fn pseudo16(&self, csum_off: usize, old: &Addr, new: &Addr) -> Result<(), ()> {
        tc_l4_addr_v6(self, csum_off, old, new, 0)
    }
}

/// A 16-bit field: its place and value (one load; see `parse::load` on alignment).
#[inline(always)]
fn read_u16(ctx: &XdpContext, off: usize) -> Result<(*mut u16, u16), ()> {
    let p = ptr_at::<u16, _>(ctx, off).ok_or(())? as *mut u16;
    // SAFETY: ptr_at checked the bounds.
    Ok((p, unsafe { p.read() }))
}

/// Applies `update` to the L4 checksum; a UDP checksum of 0 ("none", IPv4 only: the
/// parser passes an IPv6 one) stays 0 and a computed 0 is written as 0xffff (RFC 768).
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
/// CHECKSUM_PARTIAL): fields are written directly and the checksums updated
/// incrementally.
impl Rewriter for XdpContext {
    #[inline(always)]
    fn rewrite_addr(&self, pkt: &Packet, off: usize, old: &Addr, new: &Addr) -> Result<(), ()> {
        if !fits(pkt.family, new) {
            return Err(());
        }
        match pkt.family {
            Family::V4 => update_l4_csum(self, pkt, |c| csum::replace4(c, old[3], new[3]))?,
            Family::V6 => update_l4_csum(self, pkt, |c| csum::replace16(c, old, new))?,
        }
        self.rewrite_ip_addr(pkt.family, pkt.l3_off, off, old, new)
    }

    #[inline(always)]
    fn rewrite_ip_addr(
        &self,
        family: Family,
        l3_off: usize,
        off: usize,
        old: &Addr,
        new: &Addr,
    ) -> Result<(), ()> {
        if !fits(family, new) {
            return Err(());
        }
        match family {
            Family::V4 => {
                let addr = ptr_at::<u32, _>(self, off).ok_or(())? as *mut u32;
                let (ip_csum, c) = read_u16(self, l3_off + IP_CSUM_OFF)?;
                // SAFETY: both pointers were bounds-checked above.
                unsafe {
                    ip_csum.write(csum::replace4(c, old[3], new[3]));
                    addr.write(new[3]);
                }
            }
            Family::V6 => {
                let addr = ptr_at::<Addr, _>(self, off).ok_or(())? as *mut Addr;
                // SAFETY: bounds-checked above (four word stores; see `parse::load` on
                // alignment).
                unsafe { addr.write(*new) };
            }
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

    #[inline(always)]
    fn store2_csum(&self, off: usize, old: u16, new: u16, csum_off: usize) -> Result<(), ()> {
        let (field, _) = read_u16(self, off)?;
        let (c, v) = read_u16(self, csum_off)?;
        // SAFETY: both bounds-checked in read_u16.
        unsafe {
            c.write(csum::replace2(v, old, new));
            field.write(new);
        }
        Ok(())
    }

    #[inline(always)]
    fn store4_csum(&self, off: usize, old: u32, new: u32, csum_off: usize) -> Result<(), ()> {
        let field = ptr_at::<u32, _>(self, off).ok_or(())? as *mut u32;
        let (c, v) = read_u16(self, csum_off)?;
        // SAFETY: both bounds-checked (ptr_at, read_u16).
        unsafe {
            c.write(csum::replace4(v, old, new));
            field.write(new);
        }
        Ok(())
    }

    #[inline(always)]
    fn store16_csum(&self, off: usize, old: &Addr, new: &Addr, csum_off: usize) -> Result<(), ()> {
        let field = ptr_at::<Addr, _>(self, off).ok_or(())? as *mut Addr;
        let (c, v) = read_u16(self, csum_off)?;
        // SAFETY: both bounds-checked (ptr_at, read_u16).
        unsafe {
            c.write(csum::replace16(v, old, new));
            field.write(*new);
        }
        Ok(())
    }

    #[inline(always)]
    fn pseudo16(&self, csum_off: usize, old: &Addr, new: &Addr) -> Result<(), ()> {
        let (c, v) = read_u16(self, csum_off)?;
        // SAFETY: bounds-checked in read_u16.
        unsafe { c.write(csum::replace16(v, old, new)) };
        Ok(())
    }
}

/// Client -> frontend becomes client -> backend (the destination address and port, with
/// their checksums).
#[inline(always)]
pub fn dnat<R: Rewriter>(ctx: &R, pkt: &Packet, addr: &Addr, port: u16) -> Result<(), ()> {
    if *addr != pkt.dst {
        let off = pkt.l3_off + pkt.family.dst_off();
        ctx.rewrite_addr(pkt, off, &pkt.dst, addr)?;
    }
    if port != pkt.dport {
        ctx.rewrite_port(pkt, pkt.l4_off + L4_DPORT_OFF, pkt.dport, port)?;
    }
    Ok(())
}

/// Backend -> client becomes frontend -> client.
#[inline(always)]
pub fn reverse_nat<R: Rewriter>(ctx: &R, pkt: &Packet, addr: &Addr, port: u16) -> Result<(), ()> {
    rewrite_src(ctx, pkt, addr, port)
}

/// The new source of a packet the program carries (after `dnat` to its new destination):
/// a SNAT flow's client -> backend becomes node -> backend; its reply, backend -> node,
/// becomes frontend -> client (with `dnat` to the client).
#[inline(always)]
pub fn snat<R: Rewriter>(ctx: &R, pkt: &Packet, addr: &Addr, port: u16) -> Result<(), ()> {
    rewrite_src(ctx, pkt, addr, port)
}

/// The source address and port, with their checksums.
#[inline(always)]
fn rewrite_src<R: Rewriter>(ctx: &R, pkt: &Packet, addr: &Addr, port: u16) -> Result<(), ()> {
    if *addr != pkt.src {
        let off = pkt.l3_off + pkt.family.src_off();
        ctx.rewrite_addr(pkt, off, &pkt.src, addr)?;
    }
    if port != pkt.sport {
        ctx.rewrite_port(pkt, pkt.l4_off + L4_SPORT_OFF, pkt.sport, port)?;
    }
    Ok(())
}
