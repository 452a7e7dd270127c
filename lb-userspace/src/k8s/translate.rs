//! Kubernetes objects -> model objects, with kube-proxy's rules for what a proxy programs.
//! Pure: no client, no maps. Each object is translated on its own, so a malformed one is
//! rejected (with its namespace/name and the reason) and every other keeps working.
//!
//! Services: headless (`clusterIP: None`, or labelled `service.kubernetes.io/headless`,
//! which kube-proxy's watch excludes), ExternalName, not yet allocated (no clusterIP),
//! and those labelled `service.kubernetes.io/service-proxy-name` with another proxy's name
//! are ignored. SCTP ports are skipped (the dataplane is TCP/UDP). Every cluster IP of
//! `clusterIPs` is programmed: IPv4, IPv6, or both for a dual-stack Service
//! (`ipFamilies` and `ipFamilyPolicy` are read and checked against them).
//!
//! NodePorts (type NodePort and LoadBalancer), `spec.externalIPs` and the IPs of
//! `status.loadBalancer.ingress` become frontends too; an address of a family the Service
//! has no cluster IP of is skipped (as kube-proxy's proxier of that family never sees the
//! Service), ingress entries with only a hostname are ignored, and so are those with
//! `ipMode: Proxy` (as kube-proxy: that load balancer proxies to the nodes itself).
//! `externalTrafficPolicy` is kept.
//!
//! EndpointSlices: only those labelled `kubernetes.io/service-name`, of address type IPv4
//! or IPv6 (FQDN ones are skipped). Ports without a port number are dropped (as
//! kube-proxy does), SCTP ports too.
use std::net::IpAddr;

use k8s_openapi::{
    api::{core::v1 as core, discovery::v1 as discovery},
    apimachinery::pkg::util::intstr::IntOrString,
};

use crate::model::{
    self, Conditions, Endpoint, EndpointPort, EndpointSlice, Invalid, IpFamily, IpFamilyPolicy,
    Protocol, Service, ServicePort, ServiceType, TargetPort, TrafficPolicy,
};

/// Label naming the Service an EndpointSlice belongs to.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Label that hands a Service to an alternative proxy.
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Label that makes a Service headless for proxies, whatever its clusterIP (kube-proxy
/// watches only Services without it).
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// The Node label naming its zone, which the endpoints' zone hints name.
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";
/// Annotation the EndpointSlice controller sets to the time of the change that caused
/// the slice's last update (source of the network programming latency).
pub const ANNOTATION_TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// Why part of an object was left out of the dataplane.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SkipReason {
    /// SCTP: the dataplane handles TCP and UDP only.
    Sctp,
    /// An address of a family the Service has no cluster IP of.
    Family,
    /// An FQDN EndpointSlice (kube-proxy ignores those too).
    Fqdn,
    /// A field the dataplane does not implement yet: the object is programmed as if it
    /// were unset (the label names the field).
    Ignored(&'static str),
}

impl SkipReason {
    /// Metric label value.
    pub fn label(self) -> &'static str {
        match self {
            SkipReason::Sctp => "sctp",
            SkipReason::Family => "family",
            SkipReason::Fqdn => "fqdn",
            SkipReason::Ignored(field) => field,
        }
    }
}

/// Every reason a Service port is skipped for (`lb_skipped_service_ports_total{reason}`).
pub const SERVICE_SKIP_REASONS: [SkipReason; 2] = [SkipReason::Sctp, SkipReason::Family];
/// Every reason an EndpointSlice is skipped for (`lb_skipped_endpoint_slices_total{reason}`).
pub const SLICE_SKIP_REASONS: [SkipReason; 1] = [SkipReason::Fqdn];
/// Service fields set but not implemented yet (`lb_ignored_fields_total{kind="Service"}`).
pub const IGNORED_SERVICE_FIELDS: [&str; 1] = ["trafficDistribution"];
/// EndpointSlice fields set but not implemented yet (`kind="EndpointSlice"`).
pub const IGNORED_SLICE_FIELDS: [&str; 1] = ["hints.forNodes"];

/// One part left out: a Service port, a whole slice, or an endpoint address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skip {
    pub reason: SkipReason,
    /// What was skipped, for the log line ("port dns/53/SCTP").
    pub what: String,
}

/// What becomes of one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome<T> {
    /// Programmed (possibly with parts skipped, see `Translated::skipped`).
    Use(T),
    /// Not for this proxy; the reason is for debug logs.
    Ignore(String),
    /// Malformed: left out, with the reason.
    Reject(Invalid),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Translated<T> {
    pub outcome: Outcome<T>,
    pub skipped: Vec<Skip>,
}

impl<T> Translated<T> {
    fn ignore(reason: impl Into<String>, skipped: Vec<Skip>) -> Self {
        Self {
            outcome: Outcome::Ignore(reason.into()),
            skipped,
        }
    }

    fn reject(e: Invalid) -> Self {
        Self {
            outcome: Outcome::Reject(e),
            skipped: Vec::new(),
        }
    }

    /// The model object, if the outcome is `Use`.
    pub fn used(&self) -> Option<&T> {
        match &self.outcome {
            Outcome::Use(t) => Some(t),
            _ => None,
        }
    }
}

/// Translation settings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rules {
    /// This proxy's name for `service.kubernetes.io/service-proxy-name`; with `None`,
    /// every Service carrying that label belongs to another proxy.
    pub proxy_name: Option<String>,
}

fn namespace_and_name(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> (String, String) {
    (
        meta.namespace.clone().unwrap_or_else(|| "default".into()),
        meta.name.clone().unwrap_or_default(),
    )
}

fn reject<T>(kind: &'static str, namespace: &str, name: &str, reason: String) -> Translated<T> {
    Translated::reject(Invalid {
        kind,
        namespace: namespace.to_string(),
        name: name.to_string(),
        reason,
    })
}

/// A protocol as spelled in the API; `Ok(None)` for SCTP.
fn protocol(p: Option<&str>) -> Result<Option<Protocol>, String> {
    match p.unwrap_or("TCP") {
        "TCP" => Ok(Some(Protocol::Tcp)),
        "UDP" => Ok(Some(Protocol::Udp)),
        "SCTP" => Ok(None),
        other => Err(format!(
            "unknown protocol {other:?} (expected TCP, UDP or SCTP)"
        )),
    }
}

fn port_number(what: &str, p: i32) -> Result<u16, String> {
    u16::try_from(p)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{what}: port {p} is out of range 1-65535"))
}

/// The cluster IPs a Service has: `clusterIPs` (one per family, the primary first), or
/// `clusterIP` alone from an API server that does not fill `clusterIPs`.
fn cluster_ips(spec: &core::ServiceSpec) -> Result<Vec<IpAddr>, String> {
    let listed: Vec<&str> = spec
        .cluster_ips
        .iter()
        .flatten()
        .map(String::as_str)
        .filter(|s| !s.is_empty())
        .collect();
    let primary = spec.cluster_ip.as_deref().filter(|s| !s.is_empty());
    let all: Vec<&str> = match (primary, listed.is_empty()) {
        (Some(p), true) => vec![p],
        (_, false) => listed,
        (None, true) => return Err("clusterIP is empty".into()),
    };
    all.iter()
        .map(|s| {
            s.parse::<IpAddr>()
                .map_err(|_| format!("clusterIP {s:?} is not an IP address"))
        })
        .collect()
}

/// `spec.ipFamilies` and `spec.ipFamilyPolicy`, where set.
fn families(spec: &core::ServiceSpec) -> Result<(Vec<IpFamily>, Option<IpFamilyPolicy>), String> {
    let families = spec
        .ip_families
        .iter()
        .flatten()
        .map(|f| match f.as_str() {
            "IPv4" => Ok(IpFamily::IPv4),
            "IPv6" => Ok(IpFamily::IPv6),
            other => Err(format!("unknown ipFamily {other:?}")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let policy = match spec.ip_family_policy.as_deref() {
        None | Some("") => None,
        Some("SingleStack") => Some(IpFamilyPolicy::SingleStack),
        Some("PreferDualStack") => Some(IpFamilyPolicy::PreferDualStack),
        Some("RequireDualStack") => Some(IpFamilyPolicy::RequireDualStack),
        Some(other) => return Err(format!("unknown ipFamilyPolicy {other:?}")),
    };
    Ok((families, policy))
}

/// Translates one Service.
pub fn service(svc: &core::Service, rules: &Rules) -> Translated<Service> {
    let (namespace, name) = namespace_and_name(&svc.metadata);
    let labels = svc.metadata.labels.as_ref();
    if let Some(owner) = labels.and_then(|l| l.get(LABEL_SERVICE_PROXY_NAME)) {
        if rules.proxy_name.as_deref() != Some(owner.as_str()) {
            return Translated::ignore(
                format!("handled by proxy {owner:?} ({LABEL_SERVICE_PROXY_NAME})"),
                vec![],
            );
        }
    }
    if labels.is_some_and(|l| l.contains_key(LABEL_HEADLESS)) {
        return Translated::ignore(format!("headless (label {LABEL_HEADLESS})"), vec![]);
    }
    let Some(spec) = &svc.spec else {
        return reject("Service", &namespace, &name, "has no spec".into());
    };
    let service_type = match spec.type_.as_deref().unwrap_or("ClusterIP") {
        "ExternalName" => return Translated::ignore("type ExternalName", vec![]),
        "ClusterIP" => ServiceType::ClusterIP,
        "NodePort" => ServiceType::NodePort,
        "LoadBalancer" => ServiceType::LoadBalancer,
        other => {
            return reject(
                "Service",
                &namespace,
                &name,
                format!("unknown type {other:?}"),
            )
        }
    };
    let policy = |field: &str, value: Option<&str>| match value {
        None | Some("") | Some("Cluster") => Ok(TrafficPolicy::Cluster),
        Some("Local") => Ok(TrafficPolicy::Local),
        Some(other) => Err(format!("unknown {field} {other:?}")),
    };
    let policies = policy(
        "externalTrafficPolicy",
        spec.external_traffic_policy.as_deref(),
    )
    .and_then(|e| {
        policy(
            "internalTrafficPolicy",
            spec.internal_traffic_policy.as_deref(),
        )
        .map(|i| (e, i))
    });
    let (external_traffic_policy, internal_traffic_policy) = match policies {
        Ok(p) => p,
        Err(why) => return reject("Service", &namespace, &name, why),
    };
    let session_affinity = match spec.session_affinity.as_deref() {
        None | Some("") | Some("None") => model::SessionAffinity::None,
        Some("ClientIP") => model::SessionAffinity::ClientIp,
        Some(other) => {
            return reject(
                "Service",
                &namespace,
                &name,
                format!("unknown sessionAffinity {other:?}"),
            )
        }
    };
    match spec.cluster_ip.as_deref() {
        Some("None") => return Translated::ignore("headless (clusterIP None)", vec![]),
        None | Some("") => return Translated::ignore("no clusterIP allocated yet", vec![]),
        Some(_) => {}
    }
    let ports_in = spec.ports.as_deref().unwrap_or_default();
    let mut skipped = Vec::new();
    let cluster_ips = match cluster_ips(spec) {
        Ok(ips) => ips,
        Err(reason) => return reject("Service", &namespace, &name, reason),
    };
    let (ip_families, ip_family_policy) = match families(spec) {
        Ok(f) => f,
        Err(reason) => return reject("Service", &namespace, &name, reason),
    };
    let mut ports = Vec::new();
    for p in ports_in {
        let label = p.name.clone().unwrap_or_default();
        let proto = match protocol(p.protocol.as_deref()) {
            Ok(Some(proto)) => proto,
            Ok(None) => {
                skipped.push(Skip {
                    reason: SkipReason::Sctp,
                    what: format!("port {label:?} {}/SCTP", p.port),
                });
                continue;
            }
            Err(reason) => {
                return reject(
                    "Service",
                    &namespace,
                    &name,
                    format!("port {label:?}: {reason}"),
                )
            }
        };
        let port = match port_number(&format!("port {label:?}"), p.port) {
            Ok(port) => port,
            Err(reason) => return reject("Service", &namespace, &name, reason),
        };
        let target_port = match &p.target_port {
            None => None,
            Some(IntOrString::Int(t)) => {
                match port_number(&format!("port {label:?} targetPort"), *t) {
                    Ok(t) => Some(TargetPort::Number(t)),
                    Err(reason) => return reject("Service", &namespace, &name, reason),
                }
            }
            Some(IntOrString::String(s)) => Some(TargetPort::Name(s.clone())),
        };
        // The API server allocates nodePorts for NodePort and LoadBalancer Services
        // (not for a LoadBalancer with allocateLoadBalancerNodePorts: false).
        let node_port = match p.node_port {
            None | Some(0) => None,
            Some(np) if service_type == ServiceType::ClusterIP => {
                return reject(
                    "Service",
                    &namespace,
                    &name,
                    format!("port {label:?}: nodePort {np} on a ClusterIP Service"),
                )
            }
            Some(np) => match port_number(&format!("port {label:?} nodePort"), np) {
                Ok(np) => Some(np),
                Err(reason) => return reject("Service", &namespace, &name, reason),
            },
        };
        ports.push(ServicePort {
            name: label,
            port,
            target_port,
            protocol: proto,
            node_port,
        });
    }
    if ports.is_empty() && !skipped.is_empty() {
        return Translated::ignore("no TCP or UDP port", skipped);
    }
    // An address of a family the Service does not have is not programmed (kube-proxy's
    // proxier of that family does not see the Service): skipped with a line.
    let has = |ip: &IpAddr| {
        cluster_ips
            .iter()
            .any(|c| IpFamily::of(c) == IpFamily::of(ip))
    };
    let mut addresses = |what: &str, list: Vec<&str>| -> Result<Vec<IpAddr>, String> {
        let mut out = Vec::new();
        for a in list {
            match a.parse::<IpAddr>() {
                Ok(ip) if has(&ip) => out.push(ip),
                Ok(ip) => skipped.push(Skip {
                    reason: SkipReason::Family,
                    what: format!(
                        "{what} {a} ({} while the Service has no {} clusterIP)",
                        IpFamily::of(&ip),
                        IpFamily::of(&ip)
                    ),
                }),
                Err(_) => return Err(format!("{what} {a:?} is not an IP address")),
            }
        }
        Ok(out)
    };
    let external_ips = match addresses(
        "externalIPs",
        spec.external_ips
            .iter()
            .flatten()
            .map(String::as_str)
            .collect(),
    ) {
        Ok(v) => v,
        Err(reason) => return reject("Service", &namespace, &name, reason),
    };
    // An ingress IP with `ipMode: Proxy` is the load balancer's own address, which
    // it proxies to the nodes: not programmed, as kube-proxy does (VIP, or unset, is).
    let ingress: Vec<&str> = if service_type == ServiceType::LoadBalancer {
        svc.status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
            .into_iter()
            .flatten()
            .filter(|i| i.ip_mode.as_deref() != Some("Proxy"))
            .filter_map(|i| i.ip.as_deref())
            .collect()
    } else {
        Vec::new()
    };
    let load_balancer_ips = match addresses("status.loadBalancer.ingress ip", ingress) {
        Ok(v) => v,
        Err(reason) => return reject("Service", &namespace, &name, reason),
    };
    // As kube-proxy reads them: each CIDR trimmed; the API server validates them, so a
    // bad one is an object it did not check, rejected whole rather than opened up.
    let mut load_balancer_source_ranges = Vec::new();
    for r in spec.load_balancer_source_ranges.iter().flatten() {
        match r.trim().parse::<ipnet::IpNet>() {
            Ok(net) => load_balancer_source_ranges.push(net),
            Err(_) => {
                return reject(
                    "Service",
                    &namespace,
                    &name,
                    format!("loadBalancerSourceRanges {r:?} is not a CIDR"),
                )
            }
        }
    }
    for (field, what) in ignored_fields(spec) {
        skipped.push(Skip {
            reason: SkipReason::Ignored(field),
            what,
        });
    }
    let out = Service {
        name,
        namespace,
        cluster_ip: None,
        cluster_ips,
        ip_families,
        ip_family_policy,
        service_type,
        ports,
        external_ips,
        load_balancer_ips,
        load_balancer_source_ranges,
        external_traffic_policy,
        internal_traffic_policy,
        health_check_node_port: spec
            .health_check_node_port
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0),
        session_affinity,
        session_affinity_timeout_seconds: spec
            .session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .map(|t| t.max(0) as u32),
    };
    match model::validate_service(&out) {
        Ok(()) => Translated {
            outcome: Outcome::Use(out),
            skipped,
        },
        Err(e) => Translated::reject(e),
    }
}

/// Service fields kube-proxy implements and this dataplane does not yet: each one set
/// (to other than its default) is named, with what the Service gets instead.
fn ignored_fields(spec: &core::ServiceSpec) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    // PreferClose (and its newer name PreferSameZone) is carried out by the
    // EndpointSlice controller, which hints each ready endpoint for its own zone: the
    // hints are followed (`rules::service_frontends`), as kube-proxy does. PreferSameNode
    // adds node hints, which are not followed (its zone hints are).
    if let Some(td) = spec
        .traffic_distribution
        .as_deref()
        .filter(|t| !t.is_empty() && !matches!(*t, "PreferClose" | "PreferSameZone"))
    {
        out.push((
            IGNORED_SERVICE_FIELDS[0],
            format!("trafficDistribution {td}: only the zone hints are followed"),
        ));
    }
    out
}

/// Translates one EndpointSlice.
pub fn endpoint_slice(slice: &discovery::EndpointSlice) -> Translated<EndpointSlice> {
    let (namespace, name) = namespace_and_name(&slice.metadata);
    let Some(service_name) = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_SERVICE_NAME))
    else {
        return Translated::ignore(format!("no {LABEL_SERVICE_NAME} label"), vec![]);
    };
    let skip_whole =
        |reason, what: String| Translated::ignore(what.clone(), vec![Skip { reason, what }]);
    let family = match slice.address_type.as_str() {
        "IPv4" => IpFamily::IPv4,
        "IPv6" => IpFamily::IPv6,
        "FQDN" => return skip_whole(SkipReason::Fqdn, "addressType FQDN".into()),
        other => {
            return reject(
                "EndpointSlice",
                &namespace,
                &name,
                format!("unknown addressType {other:?}"),
            );
        }
    };
    let mut skipped = Vec::new();
    let mut ports = Vec::new();
    for p in slice.ports.iter().flatten() {
        let label = p.name.clone().unwrap_or_default();
        // kube-proxy drops ports without a number: they cannot be translated to.
        let Some(number) = p.port else { continue };
        let protocol = match protocol(p.protocol.as_deref()) {
            Ok(Some(proto)) => proto,
            // The Service side logs and counts the SCTP port; nothing matches it here.
            Ok(None) => continue,
            Err(reason) => {
                return reject(
                    "EndpointSlice",
                    &namespace,
                    &name,
                    format!("port {label:?}: {reason}"),
                )
            }
        };
        let port = match port_number(&format!("port {label:?}"), number) {
            Ok(port) => port,
            Err(reason) => return reject("EndpointSlice", &namespace, &name, reason),
        };
        ports.push(EndpointPort {
            name: label,
            port,
            protocol,
        });
    }
    let mut endpoints = Vec::new();
    let mut node_hinted = false;
    for ep in &slice.endpoints {
        let mut addresses = Vec::new();
        for a in &ep.addresses {
            match a.parse::<IpAddr>() {
                Ok(ip) if IpFamily::of(&ip) == family => addresses.push(ip),
                Ok(_) => {
                    return reject(
                        "EndpointSlice",
                        &namespace,
                        &name,
                        format!("endpoint address {a} is not of addressType {family}"),
                    );
                }
                Err(_) => {
                    return reject(
                        "EndpointSlice",
                        &namespace,
                        &name,
                        format!("endpoint address {a:?} is not an IP address"),
                    );
                }
            }
        }
        if addresses.is_empty() {
            continue;
        }
        let hints = ep.hints.as_ref();
        if hints.is_some_and(|h| h.for_nodes.as_ref().is_some_and(|n| !n.is_empty())) {
            node_hinted = true;
        }
        let zone_hints = model::zone_hints(
            hints
                .and_then(|h| h.for_zones.as_ref())
                .into_iter()
                .flatten()
                .map(|z| z.name.as_str()),
        );
        let c = ep.conditions.clone().unwrap_or_default();
        let conditions = Conditions {
            ready: c.ready,
            serving: c.serving,
            terminating: c.terminating,
        };
        let node_name: Option<model::NodeName> = ep.node_name.as_deref().map(Into::into);
        endpoints.extend(addresses.into_iter().map(|address| Endpoint {
            address,
            conditions,
            node_name: node_name.clone(),
            zone_hints: zone_hints.clone(),
        }));
    }
    if node_hinted {
        skipped.push(Skip {
            reason: SkipReason::Ignored(IGNORED_SLICE_FIELDS[0]),
            what: "topology hints forNodes (trafficDistribution PreferSameNode): only the zone hints are followed".into(),
        });
    }
    let out = EndpointSlice {
        name,
        namespace,
        service_name: service_name.clone(),
        ports,
        endpoints,
    };
    match model::validate_slice(&out) {
        Ok(()) => Translated {
            outcome: Outcome::Use(out),
            skipped,
        },
        Err(e) => Translated::reject(e),
    }
}

/// This node as the model needs it: its name (to tell local endpoints), its
/// InternalIP and ExternalIP addresses of both families (where NodePorts open), as
/// kube-proxy's default `--nodeport-addresses`, InternalIPs first, in the Node's order
/// (the first of each family is the source of the flows sent to other nodes, SNAT), and
/// its zone (label `topology.kubernetes.io/zone`, for the endpoints' zone hints).
pub fn node(n: &core::Node) -> model::Node {
    let listed: Vec<&core::NodeAddress> = n
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .collect();
    let mut addresses: Vec<IpAddr> = Vec::new();
    for kind in ["InternalIP", "ExternalIP"] {
        for a in listed.iter().filter(|a| a.type_ == kind) {
            if let Ok(ip) = a.address.parse::<IpAddr>() {
                if !addresses.contains(&ip) {
                    addresses.push(ip);
                }
            }
        }
    }
    let zone = n
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_ZONE))
        .filter(|z| !z.is_empty())
        .cloned();
    model::Node {
        name: n.metadata.name.clone(),
        addresses,
        zone,
        ..Default::default()
    }
}

/// The slice's `endpoints.kubernetes.io/last-change-trigger-time`, if set and valid.
pub fn trigger_time(slice: &discovery::EndpointSlice) -> Option<jiff::Timestamp> {
    slice
        .metadata
        .annotations
        .as_ref()?
        .get(ANNOTATION_TRIGGER_TIME)?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::model::{desired_state, BackendAddr, DesiredState, FrontendAddr, FrontendKind};

    fn k8s_svc(v: serde_json::Value) -> core::Service {
        serde_json::from_value(v).expect("test Service JSON")
    }

    fn k8s_slice(v: serde_json::Value) -> discovery::EndpointSlice {
        serde_json::from_value(v).expect("test EndpointSlice JSON")
    }

    fn web(spec: serde_json::Value) -> core::Service {
        k8s_svc(json!({"metadata": {"name": "web", "namespace": "shop"}, "spec": spec}))
    }

    fn slice(
        name: &str,
        service: &str,
        ports: serde_json::Value,
        endpoints: serde_json::Value,
    ) -> discovery::EndpointSlice {
        k8s_slice(json!({
            "metadata": {"name": name, "namespace": "shop", "labels": {LABEL_SERVICE_NAME: service}},
            "addressType": "IPv4",
            "ports": ports,
            "endpoints": endpoints,
        }))
    }

    fn used<T: Clone + std::fmt::Debug>(t: &Translated<T>) -> T {
        t.used()
            .cloned()
            .unwrap_or_else(|| panic!("expected Use, got {t:?}"))
    }

    /// Translate everything (as the controller does) and compute the desired state.
    fn state(
        services: &[core::Service],
        slices: &[discovery::EndpointSlice],
        rules: &Rules,
    ) -> DesiredState {
        state_on(services, slices, rules, &model::Node::default())
    }

    /// `state` on a given node (its name and addresses).
    fn state_on(
        services: &[core::Service],
        slices: &[discovery::EndpointSlice],
        rules: &Rules,
        node: &model::Node,
    ) -> DesiredState {
        let svcs: Vec<Service> = services
            .iter()
            .filter_map(|s| service(s, rules).used().cloned())
            .collect();
        let sls: Vec<EndpointSlice> = slices
            .iter()
            .filter_map(|s| endpoint_slice(s).used().cloned())
            .collect();
        desired_state(&svcs, &sls, node)
    }

    /// frontend -> active backends, as strings.
    fn active(st: &DesiredState) -> Vec<(String, Vec<String>)> {
        st.frontends
            .iter()
            .map(|(fe, spec)| {
                (
                    fe.to_string(),
                    spec.active.iter().map(BackendAddr::to_string).collect(),
                )
            })
            .collect()
    }

    fn pairs(v: &[(&str, &[&str])]) -> Vec<(String, Vec<String>)> {
        v.iter()
            .map(|(f, bs)| (f.to_string(), bs.iter().map(|b| b.to_string()).collect()))
            .collect()
    }

    #[test]
    fn every_port_is_programmed_and_matched_by_name() {
        let svc = web(json!({"clusterIP": "10.96.0.10", "ports": [
            {"name": "http", "port": 80, "targetPort": "web"},
            {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353},
        ]}));
        let s = used(&service(&svc, &Rules::default()));
        assert_eq!(s.ports[0].target_port, Some(TargetPort::Name("web".into())));
        assert_eq!(s.ports[1].protocol, Protocol::Udp);
        let sl = slice(
            "web-a",
            "web",
            json!([{"name": "http", "port": 8080}, {"name": "dns", "port": 5353, "protocol": "UDP"}]),
            json!([{"addresses": ["10.244.1.2"]}]),
        );
        let st = state(&[svc], &[sl], &Rules::default());
        assert_eq!(
            active(&st),
            pairs(&[
                ("10.96.0.10:53/UDP", &["10.244.1.2:5353/UDP"]),
                ("10.96.0.10:80/TCP", &["10.244.1.2:8080/TCP"]),
            ])
        );
    }

    #[test]
    fn headless_external_name_and_unallocated_services_are_ignored() {
        for spec in [
            json!({"clusterIP": "None", "ports": [{"port": 80}]}),
            json!({"type": "ExternalName", "externalName": "example.com"}),
            json!({"ports": [{"port": 80}]}),
        ] {
            let t = service(&web(spec.clone()), &Rules::default());
            assert!(matches!(t.outcome, Outcome::Ignore(_)), "{spec}: {t:?}");
            assert!(t.skipped.is_empty());
        }
    }

    /// kube-proxy lists Services with the selector `!service.kubernetes.io/headless`: a
    /// Service with that label is not proxied, whatever its value and clusterIP.
    #[test]
    fn the_headless_label_makes_a_service_headless_for_the_proxy() {
        for value in ["", "true"] {
            let svc = k8s_svc(json!({
                "metadata": {"name": "web", "namespace": "shop", "labels": {LABEL_HEADLESS: value}},
                "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]},
            }));
            let t = service(&svc, &Rules::default());
            assert!(matches!(t.outcome, Outcome::Ignore(_)), "{value:?}: {t:?}");
            assert!(t.skipped.is_empty());
        }
        let other = k8s_svc(json!({
            "metadata": {"name": "web", "namespace": "shop", "labels": {"app": "web"}},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]},
        }));
        assert!(service(&other, &Rules::default()).used().is_some());
    }

    #[test]
    fn service_proxy_name_label_hands_the_service_to_the_named_proxy() {
        let svc = k8s_svc(json!({
            "metadata": {"name": "web", "namespace": "shop", "labels": {LABEL_SERVICE_PROXY_NAME: "lb"}},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]},
        }));
        assert!(matches!(
            service(&svc, &Rules::default()).outcome,
            Outcome::Ignore(_)
        ));
        let other = Rules {
            proxy_name: Some("other".into()),
        };
        assert!(matches!(service(&svc, &other).outcome, Outcome::Ignore(_)));
        let mine = Rules {
            proxy_name: Some("lb".into()),
        };
        assert_eq!(
            used(&service(&svc, &mine)).cluster_ips,
            vec![IpAddr::from([10, 96, 0, 10])]
        );
        // A proxy with a name still programs unlabelled Services, as kube-proxy does.
        assert!(service(
            &web(json!({"clusterIP": "10.96.0.11", "ports": [{"port": 80}]})),
            &mine
        )
        .used()
        .is_some());
    }

    #[test]
    fn sctp_ports_are_skipped_and_the_rest_kept() {
        let svc = web(json!({"clusterIP": "10.96.0.10", "ports": [
            {"name": "http", "port": 80},
            {"name": "sig", "port": 3868, "protocol": "SCTP"},
        ]}));
        let t = service(&svc, &Rules::default());
        assert_eq!(t.skipped.len(), 1);
        assert_eq!(t.skipped[0].reason, SkipReason::Sctp);
        assert!(t.skipped[0].what.contains("3868"), "{:?}", t.skipped);
        assert_eq!(used(&t).ports.len(), 1);
        let only_sctp =
            web(json!({"clusterIP": "10.96.0.10", "ports": [{"port": 3868, "protocol": "SCTP"}]}));
        let t = service(&only_sctp, &Rules::default());
        assert!(matches!(t.outcome, Outcome::Ignore(_)), "{t:?}");
        assert_eq!(t.skipped.len(), 1);
    }

    #[test]
    fn ipv6_and_dual_stack_services_keep_every_cluster_ip_and_their_families() {
        let v6 = web(
            json!({"clusterIP": "fd00::10", "clusterIPs": ["fd00::10"], "ipFamilies": ["IPv6"],
                   "ipFamilyPolicy": "SingleStack", "ports": [{"name": "a", "port": 80}, {"name": "b", "port": 81}]}),
        );
        let t = service(&v6, &Rules::default());
        assert!(t.skipped.is_empty(), "{t:?}");
        let s = used(&t);
        assert_eq!(s.cluster_ips, vec!["fd00::10".parse::<IpAddr>().unwrap()]);
        assert_eq!(s.ip_families, vec![IpFamily::IPv6]);
        assert_eq!(s.ip_family_policy, Some(IpFamilyPolicy::SingleStack));
        let dual = web(
            json!({"clusterIP": "fd00::10", "clusterIPs": ["fd00::10", "10.96.0.10"],
                   "ipFamilies": ["IPv6", "IPv4"], "ipFamilyPolicy": "RequireDualStack", "ports": [{"port": 80}]}),
        );
        assert_eq!(
            used(&service(&dual, &Rules::default())).cluster_ips,
            vec![
                "fd00::10".parse::<IpAddr>().unwrap(),
                IpAddr::from([10, 96, 0, 10])
            ]
        );
        // Only clusterIP (an API server that does not fill clusterIPs): that one.
        let old = web(json!({"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}));
        assert_eq!(
            used(&service(&old, &Rules::default())).cluster_ips,
            vec![IpAddr::from([10, 96, 0, 10])]
        );
        // Families that do not match the addresses, or two of one family: rejected.
        for (spec, why) in [
            (
                json!({"clusterIPs": ["10.96.0.10"], "clusterIP": "10.96.0.10", "ipFamilies": ["IPv6"], "ports": [{"port": 80}]}),
                "ipFamilies",
            ),
            (
                json!({"clusterIPs": ["10.96.0.10", "10.96.0.11"], "clusterIP": "10.96.0.10", "ports": [{"port": 80}]}),
                "one address per family",
            ),
            (
                json!({"clusterIPs": ["10.96.0.10"], "clusterIP": "10.96.0.10", "ipFamilyPolicy": "RequireDualStack", "ports": [{"port": 80}]}),
                "RequireDualStack",
            ),
        ] {
            let msg = rejection(&service(&web(spec.clone()), &Rules::default()));
            assert!(msg.contains(why), "{spec}: {msg}");
        }
    }

    #[test]
    fn malformed_services_are_rejected_with_namespace_name_and_reason() {
        let cases = [
            (
                json!({"clusterIP": "10.96.0.300", "ports": [{"port": 80}]}),
                "clusterIP \"10.96.0.300\" is not an IP address",
            ),
            (
                json!({"clusterIP": "10.96.0.10", "ports": [{"port": 70000}]}),
                "out of range",
            ),
            (
                json!({"clusterIP": "10.96.0.10", "ports": [{"port": 80, "targetPort": -1}]}),
                "targetPort: port -1",
            ),
            (
                json!({"clusterIP": "10.96.0.10", "ports": [{"port": 80, "protocol": "ICMP"}]}),
                "unknown protocol",
            ),
            (
                json!({"clusterIP": "10.96.0.10", "ports": [{"port": 80}, {"port": 81}]}),
                "needs a name",
            ),
            (
                json!({"clusterIP": "10.96.0.10", "ports": []}),
                "has no ports",
            ),
        ];
        for (spec, want) in cases {
            let t = service(&web(spec.clone()), &Rules::default());
            let Outcome::Reject(e) = &t.outcome else {
                panic!("{spec}: expected Reject, got {t:?}")
            };
            let msg = e.to_string();
            assert!(msg.starts_with("Service shop/web: "), "{msg}");
            assert!(
                msg.contains(want),
                "{spec}: {msg:?} should contain {want:?}"
            );
        }
    }

    #[test]
    fn a_rejected_service_does_not_affect_the_others() {
        let bad = k8s_svc(
            json!({"metadata": {"name": "bad", "namespace": "shop"}, "spec": {"clusterIP": "nope", "ports": [{"port": 80}]}}),
        );
        let good = web(json!({"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}));
        let sl = slice(
            "web-a",
            "web",
            json!([{"port": 8080}]),
            json!([{"addresses": ["10.244.1.2"]}]),
        );
        let st = state(&[bad, good], &[sl], &Rules::default());
        assert_eq!(
            active(&st),
            pairs(&[("10.96.0.10:80/TCP", &["10.244.1.2:8080/TCP"])])
        );
    }

    #[test]
    fn readiness_unset_means_ready_and_terminating_is_the_fallback() {
        let svc = web(json!({"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}));
        let p = json!([{"port": 8080}]);
        let sl = slice(
            "web-a",
            "web",
            p.clone(),
            json!([
                {"addresses": ["10.244.1.2"]},
                {"addresses": ["10.244.1.3"], "conditions": {"ready": true}},
                {"addresses": ["10.244.1.4"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                {"addresses": ["10.244.1.5"], "conditions": {"ready": false}},
            ]),
        );
        let st = state(std::slice::from_ref(&svc), &[sl], &Rules::default());
        assert_eq!(
            active(&st),
            pairs(&[(
                "10.96.0.10:80/TCP",
                &["10.244.1.2:8080/TCP", "10.244.1.3:8080/TCP"]
            )])
        );
        assert_eq!(st.frontends.values().next().unwrap().known.len(), 4);
        let only_terminating = slice(
            "web-a",
            "web",
            p,
            json!([
                {"addresses": ["10.244.1.4"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                {"addresses": ["10.244.1.6"], "conditions": {"ready": false, "serving": false, "terminating": true}},
            ]),
        );
        let st = state(&[svc], &[only_terminating], &Rules::default());
        assert_eq!(
            active(&st),
            pairs(&[("10.96.0.10:80/TCP", &["10.244.1.4:8080/TCP"])])
        );
    }

    #[test]
    fn endpoints_of_all_slices_are_merged_and_hand_made_slices_work() {
        // A Service without selector: its slices are made by hand, with the label only.
        let svc = web(json!({"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80}]}));
        let p = json!([{"name": "http", "port": 8080}]);
        let a = slice(
            "web-a",
            "web",
            p.clone(),
            json!([{"addresses": ["10.244.1.2"]}, {"addresses": ["10.244.1.3"]}]),
        );
        let b = slice(
            "web-manual",
            "web",
            p.clone(),
            json!([{"addresses": ["10.244.1.3"]}, {"addresses": ["10.244.2.9"]}]),
        );
        let unlabelled = k8s_slice(json!({
            "metadata": {"name": "stray", "namespace": "shop"},
            "addressType": "IPv4", "ports": p, "endpoints": [{"addresses": ["10.244.3.3"]}],
        }));
        assert!(matches!(
            endpoint_slice(&unlabelled).outcome,
            Outcome::Ignore(_)
        ));
        let st = state(&[svc], &[a, b, unlabelled], &Rules::default());
        assert_eq!(
            active(&st),
            pairs(&[(
                "10.96.0.10:80/TCP",
                &[
                    "10.244.1.2:8080/TCP",
                    "10.244.1.3:8080/TCP",
                    "10.244.2.9:8080/TCP"
                ]
            )])
        );
    }

    #[test]
    fn ipv6_slices_are_used_and_fqdn_ones_skipped() {
        let v6 = k8s_slice(json!({
            "metadata": {"name": "web-v6", "namespace": "shop", "labels": {LABEL_SERVICE_NAME: "web"}},
            "addressType": "IPv6", "endpoints": [{"addresses": ["fd00::2"]}],
        }));
        let t = endpoint_slice(&v6);
        assert!(t.skipped.is_empty(), "{t:?}");
        assert_eq!(
            used(&t).endpoints[0].address,
            "fd00::2".parse::<IpAddr>().unwrap()
        );
        // An address that is not of the slice's addressType: rejected.
        let mut mixed = v6.clone();
        mixed.endpoints[0].addresses.push("10.244.1.2".into());
        assert!(rejection(&endpoint_slice(&mixed)).contains("not of addressType IPv6"));
        let mut fqdn = v6.clone();
        fqdn.address_type = "FQDN".into();
        assert_eq!(endpoint_slice(&fqdn).skipped[0].reason, SkipReason::Fqdn);
    }

    #[test]
    fn slice_ports_without_number_or_sctp_are_dropped_and_bad_addresses_rejected() {
        let sl = slice(
            "web-a",
            "web",
            json!([{"name": "a"}, {"name": "s", "port": 9, "protocol": "SCTP"}, {"name": "h", "port": 8080}]),
            json!([{"addresses": ["10.244.1.2"]}]),
        );
        let s = used(&endpoint_slice(&sl));
        assert_eq!(
            s.ports,
            vec![EndpointPort {
                name: "h".into(),
                port: 8080,
                protocol: Protocol::Tcp
            }]
        );
        assert_eq!(s.service_name, "web");
        let bad = slice(
            "web-b",
            "web",
            json!([{"port": 8080}]),
            json!([{"addresses": ["10.244.1.x"]}]),
        );
        let Outcome::Reject(e) = endpoint_slice(&bad).outcome else {
            panic!("expected Reject")
        };
        assert_eq!(
            e.to_string(),
            "EndpointSlice shop/web-b: endpoint address \"10.244.1.x\" is not an IP address"
        );
        let zero = slice(
            "web-c",
            "web",
            json!([{"port": 8080}]),
            json!([{"addresses": ["0.0.0.0"]}]),
        );
        assert!(matches!(endpoint_slice(&zero).outcome, Outcome::Reject(_)));
    }

    #[test]
    fn type_change_and_port_changes_converge() {
        let sl = slice(
            "web-a",
            "web",
            json!([{"name": "http", "port": 8080}, {"name": "m", "port": 9100}]),
            json!([{"addresses": ["10.244.1.2"]}]),
        );
        let one = web(json!({"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80}]}));
        let two = web(
            json!({"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80}, {"name": "m", "port": 9090}]}),
        );
        let ext = web(json!({"type": "ExternalName", "externalName": "example.com"}));
        let r = Rules::default();
        let fes = |svc: &core::Service| {
            state(std::slice::from_ref(svc), std::slice::from_ref(&sl), &r)
                .frontends
                .keys()
                .copied()
                .collect::<Vec<FrontendAddr>>()
        };
        assert_eq!(fes(&one).len(), 1);
        assert_eq!(fes(&two).len(), 2);
        assert!(fes(&ext).is_empty());
        assert_eq!(fes(&one).len(), 1);
    }

    #[test]
    fn trigger_time_is_read_from_the_annotation() {
        let mut sl = slice("web-a", "web", json!([]), json!([]));
        assert_eq!(trigger_time(&sl), None);
        sl.metadata.annotations = Some(
            [(
                ANNOTATION_TRIGGER_TIME.to_string(),
                "2024-05-01T10:00:00Z".to_string(),
            )]
            .into(),
        );
        assert_eq!(
            trigger_time(&sl),
            Some("2024-05-01T10:00:00Z".parse().unwrap())
        );
    }

    fn rejection<T: std::fmt::Debug>(t: &Translated<T>) -> String {
        match &t.outcome {
            Outcome::Reject(e) => e.to_string(),
            other => panic!("expected Reject, got {other:?}"),
        }
    }

    #[test]
    fn session_affinity_is_read_with_its_timeout() {
        let r = Rules::default();
        for (spec, want) in [
            (json!({}), 0),
            (json!({"sessionAffinity": "None"}), 0),
            (json!({"sessionAffinity": "ClientIP"}), 10_800),
            (
                json!({"sessionAffinity": "ClientIP",
                       "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}}),
                60,
            ),
        ] {
            let mut s = json!({"clusterIP": "10.96.0.10", "ports": [{"port": 80}]});
            for (k, v) in spec.as_object().unwrap() {
                s[k] = v.clone();
            }
            let t = service(&web(s), &r);
            assert!(t.skipped.is_empty(), "{spec}: {:?}", t.skipped);
            assert_eq!(used(&t).affinity_timeout_s(), want, "{spec}");
        }
        let too_long = web(json!({"clusterIP": "10.96.0.10", "ports": [{"port": 80}],
            "sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 100000}}}));
        assert!(matches!(service(&too_long, &r).outcome, Outcome::Reject(_)));
    }

    #[test]
    fn internal_traffic_policy_is_read_and_not_counted_as_ignored() {
        let r = Rules::default();
        for (itp, want) in [
            (json!(null), TrafficPolicy::Cluster),
            (json!("Cluster"), TrafficPolicy::Cluster),
            (json!("Local"), TrafficPolicy::Local),
        ] {
            let spec = json!({"clusterIP": "10.96.0.10", "internalTrafficPolicy": itp,
                              "ports": [{"port": 80}]});
            let t = service(&web(spec), &r);
            assert!(t.skipped.is_empty(), "{itp}: {:?}", t.skipped);
            assert_eq!(used(&t).internal_traffic_policy, want, "{itp}");
        }
        let bad = web(
            json!({"clusterIP": "10.96.0.10", "internalTrafficPolicy": "Nearby",
                             "ports": [{"port": 80}]}),
        );
        assert!(matches!(service(&bad, &r).outcome, Outcome::Reject(_)));
    }

    #[test]
    fn service_type_and_external_traffic_policy_are_read() {
        let r = Rules::default();
        for (spec, t, policy) in [
            (
                json!({"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}),
                ServiceType::ClusterIP,
                TrafficPolicy::Cluster,
            ),
            (
                json!({"type": "NodePort", "clusterIP": "10.96.0.10", "externalTrafficPolicy": "Local",
                       "ports": [{"port": 80, "nodePort": 30080}]}),
                ServiceType::NodePort,
                TrafficPolicy::Local,
            ),
            (
                json!({"type": "LoadBalancer", "clusterIP": "10.96.0.10", "externalTrafficPolicy": "Cluster",
                       "ports": [{"port": 80, "nodePort": 30080}]}),
                ServiceType::LoadBalancer,
                TrafficPolicy::Cluster,
            ),
        ] {
            let s = used(&service(&web(spec.clone()), &r));
            assert_eq!(
                (s.service_type, s.external_traffic_policy),
                (t, policy),
                "{spec}"
            );
        }
        let bad_type =
            web(json!({"type": "Headless", "clusterIP": "10.96.0.10", "ports": [{"port": 80}]}));
        assert_eq!(
            rejection(&service(&bad_type, &r)),
            "Service shop/web: unknown type \"Headless\""
        );
        let bad_policy = web(
            json!({"type": "NodePort", "clusterIP": "10.96.0.10", "externalTrafficPolicy": "Nearby",
                   "ports": [{"port": 80, "nodePort": 30080}]}),
        );
        assert_eq!(
            rejection(&service(&bad_policy, &r)),
            "Service shop/web: unknown externalTrafficPolicy \"Nearby\""
        );
    }

    #[test]
    fn node_ports_are_kept_and_rejected_on_cluster_ip_services() {
        let r = Rules::default();
        let s = used(&service(
            &web(
                json!({"type": "NodePort", "clusterIP": "10.96.0.10", "ports": [
                    {"name": "http", "port": 80, "nodePort": 30080},
                    {"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30053},
                ]}),
            ),
            &r,
        ));
        assert_eq!(
            s.ports.iter().map(|p| p.node_port).collect::<Vec<_>>(),
            vec![Some(30080), Some(30053)]
        );
        // A LoadBalancer without allocated nodePorts (allocateLoadBalancerNodePorts: false).
        let s = used(&service(
            &web(
                json!({"type": "LoadBalancer", "clusterIP": "10.96.0.10", "ports": [{"port": 80}]}),
            ),
            &r,
        ));
        assert_eq!(s.ports[0].node_port, None);
        let on_cluster_ip = web(
            json!({"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}),
        );
        assert_eq!(
            rejection(&service(&on_cluster_ip, &r)),
            "Service shop/web: port \"http\": nodePort 30080 on a ClusterIP Service"
        );
        let out_of_range = web(
            json!({"type": "NodePort", "clusterIP": "10.96.0.10", "ports": [{"port": 80, "nodePort": 70000}]}),
        );
        let msg = rejection(&service(&out_of_range, &r));
        assert!(msg.starts_with("Service shop/web: "), "{msg}");
        assert!(
            msg.contains("nodePort: port 70000 is out of range"),
            "{msg}"
        );
    }

    #[test]
    fn external_ips_of_the_services_families_are_read_others_skipped_bad_ones_rejected() {
        let r = Rules::default();
        let t = service(
            &web(json!({"clusterIP": "10.96.0.10", "ports": [{"port": 80}],
                        "externalIPs": ["203.0.113.5", "2001:db8::5", "203.0.113.6"]})),
            &r,
        );
        assert_eq!(
            used(&t).external_ips,
            vec![
                IpAddr::from([203, 0, 113, 5]),
                IpAddr::from([203, 0, 113, 6])
            ]
        );
        assert_eq!(
            t.skipped,
            vec![Skip {
                reason: SkipReason::Family,
                what: "externalIPs 2001:db8::5 (IPv6 while the Service has no IPv6 clusterIP)"
                    .into()
            }]
        );
        let bad = web(
            json!({"clusterIP": "10.96.0.10", "ports": [{"port": 80}], "externalIPs": ["203.0.113.x"]}),
        );
        assert_eq!(
            rejection(&service(&bad, &r)),
            "Service shop/web: externalIPs \"203.0.113.x\" is not an IP address"
        );
        let multicast = web(
            json!({"clusterIP": "10.96.0.10", "ports": [{"port": 80}], "externalIPs": ["224.0.0.1"]}),
        );
        assert!(rejection(&service(&multicast, &r)).contains("cannot be a Service address"));
    }

    #[test]
    fn load_balancer_source_ranges_are_read_trimmed_and_a_bad_one_rejects_the_service() {
        let r = Rules::default();
        let mut svc = lb_svc("LoadBalancer", json!([{"ip": "198.51.100.7"}]));
        svc.spec.as_mut().unwrap().load_balancer_source_ranges =
            Some(vec![" 203.0.113.0/24".into(), "2001:db8::/32 ".into()]);
        let t = service(&svc, &r);
        assert_eq!(
            used(&t).load_balancer_source_ranges,
            vec![
                "203.0.113.0/24".parse::<ipnet::IpNet>().unwrap(),
                "2001:db8::/32".parse().unwrap()
            ]
        );
        assert!(
            t.skipped.is_empty(),
            "implemented, not ignored: {:?}",
            t.skipped
        );
        svc.spec.as_mut().unwrap().load_balancer_source_ranges = Some(vec!["203.0.113/24".into()]);
        assert_eq!(
            rejection(&service(&svc, &r)),
            "Service shop/web: loadBalancerSourceRanges \"203.0.113/24\" is not a CIDR"
        );
    }

    fn lb_svc(type_: &str, ingress: serde_json::Value) -> core::Service {
        k8s_svc(json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"type": type_, "clusterIP": "10.96.0.10", "ports": [{"port": 80, "nodePort": 30080}]},
            "status": {"loadBalancer": {"ingress": ingress}},
        }))
    }

    #[test]
    fn load_balancer_ingress_ips_are_read_for_type_load_balancer_only() {
        let r = Rules::default();
        let t = service(
            &lb_svc(
                "LoadBalancer",
                json!([{"ip": "198.51.100.7"}, {"hostname": "lb.example.com"}, {"ip": "2001:db8::7"},
                       {"ip": "198.51.100.8", "hostname": "lb2.example.com"}]),
            ),
            &r,
        );
        assert_eq!(
            used(&t).load_balancer_ips,
            vec![
                IpAddr::from([198, 51, 100, 7]),
                IpAddr::from([198, 51, 100, 8])
            ]
        );
        assert_eq!(
            t.skipped,
            vec![Skip {
                reason: SkipReason::Family,
                what: "status.loadBalancer.ingress ip 2001:db8::7 (IPv6 while the Service has no IPv6 clusterIP)"
                    .into()
            }]
        );
        // A NodePort Service with a stale status (after a type change): no LB frontend.
        let t = service(&lb_svc("NodePort", json!([{"ip": "198.51.100.7"}])), &r);
        assert!(used(&t).load_balancer_ips.is_empty());
        assert_eq!(used(&t).service_type, ServiceType::NodePort);
        let bad = service(&lb_svc("LoadBalancer", json!([{"ip": "198.51.100.x"}])), &r);
        assert_eq!(
            rejection(&bad),
            "Service shop/web: status.loadBalancer.ingress ip \"198.51.100.x\" is not an IP address"
        );
        // Not provisioned yet: no status at all.
        let pending = web(
            json!({"type": "LoadBalancer", "clusterIP": "10.96.0.10", "ports": [{"port": 80, "nodePort": 30080}]}),
        );
        assert!(used(&service(&pending, &r)).load_balancer_ips.is_empty());
    }

    #[test]
    fn endpoint_node_names_are_kept() {
        let sl = slice(
            "web-a",
            "web",
            json!([{"port": 8080}]),
            json!([{"addresses": ["10.244.1.2"], "nodeName": "node-a"}, {"addresses": ["10.244.2.2"]}]),
        );
        let s = used(&endpoint_slice(&sl));
        assert_eq!(
            s.endpoints
                .iter()
                .map(|e| e.node_name.as_deref())
                .collect::<Vec<_>>(),
            vec![Some("node-a"), None]
        );
    }

    #[test]
    fn node_has_its_name_and_internal_then_external_addresses_of_both_families() {
        let n: core::Node = serde_json::from_value(json!({
            "metadata": {"name": "node-a"},
            "status": {"addresses": [
                {"type": "Hostname", "address": "node-a"},
                {"type": "InternalIP", "address": "192.168.50.2"},
                {"type": "InternalIP", "address": "fd00::2"},
                {"type": "ExternalIP", "address": "203.0.113.9"},
                {"type": "InternalDNS", "address": "node-a.cluster.local"},
                {"type": "ExternalIP", "address": "192.168.50.2"},
                {"type": "InternalIP", "address": "10.0.0.2"},
            ]},
        }))
        .unwrap();
        assert_eq!(
            node(&n),
            model::Node {
                name: Some("node-a".into()),
                addresses: vec![
                    IpAddr::from([192, 168, 50, 2]),
                    "fd00::2".parse().unwrap(),
                    IpAddr::from([10, 0, 0, 2]),
                    IpAddr::from([203, 0, 113, 9]),
                ],
                zone: None,
                ..Default::default()
            }
        );
        // The first InternalIP of each family is the SNAT source.
        let snat = model::SnatSources::of(&node(&n));
        assert_eq!(snat.v4, Some(IpAddr::from([192, 168, 50, 2])));
        assert_eq!(snat.v6, Some("fd00::2".parse().unwrap()));
        let bare: core::Node =
            serde_json::from_value(json!({"metadata": {"name": "node-b"}})).unwrap();
        assert_eq!(
            node(&bare),
            model::Node {
                name: Some("node-b".into()),
                addresses: vec![],
                zone: None,
                ..Default::default()
            }
        );
    }

    #[test]
    fn node_ports_external_and_lb_ips_reach_the_desired_state_with_local_endpoints() {
        let n: core::Node = serde_json::from_value(json!({
            "metadata": {"name": "node-a"},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.168.50.1"}]},
        }))
        .unwrap();
        let svc = k8s_svc(json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10", "externalTrafficPolicy": "Local",
                     "externalIPs": ["203.0.113.5"],
                     "ports": [{"name": "http", "port": 80, "nodePort": 30080}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.7"}]}},
        }));
        let sl = slice(
            "web-a",
            "web",
            json!([{"name": "http", "port": 8080}]),
            json!([
                {"addresses": ["10.244.1.2"], "nodeName": "node-a"},
                {"addresses": ["10.244.2.2"], "nodeName": "node-b"},
            ]),
        );
        let r = Rules::default();
        let st = state_on(
            std::slice::from_ref(&svc),
            std::slice::from_ref(&sl),
            &r,
            &node(&n),
        );
        assert_eq!(
            active(&st),
            pairs(&[
                (
                    "10.96.0.10:80/TCP",
                    &["10.244.1.2:8080/TCP", "10.244.2.2:8080/TCP"]
                ),
                ("192.168.50.1:30080/TCP", &["10.244.1.2:8080/TCP"]),
                // As the node's own sockets and its pods' see them: every endpoint.
                (
                    "192.168.50.1:30080/TCP@inside",
                    &["10.244.1.2:8080/TCP", "10.244.2.2:8080/TCP"]
                ),
                ("198.51.100.7:80/TCP", &["10.244.1.2:8080/TCP"]),
                (
                    "198.51.100.7:80/TCP@inside",
                    &["10.244.1.2:8080/TCP", "10.244.2.2:8080/TCP"]
                ),
                ("203.0.113.5:80/TCP", &["10.244.1.2:8080/TCP"]),
                (
                    "203.0.113.5:80/TCP@inside",
                    &["10.244.1.2:8080/TCP", "10.244.2.2:8080/TCP"]
                ),
            ])
        );
        let kinds: Vec<_> = st.frontends.values().map(|f| f.kind).collect();
        assert_eq!(
            kinds,
            vec![
                FrontendKind::ClusterIP,
                FrontendKind::NodePort,
                FrontendKind::NodePort,
                FrontendKind::LoadBalancer,
                FrontendKind::LoadBalancer,
                FrontendKind::ExternalIP,
                FrontendKind::ExternalIP
            ]
        );
        // Before the node is known (Node::default()): no NodePort, every endpoint local
        // (so both views are the same).
        let st = state(&[svc], &[sl], &r);
        let both = ["10.244.1.2:8080/TCP", "10.244.2.2:8080/TCP"];
        assert_eq!(
            active(&st),
            pairs(&[
                ("10.96.0.10:80/TCP", &both),
                ("198.51.100.7:80/TCP", &both),
                ("198.51.100.7:80/TCP@inside", &both),
                ("203.0.113.5:80/TCP", &both),
                ("203.0.113.5:80/TCP@inside", &both),
            ])
        );
    }

    #[test]
    fn a_dual_stack_service_reaches_the_desired_state_family_by_family() {
        let r = Rules::default();
        let svc = web(json!({
            "type": "NodePort", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00:10:96::a"],
            "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "PreferDualStack",
            "externalIPs": ["203.0.113.5", "2001:db8::5"],
            "ports": [{"name": "http", "port": 80, "nodePort": 30080}],
        }));
        let v4 = slice(
            "web-v4",
            "web",
            json!([{"name": "http", "port": 8080}]),
            json!([{"addresses": ["10.244.1.2"], "nodeName": "node-a"}]),
        );
        let mut v6 = slice(
            "web-v6",
            "web",
            json!([{"name": "http", "port": 8080}]),
            json!([{"addresses": ["fd00:10:244::2"], "nodeName": "node-a"},
                   {"addresses": ["fd00:10:244::3"], "nodeName": "node-b"}]),
        );
        v6.address_type = "IPv6".into();
        let n: core::Node = serde_json::from_value(json!({
            "metadata": {"name": "node-a"},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.168.50.1"},
                                     {"type": "InternalIP", "address": "fd00:50::1"}]},
        }))
        .unwrap();
        let st = state_on(&[svc], &[v4, v6], &r, &node(&n));
        assert_eq!(
            active(&st),
            pairs(&[
                ("10.96.0.10:80/TCP", &["10.244.1.2:8080/TCP"]),
                ("192.168.50.1:30080/TCP", &["10.244.1.2:8080/TCP"]),
                ("203.0.113.5:80/TCP", &["10.244.1.2:8080/TCP"]),
                // externalTrafficPolicy Cluster: node-b's endpoint too, from outside.
                (
                    "[2001:db8::5]:80/TCP",
                    &["[fd00:10:244::2]:8080/TCP", "[fd00:10:244::3]:8080/TCP"]
                ),
                (
                    "[fd00:10:96::a]:80/TCP",
                    &["[fd00:10:244::2]:8080/TCP", "[fd00:10:244::3]:8080/TCP"]
                ),
                (
                    "[fd00:50::1]:30080/TCP",
                    &["[fd00:10:244::2]:8080/TCP", "[fd00:10:244::3]:8080/TCP"]
                ),
            ])
        );
    }

    #[test]
    fn zone_hints_and_the_nodes_zone_are_read_and_followed() {
        let r = Rules::default();
        let sl = slice(
            "web-a",
            "web",
            json!([{"name": "http", "port": 8080}]),
            json!([
                {"addresses": ["10.244.1.2"], "nodeName": "node-a", "zone": "zone-a",
                 "hints": {"forZones": [{"name": "zone-a"}]}},
                {"addresses": ["10.244.2.2"], "nodeName": "node-b", "zone": "zone-b",
                 "hints": {"forZones": [{"name": "zone-b"}, {"name": "zone-a"}]}},
                {"addresses": ["10.244.3.2"], "nodeName": "node-c", "zone": "zone-c",
                 "hints": {"forZones": [{"name": "zone-c"}]}},
            ]),
        );
        let t = endpoint_slice(&sl);
        assert!(
            t.skipped.is_empty(),
            "zone hints are followed: {:?}",
            t.skipped
        );
        assert_eq!(
            used(&t)
                .endpoints
                .iter()
                .map(|e| e.zone_hints.as_deref().cloned().unwrap_or_default())
                .collect::<Vec<_>>(),
            vec![
                vec!["zone-a".to_string()],
                vec!["zone-a".into(), "zone-b".into()],
                vec!["zone-c".into()]
            ]
        );
        let n = |zone: Option<&str>| -> core::Node {
            let mut n = json!({"metadata": {"name": "node-x"}});
            if let Some(z) = zone {
                n["metadata"]["labels"] = json!({LABEL_ZONE: z});
            }
            serde_json::from_value(n).unwrap()
        };
        assert_eq!(node(&n(Some("zone-a"))).zone.as_deref(), Some("zone-a"));
        assert_eq!(node(&n(Some(""))).zone, None);
        assert_eq!(node(&n(None)).zone, None);
        // trafficDistribution PreferClose (the controller made the hints above): the
        // node of zone-a uses the two endpoints hinted for it, a node without a zone
        // label all three.
        let svc = web(
            json!({"clusterIP": "10.96.0.10", "trafficDistribution": "PreferClose",
                             "ports": [{"name": "http", "port": 80}]}),
        );
        assert!(service(&svc, &r).skipped.is_empty());
        let st = state_on(
            std::slice::from_ref(&svc),
            std::slice::from_ref(&sl),
            &r,
            &node(&n(Some("zone-a"))),
        );
        assert_eq!(
            active(&st),
            pairs(&[(
                "10.96.0.10:80/TCP",
                &["10.244.1.2:8080/TCP", "10.244.2.2:8080/TCP"]
            )])
        );
        let st = state_on(&[svc], &[sl], &r, &node(&n(None)));
        assert_eq!(active(&st)[0].1.len(), 3);
    }

    #[test]
    fn node_hints_and_prefer_same_node_are_counted_as_ignored() {
        let r = Rules::default();
        for (td, ignored) in [
            ("PreferClose", false),
            ("PreferSameZone", false),
            ("PreferSameNode", true),
        ] {
            let svc = web(json!({"clusterIP": "10.96.0.10", "trafficDistribution": td,
                                 "ports": [{"port": 80}]}));
            let skipped = service(&svc, &r).skipped;
            assert_eq!(
                skipped.iter().map(|s| s.reason).collect::<Vec<_>>(),
                if ignored {
                    vec![SkipReason::Ignored("trafficDistribution")]
                } else {
                    vec![]
                },
                "{td}"
            );
        }
        let sl = slice(
            "web-a",
            "web",
            json!([{"port": 8080}]),
            json!([{"addresses": ["10.244.1.2"], "nodeName": "node-a",
                    "hints": {"forZones": [{"name": "zone-a"}], "forNodes": [{"name": "node-a"}]}}]),
        );
        let t = endpoint_slice(&sl);
        assert_eq!(
            t.skipped.iter().map(|s| s.reason).collect::<Vec<_>>(),
            vec![SkipReason::Ignored("hints.forNodes")]
        );
        assert!(used(&t).endpoints[0].zone_hints.is_some());
    }

    /// kube-proxy programs an ingress IP whose ipMode is VIP (or unset); one with
    /// ipMode Proxy belongs to a load balancer that proxies to the nodes itself.
    #[test]
    fn load_balancer_ingress_ips_with_ip_mode_proxy_are_not_programmed() {
        let r = Rules::default();
        let t = service(
            &lb_svc(
                "LoadBalancer",
                json!([{"ip": "198.51.100.7", "ipMode": "Proxy"}, {"ip": "198.51.100.8", "ipMode": "VIP"},
                       {"ip": "198.51.100.9"}]),
            ),
            &r,
        );
        assert!(t.skipped.is_empty(), "{:?}", t.skipped);
        assert_eq!(
            used(&t).load_balancer_ips,
            vec![
                IpAddr::from([198, 51, 100, 8]),
                IpAddr::from([198, 51, 100, 9])
            ]
        );
        let st = state(
            &[lb_svc(
                "LoadBalancer",
                json!([{"ip": "198.51.100.7", "ipMode": "Proxy"}]),
            )],
            &[],
            &r,
        );
        assert_eq!(
            st.frontends
                .keys()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["10.96.0.10:80/TCP"]
        );
    }
}
