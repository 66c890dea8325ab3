//! `attrstream tail`: reads an output or dead-letter topic and prints each record as JSON.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;

use crate::brokers::wait_for_brokers_async;
use crate::cli::TailArgs;
use crate::config::normalize_kafka_key;
use crate::events::registry::SchemaRegistry;
use crate::events::{codec, wire};
use crate::kafka_errors::QuietContext;
use crate::pipeline::registry_client;
use crate::serve::{load_config, runtime};

/// Follows the topic from the beginning, printing one JSON line per record.
pub fn run(args: TailArgs) -> Result<ExitCode> {
    let config = load_config(&args.config)?;
    let topic = args.topic.clone().unwrap_or_else(|| {
        if args.dead_letters {
            config.kafka.dead_letter_topic.clone()
        } else {
            config.kafka.output_topic.clone()
        }
    });
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &config.kafka.bootstrap_servers)
        .set("group.id", format!("attrstream-tail-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest");
    for (k, v) in &config.kafka.options {
        client.set(normalize_kafka_key(k), v);
    }
    let registry = registry_client(&config)?;
    let dead_letters = args.dead_letters;
    let mut printed = 0u64;
    runtime()?.block_on(async {
        let consumer: StreamConsumer<QuietContext> = client
            .create_with_context(QuietContext::default())
            .context("cannot create the Kafka consumer")?;
        wait_for_brokers_async(consumer.client(), &config.kafka).await?;
        consumer
            .subscribe(&[&topic])
            .with_context(|| format!("cannot subscribe to {topic}"))?;
        loop {
            if args.max.is_some_and(|m| printed >= m) {
                break;
            }
            let next = if args.idle_exit_secs > 0 {
                match tokio::time::timeout(Duration::from_secs(args.idle_exit_secs), consumer.recv()).await {
                    Ok(m) => m,
                    Err(_) => break,
                }
            } else {
                consumer.recv().await
            };
            let msg = next.context("reading from Kafka")?;
            let value = msg.payload().unwrap_or_default();
            match decode_json(value, dead_letters, registry.as_ref()).await {
                Ok(json) => println!("{json}"),
                Err(e) => println!(
                    "{}",
                    serde_json::json!({"partition": msg.partition(), "offset": msg.offset(), "error": format!("{e:#}")})
                ),
            }
            printed += 1;
        }
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Decodes one framed record (attributes or dead letter) into JSON, looking the writer
/// schema up in the registry when there is one.
pub async fn decode_json(
    value: &[u8],
    dead_letter: bool,
    registry: Option<&Arc<SchemaRegistry>>,
) -> Result<serde_json::Value> {
    let (id, body) = wire::unframe(value)?;
    let writer = match registry {
        Some(r) => Some(r.schema_by_id(id).await?),
        None => None,
    };
    Ok(if dead_letter {
        let schema: &apache_avro::Schema = match &writer {
            Some(s) => s,
            None => codec::dead_letter_schema(),
        };
        serde_json::to_value(codec::decode_dead_letter(body, schema)?)?
    } else {
        let schema: &apache_avro::Schema = match &writer {
            Some(s) => s,
            None => codec::product_attributes_schema(),
        };
        serde_json::to_value(codec::decode_attributes(body, schema)?)?
    })
}
