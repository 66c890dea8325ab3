//! The process's `tracing` subscriber: log lines on stderr (filtered by `RUST_LOG`, default
//! `info`), and a slot for the `tracing-opentelemetry` bridge that [`attach`] fills once a
//! command knows its telemetry configuration. With the bridge attached, `tracing` spans (model
//! swaps, training runs) are exported as OpenTelemetry spans through the same tracer as the
//! per-event spans, and log events inside them become span events.
//!
//! This is the one process-wide piece of telemetry (logging is process-wide by nature);
//! tests that never call [`init`] are unaffected.

use std::sync::OnceLock;

use opentelemetry_sdk::trace::SdkTracer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

/// The default filter: `info`, with the OpenTelemetry crates' own chatter at `warn` (export
/// failures still show). Targets match by prefix: `opentelemetry` covers `opentelemetry_sdk`,
/// `opentelemetry-otlp` and the rest.
pub const DEFAULT_FILTER: &str = "info,opentelemetry=warn";

type Bridge = Option<Box<dyn Layer<Registry> + Send + Sync>>;

static BRIDGE: OnceLock<reload::Handle<Bridge, Registry>> = OnceLock::new();

/// Installs the global subscriber (once; later calls do nothing).
pub fn init() {
    if BRIDGE.get().is_some() {
        return;
    }
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let (slot, handle) = reload::Layer::new(None::<Box<dyn Layer<Registry> + Send + Sync>>);
    let installed = tracing_subscriber::registry()
        .with(slot)
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .try_init();
    if installed.is_ok() {
        let _ = BRIDGE.set(handle);
    }
}

/// Exports `tracing` spans through `tracer` from now on; false when [`init`] did not run.
pub fn attach(tracer: SdkTracer) -> bool {
    let Some(handle) = BRIDGE.get() else {
        return false;
    };
    let layer = tracing_opentelemetry::layer::<Registry>().with_tracer(tracer);
    handle
        .reload(Some(Box::new(layer) as Box<dyn Layer<Registry> + Send + Sync>))
        .is_ok()
}

/// Stops exporting `tracing` spans (before the tracer provider shuts down).
pub fn detach() {
    if let Some(handle) = BRIDGE.get() {
        let _ = handle.reload(None);
    }
}
