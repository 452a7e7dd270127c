//! The services and endpoints every mode of the benchmark gets: the same list, rendered
//! as an `lb run --config` file, as kube-proxy's iptables rules and as its nftables rules.
//!
//! Two services are the ones under test and sit last in the list (kube-proxy's
//! KUBE-SERVICES chain is in no particular order; last is the worst case and "late in
//! the chain" as the issue asks): `web` (10.96.0.10:80 -> the nginx pods :8080) and
//! `iperf` (10.96.0.20:5201 -> one iperf3 pod, so control and data connections of one
//! iperf3 test meet the same server). The others are filler services on
//! 10.100.0.0 + i with 2 to 10 endpoints each (or exactly `endpoints`), on addresses
//! 10.128.0.0 + k that no pod has: only their rules and map entries matter.
//!
//! The forwarding-rate runs (`forwarding`) use the same fillers and one Service under
//! test of their own: `sink`, UDP, reached at NodePort 30009 of the node (type NodePort,
//! `externalTrafficPolicy: Local`) and sent to one pod on this node.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_userspace::model::{
    Config, Endpoint, EndpointPort, EndpointSlice, Node, Protocol, Service, ServicePort,
    ServiceType, TrafficPolicy,
};

pub const WEB_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The IPv6 cluster IPs of the services under test (dual stack: IPv6 beside IPv4).
pub const WEB_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x10);
pub const IPERF_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x20);
pub const WEB_PORT: u16 = 80;
pub const WEB_TARGET_PORT: u16 = 8080;
pub const IPERF_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
pub const IPERF_PORT: u16 = 5201;
pub const SINK_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
/// The sink's Service port, target port (the discard port) and NodePort.
pub const SINK_PORT: u16 = 9;
pub const SINK_NODE_PORT: u16 = 30009;
pub const NAMESPACE: &str = "bench";
/// The pod CIDR (kube-proxy's --cluster-cidr).
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// The node's name, where a workload has NodePorts (its endpoints run on it).
pub const NODE_NAME: &str = "bench-node";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Svc {
    pub name: String,
    pub ip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
    /// A NodePort, with `externalTrafficPolicy: Local` (what this dataplane implements
    /// for traffic from outside: this node's endpoints, the client's address kept).
    pub node_port: Option<u16>,
    /// One of the services the benchmark measures (not a filler).
    pub under_test: bool,
    /// Ready endpoints: address and target port.
    pub endpoints: Vec<(Ipv4Addr, u16)>,
    /// A dual-stack service: its IPv6 cluster IP and IPv6 endpoints (this dataplane's
    /// config only; kube-proxy's rules here are IPv4's).
    pub ipv6: Option<(Ipv6Addr, Vec<(Ipv6Addr, u16)>)>,
}

impl Svc {
    /// The port's name: "http" (TCP) or "udp".
    pub fn port_label(&self) -> &'static str {
        match self.protocol {
            Protocol::Tcp => "http",
            Protocol::Udp => "udp",
        }
    }

    /// "tcp" or "udp", as iptables and nft spell it.
    pub fn proto(&self) -> &'static str {
        match self.protocol {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }

    /// "namespace/name:port-name", as kube-proxy comments and names chains.
    pub fn port_name(&self) -> String {
        format!("{NAMESPACE}/{}:{}", self.name, self.port_label())
    }
}

/// How many endpoints filler services get.
#[derive(Clone, Copy, Debug)]
pub enum Endpoints {
    /// 2 to 10, cycling (6 on average).
    Mixed,
    Exactly(usize),
}

/// `total` services in all (at least the two under test), tested ones last.
pub fn services(
    total: usize,
    eps: Endpoints,
    web_backends: &[Ipv4Addr],
    iperf_backend: Ipv4Addr,
) -> Vec<Svc> {
    let mut out = fillers(total.saturating_sub(2), eps);
    out.push(Svc {
        name: "web".into(),
        ip: WEB_IP,
        port: WEB_PORT,
        protocol: Protocol::Tcp,
        node_port: None,
        under_test: true,
        endpoints: web_backends
            .iter()
            .map(|ip| (*ip, WEB_TARGET_PORT))
            .collect(),
        ipv6: None,
    });
    out.push(Svc {
        name: "iperf".into(),
        ip: IPERF_IP,
        port: IPERF_PORT,
        protocol: Protocol::Tcp,
        node_port: None,
        under_test: true,
        endpoints: vec![(iperf_backend, IPERF_PORT)],
        ipv6: None,
    });
    out
}

/// Makes the two services under test dual stack: IPv6 cluster IPs [`WEB_IP6`] and
/// [`IPERF_IP6`] on the pods' IPv6 addresses.
pub fn with_ipv6(svcs: &mut [Svc], web_backends: &[Ipv6Addr], iperf_backend: Ipv6Addr) {
    for s in svcs.iter_mut().filter(|s| s.under_test) {
        s.ipv6 = match s.name.as_str() {
            "web" => Some((
                WEB_IP6,
                web_backends
                    .iter()
                    .map(|ip| (*ip, WEB_TARGET_PORT))
                    .collect(),
            )),
            "iperf" => Some((IPERF_IP6, vec![(iperf_backend, IPERF_PORT)])),
            _ => None,
        };
    }
}

/// The forwarding-rate workload: `total` services in all, the last one `sink` (UDP,
/// NodePort [`SINK_NODE_PORT`] -> `sink_pod`:[`SINK_PORT`]), the others fillers.
pub fn forwarding_services(total: usize, sink_pod: Ipv4Addr) -> Vec<Svc> {
    let mut out = fillers(total.saturating_sub(1), Endpoints::Mixed);
    out.push(Svc {
        name: "sink".into(),
        ip: SINK_IP,
        port: SINK_PORT,
        protocol: Protocol::Udp,
        node_port: Some(SINK_NODE_PORT),
        under_test: true,
        endpoints: vec![(sink_pod, SINK_PORT)],
        ipv6: None,
    });
    out
}

/// `n` filler services (TCP 80 on 10.100.0.0 + i, endpoints on 10.128.0.0 + k).
fn fillers(n: usize, eps: Endpoints) -> Vec<Svc> {
    let mut out = Vec::with_capacity(n + 2);
    let mut k: u32 = 0;
    let base_ip = u32::from(Ipv4Addr::new(10, 100, 0, 0));
    let base_ep = u32::from(Ipv4Addr::new(10, 128, 0, 0));
    for i in 0..n {
        let count = match eps {
            Endpoints::Mixed => 2 + i % 9,
            Endpoints::Exactly(n) => n,
        };
        let endpoints = (0..count)
            .map(|_| {
                k += 1;
                (Ipv4Addr::from(base_ep + k), WEB_TARGET_PORT)
            })
            .collect();
        out.push(Svc {
            name: format!("svc-{i}"),
            ip: Ipv4Addr::from(base_ip + 1 + i as u32),
            port: 80,
            protocol: Protocol::Tcp,
            node_port: None,
            under_test: false,
            endpoints,
            ipv6: None,
        });
    }
    out
}

/// The ClusterIP frontends the services make: one per service and family (one port
/// each). NodePorts are not counted.
pub fn cluster_ip_frontend_count(svcs: &[Svc]) -> usize {
    svcs.iter().map(|s| 1 + usize::from(s.ipv6.is_some())).sum()
}

pub fn endpoint_count(svcs: &[Svc]) -> usize {
    svcs.iter().map(|s| s.endpoints.len()).sum()
}

/// The same services as the agent's model (Services + one EndpointSlice each), on a
/// node that is not named (every endpoint local).
pub fn to_config(svcs: &[Svc]) -> Config {
    to_config_on_node(svcs, None)
}

/// [`to_config`]; a workload with NodePorts also names the node ([`NODE_NAME`] at
/// `node_ip`) and puts its endpoints on it.
pub fn to_config_on_node(svcs: &[Svc], node_ip: Option<Ipv4Addr>) -> Config {
    let mut cfg = Config::default();
    let node_ports = svcs.iter().any(|s| s.node_port.is_some());
    if node_ports {
        cfg.node = Node {
            name: Some(NODE_NAME.into()),
            addresses: node_ip.into_iter().map(Into::into).collect(),
            ..Default::default()
        };
    }
    let node_name: lb_userspace::model::NodeName = NODE_NAME.into();
    for s in svcs {
        cfg.services.push(Service {
            name: s.name.clone(),
            namespace: NAMESPACE.into(),
            cluster_ips: std::iter::once(IpAddr::from(s.ip))
                .chain(s.ipv6.as_ref().map(|(ip, _)| IpAddr::from(*ip)))
                .collect(),
            service_type: if s.node_port.is_some() {
                ServiceType::NodePort
            } else {
                ServiceType::ClusterIP
            },
            external_traffic_policy: if s.node_port.is_some() {
                TrafficPolicy::Local
            } else {
                TrafficPolicy::Cluster
            },
            ports: vec![ServicePort {
                name: s.port_label().into(),
                port: s.port,
                target_port: None,
                protocol: s.protocol,
                node_port: s.node_port,
            }],
            ..Default::default()
        });
        let port = s.endpoints.first().map(|e| e.1).unwrap_or(WEB_TARGET_PORT);
        cfg.endpoint_slices.push(EndpointSlice {
            name: format!("{}-1", s.name),
            namespace: NAMESPACE.into(),
            service_name: s.name.clone(),
            ports: vec![EndpointPort {
                name: s.port_label().into(),
                port,
                protocol: s.protocol,
            }],
            endpoints: s
                .endpoints
                .iter()
                .map(|(ip, _)| Endpoint {
                    node_name: node_ports.then(|| node_name.clone()),
                    ..Endpoint::new(*ip)
                })
                .collect(),
        });
        if let Some((_, eps)) = &s.ipv6 {
            cfg.endpoint_slices.push(EndpointSlice {
                name: format!("{}-v6", s.name),
                namespace: NAMESPACE.into(),
                service_name: s.name.clone(),
                ports: vec![EndpointPort {
                    name: s.port_label().into(),
                    port,
                    protocol: s.protocol,
                }],
                endpoints: eps
                    .iter()
                    .map(|(ip, _)| Endpoint {
                        node_name: node_ports.then(|| node_name.clone()),
                        ..Endpoint::new(*ip)
                    })
                    .collect(),
            });
        }
    }
    cfg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tested_services_come_last_and_endpoints_are_unique() {
        let web = [Ipv4Addr::new(10, 244, 0, 12)];
        let s = services(1000, Endpoints::Mixed, &web, Ipv4Addr::new(10, 244, 0, 15));
        assert_eq!(s.len(), 1000);
        assert_eq!(s[998].name, "web");
        assert_eq!(s[999].ip, IPERF_IP);
        let mut all: Vec<_> = s.iter().flat_map(|x| x.endpoints.iter().copied()).collect();
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n);
        assert!(s[..998]
            .iter()
            .all(|x| (2..=10).contains(&x.endpoints.len())));
        assert!(s[998..].iter().all(|x| x.under_test) && !s[0].under_test);
        let one = services(1, Endpoints::Exactly(10), &web, web[0]);
        assert_eq!(one.len(), 2, "the two services under test are always there");
        let cfg = to_config(&s);
        lb_userspace::model::validate_config(&cfg, Default::default()).unwrap();
        let st = lb_userspace::model::desired_state(&cfg.services, &cfg.endpoint_slices, &cfg.node);
        assert_eq!(st.frontends.len(), 1000);
    }

    #[test]
    fn the_forwarding_workload_opens_a_local_node_port() {
        let sink = Ipv4Addr::new(10, 244, 0, 11);
        let node: Ipv4Addr = crate::sandbox::NODE_IP.parse().unwrap();
        let s = forwarding_services(100, sink);
        assert_eq!(s.len(), 100);
        assert_eq!(s[99].node_port, Some(SINK_NODE_PORT));
        assert_eq!(s[99].port_name(), "bench/sink:udp");
        let cfg = to_config_on_node(&s, Some(node));
        lb_userspace::model::validate_config(&cfg, Default::default()).unwrap();
        let st = lb_userspace::model::desired_state(&cfg.services, &cfg.endpoint_slices, &cfg.node);
        // 100 ClusterIPs and the NodePort on the node's address, and its inside view
        // (externalTrafficPolicy Local: the node's own sockets get every endpoint).
        assert_eq!(st.frontends.len(), 102);
        let np: Vec<String> = st
            .frontends
            .keys()
            .map(|fe| fe.to_string())
            .filter(|f| f.contains(&SINK_NODE_PORT.to_string()))
            .collect();
        assert_eq!(
            np,
            [
                format!("{node}:{SINK_NODE_PORT}/UDP"),
                format!("{node}:{SINK_NODE_PORT}/UDP@inside")
            ]
        );
        // Without NodePorts no node is named, as before.
        assert_eq!(
            to_config(&services(10, Endpoints::Mixed, &[sink], sink)).node,
            Node::default()
        );
    }
}
