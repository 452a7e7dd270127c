//! BPF_MAP_UPDATE_BATCH / BPF_MAP_DELETE_BATCH (Linux 5.6+): many entries per syscall.
//! aya 0.14 has no wrapper for them, so this is the one raw `bpf(2)` call in the project.
use std::{
    io,
    mem::size_of,
    os::fd::{AsRawFd, OwnedFd},
};

const BPF_MAP_UPDATE_BATCH: i64 = 26;
const BPF_MAP_DELETE_BATCH: i64 = 27;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Entries per syscall: large enough to amortise it, small enough to keep each call short.
pub const CHUNK: usize = 4096;

fn call(cmd: i64, attr: &mut BatchAttr) -> Result<(), (usize, io::Error)> {
    let want = attr.count;
    // SAFETY: attr is a valid, initialised `bpf_attr` prefix; keys/values point at
    // `count` contiguous elements that outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut BatchAttr,
            size_of::<BatchAttr>() as libc::c_long,
        )
    };
    if rc < 0 {
        // The kernel reports how many elements it processed before the failure.
        let done = (attr.count as usize).min(want as usize);
        return Err((done, io::Error::last_os_error()));
    }
    Ok(())
}

/// Writes `keys[i] -> values[i]`; on failure, returns how many were written first.
pub fn update<K: Copy, V: Copy>(
    fd: &OwnedFd,
    keys: &[K],
    values: &[V],
) -> Result<(), (usize, io::Error)> {
    assert_eq!(keys.len(), values.len());
    if keys.is_empty() {
        return Ok(());
    }
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: keys.len() as u32,
        map_fd: fd.as_raw_fd() as u32,
        ..Default::default()
    };
    call(BPF_MAP_UPDATE_BATCH, &mut attr)
}

/// Deletes `keys`; on failure (a missing key among them), returns how many went first.
pub fn delete<K: Copy>(fd: &OwnedFd, keys: &[K]) -> Result<(), (usize, io::Error)> {
    if keys.is_empty() {
        return Ok(());
    }
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        count: keys.len() as u32,
        map_fd: fd.as_raw_fd() as u32,
        ..Default::default()
    };
    call(BPF_MAP_DELETE_BATCH, &mut attr)
}
