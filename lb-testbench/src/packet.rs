//! Crafted packets for BPF_PROG_TEST_RUN (the kernel tests and the benchmark's
//! per-packet cost), IPv4 and IPv6 (with extension headers and fragment headers), and an
//! independent RFC 1071 checksum to check them with (a valid header or segment sums to
//! 0xffff).

use std::net::{IpAddr, Ipv4Addr};

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0x0a, 0xf4, 0, 0x0b];
pub const HOST_MAC: [u8; 6] = [0xee; 6];

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP: u8 = 1;
pub const ICMPV6: u8 = 58;

/// IPv6 extension headers (RFC 8200).
pub const HOPOPTS: u8 = 0;
pub const ROUTING: u8 = 43;
pub const FRAGMENT: u8 = 44;
pub const DSTOPTS: u8 = 60;
/// Authentication header (RFC 4302).
pub const AH: u8 = 51;
/// "No next header".
pub const NO_NEXT: u8 = 59;

pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;
pub const RST: u8 = 0x04;
pub const FIN: u8 = 0x01;

/// One's-complement sum of 16-bit words.
pub fn sum16(data: &[u8], mut acc: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u16::from_be_bytes([c[0], c[1]]) as u32;
    }
    if let [last] = chunks.remainder() {
        acc += (*last as u32) << 8;
    }
    acc
}

pub fn fold(mut acc: u32) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

pub fn checksum(data: &[u8], acc: u32) -> u16 {
    !fold(sum16(data, acc))
}

/// The sum of the pseudo-header: RFC 793 for IPv4, RFC 8200 8.1 for IPv6.
fn pseudo(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u32 {
    let mut p = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&[0, proto]);
            p.extend_from_slice(&(len as u16).to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&(len as u32).to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, proto]);
        }
        _ => panic!("addresses of two families: {src} -> {dst}"),
    }
    sum16(&p, 0)
}

/// An IPv6 options header (hop-by-hop or destination options) of `units` 8-byte units,
/// padded with one PadN option; its next-header byte is filled in by `Spec::build`.
pub fn options_header(ty: u8, units: usize) -> (u8, Vec<u8>) {
    assert!(units >= 1);
    let mut h = vec![0, (units - 1) as u8, 1, (units * 8 - 4) as u8];
    h.resize(units * 8, 0);
    (ty, h)
}

/// A TCP or UDP packet to build; the family is the addresses' (both the same).
#[derive(Clone, Debug)]
pub struct Spec {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub tcp_flags: u8,
    pub seq: u32,
    pub ack: u32,
    pub payload: Vec<u8>,
    /// IPv4 options (a multiple of 4 bytes).
    pub ip_options: Vec<u8>,
    /// IPv6 extension headers before the transport header, in order: (type, the whole
    /// header; its first byte, the next header, is filled in by `build`).
    pub ext_headers: Vec<(u8, Vec<u8>)>,
    /// IPv6: a fragment header after `ext_headers` with this field (offset in 8-byte
    /// units << 3 | M) and the id `id`.
    pub fragment_header: Option<u16>,
    /// Leave the UDP checksum 0 ("no checksum"; invalid in IPv6).
    pub udp_no_checksum: bool,
    /// IPv4 flags+fragment offset field.
    pub frag: u16,
    /// IPv4 identification (16 bits) or IPv6 fragment identification.
    pub id: u32,
    /// IPv4 TTL / IPv6 hop limit.
    pub hop_limit: u8,
}

impl Spec {
    /// A TCP segment between two addresses of one family (IPv4 or IPv6).
    pub fn tcp(src: &str, sport: u16, dst: &str, dport: u16, flags: u8) -> Self {
        Self::tcp_ip(
            src.parse().unwrap(),
            sport,
            dst.parse().unwrap(),
            dport,
            flags,
        )
    }

    pub fn tcp_v4(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: u8) -> Self {
        Self::tcp_ip(src.into(), sport, dst.into(), dport, flags)
    }

    pub fn tcp_ip(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, flags: u8) -> Self {
        Spec {
            src,
            dst,
            sport,
            dport,
            proto: TCP,
            tcp_flags: flags,
            seq: 1_000_000,
            ack: if flags & ACK != 0 { 2_000_000 } else { 0 },
            payload: Vec::new(),
            ip_options: Vec::new(),
            ext_headers: Vec::new(),
            fragment_header: None,
            udp_no_checksum: false,
            frag: 0x4000,
            id: 0x1234,
            hop_limit: 64,
        }
    }

    pub fn udp(src: &str, sport: u16, dst: &str, dport: u16, payload: &[u8]) -> Self {
        Spec {
            proto: UDP,
            payload: payload.to_vec(),
            tcp_flags: 0,
            ack: 0,
            ..Spec::tcp(src, sport, dst, dport, 0)
        }
    }

    /// The TCP/UDP header and payload, with the checksum over the pseudo-header (none if
    /// `udp_no_checksum`).
    fn segment(&self) -> Vec<u8> {
        let mut l4 = Vec::new();
        l4.extend_from_slice(&self.sport.to_be_bytes());
        l4.extend_from_slice(&self.dport.to_be_bytes());
        if self.proto == TCP {
            l4.extend_from_slice(&self.seq.to_be_bytes());
            l4.extend_from_slice(&self.ack.to_be_bytes());
            l4.extend_from_slice(&[5 << 4, self.tcp_flags]);
            l4.extend_from_slice(&64240u16.to_be_bytes());
            l4.extend_from_slice(&[0, 0, 0, 0]); // csum, urg
        } else {
            l4.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
            l4.extend_from_slice(&[0, 0]);
        }
        l4.extend_from_slice(&self.payload);
        if !(self.proto == UDP && self.udp_no_checksum) {
            let c = checksum(&l4, pseudo(self.src, self.dst, self.proto, l4.len()));
            let off = if self.proto == TCP { 16 } else { 6 };
            let c = if c == 0 && self.proto == UDP {
                0xffff
            } else {
                c
            };
            l4[off..off + 2].copy_from_slice(&c.to_be_bytes());
        }
        l4
    }

    /// Ethernet + IPv4 (+ options) or IPv6 (+ extension headers, + a fragment header) +
    /// TCP/UDP + payload, with correct checksums.
    pub fn build(&self) -> Vec<u8> {
        let l4 = self.segment();
        let (ethertype, ip) = match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => (0x0800u16, self.ipv4_header(src, dst, &l4)),
            (IpAddr::V6(src), IpAddr::V6(dst)) => (0x86dd, self.ipv6_headers(src, dst, &l4)),
            _ => panic!("addresses of two families: {:?}", self),
        };
        let mut pkt = Vec::new();
        pkt.extend_from_slice(&HOST_MAC);
        pkt.extend_from_slice(&CLIENT_MAC);
        pkt.extend_from_slice(&ethertype.to_be_bytes());
        pkt.extend_from_slice(&ip);
        pkt.extend_from_slice(&l4);
        pkt
    }

    /// Ethernet + the IP headers for `proto` + `payload` as it is (no checksum computed):
    /// for packets that are neither TCP nor UDP.
    pub fn build_raw(&self, payload: &[u8]) -> Vec<u8> {
        let (ethertype, ip) = match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => (0x0800u16, self.ipv4_header(src, dst, payload)),
            (IpAddr::V6(src), IpAddr::V6(dst)) => (0x86dd, self.ipv6_headers(src, dst, payload)),
            _ => panic!("addresses of two families: {:?}", self),
        };
        let mut pkt = Vec::new();
        pkt.extend_from_slice(&HOST_MAC);
        pkt.extend_from_slice(&CLIENT_MAC);
        pkt.extend_from_slice(&ethertype.to_be_bytes());
        pkt.extend_from_slice(&ip);
        pkt.extend_from_slice(payload);
        pkt
    }

    fn ipv4_header(&self, src: Ipv4Addr, dst: Ipv4Addr, l4: &[u8]) -> Vec<u8> {
        let ihl = 5 + self.ip_options.len() / 4;
        let mut ip = vec![0x40 | ihl as u8, 0];
        ip.extend_from_slice(&((ihl * 4 + l4.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&(self.id as u16).to_be_bytes());
        ip.extend_from_slice(&self.frag.to_be_bytes());
        ip.extend_from_slice(&[self.hop_limit, self.proto, 0, 0]);
        ip.extend_from_slice(&src.octets());
        ip.extend_from_slice(&dst.octets());
        ip.extend_from_slice(&self.ip_options);
        let c = checksum(&ip, 0);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        ip
    }

    /// The IPv6 header and the extension headers, each naming the next.
    fn ipv6_headers(&self, src: std::net::Ipv6Addr, dst: std::net::Ipv6Addr, l4: &[u8]) -> Vec<u8> {
        let mut types: Vec<u8> = self.ext_headers.iter().map(|(t, _)| *t).collect();
        if self.fragment_header.is_some() {
            types.push(FRAGMENT);
        }
        types.push(self.proto);
        let mut chain = Vec::new();
        for (i, (_, h)) in self.ext_headers.iter().enumerate() {
            let mut h = h.clone();
            h[0] = types[i + 1];
            chain.extend_from_slice(&h);
        }
        if let Some(field) = self.fragment_header {
            chain.extend_from_slice(&[self.proto, 0]);
            chain.extend_from_slice(&field.to_be_bytes());
            chain.extend_from_slice(&self.id.to_be_bytes());
        }
        let mut ip = vec![0x60, 0, 0, 0];
        ip.extend_from_slice(&((chain.len() + l4.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&[types[0], self.hop_limit]);
        ip.extend_from_slice(&src.octets());
        ip.extend_from_slice(&dst.octets());
        ip.extend_from_slice(&chain);
        ip
    }

    /// The datagram `build` makes, cut into fragments of `chunk` bytes of L4 data each (a
    /// multiple of 8; the last may be shorter): the first carries the TCP/UDP header, every
    /// one but the last has MF / M set. IPv4 (RFC 791): each has the header of the whole
    /// datagram (options too) with its own length, offset and checksum. IPv6 (RFC 8200
    /// 4.5): each has the IPv6 header and `ext_headers` (the unfragmentable part), then a
    /// fragment header with `id`.
    pub fn fragments(&self, chunk: usize) -> Vec<Vec<u8>> {
        assert!(
            chunk > 0 && chunk.is_multiple_of(8),
            "fragment data is cut in 8-byte units"
        );
        let whole = self.build();
        if self.src.is_ipv6() {
            assert!(self.fragment_header.is_none(), "fragments() adds its own");
            let chain = v6_chain(&whole);
            let unfrag = chain.l4_off;
            let data = &whole[unfrag..];
            return data
                .chunks(chunk)
                .enumerate()
                .map(|(i, part)| {
                    let mut f = whole[..unfrag].to_vec();
                    f[chain.proto_at] = FRAGMENT;
                    let more = (i + 1) * chunk < data.len();
                    let field = ((i * chunk / 8) as u16) << 3 | u16::from(more);
                    f.extend_from_slice(&[self.proto, 0]);
                    f.extend_from_slice(&field.to_be_bytes());
                    f.extend_from_slice(&self.id.to_be_bytes());
                    f.extend_from_slice(part);
                    let payload = (f.len() - 54) as u16;
                    f[18..20].copy_from_slice(&payload.to_be_bytes());
                    f
                })
                .collect();
        }
        let l3 = 14 + (whole[14] & 0x0f) as usize * 4;
        let data = &whole[l3..];
        data.chunks(chunk)
            .enumerate()
            .map(|(i, part)| {
                let mut f = whole[..l3].to_vec();
                let more = (i + 1) * chunk < data.len();
                let field = (i * chunk / 8) as u16 | if more { 0x2000 } else { 0 };
                f[16..18].copy_from_slice(&((l3 - 14 + part.len()) as u16).to_be_bytes());
                f[20..22].copy_from_slice(&field.to_be_bytes());
                set_ip_checksum(&mut f);
                f.extend_from_slice(part);
                f
            })
            .collect()
    }
}

/// Where an IPv6 frame's headers are, from walking its extension headers (hop-by-hop,
/// routing, destination options, authentication, fragment): the transport header (for a fragment after
/// the first: its data), its protocol, and the fragment header if there is one.
#[derive(Debug)]
pub struct V6Chain {
    /// Offset of the transport header (or of a later fragment's data).
    pub l4_off: usize,
    /// The last next-header value: the transport protocol.
    pub proto: u8,
    /// Offset of the byte that names the header at `l4_off` (or the fragment header).
    pub proto_at: usize,
    /// The fragment header, if any: its offset, and the offset of the byte that names it.
    pub fragment: Option<(usize, usize)>,
}

pub fn v6_chain(f: &[u8]) -> V6Chain {
    let (mut at, mut off, mut fragment) = (14 + 6, 54, None);
    loop {
        match f[at] {
            HOPOPTS | ROUTING | DSTOPTS => {
                at = off;
                off += (f[off + 1] as usize + 1) * 8;
            }
            AH => {
                at = off;
                off += (f[off + 1] as usize + 2) * 4;
            }
            FRAGMENT if fragment.is_none() => {
                fragment = Some((off, at));
                let later = u16::from_be_bytes([f[off + 2], f[off + 3]]) >> 3 != 0;
                at = off;
                off += 8;
                if later {
                    break;
                }
            }
            _ => break,
        }
    }
    V6Chain {
        l4_off: off,
        proto: f[at],
        proto_at: at,
        fragment,
    }
}

fn is_ipv6(frame: &[u8]) -> bool {
    frame[12..14] == [0x86, 0xdd]
}

/// Recomputes the IPv4 header checksum of a frame.
pub fn set_ip_checksum(frame: &mut [u8]) {
    let l3 = 14 + (frame[14] & 0x0f) as usize * 4;
    frame[24..26].copy_from_slice(&[0, 0]);
    let c = checksum(&frame[14..l3], 0);
    frame[24..26].copy_from_slice(&c.to_be_bytes());
}

/// What a receiver reassembles from `frames`, the fragments of one datagram in order:
/// the first fragment's header (no fragment bits or header, the whole length) and every
/// fragment's data. Panics if the fragments do not all share the source, destination,
/// id and protocol (a receiver would never put them together) or leave a gap.
pub fn reassemble(frames: &[Vec<u8>]) -> Vec<u8> {
    if is_ipv6(&frames[0]) {
        return reassemble_v6(frames);
    }
    let identity = |f: &[u8]| (f[26..34].to_vec(), f[18..20].to_vec(), f[23]);
    let l3 = 14 + (frames[0][14] & 0x0f) as usize * 4;
    let mut whole = frames[0][..l3].to_vec();
    for f in frames {
        assert_eq!(
            identity(f),
            identity(&frames[0]),
            "fragments of two datagrams (source, destination, id or protocol differ)"
        );
        let fl3 = 14 + (f[14] & 0x0f) as usize * 4;
        let offset = (u16::from_be_bytes([f[20], f[21]]) & 0x1fff) as usize * 8;
        assert_eq!(offset, whole.len() - l3, "a gap or an overlap");
        let tot = u16::from_be_bytes([f[16], f[17]]) as usize;
        whole.extend_from_slice(&f[fl3..14 + tot]);
    }
    let tot = (whole.len() - 14) as u16;
    whole[16..18].copy_from_slice(&tot.to_be_bytes());
    whole[20..22].copy_from_slice(&[0, 0]);
    set_ip_checksum(&mut whole);
    whole
}

fn reassemble_v6(frames: &[Vec<u8>]) -> Vec<u8> {
    let identity = |f: &[u8]| {
        let (frag, _) = v6_chain(f).fragment.expect("a fragment header");
        (f[22..54].to_vec(), f[frag], f[frag + 4..frag + 8].to_vec())
    };
    let (frag0, named_at) = v6_chain(&frames[0]).fragment.expect("a fragment header");
    let mut whole = frames[0][..frag0].to_vec();
    // The byte that named the fragment header names the transport header now.
    whole[named_at] = frames[0][frag0];
    for f in frames {
        assert_eq!(
            identity(f),
            identity(&frames[0]),
            "fragments of two datagrams (source, destination, id or protocol differ)"
        );
        let (frag, _) = v6_chain(f).fragment.unwrap();
        let offset = (u16::from_be_bytes([f[frag + 2], f[frag + 3]]) >> 3) as usize * 8;
        assert_eq!(offset, whole.len() - frag0, "a gap or an overlap");
        let end = 54 + u16::from_be_bytes([f[18], f[19]]) as usize;
        whole.extend_from_slice(&f[frag + 8..end]);
    }
    let payload = (whole.len() - 54) as u16;
    whole[18..20].copy_from_slice(&payload.to_be_bytes());
    whole
}

/// The source address of an IPv4 or IPv6 frame (also a fragment after the first).
pub fn src_of(pkt: &[u8]) -> IpAddr {
    if is_ipv6(pkt) {
        IpAddr::from(<[u8; 16]>::try_from(&pkt[22..38]).unwrap())
    } else {
        IpAddr::from(<[u8; 4]>::try_from(&pkt[26..30]).unwrap())
    }
}

/// Asserts that the IPv4 header checksum is right (a fragment after the first has no
/// L4 header to check). IPv6 has no header checksum: nothing to check.
pub fn assert_ip_checksum(pkt: &[u8]) {
    if is_ipv6(pkt) {
        return;
    }
    let ihl = (pkt[14] & 0x0f) as usize * 4;
    assert_eq!(
        fold(sum16(&pkt[14..14 + ihl], 0)),
        0xffff,
        "IPv4 header checksum is wrong"
    );
}

/// A parsed view of an output packet (IPv4 or IPv6).
#[derive(Debug)]
pub struct View {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// The transport protocol (IPv6: after the extension headers).
    pub proto: u8,
    /// The IP header's length: IPv4 with its options, IPv6 with its extension headers.
    pub ihl: usize,
    pub l4: Vec<u8>,
    pub sport: u16,
    pub dport: u16,
}

pub fn view(pkt: &[u8]) -> View {
    let (src, dst, proto, ihl, end) = if is_ipv6(pkt) {
        let chain = v6_chain(pkt);
        let addr = |at: usize| IpAddr::from(<[u8; 16]>::try_from(&pkt[at..at + 16]).unwrap());
        let end = 54 + u16::from_be_bytes([pkt[18], pkt[19]]) as usize;
        (addr(22), addr(38), chain.proto, chain.l4_off - 14, end)
    } else {
        let ip = &pkt[14..];
        let addr = |at: usize| IpAddr::from(<[u8; 4]>::try_from(&ip[at..at + 4]).unwrap());
        let tot = u16::from_be_bytes([ip[2], ip[3]]) as usize;
        let ihl = (ip[0] & 0x0f) as usize * 4;
        (addr(12), addr(16), ip[9], ihl, 14 + tot)
    };
    let l4 = pkt[14 + ihl..end].to_vec();
    View {
        src,
        dst,
        proto,
        ihl,
        sport: u16::from_be_bytes([l4[0], l4[1]]),
        dport: u16::from_be_bytes([l4[2], l4[3]]),
        l4,
    }
}

/// Asserts that the IPv4 header checksum (IPv6 has none) and the TCP/UDP/ICMP/ICMPv6
/// checksum are right. An IPv6 UDP checksum of 0 is wrong (RFC 8200 8.1).
pub fn assert_checksums(pkt: &[u8]) {
    if !is_ipv6(pkt) {
        let ihl = (pkt[14] & 0x0f) as usize * 4;
        assert_eq!(
            fold(sum16(&pkt[14..14 + ihl], 0)),
            0xffff,
            "IPv4 header checksum is wrong"
        );
    }
    let v = view(pkt);
    let with_pseudo = |proto| fold(sum16(&v.l4, pseudo(v.src, v.dst, proto, v.l4.len())));
    match v.proto {
        TCP => assert_eq!(with_pseudo(TCP), 0xffff, "TCP checksum is wrong"),
        UDP => {
            if v.l4[6..8] != [0, 0] {
                assert_eq!(with_pseudo(UDP), 0xffff, "UDP checksum is wrong")
            } else {
                assert!(v.src.is_ipv4(), "an IPv6 UDP checksum of 0");
            }
        }
        ICMP if v.src.is_ipv4() => {
            assert_eq!(fold(sum16(&v.l4, 0)), 0xffff, "ICMP checksum is wrong")
        }
        ICMPV6 if v.src.is_ipv6() => {
            assert_eq!(with_pseudo(ICMPV6), 0xffff, "ICMPv6 checksum is wrong")
        }
        p => panic!("unexpected protocol {p}"),
    }
}

/// `pkt` with its destination (or source) rewritten and checksums recomputed from
/// scratch: what a correct DNAT (or reverse NAT) must produce, byte for byte.
pub fn rewritten(spec: &Spec, dst: Option<(&str, u16)>, src: Option<(&str, u16)>) -> Vec<u8> {
    let mut s = spec.clone();
    if let Some((a, p)) = dst {
        s.dst = a.parse().unwrap();
        s.dport = p;
    }
    if let Some((a, p)) = src {
        s.src = a.parse().unwrap();
        s.sport = p;
    }
    s.build()
}

/// Ethernet + IPv6 (+ `ext_headers`) + an ICMPv6 message (`ty`, `code`, then `body`)
/// with its checksum (pseudo-header included), hop limit 255 as neighbour discovery has.
pub fn icmpv6(
    src: &str,
    dst: &str,
    ext_headers: &[(u8, Vec<u8>)],
    ty: u8,
    code: u8,
    body: &[u8],
) -> Vec<u8> {
    let spec = Spec {
        proto: ICMPV6,
        hop_limit: 255,
        ext_headers: ext_headers.to_vec(),
        ..Spec::tcp(src, 0, dst, 0, 0)
    };
    let mut msg = vec![ty, code, 0, 0];
    msg.extend_from_slice(body);
    let c = checksum(&msg, pseudo(spec.src, spec.dst, ICMPV6, msg.len()));
    msg[2..4].copy_from_slice(&c.to_be_bytes());
    spec.build_raw(&msg)
}

/// An ICMP error (IPv4, or ICMPv6 when the addresses are IPv6) from `src` to `dst`:
/// `ty`, `code`, the 4 bytes after the checksum (unused, or the next hop's MTU), then the
/// first `quote` bytes of the IP packet in `frame` (an Ethernet frame), as a router or a
/// host quotes it; checksums correct.
pub fn icmp_error(
    src: &str,
    dst: &str,
    ty: u8,
    code: u8,
    rest: [u8; 4],
    frame: &[u8],
    quote: usize,
) -> Vec<u8> {
    let ip = &frame[14..];
    let quoted = &ip[..quote.min(ip.len())];
    let mut msg = vec![ty, code, 0, 0];
    msg.extend_from_slice(&rest);
    msg.extend_from_slice(quoted);
    let v6 = src.contains(':');
    let proto = if v6 { ICMPV6 } else { 1 };
    let spec = Spec {
        proto,
        hop_limit: 64,
        ..Spec::tcp(src, 0, dst, 0, 0)
    };
    let acc = if v6 {
        pseudo(spec.src, spec.dst, ICMPV6, msg.len())
    } else {
        0
    };
    let c = checksum(&msg, acc);
    msg[2..4].copy_from_slice(&c.to_be_bytes());
    spec.build_raw(&msg)
}

/// Checks an ICMP error frame built as [`icmp_error`] builds them: the outer IPv4 header's
/// checksum, the ICMP (or ICMPv6, with its pseudo-header) checksum over the message, and
/// the quoted IPv4 header's own checksum.
pub fn assert_icmp_checksums(frame: &[u8]) {
    let v6 = frame[12..14] == [0x86, 0xdd];
    let (hlen, msg) = if v6 {
        (40, &frame[14 + 40..])
    } else {
        let ihl = (frame[14] & 0x0f) as usize * 4;
        assert_eq!(
            fold(sum16(&frame[14..14 + ihl], 0)),
            0xffff,
            "outer IPv4 header checksum"
        );
        (ihl, &frame[14 + ihl..])
    };
    let acc = if v6 {
        let src = IpAddr::from(<[u8; 16]>::try_from(&frame[22..38]).unwrap());
        let dst = IpAddr::from(<[u8; 16]>::try_from(&frame[38..54]).unwrap());
        pseudo(src, dst, ICMPV6, msg.len())
    } else {
        0
    };
    assert_eq!(
        fold(sum16(msg, acc)),
        0xffff,
        "ICMP checksum ({} bytes after {hlen})",
        msg.len()
    );
    let inner = &msg[8..];
    if inner[0] >> 4 == 4 {
        let ihl = (inner[0] & 0x0f) as usize * 4;
        assert_eq!(
            fold(sum16(&inner[..ihl], 0)),
            0xffff,
            "quoted IPv4 header checksum"
        );
    }
}

/// Ethernet + IPv4 + TCP with correct checksums (no options, no payload).
pub fn tcp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: u8) -> Vec<u8> {
    Spec::tcp_v4(src, sport, dst, dport, flags).build()
}

/// Destination address and port of a TCP/UDP frame (after the program rewrote it).
pub fn dst_of(pkt: &[u8]) -> Option<(Ipv4Addr, u16)> {
    let ihl = (*pkt.get(14)? & 0x0f) as usize * 4;
    let p = 14 + ihl;
    let port = pkt.get(p + 2..p + 4)?;
    let ip = pkt.get(30..34)?;
    Some((
        Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]),
        u16::from_be_bytes([port[0], port[1]]),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_checksums_verify_and_dst_reads_back() {
        let a = Ipv4Addr::new(10, 244, 0, 11);
        let b = Ipv4Addr::new(10, 96, 0, 10);
        let p = tcp(a, 40000, b, 80, SYN);
        assert_eq!(p.len(), 54);
        assert_checksums(&p);
        assert_eq!(dst_of(&p), Some((b, 80)));
        assert_eq!(dst_of(&p[..36]), None);
    }

    #[test]
    fn fragments_reassemble_to_the_datagram() {
        let mut s = Spec::udp("10.244.0.12", 5353, "10.244.0.11", 50000, &[7u8; 1200]);
        s.frag = 0;
        let frames = s.fragments(512);
        assert_eq!(frames.len(), 3);
        let fields: Vec<u16> = frames
            .iter()
            .map(|f| u16::from_be_bytes([f[20], f[21]]))
            .collect();
        assert_eq!(fields, [0x2000, 0x2000 | 64, 128]);
        for f in &frames {
            assert_ip_checksum(f);
        }
        assert_eq!(frames[2].len(), 14 + 20 + 1208 - 1024);
        assert_eq!(reassemble(&frames), s.build());
    }

    #[test]
    fn ipv6_checksums_match_a_known_value_and_extension_headers_are_walked() {
        // fd00::1 -> fd00::2, UDP 4096 -> 8192, "hi": the checksum summed word by word
        // here, apart from the builder's code.
        let s = Spec::udp("fd00::1", 4096, "fd00::2", 8192, b"hi");
        let f = s.build();
        assert_eq!(f.len(), 14 + 40 + 8 + 2);
        assert_eq!(&f[12..14], &[0x86, 0xdd]);
        assert_eq!(u16::from_be_bytes([f[18], f[19]]), 10, "payload length");
        assert_eq!(f[20], UDP);
        let expected = {
            // pseudo: src, dst, len 10, nh 17; segment: ports, len, 0, "hi".
            let words: [u32; 12] = [
                0xfd00, 0x0001, 0xfd00, 0x0002, 10, 17, 4096, 8192, 10, 0, 0x6869, 0,
            ];
            let mut acc: u32 = words.iter().sum();
            while acc >> 16 != 0 {
                acc = (acc & 0xffff) + (acc >> 16);
            }
            !(acc as u16)
        };
        assert_eq!(u16::from_be_bytes([f[60], f[61]]), expected);
        assert_checksums(&f);

        let mut t = Spec::tcp("fd00::1", 40000, "fd00::2", 80, SYN);
        t.ext_headers = vec![options_header(HOPOPTS, 1), options_header(DSTOPTS, 2)];
        let f = t.build();
        assert_eq!(f[20], HOPOPTS);
        assert_eq!((f[54], f[55]), (DSTOPTS, 0));
        assert_eq!((f[62], f[63]), (TCP, 1));
        let v = view(&f);
        assert_eq!(
            (v.proto, v.ihl, v.sport, v.dport),
            (TCP, 40 + 8 + 16, 40000, 80)
        );
        assert_eq!(v.dst.to_string(), "fd00::2");
        assert_checksums(&f);
    }

    #[test]
    fn ipv6_fragments_reassemble_to_the_datagram() {
        let mut s = Spec::udp("fd00::12", 5353, "fd00::11", 50000, &[7u8; 1200]);
        s.id = 0xdead_beef;
        s.ext_headers = vec![options_header(DSTOPTS, 1)];
        let frames = s.fragments(512);
        assert_eq!(frames.len(), 3);
        for (i, f) in frames.iter().enumerate() {
            let chain = v6_chain(f);
            let (frag, named_at) = chain.fragment.unwrap();
            assert_eq!((frag, named_at, f[named_at]), (62, 54, FRAGMENT));
            assert_eq!(f[frag], UDP);
            let field = u16::from_be_bytes([f[frag + 2], f[frag + 3]]);
            assert_eq!(field >> 3, (i * 64) as u16, "offset in 8-byte units");
            assert_eq!(field & 1, u16::from(i < 2), "M");
            assert_eq!(&f[frag + 4..frag + 8], &0xdead_beefu32.to_be_bytes());
        }
        assert_eq!(reassemble(&frames), s.build());
    }
}
