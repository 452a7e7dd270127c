//! The model's output: every frontend the maps should hold, with its backends.
use std::{collections::BTreeMap, fmt, net::IpAddr, sync::Arc};

use ipnet::IpNet;

use super::objects::Protocol;

/// A Service frontend as the dataplane matches it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendAddr {
    pub ip: IpAddr,
    pub port: u16,
    pub proto: Protocol,
    /// Which view of the frontend (`FrontendKey::scope`).
    pub scope: Scope,
}

impl FrontendAddr {
    /// The frontend as seen from outside the node (the packet path's view).
    pub fn new(ip: IpAddr, port: u16, proto: Protocol) -> Self {
        Self {
            ip,
            port,
            proto,
            scope: Scope::Outside,
        }
    }

    /// The same address, port and protocol in another view.
    pub fn in_scope(self, scope: Scope) -> Self {
        Self { scope, ..self }
    }
}

/// Who sees a frontend entry (`lb_common::SCOPE_*`): every client and the packet path
/// (`Outside`), or the node's own sockets and its pods' (`Inside`, looked up by the
/// socket programs only). An `Inside` entry exists only where the views differ: an
/// externalTrafficPolicy Local frontend, whose inside view has the cluster-wide
/// endpoints, as kube-proxy serves the node's and its pods' traffic to it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    #[default]
    Outside,
    Inside,
}

impl Scope {
    pub fn number(self) -> u8 {
        match self {
            Scope::Outside => lb_common::SCOPE_OUTSIDE,
            Scope::Inside => lb_common::SCOPE_INSIDE,
        }
    }

    /// None for a value no build writes.
    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            lb_common::SCOPE_OUTSIDE => Some(Scope::Outside),
            lb_common::SCOPE_INSIDE => Some(Scope::Inside),
            _ => None,
        }
    }
}

/// `ip:port/proto`, an IPv6 address in brackets (`[fd00::10]:80/TCP`).
fn write_endpoint(
    f: &mut fmt::Formatter<'_>,
    ip: &IpAddr,
    port: u16,
    proto: Protocol,
) -> fmt::Result {
    match ip {
        IpAddr::V4(a) => write!(f, "{a}:{port}/{proto}"),
        IpAddr::V6(a) => write!(f, "[{a}]:{port}/{proto}"),
    }
}

/// `ip:port/proto`, and `@inside` for the inside view (`10.0.0.1:30080/TCP@inside`).
impl fmt::Display for FrontendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_endpoint(f, &self.ip, self.port, self.proto)?;
        match self.scope {
            Scope::Outside => Ok(()),
            Scope::Inside => write!(f, "@inside"),
        }
    }
}

/// A backend as the dataplane rewrites to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendAddr {
    pub ip: IpAddr,
    pub port: u16,
    pub proto: Protocol,
    /// It runs on another node (its endpoint's `nodeName` is not this node's): a flow
    /// from outside sent to it is source-NATed to this node (`BACKEND_F_REMOTE`).
    pub remote: bool,
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_endpoint(f, &self.ip, self.port, self.proto)
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

    /// Reached from outside the cluster (externalTrafficPolicy applies).
    pub fn is_external(self) -> bool {
        self != FrontendKind::ClusterIP
    }
}

impl fmt::Display for FrontendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A sorted set of backends without duplicates. Shared: every frontend of a Service
/// port holds the same sets (and a set where every backend is ready is both its
/// `active` and its `known`), so copies of the desired state cost a pointer each.
pub type Backends = Arc<[BackendAddr]>;

/// One frontend's wanted state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendSpec {
    /// "namespace/name:port-name", for logs and the CLI.
    pub service: Arc<str>,
    pub kind: FrontendKind,
    /// externalTrafficPolicy Local applies (a frontend reached from outside): this
    /// node's endpoints only, and without one, new connections are dropped.
    pub local: bool,
    /// Served to the node's own sockets only (127.0.0.1:NodePort,
    /// `FRONTEND_F_HOST_ONLY`): a pod's 127.0.0.1 is its own, and the packet path
    /// ignores it.
    pub host_only: bool,
    /// sessionAffinity ClientIP's timeout in seconds; 0: no affinity.
    pub affinity_timeout_s: u32,
    /// loadBalancerSourceRanges (a LoadBalancer IP only): the sources that may open
    /// connections, host bits cleared, sorted; empty: every source.
    pub source_ranges: Arc<[IpNet]>,
    /// Backends that get new connections (sorted).
    pub active: Backends,
    /// Every backend listed, ready or not (sorted): these stay in the backend map so
    /// established connections to a backend that turned not-ready keep working.
    pub known: Backends,
}

impl Default for FrontendSpec {
    fn default() -> Self {
        Self {
            service: Arc::from(""),
            kind: FrontendKind::default(),
            local: false,
            host_only: false,
            affinity_timeout_s: 0,
            source_ranges: Arc::new([]),
            active: Arc::new([]),
            known: Arc::new([]),
        }
    }
}

/// A Service's health check on its `healthCheckNodePort`, as kube-proxy serves it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub port: u16,
    pub namespace: String,
    pub name: String,
    /// This node's ready endpoints of the Service (distinct addresses, any family): 0
    /// fails the check (503), also when some are serving but terminating.
    pub local_endpoints: usize,
}

/// Everything the maps should contain.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub frontends: BTreeMap<FrontendAddr, FrontendSpec>,
    /// The source addresses of SNAT flows (`LB_NODE`).
    pub snat: SnatSources,
}

/// The addresses this node gives the flows from outside it sends to another node's
/// backend (externalTrafficPolicy Cluster): its first address of each family, as the
/// node lists them (Kubernetes: InternalIP before ExternalIP). A family without one
/// sends such flows to this node's backends only.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnatSources {
    pub v4: Option<IpAddr>,
    pub v6: Option<IpAddr>,
}

impl SnatSources {
    pub fn of(node: &super::objects::Node) -> Self {
        Self {
            v4: node.addresses.iter().copied().find(IpAddr::is_ipv4),
            v6: node.addresses.iter().copied().find(IpAddr::is_ipv6),
        }
    }

    pub fn has(&self, family: super::objects::IpFamily) -> bool {
        match family {
            super::objects::IpFamily::IPv4 => self.v4.is_some(),
            super::objects::IpFamily::IPv6 => self.v6.is_some(),
        }
    }
}

/// What changed in a desired state since the last look: each frontend whose spec
/// changed, with its spec before (`None`: it is new). Its spec now is the desired
/// state's (absent: it is gone). What the writer diffs, so a change costs what it
/// touches, not the size of the cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Delta {
    pub changed: Vec<(FrontendAddr, Option<FrontendSpec>)>,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.changed.is_empty()
    }

    /// The delta that turns `old` into `new`, by comparing every frontend.
    pub fn between(old: &DesiredState, new: &DesiredState) -> Self {
        let mut changed: Vec<(FrontendAddr, Option<FrontendSpec>)> = new
            .frontends
            .iter()
            .filter(|(fe, spec)| old.frontends.get(fe) != Some(*spec))
            .map(|(fe, _)| (*fe, old.frontends.get(fe).cloned()))
            .collect();
        changed.extend(
            old.frontends
                .iter()
                .filter(|(fe, _)| !new.frontends.contains_key(fe))
                .map(|(fe, spec)| (*fe, Some(spec.clone()))),
        );
        changed.sort_by_key(|(fe, _)| *fe);
        Self { changed }
    }
}
