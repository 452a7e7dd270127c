//! Entering a network namespace made with `ip netns add` (for the demo, the tests and
//! `lb run --netns`). Only the network namespace changes: the mount namespace, and with it
//! the host's bpffs, stays, unlike `ip netns exec`, which remounts /sys.
use std::{fs::File, os::fd::AsRawFd, path::Path};

use crate::{Error, Result};

/// Moves the calling thread into the named network namespace. Threads created afterwards
/// inherit it; call it before starting a runtime so every worker thread is inside.
pub fn enter(name: &str) -> Result<()> {
    let path = Path::new("/run/netns").join(name);
    let f = File::open(&path).map_err(|e| {
        Error::Sandbox(format!("network namespace {name}: {}: {e}", path.display()))
    })?;
    // SAFETY: f is an open netns file descriptor.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(Error::Sandbox(format!(
            "entering network namespace {name}: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// Runs `f` on a new thread inside the named network namespace and returns its result
/// (sockets made by `f` stay in that namespace).
pub fn run_in<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let name = name.to_string();
    std::thread::spawn(move || -> Result<T> {
        enter(&name)?;
        Ok(f())
    })
    .join()
    .map_err(|_| Error::Sandbox("thread panicked".into()))?
}
