//! Maglev consistent hashing (Eisenbud et al., NSDI 2016), as Katran and Cilium use it:
//! each frontend with two or more ready backends gets a lookup table of a prime number
//! `M` of cells, about [`CELLS_PER_BACKEND`] per backend; the datapath sends a new flow
//! to cell `hash(5-tuple) % M`. Every backend has its own permutation of the cells
//! (an offset and a skip from a hash of its address), and the backends take turns
//! claiming their next free preferred cell until the table is full. Each backend owns
//! about `M / N` cells, and when one of `N` backends leaves, the cells of the others
//! mostly stay theirs: about `1/N` of the flows move (the ideal), plus a small excess
//! that shrinks as `M / N` grows.
//!
//! The table is a pure function of the backend set (ordered by address, so not of the
//! slots' order) and `M`: an agent restarted on pinned maps computes the same table, and
//! a flow whose conntrack entry was lost lands on the same backend again.
use lb_common::MaglevCell;

use super::mirror::backend_value;
use crate::model::BackendAddr;

/// Cells per backend a table aims at: the excess of moved flows over `1/N` falls as
/// this grows (measured in the tests below), the memory grows with it (8 bytes a cell).
pub const CELLS_PER_BACKEND: usize = 40;

/// The table sizes, primes (the permutations need `M` prime): the smallest that holds
/// `CELLS_PER_BACKEND` cells per backend, the largest for more backends.
pub const TABLE_SIZES: [u32; 11] = [
    127, 251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071,
];

/// The table size for `n` ready backends: 0 (no table: the datapath hashes over the
/// slots) for one backend or none, or when `n` is too large for the largest table.
pub fn table_size(n: usize) -> u32 {
    if n <= 1 {
        return 0;
    }
    let want = n.saturating_mul(CELLS_PER_BACKEND);
    match TABLE_SIZES.iter().find(|&&m| m as usize >= want) {
        Some(m) => *m,
        None => {
            let largest = TABLE_SIZES[TABLE_SIZES.len() - 1];
            if n < largest as usize {
                largest
            } else {
                0
            }
        }
    }
}

/// The table size for `n` ready backends of a frontend whose table has `current` cells
/// (0: none): the current size while it holds between 10 and 160 cells a backend (and
/// more cells than backends), so the usual scaling up and down keeps the table's size,
/// and with it the place of every flow that is not moved; [`table_size`] otherwise.
pub fn resize(n: usize, current: u32) -> u32 {
    let fresh = table_size(n);
    if fresh == 0 || current == 0 {
        return fresh;
    }
    let m = current as usize;
    let fits = n < m
        && m >= n * CELLS_PER_BACKEND / 4
        && (m <= n * CELLS_PER_BACKEND * 4 || current == TABLE_SIZES[0])
        && TABLE_SIZES.contains(&current);
    if fits {
        current
    } else {
        fresh
    }
}

/// One ready backend of a frontend: its address (which fixes its permutation), its id
/// and the slot that holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    pub backend: BackendAddr,
    pub id: u32,
    pub slot: u32,
}

/// 64-bit FNV-1a over `bytes` from `seed`, then the splitmix64 finaliser: fixed here
/// (not the standard library's hasher, whose algorithm may change between releases), so
/// every agent version computes the same permutations.
fn hash64(bytes: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The bytes a backend's permutation is drawn from: its address, port and protocol as
/// the maps hold them.
fn identity(b: &BackendAddr) -> [u8; 19] {
    let v = backend_value(b);
    let mut out = [0u8; 19];
    for (i, w) in v.addr.iter().enumerate() {
        out[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
    }
    out[16..18].copy_from_slice(&v.port.to_ne_bytes());
    out[18] = v.proto;
    out
}

/// The Maglev table of `members` with `m` cells (`m` prime, larger than the number of
/// members; see [`table_size`]).
pub fn populate(members: &[Member], m: u32) -> Vec<MaglevCell> {
    let m = m as u64;
    let mut order: Vec<&Member> = members.iter().collect();
    order.sort_by_key(|mb| identity(&mb.backend));
    order.dedup_by_key(|mb| identity(&mb.backend));
    let n = order.len();
    assert!(n > 0 && (n as u64) < m, "a table needs 1..m backends");
    let perm: Vec<(u64, u64)> = order
        .iter()
        .map(|mb| {
            let id = identity(&mb.backend);
            let offset = hash64(&id, 0x6d61_676c) % m;
            let skip = hash64(&id, 0x736b_6970) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; n];
    let mut owner: Vec<u32> = vec![u32::MAX; m as usize];
    let mut filled = 0u64;
    'fill: loop {
        for i in 0..n {
            let (offset, skip) = perm[i];
            let mut c = (offset + next[i] * skip) % m;
            while owner[c as usize] != u32::MAX {
                next[i] += 1;
                c = (offset + next[i] * skip) % m;
            }
            owner[c as usize] = i as u32;
            next[i] += 1;
            filled += 1;
            if filled == m {
                break 'fill;
            }
        }
    }
    owner
        .into_iter()
        .map(|i| {
            let mb = order[i as usize];
            MaglevCell {
                backend_id: mb.id,
                slot: mb.slot,
            }
        })
        .collect()
}

/// The share of `flows` (hashes, as the datapath computes them) whose backend differs
/// between two tables: what a change of the backend set moves.
pub fn moved_share(before: &[MaglevCell], after: &[MaglevCell], flows: &[u32]) -> f64 {
    if flows.is_empty() {
        return 0.0;
    }
    let pick = |t: &[MaglevCell], h: u32| t[(h % t.len() as u32) as usize].backend_id;
    let moved = flows
        .iter()
        .filter(|&&h| pick(before, h) != pick(after, h))
        .count();
    moved as f64 / flows.len() as f64
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::model::Protocol;

    fn members(n: u32) -> Vec<Member> {
        (0..n)
            .map(|i| Member {
                backend: BackendAddr {
                    ip: Ipv4Addr::from(0x0af4_0000 + i).into(),
                    port: 8080,
                    proto: Protocol::Tcp,
                    remote: false,
                },
                id: 100 + i,
                slot: i + 1,
            })
            .collect()
    }

    fn flows(n: u32) -> Vec<u32> {
        let mut x = 0x9e37_79b9u32;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x
            })
            .collect()
    }

    #[test]
    fn table_sizes_are_prime_and_hold_forty_cells_a_backend() {
        for m in TABLE_SIZES {
            assert!((2..m).take_while(|d| d * d <= m).all(|d| m % d != 0), "{m}");
        }
        assert_eq!(table_size(0), 0);
        assert_eq!(table_size(1), 0);
        assert_eq!(table_size(2), 127);
        assert_eq!(table_size(4), 251);
        assert_eq!(table_size(100), 4093);
        assert_eq!(table_size(10_000), 131071);
        assert_eq!(table_size(200_000), 0);
    }

    #[test]
    fn a_table_keeps_its_size_while_the_backends_scale_up_and_down_by_four() {
        assert_eq!(resize(3, 251), 251);
        assert_eq!(resize(4, 127), 127);
        assert_eq!(resize(2, 251), 251);
        assert_eq!(resize(1, 251), 0);
        assert_eq!(resize(2, 0), 127);
        // 100 backends in 127 cells are too many; 2 in 65521 too few.
        assert_eq!(resize(100, 127), table_size(100));
        assert_eq!(resize(2, 65521), 127);
        assert_eq!(resize(60, 4093), 4093);
        assert_eq!(resize(500, 4093), table_size(500));
    }

    #[test]
    fn every_backend_owns_about_m_over_n_cells() {
        for n in [2, 3, 10, 100] {
            let m = table_size(n as usize);
            let t = populate(&members(n), m);
            assert_eq!(t.len(), m as usize);
            for mb in members(n) {
                let own = t.iter().filter(|c| c.backend_id == mb.id).count() as f64;
                let fair = m as f64 / n as f64;
                assert!(
                    (own - fair).abs() <= fair * 0.1 + 1.0,
                    "n={n}: {own} vs {fair}"
                );
                assert!(t.iter().any(|c| c.backend_id == mb.id && c.slot == mb.slot));
            }
        }
    }

    #[test]
    fn the_table_depends_on_the_backend_set_not_on_the_slot_order() {
        let a = members(5);
        let mut b = a.clone();
        b.reverse();
        assert_eq!(populate(&a, 251), populate(&b, 251));
    }

    /// The point of Maglev: when one of N backends goes, about 1/N of the flows move
    /// (those it had), not the (N-1)/N that `hash % N` moves.
    #[test]
    fn removing_one_of_n_backends_moves_about_one_nth_of_the_flows() {
        let f = flows(200_000);
        // Maglev moves a little more than the ideal, less the more cells a backend
        // has; with ~40 cells a backend, measured: 1.08x at 4, 1.38x at 10, 2.76x at 50.
        for (n, excess) in [(4u32, 1.2), (10, 1.6), (50, 3.0)] {
            let all = members(n);
            let before = populate(&all, table_size(n as usize));
            // Backend 0 goes; the others keep their ids (their slots may change).
            let rest: Vec<Member> = all[1..].to_vec();
            let after = populate(&rest, resize(rest.len(), before.len() as u32));
            let moved = moved_share(&before, &after, &f);
            let ideal = 1.0 / n as f64;
            assert!(moved >= ideal * 0.9, "n={n}: moved {moved}");
            assert!(
                moved <= ideal * excess,
                "n={n}: moved {moved}, ideal {ideal}"
            );
            // Flows that were not on the removed backend mostly stay.
            let gone = all[0].id;
            let kept: Vec<u32> = f
                .iter()
                .copied()
                .filter(|h| before[(h % before.len() as u32) as usize].backend_id != gone)
                .collect();
            let others = moved_share(&before, &after, &kept);
            assert!(others <= ideal * (excess - 1.0) * 1.2, "n={n}: {others}");
        }
    }
}
