//! Every manifest in deploy/ parses strictly into its k8s-openapi type: a field the type
//! does not know (a typo, a wrong indentation level) fails the test instead of being
//! silently dropped by the API server's client-side decoding.
use std::{collections::BTreeSet, path::PathBuf};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::ServiceAccount,
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    serde::{de::DeserializeOwned, Deserialize, Serialize},
};
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Paths present in `original` but missing or different in `round_trip`.
fn ignored(original: &Value, round_trip: &Value, path: &str, out: &mut Vec<String>) {
    match (original, round_trip) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                match b.get(k) {
                    Some(w) => ignored(v, w, &format!("{path}.{k}"), out),
                    None => out.push(format!("{path}.{k}")),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (v, w)) in a.iter().zip(b).enumerate() {
                ignored(v, w, &format!("{path}[{i}]"), out);
            }
        }
        (a, b) if a == b => {}
        (a, b) => out.push(format!("{path}: {a} became {b}")),
    }
}

/// Parses into `T` and fails on any field `T` ignored.
fn strict<T: DeserializeOwned + Serialize>(file: &str, doc: &Value) -> T {
    let typed: T = serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{file}: {e}"));
    let back = serde_json::to_value(&typed).unwrap();
    let mut out = Vec::new();
    ignored(doc, &back, "", &mut out);
    assert!(
        out.is_empty(),
        "{file}: fields unknown to {}: {out:?}",
        std::any::type_name::<T>()
    );
    typed
}

fn documents(file: &str) -> Vec<Value> {
    let text =
        std::fs::read_to_string(deploy_dir().join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{file}: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Kustomization {
    #[expect(dead_code, reason = "checked by deserialization only")]
    api_version: String,
    #[expect(dead_code, reason = "checked by deserialization only")]
    kind: String,
    #[expect(dead_code, reason = "checked by deserialization only")]
    namespace: String,
    resources: Vec<String>,
    #[serde(default)]
    images: Vec<Image>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Image {
    #[expect(dead_code, reason = "checked by deserialization only")]
    name: String,
    #[expect(dead_code, reason = "checked by deserialization only")]
    new_name: Option<String>,
    new_tag: Option<String>,
}

#[test]
fn every_manifest_parses_strictly_and_the_kustomization_lists_them_all() {
    let k: Kustomization = serde_yaml_ng::from_str(
        &std::fs::read_to_string(deploy_dir().join("kustomization.yaml")).unwrap(),
    )
    .expect("kustomization.yaml");
    let yamls: BTreeSet<String> = std::fs::read_dir(deploy_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    assert_eq!(
        k.resources.iter().cloned().collect::<BTreeSet<_>>(),
        yamls,
        "kustomization resources vs deploy/*.yaml"
    );
    // The image `cargo xtask image` makes (lb-agent:<version>, loaded on a node) is the
    // one the DaemonSet runs.
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(k.images.len(), 1);
    assert_eq!(k.images[0].new_tag.as_deref(), Some(version));
    let ds = documents("daemonset.yaml").remove(0);
    assert_eq!(
        ds["spec"]["template"]["spec"]["containers"][0]["image"],
        format!("lb-agent:{version}")
    );
    let mut kinds = Vec::new();
    for file in &yamls {
        for doc in documents(file) {
            let kind = doc["kind"]
                .as_str()
                .unwrap_or_else(|| panic!("{file}: a document without kind"))
                .to_string();
            match kind.as_str() {
                "DaemonSet" => drop(strict::<DaemonSet>(file, &doc)),
                "ServiceAccount" => drop(strict::<ServiceAccount>(file, &doc)),
                "ClusterRole" => drop(strict::<ClusterRole>(file, &doc)),
                "ClusterRoleBinding" => drop(strict::<ClusterRoleBinding>(file, &doc)),
                other => panic!("{file}: no strict check for kind {other}; add it to this test"),
            }
            kinds.push(kind);
        }
    }
    kinds.sort();
    assert_eq!(
        kinds,
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "DaemonSet",
            "ServiceAccount"
        ]
    );
}

#[test]
fn the_daemonset_follows_the_deployment_rules() {
    let doc = documents("daemonset.yaml").remove(0);
    let ds: DaemonSet = strict("daemonset.yaml", &doc);
    let pod = ds.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert!(pod
        .tolerations
        .unwrap()
        .iter()
        .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()));
    assert_eq!(pod.service_account_name.as_deref(), Some("lb-agent"));
    let bpffs = pod
        .volumes
        .clone()
        .unwrap()
        .into_iter()
        .find(|v| v.name == "bpffs")
        .expect("bpffs volume");
    assert_eq!(bpffs.host_path.unwrap().path, "/sys/fs/bpf");
    // The socket programs attach to the host's cgroup v2 root, mounted in.
    let cgroup = pod
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == "cgroup")
        .expect("cgroup volume");
    assert_eq!(cgroup.host_path.as_ref().unwrap().path, "/sys/fs/cgroup");
    let c = &pod.containers[0];
    let args = c.args.clone().unwrap();
    let mount = c
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| m.name == "cgroup")
        .expect("cgroup mount");
    assert!(args.contains(&format!("--cgroup={}", mount.mount_path)));
    assert_eq!(args[0], "agent");
    assert!(args.iter().any(|a| a.starts_with("--interfaces")));
    let sc = c.security_context.clone().unwrap();
    assert_ne!(sc.privileged, Some(true));
    let caps = sc.capabilities.unwrap();
    // No SYS_RESOURCE: kernels from 5.11 on charge map memory to the memory cgroup, and a
    // runtime that does not grant it would refuse the pod (deploy/pre-5.11 adds it).
    assert_eq!(caps.add.unwrap(), ["BPF", "NET_ADMIN", "PERFMON"]);
    assert_eq!(caps.drop.unwrap(), ["ALL"]);
    // The node's resolver: the cluster DNS is a ClusterIP, out of a host-network
    // client's reach through lb.
    assert_eq!(pod.dns_policy.as_deref(), Some("Default"));
    // kube-proxy's health check port, served and declared.
    assert!(args.contains(&"--healthz-bind-address=0.0.0.0:10256".to_string()));
    assert!(c
        .ports
        .as_ref()
        .unwrap()
        .iter()
        .any(|p| p.container_port == 10256));
    let env = c.env.clone().unwrap();
    // The API server address a user must set without kube-proxy: explicit, and the
    // placeholder the agent refuses with what to set.
    let api = env
        .iter()
        .find(|e| e.name == "LB_API_SERVER")
        .expect("LB_API_SERVER");
    assert_eq!(
        api.value.as_deref(),
        Some(lb_userspace::k8s::API_SERVER_PLACEHOLDER)
    );
    let node = env
        .iter()
        .find(|e| e.name == "NODE_NAME")
        .expect("NODE_NAME");
    assert_eq!(
        node.value_from
            .as_ref()
            .unwrap()
            .field_ref
            .as_ref()
            .unwrap()
            .field_path,
        "spec.nodeName"
    );
    let probe_path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        p.as_ref().unwrap().http_get.as_ref().unwrap().path.clone()
    };
    assert_eq!(probe_path(&c.liveness_probe).as_deref(), Some("/healthz"));
    assert_eq!(probe_path(&c.readiness_probe).as_deref(), Some("/readyz"));
    let r = c.resources.clone().unwrap();
    assert!(r.requests.is_some() && r.limits.is_some());
}

#[test]
fn the_cluster_role_is_read_only_on_what_the_agent_watches() {
    let docs = documents("rbac.yaml");
    let role: ClusterRole = strict(
        "rbac.yaml",
        docs.iter().find(|d| d["kind"] == "ClusterRole").unwrap(),
    );
    let mut granted = BTreeSet::new();
    for rule in role.rules.unwrap() {
        assert_eq!(rule.verbs, ["get", "list", "watch"]);
        for g in rule.api_groups.unwrap() {
            for r in rule.resources.clone().unwrap() {
                granted.insert(format!("{g}/{r}"));
            }
        }
    }
    let want: BTreeSet<String> = ["/services", "/nodes", "discovery.k8s.io/endpointslices"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(granted, want);
}

#[test]
fn the_strict_check_catches_an_unknown_field() {
    let doc: Value = serde_yaml_ng::from_str("apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: x}\nautomountServiceAccountTokn: true\n").unwrap();
    let r = std::panic::catch_unwind(|| strict::<ServiceAccount>("t", &doc));
    assert!(r.is_err(), "a misspelt field must fail");
}

/// The globs of `--interfaces=` in the DaemonSet's arguments.
fn pod_interface_globs() -> Vec<glob::Pattern> {
    let doc = documents("daemonset.yaml").remove(0);
    let ds: DaemonSet = strict("daemonset.yaml", &doc);
    let args = ds.spec.unwrap().template.spec.unwrap().containers[0]
        .args
        .clone()
        .unwrap();
    let globs: Vec<String> = args
        .iter()
        .filter_map(|a| a.strip_prefix("--interfaces=").map(String::from))
        .collect();
    lb_userspace::run::compile_globs(&globs).unwrap()
}

#[test]
fn the_default_interfaces_are_pod_veths_and_never_a_bridge_or_tunnel() {
    let globs = pod_interface_globs();
    let matched = |name: &str| globs.iter().any(|g| g.matches(name));
    // The CNIs' bridges, tunnels and host devices: tc there would see the pods' traffic
    // a second time, or the node's own.
    for name in [
        "cni0",
        "cbr0",
        "docker0",
        "kube-bridge",
        "flannel.1",
        "vxlan.calico",
        "tunl0",
        "cilium_host",
        "cilium_net",
        "cilium_vxlan",
        "weave",
        "lo",
        "eth0",
        "ens5",
    ] {
        assert!(!matched(name), "--interfaces matches {name}");
    }
    for name in ["veth1a2b3c4d", "cali1234567890a", "lxc12ab34cd"] {
        assert!(matched(name), "--interfaces misses the pod veth {name}");
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Overlay {
    #[expect(dead_code, reason = "checked by deserialization only")]
    api_version: String,
    #[expect(dead_code, reason = "checked by deserialization only")]
    kind: String,
    resources: Vec<String>,
    patches: Vec<Patch>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Patch {
    target: Target,
    patch: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Target {
    kind: String,
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Op {
    op: String,
    path: String,
    value: Value,
}

/// Applies JSON-patch `add` operations (RFC 6902; `-` appends to an array).
fn apply_adds(doc: &mut Value, ops: &[Op]) {
    for op in ops {
        assert_eq!(op.op, "add", "only add is supported here: {}", op.path);
        let (parent, last) = op.path.rsplit_once('/').unwrap();
        let target = doc
            .pointer_mut(parent)
            .unwrap_or_else(|| panic!("{}: no such path in the DaemonSet", op.path));
        match (target, last) {
            (Value::Array(a), "-") => a.push(op.value.clone()),
            (Value::Object(o), key) => drop(o.insert(key.into(), op.value.clone())),
            (t, _) => panic!("{}: cannot add to {t}", op.path),
        }
    }
}

#[test]
fn the_pre_5_11_overlay_adds_sys_resource_and_nothing_else() {
    let text = std::fs::read_to_string(deploy_dir().join("pre-5.11/kustomization.yaml")).unwrap();
    let overlay: Overlay = serde_yaml_ng::from_str(&text).expect("pre-5.11/kustomization.yaml");
    assert_eq!(overlay.resources, [".."]);
    assert_eq!(overlay.patches.len(), 1);
    let p = &overlay.patches[0];
    assert_eq!(
        (p.target.kind.as_str(), p.target.name.as_str()),
        ("DaemonSet", "lb-agent")
    );
    let ops: Vec<Op> = serde_yaml_ng::from_str(&p.patch).expect("the JSON patch");
    let mut doc = documents("daemonset.yaml").remove(0);
    let before = doc.clone();
    apply_adds(&mut doc, &ops);
    let ds: DaemonSet = strict("daemonset.yaml + pre-5.11", &doc);
    let caps = ds.spec.unwrap().template.spec.unwrap().containers[0]
        .security_context
        .clone()
        .unwrap()
        .capabilities
        .unwrap();
    assert_eq!(
        caps.add.unwrap(),
        ["BPF", "NET_ADMIN", "PERFMON", "SYS_RESOURCE"]
    );
    // Everything else as in the base.
    let caps_path = "/spec/template/spec/containers/0/securityContext/capabilities/add";
    let (mut a, mut b) = (doc, before);
    *a.pointer_mut(caps_path).unwrap() = Value::Null;
    *b.pointer_mut(caps_path).unwrap() = Value::Null;
    assert_eq!(a, b);
}
