//! The operations endpoint: `GET /metrics` (Prometheus text format), `/healthz`, `/readyz`.
//!
//! It runs on its own thread with a blocking server: three tiny GET handlers do not need the
//! async runtime, and a scrape must still answer when the runtime's workers are saturated
//! by a burst — that is exactly when someone is looking.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use serde::Deserialize;
use tiny_http::{Header, Method, Response, Server};

use crate::health::Health;
use crate::metrics::Metrics;
use crate::PipelineError;

/// `[http]`: where the operations endpoint listens.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct HttpConfig {
    /// Address to bind, e.g. `"0.0.0.0:9464"` in a container, `"127.0.0.1:9464"` on a host.
    /// Port 0 picks a free port (tests).
    pub listen: SocketAddr,
    /// Whether `/readyz` stays 200 while Redis is unreachable (decisions then use the model's
    /// defaults for the missing features). Default true; see [`crate::health`].
    #[serde(default = "default_true")]
    pub ready_while_feature_store_down: bool,
    /// How often Redis is pinged for `/readyz` and `verdict_feature_store_up`.
    #[serde(with = "humantime_serde", default = "default_health_interval")]
    pub health_check_interval: std::time::Duration,
}

impl HttpConfig {
    /// Defaults, listening on `listen`.
    pub fn listening_on(listen: SocketAddr) -> Self {
        Self {
            listen,
            ready_while_feature_store_down: true,
            health_check_interval: default_health_interval(),
        }
    }
}

fn default_true() -> bool {
    true
}

fn default_health_interval() -> std::time::Duration {
    std::time::Duration::from_secs(2)
}

/// The running server; dropping it stops the thread.
pub struct HttpServer {
    server: Arc<Server>,
    thread: Option<JoinHandle<()>>,
    address: SocketAddr,
}

impl HttpServer {
    /// Binds and starts serving. Binding fails loudly (a taken port is a config error).
    pub fn start(
        listen: SocketAddr,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> Result<Self, PipelineError> {
        let server = Server::http(listen)
            .map_err(|e| PipelineError::Config(format!("http.listen {listen}: {e}")))?;
        let address = server
            .server_addr()
            .to_ip()
            .ok_or_else(|| PipelineError::Config("http.listen: not an IP address".into()))?;
        let server = Arc::new(server);
        let serving = Arc::clone(&server);
        let thread = std::thread::Builder::new()
            .name("http".into())
            .spawn(move || {
                // `incoming_requests` ends when `unblock` is called on drop.
                for request in serving.incoming_requests() {
                    let (status, content_type, body) =
                        route(request.method(), request.url(), &metrics, &health);
                    let header = Header::from_bytes(&b"Content-Type"[..], content_type.as_bytes())
                        .expect("static header is valid");
                    // Always a Content-Length, never chunked: the body is complete in memory,
                    // and the simplest probe clients (and `curl -s | promtool`) read it whole.
                    let response = Response::from_string(body)
                        .with_status_code(status)
                        .with_header(header)
                        .with_chunked_threshold(usize::MAX);
                    if let Err(e) = request.respond(response) {
                        tracing::debug!(error = %e, "http client went away");
                    }
                }
            })
            .map_err(|e| PipelineError::Stopped(format!("spawning the http thread: {e}")))?;
        tracing::info!(%address, "serving /metrics, /healthz, /readyz");
        Ok(Self {
            server,
            thread: Some(thread),
            address,
        })
    }

    /// The bound address (the real port when the config said 0).
    pub fn address(&self) -> SocketAddr {
        self.address
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Status, content type and body for one request.
fn route(
    method: &Method,
    url: &str,
    metrics: &Metrics,
    health: &Health,
) -> (u16, &'static str, String) {
    const TEXT: &str = "text/plain; charset=utf-8";
    let path = url.split('?').next().unwrap_or(url);
    if *method != Method::Get && *method != Method::Head {
        return (405, TEXT, "only GET\n".into());
    }
    match path {
        "/metrics" => (
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render(),
        ),
        "/healthz" => (200, TEXT, "ok\n".into()),
        "/readyz" => {
            let readiness = health.readiness();
            (
                if readiness.ready { 200 } else { 503 },
                TEXT,
                readiness.report,
            )
        }
        _ => (
            404,
            TEXT,
            "not found: try /metrics, /healthz or /readyz\n".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(address: SocketAddr, path: &str) -> (u16, String) {
        crate::scrape::get(address, path).unwrap()
    }

    #[test]
    fn serves_metrics_health_and_readiness() {
        let metrics = Arc::new(Metrics::new().unwrap());
        metrics.workload("fraud").consumed.inc();
        let health = Arc::new(Health::new(true, Arc::default()));
        let server = HttpServer::start(
            "127.0.0.1:0".parse().unwrap(),
            Arc::clone(&metrics),
            Arc::clone(&health),
        )
        .unwrap();
        let address = server.address();
        assert_eq!(get(address, "/healthz").0, 200);
        let (status, body) = get(address, "/readyz");
        assert_eq!(status, 503, "{body}");
        health
            .workload_started("fraud")
            .store(true, std::sync::atomic::Ordering::Relaxed);
        health.start_finished();
        assert_eq!(get(address, "/readyz").0, 200);
        let (status, body) = get(address, "/metrics");
        assert_eq!(status, 200);
        assert!(
            body.contains("verdict_messages_consumed_total{workload=\"fraud\"} 1"),
            "{body}"
        );
        assert_eq!(get(address, "/nope").0, 404);
        drop(server);
        // tiny_http's accept thread closes the listener on its own schedule after `unblock`:
        // give it a moment, then the port must refuse connections.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::net::TcpStream::connect(address).is_ok() {
            assert!(
                std::time::Instant::now() < deadline,
                "still listening after drop"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}
