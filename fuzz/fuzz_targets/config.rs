//! The config file (YAML, or JSON when it starts with `{`) to the model: `lb run` and
//! `lb check` read every byte of it. Whatever the input, parsing returns a config or an
//! error, never panics; a config it accepts yields a desired state, the object-by-object
//! cache gives the same one, and the map plan for it, applied, leaves nothing to do.
#![no_main]

use lb_userspace::{
    config,
    dataplane::plan::{plan, MapState},
    model::{desired_state, ModelCache},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(cfg) = config::parse("fuzz.yaml", text) else {
        return;
    };
    let want = desired_state(&cfg.services, &cfg.endpoint_slices, &cfg.node);
    let mut cache = ModelCache::default();
    cache.set_node(cfg.node.clone());
    cache.replace_all(cfg.services.clone(), cfg.endpoint_slices.clone());
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
