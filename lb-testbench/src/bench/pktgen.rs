//! A packet-rate generator and a sink for the forwarding-rate runs (`forwarding`). The
//! kernel here has no pktgen module (CONFIG_NET_PKTGEN is off), so the generator is the
//! test bench's own: prebuilt Ethernet frames (small UDP datagrams, one source port per
//! flow) sent out of a veth from one thread pinned to one CPU, in one of two ways:
//!
//! - [`GenKind::XdpLive`] (the default): the way xdp-tools' `xdp-trafficgen` does it.
//!   A tiny XDP program, assembled here (it writes one of the flows' frames, picked at
//!   random, into the packet and returns `bpf_redirect(eth0)`), run by
//!   BPF_PROG_TEST_RUN with `BPF_F_TEST_XDP_LIVE_FRAMES`: the kernel runs it on frames
//!   of its own and acts on the verdict, so each frame leaves by the veth's XDP
//!   transmit and reaches the peer (the node's eth0) as an XDP frame, not an skb, as a
//!   NIC's driver receives a frame: an XDP program there runs on it in place, and
//!   without one the veth builds an skb around it. Millions of frames a second from one
//!   core. The program is also attached (generic XDP) to a spare veth that carries no
//!   traffic: a test run installs its program in the kernel's XDP dispatcher and
//!   removes it afterwards, waiting for an RCU grace period each time (tens of
//!   milliseconds), unless the program is there already.
//! - [`GenKind::AfPacket`]: an AF_PACKET socket, `sendmmsg` of 64 frames a call past
//!   the qdisc (`PACKET_QDISC_BYPASS`). Each frame is an skb; a veth hands an XDP
//!   program on its peer an skb, which it first copies into a page with XDP's headroom.
//!
//! The XDP program writes the whole frame every time: the kernel recycles a frame's
//! page once the receiver is done with it, with whatever a NAT on the way wrote into it.
//!
//! The sink is a UDP socket in the backend pod, drained with `recvmmsg` by a thread
//! pinned to a CPU of choice: a bound socket keeps the pod from answering every datagram
//! with an ICMP port unreachable.
use std::{
    ffi::CString,
    net::{Ipv4Addr, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    process::Command,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::{packet, rawbpf as bpf, Error, Result};

/// The spare veth (in the generator's namespace) its XDP program is attached to.
const ANCHOR: &str = "lbgen0";
/// Frame length without the FCS: 64 bytes on a wire.
pub const FRAME_LEN: usize = 60;
/// Frames per `sendmmsg` / `recvmmsg` call.
const BATCH: usize = 64;

/// One 60-byte Ethernet + IPv4 + UDP frame per flow: source ports `first_sport..`,
/// valid IPv4 and UDP checksums, an 18-byte payload.
pub fn udp_frames(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    dport: u16,
    first_sport: u16,
    flows: u16,
) -> Vec<Vec<u8>> {
    (0..flows)
        .map(|i| {
            let spec = packet::Spec {
                proto: packet::UDP,
                tcp_flags: 0,
                ack: 0,
                payload: vec![0x5a; FRAME_LEN - 14 - 20 - 8],
                ..packet::Spec::tcp_v4(src, first_sport + i, dst, dport, 0)
            };
            let mut f = spec.build();
            f[..6].copy_from_slice(&dst_mac);
            f[6..12].copy_from_slice(&src_mac);
            f
        })
        .collect()
}

/// "aa:bb:cc:dd:ee:ff" as bytes.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.trim().split(':');
    for b in &mut mac {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

fn os_err(what: &str) -> Error {
    Error::Sandbox(format!("{what}: {}", std::io::Error::last_os_error()))
}

/// Pins task `tid` (0: the calling thread) to `cpu`.
pub fn pin_to_cpu(tid: i32, cpu: usize) -> Result<()> {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is below CPU_SETSIZE (callers pass a CPU of this machine).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed.
    let r = unsafe { libc::sched_setaffinity(tid, size_of_val(&set), &set) };
    if r != 0 {
        return Err(os_err(&format!("sched_setaffinity({tid}, CPU {cpu})")));
    }
    Ok(())
}

/// Gives the calling thread the highest nice level (-20): on a busy machine it keeps
/// its CPU, so the node's receive ring never runs dry between its time slices.
fn raise_priority() -> Result<()> {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    // SAFETY: setpriority on our own thread's id.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, -20) } != 0 {
        return Err(os_err("setpriority(-20)"));
    }
    Ok(())
}

/// Makes task `tid` a real-time task (SCHED_FIFO at `priority`): it runs whenever it
/// has work, ahead of the machine's other (SCHED_OTHER) tasks on its CPU, within the
/// kernel's real-time throttling (by default 95% of each second).
pub fn set_fifo(tid: i32, priority: i32) -> Result<()> {
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: `param` is a valid sched_param.
    let r = unsafe { libc::sched_setscheduler(tid, libc::SCHED_FIFO, &param) };
    if r != 0 {
        return Err(os_err(&format!(
            "sched_setscheduler({tid}, SCHED_FIFO {priority})"
        )));
    }
    Ok(())
}

/// The scheduling policy and real-time priority of task `tid`.
pub fn scheduler(tid: i32) -> Result<(i32, i32)> {
    // SAFETY: plain syscall on a pid.
    let policy = unsafe { libc::sched_getscheduler(tid) };
    if policy < 0 {
        return Err(os_err(&format!("sched_getscheduler({tid})")));
    }
    let mut param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid, writable sched_param.
    if unsafe { libc::sched_getparam(tid, &mut param) } != 0 {
        return Err(os_err(&format!("sched_getparam({tid})")));
    }
    Ok((policy, param.sched_priority))
}

/// The CPUs task `tid` (0: the calling thread) may run on.
pub fn allowed_cpus(tid: i32) -> Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable cpu_set_t of the size passed.
    let r = unsafe { libc::sched_getaffinity(tid, size_of_val(&set), &mut set) };
    if r != 0 {
        return Err(os_err(&format!("sched_getaffinity({tid})")));
    }
    // SAFETY: `set` was filled by the kernel; CPU_ISSET reads it.
    Ok((0..libc::CPU_SETSIZE as usize)
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect())
}

/// How the generator puts frames on the wire (see the module's documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum GenKind {
    XdpLive,
    AfPacket,
}

impl GenKind {
    pub fn describe(self) -> &'static str {
        match self {
            GenKind::XdpLive => "BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES of an XDP program that writes the frame and redirects it out of the outside namespace's eth0 (as xdp-trafficgen does): the node's eth0 receives XDP frames, as a NIC's driver does",
            GenKind::AfPacket => "an AF_PACKET socket, sendmmsg of 64 frames a call past the qdisc: the node's eth0 receives skbs (an XDP program there gets a copy)",
        }
    }
}

/// A thread that sets itself up (in a namespace, pinned to a CPU) before `spawn`
/// returns, then works until stopped, counting what it did where the caller reads it
/// live. Dropped, it is stopped and joined.
struct Worker<T> {
    what: &'static str,
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
    handle: Option<JoinHandle<Result<T>>>,
}

impl<T: Send + 'static> Worker<T> {
    /// Runs `setup` on a new thread and returns once it succeeded (or with its error);
    /// the thread then runs `work` on what `setup` made until the stop flag is set.
    fn spawn<S>(
        what: &'static str,
        setup: impl FnOnce() -> Result<S> + Send + 'static,
        work: impl FnOnce(S, &AtomicBool, &AtomicU64) -> Result<T> + Send + 'static,
    ) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        let (stop2, count2) = (stop.clone(), count.clone());
        let handle = std::thread::spawn(move || -> Result<T> {
            let state = match setup() {
                Ok(s) => {
                    let _ = ready_tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return Err(Error::Sandbox(format!("{what}: set-up failed")));
                }
            };
            work(state, &stop2, &count2)
        });
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Self {
                what,
                stop,
                count,
                handle: Some(handle),
            }),
            Ok(Err(e)) => {
                let _ = handle.join();
                Err(e)
            }
            Err(_) => Err(Error::Sandbox(format!("{what} thread died"))),
        }
    }

    fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Stops the thread; what its work returned.
    fn stop(mut self) -> Result<T> {
        self.stop.store(true, Ordering::Relaxed);
        let what = self.what;
        self.handle
            .take()
            .expect("running")
            .join()
            .map_err(|_| Error::Sandbox(format!("{what} thread panicked")))?
    }
}

impl<T> Drop for Worker<T> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// A running generator; [`Generator::stop`] ends it.
pub struct Generator(Worker<GenStats>);

/// What a generator did.
#[derive(Clone, Debug, Default)]
pub struct GenStats {
    /// Frames put on the wire (AF_PACKET: taken by the socket; XDP: run and redirected).
    pub sent: u64,
    /// AF_PACKET: frames refused (ENOBUFS: the veth's ring towards the node was full).
    pub refused: u64,
    /// The CPUs the sending thread was allowed on, read back after pinning.
    pub cpus: Vec<usize>,
    /// Send calls (`sendmmsg` or BPF_PROG_TEST_RUN) and the seconds spent in them.
    pub calls: u64,
    pub secs_in_calls: f64,
    /// Seconds from the first call to the stop.
    pub secs: f64,
}

impl Generator {
    /// Starts sending `frames` (round robin) out of `ifname` in `netns` from a thread
    /// pinned to `cpu`; returns once the socket or programs are ready.
    pub fn start(
        kind: GenKind,
        netns: &str,
        ifname: &str,
        frames: Vec<Vec<u8>>,
        cpu: usize,
    ) -> Result<Self> {
        if kind == GenKind::XdpLive {
            return Self::start_xdp(netns, ifname, frames, cpu);
        }
        if frames.is_empty() {
            return Err(Error::Sandbox("packet generator: no frames".into()));
        }
        let (netns, ifname) = (netns.to_string(), ifname.to_string());
        let first = frames[0].clone();
        let setup = move || -> Result<(OwnedFd, libc::sockaddr_ll, Vec<usize>)> {
            crate::sandbox::enter(&netns)?;
            pin_to_cpu(0, cpu)?;
            raise_priority()?;
            let cpus = allowed_cpus(0)?;
            let (fd, addr) = packet_socket(&ifname, &first)?;
            Ok((fd, addr, cpus))
        };
        let work = move |(fd, mut addr, cpus): (OwnedFd, libc::sockaddr_ll, Vec<usize>),
                         stop: &AtomicBool,
                         sent: &AtomicU64|
              -> Result<GenStats> {
            if cpus != [cpu] {
                return Err(Error::Sandbox(format!(
                    "packet generator: pinned to CPU {cpu}, allowed on {cpus:?}"
                )));
            }
            let mut iov: Vec<libc::iovec> = (0..BATCH)
                .map(|i| {
                    let f = &frames[i % frames.len()];
                    libc::iovec {
                        iov_base: f.as_ptr() as *mut libc::c_void,
                        iov_len: f.len(),
                    }
                })
                .collect();
            let addr_ptr: *mut libc::sockaddr_ll = &mut addr;
            let mut stats = GenStats {
                cpus,
                ..Default::default()
            };
            let mut msgs: Vec<libc::mmsghdr> = iov
                .iter_mut()
                .map(|v| {
                    // SAFETY: msghdr is plain data; zeroed means no control data, no flags.
                    let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
                    h.msg_name = addr_ptr as *mut libc::c_void;
                    h.msg_namelen = size_of::<libc::sockaddr_ll>() as u32;
                    h.msg_iov = v;
                    h.msg_iovlen = 1;
                    libc::mmsghdr {
                        msg_hdr: h,
                        msg_len: 0,
                    }
                })
                .collect();
            while !stop.load(Ordering::Relaxed) {
                // SAFETY: `msgs` holds BATCH headers whose name, iovecs and frames
                // (`addr`, `iov`, `frames`) outlive the call; the kernel only reads them.
                let n =
                    unsafe { libc::sendmmsg(fd.as_raw_fd(), msgs.as_mut_ptr(), BATCH as u32, 0) };
                // Offered: the frames taken, and the one refused after them (ENOBUFS: the
                // veth's ring towards the node is full).
                if n == BATCH as i32 {
                    stats.sent += BATCH as u64;
                    sent.fetch_add(BATCH as u64, Ordering::Relaxed);
                    continue;
                }
                let e = std::io::Error::last_os_error();
                if n < 0
                    && !matches!(
                        e.raw_os_error(),
                        Some(libc::ENOBUFS | libc::EAGAIN | libc::EINTR)
                    )
                {
                    return Err(Error::Sandbox(format!("packet generator: sendmmsg: {e}")));
                }
                let taken = n.max(0) as u64;
                stats.sent += taken;
                stats.refused += 1;
                sent.fetch_add(taken + 1, Ordering::Relaxed);
            }
            Ok(stats)
        };
        Worker::spawn("packet generator", setup, work).map(Self)
    }

    /// Frames offered so far: sent, and (AF_PACKET) refused.
    pub fn offered(&self) -> u64 {
        self.0.count()
    }

    pub fn stop(self) -> Result<GenStats> {
        self.0.stop()
    }
}

impl Generator {
    fn start_xdp(netns: &str, ifname: &str, frames: Vec<Vec<u8>>, cpu: usize) -> Result<Self> {
        if frames.is_empty() {
            return Err(Error::Sandbox("packet generator: no frames".into()));
        }
        let (netns, ifname) = (netns.to_string(), ifname.to_string());
        let first = frames[0].clone();
        let setup = move || -> Result<((OwnedFd, OwnedFd), Vec<usize>)> {
            crate::sandbox::enter(&netns)?;
            pin_to_cpu(0, cpu)?;
            raise_priority()?;
            let cpus = allowed_cpus(0)?;
            let name = CString::new(ifname.as_str()).map_err(|e| Error::Sandbox(e.to_string()))?;
            // SAFETY: `name` is a NUL-terminated string.
            let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
            if ifindex == 0 {
                return Err(os_err(&format!("interface {ifname}")));
            }
            let prog = bpf::load_xdp("lbbench_gen", &bpf::write_and_redirect(&frames, ifindex)?)?;
            // The spare veth that keeps the program in the XDP dispatcher.
            let _ = Command::new("ip")
                .args(["-n", &netns, "link", "add", ANCHOR, "type", "veth"])
                .args(["peer", "name", "lbgen1"])
                .output();
            let anchor = CString::new(ANCHOR).expect("no NUL");
            // SAFETY: `anchor` is a NUL-terminated string.
            let anchor = unsafe { libc::if_nametoindex(anchor.as_ptr()) };
            if anchor == 0 {
                return Err(os_err(&format!("interface {ANCHOR} in {netns}")));
            }
            let link = bpf::attach_xdp_generic(&prog, anchor)?;
            Ok(((prog, link), cpus))
        };
        let work = move |((prog, _link), cpus): ((OwnedFd, OwnedFd), Vec<usize>),
                         stop: &AtomicBool,
                         sent: &AtomicU64|
              -> Result<GenStats> {
            if cpus != [cpu] {
                return Err(Error::Sandbox(format!(
                    "packet generator: pinned to CPU {cpu}, allowed on {cpus:?}"
                )));
            }
            let mut stats = GenStats {
                cpus,
                ..Default::default()
            };
            // A million frames a call (a few hundred ms): each call sets up and tears
            // down a page pool, which takes milliseconds (an RCU grace period) with no
            // frame sent; the node's ring would run dry in each such gap. A stop is seen
            // at the end of the call.
            const REPEAT: u32 = 1 << 20;
            let t0 = std::time::Instant::now();
            while !stop.load(Ordering::Relaxed) {
                let t = std::time::Instant::now();
                let r = bpf::test_run_live(&prog, &first, REPEAT);
                stats.calls += 1;
                stats.secs_in_calls += t.elapsed().as_secs_f64();
                stats.secs = t0.elapsed().as_secs_f64();
                match r {
                    Ok(()) => {
                        stats.sent += REPEAT as u64;
                        sent.fetch_add(REPEAT as u64, Ordering::Relaxed);
                    }
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                    Err(e) => {
                        return Err(Error::Sandbox(format!(
                            "packet generator: BPF_PROG_TEST_RUN (XDP live frames): {e}"
                        )))
                    }
                }
            }
            Ok(stats)
        };
        Worker::spawn("packet generator", setup, work).map(Self)
    }
}

/// An AF_PACKET socket that receives nothing (protocol 0) and sends past the qdisc, and
/// the address of `ifname` to send to (the frame's own destination MAC).
fn packet_socket(ifname: &str, frame: &[u8]) -> Result<(OwnedFd, libc::sockaddr_ll)> {
    // SAFETY: plain socket(2) call.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(os_err("socket(AF_PACKET)"));
    }
    // SAFETY: `raw` is a socket we own from here on.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let one: libc::c_int = 1;
    // SAFETY: `one` is a c_int of the size passed.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            &one as *const libc::c_int as *const libc::c_void,
            size_of::<libc::c_int>() as u32,
        )
    };
    if r != 0 {
        return Err(os_err("setsockopt(PACKET_QDISC_BYPASS)"));
    }
    let name = CString::new(ifname).map_err(|e| Error::Sandbox(e.to_string()))?;
    // SAFETY: `name` is a NUL-terminated string.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(os_err(&format!("interface {ifname}")));
    }
    let mut addr_mac = [0u8; 8];
    addr_mac[..6].copy_from_slice(&frame[..6]);
    let addr = libc::sockaddr_ll {
        sll_family: libc::AF_PACKET as u16,
        sll_protocol: (libc::ETH_P_IP as u16).to_be(),
        sll_ifindex: ifindex as i32,
        sll_hatype: 0,
        sll_pkttype: 0,
        sll_halen: 6,
        sll_addr: addr_mac,
    };
    Ok((fd, addr))
}

/// A UDP socket bound in a pod, drained by a pinned thread.
pub struct Sink(Worker<()>);

impl Sink {
    /// Binds UDP `port` in `netns` and drains it from a thread pinned to `cpu`.
    pub fn start(netns: &str, port: u16, cpu: usize) -> Result<Self> {
        let netns = netns.to_string();
        let setup = move || -> Result<UdpSocket> {
            crate::sandbox::enter(&netns)?;
            pin_to_cpu(0, cpu)?;
            let s = UdpSocket::bind(("0.0.0.0", port))
                .map_err(|e| Error::Sandbox(format!("udp {port} in {netns}: {e}")))?;
            s.set_read_timeout(Some(Duration::from_millis(100)))
                .map_err(|e| Error::Sandbox(e.to_string()))?;
            Ok(s)
        };
        let work = |sock: UdpSocket, stop: &AtomicBool, received: &AtomicU64| -> Result<()> {
            let mut bufs = vec![[0u8; 128]; BATCH];
            let mut iov: Vec<libc::iovec> = bufs
                .iter_mut()
                .map(|b| libc::iovec {
                    iov_base: b.as_mut_ptr() as *mut libc::c_void,
                    iov_len: b.len(),
                })
                .collect();
            let mut msgs: Vec<libc::mmsghdr> = iov
                .iter_mut()
                .map(|v| {
                    // SAFETY: msghdr is plain data; zeroed means no name, no control data.
                    let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
                    h.msg_iov = v;
                    h.msg_iovlen = 1;
                    libc::mmsghdr {
                        msg_hdr: h,
                        msg_len: 0,
                    }
                })
                .collect();
            while !stop.load(Ordering::Relaxed) {
                // SAFETY: `msgs` holds BATCH headers whose iovecs point into `bufs`, all
                // alive and writable for the call. The socket's receive timeout bounds
                // the wait for the first datagram.
                let n = unsafe {
                    libc::recvmmsg(
                        sock.as_raw_fd(),
                        msgs.as_mut_ptr(),
                        BATCH as u32,
                        libc::MSG_WAITFORONE,
                        std::ptr::null_mut(),
                    )
                };
                if n > 0 {
                    received.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
            Ok(())
        };
        Worker::spawn("sink", setup, work).map(Self)
    }

    /// Datagrams read so far.
    pub fn received(&self) -> u64 {
        self.0.count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_small_valid_udp_one_port_per_flow() {
        let src = [0x02, 0, 0, 0, 0, 1];
        let dst = [0x02, 0, 0, 0, 0, 2];
        let frames = udp_frames(
            src,
            dst,
            Ipv4Addr::new(192, 168, 50, 2),
            Ipv4Addr::new(192, 168, 50, 1),
            30009,
            40000,
            16,
        );
        assert_eq!(frames.len(), 16);
        for (i, f) in frames.iter().enumerate() {
            assert_eq!(f.len(), FRAME_LEN);
            assert_eq!(&f[..6], &dst);
            assert_eq!(&f[6..12], &src);
            assert_eq!(&f[12..14], &[0x08, 0x00]);
            packet::assert_checksums(f);
            let v = packet::view(f);
            assert_eq!(v.proto, packet::UDP);
            assert_eq!((v.sport, v.dport), (40000 + i as u16, 30009));
            assert_eq!(u16::from_be_bytes([f[16], f[17]]), 46, "IP total length");
            assert_eq!(u16::from_be_bytes([f[38], f[39]]), 26, "UDP length");
            assert_ne!(&f[40..42], &[0, 0], "a UDP checksum, not none");
        }
    }

    /// Runs the generator's program as the kernel would, for one value of the random
    /// number: the bytes it leaves in a packet and the interface it redirects to.
    fn interpret(p: &[bpf::Insn], random: u32, packet: &mut [u8]) -> u32 {
        let mut r = [0u64; 11];
        let mut pc = 0;
        loop {
            let i = p[pc];
            let (dst, src) = ((i.regs & 0xf) as usize, (i.regs >> 4) as usize);
            pc += 1;
            match i.code {
                0xbf => r[dst] = r[src],
                0xb7 => r[dst] = i.imm as u32 as u64,
                0x07 => r[dst] = r[dst].wrapping_add(i.imm as i64 as u64),
                0x97 => r[dst] %= i.imm as u64,
                // ctx->data is offset 0 of the packet here, data_end its length.
                0x61 => r[dst] = if i.off == 0 { 0 } else { packet.len() as u64 },
                0x85 if i.imm == 7 => r[0] = random as u64,
                0x85 if i.imm == 23 => r[0] = r[1],
                0x2d => {
                    if r[dst] > r[src] {
                        pc = (pc as i64 + i.off as i64) as usize;
                    }
                }
                0x15 => {
                    if r[dst] == i.imm as u64 {
                        pc = (pc as i64 + i.off as i64) as usize;
                    }
                }
                0x05 => pc = (pc as i64 + i.off as i64) as usize,
                0x18 => {
                    r[dst] = (i.imm as u32 as u64) | ((p[pc].imm as u32 as u64) << 32);
                    pc += 1;
                }
                0x7b => {
                    let at = (r[dst] as i64 + i.off as i64) as usize;
                    packet[at..at + 8].copy_from_slice(&r[src].to_le_bytes());
                }
                0x62 => {
                    let at = (r[dst] as i64 + i.off as i64) as usize;
                    packet[at..at + 4].copy_from_slice(&(i.imm as u32).to_le_bytes());
                }
                0x95 => return r[0] as u32,
                c => panic!("unexpected opcode {c:#x}"),
            }
        }
    }

    #[test]
    fn the_xdp_program_writes_a_random_flow_then_redirects() {
        let frames = udp_frames(
            [2, 0, 0, 0, 0, 1],
            [2, 0, 0, 0, 0, 2],
            Ipv4Addr::new(192, 168, 50, 2),
            Ipv4Addr::new(192, 168, 50, 1),
            30009,
            40000,
            16,
        );
        let p = bpf::write_and_redirect(&frames, 7).unwrap();
        for random in [0, 1, 5, 15, 16, 17, 1234567] {
            let mut packet = vec![0xffu8; FRAME_LEN];
            assert_eq!(interpret(&p, random, &mut packet), 7, "redirected to eth0");
            assert_eq!(packet, frames[random as usize % 16], "random {random}");
        }
        // A packet shorter than the frame is left alone (the verifier's bounds).
        let mut short = vec![0xffu8; FRAME_LEN - 1];
        assert_eq!(interpret(&p, 3, &mut short), 7);
        assert!(short.iter().all(|&b| b == 0xff));
        // Frames that differ in more than 8 bytes are refused.
        let other = udp_frames(
            [2, 0, 0, 0, 0, 1],
            [2, 0, 0, 0, 0, 2],
            Ipv4Addr::new(192, 168, 50, 2),
            Ipv4Addr::new(10, 244, 0, 11),
            9,
            40000,
            1,
        );
        assert!(bpf::write_and_redirect(&[frames[0].clone(), other[0].clone()], 7).is_err());
    }

    #[test]
    fn macs_parse() {
        assert_eq!(
            parse_mac("ee:ee:ee:ee:ee:0f"),
            Some([0xee, 0xee, 0xee, 0xee, 0xee, 0x0f])
        );
        assert_eq!(parse_mac("ee:ee:ee:ee:ee"), None);
        assert_eq!(parse_mac("ee:ee:ee:ee:ee:ee:ee"), None);
        assert_eq!(parse_mac("zz:ee:ee:ee:ee:ee"), None);
    }
}
