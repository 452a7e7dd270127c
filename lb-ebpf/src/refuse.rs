//! Refusal for a frontend without a ready backend, as kube-proxy's REJECT does: the
//! packet is turned, in place, into a TCP RST or an ICMP port unreachable and sent back
//! out of the interface it came in by, so the client fails at once instead of timing out.
//!
//! Rules: a TCP RST is never answered; a UDP datagram with IP options is dropped rather
//! than answered (counted `drop_no_backend`), the only case where we do not echo the
//! header. Checksums of the new headers are computed in full.
use aya_ebpf::{
    bindings::{bpf_adj_room_mode::BPF_ADJ_ROOM_NET, TC_ACT_REDIRECT},
    helpers::{bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};
use lb_common::{counter, PROTO_TCP};

use crate::{
    counters::count,
    csum,
    hook::Verdict,
    parse::{
        Packet, ETH_HLEN, IPV4_MIN_HLEN, TCP_ACK, TCP_FIN, TCP_MIN_HLEN, TCP_RST, TCP_SYN, UDP_HLEN,
    },
};

const PROTO_ICMP: u8 = 1;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;

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
        ttl: 64,
        proto,
        csum: 0,
        src,
        dst,
    };
    ip.csum = csum::finish(csum::sum(&ip, 0));
    ip
}

#[inline(always)]
fn swap_macs(ctx: &TcContext) -> Result<(), ()> {
    let macs: [u8; 12] = ctx.load(0).map_err(|_| ())?;
    let mut swapped = [0u8; 12];
    swapped[..6].copy_from_slice(&macs[6..]);
    swapped[6..].copy_from_slice(&macs[..6]);
    ctx.store(0, &swapped, 0).map_err(|_| ())
}

#[inline(always)]
fn send_back(ctx: &TcContext) -> Verdict {
    // SAFETY: plain helper call with the skb's own ingress interface.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let ret = unsafe { bpf_redirect(ifindex, 0) } as i32;
    if ret != TC_ACT_REDIRECT as i32 {
        count(counter::DROP_NO_BACKEND);
        return Verdict::Drop;
    }
    count(counter::REFUSED_NO_BACKEND);
    Verdict::Redirect(ret)
}

#[inline(always)]
pub fn refuse(ctx: &TcContext, pkt: &Packet) -> Verdict {
    let built = if pkt.proto == PROTO_TCP {
        if pkt.tcp_flags & TCP_RST != 0 {
            Err(())
        } else {
            build_rst(ctx, pkt)
        }
    } else if pkt.ihl_bytes == IPV4_MIN_HLEN {
        build_port_unreachable(ctx, pkt)
    } else {
        Err(())
    };
    match built.and_then(|()| swap_macs(ctx)) {
        Ok(()) => send_back(ctx),
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
    let mut seg_len = (pkt.tot_len as u32)
        .wrapping_sub(pkt.ihl_bytes as u32)
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
    let pseudo = PseudoHdr {
        src: pkt.dst,
        dst: pkt.src,
        zero: 0,
        proto: PROTO_TCP,
        len: tcp_len.to_be(),
    };
    rst.csum = csum::finish(csum::sum(&rst, csum::sum(&pseudo, 0)));
    let ip = ip_header(pkt.dst, pkt.src, PROTO_TCP, IPV4_MIN_HLEN as u16 + tcp_len);

    ctx.store(ETH_HLEN, &ip, 0).map_err(|_| ())?;
    ctx.store(ETH_HLEN + IPV4_MIN_HLEN, &rst, 0)
        .map_err(|_| ())?;
    let new_len = (ETH_HLEN + IPV4_MIN_HLEN + TCP_MIN_HLEN) as u32;
    // SAFETY: helper on our own skb; packet pointers are re-derived by later loads.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb as *mut _, new_len, 0) } != 0 {
        return Err(());
    }
    Ok(())
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
    let ip = ip_header(
        pkt.dst,
        pkt.src,
        PROTO_ICMP,
        IPV4_MIN_HLEN as u16 + icmp_len,
    );

    // [eth][ip][udp...] -> [eth][ip][28 bytes of room][udp...]
    let room = (IPV4_MIN_HLEN + 8) as i32;
    ctx.adjust_room(room, BPF_ADJ_ROOM_NET, 0).map_err(|_| ())?;
    ctx.store(ETH_HLEN, &ip, 0).map_err(|_| ())?;
    ctx.store(ETH_HLEN + IPV4_MIN_HLEN, &icmp, 0)
        .map_err(|_| ())?;
    ctx.store(ETH_HLEN + IPV4_MIN_HLEN + 8, &orig_ip, 0)
        .map_err(|_| ())?;
    // The original UDP header already sits right after, where adjust_room left it.
    let new_len = (ETH_HLEN + IPV4_MIN_HLEN) as u32 + icmp_len as u32;
    // SAFETY: helper on our own skb.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb as *mut _, new_len, 0) } != 0 {
        return Err(());
    }
    Ok(())
}
