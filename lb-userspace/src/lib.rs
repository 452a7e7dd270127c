//! lb: a Kubernetes Service load balancer whose dataplane runs in eBPF.
//!
//! Data flows one way: a source (`config` file, or the Kubernetes watch in `k8s`) fills
//! the `model`, which yields the desired map entries; `dataplane` diffs them against the
//! maps and applies the difference; `loader` loads, pins and attaches the programs;
//! `run` is the standalone agent's loop; `show` prints what is in the maps; `trace`
//! follows the datapath's decisions as they happen; `sockets` the socket programs
//! (connect-time balancing);
//! `healthcheck` serves the Services' health check node ports; `upgrade` migrates (or
//! refuses) maps pinned by an agent of another layout.
pub mod config;
pub mod dataplane;
pub mod ebpf_log;
pub mod healthcheck;
pub mod k8s;
pub mod loader;
pub mod model;
pub mod netns;
pub mod podpath;
pub mod run;
pub mod show;
pub mod sockets;
pub mod trace;
pub mod upgrade;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid config: {0}")]
    Config(String),
    #[error("map: {0}")]
    Map(String),
    #[error("load: {0}")]
    Load(String),
    #[error("attach: {0}")]
    Attach(String),
    #[error("network namespace: {0}")]
    Netns(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
