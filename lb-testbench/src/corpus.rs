//! A corpus of malformed and adversarial frames for the kernel tests, and a reference of
//! what the datapath must make of each, written apart from its parser.
//!
//! The corpus is deterministic: valid TCP, UDP and ICMP error frames of both families to
//! a Service's frontends (and the replies of their flows), cut at every offset, with
//! every IHL, total or payload lengths smaller and larger than the frame, every TCP data
//! offset and flag combination, UDP lengths that disagree, fragments with odd offsets,
//! IPv6 extension-header chains with lying lengths, ICMP errors whose quote is cut
//! short; then random byte changes of those from a seeded generator.
//!
//! [`classify`] is the rule of ARCHITECTURE.md ("Bad input") as a plain Rust function of
//! the frame's bytes: a TCP/UDP packet the datapath may match (and so rewrite), an ICMP
//! error it may translate, a later fragment, or something it must pass untouched and
//! count (`passed`, `passed_malformed`, `passed_long_ext_chain`). [`Rewrite`] says which
//! bytes a translation changes and which checksums it must keep right; [`check_rewrite`]
//! compares a program's output with it.
use std::{net::IpAddr, ops::Range};

use crate::packet::{fold, sum16, Spec, ACK, AH, DSTOPTS, FRAGMENT, HOPOPTS, ROUTING, SYN};

/// xorshift64: deterministic, for a corpus that is the same on every run.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// A TCP/UDP packet as the rules read it: what the datapath may match against its maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct L4Packet {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    /// The first fragment of a fragmented datagram (its `frag` key for the later ones).
    pub first_fragment: bool,
    pub frag: FragKey,
    pub l4_off: usize,
    /// Where the IP packet ends (its total or payload length), in the frame.
    pub l3_end: usize,
}

/// What the fragments of one datagram share.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct FragKey {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub id: u32,
    pub proto: u8,
}

/// An ICMP or ICMPv6 error quoting a TCP or UDP packet, at the fixed offsets the
/// datapath reads (outer and quoted header without options or extension headers).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IcmpQuote {
    pub outer_src: IpAddr,
    pub outer_dst: IpAddr,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    pub l3_end: usize,
}

/// What the documented rules make of a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Class {
    /// Not for the dataplane: passed untouched, `passed`.
    Other,
    /// A broken header: passed untouched, `passed_malformed`.
    Malformed,
    /// More than 6 IPv6 extension headers: `passed_long_ext_chain`.
    LongExtChain,
    /// A fragment after the first: only a note of its first may translate it.
    LaterFragment(FragKey),
    Packet(L4Packet),
    IcmpError(IcmpQuote),
}

const TCP: u8 = 6;
const UDP: u8 = 17;

fn be16(f: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([f[at], f[at + 1]])
}

fn addr(f: &[u8], at: usize, v6: bool) -> IpAddr {
    if v6 {
        IpAddr::from(<[u8; 16]>::try_from(&f[at..at + 16]).unwrap())
    } else {
        IpAddr::from(<[u8; 4]>::try_from(&f[at..at + 4]).unwrap())
    }
}

fn mapped(a: IpAddr) -> bool {
    matches!(a, IpAddr::V6(a) if a.to_ipv4_mapped().is_some())
}

/// The TCP/UDP header at `l4` of a packet ending at `end`: ports, if the rules take it.
fn l4_header(f: &[u8], proto: u8, l4: usize, end: usize, whole: bool) -> Option<(u16, u16)> {
    if proto == TCP {
        let hlen = (f.get(l4 + 12)? >> 4) as usize * 4;
        if l4 + 20 > end || hlen < 20 || l4 + hlen > end {
            return None;
        }
    } else {
        if l4 + 8 > end {
            return None;
        }
        let len = be16(f, l4 + 4) as usize;
        if whole && (len < 8 || l4 + len > end) {
            return None;
        }
    }
    Some((be16(f, l4), be16(f, l4 + 2)))
}

/// The documented rules (ARCHITECTURE.md, "Bad input"), on a frame's bytes.
pub fn classify(f: &[u8]) -> Class {
    if f.len() < 14 {
        return Class::Other;
    }
    match be16(f, 12) {
        0x0800 => classify_v4(f),
        0x86dd => classify_v6(f),
        _ => Class::Other,
    }
}

fn classify_v4(f: &[u8]) -> Class {
    if f.len() < 14 + 20 || f[14] >> 4 != 4 {
        return Class::Malformed;
    }
    let ihl = (f[14] & 0x0f) as usize * 4;
    let tot = be16(f, 16) as usize;
    if ihl < 20 || tot < ihl || 14 + tot > f.len() {
        return Class::Malformed;
    }
    let end = 14 + tot;
    let frag = be16(f, 20);
    let proto = f[23];
    let (src, dst) = (addr(f, 26, false), addr(f, 30, false));
    if proto == 1 {
        if frag & 0x3fff != 0 || ihl != 20 || tot < 20 + 36 {
            return Class::Other;
        }
        let q = 14 + 20 + 8;
        let (ty, inner_proto) = (f[34], f[q + 9]);
        if !matches!(ty, 3 | 11 | 12) || f[q] != 0x45 || (inner_proto != TCP && inner_proto != UDP)
        {
            return Class::Other;
        }
        return Class::IcmpError(IcmpQuote {
            outer_src: src,
            outer_dst: dst,
            src: addr(f, q + 12, false),
            dst: addr(f, q + 16, false),
            proto: inner_proto,
            sport: be16(f, q + 20),
            dport: be16(f, q + 22),
            l3_end: end,
        });
    }
    if proto != TCP && proto != UDP {
        return Class::Other;
    }
    let key = FragKey {
        src,
        dst,
        id: (be16(f, 18) as u32) << 16,
        proto,
    };
    if frag & 0x1fff != 0 {
        return Class::LaterFragment(key);
    }
    let more = frag & 0x2000 != 0;
    let l4 = 14 + ihl;
    match l4_header(f, proto, l4, end, !more) {
        None => Class::Malformed,
        Some((sport, dport)) => Class::Packet(L4Packet {
            src,
            dst,
            proto,
            sport,
            dport,
            first_fragment: more,
            frag: key,
            l4_off: l4,
            l3_end: end,
        }),
    }
}

fn classify_v6(f: &[u8]) -> Class {
    if f.len() < 14 + 40 || f[14] >> 4 != 6 {
        return Class::Malformed;
    }
    let plen = be16(f, 18) as usize;
    let end = 14 + 40 + plen;
    if plen == 0 || end > f.len() {
        return Class::Malformed;
    }
    let (src, dst) = (addr(f, 22, true), addr(f, 38, true));
    if mapped(src) || mapped(dst) {
        return Class::Malformed;
    }
    let mut nh = f[20];
    if nh == 58 {
        if 40 + plen < 40 + 56 {
            return Class::Other;
        }
        let q = 14 + 40 + 8;
        let inner_proto = f[q + 6];
        let (isrc, idst) = (addr(f, q + 8, true), addr(f, q + 24, true));
        if !matches!(f[54], 1..=4)
            || f[q] >> 4 != 6
            || (inner_proto != TCP && inner_proto != UDP)
            || mapped(isrc)
            || mapped(idst)
        {
            return Class::Other;
        }
        return Class::IcmpError(IcmpQuote {
            outer_src: src,
            outer_dst: dst,
            src: isrc,
            dst: idst,
            proto: inner_proto,
            sport: be16(f, q + 40),
            dport: be16(f, q + 42),
            l3_end: end,
        });
    }
    let ext = |nh: u8| matches!(nh, HOPOPTS | ROUTING | FRAGMENT | AH | DSTOPTS);
    let mut off = 14 + 40;
    let (mut first, mut id) = (false, 0u32);
    for _ in 0..6 {
        if !ext(nh) {
            break;
        }
        if off + 8 > f.len() {
            return Class::Malformed;
        }
        let len = match nh {
            FRAGMENT => 8,
            AH => (f[off + 1] as usize + 2) * 4,
            _ => (f[off + 1] as usize + 1) * 8,
        };
        if off + len > end {
            return Class::Malformed;
        }
        let this = f[off];
        if nh == FRAGMENT {
            if this != TCP && this != UDP {
                return Class::Other;
            }
            let field = be16(f, off + 2);
            // (The key's id as the datapath holds it: the 4 bytes in network order.)
            let fid = u32::from_ne_bytes(f[off + 4..off + 8].try_into().unwrap());
            if field >> 3 != 0 {
                return Class::LaterFragment(FragKey {
                    src,
                    dst,
                    id: fid,
                    proto: this,
                });
            }
            first = field & 1 != 0;
            id = fid;
        }
        nh = this;
        off += len;
    }
    if ext(nh) {
        return Class::LongExtChain;
    }
    if nh != TCP && nh != UDP {
        return Class::Other;
    }
    match l4_header(f, nh, off, end, !first) {
        // IPv6 makes the UDP checksum mandatory.
        Some(_) if nh == UDP && be16(f, off + 6) == 0 => Class::Malformed,
        None => Class::Malformed,
        Some((sport, dport)) => Class::Packet(L4Packet {
            src,
            dst,
            proto: nh,
            sport,
            dport,
            first_fragment: first,
            frag: FragKey {
                src,
                dst,
                id,
                proto: nh,
            },
            l4_off: off,
            l3_end: end,
        }),
    }
}

/// A checksum a rewrite must keep right: the 16-bit field at `at`, summed over `range`
/// of the frame and, if given, a pseudo-header of the addresses at `pseudo` (source and
/// destination offsets, address length). A correct incremental update keeps the sum the
/// same (a wrong checksum stays exactly as wrong), whatever the rest of the packet holds.
#[derive(Clone, Debug)]
pub struct Csum {
    pub at: usize,
    pub range: Range<usize>,
    pub pseudo: Option<(usize, usize, usize)>,
    /// A UDP checksum: 0 means none, and must stay 0 (a non-zero one must not become 0).
    pub udp: bool,
}

/// What a translation changes: these fields to these bytes, and nothing else but the
/// checksums, which must keep their sums.
#[derive(Clone, Debug, Default)]
pub struct Rewrite {
    pub fields: Vec<(usize, Vec<u8>)>,
    pub csums: Vec<Csum>,
}

fn octets(a: IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn residue(f: &[u8], c: &Csum) -> u16 {
    let mut acc = sum16(&f[c.range.clone()], 0);
    if let Some((s, d, n)) = c.pseudo {
        acc = sum16(&f[s..s + n], acc);
        acc = sum16(&f[d..d + n], acc);
    }
    // 0 and 0xffff are the same number in one's complement.
    match fold(acc) {
        0 => 0xffff,
        r => r,
    }
}

impl Rewrite {
    /// A TCP/UDP packet's destination (`dst: true`, DNAT) or source (reverse NAT) address
    /// and port set to `to`, with the IPv4 header and L4 checksums.
    pub fn l4(f: &[u8], p: &L4Packet, dst: bool, to: (IpAddr, u16)) -> Self {
        let v6 = p.src.is_ipv6();
        let (src_off, dst_off, alen) = if v6 { (22, 38, 16) } else { (26, 30, 4) };
        let mut r = Rewrite::default();
        r.fields
            .push((if dst { dst_off } else { src_off }, octets(to.0)));
        r.fields.push((
            p.l4_off + if dst { 2 } else { 0 },
            to.1.to_be_bytes().to_vec(),
        ));
        if !v6 {
            r.csums.push(Csum {
                at: 24,
                range: 14..14 + (f[14] & 0x0f) as usize * 4,
                pseudo: None,
                udp: false,
            });
        }
        r.csums.push(Csum {
            at: p.l4_off + if p.proto == TCP { 16 } else { 6 },
            range: p.l4_off..p.l3_end,
            pseudo: Some((src_off, dst_off, alen)),
            udp: p.proto == UDP,
        });
        r
    }

    /// A later fragment's destination or source address set to `to` (its IPv4 header
    /// checksum kept right; the L4 checksum is in the first fragment).
    pub fn fragment(f: &[u8], dst: bool, to: IpAddr) -> Self {
        let v6 = to.is_ipv6();
        let off = match (v6, dst) {
            (false, false) => 26,
            (false, true) => 30,
            (true, false) => 22,
            (true, true) => 38,
        };
        let mut r = Rewrite {
            fields: vec![(off, octets(to))],
            csums: Vec::new(),
        };
        if !v6 {
            r.csums.push(Csum {
                at: 24,
                range: 14..14 + (f[14] & 0x0f) as usize * 4,
                pseudo: None,
                udp: false,
            });
        }
        r
    }

    /// An ICMP error's quote translated: toward a backend (`to_backend`: the quote's
    /// source address and port become `to`, and the error's destination too if it was
    /// the quote's source) or toward a client (the quote's destination, and the error's
    /// source if it was the quote's destination). Every checksum involved keeps its sum:
    /// the outer IPv4 header's, the ICMP one (ICMPv6: with its pseudo-header), the quoted
    /// IPv4 header's, and the quoted L4 one where the quote holds it.
    pub fn icmp(e: &IcmpQuote, to_backend: bool, to: (IpAddr, u16)) -> Self {
        let v6 = e.src.is_ipv6();
        let (hl, src_off, dst_off, alen) = if v6 { (40, 8, 24, 16) } else { (20, 12, 16, 4) };
        let icmp = 14 + hl;
        let q = icmp + 8;
        let ql4 = q + hl;
        let mut r = Rewrite::default();
        if to_backend {
            r.fields.push((q + src_off, octets(to.0)));
            r.fields.push((ql4, to.1.to_be_bytes().to_vec()));
            if e.outer_dst == e.src {
                r.fields.push((14 + dst_off, octets(to.0)));
            }
        } else {
            r.fields.push((q + dst_off, octets(to.0)));
            r.fields.push((ql4 + 2, to.1.to_be_bytes().to_vec()));
            if e.outer_src == e.dst {
                r.fields.push((14 + src_off, octets(to.0)));
            }
        }
        if !v6 {
            r.csums.push(Csum {
                at: 24,
                range: 14..34,
                pseudo: None,
                udp: false,
            });
            r.csums.push(Csum {
                at: q + 10,
                range: q..q + 20,
                pseudo: None,
                udp: false,
            });
        }
        r.csums.push(Csum {
            at: icmp + 2,
            range: icmp..e.l3_end,
            pseudo: v6.then_some((14 + src_off, 14 + dst_off, alen)),
            udp: false,
        });
        let l4_csum = ql4 + if e.proto == TCP { 16 } else { 6 };
        if l4_csum + 2 <= e.l3_end {
            r.csums.push(Csum {
                at: l4_csum,
                range: ql4..e.l3_end,
                pseudo: Some((q + src_off, q + dst_off, alen)),
                udp: e.proto == UDP,
            });
        }
        r
    }
}

/// Whether `after` is `before` rewritten as `r` says: the fields hold their new bytes,
/// every checksum kept its sum (a UDP checksum of 0 stayed 0), and no other byte moved.
pub fn check_rewrite(before: &[u8], after: &[u8], r: &Rewrite) -> Result<(), String> {
    if before.len() != after.len() {
        return Err(format!("length {} became {}", before.len(), after.len()));
    }
    let mut may_change = vec![false; before.len()];
    for (at, bytes) in &r.fields {
        if after[*at..at + bytes.len()] != bytes[..] {
            return Err(format!(
                "bytes at {at}: {:02x?}, want {bytes:02x?}",
                &after[*at..at + bytes.len()]
            ));
        }
        may_change[*at..at + bytes.len()].fill(true);
    }
    for c in &r.csums {
        may_change[c.at..c.at + 2].fill(true);
        let (was, now) = (be16(before, c.at), be16(after, c.at));
        if c.udp && was == 0 {
            if now != 0 {
                return Err(format!(
                    "UDP checksum 0 (none) at {} became {now:#06x}",
                    c.at
                ));
            }
            continue;
        }
        if c.udp && now == 0 {
            return Err(format!("UDP checksum at {} became 0 (none)", c.at));
        }
        if residue(before, c) != residue(after, c) {
            return Err(format!(
                "checksum at {} ({was:#06x} -> {now:#06x}) does not follow the rewrite",
                c.at
            ));
        }
    }
    for (i, (a, b)) in before.iter().zip(after).enumerate() {
        if a != b && !may_change[i] {
            return Err(format!("byte {i} changed: {a:#04x} -> {b:#04x}"));
        }
    }
    Ok(())
}

/// The valid frames the corpus starts from, built for a client `client` (of each
/// family) toward the frontends `fe` (IPv4, IPv6; ports 80/TCP and 53/UDP): each
/// (frame, a short name for failure messages).
pub fn seeds(client: [IpAddr; 2], fe: [IpAddr; 2]) -> Vec<(Vec<u8>, String)> {
    let mut out = Vec::new();
    let mut port = 20000u16;
    let mut next_port = || {
        port += 1;
        port
    };
    for (c, f) in client.iter().zip(fe) {
        let (c, f) = (c.to_string(), f.to_string());
        let v6 = f.contains(':');
        let mut syn = Spec::tcp(&c, next_port(), &f, 80, SYN);
        out.push((syn.build(), format!("tcp syn {c}->{f}")));
        syn.payload = b"GET / HTTP/1.1\r\n\r\n".to_vec();
        syn.tcp_flags = ACK;
        syn.sport = next_port();
        out.push((syn.build(), format!("tcp data {c}->{f}")));
        let mut udp = Spec::udp(&c, next_port(), &f, 53, b"a query of some bytes");
        out.push((udp.build(), format!("udp {c}->{f}")));
        if !v6 {
            udp.udp_no_checksum = true;
            udp.sport = next_port();
            out.push((udp.build(), format!("udp no csum {c}->{f}")));
            let mut opts = Spec::tcp(&c, next_port(), &f, 80, SYN);
            opts.ip_options = vec![1, 1, 1, 0];
            out.push((opts.build(), format!("tcp ip options {c}->{f}")));
        } else {
            let mut ext = Spec::tcp(&c, next_port(), &f, 80, SYN);
            ext.ext_headers = vec![crate::packet::options_header(HOPOPTS, 1)];
            out.push((ext.build(), format!("tcp hop-by-hop {c}->{f}")));
            let mut ext = Spec::udp(&c, next_port(), &f, 53, b"with destination options");
            ext.ext_headers = vec![crate::packet::options_header(DSTOPTS, 2)];
            out.push((ext.build(), format!("udp dstopts {c}->{f}")));
            let mut long = Spec::tcp(&c, next_port(), &f, 80, SYN);
            long.ext_headers = (0..7)
                .map(|_| crate::packet::options_header(DSTOPTS, 1))
                .collect();
            out.push((long.build(), format!("tcp 7 extension headers {c}->{f}")));
        }
        // A fragmented datagram: every fragment is a seed.
        let mut big = Spec::udp(&c, next_port(), &f, 53, &[0x5a; 300]);
        big.frag = 0;
        big.id = 0x4242 + out.len() as u32;
        for (i, frag) in big.fragments(128).into_iter().enumerate() {
            out.push((frag, format!("udp fragment {i} {c}->{f}")));
        }
    }
    out
}

/// A TCP segment with a data offset of `doff` words (options after the 20 bytes, all
/// NOPs): for the corpus's data offset cases.
pub fn with_tcp_options(frame: &[u8], l4: usize, words: usize) -> Vec<u8> {
    let mut f = frame[..l4 + 20].to_vec();
    f.extend(std::iter::repeat_n(1u8, (words - 5) * 4));
    f.extend_from_slice(&frame[l4 + 20..]);
    f[l4 + 12] = (words as u8) << 4 | (f[l4 + 12] & 0x0f);
    fix_lengths(&mut f);
    f
}

/// Sets an IPv4 total length (and header checksum) or IPv6 payload length to what the
/// frame holds.
pub fn fix_lengths(f: &mut [u8]) {
    if be16(f, 12) == 0x86dd {
        let n = (f.len() - 54) as u16;
        f[18..20].copy_from_slice(&n.to_be_bytes());
    } else {
        let n = (f.len() - 14) as u16;
        f[16..18].copy_from_slice(&n.to_be_bytes());
        if (f[14] & 0x0f) >= 5 && f.len() >= 14 + (f[14] & 0x0f) as usize * 4 {
            crate::packet::set_ip_checksum(f);
        }
    }
}

/// Random mutations of each seed, beyond the systematic ones.
pub const RANDOM_PER_SEED: usize = 240;

/// Every way the corpus breaks a valid frame `seed` (its headers at `l4`, for TCP/UDP).
pub fn mutations(seed: &[u8], rng: &mut Rng) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let v6 = be16(seed, 12) == 0x86dd;
    // Cut at every offset, the lengths left as they were (the frame is shorter than its
    // header says) and made to agree (a packet that is short by its own account).
    for n in 14..seed.len() {
        out.push(seed[..n].to_vec());
        let mut f = seed[..n].to_vec();
        if n >= if v6 { 54 } else { 34 } {
            fix_lengths(&mut f);
            out.push(f);
        }
    }
    // The frame whole, its length field saying less (as padding after it) or more.
    let len_at = if v6 { 18 } else { 16 };
    let hdr = if v6 { 40 } else { 0 };
    let real = seed.len() - 14 - hdr;
    for claim in (0..real).chain(real + 1..real + 12).chain([0xffff]) {
        let mut f = seed.to_vec();
        f[len_at..len_at + 2].copy_from_slice(&(claim as u16).to_be_bytes());
        if !v6 {
            crate::packet::set_ip_checksum(&mut f);
        }
        out.push(f);
    }
    // Padding after a valid packet (as Ethernet pads short frames): still that packet.
    let mut padded = seed.to_vec();
    padded.extend_from_slice(&[0xa5; 18]);
    out.push(padded);
    if !v6 {
        for ihl in 0..16u8 {
            let mut f = seed.to_vec();
            f[14] = 0x40 | ihl;
            out.push(f.clone());
            if ihl >= 5 && f.len() >= 14 + ihl as usize * 4 {
                crate::packet::set_ip_checksum(&mut f);
                out.push(f);
            }
        }
        for version in [0u8, 5, 6, 15] {
            let mut f = seed.to_vec();
            f[14] = version << 4 | (f[14] & 0x0f);
            out.push(f);
        }
        // Fragment fields: odd offsets, MF and DF together, the reserved bit.
        for _ in 0..12 {
            let mut f = seed.to_vec();
            let field = rng.next_u64() as u16;
            f[20..22].copy_from_slice(&field.to_be_bytes());
            crate::packet::set_ip_checksum(&mut f);
            out.push(f);
        }
    } else {
        for version in [0u8, 4, 7, 15] {
            let mut f = seed.to_vec();
            f[14] = version << 4 | (f[14] & 0x0f);
            out.push(f);
        }
        // The next header and the length byte of the first extension header, if any.
        for nh in [0u8, 6, 17, 43, 44, 50, 51, 58, 59, 60, 255] {
            let mut f = seed.to_vec();
            f[20] = nh;
            out.push(f);
        }
        if seed.len() > 56 {
            for len in [0u8, 1, 2, 3, 7, 255] {
                let mut f = seed.to_vec();
                f[55] = len;
                out.push(f);
            }
        }
    }
    // Random changes: 1 to 4 bytes of the headers (the first 80 bytes) anywhere.
    for _ in 0..RANDOM_PER_SEED {
        let mut f = seed.to_vec();
        for _ in 0..1 + rng.below(4) {
            let at = 12 + rng.below(f.len().min(80) - 12);
            f[at] = rng.next_u64() as u8;
        }
        out.push(f);
    }
    out
}

/// TCP cases of a valid segment `seed` with its TCP header at `l4`: every data offset
/// (with the lengths made to agree or not), every flag combination.
pub fn tcp_mutations(seed: &[u8], l4: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for doff in 0..16u8 {
        let mut f = seed.to_vec();
        f[l4 + 12] = doff << 4;
        out.push(f);
        if doff > 5 {
            out.push(with_tcp_options(seed, l4, doff as usize));
        }
    }
    for flags in 0..=255u8 {
        let mut f = seed.to_vec();
        f[l4 + 13] = flags;
        out.push(f);
    }
    out
}

/// UDP cases of a valid datagram `seed` with its UDP header at `l4`: lengths below,
/// at and above what is there.
pub fn udp_mutations(seed: &[u8], l4: usize) -> Vec<Vec<u8>> {
    let real = seed.len() - l4;
    (0..real + 4)
        .chain([0xffff])
        .map(|len| {
            let mut f = seed.to_vec();
            f[l4 + 4..l4 + 6].copy_from_slice(&(len as u16).to_be_bytes());
            f
        })
        .collect()
}

/// ICMP errors quoting `reply` (a backend's reply after reverse NAT, or a client's
/// packet after DNAT: what the error is about) from `from` to `to`, with the quote cut
/// at every length, and padded frames whose IP length cuts the quote short.
pub fn icmp_errors(from: &str, to: &str, reply: &[u8]) -> Vec<Vec<u8>> {
    let v6 = from.contains(':');
    let (ty, code) = if v6 { (1, 4) } else { (3, 3) };
    let full = reply.len() - 14;
    let mut out = Vec::new();
    for quote in 0..=full {
        out.push(crate::packet::icmp_error(
            from, to, ty, code, [0; 4], reply, quote,
        ));
    }
    // A whole quote, its IP length saying less: the frame's rest is padding.
    let whole = crate::packet::icmp_error(from, to, ty, code, [0; 4], reply, full);
    let hdr = if v6 { 40 } else { 0 };
    for claim in (0..whole.len() - 14 - hdr).step_by(2) {
        let mut f = whole.clone();
        let at = if v6 { 18 } else { 16 };
        f[at..at + 2].copy_from_slice(&(claim as u16).to_be_bytes());
        if !v6 {
            crate::packet::set_ip_checksum(&mut f);
        }
        out.push(f);
    }
    // Other types and the quoted header's first byte.
    for ty in [0u8, 1, 2, 3, 4, 5, 8, 11, 12, 128, 129, 135] {
        let mut f = whole.clone();
        f[14 + if v6 { 40 } else { 20 }] = ty;
        out.push(f);
    }
    for b in [0x44u8, 0x46, 0x4f, 0x55, 0x60, 0x65, 0x00] {
        let mut f = whole.clone();
        f[14 + if v6 { 48 } else { 28 }] = b;
        out.push(f);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_reference_reads_valid_packets_and_names_broken_ones() {
        let syn = Spec::tcp("10.244.0.11", 40000, "10.96.0.10", 80, SYN).build();
        match classify(&syn) {
            Class::Packet(p) => assert_eq!(
                (p.dst, p.dport, p.l4_off, p.l3_end),
                (ip("10.96.0.10"), 80, 34, 54)
            ),
            c => panic!("{c:?}"),
        }
        // A total length that cuts the TCP header, in a frame that still holds it.
        let mut short = syn.clone();
        short[16..18].copy_from_slice(&30u16.to_be_bytes());
        assert_eq!(classify(&short), Class::Malformed);
        // A frame cut short of what its total length says.
        assert_eq!(classify(&syn[..50]), Class::Malformed);
        // A data offset past the end.
        let mut doff = syn.clone();
        doff[34 + 12] = 6 << 4;
        assert_eq!(classify(&doff), Class::Malformed);
        let v6 = Spec::udp("fd00::1", 1, "fd00::2", 53, b"x").build();
        assert!(matches!(classify(&v6), Class::Packet(_)));
        let mut bad_len = v6.clone();
        bad_len[54 + 4..54 + 6].copy_from_slice(&7u16.to_be_bytes());
        assert_eq!(classify(&bad_len), Class::Malformed);
    }

    #[test]
    fn a_rewrite_check_accepts_a_correct_translation_and_nothing_else() {
        let s = Spec::tcp("10.244.0.11", 40000, "10.96.0.10", 80, SYN);
        let before = s.build();
        let Class::Packet(p) = classify(&before) else {
            panic!()
        };
        let after = crate::packet::rewritten(&s, Some(("10.244.0.12", 8080)), None);
        let r = Rewrite::l4(&before, &p, true, (ip("10.244.0.12"), 8080));
        check_rewrite(&before, &after, &r).unwrap();
        // A wrong checksum, a wrong port, a byte changed elsewhere: each refused.
        for (at, why) in [(50, "checksum"), (36, "bytes at 36"), (8, "byte 8")] {
            let mut bad = after.clone();
            bad[at] ^= 1;
            let e = check_rewrite(&before, &bad, &r).unwrap_err();
            assert!(e.contains(why), "{at}: {e}");
        }
        // Unchanged is not that rewrite either.
        assert!(check_rewrite(&before, &before, &r).is_err());
    }
}
