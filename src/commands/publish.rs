//! `attrstream publish`: local images as ProductImageEvents on a topic, for trying the
//! service against a real cluster.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use rdkafka::producer::{FutureRecord, Producer as _};
use rdkafka::util::Timeout;

use crate::brokers::wait_for_brokers_async;
use crate::cli::PublishArgs;
use crate::config::{Config, InputFormat};
use crate::events::registry::resolve_output_schema_id;
use crate::events::{codec, now_ms, wire, ImageSource, ProductImageEvent};
use crate::pipeline::{producer_properties, registry_client};
use crate::progress::Progress;
use crate::serve::{load_config, runtime};
use crate::sink::create_producer;

/// Publishes one event per image and waits for every acknowledgement.
pub fn run(args: PublishArgs) -> Result<ExitCode> {
    let config = load_config(&args.config)?;
    let topic = args.topic.clone().unwrap_or_else(|| config.kafka.input_topic.clone());
    let events = args
        .images
        .iter()
        .map(|path| event_for_image(path, args.uri, args.product_id.as_deref()))
        .collect::<Result<Vec<_>>>()?;
    runtime()?.block_on(async {
        let producer = create_producer(&producer_properties(&config))?;
        wait_for_brokers_async(producer.client(), &config.kafka).await?;
        let framing = input_framing(&config, &topic).await?;
        publish_events(&producer, &topic, framing, &events).await?;
        for e in &events {
            println!(
                "{}",
                serde_json::json!({"topic": topic, "event_id": e.event_id, "product_id": e.product_id})
            );
        }
        Ok::<_, anyhow::Error>(())
    })?;
    eprintln!("attrstream: published {} events to {topic}", events.len());
    Ok(ExitCode::SUCCESS)
}

/// An event for a local image: inline bytes, or an absolute `file://` URI.
pub fn event_for_image(path: &Path, as_uri: bool, product_id: Option<&str>) -> Result<ProductImageEvent> {
    let image = if as_uri {
        let absolute = std::fs::canonicalize(path).with_context(|| format!("cannot find {}", path.display()))?;
        let url = url::Url::from_file_path(&absolute)
            .map_err(|_| anyhow::anyhow!("cannot make a file URI of {}", absolute.display()))?;
        ImageSource::Uri(url.to_string())
    } else {
        ImageSource::Inline(std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?)
    };
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let content_type = match path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("png") => Some("image/png".to_string()),
        Some("jpg" | "jpeg") => Some("image/jpeg".to_string()),
        Some("webp") => Some("image/webp".to_string()),
        _ => None,
    };
    Ok(ProductImageEvent {
        event_id: uuid::Uuid::new_v4().to_string(),
        product_id: product_id.map(str::to_string).unwrap_or(stem),
        image,
        content_type,
        metadata: [("source_file".to_string(), path.to_string_lossy().into_owned())].into(),
        event_time_ms: Some(now_ms()),
    })
}

/// How event values are framed: a Confluent schema id, or raw Avro.
pub async fn input_framing(config: &Config, topic: &str) -> Result<Option<u32>> {
    if config.schemas.input_format == InputFormat::Raw {
        return Ok(None);
    }
    let registry = registry_client(config)?;
    let id = resolve_output_schema_id(
        registry.as_deref(),
        &format!("{topic}-value"),
        codec::product_image_event_schema_json(),
        config.schemas.auto_register,
        config.schemas.input_schema_id,
    )
    .await?;
    Ok(Some(id))
}

/// Produces the events (key = product id) and waits for the broker's acknowledgements,
/// showing how many are acknowledged.
pub async fn publish_events(
    producer: &crate::sink::KafkaProducer,
    topic: &str,
    schema_id: Option<u32>,
    events: &[ProductImageEvent],
) -> Result<()> {
    let progress = Progress::new("publish", Some(events.len() as u64));
    let sends = events.iter().map(|event| {
        let body = codec::encode_event(event);
        let payload = match schema_id {
            Some(id) => wire::frame(id, &body),
            None => body,
        };
        let progress = &progress;
        async move {
            let sent = producer
                .send(
                    FutureRecord::to(topic)
                        .key(event.product_id.as_bytes())
                        .payload(&payload),
                    Timeout::After(Duration::from_secs(30)),
                )
                .await
                .map_err(|(e, _)| anyhow::anyhow!("cannot publish event {} to {topic}: {e}", event.event_id));
            progress.inc(1);
            sent
        }
    });
    for result in futures::future::join_all(sends).await {
        result?;
    }
    progress.finish();
    Ok(())
}
