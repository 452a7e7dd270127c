//! The dataplane writer: keeps the kernel maps equal to the desired state by applying
//! the diff computed in `plan`, never a flush. A mirror of what was written avoids
//! re-reading the maps on every sync; it is seeded from the maps at start, so an agent
//! restarted on pinned maps continues where the last one stopped.
pub mod batch;
pub mod plan;

use std::{
    os::fd::{AsFd, OwnedFd},
    path::Path,
};

use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use lb_common::{
    counter, Backend, CtKey, CtValue, Frontend, FrontendKey, Slot, SlotKey, MAP_BACKENDS,
    MAP_CONNTRACK, MAP_COUNTERS, MAP_FRONTENDS, MAP_SLOTS,
};
pub use plan::{Applied, MapState, Op};

use crate::{model::DesiredState, Error, Result};

/// Handles on the five maps.
pub struct Maps {
    pub frontends: HashMap<MapData, FrontendKey, Frontend>,
    pub slots: HashMap<MapData, SlotKey, Slot>,
    /// An array indexed by backend id; an unused id holds zeroes (see `NO_BACKEND`).
    pub backends: Array<MapData, Backend>,
    pub conntrack: HashMap<MapData, CtKey, CtValue>,
    pub counters: PerCpuArray<MapData, u64>,
    /// Duplicated fds of the three service maps, for batch updates.
    batch_fds: [OwnedFd; 3],
}

const FRONTENDS: usize = 0;
const SLOTS: usize = 1;
const BACKENDS: usize = 2;

/// What an unused backend id holds.
const NO_BACKEND: Backend = Backend {
    addr: 0,
    port: 0,
    proto: 0,
    flags: 0,
};

fn dup_fd(name: &str, map: &Map) -> Result<OwnedFd> {
    let data = match map {
        Map::HashMap(d) | Map::LruHashMap(d) | Map::Array(d) => d,
        _ => return Err(map_err(name, "not a hash map or an array")),
    };
    data.fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| map_err(name, e))
}

fn map_err(name: &str, e: impl std::fmt::Display) -> Error {
    Error::Map(format!("{name}: {e}"))
}

impl Maps {
    /// Takes the maps out of a freshly loaded object.
    pub fn take(ebpf: &mut aya::Ebpf) -> Result<Self> {
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| map_err(name, "not in the eBPF object"))
        };
        let (f, s, b, c, n) = (
            take(MAP_FRONTENDS)?,
            take(MAP_SLOTS)?,
            take(MAP_BACKENDS)?,
            take(MAP_CONNTRACK)?,
            take(MAP_COUNTERS)?,
        );
        Self::from_maps(f, s, b, c, n)
    }

    /// Opens the maps a running (or stopped, pins kept) agent pinned under `dir`.
    pub fn from_pins(dir: &Path) -> Result<Self> {
        let open = |name: &str| -> Result<Map> {
            let path = dir.join(name);
            let data = MapData::from_pin(&path).map_err(|e| {
                map_err(
                    name,
                    format!(
                        "cannot open {}: {e} (is the agent running with --pin-dir {}?)",
                        path.display(),
                        dir.display()
                    ),
                )
            })?;
            Map::from_map_data(data).map_err(|e| map_err(name, e))
        };
        Self::from_maps(
            open(MAP_FRONTENDS)?,
            open(MAP_SLOTS)?,
            open(MAP_BACKENDS)?,
            open(MAP_CONNTRACK)?,
            open(MAP_COUNTERS)?,
        )
    }

    fn from_maps(f: Map, s: Map, b: Map, c: Map, n: Map) -> Result<Self> {
        let batch_fds = [
            dup_fd(MAP_FRONTENDS, &f)?,
            dup_fd(MAP_SLOTS, &s)?,
            dup_fd(MAP_BACKENDS, &b)?,
        ];
        Ok(Self {
            batch_fds,
            frontends: HashMap::try_from(f).map_err(|e| map_err(MAP_FRONTENDS, e))?,
            slots: HashMap::try_from(s).map_err(|e| map_err(MAP_SLOTS, e))?,
            backends: Array::try_from(b).map_err(|e| map_err(MAP_BACKENDS, e))?,
            conntrack: HashMap::try_from(c).map_err(|e| map_err(MAP_CONNTRACK, e))?,
            counters: PerCpuArray::try_from(n).map_err(|e| map_err(MAP_COUNTERS, e))?,
        })
    }

    /// Reads the service maps (not conntrack) into a mirror.
    pub fn read_state(&self) -> Result<MapState> {
        let mut st = MapState::default();
        for kv in self.frontends.iter() {
            let (k, v) = kv.map_err(|e| map_err(MAP_FRONTENDS, e))?;
            st.frontends.insert(k, v);
        }
        for kv in self.slots.iter() {
            let (k, v) = kv.map_err(|e| map_err(MAP_SLOTS, e))?;
            st.slots.insert(k, v.backend_id);
        }
        let backends: Vec<(u32, Backend)> = match batch::lookup_all(&self.batch_fds[BACKENDS]) {
            Ok(all) => all,
            // No batch lookup (before 5.6): one syscall per index.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => self
                .backends
                .iter()
                .enumerate()
                .map(|(id, v)| v.map(|v| (id as u32, v)))
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| map_err(MAP_BACKENDS, e))?,
            Err(e) => return Err(map_err(MAP_BACKENDS, e)),
        };
        st.backends
            .extend(backends.into_iter().filter(|(_, v)| *v != NO_BACKEND));
        st.reindex();
        Ok(st)
    }

    fn apply_one(&mut self, op: &Op) -> std::result::Result<(), String> {
        let r = match op {
            Op::PutBackend(id, b) => self.backends.set(*id, b, 0),
            Op::PutSlot(k, id) => self.slots.insert(k, Slot { backend_id: *id }, 0),
            Op::PutFrontend(k, f) => self.frontends.insert(k, f, 0),
            Op::DelSlot(k) => self.slots.remove(k),
            Op::DelFrontend(k) => self.frontends.remove(k),
            Op::DelBackend(id) => self.backends.set(*id, NO_BACKEND, 0),
        };
        r.map_err(|e| {
            let cause = std::error::Error::source(&e)
                .map(|c| format!(": {c}"))
                .unwrap_or_default();
            format!("{op:?}: {e}{cause}")
        })
    }

    /// Applies a run of ops of one kind with batch syscalls; returns how many of the
    /// run's ops (from the start) the kernel took before the first failure.
    fn apply_batch(&mut self, run: &[Op]) -> usize {
        fn keys_values<K: Copy, V: Copy>(
            run: &[Op],
            f: impl Fn(&Op) -> (K, V),
        ) -> (Vec<K>, Vec<V>) {
            run.iter().map(f).unzip()
        }
        let r = match &run[0] {
            Op::PutBackend(..) => {
                let (k, v) = keys_values(run, |op| match op {
                    Op::PutBackend(id, b) => (*id, *b),
                    _ => unreachable!("runs hold one kind"),
                });
                batch::update(&self.batch_fds[BACKENDS], &k, &v)
            }
            Op::PutSlot(..) => {
                let (k, v) = keys_values(run, |op| match op {
                    Op::PutSlot(k, id) => (*k, Slot { backend_id: *id }),
                    _ => unreachable!("runs hold one kind"),
                });
                batch::update(&self.batch_fds[SLOTS], &k, &v)
            }
            Op::PutFrontend(..) => {
                let (k, v) = keys_values(run, |op| match op {
                    Op::PutFrontend(k, f) => (*k, *f),
                    _ => unreachable!("runs hold one kind"),
                });
                batch::update(&self.batch_fds[FRONTENDS], &k, &v)
            }
            Op::DelFrontend(..) => {
                let (k, _): (Vec<FrontendKey>, Vec<()>) = keys_values(run, |op| match op {
                    Op::DelFrontend(k) => (*k, ()),
                    _ => unreachable!("runs hold one kind"),
                });
                batch::delete(&self.batch_fds[FRONTENDS], &k)
            }
            Op::DelSlot(..) => {
                let (k, _): (Vec<SlotKey>, Vec<()>) = keys_values(run, |op| match op {
                    Op::DelSlot(k) => (*k, ()),
                    _ => unreachable!("runs hold one kind"),
                });
                batch::delete(&self.batch_fds[SLOTS], &k)
            }
            // An array entry cannot be deleted: it is zeroed.
            Op::DelBackend(..) => {
                let (k, v) = keys_values(run, |op| match op {
                    Op::DelBackend(id) => (*id, NO_BACKEND),
                    _ => unreachable!("runs hold one kind"),
                });
                batch::update(&self.batch_fds[BACKENDS], &k, &v)
            }
        };
        match r {
            Ok(()) => run.len(),
            Err((done, _)) => done,
        }
    }

    /// Sums of the per-CPU counters, in `counter::NAMES` order.
    pub fn counters(&self) -> Result<Vec<(&'static str, u64)>> {
        let mut out = Vec::new();
        for (i, name) in counter::NAMES.iter().enumerate() {
            let values = self
                .counters
                .get(&(i as u32), 0)
                .map_err(|e| map_err(MAP_COUNTERS, e))?;
            out.push((*name, values.iter().sum()));
        }
        Ok(out)
    }

    /// All conntrack entries (for the CLI).
    pub fn conntrack_entries(&self) -> Result<Vec<(CtKey, CtValue)>> {
        self.conntrack
            .iter()
            .map(|kv| kv.map_err(|e| map_err(MAP_CONNTRACK, e)))
            .collect()
    }
}

/// What one sync did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub ops: usize,
    pub errors: Vec<String>,
}

/// Maps plus the mirror of their content.
pub struct Dataplane {
    pub maps: Maps,
    mirror: MapState,
    /// The desired state the mirror equals, once a sync fully succeeded: later syncs
    /// then look only at what changed. `None` (at start, after a failed op): compare all.
    applied: Option<Applied>,
}

impl Dataplane {
    pub fn new(maps: Maps) -> Result<Self> {
        let mirror = maps.read_state()?;
        Ok(Self {
            maps,
            mirror,
            applied: None,
        })
    }

    pub fn state(&self) -> &MapState {
        &self.mirror
    }

    /// Applies the diff between the maps and `desired`. A failed op is reported and
    /// skipped (the mirror keeps what the kernel really has), and the next sync compares
    /// everything again, so it retries.
    pub fn sync(&mut self, desired: &DesiredState) -> SyncReport {
        let t0 = std::time::Instant::now();
        let changes = self.applied.as_ref().map(|a| a.changes(desired));
        let ops = match (&self.applied, &changes) {
            (Some(applied), Some(changes)) => {
                plan::plan_incremental(&self.mirror, applied, desired, changes)
            }
            _ => plan::plan(&self.mirror, desired),
        };
        let t_plan = t0.elapsed();
        let mut report = SyncReport {
            ops: ops.len(),
            errors: Vec::new(),
        };
        // Ops come grouped by kind (see `Op::rank`): each group goes in batches; after a
        // batch failure the rest of that batch goes one by one, so every error is named
        // and every other entry still lands.
        let mut i = 0;
        while i < ops.len() {
            let rank = ops[i].rank();
            let mut end = i;
            while end < ops.len() && end - i < batch::CHUNK && ops[end].rank() == rank {
                end += 1;
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
                    Err(e) => report.errors.push(e),
                }
            }
            i = end;
        }
        let t_apply = t0.elapsed();
        if report.errors.is_empty() {
            match (&mut self.applied, &changes) {
                (Some(applied), Some(changes)) => applied.advance(desired, changes),
                _ => self.applied = Some(Applied::new(desired.clone())),
            }
        } else {
            self.applied = None;
        }
        tracing::debug!(
            ops = report.ops,
            plan_us = t_plan.as_micros() as u64,
            apply_us = (t_apply - t_plan).as_micros() as u64,
            record_us = (t0.elapsed() - t_apply).as_micros() as u64,
            "dataplane sync"
        );
        report
    }
}
