//! `lb-testbench`: the test bench's commands, run by `cargo xtask demo`, `bench` and
//! `vm-test`. The product binary `lb` has none of these.
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use lb_testbench::{bench, demo, image, sockclient, vmload};

#[derive(Parser)]
#[command(name = "lb-testbench", version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The demo: a sandbox of network namespaces, three backends behind a ClusterIP and a
    /// NodePort, requests from a pod and from outside.
    Demo {
        #[arg(long, default_value_t = 12)]
        requests: usize,
    },
    /// The benchmark: this dataplane against no load balancer and kube-proxy's iptables
    /// and nftables modes; writes latest.md and latest.json.
    Bench(bench::Opts),
    /// The agent's container image (`cargo xtask image`): `lb` and the libraries it
    /// links, as an OCI archive, or as a root folder for deploy/Dockerfile.
    Image {
        /// The `lb` binary to ship.
        #[arg(long)]
        lb: std::path::PathBuf,
        /// Write the OCI archive here.
        #[arg(long, required_unless_present = "rootfs")]
        out: Option<std::path::PathBuf>,
        /// Write the image's files into this folder instead.
        #[arg(long, conflicts_with = "out")]
        rootfs: Option<std::path::PathBuf>,
        #[arg(long, default_value = env!("CARGO_PKG_VERSION"))]
        tag: String,
        /// The commit it is built from (a label).
        #[arg(long, default_value = "unknown")]
        revision: String,
        /// Every time in the archive, RFC 3339 (the commit's, for a reproducible image).
        #[arg(long, default_value = "1970-01-01T00:00:00Z")]
        created: String,
    },
    /// The workload of `cargo xtask vm-test`, run inside the VM: iperf3 to a pod IP, a
    /// ClusterIP and a NodePort.
    VmLoad {
        #[arg(long, default_value_t = 5)]
        seconds: u32,
        #[arg(long, default_value_t = 3)]
        repeats: usize,
    },
    /// A client of the connect-time tests: one exchange (`tcp`, `udp`, `udp-connected`)
    /// and what its socket calls report.
    SockClient {
        mode: String,
        to: std::net::SocketAddr,
        #[arg(long, default_value_t = 1)]
        repeat: usize,
        #[arg(long, default_value_t = 200)]
        interval_ms: u64,
    },
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Cmd::Demo { requests } => demo::run_demo(requests),
        Cmd::Bench(opts) => bench::run(&opts),
        Cmd::VmLoad { seconds, repeats } => vmload::run_vm_load(seconds, repeats),
        Cmd::SockClient {
            mode,
            to,
            repeat,
            interval_ms,
        } => sockclient::run(
            &mode,
            to,
            repeat,
            std::time::Duration::from_millis(interval_ms),
        ),
        Cmd::Image {
            lb,
            out,
            rootfs,
            tag,
            revision,
            created,
        } => match (out, rootfs) {
            (_, Some(dir)) => image::write_rootfs(&lb, &dir),
            (Some(out), None) => image::write_archive(
                &image::Spec {
                    lb,
                    tag,
                    revision,
                    created,
                },
                &out,
            )
            .map(|w| println!("{} {} {}", w.path.display(), w.reference, w.manifest_digest)),
            (None, None) => unreachable!("clap requires one"),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
