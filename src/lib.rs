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

pub mod annotate;
pub mod cli;
pub mod commands;
pub mod detection;
pub mod device;
pub mod model;
pub mod preprocess;
