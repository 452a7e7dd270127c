//! Pins of the previous map layout (layout 1, before Maglev), for the upgrade tests: the
//! maps an agent of this layout pinned (real entries, written by the real writer and
//! programs) turned into what an agent of layout 1 left: `LB_FRONTENDS` with 16-byte
//! values holding the same frontends (without their tables), `LB_COUNTERS` of 27
//! counters (before `trace_lost`) holding the same counts, and no `LB_MAGLEV`,
//! `LB_TRACE`, `LB_EVENTS`, `LB_LAYOUT`, `LB_FE_FILTER` or `LB_CT_FILTER` (layout 1 had none). Every other map is as
//! layout 1 had it already. Programs attached to the maps keep theirs (a map lives while
//! a program holds it): the pins change, not what runs.
use std::{path::Path, process::Command};

use aya::maps::{HashMap, Map, MapData, PerCpuArray, PerCpuValues};
use lb_common::{
    Frontend, FrontendKey, MAP_COUNTERS, MAP_CT_FILTER, MAP_EVENTS, MAP_FE_FILTER, MAP_FRONTENDS,
    MAP_LAYOUT, MAP_MAGLEV, MAP_TRACE,
};
use lb_userspace::upgrade::v1;

use crate::{Error, Result};

/// Counters in layout 1.
pub const COUNTERS: u32 = 27;

fn err(e: impl std::fmt::Display) -> Error {
    Error::Sandbox(format!("layout 1 fixture: {e}"))
}

fn open(pin_dir: &Path, name: &str) -> Result<Map> {
    Map::from_map_data(MapData::from_pin(pin_dir.join(name)).map_err(err)?).map_err(err)
}

/// `bpftool map create`: a map without BTF, as any loader makes it.
pub fn bpftool_create(
    path: &Path,
    ty: &str,
    key: u32,
    value: u32,
    entries: u32,
    name: &str,
) -> Result<()> {
    let st = Command::new("bpftool")
        .args(["map", "create"])
        .arg(path)
        .args([
            "type",
            ty,
            "key",
            &key.to_string(),
            "value",
            &value.to_string(),
        ])
        .args(["entries", &entries.to_string(), "name", name])
        .status()
        .map_err(|e| err(format!("bpftool (installed by cargo xtask setup): {e}")))?;
    if !st.success() {
        return Err(err(format!("bpftool map create {}: {st}", path.display())));
    }
    Ok(())
}

/// The frontends pinned under `pin_dir`, in key order.
pub fn frontends(pin_dir: &Path) -> Result<Vec<(FrontendKey, Frontend)>> {
    let m: HashMap<MapData, FrontendKey, Frontend> =
        HashMap::try_from(open(pin_dir, MAP_FRONTENDS)?).map_err(err)?;
    let mut v = m.iter().collect::<Result<Vec<_>, _>>().map_err(err)?;
    v.sort_by_key(|(k, _)| *k);
    Ok(v)
}

/// Replaces the pinned `LB_FRONTENDS` with a map of layout 1's 16-byte values holding
/// `entries` (without their tables), of `max` entries.
pub fn pin_frontends(pin_dir: &Path, entries: &[(FrontendKey, Frontend)], max: u32) -> Result<()> {
    let path = pin_dir.join(MAP_FRONTENDS);
    std::fs::remove_file(&path).map_err(err)?;
    bpftool_create(&path, "hash", 20, 16, max, MAP_FRONTENDS)?;
    let mut old: HashMap<MapData, FrontendKey, v1::Frontend> =
        HashMap::try_from(open(pin_dir, MAP_FRONTENDS)?).map_err(err)?;
    for (k, f) in entries {
        let v = v1::Frontend {
            service_id: f.service_id,
            count: f.count,
            flags: f.flags,
            affinity_timeout_s: f.affinity_timeout_s,
        };
        old.insert(k, v, 0).map_err(err)?;
    }
    Ok(())
}

/// Turns the pins under `pin_dir` (this layout's) into layout 1's (see the module's
/// doc). Returns the frontends as they were.
pub fn downgrade(pin_dir: &Path) -> Result<Vec<(FrontendKey, Frontend)>> {
    let before = frontends(pin_dir)?;
    let max = aya::maps::MapInfo::from_pin(pin_dir.join(MAP_FRONTENDS))
        .map_err(err)?
        .max_entries();
    pin_frontends(pin_dir, &before, max)?;
    let counters: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(open(pin_dir, MAP_COUNTERS)?).map_err(err)?;
    let values: Vec<PerCpuValues<u64>> = (0..COUNTERS)
        .map(|i| counters.get(&i, 0))
        .collect::<Result<_, _>>()
        .map_err(err)?;
    drop(counters);
    let path = pin_dir.join(MAP_COUNTERS);
    std::fs::remove_file(&path).map_err(err)?;
    bpftool_create(&path, "percpu_array", 4, 8, COUNTERS, MAP_COUNTERS)?;
    let mut old: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(open(pin_dir, MAP_COUNTERS)?).map_err(err)?;
    for (i, v) in values.into_iter().enumerate() {
        old.set(i as u32, v, 0).map_err(err)?;
    }
    for name in [
        MAP_MAGLEV,
        MAP_TRACE,
        MAP_EVENTS,
        MAP_LAYOUT,
        MAP_FE_FILTER,
        MAP_CT_FILTER,
    ] {
        std::fs::remove_file(pin_dir.join(name)).map_err(err)?;
    }
    Ok(before)
}
