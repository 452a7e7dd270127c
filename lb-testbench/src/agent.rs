//! Running the real `lb` binary on a sandbox's nodes (one agent per node, each in its
//! node's namespace with its own pin folder and log), and Ctrl-C handling for the bench's
//! long-running commands (the demo, the benchmark): a signal only sets a flag, and each
//! step checks it, so the sandbox is always dropped (and removed) on the way out.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use lb_userspace::dataplane::{
    plan::{backend_addr, frontend_addr, MapState},
    Maps,
};

use crate::{
    sandbox::{NodeInfo, Sandbox},
    Error, Result,
};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT and SIGTERM set a flag that [`check_interrupted`] reports.
pub fn catch_interrupts() {
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as usize);
        libc::signal(libc::SIGTERM, on_signal as *const () as usize);
    }
}

/// An error once SIGINT or SIGTERM arrived (after [`catch_interrupts`]).
pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        Err(Error::Sandbox("interrupted; cleaning up".into()))
    } else {
        Ok(())
    }
}

/// The `lb` binary of this build: next to the running binary (`target/<profile>/`), or
/// one folder up from a test binary (`target/<profile>/deps/`).
///
/// Also sets `LB_CGROUP=none` in this process's environment (once, unless it is set):
/// every `lb` a test or the bench starts then runs without socket programs unless it is
/// given `--cgroup` (a cgroup the test made), so none ever attaches to the machine's own
/// root cgroup by the default.
pub fn lb_binary() -> Result<PathBuf> {
    static NO_CGROUP: std::sync::Once = std::sync::Once::new();
    NO_CGROUP.call_once(|| {
        if std::env::var_os("LB_CGROUP").is_none() {
            // Rust's own environment functions take a lock: safe against the other
            // threads' spawns.
            std::env::set_var("LB_CGROUP", "none");
        }
    });
    let me = std::env::current_exe().map_err(|e| Error::Sandbox(e.to_string()))?;
    let dir = me.parent().unwrap_or(Path::new("."));
    let candidates = [dir.join("lb"), dir.join("../lb")];
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| {
            Error::Sandbox(format!(
                "the lb binary is not next to {} (build it: cargo build -p lb-userspace; \
                 `cargo xtask test` does)",
                me.display()
            ))
        })
}

/// The log of node `node`'s agent, in the sandbox's workdir: `agent.log` on a one-node
/// sandbox, `agent-n<k>.log` in a cluster.
pub fn agent_log(sb: &Sandbox, node: usize) -> String {
    if sb.nodes.len() == 1 {
        "agent.log".into()
    } else {
        format!("agent-n{node}.log")
    }
}

/// Starts `lb run` for node `node` of a sandbox (0 on a one-node sandbox), in its
/// namespace, with its pin folder, on `config`, with small maps; its output goes to
/// [`agent_log`].
pub fn spawn_agent(
    sb: &Sandbox,
    node: usize,
    lb: &Path,
    config: &Path,
    extra: &[&str],
) -> Result<u32> {
    spawn_agent_on(sb, node, lb, config, sb.interface_glob(), extra)
}

/// [`spawn_agent`] with `--interfaces interfaces` instead of the sandbox's glob of
/// every pod's veth.
pub fn spawn_agent_on(
    sb: &Sandbox,
    node: usize,
    lb: &Path,
    config: &Path,
    interfaces: &str,
    extra: &[&str],
) -> Result<u32> {
    let mut cmd = agent_command(sb, node, lb, "run", interfaces, extra)?;
    cmd.arg("--config").arg(config).args(extra);
    sb.spawn(cmd, &agent_log(sb, node))
}

/// Starts `lb agent` for node `node` of a sandbox, as [`spawn_agent`] does `lb run`:
/// against the API server of `kubeconfig`, as the Kubernetes node named
/// [`NodeInfo::name`], its metrics on 127.0.0.1:19100 of its namespace.
pub fn spawn_k8s_agent(
    sb: &Sandbox,
    node: usize,
    lb: &Path,
    kubeconfig: &Path,
    extra: &[&str],
) -> Result<u32> {
    let name = node_info(sb, node)?.name.clone();
    let mut cmd = agent_command(sb, node, lb, "agent", sb.interface_glob(), extra)?;
    cmd.arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["--node-name", &name, "--listen", "127.0.0.1:19100"])
        .args(extra);
    sb.spawn(cmd, &agent_log(sb, node))
}

/// `lb <subcommand>` in node `node`'s namespace, on its pods' and external interfaces,
/// with its pin folder and small maps (the sandbox has a handful of services), unless
/// `extra` (the caller's own flags) sets a map size itself.
fn agent_command(
    sb: &Sandbox,
    node: usize,
    lb: &Path,
    subcommand: &str,
    interfaces: &str,
    extra: &[&str],
) -> Result<Command> {
    let n = node_info(sb, node)?;
    let mut cmd = Command::new(lb);
    cmd.args([
        subcommand,
        "--netns",
        &n.netns,
        "--interfaces",
        interfaces,
        "--external-interfaces",
        sb.external_interface(),
    ])
    .arg("--pin-dir")
    .arg(&n.pin_dir)
    .args(["--poll-ms", "100"]);
    // Never the machine's own root cgroup: socket programs only where a test asks, on a
    // cgroup it made (`cgroup::TestCgroup`).
    if !extra.contains(&"--cgroup") {
        cmd.args(["--cgroup", "none"]);
    }
    for (flag, size) in [
        ("--max-frontends", "1024"),
        ("--max-backends", "4096"),
        ("--max-slots", "4096"),
        ("--max-conntrack", "65536"),
    ] {
        if !extra.contains(&flag) {
            cmd.args([flag, size]);
        }
    }
    cmd.env(
        "RUST_LOG",
        std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
    );
    Ok(cmd)
}

/// Waits until node `node`'s agent's pinned maps hold `frontends` frontends and it
/// attached to `links` pod interfaces and to the node's external interface.
pub fn wait_agent_ready(
    sb: &Sandbox,
    node: usize,
    frontends: usize,
    links: usize,
    timeout: Duration,
) -> Result<()> {
    wait_agent(sb, node, links, timeout, |st| {
        st.frontends.len() == frontends
    })
}

/// Waits until node `node`'s agent attached to `links` pod interfaces and to the node's
/// external interface (`lb agent` attaches after its first sync), whatever its maps hold.
pub fn wait_attached(sb: &Sandbox, node: usize, links: usize, timeout: Duration) -> Result<()> {
    wait_agent(sb, node, links, timeout, |_| true)
}

fn wait_agent(
    sb: &Sandbox,
    node: usize,
    links: usize,
    timeout: Duration,
    ready: impl Fn(&MapState) -> bool,
) -> Result<()> {
    let pin_dir = &node_info(sb, node)?.pin_dir;
    let deadline = Instant::now() + timeout;
    loop {
        check_interrupted()?;
        let count = |dir: &str| {
            std::fs::read_dir(pin_dir.join(dir))
                .map(|d| d.count())
                .unwrap_or(0)
        };
        let (n_links, n_xdp) = (count("links"), count("xdp-links"));
        if let Ok(maps) = Maps::from_pins(pin_dir) {
            if let Ok(st) = maps.read_state() {
                if ready(&st) && n_links >= links && n_xdp >= 1 {
                    return Ok(());
                }
            }
        }
        if Instant::now() > deadline {
            return Err(Error::Sandbox(format!(
                "the agent of node {node} did not become ready in {timeout:?}; its log:\n{}",
                sb.log(&agent_log(sb, node))
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Node `node`'s frontends as its pinned maps hold them: `ip:port/proto` -> the
/// backends of its slots (the ones that get new connections), `ip:port/proto`, sorted.
pub fn frontends(sb: &Sandbox, node: usize) -> Result<BTreeMap<String, Vec<String>>> {
    let st = Maps::from_pins(&node_info(sb, node)?.pin_dir)?.read_state()?;
    Ok(st
        .frontends
        .iter()
        .map(|(k, f)| {
            let mut active: Vec<String> = st
                .slot_list(f)
                .iter()
                .map(|id| {
                    st.backend(*id)
                        .map(|b| backend_addr(b).to_string())
                        .unwrap_or_else(|| format!("#{id}?"))
                })
                .collect();
            active.sort();
            (frontend_addr(k).to_string(), active)
        })
        .collect())
}

fn node_info(sb: &Sandbox, node: usize) -> Result<&NodeInfo> {
    sb.nodes.get(node).ok_or_else(|| {
        Error::Sandbox(format!(
            "no node {node} (the sandbox has {})",
            sb.nodes.len()
        ))
    })
}
