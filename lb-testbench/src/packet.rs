//! Crafted packets for BPF_PROG_TEST_RUN (the kernel tests and the benchmark's
//! per-packet cost), and an independent RFC 1071 checksum to check them with (a valid
//! header or segment sums to 0xffff).

use std::net::Ipv4Addr;

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0x0a, 0xf4, 0, 0x0b];
pub const HOST_MAC: [u8; 6] = [0xee; 6];

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP: u8 = 1;

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

fn pseudo(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> u32 {
    let mut p = Vec::new();
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&[0, proto]);
    p.extend_from_slice(&(len as u16).to_be_bytes());
    sum16(&p, 0)
}

#[derive(Clone, Debug)]
pub struct Spec {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub tcp_flags: u8,
    pub seq: u32,
    pub ack: u32,
    pub payload: Vec<u8>,
    /// IP options (a multiple of 4 bytes).
    pub ip_options: Vec<u8>,
    /// Leave the UDP checksum 0 ("no checksum").
    pub udp_no_checksum: bool,
    /// IP flags+fragment offset field.
    pub frag: u16,
    /// IP identification.
    pub id: u16,
}

impl Spec {
    pub fn tcp(src: &str, sport: u16, dst: &str, dport: u16, flags: u8) -> Self {
        Self::tcp_v4(
            src.parse().unwrap(),
            sport,
            dst.parse().unwrap(),
            dport,
            flags,
        )
    }

    pub fn tcp_v4(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: u8) -> Self {
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
            udp_no_checksum: false,
            frag: 0x4000,
            id: 0x1234,
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

    /// Ethernet + IPv4 (+ options) + TCP/UDP + payload, with correct checksums.
    pub fn build(&self) -> Vec<u8> {
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
        let ihl = 5 + self.ip_options.len() / 4;
        let mut ip = vec![0x40 | ihl as u8, 0];
        ip.extend_from_slice(&((ihl * 4 + l4.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&self.id.to_be_bytes());
        ip.extend_from_slice(&self.frag.to_be_bytes());
        ip.extend_from_slice(&[64, self.proto, 0, 0]);
        ip.extend_from_slice(&self.src.octets());
        ip.extend_from_slice(&self.dst.octets());
        ip.extend_from_slice(&self.ip_options);
        let c = checksum(&ip, 0);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        let mut pkt = Vec::new();
        pkt.extend_from_slice(&HOST_MAC);
        pkt.extend_from_slice(&CLIENT_MAC);
        pkt.extend_from_slice(&0x0800u16.to_be_bytes());
        pkt.extend_from_slice(&ip);
        pkt.extend_from_slice(&l4);
        pkt
    }

    /// The datagram `build` makes, cut into IPv4 fragments (RFC 791) of `chunk` bytes of
    /// L4 data each (a multiple of 8; the last may be shorter): the first carries the
    /// TCP/UDP header, every one but the last has MF set, and each has the header of
    /// the whole datagram (options too) with its own length, offset and checksum.
    pub fn fragments(&self, chunk: usize) -> Vec<Vec<u8>> {
        assert!(
            chunk > 0 && chunk.is_multiple_of(8),
            "fragment data is cut in 8-byte units"
        );
        let whole = self.build();
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

/// Recomputes the IPv4 header checksum of a frame.
pub fn set_ip_checksum(frame: &mut [u8]) {
    let l3 = 14 + (frame[14] & 0x0f) as usize * 4;
    frame[24..26].copy_from_slice(&[0, 0]);
    let c = checksum(&frame[14..l3], 0);
    frame[24..26].copy_from_slice(&c.to_be_bytes());
}

/// What a receiver reassembles from `frames`, the fragments of one datagram in order:
/// the first fragment's header (no fragment bits, the whole length) and every
/// fragment's data. Panics if the fragments do not all share the source, destination,
/// id and protocol (a receiver would never put them together) or leave a gap.
pub fn reassemble(frames: &[Vec<u8>]) -> Vec<u8> {
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

/// Asserts that the IPv4 header checksum is right (a fragment after the first has no
/// L4 header to check).
pub fn assert_ip_checksum(pkt: &[u8]) {
    let ihl = (pkt[14] & 0x0f) as usize * 4;
    assert_eq!(
        fold(sum16(&pkt[14..14 + ihl], 0)),
        0xffff,
        "IPv4 header checksum is wrong"
    );
}

/// A parsed view of an output packet.
#[derive(Debug)]
pub struct View {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub ihl: usize,
    pub l4: Vec<u8>,
    pub sport: u16,
    pub dport: u16,
}

pub fn view(pkt: &[u8]) -> View {
    let ip = &pkt[14..];
    let ihl = (ip[0] & 0x0f) as usize * 4;
    let tot = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    let l4 = ip[ihl..tot].to_vec();
    View {
        src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        dst: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        proto: ip[9],
        ihl,
        sport: u16::from_be_bytes([l4[0], l4[1]]),
        dport: u16::from_be_bytes([l4[2], l4[3]]),
        l4,
    }
}

/// Asserts that the IPv4 header checksum and the TCP/UDP/ICMP checksum are right.
pub fn assert_checksums(pkt: &[u8]) {
    let ip = &pkt[14..];
    let ihl = (ip[0] & 0x0f) as usize * 4;
    assert_eq!(
        fold(sum16(&ip[..ihl], 0)),
        0xffff,
        "IPv4 header checksum is wrong"
    );
    let v = view(pkt);
    match v.proto {
        TCP => assert_eq!(
            fold(sum16(&v.l4, pseudo(v.src, v.dst, TCP, v.l4.len()))),
            0xffff,
            "TCP checksum is wrong"
        ),
        UDP => {
            if v.l4[6..8] != [0, 0] {
                assert_eq!(
                    fold(sum16(&v.l4, pseudo(v.src, v.dst, UDP, v.l4.len()))),
                    0xffff,
                    "UDP checksum is wrong"
                )
            }
        }
        ICMP => assert_eq!(fold(sum16(&v.l4, 0)), 0xffff, "ICMP checksum is wrong"),
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
}
