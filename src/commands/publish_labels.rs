//! `attrstream publish-labels`: a COCO-format data set (annotation JSON + image folder) as
//! LabelledImage records on a labelled-images topic, one record per image.
//!
//! COCO boxes `[x, y, w, h]` become `x1, y1, x2, y2 = x, y, x + w, y + h`; category ids become
//! their names; `iscrowd` is kept. The whole annotation file is checked before anything is
//! published (unknown images or categories, bad boxes, missing image files, missing product
//! ids), so a mistake never leaves half a data set on the topic.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use futures::StreamExt as _;
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureRecord, Producer as _};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::util::Timeout;
use serde::Serialize;
use serde_json::Value;

use crate::brokers::wait_for_brokers_async;
use crate::cli::PublishLabelsArgs;
use crate::events::labelled::{
    encode_labelled_framed, labelled_image_schema_json, BoxAnnotation, LabelledImage, SplitHint,
};
use crate::events::registry::resolve_output_schema_id;
use crate::events::{now_ms, ImageSource};
use crate::exit::usage;
use crate::pipeline::{producer_properties, registry_client};
use crate::progress::Progress;
use crate::serve::{load_config_without_serve_schemas, runtime};
use crate::sink::create_producer;

/// Records being read and produced at once.
const IN_FLIGHT: usize = 32;

/// Checks the data set, publishes one record per image, waits for every acknowledgement and
/// prints a JSON summary (records, boxes, classes).
pub fn run(args: PublishLabelsArgs) -> Result<ExitCode> {
    let config = load_config_without_serve_schemas(&args.config)?;
    let images_dir = default_images_dir(&args.annotations, args.images.as_deref());
    let options = ImportOptions {
        product_id_field: args.product_id_field.clone(),
        split: args.split,
        label_source: args.label_source.clone(),
    };
    let data = CocoImport::load(&args.annotations, &images_dir, &options)?;
    let topic = args.topic.as_str();
    let summary = runtime()?.block_on(async {
        let registry = registry_client(&config)?;
        if registry.is_none() && args.schema_id.is_none() {
            return Err(usage(anyhow::anyhow!("no schema id for {topic}: pass --schema-id N, or configure a schema registry (--registry URL) to look up or register {topic}-value")));
        }
        let schema_id = resolve_output_schema_id(
            registry.as_deref(),
            &format!("{topic}-value"),
            labelled_image_schema_json(),
            config.schemas.auto_register,
            args.schema_id,
        )
        .await?;
        let producer = create_producer(&producer_properties(&config))?;
        wait_for_brokers_async(producer.client(), &config.kafka).await?;
        publish(&producer, topic, schema_id, &data, args.uri).await
    })?;
    println!("{}", serde_json::to_string(&summary)?);
    eprintln!(
        "attrstream: published {} labelled images ({} boxes, {} classes, {} products) to {topic}",
        summary.records,
        summary.boxes,
        summary.classes.len(),
        summary.products
    );
    Ok(ExitCode::SUCCESS)
}

/// `--images`, or `images/` next to the annotation file if it exists, else the file's folder.
fn default_images_dir(annotations: &Path, images: Option<&Path>) -> PathBuf {
    if let Some(dir) = images {
        return dir.to_path_buf();
    }
    let parent = annotations
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let nested = parent.join("images");
    if nested.is_dir() {
        nested
    } else {
        parent.to_path_buf()
    }
}

/// How COCO entries become records.
#[derive(Debug, Clone)]
struct ImportOptions {
    /// Field of the image entry holding the product id; `None`: the file stem.
    product_id_field: Option<String>,
    /// Split hint of every record.
    split: Option<SplitHint>,
    /// Label source of every record.
    label_source: String,
}

/// One image of the data set, checked and ready to publish.
#[derive(Debug, Clone, PartialEq)]
struct PlannedImage {
    /// The COCO image id (as text: ids may be numbers or strings).
    image_id: String,
    /// The COCO file_name.
    file_name: String,
    /// The file on disk.
    path: PathBuf,
    product_id: String,
    width: Option<u32>,
    height: Option<u32>,
    annotations: Vec<BoxAnnotation>,
}

/// A checked COCO data set.
#[derive(Debug)]
struct CocoImport {
    images: Vec<PlannedImage>,
    options: ImportOptions,
}

/// What was published.
#[derive(Debug, Clone, PartialEq, Serialize)]
struct PublishSummary {
    topic: String,
    records: usize,
    boxes: usize,
    crowd_boxes: usize,
    images_without_boxes: usize,
    products: usize,
    /// Boxes per class name.
    classes: BTreeMap<String, usize>,
    inline: bool,
}

/// COCO ids are numbers in the official files and strings in some tools; compare them as text.
fn id_text(value: &Value) -> Option<String> {
    match value {
        Value::Number(n) => Some(n.to_string()),
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        _ => None,
    }
}

fn list<'a>(coco: &'a Value, key: &str, file: &Path) -> Result<&'a Vec<Value>> {
    match coco.get(key) {
        Some(Value::Array(items)) => Ok(items),
        Some(_) => bail!(
            "{}: \"{key}\" is not a list; is this a COCO annotation file?",
            file.display()
        ),
        None if key == "annotations" => {
            static EMPTY: Vec<Value> = Vec::new();
            Ok(&EMPTY)
        }
        None => bail!("{}: no \"{key}\" list; is this a COCO annotation file?", file.display()),
    }
}

fn dimension(entry: &Value, key: &str, what: &str) -> Result<Option<u32>> {
    match entry.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|v| u32::try_from(v).ok())
            .filter(|v| *v > 0)
            .map(Some)
            .with_context(|| format!("{what}: {key} {v} is not a positive whole number")),
    }
}

impl CocoImport {
    /// Reads and checks the annotation file and the image folder.
    fn load(file: &Path, images_dir: &Path, options: &ImportOptions) -> Result<Self> {
        let text =
            std::fs::read(file).with_context(|| format!("cannot read the annotation file {}", file.display()))?;
        let coco: Value =
            serde_json::from_slice(&text).with_context(|| format!("{} is not valid JSON", file.display()))?;
        Self::from_json(&coco, file, images_dir, options)
    }

    fn from_json(coco: &Value, file: &Path, images_dir: &Path, options: &ImportOptions) -> Result<Self> {
        let mut categories = HashMap::new();
        for c in list(coco, "categories", file)? {
            let id = c
                .get("id")
                .and_then(id_text)
                .with_context(|| format!("{}: a category has no id: {c}", file.display()))?;
            let name = c
                .get("name")
                .and_then(Value::as_str)
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .with_context(|| format!("{}: category {id} has no name", file.display()))?;
            ensure!(
                categories.insert(id.clone(), name.to_string()).is_none(),
                "{}: category id {id} appears twice",
                file.display()
            );
        }

        let mut images = Vec::new();
        let mut index_of = HashMap::new();
        let mut missing = Vec::new();
        for entry in list(coco, "images", file)? {
            let image_id = entry
                .get("id")
                .and_then(id_text)
                .with_context(|| format!("{}: an image entry has no id: {entry}", file.display()))?;
            let what = format!("{}: image {image_id}", file.display());
            let file_name = entry
                .get("file_name")
                .and_then(Value::as_str)
                .filter(|f| !f.is_empty())
                .with_context(|| format!("{what} has no file_name"))?;
            let path = images_dir.join(file_name);
            if !path.is_file() {
                missing.push(format!("{file_name} (image {image_id})"));
            }
            let product_id = match &options.product_id_field {
                Some(field) => entry.get(field).and_then(id_text).with_context(|| {
                    format!("{what} ({file_name}) has no \"{field}\" field (string or number) for --product-id-field")
                })?,
                None => Path::new(file_name)
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .filter(|s| !s.is_empty())
                    .with_context(|| format!("{what}: cannot take a product id from the file name {file_name:?}"))?,
            };
            ensure!(
                index_of.insert(image_id.clone(), images.len()).is_none(),
                "{}: image id {image_id} appears twice",
                file.display()
            );
            images.push(PlannedImage {
                width: dimension(entry, "width", &what)?,
                height: dimension(entry, "height", &what)?,
                image_id,
                file_name: file_name.to_string(),
                path,
                product_id,
                annotations: Vec::new(),
            });
        }
        if !missing.is_empty() {
            let shown: Vec<_> = missing.iter().take(5).cloned().collect();
            bail!(
                "{} of {} images are missing in {}: {}{}; check --images (the folder the file_name entries are relative to)",
                missing.len(),
                images.len(),
                images_dir.display(),
                shown.join(", "),
                if missing.len() > shown.len() { ", …" } else { "" }
            );
        }

        for (n, a) in list(coco, "annotations", file)?.iter().enumerate() {
            let what = match a.get("id").and_then(id_text) {
                Some(id) => format!("{}: annotation {id}", file.display()),
                None => format!("{}: annotation #{n}", file.display()),
            };
            let image_id = a
                .get("image_id")
                .and_then(id_text)
                .with_context(|| format!("{what} has no image_id"))?;
            let index = *index_of
                .get(&image_id)
                .with_context(|| format!("{what} refers to image {image_id}, which is not in \"images\""))?;
            let category = a
                .get("category_id")
                .and_then(id_text)
                .with_context(|| format!("{what} has no category_id"))?;
            let Some(label) = categories.get(&category) else {
                let mut known: Vec<_> = categories.keys().cloned().collect();
                known.sort();
                bail!(
                    "{what} has category_id {category}, which is not in \"categories\" (known ids: {})",
                    known.join(", ")
                );
            };
            let bbox: Vec<f64> = a
                .get("bbox")
                .and_then(Value::as_array)
                .map(|b| b.iter().filter_map(Value::as_f64).collect())
                .unwrap_or_default();
            ensure!(
                bbox.len() == 4 && bbox.iter().all(|v| v.is_finite()) && bbox[2] >= 0.0 && bbox[3] >= 0.0,
                "{what} has bbox {}, expected [x, y, width, height] with width, height >= 0",
                a.get("bbox").map_or("(none)".to_string(), |b| b.to_string())
            );
            let iscrowd = match a.get("iscrowd") {
                None | Some(Value::Null) => None,
                Some(Value::Bool(b)) => Some(*b),
                Some(v) => match v.as_u64() {
                    Some(0) => Some(false),
                    Some(1) => Some(true),
                    _ => bail!("{what} has iscrowd {v}, expected 0 or 1"),
                },
            };
            let (x, y, w, h) = (bbox[0], bbox[1], bbox[2], bbox[3]);
            images[index].annotations.push(BoxAnnotation {
                x1: x as f32,
                y1: y as f32,
                x2: (x + w) as f32,
                y2: (y + h) as f32,
                label: label.clone(),
                iscrowd,
            });
        }
        Ok(CocoImport {
            images,
            options: options.clone(),
        })
    }

    /// The record of one image (reads the file for inline images).
    async fn record(&self, image: &PlannedImage, as_uri: bool) -> Result<LabelledImage> {
        let source = if as_uri {
            let absolute =
                std::fs::canonicalize(&image.path).with_context(|| format!("cannot find {}", image.path.display()))?;
            let url = url::Url::from_file_path(&absolute)
                .map_err(|_| anyhow::anyhow!("cannot make a file URI of {}", absolute.display()))?;
            ImageSource::Uri(url.to_string())
        } else {
            ImageSource::Inline(
                tokio::fs::read(&image.path)
                    .await
                    .with_context(|| format!("cannot read {}", image.path.display()))?,
            )
        };
        Ok(LabelledImage {
            product_id: image.product_id.clone(),
            image: source,
            width: image.width,
            height: image.height,
            annotations: image.annotations.clone(),
            split: self.options.split,
            label_source: self.options.label_source.clone(),
            event_id: Some(uuid::Uuid::new_v4().to_string()),
            event_time_ms: Some(now_ms()),
            metadata: [
                ("coco_image_id".to_string(), image.image_id.clone()),
                ("file_name".to_string(), image.file_name.clone()),
            ]
            .into(),
        })
    }

    fn summary(&self, topic: &str, inline: bool) -> PublishSummary {
        let mut classes = BTreeMap::new();
        for a in self.images.iter().flat_map(|i| &i.annotations) {
            *classes.entry(a.label.clone()).or_default() += 1;
        }
        PublishSummary {
            topic: topic.to_string(),
            records: self.images.len(),
            boxes: self.images.iter().map(|i| i.annotations.len()).sum(),
            crowd_boxes: self
                .images
                .iter()
                .flat_map(|i| &i.annotations)
                .filter(|a| a.is_crowd())
                .count(),
            images_without_boxes: self.images.iter().filter(|i| i.annotations.is_empty()).count(),
            products: self.images.iter().map(|i| &i.product_id).collect::<BTreeSet<_>>().len(),
            classes,
            inline,
        }
    }
}

/// Produces one record per image (key = product id) with at most [`IN_FLIGHT`] at once and
/// waits for every acknowledgement, showing how many are acknowledged.
async fn publish(
    producer: &crate::sink::KafkaProducer,
    topic: &str,
    schema_id: u32,
    data: &CocoImport,
    as_uri: bool,
) -> Result<PublishSummary> {
    let mut sends = futures::stream::iter(&data.images)
        .map(|image| async move {
            let record = data.record(image, as_uri).await?;
            let payload = encode_labelled_framed(schema_id, &record);
            producer
                .send(
                    FutureRecord::to(topic)
                        .key(record.product_id.as_bytes())
                        .payload(&payload),
                    Timeout::After(Duration::from_secs(30)),
                )
                .await
                .map_err(|(e, _)| produce_error(e, &image.file_name, payload.len(), topic))?;
            Ok::<_, anyhow::Error>(())
        })
        .buffered(IN_FLIGHT);
    let progress = Progress::new("publish-labels", Some(data.images.len() as u64));
    while let Some(result) = sends.next().await {
        result?;
        progress.inc(1);
    }
    progress.finish();
    Ok(data.summary(topic, !as_uri))
}

fn produce_error(e: KafkaError, file_name: &str, bytes: usize, topic: &str) -> anyhow::Error {
    if e.rdkafka_error_code() == Some(RDKafkaErrorCode::MessageSizeTooLarge) {
        anyhow::anyhow!(
            "the record of {file_name} is {bytes} bytes, too large for {topic}: publish with --uri, or raise the \
             producer's message.max.bytes (--kafka-option message.max.bytes=N) and the topic's max.message.bytes"
        )
    } else {
        anyhow::anyhow!("cannot publish the record of {file_name} to {topic}: {e}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn options(field: Option<&str>) -> ImportOptions {
        ImportOptions {
            product_id_field: field.map(str::to_string),
            split: Some(SplitHint::Train),
            label_source: "coco-import".into(),
        }
    }

    fn folder() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for name in ["a.png", "b.jpg"] {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        dir
    }

    fn coco() -> Value {
        json!({
            "images": [
                {"id": 1, "file_name": "a.png", "width": 10, "height": 8, "sku": "p-1"},
                {"id": "two", "file_name": "b.jpg", "sku": 7}
            ],
            "annotations": [
                {"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 2, 3.5, 4], "iscrowd": 0},
                {"id": 2, "image_id": 1, "category_id": 5, "bbox": [0, 0, 10, 8], "iscrowd": 1}
            ],
            "categories": [{"id": 3, "name": "cup"}, {"id": 5, "name": "bowl"}]
        })
    }

    #[test]
    fn coco_boxes_become_corners_with_names_and_crowd_flags() {
        let dir = folder();
        let data = CocoImport::from_json(&coco(), Path::new("gt.json"), dir.path(), &options(None)).unwrap();
        let a = &data.images[0];
        assert_eq!((a.product_id.as_str(), a.width, a.height), ("a", Some(10), Some(8)));
        assert_eq!(
            a.annotations[0],
            BoxAnnotation {
                x1: 1.0,
                y1: 2.0,
                x2: 4.5,
                y2: 6.0,
                label: "cup".into(),
                iscrowd: Some(false)
            }
        );
        assert_eq!(
            (a.annotations[1].label.as_str(), a.annotations[1].iscrowd),
            ("bowl", Some(true))
        );
        let b = &data.images[1];
        assert_eq!((b.product_id.as_str(), b.width, b.annotations.len()), ("b", None, 0));
        let summary = data.summary("t", true);
        assert_eq!((summary.records, summary.boxes, summary.crowd_boxes), (2, 2, 1));
        assert_eq!(summary.images_without_boxes, 1);
        assert_eq!(summary.classes.len(), 2);
    }

    #[test]
    fn product_ids_come_from_a_field_when_asked() {
        let dir = folder();
        let data = CocoImport::from_json(&coco(), Path::new("gt.json"), dir.path(), &options(Some("sku"))).unwrap();
        assert_eq!(data.images[0].product_id, "p-1");
        assert_eq!(data.images[1].product_id, "7");
        let err = CocoImport::from_json(&coco(), Path::new("gt.json"), dir.path(), &options(Some("gtin"))).unwrap_err();
        assert!(err.to_string().contains("no \"gtin\" field"), "{err}");
    }

    #[test]
    fn mistakes_are_reported_before_publishing() {
        let dir = folder();
        let check = |coco: Value, expected: &str| {
            let err = CocoImport::from_json(&coco, Path::new("gt.json"), dir.path(), &options(None)).unwrap_err();
            assert!(err.to_string().contains(expected), "{expected}: {err}");
        };
        let mut c = coco();
        c["annotations"][0]["category_id"] = json!(9);
        check(c, "category_id 9, which is not in \"categories\" (known ids: 3, 5)");
        let mut c = coco();
        c["annotations"][1]["image_id"] = json!(4);
        check(c, "refers to image 4");
        let mut c = coco();
        c["images"][1]["file_name"] = json!("gone.png");
        check(c, "1 of 2 images are missing");
        let mut c = coco();
        c["annotations"][0]["bbox"] = json!([1, 2, -3, 4]);
        check(c, "width, height >= 0");
        let mut c = coco();
        c["annotations"][0]["iscrowd"] = json!(2);
        check(c, "iscrowd 2");
        check(json!({"categories": [], "annotations": []}), "no \"images\" list");
        check(json!({"images": []}), "no \"categories\" list");
    }

    #[test]
    fn the_images_folder_defaults_to_images_next_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("annotations.json");
        assert_eq!(default_images_dir(&file, None), dir.path());
        std::fs::create_dir(dir.path().join("images")).unwrap();
        assert_eq!(default_images_dir(&file, None), dir.path().join("images"));
        assert_eq!(default_images_dir(&file, Some(Path::new("/x"))), Path::new("/x"));
    }
}
