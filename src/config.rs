//! The service's settings: one serde tree, layered defaults → TOML file → environment → CLI.
//!
//! Environment variables use the prefix `ATTRSTREAM_` and `__` between levels, e.g.
//! `ATTRSTREAM_KAFKA__BOOTSTRAP_SERVERS=broker:9092` or `ATTRSTREAM_BATCH__MAX_WAIT=5ms`.
//! Only variables with a `__` are read, so `ATTRSTREAM_THREADS` and friends stay CLI-only.
//! Unknown keys are errors (a typo must not silently fall back to a default), and
//! [`Config::validate`] names the key that is wrong and what to put there.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use crate::attributes::ColourConfig;
use crate::exit::UsageContext;
use crate::fetch::FetchConfig;

/// Everything `attrstream serve` (and `demo`, `publish`, `tail`) can be told.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Brokers, topics, group and librdkafka pass-through options.
    pub kafka: KafkaConfig,
    /// Wire formats and schema ids of the three topics.
    pub schemas: SchemaConfig,
    /// Image fetching: limits, timeouts, retries, SSRF guard.
    pub fetch: FetchConfig,
    /// Image decoding on the CPU pool.
    pub decode: DecodeConfig,
    /// Dynamic batching in front of the inference workers.
    pub batch: BatchConfig,
    /// Which model, on which devices.
    pub model: ModelConfig,
    /// Dominant-colour extraction for the attribute records.
    pub attributes: ColourConfig,
    /// In-flight limits, retries and shutdown.
    pub pipeline: PipelineConfig,
    /// The HTTP endpoints (/metrics, /healthz, /readyz) and the service name in telemetry.
    pub telemetry: TelemetryConfig,
    /// The optional PostgreSQL sink (off unless `url` is set).
    pub database: crate::sink::postgres::DatabaseConfig,
}

/// Kafka connection and topics.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// `bootstrap.servers` of the cluster.
    pub bootstrap_servers: String,
    /// Consumer group: every replica of one deployment shares it and splits the partitions.
    pub group_id: String,
    /// Topic of ProductImageEvent records.
    pub input_topic: String,
    /// Topic the ProductAttributes records go to (key = product id).
    pub output_topic: String,
    /// Topic for messages that cannot be processed, with the reason.
    pub dead_letter_topic: String,
    /// librdkafka properties for every client (security.protocol, sasl.*, ssl.*, …).
    /// In the environment write dots as `_`: `ATTRSTREAM_KAFKA__OPTIONS__SECURITY_PROTOCOL`.
    #[serde(deserialize_with = "scalar_string_map")]
    pub options: BTreeMap<String, String>,
    /// librdkafka properties for the consumer only (applied after `options`).
    #[serde(deserialize_with = "scalar_string_map")]
    pub consumer_options: BTreeMap<String, String>,
    /// librdkafka properties for the producer only (applied after `options`).
    #[serde(deserialize_with = "scalar_string_map")]
    pub producer_options: BTreeMap<String, String>,
    /// How often stored offsets are committed (they are also committed on rebalance and shutdown).
    #[serde(with = "humantime_serde")]
    pub commit_interval: Duration,
    /// How long the one-shot commands (publish, tail, publish-labels, train, eval --model) wait
    /// for the brokers to answer before they give up with exit code 3. `serve` keeps waiting.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            bootstrap_servers: "localhost:9092".into(),
            group_id: "attrstream".into(),
            input_topic: "product-images".into(),
            output_topic: "product-attributes".into(),
            dead_letter_topic: "product-images-dlq".into(),
            options: BTreeMap::new(),
            consumer_options: BTreeMap::new(),
            producer_options: BTreeMap::new(),
            commit_interval: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(30),
        }
    }
}

/// How input values are framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum InputFormat {
    /// Confluent wire format: magic byte 0, 4-byte schema id, Avro binary.
    #[default]
    Confluent,
    /// Bare Avro binary written with `schemas.raw_writer_schema` (default: ours).
    Raw,
}

/// Schema registry and schema ids.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchemaConfig {
    /// Confluent-compatible schema registry, e.g. `http://schema-registry:8081`.
    pub registry_url: Option<String>,
    /// Basic-auth user for the registry.
    pub registry_username: Option<String>,
    /// Basic-auth password for the registry (never logged).
    pub registry_password: Option<String>,
    /// Register our output schemas under `<topic>-value` on start when they are missing.
    pub auto_register: bool,
    /// Framing of input values.
    pub input_format: InputFormat,
    /// Accept only this writer schema id (Confluent input without a registry).
    pub input_schema_id: Option<u32>,
    /// Writer schema file (.avsc) of raw input; default: `schemas/product_image_event.avsc`.
    pub raw_writer_schema: Option<PathBuf>,
    /// Schema id written into output records when there is no registry.
    pub output_schema_id: Option<u32>,
    /// Schema id written into dead letters when there is no registry.
    pub dead_letter_schema_id: Option<u32>,
}

impl Default for SchemaConfig {
    fn default() -> Self {
        Self {
            registry_url: None,
            registry_username: None,
            registry_password: None,
            auto_register: true,
            input_format: InputFormat::Confluent,
            input_schema_id: None,
            raw_writer_schema: None,
            output_schema_id: None,
            dead_letter_schema_id: None,
        }
    }
}

impl std::fmt::Debug for SchemaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchemaConfig")
            .field("registry_url", &self.registry_url)
            .field("registry_username", &self.registry_username)
            .field("registry_password", &self.registry_password.as_ref().map(|_| REDACTED))
            .field("auto_register", &self.auto_register)
            .field("input_format", &self.input_format)
            .field("input_schema_id", &self.input_schema_id)
            .field("raw_writer_schema", &self.raw_writer_schema)
            .field("output_schema_id", &self.output_schema_id)
            .field("dead_letter_schema_id", &self.dead_letter_schema_id)
            .finish()
    }
}

/// Image decoding.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DecodeConfig {
    /// Images declaring more pixels are refused from their header, before decoding.
    pub max_pixels: u64,
    /// Threads decoding images and computing colours (0 = one per core, at least 1).
    pub threads: usize,
}

impl Default for DecodeConfig {
    fn default() -> Self {
        Self {
            max_pixels: crate::preprocess::DEFAULT_MAX_PIXELS,
            threads: 0,
        }
    }
}

/// Dynamic batching.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// Most images in one forward pass.
    pub max_batch_size: usize,
    /// Longest the first image of a batch waits for company before the batch goes anyway.
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
    /// Most decoded pixels (sum of width × height) in one batch; bounds device memory.
    pub max_batch_pixels: u64,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_batch_size: 8,
            max_wait: Duration::from_millis(10),
            max_batch_pixels: 64_000_000,
        }
    }
}

/// The model and where it runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Weights file (safetensors from `attrstream model …`); default: the Faster R-CNN COCO
    /// checkpoint if fetched, else the offline SSD MobileNetV2 model.
    pub weights: Option<PathBuf>,
    /// One inference worker per entry (`cpu`, `cuda:0`, …; repeat a device for two workers
    /// on it). Empty: every CUDA device, else one CPU worker.
    pub devices: Vec<String>,
    /// Intra-op threads per CPU worker (0 = cores divided by CPU workers).
    pub threads_per_worker: usize,
    /// Detections below this score are dropped.
    pub score_threshold: f32,
    /// Faster R-CNN: keep torchvision's exact operation order (slower) instead of the fast path.
    pub exact: bool,
    /// Model name in output records (default: the weights file stem).
    pub name: Option<String>,
    /// Model version in output records (default: first 12 hex digits of the weights' sha256).
    pub version: Option<String>,
    /// Model registry (a directory, `file:///dir` or `s3://bucket/prefix`) whose production
    /// version is the model to run and to follow; `attrstream model registry` uses it when
    /// `--registry` is not given. See docs/model-registry.md.
    pub registry: Option<String>,
    /// Where weights downloaded from the registry are kept, named by their sha256.
    pub registry_cache_dir: PathBuf,
    /// How often `serve` checks the registry for a new production version and swaps it in
    /// without stopping; 0 serves the version found at start-up until the end.
    #[serde(with = "humantime_serde")]
    pub registry_poll_interval: Duration,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            weights: None,
            devices: Vec::new(),
            threads_per_worker: 0,
            score_threshold: 0.5,
            exact: false,
            name: None,
            version: None,
            registry: None,
            registry_cache_dir: PathBuf::from(crate::train::registry::DEFAULT_CACHE_DIR),
            registry_poll_interval: Duration::from_secs(30),
        }
    }
}

/// Flow control, retries and shutdown.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Most messages between consumption and acknowledged output; above it the consumer
    /// pauses (still polling, so the group keeps it) and resumes at half.
    pub max_in_flight: usize,
    /// On SIGTERM/SIGINT, how long to drain in-flight work before committing and leaving.
    #[serde(with = "humantime_serde")]
    pub shutdown_deadline: Duration,
    /// Times a failed batch is retried (image by image, on a restarted worker) before its
    /// images are dead-lettered.
    pub inference_retries: u32,
    /// Times a failed produce (output or dead letter) is retried before the service stops
    /// without committing that message (it is redelivered after restart).
    pub produce_retries: u32,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            max_in_flight: 512,
            shutdown_deadline: Duration::from_secs(30),
            inference_retries: 1,
            produce_retries: 5,
        }
    }
}

/// Telemetry that is configured here rather than by the standard `OTEL_*` variables (which
/// alone configure OTLP export; see [`crate::telemetry`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Address of the HTTP server for /metrics (Prometheus text), /healthz and /readyz;
    /// `""` disables it.
    pub listen: String,
    /// `service.name` of exported traces and metrics (`OTEL_SERVICE_NAME` takes precedence).
    pub service_name: String,
    /// `/healthz` fails when messages are in flight and none has completed for this long (a
    /// hung inference worker or database call). Must exceed the slowest batch and the
    /// PostgreSQL sink's worst retry time.
    #[serde(with = "humantime_serde")]
    pub stall_timeout: Duration,
    /// Log line format: "text" for people, "json" (one object per line with trace ids) for log
    /// pipelines. `--log-format` on the command line wins.
    pub log_format: crate::telemetry::logging::LogFormat,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:9464".into(),
            service_name: "attrstream".into(),
            stall_timeout: crate::telemetry::health::DEFAULT_STALL_TIMEOUT,
            log_format: crate::telemetry::logging::LogFormat::Text,
        }
    }
}

impl TelemetryConfig {
    /// The listen address, or `None` when the HTTP server is disabled; errors name the key.
    pub fn listen_addr(&self) -> Result<Option<std::net::SocketAddr>> {
        let listen = self.listen.trim();
        if listen.is_empty() {
            return Ok(None);
        }
        listen.parse().map(Some).map_err(|_| {
            anyhow::anyhow!(
                "telemetry.listen `{listen}` is not an IP address and port such as \"0.0.0.0:9464\" \
                 (or \"\" to disable the HTTP server)"
            )
        })
    }

    fn validate(&self) -> Result<()> {
        self.listen_addr()?;
        if self.service_name.trim().is_empty() {
            bail!("telemetry.service_name must not be empty (e.g. \"attrstream\")");
        }
        if self.stall_timeout.is_zero() {
            bail!("telemetry.stall_timeout must be longer than 0 (e.g. \"5m\")");
        }
        Ok(())
    }
}

const REDACTED: &str = "<redacted>";

/// librdkafka takes every property as a string, but TOML and environment variables give
/// `true` or `5000` typed values: accept any scalar and keep its text.
fn scalar_string_map<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        Text(String),
        Bool(bool),
        Int(i64),
        Float(f64),
    }
    let raw = BTreeMap::<String, Scalar>::deserialize(d)?;
    Ok(raw
        .into_iter()
        .map(|(k, v)| {
            let text = match v {
                Scalar::Text(s) => s,
                Scalar::Bool(b) => b.to_string(),
                Scalar::Int(i) => i.to_string(),
                Scalar::Float(f) => f.to_string(),
            };
            (k, text)
        })
        .collect())
}

/// True for librdkafka property names whose values are secrets.
pub fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    [
        "password",
        "secret",
        "sasl.oauthbearer.config",
        "ssl.key.pem",
        "ssl_key",
        "token",
    ]
    .iter()
    .any(|needle| k.contains(needle))
}

/// librdkafka options with secret values replaced, for logging.
pub fn redact(options: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    options
        .iter()
        .map(|(k, v)| {
            let v = if is_secret_key(k) {
                REDACTED.to_string()
            } else {
                v.clone()
            };
            (k.clone(), v)
        })
        .collect()
}

/// librdkafka property names use dots; environment variables cannot, so a key without
/// any dot has its underscores turned into dots (`security_protocol` → `security.protocol`).
pub fn normalize_kafka_key(key: &str) -> String {
    if key.contains('.') {
        key.to_string()
    } else {
        key.replace('_', ".")
    }
}

impl Config {
    /// Layers defaults, the TOML file (if any), `ATTRSTREAM_*__*` environment variables and
    /// `overrides` (dotted keys with TOML values, e.g. `batch.max_batch_size=16`), then validates.
    /// Every error is a usage error (exit code 2, see [`crate::exit`]).
    pub fn load(file: Option<&Path>, overrides: &[(String, String)]) -> Result<Self> {
        let config = Self::load_unvalidated(file, overrides)?;
        config.validate()?;
        Ok(config)
    }

    /// [`Config::load`] without [`Config::validate`], for callers that validate with other
    /// requirements (see [`Config::validate_without_serve_schemas`]) or show the configuration
    /// before validating it (`serve --print-config`).
    pub fn load_unvalidated(file: Option<&Path>, overrides: &[(String, String)]) -> Result<Self> {
        Self::layered(file, overrides).usage()
    }

    fn layered(file: Option<&Path>, overrides: &[(String, String)]) -> Result<Self> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.exists() {
                bail!("config file {} not found", path.display());
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        figment = figment.merge(
            Env::prefixed("ATTRSTREAM_")
                .filter(|key| key.as_str().contains("__"))
                .split("__"),
        );
        for (key, value) in overrides {
            figment = figment.merge(Serialized::global(key.as_str(), parse_override_value(value)));
        }
        let config: Config = figment.extract().map_err(|e| {
            let mut messages: Vec<String> = e.into_iter().map(|e| e.to_string()).collect();
            messages.dedup();
            anyhow::anyhow!("invalid configuration: {}", messages.join("; "))
        })?;
        Ok(config)
    }

    /// Checks what serde cannot: ranges, topic names, schema-id sources. Errors name the key
    /// and are usage errors (exit code 2).
    pub fn validate(&self) -> Result<()> {
        self.check().usage()
    }

    fn check(&self) -> Result<()> {
        let k = &self.kafka;
        for (key, value) in [
            ("kafka.bootstrap_servers", &k.bootstrap_servers),
            ("kafka.group_id", &k.group_id),
            ("kafka.input_topic", &k.input_topic),
            ("kafka.output_topic", &k.output_topic),
            ("kafka.dead_letter_topic", &k.dead_letter_topic),
        ] {
            if value.trim().is_empty() {
                bail!("{key} must not be empty");
            }
        }
        if k.input_topic == k.output_topic || k.input_topic == k.dead_letter_topic {
            bail!(
                "kafka.input_topic `{}` must differ from kafka.output_topic and kafka.dead_letter_topic \
                 (the service would consume its own output)",
                k.input_topic
            );
        }
        for (key, value) in k.options.iter().chain(&k.consumer_options) {
            let key = normalize_kafka_key(key);
            if matches!(
                key.as_str(),
                "enable.auto.offset.store" | "group.id" | "bootstrap.servers" | "enable.auto.commit"
            ) {
                bail!(
                    "kafka option `{key}` = `{value}` is managed by attrstream (at-least-once offset \
                     handling or a dedicated key such as kafka.group_id); remove it"
                );
            }
        }
        if k.connect_timeout.is_zero() {
            bail!("kafka.connect_timeout must be longer than 0 (e.g. \"30s\")");
        }
        let b = &self.batch;
        if b.max_batch_size == 0 {
            bail!("batch.max_batch_size must be at least 1");
        }
        if b.max_batch_pixels == 0 {
            bail!("batch.max_batch_pixels must be at least 1");
        }
        if self.decode.max_pixels == 0 {
            bail!("decode.max_pixels must be at least 1");
        }
        if self.pipeline.max_in_flight == 0 {
            bail!("pipeline.max_in_flight must be at least 1");
        }
        if !(0.0..=1.0).contains(&self.model.score_threshold) {
            bail!(
                "model.score_threshold must be in [0, 1], got {}",
                self.model.score_threshold
            );
        }
        if let Some(location) = &self.model.registry {
            crate::train::registry::parse_location(location).context("model.registry")?;
            if self.model.weights.is_some() {
                bail!("model.weights and model.registry are both set; set one (the registry names the weights)");
            }
        }
        for spec in &self.model.devices {
            crate::device::parse_device(spec).with_context(|| format!("model.devices entry `{spec}`"))?;
        }
        self.attributes.validate().map_err(anyhow::Error::msg)?;
        self.fetch.validate()?;
        self.validate_serve_schemas()?;
        self.telemetry.validate()?;
        self.database.validate()?;
        self.validate_stall_timeout()?;
        self.validate_registry_credentials()
    }

    /// [`Config::validate`] without requiring the serve topics' schema ids: for commands that
    /// read or write other topics (train, publish-labels) and do not serve.
    pub fn validate_without_serve_schemas(&self) -> Result<()> {
        let mut relaxed = self.clone();
        let s = &mut relaxed.schemas;
        s.input_schema_id = s.input_schema_id.or(Some(0));
        s.output_schema_id = s.output_schema_id.or(Some(0));
        s.dead_letter_schema_id = s.dead_letter_schema_id.or(Some(0));
        relaxed.validate()
    }

    /// With the PostgreSQL sink on, `telemetry.stall_timeout` must outlast its retries, or a
    /// database that recovers slowly would get healthy pods restarted.
    fn validate_stall_timeout(&self) -> Result<()> {
        if !self.database.enabled() {
            return Ok(());
        }
        let worst = self.database.worst_retry_time();
        if self.telemetry.stall_timeout <= worst {
            bail!(
                "telemetry.stall_timeout ({:?}) must be longer than the PostgreSQL sink's worst retry time \
                 (about {:?} with database.retries = {} and database.connect_timeout = {:?}): raise it, or lower those",
                self.telemetry.stall_timeout,
                worst,
                self.database.retries,
                self.database.connect_timeout
            );
        }
        Ok(())
    }

    /// Without a schema registry, the ids of the serve topics' schemas must be configured.
    fn validate_serve_schemas(&self) -> Result<()> {
        let s = &self.schemas;
        if s.registry_url.is_none() {
            if s.input_format == InputFormat::Confluent && s.input_schema_id.is_none() {
                bail!(
                    "schemas.input_schema_id is needed when schemas.registry_url is not set \
                     (or set schemas.input_format = \"raw\")"
                );
            }
            if s.output_schema_id.is_none() || s.dead_letter_schema_id.is_none() {
                bail!(
                    "schemas.output_schema_id and schemas.dead_letter_schema_id are needed when \
                     schemas.registry_url is not set"
                );
            }
        }
        Ok(())
    }

    /// A registry password needs its user name.
    fn validate_registry_credentials(&self) -> Result<()> {
        let s = &self.schemas;
        if s.registry_password.is_some() && s.registry_username.is_none() {
            bail!("schemas.registry_password is set but schemas.registry_username is not");
        }
        Ok(())
    }

    /// Decode/colour threads after resolving `0` to the number of cores.
    pub fn decode_threads(&self) -> usize {
        if self.decode.threads > 0 {
            self.decode.threads
        } else {
            available_cores()
        }
    }
}

/// Cores this process may use (at least 1).
pub fn available_cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Parses `--set` values as TOML (numbers, booleans, arrays, quoted strings), else as a bare string.
fn parse_override_value(raw: &str) -> figment::value::Value {
    let doc = format!("v = {raw}");
    match doc.parse::<toml::Table>() {
        Ok(table) => {
            let value = table.get("v").cloned().unwrap_or(toml::Value::String(raw.to_string()));
            figment::value::Value::serialize(value).unwrap_or_else(|_| raw.into())
        }
        Err(_) => raw.into(),
    }
}

/// Splits `key=value` arguments of `--set`.
pub fn parse_set_arg(arg: &str) -> Result<(String, String), String> {
    let (key, value) = arg
        .split_once('=')
        .ok_or_else(|| format!("`{arg}` is not KEY=VALUE (e.g. batch.max_batch_size=16)"))?;
    if key.trim().is_empty() {
        return Err(format!("`{arg}` has an empty key"));
    }
    Ok((key.trim().to_string(), value.trim().to_string()))
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
mod tests {
    use super::*;

    fn fixed_ids() -> Vec<(String, String)> {
        vec![
            ("schemas.input_schema_id".into(), "1".into()),
            ("schemas.output_schema_id".into(), "2".into()),
            ("schemas.dead_letter_schema_id".into(), "3".into()),
        ]
    }

    #[test]
    fn layers_file_env_and_overrides_in_order() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "serve.toml",
                "[kafka]\ngroup_id = \"from-file\"\ninput_topic = \"in-file\"\n[batch]\nmax_wait = \"25ms\"\n",
            )?;
            jail.set_env("ATTRSTREAM_KAFKA__GROUP_ID", "from-env");
            jail.set_env("ATTRSTREAM_KAFKA__OPTIONS__SECURITY_PROTOCOL", "SASL_SSL");
            jail.set_env("ATTRSTREAM_THREADS", "3");
            let mut sets = fixed_ids();
            sets.push(("batch.max_batch_size".into(), "16".into()));
            let c = Config::load(Some(Path::new("serve.toml")), &sets).map_err(|e| e.to_string())?;
            assert_eq!(c.kafka.group_id, "from-env");
            assert_eq!(c.kafka.input_topic, "in-file");
            assert_eq!(c.batch.max_wait, Duration::from_millis(25));
            assert_eq!(c.batch.max_batch_size, 16);
            assert_eq!(
                c.kafka.options.get("security_protocol").map(String::as_str),
                Some("SASL_SSL")
            );
            assert_eq!(normalize_kafka_key("security_protocol"), "security.protocol");
            Ok(())
        });
    }

    #[test]
    fn errors_name_the_key() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("bad.toml", "[batch]\nmax_batch_sise = 4\n")?;
            let err = Config::load(Some(Path::new("bad.toml")), &fixed_ids())
                .unwrap_err()
                .to_string();
            assert!(err.contains("max_batch_sise"), "{err}");
            jail.create_file("bad2.toml", "[batch]\nmax_batch_size = \"many\"\n")?;
            let err = Config::load(Some(Path::new("bad2.toml")), &fixed_ids())
                .unwrap_err()
                .to_string();
            assert!(err.contains("batch.max_batch_size"), "{err}");
            let mut sets = fixed_ids();
            sets.push(("batch.max_batch_size".into(), "0".into()));
            let err = Config::load(None, &sets).unwrap_err().to_string();
            assert!(err.contains("batch.max_batch_size"), "{err}");
            let err = Config::load(None, &[]).unwrap_err().to_string();
            assert!(err.contains("schemas.input_schema_id"), "{err}");
            jail.set_env("ATTRSTREAM_KAFKA__OPTIONS__ENABLE_AUTO_OFFSET_STORE", "true");
            let err = Config::load(None, &fixed_ids()).unwrap_err().to_string();
            assert!(err.contains("enable.auto.offset.store"), "{err}");
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's closure returns figment::Error
    fn stall_timeout_is_positive_and_outlasts_database_retries() {
        figment::Jail::expect_with(|_| {
            let with = |extra: &[(&str, &str)]| {
                let mut sets = fixed_ids();
                sets.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
                Config::load(None, &sets)
            };
            let err = with(&[("telemetry.stall_timeout", "\"0s\"")]).unwrap_err().to_string();
            assert!(err.contains("telemetry.stall_timeout"), "{err}");
            let db = ("database.url", "\"postgres://writer@db:5432/attrs\"");
            let loaded = with(&[db]).unwrap();
            assert!(loaded.telemetry.stall_timeout > loaded.database.worst_retry_time());
            let err = with(&[db, ("telemetry.stall_timeout", "\"30s\"")])
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("telemetry.stall_timeout") && err.contains("database.retries"),
                "{err}"
            );
            with(&[db, ("telemetry.stall_timeout", "\"30s\""), ("database.retries", "0")]).unwrap();
            Ok(())
        });
    }

    #[test]
    fn shipped_example_config_parses_and_matches_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/config/attrstream.toml");
        let loaded = Config::load(Some(&path), &fixed_ids()).unwrap();
        let mut expected = Config::default();
        expected.schemas.input_schema_id = Some(1);
        expected.schemas.output_schema_id = Some(2);
        expected.schemas.dead_letter_schema_id = Some(3);
        assert_eq!(
            toml::to_string(&loaded).unwrap(),
            toml::to_string(&expected).unwrap(),
            "deploy/config/attrstream.toml documents the defaults"
        );
    }

    #[test]
    fn secrets_are_redacted() {
        let mut options = BTreeMap::new();
        options.insert("sasl.password".to_string(), "hunter2".to_string());
        options.insert("security.protocol".to_string(), "SASL_SSL".to_string());
        let shown = format!("{:?}", redact(&options));
        assert!(!shown.contains("hunter2") && shown.contains("SASL_SSL"), "{shown}");
        let schemas = SchemaConfig {
            registry_password: Some("hunter2".into()),
            ..Default::default()
        };
        assert!(!format!("{schemas:?}").contains("hunter2"));
    }
}
