//! Refusal for a frontend without a ready backend, as kube-proxy's REJECT does: the
//! packet is turned, in place, into a TCP RST, an ICMP port unreachable (IPv4) or an
//! ICMPv6 port unreachable (IPv6), and sent back out of the interface it came in by, so
//! the client fails at once instead of timing out. The TCP segment is built once; the IP
//! header, the pseudo-header and the ICMP message are per family.
//!
//! Rules: a TCP RST is never answered; a UDP datagram with IPv4 options or IPv6
//! extension headers is dropped rather than answered (counted `drop_no_backend`), the
//! only case where we do not echo the header. A TCP segment with them gets its RST (a
//! plain header, built from scratch). Checksums of the new headers are computed in full;
//! the new IP header has TTL / hop limit 64.
use aya_ebpf::{
    bindings::bpf_adj_room_mode::BPF_ADJ_ROOM_NET, helpers::bpf_skb_change_tail,
    programs::TcContext,
};
use lb_common::{counter, Addr, PROTO_TCP};

use crate::{
    counters::count,
    csum,
    hook::Verdict,
    parse::{
        Family, Packet, ETH_HLEN, IPV4_MIN_HLEN, IPV6_HLEN, TCP_ACK, TCP_FIN, TCP_MIN_HLEN,
        TCP_RST, TCP_SYN, UDP_HLEN,
    },
    route,
};

const PROTO_ICMP: u8 = 1;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
const PROTO_ICMPV6: u8 = 58;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PORT_UNREACH: u8 = 4;
const HOP_LIMIT: u8 = 64;

#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv4Hdr {
    ver_ihl: u8,
    tos: u8,
    tot_len: u16,
    id: u16,
    frag_off: u16,
    ttl: u8,
    proto: u8,
    csum: u16,
    src: u32,
    dst: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv6Hdr {
    /// Version, traffic class, flow label.
    ver_tc_flow: u32,
    payload_len: u16,
    next_header: u8,
    hop_limit: u8,
    src: Addr,
    dst: Addr,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct TcpHdr {
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    doff: u8,
    flags: u8,
    window: u16,
    csum: u16,
    urg: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct PseudoHdr {
    src: u32,
    dst: u32,
    zero: u8,
    proto: u8,
    len: u16,
}

/// RFC 8200 8.1.
#[repr(C)]
#[derive(Clone, Copy)]
struct PseudoHdr6 {
    src: Addr,
    dst: Addr,
    len: u32,
    zero: [u8; 3],
    next_header: u8,
}

/// The first 8 bytes of an ICMP / ICMPv6 error (type, code, checksum, unused).
#[repr(C)]
#[derive(Clone, Copy)]
struct IcmpHdr {
    ty: u8,
    code: u8,
    csum: u16,
    unused: u32,
}

#[inline(always)]
fn ip_header(src: u32, dst: u32, proto: u8, tot_len: u16) -> Ipv4Hdr {
    let mut ip = Ipv4Hdr {
        ver_ihl: 0x45,
        tos: 0,
        tot_len: tot_len.to_be(),
        id: 0,
        frag_off: 0x4000u16.to_be(), // DF
        ttl: HOP_LIMIT,
        proto,
        csum: 0,
        src,
        dst,
    };
    ip.csum = csum::finish(csum::sum(&ip, 0));
    ip
}

#[inline(always)]
fn ipv6_header(src: &Addr, dst: &Addr, next_header: u8, payload_len: u16) -> Ipv6Hdr {
    Ipv6Hdr {
        ver_tc_flow: 0x6000_0000u32.to_be(),
        payload_len: payload_len.to_be(),
        next_header,
        hop_limit: HOP_LIMIT,
        src: *src,
        dst: *dst,
    }
}

/// The one's-complement sum of the pseudo-header of an answer to `pkt` (from its
/// destination to its source) carrying `len` bytes of `proto`.
#[inline(always)]
fn answer_pseudo_sum(pkt: &Packet, proto: u8, len: u16) -> u32 {
    match pkt.family {
        Family::V4 => csum::sum(
            &PseudoHdr {
                src: pkt.dst[3],
                dst: pkt.src[3],
                zero: 0,
                proto,
                len: len.to_be(),
            },
            0,
        ),
        Family::V6 => csum::sum(
            &PseudoHdr6 {
                src: pkt.dst,
                dst: pkt.src,
                len: (len as u32).to_be(),
                zero: [0; 3],
                next_header: proto,
            },
            0,
        ),
    }
}

/// Writes the IP header of an answer to `pkt` (from its destination to its source)
/// carrying `len` bytes of `proto`, right after the Ethernet header; returns its length.
#[inline(always)]
fn store_answer_header(ctx: &TcContext, pkt: &Packet, proto: u8, len: u16) -> Result<usize, ()> {
    match pkt.family {
        Family::V4 => {
            let ip = ip_header(pkt.dst[3], pkt.src[3], proto, IPV4_MIN_HLEN as u16 + len);
            ctx.store(ETH_HLEN, &ip, 0).map_err(|_| ())?;
            Ok(IPV4_MIN_HLEN)
        }
        Family::V6 => {
            let ip = ipv6_header(&pkt.dst, &pkt.src, proto, len);
            ctx.store(ETH_HLEN, &ip, 0).map_err(|_| ())?;
            Ok(IPV6_HLEN)
        }
    }
}

#[inline(always)]
fn change_tail(ctx: &TcContext, len: usize) -> Result<(), ()> {
    // SAFETY: helper on our own skb; packet pointers are re-derived by later loads.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb as *mut _, len as u32, 0) } != 0 {
        return Err(());
    }
    Ok(())
}

/// Whether a refusal is sent for `pkt`: not for a TCP RST (RFC 793 answers none), nor
/// for a UDP datagram with IPv4 options or IPv6 extension headers (not echoed in an
/// ICMP error); those are dropped (`drop_no_backend`).
#[inline(always)]
pub fn answered(pkt: &Packet) -> bool {
    if pkt.proto == PROTO_TCP {
        pkt.tcp_flags & TCP_RST == 0
    } else {
        !pkt.has_ip_options()
    }
}

#[inline(always)]
pub fn refuse(ctx: &TcContext, pkt: &Packet) -> Verdict {
    let built = if !answered(pkt) {
        Err(())
    } else if pkt.proto == PROTO_TCP {
        build_rst(ctx, pkt)
    } else {
        match pkt.family {
            Family::V4 => build_port_unreachable(ctx, pkt),
            Family::V6 => build_port_unreachable_v6(ctx, pkt),
        }
    };
    match built.and_then(|()| route::back(ctx)) {
        Ok(code) => {
            count(counter::REFUSED_NO_BACKEND);
            Verdict::Redirect(code)
        }
        Err(()) => {
            count(counter::DROP_NO_BACKEND);
            Verdict::Drop
        }
    }
}

/// RFC 793 reset generation: if the segment has ACK, RST with seq = SEG.ACK; otherwise
/// RST|ACK with seq 0 and ack = SEG.SEQ + SEG.LEN (SYN and FIN count one each).
#[inline(always)]
fn build_rst(ctx: &TcContext, pkt: &Packet) -> Result<(), ()> {
    let tcp: TcpHdr = ctx.load(pkt.l4_off).map_err(|_| ())?;
    let doff = ((tcp.doff >> 4) as u32) * 4;
    let mut seg_len = pkt
        .l3_len
        .wrapping_sub(pkt.l3_hlen() as u32)
        .wrapping_sub(doff);
    if tcp.flags & TCP_SYN != 0 {
        seg_len += 1;
    }
    if tcp.flags & TCP_FIN != 0 {
        seg_len += 1;
    }
    let (seq, ack, flags) = if tcp.flags & TCP_ACK != 0 {
        (tcp.ack, 0u32, TCP_RST)
    } else {
        (
            0u32,
            u32::from_be(tcp.seq).wrapping_add(seg_len).to_be(),
            TCP_RST | TCP_ACK,
        )
    };
    let tcp_len = TCP_MIN_HLEN as u16;
    let mut rst = TcpHdr {
        sport: tcp.dport,
        dport: tcp.sport,
        seq,
        ack,
        doff: 5 << 4,
        flags,
        window: 0,
        csum: 0,
        urg: 0,
    };
    rst.csum = csum::finish(csum::sum(&rst, answer_pseudo_sum(pkt, PROTO_TCP, tcp_len)));
    let hlen = store_answer_header(ctx, pkt, PROTO_TCP, tcp_len)?;
    ctx.store(ETH_HLEN + hlen, &rst, 0).map_err(|_| ())?;
    change_tail(ctx, ETH_HLEN + hlen + TCP_MIN_HLEN)
}

/// ICMP destination unreachable / port unreachable, quoting the original IP header and
/// the first 8 bytes of its UDP header.
#[inline(always)]
fn build_port_unreachable(ctx: &TcContext, pkt: &Packet) -> Result<(), ()> {
    let orig_ip: Ipv4Hdr = ctx.load(pkt.l3_off).map_err(|_| ())?;
    let orig_l4: [u32; 2] = ctx.load(pkt.l4_off).map_err(|_| ())?;
    let quoted = (IPV4_MIN_HLEN + UDP_HLEN) as u16;
    let icmp_len = 8 + quoted;

    let mut icmp = IcmpHdr {
        ty: ICMP_DEST_UNREACH,
        code: ICMP_PORT_UNREACH,
        csum: 0,
        unused: 0,
    };
    let sum = csum::sum(&orig_l4, csum::sum(&orig_ip, csum::sum(&icmp, 0)));
    icmp.csum = csum::finish(sum);

    // [eth][ip][udp...] -> [eth][ip][28 bytes of room][udp...]
    let room = (IPV4_MIN_HLEN + 8) as i32;
    ctx.adjust_room(room, BPF_ADJ_ROOM_NET, 0).map_err(|_| ())?;
    store_answer_header(ctx, pkt, PROTO_ICMP, icmp_len)?;
    ctx.store(ETH_HLEN + IPV4_MIN_HLEN, &icmp, 0)
        .map_err(|_| ())?;
    ctx.store(ETH_HLEN + IPV4_MIN_HLEN + 8, &orig_ip, 0)
        .map_err(|_| ())?;
    // The original UDP header already sits right after, where adjust_room left it.
    change_tail(ctx, ETH_HLEN + IPV4_MIN_HLEN + icmp_len as usize)
}

/// ICMPv6 destination unreachable / port unreachable (RFC 4443 3.1), quoting the
/// original IPv6 header and the first 8 bytes of its UDP header; its checksum covers the
/// pseudo-header.
#[inline(always)]
fn build_port_unreachable_v6(ctx: &TcContext, pkt: &Packet) -> Result<(), ()> {
    let orig_ip: Ipv6Hdr = ctx.load(pkt.l3_off).map_err(|_| ())?;
    let orig_l4: [u32; 2] = ctx.load(pkt.l4_off).map_err(|_| ())?;
    let quoted = (IPV6_HLEN + UDP_HLEN) as u16;
    let icmp_len = 8 + quoted;

    let mut icmp = IcmpHdr {
        ty: ICMPV6_DEST_UNREACH,
        code: ICMPV6_PORT_UNREACH,
        csum: 0,
        unused: 0,
    };
    let pseudo = answer_pseudo_sum(pkt, PROTO_ICMPV6, icmp_len);
    let sum = csum::sum(&orig_l4, csum::sum(&orig_ip, csum::sum(&icmp, pseudo)));
    icmp.csum = csum::finish(sum);

    // [eth][ip6][udp...] -> [eth][ip6][48 bytes of room][udp...]
    let room = (IPV6_HLEN + 8) as i32;
    ctx.adjust_room(room, BPF_ADJ_ROOM_NET, 0).map_err(|_| ())?;
    store_answer_header(ctx, pkt, PROTO_ICMPV6, icmp_len)?;
    ctx.store(ETH_HLEN + IPV6_HLEN, &icmp, 0).map_err(|_| ())?;
    ctx.store(ETH_HLEN + IPV6_HLEN + 8, &orig_ip, 0)
        .map_err(|_| ())?;
    change_tail(ctx, ETH_HLEN + IPV6_HLEN + icmp_len as usize)
}
