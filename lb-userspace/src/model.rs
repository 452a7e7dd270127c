//! The desired state, as a pure model: Services and EndpointSlices in, frontends with
//! their backends out. The standalone file and the Kubernetes controller both fill the
//! same `Service` / `EndpointSlice` types, so every Kubernetes rule (port matching by
//! name, readiness, terminating fallback) lives here once.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
};

use serde::{Deserialize, Serialize};

/// L4 protocol of a Service port, spelled as in Kubernetes.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub enum Protocol {
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::PROTO_TCP,
            Protocol::Udp => lb_common::PROTO_UDP,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            lb_common::PROTO_TCP => Some(Protocol::Tcp),
            lb_common::PROTO_UDP => Some(Protocol::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

/// A Service's targetPort: a number or the name of a container port. Informational in
/// this model: the EndpointSlice's port (matched by the Service port's name) is the one
/// packets go to, which is how Kubernetes resolves named target ports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    /// Required when a Service has more than one port, as in Kubernetes.
    #[serde(default)]
    pub name: String,
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<TargetPort>,
    #[serde(default)]
    pub protocol: Protocol,
    /// The port opened on every node address (type NodePort or LoadBalancer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_port: Option<u16>,
}

/// A Service's `spec.type`. ExternalName and headless Services never reach the model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServiceType {
    #[default]
    ClusterIP,
    NodePort,
    LoadBalancer,
}

/// `spec.externalTrafficPolicy`: which endpoints serve traffic that enters the node from
/// outside (NodePorts, external IPs, LoadBalancer IPs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TrafficPolicy {
    #[default]
    Cluster,
    Local,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Service {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(rename = "clusterIP")]
    pub cluster_ip: Ipv4Addr,
    #[serde(rename = "type", default)]
    pub service_type: ServiceType,
    pub ports: Vec<ServicePort>,
    /// `spec.externalIPs`: more addresses the Service's ports answer on.
    #[serde(rename = "externalIPs", default, skip_serializing_if = "Vec::is_empty")]
    pub external_ips: Vec<Ipv4Addr>,
    /// `status.loadBalancer.ingress[].ip` (type LoadBalancer).
    #[serde(
        rename = "loadBalancerIPs",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    pub load_balancer_ips: Vec<Ipv4Addr>,
    #[serde(default)]
    pub external_traffic_policy: TrafficPolicy,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointPort {
    #[serde(default)]
    pub name: String,
    pub port: u16,
    #[serde(default)]
    pub protocol: Protocol,
}

/// EndpointSlice conditions; unset fields follow Kubernetes' defaults (ready and
/// serving unset count as true, terminating unset as false).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Conditions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminating: Option<bool>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Endpoint {
    pub addresses: Vec<Ipv4Addr>,
    #[serde(default)]
    pub conditions: Conditions,
    /// The node the endpoint runs on; unset counts as this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
}

/// A ClusterIP Service with no address until one is set (for building Services in code
/// with `..Default::default()`; validation rejects the unspecified address).
impl Default for Service {
    fn default() -> Self {
        Self {
            name: String::new(),
            namespace: default_namespace(),
            cluster_ip: Ipv4Addr::UNSPECIFIED,
            service_type: ServiceType::default(),
            ports: Vec::new(),
            external_ips: Vec::new(),
            load_balancer_ips: Vec::new(),
            external_traffic_policy: TrafficPolicy::default(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointSlice {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// The Service this slice belongs to (label `kubernetes.io/service-name`).
    pub service_name: String,
    #[serde(default)]
    pub ports: Vec<EndpointPort>,
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
}

fn default_namespace() -> String {
    "default".to_string()
}

/// The node this agent runs on: where NodePorts open, and which endpoints are local.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Node {
    /// Compared with the endpoints' `nodeName`; unset: every endpoint is local.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The node's addresses (Kubernetes: the Node's InternalIP and ExternalIP): each
    /// NodePort is a frontend on each of them.
    #[serde(default)]
    pub addresses: Vec<Ipv4Addr>,
}

impl Node {
    /// Whether an endpoint on `node_name` runs on this node.
    pub fn is_local(&self, node_name: Option<&str>) -> bool {
        match (&self.name, node_name) {
            (Some(me), Some(there)) => me == there,
            _ => true,
        }
    }
}

/// The whole input of the model.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub node: Node,
    #[serde(default)]
    pub services: Vec<Service>,
    #[serde(default)]
    pub endpoint_slices: Vec<EndpointSlice>,
}

/// A Service frontend as the dataplane matches it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendAddr {
    pub ip: Ipv4Addr,
    pub port: u16,
    pub proto: Protocol,
}

impl fmt::Display for FrontendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.ip, self.port, self.proto)
    }
}

/// A backend as the dataplane rewrites to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendAddr {
    pub ip: Ipv4Addr,
    pub port: u16,
    pub proto: Protocol,
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.ip, self.port, self.proto)
    }
}

/// How a frontend is reached; kept in the frontend's `flags` for `lb show` and bpftool.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FrontendKind {
    #[default]
    ClusterIP,
    NodePort,
    ExternalIP,
    LoadBalancer,
}

impl FrontendKind {
    pub fn flags(self) -> u32 {
        match self {
            FrontendKind::ClusterIP => 0,
            FrontendKind::NodePort => lb_common::FRONTEND_F_NODEPORT,
            FrontendKind::ExternalIP => lb_common::FRONTEND_F_EXTERNAL_IP,
            FrontendKind::LoadBalancer => lb_common::FRONTEND_F_LOADBALANCER,
        }
    }

    pub fn from_flags(flags: u32) -> Self {
        if flags & lb_common::FRONTEND_F_NODEPORT != 0 {
            FrontendKind::NodePort
        } else if flags & lb_common::FRONTEND_F_EXTERNAL_IP != 0 {
            FrontendKind::ExternalIP
        } else if flags & lb_common::FRONTEND_F_LOADBALANCER != 0 {
            FrontendKind::LoadBalancer
        } else {
            FrontendKind::ClusterIP
        }
    }

    /// Reached from outside the cluster: served by this node's endpoints only.
    pub fn is_external(self) -> bool {
        self != FrontendKind::ClusterIP
    }
}

impl fmt::Display for FrontendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// One frontend's wanted state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FrontendSpec {
    /// "namespace/name:port-name", for logs and the CLI.
    pub service: String,
    pub kind: FrontendKind,
    /// Backends that get new connections (sorted).
    pub active: BTreeSet<BackendAddr>,
    /// Every backend listed, ready or not (sorted): these stay in the backend map so
    /// established connections to a backend that turned not-ready keep working.
    pub known: BTreeSet<BackendAddr>,
}

/// Everything the maps should contain.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub frontends: BTreeMap<FrontendAddr, FrontendSpec>,
}

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

fn invalid(kind: &'static str, namespace: &str, name: &str, reason: impl Into<String>) -> Invalid {
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
    let ip = svc.cluster_ip;
    if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() || ip.is_loopback() {
        return Err(bad(format!("clusterIP {ip} cannot be a Service address")));
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
    Ok(())
}

fn is_unicast(ip: Ipv4Addr) -> bool {
    !(ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() || ip.is_loopback())
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

/// Every frontend a Service port yields, with its kind: the ClusterIP, the NodePort on
/// each node address, the external IPs and the LoadBalancer IPs (all with the Service
/// port, as kube-proxy does).
pub fn port_frontends(
    svc: &Service,
    sp: &ServicePort,
    node: &Node,
) -> Vec<(FrontendAddr, FrontendKind)> {
    let fe = |ip: Ipv4Addr, port: u16| FrontendAddr {
        ip,
        port,
        proto: sp.protocol,
    };
    let mut out = vec![(fe(svc.cluster_ip, sp.port), FrontendKind::ClusterIP)];
    if let Some(np) = sp.node_port {
        if svc.service_type != ServiceType::ClusterIP {
            out.extend(
                node.addresses
                    .iter()
                    .map(|a| (fe(*a, np), FrontendKind::NodePort)),
            );
        }
    }
    out.extend(
        svc.external_ips
            .iter()
            .map(|a| (fe(*a, sp.port), FrontendKind::ExternalIP)),
    );
    if svc.service_type == ServiceType::LoadBalancer {
        out.extend(
            svc.load_balancer_ips
                .iter()
                .map(|a| (fe(*a, sp.port), FrontendKind::LoadBalancer)),
        );
    }
    out
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
        for a in &e.addresses {
            if a.is_unspecified() || a.is_broadcast() || a.is_multicast() {
                return Err(bad(format!(
                    "endpoint address {a} is not a unicast address"
                )));
            }
        }
    }
    Ok(())
}

/// Validates a whole standalone config: every object on its own, then what spans
/// objects (two Services with the same name, two Services on one frontend).
pub fn validate_config(cfg: &Config) -> Result<(), Invalid> {
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

/// Kubernetes' readiness rule for one endpoint.
fn is_ready(c: &Conditions) -> bool {
    c.ready.unwrap_or(true)
}

/// KEP-1669: when no endpoint of a Service port is ready, endpoints that are still
/// serving while terminating take the traffic, so a rolling update drops nothing.
fn is_serving_terminating(c: &Conditions) -> bool {
    c.serving.unwrap_or(true) && c.terminating.unwrap_or(false)
}

/// Backends of one Service port, sorted by condition.
#[derive(Default)]
struct Pool {
    ready: BTreeSet<BackendAddr>,
    terminating: BTreeSet<BackendAddr>,
}

impl Pool {
    fn add(&mut self, b: BackendAddr, c: &Conditions) {
        if is_ready(c) {
            self.ready.insert(b);
        } else if is_serving_terminating(c) {
            self.terminating.insert(b);
        }
    }

    /// Who gets new connections: the ready ones, else the serving terminating ones.
    fn active(&self) -> BTreeSet<BackendAddr> {
        if self.ready.is_empty() {
            self.terminating.clone()
        } else {
            self.ready.clone()
        }
    }
}

/// Frontends and backends of one Service, from the slices that belong to it.
///
/// The ClusterIP uses every endpoint. Frontends reached from outside (NodePort, external
/// and LoadBalancer IPs) use this node's endpoints only, whatever the
/// externalTrafficPolicy: with `Local` that is Kubernetes' rule; with `Cluster`, sending
/// to another node's endpoint would need a source NAT so the reply comes back through
/// this node, which the dataplane does not do yet (ARCHITECTURE.md, known limits).
pub fn service_frontends<'a>(
    svc: &Service,
    slices: impl IntoIterator<Item = &'a EndpointSlice> + Clone,
    node: &Node,
) -> BTreeMap<FrontendAddr, FrontendSpec> {
    let mut out = BTreeMap::new();
    for sp in &svc.ports {
        // Endpoints from all slices, deduplicated by (address, port); an address listed
        // as ready anywhere counts as ready.
        let mut all = Pool::default();
        let mut local = Pool::default();
        let mut known = BTreeSet::new();
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
            for ep in &slice.endpoints {
                let is_local = node.is_local(ep.node_name.as_deref());
                for ip in &ep.addresses {
                    let b = BackendAddr {
                        ip: *ip,
                        port: ep_port.port,
                        proto: sp.protocol,
                    };
                    known.insert(b);
                    all.add(b, &ep.conditions);
                    if is_local {
                        local.add(b, &ep.conditions);
                    }
                }
            }
        }
        let service = format!("{}/{}:{}", svc.namespace, svc.name, sp.name);
        let (all, local) = (all.active(), local.active());
        for (fe, kind) in port_frontends(svc, sp, node) {
            out.entry(fe).or_insert_with(|| FrontendSpec {
                service: service.clone(),
                kind,
                active: if kind.is_external() {
                    local.clone()
                } else {
                    all.clone()
                },
                known: known.clone(),
            });
        }
    }
    out
}

/// The whole desired state from a set of Services and EndpointSlices.
/// Callers pass only valid objects (see `validate_*`); a frontend claimed by two
/// Services goes to the first in (namespace, name) order, as a stable rule.
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
    let mut state = DesiredState::default();
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

/// (namespace, name) of an object.
pub type ObjectKey = (String, String);

/// The desired state kept up to date object by object: a change to one Service or one
/// EndpointSlice recomputes that Service's frontends only, so the cost of a change does
/// not grow with the number of Services. `desired()` always equals `desired_state()` over
/// the same objects (a test checks it on random sequences).
#[derive(Clone, Debug, Default)]
pub struct ModelCache {
    services: BTreeMap<ObjectKey, Service>,
    slices: BTreeMap<ObjectKey, EndpointSlice>,
    /// Service key -> keys of the slices that name it.
    slices_of: BTreeMap<ObjectKey, BTreeSet<ObjectKey>>,
    /// Frontends each Service yields (whether or not it owns them).
    frontends_of: BTreeMap<ObjectKey, BTreeMap<FrontendAddr, FrontendSpec>>,
    /// Services claiming each frontend; the first in (namespace, name) order owns it.
    claims: BTreeMap<FrontendAddr, BTreeSet<ObjectKey>>,
    dirty: BTreeSet<ObjectKey>,
    desired: DesiredState,
    node: Node,
}

fn slice_service(slice: &EndpointSlice) -> ObjectKey {
    (slice.namespace.clone(), slice.service_name.clone())
}

impl ModelCache {
    /// Sets this node (its addresses and name). A change recomputes the Services that
    /// have frontends reached from outside: NodePorts, external or LoadBalancer IPs.
    /// Returns whether anything changed.
    pub fn set_node(&mut self, node: Node) -> bool {
        if node == self.node {
            return false;
        }
        self.node = node;
        for (key, svc) in &self.services {
            let external = svc.ports.iter().any(|p| p.node_port.is_some())
                || !svc.external_ips.is_empty()
                || !svc.load_balancer_ips.is_empty();
            if external {
                self.dirty.insert(key.clone());
            }
        }
        true
    }

    pub fn upsert_service(&mut self, svc: Service) {
        let key = (svc.namespace.clone(), svc.name.clone());
        if self.services.get(&key) != Some(&svc) {
            self.services.insert(key.clone(), svc);
            self.dirty.insert(key);
        }
    }

    pub fn remove_service(&mut self, key: &ObjectKey) {
        if self.services.remove(key).is_some() {
            self.dirty.insert(key.clone());
        }
    }

    pub fn upsert_slice(&mut self, slice: EndpointSlice) {
        let key = (slice.namespace.clone(), slice.name.clone());
        if self.slices.get(&key) == Some(&slice) {
            return;
        }
        let svc = slice_service(&slice);
        if let Some(old) = self.slices.insert(key.clone(), slice) {
            let old_svc = slice_service(&old);
            if let Some(set) = self.slices_of.get_mut(&old_svc) {
                set.remove(&key);
            }
            self.dirty.insert(old_svc);
        }
        self.slices_of.entry(svc.clone()).or_default().insert(key);
        self.dirty.insert(svc);
    }

    pub fn remove_slice(&mut self, key: &ObjectKey) {
        if let Some(old) = self.slices.remove(key) {
            let svc = slice_service(&old);
            if let Some(set) = self.slices_of.get_mut(&svc) {
                set.remove(key);
                if set.is_empty() {
                    self.slices_of.remove(&svc);
                }
            }
            self.dirty.insert(svc);
        }
    }

    /// Replaces every object (after a relist): only those that differ are marked dirty.
    pub fn replace_all(&mut self, services: Vec<Service>, slices: Vec<EndpointSlice>) {
        let svc_keys: BTreeSet<ObjectKey> = services
            .iter()
            .map(|s| (s.namespace.clone(), s.name.clone()))
            .collect();
        let slice_keys: BTreeSet<ObjectKey> = slices
            .iter()
            .map(|s| (s.namespace.clone(), s.name.clone()))
            .collect();
        let gone_svcs: Vec<ObjectKey> = self
            .services
            .keys()
            .filter(|k| !svc_keys.contains(*k))
            .cloned()
            .collect();
        let gone_slices: Vec<ObjectKey> = self
            .slices
            .keys()
            .filter(|k| !slice_keys.contains(*k))
            .cloned()
            .collect();
        for k in gone_svcs {
            self.remove_service(&k);
        }
        for k in gone_slices {
            self.remove_slice(&k);
        }
        for s in services {
            self.upsert_service(s);
        }
        for s in slices {
            self.upsert_slice(s);
        }
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// The desired state, after recomputing the Services touched since the last call.
    pub fn desired(&mut self) -> &DesiredState {
        let dirty = std::mem::take(&mut self.dirty);
        let mut touched: BTreeSet<FrontendAddr> = BTreeSet::new();
        for key in dirty {
            let new = match self.services.get(&key) {
                Some(svc) => {
                    let slices = self
                        .slices_of
                        .get(&key)
                        .into_iter()
                        .flatten()
                        .filter_map(|k| self.slices.get(k));
                    service_frontends(svc, slices, &self.node)
                }
                None => BTreeMap::new(),
            };
            let old = self.frontends_of.remove(&key).unwrap_or_default();
            for fe in old.keys() {
                if !new.contains_key(fe) {
                    if let Some(c) = self.claims.get_mut(fe) {
                        c.remove(&key);
                        if c.is_empty() {
                            self.claims.remove(fe);
                        }
                    }
                }
                touched.insert(*fe);
            }
            for fe in new.keys() {
                self.claims.entry(*fe).or_default().insert(key.clone());
                touched.insert(*fe);
            }
            if !new.is_empty() {
                self.frontends_of.insert(key, new);
            }
        }
        for fe in touched {
            let owner = self.claims.get(&fe).and_then(|c| c.first());
            match owner
                .and_then(|o| self.frontends_of.get(o))
                .and_then(|f| f.get(&fe))
            {
                Some(spec) => {
                    self.desired.frontends.insert(fe, spec.clone());
                }
                None => {
                    self.desired.frontends.remove(&fe);
                }
            }
        }
        &self.desired
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn svc(name: &str, cip: &str, ports: &[(&str, u16, Protocol)]) -> Service {
        Service {
            name: name.into(),
            namespace: "default".into(),
            cluster_ip: ip(cip),
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

    fn ep(addr: &str, ready: Option<bool>, serving: Option<bool>, term: Option<bool>) -> Endpoint {
        Endpoint {
            addresses: vec![ip(addr)],
            conditions: Conditions {
                ready,
                serving,
                terminating: term,
            },
            ..Default::default()
        }
    }

    fn slice(
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

    fn b(addr: &str, port: u16) -> BackendAddr {
        BackendAddr {
            ip: ip(addr),
            port,
            proto: Protocol::Tcp,
        }
    }

    fn fa(addr: &str, port: u16) -> FrontendAddr {
        FrontendAddr {
            ip: ip(addr),
            port,
            proto: Protocol::Tcp,
        }
    }

    fn node(name: Option<&str>, addresses: &[&str]) -> Node {
        Node {
            name: name.map(String::from),
            addresses: addresses.iter().map(|a| ip(a)).collect(),
        }
    }

    /// `e` running on `node_name` (None: unset).
    fn on(node_name: Option<&str>, e: Endpoint) -> Endpoint {
        Endpoint {
            node_name: node_name.map(String::from),
            ..e
        }
    }

    /// web: one TCP port 80 (nodePort `np`, if any) of the given type.
    fn web(service_type: ServiceType, np: Option<u16>) -> Service {
        let mut s = svc("web", "10.96.0.10", &[("http", 80, Protocol::Tcp)]);
        s.service_type = service_type;
        s.ports[0].node_port = np;
        s
    }

    fn web_slice(eps: Vec<Endpoint>) -> EndpointSlice {
        slice("web-1", "web", &[("http", 8080, Protocol::Tcp)], eps)
    }

    /// frontend -> (kind, active backends), for whole-state comparisons.
    fn kinds_and_active(
        st: &DesiredState,
    ) -> BTreeMap<FrontendAddr, (FrontendKind, Vec<BackendAddr>)> {
        st.frontends
            .iter()
            .map(|(fe, f)| (*fe, (f.kind, f.active.iter().copied().collect())))
            .collect()
    }

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
        let http = &st.frontends[&FrontendAddr {
            ip: ip("10.96.0.10"),
            port: 80,
            proto: Protocol::Tcp,
        }];
        assert_eq!(
            http.active.iter().copied().collect::<Vec<_>>(),
            vec![b("10.244.0.2", 8080)]
        );
        let m = &st.frontends[&FrontendAddr {
            ip: ip("10.96.0.10"),
            port: 9090,
            proto: Protocol::Tcp,
        }];
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
        let udp = &st.frontends[&FrontendAddr {
            ip: ip("10.96.0.53"),
            port: 53,
            proto: Protocol::Udp,
        }];
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
        assert_eq!(f.service, "default/web:");
    }

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
        let nodes = [
            Node::default(),
            node(Some("node-a"), &["192.168.1.1"]),
            node(Some("node-b"), &["192.168.1.1", "192.168.1.2"]),
        ];
        let node_names = [None, Some("node-a"), Some("node-b")];
        let mut cache = ModelCache::default();
        let mut current = Node::default();
        let mut services: BTreeMap<String, Service> = BTreeMap::new();
        let mut slices: BTreeMap<String, EndpointSlice> = BTreeMap::new();
        let (mut node_port_states, mut local_subsets) = (0, 0);
        for step in 0..4000 {
            let name = format!("s{}", rnd(6));
            match rnd(7) {
                0 | 5 => {
                    // Two Services may share a frontend (clusterIP and port, or a nodePort
                    // on the same node address): the first name wins.
                    let cip = format!("10.96.0.{}", rnd(4) + 1);
                    let mut s = svc(&name, &cip, &[("http", 80 + rnd(2) as u16, Protocol::Tcp)]);
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
                    services.insert(name, s.clone());
                    cache.upsert_service(s);
                }
                1 => {
                    services.remove(&name);
                    cache.remove_service(&("default".into(), name));
                }
                2 | 3 => {
                    let sl_name = format!("sl{}", rnd(8));
                    let eps = (0..rnd(4))
                        .map(|_| {
                            on(
                                node_names[rnd(3) as usize],
                                ep(
                                    &format!("10.244.0.{}", rnd(6) + 2),
                                    Some(rnd(3) > 0),
                                    None,
                                    Some(rnd(2) == 0),
                                ),
                            )
                        })
                        .collect();
                    let sl = slice(&sl_name, &name, &[("http", 8080, Protocol::Tcp)], eps);
                    slices.insert(sl_name, sl.clone());
                    cache.upsert_slice(sl);
                }
                4 => {
                    current = nodes[rnd(3) as usize].clone();
                    cache.set_node(current.clone());
                }
                _ => {
                    let sl_name = format!("sl{}", rnd(8));
                    slices.remove(&sl_name);
                    cache.remove_slice(&("default".into(), sl_name));
                }
            }
            if rnd(3) == 0 {
                let svcs: Vec<Service> = services.values().cloned().collect();
                let sls: Vec<EndpointSlice> = slices.values().cloned().collect();
                let want = desired_state(&svcs, &sls, &current);
                assert_eq!(cache.desired(), &want, "step {step}");
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
    fn validation_names_the_object_and_the_reason() {
        let mut cfg = Config {
            node: Node::default(),
            services: vec![
                svc("a", "10.96.0.10", &[("", 80, Protocol::Tcp)]),
                svc("b", "10.96.0.10", &[("", 80, Protocol::Tcp)]),
            ],
            endpoint_slices: vec![],
        };
        let e = validate_config(&cfg).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Service default/b: frontend 10.96.0.10:80/TCP is already used by Service default/a"
        );
        cfg.services[1].cluster_ip = ip("0.0.0.0");
        assert!(validate_config(&cfg)
            .unwrap_err()
            .to_string()
            .contains("cannot be a Service address"));
        cfg.services[1] = svc(
            "b",
            "10.96.0.11",
            &[("", 80, Protocol::Tcp), ("x", 81, Protocol::Tcp)],
        );
        assert!(validate_config(&cfg)
            .unwrap_err()
            .reason
            .contains("needs a name"));
        cfg.services[1] = svc("b", "10.96.0.11", &[("", 0, Protocol::Tcp)]);
        assert!(validate_config(&cfg).unwrap_err().reason.contains("port 0"));
        cfg.services[1] = svc("b", "10.96.0.11", &[("", 81, Protocol::Tcp)]);
        assert!(validate_config(&cfg).is_ok());
    }

    #[test]
    fn node_ports_open_on_every_node_address_with_the_node_port() {
        let me = node(Some("node-a"), &["192.168.1.1", "10.0.0.1"]);
        let s = web(ServiceType::NodePort, Some(30080));
        let sl = web_slice(vec![ep("10.244.0.2", None, None, None)]);
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
            .all(|f| f.service == "default/web:http"));
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

    #[test]
    fn external_frontends_use_only_local_endpoints_and_the_cluster_ip_all() {
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
        let all = vec![
            b("10.244.0.2", 8080),
            b("10.244.1.2", 8080),
            b("10.244.2.2", 8080),
        ];
        let local = vec![b("10.244.0.2", 8080), b("10.244.2.2", 8080)];
        // No SNAT yet: Cluster behaves as Local for traffic from outside.
        for policy in [TrafficPolicy::Cluster, TrafficPolicy::Local] {
            let mut s = web(ServiceType::LoadBalancer, Some(30080));
            s.external_ips = vec![ip("203.0.113.5")];
            s.load_balancer_ips = vec![ip("198.51.100.7")];
            s.external_traffic_policy = policy;
            let st = desired_state(&[s], std::slice::from_ref(&sl), &me);
            assert_eq!(
                kinds_and_active(&st),
                BTreeMap::from([
                    (fa("10.96.0.10", 80), (FrontendKind::ClusterIP, all.clone())),
                    (
                        fa("192.168.1.1", 30080),
                        (FrontendKind::NodePort, local.clone())
                    ),
                    (
                        fa("198.51.100.7", 80),
                        (FrontendKind::LoadBalancer, local.clone())
                    ),
                    (
                        fa("203.0.113.5", 80),
                        (FrontendKind::ExternalIP, local.clone())
                    ),
                ]),
                "{policy:?}"
            );
            // Every frontend knows every endpoint, ready or not, local or not.
            for f in st.frontends.values() {
                assert_eq!(f.known.len(), 4, "{policy:?}: {f:?}");
            }
        }
    }

    #[test]
    fn terminating_fallback_applies_to_the_local_subset() {
        let me = node(Some("node-a"), &["192.168.1.1"]);
        let s = web(ServiceType::NodePort, Some(30080));
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
                    (FrontendKind::ClusterIP, vec![b("10.244.1.2", 8080)])
                ),
                (
                    fa("192.168.1.1", 30080),
                    (FrontendKind::NodePort, vec![b("10.244.0.2", 8080)])
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
    fn without_a_node_name_every_endpoint_is_local() {
        let s = web(ServiceType::NodePort, Some(30080));
        let sl = web_slice(vec![
            on(Some("node-a"), ep("10.244.0.2", None, None, None)),
            on(Some("node-b"), ep("10.244.1.2", None, None, None)),
        ]);
        let st = desired_state(&[s], &[sl], &node(None, &["192.168.1.1"]));
        assert_eq!(st.frontends[&fa("192.168.1.1", 30080)].active.len(), 2);
        let unnamed = Node::default();
        assert!(unnamed.is_local(Some("node-b")) && unnamed.is_local(None));
        let a = node(Some("node-a"), &[]);
        assert!(a.is_local(Some("node-a")) && a.is_local(None));
        assert!(!a.is_local(Some("node-b")));
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
            validate_config(&cfg).unwrap_err().to_string(),
            "Service default/other: nodePort 30080/TCP is already used by Service default/web"
        );
        // Same number, other protocol: a different nodePort.
        cfg.services[1] = other(30080, Protocol::Udp);
        assert_eq!(validate_config(&cfg), Ok(()));
        // An external IP on a node address with the port of another Service's nodePort.
        cfg.node = node(Some("node-a"), &["192.168.1.1"]);
        let mut ext = svc("ext", "10.96.0.12", &[("", 30080, Protocol::Tcp)]);
        ext.external_ips = vec![ip("192.168.1.1")];
        cfg.services.push(ext);
        assert_eq!(
            validate_config(&cfg).unwrap_err().to_string(),
            "Service default/ext: frontend 192.168.1.1:30080/TCP is already used by Service default/web"
        );
        cfg.services.pop();

        // A node address that cannot be one.
        cfg.node.addresses.push(ip("255.255.255.255"));
        let e = validate_config(&cfg).unwrap_err();
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
            ks.iter()
                .map(|(n, s)| (n.to_string(), s.to_string()))
                .collect()
        };
        assert_eq!(
            cache.dirty,
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
        assert_eq!(gone, vec![fa("192.168.1.1", 30080)]);
        assert_eq!(
            new,
            vec![fa("192.168.1.2", 30080), fa("192.168.1.3", 30080)]
        );
        for fe in &new {
            assert_eq!(
                after.frontends[fe],
                before.frontends[&fa("192.168.1.1", 30080)]
            );
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
        assert_eq!(
            renamed.frontends[&fa("10.96.0.10", 80)],
            after.frontends[&fa("10.96.0.10", 80)]
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
