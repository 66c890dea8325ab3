//! The HTTP server on `telemetry.listen`: `GET /metrics` (Prometheus text format),
//! `GET /healthz` (liveness) and `GET /readyz` (readiness), each 200 or 503 with a one-line
//! reason. Kubernetes probes and Prometheus scrapes use it; it serves nothing else.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::Telemetry;

/// A running telemetry HTTP server; stops when dropped or [`HttpServer::stop`]ped.
pub struct HttpServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl HttpServer {
    /// Binds `addr` (port 0: any free port) and serves `telemetry` on the current runtime.
    pub async fn start(telemetry: Telemetry, addr: SocketAddr) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
            format!(
                "telemetry.listen {addr}: cannot listen there (port in use? set another address, or \"\" to disable)"
            )
        })?;
        let addr = listener.local_addr().context("telemetry server address")?;
        let app = Router::new()
            .route("/metrics", get(metrics))
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .with_state(telemetry);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let server = axum::serve(listener, app).with_graceful_shutdown(async {
                let _ = stopped.await;
            });
            if let Err(e) = server.await {
                tracing::error!(error = %e, "telemetry HTTP server failed");
            }
        });
        tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
        Ok(Self {
            addr,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// The address it listens on (the actual port when started on port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting and waits for open requests to finish.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn metrics(State(telemetry): State<Telemetry>) -> Response {
    // Collecting runs the gauge callbacks (short locks, at most an NVML query): fine inline.
    let body = telemetry.prometheus_text();
    ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], body).into_response()
}

async fn healthz(State(telemetry): State<Telemetry>) -> Response {
    probe(telemetry.health().liveness())
}

async fn readyz(State(telemetry): State<Telemetry>) -> Response {
    probe(telemetry.health().readiness())
}

fn probe(state: Result<(), String>) -> Response {
    match state {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")).into_response(),
    }
}
