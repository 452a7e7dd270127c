//! The health checks of Services with a `healthCheckNodePort` (LoadBalancer Services
//! with externalTrafficPolicy Local), served as kube-proxy serves them, since cloud load
//! balancers probe them to send traffic only to nodes with a ready endpoint: HTTP on
//! that port, any path, 200 with this node's count of ready endpoints, or 503 when it
//! has none (also when its only endpoints are terminating), and kube-proxy's JSON body:
//!
//! ```json
//! {"service":{"namespace":"shop","name":"web"},"localEndpoints":1,"serviceProxyHealthy":true}
//! ```
//!
//! The writer thread publishes the checks (`HealthChecks::publish`) when one changes;
//! `serve` keeps one listener per port, opening and closing them as Services come and go.
use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::{Arc, RwLock},
};

use axum::{
    extract::State,
    http::{header, StatusCode},
    response::IntoResponse,
    Router,
};
use tokio::{
    net::TcpListener,
    sync::watch,
    task::{AbortHandle, JoinHandle, JoinSet},
};
use tracing::{info, warn};

use crate::model::HealthCheck;

/// The current checks by port, shared by the writer (which publishes) and the server.
#[derive(Clone, Debug)]
pub struct HealthChecks {
    checks: Arc<RwLock<BTreeMap<u16, HealthCheck>>>,
    version: Arc<watch::Sender<u64>>,
}

impl Default for HealthChecks {
    fn default() -> Self {
        Self {
            checks: Default::default(),
            version: Arc::new(watch::channel(0).0),
        }
    }
}

impl HealthChecks {
    /// Replaces the checks (called by the writer thread when one changed).
    pub fn publish<'a>(&self, checks: impl IntoIterator<Item = &'a HealthCheck>) {
        let map: BTreeMap<u16, HealthCheck> =
            checks.into_iter().map(|c| (c.port, c.clone())).collect();
        *self.checks.write().unwrap_or_else(|e| e.into_inner()) = map;
        self.version.send_modify(|v| *v += 1);
    }

    /// The check on `port`, if any.
    pub fn get(&self, port: u16) -> Option<HealthCheck> {
        self.checks
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&port)
            .cloned()
    }

    fn ports(&self) -> Vec<u16> {
        self.checks
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .copied()
            .collect()
    }
}

/// kube-proxy's answer for a check: its status and JSON body.
pub fn answer(check: &HealthCheck) -> (StatusCode, String) {
    let status = if check.local_endpoints > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({
        "service": {"namespace": check.namespace, "name": check.name},
        "localEndpoints": check.local_endpoints,
        "serviceProxyHealthy": true,
    });
    (status, body.to_string())
}

async fn respond(State((checks, port)): State<(HealthChecks, u16)>) -> impl IntoResponse {
    // A check gone between the last reconcile and this request: as if no endpoint.
    let check = checks.get(port).unwrap_or(HealthCheck {
        port,
        namespace: String::new(),
        name: String::new(),
        local_endpoints: 0,
    });
    let (status, body) = answer(&check);
    (
        status,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
}

/// Serves every published check on `bind`:port until the future is dropped (which
/// closes every port). A port that cannot be bound (in use) is logged and tried again
/// at the next change.
pub async fn serve(checks: HealthChecks, bind: IpAddr) {
    let mut version = checks.version.subscribe();
    // Dropped with this future: aborts every listener.
    let mut tasks = JoinSet::new();
    let mut listeners: HashMap<u16, AbortHandle> = HashMap::new();
    loop {
        let want = checks.ports();
        listeners.retain(|port, task| {
            let keep = want.contains(port) && !task.is_finished();
            if !keep {
                task.abort();
                info!(port, "health check node port closed");
            }
            keep
        });
        for port in want {
            if listeners.contains_key(&port) {
                continue;
            }
            let addr = SocketAddr::new(bind, port);
            match TcpListener::bind(addr).await {
                Ok(listener) => {
                    info!(%addr, "serving a health check node port");
                    let app = Router::new()
                        .fallback(respond)
                        .with_state((checks.clone(), port));
                    let task = tasks.spawn(async move {
                        if let Err(e) = axum::serve(listener, app).await {
                            warn!(%addr, "health check node port: {e}");
                        }
                    });
                    listeners.insert(port, task);
                }
                Err(e) => warn!(%addr, "cannot serve a health check node port: {e}"),
            }
        }
        // Reap finished listeners as they end, so the set does not grow.
        while tasks.try_join_next().is_some() {}
        if version.changed().await.is_err() {
            break;
        }
    }
}

impl Drop for HealthServer {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The server task; dropping it closes every port.
pub struct HealthServer(JoinHandle<()>);

impl HealthServer {
    /// Starts `serve` on the current tokio runtime.
    pub fn start(checks: HealthChecks, bind: IpAddr) -> Self {
        Self(tokio::spawn(serve(checks, bind)))
    }
}
