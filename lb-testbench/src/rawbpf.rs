//! The few bpf(2) calls the test bench makes on raw instructions, without an object
//! file (the programs are assembled here): the benchmark's XDP packet generator, and the
//! XDP program that passes every frame, which the sandbox's underlay puts on the
//! bridge's ports (a veth receives `XDP_TX` and redirected frames from its peer only
//! with an XDP program of its own: it is what gives the receiving side its NAPI ring).
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::{Error, Result};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;
const BPF_FUNC_GET_PRANDOM_U32: i32 = 7;
const BPF_FUNC_REDIRECT: i32 = 23;

/// One eBPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insn {
    pub code: u8,
    /// dst register in the low nibble, src in the high one.
    pub regs: u8,
    pub off: i16,
    pub imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: dst | (src << 4),
        off,
        imm,
    }
}

// Opcodes (class | size/op | mode/source).
const LDX_W: u8 = 0x61; // BPF_LDX | BPF_W | BPF_MEM
const STX_DW: u8 = 0x7b; // BPF_STX | BPF_DW | BPF_MEM
const ST_W: u8 = 0x62; // BPF_ST | BPF_W | BPF_MEM
const ST_H: u8 = 0x6a; // BPF_ST | BPF_H | BPF_MEM
const ST_B: u8 = 0x72; // BPF_ST | BPF_B | BPF_MEM
const LD_IMM64: u8 = 0x18; // BPF_LD | BPF_DW | BPF_IMM
const MOV64_REG: u8 = 0xbf; // BPF_ALU64 | BPF_MOV | BPF_X
const MOV64_IMM: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
const ADD64_IMM: u8 = 0x07; // BPF_ALU64 | BPF_ADD | BPF_K
const MOD64_IMM: u8 = 0x97; // BPF_ALU64 | BPF_MOD | BPF_K
const JGT_REG: u8 = 0x2d; // BPF_JMP | BPF_JGT | BPF_X
const JEQ_IMM: u8 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const JA: u8 = 0x05; // BPF_JMP | BPF_JA
const CALL: u8 = 0x85; // BPF_JMP | BPF_CALL
const EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT

/// Stores of `bytes` at `r2 + at` (r2: the packet's start), 8 bytes at a time
/// through r5, then 4, 2, 1.
fn stores(bytes: &[u8], at: usize) -> Vec<Insn> {
    let mut out = Vec::new();
    let mut off = 0;
    while off < bytes.len() {
        let rest = &bytes[off..];
        let o = (at + off) as i16;
        if rest.len() >= 8 {
            let v = u64::from_le_bytes(rest[..8].try_into().expect("8 bytes"));
            out.push(insn(LD_IMM64, 5, 0, 0, v as u32 as i32)); // r5 = v
            out.push(insn(0, 0, 0, 0, (v >> 32) as u32 as i32));
            out.push(insn(STX_DW, 2, 5, o, 0)); // *(u64 *)(r2 + o) = r5
            off += 8;
        } else if rest.len() >= 4 {
            let v = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes"));
            out.push(insn(ST_W, 2, 0, o, v as i32));
            off += 4;
        } else if rest.len() >= 2 {
            let v = u16::from_le_bytes(rest[..2].try_into().expect("2 bytes"));
            out.push(insn(ST_H, 2, 0, o, v as i32));
            off += 2;
        } else {
            out.push(insn(ST_B, 2, 0, o, rest[0] as i32));
            off += 1;
        }
    }
    out
}

/// An XDP program that picks one of `frames` at random (`bpf_get_prandom_u32() %
/// n`), writes it over the packet (when the packet is at least that long) and
/// returns `bpf_redirect(ifindex, 0)`. The frames must have one length and differ
/// in at most 8 bytes (the flows' UDP headers): the first frame is written whole,
/// then the other flows' 8 bytes through a table of jumps.
pub fn write_and_redirect(frames: &[Vec<u8>], ifindex: u32) -> Result<Vec<Insn>> {
    let first = frames.first().ok_or(Error::Sandbox("no frames".into()))?;
    let len = first.len();
    if len < 8 || frames.iter().any(|f| f.len() != len) || frames.len() > 64 {
        return Err(Error::Sandbox(
            "frames for the XDP generator: 1 to 64 of one length (8 bytes at least)".into(),
        ));
    }
    let differs = |i: usize| frames.iter().any(|f| f[i] != first[i]);
    let lo = (0..len).find(|&i| differs(i)).unwrap_or(0);
    let hi = (0..len).rev().find(|&i| differs(i)).map_or(0, |i| i + 1);
    if hi > lo + 8 {
        return Err(Error::Sandbox(format!(
            "the XDP generator's frames differ in bytes {lo}..{hi}, more than 8"
        )));
    }
    let at = lo.min(len - 8);
    let mut p = vec![
        insn(MOV64_REG, 6, 1, 0, 0),                   // r6 = ctx
        insn(CALL, 0, 0, 0, BPF_FUNC_GET_PRANDOM_U32), // r0 = random
        insn(MOV64_REG, 7, 0, 0, 0),                   // r7 = r0
        insn(MOD64_IMM, 7, 0, 0, frames.len() as i32), // r7 %= n
        insn(LDX_W, 2, 6, 0, 0),                       // r2 = ctx->data
        insn(LDX_W, 3, 6, 4, 0),                       // r3 = ctx->data_end
        insn(MOV64_REG, 4, 2, 0, 0),                   // r4 = r2
        insn(ADD64_IMM, 4, 0, 0, len as i32),          // r4 += len
    ];
    let bounds = p.len();
    p.push(insn(JGT_REG, 4, 3, 0, 0)); // if r4 > r3: to the redirect (patched)
    p.extend(stores(first, 0));
    // The jump table: flow k (1..n) to its block; flow 0 is written already.
    let table = p.len();
    for k in 1..frames.len() {
        p.push(insn(JEQ_IMM, 7, 0, 0, k as i32)); // patched
    }
    let to_end = p.len();
    p.push(insn(JA, 0, 0, 0, 0)); // patched
    let mut block_ends = Vec::new();
    for (k, f) in frames.iter().enumerate().skip(1) {
        let start = p.len();
        p[table + k - 1].off = (start - (table + k)) as i16;
        p.extend(stores(&f[at..at + 8], at));
        block_ends.push(p.len());
        p.push(insn(JA, 0, 0, 0, 0)); // patched
    }
    let redirect = p.len();
    p[bounds].off = (redirect - bounds - 1) as i16;
    p[to_end].off = (redirect - to_end - 1) as i16;
    for e in block_ends {
        p[e].off = (redirect - e - 1) as i16;
    }
    p.push(insn(MOV64_IMM, 1, 0, 0, ifindex as i32)); // r1 = ifindex
    p.push(insn(MOV64_IMM, 2, 0, 0, 0)); // r2 = 0
    p.push(insn(CALL, 0, 0, 0, BPF_FUNC_REDIRECT)); // r0 = bpf_redirect(r1, r2)
    p.push(insn(EXIT, 0, 0, 0, 0));
    Ok(p)
}

/// An XDP program that passes every frame (`return XDP_PASS`).
pub fn xdp_pass() -> Vec<Insn> {
    const XDP_PASS: i32 = 2;
    vec![
        insn(MOV64_IMM, 0, 0, 0, XDP_PASS), // r0 = XDP_PASS
        insn(EXIT, 0, 0, 0, 0),
    ]
}

/// Attaches `prog` to `ifindex` (of the calling thread's namespace) in generic (skb)
/// mode through a bpf link; the link detaches when its descriptor closes.
pub fn attach_xdp_generic(prog: &OwnedFd, ifindex: u32) -> Result<OwnedFd> {
    attach_xdp(prog, ifindex, XDP_FLAGS_SKB_MODE)
}

/// Attaches `prog` to `ifindex` in the driver's native mode (veth has one), as
/// `attach_xdp_generic`.
pub fn attach_xdp_native(prog: &OwnedFd, ifindex: u32) -> Result<OwnedFd> {
    attach_xdp(prog, ifindex, XDP_FLAGS_DRV_MODE)
}

fn attach_xdp(prog: &OwnedFd, ifindex: u32, flags: u32) -> Result<OwnedFd> {
    #[repr(C)]
    #[derive(Default)]
    struct LinkCreateAttr {
        prog_fd: u32,
        target_ifindex: u32,
        attach_type: u32,
        flags: u32,
    }
    let attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_ifindex: ifindex,
        attach_type: BPF_XDP,
        flags,
    };
    // SAFETY: `attr` is a valid BPF_LINK_CREATE attribute of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_CREATE,
            &attr as *const LinkCreateAttr,
            size_of::<LinkCreateAttr>(),
        )
    };
    if fd < 0 {
        return Err(Error::Sandbox(format!(
            "attaching an XDP program to interface {ifindex}: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: the kernel returned a new file descriptor that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `union bpf_attr` for BPF_PROG_LOAD, as far as the fields used.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `union bpf_attr` for BPF_PROG_TEST_RUN.
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// Loads an XDP program named `name` (at most 15 bytes); the verifier's log comes back
/// in the error.
pub fn load_xdp(name: &str, insns: &[Insn]) -> Result<OwnedFd> {
    let license = c"GPL";
    let mut log = vec![0u8; 64 * 1024];
    let mut prog_name = [0u8; 16];
    let n = name.len().min(15);
    prog_name[..n].copy_from_slice(&name.as_bytes()[..n]);
    let name = prog_name;
    let attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_XDP,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        prog_name: name,
        expected_attach_type: BPF_XDP,
        ..Default::default()
    };
    // SAFETY: `attr` is a valid BPF_PROG_LOAD attribute of the size passed; the
    // instructions, license and log buffer it points to outlive the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &attr as *const ProgLoadAttr,
            size_of::<ProgLoadAttr>(),
        )
    };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        return Err(Error::Sandbox(format!(
            "loading an XDP program: {e}; verifier: {}",
            String::from_utf8_lossy(&log[..end]).trim()
        )));
    }
    // SAFETY: the kernel returned a new file descriptor that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Runs `prog` on `repeat` live frames made from `data` (their verdicts carried out).
pub fn test_run_live(prog: &OwnedFd, data: &[u8], repeat: u32) -> std::io::Result<()> {
    let attr = TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: data.len() as u32,
        data_in: data.as_ptr() as u64,
        repeat,
        flags: BPF_F_TEST_XDP_LIVE_FRAMES,
        ..Default::default()
    };
    // SAFETY: `attr` is a valid BPF_PROG_TEST_RUN attribute of the size passed; the
    // data it points to outlives the call, and no output buffer is given.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &attr as *const TestRunAttr,
            size_of::<TestRunAttr>(),
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
