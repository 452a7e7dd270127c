//! Ethernet + IPv4 + TCP frames with correct checksums, for BPF_PROG_TEST_RUN.
use std::net::Ipv4Addr;

pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;

fn sum16(data: &[u8], mut acc: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u16::from_be_bytes([c[0], c[1]]) as u32;
    }
    if let [last] = chunks.remainder() {
        acc += (*last as u32) << 8;
    }
    acc
}

fn checksum(data: &[u8], acc: u32) -> u16 {
    let mut acc = sum16(data, acc);
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

pub fn tcp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: u8) -> Vec<u8> {
    let mut l4 = Vec::with_capacity(20);
    l4.extend_from_slice(&sport.to_be_bytes());
    l4.extend_from_slice(&dport.to_be_bytes());
    l4.extend_from_slice(&1_000_000u32.to_be_bytes());
    l4.extend_from_slice(&(if flags & ACK != 0 { 2_000_000u32 } else { 0 }).to_be_bytes());
    l4.extend_from_slice(&[5 << 4, flags]);
    l4.extend_from_slice(&64240u16.to_be_bytes());
    l4.extend_from_slice(&[0, 0, 0, 0]);
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    let c = checksum(&l4, sum16(&pseudo, 0));
    l4[16..18].copy_from_slice(&c.to_be_bytes());
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&[0x12, 0x34, 0x40, 0x00, 64, 6, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let c = checksum(&ip, 0);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut pkt = Vec::with_capacity(54);
    pkt.extend_from_slice(&[0xee; 6]);
    pkt.extend_from_slice(&[0x02, 0, 0x0a, 0xf4, 0, 0x0b]);
    pkt.extend_from_slice(&0x0800u16.to_be_bytes());
    pkt.extend_from_slice(&ip);
    pkt.extend_from_slice(&l4);
    pkt
}

/// Destination address and port of a frame made by `tcp` (after the program rewrote it).
pub fn dst_of(pkt: &[u8]) -> Option<(Ipv4Addr, u16)> {
    if pkt.len() < 54 {
        return None;
    }
    let ip = Ipv4Addr::new(pkt[30], pkt[31], pkt[32], pkt[33]);
    let ihl = (pkt[14] & 0x0f) as usize * 4;
    let p = 14 + ihl;
    Some((ip, u16::from_be_bytes([pkt[p + 2], pkt[p + 3]])))
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
        assert_eq!(checksum(&p[14..34], 0), 0);
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&a.octets());
        pseudo.extend_from_slice(&b.octets());
        pseudo.extend_from_slice(&[0, 6, 0, 20]);
        assert_eq!(checksum(&p[34..], sum16(&pseudo, 0)), 0);
        assert_eq!(dst_of(&p), Some((b, 80)));
    }
}
