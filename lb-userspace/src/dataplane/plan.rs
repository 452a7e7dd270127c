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
//!
//! Two entry points: `plan` compares everything (at start, when the mirror was just read
//! from the maps), and `plan_incremental` looks only at the frontends whose spec differs
//! from the desired state the mirror was last brought to (`Applied`), so the cost of a
//! change is proportional to the change, not to the number of Services.
use std::collections::{BTreeMap, BTreeSet};

// Fast, DoS-resistant hashing for the mirror and the plans (keys come from our own maps).
use ahash::{AHashMap as HashMap, AHashSet as HashSet};
use lb_common::{Backend, Frontend, FrontendKey, SlotKey};

use crate::model::{BackendAddr, DesiredState, FrontendAddr, FrontendSpec, Protocol};

/// Ids handed out lowest first: the free ids below `next`, then `next`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdPool {
    free: BTreeSet<u32>,
    next: u32,
}

impl IdPool {
    fn from_used(used: impl IntoIterator<Item = u32>) -> Self {
        let used: BTreeSet<u32> = used.into_iter().filter(|id| *id != 0).collect();
        let max = used.last().copied().unwrap_or(0);
        Self {
            free: (1..=max).filter(|id| !used.contains(id)).collect(),
            next: max + 1,
        }
    }

    fn take(&mut self) -> u32 {
        if let Some(id) = self.free.pop_first() {
            return id;
        }
        let id = self.next.max(1);
        self.next = id + 1;
        id
    }

    fn mark_used(&mut self, id: u32) {
        if id >= self.next {
            self.free.extend(self.next.max(1)..id);
            self.next = id + 1;
        } else {
            self.free.remove(&id);
        }
    }

    fn release(&mut self, id: u32) {
        if id < self.next {
            self.free.insert(id);
        }
    }
}

/// What the kernel maps hold (or will, once the planned ops are applied), with the
/// indexes the planner needs. Change it only through `apply` (or call `reindex`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapState {
    pub frontends: HashMap<FrontendKey, Frontend>,
    pub slots: HashMap<SlotKey, u32>,
    pub backends: HashMap<u32, Backend>,
    backend_ids: HashMap<BackendAddr, u32>,
    backend_pool: IdPool,
    service_pool: IdPool,
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
    /// Rebuilds the indexes from the three maps (after reading them from the kernel).
    pub fn reindex(&mut self) {
        self.backend_ids = self
            .backends
            .iter()
            .map(|(id, b)| (backend_addr(b), *id))
            .collect();
        self.backend_pool = IdPool::from_used(self.backends.keys().copied());
        self.service_pool = IdPool::from_used(self.frontends.values().map(|f| f.service_id));
    }

    /// Applies one op to the mirror (after the kernel accepted it).
    pub fn apply(&mut self, op: &Op) {
        match op {
            Op::PutBackend(id, b) => {
                if let Some(old) = self.backends.insert(*id, *b) {
                    self.backend_ids.remove(&backend_addr(&old));
                }
                self.backend_ids.insert(backend_addr(b), *id);
                self.backend_pool.mark_used(*id);
            }
            Op::PutSlot(k, id) => {
                self.slots.insert(*k, *id);
            }
            Op::PutFrontend(k, f) => {
                if let Some(old) = self.frontends.insert(*k, *f) {
                    if old.service_id != f.service_id {
                        self.service_pool.release(old.service_id);
                    }
                }
                self.service_pool.mark_used(f.service_id);
            }
            Op::DelSlot(k) => {
                self.slots.remove(k);
            }
            Op::DelFrontend(k) => {
                if let Some(old) = self.frontends.remove(k) {
                    self.service_pool.release(old.service_id);
                }
            }
            Op::DelBackend(id) => {
                if let Some(old) = self.backends.remove(id) {
                    self.backend_ids.remove(&backend_addr(&old));
                    self.backend_pool.release(*id);
                }
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

    pub fn backend_id(&self, b: &BackendAddr) -> Option<u32> {
        self.backend_ids.get(b).copied()
    }
}

/// The desired state the mirror was last brought to, with how many frontends list each
/// backend; what `plan_incremental` diffs against.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub state: DesiredState,
    refs: HashMap<BackendAddr, u32>,
}

/// Frontends whose spec differs between `Applied` and a desired state: computed once per
/// sync, for both the plan and the bookkeeping after it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// New or modified.
    pub changed: Vec<FrontendAddr>,
    pub gone: Vec<FrontendAddr>,
}

impl Applied {
    /// What differs from `desired`: O(frontends) comparisons.
    pub fn changes(&self, desired: &DesiredState) -> Changes {
        let old = &self.state.frontends;
        Changes {
            changed: desired
                .frontends
                .iter()
                .filter(|(fe, spec)| old.get(fe) != Some(*spec))
                .map(|(fe, _)| *fe)
                .collect(),
            gone: old
                .keys()
                .filter(|fe| !desired.frontends.contains_key(fe))
                .copied()
                .collect(),
        }
    }

    pub fn new(state: DesiredState) -> Self {
        let mut refs = HashMap::new();
        for spec in state.frontends.values() {
            for b in &spec.known {
                *refs.entry(*b).or_insert(0) += 1;
            }
        }
        Self { state, refs }
    }
}

/// Ids allocated while planning (the mirror only learns them when ops are applied).
struct Alloc {
    backend_pool: IdPool,
    service_pool: IdPool,
    new_backends: HashMap<BackendAddr, u32>,
}

impl Alloc {
    fn new(current: &MapState) -> Self {
        Self {
            backend_pool: current.backend_pool.clone(),
            service_pool: current.service_pool.clone(),
            new_backends: HashMap::new(),
        }
    }

    fn backend(&self, current: &MapState, b: &BackendAddr) -> u32 {
        current
            .backend_id(b)
            .or_else(|| self.new_backends.get(b).copied())
            .expect("every listed backend is written before its frontend")
    }

    /// Writes `b` unless the maps (or this plan) already have it.
    fn ensure_backend(&mut self, current: &MapState, b: &BackendAddr, ops: &mut Vec<Op>) {
        if current.backend_id(b).is_none() && !self.new_backends.contains_key(b) {
            let id = self.backend_pool.take();
            self.new_backends.insert(*b, id);
            ops.push(Op::PutBackend(id, backend_value(b)));
        }
    }
}

/// Slots of `service_id` from `from` upward until the first gap: what is left over
/// above a count (normally exactly the slots a shrinking count leaves behind).
fn slots_from(current: &MapState, service_id: u32, from: u32) -> Vec<SlotKey> {
    (from..)
        .map(|slot| SlotKey { service_id, slot })
        .take_while(|k| current.slots.contains_key(k))
        .collect()
}

/// The ops for one wanted frontend (backends already ensured).
fn plan_frontend(
    current: &MapState,
    alloc: &mut Alloc,
    fe: &FrontendAddr,
    spec: &FrontendSpec,
    ops: &mut Vec<Op>,
) {
    let key = frontend_key(fe);
    let want: BTreeSet<u32> = spec
        .active
        .iter()
        .map(|b| alloc.backend(current, b))
        .collect();
    let (service_id, cur_slots, cur) = match current.frontends.get(&key) {
        Some(f) => (f.service_id, current.slot_list(f), Some(*f)),
        None => (alloc.service_pool.take(), Vec::new(), None),
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
        flags: spec.kind.flags(),
        _pad: 0,
    };
    if cur != Some(value) {
        ops.push(Op::PutFrontend(key, value));
    }
    // Slots left over above the new count.
    ops.extend(
        slots_from(current, service_id, slots.len() as u32 + 1)
            .into_iter()
            .map(Op::DelSlot),
    );
}

/// A frontend that is no longer wanted: the frontend first, then its slots.
fn plan_gone_frontend(current: &MapState, key: &FrontendKey, ops: &mut Vec<Op>) {
    if let Some(f) = current.frontends.get(key) {
        ops.push(Op::DelFrontend(*key));
        ops.extend(
            slots_from(current, f.service_id, 1)
                .into_iter()
                .map(Op::DelSlot),
        );
    }
}

impl Op {
    /// Position of this kind of op in a plan. Grouping a plan by kind, stably, keeps
    /// every ordering rule above (each frontend's slots before its count, its count
    /// before its leftover slots go; backends first and last) and lets the writer send
    /// each group to the kernel in batches.
    pub fn rank(&self) -> u8 {
        match self {
            Op::PutBackend(..) => 0,
            Op::PutSlot(..) => 1,
            Op::PutFrontend(..) => 2,
            Op::DelFrontend(..) => 3,
            Op::DelSlot(..) => 4,
            Op::DelBackend(..) => 5,
        }
    }
}

fn grouped(mut ops: Vec<Op>) -> Vec<Op> {
    ops.sort_by_key(Op::rank);
    ops
}

/// The ops that turn `current` into `desired`, comparing everything. Also removes what
/// an interrupted earlier agent may have left (slots no frontend owns).
pub fn plan(current: &MapState, desired: &DesiredState) -> Vec<Op> {
    let mut ops = Vec::new();
    let mut alloc = Alloc::new(current);

    let mut wanted: Vec<BackendAddr> = desired
        .frontends
        .values()
        .flat_map(|f| f.known.iter().copied())
        .collect();
    wanted.sort_unstable();
    wanted.dedup();
    for b in &wanted {
        alloc.ensure_backend(current, b, &mut ops);
    }
    let wanted_backends: HashSet<BackendAddr> = wanted.into_iter().collect();
    for (fe, spec) in &desired.frontends {
        plan_frontend(current, &mut alloc, fe, spec, &mut ops);
    }

    let wanted_keys: HashSet<FrontendKey> = desired.frontends.keys().map(frontend_key).collect();
    let mut gone: Vec<&FrontendKey> = current
        .frontends
        .keys()
        .filter(|k| !wanted_keys.contains(k))
        .collect();
    gone.sort();
    for k in gone {
        plan_gone_frontend(current, k, &mut ops);
    }

    // Slots no frontend will own once the ops are applied (left by an interrupted
    // update): whatever lies outside 1..=count of its frontend's final count.
    if !current.slots.is_empty() {
        let mut counts: HashMap<u32, u32> = current
            .frontends
            .values()
            .map(|f| (f.service_id, f.count))
            .collect();
        let mut deleted: HashSet<SlotKey> = HashSet::new();
        for op in &ops {
            match op {
                Op::PutFrontend(_, f) => {
                    counts.insert(f.service_id, f.count);
                }
                Op::DelFrontend(k) => {
                    if let Some(old) = current.frontends.get(k) {
                        counts.remove(&old.service_id);
                    }
                }
                Op::DelSlot(k) => {
                    deleted.insert(*k);
                }
                _ => {}
            }
        }
        let mut orphan: Vec<SlotKey> = current
            .slots
            .keys()
            .filter(|k| !deleted.contains(k))
            .filter(|k| {
                counts
                    .get(&k.service_id)
                    .is_none_or(|count| k.slot > *count)
            })
            .copied()
            .collect();
        orphan.sort();
        ops.extend(orphan.into_iter().map(Op::DelSlot));
    }

    let mut unused: Vec<u32> = current
        .backends
        .iter()
        .filter(|(_, b)| !wanted_backends.contains(&backend_addr(b)))
        .map(|(id, _)| *id)
        .collect();
    unused.sort();
    ops.extend(unused.into_iter().map(Op::DelBackend));
    grouped(ops)
}

/// The ops that turn `current` (which equals `applied.state`) into `desired`, looking
/// only at frontends whose spec changed: O(frontends) comparisons plus O(change) work.
pub fn plan_incremental(
    current: &MapState,
    applied: &Applied,
    desired: &DesiredState,
    changes: &Changes,
) -> Vec<Op> {
    let mut ops = Vec::new();
    let mut alloc = Alloc::new(current);
    let old = &applied.state.frontends;
    let changed: Vec<(&FrontendAddr, &FrontendSpec)> = changes
        .changed
        .iter()
        .map(|fe| (fe, &desired.frontends[fe]))
        .collect();

    // How many frontends will list each backend whose count changes.
    let mut delta: BTreeMap<BackendAddr, i64> = BTreeMap::new();
    for (fe, spec) in &changed {
        for b in &spec.known {
            *delta.entry(*b).or_insert(0) += 1;
        }
        if let Some(prev) = old.get(*fe) {
            for b in &prev.known {
                *delta.entry(*b).or_insert(0) -= 1;
            }
        }
    }
    for fe in &changes.gone {
        for b in &old[fe].known {
            *delta.entry(*b).or_insert(0) -= 1;
        }
    }
    let refs_after = |b: &BackendAddr, d: i64| applied.refs.get(b).copied().unwrap_or(0) as i64 + d;

    for (b, d) in &delta {
        if refs_after(b, *d) > 0 {
            alloc.ensure_backend(current, b, &mut ops);
        }
    }
    for (fe, spec) in &changed {
        plan_frontend(current, &mut alloc, fe, spec, &mut ops);
    }
    for fe in &changes.gone {
        plan_gone_frontend(current, &frontend_key(fe), &mut ops);
    }
    for (b, d) in &delta {
        if refs_after(b, *d) <= 0 {
            if let Some(id) = current.backend_id(b) {
                ops.push(Op::DelBackend(id));
            }
        }
    }
    grouped(ops)
}

impl Applied {
    /// The bookkeeping after `plan_incremental`'s ops were all applied: only changed
    /// frontends are copied.
    pub fn advance(&mut self, desired: &DesiredState, changes: &Changes) {
        for fe in &changes.changed {
            let spec = desired.frontends[fe].clone();
            for b in &spec.known {
                *self.refs.entry(*b).or_insert(0) += 1;
            }
            if let Some(prev) = self.state.frontends.insert(*fe, spec) {
                for b in &prev.known {
                    dec(&mut self.refs, b);
                }
            }
        }
        for fe in &changes.gone {
            if let Some(prev) = self.state.frontends.remove(fe) {
                for b in &prev.known {
                    dec(&mut self.refs, b);
                }
            }
        }
    }
}

fn dec(refs: &mut HashMap<BackendAddr, u32>, b: &BackendAddr) {
    if let Some(n) = refs.get_mut(b) {
        *n -= 1;
        if *n == 0 {
            refs.remove(b);
        }
    }
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
                    kind: Default::default(),
                    active,
                    known,
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
            .map(|id| backend_addr(&s.backends[id]))
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
            d.frontends.append(&mut s.frontends);
        }
        d
    }

    #[test]
    fn incremental_plans_reach_the_same_maps_as_full_plans() {
        let mut r = Rng(0x9e37_79b9_7f4a_7c15);
        let (mut full, mut inc) = (MapState::default(), MapState::default());
        let mut applied = Applied::default();
        for step in 0..300 {
            let d = random_state(&mut r);
            let (next_full, _) = applied_ops(&full, &d);
            let changes = applied.changes(&d);
            let ops = plan_incremental(&inc, &applied, &d, &changes);
            for op in &ops {
                inc.apply(op);
            }
            applied.advance(&d, &changes);
            assert_eq!(applied, Applied::new(d.clone()), "step {step}: bookkeeping");
            full = next_full;
            assert_eq!(
                (&inc.frontends, &inc.slots, &inc.backends),
                (&full.frontends, &full.slots, &full.backends),
                "step {step}"
            );
            assert_eq!(plan(&inc, &d), vec![], "step {step}: nothing left to do");
            for f in d.frontends.keys() {
                assert_eq!(resolve(&inc, f), d.frontends[f].active, "step {step}");
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
        let applied = Applied::new(d.clone());
        assert!(plan_incremental(&s, &applied, &d, &applied.changes(&d)).is_empty());
        let mut d2 = d.clone();
        d2.frontends
            .get_mut(&fe(7, 80))
            .unwrap()
            .active
            .remove(&be(3));
        let ops = plan_incremental(&s, &applied, &d2, &applied.changes(&d2));
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
        for (id, b) in &s.backends {
            assert_eq!(s2.backends[id], *b);
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
        assert!(s2.backends.values().any(|b| *b == backend_value(&be(3))));
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
            s2.backends.len(),
            1,
            "backend 2 is still used by 10:80, 3 is gone"
        );
        assert_eq!(s2.slots.len(), 1);
        assert_eq!(s2.frontends.len(), 1);
    }

    #[test]
    fn frontend_without_ready_backend_has_count_zero() {
        let (s, _) = applied_ops(&MapState::default(), &state(&[(fe(10, 80), &[], &[3])]));
        let f = s.frontends[&frontend_key(&fe(10, 80))];
        assert_eq!(f.count, 0);
        assert_eq!(s.backends.len(), 1);
    }

    #[test]
    fn orphan_slots_from_an_interrupted_update_are_removed() {
        let (mut s, _) = applied_ops(&MapState::default(), &state(&[(fe(10, 80), &[2], &[])]));
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
        let (s2, _) = applied_ops(&s, &state(&[(fe(10, 80), &[2], &[])]));
        assert_eq!(s2.slots.len(), 1);
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
        let bids: BTreeSet<u32> = s3.backends.keys().copied().collect();
        assert_eq!(
            bids,
            [1, 3].into(),
            "backend 4 kept id 3; backend 5 took freed id 1"
        );
    }
}
