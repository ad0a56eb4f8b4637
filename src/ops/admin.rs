//! The admin HTTP server (`admin.addr`, default 0.0.0.0:9090): `/metrics` in Prometheus
//! text format, `/healthz` (the process is alive), `/readyz` (connected to the broker,
//! consuming, and not blocked by a broker memory or disk alarm; 503 otherwise) and
//! `/upstreams` (each deployment's state as JSON).

use std::{net::SocketAddr, sync::Arc};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    runtime::{clock::unix_now_ms, metrics::Metrics},
    upstream::routing::router::Router as Upstreams,
    worker::Health,
};

/// What the endpoints read.
#[derive(Clone)]
pub struct Admin {
    /// The worker's metrics.
    pub metrics: Arc<Metrics>,
    /// Its deployments and their flow control (in flight, limits, state).
    pub router: Arc<Upstreams>,
    /// Its connection state.
    pub health: Arc<Health>,
}

/// Binds `addr` and serves until `shutdown`; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    admin: Admin,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/upstreams", get(upstreams))
        .with_state(admin);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
    });
    Ok(bound)
}

async fn metrics(State(a): State<Admin>) -> impl IntoResponse {
    a.metrics.in_flight.set(a.router.in_flight() as i64);
    a.metrics.concurrency_limit.set(a.router.limit() as i64);
    a.router.export(&a.metrics, unix_now_ms());
    a.metrics.ready.set(i64::from(a.health.ready()));
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        a.metrics.encode(),
    )
}

/// Each deployment's state as JSON: in flight, limit, breaker, what it does not serve now.
async fn upstreams(State(a): State<Admin>) -> impl IntoResponse {
    axum::Json(a.router.report(unix_now_ms()))
}

async fn readyz(State(a): State<Admin>) -> impl IntoResponse {
    if a.health.ready() {
        (StatusCode::OK, "ready\n")
    } else if a.health.blocked.load(std::sync::atomic::Ordering::Relaxed) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the broker blocks publishing (memory or disk alarm)\n",
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: not connected to the broker or not consuming\n",
        )
    }
}
