//! A cgroup (v2) a test makes for its clients, so the agent's socket programs act on
//! them alone (`lb run --cgroup <it>`), never on the machine's own processes. Made under
//! the cgroup2 mount (`/sys/fs/cgroup/unified` on this machine's hybrid layout), removed
//! on drop, also when the test fails: its processes are killed (`cgroup.kill`, Linux
//! 5.14) and the folder removed.
use std::{
    ffi::CString,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use crate::{Error, Result};

pub struct TestCgroup {
    pub path: PathBuf,
}

impl TestCgroup {
    /// `<cgroup2 mount>/lb-test-<name>-<pid>`.
    pub fn create(name: &str) -> Result<Self> {
        let root = lb_userspace::sockets::cgroup2_mount()
            .ok_or_else(|| Error::Sandbox("no cgroup2 file system is mounted".into()))?;
        let path = root.join(format!("lb-test-{name}-{}", std::process::id()));
        std::fs::create_dir(&path)
            .map_err(|e| Error::Sandbox(format!("creating {}: {e}", path.display())))?;
        Ok(Self { path })
    }

    pub fn path_str(&self) -> &str {
        self.path.to_str().expect("a UTF-8 path")
    }

    /// Makes `cmd`'s process join this cgroup before it runs (so the client is in it
    /// from its first socket on).
    pub fn put(&self, cmd: &mut Command) {
        let procs = CString::new(
            self.path
                .join("cgroup.procs")
                .as_os_str()
                .as_encoded_bytes(),
        )
        .expect("no NUL");
        // SAFETY: the closure runs in the child between fork and exec and only calls
        // async-signal-safe functions (open, write, close) on memory made before fork.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let n = libc::write(fd, b"0".as_ptr() as *const libc::c_void, 1);
                libc::close(fd);
                if n != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }

    /// The pids in the cgroup now.
    pub fn procs(&self) -> Vec<u32> {
        std::fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.parse().ok())
            .collect()
    }
}

fn remove(path: &Path) {
    let _ = std::fs::write(path.join("cgroup.kill"), "1");
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if std::fs::remove_dir(path).is_ok() || !path.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("could not remove the test cgroup {}", path.display());
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        remove(&self.path);
    }
}
