//! The Kafka consumer thread: polls, tracks offsets, applies backpressure, stores offsets
//! only for acknowledged work, and hands messages to the async pipeline.
//!
//! It runs on its own OS thread with a `BaseConsumer` so that the rebalance callback can
//! block (waiting for in-flight work of revoked partitions) without stalling the async
//! pipeline that must finish that very work. Under overload it pauses its partitions but
//! keeps polling, so the group does not evict it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::mpsc::UnboundedSender;

use super::offsets::{MessagePosition, OffsetTracker};
use crate::kafka_errors::ErrorLog;
use crate::telemetry::{EventTrace, Health};

/// One consumed message, owned, with what the pipeline needs to report its completion.
#[derive(Debug)]
pub struct InputMessage {
    /// Partition, offset and assignment epoch: hand back to [`CompletionSender`] when done.
    pub position: MessagePosition,
    /// The message key (the producer's choice; usually the product id).
    pub key: Option<Vec<u8>>,
    /// The message value (the framed Avro event).
    pub value: Vec<u8>,
    /// Kafka headers, for trace-context propagation.
    pub headers: Vec<(String, Vec<u8>)>,
    /// When the consumer handed it over (start of the end-to-end latency).
    pub received: Instant,
    /// The event's trace, started by the pipeline (empty until then and when tracing is off).
    pub trace: EventTrace,
}

/// Reports finished messages (output or dead letter acknowledged by the broker).
pub type CompletionSender = Sender<MessagePosition>;

/// What the consumer thread needs to know.
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    /// The input topic.
    pub topic: String,
    /// librdkafka properties (bootstrap.servers, group.id, security, pass-through options).
    pub properties: Vec<(String, String)>,
    /// Pause above this many in-flight messages, resume at half.
    pub max_in_flight: usize,
    /// How long a revoke (rebalance) or shutdown waits for in-flight work.
    pub drain_timeout: Duration,
    /// Where the poll loop reports liveness, assignments, in-flight work and lag.
    pub health: Arc<Health>,
}

/// Counters the consumer thread returns when it stops.
#[derive(Debug, Default, Clone)]
pub struct ConsumerReport {
    /// Messages handed to the pipeline.
    pub consumed: u64,
    /// Messages still in flight when the drain deadline passed (redelivered after restart).
    pub abandoned: usize,
    /// Times the consumer paused for backpressure.
    pub pauses: u64,
    /// Most messages in flight at once (never above `max_in_flight`).
    pub peak_in_flight: usize,
}

/// At the in-flight limit the loop first just waits for completions (no new messages are
/// read, heartbeats continue on librdkafka's thread); only a stall longer than this pauses
/// the partitions. Pausing drops librdkafka's prefetched messages and fetching resumes only
/// after about a second, which would cap throughput at about `max_in_flight` msgs/s.
const PAUSE_AFTER: Duration = Duration::from_secs(1);

/// Until the first partitions are assigned, how often the poll loop logs what it waits for
/// (an unreachable cluster is retried forever, as Kafka clients do; `/readyz` says 503 meanwhile).
const WAITING_NOTICE_EVERY: Duration = Duration::from_secs(30);

/// State shared between the poll loop and the rebalance callbacks (same thread, so the
/// mutex is never contended; it exists because the callbacks only get `&self`).
struct SharedState {
    tracker: OffsetTracker,
    completions: Receiver<MessagePosition>,
    topic: String,
    drain_timeout: Duration,
    paused: bool,
    /// Completions received so far (what `/healthz` watches for progress).
    completed: u64,
}

impl SharedState {
    /// Applies one completion; adds the partition's new position to `moved` if it moved.
    fn apply(&mut self, pos: MessagePosition, moved: &mut Vec<(i32, i64)>) {
        self.completed += 1;
        if let Some(next) = self.tracker.complete(pos) {
            moved.push((pos.partition, next));
        }
    }

    /// Applies every completion that has arrived; returns the positions that moved.
    fn apply_completions(&mut self) -> Vec<(i32, i64)> {
        let mut moved = Vec::new();
        while let Ok(pos) = self.completions.try_recv() {
            self.apply(pos, &mut moved);
        }
        moved
    }

    /// Waits up to `timeout` for one completion, then applies every other that arrived.
    fn wait_for_completion(&mut self, timeout: Duration) -> Vec<(i32, i64)> {
        let mut moved = Vec::new();
        if let Ok(pos) = self.completions.recv_timeout(timeout) {
            self.apply(pos, &mut moved);
        }
        moved.extend(self.apply_completions());
        moved
    }

    /// Blocks until the given partitions have nothing in flight or `deadline` passes.
    fn drain(&mut self, partitions: &[i32], deadline: Instant) -> Vec<(i32, i64)> {
        let mut moved = self.apply_completions();
        while partitions.iter().any(|&p| self.tracker.in_flight_for(p) > 0) {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            match self.completions.recv_timeout(deadline - now) {
                Ok(pos) => self.apply(pos, &mut moved),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        moved
    }
}

/// The consumer's context: rebalance handling that keeps at-least-once across rebalances.
struct TrackingContext {
    state: Arc<Mutex<SharedState>>,
    health: Arc<Health>,
    errors: ErrorLog,
}

impl ClientContext for TrackingContext {
    /// librdkafka's periodic statistics (`statistics.interval.ms`): consumer lag per partition.
    fn stats(&self, statistics: rdkafka::Statistics) {
        self.health.record_statistics(&statistics);
    }

    /// Global errors (brokers down, …), rate-limited in the logs.
    fn error(&self, error: KafkaError, reason: &str) {
        self.errors.report(&error, reason);
    }
}

impl ConsumerContext for TrackingContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(list) = rebalance else {
            return;
        };
        self.health.rebalance_started();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let revoked: Vec<i32> = list
            .elements()
            .iter()
            .filter(|e| e.topic() == state.topic)
            .map(|e| e.partition())
            .collect();
        let deadline = Instant::now() + state.drain_timeout;
        let moved = state.drain(&revoked, deadline);
        store(consumer, &state.topic, &moved);
        let mut abandoned = 0;
        for p in &revoked {
            abandoned += state.tracker.revoke(*p);
        }
        if abandoned > 0 {
            tracing::warn!(
                abandoned,
                "partitions revoked with work still in flight; the new owner will reprocess it"
            );
        }
        if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
            if !matches!(
                e,
                KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)
            ) {
                tracing::warn!(error = %e, "commit on revoke failed; uncommitted work will be redelivered");
            }
        }
        self.health.partitions_revoked(&state.topic, &revoked);
        self.health.rebalance_finished();
        tracing::info!(partitions = ?revoked, "partitions revoked");
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Assign(list) = rebalance else {
            return;
        };
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut assigned = Vec::new();
        for e in list.elements() {
            if e.topic() == state.topic {
                state.tracker.assign(e.partition());
                assigned.push(e.partition());
            }
        }
        if state.paused {
            if let Err(e) = consumer.pause(list) {
                tracing::warn!(error = %e, "could not pause newly assigned partitions");
            }
        }
        self.health.partitions_assigned(&state.topic, &assigned);
        tracing::info!(partitions = ?assigned, "partitions assigned");
    }
}

/// Stores next-offsets for commit (the commit itself is periodic, on revoke and on close).
fn store<C: ConsumerContext>(consumer: &BaseConsumer<C>, topic: &str, moved: &[(i32, i64)]) {
    if moved.is_empty() {
        return;
    }
    // One entry per partition (the furthest position): librdkafka keeps only one per partition.
    let mut furthest: std::collections::BTreeMap<i32, i64> = std::collections::BTreeMap::new();
    for &(partition, next) in moved {
        let entry = furthest.entry(partition).or_insert(next);
        *entry = (*entry).max(next);
    }
    let mut tpl = TopicPartitionList::new();
    for (&partition, &next) in &furthest {
        if let Err(e) = tpl.add_partition_offset(topic, partition, Offset::Offset(next)) {
            tracing::warn!(error = %e, partition, "cannot add offset to store");
        }
    }
    if let Err(e) = consumer.store_offsets(&tpl) {
        // Happens when the partition was revoked meanwhile: the new owner re-reads, at least once.
        tracing::debug!(error = %e, "storing offsets failed");
    }
}

/// A running consumer thread.
pub struct ConsumerHandle {
    shutdown: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<ConsumerReport>>>,
}

impl ConsumerHandle {
    /// Asks the thread to stop taking new messages, drain, commit and leave the group.
    pub fn request_shutdown(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
    }

    /// True once the thread has returned.
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Waits for the thread (call after [`Self::request_shutdown`]).
    pub fn join(mut self) -> Result<ConsumerReport> {
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| anyhow::anyhow!("consumer thread panicked"))?,
            None => Ok(ConsumerReport::default()),
        }
    }
}

/// Creates the consumer, subscribes, and starts the poll loop on its own thread.
/// Messages unfinished and completions applied so far, for [`Health::heartbeat`].
fn in_flight_and_completed(state: &Mutex<SharedState>) -> (usize, u64) {
    let s = state.lock().unwrap_or_else(|e| e.into_inner());
    (s.tracker.in_flight(), s.completed)
}

/// Messages go to `output`; their completions come back through the returned sender.
pub fn spawn_consumer(
    settings: ConsumerSettings,
    output: UnboundedSender<InputMessage>,
) -> Result<(ConsumerHandle, CompletionSender)> {
    let (completion_tx, completion_rx) = std::sync::mpsc::channel();
    let state = Arc::new(Mutex::new(SharedState {
        tracker: OffsetTracker::new(),
        completions: completion_rx,
        topic: settings.topic.clone(),
        drain_timeout: settings.drain_timeout,
        paused: false,
        completed: 0,
    }));
    let mut config = ClientConfig::new();
    for (k, v) in &settings.properties {
        config.set(k, v);
    }
    config.set("enable.auto.offset.store", "false");
    if !settings.properties.iter().any(|(k, _)| k == "statistics.interval.ms") {
        // Consumer lag for attrstream_consumer_lag; parsing the statistics every 5 s is cheap.
        config.set("statistics.interval.ms", "5000");
    }
    let consumer: BaseConsumer<TrackingContext> = config
        .create_with_context(TrackingContext {
            state: state.clone(),
            health: settings.health.clone(),
            errors: ErrorLog::default(),
        })
        .context("cannot create the Kafka consumer (check kafka.* settings)")?;
    consumer
        .subscribe(&[&settings.topic])
        .with_context(|| format!("cannot subscribe to {}", settings.topic))?;
    let shutdown = Arc::new(AtomicBool::new(false));
    let flag = shutdown.clone();
    let thread = std::thread::Builder::new()
        .name("kafka-consumer".into())
        .spawn(move || poll_loop(consumer, state, settings, output, flag))
        .context("cannot start the consumer thread")?;
    Ok((
        ConsumerHandle {
            shutdown,
            thread: Some(thread),
        },
        completion_tx,
    ))
}

fn poll_loop(
    consumer: BaseConsumer<TrackingContext>,
    state: Arc<Mutex<SharedState>>,
    settings: ConsumerSettings,
    output: UnboundedSender<InputMessage>,
    shutdown: Arc<AtomicBool>,
) -> Result<ConsumerReport> {
    let mut report = ConsumerReport::default();
    let resume_below = (settings.max_in_flight / 2).max(1);
    let apply_completions =
        |s: &Arc<Mutex<SharedState>>| s.lock().unwrap_or_else(|e| e.into_inner()).apply_completions();
    let mut last_error: Option<Instant> = None;
    let mut stalled_since: Option<Instant> = None;
    let health = settings.health.clone();
    health.consumer_started(settings.drain_timeout);
    let mut waiting_notice = Some(Instant::now() + WAITING_NOTICE_EVERY);
    while !shutdown.load(Ordering::SeqCst) {
        if waiting_notice.is_some_and(|at| Instant::now() >= at) {
            waiting_notice = notice_while_unassigned(&consumer, &settings);
        }
        let moved = apply_completions(&state);
        store(&consumer, &settings.topic, &moved);
        let (in_flight, completed) = in_flight_and_completed(&state);
        health.heartbeat(in_flight, completed);
        report.peak_in_flight = report.peak_in_flight.max(in_flight);
        if in_flight >= settings.max_in_flight {
            let since = *stalled_since.get_or_insert_with(Instant::now);
            if since.elapsed() < PAUSE_AFTER {
                let moved = state
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .wait_for_completion(Duration::from_millis(50));
                store(&consumer, &settings.topic, &moved);
                continue;
            }
        } else {
            stalled_since = None;
        }
        flow_control(&consumer, &state, settings.max_in_flight, resume_below, &mut report);
        match consumer.poll(Duration::from_millis(50)) {
            None => {}
            Some(Ok(msg)) => {
                let position = {
                    let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
                    s.tracker.track(msg.partition(), msg.offset())
                };
                let Some(position) = position else {
                    continue; // a message of a partition revoked meanwhile
                };
                let headers = msg
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|x| (x.key.to_string(), x.value.map(<[u8]>::to_vec).unwrap_or_default()))
                            .collect()
                    })
                    .unwrap_or_default();
                let input = InputMessage {
                    position,
                    key: msg.key().map(<[u8]>::to_vec),
                    value: msg.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                    headers,
                    received: Instant::now(),
                    trace: EventTrace::default(),
                };
                report.consumed += 1;
                if output.send(input).is_err() {
                    break; // pipeline gone: stop, nothing more can be acknowledged
                }
            }
            Some(Err(e)) if last_error.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) => {
                tracing::warn!(error = %e, "Kafka consumer error (librdkafka retries by itself)");
                last_error = Some(Instant::now());
            }
            Some(Err(_)) => {}
        }
    }
    // Shutdown: stop intake, wait for in-flight work while still polling (group membership).
    if let Ok(assignment) = consumer.assignment() {
        let _ = consumer.pause(&assignment);
    }
    let deadline = Instant::now() + settings.drain_timeout;
    loop {
        let moved = apply_completions(&state);
        store(&consumer, &settings.topic, &moved);
        let (in_flight, completed) = in_flight_and_completed(&state);
        health.heartbeat(in_flight, completed);
        if in_flight == 0 {
            break;
        }
        if Instant::now() >= deadline {
            report.abandoned = in_flight;
            tracing::warn!(
                in_flight,
                "shutdown deadline passed; unfinished messages will be redelivered"
            );
            break;
        }
        let _ = consumer.poll(Duration::from_millis(20));
    }
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) => {}
        Err(KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)) => {}
        Err(e) => tracing::warn!(error = %e, "final commit failed; uncommitted work will be redelivered"),
    }
    drop(consumer); // closes: leaves the group so partitions move to others at once
    health.consumer_stopped();
    Ok(report)
}

/// Pauses all assigned partitions above the in-flight limit and resumes below half of it.
/// Logs what the consumer waits for while it has never had partitions; returns when to look
/// again (`None` once partitions arrived).
fn notice_while_unassigned(consumer: &BaseConsumer<TrackingContext>, settings: &ConsumerSettings) -> Option<Instant> {
    if consumer.assignment().is_ok_and(|a| a.count() > 0) {
        return None;
    }
    let property = |key: &str| {
        settings
            .properties
            .iter()
            .find(|(k, _)| k == key)
            .map_or("", |(_, v)| v.as_str())
    };
    tracing::warn!(
        brokers = property("bootstrap.servers"),
        group = property("group.id"),
        topic = %settings.topic,
        "waiting for Kafka: no partition assigned yet (brokers unreachable, topic missing, or more group \
         members than partitions); retrying, not ready until then"
    );
    Some(Instant::now() + WAITING_NOTICE_EVERY)
}

fn flow_control(
    consumer: &BaseConsumer<TrackingContext>,
    state: &Arc<Mutex<SharedState>>,
    max_in_flight: usize,
    resume_below: usize,
    report: &mut ConsumerReport,
) {
    let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
    let in_flight = s.tracker.in_flight();
    let change = if !s.paused && in_flight >= max_in_flight {
        Some(true)
    } else if s.paused && in_flight < resume_below {
        Some(false)
    } else {
        None
    };
    let Some(pause) = change else {
        return;
    };
    let Ok(assignment) = consumer.assignment() else {
        return;
    };
    let result = if pause {
        consumer.pause(&assignment)
    } else {
        consumer.resume(&assignment)
    };
    match result {
        Ok(()) => {
            s.paused = pause;
            if pause {
                report.pauses += 1;
            }
            tracing::debug!(in_flight, paused = pause, "backpressure");
        }
        Err(e) => tracing::warn!(error = %e, "pause/resume failed"),
    }
}
