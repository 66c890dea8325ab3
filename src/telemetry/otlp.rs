//! OTLP export of traces and metrics over HTTP/protobuf, configured by the standard
//! `OTEL_*` environment variables (or explicitly, for tests).
//!
//! Export is on only when an endpoint is set (`OTEL_EXPORTER_OTLP_ENDPOINT`, or the
//! per-signal `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `…_METRICS_ENDPOINT`) and the SDK is not
//! disabled (`OTEL_SDK_DISABLED=true`, `OTEL_TRACES_EXPORTER=none`, `OTEL_METRICS_EXPORTER=none`).
//! Without an endpoint nothing is exported, nothing fails and nothing retries. The exporters
//! themselves read the rest: headers, timeouts, compression, `OTEL_BSP_*`,
//! `OTEL_METRIC_EXPORT_INTERVAL`, `OTEL_TRACES_SAMPLER`.
//!
//! The HTTP client is a small adapter over the `reqwest` (0.12, rustls with ring) that the
//! service already uses for image fetching, rather than the exporter's own reqwest 0.13 client:
//! one HTTP and TLS stack in the binary, and no C toolchain needed for aws-lc. The exporters run
//! on their own threads (batch span processor, periodic metric reader), so a blocking client
//! fits them and needs no async runtime.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use async_trait::async_trait;
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{MetricExporter, Protocol, SpanExporter, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::metrics::Temporality;

/// Where OTLP data goes; `None` endpoints export nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OtlpSettings {
    /// Traces: `Some(None)` = let the exporter resolve the URL from the environment;
    /// `Some(Some(url))` = exactly this URL (…/v1/traces); `None` = no trace export.
    pub traces: Option<Option<String>>,
    /// Metrics, likewise (…/v1/metrics).
    pub metrics: Option<Option<String>>,
    /// Metric export interval when explicit (else `OTEL_METRIC_EXPORT_INTERVAL`, default 60 s).
    pub metric_interval: Option<Duration>,
}

impl OtlpSettings {
    /// No OTLP export.
    pub fn none() -> Self {
        Self::default()
    }

    /// Both signals to the collector at `base` (e.g. `http://127.0.0.1:4318`), regardless of
    /// the environment; metrics every `metric_interval`.
    pub fn to_endpoint(base: &str, metric_interval: Duration) -> Self {
        let base = base.trim_end_matches('/');
        Self {
            traces: Some(Some(format!("{base}/v1/traces"))),
            metrics: Some(Some(format!("{base}/v1/metrics"))),
            metric_interval: Some(metric_interval),
        }
    }

    /// What the standard `OTEL_*` variables ask for. Fails on a protocol other than
    /// `http/protobuf`, saying what to set.
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|key| std::env::var(key).ok().filter(|v| !v.trim().is_empty()))
    }

    /// [`Self::from_env`] over any variable lookup (testable without touching the process).
    pub fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Result<Self> {
        if var("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
            return Ok(Self::none());
        }
        let base = var("OTEL_EXPORTER_OTLP_ENDPOINT");
        let signal = |endpoint_var: &str, exporter_var: &str, protocol_var: &str| -> Result<Option<Option<String>>> {
            let exporter = var(exporter_var).unwrap_or_else(|| "otlp".into());
            let exporters: Vec<String> = exporter.split(',').map(|e| e.trim().to_ascii_lowercase()).collect();
            if exporters.iter().all(|e| e == "none") {
                return Ok(None);
            }
            if let Some(other) = exporters.iter().find(|e| *e != "otlp" && *e != "none") {
                bail!(
                    "{exporter_var}={other} is not supported: attrstream exports only by OTLP (set it to otlp or none)"
                );
            }
            if var(endpoint_var).is_none() && base.is_none() {
                return Ok(None);
            }
            let protocol = var(protocol_var)
                .or_else(|| var("OTEL_EXPORTER_OTLP_PROTOCOL"))
                .unwrap_or_else(|| "http/protobuf".into());
            if !protocol.trim().eq_ignore_ascii_case("http/protobuf") {
                bail!(
                    "{protocol_var} / OTEL_EXPORTER_OTLP_PROTOCOL = `{protocol}` is not supported: attrstream \
                     exports OTLP over HTTP only; set it to http/protobuf and point the endpoint at the \
                     collector's HTTP port (usually 4318)"
                );
            }
            Ok(Some(None))
        };
        Ok(Self {
            traces: signal(
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "OTEL_TRACES_EXPORTER",
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            )?,
            metrics: signal(
                "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
                "OTEL_METRICS_EXPORTER",
                "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL",
            )?,
            metric_interval: None,
        })
    }

    /// True when anything is exported.
    pub fn is_enabled(&self) -> bool {
        self.traces.is_some() || self.metrics.is_some()
    }
}

/// The OTLP request timeout: `OTEL_EXPORTER_OTLP_TIMEOUT` in milliseconds, default 10 s.
fn export_timeout() -> Duration {
    std::env::var("OTEL_EXPORTER_OTLP_TIMEOUT")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_millis)
        .unwrap_or(Duration::from_secs(10))
}

/// The span exporter for `endpoint` (see [`OtlpSettings::traces`]).
pub(crate) fn span_exporter(endpoint: &Option<String>) -> Result<SpanExporter> {
    let mut builder = SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_http_client(BlockingHttpClient::new(export_timeout())?);
    if let Some(url) = endpoint {
        builder = builder.with_endpoint(url.clone());
    }
    builder
        .build()
        .context("cannot set up the OTLP trace exporter (check OTEL_EXPORTER_OTLP_*)")
}

/// The metric exporter for `endpoint` (cumulative temporality, as Prometheus expects).
pub(crate) fn metric_exporter(endpoint: &Option<String>) -> Result<MetricExporter> {
    let mut builder = MetricExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_http_client(BlockingHttpClient::new(export_timeout())?)
        .with_temporality(Temporality::Cumulative);
    if let Some(url) = endpoint {
        builder = builder.with_endpoint(url.clone());
    }
    builder
        .build()
        .context("cannot set up the OTLP metric exporter (check OTEL_EXPORTER_OTLP_*)")
}

/// `opentelemetry_http::HttpClient` over a blocking reqwest 0.12 client.
#[derive(Debug, Clone)]
struct BlockingHttpClient(Arc<reqwest::blocking::Client>);

/// Responses larger than this are refused (OTLP responses are tiny).
const MAX_RESPONSE_BYTES: u64 = 4 * 1024 * 1024;

impl BlockingHttpClient {
    /// Builds the client on a thread of its own: a blocking reqwest client must not be
    /// created inside an async runtime, and the caller may be in one.
    fn new(timeout: Duration) -> Result<Self> {
        let client = std::thread::Builder::new()
            .name("otlp-client-init".into())
            .spawn(move || reqwest::blocking::Client::builder().timeout(timeout).build())
            .context("cannot start a thread to build the OTLP HTTP client")?
            .join()
            .map_err(|_| anyhow::anyhow!("building the OTLP HTTP client panicked"))?
            .context("cannot build the OTLP HTTP client")?;
        Ok(Self(Arc::new(client)))
    }
}

#[async_trait]
impl HttpClient for BlockingHttpClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        use std::io::Read;
        let request: reqwest::blocking::Request = request.try_into()?;
        let mut response = self.0.execute(request)?;
        let mut builder = Response::builder().status(response.status().as_u16());
        for (name, value) in std::mem::take(response.headers_mut()).iter() {
            builder = builder.header(name.as_str(), value.as_bytes());
        }
        let mut body = Vec::new();
        response.take(MAX_RESPONSE_BYTES + 1).read_to_end(&mut body)?;
        if body.len() as u64 > MAX_RESPONSE_BYTES {
            return Err(Box::new(opentelemetry_http::ResponseBodyTooLarge::new()));
        }
        Ok(builder.body(Bytes::from(body))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn settings(vars: &[(&str, &str)]) -> Result<OtlpSettings> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        OtlpSettings::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn no_endpoint_no_export() {
        assert_eq!(settings(&[]).unwrap(), OtlpSettings::none());
        assert!(!settings(&[("OTEL_SERVICE_NAME", "x")]).unwrap().is_enabled());
    }

    #[test]
    fn endpoints_and_switches() {
        let s = settings(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318")]).unwrap();
        assert_eq!((s.traces.clone(), s.metrics.clone()), (Some(None), Some(None)));
        let s = settings(&[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://c:4318/v1/traces")]).unwrap();
        assert!(s.traces.is_some() && s.metrics.is_none());
        let s = settings(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_METRICS_EXPORTER", "none"),
        ])
        .unwrap();
        assert!(s.traces.is_some() && s.metrics.is_none());
        let s = settings(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_SDK_DISABLED", "true"),
        ])
        .unwrap();
        assert!(!s.is_enabled());
    }

    #[test]
    fn grpc_is_refused_with_what_to_do() {
        let err = settings(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("http/protobuf") && err.contains("4318"), "{err}");
        let err = settings(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_TRACES_EXPORTER", "zipkin"),
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("OTEL_TRACES_EXPORTER"), "{err}");
    }
}
