//! `LB_CT_FILTER`, the conntrack filter: a bit per hash of every conntrack key's
//! addresses and protocol (`lb_common::ct_filter_bit`) in front of `LB_CONNTRACK`, so
//! that the packets of no tracked flow (pod to pod, a connect-time flow's, either way)
//! skip the hash lookup, which misses: the tc program's run went from 163 to 121-145 ns in
//! the connect-time bench.
//!
//! The programs set a key's bit (an atomic OR) before they insert its entry, and trust a
//! clear bit only while the switch (`CT_FILTER_SWITCH`) is on. Nothing clears a bit but
//! a rebuild, so the filter never misses an entry; the bits of entries that went (the
//! collector's, the LRU's) stay set, and cost the lookup they would have cost anyway,
//! until the collector rebuilds the filter ([`needs_rebuild`]).
//!
//! A rebuild, on the collector's thread (the only writer besides the programs):
//! 1. the switch off, then a grace period: no program still runs that read it on (it
//!    could otherwise read a bit as it is cleared in step 2 and skip a live entry);
//! 2. every word cleared, then a grace period: every program that set a bit before the
//!    clear (which the clear may have undone) has inserted its entry;
//! 3. the bit of every entry the map holds now (each of the step 2 entries among them)
//!    ORed in, atomically beside the programs' ORs for entries made meanwhile;
//! 4. the switch on.
//!
//! The load turns the switch off ([`CtFilter::turn_off`]): the programs of an earlier
//! build may still be attached and insert entries without bits. The agent's collector
//! rebuilds once the programs of this build are attached everywhere.
//!
//! A grace period is the kernel's `synchronize_rcu()`, which waits for every running
//! non-sleepable BPF program: an update of an array of maps waits for one
//! ([`Grace`]; the kernel's selftests use the same trick).
use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    sync::atomic::{AtomicU64, Ordering},
};

use lb_common::{ct_filter_bit, CtKey, CtValue, CT_FILTER_ON, CT_FILTER_SWITCH, CT_FILTER_WORDS};

use super::batch::{self, sys_bpf, ElemAttr, BPF_MAP_UPDATE_ELEM};

/// The words of a filter holding `keys`' bits (pure).
pub fn words<'a>(keys: impl IntoIterator<Item = &'a CtKey>) -> Vec<u64> {
    let mut w = vec![0u64; CT_FILTER_WORDS as usize];
    for k in keys {
        let (i, mask) = ct_filter_bit(k);
        w[i as usize] |= mask;
    }
    w
}

/// Whether `key`'s bit is set in `words` (pure).
pub fn has(words: &[u64], key: &CtKey) -> bool {
    let (i, mask) = ct_filter_bit(key);
    words.get(i as usize).is_some_and(|w| w & mask != 0)
}

/// How many of `keys` have their bit clear in `words` (pure).
pub fn missing<'a>(words: &[u64], keys: impl IntoIterator<Item = &'a CtKey>) -> usize {
    keys.into_iter().filter(|k| !has(words, k)).count()
}

/// Bits set in `words`.
pub fn bits_set(words: &[u64]) -> u64 {
    words.iter().map(|w| w.count_ones() as u64).sum()
}

/// Whether a filter with `set` bits, `live` of which the entries there are now would
/// set, is worth rebuilding: when the stale bits outnumber the live ones and are more
/// than 1 % of the filter (each stale bit makes the lookup that the filter is there to
/// spare for 1 in 1,048,576 packets of no flow).
pub fn needs_rebuild(set: u64, live: u64) -> bool {
    let stale = set.saturating_sub(live);
    stale > live && stale > CT_FILTER_BITS / 100
}

/// Bits of the filter.
pub const CT_FILTER_BITS: u64 = CT_FILTER_WORDS as u64 * 64;

/// What a rebuild did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rebuilt {
    /// Bits set before and after.
    pub before: u64,
    pub after: u64,
    /// Entries whose bits were set.
    pub entries: usize,
    /// The two grace periods' time, and the whole rebuild's.
    pub grace: std::time::Duration,
    pub took: std::time::Duration,
}

/// The filter, mapped into this process (`BPF_F_MMAPABLE`).
pub struct CtFilter {
    words: *mut AtomicU64,
    len: usize,
}

// SAFETY: the mapping is shared memory accessed through atomics only; it lives as long
// as the value (unmapped in Drop).
unsafe impl Send for CtFilter {}

impl CtFilter {
    /// Maps the filter of the map `fd` (the kernel keeps the map alive while mapped).
    pub fn map(fd: BorrowedFd<'_>) -> io::Result<Self> {
        let len = ((CT_FILTER_WORDS as usize + 1) * 8).next_multiple_of(page_size());
        // SAFETY: a fresh shared mapping of a BPF array created with BPF_F_MMAPABLE;
        // the kernel refuses (EINVAL, EPERM) any other map or a length past its pages.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("mapping {} into memory: {e}", lb_common::MAP_CT_FILTER),
            ));
        }
        Ok(Self {
            words: ptr.cast(),
            len,
        })
    }

    fn word(&self, i: u32) -> &AtomicU64 {
        assert!(i <= CT_FILTER_SWITCH);
        // SAFETY: i is within the mapping (CT_FILTER_WORDS + 1 words), which is aligned
        // to a page and lives as long as self.
        unsafe { &*self.words.add(i as usize) }
    }

    /// Whether the programs trust the filter.
    pub fn is_on(&self) -> bool {
        self.word(CT_FILTER_SWITCH).load(Ordering::SeqCst) == CT_FILTER_ON
    }

    /// The switch off: the programs look every packet up, as without a filter.
    pub fn turn_off(&self) {
        self.word(CT_FILTER_SWITCH).store(0, Ordering::SeqCst);
    }

    /// The bits' words now.
    pub fn snapshot(&self) -> Vec<u64> {
        (0..CT_FILTER_WORDS)
            .map(|i| self.word(i).load(Ordering::Relaxed))
            .collect()
    }

    /// Clears one bit of `key` (a test's way to make the filter lie).
    pub fn clear_bit(&self, key: &CtKey) {
        let (i, mask) = ct_filter_bit(key);
        self.word(i).fetch_and(!mask, Ordering::SeqCst);
    }

    /// Rebuilds the filter from the entries of the conntrack map `conntrack` (module
    /// comment), and turns it on.
    pub fn rebuild(&self, conntrack: &OwnedFd) -> io::Result<Rebuilt> {
        let t0 = std::time::Instant::now();
        let grace = Grace::new()?;
        let before = bits_set(&self.snapshot());
        self.turn_off();
        let g0 = std::time::Instant::now();
        grace.wait()?;
        let mut waited = g0.elapsed();
        for i in 0..CT_FILTER_WORDS {
            self.word(i).store(0, Ordering::SeqCst);
        }
        let g1 = std::time::Instant::now();
        grace.wait()?;
        waited += g1.elapsed();
        let entries: Vec<(CtKey, CtValue)> = batch::lookup_all_hash(conntrack)?;
        let want = words(entries.iter().map(|(k, _)| k));
        for (i, &w) in want.iter().enumerate() {
            if w != 0 {
                self.word(i as u32).fetch_or(w, Ordering::SeqCst);
            }
        }
        self.word(CT_FILTER_SWITCH)
            .store(CT_FILTER_ON, Ordering::SeqCst);
        Ok(Rebuilt {
            before,
            after: bits_set(&self.snapshot()),
            entries: entries.len(),
            grace: waited,
            took: t0.elapsed(),
        })
    }
}

impl Drop for CtFilter {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, of `len` bytes, not used after this.
        unsafe { libc::munmap(self.words.cast(), self.len) };
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as usize
    } else {
        4096
    }
}

/// A way to wait for a grace period: an array of one map, whose every update with a
/// map waits in the kernel (`maybe_wait_bpf_programs`: `synchronize_rcu()`) for the
/// BPF programs running to finish.
pub struct Grace {
    outer: OwnedFd,
    inner: OwnedFd,
}

const BPF_MAP_CREATE: libc::c_int = 0;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_ARRAY_OF_MAPS: u32 = 12;

#[repr(C)]
struct CreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
}

fn create_map(map_type: u32, inner_map_fd: u32) -> io::Result<OwnedFd> {
    let fd = sys_bpf(
        BPF_MAP_CREATE,
        &CreateAttr {
            map_type,
            key_size: 4,
            value_size: 4,
            max_entries: 1,
            map_flags: 0,
            inner_map_fd,
        },
    )?;
    // SAFETY: a new fd the kernel just returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

impl Grace {
    pub fn new() -> io::Result<Self> {
        let inner = create_map(BPF_MAP_TYPE_ARRAY, 0)
            .map_err(|e| io::Error::new(e.kind(), format!("grace period map: {e}")))?;
        let outer = create_map(BPF_MAP_TYPE_ARRAY_OF_MAPS, inner.as_fd().as_raw_fd() as u32)
            .map_err(|e| io::Error::new(e.kind(), format!("grace period map of maps: {e}")))?;
        Ok(Self { outer, inner })
    }

    /// Returns once every BPF program that was running when called has finished.
    pub fn wait(&self) -> io::Result<()> {
        let key = 0u32;
        let value = self.inner.as_raw_fd() as u32;
        sys_bpf(
            BPF_MAP_UPDATE_ELEM,
            &ElemAttr {
                map_fd: self.outer.as_raw_fd() as u32,
                _pad: 0,
                key: &key as *const u32 as u64,
                value: &value as *const u32 as u64,
                flags: 0,
            },
        )
        .map(|_| ())
        .map_err(|e| io::Error::new(e.kind(), format!("waiting for a grace period: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use lb_common::{ipv4_mapped, PROTO_TCP};

    use super::*;

    /// A flow from client 10.0.x.y (x.y = `client`) to 10.96.0.1:80.
    fn key(client: u16, client_port: u16) -> CtKey {
        let [x, y] = client.to_be_bytes();
        CtKey {
            src_addr: ipv4_mapped(u32::from_be_bytes([10, 0, x, y]).to_be()),
            dst_addr: ipv4_mapped(u32::from_be_bytes([10, 96, 0, 1]).to_be()),
            src_port: client_port.to_be(),
            dst_port: 80u16.to_be(),
            proto: PROTO_TCP,
            _pad: [0; 3],
        }
    }

    #[test]
    fn a_key_sets_one_bit_and_its_words_hold_every_key() {
        let keys: Vec<CtKey> = (1..=1000).map(|c| key(c, 40_000)).collect();
        let w = words(&keys);
        assert_eq!(w.len(), CT_FILTER_WORDS as usize);
        for k in &keys {
            let (i, mask) = ct_filter_bit(k);
            assert_ne!(w[i as usize] & mask, 0);
        }
        // A thousand clients: a thousand bits but for the few that share one.
        let set = bits_set(&w);
        assert!((990..=1000).contains(&set), "{set}");
        assert_eq!(bits_set(&words(&keys[..1])), 1);
        // The ports are not in the bit: one client's flows to one address share it.
        let one_client: Vec<CtKey> = (40_000..41_000).map(|p| key(7, p)).collect();
        assert_eq!(bits_set(&words(&one_client)), 1);
        assert_eq!(missing(&w, &keys), 0);
        // Half the keys' filter: the other half missing, but for a bit shared by chance.
        let half = words(&keys[..500]);
        assert_eq!(missing(&half, &keys[..500]), 0);
        let m = missing(&half, &keys[500..]);
        assert!((490..=500).contains(&m), "{m}");
    }

    #[test]
    fn the_filter_is_rebuilt_when_stale_bits_outnumber_live_ones_and_matter() {
        // An empty table after many flows: rebuilt.
        assert!(needs_rebuild(20_000, 0));
        // Stale bits fewer than 1 % of the filter: not worth two grace periods.
        assert!(!needs_rebuild(10_000, 0));
        // As many stale as live: kept.
        assert!(!needs_rebuild(100_000, 50_000));
        assert!(needs_rebuild(100_000, 40_000));
        assert!(!needs_rebuild(5, 10));
    }
}
