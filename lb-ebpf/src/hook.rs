//! What the algorithm (`lb::process`) needs from the hook it runs on, and what it answers.
//! The tc program (`tc.rs`) and the XDP program (`xdp.rs`) implement [`Hook`]; the steps
//! (`refuse`, `route`) return a [`Verdict`], which each hook maps to its return codes. A
//! packet a hook sends on itself is described as it will leave by a [`Leaving`].
use lb_common::Addr;

use crate::{
    nat::Rewriter,
    parse::{Family, Fragment, Packet, PacketData},
};

/// What the program does with the packet.
pub enum Verdict {
    Pass,
    Drop,
    /// The program sent the packet on itself (tc only): a refusal back out of the
    /// interface it came in by, or a routed packet of an external flow. Holds the
    /// helper's return code (`TC_ACT_REDIRECT`).
    Redirect(i32),
}

/// Packet bounds, a way to rewrite fields with their checksums, and the two steps that
/// differ between hooks.
pub trait Hook: PacketData + Rewriter {
    /// A new connection to a frontend without a ready backend.
    fn refuse(&self, pkt: &Packet) -> Verdict;
    /// Whether this hook handles SNAT flows (toward another node's backend). tc does,
    /// and sends their packets on itself (`route.rs`): the kernel would drop them, their
    /// new source being this node's own address (the client's packets) or a frontend's
    /// (the replies). XDP does not: it leaves them untranslated to the tc program behind
    /// it on the same interface (`passed_to_tc`). (Doing it in XDP too took the XDP
    /// program's verification past the kernel's limit of a million instructions; see
    /// ARCHITECTURE.md.)
    const SENDS_SNAT: bool;
    /// Sends on a translated packet the kernel would not route (its new source is this
    /// node's own address or a frontend's): a SNAT flow's packet, or a reverse-translated
    /// reply (or later fragment of one) of a flow from outside. `out` is the packet as
    /// it leaves.
    fn send_routed(&self, out: &Leaving) -> Verdict;
}

/// What the route lookup needs of a translated packet, as it will leave (addresses and
/// ports in network byte order). A fragment after the first has no ports: 0.
pub struct Leaving {
    pub family: Family,
    /// Offset of the IP header.
    pub l3_off: usize,
    /// Length of the IP packet (for the lookup's MTU check).
    pub l3_len: u32,
    pub proto: u8,
    pub src: Addr,
    pub dst: Addr,
    pub sport: u16,
    pub dport: u16,
}

impl Leaving {
    /// A translated packet: its new source and destination.
    #[inline(always)]
    pub fn packet(pkt: &Packet, (src, sport): (&Addr, u16), (dst, dport): (&Addr, u16)) -> Self {
        Leaving {
            family: pkt.family,
            l3_off: pkt.l3_off,
            l3_len: pkt.l3_len,
            proto: pkt.proto,
            src: *src,
            dst: *dst,
            sport,
            dport,
        }
    }

    /// A reverse-translated fragment after the first: its new source address.
    #[inline(always)]
    pub fn fragment(frag: &Fragment, src: &Addr) -> Self {
        Leaving {
            family: frag.family,
            l3_off: frag.l3_off,
            l3_len: frag.l3_len,
            proto: frag.proto,
            src: *src,
            dst: frag.dst,
            sport: 0,
            dport: 0,
        }
    }
}
