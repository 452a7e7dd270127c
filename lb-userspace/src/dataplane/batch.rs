//! BPF_MAP_LOOKUP_BATCH / UPDATE_BATCH / DELETE_BATCH (Linux 5.6+): many entries per
//! syscall. aya 0.14 has no wrapper for them; nor for the other commands the project
//! makes itself ([`sys_bpf`]: the socket programs' loads and links, the conntrack
//! filter's grace periods).
use std::{
    io,
    mem::size_of,
    os::fd::{AsRawFd, OwnedFd},
};

const BPF_MAP_LOOKUP_BATCH: i64 = 24;
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

/// The bpf(2) syscall with an attribute `T` (a `bpf_attr` prefix for `cmd`): its
/// return value (a new fd, for the commands that make one).
pub(crate) fn sys_bpf<T>(cmd: libc::c_int, attr: &T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid bpf_attr prefix for `cmd`, of its own size, whose
    // pointers (if any) outlive the call; the kernel checks that the rest it knows of is
    // zero.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *const T, size_of::<T>()) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// The element member of `union bpf_attr` (BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM):
/// the map, and pointers to a key and a value of its sizes.
#[repr(C)]
pub(crate) struct ElemAttr {
    pub map_fd: u32,
    pub _pad: u32,
    pub key: u64,
    pub value: u64,
    pub flags: u64,
}

pub(crate) const BPF_MAP_LOOKUP_ELEM: libc::c_int = 1;
pub(crate) const BPF_MAP_UPDATE_ELEM: libc::c_int = 2;

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

/// Every entry of a map with `u32` keys (the backend array), `CHUNK` per syscall, where
/// iterating costs a syscall per entry (262,144 for the default backend array: a
/// quarter of a second at each start).
pub fn lookup_all<V: aya::Pod>(fd: &OwnedFd) -> io::Result<Vec<(u32, V)>> {
    let mut keys = vec![0u32; CHUNK];
    // SAFETY: `Pod` types are valid for any bit pattern, all zeroes included.
    let mut values: Vec<V> = vec![unsafe { std::mem::zeroed() }; CHUNK];
    let mut out = Vec::new();
    let mut cursor: Option<u32> = None;
    loop {
        let mut next = 0u32;
        let mut attr = BatchAttr {
            in_batch: cursor.as_ref().map_or(0, |c| c as *const u32 as u64),
            out_batch: &mut next as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        let r = call(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let n = (attr.count as usize).min(CHUNK);
        out.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
        match r {
            Ok(()) => cursor = Some(next),
            // The end of the map.
            Err((_, e)) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            Err((_, e)) => return Err(e),
        }
    }
}

/// Entries `from..from + n` of an array (the Maglev tables), `CHUNK` per syscall: an
/// array's batch token is the last index read, so a read from `from` starts after
/// `from - 1`.
pub fn lookup_range<V: aya::Pod>(fd: &OwnedFd, from: u32, n: u32) -> io::Result<Vec<V>> {
    let mut keys = vec![0u32; CHUNK];
    // SAFETY: `Pod` types are valid for any bit pattern, all zeroes included.
    let mut values: Vec<V> = vec![unsafe { std::mem::zeroed() }; CHUNK];
    let mut out: Vec<V> = Vec::with_capacity(n as usize);
    let mut cursor: Option<u32> = from.checked_sub(1);
    while out.len() < n as usize {
        let want = (n as usize - out.len()).min(CHUNK);
        let mut next = 0u32;
        let mut attr = BatchAttr {
            in_batch: cursor.as_ref().map_or(0, |c| c as *const u32 as u64),
            out_batch: &mut next as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: want as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        let r = call(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let got = (attr.count as usize).min(want);
        for (k, v) in keys[..got].iter().zip(&values[..got]) {
            if *k != from + out.len() as u32 {
                return Err(io::Error::other(format!(
                    "array batch read index {k} out of order"
                )));
            }
            out.push(*v);
        }
        match r {
            Ok(()) => cursor = Some(next),
            Err((_, e)) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err((_, e)) => return Err(e),
        }
    }
    if out.len() != n as usize {
        return Err(io::Error::other(format!(
            "array holds {} of cells {from}..{}",
            out.len(),
            from as u64 + n as u64
        )));
    }
    Ok(out)
}

/// Every entry of a hash map (LRU or not), `CHUNK` per syscall (the hash table's batch
/// token is a bucket number, a `u32`). Entries that come and go during the walk may be
/// missed or seen; each one returned was there when its bucket was read.
pub fn lookup_all_hash<K: aya::Pod, V: aya::Pod>(fd: &OwnedFd) -> io::Result<Vec<(K, V)>> {
    // SAFETY: `Pod` types are valid for any bit pattern, all zeroes included.
    let mut keys: Vec<K> = vec![unsafe { std::mem::zeroed() }; CHUNK];
    // SAFETY: as above.
    let mut values: Vec<V> = vec![unsafe { std::mem::zeroed() }; CHUNK];
    let mut out = Vec::new();
    let mut cursor: Option<u32> = None;
    loop {
        let mut next = 0u32;
        let mut attr = BatchAttr {
            in_batch: cursor.as_ref().map_or(0, |c| c as *const u32 as u64),
            out_batch: &mut next as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        let r = call(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let n = (attr.count as usize).min(CHUNK);
        out.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
        match r {
            Ok(()) => cursor = Some(next),
            Err((_, e)) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            Err((_, e)) => return Err(e),
        }
    }
}

/// How many entries a hash map holds, `CHUNK` per syscall (the hash table's batch token
/// is a bucket number, a `u32`). The entries are read and dropped: the kernel keeps no
/// count of a hash map's elements that userspace can ask for.
pub fn count<K: aya::Pod, V: aya::Pod>(fd: &OwnedFd) -> io::Result<usize> {
    // SAFETY: `Pod` types are valid for any bit pattern, all zeroes included.
    let mut keys: Vec<K> = vec![unsafe { std::mem::zeroed() }; CHUNK];
    // SAFETY: as above.
    let mut values: Vec<V> = vec![unsafe { std::mem::zeroed() }; CHUNK];
    let mut total = 0;
    let mut cursor: Option<u32> = None;
    loop {
        let mut next = 0u32;
        let mut attr = BatchAttr {
            in_batch: cursor.as_ref().map_or(0, |c| c as *const u32 as u64),
            out_batch: &mut next as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        let r = call(BPF_MAP_LOOKUP_BATCH, &mut attr);
        total += (attr.count as usize).min(CHUNK);
        match r {
            Ok(()) => cursor = Some(next),
            Err((_, e)) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(total),
            Err((_, e)) => return Err(e),
        }
    }
}
