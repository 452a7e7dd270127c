//! Watch events as the agent meets them, made from the fuzzer's bytes: Services,
//! EndpointSlices and this Node (Kubernetes objects from small pools of names,
//! addresses and ports, so that events collide: two Services on one IP, a slice before
//! its Service, one address in two slices, readiness flipping), each translated, fed to
//! the model cache and written to an in-memory copy of the maps the way the writer
//! does it (`plan_delta` with its reference counts, or a full `plan` when the bytes say
//! so, as after a failed sync). After every event:
//! - the cache equals the full computation over the objects that stand;
//! - a full plan against the maps so written has nothing to do (the incremental path
//!   never drifts from what the state wants);
//! - every backend listed before and after the event keeps its id: the conntrack
//!   entries of its established flows name it by id, so a new id would move them.
#![no_main]

use std::collections::BTreeMap;

use k8s_openapi::api::{core::v1 as core, discovery::v1 as discovery};
use lb_userspace::{
    dataplane::plan::{plan, plan_delta, MapState, Refs},
    k8s::translate::{self, Outcome, Rules},
    model::{desired_state, object_key, BackendAddr, DesiredState, ModelCache},
};
use libfuzzer_sys::{
    arbitrary::{Result, Unstructured},
    fuzz_target,
};
use serde_json::{json, Value};

const SERVICES: &[&str] = &["a", "b", "c"];
const SLICES: &[(&str, &str)] = &[
    ("a-1", "a"),
    ("a-2", "a"),
    ("b-1", "b"),
    ("c-1", "c"),
    ("x-1", "x"),
];
const CLUSTER_IPS: &[&str] = &["10.96.0.1", "10.96.0.2", "fd00:96::1", "fd00:96::2"];
const EXTERNAL_IPS: &[&str] = &["203.0.113.1", "10.96.0.1", "fd00:113::1"];
const ENDPOINTS_V4: &[&str] = &["10.244.0.1", "10.244.0.2", "10.244.1.1", "10.244.1.2"];
const ENDPOINTS_V6: &[&str] = &["fd00:244::1", "fd00:244::2"];
const NODES: &[&str] = &["node-0", "node-1"];
const ZONES: &[&str] = &["zone-a", "zone-b"];
const PORT_NAMES: &[&str] = &["p", "q", ""];

fn pick<'a, T>(u: &mut Unstructured<'_>, from: &'a [T]) -> Result<&'a T> {
    u.choose(from)
}

fn maybe_bool(u: &mut Unstructured<'_>) -> Result<Value> {
    Ok(match u.int_in_range(0..=2u8)? {
        0 => Value::Null,
        1 => json!(true),
        _ => json!(false),
    })
}

fn service(u: &mut Unstructured<'_>) -> Result<core::Service> {
    let name = *pick(u, SERVICES)?;
    let kind = *pick(
        u,
        &["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"],
    )?;
    let mut ips = vec![*pick(u, CLUSTER_IPS)?];
    if u.ratio(1, 4)? {
        ips.push(*pick(u, CLUSTER_IPS)?);
    }
    let mut ports = Vec::new();
    for _ in 0..u.int_in_range(0..=3u8)? {
        let mut p = json!({
            "name": *pick(u, PORT_NAMES)?,
            "port": *pick(u, &[80, 81, 53])?,
            "protocol": *pick(u, &["TCP", "UDP", "SCTP"])?,
            "targetPort": 8080,
        });
        if kind != "ClusterIP" && u.ratio(3, 4)? {
            p["nodePort"] = json!(*pick(u, &[30001, 30002])?);
        }
        ports.push(p);
    }
    let mut spec = json!({
        "type": kind,
        "clusterIP": ips[0],
        "clusterIPs": ips,
        "ports": ports,
        "externalTrafficPolicy": *pick(u, &["Cluster", "Local"])?,
        "internalTrafficPolicy": *pick(u, &["Cluster", "Local"])?,
    });
    if u.ratio(1, 3)? {
        spec["externalIPs"] = json!([*pick(u, EXTERNAL_IPS)?]);
    }
    if u.ratio(1, 4)? {
        spec["sessionAffinity"] = json!("ClientIP");
        spec["sessionAffinityConfig"] =
            json!({"clientIP": {"timeoutSeconds": *pick(u, &[1, 10800, 0, 86401])?}});
    }
    if u.ratio(1, 4)? {
        spec["loadBalancerSourceRanges"] =
            json!([*pick(u, &["10.0.0.0/8", "fd00::/8", "192.168.0.1/32"])?]);
    }
    if u.ratio(1, 8)? {
        spec["clusterIP"] = json!("None");
    }
    if u.ratio(1, 8)? {
        spec["trafficDistribution"] = json!(*pick(u, &["PreferClose", "PreferSameNode"])?);
    }
    let mut svc = json!({"metadata": {"name": name, "namespace": "ns"}, "spec": spec});
    if kind == "LoadBalancer" && u.ratio(1, 2)? {
        svc["status"] = json!({"loadBalancer": {"ingress": [
            {"ip": *pick(u, &["198.51.100.1", "fd00:51::1"])?, "ipMode": *pick(u, &["VIP", "Proxy"])?}
        ]}});
    }
    if u.ratio(1, 10)? {
        svc["metadata"]["labels"] =
            json!({"service.kubernetes.io/service-proxy-name": *pick(u, &["lb", "other"])?});
    }
    Ok(serde_json::from_value(svc).expect("a Service"))
}

fn slice(u: &mut Unstructured<'_>) -> Result<discovery::EndpointSlice> {
    let (name, svc) = *pick(u, SLICES)?;
    let v6 = u.ratio(1, 4)?;
    let mut ports = Vec::new();
    for _ in 0..u.int_in_range(0..=2u8)? {
        ports.push(json!({
            "name": *pick(u, PORT_NAMES)?,
            "port": *pick(u, &[8080, 8081])?,
            "protocol": *pick(u, &["TCP", "UDP"])?,
        }));
    }
    let mut endpoints = Vec::new();
    for _ in 0..u.int_in_range(0..=4u8)? {
        let addr = *pick(u, if v6 { ENDPOINTS_V6 } else { ENDPOINTS_V4 })?;
        let mut ep = json!({
            "addresses": [addr],
            "conditions": {"ready": maybe_bool(u)?, "serving": maybe_bool(u)?, "terminating": maybe_bool(u)?},
        });
        if u.ratio(2, 3)? {
            ep["nodeName"] = json!(*pick(u, NODES)?);
        }
        if u.ratio(1, 3)? {
            ep["hints"] = json!({"forZones": [{"name": *pick(u, ZONES)?}]});
        }
        endpoints.push(ep);
    }
    let obj = json!({
        "metadata": {"name": name, "namespace": "ns", "labels": {"kubernetes.io/service-name": svc}},
        "addressType": if v6 { "IPv6" } else { "IPv4" },
        "ports": ports,
        "endpoints": endpoints,
    });
    Ok(serde_json::from_value(obj).expect("an EndpointSlice"))
}

fn node(u: &mut Unstructured<'_>) -> Result<core::Node> {
    let mut addresses = Vec::new();
    for (ip, kind) in [
        ("192.168.0.1", "InternalIP"),
        ("fd00:50::1", "InternalIP"),
        ("203.0.113.9", "ExternalIP"),
    ] {
        if u.ratio(2, 3)? {
            addresses.push(json!({"type": kind, "address": ip}));
        }
    }
    let mut obj = json!({"metadata": {"name": "node-0"}, "status": {"addresses": addresses}});
    if u.ratio(1, 2)? {
        obj["metadata"]["labels"] = json!({"topology.kubernetes.io/zone": *pick(u, ZONES)?});
    }
    Ok(serde_json::from_value(obj).expect("a Node"))
}

/// The backends of a state and their ids in the maps.
fn ids(state: &DesiredState, maps: &MapState) -> BTreeMap<BackendAddr, Option<u32>> {
    state
        .frontends
        .values()
        .flat_map(|f| f.known.iter())
        .map(|b| (*b, maps.backend_id(b)))
        .collect()
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let rules = Rules {
        proxy_name: Some("lb".into()),
    };
    let mut cache = ModelCache::default();
    let mut services = BTreeMap::new();
    let mut slices = BTreeMap::new();
    let mut node_now = lb_userspace::model::Node::default();
    let mut maps = MapState::default();
    let mut refs: Option<Refs> = None;
    let mut before = BTreeMap::new();
    for _ in 0..u.int_in_range(1..=40u8)? {
        match u.int_in_range(0..=4u8)? {
            0 => {
                let s = service(u)?;
                let name = s.metadata.name.clone().unwrap_or_default();
                match translate::service(&s, &rules).outcome {
                    Outcome::Use(m) => {
                        services.insert(name, m.clone());
                        cache.upsert_service(m);
                    }
                    _ => {
                        services.remove(&name);
                        cache.remove_service(&object_key("ns", &name));
                    }
                }
            }
            1 => {
                let name = *pick(u, SERVICES)?;
                services.remove(name);
                cache.remove_service(&object_key("ns", name));
            }
            2 => {
                let s = slice(u)?;
                let name = s.metadata.name.clone().unwrap_or_default();
                match translate::endpoint_slice(&s).outcome {
                    Outcome::Use(m) => {
                        slices.insert(name, m.clone());
                        cache.upsert_slice(m);
                    }
                    _ => {
                        slices.remove(&name);
                        cache.remove_slice(&object_key("ns", &name));
                    }
                }
            }
            3 => {
                let (name, _) = *pick(u, SLICES)?;
                slices.remove(name);
                cache.remove_slice(&object_key("ns", name));
            }
            _ => {
                node_now = translate::node(&node(u)?);
                cache.set_node(node_now.clone());
            }
        }
        // The writer's sync: incremental while it has counts, else a full plan.
        let delta = cache.take_delta();
        let desired = cache.desired().clone();
        let full = u.ratio(1, 8)?;
        let ops = match (&refs, full) {
            (Some(r), false) => {
                let (ops, changes) = plan_delta(&maps, r, &desired, &delta);
                for op in &ops {
                    maps.apply(op);
                }
                let mut r = refs.take().expect("matched above");
                r.apply(&changes);
                refs = Some(r);
                ops
            }
            _ => {
                let ops = plan(&maps, &desired);
                for op in &ops {
                    maps.apply(op);
                }
                refs = Refs::count(&desired, &maps);
                ops
            }
        };
        let want = desired_state(
            &services.values().cloned().collect::<Vec<_>>(),
            &slices.values().cloned().collect::<Vec<_>>(),
            &node_now,
        );
        assert_eq!(desired, want, "the cache and the full computation differ");
        let again = plan(&maps, &desired);
        assert!(
            again.is_empty(),
            "after {} ops the maps still need {again:?}",
            ops.len()
        );
        let now = ids(&desired, &maps);
        for (b, id) in &now {
            assert!(id.is_some(), "backend {b:?} listed but not in the maps");
            if let Some(old) = before.get(b) {
                assert_eq!(old, id, "backend {b:?} changed its id");
            }
        }
        before = now;
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
