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
    run::{load_datapath, shutdown_signal, start_attaching, Interfaces},
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
    pub node_name: String,
    /// This proxy's name for `service.kubernetes.io/service-proxy-name`.
    pub proxy_name: Option<String>,
    pub interfaces: Vec<String>,
    pub external_interfaces: Vec<String>,
    pub load: LoadOptions,
    pub keep_pinned: bool,
    pub listen: SocketAddr,
    /// Where the healthCheckNodePorts are served.
    pub health_check_address: std::net::IpAddr,
    pub debounce: Duration,
    /// How often the interface list is checked.
    pub poll: Duration,
}

/// A client from the kubeconfig file, or the in-cluster configuration.
pub async fn client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| Error::Config(format!("--kubeconfig {}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| Error::Config(format!("--kubeconfig {}: {e}", path.display())))?
        }
        None => kube::Config::incluster().map_err(|e| {
            Error::Config(format!(
                "in-cluster Kubernetes configuration unavailable ({e}); outside a pod, pass --kubeconfig"
            ))
        })?,
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
    let client = client(opts.kubeconfig.as_deref()).await?;
    let listener = http::bind(opts.listen).await?;

    let (mut datapath, plane) = load_datapath(&opts.load)?;
    // Maps re-used from an earlier agent hold the last known state: attach at once. Fresh
    // maps are filled by the first sync before any interface sees the program.
    let reused_state = !plane.state().frontends.is_empty();
    let counters = plane.maps.counters_handle()?;
    let metrics = Metrics::default();
    let checks = crate::healthcheck::HealthChecks::default();
    let writer = Writer::spawn(
        plane,
        WriterOptions {
            health_checks: Some(checks.clone()),
            ..writer_options(opts.debounce)
        },
        metrics.on_sync(),
    )
    .map_err(|e| Error::Load(format!("starting the writer thread: {e}")))?;
    let _health_checks = crate::healthcheck::HealthServer::start(checks, opts.health_check_address);
    let health = Health::new(writer.status());

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let router = http::router(health.clone(), metrics.registry(Some(counters)));
    let server = tokio::spawn(http::serve(listener, router, stopped(stop_rx.clone())));
    info!(listen = %opts.listen, "serving /healthz, /readyz and /metrics");
    let controller = Controller::new(
        client,
        ControllerOptions {
            node_name: opts.node_name.clone(),
            rules: translate::Rules {
                proxy_name: opts.proxy_name.clone(),
            },
        },
        writer.updates(),
        metrics,
    );
    let mut control = tokio::spawn(controller.run(stopped(stop_rx)));

    tokio::pin!(shutdown);
    let mut attaching = reused_state;
    if attaching {
        start_attaching(&mut datapath, &interfaces);
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
                start_attaching(&mut datapath, &interfaces);
            }
            _ = tick.tick(), if attaching => {
                interfaces.sync(&mut datapath);
            }
        }
    };
    let _ = stop_tx.send(true);
    if !control.is_finished() {
        let _ = control.await;
    }
    match server.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => error!("{e}"),
        Err(e) => error!("the HTTP server task failed: {e}"),
    }
    // The writer finishes what was queued; its maps close before the pins go.
    drop(tokio::task::block_in_place(|| writer.stop()));
    let shut = datapath.shutdown(opts.keep_pinned);
    result.and(shut)
}
