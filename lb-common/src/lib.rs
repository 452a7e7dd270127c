//! Every type that crosses the kernel boundary, and nothing else.
//!
//! Rules (see ARCHITECTURE.md): `#[repr(C)]`, `Copy`, explicit `_pad` fields that are
//! always zeroed, no `bool`/`Option`/enums, and a compile-time size assertion per type.
//! Addresses and ports are stored in network byte order, exactly as they appear in the
//! packet, so the datapath never swaps bytes.
//!
//! One key type serves both address families: an address is 16 bytes ([`Addr`]), an IPv6
//! address as it is, an IPv4 address IPv4-mapped (`::ffff:a.b.c.d`, RFC 4291 2.5.5.2).
//! ARCHITECTURE.md says why (one set of maps, one algorithm) and what it costs.
#![no_std]

/// An address as the maps hold it: 16 bytes in network byte order, as four words loaded
/// from memory; IPv4 addresses IPv4-mapped (see [`ipv4_mapped`]).
pub type Addr = [u32; 4];

/// The third word of an IPv4-mapped address (`0000:ffff`), as loaded from memory.
pub const IPV4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// The IPv4-mapped form of an IPv4 address (`addr` as loaded from the packet).
#[inline(always)]
pub const fn ipv4_mapped(addr: u32) -> Addr {
    [0, 0, IPV4_MAPPED_WORD, addr]
}

/// Whether an address is IPv4-mapped (an IPv4 address); its IPv4 address is word 3.
#[inline(always)]
pub const fn is_ipv4_mapped(addr: &Addr) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == IPV4_MAPPED_WORD
}

/// IP protocol numbers used in keys.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Map names (as the kernel and `bpftool map show` print them, at most 15 bytes).
pub const MAP_FRONTENDS: &str = "LB_FRONTENDS";
pub const MAP_SLOTS: &str = "LB_SLOTS";
pub const MAP_BACKENDS: &str = "LB_BACKENDS";
pub const MAP_CONNTRACK: &str = "LB_CONNTRACK";
pub const MAP_COUNTERS: &str = "LB_COUNTERS";
pub const MAP_FRAGS: &str = "LB_FRAGS";
pub const MAP_NODE: &str = "LB_NODE";
pub const MAP_SNAT: &str = "LB_SNAT";
pub const MAP_AFFINITY: &str = "LB_AFFINITY";
pub const MAP_SOURCE_RANGES: &str = "LB_SRC_RANGES";
pub const MAP_MAGLEV: &str = "LB_MAGLEV";
/// `lb trace`'s switch (an array of one [`TraceConfig`]): the programs emit events only
/// while it says a tracer is reading.
pub const MAP_TRACE: &str = "LB_TRACE";
/// `lb trace`'s ring buffer of [`TraceEvent`]s.
pub const MAP_EVENTS: &str = "LB_EVENTS";
/// The layout version of the maps pinned beside it (an array of one [`LayoutRecord`]):
/// see [`LAYOUT_VERSION`].
pub const MAP_LAYOUT: &str = "LB_LAYOUT";
/// The socket programs' reverse translations ([`SockKey`] -> [`SockValue`]).
pub const MAP_SOCK_REV: &str = "LB_SOCK_REV";
/// The socket programs' switches (an array of one [`SockConfig`]).
pub const MAP_SOCK_CONFIG: &str = "LB_SOCK_CONFIG";
/// The (frontend, backend) pairs whose connected UDP sockets the agent is destroying
/// (`sock_kill_key` -> 1), read by its socket iterator.
pub const MAP_SOCK_KILL: &str = "LB_SOCK_KILL";
/// Per-socket storage of the connected sockets the socket programs translated
/// ([`SockConn`]).
pub const MAP_SOCK_CONN: &str = "LB_SOCK_CONN";
/// One bit per hash of a frontend address ([`frontend_filter_bit`]): set for every
/// address `LB_FRONTENDS` has a key of, so a packet to any other address (pod to pod,
/// a connect-time flow's) skips the frontend hash lookup with one array load.
pub const MAP_FE_FILTER: &str = "LB_FE_FILTER";
/// One bit per hash of every conntrack key's addresses and protocol ([`ct_filter_bit`]),
/// set by the programs before they insert the entry, and a switch ([`CT_FILTER_SWITCH`]):
/// while it is on, a packet whose bit is clear has no entry, without the conntrack
/// lookup.
pub const MAP_CT_FILTER: &str = "LB_CT_FILTER";
/// Every map, in the order above.
pub const MAP_NAMES: [&str; 20] = [
    MAP_FRONTENDS,
    MAP_SLOTS,
    MAP_BACKENDS,
    MAP_CONNTRACK,
    MAP_COUNTERS,
    MAP_FRAGS,
    MAP_NODE,
    MAP_SNAT,
    MAP_AFFINITY,
    MAP_SOURCE_RANGES,
    MAP_MAGLEV,
    MAP_TRACE,
    MAP_EVENTS,
    MAP_LAYOUT,
    MAP_SOCK_REV,
    MAP_SOCK_CONFIG,
    MAP_SOCK_KILL,
    MAP_SOCK_CONN,
    MAP_FE_FILTER,
    MAP_CT_FILTER,
];

/// The layout of the pinned maps: bump it whenever the meaning or the size of an
/// existing map's key or value changes (a field added, moved or read otherwise, a map's
/// type), and teach `lb_userspace::upgrade` the old layout and how to convert it (or
/// that it cannot). Not for a new map (an agent creates the maps it does not find
/// pinned) nor for a counter appended to `counter::*` (`LB_COUNTERS` of another length is
/// copied index by index). An agent that finds pins of another version migrates them
/// or refuses to start, never misreads them (ARCHITECTURE.md, "Upgrades").
/// 1: before Maglev (`Frontend` of 16 bytes; no `LB_MAGLEV`, `LB_TRACE`, `LB_EVENTS`),
/// pinned without a record; 2: `Frontend` with its Maglev table (24 bytes).
pub const LAYOUT_VERSION: u32 = 2;

/// The one value of `LB_LAYOUT` (index 0), written by the agent once the maps beside it
/// are of [`LAYOUT_VERSION`] (0: not written yet). This type never changes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LayoutRecord {
    pub version: u32,
    pub _pad: u32,
}

/// Program names.
/// tc ingress on the host side of each pod's veth (and behind XDP on the external
/// interfaces): packets toward frontends, and both directions of the flows the program
/// sends on itself (SNAT and hairpin flows).
pub const PROG_TC_POD: &str = "lb_tc_pod";
/// XDP on the node's external interfaces: NodePort, external and LoadBalancer IPs from
/// outside.
pub const PROG_XDP_EXT: &str = "lb_xdp_ext";
/// tc egress on the pods' veths and the external interfaces: the replies of translated
/// flows get the frontend back as their source where they leave the node's stack.
pub const PROG_TC_EGRESS: &str = "lb_tc_egress";
/// Tail-called by `lb_xdp_ext` (`LB_XDP_PROGS[XDP_PROG_CARRY]`): the XDP fast path of
/// SNAT flows.
pub const PROG_XDP_CARRY: &str = "lb_xdp_carry";
/// Every program, in the order above.
pub const PROG_NAMES: [&str; 4] = [PROG_TC_POD, PROG_XDP_EXT, PROG_TC_EGRESS, PROG_XDP_CARRY];

/// The socket programs (cgroup `sock_addr`, attached to the cgroup of `--cgroup`): a
/// connect() or an unconnected UDP send to a frontend goes to a backend; a UDP
/// datagram's source and getpeername() give the frontend back.
pub const PROG_SOCK_CONNECT4: &str = "lb_sock_conn4";
pub const PROG_SOCK_CONNECT6: &str = "lb_sock_conn6";
pub const PROG_SOCK_SENDMSG4: &str = "lb_sock_send4";
pub const PROG_SOCK_SENDMSG6: &str = "lb_sock_send6";
pub const PROG_SOCK_RECVMSG4: &str = "lb_sock_recv4";
pub const PROG_SOCK_RECVMSG6: &str = "lb_sock_recv6";
pub const PROG_SOCK_GETPEERNAME4: &str = "lb_sock_peer4";
pub const PROG_SOCK_GETPEERNAME6: &str = "lb_sock_peer6";
/// Every socket program, in the order above.
pub const SOCK_PROG_NAMES: [&str; 8] = [
    PROG_SOCK_CONNECT4,
    PROG_SOCK_CONNECT6,
    PROG_SOCK_SENDMSG4,
    PROG_SOCK_SENDMSG6,
    PROG_SOCK_RECVMSG4,
    PROG_SOCK_RECVMSG6,
    PROG_SOCK_GETPEERNAME4,
    PROG_SOCK_GETPEERNAME6,
];

/// The program array the XDP program tail-calls (not pinned: made with each load).
pub const MAP_XDP_PROGS: &str = "LB_XDP_PROGS";
/// Index of `lb_xdp_carry` in `LB_XDP_PROGS`.
pub const XDP_PROG_CARRY: u32 = 0;

/// Default map sizes (overridable at load time).
pub const DEFAULT_MAX_FRONTENDS: u32 = 65_536;
pub const DEFAULT_MAX_BACKENDS: u32 = 262_144;
/// One slot per (frontend, ready backend) pair.
pub const DEFAULT_MAX_SLOTS: u32 = 262_144;
pub const DEFAULT_MAX_CONNTRACK: u32 = 524_288;
/// Fragmented datagrams being translated at once (a fixed size: an entry is needed only
/// while its datagram's fragments pass, so the LRU recycles them quickly).
pub const DEFAULT_MAX_FRAGS: u32 = 8_192;
/// loadBalancerSourceRanges entries, one per (LoadBalancer IP frontend, range).
pub const DEFAULT_MAX_SOURCE_RANGES: u32 = 16_384;
/// Cells of `LB_MAGLEV`, shared by every frontend's Maglev table (a table has a prime
/// number of cells, about 40 per backend, at least 127): 8 bytes each, 32 MiB.
pub const DEFAULT_MAX_MAGLEV_CELLS: u32 = 4_194_304;
/// Entries of `LB_SOCK_REV`: one per (unconnected UDP socket, backend) the socket
/// programs sent to (an LRU: closed sockets' entries are recycled).
pub const DEFAULT_MAX_SOCK_REV: u32 = 262_144;
/// Entries of `LB_SOCK_KILL`: (frontend, backend) pairs in one pass of the agent's
/// iterator.
pub const SOCK_KILL_BATCH: u32 = 4_096;

/// Words (`u64`) of `LB_FE_FILTER`: 262,144 bits, 32 KiB. At 10,000 Services (their
/// ClusterIPs, and the node's addresses for NodePorts) about 4 % of the bits are set,
/// so about one packet in 25 to another address still makes the frontend lookup (and
/// misses); the map is small enough to stay in cache.
pub const FRONTEND_FILTER_WORDS: u32 = 4_096;

/// Words (`u64`) of `LB_CT_FILTER`'s bits: 1,048,576 bits, 128 KiB. A bit stands for a
/// pair of addresses (and a protocol), so with the entries of n distinct pairs about n
/// bits are set, and a packet of no tracked flow still makes the lookup (and misses)
/// with a chance of about n / 1,048,576: 1 % at 10,000 pairs. Bits of entries that went
/// stay set until the collector rebuilds the filter.
pub const CT_FILTER_WORDS: u32 = 16_384;
/// The index of `LB_CT_FILTER`'s switch, after the bits: [`CT_FILTER_ON`] while the
/// bits cover every entry (the programs trust a clear bit), anything else while the
/// agent (re)builds them (the programs then look every packet up, as without a filter).
pub const CT_FILTER_SWITCH: u32 = CT_FILTER_WORDS;
/// The switch's value that turns the filter on.
pub const CT_FILTER_ON: u64 = 1;
/// `BPF_F_MMAPABLE`: `LB_CT_FILTER` is mapped into the agent's memory, which sets bits
/// with atomic ORs beside the programs' (a map update would overwrite a word whole and
/// could drop a bit a program set meanwhile).
pub const CT_FILTER_MAP_FLAGS: usize = 1 << 10;

/// murmur3's 32-bit finaliser: every input bit spreads over the output (the datapath's
/// flow hash and the frontend filter's bit).
#[inline(always)]
pub fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

/// Where `addr` is in `LB_FE_FILTER`: (word index, bit mask). The words of the address
/// folded into one (an IPv4-mapped address: its IPv4 address and a constant), then
/// [`fmix32`], the low 18 bits of which pick the bit.
#[inline(always)]
pub fn frontend_filter_bit(addr: &Addr) -> (u32, u64) {
    let h = fmix32(fold_addr(addr));
    let bit = h % (FRONTEND_FILTER_WORDS * 64);
    (bit / 64, 1u64 << (bit % 64))
}

/// The four words of an address folded into one (an IPv4-mapped address gives its IPv4
/// address and a constant).
#[inline(always)]
pub fn fold_addr(a: &Addr) -> u32 {
    a[0] ^ a[1] ^ a[2] ^ a[3]
}

/// The hash of a 5-tuple as it arrives (ports in network byte order): the flow hash
/// the datapath picks backends and SNAT ports by, and the conntrack filter's bit.
#[inline(always)]
pub fn tuple_hash(src: &Addr, dst: &Addr, sport: u16, dport: u16, proto: u8) -> u32 {
    fmix32(
        fold_addr(src)
            ^ fold_addr(dst).rotate_left(16)
            ^ (((sport as u32) << 16) | dport as u32)
            ^ ((proto as u32) << 8),
    )
}

/// Where `key` is in `LB_CT_FILTER`: (word index, bit mask), the low 20 bits of the
/// [`tuple_hash`] of its addresses and protocol, without its ports. The packets between
/// two pods (or a client and a node) all read one word, which stays in cache; with the
/// ports in the hash each new connection read a word of its own, a cache miss as costly
/// as the lookup it spared (the connect-time bench: 163 ns a run of the tc program
/// either way, 121 to 145 ns with this bit).
#[inline(always)]
pub fn ct_filter_bit(key: &CtKey) -> (u32, u64) {
    let h = tuple_hash(&key.src_addr, &key.dst_addr, 0, 0, key.proto);
    let bit = h % (CT_FILTER_WORDS * 64);
    (bit / 64, 1u64 << (bit % 64))
}

/// A Service frontend: its address (ClusterIP, node address of a NodePort, external or
/// LoadBalancer IP) + port + protocol, and the view it is seen from. Key of
/// `LB_FRONTENDS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendKey {
    /// The frontend's address (IPv4-mapped for IPv4).
    pub addr: Addr,
    /// L4 port, network byte order.
    pub port: u16,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    /// `SCOPE_OUTSIDE` (0): the frontend as the packet path and every client sees it;
    /// `SCOPE_INSIDE` (1): the same frontend as the node's own sockets and its pods'
    /// see it, where that differs (externalTrafficPolicy Local: the cluster-wide
    /// endpoints). Only the socket programs look scope 1 up.
    pub scope: u8,
}

/// `FrontendKey::scope`: the frontend as seen from outside the node (and by the packet
/// path, which never looks up another scope).
pub const SCOPE_OUTSIDE: u8 = 0;
/// `FrontendKey::scope`: the frontend as seen from inside the node (the node's own
/// sockets and its pods'), present only where it differs from the `SCOPE_OUTSIDE` entry
/// of the same address, port and protocol: an externalTrafficPolicy Local frontend
/// (`FRONTEND_F_LOCAL`) whose cluster-wide endpoints are not its local ones. kube-proxy
/// sends the node's own and its pods' traffic to such a frontend to every endpoint.
pub const SCOPE_INSIDE: u8 = 1;

/// Value of `LB_FRONTENDS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frontend {
    /// Identifies this frontend's backend slots in `LB_SLOTS` and its conntrack entries.
    pub service_id: u32,
    /// Number of ready backends: slots `1..=count` of `LB_SLOTS` are valid.
    /// 0 means "no ready backend": the datapath refuses the connection.
    pub count: u32,
    /// `FRONTEND_F_*`: what kind of frontend this is (the datapath source-NATs a flow
    /// from outside, any kind but a ClusterIP, to a remote backend), and
    /// `FRONTEND_F_LOCAL`.
    pub flags: u32,
    /// sessionAffinity ClientIP: how long (seconds) a client's new connections go to
    /// the backend its last one went to (`LB_AFFINITY`); 0: no affinity.
    pub affinity_timeout_s: u32,
    /// The frontend's Maglev table: cells `table_base..table_base + table_size` of
    /// `LB_MAGLEV`; a new flow goes to cell `table_base + hash % table_size`.
    /// `table_size` 0: no table (one backend, or no room), the flow goes to slot
    /// `hash % count + 1`.
    pub table_base: u32,
    pub table_size: u32,
}

/// A cell of `LB_MAGLEV` (an array shared by every frontend's table): the backend a
/// hash lands on, and the slot of the frontend that holds it (which session affinity
/// records). `slot` 0: an unused cell.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MaglevCell {
    pub backend_id: u32,
    pub slot: u32,
}

/// Key of `LB_AFFINITY` (an LRU hash): a client address and a frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub client: Addr,
    pub service_id: u32,
    pub _pad: u32,
}

/// Value of `LB_AFFINITY`: the backend the client's last new connection to the frontend
/// went to, in which slot, and when. Used while younger than the frontend's timeout and
/// while that slot still holds that backend (a backend that left the ready set, or
/// moved, ends the affinity).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AffinityValue {
    pub last_seen_ns: u64,
    pub backend_id: u32,
    pub slot: u32,
}

/// `Frontend::flags`: a ClusterIP frontend has none of these bits.
pub const FRONTEND_F_NODEPORT: u32 = 1 << 0;
pub const FRONTEND_F_EXTERNAL_IP: u32 = 1 << 1;
pub const FRONTEND_F_LOADBALANCER: u32 = 1 << 2;
/// The kind bits: any of them means the frontend is reached from outside.
pub const FRONTEND_F_KINDS: u32 =
    FRONTEND_F_NODEPORT | FRONTEND_F_EXTERNAL_IP | FRONTEND_F_LOADBALANCER;
/// `Frontend::flags`: externalTrafficPolicy Local. Served by this node's endpoints only
/// (userspace lists no other); with none, a new connection is dropped (as kube-proxy
/// does), not refused.
pub const FRONTEND_F_LOCAL: u32 = 1 << 3;
/// `Frontend::flags`: a LoadBalancer IP with `loadBalancerSourceRanges`: a new flow is
/// served only if its source is in one of the frontend's ranges (`LB_SRC_RANGES`), and
/// dropped otherwise.
pub const FRONTEND_F_SOURCE_RANGES: u32 = 1 << 4;
/// `Frontend::flags`: served to the node's own sockets only (127.0.0.1:NodePort, as
/// kube-proxy's iptables mode serves it): the socket programs pass a pod's call on
/// untouched (its 127.0.0.1 is its own), and the packet path ignores the frontend.
pub const FRONTEND_F_HOST_ONLY: u32 = 1 << 5;

/// The data of a key of `LB_SRC_RANGES` (an LPM trie; the key is this behind a `u32`
/// prefix length in bits, which covers `service_id`, 32 bits, and then the range's
/// prefix of `addr`, IPv4 ranges IPv4-mapped: 96 + the IPv4 prefix length). A lookup is
/// the frontend's id and the packet's source with all 160 bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRange {
    /// The frontend's `service_id` (its 32 bits are the first the prefix covers, always
    /// all of them, so its byte order does not matter).
    pub service_id: u32,
    pub addr: Addr,
}

/// Value of `LB_SRC_RANGES`: the range allows its sources (any value; the entry's
/// presence is what matters, a non-zero size is what the kernel needs).
pub const SOURCE_RANGE_ALLOW: u32 = 1;

/// Key of `LB_SLOTS`: the `slot`-th ready backend of a frontend (1-based).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotKey {
    pub service_id: u32,
    pub slot: u32,
}

/// Value of `LB_SLOTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    pub backend_id: u32,
}

/// Value of `LB_BACKENDS`, an array indexed by backend id (ids start at 1; an unused id
/// holds zeroes). A backend stays in this map as long
/// as any Service lists it, ready or not, so established connections to a backend that
/// turned not-ready keep working; only `LB_SLOTS` decides who gets new connections.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    /// The backend's address (IPv4-mapped for IPv4); all zeroes: an unused id.
    pub addr: Addr,
    /// L4 port, network byte order.
    pub port: u16,
    pub proto: u8,
    /// `BACKEND_F_*` bits.
    pub flags: u8,
}

/// `Backend::flags`: the backend runs on another node. A flow from outside (a NodePort,
/// external or LoadBalancer IP, externalTrafficPolicy Cluster) sent to it gets this
/// node's address as its source (SNAT), so that the reply comes back through this node
/// to be translated back. A ClusterIP flow keeps its source: the client is a pod, whose
/// address routes back to this node.
pub const BACKEND_F_REMOTE: u8 = 1 << 0;

/// Default range of the source ports of SNAT flows (`NodeConfig`): above Linux's default
/// ephemeral range (32768-60999, `net.ipv4.ip_local_port_range`) and the NodePort range
/// (30000-32767), so they do not meet the node's own sockets.
pub const DEFAULT_SNAT_PORT_MIN: u16 = 61_000;
pub const DEFAULT_SNAT_PORT_MAX: u16 = 65_535;

/// The one value of `LB_NODE` (an array of one, index 0): what the datapath needs to
/// know about this node. Written by userspace from the node's addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    /// The IPv4 source of SNAT flows (IPv4-mapped; this node's first IPv4 address), all
    /// zeroes: none (IPv4 flows are then never sent to remote backends).
    pub snat_v4: Addr,
    /// The IPv6 source of SNAT flows; all zeroes: none.
    pub snat_v6: Addr,
    /// SNAT source ports, host byte order, inclusive; min 0: SNAT off.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    pub _pad: u32,
}

/// Conntrack direction of an entry (`CtValue::dir`).
/// A forward entry is keyed by the client's packet as sent (client -> frontend).
pub const CT_DIR_FORWARD: u8 = 0;
/// A reply entry is keyed by the backend's reply as sent (backend -> client).
pub const CT_DIR_REPLY: u8 = 1;

/// Key of `LB_CONNTRACK` (an LRU hash): a packet's 5-tuple as it arrives. Forward and
/// reply entries share the key space (a client's packet names a frontend, a reply names
/// a backend), so one lookup tells a packet of a known flow and its direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub src_addr: Addr,
    pub dst_addr: Addr,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// Conntrack states of an entry, from the packets of its own direction (the TCP flags
/// seen so far are kept in `tcp_flags`). The flow's state, and so its timeout, comes
/// from both of its entries (`lb_userspace::dataplane::gc`).
/// Created; TCP: no ACK seen yet in this direction; UDP: nothing seen this way yet.
pub const CT_STATE_NEW: u8 = 0;
/// TCP: an ACK seen (the handshake went on); UDP: a reply entry that met a reply.
pub const CT_STATE_ESTABLISHED: u8 = 1;
/// TCP: a FIN seen in this direction.
pub const CT_STATE_CLOSING: u8 = 2;
/// TCP: a RST seen in this direction.
pub const CT_STATE_CLOSED: u8 = 3;

/// Value of `LB_CONNTRACK`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtValue {
    /// `bpf_ktime_get_coarse_ns()` (CLOCK_MONOTONIC) of the last packet that refreshed
    /// the entry (refreshed at most once a second per entry to keep cache lines quiet).
    pub last_seen_ns: u64,
    /// When the entry was made (same clock): its age, for `lb show`.
    pub created_ns: u64,
    /// Forward entry: the backend's address (the new destination); reply entry: the
    /// frontend's address (the new source).
    pub nat_addr: Addr,
    /// Forward entry: the backend's port; reply entry: the frontend's port.
    pub nat_port: u16,
    /// `CT_STATE_*`.
    pub state: u8,
    /// Union of the TCP flags seen in this direction.
    pub tcp_flags: u8,
    /// Backend chosen for this flow (forward entry), checked on every packet so a deleted
    /// backend makes the flow pick a new one.
    pub backend_id: u32,
    /// Frontend's `service_id` when the entry was made.
    pub service_id: u32,
    /// `CT_F_*`.
    pub flags: u8,
    /// `CT_DIR_FORWARD` or `CT_DIR_REPLY`.
    pub dir: u8,
    pub _pad: [u8; 2],
}

/// Value of `LB_SNAT` (an LRU hash keyed like conntrack, `CtKey`), for the entries of a
/// SNAT flow (`CT_F_SNAT`): the other side of the translation. Forward key: the new
/// source (this node's address and the allocated port); reply key: the new destination
/// (the client). Kept apart from `CtValue` so that every other flow's entry stays 40
/// bytes and the common path does not carry it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnatPeer {
    pub addr: Addr,
    /// Network byte order.
    pub port: u16,
    pub _pad: [u8; 6],
}

/// `CtValue::flags`: the flow came to a frontend reached from outside the cluster (a
/// NodePort, external or LoadBalancer IP), not a ClusterIP. (Its replies are
/// reverse-translated where they leave, like any other: the node's stack routed them
/// with the backend's address, so the node's own address as their new source is no
/// martian to it.)
pub const CT_F_EXTERNAL: u8 = 1 << 0;
/// `CtValue::flags`: the flow's source is translated too (SNAT to this node's address,
/// toward a backend on another node; or a hairpin flow, `CT_F_HAIRPIN`): `LB_SNAT`
/// holds the other side of the translation under the same key. Its packets are
/// translated where they enter and sent on by the program itself in both directions
/// (their source is this node's own address, or the frontend's), so the node's stack
/// never sees them.
pub const CT_F_SNAT: u8 = 1 << 1;
/// `CtValue::flags` (with `CT_F_SNAT`): a hairpin flow, a pod reaching itself through a
/// Service. Its source becomes the frontend's address (with the client's own port), so
/// the pod sees a peer other than itself, and both directions are sent back out of the
/// pod's veth by the program, never through the node's stack.
pub const CT_F_HAIRPIN: u8 = 1 << 2;

/// Key of `LB_FRAGS` (an LRU hash): the identity of a datagram's fragments, as they
/// arrive (RFC 791 and RFC 8200: source, destination, identification, protocol). Every
/// fragment of a datagram carries it, also those after the first, which have no L4
/// header.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub src_addr: Addr,
    pub dst_addr: Addr,
    /// The identification: IPv4's 16 bits (in the low-addressed half) or the IPv6
    /// fragment header's 32, network byte order.
    pub id: u32,
    /// The transport protocol (IPv6: the fragment header's next header).
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// `FragValue::field`: the fragments' source address is rewritten (a reply).
pub const FRAG_REWRITE_SRC: u8 = 1;
/// `FragValue::field`: the fragments' destination address is rewritten (a datagram to a
/// frontend, at ingress).
pub const FRAG_REWRITE_DST: u8 = 2;

/// Value of `LB_FRAGS`: how the first fragment was translated, to apply to the later
/// ones (an address only: their L4 header, and with it the ports and the L4 checksum,
/// is in the first fragment).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FragValue {
    /// `bpf_ktime_get_coarse_ns()` when the first fragment was translated: the datapath
    /// ignores an entry older than a reassembly timeout (its datagram is gone, and its key
    /// may come again on another datagram).
    pub created_ns: u64,
    /// The new address.
    pub addr: Addr,
    /// `FRAG_REWRITE_SRC` or `FRAG_REWRITE_DST`.
    pub field: u8,
    /// The conntrack entry's `CT_F_*` flags (`CT_F_EXTERNAL`: routed like the first).
    pub flags: u8,
    pub _pad: [u8; 6],
}

/// Size of `LB_EVENTS` in bytes (a power of two, a multiple of the page size): 3,640
/// events of 64 bytes (each with the ring buffer's 8-byte header) wait there for the
/// tracer; when it is full, an event is lost and counted (`counter::TRACE_LOST`).
pub const EVENTS_RING_BYTES: u32 = 256 * 1024;

/// The most `lb trace` processes `TraceConfig` has room for at once.
pub const MAX_TRACERS: usize = 14;

/// The one value of `LB_TRACE` (an array of one, index 0): whether the programs emit
/// [`TraceEvent`]s, and who asked. Written by `lb trace` only (under a lock of the pin
/// folder), read by the programs at each decision they would report: one array lookup
/// and one branch when nobody traces.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceConfig {
    /// Non-zero: emit events. The number of tracers in `tracers`.
    pub enabled: u32,
    pub _pad: u32,
    /// The process ids of the `lb trace` processes reading the events (0: a free place).
    /// A tracer killed before it could take itself out is found dead (no such process) and
    /// removed by the next tracer that starts or stops.
    pub tracers: [u32; MAX_TRACERS],
}

/// `TraceEvent::reason` of nothing to report (not written to the ring buffer's
/// readers: `lb trace` skips it): XDP left a new SNAT flow to the tc program behind it,
/// which reports it.
pub const TRACE_NOTHING: u32 = u32::MAX;

/// `TraceEvent::hook`: the tc ingress program (pods' veths, and behind XDP).
pub const TRACE_HOOK_TC: u8 = 1;
/// `TraceEvent::hook`: the XDP program of the external interfaces.
pub const TRACE_HOOK_XDP: u8 = 2;

/// `TraceEvent::flags`: the flow is source-NATed too (toward another node's backend).
pub const TRACE_F_SNAT: u8 = 1 << 0;
/// `TraceEvent::flags`: a hairpin flow (a pod reaching itself through a Service).
pub const TRACE_F_HAIRPIN: u8 = 1 << 1;
/// `TraceEvent::flags`: a known flow's packet (its backend came from its conntrack
/// entry), not a new flow.
pub const TRACE_F_KNOWN: u8 = 1 << 2;

/// One event of `LB_EVENTS`, `lb trace`'s line: a decision about a packet to a frontend
/// (a new flow and its backend, a refusal, a drop), as the datapath took it. Addresses
/// and ports as in the packet (network byte order; IPv4 mapped), before translation.
/// The programs write what they hold and nothing they would have to compute (every
/// branch costs verification in every state that reaches it): `lb trace` reads the
/// kind of event from the reason, the backend's address from `LB_BACKENDS`, and how it
/// was chosen from the frontend (the hash, or under sessionAffinity the client's
/// record, or the hash's choice then recorded).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceEvent {
    /// `bpf_ktime_get_coarse_ns()` (CLOCK_MONOTONIC).
    pub ts_ns: u64,
    /// The packet's source (the client).
    pub client: Addr,
    /// The packet's destination (the frontend).
    pub frontend: Addr,
    pub client_port: u16,
    pub frontend_port: u16,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    /// A TCP packet's flags (a flow started without SYN: its entries were gone,
    /// `ct_recreated`).
    pub tcp_flags: u8,
    /// `TRACE_HOOK_*`: the program that decided.
    pub hook: u8,
    /// `TRACE_F_*`.
    pub flags: u8,
    /// Why: the index of the counter the packet path incremented for this decision
    /// (`counter::*`: `new_flow`, `refused_no_backend`, `drop_source_range`, ...), one
    /// vocabulary with `lb show counters`; `TRACE_NOTHING`: none to report.
    pub reason: u32,
    /// The frontend's `service_id` (of the flow's entry, for a known flow's packet).
    pub service_id: u32,
    /// The chosen backend's id in `LB_BACKENDS` (0: none).
    pub backend_id: u32,
    pub _pad: u32,
}

/// Key of `LB_SOCK_REV` (an LRU hash): an unconnected UDP socket (its cookie,
/// `bpf_get_socket_cookie`) and a backend the socket programs sent one of its datagrams
/// to, as the socket sees it (the address of its family: IPv4-mapped for IPv4).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub cookie: u64,
    pub backend: Addr,
    /// Network byte order.
    pub backend_port: u16,
    /// `PROTO_UDP`.
    pub proto: u8,
    pub _pad: [u8; 5],
}

/// Value of `LB_SOCK_REV`: the frontend the socket sent to, which a datagram from the
/// backend (recvmsg) reports instead of the backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockValue {
    pub frontend: Addr,
    /// Network byte order.
    pub frontend_port: u16,
    pub _pad: u16,
    /// The backend's id in `LB_BACKENDS` when it was chosen.
    pub backend_id: u32,
    /// The frontend's `service_id`.
    pub service_id: u32,
    pub _pad2: u32,
}

/// Value of `LB_SOCK_CONN` (socket storage: one per socket, freed with it): what a
/// socket's connect() was translated from and to. getpeername() and a connected UDP
/// socket's datagrams report the frontend; the agent's socket iterator reads
/// `service_id` and `backend_id` to destroy the UDP sockets of a backend that left.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockConn {
    pub frontend: Addr,
    pub backend: Addr,
    /// Network byte order.
    pub frontend_port: u16,
    pub backend_port: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
    /// At byte 40 (the socket iterator loads it there).
    pub service_id: u32,
    /// At byte 44.
    pub backend_id: u32,
}

/// The key of `LB_SOCK_KILL` for a frontend and a backend that left it: the pair as one
/// `u64`, as the socket iterator builds it from a `SockConn`.
pub const fn sock_kill_key(service_id: u32, backend_id: u32) -> u64 {
    ((service_id as u64) << 32) | backend_id as u64
}

/// The one value of `LB_SOCK_CONFIG` (index 0), written by the agent before it attaches
/// the socket programs. All zeroes: the programs translate nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockConfig {
    /// The network namespace of the node (the agent's), `bpf_get_netns_cookie`: its
    /// sockets (host-network clients) are always translated.
    pub host_netns_cookie: u64,
    /// `SOCK_CFG_F_*`.
    pub flags: u32,
    pub _pad: u32,
}

/// `SockConfig::flags`: sockets of other network namespaces (pods) are translated too
/// (`--connect-time-balancing`); without it their packets take the tc path.
pub const SOCK_CFG_F_PODS: u32 = 1 << 0;
/// `SockConfig::flags`: the agent can destroy sockets (`bpf_sock_destroy`, Linux 6.5):
/// a pod's connected UDP socket is translated at connect() too. Without it, a pod's
/// connected UDP takes the tc path, whose flows move when their backend leaves.
pub const SOCK_CFG_F_DESTROY: u32 = 1 << 1;
/// `SockConfig::flags`: the pods' veths carry no tc program (connect-time balancing
/// covers every pod flow, `lb_userspace::podpath`), so a pod's socket to a frontend with
/// loadBalancerSourceRanges, which the packet path would check, is refused (EPERM)
/// rather than left to a path that is not there. Cleared once the agent has attached
/// the pods' programs, which it does as soon as such a frontend exists.
pub const SOCK_CFG_F_NO_POD_PATH: u32 = 1 << 2;

/// Indexes of the per-CPU `LB_COUNTERS` array.
pub mod counter {
    /// A new flow to a frontend got a backend and was translated.
    pub const NEW_FLOW: u32 = 0;
    /// A packet of a known flow was translated to its backend.
    pub const TRANSLATED: u32 = 1;
    /// A reply was reverse-translated to the frontend's address.
    pub const REVERSE_TRANSLATED: u32 = 2;
    /// A packet not for the dataplane passed untouched.
    pub const PASSED: u32 = 3;
    /// A connection to a frontend without a ready backend was refused (TCP RST / ICMP).
    pub const REFUSED_NO_BACKEND: u32 = 4;
    /// A packet whose IP header (IPv6: or extension headers) or L4 header is malformed
    /// or truncated (by the frame or by the IP packet's own length), whose lengths
    /// disagree (an IP length past the frame, a TCP data offset or a UDP length past the
    /// IP packet), or an IPv6 UDP datagram with a checksum of 0, was passed untouched:
    /// it matches no frontend and is never rewritten.
    pub const PASSED_MALFORMED: u32 = 5;
    /// A non-first IP fragment was passed untouched: no first fragment of its datagram
    /// was translated (or not yet: it came first).
    pub const PASSED_FRAGMENT: u32 = 6;
    /// The first fragment of a fragmented datagram to a frontend, of a flow the program
    /// carries itself (SNAT toward another node, hairpin), was dropped: its later
    /// fragments would need both addresses and a route, which the notes do not hold.
    pub const DROP_FRAGMENT: u32 = 7;
    /// A packet to a frontend without a ready backend that we do not answer (a TCP RST,
    /// or a UDP datagram with IPv4 options or IPv6 extension headers, which we do not
    /// echo in an ICMP error).
    pub const DROP_NO_BACKEND: u32 = 8;
    /// A conntrack entry could not be created.
    pub const DROP_CT_FULL: u32 = 9;
    /// A packet could not be rewritten (a helper failed).
    pub const DROP_REWRITE_FAILED: u32 = 10;
    /// A known flow's backend was deleted; a new backend was picked.
    pub const BACKEND_RESELECTED: u32 = 11;
    /// XDP: a new connection to a frontend without a ready backend was handed to the
    /// kernel, which answers it as a closed port (TCP RST / ICMP port unreachable).
    pub const PASSED_NO_BACKEND: u32 = 12;
    /// A fragment after the first, of a datagram whose first fragment was
    /// reverse-translated, got the same source address (`LB_FRAGS`).
    pub const REVERSE_TRANSLATED_FRAGMENT: u32 = 13;
    /// An IPv6 packet whose extension-header chain is longer than the datapath walks (6
    /// headers) was passed untouched: its transport header was not reached.
    pub const PASSED_LONG_EXT_CHAIN: u32 = 14;
    /// A new flow from outside to a backend on another node could not be given a source
    /// port: every port of the node's SNAT range is taken toward that backend (or this
    /// node has no address of the packet's family). Dropped.
    pub const DROP_SNAT_EXHAUSTED: u32 = 15;
    /// XDP: a packet of a flow the program carries itself was handed on untranslated to
    /// the tc program behind XDP on the same interface, which translates it and sends it
    /// on: a new SNAT flow (from outside to another node's backend), or a packet of one
    /// whose next hop has no neighbour entry yet (or no route from XDP's view).
    pub const PASSED_TO_TC: u32 = 16;
    /// A backend's reply passed on untouched where it entered the node (tc ingress,
    /// XDP): it is reverse-translated where it leaves (tc egress), after the node's
    /// stack (routing, netfilter) has seen it as it was sent.
    pub const PASSED_REPLY: u32 = 17;
    /// A new flow to a LoadBalancer IP from a source outside its
    /// `loadBalancerSourceRanges` was dropped.
    pub const DROP_SOURCE_RANGE: u32 = 18;
    /// A new hairpin flow (a pod reaching itself through a Service): translated both
    /// ways and sent back to the pod (also counted `new_flow`).
    pub const NEW_HAIRPIN: u32 = 19;
    /// tc egress: a packet that is no reply of a translated flow left untouched.
    pub const EGRESS_PASSED: u32 = 20;
    /// A packet of a flow the program carries itself (SNAT) was dropped: no route to
    /// where it goes (or one whose MTU it exceeds), or its TTL / hop limit would reach 0.
    pub const DROP_NO_ROUTE: u32 = 21;
    /// XDP sent a SNAT flow's packet on itself, translated (the fast path: `XDP_TX`),
    /// with the MACs of its next hop.
    pub const XDP_SENT: u32 = 22;
    /// A TCP packet of a flow under way (no SYN) came to a frontend without a conntrack
    /// entry: its entries were evicted (the table was full) or expired while it was idle.
    /// It got a backend again (the same one while the backend set is unchanged) and new
    /// entries (also counted `new_flow`).
    pub const CT_RECREATED: u32 = 23;
    /// tc egress: an ICMP error about a client's packet after DNAT (fragmentation
    /// needed, unreachable, time exceeded) got the frontend back in the packet it quotes
    /// (and as its own source, when the backend sent it).
    pub const REVERSE_TRANSLATED_ICMP: u32 = 24;
    /// Ingress: an ICMP error about a backend's reply after reverse NAT got the backend
    /// back in the packet it quotes (and as its destination, when it went to the
    /// frontend's address).
    pub const TRANSLATED_ICMP: u32 = 25;
    /// Ingress: a non-first fragment of a datagram to a frontend got the backend its
    /// first fragment was DNATed to (a note in `LB_FRAGS`).
    pub const TRANSLATED_FRAGMENT: u32 = 26;
    /// `lb trace`: an event was lost, its ring buffer (`LB_EVENTS`) full (the tracer reads
    /// slower than the programs decide).
    pub const TRACE_LOST: u32 = 27;
    /// Socket programs: a connect() to a frontend was given a backend instead.
    pub const SOCK_CONNECT_TRANSLATED: u32 = 28;
    /// Socket programs: an unconnected UDP datagram to a frontend was sent to a backend.
    pub const SOCK_SENDMSG_TRANSLATED: u32 = 29;
    /// Socket programs: a UDP datagram's source (recvmsg) or getpeername() was given
    /// the frontend back.
    pub const SOCK_REVERSE_TRANSLATED: u32 = 30;
    /// Socket programs: a connect() or a UDP send to a frontend without a ready backend
    /// was refused (ECONNREFUSED).
    pub const SOCK_REFUSED_NO_BACKEND: u32 = 31;
    /// Socket programs: a connect() or send to a frontend was left to the packet path
    /// (a pod's socket with connect-time balancing off, a pod's connected UDP without
    /// socket destruction, a pod's to a LoadBalancer IP with source ranges).
    pub const SOCK_LEFT_TO_PACKET_PATH: u32 = 32;
    /// The agent's socket iterator destroyed a connected UDP socket whose backend left
    /// its frontend (`bpf_sock_destroy`): the client's next call fails and it reconnects.
    pub const SOCK_DESTROYED: u32 = 33;
    /// Socket programs: a connect() or send of the node's own to a LoadBalancer IP with
    /// loadBalancerSourceRanges that hold none of the node's address of its family was
    /// refused (EPERM), as kube-proxy drops it; or a pod's to such a frontend while the
    /// pods' veths had no program to check the ranges (`SOCK_CFG_F_NO_POD_PATH`).
    pub const SOCK_REFUSED_SOURCE_RANGE: u32 = 34;
    /// Number of counters (size of `LB_COUNTERS`).
    pub const COUNT: u32 = 35;

    /// Names for the CLI and metrics, in index order.
    pub const NAMES: [&str; COUNT as usize] = [
        "new_flow",
        "translated",
        "reverse_translated",
        "passed",
        "refused_no_backend",
        "passed_malformed",
        "passed_fragment",
        "drop_fragment",
        "drop_no_backend",
        "drop_ct_full",
        "drop_rewrite_failed",
        "backend_reselected",
        "passed_no_backend",
        "reverse_translated_fragment",
        "passed_long_ext_chain",
        "drop_snat_exhausted",
        "passed_to_tc",
        "passed_reply",
        "drop_source_range",
        "new_hairpin",
        "egress_passed",
        "drop_no_route",
        "xdp_sent",
        "ct_recreated",
        "reverse_translated_icmp",
        "translated_icmp",
        "translated_fragment",
        "trace_lost",
        "sock_connect_translated",
        "sock_sendmsg_translated",
        "sock_reverse_translated",
        "sock_refused_no_backend",
        "sock_left_to_packet_path",
        "sock_destroyed",
        "sock_refused_source_range",
    ];
}

const _: () = assert!(size_of::<FrontendKey>() == 20);
const _: () = assert!(size_of::<Frontend>() == 24);
const _: () = assert!(size_of::<MaglevCell>() == 8);
const _: () = assert!(size_of::<SlotKey>() == 8);
const _: () = assert!(size_of::<Slot>() == 4);
const _: () = assert!(size_of::<Backend>() == 20);
const _: () = assert!(size_of::<CtKey>() == 40);
const _: () = assert!(size_of::<CtValue>() == 48);
const _: () = assert!(size_of::<SnatPeer>() == 24);
const _: () = assert!(size_of::<AffinityKey>() == 24);
const _: () = assert!(size_of::<AffinityValue>() == 16);
const _: () = assert!(size_of::<NodeConfig>() == 40);
const _: () = assert!(size_of::<FragKey>() == 40);
const _: () = assert!(size_of::<FragValue>() == 32);
const _: () = assert!(size_of::<SourceRange>() == 20);
const _: () = assert!(size_of::<TraceConfig>() == 64);
const _: () = assert!(size_of::<TraceEvent>() == 64);
const _: () = assert!(size_of::<LayoutRecord>() == 8);
const _: () = assert!(size_of::<SockKey>() == 32);
const _: () = assert!(size_of::<SockValue>() == 32);
const _: () = assert!(size_of::<SockConfig>() == 16);
const _: () = assert!(size_of::<SockConn>() == 48);
const _: () = assert!(core::mem::offset_of!(SockConn, service_id) == 40);
const _: () = assert!(core::mem::offset_of!(SockConn, backend_id) == 44);

#[cfg(feature = "user")]
mod pod {
    use super::*;

    /// `aya::Pod` for types that are `#[repr(C)]`, `Copy`, without implicit padding
    /// (their sizes are asserted above) and valid for every bit pattern.
    macro_rules! pod {
        ($($t:ty),* $(,)?) => {$(
            // SAFETY: see the macro's doc: plain integers, explicit padding, any bits valid.
            unsafe impl aya::Pod for $t {}
        )*};
    }

    pod!(
        FrontendKey,
        Frontend,
        SlotKey,
        Slot,
        Backend,
        CtKey,
        CtValue,
        FragKey,
        FragValue,
        NodeConfig,
        SnatPeer,
        AffinityKey,
        AffinityValue,
        SourceRange,
        MaglevCell,
        TraceConfig,
        TraceEvent,
        LayoutRecord,
        SockKey,
        SockValue,
        SockConfig,
        SockConn
    );
}
