//! Entering a network namespace made with `ip netns add` (`lb run --netns`, and the test
//! bench). Only the network namespace changes: the mount namespace, and with it the
//! host's bpffs, stays, unlike `ip netns exec`, which remounts /sys.
use std::{fs::File, os::fd::AsRawFd, path::Path};

use crate::{Error, Result};

/// Moves the calling thread into the named network namespace. Threads created afterwards
/// inherit it; call it before starting a runtime so every worker thread is inside.
pub fn enter(name: &str) -> Result<()> {
    let path = Path::new("/run/netns").join(name);
    let f = File::open(&path).map_err(|e| Error::Netns(format!("{}: {e}", path.display())))?;
    // SAFETY: f is an open netns file descriptor.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(Error::Netns(format!(
            "entering {name}: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}
