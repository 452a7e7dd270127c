use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use lb_common::{
    DEFAULT_MAX_BACKENDS, DEFAULT_MAX_CONNTRACK, DEFAULT_MAX_FRONTENDS, DEFAULT_MAX_SLOTS,
    DEFAULT_MAX_SOURCE_RANGES,
};
use lb_userspace::{
    config, k8s,
    loader::{LoadOptions, DEFAULT_PIN_DIR},
    netns, run, show,
};

/// Kubernetes Service load balancer with an eBPF dataplane.
#[derive(Parser)]
#[command(name = "lb", version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Args, Clone)]
struct MapArgs {
    /// bpffs folder for the maps, program and links.
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// Size of the frontend map (Service IP:port:protocol).
    #[arg(long, default_value_t = DEFAULT_MAX_FRONTENDS)]
    max_frontends: u32,
    /// Size of the backend map.
    #[arg(long, default_value_t = DEFAULT_MAX_BACKENDS)]
    max_backends: u32,
    /// Size of the slot map (one entry per ready backend of each frontend).
    #[arg(long, default_value_t = DEFAULT_MAX_SLOTS)]
    max_slots: u32,
    /// Size of the conntrack LRU map (two entries per flow).
    #[arg(long, default_value_t = DEFAULT_MAX_CONNTRACK)]
    max_conntrack: u32,
    /// Size of the loadBalancerSourceRanges map (one entry per LoadBalancer IP and range).
    #[arg(long, default_value_t = DEFAULT_MAX_SOURCE_RANGES)]
    max_source_ranges: u32,
}

/// What both agents (`run` and `agent`) take: where to attach, and the maps.
#[derive(Args)]
struct DatapathArgs {
    /// Interfaces to attach to: names or globs, comma-separated or repeated ("lxc*").
    #[arg(long, required = true)]
    interfaces: Vec<String>,
    /// The node's external interfaces ("eth0", "ens*"): XDP there translates NodePorts,
    /// external and LoadBalancer IPs from outside; tc egress there the replies to them.
    #[arg(long)]
    external_interfaces: Vec<String>,
    /// Keep maps, program and links pinned on exit, for a restart without loss.
    #[arg(long)]
    keep_pinned: bool,
    /// Enter this network namespace (from `ip netns add`) first.
    #[arg(long)]
    netns: Option<String>,
    /// How often to check the interfaces (and, for `run`, the file), in milliseconds.
    #[arg(long, default_value_t = 250)]
    poll_ms: u64,
    #[command(flatten)]
    maps: MapArgs,
}

#[derive(Subcommand)]
enum Cmd {
    /// Standalone agent: apply a Services/EndpointSlices file and follow its changes.
    Run {
        /// YAML file with services and endpointSlices (see examples/services.yaml).
        #[arg(long)]
        config: PathBuf,
        #[command(flatten)]
        datapath: DatapathArgs,
    },
    /// Kubernetes agent: watch Services, EndpointSlices and this node; keep the maps in sync.
    Agent {
        /// Kubeconfig file (default: the in-cluster configuration of the pod).
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// This node's name, from the downward API (spec.nodeName).
        #[arg(long, env = "NODE_NAME")]
        node_name: String,
        /// Program Services labelled service.kubernetes.io/service-proxy-name=<this>;
        /// without it, Services carrying that label are left to their proxy.
        #[arg(long)]
        proxy_name: Option<String>,
        /// Address of /healthz, /readyz and /metrics.
        #[arg(long, default_value = k8s::DEFAULT_LISTEN)]
        listen: std::net::SocketAddr,
        /// Address the Services' healthCheckNodePorts are served on (each on its port),
        /// as kube-proxy does: 200 with this node's count of ready endpoints, else 503.
        #[arg(long, default_value = "0.0.0.0")]
        health_check_address: std::net::IpAddr,
        /// After the first event of a burst, wait this long for more before syncing.
        #[arg(long, default_value_t = k8s::DEFAULT_DEBOUNCE.as_millis() as u64)]
        debounce_ms: u64,
        #[command(flatten)]
        datapath: DatapathArgs,
    },
    /// Validate a config file and print the frontends it yields.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
    /// Show what is in the maps.
    Show {
        #[arg(value_enum, default_value = "all")]
        what: show::What,
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
}

impl MapArgs {
    fn load_options(self) -> LoadOptions {
        LoadOptions {
            pin_dir: self.pin_dir,
            max_frontends: self.max_frontends,
            max_backends: self.max_backends,
            max_slots: self.max_slots,
            max_conntrack: self.max_conntrack,
            max_source_ranges: self.max_source_ranges,
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Runs an agent to completion: first into `netns` if given (before the runtime starts,
/// so every worker thread is inside it), then on a runtime of two workers.
fn run_in(
    ns: Option<String>,
    agent: impl std::future::Future<Output = lb_userspace::Result<()>>,
) -> anyhow::Result<()> {
    if let Some(ns) = &ns {
        netns::enter(ns).context("--netns")?;
    }
    Ok(runtime()?.block_on(agent)?)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result: anyhow::Result<()> = match cli.command {
        Cmd::Run {
            config,
            datapath: d,
        } => run_in(
            d.netns,
            run::run(run::RunOptions {
                config,
                interfaces: d.interfaces,
                external_interfaces: d.external_interfaces,
                keep_pinned: d.keep_pinned,
                poll: Duration::from_millis(d.poll_ms),
                load: d.maps.load_options(),
            }),
        ),
        Cmd::Agent {
            kubeconfig,
            node_name,
            proxy_name,
            listen,
            health_check_address,
            debounce_ms,
            datapath: d,
        } => run_in(
            d.netns,
            k8s::run(k8s::AgentOptions {
                kubeconfig,
                node_name,
                proxy_name,
                interfaces: d.interfaces,
                external_interfaces: d.external_interfaces,
                load: d.maps.load_options(),
                keep_pinned: d.keep_pinned,
                listen,
                health_check_address,
                debounce: Duration::from_millis(debounce_ms),
                poll: Duration::from_millis(d.poll_ms),
            }),
        ),
        Cmd::Check { config: path } => config::load(&path).map_err(Into::into).map(|cfg| {
            let st =
                lb_userspace::model::desired_state(&cfg.services, &cfg.endpoint_slices, &cfg.node);
            for (fe, spec) in &st.frontends {
                let active: Vec<String> = spec
                    .active
                    .iter()
                    .map(|b| format!("{}:{}", b.ip, b.port))
                    .collect();
                println!(
                    "{:<24} {:<12} {:<28} ready: {}",
                    fe.to_string(),
                    spec.kind.to_string(),
                    spec.service,
                    active.join(" ")
                );
            }
        }),
        Cmd::Show { what, pin_dir } => show::render(&pin_dir, what)
            .with_context(|| format!("reading the maps pinned under {}", pin_dir.display()))
            .map(|s| print!("{s}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
