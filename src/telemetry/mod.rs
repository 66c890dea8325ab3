//! Telemetry: OpenTelemetry traces and metrics, the Prometheus `/metrics` endpoint, and the
//! `/healthz` and `/readyz` probes.
//!
//! One [`Telemetry`] per running service (or per pipeline in tests) owns:
//! * a meter provider with two readers over one set of instruments ([`Metrics`]): the
//!   Prometheus exporter (`opentelemetry-prometheus`, which renders the SDK's collected data
//!   into a `prometheus::Registry` of its own, scraped at `/metrics`) and, when configured, an
//!   OTLP periodic reader. `opentelemetry-prometheus` is maintained with the SDK (it was
//!   un-deprecated in 0.32 and follows every SDK release), so no bridge of our own is needed;
//! * a tracer provider exporting by OTLP, only when configured ([`trace`] makes per-event
//!   spans; with it off they cost nothing and trace headers pass through unchanged);
//! * the [`Health`] state that the consumer thread and the pipeline update.
//!
//! [`http`] serves `/metrics`, `/healthz` and `/readyz`; [`device_memory`] adds CUDA device
//! memory from NVML where there is a driver.
//!
//! Nothing is global: two pipelines in one process (tests) each have their own registry,
//! counters and health. Only the `tracing` bridge ([`logging`]) is process-wide, as logging is.
//!
//! OTLP export is configured only by the standard `OTEL_*` environment variables
//! ([`OtlpSettings::from_env`]); [`TelemetrySettings`] lets tests pass an endpoint explicitly.
//! [`Telemetry::shutdown`] flushes the last spans and metrics; `serve`, `demo` and `train` call
//! it on the way out (dropping the last handle does it too).

pub mod device_memory;
pub mod health;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod otlp;
pub mod trace;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use opentelemetry::metrics::MeterProvider as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;

pub use health::Health;
pub use metrics::{DatabaseOutcome, Metrics, ProbeGuard, Stage, TrainMetrics};
pub use otlp::OtlpSettings;
pub use trace::{EventTrace, Tracing};

use crate::config::TelemetryConfig;

/// The instrumentation scope of everything attrstream records.
const SCOPE: &str = "attrstream";

/// What a [`Telemetry`] exports and under which name.
#[derive(Debug, Clone)]
pub struct TelemetrySettings {
    /// `service.name` unless `OTEL_SERVICE_NAME` or `OTEL_RESOURCE_ATTRIBUTES` name it.
    pub service_name: String,
    /// OTLP destinations.
    pub otlp: OtlpSettings,
}

impl TelemetrySettings {
    /// From the `[telemetry]` configuration and the `OTEL_*` environment.
    pub fn from_config(config: &TelemetryConfig) -> Result<Self> {
        Ok(Self {
            service_name: config.service_name.clone(),
            otlp: OtlpSettings::from_env()?,
        })
    }

    /// Metrics in-process only (the Prometheus registry), no OTLP: what a pipeline gets when
    /// its caller passes no telemetry.
    pub fn local() -> Self {
        Self {
            service_name: SCOPE.into(),
            otlp: OtlpSettings::none(),
        }
    }
}

/// The telemetry of one service instance; cheap to clone.
#[derive(Clone)]
pub struct Telemetry {
    inner: Arc<Inner>,
}

struct Inner {
    registry: prometheus::Registry,
    meter_provider: SdkMeterProvider,
    tracer_provider: Option<SdkTracerProvider>,
    tracing: Tracing,
    metrics: Metrics,
    health: Arc<Health>,
    shut_down: AtomicBool,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("tracing", &self.inner.tracing)
            .field("otlp_traces", &self.inner.tracer_provider.is_some())
            .finish_non_exhaustive()
    }
}

impl Telemetry {
    /// Sets up the providers, the Prometheus registry and the instruments.
    pub fn new(settings: &TelemetrySettings) -> Result<Self> {
        let resource = resource(&settings.service_name);
        let registry = prometheus::Registry::new();
        let prometheus = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .scope_info_enabled(false)
            .build()
            .context("cannot set up the Prometheus exporter")?;
        let mut meters = SdkMeterProvider::builder()
            .with_resource(resource.clone())
            .with_reader(prometheus);
        if let Some(endpoint) = &settings.otlp.metrics {
            let mut reader = PeriodicReader::builder(otlp::metric_exporter(endpoint)?);
            if let Some(interval) = settings.otlp.metric_interval {
                reader = reader.with_interval(interval);
            }
            meters = meters.with_reader(reader.build());
        }
        let meter_provider = meters.build();
        let tracer_provider = match &settings.otlp.traces {
            Some(endpoint) => Some(
                SdkTracerProvider::builder()
                    .with_resource(resource)
                    .with_batch_exporter(otlp::span_exporter(endpoint)?)
                    .build(),
            ),
            None => None,
        };
        let tracer = tracer_provider.as_ref().map(|p| p.tracer(SCOPE));
        let health = Arc::new(Health::new());
        let meter = meter_provider.meter(SCOPE);
        let metrics = Metrics::new(&meter, health.clone());
        if settings.otlp.is_enabled() {
            tracing::info!(
                traces = settings.otlp.traces.is_some(),
                metrics = settings.otlp.metrics.is_some(),
                "exporting telemetry by OTLP (HTTP/protobuf)"
            );
        }
        Ok(Self {
            inner: Arc::new(Inner {
                registry,
                meter_provider,
                tracer_provider,
                tracing: Tracing::new(tracer),
                metrics,
                health,
                shut_down: AtomicBool::new(false),
            }),
        })
    }

    /// Telemetry with metrics kept in-process ([`TelemetrySettings::local`]).
    pub fn local() -> Result<Self> {
        Self::new(&TelemetrySettings::local())
    }

    /// The pipeline's instruments.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Liveness and readiness state, shared with the consumer thread.
    pub fn health(&self) -> &Arc<Health> {
        &self.inner.health
    }

    /// Per-event tracing (off without an OTLP traces endpoint).
    pub fn tracing(&self) -> &Tracing {
        &self.inner.tracing
    }

    /// The training instruments (`attrstream_train_*`) on this telemetry's meter provider.
    pub fn train_metrics(&self) -> TrainMetrics {
        TrainMetrics::new(&self.inner.meter_provider.meter(SCOPE))
    }

    /// The tracer that exported `tracing` spans go through ([`logging::attach`]), when tracing is on.
    pub fn tracer(&self) -> Option<SdkTracer> {
        self.inner.tracer_provider.as_ref().map(|p| p.tracer(SCOPE))
    }

    /// Every metric in the Prometheus text format (what `/metrics` serves).
    pub fn prometheus_text(&self) -> String {
        let families = self.inner.registry.gather();
        prometheus::TextEncoder::new()
            .encode_to_string(&families)
            .unwrap_or_else(|e| format!("# metrics could not be encoded: {e}\n"))
    }

    /// Exports what is pending and stops the exporters (idempotent). Blocks up to the export
    /// timeouts when a collector is unreachable; call it on the way out, not in async code.
    pub fn shutdown(&self) {
        self.inner.shutdown();
    }

    /// For a command of the binary: telemetry from `[telemetry]` and the `OTEL_*` environment,
    /// with the process's `tracing` spans exported through its tracer ([`logging::attach`]).
    /// End with [`Telemetry::finish`].
    pub fn for_command(config: &TelemetryConfig) -> Result<Self> {
        let telemetry = Self::new(&TelemetrySettings::from_config(config)?)?;
        if let Some(tracer) = telemetry.tracer() {
            logging::attach(tracer);
        }
        Ok(telemetry)
    }

    /// Detaches the `tracing` bridge and flushes the last spans and metrics ([`Self::shutdown`]).
    pub fn finish(&self) {
        logging::detach();
        self.shutdown();
    }
}

impl Inner {
    fn shutdown(&self) {
        if self.shut_down.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Some(p) = &self.tracer_provider {
            if let Err(e) = p.shutdown() {
                tracing::warn!(error = %e, "flushing spans at shutdown failed; the last spans may be lost");
            }
        }
        if let Err(e) = self.meter_provider.shutdown() {
            tracing::debug!(error = %e, "metric provider shutdown");
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// `service.name` from the configuration unless the environment names the service, and
/// `service.version` unless the environment sets it; `OTEL_RESOURCE_ATTRIBUTES` adds the rest.
fn resource(service_name: &str) -> Resource {
    let attributes = std::env::var("OTEL_RESOURCE_ATTRIBUTES").unwrap_or_default();
    let env_sets = |key: &str| {
        attributes
            .split(',')
            .any(|kv| kv.split_once('=').is_some_and(|(k, _)| k.trim() == key))
    };
    let env_names_service =
        std::env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.trim().is_empty()) || env_sets("service.name");
    let mut builder = Resource::builder();
    if !env_names_service {
        builder = builder.with_service_name(service_name.to_string());
    }
    if !env_sets("service.version") {
        builder = builder.with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    }
    builder.build()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One training step's figures, for the train metrics.
    fn sample_step() -> crate::train::trainer::StepStats {
        crate::train::trainer::StepStats {
            step: 0,
            classifier: 0.5,
            box_reg: 0.25,
            objectness: 0.125,
            rpn_box_reg: 0.125,
            lr: 0.01,
            grad_norm: 3.0,
            images_per_sec: 2.0,
        }
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's closure returns figment::Error
    fn listen_errors_name_the_key() {
        let ok = TelemetryConfig::default();
        assert_eq!(ok.listen_addr().unwrap(), Some("0.0.0.0:9464".parse().unwrap()));
        let off = TelemetryConfig {
            listen: " ".into(),
            ..Default::default()
        };
        assert_eq!(off.listen_addr().unwrap(), None);
        let ids = |extra: (&str, &str)| {
            vec![
                ("schemas.input_schema_id".to_string(), "1".to_string()),
                ("schemas.output_schema_id".to_string(), "2".to_string()),
                ("schemas.dead_letter_schema_id".to_string(), "3".to_string()),
                (extra.0.to_string(), extra.1.to_string()),
            ]
        };
        // In a jail: other tests set ATTRSTREAM_* variables inside theirs.
        figment::Jail::expect_with(|_| {
            let err = crate::config::Config::load(None, &ids(("telemetry.listen", "\"localhost\"")))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("telemetry.listen") && err.contains("0.0.0.0:9464"),
                "{err}"
            );
            let err = crate::config::Config::load(None, &ids(("telemetry.service_name", "\"\"")))
                .unwrap_err()
                .to_string();
            assert!(err.contains("telemetry.service_name"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn local_metrics_render_with_the_contract_names() {
        let t = Telemetry::local().unwrap();
        let m = t.metrics();
        m.event_consumed();
        m.event_consumed();
        m.record_produced();
        m.dead_letter("corrupt_image");
        m.stage(Stage::Inference, std::time::Duration::from_millis(30));
        m.batch(4, 8);
        m.database_write(DatabaseOutcome::Retried);
        t.health().model_ready(crate::events::ModelRef {
            name: "ssd".into(),
            version: "v7".into(),
        });
        let _q = m.watch_queue("batcher", || Some(3));
        let text = t.prometheus_text();
        for expected in [
            "attrstream_events_consumed_total 2",
            "attrstream_records_produced_total 1",
            "attrstream_dead_letters_total{reason=\"corrupt_image\"} 1",
            "attrstream_stage_duration_seconds_count{stage=\"inference\"} 1",
            "attrstream_stage_duration_seconds_bucket{stage=\"inference\",le=\"0.05\"} 1",
            "attrstream_batch_size_count 1",
            "attrstream_batch_fill_ratio_sum 0.5",
            "attrstream_in_flight_messages 0",
            "attrstream_queue_depth{queue=\"batcher\"} 3",
            "attrstream_model_info{name=\"ssd\",version=\"v7\"} 1",
            "attrstream_database_writes_total{outcome=\"retried\"} 1",
        ] {
            assert!(text.contains(expected), "missing `{expected}` in\n{text}");
        }
        t.train_metrics().step(&sample_step(), 4);
        let text = t.prometheus_text();
        for expected in [
            "attrstream_train_steps_total 1",
            "attrstream_train_images_total 4",
            "attrstream_train_loss_sum{part=\"total\"} 1",
            "attrstream_train_last_loss{part=\"box_reg\"} 0.25",
            "attrstream_train_learning_rate 0.01",
            "attrstream_train_grad_norm_count 1",
            "attrstream_train_images_per_second 2",
        ] {
            assert!(text.contains(expected), "missing `{expected}` in\n{text}");
        }
        drop(_q);
        assert!(!t
            .prometheus_text()
            .contains("attrstream_queue_depth{queue=\"batcher\"}"));
        // Two instances count separately.
        assert!(!Telemetry::local()
            .unwrap()
            .prometheus_text()
            .contains("attrstream_events_consumed_total 2"));
    }

    /// Metric families in Prometheus text with their types: `# TYPE name type` lines.
    fn families(text: &str) -> std::collections::BTreeMap<String, String> {
        text.lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_once(' '))
            .map(|(name, kind)| (name.to_string(), kind.to_string()))
            .filter(|(name, _)| name != "target_info")
            .collect()
    }

    #[test]
    fn device_memory_renders_once_suffixed_with_bytes() {
        let t = Telemetry::local().unwrap();
        let _g = t.metrics().watch_device_memory("cuda:0", || Some(1));
        let text = t.prometheus_text();
        assert!(
            text.contains("attrstream_device_memory_bytes{device=\"cuda:0\"} 1"),
            "{text}"
        );
        assert!(!text.contains("_bytes_bytes"), "{text}");
    }

    #[test]
    fn every_metric_renders_under_the_name_and_type_the_readme_lists() {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
        let section = readme
            .split("\n## Telemetry\n")
            .nth(1)
            .and_then(|s| s.split("\n## ").next())
            .expect("README has a Telemetry section");
        // The serve metrics table: | `name{labels}` | type | meaning |.
        let mut documented = std::collections::BTreeMap::new();
        for row in section.lines().filter(|l| l.starts_with("| `attrstream_")) {
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            let name = cells[1].trim_matches('`').split('{').next().unwrap().to_string();
            documented.insert(name, cells[2].to_string());
        }
        assert_eq!(documented.len(), 12, "{documented:?}");
        // The training metrics are named in the paragraph below the table.
        let train: std::collections::BTreeSet<String> = section
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("attrstream_train_"))
            .map(str::to_string)
            .collect();
        assert_eq!(train.len(), 7, "{train:?}");

        let t = Telemetry::local().unwrap();
        let m = t.metrics();
        m.event_consumed();
        m.record_produced();
        m.dead_letter("corrupt_image");
        m.stage(Stage::Total, std::time::Duration::from_millis(3));
        m.batch(2, 8);
        m.database_write(DatabaseOutcome::Ok);
        t.health().model_ready(crate::events::ModelRef {
            name: "m".into(),
            version: "1".into(),
        });
        t.health().set_lag("in", 0, 5);
        let _q = m.watch_queue("batcher", || Some(0));
        let _d = m.watch_device_memory("cuda:0", || Some(1 << 20));
        let text = t.prometheus_text();
        let rendered = families(&text);
        let serve: std::collections::BTreeMap<String, String> = rendered
            .iter()
            .filter(|(name, _)| !name.starts_with("attrstream_train_"))
            .map(|(n, k)| (n.clone(), k.clone()))
            .collect();
        assert_eq!(serve, documented, "README \"Telemetry\" table vs /metrics:\n{text}");

        t.train_metrics().step(&sample_step(), 2);
        let trained: std::collections::BTreeSet<String> = families(&t.prometheus_text())
            .into_keys()
            .filter(|name| name.starts_with("attrstream_train_"))
            .collect();
        assert_eq!(trained, train, "README's training metrics vs what is rendered");
    }
}
