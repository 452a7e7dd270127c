//! The desired state kept up to date object by object: a change to one Service or one
//! EndpointSlice recomputes that Service's frontends only, and [`ModelCache::take_delta`]
//! hands the writer exactly the frontends that changed, so the cost of a change does not
//! grow with the number of Services. `desired()` always equals `desired_state()` over
//! the same objects, and the deltas replayed on the last state give the new one (a test
//! checks both on random sequences).
use std::sync::Arc;

use ahash::{AHashMap as HashMap, AHashSet as HashSet};

use super::{
    objects::{EndpointSlice, Node, NodeName, ObjectKey, Service, ZoneHints},
    rules::{health_check, service_frontends},
    state::{Delta, DesiredState, FrontendAddr, FrontendSpec, HealthCheck},
};

#[derive(Clone, Debug, Default)]
pub struct ModelCache {
    services: HashMap<ObjectKey, Service>,
    slices: HashMap<ObjectKey, EndpointSlice>,
    /// Service key -> keys of the slices that name it (the Service may not exist yet).
    slices_of: HashMap<ObjectKey, Vec<ObjectKey>>,
    /// The frontends each Service claims, whether or not it owns them.
    frontends_of: HashMap<ObjectKey, Vec<FrontendAddr>>,
    /// Services claiming each frontend, sorted: the first in (namespace, name) order owns
    /// it.
    claims: HashMap<FrontendAddr, Vec<ObjectKey>>,
    /// Services to recompute.
    dirty: HashSet<ObjectKey>,
    desired: DesiredState,
    /// Frontends changed since the last `take_delta`, with their spec before the first
    /// of those changes.
    before: HashMap<FrontendAddr, Option<FrontendSpec>>,
    node: Node,
    /// The health checks of the Services that have a `healthCheckNodePort`.
    health: HashMap<ObjectKey, HealthCheck>,
    /// A health check changed since the last `take_health_changed`.
    health_changed: bool,
    /// Node names, one allocation each, shared by every endpoint on that node.
    node_names: HashSet<NodeName>,
    /// Zone hints, one allocation per distinct set, shared by the endpoints that have it.
    zone_hints: HashSet<ZoneHints>,
}

impl ModelCache {
    /// Sets this node (its addresses, name and zone). New addresses recompute the
    /// Services that have frontends reached from outside (NodePorts, external or
    /// LoadBalancer IPs); a new name or zone every Service (which endpoints are remote,
    /// which zone hints apply). Returns whether anything changed.
    pub fn set_node(&mut self, node: Node) -> bool {
        if node == self.node {
            return false;
        }
        self.desired.snat = super::state::SnatSources::of(&node);
        // Another name changes which endpoints are remote, another zone which hints
        // match, for every Service; other addresses change the frontends reached from
        // outside only.
        let renamed = node.name != self.node.name || node.zone != self.node.zone;
        self.node = node;
        for (key, svc) in &self.services {
            if renamed || svc.has_external_frontends() {
                self.dirty.insert(key.clone());
            }
        }
        true
    }

    pub fn node(&self) -> &Node {
        &self.node
    }

    pub fn upsert_service(&mut self, svc: Service) {
        let key = svc.key();
        if self.services.get(&key) != Some(&svc) {
            self.services.insert(key.clone(), svc);
            self.dirty.insert(key);
        }
    }

    pub fn remove_service(&mut self, key: &ObjectKey) {
        if let Some((key, _)) = self.services.remove_entry(key) {
            self.dirty.insert(key);
        }
    }

    pub fn upsert_slice(&mut self, mut slice: EndpointSlice) {
        let key = slice.key();
        for ep in &mut slice.endpoints {
            if let Some(name) = &mut ep.node_name {
                *name = intern(&mut self.node_names, name);
            }
            if let Some(hints) = &mut ep.zone_hints {
                *hints = intern_hints(&mut self.zone_hints, hints);
            }
        }
        if self.slices.get(&key) == Some(&slice) {
            return;
        }
        let svc = slice.service_key();
        if let Some(old) = self.slices.insert(key.clone(), slice) {
            let old_svc = old.service_key();
            self.unlink_slice(&old_svc, &key);
            self.dirty.insert(old_svc);
        }
        self.slices_of.entry(svc.clone()).or_default().push(key);
        self.dirty.insert(svc);
    }

    pub fn remove_slice(&mut self, key: &ObjectKey) {
        if let Some((key, old)) = self.slices.remove_entry(key) {
            let svc = old.service_key();
            self.unlink_slice(&svc, &key);
            self.dirty.insert(svc);
        }
    }

    fn unlink_slice(&mut self, svc: &ObjectKey, slice: &ObjectKey) {
        if let Some(list) = self.slices_of.get_mut(svc) {
            list.retain(|k| k != slice);
            if list.is_empty() {
                self.slices_of.remove(svc);
            }
        }
    }

    /// Replaces every object (the standalone file): only those that differ are marked
    /// dirty.
    pub fn replace_all(&mut self, services: Vec<Service>, slices: Vec<EndpointSlice>) {
        let svc_keys: HashSet<ObjectKey> = services.iter().map(Service::key).collect();
        let slice_keys: HashSet<ObjectKey> = slices.iter().map(EndpointSlice::key).collect();
        self.retain_services(|k| svc_keys.contains(k));
        self.retain_slices(|k| slice_keys.contains(k));
        for s in services {
            self.upsert_service(s);
        }
        for s in slices {
            self.upsert_slice(s);
        }
    }

    /// Removes the Services `keep` says no to (after a relist: those the list lacked).
    pub fn retain_services(&mut self, keep: impl Fn(&ObjectKey) -> bool) {
        let gone: Vec<ObjectKey> = self.services.keys().filter(|k| !keep(k)).cloned().collect();
        for k in gone {
            self.remove_service(&k);
        }
    }

    /// Removes the EndpointSlices `keep` says no to.
    pub fn retain_slices(&mut self, keep: impl Fn(&ObjectKey) -> bool) {
        let gone: Vec<ObjectKey> = self.slices.keys().filter(|k| !keep(k)).cloned().collect();
        for k in gone {
            self.remove_slice(&k);
        }
    }

    /// The conditions and node of the endpoint at `ip` in the slices of the Service
    /// `service` (namespace/name), as the source last gave them (for `lb show`).
    pub fn endpoint(
        &self,
        service: &ObjectKey,
        ip: std::net::IpAddr,
    ) -> Option<&super::objects::Endpoint> {
        self.slices_of
            .get(service)?
            .iter()
            .filter_map(|k| self.slices.get(k))
            .flat_map(|s| s.endpoints.iter())
            .find(|e| e.address == ip)
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    pub fn slice_count(&self) -> usize {
        self.slices.len()
    }

    /// The desired state, after recomputing the Services touched since the last call.
    pub fn desired(&mut self) -> &DesiredState {
        self.update();
        &self.desired
    }

    /// The desired state as last computed (see `desired`).
    pub fn current(&self) -> &DesiredState {
        &self.desired
    }

    /// The frontends that changed since the last call, with their spec before; the
    /// desired state has their spec now.
    pub fn take_delta(&mut self) -> Delta {
        self.update();
        // Taken, not drained: a drained map keeps its capacity, and the first delta of a
        // big cluster holds every frontend.
        let mut changed: Vec<(FrontendAddr, Option<FrontendSpec>)> =
            std::mem::take(&mut self.before)
                .into_iter()
                .filter(|(fe, old)| self.desired.frontends.get(fe) != old.as_ref())
                .collect();
        changed.sort_by_key(|(fe, _)| *fe);
        Delta { changed }
    }

    /// Recomputes the dirty Services and the frontends they claim or gave up (also done
    /// by `desired` and `take_delta`).
    pub fn update(&mut self) {
        if self.dirty.is_empty() {
            return;
        }
        let dirty = std::mem::take(&mut self.dirty);
        // Frontends a Service gave up, and frontends it claims but does not own: their
        // owner is settled once every dirty Service has been seen (rare: a Service
        // deleted, its ports or addresses changed, or two Services on one frontend).
        let mut unsettled: HashSet<FrontendAddr> = HashSet::new();
        for key in dirty {
            let check = self
                .services
                .get(&key)
                .and_then(|svc| health_check(svc, self.slices_named(&key), &self.node));
            if self.health.get(&key) != check.as_ref() {
                self.health_changed = true;
                match check {
                    Some(c) => self.health.insert(key.clone(), c),
                    None => self.health.remove(&key),
                };
            }
            let new = self.compute(&key);
            for fe in self.frontends_of.remove(&key).unwrap_or_default() {
                if !new.contains_key(&fe) {
                    if let Some(c) = self.claims.get_mut(&fe) {
                        c.retain(|k| *k != key);
                        if c.is_empty() {
                            self.claims.remove(&fe);
                        }
                    }
                    unsettled.insert(fe);
                }
            }
            if !new.is_empty() {
                self.frontends_of
                    .insert(key.clone(), new.keys().copied().collect());
            }
            for (fe, spec) in new {
                let c = self.claims.entry(fe).or_default();
                if let Err(at) = c.binary_search(&key) {
                    c.insert(at, key.clone());
                }
                if c.first() == Some(&key) {
                    self.set_desired(fe, Some(spec));
                } else {
                    unsettled.insert(fe);
                }
            }
        }
        for fe in unsettled {
            let owner = self.claims.get(&fe).and_then(|c| c.first()).cloned();
            let spec = owner.and_then(|o| self.compute(&o).remove(&fe));
            self.set_desired(fe, spec);
        }
    }

    /// The health checks of the Services with a `healthCheckNodePort`, as of the last
    /// update.
    pub fn health_checks(&self) -> impl Iterator<Item = &HealthCheck> {
        self.health.values()
    }

    /// Whether a health check changed since the last call.
    pub fn take_health_changed(&mut self) -> bool {
        self.update();
        std::mem::take(&mut self.health_changed)
    }

    /// The slices that name the Service `key`.
    fn slices_named<'a>(
        &'a self,
        key: &ObjectKey,
    ) -> impl Iterator<Item = &'a EndpointSlice> + Clone + 'a {
        self.slices_of
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|k| self.slices.get(k))
    }

    /// The frontends a Service yields now (none if it is gone).
    fn compute(&self, key: &ObjectKey) -> std::collections::BTreeMap<FrontendAddr, FrontendSpec> {
        match self.services.get(key) {
            Some(svc) => service_frontends(svc, self.slices_named(key), &self.node),
            None => Default::default(),
        }
    }

    fn set_desired(&mut self, fe: FrontendAddr, spec: Option<FrontendSpec>) {
        let cur = self.desired.frontends.get(&fe);
        if cur == spec.as_ref() {
            return;
        }
        self.before.entry(fe).or_insert_with(|| cur.cloned());
        match spec {
            Some(spec) => {
                self.desired.frontends.insert(fe, spec);
            }
            None => {
                self.desired.frontends.remove(&fe);
            }
        }
    }
}

fn intern_hints(known: &mut HashSet<ZoneHints>, hints: &ZoneHints) -> ZoneHints {
    if let Some(k) = known.get(hints) {
        return k.clone();
    }
    known.insert(hints.clone());
    hints.clone()
}

fn intern(names: &mut HashSet<NodeName>, name: &NodeName) -> NodeName {
    if let Some(known) = names.get(name) {
        return known.clone();
    }
    let owned: NodeName = Arc::from(&**name);
    names.insert(owned.clone());
    owned
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;
    use crate::model::{
        fixtures::*,
        objects::*,
        rules::desired_state,
        state::{FrontendKind, Scope},
    };

    #[test]
    fn the_cache_equals_the_full_computation_on_random_changes() {
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut rnd = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        // The node flips between a few values: no name and no address, and two named
        // nodes whose addresses overlap (and may equal a Service's external IP).
        // Named nodes may have a zone, which endpoints' zone hints may name.
        let nodes = [
            Node::default(),
            node(Some("node-a"), &["192.168.1.1", "fd00:50::1"]),
            node(Some("node-b"), &["192.168.1.1", "192.168.1.2"]),
            in_zone("z1", node(Some("node-a"), &["192.168.1.1", "fd00:50::1"])),
            in_zone("z2", node(Some("node-b"), &["192.168.1.1"])),
        ];
        let hint_sets: [&[&str]; 3] = [&["z1"], &["z2"], &["z1", "z2"]];
        let node_names = [None, Some("node-a"), Some("node-b")];
        let mut cache = ModelCache::default();
        // The state rebuilt from the deltas alone, as the writer sees it.
        let mut replayed = DesiredState::default();
        let mut deltas = 0;
        let mut current = Node::default();
        let mut services: BTreeMap<String, Service> = BTreeMap::new();
        let mut slices: BTreeMap<String, EndpointSlice> = BTreeMap::new();
        let (mut node_port_states, mut local_subsets, mut zone_subsets) = (0, 0, 0);
        for step in 0..4000 {
            let name = format!("s{}", rnd(6));
            match rnd(7) {
                0 | 5 => {
                    // Two Services may share a frontend (clusterIP and port, or a nodePort
                    // on the same node address): the first name wins.
                    let cip = format!("10.96.0.{}", rnd(4) + 1);
                    let mut s = svc(&name, &cip, &[("http", 80 + rnd(2) as u16, Protocol::Tcp)]);
                    // Dual stack a third of the time, IPv6 first or second.
                    match rnd(6) {
                        0 => s.cluster_ips.push(ip(&format!("fd00::{}", rnd(4) + 1))),
                        1 => s
                            .cluster_ips
                            .insert(0, ip(&format!("fd00::{}", rnd(4) + 1))),
                        _ => {}
                    }
                    match rnd(5) {
                        0 => {
                            s.service_type = ServiceType::NodePort;
                            s.ports[0].node_port = Some(30000 + rnd(2) as u16);
                        }
                        1 => s.external_ips = vec![ip(&format!("192.168.1.{}", rnd(2) + 1))],
                        2 => {
                            s.service_type = ServiceType::LoadBalancer;
                            // allocateLoadBalancerNodePorts: false, half the time.
                            s.ports[0].node_port = (rnd(2) == 0).then_some(30002);
                            s.load_balancer_ips = vec![ip("198.51.100.7")];
                        }
                        _ => {}
                    }
                    if rnd(2) == 0 {
                        s.external_traffic_policy = TrafficPolicy::Local;
                    }
                    if rnd(3) == 0 {
                        s.internal_traffic_policy = TrafficPolicy::Local;
                    }
                    services.insert(name, s.clone());
                    cache.upsert_service(s);
                }
                1 => {
                    services.remove(&name);
                    cache.remove_service(&object_key("default", &name));
                }
                2 | 3 => {
                    let sl_name = format!("sl{}", rnd(8));
                    // A slice's endpoints all have hints, or none has, most of the time.
                    let hints_of_slice = rnd(4) > 0;
                    let eps = (0..rnd(4))
                        .map(|_| {
                            let hints = if hints_of_slice != (rnd(8) == 0) {
                                hint_sets[rnd(3) as usize]
                            } else {
                                &[]
                            };
                            hinted(
                                hints,
                                on(
                                    node_names[rnd(3) as usize],
                                    ep(
                                        &if rnd(3) == 0 {
                                            format!("fd00:10:244::{}", rnd(6) + 2)
                                        } else {
                                            format!("10.244.0.{}", rnd(6) + 2)
                                        },
                                        Some(rnd(3) > 0),
                                        None,
                                        Some(rnd(2) == 0),
                                    ),
                                ),
                            )
                        })
                        .collect();
                    let sl = slice(&sl_name, &name, &[("http", 8080, Protocol::Tcp)], eps);
                    slices.insert(sl_name, sl.clone());
                    cache.upsert_slice(sl);
                }
                4 => {
                    current = nodes[rnd(nodes.len() as u64) as usize].clone();
                    cache.set_node(current.clone());
                }
                _ => {
                    let sl_name = format!("sl{}", rnd(8));
                    slices.remove(&sl_name);
                    cache.remove_slice(&object_key("default", &sl_name));
                }
            }
            if rnd(3) == 0 {
                let svcs: Vec<Service> = services.values().cloned().collect();
                let sls: Vec<EndpointSlice> = slices.values().cloned().collect();
                let want = desired_state(&svcs, &sls, &current);
                assert_eq!(cache.desired(), &want, "step {step}");
                let delta = cache.take_delta();
                deltas += delta.changed.len();
                for (fe, old) in delta.changed {
                    assert_eq!(
                        replayed.frontends.get(&fe),
                        old.as_ref(),
                        "step {step}: {fe}"
                    );
                    match want.frontends.get(&fe) {
                        Some(spec) => replayed.frontends.insert(fe, spec.clone()),
                        None => replayed.frontends.remove(&fe),
                    };
                }
                assert_eq!(
                    replayed.frontends, want.frontends,
                    "step {step}: the deltas replayed"
                );
                if current.zone.is_some() {
                    // The same node without its zone: hints unused.
                    let unzoned = Node {
                        zone: None,
                        ..current.clone()
                    };
                    let all = desired_state(&svcs, &sls, &unzoned);
                    zone_subsets += want
                        .frontends
                        .iter()
                        .filter(|(fe, f)| f.active != all.frontends[*fe].active)
                        .count();
                }
                for f in want.frontends.values() {
                    if f.kind == FrontendKind::NodePort {
                        node_port_states += 1;
                        if f.active.len() < f.known.len() && current.name.is_some() {
                            local_subsets += 1;
                        }
                    }
                }
            }
        }
        // The sequence exercised what it is meant to.
        assert!(node_port_states > 100, "{node_port_states}");
        assert!(local_subsets > 10, "{local_subsets}");
        assert!(zone_subsets > 10, "{zone_subsets}");
        assert!(deltas > 500, "{deltas}");
        let svcs: Vec<Service> = services.values().cloned().collect();
        let sls: Vec<EndpointSlice> = slices.values().cloned().collect();
        let mut fresh = ModelCache::default();
        fresh.set_node(current.clone());
        fresh.replace_all(svcs.clone(), sls.clone());
        assert_eq!(fresh.desired(), &desired_state(&svcs, &sls, &current));
        cache.replace_all(vec![], vec![]);
        assert!(cache.desired().frontends.is_empty());
    }

    #[test]
    fn set_node_changes_exactly_the_node_port_frontends() {
        let a = node(Some("node-a"), &["192.168.1.1"]);
        let mut np = web(ServiceType::NodePort, Some(30080));
        np.external_traffic_policy = TrafficPolicy::Local;
        let mut ext = svc("ext", "10.96.0.11", &[("", 443, Protocol::Tcp)]);
        ext.external_ips = vec![ip("203.0.113.5")];
        let plain = svc("plain", "10.96.0.12", &[("", 53, Protocol::Tcp)]);
        let services = vec![np, ext, plain];
        let slices = vec![
            web_slice(vec![
                on(Some("node-a"), ep("10.244.0.2", None, None, None)),
                on(Some("node-b"), ep("10.244.1.2", None, None, None)),
            ]),
            slice(
                "plain-1",
                "plain",
                &[("", 53, Protocol::Tcp)],
                vec![on(Some("node-b"), ep("10.244.1.9", None, None, None))],
            ),
        ];
        let mut cache = ModelCache::default();
        cache.set_node(a.clone());
        cache.replace_all(services.clone(), slices.clone());
        let before = cache.desired().clone();
        assert_eq!(before, desired_state(&services, &slices, &a));
        assert!(before.frontends.contains_key(&fa("192.168.1.1", 30080)));

        // The same node again: nothing to recompute.
        cache.set_node(a.clone());
        assert!(cache.dirty.is_empty());

        // New addresses: the NodePort frontend moves, nothing else changes.
        let moved = node(Some("node-a"), &["192.168.1.2", "192.168.1.3"]);
        cache.set_node(moved.clone());
        let keys = |ks: &[(&str, &str)]| -> BTreeSet<ObjectKey> {
            ks.iter().map(|(n, s)| object_key(n, s)).collect()
        };
        assert_eq!(
            cache.dirty.iter().cloned().collect::<BTreeSet<_>>(),
            keys(&[("default", "ext"), ("default", "web")]),
            "only Services with frontends reached from outside are recomputed"
        );
        let after = cache.desired().clone();
        assert_eq!(after, desired_state(&services, &slices, &moved));
        let gone: Vec<_> = before
            .frontends
            .keys()
            .filter(|fe| !after.frontends.contains_key(fe))
            .copied()
            .collect();
        let new: Vec<_> = after
            .frontends
            .keys()
            .filter(|fe| !before.frontends.contains_key(fe))
            .copied()
            .collect();
        // (With their inside views: web is externalTrafficPolicy Local.)
        let inside = |fe: FrontendAddr| fe.in_scope(Scope::Inside);
        let old = fa("192.168.1.1", 30080);
        assert_eq!(gone, vec![old, inside(old)]);
        let (n2, n3) = (fa("192.168.1.2", 30080), fa("192.168.1.3", 30080));
        assert_eq!(new, vec![n2, inside(n2), n3, inside(n3)]);
        for fe in &new {
            let was = if fe.scope == Scope::Inside {
                inside(old)
            } else {
                old
            };
            assert_eq!(after.frontends[fe], before.frontends[&was]);
        }
        for (fe, spec) in &before.frontends {
            if fe.ip != ip("192.168.1.1") {
                assert_eq!(after.frontends.get(fe), Some(spec), "{fe}");
            }
        }

        // Another name: the same frontends, the external ones with node-b's endpoints.
        let b_node = node(Some("node-b"), &["192.168.1.2", "192.168.1.3"]);
        cache.set_node(b_node.clone());
        let renamed = cache.desired().clone();
        assert_eq!(renamed, desired_state(&services, &slices, &b_node));
        assert_eq!(
            renamed.frontends.keys().collect::<Vec<_>>(),
            after.frontends.keys().collect::<Vec<_>>()
        );
        assert_eq!(
            renamed.frontends[&fa("192.168.1.2", 30080)]
                .active
                .iter()
                .copied()
                .collect::<Vec<_>>(),
            vec![b("10.244.1.2", 8080)]
        );
        // The ClusterIP keeps its backends; which of them are remote is node-b's view.
        assert_eq!(
            renamed.frontends[&fa("10.96.0.10", 80)].active[..],
            [rb("10.244.0.2", 8080), b("10.244.1.2", 8080)]
        );
        assert_eq!(
            after.frontends[&fa("10.96.0.10", 80)].active[..],
            [b("10.244.0.2", 8080), rb("10.244.1.2", 8080)]
        );

        // No address any more: the NodePort frontends go.
        cache.set_node(node(Some("node-b"), &[]));
        assert!(!cache
            .desired()
            .frontends
            .values()
            .any(|f| f.kind == FrontendKind::NodePort));
    }
}
