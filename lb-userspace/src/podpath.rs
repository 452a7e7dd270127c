//! Whether the pods' veths carry the tc programs (the packet path of pods' flows).
//!
//! Where the socket programs translate every pod flow at connect time
//! (`sockets::Sockets::covers_pods`) and the node's external interfaces have their own programs
//! (XDP, tc ingress behind it, tc egress: traffic from outside and its replies), no
//! packet of a pod needs a program on the pod's veth: its flows carry the backend's
//! address from the first packet, and the replies of outside clients' flows to a pod
//! are reverse-translated where they leave the node. Every packet of the pod then goes
//! by without a program run (about 2 µs a connection less, 27 runs, in the connect-time
//! benchmark).
//!
//! What still needs them:
//! - a frontend with loadBalancerSourceRanges (the writer's `Status::source_ranges`):
//!   the socket programs leave a pod's socket to it to the packet path, which checks
//!   the ranges against the pod's address (not known at connect()). While the pods' veths have no programs, the socket programs
//!   refuse such a socket instead (`SOCK_CFG_F_NO_POD_PATH`), so the short time until
//!   the next poll attaches them fails closed;
//! - the flows an earlier agent (or this one, while a source-range frontend existed)
//!   translated on the packet path: their packets need the programs until they end. So
//!   programs that are no longer needed stay until the collector has seen no conntrack
//!   entry created before the need ended.
//!
//! Attach order: the programs first, then the flag cleared; detach: the flag set first,
//! then the programs removed.
use std::{
    path::Path,
    sync::{atomic::Ordering, Arc},
};

use aya::maps::{Array, Map, MapData};
use lb_common::{SockConfig, MAP_SOCK_CONFIG, SOCK_CFG_F_NO_POD_PATH};
use tracing::{info, warn};

use crate::{
    dataplane::gc::{monotonic_now_ns, GcStats},
    loader::{Datapath, Hook},
};

/// Why the pods' veths carry the programs (or `None`: they do not).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// The socket programs do not translate every pod flow (not attached, pods off,
    /// no socket destruction, pods outside the cgroup) or the node has no external
    /// interfaces (its traffic from outside would come through `--interfaces`).
    NotCovered,
    /// A frontend has loadBalancerSourceRanges.
    SourceRanges,
    /// No longer needed, but a conntrack entry from before that moment is left: a flow
    /// the packet path translated may still send.
    EarlierFlows,
}

/// Whether the pods' programs are needed now. `covered`: the socket programs translate
/// every pod flow; `source_ranges`: a frontend has loadBalancerSourceRanges;
/// `attached`: the pods have the programs now; `need_ended`: when they stopped being
/// needed (while attached); `pass_at`, `oldest`: when the collector last read conntrack
/// and the creation time of the oldest entry it left (`u64::MAX`: none).
pub fn need(
    covered: bool,
    source_ranges: bool,
    attached: bool,
    need_ended: Option<u64>,
    pass_at: u64,
    oldest: u64,
) -> Option<Need> {
    if !covered {
        return Some(Need::NotCovered);
    }
    if source_ranges {
        return Some(Need::SourceRanges);
    }
    if !attached {
        return None;
    }
    match need_ended {
        Some(t) if pass_at > t && oldest > t => None,
        _ => Some(Need::EarlierFlows),
    }
}

/// The pods' programs, attached or not, and the socket programs' switch.
pub struct PodPath {
    covered: bool,
    attached: bool,
    need_ended: Option<u64>,
    /// `LB_SOCK_CONFIG`, where `SOCK_CFG_F_NO_POD_PATH` is set (none: no socket
    /// programs).
    config: Option<Array<MapData, SockConfig>>,
    gc: Arc<GcStats>,
    last: Option<Option<Need>>,
    /// What `SOCK_CFG_F_NO_POD_PATH` was last set to.
    flag: Option<bool>,
}

impl PodPath {
    /// Before the first attachment: the pods have programs if an earlier agent left
    /// their link pins.
    /// `covers_pods`: `Sockets::covers_pods`, `None` without socket programs;
    /// `external`: the agent has external interfaces (`--external-interfaces`).
    pub fn new(
        pin_dir: &Path,
        covers_pods: Option<bool>,
        external: bool,
        datapath: &Datapath,
        gc: Arc<GcStats>,
    ) -> Self {
        let covered = covers_pods == Some(true) && external;
        let config = covers_pods.and_then(|_| {
            MapData::from_pin(pin_dir.join(MAP_SOCK_CONFIG))
                .map_err(|e| warn!("{MAP_SOCK_CONFIG}: {e}"))
                .ok()
                .and_then(|d| Array::try_from(Map::Array(d)).ok())
        });
        Self {
            covered,
            attached: Hook::POD.iter().any(|&h| datapath.has_link_pins(h)),
            need_ended: None,
            config,
            gc,
            last: None,
            flag: None,
        }
    }

    /// Attaches to new interfaces and forgets vanished ones through `sync_interfaces`
    /// (`run::Interfaces::sync`, told whether the pods' hooks are wanted), the pods'
    /// hooks only while they are needed: attached when they become so, removed once
    /// they are not. `source_ranges`: a frontend has loadBalancerSourceRanges.
    pub fn sync(
        &mut self,
        datapath: &mut Datapath,
        source_ranges: bool,
        sync_interfaces: impl FnOnce(&mut Datapath, bool),
    ) {
        let now = monotonic_now_ns();
        let needed = !self.covered || source_ranges;
        if needed {
            self.need_ended = None;
        } else if self.attached && self.need_ended.is_none() {
            self.need_ended = Some(now);
        }
        let why = need(
            self.covered,
            source_ranges,
            self.attached,
            self.need_ended,
            self.gc.last_pass_at_ns.load(Ordering::Relaxed),
            self.gc.oldest_created_ns.load(Ordering::Relaxed),
        );
        if why.is_none() && (self.attached || self.last.is_none()) {
            self.set_flag(true);
            for hook in Hook::POD.iter().rev() {
                datapath.detach_all(*hook);
            }
            self.attached = false;
        }
        sync_interfaces(datapath, why.is_some());
        if why.is_some() {
            // (An interface whose attachment failed is retried at the next poll.)
            self.attached = true;
            self.set_flag(false);
        }
        if self.last != Some(why) {
            match why {
                Some(why) => info!(?why, "the pods' interfaces carry the tc programs"),
                None => info!(
                    "the pods' interfaces carry no program: the socket programs translate \
                     every pod flow at connect time"
                ),
            }
            self.last = Some(why);
        }
    }

    /// Sets or clears `SOCK_CFG_F_NO_POD_PATH`.
    fn set_flag(&mut self, on: bool) {
        let Some(config) = self.config.as_mut() else {
            return;
        };
        if self.flag == Some(on) {
            return;
        }
        let r = config.get(&0, 0).and_then(|mut c| {
            let flags = if on {
                c.flags | SOCK_CFG_F_NO_POD_PATH
            } else {
                c.flags & !SOCK_CFG_F_NO_POD_PATH
            };
            if flags == c.flags {
                return Ok(());
            }
            c.flags = flags;
            config.set(0, c, 0)
        });
        match r {
            Ok(()) => self.flag = Some(on),
            Err(e) => warn!("{MAP_SOCK_CONFIG}: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pods_need_the_programs_unless_every_flow_is_translated_at_connect_time() {
        assert_eq!(
            need(false, false, false, None, 0, u64::MAX),
            Some(Need::NotCovered)
        );
        assert_eq!(need(true, false, false, None, 0, u64::MAX), None);
        assert_eq!(
            need(true, true, false, None, 0, u64::MAX),
            Some(Need::SourceRanges)
        );
        assert_eq!(need(false, true, true, None, 0, 0), Some(Need::NotCovered));
    }

    #[test]
    fn programs_no_longer_needed_stay_until_a_pass_after_that_finds_no_older_entry() {
        // Attached (an earlier agent's pins, or a source-range frontend that went) and
        // not needed since t = 100.
        let t = Some(100);
        // No pass since: kept.
        assert_eq!(
            need(true, false, true, t, 90, u64::MAX),
            Some(Need::EarlierFlows)
        );
        // A pass after it that still found an entry created before it: kept.
        assert_eq!(
            need(true, false, true, t, 150, 99),
            Some(Need::EarlierFlows)
        );
        // A pass after it that found only younger entries, or none: removed.
        assert_eq!(need(true, false, true, t, 150, 120), None);
        assert_eq!(need(true, false, true, t, 150, u64::MAX), None);
        // Not yet marked: kept.
        assert_eq!(
            need(true, false, true, None, 150, u64::MAX),
            Some(Need::EarlierFlows)
        );
    }
}
