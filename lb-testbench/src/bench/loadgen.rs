//! New-connection load generator: worker threads inside the client's network namespace
//! (setns), each in a closed loop of connect, one HTTP/1.0 request, read to EOF, close.
//! Every request is a new TCP connection, so every request is a new flow for the load
//! balancer. Bounded by time and by count.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

#[derive(Clone, Debug, Default)]
pub struct LoadResult {
    pub ok: u64,
    pub errors: u64,
    pub secs: f64,
    /// Per-request latency, connect to EOF, in microseconds.
    pub latencies_us: Vec<f64>,
    pub first_error: Option<String>,
    /// The machine's busy CPU time over the measured window (every core, every process:
    /// the load generator, the servers, the kernel's networking and any program in it),
    /// in microseconds per request made; None if none was made.
    pub cpu_us_per_request: Option<f64>,
}

impl LoadResult {
    pub fn conns_per_sec(&self) -> f64 {
        self.ok as f64 / self.secs
    }
}

fn one(target: SocketAddr) -> std::io::Result<()> {
    let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.set_nodelay(true)?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n")?;
    let mut buf = [0u8; 512];
    let mut got = 0usize;
    let mut head = [0u8; 12];
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        for b in &buf[..n] {
            if got < head.len() {
                head[got] = *b;
            }
            got += 1;
        }
    }
    if &head[..] != b"HTTP/1.1 200" {
        return Err(std::io::Error::other(format!(
            "bad answer: {:?}",
            String::from_utf8_lossy(&head)
        )));
    }
    Ok(())
}

/// How a worker picks each request's target among several.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spread {
    /// In turn, worker `w` starting at target `w`: the workers' requests spread evenly
    /// at every moment, better than any balancer that chooses per connection can.
    RoundRobin,
    /// Uniformly at random, each request on its own: the spread of a load balancer that
    /// hashes or draws per connection (kube-proxy's iptables, this project's choice),
    /// where now and then two workers' requests meet at one backend while another idles.
    Random,
}

/// splitmix64: a worker's own cheap stream of draws, seeded from the process's random
/// hasher keys.
struct Draws(u64);

impl Draws {
    fn new(worker: usize) -> Self {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_usize(worker);
        Draws(h.finish())
    }

    fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (((z >> 32) * n as u64) >> 32) as usize
    }
}

/// Runs `threads` workers in `netns` for `warmup` (discarded) then `duration` or until
/// `max_requests` in all; requests go over `targets` as `spread` says.
pub fn run(
    netns: &str,
    targets: &[SocketAddr],
    spread: Spread,
    threads: usize,
    warmup: Duration,
    duration: Duration,
    max_requests: u64,
) -> crate::Result<LoadResult> {
    let started = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    let t0 = Instant::now();
    let measure_from = t0 + warmup;
    let deadline = measure_from + duration;
    for w in 0..threads {
        let targets = targets.to_vec();
        let netns = netns.to_string();
        let started = started.clone();
        handles.push(std::thread::spawn(
            move || -> crate::Result<(LoadResult, Instant)> {
                crate::sandbox::enter(&netns)?;
                let mut r = LoadResult::default();
                let mut i = w;
                let mut draws = Draws::new(w);
                let mut last = Instant::now();
                loop {
                    let now = Instant::now();
                    if now >= deadline {
                        break;
                    }
                    let measuring = now >= measure_from;
                    if measuring && started.fetch_add(1, Ordering::Relaxed) >= max_requests {
                        break;
                    }
                    let target = match spread {
                        Spread::RoundRobin => targets[i % targets.len()],
                        Spread::Random => targets[draws.below(targets.len())],
                    };
                    i += 1;
                    let t = Instant::now();
                    let res = one(target);
                    last = Instant::now();
                    if !measuring {
                        continue;
                    }
                    match res {
                        Ok(()) => {
                            r.ok += 1;
                            r.latencies_us.push(t.elapsed().as_secs_f64() * 1e6);
                        }
                        Err(e) => {
                            r.errors += 1;
                            if r.first_error.is_none() {
                                r.first_error = Some(format!("{target}: {e}"));
                            }
                        }
                    }
                }
                Ok((r, last))
            },
        ));
    }
    std::thread::sleep(measure_from.saturating_duration_since(Instant::now()));
    let busy_from = super::cpu::busy_ticks();
    let mut total = LoadResult::default();
    let mut end = measure_from;
    for h in handles {
        let (r, last) = h
            .join()
            .map_err(|_| crate::Error::Sandbox("load generator thread panicked".into()))??;
        total.ok += r.ok;
        total.errors += r.errors;
        total.latencies_us.extend(r.latencies_us);
        if total.first_error.is_none() {
            total.first_error = r.first_error;
        }
        end = end.max(last);
    }
    total.secs = end
        .saturating_duration_since(measure_from)
        .as_secs_f64()
        .max(1e-3);
    let busy = super::cpu::busy_ticks().saturating_sub(busy_from);
    total.cpu_us_per_request =
        (total.ok > 0).then(|| busy as f64 * 1e6 / super::cpu::ticks_per_sec() / total.ok as f64);
    Ok(total)
}
