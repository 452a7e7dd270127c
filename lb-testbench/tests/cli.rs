//! The `lb` command line as people and programs use it: `lb show` (JSON, filters,
//! backend states, conntrack idle times) on maps loaded from examples/services.yaml into
//! a private pin folder, output into a closed pipe, and the warnings for the traps a new
//! user falls into (`ip netns exec`, an interface glob that matches nothing). Needs root;
//! run with --test-threads=1.
use std::{
    io::Read,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use lb_testbench::agent::lb_binary;
use lb_userspace::{
    config,
    dataplane::{plan::map_addr, Dataplane, Maps},
    loader::{self, Datapath, LoadOptions},
    model::desired_state,
};
use serde_json::Value;

static N: AtomicUsize = AtomicUsize::new(0);

fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/services.yaml")
}

/// A pin folder of its own, removed on drop (also when the test fails).
struct Pins(PathBuf);

impl Pins {
    fn new() -> Self {
        lb_testbench::sandbox::hold_sandbox_lock();
        let n = N.fetch_add(1, Ordering::SeqCst);
        let dir = PathBuf::from(format!("/sys/fs/bpf/lbt-cli-{}-{n}", std::process::id()));
        let _ = loader::remove_pins(&dir);
        Self(dir)
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = loader::remove_pins(&self.0);
    }
}

/// The datapath loaded into `pins` with examples/services.yaml written to its maps, and
/// one conntrack flow (a client of web's ClusterIP, to 10.244.0.12, seen 5 s ago).
fn loaded(pins: &Pins) -> Datapath {
    let opts = LoadOptions {
        pin_dir: pins.0.clone(),
        max_frontends: 256,
        max_backends: 1024,
        max_slots: 1024,
        max_conntrack: 1024,
        ..Default::default()
    };
    let (datapath, maps) = Datapath::load(&opts).expect("loading the eBPF object (root needed)");
    let mut plane = Dataplane::new(maps).unwrap();
    let cfg = config::load(&examples()).unwrap();
    let report = plane.sync(&desired_state(
        &cfg.services,
        &cfg.endpoint_slices,
        &cfg.node,
    ));
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let st = plane.state().clone();
    let (web_key, web) = st
        .frontends
        .iter()
        .find(|(k, _)| {
            k.addr == map_addr(&"10.96.0.10".parse().unwrap()) && k.port == 80u16.to_be()
        })
        .map(|(k, f)| (*k, *f))
        .expect("web's ClusterIP");
    let backend_id = st.slot_list(&web)[0];
    let backend = *st.backend(backend_id).unwrap();
    // SAFETY: CLOCK_MONOTONIC_COARSE into a zeroed timespec.
    let now = unsafe {
        let mut ts: libc::timespec = std::mem::zeroed();
        libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts);
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    };
    let key = lb_common::CtKey {
        src_addr: map_addr(&"10.244.0.99".parse().unwrap()),
        dst_addr: web_key.addr,
        src_port: 40000u16.to_be(),
        dst_port: web_key.port,
        proto: web_key.proto,
        _pad: [0; 3],
    };
    let value = lb_common::CtValue {
        last_seen_ns: now - 5_000_000_000,
        created_ns: now - 65_000_000_000,
        nat_addr: backend.addr,
        nat_port: backend.port,
        state: lb_common::CT_STATE_ESTABLISHED,
        tcp_flags: 0,
        backend_id,
        service_id: web.service_id,
        flags: 0,
        dir: lb_common::CT_DIR_FORWARD,
        _pad: [0; 2],
    };
    plane.maps.conntrack.insert(key, value, 0).unwrap();
    datapath
}

fn lb(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(lb_binary().unwrap())
        .args(args)
        .output()
        .expect("running lb");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `lb show <what>` as a table, without an agent; it must succeed.
fn show_table(pins: &Pins, what: &str) -> String {
    let (ok, out, err) = lb(&[
        "show",
        what,
        "--agent",
        "",
        "--pin-dir",
        pins.0.to_str().unwrap(),
    ]);
    assert!(ok, "lb show {what}: {err}");
    out
}

fn show_json(pins: &Pins, args: &[&str]) -> Value {
    let pin_dir = pins.0.to_str().unwrap();
    let mut all = vec!["show"];
    all.extend_from_slice(args);
    all.extend(["-o", "json", "--agent", "", "--pin-dir", pin_dir]);
    let (ok, out, err) = lb(&all);
    assert!(ok, "lb {all:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("lb {all:?}: {e}: {out}"))
}

fn strings(v: &Value, key: &str) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|r| r[key].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn lb_show_prints_every_table_as_json_and_filters_it() {
    let pins = Pins::new();
    let _datapath = loaded(&pins);

    let all = show_json(&pins, &["all"]);
    for key in ["services", "backends", "conntrack", "counters"] {
        assert!(all.get(key).is_some(), "{key} missing from: {all}");
    }
    assert!(all["counters"]["new_flow"].is_u64(), "{all}");
    // A frontend's row: its active backends (ready ones; not 10.244.0.13).
    let web = show_json(&pins, &["services", "--service", "10.96.0.10:80"]);
    let rows = web["services"].as_array().unwrap();
    assert_eq!(strings(&web["services"], "frontend"), ["10.96.0.10:80/TCP"]);
    let backends = &rows[0]["backends"];
    assert_eq!(
        strings(backends, "address"),
        ["10.244.0.12:8080/TCP", "10.244.0.14:8080/TCP"],
        "{web}"
    );
    assert_eq!(strings(backends, "state"), ["active", "active"]);
    assert_eq!(
        rows[0]["maglev_cells"], 127,
        "two backends: a table of 127 cells"
    );
    assert!(
        web.get("backends").is_none(),
        "only the table asked for: {web}"
    );

    // The backend that is not ready stays for its flows, in no frontend's slots.
    let b = show_json(&pins, &["backends", "--address", "10.244.0.13"]);
    assert_eq!(strings(&b["backends"], "address"), ["10.244.0.13:8080/TCP"]);
    assert_eq!(strings(&b["backends"], "state"), ["inactive"]);
    assert_eq!(b["backends"][0]["frontends"], 0);
    // Every frontend that sends to a backend: web's ClusterIP, NodePort, external IP.
    let by_backend = show_json(&pins, &["services", "--backend", "10.244.0.12:8080"]);
    let fes = strings(&by_backend["services"], "frontend");
    assert_eq!(fes.len(), 3, "{fes:?}");
    assert!(
        fes.contains(&"192.168.50.1:30080/TCP".to_string()),
        "{fes:?}"
    );
    // By service id: the frontends of one Service port share it.
    let id = rows[0]["service_id"].as_u64().unwrap().to_string();
    let by_id = show_json(&pins, &["services", "--service", &id]);
    assert_eq!(
        strings(&by_id["services"], "frontend"),
        ["10.96.0.10:80/TCP"]
    );
    // IPv6 frontends and a protocol.
    let v6 = show_json(
        &pins,
        &["services", "--service", "[fd00:10:96::14]:443/TCP"],
    );
    assert_eq!(
        strings(&v6["services"], "frontend"),
        ["[fd00:10:96::14]:443/TCP"]
    );
    let none = show_json(&pins, &["services", "--service", "10.96.0.10:80/UDP"]);
    assert_eq!(none["services"], Value::Array(vec![]));

    // Conntrack: the flow, with its idle time.
    let ct = show_json(&pins, &["conntrack", "--backend", "10.244.0.12"]);
    let rows = ct["conntrack"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{ct}");
    assert_eq!(rows[0]["source"], "10.244.0.99:40000");
    assert_eq!(rows[0]["nat"], "10.244.0.12:8080");
    let idle = rows[0]["idle_s"].as_f64().unwrap();
    assert!((4.0..30.0).contains(&idle), "idle {idle}");
    let age = rows[0]["age_s"].as_f64().unwrap();
    assert!((64.0..90.0).contains(&age), "age {age}");
    assert_eq!(rows[0]["state"], "established");
    assert_eq!(rows[0]["direction"], "forward");
    let other = show_json(&pins, &["conntrack", "--service", "10.96.0.53"]);
    assert_eq!(other["conntrack"], Value::Array(vec![]));
    let by_service = show_json(&pins, &["conntrack", "--service", "10.96.0.10:80"]);
    assert_eq!(
        by_service["conntrack"].as_array().unwrap().len(),
        1,
        "{by_service}"
    );
    // By client: its address, or its address and port; the backend's address (which
    // --address would match) is no client.
    for client in ["10.244.0.99", "10.244.0.99:40000", "10.244.0.99:40000/TCP"] {
        let mine = show_json(&pins, &["conntrack", "--client", client]);
        assert_eq!(
            strings(&mine["conntrack"], "source"),
            ["10.244.0.99:40000"],
            "{client}"
        );
    }
    for not in ["10.244.0.12", "10.244.0.99:40001", "10.244.0.99/UDP"] {
        let none = show_json(&pins, &["conntrack", "--client", not]);
        assert_eq!(none["conntrack"], Value::Array(vec![]), "--client {not}");
    }
    let by_address = show_json(&pins, &["conntrack", "--address", "10.244.0.12"]);
    assert_eq!(
        by_address["conntrack"].as_array().unwrap().len(),
        1,
        "{by_address}"
    );
    // The table says it too.
    let table = show_table(&pins, "conntrack");
    let line = table.lines().find(|l| l.contains("10.244.0.99")).unwrap();
    assert!(line.ends_with(" 5s") || line.ends_with(" 6s"), "{line}");

    // A bad filter names itself.
    let (ok, _, err) = lb(&[
        "show",
        "--backend",
        "web",
        "--pin-dir",
        pins.0.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(err.contains("\"web\""), "{err}");
}

/// Runs `lb args` with its stdout a pipe whose reader is gone before it writes.
fn into_closed_pipe(args: &[&str]) -> (std::process::ExitStatus, String) {
    let mut child = Command::new(lb_binary().unwrap())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (child.wait().unwrap(), err)
}

/// A frontend whose address lost its bit in `LB_FE_FILTER` (the programs would not
/// look it up): `lb show` says so, in the table and in the JSON.
#[test]
fn lb_show_warns_of_a_frontend_missing_from_the_filter() {
    let pins = Pins::new();
    let _datapath = loaded(&pins);
    let in_filter = |v: &Value| -> Vec<(String, bool)> {
        v["services"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["frontend"].as_str().unwrap().to_string(),
                    r["in_filter"].as_bool().unwrap(),
                )
            })
            .collect()
    };
    let before = in_filter(&show_json(&pins, &["services"]));
    assert!(
        before.len() > 3 && before.iter().all(|(_, b)| *b),
        "{before:?}"
    );

    let mut maps = Maps::from_pins(&pins.0).unwrap();
    let (word, mask) = lb_common::frontend_filter_bit(&map_addr(&"10.96.0.10".parse().unwrap()));
    let w = maps.fe_filter.get(&word, 0).unwrap();
    maps.fe_filter.set(word, w & !mask, 0).unwrap();

    let after = in_filter(&show_json(&pins, &["services"]));
    let missing: Vec<&str> = after
        .iter()
        .filter(|(_, b)| !b)
        .map(|(f, _)| f.as_str())
        .collect();
    assert!(!missing.is_empty(), "{after:?}");
    assert!(
        missing.iter().all(|f| f.starts_with("10.96.0.10:")),
        "only web's ClusterIP lost its bit: {missing:?}"
    );
    let table = show_table(&pins, "services");
    assert!(
        table.contains("warning: 10.96.0.10:80/TCP: its address has no bit in LB_FE_FILTER"),
        "{table}"
    );
    assert_eq!(table.matches("warning:").count(), missing.len(), "{table}");
}

/// `lb show conntrack` prints the conntrack filter's switch and fill, and warns of an
/// entry whose key has no bit while it is on (the programs would not find it): the
/// load leaves it off, a rebuild turns it on with the hand-made entry's bit, and a bit
/// cleared behind the programs' back is named.
#[test]
fn lb_show_prints_the_conntrack_filter_and_warns_of_an_entry_missing_from_it() {
    let pins = Pins::new();
    let _datapath = loaded(&pins);
    let view = |v: &Value| {
        (
            v["conntrack_filter"]["on"].as_bool().unwrap(),
            v["conntrack_filter"]["bits_set"].as_u64().unwrap(),
            v["conntrack"][0]["in_filter"].as_bool().unwrap(),
        )
    };
    // Loaded, not built (the agent's collector builds it after attaching).
    assert_eq!(view(&show_json(&pins, &["conntrack"])), (false, 0, false));
    let off = show_table(&pins, "conntrack");
    assert!(
        off.contains("(conntrack filter: off, every packet looked up, 0 of 1048576 bits set)"),
        "{off}"
    );
    assert!(!off.contains("warning:"), "{off}");

    let maps = Maps::from_pins(&pins.0).unwrap();
    let gc = maps.gc_maps().unwrap();
    gc.ct_filter.rebuild(&gc.conntrack).unwrap();
    assert_eq!(view(&show_json(&pins, &["conntrack"])), (true, 1, true));
    let on = show_table(&pins, "conntrack");
    assert!(
        on.contains("(conntrack filter: on, 1 of 1048576 bits set)"),
        "{on}"
    );
    assert!(!on.contains("warning:"), "{on}");

    let (key, _) = maps.conntrack_entries().unwrap()[0];
    gc.ct_filter.clear_bit(&key);
    assert_eq!(view(&show_json(&pins, &["conntrack"])), (true, 0, false));
    let lost = show_table(&pins, "conntrack");
    assert!(
        lost.contains(
            "warning: forward 10.244.0.99:40000 -> 10.96.0.10:80: its key has no bit in LB_CT_FILTER"
        ),
        "{lost}"
    );
}

#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    let examples = examples();
    let (st, err) = into_closed_pipe(&["check", "--config", examples.to_str().unwrap()]);
    assert!(st.success() && err.is_empty(), "{st}: {err}");
    let pins = Pins::new();
    let _datapath = loaded(&pins);
    for format in ["table", "json"] {
        let (st, err) = into_closed_pipe(&[
            "show",
            "all",
            "--agent",
            "",
            "-o",
            format,
            "--pin-dir",
            pins.0.to_str().unwrap(),
        ]);
        assert!(st.success() && err.is_empty(), "{format}: {st}: {err}");
    }
}

/// A network namespace of this test, deleted on drop.
struct Netns(String);

impl Netns {
    fn new() -> Self {
        lb_testbench::sandbox::hold_sandbox_lock();
        let name = format!(
            "lbt-cli-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap()
            .success();
        assert!(ok, "ip netns add {name}");
        Self(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Starts `lb run` by `cmd` and returns its log once it is running (or exited), after
/// stopping it with SIGTERM.
fn run_until_running(mut cmd: Command, log: &Path) -> String {
    let file = std::fs::File::create(log).unwrap();
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(file)
        .env("RUST_LOG", "info")
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let text = loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let exited = child.try_wait().unwrap().is_some();
        if text.contains("running") || exited {
            break text;
        }
        if t0.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("lb run did not start in 20 s:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    let _ = std::fs::remove_file(log);
    text
}

#[test]
fn an_agent_under_ip_netns_exec_warns_that_its_pins_are_private() {
    let ns = Netns::new();
    let pins = Pins::new();
    let lb = lb_binary().unwrap();
    let examples = examples();
    let args = |cmd: &mut Command| {
        cmd.args(["run", "--config"])
            .arg(&examples)
            .args([
                "--interfaces",
                "lbt-none-*",
                "--cgroup",
                "none",
                "--pin-dir",
            ])
            .arg(&pins.0)
            .args(["--max-frontends", "256", "--max-backends", "1024"])
            .args(["--max-slots", "1024", "--max-conntrack", "1024"]);
    };
    let log = std::env::temp_dir().join(format!("lbt-cli-{}.log", std::process::id()));

    let mut exec = Command::new("ip");
    exec.args(["netns", "exec", &ns.0]).arg(&lb);
    args(&mut exec);
    let text = run_until_running(exec, &log);
    assert!(text.contains("running"), "{text}");
    let warn = text
        .lines()
        .find(|l| l.contains("is not the host's"))
        .unwrap_or_else(|| panic!("no warning about the private bpffs in:\n{text}"));
    assert!(warn.contains("WARN") && warn.contains("--netns"), "{warn}");
    // An interface glob that matches nothing is a warning too.
    let glob = text
        .lines()
        .find(|l| l.contains("matches no interface"))
        .unwrap_or_else(|| panic!("no warning about the glob in:\n{text}"));
    assert!(
        glob.contains("WARN") && glob.contains("lbt-none-*"),
        "{glob}"
    );

    // The same agent entering the namespace with --netns pins into the host's bpffs.
    let mut direct = Command::new(&lb);
    args(&mut direct);
    direct.args(["--netns", &ns.0, "--keep-pinned"]);
    let text = run_until_running(direct, &log);
    assert!(text.contains("running"), "{text}");
    assert!(!text.contains("is not the host's"), "{text}");
    assert!(
        pins.0.join("LB_FRONTENDS").exists(),
        "kept in the host's bpffs"
    );
}

#[test]
fn on_this_kernel_the_agent_needs_neither_cap_sys_resource_nor_memlock() {
    // Kernels from 5.11 on charge map memory to the memory cgroup: the default DaemonSet
    // does not ask for CAP_SYS_RESOURCE, so the agent must load without it and with a
    // 64 KiB RLIMIT_MEMLOCK (far below its ~1 MiB of small maps here).
    let v = aya::util::KernelVersion::current().unwrap();
    assert!(
        v >= aya::util::KernelVersion::new(5, 11, 0),
        "this test is about kernels from 5.11 on; this one is {v:?}"
    );
    let ns = Netns::new();
    let pins = Pins::new();
    let mut cmd = Command::new("setpriv");
    cmd.args(["--bounding-set", "-sys_resource", "--"])
        .args(["prlimit", "--memlock=65536:65536"])
        .arg(lb_binary().unwrap())
        .args(["run", "--config"])
        .arg(examples())
        .args([
            "--interfaces",
            "lbt-none-*",
            "--cgroup",
            "none",
            "--netns",
            &ns.0,
            "--pin-dir",
        ])
        .arg(&pins.0)
        .args(["--max-frontends", "256", "--max-backends", "1024"])
        .args(["--max-slots", "1024", "--max-conntrack", "1024"]);
    let log = std::env::temp_dir().join(format!("lbt-cli-memlock-{}.log", std::process::id()));
    let text = run_until_running(cmd, &log);
    assert!(text.contains("running"), "{text}");
    assert!(!text.contains("ERROR"), "{text}");
}

/// A folder of this test's own, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let d = std::env::temp_dir().join(format!(
            "lbt-cli-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Self(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

/// Runs `lb args` and waits at most `limit`: (success, stderr), or a panic naming the
/// command if it is still running then (after killing it).
fn lb_within(args: &[&str], limit: Duration) -> (bool, String) {
    let mut child = Command::new(lb_binary().unwrap())
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (st.success(), err);
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("lb {args:?} still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn lb_check_refuses_empty_files_fifos_devices_oversize_files_and_node_ports_out_of_range() {
    let dir = TempDir::new("check");
    let file = |name: &str, text: &str| {
        let p = dir.0.join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    };
    let fifo = dir.0.join("fifo.yaml");
    mkfifo(&fifo);
    let examples = examples();
    let examples = examples.to_str().unwrap();
    let example_text = std::fs::read_to_string(examples).unwrap();
    let node_port = |np: u16| {
        format!(
            "services:\n  - {{name: web, clusterIP: 10.96.0.10, type: NodePort, ports: [{{port: 80, nodePort: {np}}}]}}\n"
        )
    };
    let bad: Vec<(Vec<String>, &str)> = vec![
        (vec![file("empty.yaml", "")], "the file is empty"),
        (
            vec![file("comments.yaml", "# services:\n#  - name: web\n\n")],
            "the file is empty",
        ),
        (
            vec![fifo.to_str().unwrap().into()],
            "fifo.yaml: is a FIFO: only a regular file is read",
        ),
        (vec!["/dev/zero".into()], "/dev/zero: is a character device"),
        (
            vec![examples.into(), "--max-config-bytes".into(), "100".into()],
            "over --max-config-bytes 100: refused unread",
        ),
        (
            vec![file("np.yaml", &node_port(8080))],
            "nodePort 8080 is outside the node port range 30000-32767",
        ),
        (
            vec![file("nokey.yaml", "node: {name: a}\n")],
            "write `services: []`",
        ),
        (
            vec![
                file("np2.yaml", &node_port(30080)),
                "--service-node-port-range".into(),
                "8000-9000".into(),
            ],
            "nodePort 30080 is outside the node port range 8000-9000",
        ),
    ];
    for (args, why) in bad {
        let mut all = vec!["check", "--config"];
        all.extend(args.iter().map(String::as_str));
        // A FIFO or /dev/zero must not hold it: a bounded wait.
        let (ok, err) = lb_within(&all, Duration::from_secs(10));
        assert!(!ok, "lb {all:?} accepted it");
        assert!(err.contains(why), "lb {all:?}: {err}");
    }
    for args in [
        vec![file("none.yaml", "services: []\n")],
        vec![file("bom.yaml", &format!("\u{feff}{example_text}"))],
        vec![
            file("np3.yaml", &node_port(8080)),
            "--service-node-port-range".into(),
            "8000-9000".into(),
        ],
    ] {
        let mut all = vec!["check", "--config"];
        all.extend(args.iter().map(String::as_str));
        let (ok, err) = lb_within(&all, Duration::from_secs(10));
        assert!(ok, "lb {all:?}: {err}");
    }
}

/// The frontends `lb show` finds in the maps pinned at `pins`.
fn frontends(pins: &Pins) -> Vec<String> {
    strings(&show_json(pins, &["services"])["services"], "frontend")
}

/// Waits until `lb run`'s log (at `log`) holds `what` `times` times, for at most 10 s.
fn wait_log(log: &Path, what: &str, times: usize) -> String {
    let t0 = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.matches(what).count() >= times {
            return text;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no {what:?} in lb run's log:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `lb run`, stopped (SIGTERM, then waited for) on drop.
struct Agent(std::process::Child);

impl Drop for Agent {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

#[test]
fn a_running_agent_keeps_its_services_when_its_file_is_truncated_or_turns_bad() {
    let ns = Netns::new();
    let pins = Pins::new();
    let dir = TempDir::new("truncate");
    let cfg = dir.0.join("services.yaml");
    std::fs::copy(examples(), &cfg).unwrap();
    let log = dir.0.join("lb.log");
    let mut cmd = Command::new(lb_binary().unwrap());
    cmd.args(["run", "--config"])
        .arg(&cfg)
        .args([
            "--interfaces",
            "lbt-none-*",
            "--cgroup",
            "none",
            "--netns",
            &ns.0,
            "--pin-dir",
        ])
        .arg(&pins.0)
        .args(["--max-frontends", "256", "--max-backends", "1024"])
        .args(["--max-slots", "1024", "--max-conntrack", "1024"])
        .args(["--poll-ms", "50"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .env("RUST_LOG", "info");
    let mut agent = Agent(cmd.spawn().unwrap());
    wait_log(&log, "running", 1);
    let before = frontends(&pins);
    assert!(
        before.contains(&"10.96.0.10:80/TCP".to_string()),
        "{before:?}"
    );

    // Each of these, written in place, is refused and changes nothing in the maps.
    let fifo_swap = |p: &Path| {
        std::fs::remove_file(p).unwrap();
        mkfifo(p);
    };
    type Step = Box<dyn Fn(&Path)>;
    let steps: Vec<(&str, Step)> = vec![
        (
            "the file is empty",
            Box::new(|p| drop(std::fs::File::create(p).unwrap())),
        ),
        (
            "the file is empty",
            Box::new(|p| std::fs::write(p, "# being edited\n").unwrap()),
        ),
        (
            "is outside the node port range",
            Box::new(|p| {
                let text = std::fs::read_to_string(examples()).unwrap();
                std::fs::write(p, text.replace("nodePort: 30080", "nodePort: 22")).unwrap()
            }),
        ),
        ("is a FIFO", Box::new(fifo_swap)),
    ];
    let mut seen = std::collections::BTreeMap::new();
    for (why, step) in steps {
        step(&cfg);
        let times = seen.entry(why).or_insert(0);
        *times += 1;
        wait_log(&log, why, *times);
        assert!(
            agent.0.try_wait().unwrap().is_none(),
            "lb run exited on a bad file ({why})"
        );
        assert_eq!(frontends(&pins), before, "after a file where {why}");
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("keeping the running state"), "{text}");

    // Still following the file: the explicit form of "no Services" empties the maps.
    std::fs::remove_file(&cfg).unwrap();
    std::fs::write(&cfg, "services: []\n").unwrap();
    let t0 = Instant::now();
    while !frontends(&pins).is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "services: [] was not applied: {:?}",
            frontends(&pins)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(agent);
}
