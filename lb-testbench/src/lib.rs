//! The test bench of lb, apart from the product (as aya keeps `test/integration-test`
//! beside its crates): the product never links it.
//!
//! - `sandbox`: a node, its pods and "the outside" as network namespaces;
//! - `agent`: starting the real `lb` binary on a sandbox and waiting for it;
//! - `cgroup`: a cgroup a test makes for its clients (the socket programs act there);
//! - `sockclient`: the clients of the connect-time tests (`lb-testbench sock-client`);
//! - `fake_api`: an HTTP server that speaks the Kubernetes API's list and watch protocol
//!   to the real kube client;
//! - `packet`: crafted frames for BPF_PROG_TEST_RUN, and checksums to check them;
//! - `corpus`: malformed and adversarial frames, and the reference of what the datapath
//!   must make of each (the kernel tests' corpus);
//! - `rawbpf`: the few programs the bench assembles itself (no object file);
//! - `image`: the agent's container image as an OCI archive (`cargo xtask image`);
//! - `demo` (`cargo xtask demo`), `vmload` (the workload inside `cargo xtask vm-test`'s
//!   VM) and `bench` (`cargo xtask bench`).
//!
//! The tests of the kernel programs and the end-to-end tests live in `tests/`.
pub mod agent;
pub mod bench;
pub mod cgroup;
pub mod corpus;
pub mod demo;
pub mod fake_api;
pub mod image;
pub mod layout1;
pub mod packet;
pub mod rawbpf;
pub mod sandbox;
pub mod sockclient;
pub mod vmload;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("sandbox: {0}")]
    Sandbox(String),
    #[error(transparent)]
    Lb(#[from] lb_userspace::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
