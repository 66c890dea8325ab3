//! The pure half of the writer: the row an attribute record becomes, which event of a product
//! is the newest (the upsert rule, as Rust), and how upserts are gathered into batches.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::events::ProductAttributes;

/// One `product_attributes` row, ready to bind.
#[derive(Debug, Clone, PartialEq)]
pub struct ProductRow {
    /// Primary key.
    pub product_id: String,
    /// The event the row describes.
    pub event_id: String,
    /// The event's time (`None`: the producer sent none; older than any time).
    pub event_time: Option<DateTime<Utc>>,
    /// When the attributes were produced.
    pub processed_time: DateTime<Utc>,
    /// Model name from the output record.
    pub model_name: String,
    /// Model version from the output record.
    pub model_version: String,
    /// Decoded image width in pixels.
    pub image_width: i32,
    /// Decoded image height in pixels.
    pub image_height: i32,
    /// `AggregatedAttributes` as JSON.
    pub attributes: Value,
    /// The detections as a JSON array.
    pub detections: Value,
    /// The event's metadata map as a JSON object.
    pub metadata: Value,
}

impl ProductRow {
    /// The row for an output record; an error (a message for the dead letter) when a time is
    /// outside what a timestamp can hold.
    pub fn from_record(record: &ProductAttributes) -> Result<Self, String> {
        let time = |ms: i64, what: &str| {
            DateTime::<Utc>::from_timestamp_millis(ms)
                .ok_or_else(|| format!("{what} {ms} ms is outside the range of a PostgreSQL timestamp"))
        };
        let json = |value: Result<Value, serde_json::Error>| value.map_err(|e| format!("cannot encode as JSON: {e}"));
        Ok(Self {
            product_id: record.product_id.clone(),
            event_id: record.event_id.clone(),
            event_time: record.event_time_ms.map(|ms| time(ms, "event_time")).transpose()?,
            processed_time: time(record.processed_time_ms, "processed_time")?,
            model_name: record.model.name.clone(),
            model_version: record.model.version.clone(),
            image_width: i32::try_from(record.image_width).unwrap_or(i32::MAX),
            image_height: i32::try_from(record.image_height).unwrap_or(i32::MAX),
            attributes: json(serde_json::to_value(&record.attributes))?,
            detections: json(serde_json::to_value(&record.detections))?,
            metadata: json(serde_json::to_value(&record.metadata))?,
        })
    }

    /// The order in which events of one product replace each other: event time (none first),
    /// then event id bytewise. Mirrors the `WHERE` of the upsert statement.
    pub fn recency(&self, other: &Self) -> Ordering {
        (self.event_time, self.event_id.as_bytes()).cmp(&(other.event_time, other.event_id.as_bytes()))
    }
}

/// Indices of the rows one statement should write: per product only the newest row (by
/// [`ProductRow::recency`]; on a tie the later one, as a second statement would leave it),
/// ordered by product id so that concurrent batches lock rows in the same order and cannot
/// deadlock. PostgreSQL refuses to upsert one key twice in a statement, hence the dedupe.
pub fn newest_per_product(rows: &[&ProductRow]) -> Vec<usize> {
    let mut newest: BTreeMap<&[u8], usize> = BTreeMap::new();
    for (i, row) in rows.iter().enumerate() {
        newest
            .entry(row.product_id.as_bytes())
            .and_modify(|kept| {
                if row.recency(rows[*kept]) != Ordering::Less {
                    *kept = i;
                }
            })
            .or_insert(i);
    }
    newest.into_values().collect()
}

/// Waits for one item, then gathers more until `max_size` items or `max_wait` after the
/// first; `None` once the channel is closed and empty.
pub async fn collect_batch<T>(rx: &mut mpsc::Receiver<T>, max_size: usize, max_wait: Duration) -> Option<Vec<T>> {
    let first = rx.recv().await?;
    let mut batch = Vec::with_capacity(max_size.min(1024));
    batch.push(first);
    let deadline = tokio::time::Instant::now() + max_wait;
    while batch.len() < max_size {
        match rx.try_recv() {
            Ok(item) => batch.push(item),
            Err(mpsc::error::TryRecvError::Disconnected) => break,
            Err(mpsc::error::TryRecvError::Empty) => match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(item)) => batch.push(item),
                Ok(None) | Err(_) => break,
            },
        }
    }
    Some(batch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{AggregatedAttributes, LabelSummary, ModelRef, StageTimings};

    fn record(product: &str, event: &str, time: Option<i64>) -> ProductAttributes {
        ProductAttributes {
            event_id: event.into(),
            product_id: product.into(),
            model: ModelRef {
                name: "m".into(),
                version: "1".into(),
            },
            image_width: 640,
            image_height: 480,
            detections: vec![],
            attributes: AggregatedAttributes {
                labels: vec![LabelSummary {
                    label: "cup".into(),
                    max_score: 0.5,
                    count: 2,
                }],
                ..Default::default()
            },
            timings: StageTimings::default(),
            event_time_ms: time,
            processed_time_ms: 1_700_000_000_123,
            metadata: [("k".to_string(), "v".to_string())].into(),
        }
    }

    fn row(product: &str, event: &str, time: Option<i64>) -> ProductRow {
        ProductRow::from_record(&record(product, event, time)).unwrap()
    }

    #[test]
    fn a_record_becomes_a_row_with_json_columns() {
        let r = row("p1", "e1", Some(1_700_000_000_000));
        assert_eq!(r.event_time.unwrap().timestamp_millis(), 1_700_000_000_000);
        assert_eq!(r.processed_time.timestamp_millis(), 1_700_000_000_123);
        assert_eq!(r.attributes["labels"][0]["label"], "cup");
        assert_eq!(r.attributes["labels"][0]["count"], 2);
        assert_eq!(r.attributes["main_object"], Value::Null);
        assert_eq!(r.detections, serde_json::json!([]));
        assert_eq!(r.metadata, serde_json::json!({"k": "v"}));
        assert_eq!((r.image_width, r.image_height), (640, 480));
        assert_eq!(row("p1", "e1", None).event_time, None);
        let err = ProductRow::from_record(&record("p", "e", Some(i64::MAX))).unwrap_err();
        assert!(err.contains("event_time"), "{err}");
    }

    #[test]
    fn newest_event_per_product_wins_and_products_come_out_sorted() {
        let rows = [
            row("b", "e1", Some(200)),
            row("a", "e2", Some(100)),
            row("b", "e3", Some(100)), // older than e1: dropped
            row("a", "e4", Some(300)), // newer than e2: kept
            row("c", "e5", None),
            row("c", "e6", Some(1)), // any time beats none
            row("d", "e7", Some(50)),
            row("d", "e8", Some(50)), // same time: the larger event id wins
            row("d", "e0", Some(50)),
        ];
        let refs: Vec<&ProductRow> = rows.iter().collect();
        let kept: Vec<&str> = newest_per_product(&refs)
            .into_iter()
            .map(|i| rows[i].event_id.as_str())
            .collect();
        assert_eq!(kept, vec!["e4", "e1", "e6", "e8"]);
    }

    #[test]
    fn an_exact_repeat_keeps_the_later_copy() {
        let mut later = row("p", "e", Some(5));
        later.model_version = "2".into();
        let rows = [row("p", "e", Some(5)), later];
        let refs: Vec<&ProductRow> = rows.iter().collect();
        assert_eq!(newest_per_product(&refs), vec![1]);
        assert!(newest_per_product(&[]).is_empty());
    }

    #[test]
    fn event_ids_compare_bytewise_like_collate_c() {
        // Linguistic collations would put "a" before "B"; bytes put "B" (0x42) first.
        assert_eq!(row("p", "B", Some(1)).recency(&row("p", "a", Some(1))), Ordering::Less);
    }

    #[tokio::test]
    async fn batches_fill_up_to_the_size_or_close_after_the_wait() {
        let (tx, mut rx) = mpsc::channel::<u32>(100);
        for i in 0..5 {
            tx.send(i).await.unwrap();
        }
        let started = std::time::Instant::now();
        assert_eq!(
            collect_batch(&mut rx, 3, Duration::from_secs(30)).await,
            Some(vec![0, 1, 2]),
            "a full batch goes at once"
        );
        assert!(started.elapsed() < Duration::from_secs(10), "did not wait for max_wait");
        let late = tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            late.send(5).await.unwrap();
            tokio::time::sleep(Duration::from_millis(1500)).await;
            late.send(6).await.unwrap();
        });
        let started = std::time::Instant::now();
        assert_eq!(
            collect_batch(&mut rx, 10, Duration::from_millis(300)).await,
            Some(vec![3, 4, 5]),
            "waits max_wait for company, not longer"
        );
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(300) && waited < Duration::from_millis(1400),
            "{waited:?}"
        );
        assert_eq!(
            collect_batch(&mut rx, 10, Duration::from_millis(20)).await,
            Some(vec![6])
        );
        drop(tx);
        assert_eq!(collect_batch(&mut rx, 10, Duration::from_millis(20)).await, None);
    }
}
