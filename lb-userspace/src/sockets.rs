//! Connect-time balancing: the socket programs on a cgroup (v2), and the socket
//! iterator that destroys connected UDP sockets whose backend left.
//!
//! The programs (`lb-ebpf/src/sock.rs`) attach to the cgroup of `--cgroup` (by default
//! the root of the cgroup v2 hierarchy, found in /proc/self/mountinfo: every process of
//! the node, pods included, lives below it). Their links are pinned under
//! `<pin dir>/sock-links/<cgroup inode>/<program>`, so `--keep-pinned` keeps them and a
//! restarted agent swaps its programs into them (`BPF_LINK_UPDATE`).
//!
//! Destroying sockets needs the kfunc `bpf_sock_destroy` (Linux 6.5), callable from a
//! `iter/udp` program only. aya cannot relocate a kfunc call, so the agent assembles
//! that small program itself (`iterator_program`): for each UDP socket of the network
//! namespace it runs in, the socket's `LB_SOCK_CONN` (what the programs connected it
//! to) is read, its (frontend, backend) looked up in `LB_SOCK_KILL`, and a socket found
//! there is destroyed (its owner's next call fails) and counted `sock_destroyed`. The
//! agent fills `LB_SOCK_KILL` with the pairs of backends that left and runs the
//! iterator in every network namespace of the processes of the cgroup.
use std::{
    collections::HashSet,
    fs::{self, File},
    io::Read,
    os::{
        fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
};

use aya::{
    maps::{HashMap as BpfHashMap, Map, MapData},
    programs::{links::FdLink, CgroupAttachMode, CgroupSockAddr},
    Btf,
};
use aya_obj::btf::BtfKind;
use lb_common::{
    counter, sock_kill_key, SockConfig, MAP_COUNTERS, MAP_SOCK_CONFIG, MAP_SOCK_CONN,
    MAP_SOCK_KILL, SOCK_CFG_F_DESTROY, SOCK_CFG_F_PODS, SOCK_KILL_BATCH, SOCK_PROG_NAMES,
};
use tracing::{info, warn};

use crate::{dataplane::batch::sys_bpf, Error, Result};

/// Folder (under the pin folder) of the socket programs' cgroup links.
pub const SOCK_LINKS_DIR: &str = "sock-links";

/// `--connect-time-balancing`: whether pods' sockets are translated at connect time
/// (host-network clients always are, wherever the programs are attached).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ConnectTime {
    /// Pods' sockets too; the agent fails if the kernel refuses the programs.
    On,
    /// Host-network clients only; pods' traffic takes the tc path.
    Off,
    /// On where the kernel loads the programs; otherwise a warning and none at all.
    Auto,
}

/// Where and how the socket programs run.
#[derive(Clone, Debug)]
pub struct SockOptions {
    /// The cgroup (v2) to attach to; `None`: no socket programs (`--cgroup none`).
    pub cgroup: Option<PathBuf>,
    pub connect_time: ConnectTime,
    /// Serve NodePorts on 127.0.0.1 to the node's own sockets (`--localhost-nodeports`).
    pub localhost_nodeports: bool,
    /// Every pod's processes that connect to Services run under `cgroup`
    /// (`--pods-in-cgroup`); true of the cgroup v2 root without saying.
    pub pods_in_cgroup: bool,
}

impl Default for SockOptions {
    /// No socket programs (tests and benchmarks that do not ask for them).
    fn default() -> Self {
        Self {
            cgroup: None,
            connect_time: ConnectTime::Auto,
            localhost_nodeports: true,
            pods_in_cgroup: false,
        }
    }
}

/// `--cgroup`: a path, `none`, or (not given) the root of the cgroup v2 hierarchy.
pub fn cgroup_arg(arg: Option<&str>) -> Result<Option<PathBuf>> {
    match arg {
        Some("none") => Ok(None),
        Some(p) => Ok(Some(PathBuf::from(p))),
        None => cgroup2_mount().map(Some).ok_or_else(|| {
            Error::Config(
                "--cgroup: no cgroup2 file system is mounted (/proc/self/mountinfo names \
                 none); mount one (mount -t cgroup2 none /sys/fs/cgroup) or give --cgroup \
                 none to run without connect-time balancing"
                    .into(),
            )
        }),
    }
}

/// Where cgroup v2 is mounted: `/sys/fs/cgroup` on most nodes, `/sys/fs/cgroup/unified`
/// on hybrid hosts. The first cgroup2 mount of /proc/self/mountinfo.
pub fn cgroup2_mount() -> Option<PathBuf> {
    cgroup2_in(&fs::read_to_string("/proc/self/mountinfo").ok()?)
}

fn cgroup2_in(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let mount_point = left.split(' ').nth(4)?;
        (right.split(' ').next()? == "cgroup2").then(|| PathBuf::from(mount_point))
    })
}

/// The socket programs, attached; and the iterator, where the kernel has it.
pub struct Sockets {
    pub cgroup: PathBuf,
    /// `None`: this kernel cannot destroy sockets (before 6.5).
    pub killer: Option<SockKiller>,
    /// The programs translate every pod flow at connect time: pods' sockets
    /// (`SOCK_CFG_F_PODS`), their connected UDP too (`SOCK_CFG_F_DESTROY`), and every
    /// pod's clients run under the cgroup (its root, or `--pods-in-cgroup`). Only then
    /// may the pods' veths go without the tc programs (`podpath`).
    pub covers_pods: bool,
}

/// What `bpf_get_netns_cookie` gives for this thread's network namespace
/// (SO_NETNS_COOKIE, Linux 5.14).
pub fn netns_cookie() -> Result<u64> {
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    if fd < 0 {
        return Err(Error::Load(format!(
            "socket: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: fd was just opened and is owned here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    const SO_NETNS_COOKIE: libc::c_int = 71;
    // SAFETY: valid fd, out-pointer and length.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            &mut cookie as *mut u64 as *mut libc::c_void,
            &mut len,
        )
    };
    if rc != 0 {
        return Err(Error::Load(format!(
            "SO_NETNS_COOKIE (Linux 5.14): {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(cookie)
}

/// Loads the socket programs, writes their switches, pins them and attaches them to
/// `opts.cgroup` (see the module's doc). `Ok(None)`: none wanted, or (`auto`) the
/// kernel refused them (logged).
pub fn setup(ebpf: &mut aya::Ebpf, pin_dir: &Path, opts: &SockOptions) -> Result<Option<Sockets>> {
    let Some(cgroup) = opts.cgroup.clone() else {
        // An earlier agent's socket programs (pinned, --keep-pinned) go too.
        remove_pins(pin_dir);
        info!("--cgroup none: host-network clients are not translated (no socket programs)");
        return Ok(None);
    };
    match try_setup(ebpf, pin_dir, &cgroup, opts) {
        Ok(s) => Ok(Some(s)),
        Err(e) => {
            // Nothing half attached: all eight programs or none.
            remove_pins(pin_dir);
            if opts.connect_time != ConnectTime::Auto {
                return Err(e);
            }
            warn!(
                "{e}; running without socket programs: host-network clients are not \
                 translated, pods take the tc path"
            );
            Ok(None)
        }
    }
}

fn try_setup(
    ebpf: &mut aya::Ebpf,
    pin_dir: &Path,
    cgroup: &Path,
    opts: &SockOptions,
) -> Result<Sockets> {
    let mode = opts.connect_time;
    let dir = File::open(cgroup)
        .map_err(|e| Error::Attach(format!("--cgroup {}: {e}", cgroup.display())))?;
    let ino = dir
        .metadata()
        .map_err(|e| Error::Attach(format!("--cgroup {}: {e}", cgroup.display())))?
        .ino();
    for name in SOCK_PROG_NAMES {
        let prog: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .ok_or_else(|| Error::Load(format!("{name} is not in the object")))?
            .try_into()
            .map_err(|e| Error::Load(format!("{name}: {e}")))?;
        prog.load()
            .map_err(|e| Error::Load(format!("the verifier rejected {name}: {e:#}")))?;
    }
    let killer = match SockKiller::new(pin_dir, cgroup) {
        Ok(k) => Some(k),
        Err(e) => {
            warn!(
                "{e}: connected UDP sockets cannot be destroyed when their backend leaves \
                 (needs bpf_sock_destroy, Linux 6.5); pods' connected UDP takes the tc \
                 path, and a host-network client's stays on its backend until it \
                 reconnects"
            );
            None
        }
    };
    let mut flags = 0;
    if mode != ConnectTime::Off {
        flags |= SOCK_CFG_F_PODS;
    }
    match &killer {
        Some(k) if k.enter_others => flags |= SOCK_CFG_F_DESTROY,
        Some(_) => warn!(
            "without CAP_SYS_ADMIN the socket iterator cannot enter pods' network \
             namespaces: pods' connected UDP takes the tc path (host-network clients' \
             sockets are destroyed)"
        ),
        None => {}
    }
    let config = SockConfig {
        host_netns_cookie: netns_cookie()?,
        flags,
        _pad: 0,
    };
    {
        let map = ebpf
            .map_mut(MAP_SOCK_CONFIG)
            .ok_or_else(|| Error::Load(format!("{MAP_SOCK_CONFIG} is not in the object")))?;
        let mut arr = aya::maps::Array::<_, SockConfig>::try_from(map)
            .map_err(|e| Error::Load(format!("{MAP_SOCK_CONFIG}: {e}")))?;
        arr.set(0, config, 0)
            .map_err(|e| Error::Map(format!("{MAP_SOCK_CONFIG}: {e}")))?;
    }
    let links = pin_dir.join(SOCK_LINKS_DIR);
    let here = links.join(ino.to_string());
    fs::create_dir_all(&here)
        .map_err(|e| Error::Load(format!("cannot create {}: {e}", here.display())))?;
    // Links of another cgroup (an earlier agent's --cgroup): detached.
    if let Ok(entries) = fs::read_dir(&links) {
        for e in entries.flatten().filter(|e| e.path() != here) {
            let _ = fs::remove_dir_all(e.path());
        }
    }
    for name in SOCK_PROG_NAMES {
        let prog: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .expect("loaded above")
            .try_into()
            .expect("a sock_addr program");
        let pin = pin_dir.join(name);
        let _ = fs::remove_file(&pin);
        prog.pin(&pin)
            .map_err(|e| Error::Load(format!("pinning {}: {e}", pin.display())))?;
        let link_pin = here.join(name);
        if link_pin.exists() {
            let fd = prog.fd().map_err(|e| Error::Load(format!("{name}: {e}")))?;
            match link_update(&link_pin, fd.as_fd().as_raw_fd()) {
                Ok(()) => continue,
                Err(e) => {
                    warn!("stale link pin {}: {e}; attaching anew", link_pin.display());
                    let _ = fs::remove_file(&link_pin);
                }
            }
        }
        let id = prog
            .attach(&dir, CgroupAttachMode::Single)
            .map_err(|e| Error::Attach(format!("{name} on {}: {e}", cgroup.display())))?;
        let link: FdLink = prog
            .take_link(id)
            .map_err(|e| Error::Attach(format!("{name}: {e}")))?
            .try_into()
            .map_err(|e| Error::Attach(format!("{name}: not a bpf link: {e}")))?;
        link.pin(&link_pin)
            .map_err(|e| Error::Attach(format!("pinning {}: {e}", link_pin.display())))?;
    }
    info!(
        cgroup = %cgroup.display(),
        pods = mode != ConnectTime::Off,
        destroy = killer.is_some(),
        "socket programs attached: connect-time balancing"
    );
    let every_pod = opts.pods_in_cgroup || is_cgroup2_root(cgroup);
    Ok(Sockets {
        cgroup: cgroup.to_path_buf(),
        killer,
        covers_pods: covers_pods(flags, every_pod),
    })
}

/// Whether `dir` is the root of a cgroup v2 hierarchy, which every process of the host
/// is under: it has `cgroup.procs` but not `cgroup.events`, which every other cgroup
/// has (also a container's cgroup namespace root, a cgroup like any other: the
/// DaemonSet's bind mount of the host's root passes, the container's own view not).
pub fn is_cgroup2_root(dir: &Path) -> bool {
    dir.join("cgroup.procs").exists() && !dir.join("cgroup.events").exists()
}

/// Whether the socket programs with `flags` translate every pod flow, given whether
/// every pod's clients run under their cgroup.
pub fn covers_pods(flags: u32, every_pod: bool) -> bool {
    every_pod && flags & SOCK_CFG_F_PODS != 0 && flags & SOCK_CFG_F_DESTROY != 0
}

/// Removes the socket programs' pins (their links detach with them).
pub fn remove_pins(pin_dir: &Path) {
    let _ = fs::remove_dir_all(pin_dir.join(SOCK_LINKS_DIR));
    for name in SOCK_PROG_NAMES {
        let _ = fs::remove_file(pin_dir.join(name));
    }
}

/// Whether this process has CAP_SYS_ADMIN (bit 21 of CapEff in /proc/self/status),
/// which setns(2) into another network namespace needs.
fn has_cap_sys_admin() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let hex = s
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))?
                .trim()
                .to_string();
            u64::from_str_radix(&hex, 16).ok()
        })
        .is_some_and(|caps| caps & (1 << 21) != 0)
}

const BPF_PROG_LOAD: libc::c_int = 5;
const BPF_OBJ_GET: libc::c_int = 7;
const BPF_LINK_CREATE: libc::c_int = 28;
const BPF_LINK_UPDATE: libc::c_int = 29;
const BPF_ITER_CREATE: libc::c_int = 33;
const BPF_PROG_TYPE_TRACING: u32 = 26;
const BPF_TRACE_ITER: u32 = 28;

fn owned(fd: libc::c_long) -> OwnedFd {
    // SAFETY: a new fd the kernel returned, owned by no one else.
    unsafe { OwnedFd::from_raw_fd(fd as RawFd) }
}

/// Opens a pinned object (BPF_OBJ_GET).
fn obj_get(path: &Path) -> std::io::Result<OwnedFd> {
    #[repr(C)]
    struct Attr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let attr = Attr {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    sys_bpf(BPF_OBJ_GET, &attr).map(owned)
}

/// Puts `prog_fd` into the pinned link at `pin` (BPF_LINK_UPDATE): atomic, no call
/// meets the cgroup without a program.
fn link_update(pin: &Path, prog_fd: RawFd) -> std::io::Result<()> {
    #[repr(C)]
    struct Attr {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let link = obj_get(pin)?;
    let attr = Attr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog_fd as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    sys_bpf(BPF_LINK_UPDATE, &attr).map(|_| ())
}

/// One eBPF instruction.
#[derive(Clone, Copy)]
#[repr(C)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | dst,
        off,
        imm,
    }
}

/// The `iter/udp` program (see the module's doc), for the maps `conn` (LB_SOCK_CONN),
/// `kill` (LB_SOCK_KILL) and `counters` (LB_COUNTERS) and the kfunc
/// `bpf_sock_destroy`'s BTF id:
///
/// ```text
///  0: r6 = *(u64 *)(r1 + 8)        ctx->udp_sk
///  1: if r6 == 0 goto out
///  2: r1 = conn map (2 insns)
///  4: r2 = r6; r3 = 0; r4 = 0
///  7: call bpf_sk_storage_get      the socket's SockConn, if connect() made one
///  8: if r0 == 0 goto out
///  9: r1 = *(u32 *)(r0 + 40); r1 <<= 32; r2 = *(u32 *)(r0 + 44); r1 |= r2
/// 13: *(u64 *)(r10 - 8) = r1        sock_kill_key(service_id, backend_id)
/// 14: r1 = kill map (2 insns)
/// 16: r2 = r10; r2 += -8
/// 18: call bpf_map_lookup_elem
/// 19: if r0 == 0 goto out
/// 20: r1 = r6
/// 21: call bpf_sock_destroy (kfunc)
/// 22: if r0 != 0 goto out
/// 23: *(u32 *)(r10 - 12) = SOCK_DESTROYED
/// 24: r1 = counters map (2 insns)
/// 26: r2 = r10; r2 += -12
/// 28: call bpf_map_lookup_elem
/// 29: if r0 == 0 goto out
/// 30: r1 = *(u64 *)(r0 + 0); r1 += 1; *(u64 *)(r0 + 0) = r1
/// out:
/// 33: r0 = 0
/// 34: exit
/// ```
fn iterator_program(
    conn: RawFd,
    kill: RawFd,
    counters: RawFd,
    sock_destroy_btf_id: u32,
) -> Vec<Insn> {
    const LDX_DW: u8 = 0x79;
    const LDX_W: u8 = 0x61;
    const STX_DW: u8 = 0x7b;
    const ST_W: u8 = 0x62;
    const MOV64_X: u8 = 0xbf;
    const MOV64_K: u8 = 0xb7;
    const ADD64_K: u8 = 0x07;
    const LSH64_K: u8 = 0x67;
    const OR64_X: u8 = 0x4f;
    const JEQ_K: u8 = 0x15;
    const JNE_K: u8 = 0x55;
    const CALL: u8 = 0x85;
    const EXIT: u8 = 0x95;
    const LD_IMM64: u8 = 0x18;
    const PSEUDO_MAP_FD: u8 = 1;
    const PSEUDO_KFUNC_CALL: u8 = 2;
    const MAP_LOOKUP_ELEM: i32 = 1;
    const SK_STORAGE_GET: i32 = 107;
    let out = 33;
    let jump = |at: i16| out - at - 1;
    vec![
        insn(LDX_DW, 6, 1, 8, 0),
        insn(JEQ_K, 6, 0, jump(1), 0),
        insn(LD_IMM64, 1, PSEUDO_MAP_FD, 0, conn),
        insn(0, 0, 0, 0, 0),
        insn(MOV64_X, 2, 6, 0, 0),
        insn(MOV64_K, 3, 0, 0, 0),
        insn(MOV64_K, 4, 0, 0, 0),
        insn(CALL, 0, 0, 0, SK_STORAGE_GET),
        insn(JEQ_K, 0, 0, jump(8), 0),
        insn(LDX_W, 1, 0, 40, 0),
        insn(LSH64_K, 1, 0, 0, 32),
        insn(LDX_W, 2, 0, 44, 0),
        insn(OR64_X, 1, 2, 0, 0),
        insn(STX_DW, 10, 1, -8, 0),
        insn(LD_IMM64, 1, PSEUDO_MAP_FD, 0, kill),
        insn(0, 0, 0, 0, 0),
        insn(MOV64_X, 2, 10, 0, 0),
        insn(ADD64_K, 2, 0, 0, -8),
        insn(CALL, 0, 0, 0, MAP_LOOKUP_ELEM),
        insn(JEQ_K, 0, 0, jump(19), 0),
        insn(MOV64_X, 1, 6, 0, 0),
        insn(CALL, 0, PSEUDO_KFUNC_CALL, 0, sock_destroy_btf_id as i32),
        insn(JNE_K, 0, 0, jump(22), 0),
        insn(ST_W, 10, 0, -12, counter::SOCK_DESTROYED as i32),
        insn(LD_IMM64, 1, PSEUDO_MAP_FD, 0, counters),
        insn(0, 0, 0, 0, 0),
        insn(MOV64_X, 2, 10, 0, 0),
        insn(ADD64_K, 2, 0, 0, -12),
        insn(CALL, 0, 0, 0, MAP_LOOKUP_ELEM),
        insn(JEQ_K, 0, 0, jump(29), 0),
        insn(LDX_DW, 1, 0, 0, 0),
        insn(ADD64_K, 1, 0, 0, 1),
        insn(STX_DW, 0, 1, 0, 0),
        insn(MOV64_K, 0, 0, 0, 0),
        insn(EXIT, 0, 0, 0, 0),
    ]
}

/// Destroys the connected UDP sockets of backends that left (see the module's doc).
pub struct SockKiller {
    /// The agent may enter other network namespaces (CAP_SYS_ADMIN): pods' sockets can
    /// be destroyed, not only the node's.
    pub enter_others: bool,
    link: OwnedFd,
    kill: BpfHashMap<MapData, u64, u32>,
    cgroup: PathBuf,
    _prog: OwnedFd,
}

impl SockKiller {
    /// Assembles, loads and links the iterator; fails where the kernel has no
    /// `bpf_sock_destroy` (before 6.5) or refuses the program.
    pub fn new(pin_dir: &Path, cgroup: &Path) -> Result<Self> {
        let err = |what: &str, e: &dyn std::fmt::Display| {
            Error::Load(format!("the socket iterator: {what}: {e}"))
        };
        let btf = Btf::from_sys_fs().map_err(|e| err("the kernel's BTF", &e))?;
        let destroy = btf
            .id_by_type_name_kind("bpf_sock_destroy", BtfKind::Func)
            .map_err(|e| err("no kfunc bpf_sock_destroy", &e))?;
        let target = btf
            .id_by_type_name_kind("bpf_iter_udp", BtfKind::Func)
            .map_err(|e| err("no UDP socket iterator", &e))?;
        let map = |name: &str| MapData::from_pin(pin_dir.join(name)).map_err(|e| err(name, &e));
        let kill = map(MAP_SOCK_KILL)?;
        let counters = map(MAP_COUNTERS)?;
        let conn = map(MAP_SOCK_CONN)?;
        let insns = iterator_program(
            conn.fd().as_fd().as_raw_fd(),
            kill.fd().as_fd().as_raw_fd(),
            counters.fd().as_fd().as_raw_fd(),
            destroy,
        );
        #[repr(C)]
        #[derive(Default)]
        struct LoadAttr {
            prog_type: u32,
            insn_cnt: u32,
            insns: u64,
            license: u64,
            log_level: u32,
            log_size: u32,
            log_buf: u64,
            kern_version: u32,
            prog_flags: u32,
            prog_name: [u8; 16],
            prog_ifindex: u32,
            expected_attach_type: u32,
            prog_btf_fd: u32,
            func_info_rec_size: u32,
            func_info: u64,
            func_info_cnt: u32,
            line_info_rec_size: u32,
            line_info: u64,
            line_info_cnt: u32,
            attach_btf_id: u32,
        }
        let license = c"GPL";
        let mut log = vec![0u8; 64 * 1024];
        let mut name = [0u8; 16];
        name[..11].copy_from_slice(b"lb_sock_udp");
        let attr = LoadAttr {
            prog_type: BPF_PROG_TYPE_TRACING,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level: 1,
            log_size: log.len() as u32,
            log_buf: log.as_mut_ptr() as u64,
            prog_name: name,
            expected_attach_type: BPF_TRACE_ITER,
            attach_btf_id: target,
            ..Default::default()
        };
        let prog = sys_bpf(BPF_PROG_LOAD, &attr).map(owned).map_err(|e| {
            let text = String::from_utf8_lossy(&log);
            let text = text.trim_end_matches('\0').trim();
            err("the verifier refused it", &format!("{e}: {text}"))
        })?;
        #[repr(C)]
        struct LinkAttr {
            prog_fd: u32,
            target_fd: u32,
            attach_type: u32,
            flags: u32,
            iter_info: u64,
            iter_info_len: u32,
            _pad: u32,
        }
        let link = sys_bpf(
            BPF_LINK_CREATE,
            &LinkAttr {
                prog_fd: prog.as_raw_fd() as u32,
                target_fd: 0,
                attach_type: BPF_TRACE_ITER,
                flags: 0,
                iter_info: 0,
                iter_info_len: 0,
                _pad: 0,
            },
        )
        .map(owned)
        .map_err(|e| err("linking it", &e))?;
        let kill = BpfHashMap::try_from(Map::HashMap(kill)).map_err(|e| err(MAP_SOCK_KILL, &e))?;
        Ok(Self {
            enter_others: has_cap_sys_admin(),
            link,
            kill,
            cgroup: cgroup.to_path_buf(),
            _prog: prog,
        })
    }

    /// Destroys the UDP sockets the socket programs connected to a backend of the
    /// `gone` pairs (frontend id, backend id), in every network namespace of the
    /// cgroup's processes (each destroyed socket is counted `sock_destroyed` by the
    /// iterator).
    pub fn destroy(&mut self, gone: &[(u32, u32)]) -> Result<()> {
        let gone: Vec<u64> = gone
            .iter()
            .map(|&(s, b)| sock_kill_key(s, b))
            .collect::<HashSet<u64>>()
            .into_iter()
            .collect();
        if gone.is_empty() {
            return Ok(());
        }
        let namespaces = self.namespaces();
        for chunk in gone.chunks(SOCK_KILL_BATCH as usize) {
            for k in chunk {
                self.kill
                    .insert(k, 1, 0)
                    .map_err(|e| Error::Map(format!("{MAP_SOCK_KILL}: {e}")))?;
            }
            for (i, ns) in namespaces.iter().enumerate() {
                if let Err(e) = self.iterate_in(ns, i == 0) {
                    warn!("destroying sockets: {e}");
                }
            }
            for k in chunk {
                let _ = self.kill.remove(k);
            }
        }
        info!(
            pairs = gone.len(),
            namespaces = namespaces.len(),
            "destroyed the connected UDP sockets of backends that left"
        );
        Ok(())
    }

    /// The network namespaces of the processes in the cgroup and below it, and this
    /// thread's own (the node's, first), each once; only its own without CAP_SYS_ADMIN.
    fn namespaces(&self) -> Vec<File> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        let mut add = |path: PathBuf| {
            if let Ok(f) = File::open(&path) {
                if let Ok(m) = f.metadata() {
                    if seen.insert((m.dev(), m.ino())) {
                        out.push(f);
                    }
                }
            }
        };
        add("/proc/thread-self/ns/net".into());
        let mut dirs = if self.enter_others {
            vec![self.cgroup.clone()]
        } else {
            Vec::new()
        };
        while let Some(d) = dirs.pop() {
            if let Ok(procs) = fs::read_to_string(d.join("cgroup.procs")) {
                for pid in procs.lines() {
                    add(PathBuf::from(format!("/proc/{pid}/ns/net")));
                }
            }
            if let Ok(entries) = fs::read_dir(&d) {
                dirs.extend(
                    entries
                        .flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.path()),
                );
            }
        }
        out
    }

    /// Runs the iterator over the UDP sockets of the network namespace `ns` (a thread
    /// enters it: the iterator walks the namespace of the task that opens it).
    fn iterate_in(&self, ns: &File, own: bool) -> Result<()> {
        let link = self.link.as_raw_fd();
        let ns = ns.as_raw_fd();
        std::thread::scope(|s| {
            s.spawn(move || -> Result<()> {
                // SAFETY: a valid netns fd; only this thread changes namespace.
                if !own && unsafe { libc::setns(ns, libc::CLONE_NEWNET) } != 0 {
                    return Err(Error::Netns(format!(
                        "entering a client's network namespace: {}",
                        std::io::Error::last_os_error()
                    )));
                }
                #[repr(C)]
                struct Attr {
                    link_fd: u32,
                    flags: u32,
                }
                let fd = sys_bpf(
                    BPF_ITER_CREATE,
                    &Attr {
                        link_fd: link as u32,
                        flags: 0,
                    },
                )
                .map(owned)
                .map_err(|e| Error::Load(format!("BPF_ITER_CREATE: {e}")))?;
                let mut f = File::from(fd);
                let mut buf = [0u8; 4096];
                while f
                    .read(&mut buf)
                    .map_err(|e| Error::Load(format!("reading the socket iterator: {e}")))?
                    > 0
                {}
                Ok(())
            })
            .join()
            .unwrap_or_else(|_| Err(Error::Load("the socket iterator thread panicked".into())))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup2_mount_is_found_on_unified_and_hybrid_hosts() {
        let unified = "24 29 0:21 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(cgroup2_in(unified), Some(PathBuf::from("/sys/fs/cgroup")));
        let hybrid = "25 24 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                      26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw\n\
                      27 25 0:24 / /sys/fs/cgroup/cpu rw,nosuid - cgroup cgroup rw,cpu\n";
        assert_eq!(
            cgroup2_in(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            cgroup2_in("27 25 0:24 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw\n"),
            None
        );
        assert_eq!(cgroup_arg(Some("none")).unwrap(), None);
        assert_eq!(cgroup_arg(Some("/x")).unwrap(), Some(PathBuf::from("/x")));
    }

    #[test]
    fn a_cgroup_without_cgroup_events_is_the_root() {
        let dir = std::env::temp_dir().join(format!("lb-cgroot-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        assert!(!is_cgroup2_root(&dir), "not a cgroup at all");
        fs::write(dir.join("cgroup.procs"), "").unwrap();
        assert!(is_cgroup2_root(&dir));
        fs::write(dir.join("cgroup.events"), "populated 1\n").unwrap();
        assert!(!is_cgroup2_root(&dir));
        fs::remove_dir_all(&dir).unwrap();
        if let Some(root) = cgroup2_mount() {
            assert!(is_cgroup2_root(&root), "{}", root.display());
        }
    }

    #[test]
    fn pods_are_covered_only_with_pods_destroy_and_every_pod_under_the_cgroup() {
        let both = SOCK_CFG_F_PODS | SOCK_CFG_F_DESTROY;
        assert!(covers_pods(both, true));
        assert!(!covers_pods(both, false));
        assert!(!covers_pods(SOCK_CFG_F_PODS, true));
        assert!(!covers_pods(SOCK_CFG_F_DESTROY, true));
    }

    #[test]
    fn the_iterators_jumps_land_on_its_exit() {
        let p = iterator_program(3, 4, 5, 77);
        assert_eq!(p.len(), 35);
        for (i, ins) in p.iter().enumerate() {
            if ins.code == 0x15 || ins.code == 0x55 {
                assert_eq!(i as i16 + 1 + ins.off, 33, "jump at {i}");
            }
        }
        assert_eq!((p[21].code, p[21].regs >> 4, p[21].imm), (0x85, 2, 77));
        // The SockConn fields it reads, where lb-common puts them.
        assert_eq!((p[9].off, p[11].off), (40, 44));
        assert_eq!(p[34].code, 0x95);
    }
}
