//! The programs' debug build (`cargo xtask build-ebpf --debug-log`, which `cargo xtask
//! test` runs too): its aya-log lines reach the agent's log when a packet goes through,
//! and the release object (the one `lb` embeds) has none of it. Needs root.
use std::{
    io::Write,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use aya::programs::{TestRun, TestRunOptions};
use lb_testbench::packet::*;
use lb_userspace::{
    config,
    dataplane::Dataplane,
    loader::{remove_pins, Datapath, LoadOptions, EBPF_OBJECT},
    model::desired_state,
};

fn debug_object() -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/ebpf-debug-log/bpfel-unknown-none/release/lb-ebpf");
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}: build it with `cargo xtask build-ebpf --debug-log` (cargo xtask test does)",
            path.display()
        )
    })
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// What aya-log's map and level, and the log lines' text (the literal parts of their
/// format strings, in .rodata), leave in an object.
const LOG_MARKS: [&str; 5] = [
    "AYA_LOGS",
    "AYA_LOG_LEVEL",
    "new flow ",
    " client port ",
    "reason=passed_malformed",
];

#[test]
fn the_release_object_has_no_log_map_and_no_log_strings() {
    assert!(
        !EBPF_OBJECT.is_empty(),
        "lb was built without its eBPF object"
    );
    let debug = debug_object();
    for mark in LOG_MARKS {
        // The marks are what a logging object has (so their absence means something).
        assert!(
            contains(&debug, mark.as_bytes()),
            "{mark:?} in the debug build"
        );
        assert!(
            !contains(EBPF_OBJECT, mark.as_bytes()),
            "{mark:?} in the release object"
        );
    }
}

/// A `tracing` writer into a buffer the test reads.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = remove_pins(&self.0);
    }
}

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
";

#[test]
fn a_debug_build_logs_its_decisions_into_the_agents_log() {
    // The agent's log as `lb` writes it (tracing's fmt layer), global: the programs'
    // lines come from the reader's own thread.
    let log = Captured::default();
    let writer = log.clone();
    tracing::subscriber::set_global_default(
        tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish(),
    )
    .unwrap();
    lb_testbench::sandbox::hold_sandbox_lock();
    let pins = Pins(PathBuf::from(format!(
        "/sys/fs/bpf/lbt-debuglog-{}",
        std::process::id()
    )));
    let opts = LoadOptions {
        pin_dir: pins.0.clone(),
        max_frontends: 1024,
        max_backends: 1024,
        max_slots: 1024,
        max_conntrack: 4096,
        max_maglev_cells: 4096,
        ..Default::default()
    };
    let (mut dp, maps) = Datapath::load_object(&opts, &debug_object()).expect("load");
    let mut plane = Dataplane::new(maps).unwrap();
    let c = config::parse("test", CONFIG).unwrap();
    let report = plane.sync(&desired_state(&c.services, &c.endpoint_slices, &c.node));
    assert!(report.errors.is_empty(), "{:?}", report.errors);

    let mut run = |pkt: &[u8]| {
        let mut out = vec![0u8; 4096];
        let r = dp
            .program()
            .test_run(TestRunOptions {
                data_in: Some(pkt),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .unwrap();
        out.truncate(r.data_size_out as usize);
        out
    };
    // A new flow (translated, as the release build does) and a refusal.
    let syn = Spec::tcp("10.244.0.11", 40000, "10.96.0.10", 80, SYN);
    assert_eq!(
        run(&syn.build()),
        rewritten(&syn, Some(("10.244.0.12", 8080)), None)
    );
    run(&Spec::tcp("10.244.0.11", 40001, "10.96.0.10", 81, SYN).build());

    let want = [
        "this eBPF object is a debug build",
        "new flow ::ffff:10.244.0.11:40000 -> ::ffff:10.96.0.10:80 proto 6",
        "reason=new_flow service 1 backend 1 client port 40000",
        "new flow ::ffff:10.244.0.11:40001 -> ::ffff:10.96.0.10:81 proto 6",
        "reason=refused_no_backend service 2 backend 0 client port 40001",
    ];
    let deadline = Instant::now() + Duration::from_secs(5);
    while !want.iter().all(|w| log.text().contains(w)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let text = log.text();
    eprintln!("{text}");
    for w in want {
        assert!(text.contains(w), "{w:?} in the agent's log:\n{text}");
    }
    assert!(text.contains("lb_ebpf"), "under the target lb_ebpf");

    // The debug build verifies too, within the kernel's limit of a million.
    for (name, n) in [
        (
            "tc",
            dp.program().info().unwrap().verified_instruction_count(),
        ),
        (
            "XDP",
            dp.xdp_program()
                .info()
                .unwrap()
                .verified_instruction_count(),
        ),
        (
            "tc egress",
            dp.egress_program()
                .info()
                .unwrap()
                .verified_instruction_count(),
        ),
        (
            "XDP carry",
            dp.carry_program()
                .info()
                .unwrap()
                .verified_instruction_count(),
        ),
    ] {
        let n = n.expect("the kernel reports the count (5.16+)");
        eprintln!("debug build, {name}: {n} instructions verified");
        assert!(n < 1_000_000, "{name}: {n}");
    }
}
