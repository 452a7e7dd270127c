//! The eBPF programs' own log lines, in a debug build of them (`cargo xtask build-ebpf
//! --debug-log`): aya-log's records, read from the object's `AYA_LOGS` ring buffer by a
//! thread of their own and forwarded to this process's log (`tracing`, target `lb_ebpf`),
//! a counter's index in `reason=N` replaced by its name. The release object has no such
//! map: then nothing starts.
use std::{
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
};

use aya_log::EbpfLogger;
use lb_common::counter;

use crate::{Error, Result};

/// The map aya-log writes its records to (`aya_log_ebpf`).
pub const LOG_MAP: &str = "AYA_LOGS";

/// Forwards the programs' log records while it lives.
pub struct EbpfLog {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EbpfLog {
    /// Starts forwarding if the loaded object logs (has `AYA_LOGS`); None otherwise.
    /// Call before the programs are loaded: the reader keeps the map's fd open, which
    /// the programs' load needs.
    pub fn start(ebpf: &mut aya::Ebpf) -> Result<Option<Self>> {
        if ebpf.map(LOG_MAP).is_none() {
            return Ok(None);
        }
        let mut logger = EbpfLogger::init_with_logger(ebpf, ToTracing)
            .map_err(|e| Error::Load(format!("{LOG_MAP}: {e}")))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("ebpf-log".into())
            .spawn(move || {
                let mut fds = libc::pollfd {
                    fd: logger.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                while !stopping.load(Ordering::Relaxed) {
                    // SAFETY: one valid pollfd, for the logger's ring buffer, alive here.
                    unsafe { libc::poll(&mut fds, 1, 100) };
                    logger.flush();
                }
                logger.flush();
            })
            .map_err(|e| Error::Load(format!("starting the {LOG_MAP} reader: {e}")))?;
        tracing::info!(
            "this eBPF object is a debug build (--debug-log): its log lines follow, target \
             lb_ebpf"
        );
        Ok(Some(EbpfLog {
            stop,
            thread: Some(thread),
        }))
    }
}

impl Drop for EbpfLog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// aya-log's records as `tracing` events of their level.
struct ToTracing;

impl log::Log for ToTracing {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let line = named_reason(&record.args().to_string());
        let src = record.target();
        match record.level() {
            log::Level::Error => tracing::error!(target: "lb_ebpf", src, "{line}"),
            log::Level::Warn => tracing::warn!(target: "lb_ebpf", src, "{line}"),
            log::Level::Info => tracing::info!(target: "lb_ebpf", src, "{line}"),
            log::Level::Debug => tracing::debug!(target: "lb_ebpf", src, "{line}"),
            log::Level::Trace => tracing::trace!(target: "lb_ebpf", src, "{line}"),
        }
    }

    fn flush(&self) {}
}

/// `reason=N` (a counter's index, as the programs log it) as `reason=<its name>`.
fn named_reason(line: &str) -> String {
    let Some(at) = line.find("reason=") else {
        return line.to_string();
    };
    let rest = &line[at + "reason=".len()..];
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let name = rest[..digits]
        .parse::<u32>()
        .ok()
        .and_then(|i| counter::NAMES.get(i as usize));
    match name {
        Some(name) => format!("{}reason={name}{}", &line[..at], &rest[digits..]),
        // u32::MAX: nothing to report (`TRACE_NOTHING`), or not a counter.
        None => line.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reason_reads_as_its_counters_name() {
        assert_eq!(
            named_reason("reason=4 service 3 backend 0 client port 40000"),
            "reason=refused_no_backend service 3 backend 0 client port 40000"
        );
        assert_eq!(
            named_reason("reason=0 service 1"),
            "reason=new_flow service 1"
        );
        assert_eq!(
            named_reason("reason=passed_malformed"),
            "reason=passed_malformed"
        );
        assert_eq!(named_reason("reason=4294967295 x"), "reason=4294967295 x");
        assert_eq!(
            named_reason("new flow ::ffff:10.0.0.1:80"),
            "new flow ::ffff:10.0.0.1:80"
        );
    }
}
