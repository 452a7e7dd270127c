//! Upgrades across map layouts (ARCHITECTURE.md, "Upgrades"): an agent started on maps
//! pinned by an agent of the previous layout migrates them (its entries kept, its flows
//! on their backends), and one started on maps of a newer layout, or on maps that
//! disagree with their recorded layout, refuses with both versions and the way out, and
//! leaves them as they were. The real programs and loader, through BPF_PROG_TEST_RUN, in
//! pin folders of their own; the previous layout's pins made by
//! `lb_testbench::layout1`. Needs root (and bpftool, from `cargo xtask setup`).
use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicUsize, Ordering},
};

use aya::{
    maps::{Array, Map, MapData, MapInfo, PerCpuArray, PerCpuValues},
    programs::{TestRun, TestRunOptions},
};
use lb_common::{
    counter, Frontend, FrontendKey, LayoutRecord, LAYOUT_VERSION, MAP_COUNTERS, MAP_FRONTENDS,
    MAP_LAYOUT,
};
use lb_testbench::{layout1, packet::*};
use lb_userspace::{
    config,
    dataplane::{Dataplane, Maps},
    loader::{remove_pins, Datapath, LoadOptions},
    model::desired_state,
    upgrade,
};

const TC_ACT_OK: u32 = 0;
const VIP: &str = "10.96.0.10";
const CLIENT: &str = "10.244.0.11";
const B1: &str = "10.244.0.12";
const B2: &str = "10.244.0.13";

static N: AtomicUsize = AtomicUsize::new(0);

/// A pin folder of its own, removed on drop (also when the test fails).
struct Pins(PathBuf);

impl Pins {
    fn new() -> Self {
        lb_testbench::sandbox::hold_sandbox_lock();
        Pins(PathBuf::from(format!(
            "/sys/fs/bpf/lbt-upgrade-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        )))
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = remove_pins(&self.0);
    }
}

fn opts(pin_dir: &Path) -> LoadOptions {
    LoadOptions {
        pin_dir: pin_dir.to_path_buf(),
        max_frontends: 1024,
        max_backends: 1024,
        max_slots: 1024,
        max_conntrack: 4096,
        max_maglev_cells: 4096,
        ..Default::default()
    }
}

/// web: 10.96.0.10:80/TCP -> :8080 on two backends, and :81 without any.
const CONFIG: &str = "services:
  - name: web
    clusterIP: 10.96.0.10
    ports:
      - {name: http, port: 80, protocol: TCP}
      - {name: empty, port: 81, protocol: TCP}
endpointSlices:
  - name: web-1
    serviceName: web
    ports:
      - {name: http, port: 8080, protocol: TCP}
    endpoints:
      - addresses: [\"10.244.0.12\"]
        conditions: {ready: true}
      - addresses: [\"10.244.0.13\"]
        conditions: {ready: true}
";

fn sync(plane: &mut Dataplane) {
    let c = config::parse("test", CONFIG).unwrap();
    let report = plane.sync(&desired_state(&c.services, &c.endpoint_slices, &c.node));
    assert!(report.errors.is_empty(), "{:?}", report.errors);
}

fn tc_run(dp: &mut Datapath, pkt: &[u8]) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; 4096];
    let r = dp
        .program()
        .test_run(TestRunOptions {
            data_in: Some(pkt),
            data_out: Some(&mut out),
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN: {e}"));
    out.truncate(r.data_size_out as usize);
    (r.return_value, out)
}

fn open(pin_dir: &Path, name: &str) -> Map {
    Map::from_map_data(MapData::from_pin(pin_dir.join(name)).unwrap()).unwrap()
}

/// This layout's datapath, synced, with one flow opened through it (its backend
/// returned), its programs then dropped and its maps left pinned, as an agent that exits
/// with --keep-pinned leaves them.
fn pinned_with_a_flow(pin_dir: &Path, syn: &Spec) -> String {
    let (mut dp, maps) = Datapath::load(&opts(pin_dir)).expect("load");
    let mut plane = Dataplane::new(maps).unwrap();
    sync(&mut plane);
    let (verdict, out) = tc_run(&mut dp, &syn.build());
    assert_eq!(verdict, TC_ACT_OK);
    view(&out).dst.to_string()
}

fn frontends(pin_dir: &Path) -> Vec<(FrontendKey, Frontend)> {
    layout1::frontends(pin_dir).unwrap()
}

fn frontends_of_layout_1(pin_dir: &Path, entries: &[(FrontendKey, Frontend)]) {
    layout1::pin_frontends(pin_dir, entries, 1024).unwrap();
}

fn record(pin_dir: &Path) -> u32 {
    let a: Array<MapData, LayoutRecord> = Array::try_from(open(pin_dir, MAP_LAYOUT)).unwrap();
    a.get(&0, 0).unwrap().version
}

fn set_record(pin_dir: &Path, version: u32) {
    let mut a: Array<MapData, LayoutRecord> = Array::try_from(open(pin_dir, MAP_LAYOUT)).unwrap();
    a.set(0, LayoutRecord { version, _pad: 0 }, 0).unwrap();
}

fn pins_in(pin_dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(pin_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

#[test]
fn an_agent_migrates_the_maps_of_the_previous_layout_and_keeps_their_flows() {
    let pins = Pins::new();
    let dir = &pins.0;
    // Layout 1, as an agent from before Maglev left it: the maps of a synced datapath
    // with a flow in conntrack (written by the real writer and program), with the
    // frontends in 16-byte values, 27 counters (before `trace_lost`), and neither the
    // Maglev table, nor `lb trace`'s maps, nor a layout record, nor the frontend filter
    // (which the load fills from the frontends, or new flows would miss them below).
    let syn = Spec::tcp(CLIENT, 40100, VIP, 80, SYN);
    let chosen = pinned_with_a_flow(dir, &syn);
    assert_eq!(frontends(dir).len(), 2, "web:80 and web:81");
    let before = layout1::downgrade(dir).unwrap();
    let ncpus = aya::util::nr_cpus().unwrap();
    {
        // A count only the old map has: 7 passed packets on each CPU.
        let mut old: PerCpuArray<MapData, u64> =
            PerCpuArray::try_from(open(dir, MAP_COUNTERS)).unwrap();
        assert_eq!(old.len(), layout1::COUNTERS);
        let passed = PerCpuValues::try_from(vec![7u64; ncpus]).unwrap();
        old.set(counter::PASSED, passed, 0).unwrap();
    }
    assert_eq!(upgrade::recorded(dir).unwrap(), None);

    // The agent of this layout starts on them.
    let (mut dp, maps) = Datapath::load(&opts(dir)).expect("migrates layout 1");
    assert_eq!(record(dir), LAYOUT_VERSION, "the new layout recorded");
    assert!(
        !dir.join(upgrade::ASIDE_DIR).exists(),
        "the old maps removed"
    );
    let info = MapInfo::from_pin(dir.join(MAP_FRONTENDS)).unwrap();
    assert_eq!(info.value_size() as usize, size_of::<Frontend>());
    let after = frontends(dir);
    let expected: Vec<_> = before
        .iter()
        .map(|(k, f)| {
            (
                *k,
                Frontend {
                    table_base: 0,
                    table_size: 0,
                    ..*f
                },
            )
        })
        .collect();
    assert_eq!(after, expected, "every frontend kept, without a table yet");
    let counters = Maps::from_pins(dir).unwrap().counters().unwrap();
    let count = |name: &str| counters.iter().find(|(n, _)| *n == name).unwrap().1;
    assert_eq!(count("new_flow"), 1, "the counters kept");
    assert_eq!(count("passed"), 7 * ncpus as u64);
    assert_eq!(count("trace_lost"), 0, "the new counter starts at zero");

    // Before the writer's first sync (the frontends have no table): the flow keeps its
    // backend (conntrack was adopted), and a new flow hashes over the slots.
    let ack = Spec::tcp(CLIENT, 40100, VIP, 80, ACK);
    let (verdict, out) = tc_run(&mut dp, &ack.build());
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, rewritten(&ack, Some((&chosen, 8080)), None));
    let mut seen = std::collections::BTreeSet::new();
    for port in 41000..41032 {
        let syn = Spec::tcp(CLIENT, port, VIP, 80, SYN);
        let out = tc_run(&mut dp, &syn.build()).1;
        let dst = view(&out).dst.to_string();
        assert_eq!(out, rewritten(&syn, Some((&dst, 8080)), None));
        seen.insert(dst);
    }
    assert_eq!(
        seen,
        [B1, B2].map(String::from).into(),
        "both backends get new flows"
    );

    // The writer's first sync gives the frontend its Maglev table; the flow stays.
    let mut plane = Dataplane::new(maps).unwrap();
    sync(&mut plane);
    let web = frontends(dir)
        .into_iter()
        .find(|(k, _)| k.port == 80u16.to_be())
        .unwrap()
        .1;
    assert_eq!(web.table_size, 127, "a Maglev table for two backends");
    let (_, out) = tc_run(&mut dp, &ack.build());
    assert_eq!(out, rewritten(&ack, Some((&chosen, 8080)), None));
    drop(dp);
    drop(plane);

    // And the next agent of this layout adopts them as they are.
    let (_dp, _maps) = Datapath::load(&opts(dir)).expect("adopts its own layout");
    assert_eq!(frontends(dir).len(), 2);
    assert_eq!(record(dir), LAYOUT_VERSION);
}

#[test]
fn an_agent_refuses_the_maps_of_a_newer_layout_and_leaves_them_alone() {
    let pins = Pins::new();
    let dir = &pins.0;
    pinned_with_a_flow(dir, &Spec::tcp(CLIENT, 40200, VIP, 80, SYN));
    let newer = LAYOUT_VERSION + 1;
    set_record(dir, newer);
    let before = pins_in(dir);
    let err = match Datapath::load(&opts(dir)) {
        Ok(_) => panic!("maps of layout {newer} were adopted"),
        Err(e) => e.to_string(),
    };
    eprintln!("refused: {err}");
    for part in [
        format!("layout version {newer}"),
        format!("layout version {LAYOUT_VERSION}"),
        format!("rm -r {}", dir.display()),
        "established connections through Services break".into(),
    ] {
        assert!(err.contains(&part), "{part:?} in {err}");
    }
    assert_eq!(pins_in(dir), before, "nothing pinned or removed");
    assert_eq!(record(dir), newer);
    assert_eq!(frontends(dir).len(), 2, "the entries untouched");
    // `lb show` and `lb trace` (which open the pins as `Maps::from_pins` and
    // `PinnedNames::open` do) refuse to read them too.
    let show = match Maps::from_pins(dir) {
        Ok(_) => panic!("lb show would read maps of layout {newer}"),
        Err(e) => e.to_string(),
    };
    assert!(
        show.contains(&format!("layout version {newer}"))
            && show.contains(&format!("reads layout version {LAYOUT_VERSION}")),
        "{show}"
    );
    assert!(lb_userspace::trace::PinnedNames::open(dir).is_err());
}

#[test]
fn maps_that_disagree_with_their_recorded_layout_are_refused_not_misread() {
    // The record says this layout, but the frontends hold 16-byte values (layout 1's):
    // there is no conversion within a version, so the agent refuses rather than read
    // 24 bytes where 16 are.
    let pins = Pins::new();
    let dir = &pins.0;
    pinned_with_a_flow(dir, &Spec::tcp(CLIENT, 40300, VIP, 80, SYN));
    let entries = frontends(dir);
    frontends_of_layout_1(dir, &entries);
    assert_eq!(upgrade::recorded(dir).unwrap(), Some(LAYOUT_VERSION));
    let before = pins_in(dir);
    let err = match Datapath::load(&opts(dir)) {
        Ok(_) => panic!("frontends of 16-byte values were read as 24"),
        Err(e) => e.to_string(),
    };
    eprintln!("refused: {err}");
    for part in [
        dir.join(MAP_FRONTENDS).display().to_string(),
        "value 16 bytes".into(),
        format!("value {} bytes", size_of::<Frontend>()),
        format!("layout version {LAYOUT_VERSION}"),
        format!("rm -r {}", dir.display()),
    ] {
        assert!(err.contains(&part), "{part:?} in {err}");
    }
    assert_eq!(pins_in(dir), before, "nothing pinned or removed");
    let info = MapInfo::from_pin(dir.join(MAP_FRONTENDS)).unwrap();
    assert_eq!(info.value_size(), 16, "the old map kept");
}

#[test]
fn a_migration_that_fails_puts_the_old_maps_back() {
    // Layout 1's frontends, more of them than the new map holds (--max-frontends 1):
    // the conversion fails after the load made the new maps; the folder is left as it
    // was (the old frontends back in place, no record), and a load with room migrates.
    let pins = Pins::new();
    let dir = &pins.0;
    pinned_with_a_flow(dir, &Spec::tcp(CLIENT, 40400, VIP, 80, SYN));
    let entries = frontends(dir);
    frontends_of_layout_1(dir, &entries);
    std::fs::remove_file(dir.join(MAP_LAYOUT)).unwrap();
    let small = LoadOptions {
        max_frontends: 1,
        ..opts(dir)
    };
    let err = match Datapath::load(&small) {
        Ok(_) => panic!("two frontends fit in a map of one"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("migrating LB_FRONTENDS from layout version 1"),
        "{err}"
    );
    let info = MapInfo::from_pin(dir.join(MAP_FRONTENDS)).unwrap();
    assert_eq!(info.value_size(), 16, "the old frontends back in place");
    assert!(!dir.join(upgrade::ASIDE_DIR).exists());
    assert_eq!(upgrade::recorded(dir).unwrap(), None);
    let (_dp, _maps) = Datapath::load(&opts(dir)).expect("migrates with room");
    assert_eq!(frontends(dir).len(), 2);
}

#[test]
fn a_migration_interrupted_by_a_crash_is_put_back_and_done_again() {
    // An agent died while migrating layout 1: the old frontends set aside in upgrade/,
    // a new, still empty map pinned in their place, no record. The next agent puts the
    // old ones back and migrates them.
    let pins = Pins::new();
    let dir = &pins.0;
    pinned_with_a_flow(dir, &Spec::tcp(CLIENT, 40500, VIP, 80, SYN));
    let before = layout1::downgrade(dir).unwrap();
    let aside = dir.join(upgrade::ASIDE_DIR);
    std::fs::create_dir(&aside).unwrap();
    std::fs::rename(dir.join(MAP_FRONTENDS), aside.join(MAP_FRONTENDS)).unwrap();
    layout1::bpftool_create(
        &dir.join(MAP_FRONTENDS),
        "hash",
        20,
        24,
        1024,
        MAP_FRONTENDS,
    )
    .unwrap();
    let (_dp, _maps) = Datapath::load(&opts(dir)).expect("recovers and migrates");
    assert!(!aside.exists());
    assert_eq!(record(dir), LAYOUT_VERSION);
    let keys = |v: &[(FrontendKey, Frontend)]| {
        v.iter()
            .map(|(k, f)| (*k, f.service_id))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        keys(&frontends(dir)),
        keys(&before),
        "the old frontends, migrated"
    );
}
