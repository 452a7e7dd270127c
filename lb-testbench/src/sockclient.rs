//! The clients of the connect-time tests (`lb-testbench sock-client MODE ADDR`), run in
//! a test's cgroup: one exchange with a Service, and one line of what the client's own
//! socket calls report (so a test sees what the application sees):
//! `peer=<getpeername> from=<recvfrom's source> reply=<text>`.
//!
//! - `tcp`: connect, "GET /" over HTTP/1.0, read the answer's body;
//! - `udp`: an unconnected socket, sendto and recvfrom ("who?", the UDP responders'
//!   question); `peer=-`;
//! - `udp-connected`: connect, send and recv, getpeername; with `--repeat N` every
//!   `--interval-ms` on the same socket, one line each, stopping at the first error
//!   (`error=<kind>`), as a resolver with one long-lived socket would.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use crate::{Error, Result};

fn io(e: std::io::Error) -> Error {
    Error::Sandbox(e.to_string())
}

pub fn run(mode: &str, to: SocketAddr, repeat: usize, interval: Duration) -> Result<()> {
    let any: SocketAddr = if to.is_ipv6() {
        "[::]:0".parse().expect("an address")
    } else {
        "0.0.0.0:0".parse().expect("an address")
    };
    match mode {
        "tcp" => {
            let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3)).map_err(io)?;
            s.set_read_timeout(Some(Duration::from_secs(3)))
                .map_err(io)?;
            let peer = s.peer_addr().map_err(io)?;
            s.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
                .map_err(io)?;
            let mut out = String::new();
            s.read_to_string(&mut out).map_err(io)?;
            let body = out.split("\r\n\r\n").nth(1).unwrap_or("").trim();
            println!("peer={peer} from={peer} reply={body}");
        }
        "udp" => {
            let s = UdpSocket::bind(any).map_err(io)?;
            s.set_read_timeout(Some(Duration::from_secs(3)))
                .map_err(io)?;
            s.send_to(b"who?", to).map_err(io)?;
            let mut buf = [0u8; 256];
            let (n, from) = s.recv_from(&mut buf).map_err(io)?;
            let text = String::from_utf8_lossy(&buf[..n]);
            println!("peer=- from={from} reply={}", text.trim());
        }
        "udp-connected" => {
            let s = UdpSocket::bind(any).map_err(io)?;
            s.set_read_timeout(Some(Duration::from_millis(1000)))
                .map_err(io)?;
            s.connect(to).map_err(io)?;
            for i in 0..repeat.max(1) {
                if i > 0 {
                    std::thread::sleep(interval);
                }
                let mut buf = [0u8; 256];
                let r = s
                    .send(b"who?")
                    .and_then(|_| s.recv_from(&mut buf))
                    .and_then(|(n, from)| Ok((n, from, s.peer_addr()?)));
                match r {
                    Ok((n, from, peer)) => {
                        let text = String::from_utf8_lossy(&buf[..n]);
                        println!("peer={peer} from={from} reply={}", text.trim());
                    }
                    Err(e) => {
                        println!("error={:?} ({e})", e.kind());
                        break;
                    }
                }
                let _ = std::io::stdout().flush();
            }
        }
        other => return Err(Error::Sandbox(format!("no sock-client mode {other}"))),
    }
    Ok(())
}
