//! Builders for the model's tests.
use std::{collections::BTreeMap, net::IpAddr};

use super::{
    objects::{
        zone_hints, Conditions, Endpoint, EndpointPort, EndpointSlice, Node, Protocol, Service,
        ServicePort, ServiceType,
    },
    state::{BackendAddr, DesiredState, FrontendAddr, FrontendKind},
};

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

pub fn svc(name: &str, cip: &str, ports: &[(&str, u16, Protocol)]) -> Service {
    Service {
        name: name.into(),
        namespace: "default".into(),
        cluster_ips: vec![ip(cip)],
        ports: ports
            .iter()
            .map(|(n, p, proto)| ServicePort {
                name: n.to_string(),
                port: *p,
                target_port: None,
                protocol: *proto,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

pub fn ep(addr: &str, ready: Option<bool>, serving: Option<bool>, term: Option<bool>) -> Endpoint {
    Endpoint {
        address: ip(addr),
        conditions: Conditions {
            ready,
            serving,
            terminating: term,
        },
        node_name: None,
        zone_hints: None,
    }
}

pub fn slice(
    name: &str,
    service: &str,
    ports: &[(&str, u16, Protocol)],
    eps: Vec<Endpoint>,
) -> EndpointSlice {
    EndpointSlice {
        name: name.into(),
        namespace: "default".into(),
        service_name: service.into(),
        ports: ports
            .iter()
            .map(|(n, p, proto)| EndpointPort {
                name: n.to_string(),
                port: *p,
                protocol: *proto,
            })
            .collect(),
        endpoints: eps,
    }
}

pub fn b(addr: &str, port: u16) -> BackendAddr {
    BackendAddr {
        ip: ip(addr),
        port,
        proto: Protocol::Tcp,
        remote: false,
    }
}

/// A backend on another node.
pub fn rb(addr: &str, port: u16) -> BackendAddr {
    BackendAddr {
        remote: true,
        ..b(addr, port)
    }
}

pub fn fa(addr: &str, port: u16) -> FrontendAddr {
    FrontendAddr::new(ip(addr), port, Protocol::Tcp)
}

pub fn node(name: Option<&str>, addresses: &[&str]) -> Node {
    Node {
        name: name.map(String::from),
        addresses: addresses.iter().map(|a| ip(a)).collect(),
        zone: None,
        ..Default::default()
    }
}

/// `n` in zone `zone`.
pub fn in_zone(zone: &str, n: Node) -> Node {
    Node {
        zone: Some(zone.into()),
        ..n
    }
}

/// `e` with the zone hints `zones` (`hints.forZones`; empty: none).
pub fn hinted(zones: &[&str], e: Endpoint) -> Endpoint {
    Endpoint {
        zone_hints: zone_hints(zones.iter().copied()),
        ..e
    }
}

/// `e` running on `node_name` (None: unset).
pub fn on(node_name: Option<&str>, e: Endpoint) -> Endpoint {
    Endpoint {
        node_name: node_name.map(Into::into),
        ..e
    }
}

/// web: one TCP port 80 (nodePort `np`, if any) of the given type.
pub fn web(service_type: ServiceType, np: Option<u16>) -> Service {
    let mut s = svc("web", "10.96.0.10", &[("http", 80, Protocol::Tcp)]);
    s.service_type = service_type;
    s.ports[0].node_port = np;
    s
}

pub fn web_slice(eps: Vec<Endpoint>) -> EndpointSlice {
    slice("web-1", "web", &[("http", 8080, Protocol::Tcp)], eps)
}

/// frontend -> (kind, active backends), for whole-state comparisons.
pub fn kinds_and_active(
    st: &DesiredState,
) -> BTreeMap<FrontendAddr, (FrontendKind, Vec<BackendAddr>)> {
    st.frontends
        .iter()
        .map(|(fe, f)| (*fe, (f.kind, f.active.iter().copied().collect())))
        .collect()
}
