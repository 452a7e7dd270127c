//! What the algorithm (`lb::process`) needs from the hook it runs on, and what it answers.
//! The tc program (`tc.rs`) and the XDP program (`xdp.rs`) implement [`Hook`]; the steps
//! (`refuse`, `route`) return a [`Verdict`], which each hook maps to its return codes. A
//! packet a hook sends on itself is described as it will leave by a [`Leaving`].
use lb_common::{Addr, CtValue};

use crate::{
    nat::Rewriter,
    parse::{Packet, PacketData},
};

/// What the program does with the packet.
pub enum Verdict {
    Pass,
    /// Passed, and nothing on its way out can concern the reply path: the packet is a
    /// TCP or UDP packet whose 5-tuple has no entry in `LB_CONNTRACK` (looked up, and
    /// missed, as was the frontend lookup), or not one the programs translate at all.
    /// tc ingress marks the skb so (`tc::UNTRACKED`), and tc egress lets it leave
    /// without parsing it or looking it up again.
    PassUntracked,
    Drop,
    /// The program sent the packet on itself: a refusal or a hairpin flow's packet back
    /// out of the interface it came in by, or a routed packet of a SNAT flow. Holds the
    /// hook's return code for it (tc: `TC_ACT_REDIRECT`; XDP: `XDP_TX` or
    /// `XDP_REDIRECT`).
    Redirect(i32),
}

/// Packet bounds, a way to rewrite fields with their checksums, and the steps that
/// differ between hooks (a program's context: `debug_log!` writes through it).
pub trait Hook: PacketData + Rewriter + aya_ebpf::EbpfContext {
    /// A new connection to a frontend without a ready backend.
    fn refuse(&self, pkt: &Packet) -> Verdict;
    /// Whether this hook makes the flows the program carries itself (SNAT flows toward
    /// another node's backend, and hairpin flows) and carries hairpin flows: tc. Their
    /// packets are sent on by the program (`route.rs`): the kernel would drop them, their
    /// new source being this node's own address (a SNAT flow's client packets), a
    /// frontend's (its replies), or the receiving pod's own (hairpin). XDP carries on the
    /// SNAT flows tc made, as long as their next hop is known (the fast path); it leaves
    /// everything else of them, untranslated, to the tc program behind it on the same
    /// interface (`passed_to_tc`).
    const CREATES_CARRIED: bool;
    /// Where a translated packet of a SNAT flow goes (`out`: as it will leave), looked up
    /// before anything is rewritten. `Err`: what to do with the packet, untouched,
    /// instead (tc: drop it, it has no route; XDP: leave it to tc, which also resolves a
    /// next hop not met yet).
    fn route(&self, out: &Leaving<'_>) -> Result<Self::Route, Verdict>;
    /// Sends on the translated packet along `route`.
    fn send(&self, out: &Leaving<'_>, route: &Self::Route) -> Verdict;
    /// What `route` finds: tc needs the egress device only (`bpf_redirect_neigh`
    /// resolves the neighbour, also one not met yet); XDP also the MACs ([`XdpRoute`]).
    type Route;
    /// Sends a translated packet of a hairpin flow back out of the interface it came in
    /// by (to the pod it came from), its MACs swapped (tc only).
    fn send_back(&self) -> Verdict;
    /// A known packet of a flow the program carries itself (`CT_F_SNAT`), either way:
    /// `lb::carried` (None: a client's flow starts over). tc runs it inline; XDP
    /// tail-calls `lb_xdp_carry`, a program of its own that parses the packet again and
    /// runs it, so the fast path is verified apart and costs the XDP program nothing.
    fn carry(
        &self,
        pkt: &Packet,
        entry: *mut CtValue,
        known: &CtValue,
        now: u64,
    ) -> Option<Verdict>;
}

/// The next hop of a packet XDP sends back out of the interface it came in by, from the
/// FIB lookup: the Ethernet addresses to write.
pub struct XdpRoute {
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
}

/// What the route lookup needs of a translated packet, as it will leave (addresses and
/// ports in network byte order): the packet (its family, offsets, length, protocol) and
/// its new addresses and ports. References, not copies: the tc program's one stack
/// frame holds the whole inlined path.
pub struct Leaving<'a> {
    pub pkt: &'a Packet,
    pub src: &'a Addr,
    pub dst: &'a Addr,
    pub sport: u16,
    pub dport: u16,
}

impl<'a> Leaving<'a> {
    /// A translated packet: its new source and destination.
    #[inline(always)]
    pub fn packet(
        pkt: &'a Packet,
        (src, sport): (&'a Addr, u16),
        (dst, dport): (&'a Addr, u16),
    ) -> Self {
        Leaving {
            pkt,
            src,
            dst,
            sport,
            dport,
        }
    }
}
