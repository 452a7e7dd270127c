//! The dataplane writer: keeps the kernel maps equal to the desired state by applying
//! the diff computed in `plan`, never a flush. A mirror of what was written avoids
//! re-reading the maps on every sync; it is seeded from the maps at start, so an agent
//! restarted on pinned maps continues where the last one stopped.
//!
//! - `maps`: handles on the kernel maps (open, read, write one op or a batch);
//! - `batch`: the batch syscalls aya does not wrap;
//! - `ct_filter`: the conntrack filter in front of `LB_CONNTRACK` (its rebuild);
//! - `gc`: conntrack's collector (expiry, purges, and the filter's rebuilds);
//! - `plan`: the diff (pure);
//! - `writer`: the thread that owns the model and this writer, fed by a source.
pub mod batch;
pub mod ct_filter;
pub mod gc;
mod maps;
pub mod plan;
pub mod writer;

use ahash::AHashSet as HashSet;
use lb_common::{NodeConfig, SlotKey, DEFAULT_SNAT_PORT_MAX, DEFAULT_SNAT_PORT_MIN};
pub use maps::{Conntrack, Counters, Maps};
use plan::{MapState, Op, RefChanges, Refs};

use crate::{
    model::{Delta, DesiredState, SnatSources},
    Result,
};

/// What one sync did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub ops: usize,
    pub errors: Vec<String>,
    /// UDP backends that left a frontend's ready set (or were deleted): (frontend id,
    /// backend id). Their conntrack flows are purged at once (`gc`), as kube-proxy
    /// clears them, so a client's next datagram reaches a live backend.
    pub udp_gone: gc::Purge,
}

/// What a drift check found changed in the maps behind the agent's back: entries (by
/// key) present on one side only or different, per map.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Drift {
    pub frontends: usize,
    pub slots: usize,
    pub backends: usize,
    pub ranges: usize,
    /// Frontends whose Maglev table's cells differ.
    pub tables: usize,
    /// `LB_NODE` differs.
    pub node: bool,
    /// Words of `LB_FE_FILTER` that differ.
    pub filter: usize,
}

impl Drift {
    pub fn entries(&self) -> usize {
        self.frontends
            + self.slots
            + self.backends
            + self.ranges
            + self.tables
            + self.node as usize
            + self.filter
    }
}

/// How many keys differ between two sorted lists of (key, value): missing on either
/// side, or with another value.
fn differing<K: Ord, V: PartialEq>(a: &[(K, V)], b: &[(K, V)]) -> usize {
    let (mut i, mut j, mut n) = (0, 0, 0);
    while i < a.len() || j < b.len() {
        match (a.get(i), b.get(j)) {
            (Some(x), Some(y)) if x.0 == y.0 => {
                n += (x.1 != y.1) as usize;
                i += 1;
                j += 1;
            }
            (Some(x), Some(y)) if x.0 < y.0 => {
                n += 1;
                i += 1;
            }
            (Some(_), None) => {
                n += 1;
                i += 1;
            }
            _ => {
                n += 1;
                j += 1;
            }
        }
    }
    n
}

/// Maps plus the mirror of their content.
pub struct Dataplane {
    pub maps: Maps,
    mirror: MapState,
    /// How many frontends list each backend, once a sync fully succeeded: later syncs
    /// then look only at what changed. `None` (at start, after a failed op): compare all.
    refs: Option<Refs>,
    /// `LB_NODE` as last read or written.
    node: NodeConfig,
    /// `LB_FE_FILTER` as last read or written (`plan::filter`).
    filter: plan::filter::Words,
    /// Whether `filter` is the filter of the mirror's frontends: then a plan that adds
    /// and removes none (an endpoint change rewrites its frontends' values only) leaves
    /// the filter alone, without hashing every frontend's address twice (a few
    /// milliseconds a sync at 100,000 Services).
    filter_current: bool,
    /// Where the next drift check's slice of Maglev tables starts (a table base).
    table_cursor: u32,
    /// Cells of Maglev tables one drift check reads (`DRIFT_CHECK_CELLS`).
    check_cells: u64,
}

/// Maglev cells a drift check reads back: the other tables' cells are taken as the
/// mirror has them, and the next checks go on from where this one stopped, so every
/// table is read within `cells in use / DRIFT_CHECK_CELLS` checks (all of them at every
/// check up to about 1,000 Services; at 10,000 Services of 1 to 10 endpoints, 2.7 M
/// cells, about 11 checks, 5 minutes at the default 30 s). Reading them all took about
/// a second of CPU there, every 30 s (0.12-0.16 s a check now); the frontends, slots
/// and source ranges are still read whole at every check, the backends up to the
/// highest id in use.
pub const DRIFT_CHECK_CELLS: u64 = 262_144;

/// The datapath's view of this node: the SNAT sources, and the default port range when
/// there is one.
pub fn node_config(snat: &SnatSources) -> NodeConfig {
    let addr = |a: Option<std::net::IpAddr>| a.map(|a| plan::map_addr(&a)).unwrap_or([0; 4]);
    let any = snat.v4.is_some() || snat.v6.is_some();
    NodeConfig {
        snat_v4: addr(snat.v4),
        snat_v6: addr(snat.v6),
        snat_port_min: if any { DEFAULT_SNAT_PORT_MIN } else { 0 },
        snat_port_max: if any { DEFAULT_SNAT_PORT_MAX } else { 0 },
        _pad: 0,
    }
}

impl Dataplane {
    pub fn new(maps: Maps) -> Result<Self> {
        let mirror = maps.read_state()?;
        let node = maps.node_config()?;
        let filter = maps.frontend_filter()?;
        Ok(Self {
            maps,
            mirror,
            refs: None,
            node,
            filter,
            filter_current: false,
            table_cursor: 0,
            check_cells: DRIFT_CHECK_CELLS,
        })
    }

    /// How many Maglev cells each drift check reads (tests of the rotation).
    pub fn with_check_cells(mut self, cells: u64) -> Self {
        self.check_cells = cells.max(1);
        self
    }

    /// The bases of the mirror's tables this drift check reads: from the cursor on, in
    /// base order and round to the start, until `check_cells` cells; and where the next
    /// check starts.
    fn tables_to_check(&self) -> (HashSet<u32>, u32) {
        let tables = self.mirror.owned_tables();
        let start = tables.partition_point(|(b, _)| *b < self.table_cursor);
        let mut chosen = HashSet::default();
        let mut cells = 0u64;
        let mut next = 0;
        for i in 0..tables.len() {
            let (base, size) = tables[(start + i) % tables.len()];
            if cells >= self.check_cells {
                next = base;
                break;
            }
            chosen.insert(base);
            cells += size as u64;
        }
        (chosen, next)
    }

    pub fn state(&self) -> &MapState {
        &self.mirror
    }

    /// Reads the maps back and compares them with the mirror. If they differ (someone
    /// changed entries behind the agent's back), the mirror takes what the maps hold and
    /// the next sync compares everything, which rewrites what differs (and only that).
    /// The Maglev tables are read a slice at a time (`DRIFT_CHECK_CELLS`); the others
    /// count as holding what the mirror says.
    pub fn check_drift(&mut self) -> Result<Option<Drift>> {
        let (check, next) = self.tables_to_check();
        let mirror = &self.mirror;
        let read = self
            .maps
            .read_state_with(Some(mirror.backend_ids_end()), |base, size| {
                (!check.contains(&base))
                    .then(|| mirror.table_cells(base, size))
                    .flatten()
            })?;
        self.table_cursor = next;
        let node = self.maps.node_config()?;
        let filter = self.maps.frontend_filter()?;
        let (have, want) = (read.content(), self.mirror.content());
        if have == want && node == self.node && filter == self.filter {
            return Ok(None);
        }
        let unit = |v: &[plan::RangeKey]| v.iter().map(|k| (*k, ())).collect::<Vec<_>>();
        let drift = Drift {
            frontends: differing(&have.frontends, &want.frontends),
            slots: differing(&have.slots, &want.slots),
            backends: differing(&have.backends, &want.backends),
            ranges: differing(&unit(&have.ranges), &unit(&want.ranges)),
            tables: differing(&have.tables, &want.tables),
            node: node != self.node,
            filter: plan::filter::changed(&filter, &self.filter).len(),
        };
        self.mirror = read;
        self.node = node;
        self.filter = filter;
        self.filter_current = false;
        self.refs = None;
        Ok(Some(drift))
    }

    /// Applies the diff between the maps and `desired`, comparing everything.
    pub fn sync(&mut self, desired: &DesiredState) -> SyncReport {
        self.sync_delta(desired, None)
    }

    /// Applies what `delta` changed, given the maps hold the state before it (the last
    /// sync succeeded): O(change). Otherwise (or with `None`) compares everything. A
    /// failed op is reported and skipped (the mirror keeps what the kernel really has),
    /// and the next sync compares everything again, so it retries.
    pub fn sync_delta(&mut self, desired: &DesiredState, delta: Option<&Delta>) -> SyncReport {
        let t0 = std::time::Instant::now();
        let mut node_error = None;
        let node = node_config(&desired.snat);
        if node != self.node {
            // Written before the frontends: a backend marked remote is only ever chosen
            // with the source it needs already there.
            match self.maps.set_node_config(&node) {
                Ok(()) => self.node = node,
                Err(e) => node_error = Some(e.to_string()),
            }
        }
        let (ops, changes): (Vec<Op>, Option<RefChanges>) = match (&self.refs, delta) {
            (Some(refs), Some(delta)) => {
                let (ops, changes) = plan::plan_delta(&self.mirror, refs, desired, delta);
                (ops, Some(changes))
            }
            _ => (plan::plan(&self.mirror, desired), None),
        };
        let t_plan = t0.elapsed();
        let mut report = self.apply(ops);
        report.errors.extend(node_error);
        let t_apply = t0.elapsed();
        self.refs = match (report.errors.is_empty(), changes, self.refs.take()) {
            (true, Some(changes), Some(mut refs)) => {
                refs.apply(&changes);
                Some(refs)
            }
            (true, _, _) => Refs::count(desired, &self.mirror),
            (false, _, _) => None,
        };
        tracing::debug!(
            ops = report.ops,
            plan_us = t_plan.as_micros() as u64,
            apply_us = (t_apply - t_plan).as_micros() as u64,
            record_us = (t0.elapsed() - t_apply).as_micros() as u64,
            "dataplane sync"
        );
        report
    }

    /// Writes a plan: ops come grouped by kind (see `Op::rank`); each group goes in
    /// batches, and after a batch failure the rest of that batch goes one by one, so
    /// every error is named and every other entry still lands.
    ///
    /// A frontend's count is written only as far as its slots really hold backends: if
    /// a slot (or the backend it names) could not be written, the count stops before it,
    /// so no new connection is hashed to a slot that is not there; and a frontend whose
    /// Maglev table could not be written (or whose count was cut) is written without one.
    ///
    /// The frontend filter brackets the plan (`plan::filter`): the bits of the frontends
    /// it adds are set first, those of the frontends it removed cleared last (a plan
    /// that adds and removes none leaves it alone). A word
    /// that could not be written is an error like a failed op: the next sync writes it
    /// again (until then, a frontend whose bit is missing is not found by new flows).
    fn apply(&mut self, mut ops: Vec<Op>) -> SyncReport {
        let mut report = SyncReport {
            ops: ops.len(),
            ..Default::default()
        };
        let filter_changes = !self.filter_current
            || ops.iter().any(|op| match op {
                Op::PutFrontend(k, _) => !self.mirror.frontends.contains_key(k),
                Op::DelFrontend(_) => true,
                _ => false,
            });
        if filter_changes {
            let before = plan::filter::before(&self.mirror, &ops);
            self.write_filter(&before, &mut report.errors);
        }
        // The UDP backends in the slots of each frontend the ops touch, before.
        let mut touched: Vec<u32> = ops
            .iter()
            .filter_map(|op| match op {
                Op::PutSlot(k, _) | Op::DelSlot(k) => Some(k.service_id),
                Op::DelFrontend(k) => self.mirror.frontends.get(k).map(|f| f.service_id),
                _ => None,
            })
            .collect();
        touched.sort_unstable();
        touched.dedup();
        let udp_before: Vec<(u32, Vec<u32>)> = touched
            .iter()
            .map(|&sid| (sid, self.udp_slot_ids(sid)))
            .collect();
        let mut failed_slots: HashSet<SlotKey> = HashSet::new();
        let mut failed_tables: HashSet<u32> = HashSet::new();
        let mut i = 0;
        while i < ops.len() {
            let rank = ops[i].rank();
            let mut end = i;
            while end < ops.len() && end - i < batch::CHUNK && ops[end].rank() == rank {
                end += 1;
            }
            if !report.errors.is_empty() {
                for op in &mut ops[i..end] {
                    if let Op::PutFrontend(_, f) = op {
                        let count = self.usable_slots(f.service_id, f.count, &failed_slots);
                        // A table that was not written, or that names slots past the
                        // count: none (the datapath hashes over the usable slots).
                        if count != f.count || failed_tables.contains(&f.service_id) {
                            f.table_base = 0;
                            f.table_size = 0;
                        }
                        f.count = count;
                    }
                }
            }
            let run = &ops[i..end];
            let done = if run.len() > 1 {
                self.maps.apply_batch(run)
            } else {
                0
            };
            for op in &run[..done] {
                self.mirror.apply(op);
            }
            for op in &run[done..] {
                match self.maps.apply_one(op) {
                    Ok(()) => self.mirror.apply(op),
                    Err(e) => {
                        match op {
                            Op::PutSlot(k, _) => {
                                failed_slots.insert(*k);
                            }
                            Op::PutTable(t) => {
                                failed_tables.insert(t.service_id);
                            }
                            _ => {}
                        }
                        report.errors.push(e);
                    }
                }
            }
            i = end;
        }
        if filter_changes {
            let after = plan::filter::of(&self.mirror);
            let errors = report.errors.len();
            self.write_filter(&after, &mut report.errors);
            self.filter_current = report.errors.len() == errors;
        }
        for (sid, before) in udp_before {
            let after = self.udp_slot_ids(sid);
            report.udp_gone.extend(
                before
                    .into_iter()
                    .filter(|id| !after.contains(id))
                    .map(|id| (sid, id)),
            );
        }
        report
    }

    /// Writes the words of `want` that `LB_FE_FILTER` does not hold.
    fn write_filter(&mut self, want: &[u64], errors: &mut Vec<String>) {
        for (i, word) in plan::filter::changed(&self.filter, want) {
            match self.maps.set_frontend_filter_word(i, word) {
                Ok(()) => self.filter[i as usize] = word,
                Err(e) => errors.push(e.to_string()),
            }
        }
    }

    /// The UDP backends in the slots of frontend `service_id`.
    fn udp_slot_ids(&self, service_id: u32) -> Vec<u32> {
        let mut ids: Vec<u32> = self
            .mirror
            .slot_ids(service_id)
            .iter()
            .copied()
            .filter(|id| {
                self.mirror
                    .backend(*id)
                    .is_some_and(|b| b.proto == lb_common::PROTO_UDP)
            })
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// How many of slots `1..=count` hold what the plan wrote there, in a row from the
    /// first: a slot whose write failed, or that names a backend the maps lack, ends it.
    fn usable_slots(&self, service_id: u32, count: u32, failed: &HashSet<SlotKey>) -> u32 {
        (1..=count)
            .take_while(|&slot| {
                !failed.contains(&SlotKey { service_id, slot })
                    && self
                        .mirror
                        .slot(service_id, slot)
                        .is_some_and(|id| self.mirror.backend(id).is_some())
            })
            .count() as u32
    }
}
