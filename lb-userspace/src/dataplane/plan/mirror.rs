//! The mirror: what the kernel maps hold (or will, once the planned ops are applied),
//! with the indexes the planner needs. Read from the maps at start, then changed only
//! through [`MapState::apply`] after the kernel took an op, so it never drifts from them.
//!
//! Laid out for a million backends: backends in a vector indexed by id (the kernel array's
//! own layout), their address index a hash table of ids (4 bytes an entry), and each
//! service's slots one vector.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use ahash::AHashMap as HashMap;
use hashbrown::HashTable;
use ipnet::IpNet;
use lb_common::{
    ipv4_mapped, is_ipv4_mapped, Addr, Backend, Frontend, FrontendKey, MaglevCell, SlotKey,
    SourceRange, DEFAULT_MAX_MAGLEV_CELLS,
};

use super::ids::IdPool;
use crate::model::{BackendAddr, FrontendAddr, Protocol, Scope};

/// What an unused backend id holds (in the kernel array and here).
pub const NO_BACKEND: Backend = Backend {
    addr: [0; 4],
    port: 0,
    proto: 0,
    flags: 0,
};

/// An entry of `LB_SRC_RANGES`: a frontend's id, and a source range as the trie keys it
/// (the prefix length counts the id's 32 bits too).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RangeKey {
    /// Bits of `data` the range covers: 32 (the id) + 96 + an IPv4 prefix, or 32 + an
    /// IPv6 prefix.
    pub prefix_len: u32,
    pub data: SourceRange,
}

/// The trie entry of `range` (host bits cleared) for the frontend `service_id`.
pub fn range_key(service_id: u32, range: &IpNet) -> RangeKey {
    let range = range.trunc();
    let bits = match range {
        IpNet::V4(n) => 96 + n.prefix_len() as u32,
        IpNet::V6(n) => n.prefix_len() as u32,
    };
    RangeKey {
        prefix_len: 32 + bits,
        data: SourceRange {
            service_id,
            addr: map_addr(&range.addr()),
        },
    }
}

/// A frontend's Maglev table, to be written at cells `base..base + cells.len()` of
/// `LB_MAGLEV` (a region no frontend names yet) before the frontend names it.
#[derive(Clone, PartialEq, Eq)]
pub struct Table {
    pub service_id: u32,
    pub base: u32,
    pub cells: Arc<[MaglevCell]>,
}

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Table {{ service_id: {}, cells: {}..{} }}",
            self.service_id,
            self.base,
            self.base as usize + self.cells.len()
        )
    }
}

/// One change to the maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    PutBackend(u32, Backend),
    PutSlot(SlotKey, u32),
    PutRange(RangeKey),
    PutTable(Table),
    PutFrontend(FrontendKey, Frontend),
    DelSlot(SlotKey),
    DelFrontend(FrontendKey),
    DelRange(RangeKey),
    DelBackend(u32),
}

impl Op {
    /// Position of this kind of op in a plan. Grouping a plan by kind, stably, keeps
    /// every ordering rule of the planner (each frontend's slots, source ranges and
    /// Maglev table before the frontend names them, its leftover slots and ranges after
    /// it no longer does; backends first and last) and lets the writer send each group
    /// to the kernel in batches.
    pub fn rank(&self) -> u8 {
        match self {
            Op::PutBackend(..) => 0,
            Op::PutSlot(..) => 1,
            Op::PutRange(..) => 2,
            Op::PutTable(..) => 3,
            Op::PutFrontend(..) => 4,
            Op::DelFrontend(..) => 5,
            Op::DelRange(..) => 6,
            Op::DelSlot(..) => 7,
            Op::DelBackend(..) => 8,
        }
    }
}

/// An address as the maps hold it: 16 bytes in network byte order, IPv4 IPv4-mapped.
pub fn map_addr(ip: &IpAddr) -> Addr {
    match ip {
        IpAddr::V4(a) => ipv4_mapped(u32::from_ne_bytes(a.octets())),
        IpAddr::V6(a) => {
            let o = a.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            [w(0), w(4), w(8), w(12)]
        }
    }
}

/// An address as the maps hold it, back.
pub fn ip_addr(a: &Addr) -> IpAddr {
    if is_ipv4_mapped(a) {
        IpAddr::V4(Ipv4Addr::from(a[3].to_ne_bytes()))
    } else {
        let mut o = [0u8; 16];
        for (i, w) in a.iter().enumerate() {
            o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::V6(Ipv6Addr::from(o))
    }
}

pub fn frontend_key(f: &FrontendAddr) -> FrontendKey {
    FrontendKey {
        addr: map_addr(&f.ip),
        port: f.port.to_be(),
        proto: f.proto.number(),
        scope: f.scope.number(),
    }
}

pub fn backend_value(b: &BackendAddr) -> Backend {
    Backend {
        addr: map_addr(&b.ip),
        port: b.port.to_be(),
        proto: b.proto.number(),
        flags: if b.remote {
            lb_common::BACKEND_F_REMOTE
        } else {
            0
        },
    }
}

pub fn frontend_addr(k: &FrontendKey) -> FrontendAddr {
    FrontendAddr {
        ip: ip_addr(&k.addr),
        port: u16::from_be(k.port),
        proto: Protocol::from_number(k.proto).unwrap_or(Protocol::Tcp),
        scope: Scope::from_number(k.scope).unwrap_or(Scope::Outside),
    }
}

pub fn backend_addr(b: &Backend) -> BackendAddr {
    BackendAddr {
        ip: ip_addr(&b.addr),
        port: u16::from_be(b.port),
        proto: Protocol::from_number(b.proto).unwrap_or(Protocol::Tcp),
        remote: b.flags & lb_common::BACKEND_F_REMOTE != 0,
    }
}

/// The backends by id, and an index from value to id.
#[derive(Clone, Default)]
struct BackendTable {
    /// Index = id; `NO_BACKEND` where unused.
    by_id: Vec<Backend>,
    /// Ids of the used entries, hashed by their value.
    index: HashTable<u32>,
    hasher: ahash::RandomState,
    len: usize,
}

impl BackendTable {
    fn hash(&self, b: &Backend) -> u64 {
        self.hasher.hash_one(b)
    }

    /// One past the highest id this table has held (ids are taken lowest first).
    fn ids_end(&self) -> u32 {
        self.by_id.len() as u32
    }

    fn get(&self, id: u32) -> Option<&Backend> {
        self.by_id.get(id as usize).filter(|b| **b != NO_BACKEND)
    }

    fn id_of(&self, b: &Backend) -> Option<u32> {
        self.index
            .find(self.hash(b), |id| self.by_id[*id as usize] == *b)
            .copied()
    }

    fn remove(&mut self, id: u32) -> Option<Backend> {
        let old = *self.get(id)?;
        let hash = self.hash(&old);
        if let Ok(entry) = self.index.find_entry(hash, |i| *i == id) {
            entry.remove();
        }
        self.by_id[id as usize] = NO_BACKEND;
        self.len -= 1;
        Some(old)
    }

    /// Sets `id` to `b` (replacing what it held); returns the old value.
    fn insert(&mut self, id: u32, b: Backend) -> Option<Backend> {
        let old = self.remove(id);
        if b == NO_BACKEND {
            return old;
        }
        let at = id as usize;
        if self.by_id.len() <= at {
            self.by_id.resize(at + 1, NO_BACKEND);
        }
        self.by_id[at] = b;
        let (by_id, hasher) = (&self.by_id, &self.hasher);
        self.index.insert_unique(hasher.hash_one(b), id, |i| {
            hasher.hash_one(by_id[*i as usize])
        });
        self.len += 1;
        old
    }

    fn iter(&self) -> impl Iterator<Item = (u32, &Backend)> {
        self.by_id
            .iter()
            .enumerate()
            .filter(|(_, b)| **b != NO_BACKEND)
            .map(|(id, b)| (id as u32, b))
    }
}

/// The Maglev tables in `LB_MAGLEV`: which regions frontends name, and what was
/// written there.
#[derive(Clone, Debug)]
pub struct TableSpace {
    /// Regions named by a frontend: base -> (cells, service id). Never overlapping (a
    /// frontend read from the maps whose region overlaps another's, or lies beyond the
    /// map, owns none, and gets a new table).
    owned: BTreeMap<u32, (u32, u32)>,
    /// What was last written (or read) at each base; entries a later table overwrote
    /// are dropped.
    cells: BTreeMap<u32, Arc<[MaglevCell]>>,
    /// Cells of `LB_MAGLEV`.
    capacity: u32,
}

impl Default for TableSpace {
    fn default() -> Self {
        Self {
            owned: BTreeMap::new(),
            cells: BTreeMap::new(),
            capacity: DEFAULT_MAX_MAGLEV_CELLS,
        }
    }
}

impl TableSpace {
    fn owns(&self, f: &Frontend) -> bool {
        f.table_size != 0 && self.owned.get(&f.table_base) == Some(&(f.table_size, f.service_id))
    }

    /// Claims the region a frontend names, unless it overlaps an owned one or lies
    /// beyond the map.
    fn claim(&mut self, f: &Frontend) {
        let (base, size) = (f.table_base, f.table_size);
        if size == 0 || base as u64 + size as u64 > self.capacity as u64 {
            return;
        }
        let end = base + size;
        let before = self.owned.range(..end).next_back();
        if before.is_some_and(|(b, (s, _))| b + s > base) {
            return;
        }
        self.owned.insert(base, (size, f.service_id));
    }

    fn release(&mut self, f: &Frontend) {
        if self.owns(f) {
            self.owned.remove(&f.table_base);
            self.cells.remove(&f.table_base);
        }
    }

    fn written(&mut self, base: u32, cells: Arc<[MaglevCell]>) {
        let end = base + cells.len() as u32;
        let overlapping: Vec<u32> = self
            .cells
            .range(..end)
            .rev()
            .take_while(|(b, c)| **b + c.len() as u32 > base)
            .map(|(b, _)| *b)
            .collect();
        for b in overlapping {
            self.cells.remove(&b);
        }
        self.cells.insert(base, cells);
    }

    /// The first free region of `size` cells that avoids `taken` too (regions a plan
    /// being made already allocated, by base): after the last region of either if there
    /// is room, else the first hole that fits. The first is a constant-time step, so a
    /// plan that makes thousands of tables (a first sync) stays linear; the hole search,
    /// once the end is reached, walks both sets once, in base order.
    pub fn find(&self, size: u32, taken: &BTreeMap<u32, u32>) -> Option<u32> {
        let last_end = |m: Option<(u32, u32)>| m.map_or(0u64, |(b, s)| b as u64 + s as u64);
        let end = last_end(self.owned.iter().next_back().map(|(b, (s, _))| (*b, *s)))
            .max(last_end(taken.iter().next_back().map(|(b, s)| (*b, *s))));
        if end + size as u64 <= self.capacity as u64 {
            return Some(end as u32);
        }
        // Both sets in base order, merged: each set's regions are disjoint, and no taken
        // region overlaps an owned one, but the walk does not rely on it.
        let mut owned = self.owned.iter().map(|(b, (s, _))| (*b, *s)).peekable();
        let mut taken = taken.iter().map(|(b, s)| (*b, *s)).peekable();
        let mut free_from = 0u64;
        loop {
            let next = match (owned.peek(), taken.peek()) {
                (Some(o), Some(t)) if o.0 <= t.0 => owned.next(),
                (Some(_), Some(_)) => taken.next(),
                (Some(_), None) => owned.next(),
                (None, _) => taken.next(),
            };
            let (b, s) = next?;
            if free_from + size as u64 <= b as u64 {
                return Some(free_from as u32);
            }
            free_from = free_from.max(b as u64 + s as u64);
        }
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Cells named by frontends.
    pub fn used(&self) -> u64 {
        self.owned.values().map(|(s, _)| *s as u64).sum()
    }
}

/// What the kernel maps hold. Change it only through `apply`.
#[derive(Clone, Default)]
pub struct MapState {
    pub frontends: HashMap<FrontendKey, Frontend>,
    /// Service id -> the backend id in each slot (index 0 is slot 1); 0 where the
    /// kernel map has no entry. No trailing zeroes.
    slots: HashMap<u32, Vec<u32>>,
    /// Service id -> its source ranges (`LB_SRC_RANGES`), sorted.
    ranges: HashMap<u32, Vec<RangeKey>>,
    backends: BackendTable,
    backend_pool: IdPool,
    service_pool: IdPool,
    tables: TableSpace,
}

impl std::fmt::Debug for MapState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MapState")
            .field("frontends", &self.frontends.len())
            .field("slots", &self.slot_count())
            .field("backends", &self.backends.len)
            .field("ranges", &self.ranges().count())
            .finish()
    }
}

impl MapState {
    /// The mirror of maps holding these entries (read from the kernel at start).
    pub fn from_entries(
        frontends: impl IntoIterator<Item = (FrontendKey, Frontend)>,
        slots: impl IntoIterator<Item = (SlotKey, u32)>,
        backends: impl IntoIterator<Item = (u32, Backend)>,
        ranges: impl IntoIterator<Item = RangeKey>,
    ) -> Self {
        let mut st = MapState {
            frontends: frontends.into_iter().collect(),
            ..Default::default()
        };
        for (k, id) in slots {
            st.set_slot(k, id);
        }
        for k in ranges {
            st.add_range(k);
        }
        for (id, b) in backends {
            st.backends.insert(id, b);
        }
        st.backend_pool = IdPool::from_used(st.backends.iter().map(|(id, _)| id));
        st.service_pool = IdPool::from_used(st.frontends.values().map(|f| f.service_id));
        st.claim_tables();
        st
    }

    /// The same state, for a `LB_MAGLEV` of `capacity` cells (the regions frontends
    /// name are claimed again, within it).
    pub fn with_table_capacity(mut self, capacity: u32) -> Self {
        self.tables.capacity = capacity;
        self.claim_tables();
        self
    }

    fn claim_tables(&mut self) {
        let cells = std::mem::take(&mut self.tables.cells);
        self.tables.owned.clear();
        let mut fs: Vec<&Frontend> = self.frontends.values().collect();
        fs.sort_by_key(|f| (f.table_base, f.service_id));
        for f in fs {
            self.tables.claim(f);
        }
        self.tables.cells = cells
            .into_iter()
            .filter(|(b, c)| {
                self.tables
                    .owned
                    .get(b)
                    .is_some_and(|(s, _)| *s as usize == c.len())
            })
            .collect();
    }

    /// The regions of `LB_MAGLEV` frontends own (base, cells): what to read at start.
    pub fn owned_tables(&self) -> Vec<(u32, u32)> {
        self.tables
            .owned
            .iter()
            .map(|(b, (s, _))| (*b, *s))
            .collect()
    }

    /// Records what an owned region of `LB_MAGLEV` holds (read at start, or taken from
    /// another state by `table_cells`).
    pub fn set_table_cells(&mut self, base: u32, cells: impl Into<Arc<[MaglevCell]>>) {
        self.tables.written(base, cells.into());
    }

    /// What this state holds for the region of `size` cells at `base`, if it owns that
    /// region and knows its cells (shared, not copied).
    pub fn table_cells(&self, base: u32, size: u32) -> Option<Arc<[MaglevCell]>> {
        self.tables
            .owned
            .get(&base)
            .filter(|(s, _)| *s == size)
            .and(self.tables.cells.get(&base))
            .filter(|c| c.len() == size as usize)
            .cloned()
    }

    /// The table a frontend names, if it owns its region and it holds what was written.
    pub fn table(&self, f: &Frontend) -> Option<&[MaglevCell]> {
        self.tables
            .owns(f)
            .then(|| self.tables.cells.get(&f.table_base))
            .flatten()
            .filter(|c| c.len() == f.table_size as usize)
            .map(|c| &c[..])
    }

    /// `table`, shared.
    fn table_shared(&self, f: &Frontend) -> Option<Arc<[MaglevCell]>> {
        self.table(f)?;
        self.tables.cells.get(&f.table_base).cloned()
    }

    /// One past the highest backend id in use (or once used): where a drift check's
    /// read of `LB_BACKENDS` may stop.
    pub fn backend_ids_end(&self) -> u32 {
        self.backends.ids_end()
    }

    pub fn table_space(&self) -> &TableSpace {
        &self.tables
    }

    /// Frontends with two or more ready backends but no Maglev table (no room left in
    /// `LB_MAGLEV`): they hash over their slots, which moves most flows when their
    /// backends change.
    pub fn frontends_without_table(&self) -> usize {
        self.frontends
            .values()
            .filter(|f| f.count > 1 && f.table_size == 0)
            .count()
    }

    fn set_slot(&mut self, k: SlotKey, id: u32) {
        let v = self.slots.entry(k.service_id).or_default();
        let at = k.slot as usize - 1;
        if v.len() <= at {
            v.resize(at + 1, 0);
        }
        v[at] = id;
    }

    fn clear_slot(&mut self, k: &SlotKey) {
        if let Some(v) = self.slots.get_mut(&k.service_id) {
            if let Some(e) = v.get_mut(k.slot as usize - 1) {
                *e = 0;
            }
            while v.last() == Some(&0) {
                v.pop();
            }
            if v.is_empty() {
                self.slots.remove(&k.service_id);
            }
        }
    }

    fn add_range(&mut self, k: RangeKey) {
        let v = self.ranges.entry(k.data.service_id).or_default();
        if let Err(at) = v.binary_search(&k) {
            v.insert(at, k);
        }
    }

    fn remove_range(&mut self, k: &RangeKey) {
        if let Some(v) = self.ranges.get_mut(&k.data.service_id) {
            if let Ok(at) = v.binary_search(k) {
                v.remove(at);
            }
            if v.is_empty() {
                self.ranges.remove(&k.data.service_id);
            }
        }
    }

    /// The source ranges of a frontend (by its service id), sorted.
    pub fn ranges_of(&self, service_id: u32) -> &[RangeKey] {
        self.ranges.get(&service_id).map_or(&[], Vec::as_slice)
    }

    /// Every source range entry.
    pub fn ranges(&self) -> impl Iterator<Item = &RangeKey> {
        self.ranges.values().flatten()
    }

    /// Applies one op (after the kernel accepted it).
    pub fn apply(&mut self, op: &Op) {
        match op {
            Op::PutRange(k) => self.add_range(*k),
            Op::DelRange(k) => self.remove_range(k),
            Op::PutBackend(id, b) => {
                self.backends.insert(*id, *b);
                self.backend_pool.mark_used(*id);
            }
            Op::PutSlot(k, id) => self.set_slot(*k, *id),
            Op::PutTable(t) => self.tables.written(t.base, t.cells.clone()),
            Op::PutFrontend(k, f) => {
                let old = self.frontends.insert(*k, *f);
                if let Some(old) = old {
                    if old.service_id != f.service_id {
                        self.service_pool.release(old.service_id);
                    }
                    if (old.table_base, old.table_size) != (f.table_base, f.table_size)
                        || old.service_id != f.service_id
                    {
                        self.tables.release(&old);
                    }
                }
                if !self.tables.owns(f) {
                    self.tables.claim(f);
                }
                self.service_pool.mark_used(f.service_id);
            }
            Op::DelSlot(k) => self.clear_slot(k),
            Op::DelFrontend(k) => {
                if let Some(old) = self.frontends.remove(k) {
                    self.service_pool.release(old.service_id);
                    self.tables.release(&old);
                }
            }
            Op::DelBackend(id) => {
                if self.backends.remove(*id).is_some() {
                    self.backend_pool.release(*id);
                }
            }
        }
    }

    /// The backend in a slot (1-based), if the map has the entry.
    pub fn slot(&self, service_id: u32, slot: u32) -> Option<u32> {
        let v = self.slots.get(&service_id)?;
        v.get((slot as usize).checked_sub(1)?)
            .copied()
            .filter(|id| *id != 0)
    }

    /// The backend ids in the slots of `service_id` (whatever the count says).
    pub fn slot_ids(&self, service_id: u32) -> &[u32] {
        self.slots.get(&service_id).map_or(&[], Vec::as_slice)
    }

    /// The ready backends of a frontend, in slot order (up to the first missing slot).
    pub fn slot_list(&self, f: &Frontend) -> Vec<u32> {
        (1..=f.count)
            .map_while(|slot| self.slot(f.service_id, slot))
            .collect()
    }

    /// The slots of `service_id` from `from` upward until the first gap: what is left
    /// over above a count (normally exactly the slots a shrinking count leaves behind).
    pub fn slots_from(&self, service_id: u32, from: u32) -> Vec<SlotKey> {
        (from..)
            .map(|slot| SlotKey { service_id, slot })
            .take_while(|k| self.slot(k.service_id, k.slot).is_some())
            .collect()
    }

    /// Every slot entry, as the kernel map holds them.
    pub fn slots(&self) -> impl Iterator<Item = (SlotKey, u32)> + '_ {
        self.slots.iter().flat_map(|(sid, v)| {
            v.iter()
                .enumerate()
                .filter(|(_, id)| **id != 0)
                .map(move |(i, id)| {
                    (
                        SlotKey {
                            service_id: *sid,
                            slot: i as u32 + 1,
                        },
                        *id,
                    )
                })
        })
    }

    pub fn slot_count(&self) -> usize {
        self.slots
            .values()
            .map(|v| v.iter().filter(|id| **id != 0).count())
            .sum()
    }

    pub fn backend(&self, id: u32) -> Option<&Backend> {
        self.backends.get(id)
    }

    pub fn backends(&self) -> impl Iterator<Item = (u32, &Backend)> {
        self.backends.iter()
    }

    pub fn backend_count(&self) -> usize {
        self.backends.len
    }

    pub fn backend_id(&self, b: &BackendAddr) -> Option<u32> {
        self.backends.id_of(&backend_value(b))
    }

    pub(super) fn pools(&self) -> (IdPool, IdPool) {
        (self.backend_pool.clone(), self.service_pool.clone())
    }

    /// Everything the maps hold, sorted: for comparing two mirrors. Where a Maglev
    /// table lies is left out (two plans may place the same table apart), what it holds
    /// is in.
    pub fn content(&self) -> MapContent {
        let mut tables: Vec<(u32, Arc<[MaglevCell]>)> = self
            .frontends
            .values()
            .filter(|f| f.table_size != 0)
            .map(|f| {
                (
                    f.service_id,
                    self.table_shared(f).unwrap_or_else(|| Arc::from([])),
                )
            })
            .collect();
        tables.sort();
        let mut frontends: Vec<_> = self
            .frontends
            .iter()
            .map(|(k, v)| {
                (
                    *k,
                    Frontend {
                        table_base: 0,
                        ..*v
                    },
                )
            })
            .collect();
        frontends.sort_by_key(|(k, _)| *k);
        let mut slots: Vec<_> = self.slots().collect();
        slots.sort();
        let backends = self.backends().map(|(id, b)| (id, *b)).collect();
        let mut ranges: Vec<RangeKey> = self.ranges().copied().collect();
        ranges.sort();
        MapContent {
            frontends,
            slots,
            backends,
            ranges,
            tables,
        }
    }
}

/// The maps' entries, sorted (see `MapState::content`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapContent {
    pub frontends: Vec<(FrontendKey, Frontend)>,
    pub slots: Vec<(SlotKey, u32)>,
    pub backends: Vec<(u32, Backend)>,
    pub ranges: Vec<RangeKey>,
    /// Each frontend's Maglev table (by service id), shared with the state it came
    /// from: two states that share a table compare it by pointer (`Arc`'s equality
    /// for `Eq` contents), so a drift check compares only the tables it read.
    pub tables: Vec<(u32, Arc<[MaglevCell]>)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A space of 400 cells owning [0, 100) and [200, 300).
    fn space_with_a_hole() -> TableSpace {
        let mut t = TableSpace {
            capacity: 400,
            ..Default::default()
        };
        for (base, size, id) in [(0, 100, 1), (200, 100, 2)] {
            t.claim(&Frontend {
                service_id: id,
                count: 2,
                flags: 0,
                affinity_timeout_s: 0,
                table_base: base,
                table_size: size,
            });
        }
        t
    }

    #[test]
    fn a_table_goes_after_the_last_region_then_into_the_first_hole_that_fits() {
        let t = space_with_a_hole();
        let mut taken = BTreeMap::new();
        assert_eq!(t.find(60, &taken), Some(300), "after the last owned region");
        taken.insert(300, 60);
        assert_eq!(t.find(30, &taken), Some(360), "after the last taken region");
        taken.insert(360, 30);
        assert_eq!(
            t.find(60, &taken),
            Some(100),
            "no room at the end: the hole"
        );
        taken.insert(100, 60);
        assert_eq!(t.find(60, &taken), None, "the hole holds 40 more cells");
        assert_eq!(t.find(40, &taken), Some(160));
        taken.insert(160, 40);
        assert_eq!(t.find(10, &taken), Some(390), "the last cells");
        taken.insert(390, 10);
        assert_eq!(t.find(1, &taken), None, "full");
    }

    /// A first sync's plan makes one table per frontend; each must land after the
    /// previous one, and the space fills exactly.
    #[test]
    fn thousands_of_tables_in_one_plan_fill_the_space_without_overlap() {
        let t = TableSpace {
            capacity: 127 * 5000,
            ..Default::default()
        };
        let mut taken = BTreeMap::new();
        for i in 0..5000u32 {
            let at = t.find(127, &taken).expect("room for every table");
            assert_eq!(at, i * 127);
            taken.insert(at, 127);
        }
        assert_eq!(t.find(127, &taken), None);
    }

    #[test]
    fn addresses_go_to_the_maps_and_back_in_network_order() {
        let v4: IpAddr = "10.96.0.10".parse().unwrap();
        let a = map_addr(&v4);
        assert!(is_ipv4_mapped(&a));
        // The bytes in memory are those of ::ffff:10.96.0.10, as on the wire.
        let bytes: Vec<u8> = a.iter().flat_map(|w| w.to_ne_bytes()).collect();
        assert_eq!(
            bytes,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 96, 0, 10]
        );
        assert_eq!(ip_addr(&a), v4);
        let v6: IpAddr = "fd00:10:96::a".parse().unwrap();
        let a = map_addr(&v6);
        assert!(!is_ipv4_mapped(&a));
        let bytes: Vec<u8> = a.iter().flat_map(|w| w.to_ne_bytes()).collect();
        assert_eq!(bytes[..4], [0xfd, 0, 0, 0x10]);
        assert_eq!(ip_addr(&a), v6);
    }
}
