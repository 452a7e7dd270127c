//! Loading, pinning and attaching. Everything lives under one bpffs folder (default
//! `/sys/fs/bpf/lb`):
//!
//! ```text
//! /sys/fs/bpf/lb/LB_FRONTENDS  LB_SLOTS  LB_BACKENDS  LB_CONNTRACK               maps
//! /sys/fs/bpf/lb/LB_COUNTERS  LB_FRAGS  LB_NODE  LB_SNAT  LB_AFFINITY            maps
//! /sys/fs/bpf/lb/LB_SRC_RANGES  LB_MAGLEV  LB_TRACE  LB_EVENTS  LB_LAYOUT         maps
//! /sys/fs/bpf/lb/lb_tc_pod  lb_xdp_ext  lb_tc_egress  lb_xdp_carry               programs
//! /sys/fs/bpf/lb/links/<ifname>@<ifindex>                 tcx ingress links (pod interfaces)
//! /sys/fs/bpf/lb/egress-links/<ifname>@<ifindex>          tcx egress links (pod interfaces)
//! /sys/fs/bpf/lb/xdp-links/<ifname>@<ifindex>             XDP links (external interfaces)
//! /sys/fs/bpf/lb/ext-tc-links/<ifname>@<ifindex>          tcx ingress links (external
//!                                                         interfaces, behind XDP)
//! /sys/fs/bpf/lb/ext-egress-links/<ifname>@<ifindex>      tcx egress links (external
//!                                                         interfaces)
//! /sys/fs/bpf/lb/LB_SOCK_REV  LB_SOCK_CONFIG  LB_SOCK_KILL  LB_SOCK_CONN         maps
//! /sys/fs/bpf/lb/lb_sock_conn4 ... lb_sock_peer6          socket programs (`sockets.rs`)
//! /sys/fs/bpf/lb/sock-links/<cgroup inode>/<program>      their cgroup links
//! ```
//!
//! Maps are re-used when pinned, so a restarted agent keeps services and conntrack
//! (pins of another layout are migrated or refused first: `upgrade`).
//! Links are pinned as soon as they are made, so the datapath keeps running if the agent
//! dies; a restarted agent swaps its freshly loaded program into the pinned links
//! atomically (`bpf_link_update`), so no packet meets an interface without a program.
use std::{
    collections::BTreeMap,
    ffi::CStr,
    fs,
    path::{Path, PathBuf},
};

use aya::{
    maps::ProgramArray,
    programs::{
        links::{FdLink, PinnedLink},
        tc::{self, SchedClassifierLink},
        xdp::XdpLink,
        SchedClassifier, TcAttachType, Xdp, XdpMode,
    },
    Ebpf, EbpfLoader,
};
use lb_common::{
    DEFAULT_MAX_BACKENDS, DEFAULT_MAX_CONNTRACK, DEFAULT_MAX_FRONTENDS, DEFAULT_MAX_MAGLEV_CELLS,
    DEFAULT_MAX_SLOTS, DEFAULT_MAX_SOURCE_RANGES, MAP_AFFINITY, MAP_BACKENDS, MAP_CONNTRACK,
    MAP_FRONTENDS, MAP_MAGLEV, MAP_NAMES, MAP_SLOTS, MAP_SNAT, MAP_SOCK_REV, MAP_SOURCE_RANGES,
    MAP_XDP_PROGS, PROG_NAMES, PROG_TC_EGRESS, PROG_TC_POD, PROG_XDP_CARRY, PROG_XDP_EXT,
    XDP_PROG_CARRY,
};
use tracing::{info, warn};

use crate::{dataplane::Maps, Error, Result};

/// The eBPF object, built by `cargo xtask build-ebpf` and embedded so one binary deploys.
#[cfg(not(lb_no_ebpf_object))]
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf.o"));
/// Built without the eBPF object (see build.rs): nothing to load.
#[cfg(lb_no_ebpf_object)]
pub static EBPF_OBJECT: &[u8] = &[];

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/lb";
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub pin_dir: PathBuf,
    pub max_frontends: u32,
    pub max_backends: u32,
    pub max_slots: u32,
    pub max_conntrack: u32,
    pub max_source_ranges: u32,
    pub max_maglev_cells: u32,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            pin_dir: DEFAULT_PIN_DIR.into(),
            max_frontends: DEFAULT_MAX_FRONTENDS,
            max_backends: DEFAULT_MAX_BACKENDS,
            max_slots: DEFAULT_MAX_SLOTS,
            max_conntrack: DEFAULT_MAX_CONNTRACK,
            max_source_ranges: DEFAULT_MAX_SOURCE_RANGES,
            max_maglev_cells: DEFAULT_MAX_MAGLEV_CELLS,
        }
    }
}

/// Mounts bpffs on `/sys/fs/bpf` if `dir` is under it and nothing is mounted there yet.
pub fn ensure_bpffs(dir: &Path) -> Result<()> {
    let root = Path::new("/sys/fs/bpf");
    if !dir.starts_with(root) || is_bpffs(root) {
        return Ok(());
    }
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
    let (src, target, fstype) = (c("bpf"), c("/sys/fs/bpf"), c("bpf"));
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(Error::Load(format!(
            "mounting bpffs on /sys/fs/bpf failed: {} (mount it yourself: mount -t bpf bpf /sys/fs/bpf)",
            std::io::Error::last_os_error()
        )));
    }
    info!("mounted bpffs on /sys/fs/bpf");
    Ok(())
}

/// The network namespace `ip netns exec NAME` started this process in, if it did: that
/// command mounts a fresh sysfs on /sys whose source is the namespace's name.
fn ip_netns_exec_name() -> Option<String> {
    let mounts = fs::read_to_string("/proc/self/mountinfo").ok()?;
    mounts.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let mount_point = left.split(' ').nth(4)?;
        let mut fs_type_source = right.split(' ');
        let (fs_type, source) = (fs_type_source.next()?, fs_type_source.next()?);
        (mount_point == "/sys"
            && fs_type == "sysfs"
            && source != "sysfs"
            && Path::new("/run/netns").join(source).exists())
        .then(|| source.to_string())
    })
}

/// Why the bpffs that `dir` is on is not the host's, if it is not. Pins there vanish
/// with this process's mount namespace. Told by pid 1 (the host's init) where its mount
/// namespace can be read: another mount namespace than ours, and another bpffs (or none)
/// at its /sys/fs/bpf. In a container pid 1 is the container's own process (the same
/// namespace: nothing to say), and with the host's bpffs mounted in, the two are one
/// filesystem (the same device). Where pid 1 cannot be read (a sandbox), by the mark
/// `ip netns exec` leaves: /sys mounted from the network namespace's name.
pub fn foreign_bpffs(dir: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let ns = |pid: &str| fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
    let on = dir.ancestors().find(|a| a.exists())?;
    if !is_bpffs(on) {
        return None;
    }
    let netns = ip_netns_exec_name();
    match (ns("self")?, ns("1")) {
        (own, Some(init)) => {
            if own == init {
                return None;
            }
            let ours = fs::metadata(on).ok()?.dev();
            let host = Path::new("/proc/1/root/sys/fs/bpf");
            if is_bpffs(host) && fs::metadata(host).is_ok_and(|m| m.dev() == ours) {
                return None;
            }
        }
        (_, None) => {
            netns.as_ref()?;
        }
    }
    let name = netns.unwrap_or_else(|| "NAME".into());
    Some(format!(
        "the bpffs under {} is not the host's: this agent runs in a mount namespace of \
         its own (`ip netns exec` makes one, with a private /sys and so a private \
         /sys/fs/bpf), and its pins vanish with it: --keep-pinned protects nothing, and \
         `lb show` and bpftool on the host find nothing. Start it in the host's mount \
         namespace and pick the network namespace with `--netns {name}` instead of \
         `ip netns exec {name} lb ...`",
        dir.display()
    ))
}

fn is_bpffs(p: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs is a plain C struct; all-zero is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out-pointer.
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
}

/// What to do about a map creation refused for memory on a kernel before 5.11, which
/// counts map memory against RLIMIT_MEMLOCK (5.11 and later charge the memory cgroup
/// instead, and need nothing). aya raises the limit itself on such a kernel when a map
/// creation fails with EPERM (`with_raised_rlimit_retry`), which needs CAP_SYS_RESOURCE.
fn memlock_hint(kernel: aya::util::KernelVersion, error: &str) -> Option<String> {
    let before_memcg = kernel < aya::util::KernelVersion::new(5, 11, 0);
    let refused = error.contains("Operation not permitted") || error.contains("os error 1)");
    (before_memcg && refused).then(|| {
        format!(
            " (kernel {kernel:?} is older than 5.11, so the maps count against \
             RLIMIT_MEMLOCK: give the agent CAP_SYS_RESOURCE, which lets it raise the limit \
             (the deploy/pre-5.11 kustomize overlay), or raise the limit of its container)"
        )
    })
}

/// tcx (Linux 6.6+): the same test aya's `SchedClassifier::attach` makes to choose
/// between a tcx link and a netlink tc filter.
fn has_tcx() -> bool {
    aya::util::KernelVersion::current().is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0))
}

/// Interfaces of the current network namespace: (name, ifindex).
pub fn interfaces() -> Vec<(String, u32)> {
    let mut out = Vec::new();
    // SAFETY: if_nameindex returns an array terminated by a zeroed entry, freed below.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return out;
        }
        let mut p = list;
        while (*p).if_index != 0 {
            let name = CStr::from_ptr((*p).if_name).to_string_lossy().into_owned();
            out.push((name, (*p).if_index));
            p = p.add(1);
        }
        libc::if_freenameindex(list);
    }
    out
}

/// Where a program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Hook {
    /// tc ingress on the host side of a pod's veth (`lb_tc_pod`).
    Pod,
    /// tc egress on the host side of a pod's veth (`lb_tc_egress`): replies to the pod.
    PodEgress,
    /// XDP on a node's external interface (`lb_xdp_ext`).
    External,
    /// tc ingress on a node's external interface, behind XDP (`lb_tc_pod`): the packets
    /// XDP leaves to tc, those of the flows the program sends on itself (SNAT).
    /// Attached wherever XDP is.
    ExternalTc,
    /// tc egress on a node's external interface (`lb_tc_egress`): replies to clients
    /// outside. Attached wherever XDP is.
    ExternalEgress,
}

impl Hook {
    pub const ALL: [Hook; 5] = [
        Hook::Pod,
        Hook::PodEgress,
        Hook::External,
        Hook::ExternalTc,
        Hook::ExternalEgress,
    ];
    /// The hooks of a pod interface, and of an external one, in the order they are
    /// attached: a program that translates a flow's packets goes on only after the one
    /// its replies need (egress), and XDP after the tc program it leaves packets to.
    pub const POD: [Hook; 2] = [Hook::PodEgress, Hook::Pod];
    pub const EXTERNAL: [Hook; 3] = [Hook::ExternalEgress, Hook::ExternalTc, Hook::External];

    pub fn program_name(self) -> &'static str {
        match self {
            Hook::Pod | Hook::ExternalTc => PROG_TC_POD,
            Hook::PodEgress | Hook::ExternalEgress => PROG_TC_EGRESS,
            Hook::External => PROG_XDP_EXT,
        }
    }

    /// Folder (under the pin folder) of this hook's link pins.
    fn links_dir(self) -> &'static str {
        match self {
            Hook::Pod => "links",
            Hook::PodEgress => "egress-links",
            Hook::External => "xdp-links",
            Hook::ExternalTc => "ext-tc-links",
            Hook::ExternalEgress => "ext-egress-links",
        }
    }

    /// The tc attach point of a tc hook.
    fn tc_attach_type(self) -> TcAttachType {
        match self {
            Hook::PodEgress | Hook::ExternalEgress => TcAttachType::Egress,
            _ => TcAttachType::Ingress,
        }
    }
}

/// The loaded programs and their attachments.
pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    /// Attached interfaces: (hook, name) -> ifindex.
    attached: BTreeMap<(Hook, String), u32>,
    /// Netlink tc filters (kernels before 6.6, no tcx): they cannot be pinned, so the
    /// agent holds them; they detach when dropped.
    held: BTreeMap<(Hook, String), SchedClassifierLink>,
    /// The programs' log lines, forwarded while the agent runs (a `--debug-log` object
    /// only).
    _log: Option<crate::ebpf_log::EbpfLog>,
}

impl Datapath {
    /// Loads the object, re-using pinned maps (or creating and pinning them), and pins the
    /// programs. Returns the datapath and its maps. Pins of an older layout are migrated
    /// first, pins this lb would misread refused (`upgrade`).
    pub fn load(opts: &LoadOptions) -> Result<(Self, Maps)> {
        if EBPF_OBJECT.is_empty() {
            return Err(Error::Load(
                "this lb was built without the eBPF object; build it with `cargo xtask build` \
                 (or `cargo xtask build-ebpf`, then cargo build)"
                    .into(),
            ));
        }
        Self::load_object(opts, EBPF_OBJECT)
    }

    /// [`Datapath::load`] of another object than the embedded one (a `--debug-log`
    /// build, in the tests).
    pub fn load_object(opts: &LoadOptions, object: &[u8]) -> Result<(Self, Maps)> {
        ensure_bpffs(&opts.pin_dir)?;
        if let Some(why) = foreign_bpffs(&opts.pin_dir) {
            warn!("{why}");
        }
        let pins: Vec<(&str, PathBuf)> = MAP_NAMES
            .into_iter()
            .map(|m| (m, opts.pin_dir.join(m)))
            .collect();
        let upgrade = crate::upgrade::Upgrade::prepare(&opts.pin_dir)?;
        upgrade.set_aside()?;
        let loaded = Self::load_pinned(opts, &pins, object).and_then(|mut loaded| {
            upgrade.finish()?;
            let words = loaded.1.fill_frontend_filter()?;
            if words > 0 {
                info!(words, "frontend filter filled from the pinned frontends");
            }
            // Programs of an earlier build may still be attached, and insert entries
            // without their bits: the programs look every packet up until the
            // collector builds the filter, once this build's are attached
            // (`dataplane::ct_filter`).
            loaded.1.ct_filter()?.turn_off();
            Ok(loaded)
        });
        if loaded.is_err() {
            upgrade.restore();
        }
        loaded
    }

    /// [`Datapath::load`] once the pins are of this layout (or set aside to be made anew).
    fn load_pinned(
        opts: &LoadOptions,
        pins: &[(&str, PathBuf)],
        object: &[u8],
    ) -> Result<(Self, Maps)> {
        let reused = pins.iter().filter(|(_, p)| p.exists()).count();
        for hook in Hook::ALL {
            let dir = opts.pin_dir.join(hook.links_dir());
            fs::create_dir_all(&dir).map_err(|e| {
                Error::Load(format!("cannot create pin folder {}: {e}", dir.display()))
            })?;
        }
        let mut loader = EbpfLoader::new();
        for (name, path) in pins {
            loader.map_pin_path(name, path.as_path());
        }
        loader
            .map_max_entries(MAP_FRONTENDS, opts.max_frontends)
            .map_max_entries(MAP_SLOTS, opts.max_slots)
            // Backend ids start at 1: index 0 of the array stays unused.
            .map_max_entries(MAP_BACKENDS, opts.max_backends + 1)
            .map_max_entries(MAP_CONNTRACK, opts.max_conntrack)
            // Two entries per SNAT flow, as in conntrack; SNAT flows (from outside to
            // another node) are a part of all flows: a quarter of conntrack's size.
            .map_max_entries(MAP_SNAT, (opts.max_conntrack / 4).max(1024))
            // One entry per (client, frontend with affinity).
            .map_max_entries(MAP_AFFINITY, (opts.max_conntrack / 4).max(1024))
            .map_max_entries(MAP_SOURCE_RANGES, opts.max_source_ranges)
            .map_max_entries(MAP_MAGLEV, opts.max_maglev_cells.max(1))
            // One entry per (socket, backend) of connect-time balancing; an LRU.
            .map_max_entries(MAP_SOCK_REV, (opts.max_conntrack / 2).max(1024));
        let mut ebpf = loader.load(object).map_err(|e| {
            let hint = aya::util::KernelVersion::current()
                .ok()
                .and_then(|v| memlock_hint(v, &e.to_string()))
                .unwrap_or_default();
            Error::Load(format!("loading the eBPF object failed: {e}{hint}"))
        })?;
        if reused > 0 {
            info!(pin_dir = %opts.pin_dir.display(), reused, "re-using pinned maps");
        }
        let maps = Maps::take(&mut ebpf)?;
        let log = crate::ebpf_log::EbpfLog::start(&mut ebpf)?;
        let mut dp = Self {
            ebpf,
            pin_dir: opts.pin_dir.clone(),
            attached: BTreeMap::new(),
            held: BTreeMap::new(),
            _log: log,
        };
        let verifier = |name: &str, e: &dyn std::fmt::Display| {
            Error::Load(format!("the verifier rejected {name}: {e:#}"))
        };
        dp.program().load().map_err(|e| verifier(PROG_TC_POD, &e))?;
        dp.xdp_program()
            .load()
            .map_err(|e| verifier(PROG_XDP_EXT, &e))?;
        dp.egress_program()
            .load()
            .map_err(|e| verifier(PROG_TC_EGRESS, &e))?;
        dp.carry_program()
            .load()
            .map_err(|e| verifier(PROG_XDP_CARRY, &e))?;
        // The XDP program's tail call into the fast path of SNAT flows.
        {
            let fd = dp
                .ebpf
                .program(PROG_XDP_CARRY)
                .expect("loaded above")
                .fd()
                .map_err(|e| Error::Load(format!("{PROG_XDP_CARRY}: {e}")))?
                .try_clone()
                .map_err(|e| Error::Load(format!("{PROG_XDP_CARRY}: {e}")))?;
            let map = dp
                .ebpf
                .map_mut(MAP_XDP_PROGS)
                .ok_or_else(|| Error::Load(format!("{MAP_XDP_PROGS} is not in the object")))?;
            let mut progs = ProgramArray::try_from(map)
                .map_err(|e| Error::Load(format!("{MAP_XDP_PROGS}: {e}")))?;
            progs
                .set(XDP_PROG_CARRY, &fd, 0)
                .map_err(|e| Error::Load(format!("{MAP_XDP_PROGS}[{XDP_PROG_CARRY}]: {e}")))?;
        }
        for name in PROG_NAMES {
            let pin = opts.pin_dir.join(name);
            let _ = fs::remove_file(&pin);
            let prog = dp.ebpf.program_mut(name).expect("checked above");
            let res = match prog {
                aya::programs::Program::SchedClassifier(p) => p.pin(&pin),
                aya::programs::Program::Xdp(p) => p.pin(&pin),
                _ => unreachable!("the object has tc and XDP programs only"),
            };
            res.map_err(|e| Error::Load(format!("pinning {}: {e}", pin.display())))?;
        }
        Ok((dp, maps))
    }

    /// Loads, pins and attaches the socket programs (connect-time balancing) to the
    /// cgroup of `opts` (`sockets.rs`). Call once the maps hold the state.
    pub fn attach_sockets(
        &mut self,
        opts: &crate::sockets::SockOptions,
    ) -> Result<Option<crate::sockets::Sockets>> {
        crate::sockets::setup(&mut self.ebpf, &self.pin_dir, opts)
    }

    /// The loaded tc program (the kernel tests run it through BPF_PROG_TEST_RUN).
    pub fn program(&mut self) -> &mut SchedClassifier {
        self.tc_program(PROG_TC_POD)
    }

    /// The loaded tc egress program (the reply path).
    pub fn egress_program(&mut self) -> &mut SchedClassifier {
        self.tc_program(PROG_TC_EGRESS)
    }

    fn tc_program(&mut self, name: &str) -> &mut SchedClassifier {
        self.ebpf
            .program_mut(name)
            .expect("in the object")
            .try_into()
            .expect("a tc program")
    }

    /// The loaded XDP fast path of SNAT flows (tail-called by the XDP program).
    pub fn carry_program(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(PROG_XDP_CARRY)
            .expect("in the object")
            .try_into()
            .expect("an XDP program")
    }

    /// The loaded XDP program.
    pub fn xdp_program(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(PROG_XDP_EXT)
            .expect("in the object")
            .try_into()
            .expect("an XDP program")
    }

    fn link_pin(&self, hook: Hook, ifname: &str, ifindex: u32) -> PathBuf {
        self.pin_dir
            .join(hook.links_dir())
            .join(format!("{ifname}@{ifindex}"))
    }

    /// Names of the interfaces the program of `hook` is attached to.
    pub fn attached(&self, hook: Hook) -> impl Iterator<Item = &str> {
        self.attached
            .keys()
            .filter(move |(h, _)| *h == hook)
            .map(|(_, n)| n.as_str())
    }

    /// Attaches the program of `hook` to `ifname` (tc ingress for pods, XDP for external
    /// interfaces). If a pinned link from an earlier agent exists for this very interface,
    /// the new program replaces the old one in it atomically; otherwise a new link is made
    /// and pinned.
    pub fn attach(&mut self, hook: Hook, ifname: &str, ifindex: u32) -> Result<()> {
        let pin = self.link_pin(hook, ifname, ifindex);
        let replaced = pin.exists()
            && match self.replace_in_pinned(hook, &pin) {
                Ok(()) => true,
                Err(e) => {
                    warn!(%ifname, "stale link pin {}: {e}; attaching anew", pin.display());
                    let _ = fs::remove_file(&pin);
                    false
                }
            };
        let mut held = false;
        if !replaced {
            let fd = match hook {
                Hook::External => self.attach_xdp(ifname)?,
                _ => self.attach_tc(hook, ifname)?,
            };
            match fd {
                Ok(fd) => {
                    fd.pin(&pin).map_err(|e| {
                        Error::Attach(format!("{ifname}: pinning link {}: {e}", pin.display()))
                    })?;
                }
                Err(link) => {
                    held = true;
                    if !self.held.keys().any(|(h, _)| *h == hook) {
                        warn!(
                            "this kernel has no tcx (needs >= 6.6): attached as netlink tc \
                             filters, which cannot be pinned; the pod datapath lives as long \
                             as this agent"
                        );
                    }
                    self.held.insert((hook, ifname.to_string()), link);
                }
            }
        }
        info!(%ifname, ifindex, ?hook, replaced, held, "attached");
        self.attached.insert((hook, ifname.to_string()), ifindex);
        Ok(())
    }

    /// Swaps the freshly loaded program into a link pinned by an earlier agent.
    fn replace_in_pinned(&mut self, hook: Hook, pin: &Path) -> Result<()> {
        let pinned = PinnedLink::from_pin(pin).map_err(|e| Error::Attach(e.to_string()))?;
        let fd: FdLink = pinned.into();
        let err = |e: &dyn std::fmt::Display| {
            Error::Attach(format!("replacing the program in {}: {e}", pin.display()))
        };
        match hook {
            Hook::External => {
                let link = XdpLink::try_from(fd).map_err(|e| err(&e))?;
                let id = self
                    .xdp_program()
                    .attach_to_link(link)
                    .map_err(|e| err(&e))?;
                let _ = self.xdp_program().take_link(id);
            }
            _ => {
                let link = SchedClassifierLink::try_from(fd).map_err(|e| err(&e))?;
                let prog = self.tc_program(hook.program_name());
                let id = prog.attach_to_link(link).map_err(|e| err(&e))?;
                // The pin keeps the link; our fd may go.
                let _ = prog.take_link(id);
            }
        }
        Ok(())
    }

    /// A new tc link of `hook` (ingress or egress): a pinnable tcx link, or a netlink
    /// filter to hold.
    fn attach_tc(
        &mut self,
        hook: Hook,
        ifname: &str,
    ) -> Result<std::result::Result<FdLink, SchedClassifierLink>> {
        if !has_tcx() {
            // aya attaches a netlink tc filter there, which needs a clsact qdisc
            // (an error here means the interface already has one).
            let _ = tc::qdisc_add_clsact(ifname);
        }
        let point = hook.tc_attach_type();
        let prog = self.tc_program(hook.program_name());
        let id = prog
            .attach(ifname, point)
            .map_err(|e| Error::Attach(format!("tc {point:?} on {ifname}: {e}")))?;
        let link = prog
            .take_link(id)
            .map_err(|e| Error::Attach(format!("{ifname}: {e}")))?;
        if link.priority().is_ok() {
            return Ok(Err(link));
        }
        link.try_into()
            .map(Ok)
            .map_err(|e| Error::Attach(format!("{ifname}: not a tcx link: {e}")))
    }

    /// A new XDP link, in the driver's native mode when it has one (veth, most NICs),
    /// else generic. XDP bpf links (pinnable) need Linux 5.9; older kernels are refused.
    fn attach_xdp(
        &mut self,
        ifname: &str,
    ) -> Result<std::result::Result<FdLink, SchedClassifierLink>> {
        let id = self
            .xdp_program()
            .attach(ifname, XdpMode::Default)
            .map_err(|e| Error::Attach(format!("XDP on {ifname}: {e}")))?;
        let link = self
            .xdp_program()
            .take_link(id)
            .map_err(|e| Error::Attach(format!("{ifname}: {e}")))?;
        // A netlink attachment (before 5.9) is not a bpf link and cannot be converted;
        // dropping it here detaches it again.
        let fd: FdLink = link.try_into().map_err(|e| {
            Error::Attach(format!(
                "XDP on {ifname}: not a bpf link ({e}); external interfaces need Linux 5.9+"
            ))
        })?;
        Ok(Ok(fd))
    }

    /// Attaches the program of `hook` to every interface matching `patterns` that is not
    /// attached yet, and forgets interfaces that disappeared (the kernel drops their links
    /// with them). Returns the names of newly attached interfaces; failures are logged and
    /// retried on the next call.
    pub fn sync_interfaces(&mut self, hook: Hook, patterns: &[glob::Pattern]) -> Vec<String> {
        let present: BTreeMap<String, u32> = interfaces()
            .into_iter()
            .filter(|(name, _)| patterns.iter().any(|p| p.matches(name)))
            .collect();
        let gone: Vec<(String, u32)> = self
            .attached
            .iter()
            .filter(|((h, n), i)| *h == hook && present.get(n) != Some(i))
            .map(|((_, n), i)| (n.clone(), *i))
            .collect();
        for (name, index) in gone {
            let _ = fs::remove_file(self.link_pin(hook, &name, index));
            self.attached.remove(&(hook, name.clone()));
            self.held.remove(&(hook, name.clone()));
            info!(ifname = %name, ?hook, "interface gone");
        }
        let mut added = Vec::new();
        for (name, index) in present {
            if self.attached.contains_key(&(hook, name.clone())) {
                continue;
            }
            match self.attach(hook, &name, index) {
                Ok(()) => added.push(name),
                Err(e) => warn!("{e}"),
            }
        }
        added
    }

    /// Whether link pins of `hook` exist (this agent's or an earlier one's).
    pub fn has_link_pins(&self, hook: Hook) -> bool {
        fs::read_dir(self.pin_dir.join(hook.links_dir())).is_ok_and(|mut d| d.any(|e| e.is_ok()))
    }

    /// Detaches the program of `hook` from every interface: its link pins go (an earlier
    /// agent's too), and its held links.
    pub fn detach_all(&mut self, hook: Hook) {
        if let Ok(dir) = fs::read_dir(self.pin_dir.join(hook.links_dir())) {
            for entry in dir.flatten() {
                let _ = fs::remove_file(entry.path());
                info!(link = %entry.file_name().to_string_lossy(), ?hook, "detached");
            }
        }
        self.attached.retain(|(h, _), _| *h != hook);
        self.held.retain(|(h, _), _| *h != hook);
    }

    /// Removes the link pins an earlier agent left that this one will not take over:
    /// of interfaces that no longer exist (left by an agent that died), and of
    /// interfaces `wanted` (this agent's `--interfaces` / `--external-interfaces`) no
    /// longer names for the hook, whose links (an earlier build's program, which no
    /// agent would update again) detach with their pins.
    pub fn prune_stale_link_pins(&self, wanted: impl Fn(Hook, &str) -> bool) {
        let present: BTreeMap<String, u32> = interfaces().into_iter().collect();
        for hook in Hook::ALL {
            let Ok(dir) = fs::read_dir(self.pin_dir.join(hook.links_dir())) else {
                continue;
            };
            for entry in dir.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                match stale_link_pin(&name, hook, &present, &wanted) {
                    None => {}
                    Some(Stale::Gone) => {
                        let _ = fs::remove_file(entry.path());
                    }
                    Some(Stale::Unwanted(ifname)) => {
                        info!(%ifname, ?hook, "detached: the interface is no longer one this agent attaches to");
                        let _ = fs::remove_file(entry.path());
                    }
                }
            }
        }
    }

    /// Stops the agent. With `keep_pinned` the datapath keeps running (maps, programs and
    /// links stay pinned) for the next agent; otherwise everything is detached and unpinned.
    pub fn shutdown(mut self, keep_pinned: bool) -> Result<()> {
        if keep_pinned {
            if !self.held.is_empty() {
                warn!("links this kernel cannot pin detach with this agent; only maps stay");
            }
            info!(pin_dir = %self.pin_dir.display(), "exiting; datapath stays pinned");
            return Ok(());
        }
        let attached: Vec<((Hook, String), u32)> =
            std::mem::take(&mut self.attached).into_iter().collect();
        for ((hook, name), index) in attached {
            let _ = fs::remove_file(self.link_pin(hook, &name, index));
        }
        remove_pins(&self.pin_dir)?;
        info!(pin_dir = %self.pin_dir.display(), "detached and unpinned");
        Ok(())
    }
}

/// Why a link pin (`<interface>@<ifindex>`) is not taken over.
#[derive(Debug, PartialEq, Eq)]
enum Stale {
    /// No interface of that name and index (or a name that is no pin of ours).
    Gone,
    /// The interface is there, but not one to attach `hook` to.
    Unwanted(String),
}

fn stale_link_pin(
    pin: &str,
    hook: Hook,
    present: &BTreeMap<String, u32>,
    wanted: impl Fn(Hook, &str) -> bool,
) -> Option<Stale> {
    let Some((name, index)) = pin
        .rsplit_once('@')
        .and_then(|(n, i)| Some((n, i.parse::<u32>().ok()?)))
    else {
        return Some(Stale::Gone);
    };
    if present.get(name) != Some(&index) {
        Some(Stale::Gone)
    } else if !wanted(hook, name) {
        Some(Stale::Unwanted(name.to_string()))
    } else {
        None
    }
}

/// Removes every pin the agent makes under `dir`, and the folder. Links whose pin goes
/// away are detached once no fd holds them.
pub fn remove_pins(dir: &Path) -> Result<()> {
    for hook in Hook::ALL {
        let links = dir.join(hook.links_dir());
        if let Ok(entries) = fs::read_dir(&links) {
            for entry in entries.flatten() {
                let _ = fs::remove_file(entry.path());
            }
        }
        let _ = fs::remove_dir(links);
    }
    crate::sockets::remove_pins(dir);
    for name in MAP_NAMES.into_iter().chain(PROG_NAMES) {
        let _ = fs::remove_file(dir.join(name));
    }
    let aside = dir.join(crate::upgrade::ASIDE_DIR);
    if let Ok(entries) = fs::read_dir(&aside) {
        for entry in entries.flatten() {
            let _ = fs::remove_file(entry.path());
        }
        let _ = fs::remove_dir(aside);
    }
    match fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::Load(format!("removing {}: {e}", dir.display()))),
    }
}

#[cfg(test)]
mod stale_tests {
    use super::*;

    #[test]
    fn a_link_pin_is_taken_over_only_for_a_present_interface_still_wanted() {
        let present: BTreeMap<String, u32> =
            [("lxc-a".to_string(), 7), ("lxc-b".to_string(), 8)].into();
        let wanted = |_: Hook, n: &str| n == "lxc-a";
        assert_eq!(stale_link_pin("lxc-a@7", Hook::Pod, &present, wanted), None);
        // Another interface now has the name (or the index changed): gone.
        assert_eq!(
            stale_link_pin("lxc-a@9", Hook::Pod, &present, wanted),
            Some(Stale::Gone)
        );
        assert_eq!(
            stale_link_pin("lxc-c@3", Hook::Pod, &present, wanted),
            Some(Stale::Gone)
        );
        assert_eq!(
            stale_link_pin("junk", Hook::Pod, &present, wanted),
            Some(Stale::Gone)
        );
        // There, but no longer matched by this agent's flags.
        assert_eq!(
            stale_link_pin("lxc-b@8", Hook::PodEgress, &present, wanted),
            Some(Stale::Unwanted("lxc-b".into()))
        );
    }
}

#[cfg(test)]
mod tests {
    use aya::util::KernelVersion;

    use super::*;

    #[test]
    fn memlock_is_named_only_where_the_kernel_counts_maps_against_it() {
        let eperm = "map LB_FRONTENDS: Operation not permitted (os error 1)";
        let hint = memlock_hint(KernelVersion::new(5, 10, 0), eperm).unwrap();
        assert!(
            hint.contains("CAP_SYS_RESOURCE") && hint.contains("pre-5.11"),
            "{hint}"
        );
        assert_eq!(memlock_hint(KernelVersion::new(5, 11, 0), eperm), None);
        assert_eq!(memlock_hint(KernelVersion::new(6, 18, 0), eperm), None);
        assert_eq!(
            memlock_hint(
                KernelVersion::new(5, 4, 0),
                "Invalid argument (os error 22)"
            ),
            None
        );
    }
}
