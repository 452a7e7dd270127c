//! The desired state, as a pure model: Services and EndpointSlices in, frontends with
//! their backends out. The standalone file and the Kubernetes controller both fill the
//! same types, so every Kubernetes rule (port matching by name, readiness, the
//! terminating fallback, locality) lives here once.
//!
//! - `objects`: the input (Services, EndpointSlices, this Node), also the file format;
//! - `validate`: what makes an object invalid, named with its reason;
//! - `rules`: the Kubernetes rules, objects in, frontends out (`desired_state`);
//! - `state`: the output (frontends, their backends, and deltas between states);
//! - `cache`: the same output kept up to date object by object (`ModelCache`).
mod cache;
#[cfg(test)]
mod fixtures;
mod objects;
mod rules;
mod state;
mod validate;

pub use cache::ModelCache;
pub use objects::{
    object_key, zone_hints, Conditions, Config, Endpoint, EndpointPort, EndpointSlice, IpFamily,
    IpFamilyPolicy, Node, NodeName, ObjectKey, Protocol, Service, ServicePort, ServiceType,
    SessionAffinity, TargetPort, TrafficPolicy, ZoneHints, DEFAULT_AFFINITY_TIMEOUT_SECONDS,
};
pub use rules::{desired_state, health_check, port_frontends, service_frontends};
pub use state::{
    BackendAddr, Backends, Delta, DesiredState, FrontendAddr, FrontendKind, FrontendSpec,
    HealthCheck, Scope, SnatSources,
};
pub use validate::{
    validate_config, validate_node, validate_service, validate_slice, Invalid, NodePortRange,
};
