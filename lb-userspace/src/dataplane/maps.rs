//! Handles on the kernel maps: open them (from a fresh load or from their pins), read
//! them into a mirror, write plan ops one by one or in batches, read the counters.
use std::{
    os::fd::{AsFd, OwnedFd},
    path::Path,
    sync::Arc,
};

use aya::maps::{
    lpm_trie::{Key, LpmTrie},
    Array, HashMap, IterableMap, Map, MapData, PerCpuArray,
};
use lb_common::{
    counter, Backend, CtKey, CtValue, Frontend, FrontendKey, MaglevCell, NodeConfig, Slot, SlotKey,
    SnatPeer, SourceRange, FRONTEND_FILTER_WORDS, MAP_BACKENDS, MAP_CONNTRACK, MAP_COUNTERS,
    MAP_CT_FILTER, MAP_FE_FILTER, MAP_FRONTENDS, MAP_MAGLEV, MAP_NODE, MAP_SLOTS, MAP_SNAT,
    MAP_SOURCE_RANGES, SOURCE_RANGE_ALLOW,
};

use super::{
    batch,
    ct_filter::CtFilter,
    plan::{filter, MapState, Op, RangeKey, NO_BACKEND},
};
use crate::{Error, Result};

/// Handles on the maps (not the fragment notes, which only the datapath uses).
pub struct Maps {
    pub frontends: HashMap<MapData, FrontendKey, Frontend>,
    pub slots: HashMap<MapData, SlotKey, Slot>,
    /// An array indexed by backend id; an unused id holds zeroes (see `NO_BACKEND`).
    pub backends: Array<MapData, Backend>,
    pub conntrack: HashMap<MapData, CtKey, CtValue>,
    pub counters: PerCpuArray<MapData, u64>,
    /// This node's configuration, index 0.
    pub node: Array<MapData, NodeConfig>,
    /// loadBalancerSourceRanges: (frontend id, source prefix) -> allowed.
    pub source_ranges: LpmTrie<MapData, SourceRange, u32>,
    /// The other side of each SNAT (and hairpin) flow's translation, keyed like conntrack.
    pub snat: HashMap<MapData, CtKey, SnatPeer>,
    /// Every frontend's Maglev table, a region of cells each.
    pub maglev: Array<MapData, MaglevCell>,
    /// The frontend addresses' filter: a bit per hash of each (`FRONTEND_FILTER_WORDS`
    /// words).
    pub fe_filter: Array<MapData, u64>,
    /// The conntrack filter (`ct_filter`), mapped where it is used. The map itself, not
    /// a duplicate of its fd: the programs of a fresh load are loaded after the maps are
    /// taken, and refer to the maps by their first fds.
    ct_filter_map: MapData,
    /// Duplicated fds of the service maps, for batch updates.
    batch_fds: [OwnedFd; 5],
}

const FRONTENDS: usize = 0;
const SLOTS: usize = 1;
const BACKENDS: usize = 2;
const MAGLEV: usize = 3;
const FE_FILTER: usize = 4;

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
        Self::from_maps([
            take(MAP_FRONTENDS)?,
            take(MAP_SLOTS)?,
            take(MAP_BACKENDS)?,
            take(MAP_CONNTRACK)?,
            take(MAP_COUNTERS)?,
            take(MAP_NODE)?,
            take(MAP_SOURCE_RANGES)?,
            take(MAP_SNAT)?,
            take(MAP_MAGLEV)?,
            take(MAP_FE_FILTER)?,
            take(MAP_CT_FILTER)?,
        ])
    }

    /// Opens the maps a running (or stopped, pins kept) agent pinned under `dir`.
    pub fn from_pins(dir: &Path) -> Result<Self> {
        crate::upgrade::check_readable(dir)?;
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
        Self::from_maps([
            open(MAP_FRONTENDS)?,
            open(MAP_SLOTS)?,
            open(MAP_BACKENDS)?,
            open(MAP_CONNTRACK)?,
            open(MAP_COUNTERS)?,
            open(MAP_NODE)?,
            open(MAP_SOURCE_RANGES)?,
            open(MAP_SNAT)?,
            open(MAP_MAGLEV)?,
            open(MAP_FE_FILTER)?,
            open(MAP_CT_FILTER)?,
        ])
    }

    fn from_maps(
        [f, s, b, c, n, node, ranges, snat, maglev, filter, ct_filter]: [Map; 11],
    ) -> Result<Self> {
        let batch_fds = [
            dup_fd(MAP_FRONTENDS, &f)?,
            dup_fd(MAP_SLOTS, &s)?,
            dup_fd(MAP_BACKENDS, &b)?,
            dup_fd(MAP_MAGLEV, &maglev)?,
            dup_fd(MAP_FE_FILTER, &filter)?,
        ];
        Ok(Self {
            batch_fds,
            ct_filter_map: match ct_filter {
                Map::Array(d) => d,
                _ => return Err(map_err(MAP_CT_FILTER, "not an array")),
            },
            frontends: HashMap::try_from(f).map_err(|e| map_err(MAP_FRONTENDS, e))?,
            slots: HashMap::try_from(s).map_err(|e| map_err(MAP_SLOTS, e))?,
            backends: Array::try_from(b).map_err(|e| map_err(MAP_BACKENDS, e))?,
            conntrack: HashMap::try_from(c).map_err(|e| map_err(MAP_CONNTRACK, e))?,
            counters: PerCpuArray::try_from(n).map_err(|e| map_err(MAP_COUNTERS, e))?,
            node: Array::try_from(node).map_err(|e| map_err(MAP_NODE, e))?,
            source_ranges: LpmTrie::try_from(ranges).map_err(|e| map_err(MAP_SOURCE_RANGES, e))?,
            snat: HashMap::try_from(snat).map_err(|e| map_err(MAP_SNAT, e))?,
            maglev: Array::try_from(maglev).map_err(|e| map_err(MAP_MAGLEV, e))?,
            fe_filter: Array::try_from(filter).map_err(|e| map_err(MAP_FE_FILTER, e))?,
        })
    }

    /// `LB_FE_FILTER`'s words, all of them.
    pub fn frontend_filter(&self) -> Result<Vec<u64>> {
        match batch::lookup_range(&self.batch_fds[FE_FILTER], 0, FRONTEND_FILTER_WORDS) {
            Ok(words) => Ok(words),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (0..FRONTEND_FILTER_WORDS)
                .map(|i| {
                    self.fe_filter
                        .get(&i, 0)
                        .map_err(|e| map_err(MAP_FE_FILTER, e))
                })
                .collect(),
            Err(e) => Err(map_err(MAP_FE_FILTER, e)),
        }
    }

    /// Every entry of `LB_FRONTENDS`: in batches, or one at a time before Linux 5.6.
    fn read_frontends(&self) -> Result<Vec<(FrontendKey, Frontend)>> {
        match batch::lookup_all_hash(&self.batch_fds[FRONTENDS]) {
            Ok(all) => Ok(all),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => self
                .frontends
                .iter()
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| map_err(MAP_FRONTENDS, e)),
            Err(e) => Err(map_err(MAP_FRONTENDS, e)),
        }
    }

    /// Makes `LB_FE_FILTER` agree with the frontends `LB_FRONTENDS` holds (the words
    /// that differ written): at load, before any program is attached, so a program of
    /// this build never misses a pinned frontend (pins made before the filter existed,
    /// or migrated, get an empty one from the load). The writer keeps it so afterwards.
    /// Returns how many words it wrote.
    pub fn fill_frontend_filter(&mut self) -> Result<usize> {
        let frontends = self.read_frontends()?;
        let want = filter::of_addrs(frontends.iter().map(|(k, _)| &k.addr));
        let changed = filter::changed(&self.frontend_filter()?, &want);
        for &(i, word) in &changed {
            self.set_frontend_filter_word(i, word)?;
        }
        Ok(changed.len())
    }

    /// The conntrack filter, mapped into this process.
    pub fn ct_filter(&self) -> Result<CtFilter> {
        CtFilter::map(self.ct_filter_map.fd().as_fd()).map_err(|e| map_err(MAP_CT_FILTER, e))
    }

    /// Writes word `index` of `LB_FE_FILTER`.
    pub fn set_frontend_filter_word(&mut self, index: u32, word: u64) -> Result<()> {
        self.fe_filter
            .set(index, word, 0)
            .map_err(|e| map_err(MAP_FE_FILTER, format!("word {index}: {e}")))
    }

    /// Cells `base..base + size` of `LB_MAGLEV`.
    pub fn table(&self, base: u32, size: u32) -> Result<Vec<MaglevCell>> {
        match batch::lookup_range(&self.batch_fds[MAGLEV], base, size) {
            Ok(cells) => Ok(cells),
            // No batch lookup (before 5.6): one syscall per cell.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (base..base + size)
                .map(|i| self.maglev.get(&i, 0).map_err(|e| map_err(MAP_MAGLEV, e)))
                .collect(),
            Err(e) => Err(map_err(MAP_MAGLEV, e)),
        }
    }

    /// Writes a table's cells, a batch per `CHUNK`, one by one where batches fail.
    fn write_table(&mut self, base: u32, cells: &[MaglevCell]) -> std::io::Result<()> {
        for (i, chunk) in cells.chunks(batch::CHUNK).enumerate() {
            let from = base + (i * batch::CHUNK) as u32;
            let keys: Vec<u32> = (from..from + chunk.len() as u32).collect();
            if let Err((done, e)) = batch::update(&self.batch_fds[MAGLEV], &keys, chunk) {
                if e.raw_os_error() != Some(libc::EINVAL) || done != 0 {
                    return Err(e);
                }
                for (k, v) in keys.iter().zip(chunk) {
                    self.maglev
                        .set(*k, v, 0)
                        .map_err(|e| std::io::Error::other(e.to_string()))?;
                }
            }
        }
        Ok(())
    }

    /// This node's configuration as the datapath sees it.
    pub fn node_config(&self) -> Result<NodeConfig> {
        self.node.get(&0, 0).map_err(|e| map_err(MAP_NODE, e))
    }

    /// Writes this node's configuration.
    pub fn set_node_config(&mut self, config: &NodeConfig) -> Result<()> {
        self.node
            .set(0, config, 0)
            .map_err(|e| map_err(MAP_NODE, e))
    }

    /// Reads the service maps (not conntrack) into a mirror: in batches (a few
    /// syscalls per 4,096 entries), or an entry at a time before Linux 5.6.
    pub fn read_state(&self) -> Result<MapState> {
        self.read_state_with(None, |_, _| None)
    }

    /// `read_state`, but the cells of a Maglev table (base, size) for which `known`
    /// has them are taken from it instead of read: the tables are most of what a drift
    /// check would read (millions of cells at 10,000 Services, about a second of the
    /// kernel's copying), and the check reads them a slice at a time (`Dataplane`).
    /// With `backends_below`, `LB_BACKENDS` is read up to that id only (the array has
    /// 262,144 entries by default; ids are taken lowest first, and an entry beyond the
    /// highest id the agent used is named by no slot, and written over when its id is
    /// taken).
    pub fn read_state_with(
        &self,
        backends_below: Option<u32>,
        mut known: impl FnMut(u32, u32) -> Option<Arc<[MaglevCell]>>,
    ) -> Result<MapState> {
        let frontends = self.read_frontends()?;
        let slots: Vec<(SlotKey, u32)> =
            match batch::lookup_all_hash::<SlotKey, Slot>(&self.batch_fds[SLOTS]) {
                Ok(all) => all.into_iter().map(|(k, v)| (k, v.backend_id)).collect(),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => self
                    .slots
                    .iter()
                    .map(|kv| kv.map(|(k, v)| (k, v.backend_id)))
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .map_err(|e| map_err(MAP_SLOTS, e))?,
                Err(e) => return Err(map_err(MAP_SLOTS, e)),
            };
        let below = backends_below.map(|n| n.min(self.backends.len()));
        let read = match below {
            Some(n) => batch::lookup_range(&self.batch_fds[BACKENDS], 0, n)
                .map(|v| (0..n).zip(v).collect()),
            None => batch::lookup_all(&self.batch_fds[BACKENDS]),
        };
        let backends: Vec<(u32, Backend)> = match read {
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
        let ranges = self
            .source_ranges
            .keys()
            .map(|k| {
                k.map(|k| RangeKey {
                    prefix_len: k.prefix_len(),
                    data: k.data(),
                })
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| map_err(MAP_SOURCE_RANGES, e))?;
        let capacity = self
            .maglev
            .map()
            .info()
            .map(|i| i.max_entries())
            .map_err(|e| map_err(MAP_MAGLEV, e))?;
        let mut st = MapState::from_entries(
            frontends,
            slots,
            backends.into_iter().filter(|(_, v)| *v != NO_BACKEND),
            ranges,
        )
        .with_table_capacity(capacity);
        for (base, size) in st.owned_tables() {
            match known(base, size) {
                Some(cells) => st.set_table_cells(base, cells),
                None => st.set_table_cells(base, self.table(base, size)?),
            }
        }
        Ok(st)
    }

    pub(super) fn apply_one(&mut self, op: &Op) -> std::result::Result<(), String> {
        let r = match op {
            Op::PutBackend(id, b) => self.backends.set(*id, b, 0),
            Op::PutSlot(k, id) => self.slots.insert(k, Slot { backend_id: *id }, 0),
            Op::PutFrontend(k, f) => self.frontends.insert(k, f, 0),
            Op::DelSlot(k) => self.slots.remove(k),
            Op::DelFrontend(k) => self.frontends.remove(k),
            Op::DelBackend(id) => self.backends.set(*id, NO_BACKEND, 0),
            Op::PutRange(k) => {
                self.source_ranges
                    .insert(&Key::new(k.prefix_len, k.data), SOURCE_RANGE_ALLOW, 0)
            }
            Op::DelRange(k) => self.source_ranges.remove(&Key::new(k.prefix_len, k.data)),
            Op::PutTable(t) => {
                return self
                    .write_table(t.base, &t.cells)
                    .map_err(|e| format!("{op:?}: {e}"))
            }
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
    pub(super) fn apply_batch(&mut self, run: &[Op]) -> usize {
        fn keys_values<K: Copy, V: Copy>(
            run: &[Op],
            f: impl Fn(&Op) -> (K, V),
        ) -> (Vec<K>, Vec<V>) {
            run.iter().map(f).unzip()
        }
        let r = match &run[0] {
            // A handful per LoadBalancer IP: written one by one.
            Op::PutRange(..) | Op::DelRange(..) => return 0,
            // Each table is a batch (or a few) of its own.
            Op::PutTable(..) => {
                return run
                    .iter()
                    .take_while(|op| match op {
                        Op::PutTable(t) => self.write_table(t.base, &t.cells).is_ok(),
                        _ => unreachable!("runs hold one kind"),
                    })
                    .count()
            }
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
        read_counters(&self.counters)
    }

    /// A handle of its own on the counters map, for a reader on another thread (the
    /// metrics) that must not wait for the writer.
    pub fn counters_handle(&self) -> Result<Counters> {
        let fd = self
            .counters
            .map()
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| map_err(MAP_COUNTERS, e))?;
        let data = MapData::from_fd(fd).map_err(|e| map_err(MAP_COUNTERS, e))?;
        let map =
            PerCpuArray::try_from(Map::PerCpuArray(data)).map_err(|e| map_err(MAP_COUNTERS, e))?;
        Ok(Counters(map))
    }

    /// A handle of its own on the conntrack map, to count its entries from another
    /// thread (the metrics).
    pub fn conntrack_handle(&self) -> Result<Conntrack> {
        let data = self.conntrack.map();
        let fd = data
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| map_err(MAP_CONNTRACK, e))?;
        let max_entries = data
            .info()
            .map(|i| i.max_entries())
            .map_err(|e| map_err(MAP_CONNTRACK, e))?;
        Ok(Conntrack { fd, max_entries })
    }

    /// Handles of their own on conntrack, the SNAT peers and the conntrack filter, for
    /// the conntrack garbage collector's thread (`gc`), which rebuilds the filter too.
    pub fn gc_maps(&self) -> Result<super::gc::GcMaps> {
        let dup = |name: &str, data: &MapData| {
            data.fd()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| map_err(name, e))
        };
        Ok(super::gc::GcMaps {
            conntrack: dup(MAP_CONNTRACK, self.conntrack.map())?,
            snat: dup(MAP_SNAT, self.snat.map())?,
            ct_filter: self.ct_filter()?,
        })
    }

    /// All conntrack entries (for the CLI).
    pub fn conntrack_entries(&self) -> Result<Vec<(CtKey, CtValue)>> {
        self.conntrack
            .iter()
            .map(|kv| kv.map_err(|e| map_err(MAP_CONNTRACK, e)))
            .collect()
    }
}

/// The conntrack map, on a handle of its own: its fill.
pub struct Conntrack {
    fd: OwnedFd,
    max_entries: u32,
}

impl Conntrack {
    /// Entries now (two per flow), read in batches: about 130 syscalls for a full map of
    /// the default 524,288.
    pub fn entries(&self) -> Result<usize> {
        batch::count::<CtKey, CtValue>(&self.fd).map_err(|e| map_err(MAP_CONNTRACK, e))
    }

    /// The map's size.
    pub fn max_entries(&self) -> u32 {
        self.max_entries
    }
}

/// The datapath's per-CPU decision counters, on a handle of their own.
pub struct Counters(PerCpuArray<MapData, u64>);

impl Counters {
    /// Sums over CPUs, in `counter::NAMES` order.
    pub fn read(&self) -> Result<Vec<(&'static str, u64)>> {
        read_counters(&self.0)
    }
}

fn read_counters(map: &PerCpuArray<MapData, u64>) -> Result<Vec<(&'static str, u64)>> {
    let mut out = Vec::with_capacity(counter::NAMES.len());
    for (i, name) in counter::NAMES.iter().enumerate() {
        let values = map
            .get(&(i as u32), 0)
            .map_err(|e| map_err(MAP_COUNTERS, e))?;
        out.push((*name, values.iter().sum()));
    }
    Ok(out)
}
