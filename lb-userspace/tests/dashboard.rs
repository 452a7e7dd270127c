//! deploy/grafana-dashboard.json queries only what the agent exports: every `lb_*` name
//! in a panel's expression is a series of the agent's registry (a fresh `Metrics`, whose
//! labelled families all exist from the start) or of the families read from the maps at
//! scrape time, and every datapath verdict it names is a counter of LB_COUNTERS.
use std::{collections::BTreeSet, path::PathBuf};

use lb_userspace::k8s::metrics::{render, Metrics, DATAPLANE_FAMILIES};
use serde_json::Value;

/// The series names a family of `kind` yields in the text format.
fn series(name: &str, kind: &str) -> Vec<String> {
    match kind {
        "counter" => vec![format!("{name}_total")],
        "histogram" => ["_bucket", "_sum", "_count"]
            .iter()
            .map(|s| format!("{name}{s}"))
            .collect(),
        _ => vec![name.to_string()],
    }
}

fn exported() -> BTreeSet<String> {
    let text = render(&Metrics::default().registry(None, None, None));
    // The names of the samples, as Prometheus stores them (every family has samples
    // from the start).
    let mut out: BTreeSet<String> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_string())
        .collect();
    for (name, kind) in DATAPLANE_FAMILIES {
        out.extend(series(name, kind));
    }
    out
}

/// Every panel's target expressions, rows' panels included.
fn expressions(panels: &[Value], out: &mut Vec<String>) {
    for p in panels {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push(t["expr"].as_str().expect("a target without expr").into());
        }
        expressions(
            p["panels"].as_array().map(Vec::as_slice).unwrap_or(&[]),
            out,
        );
    }
}

/// The `lb_*` metric names of a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let b = expr.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let starts = expr[i..].starts_with("lb_")
            && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_'));
        if starts {
            let end = expr[i..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(b.len(), |n| i + n);
            out.push(expr[i..end].to_string());
            i = end;
        } else {
            i += 1;
        }
    }
    out
}

/// The values a `kind` matcher names: `kind="x"` or `kind=~"a|b.*"`.
fn kind_matchers(expr: &str) -> Vec<(bool, String)> {
    let mut out = Vec::new();
    for (regex, marker) in [(true, "kind=~\""), (false, "kind=\"")] {
        let mut rest = expr;
        while let Some(at) = rest.find(marker) {
            let after = &rest[at + marker.len()..];
            let end = after.find('"').expect("a closed matcher");
            out.push((regex, after[..end].to_string()));
            rest = &after[end..];
        }
    }
    out
}

#[test]
fn the_dashboard_queries_only_exported_metrics_and_known_verdicts() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana-dashboard.json");
    let dash: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut exprs = Vec::new();
    expressions(dash["panels"].as_array().unwrap(), &mut exprs);
    assert!(exprs.len() >= 8, "{exprs:?}");
    let exported = exported();
    let mut used = BTreeSet::new();
    for e in &exprs {
        for name in metric_names(e) {
            assert!(
                exported.contains(&name),
                "the dashboard queries {name}, which the agent does not export ({e}); it exports {exported:?}"
            );
            used.insert(name);
        }
        for (regex, value) in kind_matchers(e) {
            if !e.contains("lb_dataplane_packets_total") {
                continue;
            }
            let known = lb_common::counter::NAMES;
            for alt in value.split('|') {
                let ok = match alt.strip_suffix(".*") {
                    Some(prefix) if regex => known.iter().any(|k| k.starts_with(prefix)),
                    _ => known.contains(&alt),
                };
                assert!(ok, "{alt} is no datapath counter ({e})");
            }
        }
    }
    // What the issue asks the dashboard to show.
    for name in [
        "lb_sync_duration_seconds_bucket",
        "lb_network_programming_duration_seconds_bucket",
        "lb_dataplane_packets_total",
        "lb_conntrack_entries",
        "lb_conntrack_max_entries",
    ] {
        assert!(used.contains(name), "no panel shows {name}");
    }
}

#[test]
fn the_check_catches_a_metric_the_agent_does_not_export() {
    let names = metric_names("sum(rate(lb_syncs_total[5m])) / lb_no_such_thing");
    assert_eq!(names, ["lb_syncs_total", "lb_no_such_thing"]);
    assert!(exported().contains("lb_syncs_total"));
    assert!(!exported().contains("lb_no_such_thing"));
    assert_eq!(
        kind_matchers(r#"x{kind=~"drop_.*|passed",instance="a"} y{kind="new_flow"}"#),
        [(true, "drop_.*|passed".into()), (false, "new_flow".into())]
    );
}
