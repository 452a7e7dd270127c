//! What the programs themselves cost: the kernel's run-time statistics of BPF programs
//! (`BPF_ENABLE_STATS`, held on while the returned fd lives, so nothing stays on after
//! the bench) read for the programs an agent pinned. Summed over a run and divided by
//! the connections made, it is the time the load balancer added in its programs, free
//! of the noise that moves whole connection rates by several percent on a shared
//! machine.
use std::{collections::BTreeMap, os::fd::OwnedFd, path::Path};

use aya::programs::ProgramInfo;

use crate::{Error, Result};

/// Turns the kernel's per-program run time accounting on until the fd is dropped.
pub fn enable() -> Result<OwnedFd> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .map_err(|e| Error::Sandbox(format!("BPF_ENABLE_STATS: {e}")))
}

/// Run time (ns) and runs of one program.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub ns: u64,
    pub runs: u64,
}

/// The programs pinned in `pin_dir` (its plain files that are programs; maps and link
/// folders are skipped), by name.
pub fn snapshot(pin_dir: &Path) -> BTreeMap<String, Counts> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(pin_dir) else {
        return out;
    };
    for e in dir.flatten() {
        if !e.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        if let Ok(info) = ProgramInfo::from_pin(e.path()) {
            out.insert(
                e.file_name().to_string_lossy().into_owned(),
                Counts {
                    ns: info.run_time().as_nanos() as u64,
                    runs: info.run_count(),
                },
            );
        }
    }
    out
}

/// What ran between two snapshots, summed over the programs `pick` selects.
pub fn delta(
    before: &BTreeMap<String, Counts>,
    after: &BTreeMap<String, Counts>,
    pick: impl Fn(&str) -> bool,
) -> Counts {
    let mut d = Counts::default();
    for (name, a) in after.iter().filter(|(n, _)| pick(n)) {
        let b = before.get(name).copied().unwrap_or_default();
        // A program replaced between the two (an agent restarted) starts from zero.
        let (ns, runs) = if a.runs >= b.runs {
            (a.ns.saturating_sub(b.ns), a.runs - b.runs)
        } else {
            (a.ns, a.runs)
        };
        d.ns += ns;
        d.runs += runs;
    }
    d
}

/// Socket programs (connect-time balancing) by their pinned names.
pub fn is_socket_program(name: &str) -> bool {
    name.starts_with("lb_sock_")
}

/// "name: runs x ns" for each program that ran between two snapshots.
pub fn per_program(before: &BTreeMap<String, Counts>, after: &BTreeMap<String, Counts>) -> String {
    after
        .keys()
        .filter_map(|name| {
            let d = delta(before, after, |n| n == name);
            (d.runs > 0)
                .then(|| format!("{name}: {} x {:.0} ns", d.runs, d.ns as f64 / d.runs as f64))
        })
        .collect::<Vec<_>>()
        .join(", ")
}
