//! Command-line interface: one subcommand per job.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Turns product photos into product attributes.
#[derive(Debug, Parser)]
#[command(name = "attrstream", version, about)]
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
}
