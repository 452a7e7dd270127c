//! Validation: what can be wrong with one object on its own, and what spans objects
//! in a standalone file (two Services with one name or one frontend). A rejected object
//! is named with its reason; in the Kubernetes source it is left out and everything else
//! keeps working, the standalone file is all-or-nothing.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use super::{
    objects::{
        Config, EndpointSlice, IpFamily, IpFamilyPolicy, Node, Protocol, Service, ServiceType,
        TargetPort,
    },
    rules::port_frontends,
    state::FrontendAddr,
};

/// A rejected object: which one and why. Rejection of one object never affects others
/// in the Kubernetes source; the standalone file is all-or-nothing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {}: {reason}", object_name(namespace, name))]
pub struct Invalid {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    pub reason: String,
}

/// "namespace/name", or the bare name of an object without a namespace (a Node).
fn object_name(namespace: &str, name: &str) -> String {
    if namespace.is_empty() {
        name.to_string()
    } else {
        format!("{namespace}/{name}")
    }
}

pub(crate) fn invalid(
    kind: &'static str,
    namespace: &str,
    name: &str,
    reason: impl Into<String>,
) -> Invalid {
    Invalid {
        kind,
        namespace: namespace.to_string(),
        name: name.to_string(),
        reason: reason.into(),
    }
}

/// Checks one Service on its own (what can be wrong without looking at others).
pub fn validate_service(svc: &Service) -> Result<(), Invalid> {
    let bad = |reason: String| invalid("Service", &svc.namespace, &svc.name, reason);
    if svc.name.is_empty() {
        return Err(bad("name is empty".into()));
    }
    if let Some(ip) = svc.cluster_ip {
        return Err(bad(match svc.cluster_ips.first() {
            Some(first) => format!("clusterIP {ip} is not clusterIPs' first address {first}"),
            None => "clusterIP is set but not moved into clusterIPs (normalize first)".into(),
        }));
    }
    if let Some(t) = svc
        .session_affinity_timeout_seconds
        .filter(|t| !(1..=86_400).contains(t))
    {
        return Err(bad(format!(
            "sessionAffinity timeout {t} s is not within 1..=86400"
        )));
    }
    if svc.cluster_ips.is_empty() {
        return Err(bad("has no clusterIP".into()));
    }
    if let Some(ip) = svc.cluster_ips.iter().find(|ip| !is_unicast(**ip)) {
        return Err(bad(format!("clusterIP {ip} cannot be a Service address")));
    }
    let families: Vec<IpFamily> = svc.families().collect();
    if families.len() > 2 || (families.len() == 2 && families[0] == families[1]) {
        return Err(bad(format!(
            "clusterIPs {:?}: at most one address per family",
            svc.cluster_ips
        )));
    }
    if !svc.ip_families.is_empty() && svc.ip_families != families {
        return Err(bad(format!(
            "ipFamilies {:?} do not match clusterIPs {:?}",
            svc.ip_families, svc.cluster_ips
        )));
    }
    match (svc.ip_family_policy, families.len()) {
        (Some(IpFamilyPolicy::SingleStack), n) if n != 1 => {
            return Err(bad(format!(
                "ipFamilyPolicy SingleStack with {n} clusterIPs"
            )));
        }
        (Some(IpFamilyPolicy::RequireDualStack), n) if n != 2 => {
            return Err(bad(format!(
                "ipFamilyPolicy RequireDualStack with {n} clusterIP(s)"
            )));
        }
        _ => {}
    }
    if svc.ports.is_empty() {
        return Err(bad("has no ports".into()));
    }
    let mut names = BTreeSet::new();
    let mut seen = BTreeSet::new();
    for p in &svc.ports {
        if p.port == 0 {
            return Err(bad(format!("port {:?}: port 0 is not valid", p.name)));
        }
        if svc.ports.len() > 1 && p.name.is_empty() {
            return Err(bad(format!(
                "port {}: every port needs a name when a Service has several",
                p.port
            )));
        }
        if !names.insert(p.name.as_str()) {
            return Err(bad(format!("port name {:?} used twice", p.name)));
        }
        if !seen.insert((p.port, p.protocol)) {
            return Err(bad(format!("port {}/{} listed twice", p.port, p.protocol)));
        }
        if let Some(TargetPort::Number(0)) = p.target_port {
            return Err(bad(format!("port {:?}: targetPort 0 is not valid", p.name)));
        }
        match (p.node_port, svc.service_type) {
            (Some(0), _) => {
                return Err(bad(format!("port {:?}: nodePort 0 is not valid", p.name)));
            }
            (Some(np), ServiceType::ClusterIP) => {
                return Err(bad(format!(
                    "port {:?}: nodePort {np} needs type NodePort or LoadBalancer",
                    p.name
                )));
            }
            _ => {}
        }
    }
    for (what, ips) in [
        ("externalIPs", &svc.external_ips),
        ("loadBalancerIPs", &svc.load_balancer_ips),
    ] {
        if let Some(ip) = ips.iter().find(|ip| !is_unicast(**ip)) {
            return Err(bad(format!("{what}: {ip} cannot be a Service address")));
        }
    }
    if !svc.load_balancer_ips.is_empty() && svc.service_type != ServiceType::LoadBalancer {
        return Err(bad("loadBalancerIPs needs type LoadBalancer".into()));
    }
    if let Some(r) = svc.load_balancer_source_ranges.iter().find(|r| match r {
        ipnet::IpNet::V6(n) => n.addr().to_ipv4_mapped().is_some() && n.prefix_len() >= 96,
        ipnet::IpNet::V4(_) => false,
    }) {
        return Err(bad(format!(
            "loadBalancerSourceRanges: {r} is an IPv4-mapped IPv6 range; write the IPv4 range"
        )));
    }
    Ok(())
}

/// An address a Service, endpoint or node can have: not unspecified, multicast,
/// broadcast or loopback (nor an IPv6 link-local one, which names no single host).
fn is_unicast(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            !(a.is_unspecified() || a.is_broadcast() || a.is_multicast() || a.is_loopback())
        }
        IpAddr::V6(a) => {
            !(a.is_unspecified()
                || a.is_multicast()
                || a.is_loopback()
                || a.is_unicast_link_local()
                || a.to_ipv4_mapped().is_some())
        }
    }
}

/// Checks the node section of a standalone config.
pub fn validate_node(node: &Node) -> Result<(), Invalid> {
    let name = node.name.as_deref().unwrap_or("");
    if let Some(ip) = node.addresses.iter().find(|ip| !is_unicast(**ip)) {
        return Err(invalid(
            "Node",
            "",
            name,
            format!("address {ip} cannot be a node address"),
        ));
    }
    Ok(())
}

/// Checks one EndpointSlice on its own.
pub fn validate_slice(slice: &EndpointSlice) -> Result<(), Invalid> {
    let bad = |reason: String| invalid("EndpointSlice", &slice.namespace, &slice.name, reason);
    if slice.name.is_empty() {
        return Err(bad("name is empty".into()));
    }
    if slice.service_name.is_empty() {
        return Err(bad("serviceName is empty".into()));
    }
    for p in &slice.ports {
        if p.port == 0 {
            return Err(bad(format!("port {:?}: port 0 is not valid", p.name)));
        }
    }
    for e in &slice.endpoints {
        let a = e.address;
        if !is_unicast(a) && !a.is_loopback() {
            return Err(bad(format!(
                "endpoint address {a} is not a unicast address"
            )));
        }
    }
    Ok(())
}

/// The ports a nodePort may take (the API server's `--service-node-port-range`,
/// 30000-32767 by default). A standalone file has no API server to allocate and check
/// them, so validation does: a nodePort outside would open a port of the node's own
/// addresses that something else may own (sshd's 22, an ephemeral port, this node's
/// SNAT ports).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodePortRange {
    pub first: u16,
    pub last: u16,
}

impl Default for NodePortRange {
    fn default() -> Self {
        Self {
            first: 30000,
            last: 32767,
        }
    }
}

impl NodePortRange {
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl std::fmt::Display for NodePortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl std::str::FromStr for NodePortRange {
    type Err = String;

    /// "FIRST-LAST" (or one port), as the API server's flag; inside 1-65535 and clear
    /// of the SNAT ports (`lb_common::DEFAULT_SNAT_PORT_MIN`..), which flows from
    /// outside to other nodes' endpoints take on this node's addresses.
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, b) = s.trim().split_once('-').unwrap_or((s.trim(), s.trim()));
        let port = |p: &str| {
            p.trim().parse::<u16>().map_err(|e| {
                format!("{s:?}: {p:?} is not a port: {e} (want FIRST-LAST, e.g. 30000-32767)")
            })
        };
        let r = Self {
            first: port(a)?,
            last: port(b)?,
        };
        if r.first == 0 || r.first > r.last {
            return Err(format!(
                "{s:?}: want FIRST-LAST with 1 <= FIRST <= LAST, e.g. 30000-32767"
            ));
        }
        let (snat_min, snat_max) = (
            lb_common::DEFAULT_SNAT_PORT_MIN,
            lb_common::DEFAULT_SNAT_PORT_MAX,
        );
        if r.last >= snat_min {
            return Err(format!(
                "{s:?} overlaps this node's SNAT ports {snat_min}-{snat_max}: a NodePort there would take replies meant for source-NATed flows"
            ));
        }
        Ok(r)
    }
}

/// Validates a whole standalone config: every object on its own, then what spans
/// objects (two Services with the same name, two Services on one frontend), and every
/// nodePort against `node_ports`.
pub fn validate_config(cfg: &Config, node_ports_allowed: NodePortRange) -> Result<(), Invalid> {
    validate_node(&cfg.node)?;
    let mut node_ports: BTreeMap<(u16, Protocol), (&str, &str)> = BTreeMap::new();
    let mut names = BTreeSet::new();
    let mut owners: BTreeMap<FrontendAddr, (&str, &str)> = BTreeMap::new();
    for svc in &cfg.services {
        validate_service(svc)?;
        if !names.insert((svc.namespace.as_str(), svc.name.as_str())) {
            return Err(invalid(
                "Service",
                &svc.namespace,
                &svc.name,
                "defined twice",
            ));
        }
        for p in &svc.ports {
            if let Some(np) = p.node_port {
                if !node_ports_allowed.contains(np) {
                    return Err(invalid(
                        "Service",
                        &svc.namespace,
                        &svc.name,
                        format!(
                            "port {:?}: nodePort {np} is outside the node port range {node_ports_allowed} (--service-node-port-range)",
                            p.name
                        ),
                    ));
                }
                if let Some((ns, name)) =
                    node_ports.insert((np, p.protocol), (&svc.namespace, &svc.name))
                {
                    return Err(invalid(
                        "Service",
                        &svc.namespace,
                        &svc.name,
                        format!(
                            "nodePort {np}/{} is already used by Service {ns}/{name}",
                            p.protocol
                        ),
                    ));
                }
            }
            for (fe, _) in port_frontends(svc, p, &cfg.node) {
                match owners.insert(fe, (&svc.namespace, &svc.name)) {
                    Some((ns, name)) if (ns, name) != (&svc.namespace, &svc.name) => {
                        return Err(invalid(
                            "Service",
                            &svc.namespace,
                            &svc.name,
                            format!("frontend {fe} is already used by Service {ns}/{name}"),
                        ));
                    }
                    _ => {}
                }
            }
        }
    }
    let mut slices = BTreeSet::new();
    for slice in &cfg.endpoint_slices {
        validate_slice(slice)?;
        if !slices.insert((slice.namespace.as_str(), slice.name.as_str())) {
            return Err(invalid(
                "EndpointSlice",
                &slice.namespace,
                &slice.name,
                "defined twice",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::fixtures::*;

    #[test]
    fn validation_names_the_object_and_the_reason() {
        let mut cfg = Config {
            node: Node::default(),
            services: vec![
                svc("a", "10.96.0.10", &[("", 80, Protocol::Tcp)]),
                svc("b", "10.96.0.10", &[("", 80, Protocol::Tcp)]),
            ],
            endpoint_slices: vec![],
        };
        let e = validate_config(&cfg, NodePortRange::default()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Service default/b: frontend 10.96.0.10:80/TCP is already used by Service default/a"
        );
        cfg.services[1].cluster_ips = vec![ip("0.0.0.0")];
        assert!(validate_config(&cfg, NodePortRange::default())
            .unwrap_err()
            .to_string()
            .contains("cannot be a Service address"));
        cfg.services[1] = svc(
            "b",
            "10.96.0.11",
            &[("", 80, Protocol::Tcp), ("x", 81, Protocol::Tcp)],
        );
        assert!(validate_config(&cfg, NodePortRange::default())
            .unwrap_err()
            .reason
            .contains("needs a name"));
        cfg.services[1] = svc("b", "10.96.0.11", &[("", 0, Protocol::Tcp)]);
        assert!(validate_config(&cfg, NodePortRange::default())
            .unwrap_err()
            .reason
            .contains("port 0"));
        cfg.services[1] = svc("b", "10.96.0.11", &[("", 81, Protocol::Tcp)]);
        assert!(validate_config(&cfg, NodePortRange::default()).is_ok());
    }

    #[test]
    fn node_port_and_address_errors_name_the_object_and_the_reason() {
        let msg = |s: &Service| validate_service(s).unwrap_err().to_string();
        assert_eq!(
            msg(&web(ServiceType::NodePort, Some(0))),
            "Service default/web: port \"http\": nodePort 0 is not valid"
        );
        assert_eq!(
            msg(&web(ServiceType::ClusterIP, Some(30080))),
            "Service default/web: port \"http\": nodePort 30080 needs type NodePort or LoadBalancer"
        );
        let mut ext = web(ServiceType::ClusterIP, None);
        ext.external_ips = vec![ip("224.0.0.1")];
        assert_eq!(
            msg(&ext),
            "Service default/web: externalIPs: 224.0.0.1 cannot be a Service address"
        );
        let mut lb = web(ServiceType::LoadBalancer, Some(30080));
        lb.load_balancer_ips = vec![ip("0.0.0.0")];
        assert_eq!(
            msg(&lb),
            "Service default/web: loadBalancerIPs: 0.0.0.0 cannot be a Service address"
        );

        // The same nodePort on two Services, even with no node address to collide on.
        let other = |np: u16, proto: Protocol| {
            let mut s = svc("other", "10.96.0.11", &[("", 8000, proto)]);
            s.service_type = ServiceType::NodePort;
            s.ports[0].node_port = Some(np);
            s
        };
        let mut cfg = Config {
            node: Node::default(),
            services: vec![
                web(ServiceType::NodePort, Some(30080)),
                other(30080, Protocol::Tcp),
            ],
            endpoint_slices: vec![],
        };
        assert_eq!(
            validate_config(&cfg, NodePortRange::default())
                .unwrap_err()
                .to_string(),
            "Service default/other: nodePort 30080/TCP is already used by Service default/web"
        );
        // Same number, other protocol: a different nodePort.
        cfg.services[1] = other(30080, Protocol::Udp);
        assert_eq!(validate_config(&cfg, NodePortRange::default()), Ok(()));
        // An external IP on a node address with the port of another Service's nodePort.
        cfg.node = node(Some("node-a"), &["192.168.1.1"]);
        let mut ext = svc("ext", "10.96.0.12", &[("", 30080, Protocol::Tcp)]);
        ext.external_ips = vec![ip("192.168.1.1")];
        cfg.services.push(ext);
        assert_eq!(
            validate_config(&cfg, NodePortRange::default()).unwrap_err().to_string(),
            "Service default/ext: frontend 192.168.1.1:30080/TCP is already used by Service default/web"
        );
        cfg.services.pop();

        // A node address that cannot be one.
        cfg.node.addresses.push(ip("255.255.255.255"));
        let e = validate_config(&cfg, NodePortRange::default()).unwrap_err();
        assert_eq!(
            (e.kind, e.name.as_str(), e.reason.as_str()),
            (
                "Node",
                "node-a",
                "address 255.255.255.255 cannot be a node address"
            )
        );
        assert_eq!(
            validate_node(&node(None, &["127.0.0.1"])).unwrap_err().kind,
            "Node"
        );
        assert_eq!(validate_node(&node(None, &["192.168.1.1"])), Ok(()));
    }
}
