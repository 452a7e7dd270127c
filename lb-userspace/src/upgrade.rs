//! Upgrades across map layouts (ARCHITECTURE.md, "Upgrades"). The maps are pinned so a
//! new agent takes over the running datapath, conntrack and all; but a map whose key or
//! value changed between two versions would be misread by the newer programs. So
//! `LB_LAYOUT` records the layout version of the maps beside it
//! ([`lb_common::LAYOUT_VERSION`]), and pins without a record (agents from before it)
//! are recognised by their maps' key and value sizes. Before the load, [`Upgrade::prepare`]
//! decides:
//! - pins of this version are adopted as they are;
//! - pins of an older version this lb knows are migrated: the maps whose layout changed
//!   are set aside (renamed into `upgrade/` under the pin folder, which bpffs allows),
//!   the load creates them anew, and [`Upgrade::finish`] converts their entries into the
//!   new ones before any new program is attached (the old programs run on the old maps
//!   meanwhile; conntrack and the other unchanged maps are shared by both);
//! - anything else is refused, before anything is created or attached: a newer version,
//!   pins of no known layout, or a map that disagrees with its recorded version. The
//!   error names both versions and the command that starts afresh.
//!
//! `LB_COUNTERS` of another length than this build's (counters are only ever appended)
//! is copied index by index in any version, so a new counter needs no version bump.
use std::{
    fs,
    path::{Path, PathBuf},
};

use aya::maps::{Array, HashMap, Map, MapData, MapInfo, PerCpuArray};
use lb_common::{
    counter, Frontend, FrontendKey, LayoutRecord, LAYOUT_VERSION, MAP_AFFINITY, MAP_BACKENDS,
    MAP_CONNTRACK, MAP_COUNTERS, MAP_CT_FILTER, MAP_EVENTS, MAP_FE_FILTER, MAP_FRAGS,
    MAP_FRONTENDS, MAP_LAYOUT, MAP_MAGLEV, MAP_NAMES, MAP_NODE, MAP_SLOTS, MAP_SNAT,
    MAP_SOCK_CONFIG, MAP_SOCK_CONN, MAP_SOCK_KILL, MAP_SOCK_REV, MAP_SOURCE_RANGES, MAP_TRACE,
};
use tracing::{info, warn};

use crate::{Error, Result};

/// The folder, under the pin folder, of the maps set aside while they are migrated.
pub const ASIDE_DIR: &str = "upgrade";

/// A map's layout as the kernel reports it: key and value sizes, and its number of
/// entries where a layout fixes it (0: any, set at load time by `--max-*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapLayout {
    pub key: u32,
    pub value: u32,
    pub entries: u32,
}

impl MapLayout {
    /// Whether a pinned map of layout `have` is of this one.
    fn admits(self, have: MapLayout) -> bool {
        self.key == have.key
            && self.value == have.value
            && (self.entries == 0 || self.entries == have.entries)
    }
}

impl std::fmt::Display for MapLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "key {} bytes, value {} bytes", self.key, self.value)?;
        if self.entries != 0 {
            write!(f, ", {} entries", self.entries)?;
        }
        Ok(())
    }
}

/// A map of a layout: (name, key size, value size, entries or 0 for any).
type MapRow = (&'static str, u32, u32, u32);

/// Every layout this lb knows, as it was pinned: (version, [(map, key, value, entries
/// or 0)]). Literal numbers, since a layout is history, not the types of this build (a
/// test checks that this version's are). `LB_COUNTERS` takes any length (copied).
const LAYOUTS: &[(u32, &[MapRow])] = &[
    // Before Maglev (up to 73ccd2f): pinned without a record.
    (
        1,
        &[
            (MAP_FRONTENDS, 20, 16, 0),
            (MAP_SLOTS, 8, 4, 0),
            (MAP_BACKENDS, 4, 20, 0),
            (MAP_CONNTRACK, 40, 48, 0),
            (MAP_COUNTERS, 4, 8, 0),
            (MAP_FRAGS, 40, 32, 0),
            (MAP_NODE, 4, 40, 1),
            (MAP_SNAT, 40, 24, 0),
            (MAP_AFFINITY, 24, 16, 0),
            (MAP_SOURCE_RANGES, 24, 4, 0),
        ],
    ),
    // Maglev: `Frontend` with its table (24 bytes), `LB_MAGLEV`; then `lb trace`'s
    // maps and the record itself (new maps, no bump).
    (
        2,
        &[
            (MAP_FRONTENDS, 20, 24, 0),
            (MAP_SLOTS, 8, 4, 0),
            (MAP_BACKENDS, 4, 20, 0),
            (MAP_CONNTRACK, 40, 48, 0),
            (MAP_COUNTERS, 4, 8, 0),
            (MAP_FRAGS, 40, 32, 0),
            (MAP_NODE, 4, 40, 1),
            (MAP_SNAT, 40, 24, 0),
            (MAP_AFFINITY, 24, 16, 0),
            (MAP_SOURCE_RANGES, 24, 4, 0),
            (MAP_MAGLEV, 4, 8, 0),
            (MAP_TRACE, 4, 64, 1),
            (MAP_EVENTS, 0, 0, 262_144),
            (MAP_LAYOUT, 4, 8, 1),
            // Connect-time balancing (new maps, no bump).
            (MAP_SOCK_REV, 32, 32, 0),
            (MAP_SOCK_CONFIG, 4, 16, 1),
            (MAP_SOCK_KILL, 8, 4, 0),
            (MAP_SOCK_CONN, 4, 48, 0),
            // The frontend addresses' filter (a new map, no bump: created empty, and
            // filled from the pinned frontends by the load, `Maps::fill_frontend_filter`).
            (MAP_FE_FILTER, 4, 8, 4_096),
            // The conntrack filter (a new map, no bump: created with its switch off,
            // which makes the programs look every packet up until the agent builds it).
            (MAP_CT_FILTER, 4, 8, 16_385),
        ],
    ),
];

/// The layout of `name` in `version`, if that version has the map.
pub fn layout_of(version: u32, name: &str) -> Option<MapLayout> {
    let (_, maps) = LAYOUTS.iter().find(|(v, _)| *v == version)?;
    maps.iter()
        .find(|(n, ..)| *n == name)
        .map(|&(_, key, value, entries)| MapLayout {
            key,
            value,
            entries,
        })
}

fn known(version: u32) -> bool {
    LAYOUTS.iter().any(|(v, _)| *v == version)
}

/// The layouts of the past whose entries need converting.
pub mod v1 {
    /// `lb_common::Frontend` before Maglev (16 bytes): no table.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Frontend {
        pub service_id: u32,
        pub count: u32,
        pub flags: u32,
        pub affinity_timeout_s: u32,
    }

    // SAFETY: `#[repr(C)]`, four `u32`, no padding, any bits valid.
    unsafe impl aya::Pod for Frontend {}
    const _: () = assert!(size_of::<Frontend>() == 16);

    impl Frontend {
        /// The frontend in layout 2: no Maglev table yet (`table_size` 0: the datapath
        /// hashes over the slots, as layout 1 did) until the writer's first sync gives
        /// it one.
        pub fn upgrade(self) -> lb_common::Frontend {
            lb_common::Frontend {
                service_id: self.service_id,
                count: self.count,
                flags: self.flags,
                affinity_timeout_s: self.affinity_timeout_s,
                table_base: 0,
                table_size: 0,
            }
        }
    }
}

/// How a map pinned in an older layout becomes this build's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Conversion {
    /// `LB_FRONTENDS` of layout 1 (16-byte values): each entry without a table.
    FrontendsV1,
    /// `LB_COUNTERS` of another length: the counters both have, per CPU.
    Counters,
}

/// What a pinned map of layout `have`, pinned by an agent of layout `from`, needs:
/// nothing (`Ok(None)`: adopted), a conversion, or a refusal (no converter).
fn conversion(name: &str, have: MapLayout, from: u32) -> Result<Option<Conversion>, String> {
    let Some(want) = layout_of(LAYOUT_VERSION, name) else {
        return Ok(None);
    };
    if !want.admits(have) {
        return match (name, from, have) {
            (
                MAP_FRONTENDS,
                1,
                MapLayout {
                    key: 20, value: 16, ..
                },
            ) => Ok(Some(Conversion::FrontendsV1)),
            _ => Err(format!(
                "{name} ({have}) has no conversion from layout version {from} to {LAYOUT_VERSION} \
                 ({want})"
            )),
        };
    }
    Ok((name == MAP_COUNTERS && have.entries != counter::COUNT).then_some(Conversion::Counters))
}

/// The maps pinned under `dir` that any known layout has, with their layouts.
fn pinned(dir: &Path) -> Result<Vec<(&'static str, MapLayout)>> {
    let mut names: Vec<&'static str> = MAP_NAMES.to_vec();
    for (_, maps) in LAYOUTS {
        names.extend(maps.iter().map(|(n, ..)| *n));
    }
    names.sort_unstable();
    names.dedup();
    let mut out = Vec::new();
    for name in names {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path)
            .map_err(|e| Error::Load(format!("reading the pinned map {}: {e}", path.display())))?;
        out.push((
            name,
            MapLayout {
                key: info.key_size(),
                value: info.value_size(),
                entries: info.max_entries(),
            },
        ));
    }
    Ok(out)
}

fn open(path: &Path) -> Result<Map> {
    let data = MapData::from_pin(path)
        .map_err(|e| Error::Load(format!("opening {}: {e}", path.display())))?;
    Map::from_map_data(data).map_err(|e| Error::Load(format!("{}: {e}", path.display())))
}

fn record_map(dir: &Path) -> Result<Array<MapData, LayoutRecord>> {
    let path = dir.join(MAP_LAYOUT);
    Array::try_from(open(&path)?).map_err(|e| Error::Load(format!("{}: {e}", path.display())))
}

/// The version `LB_LAYOUT` records (None: no record, or 0, not written yet).
pub fn recorded(dir: &Path) -> Result<Option<u32>> {
    let path = dir.join(MAP_LAYOUT);
    if !path.exists() {
        return Ok(None);
    }
    let info = MapInfo::from_pin(&path)
        .map_err(|e| Error::Load(format!("reading {}: {e}", path.display())))?;
    if info.value_size() as usize != size_of::<LayoutRecord>() {
        return Err(Error::Load(format!(
            "{} holds {} bytes, not the {} of a layout record: it was pinned by an lb this \
             one does not know, and the maps beside it would be misread. {}",
            path.display(),
            info.value_size(),
            size_of::<LayoutRecord>(),
            start_afresh(dir)
        )));
    }
    let r = record_map(dir)?
        .get(&0, 0)
        .map_err(|e| Error::Load(format!("reading {}: {e}", path.display())))?;
    Ok((r.version != 0).then_some(r.version))
}

fn write_record(dir: &Path, version: u32) -> Result<()> {
    let path = dir.join(MAP_LAYOUT);
    record_map(dir)?
        .set(0, LayoutRecord { version, _pad: 0 }, 0)
        .map_err(|e| Error::Load(format!("writing {}: {e}", path.display())))
}

/// The command that starts afresh, and what it costs.
fn start_afresh(dir: &Path) -> String {
    format!(
        "To start afresh, stop that agent and remove its pins: rm -r {} (this detaches the \
         running datapath until this agent attaches, and drops its conntrack entries: \
         established connections through Services break)",
        dir.display()
    )
}

/// The first pinned map that layout `version` does not admit: (name, what it has, what
/// the version has). A map the version does not have must be of this build's layout (a
/// newer map, adopted as it is).
fn disagreement(
    version: u32,
    pins: &[(&'static str, MapLayout)],
) -> Option<(&'static str, MapLayout, Option<MapLayout>)> {
    pins.iter().find_map(|&(name, have)| {
        let want = layout_of(version, name).or_else(|| layout_of(LAYOUT_VERSION, name));
        (!want.is_some_and(|w| w.admits(have))).then_some((name, have, want))
    })
}

/// The version of pins without a record: the newest known layout that admits them all.
pub fn infer(pins: &[(&'static str, MapLayout)]) -> Option<u32> {
    LAYOUTS
        .iter()
        .rev()
        .map(|(v, _)| *v)
        .find(|v| disagreement(*v, pins).is_none())
}

/// Refuses to read maps pinned under `dir` in another layout than this build's (`lb
/// show`, `lb trace`: they read the pins of a running agent, which may be of another
/// version).
pub fn check_readable(dir: &Path) -> Result<()> {
    let pins = pinned(dir)?;
    let version = match recorded(dir)? {
        Some(v) => v,
        None => infer(&pins).unwrap_or(0),
    };
    if version == LAYOUT_VERSION && disagreement(version, &pins).is_none() {
        return Ok(());
    }
    Err(Error::Map(format!(
        "the maps pinned under {} are of layout version {version} (0: unknown); this lb \
         reads layout version {LAYOUT_VERSION} and would misread them: use the lb of the \
         agent that pinned them",
        dir.display()
    )))
}

/// An upgrade decided before the load: what the pins are, and which maps change.
#[derive(Debug)]
pub struct Upgrade {
    dir: PathBuf,
    /// The layout of the pins (None: nothing pinned).
    pub from: Option<u32>,
    /// What the record said before the migration (restored if it fails).
    recorded: Option<u32>,
    convert: Vec<(&'static str, Conversion)>,
}

impl Upgrade {
    /// Looks at the pins under `dir` (after putting back those of a migration that was
    /// interrupted) and decides; refuses pins this lb would misread.
    pub fn prepare(dir: &Path) -> Result<Self> {
        recover(dir)?;
        let pins = pinned(dir)?;
        let recorded = recorded(dir)?;
        let mut up = Upgrade {
            dir: dir.to_path_buf(),
            from: None,
            recorded,
            convert: Vec::new(),
        };
        if pins.iter().all(|(n, _)| *n == MAP_LAYOUT) {
            return Ok(up);
        }
        let from = match recorded {
            Some(v) if v > LAYOUT_VERSION => {
                return Err(Error::Load(format!(
                    "the maps pinned under {} are of layout version {v}, from a newer lb; \
                     this lb has layout version {LAYOUT_VERSION} and would misread them \
                     (a downgrade across a layout change is not supported: run an lb of \
                     layout {v} or later). {}",
                    dir.display(),
                    start_afresh(dir)
                )));
            }
            Some(v) if !known(v) => {
                return Err(Error::Load(format!(
                    "the maps pinned under {} are of layout version {v}, which this lb \
                     (layout version {LAYOUT_VERSION}) cannot migrate from. {}",
                    dir.display(),
                    start_afresh(dir)
                )));
            }
            Some(v) => {
                if let Some((name, have, want)) = disagreement(v, &pins) {
                    return Err(Error::Load(format!(
                        "the map pinned at {} ({have}) is not of layout version {v}, which \
                         {} records ({}): refusing to read it. {}",
                        dir.join(name).display(),
                        dir.join(MAP_LAYOUT).display(),
                        want.map_or("no such map".into(), |w| w.to_string()),
                        start_afresh(dir)
                    )));
                }
                v
            }
            None => match infer(&pins) {
                Some(v) => v,
                None => {
                    let (name, have, want) = disagreement(LAYOUT_VERSION, &pins)
                        .expect("no known layout admits the pins, so neither does this one");
                    return Err(Error::Load(format!(
                        "the map pinned at {} has another layout ({have}; layout version \
                         {LAYOUT_VERSION} of this lb has {}): an agent of another version \
                         pinned it, of no layout this lb knows (version 0: from before \
                         layout versions, older than any it can migrate from), and this one \
                         would misread it. {}",
                        dir.join(name).display(),
                        want.map_or("no such map".into(), |w| w.to_string()),
                        start_afresh(dir)
                    )));
                }
            },
        };
        up.from = Some(from);
        for &(name, have) in &pins {
            match conversion(name, have, from) {
                Ok(Some(c)) => up.convert.push((name, c)),
                Ok(None) => {}
                Err(why) => {
                    return Err(Error::Load(format!(
                        "the maps pinned under {} cannot be migrated: {why}. {}",
                        dir.display(),
                        start_afresh(dir)
                    )))
                }
            }
        }
        Ok(up)
    }

    /// Whether maps are converted (an upgrade proper).
    pub fn migrates(&self) -> bool {
        !self.convert.is_empty()
    }

    /// Moves the pins of the maps to convert into `upgrade/`, so the load makes them
    /// anew; the record says 0 (no layout) until [`Upgrade::finish`].
    pub fn set_aside(&self) -> Result<()> {
        if !self.migrates() {
            return Ok(());
        }
        let aside = self.dir.join(ASIDE_DIR);
        fs::create_dir_all(&aside)
            .map_err(|e| Error::Load(format!("creating {}: {e}", aside.display())))?;
        if self.recorded.is_some() {
            write_record(&self.dir, 0)?;
        }
        for (name, _) in &self.convert {
            let (from, to) = (self.dir.join(name), aside.join(name));
            fs::rename(&from, &to).map_err(|e| {
                Error::Load(format!(
                    "moving {} to {}: {e}",
                    from.display(),
                    to.display()
                ))
            })?;
        }
        Ok(())
    }

    /// Puts the set-aside pins back (the load or the conversion failed): the folder is
    /// as it was, for the agent that pinned it or another try.
    pub fn restore(&self) {
        if !self.migrates() {
            return;
        }
        let aside = self.dir.join(ASIDE_DIR);
        for (name, _) in &self.convert {
            let (old, new) = (aside.join(name), self.dir.join(name));
            if old.exists() {
                let _ = fs::remove_file(&new);
                if let Err(e) = fs::rename(&old, &new) {
                    warn!("putting {} back: {e}", new.display());
                }
            }
        }
        let _ = fs::remove_dir(&aside);
        if self.dir.join(MAP_LAYOUT).exists() {
            let _ = write_record(&self.dir, self.recorded.unwrap_or(0));
        }
    }

    /// After the load (the maps to convert made anew, no new program attached yet):
    /// converts the set-aside entries into the new maps, records this layout and removes
    /// the old pins. On an error the caller [`restore`](Upgrade::restore)s.
    pub fn finish(&self) -> Result<()> {
        let aside = self.dir.join(ASIDE_DIR);
        let mut done = Vec::new();
        for (name, c) in &self.convert {
            let (old, new) = (aside.join(name), self.dir.join(name));
            let n = convert(*c, &old, &new).map_err(|e| {
                Error::Load(format!(
                    "migrating {name} from layout version {} to {LAYOUT_VERSION}: {e}",
                    self.from.unwrap_or(0)
                ))
            })?;
            done.push(format!("{name} ({n} entries)"));
        }
        write_record(&self.dir, LAYOUT_VERSION)?;
        if self.migrates() {
            for (name, _) in &self.convert {
                let _ = fs::remove_file(aside.join(name));
            }
            let _ = fs::remove_dir(&aside);
            info!(
                pin_dir = %self.dir.display(),
                "migrated the pinned maps from layout version {} to {LAYOUT_VERSION}: {}; \
                 the others adopted as they are",
                self.from.unwrap_or(0),
                done.join(", ")
            );
        }
        Ok(())
    }
}

/// Converts the entries of the map pinned at `old` into the one pinned at `new`: how
/// many.
fn convert(c: Conversion, old: &Path, new: &Path) -> Result<usize, String> {
    let open_err = |e: Error| e.to_string();
    match c {
        Conversion::FrontendsV1 => {
            let from: HashMap<MapData, FrontendKey, v1::Frontend> =
                HashMap::try_from(open(old).map_err(open_err)?).map_err(|e| e.to_string())?;
            let mut to: HashMap<MapData, FrontendKey, Frontend> =
                HashMap::try_from(open(new).map_err(open_err)?).map_err(|e| e.to_string())?;
            let mut n = 0;
            for entry in from.iter() {
                let (k, v) = entry.map_err(|e| format!("reading {}: {e}", old.display()))?;
                to.insert(k, v.upgrade(), 0).map_err(|e| {
                    format!(
                        "writing {}: {e} (is --max-frontends smaller than before?)",
                        new.display()
                    )
                })?;
                n += 1;
            }
            Ok(n)
        }
        Conversion::Counters => {
            let from: PerCpuArray<MapData, u64> =
                PerCpuArray::try_from(open(old).map_err(open_err)?).map_err(|e| e.to_string())?;
            let mut to: PerCpuArray<MapData, u64> =
                PerCpuArray::try_from(open(new).map_err(open_err)?).map_err(|e| e.to_string())?;
            let n = from.len().min(to.len());
            for i in 0..n {
                let v = from
                    .get(&i, 0)
                    .map_err(|e| format!("reading {}: {e}", old.display()))?;
                to.set(i, v, 0)
                    .map_err(|e| format!("writing {}: {e}", new.display()))?;
            }
            Ok(n as usize)
        }
    }
}

/// Puts back the pins of a migration that was interrupted (the agent died between
/// setting them aside and recording the new layout): its half-made maps go.
fn recover(dir: &Path) -> Result<()> {
    let aside = dir.join(ASIDE_DIR);
    let Ok(entries) = fs::read_dir(&aside) else {
        return Ok(());
    };
    let finished = recorded(dir).ok().flatten() == Some(LAYOUT_VERSION);
    for entry in entries.flatten() {
        let old = entry.path();
        if finished {
            let _ = fs::remove_file(&old);
            continue;
        }
        let new = dir.join(entry.file_name());
        let _ = fs::remove_file(&new);
        fs::rename(&old, &new).map_err(|e| {
            Error::Load(format!(
                "putting back {} (set aside by a migration that did not finish): {e}",
                new.display()
            ))
        })?;
        warn!(
            "{} was set aside by a migration that did not finish: put back",
            new.display()
        );
    }
    let _ = fs::remove_dir(&aside);
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::mem::size_of;

    use lb_common::*;

    use super::*;

    fn l(key: usize, value: usize, entries: u32) -> MapLayout {
        MapLayout {
            key: key as u32,
            value: value as u32,
            entries,
        }
    }

    /// This build's types, map by map: what the programs of this build read.
    fn build_layout(name: &str) -> MapLayout {
        match name {
            MAP_FRONTENDS => l(size_of::<FrontendKey>(), size_of::<Frontend>(), 0),
            MAP_SLOTS => l(size_of::<SlotKey>(), size_of::<Slot>(), 0),
            MAP_BACKENDS => l(size_of::<u32>(), size_of::<Backend>(), 0),
            MAP_CONNTRACK => l(size_of::<CtKey>(), size_of::<CtValue>(), 0),
            MAP_COUNTERS => l(size_of::<u32>(), size_of::<u64>(), 0),
            MAP_FRAGS => l(size_of::<FragKey>(), size_of::<FragValue>(), 0),
            MAP_NODE => l(size_of::<u32>(), size_of::<NodeConfig>(), 1),
            MAP_SNAT => l(size_of::<CtKey>(), size_of::<SnatPeer>(), 0),
            MAP_AFFINITY => l(size_of::<AffinityKey>(), size_of::<AffinityValue>(), 0),
            MAP_SOURCE_RANGES => l(4 + size_of::<SourceRange>(), size_of::<u32>(), 0),
            MAP_MAGLEV => l(size_of::<u32>(), size_of::<MaglevCell>(), 0),
            MAP_TRACE => l(size_of::<u32>(), size_of::<TraceConfig>(), 1),
            MAP_EVENTS => l(0, 0, EVENTS_RING_BYTES),
            MAP_LAYOUT => l(size_of::<u32>(), size_of::<LayoutRecord>(), 1),
            MAP_SOCK_REV => l(size_of::<SockKey>(), size_of::<SockValue>(), 0),
            MAP_SOCK_CONFIG => l(size_of::<u32>(), size_of::<SockConfig>(), 1),
            MAP_SOCK_KILL => l(size_of::<u64>(), size_of::<u32>(), 0),
            MAP_SOCK_CONN => l(size_of::<i32>(), size_of::<SockConn>(), 0),
            MAP_FE_FILTER => l(size_of::<u32>(), size_of::<u64>(), FRONTEND_FILTER_WORDS),
            MAP_CT_FILTER => l(size_of::<u32>(), size_of::<u64>(), CT_FILTER_WORDS + 1),
            _ => panic!("{name}: a map of this build without its layout here"),
        }
    }

    #[test]
    fn this_layout_version_is_the_layout_of_this_builds_types() {
        // A changed type or map without a new LAYOUT_VERSION (and its row in LAYOUTS)
        // fails here: agents would adopt the old pins and misread them.
        for name in MAP_NAMES {
            assert_eq!(
                layout_of(LAYOUT_VERSION, name),
                Some(build_layout(name)),
                "{name}: bump LAYOUT_VERSION and add the layout to LAYOUTS"
            );
        }
        let (v, maps) = LAYOUTS.last().unwrap();
        assert_eq!(*v, LAYOUT_VERSION, "LAYOUTS ends with this version");
        assert!(maps.iter().all(|(n, ..)| MAP_NAMES.contains(n)));
    }

    fn pins(version: u32) -> Vec<(&'static str, MapLayout)> {
        let (_, maps) = LAYOUTS.iter().find(|(v, _)| *v == version).unwrap();
        maps.iter()
            .map(|&(n, k, v, e)| (n, l(k as usize, v as usize, if e == 0 { 64 } else { e })))
            .collect()
    }

    #[test]
    fn pins_without_a_record_are_recognised_by_their_sizes() {
        assert_eq!(infer(&pins(1)), Some(1));
        assert_eq!(infer(&pins(2)), Some(2));
        // The Maglev version before `lb trace`: no trace maps, 27 counters.
        let maglev: Vec<_> = pins(2)
            .into_iter()
            .filter(|(n, _)| {
                ![
                    MAP_TRACE,
                    MAP_EVENTS,
                    MAP_LAYOUT,
                    MAP_SOCK_REV,
                    MAP_SOCK_CONFIG,
                    MAP_SOCK_KILL,
                    MAP_SOCK_CONN,
                    MAP_FE_FILTER,
                    MAP_CT_FILTER,
                ]
                .contains(n)
            })
            .collect();
        assert_eq!(infer(&maglev), Some(2));
        // A layout 1 folder with a map of this build beside it (a migration that
        // created it, then failed): still layout 1.
        let mut mixed = pins(1);
        mixed.push((MAP_MAGLEV, l(4, 8, 64)));
        assert_eq!(infer(&mixed), Some(1));
        // The IPv4-only version: conntrack keyed by 16 bytes. No layout admits it.
        let mut v4 = pins(1);
        v4.retain(|(n, _)| *n != MAP_CONNTRACK);
        v4.push((MAP_CONNTRACK, l(16, 24, 64)));
        assert_eq!(infer(&v4), None);
        // Frontends of a size no version had.
        let mut odd = pins(2);
        odd[0].1.value = 20;
        assert_eq!(infer(&odd), None);
    }

    #[test]
    fn conversions_exist_for_the_frontends_of_layout_one_and_counters_of_any_length() {
        assert_eq!(
            conversion(MAP_FRONTENDS, l(20, 16, 64), 1),
            Ok(Some(Conversion::FrontendsV1))
        );
        assert_eq!(conversion(MAP_FRONTENDS, l(20, 24, 64), 2), Ok(None));
        assert_eq!(
            conversion(MAP_COUNTERS, l(4, 8, 27), 1),
            Ok(Some(Conversion::Counters))
        );
        assert_eq!(
            conversion(MAP_COUNTERS, l(4, 8, 99), 2),
            Ok(Some(Conversion::Counters))
        );
        assert_eq!(
            conversion(MAP_COUNTERS, l(4, 8, counter::COUNT), 2),
            Ok(None)
        );
        assert_eq!(conversion(MAP_CONNTRACK, l(40, 48, 64), 1), Ok(None));
        // 16-byte frontends recorded as layout 2 never reach here (the record's layout
        // refuses them first), and have no conversion from 2 either.
        assert!(conversion(MAP_FRONTENDS, l(20, 16, 64), 2).is_err());
    }

    #[test]
    fn a_v1_frontend_keeps_its_fields_and_has_no_table() {
        let old = v1::Frontend {
            service_id: 7,
            count: 3,
            flags: FRONTEND_F_NODEPORT | FRONTEND_F_LOCAL,
            affinity_timeout_s: 10_800,
        };
        assert_eq!(
            old.upgrade(),
            Frontend {
                service_id: 7,
                count: 3,
                flags: FRONTEND_F_NODEPORT | FRONTEND_F_LOCAL,
                affinity_timeout_s: 10_800,
                table_base: 0,
                table_size: 0,
            }
        );
    }
}
