//! The standalone source: a YAML file with the same model as Kubernetes (see
//! `examples/services.yaml`). A malformed file is rejected whole, with the line and the
//! reason, and the running state stays as it was.
use std::path::Path;

use crate::{
    model::{self, Config},
    Error, Result,
};

/// Parses and validates a config's text; `origin` names it in errors.
pub fn parse(origin: &str, text: &str) -> Result<Config> {
    let cfg: Config = serde_yaml_ng::from_str(text).map_err(|e| {
        let at = e
            .location()
            .map(|l| format!("line {} column {}: ", l.line(), l.column()))
            .unwrap_or_default();
        Error::Config(format!("{origin}: {at}{e}"))
    })?;
    model::validate_config(&cfg).map_err(|e| Error::Config(format!("{origin}: {e}")))?;
    Ok(cfg)
}

pub fn load(path: &Path) -> Result<Config> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Config(format!("{}: cannot read: {e}", path.display())))?;
    parse(&path.display().to_string(), &text)
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
            ("demo.yaml", crate::demo::DEMO_CONFIG),
        ] {
            let cfg = parse(name, text).unwrap();
            assert!(!cfg.services.is_empty(), "{name}");
        }
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let text =
            "services:\n  - name: web\n    clusterIP: 10.96.0.300\n    ports: [{port: 80}]\n";
        let e = parse("f.yaml", text).unwrap_err().to_string();
        assert!(e.contains("f.yaml: line 3"), "{e}");
        assert!(e.contains("invalid IPv4 address"), "{e}");
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
}
