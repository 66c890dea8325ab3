//! Liveness and readiness, and the consumer-side figures the metrics read: what `/healthz`,
//! `/readyz`, `attrstream_in_flight_messages`, `attrstream_consumer_lag` and
//! `attrstream_model_info` report.
//!
//! The consumer thread and the pipeline write into one [`Health`] with atomics and small
//! mutexes (never held across anything slow); the HTTP handlers and metric callbacks read it.
//!
//! * Liveness: the consumer's poll loop goes round at least every few seconds (it polls with
//!   50 ms timeouts). A rebalance callback may block for up to the drain deadline while
//!   in-flight work of revoked partitions finishes; that counts as alive for that long. Before
//!   the consumer starts (models loading) the process counts as alive: a slow model load must
//!   not get the pod restarted.
//! * Progress: the poll loop keeps going round while it waits for completions, so a hung
//!   inference worker or a database call that never returns would not show in its heartbeat.
//!   While messages are in flight, some completion must arrive within the stall timeout
//!   (`telemetry.stall_timeout`, counted from the last completion or from when work arrived
//!   after an idle spell); else `/healthz` fails too.
//! * Readiness: every worker has loaded and warmed its model, and the consumer has at least one
//!   partition assigned; not while shutting down.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::events::ModelRef;

/// How long the poll loop may go without a round before `/healthz` answers 503.
pub const LIVENESS_STALL: Duration = Duration::from_secs(10);

/// How long messages may be in flight without any completing before `/healthz` answers 503,
/// unless [`Health::set_stall_timeout`] says otherwise (`telemetry.stall_timeout`).
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(300);

const NOT_STARTED: u8 = 0;
const RUNNING: u8 = 1;
const STOPPED: u8 = 2;

/// The service's health as the consumer thread and the pipeline report it.
#[derive(Debug)]
pub struct Health {
    /// Origin of the millisecond timestamps below.
    epoch: Instant,
    /// NOT_STARTED, RUNNING or STOPPED: the consumer poll loop's state.
    consumer: AtomicU8,
    /// Milliseconds since `epoch` of the poll loop's last round.
    last_round_ms: AtomicU64,
    /// Milliseconds since `epoch` when a blocking rebalance callback started; 0 when none runs.
    rebalance_since_ms: AtomicU64,
    /// How long a rebalance callback may block (the drain deadline), in milliseconds.
    rebalance_allowance_ms: AtomicU64,
    /// Every worker has its model loaded and warmed.
    workers_ready: AtomicBool,
    /// Shutdown has begun (intake stopped, draining).
    draining: AtomicBool,
    /// Messages consumed and not yet acknowledged, as the poll loop last counted them.
    in_flight: AtomicU64,
    /// Completions the poll loop has applied so far, as it last reported them.
    completed: AtomicU64,
    /// Milliseconds since `epoch` of the last sign of progress: a completion applied, or work
    /// arriving when nothing was in flight.
    progress_ms: AtomicU64,
    /// How long in-flight work may go without a completion, in milliseconds.
    stall_timeout_ms: AtomicU64,
    /// Partitions assigned to this member: (topic, partition).
    assigned: Mutex<BTreeSet<(String, i32)>>,
    /// Consumer lag per assigned partition, from librdkafka's statistics.
    lag: Mutex<BTreeMap<(String, i32), i64>>,
    /// The model every worker serves (after a hot swap: the new one).
    model: Mutex<Option<ModelRef>>,
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    /// A service that has not started consuming and has no model yet.
    pub fn new() -> Self {
        Self {
            epoch: Instant::now(),
            consumer: AtomicU8::new(NOT_STARTED),
            last_round_ms: AtomicU64::new(0),
            rebalance_since_ms: AtomicU64::new(0),
            rebalance_allowance_ms: AtomicU64::new(0),
            workers_ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            in_flight: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            progress_ms: AtomicU64::new(0),
            stall_timeout_ms: AtomicU64::new(DEFAULT_STALL_TIMEOUT.as_millis() as u64),
            assigned: Mutex::new(BTreeSet::new()),
            lag: Mutex::new(BTreeMap::new()),
            model: Mutex::new(None),
        }
    }

    fn now_ms(&self) -> u64 {
        // +1 so that 0 can mean "never".
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// The consumer's poll loop started; a rebalance callback may block up to `drain_timeout`.
    pub fn consumer_started(&self, drain_timeout: Duration) {
        self.rebalance_allowance_ms
            .store(drain_timeout.as_millis() as u64, Ordering::Relaxed);
        let now = self.now_ms();
        self.last_round_ms.store(now, Ordering::Relaxed);
        self.progress_ms.store(now, Ordering::Relaxed);
        self.consumer.store(RUNNING, Ordering::Relaxed);
    }

    /// How long messages may be in flight with none completing before `/healthz` fails
    /// (`telemetry.stall_timeout`); [`DEFAULT_STALL_TIMEOUT`] until set.
    pub fn set_stall_timeout(&self, limit: Duration) {
        self.stall_timeout_ms
            .store(limit.as_millis().min(u64::MAX as u128) as u64, Ordering::Relaxed);
    }

    /// One round of the poll loop (called every iteration; a few atomic operations):
    /// `in_flight` messages unfinished, `completed` completions applied since the start.
    pub fn heartbeat(&self, in_flight: usize, completed: u64) {
        let now = self.now_ms();
        self.last_round_ms.store(now, Ordering::Relaxed);
        let was_idle = self.in_flight.swap(in_flight as u64, Ordering::Relaxed) == 0;
        let progressed = self.completed.swap(completed, Ordering::Relaxed) != completed;
        if progressed || (was_idle && in_flight > 0) {
            self.progress_ms.store(now, Ordering::Relaxed);
        }
    }

    /// The poll loop has returned (after a shutdown or a fatal error).
    pub fn consumer_stopped(&self) {
        self.consumer.store(STOPPED, Ordering::Relaxed);
        self.assigned.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.lag.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// A rebalance callback starts blocking (draining revoked partitions).
    pub fn rebalance_started(&self) {
        self.rebalance_since_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// The rebalance callback returned.
    pub fn rebalance_finished(&self) {
        self.rebalance_since_ms.store(0, Ordering::Relaxed);
        self.last_round_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Partitions of `topic` were assigned to this member.
    pub fn partitions_assigned(&self, topic: &str, partitions: &[i32]) {
        let mut assigned = self.assigned.lock().unwrap_or_else(|e| e.into_inner());
        for &p in partitions {
            assigned.insert((topic.to_string(), p));
        }
    }

    /// Partitions of `topic` were taken away (their lag is no longer ours to report).
    pub fn partitions_revoked(&self, topic: &str, partitions: &[i32]) {
        let mut assigned = self.assigned.lock().unwrap_or_else(|e| e.into_inner());
        let mut lag = self.lag.lock().unwrap_or_else(|e| e.into_inner());
        for &p in partitions {
            let key = (topic.to_string(), p);
            assigned.remove(&key);
            lag.remove(&key);
        }
    }

    /// Updates the lag of assigned partitions from librdkafka's statistics: high watermark
    /// minus the consumer's position (the next offset it hands to the pipeline; before the
    /// first message, the committed offset, else the low watermark).
    pub fn record_statistics(&self, stats: &rdkafka::Statistics) {
        let assigned = self.assigned.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut lag = self.lag.lock().unwrap_or_else(|e| e.into_inner());
        for (topic, t) in &stats.topics {
            for p in t.partitions.values() {
                let key = (topic.clone(), p.partition);
                if p.partition < 0 || !assigned.contains(&key) || p.hi_offset < 0 {
                    continue;
                }
                let position = [p.app_offset, p.committed_offset, p.lo_offset]
                    .into_iter()
                    .find(|o| *o >= 0);
                if let Some(position) = position {
                    lag.insert(key, (p.hi_offset - position).max(0));
                }
            }
        }
    }

    /// Sets one partition's lag directly (tests that render the gauge; librdkafka statistics
    /// are too large to build by hand).
    #[cfg(test)]
    pub(crate) fn set_lag(&self, topic: &str, partition: i32, lag: i64) {
        self.lag
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((topic.to_string(), partition), lag);
    }

    /// Every worker has loaded and warmed `model` (at start and after each hot swap).
    pub fn model_ready(&self, model: ModelRef) {
        *self.model.lock().unwrap_or_else(|e| e.into_inner()) = Some(model);
        self.workers_ready.store(true, Ordering::Relaxed);
    }

    /// Shutdown has begun: no longer ready.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// The model being served, once loaded.
    pub fn model(&self) -> Option<ModelRef> {
        self.model.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Messages in flight at the poll loop's last round.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Lag per assigned partition: ((topic, partition), messages).
    pub fn lag(&self) -> Vec<((String, i32), i64)> {
        let lag = self.lag.lock().unwrap_or_else(|e| e.into_inner());
        lag.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }

    /// Partitions assigned to this member.
    pub fn assigned_partitions(&self) -> usize {
        self.assigned.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// `Ok` while the process is doing its job; else what is wrong (for `/healthz`).
    pub fn liveness(&self) -> Result<(), String> {
        match self.consumer.load(Ordering::Relaxed) {
            NOT_STARTED => Ok(()), // starting: loading models, joining the group
            STOPPED => Err("the consumer loop has stopped".into()),
            _ => {
                let now = self.now_ms();
                self.progress(now)?;
                let idle = Duration::from_millis(now.saturating_sub(self.last_round_ms.load(Ordering::Relaxed)));
                if idle <= LIVENESS_STALL {
                    return Ok(());
                }
                let since = self.rebalance_since_ms.load(Ordering::Relaxed);
                let allowance = Duration::from_millis(self.rebalance_allowance_ms.load(Ordering::Relaxed));
                if since != 0 && Duration::from_millis(now.saturating_sub(since)) <= allowance + LIVENESS_STALL {
                    return Ok(()); // draining revoked partitions inside a rebalance callback
                }
                Err(format!(
                    "the consumer loop has not polled for {:.1} s",
                    idle.as_secs_f64()
                ))
            }
        }
    }

    /// `Err` when messages are in flight and none has completed for longer than the stall
    /// timeout: a hung inference worker or a database call that never returns.
    fn progress(&self, now: u64) -> Result<(), String> {
        let in_flight = self.in_flight.load(Ordering::Relaxed);
        if in_flight == 0 {
            return Ok(());
        }
        let since = Duration::from_millis(now.saturating_sub(self.progress_ms.load(Ordering::Relaxed)));
        let limit = Duration::from_millis(self.stall_timeout_ms.load(Ordering::Relaxed));
        if since <= limit {
            return Ok(());
        }
        Err(format!(
            "{in_flight} messages in flight and none completed for {:.1} s (telemetry.stall_timeout \
             is {:.1} s): an inference worker, the broker or the database is not answering",
            since.as_secs_f64(),
            limit.as_secs_f64()
        ))
    }

    /// `Ok` when the service can do its job; else the reason (for `/readyz`).
    pub fn readiness(&self) -> Result<(), String> {
        if self.draining.load(Ordering::Relaxed) {
            return Err("shutting down: draining in-flight work".into());
        }
        if !self.workers_ready.load(Ordering::Relaxed) {
            return Err("the model is not yet loaded and warmed on every worker".into());
        }
        match self.consumer.load(Ordering::Relaxed) {
            NOT_STARTED => return Err("the Kafka consumer has not started".into()),
            STOPPED => return Err("the Kafka consumer has stopped".into()),
            _ => {}
        }
        if self.assigned_partitions() == 0 {
            return Err("no partitions assigned (joining the consumer group, or more replicas than partitions)".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> ModelRef {
        ModelRef {
            name: "m".into(),
            version: "1".into(),
        }
    }

    #[test]
    fn ready_only_with_warm_workers_and_partitions() {
        let h = Health::new();
        assert!(h.liveness().is_ok(), "alive while starting");
        assert!(h.readiness().unwrap_err().contains("model"));
        h.model_ready(model());
        assert!(h.readiness().unwrap_err().contains("consumer"));
        h.consumer_started(Duration::from_secs(30));
        assert!(h.readiness().unwrap_err().contains("no partitions"));
        h.partitions_assigned("in", &[0, 1]);
        assert_eq!(h.readiness(), Ok(()));
        h.partitions_revoked("in", &[0, 1]);
        assert!(h.readiness().is_err());
        h.partitions_assigned("in", &[2]);
        h.set_draining();
        assert!(h.readiness().unwrap_err().contains("shutting down"));
        h.consumer_stopped();
        assert!(h.liveness().is_err());
    }

    #[test]
    fn a_stalled_loop_is_not_alive_unless_a_rebalance_drains() {
        let fresh = Health::new();
        fresh.consumer_started(Duration::from_secs(30));
        assert!(fresh.liveness().is_ok());
        // A clock that started long ago, and a last round at its very beginning.
        let h2 = Health {
            epoch: Instant::now() - LIVENESS_STALL - Duration::from_secs(1),
            ..Health::new()
        };
        h2.consumer_started(Duration::from_secs(30));
        h2.last_round_ms.store(1, Ordering::Relaxed);
        let err = h2.liveness().unwrap_err();
        assert!(err.contains("not polled"), "{err}");
        h2.rebalance_started();
        assert!(h2.liveness().is_ok(), "a rebalance may block up to the drain deadline");
        h2.rebalance_finished();
        assert!(h2.liveness().is_ok());
    }

    #[test]
    fn in_flight_work_with_no_completion_for_the_stall_timeout_is_not_alive() {
        // A clock that started long ago, so "at its very beginning" is long past.
        let h = Health {
            epoch: Instant::now() - Duration::from_secs(600),
            ..Health::new()
        };
        h.set_stall_timeout(Duration::from_secs(60));
        h.consumer_started(Duration::from_secs(30));
        let long_ago = || h.progress_ms.store(1, Ordering::Relaxed);
        h.heartbeat(0, 0);
        long_ago();
        h.heartbeat(0, 0);
        assert!(h.liveness().is_ok(), "idle with nothing in flight is fine");
        h.heartbeat(3, 0);
        assert!(h.liveness().is_ok(), "work that just arrived after an idle spell");
        long_ago();
        h.heartbeat(3, 0); // the loop still polls, but nothing completes
        let err = h.liveness().unwrap_err();
        assert!(
            err.contains("3 messages in flight") && err.contains("telemetry.stall_timeout"),
            "{err}"
        );
        h.heartbeat(3, 1);
        assert!(h.liveness().is_ok(), "a completion is progress");
        long_ago();
        h.heartbeat(2, 1);
        assert!(h.liveness().is_err(), "same completion count: no progress");
        h.heartbeat(0, 3);
        assert!(h.liveness().is_ok());
        // A generous limit tolerates the same wait.
        h.heartbeat(1, 3);
        long_ago();
        h.heartbeat(1, 3);
        assert!(h.liveness().is_err());
        h.set_stall_timeout(Duration::from_secs(3600));
        assert!(h.liveness().is_ok());
    }
}
