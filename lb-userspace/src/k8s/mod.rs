//! `lb agent`: the Kubernetes source. Watches Services, EndpointSlices and this node,
//! translates each event into the same model objects as the standalone file
//! (`translate`), and hands them to the writer thread, which keeps the maps equal to the
//! desired state (`controller`); serves health and metrics (`http`, `metrics`). The
//! datapath (load, attach, shutdown) and the writer are shared with `lb run`.
//!
//! ```text
//! API server --watch--> translate (per event) --Update--> writer thread: model -> delta -> maps
//! ```
pub mod controller;
pub mod http;
pub mod metrics;
pub mod proxyhealth;
pub mod translate;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use tracing::{error, info};

use self::metrics::Metrics;
pub use self::{
    controller::{Controller, ControllerOptions},
    http::Health,
};
use crate::{
    dataplane::writer::{Kind, Writer, WriterOptions},
    loader::LoadOptions,
    run::{load_datapath, shutdown_signal, start_attaching, sync_interfaces, Interfaces},
    Error, Result,
};

/// By default a sync follows as soon as the updates queued so far are in the model: a
/// burst is written as one diff because it queues while the previous sync runs.
pub const DEFAULT_DEBOUNCE: Duration = Duration::ZERO;

/// The writer's options for the Kubernetes source: nothing is written before Services,
/// EndpointSlices and this Node are listed.
pub fn writer_options(debounce: Duration) -> WriterOptions {
    WriterOptions {
        lists: [Kind::Service, Kind::EndpointSlice, Kind::Node].into(),
        debounce,
        ..Default::default()
    }
}

/// Default address of the HTTP endpoints (`/healthz`, `/readyz`, `/metrics`).
pub const DEFAULT_LISTEN: &str = "0.0.0.0:9100";

#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// Kubeconfig file; in-cluster configuration when `None`.
    pub kubeconfig: Option<PathBuf>,
    /// The API server's address, replacing the kubeconfig's or the in-cluster one.
    pub api_server: Option<String>,
    pub node_name: String,
    /// This proxy's name for `service.kubernetes.io/service-proxy-name`.
    pub proxy_name: Option<String>,
    pub interfaces: Vec<String>,
    pub external_interfaces: Vec<String>,
    pub load: LoadOptions,
    pub keep_pinned: bool,
    pub listen: SocketAddr,
    /// kube-proxy's `/healthz` and `/livez` (`None`: not served).
    pub healthz: Option<SocketAddr>,
    /// How long a change may wait for a successful sync before `/healthz` and `/livez`
    /// say unhealthy.
    pub healthz_timeout: Duration,
    /// Where the healthCheckNodePorts are served.
    pub health_check_address: std::net::IpAddr,
    pub debounce: Duration,
    /// How often the interface list is checked.
    pub poll: Duration,
    /// Conntrack's collector.
    pub conntrack: crate::dataplane::gc::GcOptions,
    /// How often the maps are checked against what was written (`None`: never).
    pub resync: Option<Duration>,
    /// The socket programs (connect-time balancing, host-network clients).
    pub sockets: crate::sockets::SockOptions,
}

/// The value of `LB_API_SERVER` in deploy/daemonset.yaml: a host under `.invalid`
/// (RFC 2606), which never resolves, refused at start with what to set instead.
pub const API_SERVER_PLACEHOLDER: &str = "https://set-this-to-the-api-server.invalid:6443";

/// What to do when the API server address is missing or wrong.
const API_SERVER_HELP: &str = "set --api-server (env LB_API_SERVER in deploy/daemonset.yaml) \
     to the API server's own address, e.g. what `kubectl config view --minify -o \
     jsonpath='{.clusters[0].cluster.server}'` prints, or an address of `kubectl get \
     endpointslices -n default -l kubernetes.io/service-name=kubernetes`";

/// How long the in-cluster address gets to answer at start.
const IN_CLUSTER_PROBE: Duration = Duration::from_secs(3);

/// Checks `--api-server`: an http(s) URL with a host, and not the placeholder.
fn api_server_url(s: &str) -> Result<String> {
    let bad = |why: String| Error::Config(format!("--api-server (LB_API_SERVER) {s:?}: {why}"));
    let (scheme, rest) = s
        .split_once("://")
        .ok_or_else(|| bad("want https://HOST:PORT".into()))?;
    if scheme != "https" && scheme != "http" {
        return Err(bad(format!("scheme {scheme:?}: want https://HOST:PORT")));
    }
    let authority = rest.split('/').next().unwrap_or("");
    let host = match authority.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() => h,
        _ => authority,
    };
    if host.is_empty() {
        return Err(bad("no host: want https://HOST:PORT".into()));
    }
    if host.trim_end_matches('.').ends_with(".invalid") {
        return Err(bad(format!(
            "this is the placeholder of deploy/daemonset.yaml, not an address: {API_SERVER_HELP}"
        )));
    }
    Ok(s.to_string())
}

/// Without `--api-server` or a kubeconfig, the in-cluster address (the `kubernetes`
/// Service's ClusterIP, from KUBERNETES_SERVICE_HOST/PORT) must answer: a ClusterIP is
/// served by a Service proxy, and without kube-proxy that proxy is this agent, which is
/// not running yet (nor would its datapath serve a host-network client such as itself).
async fn probe_in_cluster_address() -> Result<()> {
    let (Ok(host), Ok(port)) = (
        std::env::var("KUBERNETES_SERVICE_HOST"),
        std::env::var("KUBERNETES_SERVICE_PORT"),
    ) else {
        return Ok(());
    };
    let target = match host.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(ip)) => format!("[{ip}]:{port}"),
        _ => format!("{host}:{port}"),
    };
    let why = match tokio::time::timeout(IN_CLUSTER_PROBE, tokio::net::TcpStream::connect(&target))
        .await
    {
        Ok(Ok(_)) => return Ok(()),
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("no answer in {IN_CLUSTER_PROBE:?}"),
    };
    Err(Error::Config(format!(
        "the in-cluster configuration points at {target} (KUBERNETES_SERVICE_HOST and \
         KUBERNETES_SERVICE_PORT), and nothing answers there ({why}): that is the \
         `kubernetes` Service's ClusterIP, which only a Service proxy serves, and without \
         kube-proxy that proxy is this agent, which needs the API server first: \
         {API_SERVER_HELP}"
    )))
}

/// A client from the kubeconfig file or the in-cluster configuration, pointed at
/// `api_server` if given (kube-proxy's `--master`).
pub async fn client(
    kubeconfig: Option<&std::path::Path>,
    api_server: Option<&str>,
) -> Result<kube::Client> {
    let api_server = api_server.map(api_server_url).transpose()?;
    let uri_err = |e: &dyn std::fmt::Display| Error::Config(format!("--api-server: {e}"));
    let config = match (kubeconfig, api_server) {
        (Some(path), server) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| Error::Config(format!("--kubeconfig {}: {e}", path.display())))?;
            let mut config = kube::Config::from_custom_kubeconfig(
                kc,
                &kube::config::KubeConfigOptions::default(),
            )
            .await
            .map_err(|e| Error::Config(format!("--kubeconfig {}: {e}", path.display())))?;
            if let Some(s) = server {
                config.cluster_url = s.parse().map_err(|e| uri_err(&e))?;
            }
            config
        }
        (None, Some(s)) => match kube::Config::incluster_dns() {
            // The pod's service account (token, CA), at the given address.
            Ok(mut config) => {
                config.cluster_url = s.parse().map_err(|e| uri_err(&e))?;
                config
            }
            Err(e) => {
                info!("no service account credentials ({e}); connecting to {s} without");
                kube::Config::new(s.parse().map_err(|e| uri_err(&e))?)
            }
        },
        (None, None) => {
            probe_in_cluster_address().await?;
            kube::Config::incluster().map_err(|e| {
                Error::Config(format!(
                    "in-cluster Kubernetes configuration unavailable ({e}); outside a pod, \
                     pass --kubeconfig or --api-server"
                ))
            })?
        }
    };
    kube::Client::try_from(config).map_err(|e| Error::Config(format!("Kubernetes client: {e}")))
}

/// Runs the agent until SIGTERM/SIGINT.
pub async fn run(opts: AgentOptions) -> Result<()> {
    if opts.node_name.is_empty() {
        return Err(Error::Config(
            "the node name is empty: set NODE_NAME from the downward API (spec.nodeName) or pass --node-name".into(),
        ));
    }
    let interfaces = Interfaces::new(&opts.interfaces, &opts.external_interfaces)?;
    // First, so a SIGTERM at any later point is a clean shutdown.
    let shutdown = shutdown_signal()?;
    let client = client(opts.kubeconfig.as_deref(), opts.api_server.as_deref()).await?;
    let listener = http::bind(opts.listen, "--listen").await?;
    let healthz_listener = match opts.healthz {
        Some(addr) => Some(http::bind(addr, "--healthz-bind-address").await?),
        None => None,
    };

    let (mut datapath, plane) = load_datapath(&opts.load)?;
    // Maps re-used from an earlier agent hold the last known state: attach at once. Fresh
    // maps are filled by the first sync before any interface sees the program.
    let reused_state = !plane.state().frontends.is_empty();
    let counters = plane.maps.counters_handle()?;
    let conntrack = plane.maps.conntrack_handle()?;
    let sockets = datapath.attach_sockets(&opts.sockets)?;
    let localhost_nodeports = sockets.is_some() && opts.sockets.localhost_nodeports;
    let covers_pods = sockets.as_ref().map(|s| s.covers_pods);
    let (purges, gc_stats) =
        crate::run::start_gc(&plane, &opts.conntrack, sockets.and_then(|s| s.killer))?;
    let mut pods = crate::podpath::PodPath::new(
        &opts.load.pin_dir,
        covers_pods,
        !interfaces.external.is_empty(),
        &datapath,
        gc_stats.clone(),
    );
    let gc = purges.clone();
    let metrics = Metrics::default();
    let checks = crate::healthcheck::HealthChecks::default();
    let proxy_health = proxyhealth::ProxyHealth::new(opts.healthz_timeout);
    let on_sync = {
        let mut metrics = metrics.on_sync();
        let health = proxy_health.clone();
        Box::new(move |s: &crate::dataplane::writer::SyncStats<'_>| {
            metrics(s);
            if s.errors.is_empty() {
                health.updated(s.updates);
            }
        })
    };
    let writer = Writer::spawn(
        plane,
        WriterOptions {
            health_checks: Some(checks.clone()),
            purges: Some(purges),
            resync: opts.resync,
            localhost_nodeports,
            ..writer_options(opts.debounce)
        },
        on_sync,
    )
    .map_err(|e| Error::Load(format!("starting the writer thread: {e}")))?;
    let _health_checks = crate::healthcheck::HealthServer::start(checks, opts.health_check_address);
    let health = Health::new(writer.status());
    let status = writer.status();

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let router = http::router(
        health.clone(),
        metrics.registry(Some(counters), Some(conntrack), Some(gc_stats)),
        Some(writer.queries()),
    );
    let server = tokio::spawn(http::serve(listener, router, stopped(stop_rx.clone())));
    info!(listen = %opts.listen, "serving /healthz, /readyz and /metrics");
    let healthz_server = healthz_listener.map(|l| {
        let router = proxyhealth::router(proxy_health.clone());
        info!(listen = ?opts.healthz, "serving kube-proxy's /healthz and /livez");
        tokio::spawn(http::serve(l, router, stopped(stop_rx.clone())))
    });
    let controller = Controller::new(
        client,
        ControllerOptions {
            node_name: opts.node_name.clone(),
            rules: translate::Rules {
                proxy_name: opts.proxy_name.clone(),
            },
            health: Some(proxy_health),
        },
        writer.updates(),
        metrics,
    );
    let mut control = tokio::spawn(controller.run(stopped(stop_rx)));

    tokio::pin!(shutdown);
    let mut attaching = reused_state;
    if attaching {
        start_attaching(&mut datapath, &interfaces, &mut pods, &status, &gc);
    }
    let mut tick = tokio::time::interval(opts.poll);
    let result = loop {
        tokio::select! {
            _ = &mut shutdown => break Ok(()),
            r = &mut control => break match r {
                Ok(Ok(())) => Err(Error::Load("the controller stopped unexpectedly".into())),
                Ok(Err(e)) => Err(e),
                Err(e) => Err(Error::Load(format!("the controller task failed: {e}"))),
            },
            _ = health.first_sync(), if !attaching => {
                attaching = true;
                start_attaching(&mut datapath, &interfaces, &mut pods, &status, &gc);
            }
            _ = tick.tick(), if attaching => {
                sync_interfaces(&mut datapath, &interfaces, &mut pods, &status);
            }
        }
    };
    let _ = stop_tx.send(true);
    if !control.is_finished() {
        let _ = control.await;
    }
    for server in std::iter::once(server).chain(healthz_server) {
        match server.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => error!("{e}"),
            Err(e) => error!("the HTTP server task failed: {e}"),
        }
    }
    // The writer finishes what was queued; its maps close before the pins go.
    drop(tokio::task::block_in_place(|| writer.stop()));
    let shut = datapath.shutdown(opts.keep_pinned);
    result.and(shut)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_server_is_a_url_and_not_the_placeholder() {
        assert!(api_server_url("https://10.0.0.1:6443").is_ok());
        assert!(api_server_url("https://[fd00::1]:6443").is_ok());
        let e = api_server_url(API_SERVER_PLACEHOLDER)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("placeholder") && e.contains("LB_API_SERVER"),
            "{e}"
        );
        let e = api_server_url("10.0.0.1:6443").unwrap_err().to_string();
        assert!(e.contains("https://HOST:PORT"), "{e}");
        assert!(api_server_url("ftp://x").is_err());
        assert!(api_server_url("https://:6443").is_err());
    }
}
