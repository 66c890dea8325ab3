//! attrstream turns product photos into product attributes.
//!
//! Layout, one line per module:
//! * [`cli`]: command-line interface (clap), one subcommand per job.
//! * [`commands`]: the implementation of each subcommand.
//! * [`device`]: CUDA/CPU device discovery and `--device` parsing.
//! * [`preprocess`]: image decoding with pixel limits and EXIF orientation; tensors.
//! * [`model`]: the detectors (Faster R-CNN ResNet-50 FPN), their ops and weights.
//! * [`detection`]: a loaded detector on one device and the detections users consume.
//! * [`annotate`]: drawing detections onto images.
//! * [`events`]: the Kafka contracts: records, Avro codec, Confluent framing, schema registry.
//! * [`fetch`]: image fetching (inline, file, http(s), s3) with limits, retries and an SSRF guard.
//! * [`exit`]: the exit codes (0 success, 1 some inputs failed, 2 usage, 3 runtime failure).
//! * [`brokers`]: bounded waiting for the Kafka brokers in the one-shot commands.
//! * [`kafka_errors`]: librdkafka's global errors, rate-limited in the logs.
//! * [`config`]: the service settings (TOML file, `ATTRSTREAM_*__*` environment, CLI) and validation.
//! * [`source`]: the Kafka consumer thread and the per-partition offset tracker (at-least-once).
//! * [`batcher`]: dynamic batching (max size, max wait, pixel budget, eager when a worker idles).
//! * [`workers`]: one inference thread per device with its own model replica; restart on failure.
//! * [`sink`]: producing attribute records and dead letters; completions after broker acks;
//!   the optional PostgreSQL sink ([`sink::postgres`]).
//! * [`pipeline`]: the serve pipeline wired end to end.
//! * [`serve`]: what `serve` and `demo` share: config from the CLI, detector workers, signals.
//! * [`embedded_broker`]: the in-process Kafka-protocol broker for `demo`, tests and benchmarks.
//! * [`attributes`]: detections → aggregated product attributes (labels, main object, colours).
//! * [`train`]: replaying labelled images, fine-tuning, COCO evaluation, the model registry.
//! * [`progress`]: progress of long work: a bar on a terminal, periodic log lines otherwise.
//! * [`telemetry`]: OpenTelemetry traces and metrics (OTLP), Prometheus /metrics, /healthz, /readyz.

pub mod annotate;
pub mod attributes;
pub mod batcher;
pub mod brokers;
pub mod cli;
pub mod commands;
pub mod config;
pub mod detection;
pub mod device;
pub mod embedded_broker;
pub mod events;
pub mod exit;
pub mod fetch;
pub mod kafka_errors;
pub mod model;
pub mod pipeline;
pub mod preprocess;
pub mod progress;
pub mod serve;
pub mod sink;
pub mod source;
pub mod telemetry;
pub mod train;
pub mod workers;
