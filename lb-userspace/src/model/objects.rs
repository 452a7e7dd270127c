//! The model's input: Services, EndpointSlices and this Node, reduced to the fields the
//! rules use. Both sources fill these types: the standalone file (they are its format,
//! through serde) and the Kubernetes controller (`k8s::translate`).
//!
//! Kept small, since an agent holds every object of the cluster: an endpoint is one
//! address (an EndpointSlice endpoint with several addresses becomes several, which
//! means the same to the rules), its conditions, and its node's name, shared between the
//! endpoints of one node (`ModelCache` interns it).
use std::{fmt, net::IpAddr, sync::Arc};

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

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

/// An address family, spelled as in Kubernetes (`spec.ipFamilies`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum IpFamily {
    IPv4,
    IPv6,
}

impl IpFamily {
    pub fn of(ip: &IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => IpFamily::IPv4,
            IpAddr::V6(_) => IpFamily::IPv6,
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// `spec.ipFamilyPolicy`: how many families the Service has (checked against its cluster
/// IPs; the API server allocates them by it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum IpFamilyPolicy {
    SingleStack,
    PreferDualStack,
    RequireDualStack,
}

/// A Service, as the file writes it: `clusterIP` (its primary address) and `clusterIPs`
/// (one address per family, the primary first: a dual-stack Service has two), either or
/// both, as in Kubernetes. In memory the model keeps `clusterIPs` only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Service {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// The file's `clusterIP`: moved into `cluster_ips` by `normalize` (it must be
    /// their first); only a file's disagreeing one stays here, for validation to name.
    #[serde(rename = "clusterIP", default, skip_serializing)]
    pub cluster_ip: Option<IpAddr>,
    /// One address per family, the primary first.
    #[serde(rename = "clusterIPs", default)]
    pub cluster_ips: Vec<IpAddr>,
    /// `spec.ipFamilies`, if given: the families of `clusterIPs`, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_families: Vec<IpFamily>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_family_policy: Option<IpFamilyPolicy>,
    #[serde(rename = "type", default)]
    pub service_type: ServiceType,
    pub ports: Vec<ServicePort>,
    /// `spec.externalIPs`: more addresses the Service's ports answer on.
    #[serde(rename = "externalIPs", default, skip_serializing_if = "Vec::is_empty")]
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip` (type LoadBalancer).
    #[serde(
        rename = "loadBalancerIPs",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    pub load_balancer_ips: Vec<IpAddr>,
    /// `spec.loadBalancerSourceRanges`: with any, only sources in these CIDRs reach the
    /// LoadBalancer IPs (kube-proxy's firewall; NodePorts and external IPs are open to
    /// all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub load_balancer_source_ranges: Vec<IpNet>,
    #[serde(default)]
    pub external_traffic_policy: TrafficPolicy,
    /// `spec.internalTrafficPolicy`: with `Local`, the cluster IPs are served by this
    /// node's endpoints only.
    #[serde(default)]
    pub internal_traffic_policy: TrafficPolicy,
    /// `spec.healthCheckNodePort` (Kubernetes sets it for a LoadBalancer Service with
    /// externalTrafficPolicy Local): the agent answers HTTP there with this node's count
    /// of ready endpoints, as kube-proxy does, for the load balancer's health checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check_node_port: Option<u16>,
    /// `spec.sessionAffinity`: `ClientIP` sends a client's new connections to the
    /// backend of its last one, for `sessionAffinityTimeoutSeconds`.
    #[serde(default, skip_serializing_if = "SessionAffinity::is_none")]
    pub session_affinity: SessionAffinity,
    /// `spec.sessionAffinityConfig.clientIP.timeoutSeconds` (1..=86400; default
    /// 10800, 3 hours, as Kubernetes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity_timeout_seconds: Option<u32>,
}

/// `spec.sessionAffinity`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SessionAffinity {
    #[default]
    None,
    #[serde(rename = "ClientIP")]
    ClientIp,
}

impl SessionAffinity {
    pub fn is_none(&self) -> bool {
        *self == SessionAffinity::None
    }
}

/// Kubernetes' default sessionAffinity timeout (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_SECONDS: u32 = 10_800;

impl Service {
    /// The affinity timeout the datapath gets: 0 without ClientIP affinity.
    pub fn affinity_timeout_s(&self) -> u32 {
        match self.session_affinity {
            SessionAffinity::None => 0,
            SessionAffinity::ClientIp => self
                .session_affinity_timeout_seconds
                .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_SECONDS),
        }
    }
}

/// A ClusterIP Service with no address until one is set (for building Services in code
/// with `..Default::default()`; validation rejects a Service without a cluster IP).
impl Default for Service {
    fn default() -> Self {
        Self {
            name: String::new(),
            namespace: default_namespace(),
            cluster_ip: None,
            cluster_ips: Vec::new(),
            ip_families: Vec::new(),
            ip_family_policy: None,
            service_type: ServiceType::default(),
            ports: Vec::new(),
            external_ips: Vec::new(),
            load_balancer_ips: Vec::new(),
            load_balancer_source_ranges: Vec::new(),
            external_traffic_policy: TrafficPolicy::default(),
            internal_traffic_policy: TrafficPolicy::default(),
            health_check_node_port: None,
            session_affinity: SessionAffinity::None,
            session_affinity_timeout_seconds: None,
        }
    }
}

impl Service {
    /// A Service with one cluster IP (for building Services in code).
    pub fn with_cluster_ip(mut self, ip: impl Into<IpAddr>) -> Self {
        self.cluster_ips = vec![ip.into()];
        self
    }

    /// Moves a file's `clusterIP` into `clusterIPs` (where it must come first); false if
    /// the two disagree (validation names the Service then).
    pub fn normalize(&mut self) -> bool {
        match (self.cluster_ip.take(), self.cluster_ips.first()) {
            (None, _) => true,
            (Some(ip), None) => {
                self.cluster_ips.push(ip);
                true
            }
            (Some(ip), Some(first)) => {
                let same = ip == *first;
                if !same {
                    self.cluster_ip = Some(ip);
                }
                same
            }
        }
    }

    /// The families the Service has: one per cluster IP.
    pub fn families(&self) -> impl Iterator<Item = IpFamily> + '_ {
        self.cluster_ips.iter().map(IpFamily::of)
    }

    /// Whether the Service has frontends reached from outside (which depend on this
    /// node: its addresses for NodePorts, its endpoints for all of them).
    pub fn has_external_frontends(&self) -> bool {
        self.ports.iter().any(|p| p.node_port.is_some())
            || !self.external_ips.is_empty()
            || !self.load_balancer_ips.is_empty()
    }
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
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Conditions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminating: Option<bool>,
}

/// A node's name, shared by every endpoint on that node.
pub type NodeName = Arc<str>;

/// An endpoint's topology hints (`hints.forZones`): the zones whose nodes should send it
/// their cluster-wide traffic, sorted, never empty. One allocation per distinct set,
/// shared by every endpoint with the same hints (`ModelCache` interns them), behind a
/// thin pointer so an endpoint stays small.
pub type ZoneHints = Arc<Vec<String>>;

/// One endpoint address. In the file (and the API) an endpoint lists its addresses; each
/// becomes one of these, with the endpoint's conditions, node and zone hints (48 bytes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub address: IpAddr,
    pub conditions: Conditions,
    /// The node the endpoint runs on.
    pub node_name: Option<NodeName>,
    /// `hints.forZones`, if any (see [`zone_hints`]).
    pub zone_hints: Option<ZoneHints>,
}

impl Endpoint {
    pub fn new(address: impl Into<IpAddr>) -> Self {
        Self {
            address: address.into(),
            conditions: Conditions::default(),
            node_name: None,
            zone_hints: None,
        }
    }
}

/// Zone hints from the zone names listed: sorted and deduplicated, `None` for an empty
/// list (an endpoint without hints, as kube-proxy counts it).
pub fn zone_hints<S: Into<String>>(zones: impl IntoIterator<Item = S>) -> Option<ZoneHints> {
    let mut v: Vec<String> = zones.into_iter().map(Into::into).collect();
    v.sort_unstable();
    v.dedup();
    (!v.is_empty()).then(|| Arc::new(v))
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
    #[serde(
        default,
        deserialize_with = "endpoints_from_file",
        serialize_with = "endpoints_to_file"
    )]
    pub endpoints: Vec<Endpoint>,
}

/// An endpoint as the file writes it: `{addresses: [...], conditions, nodeName,
/// hints: {forZones: [{name: ...}]}}`.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct FileEndpoint {
    addresses: Vec<IpAddr>,
    #[serde(default)]
    conditions: Conditions,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    node_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    hints: Option<FileHints>,
}

/// `hints` of an endpoint, as in Kubernetes.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct FileHints {
    #[serde(default)]
    for_zones: Vec<FileZone>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileZone {
    name: String,
}

fn endpoints_from_file<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Endpoint>, D::Error> {
    let file: Vec<FileEndpoint> = Vec::deserialize(d)?;
    let mut out = Vec::with_capacity(file.len());
    for e in file {
        let node_name: Option<NodeName> = e.node_name.map(Into::into);
        let hints = e
            .hints
            .and_then(|h| zone_hints(h.for_zones.into_iter().map(|z| z.name)));
        out.extend(e.addresses.into_iter().map(|address| Endpoint {
            address,
            conditions: e.conditions,
            node_name: node_name.clone(),
            zone_hints: hints.clone(),
        }));
    }
    Ok(out)
}

fn endpoints_to_file<S: Serializer>(eps: &[Endpoint], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(eps.iter().map(|e| FileEndpoint {
        addresses: vec![e.address],
        conditions: e.conditions,
        node_name: e.node_name.as_deref().map(String::from),
        hints: e.zone_hints.as_ref().map(|z| {
            FileHints {
                for_zones: z
                    .iter()
                    .map(|name| FileZone { name: name.clone() })
                    .collect(),
            }
        }),
    }))
}

pub(crate) fn default_namespace() -> String {
    "default".to_string()
}

/// The node this agent runs on: where NodePorts open, and which endpoints are local.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Node {
    /// Compared with the endpoints' `nodeName`; unset (a standalone file that names no
    /// node): every endpoint is local.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The node's addresses (Kubernetes: the Node's InternalIP and ExternalIP), of
    /// either family: each NodePort is a frontend on each of them of the Service's
    /// families.
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
    /// The node's zone (Kubernetes: its label `topology.kubernetes.io/zone`): endpoints
    /// hinted for it (`hints.forZones`) take this node's cluster-wide traffic, with
    /// kube-proxy's rules (see `rules::service_frontends`). Unset: hints are not used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// NodePorts are also served on 127.0.0.1 to the node's own sockets (IPv4 only),
    /// as kube-proxy's iptables mode does (`--iptables-localhost-nodeports`). Not of
    /// the file nor of the Kubernetes Node: the agent's `--localhost-nodeports`, set
    /// where its socket programs are attached (nothing else serves them).
    #[serde(skip)]
    pub localhost_nodeports: bool,
}

impl Node {
    /// Whether an endpoint on `node_name` runs on this node. As kube-proxy: an endpoint
    /// without a node name is not local. A node without a name (a single-node file)
    /// counts every endpoint as local.
    pub fn is_local(&self, node_name: Option<&str>) -> bool {
        match (&self.name, node_name) {
            (None, _) => true,
            (Some(me), Some(there)) => me == there,
            (Some(_), None) => false,
        }
    }
}

/// The whole input of the model: the standalone file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub node: Node,
    /// Required, even empty (`services: []`): a file without it is more likely cut
    /// short than meant to remove every Service.
    pub services: Vec<Service>,
    #[serde(default)]
    pub endpoint_slices: Vec<EndpointSlice>,
}

/// The (namespace, name) of a Service or EndpointSlice, in one shared allocation
/// ("namespace/name": neither part can hold a '/'), so the model's indexes refer to an
/// object for the price of a pointer. Ordered by (namespace, name).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ObjectKey(Arc<str>);

impl ObjectKey {
    pub fn new(namespace: &str, name: &str) -> Self {
        Self(format!("{namespace}/{name}").into())
    }

    fn split(&self) -> (&str, &str) {
        self.0.split_once('/').unwrap_or(("", &self.0))
    }

    pub fn namespace(&self) -> &str {
        self.split().0
    }

    pub fn name(&self) -> &str {
        self.split().1
    }
}

impl Ord for ObjectKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.split().cmp(&other.split())
    }
}

impl PartialOrd for ObjectKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

pub fn object_key(namespace: &str, name: &str) -> ObjectKey {
    ObjectKey::new(namespace, name)
}

impl Service {
    pub fn key(&self) -> ObjectKey {
        object_key(&self.namespace, &self.name)
    }
}

impl EndpointSlice {
    pub fn key(&self) -> ObjectKey {
        object_key(&self.namespace, &self.name)
    }

    /// The key of the Service the slice belongs to.
    pub fn service_key(&self) -> ObjectKey {
        object_key(&self.namespace, &self.service_name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An agent holds every endpoint of the cluster: the size ARCHITECTURE.md states.
    #[test]
    fn an_endpoint_is_48_bytes() {
        assert_eq!(size_of::<Endpoint>(), 48);
    }
}
