//! `LB_FE_FILTER`, pure: a bit per hash of every frontend address
//! (`lb_common::frontend_filter_bit`), so the datapath skips the frontend hash lookup for
//! a packet or a socket call to any other address. Derived from the frontends the maps
//! hold, never planned on its own: a plan is bracketed by two writes of it (`Dataplane`),
//! so no packet racing with an update misses a frontend the maps have.
//! 1. before the plan, the bits of the frontends held and of those the plan adds
//!    (`before`): a new frontend's bit is set before its entry exists;
//! 2. after it, the bits of the frontends held then (`of`): a bit is cleared once no
//!    frontend of its addresses is left.
use lb_common::{frontend_filter_bit, Addr, FrontendKey, FRONTEND_FILTER_WORDS};

use super::{MapState, Op};

/// The filter's words, as `LB_FE_FILTER` holds them.
pub type Words = Vec<u64>;

/// The filter with the bits of these addresses set.
pub fn of_addrs<'a>(addrs: impl IntoIterator<Item = &'a Addr>) -> Words {
    let mut words = vec![0u64; FRONTEND_FILTER_WORDS as usize];
    for a in addrs {
        let (w, mask) = frontend_filter_bit(a);
        words[w as usize] |= mask;
    }
    words
}

/// The filter of the frontends the mirror holds.
pub fn of(state: &MapState) -> Words {
    of_addrs(state.frontends.keys().map(|k| &k.addr))
}

/// The filter to write before `ops`: the frontends held and those `ops` put.
pub fn before(state: &MapState, ops: &[Op]) -> Words {
    let put = ops.iter().filter_map(|op| match op {
        Op::PutFrontend(FrontendKey { addr, .. }, _) => Some(addr),
        _ => None,
    });
    of_addrs(state.frontends.keys().map(|k| &k.addr).chain(put))
}

/// Whether `addr`'s bit is set in `words`.
pub fn has(words: &[u64], addr: &Addr) -> bool {
    let (w, mask) = frontend_filter_bit(addr);
    words.get(w as usize).is_some_and(|w| w & mask != 0)
}

/// The words of `want` that differ from `have`: (index, word).
pub fn changed(have: &[u64], want: &[u64]) -> Vec<(u32, u64)> {
    want.iter()
        .enumerate()
        .filter(|&(i, w)| have.get(i) != Some(w))
        .map(|(i, w)| (i as u32, *w))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use lb_common::{Frontend, PROTO_TCP, SCOPE_OUTSIDE};

    use super::*;
    use crate::dataplane::plan::map_addr;

    fn key(last: u8) -> FrontendKey {
        FrontendKey {
            addr: map_addr(&Ipv4Addr::new(10, 96, 0, last).into()),
            port: 80u16.to_be(),
            proto: PROTO_TCP,
            scope: SCOPE_OUTSIDE,
        }
    }

    fn fv(service_id: u32) -> Frontend {
        Frontend {
            service_id,
            count: 0,
            flags: 0,
            affinity_timeout_s: 0,
            table_base: 0,
            table_size: 0,
        }
    }

    fn state(keys: &[FrontendKey]) -> MapState {
        MapState::from_entries(
            keys.iter().enumerate().map(|(i, k)| (*k, fv(i as u32 + 1))),
            [],
            [],
            [],
        )
    }

    #[test]
    fn every_frontend_address_has_its_bit_and_few_other_addresses_do() {
        let keys: Vec<FrontendKey> = (0..10_000u32)
            .map(|i| FrontendKey {
                addr: map_addr(&Ipv4Addr::from(0x0a60_0000 + i).into()),
                ..key(0)
            })
            .collect();
        let words = of(&state(&keys));
        assert!(keys.iter().all(|k| has(&words, &k.addr)));
        // Pod addresses: about 4 % of them share a bit with a frontend (10,000 bits of
        // 262,144 set, less the collisions).
        let pods = (0..10_000u32)
            .filter(|i| has(&words, &map_addr(&Ipv4Addr::from(0x0af4_0000 + i).into())))
            .count();
        assert!((200..600).contains(&pods), "{pods} of 10,000 pod addresses");
        let set: u32 = words.iter().map(|w| w.count_ones()).sum();
        assert!((9_700..=10_000).contains(&set), "{set} bits set");
    }

    #[test]
    fn a_new_frontend_has_its_bit_before_the_plan_and_a_removed_one_loses_it_after() {
        let (a, b) = (key(1), key(2));
        let held = state(&[a]);
        let ops = [Op::PutFrontend(b, fv(2)), Op::DelFrontend(a)];
        let pre = before(&held, &ops);
        assert!(has(&pre, &a.addr) && has(&pre, &b.addr));
        let mut after = held.clone();
        for op in &ops {
            after.apply(op);
        }
        let post = of(&after);
        assert!(has(&post, &b.addr));
        assert!(!has(&post, &a.addr));
        // The writes: the new bit before, the old one's word after.
        let none = of_addrs([]);
        assert!(changed(&of(&held), &pre)
            .iter()
            .any(|&(i, w)| i == frontend_filter_bit(&b.addr).0 && w != none[i as usize]));
        assert_eq!(
            changed(&pre, &post),
            vec![(
                frontend_filter_bit(&a.addr).0,
                post[frontend_filter_bit(&a.addr).0 as usize]
            )]
        );
    }

    #[test]
    fn a_bit_shared_by_two_frontends_stays_while_one_is_left() {
        // The same address on two ports: one bit.
        let a = key(1);
        let a443 = FrontendKey {
            port: 443u16.to_be(),
            ..a
        };
        let mut s = state(&[a, a443]);
        s.apply(&Op::DelFrontend(a));
        assert!(has(&of(&s), &a.addr));
        s.apply(&Op::DelFrontend(a443));
        assert_eq!(of(&s), of_addrs([]));
    }
}
