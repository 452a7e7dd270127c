//! `lb-testbench`: the test bench's commands, run by `cargo xtask demo`, `bench` and
//! `vm-test`. The product binary `lb` has none of these.
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use lb_testbench::{bench, demo, vmload};

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
    /// The workload of `cargo xtask vm-test`, run inside the VM: iperf3 to a pod IP, a
    /// ClusterIP and a NodePort.
    VmLoad {
        #[arg(long, default_value_t = 5)]
        seconds: u32,
        #[arg(long, default_value_t = 3)]
        repeats: usize,
    },
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Cmd::Demo { requests } => demo::run_demo(requests),
        Cmd::Bench(opts) => bench::run(&opts),
        Cmd::VmLoad { seconds, repeats } => vmload::run_vm_load(seconds, repeats),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
