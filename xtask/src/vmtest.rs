//! `cargo xtask vm-test`: a load test inside a VM running Debian's own kernel (not the
//! development machine's). The root file system is built once from Debian packages
//! (mmdebstrap from the mirror in this machine's apt sources, then `mkfs.ext4 -d`) and
//! cached in `target/vm/`; it is rebuilt when its manifest (suite, mirrors, packages,
//! init script) changes. Every run puts the freshly built `lb` on a second, read-only
//! disk, boots the VM without a network device (all traffic stays in the guest's own
//! network namespaces), runs `lb-testbench vm-load` there (iperf3 to a pod IP and to a ClusterIP
//! from a pod, to a pod IP and to a NodePort from outside the node),
//! and prints the results it reads from the serial console.
use std::{
    io::{BufRead, BufReader, Read},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use super::run;

const SUITE: &str = "bookworm";
/// What the guest needs: Debian's kernel (with an initramfs: virtio and ext4 are
/// modules), `ip`/`ss`/`tc`, iperf3, sysctl, modprobe (veth, clsact, cls_bpf load on
/// demand).
const GUEST_PACKAGES: &[&str] = &[
    "linux-image-amd64",
    "initramfs-tools",
    "iproute2",
    "iperf3",
    "procps",
    "kmod",
];
/// What the host needs to build the image and boot it.
const HOST_PACKAGES: &[(&str, &str)] = &[
    ("qemu-system-x86", "qemu-system-x86_64"),
    ("mmdebstrap", "mmdebstrap"),
    ("e2fsprogs", "mkfs.ext4"),
];
/// Bump when the way the image is built changes.
const FORMAT: u32 = 1;
const RESULTS_BEGIN: &str = "=== LB-VM-RESULTS-BEGIN ===";
const RESULTS_END: &str = "=== LB-VM-RESULTS-END ===";
const BOOTED: &str = "vm-test: guest booted";

/// The guest's init (part of the cached image): mounts what the workload needs, runs the
/// per-run script from the payload disk, reports its status, powers off.
const GUEST_INIT: &str = r#"#!/bin/sh
# init of the `cargo xtask vm-test` guest: no systemd, no network device.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mount -t bpf bpf /sys/fs/bpf
echo 3 > /proc/sys/kernel/printk
echo "vm-test: guest booted"
mkdir -p /payload
if mount -o ro /dev/vdb /payload; then
    /bin/sh /payload/run.sh
    rc=$?
else
    echo "vm-test: cannot mount the payload disk /dev/vdb"
    rc=1
fi
echo "vm-test: exit status $rc"
sync
echo o > /proc/sysrq-trigger
sleep 60 2>/dev/null
"#;

#[derive(clap::Args)]
pub struct Args {
    /// Guest kernel: `stable` is bookworm's own (6.1: no tcx, so the agent attaches
    /// netlink tc filters); `backports` is bookworm-backports' (6.12: tcx links, pinned).
    #[arg(long, default_value = "stable", value_parser = ["stable", "backports"])]
    kernel: String,
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 5)]
    seconds: u32,
    /// Runs per path (pod IP and ClusterIP from a pod, pod IP and NodePort from outside), interleaved.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Accelerator: auto (KVM if it can boot Debian's kernel, else TCG), kvm or tcg.
    #[arg(long, default_value = "auto", value_parser = ["auto", "kvm", "tcg"])]
    accel: String,
    /// Give up after this many seconds (default: from the run length, longer with TCG).
    #[arg(long)]
    timeout: Option<u64>,
    /// Debian mirror (default: the first Debian mirror in this machine's apt sources).
    #[arg(long)]
    mirror: Option<String>,
    /// Rebuild the cached root file system.
    #[arg(long)]
    rebuild: bool,
}

/// A path removed when dropped (also on error).
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = remove_tree(&self.0);
    }
}

/// Removes a folder mmdebstrap may have left mounts in (a killed run): unmount first,
/// and never delete through a mount.
fn remove_tree(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let prefix = format!("{}/", dir.display());
    let mounted = || {
        std::fs::read_to_string("/proc/mounts")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
            .filter(|m| m.starts_with(&prefix))
            .collect::<Vec<_>>()
    };
    for m in mounted().iter().rev() {
        let _ = Command::new("umount").args(["-R", "-l", m]).status();
    }
    let left = mounted();
    if !left.is_empty() {
        bail!(
            "{} still has mounts ({}): unmount them, then remove it",
            dir.display(),
            left.join(", ")
        );
    }
    std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))
}

fn progress(msg: &str) {
    eprintln!("== vm-test: {msg}");
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn setup_host() -> Result<()> {
    let missing: Vec<&str> = HOST_PACKAGES
        .iter()
        .filter(|(pkg, prog)| !installed(pkg) || !super::have(prog))
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    progress(&format!(
        "installing Debian packages: {}",
        missing.join(" ")
    ));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .context("installing the VM tools failed: install them with apt-get and run again")
}

/// The Debian mirror and security mirror of this machine's apt sources (one-line and
/// deb822 formats).
fn host_mirrors() -> (Option<String>, Option<String>) {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = dir
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "list" || e == "sources"))
            .collect();
        more.sort();
        files.extend(more);
    }
    // (uri, suites) of every `deb` entry.
    let mut entries: Vec<(String, Vec<String>)> = Vec::new();
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        if f.extension().is_some_and(|e| e == "sources") {
            for stanza in text.split("\n\n") {
                let field = |name: &str| {
                    stanza.lines().find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        (k.trim().eq_ignore_ascii_case(name)).then(|| v.trim().to_string())
                    })
                };
                let enabled = field("Enabled").is_none_or(|v| v != "no");
                if !enabled
                    || !field("Types").is_some_and(|t| t.split_whitespace().any(|t| t == "deb"))
                {
                    continue;
                }
                let suites: Vec<String> = field("Suites")
                    .unwrap_or_default()
                    .split_whitespace()
                    .map(str::to_string)
                    .collect();
                for uri in field("URIs").unwrap_or_default().split_whitespace() {
                    entries.push((uri.to_string(), suites.clone()));
                }
            }
        } else {
            for l in text.lines() {
                // `deb [options] URI suite components`; options in brackets may hold spaces.
                let rest = match (l.find('['), l.find(']')) {
                    (Some(a), Some(b)) if a < b => format!("{}{}", &l[..a], &l[b + 1..]),
                    _ => l.to_string(),
                };
                let w: Vec<&str> = rest.split_whitespace().collect();
                if w.len() >= 3 && w[0] == "deb" {
                    entries.push((w[1].to_string(), vec![w[2].to_string()]));
                }
            }
        }
    }
    let is_debian = |uri: &str| uri.trim_end_matches('/').ends_with("/debian");
    let is_security = |uri: &str| uri.trim_end_matches('/').ends_with("/debian-security");
    let main = entries
        .iter()
        .find(|(u, s)| is_debian(u) && s.iter().any(|s| !s.ends_with("-security")))
        .map(|(u, _)| u.trim_end_matches('/').to_string());
    let security = entries
        .iter()
        .find(|(u, s)| is_security(u) || s.iter().any(|s| s.ends_with("-security")))
        .map(|(u, _)| u.trim_end_matches('/').to_string());
    (main, security)
}

/// The cached image: root file system, kernel and initramfs taken out of it.
struct Image {
    rootfs: PathBuf,
    kernel: PathBuf,
    initrd: PathBuf,
    release: String,
}

fn image(root: &Path, args: &Args) -> Result<Image> {
    let (host_main, host_security) = host_mirrors();
    let mirror = match args.mirror.clone().or(host_main) {
        Some(m) => m,
        None => bail!(
            "no Debian mirror found in /etc/apt/sources.list or /etc/apt/sources.list.d/: \
             pass one with --mirror URL"
        ),
    };
    let mut sources = vec![
        format!("deb {mirror} {SUITE} main"),
        format!("deb {mirror} {SUITE}-updates main"),
    ];
    let backports = args.kernel == "backports";
    let packages: Vec<String> = GUEST_PACKAGES
        .iter()
        .map(|p| match *p {
            "linux-image-amd64" if backports => format!("{p}/{SUITE}-backports"),
            p => p.to_string(),
        })
        .collect();
    if backports {
        sources.push(format!("deb {mirror} {SUITE}-backports main"));
    }
    if let Some(sec) = &host_security {
        sources.push(format!("deb {sec} {SUITE}-security main"));
    }
    let manifest = format!(
        "format {FORMAT}\nsuite {SUITE}\nsources {}\npackages {}\ninit\n{GUEST_INIT}",
        sources.join(" | "),
        packages.join(",")
    );
    let dir = root.join("target/vm").join(&args.kernel);
    let img = Image {
        rootfs: dir.join("rootfs.ext4"),
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initrd.img"),
        release: std::fs::read_to_string(dir.join("kernel-release"))
            .unwrap_or_default()
            .trim()
            .to_string(),
    };
    let manifest_path = dir.join("manifest");
    let cached = std::fs::read_to_string(&manifest_path).is_ok_and(|m| m == manifest)
        && img.rootfs.is_file()
        && img.kernel.is_file()
        && img.initrd.is_file()
        && !img.release.is_empty();
    if cached && !args.rebuild {
        progress(&format!(
            "using the cached root file system {} (Debian {SUITE}, kernel {}); --rebuild to make it anew",
            img.rootfs.display(),
            img.release
        ));
        return Ok(img);
    }
    // Anything else in this cache folder is stale: rebuild from scratch.
    remove_tree(&dir)?;
    std::fs::create_dir_all(&dir)?;
    let build = Scratch(dir.join("build"));
    let tree = build.0.join("root");
    std::fs::create_dir_all(&build.0)?;
    let started = Instant::now();
    progress(&format!(
        "building the root file system (once; a few minutes): Debian {SUITE} from {mirror}, packages {}",
        packages.join(" ")
    ));
    let mut cmd = Command::new("mmdebstrap");
    cmd.args(["--mode=root", "--variant=minbase"])
        .arg(format!("--include={}", packages.join(",")))
        .arg("--aptopt=APT::Install-Recommends \"false\"")
        .args([
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
        ])
        .arg(SUITE)
        .arg(&tree)
        .args(&sources);
    run(&mut cmd).context(
        "mmdebstrap failed (see its output above): check that the mirror answers (apt-get update)",
    )?;
    let init = tree.join("sbin/lb-vm-init");
    std::fs::write(&init, GUEST_INIT)?;
    std::fs::set_permissions(&init, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    std::fs::create_dir_all(tree.join("payload"))?;
    // Kernel and initramfs: boot/vmlinuz-<release>, boot/initrd.img-<release>.
    let release = std::fs::read_dir(tree.join("boot"))?
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_string_lossy()
                .strip_prefix("vmlinuz-")
                .map(str::to_string)
        })
        .max()
        .context("the image has no boot/vmlinuz-*: did linux-image-amd64 install?")?;
    let boot_initrd = tree.join(format!("boot/initrd.img-{release}"));
    if !boot_initrd.is_file() {
        bail!(
            "the image has no {}: initramfs-tools did not run",
            boot_initrd.display()
        );
    }
    std::fs::copy(tree.join(format!("boot/vmlinuz-{release}")), &img.kernel)?;
    std::fs::copy(&boot_initrd, &img.initrd)?;
    let used_mib: u64 = super::output(Command::new("du").args(["-sm"]).arg(&tree))?
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .context("du printed no size")?;
    let size = used_mib + used_mib / 5 + 256;
    progress(&format!("making the ext4 image ({size} MiB)"));
    let tmp_img = dir.join("rootfs.ext4.tmp");
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "lbvm", "-d"])
        .arg(&tree)
        .arg(&tmp_img)
        .arg(format!("{size}M")))?;
    std::fs::rename(&tmp_img, &img.rootfs)?;
    drop(build);
    std::fs::write(dir.join("kernel-release"), format!("{release}\n"))?;
    // Last: the manifest marks the cache complete.
    std::fs::write(&manifest_path, &manifest)?;
    progress(&format!(
        "root file system ready in {:.0} s: {} (kernel {release})",
        started.elapsed().as_secs_f64(),
        img.rootfs.display()
    ));
    Ok(Image { release, ..img })
}

/// KVM, unless it cannot run Debian's kernel. PVM (`kvm_pvm`, a KVM for nested use
/// without hardware virtualisation) boots only kernels built as PVM guests.
fn choose_accel(wanted: &str) -> (&'static str, String) {
    match wanted {
        "kvm" => ("kvm", "KVM (--accel kvm)".into()),
        "tcg" => ("tcg", "TCG, software emulation (--accel tcg)".into()),
        _ => {
            let kvm_opens = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/kvm")
                .is_ok();
            if !kvm_opens {
                (
                    "tcg",
                    "TCG, software emulation: /dev/kvm is not usable here".into(),
                )
            } else if Path::new("/sys/module/kvm_pvm").exists() {
                (
                    "tcg",
                    "TCG, software emulation: this machine's /dev/kvm is PVM (kvm_pvm), which boots \
                     only kernels built as PVM guests, not Debian's"
                        .into(),
                )
            } else {
                ("kvm", "KVM".into())
            }
        }
    }
}

struct Outcome {
    /// qemu's exit status; None when it was stopped because the guest did not boot in time.
    status: Option<std::process::ExitStatus>,
    /// The console lines.
    lines: Vec<String>,
    /// The guest's init ran.
    booted: bool,
}

fn boot(
    img: &Image,
    payload: &Path,
    accel: &str,
    timeout: Duration,
    boot_timeout: Option<Duration>,
) -> Result<Outcome> {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-nodefaults", "-nic", "none", "-display", "none"])
        .args(["-no-reboot", "-monitor", "none", "-serial", "stdio"])
        .args(["-smp", "2", "-m", "2048"]);
    if accel == "kvm" {
        // -cpu host fails on some nested set-ups (arch-capabilities MSR); leave that out.
        cmd.args([
            "-machine",
            "q35,accel=kvm",
            "-cpu",
            "host,-arch-capabilities",
        ]);
    } else {
        cmd.args(["-machine", "q35,accel=tcg", "-cpu", "max"]);
    }
    cmd.arg("-kernel")
        .arg(&img.kernel)
        .arg("-initrd")
        .arg(&img.initrd)
        .args([
            "-append",
            "root=/dev/vda rw console=ttyS0 init=/sbin/lb-vm-init quiet loglevel=3 panic=-1",
        ])
        .arg("-drive")
        .arg(format!(
            "file={},if=virtio,format=raw,snapshot=on",
            img.rootfs.display()
        ))
        .arg("-drive")
        .arg(format!(
            "file={},if=virtio,format=raw,readonly=on",
            payload.display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    eprintln!("+ {cmd:?}");
    let mut child = cmd
        .spawn()
        .context("starting qemu-system-x86_64 (apt-get install qemu-system-x86)")?;
    let (tx, rx) = mpsc::channel::<String>();
    let stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut buf = Vec::new();
        while r.read_until(b'\n', &mut buf).unwrap_or(0) > 0 {
            let line = String::from_utf8_lossy(&buf)
                .trim_end_matches(['\r', '\n'])
                .to_string();
            buf.clear();
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut stderr = child.stderr.take().expect("piped");
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let started = Instant::now();
    let mut lines = Vec::new();
    let mut booted = false;
    let kill = |child: &mut std::process::Child| {
        let _ = child.kill();
        let _ = child.wait();
    };
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                booted |= line.contains(BOOTED);
                eprintln!("   vm| {line}");
                lines.push(line);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        let elapsed = started.elapsed();
        if let Some(bt) = boot_timeout {
            if !booted && elapsed > bt {
                kill(&mut child);
                return Ok(Outcome {
                    status: None,
                    lines,
                    booted,
                });
            }
        }
        if elapsed > timeout {
            kill(&mut child);
            bail!(
                "the VM did not finish in {} s ({accel}); the console is above. \
                 A slow machine needs more time: --timeout SECONDS",
                timeout.as_secs()
            );
        }
    }
    let status = child.wait()?;
    let _ = reader.join();
    let qemu_err = err_reader.join().unwrap_or_default();
    if !qemu_err.trim().is_empty() {
        eprintln!("qemu: {}", qemu_err.trim());
    }
    Ok(Outcome {
        status: Some(status),
        lines,
        booted,
    })
}

pub fn vm_test(root: &Path, args: &Args) -> Result<()> {
    let started = Instant::now();
    if args.repeats == 0 || args.seconds == 0 {
        bail!("--seconds and --repeats must be at least 1");
    }
    setup_host()?;
    let lb = root.join("target/release/lb");
    let bench = root.join("target/release/lb-testbench");
    for bin in [&lb, &bench] {
        if !bin.is_file() {
            bail!(
                "{} is missing: run `cargo xtask build --release`",
                bin.display()
            );
        }
    }
    let img = image(root, args)?;

    // The per-run payload disk: the lb binary, the test bench's (which runs the workload)
    // and the script the guest's init runs.
    let work = root.join("target/vm/run");
    remove_tree(&work)?;
    let scratch = Scratch(work.clone());
    let payload_dir = work.join("payload");
    std::fs::create_dir_all(&payload_dir)?;
    std::fs::copy(&lb, payload_dir.join("lb"))?;
    std::fs::copy(&bench, payload_dir.join("lb-testbench"))?;
    std::fs::write(
        payload_dir.join("run.sh"),
        format!(
            "echo \"vm-test: guest kernel $(uname -r), $(nproc) CPUs\"\n\
             if [ -e /sys/kernel/btf/vmlinux ]; then echo 'vm-test: kernel BTF: present'; \
             else echo 'vm-test: kernel BTF: missing'; fi\n\
             RUST_LOG=info /payload/lb-testbench vm-load --seconds {} --repeats {}\n",
            args.seconds, args.repeats
        ),
    )?;
    let lb_mib = (std::fs::metadata(&lb)?.len() + std::fs::metadata(&bench)?.len()) / (1 << 20);
    let payload = work.join("payload.ext4");
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "lbpayload", "-d"])
        .arg(&payload_dir)
        .arg(&payload)
        .arg(format!("{}M", lb_mib + 32)))?;

    let (mut accel, why) = choose_accel(&args.accel);
    progress(&format!("accelerator: {why}"));
    // Four paths: pod IP and ClusterIP from a pod, pod IP and NodePort from outside.
    let work_s = (args.repeats as u64) * 4 * (u64::from(args.seconds) + 5);
    let timeout_for = |accel: &str| {
        Duration::from_secs(args.timeout.unwrap_or(if accel == "kvm" {
            180 + work_s
        } else {
            900 + 2 * work_s
        }))
    };
    progress(&format!(
        "booting Debian's kernel {} ({} runs of {} s per path, timeout {} s)",
        img.release,
        args.repeats,
        args.seconds,
        timeout_for(accel).as_secs()
    ));
    // A KVM that cannot run this kernel either makes qemu fail at once or hangs silently.
    let boot_watch = (accel == "kvm").then(|| Duration::from_secs(60));
    let mut outcome = boot(&img, &payload, accel, timeout_for(accel), boot_watch)?;
    if accel == "kvm" && !outcome.booted {
        if args.accel != "auto" {
            bail!(
                "KVM did not reach the guest's init in 60 s (console above): \
                 run with --accel tcg (or the default --accel auto)"
            );
        }
        progress("KVM did not reach the guest's init: falling back to TCG");
        accel = "tcg";
        outcome = boot(&img, &payload, accel, timeout_for(accel), None)?;
    }
    drop(scratch);
    let Outcome { status, lines, .. } = outcome;
    let status = status.map_or("stopped".to_string(), |s| s.to_string());
    let begin = lines.iter().position(|l| l.contains(RESULTS_BEGIN));
    let end = lines.iter().position(|l| l.contains(RESULTS_END));
    let guest_rc = lines
        .iter()
        .rev()
        .find_map(|l| l.trim().strip_prefix("vm-test: exit status "))
        .map(str::to_string);
    let (Some(b), Some(e)) = (begin, end) else {
        bail!(
            "the VM ended (qemu: {status}, guest workload exit status: {}) without results; \
             the console is above ({}). Try again with RUST_LOG=debug, or --accel tcg if KVM misbehaves",
            guest_rc.as_deref().unwrap_or("none: the guest did not finish"),
            if lines.iter().any(|l| l.contains(BOOTED)) {
                "the guest booted, so the workload failed"
            } else {
                "the guest never reached its init"
            }
        );
    };
    println!();
    println!(
        "## Load test in a VM ({accel}, Debian {SUITE}, --kernel {}: {})",
        args.kernel, img.release
    );
    println!();
    for l in &lines[b + 1..e] {
        println!("{l}");
    }
    if accel == "tcg" {
        println!(
            "Note: TCG emulates the CPU in software, so these numbers measure the emulator more \
             than the dataplane; the ratio is a sanity check. KVM gives real numbers."
        );
    }
    println!();
    println!(
        "vm-test: {:.0} s in all (host kernel {})",
        started.elapsed().as_secs_f64(),
        super::output(Command::new("uname").arg("-r"))
            .unwrap_or_default()
            .trim()
    );
    if guest_rc.as_deref() != Some("0") {
        bail!(
            "the guest workload exited with status {} (see the console above)",
            guest_rc.as_deref().unwrap_or("unknown")
        );
    }
    Ok(())
}
