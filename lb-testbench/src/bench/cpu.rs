//! CPU time from /proc, in clock ticks, and the ticks' length: the whole machine's busy
//! time (the datapath bench's iperf3 cost per bit, the load generator's per request) and
//! one process's (an agent's own share).

/// Busy ticks of all CPUs so far: /proc/stat's first line, everything but idle and iowait
/// (user nice system idle iowait irq softirq steal; guest time is in user already).
pub fn busy_ticks() -> u64 {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = s
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    total - idle
}

/// A process's user and system ticks so far (/proc/<pid>/stat; utime and stime are the
/// 12th and 13th fields after the command's parenthesis).
pub fn process_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Ticks per second (`_SC_CLK_TCK`).
pub fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).max(1) as f64
}
