//! Per-event traces: an `event` span whose parent is the W3C trace context the producer put
//! in the input record's `traceparent`/`tracestate` headers, with one child span per stage
//! (fetch, decode, batch_wait, inference, produce, and database when that sink is on).
//!
//! Stages run on different tasks and threads (inference runs batched on worker threads), so
//! child spans are recorded after the fact with the start and end times the pipeline
//! measured, rather than kept open across threads. Every event of a batch gets its own
//! `inference` span with the batch's times and size: someone reading one event's trace in
//! Jaeger or Tempo sees the whole way of that event, including the model, in one waterfall,
//! which a single batch span with links to N traces would not show.
//!
//! Output and dead-letter records carry the `event` span's context in their
//! `traceparent`/`tracestate` headers (other input headers are kept), so downstream
//! consumers continue the same trace. With tracing off (no OTLP traces endpoint) no span is
//! made and the input headers pass through unchanged: the trace still continues, through us.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{Span as _, SpanKind, Status, TraceContextExt, Tracer as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracer;

use super::metrics::Stage;

/// The W3C trace-context header names (Kafka header keys, lower case).
const TRACE_HEADERS: [&str; 2] = ["traceparent", "tracestate"];

/// Kafka headers as a propagation carrier (keys compared case-insensitively; values that
/// are not UTF-8 are ignored).
pub struct KafkaHeaders<'a>(pub &'a [(String, Vec<u8>)]);

impl Extractor for KafkaHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_str()).collect()
    }
}

/// Collects injected headers.
struct HeaderSink(Vec<(String, Vec<u8>)>);

impl Injector for HeaderSink {
    fn set(&mut self, key: &str, value: String) {
        self.0.push((key.to_string(), value.into_bytes()));
    }
}

/// Starts event traces; off when no tracer provider exports spans.
#[derive(Clone, Default)]
pub struct Tracing {
    tracer: Option<SdkTracer>,
}

impl std::fmt::Debug for Tracing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracing").field("on", &self.tracer.is_some()).finish()
    }
}

impl Tracing {
    /// Tracing with `tracer`, or off with `None`.
    pub(crate) fn new(tracer: Option<SdkTracer>) -> Self {
        Self { tracer }
    }

    /// True when spans are made and exported.
    pub fn is_on(&self) -> bool {
        self.tracer.is_some()
    }

    /// Starts the `event` span of a consumed message at `received`, as a child of the
    /// producer's context in `headers` (a new trace when there is none).
    pub fn start_event(
        &self,
        headers: &[(String, Vec<u8>)],
        topic: &str,
        partition: i32,
        offset: i64,
        received: Instant,
    ) -> EventTrace {
        let Some(tracer) = &self.tracer else {
            return EventTrace::default();
        };
        let parent = TraceContextPropagator::new().extract_with_context(&Context::new(), &KafkaHeaders(headers));
        let span = tracer
            .span_builder("event")
            .with_kind(SpanKind::Consumer)
            .with_start_time(wall_time(received))
            .with_attributes([
                KeyValue::new("messaging.system", "kafka"),
                KeyValue::new("messaging.operation.name", "process"),
                KeyValue::new("messaging.destination.name", topic.to_string()),
                KeyValue::new("messaging.destination.partition.id", partition.to_string()),
                KeyValue::new("messaging.kafka.offset", offset),
            ])
            .start_with_context(tracer, &parent);
        EventTrace {
            inner: Some(Arc::new(EventSpan {
                cx: parent.with_span(span),
                tracer: tracer.clone(),
            })),
        }
    }
}

struct EventSpan {
    /// Holds the `event` span; the parent of every stage span.
    cx: Context,
    tracer: SdkTracer,
}

/// One event's trace; empty (every method a no-op) when tracing is off. Cheap to clone.
#[derive(Clone, Default)]
pub struct EventTrace {
    inner: Option<Arc<EventSpan>>,
}

impl std::fmt::Debug for EventTrace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner {
            Some(s) => {
                let span = s.cx.span();
                let sc = span.span_context();
                write!(f, "EventTrace({}-{})", sc.trace_id(), sc.span_id())
            }
            None => f.write_str("EventTrace(off)"),
        }
    }
}

impl EventTrace {
    /// True when this event is traced.
    pub fn is_on(&self) -> bool {
        self.inner.is_some()
    }

    /// Names the event on its span once its payload is decoded.
    pub fn set_event(&self, event_id: &str, product_id: &str) {
        if let Some(s) = &self.inner {
            s.cx.span().set_attributes([
                KeyValue::new("attrstream.event.id", event_id.to_string()),
                KeyValue::new("attrstream.product.id", product_id.to_string()),
                KeyValue::new("messaging.message.id", event_id.to_string()),
            ]);
        }
    }

    /// Records a finished stage as a child span from `start` to `end`.
    pub fn stage(&self, stage: Stage, start: Instant, end: Instant) {
        self.stage_with(stage, start, end, Vec::new);
    }

    /// [`Self::stage`] with attributes (built only when traced).
    pub fn stage_with(&self, stage: Stage, start: Instant, end: Instant, attributes: impl FnOnce() -> Vec<KeyValue>) {
        let Some(s) = &self.inner else { return };
        let kind = if stage == Stage::Produce {
            SpanKind::Producer
        } else {
            SpanKind::Internal
        };
        let mut span = s
            .tracer
            .span_builder(stage.as_str())
            .with_kind(kind)
            .with_start_time(wall_time(start))
            .with_attributes(attributes())
            .start_with_context(&s.tracer, &s.cx);
        span.end_with_timestamp(wall_time(end));
    }

    /// Marks the event as failed with the dead-letter `kind`.
    pub fn fail(&self, kind: &str, message: &str) {
        if let Some(s) = &self.inner {
            let span = s.cx.span();
            span.set_attribute(KeyValue::new("error.type", kind.to_string()));
            span.set_status(Status::error(message.to_string()));
        }
    }

    /// Ends the `event` span now (after the output or dead letter was acknowledged).
    pub fn end(&self) {
        if let Some(s) = &self.inner {
            s.cx.span().end();
        }
    }

    /// The headers for this event's output record: the input's, with `traceparent` and
    /// `tracestate` replaced by the `event` span's (unchanged when tracing is off).
    pub fn output_headers<'a>(&self, input: &'a [(String, Vec<u8>)]) -> Cow<'a, [(String, Vec<u8>)]> {
        let Some(s) = &self.inner else {
            return Cow::Borrowed(input);
        };
        let mut headers: Vec<(String, Vec<u8>)> = input.iter().filter(|(k, _)| !is_trace_header(k)).cloned().collect();
        headers.extend(inject(&s.cx));
        Cow::Owned(headers)
    }

    /// Only the trace-context headers for this event's records (dead letters): ours when
    /// traced, else the input's.
    pub fn trace_headers(&self, input: &[(String, Vec<u8>)]) -> Vec<(String, Vec<u8>)> {
        match &self.inner {
            Some(s) => inject(&s.cx),
            None => input.iter().filter(|(k, _)| is_trace_header(k)).cloned().collect(),
        }
    }
}

fn is_trace_header(key: &str) -> bool {
    TRACE_HEADERS.iter().any(|h| key.eq_ignore_ascii_case(h))
}

fn inject(cx: &Context) -> Vec<(String, Vec<u8>)> {
    let mut sink = HeaderSink(Vec::with_capacity(2));
    TraceContextPropagator::new().inject_context(cx, &mut sink);
    sink.0
}

/// The wall-clock time of a monotonic instant (spans carry wall-clock times).
pub(crate) fn wall_time(t: Instant) -> SystemTime {
    let (now, wall) = (Instant::now(), SystemTime::now());
    if t <= now {
        wall - (now - t)
    } else {
        wall + (t - now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untraced_events_pass_headers_through() {
        let trace = Tracing::default().start_event(&[], "in", 0, 0, Instant::now());
        let input = vec![
            (
                "traceparent".to_string(),
                b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_vec(),
            ),
            ("x-tenant".to_string(), b"a".to_vec()),
        ];
        assert!(matches!(trace.output_headers(&input), Cow::Borrowed(_)));
        assert_eq!(trace.trace_headers(&input), input[..1].to_vec());
    }

    #[test]
    fn extractor_reads_headers_case_insensitively() {
        let headers = vec![
            ("TraceParent".to_string(), b"abc".to_vec()),
            ("bin".to_string(), vec![0xff]),
        ];
        let e = KafkaHeaders(&headers);
        assert_eq!(e.get("traceparent"), Some("abc"));
        assert_eq!(e.get("bin"), None);
        assert_eq!(e.keys(), vec!["TraceParent", "bin"]);
    }
}
