//! The optional PostgreSQL sink: the latest attributes of every product in one table,
//! `product_attributes`, upserted in batches.
//!
//! ```text
//! emit ─► PostgresSink::upsert ─► channel ─► writer task: batch (max_batch_size | max_wait)
//!   ▲                                           │ one slot per pooled connection
//!   └──── Ok / Err(message) per event ◄──── upsert statement, retried with backoff
//! ```
//!
//! The pipeline completes a message only when both its output record is acknowledged and its
//! row is written, or, when the write failed after `database.retries` (or was refused), once
//! a dead letter with reason `database_write_failed` is acknowledged. Offsets may then move
//! past a row that was not written, but never past one that is neither written nor in the
//! dead-letter topic (which holds the original event, so the row can be replayed from it):
//! an event is never silently lost to the database.
//!
//! Redelivery is harmless: a row is replaced only by a newer event (see
//! [`write::UPSERT`]), so replaying a topic from the start leaves the table as it was.

pub mod batch;
pub mod config;
pub mod migrate;
pub mod tls;
pub mod write;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use backon::{ExponentialBuilder, Retryable as _};
use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::events::ProductAttributes;
use batch::{collect_batch, ProductRow};
pub use config::DatabaseConfig;
use write::RowWriter;

/// The sink's counters since start, for the run report and logs. Per event, exactly one of
/// `ok`, `retried`, `failed`, the outcomes of `attrstream_database_writes_total{outcome}`
/// (which the pipeline records from each [`PostgresSink::upsert`] answer).
#[derive(Debug, Default)]
pub struct DatabaseStats {
    ok: AtomicU64,
    retried: AtomicU64,
    failed: AtomicU64,
    retry_attempts: AtomicU64,
    batches: AtomicU64,
    wait_micros: AtomicU64,
}

/// A snapshot of [`DatabaseStats`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DatabaseCounts {
    /// Events whose row was written on the first attempt (or was already newer in the table).
    pub ok: u64,
    /// Events whose row was written after at least one retry.
    pub retried: u64,
    /// Events whose write failed for good (dead-lettered as `database_write_failed`).
    pub failed: u64,
    /// Statements tried again after a transient failure.
    pub retry_attempts: u64,
    /// Batches taken from the queue.
    pub batches: u64,
    /// Sum over events of the time from `upsert` to its answer, in microseconds.
    pub wait_micros: u64,
}

impl DatabaseStats {
    /// The counters now.
    pub fn snapshot(&self) -> DatabaseCounts {
        DatabaseCounts {
            ok: self.ok.load(Ordering::Relaxed),
            retried: self.retried.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            retry_attempts: self.retry_attempts.load(Ordering::Relaxed),
            batches: self.batches.load(Ordering::Relaxed),
            wait_micros: self.wait_micros.load(Ordering::Relaxed),
        }
    }

    fn record(&self, outcome: &Result<Written, String>) {
        let counter = match outcome {
            Ok(Written::FirstAttempt) => &self.ok,
            Ok(Written::AfterRetries) => &self.retried,
            Err(_) => &self.failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn record_retry_attempt(&self) {
        self.retry_attempts.fetch_add(1, Ordering::Relaxed);
    }
}

/// How a successful upsert went (the `ok` and `retried` outcomes of the metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// The first statement holding the row succeeded.
    FirstAttempt,
    /// It succeeded after one or more retries.
    AfterRetries,
}

/// A write that failed for good; its text becomes the dead letter's `error_message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DatabaseWriteError(pub String);

/// One queued upsert and where its answer goes.
struct Request {
    row: ProductRow,
    done: oneshot::Sender<Result<Written, String>>,
}

/// The running sink: a handle to the writer task. The task stops once the handle is dropped
/// and the queued upserts are written.
pub struct PostgresSink {
    requests: mpsc::Sender<Request>,
    stats: Arc<DatabaseStats>,
}

impl PostgresSink {
    /// Connects (over TLS as `sslmode` in `database.url` asks, see [`tls`]), applies the
    /// migrations (or checks the table exists when `run_migrations` is false) and starts the
    /// writer. Retries like a write does, so a database that starts together with the service is
    /// waited for; then fails with what to check. What waiting does not fix fails at once: a
    /// TLS mismatch or a rejected certificate, an edited migration, a missing table with
    /// `run_migrations = false`, a permission the database user lacks.
    pub async fn start(config: &DatabaseConfig) -> Result<Self> {
        let pg = config.postgres_config()?;
        let tls = config.tls()?;
        let manager = Manager::from_config(
            pg,
            tls.connector()?,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(config.pool_size)
            .runtime(Runtime::Tokio1)
            .create_timeout(Some(config.connect_timeout))
            .wait_timeout(Some(config.connect_timeout))
            .build()
            .context("building the PostgreSQL connection pool")?;
        let url = config.display_url();
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(5))
            .with_max_times(config.retries as usize)
            .with_jitter();
        let applied = (|| prepare_schema(&pool, config.run_migrations))
            .retry(backoff)
            .sleep(tokio::time::sleep)
            .when(start_may_retry)
            .notify(|e: &anyhow::Error, delay: Duration| {
                tracing::warn!(url = %url, error = %format!("{e:#}"), ?delay, "PostgreSQL not ready; retrying");
            })
            .await
            .with_context(|| {
                format!(
                    "cannot start the PostgreSQL sink at {url}: check database.url, the password \
                     (database.password / ATTRSTREAM_DATABASE__PASSWORD) and that the server is reachable"
                )
            })?;
        tracing::info!(url = %url, tls = %tls, migrations_applied = ?applied, pool_size = config.pool_size,
            max_batch_size = config.max_batch_size, "PostgreSQL sink ready");

        let stats = Arc::new(DatabaseStats::default());
        let writer = Arc::new(RowWriter::new(pool, config.retries, stats.clone()));
        let queue = config.max_batch_size.saturating_mul(config.pool_size).saturating_mul(2);
        let (requests, rx) = mpsc::channel(queue.min(1 << 16));
        tokio::spawn(run_writer(
            rx,
            writer,
            config.max_batch_size,
            config.max_wait,
            config.pool_size,
            stats.clone(),
        ));
        Ok(Self { requests, stats })
    }

    /// Upserts the row of `record` and waits until it is written (or already superseded by a
    /// newer event); an error once retries are exhausted or the data was refused.
    pub async fn upsert(&self, record: &ProductAttributes) -> Result<Written, DatabaseWriteError> {
        let started = Instant::now();
        let row = match ProductRow::from_record(record) {
            Ok(row) => row,
            Err(e) => {
                let failed = Err(e);
                self.stats.record(&failed);
                return failed.map_err(DatabaseWriteError);
            }
        };
        let (done, answer) = oneshot::channel();
        let stopped = || DatabaseWriteError("the PostgreSQL writer stopped".into());
        self.requests.send(Request { row, done }).await.map_err(|_| stopped())?;
        let result = answer.await.map_err(|_| stopped())?;
        self.stats
            .wait_micros
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        result.map_err(DatabaseWriteError)
    }

    /// The sink's counters (shared; they keep counting).
    pub fn stats(&self) -> Arc<DatabaseStats> {
        self.stats.clone()
    }
}

/// Whether starting again could get past `e`: false for a refused TLS setup or certificate
/// ([`tls::ConnectFailure`]), a schema the sink cannot use ([`migrate::SchemaRefused`]) and a
/// privilege the database user lacks (SQLSTATE 42501, e.g. CREATE on the schema).
fn start_may_retry(e: &anyhow::Error) -> bool {
    !e.chain().any(|cause| {
        cause
            .downcast_ref::<tls::ConnectFailure>()
            .is_some_and(|f| !f.retry_may_help)
            || cause.is::<migrate::SchemaRefused>()
            || cause
                .downcast_ref::<tokio_postgres::Error>()
                .and_then(tokio_postgres::Error::code)
                .is_some_and(|code| *code == tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE)
    })
}

/// Connects once and brings the schema up to date (or checks it); returns the migrations applied.
async fn prepare_schema(pool: &Pool, run_migrations: bool) -> Result<Vec<i32>> {
    let mut client = pool.get().await.map_err(|e| match e {
        PoolError::Backend(e) => anyhow::Error::new(tls::explain_connect_error(&e)).context("connecting"),
        other => anyhow::anyhow!("connecting: {other}"),
    })?;
    if run_migrations {
        migrate::migrate(&mut client).await
    } else {
        migrate::check_schema(&client).await.map(|()| Vec::new())
    }
}

/// Takes a free connection slot, then the next batch (which keeps filling while every slot
/// is busy), and writes it on its own task; returns when the queue is closed and drained.
async fn run_writer(
    mut rx: mpsc::Receiver<Request>,
    writer: Arc<RowWriter>,
    max_batch_size: usize,
    max_wait: Duration,
    concurrency: usize,
    stats: Arc<DatabaseStats>,
) {
    let slots = Arc::new(Semaphore::new(concurrency));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(batch) = collect_batch(&mut rx, max_batch_size, max_wait).await else {
            break;
        };
        stats.batches.fetch_add(1, Ordering::Relaxed);
        let writer = writer.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let rows: Vec<&ProductRow> = batch.iter().map(|r| &r.row).collect();
            let results = writer.write_batch(&rows).await;
            for (request, result) in batch.into_iter().zip(results) {
                // The caller may be gone (shutdown deadline passed): nothing to tell then.
                let _ = request.done.send(result);
            }
        });
    }
}
