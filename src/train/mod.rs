//! Fine-tuning from a replayed Kafka topic: labelled data, the trainer, evaluation and the
//! model registry that promotion and hot swap read.
//!
//! Layout, one line per module (keep it true when adding one):
