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

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Service {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(rename = "clusterIP")]
    pub cluster_ip: Ipv4Addr,
    pub ports: Vec<ServicePort>,
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

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Endpoint {
    pub addresses: Vec<Ipv4Addr>,
    #[serde(default)]
    pub conditions: Conditions,
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

/// The whole input of the model.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
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

/// One frontend's wanted state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FrontendSpec {
    /// "namespace/name:port-name", for logs and the CLI.
    pub service: String,
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
#[error("{kind} {namespace}/{name}: {reason}")]
pub struct Invalid {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    pub reason: String,
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
            let fe = FrontendAddr {
                ip: svc.cluster_ip,
                port: p.port,
                proto: p.protocol,
            };
            if let Some((ns, name)) = owners.insert(fe, (&svc.namespace, &svc.name)) {
                return Err(invalid(
                    "Service",
                    &svc.namespace,
                    &svc.name,
                    format!("frontend {fe} is already used by Service {ns}/{name}"),
                ));
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

/// Frontends and backends of one Service, from the slices that belong to it.
pub fn service_frontends<'a>(
    svc: &Service,
    slices: impl IntoIterator<Item = &'a EndpointSlice> + Clone,
) -> BTreeMap<FrontendAddr, FrontendSpec> {
    let mut out = BTreeMap::new();
    for sp in &svc.ports {
        let fe = FrontendAddr {
            ip: svc.cluster_ip,
            port: sp.port,
            proto: sp.protocol,
        };
        // Endpoints from all slices, deduplicated by (address, port); an address listed
        // as ready anywhere counts as ready.
        let mut ready = BTreeSet::new();
        let mut terminating = BTreeSet::new();
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
                for ip in &ep.addresses {
                    let b = BackendAddr {
                        ip: *ip,
                        port: ep_port.port,
                        proto: sp.protocol,
                    };
                    known.insert(b);
                    if is_ready(&ep.conditions) {
                        ready.insert(b);
                    } else if is_serving_terminating(&ep.conditions) {
                        terminating.insert(b);
                    }
                }
            }
        }
        let active = if ready.is_empty() { terminating } else { ready };
        out.insert(
            fe,
            FrontendSpec {
                service: format!("{}/{}:{}", svc.namespace, svc.name, sp.name),
                active,
                known,
            },
        );
    }
    out
}

/// The whole desired state from a set of Services and EndpointSlices.
/// Callers pass only valid objects (see `validate_*`); a frontend claimed by two
/// Services goes to the first in (namespace, name) order, as a stable rule.
pub fn desired_state(services: &[Service], slices: &[EndpointSlice]) -> DesiredState {
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
        for (fe, spec) in service_frontends(svc, mine.iter().copied()) {
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
}

fn slice_service(slice: &EndpointSlice) -> ObjectKey {
    (slice.namespace.clone(), slice.service_name.clone())
}

impl ModelCache {
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
                    service_frontends(svc, slices)
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
                })
                .collect(),
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
        let st = desired_state(&[s], &[sl]);
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
        let st = desired_state(&[s], &[sl]);
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
        let st = desired_state(std::slice::from_ref(&s), &[with_ready]);
        assert_eq!(st.frontends.values().next().unwrap().active.len(), 1);
        let only_term = slice("a", "web", &[("", 80, Protocol::Tcp)], vec![term, gone]);
        let st = desired_state(&[s], &[only_term]);
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
        let st = desired_state(&[s], &[a, c, other]);
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
        let st = desired_state(&[s], &[sl]);
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
        let st = desired_state(&[svc("web", "10.96.0.10", &[("", 80, Protocol::Tcp)])], &[]);
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
        let mut cache = ModelCache::default();
        let mut services: BTreeMap<String, Service> = BTreeMap::new();
        let mut slices: BTreeMap<String, EndpointSlice> = BTreeMap::new();
        for step in 0..2000 {
            let name = format!("s{}", rnd(6));
            match rnd(5) {
                0 => {
                    // Two Services may share a clusterIP and port: the first name wins.
                    let ip = format!("10.96.0.{}", rnd(4) + 1);
                    let s = svc(&name, &ip, &[("http", 80 + rnd(2) as u16, Protocol::Tcp)]);
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
                            ep(
                                &format!("10.244.0.{}", rnd(6) + 2),
                                Some(rnd(3) > 0),
                                None,
                                None,
                            )
                        })
                        .collect();
                    let sl = slice(&sl_name, &name, &[("http", 8080, Protocol::Tcp)], eps);
                    slices.insert(sl_name, sl.clone());
                    cache.upsert_slice(sl);
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
                assert_eq!(cache.desired(), &desired_state(&svcs, &sls), "step {step}");
            }
        }
        let svcs: Vec<Service> = services.values().cloned().collect();
        let sls: Vec<EndpointSlice> = slices.values().cloned().collect();
        let mut fresh = ModelCache::default();
        fresh.replace_all(svcs.clone(), sls.clone());
        assert_eq!(fresh.desired(), &desired_state(&svcs, &sls));
        cache.replace_all(vec![], vec![]);
        assert!(cache.desired().frontends.is_empty());
    }

    #[test]
    fn validation_names_the_object_and_the_reason() {
        let mut cfg = Config {
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
}
