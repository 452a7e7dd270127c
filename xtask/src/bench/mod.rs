//! `cargo xtask bench [--quick] [-- <lb-testbench bench args>]`: builds the release
//! binaries (`lb` and the test bench's `lb-testbench`), runs the benchmark in
//! `lbbench-*` network namespaces, writes `results/latest.{md,json}` and the SVG charts
//! (`--charts-only`: only those, from the existing JSON) and puts the table in
//! README.md's "Benchmarks" section.
use std::{path::Path, process::Command};

use anyhow::{Context, Result};

const README_HEADING: &str = "## Benchmarks";

pub fn bench(root: &Path, quick: bool, extra: &[String]) -> Result<()> {
    let mut cmd = Command::new(root.join("target/release/lb-testbench"));
    cmd.current_dir(root)
        .arg("bench")
        .arg("--out")
        .arg(root.join("results"));
    if quick {
        cmd.arg("--quick");
    }
    cmd.args(extra);
    super::run(&mut cmd)?;
    if extra.iter().any(|a| a == "--connect-time") {
        eprintln!("results: results/connect_time.md, results/connect_time.json");
        return Ok(());
    }
    let table =
        std::fs::read_to_string(root.join("results/latest.md")).context("results/latest.md")?;
    update_readme(&root.join("README.md"), &with_trace_cost(root, table))?;
    eprintln!("results: results/latest.md, results/latest.json; README.md updated");
    Ok(())
}

/// The heading of `lb trace`'s cost in the tables (`lb_testbench::bench::tracecost`).
const TRACE_COST_HEADING: &str = "#### `lb trace` off: its cost per packet";

/// The latest table, with `lb trace`'s cost measured on its own (`-- --trace-cost-only`,
/// results/trace_cost.md) when the table was made before it had that section.
fn with_trace_cost(root: &Path, mut table: String) -> String {
    if !table.contains(TRACE_COST_HEADING) {
        if let Ok(t) = std::fs::read_to_string(root.join("results/trace_cost.md")) {
            table.push_str(&format!(
                "\n(Measured on its own: `cargo xtask bench -- --trace-cost-only`, \
                 results/trace_cost.md.)\n{t}"
            ));
        }
    }
    table
}

/// Replaces the "Benchmarks" section (it is the last one) or appends it.
fn update_readme(path: &Path, table: &str) -> Result<()> {
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let keep = match old.find(&format!("\n{README_HEADING}\n")) {
        Some(i) => &old[..i + 1],
        None if old.starts_with(&format!("{README_HEADING}\n")) => "",
        None if old.is_empty() || old.ends_with('\n') => &old,
        None => return write(path, &format!("{old}\n{}", section(table))),
    };
    write(path, &format!("{keep}{}", section(table)))
}

fn section(table: &str) -> String {
    format!(
        "{README_HEADING}\n\n`cargo xtask bench` (about 25 minutes; `--quick`: a few minutes) compares this dataplane with no load \
         balancer, kube-proxy's iptables mode (the tested Service last or in the middle of KUBE-SERVICES) and kube-proxy's \
         nftables mode on identical namespace sandboxes with the same services and endpoints, measures the forwarding rate \
         of real packets to a NodePort on one core, and writes `results/latest.md`, `results/latest.json` and two charts \
         drawn from the JSON (`cargo xtask bench --charts-only` redraws them):\n\n\
         ![New connections per second against the number of Services, per mode](results/conns_per_s.svg)\n\n\
         ![Per-packet cost of each program, per case](results/per_packet.svg)\n\n\
         The latest table:\n\n{table}"
    )
}

/// Redraws the charts from `results/latest.json` (no measurement, no root).
pub fn charts(root: &Path) -> Result<()> {
    super::run(
        Command::new("cargo")
            .current_dir(root)
            .args(["run", "--quiet", "--package", "lb-testbench", "--", "bench"])
            .args(["--charts-only", "--out"])
            .arg(root.join("results")),
    )
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| path.display().to_string())
}
