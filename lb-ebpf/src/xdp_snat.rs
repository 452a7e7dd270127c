//! `lb_xdp_snat`: the XDP fast path of SNAT flows (from outside to another node's
//! backend, both directions), reached by a tail call from `lb_xdp_ext` for a packet
//! whose conntrack entry says `CT_F_SNAT`. The flow was started by the tc program (which
//! allocates its port); here each later packet is translated (destination and source,
//! both from its entry and its `LB_SNAT` peer) and sent on at once (`route::xdp_send`),
//! if the kernel knows the next hop's MAC. Anything else (no route or neighbour yet, a
//! fragment, a new connection on a reused port, a deleted backend, a missing peer) goes
//! on untranslated, to the tc program behind XDP, which handles every case.
use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{counter, CtValue, CT_DIR_REPLY, CT_F_SNAT};

use crate::{
    conntrack,
    counters::count,
    nat,
    parse::{self, Parsed},
    route::{self, Leaving},
    service,
};

#[inline(always)]
pub fn process(ctx: &XdpContext) -> u32 {
    let Parsed::Packet(pkt) = parse::parse(ctx) else {
        return xdp_action::XDP_PASS;
    };
    if pkt.first_fragment {
        return xdp_action::XDP_PASS;
    }
    let key = conntrack::key(&pkt);
    let Some(entry) = conntrack::lookup(&key) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: pointer from a successful lookup; copied.
    let e: CtValue = unsafe { *entry };
    let Some(peer) = conntrack::snat_peer(&key) else {
        return xdp_action::XDP_PASS;
    };
    if e.flags & CT_F_SNAT == 0 {
        return xdp_action::XDP_PASS;
    }
    let reply = e.dir == CT_DIR_REPLY;
    if !reply {
        // The tc program decides a flow starting over or a backend gone.
        if conntrack::is_new_connection_attempt(&pkt, &e) {
            return xdp_action::XDP_PASS;
        }
        match service::lookup_backend(e.backend_id) {
            Some(b) if b.addr == e.nat_addr && b.port == e.nat_port => {}
            _ => return xdp_action::XDP_PASS,
        }
    }
    // Client's packet: to the backend, from this node. Reply: to the client, from the
    // frontend.
    let ((saddr, sport), (daddr, dport)) = if reply {
        ((e.nat_addr, e.nat_port), (peer.addr, peer.port))
    } else {
        ((peer.addr, peer.port), (e.nat_addr, e.nat_port))
    };
    let out = Leaving::packet(&pkt, (&saddr, sport), (&daddr, dport));
    let Some(fib) = route::xdp_lookup(ctx, &out) else {
        count(counter::PASSED_TO_TC);
        return xdp_action::XDP_PASS;
    };
    conntrack::touch(entry, &pkt, conntrack::now_ns());
    if nat::dnat(ctx, &pkt, &daddr, dport).is_err() || nat::snat(ctx, &pkt, &saddr, sport).is_err()
    {
        count(counter::DROP_REWRITE_FAILED);
        return xdp_action::XDP_DROP;
    }
    count(if reply {
        counter::REVERSE_TRANSLATED
    } else {
        counter::TRANSLATED
    });
    route::xdp_send(ctx, &out, &fib)
}
