//! Per-CPU counters: one increment per decision, so an operator can see why a packet
//! went where it went (`lb show counters`, `/metrics`).
use crate::maps::LB_COUNTERS;

#[inline(always)]
pub fn count(index: u32) {
    if let Some(ptr) = LB_COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot; only this CPU's program writes it, with preemption off.
        unsafe { *ptr += 1 };
    }
}
