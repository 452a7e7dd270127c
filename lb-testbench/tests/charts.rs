//! The benchmark's SVG charts (`bench::charts`): drawn from results/latest.json they are
//! exactly the files in results/ (regenerate with `cargo xtask bench --charts-only`),
//! with a line per mode through the scales it was measured at and a bar per program and
//! case.
use std::path::PathBuf;

use lb_testbench::bench::charts;
use serde_json::Value;

fn results() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../results")
}

fn latest() -> Value {
    serde_json::from_str(&std::fs::read_to_string(results().join("latest.json")).unwrap()).unwrap()
}

#[test]
fn the_charts_in_results_are_drawn_from_latest_json() {
    for (name, svg) in charts::draw(&latest()).unwrap() {
        let committed = std::fs::read_to_string(results().join(name)).unwrap_or_default();
        assert!(
            committed == svg,
            "results/{name} is not what results/latest.json draws: run `cargo xtask bench --charts-only`"
        );
    }
}

/// The `points` of the polyline of `mode`.
fn points(svg: &str, mode: &str) -> Vec<(f64, f64)> {
    let marker = format!(r#"data-mode="{mode}""#);
    let line = svg
        .lines()
        .find(|l| l.contains(&marker))
        .unwrap_or_else(|| panic!("no line for {mode}"));
    let pts = line
        .split("points=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap();
    pts.split_whitespace()
        .map(|p| {
            let (x, y) = p.split_once(',').unwrap();
            (x.parse().unwrap(), y.parse().unwrap())
        })
        .collect()
}

#[test]
fn each_mode_is_a_line_through_the_scales_it_was_measured_at() {
    let results = latest();
    let svg = charts::conns_per_s(&results).unwrap();
    assert!(svg.starts_with("<svg ") && svg.trim_end().ends_with("</svg>"));
    for s in results["datapath"].as_array().unwrap() {
        for m in s["modes"].as_array().unwrap() {
            let key = m["mode"].as_str().unwrap();
            let measured = results["datapath"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|s| {
                    s["modes"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|n| n["mode"] == key && !n["runs"].as_array().unwrap().is_empty())
                })
                .count();
            assert_eq!(points(&svg, key).len(), measured, "{key}");
        }
    }
    // Higher is more: at 10000 Services lb makes more connections than iptables (last),
    // as the table says, so its point is higher (a smaller y).
    let y_at = |mode: &str, i: usize| points(&svg, mode)[i].1;
    assert!(y_at("ebpf", 2) < y_at("iptables", 2));
    // A mode not measured at a scale says why.
    assert!(svg.contains("not measured at 100000"), "{svg}");
}

#[test]
fn each_program_has_a_bar_per_case() {
    let results = latest();
    let svg = charts::per_packet(&results).unwrap();
    let largest = results["control"]
        .as_array()
        .unwrap()
        .iter()
        .max_by_key(|c| c["services"].as_u64())
        .unwrap();
    let rows = largest["per_packet"].as_array().unwrap();
    assert_eq!(svg.matches(r#"class="bar""#).count(), rows.len());
    for r in rows {
        let title = format!(
            "{}, {}: {:.0} ns",
            r["program"].as_str().unwrap(),
            r["case"].as_str().unwrap(),
            r["ns"].as_f64().unwrap()
        );
        assert!(svg.contains(&title), "no bar {title}");
    }
}
