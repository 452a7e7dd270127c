//! The diff, pure (no kernel): the maps' content we have (the mirror, `MapState`)
//! against the desired state, as a short list of map operations in a safe order.
//!
//! - `ids`: backend and service id allocation;
//! - `mirror`: what the maps hold, and the ops that change them;
//! - `diff`: the plans, full (`plan`) and by delta (`plan_delta`), and the backend
//!   reference counts (`Refs`) that tell when a backend is no longer needed;
//! - `filter`: the frontend addresses' filter (`LB_FE_FILTER`), derived from the
//!   frontends and written around each plan (set before it, cleared after).
//!
//! Ordering rules, so a packet racing with an update never reads a half-made entry:
//! 1. new backends are written before any slot points at them;
//! 2. a frontend's slots are written before its count grows, and removed after it shrinks;
//!    its source ranges are written before it names them (`FRONTEND_F_SOURCE_RANGES`)
//!    and removed after (so an allowed source is never dropped in between);
//!    its Maglev table is written, in a region no frontend names, before it names it;
//! 3. a deleted frontend goes before its slots and ranges; unreferenced backends go last
//!    (a table region is free once no frontend names it).
//!
//! Plans come grouped by op kind (`Op::rank`), which keeps these rules and lets the
//! writer send each group in batches.
mod diff;
pub mod filter;
mod ids;
pub mod maglev;
mod mirror;

pub use diff::{plan, plan_delta, RefChanges, Refs};
pub use mirror::{
    backend_addr, backend_value, frontend_addr, frontend_key, ip_addr, map_addr, range_key,
    MapContent, MapState, Op, RangeKey, Table, TableSpace, NO_BACKEND,
};

#[cfg(test)]
mod tests {
    use std::{collections::BTreeSet, net::Ipv4Addr, sync::Arc};

    use lb_common::{Frontend, SlotKey};

    use super::*;
    use crate::model::{BackendAddr, Delta, DesiredState, FrontendAddr, FrontendSpec, Protocol};

    fn fe(last: u8, port: u16) -> FrontendAddr {
        FrontendAddr::new(Ipv4Addr::new(10, 96, 0, last).into(), port, Protocol::Tcp)
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
                    host_only: false,
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
            4,
            "move one slot, a new table, shrink the count, drop the last slot: {ops:?}"
        );
    }

    #[test]
    fn from_empty_writes_backends_slots_then_frontend() {
        let d = state(&[(fe(10, 80), &[2, 3, 4], &[])]);
        let (s, ops) = applied_ops(&MapState::default(), &d);
        assert_eq!(ops.len(), 3 + 3 + 1 + 1);
        assert!(matches!(ops[0], Op::PutBackend(..)));
        assert!(matches!(ops[3], Op::PutSlot(..)));
        assert!(matches!(&ops[6], Op::PutTable(t) if t.cells.len() == 127));
        assert!(matches!(ops[7], Op::PutFrontend(_, f) if f.table_size == 127));
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
        assert_eq!(ops.len(), 4, "{ops:?}");
        assert!(matches!(ops[0], Op::PutBackend(_, b) if b == backend_value(&be(4))));
        assert!(matches!(ops[1], Op::PutSlot(k, _) if k.slot == 3));
        assert!(matches!(ops[2], Op::PutTable(_)));
        assert!(matches!(ops[3], Op::PutFrontend(_, f) if f.count == 3));
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
        // slot of 3 := 5, a new table, count 4 -> 3, delete slot 4, delete backend 3.
        assert_eq!(ops.len(), 5, "{ops:?}");
        assert!(matches!(ops[0], Op::PutSlot(k, _) if k.slot == 2));
        assert!(matches!(ops[1], Op::PutTable(_)));
        assert!(matches!(ops[2], Op::PutFrontend(_, f) if f.count == 3));
        assert!(matches!(ops[3], Op::DelSlot(k) if k.slot == 4));
        assert!(matches!(ops[4], Op::DelBackend(_)));
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

    /// The backend a flow hash reaches through the mirror, as the datapath does.
    fn pick(s: &MapState, f: &FrontendAddr, h: u32) -> u32 {
        let fv = s.frontends[&frontend_key(f)];
        match s.table(&fv) {
            Some(t) => t[(h % fv.table_size) as usize].backend_id,
            None => s.slot(fv.service_id, h % fv.count + 1).unwrap(),
        }
    }

    #[test]
    fn a_new_table_goes_to_a_free_region_and_the_old_one_is_freed_after_the_swap() {
        let (s, _) = applied_ops(
            &MapState::default().with_table_capacity(400),
            &state(&[(fe(10, 80), &[2, 3, 4], &[]), (fe(11, 80), &[2, 3], &[])]),
        );
        let a = s.frontends[&frontend_key(&fe(10, 80))];
        let b = s.frontends[&frontend_key(&fe(11, 80))];
        assert_eq!((a.table_size, b.table_size), (127, 127));
        assert_ne!(a.table_base, b.table_base, "one region each");
        assert_eq!(s.table_space().used(), 254);
        // Every cell names a backend of the frontend, in the slot that holds it.
        for c in s.table(&a).unwrap() {
            assert_eq!(s.slot(a.service_id, c.slot), Some(c.backend_id));
        }
        let (s2, ops) = applied_ops(
            &s,
            &state(&[(fe(10, 80), &[2, 4], &[]), (fe(11, 80), &[2, 3], &[])]),
        );
        let t = ops
            .iter()
            .find_map(|o| match o {
                Op::PutTable(t) => Some(t.clone()),
                _ => None,
            })
            .unwrap();
        assert!(
            t.base >= 254 || t.base + 127 <= a.table_base.min(b.table_base),
            "not over a region still named: {t:?}"
        );
        let a2 = s2.frontends[&frontend_key(&fe(10, 80))];
        assert_eq!(a2.table_base, t.base);
        assert_eq!(s2.table_space().used(), 254, "the old region is free again");
        // The next table may reuse the freed region (no room is left after the last).
        let (s3, _) = applied_ops(
            &s2,
            &state(&[
                (fe(10, 80), &[2, 4], &[]),
                (fe(11, 80), &[2, 3], &[]),
                (fe(12, 80), &[5, 6], &[]),
            ]),
        );
        let c = s3.frontends[&frontend_key(&fe(12, 80))];
        assert_eq!(c.table_base, a.table_base);
    }

    #[test]
    fn a_full_maglev_map_leaves_a_frontend_hashing_over_its_slots() {
        let cur = MapState::default().with_table_capacity(200);
        let (s, _) = applied_ops(
            &cur,
            &state(&[(fe(10, 80), &[2, 3], &[]), (fe(11, 80), &[4, 5], &[])]),
        );
        let sizes: Vec<u32> = [fe(10, 80), fe(11, 80)]
            .iter()
            .map(|f| s.frontends[&frontend_key(f)].table_size)
            .collect();
        assert_eq!(sizes.iter().filter(|&&n| n == 127).count(), 1, "{sizes:?}");
        assert_eq!(s.frontends_without_table(), 1);
        for f in [fe(10, 80), fe(11, 80)] {
            for h in 0..64 {
                pick(&s, &f, h);
            }
        }
        assert_eq!(
            plan(
                &s,
                &state(&[(fe(10, 80), &[2, 3], &[]), (fe(11, 80), &[4, 5], &[])])
            )
            .len(),
            0
        );
    }

    #[test]
    fn a_restarted_agent_keeps_the_tables_and_rebuilds_a_wrong_one() {
        let d = state(&[(fe(10, 80), &[2, 3, 4], &[]), (fe(11, 80), &[5, 6], &[])]);
        let (s, _) = applied_ops(&MapState::default(), &d);
        // What a restarted agent reads: the same entries, the tables' cells.
        let read = |corrupt: bool| {
            let mut r = MapState::from_entries(
                s.frontends.iter().map(|(k, v)| (*k, *v)),
                s.slots(),
                s.backends().map(|(id, b)| (id, *b)),
                s.ranges().copied(),
            );
            for f in s.frontends.values() {
                let mut cells = s.table(f).unwrap().to_vec();
                if corrupt && f.service_id == s.frontends[&frontend_key(&fe(11, 80))].service_id {
                    cells[7].backend_id = 999;
                }
                r.set_table_cells(f.table_base, cells);
            }
            r
        };
        assert_eq!(plan(&read(false), &d), vec![], "nothing to redo");
        let ops = plan(&read(true), &d);
        assert_eq!(ops.len(), 2, "{ops:?}");
        assert!(matches!(&ops[0], Op::PutTable(_)));
        assert!(matches!(ops[1], Op::PutFrontend(..)));
        // Two frontends naming overlapping regions (an interrupted older agent): one
        // keeps its region, the other gets a new table.
        let mut r = read(false);
        let (k11, f11) = s
            .frontends
            .iter()
            .find(|(_, f)| f.table_size == 127 && f.count == 2)
            .map(|(k, f)| (*k, *f))
            .unwrap();
        let f10 = s
            .frontends
            .values()
            .find(|f| f.count == 3)
            .copied()
            .unwrap();
        r.apply(&Op::PutFrontend(
            k11,
            Frontend {
                table_base: f10.table_base + 5,
                ..f11
            },
        ));
        let mut r = MapState::from_entries(
            r.frontends.iter().map(|(k, v)| (*k, *v)),
            r.slots(),
            r.backends().map(|(id, b)| (id, *b)),
            r.ranges().copied(),
        );
        r.set_table_cells(f10.table_base, s.table(&f10).unwrap().to_vec());
        let ops = plan(&r, &d);
        assert_eq!(ops.len(), 2, "{ops:?}");
        assert!(matches!(&ops[0], Op::PutTable(t) if t.service_id == f11.service_id));
        let mut r2 = r.clone();
        for op in &ops {
            r2.apply(op);
        }
        let t = r2.frontends[&k11];
        assert!(t.table_base >= f10.table_base + 127 || t.table_base + 127 <= f10.table_base);
        assert_eq!(plan(&r2, &d), vec![]);
    }
}
