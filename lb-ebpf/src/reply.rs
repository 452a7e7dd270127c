//! The reply path, the mirror of `lb.rs`, on tc egress (`lb_tc_egress`: the pods' veths
//! and the external interfaces). A backend's reply crosses the node's stack as the
//! backend sent it (routed, and seen by netfilter's connection tracking as the reply of
//! the client's packets after DNAT, exactly as with kube-proxy), and gets the frontend
//! back as its source here, where it leaves: parse -> conntrack (a reply entry?) ->
//! reverse NAT. The later fragments of a translated reply follow its first (`frag.rs`);
//! an ICMP error about a client's packet gets the frontend back in its quote
//! (`icmp.rs`).
//!
//! The flows the program sends on itself (SNAT, hairpin: `CT_F_SNAT`) are translated
//! both ways where they enter, never here; their packets, and everything else, leave
//! untouched.
use lb_common::{counter, CT_DIR_REPLY, CT_F_SNAT, FRAG_REWRITE_SRC};

use crate::{
    conntrack,
    counters::count,
    frag,
    hook::Verdict,
    icmp,
    nat::{self, Rewriter},
    parse::{self, PacketData, Parsed},
};

#[inline(always)]
pub fn process<C: PacketData + Rewriter>(ctx: &C) -> Verdict {
    let pkt = match parse::parse(ctx) {
        Parsed::Packet(pkt) => pkt,
        Parsed::LaterFragment(f) => {
            return frag::later(ctx, &f, conntrack::now_ns(), FRAG_REWRITE_SRC)
        }
        // An error about a client's packet after DNAT, going to the client.
        Parsed::IcmpError(e) => return icmp::to_client(ctx, &e),
        // Counted where it entered (tc ingress or XDP), if it came through one of ours.
        Parsed::Other | Parsed::Malformed | Parsed::LongExtChain => {
            count(counter::EGRESS_PASSED);
            return Verdict::Pass;
        }
    };
    let Some(entry) = conntrack::lookup(&conntrack::key(&pkt)) else {
        count(counter::EGRESS_PASSED);
        return Verdict::Pass;
    };
    // SAFETY: pointer from a successful lookup; copied.
    let e = unsafe { *entry };
    if e.dir != CT_DIR_REPLY || e.flags & CT_F_SNAT != 0 {
        count(counter::EGRESS_PASSED);
        return Verdict::Pass;
    }
    let now = conntrack::now_ns();
    conntrack::touch(entry, &pkt, now);
    match nat::reverse_nat(ctx, &pkt, &e.nat_addr, e.nat_port) {
        Ok(()) => {
            count(counter::REVERSE_TRANSLATED);
            if pkt.first_fragment {
                frag::note_reply(&pkt, &e, now);
            }
            Verdict::Pass
        }
        Err(()) => {
            count(counter::DROP_REWRITE_FAILED);
            Verdict::Drop
        }
    }
}
