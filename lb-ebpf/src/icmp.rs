//! ICMP errors about translated flows (destination unreachable, fragmentation needed /
//! packet too big, time exceeded, parameter problem), translated like the flow they are
//! about, inner header included, so the stack they reach matches them to its socket:
//!
//! - **toward a client** (tc egress, `reply.rs`): an error about a client's packet after
//!   DNAT (client -> backend), e.g. the node's own "fragmentation needed" for a link to
//!   the backend with a smaller MTU, or the backend's port unreachable. The quoted packet
//!   is found by its flow's reply entry; its destination becomes the frontend again, and
//!   the error's own source too when it is the backend's (the client then learns the path
//!   MTU toward the Service it connected to);
//! - **toward a backend** (ingress, `lb.rs`): an error about a backend's reply after
//!   reverse NAT (frontend -> client), e.g. a router's "packet too big" toward a client
//!   outside, or a client's port unreachable. Found by the flow's forward entry; the
//!   quoted source becomes the backend, and the error's destination too when it was sent
//!   to the frontend's address.
//!
//! The flows the program carries itself (SNAT, hairpin) are not covered: their errors
//! pass untouched. Rules for bad input: an ICMP message too short to hold the IP header
//! and 8 bytes of the packet it quotes (inside its own IP length: a frame's padding is no
//! quote), a quoted header that is not plain IPv4 (no
//! options) or IPv6 (no extension headers) with TCP or UDP right after it, or an outer
//! packet that is fragmented, has IPv4 options or IPv6 extension headers: not an error
//! we translate (`passed`, as any other ICMP). Options are that rare on either header
//! that fixed offsets are worth it: every access below is one the verifier checks once.
use lb_common::{
    counter, is_ipv4_mapped, Addr, CtKey, CT_DIR_FORWARD, CT_DIR_REPLY, CT_F_SNAT, PROTO_TCP,
    PROTO_UDP,
};

use crate::{
    conntrack,
    counters::count,
    csum,
    hook::Verdict,
    nat::Rewriter,
    parse::{
        load, ptr_at, Family, PacketData, ETH_HLEN, IPV4_MIN_HLEN, IPV6_HLEN, IP_CSUM_OFF,
        L4_DPORT_OFF, L4_SPORT_OFF, TCP_CSUM_OFF, UDP_CSUM_OFF,
    },
};

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;
const ICMP_HLEN: usize = 8;
/// The error types that quote a packet (RFC 792, RFC 4443).
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
const ICMPV6_TIME_EXCEEDED: u8 = 3;
const ICMPV6_PARAMETER_PROBLEM: u8 = 4;
/// Offset of the checksum in the ICMP header.
const ICMP_CSUM_OFF: usize = 2;

/// An ICMP error and the packet it quotes (addresses and ports in network byte order, as
/// in `Packet`). Small: it lives in the program's one stack frame beside the rest. The
/// offsets are the family's constants (`Offsets`), so every access below is at a fixed
/// place the verifier checks once.
#[derive(Clone, Copy)]
pub struct IcmpError {
    pub family: Family,
    /// Whether the error comes from the quoted packet's destination (the backend itself,
    /// for an error toward a client), and whether it goes to the quoted packet's source
    /// (the frontend's address, for an error toward a backend).
    pub from_quoted_dst: bool,
    pub to_quoted_src: bool,
    pub inner_proto: u8,
    pub inner_sport: u16,
    pub inner_dport: u16,
    pub inner_src: Addr,
    pub inner_dst: Addr,
    /// Where the error's IP packet ends in the frame (its total or payload length): the
    /// quote ends there, whatever padding the frame has after it.
    pub end: u32,
}

/// Where the ICMP header, the quoted IP header and the quoted L4 header are: the outer
/// IP header at `ETH_HLEN` and both IP headers without options (IPv4) or extension
/// headers (IPv6).
#[derive(Clone, Copy)]
struct Offsets {
    icmp: usize,
    inner_l3: usize,
    inner_l4: usize,
}

#[inline(always)]
const fn offsets(family: Family) -> Offsets {
    let l3 = match family {
        Family::V4 => IPV4_MIN_HLEN,
        Family::V6 => IPV6_HLEN,
    };
    let icmp = ETH_HLEN + l3;
    Offsets {
        icmp,
        inner_l3: icmp + ICMP_HLEN,
        inner_l4: icmp + ICMP_HLEN + l3,
    }
}

/// The bytes read from the ICMP header on: its own 8, the quoted IP header and 8 bytes of
/// the quoted L4 header (the ports, and what RFC 792 guarantees a quote holds).
pub const V4_BLOCK: usize = ICMP_HLEN + IPV4_MIN_HLEN + 8;
pub const V6_BLOCK: usize = ICMP_HLEN + IPV6_HLEN + 8;

/// An IPv4 ICMP message right after an outer header of 20 bytes (checked by the caller,
/// with: not fragmented): an error quoting a TCP or UDP packet whose header has no
/// options, or None.
#[inline(always)]
pub fn parse_v4<C: PacketData>(ctx: &C, src: Addr, dst: Addr, end: usize) -> Option<IcmpError> {
    let o = offsets(Family::V4);
    ctx.make_readable(o.icmp + V4_BLOCK);
    let b = ptr_at::<[u8; V4_BLOCK], C>(ctx, o.icmp)?;
    let q = ICMP_HLEN; // the quoted header, in the block
                       // SAFETY: the whole block was bounds-checked just above; 16- and 32-bit loads at
                       // fixed offsets, as in `parse::load`.
    let (ty, ver_ihl, proto, isrc, idst, sport, dport) = unsafe {
        let p = b as *const u8;
        (
            (*b)[0],
            (*b)[q],
            (*b)[q + 9],
            (p.add(q + 12) as *const u32).read(),
            (p.add(q + 16) as *const u32).read(),
            (p.add(q + IPV4_MIN_HLEN + L4_SPORT_OFF) as *const u16).read(),
            (p.add(q + IPV4_MIN_HLEN + L4_DPORT_OFF) as *const u16).read(),
        )
    };
    if !matches!(
        ty,
        ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM
    ) || ver_ihl != 0x45
        || (proto != PROTO_TCP && proto != PROTO_UDP)
    {
        return None;
    }
    let (inner_src, inner_dst) = (lb_common::ipv4_mapped(isrc), lb_common::ipv4_mapped(idst));
    Some(IcmpError {
        family: Family::V4,
        from_quoted_dst: src == inner_dst,
        to_quoted_src: dst == inner_src,
        inner_proto: proto,
        inner_sport: sport,
        inner_dport: dport,
        inner_src,
        inner_dst,
        end: end as u32,
    })
}

/// An ICMPv6 message right after a plain IPv6 header: an error quoting a TCP or UDP
/// packet (no extension headers in the quote), or None.
#[inline(always)]
pub fn parse_v6<C: PacketData>(ctx: &C, src: Addr, dst: Addr, end: usize) -> Option<IcmpError> {
    let o = offsets(Family::V6);
    ctx.make_readable(o.icmp + V6_BLOCK);
    let b = ptr_at::<[u8; V6_BLOCK], C>(ctx, o.icmp)?;
    let q = ICMP_HLEN;
    // SAFETY: the whole block was bounds-checked just above; loads at fixed offsets.
    let (ty, ver, proto, isrc, idst, sport, dport) = unsafe {
        let p = b as *const u8;
        (
            (*b)[0],
            (*b)[q],
            (*b)[q + 6],
            (p.add(q + Family::V6.src_off()) as *const Addr).read(),
            (p.add(q + Family::V6.dst_off()) as *const Addr).read(),
            (p.add(q + IPV6_HLEN + L4_SPORT_OFF) as *const u16).read(),
            (p.add(q + IPV6_HLEN + L4_DPORT_OFF) as *const u16).read(),
        )
    };
    if !matches!(
        ty,
        ICMPV6_DEST_UNREACH
            | ICMPV6_PACKET_TOO_BIG
            | ICMPV6_TIME_EXCEEDED
            | ICMPV6_PARAMETER_PROBLEM
    ) || ver >> 4 != 6
        || (proto != PROTO_TCP && proto != PROTO_UDP)
        || is_ipv4_mapped(&isrc)
        || is_ipv4_mapped(&idst)
    {
        return None;
    }
    Some(IcmpError {
        family: Family::V6,
        from_quoted_dst: src == idst,
        to_quoted_src: dst == isrc,
        inner_proto: proto,
        inner_sport: sport,
        inner_dport: dport,
        inner_src: isrc,
        inner_dst: idst,
        end: end as u32,
    })
}

/// The conntrack key of a packet going the other way than the quoted one.
#[inline(always)]
fn reversed(e: &IcmpError) -> CtKey {
    CtKey {
        src_addr: e.inner_dst,
        dst_addr: e.inner_src,
        src_port: e.inner_dport,
        dst_port: e.inner_sport,
        proto: e.inner_proto,
        _pad: [0; 3],
    }
}

/// The rewrites an ICMP error needs, over the hook's rewriter.
pub trait IcmpRewriter {
    /// Replaces the 4- or 16-byte address at `off` inside the ICMP message (the quoted
    /// header), fixing the quoted IPv4 header's checksum at `inner_csum` (IPv4) and the
    /// ICMP checksum.
    fn icmp_inner_addr(&self, e: &IcmpError, off: usize, old: &Addr, new: &Addr) -> Result<(), ()>;
    /// Replaces a 2-byte port at `off` inside the ICMP message, fixing the ICMP checksum.
    fn icmp_inner_port(&self, e: &IcmpError, off: usize, old: u16, new: u16) -> Result<(), ()>;
    /// Updates the quoted L4 checksum for an address and a port the quote changes, when
    /// the quote holds it (a TCP checksum is past the 8 bytes an error must quote; a UDP
    /// checksum of 0 is "none"), fixing the ICMP checksum: the quote then is the packet
    /// as its sender wrote it, as netfilter's NAT restores it.
    fn icmp_inner_l4_csum(
        &self,
        e: &IcmpError,
        addrs: (&Addr, &Addr),
        ports: (u16, u16),
    ) -> Result<(), ()>;
    /// Replaces the error's own address at `off` (its source or destination), fixing the
    /// IPv4 header checksum or, for ICMPv6, the checksum's pseudo-header.
    fn icmp_outer_addr(&self, e: &IcmpError, off: usize, old: &Addr, new: &Addr) -> Result<(), ()>;
}

impl<R: Rewriter + PacketData> IcmpRewriter for R {
    #[inline(always)]
    fn icmp_inner_addr(&self, e: &IcmpError, off: usize, old: &Addr, new: &Addr) -> Result<(), ()> {
        let o = offsets(e.family);
        let icmp_csum = o.icmp + ICMP_CSUM_OFF;
        match e.family {
            Family::V4 => {
                // The quoted header's own checksum first; then the ICMP checksum over
                // both changes (the address and that checksum).
                let inner_csum = o.inner_l3 + IP_CSUM_OFF;
                let old_c = load::<u16, R>(self, inner_csum).ok_or(())?;
                let new_c = csum::replace4(old_c, old[3], new[3]);
                self.store2_csum(inner_csum, old_c, new_c, icmp_csum)?;
                self.store4_csum(off, old[3], new[3], icmp_csum)
            }
            Family::V6 => self.store16_csum(off, old, new, icmp_csum),
        }
    }

    #[inline(always)]
    fn icmp_inner_port(&self, e: &IcmpError, off: usize, old: u16, new: u16) -> Result<(), ()> {
        self.store2_csum(off, old, new, offsets(e.family).icmp + ICMP_CSUM_OFF)
    }

    #[inline(always)]
    fn icmp_inner_l4_csum(
        &self,
        e: &IcmpError,
        (old_addr, new_addr): (&Addr, &Addr),
        (old_port, new_port): (u16, u16),
    ) -> Result<(), ()> {
        let o = offsets(e.family);
        let off = o.inner_l4
            + if e.inner_proto == PROTO_TCP {
                TCP_CSUM_OFF
            } else {
                UDP_CSUM_OFF
            };
        // Not in the quote: past the error's IP packet (a frame's padding is no quote).
        if off + 2 > e.end as usize {
            return Ok(());
        }
        self.make_readable(off + 2);
        let Some(old) = load::<u16, R>(self, off) else {
            return Ok(());
        };
        if e.inner_proto == PROTO_UDP && old == 0 {
            return Ok(());
        }
        let c = match e.family {
            Family::V4 => csum::replace4(old, old_addr[3], new_addr[3]),
            Family::V6 => csum::replace16(old, old_addr, new_addr),
        };
        let mut new = csum::replace2(c, old_port, new_port);
        if e.inner_proto == PROTO_UDP && new == 0 {
            new = 0xffff;
        }
        self.store2_csum(off, old, new, o.icmp + ICMP_CSUM_OFF)
    }

    #[inline(always)]
    fn icmp_outer_addr(&self, e: &IcmpError, off: usize, old: &Addr, new: &Addr) -> Result<(), ()> {
        if e.family == Family::V6 {
            // ICMPv6's checksum covers the pseudo-header; ICMPv4's does not.
            self.pseudo16(offsets(e.family).icmp + ICMP_CSUM_OFF, old, new)?;
        }
        self.rewrite_ip_addr(e.family, ETH_HLEN, off, old, new)
    }
}

/// Toward a client (tc egress): an error about a client's packet after DNAT gets the
/// frontend back in its quote (and as its source, if the backend sent it).
#[inline(always)]
pub fn to_client<C: Rewriter + PacketData>(ctx: &C, e: &IcmpError) -> Verdict {
    let Some(entry) = conntrack::lookup(&reversed(e)) else {
        count(counter::EGRESS_PASSED);
        return Verdict::Pass;
    };
    // SAFETY: pointer from a successful lookup; copied.
    let r = unsafe { *entry };
    if r.dir != CT_DIR_REPLY || r.flags & CT_F_SNAT != 0 {
        count(counter::EGRESS_PASSED);
        return Verdict::Pass;
    }
    let o = offsets(e.family);
    let dst_off = o.inner_l3 + e.family.dst_off();
    let port_off = o.inner_l4 + L4_DPORT_OFF;
    let rewritten = ctx
        .icmp_inner_addr(e, dst_off, &e.inner_dst, &r.nat_addr)
        .and_then(|()| ctx.icmp_inner_port(e, port_off, e.inner_dport, r.nat_port))
        .and_then(|()| {
            ctx.icmp_inner_l4_csum(e, (&e.inner_dst, &r.nat_addr), (e.inner_dport, r.nat_port))
        })
        .and_then(|()| {
            if e.from_quoted_dst {
                let off = ETH_HLEN + e.family.src_off();
                ctx.icmp_outer_addr(e, off, &e.inner_dst, &r.nat_addr)
            } else {
                Ok(())
            }
        });
    match rewritten {
        Ok(()) => {
            count(counter::REVERSE_TRANSLATED_ICMP);
            Verdict::Pass
        }
        Err(()) => {
            count(counter::DROP_REWRITE_FAILED);
            Verdict::Drop
        }
    }
}

/// Toward a backend (ingress): an error about a backend's reply after reverse NAT gets
/// the backend back in its quote (and as its destination, if it was sent to the
/// frontend's address). None: not about a flow we translate (the caller passes it).
#[inline(always)]
pub fn to_backend<C: Rewriter + PacketData>(ctx: &C, e: &IcmpError) -> Option<Verdict> {
    let entry = conntrack::lookup(&reversed(e))?;
    // SAFETY: pointer from a successful lookup; copied.
    let f = unsafe { *entry };
    if f.dir != CT_DIR_FORWARD || f.flags & CT_F_SNAT != 0 {
        return None;
    }
    let o = offsets(e.family);
    let src_off = o.inner_l3 + e.family.src_off();
    let port_off = o.inner_l4 + L4_SPORT_OFF;
    let rewritten = ctx
        .icmp_inner_addr(e, src_off, &e.inner_src, &f.nat_addr)
        .and_then(|()| ctx.icmp_inner_port(e, port_off, e.inner_sport, f.nat_port))
        .and_then(|()| {
            ctx.icmp_inner_l4_csum(e, (&e.inner_src, &f.nat_addr), (e.inner_sport, f.nat_port))
        })
        .and_then(|()| {
            if e.to_quoted_src {
                let off = ETH_HLEN + e.family.dst_off();
                ctx.icmp_outer_addr(e, off, &e.inner_src, &f.nat_addr)
            } else {
                Ok(())
            }
        });
    Some(match rewritten {
        Ok(()) => {
            count(counter::TRANSLATED_ICMP);
            Verdict::Pass
        }
        Err(()) => {
            count(counter::DROP_REWRITE_FAILED);
            Verdict::Drop
        }
    })
}
