//! Developer commands: `cargo xtask <setup|build-ebpf|build|test|demo|bench|vm-test|image|fuzz|clean-sandboxes>`.
//! Every command runs the set-up steps it needs first (idempotent and quick when done),
//! so a newcomer never has to remember them.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod bench;
mod fuzz;
mod vmtest;

const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian packages the tests, the demo and the benchmarks use.
const APT_PACKAGES: &[&str] = &[
    "iproute2",
    "iperf3",
    "socat",
    "curl",
    "nginx-light",
    "bpftool",
    "procps",
    "iptables",
    "nftables",
    // The benchmark's forwarding rate: GRO (so NAPI) on the node's veth.
    "ethtool",
    // The image test: umoci unpacks the agent's OCI archive, runc runs it (small; the
    // loads into podman and containerd are `cargo xtask image --check`'s).
    "umoci",
    "runc",
];

/// What `cargo xtask image --check` adds: the tools a node loads the archive with.
const IMAGE_CHECK_PACKAGES: &[&str] = &["podman", "containerd"];

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what a fresh machine lacks (Debian packages, rust-src, bpf-linker), mount bpffs.
    Setup,
    /// Build the eBPF object (nightly, bpfel-unknown-none, bpf-linker).
    BuildEbpf {
        /// A debug build of the programs instead, with aya-log lines at their decisions
        /// (the `debug-log` feature), in target/ebpf-debug-log/; embed it with
        /// `LB_EBPF_OBJECT=<path> cargo build`. The release object has none of it.
        #[arg(long)]
        debug_log: bool,
    },
    /// Build the eBPF object, the `lb` binary that embeds it, and `lb-testbench`.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Run clippy (warnings fail) and every test: unit, kernel (BPF_PROG_TEST_RUN) and
    /// end-to-end (namespaces).
    Test {
        /// Extra arguments for `cargo test` (after `--`), e.g. a test name filter.
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// The demo: a sandbox with a client and three backends behind a ClusterIP.
    Demo {
        #[arg(long, default_value_t = 12)]
        requests: usize,
    },
    /// Remove namespaces and pins left by killed test or demo runs.
    CleanSandboxes,
    /// Benchmark against no load balancer and kube-proxy (iptables, nftables); writes results/.
    Bench {
        /// Short run: small scales, fewer repeats.
        #[arg(long)]
        quick: bool,
        /// Measure nothing: redraw results/*.svg from results/latest.json.
        #[arg(long)]
        charts_only: bool,
        /// Extra arguments for `lb-testbench bench` (after `--`), e.g. `--scales 1,1000 --repeats 5`.
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Load test in a VM on Debian's kernel: iperf3 via a ClusterIP beside the pod IP.
    VmTest(vmtest::Args),
    /// Fuzz the config file and Kubernetes object parsers (cargo-fuzz on nightly;
    /// installs cargo-fuzz if missing).
    Fuzz(fuzz::Args),
    /// The agent's container image, made here from the release `lb` with nothing pulled:
    /// an OCI archive for `podman load`, `docker load`, `ctr images import` or
    /// `skopeo copy` (target/image/lb-agent-<version>.oci.tar).
    Image {
        /// Write the archive here instead.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Then load it into podman and containerd (installing both, about 130 MB) and run
        /// it with podman: the image tests, with the ignored ones.
        #[arg(long)]
        check: bool,
    },
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/root".into())
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {cmd:?}");
    let st = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn have(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false)
}

fn setup_apt() -> Result<()> {
    install_apt(APT_PACKAGES)
}

/// Installs the Debian packages of `packages` that are missing.
fn install_apt(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
                .unwrap_or(false)
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("installing Debian packages: {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    Ok(())
}

fn nightly_sysroot() -> Result<PathBuf> {
    let s = output(Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]))
        .context(
            "the nightly toolchain is needed for the eBPF crate (rustup toolchain install nightly)",
        )?;
    Ok(PathBuf::from(s.trim()))
}

fn setup_rust_src() -> Result<()> {
    let sysroot = nightly_sysroot()?;
    if sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        return Ok(());
    }
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

fn bpf_linker_ok() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)
        })
        .unwrap_or(false)
}

/// bpf-linker linked against the nightly toolchain's own libLLVM: Debian's LLVM is too old
/// for rustc's bitcode, and the default features want a newer LLVM than rustc ships.
fn setup_bpf_linker() -> Result<()> {
    if bpf_linker_ok() {
        return Ok(());
    }
    let sysroot = nightly_sysroot()?;
    let lib = sysroot.join("lib");
    let libllvm = std::fs::read_dir(&lib)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so.") && n.contains("-rust-"))
        .with_context(|| format!("no libLLVM.so.*-rust-* in {}", lib.display()))?;
    let major = libllvm
        .trim_start_matches("libLLVM.so.")
        .split('.')
        .next()
        .unwrap_or("")
        .to_string();
    let prefix = home().join(".cache/lb-ebpf/llvm-prefix");
    std::fs::create_dir_all(prefix.join("lib"))?;
    for name in ["libLLVM.so".to_string(), libllvm.clone()] {
        let link = prefix.join("lib").join(&name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(lib.join(&libllvm), &link)?;
    }
    eprintln!("building bpf-linker {BPF_LINKER_VERSION} against {libllvm} (a few minutes, once)");
    run(Command::new("cargo")
        .args([
            "+stable",
            "install",
            "bpf-linker",
            "--locked",
            "--version",
            BPF_LINKER_VERSION,
        ])
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        .env("LLVM_PREFIX", &prefix))
}

fn setup_bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
    {
        return Ok(());
    }
    run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}

fn setup() -> Result<()> {
    setup_apt()?;
    setup_rust_src()?;
    setup_bpf_linker()?;
    setup_bpffs()?;
    Ok(())
}

/// The eBPF toolchain only (what a build needs).
fn setup_build() -> Result<()> {
    setup_rust_src()?;
    setup_bpf_linker()
}

pub fn ebpf_object() -> PathBuf {
    root().join("target/ebpf/bpfel-unknown-none/release/lb-ebpf")
}

/// A build of the eBPF object.
#[derive(Clone, Copy, PartialEq, Eq)]
enum EbpfBuild {
    /// What `lb` embeds.
    Release,
    /// `build-ebpf --debug-log`: aya-log lines (target/ebpf-debug-log/).
    DebugLog,
    /// The benchmark's floor for `lb trace` off: no tracing switch (target/ebpf-no-trace/).
    NoTrace,
}

impl EbpfBuild {
    /// (cargo features, target folder): each build in a folder of its own, so that the
    /// release object and its incremental build stay as they are.
    fn features_and_dir(self) -> (&'static str, &'static str) {
        match self {
            EbpfBuild::Release => ("", "target/ebpf"),
            EbpfBuild::DebugLog => ("debug-log", "target/ebpf-debug-log"),
            EbpfBuild::NoTrace => ("no-trace", "target/ebpf-no-trace"),
        }
    }

    fn object(self) -> PathBuf {
        root()
            .join(self.features_and_dir().1)
            .join("bpfel-unknown-none/release/lb-ebpf")
    }
}

fn build_ebpf() -> Result<()> {
    build_ebpf_object(EbpfBuild::Release)
}

/// The eBPF object of `build`.
fn build_ebpf_object(build: EbpfBuild) -> Result<()> {
    setup_build()?;
    let (features, target_dir) = build.features_and_dir();
    let object = build.object();
    let debug_log = build == EbpfBuild::DebugLog;
    run(Command::new("cargo")
        .current_dir(root())
        .args(["+nightly", "build", "--package", "lb-ebpf", "--release"])
        .args(["--features", features])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .args(["--target-dir", target_dir])
        // bpf-linker emits BTF (typed maps for the loader and `bpftool map dump`).
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            ["-C", "debuginfo=2", "-C", "link-arg=--btf"].join("\x1f"),
        )
        .env("CARGO_PROFILE_RELEASE_PANIC", "abort")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTFLAGS"))?;
    eprintln!("eBPF object: {}", object.display());
    if debug_log {
        eprintln!(
            "an lb that embeds it: LB_EBPF_OBJECT={} cargo build -p lb-userspace",
            object.display()
        );
    }
    Ok(())
}

/// The eBPF object, `lb` (which embeds it) and `lb-testbench`.
fn build(release: bool) -> Result<()> {
    build_ebpf()?;
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root()).args([
        "build",
        "--package",
        "lb-userspace",
        "--package",
        "lb-testbench",
    ]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)
}

/// The test bench's lock of its namespaces and pins (`lb_testbench::sandbox::SANDBOX_LOCK`:
/// every test process holds it shared): taken exclusively here, so only leftovers of
/// killed runs are removed, never what a running test of any checkout uses.
const SANDBOX_LOCK: &str = "/run/lb-sandboxes.lock";

fn clean_sandboxes() -> Result<()> {
    let _lock = lock_file(SANDBOX_LOCK, "running tests")?;
    let list = output(Command::new("ip").args(["netns", "list"])).unwrap_or_default();
    for line in list.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if name.starts_with("lbt") || name.starts_with("lbdemo") || name.starts_with("lbbench") {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
    if let Ok(dir) = std::fs::read_dir("/sys/fs/bpf") {
        for e in dir.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with("lbt") || n.starts_with("lbdemo") || n.starts_with("lbbench") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    clean_test_cgroups();
    Ok(())
}

/// The cgroups a killed test or benchmark left (`lb-test-<name>-<pid>` under the cgroup2
/// mount, `lb_testbench::cgroup::TestCgroup`) whose process is gone: their processes
/// killed, the folders removed. A live run's are left alone.
fn clean_test_cgroups() {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let Some(root) = mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
    }) else {
        return;
    };
    let Ok(dir) = std::fs::read_dir(&root) else {
        return;
    };
    for e in dir.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = n
            .strip_prefix("lb-test-")
            .and_then(|r| r.rsplit('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let _ = std::fs::write(e.path().join("cgroup.kill"), "1");
        for _ in 0..100 {
            if std::fs::remove_dir(e.path()).is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// Runs `cargo test`, echoing its output, and ends with one summary line over every test
/// binary ("tests: N passed, M failed"), so CI reads the whole run, not the last binary.
fn test(args: &[String]) -> Result<()> {
    setup()?;
    build_ebpf()?;
    // The debug-log tests load the debug build too.
    build_ebpf_object(EbpfBuild::DebugLog)?;
    // Two runs on one machine (a second checkout, a helper's worktree) would remove each
    // other's namespaces in `clean_sandboxes`: they take turns instead.
    let _turn = machine_lock("test")?;
    // The workspace lints (Cargo.toml) hold: a warning fails the run.
    run(Command::new("cargo").current_dir(root()).args([
        "clippy",
        "--all-targets",
        "--quiet",
        "--",
        "-D",
        "warnings",
    ]))?;
    clean_sandboxes()?;
    // Kernel and end-to-end tests share kernel state (namespaces, bpffs): one at a time.
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root())
        .args(["test", "--no-fail-fast"])
        .arg("--")
        .arg("--test-threads=1")
        .args(args)
        .stdout(std::process::Stdio::piped());
    eprintln!("+ {cmd:?}");
    let mut child = cmd.spawn().context("starting cargo test")?;
    let stdout = child.stdout.take().expect("piped");
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let num = |word: &str| -> u64 {
                rest.split(';')
                    .find_map(|part| {
                        part.trim()
                            .strip_suffix(word)?
                            .trim()
                            .rsplit(' ')
                            .next()?
                            .parse()
                            .ok()
                    })
                    .unwrap_or(0)
            };
            passed += num("passed");
            failed += num("failed");
        }
    }
    let status = child.wait()?;
    clean_sandboxes()?;
    println!("tests: {passed} passed, {failed} failed");
    if !status.success() || failed > 0 {
        bail!("cargo test failed: {status}");
    }
    if passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

/// Holds an exclusive lock on `/run/lb-xtask-<what>.lock` until dropped, waiting (and
/// saying so) while another run holds it. The kernel releases it when the holder dies.
fn machine_lock(what: &str) -> Result<std::fs::File> {
    lock_file(
        &format!("/run/lb-xtask-{what}.lock"),
        &format!("another `cargo xtask {what}`"),
    )
}

/// An exclusive lock on `path`, waiting (and saying for whom) while it is held.
fn lock_file(path: &str, holder: &str) -> Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {path}"))?;
    let flock = |op: i32| {
        // SAFETY: flock on a file descriptor this function owns.
        unsafe { libc::flock(f.as_raw_fd(), op) }
    };
    if flock(libc::LOCK_EX | libc::LOCK_NB) != 0 {
        eprintln!("{holder} hold {path}: waiting for them to finish");
        if flock(libc::LOCK_EX) != 0 {
            bail!("locking {path}: {}", std::io::Error::last_os_error());
        }
    }
    Ok(f)
}

fn demo(requests: usize) -> Result<()> {
    setup()?;
    build(false)?;
    run(
        Command::new(root().join("target/debug/lb-testbench")).args([
            "demo",
            "--requests",
            &requests.to_string(),
        ]),
    )
}

/// The version of the `lb` crate (the image's tag).
fn lb_version() -> Result<String> {
    let text = std::fs::read_to_string(root().join("lb-userspace/Cargo.toml"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("version = "))
        .map(|v| v.trim().trim_matches('"').to_string())
        .context("no version in lb-userspace/Cargo.toml")
}

fn image(out: Option<PathBuf>, check: bool) -> Result<()> {
    build(true)?;
    let tag = lb_version()?;
    let out = out.unwrap_or_else(|| root().join(format!("target/image/lb-agent-{tag}.oci.tar")));
    let git = |args: &[&str]| output(Command::new("git").current_dir(root()).args(args));
    // The commit's time as every time in the archive: the same commit, the same image.
    let revision = git(&["rev-parse", "HEAD"]).unwrap_or_else(|_| "unknown\n".into());
    let created =
        git(&["log", "-1", "--format=%cI"]).unwrap_or_else(|_| "1970-01-01T00:00:00Z\n".into());
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
        .map(|s| !s.trim().is_empty())
        .unwrap_or(false);
    let revision = format!("{}{}", revision.trim(), if dirty { "-dirty" } else { "" });
    run(Command::new(root().join("target/release/lb-testbench"))
        .args(["image", "--lb"])
        .arg(root().join("target/release/lb"))
        .arg("--out")
        .arg(&out)
        .args([
            "--tag",
            &tag,
            "--revision",
            &revision,
            "--created",
            created.trim(),
        ]))?;
    let size = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
    let mib = size as f64 / (1 << 20) as f64;
    let path = out.display();
    eprintln!(
        "\nimage lb-agent:{tag} ({mib:.1} MiB): {path}\n\
         on a node:      ctr -n k8s.io images import {path}   (or podman load -i, docker load -i)\n\
         to a registry:  skopeo copy oci-archive:{path} docker://registry.example.com/lb-agent:{tag}\n\
         (deploy/README.md, \"The image\")"
    );
    if check {
        install_apt(IMAGE_CHECK_PACKAGES)?;
        run(Command::new("cargo").current_dir(root()).args([
            "test",
            "--release",
            "--package",
            "lb-testbench",
            "--test",
            "image",
            "--",
            "--include-ignored",
            "--test-threads=1",
        ]))?;
    }
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if !have("cargo") {
        bail!("cargo not on PATH");
    }
    match cli.cmd {
        Cmd::Setup => setup(),
        Cmd::BuildEbpf { debug_log } => build_ebpf_object(if debug_log {
            EbpfBuild::DebugLog
        } else {
            EbpfBuild::Release
        }),
        Cmd::Build { release } => build(release),
        Cmd::Test { args } => test(&args),
        Cmd::Demo { requests } => demo(requests),
        Cmd::CleanSandboxes => clean_sandboxes(),
        Cmd::Bench {
            charts_only: true, ..
        } => bench::charts(&root()),
        Cmd::Bench { quick, args, .. } => {
            setup()?;
            build(true)?;
            // The floor `lb trace` switched off is measured against.
            build_ebpf_object(EbpfBuild::NoTrace)?;
            // The benchmark cleans sandboxes too, and wants the machine to itself.
            let _turn = machine_lock("test")?;
            clean_sandboxes()?;
            let r = bench::bench(&root(), quick, &args);
            clean_sandboxes()?;
            r
        }
        Cmd::VmTest(args) => {
            build(true)?;
            vmtest::vm_test(&root(), &args)
        }
        Cmd::Fuzz(args) => fuzz::fuzz(&args),
        Cmd::Image { out, check } => {
            setup_apt()?;
            image(out, check)
        }
    }
}
