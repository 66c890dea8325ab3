//! The serve pipeline, wired end to end:
//!
//! ```text
//! consumer thread ─► decode event ─► fetch ─► decode image (CPU pool) ─► batcher
//!        ▲                                                                  │
//!        │ completions (offset tracker)             least-loaded worker per device
//!        │                                                                  │
//!        └──── broker ack ◄── produce (output | dead letter) ◄── attributes ◄┘
//! ```
//!
//! Every message ends in exactly one acknowledged record, output or dead letter, before its
//! offset can be committed; with the PostgreSQL sink on, also in its written row, or in the
//! output record plus a `database_write_failed` dead letter (one completion either way, see
//! `deliver_with_row`). [`run`] returns when the shutdown future resolves (after draining)
//! or when a fatal produce error stops the service.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use image::RgbImage;
use tokio::sync::{mpsc, watch, Semaphore};

use crate::attributes;
use crate::batcher::{run_batcher, BatchStats, Pending};
use crate::config::{normalize_kafka_key, Config, InputFormat};
use crate::detection::ImageDetections;
use crate::events::registry::{resolve_output_schema_id, InputDecoder, InputSchemas, SchemaRegistry};
use crate::events::{
    codec, error_kinds, now_ms, DeadLetter, ModelRef, ProductAttributes, ProductImageEvent, StageTimings,
};
use crate::fetch::ImageFetcher;
use crate::sink::postgres::{DatabaseCounts, DatabaseWriteError, PostgresSink, Written};
use crate::sink::{create_producer, OutputSink, SinkSettings};
use crate::source::{spawn_consumer, ConsumerSettings, InputMessage};
use crate::telemetry::{DatabaseOutcome, EventTrace, Health, Stage, Telemetry};
use crate::workers::{BackendFactory, WorkResult, WorkerPool};

/// What a finished run did, for logs, the demo and the benchmark.
#[derive(Debug, Default, Clone)]
pub struct RunReport {
    /// Messages consumed.
    pub consumed: u64,
    /// Attribute records acknowledged.
    pub produced: u64,
    /// Dead letters acknowledged, by error kind.
    pub dead_lettered: BTreeMap<String, u64>,
    /// Messages left unfinished at the shutdown deadline (redelivered after restart).
    pub abandoned: usize,
    /// Batching statistics.
    pub batches: BatchStats,
    /// Times the consumer paused for backpressure.
    pub pauses: u64,
    /// Most messages in flight at once.
    pub peak_in_flight: usize,
    /// PostgreSQL sink counters (all zero when it is off).
    pub database: DatabaseCounts,
}

/// The inference side of a run: how many workers and how to build each one's model.
pub struct Inference {
    /// Worker count (one per configured device entry).
    pub workers: usize,
    /// Builds worker `i`'s backend on its own thread.
    pub factory: BackendFactory,
    /// New model versions to switch to while running (e.g. promotions seen in the model
    /// registry); `None` serves the first model until the end.
    pub updates: Option<mpsc::Receiver<ModelUpdate>>,
}

impl Inference {
    /// Workers that serve the model `factory` builds, with no model updates.
    pub fn new(workers: usize, factory: BackendFactory) -> Self {
        Self {
            workers,
            factory,
            updates: None,
        }
    }
}

/// A model to switch every worker to without stopping ([`WorkerPool::swap_model`]).
pub struct ModelUpdate {
    /// Builds the new model's backend for worker `i`.
    pub factory: BackendFactory,
    /// What is being switched to, for the logs (e.g. `registry version v0004`).
    pub description: String,
}

/// The per-event payload carried through batching and inference.
struct Job {
    msg: InputMessage,
    event: ProductImageEvent,
    timings: StageTimings,
    batched_at: Instant,
}

/// Everything the per-message tasks share.
struct Shared {
    decoder: InputDecoder,
    fetcher: ImageFetcher,
    sink: OutputSink,
    cpu: Arc<Semaphore>,
    config: Config,
    produced: AtomicU64,
    dead_lettered: Mutex<BTreeMap<String, u64>>,
    /// The PostgreSQL sink, when `[database] url` is set.
    database: Option<PostgresSink>,
    /// Metrics and per-event traces.
    telemetry: Telemetry,
}

/// librdkafka properties for the consumer, from the configuration.
pub fn consumer_properties(config: &Config) -> Vec<(String, String)> {
    let k = &config.kafka;
    let mut props = vec![
        ("bootstrap.servers".to_string(), k.bootstrap_servers.clone()),
        ("group.id".to_string(), k.group_id.clone()),
        ("enable.auto.commit".to_string(), "true".to_string()),
        (
            "auto.commit.interval.ms".to_string(),
            k.commit_interval.as_millis().max(1).to_string(),
        ),
        ("auto.offset.reset".to_string(), "earliest".to_string()),
    ];
    for (key, value) in k.options.iter().chain(&k.consumer_options) {
        props.push((normalize_kafka_key(key), value.clone()));
    }
    props
}

/// librdkafka properties for the producer, from the configuration.
pub fn producer_properties(config: &Config) -> Vec<(String, String)> {
    let k = &config.kafka;
    let mut props = vec![("bootstrap.servers".to_string(), k.bootstrap_servers.clone())];
    for (key, value) in k.options.iter().chain(&k.producer_options) {
        props.push((normalize_kafka_key(key), value.clone()));
    }
    props
}

/// The schema registry client, when one is configured.
pub fn registry_client(config: &Config) -> Result<Option<Arc<SchemaRegistry>>> {
    let s = &config.schemas;
    let Some(url) = &s.registry_url else {
        return Ok(None);
    };
    let auth = s
        .registry_username
        .clone()
        .map(|user| (user, s.registry_password.clone().unwrap_or_default()));
    Ok(Some(Arc::new(SchemaRegistry::new(url, auth, Duration::from_secs(10))?)))
}

/// How input values are read, from the configuration.
pub fn input_schemas(config: &Config, registry: Option<Arc<SchemaRegistry>>) -> Result<InputSchemas> {
    let s = &config.schemas;
    Ok(match s.input_format {
        InputFormat::Raw => {
            let writer_schema = match &s.raw_writer_schema {
                Some(path) => {
                    let text = std::fs::read_to_string(path)
                        .with_context(|| format!("schemas.raw_writer_schema {} cannot be read", path.display()))?;
                    apache_avro::Schema::parse_str(&text).with_context(|| {
                        format!(
                            "schemas.raw_writer_schema {} is not a valid Avro schema",
                            path.display()
                        )
                    })?
                }
                None => codec::product_image_event_schema().clone(),
            };
            InputSchemas::Raw { writer_schema }
        }
        InputFormat::Confluent => match (s.input_schema_id, registry) {
            (_, Some(registry)) => InputSchemas::Registry(registry),
            (Some(id), None) => InputSchemas::Fixed {
                id,
                writer_schema: codec::product_image_event_schema().clone(),
            },
            (None, None) => anyhow::bail!("schemas.input_schema_id or schemas.registry_url is required"),
        },
    })
}

/// Runs the service until `shutdown` resolves (then drains within the configured deadline)
/// or a fatal error occurs. Its metrics stay in-process; see [`run_with_telemetry`].
pub async fn run(config: Config, inference: Inference, shutdown: impl Future<Output = ()>) -> Result<RunReport> {
    run_with_telemetry(config, inference, Telemetry::local()?, shutdown).await
}

/// [`run`] reporting into `telemetry`: metrics, per-event spans, and the health that the
/// caller's `/healthz` and `/readyz` serve (see [`crate::telemetry::http`]).
pub async fn run_with_telemetry(
    config: Config,
    inference: Inference,
    telemetry: Telemetry,
    shutdown: impl Future<Output = ()>,
) -> Result<RunReport> {
    let registry = registry_client(&config)?;
    let decoder = InputDecoder::new(input_schemas(&config, registry.clone())?);
    let k = &config.kafka;
    let output_schema_id = resolve_output_schema_id(
        registry.as_deref(),
        &format!("{}-value", k.output_topic),
        codec::product_attributes_schema_json(),
        config.schemas.auto_register,
        config.schemas.output_schema_id,
    )
    .await
    .context("resolving the output schema id")?;
    let dead_letter_schema_id = resolve_output_schema_id(
        registry.as_deref(),
        &format!("{}-value", k.dead_letter_topic),
        codec::dead_letter_schema_json(),
        config.schemas.auto_register,
        config.schemas.dead_letter_schema_id,
    )
    .await
    .context("resolving the dead-letter schema id")?;
    let fetcher = ImageFetcher::new(config.fetch.clone())?;
    let producer = create_producer(&producer_properties(&config))?;
    // Before joining the group: a database that cannot be prepared fails the start.
    let database = if config.database.enabled() {
        Some(PostgresSink::start(&config.database).await?)
    } else {
        None
    };

    // Models first: a replica that cannot load fails the start before we join the group.
    let (results_tx, results_rx) = mpsc::unbounded_channel::<WorkResult<Job>>();
    let pool = Arc::new(WorkerPool::start(
        inference.workers,
        inference.factory,
        config.pipeline.inference_retries,
        results_tx,
    )?);
    tracing::info!(workers = pool.len(), "inference workers ready");
    if let Some(model) = pool.model() {
        telemetry.health().model_ready(model);
    }
    telemetry.health().set_stall_timeout(config.telemetry.stall_timeout);
    let swapper = inference
        .updates
        .map(|updates| tokio::spawn(apply_model_updates(pool.clone(), updates, telemetry.health().clone())));

    let (input_tx, mut input_rx) = mpsc::unbounded_channel::<InputMessage>();
    let (consumer, completions) = spawn_consumer(
        ConsumerSettings {
            topic: k.input_topic.clone(),
            properties: consumer_properties(&config),
            max_in_flight: config.pipeline.max_in_flight,
            drain_timeout: config.pipeline.shutdown_deadline,
            health: telemetry.health().clone(),
        },
        input_tx,
    )?;
    let (fatal_tx, mut fatal_rx) = watch::channel::<Option<String>>(None);
    let sink = OutputSink::new(
        producer,
        SinkSettings {
            output_topic: k.output_topic.clone(),
            dead_letter_topic: k.dead_letter_topic.clone(),
            output_schema_id,
            dead_letter_schema_id,
            retries: config.pipeline.produce_retries,
        },
        completions,
        fatal_tx,
    );
    let ctx = Arc::new(Shared {
        decoder,
        fetcher,
        sink: sink.clone(),
        cpu: Arc::new(Semaphore::new(config.decode_threads())),
        config: config.clone(),
        produced: AtomicU64::new(0),
        dead_lettered: Mutex::new(BTreeMap::new()),
        database,
        telemetry: telemetry.clone(),
    });

    let (batch_tx, batch_rx) = mpsc::channel::<Pending<Job>>(config.batch.max_batch_size * pool.len() * 2);
    // Images the batcher has taken from its channel and not yet handed to a worker.
    let batcher_holds = Arc::new(AtomicUsize::new(0));
    // Gauges read these only when collected; weak references let the stages wind down.
    let batch_queue = batch_tx.downgrade();
    let held = batcher_holds.clone();
    let workers = Arc::downgrade(&pool);
    let _queue_gauges = [
        telemetry.metrics().watch_queue("batcher", move || {
            batch_queue
                .upgrade()
                .map(|tx| (tx.max_capacity() - tx.capacity() + held.load(Ordering::Relaxed)) as i64)
        }),
        telemetry.metrics().watch_queue("workers", move || {
            workers.upgrade().map(|p| p.loads().iter().sum::<usize>() as i64)
        }),
    ];
    let batcher = tokio::spawn(run_batcher(batch_rx, pool.clone(), config.batch.clone(), batcher_holds));
    let finisher = tokio::spawn(finish_results(ctx.clone(), results_rx));

    tokio::pin!(shutdown);
    let mut fatal: Option<String> = None;
    let mut stopping = false;
    loop {
        tokio::select! {
            msg = input_rx.recv() => match msg {
                Some(msg) => {
                    ctx.telemetry.metrics().event_consumed();
                    tokio::spawn(process(ctx.clone(), msg, batch_tx.clone()));
                }
                None => break, // consumer thread finished (after a shutdown request or an error)
            },
            _ = &mut shutdown, if !stopping => {
                tracing::info!("shutdown requested: stopping intake and draining in-flight work");
                telemetry.health().set_draining();
                stopping = true;
                consumer.request_shutdown();
            }
            _ = fatal_rx.changed() => {
                fatal = fatal_rx.borrow().clone();
                if fatal.is_some() && !stopping {
                    telemetry.health().set_draining();
                    stopping = true;
                    consumer.request_shutdown();
                }
            }
        }
    }
    let consumer_report = tokio::task::spawn_blocking(move || consumer.join())
        .await
        .context("joining the consumer thread")??;
    if let Some(swapper) = swapper {
        swapper.abort();
    }
    drop(batch_tx);
    if consumer_report.abandoned == 0 {
        // Everything was acknowledged: the remaining stages only need to wind down.
        let batches = batcher.await.context("batcher task")??;
        finisher.abort();
        report_and_flush(&ctx, consumer_report, batches, &sink, fatal)
    } else {
        batcher.abort();
        finisher.abort();
        report_and_flush(&ctx, consumer_report, BatchStats::default(), &sink, fatal)
    }
}

/// Switches the workers to each model update as it arrives; a model that fails to load is
/// logged and the current one keeps serving.
async fn apply_model_updates(
    pool: Arc<WorkerPool<Job>>,
    mut updates: mpsc::Receiver<ModelUpdate>,
    health: Arc<Health>,
) {
    use tracing::Instrument;
    while let Some(update) = updates.recv().await {
        let span = tracing::info_span!("model_swap", model = %update.description);
        async {
            tracing::info!(model = %update.description, "loading a new model on every worker");
            let started = Instant::now();
            match pool.swap_model(update.factory).await {
                Ok(model) => {
                    tracing::info!(name = %model.name, version = %model.version,
                        load_ms = started.elapsed().as_millis() as u64, "switched every worker to the new model");
                    health.model_ready(model);
                }
                Err(e) => tracing::error!(model = %update.description, error = %format!("{e:#}"),
                    "the new model could not be loaded; the current model keeps serving"),
            }
        }
        .instrument(span)
        .await
    }
}

fn report_and_flush(
    ctx: &Shared,
    consumer: crate::source::ConsumerReport,
    batches: BatchStats,
    sink: &OutputSink,
    fatal: Option<String>,
) -> Result<RunReport> {
    if let Err(e) = sink.flush(Duration::from_secs(10)) {
        tracing::warn!(error = %format!("{e:#}"), "producer flush incomplete");
    }
    if let Some(message) = fatal {
        anyhow::bail!("stopped: {message}");
    }
    Ok(RunReport {
        consumed: consumer.consumed,
        produced: ctx.produced.load(Ordering::Relaxed),
        dead_lettered: ctx.dead_lettered.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        abandoned: consumer.abandoned,
        batches,
        pauses: consumer.pauses,
        peak_in_flight: consumer.peak_in_flight,
        database: ctx.database.as_ref().map(|d| d.stats().snapshot()).unwrap_or_default(),
    })
}

/// One message up to the batcher: decode the event, fetch and decode its image.
async fn process(ctx: Arc<Shared>, mut msg: InputMessage, batch_tx: mpsc::Sender<Pending<Job>>) {
    let p = msg.position;
    msg.trace = ctx.telemetry.tracing().start_event(
        &msg.headers,
        &ctx.config.kafka.input_topic,
        p.partition,
        p.offset,
        msg.received,
    );
    let event = loop {
        match ctx.decoder.decode(&msg.value).await {
            Ok(event) => break event,
            Err(e) => match e.kind() {
                Some(kind) => return dead_letter(&ctx, msg, None, kind, &e.to_string()).await,
                None => {
                    // The registry is unreachable: not the message's fault, so wait and retry.
                    tracing::warn!(error = %e, "cannot decode yet; retrying in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            },
        }
    };
    msg.trace.set_event(&event.event_id, &event.product_id);
    let mut timings = StageTimings::default();
    let fetch_started = Instant::now();
    let fetched = ctx.fetcher.fetch(&event.image).await;
    record_stage(&ctx, &msg, Stage::Fetch, fetch_started);
    let fetched = match fetched {
        Ok(f) => f,
        Err(e) => return dead_letter(&ctx, msg, Some(&event), e.kind(), &e.to_string()).await,
    };
    timings.fetch_ms = ms(fetched.elapsed);
    let max_pixels = ctx.config.decode.max_pixels;
    let decoded = if is_small_image(&fetched.bytes) {
        // Thumbnails decode in microseconds: a thread hand-off would cost more than it saves.
        let started = Instant::now();
        let result = crate::preprocess::decode_image(&fetched.bytes, max_pixels);
        timings.decode_ms = ms(started.elapsed());
        record_stage(&ctx, &msg, Stage::Decode, started);
        Ok(result)
    } else {
        let _permit = ctx.cpu.acquire().await;
        let started = Instant::now();
        let bytes = fetched.bytes;
        let result = tokio::task::spawn_blocking(move || crate::preprocess::decode_image(&bytes, max_pixels)).await;
        timings.decode_ms = ms(started.elapsed());
        record_stage(&ctx, &msg, Stage::Decode, started);
        result
    };
    let image = match decoded {
        Ok(Ok(image)) => image,
        Ok(Err(e)) => return dead_letter(&ctx, msg, Some(&event), e.kind(), &e.to_string()).await,
        Err(join) => {
            let message = format!("image decoder crashed: {join}");
            return dead_letter(&ctx, msg, Some(&event), error_kinds::CORRUPT_IMAGE, &message).await;
        }
    };
    let job = Job {
        msg,
        event,
        timings,
        batched_at: Instant::now(),
    };
    if let Err(mpsc::error::SendError(p)) = batch_tx.send(Pending { image, item: job }).await {
        // Only during teardown after a deadline: the message stays uncommitted and is redelivered.
        tracing::debug!(
            offset = p.item.msg.position.offset,
            "batcher closed; message left for redelivery"
        );
    }
}

/// Turns finished batches into output records (or dead letters for failed images).
async fn finish_results(ctx: Arc<Shared>, mut results: mpsc::UnboundedReceiver<WorkResult<Job>>) {
    while let Some(done) = results.recv().await {
        let inference_ms = ms(done.inference);
        let model = done.model;
        let size = done.items.len();
        ctx.telemetry.metrics().batch(size, ctx.config.batch.max_batch_size);
        let (started, finished) = (done.started, done.started + done.inference);
        for ((image, job), result) in done.images.into_iter().zip(done.items).zip(done.results) {
            record_batch_stages(&ctx, &job, started, finished, size, done.worker, &model);
            let ctx = ctx.clone();
            let model = model.clone();
            tokio::spawn(async move {
                match result {
                    Ok(dets) => emit(&ctx, job, image, dets, model, inference_ms).await,
                    Err(message) => {
                        let Job { msg, event, .. } = job;
                        dead_letter(&ctx, msg, Some(&event), error_kinds::INFERENCE_FAILED, &message).await
                    }
                }
            });
        }
    }
}

async fn emit(ctx: &Shared, job: Job, image: RgbImage, dets: ImageDetections, model: ModelRef, inference_ms: f64) {
    let Job {
        msg,
        event,
        mut timings,
        batched_at,
    } = job;
    let waited = batched_at.elapsed().as_secs_f64() * 1000.0 - inference_ms;
    timings.batch_wait_ms = waited.max(0.0);
    timings.inference_ms = inference_ms;
    let (image_width, image_height) = (dets.width, dets.height);
    let detections = attributes::detection_records(&dets);
    let aggregated = if dets.detections.is_empty() {
        Default::default()
    } else {
        let _permit = ctx.cpu.acquire().await;
        let cfg = ctx.config.attributes.clone();
        tokio::task::spawn_blocking(move || attributes::aggregate(&image, &dets, &cfg))
            .await
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "colour extraction failed; record sent without colours");
                Default::default()
            })
    };
    timings.total_ms = ms(msg.received.elapsed());
    let record = ProductAttributes {
        event_id: event.event_id,
        product_id: event.product_id,
        model,
        image_width,
        image_height,
        detections,
        attributes: aggregated,
        timings,
        event_time_ms: event.event_time_ms,
        processed_time_ms: now_ms(),
        metadata: event.metadata,
    };
    if let Some(database) = &ctx.database {
        return deliver_with_row(ctx, database, msg, record).await;
    }
    let produce_started = Instant::now();
    if ctx
        .sink
        .deliver_attributes(msg.position, &record, &msg.trace.output_headers(&msg.headers))
        .await
    {
        record_produced(ctx);
        record_produce_stage(ctx, &msg.trace, produce_started, Instant::now());
        finish_event(ctx, msg.received, &msg.trace);
    }
}

/// With the PostgreSQL sink on: produces the output record and upserts the row at once, and
/// completes the message once, when both are done. A row that cannot be written does not
/// hold back the output record (the topic is the primary contract); the event is then
/// dead-lettered as `database_write_failed`, whose acknowledgement completes it, so the row
/// can be replayed and the offset still moves.
///
/// The produce stage is recorded once per event, from the start to the acknowledgement that
/// completes it: the output record's, or the dead letter's when the row failed (the database
/// has its own stage).
async fn deliver_with_row(ctx: &Shared, database: &PostgresSink, msg: InputMessage, record: ProductAttributes) {
    let started = Instant::now();
    let ((produced, produce_done), (written, database_done)) = {
        // The headers borrow `msg`; this scope ends the borrow before `msg` moves on.
        let headers = msg.trace.output_headers(&msg.headers);
        let produce = async {
            let produced = ctx.sink.produce_attributes(msg.position, &record, &headers).await;
            (produced, Instant::now())
        };
        let write = async { (database.upsert(&record).await, Instant::now()) };
        tokio::join!(produce, write)
    };
    record_database(ctx, &msg, &written, started, database_done);
    if !produced {
        return; // fatal: the service stops without completing; the message is redelivered
    }
    record_produced(ctx);
    match written {
        Ok(_) => {
            ctx.sink.complete(msg.position);
            record_produce_stage(ctx, &msg.trace, started, produce_done);
            finish_event(ctx, msg.received, &msg.trace);
        }
        Err(e) => {
            let ids = Some((record.event_id, record.product_id));
            let reason = error_kinds::DATABASE_WRITE_FAILED;
            dead_letter_since(ctx, msg, ids, reason, &e.to_string(), started).await
        }
    }
}

/// Records the database stage of `msg` (histogram and span) and the write's outcome.
fn record_database(
    ctx: &Shared,
    msg: &InputMessage,
    written: &Result<Written, DatabaseWriteError>,
    started: Instant,
    finished: Instant,
) {
    let metrics = ctx.telemetry.metrics();
    metrics.stage(Stage::Database, finished.saturating_duration_since(started));
    msg.trace.stage(Stage::Database, started, finished);
    metrics.database_write(match written {
        Ok(Written::FirstAttempt) => DatabaseOutcome::Ok,
        Ok(Written::AfterRetries) => DatabaseOutcome::Retried,
        Err(_) => DatabaseOutcome::Failed,
    });
}

async fn dead_letter(
    ctx: &Shared,
    msg: InputMessage,
    event: Option<&ProductImageEvent>,
    kind: &'static str,
    message: &str,
) {
    let ids = event.map(|e| (e.event_id.clone(), e.product_id.clone()));
    dead_letter_since(ctx, msg, ids, kind, message, Instant::now()).await
}

/// [`dead_letter`] with the (event id, product id) given directly, its produce stage counted
/// from `produce_started` (earlier than now when an output record was produced first).
async fn dead_letter_since(
    ctx: &Shared,
    msg: InputMessage,
    ids: Option<(String, String)>,
    kind: &'static str,
    message: &str,
    produce_started: Instant,
) {
    let (event_id, product_id) = ids.unzip();
    let letter = DeadLetter {
        original_key: msg.key,
        original_value: msg.value,
        source_topic: ctx.config.kafka.input_topic.clone(),
        source_partition: msg.position.partition,
        source_offset: msg.position.offset,
        event_id,
        product_id,
        error_kind: kind.to_string(),
        error_message: message.to_string(),
        failed_time_ms: now_ms(),
    };
    msg.trace.fail(kind, message);
    if !ctx
        .sink
        .deliver_dead_letter(msg.position, &letter, &msg.trace.trace_headers(&msg.headers))
        .await
    {
        return;
    }
    *ctx.dead_lettered
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(kind.to_string())
        .or_default() += 1;
    ctx.telemetry.metrics().dead_letter(kind);
    record_produce_stage(ctx, &msg.trace, produce_started, Instant::now());
    finish_event(ctx, msg.received, &msg.trace);
}

/// Records `stage` of `msg` from `started` until now: its histogram and its span.
fn record_stage(ctx: &Shared, msg: &InputMessage, stage: Stage, started: Instant) {
    let now = Instant::now();
    let metrics = ctx.telemetry.metrics();
    metrics.stage(stage, now.saturating_duration_since(started));
    msg.trace.stage(stage, started, now);
}

/// Records the batching and inference of one event of a batch that ran from `started` to
/// `finished` on `worker`: each event gets both stages with the batch's times.
fn record_batch_stages(
    ctx: &Shared,
    job: &Job,
    started: Instant,
    finished: Instant,
    size: usize,
    worker: usize,
    model: &ModelRef,
) {
    let metrics = ctx.telemetry.metrics();
    metrics.stage(Stage::BatchWait, started.saturating_duration_since(job.batched_at));
    metrics.stage(Stage::Inference, finished.saturating_duration_since(started));
    let trace = &job.msg.trace;
    trace.stage(Stage::BatchWait, job.batched_at, started);
    trace.stage_with(Stage::Inference, started, finished, || {
        vec![
            opentelemetry::KeyValue::new("attrstream.batch.size", size as i64),
            opentelemetry::KeyValue::new("attrstream.worker", worker as i64),
            opentelemetry::KeyValue::new("attrstream.model.name", model.name.clone()),
            opentelemetry::KeyValue::new("attrstream.model.version", model.version.clone()),
        ]
    });
}

/// An attribute record was acknowledged: the run report's count and the counter.
fn record_produced(ctx: &Shared) {
    ctx.produced.fetch_add(1, Ordering::Relaxed);
    ctx.telemetry.metrics().record_produced();
}

/// The produce stage of an event (histogram and its `trace`'s span), once per event: from `started` until the
/// acknowledgement that completes it (`finished`).
fn record_produce_stage(ctx: &Shared, trace: &EventTrace, started: Instant, finished: Instant) {
    ctx.telemetry
        .metrics()
        .stage(Stage::Produce, finished.saturating_duration_since(started));
    trace.stage(Stage::Produce, started, finished);
}

/// An event received at `received` is complete (its output or dead letter acknowledged):
/// total time, end of its span.
fn finish_event(ctx: &Shared, received: Instant, trace: &EventTrace) {
    ctx.telemetry.metrics().stage(Stage::Total, received.elapsed());
    trace.end();
}

/// True for images whose header declares at most 64 × 64 pixels.
fn is_small_image(bytes: &[u8]) -> bool {
    imagesize::blob_size(bytes).is_ok_and(|size| size.width * size.height <= 64 * 64)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
