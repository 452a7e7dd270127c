//! The diff, pure (no kernel): the maps' content we have (the mirror, `MapState`)
//! against the desired state, as a short list of map operations in a safe order.
//!
//! - `ids`: backend and service id allocation;
//! - `mirror`: what the maps hold, and the ops that change them;
//! - `diff`: the plans, full (`plan`) and by delta (`plan_delta`), and the backend
//!   reference counts (`Refs`) that tell when a backend is no longer needed.
//!
//! Ordering rules, so a packet racing with an update never reads a half-made entry:
//! 1. new backends are written before any slot points at them;
//! 2. a frontend's slots are written before its count grows, and removed after it shrinks;
//!    its source ranges are written before it names them (`FRONTEND_F_SOURCE_RANGES`)
//!    and removed after (so an allowed source is never dropped in between);
//! 3. a deleted frontend goes before its slots and ranges; unreferenced backends go last.
//!
//! Plans come grouped by op kind (`Op::rank`), which keeps these rules and lets the
//! writer send each group in batches.
mod diff;
mod ids;
mod mirror;

pub use diff::{plan, plan_delta, RefChanges, Refs};
pub use mirror::{
    backend_addr, backend_value, frontend_addr, frontend_key, ip_addr, map_addr, range_key,
    MapContent, MapState, Op, RangeKey, NO_BACKEND,
};

#[cfg(test)]
mod tests {
    use std::{collections::BTreeSet, net::Ipv4Addr, sync::Arc};

    use lb_common::SlotKey;

    use super::*;
    use crate::model::{BackendAddr, Delta, DesiredState, FrontendAddr, FrontendSpec, Protocol};

    fn fe(last: u8, port: u16) -> FrontendAddr {
        FrontendAddr {
            ip: Ipv4Addr::new(10, 96, 0, last).into(),
            port,
            proto: Protocol::Tcp,
        }
    }

    fn be(last: u8) -> BackendAddr {
        BackendAddr {
            ip: Ipv4Addr::new(10, 244, 0, last).into(),
            port: 8080,
            proto: Protocol::Tcp,
            remote: false,
        }
    }

    fn state(fes: &[(FrontendAddr, &[u8], &[u8])]) -> DesiredState {
        let mut d = DesiredState::default();
        for (f, active, not_ready) in fes {
            let active: BTreeSet<_> = active.iter().map(|i| be(*i)).collect();
            let mut known = active.clone();
            known.extend(not_ready.iter().map(|i| be(*i)));
            d.frontends.insert(
                *f,
                FrontendSpec {
                    service: "default/x:".into(),
                    kind: Default::default(),
                    local: false,
                    affinity_timeout_s: 0,
                    source_ranges: Arc::new([]),
                    active: active.into_iter().collect(),
                    known: known.into_iter().collect(),
                },
            );
        }
        d
    }

    fn applied_ops(cur: &MapState, d: &DesiredState) -> (MapState, Vec<Op>) {
        let ops = plan(cur, d);
        let mut next = cur.clone();
        for op in &ops {
            next.apply(op);
        }
        (next, ops)
    }

    /// The ready backends a frontend resolves to through the mirror.
    fn resolve(s: &MapState, f: &FrontendAddr) -> BTreeSet<BackendAddr> {
        let fv = s.frontends[&frontend_key(f)];
        s.slot_list(&fv)
            .iter()
            .map(|id| backend_addr(s.backend(*id).unwrap()))
            .collect()
    }

    /// A small deterministic generator (xorshift) for state sequences.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    fn random_state(r: &mut Rng) -> DesiredState {
        let mut d = DesiredState::default();
        for f in 0..r.next(8) as u8 {
            let active: Vec<u8> = (0..r.next(6)).map(|_| 2 + r.next(10) as u8).collect();
            let not_ready: Vec<u8> = (0..r.next(3)).map(|_| 2 + r.next(10) as u8).collect();
            let mut s = state(&[(fe(10 + f, 80), &active, &not_ready)]);
            // Some frontends with source ranges (a LoadBalancer IP's), some of them
            // shared between frontends and states.
            for spec in s.frontends.values_mut() {
                let ranges: Vec<ipnet::IpNet> = (0..r.next(4))
                    .map(|_| {
                        format!("192.0.{}.0/{}", r.next(3), 22 + r.next(3))
                            .parse()
                            .unwrap()
                    })
                    .collect();
                spec.source_ranges = ranges.into();
            }
            d.frontends.append(&mut s.frontends);
        }
        d
    }

    #[test]
    fn incremental_plans_reach_the_same_maps_as_full_plans() {
        let mut r = Rng(0x9e37_79b9_7f4a_7c15);
        let (mut full, mut inc) = (MapState::default(), MapState::default());
        let mut refs = Refs::default();
        let mut last = DesiredState::default();
        for step in 0..300 {
            let d = random_state(&mut r);
            let (next_full, _) = applied_ops(&full, &d);
            let (ops, changes) = plan_delta(&inc, &refs, &d, &Delta::between(&last, &d));
            for op in &ops {
                inc.apply(op);
            }
            refs.apply(&changes);
            last = d.clone();
            assert_eq!(
                Refs::count(&d, &inc).map(|r| r.trimmed()),
                Some(refs.trimmed()),
                "step {step}: bookkeeping"
            );
            full = next_full;
            assert_eq!(inc.content(), full.content(), "step {step}");
            assert_eq!(plan(&inc, &d), vec![], "step {step}: nothing left to do");
            for f in d.frontends.keys() {
                let want: BTreeSet<_> = d.frontends[f].active.iter().copied().collect();
                assert_eq!(resolve(&inc, f), want, "step {step}");
            }
        }
    }

    #[test]
    fn an_unchanged_state_plans_nothing_and_a_change_touches_only_its_frontend() {
        let d: DesiredState = {
            let mut d = DesiredState::default();
            for f in 0..200u8 {
                d.frontends
                    .append(&mut state(&[(fe(f, 80), &[2, 3, 4], &[])]).frontends);
            }
            d
        };
        let (s, _) = applied_ops(&MapState::default(), &d);
        let refs = Refs::count(&d, &s).unwrap();
        assert!(plan_delta(&s, &refs, &d, &Delta::between(&d, &d))
            .0
            .is_empty());
        let mut d2 = d.clone();
        let f7 = d2.frontends.get_mut(&fe(7, 80)).unwrap();
        f7.active = f7.active.iter().copied().filter(|b| *b != be(3)).collect();
        let (ops, _) = plan_delta(&s, &refs, &d2, &Delta::between(&d, &d2));
        assert_eq!(
            ops.len(),
            3,
            "move one slot, shrink the count, drop the last slot: {ops:?}"
        );
    }

    #[test]
    fn from_empty_writes_backends_slots_then_frontend() {
        let d = state(&[(fe(10, 80), &[2, 3, 4], &[])]);
        let (s, ops) = applied_ops(&MapState::default(), &d);
        assert_eq!(ops.len(), 3 + 3 + 1);
        assert!(matches!(ops[0], Op::PutBackend(..)));
        assert!(matches!(ops[3], Op::PutSlot(..)));
        assert!(matches!(ops[6], Op::PutFrontend(..)));
        assert_eq!(resolve(&s, &fe(10, 80)), [be(2), be(3), be(4)].into());
        assert_eq!(plan(&s, &d), vec![], "applying twice changes nothing");
    }

    #[test]
    fn adding_a_backend_touches_only_its_own_entries() {
        let (s, _) = applied_ops(
            &MapState::default(),
            &state(&[(fe(10, 80), &[2, 3], &[]), (fe(11, 80), &[7], &[])]),
        );
        let (s2, ops) = applied_ops(
            &s,
            &state(&[(fe(10, 80), &[2, 3, 4], &[]), (fe(11, 80), &[7], &[])]),
        );
        assert_eq!(ops.len(), 3, "{ops:?}");
        assert!(matches!(ops[0], Op::PutBackend(_, b) if b == backend_value(&be(4))));
        assert!(matches!(ops[1], Op::PutSlot(k, _) if k.slot == 3));
        assert!(matches!(ops[2], Op::PutFrontend(_, f) if f.count == 3));
        assert_eq!(resolve(&s2, &fe(10, 80)), [be(2), be(3), be(4)].into());
        // Existing backends kept their ids.
        for (id, b) in s.backends() {
            assert_eq!(s2.backend(id), Some(b));
        }
    }

    #[test]
    fn removing_a_backend_moves_at_most_one_slot() {
        let (s, _) = applied_ops(
            &MapState::default(),
            &state(&[(fe(10, 80), &[2, 3, 4, 5], &[])]),
        );
        let (s2, ops) = applied_ops(&s, &state(&[(fe(10, 80), &[2, 4, 5], &[])]));
        // slot of 3 := 5, count 4 -> 3, delete slot 4, delete backend 3.
        assert_eq!(ops.len(), 4, "{ops:?}");
        assert!(matches!(ops[0], Op::PutSlot(k, _) if k.slot == 2));
        assert!(matches!(ops[1], Op::PutFrontend(_, f) if f.count == 3));
        assert!(matches!(ops[2], Op::DelSlot(k) if k.slot == 4));
        assert!(matches!(ops[3], Op::DelBackend(_)));
        assert_eq!(resolve(&s2, &fe(10, 80)), [be(2), be(4), be(5)].into());
    }

    #[test]
    fn not_ready_backend_leaves_slots_but_stays_in_backends() {
        let (s, _) = applied_ops(&MapState::default(), &state(&[(fe(10, 80), &[2, 3], &[])]));
        let (s2, ops) = applied_ops(&s, &state(&[(fe(10, 80), &[2], &[3])]));
        assert!(
            !ops.iter().any(|o| matches!(o, Op::DelBackend(_))),
            "{ops:?}"
        );
        assert_eq!(resolve(&s2, &fe(10, 80)), [be(2)].into());
        assert!(s2.backends().any(|(_, b)| *b == backend_value(&be(3))));
    }

    #[test]
    fn deleting_a_frontend_removes_it_before_its_slots_and_frees_backends() {
        let (s, _) = applied_ops(
            &MapState::default(),
            &state(&[(fe(10, 80), &[2], &[]), (fe(11, 80), &[2, 3], &[])]),
        );
        let (s2, ops) = applied_ops(&s, &state(&[(fe(10, 80), &[2], &[])]));
        let del_fe = ops
            .iter()
            .position(|o| matches!(o, Op::DelFrontend(_)))
            .unwrap();
        let first_del_slot = ops
            .iter()
            .position(|o| matches!(o, Op::DelSlot(_)))
            .unwrap();
        assert!(del_fe < first_del_slot);
        assert_eq!(
            s2.backend_count(),
            1,
            "backend 2 is still used by 10:80, 3 is gone"
        );
        assert_eq!(s2.slot_count(), 1);
        assert_eq!(s2.frontends.len(), 1);
    }

    #[test]
    fn frontend_without_ready_backend_has_count_zero() {
        let (s, _) = applied_ops(&MapState::default(), &state(&[(fe(10, 80), &[], &[3])]));
        let f = s.frontends[&frontend_key(&fe(10, 80))];
        assert_eq!(f.count, 0);
        assert_eq!(s.backend_count(), 1);
    }

    #[test]
    fn orphan_slots_from_an_interrupted_update_are_removed() {
        let (mut s, _) = applied_ops(&MapState::default(), &state(&[(fe(10, 80), &[2], &[])]));
        s.apply(&Op::PutSlot(
            SlotKey {
                service_id: 99,
                slot: 1,
            },
            1,
        ));
        let sid = s.frontends.values().next().unwrap().service_id;
        s.apply(&Op::PutSlot(
            SlotKey {
                service_id: sid,
                slot: 5,
            },
            1,
        ));
        let (s2, _) = applied_ops(&s, &state(&[(fe(10, 80), &[2], &[])]));
        assert_eq!(s2.slot_count(), 1);
    }

    fn with_ranges(mut d: DesiredState, ranges: &[&str]) -> DesiredState {
        for spec in d.frontends.values_mut() {
            spec.source_ranges = ranges.iter().map(|r| r.parse().unwrap()).collect();
        }
        d
    }

    #[test]
    fn source_ranges_are_written_before_their_frontend_names_them_and_removed_after() {
        let f = fe(10, 80);
        let (s, ops) = applied_ops(
            &MapState::default(),
            &with_ranges(
                state(&[(f, &[2], &[])]),
                &["192.0.2.0/24", "198.51.100.7/32"],
            ),
        );
        let at = |ops: &[Op], p: fn(&Op) -> bool| ops.iter().position(p).unwrap();
        let put_fe = at(&ops, |o| matches!(o, Op::PutFrontend(..)));
        assert!(ops[..put_fe]
            .iter()
            .filter(|o| matches!(o, Op::PutRange(_)))
            .eq([
                Op::PutRange(range_key(1, &"192.0.2.0/24".parse().unwrap())),
                Op::PutRange(range_key(1, &"198.51.100.7/32".parse().unwrap()))
            ]
            .iter()));
        let fv = s.frontends[&frontend_key(&f)];
        assert_ne!(fv.flags & lb_common::FRONTEND_F_SOURCE_RANGES, 0);
        let k = s.ranges_of(fv.service_id)[0];
        assert_eq!(
            k.prefix_len,
            32 + 96 + 24,
            "the id, then the IPv4-mapped prefix"
        );
        // One range less: only that one goes; then none: the flag goes first.
        let (s, ops) = applied_ops(
            &s,
            &with_ranges(state(&[(f, &[2], &[])]), &["192.0.2.0/24"]),
        );
        assert_eq!(ops.len(), 1);
        assert!(matches!(ops[0], Op::DelRange(_)));
        let (s, ops) = applied_ops(&s, &state(&[(f, &[2], &[])]));
        let put_fe = at(&ops, |o| matches!(o, Op::PutFrontend(..)));
        let del = at(&ops, |o| matches!(o, Op::DelRange(_)));
        assert!(put_fe < del, "{ops:?}");
        assert_eq!(
            s.frontends[&frontend_key(&f)].flags & lb_common::FRONTEND_F_SOURCE_RANGES,
            0
        );
        assert_eq!(s.ranges().count(), 0);
        // A deleted frontend takes its ranges with it, after itself.
        let (s, _) = applied_ops(&s, &with_ranges(state(&[(f, &[2], &[])]), &["10.0.0.0/8"]));
        let (s, ops) = applied_ops(&s, &DesiredState::default());
        assert!(
            at(&ops, |o| matches!(o, Op::DelFrontend(_)))
                < at(&ops, |o| matches!(o, Op::DelRange(_)))
        );
        assert_eq!(s.ranges().count(), 0);
        // Ranges left by an interrupted agent under an id no frontend has: removed.
        let mut s = s;
        s.apply(&Op::PutRange(range_key(77, &"10.0.0.0/8".parse().unwrap())));
        let (s, _) = applied_ops(&s, &state(&[(f, &[2], &[])]));
        assert_eq!(s.ranges().count(), 0);
    }

    #[test]
    fn ids_are_reused_lowest_first() {
        let (s, _) = applied_ops(
            &MapState::default(),
            &state(&[(fe(10, 80), &[2, 3], &[]), (fe(11, 80), &[4], &[])]),
        );
        let (s2, _) = applied_ops(&s, &state(&[(fe(11, 80), &[4], &[])]));
        let (s3, _) = applied_ops(
            &s2,
            &state(&[(fe(11, 80), &[4], &[]), (fe(12, 80), &[5], &[])]),
        );
        let ids: BTreeSet<u32> = s3.frontends.values().map(|f| f.service_id).collect();
        assert_eq!(ids, [1, 2].into());
        let bids: BTreeSet<u32> = s3.backends().map(|(id, _)| id).collect();
        assert_eq!(
            bids,
            [1, 3].into(),
            "backend 4 kept id 3; backend 5 took freed id 1"
        );
    }
}
