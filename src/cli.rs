//! Command-line interface: one subcommand per job.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Turns product photos into product attributes.
#[derive(Debug, Parser)]
#[command(
    name = "attrstream",
    version,
    about = "Turns product photos into product attributes: object detection (Faster R-CNN ResNet-50 FPN, SSD MobileNetV2) on libtorch"
)]
pub struct Cli {
    /// CPU threads for libtorch (0 = libtorch's default, one per core).
    #[arg(long, global = true, env = "ATTRSTREAM_THREADS", default_value_t = 0)]
    pub threads: i32,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
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
