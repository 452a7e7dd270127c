//! The Kubernetes rules, as kube-proxy applies them, written once for both sources:
//! which frontends a Service port opens, which endpoints it matches (slice ports by name
//! and protocol), which of them are ready (or serving while terminating, when none is),
//! and which are local to this node (for the frontends reached from outside).
//!
//! Dual stack, as kube-proxy runs one proxier per family: a Service has frontends of a
//! family only if it has a cluster IP of that family, and each frontend is served by the
//! endpoints of its own family. The NodePorts of a family open on the node's addresses of
//! that family; external and LoadBalancer IPs of a family the Service does not have are
//! not programmed.
use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use ipnet::IpNet;

use super::{
    objects::{
        Conditions, Endpoint, EndpointSlice, IpFamily, Node, Service, ServicePort, ServiceType,
        TrafficPolicy,
    },
    state::{
        BackendAddr, Backends, DesiredState, FrontendAddr, FrontendKind, FrontendSpec, HealthCheck,
        Scope, SnatSources,
    },
};

/// Where the node's own sockets reach its NodePorts too (`Node::localhost_nodeports`).
pub const LOCALHOST: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

/// Every frontend a Service port yields, with its kind: for each of the Service's
/// families, its cluster IP, the NodePort on each node address (and on 127.0.0.1 for
/// the node's own sockets, IPv4, with `Node::localhost_nodeports`), the external IPs and
/// the LoadBalancer IPs of that family (all with the Service port, as kube-proxy does).
pub fn port_frontends(
    svc: &Service,
    sp: &ServicePort,
    node: &Node,
) -> Vec<(FrontendAddr, FrontendKind)> {
    let fe = |ip: IpAddr, port: u16| FrontendAddr::new(ip, port, sp.protocol);
    let mut out = Vec::new();
    for cluster_ip in &svc.cluster_ips {
        let family = IpFamily::of(cluster_ip);
        let of_family = |ips: &[IpAddr]| -> Vec<IpAddr> {
            ips.iter()
                .copied()
                .filter(|a| IpFamily::of(a) == family)
                .collect()
        };
        out.push((fe(*cluster_ip, sp.port), FrontendKind::ClusterIP));
        if let Some(np) = sp.node_port {
            if svc.service_type != ServiceType::ClusterIP {
                out.extend(
                    of_family(&node.addresses)
                        .into_iter()
                        .map(|a| (fe(a, np), FrontendKind::NodePort)),
                );
                if node.localhost_nodeports && family == IpFamily::IPv4 {
                    out.push((fe(LOCALHOST, np), FrontendKind::NodePort));
                }
            }
        }
        out.extend(
            of_family(&svc.external_ips)
                .into_iter()
                .map(|a| (fe(a, sp.port), FrontendKind::ExternalIP)),
        );
        if svc.service_type == ServiceType::LoadBalancer {
            out.extend(
                of_family(&svc.load_balancer_ips)
                    .into_iter()
                    .map(|a| (fe(a, sp.port), FrontendKind::LoadBalancer)),
            );
        }
    }
    out
}

/// Kubernetes' readiness rule for one endpoint.
fn is_ready(c: &Conditions) -> bool {
    c.ready.unwrap_or(true)
}

/// KEP-1669: when no endpoint of a Service port is ready, endpoints that are still
/// serving while terminating take the traffic, so a rolling update drops nothing.
fn is_serving_terminating(c: &Conditions) -> bool {
    c.serving.unwrap_or(true) && c.terminating.unwrap_or(false)
}

/// Backends of one Service port, sorted by condition (sorted and deduplicated by
/// `finish`; an address listed as ready anywhere counts as ready).
#[derive(Default)]
struct Pool {
    ready: Vec<BackendAddr>,
    terminating: Vec<BackendAddr>,
    /// The ready ones hinted for this node's zone (`hints.forZones`).
    in_zone: Vec<BackendAddr>,
    /// Some ready endpoint has no zone hint.
    unhinted: bool,
}

impl Pool {
    /// Adds an endpoint's backend; `zone` is this node's.
    fn add(&mut self, b: BackendAddr, ep: &Endpoint, zone: Option<&str>) {
        let c = &ep.conditions;
        if is_ready(c) {
            self.ready.push(b);
            match &ep.zone_hints {
                None => self.unhinted = true,
                Some(hints) => {
                    if zone.is_some_and(|z| hints.iter().any(|h| h == z)) {
                        self.in_zone.push(b);
                    }
                }
            }
        } else if is_serving_terminating(c) {
            self.terminating.push(b);
        }
    }

    fn finish(&mut self) {
        for v in [&mut self.ready, &mut self.terminating, &mut self.in_zone] {
            v.sort_unstable();
            v.dedup();
        }
    }

    /// Who gets new connections: the ready ones, else the serving terminating ones.
    fn active(&self) -> &[BackendAddr] {
        if self.ready.is_empty() {
            &self.terminating
        } else {
            &self.ready
        }
    }

    /// Who gets new cluster-wide connections (a Cluster traffic policy), with
    /// kube-proxy's topology rule (`pkg/proxy/topology.go`): if every ready endpoint has
    /// a zone hint and at least one is hinted for this node's zone, the ready ones hinted
    /// for it; otherwise hints are not used (`active`). No ready endpoint anywhere: the
    /// serving terminating ones, whatever their hints.
    fn active_in_zone(&self) -> &[BackendAddr] {
        if !self.unhinted && !self.in_zone.is_empty() {
            &self.in_zone
        } else {
            self.active()
        }
    }
}

/// `set` as a shared slice, re-using `known` when it holds the same backends (the
/// common case: every endpoint ready), so the two cost one allocation.
fn shared(set: &[BackendAddr], known: &Backends) -> Backends {
    if set == &known[..] {
        known.clone()
    } else {
        set.into()
    }
}

/// Frontends and backends of one Service, from the slices that belong to it.
///
/// The ClusterIP uses every endpoint, or with internalTrafficPolicy `Local` this node's
/// only (none: refused, the terminating fallback applying to the local subset, as
/// kube-proxy does). Frontends reached from outside (NodePort, external
/// and LoadBalancer IPs) follow the externalTrafficPolicy, as kube-proxy does: `Cluster`
/// (the default), every endpoint, those of other nodes marked `remote` (the datapath
/// source-NATs flows to them to this node's address); `Local`, this node's endpoints
/// only (the client's address is kept). A family in which this node has no address to
/// source-NAT to (`SnatSources`) serves its external frontends locally only.
///
/// Topology, as kube-proxy: the endpoints a Cluster policy uses (the ClusterIP with
/// internalTrafficPolicy `Cluster`, the external frontends with externalTrafficPolicy
/// `Cluster`) are narrowed to those hinted for this node's zone (`hints.forZones`, which
/// the EndpointSlice controller sets for `trafficDistribution: PreferClose` or the
/// topology-mode annotation), when every ready endpoint of the port has a zone hint and
/// at least one is for this zone; otherwise every endpoint. A Local policy uses this
/// node's endpoints, whatever their hints.
pub fn service_frontends<'a>(
    svc: &Service,
    slices: impl IntoIterator<Item = &'a EndpointSlice> + Clone,
    node: &Node,
) -> BTreeMap<FrontendAddr, FrontendSpec> {
    let mut out = BTreeMap::new();
    let snat = SnatSources::of(node);
    let zone = node.zone.as_deref();
    for sp in &svc.ports {
        let service: Arc<str> = format!("{}/{}:{}", svc.namespace, svc.name, sp.name).into();
        let frontends = port_frontends(svc, sp, node);
        for family in svc.families() {
            // Endpoints of this family from all slices, deduplicated by (address, port);
            // an address listed as ready anywhere counts as ready.
            let mut all = Pool::default();
            let mut local = Pool::default();
            let mut known = Vec::new();
            for slice in slices.clone() {
                if slice.namespace != svc.namespace || slice.service_name != svc.name {
                    continue;
                }
                let Some(ep_port) = slice
                    .ports
                    .iter()
                    .find(|p| p.name == sp.name && p.protocol == sp.protocol)
                else {
                    continue;
                };
                for ep in slice
                    .endpoints
                    .iter()
                    .filter(|ep| IpFamily::of(&ep.address) == family)
                {
                    let is_local = node.is_local(ep.node_name.as_deref());
                    let b = BackendAddr {
                        ip: ep.address,
                        port: ep_port.port,
                        proto: sp.protocol,
                        remote: !is_local,
                    };
                    known.push(b);
                    all.add(b, ep, zone);
                    if is_local {
                        local.add(b, ep, zone);
                    }
                }
            }
            known.sort_unstable();
            known.dedup();
            all.finish();
            local.finish();
            let known: Backends = known.into();
            // Cluster-wide traffic follows the topology hints; this node's own
            // endpoints (the Local policies) do not (kube-proxy's CategorizeEndpoints).
            let all = shared(all.active_in_zone(), &known);
            let mut local_active = None;
            let policy_local = svc.external_traffic_policy == TrafficPolicy::Local;
            let external_local = policy_local || !snat.has(family);
            for (fe, kind) in frontends
                .iter()
                .filter(|(fe, _)| IpFamily::of(&fe.ip) == family)
            {
                // 127.0.0.1:NodePort is reached from the node itself only: every
                // endpoint, whatever the policy, as kube-proxy sends traffic of the
                // node (`--src-type LOCAL`) to the Service's cluster chain.
                let host_only = fe.ip.is_loopback();
                let local_only = if host_only {
                    false
                } else if kind.is_external() {
                    external_local
                } else {
                    svc.internal_traffic_policy == TrafficPolicy::Local
                };
                let active = if local_only {
                    local_active
                        .get_or_insert_with(|| shared(local.active(), &known))
                        .clone()
                } else {
                    all.clone()
                };
                let local = policy_local && kind.is_external() && !host_only;
                let outside = out.entry(*fe).or_insert_with(|| FrontendSpec {
                    service: service.clone(),
                    kind: *kind,
                    local,
                    host_only,
                    affinity_timeout_s: svc.affinity_timeout_s(),
                    source_ranges: source_ranges(svc, fe, *kind, node),
                    active,
                    known: known.clone(),
                });
                if local {
                    // Its inside view: what the node's own sockets and its pods' get,
                    // every endpoint (kube-proxy's `--src-type LOCAL` and pod
                    // short-circuit to the Service's cluster chain); otherwise the same.
                    let inside = FrontendSpec {
                        local: false,
                        active: all.clone(),
                        ..outside.clone()
                    };
                    out.entry(fe.in_scope(Scope::Inside)).or_insert(inside);
                }
            }
        }
    }
    out
}

/// The loadBalancerSourceRanges of a frontend, as kube-proxy applies them: a
/// LoadBalancer IP gets the ranges of its own family (host bits cleared); when one of
/// them holds an address of this node, also the frontend's own address (a request of
/// the node to a VIP it holds loops back with the VIP as its source). Other frontends
/// (the ClusterIP, NodePorts, external IPs) are open to every source.
fn source_ranges(
    svc: &Service,
    fe: &FrontendAddr,
    kind: FrontendKind,
    node: &Node,
) -> Arc<[IpNet]> {
    if kind != FrontendKind::LoadBalancer || svc.load_balancer_source_ranges.is_empty() {
        return Arc::new([]);
    }
    let family = IpFamily::of(&fe.ip);
    let mut ranges: Vec<IpNet> = svc
        .load_balancer_source_ranges
        .iter()
        .filter(|r| IpFamily::of(&r.addr()) == family)
        .map(IpNet::trunc)
        .collect();
    if ranges.is_empty() {
        // Only ranges of the other family: open, as kube-proxy's proxier of this family
        // filters them out as the wrong version and then has none (ARCHITECTURE.md).
        return Arc::new([]);
    }
    if node
        .addresses
        .iter()
        .any(|a| ranges.iter().any(|r| r.contains(a)))
    {
        ranges.push(IpNet::from(fe.ip));
    }
    ranges.sort_unstable();
    ranges.dedup();
    ranges.into()
}

/// The health check of a Service with a `healthCheckNodePort`: this node's ready
/// endpoints, as kube-proxy counts them (a terminating endpoint is not counted, even
/// serving: "should fail health check node port if there are only terminating
/// endpoints").
pub fn health_check<'a>(
    svc: &Service,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    node: &Node,
) -> Option<HealthCheck> {
    let port = svc.health_check_node_port?;
    let mut ready: Vec<IpAddr> = slices
        .into_iter()
        .filter(|s| s.namespace == svc.namespace && s.service_name == svc.name)
        .flat_map(|s| s.endpoints.iter())
        .filter(|ep| node.is_local(ep.node_name.as_deref()) && is_ready(&ep.conditions))
        .map(|ep| ep.address)
        .collect();
    ready.sort_unstable();
    ready.dedup();
    Some(HealthCheck {
        port,
        namespace: svc.namespace.clone(),
        name: svc.name.clone(),
        local_endpoints: ready.len(),
    })
}

/// The whole desired state from a set of Services and EndpointSlices, computed from
/// scratch (`ModelCache` keeps the same result up to date object by object).
/// Callers pass only valid objects (see `validate`); a frontend claimed by two Services
/// goes to the first in (namespace, name) order, as a stable rule.
pub fn desired_state(services: &[Service], slices: &[EndpointSlice], node: &Node) -> DesiredState {
    let mut by_service: BTreeMap<(&str, &str), Vec<&EndpointSlice>> = BTreeMap::new();
    for s in slices {
        by_service
            .entry((s.namespace.as_str(), s.service_name.as_str()))
            .or_default()
            .push(s);
    }
    let mut sorted: Vec<&Service> = services.iter().collect();
    sorted.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let mut state = DesiredState {
        snat: SnatSources::of(node),
        ..DesiredState::default()
    };
    for svc in sorted {
        let mine = by_service
            .get(&(svc.namespace.as_str(), svc.name.as_str()))
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        for (fe, spec) in service_frontends(svc, mine.iter().copied(), node) {
            state.frontends.entry(fe).or_insert(spec);
        }
    }
    state
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{fixtures::*, objects::*, validate::validate_service};

    #[test]
    fn target_port_comes_from_the_slice_port_matched_by_name() {
        let s = svc(
            "web",
            "10.96.0.10",
            &[
                ("http", 80, Protocol::Tcp),
                ("metrics", 9090, Protocol::Tcp),
            ],
        );
        let sl = slice(
            "web-1",
            "web",
            &[
                ("http", 8080, Protocol::Tcp),
                ("metrics", 9100, Protocol::Tcp),
            ],
            vec![ep("10.244.0.2", Some(true), None, None)],
        );
        let st = desired_state(&[s], &[sl], &Node::default());
        let http = &st.frontends[&FrontendAddr::new(ip("10.96.0.10"), 80, Protocol::Tcp)];
        assert_eq!(
            http.active.iter().copied().collect::<Vec<_>>(),
            vec![b("10.244.0.2", 8080)]
        );
        let m = &st.frontends[&FrontendAddr::new(ip("10.96.0.10"), 9090, Protocol::Tcp)];
        assert_eq!(
            m.active.iter().copied().collect::<Vec<_>>(),
            vec![b("10.244.0.2", 9100)]
        );
    }

    #[test]
    fn not_ready_endpoints_are_known_but_not_active() {
        let s = svc("web", "10.96.0.10", &[("", 80, Protocol::Tcp)]);
        let sl = slice(
            "web-1",
            "web",
            &[("", 8080, Protocol::Tcp)],
            vec![
                ep("10.244.0.2", Some(true), None, None),
                ep("10.244.0.3", Some(false), Some(false), None),
                ep("10.244.0.4", None, None, None),
            ],
        );
        let st = desired_state(&[s], &[sl], &Node::default());
        let f = st.frontends.values().next().unwrap();
        assert_eq!(f.active.len(), 2, "unset ready counts as ready");
        assert!(!f.active.contains(&b("10.244.0.3", 8080)));
        assert!(f.known.contains(&b("10.244.0.3", 8080)));
    }

    #[test]
    fn terminating_serving_endpoints_are_used_only_when_none_is_ready() {
        let s = svc("web", "10.96.0.10", &[("", 80, Protocol::Tcp)]);
        let term = ep("10.244.0.3", Some(false), Some(true), Some(true));
        let gone = ep("10.244.0.5", Some(false), Some(false), Some(true));
        let with_ready = slice(
            "a",
            "web",
            &[("", 80, Protocol::Tcp)],
            vec![ep("10.244.0.2", Some(true), None, None), term.clone()],
        );
        let st = desired_state(std::slice::from_ref(&s), &[with_ready], &Node::default());
        assert_eq!(st.frontends.values().next().unwrap().active.len(), 1);
        let only_term = slice("a", "web", &[("", 80, Protocol::Tcp)], vec![term, gone]);
        let st = desired_state(&[s], &[only_term], &Node::default());
        let f = st.frontends.values().next().unwrap();
        assert_eq!(
            f.active.iter().copied().collect::<Vec<_>>(),
            vec![b("10.244.0.3", 80)]
        );
    }

    #[test]
    fn endpoints_from_several_slices_are_merged_and_deduplicated() {
        let s = svc("web", "10.96.0.10", &[("", 80, Protocol::Tcp)]);
        let p = &[("", 8080, Protocol::Tcp)];
        let a = slice(
            "a",
            "web",
            p,
            vec![ep("10.244.0.2", Some(true), None, None)],
        );
        let c = slice(
            "c",
            "web",
            p,
            vec![
                ep("10.244.0.2", Some(true), None, None),
                ep("10.244.0.3", None, None, None),
            ],
        );
        let other = slice("o", "other", p, vec![ep("10.244.0.9", None, None, None)]);
        let st = desired_state(&[s], &[a, c, other], &Node::default());
        let f = st.frontends.values().next().unwrap();
        assert_eq!(f.active.len(), 2);
        assert!(!f.known.contains(&b("10.244.0.9", 8080)));
    }

    #[test]
    fn udp_port_matches_only_udp_slice_ports() {
        let s = svc(
            "dns",
            "10.96.0.53",
            &[("dns", 53, Protocol::Udp), ("dns-tcp", 53, Protocol::Tcp)],
        );
        let sl = slice(
            "dns-1",
            "dns",
            &[
                ("dns", 5353, Protocol::Udp),
                ("dns-tcp", 5354, Protocol::Tcp),
            ],
            vec![ep("10.244.0.2", None, None, None)],
        );
        let st = desired_state(&[s], &[sl], &Node::default());
        assert_eq!(st.frontends.len(), 2);
        let udp = &st.frontends[&FrontendAddr::new(ip("10.96.0.53"), 53, Protocol::Udp)];
        let got: Vec<_> = udp.active.iter().map(|b| (b.port, b.proto)).collect();
        assert_eq!(got, vec![(5353, Protocol::Udp)]);
    }

    #[test]
    fn service_without_slices_has_a_frontend_with_no_backend() {
        let st = desired_state(
            &[svc("web", "10.96.0.10", &[("", 80, Protocol::Tcp)])],
            &[],
            &Node::default(),
        );
        let f = st.frontends.values().next().unwrap();
        assert!(f.active.is_empty());
        assert_eq!(&*f.service, "default/web:");
    }

    #[test]
    fn node_ports_open_on_every_node_address_with_the_node_port() {
        let me = node(Some("node-a"), &["192.168.1.1", "10.0.0.1"]);
        let s = web(ServiceType::NodePort, Some(30080));
        let sl = web_slice(vec![on(Some("node-a"), ep("10.244.0.2", None, None, None))]);
        let st = desired_state(std::slice::from_ref(&s), &[sl], &me);
        let backend = vec![b("10.244.0.2", 8080)];
        assert_eq!(
            kinds_and_active(&st),
            BTreeMap::from([
                (
                    fa("10.96.0.10", 80),
                    (FrontendKind::ClusterIP, backend.clone())
                ),
                (
                    fa("10.0.0.1", 30080),
                    (FrontendKind::NodePort, backend.clone())
                ),
                (fa("192.168.1.1", 30080), (FrontendKind::NodePort, backend)),
            ])
        );
        assert!(st
            .frontends
            .values()
            .all(|f| &*f.service == "default/web:http"));
        // The Service port is not opened on the node addresses, only the nodePort.
        assert!(!st.frontends.contains_key(&fa("192.168.1.1", 80)));
        // Without node addresses (not listed yet) there is no NodePort frontend.
        let st = desired_state(&[s], &[], &node(Some("node-a"), &[]));
        assert_eq!(
            st.frontends.keys().copied().collect::<Vec<_>>(),
            vec![fa("10.96.0.10", 80)]
        );
        // A nodePort on a ClusterIP Service (which validation rejects) opens nothing.
        let cluster_ip = web(ServiceType::ClusterIP, Some(30080));
        assert_eq!(
            port_frontends(&cluster_ip, &cluster_ip.ports[0], &me),
            vec![(fa("10.96.0.10", 80), FrontendKind::ClusterIP)]
        );
    }

    #[test]
    fn external_and_load_balancer_ips_use_the_service_port() {
        let me = node(None, &["192.168.1.1"]);
        let mut s = web(ServiceType::LoadBalancer, Some(30080));
        s.external_ips = vec![ip("203.0.113.5")];
        s.load_balancer_ips = vec![ip("198.51.100.7"), ip("198.51.100.8")];
        assert_eq!(validate_service(&s), Ok(()));
        assert_eq!(
            port_frontends(&s, &s.ports[0], &me),
            vec![
                (fa("10.96.0.10", 80), FrontendKind::ClusterIP),
                (fa("192.168.1.1", 30080), FrontendKind::NodePort),
                (fa("203.0.113.5", 80), FrontendKind::ExternalIP),
                (fa("198.51.100.7", 80), FrontendKind::LoadBalancer),
                (fa("198.51.100.8", 80), FrontendKind::LoadBalancer),
            ]
        );
        let st = desired_state(
            &[s],
            &[web_slice(vec![ep("10.244.0.2", None, None, None)])],
            &me,
        );
        assert_eq!(st.frontends.len(), 5);
        for f in st.frontends.values() {
            assert_eq!(
                f.active.iter().copied().collect::<Vec<_>>(),
                vec![b("10.244.0.2", 8080)]
            );
        }
        // externalIPs are valid on a ClusterIP Service too (as in Kubernetes).
        let mut c = web(ServiceType::ClusterIP, None);
        c.external_ips = vec![ip("203.0.113.5")];
        assert_eq!(validate_service(&c), Ok(()));
        assert_eq!(
            port_frontends(&c, &c.ports[0], &me),
            vec![
                (fa("10.96.0.10", 80), FrontendKind::ClusterIP),
                (fa("203.0.113.5", 80), FrontendKind::ExternalIP),
            ]
        );
    }

    /// kube-proxy's firewall: loadBalancerSourceRanges filter the LoadBalancer IPs only,
    /// each frontend with the ranges of its family, and let the node reach a VIP it holds
    /// when a range holds the node's address.
    #[test]
    fn load_balancer_source_ranges_filter_the_load_balancer_ips_only() {
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        let me = node(None, &["192.168.1.1"]);
        let mut s = web(ServiceType::LoadBalancer, Some(30080));
        s.external_ips = vec![ip("203.0.113.5")];
        s.load_balancer_ips = vec![ip("198.51.100.7")];
        s.load_balancer_source_ranges = vec![net("10.1.2.3/16"), net("2001:db8::/32")];
        assert_eq!(validate_service(&s), Ok(()));
        let slices = [web_slice(vec![ep("10.244.0.2", None, None, None)])];
        let st = desired_state(std::slice::from_ref(&s), &slices, &me);
        for (fe, spec) in &st.frontends {
            let want: Vec<IpNet> = if spec.kind == FrontendKind::LoadBalancer {
                vec![net("10.1.0.0/16")]
            } else {
                vec![]
            };
            assert_eq!(
                &spec.source_ranges[..],
                &want[..],
                "{fe}: host bits cleared, IPv4 only"
            );
        }
        // A range holding the node's address also lets the VIP itself in.
        s.load_balancer_source_ranges.push(net("192.168.0.0/16"));
        let st = desired_state(std::slice::from_ref(&s), &slices, &me);
        assert_eq!(
            &st.frontends[&fa("198.51.100.7", 80)].source_ranges[..],
            &[
                net("10.1.0.0/16"),
                net("192.168.0.0/16"),
                net("198.51.100.7/32")
            ]
        );
        // Only ranges of the other family: open, as kube-proxy's proxier of this family.
        s.load_balancer_source_ranges = vec![net("2001:db8::/32")];
        let st = desired_state(std::slice::from_ref(&s), &slices, &me);
        assert!(st.frontends[&fa("198.51.100.7", 80)]
            .source_ranges
            .is_empty());
        // An IPv4-mapped IPv6 range would reach IPv4 sources in the maps: refused.
        s.load_balancer_source_ranges = vec![net("::ffff:10.0.0.0/104")];
        assert!(validate_service(&s)
            .unwrap_err()
            .to_string()
            .contains("IPv4-mapped"));
    }

    #[test]
    fn load_balancer_ips_need_type_load_balancer() {
        let me = node(None, &["192.168.1.1"]);
        for t in [ServiceType::ClusterIP, ServiceType::NodePort] {
            let np = (t == ServiceType::NodePort).then_some(30080);
            let mut s = web(t, np);
            s.load_balancer_ips = vec![ip("198.51.100.7")];
            assert_eq!(
                validate_service(&s).unwrap_err().to_string(),
                "Service default/web: loadBalancerIPs needs type LoadBalancer",
                "{t:?}"
            );
            let fes = port_frontends(&s, &s.ports[0], &me);
            assert!(
                fes.iter()
                    .all(|(fe, kind)| *kind != FrontendKind::LoadBalancer
                        && fe.ip != ip("198.51.100.7")),
                "{t:?}: {fes:?}"
            );
            let st = desired_state(&[s], &[], &me);
            assert!(!st.frontends.contains_key(&fa("198.51.100.7", 80)), "{t:?}");
        }
    }

    /// kube-proxy's rule: from outside, Cluster reaches every endpoint (those of other
    /// nodes marked remote, for the datapath's SNAT), Local this node's only.
    #[test]
    fn external_frontends_follow_the_external_traffic_policy() {
        let me = node(Some("node-a"), &["192.168.1.1"]);
        let sl = web_slice(vec![
            on(Some("node-a"), ep("10.244.0.2", None, None, None)),
            on(Some("node-b"), ep("10.244.1.2", None, None, None)),
            on(None, ep("10.244.2.2", None, None, None)),
            on(
                Some("node-a"),
                ep("10.244.0.3", Some(false), Some(false), None),
            ),
        ]);
        // 10.244.2.2 has no nodeName: not local, as kube-proxy counts it.
        let all = vec![
            b("10.244.0.2", 8080),
            rb("10.244.1.2", 8080),
            rb("10.244.2.2", 8080),
        ];
        let local = vec![b("10.244.0.2", 8080)];
        for policy in [TrafficPolicy::Cluster, TrafficPolicy::Local] {
            let external = if policy == TrafficPolicy::Cluster {
                all.clone()
            } else {
                local.clone()
            };
            let mut s = web(ServiceType::LoadBalancer, Some(30080));
            s.external_ips = vec![ip("203.0.113.5")];
            s.load_balancer_ips = vec![ip("198.51.100.7")];
            s.external_traffic_policy = policy;
            let st = desired_state(&[s], std::slice::from_ref(&sl), &me);
            let mut want = BTreeMap::from([
                (fa("10.96.0.10", 80), (FrontendKind::ClusterIP, all.clone())),
                (
                    fa("192.168.1.1", 30080),
                    (FrontendKind::NodePort, external.clone()),
                ),
                (
                    fa("198.51.100.7", 80),
                    (FrontendKind::LoadBalancer, external.clone()),
                ),
                (
                    fa("203.0.113.5", 80),
                    (FrontendKind::ExternalIP, external.clone()),
                ),
            ]);
            if policy == TrafficPolicy::Local {
                // The inside views (the node's own sockets, its pods'): every endpoint.
                for (fe, (kind, _)) in want.clone().into_iter().skip(1) {
                    want.insert(fe.in_scope(Scope::Inside), (kind, all.clone()));
                }
            }
            assert_eq!(kinds_and_active(&st), want, "{policy:?}");
            // Every frontend knows every endpoint, ready or not, local or not.
            for f in st.frontends.values() {
                assert_eq!(f.known.len(), 4, "{policy:?}: {f:?}");
            }
        }
        // A node without an address of the family has no source to give a flow sent
        // to another node: its external IPs of that family stay local (and it has no
        // NodePort there).
        let v6_only = node(Some("node-a"), &["fd00::1"]);
        let mut s = web(ServiceType::LoadBalancer, Some(30080));
        s.external_ips = vec![ip("203.0.113.5")];
        let st = desired_state(&[s], std::slice::from_ref(&sl), &v6_only);
        assert_eq!(st.snat.v4, None);
        assert_eq!(st.snat.v6, Some(ip("fd00::1")));
        assert_eq!(
            st.frontends[&fa("203.0.113.5", 80)].active[..],
            local[..],
            "no IPv4 source to SNAT to"
        );
        assert_eq!(st.frontends[&fa("10.96.0.10", 80)].active[..], all[..]);
    }

    /// [sig-network] Services should respect internalTrafficPolicy=Local Pod to Pod, and
    /// should fallback to local terminating endpoints when there are no ready endpoints
    /// with internalTrafficPolicy=Local: the cluster IP is served by this node's
    /// endpoints only (the terminating ones when none is ready), none: no backend
    /// (refused); the NodePort keeps following the externalTrafficPolicy.
    #[test]
    fn internal_traffic_policy_local_serves_the_cluster_ip_from_this_node_only() {
        let me = node(Some("node-a"), &["192.168.1.1"]);
        let mut s = web(ServiceType::NodePort, Some(30080));
        s.internal_traffic_policy = TrafficPolicy::Local;
        let remote = on(Some("node-b"), ep("10.244.1.2", None, None, None));
        let local = on(Some("node-a"), ep("10.244.0.2", None, None, None));
        let local_terminating = on(
            Some("node-a"),
            ep("10.244.0.3", Some(false), Some(true), Some(true)),
        );
        let st = desired_state(
            std::slice::from_ref(&s),
            &[web_slice(vec![remote.clone(), local.clone()])],
            &me,
        );
        assert_eq!(
            kinds_and_active(&st),
            BTreeMap::from([
                (
                    fa("10.96.0.10", 80),
                    (FrontendKind::ClusterIP, vec![b("10.244.0.2", 8080)])
                ),
                (
                    fa("192.168.1.1", 30080),
                    (
                        FrontendKind::NodePort,
                        vec![b("10.244.0.2", 8080), rb("10.244.1.2", 8080)]
                    )
                ),
            ])
        );
        let st = desired_state(
            std::slice::from_ref(&s),
            &[web_slice(vec![remote.clone(), local_terminating])],
            &me,
        );
        assert_eq!(
            st.frontends[&fa("10.96.0.10", 80)].active[..],
            [b("10.244.0.3", 8080)],
            "the local terminating endpoint, not the remote ready one"
        );
        let st = desired_state(&[s], &[web_slice(vec![remote])], &me);
        assert!(st.frontends[&fa("10.96.0.10", 80)].active.is_empty());
        assert_eq!(st.frontends[&fa("10.96.0.10", 80)].known.len(), 1);
    }

    #[test]
    fn terminating_fallback_applies_to_the_local_subset() {
        let me = node(Some("node-a"), &["192.168.1.1"]);
        let mut s = web(ServiceType::NodePort, Some(30080));
        s.external_traffic_policy = TrafficPolicy::Local;
        let remote_ready = on(Some("node-b"), ep("10.244.1.2", Some(true), None, None));
        let local_term = on(
            Some("node-a"),
            ep("10.244.0.2", Some(false), Some(true), Some(true)),
        );
        let local_gone = on(
            Some("node-a"),
            ep("10.244.0.3", Some(false), Some(false), Some(true)),
        );
        // A ready endpoint elsewhere does not stop the local fallback (and the local
        // terminating one does not reach the ClusterIP, which has a ready one).
        let st = desired_state(
            std::slice::from_ref(&s),
            &[web_slice(vec![
                remote_ready.clone(),
                local_term,
                local_gone.clone(),
            ])],
            &me,
        );
        assert_eq!(
            kinds_and_active(&st),
            BTreeMap::from([
                (
                    fa("10.96.0.10", 80),
                    (FrontendKind::ClusterIP, vec![rb("10.244.1.2", 8080)])
                ),
                (
                    fa("192.168.1.1", 30080),
                    (FrontendKind::NodePort, vec![b("10.244.0.2", 8080)])
                ),
                // The node's own view: the cluster-wide rule (a ready endpoint, so no
                // terminating one).
                (
                    fa("192.168.1.1", 30080).in_scope(Scope::Inside),
                    (FrontendKind::NodePort, vec![rb("10.244.1.2", 8080)])
                ),
            ])
        );
        // A local ready endpoint takes over from the local terminating one.
        let st = desired_state(
            std::slice::from_ref(&s),
            &[web_slice(vec![
                remote_ready.clone(),
                on(
                    Some("node-a"),
                    ep("10.244.0.2", Some(false), Some(true), Some(true)),
                ),
                on(Some("node-a"), ep("10.244.0.4", None, None, None)),
            ])],
            &me,
        );
        assert_eq!(
            st.frontends[&fa("192.168.1.1", 30080)]
                .active
                .iter()
                .copied()
                .collect::<Vec<_>>(),
            vec![b("10.244.0.4", 8080)]
        );
        // Nothing local that serves: the NodePort has no backend, the ClusterIP keeps one.
        let st = desired_state(&[s], &[web_slice(vec![remote_ready, local_gone])], &me);
        assert!(st.frontends[&fa("192.168.1.1", 30080)].active.is_empty());
        assert_eq!(st.frontends[&fa("192.168.1.1", 30080)].known.len(), 2);
        assert_eq!(st.frontends[&fa("10.96.0.10", 80)].active.len(), 1);
    }

    #[test]
    fn locality_is_the_endpoint_node_name_as_kube_proxy_counts_it() {
        let s = web(ServiceType::NodePort, Some(30080));
        let sl = web_slice(vec![
            on(Some("node-a"), ep("10.244.0.2", None, None, None)),
            on(Some("node-b"), ep("10.244.1.2", None, None, None)),
        ]);
        let st = desired_state(&[s], &[sl], &node(None, &["192.168.1.1"]));
        assert_eq!(st.frontends[&fa("192.168.1.1", 30080)].active.len(), 2);
        let unnamed = Node::default();
        assert!(unnamed.is_local(Some("node-b")) && unnamed.is_local(None));
        // A node with a name: only endpoints naming it are local, and one without a
        // nodeName is not (kube-proxy's rule).
        let a = node(Some("node-a"), &[]);
        assert!(a.is_local(Some("node-a")));
        assert!(!a.is_local(None));
        assert!(!a.is_local(Some("node-b")));
    }

    /// kube-proxy's topology rule (pkg/proxy/topology.go): traffic under a Cluster
    /// policy goes to the ready endpoints hinted for this node's zone, when every ready
    /// endpoint has a zone hint and one is for this zone; a Local policy keeps this
    /// node's endpoints whatever their hints.
    #[test]
    fn zone_hints_narrow_cluster_wide_traffic_to_this_zone() {
        let me = in_zone("zone-a", node(Some("node-a"), &["192.168.1.1"]));
        let a1 = hinted(
            &["zone-a"],
            on(Some("node-a"), ep("10.244.0.2", None, None, None)),
        );
        let a2 = hinted(
            &["zone-a"],
            on(Some("node-c"), ep("10.244.2.2", None, None, None)),
        );
        let b1 = hinted(
            &["zone-b"],
            on(Some("node-b"), ep("10.244.1.2", None, None, None)),
        );
        let svc = web(ServiceType::NodePort, Some(30080));
        let in_a = vec![b("10.244.0.2", 8080), rb("10.244.2.2", 8080)];
        let every = vec![
            b("10.244.0.2", 8080),
            rb("10.244.1.2", 8080),
            rb("10.244.2.2", 8080),
        ];
        let active = |s: &Service, eps: Vec<Endpoint>, n: &Node| {
            let st = desired_state(std::slice::from_ref(s), &[web_slice(eps)], n);
            (
                st.frontends[&fa("10.96.0.10", 80)].active.to_vec(),
                st.frontends[&fa("192.168.1.1", 30080)].active.to_vec(),
            )
        };
        let all3 = vec![a1.clone(), a2.clone(), b1.clone()];
        // Every endpoint hinted, two for zone-a: the ClusterIP and the NodePort
        // (externalTrafficPolicy Cluster) use those two; both stay known.
        assert_eq!(
            active(&svc, all3.clone(), &me),
            (in_a.clone(), in_a.clone())
        );
        let st = desired_state(std::slice::from_ref(&svc), &[web_slice(all3.clone())], &me);
        assert_eq!(st.frontends[&fa("10.96.0.10", 80)].known.len(), 3);
        // A node of zone-b (node-b) uses zone-b's.
        let zone_b = in_zone("zone-b", node(Some("node-b"), &["192.168.1.1"]));
        assert_eq!(
            active(&svc, all3.clone(), &zone_b).0,
            [b("10.244.1.2", 8080)]
        );
        // Fallbacks, every endpoint used: one ready endpoint without a hint; no hint
        // for this zone; a node without a zone label.
        let unhinted = on(Some("node-b"), ep("10.244.1.2", None, None, None));
        let every_unhinted = active(&svc, vec![a1.clone(), a2.clone(), unhinted], &me);
        assert_eq!(
            every_unhinted,
            (every.clone(), every.clone()),
            "an endpoint without hints"
        );
        let zone_c = in_zone("zone-c", node(Some("node-a"), &["192.168.1.1"]));
        assert_eq!(
            active(&svc, all3.clone(), &zone_c),
            (every.clone(), every.clone())
        );
        let no_zone = node(Some("node-a"), &["192.168.1.1"]);
        assert_eq!(
            active(&svc, all3.clone(), &no_zone),
            (every.clone(), every.clone())
        );
        // Only ready endpoints count: an unhinted one that is not ready changes nothing.
        let not_ready = on(Some("node-b"), ep("10.244.1.3", Some(false), None, None));
        assert_eq!(
            active(
                &svc,
                vec![a1.clone(), a2.clone(), b1.clone(), not_ready],
                &me
            ),
            (in_a.clone(), in_a.clone())
        );
        // An endpoint hinted for two zones serves both.
        let ab = hinted(
            &["zone-a", "zone-b"],
            on(Some("node-b"), ep("10.244.1.2", None, None, None)),
        );
        assert_eq!(
            active(&svc, vec![a1.clone(), ab.clone()], &zone_b).0,
            [b("10.244.1.2", 8080)]
        );
        assert_eq!(
            active(&svc, vec![a1.clone(), ab], &me).0,
            [b("10.244.0.2", 8080), rb("10.244.1.2", 8080)]
        );
        // No ready endpoint anywhere: the serving terminating ones, whatever their hints.
        let term_b = hinted(
            &["zone-b"],
            on(
                Some("node-b"),
                ep("10.244.1.2", Some(false), Some(true), Some(true)),
            ),
        );
        assert_eq!(active(&svc, vec![term_b], &me).0, [rb("10.244.1.2", 8080)]);
        // Local policies: this node's endpoints, whatever the hints (a zone-b endpoint
        // on this node serves its Local frontends, zone-a's on other nodes do not).
        let mut local = svc.clone();
        local.internal_traffic_policy = TrafficPolicy::Local;
        local.external_traffic_policy = TrafficPolicy::Local;
        let here_b = hinted(
            &["zone-b"],
            on(Some("node-a"), ep("10.244.0.3", None, None, None)),
        );
        assert_eq!(
            active(&local, vec![a2.clone(), b1.clone(), here_b.clone()], &me),
            (vec![b("10.244.0.3", 8080)], vec![b("10.244.0.3", 8080)])
        );
        // Mixed: internalTrafficPolicy Cluster follows the hints, externalTrafficPolicy
        // Local does not.
        let mut mixed = svc.clone();
        mixed.external_traffic_policy = TrafficPolicy::Local;
        assert_eq!(
            active(&mixed, vec![a2.clone(), b1.clone(), here_b], &me),
            (vec![rb("10.244.2.2", 8080)], vec![b("10.244.0.3", 8080)])
        );
    }

    /// [sig-network] Services should be able to connect to terminating and unready
    /// endpoints if PublishNotReadyAddresses is true: the EndpointSlice controller then
    /// publishes a terminating, not serving pod as ready (`ready: true, serving: false,
    /// terminating: true`), and kube-proxy uses an endpoint whose ready condition is
    /// true, terminating or not; so does the model, on every frontend, here or not.
    #[test]
    fn a_published_not_ready_endpoint_is_used_while_terminating() {
        let me = node(Some("node-b"), &["192.168.1.1"]);
        let published = on(
            Some("node-a"),
            ep("10.244.0.2", Some(true), Some(false), Some(true)),
        );
        let st = desired_state(
            &[web(ServiceType::NodePort, Some(30080))],
            &[web_slice(vec![published.clone()])],
            &me,
        );
        for fe in [fa("10.96.0.10", 80), fa("192.168.1.1", 30080)] {
            assert_eq!(
                st.frontends[&fe].active[..],
                [rb("10.244.0.2", 8080)],
                "{fe}"
            );
        }
        // It counts as ready: a serving terminating endpoint is not used beside it.
        let serving = on(
            Some("node-a"),
            ep("10.244.0.3", Some(false), Some(true), Some(true)),
        );
        let st = desired_state(
            &[web(ServiceType::ClusterIP, None)],
            &[web_slice(vec![published, serving])],
            &me,
        );
        assert_eq!(
            st.frontends[&fa("10.96.0.10", 80)].active[..],
            [rb("10.244.0.2", 8080)]
        );
    }

    /// kube-proxy (iptables `KUBE-EXT-*`: `--src-type LOCAL -j KUBE-SVC-*`, and the
    /// pods' short-circuit): traffic of the node itself and of its pods to an
    /// externalTrafficPolicy Local frontend goes to every endpoint; only traffic from
    /// outside is kept to the local ones. Each such frontend has an inside view with the
    /// cluster-wide endpoints, an ordinary frontend of its own that only the socket
    /// programs look up.
    #[test]
    fn an_external_traffic_policy_local_frontend_has_an_inside_view_with_every_endpoint() {
        let me = node(Some("node-a"), &["192.168.1.1"]);
        let mut s = web(ServiceType::LoadBalancer, Some(30080));
        s.load_balancer_ips = vec![ip("198.51.100.7")];
        s.external_traffic_policy = TrafficPolicy::Local;
        let sl = web_slice(vec![
            on(Some("node-a"), ep("10.244.0.2", None, None, None)),
            on(Some("node-b"), ep("10.244.1.2", None, None, None)),
        ]);
        let st = desired_state(std::slice::from_ref(&s), std::slice::from_ref(&sl), &me);
        let (local, every) = (
            vec![b("10.244.0.2", 8080)],
            vec![b("10.244.0.2", 8080), rb("10.244.1.2", 8080)],
        );
        for (fe, kind) in [
            (fa("192.168.1.1", 30080), FrontendKind::NodePort),
            (fa("198.51.100.7", 80), FrontendKind::LoadBalancer),
        ] {
            let outside = &st.frontends[&fe];
            let inside = &st.frontends[&fe.in_scope(Scope::Inside)];
            assert_eq!(outside.active[..], local[..], "{fe}");
            assert_eq!(inside.active[..], every[..], "{fe}");
            assert!(outside.local, "{fe}: from outside, Local");
            assert!(!inside.local, "{fe}: from inside, no local rule");
            assert_eq!((outside.kind, inside.kind), (kind, kind));
            assert_eq!(inside.known, outside.known);
            assert_eq!(inside.service, outside.service);
        }
        // The ClusterIP has one view (it is every endpoint's already).
        assert!(!st
            .frontends
            .contains_key(&fa("10.96.0.10", 80).in_scope(Scope::Inside)));
        assert_eq!(st.frontends.len(), 5);
        // No local endpoint: dropped from outside, every endpoint from inside.
        let remote_only = web_slice(vec![on(Some("node-b"), ep("10.244.1.2", None, None, None))]);
        let st = desired_state(std::slice::from_ref(&s), &[remote_only], &me);
        let np = fa("192.168.1.1", 30080);
        assert!(st.frontends[&np].active.is_empty());
        assert_eq!(
            st.frontends[&np.in_scope(Scope::Inside)].active[..],
            [rb("10.244.1.2", 8080)]
        );
        // externalTrafficPolicy Cluster: one view, every endpoint.
        s.external_traffic_policy = TrafficPolicy::Cluster;
        let st = desired_state(&[s], &[sl], &me);
        assert!(st.frontends.keys().all(|fe| fe.scope == Scope::Outside));
        assert_eq!(st.frontends[&np].active[..], every[..]);
    }

    /// kube-proxy's iptables mode (`--iptables-localhost-nodeports`, on by default):
    /// 127.0.0.1:NodePort from the node itself, IPv4 only, served by every endpoint
    /// (traffic of the node goes to the Service's cluster chain, whatever the
    /// externalTrafficPolicy), to the node's own sockets only.
    #[test]
    fn node_ports_open_on_localhost_for_the_node_itself_with_every_endpoint() {
        let mut me = node(Some("node-a"), &["192.168.1.1", "fd00:50::1"]);
        me.localhost_nodeports = true;
        let mut s = web(ServiceType::NodePort, Some(30080));
        s.cluster_ips = vec![ip("10.96.0.10"), ip("fd00:10:96::a")];
        s.external_traffic_policy = TrafficPolicy::Local;
        let sl = web_slice(vec![
            on(Some("node-a"), ep("10.244.0.2", None, None, None)),
            on(Some("node-b"), ep("10.244.1.2", None, None, None)),
        ]);
        let st = desired_state(std::slice::from_ref(&s), std::slice::from_ref(&sl), &me);
        let lo = &st.frontends[&fa("127.0.0.1", 30080)];
        assert!(lo.host_only);
        assert!(!lo.local, "reached from the node only: no local rule");
        assert_eq!(lo.kind, FrontendKind::NodePort);
        assert_eq!(
            lo.active[..],
            [b("10.244.0.2", 8080), rb("10.244.1.2", 8080)]
        );
        // One view (no inside twin), IPv4 only (no ::1), and nothing else host-only.
        assert!(!st
            .frontends
            .contains_key(&fa("127.0.0.1", 30080).in_scope(Scope::Inside)));
        assert!(!st.frontends.contains_key(&fa("::1", 30080)));
        assert_eq!(
            st.frontends.iter().filter(|(_, f)| f.host_only).count(),
            1,
            "{:?}",
            st.frontends.keys()
        );
        // Off (--localhost-nodeports false, or no socket programs): none.
        me.localhost_nodeports = false;
        let st = desired_state(std::slice::from_ref(&s), std::slice::from_ref(&sl), &me);
        assert!(!st.frontends.contains_key(&fa("127.0.0.1", 30080)));
        // A ClusterIP Service has no NodePort, so none on 127.0.0.1 either.
        me.localhost_nodeports = true;
        let st = desired_state(&[web(ServiceType::ClusterIP, None)], &[sl], &me);
        assert_eq!(st.frontends.len(), 1);
    }
}
