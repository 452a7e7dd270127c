//! The standalone source: a YAML file with the same model as Kubernetes (see
//! `examples/services.yaml`). A malformed file is rejected whole, with the line and the
//! reason, and the running state stays as it was.
//!
//! A file whose first character is `{` is read as JSON (which is YAML too, so it means
//! the same): the JSON parser streams, where the YAML one holds every event of the
//! document at once (1.7 GiB for 100k Services with 10 endpoints each).
use std::{io::Read, path::Path};

use crate::{
    model::{self, Config},
    Error, Result,
};

/// Parses and validates a config's text; `origin` names it in errors.
pub fn parse(origin: &str, text: &str) -> Result<Config> {
    let cfg = if is_json(text.as_bytes()) {
        serde_json::from_str(text).map_err(|e| json_error(origin, e))?
    } else {
        serde_yaml_ng::from_str(text).map_err(|e| {
            let at = e
                .location()
                .map(|l| format!("line {} column {}: ", l.line(), l.column()))
                .unwrap_or_default();
            Error::Config(format!("{origin}: {at}{e}"))
        })?
    };
    validated(origin, cfg)
}

fn validated(origin: &str, mut cfg: Config) -> Result<Config> {
    for svc in &mut cfg.services {
        // `clusterIP` joins `clusterIPs` (a disagreement stays for validation to name).
        svc.normalize();
    }
    model::validate_config(&cfg).map_err(|e| Error::Config(format!("{origin}: {e}")))?;
    Ok(cfg)
}

fn is_json(head: &[u8]) -> bool {
    head.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
}

fn json_error(origin: &str, e: serde_json::Error) -> Error {
    Error::Config(format!(
        "{origin}: line {} column {}: {e}",
        e.line(),
        e.column()
    ))
}

pub fn load(path: &Path) -> Result<Config> {
    let origin = path.display().to_string();
    let cannot = |e: std::io::Error| Error::Config(format!("{origin}: cannot read: {e}"));
    let mut file = std::fs::File::open(path).map_err(cannot)?;
    let mut head = [0u8; 256];
    let n = file.read(&mut head).map_err(cannot)?;
    if is_json(&head[..n]) {
        // Streamed from the file: the text is never held whole.
        let reader = std::io::BufReader::new(std::io::Cursor::new(head[..n].to_vec()).chain(file));
        let cfg = serde_json::from_reader(reader).map_err(|e| json_error(&origin, e))?;
        return validated(&origin, cfg);
    }
    let mut text = String::from_utf8(head[..n].to_vec())
        .map_err(|e| Error::Config(format!("{origin}: not UTF-8: {e}")))?;
    file.read_to_string(&mut text).map_err(cannot)?;
    parse(&origin, &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_and_demo_configs_are_valid() {
        for (name, text) in [
            (
                "examples/services.yaml",
                include_str!("../../examples/services.yaml"),
            ),
            (
                "lb-testbench/src/demo.yaml",
                include_str!("../../lb-testbench/src/demo.yaml"),
            ),
        ] {
            let cfg = parse(name, text).unwrap();
            assert!(!cfg.services.is_empty(), "{name}");
        }
    }

    #[test]
    fn a_json_file_means_the_same_as_its_yaml() {
        let yaml = include_str!("../../examples/services.yaml");
        let cfg = parse("y", yaml).unwrap();
        let json = serde_json::to_string_pretty(&cfg).unwrap();
        assert_eq!(parse("j", &json).unwrap(), cfg);
        let dir = std::env::temp_dir().join(format!("lb-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("services.json");
        // Leading whitespace, and a file longer than the sniffed head.
        std::fs::write(&path, format!("\n  {json}")).unwrap();
        let loaded = load(&path);
        let bad = dir.join("bad.json");
        std::fs::write(&bad, "{\"services\": [\n  {\"name\": 1}]}").unwrap();
        let e = load(&bad).unwrap_err().to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(loaded.unwrap(), cfg);
        assert!(e.contains("bad.json: line 2 column"), "{e}");
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let text =
            "services:\n  - name: web\n    clusterIP: 10.96.0.300\n    ports: [{port: 80}]\n";
        let e = parse("f.yaml", text).unwrap_err().to_string();
        assert!(e.contains("f.yaml: line 3"), "{e}");
        assert!(e.contains("invalid IP address"), "{e}");
    }

    #[test]
    fn unknown_fields_and_bad_protocols_are_rejected() {
        let e = parse(
            "f",
            "services:\n  - name: web\n    clusterIp: 10.96.0.1\n    ports: []\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("unknown field `clusterIp`"), "{e}");
        let e = parse(
            "f",
            "services:\n  - name: web\n    clusterIP: 10.96.0.1\n    ports: [{port: 80, protocol: SCTP}]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("line 4"), "{e}");
    }

    #[test]
    fn semantic_errors_name_the_object() {
        let text = "services:\n  - {name: a, clusterIP: 10.96.0.1, ports: [{port: 80}]}\n  - {name: a, clusterIP: 10.96.0.2, ports: [{port: 80}]}\n";
        let e = parse("f", text).unwrap_err().to_string();
        assert_eq!(e, "invalid config: f: Service default/a: defined twice");
    }

    #[test]
    fn node_section_node_ports_and_external_traffic_policy_parse() {
        let text = "\
node:
  name: node-a
  addresses: [192.168.1.1, 10.0.0.1]
services:
  - name: web
    clusterIP: 10.96.0.10
    type: NodePort
    externalTrafficPolicy: Local
    externalIPs: [203.0.113.5]
    ports: [{name: http, port: 80, nodePort: 30080}]
  - name: lb
    clusterIP: 10.96.0.11
    type: LoadBalancer
    loadBalancerIPs: [198.51.100.7]
    ports: [{port: 443, nodePort: 30443}]
endpointSlices:
  - name: web-1
    serviceName: web
    ports: [{name: http, port: 8080}]
    endpoints:
      - {addresses: [10.244.0.2], nodeName: node-a}
      - {addresses: [10.244.1.2], nodeName: node-b}
";
        let cfg = parse("f.yaml", text).unwrap();
        assert_eq!(
            cfg.node,
            model::Node {
                name: Some("node-a".into()),
                addresses: vec!["192.168.1.1".parse().unwrap(), "10.0.0.1".parse().unwrap()],
                zone: None,
            }
        );
        let web = &cfg.services[0];
        assert_eq!(web.service_type, model::ServiceType::NodePort);
        assert_eq!(web.external_traffic_policy, model::TrafficPolicy::Local);
        assert_eq!(
            web.external_ips,
            vec!["203.0.113.5".parse::<std::net::IpAddr>().unwrap()]
        );
        assert_eq!(web.ports[0].node_port, Some(30080));
        let lb = &cfg.services[1];
        assert_eq!(lb.service_type, model::ServiceType::LoadBalancer);
        assert_eq!(lb.external_traffic_policy, model::TrafficPolicy::Cluster);
        assert_eq!(lb.load_balancer_ips.len(), 1);
        let eps = &cfg.endpoint_slices[0].endpoints;
        assert_eq!(eps[0].node_name.as_deref(), Some("node-a"));
        assert_eq!(eps[1].node_name.as_deref(), Some("node-b"));
        // And the model opens what the file says: two NodePorts, the external IP, the LB IP.
        let st = model::desired_state(&cfg.services, &cfg.endpoint_slices, &cfg.node);
        let kinds: Vec<String> = st
            .frontends
            .iter()
            .map(|(fe, f)| format!("{fe} {}", f.kind))
            .collect();
        assert_eq!(
            kinds,
            [
                "10.0.0.1:30080/TCP NodePort",
                "10.0.0.1:30443/TCP NodePort",
                "10.96.0.10:80/TCP ClusterIP",
                "10.96.0.11:443/TCP ClusterIP",
                "192.168.1.1:30080/TCP NodePort",
                "192.168.1.1:30443/TCP NodePort",
                "198.51.100.7:443/TCP LoadBalancer",
                "203.0.113.5:80/TCP ExternalIP",
            ]
        );
    }

    #[test]
    fn bad_node_sections_and_service_types_are_rejected_with_the_line() {
        let e = parse(
            "f",
            "node:\n  name: node-a\n  address: [192.168.1.1]\nservices: []\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("f: line 3"), "{e}");
        assert!(e.contains("unknown field `address`"), "{e}");
        let e = parse(
            "f",
            "services:\n  - name: web\n    clusterIP: 10.96.0.1\n    type: ExternalName\n    ports: [{port: 80}]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("line 4"), "{e}");
        let e = parse(
            "f",
            "services:\n  - name: web\n    clusterIP: 10.96.0.1\n    externalTrafficPolicy: local\n    ports: [{port: 80}]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("line 4"), "{e}");
        // A node address that cannot be one names the node.
        let e = parse("f", "node: {name: node-a, addresses: [224.0.0.1]}\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("Node") && e.contains("node-a") && e.contains("224.0.0.1"),
            "{e}"
        );
    }

    #[test]
    fn dual_stack_services_in_the_file_and_their_errors() {
        let text = "\
node: {name: node-a, addresses: [192.168.1.1, \"fd00:50::1\"]}
services:
  - name: dual
    clusterIPs: [10.96.0.10, \"fd00:10:96::a\"]
    ipFamilies: [IPv4, IPv6]
    ipFamilyPolicy: RequireDualStack
    ports: [{port: 80}]
  - name: v6
    clusterIP: \"fd00:10:96::b\"
    ports: [{port: 80}]
endpointSlices:
  - name: dual-v6
    serviceName: dual
    ports: [{port: 8080}]
    endpoints:
      - {addresses: [\"fd00:10:244::2\"]}
";
        let cfg = parse("f.yaml", text).unwrap();
        assert_eq!(cfg.services[0].cluster_ips.len(), 2);
        assert_eq!(
            cfg.services[1].cluster_ips,
            vec!["fd00:10:96::b".parse::<std::net::IpAddr>().unwrap()]
        );
        let st = model::desired_state(&cfg.services, &cfg.endpoint_slices, &cfg.node);
        let got: Vec<String> = st
            .frontends
            .iter()
            .map(|(fe, f)| format!("{fe} {}", f.active.len()))
            .collect();
        assert_eq!(
            got,
            [
                "10.96.0.10:80/TCP 0",
                "[fd00:10:96::a]:80/TCP 1",
                "[fd00:10:96::b]:80/TCP 0"
            ]
        );
        for (bad, why) in [
            (
                "services:\n  - {name: a, clusterIP: 10.96.0.1, clusterIPs: [10.96.0.2], ports: [{port: 80}]}\n",
                "clusterIP 10.96.0.1 is not clusterIPs' first address 10.96.0.2",
            ),
            (
                "services:\n  - {name: a, clusterIPs: [10.96.0.1, 10.96.0.2], ports: [{port: 80}]}\n",
                "at most one address per family",
            ),
            (
                "services:\n  - {name: a, clusterIPs: [10.96.0.1], ipFamilies: [IPv6], ports: [{port: 80}]}\n",
                "ipFamilies [IPv6] do not match",
            ),
            (
                "services:\n  - {name: a, clusterIP: \"fd00::1\", ipFamilyPolicy: RequireDualStack, ports: [{port: 80}]}\n",
                "RequireDualStack with 1 clusterIP",
            ),
            ("services:\n  - {name: a, ports: [{port: 80}]}\n", "has no clusterIP"),
            (
                "services:\n  - {name: a, clusterIP: \"ff02::1\", ports: [{port: 80}]}\n",
                "cannot be a Service address",
            ),
        ] {
            let e = parse("f", bad).unwrap_err().to_string();
            assert!(e.contains("Service default/a") && e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn the_nodes_zone_and_zone_hints_parse_and_are_followed() {
        let text = "\
node: {name: node-a, zone: zone-a, addresses: [192.168.1.1]}
services:
  - {name: web, clusterIP: 10.96.0.10, ports: [{port: 80}]}
endpointSlices:
  - name: web-1
    serviceName: web
    ports: [{port: 8080}]
    endpoints:
      - {addresses: [10.244.0.2], nodeName: node-a, hints: {forZones: [{name: zone-a}]}}
      - {addresses: [10.244.1.2], nodeName: node-b, hints: {forZones: [{name: zone-b}]}}
";
        let cfg = parse("f.yaml", text).unwrap();
        assert_eq!(cfg.node.zone.as_deref(), Some("zone-a"));
        let st = model::desired_state(&cfg.services, &cfg.endpoint_slices, &cfg.node);
        let active: Vec<String> = st
            .frontends
            .values()
            .next()
            .unwrap()
            .active
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(active, ["10.244.0.2:8080/TCP"]);
        // The same as JSON, written back by serde.
        let json = serde_json::to_string(&cfg).unwrap();
        assert!(
            json.contains("\"forZones\":[{\"name\":\"zone-a\"}]"),
            "{json}"
        );
        assert_eq!(parse("j", &json).unwrap(), cfg);
        let e = parse("f", "node: {name: a}\nendpointSlices:\n  - {name: s, serviceName: x, endpoints: [{addresses: [10.244.0.2], hints: {forZone: []}}]}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `forZone`"), "{e}");
    }
}
