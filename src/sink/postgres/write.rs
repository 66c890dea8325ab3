//! Writing rows to PostgreSQL: the upsert statement, one attempt, retries with backoff, and a
//! row-by-row fallback when a batch holds a row PostgreSQL rejects, so that only that row's
//! event is dead-lettered.

use std::error::Error as _;
use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable as _};
use chrono::{DateTime, Utc};
use deadpool_postgres::{Pool, PoolError};
use serde_json::Value;

use super::batch::{newest_per_product, ProductRow};
use super::{DatabaseStats, Written};

/// Inserts a batch (arrays bound once, unnested server-side) and replaces an existing row only
/// with a newer event: a later `(event_time, event_id)` (no time sorts first, ids bytewise, as
/// [`ProductRow::recency`]), or the same event processed by another model. A redelivered event
/// therefore changes nothing, not even `updated_at`.
pub const UPSERT: &str = r#"
INSERT INTO product_attributes AS t
    (product_id, event_id, event_time, processed_time, model_name, model_version,
     image_width, image_height, attributes, detections, metadata, updated_at)
SELECT u.product_id, u.event_id, u.event_time, u.processed_time, u.model_name, u.model_version,
       u.image_width, u.image_height, u.attributes, u.detections, u.metadata, now()
FROM UNNEST($1::text[], $2::text[], $3::timestamptz[], $4::timestamptz[], $5::text[], $6::text[],
            $7::integer[], $8::integer[], $9::jsonb[], $10::jsonb[], $11::jsonb[])
     AS u(product_id, event_id, event_time, processed_time, model_name, model_version,
          image_width, image_height, attributes, detections, metadata)
ON CONFLICT (product_id) DO UPDATE SET
    event_id = excluded.event_id,
    event_time = excluded.event_time,
    processed_time = excluded.processed_time,
    model_name = excluded.model_name,
    model_version = excluded.model_version,
    image_width = excluded.image_width,
    image_height = excluded.image_height,
    attributes = excluded.attributes,
    detections = excluded.detections,
    metadata = excluded.metadata,
    updated_at = excluded.updated_at
WHERE (coalesce(excluded.event_time, '-infinity'), excluded.event_id COLLATE "C")
          > (coalesce(t.event_time, '-infinity'), t.event_id COLLATE "C")
   OR ((coalesce(excluded.event_time, '-infinity'), excluded.event_id)
          = (coalesce(t.event_time, '-infinity'), t.event_id)
       AND (excluded.model_name, excluded.model_version)
          IS DISTINCT FROM (t.model_name, t.model_version))
"#;

/// Why a write failed, and whether trying again could help.
#[derive(Debug, Clone)]
struct WriteFailure {
    message: String,
    /// The data itself was refused (bad value, constraint): retrying the same rows cannot help.
    permanent: bool,
}

/// Writes batches through the pool with the configured retries.
pub(super) struct RowWriter {
    pool: Pool,
    backoff: ExponentialBuilder,
    retries: u32,
    stats: Arc<DatabaseStats>,
}

impl RowWriter {
    /// A writer retrying `retries` times, from 100 ms doubling up to 5 s, with jitter.
    pub(super) fn new(pool: Pool, retries: u32, stats: Arc<DatabaseStats>) -> Self {
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(5))
            .with_factor(2.0)
            .with_max_times(retries as usize)
            .with_jitter();
        Self {
            pool,
            backoff,
            retries,
            stats,
        }
    }

    /// Writes `rows` (any order, repeats allowed) and returns one result per row: the newest
    /// row of each product in one statement, with retries; if PostgreSQL refuses the data,
    /// every row alone, so only the bad ones fail. An `Err` is the dead letter's message.
    pub(super) async fn write_batch(&self, rows: &[&ProductRow]) -> Vec<Result<Written, String>> {
        let chosen: Vec<&ProductRow> = newest_per_product(rows).into_iter().map(|i| rows[i]).collect();
        let results = match self.write_with_retries(&chosen).await {
            Ok(written) => vec![Ok(written); rows.len()],
            Err(failure) if failure.permanent && rows.len() > 1 => {
                tracing::warn!(error = %failure.message, rows = rows.len(),
                    "PostgreSQL refused a batch; writing its rows one by one to isolate the bad ones");
                let mut results = Vec::with_capacity(rows.len());
                for row in rows {
                    results.push(self.write_with_retries(&[row]).await.map_err(|f| f.message));
                }
                results
            }
            Err(failure) => vec![Err(failure.message); rows.len()],
        };
        for result in &results {
            self.stats.record(result);
        }
        results
    }

    /// One statement for `rows`, retried while failures are transient.
    async fn write_with_retries(&self, rows: &[&ProductRow]) -> Result<Written, WriteFailure> {
        let mut attempts = 1u32;
        (|| self.attempt(rows))
            .retry(self.backoff)
            .sleep(tokio::time::sleep)
            .when(|f: &WriteFailure| !f.permanent)
            .notify(|f: &WriteFailure, delay: Duration| {
                attempts += 1;
                self.stats.record_retry_attempt();
                tracing::warn!(error = %f.message, rows = rows.len(), ?delay, "PostgreSQL write failed; retrying");
            })
            .await
            .map(|()| {
                if attempts == 1 {
                    Written::FirstAttempt
                } else {
                    Written::AfterRetries
                }
            })
            .map_err(|f| WriteFailure {
                message: if f.permanent {
                    format!("PostgreSQL refused the row: {}", f.message)
                } else {
                    format!(
                        "writing to PostgreSQL failed {attempts} times (database.retries = {}): {}",
                        self.retries, f.message
                    )
                },
                ..f
            })
    }

    async fn attempt(&self, rows: &[&ProductRow]) -> Result<(), WriteFailure> {
        let client = self.pool.get().await.map_err(pool_failure)?;
        let statement = client.prepare_cached(UPSERT).await.map_err(|e| db_failure(&e))?;
        let text = |f: fn(&ProductRow) -> &str| rows.iter().map(|r| f(r).to_owned()).collect::<Vec<String>>();
        let json = |f: fn(&ProductRow) -> &Value| rows.iter().map(|r| f(r).clone()).collect::<Vec<Value>>();
        let product_ids = text(|r| &r.product_id);
        let event_ids = text(|r| &r.event_id);
        let event_times: Vec<Option<DateTime<Utc>>> = rows.iter().map(|r| r.event_time).collect();
        let processed: Vec<DateTime<Utc>> = rows.iter().map(|r| r.processed_time).collect();
        let model_names = text(|r| &r.model_name);
        let model_versions = text(|r| &r.model_version);
        let widths: Vec<i32> = rows.iter().map(|r| r.image_width).collect();
        let heights: Vec<i32> = rows.iter().map(|r| r.image_height).collect();
        let attributes = json(|r| &r.attributes);
        let detections = json(|r| &r.detections);
        let metadata = json(|r| &r.metadata);
        client
            .execute(
                &statement,
                &[
                    &product_ids,
                    &event_ids,
                    &event_times,
                    &processed,
                    &model_names,
                    &model_versions,
                    &widths,
                    &heights,
                    &attributes,
                    &detections,
                    &metadata,
                ],
            )
            .await
            .map_err(|e| db_failure(&e))?;
        Ok(())
    }
}

/// Data exceptions (22), integrity violations (23) and program limits (54, e.g. a value too
/// large) mean this data will never be accepted; everything else (connection loss, timeouts,
/// locks, permissions, a server restarting) may pass on a later attempt.
fn is_permanent(code: &str) -> bool {
    matches!(code.get(..2), Some("22" | "23" | "54"))
}

fn db_failure(e: &tokio_postgres::Error) -> WriteFailure {
    match e.as_db_error() {
        Some(db) => WriteFailure {
            message: format!("{}: {} (SQLSTATE {})", db.severity(), db.message(), db.code().code()),
            permanent: is_permanent(db.code().code()),
        },
        None => WriteFailure {
            message: match e.source() {
                Some(source) => format!("{e}: {source}"),
                None => e.to_string(),
            },
            permanent: false,
        },
    }
}

fn pool_failure(e: PoolError) -> WriteFailure {
    match e {
        PoolError::Backend(e) => WriteFailure {
            message: format!("cannot connect: {}", super::tls::explain_connect_error(&e).message),
            permanent: false,
        },
        other => WriteFailure {
            message: format!("no connection from the pool: {other}"),
            permanent: false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_data_errors_are_permanent() {
        for code in ["22P02", "22021", "23505", "54000"] {
            assert!(is_permanent(code), "{code}");
        }
        // connection, statement timeout, lock timeout, permission, serialization, deadlock, shutdown
        for code in ["08006", "57014", "55P03", "42501", "40001", "40P01", "57P01"] {
            assert!(!is_permanent(code), "{code}");
        }
    }
}
