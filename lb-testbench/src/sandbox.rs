//! Nodes and pods made of network namespaces, for the demo, the benchmark and the
//! end-to-end tests, routed the way a CNI without overlay does it (cilium / calico in
//! native-routing mode): each pod has a /32 address and a default route via a link-local
//! gateway; its node has a /32 route per pod on the pod's `lxc-*` veth. Neighbour entries
//! between a pod and its node are static, so no ARP is involved there.
//!
//! Two shapes:
//! - [`Sandbox::create`], one node (`<prefix>-node`) and "the outside" (`<prefix>-out`),
//!   joined by one veth pair: the node's `eth0` (192.168.50.1) and the outside's `eth0`
//!   (192.168.50.2), which routes everything to the node. The node has no route out of
//!   the sandbox: a packet the dataplane misses dies there. Pods get 10.244.0.<n>, n
//!   from 11.
//! - [`Sandbox::cluster`], N >= 2 nodes on one L2 underlay: node k is `<prefix>-n<k>`
//!   (node 0 keeps `<prefix>-node`), its `eth0` a veth whose peer is a port of the bridge
//!   `br0` in the outside namespace, which holds the outside's own addresses. Node 0 is
//!   192.168.50.1, node k >= 1 192.168.50.<k+2> (the outside keeps .2). ARP and neighbour
//!   discovery run normally on the underlay. Node k's pods get 10.244.k.<n> (n from 11 on
//!   each node), and every other node routes that /24 via node k's address, as a routed
//!   CNI installs it. The outside has only its on-link /24 and /64 (no route to any pod
//!   CIDR): a packet to a pod from outside dies there.
//!
//! Dual stack: every pod also has an IPv6 /128 (`fd00:10:244:<k>::<n>`) with a default
//! route via a link-local gateway (`fe80::1`), its node a /128 route per pod, and the nodes
//! and the outside an IPv6 /64 on the underlay (`fd00:50::1`, `fd00:50::<k+2>` for node
//! k >= 1, `fd00:50::2` for the outside), all without duplicate address detection
//! (`nodad`), so addresses work at once; in a cluster every node routes node k's
//! `fd00:10:244:<k>::/64` via node k's IPv6 address.
//!
//! Each node has its own bpffs folder for its agent ([`NodeInfo::pin_dir`]). Everything
//! the sandbox makes (namespaces, processes, pins, files) goes away on drop, also when a
//! test fails.
use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::{Error, Result};

/// MAC of every host-side veth (as calico and cilium do).
pub const HOST_MAC: &str = "ee:ee:ee:ee:ee:ee";
/// The pods' default gateway (link-local, answered by the static neighbour entry).
pub const GATEWAY: &str = "169.254.1.1";
/// The pods' IPv6 default gateway (link-local, answered by the static neighbour entry).
pub const GATEWAY6: &str = "fe80::1";
/// The node's external interface, its addresses, and the outside client's addresses.
pub const EXTERNAL_IF: &str = "eth0";
pub const NODE_IP: &str = "192.168.50.1";
pub const OUTSIDE_IP: &str = "192.168.50.2";
pub const NODE_IP6: &str = "fd00:50::1";
pub const OUTSIDE_IP6: &str = "fd00:50::2";

/// A node of the sandbox.
#[derive(Clone, Debug)]
pub struct NodeInfo {
    /// Its Kubernetes node name ("node-0", "node-1", ...), for the endpoints' `nodeName`
    /// and the agent's `node:` section.
    pub name: String,
    /// Network namespace name.
    pub netns: String,
    /// The address of its external interface (`eth0`).
    pub ip: Ipv4Addr,
    /// Its IPv6 address on `eth0`.
    pub ip6: Ipv6Addr,
    /// bpffs folder for this node's agent.
    pub pin_dir: PathBuf,
}

#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    /// The index of its node in [`Sandbox::nodes`].
    pub node: usize,
    /// Network namespace name.
    pub netns: String,
    pub ip: Ipv4Addr,
    /// Its IPv6 address.
    pub ip6: Ipv6Addr,
    /// The host side of the pod's veth, in its node's namespace.
    pub host_if: String,
}

pub struct Sandbox {
    pub prefix: String,
    /// Node 0's network namespace (the only node of a one-node sandbox).
    pub node: String,
    /// Every node, node 0 first (one for [`Sandbox::create`]).
    pub nodes: Vec<NodeInfo>,
    /// The namespace outside the nodes, joined to their external interfaces.
    pub outside: String,
    pub pods: Vec<Pod>,
    /// Scratch folder for configs and logs.
    pub workdir: PathBuf,
    /// bpffs folder for node 0's agent.
    pub pin_dir: PathBuf,
    children: Mutex<Vec<Child>>,
    /// Threads serving in pods (UDP responders), stopped on drop.
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// The XDP links of the underlay bridge's ports (detached when these close).
    underlay_xdp: Mutex<Vec<std::os::fd::OwnedFd>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// The host part of the next pod's address, per node.
    next_ip: Vec<u8>,
}

/// `ip:port`, with the brackets an IPv6 address needs (`[ip]:port`).
pub fn hostport(ip: &str, port: u16) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

/// Moves the calling thread into a network namespace (see `lb_userspace::netns`).
pub fn enter(netns: &str) -> Result<()> {
    Ok(lb_userspace::netns::enter(netns)?)
}

/// Runs `f` on a new thread inside the named network namespace and returns its result
/// (sockets made by `f` stay in that namespace).
pub fn run_in<T: Send + 'static>(netns: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let netns = netns.to_string();
    std::thread::spawn(move || -> Result<T> {
        enter(&netns)?;
        Ok(f())
    })
    .join()
    .map_err(|_| Error::Sandbox("thread panicked".into()))?
}

fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .output()
        .map_err(|e| Error::Sandbox(format!("{cmd:?}: {e}")))?;
    if !out.status.success() {
        return Err(Error::Sandbox(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(out)
}

/// Node k's IPv6 pod prefix (a /64): `fd00:10:244:<k>::`.
pub fn pod_cidr6(k: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x10, 0x244, k as u16, 0, 0, 0, 0)
}

fn ip(args: &[&str]) -> Result<Output> {
    run(Command::new("ip").args(args))
}

/// Fails with a clear message if a program the sandbox needs is missing.
pub fn require_tools(tools: &[&str]) -> Result<()> {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| {
            !std::env::var_os("PATH")
                .map(|p| std::env::split_paths(&p).any(|d| d.join(t).is_file()))
                .unwrap_or(false)
        })
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::Sandbox(format!(
            "missing programs: {} (run `cargo xtask setup`)",
            missing.join(", ")
        )))
    }
}

/// The lock of the test bench's namespaces and pins on this machine: every process that
/// makes some holds it shared for its whole life ([`hold_sandbox_lock`]), and `cargo
/// xtask clean-sandboxes` (also run by `cargo xtask test` and `bench`) takes it
/// exclusively, so it removes only what no running test, of any checkout, is using.
pub const SANDBOX_LOCK: &str = "/run/lb-sandboxes.lock";

/// Takes [`SANDBOX_LOCK`] shared, once per process, until it exits (waiting while a
/// clean-up holds it). Without the lock file (no /run), the test goes on unprotected.
pub fn hold_sandbox_lock() {
    use std::os::fd::AsRawFd;
    static HELD: std::sync::OnceLock<Option<std::fs::File>> = std::sync::OnceLock::new();
    HELD.get_or_init(|| {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(SANDBOX_LOCK)
            .ok()?;
        // SAFETY: flock on a file descriptor this function owns.
        (unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_SH) } == 0).then_some(f)
    });
}

/// Deletes namespaces left by a sandbox with this prefix that was killed before its drop.
pub fn clean_prefix(prefix: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            if !name.is_empty() && name.starts_with(prefix) {
                let _ = Command::new("ip").args(["netns", "del", name]).status();
            }
        }
    }
}

/// The firewall rule every node of a sandbox has (`iptables` and `ip6tables`):
/// forwarded packets in connection-tracking state INVALID are dropped.
pub const NODE_FIREWALL_RULE: [&str; 8] = [
    "-A",
    "FORWARD",
    "-m",
    "conntrack",
    "--ctstate",
    "INVALID",
    "-j",
    "DROP",
];
const NODE_FIREWALL_TABLES: [&str; 2] = ["iptables", "ip6tables"];

/// The name of the bridge in the outside namespace that joins a cluster's nodes.
pub const UNDERLAY_BRIDGE: &str = "br0";

impl Sandbox {
    /// Makes the node and the given pods. `prefix` must be unique on the machine (tests
    /// use their name and the process id) and short: namespace names derive from it.
    pub fn create(prefix: &str, pods: &[&str]) -> Result<Self> {
        let mut sb = Self::empty(prefix, 1)?;
        sb.create_node(0)?;
        sb.create_outside()?;
        for p in pods {
            sb.add_pod(p)?;
        }
        Ok(sb)
    }

    /// Makes a cluster: node k gets the pods named in `nodes[k]` (pod names are unique
    /// in the sandbox, and none is `node`, `out` or `n<k>`). One node is
    /// [`Sandbox::create`]; two or more share a bridged underlay (see the module doc).
    pub fn cluster(prefix: &str, nodes: &[&[&str]]) -> Result<Self> {
        match nodes {
            [] => return Err(Error::Sandbox("a cluster needs a node".into())),
            [pods] => return Self::create(prefix, pods),
            _ => {}
        }
        let mut sb = Self::empty(prefix, nodes.len())?;
        for k in 0..nodes.len() {
            sb.create_node(k)?;
        }
        sb.create_underlay()?;
        for (k, pods) in nodes.iter().enumerate() {
            for p in *pods {
                sb.add_pod_on(k, p)?;
            }
        }
        Ok(sb)
    }

    /// The sandbox's bookkeeping for `n` nodes, before any namespace exists (so that a
    /// failure from here on drops it, which removes what was made).
    fn empty(prefix: &str, n: usize) -> Result<Self> {
        require_tools(&["ip"])?;
        hold_sandbox_lock();
        if n > 200 {
            return Err(Error::Sandbox(format!("{n} nodes: at most 200")));
        }
        clean_prefix(prefix);
        let workdir = std::env::temp_dir().join(format!("{prefix}-work"));
        let _ = std::fs::remove_dir_all(&workdir);
        std::fs::create_dir_all(&workdir)
            .map_err(|e| Error::Sandbox(format!("{}: {e}", workdir.display())))?;
        let nodes: Vec<NodeInfo> = (0..n)
            .map(|k| {
                // Node 0 keeps the one-node names and addresses; the outside keeps .2.
                let (netns, pin_dir, host) = if k == 0 {
                    (format!("{prefix}-node"), format!("/sys/fs/bpf/{prefix}"), 1)
                } else {
                    (
                        format!("{prefix}-n{k}"),
                        format!("/sys/fs/bpf/{prefix}-n{k}"),
                        k as u8 + 2,
                    )
                };
                NodeInfo {
                    name: format!("node-{k}"),
                    netns,
                    ip: Ipv4Addr::new(192, 168, 50, host),
                    ip6: Ipv6Addr::new(0xfd00, 0x50, 0, 0, 0, 0, 0, host as u16),
                    pin_dir: PathBuf::from(pin_dir),
                }
            })
            .collect();
        debug_assert_eq!(nodes[0].ip.to_string(), NODE_IP);
        debug_assert_eq!(nodes[0].ip6.to_string(), NODE_IP6);
        Ok(Sandbox {
            prefix: prefix.to_string(),
            node: nodes[0].netns.clone(),
            pin_dir: nodes[0].pin_dir.clone(),
            nodes,
            outside: format!("{prefix}-out"),
            pods: Vec::new(),
            workdir,
            children: Mutex::new(Vec::new()),
            threads: Mutex::new(Vec::new()),
            underlay_xdp: Mutex::new(Vec::new()),
            stop: Default::default(),
            next_ip: vec![11; n],
        })
    }

    /// Makes the veth underlay behave as a physical one for what the nodes' XDP programs
    /// send back onto it (`XDP_TX`, redirects): every frame on it carries full checksums
    /// (transmit checksum offload off on the nodes' `eth0` and the outside's bridge, as
    /// a NIC computes them before the wire; a veth otherwise hands its peer a
    /// CHECKSUM_PARTIAL skb, whose checksum is only completed later, which an XDP frame
    /// sent back loses), and each bridge port has an XDP program that passes everything
    /// (a veth takes frames that its peer's XDP sends back only into the NAPI ring an XDP
    /// program gives it; GRO alone does not, seen on 6.18).
    fn wire_like_underlay(&self) -> Result<()> {
        let out = self.outside.clone();
        let ethtool_off = |netns: &str, dev: &str| {
            run(Command::new("ip")
                .args(["netns", "exec", netns, "ethtool", "-K", dev, "tx", "off"]))
        };
        for n in &self.nodes {
            ethtool_off(&n.netns, EXTERNAL_IF)?;
        }
        ethtool_off(&out, UNDERLAY_BRIDGE)?;
        let prog = crate::rawbpf::load_xdp("lbt_wire_pass", &crate::rawbpf::xdp_pass())?;
        let ports: Vec<String> = (0..self.nodes.len())
            .map(|k| format!("veth-n{k}"))
            .collect();
        let links = run_in(&out, move || -> Result<Vec<std::os::fd::OwnedFd>> {
            let present = lb_userspace::loader::interfaces();
            ports
                .iter()
                .map(|port| {
                    let ifindex = present
                        .iter()
                        .find(|(n, _)| n == port)
                        .map(|(_, i)| *i)
                        .ok_or_else(|| Error::Sandbox(format!("no {port} in the outside")))?;
                    crate::rawbpf::attach_xdp_native(&prog, ifindex)
                })
                .collect()
        })??;
        self.underlay_xdp.lock().unwrap().extend(links);
        Ok(())
    }

    /// Node k's namespace: forwarding on, strict reverse-path filtering (RFC 3704, as
    /// several distributions set it), `lo` up, and the firewall rule many nodes carry
    /// (kube-proxy leaves the like behind, and so do several distributions): forwarded
    /// packets whose connection-tracking state is INVALID are dropped, for both
    /// families. Translated packets must never depend on the node's netfilter state (see
    /// ARCHITECTURE.md), and every test on a sandbox checks it.
    fn create_node(&self, k: usize) -> Result<()> {
        let node = self.nodes[k].netns.as_str();
        ip(&["netns", "add", node])?;
        for (key, v) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.conf.all.rp_filter", "1"),
            ("net.ipv4.conf.default.rp_filter", "1"),
            ("net.ipv6.conf.all.forwarding", "1"),
            ("net.ipv6.conf.default.forwarding", "1"),
        ] {
            run(Command::new("ip").args([
                "netns",
                "exec",
                node,
                "sysctl",
                "-qw",
                &format!("{key}={v}"),
            ]))?;
        }
        ip(&["-n", node, "link", "set", "lo", "up"])?;
        for tables in NODE_FIREWALL_TABLES {
            run(Command::new("ip")
                .args(["netns", "exec", node, tables])
                .args(NODE_FIREWALL_RULE))?;
        }
        Ok(())
    }

    /// The outside namespace and the node's external interface: a /24 on a veth pair,
    /// with the outside routing everything to the node.
    fn create_outside(&self) -> Result<()> {
        let (node, out) = (self.node.as_str(), self.outside.as_str());
        ip(&["netns", "add", out])?;
        ip(&[
            "-n",
            node,
            "link",
            "add",
            EXTERNAL_IF,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            out,
        ])?;
        for (ns, addr) in [(node, NODE_IP), (out, OUTSIDE_IP)] {
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        }
        for (ns, addr) in [(node, NODE_IP6), (out, OUTSIDE_IP6)] {
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{addr}/64"),
                "dev",
                "eth0",
                "nodad",
            ])?;
        }
        ip(&["-n", out, "route", "add", "default", "via", NODE_IP])?;
        ip(&["-6", "-n", out, "route", "add", "default", "via", NODE_IP6])?;
        Ok(())
    }

    /// A cluster's underlay: the outside namespace with a bridge, each node's `eth0` a
    /// veth whose peer (`veth-n<k>`) is a port of it, the outside's addresses on the
    /// bridge, and on every node a route to every other node's pod CIDRs via that node.
    /// Multicast snooping is off (a plain switch: neighbour solicitations are flooded
    /// whatever the MLD state), and no neighbour entry is static.
    fn create_underlay(&self) -> Result<()> {
        let out = self.outside.as_str();
        ip(&["netns", "add", out])?;
        ip(&["-n", out, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            out,
            "link",
            "add",
            UNDERLAY_BRIDGE,
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ])?;
        ip(&["-n", out, "link", "set", UNDERLAY_BRIDGE, "up"])?;
        for (k, n) in self.nodes.iter().enumerate() {
            let port = format!("veth-n{k}");
            ip(&[
                "-n",
                &n.netns,
                "link",
                "add",
                EXTERNAL_IF,
                "type",
                "veth",
                "peer",
                "name",
                &port,
                "netns",
                out,
            ])?;
            ip(&[
                "-n",
                out,
                "link",
                "set",
                &port,
                "master",
                UNDERLAY_BRIDGE,
                "up",
            ])?;
            ip(&[
                "-n",
                &n.netns,
                "addr",
                "add",
                &format!("{}/24", n.ip),
                "dev",
                EXTERNAL_IF,
            ])?;
            ip(&[
                "-n",
                &n.netns,
                "addr",
                "add",
                &format!("{}/64", n.ip6),
                "dev",
                EXTERNAL_IF,
                "nodad",
            ])?;
            ip(&["-n", &n.netns, "link", "set", EXTERNAL_IF, "up"])?;
        }
        self.wire_like_underlay()?;
        ip(&[
            "-n",
            out,
            "addr",
            "add",
            &format!("{OUTSIDE_IP}/24"),
            "dev",
            UNDERLAY_BRIDGE,
        ])?;
        ip(&[
            "-n",
            out,
            "addr",
            "add",
            &format!("{OUTSIDE_IP6}/64"),
            "dev",
            UNDERLAY_BRIDGE,
            "nodad",
        ])?;
        for (j, from) in self.nodes.iter().enumerate() {
            for (k, to) in self.nodes.iter().enumerate() {
                if j == k {
                    continue;
                }
                ip(&[
                    "-n",
                    &from.netns,
                    "route",
                    "add",
                    &format!("10.244.{k}.0/24"),
                    "via",
                    &to.ip.to_string(),
                    "dev",
                    EXTERNAL_IF,
                ])?;
                ip(&[
                    "-6",
                    "-n",
                    &from.netns,
                    "route",
                    "add",
                    &format!("{}/64", pod_cidr6(k)),
                    "via",
                    &to.ip6.to_string(),
                    "dev",
                    EXTERNAL_IF,
                ])?;
            }
        }
        Ok(())
    }

    /// Adds a pod on node 0 (also after the agent started: it must pick up the new
    /// interface).
    pub fn add_pod(&mut self, name: &str) -> Result<Pod> {
        self.add_pod_on(0, name)
    }

    /// Adds a pod on node `node` (also after its agent started).
    pub fn add_pod_on(&mut self, node: usize, name: &str) -> Result<Pod> {
        let Some(info) = self.nodes.get(node) else {
            return Err(Error::Sandbox(format!(
                "no node {node} (the sandbox has {})",
                self.nodes.len()
            )));
        };
        let (k, node) = (node, info.netns.clone());
        let idx = self.next_ip[k];
        if idx == u8::MAX {
            return Err(Error::Sandbox(format!("node {k}: no pod address left")));
        }
        self.next_ip[k] += 1;
        let ip_addr = Ipv4Addr::new(10, 244, k as u8, idx);
        let ip6 = Ipv6Addr::new(0xfd00, 0x10, 0x244, k as u16, 0, 0, 0, idx as u16);
        let netns = format!("{}-{name}", self.prefix);
        let mut host_if = format!("lxc-{name}");
        host_if.truncate(15);
        let pod_mac = format!("02:00:0a:f4:{k:02x}:{idx:02x}");
        ip(&["netns", "add", &netns])?;
        ip(&[
            "-n", &node, "link", "add", &host_if, "address", HOST_MAC, "type", "veth", "peer",
            "name", "eth0", "address", &pod_mac, "netns", &netns,
        ])?;
        let cidr = format!("{ip_addr}/32");
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        ip(&["-n", &netns, "addr", "add", &cidr, "dev", "eth0"])?;
        ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        ip(&[
            "-n", &netns, "route", "add", GATEWAY, "dev", "eth0", "scope", "link",
        ])?;
        ip(&[
            "-n", &netns, "route", "add", "default", "via", GATEWAY, "dev", "eth0",
        ])?;
        ip(&[
            "-n",
            &netns,
            "neigh",
            "replace",
            GATEWAY,
            "lladdr",
            HOST_MAC,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ])?;
        // IPv6: the pod's /128, a link-local default gateway answered by a static entry.
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{ip6}/128"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        ip(&[
            "-6", "-n", &netns, "route", "add", "default", "via", GATEWAY6, "dev", "eth0",
        ])?;
        ip(&[
            "-n",
            &netns,
            "neigh",
            "replace",
            GATEWAY6,
            "lladdr",
            HOST_MAC,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ])?;
        ip(&["-n", &node, "link", "set", &host_if, "up"])?;
        ip(&["-n", &node, "route", "add", &cidr, "dev", &host_if])?;
        ip(&[
            "-n",
            &node,
            "route",
            "add",
            &format!("{ip6}/128"),
            "dev",
            &host_if,
        ])?;
        ip(&[
            "-n",
            &node,
            "neigh",
            "replace",
            &ip6.to_string(),
            "lladdr",
            &pod_mac,
            "dev",
            &host_if,
            "nud",
            "permanent",
        ])?;
        ip(&[
            "-n",
            &node,
            "neigh",
            "replace",
            &ip_addr.to_string(),
            "lladdr",
            &pod_mac,
            "dev",
            &host_if,
            "nud",
            "permanent",
        ])?;
        let pod = Pod {
            name: name.to_string(),
            node: k,
            netns,
            ip: ip_addr,
            ip6,
            host_if,
        };
        self.pods.push(pod.clone());
        Ok(pod)
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// A command run inside a namespace.
    pub fn cmd(&self, netns: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", netns]).args(args);
        c
    }

    /// Runs a command in a namespace to completion; fails on a non-zero exit.
    pub fn exec(&self, netns: &str, args: &[&str]) -> Result<Output> {
        run(&mut self.cmd(netns, args))
    }

    /// One HTTP GET with curl from inside `netns`, on a new connection (3 s at most):
    /// the trimmed body, or curl's exit code (7: refused, 28: timed out; -1: curl could
    /// not be run).
    pub fn http_get(&self, netns: &str, url: &str) -> Result<String, i32> {
        match self
            .cmd(netns, &["curl", "-g", "-s", "--max-time", "3", url])
            .output()
        {
            Ok(o) if o.status.success() => {
                Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
            }
            Ok(o) => Err(o.status.code().unwrap_or(-1)),
            Err(_) => Err(-1),
        }
    }

    /// `n` HTTP GETs from `netns` to `url`, each on a new connection: who answered (the
    /// trimmed bodies), how often; or the first failure's curl exit code (as
    /// [`Sandbox::http_get`]).
    pub fn who_answers_http(
        &self,
        netns: &str,
        url: &str,
        n: usize,
    ) -> Result<std::collections::BTreeMap<String, usize>, i32> {
        let mut seen = std::collections::BTreeMap::new();
        for _ in 0..n {
            *seen.entry(self.http_get(netns, url)?).or_insert(0) += 1;
        }
        Ok(seen)
    }

    /// `n` UDP datagrams from `netns` to `to`, each from a new socket (see
    /// [`Sandbox::udp_ask`]): who answered, how often. Every answer must come from `to`
    /// itself (a Service's client only ever sees the Service); a missing answer or one
    /// from elsewhere is an error that says so.
    pub fn who_answers_udp(
        &self,
        netns: &str,
        to: std::net::SocketAddr,
        n: usize,
    ) -> Result<std::collections::BTreeMap<String, usize>, String> {
        let mut seen = std::collections::BTreeMap::new();
        for answer in self.udp_ask(netns, to, n).map_err(|e| e.to_string())? {
            let (from, who) = answer.map_err(|e| format!("{netns} -> {to}: {e}"))?;
            if from != to {
                return Err(format!(
                    "{netns} -> {to}: answered from {from} (by {who}), not from {to}"
                ));
            }
            *seen.entry(who).or_insert(0) += 1;
        }
        Ok(seen)
    }

    /// Starts a long-running process; it is killed when the sandbox is dropped.
    /// Its output goes to `<workdir>/<log>`.
    pub fn spawn(&self, mut cmd: Command, log: &str) -> Result<u32> {
        let path = self.workdir.join(log);
        let f = std::fs::File::create(&path)
            .map_err(|e| Error::Sandbox(format!("{}: {e}", path.display())))?;
        let f2 = f.try_clone().map_err(|e| Error::Sandbox(e.to_string()))?;
        cmd.stdin(Stdio::null()).stdout(f).stderr(f2);
        let child = cmd
            .spawn()
            .map_err(|e| Error::Sandbox(format!("{cmd:?}: {e}")))?;
        let pid = child.id();
        self.children.lock().unwrap().push(child);
        Ok(pid)
    }

    /// Sends `sig` to a spawned process and waits (up to 10 s) for it to exit.
    pub fn stop(&self, pid: u32, sig: i32) -> Result<Option<std::process::ExitStatus>> {
        let mut children = self.children.lock().unwrap();
        let Some(pos) = children.iter().position(|c| c.id() == pid) else {
            return Ok(None);
        };
        let mut child = children.remove(pos);
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pid as i32, sig) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = child
                .try_wait()
                .map_err(|e| Error::Sandbox(e.to_string()))?
            {
                return Ok(Some(st));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Ok(child.wait().ok());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Reads a log written by a spawned process.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.workdir.join(name)).unwrap_or_default()
    }

    /// Writes an nginx config answering every request with the pod's name (and
    /// `/clientip` with the address the request came from, as agnhost's netexec answers
    /// it for the upstream tests), and starts it.
    pub fn start_nginx(&self, pod: &str, port: u16) -> Result<u32> {
        let p = self.pod(pod).clone();
        let dir = self.workdir.join(format!("nginx-{pod}"));
        std::fs::create_dir_all(&dir).map_err(|e| Error::Sandbox(e.to_string()))?;
        let d = dir.display();
        let conf = format!(
            "daemon off;\nmaster_process off;\nuser root;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 8192; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
             server {{\n    listen {port};\n    listen [::]:{port};\n    location / {{ return 200 \"{pod}\\n\"; }}\n    location /clientip {{ return 200 \"$remote_addr\\n\"; }}\n  }}\n}}\n"
        );
        let path = dir.join("nginx.conf");
        std::fs::write(&path, conf).map_err(|e| Error::Sandbox(e.to_string()))?;
        let pid = self.spawn(
            self.cmd(&p.netns, &["nginx", "-c", &path.display().to_string()]),
            &format!("nginx-{pod}.log"),
        )?;
        self.wait_listening(&p.netns, port, "tcp")?;
        Ok(pid)
    }

    /// Starts a UDP server in the pod that answers every datagram with the pod's name,
    /// from the port it was sent to. (A thread with a socket in the pod's namespace:
    /// `socat UDP-RECVFROM,fork` loses datagrams that arrive while it forks.)
    /// A request `size <n>` gets a reply of `n` bytes instead (at most 65507): the name,
    /// then dots; one larger than the MTU leaves the pod in fragments.
    pub fn start_udp_echo(&self, pod: &str, port: u16) -> Result<()> {
        let p = self.pod(pod).clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = self.stop.clone();
        let name = p.name.clone();
        let handle = std::thread::spawn(move || {
            let bound = enter(&p.netns).and_then(|()| {
                // "::" takes both families (bindv6only is off in a new namespace).
                let s = std::net::UdpSocket::bind(("::", port))
                    .map_err(|e| Error::Sandbox(format!("udp {port} in {}: {e}", p.netns)))?;
                s.set_read_timeout(Some(Duration::from_millis(100)))
                    .map_err(|e| Error::Sandbox(e.to_string()))?;
                Ok(s)
            });
            let sock = match bound {
                Ok(s) => {
                    let _ = tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let reply = format!("{name}\n");
            let mut buf = [0u8; 2048];
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    let size = std::str::from_utf8(&buf[..n])
                        .ok()
                        .and_then(|r| r.strip_prefix("size "))
                        .and_then(|n| n.trim().parse::<usize>().ok());
                    let _ = match size {
                        Some(size) => {
                            let mut big = reply.clone().into_bytes();
                            big.resize(size.min(65_507), b'.');
                            sock.send_to(&big, from)
                        }
                        None => sock.send_to(reply.as_bytes(), from),
                    };
                }
            }
        });
        self.threads.lock().unwrap().push(handle);
        rx.recv()
            .map_err(|_| Error::Sandbox("udp responder thread died".into()))?
    }

    /// `n` UDP datagrams ("who?") from `netns` to `to`, each from a new socket (a new
    /// source port), each waiting up to 3 s for its answer: (the answer's source, its
    /// trimmed text), or the receive error.
    pub fn udp_ask(
        &self,
        netns: &str,
        to: std::net::SocketAddr,
        n: usize,
    ) -> Result<Vec<std::io::Result<(std::net::SocketAddr, String)>>> {
        run_in(netns, move || {
            (0..n)
                .map(|_| {
                    let any = if to.is_ipv6() {
                        std::net::SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0))
                    } else {
                        std::net::SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))
                    };
                    let s = std::net::UdpSocket::bind(any)?;
                    s.set_read_timeout(Some(Duration::from_secs(3)))?;
                    s.send_to(b"who?", to)?;
                    let mut buf = [0u8; 64];
                    let (len, from) = s.recv_from(&mut buf)?;
                    Ok((
                        from,
                        String::from_utf8_lossy(&buf[..len]).trim().to_string(),
                    ))
                })
                .collect()
        })
    }

    /// Starts an iperf3 server.
    pub fn start_iperf3(&self, pod: &str, port: u16) -> Result<u32> {
        let p = self.pod(pod).clone();
        let pid = self.spawn(
            self.cmd(&p.netns, &["iperf3", "-s", "-p", &port.to_string()]),
            &format!("iperf3-{pod}-{port}.log"),
        )?;
        self.wait_listening(&p.netns, port, "tcp")?;
        Ok(pid)
    }

    /// Waits until something listens on `port` in `netns`.
    pub fn wait_listening(&self, netns: &str, port: u16, proto: &str) -> Result<()> {
        let flag = if proto == "udp" { "-uln" } else { "-tln" };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(out) = self.cmd(netns, &["ss", flag]).output() {
                let text = String::from_utf8_lossy(&out.stdout);
                if text.lines().any(|l| {
                    l.split_whitespace()
                        .any(|w| w.ends_with(&format!(":{port}")))
                }) {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(Error::Sandbox(format!(
            "nothing listens on {proto} port {port} in {netns}"
        )))
    }

    /// Names of the interfaces the agent should attach to (the pods' host sides).
    pub fn interface_glob(&self) -> &'static str {
        "lxc-*"
    }

    /// The node's external interface (where the XDP program goes).
    pub fn external_interface(&self) -> &'static str {
        EXTERNAL_IF
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.workdir.join(name)
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        for t in std::mem::take(&mut *self.threads.lock().unwrap()) {
            let _ = t.join();
        }
        let mut children = std::mem::take(&mut *self.children.lock().unwrap());
        for c in &children {
            // SAFETY: signalling our own children.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for c in &mut children {
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        for p in &self.pods {
            let _ = Command::new("ip").args(["netns", "del", &p.netns]).status();
        }
        for ns in self.nodes.iter().map(|n| &n.netns).chain([&self.outside]) {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        clean_prefix(&format!("{}-", self.prefix));
        for n in &self.nodes {
            let _ = lb_userspace::loader::remove_pins(&n.pin_dir);
        }
        let _ = std::fs::remove_dir_all(&self.workdir);
    }
}
