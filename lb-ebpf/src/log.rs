//! Debug logging, in a debug build of the programs only (`cargo xtask build-ebpf
//! --debug-log`, the `debug-log` feature): aya-log lines at a few decisions, which the
//! agent forwards to its own log (target `lb_ebpf`). Without the feature [`debug_log!`]
//! expands to nothing: the release object has no `AYA_LOGS` map, no format strings and
//! no instructions for them, so it verifies and runs exactly as without this file.

/// An aya-log line (info level) in a `debug-log` build; nothing otherwise. Its
/// arguments are not evaluated without the feature, so they must be plain reads.
#[cfg(feature = "debug-log")]
macro_rules! debug_log {
    ($ctx:expr, $($arg:tt)+) => {
        aya_log_ebpf::info!($ctx, $($arg)+)
    };
}

#[cfg(not(feature = "debug-log"))]
macro_rules! debug_log {
    ($ctx:expr, $($arg:tt)+) => {{
        let _ = $ctx;
    }};
}

pub(crate) use debug_log;

/// An address's 16 bytes as aya-log prints an IPv6 address (`{:i}`): IPv4 addresses
/// print IPv4-mapped (`::ffff:10.96.0.10`).
#[cfg(feature = "debug-log")]
#[inline(always)]
pub fn bytes(addr: &lb_common::Addr) -> [u8; 16] {
    // SAFETY: [u32; 4] and [u8; 16] have the same size, and any bits are valid bytes.
    unsafe { core::mem::transmute::<lb_common::Addr, [u8; 16]>(*addr) }
}
