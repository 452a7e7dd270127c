//! The diff: the mirror against the desired state, as a short list of map operations.
//!
//! Two entry points: [`plan`] compares everything (at start, when the mirror was just
//! read from the maps, and after a failed op), and [`plan_delta`] looks only at the
//! frontends the model says changed ([`Delta`]), so the cost of a change is proportional
//! to the change, not to the number of Services.
//!
//! Minimal writes: a backend keeps its id and a remaining backend keeps its slot; a
//! removed backend's slot is filled by the last slot (swap-remove), so removing one
//! backend rewrites at most one slot, and adding one writes one slot. A frontend whose
//! ready set changed gets a new Maglev table (`maglev`) in a free region of
//! `LB_MAGLEV`, written before the frontend is pointed at it: the swap is the one
//! update of the frontend's value.
use std::collections::{BTreeMap, BTreeSet};

use ahash::{AHashMap as HashMap, AHashSet as HashSet};
use lb_common::{Frontend, FrontendKey, SlotKey};

use super::{
    ids::IdPool,
    maglev,
    mirror::{backend_addr, backend_value, frontend_key, range_key, MapState, Op, RangeKey, Table},
};
use crate::model::{BackendAddr, Delta, DesiredState, FrontendAddr, FrontendSpec};

/// How many frontends list each backend (as `known`), by backend id, in the state the
/// maps were last brought to: on a change, what tells whether a backend is still needed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Refs(Vec<u32>);

/// Changes to [`Refs`] that a plan implies once applied: (backend id, difference).
pub type RefChanges = Vec<(u32, i64)>;

impl Refs {
    /// The counts for `desired`, once the maps hold it (`None` if a backend it lists is
    /// missing from the mirror).
    pub fn count(desired: &DesiredState, mirror: &MapState) -> Option<Self> {
        let mut refs = Refs::default();
        for spec in desired.frontends.values() {
            for b in spec.known.iter() {
                let id = mirror.backend_id(b)? as usize;
                if refs.0.len() <= id {
                    refs.0.resize(id + 1, 0);
                }
                refs.0[id] += 1;
            }
        }
        Some(refs)
    }

    fn get(&self, id: u32) -> u32 {
        self.0.get(id as usize).copied().unwrap_or(0)
    }

    /// The counts without trailing zeroes (for comparing two `Refs`).
    #[cfg(test)]
    pub fn trimmed(&self) -> Vec<u32> {
        let mut v = self.0.clone();
        while v.last() == Some(&0) {
            v.pop();
        }
        v
    }

    /// Applies the changes of a plan whose ops all succeeded.
    pub fn apply(&mut self, changes: &RefChanges) {
        for (id, d) in changes {
            let at = *id as usize;
            if self.0.len() <= at {
                self.0.resize(at + 1, 0);
            }
            self.0[at] = (self.0[at] as i64 + d).max(0) as u32;
        }
    }
}

/// Ids allocated while planning (the mirror only learns them when ops are applied).
struct Alloc {
    backend_pool: IdPool,
    service_pool: IdPool,
    new_backends: HashMap<BackendAddr, u32>,
    /// Regions of `LB_MAGLEV` this plan's tables take (base, cells). Regions the plan
    /// frees are not reused before it is applied: a packet may still read them.
    tables: BTreeMap<u32, u32>,
}

impl Alloc {
    fn new(current: &MapState) -> Self {
        let (backend_pool, service_pool) = current.pools();
        Self {
            backend_pool,
            service_pool,
            new_backends: HashMap::new(),
            tables: BTreeMap::new(),
        }
    }

    /// A free region of `size` cells of `LB_MAGLEV`, if there is one.
    fn table(&mut self, current: &MapState, size: u32) -> Option<u32> {
        let base = current.table_space().find(size, &self.tables)?;
        self.tables.insert(base, size);
        Some(base)
    }

    fn backend(&self, current: &MapState, b: &BackendAddr) -> Option<u32> {
        current
            .backend_id(b)
            .or_else(|| self.new_backends.get(b).copied())
    }

    /// Writes `b` unless the maps (or this plan) already have it; returns its id.
    fn ensure_backend(&mut self, current: &MapState, b: &BackendAddr, ops: &mut Vec<Op>) -> u32 {
        if let Some(id) = self.backend(current, b) {
            return id;
        }
        let id = self.backend_pool.take();
        self.new_backends.insert(*b, id);
        ops.push(Op::PutBackend(id, backend_value(b)));
        id
    }
}

/// The ops for one wanted frontend (its backends already ensured).
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
        .map(|b| {
            alloc
                .backend(current, b)
                .expect("every listed backend is written before its frontend")
        })
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
    let (table_base, table_size) = plan_table(current, alloc, spec, service_id, cur, &slots, ops);

    for (i, id) in slots.iter().enumerate() {
        if cur_slots.get(i) != Some(id) {
            let k = SlotKey {
                service_id,
                slot: i as u32 + 1,
            };
            ops.push(Op::PutSlot(k, *id));
        }
    }
    // Source ranges: the new ones before the frontend names them, the old ones after.
    let want_ranges: BTreeSet<RangeKey> = spec
        .source_ranges
        .iter()
        .map(|r| range_key(service_id, r))
        .collect();
    let have_ranges = current.ranges_of(service_id);
    ops.extend(
        want_ranges
            .iter()
            .filter(|k| have_ranges.binary_search(k).is_err())
            .map(|k| Op::PutRange(*k)),
    );
    ops.extend(
        have_ranges
            .iter()
            .filter(|k| !want_ranges.contains(k))
            .map(|k| Op::DelRange(*k)),
    );
    let mut flags = spec.kind.flags();
    if spec.local {
        flags |= lb_common::FRONTEND_F_LOCAL;
    }
    if spec.host_only {
        flags |= lb_common::FRONTEND_F_HOST_ONLY;
    }
    if !want_ranges.is_empty() {
        flags |= lb_common::FRONTEND_F_SOURCE_RANGES;
    }
    let value = Frontend {
        service_id,
        count: slots.len() as u32,
        flags,
        affinity_timeout_s: spec.affinity_timeout_s,
        table_base,
        table_size,
    };
    if cur != Some(value) {
        ops.push(Op::PutFrontend(key, value));
    }
    // Slots left over above the new count.
    ops.extend(
        current
            .slots_from(service_id, slots.len() as u32 + 1)
            .into_iter()
            .map(Op::DelSlot),
    );
}

/// The Maglev table of a frontend whose slots will be `slots`: the one it has if that is
/// still right (the same size and cells), else a new one in a free region (written by
/// the plan), else none (`LB_MAGLEV` full: the datapath hashes over the slots).
/// Returns the frontend's (table_base, table_size).
fn plan_table(
    current: &MapState,
    alloc: &mut Alloc,
    spec: &FrontendSpec,
    service_id: u32,
    cur: Option<Frontend>,
    slots: &[u32],
    ops: &mut Vec<Op>,
) -> (u32, u32) {
    let size = maglev::resize(slots.len(), cur.map_or(0, |f| f.table_size));
    if size == 0 {
        return (0, 0);
    }
    let addr_of: HashMap<u32, BackendAddr> = spec
        .active
        .iter()
        .filter_map(|b| alloc.backend(current, b).map(|id| (id, *b)))
        .collect();
    let members: Vec<maglev::Member> = slots
        .iter()
        .enumerate()
        .map(|(i, id)| maglev::Member {
            backend: addr_of[id],
            id: *id,
            slot: i as u32 + 1,
        })
        .collect();
    let cells = maglev::populate(&members, size);
    if let Some(f) = cur {
        if current.table(&f).is_some_and(|have| have == &cells[..]) {
            return (f.table_base, f.table_size);
        }
    }
    match alloc.table(current, size) {
        Some(base) => {
            ops.push(Op::PutTable(Table {
                service_id,
                base,
                cells: cells.into(),
            }));
            (base, size)
        }
        None => (0, 0),
    }
}

/// A frontend that is no longer wanted: the frontend first, then its slots and ranges.
fn plan_gone_frontend(current: &MapState, key: &FrontendKey, ops: &mut Vec<Op>) {
    if let Some(f) = current.frontends.get(key) {
        ops.push(Op::DelFrontend(*key));
        ops.extend(
            current
                .slots_from(f.service_id, 1)
                .into_iter()
                .map(Op::DelSlot),
        );
        ops.extend(
            current
                .ranges_of(f.service_id)
                .iter()
                .map(|k| Op::DelRange(*k)),
        );
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
        .slots()
        .map(|(k, _)| k)
        .filter(|k| !deleted.contains(k))
        .filter(|k| {
            counts
                .get(&k.service_id)
                .is_none_or(|count| k.slot > *count)
        })
        .collect();
    orphan.sort();
    ops.extend(orphan.into_iter().map(Op::DelSlot));
    // Likewise source ranges of a service id no frontend will have.
    let mut orphan_ranges: Vec<RangeKey> = current
        .ranges()
        .filter(|k| !counts.contains_key(&k.data.service_id))
        .copied()
        .collect();
    orphan_ranges.sort();
    let planned: HashSet<RangeKey> = ops
        .iter()
        .filter_map(|op| match op {
            Op::DelRange(k) => Some(*k),
            _ => None,
        })
        .collect();
    ops.extend(
        orphan_ranges
            .into_iter()
            .filter(|k| !planned.contains(k))
            .map(Op::DelRange),
    );

    let mut unused: Vec<u32> = current
        .backends()
        .filter(|(_, b)| wanted.binary_search(&backend_addr(b)).is_err())
        .map(|(id, _)| id)
        .collect();
    unused.sort();
    ops.extend(unused.into_iter().map(Op::DelBackend));
    grouped(ops)
}

/// The ops that turn `current` (which holds the state `refs` counts) into `desired`,
/// looking only at the frontends in `delta`: O(change) work. Also returns how the
/// counts change once the ops are applied.
pub fn plan_delta(
    current: &MapState,
    refs: &Refs,
    desired: &DesiredState,
    delta: &Delta,
) -> (Vec<Op>, RefChanges) {
    let mut ops = Vec::new();
    let mut alloc = Alloc::new(current);

    // How many more (or fewer) frontends list each backend.
    let mut diff: BTreeMap<BackendAddr, i64> = BTreeMap::new();
    for (fe, old) in &delta.changed {
        if let Some(spec) = desired.frontends.get(fe) {
            for b in spec.known.iter() {
                *diff.entry(*b).or_insert(0) += 1;
            }
        }
        if let Some(old) = old {
            for b in old.known.iter() {
                *diff.entry(*b).or_insert(0) -= 1;
            }
        }
    }
    let mut changes = RefChanges::with_capacity(diff.len());
    let mut unused = Vec::new();
    for (b, d) in &diff {
        let id = current.backend_id(b);
        let after = id.map_or(0, |id| refs.get(id) as i64) + d;
        if after > 0 {
            let id = alloc.ensure_backend(current, b, &mut ops);
            changes.push((id, *d));
        } else if let Some(id) = id {
            unused.push(id);
            changes.push((id, *d));
        }
    }
    for (fe, _) in &delta.changed {
        match desired.frontends.get(fe) {
            Some(spec) => plan_frontend(current, &mut alloc, fe, spec, &mut ops),
            None => plan_gone_frontend(current, &frontend_key(fe), &mut ops),
        }
    }
    ops.extend(unused.into_iter().map(Op::DelBackend));
    (grouped(ops), changes)
}
