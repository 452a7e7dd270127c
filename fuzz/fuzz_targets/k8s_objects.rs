//! Kubernetes objects to the model, as `lb agent` receives them: JSON of a Node, Services
//! and EndpointSlices (`{"node": .., "services": [..], "endpointSlices": [..]}`, each
//! object as the API server serves it) through the translation, in order, as watch
//! events. Whatever the objects, translation never panics; the cache fed event by event
//! equals the full computation over the objects that stand at the end, and the map plan
//! for that state, applied, leaves nothing to do.
#![no_main]

use k8s_openapi::api::{core::v1 as core, discovery::v1 as discovery};
use lb_userspace::{
    dataplane::plan::{plan, MapState},
    k8s::translate::{self, Outcome, Rules},
    model::{desired_state, ModelCache},
};
use libfuzzer_sys::fuzz_target;

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Input {
    #[serde(default)]
    node: Option<core::Node>,
    #[serde(default)]
    services: Vec<core::Service>,
    #[serde(default)]
    endpoint_slices: Vec<discovery::EndpointSlice>,
}

fn key(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> (String, String) {
    (
        meta.namespace.clone().unwrap_or_else(|| "default".into()),
        meta.name.clone().unwrap_or_default(),
    )
}

fuzz_target!(|data: &[u8]| {
    let Ok(input) = serde_json::from_slice::<Input>(data) else {
        return;
    };
    let rules = Rules {
        proxy_name: Some("lb".into()),
    };
    let mut cache = ModelCache::default();
    let node = input.node.as_ref().map(translate::node).unwrap_or_default();
    cache.set_node(node.clone());
    // What stands at the end, by key (a later event replaces an earlier one; an object
    // the translation does not use removes it, as the controller does).
    let mut services = std::collections::BTreeMap::new();
    let mut slices = std::collections::BTreeMap::new();
    for s in &input.services {
        let k = key(&s.metadata);
        match translate::service(s, &rules).outcome {
            Outcome::Use(m) => {
                services.insert(k, m.clone());
                cache.upsert_service(m);
            }
            _ => {
                services.remove(&k);
                cache.remove_service(&lb_userspace::model::object_key(&k.0, &k.1));
            }
        }
        let _ = cache.take_delta();
    }
    for s in &input.endpoint_slices {
        let k = key(&s.metadata);
        let _ = translate::trigger_time(s);
        match translate::endpoint_slice(s).outcome {
            Outcome::Use(m) => {
                slices.insert(k, m.clone());
                cache.upsert_slice(m);
            }
            _ => {
                slices.remove(&k);
                cache.remove_slice(&lb_userspace::model::object_key(&k.0, &k.1));
            }
        }
        let _ = cache.take_delta();
    }
    let services: Vec<_> = services.into_values().collect();
    let slices: Vec<_> = slices.into_values().collect();
    let want = desired_state(&services, &slices, &node);
    assert_eq!(
        cache.desired(),
        &want,
        "the cache and the full computation differ"
    );
    let mut maps = MapState::default();
    for op in plan(&maps, &want) {
        maps.apply(&op);
    }
    let again = plan(&maps, &want);
    assert!(
        again.is_empty(),
        "a plan applied leaves {} ops: {again:?}",
        again.len()
    );
});
