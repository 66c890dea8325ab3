//! Command-line interface: one subcommand per job.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// What `attrstream --version` prints: the crate version, the git commit it was built from,
/// the libtorch it links, and whether the `cuda` feature was built in (a bug report needs all four).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("ATTRSTREAM_GIT_COMMIT"),
    ", libtorch ",
    env!("ATTRSTREAM_LIBTORCH_VERSION"),
    ", cuda feature ",
    env!("ATTRSTREAM_CUDA_FEATURE"),
    ")"
);

/// Turns product photos into product attributes.
#[derive(Debug, Parser)]
#[command(
    name = "attrstream",
    version = VERSION,
    about = "Turns product photos into product attributes: object detection (Faster R-CNN ResNet-50 FPN, SSD MobileNetV2) on libtorch",
    after_help = "Exit codes: 0 success; 1 the job ran and some inputs failed (or a promotion was refused); \
                  2 usage or configuration error; 3 runtime failure (a broker, registry, database or model \
                  unreachable or invalid)."
)]
pub struct Cli {
    /// CPU threads for libtorch (0 = libtorch's default, one per core).
    #[arg(long, global = true, env = "ATTRSTREAM_THREADS", default_value_t = 0)]
    pub threads: i32,
    /// Log line format: text for people, json (one object per line, with trace ids) for log
    /// pipelines [default: telemetry.log_format of the configuration, else text].
    #[arg(long, global = true, value_enum, env = "ATTRSTREAM_TELEMETRY__LOG_FORMAT")]
    pub log_format: Option<crate::telemetry::logging::LogFormat>,
    /// More log output: -v debug, -vv trace (moves RUST_LOG's default level; default info).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Less log output: -q warnings and errors, -qq errors only; also hides progress bars.
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "verbose")]
    pub quiet: u8,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The logging flags, for [`crate::telemetry::logging::init`].
    pub fn log_settings(&self) -> crate::telemetry::logging::LogSettings {
        crate::telemetry::logging::LogSettings {
            format: self.log_format,
            verbosity: (i16::from(self.verbose) - i16::from(self.quiet)).clamp(-8, 8) as i8,
        }
    }
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the libtorch version, whether CUDA is available, and the devices.
    Info,
    /// Detect objects in image files; prints one JSON record per image.
    Detect(DetectArgs),
    /// Get model weights: download known checkpoints, convert PyTorch checkpoints, list them.
    Model(ModelArgs),
    /// Run the streaming service: consume ProductImageEvents, publish ProductAttributes.
    Serve(ServeArgs),
    /// Try attrstream without Kafka: an in-process broker, the sample photos as events, the
    /// serve pipeline, the attribute records printed as they arrive, annotated images written.
    Demo(DemoArgs),
    /// Publish local images as ProductImageEvents (inline bytes or file URIs) to a topic.
    Publish(PublishArgs),
    /// Print the records of an output or dead-letter topic as JSON lines.
    Tail(TailArgs),
    /// Fine-tune the detector on a replayed topic of labelled images; evaluate it against the
    /// starting model on a leak-free validation set; publish and promote it in the registry.
    Train(Box<TrainArgs>),
    /// Publish a COCO-format data set (annotation JSON + image folder) as LabelledImage records,
    /// one per image, to a labelled-images topic for fine-tuning; prints a summary.
    PublishLabels(PublishLabelsArgs),
    /// Write a seeded synthetic labelled data set (coloured shapes on varied backgrounds) as a
    /// COCO folder: DIR/annotations.json + DIR/images/*.png.
    SynthLabels(SynthLabelsArgs),
    /// Evaluate detections against ground truth with COCO metrics (equal to pycocotools):
    /// prints the summary and per-class AP, writes metrics.json and pr_curve.png.
    Eval(EvalArgs),
    /// Print a shell completion script: `attrstream completions bash > /etc/bash_completion.d/attrstream`.
    Completions(CompletionsArgs),
}

/// Arguments of `attrstream completions`.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// Where the service configuration comes from; shared by serve, publish and tail.
#[derive(Debug, Args, Clone, Default)]
pub struct ConfigArgs {
    /// TOML configuration file (see deploy/config/attrstream.toml for every key).
    #[arg(long, short = 'c', env = "ATTRSTREAM_CONFIG")]
    pub config: Option<PathBuf>,
    /// Override any configuration key: --set batch.max_batch_size=16 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = crate::config::parse_set_arg)]
    pub set: Vec<(String, String)>,
    /// librdkafka property for every client: --kafka-option security.protocol=SASL_SSL (repeatable).
    #[arg(long = "kafka-option", value_name = "KEY=VALUE", value_parser = crate::config::parse_set_arg)]
    pub kafka_options: Vec<(String, String)>,
    /// Shorthand for --set kafka.bootstrap_servers=...
    #[arg(long)]
    pub brokers: Option<String>,
    /// Shorthand for --set kafka.group_id=...
    #[arg(long)]
    pub group: Option<String>,
    /// Shorthand for --set kafka.input_topic=...
    #[arg(long)]
    pub input_topic: Option<String>,
    /// Shorthand for --set kafka.output_topic=...
    #[arg(long)]
    pub output_topic: Option<String>,
    /// Shorthand for --set kafka.dead_letter_topic=...
    #[arg(long)]
    pub dead_letter_topic: Option<String>,
    /// Shorthand for --set schemas.registry_url=...
    #[arg(long)]
    pub registry: Option<String>,
    /// Inference devices, one worker each, comma-separated (cpu, cuda:0, cuda:0,cuda:1, …).
    #[arg(long, value_delimiter = ',')]
    pub devices: Vec<String>,
    /// Shorthand for --set model.weights=...
    #[arg(long, env = "ATTRSTREAM_WEIGHTS")]
    pub weights: Option<PathBuf>,
}

/// Arguments of `attrstream serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Configuration sources.
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Print the effective configuration (secrets redacted) and exit.
    #[arg(long)]
    pub print_config: bool,
}

/// Arguments of `attrstream demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Images to publish [default: the sample photos in assets/samples].
    pub images: Vec<PathBuf>,
    /// Folder for annotated images and the records as JSON lines.
    #[arg(long, default_value = "out/demo")]
    pub out: PathBuf,
    /// Inference devices, comma-separated [default: every CUDA device, else cpu].
    #[arg(long, value_delimiter = ',')]
    pub devices: Vec<String>,
    /// Weights [default: Faster R-CNN COCO if fetched, else the offline SSD MobileNetV2].
    #[arg(long, env = "ATTRSTREAM_WEIGHTS")]
    pub weights: Option<PathBuf>,
    /// Also publish two broken events (a corrupt image and a URL the SSRF guard refuses) to
    /// show the dead-letter topic.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub with_bad_events: bool,
    /// Print each record as a JSON line instead of a one-line summary.
    #[arg(long)]
    pub json: bool,
    /// Give up if the records have not all arrived after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout_secs: u64,
    /// Where to serve /metrics, /healthz and /readyz while the demo runs (port 0: any free
    /// port, printed at start; "" turns the server off).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub telemetry_listen: String,
}

/// Arguments of `attrstream publish`.
#[derive(Debug, Args)]
pub struct PublishArgs {
    /// Configuration sources (brokers, schemas; the topic defaults to kafka.input_topic).
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Image files to publish, one event each.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    /// Topic to publish to [default: kafka.input_topic].
    #[arg(long)]
    pub topic: Option<String>,
    /// Send absolute file:// URIs instead of the bytes (the service needs fetch.file_root).
    #[arg(long)]
    pub uri: bool,
    /// Product id of every event [default: the file stem].
    #[arg(long)]
    pub product_id: Option<String>,
}

/// Arguments of `attrstream tail`.
#[derive(Debug, Args)]
pub struct TailArgs {
    /// Configuration sources (brokers, schemas; the topic defaults to kafka.output_topic).
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Topic to read [default: kafka.output_topic, or kafka.dead_letter_topic with --dead-letters].
    #[arg(long)]
    pub topic: Option<String>,
    /// Read dead letters instead of attribute records.
    #[arg(long)]
    pub dead_letters: bool,
    /// Stop after this many records.
    #[arg(long)]
    pub max: Option<u64>,
    /// Stop when no record arrived for this many seconds (0 = follow forever).
    #[arg(long, default_value_t = 0)]
    pub idle_exit_secs: u64,
}

/// Arguments of `attrstream detect`.
#[derive(Debug, Args)]
pub struct DetectArgs {
    /// Image files (png, jpeg, webp, gif, bmp, tiff).
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    /// Weights (safetensors from `attrstream model fetch/import`).
    #[arg(long, env = "ATTRSTREAM_WEIGHTS")]
    pub weights: Option<PathBuf>,
    /// Device: cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Minimum score of a reported detection.
    #[arg(long, default_value_t = 0.5)]
    pub score_threshold: f64,
    /// Shorter image side fed to the model (torchvision min_size).
    #[arg(long, default_value_t = 800)]
    pub min_size: i64,
    /// Upper bound of the longer side fed to the model (torchvision max_size).
    #[arg(long, default_value_t = 1333)]
    pub max_size: i64,
    /// Images per forward pass.
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    /// Refuse images with more pixels than this (decompression-bomb guard).
    #[arg(long, default_value_t = crate::preprocess::DEFAULT_MAX_PIXELS)]
    pub max_pixels: u64,
    /// Write annotated PNGs (boxes and labels) into this folder.
    #[arg(long)]
    pub annotate: Option<PathBuf>,
    /// Run torchvision's operations in torchvision's order (bit-for-bit closer to Python,
    /// about 1.4x slower on CPU) instead of the fast path (folded batch norm,
    /// channels-last convolutions; boxes within 0.1 px of torchvision).
    #[arg(long)]
    pub exact: bool,
}

/// Arguments of `attrstream model`.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// What to do with model weights.
    #[command(subcommand)]
    pub command: ModelCommand,
}

/// The subcommands of `attrstream model`.
#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Convert a PyTorch checkpoint (`torch.save`, .pth/.pt) or safetensors file into weights
    /// `detect` can load; prints a JSON summary.
    Import(ModelImportArgs),
    /// Download a known checkpoint, check its sha256 and convert it into DIR/NAME.safetensors;
    /// prints a JSON summary.
    Fetch(ModelFetchArgs),
    /// List the known checkpoints and the weights present in the model folder.
    List(ModelListArgs),
    /// The model registry (a directory or s3://bucket/prefix): publish versions, promote one to
    /// production only if it evaluates better, roll back (see docs/model-registry.md).
    Registry(RegistryArgs),
    /// Create a Faster R-CNN from scratch (torchvision's initialisation, frozen batch norm
    /// calibrated on sample images) for a label set: a starting point for training when no
    /// pretrained checkpoint is available, and for tests. Prefer fine-tuning COCO weights.
    Init(ModelInitArgs),
}

/// Arguments of `attrstream model init`.
#[derive(Debug, Args)]
pub struct ModelInitArgs {
    /// Class names, comma-separated (index 0, the background, is added).
    #[arg(long, value_delimiter = ',', required = true)]
    pub classes: Vec<String>,
    /// Folder of sample images (PNG/JPEG) the batch norm statistics are calibrated on (up to
    /// --calibration-count of them, in name order).
    #[arg(long)]
    pub calibration_images: PathBuf,
    /// How many calibration images to use.
    #[arg(long, default_value_t = 16)]
    pub calibration_count: usize,
    /// Shorter image side after resizing (torchvision min_size).
    #[arg(long, default_value_t = 800)]
    pub min_size: i64,
    /// Longest image side after resizing (torchvision max_size).
    #[arg(long, default_value_t = 1333)]
    pub max_size: i64,
    /// Seed of the random initialisation.
    #[arg(long, default_value_t = 1)]
    pub seed: i64,
    /// Weights file to write.
    #[arg(long, short)]
    pub output: PathBuf,
}

/// Arguments of `attrstream model import`.
#[derive(Debug, Args)]
pub struct ModelImportArgs {
    /// The checkpoint: a `torch.save` file (state dict, or a dict holding it under `model` or
    /// `state_dict`) or a safetensors file.
    pub file: PathBuf,
    /// Weights file to write [default: models/<FILE stem>.safetensors, without a torch.hub
    /// hash suffix].
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// Label names, index 0 = background: one per line, or a JSON list [default: COCO's].
    #[arg(long)]
    pub labels: Option<PathBuf>,
    /// Do not load the converted weights into Faster R-CNN to check keys and shapes.
    #[arg(long)]
    pub no_verify: bool,
    /// Frozen batch-norm epsilon the checkpoint was trained with [default: 0 for torchvision's
    /// official COCO_V1 file, else 1e-5]. Models fine-tuned in Python from torchvision's COCO
    /// weights keep its epsilon of 0: pass `--frozen-bn-eps 0` for them.
    #[arg(long)]
    pub frozen_bn_eps: Option<f64>,
}

/// Arguments of `attrstream model fetch`.
#[derive(Debug, Args)]
pub struct ModelFetchArgs {
    /// A known checkpoint (see `attrstream model list`), or any name together with --url.
    pub name: String,
    /// Folder of the weights file.
    #[arg(long, default_value = crate::detection::DEFAULT_MODEL_DIR)]
    pub dir: PathBuf,
    /// Download from this URL instead (e.g. a mirror).
    #[arg(long)]
    pub url: Option<String>,
    /// The checkpoint's full sha256 (64 hex digits), checked instead of the torch.hub prefix
    /// in the file name.
    #[arg(long)]
    pub sha256: Option<String>,
    /// Download and convert again even if the weights are already there.
    #[arg(long)]
    pub force: bool,
    /// Do not load the converted weights into Faster R-CNN to check keys and shapes.
    #[arg(long)]
    pub no_verify: bool,
}

/// Arguments of `attrstream model list`.
#[derive(Debug, Args)]
pub struct ModelListArgs {
    /// Folder to look for weights in.
    #[arg(long, default_value = crate::detection::DEFAULT_MODEL_DIR)]
    pub dir: PathBuf,
}

/// Arguments of `attrstream eval`. Today one mode: files (COCO ground truth + COCO results).
/// Evaluating a model over a labelled validation topic will be a second mode; its inputs
/// (weights, topic) go here as further options and make `--detections` unnecessary.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// File mode: COCO-format ground truth: {"images": [{id, width, height}], "annotations": [{id,
    /// image_id, category_id, bbox: [x, y, w, h], area, iscrowd}], "categories": [{id, name}]}.
    #[arg(long, value_name = "GT.json", requires = "detections", conflicts_with = "model")]
    pub ground_truth: Option<PathBuf>,
    /// File mode: COCO results file, a JSON list of {image_id, category_id, bbox: [x, y, w, h], score}.
    #[arg(long, value_name = "RESULTS.json", requires = "ground_truth")]
    pub detections: Option<PathBuf>,
    /// Model mode: the weights file to evaluate over --topic's labelled images.
    #[arg(long, value_name = "WEIGHTS", requires = "topic")]
    pub model: Option<PathBuf>,
    /// Model mode: the labelled-image topic (records of schemas/labelled_image.avsc).
    #[arg(long)]
    pub topic: Option<String>,
    /// Model mode: records to read (same syntax as `train --range`).
    #[arg(long = "range", value_name = "SPEC")]
    pub ranges: Vec<String>,
    /// Model mode: evaluate only the validation side of `train`'s product-hash split with this
    /// fraction (and --split-salt), i.e. the images a model trained on the same topic never saw.
    #[arg(long)]
    pub validation_fraction: Option<f64>,
    /// Salt of the product-hash split.
    #[arg(long, default_value = crate::train::split::DEFAULT_SALT)]
    pub split_salt: String,
    /// Model mode: class names, comma-separated [default: the sorted labels of the examples].
    #[arg(long, value_delimiter = ',')]
    pub classes: Option<Vec<String>>,
    /// Model mode: shorter image side after resizing [default: the model's].
    #[arg(long)]
    pub min_size: Option<i64>,
    /// Model mode: longest image side after resizing [default: the model's].
    #[arg(long)]
    pub max_size: Option<i64>,
    /// Model mode: Kafka and schema-registry settings.
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Folder for metrics.json and pr_curve.png (created if missing).
    #[arg(long, default_value = "out/eval")]
    pub out: PathBuf,
}

/// Arguments of `attrstream model registry`.
#[derive(Debug, Args)]
pub struct RegistryArgs {
    /// Registry location: a directory, file:///dir or s3://bucket/prefix (S3 credentials, region
    /// and endpoint from AWS_*) [default: model.registry of --config].
    #[arg(long, global = true, env = "ATTRSTREAM_MODEL__REGISTRY")]
    pub registry: Option<String>,
    /// Configuration file to read model.registry from when --registry is not given.
    #[arg(long, short = 'c', global = true, env = "ATTRSTREAM_CONFIG")]
    pub config: Option<PathBuf>,
    /// Who acts, recorded in manifests, production.json and decisions (default: `$USER@$HOSTNAME`).
    #[arg(long, global = true, env = "ATTRSTREAM_ACTOR")]
    pub by: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: RegistryCommand,
}

/// The subcommands of `attrstream model registry`.
#[derive(Debug, Subcommand)]
pub enum RegistryCommand {
    /// List the versions, oldest first; `*` marks production.
    List(RegistryListArgs),
    /// Print a version's manifest (or `production`'s) and the decisions about it as JSON.
    Show(RegistryShowArgs),
    /// Make a version production if it beats the current one on the same validation set.
    /// Prints the decision as JSON; exit code 0 when promoted, 1 when refused (reason on stderr).
    Promote(RegistryPromoteArgs),
    /// Set production back to an earlier (or any) version, whatever the metrics.
    Rollback(RegistryRollbackArgs),
    /// Publish a weights file as a new version; prints its manifest as JSON.
    Publish(RegistryPublishArgs),
    /// Download a version's weights into the cache (checked against the manifest's sha256);
    /// prints the local path as JSON.
    Download(RegistryDownloadArgs),
}

/// Arguments of `attrstream model registry list`.
#[derive(Debug, Args)]
pub struct RegistryListArgs {
    /// One JSON manifest per line instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `attrstream model registry show`.
#[derive(Debug, Args)]
pub struct RegistryShowArgs {
    /// A version id, or `production`.
    pub version: String,
}

/// Arguments of `attrstream model registry promote`.
#[derive(Debug, Args)]
pub struct RegistryPromoteArgs {
    /// The candidate version.
    pub version: String,
    /// Promote even if it is not better or was evaluated on another validation set.
    #[arg(long)]
    pub force: bool,
    /// Metric to compare: map (AP@[.50:.95]) or ap50.
    #[arg(long, default_value = "map")]
    pub metric: crate::train::registry::Metric,
    /// The candidate must beat production by at least this much.
    #[arg(long, default_value_t = 0.0)]
    pub min_improvement: f64,
    /// Note recorded with the decision.
    #[arg(long)]
    pub note: Option<String>,
}

/// Arguments of `attrstream model registry rollback`.
#[derive(Debug, Args)]
pub struct RegistryRollbackArgs {
    /// The version to serve again.
    pub version: String,
    /// Note recorded with the rollback (why).
    #[arg(long)]
    pub note: Option<String>,
}

/// Arguments of `attrstream model registry publish`.
#[derive(Debug, Args)]
pub struct RegistryPublishArgs {
    /// Weights (safetensors from training or `attrstream model import/fetch`).
    #[arg(long)]
    pub weights: PathBuf,
    /// Label names, index 0 = background (one per line, or a JSON list); must equal the label
    /// map inside the weights [default: that map].
    #[arg(long)]
    pub labels: Option<PathBuf>,
    /// fasterrcnn_resnet50_fpn or ssd_mobilenet_v2 [default: the weights metadata's].
    #[arg(long)]
    pub architecture: Option<crate::train::registry::Architecture>,
    /// The version these weights were fine-tuned from.
    #[arg(long)]
    pub parent: Option<String>,
    /// Metrics JSON: {"validation_fingerprint", "map", "ap50", "ap75", "per_class_ap": {name: ap}}.
    #[arg(long)]
    pub metrics: Option<PathBuf>,
    /// The parent's metrics on the same validation set (same JSON form).
    #[arg(long)]
    pub parent_metrics: Option<PathBuf>,
    /// Training settings as a JSON file (stored as is).
    #[arg(long)]
    pub training_config: Option<PathBuf>,
    /// Training data as a JSON file: {"topic", "partitions": [{"partition", "start_offset", "end_offset"}]}.
    #[arg(long)]
    pub training_data: Option<PathBuf>,
    /// Free text stored in the manifest.
    #[arg(long)]
    pub notes: Option<String>,
}

/// Arguments of `attrstream model registry download`.
#[derive(Debug, Args)]
pub struct RegistryDownloadArgs {
    /// A version id, or `production`.
    #[arg(default_value = "production")]
    pub version: String,
    /// Cache folder; files are named by their sha256 and reused.
    #[arg(long, default_value = crate::train::registry::DEFAULT_CACHE_DIR)]
    pub cache_dir: PathBuf,
}

/// Arguments of `attrstream publish-labels`.
#[derive(Debug, Args)]
pub struct PublishLabelsArgs {
    /// Configuration sources (brokers, schema registry, librdkafka options).
    #[command(flatten)]
    pub config: ConfigArgs,
    /// COCO-format annotation file: {"images": [{id, file_name, width, height, …}],
    /// "annotations": [{image_id, category_id, bbox: [x, y, w, h], iscrowd}], "categories": [{id, name}]}.
    #[arg(long, value_name = "FILE.json")]
    pub annotations: PathBuf,
    /// Folder the images' file_name entries are relative to [default: the folder `images` next
    /// to the annotation file if it exists, else the annotation file's folder].
    #[arg(long, value_name = "DIR")]
    pub images: Option<PathBuf>,
    /// Topic to publish to.
    #[arg(long, default_value = crate::events::labelled::DEFAULT_LABELLED_TOPIC)]
    pub topic: String,
    /// Send absolute file:// URIs instead of the image bytes (the trainer then needs
    /// fetch.file_root to cover the image folder).
    #[arg(long)]
    pub uri: bool,
    /// Take each record's product id from this field of the COCO image entry (string or
    /// number) [default: the image file name without extension].
    #[arg(long, value_name = "FIELD")]
    pub product_id_field: Option<String>,
    /// Split hint written into every record: train, validation or test [default: none].
    #[arg(long)]
    pub split: Option<crate::events::labelled::SplitHint>,
    /// Label source written into every record (human, coco-import, synthetic, model, …).
    #[arg(long, default_value = crate::events::labelled::label_sources::COCO_IMPORT)]
    pub label_source: String,
    /// Confluent schema id to frame the records with when there is no schema registry
    /// [default: look up or register <topic>-value in the registry].
    #[arg(long)]
    pub schema_id: Option<u32>,
}

/// Arguments of `attrstream synth-labels`.
#[derive(Debug, Args)]
pub struct SynthLabelsArgs {
    /// Output folder (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Number of images.
    #[arg(long, default_value_t = 200)]
    pub images: usize,
    /// Seed; the same seed gives the same data set on every machine.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Image width in pixels.
    #[arg(long, default_value_t = 160)]
    pub width: u32,
    /// Image height in pixels.
    #[arg(long, default_value_t = 160)]
    pub height: u32,
    /// Smallest object size in pixels.
    #[arg(long, default_value_t = 24)]
    pub min_object: u32,
    /// Largest object size in pixels.
    #[arg(long, default_value_t = 80)]
    pub max_object: u32,
    /// Overwrite an existing annotations.json in --out.
    #[arg(long)]
    pub force: bool,
}

/// Arguments of `attrstream train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Configuration sources (brokers, schema registry, fetch limits, model.registry).
    /// `--devices cpu | cuda:0,cuda:1` puts one replica on each device (data-parallel
    /// training) [default: every GPU, else cpu].
    #[command(flatten)]
    pub config: ConfigArgs,
    /// The labelled-image topic to replay (records of schemas/labelled_image.avsc).
    #[arg(long)]
    pub topic: String,
    /// Records to read: `beginning..end` (default), `100..5000`, `@1700000000000..end` (timestamps
    /// in ms), or per partition `0:100..200` (repeatable).
    #[arg(long = "range", value_name = "SPEC")]
    pub ranges: Vec<String>,
    /// Take validation examples from this topic instead of splitting the training topic.
    #[arg(long)]
    pub validation_topic: Option<String>,
    /// Records of the validation topic (same syntax as --range).
    #[arg(long = "validation-range", value_name = "SPEC")]
    pub validation_ranges: Vec<String>,
    /// How to split the training topic: by a hash of the product id, by the records' split hints,
    /// or by the offsets in --validation-offsets.
    #[arg(long, value_enum, default_value_t = SplitKind::ProductHash)]
    pub split: SplitKind,
    /// Share of products that go to validation (with --split product-hash).
    #[arg(long, default_value_t = 0.2)]
    pub validation_fraction: f64,
    /// Salt of the product hash; keep it fixed so runs are comparable.
    #[arg(long, default_value = crate::train::split::DEFAULT_SALT)]
    pub split_salt: String,
    /// Validation offsets with --split offsets: `PARTITION:START..END` (repeatable).
    #[arg(long = "validation-offsets", value_name = "P:START..END")]
    pub validation_offsets: Vec<String>,
    /// Starting weights file (safetensors from `model import/fetch/init` or an earlier run).
    #[arg(long, conflicts_with = "base_version")]
    pub base: Option<PathBuf>,
    /// Start from this registry version (`production` or a version id) [default: production
    /// when a registry is configured].
    #[arg(long)]
    pub base_version: Option<String>,
    /// Model registry for the base version and for publishing the candidate [default:
    /// model.registry]. (`--registry` is the schema registry, as in every Kafka command.)
    #[arg(long)]
    pub model_registry: Option<String>,
    /// Class names, comma-separated [default: the sorted labels of the training examples].
    #[arg(long, value_delimiter = ',')]
    pub classes: Option<Vec<String>>,
    /// Run folder: checkpoints, model.safetensors, report.json, metrics.json, pr_curve.png.
    #[arg(long, default_value = "runs/train")]
    pub out: PathBuf,
    /// Decoded examples are cached here [default: OUT/cache].
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Shorter image side after resizing (torchvision min_size).
    #[arg(long, default_value_t = 800)]
    pub min_size: i64,
    /// Longest image side after resizing (torchvision max_size).
    #[arg(long, default_value_t = 1333)]
    pub max_size: i64,
    /// ResNet stages that train, 0 (none) to 5 (all); batch norm always stays frozen.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(0..=5))]
    pub trainable_backbone_layers: u8,
    /// Images per step over all devices.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Optimizer steps.
    #[arg(long, default_value_t = 1000)]
    pub steps: u64,
    /// Learning rate after warm-up (torchvision's recipe: 0.02 for 16 images per step; scale linearly).
    #[arg(long, default_value_t = 0.005)]
    pub lr: f64,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.9)]
    pub momentum: f64,
    /// SGD weight decay.
    #[arg(long, default_value_t = 1e-4)]
    pub weight_decay: f64,
    /// Linear warm-up steps.
    #[arg(long, default_value_t = 100)]
    pub warmup_steps: u64,
    /// Learning-rate factor at the first warm-up step.
    #[arg(long, default_value_t = 0.001)]
    pub warmup_factor: f64,
    /// Decay after warm-up.
    #[arg(long, value_enum, default_value_t = ScheduleKind::Cosine)]
    pub schedule: ScheduleKind,
    /// Steps where --schedule step multiplies the rate by --gamma (comma-separated)
    /// [default: 2/3 and 8/9 of --steps, as torchvision's 26-epoch recipe].
    #[arg(long, value_delimiter = ',')]
    pub milestones: Vec<u64>,
    /// Factor per milestone.
    #[arg(long, default_value_t = 0.1)]
    pub gamma: f64,
    /// Rate at the end of a cosine schedule.
    #[arg(long, default_value_t = 0.0)]
    pub min_lr: f64,
    /// Probability of a horizontal flip per image.
    #[arg(long, default_value_t = 0.5)]
    pub hflip: f64,
    /// Clip the gradient norm to this value.
    #[arg(long)]
    pub clip_grad_norm: Option<f64>,
    /// Seed of data order, flips, sampling and new layers: the same seed repeats a run.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Write a checkpoint every N steps (a killed run resumes from the newest in OUT/checkpoints).
    #[arg(long, default_value_t = 200)]
    pub checkpoint_every: u64,
    /// Images per batch when evaluating.
    #[arg(long, default_value_t = 4)]
    pub eval_batch_size: usize,
    /// Promote the candidate if it beats production on the same validation set.
    #[arg(long)]
    pub promote: bool,
    /// With --promote: promote even if it is not better.
    #[arg(long, requires = "promote")]
    pub force: bool,
    /// Metric the promotion compares.
    #[arg(long, default_value = "map")]
    pub metric: String,
    /// Required improvement of the metric for promotion.
    #[arg(long, default_value_t = 0.0)]
    pub min_improvement: f64,
    /// No progress bar (logs only).
    #[arg(long)]
    pub no_progress: bool,
}

/// How `attrstream train` chooses validation examples within the training topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SplitKind {
    /// A stable hash of the product id: one product never lands on both sides.
    ProductHash,
    /// The records' split hint (train / validation / test).
    Hint,
    /// The offset ranges given with --validation-offsets.
    Offsets,
}

/// Learning-rate decay after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ScheduleKind {
    /// Cosine down to --min-lr.
    Cosine,
    /// Multiply by --gamma at each milestone.
    Step,
    /// No decay.
    Constant,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// clap checks argument definitions only at run time, per subcommand: check all of them
    /// (duplicate names, conflicting flags) in one unit test instead of at a user's first try.
    #[test]
    fn every_subcommand_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
