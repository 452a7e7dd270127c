//! The agent's HTTP endpoints: `/healthz` (liveness), `/readyz` (ready after the first
//! full sync of all three watches) and `/metrics` (Prometheus text format).
use std::{future::Future, sync::Arc};

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Router};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use super::metrics;
use crate::{
    dataplane::writer::{Queries, Status},
    Error, Result,
};

/// Readiness: ready once the writer has written its first sync, which it does only after
/// every watch listed in full.
#[derive(Clone, Debug)]
pub struct Health(tokio::sync::watch::Receiver<Status>);

impl Health {
    pub fn new(status: tokio::sync::watch::Receiver<Status>) -> Self {
        Self(status)
    }

    /// True once all three watches listed and the result was written to the maps.
    pub fn is_ready(&self) -> bool {
        self.syncs() > 0
    }

    /// Resolves once the first sync has been written.
    pub async fn first_sync(&self) {
        let mut rx = self.0.clone();
        let _ = rx.wait_for(|s| s.syncs > 0).await;
    }

    /// Number of syncs written so far.
    pub fn syncs(&self) -> u64 {
        self.0.borrow().syncs
    }
}

#[derive(Clone)]
struct AppState {
    health: Health,
    registry: Arc<Registry>,
    queries: Option<Queries>,
}

/// `queries`: the writer's model, for `/debug/frontends` (`lb show`'s Service names and
/// endpoint conditions).
pub fn router(health: Health, registry: Registry, queries: Option<Queries>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .route("/debug/frontends", get(frontends))
        .with_state(AppState {
            health,
            registry: Arc::new(registry),
            queries,
        })
}

/// Every frontend's Service and endpoints with their conditions, as JSON, from the
/// writer thread's model (computed between its updates: O(frontends) per request).
async fn frontends(State(s): State<AppState>) -> axum::response::Response {
    let answer = s
        .queries
        .as_ref()
        .and_then(|q| q.ask(crate::show::agent_view));
    let Some(rx) = answer else {
        return (StatusCode::SERVICE_UNAVAILABLE, "the writer is gone\n").into_response();
    };
    match tokio::time::timeout(std::time::Duration::from_secs(10), rx).await {
        Ok(Ok(view)) => (
            [("content-type", "application/json")],
            serde_json::to_string(&view).unwrap_or_default(),
        )
            .into_response(),
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the writer did not answer in 10 s\n",
        )
            .into_response(),
    }
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    if s.health.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready: waiting for the first full sync of Services, EndpointSlices and this node\n")
    }
}

async fn render_metrics(State(s): State<AppState>) -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
        metrics::render(&s.registry),
    )
}

/// Binds a listen address (so a bad flag fails at start, not later); `flag` names it.
pub async fn bind(addr: std::net::SocketAddr, flag: &str) -> Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        Error::Config(format!(
            "{flag} {addr}: cannot bind the HTTP server: {e} (pick a free port)"
        ))
    })
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| Error::Config(format!("HTTP server failed: {e}")))
}
