//! Connect-time balancing: the socket programs (cgroup `sock_addr`, on the cgroup the
//! agent attaches them to). A connect() or an unconnected UDP send to a frontend is
//! given a backend before the first packet exists, chosen by the packet path's own
//! `service::select_backend`; the socket then talks to the backend and its packets need
//! no translation. What a connected socket asked for is kept with the socket
//! (`LB_SOCK_CONN`, socket storage), what an unconnected one sent to by socket cookie
//! and backend (`LB_SOCK_REV`), so that a datagram's source (recvmsg) and getpeername()
//! report the frontend, never the backend.
//!
//! One code for both families: an IPv4 socket's addresses are IPv4-mapped, as in every
//! map; an IPv6 socket that connects to an IPv4-mapped address is an IPv4 client too.
use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
    EbpfContext,
};
use lb_common::{
    counter, ipv4_mapped, is_ipv4_mapped, Addr, Frontend, FrontendKey, SockConn, SockKey,
    SockValue, FRONTEND_F_HOST_ONLY, FRONTEND_F_LOCAL, FRONTEND_F_SOURCE_RANGES, PROTO_TCP,
    PROTO_UDP, SCOPE_INSIDE, SCOPE_OUTSIDE, SOCK_CFG_F_DESTROY, SOCK_CFG_F_NO_POD_PATH,
    SOCK_CFG_F_PODS,
};

use crate::{
    conntrack::now_ns,
    counters::count,
    maps::{LB_FRONTENDS, LB_NODE, LB_SOCK_CONFIG, LB_SOCK_CONN, LB_SOCK_REV},
    service::{self, Tuple},
};

/// What the program returns to let the call go on (the only other value, 0, refuses it).
const ALLOW: i32 = 1;
const REFUSE: i32 = 0;
/// ECONNREFUSED, what a client of a Service without backends gets, as with
/// kube-proxy's REJECT.
const ECONNREFUSED: i32 = 111;

/// The address family of a program: which fields of `bpf_sock_addr` it reads.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fam {
    V4,
    V6,
}

/// Which call a program hooks.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// connect(): TCP and UDP.
    Connect,
    /// sendmsg() with an address, UDP (unconnected sends).
    Sendmsg,
}

/// The flow as backend selection sees it from a socket. The source is not known before
/// the first packet (no port yet, and no route chosen): it is the client's network
/// namespace (a pod, or the node), as an address of the discard-only prefix `100::/64`
/// (RFC 6666) that no client has, so that sessionAffinity ClientIP holds per pod; the
/// socket's cookie stands in for the source port, so each socket hashes apart and an
/// unconnected socket's datagrams to a frontend keep one backend.
struct SockTuple {
    src: Addr,
    dst: Addr,
    sport: u16,
    dport: u16,
    proto: u8,
}

impl Tuple for SockTuple {
    #[inline(always)]
    fn src(&self) -> &Addr {
        &self.src
    }
    #[inline(always)]
    fn dst(&self) -> &Addr {
        &self.dst
    }
    #[inline(always)]
    fn sport(&self) -> u16 {
        self.sport
    }
    #[inline(always)]
    fn dport(&self) -> u16 {
        self.dport
    }
    #[inline(always)]
    fn proto(&self) -> u8 {
        self.proto
    }
}

/// The first word of `100::/64` as loaded from memory.
const DISCARD_PREFIX_WORD: u32 = u32::from_ne_bytes([0x01, 0, 0, 0]);

#[inline(always)]
fn user_addr(ctx: &SockAddrContext, fam: Fam) -> Addr {
    // SAFETY: the context the kernel hands the program; these fields are readable by
    // every sock_addr program of their family.
    unsafe {
        let sa = ctx.sock_addr;
        match fam {
            Fam::V4 => ipv4_mapped((*sa).user_ip4),
            Fam::V6 => [
                (*sa).user_ip6[0],
                (*sa).user_ip6[1],
                (*sa).user_ip6[2],
                (*sa).user_ip6[3],
            ],
        }
    }
}

#[inline(always)]
fn user_port(ctx: &SockAddrContext) -> u16 {
    // SAFETY: as above; the port is in network byte order in the low-addressed half.
    unsafe { (*ctx.sock_addr).user_port as u16 }
}

#[inline(always)]
fn protocol(ctx: &SockAddrContext) -> u8 {
    // SAFETY: as above.
    let p = unsafe { (*ctx.sock_addr).protocol };
    if p == PROTO_TCP as u32 || p == PROTO_UDP as u32 {
        p as u8
    } else {
        0
    }
}

/// Writes `addr:port` as the call's address; false if the address cannot be one of the
/// socket's family (an IPv6 backend for an IPv4 socket: never written).
#[inline(always)]
fn set_user(ctx: &SockAddrContext, fam: Fam, addr: &Addr, port: u16) -> bool {
    let sa = ctx.sock_addr;
    // SAFETY: these fields are writable by connect, sendmsg, recvmsg and getpeername
    // programs, with 4-byte stores.
    unsafe {
        match fam {
            Fam::V4 => {
                if !is_ipv4_mapped(addr) {
                    return false;
                }
                (*sa).user_ip4 = addr[3];
            }
            Fam::V6 => {
                (*sa).user_ip6[0] = addr[0];
                (*sa).user_ip6[1] = addr[1];
                (*sa).user_ip6[2] = addr[2];
                (*sa).user_ip6[3] = addr[3];
            }
        }
        (*sa).user_port = port as u32;
    }
    true
}

/// The frontend as a socket of this node sees it (`host`: of the node's own network
/// namespace, else a pod's), from the entry the packet path sees (`outside`, keyed
/// `key`): None for a frontend served to the node's own sockets only
/// (127.0.0.1:NodePort) asked by a pod, whose 127.0.0.1 is its own. An
/// externalTrafficPolicy Local frontend is the inside view (`SCOPE_INSIDE`) where there
/// is one: kube-proxy sends the node's and its pods' traffic to every endpoint, not the
/// local ones only (none: the two views hold the same endpoints).
#[inline(always)]
fn inside_view(key: &FrontendKey, outside: Frontend, host: bool) -> Option<Frontend> {
    if outside.flags & FRONTEND_F_HOST_ONLY != 0 && !host {
        return None;
    }
    if outside.flags & FRONTEND_F_LOCAL == 0 {
        return Some(outside);
    }
    let inside = FrontendKey {
        scope: SCOPE_INSIDE,
        ..*key
    };
    // SAFETY: as the first lookup.
    Some(
        unsafe { LB_FRONTENDS.get(&inside) }
            .copied()
            .unwrap_or(outside),
    )
}

/// loadBalancerSourceRanges for a socket of the node: a pod's source is its own address,
/// which the tc path checks; the node's is not known before the route is chosen, so the
/// node's own address of the frontend's family (`LB_NODE`, its first) stands for it.
#[inline(always)]
fn node_allowed(key: &FrontendKey, frontend: &Frontend) -> bool {
    let Some(node) = LB_NODE.get(0) else {
        return false;
    };
    let addr = if is_ipv4_mapped(&key.addr) {
        &node.snat_v4
    } else {
        &node.snat_v6
    };
    *addr != [0; 4] && service::address_allowed(addr, frontend)
}

/// connect() and sendmsg(): a frontend's address becomes a backend's.
#[inline(always)]
pub fn forward(ctx: &SockAddrContext, fam: Fam, call: Call) -> i32 {
    let proto = protocol(ctx);
    if proto == 0 || (call == Call::Sendmsg && proto != PROTO_UDP) {
        return ALLOW;
    }
    let addr = user_addr(ctx, fam);
    if !service::may_be_frontend(&addr) {
        return ALLOW;
    }
    let key = FrontendKey {
        addr,
        port: user_port(ctx),
        proto,
        scope: SCOPE_OUTSIDE,
    };
    // SAFETY: copied out at once; userspace replaces whole entries.
    let Some(frontend) = (unsafe { LB_FRONTENDS.get(&key) }).copied() else {
        return ALLOW;
    };
    let Some(cfg) = LB_SOCK_CONFIG.get(0).copied() else {
        return ALLOW;
    };
    // SAFETY: a helper every sock_addr program may call on its context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if cfg.host_netns_cookie == 0 {
        return ALLOW;
    }
    let host = netns == cfg.host_netns_cookie;
    let Some(frontend) = inside_view(&key, frontend, host) else {
        return ALLOW;
    };
    let pod_connected_udp = call == Call::Connect && proto == PROTO_UDP;
    if !host
        && (cfg.flags & SOCK_CFG_F_PODS == 0
            || (pod_connected_udp && cfg.flags & SOCK_CFG_F_DESTROY == 0)
            || frontend.flags & FRONTEND_F_SOURCE_RANGES != 0)
    {
        if cfg.flags & SOCK_CFG_F_NO_POD_PATH != 0 {
            // No packet path on the pods' veths (yet): refused, as a source the ranges
            // may not hold is, until the agent has attached it.
            count(counter::SOCK_REFUSED_SOURCE_RANGE);
            return REFUSE;
        }
        count(counter::SOCK_LEFT_TO_PACKET_PATH);
        return ALLOW;
    }
    if host && frontend.flags & FRONTEND_F_SOURCE_RANGES != 0 && !node_allowed(&key, &frontend) {
        count(counter::SOCK_REFUSED_SOURCE_RANGE);
        // (No retval: a sock_addr program's refusal is EPERM, what a local packet dropped
        // by a firewall gives a UDP send.)
        return REFUSE;
    }
    // SAFETY: as above.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let tuple = SockTuple {
        src: [DISCARD_PREFIX_WORD, 0, netns as u32, (netns >> 32) as u32],
        dst: key.addr,
        sport: (cookie ^ (cookie >> 16) ^ (cookie >> 32) ^ (cookie >> 48)) as u16,
        dport: key.port,
        proto,
    };
    let Some((backend_id, backend)) = service::select_backend(&tuple, &frontend, now_ns()) else {
        count(counter::SOCK_REFUSED_NO_BACKEND);
        // SAFETY: connect and sendmsg programs may set the call's return value.
        unsafe { bpf_set_retval(-ECONNREFUSED) };
        return REFUSE;
    };
    if call == Call::Connect {
        let conn = SockConn {
            frontend: key.addr,
            backend: backend.addr,
            frontend_port: key.port,
            backend_port: backend.port,
            proto,
            _pad: [0; 3],
            service_id: frontend.service_id,
            backend_id,
        };
        // SAFETY: the context's socket, which the kernel hands every connect program.
        let p = unsafe { LB_SOCK_CONN.get_or_insert_ptr_mut(ctx, None) };
        if !p.is_null() {
            // SAFETY: the socket's own storage, written by its own connect() only.
            unsafe { *p = conn };
        }
        // (No storage: getpeername() and recvmsg report the backend.)
    } else {
        let rev = SockKey {
            cookie,
            backend: backend.addr,
            backend_port: backend.port,
            proto,
            _pad: [0; 5],
        };
        // An unconnected socket sends many datagrams to one backend: the entry is
        // written once.
        // SAFETY: copied out at once.
        let known = unsafe { LB_SOCK_REV.get(&rev) }
            .is_some_and(|v| v.frontend == key.addr && v.frontend_port == key.port);
        if !known {
            let value = SockValue {
                frontend: key.addr,
                frontend_port: key.port,
                _pad: 0,
                backend_id,
                service_id: frontend.service_id,
                _pad2: 0,
            };
            // A failed insert only leaves recvmsg with the backend's address.
            let _ = LB_SOCK_REV.insert(&rev, &value, 0);
        }
    }
    if !set_user(ctx, fam, &backend.addr, backend.port) {
        return ALLOW;
    }
    count(match call {
        Call::Connect => counter::SOCK_CONNECT_TRANSLATED,
        Call::Sendmsg => counter::SOCK_SENDMSG_TRANSLATED,
    });
    ALLOW
}

/// recvmsg() (a UDP datagram's source) and getpeername(): a backend the socket was sent
/// to by `forward` becomes the frontend it asked for: the socket's own record if it was
/// connected by the programs, else (an unconnected UDP socket) `LB_SOCK_REV`.
#[inline(always)]
pub fn reverse(ctx: &SockAddrContext, fam: Fam, proto: u8) -> i32 {
    let proto = if proto == 0 { protocol(ctx) } else { proto };
    if proto == 0 {
        return ALLOW;
    }
    let peer = user_addr(ctx, fam);
    let port = user_port(ctx);
    // SAFETY: the context's socket; no storage is created here.
    let p = unsafe { LB_SOCK_CONN.get_ptr_mut(ctx) };
    if !p.is_null() {
        // SAFETY: a pointer to the socket's storage, from a successful lookup.
        let c = unsafe { *p };
        if c.backend == peer && c.backend_port == port {
            if set_user(ctx, fam, &c.frontend, c.frontend_port) {
                count(counter::SOCK_REVERSE_TRANSLATED);
            }
            return ALLOW;
        }
    }
    if proto != PROTO_UDP {
        return ALLOW;
    }
    // SAFETY: a helper every sock_addr program may call on its context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockKey {
        cookie,
        backend: peer,
        backend_port: port,
        proto,
        _pad: [0; 5],
    };
    // SAFETY: copied out at once.
    if let Some(v) = unsafe { LB_SOCK_REV.get(&key) }.copied() {
        if set_user(ctx, fam, &v.frontend, v.frontend_port) {
            count(counter::SOCK_REVERSE_TRANSLATED);
        }
    }
    ALLOW
}
