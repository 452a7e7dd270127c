//! What the algorithm (`lb::process`) needs from the hook it runs on, and what it answers.
//! The tc program (`tc.rs`) and the XDP program (`xdp.rs`) implement [`Hook`]; the steps
//! (`refuse`, `route`) return a [`Verdict`], which each hook maps to its return codes.
use lb_common::Addr;

use crate::{
    nat::Rewriter,
    parse::{Fragment, Packet, PacketData},
    route::Leaving,
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
    /// Sends on a translated packet of a SNAT flow (only called when `SENDS_SNAT`);
    /// `out` is the packet as it leaves.
    fn send_routed(&self, out: &Leaving) -> Verdict;
    /// Sends on a reverse-translated reply of a flow that came from outside.
    fn send_external_reply(&self, pkt: &Packet, src: &Addr, sport: u16) -> Verdict;
    /// The same for a later fragment of such a reply, given the first's new source.
    fn send_external_fragment(&self, frag: &Fragment, src: &Addr) -> Verdict;
}
