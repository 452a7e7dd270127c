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
use std::net::Ipv4Addr;

use lb_userspace::model::{
    Config, Endpoint, EndpointPort, EndpointSlice, Protocol, Service, ServicePort,
};

pub const WEB_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub const WEB_PORT: u16 = 80;
pub const WEB_TARGET_PORT: u16 = 8080;
pub const IPERF_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
pub const IPERF_PORT: u16 = 5201;
pub const NAMESPACE: &str = "bench";
/// The pod CIDR (kube-proxy's --cluster-cidr).
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Svc {
    pub name: String,
    pub ip: Ipv4Addr,
    pub port: u16,
    /// Ready endpoints: address and target port.
    pub endpoints: Vec<(Ipv4Addr, u16)>,
}

impl Svc {
    /// "namespace/name:port-name", as kube-proxy comments and names chains.
    pub fn port_name(&self) -> String {
        format!("{NAMESPACE}/{}:http", self.name)
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
    let fillers = total.saturating_sub(2);
    let mut out = Vec::with_capacity(fillers + 2);
    let mut k: u32 = 0;
    let base_ip = u32::from(Ipv4Addr::new(10, 100, 0, 0));
    let base_ep = u32::from(Ipv4Addr::new(10, 128, 0, 0));
    for i in 0..fillers {
        let n = match eps {
            Endpoints::Mixed => 2 + i % 9,
            Endpoints::Exactly(n) => n,
        };
        let endpoints = (0..n)
            .map(|_| {
                k += 1;
                (Ipv4Addr::from(base_ep + k), WEB_TARGET_PORT)
            })
            .collect();
        out.push(Svc {
            name: format!("svc-{i}"),
            ip: Ipv4Addr::from(base_ip + 1 + i as u32),
            port: 80,
            endpoints,
        });
    }
    out.push(Svc {
        name: "web".into(),
        ip: WEB_IP,
        port: WEB_PORT,
        endpoints: web_backends
            .iter()
            .map(|ip| (*ip, WEB_TARGET_PORT))
            .collect(),
    });
    out.push(Svc {
        name: "iperf".into(),
        ip: IPERF_IP,
        port: IPERF_PORT,
        endpoints: vec![(iperf_backend, IPERF_PORT)],
    });
    out
}

pub fn endpoint_count(svcs: &[Svc]) -> usize {
    svcs.iter().map(|s| s.endpoints.len()).sum()
}

/// The same services as the agent's model (Services + one EndpointSlice each).
pub fn to_config(svcs: &[Svc]) -> Config {
    let mut cfg = Config::default();
    for s in svcs {
        cfg.services.push(Service {
            name: s.name.clone(),
            namespace: NAMESPACE.into(),
            cluster_ip: s.ip,
            ports: vec![ServicePort {
                name: "http".into(),
                port: s.port,
                target_port: None,
                protocol: Protocol::Tcp,
                ..Default::default()
            }],
            ..Default::default()
        });
        let port = s.endpoints.first().map(|e| e.1).unwrap_or(WEB_TARGET_PORT);
        cfg.endpoint_slices.push(EndpointSlice {
            name: format!("{}-1", s.name),
            namespace: NAMESPACE.into(),
            service_name: s.name.clone(),
            ports: vec![EndpointPort {
                name: "http".into(),
                port,
                protocol: Protocol::Tcp,
            }],
            endpoints: s
                .endpoints
                .iter()
                .map(|(ip, _)| Endpoint::new(*ip))
                .collect(),
        });
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
        let one = services(1, Endpoints::Exactly(10), &web, web[0]);
        assert_eq!(one.len(), 2, "the two services under test are always there");
        let cfg = to_config(&s);
        lb_userspace::model::validate_config(&cfg).unwrap();
        let st = lb_userspace::model::desired_state(&cfg.services, &cfg.endpoint_slices, &cfg.node);
        assert_eq!(st.frontends.len(), 1000);
    }
}
