//! What the algorithm (`lb::process`) needs from the hook it runs on, and what it answers.
//! The tc program (`tc.rs`) and the XDP program (`xdp.rs`) implement [`Hook`]; the steps
//! (`refuse`, `route`) return a [`Verdict`], which each hook maps to its return codes.
use lb_common::Addr;

use crate::{
    nat::Rewriter,
    parse::{Fragment, Packet, PacketData},
};

/// What the program does with the packet.
pub enum Verdict {
    Pass,
    Drop,
    /// The program sent the packet on itself (tc only): a refusal back out of the
    /// interface it came in by, or a routed reply of an external flow. Holds the
    /// helper's return code (`TC_ACT_REDIRECT`).
    Redirect(i32),
}

/// Packet bounds, a way to rewrite fields with their checksums, and the two steps that
/// differ between hooks.
pub trait Hook: PacketData + Rewriter {
    /// A new connection to a frontend without a ready backend.
    fn refuse(&self, pkt: &Packet) -> Verdict;
    /// Sends on a reverse-translated reply of a flow that came from outside.
    fn send_external_reply(&self, pkt: &Packet, src: &Addr, sport: u16) -> Verdict;
    /// The same for a later fragment of such a reply, given the first's new source.
    fn send_external_fragment(&self, frag: &Fragment, src: &Addr) -> Verdict;
}
