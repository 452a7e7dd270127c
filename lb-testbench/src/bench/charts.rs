//! The benchmark's results as SVG charts, drawn from `latest.json` (by the bench's report
//! step, or alone: `cargo xtask bench --charts-only`), written by hand as plain SVG so no
//! plotting service or font is needed to read them:
//!
//! - `conns_per_s.svg`: new connections per second against the number of Services, one
//!   line per mode (median over the repeats, the bar from min to max); a mode that was
//!   not measured at a scale has no point there, and its legend says why.
//! - `per_packet.svg`: the per-packet cost of each program (BPF_PROG_TEST_RUN, ns) for
//!   each case, at the largest control-plane scale.
//!
//! The same `latest.json` gives the same bytes, so the charts in results/ can be checked
//! against it.
use std::{fmt::Write as _, path::Path};

use serde_json::Value;

use super::datapath::MODES;
use crate::{Error, Result};

/// One colour per mode, in `MODES` order (colour-blind safe, Okabe–Ito).
const COLORS: [&str; 5] = ["#000000", "#E69F00", "#56B4E9", "#009E73", "#D55E00"];
/// One colour per program in the per-packet chart.
const PROGRAM_COLORS: [&str; 4] = ["#0072B2", "#D55E00", "#56B4E9", "#E69F00"];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// A round step for about `ticks` grid lines up to `max`.
fn nice_step(max: f64, ticks: f64) -> f64 {
    let raw = (max / ticks).max(f64::MIN_POSITIVE);
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let step = if norm <= 1.0 {
        1.0
    } else if norm <= 2.0 {
        2.0
    } else if norm <= 5.0 {
        5.0
    } else {
        10.0
    };
    step * mag
}

/// `12 345` as `12.3k`, for axis labels.
fn short(v: f64) -> String {
    if v >= 1000.0 {
        let k = v / 1000.0;
        if k.fract() == 0.0 {
            format!("{k:.0}k")
        } else {
            format!("{k:.1}k")
        }
    } else {
        format!("{v:.0}")
    }
}

fn header(o: &mut String, w: u32, h: u32, title: &str, subtitle: &str) {
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(o, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        o,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15" font-weight="bold">{}</text>"#,
        w / 2,
        esc(title)
    );
    let _ = writeln!(
        o,
        r##"<text x="{}" y="40" text-anchor="middle" fill="#555">{}</text>"##,
        w / 2,
        esc(subtitle)
    );
}

/// (services, median, min, max) of one mode's connection runs, per scale measured.
type Series = Vec<(u64, f64, f64, f64)>;

/// New connections per second against the number of Services, per mode.
pub fn conns_per_s(results: &Value) -> Result<String> {
    let scales = results["datapath"]
        .as_array()
        .ok_or_else(|| Error::Sandbox("latest.json: no datapath runs".into()))?;
    let services: Vec<u64> = scales
        .iter()
        .filter_map(|s| s["services"].as_u64())
        .collect();
    let mut series: Vec<(usize, Series, Option<String>)> = Vec::new();
    for (i, mode) in MODES.iter().enumerate() {
        let mut points = Series::new();
        let mut why = None;
        for s in scales {
            let Some(m) = s["modes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|m| m["mode"] == mode.key())
            else {
                continue;
            };
            let mut v: Vec<f64> = m["runs"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| r["conns_per_s"].as_f64())
                .collect();
            if v.is_empty() {
                if why.is_none() {
                    why = m["skipped"]
                        .as_str()
                        .map(|w| format!("not measured at {}: {w}", s["services"]));
                }
                continue;
            }
            let (lo, hi) = (
                v.iter().copied().fold(f64::INFINITY, f64::min),
                v.iter().copied().fold(0.0, f64::max),
            );
            points.push((s["services"].as_u64().unwrap_or(0), median(&mut v), lo, hi));
        }
        series.push((i, points, why));
    }
    let (w, h) = (760u32, 470u32);
    let (left, right, top, bottom) = (70.0, 250.0, 60.0, 60.0);
    let plot_w = w as f64 - left - right;
    let plot_h = h as f64 - top - bottom;
    let max = series
        .iter()
        .flat_map(|(_, p, _)| p.iter().map(|x| x.3))
        .fold(0.0, f64::max);
    let step = nice_step(max, 5.0);
    let y_max = (max / step).ceil() * step;
    let y = |v: f64| top + plot_h - v / y_max * plot_h;
    // Scales are evenly spaced (they are roughly decades apart).
    let x = |svc: u64| {
        let i = services.iter().position(|s| *s == svc).unwrap_or(0) as f64;
        left + (i + 0.5) * plot_w / services.len().max(1) as f64
    };
    let mut o = String::new();
    header(
        &mut o,
        w,
        h,
        "New connections per second against the number of Services",
        &format!(
            "a new TCP connection per HTTP request to a ClusterIP; median and min–max of the repeats; {}",
            results["machine"]["date"].as_str().unwrap_or("")
        ),
    );
    let mut v = 0.0;
    while v <= y_max + step / 2.0 {
        let _ = writeln!(
            o,
            r##"<line x1="{left}" y1="{0:.1}" x2="{1}" y2="{0:.1}" stroke="#ddd"/><text x="{2}" y="{3:.1}" text-anchor="end">{4}</text>"##,
            y(v),
            left + plot_w,
            left - 6.0,
            y(v) + 4.0,
            short(v)
        );
        v += step;
    }
    for s in &services {
        let _ = writeln!(
            o,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{s}</text>"#,
            x(*s),
            top + plot_h + 18.0
        );
    }
    let _ = writeln!(
        o,
        r#"<text x="{:.1}" y="{}" text-anchor="middle">Services in the cluster (the scales measured, evenly spaced)</text>"#,
        left + plot_w / 2.0,
        h as f64 - 18.0
    );
    let _ = writeln!(
        o,
        r#"<text x="18" y="{:.1}" text-anchor="middle" transform="rotate(-90 18 {:.1})">new connections per second</text>"#,
        top + plot_h / 2.0,
        top + plot_h / 2.0
    );
    let _ = writeln!(
        o,
        r##"<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>"##
    );
    for (i, points, _) in &series {
        let c = COLORS[*i];
        let key = MODES[*i].key();
        let path: Vec<String> = points
            .iter()
            .map(|(s, m, _, _)| format!("{:.1},{:.1}", x(*s), y(*m)))
            .collect();
        let _ = writeln!(
            o,
            r#"<polyline class="mode" data-mode="{key}" fill="none" stroke="{c}" stroke-width="2" points="{}"/>"#,
            path.join(" ")
        );
        for (s, m, lo, hi) in points {
            let _ = writeln!(
                o,
                r#"<line x1="{0:.1}" y1="{1:.1}" x2="{0:.1}" y2="{2:.1}" stroke="{c}"/><circle cx="{0:.1}" cy="{3:.1}" r="3.5" fill="{c}"><title>{4}: {5} Services, {6:.0} conn/s ({7:.0}–{8:.0})</title></circle>"#,
                x(*s),
                y(*lo),
                y(*hi),
                y(*m),
                esc(MODES[*i].name()),
                s,
                m,
                lo,
                hi
            );
        }
    }
    let lx = left + plot_w + 16.0;
    let mut ly = top + 10.0;
    for (i, _, why) in &series {
        let _ = writeln!(
            o,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{}" stroke-width="3"/><text x="{}" y="{}">{}</text>"#,
            lx + 22.0,
            COLORS[*i],
            lx + 28.0,
            ly + 4.0,
            esc(MODES[*i].name())
        );
        ly += 18.0;
        if let Some(why) = why {
            for line in wrap(why, 36) {
                let _ = writeln!(
                    o,
                    r##"<text x="{}" y="{ly}" font-size="10" fill="#555">{}</text>"##,
                    lx + 28.0,
                    esc(&line)
                );
                ly += 13.0;
            }
        }
        ly += 6.0;
    }
    o.push_str("</svg>\n");
    Ok(o)
}

/// `text` in lines of at most about `width` characters.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut out = vec![String::new()];
    for word in text.split_whitespace() {
        let last = out.last_mut().unwrap();
        if !last.is_empty() && last.len() + 1 + word.len() > width {
            out.push(word.to_string());
        } else {
            if !last.is_empty() {
                last.push(' ');
            }
            last.push_str(word);
        }
    }
    out
}

/// The per-packet cost of each program and case, at the largest control-plane scale.
pub fn per_packet(results: &Value) -> Result<String> {
    let control = results["control"]
        .as_array()
        .and_then(|c| {
            c.iter()
                .filter(|s| s["per_packet"].as_array().is_some_and(|p| !p.is_empty()))
                .max_by_key(|s| s["services"].as_u64())
        })
        .ok_or_else(|| Error::Sandbox("latest.json: no per-packet costs".into()))?;
    let rows = control["per_packet"].as_array().unwrap();
    let mut programs: Vec<&str> = Vec::new();
    let mut cases: Vec<&str> = Vec::new();
    for r in rows {
        let (p, c) = (
            r["program"].as_str().unwrap_or("?"),
            r["case"].as_str().unwrap_or("?"),
        );
        if !programs.contains(&p) {
            programs.push(p);
        }
        if !cases.contains(&c) {
            cases.push(c);
        }
    }
    let ns = |p: &str, c: &str| {
        rows.iter()
            .find(|r| r["program"] == p && r["case"] == c)
            .and_then(|r| r["ns"].as_f64())
    };
    let bar_h = 13.0;
    let group_h = bar_h * programs.len() as f64 + 14.0;
    let (left, right, top) = (250.0, 40.0, 64.0);
    let w = 760u32;
    let plot_w = w as f64 - left - right;
    let plot_h = group_h * cases.len() as f64;
    let h = (top + plot_h + 70.0) as u32;
    let max = rows
        .iter()
        .filter_map(|r| r["ns"].as_f64())
        .fold(0.0, f64::max);
    let step = nice_step(max, 6.0);
    let x_max = (max / step).ceil() * step;
    let x = |v: f64| left + v / x_max * plot_w;
    let mut o = String::new();
    header(
        &mut o,
        w,
        h,
        "Per-packet cost of each program (BPF_PROG_TEST_RUN)",
        &format!(
            "ns per packet, {} Services x 10 endpoints in the maps; {}",
            control["services"],
            results["machine"]["date"].as_str().unwrap_or("")
        ),
    );
    let mut v = 0.0;
    while v <= x_max + step / 2.0 {
        let _ = writeln!(
            o,
            r##"<line x1="{0:.1}" y1="{top}" x2="{0:.1}" y2="{1}" stroke="#ddd"/><text x="{0:.1}" y="{2}" text-anchor="middle">{3}</text>"##,
            x(v),
            top + plot_h,
            top + plot_h + 16.0,
            short(v)
        );
        v += step;
    }
    let _ = writeln!(
        o,
        r#"<text x="{:.1}" y="{}" text-anchor="middle">ns per packet</text>"#,
        left + plot_w / 2.0,
        top + plot_h + 34.0
    );
    for (ci, c) in cases.iter().enumerate() {
        let gy = top + ci as f64 * group_h + 7.0;
        let _ = writeln!(
            o,
            r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#,
            left - 8.0,
            gy + group_h / 2.0 - 3.0,
            esc(c)
        );
        for (pi, p) in programs.iter().enumerate() {
            let Some(v) = ns(p, c) else { continue };
            let by = gy + pi as f64 * bar_h;
            let _ = writeln!(
                o,
                r#"<rect class="bar" data-program="{0}" x="{left}" y="{by:.1}" width="{1:.1}" height="{2}" fill="{3}"><title>{0}, {4}: {5:.0} ns</title></rect><text x="{6:.1}" y="{7:.1}" font-size="10">{5:.0}</text>"#,
                esc(p),
                x(v) - left,
                bar_h - 2.0,
                PROGRAM_COLORS[pi % PROGRAM_COLORS.len()],
                esc(c),
                v,
                x(v) + 4.0,
                by + bar_h - 4.0
            );
        }
    }
    let mut lx = left;
    for (pi, p) in programs.iter().enumerate() {
        let _ = writeln!(
            o,
            r#"<rect x="{lx}" y="{}" width="14" height="10" fill="{}"/><text x="{}" y="{}">{}</text>"#,
            h as f64 - 22.0,
            PROGRAM_COLORS[pi % PROGRAM_COLORS.len()],
            lx + 18.0,
            h as f64 - 13.0,
            esc(p)
        );
        lx += 30.0 + 8.0 * p.len() as f64;
    }
    o.push_str("</svg>\n");
    Ok(o)
}

/// The charts' file names and contents, from `latest.json`'s value.
pub fn draw(results: &Value) -> Result<Vec<(&'static str, String)>> {
    Ok(vec![
        ("conns_per_s.svg", conns_per_s(results)?),
        ("per_packet.svg", per_packet(results)?),
    ])
}

/// Reads `dir/latest.json` and writes the charts beside it.
pub fn write(dir: &Path) -> Result<()> {
    let path = dir.join("latest.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Error::Sandbox(format!("{}: {e}", path.display())))?;
    let results: Value = serde_json::from_str(&text)
        .map_err(|e| Error::Sandbox(format!("{}: {e}", path.display())))?;
    for (name, svg) in draw(&results)? {
        let p = dir.join(name);
        std::fs::write(&p, svg).map_err(|e| Error::Sandbox(format!("{}: {e}", p.display())))?;
        super::progress(format!("wrote {}", p.display()));
    }
    Ok(())
}
