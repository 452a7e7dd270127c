use std::{fmt::Write as _, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use lb_common::{
    DEFAULT_MAX_BACKENDS, DEFAULT_MAX_CONNTRACK, DEFAULT_MAX_FRONTENDS, DEFAULT_MAX_MAGLEV_CELLS,
    DEFAULT_MAX_SLOTS, DEFAULT_MAX_SOURCE_RANGES,
};
use lb_userspace::{
    config, k8s,
    loader::{LoadOptions, DEFAULT_PIN_DIR},
    netns, run, show, trace,
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
    /// Cells of the Maglev map, shared by every frontend's table (8 bytes each; a
    /// table has about 40 per backend, at least 127). A frontend that finds no room
    /// hashes over its slots instead (lb_frontends_without_maglev_table counts them).
    #[arg(long, default_value_t = DEFAULT_MAX_MAGLEV_CELLS)]
    max_maglev_cells: u32,
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
    /// How often the maps are read back and compared with what the agent wrote, so
    /// entries changed behind its back are repaired (kube-proxy's --sync-period is 30 s);
    /// 0: never.
    #[arg(long, default_value_t = 30)]
    resync_secs: u64,
    /// The cgroup (v2) the socket programs attach to: connect() and UDP sends of its
    /// processes to a Service go to a backend (host-network clients, and pods with
    /// --connect-time-balancing). Default: the root of the cgroup2 mount (every process
    /// of the node); `none`: no socket programs.
    #[arg(long, env = "LB_CGROUP")]
    cgroup: Option<String>,
    /// Connect-time balancing for pods' sockets (host-network clients get it wherever
    /// the programs are attached): `auto` where the kernel loads the programs.
    #[arg(long, value_enum, default_value_t = lb_userspace::sockets::ConnectTime::Auto)]
    connect_time_balancing: lb_userspace::sockets::ConnectTime,
    /// Serve NodePorts on 127.0.0.1 (IPv4) to the node's own processes, as kube-proxy's
    /// iptables mode does (`--iptables-localhost-nodeports`), where the socket programs
    /// are attached; a pod's 127.0.0.1 stays its own.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    localhost_nodeports: bool,
    /// Every pod's processes that connect to Services run under --cgroup (true of the
    /// default, the cgroup2 root, without this flag). Where the socket programs then
    /// translate every pod flow, the pods' veths go without the tc programs.
    #[arg(long)]
    pods_in_cgroup: bool,
    #[command(flatten)]
    maps: MapArgs,
    #[command(flatten)]
    conntrack: ConntrackArgs,
}

impl DatapathArgs {
    fn sockets(&self) -> anyhow::Result<lb_userspace::sockets::SockOptions> {
        Ok(lb_userspace::sockets::SockOptions {
            cgroup: lb_userspace::sockets::cgroup_arg(self.cgroup.as_deref())?,
            connect_time: self.connect_time_balancing,
            localhost_nodeports: self.localhost_nodeports,
            pods_in_cgroup: self.pods_in_cgroup,
        })
    }
}

/// Conntrack's lifetimes: a flow goes this long after its last packet, by state (the
/// collector runs every `--ct-gc-interval-ms`).
#[derive(Args)]
struct ConntrackArgs {
    /// How often the collector expires flows, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    ct_gc_interval_ms: u64,
    /// TCP, a SYN not answered yet.
    #[arg(long, default_value_t = 60)]
    ct_timeout_tcp_syn_s: u64,
    /// TCP, established (kube-proxy's --conntrack-tcp-timeout-established: 24 h).
    #[arg(long, default_value_t = 86_400)]
    ct_timeout_tcp_established_s: u64,
    /// TCP, closed one way (a FIN seen).
    #[arg(long, default_value_t = 60)]
    ct_timeout_tcp_closing_s: u64,
    /// TCP, closed (FINs both ways, or a RST).
    #[arg(long, default_value_t = 10)]
    ct_timeout_tcp_closed_s: u64,
    /// UDP, no reply yet.
    #[arg(long, default_value_t = 30)]
    ct_timeout_udp_s: u64,
    /// UDP, replied (a stream).
    #[arg(long, default_value_t = 120)]
    ct_timeout_udp_stream_s: u64,
}

impl ConntrackArgs {
    fn options(&self) -> lb_userspace::dataplane::gc::GcOptions {
        let s = Duration::from_secs;
        lb_userspace::dataplane::gc::GcOptions {
            interval: Duration::from_millis(self.ct_gc_interval_ms.max(100)),
            timeouts: lb_userspace::dataplane::gc::Timeouts {
                tcp_syn: s(self.ct_timeout_tcp_syn_s),
                tcp_established: s(self.ct_timeout_tcp_established_s),
                tcp_closing: s(self.ct_timeout_tcp_closing_s),
                tcp_closed: s(self.ct_timeout_tcp_closed_s),
                udp: s(self.ct_timeout_udp_s),
                udp_stream: s(self.ct_timeout_udp_stream_s),
            },
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Standalone agent: apply a Services/EndpointSlices file and follow its changes.
    Run {
        /// YAML file with services and endpointSlices (see examples/services.yaml).
        #[arg(long)]
        config: PathBuf,
        #[command(flatten)]
        file: ConfigArgs,
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
        /// The API server's address (https://HOST:PORT), as kube-proxy's --master: with
        /// --kubeconfig it replaces the kubeconfig's server; without, the pod's service
        /// account credentials are used with it. Needed without kube-proxy: the in-cluster
        /// address is the `kubernetes` Service's ClusterIP, which only a Service proxy
        /// (this agent) serves.
        #[arg(long, env = "LB_API_SERVER")]
        api_server: Option<String>,
        /// Address of /healthz, /readyz and /metrics.
        #[arg(long, default_value = k8s::DEFAULT_LISTEN)]
        listen: std::net::SocketAddr,
        /// kube-proxy's node health check, /healthz and /livez (cloud load balancers probe
        /// port 10256); empty: not served.
        #[arg(long, default_value = k8s::proxyhealth::DEFAULT_BIND)]
        healthz_bind_address: String,
        /// /healthz and /livez answer 503 once a change has waited this long for a
        /// successful sync (kube-proxy: twice its sync period, 60 s).
        #[arg(long, default_value_t = k8s::proxyhealth::DEFAULT_TIMEOUT.as_millis() as u64)]
        healthz_timeout_ms: u64,
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
        #[command(flatten)]
        file: ConfigArgs,
    },
    /// Show what is in the maps: frontends with their active backends, backends,
    /// conntrack entries with their idle time, the datapath's counters.
    Show {
        #[arg(value_enum, default_value = "all")]
        what: show::What,
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Output format: aligned tables, or one JSON object with a key per table.
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        format: show::Format,
        /// Only this frontend (IP, IP:PORT or IP:PORT/PROTO) or service id (the ID
        /// column), with its backends and flows.
        #[arg(long)]
        service: Option<show::ServiceMatch>,
        /// Only this backend (IP, IP:PORT or IP:PORT/PROTO), the frontends that send to
        /// it and its flows.
        #[arg(long)]
        backend: Option<show::Endpoint>,
        /// Only rows in which this address appears.
        #[arg(long)]
        address: Option<std::net::IpAddr>,
        /// Only the flows of this client (IP, IP:PORT or IP:PORT/PROTO): conntrack's
        /// forward entries from it and reply entries to it.
        #[arg(long)]
        client: Option<show::Endpoint>,
        /// The `lb agent` to ask for Service names and endpoint conditions (its --listen
        /// address); "" for the maps alone.
        #[arg(long, default_value = "127.0.0.1:9100")]
        agent: String,
    },
    /// Follow the datapath's decisions as they happen, one line each: new flows with
    /// their backend and how it was chosen, refusals, drops with their reason (like
    /// `cilium monitor`). Tracing is on while a tracer runs, off otherwise.
    Trace {
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Output format: one line per event, or one JSON object per line.
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        format: show::Format,
        /// Only events of this frontend (IP, IP:PORT or IP:PORT/PROTO), service id, or
        /// Service (namespace/name[:port], from the agent).
        #[arg(long)]
        service: Option<show::ServiceMatch>,
        /// Only events in which this address is the client, the frontend or the backend.
        #[arg(long)]
        address: Option<std::net::IpAddr>,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
        /// The `lb agent` to ask for a Service's frontends (--service namespace/name).
        #[arg(long, default_value = "127.0.0.1:9100")]
        agent: String,
    },
}

/// How a config file is read and validated (`run`, `check`).
#[derive(Args)]
struct ConfigArgs {
    /// A larger file is refused unread (so is anything but a regular file).
    #[arg(long, default_value_t = config::DEFAULT_MAX_CONFIG_BYTES)]
    max_config_bytes: u64,
    /// The ports a nodePort may take, as the API server's flag: a file's nodePort
    /// outside is refused.
    #[arg(long, default_value_t = lb_userspace::model::NodePortRange::default())]
    service_node_port_range: lb_userspace::model::NodePortRange,
}

impl ConfigArgs {
    fn options(&self) -> config::Options {
        config::Options {
            max_bytes: self.max_config_bytes,
            node_ports: self.service_node_port_range,
        }
    }
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
            max_maglev_cells: self.max_maglev_cells,
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

/// An optional listen address: empty turns the server off.
fn parse_bind(s: &str, flag: &str) -> anyhow::Result<Option<std::net::SocketAddr>> {
    if s.is_empty() {
        return Ok(None);
    }
    s.parse().map(Some).map_err(|e| {
        anyhow::anyhow!("{flag} {s:?}: {e} (want IP:PORT, e.g. 127.0.0.1:9100, or \"\" for none)")
    })
}

/// Writes to stdout. A reader that went away (`lb show | head`) ends the output quietly:
/// Rust ignores SIGPIPE, so without this the closed pipe is an EPIPE error (and `print!`
/// panics on it).
fn print_out(s: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(s.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.context("writing to stdout"),
    }
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
            file,
            datapath: d,
        } => d.sockets().and_then(|sockets| {
            run_in(
                d.netns,
                run::run(run::RunOptions {
                    sockets,
                    config,
                    config_options: file.options(),
                    interfaces: d.interfaces,
                    external_interfaces: d.external_interfaces,
                    keep_pinned: d.keep_pinned,
                    poll: Duration::from_millis(d.poll_ms),
                    resync: (d.resync_secs > 0).then(|| Duration::from_secs(d.resync_secs)),
                    conntrack: d.conntrack.options(),
                    load: d.maps.load_options(),
                }),
            )
        }),
        Cmd::Agent {
            kubeconfig,
            node_name,
            proxy_name,
            api_server,
            listen,
            healthz_bind_address,
            healthz_timeout_ms,
            health_check_address,
            debounce_ms,
            datapath: d,
        } => parse_bind(&healthz_bind_address, "--healthz-bind-address").and_then(|healthz| {
            let sockets = d.sockets()?;
            run_in(
                d.netns,
                k8s::run(k8s::AgentOptions {
                    sockets,
                    kubeconfig,
                    api_server,
                    node_name,
                    proxy_name,
                    healthz,
                    healthz_timeout: Duration::from_millis(healthz_timeout_ms),
                    interfaces: d.interfaces,
                    external_interfaces: d.external_interfaces,
                    load: d.maps.load_options(),
                    keep_pinned: d.keep_pinned,
                    listen,
                    health_check_address,
                    debounce: Duration::from_millis(debounce_ms),
                    poll: Duration::from_millis(d.poll_ms),
                    resync: (d.resync_secs > 0).then(|| Duration::from_secs(d.resync_secs)),
                    conntrack: d.conntrack.options(),
                }),
            )
        }),
        Cmd::Check { config: path, file } => config::load_with(&path, &file.options())
            .map_err(Into::into)
            .and_then(|cfg| {
                let st = lb_userspace::model::desired_state(
                    &cfg.services,
                    &cfg.endpoint_slices,
                    &cfg.node,
                );
                let mut out = String::new();
                for (fe, spec) in &st.frontends {
                    let active: Vec<String> = spec
                        .active
                        .iter()
                        .map(|b| format!("{}:{}", b.ip, b.port))
                        .collect();
                    let _ = writeln!(
                        out,
                        "{:<24} {:<12} {:<28} ready: {}",
                        fe.to_string(),
                        spec.kind.to_string(),
                        spec.service,
                        active.join(" ")
                    );
                }
                print_out(&out)
            }),
        Cmd::Show {
            what,
            pin_dir,
            format,
            service,
            backend,
            address,
            client,
            agent,
        } => parse_bind(&agent, "--agent").and_then(|agent| {
            let filter = show::Filter {
                service,
                backend,
                address,
                client,
            };
            show::render(&pin_dir, what, format, &filter, agent)
                .with_context(|| format!("reading the maps pinned under {}", pin_dir.display()))
                .and_then(|s| print_out(&s))
        }),
        Cmd::Trace {
            pin_dir,
            format,
            service,
            address,
            count,
            agent,
        } => parse_bind(&agent, "--agent").and_then(|agent| {
            let opts = trace::TraceOptions {
                pin_dir: pin_dir.clone(),
                format,
                service,
                address,
                count,
                agent,
            };
            runtime()?
                .block_on(trace::run(opts))
                .with_context(|| format!("tracing the datapath pinned under {}", pin_dir.display()))
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
