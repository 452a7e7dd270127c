//! The maps. Sizes here are only defaults: userspace sets the real ones at load time
//! (`--max-frontends`, ...), and pins every map under the project's bpffs folder.
//! All are preallocated (no `BPF_F_NO_PREALLOC`): memory is taken once at load, and
//! writing a million entries costs no allocation per entry (100k Services x 10
//! endpoints from empty: 3.3 s with NO_PREALLOC, 2.1 s without).
use aya_ebpf::{
    btf_maps::{
        Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray, RingBuf, SkStorage,
    },
    macros::btf_map,
};
use lb_common::{
    counter, AffinityKey, AffinityValue, Backend, CtKey, CtValue, FragKey, FragValue, Frontend,
    FrontendKey, LayoutRecord, MaglevCell, NodeConfig, Slot, SlotKey, SnatPeer, SockConfig,
    SockConn, SockKey, SockValue, SourceRange, TraceConfig, TraceEvent, CT_FILTER_MAP_FLAGS,
    CT_FILTER_WORDS, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_CONNTRACK, DEFAULT_MAX_FRAGS,
    DEFAULT_MAX_FRONTENDS, DEFAULT_MAX_MAGLEV_CELLS, DEFAULT_MAX_SLOTS, DEFAULT_MAX_SOCK_REV,
    DEFAULT_MAX_SOURCE_RANGES, EVENTS_RING_BYTES, FRONTEND_FILTER_WORDS, SOCK_KILL_BATCH,
};

/// Service frontends: (IP, port, protocol) -> service id and ready-backend count.
#[btf_map]
pub static LB_FRONTENDS: HashMap<FrontendKey, Frontend, { DEFAULT_MAX_FRONTENDS as usize }> =
    HashMap::new();

/// A bit per hash of every frontend address (`lb_common::frontend_filter_bit`), written
/// by the agent: set before a frontend of the address is added, cleared after the last
/// is removed. A packet or socket call to an address whose bit is clear is to no
/// frontend, without the hash lookup (a bit set by another address costs that lookup,
/// which misses, as before).
#[btf_map]
pub static LB_FE_FILTER: Array<u64, { FRONTEND_FILTER_WORDS as usize }> = Array::new();

/// (service id, slot 1..=count) -> backend id: the ready backends of each frontend.
#[btf_map]
pub static LB_SLOTS: HashMap<SlotKey, Slot, { DEFAULT_MAX_SLOTS as usize }> = HashMap::new();

/// Every frontend's Maglev table, one region of cells each (`Frontend::table_base`,
/// `table_size`), computed by the agent: cell -> backend id and its slot. An array: the
/// lookup of a new flow is an indexed load, and a table is replaced by writing a new
/// region and then the frontend that names it (one atomic update of its value).
#[btf_map]
pub static LB_MAGLEV: Array<MaglevCell, { DEFAULT_MAX_MAGLEV_CELLS as usize }> = Array::new();

/// Backend id (the index) -> backend address and port (ready or not); an unused id holds
/// zeroes. An array: an established flow checks its backend on every packet, and an
/// array lookup is an indexed load where a hash lookup hashes and walks a bucket.
#[btf_map]
pub static LB_BACKENDS: Array<Backend, { DEFAULT_MAX_BACKENDS as usize + 1 }> = Array::new();

/// Connection tracking: a forward and a reply entry per translated flow.
#[btf_map]
pub static LB_CONNTRACK: LruHashMap<CtKey, CtValue, { DEFAULT_MAX_CONNTRACK as usize }> =
    LruHashMap::new();

/// A bit per hash of every conntrack key's addresses and protocol
/// (`lb_common::ct_filter_bit`), then the switch
/// (`CT_FILTER_SWITCH`). The programs set a key's bit (an atomic OR) before they insert
/// its entry; while the agent keeps the switch on, a packet whose bit is clear has no
/// entry and skips the lookup (`conntrack::lookup`). Bits of entries that went stay
/// set until the agent rebuilds the filter (`lb_userspace::dataplane::ct_filter`).
/// Mappable: the agent sets bits with atomic ORs too.
#[btf_map]
pub static LB_CT_FILTER: Array<u64, { CT_FILTER_WORDS as usize + 1 }, CT_FILTER_MAP_FLAGS> =
    Array::new();

/// Fragmented datagrams whose first fragment was translated: (src, dst, IP id, proto) as
/// the fragments arrive -> the address to give the later ones (which have no ports to
/// look up conntrack with). Never deleted: the LRU recycles entries.
#[btf_map]
pub static LB_FRAGS: LruHashMap<FragKey, FragValue, { DEFAULT_MAX_FRAGS as usize }> =
    LruHashMap::new();

/// Per-CPU decision counters, indexed by `lb_common::counter::*`.
#[btf_map]
pub static LB_COUNTERS: PerCpuArray<u64, { counter::COUNT as usize }> = PerCpuArray::new();

/// The other side of each SNAT flow's translation, keyed like conntrack.
#[btf_map]
pub static LB_SNAT: LruHashMap<CtKey, SnatPeer, { DEFAULT_MAX_CONNTRACK as usize / 4 }> =
    LruHashMap::new();

/// Scratch space for the entries of a new SNAT flow (`conntrack::create_snat`): the tc
/// program's 512-byte stack cannot hold them beside the rest of the program.
#[repr(C)]
pub struct SnatScratch {
    pub key: CtKey,
    pub value: CtValue,
    pub peer: SnatPeer,
}

#[btf_map]
pub static LB_SNAT_SCRATCH: PerCpuArray<SnatScratch, 1> = PerCpuArray::new();

/// Scratch space for the FIB lookup's parameters (`route.rs`, 64 bytes): kept off the
/// tc program's stack, which holds the rest of the inlined path.
#[btf_map]
pub static LB_FIB_SCRATCH: PerCpuArray<aya_ebpf::bindings::bpf_fib_lookup, 1> = PerCpuArray::new();

/// sessionAffinity ClientIP: (client, frontend) -> the backend of its last new
/// connection (`service::select_backend`).
#[btf_map]
pub static LB_AFFINITY: LruHashMap<
    AffinityKey,
    AffinityValue,
    { DEFAULT_MAX_CONNTRACK as usize / 4 },
> = LruHashMap::new();

/// This node's configuration (one entry, index 0): the SNAT addresses and port range.
#[btf_map]
pub static LB_NODE: Array<NodeConfig, 1> = Array::new();

/// loadBalancerSourceRanges: (frontend id, source prefix) -> allowed, for the frontends
/// with `FRONTEND_F_SOURCE_RANGES` (`service::source_allowed`). An LPM trie (never
/// preallocated: the kernel requires `BPF_F_NO_PREALLOC`, the default here).
#[btf_map]
pub static LB_SRC_RANGES: LpmTrie<SourceRange, u32, { DEFAULT_MAX_SOURCE_RANGES as usize }> =
    LpmTrie::new();

/// The programs the XDP program tail-calls (`lb_common::XDP_PROG_*`), filled by the
/// loader. Not pinned: made with each load, for the programs of that load.
#[btf_map]
pub static LB_XDP_PROGS: ProgramArray<1> = ProgramArray::new();

/// `lb trace`'s switch (one entry, index 0): events are written only while it is on.
#[btf_map]
pub static LB_TRACE: Array<TraceConfig, 1> = Array::new();

/// `lb trace`'s events (`trace.rs`), read by the tracer from the pin.
#[btf_map]
pub static LB_EVENTS: RingBuf<TraceEvent, { EVENTS_RING_BYTES as usize }> = RingBuf::new();

/// Scratch space for `lb trace` (`trace::remember`): the addresses of the packet being
/// decided, for its event. Not pinned, like the other scratch maps.
#[repr(C)]
pub struct TraceScratch {
    pub ts_ns: u64,
    pub client: lb_common::Addr,
    pub frontend: lb_common::Addr,
    pub client_port: u16,
}

#[btf_map]
pub static LB_TRACE_SCRATCH: PerCpuArray<TraceScratch, 1> = PerCpuArray::new();

/// The layout version of the maps pinned beside it (`lb_common::LAYOUT_VERSION`), for
/// the next agent: written by userspace, never read by the programs.
#[btf_map]
pub static LB_LAYOUT: Array<LayoutRecord, 1> = Array::new();

/// The socket programs' reverse translations of unconnected UDP (`sock.rs`): (socket
/// cookie, backend) -> the frontend the socket sent to. An LRU: a closed socket's
/// entries are recycled.
#[btf_map]
pub static LB_SOCK_REV: LruHashMap<SockKey, SockValue, { DEFAULT_MAX_SOCK_REV as usize }> =
    LruHashMap::new();

/// The socket programs' switches (one entry, index 0), written by the agent.
#[btf_map]
pub static LB_SOCK_CONFIG: Array<SockConfig, 1> = Array::new();

/// What each connected socket's connect() was translated from and to (`sock.rs`),
/// stored with the socket and freed with it.
#[btf_map]
pub static LB_SOCK_CONN: SkStorage<SockConn> = SkStorage::new();

/// The (frontend, backend) pairs whose connected UDP sockets the agent's socket
/// iterator destroys (a program it assembles itself: the kfunc `bpf_sock_destroy` needs
/// a call aya cannot relocate). No program of this object reads it; it lives here to be
/// made and pinned with the rest.
#[btf_map]
pub static LB_SOCK_KILL: HashMap<u64, u32, { SOCK_KILL_BATCH as usize }> = HashMap::new();
