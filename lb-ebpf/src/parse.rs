//! Header parsing, per family (`parse_ipv4`, `parse_ipv6`) into one [`Packet`] that the
//! rest of the datapath reads without asking which family it is. Every header access
//! goes through `ptr_at`, which bounds-checks against `data_end`; nothing here writes to
//! the packet. Addresses come out as the maps hold them (`lb_common::Addr`: 16 bytes, an
//! IPv4 address IPv4-mapped).
//!
//! Rules for bad input (documented in ARCHITECTURE.md):
//! - neither IPv4 nor IPv6, or neither TCP nor UDP (ARP, ICMP, ICMPv6 with neighbour
//!   discovery, ESP, no next header, ...): passed, counted `passed`;
//! - IPv4 header truncated, IHL < 5, version != 4, total length shorter than the header
//!   or longer than the frame (a frame may be longer: Ethernet pads short ones): passed
//!   untouched, counted `passed_malformed` (the kernel's IP stack validates it);
//! - IPv6 header truncated, version != 6, payload length 0 (a jumbogram) or past the
//!   packet, an IPv4-mapped source or destination (the maps' form of IPv4 addresses,
//!   never valid on the wire), an extension header truncated or running past the
//!   payload: passed untouched, counted `passed_malformed`;
//! - an IPv6 chain of more than [`MAX_EXT_HEADERS`] extension headers: passed untouched,
//!   counted `passed_long_ext_chain` (the walk is bounded for the verifier);
//! - L4 header truncated, by the frame or by the IP packet's own length (shorter than 20
//!   bytes of TCP, TCP data offset < 5 or its options past the IP packet's end, 8 bytes
//!   of UDP, a UDP length < 8 or past the IP packet's end where the datagram is not
//!   fragmented), or an IPv6 UDP checksum of 0 (RFC 8200 8.1: no checksum is invalid
//!   there): passed untouched, counted `passed_malformed`: it matches no frontend and is
//!   never rewritten;
//! - a non-first fragment: no L4 header to match, so it is handed on as a `Fragment`
//!   (`frag.rs` translates it like its datagram's first fragment, if that one was
//!   translated and left a note; otherwise it passes, counted `passed_fragment`); a
//!   first fragment is a packet like any other (`Packet::first_fragment` says it is
//!   one: a flow the program carries itself drops it, `drop_fragment`). An IPv6
//!   fragment header followed by anything but TCP or UDP (ICMPv6, more extension
//!   headers, a second fragment header): passed (`passed`), every fragment of the
//!   datagram alike.
use core::mem::size_of;

use lb_common::{ipv4_mapped, is_ipv4_mapped, Addr, PROTO_TCP, PROTO_UDP};

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const IPV4_MIN_HLEN: usize = 20;
pub const IPV6_HLEN: usize = 40;
pub const TCP_MIN_HLEN: usize = 20;
pub const UDP_HLEN: usize = 8;

/// Offsets of fields inside the IPv4 header.
pub const IP_ID_OFF: usize = 4;
pub const IP_CSUM_OFF: usize = 10;
/// Offsets inside the TCP / UDP headers.
pub const L4_SPORT_OFF: usize = 0;
pub const L4_DPORT_OFF: usize = 2;
pub const TCP_CSUM_OFF: usize = 16;
pub const UDP_LEN_OFF: usize = 4;
pub const UDP_CSUM_OFF: usize = 6;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// IPv6 extension headers (RFC 8200 4, RFC 4302) the parser walks to the transport header.
const IPV6_HOPOPTS: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AH: u8 = 51;
const IPV6_DSTOPTS: u8 = 60;

/// Extension headers walked at most before the transport header (a bound the verifier
/// needs). Real traffic carries one or two (hop-by-hop for MLD or jumbograms, a fragment
/// header, destination options); Linux itself sends at most a few. A longer chain is
/// passed untouched and counted `passed_long_ext_chain`.
pub const MAX_EXT_HEADERS: usize = 6;

/// The address family of a packet. Only parsing, the address rewrite (`nat`), the
/// refusal (`refuse`) and the routing (`route`) ask.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// Offset of the source address inside the IP header.
    #[inline(always)]
    pub fn src_off(self) -> usize {
        match self {
            Family::V4 => 12,
            Family::V6 => 8,
        }
    }

    /// Offset of the destination address inside the IP header.
    #[inline(always)]
    pub fn dst_off(self) -> usize {
        match self {
            Family::V4 => 16,
            Family::V6 => 24,
        }
    }
}

/// What the datapath needs to know about a packet. Addresses and ports are in network
/// byte order, as in the packet; addresses in the maps' 16-byte form.
#[derive(Clone, Copy)]
pub struct Packet {
    pub family: Family,
    /// Offset of the IP header.
    pub l3_off: usize,
    /// Offset of the L4 header (IPv4 options and IPv6 extension headers are skipped, not
    /// rejected).
    pub l4_off: usize,
    /// Length of the IP packet from `l3_off` (IPv4 total length; IPv6 40 + payload
    /// length).
    pub l3_len: u32,
    /// The fragments' identification (network byte order; IPv4's 16 bits in the
    /// low-addressed half, as `FragKey::id`): with src, dst and proto, what the fragments
    /// of one datagram share.
    pub frag_id: u32,
    pub proto: u8,
    pub tcp_flags: u8,
    pub src: Addr,
    pub dst: Addr,
    pub sport: u16,
    pub dport: u16,
    /// Offset of the TCP/UDP checksum field, relative to `l4_off`.
    pub csum_off: usize,
    /// This is the first fragment of a fragmented datagram.
    pub first_fragment: bool,
}

impl Packet {
    /// The IP header's length with its options or extension headers.
    #[inline(always)]
    pub fn l3_hlen(&self) -> usize {
        self.l4_off - self.l3_off
    }

    /// Whether the IP header has options (IPv4) or extension headers (IPv6).
    #[inline(always)]
    pub fn has_ip_options(&self) -> bool {
        let plain = match self.family {
            Family::V4 => IPV4_MIN_HLEN,
            Family::V6 => IPV6_HLEN,
        };
        self.l3_hlen() != plain
    }
}

pub enum Parsed {
    /// Neither IPv4 nor IPv6, or not TCP/UDP: nothing for us.
    Other,
    /// A broken IP or L4 header: passed untouched, counted.
    Malformed,
    /// An IPv6 extension-header chain longer than `MAX_EXT_HEADERS`: passed, counted.
    LongExtChain,
    /// A fragment after the first: no L4 header.
    LaterFragment(Fragment),
    /// An ICMP error quoting a TCP or UDP packet (`icmp.rs`).
    IcmpError(crate::icmp::IcmpError),
    Packet(Packet),
}

/// A TCP or UDP fragment after the first (fragment offset > 0): the IP header only.
/// Addresses and the id in network byte order, as in `Packet`.
#[derive(Clone, Copy)]
pub struct Fragment {
    pub family: Family,
    /// Offset of the IP header.
    pub l3_off: usize,
    pub frag_id: u32,
    pub proto: u8,
    pub src: Addr,
    pub dst: Addr,
}

/// The parts of a program context that parsing needs: tc and XDP both provide them.
pub trait PacketData {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// The whole packet's length (tc: also what is not in the linear area yet).
    fn packet_len(&self) -> usize;
    /// Makes the first `upto` bytes directly readable, if the packet has them (tc: pulls
    /// them into the skb's linear area; XDP: always linear). Packet pointers taken
    /// before are invalid after it: every access re-derives them through `ptr_at`.
    fn make_readable(&self, upto: usize);
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
    #[inline(always)]
    fn packet_len(&self) -> usize {
        self.len() as usize
    }
    #[inline(always)]
    fn make_readable(&self, upto: usize) {
        // Fresh loads of the two pointers: reusing values loaded earlier, the compiler
        // re-extends them to 64 bits with shifts, which the verifier refuses on a packet
        // pointer.
        // SAFETY: reading two fields of the program's own skb.
        let linear = unsafe {
            let skb = self.skb.skb;
            let end = core::ptr::read_volatile(&(*skb).data_end) as usize;
            let start = core::ptr::read_volatile(&(*skb).data) as usize;
            (end - start) as u32
        };
        let upto = upto as u32;
        if linear < upto && upto <= self.len() {
            let _ = self.pull_data(upto);
        }
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
    /// Loaded apart from `data`/`data_end` (volatile): the compiler must not learn from a
    /// length check against this that a later `ptr_at` check is redundant and drop it,
    /// since the verifier cannot follow that reasoning (it bounds packet accesses by the
    /// checks against `data_end` only).
    #[inline(always)]
    fn packet_len(&self) -> usize {
        // SAFETY: reading two fields of the program's own context.
        unsafe {
            let md = self.ctx;
            let end = core::ptr::read_volatile(&(*md).data_end) as usize;
            let start = core::ptr::read_volatile(&(*md).data) as usize;
            end - start
        }
    }
    #[inline(always)]
    fn make_readable(&self, _upto: usize) {}
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
/// iphdr *`. (An address, `[u32; 4]`, is four word loads.)
#[inline(always)]
pub fn load<T: Copy, C: PacketData>(ctx: &C, offset: usize) -> Option<T> {
    // SAFETY: ptr_at checked that the whole T lies inside the packet; see above for the
    // alignment.
    ptr_at::<T, C>(ctx, offset).map(|p| unsafe { p.read() })
}

/// Ethernet, then the family's own parser.
#[inline(always)]
pub fn parse<C: PacketData>(ctx: &C) -> Parsed {
    let Some(ethertype) = load::<u16, C>(ctx, 12) else {
        return Parsed::Other;
    };
    match u16::from_be(ethertype) {
        ETH_P_IP => parse_ipv4(ctx),
        ETH_P_IPV6 => parse_ipv6(ctx),
        _ => Parsed::Other,
    }
}

/// The ports, the TCP flags and the checksum's place of the TCP/UDP header at `l4_off`.
struct L4 {
    sport: u16,
    dport: u16,
    tcp_flags: u8,
    csum_off: usize,
    /// A UDP checksum of 0 ("none": allowed in IPv4 only).
    udp_no_csum: bool,
}

/// Reads the TCP/UDP header at `l4_off`; None if it is truncated or malformed. `l3_end`
/// is where the IP packet ends (its total or payload length says so, not the frame,
/// which may carry padding): the header must end before it, the whole TCP header with
/// its options (data offset) too; and for a datagram that is not fragmented
/// (`whole`), the UDP length must be at least its header and at most what is there.
///
/// Every field is read through the one pointer checked for the whole header: separate
/// checks per field let the compiler drop those it proves redundant, and the verifier
/// then meets a load whose bounds it cannot see (or a register set on one path only).
#[inline(always)]
fn parse_l4<C: PacketData>(
    ctx: &C,
    proto: u8,
    l4_off: usize,
    l3_end: usize,
    whole: bool,
) -> Option<L4> {
    if proto == PROTO_TCP {
        if l4_off + TCP_MIN_HLEN > l3_end {
            return None;
        }
        let tcp = ptr_at::<[u8; TCP_MIN_HLEN], C>(ctx, l4_off)?;
        let words = tcp as *const u16;
        // SAFETY: the 20 bytes were bounds-checked just above; 16-bit loads as in `load`.
        let (sport, dport, doff, flags) = unsafe {
            (
                words.add(L4_SPORT_OFF / 2).read(),
                words.add(L4_DPORT_OFF / 2).read(),
                (*tcp)[12],
                (*tcp)[13],
            )
        };
        let hlen = (doff >> 4) as usize * 4;
        if hlen < TCP_MIN_HLEN || l4_off + hlen > l3_end {
            return None;
        }
        Some(L4 {
            sport,
            dport,
            tcp_flags: flags,
            csum_off: TCP_CSUM_OFF,
            udp_no_csum: false,
        })
    } else {
        if l4_off + UDP_HLEN > l3_end {
            return None;
        }
        let udp = ptr_at::<[u8; UDP_HLEN], C>(ctx, l4_off)?;
        let words = udp as *const u16;
        // SAFETY: the 8 bytes were bounds-checked just above; 16-bit loads as in `load`.
        let (sport, dport, len, csum) = unsafe {
            (
                words.add(L4_SPORT_OFF / 2).read(),
                words.add(L4_DPORT_OFF / 2).read(),
                words.add(UDP_LEN_OFF / 2).read(),
                words.add(UDP_CSUM_OFF / 2).read(),
            )
        };
        let len = u16::from_be(len) as usize;
        if whole && (len < UDP_HLEN || l4_off + len > l3_end) {
            return None;
        }
        Some(L4 {
            sport,
            dport,
            tcp_flags: 0,
            csum_off: UDP_CSUM_OFF,
            udp_no_csum: csum == 0,
        })
    }
}

#[inline(always)]
fn parse_ipv4<C: PacketData>(ctx: &C) -> Parsed {
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
        load::<u32, C>(ctx, l3_off + Family::V4.src_off()),
        load::<u32, C>(ctx, l3_off + Family::V4.dst_off()),
    ) else {
        return Parsed::Malformed;
    };
    let tot_len = u16::from_be(tot_len);
    // The packet must hold what its header says it has (the frame may be longer:
    // Ethernet pads short frames); a longer total length means it was cut short.
    if (tot_len as usize) < ihl_bytes || l3_off + tot_len as usize > ctx.packet_len() {
        return Parsed::Malformed;
    }
    let frag = u16::from_be(frag);
    let more_fragments = frag & 0x2000 != 0;
    let frag_offset = frag & 0x1fff;
    if proto == crate::icmp::PROTO_ICMP {
        // The error and its quote must lie inside the packet, not in a frame's padding.
        if frag & 0x3fff != 0
            || ihl_bytes != IPV4_MIN_HLEN
            || (tot_len as usize) < IPV4_MIN_HLEN + crate::icmp::V4_BLOCK
        {
            return Parsed::Other;
        }
        return crate::icmp::parse_v4(
            ctx,
            ipv4_mapped(src),
            ipv4_mapped(dst),
            l3_off + tot_len as usize,
        )
        .map_or(Parsed::Other, Parsed::IcmpError);
    }
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Parsed::Other;
    }
    // The 16-bit id in the low-addressed half of the 32-bit key field.
    let id = ip_id.to_ne_bytes();
    let frag_id = u32::from_ne_bytes([id[0], id[1], 0, 0]);
    let (src, dst) = (ipv4_mapped(src), ipv4_mapped(dst));
    if frag_offset != 0 {
        return Parsed::LaterFragment(Fragment {
            family: Family::V4,
            l3_off,
            frag_id,
            proto,
            src,
            dst,
        });
    }
    let l4_off = l3_off + ihl_bytes;
    // Only what is read: the L4 header's fixed part behind this packet's own IP header
    // (tc: a pull when the linear area is shorter, which copies a cloned skb, such as
    // every TCP segment a local socket sends, so never more than needed).
    let l4_min = if proto == PROTO_TCP {
        TCP_MIN_HLEN
    } else {
        UDP_HLEN
    };
    ctx.make_readable(l4_off + l4_min);
    // The options (if any) must be inside the packet too.
    if ptr_at::<u8, C>(ctx, l4_off - 1).is_none() {
        return Parsed::Malformed;
    }
    let Some(l4) = parse_l4(
        ctx,
        proto,
        l4_off,
        l3_off + tot_len as usize,
        !more_fragments,
    ) else {
        return Parsed::Malformed;
    };
    Parsed::Packet(Packet {
        family: Family::V4,
        l3_off,
        l4_off,
        l3_len: tot_len as u32,
        frag_id,
        proto,
        tcp_flags: l4.tcp_flags,
        src,
        dst,
        sport: l4.sport,
        dport: l4.dport,
        csum_off: l4.csum_off,
        first_fragment: more_fragments,
    })
}

/// Whether `nh` is an extension header the walk steps over.
#[inline(always)]
fn is_ext_header(nh: u8) -> bool {
    matches!(
        nh,
        IPV6_HOPOPTS | IPV6_ROUTING | IPV6_FRAGMENT | IPV6_AH | IPV6_DSTOPTS
    )
}

/// The fixed header, then the extension headers (at most `MAX_EXT_HEADERS`) to the
/// transport header. Every header must lie inside the payload the IPv6 header announces,
/// and that payload inside the packet.
#[inline(always)]
fn parse_ipv6<C: PacketData>(ctx: &C) -> Parsed {
    let l3_off = ETH_HLEN;
    if ptr_at::<[u8; IPV6_HLEN], C>(ctx, l3_off).is_none() {
        return Parsed::Malformed;
    }
    let (Some(ver), Some(payload_len), Some(next), Some(src), Some(dst)) = (
        load::<u8, C>(ctx, l3_off),
        load::<u16, C>(ctx, l3_off + 4),
        load::<u8, C>(ctx, l3_off + 6),
        load::<Addr, C>(ctx, l3_off + Family::V6.src_off()),
        load::<Addr, C>(ctx, l3_off + Family::V6.dst_off()),
    ) else {
        return Parsed::Malformed;
    };
    let l3_len = IPV6_HLEN + u16::from_be(payload_len) as usize;
    // Payload length 0 is a jumbogram (RFC 2675): not walked.
    if ver >> 4 != 6 || l3_len == IPV6_HLEN || l3_off + l3_len > ctx.packet_len() {
        return Parsed::Malformed;
    }
    // IPv4-mapped addresses never appear on the wire (RFC 4291 2.5.5.2; Linux drops
    // them): in the maps they are IPv4 addresses, which such a packet must not reach.
    if is_ipv4_mapped(&src) || is_ipv4_mapped(&dst) {
        return Parsed::Malformed;
    }
    let end = l3_off + l3_len;
    if next == crate::icmp::PROTO_ICMPV6 {
        // The error and its quote must lie inside the payload, not in a frame's padding.
        if l3_len < IPV6_HLEN + crate::icmp::V6_BLOCK {
            return Parsed::Other;
        }
        return crate::icmp::parse_v6(ctx, src, dst, end).map_or(Parsed::Other, Parsed::IcmpError);
    }

    let mut nh = next;
    let mut off = l3_off + IPV6_HLEN;
    // What the fragment header says, if there is one (plain values, not an
    // `Option`: the compiler may spill an undefined payload, which the verifier refuses
    // to read).
    let (mut first_fragment, mut frag_id) = (false, 0u32);
    for _ in 0..MAX_EXT_HEADERS {
        if !is_ext_header(nh) {
            break;
        }
        // Every extension header is at least 8 bytes; read through one checked pointer
        // (see `parse_l4`).
        ctx.make_readable(off + 8);
        let Some(hdr) = ptr_at::<[u8; 8], C>(ctx, off) else {
            return Parsed::Malformed;
        };
        // SAFETY: the 8 bytes were bounds-checked just above; the 16- and 32-bit loads
        // as in `load` (extension headers are 8-byte multiples: aligned as the IPv6
        // header is).
        let (this, len_field, frag_field, id) = unsafe {
            (
                (*hdr)[0],
                (*hdr)[1],
                (hdr as *const u16).add(1).read(),
                (hdr as *const u32).add(1).read(),
            )
        };
        let len = match nh {
            IPV6_FRAGMENT => 8,
            IPV6_AH => (len_field as usize + 2) * 4,
            _ => (len_field as usize + 1) * 8,
        };
        if off + len > end {
            return Parsed::Malformed;
        }
        if nh == IPV6_FRAGMENT {
            // (So a fragment header is the last of the chain: no second one.)
            if this != PROTO_TCP && this != PROTO_UDP {
                return Parsed::Other;
            }
            let field = u16::from_be(frag_field);
            // A later fragment: what follows its header is data, not headers.
            if field >> 3 != 0 {
                return Parsed::LaterFragment(Fragment {
                    family: Family::V6,
                    l3_off,
                    frag_id: id,
                    proto: this,
                    src,
                    dst,
                });
            }
            // M set (offset 0, or it would have returned above). An atomic fragment (M
            // clear, RFC 6946) is a whole datagram.
            first_fragment = field & 1 != 0;
            frag_id = id;
        }
        nh = this;
        off += len;
    }
    if is_ext_header(nh) {
        return Parsed::LongExtChain;
    }
    if nh != PROTO_TCP && nh != PROTO_UDP {
        return Parsed::Other;
    }
    let l4_off = off;
    let l4_min = if nh == PROTO_TCP {
        TCP_MIN_HLEN
    } else {
        UDP_HLEN
    };
    if l4_off + l4_min > end {
        return Parsed::Malformed;
    }
    ctx.make_readable(l4_off + l4_min);
    let Some(l4) = parse_l4(ctx, nh, l4_off, end, !first_fragment) else {
        return Parsed::Malformed;
    };
    // IPv6 makes the UDP checksum mandatory (RFC 8200 8.1): 0 is not "none" here.
    if l4.udp_no_csum {
        return Parsed::Malformed;
    }
    Parsed::Packet(Packet {
        family: Family::V6,
        l3_off,
        l4_off,
        l3_len: l3_len as u32,
        frag_id,
        proto: nh,
        tcp_flags: l4.tcp_flags,
        src,
        dst,
        sport: l4.sport,
        dport: l4.dport,
        csum_off: l4.csum_off,
        first_fragment,
    })
}
