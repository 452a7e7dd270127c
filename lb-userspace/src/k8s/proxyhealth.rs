//! kube-proxy's node health contract, which cloud load balancers (and
//! `externalTrafficPolicy: Cluster` Services behind them) probe on every node:
//! `/healthz` and `/livez` on `--healthz-bind-address` (`0.0.0.0:10256`, kube-proxy's
//! default), answered as kube-proxy's `ProxyHealthServer` answers them.
//!
//! - The proxy is healthy unless a change it received has waited longer than the
//!   timeout (kube-proxy: twice its sync period, 60 s) without a successful sync: a
//!   change is *queued* when the controller hands it to the writer, and the writer's
//!   next sync without a map error marks it *updated*. Changes before the first sync
//!   (the initial lists) are not counted, as kube-proxy counts none before it is
//!   initialized: the proxy is healthy while it starts.
//! - `/healthz` is also 503 while this node is being deleted (a `deletionTimestamp`, or
//!   gone from the API) or carries the cluster autoscaler's `ToBeDeletedByClusterAutoscaler`
//!   taint, so a load balancer drains it first; `/livez` ignores the node.
//! - Body, as kube-proxy writes it (Go's time format; `lastUpdated` is the current time
//!   while healthy, as kube-proxy reports it for compatibility):
//!   `{"lastUpdated": "2026-01-02 10:00:00.5 +0000 UTC","currentTime": "2026-01-02 10:00:00.5 +0000 UTC", "nodeEligible": true}`
//!   (`/livez` without `nodeEligible`), `Content-Type: application/json`.
use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    extract::State,
    http::{header, StatusCode},
    response::IntoResponse,
    routing::get,
    Router,
};
use k8s_openapi::api::core::v1::Node;

/// kube-proxy's `--healthz-bind-address` default.
pub const DEFAULT_BIND: &str = "0.0.0.0:10256";
/// kube-proxy's timeout: twice its default sync period (30 s).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// The cluster autoscaler's taint on a node it is about to delete.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

#[derive(Debug)]
struct Tracked {
    /// Set by the first successful sync; changes are counted from then on.
    initialized: bool,
    last_updated: Option<jiff::Timestamp>,
    /// The changes not yet written, by number (`Updates::sent`): groups of (first
    /// number, when it was queued), a group for the changes of each 10 ms at most, so
    /// the oldest pending change's time is known to within that (taken as the group's
    /// first: never younger than it is).
    pending: std::collections::VecDeque<(u64, Instant)>,
    /// The last change queued, and the last one a successful sync covered.
    last_queued: u64,
    covered: u64,
    node_eligible: bool,
}

/// Changes queued within this time of a group's first share its time.
const GROUP: Duration = Duration::from_millis(10);
/// Groups kept at most (a later change then shares the last group's, older, time).
const MAX_GROUPS: usize = 4096;

/// The proxy's health, shared by the controller (queued changes, this node), the
/// writer's sync callback (updated) and the HTTP server.
#[derive(Clone, Debug)]
pub struct ProxyHealth {
    timeout: Duration,
    state: Arc<Mutex<Tracked>>,
}

/// Whether this node may receive load-balanced traffic: not being deleted, not tainted
/// by the autoscaler for deletion (kube-proxy's `SyncNode`).
pub fn node_eligible(node: &Node) -> bool {
    node.metadata.deletion_timestamp.is_none()
        && !node
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .is_some_and(|t| t.iter().any(|t| t.key == TO_BE_DELETED_TAINT))
}

/// A time as Go's `time.Time.String()` prints it in UTC (what kube-proxy's body holds):
/// `2006-01-02 15:04:05.999999999 +0000 UTC`, trailing zeros of the fraction dropped.
fn go_time(t: Option<jiff::Timestamp>) -> String {
    let Some(t) = t else {
        // Go's zero time.
        return "0001-01-01 00:00:00 +0000 UTC".into();
    };
    let mut s = t.strftime("%Y-%m-%d %H:%M:%S").to_string();
    let nanos = t.subsec_nanosecond();
    if nanos > 0 {
        let frac = format!("{nanos:09}");
        s.push('.');
        s.push_str(frac.trim_end_matches('0'));
    }
    s.push_str(" +0000 UTC");
    s
}

impl ProxyHealth {
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            state: Arc::new(Mutex::new(Tracked {
                initialized: false,
                last_updated: None,
                pending: Default::default(),
                last_queued: 0,
                covered: 0,
                // Eligible while starting, until the node says otherwise (kube-proxy).
                node_eligible: true,
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tracked> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Change number `seq` was handed to the writer (`Updates::sent` after its send).
    pub fn queued(&self, seq: u64) {
        let mut s = self.lock();
        s.last_queued = s.last_queued.max(seq);
        // Before the first sync (the initial lists) changes are not counted; a change a
        // sync already covered (the writer was quicker than this call) is not pending.
        if !s.initialized || seq <= s.covered {
            return;
        }
        let now = Instant::now();
        let grouped = s
            .pending
            .back()
            .is_some_and(|&(_, t)| now.saturating_duration_since(t) < GROUP);
        if s.pending.is_empty() || (!grouped && s.pending.len() < MAX_GROUPS) {
            s.pending.push_back((seq, now));
        }
    }

    /// A sync wrote every change up to number `covered` (the writer's count of the
    /// updates it had received, `SyncStats::updates`) without an error. Changes queued
    /// after it began stay pending: a sync that covered only part of a burst must not
    /// make the rest look written.
    pub fn updated(&self, covered: u64) {
        let mut s = self.lock();
        s.initialized = true;
        s.covered = s.covered.max(covered);
        s.last_updated = Some(jiff::Timestamp::now());
        let covered = s.covered;
        if covered >= s.last_queued {
            s.pending.clear();
            return;
        }
        // A group is written when the next one starts at or before covered + 1.
        while s.pending.len() > 1 && s.pending[1].0 <= covered + 1 {
            s.pending.pop_front();
        }
    }

    /// This node as last seen (`None`: deleted from the API).
    pub fn sync_node(&self, node: Option<&Node>) {
        self.lock().node_eligible = node.is_some_and(node_eligible);
    }

    fn healthy_at(&self, now: Instant) -> bool {
        let s = self.lock();
        s.pending
            .front()
            .is_none_or(|&(_, since)| now.saturating_duration_since(since) < self.timeout)
    }

    /// The answer to `/healthz` (`livez == false`) or `/livez`, now.
    pub fn answer(&self, livez: bool) -> (StatusCode, String) {
        let healthy = self.healthy_at(Instant::now());
        let (eligible, last) = {
            let s = self.lock();
            (s.node_eligible, s.last_updated)
        };
        let now = jiff::Timestamp::now();
        let ok = healthy && (livez || eligible);
        let last_updated = if ok { Some(now) } else { last };
        let mut body = format!(
            "{{\"lastUpdated\": \"{}\",\"currentTime\": \"{}\"",
            go_time(last_updated),
            go_time(Some(now))
        );
        if !livez {
            body.push_str(&format!(", \"nodeEligible\": {eligible}"));
        }
        body.push('}');
        let code = if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        (code, body)
    }
}

async fn respond(health: ProxyHealth, livez: bool) -> impl IntoResponse {
    let (code, body) = health.answer(livez);
    (
        code,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
}

/// `/healthz` and `/livez`.
pub fn router(health: ProxyHealth) -> Router {
    Router::new()
        .route(
            "/healthz",
            get(|State(h): State<ProxyHealth>| respond(h, false)),
        )
        .route(
            "/livez",
            get(|State(h): State<ProxyHealth>| respond(h, true)),
        )
        .with_state(health)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{NodeSpec, Taint};

    use super::*;

    #[test]
    fn times_are_printed_as_go_prints_them() {
        let t: jiff::Timestamp = "2026-01-02T10:00:00.5Z".parse().unwrap();
        assert_eq!(go_time(Some(t)), "2026-01-02 10:00:00.5 +0000 UTC");
        let t: jiff::Timestamp = "2026-01-02T10:00:00Z".parse().unwrap();
        assert_eq!(go_time(Some(t)), "2026-01-02 10:00:00 +0000 UTC");
        assert_eq!(go_time(None), "0001-01-01 00:00:00 +0000 UTC");
    }

    #[test]
    fn healthy_while_starting_and_until_a_change_waits_past_the_timeout() {
        let h = ProxyHealth::new(Duration::from_millis(50));
        // Changes of the initial lists are not counted.
        h.queued(1);
        assert!(h.healthy_at(Instant::now() + Duration::from_secs(1)));
        h.updated(1);
        h.queued(2);
        let t0 = Instant::now();
        assert!(h.healthy_at(t0));
        assert!(!h.healthy_at(t0 + Duration::from_millis(60)));
        // A later change does not move the oldest one.
        h.queued(3);
        assert!(!h.healthy_at(t0 + Duration::from_millis(60)));
        h.updated(3);
        assert!(h.healthy_at(t0 + Duration::from_secs(10)));
    }

    /// A sync that began before the last changes of a burst were sent covers only the
    /// first ones: the rest stay pending (and time out) until a sync covers them. A
    /// change the writer covered before its queued() call is not pending.
    #[test]
    fn a_sync_that_covered_part_of_a_burst_leaves_the_rest_pending() {
        let h = ProxyHealth::new(Duration::from_millis(50));
        h.updated(0);
        let t0 = Instant::now();
        for seq in 1..=300 {
            h.queued(seq);
        }
        h.updated(255);
        assert!(
            !h.healthy_at(t0 + Duration::from_millis(60)),
            "changes 256-300 wait"
        );
        h.updated(299);
        assert!(!h.healthy_at(t0 + Duration::from_millis(60)));
        h.updated(300);
        assert!(h.healthy_at(t0 + Duration::from_secs(10)));
        // The writer was quicker than the queued() call.
        h.updated(301);
        h.queued(301);
        assert!(h.healthy_at(Instant::now() + Duration::from_secs(10)));
        // Groups: a change 20 ms after the last is a group of its own; a sync that
        // covers the first group leaves the second's (younger) time.
        h.queued(302);
        std::thread::sleep(Duration::from_millis(20));
        h.queued(303);
        let t1 = Instant::now();
        h.updated(302);
        assert!(h.healthy_at(t1 + Duration::from_millis(40)));
        assert!(!h.healthy_at(t1 + Duration::from_millis(60)));
    }

    #[test]
    fn healthz_tells_the_node_livez_does_not() {
        let h = ProxyHealth::new(DEFAULT_TIMEOUT);
        let (code, body) = h.answer(false);
        assert_eq!(code, StatusCode::OK);
        assert!(body.ends_with(", \"nodeEligible\": true}"), "{body}");
        let mut node = Node {
            spec: Some(NodeSpec {
                taints: Some(vec![Taint {
                    key: TO_BE_DELETED_TAINT.into(),
                    effect: "NoSchedule".into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        h.sync_node(Some(&node));
        let (code, body) = h.answer(false);
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("\"nodeEligible\": false"), "{body}");
        let (code, body) = h.answer(true);
        assert_eq!(code, StatusCode::OK);
        assert!(!body.contains("nodeEligible"), "{body}");
        node.spec = None;
        h.sync_node(Some(&node));
        assert_eq!(h.answer(false).0, StatusCode::OK);
        h.sync_node(None);
        assert_eq!(h.answer(false).0, StatusCode::SERVICE_UNAVAILABLE);
    }
}
