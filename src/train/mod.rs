//! Fine-tuning from a replayed Kafka topic: labelled data, the trainer, evaluation and the
//! model registry that promotion and hot swap read.
//!
//! Layout, one line per module (keep it true when adding one):
//! * [`coco_eval`]: COCO box evaluation (mAP, AR, per-class AP, PR curves) equal to pycocotools.
//! * [`evaluate`]: a detector measured on labelled examples (COCO metrics), validation fingerprints.
//! * [`job`]: a whole `attrstream train` run: replay, split, fine-tune, evaluate, publish, promote.
//! * [`pr_plot`]: the precision-recall plot of an evaluation as a PNG.
//! * [`replay`]: a bounded, reproducible snapshot of a labelled-images topic as decoded examples, cached on disk.
//! * [`registry`]: the model registry (directory or S3): versions, promotion only if better, rollback, watch.
//! * [`sgd`]: SGD with momentum (resumable state) and the learning-rate schedule.
//! * [`split`]: the leak-free train/validation split (by product hash, hint, offsets or a validation topic).
//! * [`synthetic`]: a seeded synthetic shapes data set written as a COCO folder.
//! * [`trainer`]: the data-parallel fine-tuning step, checkpoints and resume.

pub mod coco_eval;
pub mod evaluate;
pub mod job;
pub mod pr_plot;
pub mod registry;
pub mod replay;
pub mod sgd;
pub mod split;
pub mod synthetic;
pub mod trainer;
