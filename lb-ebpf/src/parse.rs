//! Header parsing. Every header access goes through `ptr_at`, which bounds-checks
//! against `data_end`; nothing here writes to the packet.
//!
//! Rules for bad input (documented in ARCHITECTURE.md):
//! - not IPv4: passed, not counted as malformed (ARP, IPv6, ...);
//! - IPv4 header truncated, IHL < 5, version != 4, total length shorter than the header:
//!   passed untouched, counted `passed_malformed` (the kernel's IP stack validates it);
//! - L4 header truncated (shorter than 20 bytes of TCP, TCP data offset < 5, or 8 bytes
//!   of UDP): passed untouched, counted `passed_malformed`: its port cannot be read, so it
//!   can match no frontend and is never rewritten;
//! - a non-first fragment: no L4 header to match, so it is handed on as a `Fragment`
//!   (`frag.rs` translates it like its datagram's first fragment, if that was a reply it
//!   reverse-translated; otherwise it passes, counted `passed_fragment`); a first
//!   fragment that matches a frontend is dropped, counted `drop_fragment`.
use core::mem::size_of;

use lb_common::{PROTO_TCP, PROTO_UDP};

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const IPV4_MIN_HLEN: usize = 20;
pub const TCP_MIN_HLEN: usize = 20;
pub const UDP_HLEN: usize = 8;

/// Offsets of fields inside the IPv4 header.
pub const IP_ID_OFF: usize = 4;
pub const IP_CSUM_OFF: usize = 10;
pub const IP_SRC_OFF: usize = 12;
pub const IP_DST_OFF: usize = 16;
/// Offsets inside the TCP / UDP headers.
pub const L4_SPORT_OFF: usize = 0;
pub const L4_DPORT_OFF: usize = 2;
pub const TCP_CSUM_OFF: usize = 16;
pub const UDP_CSUM_OFF: usize = 6;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// What the datapath needs to know about a packet. Addresses and ports are in network
/// byte order, as in the packet.
#[derive(Clone, Copy)]
pub struct Packet {
    /// Offset of the L4 header (14 + IHL * 4: IP options are skipped, not rejected).
    pub l4_off: usize,
    /// Offset of the IPv4 header.
    pub l3_off: usize,
    pub ihl_bytes: usize,
    /// IPv4 total length.
    pub tot_len: u16,
    /// IPv4 identification (network byte order): with src, dst and proto, what the
    /// fragments of one datagram share.
    pub ip_id: u16,
    pub proto: u8,
    pub tcp_flags: u8,
    pub src: u32,
    pub dst: u32,
    pub sport: u16,
    pub dport: u16,
    /// Offset of the TCP/UDP checksum field, relative to `l4_off`.
    pub csum_off: usize,
    /// This is the first fragment of a fragmented datagram.
    pub first_fragment: bool,
}

pub enum Parsed {
    /// Not IPv4, or IPv4 but neither TCP nor UDP: nothing for us.
    Other,
    /// A broken IPv4 or L4 header: passed untouched, counted.
    Malformed,
    /// A fragment after the first: no L4 header.
    LaterFragment(Fragment),
    Packet(Packet),
}

/// A TCP or UDP fragment after the first (fragment offset > 0): the IPv4 header only.
/// Addresses and the id in network byte order.
#[derive(Clone, Copy)]
pub struct Fragment {
    /// Offset of the IPv4 header.
    pub l3_off: usize,
    pub tot_len: u16,
    pub ip_id: u16,
    pub proto: u8,
    pub src: u32,
    pub dst: u32,
}

/// The parts of a program context that parsing needs: tc and XDP both provide them.
pub trait PacketData {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
}

impl PacketData for aya_ebpf::programs::TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        aya_ebpf::programs::TcContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        aya_ebpf::programs::TcContext::data_end(self)
    }
}

impl PacketData for aya_ebpf::programs::XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        aya_ebpf::programs::XdpContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        aya_ebpf::programs::XdpContext::data_end(self)
    }
}

/// A bounds-checked pointer to a `T` at `offset` bytes into the packet.
#[inline(always)]
pub fn ptr_at<T, C: PacketData>(ctx: &C, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

/// A `T` at `offset` bytes into the packet, bounds-checked, with one load instruction.
///
/// A plain load, not `read_unaligned`: the BPF backend turns an unaligned read into byte
/// loads, shifts and stack spills (the parser was 3x longer that way). Header fields sit
/// at 2-byte-aligned offsets at least, and the verifier accepts unaligned packet loads
/// on the architectures this runs on (x86-64 and arm64 have efficient unaligned access,
/// so it does not ask for strict alignment); it is what C programs do with `struct
/// iphdr *`.
#[inline(always)]
pub fn load<T: Copy, C: PacketData>(ctx: &C, offset: usize) -> Option<T> {
    // SAFETY: ptr_at checked that the whole T lies inside the packet; see above for the
    // alignment.
    ptr_at::<T, C>(ctx, offset).map(|p| unsafe { p.read() })
}

#[inline(always)]
pub fn parse_ipv4<C: PacketData>(ctx: &C) -> Parsed {
    let Some(ethertype) = load::<u16, C>(ctx, 12) else {
        return Parsed::Other;
    };
    if u16::from_be(ethertype) != ETH_P_IP {
        return Parsed::Other;
    }
    let l3_off = ETH_HLEN;
    let Some(ver_ihl) = load::<u8, C>(ctx, l3_off) else {
        return Parsed::Malformed;
    };
    if ver_ihl >> 4 != 4 {
        return Parsed::Malformed;
    }
    let ihl_bytes = ((ver_ihl & 0x0f) as usize) * 4;
    if ihl_bytes < IPV4_MIN_HLEN {
        return Parsed::Malformed;
    }
    // The fixed part of the header must be there.
    if ptr_at::<[u8; IPV4_MIN_HLEN], C>(ctx, l3_off).is_none() {
        return Parsed::Malformed;
    }
    // Inside the 20 bytes just checked (the loads check again; the verifier needs it).
    let (Some(tot_len), Some(ip_id), Some(frag), Some(proto), Some(src), Some(dst)) = (
        load::<u16, C>(ctx, l3_off + 2),
        load::<u16, C>(ctx, l3_off + IP_ID_OFF),
        load::<u16, C>(ctx, l3_off + 6),
        load::<u8, C>(ctx, l3_off + 9),
        load::<u32, C>(ctx, l3_off + IP_SRC_OFF),
        load::<u32, C>(ctx, l3_off + IP_DST_OFF),
    ) else {
        return Parsed::Malformed;
    };
    let tot_len = u16::from_be(tot_len);
    if (tot_len as usize) < ihl_bytes {
        return Parsed::Malformed;
    }
    let frag = u16::from_be(frag);
    let more_fragments = frag & 0x2000 != 0;
    let frag_offset = frag & 0x1fff;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Parsed::Other;
    }
    if frag_offset != 0 {
        return Parsed::LaterFragment(Fragment {
            l3_off,
            tot_len,
            ip_id,
            proto,
            src,
            dst,
        });
    }
    let l4_off = l3_off + ihl_bytes;
    // The options (if any) must be inside the packet too.
    if ptr_at::<u8, C>(ctx, l4_off - 1).is_none() {
        return Parsed::Malformed;
    }
    let (Some(sport), Some(dport)) = (
        load::<u16, C>(ctx, l4_off + L4_SPORT_OFF),
        load::<u16, C>(ctx, l4_off + L4_DPORT_OFF),
    ) else {
        return Parsed::Malformed;
    };
    let (tcp_flags, csum_off) = if proto == PROTO_TCP {
        // Read through the checked pointer: a second check the compiler can prove
        // redundant is dropped, and the verifier then sees an unchecked access.
        let Some(tcp) = ptr_at::<[u8; TCP_MIN_HLEN], C>(ctx, l4_off) else {
            return Parsed::Malformed;
        };
        // SAFETY: the 20 bytes were bounds-checked just above.
        let (doff, flags) = unsafe { ((*tcp)[12], (*tcp)[13]) };
        if (doff >> 4) < 5 {
            return Parsed::Malformed;
        }
        (flags, TCP_CSUM_OFF)
    } else {
        if ptr_at::<[u8; UDP_HLEN], C>(ctx, l4_off).is_none() {
            return Parsed::Malformed;
        }
        (0, UDP_CSUM_OFF)
    };
    Parsed::Packet(Packet {
        l3_off,
        l4_off,
        ihl_bytes,
        tot_len,
        ip_id,
        proto,
        tcp_flags,
        src,
        dst,
        sport,
        dport,
        csum_off,
        first_fragment: more_fragments,
    })
}
