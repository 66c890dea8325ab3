//! The process's `tracing` subscriber: log lines on stderr, as text for people or as JSON lines
//! for log pipelines (Loki, Elastic, Cloud Logging), and a slot for the `tracing-opentelemetry`
//! bridge that [`attach`] fills once a command knows its telemetry configuration.
//!
//! The rules:
//! * Level: `RUST_LOG` (default [`DEFAULT_FILTER`]); each `-v` raises and each `-q` lowers the
//!   default level by one step, keeping `RUST_LOG`'s per-target directives ([`filter_directives`]).
//! * Colour: only when stderr is a terminal and `NO_COLOR` is unset or empty ([`use_colour`]), so
//!   pipes, files, containers and CI jobs get plain text.
//! * Format: `--log-format text|json` (or `ATTRSTREAM_TELEMETRY__LOG_FORMAT`) wins; otherwise a
//!   command's configuration (`telemetry.log_format`) may switch to JSON once loaded
//!   ([`apply_configured_format`]). JSON lines carry `timestamp`, `level`, `target`, `message`, the
//!   event's fields, the innermost `span`, and `trace_id`/`span_id` whenever an OpenTelemetry
//!   context is current (a traced `tracing` span, or a context the code attached), so a log line
//!   joins its trace.
//!
//! With the bridge attached, `tracing` spans (model swaps, training runs) are exported as
//! OpenTelemetry spans through the same tracer as the per-event spans.
//!
//! This is the one process-wide piece of telemetry (logging is process-wide by nature);
//! tests that never call [`init`] are unaffected.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::trace::SdkTracer;
use serde::{Deserialize, Serialize};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

/// The default filter: `info`, with the OpenTelemetry crates' own chatter at `warn` (export
/// failures still show). Targets match by prefix: `opentelemetry` covers `opentelemetry_sdk`,
/// `opentelemetry-otlp` and the rest.
pub const DEFAULT_FILTER: &str = "info,opentelemetry=warn";

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event (coloured on a terminal).
    #[default]
    Text,
    /// One JSON object per line, for log pipelines; carries trace and span ids.
    Json,
}

/// What the command line says about logging.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogSettings {
    /// `--log-format`, when given (on the command line or in its environment variable).
    pub format: Option<LogFormat>,
    /// Number of `-v` minus number of `-q`.
    pub verbosity: i8,
}

type Boxed = Box<dyn Layer<Registry> + Send + Sync>;

/// Handles to the two replaceable layers, once [`init`] ran.
struct Installed {
    output: reload::Handle<Boxed, Registry>,
    bridge: reload::Handle<Option<Boxed>, Registry>,
    colour: bool,
    /// True when `--log-format` chose the format: the configuration does not override it.
    format_explicit: bool,
}

static INSTALLED: OnceLock<Installed> = OnceLock::new();
static JSON_ACTIVE: AtomicBool = AtomicBool::new(false);

/// Installs the global subscriber (once; later calls do nothing).
pub fn init(settings: LogSettings) {
    if INSTALLED.get().is_some() {
        return;
    }
    let base = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_FILTER.to_string());
    let directives = filter_directives(&base, settings.verbosity);
    let filter = EnvFilter::try_new(&directives).unwrap_or_else(|e| {
        eprintln!("attrstream: RUST_LOG `{base}` is not a valid filter ({e}); using `{DEFAULT_FILTER}`");
        EnvFilter::new(filter_directives(DEFAULT_FILTER, settings.verbosity))
    });
    let colour = use_colour(std::io::stderr().is_terminal(), std::env::var_os("NO_COLOR").as_deref());
    let format = settings.format.unwrap_or_default();
    let (output, output_handle) = reload::Layer::new(output_layer(format, colour));
    let (bridge, bridge_handle) = reload::Layer::new(None::<Boxed>);
    let layers: Vec<Boxed> = vec![Box::new(output), Box::new(bridge)];
    if tracing_subscriber::registry()
        .with(layers)
        .with(filter)
        .try_init()
        .is_ok()
    {
        JSON_ACTIVE.store(format == LogFormat::Json, Ordering::Relaxed);
        let _ = INSTALLED.set(Installed {
            output: output_handle,
            bridge: bridge_handle,
            colour,
            format_explicit: settings.format.is_some(),
        });
    }
}

/// Switches to the configured format (`telemetry.log_format`) unless `--log-format` chose one.
pub fn apply_configured_format(format: LogFormat) {
    let Some(installed) = INSTALLED.get() else {
        return;
    };
    if installed.format_explicit || is_json() == (format == LogFormat::Json) {
        return;
    }
    if installed.output.reload(output_layer(format, installed.colour)).is_ok() {
        JSON_ACTIVE.store(format == LogFormat::Json, Ordering::Relaxed);
    }
}

/// True when log lines are JSON: a command's own stderr messages (the final error) then go
/// through `tracing` too, so a log pipeline sees only JSON lines.
pub fn is_json() -> bool {
    JSON_ACTIVE.load(Ordering::Relaxed)
}

/// Exports `tracing` spans through `tracer` from now on; false when [`init`] did not run.
pub fn attach(tracer: SdkTracer) -> bool {
    let Some(installed) = INSTALLED.get() else {
        return false;
    };
    let layer = tracing_opentelemetry::layer::<Registry>().with_tracer(tracer);
    installed.bridge.reload(Some(Box::new(layer) as Boxed)).is_ok()
}

/// Stops exporting `tracing` spans (before the tracer provider shuts down).
pub fn detach() {
    if let Some(installed) = INSTALLED.get() {
        let _ = installed.bridge.reload(None);
    }
}

/// The writer layer for `format`.
fn output_layer(format: LogFormat, colour: bool) -> Boxed {
    let layer = tracing_subscriber::fmt::layer().with_writer(StderrBesideProgress);
    match format {
        LogFormat::Text => Box::new(layer.with_ansi(colour)),
        LogFormat::Json => Box::new(layer.with_ansi(false).event_format(JsonLines)),
    }
}

/// Colour only on a terminal, and never when `NO_COLOR` is set to anything but "" (no-color.org).
pub fn use_colour(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// `base` (a `RUST_LOG` filter) with its default level moved `verbosity` steps: up towards
/// `trace` for `-v`, down towards `off` for `-q`. Per-target directives stay as they are.
pub fn filter_directives(base: &str, verbosity: i8) -> String {
    if verbosity == 0 {
        return base.to_string();
    }
    const LEVELS: [LevelFilter; 6] = [
        LevelFilter::OFF,
        LevelFilter::ERROR,
        LevelFilter::WARN,
        LevelFilter::INFO,
        LevelFilter::DEBUG,
        LevelFilter::TRACE,
    ];
    let mut default = LevelFilter::INFO;
    let mut rest = Vec::new();
    for directive in base.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        match directive.parse::<LevelFilter>() {
            Ok(level) if !directive.contains('=') => default = level,
            _ => rest.push(directive),
        }
    }
    let index = LEVELS.iter().position(|l| *l == default).unwrap_or(3) as i32;
    let shifted = (index + i32::from(verbosity)).clamp(0, LEVELS.len() as i32 - 1);
    let mut out = LEVELS[shifted as usize].to_string().to_ascii_lowercase();
    for directive in rest {
        out.push(',');
        out.push_str(directive);
    }
    out
}

/// Writes each formatted log line to stderr, hiding any progress bar while it does, so bars
/// and log lines do not garble each other on a terminal.
struct StderrBesideProgress;

impl<'a> MakeWriter<'a> for StderrBesideProgress {
    type Writer = StderrLine;

    fn make_writer(&'a self) -> Self::Writer {
        StderrLine
    }
}

/// One log line on its way to stderr.
struct StderrLine;

impl Write for StderrLine {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        crate::progress::with_bars_suspended(|| std::io::stderr().lock().write_all(buf))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// The JSON-lines event format: one object per event, see the module documentation.
struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> std::fmt::Result {
        let metadata = event.metadata();
        let mut line = serde_json::Map::new();
        line.insert(
            "timestamp".into(),
            chrono::Utc::now()
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
                .into(),
        );
        line.insert("level".into(), level_name(*metadata.level()).into());
        line.insert("target".into(), metadata.target().into());
        let mut fields = JsonFields(serde_json::Map::new());
        event.record(&mut fields);
        let message = fields.0.remove("message").unwrap_or_else(|| "".into());
        line.insert("message".into(), message);
        for (key, value) in fields.0 {
            // An event field never hides the line's own keys.
            line.entry(key).or_insert(value);
        }
        if let Some(span) = ctx.lookup_current() {
            line.insert("span".into(), span.name().into());
        }
        let span_context = opentelemetry::Context::map_current(|cx| cx.span().span_context().clone());
        if span_context.is_valid() {
            line.insert("trace_id".into(), span_context.trace_id().to_string().into());
            line.insert("span_id".into(), span_context.span_id().to_string().into());
        }
        let text = serde_json::to_string(&line).map_err(|_| std::fmt::Error)?;
        writer.write_str(&text)?;
        writer.write_char('\n')
    }
}

fn level_name(level: Level) -> &'static str {
    match level {
        Level::ERROR => "error",
        Level::WARN => "warn",
        Level::INFO => "info",
        Level::DEBUG => "debug",
        Level::TRACE => "trace",
    }
}

/// An event's fields as JSON values (numbers and booleans keep their type).
struct JsonFields(serde_json::Map<String, serde_json::Value>);

impl Visit for JsonFields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().into(), format!("{value:?}").into());
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0.insert(field.name().into(), value.to_string().into());
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};

    use super::*;

    #[test]
    fn verbosity_moves_the_default_level_and_keeps_target_directives() {
        assert_eq!(filter_directives(DEFAULT_FILTER, 0), DEFAULT_FILTER);
        assert_eq!(filter_directives(DEFAULT_FILTER, 1), "debug,opentelemetry=warn");
        assert_eq!(filter_directives(DEFAULT_FILTER, 2), "trace,opentelemetry=warn");
        assert_eq!(filter_directives(DEFAULT_FILTER, 5), "trace,opentelemetry=warn");
        assert_eq!(filter_directives(DEFAULT_FILTER, -1), "warn,opentelemetry=warn");
        assert_eq!(filter_directives(DEFAULT_FILTER, -2), "error,opentelemetry=warn");
        assert_eq!(filter_directives(DEFAULT_FILTER, -9), "off,opentelemetry=warn");
        // A RUST_LOG without a default level starts from info.
        assert_eq!(filter_directives("rdkafka=debug", -1), "warn,rdkafka=debug");
        assert_eq!(filter_directives("attrstream=trace, warn", 1), "info,attrstream=trace");
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        use std::ffi::OsStr;
        assert!(use_colour(true, None));
        assert!(use_colour(true, Some(OsStr::new(""))));
        assert!(!use_colour(true, Some(OsStr::new("1"))));
        assert!(!use_colour(false, None));
    }

    /// Captures what a subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = CapturedWriter;
        fn make_writer(&'a self) -> Self::Writer {
            CapturedWriter(self.0.clone())
        }
    }

    struct CapturedWriter(Arc<Mutex<Vec<u8>>>);

    impl Write for CapturedWriter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn json_lines(captured: &Captured) -> Vec<serde_json::Value> {
        let bytes = captured.0.lock().unwrap().clone();
        String::from_utf8(bytes)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
            .collect()
    }

    #[test]
    fn json_lines_carry_fields_and_the_current_trace() {
        let captured = Captured::default();
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .with_writer(captured.clone())
                .with_ansi(false)
                .event_format(JsonLines),
        );
        let trace_id = TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap();
        let span_id = SpanId::from_hex("00f067aa0ba902b7").unwrap();
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(
                partition = 3,
                reason = "bad_framing",
                retried = true,
                "dead-lettered \"x\""
            );
            let remote = SpanContext::new(trace_id, span_id, TraceFlags::SAMPLED, true, TraceState::default());
            let _attached = opentelemetry::Context::current()
                .with_remote_span_context(remote)
                .attach();
            let _span = tracing::info_span!("model_swap").entered();
            tracing::info!(version = 2.5, "inside");
        });
        let lines = json_lines(&captured);
        assert_eq!(lines.len(), 2);
        let first = &lines[0];
        assert_eq!(first["level"], "warn");
        assert_eq!(first["message"], "dead-lettered \"x\"");
        assert_eq!(first["partition"], 3);
        assert_eq!(first["reason"], "bad_framing");
        assert_eq!(first["retried"], true);
        assert!(first["target"].as_str().unwrap().starts_with("attrstream"));
        chrono::DateTime::parse_from_rfc3339(first["timestamp"].as_str().unwrap()).unwrap();
        assert!(
            first.get("trace_id").is_none(),
            "no trace outside a traced context: {first}"
        );
        let second = &lines[1];
        assert_eq!(second["version"], 2.5);
        assert_eq!(second["span"], "model_swap");
        assert_eq!(second["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(second["span_id"], "00f067aa0ba902b7");
    }
}
