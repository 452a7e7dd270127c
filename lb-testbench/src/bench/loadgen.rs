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

/// Runs `threads` workers in `netns` for `warmup` (discarded) then `duration` or until
/// `max_requests` in all; requests go round-robin over `targets`.
pub fn run(
    netns: &str,
    targets: &[SocketAddr],
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
                    let target = targets[i % targets.len()];
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
    Ok(total)
}
