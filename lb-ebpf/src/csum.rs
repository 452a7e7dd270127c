//! Internet checksums (RFC 1071), in one place for every rewrite and every packet built
//! from scratch: folding a 32-bit sum, incremental updates of a field (RFC 1624), and
//! the sum of a header held on the stack.
//!
//! Words are taken in memory order as loaded: one's-complement sums do not depend on
//! byte order, as long as the checksum and the fields are loaded the same way.
use aya_ebpf::helpers::bpf_csum_diff;
use lb_common::Addr;

/// Folds a 32-bit one's-complement sum to 16 bits (not complemented).
#[inline(always)]
pub fn fold(mut s: u32) -> u16 {
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// RFC 1624 eqn. 3, `HC' = ~(~HC + ~m + m')`, for one 32-bit field (two 16-bit words).
#[inline(always)]
pub fn replace4(csum: u16, old: u32, new: u32) -> u16 {
    let s = (!csum) as u32
        + (!(old as u16)) as u32
        + (!((old >> 16) as u16)) as u32
        + (new & 0xffff)
        + (new >> 16);
    !fold(s)
}

/// RFC 1624 eqn. 3 for a 16-byte field (an IPv6 address: eight 16-bit words).
#[inline(always)]
pub fn replace16(csum: u16, old: &Addr, new: &Addr) -> u16 {
    let mut s = (!csum) as u32;
    for i in 0..4 {
        s += (!(old[i] as u16)) as u32
            + (!((old[i] >> 16) as u16)) as u32
            + (new[i] & 0xffff)
            + (new[i] >> 16);
    }
    !fold(s)
}

/// The one's-complement difference `new - old` of two 16-byte fields, unfolded, as the
/// tc helpers take it (`l4_csum_replace` with size 0: "diff mode").
#[inline(always)]
pub fn diff16(old: &Addr, new: &Addr) -> u32 {
    // SAFETY: both are 16-byte stack objects; nothing is written.
    unsafe {
        bpf_csum_diff(
            old as *const Addr as *mut u32,
            size_of::<Addr>() as u32,
            new as *const Addr as *mut u32,
            size_of::<Addr>() as u32,
            0,
        ) as u32
    }
}

/// RFC 1624 eqn. 3 for one 16-bit field.
#[inline(always)]
pub fn replace2(csum: u16, old: u16, new: u16) -> u16 {
    !fold((!csum) as u32 + (!old) as u32 + new as u32)
}

/// One's-complement sum of `size_of::<T>()` bytes (a multiple of 4) of a value on the
/// stack, added to `seed` (the kernel's `bpf_csum_diff`, which the verifier accepts for
/// stack memory of a known size).
#[inline(always)]
pub fn sum<T>(v: &T, seed: u32) -> u32 {
    // SAFETY: `v` is a valid stack object of the given size; nothing is written.
    unsafe {
        bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            v as *const T as *mut u32,
            size_of::<T>() as u32,
            seed,
        ) as u32
    }
}

/// The checksum field of a header whose one's-complement sum is `sum`.
#[inline(always)]
pub fn finish(sum: u32) -> u16 {
    !fold(sum)
}
