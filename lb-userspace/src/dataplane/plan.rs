//! Diff: the map contents we have (`MapState`, a mirror of the kernel maps) against the
//! desired state, as a short list of map operations in a safe order. Pure: no kernel.
//!
//! Ordering rules, so a packet racing with an update never reads a half-made entry:
//! 1. new backends are written before any slot points at them;
//! 2. a frontend's slots are written before its count grows, and removed after it shrinks;
//! 3. a deleted frontend goes before its slots; unreferenced backends go last.
//!
//! Minimal writes: a backend keeps its id and a remaining backend keeps its slot; a
//! removed backend's slot is filled by the last slot (swap-remove), so removing one
//! backend rewrites at most one slot, and adding one writes one slot.
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use lb_common::{Backend, Frontend, FrontendKey, SlotKey};

use crate::model::{BackendAddr, DesiredState, FrontendAddr, Protocol};

/// What the kernel maps hold (or will, once the planned ops are applied).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapState {
    pub frontends: HashMap<FrontendKey, Frontend>,
    pub slots: HashMap<SlotKey, u32>,
    pub backends: HashMap<u32, Backend>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    PutBackend(u32, Backend),
    PutSlot(SlotKey, u32),
    PutFrontend(FrontendKey, Frontend),
    DelSlot(SlotKey),
    DelFrontend(FrontendKey),
    DelBackend(u32),
}

pub fn frontend_key(f: &FrontendAddr) -> FrontendKey {
    FrontendKey {
        addr: u32::from(f.ip).to_be(),
        port: f.port.to_be(),
        proto: f.proto.number(),
        _pad: 0,
    }
}

pub fn backend_value(b: &BackendAddr) -> Backend {
    Backend {
        addr: u32::from(b.ip).to_be(),
        port: b.port.to_be(),
        proto: b.proto.number(),
        flags: 0,
    }
}

pub fn frontend_addr(k: &FrontendKey) -> FrontendAddr {
    FrontendAddr {
        ip: u32::from_be(k.addr).into(),
        port: u16::from_be(k.port),
        proto: Protocol::from_number(k.proto).unwrap_or(Protocol::Tcp),
    }
}

pub fn backend_addr(b: &Backend) -> BackendAddr {
    BackendAddr {
        ip: u32::from_be(b.addr).into(),
        port: u16::from_be(b.port),
        proto: Protocol::from_number(b.proto).unwrap_or(Protocol::Tcp),
    }
}

impl MapState {
    /// Applies one op to the mirror (after the kernel accepted it).
    pub fn apply(&mut self, op: &Op) {
        match op {
            Op::PutBackend(id, b) => {
                self.backends.insert(*id, *b);
            }
            Op::PutSlot(k, id) => {
                self.slots.insert(*k, *id);
            }
            Op::PutFrontend(k, f) => {
                self.frontends.insert(*k, *f);
            }
            Op::DelSlot(k) => {
                self.slots.remove(k);
            }
            Op::DelFrontend(k) => {
                self.frontends.remove(k);
            }
            Op::DelBackend(id) => {
                self.backends.remove(id);
            }
        }
    }

    /// The ready backends of a frontend, in slot order.
    pub fn slot_list(&self, f: &Frontend) -> Vec<u32> {
        (1..=f.count)
            .map_while(|slot| {
                self.slots
                    .get(&SlotKey {
                        service_id: f.service_id,
                        slot,
                    })
                    .copied()
            })
            .collect()
    }
}

/// Lowest ids not in use, handed out in order.
struct IdAllocator {
    used: HashSet<u32>,
    next: u32,
}

impl IdAllocator {
    fn new(used: impl IntoIterator<Item = u32>) -> Self {
        Self {
            used: used.into_iter().collect(),
            next: 1,
        }
    }

    fn take(&mut self) -> u32 {
        while self.used.contains(&self.next) {
            self.next += 1;
        }
        self.used.insert(self.next);
        self.next
    }
}

/// The ops that turn `current` into `desired`.
pub fn plan(current: &MapState, desired: &DesiredState) -> Vec<Op> {
    let mut ops = Vec::new();

    // Backends: keep ids of those that exist; allocate for new ones.
    let mut backend_ids: HashMap<BackendAddr, u32> = current
        .backends
        .iter()
        .map(|(id, b)| (backend_addr(b), *id))
        .collect();
    let mut backend_alloc = IdAllocator::new(current.backends.keys().copied());
    let wanted_backends: BTreeSet<BackendAddr> = desired
        .frontends
        .values()
        .flat_map(|f| f.known.iter().copied())
        .collect();
    for b in &wanted_backends {
        if !backend_ids.contains_key(b) {
            let id = backend_alloc.take();
            backend_ids.insert(*b, id);
            ops.push(Op::PutBackend(id, backend_value(b)));
        }
    }

    // Frontends.
    let mut service_alloc = IdAllocator::new(current.frontends.values().map(|f| f.service_id));
    let wanted_keys: BTreeMap<FrontendKey, &FrontendAddr> = desired
        .frontends
        .keys()
        .map(|f| (frontend_key(f), f))
        .collect();
    for (fe, spec) in &desired.frontends {
        let key = frontend_key(fe);
        let want: BTreeSet<u32> = spec.active.iter().map(|b| backend_ids[b]).collect();
        let (service_id, cur_slots, cur) = match current.frontends.get(&key) {
            Some(f) => (f.service_id, current.slot_list(f), Some(*f)),
            None => (service_alloc.take(), Vec::new(), None),
        };
        // Keep positions of backends that stay; swap-remove the others; append new ones.
        let mut slots = cur_slots.clone();
        let mut i = slots.len();
        while i > 0 {
            i -= 1;
            if !want.contains(&slots[i]) {
                slots.swap_remove(i);
            }
        }
        let present: HashSet<u32> = slots.iter().copied().collect();
        slots.extend(want.iter().filter(|id| !present.contains(id)));

        for (i, id) in slots.iter().enumerate() {
            if cur_slots.get(i) != Some(id) {
                let k = SlotKey {
                    service_id,
                    slot: i as u32 + 1,
                };
                ops.push(Op::PutSlot(k, *id));
            }
        }
        let value = Frontend {
            service_id,
            count: slots.len() as u32,
            flags: 0,
            _pad: 0,
        };
        if cur != Some(value) {
            ops.push(Op::PutFrontend(key, value));
        }
        // Slots left over from a larger count, also any stale ones beyond the count.
        let stale_from = slots.len() as u32 + 1;
        let mut stale: Vec<SlotKey> = current
            .slots
            .keys()
            .filter(|k| k.service_id == service_id && k.slot >= stale_from)
            .copied()
            .collect();
        stale.sort();
        ops.extend(stale.into_iter().map(Op::DelSlot));
    }

    // Frontends no longer wanted, then their slots.
    let mut gone: Vec<(&FrontendKey, &Frontend)> = current
        .frontends
        .iter()
        .filter(|(k, _)| !wanted_keys.contains_key(k))
        .collect();
    gone.sort_by_key(|(k, _)| **k);
    let gone_ids: HashSet<u32> = gone.iter().map(|(_, f)| f.service_id).collect();
    for (k, _) in &gone {
        ops.push(Op::DelFrontend(**k));
    }
    let mut gone_slots: Vec<SlotKey> = current
        .slots
        .keys()
        .filter(|k| gone_ids.contains(&k.service_id))
        .copied()
        .collect();
    gone_slots.sort();
    ops.extend(gone_slots.into_iter().map(Op::DelSlot));

    // Slots of service ids that no frontend owns (left by a crash mid-update).
    let live_ids: HashSet<u32> = current.frontends.values().map(|f| f.service_id).collect();
    let mut orphan: Vec<SlotKey> = current
        .slots
        .keys()
        .filter(|k| !live_ids.contains(&k.service_id) && !gone_ids.contains(&k.service_id))
        .filter(|k| {
            !ops.iter()
                .any(|op| matches!(op, Op::PutSlot(p, _) if p == *k))
        })
        .copied()
        .collect();
    orphan.sort();
    ops.extend(orphan.into_iter().map(Op::DelSlot));

    // Backends nobody lists any more.
    let mut unused: Vec<u32> = current
        .backends
        .iter()
        .filter(|(_, b)| !wanted_backends.contains(&backend_addr(b)))
        .map(|(id, _)| *id)
        .collect();
    unused.sort();
    ops.extend(unused.into_iter().map(Op::DelBackend));
    ops
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::model::FrontendSpec;

    fn fe(last: u8, port: u16) -> FrontendAddr {
        FrontendAddr {
            ip: Ipv4Addr::new(10, 96, 0, last),
            port,
            proto: Protocol::Tcp,
        }
    }

    fn be(last: u8) -> BackendAddr {
        BackendAddr {
            ip: Ipv4Addr::new(10, 244, 0, last),
            port: 8080,
            proto: Protocol::Tcp,
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
                    active,
                    known,
                },
            );
        }
        d
    }

    fn applied(cur: &MapState, d: &DesiredState) -> (MapState, Vec<Op>) {
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
            .map(|id| backend_addr(&s.backends[id]))
            .collect()
    }

    #[test]
    fn from_empty_writes_backends_slots_then_frontend() {
        let d = state(&[(fe(10, 80), &[2, 3, 4], &[])]);
        let (s, ops) = applied(&MapState::default(), &d);
        assert_eq!(ops.len(), 3 + 3 + 1);
        assert!(matches!(ops[0], Op::PutBackend(..)));
        assert!(matches!(ops[3], Op::PutSlot(..)));
        assert!(matches!(ops[6], Op::PutFrontend(..)));
        assert_eq!(resolve(&s, &fe(10, 80)), [be(2), be(3), be(4)].into());
        assert_eq!(plan(&s, &d), vec![], "applying twice changes nothing");
    }

    #[test]
    fn adding_a_backend_touches_only_its_own_entries() {
        let (s, _) = applied(
            &MapState::default(),
            &state(&[(fe(10, 80), &[2, 3], &[]), (fe(11, 80), &[7], &[])]),
        );
        let (s2, ops) = applied(
            &s,
            &state(&[(fe(10, 80), &[2, 3, 4], &[]), (fe(11, 80), &[7], &[])]),
        );
        assert_eq!(ops.len(), 3, "{ops:?}");
        assert!(matches!(ops[0], Op::PutBackend(_, b) if b == backend_value(&be(4))));
        assert!(matches!(ops[1], Op::PutSlot(k, _) if k.slot == 3));
        assert!(matches!(ops[2], Op::PutFrontend(_, f) if f.count == 3));
        assert_eq!(resolve(&s2, &fe(10, 80)), [be(2), be(3), be(4)].into());
        // Existing backends kept their ids.
        for (id, b) in &s.backends {
            assert_eq!(s2.backends[id], *b);
        }
    }

    #[test]
    fn removing_a_backend_moves_at_most_one_slot() {
        let (s, _) = applied(
            &MapState::default(),
            &state(&[(fe(10, 80), &[2, 3, 4, 5], &[])]),
        );
        let (s2, ops) = applied(&s, &state(&[(fe(10, 80), &[2, 4, 5], &[])]));
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
        let (s, _) = applied(&MapState::default(), &state(&[(fe(10, 80), &[2, 3], &[])]));
        let (s2, ops) = applied(&s, &state(&[(fe(10, 80), &[2], &[3])]));
        assert!(
            !ops.iter().any(|o| matches!(o, Op::DelBackend(_))),
            "{ops:?}"
        );
        assert_eq!(resolve(&s2, &fe(10, 80)), [be(2)].into());
        assert!(s2.backends.values().any(|b| *b == backend_value(&be(3))));
    }

    #[test]
    fn deleting_a_frontend_removes_it_before_its_slots_and_frees_backends() {
        let (s, _) = applied(
            &MapState::default(),
            &state(&[(fe(10, 80), &[2], &[]), (fe(11, 80), &[2, 3], &[])]),
        );
        let (s2, ops) = applied(&s, &state(&[(fe(10, 80), &[2], &[])]));
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
            s2.backends.len(),
            1,
            "backend 2 is still used by 10:80, 3 is gone"
        );
        assert_eq!(s2.slots.len(), 1);
        assert_eq!(s2.frontends.len(), 1);
    }

    #[test]
    fn frontend_without_ready_backend_has_count_zero() {
        let (s, _) = applied(&MapState::default(), &state(&[(fe(10, 80), &[], &[3])]));
        let f = s.frontends[&frontend_key(&fe(10, 80))];
        assert_eq!(f.count, 0);
        assert_eq!(s.backends.len(), 1);
    }

    #[test]
    fn orphan_slots_from_an_interrupted_update_are_removed() {
        let (mut s, _) = applied(&MapState::default(), &state(&[(fe(10, 80), &[2], &[])]));
        s.slots.insert(
            SlotKey {
                service_id: 99,
                slot: 1,
            },
            1,
        );
        let sid = s.frontends.values().next().unwrap().service_id;
        s.slots.insert(
            SlotKey {
                service_id: sid,
                slot: 5,
            },
            1,
        );
        let (s2, _) = applied(&s, &state(&[(fe(10, 80), &[2], &[])]));
        assert_eq!(s2.slots.len(), 1);
    }

    #[test]
    fn ids_are_reused_lowest_first() {
        let (s, _) = applied(
            &MapState::default(),
            &state(&[(fe(10, 80), &[2, 3], &[]), (fe(11, 80), &[4], &[])]),
        );
        let (s2, _) = applied(&s, &state(&[(fe(11, 80), &[4], &[])]));
        let (s3, _) = applied(
            &s2,
            &state(&[(fe(11, 80), &[4], &[]), (fe(12, 80), &[5], &[])]),
        );
        let ids: BTreeSet<u32> = s3.frontends.values().map(|f| f.service_id).collect();
        assert_eq!(ids, [1, 2].into());
        let bids: BTreeSet<u32> = s3.backends.keys().copied().collect();
        assert_eq!(
            bids,
            [1, 3].into(),
            "backend 4 kept id 3; backend 5 took freed id 1"
        );
    }
}
