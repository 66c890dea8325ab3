//! The input side: the Kafka consumer thread and the per-partition offset tracker that
//! together implement at-least-once delivery.

pub mod consumer;
pub mod offsets;

pub use consumer::{spawn_consumer, CompletionSender, ConsumerHandle, ConsumerReport, ConsumerSettings, InputMessage};
pub use offsets::{MessagePosition, OffsetTracker};
